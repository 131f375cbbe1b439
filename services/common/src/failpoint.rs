//! Failpoints for crash tests: named points in the code where, when enabled, the process aborts
//! (`std::process::abort`, no unwinding, no cleanup), exactly as a `kill -9` at that step would
//! leave things. Enabled by `SLIPWAY_FAILPOINTS=name[@N][,name[@N]...]`: abort at the Nth time the
//! point is reached (the first by default). Disabled, a failpoint costs one atomic load.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The environment variable that enables failpoints.
pub const ENV: &str = "SLIPWAY_FAILPOINTS";

struct Armed {
    /// Failpoint name to the hit number that aborts.
    at: HashMap<String, u64>,
    hits: Mutex<HashMap<String, u64>>,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok().filter(|s| !s.trim().is_empty())?;
            Some(Armed {
                at: parse(&spec),
                hits: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
}

/// Parses `name[@N],...`; a malformed count means 1.
pub fn parse(spec: &str) -> HashMap<String, u64> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('@') {
            Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1).max(1)),
            None => (item.to_string(), 1),
        })
        .collect()
}

/// Marks the failpoint `name`: aborts the process here if it is armed and this is its hit.
pub fn hit(name: &str) {
    let Some(armed) = armed() else { return };
    let Some(&at) = armed.at.get(name) else {
        return;
    };
    let n = {
        let mut hits = armed.hits.lock().unwrap_or_else(|p| p.into_inner());
        let n = hits.entry(name.to_string()).or_insert(0);
        *n += 1;
        *n
    };
    if n == at {
        eprintln!("failpoint `{name}` hit ({n}): aborting");
        std::process::abort();
    }
}
