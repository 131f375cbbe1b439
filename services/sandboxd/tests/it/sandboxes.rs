use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

#[tokio::test]
async fn create_get_list_update_and_destroy() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let (status, v) = api
        .post(
            "/sandboxes",
            json!({
                "template_id": "node", "name": "shop", "env": {"GREETING": "hi"},
                "metadata": {"team": "a"}, "external_user_id": "a.b@c d",
                "external_project_id": "p1", "external_workspace_id": "w1",
                "timeout_sec": 600, "idle_timeout_sec": 60, "persistent": true, "always_on": false
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let sb = &v["data"];
    let id = sb["id"].as_str().unwrap();
    assert!(id.starts_with("sbx_"));
    assert_eq!(sb["state"], "running");
    assert_eq!(sb["template_id"], "node");
    assert_eq!(sb["external_user_id"], "a.b@c d");
    assert_eq!(sb["metadata"]["team"], "a");
    assert_eq!(sb["timeout_sec"], 600);
    assert!(sb.get("env").is_none(), "env values are never echoed");
    assert_eq!(sb["env_keys"], json!(["GREETING"]));

    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.1["data"]["name"],
        "shop"
    );
    assert_eq!(api.get("/sandboxes/by-name/shop").await.1["data"]["id"], id);
    assert_eq!(api.get("/sandboxes/by-name/none").await.0, 404);
    let other = api.create(json!({ "external_user_id": "u2" })).await;
    assert_eq!(
        api.get(&format!("/sandboxes/{other}")).await.1["data"]["template_id"],
        "miosa-sandbox"
    );
    assert_eq!(api.count("").await, 2);
    assert_eq!(api.count("?external_user_id=a.b%40c%20d").await, 1);
    assert_eq!(
        api.count("?external_project_id=p1&external_workspace_id=w1")
            .await,
        1
    );
    assert_eq!(api.count("?external_user_id=nobody").await, 0);
    assert_eq!(api.get("/sandboxes?state=sideways").await.0, 422);

    let (status, v) = api
        .send(
            reqwest::Method::PATCH,
            &format!("/sandboxes/{id}"),
            Some(json!({ "always_on": true, "metadata": {"b": 2}, "idle_timeout_sec": 120 })),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["always_on"], true);
    assert_eq!(v["data"]["metadata"], json!({"team": "a", "b": 2}));
    assert_eq!(v["data"]["idle_timeout_sec"], 120);
    let (status, _) = api
        .send(
            reqwest::Method::PATCH,
            &format!("/sandboxes/{id}"),
            Some(json!({ "colour": "red" })),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused");
    let (status, v) = api
        .send(
            reqwest::Method::PATCH,
            &format!("/sandboxes/{other}"),
            Some(json!({ "name": "shop" })),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("name_taken"))
    );

    let (status, v) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(v["data"]["state"], "destroyed");
    assert_eq!(api.count("").await, 1, "a destroyed sandbox is not listed");
    assert_eq!(api.count("?state=destroyed").await, 1);
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.1["data"]["state"],
        "destroyed"
    );
    let (status, v) = api
        .post(&format!("/sandboxes/{id}/exec"), json!({"command": "true"}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (410, Some("sandbox_destroyed"))
    );
    for backend in ["btrfs", "files"] {
        let files = sd.data_dir().join(backend).join("sandboxes").join(id);
        assert!(!files.exists(), "its files are gone");
    }
}

#[tokio::test]
async fn refusals_are_miosa_shaped() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    for path in [
        "/sandboxes/sbx_nope",
        "/sandboxes/sbx_nope/readiness",
        "/sandboxes/sbx_nope/processes",
    ] {
        let (status, v) = api.get(path).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (404, Some("sandbox_not_found")),
            "{path}"
        );
    }
    let (status, v) = api
        .post("/sandboxes", json!({ "template_id": "cobol" }))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("template_not_found"))
    );
    let (status, v) = api
        .post("/sandboxes", json!({ "env": {"1BAD": "x"} }))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_env"))
    );
    let (status, v) = api.post("/sandboxes", json!({ "size": "huge" })).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_size"))
    );
    let resp = api
        .http
        .post(api.url("/sandboxes"))
        .header("Authorization", "Bearer msk_k")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    assert_eq!(api.get("/nowhere").await.0, 404);
    assert_eq!(api.count("").await, 0, "no refusal created anything");
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_sandbox() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let body = json!({ "template_id": "node", "external_user_id": "u1" });
    let send = |key: &'static str, body: serde_json::Value| {
        let req = api
            .http
            .post(api.url("/sandboxes"))
            .header("Authorization", "Bearer msk_k")
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (s1, a) = send("run_1:sandbox:1", body.clone()).await;
    let (s2, b) = send("run_1:sandbox:1", body.clone()).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(a["data"]["id"], b["data"]["id"]);
    let (s3, c) = send("run_1:sandbox:2", body.clone()).await;
    assert_eq!(s3, 201);
    assert_ne!(a["data"]["id"], c["data"]["id"]);
    let (s4, d) = send("run_1:sandbox:1", json!({ "template_id": "python" })).await;
    assert_eq!(
        (s4, d["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    assert_eq!(
        api.count("").await,
        2,
        "counted at sandboxd: two keys, two sandboxes"
    );
}

#[tokio::test]
async fn lifecycle_pause_resume_stop_extend_and_readiness() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.create(json!({ "timeout_sec": 60 })).await;
    let (status, v) = api.get(&format!("/sandboxes/{id}/readiness")).await;
    assert_eq!(status, 200);
    assert_eq!(v["data"]["ready"], true);
    assert_eq!(v["data"]["components"]["command_agent"]["status"], "ready");

    let ready = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/readiness/stream")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ready.contains("event: ready"), "{ready}");

    assert_eq!(
        api.post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await
            .1["data"]["state"],
        "paused"
    );
    assert_eq!(
        api.get(&format!("/sandboxes/{id}/readiness")).await.1["data"]["ready"],
        false
    );
    let waited = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/readiness/stream?timeout=0.3")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(waited.contains("event: timeout"), "{waited}");
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/resume"), json!({}))
            .await
            .1["data"]["state"],
        "running"
    );
    // Any call on a paused sandbox resumes it.
    api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    let (code, out, _) = api.exec(&id, "echo awake").await;
    assert_eq!((code, out.as_str()), (0, "awake\n"));
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.1["data"]["state"],
        "running"
    );

    let (_, v) = api
        .post(
            &format!("/sandboxes/{id}/extend"),
            json!({ "timeout_sec": 900 }),
        )
        .await;
    assert_eq!(v["data"]["timeout_sec"], 900);
    assert!(v["data"]["timeout_remaining_ms"].as_i64().unwrap() > 800_000);
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/stop"), json!({}))
            .await
            .1["data"]["state"],
        "stopped"
    );
    api.delete(&format!("/sandboxes/{id}")).await;
    let (status, v) = api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("invalid_state"))
    );
}
