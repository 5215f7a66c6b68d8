//! When to renew the agent's certificate over the live session.
//!
//! Pure: the current time comes in as a parameter. A certificate is due once two thirds
//! of its validity window have passed, which leaves a third of the lifetime (hours for
//! the usual lifetimes) to retry through coordinator restarts and network trouble before
//! the agent would be locked out.

use std::time::Duration;

use gantry_protocol::UnixMillis;

/// A refused or unanswered renewal is retried no sooner than this, so a coordinator that
/// keeps refusing is not sent a fresh CSR at every heartbeat.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(60);

/// True once two thirds of the certificate's real lifetime have passed. The lifetime is
/// counted from issue, not from `not_before`, which the CA backdates for clock skew (see
/// [`gantry_certs::renewal_due_at`]); otherwise short lifetimes would be due at once.
pub fn renewal_due(now: UnixMillis, not_before: UnixMillis, not_after: UnixMillis) -> bool {
    now >= gantry_certs::renewal_due_at(not_before, not_after)
}

/// The renewal bookkeeping of one agent: the validity of the certificate in use and when
/// a renewal was last asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalPlan {
    pub not_before: UnixMillis,
    pub not_after: UnixMillis,
    last_request: Option<UnixMillis>,
}

impl RenewalPlan {
    pub fn new(not_before: UnixMillis, not_after: UnixMillis) -> Self {
        Self {
            not_before,
            not_after,
            last_request: None,
        }
    }

    /// Whether to send a renewal request now: due, and no request in the last
    /// [`RETRY_INTERVAL`] (an unanswered request counts as refused after that long).
    pub fn should_request(&self, now: UnixMillis) -> bool {
        let retry_ms = u64::try_from(RETRY_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        renewal_due(now, self.not_before, self.not_after)
            && self
                .last_request
                .is_none_or(|last| now.millis_since(last) >= retry_ms)
    }

    /// Records that a request went out at `now`.
    pub fn requested(&mut self, now: UnixMillis) {
        self.last_request = Some(now);
    }

    /// Switches to a renewed certificate's validity; the next request waits for it to be due.
    pub fn renewed(&mut self, not_before: UnixMillis, not_after: UnixMillis) {
        self.not_before = not_before;
        self.not_after = not_after;
        self.last_request = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    /// Validity of a certificate issued at `issued` for `lifetime`, as our CA writes it.
    fn issued_for(issued: u64, lifetime: u64) -> (UnixMillis, UnixMillis) {
        let skew = gantry_certs::ca::CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
        (UnixMillis(issued - skew), UnixMillis(issued + lifetime))
    }

    #[test]
    fn due_at_two_thirds_of_the_window() {
        let (nb, na) = issued_for(1_000 * HOUR, 3 * HOUR);
        assert!(!renewal_due(UnixMillis(1_000 * HOUR), nb, na));
        assert!(!renewal_due(UnixMillis(1_002 * HOUR - 1), nb, na));
        assert!(renewal_due(UnixMillis(1_002 * HOUR), nb, na));
        assert!(
            renewal_due(UnixMillis(1_010 * HOUR), nb, na),
            "expired certificates are due too"
        );
    }

    #[test]
    fn the_clock_skew_backdating_does_not_count_as_lifetime() {
        let skew = gantry_certs::ca::CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
        let issued = 10 * HOUR;
        // A 6 s certificate from our CA: not_before is backdated by the skew allowance.
        let (nb, na) = (UnixMillis(issued - skew), UnixMillis(issued + 6_000));
        assert!(!renewal_due(UnixMillis(issued + 3_999), nb, na));
        assert!(renewal_due(UnixMillis(issued + 4_000), nb, na));
        assert!(
            renewal_due(UnixMillis(100), UnixMillis(100), UnixMillis(50)),
            "a nonsense window is due at once"
        );
    }

    #[test]
    fn requests_are_retried_at_most_once_a_minute() {
        let (nb, na) = issued_for(HOUR, 3 * HOUR);
        let mut plan = RenewalPlan::new(nb, na);
        assert!(!plan.should_request(UnixMillis(2 * HOUR)));
        let due = UnixMillis(3 * HOUR);
        assert!(plan.should_request(due));
        plan.requested(due);
        assert!(!plan.should_request(UnixMillis(due.0 + 59_999)));
        assert!(plan.should_request(UnixMillis(due.0 + 60_000)));
        let (nb, na) = issued_for(3 * HOUR, 3 * HOUR);
        plan.renewed(nb, na);
        assert!(!plan.should_request(UnixMillis(3 * HOUR + 60_000)));
        assert!(plan.should_request(UnixMillis(5 * HOUR)));
    }

    #[test]
    fn a_renewed_certificate_is_requested_again_only_when_it_is_due() {
        let mut plan = RenewalPlan::new(UnixMillis(0), UnixMillis(60_000));
        let now = UnixMillis(50_000);
        plan.requested(now);
        plan.renewed(UnixMillis(50_000), UnixMillis(110_000));
        assert!(!plan.should_request(UnixMillis(now.0 + 1_000)));
        assert!(plan.should_request(UnixMillis(90_000)));
    }
}
