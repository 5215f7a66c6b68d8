//! A byte-rate limit shared by every stream of a process's transfers, so artifact
//! traffic can be kept from filling a host's link (`gantry-agent run --max-transfer-rate`).
//!
//! A token bucket holding at most one second of budget: a caller asks for `n` bytes and
//! waits until the bucket has them. Time comes from tokio's clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (at least 1 KiB/s).
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1024);
        Self {
            bytes_per_sec: rate,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Waits until `bytes` may be sent or received.
    pub async fn take(&self, bytes: usize) {
        let wait = {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            let rate = self.bytes_per_sec as f64;
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
            *last = now;
            *tokens -= bytes as f64;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_limit_spreads_bytes_over_time() {
        let limit = RateLimit::new(1_000_000);
        let start = Instant::now();
        // Three seconds' worth, taken in 100 KB pieces.
        for _ in 0..30 {
            limit.take(100_000).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took <= Duration::from_millis(3100),
            "{took:?}"
        );
    }
}
