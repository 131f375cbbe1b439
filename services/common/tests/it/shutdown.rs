use std::sync::Arc;
use std::time::Duration;

use slipway_common::{RpcClient, Service};
use slipway_proto::v1::{GetSandboxRequest, Sandbox, SandboxReply};
use slipway_test_support::NatsServer;
use tokio::sync::{Notify, mpsc};

use crate::helpers::{admin_setup, readyz, readyz_until, settings, spawn_app};

#[tokio::test]
async fn readyz_turns_503_on_shutdown_while_in_flight_work_completes() {
    let server = NatsServer::start().unwrap();
    admin_setup(&server.url()).await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let handler_release = release.clone();
    let app = spawn_app(
        Service::Executor,
        settings(&server.url(), &[]),
        move |host| {
            let started_tx = started_tx.clone();
            let release = handler_release.clone();
            async move {
                host.endpoint("sandbox.get", move |req: GetSandboxRequest, _| {
                    let started_tx = started_tx.clone();
                    let release = release.clone();
                    async move {
                        started_tx.send(()).unwrap();
                        release.notified().await;
                        Ok(SandboxReply {
                            sandbox: Some(Sandbox {
                                id: req.sandbox_id,
                                ..Default::default()
                            }),
                        })
                    }
                })
                .await
                .unwrap();
            }
        },
    )
    .await;
    readyz_until(app.health, "ready", |s, _| s == 200).await;

    let rpc = RpcClient::new(
        async_nats::connect(server.url()).await.unwrap(),
        Duration::from_secs(20),
    );
    let call = {
        let rpc = rpc.clone();
        tokio::spawn(async move {
            rpc.call::<_, SandboxReply>(
                "slipway.executor.v1.sandbox.get",
                &GetSandboxRequest {
                    sandbox_id: "in-flight".into(),
                    name: String::new(),
                },
            )
            .await
        })
    };
    started.recv().await.unwrap();

    app.shutdown.trigger();
    let (status, body) = readyz_until(app.health, "not ready on shutdown", |s, _| s == 503).await;
    assert_eq!(status, 503);
    assert_eq!(body["failing"]["shutdown"], "shutting down");
    assert!(
        !app.task.is_finished(),
        "shutdown waits for the request in flight"
    );

    // New work is no longer taken...
    let refused = rpc
        .call_with_timeout::<_, SandboxReply>(
            "slipway.executor.v1.sandbox.get",
            &GetSandboxRequest {
                sandbox_id: "late".into(),
                name: String::new(),
            },
            Duration::from_millis(500),
        )
        .await;
    assert!(refused.is_err(), "a request after shutdown is not served");
    // ...while the health endpoint still answers, and the work in flight completes.
    assert_eq!(readyz(app.health).await.0, 503);
    release.notify_one();
    let reply = call
        .await
        .unwrap()
        .expect("the in-flight request got its reply");
    assert_eq!(reply.sandbox.unwrap().id, "in-flight");
    tokio::time::timeout(Duration::from_secs(15), app.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn readyz_stays_503_until_the_service_has_registered_what_it_serves() {
    let server = NatsServer::start().unwrap();
    admin_setup(&server.url()).await;
    let shutdown = slipway_common::Shutdown::new();
    let app = slipway_common::App::start(
        Service::Preview,
        settings(&server.url(), &[]),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let health = app.health_addr;
    // Connected and verified, but nothing registered yet: not ready, and it says why.
    let (status, body) = readyz_until(health, "verified", |_, b| {
        b["failing"].get("topology").is_none() && b["failing"].get("nats").is_none()
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["failing"]["registered"].is_string(), "{body}");
    let host = app.service_host("test").await.unwrap();
    host.endpoint("token", |req: GetSandboxRequest, _| async move {
        Ok(SandboxReply {
            sandbox: Some(Sandbox {
                id: req.sandbox_id,
                ..Default::default()
            }),
        })
    })
    .await
    .unwrap();
    assert_eq!(readyz(health).await.0, 503, "still starting until run");
    let task = tokio::spawn(app.run());
    readyz_until(health, "ready once running", |s, _| s == 200).await;
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
