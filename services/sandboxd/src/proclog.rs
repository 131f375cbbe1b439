//! A background process's output, on sandboxd's side: cut into lines of bounded length, queued
//! with backpressure, written in batches, and rotated once. Whatever a sandbox prints (a fork
//! bomb's error flood, a line with no end), sandboxd spends bounded memory, disk and CPU on it:
//! when sandboxd falls behind, the process's own writes wait.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc};

/// Longest line kept; a longer one is cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;
/// Size at which a log moves to `<log>.1` (replacing the one before), so a process holds at
/// most twice this on disk.
pub const ROTATE_BYTES: u64 = 8 << 20;
/// Lines queued between a process and its log file (at most `QUEUE * MAX_LINE` bytes, before
/// lossy decoding).
pub const QUEUE: usize = 256;
/// Most bytes written in one batch.
const BATCH_BYTES: usize = 256 * 1024;

/// One line of a process's output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Line {
    pub stream: &'static str,
    pub line: String,
}

/// The log file of one process.
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
}

impl LogFile {
    fn create(path: PathBuf) -> std::io::Result<LogFile> {
        let file = std::fs::File::create(&path)?;
        Ok(LogFile { path, file, len: 0 })
    }

    fn append(&mut self, text: &[u8]) -> std::io::Result<()> {
        if self.len > 0 && self.len + text.len() as u64 > ROTATE_BYTES {
            std::fs::rename(&self.path, rotated(&self.path))?;
            self.file = std::fs::File::create(&self.path)?;
            self.len = 0;
        }
        self.file.write_all(text)?;
        self.len += text.len() as u64;
        Ok(())
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Writes what arrives on `lines` to `path`, a batch at a time, until every sender is gone.
pub fn spawn_writer(path: PathBuf, mut lines: mpsc::Receiver<Line>) {
    tokio::spawn(async move {
        // Once the file fails, lines are still taken (and dropped), so the process never waits
        // on a log that cannot be written.
        let mut log = tokio::task::spawn_blocking(move || LogFile::create(path))
            .await
            .ok()
            .and_then(Result::ok);
        while let Some(first) = lines.recv().await {
            let mut batch = Vec::with_capacity(first.line.len() + 1);
            let mut next = Some(first);
            while let Some(l) = next {
                batch.extend_from_slice(l.line.as_bytes());
                batch.push(b'\n');
                next = if batch.len() < BATCH_BYTES {
                    lines.try_recv().ok()
                } else {
                    None
                };
            }
            let Some(mut file) = log.take() else { continue };
            log = match tokio::task::spawn_blocking(move || {
                let written = file.append(&batch);
                (file, written)
            })
            .await
            {
                Ok((file, Ok(()))) => Some(file),
                Ok((_, Err(e))) => {
                    tracing::warn!(error = %e, "writing a process log; its output is dropped");
                    None
                }
                Err(_) => None,
            };
        }
    });
}

/// The last `tail` lines of the log at `path` and its rotated predecessor (all when 0).
pub fn tail(path: &Path, tail: usize) -> String {
    let mut text = std::fs::read_to_string(rotated(path)).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(path).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    let from = if tail == 0 {
        0
    } else {
        lines.len().saturating_sub(tail)
    };
    let mut out = lines[from..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// Reads `reader` to its end, cutting lines at `MAX_LINE`, into the log (waiting when it is
/// full) and to live subscribers (who miss lines when they lag).
pub fn pump(
    mut reader: Reader,
    stream: &'static str,
    log: mpsc::Sender<Line>,
    live: broadcast::Sender<Line>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 16 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(end) = next_break(&pending[start..]) {
                let (line, skip) = end;
                emit(stream, &pending[start..start + line], &log, &live).await;
                start += line + skip;
            }
            pending.drain(..start);
        }
        if !pending.is_empty() {
            emit(stream, &pending, &log, &live).await;
        }
    })
}

/// Where the next line of `bytes` ends: its length and how many bytes follow it before the next
/// (1 for the newline, 0 for a cut); `None` while a short line is still incomplete.
fn next_break(bytes: &[u8]) -> Option<(usize, usize)> {
    match bytes.iter().take(MAX_LINE + 1).position(|b| *b == b'\n') {
        Some(i) => Some((i, 1)),
        None if bytes.len() >= MAX_LINE => Some((MAX_LINE, 0)),
        None => None,
    }
}

async fn emit(
    stream: &'static str,
    bytes: &[u8],
    log: &mpsc::Sender<Line>,
    live: &broadcast::Sender<Line>,
) {
    let line = String::from_utf8_lossy(bytes).into_owned();
    let l = Line { stream, line };
    let _ = live.send(l.clone());
    let _ = log.send(l).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lines_break_at_newlines_and_are_cut_at_the_limit() {
        assert_eq!(next_break(b"ab\ncd"), Some((2, 1)));
        assert_eq!(next_break(b"abc"), None);
        let long = vec![b'x'; MAX_LINE + 10];
        assert_eq!(next_break(&long), Some((MAX_LINE, 0)));
        let mut exact = vec![b'x'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(next_break(&exact), Some((MAX_LINE, 1)));
    }

    #[test]
    fn a_log_rotates_once_and_the_tail_spans_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.log");
        let mut log = LogFile::create(path.clone()).unwrap();
        let line = vec![b'a'; 1023];
        let mut n = 0u64;
        while n < 3 * ROTATE_BYTES {
            let mut text = line.clone();
            text.push(b'\n');
            log.append(&text).unwrap();
            n += 1024;
        }
        let on_disk = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(on_disk <= 2 * ROTATE_BYTES, "{on_disk}");
        log.append(b"last\n").unwrap();
        assert_eq!(tail(&path, 1), "last\n");
        assert_eq!(tail(&path, 3).lines().count(), 3);
    }

    #[tokio::test]
    async fn a_line_without_end_is_cut_and_a_full_queue_holds_the_writer() {
        let (tx, mut rx) = mpsc::channel(2);
        let (live, _) = broadcast::channel(4);
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let pumped = pump(Box::new(r), "stdout", tx, live);
        let data = vec![b'z'; 3 * MAX_LINE + 5];
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            w.write_all(&data).await.unwrap();
        });
        let mut lens = Vec::new();
        while let Some(l) = rx.recv().await {
            lens.push(l.line.len());
        }
        pumped.await.unwrap();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, MAX_LINE, 5]);
    }
}
