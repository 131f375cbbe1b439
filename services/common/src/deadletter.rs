//! Dead letters and refusals, with their reasons: a message a worker can never handle goes to
//! `slipway.dlq.<STREAM>` (a refused usage event to `slipway.rejected.usage.<service>`) as it
//! came, with headers saying why and where it was. `list` and `replay` serve `slipway dlq`.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use crate::subjects::{self, streams};

/// A stable code for the reason (`malformed`, `max_deliver`, a handler's own code).
pub const REASON_CODE: &str = "Slipway-Reason-Code";
/// The reason, for a person.
pub const REASON: &str = "Slipway-Reason";
/// The subject the message was published on.
pub const ORIGINAL_SUBJECT: &str = "Slipway-Original-Subject";
/// The stream it was read from.
pub const ORIGINAL_STREAM: &str = "Slipway-Original-Stream";
/// Its sequence in that stream.
pub const STREAM_SEQUENCE: &str = "Slipway-Stream-Sequence";
/// How many times it had been delivered.
pub const DELIVERY_COUNT: &str = "Slipway-Delivery-Count";
/// The durable consumer that gave up on it.
pub const CONSUMER: &str = "Slipway-Consumer";

/// Every header a dead letter adds, removed again on replay.
pub const HEADERS: [&str; 7] = [
    REASON_CODE,
    REASON,
    ORIGINAL_SUBJECT,
    ORIGINAL_STREAM,
    STREAM_SEQUENCE,
    DELIVERY_COUNT,
    CONSUMER,
];

/// Why and where a message was given up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    pub code: String,
    pub message: String,
    pub subject: String,
    pub stream: String,
    pub stream_sequence: u64,
    pub delivered: i64,
    pub consumer: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("publishing the dead letter to `{subject}`: {message}")]
    Publish { subject: String, message: String },
    #[error("dead letter {sequence}: {message}")]
    Read { sequence: u64, message: String },
    #[error("dead letter {sequence} is not a dead letter: it has no `{header}` header")]
    NotADeadLetter { sequence: u64, header: &'static str },
    #[error("dead letter {sequence} is not replayed: {why}")]
    Refused { sequence: u64, why: String },
}

/// Where a message of `stream` published on `subject` goes when it is given up: refused usage
/// to `slipway.rejected.usage.<service>` when the handler refused it, everything else to
/// `slipway.dlq.<stream>`.
pub fn target(stream: &str, subject: &str, refused: bool) -> String {
    if refused && stream == streams::USAGE {
        // The publishing service, never the partition number.
        if let Some((service, _, _)) = subjects::usage_parts(subject)
            && let Ok(t) = subjects::usage_rejected(service)
        {
            return t;
        }
    }
    subjects::dlq(stream).unwrap_or_else(|_| format!("slipway.dlq.{}", streams::DLQ))
}

/// The headers of a copy: the original's, without NATS's own (`Nats-Msg-Id`, `Nats-Expected-*`,
/// `Nats-TTL`, which would make the copy be dropped, refused or expire) or a dead letter's.
fn copied(headers: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(h) = headers {
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            if name.to_ascii_lowercase().starts_with("nats-") || HEADERS.contains(&name) {
                continue;
            }
            for v in values {
                out.append(name, v.as_str());
            }
        }
    }
    out
}

/// Publishes `payload` (with its `headers`) to `target` with the reason's headers, and waits for
/// the stream's ack. Its `Nats-Msg-Id` names the original message and the consumer, so giving the
/// same message up twice (a crash between this and the `Term`) stores one dead letter.
pub async fn publish(
    js: &jetstream::Context,
    target: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    reason: &Reason,
) -> Result<(), DeadLetterError> {
    let mut out = copied(headers);
    // A header value is one line.
    let line = |s: &str| s.replace(['\r', '\n'], " ");
    out.insert(REASON_CODE, line(&reason.code).as_str());
    out.insert(REASON, line(&reason.message).as_str());
    out.insert(ORIGINAL_SUBJECT, reason.subject.as_str());
    out.insert(ORIGINAL_STREAM, reason.stream.as_str());
    out.insert(STREAM_SEQUENCE, reason.stream_sequence.to_string().as_str());
    out.insert(DELIVERY_COUNT, reason.delivered.to_string().as_str());
    out.insert(CONSUMER, reason.consumer.as_str());
    out.insert(
        "Nats-Msg-Id",
        format!(
            "dead:{}:{}:{}",
            reason.stream, reason.consumer, reason.stream_sequence
        )
        .as_str(),
    );
    let failed = |e: &dyn std::fmt::Display| DeadLetterError::Publish {
        subject: target.to_string(),
        message: e.to_string(),
    };
    let ack = js
        .publish_with_headers(target.to_string(), out, payload)
        .await
        .map_err(|e| failed(&e))?
        .await
        .map_err(|e| failed(&e))?;
    if ack.duplicate {
        tracing::info!(
            target,
            sequence = reason.stream_sequence,
            "the dead letter was already stored"
        );
    }
    Ok(())
}

/// A dead letter as `slipway dlq list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence in the `DLQ` stream (what `replay` takes).
    pub sequence: u64,
    pub reason: Reason,
    pub time: String,
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

