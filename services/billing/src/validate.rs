//! What makes a usage event billable: its subject, the meter catalogue (meter, unit, producer),
//! the CloudEvents attributes, the id's shape, an exact quantity, and a `time` neither in the
//! future beyond the clock skew nor older than the accepted lateness. A refusal has a stable
//! code and a reason, and goes to `slipway.rejected.usage.<service>`.

use slipway_common::subjects;
use slipway_proto::meters::{self, CLOUDEVENTS_SPEC_VERSION, USAGE_EVENT_TYPE};
use slipway_proto::v1::UsageEvent;

use crate::decimal::Decimal;

/// Why an event was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

fn refuse(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

/// A billable event: what the fold needs besides the event itself.
#[derive(Clone, Debug)]
pub struct Valid {
    /// The end-user's subject token (the partition key).
    pub user_token: String,
    pub quantity: Decimal,
    /// Milliseconds since the epoch.
    pub time_ms: i64,
}

/// The limits an event's `time` is held to.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub now_ms: i64,
    pub skew_ms: i64,
    pub lateness_ms: i64,
}

const MAX_ID: usize = 256;
const MAX_SOURCE: usize = 128;

/// Checks one event read from `subject` (the stored form, with or without the partition token).
pub fn check(subject: &str, e: &UsageEvent, window: Window) -> Result<Valid, Refusal> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let root_ok = tokens.len() >= 2 && tokens[0] == subjects::ROOT && tokens[1] == "usage";
    if !root_ok || !(tokens.len() == 5 || tokens.len() == 6) {
        return Err(refuse(
            "invalid_subject",
            format!("`{subject}` is not slipway.usage.<service>.<meter>.<user>"),
        ));
    }
    let (service, meter_token, user_token) = (tokens[2], tokens[3], tokens[4]);
    let Some(meter) = meters::find(&e.meter) else {
        return Err(refuse(
            "unknown_meter",
            format!("meter `{}` is not in the catalogue", clip(&e.meter)),
        ));
    };
    if meter_token != meter.name {
        return Err(refuse(
            "invalid_subject",
            format!(
                "the subject names meter `{meter_token}`, the event `{}`",
                meter.name
            ),
        ));
    }
    if service != meter.producer {
        return Err(refuse(
            "wrong_producer",
            format!(
                "`{}` is published by {}, not {service}",
                meter.name, meter.producer
            ),
        ));
    }
    if e.unit != meter.unit {
        return Err(refuse(
            "wrong_unit",
            format!(
                "`{}` is in `{}`, not `{}`",
                meter.name,
                meter.unit,
                clip(&e.unit)
            ),
        ));
    }
    if e.r#type != USAGE_EVENT_TYPE || e.spec_version != CLOUDEVENTS_SPEC_VERSION {
        return Err(refuse(
            "invalid_type",
            format!(
                "type `{USAGE_EVENT_TYPE}` and specversion `{CLOUDEVENTS_SPEC_VERSION}` expected"
            ),
        ));
    }
    let id_ok = !e.id.is_empty()
        && e.id.len() <= MAX_ID
        && !e.id.chars().any(char::is_control)
        && e.id.split(':').any(|seg| seg == meter.name);
    if !id_ok {
        return Err(refuse(
            "invalid_id",
            format!(
                "id `{}`: 1 to {MAX_ID} bytes naming its meter as one `:`-separated segment",
                clip(&e.id)
            ),
        ));
    }
    if e.source.is_empty() || e.source.len() > MAX_SOURCE || e.source.chars().any(char::is_control)
    {
        return Err(refuse("invalid_source", "source: 1 to 128 printable bytes"));
    }
    match subjects::user_token(&e.subject) {
        Ok(t) if t == user_token => {}
        _ => {
            return Err(refuse(
                "invalid_subject",
                "the event's subject (end-user) is not the one its NATS subject names",
            ));
        }
    }
    let quantity =
        Decimal::parse(&e.quantity).map_err(|err| refuse("invalid_quantity", err.to_string()))?;
    let Some(time) = e.time else {
        return Err(refuse("missing_time", "time is required"));
    };
    let time_ms = time
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(time.nanos) / 1_000_000);
    if time_ms > window.now_ms.saturating_add(window.skew_ms) {
        return Err(refuse(
            "future_time",
            "time is in the future beyond the accepted clock skew",
        ));
    }
    if time_ms < window.now_ms.saturating_sub(window.lateness_ms) {
        return Err(refuse(
            "too_late",
            "time is older than the accepted lateness",
        ));
    }
    Ok(Valid {
        user_token: user_token.to_string(),
        quantity,
        time_ms,
    })
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
