//! Job conditions (`if:`) as the scheduler evaluates them: only the status functions are
//! left. The pipeline crate folds every static comparison (`branch == 'main'` style)
//! into `Const` before a run reaches the scheduler, so evaluation needs nothing but
//! three facts about the job's ancestors and the run. The type is the pipeline crate's,
//! so the language and its evaluation are defined once.

pub use gantry_pipeline::StatusExpr;

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
