use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

fn batch(n: usize) -> serde_json::Value {
    let files: Vec<_> = (0..n)
        .map(|i| json!({"path": format!("app/{i}.txt"), "content": format!("v{i}")}))
        .collect();
    json!({ "files": files })
}

/// Starts sandboxd on `dir` with a failpoint armed, creates a sandbox, sends a 5-file batch
/// that kills it, then restarts it and returns the files of the batch that exist.
async fn crash_during_batch(failpoint: &str) -> (Vec<String>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut sd = Sandboxd::start_in(BIN, &data, &[], &[("SLIPWAY_FAILPOINTS", failpoint)]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let sent = api
        .http
        .post(api.url(&format!("/sandboxes/{id}/fs/write-many")))
        .header("Authorization", "Bearer msk_k")
        .json(&batch(5))
        .send()
        .await;
    assert!(sent.is_err(), "sandboxd died mid-request at `{failpoint}`");
    sd.kill();
    let sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let mut present = Vec::new();
    for i in 0..5 {
        let (status, body) = api.download(&id, &format!("app/{i}.txt")).await;
        if status == 200 {
            assert_eq!(body, format!("v{i}").as_bytes());
            present.push(format!("app/{i}.txt"));
        }
    }
    let journal: usize = ["btrfs", "files"]
        .iter()
        .map(|b| {
            std::fs::read_dir(data.join(b).join("sandboxes").join(&id).join("journal"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum();
    (present, journal)
}

#[tokio::test]
async fn a_batch_cut_while_applying_is_rolled_forward() {
    let (present, journal) = crash_during_batch("write_many.applying@2").await;
    assert_eq!(
        present.len(),
        5,
        "all of the batch after restart: {present:?}"
    );
    assert_eq!(journal, 0, "the journal is cleared");
}

#[tokio::test]
async fn a_batch_cut_while_staging_is_rolled_back() {
    let (present, journal) = crash_during_batch("write_many.staged@3").await;
    assert!(
        present.is_empty(),
        "none of the batch after restart: {present:?}"
    );
    assert_eq!(journal, 0);
}

#[tokio::test]
async fn a_batch_cut_right_after_commit_is_rolled_forward() {
    let (present, _) = crash_during_batch("write_many.committed").await;
    assert_eq!(present.len(), 5);
}

#[tokio::test]
async fn sandboxes_and_idempotency_records_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let create = |api: &Api| {
        api.http
            .post(api.url("/sandboxes"))
            .header("Authorization", "Bearer msk_k")
            .header("Idempotency-Key", "run_9:sandbox:1")
            .json(&json!({"template_id": "node", "name": "keep", "external_user_id": "u9"}))
            .send()
    };
    let first: serde_json::Value = create(&api).await.unwrap().json().await.unwrap();
    let id = first["data"]["id"].as_str().unwrap().to_string();
    api.post(
        &format!("/sandboxes/{id}/fs/write"),
        json!({"path": "kept.txt", "content": "still here"}),
    )
    .await;
    sd.kill();

    let sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let again: serde_json::Value = create(&api).await.unwrap().json().await.unwrap();
    assert_eq!(
        again["data"]["id"],
        id.as_str(),
        "the key still maps to the first sandbox"
    );
    assert_eq!(api.count("").await, 1, "counted at sandboxd: one sandbox");
    let (_, v) = api.get("/sandboxes/by-name/keep").await;
    assert_eq!(v["data"]["external_user_id"], "u9");
    assert_eq!(api.download(&id, "kept.txt").await.1, b"still here");
}

#[tokio::test]
async fn a_committed_batch_that_cannot_be_applied_is_quarantined_and_sandboxd_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut sd = Sandboxd::start_in(
        BIN,
        &data,
        &[],
        &[("SLIPWAY_FAILPOINTS", "write_many.committed")],
    )
    .unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let sent = api
        .http
        .post(api.url(&format!("/sandboxes/{id}/fs/write-many")))
        .header("Authorization", "Bearer msk_k")
        .json(&batch(3))
        .send()
        .await;
    assert!(sent.is_err(), "sandboxd died after the commit");
    sd.kill();
    // The workspace changes under the committed batch: `app` becomes a file, so none of the
    // batch's `app/<n>.txt` can be applied.
    let files = data.join("btrfs/sandboxes").join(&id);
    std::fs::write(files.join("workspace/app"), "in the way").unwrap();

    let sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let (code, out, _) = api.exec(&id, "cat /workspace/app").await;
    assert_eq!((code, out.as_str()), (0, "in the way"));
    let quarantined: Vec<_> = std::fs::read_dir(files.join("quarantine"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(quarantined.len(), 1);
    let reason = std::fs::read_to_string(quarantined[0].path().join("reason")).unwrap();
    assert!(!reason.trim().is_empty());
    assert_eq!(std::fs::read_dir(files.join("journal")).unwrap().count(), 0);
    // And the sandbox takes writes again.
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "after.txt", "content": "ok"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}
