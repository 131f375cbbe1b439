//! Browser tickets: `ticket` mints one (single use, one run, `preview.ticket_ttl_sec`), and
//! `redeem` spends it, at the record's revision, so of two replicas redeeming the same ticket
//! one wins. The browser API maps a refusal to its HTTP status.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use slipway_common::records::RecordError;
use slipway_common::service::now;
use slipway_common::subjects::streams;
use slipway_common::{ServiceError, subjects};
use slipway_proto::v1::*;

use crate::ids::{check_run, run_key, ticket_key};
use crate::service::{Preview, store};

/// Why a ticket was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("a ticket from `ticket` is required")]
    Missing,
    #[error("this ticket is not valid")]
    Unknown,
    #[error("this ticket was used already")]
    Used,
    #[error("this ticket has expired")]
    Expired,
    #[error("this ticket is for another run")]
    OtherRun,
    #[error("the tickets bucket: {0}")]
    Unavailable(String),
}

impl Refused {
    /// The machine-readable code (and the metric's outcome).
    pub fn code(&self) -> &'static str {
        match self {
            Refused::Missing => "ticket_required",
            Refused::Unknown => "ticket_unknown",
            Refused::Used => "ticket_used",
            Refused::Expired => "ticket_expired",
            Refused::OtherRun => "ticket_other_run",
            Refused::Unavailable(_) => "unavailable",
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Refused::Missing | Refused::Unknown => "unknown",
            Refused::Used => "reused",
            Refused::Expired => "expired",
            Refused::OtherRun => "other_run",
            Refused::Unavailable(_) => "unavailable",
        }
    }
}

impl Preview {
    /// `ticket`: a short, single-use pass for a browser to one run's events and previews. Only
    /// its digest is stored.
    pub async fn ticket(&self, req: IssueTicketRequest) -> Result<IssueTicketReply, ServiceError> {
        check_run(&req.run_id)?;
        if !self.run_known(&req.run_id).await? {
            return Err(
                ServiceError::not_found(format!("run_id: no run `{}`", req.run_id))
                    .with_detail("field", "run_id"),
            );
        }
        let secret: [u8; 32] = rand::random();
        let ticket = format!("tk_{}", URL_SAFE_NO_PAD.encode(secret));
        let ttl = Duration::from_secs(self.settings.ticket_ttl_sec);
        let mut expires_at = now();
        expires_at.seconds += ttl.as_secs() as i64;
        let record = TicketRecord {
            run_id: req.run_id.clone(),
            expires_at: Some(expires_at),
            redeemed_at: None,
        };
        self.tickets
            .create(&ticket_key(&ticket), &record)
            .await
            .map_err(store)?;
        let base = self.browser_base.get().cloned().unwrap_or_default();
        let run = &req.run_id;
        Ok(IssueTicketReply {
            events_url: format!("{base}/v1/runs/{run}/events?ticket={ticket}"),
            previews_url: format!("{base}/v1/runs/{run}/previews?ticket={ticket}"),
            ticket,
            expires_at: Some(expires_at),
        })
    }

    /// A run is known once it has an event or a preview record.
    async fn run_known(&self, run_id: &str) -> Result<bool, ServiceError> {
        if self
            .runs
            .get(&run_key(run_id)?)
            .await
            .map_err(store)?
            .is_some()
        {
            return Ok(true);
        }
        let filter = subjects::run_events(run_id)
            .map_err(|e| ServiceError::invalid_input(format!("run_id: {e}")))?;
        let stream = self
            .jetstream
            .get_stream_no_info(streams::RUN_EVENTS)
            .await
            .map_err(|e| ServiceError::unavailable(format!("{}: {e}", streams::RUN_EVENTS)))?;
        let mut info = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| ServiceError::unavailable(format!("{}: {e}", streams::RUN_EVENTS)))?;
        use futures::TryStreamExt;
        let first = info
            .try_next()
            .await
            .map_err(|e| ServiceError::unavailable(format!("{}: {e}", streams::RUN_EVENTS)))?;
        Ok(first.is_some())
    }
}

impl Preview {
    /// Spends the ticket on `run`: at the record's revision, so it is spent once however many
    /// replicas try. A ticket for another run is refused without being spent.
    pub async fn redeem(&self, run: &str, ticket: Option<&str>) -> Result<(), Refused> {
        let result = self.try_redeem(run, ticket).await;
        self.metrics.ticket(match &result {
            Ok(()) => "redeemed",
            Err(r) => r.outcome(),
        });
        result
    }

    async fn try_redeem(&self, run: &str, ticket: Option<&str>) -> Result<(), Refused> {
        let ticket = ticket.ok_or(Refused::Missing)?;
        let key = ticket_key(ticket);
        for _ in 0..4 {
            let found = self
                .tickets
                .get(&key)
                .await
                .map_err(|e| Refused::Unavailable(e.to_string()))?;
            let Some((record, revision)) = found else {
                return Err(Refused::Unknown);
            };
            if record.run_id != run {
                return Err(Refused::OtherRun);
            }
            if record.redeemed_at.is_some() {
                return Err(Refused::Used);
            }
            let at = now();
            if record
                .expires_at
                .is_none_or(|e| (e.seconds, e.nanos) <= (at.seconds, at.nanos))
            {
                return Err(Refused::Expired);
            }
            let spent = TicketRecord {
                redeemed_at: Some(at),
                ..record
            };
            match self.tickets.update(&key, &spent, revision).await {
                Ok(_) => return Ok(()),
                // Redeemed (or changed) meanwhile: read it again.
                Err(RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(Refused::Unavailable(e.to_string())),
            }
        }
        Err(Refused::Used)
    }
}
