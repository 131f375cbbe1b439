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

    let closed: ClosePreviewsReply = sys.close("run_close").await;
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
    let again: ClosePreviewsReply = sys.close("run_close").await;
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

/// The preview's binary on the system's nats-server, ready to run with a failpoint.
fn binary(sys: &System) -> FailpointRun {
    FailpointRun::new(workspace_bin("slipway-preview").unwrap())
        .timeout(Duration::from_secs(60))
        .env(
            "SLIPWAY__NATS__URL",
            sys.executor.nats.as_ref().unwrap().url(),
        )
        .env("SLIPWAY__HEALTH__LISTEN", "127.0.0.1:0")
        .env("SLIPWAY__PREVIEW__LISTEN", "127.0.0.1:0")
        .env("SLIPWAY__PREVIEW__SWEEP_INTERVAL_MS", "200")
}

/// A client that gives up quickly (a crashed replica never answers).
fn short(sys: &System) -> RpcClient {
    RpcClient::new(sys.executor.nats_client.clone(), Duration::from_secs(5))
}

/// Waits until a preview replica answers.
async fn up(rpc: &RpcClient) {
    for _ in 0..200 {
        let probe: Result<ListShareLinksReply, _> = rpc
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
}

/// Runs the binary armed at `fp`, sends `req` to `op` (the replica dies before answering), and
/// checks it died there.
async fn crash_at<Req: slipway_proto::WireMessage>(sys: &System, fp: &str, op: &str, req: &Req) {
    let rpc = short(sys);
    let armed = binary(sys).spawn(Some(fp)).unwrap();
    up(&rpc).await;
    let first: Result<ListShareLinksReply, _> = rpc.call(&Service::Preview.op(op), req).await;
    assert!(first.is_err(), "{fp}: the replica died before it answered");
    let out = armed.wait(Duration::from_secs(60)).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint `{fp}` hit")),
        "{fp}"
    );
}

/// Killed (abort at a failpoint: -9 in effect) after the platform made the preview and before
/// it was recorded; restarted, the caller's retry finds the same preview: one at sandboxd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_open_and_retried_gives_one_preview() {
    let sys = System::start(0, &[]).await;
    let sb = sys.app("run_crash", "main").await;
    let req = OpenPreviewRequest {
        run_id: "run_crash".into(),
        branch: "main".into(),
        port: 3000,
        sandbox_id: sb.clone(),
    };
    crash_at(&sys, "preview.open.after_platform", "open", &req).await;
    assert_eq!(
        sys.platform_previews(&sb).await.len(),
        1,
        "made before the crash"
    );

    let again = binary(&sys).spawn(None).unwrap();
    let rpc = short(&sys);
    up(&rpc).await;
    let opened: OpenPreviewReply = rpc.call(&Service::Preview.op("open"), &req).await.unwrap();
    again.terminate().unwrap();
    let _ = again.wait(Duration::from_secs(30));
    let at_platform = sys.platform_previews(&sb).await;
    assert_eq!(at_platform.len(), 1, "{at_platform:?}");
    assert!(opened.url.contains("mt="), "{}", opened.url);
    assert_eq!(sys.count("run_crash", is_preview_ready).await, 1);
}

/// Killed after the platform made a link and before it was recorded: the retry answers that
/// same link (one at sandboxd); a link left so and never retried is revoked by `close` (none
/// left open at sandboxd); killed after `share_expired` went out and before it was marked, the
/// restarted sweeper adds no second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_making_a_link_or_announcing_its_expiry_leaves_one_link_and_one_event() {
    let sys = System::start(0, &[]).await;
    let sb = sys.app("run_lcrash", "main").await;
    let rpc = short(&sys);
    let share = |key: &str, ttl: u64| CreateShareLinkRequest {
        run_id: "run_lcrash".into(),
        branch: "main".into(),
        ttl_sec: ttl,
        idempotency_key: key.into(),
    };
    let active = || async {
        sys.platform(&format!("/sandboxes/{sb}/shares")).await["data"]
            .as_array()
            .unwrap()
            .len()
    };
    {
        let replica = binary(&sys).spawn(None).unwrap();
        up(&rpc).await;
        let _: OpenPreviewReply = rpc
            .call(
                &Service::Preview.op("open"),
                &OpenPreviewRequest {
                    run_id: "run_lcrash".into(),
                    branch: "main".into(),
                    port: 3000,
                    sandbox_id: sb.clone(),
                },
            )
            .await
            .unwrap();
        replica.terminate().unwrap();
        let _ = replica.wait(Duration::from_secs(30));
    }

    crash_at(
        &sys,
        "preview.share.after_platform",
        "share.create",
        &share("lc:a", 600),
    )
    .await;
    assert_eq!(active().await, 1, "made before the crash");
    let replica = binary(&sys).spawn(None).unwrap();
    up(&rpc).await;
    let a: ShareLinkReply = rpc
        .call(&Service::Preview.op("share.create"), &share("lc:a", 600))
        .await
        .unwrap();
    let a = a.share.unwrap();
    assert_eq!(active().await, 1, "the retry is the same link");
    assert_eq!(sys.status(&a.url).await.0, 200);
    replica.terminate().unwrap();
    let _ = replica.wait(Duration::from_secs(30));

    // Left half-made, then the run closes.
    crash_at(
        &sys,
        "preview.share.after_platform",
        "share.create",
        &share("lc:b", 600),
    )
    .await;
    assert_eq!(active().await, 2);

    // A short link whose expiry announcement is cut off after publishing.
    let replica = binary(&sys).spawn(None).unwrap();
    up(&rpc).await;
    let c: ShareLinkReply = rpc
        .call(&Service::Preview.op("share.create"), &share("lc:c", 1))
        .await
        .unwrap();
    let c = c.share.unwrap();
    replica.terminate().unwrap();
    let _ = replica.wait(Duration::from_secs(30));
    let armed = binary(&sys)
        .spawn(Some("preview.sweep.after_publish"))
        .unwrap();
    let out = armed.wait(Duration::from_secs(60)).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("preview.sweep.after_publish"));

    let replica = binary(&sys).spawn(None).unwrap();
    up(&rpc).await;
    let closed: ClosePreviewsReply = rpc
        .call(
            &Service::Preview.op("close"),
            &ClosePreviewsRequest {
                run_id: "run_lcrash".into(),
            },
        )
        .await
        .unwrap();
    // a and the half-made b are revoked (c had expired).
    assert_eq!(closed.shares_revoked, 2);
    assert_eq!(active().await, 0, "nothing left open at sandboxd");
    // Sweeps of the restarted replica later, still one `share_expired`.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    replica.terminate().unwrap();
    let _ = replica.wait(Duration::from_secs(30));
    let expired = sys.expired_shares("run_lcrash").await;
    assert_eq!(expired, vec![c.share_id]);
}
