//! The hostile suite, part 1: code in a sandbox tries to reach the host (kernel settings,
//! set-user-id files, system calls, IPv6, CPU, disk) through nothing but the API, as a tenant
//! would. Each case failed against sandboxd before its fix. Network traffic stays on this
//! machine: a listener the test binds, reached (or not) over the sandbox's own veth.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

/// The default host uid that is root inside sandboxes (`--sandbox-uid`).
const SANDBOX_UID: u32 = 10_000 * 65_536;

/// The host path of a sandbox's workspace (btrfs storage, the default here).
fn workspace(sd: &Sandboxd, id: &str) -> PathBuf {
    sd.data_dir()
        .join("btrfs/sandboxes")
        .join(id)
        .join("workspace")
}

/// Runs `program` (a path) with `args` on the host as the unprivileged user 65534, with `groups`
/// as its only supplementary groups; returns (success, stdout + stderr).
fn as_nobody(groups: &[u32], program: &Path, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    // Through a shell, so the path is looked up as that user (setpriv finds it as root).
    let out = cmd
        .args(["/bin/sh", "-c", "exec \"$0\" \"$@\""])
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn kernel_settings_cannot_be_written_from_a_sandbox() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let before = std::fs::read_to_string("/proc/sys/kernel/printk_ratelimit").unwrap();
    let (code, _, err) = api
        .exec(
            &id,
            "echo $(cat /proc/sys/kernel/printk_ratelimit) > /proc/sys/kernel/printk_ratelimit",
        )
        .await;
    assert_ne!(code, 0, "a kernel setting was written: {err}");
    // Refused by the read-only mount itself, not only by file permissions.
    assert!(err.contains("Read-only file system"), "{err}");
    for setting in [
        "kernel/core_pattern",
        "vm/drop_caches",
        "fs/file-max",
        "kernel/printk_ratelimit",
        "net/ipv4/ip_forward",
    ] {
        let (code, out, _) = api
            .exec(
                &id,
                &format!("test -w /proc/sys/{setting} && echo writable || echo refused"),
            )
            .await;
        assert_eq!((code, out.trim()), (0, "refused"), "{setting}");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/printk_ratelimit").unwrap(),
        before
    );
    // Root inside is the sandbox uid outside: what it makes is that uid's, not root's.
    api.exec(&id, "touch /workspace/mine").await;
    let meta = std::fs::metadata(workspace(&sd, &id).join("mine")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (SANDBOX_UID, SANDBOX_UID));
    let (_, status, _) = api.exec(&id, "cat /proc/self/status").await;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
}

