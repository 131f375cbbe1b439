//! sandboxd: a MIOSA-compatible sandbox host for one machine, the embedded default the executor
//! talks to when no MIOSA key is configured. It answers the subset of MIOSA's REST API the app
//! lifecycle uses (`../shared/miosa-api.md`; the official Python SDK is the reference client).
#![forbid(unsafe_code)]

pub mod api;
pub mod clock;
pub mod deployments;
pub mod edge;
pub mod events;
pub mod exec;
pub mod files;
pub mod grants;
pub mod host;
pub mod isolation;
pub mod jail;
pub mod journal;
pub mod model;
pub mod paths;
pub mod processes;
pub mod proclog;
pub mod quotas;
pub mod rollup;
pub mod rooted;
pub mod serve;
pub mod snapshots;
pub mod storage;
pub mod store;
pub mod templates;
pub mod tools;
pub mod usage;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "slipway-sandboxd",
    version,
    about = "A MIOSA-compatible sandbox host"
)]
pub struct Args {
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:7070", env = "SANDBOXD_LISTEN")]
    pub listen: SocketAddr,
    /// A host name the API answers to besides IP addresses and `localhost` (repeatable; a
    /// Kubernetes Service name, say). Other `Host` headers are refused (DNS rebinding).
    #[arg(
        long = "api-hostname",
        env = "SANDBOXD_API_HOSTNAMES",
        value_delimiter = ','
    )]
    pub api_hostnames: Vec<String>,
    /// How long a client has to send a request's headers, on the API and the edge, in
    /// milliseconds; a connection that takes longer is closed.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Where the edge (previews and shares, by host name) listens.
    #[arg(long, default_value = "127.0.0.1:7071", env = "SANDBOXD_EDGE_LISTEN")]
    pub edge_listen: SocketAddr,
    /// The base domain of preview host names: `<port>-<sandbox>-<secret>.preview.<domain>`.
    /// Browsers resolve `*.localhost` to loopback by themselves.
    #[arg(long, default_value = "localhost", env = "SANDBOXD_EDGE_DOMAIN")]
    pub edge_domain: String,
    /// The edge's base URL as browsers reach it, when something fronts it (an Ingress on 443
    /// with a wildcard name): `https://sandboxes.example.com`. Its host becomes the base domain.
    #[arg(long, env = "SANDBOXD_EDGE_PUBLIC_URL")]
    pub edge_public_url: Option<String>,
    /// A JSON price table for `/usage` and credit quotas: `{"vcpu_second_cents": …,
    /// "storage_gb_hour_cents": …}` (defaults: 0.0014 and 0.014).
    #[arg(long, env = "SANDBOXD_PRICE_TABLE")]
    pub price_table: Option<PathBuf>,
    /// Where sandboxes and their state live.
    #[arg(long, default_value = "./sandboxd-data", env = "SANDBOXD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// A file with the accepted API keys, one `msk_...` per line. Without it any `msk_` key is
    /// accepted, and only while listening on loopback.
    #[arg(long, env = "SANDBOXD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Run sandbox processes without bubblewrap, network namespaces or cgroups: for machines
    /// that cannot isolate, never for code from strangers.
    #[arg(long)]
    pub insecure_no_isolation: bool,
    /// Give sandboxes no outbound network access (by default they have it where the host does).
    #[arg(long)]
    pub no_outbound: bool,
    /// Where the cgroup hierarchies are mounted.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Caps every sandbox's memory, in MiB, below what its size gives (xs 2048 to xl 32768).
    #[arg(long)]
    pub memory_limit_mb: Option<u64>,
    /// Caps every sandbox's disk, in MiB, below what its size gives (10240 to 81920).
    #[arg(long)]
    pub disk_limit_mb: Option<u64>,
    /// CPUs no single sandbox may take, kept for sandboxd and the other sandboxes: a sandbox's
    /// CPU quota is its size's vCPUs, but at most the host's CPUs less these (at least one).
    #[arg(long, default_value_t = 1)]
    pub reserved_cpus: u64,
    /// The host uid (and gid) that is root inside sandboxes: the only id their user namespaces
    /// map. It owns their files on the host and must belong to no one else.
    #[arg(long, default_value_t = jail::DEFAULT_SANDBOX_UID)]
    pub sandbox_uid: u32,
    /// Most processes (and threads) in one sandbox.
    #[arg(long, default_value_t = 1024)]
    pub pids_limit: u64,
    /// How often idle and expired sandboxes are looked for, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub idle_check_ms: u64,
    /// Where sandbox files live: `btrfs` (snapshots and forks are subvolume snapshots), `copy`
    /// (works anywhere, slow), or `auto` (btrfs when it can be had).
    #[arg(long, value_enum, default_value_t = storage::Choice::Auto)]
    pub storage: storage::Choice,
    /// Size of the sparse btrfs image created under the data dir, in GiB.
    #[arg(long, default_value_t = 20)]
    pub btrfs_image_gb: u64,
    /// Network namespaces kept ready for new sandboxes.
    #[arg(long, default_value_t = 4)]
    pub net_pool: usize,
    /// Remove the host resources (cgroups, network namespaces) of every sandbox in the data
    /// directory, then exit; the records and files stay.
    #[arg(long)]
    pub purge: bool,
}

