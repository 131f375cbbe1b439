//! A client-side rate limit per API key: MIOSA keys have a requests-per-minute limit, and going
//! over it costs 429s and retries. A token bucket refilled at `rpm / 60` per second, holding at
//! most `burst`; calls a person waits for (interactive) go before background work (usage
//! sampling): a background call waits while any interactive call is waiting.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Interactive,
    Background,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
    interactive_waiting: AtomicUsize,
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RateLimiter {
    /// `rpm` requests per minute, at most `burst` at once (both at least 1).
    pub fn new(rpm: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: f64::from(rpm.max(1)) / 60.0,
            burst,
            bucket: Mutex::new((burst, Instant::now())),
            interactive_waiting: AtomicUsize::new(0),
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self, priority: Priority) {
        let _waiting = (priority == Priority::Interactive).then(|| {
            self.interactive_waiting.fetch_add(1, Ordering::SeqCst);
            Waiting(&self.interactive_waiting)
        });
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                b.0 =
                    (b.0 + now.duration_since(b.1).as_secs_f64() * self.per_second).min(self.burst);
                b.1 = now;
                let yield_to_interactive = priority == Priority::Background
                    && self.interactive_waiting.load(Ordering::SeqCst) > 0;
                if b.0 >= 1.0 && !yield_to_interactive {
                    b.0 -= 1.0;
                    return;
                }
                let refill = Duration::from_secs_f64(((1.0 - b.0).max(0.0)) / self.per_second);
                if yield_to_interactive {
                    refill.max(Duration::from_millis(5))
                } else {
                    refill
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bucket_refills_at_its_rate() {
        // 10 a second, two at once: four calls take at least 0.2 s (a lower bound only).
        let l = RateLimiter::new(600, 2);
        let start = Instant::now();
        for _ in 0..4 {
            l.acquire(Priority::Interactive).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(190), "{took:?}");
    }
}