#[tokio::test]
async fn a_setuid_binary_made_inside_gives_no_privilege_on_the_host() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let (code, _, err) = api
        .exec(
            &id,
            "cp /usr/bin/id /workspace/myid && chmod 4755 /workspace/myid",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let host_path = workspace(&sd, &id).join("myid");
    let meta = std::fs::metadata(&host_path).unwrap();
    assert_eq!(
        meta.uid(),
        SANDBOX_UID,
        "set-user-id to the sandbox uid, never root"
    );

    // The data directory is root's alone: an unprivileged user cannot even reach the file.
    let data_mode = std::fs::metadata(sd.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(data_mode & 0o777, 0o700);
    let (ran, out) = as_nobody(&[], &host_path, &["-u"]);
    assert!(!ran && out.contains("Permission denied"), "{out}");

    // Where sandboxes reach their files, only the sandboxes' group passes; given that group,
    // the file runs, on a nosuid mount: with the caller's own uid.
    let view = glob_view(&id).join("myid");
    let (ran, out) = as_nobody(&[], &view, &["-u"]);
    assert!(
        !ran,
        "an unprivileged user reached the sandboxes' view: {out}"
    );
    let (ran, out) = as_nobody(&[SANDBOX_UID], &view, &["-u"]);
    assert!(ran, "{out}");
    assert_eq!(out.trim(), "65534", "the set-user-id bit took effect");

    // Through the API, a file's mode never carries set-user-id, set-group-id or sticky bits.
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "tool", "content": "#!/bin/sh\n", "mode": 0o7755}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let meta = std::fs::metadata(workspace(&sd, &id).join("tool")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!(meta.uid(), SANDBOX_UID);
}

/// The sandboxes' view of sandbox `id`'s workspace (under `/run/slipway-sandboxd/<key>/files`).
fn glob_view(id: &str) -> PathBuf {
    std::fs::read_dir("/run/slipway-sandboxd")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("files/sandboxes").join(id).join("workspace"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no view holds sandbox {id}"))
}

/// x86_64 system call numbers the suite tries.
#[cfg(target_arch = "x86_64")]
const SYSCALLS: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else os.strerror(ctypes.get_errno())
CLONE_NEWUSER = 0x10000000
print("mount", call(165, 0, 0, 0, 0, 0))
print("unshare_user", call(272, CLONE_NEWUSER))
print("clone_newuser", call(56, CLONE_NEWUSER | 17, 0, 0, 0, 0))
print("keyctl", call(250, 0, -3, 0, 0, 0))
print("add_key", call(248, 0, 0, 0, 0, 0))
print("bpf", call(321, 0, 0, 0))
print("ptrace", call(101, 16, 1, 0, 0))
print("io_uring_setup", call(425, 1, 0))
print("kexec_load", call(246, 0, 0, 0, 0))
print("init_module", call(175, 0, 0, 0))
print("perf_event_open", call(298, 0, 0, -1, -1, 0))
print("userfaultfd", call(323, 0))
print("clone3", call(435, 0, 0))
print("x32_getpid", call(0x40000000 | 39))
print("getpid", call(39))
"#;

#[cfg(target_arch = "x86_64")]
#[tokio::test]
async fn mounts_namespaces_keyrings_bpf_and_tracing_are_refused() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    for (command, what) in [
        ("mount -t tmpfs none /tmp", "mount"),
        ("unshare -U true", "a user namespace"),
        ("unshare -r true", "a mapped user namespace"),
        ("unshare -n true", "a network namespace"),
    ] {
        let (code, _, err) = api.exec(&id, command).await;
        assert_ne!(code, 0, "{what} was allowed: {err}");
    }
    let (status, _) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "sys.py", "content": SYSCALLS}),
        )
        .await;
    assert_eq!(status, 200);
    let (code, out, err) = api.exec(&id, "python3 sys.py").await;
    assert_eq!(code, 0, "{err}");
    let results: std::collections::BTreeMap<&str, &str> =
        out.lines().filter_map(|l| l.split_once(' ')).collect();
    for call in [
        "mount",
        "unshare_user",
        "clone_newuser",
        "keyctl",
        "add_key",
        "bpf",
        "ptrace",
        "io_uring_setup",
        "kexec_load",
        "init_module",
        "perf_event_open",
        "userfaultfd",
    ] {
        // EPERM from the seccomp filter (a missing capability alone would leave keyctl,
        // ptrace, io_uring and user namespaces open to an unprivileged user).
        assert_eq!(
            results.get(call).copied(),
            Some("Operation not permitted"),
            "{call}: {out}"
        );
    }
    assert_eq!(
        results.get("clone3").copied(),
        Some("Function not implemented"),
        "{out}"
    );
    assert_eq!(
        results.get("x32_getpid").copied(),
        Some("Function not implemented"),
        "{out}"
    );
    assert_eq!(results.get("getpid").copied(), Some("ok"), "{out}");
    // Threads and child processes still work (glibc falls back from clone3 to clone).
    let (code, out, err) = api
        .exec(
            &id,
            "node -e \"require('child_process').execSync('true'); console.log('child')\" && \
             python3 -c \"import threading; t=threading.Thread(target=print, args=('thread',)); t.start(); t.join()\"",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "child\nthread\n");
}

