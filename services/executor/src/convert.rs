//! MIOSA's JSON to the contract's messages. Lenient like the decoder: a field that is absent or of
//! another shape is left at its default rather than failing the whole reply.

use serde_json::Value;
use slipway_proto::v1::{Attribution, Sandbox, SandboxState};

/// `slipway_run_id` and `slipway_branch` in a sandbox's metadata tie it to a run.
pub const RUN_KEY: &str = "slipway_run_id";
pub const BRANCH_KEY: &str = "slipway_branch";

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(crate::miosa::decode::string_or_number)
        .unwrap_or_default()
}

fn state(s: &str) -> SandboxState {
    match s {
        "creating" | "provisioning" | "snapshotting" => SandboxState::Creating,
        "running" | "ready" => SandboxState::Running,
        "paused" => SandboxState::Paused,
        "stopped" => SandboxState::Stopped,
        "destroyed" | "deleted" => SandboxState::Destroyed,
        "error" | "failed" => SandboxState::Error,
        _ => SandboxState::Unspecified,
    }
}

/// RFC 3339 to a protobuf timestamp.
pub fn timestamp(v: Option<&Value>) -> Option<pbjson_types::Timestamp> {
    let t =
        time::OffsetDateTime::parse(v?.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(pbjson_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    })
}

pub fn sandbox(v: &Value) -> Sandbox {
    let metadata: std::collections::HashMap<String, String> = v
        .get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Sandbox {
        id: text(v, "id"),
        name: text(v, "name"),
        template_id: Some(text(v, "template_id"))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| text(v, "image_id")),
        state: state(&text(v, "state")).into(),
        attribution: Some(Attribution {
            user_id: text(v, "external_user_id"),
            project_id: text(v, "external_project_id"),
            workspace_id: text(v, "external_workspace_id"),
        }),
        run_id: metadata.get(RUN_KEY).cloned().unwrap_or_default(),
        branch: metadata.get(BRANCH_KEY).cloned().unwrap_or_default(),
        created_at: timestamp(v.get("created_at")),
        timeout_sec: v.get("timeout_sec").and_then(Value::as_u64).unwrap_or(0),
        idle_timeout_sec: v
            .get("idle_timeout_sec")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        always_on: v.get("always_on").and_then(Value::as_bool).unwrap_or(false),
        persistent: v
            .get("persistent")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        parent_sandbox_id: metadata.get("forked_from").cloned().unwrap_or_default(),
        metadata,
    }
}
