//! Reconnect delays: exponential backoff with full jitter.
//!
//! Pure: the attempt number and the random draw come in, a delay comes out, so the
//! schedule is tested without sleeping. Full jitter (a uniform draw between zero and the
//! exponential ceiling) spreads a fleet that lost its coordinator at the same instant, so
//! a restarted coordinator is not hit by every agent in the same millisecond.

use std::time::Duration;

/// First ceiling: a coordinator restart usually takes longer than this, but a dropped
/// packet burst does not, so the first retry is quick.
pub const BASE_DELAY: Duration = Duration::from_millis(200);

/// A session that lasted longer than this was healthy: the next failure starts the
/// schedule from [`BASE_DELAY`] again instead of continuing to back off.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Delay before reconnect attempt `attempt` (0 for the first retry): a uniform share
/// `random` (in `0.0..1.0`) of `min(cap, base * 2^attempt)`.
pub fn next_delay(attempt: u32, base: Duration, cap: Duration, random: f64) -> Duration {
    // 2^attempt overflows quickly; once it passes the cap the cap is all that matters.
    let ceiling = 2u32
        .checked_pow(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(cap, |d| d.min(cap));
    // A random source outside 0..1 (or NaN) must never stretch the delay past the cap.
    let share = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.0
    };
    ceiling.mul_f64(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn ceiling_doubles_from_the_base_until_the_cap() {
        // random just under 1 shows the ceiling of each attempt.
        let ceilings: Vec<u128> = (0..10)
            .map(|a| next_delay(a, BASE_DELAY, CAP, 1.0).as_millis())
            .collect();
        assert_eq!(
            ceilings,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
    }

    #[test]
    fn jitter_is_a_uniform_share_of_the_ceiling() {
        assert_eq!(next_delay(0, BASE_DELAY, CAP, 0.0), Duration::ZERO);
        assert_eq!(
            next_delay(2, BASE_DELAY, CAP, 0.5),
            Duration::from_millis(400)
        );
        assert_eq!(
            next_delay(20, BASE_DELAY, CAP, 0.25),
            Duration::from_millis(7500)
        );
    }

    #[test]
    fn huge_attempts_and_bad_randoms_stay_within_the_cap() {
        assert_eq!(next_delay(u32::MAX, BASE_DELAY, CAP, 1.0), CAP);
        assert_eq!(
            next_delay(3, BASE_DELAY, CAP, 7.0),
            Duration::from_millis(1600)
        );
        assert_eq!(next_delay(3, BASE_DELAY, CAP, -1.0), Duration::ZERO);
        assert_eq!(next_delay(3, BASE_DELAY, CAP, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn a_cap_below_the_base_wins() {
        let cap = Duration::from_millis(50);
        assert_eq!(next_delay(0, BASE_DELAY, cap, 1.0), cap);
    }
}
