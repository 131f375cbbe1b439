//! The sections of the services that are not the kit's own: each service reads its own
//! (`planner`, `preview`, `billing`, `deployer`, `cli`; the executor's are `platform` and
//! `edge`), and every one is checked at load, so a mistyped key anywhere is refused by name.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerSettings {
    /// The app generator: `builtin` (offline, no key), `anthropic` or `openai`.
    pub provider: String,
    /// Runs one planner replica drives at once; more wait (`queued`).
    pub max_runs_in_flight: usize,
    /// Longest one step of a run may take.
    pub step_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewSettings {
    /// Lifetime of an iframe token (a UI refreshes before it ends); at most a day.
    pub token_ttl_sec: u64,
    /// Lifetime of a share link when the caller gives none.
    pub share_ttl_sec: u64,
    /// Longest share link anyone may ask for.
    pub max_share_ttl_sec: u64,
    /// A burst of file changes ends after this long without one, and becomes one
    /// `files_changed`.
    pub debounce_ms: u64,
    /// A burst is published at the latest this long after its first change, however busy.
    pub debounce_max_ms: u64,
    /// Paths one `files_changed` lists at most; a burst with more is sent as a `resync`.
    pub max_paths: usize,
    /// How often expired share links are looked for (`share_expired`).
    pub sweep_interval_ms: u64,
    /// Lifetime of a browser ticket (single use).
    pub ticket_ttl_sec: u64,
    /// Where the browser API listens (`GET /v1/runs/{run}/events`, `.../previews`).
    pub listen: SocketAddr,
    /// How browsers reach the browser API (`https://preview-api.example.com`), put in ticket
    /// URLs; empty: `http://` and the address it listens on.
    pub public_url: String,
    /// Origins whose pages may call the browser API (CORS), for example
    /// `https://app.example.com`; a list, or one string separated by commas.
    #[serde(deserialize_with = "list_or_csv")]
    pub allowed_origins: Vec<String>,
}

