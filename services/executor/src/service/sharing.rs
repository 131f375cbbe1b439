//! Previews, preview tokens, preview shares and sandbox shares at the platform. (The preview
//! service owns their records and policy; this is only the platform call.)

use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_proto::v1::{
    CreatePreviewRequest, CreatePreviewShareRequest, CreateShareRequest, DeletePreviewReply,
    DeletePreviewRequest, ListSharesReply, ListSharesRequest, PreviewReply, PreviewShareReply,
    PreviewTokenReply, PreviewTokenRequest, RevokePreviewSharesRequest, RevokeReply,
    RevokeShareRequest, ShareReply, TokenScope,
};

use super::{Executor, platform_error, required, resource};
use crate::convert;

/// Longest preview token the platform mints.
const MAX_TOKEN_SEC: u64 = 86_400;

impl Executor {
    pub async fn create_preview(
        &self,
        req: CreatePreviewRequest,
    ) -> Result<PreviewReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        if req.port == 0 || req.port > 65_535 {
            return Err(ServiceError::invalid_input("port: 1 to 65535"));
        }
        let got = self
            .client
            .request(
                "preview.create",
                Method::POST,
                format!("/sandboxes/{}/previews", req.sandbox_id),
                vec![],
                Some(json!({ "port": req.port })),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        Ok(PreviewReply {
            preview: Some(convert::preview(&got)),
        })
    }

