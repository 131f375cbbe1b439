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
        .exec(id, "cat a.txt; wc -c < b/c.txt", None, None)
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
        c.lifecycle(id, "pause", "run_7:pause:1").await.unwrap()["state"],
        "paused"
    );
    assert_eq!(
        c.lifecycle(id, "resume", "run_7:resume:1").await.unwrap()["state"],
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
