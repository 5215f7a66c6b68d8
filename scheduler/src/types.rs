//! What goes into the scheduler (plans, events) and what comes out (commands, states).
//! Plain data: every type here is serde so the coordinator can persist and log it.

use gantry_protocol::{AgentId, Attempt, JobId, Labels, RunId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::expr::StatusExpr;

/// How long an agent has to accept an offered job before it goes back to the queue.
/// Change it only together with the agent's accept path: an agent that needs longer to
/// say yes (it never should; it answers before preparing anything) would see its jobs
/// taken away.
pub const OFFER_TIMEOUT_SECS: u64 = 10;

/// How long a lease lasts without renewal. Heartbeats renew it; agents heartbeat every
/// few seconds, so 30 s tolerates several lost heartbeats or a short reconnect before a
/// job is declared lost. Raise it if agents on slow links lose jobs they are running.
pub const LEASE_DURATION_SECS: u64 = 30;

/// How long past its timeout a running job may stay before the scheduler gives up on it.
/// The agent enforces the real timeout; this backstop only catches an agent that failed
/// to (hung, or its report was lost).
pub const TIMEOUT_GRACE_SECS: u64 = 30;

/// One job of a run, as the pipeline crate expanded it (a matrix cell is one job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPlan {
    pub id: JobId,
    /// Display name, e.g. `test (linux, 1.88)`.
    pub name: String,
    /// The pipeline this job belongs to; the unit of round-robin fairness.
    pub pipeline: String,
    /// Jobs of the same run that must be terminal before this one is considered.
    pub needs: Vec<JobId>,
    /// Labels an agent must carry (with equal values) to run this job.
    pub runs_on: Labels,
    /// The `if:` condition; `StatusExpr::Success` when the pipeline has none.
    pub condition: StatusExpr,
    /// Whether a person must approve the job before it is queued.
    pub manual: bool,
    /// How many times the job is re-run after it fails (exit code or timeout).
    pub retry: u32,
    /// How many times the job is re-run when its agent is lost or rejects it, counted
    /// separately from `retry`. `DEFAULT_INFRA_RETRIES` unless the pipeline says otherwise.
    pub infra_retries: u32,
    /// The job's timeout as the agent enforces it; 0 means none (no backstop either).
    pub timeout_ms: u64,
    /// Whether a failure of this job counts as success for its dependents and the run.
    pub continue_on_error: bool,
}

/// Infrastructure re-runs a job gets when the pipeline does not say.
pub const DEFAULT_INFRA_RETRIES: u32 = 2;

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// The job's process exited with this code.
    ExitCode(i32),
    /// The job ran past its timeout (reported by the agent, or caught by the backstop).
    TimedOut,
    /// Its agent stopped renewing the lease, and no infrastructure retries were left.
    Lost,
    /// Agents kept refusing it, and no infrastructure retries were left.
    Rejected(String),
}

/// Where a job is. Every change is reported as `Command::JobChanged`, except lease
/// renewals (they would double the persistence traffic for nothing: `restore` renews
/// every lease anyway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Some ancestor (transitive need) is not terminal yet.
    Pending,
    /// A manual job whose condition held, waiting for `Event::Approve`.
    AwaitingApproval,
    /// Waiting for a matching agent with a free slot.
    Queued,
    /// Sent to an agent that has not accepted yet.
    Offered {
        agent: AgentId,
        attempt: Attempt,
        offer_expires_at: UnixMillis,
    },
    /// Accepted by an agent, which holds a lease on it.
    Running {
        agent: AgentId,
        attempt: Attempt,
        lease_expires_at: UnixMillis,
        started_at: UnixMillis,
        /// A cancel was sent to the agent; the job ends as `Cancelled` unless the
        /// agent reports another outcome first. Never retried.
        cancelling: bool,
    },
    Succeeded,
    Failed {
        reason: FailReason,
    },
    Cancelled,
    /// Its condition was false when its ancestors finished.
    Skipped,
}

impl JobState {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed { .. } | Self::Cancelled | Self::Skipped
        )
    }

    /// The agent holding the job (offered or running), if any.
    pub fn agent(&self) -> Option<(&AgentId, Attempt)> {
        match self {
            Self::Offered { agent, attempt, .. } | Self::Running { agent, attempt, .. } => {
                Some((agent, *attempt))
            }
            _ => None,
        }
    }
}

