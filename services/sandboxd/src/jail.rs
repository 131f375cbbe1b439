//! Running a command inside a sandbox: bubblewrap with the sandbox's directory at `/workspace`,
//! a read-only system, no capabilities, its own PID, IPC and UTS namespaces, the sandbox's own
//! network namespace, its cgroups joined before anything runs, and an environment made only of
//! the sandbox's own variables (no host secrets, no sandboxd key).

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

/// Joins the cgroups named by its arguments up to `--`, then runs the rest: so the process is
/// limited and accounted before it (or anything it forks) runs a single instruction of its own.
const JOIN_CGROUPS: &str =
    r#"while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;

#[derive(Clone, Debug)]
pub enum Jail {
    Bubblewrap {
        bwrap: PathBuf,
    },
    /// `--insecure-no-isolation`: plain processes on the host, in the sandbox's directory.
    None,
}

/// Where one sandbox's processes are confined, besides their files.
#[derive(Clone, Debug, Default)]
pub struct Confinement {
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// The sandbox's network namespace (`/run/netns/...`).
    pub netns: Option<PathBuf>,
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
                     (Debian: apt-get install bubblewrap), or pass --insecure-no-isolation"
                )
            })?;
        Ok(Jail::Bubblewrap { bwrap })
    }

    pub fn is_isolated(&self) -> bool {
        matches!(self, Jail::Bubblewrap { .. })
    }

    /// A command that runs `sh -c <command>` in the sandbox whose files are at `workspace`, in
    /// `cwd` (a path inside `/workspace`), with `env` on top of the sandbox's own.
    pub fn command(
        &self,
        workspace: &Path,
        confinement: &Confinement,
        cwd: &str,
        env: &BTreeMap<String, String>,
        command: &str,
    ) -> tokio::process::Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        match self {
            Jail::Bubblewrap { bwrap } => {
                if let Some(ns) = &confinement.netns {
                    argv.push("nsenter".into());
                    argv.push(format!("--net={}", ns.display()).into());
                    argv.push("--".into());
                }
                argv.push(bwrap.into());
                let mut push = |a: &str| argv.push(a.into());
                for dir in READ_ONLY.iter().chain(ETC) {
                    if Path::new(dir).exists() {
                        push("--ro-bind");
                        push(dir);
                        push(dir);
                    }
                }
                for (target, link) in SYMLINKS {
                    push("--symlink");
                    push(target);
                    push(link);
                }
                for a in ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"] {
                    push(a);
                }
                argv.push("--bind".into());
                argv.push(workspace.into());
                argv.push(crate::paths::WORKSPACE.into());
                let mut push = |a: &str| argv.push(a.into());
                for a in [
                    "--chdir",
                    cwd,
                    "--unshare-pid",
                    "--unshare-ipc",
                    "--unshare-uts",
                ] {
                    push(a);
                }
                for a in [
                    "--unshare-cgroup-try",
                    "--cap-drop",
                    "ALL",
                    "--hostname",
                    "sandbox",
                ] {
                    push(a);
                }
                for a in ["--die-with-parent", "--clearenv", "--setenv", "PATH", PATH] {
                    push(a);
                }
                for a in [
                    "--setenv",
                    "HOME",
                    crate::paths::WORKSPACE,
                    "--setenv",
                    "LANG",
                    "C.UTF-8",
                ] {
                    push(a);
                }
                for (k, v) in env {
                    push("--setenv");
                    push(k);
                    push(v);
                }
                for a in ["--", "/bin/sh", "-c", command] {
                    push(a);
                }
            }
            Jail::None => {
                for a in ["env", "-i", &format!("PATH={PATH}"), "LANG=C.UTF-8"] {
                    argv.push(a.into());
                }
                let mut home = std::ffi::OsString::from("HOME=");
                home.push(workspace);
                argv.push(home);
                for (k, v) in env {
                    argv.push(format!("{k}={v}").into());
                }
                for a in ["/bin/sh", "-c", command] {
                    argv.push(a.into());
                }
            }
        }
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(JOIN_CGROUPS).arg("sh");
        cmd.args(&confinement.cgroup_procs).arg("--").args(argv);
        if let Jail::None = self {
            let rel = cwd
                .strip_prefix(crate::paths::WORKSPACE)
                .unwrap_or("")
                .trim_start_matches('/');
            cmd.current_dir(workspace.join(rel));
        }
        cmd.env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }
}
