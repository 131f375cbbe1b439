//! The hostile suite, requests: every number a client sends into arithmetic is bounded (422
//! past its bound) and no request can stop the background work (the idle reaper); the API
//! answers only to its own host names (DNS rebinding).

use std::time::{Duration, Instant};

use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

/// Numbers that overflowed sandboxd's millisecond arithmetic before they were bounded.
const HUGE: [u64; 3] = [4_611_686_018_427_387_904, u64::MAX, 30 * 86_400 + 1];

#[tokio::test]
async fn timeouts_past_thirty_days_are_refused_and_the_reaper_keeps_reaping() {
    let sd = Sandboxd::start(BIN, &["--idle-check-ms", "100"]).unwrap();
    let api = Api::new(&sd);
    let kept = api.create(json!({ "timeout_sec": 30 * 86_400 })).await;
    for n in HUGE {
        for field in ["timeout_sec", "idle_timeout_sec"] {
            let (status, v) = api.post("/sandboxes", json!({ field: n })).await;
            assert_eq!(status, 422, "{field} {n}: {v}");
            assert_eq!(v["error"]["code"], "invalid_timeout", "{v}");
            let (status, v) = api
                .send(
                    reqwest::Method::PATCH,
                    &format!("/sandboxes/{kept}"),
                    Some(json!({ field: n })),
                )
                .await;
            assert_eq!(status, 422, "PATCH {field} {n}: {v}");
            let (status, v) = api
                .post(&format!("/sandboxes/{kept}/fork"), json!({ field: n }))
                .await;
            assert_eq!(status, 422, "fork {field} {n}: {v}");
        }
        let (status, v) = api
            .post(
                &format!("/sandboxes/{kept}/extend"),
                json!({ "timeout_sec": n }),
            )
            .await;
        assert_eq!(status, 422, "extend {n}: {v}");
    }
    // Nothing was made, and listing still shows the one sandbox, whole.
    assert_eq!(api.count("").await, 1);
    let (_, v) = api.get(&format!("/sandboxes/{kept}")).await;
    assert_eq!(v["data"]["timeout_sec"], 30 * 86_400, "{v}");

    // The reaper still runs: a sandbox idle past its timeout goes.
    let idle = api.create(json!({ "idle_timeout_sec": 1 })).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = api.get(&format!("/sandboxes/{idle}")).await;
        if v["data"]["state"] == "destroyed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle sandbox was never reaped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = api.get(&format!("/sandboxes/{kept}")).await;
    assert_eq!(v["data"]["state"], "running", "{v}");
}

/// A request to the API with `host` as its Host header (raw HTTP/1.1, so the header is exactly
/// what the test says); the status code.
async fn status_with_host(sd: &Sandboxd, hosts: &[&str]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(sd.api_addr()).await.unwrap();
    let mut req = String::from("GET /api/v1/sandboxes HTTP/1.1\r\n");
    for h in hosts {
        req.push_str(&format!("Host: {h}\r\n"));
    }
    req.push_str("Authorization: Bearer msk_test_key\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_api_answers_only_to_its_own_host_names() {
    let sd = Sandboxd::start(BIN, &["--api-hostname", "sandboxd.slipway.svc"]).unwrap();
    let api_addr = sd.api_addr();
    let port = api_addr.rsplit(':').next().unwrap();
    for ok in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "127.0.0.1".to_string(),
        format!("sandboxd.slipway.svc:{port}"),
        "SANDBOXD.slipway.svc".to_string(),
    ] {
        assert_eq!(status_with_host(&sd, &[&ok]).await, 200, "{ok}");
    }
    for refused in [
        format!("rebind.attacker.example:{port}"),
        "attacker.example".to_string(),
        format!("localhost.attacker.example:{port}"),
        format!("sandboxd.slipway.svc.evil:{port}"),
        "[::1".to_string(),
    ] {
        assert_eq!(status_with_host(&sd, &[&refused]).await, 403, "{refused}");
    }
    // Two Host headers, even both acceptable, are refused.
    assert_eq!(
        status_with_host(&sd, &["127.0.0.1", "localhost"]).await,
        403
    );
}

