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

/// Opens the seccomp programs as descriptors 5 to 7 (bubblewrap reads them from there), joins
/// the cgroups named by its arguments up to `--`, then runs the rest: so the process is limited
/// and accounted before it (or anything it forks) runs a single instruction of its own. The
/// descriptors are opened here, as root, so the programs stay readable by root only.
const PRELUDE: &str = r#"exec 5<"$1" 6<"$2" 7<"$3" || exit 125; shift 3; while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;
/// The descriptors `PRELUDE` opens.
const SECCOMP_FDS: [&str; 3] = ["5", "6", "7"];

/// The host uid and gid that are root inside every sandbox of this sandboxd: the only ids its
/// user namespace maps, so nothing a sandbox owns or runs is root on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The default: a 64 Ki block in the range systemd reserves for container user namespaces
/// (524288 to 1879048191), far from the ids hosts hand to people and services.
pub const DEFAULT_SANDBOX_UID: u32 = 10_000 * 65_536;

impl Default for Owner {
    fn default() -> Self {
        Owner {
            uid: DEFAULT_SANDBOX_UID,
            gid: DEFAULT_SANDBOX_UID,
        }
    }
}

impl Owner {
    /// Makes `path` (not a link it may be) the sandbox's own.
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
    }
}

#[derive(Clone, Debug)]
pub enum Jail {
    Bubblewrap(Box<Bubblewrap>),
    /// `--insecure-no-isolation`: plain processes on the host, in the sandbox's directory.
    None,
}

#[derive(Clone, Debug)]
pub struct Bubblewrap {
    pub bwrap: PathBuf,
    /// Who root inside is on the host.
    pub owner: Owner,
    /// The seccomp programs (see `isolation::seccomp`).
    pub seccomp: Vec<PathBuf>,
    /// Where sandbox files live for sandboxd (the storage root, under its private data dir),
    /// and where the same tree is mounted for the sandboxes' user to reach (`View`).
    pub files_root: PathBuf,
    pub view: PathBuf,
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
    /// Finds bubblewrap (sandboxd does not run sandboxes without it) and writes the seccomp
    /// programs under `seccomp_dir`.
    pub fn detect(
        owner: Owner,
        seccomp_dir: &Path,
        files_root: PathBuf,
        view: PathBuf,
    ) -> anyhow::Result<Jail> {
        let bwrap = find_bwrap()?;
        let seccomp = crate::isolation::seccomp::Filters::write(seccomp_dir)?.files;
        Ok(Jail::Bubblewrap(Box::new(Bubblewrap {
            bwrap,
            owner,
            seccomp,
            files_root,
            view,
        })))
    }

    pub fn is_isolated(&self) -> bool {
        matches!(self, Jail::Bubblewrap(_))
    }

    /// Who owns what sandboxd puts in a workspace: the sandbox's root, or nobody in particular
    /// (sandboxd's own user) without isolation.
    pub fn owner(&self) -> Option<Owner> {
        match self {
            Jail::Bubblewrap(b) => Some(b.owner),
            Jail::None => None,
        }
    }

    /// A command that runs `sh -c <command>` in the sandbox whose files are at `workspace`, in
    /// `cwd` (a path inside `/workspace`), with `env` on top of the sandbox's own.
    ///
    /// Isolated, the chain is: `sh` (as root: opens the seccomp programs, joins the cgroups),
    /// `nsenter` (joins the sandbox's network namespace, then becomes the sandbox's host uid
    /// with no groups and no capabilities), `bwrap` (a user namespace mapping root inside to
    /// that uid alone, with nested user namespaces disabled; its own mount, PID, IPC and UTS
    /// namespaces; the seccomp programs loaded last), then the command.
    pub fn command(
        &self,
        workspace: &Path,
        confinement: &Confinement,
        cwd: &str,
        env: &BTreeMap<String, String>,
        command: &str,
    ) -> tokio::process::Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        let mut seccomp: Vec<&Path> = Vec::new();
        match self {
            Jail::Bubblewrap(b) => {
                argv.push("nsenter".into());
                if let Some(ns) = &confinement.netns {
                    argv.push(format!("--net={}", ns.display()).into());
                }
                for a in [
                    format!("--setuid={}", b.owner.uid),
                    format!("--setgid={}", b.owner.gid),
                    "--".into(),
                ] {
                    argv.push(a.into());
                }
                argv.push(b.bwrap.clone().into());
                let mut push = |a: &str| argv.push(a.into());
                for a in [
                    "--unshare-user",
                    "--disable-userns",
                    "--uid",
                    "0",
                    "--gid",
                    "0",
                ] {
                    push(a);
                }
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
                // Kernel settings stay read-only whatever the user namespace would allow.
                for a in ["--ro-bind", "/proc/sys", "/proc/sys"] {
                    push(a);
                }
                argv.push("--bind".into());
                argv.push(b.reachable(workspace).into());
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
                for (fd, _) in SECCOMP_FDS.iter().zip(&b.seccomp) {
                    push("--add-seccomp-fd");
                    push(fd);
                }
                seccomp.extend(b.seccomp.iter().map(PathBuf::as_path));
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
        cmd.arg("-c").arg(PRELUDE).arg("sh");
        for n in 0..SECCOMP_FDS.len() {
            cmd.arg(seccomp.get(n).copied().unwrap_or(Path::new("/dev/null")));
        }
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

/// Where bubblewrap is (on `PATH`).
pub fn find_bwrap() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "bubblewrap (`bwrap`) not found: sandboxd runs every sandbox process under it \
                 (Debian: apt-get install bubblewrap), or pass --insecure-no-isolation"
            )
        })
}

impl Bubblewrap {
    /// `path` (under the storage root) as the sandboxes' user reaches it: through the view.
    /// Other paths (a benchmark's own directory) are taken as they are.
    fn reachable(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.files_root) {
            Ok(rest) => self.view.join(rest),
            Err(_) => path.to_path_buf(),
        }
    }
}