fn reason_of(headers: &HeaderMap) -> Reason {
    Reason {
        code: header(headers, REASON_CODE),
        message: header(headers, REASON),
        subject: header(headers, ORIGINAL_SUBJECT),
        stream: header(headers, ORIGINAL_STREAM),
        stream_sequence: header(headers, STREAM_SEQUENCE).parse().unwrap_or(0),
        delivered: header(headers, DELIVERY_COUNT).parse().unwrap_or(0),
        consumer: header(headers, CONSUMER),
    }
}

/// The dead letters in the `DLQ` stream, oldest first; only those of `stream` when given. Read
/// with an ordered consumer filtered on their subject, so the stream's other dead letters and
/// the gaps replays leave cost nothing.
pub async fn list(
    js: &jetstream::Context,
    stream: Option<&str>,
) -> Result<Vec<Entry>, DeadLetterError> {
    use futures::StreamExt;
    let read = |e: &dyn std::fmt::Display| DeadLetterError::Read {
        sequence: 0,
        message: e.to_string(),
    };
    let dlq = js.get_stream(streams::DLQ).await.map_err(|e| read(&e))?;
    let filter = match stream {
        Some(s) => subjects::dlq(s).map_err(|e| read(&e))?,
        None => format!("{}.dlq.*", subjects::ROOT),
    };
    let mut out = Vec::new();
    let consumer = dlq
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            ..Default::default()
        })
        .await
        .map_err(|e| read(&e))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| read(&e))?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| read(&e))?;
        let meta = m.info().map_err(|e| read(&e))?;
        let (sequence, pending) = (meta.stream_sequence, meta.pending);
        let time = meta.published.to_string();
        if let Some(h) = &m.headers {
            out.push(Entry {
                sequence,
                reason: reason_of(h),
                time,
            });
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// Whether `subject` matches the NATS subject pattern `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// Puts dead letter `sequence` back on its original subject, as it was first published (the
/// reason's headers taken off, a new `Nats-Msg-Id` so the stream's duplicate window does not
/// drop it), then deletes it from the `DLQ` stream. Returns the new stream sequence. Every
/// consumer of that stream gets it again, not only the one that gave up: on a stream several
/// services read (`RUN_COMMANDS`, `USAGE`) their handlers must take a repeat as a no-op, as
/// they must for any redelivery.
pub async fn replay(js: &jetstream::Context, sequence: u64) -> Result<u64, DeadLetterError> {
    let read = |e: &dyn std::fmt::Display| DeadLetterError::Read {
        sequence,
        message: e.to_string(),
    };
    let dlq = js.get_stream(streams::DLQ).await.map_err(|e| read(&e))?;
    let m = dlq.get_raw_message(sequence).await.map_err(|e| read(&e))?;
    let reason = reason_of(&m.headers);
    if reason.subject.is_empty() {
        return Err(DeadLetterError::NotADeadLetter {
            sequence,
            header: ORIGINAL_SUBJECT,
        });
    }
    // Any consuming service may write `slipway.dlq.<its stream>`: replay only a dead letter of the
    // stream its subject names, back onto a subject of that stream, so a forged header cannot
    // make the admin's replay publish anywhere else.
    let (stream_name, patterns) = subjects::stream_subjects()
        .into_iter()
        .find(|(name, _)| *name == reason.stream)
        .ok_or_else(|| DeadLetterError::Refused {
            sequence,
            why: format!("`{}` is not one of Slipway's streams", reason.stream),
        })?;
    if subjects::dlq(stream_name).ok().as_deref() != Some(m.subject.as_str()) {
        return Err(DeadLetterError::Refused {
            sequence,
            why: format!(
                "it was filed on `{}`, not on `{stream_name}`'s dead letters",
                m.subject
            ),
        });
    }
    if !patterns.iter().any(|p| subject_matches(p, &reason.subject)) {
        return Err(DeadLetterError::Refused {
            sequence,
            why: format!("`{}` is not a subject of `{stream_name}`", reason.subject),
        });
    }
    let mut headers = copied(Some(&m.headers));
    headers.insert("Nats-Expected-Stream", stream_name);
    headers.insert(
        "Nats-Msg-Id",
        format!("replay:{}:{sequence}", streams::DLQ).as_str(),
    );
    let ack = js
        .publish_with_headers(reason.subject.clone(), headers, m.payload.clone())
        .await
        .map_err(|e| read(&e))?
        .await
        .map_err(|e| read(&e))?;
    dlq.delete_message(sequence).await.map_err(|e| read(&e))?;
    Ok(ack.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_usage_goes_to_its_publishers_refusals_whatever_the_stored_form() {
        for subject in [
            "slipway.usage.3.executor.exec_count.u",
            "slipway.usage.executor.exec_count.u",
            "slipway.usage.executor.exec_count.u.3",
        ] {
            assert_eq!(
                target(streams::USAGE, subject, true),
                "slipway.rejected.usage.executor",
                "{subject}"
            );
        }
        assert_eq!(
            target(
                streams::USAGE,
                "slipway.usage.3.executor.exec_count.u",
                false
            ),
            "slipway.dlq.USAGE"
        );
    }
}
