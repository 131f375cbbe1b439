//! A real headless Chromium for tests, driven over the DevTools protocol: Debian's `chromium`
//! (installed by `scripts/tools`), a fresh profile per browser, the closed-network flags (no
//! background traffic: this machine's network is closed, and tests talk to loopback only), and
//! third-party cookies blocked by a managed policy, as many browsers now do by default.
//!
//! Pages of the browser see only what tests serve: `serve_page` gives a page its own origin
//! (`http://127.0.0.1:<port>`), cross-site to the edge's `*.localhost` previews.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// Where the policy that blocks third-party cookies lives (written by `scripts/tools`).
pub const COOKIE_POLICY: &str = "/etc/chromium/policies/managed/slipway-tests.json";

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next_id: AtomicU64,
}

/// One tab, attached with a flat session.
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Browser {
    /// Starts Chromium; refuses to run without the third-party cookie policy, since a test
    /// that passes with cookies allowed proves nothing about iframes.
    pub async fn launch() -> Result<Self> {
        let policy = std::fs::read_to_string(COOKIE_POLICY)
            .with_context(|| format!("{COOKIE_POLICY} (run scripts/tools)"))?;
        let policy: Value = serde_json::from_str(&policy)?;
        if policy["BlockThirdPartyCookies"] != json!(true) {
            bail!("{COOKIE_POLICY} does not block third-party cookies");
        }
        let bin = std::env::var_os("SLIPWAY_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let ws_url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                bail!("chromium did not open its DevTools endpoint")
            }
        };
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str()).await?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let replies = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Ok(text) = msg.into_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                // Events (no id) are not needed by the tests.
                let Some(id) = v["id"].as_u64() else { continue };
                let waiter = replies.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(w) = waiter {
                    let result = match v.get("error") {
                        Some(e) => Err(anyhow::anyhow!("DevTools: {e}")),
                        None => Ok(v["result"].clone()),
                    };
                    let _ = w.send(result);
                }
            }
        });
        Ok(Self {
            child,
            _profile: profile,
            out,
            pending,
            next_id: AtomicU64::new(1),
        })
    }

    /// One DevTools command (`session`: a tab's, or None for the browser).
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(id, tx);
        self.out
            .send(Message::text(msg.to_string()))
            .map_err(|_| anyhow::anyhow!("the DevTools connection closed"))?;
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .with_context(|| format!("{method}: no answer in 30 s"))?
            .context("the DevTools connection closed")?
    }

    /// Opens `url` in a new tab.
    pub async fn open(&self, url: &str) -> Result<Page<'_>> {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": url }))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_string();
        Ok(Page {
            browser: self,
            session,
        })
    }
}

impl Page<'_> {
    /// Evaluates `expression` in the page's top frame (promises awaited) and returns its value.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let r = self
            .browser
            .call(
                Some(&self.session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is truthy or `within` passes; returns its value. Errors
    /// count as "not yet" (the page may still be loading) until the deadline.
    pub async fn wait_for(&self, expression: &str, within: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.eval(expression).await {
                Ok(v) if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) => {
                    return Ok(v);
                }
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                bail!("`{expression}` still {last} after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `html` at every path of its own origin, `http://127.0.0.1:<port>/`, until dropped.
pub struct StaticPage {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

pub async fn serve_page(html: String) -> Result<StaticPage> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let html = Arc::new(html);
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    html.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(html.as_bytes()).await;
            });
        }
    });
    Ok(StaticPage { url, task })
}

impl Drop for StaticPage {
    fn drop(&mut self) {
        self.task.abort();
    }
}
