//! Server-sent events from the platform (the file watch): a line parser over the response body,
//! no timeout (a watch is open for as long as it is wanted), `Last-Event-ID` sent on reconnect.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::Method;

use super::{MiosaClient, MiosaError, decode};

/// One event: `event:` (default `message`), `id:`, and the joined `data:` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Splits a byte stream into events (comments and keep-alives skipped).
pub fn events<S>(body: S) -> impl Stream<Item = Result<SseEvent, MiosaError>>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
{
    futures::stream::unfold(
        (body, Vec::<u8>::new(), SseEvent::default()),
        |(mut body, mut buf, mut ev)| async move {
            loop {
                if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        if ev.data.is_empty() && ev.event.is_empty() {
                            continue;
                        }
                        let mut done = std::mem::take(&mut ev);
                        if done.event.is_empty() {
                            done.event = "message".into();
                        }
                        return Some((Ok(done), (body, buf, ev)));
                    }
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => ev.event = value.to_string(),
                        "id" => ev.id = Some(value.to_string()),
                        "data" => {
                            if !ev.data.is_empty() {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(value);
                        }
                        _ => {}
                    }
                    continue;
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let err = MiosaError::Unreachable {
                            url: "event stream".into(),
                            message: e.to_string(),
                        };
                        return Some((Err(err), (body, buf, ev)));
                    }
                    None => return None,
                }
            }
        },
    )
}

impl MiosaClient {
    /// Opens the sandbox's file watch (`GET /sandboxes/{id}/files/watch`), resuming after
    /// `last_event_id` where the platform can. Answers once the stream is open.
    pub async fn watch(
        &self,
        sandbox_id: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<impl Stream<Item = Result<SseEvent, MiosaError>> + use<>, MiosaError> {
        let url = format!(
            "{}/sandboxes/{sandbox_id}/files/watch",
            self.sandboxes_host_base()
        );
        self.limiter.acquire(self.priority).await;
        let mut req = self
            .http
            .request(Method::GET, &url)
            .bearer_auth(self.config.api_key.expose())
            .header("Accept", "text/event-stream")
            .query(&[("path", path)]);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.map_err(|e| MiosaError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        if status >= 400 {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(decode::error_from(status, None, None, &body));
        }
        Ok(events(Box::pin(resp.bytes_stream())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn events_split_across_chunks_parse() {
        let chunks: Vec<Result<Bytes, reqwest::Error>> = vec![
            Ok(Bytes::from_static(b": keep-alive\n\nid: 1\nevent: cre")),
            Ok(Bytes::from_static(
                b"ated\ndata: {\"path\":\"/a\"}\r\n\r\ndata: x\ndata: y\n\n",
            )),
        ];
        let got: Vec<SseEvent> = events(futures::stream::iter(chunks))
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(
            got,
            vec![
                SseEvent {
                    event: "created".into(),
                    id: Some("1".into()),
                    data: "{\"path\":\"/a\"}".into()
                },
                SseEvent {
                    event: "message".into(),
                    id: None,
                    data: "x\ny".into()
                },
            ]
        );
    }
}
