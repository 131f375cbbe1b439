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
    /// Its size and the limits that follow (records from before sizes were kept are `small`).
    #[serde(default)]
    pub resources: Resources,
}

/// The longest `timeout_sec` or `idle_timeout_sec` a client may set: 30 days.
pub const MAX_TIMEOUT_SEC: u64 = 30 * 86_400;

/// Seconds to milliseconds, saturating (records from before the bound may hold anything).
pub fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000)
}

/// One of MIOSA's sandbox sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub name: &'static str,
    pub cpu_count: u64,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
}

/// MIOSA's sizes (`miosa-api.md`: vCPU / MB RAM / MB disk).
pub const SIZES: [Size; 5] = [
    Size {
        name: "xs",
        cpu_count: 1,
        memory_mb: 2048,
        disk_size_mb: 10240,
    },
    Size {
        name: "small",
        cpu_count: 2,
        memory_mb: 4096,
        disk_size_mb: 10240,
    },
    Size {
        name: "medium",
        cpu_count: 4,
        memory_mb: 8192,
        disk_size_mb: 20480,
    },
    Size {
        name: "large",
        cpu_count: 8,
        memory_mb: 16384,
        disk_size_mb: 40960,
    },
    Size {
        name: "xl",
        cpu_count: 16,
        memory_mb: 32768,
        disk_size_mb: 81920,
    },
];

/// The size a sandbox gets when none is asked for (MIOSA's default).
pub const DEFAULT_SIZE: &str = "small";

pub fn size(name: &str) -> Option<Size> {
    SIZES.iter().copied().find(|s| s.name == name)
}

/// What a sandbox was given: the size it asked for and the limits enforced on it, which are the
/// size's, lowered where the host caps them (`--memory-limit-mb`, `--disk-limit-mb`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub size: String,
    pub cpu_count: u64,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
}

impl Resources {
    pub fn of(size: Size, memory_cap_mb: Option<u64>, disk_cap_mb: Option<u64>) -> Resources {
        let cap = |v: u64, c: Option<u64>| c.map_or(v, |c| v.min(c.max(1)));
        Resources {
            size: size.name.to_string(),
            cpu_count: size.cpu_count,
            memory_mb: cap(size.memory_mb, memory_cap_mb),
            disk_size_mb: cap(size.disk_size_mb, disk_cap_mb),
        }
    }
}

impl Default for Resources {
    fn default() -> Self {
        let small = size(DEFAULT_SIZE).unwrap_or(SIZES[1]);
        Resources::of(small, None, None)
    }
}

fn yes() -> bool {
    true
}

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
            .map(|t| {
                self.timeout_base_ms
                    .saturating_add(secs_to_ms(t))
                    .saturating_sub(now_ms)
                    .max(0)
            });
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "slug": self.name,
            "template_id": self.template_id,
            "image_id": self.template_id,
            "state": self.state.as_str(),
            "status": self.state.as_str(),
            "ready": self.state == State::Running,
            "size": self.resources.size,
            "cpu_count": self.resources.cpu_count,
            "memory_mb": self.resources.memory_mb,
            "disk_size_mb": self.resources.disk_size_mb,
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
