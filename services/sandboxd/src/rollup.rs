//! Usage as a platform bills it: per end-user (or project, or workspace), over a window, priced
//! with a configurable table. Built from each sandbox's hourly usage, so destroyed sandboxes
//! count for the hours they lived.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, Time};

use crate::api::ApiError;
use crate::clock::{now_ms, rfc3339};
use crate::host::Host;
use crate::usage::{HOUR_MS, Hour};

/// Prices in credit cents (fractions allowed). Defaults are in the range of public sandbox
/// offerings; `--price-table FILE` (JSON with these keys) replaces them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub vcpu_second_cents: f64,
    pub storage_gb_hour_cents: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            vcpu_second_cents: 0.0014,
            storage_gb_hour_cents: 0.014,
        }
    }
}

impl Prices {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--price-table {}: {e}", path.display()))?;
        let prices: Prices = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("--price-table {}: {e}", path.display()))?;
        if !(prices.vcpu_second_cents >= 0.0 && prices.storage_gb_hour_cents >= 0.0) {
            anyhow::bail!("--price-table {}: prices are >= 0", path.display());
        }
        Ok(prices)
    }

    pub fn cents(&self, usage: &Hour) -> f64 {
        seconds(usage) * self.vcpu_second_cents + gb_hours(usage) * self.storage_gb_hour_cents
    }
}

fn seconds(h: &Hour) -> f64 {
    h.vcpu_ms / 1000.0
}

fn gb_hours(h: &Hour) -> f64 {
    h.disk_gib_ms / HOUR_MS as f64
}

/// A window of whole hours, `[start, end)` in Unix ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

fn parse_time(s: &str, field: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::invalid(
            "invalid_period",
            format!("`{field}` is an ISO 8601 time (2026-11-01T00:00:00Z) or date (2026-11-01)"),
        )
    };
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad());
    }
    // A bare date is midnight UTC.
    let t = OffsetDateTime::parse(&format!("{s}T00:00:00Z"), &Rfc3339).map_err(|_| bad())?;
    Ok(t.unix_timestamp() * 1000)
}

impl Window {
    /// `7d`, `30d` (the default), month to date (`mtd`, `month-to-date`, `month_to_date`) or
    /// `custom` with `start` and `end` (also accepted without `period`).
    pub fn parse(
        period: Option<&str>,
        start: Option<&str>,
        end: Option<&str>,
        now: i64,
    ) -> Result<Window, ApiError> {
        let days = |n: i64| Window {
            start: now - n * 24 * HOUR_MS,
            end: now,
        };
        let w = match (period, start, end) {
            (Some("custom") | None, Some(s), Some(e)) => Window {
                start: parse_time(s, "start")?,
                end: parse_time(e, "end")?,
            },
            (Some("custom"), _, _) => {
                return Err(ApiError::invalid(
                    "invalid_period",
                    "`period=custom` needs `start` and `end`",
                ));
            }
            (None | Some("30d"), None, None) => days(30),
            (Some("7d"), None, None) => days(7),
            (Some("mtd" | "month-to-date" | "month_to_date"), None, None) => {
                let t = OffsetDateTime::from_unix_timestamp(now / 1000)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let first = t
                    .date()
                    .replace_day(1)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                Window {
                    start: first
                        .with_time(Time::MIDNIGHT)
                        .assume_utc()
                        .unix_timestamp()
                        * 1000,
                    end: now,
                }
            }
            (Some(p), None, None) => {
                return Err(ApiError::invalid(
                    "invalid_period",
                    format!("unknown period `{p}`: 7d, 30d, mtd (month-to-date) or custom"),
                ));
            }
            _ => {
                return Err(ApiError::invalid(
                    "invalid_period",
                    "`start` and `end` go together, with `period=custom` or no period",
                ));
            }
        };
        if w.end <= w.start {
            return Err(ApiError::invalid(
                "invalid_period",
                "`end` must be after `start`",
            ));
        }
        Ok(w)
    }

    /// Hours are the unit: an hour counts when it starts inside the window (its start floored to
    /// the hour).
    fn hours(&self) -> (i64, i64) {
        (self.start - self.start.rem_euclid(HOUR_MS), self.end)
    }
}

/// What a rollup groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    ExternalUser,
    ExternalProject,
    Workspace,
}

impl GroupBy {
    pub fn parse(s: Option<&str>) -> Result<GroupBy, ApiError> {
        match s {
            None | Some("external_user_id") => Ok(GroupBy::ExternalUser),
            Some("external_project_id") => Ok(GroupBy::ExternalProject),
            Some("workspace_id") => Ok(GroupBy::Workspace),
            Some(other) => Err(ApiError::invalid(
                "invalid_group_by",
                format!(
                    "unknown group_by `{other}`: external_user_id, external_project_id or workspace_id"
                ),
            )),
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            GroupBy::ExternalUser => "external_user_id",
            GroupBy::ExternalProject => "external_project_id",
            GroupBy::Workspace => "workspace_id",
        }
    }
}

/// One group's usage in a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Line {
    pub usage: Hour,
    pub sandboxes: u64,
}

