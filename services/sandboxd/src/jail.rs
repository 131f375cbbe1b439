//! Running a command inside a sandbox: bubblewrap with the sandbox's directory at `/workspace`,
//! a read-only system, its own PID, IPC and UTS namespaces, and an environment made only of the
//! sandbox's own variables (no host secrets, no sandboxd key).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The system paths a sandbox sees, read-only, when they exist on the host.
const READ_ONLY: &[&str] = &["/usr", "/opt"];
const ETC: &[&str] = &[
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/mime.types",
];
const SYMLINKS: &[(&str, &str)] = &[
    ("usr/bin", "/bin"),
    ("usr/sbin", "/sbin"),
    ("usr/lib", "/lib"),
    ("usr/lib64", "/lib64"),
];
const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

#[derive(Clone, Debug)]
pub struct Jail {
    bwrap: PathBuf,
}

impl Jail {
    /// Finds bubblewrap; sandboxd does not run sandboxes without it.
    pub fn detect() -> anyhow::Result<Jail> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bwrap = std::env::split_paths(&path)
            .map(|d| d.join("bwrap"))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "bubblewrap (`bwrap`) not found: sandboxd runs every sandbox process under it \
                     (Debian: apt-get install bubblewrap)"
                )
            })?;
        Ok(Jail { bwrap })
    }

    /// A command that runs `sh -c <command>` in the sandbox whose files are at `workspace`,
    /// in `cwd` (a path inside `/workspace`), with `env` on top of the sandbox's own.
    pub fn command(
        &self,
        workspace: &Path,
        cwd: &str,
        env: &BTreeMap<String, String>,
        command: &str,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bwrap);
        for dir in READ_ONLY.iter().chain(ETC) {
            if Path::new(dir).exists() {
                cmd.args(["--ro-bind", dir, dir]);
            }
        }
        for (target, link) in SYMLINKS {
            cmd.args(["--symlink", target, link]);
        }
        cmd.args(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"])
            .arg("--bind")
            .arg(workspace)
            .arg(crate::paths::WORKSPACE)
            .args(["--chdir", cwd])
            .args([
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ])
            .args(["--hostname", "sandbox", "--die-with-parent", "--clearenv"])
            .args(["--setenv", "PATH", PATH])
            .args(["--setenv", "HOME", crate::paths::WORKSPACE])
            .args(["--setenv", "LANG", "C.UTF-8"]);
        for (k, v) in env {
            cmd.arg("--setenv").arg(k).arg(v);
        }
        cmd.args(["--", "/bin/sh", "-c", command])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }
}
