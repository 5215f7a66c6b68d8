//! Gantry's scheduler: a deterministic state machine that decides which job runs where.
//!
//! It owns runs, their job DAGs, the queue and agents' capacity. It takes events and the
//! current time (`Scheduler::handle(now, event)`) and returns commands (dispatch, cancel,
//! state changes to persist). It must not read a clock, do I/O, be async or use
//! randomness: the coordinator's shell feeds it and carries out its commands, in the
//! style of quinn-proto. That is what lets its tests replay a simulated week of events in
//! milliseconds.
//!
//! # Semantics
//!
//! - **Readiness.** A job leaves `Pending` when all its ancestors (transitive needs) are
//!   terminal. Its condition is then evaluated (see [`StatusExpr`]): false → `Skipped`;
//!   true → `AwaitingApproval` if manual, else `Queued`.
//! - **Skipped and cancelled ancestors** are "not succeeded": a default `success()`
//!   job below them is skipped; they are not failures either, so `failure()` ignores
//!   them. A failed ancestor with `continue_on_error` counts as succeeded.
//! - **Attempts.** Every dispatch hands out a new attempt number (1, 2, ...), including a
//!   re-offer after an offer expired; reports name the attempt and the agent, and any
//!   report that does not match the current holder is ignored (fencing). The one
//!   exception: a stale `JobAccepted` is answered with `Cancel` for that attempt, because
//!   the agent is about to run work nobody tracks.
//! - **Retries.** A failure (exit code, timeout) re-queues while `retry` allows; a lost
//!   lease or a rejection re-queues while `infra_retries` allows; the two budgets are
//!   separate. An expired or undelivered offer re-queues for free. A job that was asked
//!   to cancel is never retried.
//! - **Cancel.** `CancelRun` cancels every non-terminal job at once, except running jobs
//!   (they get a `Cancel` command and end when the agent reports, or their lease runs
//!   out) and pending jobs whose condition mentions `always()` or `cancelled()`: those
//!   are evaluated normally, with `run_cancelled = true`, when their ancestors finish.
//!   A manual job is never put up for approval in a cancelled run (it is cancelled).
//!   `CancelJob` cancels one job the same way (a pending one at once, whatever its
//!   condition).
//! - **Run outcome.** A run is terminal when all its jobs are: `Cancelled` if it
//!   received `CancelRun`, else `Failed` if a job failed without `continue_on_error`,
//!   else `Cancelled` if a job was cancelled, else `Succeeded`.
//! - **Invalid plans** (duplicate run or job ids, needs outside the run, cycles) are
//!   answered with `Command::RunRejected` and leave no trace: `handle` has one return
//!   type and the shell already routes commands.

mod expr;
mod machine;
mod types;

pub use expr::StatusExpr;
pub use machine::{
    labels_match, Changes, CoreSnapshot, JobSnapshot, RunSnapshot, Scheduler, Snapshot,
    RESERVED_LABEL_PREFIX,
};
pub use types::{
    Command, Event, FailReason, JobPlan, JobState, Outcome, PlanError, RunState,
    DEFAULT_INFRA_RETRIES, LEASE_DURATION_SECS, OFFER_TIMEOUT_SECS, TIMEOUT_GRACE_SECS,
};
