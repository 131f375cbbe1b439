//! Per-sandbox usage as cumulative counters that never go backwards and outlive the sandbox:
//! runtime, provisioned vCPU-ms, active CPU ms (from its cgroup), memory as MiB-ms and disk as
//! GiB-ms (integrals over time, not gauges), and commands executed. Sampled by the reaper, on
//! every read, and once more when the sandbox is destroyed; kept in `usage.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::host::{Entry, Host};
use crate::model::State;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// How often the disk size is measured (a directory walk).
const DISK_EVERY_MS: i64 = 10_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub runtime_ms: u64,
    pub vcpu_ms: u64,
    pub active_cpu_ms: u64,
    pub memory_mib_ms: u64,
    pub disk_gib_ms: f64,
    pub exec_count: u64,
    pub sampled_at_ms: i64,
    /// The cgroup's CPU counter at the last sample (it restarts from 0 with a new cgroup).
    pub last_cgroup_cpu_ns: u64,
    pub disk_bytes: u64,
    pub disk_measured_at_ms: i64,
    /// Fractions carried between samples, so integer counters lose nothing.
    #[serde(default)]
    pub memory_carry: f64,
    #[serde(default)]
    pub cpu_carry_ns: u64,
    /// Billable usage by UTC hour (start, Unix ms), for rollups over any window.
    #[serde(default)]
    pub hours: BTreeMap<i64, Hour>,
}

/// What one sandbox used in one hour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Hour {
    pub vcpu_ms: f64,
    pub disk_gib_ms: f64,
}

pub const HOUR_MS: i64 = 3_600_000;
/// Hours kept per sandbox: a little over a year of always-on use.
const KEEP_HOURS: usize = 24 * 400;

impl Counters {
    /// Spreads usage accrued over `[from, to)` across the hours it covers, in proportion.
    fn spread(&mut self, from: i64, to: i64, vcpu_ms: f64, disk_gib_ms: f64) {
        if to <= from || (vcpu_ms == 0.0 && disk_gib_ms == 0.0) {
            return;
        }
        let span = (to - from) as f64;
        let mut at = from;
        while at < to {
            let hour = at - at.rem_euclid(HOUR_MS);
            let end = (hour + HOUR_MS).min(to);
            let share = (end - at) as f64 / span;
            let h = self.hours.entry(hour).or_default();
            h.vcpu_ms += vcpu_ms * share;
            h.disk_gib_ms += disk_gib_ms * share;
            at = end;
        }
        while self.hours.len() > KEEP_HOURS {
            self.hours.pop_first();
        }
    }

    /// The usage of the hours starting in `[from, to)`.
    pub fn between(&self, from: i64, to: i64) -> Hour {
        self.hours
            .range(from..to)
            .fold(Hour::default(), |acc, (_, h)| Hour {
                vcpu_ms: acc.vcpu_ms + h.vcpu_ms,
                disk_gib_ms: acc.disk_gib_ms + h.disk_gib_ms,
            })
    }
}

impl Counters {
    pub fn view(&self, entry: &Entry) -> serde_json::Value {
        let r = entry.snapshot();
        serde_json::json!({
            "sandbox_id": entry.id,
            "state": r.state.as_str(),
            "runtime_sec": self.runtime_ms / 1000,
            "runtime_ms": self.runtime_ms,
            "provisioned_vcpu_ms": self.vcpu_ms,
            "vcpu_ms": self.vcpu_ms,
            "provisioned_memory_mb_ms": self.runtime_ms * r.resources.memory_mb,
            "active_cpu_ms": self.active_cpu_ms,
            "memory_mib_ms": self.memory_mib_ms,
            "disk_gib_ms": self.disk_gib_ms.floor() as u64,
            "exec_count": self.exec_count,
            "creation_count": 1,
            // MIOSA's documented keys. Network is not measured per sandbox here (egress goes
            // through the edge, which bills it per request).
            "measurement_status": {
                "active_cpu": "measured",
                "network": "not_measured",
                "provisioned_resources": "measured",
            },
            "network_ingress_bytes": null,
            "network_egress_bytes": null,
            "estimated_cost_cents": 0,
            "timeout_sec": r.timeout_sec,
            "read_at": crate::clock::rfc3339(self.sampled_at_ms),
        })
    }
}

