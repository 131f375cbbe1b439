//! The usage publisher: every usage event a service meters goes through here, to
//! `slipway.usage.<service>.<meter>.<user>` with its id as `Nats-Msg-Id`. The caller fixes the
//! event's id and `time`, so a republish (a retry, a restart re-sending a pending interval) is
//! the same event bit for bit: billing dedupes on the id, and the hour it lands in never moves.

use async_nats::jetstream;
use slipway_proto::meters;
use slipway_proto::v1::UsageEvent;

use crate::run_events::{PublishError, Published};
use crate::subjects::{self, Service};

/// Publishes one service's usage events.
#[derive(Clone)]
pub struct UsagePublisher {
    jetstream: jetstream::Context,
    service: Service,
}

impl UsagePublisher {
    pub fn new(jetstream: jetstream::Context, service: Service) -> Self {
        Self { jetstream, service }
    }

    /// Checks `event` (an id, a time, a known meter in its unit, an end user) and publishes it,
    /// waiting for the stream's ack.
    pub async fn publish(&self, event: &UsageEvent) -> Result<Published, PublishError> {
        check(event)?;
        let subject = subjects::usage(self.service, &event.meter, &event.subject)
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        crate::run_events::publish_once(&self.jetstream, subject, event, &event.id).await
    }
}

fn check(event: &UsageEvent) -> Result<(), PublishError> {
    let invalid = |m: String| Err(PublishError::Invalid(m));
    if event.id.is_empty() {
        return invalid("a usage event needs its id (the dedupe key)".into());
    }
    if event.time.is_none() {
        return invalid(format!(
            "usage event `{}` has no time: a republish must carry the first one's",
            event.id
        ));
    }
    if event.subject.is_empty() {
        return invalid(format!("usage event `{}` has no end user", event.id));
    }
    match meters::CATALOGUE.iter().find(|m| m.name == event.meter) {
        None => invalid(format!(
            "usage event `{}`: unknown meter `{}`",
            event.id, event.meter
        )),
        Some(m) if m.unit != event.unit => invalid(format!(
            "usage event `{}`: meter `{}` is counted in `{}`, not `{}`",
            event.id, event.meter, m.unit, event.unit
        )),
        Some(_) => Ok(()),
    }
}
