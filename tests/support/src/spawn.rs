//! The spawn-the-service helper, in the image of zero2prod's `spawn_app`: a Slipway service with
//! its own nats-server (topology set up) and, where asked, its own sandboxd; in this process
//! (`in_process`, given the service's `serve`) or as its real binary (`process`). The handle
//! has its NATS client, its request/reply client and its bound health address: the service
//! reports it, so nothing guesses free ports.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use slipway_common::config::{Settings, Sources};
use slipway_common::{App, RpcClient, Service, Shutdown};

use crate::{NatsServer, Sandboxd, workspace_bin};

/// What to start.
pub struct Spawn {
    service: Service,
    sandboxd: bool,
    nats_url: Option<String>,
    env: Vec<(String, String)>,
}

/// A started service and what it runs on. Everything is stopped on drop.
pub struct Spawned {
    /// Its settings as environment variables (to start another replica the same way).
    pub env: Vec<(String, String)>,
    pub health: SocketAddr,
    pub nats_client: async_nats::Client,
    pub rpc: RpcClient,
    pub shutdown: Option<Shutdown>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    child: Option<Child>,
    // Dropped last: the service first, then what it runs on (none when the test brought its
    // own nats-server).
    pub sandboxd: Option<Sandboxd>,
    pub nats: Option<NatsServer>,
    _dir: tempfile::TempDir,
}

impl Spawn {
    pub fn new(service: Service) -> Self {
        Self {
            service,
            sandboxd: false,
            nats_url: None,
            env: Vec::new(),
        }
    }

    /// On the test's own nats-server (the topology is still set up on it).
    pub fn on_nats(mut self, nats: &NatsServer) -> Self {
        self.nats_url = Some(nats.url());
        self
    }

    /// Also a sandboxd, which the service's `platform.base_url` points at.
    pub fn with_sandboxd(mut self) -> Self {
        self.sandboxd = true;
        self
    }

    /// A setting, as its environment variable (`SLIPWAY__SECTION__KEY`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    #[allow(clippy::type_complexity)]
    async fn prepare(
        &self,
    ) -> Result<(
        Option<NatsServer>,
        String,
        Option<Sandboxd>,
        tempfile::TempDir,
        Vec<(String, String)>,
    )> {
        let (nats, url) = match &self.nats_url {
            Some(url) => (None, url.clone()),
            None => {
                let n = NatsServer::start()?;
                let url = n.url();
                (Some(n), url)
            }
        };
        let sandboxd = if self.sandboxd {
            Some(Sandboxd::start(workspace_bin("slipway-sandboxd")?, &[])?)
        } else {
            None
        };
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("platform.key");
        std::fs::write(&key, "msk_test_spawned")?;
        let mut env: Vec<(String, String)> = vec![
            ("SLIPWAY__NATS__URL".into(), url.clone()),
            ("SLIPWAY__HEALTH__LISTEN".into(), "127.0.0.1:0".into()),
            ("SLIPWAY__SETUP__VERIFY_INTERVAL_MS".into(), "200".into()),
            (
                "SLIPWAY__PLATFORM__API_KEY_FILE".into(),
                key.display().to_string(),
            ),
        ];
        if let Some(sd) = &sandboxd {
            env.push((
                "SLIPWAY__PLATFORM__BASE_URL".into(),
                sd.base_url().to_string(),
            ));
        }
        env.extend(self.env.iter().cloned());
        set_up_topology(&url, &env).await?;
        Ok((nats, url, sandboxd, dir, env))
    }