/// Sets up what confines sandboxes on this host, for sandbox files kept in `storage`.
pub fn isolation(args: &Args, storage: &storage::Storage) -> anyhow::Result<host::Isolation> {
    let (pids, memory_cap_mb, disk_cap_mb) =
        (args.pids_limit, args.memory_limit_mb, args.disk_limit_mb);
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let max_cpus = host_cpus.saturating_sub(args.reserved_cpus).max(1);
    if args.insecure_no_isolation {
        eprintln!(
            "slipway-sandboxd: WARNING: --insecure-no-isolation: sandbox processes run on the host \
             with no namespaces and no limits; never run code from strangers like this"
        );
        return Ok(host::Isolation {
            jail: jail::Jail::None,
            cgroups: None,
            net: None,
            pids,
            memory_cap_mb,
            disk_cap_mb,
            max_cpus,
        });
    }
    let owner = jail::Owner {
        uid: args.sandbox_uid,
        gid: args.sandbox_uid,
    };
    if owner.uid == 0 {
        anyhow::bail!("--sandbox-uid 0 would make root inside a sandbox root on the host");
    }
    let jail = jail::Jail::detect(
        owner,
        &args.data_dir.join("seccomp"),
        storage.root().to_path_buf(),
        isolation::view::path(&args.data_dir)?,
    )?;
    // `--purge` only takes things down: no view to mount for it.
    if !args.purge {
        isolation::view::mount(&args.data_dir, storage.root(), owner)
            .map_err(|e| anyhow::anyhow!("the sandboxes' view of their files: {e}"))?;
    }
    let cgroups = isolation::cgroup::Cgroups::detect(&args.cgroup_root)
        .map_err(|e| anyhow::anyhow!("cgroups: {e} (or pass --insecure-no-isolation)"))?;
    let net = isolation::net::Net::init(!args.no_outbound, &args.data_dir).map_err(|e| {
        anyhow::anyhow!("network namespaces: {e} (or pass --insecure-no-isolation)")
    })?;
    tracing::info!(cgroups = ?cgroups, outbound = net.outbound, sandbox_uid = owner.uid, "sandboxes isolated");
    Ok(host::Isolation {
        jail,
        cgroups: Some(cgroups),
        net: Some(net),
        pids,
        memory_cap_mb,
        disk_cap_mb,
        max_cpus,
    })
}

/// The data directory is root's alone: keys, grants, records and sandbox files are under it.
fn private_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Which bearer keys the API accepts.
#[derive(Clone, Debug)]
pub enum KeyPolicy {
    /// Exactly these keys.
    Listed(Vec<String>),
    /// Any key with the `msk_` prefix (loopback only).
    AnyMsk,
}

impl KeyPolicy {
    pub fn accepts(&self, key: &str) -> bool {
        match self {
            KeyPolicy::Listed(keys) => keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), key.as_bytes())),
            KeyPolicy::AnyMsk => key.starts_with("msk_") && key.len() > 4,
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decides the key policy; refuses to accept any key on a non-loopback address.
pub fn key_policy(args: &Args) -> anyhow::Result<KeyPolicy> {
    match &args.api_keys_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", path.display()))?;
            let keys: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            if keys.is_empty() || keys.iter().any(|k| !k.starts_with("msk_")) {
                anyhow::bail!(
                    "--api-keys-file {}: one `msk_...` key per line",
                    path.display()
                );
            }
            Ok(KeyPolicy::Listed(keys))
        }
        None if args.listen.ip().is_loopback() => Ok(KeyPolicy::AnyMsk),
        None => anyhow::bail!(
            "listening on {} needs --api-keys-file: any `msk_` key is accepted only on loopback",
            args.listen
        ),
    }
}

