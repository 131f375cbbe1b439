//! The hostile suite, races: a process inside a sandbox swaps a name between a directory and a
//! link to a host directory (`renameat2(RENAME_EXCHANGE)` in a loop) while the API reads,
//! lists, deletes and writes under that name. Not one host byte may come back and not one host
//! file may change (a canary directory the test owns, outside the data dir), on both storage
//! backends.

use std::path::Path;

use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

/// Requests per operation.
const ROUNDS: usize = 1000;

const SWAPPER: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('real/sub', exist_ok=True)
open('real/secret.txt', 'w').write('inside')
os.symlink(sys.argv[1], 'link')
os.rename('real', 'race')
print('ready', flush=True)
while True:
    libc.renameat2(-100, b'race', -100, b'link', 2)
"#;

/// Everything under `dir`, with contents, to compare before and after.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                out.push((rel, Vec::new()));
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

async fn race(backend: &str) {
    let sd = Sandboxd::start(BIN, &["--storage", backend]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let canary_home = tempfile::tempdir().unwrap();
    let canary = canary_home.path().join("canary");
    std::fs::create_dir_all(canary.join("sub")).unwrap();
    std::fs::write(canary.join("secret.txt"), "HOST-SECRET").unwrap();
    std::fs::write(canary.join("host-only.txt"), "HOST-ONLY").unwrap();
    std::fs::write(canary.join("sub/keep.txt"), "HOST-KEEP").unwrap();
    let before = snapshot(&canary);

    let (status, _) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "swap.py", "content": SWAPPER}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": format!("timeout 300 python3 swap.py {}", canary.display())}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let pid = v["data"]["pid"].as_u64().unwrap();
    let mut ready = false;
    for _ in 0..200 {
        let (_, v) = api
            .get(&format!("/sandboxes/{id}/processes/{pid}/logs"))
            .await;
        if v.to_string().contains("ready") {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready, "{backend}: the swapper never started");

    let mut leaked = Vec::new();
    for n in 0..ROUNDS {
        let (status, body) = api.download(&id, "race/secret.txt").await;
        if status == 200 && body != b"inside" {
            leaked.push(format!("download: {}", String::from_utf8_lossy(&body)));
        }
        let (_, v) = api
            .get(&format!("/sandboxes/{id}/files?path=/workspace/race"))
            .await;
        if v.to_string().contains("host-only") {
            leaked.push(format!("list: {v}"));
        }
        let (_, v) = api
            .get(&format!("/sandboxes/{id}/files/tree?path=/workspace/race"))
            .await;
        if v.to_string().contains("host-only") {
            leaked.push(format!("tree: {v}"));
        }
        api.delete(&format!("/sandboxes/{id}/fs?path=race/sub&recursive=true"))
            .await;
        api.post(
            &format!("/sandboxes/{id}/fs/write-many"),
            json!({"files": [{"path": format!("race/w{n}.txt"), "content": "sandbox"}]}),
        )
        .await;
        api.post(
            &format!("/sandboxes/{id}/fs/mkdir"),
            json!({"path": format!("race/d{n}")}),
        )
        .await;
    }
    assert!(
        leaked.is_empty(),
        "{backend}: host data came back: {leaked:?}"
    );
    // The swapper raced the whole time.
    let (_, v) = api.get(&format!("/sandboxes/{id}/processes/{pid}")).await;
    assert_eq!(v["data"]["running"], true, "{backend}: {v}");
    assert_eq!(
        snapshot(&canary),
        before,
        "{backend}: the host canary changed"
    );
    // With the swapper stopped, the sandbox takes writes and runs commands as before.
    let (status, _) = api
        .delete(&format!("/sandboxes/{id}/processes/{pid}"))
        .await;
    assert!(status < 300, "{status}");
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "after/ok.txt", "content": "ok"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (code, out, _) = api.exec(&id, "cat /workspace/after/ok.txt").await;
    assert_eq!((code, out.as_str()), (0, "ok"));
}

#[tokio::test]
async fn a_racing_swapper_gets_no_host_file_on_btrfs() {
    race("btrfs").await;
}

#[tokio::test]
async fn a_racing_swapper_gets_no_host_file_with_copy_storage() {
    race("copy").await;
}

const DIR_SWAPPER: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for n in range(2000):
    d, l = f'd{n}'.encode(), f'l{n}'.encode()
    os.symlink(sys.argv[1], l)
    os.mkdir(d)
    libc.renameat2(-100, d, -100, l, 2)
print('done', flush=True)
"#;

/// A directory appears and is at once swapped for a link to a host directory: the watch, which
/// lists every new directory, must list it inside the sandbox or not at all.
#[tokio::test]
async fn a_racing_swapper_sees_no_host_name_on_the_watch() {
    use futures::StreamExt;
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let canary_home = tempfile::tempdir().unwrap();
    let canary = canary_home.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("host-only.txt"), "HOST-ONLY").unwrap();
    let resp = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/files/watch?path=/workspace")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "swap.py", "content": DIR_SWAPPER}),
        )
        .await;
    assert_eq!(status, 200);
    let (code, out, err) = api
        .exec(&id, &format!("python3 swap.py {}", canary.display()))
        .await;
    assert_eq!((code, out.trim()), (0, "done"), "{err}");
    // Everything the watch said while the swapper ran (and a moment after).
    let mut text = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("/workspace/d1"),
        "the watch saw nothing: {text:.300}"
    );
    assert!(
        !text.contains("host-only"),
        "a host name came through the watch"
    );
}
