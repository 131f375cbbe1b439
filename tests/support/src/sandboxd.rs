//! A real `slipway-sandboxd` process for one test, on a random loopback port, killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub struct Sandboxd {
    bin: PathBuf,
    child: Child,
    base_url: String,
    edge_addr: std::net::SocketAddr,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Sandboxd {
    /// Starts `bin` with a fresh data directory.
    pub fn start(bin: impl AsRef<Path>, extra_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("data");
        let mut s = Self::start_in(bin, &data_dir, extra_args, &[])?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts `bin` on an existing data directory (a restart), with extra environment.
    pub fn start_in(
        bin: impl AsRef<Path>,
        data_dir: &Path,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let bin = bin.as_ref();
        let mut cmd = Command::new(bin);
        if !extra_args.contains(&"--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        if !extra_args.contains(&"--edge-listen") {
            cmd.arg("--edge-listen").arg("127.0.0.1:0");
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Two lines: the API's base URL, then `edge http://<addr>`.
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().take(2).map_while(Result::ok) {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let next = || rx.recv_timeout(Duration::from_secs(20));
        let (base_url, edge) = match (next(), next()) {
            (Ok(url), Ok(edge)) if url.starts_with("http://") => (url.trim().to_string(), edge),
            (Ok(other), _) => bail!("sandboxd printed `{other}` instead of its base URL"),
            _ => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("sandboxd did not print its base URL and edge address ({status})")
            }
        };
        let edge_addr = edge
            .trim()
            .strip_prefix("edge http://")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("sandboxd printed `{edge}` instead of its edge address"))?;
        Ok(Self {
            bin: bin.to_path_buf(),
            child,
            base_url,
            edge_addr,
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
        })
    }

    /// `http://127.0.0.1:<port>/api/v1`
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Where the API listens (`127.0.0.1:<port>`).
    pub fn api_addr(&self) -> String {
        self.base_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Where the edge listens.
    pub fn edge_addr(&self) -> std::net::SocketAddr {
        self.edge_addr
    }

    /// An HTTP client that reaches every `*.localhost` preview host name through this edge,
    /// as a browser would (this machine's resolver does not map them to loopback).
    pub fn edge_http(&self) -> reqwest::Client {
        let edge = slipway_common::config::EdgeSettings {
            domain: "localhost".into(),
            resolve: Some(self.edge_addr),
        };
        slipway_common::http::client_builder(&edge)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    }

    /// The process id (to read its memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills the process (SIGKILL) and waits for it, keeping the data directory.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process cleanly (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        Ok(self.child.wait()?)
    }

    /// Hands the temporary data directory over, so it outlives this process (for restarts).
    pub fn take_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

impl Drop for Sandboxd {
    /// Kills the process and removes its sandboxes' host resources (cgroups, network
    /// namespaces), which outlive a killed sandboxd by design.
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--purge")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
