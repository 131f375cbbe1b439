//! Configuration: compiled-in defaults, then an optional TOML file, then the ecosystem's own
//! environment names (`MIOSA_BASE_URL`, `MIOSA_API_KEY`, `NATS_URL`,
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), then `SLIPWAY__SECTION__KEY` variables, each overriding the
//! one before. Secrets are read from files (`*_file`) and never printed.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod services;
pub use services::{
    BillingSettings, CliPrincipal, CliSettings, DeployerSettings, PlannerSettings, PreviewSettings,
};

/// The environment prefix: `SLIPWAY__NATS__URL` sets `nats.url`.
pub const ENV_PREFIX: &str = "SLIPWAY";
/// Ecosystem names accepted as aliases, and the key each sets.
pub const ALIASES: &[(&str, &str)] = &[
    ("MIOSA_BASE_URL", "platform.base_url"),
    ("NATS_URL", "nats.url"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
];

/// One configuration for every Slipway component. The kit's sections (`nats`, `health`,
/// `telemetry`, `setup`, `service`) every component reads; each service reads its own (the
/// executor `platform` and `edge`; `planner`, `preview`, `billing`, `deployer`, `cli`). All are
/// checked at load, whoever loads them: a mistyped key in any section is refused by name.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub nats: NatsSettings,
    pub health: HealthSettings,
    pub telemetry: TelemetrySettings,
    pub setup: SetupSettings,
    pub service: ServiceSettings,
    pub platform: PlatformSettings,
    pub edge: EdgeSettings,
    pub planner: PlannerSettings,
    pub preview: PreviewSettings,
    pub billing: BillingSettings,
    pub deployer: DeployerSettings,
    pub cli: CliSettings,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    /// Comma-separated server URLs.
    pub url: String,
    /// The nkey seed of this component's NATS user (one user per service).
    pub nkey_seed_file: Option<PathBuf>,
    /// User and password, the alternative to an nkey.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Read from `nkey_seed_file`; not settable directly, never printed.
    #[serde(default, skip_deserializing, skip_serializing)]
    pub nkey_seed: Option<Secret>,
    /// Read from `password_file`; not settable directly, never printed.
    #[serde(default, skip_deserializing, skip_serializing)]
    pub password: Option<Secret>,
    /// The inbox prefix, so least-privilege permissions can allow `<prefix>.>` only. With
    /// credentials and no prefix set, a component uses its principal's (`_INBOX_<principal>`).
    pub inbox_prefix: Option<String>,
    pub connect_timeout_ms: u64,
    /// Default timeout of a request to another service.
    pub request_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Where `/livez`, `/readyz` and `/metrics` are served; port 0 picks a free one.
    pub listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// A `tracing` filter, for example `info,slipway_executor=debug`.
    pub log_filter: String,
    /// OTLP over HTTP, for example `http://otel-collector:4318`. Traces are exported only when set.
    pub otlp_endpoint: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformSettings {
    /// MIOSA's API (`https://api.miosa.ai/api/v1`) or a sandboxd (`http://127.0.0.1:7070/api/v1`).
    pub base_url: String,
    pub api_key_file: Option<PathBuf>,
    /// From `api_key_file` or `MIOSA_API_KEY`; not settable in a file, never logged or printed.
    #[serde(default, skip_deserializing, skip_serializing)]
    pub api_key: Option<Secret>,
    /// Requests per minute allowed by the key.
    pub rate_limit_rpm: u32,
    /// How often the executor reads sandboxes' cumulative usage counters and bills the growth.
    pub usage_sample_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSettings {
    /// The base domain previews and deployments are served under.
    pub domain: String,
    /// Where every host under `domain` resolves for Slipway's own HTTP clients (this machine's
    /// resolver does not map `*.localhost` to loopback). Empty: the system resolver.
    pub resolve: Option<SocketAddr>,
}

impl EdgeSettings {
    /// The address to connect to for `host`, when `resolve` covers it.
    pub fn resolve_host(&self, host: &str) -> Option<SocketAddr> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let domain = self.domain.trim_end_matches('.').to_ascii_lowercase();
        let covered = host == domain || host.ends_with(&format!(".{domain}"));
        self.resolve.filter(|_| covered)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    File,
    Memory,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupSettings {
    /// JetStream replicas of every stream and bucket (3 in a production cluster).
    pub replicas: usize,
    pub storage: StorageKind,
    /// How often a service re-verifies the streams and buckets it depends on.
    pub verify_interval_ms: u64,
    /// Deliveries of one message before it goes to the dead-letter stream.
    pub max_deliver: i64,
    /// JetStream's `Nats-Msg-Id` dedupe window of the streams, and of `USAGE` (longer: a
    /// publisher may republish a pending interval after a long outage).
    pub duplicate_window_sec: u64,
    pub usage_duplicate_window_sec: u64,
    /// Largest message of the streams, and of `USAGE` (events are small; a big one is a bug).
    pub max_message_bytes: i32,
    pub usage_max_message_bytes: i32,
    /// How long `USAGE` and `BILLED` keep events (billing rebuilds from the raw stream, and
    /// must outlive the accepted lateness), and how long run events are kept.
    pub usage_max_age_days: u64,
    pub events_max_age_days: u64,
    /// How long a deploy job may go without an acknowledgement (the deployer sends in-progress
    /// acks at a third of it) before it is delivered to another replica.
    pub deploy_ack_wait_sec: u64,
    /// Partitions of `USAGE` (by end-user) and of `RUN_COMMANDS` (by run): one pinned consumer
    /// each, so one replica folds a user's usage or drives a run at a time. A change is applied
    /// by `slipway setup --update` in the safe order (docs/architecture.md).
    pub usage_partitions: u32,
    pub run_command_partitions: u32,
    /// How long a partition stays pinned to a replica that stopped pulling before another takes
    /// it over (the server's `priority_timeout`); pulls expire at a third of it.
    pub priority_timeout_ms: u64,
    /// `ack_wait` of the partition consumers: how long a message handed to a replica that died
    /// waits before it is delivered again.
    pub partition_ack_wait_sec: u64,
    /// Messages of one partition delivered and not yet acknowledged at once: what a replica
    /// holds (and what waits for `ack_wait` when it dies).
    pub partition_max_ack_pending: i64,
    /// The same for `USAGE`'s partitions: billing folds a whole batch per checkpoint, and the
    /// server sends the next batch while one folds.
    pub usage_max_ack_pending: i64,
    /// How long the `slipway_blobs` object store keeps a value (plans, model outputs).
    pub blobs_max_age_days: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// Requests handled at once per service instance.
    pub max_in_flight: usize,
    /// How long in-flight work may take to finish after SIGTERM.
    pub grace_period_ms: u64,
}

/// A secret value: masked in `Debug`, `Display` and serialisation.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that needs it (an HTTP header, a NATS connect).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Where settings come from. The environment is passed in, not read from the process, so tests
/// can load settings side by side.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: HashMap<String, String>,
    /// Defaults of the component loading them, over the compiled-in ones (for example its own
    /// health port).
    pub defaults: Vec<(String, String)>,
}

impl Sources {
    /// The file named by `file` and the process environment.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            defaults: Vec::new(),
        }
    }

    pub fn with_default(mut self, key: &str, value: &str) -> Self {
        self.defaults.push((key.to_string(), value.to_string()));
        self
    }
}