/// The link-local address the kernel gives an interface with this MAC (EUI-64), as it would
/// if IPv6 were on.
fn link_local(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    format!(
        "fe80::{:02x}{:02x}:{:02x}ff:fe{:02x}:{:02x}{:02x}",
        b[0] ^ 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

#[tokio::test]
async fn ipv6_is_off_on_sandbox_links_so_a_host_listener_on_any_address_is_unreachable() {
    if !Path::new("/proc/sys/net/ipv6").exists() {
        eprintln!("this host has no IPv6: nothing to hold");
        return;
    }
    // A host service on `::`, every IPv6 address of the host included.
    let listener = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let (_, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(v["data"]["allow_internet_access"], true, "{v}");

    // Inside: no IPv6 address but the sandbox's own loopback.
    let (code, out, _) = api.exec(&id, "ip -6 -o addr show dev eth0").await;
    assert_eq!((code, out.trim()), (0, ""), "eth0 has IPv6 addresses");
    let (_, route, _) = api.exec(&id, "ip -4 route show default").await;
    let gateway = route.split_whitespace().nth(2).unwrap().to_string();
    // The host's end of this sandbox's link: the interface holding the gateway address.
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "to", &gateway])
        .output()
        .unwrap();
    let host_if = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let out = Command::new("ip")
        .args(["-6", "-o", "addr", "show", "dev", &host_if])
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "the host end has IPv6 addresses: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mac = std::fs::read_to_string(format!("/sys/class/net/{host_if}/address")).unwrap();
    let target = link_local(mac.trim());

    // From inside, to where the host end's link-local address would be, and to the host's
    // loopback and IPv4 gateway for contrast.
    let try_connect = |addr: &str| {
        format!(
            "python3 -c \"import socket; s=socket.socket(socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET); s.settimeout(2); \
             print('open' if s.connect_ex(socket.getaddrinfo('{addr}', {port})[0][4]) == 0 else 'closed')\" 2>&1 | tail -n 1"
        )
    };
    for addr in [format!("{target}%eth0"), gateway.clone()] {
        let (_, out, _) = api.exec(&id, &try_connect(&addr)).await;
        assert_ne!(out.trim(), "open", "{addr} reached the host's listener");
    }
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "the host listener accepted a connection from the sandbox"
    );
    // Control: the listener does answer on the host itself.
    assert!(std::net::TcpStream::connect(("::1", port)).is_ok());
}

/// CPU time the kernel counted for a sandbox's cgroup, and how often it was throttled.
fn cpu_stat(id: &str) -> (u64, u64) {
    let v1 = PathBuf::from("/sys/fs/cgroup/cpu/slipway").join(id);
    let (usage, stat) = if v1.exists() {
        (
            std::fs::read_to_string(
                PathBuf::from("/sys/fs/cgroup/cpuacct/slipway")
                    .join(id)
                    .join("cpuacct.usage"),
            )
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap(),
            std::fs::read_to_string(v1.join("cpu.stat")).unwrap(),
        )
    } else {
        let dir = PathBuf::from("/sys/fs/cgroup/slipway").join(id);
        let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
        let usec = keyed(&stat, "usage_usec");
        (usec * 1000, stat)
    };
    (usage, keyed(&stat, "nr_throttled"))
}

fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_sandbox_gets_the_cpus_of_its_size_and_a_fork_bomb_leaves_its_neighbour_responsive() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);

    // An `xs` sandbox has one CPU, however many busy loops it runs.
    let burner = api
        .create(json!({"template_id": "node", "size": "xs"}))
        .await;
    let (_, v) = api.get(&format!("/sandboxes/{burner}")).await;
    assert_eq!(v["data"]["cpu_count"], 1, "{v}");
    let (status, _) = api
        .post(
            &format!("/sandboxes/{burner}/processes"),
            json!({"command": "for i in 1 2 3 4; do (while :; do :; done) & done; wait"}),
        )
        .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, _) = cpu_stat(&burner);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu1, throttled) = cpu_stat(&burner);
    let used = (cpu1 - cpu0) as f64 / t0.elapsed().as_nanos() as f64;
    assert!(
        throttled > 0,
        "four busy loops were never throttled at one CPU"
    );
    assert!(used < 1.3, "an xs sandbox used {used:.2} CPUs");
    api.delete(&format!("/sandboxes/{burner}")).await;

    // A fork bomb next door (every process forking forever, never giving up), in a sandbox
    // whose size asks for all of this machine's CPUs: it is held to the host's CPUs less one,
    // and the neighbour's commands still answer promptly.
    let bomb = api.sandbox().await;
    let neighbour = api.sandbox().await;
    let (status, _) = api
        .post(
            &format!("/sandboxes/{bomb}/processes"),
            json!({"command": "timeout 120 python3 -c 'import os\nwhile True:\n  try: os.fork()\n  except OSError: pass'"}),
        )
        .await;
    assert_eq!(status, 201);
    let mut saturated = false;
    for _ in 0..100 {
        let (_, v) = api.get(&format!("/sandboxes/{bomb}/resources")).await;
        if v["data"]["events"]["pids_limit_hits"].as_u64().unwrap() > 0 {
            saturated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saturated, "the bomb never reached the pids limit");
    let mut took = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let (code, _, _) = api.exec(&neighbour, "true").await;
        took.push(t.elapsed());
        assert_eq!(code, 0);
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!("neighbour `exec true` during a fork bomb: median {median:?}, all {took:?}");
    assert!(
        median < Duration::from_millis(200),
        "the neighbour's exec took {median:?} at the median"
    );
    let (status, _) = api.delete(&format!("/sandboxes/{bomb}")).await;
    assert_eq!(status, 200);
}

