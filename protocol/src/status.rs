//! The folded form of an `if:` condition: what the scheduler evaluates for a job and an
//! agent evaluates for a step.
//!
//! The pipeline crate parses `if:` and folds every fact known when a run is planned
//! (branch, event, inputs, env, matrix, git and event fields) into `Const`. What is left
//! are the status functions and comparisons against outputs, which are known only while
//! the run goes on. The type lives here because both sides of the wire evaluate it: the
//! scheduler (through the pipeline crate's re-export) for jobs, agents for steps
//! ([`crate::StepOptions::condition`]). Evaluation is pure.

use serde::{Deserialize, Serialize};

/// `==` or `!=`; comparisons are between strings, exact and case-sensitive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Eq,
    Ne,
}

/// One side of a comparison left for run time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionValue {
    /// A value already known (a literal, or a static fact folded in).
    Text(String),
    /// `steps.ID.outputs.NAME`: an output an earlier step of the same job wrote.
    StepOutput { step: String, name: String },
    /// `needs.JOB.outputs.NAME`: an output the job `JOB` (its key) declared; `JOB` is
    /// always a direct need, so it has finished when this is evaluated.
    NeedsOutput { job: String, name: String },
}

/// A condition with every static comparison folded to a constant.
///
/// For a job, the facts are about its ancestors (transitive needs), all terminal:
/// - `all_ancestors_succeeded`: every ancestor is `Succeeded`, or `Failed` with
///   `continue_on_error`. A `Skipped` or `Cancelled` ancestor makes this false, so a
///   default `success()` job below a skipped job is skipped too (as in GitHub Actions).
/// - `any_ancestor_failed`: some ancestor is `Failed` without `continue_on_error`.
///   Skipped and cancelled ancestors are not failures.
/// - `run_cancelled`: the run received `CancelRun`.
///
/// For a step, the same three facts are about the steps before it in its job: a step
/// that failed with `continue-on-error` counts as succeeded, a step skipped by its own
/// condition counts as neither, and `run_cancelled` means the job is being cancelled.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StatusExpr {
    /// A comparison the pipeline crate already folded.
    Const(bool),
    /// `success()`: all ancestors succeeded and the run is not cancelled. The default
    /// condition of a job or step without `if:`.
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
    /// A comparison involving an output, evaluated when the output is known. Appended
    /// last so stored plans from before it decode unchanged.
    Compare {
        left: ConditionValue,
        op: CompareOp,
        right: ConditionValue,
    },
}

impl StatusExpr {
    /// Evaluates the condition where no output is known (every output compares as the
    /// empty string, as an output nobody wrote does). An empty `And` is true and an
    /// empty `Or` is false.
    pub fn eval(
        &self,
        all_ancestors_succeeded: bool,
        any_ancestor_failed: bool,
        run_cancelled: bool,
    ) -> bool {
        self.eval_with_outputs(
            all_ancestors_succeeded,
            any_ancestor_failed,
            run_cancelled,
            &|_| None,
        )
    }

    /// Evaluates the condition with `output` telling the value of each output
    /// reference; `None` (never written) compares as the empty string.
    pub fn eval_with_outputs(
        &self,
        all_ancestors_succeeded: bool,
        any_ancestor_failed: bool,
        run_cancelled: bool,
        output: &dyn Fn(&ConditionValue) -> Option<String>,
    ) -> bool {
        let eval = |e: &Self| {
            e.eval_with_outputs(
                all_ancestors_succeeded,
                any_ancestor_failed,
                run_cancelled,
                output,
            )
        };
        match self {
            Self::Const(value) => *value,
            Self::Success => all_ancestors_succeeded && !run_cancelled,
            Self::Failure => any_ancestor_failed,
            Self::Always => true,
            Self::Cancelled => run_cancelled,
            Self::Not(inner) => !eval(inner),
            Self::And(all) => all.iter().all(eval),
            Self::Or(any) => any.iter().any(eval),
            Self::Compare { left, op, right } => {
                let value = |v: &ConditionValue| match v {
                    ConditionValue::Text(text) => text.clone(),
                    other => output(other).unwrap_or_default(),
                };
                (value(left) == value(right)) == (*op == CompareOp::Eq)
            }
        }
    }

    /// Whether `always()` or `cancelled()` appears anywhere in the expression. A pending
    /// job whose condition mentions either survives `CancelRun` and is evaluated (with
    /// `run_cancelled = true`) once its ancestors finish; every other pending job is
    /// cancelled at once.
    pub fn mentions_cancellation(&self) -> bool {
        match self {
            Self::Always | Self::Cancelled => true,
            Self::Const(_) | Self::Success | Self::Failure | Self::Compare { .. } => false,
            Self::Not(inner) => inner.mentions_cancellation(),
            Self::And(list) | Self::Or(list) => list.iter().any(Self::mentions_cancellation),
        }
    }

