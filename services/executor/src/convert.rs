//! MIOSA's JSON to the contract's messages. Lenient like the decoder: a field that is absent or of
//! another shape is left at its default rather than failing the whole reply.

use serde_json::Value;
use slipway_proto::meters;
use slipway_proto::v1::{Attribution, Sandbox, SandboxState, UsageEvent};

/// `slipway_run_id` and `slipway_branch` in a sandbox's metadata tie it to a run.
pub const RUN_KEY: &str = "slipway_run_id";
pub const BRANCH_KEY: &str = "slipway_branch";
/// The idempotency key of the request that created the sandbox.
pub const CREATED_BY_KEY: &str = "slipway_created_by";

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

fn num(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| {
            x.as_u64()
                .or_else(|| x.as_f64().map(|f| f.max(0.0) as u64))
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        })
        .unwrap_or(0)
}

/// The first of `keys` that is present, as text.
fn first(v: &Value, keys: &[&str]) -> String {
    keys.iter()
        .map(|k| text(v, k))
        .find(|t| !t.is_empty())
        .unwrap_or_default()
}

/// The platform components that must all be ready before commands run (MIOSA's
/// `command_path_ready`, as the Python SDK lists them).
pub const READINESS_COMPONENTS: [&str; 8] = [
    "command_agent",
    "process_control",
    "resource_contract",
    "clock",
    "identity",
    "durability",
    "filesystem",
    "internal_probe",
];

/// Whether a readiness answer says commands will run, read as the Python SDK's
/// `is_command_ready` reads it: `ready: true`; else every component in `READINESS_COMPONENTS`
/// `ready` (the first non-empty of `readiness.components`, `components`,
/// `readiness_components`). Failing both, `status: "ready"` from a server that reports no
/// components at all (the shape MIOSA's docs show).
pub fn is_ready(v: &Value) -> bool {
    if v.get("ready").and_then(Value::as_bool) == Some(true) {
        return true;
    }
    let reported = [
        v.get("readiness").and_then(|r| r.get("components")),
        v.get("components"),
        v.get("readiness_components"),
    ];
    let components = reported
        .iter()
        .flatten()
        .filter_map(|c| c.as_object())
        .find(|c| !c.is_empty());
    if components.is_none() && reported.iter().any(Option::is_some) {
        // Components reported but empty or not an object: not ready, as the SDK reads it.
        return false;
    }
    match components {
        Some(c) => READINESS_COMPONENTS.iter().all(|name| {
            let comp = c.get(*name);
            let status = comp
                .and_then(Value::as_str)
                .or(comp.and_then(|x| x.get("status")).and_then(Value::as_str));
            status == Some("ready")
        }),
        None => v.get("status").and_then(Value::as_str) == Some("ready"),
    }
}

pub fn process(v: &Value) -> slipway_proto::v1::Process {
    use slipway_proto::v1::ProcessState;
    let state = match first(v, &["state", "status"]).as_str() {
        "running" | "starting" => ProcessState::Running,
        "exited" | "completed" | "stopped" => ProcessState::Exited,
        "killed" | "failed" => ProcessState::Killed,
        _ => ProcessState::Unspecified,
    };
    slipway_proto::v1::Process {
        id: first(v, &["id", "pid", "process_id"]),
        name: text(v, "name"),
        command: text(v, "command"),
        state: state.into(),
        exit_code: v
            .get("exit_code")
            .and_then(Value::as_i64)
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(0),
        started_at: timestamp(v.get("started_at")),
        restart_on_resume: false,
    }
}

pub fn snapshot(v: &Value) -> slipway_proto::v1::Snapshot {
    slipway_proto::v1::Snapshot {
        id: first(v, &["id", "snapshot_id"]),
        sandbox_id: text(v, "sandbox_id"),
        comment: text(v, "comment"),
        created_at: timestamp(v.get("created_at")),
        size_bytes: num(v, "size_bytes"),
    }
}

pub fn preview(v: &Value) -> slipway_proto::v1::Preview {
    slipway_proto::v1::Preview {
        id: text(v, "id"),
        sandbox_id: text(v, "sandbox_id"),
        port: u32::try_from(num(v, "port")).unwrap_or(0),
        url: first(v, &["url", "preview_url"]),
    }
}

