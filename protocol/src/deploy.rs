//! Deployments and ad-hoc fleet commands: what the coordinator asks a host to do, what
//! the host answers, and what the admin CLI sees.
//!
//! A deployment step travels on the control stream as a [`DeployCommand`]; the host
//! answers with a [`DeployResult`] carrying the same `(deployment, seq)`. Steps are
//! idempotent, so after a reconnect the coordinator sends in-flight steps again and the
//! host answers from what it already did. Every step carries the deployment's epoch: a
//! host refuses a step whose epoch is older than one it has seen for that app (a
//! coordinator acting on stale state, e.g. after a partition healed).

use serde::{Deserialize, Serialize};

use crate::{AgentId, Digest, JobId, Labels, RunId, UnixMillis};

/// How a host checks that an app is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// `GET url` answers `status` (and its body contains `body`, if given). The URL may
    /// hold `${{ labels.KEY }}` and `${{ slot.port }}`, filled in on the host.
    Http {
        url: String,
        status: u16,
        body: Option<String>,
    },
    /// A TCP connection to `host:port` succeeds.
    Tcp { address: String },
    /// A shell command exits 0.
    Command { run: String },
}

/// When a host counts as healthy: probes pass for `min_healthy_ms` without a break,
/// before `deadline_ms`; `retries` probes failing in a row make it unhealthy at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub min_healthy_ms: u64,
    pub deadline_ms: u64,
}

/// Commands run on the host around a switch, in the release's directory, each bounded
/// by `timeout_ms`. A missing hook is skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    pub stop: Option<String>,
    pub start: Option<String>,
    /// Used instead of stop-then-start when given.
    pub restart: Option<String>,
    pub pre_start: Option<String>,
    pub post_start: Option<String>,
    pub timeout_ms: u64,
}

/// Blue-green: two slots, each serving on its own port; `switch` moves traffic to the
/// slot in `GANTRY_SLOT` (it typically rewrites a proxy's upstream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueGreen {
    pub blue_port: u16,
    pub green_port: u16,
    pub switch: String,
}

/// Everything a host needs to know about the app it deploys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// Directory name under the host's deploy root.
    pub name: String,
    pub hooks: Hooks,
    pub health: Option<HealthCheck>,
    /// Releases kept on the host (the current one included).
    pub keep: u32,
    /// Directories of `shared/` linked into every release (data that outlives one).
    pub shared: Vec<String>,
    /// Environment of hooks and command probes, secrets expanded.
    pub env: Labels,
    /// Secret values, masked in the logs the host sends back.
    pub secrets: Vec<String>,
    pub blue_green: Option<BlueGreen>,
}

/// A release: an artifact's tree under a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// Directory name under `releases/`, e.g. `r12-3f9c0a12`.
    pub id: String,
    /// What people call it, e.g. `1.4.2` or `12.3`.
    pub version: String,
    pub manifest: Digest,
}

/// Another host that holds the release's chunks and serves them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSource {
    pub agent: AgentId,
    /// `ip:port` of its peer listener.
    pub address: String,
}

/// One step of a deployment on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployOp {
    /// Fetch the release into `releases/<id>` (blue-green: also start it in the idle
    /// slot and check it), leaving what runs untouched.
    Stage {
        release: ReleaseSpec,
        /// The hosts staging this release that serve peers, in the same order for every
        /// host (the receiving host among them when it serves too). The release's chunk
        /// list is cut into as many contiguous ranges: range `k` is fetched from the
        /// coordinator by `peers[k]` and from `peers[k]` by the others, so the
        /// coordinator sends each chunk about once. Empty: everything from the
        /// coordinator. Filled in by the coordinator when it sends the step.
        peers: Vec<PeerSource>,
    },
    /// Switch to the release (hooks, `current` link; blue-green: the traffic switch) and
    /// wait until it is healthy.
    Activate { release: ReleaseSpec },
    /// Check the current release again (canary analysis).
    Verify,
    /// Go back to release `to` (which the host still holds); `None` when there was no
    /// release before: stop the app.
    Rollback { to: Option<String> },
    /// Fleet upgrade: fetch the agent binary (`StreamOpen::FetchAgentBinary`), check its
    /// SHA-256 and that it runs, and keep it ready. The app is ignored.
    UpgradeStage { binary: AgentBinary },
    /// Fleet upgrade: once no job runs (taking none meanwhile), restart into the staged
    /// binary. Answered by the restarted agent when the step is sent again.
    UpgradeActivate { binary: AgentBinary },
    /// Fleet upgrade: restart into the binary with SHA-256 `to` again (the one it ran
    /// before), or into the host's installed binary when `None`.
    UpgradeRollback { to: Option<String> },
}

/// An agent binary a fleet upgrade installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBinary {
    /// Lower-case hex SHA-256 of the file: what an agent runs is named by it.
    pub sha256: String,
    /// What `gantry-agent --version` prints.
    pub version: String,
    pub bytes: u64,
}

/// Coordinator to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployCommand {
    pub deployment: u64,
    pub epoch: u64,
    /// Numbers the steps of one deployment; results name it.
    pub seq: u64,
    pub app: AppSpec,
    pub op: DeployOp,
}

/// Host to coordinator: how a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployResult {
    pub deployment: u64,
    pub seq: u64,
    pub outcome: Result<HostReport, String>,
    /// What the hooks printed and what the host did, masked and bounded.
    pub log: Vec<String>,
}

