//! The spawn-the-app helper: a real service kit on a real nats-server, health on a free port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use slipway_common::config::{Settings, Sources};
use slipway_common::service::ServiceHost;
use slipway_common::{App, Service, Shutdown};

pub fn settings(nats_url: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = HashMap::from([
        ("SLIPWAY__NATS__URL".into(), nats_url.into()),
        ("SLIPWAY__HEALTH__LISTEN".into(), "127.0.0.1:0".into()),
        ("SLIPWAY__SETUP__VERIFY_INTERVAL_MS".into(), "100".into()),
        ("SLIPWAY__SERVICE__GRACE_PERIOD_MS".into(), "10000".into()),
    ]);
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    Settings::load(&Sources {
        env,
        ..Default::default()
    })
    .expect("test settings")
}

pub async fn admin_setup(nats_url: &str) {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let topo = slipway_common::topology::Topology::new(&settings(nats_url, &[]).setup);
    slipway_common::setup::apply(&js, &topo, slipway_common::setup::Mode::CreateMissing)
        .await
        .expect("setup");
}

pub struct TestApp {
    pub health: SocketAddr,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the kit for `service`, registers it on NATS, and hands the host to `prepare` (to add
/// endpoints) before running.
pub async fn spawn_app<F, Fut>(service: Service, settings: Settings, prepare: F) -> TestApp
where
    F: FnOnce(Arc<ServiceHost>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    slipway_common::telemetry::init_for_tests();
    let shutdown = Shutdown::new();
    let app = App::start(service, settings, shutdown.clone())
        .await
        .expect("app starts");
    prepare(app.service_host("test").await.expect("service host")).await;
    // Once the server has answered a ping, the endpoints' subscriptions are registered.
    app.nats.flush().await.expect("connected");
    let health = app.health_addr;
    let task = tokio::spawn(app.run());
    TestApp {
        health,
        shutdown,
        task,
    }
}

pub async fn readyz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let resp = slipway_test_support::http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("readyz");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("readyz json"))
}

/// Polls `/readyz` until `pred` holds (bounded), returning the last answer.
pub async fn readyz_until(
    addr: SocketAddr,
    what: &str,
    pred: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = readyz(addr).await;
        if pred(status, &body) {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: last /readyz {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
