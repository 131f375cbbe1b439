//! What a stream holds, read at the server: tests count events at the source of truth rather
//! than in the records of the service under test.

use anyhow::{Context, Result};
use async_nats::jetstream;
use slipway_proto::WireMessage;

/// Every message stored in `stream`, in order, with its `Nats-Msg-Id` (empty when none) and
/// decoded as `M`. A sequence with no message (deleted by a limit) is skipped; a message that does
/// not decode as `M` is an error.
pub async fn stored<M: WireMessage>(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<(String, M)>> {
    let mut s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("stream {stream}"))?;
    let info = s.info().await?.clone();
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let Ok(m) = s.get_raw_message(seq).await else {
            continue;
        };
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let msg = slipway_common::rpc::decode_message::<M>(Some(&m.headers), &m.payload)
            .with_context(|| format!("{stream} message {seq}"))?;
        out.push((id, msg));
    }
    Ok(out)
}

/// Every message stored in `stream`, decoded as `M` (see [`stored`]).
pub async fn messages<M: WireMessage>(js: &jetstream::Context, stream: &str) -> Result<Vec<M>> {
    Ok(stored(js, stream)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .collect())
}
