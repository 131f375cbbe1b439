//! Networking: each sandbox has its own network namespace (`ip netns`, so it survives a sandboxd
//! restart), with its own loopback; a sandbox and its fork can both serve on port 3000. Outbound
//! access, where the host has a default route and the sandbox's policy allows it, goes through a
//! veth pair and NAT. Sandboxes can reach neither the host (any of its addresses, so not
//! sandboxd's API, not NATS) nor each other nor private ranges; sandboxd reaches their ports
//! from inside their namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Sandbox addresses: a /30 per sandbox in 10.233.0.0/16.
pub const SUBNET: &str = "10.233.0.0/16";
/// Destinations sandboxes never reach, even with outbound access: private, link-local (cloud
/// metadata), shared and loopback ranges.
pub const BLOCKED: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
];
/// Where the kernel keeps IPv6 settings per interface (of the reader's network namespace).
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// The highest sandbox index (16384 /30 blocks in a /16, the first unused).
pub const MAX_INDEX: u32 = 16_383;

/// Pooled namespaces: `ready` ones, and `claimed` ones being set up. Written before a namespace
/// is created, so a crash at any point leaves nothing that no file remembers.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Pool {
    ready: Vec<u32>,
    claimed: Vec<u32>,
}

#[derive(Debug)]
pub struct Net {
    /// Whether NAT for outbound access is set up on this host.
    pub outbound: bool,
    /// Namespaces set up ahead of time (with outbound access), so creating a sandbox does not
    /// wait for `ip`; recorded in `pool_file` so a restart reuses them.
    pool: std::sync::Mutex<Pool>,
    pool_file: PathBuf,
    /// Who this sandboxd is (its data dir), written in the claim of every index it takes.
    owner: String,
}

/// Claims of namespace indices, host-wide: a file per index naming the sandboxd that owns it,
/// created exclusively. A sandboxd only reuses or removes namespaces it owns, so several of them
/// on one host (tests run many) never touch each other's.
const CLAIMS: &str = "/run/slipway-netns";

