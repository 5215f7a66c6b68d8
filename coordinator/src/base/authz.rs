//! Where the coordinator enforces the authorization table (`gantry_protocol::authz`).
//!
//! Owns [`Decisions`]: every path that serves a request asks [`Decisions::check`] with
//! the request's row and the caller's principal, and nothing else decides who may do
//! what. Each decision is counted (`gantry_authz_decisions_total` on `/metrics`, by row,
//! principal and outcome), so a path that stopped asking would show in the counts (the
//! authorization matrix test checks them), and refusals are logged with their reason.
//! Classifying an agent as the holder of the work a request names (the attempt handed
//! to it, the deployment it is a target of, ...) is done next to the data, by the
//! modules that own it; this module must not know the store.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

pub use gantry_protocol::authz::{Denied, Principal, Request};

/// Counters of every decision: allowed and denied, by row and principal.
#[derive(Debug)]
pub struct Decisions {
    /// `counts[row][principal * 2 + denied]`.
    counts: Vec<[AtomicU64; 12]>,
}

impl Default for Decisions {
    fn default() -> Self {
        Self {
            counts: Request::ALL.iter().map(|_| Default::default()).collect(),
        }
    }
}

impl Decisions {
    /// Asks the table whether `principal` may make `request`; counts the answer and logs
    /// a refusal with `detail` (why, beyond the table).
    pub fn check(
        &self,
        request: Request,
        principal: Principal,
        detail: impl FnOnce() -> String,
    ) -> Result<(), Denied> {
        let result = request.check(principal, detail);
        let slot = principal as usize * 2 + usize::from(result.is_err());
        if let Some(row) = self.counts.get(request.index()) {
            row[slot].fetch_add(1, Ordering::Relaxed);
        }
        if let Err(denied) = &result {
            tracing::info!(
                request = request.name(),
                principal = principal.as_str(),
                "refused: {denied}"
            );
        }
        result
    }

    /// `gantry_authz_decisions_total`, the rows and principals that were asked about.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP gantry_authz_decisions_total Authorization decisions by request, principal and outcome.\n# TYPE gantry_authz_decisions_total counter"
        );
        for (request, row) in Request::ALL.iter().zip(&self.counts) {
            for principal in Principal::ALL {
                for (denied, outcome) in [(false, "allowed"), (true, "denied")] {
                    let n =
                        row[principal as usize * 2 + usize::from(denied)].load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "gantry_authz_decisions_total{{request=\"{}\",principal=\"{}\",decision=\"{outcome}\"}} {n}",
                            request.name(),
                            principal.as_str()
                        );
                    }
                }
            }
        }
    }
}

/// A refusal as an admin error (for the admin request path and the dashboard).
pub fn forbidden(denied: &Denied) -> gantry_protocol::AdminError {
    gantry_protocol::AdminError {
        kind: gantry_protocol::AdminErrorKind::Forbidden,
        message: denied.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_row_principal_and_outcome() {
        let d = Decisions::default();
        assert!(d
            .check(Request::StreamLogs, Principal::Agent, String::new)
            .is_ok());
        let denied = d
            .check(Request::StreamLogs, Principal::OtherAgent, || {
                "not handed to it".into()
            })
            .expect_err("refused");
        assert!(
            denied.to_string().starts_with("not handed to it: "),
            "{denied}"
        );
        let mut out = String::new();
        d.render(&mut out);
        assert!(out.contains("gantry_authz_decisions_total{request=\"stream.logs\",principal=\"agent\",decision=\"allowed\"} 1"), "{out}");
        assert!(out.contains("gantry_authz_decisions_total{request=\"stream.logs\",principal=\"other-agent\",decision=\"denied\"} 1"), "{out}");
        assert_eq!(
            out.matches("gantry_authz_decisions_total{").count(),
            2,
            "{out}"
        );
    }
}
