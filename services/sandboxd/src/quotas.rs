//! Per-end-user quotas (`/quotas/external/{external_user_id}`), enforced when a sandbox is
//! created, forked or resumed. A refusal is HTTP 402 with code `quota_exceeded`, naming the limit,
//! its value and the user's current figure; nothing is created or resumed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::host::Host;
use crate::model::State;
use crate::store;

/// One user's limits; `None` is uncapped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_sandboxes: Option<u64>,
    pub max_concurrent: Option<u64>,
    pub max_storage_gb: Option<u64>,
    pub max_credit_cents: Option<u64>,
}

pub struct Quotas {
    path: PathBuf,
    users: Mutex<BTreeMap<String, Limits>>,
}

/// What is about to happen to one of the user's sandboxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A new sandbox (create or fork): it will exist and run.
    Create,
    /// A paused or stopped sandbox starts running again.
    Resume,
}

/// A user's live figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Sandboxes that exist (not destroyed).
    pub total: u64,
    /// Sandboxes running now.
    pub concurrent: u64,
    pub storage_bytes: u64,
}

impl Quotas {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join("quotas.json");
        let users = store::read_json(&path)?.unwrap_or_default();
        Ok(Self {
            path,
            users: Mutex::new(users),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Limits>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, user: &str) -> Limits {
        self.lock().get(user).cloned().unwrap_or_default()
    }

    /// Creates or replaces the user's quota.
    pub fn set(&self, user: &str, limits: Limits) -> std::io::Result<()> {
        let mut users = self.lock();
        let mut next = users.clone();
        next.insert(user.to_string(), limits);
        store::write_json(&self.path, &next)?;
        *users = next;
        Ok(())
    }

    /// Back to the tenant default (uncapped); whether there was one.
    pub fn delete(&self, user: &str) -> std::io::Result<bool> {
        let mut users = self.lock();
        if !users.contains_key(user) {
            return Ok(false);
        }
        let mut next = users.clone();
        next.remove(user);
        store::write_json(&self.path, &next)?;
        *users = next;
        Ok(true)
    }
}

fn exceeded(limit: &'static str, max: u64, current: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "quota_exceeded",
        format!("quota exceeded: {limit} is {max} and this user is at {current}"),
    )
}

impl Host {
    pub fn counts(&self, user: &str) -> Counts {
        let mut c = Counts::default();
        for e in self.all() {
            let r = e.snapshot();
            if r.external_user_id.as_deref() != Some(user)
                || r.state == State::Destroyed
                || r.is_runtime()
            {
                continue;
            }
            c.total += 1;
            c.concurrent += u64::from(r.state == State::Running);
            c.storage_bytes += e.usage.lock().unwrap_or_else(|p| p.into_inner()).disk_bytes;
        }
        c
    }

    /// Refuses `action` for `user` when it would go past one of their limits. Callers hold the
    /// create lock for creates, so two creates cannot both take the last place.
    pub fn check_quota(&self, user: Option<&str>, action: Action) -> Result<(), ApiError> {
        let Some(user) = user else { return Ok(()) };
        let limits = self.quotas.get(user);
        if limits == Limits::default() {
            return Ok(());
        }
        let c = self.counts(user);
        if action == Action::Create
            && let Some(max) = limits.max_sandboxes
            && c.total >= max
        {
            return Err(exceeded("max_sandboxes", max, c.total));
        }
        if let Some(max) = limits.max_concurrent
            && c.concurrent >= max
        {
            return Err(exceeded("max_concurrent", max, c.concurrent));
        }
        if action == Action::Create
            && let Some(max) = limits.max_storage_gb
            && c.storage_bytes >= max.saturating_mul(1 << 30)
        {
            let gb = c.storage_bytes as f64 / f64::from(1u32 << 30);
            return Err(exceeded("max_storage_gb", max, format!("{gb:.3} GB")));
        }
        if let Some(max) = limits.max_credit_cents {
            let spent = self.month_to_date_cents(user);
            if spent >= max as f64 {
                return Err(exceeded(
                    "max_credit_cents",
                    max,
                    format!("{spent:.2} cents this month"),
                ));
            }
        }
        Ok(())
    }

    /// `GET /quotas/external/{user}`: both shapes the SDKs read (nested and flat).
    pub fn quota_view(&self, user: &str) -> serde_json::Value {
        let l = self.quotas.get(user);
        let c = self.counts(user);
        serde_json::json!({
            "external_user_id": user,
            "limits": l,
            "usage": {
                "total_sandboxes": c.total,
                "concurrent": c.concurrent,
                "storage_gb": c.storage_bytes as f64 / f64::from(1u32 << 30),
                "credit_cents_month_to_date": self.month_to_date_cents(user),
            },
            "max_sandboxes": l.max_sandboxes,
            "max_concurrent": l.max_concurrent,
            "max_storage_gb": l.max_storage_gb,
            "max_credit_cents": l.max_credit_cents,
            "current_sandboxes": c.total,
        })
    }
}
