//! What going through the executor costs: `sandbox.get` over NATS (request, the executor's
//! decoding and checks, its MIOSA call to sandboxd, the reply) against the same MIOSA call made
//! directly by the client, alternating in one run; and a bare NATS request/reply as the floor.
//! `cargo bench -p slipway-executor --bench call_overhead`; SLIPWAY_BENCH_ITERS (2000).
//! Target: under 0.3 ms added at the median.
#![allow(clippy::unwrap_used)] // A benchmark fails loudly on the first surprise.

use std::time::{Duration, Instant};

use slipway_common::config::{Secret, Settings, Sources};
use slipway_common::{RpcClient, Service, Shutdown};
use slipway_executor::miosa::{ClientConfig, MiosaClient};
use slipway_proto::v1::{GetSandboxRequest, SandboxReply};
use slipway_test_support::{NatsServer, Sandboxd, workspace_bin};

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let iters: usize = std::env::var("SLIPWAY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "msk_bench").unwrap();
    let env = [
        ("SLIPWAY__NATS__URL", nats.url()),
        ("SLIPWAY__HEALTH__LISTEN", "127.0.0.1:0".to_string()),
        ("SLIPWAY__PLATFORM__BASE_URL", sd.base_url().to_string()),
        ("SLIPWAY__PLATFORM__API_KEY_FILE", key.display().to_string()),
        ("SLIPWAY__PLATFORM__RATE_LIMIT_RPM", "100000000".to_string()),
        ("SLIPWAY__TELEMETRY__LOG_FILTER", "warn".to_string()),
    ];
    let settings = Settings::load(&Sources {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ..Default::default()
    })
    .unwrap();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    slipway_common::setup::apply(
        &async_nats::jetstream::new(nc.clone()),
        &slipway_common::topology::Topology::new(&settings.setup),
        slipway_common::setup::Mode::CreateMissing,
    )
    .await
    .unwrap();
    let shutdown = Shutdown::new();
    let app = slipway_common::App::start(Service::Executor, settings, shutdown.clone())
        .await
        .unwrap();
    let task = tokio::spawn(slipway_executor::serve(app));

    let mut config = ClientConfig::new(sd.base_url(), Secret::new("msk_bench"));
    config.rate_limit_rpm = 100_000_000;
    config.rate_limit_burst = 100_000;
    let direct = MiosaClient::new(config).unwrap();
    let created = direct
        .create_sandbox(serde_json::json!({"template_id": "node"}), "bench:1:1")
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let rpc = RpcClient::new(nc.clone(), Duration::from_secs(10));
    let req = GetSandboxRequest {
        sandbox_id: id.clone(),
        name: String::new(),
    };
    // The floor: a bare request/reply on the same server.
    let mut echo = nc.subscribe("bench.echo").await.unwrap();
    let responder = nc.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(m) = echo.next().await {
            if let Some(reply) = m.reply {
                let _ = responder.publish(reply, m.payload).await;
            }
        }
    });
    // Warm up, and wait until the executor answers.
    for _ in 0..200 {
        if rpc
            .call::<_, SandboxReply>("slipway.executor.v1.sandbox.get", &req)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..100 {
        direct.get_sandbox(&id).await.unwrap();
    }

    let (mut via, mut dir_t, mut bare) = (vec![], vec![], vec![]);
    for _ in 0..iters {
        let t = Instant::now();
        direct.get_sandbox(&id).await.unwrap();
        dir_t.push(t.elapsed());
        let t = Instant::now();
        let _: SandboxReply = rpc
            .call("slipway.executor.v1.sandbox.get", &req)
            .await
            .unwrap();
        via.push(t.elapsed());
        let t = Instant::now();
        nc.request("bench.echo", "x".into()).await.unwrap();
        bare.push(t.elapsed());
    }
    let (dm, d99) = (pct(&mut dir_t, 50), pct(&mut dir_t, 99));
    let (vm, v99) = (pct(&mut via, 50), pct(&mut via, 99));
    let (bm, b99) = (pct(&mut bare, 50), pct(&mut bare, 99));
    println!("executor call overhead: sandbox.get, {iters} alternating iterations");
    println!(
        "direct MIOSA call (client -> sandboxd)   median {:.3} ms  p99 {:.3} ms",
        ms(dm),
        ms(d99)
    );
    println!(
        "through the executor over NATS           median {:.3} ms  p99 {:.3} ms",
        ms(vm),
        ms(v99)
    );
    println!(
        "bare NATS request/reply (floor)          median {:.3} ms  p99 {:.3} ms",
        ms(bm),
        ms(b99)
    );
    println!(
        "added at the median: {:.3} ms ({:.2}x the direct call); target under 0.3 ms",
        ms(vm.saturating_sub(dm)),
        vm.as_secs_f64() / dm.as_secs_f64()
    );
    shutdown.trigger();
    let _ = task.await;
}
