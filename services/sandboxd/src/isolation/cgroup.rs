//! Resource limits and accounting with cgroups, v1 (this machine: memory, pids, cpu, cpuacct
//! and freezer hierarchies) or v2 (one unified tree). Each sandbox gets `slipway/<id>` in every
//! hierarchy it uses; its processes join before anything of theirs runs (see `Jail`).

use std::path::{Path, PathBuf};

/// Limits of one sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPUs' worth of time per scheduling period (a CFS quota), and the sandbox's share when
    /// CPUs are contended: proportional to this, so each sandbox gets its fair part.
    pub cpus: u32,
}

/// The CFS period the CPU quota is expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    fn cpu_quota_us(&self) -> u64 {
        u64::from(self.cpus.max(1)) * CPU_PERIOD_US
    }

    /// `cpu.shares` (v1): 1024, the kernel's default, for a 2-CPU sandbox.
    fn cpu_shares(&self) -> u64 {
        512 * u64::from(self.cpus.max(1))
    }

    /// `cpu.weight` (v2): 100, the kernel's default, for a 2-CPU sandbox.
    fn cpu_weight(&self) -> u64 {
        (50 * u64::from(self.cpus.max(1))).min(10_000)
    }
}

/// What the kernel counted for a sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// CPU time used by the sandbox's processes.
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    /// Processes the kernel killed for memory.
    pub oom_kills: u64,
    /// Forks refused by the pids limit.
    pub pids_limit_hits: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cgroups {
    /// Separate hierarchies under `root` (`root/memory`, `root/pids`, ...).
    V1 { root: PathBuf },
    /// The unified hierarchy at `root`.
    V2 { root: PathBuf },
}

const V1_CONTROLLERS: [&str; 5] = ["memory", "pids", "cpu", "cpuacct", "freezer"];
const PARENT: &str = "slipway";

