//! The meter catalogue: every meter a usage event may carry. `docs/usage-events.md` is the
//! prose form of this table; a test keeps the two in step.

/// How a meter's quantities relate to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Each event is an amount on its own (tokens of one LLM call, one sandbox created).
    Delta,
    /// The platform reports a counter that only grows; events are the differences between two
    /// readings, and their ids name the interval (`<sandbox>:<meter>:<from>-<to>`).
    Cumulative,
}

/// One meter of the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meter {
    pub name: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    /// The service that publishes it (the `<service>` token of its subject).
    pub producer: &'static str,
    pub description: &'static str,
}

pub const SANDBOX_VCPU_MS: &str = "sandbox_vcpu_ms";
pub const ACTIVE_CPU_MS: &str = "active_cpu_ms";
pub const MEMORY_MIB_MS: &str = "memory_mib_ms";
pub const DISK_GIB_MS: &str = "disk_gib_ms";
pub const EXEC_COUNT: &str = "exec_count";
pub const SANDBOXES_CREATED: &str = "sandboxes_created";
pub const LLM_INPUT_TOKENS: &str = "llm_input_tokens";
pub const LLM_OUTPUT_TOKENS: &str = "llm_output_tokens";
pub const BUILD_MS: &str = "build_ms";
pub const DEPLOYS: &str = "deploys";

/// Every meter, by name.
pub const CATALOGUE: &[Meter] = &[
    Meter {
        name: SANDBOX_VCPU_MS,
        unit: "vCPU*ms",
        kind: Kind::Cumulative,
        producer: "executor",
        description: "provisioned vCPUs times wall-clock milliseconds a sandbox ran",
    },
    Meter {
        name: ACTIVE_CPU_MS,
        unit: "ms",
        kind: Kind::Cumulative,
        producer: "executor",
        description: "CPU time the sandbox's processes actually used",
    },
    Meter {
        name: MEMORY_MIB_MS,
        unit: "MiB*ms",
        kind: Kind::Cumulative,
        producer: "executor",
        description: "memory in use integrated over time",
    },
    Meter {
        name: DISK_GIB_MS,
        unit: "GiB*ms",
        kind: Kind::Cumulative,
        producer: "executor",
        description: "disk in use integrated over time",
    },
    Meter {
        name: EXEC_COUNT,
        unit: "count",
        kind: Kind::Cumulative,
        producer: "executor",
        description: "commands executed in a sandbox",
    },
    Meter {
        name: SANDBOXES_CREATED,
        unit: "count",
        kind: Kind::Delta,
        producer: "executor",
        description: "sandboxes created, forks included",
    },
    Meter {
        name: LLM_INPUT_TOKENS,
        unit: "tokens",
        kind: Kind::Delta,
        producer: "planner",
        description: "prompt tokens sent to the LLM for one step",
    },
    Meter {
        name: LLM_OUTPUT_TOKENS,
        unit: "tokens",
        kind: Kind::Delta,
        producer: "planner",
        description: "completion tokens the LLM returned for one step",
    },
    Meter {
        name: BUILD_MS,
        unit: "ms",
        kind: Kind::Delta,
        producer: "deployer",
        description: "wall-clock time of a production build",
    },
    Meter {
        name: DEPLOYS,
        unit: "count",
        kind: Kind::Delta,
        producer: "deployer",
        description: "deployment versions that became ready",
    },
];

/// The catalogue entry for `name`.
pub fn find(name: &str) -> Option<&'static Meter> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// The CloudEvents `type` of every usage event.
pub const USAGE_EVENT_TYPE: &str = "slipway.usage.v1";
/// The CloudEvents `specversion` of every usage event.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";
