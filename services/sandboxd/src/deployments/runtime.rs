//! Dynamic deployments: a version with a run command is served by a sandbox of its own, made
//! from the version's artifact (so it outlives the sandbox that built it) and running the command
//! with `PORT` set, relaunched when it resumes after a restart. It is made on the first request
//! for the version and replaces the runtime of any other version of the deployment. Runtimes are
//! sandboxd's own: they are not listed in `/sandboxes` and do not count against quotas, but their
//! usage is the deployment's end-user's.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Deployment, Deployments, Version};
use crate::api::ApiError;
use crate::host::{CreateRequest, Entry, FilesSource, Host};
use crate::model::State;
use crate::store;

/// The metadata key marking a runtime sandbox, with the version it serves.
pub const RUNTIME_KEY: &str = "slipway_runtime_of";

impl Deployments {
    pub(super) fn save_runtimes(&self, map: &BTreeMap<String, String>) -> Result<(), ApiError> {
        store::write_json(&self.dir.join("runtimes.json"), map)
            .map_err(|e| ApiError::internal(format!("saving runtimes: {e}")))
    }
}

impl Host {
    /// The live sandbox serving dynamic version `v` of `d`, made if there is none.
    pub async fn runtime_for(
        &self,
        deployments: &Deployments,
        d: &Deployment,
        v: &Version,
    ) -> Result<Arc<Entry>, ApiError> {
        let Some(runtime) = &v.runtime else {
            return Err(ApiError::internal("a static version has no runtime"));
        };
        let _one_at_a_time = deployments.runtime_lock.lock().await;
        let known = deployments
            .runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v.id)
            .cloned();
        if let Some(id) = known
            && let Ok(entry) = self.get(&id)
            && entry.state() != State::Destroyed
        {
            return self.live(&id);
        }
        let manifest = deployments
            .artifacts
            .manifest(v.artifact_sha256.as_deref().unwrap_or_default())
            .ok_or_else(|| ApiError::internal(format!("the artifact of {} is missing", v.id)))?;
        let mut metadata = serde_json::Map::new();
        metadata.insert(RUNTIME_KEY.into(), v.id.clone().into());
        metadata.insert("deployment_id".into(), d.id.clone().into());
        let req = CreateRequest {
            external_user_id: d.external_user_id.clone(),
            external_project_id: d.external_project_id.clone(),
            external_workspace_id: d.external_workspace_id.clone(),
            metadata,
            always_on: Some(true),
            persistent: Some(true),
            ..Default::default()
        };
        let sandbox = self.create_from(req, None, FilesSource::Empty).await?;
        let entry = self.get(&sandbox.id)?;
        let (blobs, workspace) = (deployments.artifacts.blobs_dir(), entry.workspace());
        let m = manifest.clone();
        tokio::task::spawn_blocking(move || super::artifacts::unpack(&blobs, &m, &workspace))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("unpacking the artifact: {e}")))?;
        let env = BTreeMap::from([("PORT".to_string(), runtime.port.to_string())]);
        self.launch(
            &entry,
            runtime.command.clone(),
            crate::paths::WORKSPACE.into(),
            env,
            Some("app".into()),
            true,
        )?;
        // This version's runtime replaces the deployment's others.
        let others: Vec<String> = {
            let mut map = deployments
                .runtimes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let versions: Vec<String> = deployments
                .versions(&d.id)
                .into_iter()
                .map(|x| x.id)
                .filter(|x| x != &v.id)
                .collect();
            let others = versions.iter().filter_map(|x| map.remove(x)).collect();
            map.insert(v.id.clone(), entry.id.clone());
            deployments.save_runtimes(&map)?;
            others
        };
        for id in others {
            if let Ok(old) = self.get(&id) {
                let _ = self.destroy(&old).await;
            }
        }
        Ok(entry)
    }
}