/// What a host runs after a step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// The release `current` points at (blue-green: the live slot's); for a fleet
    /// upgrade's steps, the SHA-256 of the agent binary running.
    pub current: Option<String>,
    /// Releases on the host, oldest first.
    pub releases: Vec<String>,
}

/// An ad-hoc command on every matching host (`gantry exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Labels a host must carry.
    pub select: Labels,
    /// Hosts running it at once (0: all).
    pub parallel: u32,
    pub command: String,
    pub timeout_ms: u64,
}

/// Coordinator to host: run this now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecCommand {
    pub id: u64,
    pub command: String,
    pub timeout_ms: u64,
}

/// Coordinator to admin on an exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEvent {
    /// Which hosts will run it.
    Targets(Vec<ExecHost>),
    Output {
        agent: AgentId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A host finished: its exit code, or why it could not run or answer.
    Done {
        agent: AgentId,
        result: Result<i32, String>,
        millis: u64,
    },
    Refused {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecHost {
    pub agent: AgentId,
    pub hostname: String,
}

/// Declares a struct that begins with an environment's fields as [`EnvironmentView`]
/// shows them, and goes on with the fields given. The coordinator's stored environment
/// record is declared with it too (the view without the live host list): postcard reads
/// fields by position, so one list keeps the two in step (the store's tests pin the
/// record's bytes, so a field added here is caught there before it changes what is on
/// disk).
#[macro_export]
macro_rules! environment_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$field_attr:meta])* pub $field:ident: $type:ty,)*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            pub name: String,
            /// Labels a host must carry to be a target.
            pub select: $crate::Labels,
            /// Distinct people who must approve a deployment (never the one who started it).
            pub approvals: u32,
            /// Time a deployment waits after it is approved, before it starts.
            pub wait_ms: u64,
            /// Globs of the branches allowed to deploy here; empty allows any.
            pub branches: Vec<String>,
            pub epoch: u64,
            /// The release that runs here now, after the last deployment that succeeded.
            pub current: Option<$crate::EnvRelease>,
            /// Releases deployed here, newest first (at most 20).
            pub history: Vec<$crate::EnvRelease>,
            pub created_by: String,
            pub created_at: $crate::UnixMillis,
            $($(#[$field_attr])* pub $field: $type,)*
        }
    };
}

environment_struct! {
    /// An environment: where deployments go and what guards them.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EnvironmentView {
        /// Hosts that match the selector now (connected or not).
        pub hosts: Vec<ExecHost>,
    }
}

/// A release as an environment remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvRelease {
    pub release: ReleaseSpec,
    pub app: String,
    pub deployment: u64,
    pub at: UnixMillis,
}

/// A deployment as `gantry deployments show` tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub id: u64,
    pub environment: String,
    pub app: String,
    pub release: ReleaseSpec,
    pub strategy: String,
    pub epoch: u64,
    /// `waiting-for-approval`, `waiting`, `staging`, `switching`, `paused`,
    /// `awaiting-promotion`, `rolling-back`, `succeeded`, `rolled-back`, `failed`.
    pub state: String,
    /// Why it rolled back, failed or is paused.
    pub reason: Option<String>,
    pub created_by: String,
    pub created_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// The pipeline job that started it, if one did.
    pub run: Option<RunId>,
    pub job: Option<JobId>,
    pub approvals: Vec<Approval>,
    pub approvals_needed: u32,
    pub hosts: Vec<DeploymentHost>,
    /// The deployment's log, oldest first (bounded).
    pub log: Vec<DeployLogLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentHost {
    pub agent: AgentId,
    pub hostname: String,
    /// `pending`, `staging`, `staged`, `active`, `rolled-back`, ...
    pub state: String,
    pub reason: Option<String>,
    pub previous: Option<String>,
    pub staged_at: Option<UnixMillis>,
    pub activated_at: Option<UnixMillis>,
    pub ended_at: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployLogLine {
    pub at: UnixMillis,
    /// The host it concerns, if one.
    pub agent: Option<AgentId>,
    pub text: String,
}

/// Strategy as the CLI gives it for `gantry deploy` and `gantry rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub environment: String,
    /// Release id to go back to; the one before the current by default.
    pub to: Option<String>,
    /// Hosts switched at once.
    pub parallelism: u32,
}

/// Delivery figures of one environment over a window (`gantry stats`): the four keys of
/// DORA, from the deployment history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryStats {
    pub environment: String,
    pub since: UnixMillis,
    pub until: UnixMillis,
    /// Deployments of a new release that ended in the window (rollbacks and deployments
    /// cancelled before they started excluded).
    pub changes: u32,
    /// Of those, the ones that succeeded.
    pub succeeded: u32,
    /// Of those, the ones that failed: rolled back, failed, or undone by the
    /// `gantry rollback` that came next.
    pub failed_changes: u32,
    /// `gantry rollback`s that ended in the window.
    pub rollbacks: u32,
    /// Successful changes per day over the window.
    pub deployments_per_day: f64,
    /// `failed_changes / changes`; none without changes.
    pub change_failure_rate: Option<f64>,
    /// From the run's creation (the change entering the pipeline) to its deployment's
    /// success: median and 90th percentile.
    pub lead_time_median_ms: Option<u64>,
    pub lead_time_p90_ms: Option<u64>,
    /// From a failure in production (a host failing after its switch, or a bad release's
    /// deployment ending, for one undone by `gantry rollback`) to the environment running
    /// a good release again: median over `restores`.
    pub time_to_restore_median_ms: Option<u64>,
    pub restores: u32,
}
