//! The browser API: tickets (single use, one run, short-lived), the run's events as SSE
//! (resumable), the previews with fresh tokens, CORS; and a real headless Chromium following a
//! run from a page on another origin.

use std::time::Duration;

use serde_json::Value;
use slipway_proto::v1::*;
use slipway_test_support::browser::{Browser, serve_page};

use crate::{System, is_files_changed};

async fn ticket(sys: &System, run: &str) -> IssueTicketReply {
    sys.call("ticket", &IssueTicketRequest { run_id: run.into() })
        .await
        .unwrap()
}

/// Reads an SSE response until `want` events arrived (bounded); answers them as (id, kind,
/// data).
async fn read_events(mut resp: reqwest::Response, want: usize) -> Vec<(u64, String, String)> {
    let mut text = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < want {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("events in time")
            .unwrap()
            .expect("the stream stayed open");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut id = None;
            let mut kind = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if let Some(id) = id {
                out.push((id, kind, data));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_ticket_opens_one_run_s_events_once_and_is_refused_reused_expired_or_elsewhere() {
    let origin = "http://app.example.test";
    let sys = System::start(
        1,
        &[
            ("SLIPWAY__PREVIEW__TICKET_TTL_SEC", "2"),
            ("SLIPWAY__PREVIEW__ALLOWED_ORIGINS", origin),
        ],
    )
    .await;
    // Another run's events come first in the stream: the ticket's stream shows none of them.
    let other = sys.app("run_sse_other", "main").await;
    sys.open("run_sse_other", "main", &other).await;
    let sb = sys.app("run_sse", "main").await;
    sys.open("run_sse", "main", &sb).await;
    let http = slipway_test_support::http();

    // A preflight from the allowed origin.
    let pre = http
        .request(
            reqwest::Method::OPTIONS,
            format!(
                "{}/v1/runs/run_sse/events",
                ticket(&sys, "run_sse")
                    .await
                    .events_url
                    .split("/v1/")
                    .next()
                    .unwrap()
            ),
        )
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(
        pre.headers()["access-control-allow-origin"]
            .to_str()
            .unwrap(),
        origin
    );
    assert!(
        pre.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("GET")
    );
    assert!(
        pre.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase()
            .contains("last-event-id")
    );

    // The run's events, from an allowed origin.
    let t = ticket(&sys, "run_sse").await;
    assert!(t.events_url.contains(&t.ticket));
    let resp = http
        .get(&t.events_url)
        .header("Origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"]
            .to_str()
            .unwrap(),
        origin
    );
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let first = read_events(resp, 1).await;
    assert_eq!(first[0].1, "preview_ready");
    assert!(
        first[0].2.contains("\"runId\":\"run_sse\""),
        "{}",
        first[0].2
    );
    let ready_id = first[0].0;

    // Used once: refused the second time.
    let again = http.get(&t.events_url).send().await.unwrap();
    assert_eq!(again.status(), 401);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ticket_used");

    // A ticket for this run on another run's URL: refused, and not spent.
    let t2 = ticket(&sys, "run_sse").await;
    let elsewhere = t2.events_url.replace("/runs/run_sse/", "/runs/run_other/");
    assert_eq!(http.get(&elsewhere).send().await.unwrap().status(), 403);
    // From an origin not allowed: refused before the ticket is looked at.
    let evil = http
        .get(&t2.previews_url)
        .header("Origin", "http://evil.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 403);
    // Still good for its own run: the previews with fresh tokens that work.
    let previews: Value = http
        .get(&t2.previews_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = previews["previews"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(sys.status(&url).await.0, 200);

    // Resumed after the last event seen: only what came after.
    sys.share("run_sse", "sse:share", 600).await;
    let t3 = ticket(&sys, "run_sse").await;
    let resp = http
        .get(&t3.events_url)
        .header("Last-Event-ID", ready_id.to_string())
        .send()
        .await
        .unwrap();
    let next = read_events(resp, 1).await;
    assert!(next[0].0 > ready_id);
    assert_eq!(next[0].1, "share_created");

    // Expired: refused.
    let t4 = ticket(&sys, "run_sse").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late = http.get(&t4.events_url).send().await.unwrap();
    assert_eq!(late.status(), 401);
    let body: Value = late.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ticket_expired");
    // No ticket at all, or a made-up one.
    let bare = t4.events_url.split('?').next().unwrap().to_string();
    assert_eq!(http.get(&bare).send().await.unwrap().status(), 401);
    let forged = format!("{bare}?ticket=tk_forged");
    assert_eq!(http.get(&forged).send().await.unwrap().status(), 401);

    // What the replica counted, as its /metrics shows it.
    let metrics = sys.replicas[0].metrics().await.unwrap();
    for line in [
        "slipway_preview_tickets_total{outcome=\"redeemed\"} 3",
        "slipway_preview_tickets_total{outcome=\"reused\"} 1",
        "slipway_preview_tickets_total{outcome=\"other_run\"} 1",
        "slipway_preview_tickets_total{outcome=\"expired\"} 1",
        "slipway_preview_tickets_total{outcome=\"unknown\"} 2",
        "slipway_preview_tokens_issued_total 3",
        "slipway_preview_open 2",
        "slipway_preview_shares_live 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }

    // The tickets bucket gone: 503 with a message that names no internals.
    let t5 = ticket(&sys, "run_sse").await;
    let js = async_nats::jetstream::new(sys.executor.nats_client.clone());
    js.delete_key_value("slipway_tickets").await.unwrap();
    let r = http.get(&t5.previews_url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(!body.to_string().contains("slipway_tickets"), "{body}");
}

/// A platform's page on its own origin follows a run with a ticket and shows its preview in an
/// iframe, which it reloads when the run's files change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_follows_the_run_and_reloads_its_preview_iframe() {
    let page = serve_page(
        "<!doctype html><title>platform</title>\
         <iframe id=\"f\" width=\"800\" height=\"600\"></iframe>\
         <script>\
           window.log=[]; window.reports=[];\
           addEventListener('message', e => reports.push(e.data));\
           const es = new EventSource(decodeURIComponent(location.hash.slice(1)));\
           es.addEventListener('preview_ready', e => {\
             log.push('preview_ready');\
             document.getElementById('f').src = JSON.parse(e.data).previewReady.url;\
           });\
           es.addEventListener('files_changed', e => {\
             log.push('files_changed');\
             const f = document.getElementById('f'); f.src = f.src;\
           });\
           es.onerror = () => log.push('error');\
         </script>"
            .to_string(),
    )
    .await
    .unwrap();
    let origin = page.url.trim_end_matches('/').to_string();
    let sys = System::start(1, &[("SLIPWAY__PREVIEW__ALLOWED_ORIGINS", origin.as_str())]).await;
    let sb = sys.app("run_page", "main").await;
    sys.open("run_page", "main", &sb).await;
    let t = ticket(&sys, "run_page").await;

    let browser = Browser::launch().await.unwrap();
    let url = format!("{}#{}", page.url, urlencode(&t.events_url));
    let tab = browser.open(&url).await.unwrap();
    let first = tab
        .wait_for(
            "reports.find(r => r.title === 'VERSION_ONE')",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(first["script"], "ran", "{first}");
    let before = sys.count("run_page", is_files_changed).await;

    sys.write(
        &sb,
        "page:v2",
        "public/index.html",
        &crate::PAGE.replace("VERSION_ONE", "VERSION_TWO"),
    )
    .await;
    sys.wait_for("run_page", is_files_changed, before + 1).await;
    tab.wait_for("log.includes('files_changed')", Duration::from_secs(30))
        .await
        .unwrap();
    tab.wait_for(
        "reports.find(r => r.title === 'VERSION_TWO')",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let log = tab.eval("log").await.unwrap();
    assert!(
        !log.as_array().unwrap().iter().any(|l| l == "error"),
        "{log}"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One ticket presented to two replicas at the same moment opens one request; odd run ids and
/// an out-of-range `Last-Event-ID` are refused before a ticket is spent; an open event stream
/// ends when its replica shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_is_spent_once_across_replicas_and_streams_end_at_shutdown() {
    let mut sys = System::start(2, &[]).await;
    let sb = sys.app("run_two", "main").await;
    sys.open("run_two", "main", &sb).await;
    let http = slipway_test_support::http();

    // Each replica's browser API, from the URLs of tickets it issued (requests are spread over
    // the replicas by the queue group).
    let mut bases = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let t = ticket(&sys, "run_two").await;
        bases.insert(t.events_url.split("/v1/").next().unwrap().to_string());
        if bases.len() == 2 {
            break;
        }
    }
    assert_eq!(bases.len(), 2, "both replicas serve tickets");
    let bases: Vec<String> = bases.into_iter().collect();

    for _ in 0..5 {
        let t = ticket(&sys, "run_two").await;
        let path = t.previews_url.split("/v1/").nth(1).unwrap().to_string();
        let (a, b) = tokio::join!(
            http.get(format!("{}/v1/{path}", bases[0])).send(),
            http.get(format!("{}/v1/{path}", bases[1])).send(),
        );
        let mut statuses = [a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
        statuses.sort();
        assert_eq!(statuses, [200, 401], "one of them, once");
    }

    // Refused before the ticket is looked at: it still works afterwards.
    let t = ticket(&sys, "run_two").await;
    let base = t.events_url.split("/v1/").next().unwrap().to_string();
    for run in ["*", "%3E", "a.b", "a%23b", "a%2Fb"] {
        let url = format!("{base}/v1/runs/{run}/previews?ticket={}", t.ticket);
        let r = http.get(&url).send().await.unwrap();
        assert!(
            [400, 404].contains(&r.status().as_u16()),
            "{run}: {}",
            r.status()
        );
    }
    let r = http
        .get(&t.events_url)
        .header("Last-Event-ID", u64::MAX.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(&t.events_url)
        .header("Last-Event-ID", "seven")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A stream open on a replica that shuts down ends (so the shutdown is not held up).
    let resp = http.get(&t.events_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let first = read_first_chunk(&mut resp).await;
    assert!(first.contains("preview_ready"), "{first}");
    for replica in &mut sys.replicas {
        replica.stop().await.unwrap();
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ended with its replica");
}

async fn read_first_chunk(resp: &mut reqwest::Response) -> String {
    let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&chunk).into_owned()
}
