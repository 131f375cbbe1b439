use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

#[tokio::test]
async fn both_route_families_with_their_own_body_rules() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    // /fs/write: `content` verbatim, `content_base64` decoded.
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "/workspace/a.txt", "content": "aGk="})
        )
        .await
        .0,
        200
    );
    assert_eq!(api.download(&id, "/workspace/a.txt").await.1, b"aGk=");
    api.post(
        &format!("/sandboxes/{id}/fs/write"),
        json!({"path": "b.txt", "content_base64": B64.encode(b"bytes\0\xff")}),
    )
    .await;
    assert_eq!(api.download(&id, "b.txt").await.1, b"bytes\0\xff");
    // Legacy /files: `content` is base64.
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "/workspace/c.txt", "content": "aGk="})
        )
        .await
        .0,
        200
    );
    assert_eq!(api.download(&id, "c.txt").await.1, b"hi");
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({"path": "d.txt", "content": "not base64!"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_file"))
    );
    // Legacy download by path in the URL, with the named routes matched first.
    api.post(
        &format!("/sandboxes/{id}/fs/write"),
        json!({"path": "tree", "content": "a file named tree"}),
    )
    .await;
    let resp = api
        .http
        .get(api.url(&format!("/sandboxes/{id}/files/workspace/tree")))
        .header("Authorization", "Bearer msk_k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "a file named tree");
    let (status, v) = api
        .get(&format!("/sandboxes/{id}/files/tree?depth=1"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["data"]["type"], "dir");
    assert_eq!(v["data"]["path"], "/workspace");
    // write-many on both families.
    let (status, v) = api.post(&format!("/sandboxes/{id}/fs/write-many"), json!({"files": [
        {"path": "src/x.js", "content": "x"}, {"path": "/workspace/src/y.js", "content_base64": B64.encode("y")}
    ]})).await;
    assert_eq!(status, 200, "{v}");
    // MIOSA's documented shape: each written file with its size.
    assert_eq!(
        v["data"]["written"],
        json!([
            {"path": "/workspace/src/x.js", "size_bytes": 1},
            {"path": "/workspace/src/y.js", "size_bytes": 1}
        ])
    );
    api.post(
        &format!("/sandboxes/{id}/files/write-many"),
        json!({"files": [{"path": "z.txt", "content": B64.encode("zed")}]}),
    )
    .await;
    assert_eq!(api.download(&id, "z.txt").await.1, b"zed");
    // The files are what processes inside see.
    let (_, out, _) = api
        .exec(&id, "cat src/x.js src/y.js /workspace/z.txt")
        .await;
    assert_eq!(out, "xyzed");
}

#[tokio::test]
async fn list_stat_tree_mkdir_delete() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    api.post(
        &format!("/sandboxes/{id}/fs/write-many"),
        json!({"files": [
            {"path": "a/b/c.txt", "content": "12345"}, {"path": "top.txt", "content": "t"}
        ]}),
    )
    .await;
    let (_, v) = api
        .get(&format!("/sandboxes/{id}/files?path=/workspace"))
        .await;
    let names: Vec<&str> = v["data"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a", "top.txt"]);
    let (_, v) = api
        .get(&format!("/sandboxes/{id}/files?path=/workspace&depth=3"))
        .await;
    assert!(
        v["data"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/workspace/a/b/c.txt" && e["size"] == 5)
    );
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/stat"),
            json!({"path": "a/b/c.txt"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["data"]["type"].as_str(), v["data"]["size"].as_u64()),
        (Some("file"), Some(5))
    );
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/files/stat"), json!({"path": "a"}))
            .await
            .1["data"]["is_dir"],
        true
    );
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/fs/stat"), json!({"path": "nope"}))
            .await
            .0,
        404
    );
    let (_, v) = api
        .get(&format!(
            "/sandboxes/{id}/files/tree?path=/workspace/a&depth=5"
        ))
        .await;
    assert_eq!(v["data"]["children"][0]["children"][0]["name"], "c.txt");

    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/files/mkdir"),
            json!({"path": "new/deep"})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/fs/stat"),
            json!({"path": "new/deep"})
        )
        .await
        .1["data"]["type"],
        "dir"
    );

    let files_url = format!("/sandboxes/{id}/files");
    let del = |body: serde_json::Value| api.send(reqwest::Method::DELETE, &files_url, Some(body));
    let (status, v) = del(json!({"path": "a"})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("directory_not_empty"))
    );
    assert_eq!(del(json!({"path": "a", "recursive": true})).await.0, 200);
    assert_eq!(del(json!({"path": "top.txt"})).await.0, 200);
    assert_eq!(del(json!({"path": "top.txt"})).await.0, 404);
    assert_eq!(del(json!({"path": "/workspace"})).await.0, 403);
    // The canonical route takes the path and the flag in the query.
    api.post(
        &format!("/sandboxes/{id}/fs/write-many"),
        json!({"files": [{"path": "q/x.txt", "content": "x"}]}),
    )
    .await;
    let (status, v) = api.delete(&format!("/sandboxes/{id}/fs?path=q")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("directory_not_empty"))
    );
    assert_eq!(
        api.delete(&format!("/sandboxes/{id}/fs?path=q&recursive=true"))
            .await
            .0,
        200
    );
    let (status, v) = api.delete(&format!("/sandboxes/{id}/fs")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_path"))
    );
    // No SDK has `POST /fs/delete`; MIOSA would not answer it, so neither does sandboxd.
    let (status, _) = api
        .post(
            &format!("/sandboxes/{id}/fs/delete"),
            json!({"path": "new"}),
        )
        .await;
    assert!(matches!(status, 404 | 405), "{status}");
    let (_, v) = api.get(&format!("/sandboxes/{id}/files")).await;
    let names: Vec<&str> = v["data"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["new"]);
    let (status, _) = api.download(&id, "new").await;
    assert_eq!(status, 422, "a directory is not downloadable");
}

