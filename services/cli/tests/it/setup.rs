use slipway_common::setup;
use slipway_common::subjects::streams;
use slipway_common::topology::Topology;
use slipway_test_support::{FailpointRun, NatsServer};

fn slipway(server: &NatsServer) -> FailpointRun {
    FailpointRun::new(env!("CARGO_BIN_EXE_slipway"))
        .arg("setup")
        .env("SLIPWAY__NATS__URL", server.url())
}

fn topology() -> Topology {
    let settings = slipway_common::Settings::load(&Default::default()).unwrap();
    Topology::new(&settings.setup)
}

#[tokio::test]
async fn setup_aborted_half_way_completes_on_restart_without_duplicates() {
    let server = NatsServer::start().unwrap();
    let run = slipway(&server);
    // The third stream is created, then the process aborts before the rest.
    run.run_to_failpoint("setup.after_stream@3").unwrap();

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let topo = topology();
    let missing = setup::verify(&js, &topo).await.unwrap();
    let total =
        topo.streams.len() + topo.buckets.len() + topo.object_stores.len() + topo.consumers.len();
    assert_eq!(
        missing.len(),
        total - 3,
        "exactly three streams exist after the abort"
    );

    let out = run.restart().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("created ").count(), total - 3, "{stdout}");
    assert_eq!(stdout.matches("ok ").count(), 3, "{stdout}");
    assert!(setup::verify(&js, &topo).await.unwrap().is_empty());

    // Counted at the server: one stream per name, no extra ones.
    let mut names = Vec::new();
    let mut list = js.stream_names();
    use futures::StreamExt;
    while let Some(n) = list.next().await {
        names.push(n.unwrap());
    }
    names.sort();
    let mut expected: Vec<String> = topo
        .streams
        .iter()
        .map(|s| s.name.to_string())
        .chain(topo.buckets.iter().map(|b| b.stream_name()))
        .chain(topo.object_stores.iter().map(|o| o.stream_name()))
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    assert!(names.contains(&streams::USAGE.to_string()));
}

#[tokio::test]
async fn setup_reports_drift_and_update_corrects_it() {
    let server = NatsServer::start().unwrap();
    let out = slipway(&server).restart().unwrap();
    assert!(out.status.success());
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut config = js
        .get_stream(streams::PROMPTS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.duplicate_window = std::time::Duration::from_secs(5);
    js.update_stream(config).await.unwrap();

    let out = slipway(&server).restart().unwrap();
    assert!(!out.status.success(), "drift fails setup");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("stream PROMPTS: duplicate_window is 5s, expected 3600s"),
        "{stdout}"
    );

    let out = slipway(&server).arg("--update").restart().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("updated  stream PROMPTS"));
    let out = slipway(&server).arg("--check").restart().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let out = FailpointRun::new(env!("CARGO_BIN_EXE_slipway"))
        .arg("setup")
        .env("SLIPWAY__NATS__URL", "nats://127.0.0.1:1")
        .env("SLIPWAY__NATS__CONNECT_TIMEOUT_MS", "500")
        .restart()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connecting to NATS at nats://127.0.0.1:1"),
        "{stderr}"
    );
}
