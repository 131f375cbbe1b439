//! Real processes for crash tests: run a binary with a failpoint armed, check that it aborted
//! exactly there, and run it again without.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The environment variable that arms failpoints (see `slipway_common::failpoint`).
pub const FAILPOINTS_ENV: &str = "SLIPWAY_FAILPOINTS";

/// A command to run to a failpoint, then again.
#[derive(Clone, Debug)]
pub struct FailpointRun {
    bin: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    timeout: Duration,
}

impl FailpointRun {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            args: Vec::new(),
            envs: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn command(&self, failpoint: Option<&str>) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env_remove(FAILPOINTS_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fp) = failpoint {
            cmd.env(FAILPOINTS_ENV, fp);
        }
        cmd
    }

    /// Runs with `failpoint` armed (`name` or `name@N`) and checks that the process aborted
    /// there (SIGABRT, and its own report of the failpoint). Returns what it printed.
    pub fn run_to_failpoint(&self, failpoint: &str) -> Result<Output> {
        let out = wait_with_timeout(self.command(Some(failpoint)).spawn()?, self.timeout)?;
        let name = failpoint.split('@').next().unwrap_or(failpoint);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.signal() != Some(6) {
            bail!(
                "{} did not abort at failpoint `{name}` ({}); stderr:\n{stderr}",
                self.bin.display(),
                out.status
            );
        }
        if !stderr.contains(&format!("failpoint `{name}` hit")) {
            bail!(
                "{} aborted, but not at `{name}`; stderr:\n{stderr}",
                self.bin.display()
            );
        }
        Ok(out)
    }

    /// Runs again with no failpoint armed, to completion.
    pub fn restart(&self) -> Result<Output> {
        wait_with_timeout(self.command(None).spawn()?, self.timeout)
    }

    /// Starts a long-running process with its output appended to `log` (a service that logs
    /// a lot would block on a pipe nobody reads).
    pub fn spawn_logged(
        &self,
        failpoint: Option<&str>,
        log: &std::path::Path,
    ) -> Result<RunningProcess> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = self
            .command(failpoint)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        Ok(RunningProcess { child: Some(child) })
    }

    /// Starts a long-running process (a service) with an optional failpoint armed.
    pub fn spawn(&self, failpoint: Option<&str>) -> Result<RunningProcess> {
        let child = self
            .command(failpoint)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        Ok(RunningProcess { child: Some(child) })
    }
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Result<Output> {
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let tail: Vec<&str> = stdout.lines().rev().take(30).collect();
            bail!(
                "process did not finish within {timeout:?}; stderr:\n{}\nlast lines of stdout:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed when dropped.
pub struct RunningProcess {
    child: Option<Child>,
}

impl RunningProcess {
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM (through `kill(1)`: this crate forbids unsafe code).
    pub fn terminate(&self) -> Result<()> {
        let pid = self.id().context("process already reaped")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        Ok(())
    }

    /// How it ended, if it has (without waiting).
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("already waited"),
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) through `kill(1)`.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.id().context("process already reaped")?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Waits for the process to end by itself, at most `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let child = self.child.take().context("already waited")?;
        wait_with_timeout(child, timeout)
    }
}

impl Drop for RunningProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
