//! Checkpoints: snapshot.create, snapshot.list, snapshot.restore.

use reqwest::Method;
use serde_json::json;
use slipway_common::ServiceError;
use slipway_proto::v1::{
    CreateSnapshotRequest, ListSnapshotsReply, ListSnapshotsRequest, RestoreSnapshotRequest,
    SandboxReply, SnapshotReply,
};

use super::{Executor, platform_error, required, resource};
use crate::convert;

impl Executor {
    pub async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<SnapshotReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let mut body = json!({});
        if !req.comment.is_empty() {
            body["comment"] = json!(req.comment);
        }
        let got = self
            .client
            .request(
                "snapshot.create",
                Method::POST,
                format!("/sandboxes/{}/snapshots", req.sandbox_id),
                vec![],
                Some(body),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let snapshot = convert::snapshot(got.get("snapshot").unwrap_or(&got));
        if snapshot.id.is_empty() {
            return Err(ServiceError::unavailable(
                "the platform's snapshot answer has no id",
            ));
        }
        Ok(SnapshotReply {
            snapshot: Some(snapshot),
        })
    }

    pub async fn list_snapshots(
        &self,
        req: ListSnapshotsRequest,
    ) -> Result<ListSnapshotsReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let got = self
            .platform_get(
                "snapshot.list",
                format!("/sandboxes/{}/snapshots", req.sandbox_id),
                vec![],
            )
            .await?;
        let items = super::items(&got, &["snapshots"]);
        Ok(ListSnapshotsReply {
            snapshots: items.iter().map(convert::snapshot).collect(),
        })
    }

    /// Restores a snapshot and answers with the sandbox the platform names: the same one rolled
    /// back, or (MIOSA may create one from the checkpoint) a new one, which is then tagged with
    /// the source's run and branch, recorded and counted as created like a fork, so it is
    /// billed and reaped.
    pub async fn restore_snapshot(
        &self,
        req: RestoreSnapshotRequest,
    ) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("snapshot_id", &req.snapshot_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let answer = self
            .client
            .request(
                "snapshot.restore",
                Method::POST,
                format!("/sandboxes/{}/restore/{}", req.sandbox_id, req.snapshot_id),
                vec![],
                Some(json!({})),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let answer = answer.get("sandbox").cloned().unwrap_or(answer);
        let restored = convert::sandbox(&answer);
        if restored.id.is_empty() || restored.id == req.sandbox_id {
            let got = if restored.id.is_empty() {
                self.client
                    .get_sandbox(&req.sandbox_id)
                    .await
                    .map_err(platform_error)?
            } else {
                answer
            };
            let sandbox = convert::sandbox(&got);
            self.remember(&sandbox, &req.idempotency_key).await?;
            return Ok(SandboxReply {
                sandbox: Some(sandbox),
            });
        }
        let source = match self.record(&req.sandbox_id).await?.and_then(|r| r.sandbox) {
            Some(s) => s,
            None => convert::sandbox(
                &self
                    .client
                    .get_sandbox(&req.sandbox_id)
                    .await
                    .map_err(platform_error)?,
            ),
        };
        // Recorded and counted first, so a crash before the PATCH leaves a sandbox the registry
        // knows (with the source's run), billed once whatever happens after.
        let mut sandbox = restored;
        sandbox.run_id = source.run_id.clone();
        sandbox.branch = source.branch.clone();
        self.remember(&sandbox, &req.idempotency_key).await?;
        self.count_created(&sandbox).await?;
        let metadata = super::sandboxes::slipway_metadata(
            &source.run_id,
            &source.branch,
            &Default::default(),
            &req.idempotency_key,
        );
        let kept = answer.get("metadata");
        if !metadata
            .iter()
            .all(|(k, v)| kept.and_then(|m| m.get(k)) == Some(v))
        {
            let tagged = self
                .tag(
                    &sandbox.id,
                    kept,
                    &metadata,
                    "",
                    &req.idempotency_key,
                    "snapshot.restore",
                )
                .await?;
            sandbox = convert::sandbox(&tagged);
            self.remember(&sandbox, &req.idempotency_key).await?;
        }
        tracing::info!(source = %req.sandbox_id, sandbox = %sandbox.id, "a restore made a new sandbox");
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }
}