    pub async fn preview_token(
        &self,
        req: PreviewTokenRequest,
    ) -> Result<PreviewTokenReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        if req.expires_in_sec > MAX_TOKEN_SEC {
            return Err(ServiceError::invalid_input(format!(
                "expires_in_sec: at most {MAX_TOKEN_SEC}"
            )));
        }
        let scope = match TokenScope::try_from(req.scope).unwrap_or_default() {
            TokenScope::Interact => "interact",
            _ => "read",
        };
        if req.port != 0 {
            let preview_port = self.preview_port(&req.sandbox_id).await?;
            if req.port != preview_port {
                return Err(ServiceError::invalid_input(format!(
                    "port: the platform mints preview tokens for the sandbox's preview port \
                     ({preview_port}), not {}; use preview.create for another port",
                    req.port
                ))
                .with_detail("field", "port"));
            }
        }
        let expires_in = if req.expires_in_sec == 0 {
            3600
        } else {
            req.expires_in_sec
        };
        let body = json!({ "expires_in": expires_in, "scope": scope });
        let got = self
            .client
            .request(
                "preview.token",
                Method::POST,
                format!("/sandboxes/{}/preview-token", req.sandbox_id),
                vec![],
                Some(body),
                None,
            )
            .await
            .map_err(platform_error)?;
        let got = got
            .get("preview_token")
            .filter(|v| v.is_object())
            .unwrap_or(&got);
        let token = got.get("token").and_then(Value::as_str).unwrap_or_default();
        if token.is_empty() {
            return Err(ServiceError::unavailable(
                "the platform's answer has no token",
            ));
        }
        Ok(PreviewTokenReply {
            token: token.to_string(),
            url: got
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            expires_at: convert::timestamp(got.get("expires_at")),
        })
    }

    /// The port a sandbox's preview token opens: its template's preview port, read from the
    /// platform's `GET /sandbox-templates/{id}` (which resolves aliases) and kept, since a
    /// template's port does not change.
    async fn preview_port(&self, sandbox_id: &str) -> Result<u32, ServiceError> {
        let template_id = match self.record(sandbox_id).await?.and_then(|r| r.sandbox) {
            Some(s) if !s.template_id.is_empty() => s.template_id,
            _ => {
                convert::sandbox(
                    &self
                        .client
                        .get_sandbox(sandbox_id)
                        .await
                        .map_err(platform_error)?,
                )
                .template_id
            }
        };
        let id = if template_id.is_empty() {
            self.templates(Default::default())
                .await?
                .default_template_id
        } else {
            template_id
        };
        if let Some(port) = self.known_port(&id) {
            return Ok(port);
        }
        resource("template_id", &id)?;
        let got = self
            .platform_get("templates.get", format!("/sandbox-templates/{id}"), vec![])
            .await?;
        let port = got
            .get("preview_port")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                ServiceError::invalid_input(format!(
                    "port: template `{id}` has no preview port; leave port unset"
                ))
            })?;
        self.remember_port(&id, port);
        Ok(port)
    }

    pub async fn share_preview(
        &self,
        req: CreatePreviewShareRequest,
    ) -> Result<PreviewShareReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("preview_id", &req.preview_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let ttl = if req.ttl_sec == 0 { 3600 } else { req.ttl_sec };
        // Both spellings: TS/PY send `ttl_seconds`, GO/EX `expires_in_sec`.
        let got = self
            .client
            .request(
                "preview.share",
                Method::POST,
                format!(
                    "/sandboxes/{}/previews/{}/share",
                    req.sandbox_id, req.preview_id
                ),
                vec![],
                Some(json!({ "ttl_seconds": ttl, "expires_in_sec": ttl })),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        // `share_url` sits beside `data` in MIOSA's answer, which the envelope unwrap drops.
        let url = got
            .get("share_url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let expires = got.get("share_token_expires_at").or(got.get("expires_at"));
        Ok(PreviewShareReply {
            url,
            expires_at: convert::timestamp(expires),
        })
    }

    pub async fn revoke_preview_shares(
        &self,
        req: RevokePreviewSharesRequest,
    ) -> Result<RevokeReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("preview_id", &req.preview_id)?;
        let got = self
            .client
            .request(
                "preview.revoke",
                Method::DELETE,
                format!(
                    "/sandboxes/{}/previews/{}/share",
                    req.sandbox_id, req.preview_id
                ),
                vec![],
                None,
                None,
            )
            .await
            .map_err(platform_error)?;
        Ok(RevokeReply {
            revoked: got
                .get("revoked")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
        })
    }

    pub async fn delete_preview(
        &self,
        req: DeletePreviewRequest,
    ) -> Result<DeletePreviewReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("preview_id", &req.preview_id)?;
        let done = self
            .client
            .request(
                "preview.delete",
                Method::DELETE,
                format!("/sandboxes/{}/previews/{}", req.sandbox_id, req.preview_id),
                vec![],
                None,
                None,
            )
            .await;
        match done {
            Ok(_) => Ok(DeletePreviewReply {}),
            Err(e) => match platform_error(e) {
                gone if gone.code == slipway_proto::v1::ErrorCode::NotFound => {
                    Ok(DeletePreviewReply {})
                }
                other => Err(other),
            },
        }
    }

    pub async fn create_share(&self, req: CreateShareRequest) -> Result<ShareReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let expires = if req.expires_in_sec == 0 {
            3600
        } else {
            req.expires_in_sec
        };
        let got = self
            .client
            .request(
                "share.create",
                Method::POST,
                format!("/sandboxes/{}/shares", req.sandbox_id),
                vec![],
                Some(json!({ "expires_in": expires, "scope": "read" })),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let share = convert::share(&got);
        if share.url.is_empty() {
            return Err(ServiceError::unavailable(
                "the platform's answer has no share_url",
            ));
        }
        Ok(ShareReply { share: Some(share) })
    }

    pub async fn list_shares(
        &self,
        req: ListSharesRequest,
    ) -> Result<ListSharesReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let got = self
            .platform_get(
                "share.list",
                format!("/sandboxes/{}/shares", req.sandbox_id),
                vec![],
            )
            .await?;
        let items = super::items(&got, &["shares"]);
        Ok(ListSharesReply {
            shares: items.iter().map(convert::share).collect(),
        })
    }

    pub async fn revoke_share(&self, req: RevokeShareRequest) -> Result<RevokeReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("share_id", &req.share_id)?;
        self.client
            .request(
                "share.revoke",
                Method::DELETE,
                format!("/sandboxes/{}/shares/{}", req.sandbox_id, req.share_id),
                vec![],
                None,
                None,
            )
            .await
            .map_err(platform_error)?;
        Ok(RevokeReply { revoked: 1 })
    }
}