pub fn main(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slipway-sandboxd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slipway-sandboxd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let policy = key_policy(&args)?;
    if matches!(policy, KeyPolicy::AnyMsk) {
        eprintln!("slipway-sandboxd: no --api-keys-file: accepting any `msk_` key (loopback only)");
    }
    private_data_dir(&args.data_dir)?;
    let (storage, why) = storage::Storage::open(&args.data_dir, args.storage, args.btrfs_image_gb)?;
    storage.secure()?;
    eprintln!("slipway-sandboxd: storage: {why}");
    let prices = match &args.price_table {
        Some(path) => rollup::Prices::load(path)?,
        None => rollup::Prices::default(),
    };
    let host = host::Host::open(
        &args.data_dir,
        isolation(&args, &storage)?,
        storage,
        prices,
        args.purge,
    )?;
    if args.purge {
        host.purge().await;
        return Ok(());
    }
    let stop = CancellationToken::new();
    // Keeps a few network namespaces ready, so a create does not wait for them; stops with
    // sandboxd, between two refills, so the pool can be released whole.
    let refill = host.iso.net.is_some().then(|| {
        let (host, stop) = (host.clone(), stop.clone());
        let size = args.net_pool;
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let h = host.clone();
                let refilled = tokio::task::spawn_blocking(move || {
                    h.iso.net.as_ref().map(|n| n.refill(size)).transpose()
                })
                .await;
                if let Ok(Err(e)) = refilled {
                    tracing::warn!(error = %e, "refilling the network pool");
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
        })
    });
    {
        let host = host.clone();
        let every = std::time::Duration::from_millis(args.idle_check_ms.max(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Each pass on a task of its own: one that fails (panics) is logged, and the
                // next pass runs all the same.
                let h = host.clone();
                if let Err(e) = tokio::spawn(async move { h.reap_idle().await }).await {
                    tracing::error!(error = %e, "a pass of the idle reaper failed");
                }
                let h = host.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || {
                    h.sample_all_usage();
                    h.enforce_all_retention();
                })
                .await
                {
                    tracing::error!(error = %e, "a pass of usage sampling failed");
                }
            }
        });
    }
    {
        let stop = stop.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop.cancel();
        });
    }
    let header_timeout = std::time::Duration::from_millis(args.header_timeout_ms.max(1));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let edge_listener = std::net::TcpListener::bind(args.edge_listen)
        .map_err(|e| anyhow::anyhow!("--edge-listen {}: {e}", args.edge_listen))?;
    let edge_addr = edge_listener.local_addr()?;
    let links = std::sync::Arc::new(edge::Links::new(
        args.edge_public_url.as_deref(),
        &args.edge_domain,
        edge_addr,
    )?);
    let grants = std::sync::Arc::new(
        grants::Grants::open(&args.data_dir)
            .map_err(|e| anyhow::anyhow!("the edge's grants: {e}"))?,
    );
    let deployments = std::sync::Arc::new(
        deployments::Deployments::open(&args.data_dir)
            .map_err(|e| anyhow::anyhow!("deployments: {e}"))?,
    );
    let state = api::AppState::new(
        host.clone(),
        policy,
        grants.clone(),
        links.clone(),
        deployments.clone(),
        args.api_hostnames.clone(),
    );
    let edge_thread = edge::spawn(
        edge_listener,
        edge::EdgeState {
            host: host.clone(),
            grants,
            links,
            deployments,
            pool: std::sync::Arc::new(edge::Pool::default()),
        },
        header_timeout,
        stop.clone(),
    )?;
    // Two lines callers read: the API's base URL, then the edge's address.
    println!("http://{addr}/api/v1");
    println!("edge http://{edge_addr}");
    serve::http1(listener, api::router(state), header_timeout, stop.clone()).await?;
    let _ = tokio::task::spawn_blocking(move || edge_thread.join()).await;
    // Sandbox processes die with sandboxd (their jails are tied to it); end them cleanly first,
    // frozen ones included.
    host.shutdown().await;
    // The pool's namespaces belong to no sandbox: released, so stopped sandboxds leave none.
    if let Some(refill) = refill {
        let _ = refill.await;
    }
    if let Some(net) = &host.iso.net {
        net.drain_pool();
    }
    Ok(())
}
