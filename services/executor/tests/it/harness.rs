//! Real processes for executor tests: a nats-server, a sandboxd, the topology set up, and the
//! `slipway-executor` binary ready to run (with failpoints) against them.

use std::time::Duration;

use slipway_common::RpcClient;
use slipway_common::config::{Settings, Sources};
use slipway_proto::v1::{GetSandboxRequest, SandboxReply};
use slipway_test_support::{FailpointRun, NatsServer, Sandboxd, workspace_bin};

pub fn op(name: &str) -> String {
    format!("slipway.executor.v1.{name}")
}

/// Waits until some executor answers on the service subject.
pub async fn wait_for_service(rpc: &RpcClient) {
    for _ in 0..200 {
        let probe: Result<SandboxReply, _> = rpc
            .call(
                &op("sandbox.get"),
                &GetSandboxRequest {
                    sandbox_id: "sbx_probe".into(),
                    name: String::new(),
                },
            )
            .await;
        if !matches!(probe, Err(slipway_common::RpcError::NoResponders { .. })) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the executor never answered");
}

/// A nats-server, a sandboxd, the topology, and the executor binary ready to run.
pub struct Setup {
    _nats: NatsServer,
    pub sd: Sandboxd,
    _dir: tempfile::TempDir,
    pub run: FailpointRun,
    pub rpc: RpcClient,
    pub js: async_nats::jetstream::Context,
}

/// The executor's settings against `nats` and the platform at `base_url` (its key in `dir`), as
/// environment variables for a process and as loaded settings; the topology is set up on `nats`.
pub async fn configure(
    nats: &NatsServer,
    base_url: &str,
    dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> (Vec<(String, String)>, Settings) {
    let key = dir.join("key");
    std::fs::write(&key, "msk_test_executor").unwrap();
    let env: Vec<(String, String)> = [
        ("SLIPWAY__NATS__URL", nats.url()),
        ("SLIPWAY__HEALTH__LISTEN", "127.0.0.1:0".to_string()),
        ("SLIPWAY__PLATFORM__BASE_URL", base_url.to_string()),
        ("SLIPWAY__PLATFORM__API_KEY_FILE", key.display().to_string()),
    ]
    .into_iter()
    .chain(extra.iter().map(|(k, v)| (*k, v.to_string())))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load(&Sources {
        env: env.iter().cloned().collect(),
        ..Default::default()
    })
    .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    slipway_common::setup::apply(
        &async_nats::jetstream::new(client),
        &slipway_common::topology::Topology::new(&settings.setup),
        slipway_common::setup::Mode::CreateMissing,
    )
    .await
    .unwrap();
    (env, settings)
}

/// `extra` adds settings (environment variables) for the executor.
pub async fn setup(extra: &[(&str, &str)]) -> Setup {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = configure(&nats, sd.base_url(), dir.path(), extra).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let mut run = FailpointRun::new(workspace_bin("slipway-executor").unwrap())
        .timeout(Duration::from_secs(60));
    for (k, v) in &env {
        run = run.env(k, v);
    }
    Setup {
        _nats: nats,
        sd,
        _dir: dir,
        run,
        rpc: RpcClient::new(client, Duration::from_secs(30)),
        js,
    }
}

/// Every sandbox at sandboxd (the source of truth), destroyed ones included.
pub async fn sandboxes_at_sandboxd(sd: &Sandboxd) -> Vec<serde_json::Value> {
    let v: serde_json::Value = slipway_test_support::http()
        .get(format!("{}/sandboxes", sd.base_url()))
        .bearer_auth("msk_test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().unwrap().clone()
}
