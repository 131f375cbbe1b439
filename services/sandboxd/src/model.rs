//! The sandbox record as stored on disk and as MIOSA's API shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Paused,
    Stopped,
    Destroyed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        match s {
            "running" => Some(State::Running),
            "paused" => Some(State::Paused),
            "stopped" => Some(State::Stopped),
            "destroyed" => Some(State::Destroyed),
            _ => None,
        }
    }
}

/// One sandbox. Serialised as-is to `meta.json`; `view()` is what the API returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub name: Option<String>,
    pub template_id: String,
    pub state: State,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub external_user_id: Option<String>,
    pub external_project_id: Option<String>,
    pub external_workspace_id: Option<String>,
    pub workspace_id: Option<String>,
    pub project_id: Option<String>,
    pub timeout_sec: Option<u64>,
    pub idle_timeout_sec: Option<u64>,
    pub persistent: bool,
    pub always_on: bool,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub destroyed_at_ms: Option<i64>,
    /// When the activity timeout was last reset (create, extend, resume).
    pub timeout_base_ms: i64,
    /// The sandbox's network namespace index (its /30 in 10.233.0.0/16).
    #[serde(default)]
    pub net_index: Option<u32>,
    /// Whether the sandbox may open outbound connections (where the host has them).
    #[serde(default = "yes")]
    pub outbound: bool,
}

fn yes() -> bool {
    true
}

pub const CPU_COUNT: u64 = 2;
pub const MEMORY_MB: u64 = 4096;
pub const DISK_MB: u64 = 10240;

impl Sandbox {
    /// A deployment's runtime: sandboxd's own, not listed and not counted against quotas.
    pub fn is_runtime(&self) -> bool {
        self.metadata.contains_key(crate::deployments::RUNTIME_KEY)
    }

    /// The API form (MIOSA's field names; env values are never echoed back).
    pub fn view(&self, now_ms: i64) -> serde_json::Value {
        let ts = |ms: i64| crate::clock::rfc3339(ms);
        let remaining = self
            .timeout_sec
            .filter(|_| self.state == State::Running)
            .map(|t| (self.timeout_base_ms + (t as i64) * 1000 - now_ms).max(0));
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "slug": self.name,
            "template_id": self.template_id,
            "image_id": self.template_id,
            "state": self.state.as_str(),
            "status": self.state.as_str(),
            "ready": self.state == State::Running,
            "size": "small",
            "cpu_count": CPU_COUNT,
            "memory_mb": MEMORY_MB,
            "disk_size_mb": DISK_MB,
            "env_keys": self.env.keys().collect::<Vec<_>>(),
            "metadata": self.metadata,
            "tags": self.tags,
            "external_user_id": self.external_user_id,
            "external_project_id": self.external_project_id,
            "external_workspace_id": self.external_workspace_id,
            "workspace_id": self.workspace_id,
            "project_id": self.project_id,
            "timeout_sec": self.timeout_sec,
            "timeout_remaining_ms": remaining,
            "idle_timeout_sec": self.idle_timeout_sec,
            "persistent": self.persistent,
            "always_on": self.always_on,
            "allow_internet_access": self.outbound,
            "created_at": ts(self.created_at_ms),
            "started_at": ts(self.created_at_ms),
            "ready_at": ts(self.created_at_ms),
            "updated_at": ts(self.updated_at_ms),
            "destroyed_at": self.destroyed_at_ms.map(ts),
        })
    }
}
