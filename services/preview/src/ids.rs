//! Ids and keys: the ids this service mints (facts of their inputs, so a retry finds the same
//! record), the record keys, and the checks of the ids callers send.

use sha2::{Digest, Sha256};
use slipway_common::{ServiceError, subjects};

/// 128 bits of SHA-256 over the parts, in hex: ids that are facts of their inputs.
pub(crate) fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The preview of (run, branch, port): the same inputs are the same preview.
pub fn preview_id(run_id: &str, branch: &str, port: u32) -> String {
    format!("pv_{}", digest(&[run_id, branch, &port.to_string()]))
}

/// The share link a caller's idempotency key stands for within a run.
pub fn share_id(run_id: &str, idempotency_key: &str) -> String {
    format!("sh_{}", digest(&[run_id, idempotency_key]))
}

/// Checks an id this service minted (`pv_…`, `sh_…`): its prefix and 32 hex digits.
pub(crate) fn check_minted(
    field: &'static str,
    prefix: &str,
    id: &str,
) -> Result<(), ServiceError> {
    let ok = id.strip_prefix(prefix).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid_input(format!(
            "{field}: `{}` is not a {prefix}… id",
            id.chars().take(80).collect::<String>()
        ))
        .with_detail("field", field))
    }
}

pub(crate) fn pv_key(preview_id: &str) -> String {
    format!("pv.{preview_id}")
}

pub(crate) fn run_key(run_id: &str) -> Result<String, ServiceError> {
    let run = slipway_common::keys::encode_key(run_id)
        .map_err(|e| ServiceError::invalid_input(format!("run_id: {e}")))?;
    Ok(format!("run.{run}"))
}

/// A run id: 1 to 128 of `[A-Za-z0-9_:-]`: one subject token (its events live under it) that
/// also goes into a URL path as it is.
pub(crate) fn check_run(run_id: &str) -> Result<(), ServiceError> {
    slipway_proto::validate::check_resource_id("run_id", run_id).map_err(ServiceError::from)?;
    subjects::token(run_id).map(|_| ()).map_err(|e| {
        ServiceError::invalid_input(format!("run_id: {e}")).with_detail("field", "run_id")
    })
}

/// The branch, `main` when empty.
pub(crate) fn branch_or_main(branch: &str) -> Result<String, ServiceError> {
    if branch.is_empty() {
        return Ok("main".into());
    }
    slipway_proto::validate::check_branch_name("branch", branch).map_err(ServiceError::from)?;
    Ok(branch.to_string())
}

pub(crate) fn sh_key(share_id: &str) -> String {
    format!("sh.{share_id}")
}

/// A ticket's record key: its SHA-256 (the ticket itself is never stored).
pub(crate) fn ticket_key(ticket: &str) -> String {
    let h = Sha256::digest(ticket.as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("t.{hex}")
}
