//! Verified before announced: a version's URL must answer and serve that version (the platform
//! names the version it served in `x-slipway-version`, and the artifact's digest in
//! `x-slipway-artifact`), reached the way a browser would (host names resolved as
//! `edge.resolve` says).

use std::time::Duration;

use slipway_common::config::EdgeSettings;

/// Checks a URL serves a version, within `within`.
#[derive(Clone)]
pub struct Verifier {
    http: reqwest::Client,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It serves this version.
    Serves,
    /// It answered, but with something else (status, version) after every try.
    Wrong(String),
}

impl Verifier {
    pub fn new(edge: &EdgeSettings) -> anyhow::Result<Self> {
        let http = slipway_common::http::client_builder(edge)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self { http })
    }

    /// Fetches `url` until it answers 200 with `version_id` (or `digest`), at most `within`.
    pub async fn serves(
        &self,
        url: &str,
        version_id: &str,
        digest: &str,
        within: Duration,
    ) -> Verdict {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.http.get(url).send().await {
                Ok(resp) => {
                    let header = |name: &str| {
                        resp.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let (served, artifact) =
                        (header("x-slipway-version"), header("x-slipway-artifact"));
                    let status = resp.status().as_u16();
                    let ours = served == version_id || (!digest.is_empty() && artifact == digest);
                    if status == 200 && ours {
                        return Verdict::Serves;
                    }
                    format!("{url} answered {status} serving version `{served}`")
                }
                Err(e) => format!("{url}: {e}"),
            };
            if tokio::time::Instant::now() >= deadline {
                return Verdict::Wrong(last);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
