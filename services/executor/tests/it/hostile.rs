//! Ids a caller puts in a request go into the platform's URL paths: any that could name another
//! resource there (`/`, `..`, `?`, `#`, `%`) is refused before a call is made, and no other
//! sandbox is touched (counted at sandboxd).

use std::time::Duration;

use slipway_common::RpcClient;
use slipway_proto::v1::*;
use slipway_test_support::{NatsServer, Sandboxd, workspace_bin};

use crate::harness::{op, sandboxes_at_sandboxd};
use crate::service::{create, executor};

/// The ids of the live sandboxes at sandboxd.
async fn live(sd: &Sandboxd) -> Vec<String> {
    let mut ids: Vec<String> = sandboxes_at_sandboxd(sd)
        .await
        .iter()
        .filter(|s| s["state"] == "running")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn invalid(e: &slipway_common::RpcError) -> bool {
    e.service_error()
        .is_some_and(|s| s.code == ErrorCode::InvalidInput)
}

#[tokio::test]
async fn ids_that_would_name_another_path_are_refused_and_touch_nothing() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = executor(&nats, &sd).await;
    let rpc = RpcClient::new(
        async_nats::connect(nats.url()).await.unwrap(),
        Duration::from_secs(30),
    );
    let mut ids = Vec::new();
    for key in ["h:a:1", "h:b:1"] {
        let sb: SandboxReply = rpc.call(&op("sandbox.create"), &create(key)).await.unwrap();
        ids.push(sb.sandbox.unwrap().id);
    }
    let (d, b) = (ids[0].clone(), ids[1].clone());
    let mut before = ids.clone();
    before.sort();
    assert_eq!(live(&sd).await, before);

    for hostile in [
        format!("sbx_x/../{d}"),
        format!("{d}/"),
        format!("../sandboxes/{d}"),
        format!("{b}?x=1#"),
        format!("{b}#frag"),
        format!("{b}/files/workspace/echo.py"),
        format!("{d}%2F"),
        "..".to_string(),
        ".".to_string(),
        format!("{d} "),
        "x".repeat(129),
    ] {
        let e = rpc
            .call::<_, SandboxReply>(
                &op("sandbox.destroy"),
                &SandboxRef {
                    sandbox_id: hostile.clone(),
                    idempotency_key: "h:destroy:1".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(invalid(&e), "destroy {hostile:?}: {e}");
        let e = rpc
            .call::<_, SandboxReply>(
                &op("sandbox.get"),
                &GetSandboxRequest {
                    sandbox_id: hostile.clone(),
                    name: String::new(),
                },
            )
            .await
            .unwrap_err();
        assert!(invalid(&e), "get {hostile:?}: {e}");
        let e = rpc
            .call::<_, ReadFileReply>(
                &op("files.read"),
                &ReadFileRequest {
                    sandbox_id: hostile.clone(),
                    path: "/workspace/a".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(invalid(&e), "files.read {hostile:?}: {e}");
    }
    assert_eq!(live(&sd).await, before, "a sandbox was touched");

    // A well-formed id still works.
    let got: SandboxReply = rpc
        .call(
            &op("sandbox.get"),
            &GetSandboxRequest {
                sandbox_id: b.clone(),
                name: String::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(got.sandbox.unwrap().id, b);
    ex.stop().await.unwrap();
}
