//! Edge throughput: the fixture dev server reached directly against the same server reached
//! through the edge, in alternating rounds of one run (keep-alive connections, a fixed number of
//! concurrent clients, a fixed duration per round). Direct access needs the server on the host's
//! loopback, so the paired rounds run sandboxd with `--insecure-no-isolation`; a last set of
//! rounds measures the edge into an isolated sandbox (its own network namespace).
//! `cargo bench -p slipway-sandboxd --bench edge`; SLIPWAY_BENCH_ROUNDS (5),
//! SLIPWAY_BENCH_SECS per round (2), SLIPWAY_BENCH_CLIENTS (8). Target: edge >= 80% of direct.
#![allow(clippy::unwrap_used)] // A benchmark fails loudly on the first surprise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use slipway_test_support::Sandboxd;
use stats::{median, ms, percentile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/stats.rs"]
mod stats;

const BIN: &str = env!("CARGO_BIN_EXE_slipway-sandboxd");
const SERVER: &str = include_str!("../../../tests/fixtures/preview-app/server.js");

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One keep-alive connection doing GETs back to back until `until`; returns latencies.
async fn client(addr: SocketAddr, host: String, path: &str, until: Instant) -> Vec<Duration> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/css\r\n\r\n");
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut out = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        s.write_all(req.as_bytes()).await.unwrap();
        buf.clear();
        let (head_end, len) = loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .expect("content-length");
                break (i + 4, len);
            }
        };
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
        out.push(t.elapsed());
    }
    out
}

/// Requests per second and every latency of one round.
async fn round(addr: SocketAddr, host: &str, clients: u64, secs: u64) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(client(addr, host.to_string(), "/style.css", until)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all.len() as f64 / start.elapsed().as_secs_f64(), all)
}

async fn start_app(sd: &Sandboxd, port: u16) -> (String, String) {
    let http = slipway_test_support::http();
    let post = |path: String, body: serde_json::Value| {
        let req = http
            .post(format!("{}{path}", sd.base_url()))
            .header("Authorization", "Bearer msk_bench")
            .json(&body);
        async move {
            let resp = req.send().await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    let sbx = post("/sandboxes".into(), json!({"template_id": "node"})).await;
    let id = sbx["data"]["id"].as_str().unwrap().to_string();
    post(
        format!("/sandboxes/{id}/fs/write-many"),
        json!({"files": [{"path": "server.js", "content": SERVER}]}),
    )
    .await;
    post(
        format!("/sandboxes/{id}/processes"),
        json!({"command": "node server.js", "env": {"PORT": port.to_string()}}),
    )
    .await;
    let t = post(
        format!("/sandboxes/{id}/preview-token"),
        json!({"port": port, "expires_in": 3600}),
    )
    .await;
    let url = t["data"]["url"].as_str().unwrap();
    let host = url.split('/').nth(2).unwrap().to_string();
    // Wait until the app answers through the edge.
    let edge = sd.edge_http();
    for _ in 0..200 {
        if edge
            .get(format!("http://{host}/style.css"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return (id, host);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the app never answered through the edge");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn report(name: &str, rps: &[f64], lat: &[Duration]) {
    let mut sorted = rps.to_vec();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{name:<28} median {:>8.0} req/s   latency median {:.3} ms  p99 {:.3} ms",
        sorted[sorted.len() / 2],
        ms(median(lat)),
        ms(percentile(lat, 99)),
    );
}

#[tokio::main]
async fn main() {
    let rounds = env("SLIPWAY_BENCH_ROUNDS", 5);
    let secs = env("SLIPWAY_BENCH_SECS", 2);
    let clients = env("SLIPWAY_BENCH_CLIENTS", 8);

    let sd = Sandboxd::start(BIN, &["--insecure-no-isolation"]).unwrap();
    let port = free_port();
    let (id, host) = start_app(&sd, port).await;
    let direct_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let direct_host = format!("localhost:{port}");
    // Warm both paths.
    round(direct_addr, &direct_host, clients, 1).await;
    round(sd.edge_addr(), &host, clients, 1).await;
    let (mut d_rps, mut d_lat, mut e_rps, mut e_lat) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (r, l) = round(direct_addr, &direct_host, clients, secs).await;
        d_rps.push(r);
        d_lat.extend(l);
        let (r, l) = round(sd.edge_addr(), &host, clients, secs).await;
        e_rps.push(r);
        e_lat.extend(l);
    }
    // Without isolation its processes are not in a cgroup: destroy ends them, a kill would not.
    let destroyed = slipway_test_support::http()
        .delete(format!("{}/sandboxes/{id}", sd.base_url()))
        .header("Authorization", "Bearer msk_bench")
        .send()
        .await
        .unwrap();
    assert!(destroyed.status().is_success());
    drop(sd);

    let iso = Sandboxd::start(BIN, &[]).unwrap();
    let (_, iso_host) = start_app(&iso, 3000).await;
    round(iso.edge_addr(), &iso_host, clients, 1).await;
    let (mut i_rps, mut i_lat) = (vec![], vec![]);
    for _ in 0..rounds {
        let (r, l) = round(iso.edge_addr(), &iso_host, clients, secs).await;
        i_rps.push(r);
        i_lat.extend(l);
    }

    println!(
        "edge throughput: {clients} keep-alive clients, {rounds} rounds of {secs} s, GET /style.css"
    );
    report("direct (host loopback)", &d_rps, &d_lat);
    report("through the edge", &e_rps, &e_lat);
    report("edge, isolated sandbox", &i_rps, &i_lat);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, e, i) = (med(&mut d_rps), med(&mut e_rps), med(&mut i_rps));
    println!(
        "edge / direct: {:.0}% (isolated: {:.0}%), target >= 80%",
        100.0 * e / d,
        100.0 * i / d
    );
}