/// Where a run is. A run is terminal exactly when all its jobs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Succeeded,
    /// Some job failed without `continue_on_error` (and the run was not cancelled).
    Failed,
    /// The run received `CancelRun`, or (without one) some job was cancelled.
    Cancelled,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

/// What an agent reports at the end of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    Failed { exit_code: i32 },
    TimedOut,
    Cancelled,
}

/// Everything that can happen to the scheduler. Time is not an event field: it is the
/// `now` argument of `Scheduler::handle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A new run. Validated first; an invalid plan yields `Command::RunRejected` and
    /// changes nothing.
    RunSubmitted {
        run: RunId,
        pipeline: String,
        /// Higher is dispatched first.
        priority: i32,
        jobs: Vec<JobPlan>,
    },
    /// An agent's session started (first connection or reconnection). `running` lists
    /// the attempts it is still executing: their leases are renewed; attempts leased to
    /// it that it does not list are lost at once.
    ///
    /// The shell reports exactly one `AgentConnected` and one `AgentDisconnected` per
    /// session, in any order between sessions: a new session may start before the end of
    /// the one it replaced is reported. The agent takes new work while any session is live.
    AgentConnected {
        agent: AgentId,
        labels: Labels,
        slots: u32,
        running: Vec<(JobId, Attempt)>,
    },
    /// An agent's session ended. Its leases stay until their deadlines, so a blip or a
    /// coordinator restart loses nothing; no new work goes to it meanwhile.
    AgentDisconnected { agent: AgentId },
    /// Proof of life: renews every lease the agent holds.
    AgentHeartbeat { agent: AgentId },
    /// The agent will restart into another binary once its jobs end (a fleet upgrade):
    /// it keeps its leases but gets no new work until its next session starts.
    AgentDraining { agent: AgentId, draining: bool },
    /// The agent took an offered attempt.
    JobAccepted {
        job: JobId,
        attempt: Attempt,
        agent: AgentId,
    },
    /// The agent refused an offered attempt (it counts against `infra_retries`).
    JobRejected {
        job: JobId,
        attempt: Attempt,
        agent: AgentId,
        reason: String,
    },
    /// The agent finished an attempt. `agent` is checked, like `attempt`, so a report
    /// can only end the attempt that agent holds.
    JobFinished {
        job: JobId,
        attempt: Attempt,
        agent: AgentId,
        outcome: Outcome,
    },
    /// A pending job's condition with more of its needs' outputs filled in
    /// (`StatusExpr::resolve_outputs`): the shell sends it when a need reports outputs,
    /// before that need's `JobFinished`, so the condition is evaluated with them. Ignored
    /// for a job that is no longer pending.
    ConditionResolved { job: JobId, condition: StatusExpr },
    /// A person cancelled a whole run.
    CancelRun { run: RunId },
    /// A person cancelled one job.
    CancelJob { job: JobId },
    /// A person approved a manual job that is `AwaitingApproval`.
    Approve { job: JobId },
    /// Nothing but the passing of time; send it at `Scheduler::next_deadline`.
    Tick,
}

/// What the shell must do. Commands come out in the order they must be carried out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Send this attempt of a job to the agent.
    Dispatch {
        job: JobId,
        attempt: Attempt,
        agent: AgentId,
        name: String,
        pipeline: String,
        timeout_ms: u64,
    },
    /// Tell the agent to stop this attempt.
    Cancel {
        job: JobId,
        attempt: Attempt,
        agent: AgentId,
    },
    /// A job changed state (persist it, show it). `attempt` is the latest attempt
    /// number handed out for the job, 0 if it was never dispatched.
    JobChanged {
        job: JobId,
        attempt: Attempt,
        state: JobState,
    },
    /// A run changed state.
    RunChanged { run: RunId, state: RunState },
    /// A submitted run was refused; the scheduler did not keep any of it.
    RunRejected { run: RunId, error: PlanError },
}

/// Why a submitted run was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PlanError {
    #[error("run {0} already exists")]
    DuplicateRun(RunId),
    #[error("job {job} does not belong to run {run}")]
    ForeignJob { run: RunId, job: JobId },
    #[error("job {0} appears twice")]
    DuplicateJob(JobId),
    #[error("job {job} needs {need}, which is not a job of this run")]
    UnknownNeed { job: JobId, need: JobId },
    #[error("jobs form a cycle through {0}")]
    Cycle(JobId),
}
