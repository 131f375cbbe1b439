//! A preview inside a cross-site iframe of a real headless Chromium with third-party cookies
//! blocked: its HTML, CSS, JavaScript and WebSocket work, and a write from inside the sandbox
//! reloads it with no action.

use std::time::Duration;

use serde_json::{Value, json};
use slipway_test_support::Sandboxd;
use slipway_test_support::browser::{Browser, serve_page};

use crate::api::{Api, BIN};
use crate::edge::{start_app, token};

#[tokio::test]
async fn a_preview_works_in_a_cross_site_iframe_without_cookies_and_refreshes_itself() {
    let sd = Sandboxd::start(BIN, &[]).unwrap();
    let api = Api::new(&sd);
    let id = api.sandbox().await;
    start_app(&api, &id, 3000).await;
    let t = token(&api, &id, json!({"expires_in": 600})).await;
    let url = t["url"].as_str().unwrap();

    // The platform's page: another origin (127.0.0.1 vs *.preview.localhost), which can only
    // hear what the preview posts to it.
    let embedding = serve_page(format!(
        "<!doctype html><title>platform</title>\
         <script>window.reports=[];addEventListener('message',e=>reports.push(e.data));</script>\
         <iframe src=\"{url}\" width=\"800\" height=\"600\"></iframe>"
    ))
    .await
    .unwrap();
    let browser = Browser::launch().await.unwrap();
    let page = browser.open(&embedding.url).await.unwrap();
    let first = page
        .wait_for(
            "reports.length > 0 && reports[reports.length - 1]",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(first["title"], "VERSION_ONE", "{first}");
    assert_eq!(first["script"], "ran", "{first}");
    assert_eq!(
        first["color"], "rgb(1, 2, 3)",
        "the stylesheet did not apply: {first}"
    );
    assert_eq!(first["ws"], "echo:hello", "{first}");
    assert_eq!(first["cookie"], "", "{first}");

    // A write by a process inside the sandbox: the iframe reloads by itself.
    let (code, _, err) = api
        .exec(
            &id,
            "sed -i s/VERSION_ONE/VERSION_TWO/ /workspace/public/index.html",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let second = page
        .wait_for(
            "reports.find(r => r.title === 'VERSION_TWO')",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(second["ws"], "echo:hello", "{second}");

    // Control: all of that without a single cookie reaching the app.
    let seen: Value = sd
        .edge_http()
        .get(format!("{}seen", url.split('?').next().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(seen["requests"].as_u64().unwrap() >= 6, "{seen}");
    assert_eq!(seen["with_cookie"], 0, "{seen}");

    // And the cookie the app tried to keep did stick when the same page is opened first-party:
    // cookies work here, so their absence in the iframe is the third-party block at work.
    let top = browser.open(url).await.unwrap();
    let cookie = top
        .wait_for("document.cookie", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(cookie, "probe=1");
}
