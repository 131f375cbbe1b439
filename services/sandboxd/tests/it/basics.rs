use slipway_test_support::{FailpointRun, Sandboxd};

const BIN: &str = env!("CARGO_BIN_EXE_slipway-sandboxd");
const KEY: &str = "Bearer msk_test_key";

#[tokio::test]
async fn templates_need_a_key_and_list_the_catalogue() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let http = slipway_test_support::http();
    let url = format!("{}/sandbox-templates", sd.base_url());

    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let r = http
        .get(&url)
        .header("Authorization", "Bearer sk_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let body: serde_json::Value = http
        .get(&url)
        .header("Authorization", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["default_template_id"], "miosa-sandbox");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    for id in ["miosa-sandbox", "static", "node", "python"] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    for t in body["data"].as_array().unwrap() {
        assert_eq!(t["workdir"], "/workspace");
        assert!(t["preview_port"].as_u64().unwrap() > 0);
        assert!(!t["start_command"].as_str().unwrap().is_empty());
        assert_eq!(t["readiness_probe"]["type"], "http");
    }
    let r = http
        .get(format!("{url}/nope"))
        .header("Authorization", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "template_not_found"
    );
}

#[test]
fn listed_keys_only_and_no_open_door_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "msk_live_one\n").unwrap();
    let out = FailpointRun::new(BIN)
        .arg("--listen")
        .arg("0.0.0.0:0")
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .restart()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-keys-file"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let sd = Sandboxd::start(BIN, &["--api-keys-file", keys.to_str().unwrap()]).unwrap();
    rt.block_on(async {
        let http = slipway_test_support::http();
        let url = format!("{}/sandbox-templates", sd.base_url());
        let ok = http
            .get(&url)
            .header("Authorization", "Bearer msk_live_one")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let other = http
            .get(&url)
            .header("Authorization", "Bearer msk_live_two")
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 401);
    });
}

#[tokio::test]
async fn without_bubblewrap_it_refuses_to_start_unless_told_it_may_run_insecurely() {
    let dir = tempfile::tempdir().unwrap();
    // A PATH without bwrap (nor anything else).
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let out = FailpointRun::new(BIN)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path().join("d1"))
        .env("PATH", &empty)
        .restart()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bubblewrap") && stderr.contains("--insecure-no-isolation"),
        "{stderr}"
    );

    let path = format!("{}:/usr/bin:/bin", empty.display());
    let sd = Sandboxd::start_in(
        BIN,
        &dir.path().join("d2"),
        &["--insecure-no-isolation"],
        &[("PATH", path.as_str())],
    )
    .unwrap();
    let http = slipway_test_support::http();
    let created: serde_json::Value = http
        .post(format!("{}/sandboxes", sd.base_url()))
        .header("Authorization", KEY)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["data"]["id"].as_str().unwrap();
    let ran: serde_json::Value = http
        .post(format!("{}/sandboxes/{id}/exec", sd.base_url()))
        .header("Authorization", KEY)
        .json(&serde_json::json!({ "command": "echo $HOME" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let home = ran["data"]["stdout"].as_str().unwrap().trim().to_string();
    assert!(
        home.ends_with("/workspace") && home != "/workspace",
        "no jail: the host path shows: {home}"
    );
}