#[tokio::test]
async fn names_env_values_and_directories_that_would_fail_later_are_refused_now() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    // A 300-byte name is refused before anything is committed, and sandboxd restarts fine.
    let long = "n".repeat(300);
    for (route, body) in [
        ("fs/write", json!({"path": long, "content": "x"})),
        (
            "fs/write-many",
            json!({"files": [{"path": "ok.txt", "content": "x"}, {"path": long, "content": "x"}]}),
        ),
        ("fs/mkdir", json!({"path": long})),
    ] {
        let (status, v) = api.post(&format!("/sandboxes/{id}/{route}"), body).await;
        assert_eq!(status, 422, "{route}: {v}");
        assert_eq!(v["error"]["code"], "name_too_long", "{v}");
    }
    let (_, out, _) = api.exec(&id, "ls -A /workspace").await;
    assert_eq!(out, "", "nothing of the refused batch was written");

    // mkdir over a file: a conflict, not a 500.
    api.post(
        &format!("/sandboxes/{id}/fs/write"),
        json!({"path": "f", "content": "x"}),
    )
    .await;
    let (status, v) = api
        .post(&format!("/sandboxes/{id}/fs/mkdir"), json!({"path": "f"}))
        .await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/mkdir"),
            json!({"path": "f/sub"}),
        )
        .await;
    assert!(status == 409 || status == 422, "{status} {v}");

    // An env value with NUL is refused at create (it would break every exec after).
    let (status, v) = api
        .post("/sandboxes", json!({"env": {"A": "x\u{0}y"}}))
        .await;
    assert_eq!(status, 422, "{v}");
    // PATCH refuses the names create refuses.
    for bad in ["a\rb", "a\nb", "a\u{0}b", "a\u{1b}b", "a/b"] {
        let (status, v) = api
            .send(
                reqwest::Method::PATCH,
                &format!("/sandboxes/{id}"),
                Some(json!({ "name": bad })),
            )
            .await;
        assert_eq!(status, 422, "{bad:?}: {v}");
    }
    assert_eq!(api.count("").await, 1);
}

#[tokio::test]
async fn downloads_are_of_regular_files_only_and_capped() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let (code, _, err) = api
        .exec(
            &id,
            "mkfifo /workspace/pipe && truncate -s 3G /workspace/sparse && echo hi > /workspace/app.txt",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    // A FIFO is refused without blocking; many in a row leave other sandboxes' files alone.
    for _ in 0..50 {
        let (status, body) = api.download(&id, "pipe").await;
        assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    }
    let (_, v) = api
        .post(&format!("/sandboxes/{id}/fs/stat"), json!({"path": "pipe"}))
        .await;
    assert_eq!(v["data"]["type"], "fifo", "{v}");
    // A 3 GB sparse file is refused whole, not read into memory; a 48 MB one is streamed, so
    // sandboxd's peak memory does not grow by its size.
    let (status, _) = api.download(&id, "sparse").await;
    assert_eq!(status, 413);
    let (code, _, err) = api
        .exec(&id, "head -c 48M /dev/urandom > /workspace/big")
        .await;
    assert_eq!(code, 0, "{err}");
    let peak = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", sd.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    };
    let before = peak();
    for _ in 0..3 {
        let (status, body) = api.download(&id, "big").await;
        assert_eq!((status, body.len()), (200, 48 << 20));
    }
    let grew = peak().saturating_sub(before);
    assert!(
        grew < 24 << 20,
        "sandboxd's peak memory grew by {grew} bytes"
    );
    let other = api.sandbox().await;
    api.post(
        &format!("/sandboxes/{other}/fs/write"),
        json!({"path": "x.txt", "content": "fine"}),
    )
    .await;
    assert_eq!(api.download(&other, "x.txt").await, (200, b"fine".to_vec()));
    // The legacy route names files under /workspace, with or without the prefix.
    for route in ["/files/app.txt", "/files/workspace/app.txt"] {
        let resp = api
            .http
            .get(api.url(&format!("/sandboxes/{id}{route}")))
            .header("Authorization", "Bearer msk_test_key")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{route}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), b"hi\n");
    }
}

/// Connects to `addr`, sends headers that never finish, and says how long until the server
/// closed the connection (None: still open after 5 s).
async fn unfinished_headers(addr: &str) -> Option<std::time::Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/v1/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await {
        Ok(_) => Some(t.elapsed()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn connections_whose_headers_never_finish_are_closed_on_both_listeners() {
    let sd = Sandboxd::start(BIN, &["--header-timeout-ms", "500"]).unwrap();
    for addr in [sd.api_addr(), sd.edge_addr().to_string()] {
        let closed = unfinished_headers(&addr).await;
        assert!(
            closed.is_some_and(|d| d < Duration::from_secs(4)),
            "{addr}: {closed:?}"
        );
    }
    // Whole requests are served as before.
    let api = Api::new(&sd);
    assert_eq!(api.count("").await, 0);
}