impl Cgroups {
    /// The cgroup version mounted at `root` (`/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> std::io::Result<Cgroups> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Cgroups::V2 {
                root: root.to_path_buf(),
            });
        }
        for c in V1_CONTROLLERS {
            if !root.join(c).is_dir() {
                return Err(std::io::Error::other(format!(
                    "cgroup v1 controller `{c}` is not mounted under {}",
                    root.display()
                )));
            }
        }
        Ok(Cgroups::V1 {
            root: root.to_path_buf(),
        })
    }

    fn v1_dir(root: &Path, controller: &str, id: &str) -> PathBuf {
        root.join(controller).join(PARENT).join(id)
    }

    /// Creates the sandbox's cgroups with `limits` (idempotent).
    pub fn create(&self, id: &str, limits: Limits) -> std::io::Result<()> {
        match self {
            Cgroups::V1 { root } => {
                for c in V1_CONTROLLERS {
                    std::fs::create_dir_all(Self::v1_dir(root, c, id))?;
                }
                write(
                    &Self::v1_dir(root, "memory", id).join("memory.limit_in_bytes"),
                    limits.memory_bytes,
                )?;
                write(
                    &Self::v1_dir(root, "pids", id).join("pids.max"),
                    limits.pids,
                )?;
                let cpu = Self::v1_dir(root, "cpu", id);
                write(&cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US)?;
                write(&cpu.join("cpu.cfs_quota_us"), limits.cpu_quota_us())?;
                write(&cpu.join("cpu.shares"), limits.cpu_shares())?;
            }
            Cgroups::V2 { root } => {
                let parent = root.join(PARENT);
                std::fs::create_dir_all(&parent)?;
                // Delegate the controllers the sandboxes need to the parent's children.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu");
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids +cpu");
                let dir = parent.join(id);
                std::fs::create_dir_all(&dir)?;
                write(&dir.join("memory.max"), limits.memory_bytes)?;
                write(&dir.join("memory.swap.max"), 0).or_else(ignore_missing)?;
                write(&dir.join("pids.max"), limits.pids)?;
                std::fs::write(
                    dir.join("cpu.max"),
                    format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us()),
                )?;
                write(&dir.join("cpu.weight"), limits.cpu_weight())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid into to join the sandbox.
    pub fn procs_files(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V1 { root } => V1_CONTROLLERS
                .iter()
                .map(|c| Self::v1_dir(root, c, id).join("cgroup.procs"))
                .collect(),
            Cgroups::V2 { root } => vec![root.join(PARENT).join(id).join("cgroup.procs")],
        }
    }

    /// Freezes (`true`) or thaws every process of the sandbox, keeping them and their state.
    pub fn freeze(&self, id: &str, frozen: bool) -> std::io::Result<()> {
        match self {
            Cgroups::V1 { root } => std::fs::write(
                Self::v1_dir(root, "freezer", id).join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            Cgroups::V2 { root } => std::fs::write(
                root.join(PARENT).join(id).join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
        }
    }

    /// Whether every process of the sandbox is frozen now (freezing takes effect
    /// asynchronously: v1 says `FREEZING` until it has, v2 `frozen 0`).
    pub fn is_frozen(&self, id: &str) -> std::io::Result<bool> {
        match self {
            Cgroups::V1 { root } => Ok(std::fs::read_to_string(
                Self::v1_dir(root, "freezer", id).join("freezer.state"),
            )?
            .trim()
                == "FROZEN"),
            Cgroups::V2 { root } => {
                Ok(keyed(&root.join(PARENT).join(id).join("cgroup.events"), "frozen")? == 1)
            }
        }
    }

    /// Freezes the sandbox and waits until it is (at most `within`).
    pub fn freeze_and_wait(&self, id: &str, within: std::time::Duration) -> std::io::Result<()> {
        self.freeze(id, true)?;
        let deadline = std::time::Instant::now() + within;
        while !self.is_frozen(id)? {
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other("the sandbox did not freeze in time"));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    pub fn stats(&self, id: &str) -> std::io::Result<Stats> {
        match self {
            Cgroups::V1 { root } => Ok(Stats {
                cpu_usage_ns: read_u64(&Self::v1_dir(root, "cpuacct", id).join("cpuacct.usage"))?,
                memory_bytes: read_u64(
                    &Self::v1_dir(root, "memory", id).join("memory.usage_in_bytes"),
                )?,
                pids: read_u64(&Self::v1_dir(root, "pids", id).join("pids.current"))?,
                oom_kills: keyed(
                    &Self::v1_dir(root, "memory", id).join("memory.oom_control"),
                    "oom_kill",
                )
                .or_else(|_| read_u64(&Self::v1_dir(root, "memory", id).join("memory.failcnt")))?,
                pids_limit_hits: keyed(&Self::v1_dir(root, "pids", id).join("pids.events"), "max")?,
            }),
            Cgroups::V2 { root } => {
                let dir = root.join(PARENT).join(id);
                Ok(Stats {
                    cpu_usage_ns: keyed(&dir.join("cpu.stat"), "usage_usec")?.saturating_mul(1000),
                    memory_bytes: read_u64(&dir.join("memory.current"))?,
                    pids: read_u64(&dir.join("pids.current"))?,
                    oom_kills: keyed(&dir.join("memory.events"), "oom_kill")?,
                    pids_limit_hits: keyed(&dir.join("pids.events"), "max")?,
                })
            }
        }
    }

    /// Pids of every process still in the sandbox.
    pub fn pids(&self, id: &str) -> Vec<i32> {
        let file = match self {
            Cgroups::V1 { root } => Self::v1_dir(root, "pids", id).join("cgroup.procs"),
            Cgroups::V2 { root } => root.join(PARENT).join(id).join("cgroup.procs"),
        };
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Removes the sandbox's cgroups (its processes must be gone).
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        let dirs: Vec<PathBuf> = match self {
            Cgroups::V1 { root } => V1_CONTROLLERS
                .iter()
                .map(|c| Self::v1_dir(root, c, id))
                .collect(),
            Cgroups::V2 { root } => vec![root.join(PARENT).join(id)],
        };
        for d in dirs {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(std::io::Error::other(format!("{}: {e}", d.display()))),
            }
        }
        Ok(())
    }
}

fn write(path: &Path, value: u64) -> std::io::Result<()> {
    std::fs::write(path, value.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    let t = text.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse()
        .map_err(|_| std::io::Error::other(format!("{}: not a number: {t:?}", path.display())))
}

/// The value of `key` in a `key value` per line file (`memory.events`, `cpu.stat`); 0 if absent.
fn keyed(path: &Path, key: &str) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    //! This host runs cgroup v1, so v2 is tested against a fake tree laid out as the kernel
    //! lays it out; v1 against the real hierarchy in the integration tests and a fake one here.
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn fake_v2() -> (tempfile::TempDir, Cgroups) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroups::detect(dir.path()).unwrap();
        (dir, cg)
    }

    #[test]
    fn v2_is_detected_and_limits_are_written() {
        let (dir, cg) = fake_v2();
        assert_eq!(
            cg,
            Cgroups::V2 {
                root: dir.path().to_path_buf()
            }
        );
        cg.create(
            "sbx_1",
            Limits {
                memory_bytes: 256 << 20,
                pids: 128,
                cpus: 1,
            },
        )
        .unwrap();
        let d = dir.path().join("slipway/sbx_1");
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "100000 100000"
        );
        assert_eq!(std::fs::read_to_string(d.join("cpu.weight")).unwrap(), "50");
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            (256u64 << 20).to_string()
        );
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap(), "128");
        assert_eq!(cg.procs_files("sbx_1"), vec![d.join("cgroup.procs")]);
    }

    #[test]
    fn v2_stats_freeze_and_remove() {
        let (dir, cg) = fake_v2();
        cg.create(
            "s",
            Limits {
                memory_bytes: 1,
                pids: 1,
                cpus: 2,
            },
        )
        .unwrap();
        let d = dir.path().join("slipway/s");
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(d.join("pids.events"), "max 17\n").unwrap();
        std::fs::write(d.join("cgroup.procs"), "12\n13\n").unwrap();
        let s = cg.stats("s").unwrap();
        assert_eq!(
            s,
            Stats {
                cpu_usage_ns: 1_500_000_000,
                memory_bytes: 4096,
                pids: 3,
                oom_kills: 2,
                pids_limit_hits: 17
            }
        );
        assert_eq!(cg.pids("s"), vec![12, 13]);
        cg.freeze("s", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
            "1"
        );
        cg.freeze("s", false).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
            "0"
        );
        // Frozen is what the kernel reports, not what was asked.
        std::fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(!cg.is_frozen("s").unwrap());
        assert!(
            cg.freeze_and_wait("s", std::time::Duration::from_millis(20))
                .is_err()
        );
        std::fs::write(d.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cg.freeze_and_wait("s", std::time::Duration::from_millis(20))
            .unwrap();
        // The kernel's interface files are not removable; a fake tree has to drop them first.
        for f in std::fs::read_dir(&d).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        cg.remove("s").unwrap();
        assert!(!d.exists());
    }

    #[test]
    fn v1_needs_its_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let e = Cgroups::detect(dir.path()).unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
        for c in V1_CONTROLLERS {
            std::fs::create_dir(dir.path().join(c)).unwrap();
        }
        let cg = Cgroups::detect(dir.path()).unwrap();
        cg.create(
            "s",
            Limits {
                memory_bytes: 10,
                pids: 5,
                cpus: 4,
            },
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pids/slipway/s/pids.max")).unwrap(),
            "5"
        );
        let cpu = dir.path().join("cpu/slipway/s");
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
            "400000"
        );
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.shares")).unwrap(),
            "2048"
        );
        assert_eq!(cg.procs_files("s").len(), 5);
        let d = dir.path().join("memory/slipway/s");
        std::fs::write(
            d.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.usage_in_bytes"), "100").unwrap();
        std::fs::write(dir.path().join("cpuacct/slipway/s/cpuacct.usage"), "2000").unwrap();
        std::fs::write(dir.path().join("pids/slipway/s/pids.current"), "2").unwrap();
        std::fs::write(dir.path().join("pids/slipway/s/pids.events"), "max 9").unwrap();
        let s = cg.stats("s").unwrap();
        assert_eq!(
            (s.oom_kills, s.pids_limit_hits, s.cpu_usage_ns),
            (3, 9, 2000)
        );
    }
}
