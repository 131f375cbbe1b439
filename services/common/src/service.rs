//! Serving a service's operations over the NATS service API (`$SRV.PING|INFO|STATS`, a queue
//! group per endpoint so replicas share the load). Each request is decoded (protobuf or JSON),
//! handled in the caller's trace, and answered with the typed reply or a `ServiceError`, in the
//! form it came in.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use slipway_proto::WireMessage;
use slipway_proto::codec::{self, CONTENT_TYPE_HEADER, ContentType};
use slipway_proto::v1::Error as ErrorMessage;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::rpc::{
    SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER, ServiceError, decode_message, message_headers,
};
use crate::shutdown::Shutdown;
use crate::subjects::Service;

/// What a handler knows about the request besides its message.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    pub subject: String,
    pub op: String,
    pub headers: Option<async_nats::HeaderMap>,
}

#[derive(Debug, thiserror::Error)]
#[error("NATS service `{name}`: {message}")]
pub struct HostError {
    pub name: String,
    pub message: String,
}

/// One service's presence on NATS.
pub struct ServiceHost {
    service: Service,
    client: async_nats::Client,
    nats_service: Mutex<Option<async_nats::service::Service>>,
    shutdown: Shutdown,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl ServiceHost {
    /// Registers `slipway-<service>` with the NATS service API.
    pub async fn start(
        client: async_nats::Client,
        service: Service,
        description: &str,
        shutdown: Shutdown,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, HostError> {
        let nats_service = client
            .clone()
            .service_builder()
            .description(description)
            .start(service.nats_service_name(), env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| HostError {
                name: service.nats_service_name(),
                message: e.to_string(),
            })?;
        Ok(Arc::new(Self {
            service,
            client,
            nats_service: Mutex::new(Some(nats_service)),
            shutdown,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            metrics,
        }))
    }

    /// Adds the operation `op` (`slipway.<service>.v1.<op>`), handled by `handler`.
    pub async fn endpoint<Req, Resp, F, Fut>(&self, op: &str, handler: F) -> Result<(), HostError>
    where
        Req: WireMessage + 'static,
        Resp: WireMessage + 'static,
        F: Fn(Req, RequestInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, ServiceError>> + Send + 'static,
    {
        // The operations table is what the generated authorization follows: an operation missing
        // from it could be served but never called.
        if !crate::operations::of(self.service).any(|o| o.op == op) {
            return Err(HostError {
                name: self.service.nats_service_name(),
                message: format!(
                    "operation `{op}` is not in the operations table (services/common/src/operations.rs)"
                ),
            });
        }
        let subject = self.service.op(op);
        let builder = {
            let guard = self.nats_service.lock().unwrap_or_else(|p| p.into_inner());
            let svc = guard.as_ref().ok_or_else(|| HostError {
                name: self.service.nats_service_name(),
                message: "stopped".into(),
            })?;
            svc.endpoint_builder().name(op.replace('.', "_"))
        };
        let mut endpoint = builder.add(subject.clone()).await.map_err(|e| HostError {
            name: self.service.nats_service_name(),
            message: format!("adding `{subject}`: {e}"),
        })?;
        let handler = Arc::new(handler);
        let tracker = self.shutdown.tracker().clone();
        let permits = self.permits.clone();
        let metrics = self.metrics.clone();
        let service = self.service;
        let op = op.to_string();
        let token = self.shutdown.token().clone();
        let client = self.client.clone();
        self.shutdown.tracker().spawn(async move {
            // Ends when the service is stopped and the requests already delivered are taken. With
            // NATS gone at shutdown the unsubscribe never completes, so then it ends once no
            // request arrives for a moment, rather than hold the exit up.
            loop {
                let gone = || client.connection_state() != async_nats::connection::State::Connected;
                let next = tokio::select! {
                    biased;
                    next = endpoint.next() => next,
                    () = token.cancelled() => {
                        let wait = std::time::Duration::from_millis(if gone() { 100 } else { 200 });
                        match tokio::time::timeout(wait, endpoint.next()).await {
                            Ok(next) => next,
                            // Gone: nothing more will come. Connected: the unsubscribe will end
                            // the stream; look again (NATS may go meanwhile).
                            Err(_) if gone() => None,
                            Err(_) => continue,
                        }
                    }
                };
                let Some(request) = next else { break };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let handler = handler.clone();
                let metrics = metrics.clone();
                let info = RequestInfo {
                    subject: request.message.subject.to_string(),
                    op: op.clone(),
                    headers: request.message.headers.clone(),
                };
                tracker.spawn(async move {
                    handle(service, request, info, handler, metrics).await;
                    drop(permit);
                });
            }
        });
        Ok(())
    }

    /// Stops taking requests: unsubscribes every endpoint; delivered requests still complete.
    pub fn stop(&self) {
        let svc = self
            .nats_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(svc) = svc {
            tokio::spawn(async move {
                if let Err(e) = svc.stop().await {
                    tracing::warn!(error = %e, "stopping the NATS service");
                }
            });
        }
    }
}

async fn handle<Req, Resp, F, Fut>(
    service: Service,
    request: async_nats::service::Request,
    info: RequestInfo,
    handler: Arc<F>,
    metrics: Arc<Metrics>,
) where
    Req: WireMessage,
    Resp: WireMessage,
    F: Fn(Req, RequestInfo) -> Fut,
    Fut: Future<Output = Result<Resp, ServiceError>>,
{
    let started = Instant::now();
    let span = tracing::info_span!("rpc.serve", service = %service, op = %info.op);
    crate::telemetry::set_parent_from(&span, info.headers.as_ref());
    async move {
        let headers = request.message.headers.as_ref();
        let content_type = ContentType::detect(
            headers
                .and_then(|h| h.get(CONTENT_TYPE_HEADER))
                .map(|v| v.as_str()),
            &request.message.payload,
        )
        .unwrap_or(ContentType::Protobuf);
        let result = match decode_message::<Req>(headers, &request.message.payload) {
            Ok(req) => handler(req, info.clone()).await,
            Err(e) => Err(ServiceError::from(e)),
        };
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => {
                tracing::debug!(error = %e, "request refused");
                e.code
                    .as_str_name()
                    .trim_start_matches("ERROR_CODE_")
                    .to_lowercase()
            }
        };
        let (headers, body) = reply(result, content_type);
        if request.message.reply.is_none() {
            tracing::warn!(subject = %info.subject, "request without a reply subject dropped");
        } else if let Err(e) = request.respond_with_headers(Ok(body), headers).await {
            tracing::warn!(error = %e, "sending a reply failed");
        }
        metrics.observe_request(
            service.as_str(),
            &info.op,
            &outcome,
            started.elapsed().as_secs_f64(),
        );
    }
    .instrument(span)
    .await
}

/// The headers and body of a reply. Errors keep the NATS service API's headers and carry the
/// typed `Error` in the body.
pub fn reply<Resp: WireMessage>(
    result: Result<Resp, ServiceError>,
    content_type: ContentType,
) -> (async_nats::HeaderMap, Bytes) {
    match result {
        Ok(resp) => (
            message_headers::<Resp>(content_type),
            Bytes::from(codec::encode(&resp, content_type)),
        ),
        Err(e) => {
            let mut headers = message_headers::<ErrorMessage>(content_type);
            let first_line = e.message.lines().next().unwrap_or("").to_string();
            headers.insert(SERVICE_ERROR_HEADER, first_line.as_str());
            headers.insert(SERVICE_ERROR_CODE_HEADER, e.status().to_string().as_str());
            (
                headers,
                Bytes::from(codec::encode(&e.to_message(), content_type)),
            )
        }
    }
}

/// Adds an endpoint per `"op" => method` to a service host: each request goes to
/// `state.method(req)` on a clone of the shared state (an `Arc` of the service's struct). The
/// one registration every service's `serve` makes:
///
/// ```ignore
/// slipway_common::endpoints!(host, state, {
///     "sandbox.create" => create,
///     "sandbox.get" => get,
/// });
/// ```
#[macro_export]
macro_rules! endpoints {
    ($host:expr, $state:expr, { $($op:literal => $method:ident),* $(,)? }) => {
        $(
            let state = $state.clone();
            $host
                .endpoint($op, move |req, _| {
                    let state = state.clone();
                    async move { state.$method(req).await }
                })
                .await?;
        )*
    };
}

/// A required id-like field of a request (non-empty, bounded, no control characters), refused
/// as invalid input naming the field.
pub fn required(field: &'static str, value: &str) -> Result<(), ServiceError> {
    slipway_proto::validate::check_id(field, value, true).map_err(ServiceError::from)
}

/// Now, as the contract's timestamp.
pub fn now() -> pbjson_types::Timestamp {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
    }
}
