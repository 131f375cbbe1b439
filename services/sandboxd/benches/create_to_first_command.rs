//! Create to first command: `POST /sandboxes` then `exec node -v`, through sandboxd's HTTP API,
//! against the same `node -v` run under bubblewrap directly (the floor), measured in one run.
//! `cargo bench -p slipway-sandboxd --bench create_to_first_command`; SLIPWAY_BENCH_ITERS sets
//! the sample count (30). Target: median under 25 ms.
#![allow(clippy::unwrap_used)] // A benchmark fails loudly on the first surprise.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use slipway_sandboxd::jail::{Confinement, Jail, Owner};
use slipway_test_support::Sandboxd;
use stats::{median, ms};

#[path = "support/stats.rs"]
mod stats;

const BIN: &str = env!("CARGO_BIN_EXE_slipway-sandboxd");

#[tokio::main]
async fn main() {
    let iters: usize = std::env::var("SLIPWAY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let http = slipway_test_support::http();
    let auth = "Bearer msk_bench";

    // Baseline: the jail alone (bubblewrap in its user namespace, with the same mounts and
    // seccomp programs), running the same command, in a directory the sandbox user can reach.
    let ws = tempfile::tempdir().unwrap();
    let owner = Owner::default();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        owner.give(ws.path()).unwrap();
    }
    let seccomp = tempfile::tempdir().unwrap();
    let jail = Jail::detect(
        owner,
        seccomp.path(),
        ws.path().to_path_buf(),
        ws.path().to_path_buf(),
    )
    .unwrap();
    let mut floor = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let out = jail
            .command(
                ws.path(),
                &Confinement::default(),
                "/workspace",
                &BTreeMap::new(),
                "node -v",
            )
            .output()
            .await
            .unwrap();
        floor.push(t.elapsed());
        assert!(out.status.success());
    }

    let post = |path: String, body: serde_json::Value| {
        let req = http
            .post(format!("{}{path}", sd.base_url()))
            .header("Authorization", auth)
            .json(&body);
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let mut samples = Vec::with_capacity(iters);
    let mut creates = Vec::with_capacity(iters);
    for _ in 0..iters + 3 {
        let t = Instant::now();
        let created = post("/sandboxes".to_string(), json!({ "template_id": "node" })).await;
        let id = created["data"]["id"].as_str().unwrap().to_string();
        creates.push(t.elapsed());
        let ran = post(
            format!("/sandboxes/{id}/exec"),
            json!({ "command": "node -v" }),
        )
        .await;
        let elapsed = t.elapsed();
        assert_eq!(ran["data"]["exit_code"], 0, "{ran}");
        assert!(ran["data"]["stdout"].as_str().unwrap().starts_with('v'));
        samples.push(elapsed);
        http.delete(format!("{}/sandboxes/{id}", sd.base_url()))
            .header("Authorization", auth)
            .send()
            .await
            .unwrap();
    }
    // The first few warm the page cache and the connection pool.
    let samples: Vec<Duration> = samples.into_iter().skip(3).collect();
    let creates: Vec<Duration> = creates.into_iter().skip(3).collect();

    let (m, f) = (median(&samples), median(&floor));
    println!("create to first command (`node -v`), sandboxd, {iters} samples");
    println!(
        "  sandboxd create + exec   median {:7.2} ms   p90 {:7.2} ms",
        ms(m),
        ms(stats::percentile(&samples, 90))
    );
    println!(
        "    of which create        median {:7.2} ms",
        ms(median(&creates))
    );
    println!(
        "  bwrap node -v (floor)    median {:7.2} ms   p90 {:7.2} ms",
        ms(f),
        ms(stats::percentile(&floor, 90))
    );
    println!(
        "  ratio to the floor       {:.2}x",
        m.as_secs_f64() / f.as_secs_f64()
    );
    println!(
        "  target                   median under 25 ms: {}",
        if ms(m) < 25.0 { "met" } else { "NOT met" }
    );
}
