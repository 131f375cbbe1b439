//! Fork of a sandbox holding 20,000 files / 200 MB, through sandboxd's HTTP API, against
//! `cp -a` of the same tree, measured in one run. `cargo bench -p slipway-sandboxd --bench fork`;
//! SLIPWAY_BENCH_ITERS sets the fork sample count (10), SLIPWAY_BENCH_STORAGE the backend
//! (auto). Targets: median under 30 ms, and 100x faster than `cp -a`.
#![allow(clippy::unwrap_used)] // A benchmark fails loudly on the first surprise.

use std::time::{Duration, Instant};

use serde_json::json;
use slipway_test_support::Sandboxd;
use stats::{median, ms};

#[path = "support/stats.rs"]
mod stats;

const BIN: &str = env!("CARGO_BIN_EXE_slipway-sandboxd");
const FILES: usize = 20_000;
const FILE_BYTES: usize = 10_240;

#[tokio::main]
async fn main() {
    let iters: usize = std::env::var("SLIPWAY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let storage = std::env::var("SLIPWAY_BENCH_STORAGE").unwrap_or_else(|_| "auto".into());
    let sd = Sandboxd::start(BIN, &["--storage", &storage]).unwrap();
    let http = slipway_test_support::http();
    let auth = "Bearer msk_bench";
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

    let id = post("/sandboxes".into(), json!({})).await["data"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fill = format!(
        "python3 -c \"import os\nfor d in range({}): os.makedirs(f'd{{d}}', exist_ok=True)\nfor i in range({FILES}): open(f'd{{i//1000}}/f{{i}}', 'wb').write(os.urandom({FILE_BYTES}))\"",
        FILES / 1000
    );
    let filled = post(
        format!("/sandboxes/{id}/exec"),
        json!({ "command": fill, "timeout": 600 }),
    )
    .await;
    assert_eq!(filled["data"]["exit_code"], 0, "{filled}");
    let counted = post(
        format!("/sandboxes/{id}/exec"),
        json!({ "command": "find . -type f | wc -l; du -sm . | cut -f1" }),
    )
    .await;
    println!(
        "sandbox tree: files and MB: {}",
        counted["data"]["stdout"]
            .as_str()
            .unwrap()
            .replace('\n', " ")
    );

    let mut forks = Vec::with_capacity(iters);
    for _ in 0..iters + 1 {
        let t = Instant::now();
        let fork = post(format!("/sandboxes/{id}/fork"), json!({})).await;
        forks.push(t.elapsed());
        let fork_id = fork["data"]["id"].as_str().unwrap().to_string();
        http.delete(format!("{}/sandboxes/{fork_id}", sd.base_url()))
            .header("Authorization", auth)
            .send()
            .await
            .unwrap();
    }
    let forks: Vec<Duration> = forks.into_iter().skip(1).collect();

    // The same tree, copied with cp -a to a plain directory on this machine.
    let workspace = ["btrfs", "files"]
        .iter()
        .map(|b| {
            sd.data_dir()
                .join(b)
                .join("sandboxes")
                .join(&id)
                .join("workspace")
        })
        .find(|p| p.exists())
        .unwrap();
    let mut copies = Vec::new();
    for _ in 0..2 {
        let dst = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(&workspace)
            .arg(dst.path().join("w"))
            .status()
            .unwrap();
        copies.push(t.elapsed());
        assert!(ok.success());
    }

    let (f, c) = (median(&forks), median(&copies));
    println!(
        "fork of a sandbox with {FILES} files / {} MB, storage {storage}, {iters} samples",
        FILES * FILE_BYTES / 1_000_000
    );
    println!("  POST /fork             median {:9.2} ms", ms(f));
    println!("  cp -a of the same tree median {:9.2} ms", ms(c));
    println!(
        "  speed-up over cp -a    {:9.1}x",
        c.as_secs_f64() / f.as_secs_f64()
    );
    println!(
        "  targets                median under 30 ms: {}; 100x cp -a: {}",
        if ms(f) < 30.0 { "met" } else { "NOT met" },
        if c.as_secs_f64() / f.as_secs_f64() >= 100.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