    /// Runs the service in this process with its `serve`, once its endpoints answer.
    pub async fn in_process<F, Fut>(self, serve: F) -> Result<Spawned>
    where
        F: FnOnce(App) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (nats, url, sandboxd, dir, env) = self.prepare().await?;
        let shutdown = Shutdown::new();
        let app = App::start(self.service, load(&env)?, shutdown.clone()).await?;
        let health = app.health_addr;
        let task = tokio::spawn(serve(app));
        let mut spawned = Spawned::new(env, health, &url, nats, sandboxd, dir).await?;
        spawned.shutdown = Some(shutdown);
        spawned.task = Some(task);
        spawned.ready().await?;
        Ok(spawned)
    }

    /// Runs the service's binary (`slipway-<service>`), once it is ready.
    pub async fn process(self) -> Result<Spawned> {
        let (nats, url, sandboxd, dir, env) = self.prepare().await?;
        let bin: PathBuf = workspace_bin(&format!("slipway-{}", self.service.as_str()))?;
        let mut command = Command::new(&bin);
        // Only the settings given here: none inherited from the test's own environment.
        for (key, _) in std::env::vars() {
            let inherited_setting = key.starts_with("SLIPWAY__")
                || key.starts_with("OTEL_")
                || key.starts_with("MIOSA_")
                || key == "NATS_URL"
                || key == "SLIPWAY_CONFIG";
            if inherited_setting {
                command.env_remove(key);
            }
        }
        let child = command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // Killed if anything below fails.
        let mut guard = ChildGuard(Some(child));
        let stderr = guard
            .0
            .as_mut()
            .and_then(|c| c.stderr.take())
            .context("no stderr")?;
        // Read the reported health address, and pass the rest of stderr on (so it shows when a
        // test fails), never letting the pipe fill.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(addr) = line.strip_prefix(slipway_common::cli::HEALTH_LINE) {
                    let _ = tx.send(addr.trim().to_string());
                    sent = true;
                } else {
                    eprintln!("{line}");
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .context("the service never reported its health address")?;
        let health: SocketAddr = addr
            .parse()
            .with_context(|| format!("health address {addr}"))?;
        let mut spawned = Spawned::new(env, health, &url, nats, sandboxd, dir).await?;
        spawned.child = guard.0.take();
        spawned.ready().await?;
        Ok(spawned)
    }
}

/// Sets up the topology of `env`'s settings on the nats-server at `url`, as a service's start
/// expects it (for tests and benchmarks that drive the streams themselves too). Answers the
/// settings and a client of that server.
pub async fn set_up_topology(
    url: &str,
    env: &[(String, String)],
) -> Result<(Settings, async_nats::Client)> {
    let settings = load(env)?;
    let client = async_nats::connect(url).await?;
    slipway_common::setup::apply(
        &async_nats::jetstream::new(client.clone()),
        &slipway_common::topology::Topology::new(&settings.setup),
        slipway_common::setup::Mode::CreateMissing,
    )
    .await?;
    Ok((settings, client))
}

fn load(env: &[(String, String)]) -> Result<Settings> {
    Ok(Settings::load(&Sources {
        env: env.iter().cloned().collect(),
        ..Default::default()
    })?)
}

impl Spawned {
    async fn new(
        env: Vec<(String, String)>,
        health: SocketAddr,
        url: &str,
        nats: Option<NatsServer>,
        sandboxd: Option<Sandboxd>,
        dir: tempfile::TempDir,
    ) -> Result<Self> {
        let nats_client = async_nats::connect(url).await?;
        Ok(Self {
            rpc: RpcClient::new(nats_client.clone(), Duration::from_secs(30)),
            env,
            health,
            nats_client,
            shutdown: None,
            task: None,
            child: None,
            sandboxd,
            nats,
            _dir: dir,
        })
    }

    /// `/readyz` answers 200 (bounded wait).
    pub async fn ready(&self) -> Result<()> {
        let http = crate::http();
        let url = format!("http://{}/readyz", self.health);
        for _ in 0..300 {
            if let Ok(r) = http.get(&url).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{url} never answered 200")
    }

    /// What its `/metrics` shows now (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.health);
        Ok(crate::http()
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Shuts the service down: SIGTERM to the process, or the in-process shutdown; waits for it.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(s) = &self.shutdown {
            s.trigger();
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        if let Some(child) = self.child.take() {
            let mut guard = ChildGuard(Some(child));
            let pid = guard
                .0
                .as_ref()
                .map(Child::id)
                .unwrap_or_default()
                .to_string();
            // `kill(1)`: this crate forbids unsafe code.
            Command::new("kill").args(["-TERM", &pid]).status()?;
            let deadline = std::time::Instant::now() + STOP_DEADLINE;
            loop {
                let exited = guard.0.as_mut().map(Child::try_wait).transpose()?.flatten();
                if let Some(status) = exited {
                    guard.0 = None;
                    if !status.success() {
                        bail!("the service exited with {status}");
                    }
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!("the service did not exit within {STOP_DEADLINE:?} of SIGTERM (killed)");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

/// How long `stop` waits for the process after SIGTERM before killing it.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// A child process killed (and reaped) when dropped, unless taken.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(s) = &self.shutdown {
            s.trigger();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
