use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

/// Reads SSE `data:` payloads from a response until `pred` matches one (bounded).
async fn wait_for_event(
    resp: reqwest::Response,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            for line in frame.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    let v: serde_json::Value = serde_json::from_str(data).unwrap();
                    let done = pred(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
            }
        }
    }
    panic!("the expected event never came; saw {seen:?}");
}

#[tokio::test]
async fn writes_by_processes_inside_arrive_on_the_watch_stream() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let resp = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/files/watch?path=/workspace")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (code, _, _) = api
        .exec(
            &id,
            "mkdir -p src/deep && echo hi > src/deep/made-inside.txt",
        )
        .await;
    assert_eq!(code, 0);
    let seen = wait_for_event(resp, |v| {
        // `created` (possibly reported by the scan of a directory made a moment earlier) or
        // `modified` (the close after writing), depending on who is faster.
        v["path"] == "/workspace/src/deep/made-inside.txt"
            && (v["event"] == "modified" || v["event"] == "created")
    })
    .await;
    let ev = seen.last().unwrap();
    assert_eq!(ev["type"], ev["event"], "both keys the SDKs read");
    assert_eq!(ev["is_dir"], false);
    assert!(
        seen.iter().any(|v| v["path"] == "/workspace/src"
            && v["event"] == "created"
            && v["is_dir"] == true)
    );

    // Deletes, and API writes, arrive too; a watch on a subdirectory sees only its part.
    let resp = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/files/watch?path=/workspace/src")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap();
    api.post(
        &format!("/sandboxes/{id}/fs/write"),
        json!({"path": "outside-src.txt", "content": "x"}),
    )
    .await;
    api.exec(&id, "rm src/deep/made-inside.txt").await;
    let seen = wait_for_event(resp, |v| v["event"] == "deleted").await;
    assert!(
        seen.iter()
            .all(|v| v["path"].as_str().unwrap().starts_with("/workspace/src")),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().unwrap()["path"],
        "/workspace/src/deep/made-inside.txt"
    );
}
