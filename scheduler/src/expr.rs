//! Job conditions (`if:`) as the scheduler evaluates them: only the status functions are
//! left. The pipeline crate folds every static comparison (`github.ref == 'main'` style)
//! into `Const` before a run reaches the scheduler, so evaluation here needs nothing but
//! three facts about the job's ancestors and the run.

use serde::{Deserialize, Serialize};

/// A job's condition, reduced to status functions and boolean logic.
///
/// The facts it is evaluated against, for a job whose ancestors (transitive needs) are
/// all terminal:
/// - `all_ancestors_succeeded`: every ancestor is `Succeeded`, or `Failed` with
///   `continue_on_error`. A `Skipped` or `Cancelled` ancestor makes this false, so a
///   default `success()` job below a skipped job is skipped too (as in GitHub Actions).
/// - `any_ancestor_failed`: some ancestor is `Failed` without `continue_on_error`.
///   Skipped and cancelled ancestors are not failures.
/// - `run_cancelled`: the run received `CancelRun`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StatusExpr {
    /// A comparison the pipeline crate already folded.
    Const(bool),
    /// `success()`: all ancestors succeeded and the run is not cancelled. The default
    /// condition of a job without `if:`.
    #[default]
    Success,
    /// `failure()`: some ancestor failed.
    Failure,
    /// `always()`: true, even in a cancelled run.
    Always,
    /// `cancelled()`: the run was cancelled.
    Cancelled,
    Not(Box<StatusExpr>),
    And(Vec<StatusExpr>),
    Or(Vec<StatusExpr>),
}

impl StatusExpr {
    /// Evaluates the condition. An empty `And` is true and an empty `Or` is false.
    pub fn eval(
        &self,
        all_ancestors_succeeded: bool,
        any_ancestor_failed: bool,
        run_cancelled: bool,
    ) -> bool {
        let eval = |e: &Self| e.eval(all_ancestors_succeeded, any_ancestor_failed, run_cancelled);
        match self {
            Self::Const(value) => *value,
            Self::Success => all_ancestors_succeeded && !run_cancelled,
            Self::Failure => any_ancestor_failed,
            Self::Always => true,
            Self::Cancelled => run_cancelled,
            Self::Not(inner) => !eval(inner),
            Self::And(all) => all.iter().all(eval),
            Self::Or(any) => any.iter().any(eval),
        }
    }

    /// Whether `always()` or `cancelled()` appears anywhere in the expression. A pending
    /// job whose condition mentions either survives `CancelRun` and is evaluated (with
    /// `run_cancelled = true`) once its ancestors finish; every other pending job is
    /// cancelled at once.
    pub fn mentions_cancellation(&self) -> bool {
        match self {
            Self::Always | Self::Cancelled => true,
            Self::Const(_) | Self::Success | Self::Failure => false,
            Self::Not(inner) => inner.mentions_cancellation(),
            Self::And(list) | Self::Or(list) => list.iter().any(Self::mentions_cancellation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StatusExpr::{self, Always, And, Cancelled, Const, Failure, Not, Or, Success};

    #[test]
    fn status_functions_follow_the_table() {
        // (expr, all_succeeded, any_failed, run_cancelled, expected)
        let cases: Vec<(StatusExpr, bool, bool, bool, bool)> = vec![
            (Success, true, false, false, true),
            (Success, false, false, false, false),
            (Success, true, false, true, false),
            (Failure, false, true, false, true),
            (Failure, false, false, false, false),
            (Failure, false, true, true, true),
            (Always, false, true, true, true),
            (Cancelled, true, false, true, true),
            (Cancelled, true, false, false, false),
            (Not(Box::new(Cancelled)), true, false, false, true),
            (And(vec![Success, Const(true)]), true, false, false, true),
            (And(vec![Success, Const(false)]), true, false, false, false),
            (Or(vec![Failure, Cancelled]), false, false, true, true),
            (Or(vec![]), true, false, false, false),
            (And(vec![]), true, false, false, true),
        ];
        for (expr, ok, failed, cancelled, expected) in cases {
            assert_eq!(
                expr.eval(ok, failed, cancelled),
                expected,
                "{expr:?} {ok} {failed} {cancelled}"
            );
        }
    }

    #[test]
    fn mentions_cancellation_looks_through_logic() {
        assert!(And(vec![Const(true), Not(Box::new(Always))]).mentions_cancellation());
        assert!(Or(vec![Failure, Cancelled]).mentions_cancellation());
        assert!(!And(vec![Success, Failure, Const(true)]).mentions_cancellation());
    }
}
