//! What goes into a deployment (a plan, events) and what comes out (commands, states).
//! Plain data: every type here is serde so the coordinator can persist and show it.

use gantry_protocol::{AgentId, UnixMillis};
use serde::{Deserialize, Serialize};

/// A number of hosts, absolute or as a share of the deployment's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Amount {
    Count(u32),
    /// Percent of the hosts, rounded up (10% of 15 hosts is 2).
    Percent(u8),
}

impl Amount {
    /// This amount of `total` hosts, at most `total`.
    pub fn of(self, total: usize) -> usize {
        match self {
            Self::Count(n) => (n as usize).min(total),
            Self::Percent(p) => (usize::from(p.min(100)) * total).div_ceil(100),
        }
    }
}

/// How long a canary step waits before its analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pause {
    /// Wait, then analyse (check every switched host again) and go on if all pass.
    For { ms: u64 },
    /// Wait for `gantry deploy promote` (or abort).
    UntilPromoted,
}

/// One canary step: switch hosts until `percent` of them run the release, then pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryStep {
    pub percent: u8,
    pub pause: Pause,
}

/// How hosts are switched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Waves of `batch` hosts. The deployment rolls back when more hosts than
    /// `failure_budget` have failed (`>`: a budget of 1 tolerates one failed host).
    /// Waves are `pause_ms` apart.
    Rolling {
        batch: Amount,
        failure_budget: Amount,
        pause_ms: u64,
    },
    /// Steps of growing shares of the hosts. After each step's pause the switched hosts
    /// are checked again; a host that fails counts against `failure_budget`, a host that
    /// does not answer makes the result inconclusive, which pauses until a person
    /// promotes or aborts. The last step always reaches every host.
    Canary {
        steps: Vec<CanaryStep>,
        failure_budget: Amount,
    },
    /// Staging installs and starts the release in each host's idle slot and checks it;
    /// then every host switches its traffic at once; any failure beyond the budget
    /// switches every host back to its warm old slot.
    BlueGreen { failure_budget: Amount },
    /// Back to a release the hosts still hold: no staging, no analysis, `parallelism`
    /// hosts at a time; a host that fails stays failed (a rollback is not rolled back).
    Rollback { parallelism: u32 },
}

/// Deadlines and pacing. Every operation on a host has a deadline, so every host ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Staging one host (fetching the release and unpacking it).
    pub stage_ms: u64,
    /// Switching one host and waiting for it to be healthy.
    pub activate_ms: u64,
    /// Checking a switched host again (canary analysis).
    pub verify_ms: u64,
    /// Switching one host back.
    pub rollback_ms: u64,
    /// How long a canary may wait for a person to promote it before it rolls back.
    pub promotion_timeout_ms: u64,
    /// Hosts staging at first; each host staged lets this many more start (they fetch
    /// from it). 0 stages every host at once.
    pub stage_seeds: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            stage_ms: 10 * 60_000,
            activate_ms: 5 * 60_000,
            verify_ms: 60_000,
            rollback_ms: 5 * 60_000,
            promotion_timeout_ms: 24 * 3_600_000,
            stage_seeds: 0,
        }
    }
}

/// Everything a deployment needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Target hosts, in the order waves take them.
    pub hosts: Vec<AgentId>,
    pub strategy: Strategy,
    pub limits: Limits,
}

/// Where one host is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Not started.
    Pending,
    Staging {
        until: UnixMillis,
    },
    /// The release is on the host; it still runs the previous one.
    Staged,
    /// Terminal: staging failed; the host still runs the previous release.
    StageFailed {
        reason: String,
    },
    Activating {
        until: UnixMillis,
    },
    /// Running the release (terminal for a host once the deployment ends).
    Active,
    /// Being checked again during a canary analysis.
    Verifying {
        until: UnixMillis,
    },
    /// The switch or a check failed; the host is to be rolled back.
    Failed {
        reason: String,
    },
    RollingBack {
        until: UnixMillis,
    },
    /// Terminal: back on the previous release.
    RolledBack,
    /// Terminal: the rollback failed or timed out (the host may be on either release).
    RollbackFailed {
        reason: String,
    },
    /// Terminal: the deployment ended before switching this host; it still runs the
    /// previous release.
    Untouched,
}

