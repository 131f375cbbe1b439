//! Live refresh: HTML served through the edge gets a script that listens to `LIVE_PATH` (SSE on
//! the same capability host, so no cookie or header is needed) and reloads the page when the
//! sandbox's files change, whoever changed them (the watch sees writes from inside too).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::host::Entry;

/// Reloads after changes settle (a write-many is many events), and reconnects by itself
/// (EventSource does) when sandboxd restarts.
const SCRIPT: &str = concat!(
    "<script data-slipway-live>(function(){var t;",
    "var es=new EventSource(\"",
    "/__slipway/live",
    "\");",
    "es.addEventListener(\"change\",function(){clearTimeout(t);",
    "t=setTimeout(function(){location.reload()},200)});})();</script>"
);

/// The page with the script before its last `</body>` (or at the end).
pub fn inject(html: &[u8]) -> Vec<u8> {
    let lower = html.to_ascii_lowercase();
    let at = lower
        .windows(7)
        .rposition(|w| w == b"</body>")
        .unwrap_or(html.len());
    let mut out = Vec::with_capacity(html.len() + SCRIPT.len());
    out.extend_from_slice(&html[..at]);
    out.extend_from_slice(SCRIPT.as_bytes());
    out.extend_from_slice(&html[at..]);
    out
}

/// One `change` event per file event in the sandbox (a lagging reader gets one for all it
/// missed); the stream ends when the sandbox is destroyed.
pub fn events(entry: &Entry) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let rx = entry.watch.subscribe();
    let stream = crate::files::async_stream(move |tx| async move {
        let Ok(mut rx) = rx else { return };
        let _ = tx.send(Event::default().event("ready").data("{}")).await;
        loop {
            let path = match rx.recv().await {
                Ok(ev) => ev.path,
                Err(RecvError::Lagged(_)) => "/workspace".to_string(),
                Err(RecvError::Closed) => break,
            };
            let data = serde_json::json!({ "path": path }).to_string();
            if tx
                .send(Event::default().event("change").data(data))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_goes_before_the_last_body_end() {
        let out = String::from_utf8(inject(b"<html><BODY>hi</BODY></html>")).unwrap_or_default();
        assert!(out.starts_with("<html><BODY>hi<script data-slipway-live>"));
        assert!(out.ends_with("</script></BODY></html>"));
        let out = String::from_utf8(inject(b"<p>no body")).unwrap_or_default();
        assert!(out.starts_with("<p>no body<script"));
    }
}
