//! Isolation as seen from inside a sandbox. Traffic goes only to loopback and to addresses of
//! network namespaces these tests create; the host's own default gateway is never probed.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use slipway_test_support::{NatsServer, Sandboxd};

use crate::api::{Api, BIN};

/// `open` or `closed`, tried from inside sandbox `id` with bash's /dev/tcp.
async fn probe(api: &Api, id: &str, host: &str, port: u16) -> String {
    let (_, out, _) = api
        .exec(id, &format!("timeout 3 bash -c '</dev/tcp/{host}/{port}' 2>/dev/null && echo open || echo closed"))
        .await;
    out.trim().to_string()
}

async fn serve(api: &Api, id: &str, text: &str) {
    api.post(&format!("/sandboxes/{id}/fs/write"), json!({"path": "server.js", "content":
        format!("let n=0; require('http').createServer((q,s)=>s.end('{text} '+(++n))).listen(3000)")})).await;
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": "node server.js", "restart": true}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
}

async fn fetch(api: &Api, id: &str) -> String {
    for _ in 0..100 {
        let (_, out, _) = api.exec(id, "node -e \"fetch('http://127.0.0.1:3000/').then(r=>r.text()).then(t=>console.log(t)).catch(()=>{})\"").await;
        if !out.trim().is_empty() {
            return out.trim().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the dev server in {id} never answered");
}

fn host_default_gateway() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "default"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .map(str::to_string)
}

#[tokio::test]
async fn a_sandbox_reaches_neither_the_host_nor_nats_nor_another_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "msk_test_key\n").unwrap();
    let nats = NatsServer::on_all_interfaces().unwrap();
    let sd = Sandboxd::start_in(
        BIN,
        &dir.path().join("d"),
        &[
            "--listen",
            "0.0.0.0:0",
            "--api-keys-file",
            keys.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    let api_port: u16 = sd
        .base_url()
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let api = Api::new(&sd);
    let a = api.sandbox().await;
    let b = api.sandbox().await;
    serve(&api, &a, "a").await;
    serve(&api, &b, "b").await;
    assert_eq!(fetch(&api, &a).await, "a 1");
    assert_eq!(
        probe(&api, &a, "127.0.0.1", 3000).await,
        "open",
        "control: the probe sees an open port"
    );

    let (_, route, _) = api.exec(&a, "ip -4 route show default").await;
    let gateway = route
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .expect("a gateway")
        .to_string();
    assert!(
        gateway.starts_with("10.233."),
        "the sandbox's gateway is its own veth: {route}"
    );
    if let Some(host_gw) = host_default_gateway() {
        assert_ne!(
            gateway, host_gw,
            "isolation failed: the sandbox's gateway is the host's gateway"
        );
    }
    for target in ["127.0.0.1", gateway.as_str()] {
        assert_eq!(
            probe(&api, &a, target, api_port).await,
            "closed",
            "sandboxd's API on {target}"
        );
        assert_eq!(
            probe(&api, &a, target, nats.port()).await,
            "closed",
            "NATS on {target}"
        );
    }
    let (_, b_addr, _) = api
        .exec(
            &b,
            "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1",
        )
        .await;
    assert_eq!(
        probe(&api, &a, b_addr.trim(), 3000).await,
        "closed",
        "sandbox b from sandbox a"
    );

    // Nothing of the host is visible: not sandboxd's data, not other sandboxes' files or PIDs.
    let data = sd.data_dir().display().to_string();
    let (_, out, _) = api
        .exec(
            &a,
            &format!(
                "ls {data} 2>&1; ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '"
            ),
        )
        .await;
    assert!(out.contains("No such file"), "{out}");
    // PID 1 inside is bubblewrap's init; sandboxd (whose command line names its data dir) and
    // NATS are not there.
    assert!(
        !out.contains("--data-dir") && !out.contains("nats-server"),
        "{out}"
    );
}

#[tokio::test]
async fn two_sandboxes_both_serve_on_port_3000() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let a = api.sandbox().await;
    let b = api.sandbox().await;
    serve(&api, &a, "from a").await;
    serve(&api, &b, "from b").await;
    assert_eq!(fetch(&api, &a).await, "from a 1");
    assert_eq!(fetch(&api, &b).await, "from b 1");
    // sandboxd reaches each one's port from inside its namespace; the host's network cannot.
    let (_, v) = api.get(&format!("/sandboxes/{a}/ports/3000/probe")).await;
    assert_eq!(
        (
            v["data"]["open"].as_bool(),
            v["data"]["http_status"].as_u64()
        ),
        (Some(true), Some(200)),
        "{v}"
    );
    let (_, v) = api.get(&format!("/sandboxes/{b}/ports/3001/probe")).await;
    assert_eq!(v["data"]["open"], false, "{v}");
}