impl HostState {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::StageFailed { .. }
                | Self::RolledBack
                | Self::RollbackFailed { .. }
                | Self::Untouched
        )
    }

    /// Whether an operation is in flight (and has a deadline).
    pub fn deadline(&self) -> Option<UnixMillis> {
        match self {
            Self::Staging { until }
            | Self::Activating { until }
            | Self::Verifying { until }
            | Self::RollingBack { until } => Some(*until),
            _ => None,
        }
    }

    /// Short name for listings.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Staging { .. } => "staging",
            Self::Staged => "staged",
            Self::StageFailed { .. } => "stage-failed",
            Self::Activating { .. } => "activating",
            Self::Active => "active",
            Self::Verifying { .. } => "verifying",
            Self::Failed { .. } => "failed",
            Self::RollingBack { .. } => "rolling-back",
            Self::RolledBack => "rolled-back",
            Self::RollbackFailed { .. } => "rollback-failed",
            Self::Untouched => "untouched",
        }
    }
}

/// One host's record: its state and when its steps happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub agent: AgentId,
    pub state: HostState,
    pub staged_at: Option<UnixMillis>,
    pub activated_at: Option<UnixMillis>,
    pub ended_at: Option<UnixMillis>,
    /// Whether the host was ever asked to switch: only those are rolled back.
    pub touched: bool,
}

/// How a deployment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every host runs the release, except `failed_hosts` (within the failure budget):
    /// each either could not stage (never switched, it still runs the previous release),
    /// or failed after its switch and was rolled back (or left failed, if its rollback
    /// failed).
    Succeeded { failed_hosts: u32 },
    /// Failures passed the budget (or a person aborted): every switched host was sent
    /// back to the previous release.
    RolledBack { reason: String },
    /// Nothing was switched: staging failed on more hosts than the budget allows.
    Failed { reason: String },
}

/// Where the deployment as a whole is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    NotStarted,
    Staging,
    /// Switching the hosts of wave `index`.
    Wave {
        index: usize,
    },
    /// Between waves (a rolling pause, or a canary step's timed pause).
    Paused {
        until: UnixMillis,
        next: usize,
    },
    /// A canary step's analysis: every switched host is checked again.
    Verifying {
        next: usize,
    },
    /// Waiting for a person: `gantry deploy promote` goes on with wave `next`,
    /// `gantry deploy abort` rolls back; past `until` it rolls back by itself.
    AwaitingPromotion {
        next: usize,
        reason: String,
        until: UnixMillis,
    },
    RollingBack {
        reason: String,
    },
    Done(Outcome),
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done(_))
    }
}

/// Why a host could not carry out a step, in the host's words (`health check: connection
/// refused`). The engine keeps it as the host's reason and logs it with the host's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}")]
pub struct StepError {
    pub reason: String,
}

impl From<String> for StepError {
    fn from(reason: String) -> Self {
        Self { reason }
    }
}

impl From<&str> for StepError {
    fn from(reason: &str) -> Self {
        Self {
            reason: reason.to_owned(),
        }
    }
}

/// Everything that can happen to a deployment. Time is not a field: it is `now`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Start,
    /// A host finished staging (or could not).
    Staged {
        host: AgentId,
        result: Result<(), StepError>,
    },
    /// A host switched and became healthy (or did not).
    Activated {
        host: AgentId,
        result: Result<(), StepError>,
    },
    /// A canary analysis check of a host.
    Verified {
        host: AgentId,
        result: Result<(), StepError>,
    },
    RolledBack {
        host: AgentId,
        result: Result<(), StepError>,
    },
    /// `gantry deploy promote`.
    Promote,
    /// `gantry deploy abort` (or the run was cancelled).
    Abort {
        by: String,
    },
    /// Nothing but time passing; send it at [`crate::Deployment::next_deadline`].
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Stage {
        host: AgentId,
    },
    Activate {
        host: AgentId,
    },
    Verify {
        host: AgentId,
    },
    Rollback {
        host: AgentId,
    },
    /// A host changed state (persist it, show it).
    HostChanged {
        host: AgentId,
        state: HostState,
    },
    /// The deployment changed phase.
    PhaseChanged {
        phase: Phase,
    },
    /// A line for the deployment's log.
    Log {
        message: String,
    },
}