    /// Replaces every `needs.JOB.outputs.NAME` that `output` knows by its value and folds
    /// the comparisons that became constant: what the coordinator does to a step's
    /// condition when it dispatches the job (its needs have finished by then).
    #[must_use]
    pub fn resolve_outputs(
        &self,
        output: &dyn Fn(&ConditionValue) -> Option<String>,
    ) -> StatusExpr {
        match self {
            Self::Not(inner) => match inner.resolve_outputs(output) {
                Self::Const(value) => Self::Const(!value),
                other => Self::Not(Box::new(other)),
            },
            Self::And(items) => {
                let items: Vec<_> = items.iter().map(|i| i.resolve_outputs(output)).collect();
                if items.contains(&Self::Const(false)) {
                    Self::Const(false)
                } else {
                    Self::And(items)
                }
            }
            Self::Or(items) => {
                let items: Vec<_> = items.iter().map(|i| i.resolve_outputs(output)).collect();
                if items.contains(&Self::Const(true)) {
                    Self::Const(true)
                } else {
                    Self::Or(items)
                }
            }
            Self::Compare { left, op, right } => {
                let resolve = |v: &ConditionValue| match v {
                    ConditionValue::Text(_) => v.clone(),
                    other => output(other).map_or_else(|| other.clone(), ConditionValue::Text),
                };
                let (left, right) = (resolve(left), resolve(right));
                match (&left, &right) {
                    (ConditionValue::Text(a), ConditionValue::Text(b)) => {
                        Self::Const((a == b) == (*op == CompareOp::Eq))
                    }
                    _ => Self::Compare {
                        left,
                        op: *op,
                        right,
                    },
                }
            }
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StatusExpr::{And, Cancelled, Compare, Const, Not, Or, Success};
    use super::*;

    fn version_is(value: &str) -> StatusExpr {
        Compare {
            left: ConditionValue::NeedsOutput {
                job: "build".into(),
                name: "version".into(),
            },
            op: CompareOp::Eq,
            right: ConditionValue::Text(value.into()),
        }
    }

    #[test]
    fn output_comparisons_use_the_outputs_and_missing_ones_are_empty() {
        let outputs = |v: &ConditionValue| match v {
            ConditionValue::NeedsOutput { job, name } if job == "build" && name == "version" => {
                Some("1.2".to_owned())
            }
            _ => None,
        };
        assert!(version_is("1.2").eval_with_outputs(true, false, false, &outputs));
        assert!(!version_is("1.3").eval_with_outputs(true, false, false, &outputs));
        assert!(version_is("").eval(true, false, false));
        let step = Compare {
            left: ConditionValue::StepOutput {
                step: "s".into(),
                name: "x".into(),
            },
            op: CompareOp::Ne,
            right: ConditionValue::Text(String::new()),
        };
        assert!(!step.eval_with_outputs(true, false, false, &outputs));
        assert!(!step.mentions_cancellation());
    }

    #[test]
    fn stored_plans_keep_their_encoding() {
        // The scheduler stores plans with postcard: variants are numbered by position,
        // so `Compare` went last and the others keep their numbers.
        let old = Or(vec![Success, Not(Box::new(Cancelled)), Const(true)]);
        let bytes = postcard::to_stdvec(&old).expect("encode");
        assert_eq!(bytes, [7, 3, 1, 5, 4, 0, 1]);
        assert_eq!(
            postcard::from_bytes::<StatusExpr>(&bytes).expect("decode"),
            old
        );
    }

    #[test]
    fn resolving_needs_outputs_folds_what_became_constant() {
        let outputs = |v: &ConditionValue| match v {
            ConditionValue::NeedsOutput { .. } => Some("1.2".to_owned()),
            ConditionValue::StepOutput { .. } | ConditionValue::Text(_) => None,
        };
        let expr = And(vec![Success, version_is("1.2")]);
        assert_eq!(
            expr.resolve_outputs(&outputs),
            And(vec![Success, Const(true)])
        );
        assert_eq!(
            And(vec![Success, version_is("9")]).resolve_outputs(&outputs),
            Const(false)
        );
        assert_eq!(
            Not(Box::new(version_is("9"))).resolve_outputs(&outputs),
            Const(true)
        );
        let unknown = |_: &ConditionValue| None;
        assert_eq!(version_is("1").resolve_outputs(&unknown), version_is("1"));
    }
}
