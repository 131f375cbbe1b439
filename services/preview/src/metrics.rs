//! The preview service's metrics: open previews and live links (as this replica's index sees
//! them), tokens issued, tickets redeemed and refused (by reason), file-change bursts published.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use slipway_common::metrics::Metrics;

type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct PreviewMetrics {
    open_previews: Gauge,
    live_shares: Gauge,
    tokens: Counter,
    tickets: Family<Labels, Counter>,
    bursts: Counter,
}

impl PreviewMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self {
            open_previews: Gauge::default(),
            live_shares: Gauge::default(),
            tokens: Counter::default(),
            tickets: Family::default(),
            bursts: Counter::default(),
        };
        metrics.register("preview_open", "Previews open", m.open_previews.clone());
        metrics.register(
            "preview_shares_live",
            "Share links neither revoked nor expired",
            m.live_shares.clone(),
        );
        metrics.register(
            "preview_tokens_issued",
            "Preview tokens minted (open and token)",
            m.tokens.clone(),
        );
        metrics.register(
            "preview_tickets",
            "Browser tickets presented, by outcome (redeemed, unknown, expired, reused, other_run)",
            m.tickets.clone(),
        );
        metrics.register(
            "preview_file_change_bursts",
            "files_changed events published (one per debounced burst)",
            m.bursts.clone(),
        );
        m
    }

    pub fn set_open_previews(&self, n: i64) {
        self.open_previews.set(n);
    }

    pub fn set_live_shares(&self, n: i64) {
        self.live_shares.set(n);
    }

    pub fn token_issued(&self) {
        self.tokens.inc();
    }

    pub fn ticket(&self, outcome: &str) {
        self.tickets
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }

    pub fn burst(&self) {
        self.bursts.inc();
    }
}
