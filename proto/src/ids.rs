//! Deterministic ids. A run's id is a pure function of the request id, so a resubmitted prompt
//! maps to the same run and a platform can subscribe to a run's events before its first event.

use sha2::{Digest, Sha256};

/// The run id for a prompt's request id: `run_` and 24 lowercase hex digits (96 bits of
/// SHA-256), safe as a subject token and a KV key.
pub fn run_id_for(request_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"slipway.v1.run\0")
        .chain_update(request_id.as_bytes())
        .finalize();
    let mut id = String::with_capacity(28);
    id.push_str("run_");
    for byte in &digest[..12] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

/// The request id of a prompt published without one: derived from its `PROMPTS` stream sequence,
/// which the publisher learns from the publish acknowledgement.
pub fn request_id_for_sequence(stream_sequence: u64) -> String {
    format!("prompts-seq-{stream_sequence}")
}

/// Whether `id` has the shape `run_id_for` produces.
pub fn is_run_id(id: &str) -> bool {
    id.strip_prefix("run_")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| HEX.contains(&b)))
}

const HEX: &[u8; 16] = b"0123456789abcdef";
