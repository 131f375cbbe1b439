//! The deploy job: the build command run in the sandbox, then its output frozen as an artifact.

use std::sync::Arc;
use std::time::Duration;

use super::{Deployments, Version};
use crate::host::{Entry, Host};

/// The longest a build command may run.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

impl Host {
    /// Runs the build in the sandbox, freezes the output and records the outcome. The sandbox
    /// cannot be destroyed while this runs (destroy waits for it).
    /// `building` is the sandbox's build guard, taken by the caller before the deploy is
    /// answered: a destroy that arrives right after waits for this build.
    pub async fn build_version(
        self: Arc<Self>,
        deployments: Arc<Deployments>,
        entry: Arc<Entry>,
        v: Version,
        building: tokio::sync::OwnedRwLockReadGuard<()>,
    ) -> Version {
        let _building = building;
        let mut log = String::new();
        let outcome = async {
            if entry.state() == crate::model::State::Destroyed {
                return Err("the sandbox was destroyed before the build started".to_string());
            }
            if let Some(cmd) = &v.build_command {
                log.push_str(&format!("$ {cmd}\n"));
                let env = entry.snapshot().env;
                let c = crate::exec::run_captured(
                    &self,
                    &entry,
                    cmd,
                    crate::paths::WORKSPACE,
                    &env,
                    BUILD_TIMEOUT,
                )
                .await
                .map_err(|e| e.message)?;
                log.push_str(&String::from_utf8_lossy(&c.stdout));
                log.push_str(&String::from_utf8_lossy(&c.stderr));
                log.push_str(&format!(
                    "\n[exit code {} after {:.1} s]\n",
                    c.exit_code,
                    c.duration.as_secs_f64()
                ));
                if c.timed_out {
                    return Err(format!(
                        "the build timed out after {} s",
                        BUILD_TIMEOUT.as_secs()
                    ));
                }
                if c.exit_code != 0 {
                    return Err(format!("the build failed with exit code {}", c.exit_code));
                }
            }
            let resolved = crate::paths::resolve(&entry.workspace(), &v.output_path)
                .map_err(|e| e.to_string())?;
            let is_dir = crate::rooted::Root::open(&entry.workspace())
                .and_then(|r| r.stat(&resolved.parts, true))
                .is_ok_and(|m| m.is_dir());
            if !is_dir {
                return Err(format!("`{}` is not a directory", v.output_path));
            }
            // The output is read as one piece: no write batch lands halfway through it.
            let _files = entry.files_lock.lock().await;
            let (deps, workspace, parts, entrypoint) = (
                deployments.clone(),
                entry.workspace(),
                resolved.parts.clone(),
                v.entrypoint.clone(),
            );
            tokio::task::spawn_blocking(move || {
                // Read through the sandbox's own root: nothing a process inside does to the
                // output meanwhile can point the freeze at a host file.
                let output = crate::rooted::Root::open(&workspace)
                    .and_then(|r| r.dir(&parts))
                    .map_err(|e| format!("opening the output: {e}"))?;
                deps.artifacts.freeze(output, &entrypoint)
            })
            .await
            .map_err(|e| e.to_string())?
        }
        .await;
        match &outcome {
            Ok((m, digest)) => log.push_str(&format!(
                "frozen {} files ({} bytes) as sha256:{digest}\n",
                m.files.len(),
                m.files.iter().map(|f| f.size).sum::<u64>()
            )),
            Err(e) => log.push_str(&format!("failed: {e}\n")),
        }
        if let Err(e) = std::fs::write(deployments.log_path(&v), &log) {
            tracing::warn!(version = %v.id, error = %e, "saving the build log");
        }
        deployments.finish(v, outcome)
    }
}