impl Host {
    /// Usage in `window` by group; sandboxes without the grouping attribute are under `None`.
    pub fn rollup(
        &self,
        window: Window,
        group_by: GroupBy,
        only_user: Option<&str>,
    ) -> BTreeMap<Option<String>, Line> {
        let (from, to) = window.hours();
        let mut out: BTreeMap<Option<String>, Line> = BTreeMap::new();
        for entry in self.all() {
            let r = entry.snapshot();
            if only_user.is_some_and(|u| r.external_user_id.as_deref() != Some(u)) {
                continue;
            }
            let used = entry
                .usage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .between(from, to);
            if used == Hour::default() {
                continue;
            }
            let key = match group_by {
                GroupBy::ExternalUser => r.external_user_id,
                GroupBy::ExternalProject => r.external_project_id,
                GroupBy::Workspace => r.workspace_id.or(r.external_workspace_id),
            };
            let line = out.entry(key).or_default();
            line.usage.vcpu_ms += used.vcpu_ms;
            line.usage.disk_gib_ms += used.disk_gib_ms;
            line.sandboxes += 1;
        }
        out
    }

    /// An end-user's spend so far this month, in credit cents (for `max_credit_cents`).
    pub fn month_to_date_cents(&self, user: &str) -> f64 {
        let now = now_ms();
        Window::parse(Some("mtd"), None, None, now)
            .map(|w| {
                self.rollup(w, GroupBy::ExternalUser, Some(user))
                    .values()
                    .map(|l| self.prices.cents(&l.usage))
                    .sum()
            })
            .unwrap_or(0.0)
    }
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// `GET /usage`: MIOSA's rollup shape, ordered by spend.
pub fn rollup_view(
    host: &Host,
    window: Window,
    group_by: GroupBy,
    user: Option<&str>,
) -> serde_json::Value {
    let mut rows: Vec<(f64, serde_json::Value)> = host
        .rollup(window, group_by, user)
        .into_iter()
        .map(|(key, line)| {
            let cents = host.prices.cents(&line.usage);
            // Whole numbers where MIOSA documents them (Go's SDK decodes them as integers), the
            // exact figures beside them, as for the cents.
            let seconds = seconds(&line.usage);
            let mut row = serde_json::json!({
                "sandbox_seconds": seconds.round() as u64,
                "sandbox_seconds_exact": round(seconds, 3),
                "computer_seconds": 0,
                "computer_seconds_exact": 0.0,
                "storage_gb_hours": round(gb_hours(&line.usage), 6),
                "credit_cents": cents.round() as i64,
                "credit_cents_exact": round(cents, 6),
                "sandboxes": line.sandboxes,
            });
            row[group_by.key()] = serde_json::json!(key);
            (cents, row)
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    serde_json::json!({
        "period_start": rfc3339(window.start),
        "period_end": rfc3339(window.end),
        "group_by": group_by.key(),
        "prices": host.prices,
        "results": rows.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
    })
}

/// `GET /usage/summary`: the tenant's totals in a window (month to date by default).
pub fn summary_view(host: &Host, window: Window) -> serde_json::Value {
    let lines = host.rollup(window, GroupBy::ExternalUser, None);
    let total = lines.values().fold(Hour::default(), |a, l| Hour {
        vcpu_ms: a.vcpu_ms + l.usage.vcpu_ms,
        disk_gib_ms: a.disk_gib_ms + l.usage.disk_gib_ms,
    });
    let cents = host.prices.cents(&total);
    let storage_bytes: u64 = host
        .all()
        .iter()
        .filter(|e| e.state() != crate::model::State::Destroyed)
        .map(|e| e.usage.lock().unwrap_or_else(|p| p.into_inner()).disk_bytes)
        .sum();
    serde_json::json!({
        "period_start": rfc3339(window.start),
        "period_end": rfc3339(window.end),
        "compute_hours": round(seconds(&total) / 3600.0, 6),
        "storage_gb": round(storage_bytes as f64 / (1024.0 * 1024.0 * 1024.0), 6),
        "storage_gb_hours": round(gb_hours(&total), 6),
        "bandwidth_gb": 0,
        "ai_tokens": 0,
        "total_credits": cents.round() as i64,
        "total_credits_exact": round(cents, 6),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn windows() {
        // 2026-11-26T12:00:00Z
        let now = 1_795_694_400_000;
        let w = Window::parse(None, None, None, now).unwrap();
        assert_eq!(w.end - w.start, 30 * 24 * HOUR_MS);
        let w = Window::parse(Some("7d"), None, None, now).unwrap();
        assert_eq!(w.end - w.start, 7 * 24 * HOUR_MS);
        for mtd in ["mtd", "month-to-date", "month_to_date"] {
            let w = Window::parse(Some(mtd), None, None, now).unwrap();
            assert_eq!(rfc3339(w.start), "2026-11-01T00:00:00Z");
        }
        let w = Window::parse(
            Some("custom"),
            Some("2026-10-01"),
            Some("2026-10-02T06:00:00Z"),
            now,
        )
        .unwrap();
        assert_eq!(w.end - w.start, 30 * HOUR_MS);
        for (p, s, e) in [
            (Some("custom"), None, None),
            (Some("90d"), None, None),
            (None, Some("2026-10-01"), None),
            (None, Some("2026-10-02"), Some("2026-10-01")),
            (None, Some("yesterday"), Some("2026-10-01")),
        ] {
            assert_eq!(
                Window::parse(p, s, e, now).unwrap_err().code,
                "invalid_period"
            );
        }
    }

    #[test]
    fn prices() {
        let p = Prices {
            vcpu_second_cents: 0.5,
            storage_gb_hour_cents: 2.0,
        };
        let h = Hour {
            vcpu_ms: 10_000.0,
            disk_gib_ms: 3.0 * HOUR_MS as f64,
        };
        assert_eq!(p.cents(&h), 5.0 + 6.0);
    }
}
