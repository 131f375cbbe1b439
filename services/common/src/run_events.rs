//! The run-event publisher: every `RunEvent` a service publishes goes through here, so each has
//! a deterministic id, its attribution and time, the caller's trace, and the `Nats-Msg-Id` that
//! makes a republish a no-op; and so no service publishes a kind another one owns.
//!
//! `event_id` is `<run>:<step>:<kind>`. The step names the fact within the run: the same fact
//! published again (a retry, a crash and restart) has the same step, and two facts of one kind
//! have different steps, or the stream's duplicate window would drop the second. Kinds that
//! repeat in a run take their discriminator in the step ([`Step`]'s constructors).

use async_nats::jetstream;
use slipway_proto::codec::{self, ContentType};
use slipway_proto::events::EventKind;
use slipway_proto::v1::{Attribution, Publisher, RunEvent, run_event::Payload};

use crate::rpc::message_headers;
use crate::subjects::{self, Service};

/// The step part of an event id: which fact of the run this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step(String);

impl Step {
    /// A step that happens once per run (or per branch: pass `<branch>`), such as `intake`.
    pub fn once(name: &str) -> Self {
        Self(name.to_string())
    }

    /// The `n`th of a repeating fact: the `n`th `queued` update, `files_changed` burst,
    /// `self_checked` round.
    pub fn nth(name: &str, n: u64) -> Self {
        Self(format!("{name}-{n}"))
    }

    /// A deploy job's phase (`deploy_progress`): one event per phase of one job.
    pub fn deploy_phase(job_id: &str, phase: &str) -> Self {
        Self(format!("{job_id}-{phase}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("`{kind}` events are published by the {owner:?} service, not {by}")]
    ForeignKind {
        kind: EventKind,
        owner: Publisher,
        by: Service,
    },
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("publishing to `{subject}`: {message}")]
    Publish { subject: String, message: String },
}

/// What the stream said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// The stream already had this id within its duplicate window: nothing was stored.
    pub duplicate: bool,
}

/// Publishes one service's run events.
#[derive(Clone)]
pub struct RunEventPublisher {
    jetstream: jetstream::Context,
    service: Service,
}

fn publisher_of(service: Service) -> Publisher {
    match service {
        Service::Planner => Publisher::Planner,
        Service::Executor => Publisher::Executor,
        Service::Preview => Publisher::Preview,
        Service::Billing => Publisher::Billing,
        Service::Deployer => Publisher::Deployer,
    }
}

impl RunEventPublisher {
    pub fn new(jetstream: jetstream::Context, service: Service) -> Self {
        Self { jetstream, service }
    }

    /// Builds the event of `payload` for `run_id` at `step` and publishes it, waiting for the
    /// stream's ack. Refuses a kind this service does not own.
    pub async fn publish(
        &self,
        run_id: &str,
        step: &Step,
        branch: &str,
        attribution: Option<Attribution>,
        payload: Payload,
    ) -> Result<(RunEvent, Published), PublishError> {
        let kind = payload.kind();
        if kind.publisher() != publisher_of(self.service) {
            return Err(PublishError::ForeignKind {
                kind,
                owner: kind.publisher(),
                by: self.service,
            });
        }
        if step.as_str().is_empty() || step.as_str().contains(':') {
            return Err(PublishError::Invalid(format!(
                "step {:?}: non-empty, without `:`",
                step.as_str()
            )));
        }
        let subject =
            subjects::run_event(run_id, kind).map_err(|e| PublishError::Invalid(e.to_string()))?;
        let event = RunEvent {
            event_id: format!("{run_id}:{}:{kind}", step.as_str()),
            run_id: run_id.to_string(),
            time: Some(now()),
            attribution,
            branch: if branch.is_empty() {
                "main".to_string()
            } else {
                branch.to_string()
            },
            payload: Some(payload),
        };
        let mut headers = message_headers::<RunEvent>(ContentType::Protobuf);
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        let failed = |e: &dyn std::fmt::Display| PublishError::Publish {
            subject: subject.clone(),
            message: e.to_string(),
        };
        let ack = self
            .jetstream
            .publish_with_headers(
                subject.clone(),
                headers,
                codec::encode(&event, ContentType::Protobuf).into(),
            )
            .await
            .map_err(|e| failed(&e))?
            .await
            .map_err(|e| failed(&e))?;
        Ok((
            event,
            Published {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            },
        ))
    }
}

fn now() -> pbjson_types::Timestamp {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
    }
}
