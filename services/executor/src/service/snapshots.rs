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

    /// Rolls the sandbox's files back to a snapshot, in place.
    pub async fn restore_snapshot(
        &self,
        req: RestoreSnapshotRequest,
    ) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("snapshot_id", &req.snapshot_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let mut body = json!({});
        if let Some(a) = &req.attribution
            && !a.user_id.is_empty()
        {
            body["external_user_id"] = json!(a.user_id);
        }
        self.client
            .request(
                "snapshot.restore",
                Method::POST,
                format!("/sandboxes/{}/restore/{}", req.sandbox_id, req.snapshot_id),
                vec![],
                Some(body),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let got = self
            .client
            .get_sandbox(&req.sandbox_id)
            .await
            .map_err(platform_error)?;
        Ok(SandboxReply {
            sandbox: Some(convert::sandbox(&got)),
        })
    }
}
