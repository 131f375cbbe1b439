use slipway_test_support::{FailpointRun, NatsServer};

#[tokio::test]
async fn generated_authorization_runs_a_server_and_keeps_its_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let generate = FailpointRun::new(env!("CARGO_BIN_EXE_slipway"))
        .arg("auth")
        .arg("generate")
        .arg("--out-dir")
        .arg(dir.path());
    let out = generate.restart().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seed = std::fs::read_to_string(dir.path().join("executor.nk")).unwrap();
    assert!(seed.starts_with("SU"), "an nkey user seed");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("executor.nk"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "seeds are private");

    // Re-running keeps the seeds (components keep working) and rewrites the same config.
    let conf = std::fs::read_to_string(dir.path().join("authorization.conf")).unwrap();
    assert!(generate.restart().unwrap().status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("executor.nk")).unwrap(),
        seed
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("authorization.conf")).unwrap(),
        conf
    );

    // The server accepts the generated block; the admin seed sets up, the executor seed connects.
    let server = NatsServer::with_config(&conf).unwrap();
    let setup = FailpointRun::new(env!("CARGO_BIN_EXE_slipway"))
        .arg("setup")
        .env("SLIPWAY__NATS__URL", server.url())
        .env("SLIPWAY__NATS__NKEY_SEED_FILE", dir.path().join("admin.nk"))
        .env("SLIPWAY__NATS__INBOX_PREFIX", "_INBOX_admin")
        .restart()
        .unwrap();
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let executor = async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        .custom_inbox_prefix("_INBOX_executor")
        .connect(server.url())
        .await
        .unwrap();
    let kv = async_nats::jetstream::new(executor)
        .get_key_value("slipway_sandboxes")
        .await
        .unwrap();
    kv.put("sbx_1", "x".into())
        .await
        .expect("the executor writes its own bucket");

    // Without credentials nothing connects.
    assert!(
        async_nats::connect(server.url()).await.is_err() || {
            let c = async_nats::connect(server.url()).await.unwrap();
            c.flush().await.is_err()
        }
    );
}
