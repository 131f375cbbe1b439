//! `open`, `token` and `close`, counted at sandboxd; the crash of a replica in `open`.

use std::time::Duration;

use slipway_common::{RpcClient, Service};
use slipway_proto::v1::*;
use slipway_test_support::{FailpointRun, workspace_bin};

use crate::{System, code, is_preview_ready};

#[tokio::test]
async fn open_twice_is_one_preview_whose_url_serves_the_app_and_token_gives_a_new_working_url() {
    let sys = System::start(2, &[]).await;
    let sb = sys.app("run_open", "main").await;
    let first = sys.open("run_open", "main", &sb).await;
    // The second replica answers the same preview.
    let again: OpenPreviewReply = sys.replicas[1]
        .rpc
        .call(
            &Service::Preview.op("open"),
            &OpenPreviewRequest {
                run_id: "run_open".into(),
                branch: String::new(),
                port: 3000,
                sandbox_id: sb.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(first.preview_id, again.preview_id);
    assert!(first.token_expires_at.is_some());
    assert_eq!(
        sys.platform_previews(&sb).await.len(),
        1,
        "one preview at sandboxd"
    );

    let (status, body) = sys.status(&first.url).await;
    assert_eq!(status, 200);
    assert!(body.contains("VERSION_ONE"), "{body}");

    let fresh: PreviewTokenRefreshReply = sys
        .call(
            "token",
            &PreviewTokenRefreshRequest {
                preview_id: first.preview_id.clone(),
            },
        )
        .await
        .unwrap();
    assert_ne!(fresh.url, first.url, "a new token");
    assert_eq!(sys.status(&fresh.url).await.0, 200);
    // The earlier token still works until its own expiry.
    assert_eq!(sys.status(&first.url).await.0, 200);
    // One `preview_ready` however many opens.
    sys.wait_for("run_open", is_preview_ready, 1).await;
    assert_eq!(sys.count("run_open", is_preview_ready).await, 1);
    let ready = sys.events("run_open").await;
    let ready = ready
        .iter()
        .find(|e| e.payload.as_ref().is_some_and(is_preview_ready))
        .unwrap();
    assert_eq!(ready.attribution.as_ref().unwrap().user_id, "user-1");
    assert_eq!(ready.branch, "main");
}

#[tokio::test]
async fn close_refuses_every_link_of_the_run_stops_its_relays_and_is_idempotent() {
    let sys = System::start(1, &[]).await;
    let sb = sys.app("run_close", "main").await;
    let opened = sys.open("run_close", "main", &sb).await;
    let a = sys.share("run_close", "close:a", 600).await;
    let b = sys.share("run_close", "close:b", 600).await;
    assert_eq!(sys.status(&a.url).await.0, 200);
    assert_eq!(sys.status(&b.url).await.0, 200);

    let closed: ClosePreviewsReply = sys
        .call(
            "close",
            &ClosePreviewsRequest {
                run_id: "run_close".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(closed.previews_closed, 1);
    assert_eq!(closed.shares_revoked, 2);
    assert_eq!(sys.status(&a.url).await.0, 403);
    assert_eq!(sys.status(&b.url).await.0, 403);
    assert!(
        sys.platform_previews(&sb).await.is_empty(),
        "deleted at sandboxd"
    );
    let shares = sys.platform(&format!("/sandboxes/{sb}/shares")).await;
    assert_eq!(shares["data"].as_array().unwrap().len(), 0, "{shares}");

    // The relay is stopped: a write inside the sandbox is no longer relayed.
    let mut relayed = sys
        .executor
        .nats_client
        .subscribe(format!("slipway.sandboxes.{sb}.files"))
        .await
        .unwrap();
    sys.write(&sb, "close:write", "public/after.txt", "x").await;
    let heard = tokio::time::timeout(
        Duration::from_millis(1500),
        futures::StreamExt::next(&mut relayed),
    )
    .await;
    assert!(heard.is_err(), "a change was relayed after close");

    // Again: nothing left to close; nothing new opens.
    let again: ClosePreviewsReply = sys
        .call(
            "close",
            &ClosePreviewsRequest {
                run_id: "run_close".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!((again.previews_closed, again.shares_revoked), (0, 0));
    let reopened = sys
        .call::<_, OpenPreviewReply>(
            "open",
            &OpenPreviewRequest {
                run_id: "run_close".into(),
                branch: "main".into(),
                port: 3000,
                sandbox_id: sb.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&reopened), ErrorCode::FailedPrecondition);
    let token = sys
        .call::<_, PreviewTokenRefreshReply>(
            "token",
            &PreviewTokenRefreshRequest {
                preview_id: opened.preview_id,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&token), ErrorCode::FailedPrecondition);
}

/// Killed (abort at a failpoint: -9 in effect) after the platform made the preview and before
/// it was recorded; restarted, the caller's retry finds the same preview: one at sandboxd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_open_and_retried_gives_one_preview() {
    let sys = System::start(0, &[]).await;
    let sb = sys.app("run_crash", "main").await;
    let nats = sys.executor.nats.as_ref().unwrap().url();
    let run = FailpointRun::new(workspace_bin("slipway-preview").unwrap())
        .timeout(Duration::from_secs(60))
        .env("SLIPWAY__NATS__URL", nats)
        .env("SLIPWAY__HEALTH__LISTEN", "127.0.0.1:0")
        .env("SLIPWAY__PREVIEW__LISTEN", "127.0.0.1:0");
    let short = RpcClient::new(sys.executor.nats_client.clone(), Duration::from_secs(5));
    let req = OpenPreviewRequest {
        run_id: "run_crash".into(),
        branch: "main".into(),
        port: 3000,
        sandbox_id: sb.clone(),
    };
    let up = || async {
        for _ in 0..200 {
            let probe: Result<ListShareLinksReply, _> = short
                .call(
                    &Service::Preview.op("share.list"),
                    &ListShareLinksRequest {
                        run_id: "run_probe".into(),
                    },
                )
                .await;
            if probe.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the preview service never answered");
    };
    let fp = "preview.open.after_platform";
    let armed = run.spawn(Some(fp)).unwrap();
    up().await;
    let first = short
        .call::<_, OpenPreviewReply>(&Service::Preview.op("open"), &req)
        .await;
    assert!(first.is_err(), "the replica died before it answered");
    let out = armed.wait(Duration::from_secs(60)).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint `{fp}` hit")));
    assert_eq!(
        sys.platform_previews(&sb).await.len(),
        1,
        "made before the crash"
    );

    let again = run.spawn(None).unwrap();
    up().await;
    let opened: OpenPreviewReply = short
        .call(&Service::Preview.op("open"), &req)
        .await
        .unwrap();
    again.terminate().unwrap();
    let _ = again.wait(Duration::from_secs(30));
    let at_platform = sys.platform_previews(&sb).await;
    assert_eq!(at_platform.len(), 1, "{at_platform:?}");
    assert!(opened.url.contains("mt="), "{}", opened.url);
    assert_eq!(sys.count("run_crash", is_preview_ready).await, 1);
}