pub fn share(v: &Value) -> slipway_proto::v1::Share {
    slipway_proto::v1::Share {
        id: first(v, &["share_id", "id"]),
        sandbox_id: text(v, "sandbox_id"),
        url: first(v, &["share_url", "url"]),
        created_at: timestamp(v.get("created_at")),
        expires_at: timestamp(v.get("expires_at")),
    }
}

pub fn deployment(v: &Value) -> slipway_proto::v1::Deployment {
    slipway_proto::v1::Deployment {
        id: text(v, "id"),
        name: text(v, "name"),
        url: first(v, &["public_url", "url"]),
        current_version_id: text(v, "active_version_id"),
        attribution: Some(Attribution {
            user_id: text(v, "external_user_id"),
            project_id: text(v, "external_project_id"),
            workspace_id: text(v, "external_workspace_id"),
        }),
        created_at: timestamp(v.get("created_at")),
    }
}

pub fn version(v: &Value, url: &str) -> slipway_proto::v1::DeploymentVersion {
    use slipway_proto::v1::VersionState;
    let state = match text(v, "state").as_str() {
        "created" | "building" | "pending" => VersionState::Building,
        "ready" | "active" | "archived" => VersionState::Ready,
        "failed" | "error" => VersionState::Failed,
        _ => VersionState::Unspecified,
    };
    slipway_proto::v1::DeploymentVersion {
        id: text(v, "id"),
        deployment_id: text(v, "deployment_id"),
        number: u32::try_from(num(v, "version_number")).unwrap_or(0),
        state: state.into(),
        digest: text(v, "artifact_sha256"),
        url: url.to_string(),
        source_sandbox_id: text(v, "source_sandbox_id"),
        snapshot_id: text(v, "source_snapshot_id"),
        created_at: timestamp(v.get("created_at")),
        error: text(v, "error"),
    }
}

pub fn counters(v: &Value) -> slipway_proto::v1::SandboxCounters {
    slipway_proto::v1::SandboxCounters {
        runtime_sec: num(v, "runtime_sec"),
        vcpu_ms: [num(v, "provisioned_vcpu_ms"), num(v, "vcpu_ms")]
            .into_iter()
            .max()
            .unwrap_or(0),
        active_cpu_ms: num(v, "active_cpu_ms"),
        memory_mib_ms: num(v, "memory_mib_ms"),
        disk_gib_ms: num(v, "disk_gib_ms"),
        exec_count: num(v, "exec_count"),
        read_at: timestamp(v.get("read_at")),
    }
}

/// Both quota shapes: `{limits:{…}, usage:{…}}` and flat `max_*` / `current_sandboxes`.
pub fn quota(user: &str, v: &Value) -> slipway_proto::v1::Quota {
    let limits = v.get("limits").unwrap_or(v);
    let limit = |k: &str| limits.get(k).and_then(Value::as_u64);
    let usage = v.get("usage").unwrap_or(v);
    slipway_proto::v1::Quota {
        user_id: user.to_string(),
        limits: Some(slipway_proto::v1::QuotaLimits {
            max_sandboxes: limit("max_sandboxes"),
            max_concurrent: limit("max_concurrent"),
            max_storage_gb: limit("max_storage_gb"),
            max_credit_cents: limit("max_credit_cents"),
        }),
        total_sandboxes: num(usage, "total_sandboxes").max(num(v, "current_sandboxes")),
        concurrent: num(usage, "concurrent"),
    }
}

/// A timestamp as RFC 3339 (for query parameters).
pub fn rfc3339(t: &pbjson_types::Timestamp) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(t.seconds).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// A usage event of `sandbox` for `quantity` of `meter`, attributed to its end user; the caller
/// sets its id and time (both fixed, so a republish is the same event).
pub fn usage_event(sandbox: &Sandbox, meter: &str, quantity: u64) -> UsageEvent {
    let attribution = sandbox.attribution.clone().unwrap_or_default();
    let unit = meters::CATALOGUE
        .iter()
        .find(|m| m.name == meter)
        .map_or("", |m| m.unit);
    UsageEvent {
        id: String::new(),
        source: "slipway/executor".into(),
        r#type: "slipway.usage.v1".into(),
        subject: attribution.user_id,
        time: None,
        spec_version: "1.0".into(),
        meter: meter.to_string(),
        quantity: quantity.to_string(),
        unit: unit.to_string(),
        run_id: sandbox.run_id.clone(),
        sandbox_id: sandbox.id.clone(),
        project_id: attribution.project_id,
        workspace_id: attribution.workspace_id,
        counter_from: 0,
        counter_to: 0,
    }
}