impl Settings {
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS.iter().chain(services::DEFAULTS) {
            builder = builder.set_default(*key, *value)?;
        }
        for (key, value) in &sources.defaults {
            builder = builder.set_default(key.as_str(), value.as_str())?;
        }
        if let Some(file) = &sources.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        let mut env: HashMap<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // An alias counts as the `SLIPWAY__` variable it stands for, unless that one is set too.
        for (alias, key) in ALIASES {
            if let Some(v) = sources.env.get(*alias).filter(|v| !v.is_empty()) {
                let name = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase());
                env.entry(name).or_insert_with(|| v.clone());
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.read_secret_files(&sources.env)?;
        settings.validate()?;
        Ok(settings)
    }

    fn read_secret_files(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        if let Some(path) = &self.platform.api_key_file {
            self.platform.api_key = Some(read_secret("platform.api_key_file", path)?);
        } else if let Some(key) = env.get("MIOSA_API_KEY").filter(|k| !k.trim().is_empty()) {
            // The ecosystem's variable, as MIOSA's SDKs read it.
            self.platform.api_key = Some(Secret::new(key.trim()));
        }
        if let Some(path) = &self.nats.nkey_seed_file {
            self.nats.nkey_seed = Some(read_secret("nats.nkey_seed_file", path)?);
        }
        if let Some(path) = &self.nats.password_file {
            self.nats.password = Some(read_secret("nats.password_file", path)?);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.to_string(),
        };
        if self.nats.url.trim().is_empty() {
            return Err(invalid("nats.url", "must not be empty"));
        }
        for url in self.nats.url.split(',') {
            let url = url.trim();
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| url.starts_with(s));
            if !scheme_ok && url.contains("://") {
                return Err(invalid("nats.url", &format!("`{url}` is not a NATS URL")));
            }
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return Err(invalid(
                "nats.user",
                "set both `nats.user` and `nats.password_file`, or neither",
            ));
        }
        if self
            .nats
            .nkey_seed
            .as_ref()
            .is_some_and(|s| !s.expose().starts_with('S'))
        {
            return Err(invalid("nats.nkey_seed_file", "does not hold an nkey seed"));
        }
        if let Some(prefix) = &self.nats.inbox_prefix
            && (prefix.is_empty() || prefix.contains(['*', '>', ' ']))
        {
            return Err(invalid(
                "nats.inbox_prefix",
                "must be a plain subject prefix",
            ));
        }
        let base = &self.platform.base_url;
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(invalid(
                "platform.base_url",
                "must be an http:// or https:// URL",
            ));
        }
        if self
            .platform
            .api_key
            .as_ref()
            .is_some_and(|k| !k.expose().starts_with("msk_"))
        {
            return Err(invalid(
                "platform.api_key",
                "a MIOSA API key starts with `msk_`",
            ));
        }
        if self.platform.usage_sample_ms < 100 {
            return Err(invalid("platform.usage_sample_ms", "must be at least 100"));
        }
        if self.platform.rate_limit_rpm == 0 {
            return Err(invalid("platform.rate_limit_rpm", "must be at least 1"));
        }
        if self.edge.domain.is_empty() || self.edge.domain.contains(['/', ':', ' ']) {
            return Err(invalid(
                "edge.domain",
                "must be a bare domain such as `localhost`",
            ));
        }
        if self.setup.replicas == 0 || self.setup.replicas > 5 {
            return Err(invalid("setup.replicas", "must be between 1 and 5"));
        }
        if self.setup.max_deliver < 1 {
            return Err(invalid("setup.max_deliver", "must be at least 1"));
        }
        if self.service.max_in_flight == 0 {
            return Err(invalid("service.max_in_flight", "must be at least 1"));
        }
        let s = &self.setup;
        for (key, value) in [
            ("setup.duplicate_window_sec", s.duplicate_window_sec),
            (
                "setup.usage_duplicate_window_sec",
                s.usage_duplicate_window_sec,
            ),
        ] {
            if !(1..=7 * 86_400).contains(&value) {
                return Err(invalid(key, "1 second to 7 days"));
            }
        }
        for (key, value) in [
            ("setup.max_message_bytes", s.max_message_bytes),
            ("setup.usage_max_message_bytes", s.usage_max_message_bytes),
        ] {
            if !(1024..=8 * 1024 * 1024).contains(&value) {
                return Err(invalid(key, "1 KiB to 8 MiB"));
            }
        }
        for (key, value) in [
            ("setup.usage_max_age_days", s.usage_max_age_days),
            ("setup.events_max_age_days", s.events_max_age_days),
        ] {
            if !(1..=3650).contains(&value) {
                return Err(invalid(key, "1 to 3650 days"));
            }
        }
        if !(1..=3600).contains(&s.deploy_ack_wait_sec) {
            return Err(invalid("setup.deploy_ack_wait_sec", "1 to 3600 seconds"));
        }
        for (key, value) in [
            ("setup.usage_partitions", s.usage_partitions),
            ("setup.run_command_partitions", s.run_command_partitions),
        ] {
            if !(1..=MAX_PARTITIONS).contains(&value) {
                return Err(invalid(key, "1 to 256 partitions"));
            }
        }
        if !(1000..=600_000).contains(&s.priority_timeout_ms) {
            return Err(invalid(
                "setup.priority_timeout_ms",
                "1 second to 10 minutes",
            ));
        }
        if !(1..=3600).contains(&s.partition_ack_wait_sec) {
            return Err(invalid("setup.partition_ack_wait_sec", "1 to 3600 seconds"));
        }
        if !(1..=10_000).contains(&s.partition_max_ack_pending) {
            return Err(invalid("setup.partition_max_ack_pending", "1 to 10000"));
        }
        if !(1..=10_000).contains(&s.usage_max_ack_pending) {
            return Err(invalid("setup.usage_max_ack_pending", "1 to 10000"));
        }
        if !(1..=3650).contains(&s.blobs_max_age_days) {
            return Err(invalid("setup.blobs_max_age_days", "1 to 3650 days"));
        }
        // JetStream refuses a duplicate window longer than the stream keeps messages.
        if s.duplicate_window_sec > s.events_max_age_days * 86_400 {
            return Err(invalid(
                "setup.duplicate_window_sec",
                "longer than run events are kept (`setup.events_max_age_days`)",
            ));
        }
        if s.usage_duplicate_window_sec > s.usage_max_age_days * 86_400 {
            return Err(invalid(
                "setup.usage_duplicate_window_sec",
                "longer than usage is kept (`setup.usage_max_age_days`)",
            ));
        }
        services::validate(self)
    }

    /// The NATS settings of a component acting as `principal`: with credentials and no inbox
    /// prefix set, the principal's own (`_INBOX_<principal>`), which its permissions allow.
    pub fn nats_as(&self, principal: crate::auth::Principal) -> NatsSettings {
        let mut nats = self.nats.clone();
        let credentials = nats.nkey_seed.is_some() || nats.user.is_some();
        if credentials && nats.inbox_prefix.is_none() {
            nats.inbox_prefix = Some(principal.inbox_prefix());
        }
        nats
    }

    /// The settings as TOML with every secret masked (`--print-config`).
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn read_secret(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let value = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let value = value.trim();
    if value.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            message: format!("{} is empty", path.display()),
        });
    }
    Ok(Secret::new(value))
}

