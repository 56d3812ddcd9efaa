//! Bandwidth limit: a token bucket counted in bytes.
//!
//! The bucket holds at most 1/20 s worth of bytes, so over any window of `w` seconds at most
//! `rate * w + rate / 20` bytes are granted (2.5% over a 2 s window). A request larger than the
//! bucket is granted after waiting off its debt, so large reads work at any rate. Waiters are
//! served in order (tokio's mutex is fair) and sleep while holding the lock, so a later small
//! request cannot overtake an earlier large one.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Fraction of a second's worth of bytes that may pass at once.
const BURST_SECONDS: f64 = 0.05;

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter granting `bytes_per_second` (> 0; 0 is treated as 1).
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.max(1) as f64;
        let burst = rate * BURST_SECONDS;
        RateLimiter {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.rate as u64
    }

    /// Wait until `n` bytes may pass. Cancel-safe: dropping the future gives up its turn.
    pub async fn acquire(&self, n: u64) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.last).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.rate).min(self.burst);
        state.last = now;
        state.tokens -= n as f64;
        if state.tokens < 0.0 {
            // Pay the debt before granting; refill resumes from `last` afterwards.
            let wait = Duration::from_secs_f64(-state.tokens / self.rate);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Grant times of many concurrent 64 KiB requests at 1 MiB/s, with time paused so the
    /// test is exact and instant.
    #[tokio::test(start_paused = true)]
    async fn stays_within_five_percent_over_any_two_second_window() {
        let rate = 1024 * 1024u64;
        let limiter = Arc::new(RateLimiter::new(rate));
        let start = Instant::now();
        let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (limiter, grants) = (limiter.clone(), grants.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    limiter.acquire(64 * 1024).await;
                    grants
                        .lock()
                        .unwrap()
                        .push((Instant::now() - start).as_secs_f64());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let grants = grants.lock().unwrap().clone();
        let total = 160 * 64 * 1024;
        let last = grants.iter().cloned().fold(0.0, f64::max);
        // 10 MiB at 1 MiB/s: about 10 s, minus the initial burst.
        assert!((9.9..=10.1).contains(&last), "took {last}");
        for &t0 in &grants {
            let in_window =
                grants.iter().filter(|&&t| t >= t0 && t < t0 + 2.0).count() as u64 * 64 * 1024;
            assert!(
                in_window as f64 <= 2.0 * rate as f64 * 1.05,
                "window at {t0}: {in_window}"
            );
        }
        assert_eq!(grants.len() as u64 * 64 * 1024, total);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_larger_than_the_bucket_wait_their_debt() {
        let limiter = RateLimiter::new(1000);
        let start = Instant::now();
        limiter.acquire(4000).await; // 50 bytes of burst, then 3.95 s of debt
        let t = (Instant::now() - start).as_secs_f64();
        assert!((3.9..=4.0).contains(&t), "{t}");
        limiter.acquire(1000).await;
        let t = (Instant::now() - start).as_secs_f64();
        assert!((4.9..=5.0).contains(&t), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_does_not_accumulate_beyond_the_burst() {
        let limiter = RateLimiter::new(1000);
        tokio::time::sleep(Duration::from_secs(100)).await;
        let start = Instant::now();
        limiter.acquire(1050).await;
        let t = (Instant::now() - start).as_secs_f64();
        assert!((0.99..=1.01).contains(&t), "{t}");
    }
}
