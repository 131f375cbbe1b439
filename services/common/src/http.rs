//! Slipway's HTTP clients: the TLS provider installed, and edge host names (previews, shares,
//! deployments under `edge.domain`) sent to `edge.resolve` when it is set, since not every
//! resolver maps `*.localhost` to loopback and a cluster may route the edge differently.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::EdgeSettings;

/// A client builder that follows edge URLs as `edge` says.
pub fn client_builder(edge: &EdgeSettings) -> reqwest::ClientBuilder {
    crate::tls::install_default_provider();
    reqwest::Client::builder().dns_resolver(Arc::new(EdgeResolver(edge.clone())))
}

struct EdgeResolver(EdgeSettings);

impl Resolve for EdgeResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let fixed = self.0.resolve_host(name.as_str());
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match fixed {
                Some(addr) => vec![addr],
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn edge_names_go_to_the_edge_and_others_to_the_system() {
        let edge = EdgeSettings {
            domain: "localhost".into(),
            resolve: Some("127.0.0.1:1".parse().unwrap()),
        };
        let r = EdgeResolver(edge);
        let got: Vec<SocketAddr> = r
            .resolve("3000-a-b.preview.localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(got, vec!["127.0.0.1:1".parse().unwrap()]);
        let got: Vec<SocketAddr> = r
            .resolve("127.0.0.1".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(got[0].ip(), std::net::Ipv4Addr::LOCALHOST);
    }
}
