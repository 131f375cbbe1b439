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
use crate::service::now;
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
    /// stream's ack. Refuses a kind this service does not own. A caller that may publish the
    /// same fact again (a retry after a crash) keeps the event from [`event`](Self::event) and
    /// republishes it with [`publish_event`](Self::publish_event), so its `time` is the same.
    pub async fn publish(
        &self,
        run_id: &str,
        step: &Step,
        branch: &str,
        attribution: Option<Attribution>,
        payload: Payload,
    ) -> Result<(RunEvent, Published), PublishError> {
        let event = self.event(run_id, step, branch, attribution, payload)?;
        let published = self.publish_event(&event).await?;
        Ok((event, published))
    }

    /// The event of `payload` for `run_id` at `step`, stamped now: its id
    /// `<run>:<step>:<kind>`, the branch (`main` when empty), the attribution. Checks that this
    /// service owns the kind and that a repeating kind's step carries its discriminator.
    pub fn event(
        &self,
        run_id: &str,
        step: &Step,
        branch: &str,
        attribution: Option<Attribution>,
        payload: Payload,
    ) -> Result<RunEvent, PublishError> {
        let kind = payload.kind();
        self.owns(kind)?;
        check_step(step, &payload)?;
        subjects::run_event(run_id, kind).map_err(|e| PublishError::Invalid(e.to_string()))?;
        Ok(RunEvent {
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
        })
    }

    fn owns(&self, kind: EventKind) -> Result<(), PublishError> {
        if kind.publisher() == publisher_of(self.service) {
            Ok(())
        } else {
            Err(PublishError::ForeignKind {
                kind,
                owner: kind.publisher(),
                by: self.service,
            })
        }
    }

    /// Publishes a built event as it is (`Nats-Msg-Id` = its id, `traceparent` the current
    /// span's), waiting for the stream's ack.
    pub async fn publish_event(&self, event: &RunEvent) -> Result<Published, PublishError> {
        let kind = event
            .kind()
            .ok_or_else(|| PublishError::Invalid("an event without a payload".into()))?;
        self.owns(kind)?;
        let suffix = format!(":{kind}");
        let prefix = format!("{}:", event.run_id);
        if !event.event_id.starts_with(&prefix) || !event.event_id.ends_with(&suffix) {
            return Err(PublishError::Invalid(format!(
                "event id {:?} is not `<run>:<step>:{kind}` of run {:?}",
                event.event_id, event.run_id
            )));
        }
        let subject = subjects::run_event(&event.run_id, kind)
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        publish_once(&self.jetstream, subject, event, &event.event_id).await
    }
}

/// Publishes a contract message to a stream with `Nats-Msg-Id` = `id` (so a republish is stored
/// once) and the current trace, waiting for the stream's ack.
pub async fn publish_once<M: slipway_proto::WireMessage>(
    jetstream: &jetstream::Context,
    subject: String,
    message: &M,
    id: &str,
) -> Result<Published, PublishError> {
    let mut headers = message_headers::<M>(ContentType::Protobuf);
    headers.insert("Nats-Msg-Id", id);
    let failed = |e: &dyn std::fmt::Display| PublishError::Publish {
        subject: subject.clone(),
        message: e.to_string(),
    };
    let ack = jetstream
        .publish_with_headers(
            subject.clone(),
            headers,
            codec::encode(message, ContentType::Protobuf).into(),
        )
        .await
        .map_err(|e| failed(&e))?
        .await
        .map_err(|e| failed(&e))?;
    Ok(Published {
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// A step is non-empty and has no `:`; a kind that repeats in a run carries its discriminator
/// in it, or the stream's duplicate window would drop the second fact as a copy of the first:
/// `deploy_progress` its job and phase, `self_checked` its round, `queued` and `files_changed`
/// a number (`Step::nth`).
fn check_step(step: &Step, payload: &Payload) -> Result<(), PublishError> {
    let s = step.as_str();
    if s.is_empty() || s.contains(':') {
        return Err(PublishError::Invalid(format!(
            "step {s:?}: non-empty, without `:`"
        )));
    }
    let numbered = |s: &str| {
        s.rsplit_once('-')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let ok = match payload {
        Payload::DeployProgress(p) => {
            !p.job_id.is_empty()
                && !p.phase.is_empty()
                && step == &Step::deploy_phase(&p.job_id, &p.phase)
        }
        Payload::SelfChecked(c) => s.ends_with(&format!("-{}", c.round)),
        Payload::Queued(_) | Payload::FilesChanged(_) => numbered(s),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(PublishError::Invalid(format!(
            "step {s:?} does not tell this `{}` from the run's others (see `Step`)",
            payload.kind()
        )))
    }
}
