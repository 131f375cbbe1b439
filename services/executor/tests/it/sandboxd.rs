use serde_json::json;
use slipway_common::config::Secret;
use slipway_executor::miosa::{ClientConfig, MiosaClient};
use slipway_test_support::{Sandboxd, workspace_bin};

#[tokio::test]
async fn the_client_drives_a_real_sandboxd() {
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let c = MiosaClient::new(ClientConfig::new(
        sd.base_url(),
        Secret::new("msk_test_executor"),
    ))
    .unwrap();
    let body = json!({ "template_id": "node", "external_user_id": "u1" });
    let a = c
        .create_sandbox(body.clone(), "run_7:sandbox:1")
        .await
        .unwrap();
    let again = c.create_sandbox(body, "run_7:sandbox:1").await.unwrap();
    assert_eq!(a["id"], again["id"], "the same step creates one sandbox");
    let id = a["id"].as_str().unwrap();
    let listed = c
        .list_sandboxes(&[("external_user_id", "u1".into())])
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "counted at sandboxd");

    c.write_many(
        id,
        &[
            ("/workspace/a.txt".into(), b"from the executor".to_vec()),
            ("b/c.txt".into(), vec![0, 159, 146, 150]),
        ],
        "run_7:files:1",
    )
    .await
    .unwrap();
    let ran = c
        .exec(
            id,
            "cat a.txt; wc -c < b/c.txt",
            None,
            &Default::default(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ran["stdout"], "from the executor4\n");
    assert_eq!(ran["exit_code"], 0);

    let updated = c
        .update_sandbox(id, json!({ "always_on": true }), "run_7:update:1")
        .await
        .unwrap();
    assert_eq!(updated["always_on"], true);
    assert_eq!(
        c.lifecycle(id, "pause", json!({}), "run_7:pause:1")
            .await
            .unwrap()["state"],
        "paused"
    );
    assert_eq!(
        c.lifecycle(id, "resume", json!({}), "run_7:resume:1")
            .await
            .unwrap()["state"],
        "running"
    );
    let e = c.get_sandbox("sbx_missing").await.unwrap_err();
    assert_eq!(e.code(), slipway_proto::v1::ErrorCode::NotFound);

    c.destroy_sandbox(id, "run_7:destroy:1").await.unwrap();
    c.destroy_sandbox(id, "run_7:destroy:1").await.unwrap();
    assert!(
        c.list_sandboxes(&[("external_user_id", "u1".into())])
            .await
            .unwrap()
            .is_empty()
    );
}

/// Deployed and previewed apps live at `*.localhost` names this machine's resolver does not
/// know: the client follows them through `edge.resolve`, and never sends its key there.
#[tokio::test]
async fn edge_urls_are_followed_through_edge_resolve_without_the_key() {
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut config = ClientConfig::new(sd.base_url(), Secret::new("msk_test_executor"));
    config.edge = Some(slipway_common::config::EdgeSettings {
        domain: "localhost".into(),
        resolve: Some(sd.edge_addr()),
    });
    let c = MiosaClient::new(config).unwrap();
    let sb = c
        .create_sandbox(json!({"template_id": "node"}), "run_8:sandbox:1")
        .await
        .unwrap();
    let id = sb["id"].as_str().unwrap();
    c.write_many(
        id,
        &[("site/index.html".into(), b"<p>deployed</p>".to_vec())],
        "run_8:files:1",
    )
    .await
    .unwrap();
    let deployed = c
        .request(
            "deploy",
            reqwest::Method::POST,
            format!("/sandboxes/{id}/deploy"),
            vec![],
            Some(json!({"output_path": "/workspace/site"})),
            Some("run_8:deploy:1"),
        )
        .await
        .unwrap();
    let url = deployed["url"].as_str().unwrap().to_string();
    assert!(url.contains(".apps.localhost:"), "{url}");
    let mut last = (0, Default::default());
    for _ in 0..100 {
        last = c.fetch_edge(&url).await.unwrap();
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!((last.0, &last.1[..]), (200, &b"<p>deployed</p>"[..]));

    // What an app behind an edge URL receives: no Authorization header.
    let fake = crate::fake::Fake::default();
    fake.on("GET /page", vec![crate::fake::reply(200, "app")]);
    let base = fake.serve().await;
    let (status, _) = c.fetch_edge(&format!("{base}/page")).await.unwrap();
    assert_eq!(status, 200);
    let seen = fake.requests("GET /page");
    assert!(seen[0].headers.get("authorization").is_none());
}