/// Most partitions of one stream: each is a consumer the server keeps, and every replica holds
/// a pull open on each.
pub const MAX_PARTITIONS: u32 = 256;

/// The compiled-in defaults: everything on one machine, on loopback.
const DEFAULTS: &[(&str, &str)] = &[
    ("nats.url", "nats://127.0.0.1:4222"),
    ("nats.connect_timeout_ms", "5000"),
    ("nats.request_timeout_ms", "10000"),
    ("health.listen", "127.0.0.1:0"),
    ("telemetry.log_format", "text"),
    ("telemetry.log_filter", "info"),
    ("platform.base_url", "http://127.0.0.1:7070/api/v1"),
    ("platform.rate_limit_rpm", "600"),
    ("platform.usage_sample_ms", "30000"),
    ("edge.domain", "localhost"),
    ("setup.replicas", "1"),
    ("setup.storage", "file"),
    ("setup.verify_interval_ms", "30000"),
    ("setup.max_deliver", "5"),
    ("setup.duplicate_window_sec", "3600"),
    ("setup.usage_duplicate_window_sec", "7200"),
    ("setup.max_message_bytes", "1048576"),
    ("setup.usage_max_message_bytes", "65536"),
    ("setup.usage_max_age_days", "400"),
    ("setup.events_max_age_days", "30"),
    ("setup.deploy_ack_wait_sec", "300"),
    ("setup.usage_partitions", "8"),
    ("setup.run_command_partitions", "8"),
    ("setup.priority_timeout_ms", "6000"),
    ("setup.partition_ack_wait_sec", "10"),
    ("setup.partition_max_ack_pending", "256"),
    ("setup.usage_max_ack_pending", "2000"),
    ("setup.blobs_max_age_days", "30"),
    ("service.max_in_flight", "64"),
    ("service.grace_period_ms", "25000"),
];
