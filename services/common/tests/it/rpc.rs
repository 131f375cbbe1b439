use std::time::Duration;

use futures::StreamExt;
use slipway_common::rpc::{RpcError, ServiceError, read_reply};
use slipway_common::{RpcClient, Service};
use slipway_proto::codec;
use slipway_proto::v1::{ErrorCode, GetSandboxRequest, Sandbox, SandboxReply};
use slipway_test_support::NatsServer;
use tracing::Instrument;

use crate::helpers::{TestApp, settings, spawn_app};

/// An executor-shaped test service: `sandbox.get` answers with the trace id it saw as the name.
async fn echo_service(server: &NatsServer) -> TestApp {
    spawn_app(
        Service::Executor,
        settings(&server.url(), &[]),
        |host| async move {
            host.endpoint("sandbox.get", |req: GetSandboxRequest, _info| async move {
                match req.sandbox_id.as_str() {
                    "missing" => Err(ServiceError::not_found("sandbox missing does not exist")
                        .with_detail("platform_code", "sandbox_not_found")),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        Ok(SandboxReply::default())
                    }
                    id => Ok(SandboxReply {
                        sandbox: Some(Sandbox {
                            id: id.to_string(),
                            name: slipway_common::telemetry::current_trace_id().unwrap_or_default(),
                            ..Default::default()
                        }),
                    }),
                }
            })
            .await
            .unwrap();
        },
    )
    .await
}

fn get(id: &str) -> GetSandboxRequest {
    GetSandboxRequest {
        sandbox_id: id.into(),
        name: String::new(),
    }
}

async fn client(server: &NatsServer) -> RpcClient {
    RpcClient::new(
        async_nats::connect(server.url()).await.unwrap(),
        Duration::from_secs(5),
    )
}

const SUBJECT: &str = "slipway.executor.v1.sandbox.get";

#[tokio::test]
async fn typed_reply_and_typed_error() {
    let server = NatsServer::start().unwrap();
    let _app = echo_service(&server).await;
    let rpc = client(&server).await;

    let reply: SandboxReply = rpc.call(SUBJECT, &get("sbx_1")).await.unwrap();
    assert_eq!(reply.sandbox.unwrap().id, "sbx_1");

    let err = rpc
        .call::<_, SandboxReply>(SUBJECT, &get("missing"))
        .await
        .unwrap_err();
    let e = err.service_error().expect("a service error");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.message, "sandbox missing does not exist");
    assert_eq!(
        e.details.get("platform_code").map(String::as_str),
        Some("sandbox_not_found")
    );

    // Generic NATS tools see the service API's headers.
    let raw = rpc
        .nats()
        .request(
            SUBJECT,
            codec::encode(&get("missing"), codec::ContentType::Protobuf).into(),
        )
        .await
        .unwrap();
    let headers = raw.headers.unwrap();
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "404"
    );
    assert_eq!(
        headers.get("Nats-Service-Error").unwrap().as_str(),
        "sandbox missing does not exist"
    );
}

#[tokio::test]
async fn timeouts_and_missing_services_are_distinct_errors() {
    let server = NatsServer::start().unwrap();
    let _app = echo_service(&server).await;
    let rpc = client(&server).await;
    let e = rpc
        .call_with_timeout::<_, SandboxReply>(SUBJECT, &get("slow"), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::Timeout { .. }), "{e}");
    let e = rpc
        .call::<_, SandboxReply>("slipway.billing.v1.usage.get", &get("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::NoResponders { .. }), "{e}");
}

#[tokio::test]
async fn a_malformed_reply_is_a_decode_error_not_a_panic() {
    let server = NatsServer::start().unwrap();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut sub = nats.subscribe("slipway.deployer.v1.garbage").await.unwrap();
    let responder = nats.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Content-Type", "application/x-protobuf");
            responder
                .publish_with_headers(m.reply.unwrap(), h, vec![0xff, 0xff, 0xff, 0x07].into())
                .await
                .unwrap();
        }
    });
    let rpc = RpcClient::new(nats, Duration::from_secs(5));
    let e = rpc
        .call::<_, SandboxReply>("slipway.deployer.v1.garbage", &get("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::MalformedReply { .. }), "{e}");
}

#[tokio::test]
async fn bad_requests_get_invalid_input_and_the_service_keeps_serving() {
    let server = NatsServer::start().unwrap();
    let _app = echo_service(&server).await;
    let nats = async_nats::connect(server.url()).await.unwrap();

    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/x-protobuf");
    let reply = nats
        .request_with_headers(SUBJECT, h, vec![0xff, 0xff, 0xff].into())
        .await
        .unwrap();
    let e =
        read_reply::<SandboxReply>(SUBJECT, reply.headers.as_ref(), &reply.payload).unwrap_err();
    assert_eq!(
        e.service_error().unwrap().code,
        ErrorCode::InvalidInput,
        "{e}"
    );

    let mut h = async_nats::HeaderMap::new();
    h.insert("Slipway-Message-Type", "slipway.v1.PromptSubmitted");
    let reply = nats
        .request_with_headers(SUBJECT, h, "{}".into())
        .await
        .unwrap();
    let e =
        read_reply::<SandboxReply>(SUBJECT, reply.headers.as_ref(), &reply.payload).unwrap_err();
    assert!(e.to_string().contains("PromptSubmitted"), "{e}");

    // JSON in, JSON out, no headers needed (`nats req` works).
    let reply = nats
        .request(SUBJECT, r#"{"sandbox_id":"sbx_json"}"#.into())
        .await
        .unwrap();
    assert_eq!(
        reply
            .headers
            .as_ref()
            .unwrap()
            .get("Content-Type")
            .unwrap()
            .as_str(),
        "application/json"
    );
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["sandbox"]["id"], "sbx_json");

    let ok: SandboxReply = client(&server)
        .await
        .call(SUBJECT, &get("after"))
        .await
        .unwrap();
    assert_eq!(ok.sandbox.unwrap().id, "after");
}

#[tokio::test]
async fn the_trace_id_crosses_a_request_reply_hop_unchanged() {
    let server = NatsServer::start().unwrap();
    let _app = echo_service(&server).await;
    let rpc = client(&server).await;
    let span = tracing::info_span!("caller");
    let (sent, seen) = async {
        let sent = slipway_common::telemetry::current_trace_id().expect("the caller has a trace");
        let reply: SandboxReply = rpc.call(SUBJECT, &get("sbx_t")).await.unwrap();
        (sent, reply.sandbox.unwrap().name)
    }
    .instrument(span)
    .await;
    assert_eq!(sent.len(), 32);
    assert_eq!(seen, sent, "the handler ran in the caller's trace");
}

#[test]
fn a_bare_service_api_error_decodes_from_its_headers() {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Service-Error", "rate limited");
    h.insert("Nats-Service-Error-Code", "429");
    let e = read_reply::<SandboxReply>("s", Some(&h), &[]).unwrap_err();
    let se = e.service_error().unwrap();
    assert_eq!(se.code, ErrorCode::RateLimited);
    assert_eq!(se.message, "rate limited");
    for code in [
        ErrorCode::InvalidInput,
        ErrorCode::NotFound,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Unauthorized,
    ] {
        let status = ServiceError::new(code, "m").status();
        assert_eq!(
            ServiceError::code_for_status(status),
            code,
            "{code:?} survives a status round trip"
        );
    }
}
