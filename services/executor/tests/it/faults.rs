use std::time::{Duration, Instant};

use serde_json::json;
use slipway_common::config::Secret;
use slipway_executor::miosa::{ClientConfig, MiosaClient, MiosaError};
use slipway_proto::v1::ErrorCode;

use crate::fake::{Fake, reply};

const KEY: &str = "msk_live_topsecret_123";

async fn client(fake: &Fake, tweak: impl FnOnce(&mut ClientConfig)) -> MiosaClient {
    let mut config = ClientConfig::new(fake.serve().await, Secret::new(KEY));
    config.backoff = Duration::from_millis(5);
    tweak(&mut config);
    MiosaClient::new(config).unwrap()
}

const SANDBOX: &str = r#"{"data":{"id":"sbx_1","state":"running"}}"#;

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_as_one_logical_call() {
    let fake = Fake::default();
    let mut limited = reply(
        429,
        r#"{"error":{"code":"rate_limited","message":"slow down"}}"#,
    );
    limited.headers.push(("retry-after", "1".into()));
    fake.on("POST /sandboxes", vec![limited, reply(201, SANDBOX)]);
    let c = client(&fake, |_| {}).await;
    let started = Instant::now();
    let sb = c
        .create_sandbox(json!({"template_id": "node"}), "run_1:sandbox:1")
        .await
        .unwrap();
    assert_eq!(sb["id"], "sbx_1");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        started.elapsed()
    );
    let sent = fake.requests("POST /sandboxes");
    assert_eq!(sent.len(), 2);
    let keys: Vec<&str> = sent
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap())
        .collect();
    assert_eq!(keys[0], keys[1], "a retry repeats the same Idempotency-Key");
    assert!(keys[0].starts_with("run_1:sandbox:1"));
    assert_eq!(
        sent[0].headers["authorization"].to_str().unwrap(),
        format!("Bearer {KEY}")
    );
}