#[tokio::test]
async fn a_fork_bomb_and_a_memory_hog_are_contained_and_reported() {
    let sd = Sandboxd::start(BIN, &["--pids-limit", "64", "--memory-limit-mb", "128"]).unwrap();
    let api = Api::new(&sd);
    let bomb = api.sandbox().await;
    let hog = api.sandbox().await;
    let bystander = api.sandbox().await;

    let (code, _, _) = api
        .exec(
            &hog,
            "python3 -c 'b = bytearray(512 * 1024 * 1024); print(len(b))'",
        )
        .await;
    assert_ne!(code, 0, "the hog did not get 512 MiB under a 128 MiB limit");
    let (_, v) = api.get(&format!("/sandboxes/{hog}/resources")).await;
    assert!(
        v["data"]["events"]["oom_kills"].as_u64().unwrap() >= 1,
        "{v}"
    );

    let (status, _) = api
        .post(
            &format!("/sandboxes/{bomb}/processes"),
            json!({"command": "f() { f | f & }; f; sleep 5"}),
        )
        .await;
    assert_eq!(status, 201);
    let mut hits = 0;
    for _ in 0..100 {
        let (_, v) = api.get(&format!("/sandboxes/{bomb}/resources")).await;
        hits = v["data"]["events"]["pids_limit_hits"].as_u64().unwrap();
        assert!(v["data"]["usage"]["pids"].as_u64().unwrap() <= 64, "{v}");
        if hits > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hits > 0, "the pids limit stopped the bomb and said so");
    assert_eq!(
        api.exec(&bystander, "echo unaffected").await.1,
        "unaffected\n"
    );
    let (status, _) = api.delete(&format!("/sandboxes/{bomb}")).await;
    assert_eq!(
        status, 200,
        "the bomb's sandbox is destroyed, every process with it"
    );
}

#[tokio::test]
async fn a_cpu_burn_shows_up_as_active_cpu() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let (_, before) = api.get(&format!("/sandboxes/{id}/resources")).await;
    // The burn measures its own CPU time (user + system, in seconds); the sandbox's account
    // must show at least that much. The machine is shared, so the burn may get less than a core.
    let (code, _, times) = api
        .exec(
            &id,
            r#"bash -c 'TIMEFORMAT="%U %S"; time timeout 1 sh -c "while :; do :; done"'"#,
        )
        .await;
    assert_eq!(code, 124, "the burn ran its full second");
    let measured_ms: f64 = times
        .split_whitespace()
        .map(|t| t.parse::<f64>().unwrap())
        .sum::<f64>()
        * 1000.0;
    let (_, after) = api.get(&format!("/sandboxes/{id}/resources")).await;
    let used = after["data"]["usage"]["active_cpu_ms"].as_u64().unwrap()
        - before["data"]["usage"]["active_cpu_ms"].as_u64().unwrap();
    assert!(measured_ms >= 100.0, "the burn got some CPU: {times}");
    assert!(
        used as f64 >= measured_ms * 0.95,
        "the account shows {used} ms, the burn measured {measured_ms} ms"
    );
}

/// A test host in a network namespace this test creates (198.18.0.0/15, a benchmarking range,
/// never anyone else's address), serving HTTP on port 8080. Removed on drop.
struct TestHost {
    ns: String,
    addr: String,
    server: std::process::Child,
}

