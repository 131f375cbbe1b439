//! Deployments (build in the sandbox, content-addressed artifact, served by the edge, outliving
//! the sandbox, versions and rollback), usage rollups and per-user quotas.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The digest of a one-file artifact, computed from the test's own input: sha256 over the
/// manifest's canonical JSON (documented in docs/sandboxd.md).
fn one_file_digest(entrypoint: &str, content: &str) -> String {
    let manifest = format!(
        "{{\"entrypoint\":\"{entrypoint}\",\"files\":[{{\"path\":\"{entrypoint}\",\"size\":{},\"sha256\":\"{}\"}}]}}",
        content.len(),
        sha(content.as_bytes())
    );
    sha(manifest.as_bytes())
}

async fn write(api: &Api, id: &str, path: &str, content: &str) {
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": path, "content": content}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// Waits for a version to leave `building`.
async fn finished(api: &Api, dep: &str, vid: &str) -> Value {
    for _ in 0..600 {
        let (status, v) = api.get(&format!("/deployments/{dep}/versions/{vid}")).await;
        assert_eq!(status, 200, "{v}");
        if v["data"]["state"] != "building" {
            return v["data"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("version {vid} still building after 30 s");
}

async fn deploy(api: &Api, id: &str, body: Value) -> (String, String, String) {
    let (status, v) = api.post(&format!("/sandboxes/{id}/deploy"), body).await;
    assert_eq!(status, 201, "{v}");
    let d = &v["data"];
    assert_eq!(d["version"]["state"], "building", "{v}");
    (
        d["deployment_id"].as_str().unwrap().to_string(),
        d["version_id"].as_str().unwrap().to_string(),
        d["url"].as_str().unwrap().to_string(),
    )
}

/// A version's build log (plain text).
async fn build_log(api: &Api, dep: &str, vid: &str) -> String {
    api.http
        .get(api.url(&format!("/deployments/{dep}/versions/{vid}/logs")))
        .header("Authorization", "Bearer msk_test_key")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn served(edge: &reqwest::Client, url: &str) -> (u16, String, String) {
    let r = edge.get(url).send().await.unwrap();
    let digest = r
        .headers()
        .get("x-slipway-artifact")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), digest, r.text().await.unwrap())
}

#[tokio::test]
async fn a_deployment_is_frozen_served_by_the_edge_and_outlives_its_sandbox() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let edge = sd.edge_http();
    let id = api.sandbox().await;
    let v1 = "<h1>version one</h1>";
    write(&api, &id, "src/index.html", v1).await;
    let build = "mkdir -p dist && cp -r src/. dist/ && echo build-ok";
    let (dep, vid1, url) = deploy(
        &api,
        &id,
        json!({"name": "Shop Front", "build_command": build, "output_path": "/workspace/dist"}),
    )
    .await;
    assert!(url.contains(".apps.localhost:"), "{url}");
    assert!(url.starts_with("http://shop-front-"), "{url}");
    let version = finished(&api, &dep, &vid1).await;
    assert_eq!(version["state"], "ready", "{version}");
    assert_eq!(version["version_number"], 1);
    let digest1 = one_file_digest("index.html", v1);
    assert_eq!(version["artifact_sha256"], digest1.as_str());
    let log = build_log(&api, &dep, &vid1).await;
    assert!(log.contains("build-ok"), "{log}");
    assert_eq!(
        served(&edge, &url).await,
        (200, digest1.clone(), v1.to_string())
    );

    // The sandbox goes; the deployment stays, byte for byte.
    let (status, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        served(&edge, &url).await,
        (200, digest1.clone(), v1.to_string())
    );
    let (_, d) = api.get(&format!("/deployments/{dep}")).await;
    assert_eq!(d["data"]["state"], "running");
    assert_eq!(d["data"]["active_version_id"], vid1.as_str());
    let (_, list) = api.get("/deployments").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn versions_roll_back_without_rebuilding_and_a_failed_build_changes_nothing() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let edge = sd.edge_http();
    let id = api.sandbox().await;
    let (v1, v2) = ("<p>one</p>", "<p>two</p>");
    write(&api, &id, "site/index.html", v1).await;
    let (dep, vid1, url) = deploy(&api, &id, json!({"output_path": "/workspace/site"})).await;
    assert_eq!(finished(&api, &dep, &vid1).await["state"], "ready");
    write(&api, &id, "site/index.html", v2).await;
    let (dep2, vid2, url2) = deploy(
        &api,
        &id,
        json!({"deployment_id": dep, "output_path": "/workspace/site"}),
    )
    .await;
    assert_eq!((dep2.as_str(), url2.as_str()), (dep.as_str(), url.as_str()));
    let version2 = finished(&api, &dep, &vid2).await;
    assert_eq!(version2["version_number"], 2);
    let (digest1, digest2) = (
        one_file_digest("index.html", v1),
        one_file_digest("index.html", v2),
    );
    assert_eq!(
        served(&edge, &url).await,
        (200, digest2.clone(), v2.to_string())
    );

    // Rollback re-points: version 1's bytes and digest again.
    let (status, d) = api
        .post(&format!("/deployments/{dep}/rollback"), json!({}))
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["data"]["active_version_id"], vid1.as_str());
    assert_eq!(
        served(&edge, &url).await,
        (200, digest1.clone(), v1.to_string())
    );

    // A failing build: a failed version with its log; what is served does not change.
    let (_, vid3, _) = deploy(
        &api,
        &id,
        json!({"deployment_id": dep, "output_path": "/workspace/site", "build_command": "echo boom >&2; exit 3"}),
    )
    .await;
    let version3 = finished(&api, &dep, &vid3).await;
    assert_eq!(version3["state"], "failed", "{version3}");
    assert!(version3["error"].as_str().unwrap().contains("exit code 3"));
    let log = build_log(&api, &dep, &vid3).await;
    assert!(log.contains("boom"), "{log}");
    assert_eq!(
        served(&edge, &url).await,
        (200, digest1.clone(), v1.to_string())
    );
    // Promote forward again; a failed version cannot be served.
    let (status, _) = api
        .post(
            &format!("/deployments/{dep}/versions/{vid2}/promote"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(served(&edge, &url).await, (200, digest2, v2.to_string()));
    let (status, v) = api
        .post(
            &format!("/deployments/{dep}/promote"),
            json!({"version_id": vid3}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("version_not_ready"))
    );
    let (_, versions) = api.get(&format!("/deployments/{dep}/versions")).await;
    let numbers: Vec<u64> = versions["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![3, 2, 1]);
}

#[tokio::test]
async fn deploy_refusals_and_an_idempotent_retry() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    write(&api, &id, "index.html", "hi").await;
    for (body, status, code) in [
        (json!({"port": 3000}), 422, "invalid_runtime"),
        (json!({"mode": "server"}), 422, "invalid_runtime"),
        (
            json!({"deployment_type": "docker_deploy"}),
            422,
            "docker_deploy_not_supported",
        ),
        (
            json!({"entrypoint": "../secret"}),
            422,
            "invalid_entrypoint",
        ),
        (
            json!({"entrypoint": "/etc/passwd"}),
            422,
            "invalid_entrypoint",
        ),
        (json!({"output_path": "/etc"}), 403, "FORBIDDEN_PATH"),
        (
            json!({"deployment_id": "dep_nope"}),
            404,
            "deployment_not_found",
        ),
        (json!({"build_command": " "}), 422, "invalid_build_command"),
    ] {
        let (s, v) = api.post(&format!("/sandboxes/{id}/deploy"), body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
    }
    let (_, list) = api.get("/deployments").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "a refusal left a deployment"
    );

    // No entrypoint in the output: the version fails and says why.
    let (dep, vid, _) = deploy(&api, &id, json!({"entrypoint": "app.html"})).await;
    let v = finished(&api, &dep, &vid).await;
    assert_eq!(v["state"], "failed");
    assert!(v["error"].as_str().unwrap().contains("app.html"), "{v}");

    // The same Idempotency-Key and body twice: one version.
    let send = || {
        api.http
            .post(api.url(&format!("/sandboxes/{id}/deploy")))
            .header("Authorization", "Bearer msk_test_key")
            .header("Idempotency-Key", "deploy-once")
            .json(&json!({"name": "once"}))
            .send()
    };
    let a: Value = send().await.unwrap().json().await.unwrap();
    let b: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(a["data"]["version_id"], b["data"]["version_id"]);
    let dep = a["data"]["deployment_id"].as_str().unwrap();
    let (_, versions) = api.get(&format!("/deployments/{dep}/versions")).await;
    assert_eq!(versions["data"].as_array().unwrap().len(), 1);
    let other = api
        .http
        .post(api.url(&format!("/sandboxes/{id}/deploy")))
        .header("Authorization", "Bearer msk_test_key")
        .header("Idempotency-Key", "deploy-once")
        .json(&json!({"name": "another"}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409);
}

#[tokio::test]
async fn destroying_the_sandbox_right_after_deploy_waits_for_the_build() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let edge = sd.edge_http();
    let id = api.sandbox().await;
    let (dep, vid, url) = deploy(
        &api,
        &id,
        json!({"build_command": "sleep 1; mkdir -p out; printf late > out/index.html", "output_path": "/workspace/out"}),
    )
    .await;
    let (status, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    let v = finished(&api, &dep, &vid).await;
    assert_eq!(v["state"], "ready", "{v}");
    let (status, _, body) = served(&edge, &url).await;
    assert_eq!((status, body.as_str()), (200, "late"));
}

#[tokio::test]
async fn quotas_refuse_create_fork_and_resume_for_that_user_only() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let (status, q) = api
        .send(
            reqwest::Method::PUT,
            "/quotas/external/capped",
            Some(json!({"max_sandboxes": 1})),
        )
        .await;
    assert_eq!(status, 200, "{q}");
    assert_eq!(q["data"]["limits"]["max_sandboxes"], 1);
    assert_eq!(q["data"]["limits"]["max_concurrent"], Value::Null);

    let first = api
        .create(json!({"template_id": "node", "external_user_id": "capped"}))
        .await;
    let (status, v) = api
        .post(
            "/sandboxes",
            json!({"template_id": "node", "external_user_id": "capped"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (402, Some("quota_exceeded")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_sandboxes")
    );
    let (status, v) = api
        .post(&format!("/sandboxes/{first}/fork"), json!({}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (402, Some("quota_exceeded")),
        "{v}"
    );
    // Another user is not affected.
    api.create(json!({"template_id": "node", "external_user_id": "free"}))
        .await;
    // Counted at the source: sandboxd lists exactly one sandbox for the capped user.
    let (_, listed) = api.get("/sandboxes?external_user_id=capped").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let (_, q) = api.get("/quotas/external/capped").await;
    assert_eq!(q["data"]["usage"]["total_sandboxes"], 1);

    // Concurrency: a paused sandbox frees its place; resuming past the limit is refused.
    let (status, _) = api
        .send(
            reqwest::Method::PUT,
            "/quotas/external/capped",
            Some(json!({"max_concurrent": 1})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .post(&format!("/sandboxes/{first}/pause"), json!({}))
        .await;
    assert_eq!(status, 200);
    api.create(json!({"template_id": "node", "external_user_id": "capped"}))
        .await;
    let (status, v) = api
        .post(&format!("/sandboxes/{first}/resume"), json!({}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (402, Some("quota_exceeded")),
        "{v}"
    );

    // Back to the default: uncapped.
    let (status, _) = api.delete("/quotas/external/capped").await;
    assert_eq!(status, 204);
    let (status, _) = api
        .post(&format!("/sandboxes/{first}/resume"), json!({}))
        .await;
    assert_eq!(status, 200);

    for body in [json!({"max_sandboxes": -1}), json!({"max_sandbox": 1})] {
        let (status, v) = api
            .send(reqwest::Method::PUT, "/quotas/external/x", Some(body))
            .await;
        assert_eq!(status, 400, "{v}");
    }
}

#[tokio::test]
async fn the_usage_rollup_groups_by_user_over_a_window_with_the_price_table() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    std::fs::write(
        &prices,
        r#"{"vcpu_second_cents": 1.0, "storage_gb_hour_cents": 0.0}"#,
    )
    .unwrap();
    let sd = Sandboxd::start(BIN, &["--price-table", prices.to_str().unwrap()]).unwrap();
    let api = Api::new(&sd);
    let t0 = Instant::now();
    let a = api
        .create(json!({"template_id": "node", "external_user_id": "alice", "external_project_id": "p1"}))
        .await;
    let t_created = Instant::now();
    let b = api
        .create(
            json!({"template_id": "node", "external_user_id": "bob", "external_project_id": "p1"}),
        )
        .await;
    let (status, _) = api.delete(&format!("/sandboxes/{b}")).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t_before = Instant::now();
    let (status, r) = api.get("/usage?group_by=external_user_id&period=7d").await;
    let t_after = Instant::now();
    assert_eq!(status, 200, "{r}");
    let rows = r["results"].as_array().unwrap();
    let users: Vec<&str> = rows
        .iter()
        .map(|x| x["external_user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["alice", "bob"], "ordered by spend: {r}");
    // Two vCPUs while running: alice ran at least from create's reply to the rollup's request,
    // at most from before the create to after the reply.
    // Whole seconds where MIOSA documents them, the exact figure beside.
    for row in rows {
        let exact = row["sandbox_seconds_exact"].as_f64().unwrap();
        assert_eq!(
            row["sandbox_seconds"].as_u64(),
            Some(exact.round() as u64),
            "{row}"
        );
        assert!(row["computer_seconds"].is_u64(), "{row}");
        assert!(row["credit_cents"].is_i64(), "{row}");
    }
    let alice = rows[0]["sandbox_seconds_exact"].as_f64().unwrap();
    let low = 2.0 * (t_before - t_created).as_secs_f64();
    let high = 2.0 * (t_after - t0).as_secs_f64();
    assert!(
        alice >= low - 0.01 && alice <= high + 0.01,
        "{alice} not in [{low}, {high}]"
    );
    let bob = rows[1]["sandbox_seconds_exact"].as_f64().unwrap();
    assert!(bob < alice, "{r}");
    let cents = rows[0]["credit_cents_exact"].as_f64().unwrap();
    assert!(
        (cents - alice).abs() < 0.01,
        "1 cent per vCPU-second: {cents} vs {alice}"
    );

    let (_, by_project) = api
        .get("/usage?group_by=external_project_id&period=mtd")
        .await;
    let p = &by_project["results"].as_array().unwrap()[0];
    assert_eq!(p["external_project_id"], "p1");
    assert_eq!(p["sandboxes"], 2);
    let (_, only) = api.get("/usage?external_user_id=bob").await;
    assert_eq!(only["results"].as_array().unwrap().len(), 1);
    let (_, past) = api
        .get("/usage?period=custom&start=2020-01-01&end=2020-02-01")
        .await;
    assert_eq!(past["results"].as_array().unwrap().len(), 0);
    for q in [
        "period=90d",
        "period=custom",
        "group_by=team",
        "start=2020-02-01&end=2020-01-01",
    ] {
        let (status, v) = api.get(&format!("/usage?{q}")).await;
        assert_eq!(status, 422, "{q}: {v}");
    }
    let (status, s) = api.get("/usage/summary").await;
    assert_eq!(status, 200, "{s}");
    assert!(s["data"]["compute_hours"].as_f64().unwrap() > 0.0);
    let _ = a;
}

#[tokio::test]
async fn a_dynamic_deployment_runs_its_command_from_the_artifact_and_outlives_its_sandbox() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let edge = sd.edge_http();
    let id = api.sandbox().await;
    crate::edge::start_app(&api, &id, 3000).await;
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/deploy"),
            json!({"run_command": "node server.js"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_runtime"))
    );
    let (dep, vid, url) = deploy(
        &api,
        &id,
        json!({"name": "dyn", "run_command": "node server.js", "port": 3000}),
    )
    .await;
    let version = finished(&api, &dep, &vid).await;
    assert_eq!(version["state"], "ready", "{version}");
    assert_eq!(version["kind"], "dynamic");

    // The first requests may find the runtime still starting (502, retried).
    let mut page = (0, String::new());
    for _ in 0..200 {
        let r = edge.get(&url).send().await.unwrap();
        page = (r.status().as_u16(), r.text().await.unwrap());
        if page.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(page.0, 200, "{}", page.1);
    assert!(page.1.contains("VERSION_ONE"), "{}", page.1);
    assert!(
        !page.1.contains("data-slipway-live"),
        "deployments get no live refresh"
    );

    // The source sandbox goes; the app keeps answering from its own runtime.
    let (status, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    let echo: Value = edge
        .get(format!("{}echo", url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["port"], 3000);
    // Runtimes are sandboxd's own: not in the tenant's list.
    let (_, listed) = api.get("/sandboxes").await;
    for s in listed["data"].as_array().unwrap() {
        assert!(s["metadata"].get("slipway_runtime_of").is_none(), "{s}");
    }
}
