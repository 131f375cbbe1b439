//! Snapshots, restore and fork, on both storage backends; state across a restart; usage counters.

use std::time::Duration;

use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

async fn write(api: &Api, id: &str, path: &str, content: &str) {
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": path, "content": content}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

async fn read(api: &Api, id: &str, path: &str) -> Option<String> {
    let (status, body) = api.download(id, path).await;
    (status == 200).then(|| String::from_utf8(body).unwrap())
}

async fn usage(api: &Api, id: &str) -> serde_json::Value {
    api.get(&format!("/sandboxes/{id}/usage")).await.1["data"].clone()
}

async fn snapshot_fork_restore(backend: &str) {
    let sd = Sandboxd::start(BIN, &["--storage", backend]).unwrap();
    let api = Api::new(&sd);
    let parent = api.create(json!({ "template_id": "node", "external_user_id": "owner", "external_project_id": "p1" })).await;
    write(&api, &parent, "app.txt", "v1").await;
    // A process keeps running through the snapshot.
    api.post(
        &format!("/sandboxes/{parent}/processes"),
        json!({"command": "sleep 1000"}),
    )
    .await;

    let (status, v) = api
        .post(
            &format!("/sandboxes/{parent}/snapshots"),
            json!({"comment": "first"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let snap = v["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["data"]["comment"], "first");
    assert_eq!(v["data"]["status"], "ready");
    let (_, v) = api.get(&format!("/sandboxes/{parent}/processes")).await;
    assert_eq!(
        v["data"][0]["status"], "running",
        "the snapshot did not stop the sandbox"
    );
    write(&api, &parent, "app.txt", "v2").await;

    // Fork of the live sandbox: independent both ways, attribution carried.
    let (status, v) = api
        .post(
            &format!("/sandboxes/{parent}/fork"),
            json!({"name": "branch-b"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let fork = v["data"]["id"].as_str().unwrap().to_string();
    assert_ne!(fork, parent);
    assert_eq!(v["data"]["external_user_id"], "owner");
    assert_eq!(v["data"]["external_project_id"], "p1");
    assert_eq!(read(&api, &fork, "app.txt").await.as_deref(), Some("v2"));
    write(&api, &fork, "app.txt", "fork").await;
    write(&api, &fork, "only-fork.txt", "x").await;
    write(&api, &parent, "only-parent.txt", "y").await;
    assert_eq!(
        read(&api, &parent, "app.txt").await.as_deref(),
        Some("v2"),
        "the fork's write is invisible to the parent"
    );
    assert_eq!(read(&api, &parent, "only-fork.txt").await, None);
    assert_eq!(
        read(&api, &fork, "only-parent.txt").await,
        None,
        "the parent's write is invisible to the fork"
    );

    // Fork from the snapshot, with another end-user.
    let (_, v) = api
        .post(
            &format!("/sandboxes/{parent}/fork"),
            json!({"snapshot_id": snap, "external_user_id": "other"}),
        )
        .await;
    let from_snap = v["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["data"]["external_user_id"], "other");
    assert_eq!(
        read(&api, &from_snap, "app.txt").await.as_deref(),
        Some("v1")
    );

    // Restore the parent to the snapshot.
    let (status, v) = api
        .post(&format!("/sandboxes/{parent}/restore/{snap}"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(read(&api, &parent, "app.txt").await.as_deref(), Some("v1"));
    assert_eq!(read(&api, &parent, "only-parent.txt").await, None);
    assert_eq!(
        api.exec(&parent, "cat app.txt").await.1,
        "v1",
        "processes see the restored files"
    );
    assert_eq!(
        read(&api, &fork, "app.txt").await.as_deref(),
        Some("fork"),
        "restoring the parent left the fork alone"
    );

    let (_, v) = api.get(&format!("/sandboxes/{parent}/snapshots")).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        api.post(&format!("/sandboxes/{fork}/restore/{snap}"), json!({}))
            .await
            .0,
        422,
        "a snapshot of another sandbox"
    );
    assert_eq!(
        api.post(&format!("/sandboxes/{parent}/restore/snap_nope"), json!({}))
            .await
            .0,
        404
    );
    assert_eq!(
        api.post(
            &format!("/sandboxes/{parent}/fork"),
            json!({"snapshot_id": "snap_nope"})
        )
        .await
        .0,
        404
    );
    assert_eq!(
        api.delete(&format!("/sandboxes/{parent}/snapshots/{snap}"))
            .await
            .0,
        200
    );
    let (_, v) = api.get(&format!("/sandboxes/{parent}/snapshots")).await;
    assert_eq!(v["data"], json!([]));
    assert_eq!(
        api.count("").await,
        3,
        "counted at sandboxd: parent and two forks"
    );
}

#[tokio::test]
async fn snapshot_fork_and_restore_on_copy() {
    snapshot_fork_restore("copy").await;
}

#[tokio::test]
async fn snapshot_fork_and_restore_on_btrfs() {
    snapshot_fork_restore("btrfs").await;
}

#[tokio::test]
async fn auto_chooses_btrfs_when_running_as_root() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    api.sandbox().await;
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n";
    assert!(is_root, "these tests run as root (CI does)");
    assert!(
        sd.data_dir().join("btrfs.img").exists(),
        "auto made a btrfs image"
    );
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(sd.data_dir().join("btrfs"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fs.stdout).trim(), "btrfs");
}

#[tokio::test]
async fn a_repeated_fork_key_returns_the_first_fork() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let parent = api.sandbox().await;
    let fork = |key: &'static str| {
        let req = api
            .http
            .post(api.url(&format!("/sandboxes/{parent}/fork")))
            .header("Authorization", "Bearer msk_k")
            .header("Idempotency-Key", key)
            .json(&json!({}));
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()["data"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let a = fork("run_1:fork:1").await;
    assert_eq!(fork("run_1:fork:1").await, a);
    assert_ne!(fork("run_1:fork:2").await, a);
    assert_eq!(api.count("").await, 3);
}

async fn restart_keeps_everything(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut sd = Sandboxd::start_in(BIN, &data, &["--storage", backend], &[]).unwrap();
    let api = Api::new(&sd);
    let a = api.create(json!({"external_user_id": "u"})).await;
    write(&api, &a, "kept.txt", "before").await;
    let (_, v) = api
        .post(
            &format!("/sandboxes/{a}/snapshots"),
            json!({"comment": "c"}),
        )
        .await;
    let snap = v["data"]["id"].as_str().unwrap().to_string();
    write(&api, &a, "kept.txt", "after").await;
    let (_, v) = api.post(&format!("/sandboxes/{a}/fork"), json!({})).await;
    let b = v["data"]["id"].as_str().unwrap().to_string();
    sd.kill();

    let sd = Sandboxd::start_in(BIN, &data, &["--storage", backend], &[]).unwrap();
    let api = Api::new(&sd);
    assert_eq!(api.count("").await, 2);
    assert_eq!(read(&api, &a, "kept.txt").await.as_deref(), Some("after"));
    assert_eq!(read(&api, &b, "kept.txt").await.as_deref(), Some("after"));
    let (_, v) = api.get(&format!("/sandboxes/{a}/snapshots")).await;
    assert_eq!(v["data"][0]["id"], snap.as_str());
    api.post(&format!("/sandboxes/{a}/restore/{snap}"), json!({}))
        .await;
    assert_eq!(read(&api, &a, "kept.txt").await.as_deref(), Some("before"));
}

#[tokio::test]
async fn a_restart_keeps_sandboxes_snapshots_and_files_on_copy() {
    restart_keeps_everything("copy").await;
}

#[tokio::test]
async fn a_restart_keeps_sandboxes_snapshots_and_files_on_btrfs() {
    restart_keeps_everything("btrfs").await;
}

#[tokio::test]
async fn snapshots_expire_and_only_the_last_ones_are_kept() {
    let sd = Sandboxd::start(BIN, &["--idle-check-ms", "100"]).unwrap();
    let api = Api::new(&sd);
    let id = api
        .create(json!({"metadata": {"keep_last_snapshots": 2}}))
        .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, v) = api
            .post(
                &format!("/sandboxes/{id}/snapshots"),
                json!({"comment": format!("s{i}")}),
            )
            .await;
        ids.push(v["data"]["id"].as_str().unwrap().to_string());
    }
    let (_, v) = api.get(&format!("/sandboxes/{id}/snapshots")).await;
    let left: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        left,
        vec![ids[1].as_str(), ids[2].as_str()],
        "the oldest went"
    );

    let (_, v) = api
        .post(
            &format!("/sandboxes/{id}/snapshots"),
            json!({"expiration_seconds": 1, "keep": false}),
        )
        .await;
    let short = v["data"]["id"].as_str().unwrap().to_string();
    assert!(v["data"]["expires_at"].is_string());
    let mut gone = false;
    for _ in 0..60 {
        let (_, v) = api.get(&format!("/sandboxes/{id}/snapshots")).await;
        if !v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == short.as_str())
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "an expired snapshot is removed");
}

#[tokio::test]
async fn usage_counters_rise_with_work_never_fall_and_outlive_the_sandbox() {
    let sd = Sandboxd::start(BIN, &["--idle-check-ms", "100"]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let first = usage(&api, &id).await;
    write(&api, &id, "big.bin", &"x".repeat(1 << 20)).await;
    api.exec(&id, "timeout 1 sh -c 'while :; do :; done'").await;
    api.exec(&id, "true").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = usage(&api, &id).await;
    for key in [
        "runtime_ms",
        "provisioned_vcpu_ms",
        "active_cpu_ms",
        "memory_mib_ms",
        "exec_count",
    ] {
        assert!(
            second[key].as_u64().unwrap() > first[key].as_u64().unwrap(),
            "{key} rose: {first} -> {second}"
        );
    }
    assert_eq!(
        second["exec_count"].as_u64().unwrap() - first["exec_count"].as_u64().unwrap(),
        2
    );
    assert!(second["active_cpu_ms"].as_u64().unwrap() >= 500);
    let mut last = second.clone();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = usage(&api, &id).await;
        for key in [
            "runtime_ms",
            "provisioned_vcpu_ms",
            "active_cpu_ms",
            "memory_mib_ms",
            "disk_gib_ms",
            "exec_count",
        ] {
            assert!(
                now[key].as_u64().unwrap() >= last[key].as_u64().unwrap(),
                "{key} never goes back"
            );
        }
        last = now;
    }
    api.delete(&format!("/sandboxes/{id}")).await;
    let final_reading = usage(&api, &id).await;
    assert_eq!(final_reading["state"], "destroyed");
    assert!(final_reading["runtime_ms"].as_u64().unwrap() >= last["runtime_ms"].as_u64().unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        usage(&api, &id).await["runtime_ms"],
        final_reading["runtime_ms"],
        "no usage after destroy"
    );
}
