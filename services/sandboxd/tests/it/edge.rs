//! The edge as a browser meets it: preview tokens, previews, shares, refusals, WebSockets and
//! live refresh, through a real sandboxd and a real dev server inside a sandbox.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use slipway_test_support::Sandboxd;

use crate::api::{Api, BIN};

const SERVER: &str = include_str!("../../../../tests/fixtures/preview-app/server.js");
const APP: &str = include_str!("../../../../tests/fixtures/preview-app/app.js");
const PAGE: &str = include_str!("../../../../tests/fixtures/preview-app/index.html");

/// Puts the fixture app in sandbox `id` and starts it on `port` (relaunched after a restart).
pub async fn start_app(api: &Api, id: &str, port: u16) {
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/fs/write-many"),
            json!({"files": [
                {"path": "server.js", "content": SERVER},
                {"path": "app.js", "content": APP},
                {"path": "public/index.html", "content": PAGE},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/processes"),
            json!({"command": "node server.js", "env": {"PORT": port.to_string()}, "restart": true}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
}

pub async fn token(api: &Api, id: &str, body: Value) -> Value {
    let (status, v) = api
        .post(&format!("/sandboxes/{id}/preview-token"), body)
        .await;
    assert_eq!(status, 201, "{v}");
    v["data"].clone()
}

/// GETs `url` through the edge until the app answers (it may still be starting).
async fn get_ready(edge: &reqwest::Client, url: &str) -> reqwest::Response {
    for _ in 0..200 {
        let resp = edge.get(url).send().await.unwrap();
        if resp.status() != 502 {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the app behind {url} never answered");
}

fn with_path(url: &str, path_and_query: &str) -> String {
    let (base, _) = url
        .split_once("/?")
        .unwrap_or((url.trim_end_matches('/'), ""));
    format!("{}{path_and_query}", base.trim_end_matches('/'))
}

#[tokio::test]
async fn a_preview_token_opens_its_app_and_nothing_else() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let edge = sd.edge_http();
    let a = api.sandbox().await;
    let b = api.sandbox().await;
    start_app(&api, &a, 3000).await;
    start_app(&api, &b, 3000).await;

    let t = token(&api, &a, json!({"expires_in": 600})).await;
    let url = t["url"].as_str().unwrap();
    let tok = t["token"].as_str().unwrap();
    assert!(tok.starts_with("mp_"), "{t}");
    assert_eq!(t["scope"], "read");
    assert!(url.contains(&format!("?mt={tok}")), "{url}");

    let resp = get_ready(&edge, url).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-frame-options").is_none());
    let html = resp.text().await.unwrap();
    assert!(html.contains("VERSION_ONE"), "{html}");
    assert!(
        html.contains("data-slipway-live"),
        "no live-refresh script: {html}"
    );

    // The same URL without the token still works: the host name is the capability.
    let host = url.split('/').nth(2).unwrap().to_string();
    let bare = format!("http://{host}/style.css");
    assert_eq!(edge.get(&bare).send().await.unwrap().status(), 200);

    // Sandbox B's slug with A's secret; port 3001 with the 3000 secret.
    let label = host.split('.').next().unwrap();
    let (port, rest) = label.split_once('-').unwrap();
    let (_, secret) = rest.split_once('-').unwrap();
    let b_slug = b.strip_prefix("sbx_").unwrap();
    for forged in [
        format!("{port}-{b_slug}-{secret}"),
        format!("3001-{}", rest),
    ] {
        let u = url.replacen(label, &forged, 1);
        let r = edge.get(&u).send().await.unwrap();
        assert_eq!(r.status(), 403, "{u}");
        assert_eq!(r.headers()["x-slipway-edge"], "refused");
    }
    // One changed character in the host secret, and in the token.
    let flip = |s: &str, i: usize| {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'a' { b'b' } else { b'a' };
        String::from_utf8(b).unwrap()
    };
    let u = url.replacen(secret, &flip(secret, 5), 1);
    assert_eq!(edge.get(&u).send().await.unwrap().status(), 403);
    let u = url.replacen(tok, &flip(tok, tok.len() - 3), 1);
    assert_eq!(edge.get(&u).send().await.unwrap().status(), 403);
    // A valid token of another sandbox, presented on A's host, is refused too.
    let tb = token(&api, &b, json!({})).await;
    let u = format!(
        "{}/?mt={}",
        url.split("/?").next().unwrap(),
        tb["token"].as_str().unwrap()
    );
    assert_eq!(edge.get(&u).send().await.unwrap().status(), 403);
    // Not a preview host at all.
    let r = edge
        .get(format!("http://{}/", sd.edge_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The app never sees the edge's credentials or the token.
    let echo: Value = edge
        .get(with_path(url, &format!("/echo?x=1&mt={tok}")))
        .header("Authorization", "Bearer msk_test_key")
        .header("x-miosa-preview-token", tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["url"], "/echo?x=1");
    assert_eq!(echo["headers"]["host"], "localhost:3000");
    let text = echo.to_string();
    for secret in ["msk_", "mp_", "authorization", "x-miosa-preview-token"] {
        assert!(!text.contains(secret), "the app saw `{secret}`: {text}");
    }

    // `read` allows looking, not changing; `interact` allows both.
    let r = edge
        .post(with_path(url, "/echo"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let ti = token(&api, &a, json!({"scope": "interact"})).await;
    let echo: Value = edge
        .post(with_path(ti["url"].as_str().unwrap(), "/echo"))
        .body("payload")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "payload");

    // Bad requests for tokens are refused with the reason.
    for (body, code) in [
        (json!({"expires_in": 86_401}), "invalid_expires_in"),
        (json!({"expires_in": 0}), "invalid_expires_in"),
        (json!({"scope": "admin"}), "invalid_scope"),
        (json!({"port": 70000}), "invalid_port"),
    ] {
        let (status, v) = api
            .post(&format!("/sandboxes/{a}/preview-token"), body)
            .await;
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["error"]["code"], code);
    }
    let (status, _) = api
        .post("/sandboxes/sbx_nope/preview-token", json!({}))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_expired_token_gets_the_expired_page() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    start_app(&api, &id, 3000).await;
    let t = token(&api, &id, json!({"expires_in": 1})).await;
    let url = t["url"].as_str().unwrap();
    let edge = sd.edge_http();
    get_ready(&edge, url).await;
    // Expiry is a deadline on the clock: wait past it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = edge.get(url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("expired"));
}

#[tokio::test]
async fn websockets_pass_through_and_file_changes_reach_the_page() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    start_app(&api, &id, 3000).await;
    let t = token(&api, &id, json!({})).await;
    let url = t["url"].as_str().unwrap();
    let edge = sd.edge_http();
    get_ready(&edge, url).await;
    let host = url.split('/').nth(2).unwrap();

    // A WebSocket through the edge, with the capability host name and nothing else.
    let tcp = tokio::net::TcpStream::connect(sd.edge_addr())
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{host}/ws"), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
        .await
        .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "echo:ping");

    // The live-refresh stream reports a change made by a process inside the sandbox.
    let mut live = edge
        .get(with_path(url, "/__slipway/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let mut seen = String::new();
    while !seen.contains("event: ready") {
        seen.push_str(&String::from_utf8_lossy(
            &live.chunk().await.unwrap().unwrap(),
        ));
    }
    let (code, _, err) = api
        .exec(
            &id,
            "sed -i s/VERSION_ONE/VERSION_TWO/ /workspace/public/index.html",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // sed writes a temporary file and renames it over the page: both are changes.
    while !seen.contains("index.html") {
        let chunk = tokio::time::timeout_at(deadline, live.chunk())
            .await
            .expect("no change event within 10 s")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: change"), "{seen}");
    let html = edge.get(url).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("VERSION_TWO"), "{html}");
}

#[tokio::test]
async fn shares_open_without_credentials_until_revoked_also_across_a_restart() {
    let mut sd = Sandboxd::start(BIN, &[]).unwrap();
    let dir = sd.take_dir().unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    start_app(&api, &id, 3000).await;
    let edge = sd.edge_http();

    // Two sandbox shares; revoking one leaves the other open.
    let mut shares = Vec::new();
    for _ in 0..2 {
        let (status, v) = api
            .post(
                &format!("/sandboxes/{id}/shares"),
                json!({"expires_in": 600}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        assert!(v["share_id"].as_str().unwrap().starts_with("shr_"));
        assert!(v["share_url"].as_str().unwrap().contains("?ms=ms_"), "{v}");
        shares.push(v);
    }
    for s in &shares {
        assert_eq!(
            get_ready(&edge, s["share_url"].as_str().unwrap())
                .await
                .status(),
            200
        );
    }
    let (status, _) = api
        .delete(&format!(
            "/sandboxes/{id}/shares/{}",
            shares[0]["share_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 204);
    let (_, list) = api.get(&format!("/sandboxes/{id}/shares")).await;
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["share_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![shares[1]["share_id"].as_str().unwrap()]);
    let url0 = shares[0]["share_url"].as_str().unwrap();
    let url1 = shares[1]["share_url"].as_str().unwrap();
    assert_eq!(edge.get(url0).send().await.unwrap().status(), 403);
    assert_eq!(edge.get(url1).send().await.unwrap().status(), 200);
    let (status, v) = api
        .post(
            &format!("/sandboxes/{id}/shares"),
            json!({"scope": "write"}),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    let (status, _) = api
        .delete(&format!("/sandboxes/{id}/shares/shr_nope"))
        .await;
    assert_eq!(status, 404);

    // A preview and its share: the share opens until revoked; the preview stays.
    let (status, preview) = api
        .post(
            &format!("/sandboxes/{id}/previews"),
            json!({"port": 3000, "name": "web"}),
        )
        .await;
    assert_eq!(status, 201, "{preview}");
    let pid = preview["data"]["id"].as_str().unwrap().to_string();
    let (status, share) = api
        .post(
            &format!("/sandboxes/{id}/previews/{pid}/share"),
            json!({"ttl_seconds": 600}),
        )
        .await;
    assert_eq!(status, 201, "{share}");
    assert!(
        share["preview_token"]
            .as_str()
            .unwrap()
            .starts_with("miosa_pv_")
    );
    let share_url = share["share_url"].as_str().unwrap().to_string();
    assert_eq!(edge.get(&share_url).send().await.unwrap().status(), 200);
    let (_, got) = api.get(&format!("/sandboxes/{id}/previews/{pid}")).await;
    assert!(
        got["data"]["share_token_prefix"]
            .as_str()
            .unwrap()
            .starts_with("miosa_pv_")
    );
    let (status, _) = api
        .delete(&format!("/sandboxes/{id}/previews/{pid}/share"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(edge.get(&share_url).send().await.unwrap().status(), 403);
    let preview_url = preview["data"]["url"].as_str().unwrap().to_string();
    assert_eq!(edge.get(&preview_url).send().await.unwrap().status(), 200);

    // After a restart (sandboxes come back paused; the edge resumes them): revoked stays
    // revoked, live stays live.
    sd.kill();
    drop(sd);
    let sd = Sandboxd::start_in(BIN, &dir.path().join("data"), &[], &[]).unwrap();
    let edge = sd.edge_http();
    let port = |u: &str| {
        u.split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    let moved = |u: &str| u.replacen(&port(u), &sd.edge_addr().port().to_string(), 1);
    assert_eq!(edge.get(moved(url0)).send().await.unwrap().status(), 403);
    assert_eq!(
        edge.get(moved(&share_url)).send().await.unwrap().status(),
        403
    );
    assert_eq!(get_ready(&edge, &moved(url1)).await.status(), 200);
    assert_eq!(get_ready(&edge, &moved(&preview_url)).await.status(), 200);

    // Deleting the preview closes its URL; destroying the sandbox closes everything (410).
    let api = Api::new(&sd);
    let (status, _) = api.delete(&format!("/sandboxes/{id}/previews/{pid}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        edge.get(moved(&preview_url)).send().await.unwrap().status(),
        403
    );
    let (_, list) = api.get(&format!("/sandboxes/{id}/previews")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let (status, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(edge.get(moved(url1)).send().await.unwrap().status(), 410);
}

#[tokio::test]
async fn a_request_for_a_paused_sandbox_resumes_it() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    start_app(&api, &id, 3000).await;
    let t = token(&api, &id, json!({})).await;
    let url = t["url"].as_str().unwrap();
    let edge = sd.edge_http();
    get_ready(&edge, url).await;
    let (status, v) = api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["state"], "paused");
    let r = edge.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(v["data"]["state"], "running");
}

#[tokio::test]
async fn the_edge_reads_tokens_as_servers_do_and_says_where_requests_came_from() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let edge = sd.edge_http();
    let a = api.sandbox().await;
    start_app(&api, &a, 3000).await;
    let t = token(&api, &a, json!({})).await;
    let url = t["url"].as_str().unwrap();
    let tok = t["token"].as_str().unwrap();
    get_ready(&edge, url).await;

    // `%6Dt` is `mt`: a forged token under an escaped name is refused, not passed on.
    let forged = format!("{}x", &tok[..tok.len() - 1]);
    let r = edge
        .get(with_path(url, &format!("/echo?%6Dt={forged}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // `m%73=x` is `ms=x`: a token parameter holding no token is refused too.
    let r = edge
        .get(with_path(url, &format!("/echo?a=1&%6Dt={tok}&m%73=x")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The real token under an escaped name is checked, then stripped like any other, and the
    // app hears where the request came from from the edge, not from the client.
    let echo: Value = edge
        .get(with_path(url, &format!("/echo?a=1&%6Dt={tok}")))
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Real-IP", "203.0.113.9")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["url"], "/echo?a=1", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1", "{echo}");
    assert!(echo["headers"].get("x-real-ip").is_none(), "{echo}");

    // Two Host headers: refused, whichever comes first.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = url.split('/').nth(2).unwrap();
    let mut s = tokio::net::TcpStream::connect(sd.edge_addr())
        .await
        .unwrap();
    s.write_all(
        format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nHost: other.localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let head = String::from_utf8_lossy(&out);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// A retried create under the same `Idempotency-Key` answers the grant the first one made (one
/// preview, one link), and another key makes another; the key is per sandbox and kind.
#[tokio::test]
async fn previews_and_shares_honour_idempotency_keys() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    let keyed = |path: String, key: &'static str, body: Value| {
        let req = api
            .http
            .post(api.url(&path))
            .header("Authorization", "Bearer msk_test_key")
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 201);
            resp.json::<Value>().await.unwrap()
        }
    };
    let p1 = keyed(
        format!("/sandboxes/{id}/previews"),
        "k-preview",
        json!({"port": 3000}),
    )
    .await;
    let p2 = keyed(
        format!("/sandboxes/{id}/previews"),
        "k-preview",
        json!({"port": 3000}),
    )
    .await;
    assert_eq!(p1["data"]["id"], p2["data"]["id"]);
    let (_, listed) = api.get(&format!("/sandboxes/{id}/previews")).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");

    let s1 = keyed(
        format!("/sandboxes/{id}/shares"),
        "k-share",
        json!({"expires_in": 600}),
    )
    .await;
    let s2 = keyed(
        format!("/sandboxes/{id}/shares"),
        "k-share",
        json!({"expires_in": 600}),
    )
    .await;
    assert_eq!(s1["share_id"], s2["share_id"]);
    assert_eq!(
        s1["share_url"], s2["share_url"],
        "the same link, shown again"
    );
    let s3 = keyed(
        format!("/sandboxes/{id}/shares"),
        "k-other",
        json!({"expires_in": 600}),
    )
    .await;
    assert_ne!(s1["share_id"], s3["share_id"]);
    let (_, shares) = api.get(&format!("/sandboxes/{id}/shares")).await;
    assert_eq!(shares["data"].as_array().unwrap().len(), 2, "{shares}");

    let pid = p1["data"]["id"].as_str().unwrap();
    let path = format!("/sandboxes/{id}/previews/{pid}/share");
    let ps1 = keyed(path.clone(), "k-pshare", json!({"ttl_seconds": 600})).await;
    let ps2 = keyed(path, "k-pshare", json!({"ttl_seconds": 600})).await;
    assert_eq!(ps1["share_id"], ps2["share_id"]);
    // The same key on another kind of grant is another grant.
    let p3 = keyed(
        format!("/sandboxes/{id}/previews"),
        "k-share",
        json!({"port": 3001}),
    )
    .await;
    assert_ne!(p3["data"]["id"], p1["data"]["id"]);
    // The same key with another request is refused, not answered with the first grant.
    for (path, key, body) in [
        (
            format!("/sandboxes/{id}/previews"),
            "k-preview",
            json!({"port": 3002}),
        ),
        (
            format!("/sandboxes/{id}/shares"),
            "k-share",
            json!({"expires_in": 60}),
        ),
    ] {
        let resp = api
            .http
            .post(api.url(&path))
            .header("Authorization", "Bearer msk_test_key")
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 409, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "idempotency_key_reused", "{v}");
    }
}