/// Runs `ip [-n ns] -batch -` with `commands`, one process for many changes.
fn ip_batch(ns: Option<&str>, commands: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("ip stdin"))?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "`ip -batch` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> std::io::Result<()> {
    let ns = std::fs::File::open(path)?;
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// Turns IPv6 off for `interface` in the calling thread's network namespace (on a link before
/// it is up, so it never gets an address); a host without IPv6 has nothing to turn off.
fn disable_ipv6(interface: &str) -> std::io::Result<()> {
    let file = Path::new(IPV6_CONF).join(interface).join("disable_ipv6");
    match std::fs::write(file, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn run(args: &[&str]) -> std::io::Result<()> {
    crate::tools::run(args).map(|_| ())
}

/// `iptables [-t table] <rule>`, added once (checked with `-C` first).
fn ensure_rule(table: &str, chain: &str, insert: bool, rule: &[&str]) -> std::io::Result<()> {
    ensure_rule_with("iptables", table, chain, insert, rule)
}

/// The same with `ip6tables` or `iptables`.
fn ensure_rule_with(
    bin: &str,
    table: &str,
    chain: &str,
    insert: bool,
    rule: &[&str],
) -> std::io::Result<()> {
    let mut check = vec![bin, "-w", "-t", table, "-C", chain];
    check.extend_from_slice(rule);
    if run(&check).is_ok() {
        return Ok(());
    }
    let mut add = vec![
        bin,
        "-w",
        "-t",
        table,
        if insert { "-I" } else { "-A" },
        chain,
    ];
    if insert {
        add.push("1");
    }
    add.extend_from_slice(rule);
    run(&add)
}

impl Net {
    /// Sets up the host side once: the firewall that keeps sandboxes off the host and each other
    /// (always), and NAT for outbound access when `want_outbound` and the host has a default route.
    pub fn init(want_outbound: bool, data_dir: &std::path::Path) -> std::io::Result<Net> {
        run(&["ip", "netns", "list"])?;
        let firewall = (|| -> std::io::Result<()> {
            ensure_rule("filter", "INPUT", true, &["-s", SUBNET, "-j", "DROP"])?;
            for dst in BLOCKED {
                ensure_rule(
                    "filter",
                    "FORWARD",
                    true,
                    &["-s", SUBNET, "-d", dst, "-j", "DROP"],
                )?;
            }
            ensure_rule("filter", "FORWARD", false, &["-s", SUBNET, "-j", "ACCEPT"])?;
            ensure_rule(
                "filter",
                "FORWARD",
                false,
                &[
                    "-d",
                    SUBNET,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                    "-j",
                    "ACCEPT",
                ],
            )?;
            ensure_rule(
                "nat",
                "POSTROUTING",
                false,
                &["-s", SUBNET, "!", "-d", SUBNET, "-j", "MASQUERADE"],
            )
        })();
        if let Err(e) = Self::ipv6_firewall() {
            tracing::warn!(error = %e, "no IPv6 firewall for sandbox links (IPv6 stays off on them)");
        }
        let has_default_route = Command::new("ip")
            .args(["-4", "route", "show", "default"])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        let outbound = match firewall {
            Ok(()) if want_outbound && has_default_route => {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                true
            }
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "no firewall for sandbox networking (iptables): outbound access stays off");
                false
            }
        };
        let pool_file = data_dir.join("netpool.json");
        let saved: Pool = crate::store::read_json(&pool_file)?.unwrap_or_default();
        std::fs::create_dir_all(CLAIMS)?;
        let owner = std::fs::canonicalize(data_dir)?.display().to_string();
        let net = Net {
            outbound,
            pool: std::sync::Mutex::new(Pool::default()),
            pool_file,
            owner,
        };
        // Whatever a previous sandboxd claimed and that exists is finished and kept.
        let mut ready = Vec::new();
        for index in saved.ready.into_iter().chain(saved.claimed) {
            if !Self::ns_path(index).exists() || !net.owns(index) {
                continue;
            }
            match net.setup(index, true) {
                Ok(()) => ready.push(index),
                Err(_) => {
                    let _ = net.remove(index);
                }
            }
        }
        net.with_pool(|p| p.ready = ready);
        Ok(net)
    }

    /// IPv6 is off on both ends of every sandbox link (see `setup`); these rules hold it off
    /// should anything turn it back on: nothing that comes in from a sandbox link reaches the
    /// host or is forwarded. No-op on hosts without IPv6.
    fn ipv6_firewall() -> std::io::Result<()> {
        if !Path::new(IPV6_CONF).exists() {
            return Ok(());
        }
        let from_sandbox = ["-i", "swh+", "-j", "DROP"];
        ensure_rule_with("ip6tables", "filter", "INPUT", true, &from_sandbox)?;
        ensure_rule_with("ip6tables", "filter", "FORWARD", true, &from_sandbox)
    }

    /// Changes the pool and saves it.
    fn with_pool<T>(&self, change: impl FnOnce(&mut Pool) -> T) -> T {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let out = change(&mut pool);
        if let Err(e) = crate::store::write_json(&self.pool_file, &*pool) {
            tracing::warn!(error = %e, "saving the network pool");
        }
        out
    }

    /// A namespace for a new sandbox: a pooled one when it wants outbound access, else a fresh
    /// one. The index is the sandbox's for life.
    /// Also says whether the namespace is set up already (a pooled one is).
    pub fn take(&self, outbound: bool) -> std::io::Result<(u32, bool)> {
        if outbound
            && self.outbound
            && let Some(index) = self.with_pool(|p| p.ready.pop())
        {
            return Ok((index, true));
        }
        self.allocate().map(|i| (i, false))
    }

    /// Tops the pool up to `size` ready namespaces (blocking: run it off the async runtime).
    pub fn refill(&self, size: usize) -> std::io::Result<()> {
        if !self.outbound {
            return Ok(());
        }
        let mut candidate = 1;
        while self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready
            .len()
            < size
        {
            while candidate <= MAX_INDEX && Self::ns_path(candidate).exists() {
                candidate += 1;
            }
            if candidate > MAX_INDEX {
                return Err(std::io::Error::other(
                    "every sandbox network index is taken",
                ));
            }
            let index = candidate;
            candidate += 1;
            if !self.claim(index) {
                // Another sandboxd took it first.
                continue;
            }
            self.with_pool(|p| p.claimed.push(index));
            if let Err(e) = self.setup(index, true) {
                let _ = self.remove(index);
                self.with_pool(|p| p.claimed.retain(|i| *i != index));
                return Err(e);
            }
            self.with_pool(|p| {
                p.claimed.retain(|i| *i != index);
                p.ready.push(index);
            });
        }
        Ok(())
    }

    /// Removes the pooled namespaces (`--purge`).
    pub fn drain_pool(&self) {
        let all = self.with_pool(|p| {
            let all: Vec<u32> = p.ready.drain(..).chain(p.claimed.drain(..)).collect();
            all
        });
        for index in all {
            let _ = self.remove(index);
        }
    }

    pub fn ns_name(index: u32) -> String {
        format!("slipway-{index}")
    }

    pub fn ns_path(index: u32) -> PathBuf {
        PathBuf::from("/run/netns").join(Self::ns_name(index))
    }

    /// The host side and the sandbox side of sandbox `index`'s /30.
    pub fn addresses(index: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = index * 4;
        let hi = u8::try_from((base >> 8) & 0xff).unwrap_or(0);
        let lo = u8::try_from(base & 0xff).unwrap_or(0);
        (
            Ipv4Addr::new(10, 233, hi, lo + 1),
            Ipv4Addr::new(10, 233, hi, lo + 2),
        )
    }

    /// Takes a free namespace index. Creating the namespace is the claim, so several sandboxd
    /// processes on one host (tests do that) never share one.
    pub fn allocate(&self) -> std::io::Result<u32> {
        for index in 1..=MAX_INDEX {
            if Self::ns_path(index).exists() || !self.claim(index) {
                continue;
            }
            if run(&["ip", "netns", "add", &Self::ns_name(index)]).is_ok() {
                return Ok(index);
            }
            self.release(index);
        }
        Err(std::io::Error::other(
            "every sandbox network index is taken",
        ))
    }

    /// Sets up the namespace of sandbox `index`: loopback, and with outbound access a veth pair
    /// to the host, with IPv6 off at both ends (no link-local address, so a host service on
    /// `::` has no address a sandbox could reach it at). Idempotent, so a restart completes
    /// what a crash left half done, and namespaces pooled by an older sandboxd are brought up
    /// to the same rules.
    pub fn setup(&self, index: u32, outbound: bool) -> std::io::Result<()> {
        let ns = Self::ns_name(index);
        if !Self::ns_path(index).exists() {
            run(&["ip", "netns", "add", &ns])?;
        }
        let has_eth0 = run(&["ip", "-n", &ns, "link", "show", "eth0"]).is_ok();
        let wants_eth0 = outbound && self.outbound;
        if has_eth0 && !wants_eth0 {
            // A pooled namespace given to a sandbox without outbound access.
            run(&["ip", "-n", &ns, "link", "del", "eth0"])?;
        }
        let host_if = format!("swh{index}");
        if wants_eth0 && !has_eth0 {
            let (host, sandbox) = Self::addresses(index);
            let _ = run(&["ip", "link", "del", &host_if]);
            // Links made from here on in the namespace start with IPv6 off; its loopback keeps
            // `::1`, which is its own.
            Self::ipv6_off(index, "default")?;
            // The peer is born inside the namespace, already named eth0.
            run(&[
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            disable_ipv6(&host_if)?;
            Self::ipv6_off(index, "eth0")?;
            ip_batch(
                None,
                &format!("addr add {host}/30 dev {host_if}\nlink set {host_if} up\n"),
            )?;
            ip_batch(
                Some(&ns),
                &format!(
                    "link set lo up\naddr add {sandbox}/30 dev eth0\nlink set eth0 up\nroute add default via {host}\n"
                ),
            )?;
        } else {
            if wants_eth0 {
                disable_ipv6(&host_if)?;
                Self::ipv6_off(index, "default")?;
                Self::ipv6_off(index, "eth0")?;
                // Addresses the link already had go with IPv6.
            }
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Turns IPv6 off for `interface` (or `default`: links made later) inside sandbox `index`'s
    /// namespace, from a thread that enters it (network settings under `/proc/sys/net` are
    /// those of the reader's namespace).
    fn ipv6_off(index: u32, interface: &str) -> std::io::Result<()> {
        let interface = interface.to_string();
        Self::in_namespace(index, move || disable_ipv6(&interface))
    }

    /// Runs `f` on a fresh thread inside sandbox `index`'s network namespace (never a pooled
    /// thread: it changes namespace and then ends).
    fn in_namespace<T: Send + 'static>(
        index: u32,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let path = Self::ns_path(index);
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    }

    /// Removes the namespace (its veth pair goes with it), if this sandboxd owns it.
    pub fn remove(&self, index: u32) -> std::io::Result<()> {
        if !self.owns(index) {
            return Ok(());
        }
        if Self::ns_path(index).exists() {
            run(&["ip", "netns", "del", &Self::ns_name(index)])?;
        }
        self.release(index);
        Ok(())
    }

    fn claim_path(index: u32) -> PathBuf {
        PathBuf::from(CLAIMS).join(index.to_string())
    }

    /// Takes index `index` for this sandboxd, if nobody holds it. The claim appears with its
    /// owner already in it (a hard link of a written file), so a crash never leaves an empty one.
    fn claim(&self, index: u32) -> bool {
        let tmp = PathBuf::from(CLAIMS).join(format!(
            ".{index}.{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        if std::fs::write(&tmp, self.owner.as_bytes()).is_err() {
            return false;
        }
        let claimed = std::fs::hard_link(&tmp, Self::claim_path(index)).is_ok();
        let _ = std::fs::remove_file(&tmp);
        claimed
    }

    /// Removes every namespace this sandboxd holds, its sandboxes', its pool's and any it
    /// claimed but was stopped before recording (`--purge`).
    pub fn remove_all_owned(&self) {
        let Ok(dir) = std::fs::read_dir(CLAIMS) else {
            return;
        };
        for index in dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let _ = self.remove(index);
        }
    }

    /// Whether this sandboxd holds index `index`.
    pub fn owns(&self, index: u32) -> bool {
        std::fs::read_to_string(Self::claim_path(index)).is_ok_and(|o| o == self.owner)
    }

    fn release(&self, index: u32) {
        if self.owns(index) {
            let _ = std::fs::remove_file(Self::claim_path(index));
        }
    }

    /// Opens a TCP connection to `port` on the sandbox's own loopback, from inside its network
    /// namespace (a fresh thread enters it, so no other work runs there).
    pub async fn connect(index: u32, port: u16) -> std::io::Result<tokio::net::TcpStream> {
        let path = Self::ns_path(index);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let result = (|| -> std::io::Result<TcpStream> {
                enter(&path)?;
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })();
            let _ = tx.send(result);
        });
        let stream = rx
            .await
            .map_err(|_| std::io::Error::other("the namespace thread died"))??;
        tokio::net::TcpStream::from_std(stream)
    }
}