#[tokio::test]
async fn server_errors_are_retried_three_times_then_reported_unavailable() {
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/sbx_1",
        vec![reply(500, r#"{"error":"boom"}"#)],
    );
    let c = client(&fake, |_| {}).await;
    let e = c.get_sandbox("sbx_1").await.unwrap_err();
    assert_eq!(
        fake.requests("GET /sandboxes/sbx_1").len(),
        4,
        "one attempt and three retries"
    );
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
    assert!(e.to_string().contains("boom"));
}

#[tokio::test]
async fn a_slow_answer_hits_its_timeout() {
    let fake = Fake::default();
    let mut slow = reply(200, SANDBOX);
    slow.delay = Duration::from_secs(3);
    fake.on("GET /sandboxes/sbx_1", vec![slow]);
    let c = client(&fake, |c| {
        c.timeout = Duration::from_millis(200);
        c.max_retries = 0;
    })
    .await;
    let started = Instant::now();
    let e = c.get_sandbox("sbx_1").await.unwrap_err();
    assert!(matches!(e, MiosaError::Timeout { .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::Timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn both_envelopes_and_numeric_ids_decode() {
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/a",
        vec![reply(200, r#"{"data":{"id":"a","state":"running"}}"#)],
    );
    fake.on(
        "GET /sandboxes/b",
        vec![reply(200, r#"{"id":"b","state":"paused"}"#)],
    );
    fake.on("GET /sandboxes/c", vec![reply(200, r#"{"id":42}"#)]);
    fake.on(
        "GET /sandboxes",
        vec![reply(
            200,
            r#"{"data":[{"id":"a"},{"id":"b"}],"page":{"page":1,"page_size":2,"total":2}}"#,
        )],
    );
    let c = client(&fake, |_| {}).await;
    assert_eq!(c.get_sandbox("a").await.unwrap()["state"], "running");
    assert_eq!(c.get_sandbox("b").await.unwrap()["state"], "paused");
    assert_eq!(c.get_sandbox("c").await.unwrap()["id"], 42);
    assert_eq!(c.list_sandboxes(&[]).await.unwrap().len(), 2);
    let fake = Fake::default();
    fake.on("GET /sandboxes", vec![reply(200, r#"[{"id":"x"}]"#)]);
    assert_eq!(
        client(&fake, |_| {})
            .await
            .list_sandboxes(&[])
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn every_error_body_variant_decodes() {
    let cases = [
        (
            404,
            r#"{"error":{"code":"sandbox_not_found","message":"no such sandbox","request_id":"req_1"}}"#,
            "sandbox_not_found",
            "no such sandbox",
            ErrorCode::NotFound,
        ),
        (
            422,
            r#"{"error":"template is required","code":"VALIDATION"}"#,
            "VALIDATION",
            "template is required",
            ErrorCode::InvalidInput,
        ),
        (
            403,
            r#"{"error":"FORBIDDEN_PATH","detail":"outside /workspace"}"#,
            "FORBIDDEN_PATH",
            "outside /workspace",
            ErrorCode::Forbidden,
        ),
        (
            402,
            r#"{"message":"out of credits","code":"INSUFFICIENT_CREDITS"}"#,
            "INSUFFICIENT_CREDITS",
            "out of credits",
            ErrorCode::QuotaExceeded,
        ),
        (
            409,
            r#"{"errors":["name taken"]}"#,
            "conflict",
            "name taken",
            ErrorCode::Conflict,
        ),
        (
            401,
            r#"{"reason":"bad key"}"#,
            "unauthorized",
            "bad key",
            ErrorCode::Unauthorized,
        ),
        (
            413,
            "payload too large",
            "error",
            "payload too large",
            ErrorCode::PayloadTooLarge,
        ),
    ];
    for (status, body, code, message, mapped) in cases {
        let fake = Fake::default();
        fake.on("GET /sandboxes/x", vec![reply(status, body)]);
        let e = client(&fake, |_| {})
            .await
            .get_sandbox("x")
            .await
            .unwrap_err();
        match &e {
            MiosaError::Api {
                status: s,
                code: c,
                message: m,
                ..
            } => {
                assert_eq!(
                    (*s, c.as_str(), m.as_str()),
                    (status, code, message),
                    "{body}"
                );
            }
            other => panic!("{body}: {other}"),
        }
        assert_eq!(e.code(), mapped, "{body}");
    }
    // `retry_after` in the body is read too.
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/x",
        vec![reply(429, r#"{"message":"wait","retry_after":7}"#)],
    );
    let e = client(&fake, |c| c.max_retries = 0)
        .await
        .get_sandbox("x")
        .await
        .unwrap_err();
    assert!(
        matches!(e, MiosaError::Api { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_malformed_body_is_an_error_not_a_panic() {
    let fake = Fake::default();
    fake.on("GET /sandboxes/x", vec![reply(200, "{not json")]);
    fake.on(
        "GET /sandboxes/y",
        vec![reply(200, r#"{"data":{"state":"running"}}"#)],
    );
    let c = client(&fake, |_| {}).await;
    assert!(matches!(
        c.get_sandbox("x").await.unwrap_err(),
        MiosaError::Malformed { .. }
    ));
    assert!(
        matches!(
            c.get_sandbox("y").await.unwrap_err(),
            MiosaError::Malformed { .. }
        ),
        "no id"
    );
}

#[tokio::test]
async fn the_api_key_never_shows_in_errors_or_debug_output() {
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/x",
        vec![reply(
            401,
            r#"{"error":{"code":"unauthorized","message":"invalid API key"}}"#,
        )],
    );
    let c = client(&fake, |_| {}).await;
    let e = c.get_sandbox("x").await.unwrap_err();
    let unreachable = MiosaClient::new(ClientConfig::new(
        "http://127.0.0.1:1/api/v1",
        Secret::new(KEY),
    ))
    .unwrap()
    .get_sandbox("x")
    .await
    .unwrap_err();
    for text in [
        e.to_string(),
        format!("{e:?}"),
        unreachable.to_string(),
        format!("{unreachable:?}"),
        format!("{c:?}"),
        format!("{:?}", c.config()),
    ] {
        assert!(!text.contains("topsecret"), "the key leaked: {text}");
    }
    assert_eq!(unreachable.code(), ErrorCode::Unavailable);
}

#[tokio::test]
async fn a_404_on_fs_write_many_falls_back_to_the_legacy_route_and_its_body_rules() {
    let fake = Fake::default();
    fake.on(
        "POST /sandboxes/sbx_1/files/write-many",
        vec![reply(
            200,
            r#"{"data":{"written":[{"path":"/workspace/a.txt","size_bytes":2}],"failed":[]}}"#,
        )],
    );
    let c = client(&fake, |_| {}).await;
    let out = c
        .write_many(
            "sbx_1",
            &[("/workspace/a.txt".into(), b"hi".to_vec())],
            "run_1:files:1",
        )
        .await
        .unwrap();
    assert_eq!(out["written"][0]["path"], "/workspace/a.txt");
    let canonical = fake.requests("POST /sandboxes/sbx_1/fs/write-many");
    assert_eq!(canonical.len(), 1);
    let sent: serde_json::Value = serde_json::from_str(&canonical[0].body).unwrap();
    assert_eq!(sent["files"][0]["content_base64"], "aGk=");
    let legacy = fake.requests("POST /sandboxes/sbx_1/files/write-many");
    let sent: serde_json::Value = serde_json::from_str(&legacy[0].body).unwrap();
    assert_eq!(
        sent["files"][0]["content_base64"], "aGk=",
        "all four SDKs send `content_base64` on both routes"
    );
    assert!(sent["files"][0].get("content").is_none());
    let key = |l: &crate::fake::Logged| l.headers["idempotency-key"].to_str().unwrap().to_string();
    assert_eq!(key(&canonical[0]), "run_1:files:1:files.write_many");
    assert_ne!(
        key(&legacy[0]),
        key(&canonical[0]),
        "the legacy request is another request: the platform may have kept the 404 under the first key"
    );
    // A 404 about the sandbox itself is not retried on another route.
    let fake = Fake::default();
    fake.on(
        "POST /sandboxes/gone/fs/write-many",
        vec![reply(
            404,
            r#"{"error":{"code":"sandbox_not_found","message":"gone"}}"#,
        )],
    );
    let e = client(&fake, |_| {})
        .await
        .write_many("gone", &[("a".into(), vec![])], "k")
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);
    assert!(
        fake.requests("POST /sandboxes/gone/files/write-many")
            .is_empty()
    );
}

#[tokio::test]
async fn under_the_rate_limit_a_waiting_call_goes_before_background_work() {
    let fake = Fake::default();
    fake.on("GET /sandboxes/sbx_bg", vec![reply(200, SANDBOX)]);
    fake.on("GET /sandboxes/sbx_person", vec![reply(200, SANDBOX)]);
    // Five a second, one at a time: each call after the first waits about 0.2 s.
    let c = client(&fake, |c| {
        c.rate_limit_rpm = 300;
        c.rate_limit_burst = 1;
    })
    .await;
    c.get_sandbox("sbx_first").await.ok();
    let bg = c.background();
    let background = tokio::spawn(async move {
        for _ in 0..3 {
            bg.get_sandbox("sbx_bg").await.unwrap();
        }
    });
    // The background work is queued first; the interactive call still goes first.
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.get_sandbox("sbx_person").await.unwrap();
    background.await.unwrap();
    let order: Vec<String> = fake
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.path.clone())
        .filter(|p| p != "/sandboxes/sbx_first")
        .collect();
    assert_eq!(order[0], "/sandboxes/sbx_person", "{order:?}");
    assert_eq!(order.len(), 4);
}

#[tokio::test]
async fn calls_retries_and_429s_show_in_the_metrics_without_the_key() {
    let fake = Fake::default();
    let mut limited = reply(429, r#"{"error":{"code":"rate_limited","message":"slow"}}"#);
    limited.headers.push(("retry-after", "0".into()));
    fake.on("POST /sandboxes", vec![limited, reply(201, SANDBOX)]);
    let registry = slipway_common::metrics::Metrics::new();
    let c = client(&fake, |_| {}).await.with_metrics(
        slipway_executor::miosa::metrics::PlatformMetrics::register(&registry),
    );
    c.create_sandbox(json!({}), "run_1:sandbox:1")
        .await
        .unwrap();
    let text = registry.render();
    for line in [
        r#"slipway_platform_calls_total{op="sandbox.create",outcome="429"} 1"#,
        r#"slipway_platform_calls_total{op="sandbox.create",outcome="ok"} 1"#,
        r#"slipway_platform_retries_total{op="sandbox.create"} 1"#,
        r#"slipway_platform_rate_limited_total{op="sandbox.create"} 1"#,
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    assert!(!text.contains(KEY));
}

#[tokio::test]
async fn the_watch_goes_to_miosas_sandboxes_host_and_to_sandboxd_as_configured() {
    let cloud = MiosaClient::new(ClientConfig::new(
        "https://api.miosa.ai/api/v1",
        Secret::new(KEY),
    ))
    .unwrap();
    assert_eq!(
        cloud.sandboxes_host_base(),
        "https://sandboxes.miosa.ai/api/v1"
    );
    let local = MiosaClient::new(ClientConfig::new(
        "http://127.0.0.1:7070/api/v1/",
        Secret::new(KEY),
    ))
    .unwrap();
    assert_eq!(local.sandboxes_host_base(), "http://127.0.0.1:7070/api/v1");
}

#[tokio::test]
async fn a_read_falls_back_to_the_legacy_download_and_decodes_its_json_answer() {
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/sbx_1/files/src/a%20b%23c.txt",
        vec![reply(200, r#"{"data":{"content":"aGkK"}}"#)],
    );
    let c = client(&fake, |_| {}).await;
    let got = c.read_file("sbx_1", "/src/a b#c.txt").await.unwrap();
    assert_eq!(&got[..], b"hi\n");
    let canonical = fake.requests("GET /sandboxes/sbx_1/fs/download");
    assert_eq!(canonical.len(), 1, "the canonical route is tried first");
    // A JSON answer that is not the envelope is the file itself (a JSON file).
    fake.on(
        "GET /sandboxes/sbx_1/files/x",
        vec![reply(200, r#"{"data":{"other":1}}"#)],
    );
    let got = c.read_file("sbx_1", "x").await.unwrap();
    assert_eq!(&got[..], br#"{"data":{"other":1}}"#);
    // The sandbox itself missing is not retried on the legacy route.
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/gone/fs/download",
        vec![reply(
            404,
            r#"{"error":{"code":"sandbox_not_found","message":"gone"}}"#,
        )],
    );
    let e = client(&fake, |_| {})
        .await
        .read_file("gone", "a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);
    assert!(fake.requests("GET /sandboxes/gone/files/a").is_empty());
}

#[tokio::test]
async fn a_delete_goes_to_the_documented_route_and_falls_back_to_the_fs_family() {
    let fake = Fake::default();
    fake.on(
        "DELETE /sandboxes/sbx_1/fs",
        vec![reply(200, r#"{"data":{}}"#)],
    );
    let c = client(&fake, |_| {}).await;
    c.delete_file("sbx_1", "src/old", true, "run_1:del:1")
        .await
        .unwrap();
    let documented = fake.requests("DELETE /sandboxes/sbx_1/files");
    let body: serde_json::Value = serde_json::from_str(&documented[0].body).unwrap();
    assert_eq!(body, json!({"path": "src/old", "recursive": true}));
    assert_eq!(fake.requests("DELETE /sandboxes/sbx_1/fs").len(), 1);
    // Where the documented route answers, there is no second request; `recursive` is sent only
    // when asked for (the Go CLI's body is `{path}`).
    let fake = Fake::default();
    fake.on(
        "DELETE /sandboxes/sbx_1/files",
        vec![reply(200, r#"{"data":{}}"#)],
    );
    let c = client(&fake, |_| {}).await;
    c.delete_file("sbx_1", "a.txt", false, "run_1:del:2")
        .await
        .unwrap();
    let logged = fake.log.lock().unwrap().clone();
    assert_eq!(logged.len(), 1, "{logged:?}");
    let body: serde_json::Value = serde_json::from_str(&logged[0].body).unwrap();
    assert_eq!(body, json!({"path": "a.txt"}));
}

#[tokio::test]
async fn a_canonical_download_decodes_only_the_envelope() {
    let fake = Fake::default();
    // The envelope, as the Python SDK decodes it from either route.
    fake.on(
        "GET /sandboxes/sbx_1/fs/download",
        vec![
            reply(200, r#"{"data":{"content":"aGk="}}"#),
            reply(200, r#"{"content":"aGk="}"#),
        ],
    );
    let c = client(&fake, |_| {}).await;
    let got = c.read_file("sbx_1", "/workspace/a").await.unwrap();
    assert_eq!(&got[..], b"hi");
    // A JSON file that is not the envelope comes as it is (the SDK would return nothing).
    let got = c.read_file("sbx_1", "/workspace/data.json").await.unwrap();
    assert_eq!(&got[..], br#"{"content":"aGk="}"#);
}

#[tokio::test]
async fn idempotency_keys_of_any_text_make_valid_headers() {
    let fake = Fake::default();
    fake.on("POST /sandboxes", vec![reply(201, SANDBOX)]);
    let c = client(&fake, |_| {}).await;
    for key in ["run_1:é:1", "a b%c", "tab\there"] {
        c.create_sandbox(json!({}), key).await.unwrap();
    }
    let sent: Vec<String> = fake
        .requests("POST /sandboxes")
        .iter()
        .map(|l| l.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        sent,
        vec![
            "run_1:%C3%A9:1:sandbox.create",
            "a%20b%25c:sandbox.create",
            "tab%09here:sandbox.create"
        ]
    );
}

#[tokio::test]
async fn exec_sends_env_and_whole_seconds() {
    let fake = Fake::default();
    fake.on(
        "POST /sandboxes/sbx_1/exec",
        vec![reply(
            200,
            r#"{"data":{"stdout":"","stderr":"","exit_code":0}}"#,
        )],
    );
    let c = client(&fake, |_| {}).await;
    let env = [("FOO".to_string(), "bar".to_string())]
        .into_iter()
        .collect();
    for (timeout, sent) in [(1500, 2), (30_000, 30), (1, 1)] {
        c.exec(
            "sbx_1",
            "true",
            Some("/workspace"),
            &env,
            Some(Duration::from_millis(timeout)),
        )
        .await
        .unwrap();
        let last = fake.requests("POST /sandboxes/sbx_1/exec").pop().unwrap();
        let body: serde_json::Value = serde_json::from_str(&last.body).unwrap();
        assert_eq!(
            body,
            json!({"command": "true", "cwd": "/workspace", "env": {"FOO": "bar"}, "timeout": sent})
        );
    }
}
