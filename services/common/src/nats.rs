//! Connecting to NATS: one connection per component, named, authenticated as that component's
//! own user, retried on first connect, reconnecting forever, with its events logged.

use std::time::Duration;

use async_nats::{ConnectOptions, Event};

use crate::config::NatsSettings;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("nats.nkey_seed_file: {0}")]
    Seed(String),
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Connects as `client_name` (shown by `nats server report connections`).
///
/// With `retry_on_initial_connect`, this returns at once and the client connects in the
/// background; readiness reports the connection state until it is up.
pub async fn connect(
    settings: &NatsSettings,
    client_name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = match (&settings.nkey_seed, &settings.user, &settings.password) {
        (Some(seed), _, _) => {
            nkeys::KeyPair::from_seed(seed.expose())
                .map_err(|e| ConnectError::Seed(e.to_string()))?;
            ConnectOptions::with_nkey(seed.expose().to_string())
        }
        (None, Some(user), Some(password)) => {
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_string())
        }
        _ => ConnectOptions::new(),
    };
    options = options
        .name(client_name)
        .connection_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(settings.request_timeout_ms)))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("connected to NATS"),
                Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
                Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: messages dropped"),
                Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                Event::ClientError(e) => tracing::error!(error = %e, "NATS client error"),
                Event::Draining => tracing::info!("draining the NATS connection"),
                Event::Closed => tracing::info!("NATS connection closed"),
            }
        });
    if let Some(prefix) = &settings.inbox_prefix {
        options = options.custom_inbox_prefix(prefix.clone());
    }
    options
        .connect(settings.url.as_str())
        .await
        .map_err(|source| ConnectError::Connect {
            url: settings.url.clone(),
            source,
        })
}
