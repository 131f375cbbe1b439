use std::time::Duration;

use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

#[tokio::test]
async fn exec_reports_output_exit_code_cwd_env_and_timeouts() {
    // A host secret in sandboxd's own environment must not reach sandbox processes.
    let dir = tempfile::tempdir().unwrap();
    let sd = Sandboxd::start_in(
        BIN,
        &dir.path().join("d"),
        &[],
        &[
            ("HOST_SECRET", "hunter2"),
            ("MIOSA_API_KEY", "msk_live_host"),
        ],
    )
    .unwrap();
    let api = Api::new(&sd);
    let id = api.create(json!({ "env": { "APP_MODE": "dev" } })).await;
    api.post(
        &format!("/sandboxes/{id}/files/mkdir"),
        json!({"path": "sub"}),
    )
    .await;

    let (status, v) = api.post(&format!("/sandboxes/{id}/exec"), json!({
        "command": "echo out; echo err >&2; pwd; echo $APP_MODE $EXTRA; exit 3", "cwd": "/workspace/sub", "env": {"EXTRA": "x"}
    })).await;
    assert_eq!(status, 200);
    let d = &v["data"];
    assert_eq!(d["exit_code"], 3);
    assert_eq!(d["stdout"], "out\n/workspace/sub\ndev x\n");
    assert_eq!(d["stderr"], "err\n");
    assert_eq!(d["timed_out"], false);
    assert!(d["duration_ms"].as_u64().is_some());

    let (_, env, _) = api.exec(&id, "env").await;
    assert!(
        !env.contains("hunter2") && !env.contains("msk_live_host") && !env.contains("HOST_SECRET"),
        "{env}"
    );
    assert!(env.contains("HOME=/workspace"));

    let started = std::time::Instant::now();
    let (_, v) = api
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "sleep 30", "timeout": 1}),
        )
        .await;
    assert_eq!(v["data"]["timed_out"], true);
    assert_eq!(v["data"]["exit_code"], 124);
    assert!(started.elapsed() < Duration::from_secs(20));

    // The sandbox has its own PID namespace: it sees only its own processes.
    let (_, ps, _) = api.exec(&id, "ls /proc | grep -c '^[0-9]'").await;
    assert!(ps.trim().parse::<u32>().unwrap() < 10, "{ps}");

    for bad in [
        json!({}),
        json!({"command": ""}),
        json!({"command": "true", "timeout": -1}),
        // MIOSA's `timeout` is whole seconds.
        json!({"command": "true", "timeout": 0.5}),
        json!({"command": "true", "env": {"A-B": "x"}}),
        json!({"command": "true", "cwd": "missing"}),
    ] {
        let (status, v) = api
            .post(&format!("/sandboxes/{id}/exec"), bad.clone())
            .await;
        assert_eq!(status, 422, "{bad} -> {v}");
    }
}

#[tokio::test]
async fn exec_stream_sends_lines_then_the_exit() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let body = api
        .http
        .post(api.url(&format!("/sandboxes/{id}/exec/stream")))
        .header("Authorization", "Bearer msk_k")
        .json(&json!({"command": "echo one; echo two >&2; exit 7"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("event: stdout") && body.contains(r#""line":"one""#),
        "{body}"
    );
    assert!(
        body.contains("event: stderr") && body.contains(r#""line":"two""#),
        "{body}"
    );
    let exit = body.split("event: exit").nth(1).expect("an exit event");
    assert!(exit.contains(r#""exit_code":7"#), "{body}");
}

#[tokio::test]
async fn background_processes_serve_log_stop_and_die_with_their_sandbox() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    api.post(&format!("/sandboxes/{id}/fs/write"), json!({"path": "server.js", "content":
        "require('http').createServer((q,s)=>s.end('hello from '+q.url)).listen(3000,()=>console.log('listening'))"})).await;
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": "node server.js", "name": "dev"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let pid = v["data"]["pid"].as_u64().unwrap();
    assert_eq!(v["data"]["status"], "running");

    // The request that started it is over; the server answers a request made inside the sandbox.
    let mut answered = String::new();
    for _ in 0..100 {
        let (_, out, _) = api.exec(&id, "node -e \"fetch('http://127.0.0.1:3000/x').then(r=>r.text()).then(t=>console.log(t)).catch(()=>{})\"").await;
        if !out.is_empty() {
            answered = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered, "hello from /x\n");
    let (_, v) = api.get(&format!("/sandboxes/{id}/processes")).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        api.get(&format!("/sandboxes/{id}/processes/{pid}")).await.1["data"]["name"],
        "dev"
    );
    let (_, v) = api
        .get(&format!("/sandboxes/{id}/processes/{pid}/logs?tail=5"))
        .await;
    assert_eq!(v["data"], "listening\n");
    assert_eq!(
        api.get(&format!("/sandboxes/{id}/processes/99")).await.0,
        404
    );

    let (status, v) = api
        .delete(&format!("/sandboxes/{id}/processes/{pid}"))
        .await;
    assert_eq!(status, 200);
    assert_ne!(v["data"]["status"], "running");

    // A process that ignores SIGTERM is killed after the grace period; destroy ends everything.
    let (_, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": "trap '' TERM; echo started; while true; do sleep 1; done"}),
        )
        .await;
    let stubborn = v["data"]["pid"].as_u64().unwrap();
    let (_, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": "sleep 1000"}),
        )
        .await;
    let sleeper = v["data"]["pid"].as_u64().unwrap();
    let stream = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/processes/{stubborn}/stream")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap();
    // SIGTERM before the shell has set its trap would end it at once: wait until it has.
    for _ in 0..100 {
        let (_, v) = api
            .get(&format!("/sandboxes/{id}/processes/{stubborn}/logs"))
            .await;
        if v["data"].as_str().unwrap().contains("started") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = std::time::Instant::now();
    let (_, v) = api
        .delete(&format!("/sandboxes/{id}/processes/{stubborn}"))
        .await;
    assert_eq!(v["data"]["status"], "killed");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "SIGKILL came after the grace period"
    );
    let text = tokio::time::timeout(Duration::from_secs(10), stream.text())
        .await
        .unwrap()
        .unwrap();
    assert!(
        text.contains("started") && text.contains("event: exit"),
        "{text}"
    );
    api.delete(&format!("/sandboxes/{id}")).await;
    assert_ne!(
        api.get(&format!("/sandboxes/{id}/processes/{sleeper}"))
            .await
            .1["data"]["status"],
        "running"
    );
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", "sleep 1000"])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "the sandbox's processes died with it"
    );
}
