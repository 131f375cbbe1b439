use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

/// Reads `(event id, type, resource id)` frames until `n` have arrived (bounded).
async fn frames(resp: reqwest::Response, n: usize) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while out.len() < n {
        let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await else {
            panic!("only {} of {n} events came: {out:?}", out.len());
        };
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::to_string)
            };
            if let (Some(id), Some(data)) = (field("id: "), field("data: ")) {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                out.push((
                    id,
                    v["type"].as_str().unwrap().to_string(),
                    v["id"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

async fn stream(api: &Api, last: Option<&str>, query: &str) -> reqwest::Response {
    let mut req = api
        .http
        .get(api.url(&format!("/events/stream{query}")))
        .header("Authorization", "Bearer msk_k");
    if let Some(id) = last {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test]
async fn the_tenant_stream_carries_the_lifecycle_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let live = stream(&api, None, "").await;
    let id = api.sandbox().await;
    api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    api.post(&format!("/sandboxes/{id}/resume"), json!({}))
        .await;
    api.delete(&format!("/sandboxes/{id}")).await;
    let got = frames(live, 5).await;
    let kinds: Vec<&str> = got.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sandbox.created",
            "sandbox.ready",
            "sandbox.paused",
            "sandbox.resumed",
            "sandbox.destroyed"
        ]
    );
    assert!(got.iter().all(|(_, _, r)| *r == id));
    let seqs: Vec<u64> = got
        .iter()
        .map(|(e, _, _)| e.strip_prefix("evt_").unwrap().parse().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "increasing ids: {seqs:?}"
    );

    // Resuming after `ready` replays what came after it, also after a restart.
    sd.kill();
    let sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let resumed = frames(stream(&api, Some(&got[1].0), "").await, 3).await;
    assert_eq!(
        resumed
            .iter()
            .map(|(_, k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["sandbox.paused", "sandbox.resumed", "sandbox.destroyed"]
    );
    assert_eq!(resumed[0].0, got[2].0, "the same event ids");

    let only = stream(&api, Some(&got[0].0), "?types=sandbox.destroyed").await;
    assert_eq!(frames(only, 1).await[0].1, "sandbox.destroyed");
    let resp = api
        .http
        .get(api.url("/events/stream"))
        .header("Authorization", "Bearer msk_k")
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
}
