//! Deployments at the platform: deploy (a job: answers with a `building` version), follow it
//! with version.get / version.logs, list versions, roll back and promote (re-point, never
//! rebuild). The deployer service owns the policy; this is the platform call.

use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_proto::v1::{
    DeleteDeploymentReply, DeleteDeploymentRequest, DeployReply, DeployRequest, DeploymentReply,
    GetDeploymentRequest, GetVersionRequest, ListVersionsReply, ListVersionsRequest,
    SetVersionRequest, VersionLogsReply, VersionLogsRequest, VersionReply,
};

use super::{Executor, platform_error, required, resource};
use crate::convert;

impl Executor {
    pub async fn deploy(&self, req: DeployRequest) -> Result<DeployReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        if req.run_command.is_empty() != (req.port == 0) {
            return Err(ServiceError::invalid_input(
                "run_command and port: both or neither (a dynamic deployment needs both)",
            ));
        }
        let mut body = json!({});
        for (key, value) in [
            ("name", &req.name),
            ("build_command", &req.build_command),
            ("output_path", &req.output_path),
            ("entrypoint", &req.entrypoint),
            ("deployment_id", &req.deployment_id),
            ("run_command", &req.run_command),
        ] {
            if !value.is_empty() {
                body[key] = json!(value);
            }
        }
        if req.port != 0 {
            body["port"] = json!(req.port);
        }
        // No attribution: MIOSA's deploy from a sandbox takes none and bills the deployment to
        // the sandbox's end user.
        let got = self
            .client
            .request(
                "deploy",
                Method::POST,
                format!("/sandboxes/{}/deploy", req.sandbox_id),
                vec![],
                Some(body),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let url = got
            .get("url")
            .or(got.get("public_url"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let deployment = got
            .get("deployment")
            .map(convert::deployment)
            .unwrap_or_else(|| slipway_proto::v1::Deployment {
                id: got
                    .get("deployment_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                url: url.to_string(),
                ..Default::default()
            });
        let version = got.get("version").map(|v| convert::version(v, url));
        if deployment.id.is_empty() {
            return Err(ServiceError::unavailable(
                "the platform's deploy answer has no deployment id",
            ));
        }
        Ok(DeployReply {
            deployment: Some(deployment),
            version,
        })
    }

    pub async fn get_deployment(
        &self,
        req: GetDeploymentRequest,
    ) -> Result<DeploymentReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        let got = self
            .platform_get(
                "deployment.get",
                format!("/deployments/{}", req.deployment_id),
                vec![],
            )
            .await?;
        Ok(DeploymentReply {
            deployment: Some(convert::deployment(&got)),
        })
    }

    /// A deployment's URL never changes: read once, then remembered (a deploy job is followed
    /// by polling `version.get`, which would otherwise cost a second platform call each time).
    async fn deployment_url(&self, id: &str) -> String {
        if let Some(url) = self.lock_urls().get(id) {
            return url.clone();
        }
        let url = self
            .get_deployment(GetDeploymentRequest {
                deployment_id: id.to_string(),
            })
            .await
            .ok()
            .and_then(|d| d.deployment)
            .map(|d| d.url)
            .unwrap_or_default();
        if !url.is_empty() {
            self.lock_urls().insert(id.to_string(), url.clone());
        }
        url
    }

    fn lock_urls(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.deployment_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub async fn get_version(&self, req: GetVersionRequest) -> Result<VersionReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        resource("version_id", &req.version_id)?;
        let got = self
            .platform_get(
                "version.get",
                format!(
                    "/deployments/{}/versions/{}",
                    req.deployment_id, req.version_id
                ),
                vec![],
            )
            .await?;
        let url = self.deployment_url(&req.deployment_id).await;
        Ok(VersionReply {
            version: Some(convert::version(&got, &url)),
        })
    }

    pub async fn list_versions(
        &self,
        req: ListVersionsRequest,
    ) -> Result<ListVersionsReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        let got = self
            .platform_get(
                "version.list",
                format!("/deployments/{}/versions", req.deployment_id),
                vec![],
            )
            .await?;
        let url = self.deployment_url(&req.deployment_id).await;
        let items = super::items(&got, &["items", "versions"]);
        Ok(ListVersionsReply {
            versions: items.iter().map(|v| convert::version(v, &url)).collect(),
        })
    }

    pub async fn version_logs(
        &self,
        req: VersionLogsRequest,
    ) -> Result<VersionLogsReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        resource("version_id", &req.version_id)?;
        let text = self
            .client
            .text(
                "version.logs",
                format!(
                    "/deployments/{}/versions/{}/logs",
                    req.deployment_id, req.version_id
                ),
            )
            .await
            .map_err(platform_error)?;
        Ok(VersionLogsReply {
            lines: text.lines().map(str::to_string).collect(),
        })
    }

    pub async fn rollback(&self, req: SetVersionRequest) -> Result<DeploymentReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let body = (!req.version_id.is_empty()).then(|| json!({ "version_id": req.version_id }));
        let got = self
            .client
            .request(
                "deployment.rollback",
                Method::POST,
                format!("/deployments/{}/rollback", req.deployment_id),
                vec![],
                Some(body.unwrap_or_else(|| json!({}))),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        Ok(DeploymentReply {
            deployment: Some(convert::deployment(&got)),
        })
    }

    /// `DELETE /deployments/{id}`: it stops serving at once; one already gone counts as deleted.
    pub async fn delete_deployment(
        &self,
        req: DeleteDeploymentRequest,
    ) -> Result<DeleteDeploymentReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let deleted = self
            .client
            .request(
                "deployment.delete",
                Method::DELETE,
                format!("/deployments/{}", req.deployment_id),
                vec![],
                None,
                Some(&req.idempotency_key),
            )
            .await;
        match deleted {
            Ok(_) => {}
            Err(e) if matches!(e.status(), Some(404 | 410)) => {}
            Err(e) => return Err(platform_error(e)),
        }
        if let Ok(mut urls) = self.deployment_urls.lock() {
            urls.remove(&req.deployment_id);
        }
        Ok(DeleteDeploymentReply {})
    }

    pub async fn promote(&self, req: SetVersionRequest) -> Result<DeploymentReply, ServiceError> {
        resource("deployment_id", &req.deployment_id)?;
        resource("version_id", &req.version_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let got = self
            .client
            .request(
                "deployment.promote",
                Method::POST,
                format!(
                    "/deployments/{}/versions/{}/promote",
                    req.deployment_id, req.version_id
                ),
                vec![],
                Some(json!({})),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        Ok(DeploymentReply {
            deployment: Some(convert::deployment(&got)),
        })
    }
}
