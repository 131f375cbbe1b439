//! Share links: one capability per link, revoked one at a time; an expired link refused and
//! announced once with two replicas sweeping.

use std::time::Duration;

use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;

use crate::System;

fn is_expired(p: &Payload) -> bool {
    matches!(p, Payload::ShareExpired(_))
}

fn is_created(p: &Payload) -> bool {
    matches!(p, Payload::ShareCreated(_))
}

fn is_revoked(p: &Payload) -> bool {
    matches!(p, Payload::ShareRevoked(_))
}

#[tokio::test]
async fn two_links_revoke_one_the_other_still_serves_and_a_retry_is_the_same_link() {
    let sys = System::start(2, &[]).await;
    let sb = sys.app("run_links", "main").await;
    sys.open("run_links", "main", &sb).await;
    let a = sys.share("run_links", "links:a", 600).await;
    let b = sys.share("run_links", "links:b", 600).await;
    assert_ne!(a.url, b.url);
    // The same key is the same link (no second capability at sandboxd).
    let a_again = sys.share("run_links", "links:a", 600).await;
    assert_eq!(
        (a_again.share_id, a_again.url),
        (a.share_id.clone(), a.url.clone())
    );
    let at_platform = sys.platform(&format!("/sandboxes/{sb}/shares")).await;
    assert_eq!(
        at_platform["data"].as_array().unwrap().len(),
        2,
        "{at_platform}"
    );
    assert_eq!(sys.status(&a.url).await.0, 200);
    assert_eq!(sys.status(&b.url).await.0, 200);

    let revoked: RevokeShareLinkReply = sys.revoke("run_links", &a.share_id).await.unwrap();
    assert!(revoked.share.unwrap().revoked);
    assert_eq!(sys.status(&a.url).await.0, 403, "the revoked link");
    let (status, body) = sys.status(&b.url).await;
    assert_eq!(status, 200, "the other link");
    assert!(body.contains("VERSION_ONE"));
    // Revoking again answers the link; one `share_revoked`.
    let _: RevokeShareLinkReply = sys.revoke("run_links", &a.share_id).await.unwrap();
    assert_eq!(sys.count("run_links", is_revoked).await, 1);
    assert_eq!(sys.count("run_links", is_created).await, 2);

    let listed: ListShareLinksReply = sys
        .call(
            "share.list",
            &ListShareLinksRequest {
                run_id: "run_links".into(),
            },
        )
        .await
        .unwrap();
    let states: Vec<(String, bool)> = listed
        .shares
        .iter()
        .map(|s| (s.share_id.clone(), s.revoked))
        .collect();
    let mut expected = vec![(a.share_id, true), (b.share_id, false)];
    expected.sort();
    let mut states = states;
    states.sort();
    assert_eq!(states, expected);
}

#[tokio::test]
async fn an_expired_link_is_refused_and_share_expired_is_published_once_by_two_replicas() {
    let sys = System::start(2, &[]).await;
    let sb = sys.app("run_expiry", "main").await;
    sys.open("run_expiry", "main", &sb).await;
    let short = sys.share("run_expiry", "expiry:short", 1).await;
    let long = sys.share("run_expiry", "expiry:long", 600).await;
    sys.wait_for("run_expiry", is_expired, 1).await;
    assert_eq!(
        sys.status(&short.url).await.0,
        401,
        "expired (sandboxd asks for a new link)"
    );
    assert_eq!(sys.status(&long.url).await.0, 200);
    // Several sweeps of both replicas later, still one event.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = sys.expired_shares("run_expiry").await;
    assert_eq!(expired, vec![short.share_id.clone()]);
    let listed: ListShareLinksReply = sys
        .call(
            "share.list",
            &ListShareLinksRequest {
                run_id: "run_expiry".into(),
            },
        )
        .await
        .unwrap();
    let short_now = listed
        .shares
        .iter()
        .find(|s| s.share_id == short.share_id)
        .unwrap();
    assert!(short_now.expired && !short_now.revoked);
}
