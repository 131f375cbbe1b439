//! The platform's usage figures and quotas: usage.sandbox (cumulative counters, also after
//! destroy), usage.rollup (the platform's own rollup for a window), quota.get and quota.set
//! (mirroring limits that billing owns to `/quotas/external/{user}`).

use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_proto::v1::{
    GetQuotaRequest, QuotaReply, SandboxUsageReply, SandboxUsageRequest, SetQuotaRequest,
    UsageGroupBy, UsageRollupReply, UsageRollupRequest, UsageRollupRow,
};

use super::{Executor, platform_error, required, resource};
use crate::convert;

fn user(user_id: &str) -> Result<String, ServiceError> {
    required("user_id", user_id)?;
    // `.` and `..` stay dot segments however they are escaped (URLs resolve `%2E%2E` too).
    if user_id == "." || user_id == ".." {
        return Err(ServiceError::from(
            slipway_proto::validate::ValidationError {
                field: "user_id",
                reason: "is not an id".into(),
            },
        ));
    }
    // A path segment: percent-encode what is not unreserved.
    Ok(user_id
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect())
}

impl Executor {
    pub async fn sandbox_usage(
        &self,
        req: SandboxUsageRequest,
    ) -> Result<SandboxUsageReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let got = self
            .client
            .sandbox_usage(&req.sandbox_id)
            .await
            .map_err(platform_error)?;
        Ok(SandboxUsageReply {
            sandbox_id: req.sandbox_id,
            counters: Some(convert::counters(&got)),
        })
    }

    pub async fn usage_rollup(
        &self,
        req: UsageRollupRequest,
    ) -> Result<UsageRollupReply, ServiceError> {
        let group_by = match UsageGroupBy::try_from(req.group_by).unwrap_or_default() {
            UsageGroupBy::Project => "external_project_id",
            UsageGroupBy::Workspace => "workspace_id",
            _ => "external_user_id",
        };
        let mut query = vec![("group_by", group_by.to_string())];
        match (&req.start, &req.end) {
            (Some(s), Some(e)) => {
                let (Some(s), Some(e)) = (convert::rfc3339(s), convert::rfc3339(e)) else {
                    return Err(ServiceError::invalid_input("start, end: valid times"));
                };
                query.extend([("period", "custom".into()), ("start", s), ("end", e)]);
            }
            (None, None) => query.push(("period", "30d".into())),
            _ => return Err(ServiceError::invalid_input("start and end go together")),
        }
        let got = self
            .platform_get("usage.rollup", "/usage".into(), query)
            .await?;
        let got = got.get("usage").cloned().unwrap_or(got);
        let decimal = |v: Option<&Value>| match v {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            _ => "0".into(),
        };
        let rows = got
            .get("results")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| UsageRollupRow {
                key: r
                    .get(group_by)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                // The exact figure where the platform gives one beside the whole number.
                sandbox_seconds: decimal(
                    r.get("sandbox_seconds_exact").or(r.get("sandbox_seconds")),
                ),
                storage_gb_hours: decimal(r.get("storage_gb_hours")),
                credit_cents: r.get("credit_cents").and_then(Value::as_i64).unwrap_or(0),
            })
            .collect();
        Ok(UsageRollupReply {
            period_start: convert::timestamp(got.get("period_start")),
            period_end: convert::timestamp(got.get("period_end")),
            rows,
        })
    }

    pub async fn get_quota(&self, req: GetQuotaRequest) -> Result<QuotaReply, ServiceError> {
        let path = user(&req.user_id)?;
        let got = self
            .platform_get("quota.get", format!("/quotas/external/{path}"), vec![])
            .await?;
        Ok(QuotaReply {
            quota: Some(convert::quota(&req.user_id, &got)),
        })
    }

    /// Creates or replaces the user's limits at the platform (unset fields: uncapped).
    pub async fn set_quota(&self, req: SetQuotaRequest) -> Result<QuotaReply, ServiceError> {
        let path = user(&req.user_id)?;
        let l = req.limits.unwrap_or_default();
        let mut body = json!({});
        for (key, value) in [
            ("max_sandboxes", l.max_sandboxes),
            ("max_concurrent", l.max_concurrent),
            ("max_storage_gb", l.max_storage_gb),
            ("max_credit_cents", l.max_credit_cents),
        ] {
            if let Some(v) = value {
                body[key] = json!(v);
            }
        }
        let got = self
            .client
            .request(
                "quota.set",
                Method::PUT,
                format!("/quotas/external/{path}"),
                vec![],
                Some(body),
                // PUT replaces: repeating it is harmless, and a reused key with new limits
                // would be refused.
                None,
            )
            .await
            .map_err(platform_error)?;
        Ok(QuotaReply {
            quota: Some(convert::quota(&req.user_id, &got)),
        })
    }
}
