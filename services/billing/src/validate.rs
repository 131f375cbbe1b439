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
const MAX_ATTRIBUTE: usize = 128;

/// Checks one event read from `subject`: the stored form (`slipway.usage.<p>.<service>.<meter>.
/// <user>`), the published one without the partition token, or the form with the token last
/// that earlier versions stored.
pub fn check(subject: &str, e: &UsageEvent, window: Window) -> Result<Valid, Refusal> {
    let Some((service, meter_token, user_token)) = subjects::usage_parts(subject) else {
        return Err(refuse(
            "invalid_subject",
            format!("`{subject}` is not slipway.usage.<service>.<meter>.<user>"),
        ));
    };
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
    // The source is the producer's stable name: the same fact under another source would
    // otherwise be counted again.
    let source = format!("slipway/{}", meter.producer);
    if e.source != source {
        return Err(refuse(
            "invalid_source",
            format!("`{}` is published by `{source}`", meter.name),
        ));
    }
    for (field, value) in [
        ("project_id", &e.project_id),
        ("workspace_id", &e.workspace_id),
        ("run_id", &e.run_id),
        ("sandbox_id", &e.sandbox_id),
    ] {
        // Kept in aggregate rows (`<day>|<meter>|<project>`): bounded, printable, no `|`.
        if value.len() > MAX_ATTRIBUTE || value.chars().any(|c| c.is_control() || c == '|') {
            return Err(refuse(
                "invalid_attribution",
                format!("{field}: at most {MAX_ATTRIBUTE} printable bytes, without `|`"),
            ));
        }
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
    let time_ms = ms(&time);
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

/// Milliseconds since the epoch of a timestamp (saturating).
pub fn ms(t: &pbjson_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const NOW: i64 = 1_790_000_000_000;
    const WINDOW: Window = Window {
        now_ms: NOW,
        skew_ms: 300_000,
        lateness_ms: 35 * 86_400_000,
    };

    fn event() -> UsageEvent {
        UsageEvent {
            id: "run1:step:0:llm_input_tokens".into(),
            source: "slipway/planner".into(),
            r#type: USAGE_EVENT_TYPE.into(),
            subject: "ann@example.com".into(),
            time: Some(pbjson_types::Timestamp {
                seconds: NOW / 1000 - 60,
                nanos: 0,
            }),
            spec_version: CLOUDEVENTS_SPEC_VERSION.into(),
            meter: "llm_input_tokens".into(),
            quantity: "1200".into(),
            unit: "tokens".into(),
            project_id: "p1".into(),
            ..Default::default()
        }
    }

    fn subject() -> String {
        format!(
            "slipway.usage.planner.llm_input_tokens.{}",
            subjects::user_token("ann@example.com").unwrap()
        )
    }

    fn code(subject: &str, e: &UsageEvent) -> &'static str {
        check(subject, e, WINDOW)
            .map(|_| "ok")
            .unwrap_or_else(|r| r.code)
    }

    #[test]
    fn a_good_event_passes_in_every_subject_form() {
        let v = check(&subject(), &event(), WINDOW).unwrap();
        assert_eq!(
            v.user_token,
            subjects::user_token("ann@example.com").unwrap()
        );
        assert_eq!(v.quantity.to_string(), "1200");
        assert_eq!(v.time_ms, NOW - 60_000);
        assert_eq!(code(&format!("{}.3", subject()), &event()), "ok");
        let leading = subject().replacen("slipway.usage.", "slipway.usage.3.", 1);
        assert_eq!(code(&leading, &event()), "ok");
    }

    #[test]
    fn each_wrong_field_is_refused_with_its_code() {
        let s = subject();
        let with = |f: fn(&mut UsageEvent)| {
            let mut e = event();
            f(&mut e);
            e
        };
        let cases: Vec<(String, UsageEvent, &str)> = vec![
            ("slipway.usage.planner".into(), event(), "invalid_subject"),
            (format!("{s}.3.4"), event(), "invalid_subject"),
            (format!("{s}.x"), event(), "invalid_subject"),
            (
                s.replacen("slipway.usage.", "slipway.usage.3.", 1) + ".4",
                event(),
                "invalid_subject",
            ),
            (s.replace("slipway.", "other."), event(), "invalid_subject"),
            (
                s.clone(),
                with(|e| e.meter = "bogus".into()),
                "unknown_meter",
            ),
            (
                s.replace("llm_input_tokens", "llm_output_tokens"),
                event(),
                "invalid_subject",
            ),
            (
                s.replace(".planner.", ".executor."),
                event(),
                "wrong_producer",
            ),
            (s.clone(), with(|e| e.unit = "ms".into()), "wrong_unit"),
            (
                s.clone(),
                with(|e| e.r#type = "other".into()),
                "invalid_type",
            ),
            (
                s.clone(),
                with(|e| e.spec_version = "0.3".into()),
                "invalid_type",
            ),
            (
                s.clone(),
                with(|e| e.id = "run1:step:0".into()),
                "invalid_id",
            ),
            (s.clone(), with(|e| e.id = String::new()), "invalid_id"),
            (
                s.clone(),
                with(|e| e.id = format!("{}:llm_input_tokens", "x".repeat(300))),
                "invalid_id",
            ),
            (
                s.clone(),
                with(|e| e.id = "a\u{7}:llm_input_tokens".into()),
                "invalid_id",
            ),
            (
                s.clone(),
                with(|e| e.source = "slipway/executor".into()),
                "invalid_source",
            ),
            (
                s.clone(),
                with(|e| e.project_id = "a|b".into()),
                "invalid_attribution",
            ),
            (
                s.clone(),
                with(|e| e.run_id = "r".repeat(129)),
                "invalid_attribution",
            ),
            (
                s.clone(),
                with(|e| e.subject = "bob".into()),
                "invalid_subject",
            ),
            (
                s.clone(),
                with(|e| e.quantity = "-1".into()),
                "invalid_quantity",
            ),
            (
                s.clone(),
                with(|e| e.quantity = "1.0000000001".into()),
                "invalid_quantity",
            ),
            (s.clone(), with(|e| e.time = None), "missing_time"),
        ];
        for (subject, e, want) in cases {
            assert_eq!(code(&subject, &e), want, "{subject} {e:?}");
        }
    }

    #[test]
    fn the_time_is_held_to_the_skew_and_the_lateness_at_their_edges() {
        let at = |ms: i64| {
            let mut e = event();
            e.time = Some(pbjson_types::Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            });
            code(&subject(), &e)
        };
        assert_eq!(at(NOW + WINDOW.skew_ms), "ok");
        assert_eq!(at(NOW + WINDOW.skew_ms + 1), "future_time");
        assert_eq!(at(NOW - WINDOW.lateness_ms), "ok");
        assert_eq!(at(NOW - WINDOW.lateness_ms - 1), "too_late");
    }
}