#[tokio::test]
async fn traversal_nul_and_symlink_escapes_are_refused() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let other = api.sandbox().await;
    api.post(
        &format!("/sandboxes/{other}/fs/write"),
        json!({"path": "secret.txt", "content": "theirs"}),
    )
    .await;
    // Symlinks made inside the sandbox, pointing out of it (and one pointing inside).
    let (code, _, err) = api.exec(&id, "ln -s /etc etc-link && ln -s ../../.. up && ln -s /workspace/real inside && mkdir real").await;
    assert_eq!(code, 0, "{err}");
    let escapes = [
        "/etc/passwd",
        "/workspace/../etc/passwd",
        "../../secret.txt",
        "a/../../x",
        "/workspacex/a",
        "etc-link/passwd",
        "up/sandboxes",
    ];
    for path in escapes {
        let (status, v) = api
            .post(
                &format!("/sandboxes/{id}/fs/write"),
                json!({"path": path, "content": "x"}),
            )
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (403, Some("FORBIDDEN_PATH")),
            "write {path}: {v}"
        );
        let (status, _) = api.download(&id, path).await;
        assert_eq!(status, 403, "read {path}");
    }
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "a\u{0}b", "content": "x"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_path"))
    );
    let (status, _) = api.get(&format!("/sandboxes/{id}/files?path=/etc")).await;
    assert_eq!(status, 403);
    let (status, _) = api
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "pwd", "cwd": "/etc"}),
        )
        .await;
    assert_eq!(status, 403);
    // A symlink that stays inside is followed the way the sandbox sees it.
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "inside/ok.txt", "content": "ok"})
        )
        .await
        .0,
        200
    );
    assert_eq!(api.exec(&id, "cat real/ok.txt").await.1, "ok");
    // Nothing leaked onto the host or into the other sandbox.
    assert!(!std::path::Path::new("/etc/x").exists());
    assert_eq!(api.download(&other, "secret.txt").await.1, b"theirs");
    let (_, out, _) = api
        .exec(&id, "ls /workspace/../; cat /etc/shadow 2>&1 | head -1")
        .await;
    assert!(
        !out.contains("sandboxes") && !out.contains("root:"),
        "the sandbox sees no host tree: {out}"
    );
}

#[tokio::test]
async fn write_many_is_all_or_nothing() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let mut files: Vec<serde_json::Value> = (0..99)
        .map(|i| json!({"path": format!("f/{i}.txt"), "content": "ok"}))
        .collect();
    files.push(json!({"path": "../escape.txt", "content": "bad"}));
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write-many"),
            json!({ "files": files }),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("file 99"),
        "{v}"
    );
    assert_eq!(
        api.download(&id, "f/0.txt").await.0,
        404,
        "no file of the batch was written"
    );
    let (_, v) = api.get(&format!("/sandboxes/{id}/files")).await;
    assert_eq!(v["data"]["entries"], json!([]));
    // Duplicates, empty batches and bad base64 are refused the same way.
    let (status, _) = api.post(&format!("/sandboxes/{id}/fs/write-many"), json!({"files": [{"path": "a", "content": "1"}, {"path": "/workspace/a", "content": "2"}]})).await;
    assert_eq!(status, 422);
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/fs/write-many"),
            json!({"files": []})
        )
        .await
        .0,
        422
    );
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/fs/write-many"),
            json!({"files": [{"path": "a", "content_base64": "%%%"}]})
        )
        .await
        .0,
        422
    );
    assert_eq!(api.download(&id, "a").await.0, 404);
}

#[tokio::test]
async fn oversized_bodies_and_files_are_refused() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let big = B64.encode(vec![b'x'; 10 * 1024 * 1024 + 1]);
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write"),
            json!({"path": "big", "content_base64": big}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("FILE_TOO_LARGE"))
    );
    let body = vec![b' '; 65 * 1024 * 1024];
    // Its own client: the server answers 413 and closes the connection before the body is sent,
    // which must not poison the pooled connections of the calls after it.
    let resp = slipway_test_support::http()
        .post(api.url(&format!("/sandboxes/{id}/fs/write-many")))
        .header("Authorization", "Bearer msk_k")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
    // Fresh connections: the refused uploads may have left pooled ones closed by the server.
    let api = Api::new(&sd);
    assert_eq!(api.download(&id, "big").await.0, 404);
    // The sandbox is still fine.
    assert_eq!(api.exec(&id, "echo ok").await.1, "ok\n");
}