/// A list, or a string of comma-separated items (how an environment variable gives one).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Csv(String),
    }
    let items = match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Csv(s) => s.split(',').map(str::to_string).collect(),
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    /// How late a usage event may arrive and still be billed (its `time` against now).
    pub lateness_days: u32,
    /// How far in the future a usage event's `time` may be (clock skew between hosts).
    pub clock_skew_sec: u64,
    /// Usage events folded in one batch at most.
    pub batch_max_events: usize,
    /// Bytes of usage events folded in one batch at most (a batch's checkpoint is one KV value).
    pub batch_max_bytes: usize,
    /// The currency of `prices` (ISO 4217, for example `USD`).
    pub currency: String,
    /// Unit price by meter, an exact decimal string (`llm_input_tokens = "0.000003"`). Empty:
    /// billed usage carries quantities only, for a platform that prices for itself.
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, String>,
    /// Days after a month ends before it is closed (late events still land in it).
    pub close_grace_days: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployerSettings {
    /// Longest one deploy job may take, build and verification included.
    pub job_timeout_ms: u64,
    /// How long a new version has to answer before it is called failed.
    pub verify_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CliPrincipal {
    Platform,
    Admin,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliSettings {
    /// Whom the CLI acts as when it has credentials (its NATS inbox prefix follows).
    pub principal: CliPrincipal,
    /// Where `slipway up` serves the console.
    pub console_listen: SocketAddr,
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The longest preview token MIOSA mints, and the longest share link: a day and 30 days.
const DAY_SEC: u64 = 86_400;

pub(super) fn validate(s: &super::Settings) -> Result<(), ConfigError> {
    if !["builtin", "anthropic", "openai"].contains(&s.planner.provider.as_str()) {
        return Err(invalid(
            "planner.provider",
            "one of `builtin`, `anthropic`, `openai`",
        ));
    }
    if s.planner.max_runs_in_flight == 0 {
        return Err(invalid("planner.max_runs_in_flight", "must be at least 1"));
    }
    if s.planner.step_timeout_ms < 1000 {
        return Err(invalid("planner.step_timeout_ms", "must be at least 1000"));
    }
    let p = &s.preview;
    if !(60..=DAY_SEC).contains(&p.token_ttl_sec) {
        return Err(invalid("preview.token_ttl_sec", "60 to 86400 seconds"));
    }
    if !(60..=30 * DAY_SEC).contains(&p.max_share_ttl_sec) {
        return Err(invalid(
            "preview.max_share_ttl_sec",
            "60 seconds to 30 days",
        ));
    }
    if p.share_ttl_sec == 0 || p.share_ttl_sec > p.max_share_ttl_sec {
        return Err(invalid(
            "preview.share_ttl_sec",
            "at least 1 second and at most `preview.max_share_ttl_sec`",
        ));
    }
    if !(10..=2000).contains(&p.debounce_ms) {
        return Err(invalid("preview.debounce_ms", "10 to 2000"));
    }
    // A burst must end well inside the debouncing replica's lease (3 s) for the lease to fence
    // its publish; and a preview that waits longer than that to refresh feels broken anyway.
    if p.debounce_max_ms < p.debounce_ms || p.debounce_max_ms > 2000 {
        return Err(invalid(
            "preview.debounce_max_ms",
            "at least `preview.debounce_ms` and at most 2000",
        ));
    }
    if !(1..=1000).contains(&p.max_paths) {
        return Err(invalid("preview.max_paths", "1 to 1000"));
    }
    if !(100..=60_000).contains(&p.sweep_interval_ms) {
        return Err(invalid("preview.sweep_interval_ms", "100 to 60000"));
    }
    if !(1..=600).contains(&p.ticket_ttl_sec) {
        return Err(invalid("preview.ticket_ttl_sec", "1 to 600 seconds"));
    }
    let u = &p.public_url;
    if !u.is_empty()
        && (!(u.starts_with("http://") || u.starts_with("https://")) || u.ends_with('/'))
    {
        return Err(invalid(
            "preview.public_url",
            "empty, or an `http(s)://` URL without a trailing `/`",
        ));
    }
    for o in &p.allowed_origins {
        let ok = (o.starts_with("http://") || o.starts_with("https://"))
            && !o.ends_with('/')
            && !o.contains(['*', ' ']);
        if !ok {
            return Err(invalid(
                "preview.allowed_origins",
                format!("{o:?}: an origin is `scheme://host[:port]`, without a path or `*`"),
            ));
        }
    }
    let b = &s.billing;
    // Billing remembers the ids it has counted for `BILLING_DEDUPE_DAYS`: an event later than
    // that could be counted twice, so the accepted lateness stays inside it.
    let most = crate::topology::BILLING_DEDUPE_DAYS - 1;
    if !(1..=most).contains(&b.lateness_days) {
        return Err(invalid(
            "billing.lateness_days",
            format!(
                "1 to {most} days (billing remembers counted ids for {} days)",
                most + 1
            ),
        ));
    }
    if b.lateness_days as u64 > s.setup.usage_max_age_days {
        return Err(invalid(
            "billing.lateness_days",
            "longer than the USAGE stream keeps events (`setup.usage_max_age_days`)",
        ));
    }
    if b.clock_skew_sec > 3600 {
        return Err(invalid("billing.clock_skew_sec", "at most 3600"));
    }
    if b.close_grace_days > 28 {
        return Err(invalid("billing.close_grace_days", "at most 28"));
    }
    if !(1..=1000).contains(&b.batch_max_events) {
        return Err(invalid("billing.batch_max_events", "1 to 1000"));
    }
    if !(1024..=512 * 1024).contains(&b.batch_max_bytes) {
        return Err(invalid("billing.batch_max_bytes", "1 KiB to 512 KiB"));
    }
    if b.currency.len() != 3 || !b.currency.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(invalid(
            "billing.currency",
            "three capital letters (ISO 4217)",
        ));
    }
    for (meter, price) in &b.prices {
        if slipway_proto::meters::find(meter).is_none() {
            return Err(invalid(
                "billing.prices",
                format!("`{meter}` is not a meter of the catalogue"),
            ));
        }
        let (whole, frac) = price.split_once('.').unwrap_or((price, ""));
        let whole = whole.trim_start_matches('0');
        // At most 100000 per unit, 9 decimals (billing's exact arithmetic keeps them).
        let too_big = whole.len() > 6
            || (whole.len() == 6 && whole > "100000")
            || (whole == "100000" && frac.bytes().any(|b| b != b'0'));
        if !slipway_proto::validate::is_decimal(price) || frac.len() > 9 || too_big {
            return Err(invalid(
                "billing.prices",
                format!(
                    "`{meter}`: `{price}` is not a non-negative decimal with at most 9 decimals"
                ),
            ));
        }
    }
    if s.deployer.job_timeout_ms < 1000 {
        return Err(invalid("deployer.job_timeout_ms", "must be at least 1000"));
    }
    if s.deployer.verify_timeout_ms == 0 || s.deployer.verify_timeout_ms > s.deployer.job_timeout_ms
    {
        return Err(invalid(
            "deployer.verify_timeout_ms",
            "at least 1 and at most `deployer.job_timeout_ms`",
        ));
    }
    Ok(())
}

/// The compiled-in defaults of these sections.
pub(super) const DEFAULTS: &[(&str, &str)] = &[
    ("planner.provider", "builtin"),
    ("planner.max_runs_in_flight", "8"),
    ("planner.step_timeout_ms", "600000"),
    ("preview.token_ttl_sec", "900"),
    ("preview.share_ttl_sec", "86400"),
    ("preview.max_share_ttl_sec", "604800"),
    ("preview.debounce_ms", "150"),
    ("preview.debounce_max_ms", "1000"),
    ("preview.max_paths", "100"),
    ("preview.sweep_interval_ms", "1000"),
    ("preview.ticket_ttl_sec", "60"),
    ("preview.listen", "127.0.0.1:7080"),
    ("preview.public_url", ""),
    ("preview.allowed_origins", ""),
    ("billing.lateness_days", "35"),
    ("billing.clock_skew_sec", "300"),
    ("billing.batch_max_events", "1000"),
    ("billing.batch_max_bytes", "524288"),
    ("billing.currency", "USD"),
    ("billing.close_grace_days", "3"),
    ("deployer.job_timeout_ms", "1200000"),
    ("deployer.verify_timeout_ms", "60000"),
    ("cli.principal", "platform"),
    ("cli.console_listen", "127.0.0.1:7000"),
];
