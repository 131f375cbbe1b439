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
    edge: EdgeSettings,
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
        // No redirects: a tenant's app could send the deployer anywhere.
        let http = slipway_common::http::client_builder(edge)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            edge: edge.clone(),
        })
    }

    /// Fetches `url` until it answers 200 with `version_id` (or `digest`), at most `within`.
    pub async fn serves(
        &self,
        url: &str,
        version_id: &str,
        digest: &str,
        within: Duration,
    ) -> Verdict {
        // Only deployment URLs under the edge's domain are fetched; and what is said of a failure
        // names no address or error of the network (it reaches the tenant).
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let domain = self.edge.domain.trim_end_matches('.').to_ascii_lowercase();
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host != domain && !host.ends_with(&format!(".{domain}")) {
            return Verdict::Wrong("its URL is not under the deployment domain".into());
        }
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
                    if status == 200 {
                        "its URL serves another version".to_string()
                    } else {
                        format!("its URL answered {status}")
                    }
                }
                Err(_) => "its URL did not answer".to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Verdict::Wrong(last);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