impl TestHost {
    fn start() -> TestHost {
        let n = std::process::id() % 200 + 20;
        let ns = format!("sltest-{}", std::process::id());
        let (host_if, peer) = (format!("slth{n}"), format!("sltp{n}"));
        let addr = format!("198.18.{n}.2");
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        run(&["ip", "link", "set", &peer, "netns", &ns]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{n}.1/30"),
            "dev",
            &host_if,
        ]);
        run(&["ip", "link", "set", &host_if, "up"]);
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ]);
        run(&["ip", "-n", &ns, "link", "set", &peer, "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                &addr,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        TestHost { ns, addr, server }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").arg(pid).status();
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[tokio::test]
async fn outbound_access_follows_the_sandbox_policy() {
    let host = TestHost::start();
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let open = api.sandbox().await;
    let closed = api.create(json!({ "allow_internet_access": false })).await;
    let mut reached = String::new();
    for _ in 0..50 {
        reached = probe(&api, &open, &host.addr, 8080).await;
        if reached == "open" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reached, "open",
        "a sandbox with outbound access reaches the test host"
    );
    assert_eq!(probe(&api, &closed, &host.addr, 8080).await, "closed");
    let (_, links, _) = api.exec(&closed, "ip -o link | awk '{print $2}'").await;
    assert_eq!(
        links.trim(),
        "lo:",
        "no outbound access means no link but loopback"
    );
}

#[tokio::test]
async fn pause_keeps_the_dev_server_and_its_state() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    serve(&api, &id, "count").await;
    assert_eq!(fetch(&api, &id).await, "count 1");
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await
            .1["data"]["state"],
        "paused"
    );
    let (_, v) = api.get(&format!("/sandboxes/{id}/processes")).await;
    assert_eq!(v["data"][0]["status"], "running", "frozen, not ended");
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/resume"), json!({}))
            .await
            .1["data"]["state"],
        "running"
    );
    assert_eq!(
        fetch(&api, &id).await,
        "count 2",
        "the same process, with its state"
    );
}

#[tokio::test]
async fn an_idle_sandbox_is_paused_or_destroyed_and_always_on_prevents_it() {
    let sd = Sandboxd::start(BIN, &["--idle-check-ms", "100"]).unwrap();
    let api = Api::new(&sd);
    let persistent = api
        .create(json!({ "idle_timeout_sec": 1, "persistent": true }))
        .await;
    let ephemeral = api.create(json!({ "idle_timeout_sec": 1 })).await;
    let always = api
        .create(json!({ "idle_timeout_sec": 1, "persistent": true, "always_on": true }))
        .await;
    let state = |id: String| {
        let api = &api;
        async move {
            api.get(&format!("/sandboxes/{id}")).await.1["data"]["state"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let mut states = (String::new(), String::new());
    for _ in 0..100 {
        states = (
            state(persistent.clone()).await,
            state(ephemeral.clone()).await,
        );
        if states == ("paused".to_string(), "destroyed".to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(states, ("paused".to_string(), "destroyed".to_string()));
    assert_eq!(
        state(always.clone()).await,
        "running",
        "always_on is never idled"
    );
}

#[tokio::test]
async fn a_restart_brings_sandboxes_back_paused_and_relaunches_flagged_processes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    serve(&api, &id, "again").await;
    api.post(
        &format!("/sandboxes/{id}/processes"),
        json!({"command": "sleep 1000"}),
    )
    .await;
    assert_eq!(fetch(&api, &id).await, "again 1");
    sd.kill();

    let sd = Sandboxd::start_in(BIN, &data, &[], &[]).unwrap();
    let api = Api::new(&sd);
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.1["data"]["state"],
        "paused"
    );
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/resume"), json!({}))
            .await
            .1["data"]["state"],
        "running"
    );
    let (_, v) = api.get(&format!("/sandboxes/{id}/processes")).await;
    let procs = v["data"].as_array().unwrap();
    assert_eq!(
        procs.len(),
        1,
        "only the flagged process is relaunched: {v}"
    );
    assert_eq!(procs[0]["command"], "node server.js");
    assert_eq!(
        fetch(&api, &id).await,
        "again 1",
        "a fresh process serves again"
    );
}