impl Host {
    fn usage_file(entry: &Entry) -> std::path::PathBuf {
        entry.dir.join("usage.json")
    }

    /// The counters saved for `entry` (zero for a new sandbox).
    pub fn load_usage(entry: &Entry) -> Counters {
        crate::store::read_json(&Self::usage_file(entry))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Adds the usage since the last sample and saves the counters.
    pub fn sample_usage(&self, entry: &Entry) -> Counters {
        let now = now_ms();
        let (state, cpu_count) = {
            let r = entry.record.lock().unwrap_or_else(|p| p.into_inner());
            (r.state, r.resources.cpu_count)
        };
        let measure_disk = {
            let c = entry.usage.lock().unwrap_or_else(|p| p.into_inner());
            state != State::Destroyed && now - c.disk_measured_at_ms >= DISK_EVERY_MS
        };
        let disk = measure_disk.then(|| crate::storage::Storage::size(&entry.workspace()));
        let stats = match (&self.iso.cgroups, state) {
            (Some(cg), State::Running | State::Paused) => cg.stats(&entry.id).ok(),
            _ => None,
        };
        let mut c = entry.usage.lock().unwrap_or_else(|p| p.into_inner());
        if c.sampled_at_ms == 0 {
            c.sampled_at_ms = entry.snapshot().created_at_ms;
        }
        let from = c.sampled_at_ms;
        let dt = u64::try_from(now - c.sampled_at_ms).unwrap_or(0);
        let vcpu_before = c.vcpu_ms;
        let disk_before = c.disk_gib_ms;
        if state == State::Running {
            c.runtime_ms += dt;
            c.vcpu_ms += cpu_count * dt;
        }
        if let Some(s) = stats {
            let delta = if s.cpu_usage_ns >= c.last_cgroup_cpu_ns {
                s.cpu_usage_ns - c.last_cgroup_cpu_ns
            } else {
                s.cpu_usage_ns
            };
            c.last_cgroup_cpu_ns = s.cpu_usage_ns;
            let ns = c.cpu_carry_ns + delta;
            c.active_cpu_ms += ns / 1_000_000;
            c.cpu_carry_ns = ns % 1_000_000;
            let mem = c.memory_carry + (s.memory_bytes as f64 / MIB) * dt as f64;
            c.memory_mib_ms += mem.floor() as u64;
            c.memory_carry = mem - mem.floor();
        }
        if state != State::Destroyed {
            c.disk_gib_ms += (c.disk_bytes as f64 / GIB) * dt as f64;
        }
        let (dv, dd) = (
            (c.vcpu_ms - vcpu_before) as f64,
            c.disk_gib_ms - disk_before,
        );
        c.spread(from, now, dv, dd);
        if let Some(bytes) = disk {
            c.disk_bytes = bytes;
            c.disk_measured_at_ms = now;
        }
        c.exec_count = c
            .exec_count
            .max(entry.exec_count.load(std::sync::atomic::Ordering::Relaxed));
        c.sampled_at_ms = now;
        if let Err(e) = crate::store::write_json(&Self::usage_file(entry), &*c) {
            tracing::warn!(sandbox = %entry.id, error = %e, "saving usage counters");
        }
        c.clone()
    }

    /// Samples every sandbox that still uses resources.
    pub fn sample_all_usage(&self) {
        for e in self.all() {
            if e.state() != State::Destroyed {
                self.sample_usage(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_spreads_over_the_hours_it_covers() {
        let mut c = Counters::default();
        // 30 minutes before an hour boundary to 90 minutes after: a quarter, then three quarters.
        let start = 10 * HOUR_MS - HOUR_MS / 2;
        c.spread(start, start + 2 * HOUR_MS, 8000.0, 4.0);
        assert_eq!(c.hours.len(), 3);
        assert_eq!(c.between(9 * HOUR_MS, 10 * HOUR_MS).vcpu_ms, 2000.0);
        assert_eq!(c.between(10 * HOUR_MS, 11 * HOUR_MS).vcpu_ms, 4000.0);
        assert_eq!(c.between(0, i64::MAX).disk_gib_ms, 4.0);
    }
}