/// Writes past the disk size are refused, from a process inside and through the API, and the
/// sandbox goes on serving.
#[tokio::test]
async fn a_write_past_the_disk_size_is_refused_and_the_sandbox_still_serves() {
    let sd = Sandboxd::start(BIN, &["--disk-limit-mb", "64"]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let (_, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(v["data"]["disk_size_mb"], 64, "{v}");
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": "node -e \"require('http').createServer((q,s)=>s.end('up')).listen(3000)\""}),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    let (code, out, err) = api
        .exec(
            &id,
            "dd if=/dev/zero of=/workspace/big bs=1M count=100 conv=fsync",
        )
        .await;
    assert_ne!(code, 0, "100 MB written on a 64 MB disk: {out}");
    assert!(err.contains("Disk quota exceeded"), "{err}");

    let big = "x".repeat(2 * 1024 * 1024);
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "more.txt", "content": big}),
        )
        .await;
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"]["code"], "disk_full", "{v}");
    assert!(!workspace(&sd, &id).join("more.txt").exists());

    // Room made, the same write goes through; the dev server never stopped.
    let (code, _, err) = api.exec(&id, "rm /workspace/big && sync").await;
    assert_eq!(code, 0, "{err}");
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "more.txt", "content": big}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (_, v) = api.get(&format!("/sandboxes/{id}/ports/3000/probe")).await;
    assert_eq!(v["data"]["open"], true, "{v}");
}

/// The copy backend has no kernel quota: the API counts, and refuses what would not fit.
#[tokio::test]
async fn with_copy_storage_the_api_refuses_writes_past_the_disk_size() {
    let sd = Sandboxd::start(BIN, &["--storage", "copy", "--disk-limit-mb", "8"]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let five = "y".repeat(5 * 1024 * 1024);
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write-many"),
            json!({"files": [{"path": "a", "content": five}, {"path": "b", "content": five}]}),
        )
        .await;
    assert_eq!(status, 507, "{v}");
    let (status, _) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "a", "content": five}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "b", "content": five}),
        )
        .await;
    assert_eq!(status, 507, "{v}");
    // Rewriting a file frees what it replaces: the same 5 MB again fits.
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "a", "content": five}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (code, out, _) = api.exec(&id, "ls /workspace").await;
    assert_eq!((code, out.trim()), (0, "a"));
}

/// Namespace indices this sandboxd holds (claims in `/run/slipway-netns` naming its data dir)
/// and that exist.
fn owned_namespaces(data_dir: &Path) -> Vec<u32> {
    let owner = std::fs::canonicalize(data_dir)
        .unwrap()
        .display()
        .to_string();
    let mut out: Vec<u32> = std::fs::read_dir("/run/slipway-netns")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let index: u32 = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read_to_string(e.path()).ok()? == owner).then_some(index)
        })
        .filter(|i| Path::new(&format!("/run/netns/slipway-{i}")).exists())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_clean_stop_releases_the_namespace_pool_and_keeps_the_sandboxes() {
    let mut sd = Sandboxd::start(BIN, &["--net-pool", "3"]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while owned_namespaces(sd.data_dir()).len() < 4 {
        assert!(Instant::now() < deadline, "the pool never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = sd.terminate().unwrap();
    assert!(status.success(), "{status}");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sd.data_dir().join("sandboxes").join(&id).join("meta.json")).unwrap(),
    )
    .unwrap();
    let index = meta["net_index"].as_u64().unwrap() as u32;
    assert_eq!(
        owned_namespaces(sd.data_dir()),
        vec![index],
        "only the sandbox's own namespace is left"
    );
}
