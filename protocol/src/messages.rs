//! Message types, one enum per direction and role.
//!
//! Control-stream conversation:
//! 1. the client sends a hello ([`crate::hello`]) whose [`Intent`] says what it is;
//! 2. the coordinator answers with one [`HelloReply`];
//! 3. an agent then sends [`AgentMessage`]s and receives [`CoordinatorMessage`]s, while
//!    an admin sends [`AdminRequest`]s and receives one [`AdminResponse`] for each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deploy::{
    DeployCommand, DeployResult, DeploymentView, EnvironmentView, ExecCommand, ExecRequest,
    RollbackRequest,
};
use crate::execution::JobExecution;
use crate::transfer::{ArtifactView, CacheView, GcReport, Grant, ResolveRequest, UploadTarget};
use crate::{AgentId, Attempt, Digest, JobId, RunId, TokenId, UnixMillis};

/// Labels on an agent: `os=linux`, `role=web`. Ordered so listings are stable.
pub type Labels = BTreeMap<String, String>;

/// What a client wants from this connection; carried in the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Intent {
    /// A new agent with no certificate presents a join token and a CSR. This is the only
    /// thing an unauthenticated connection may do.
    Enroll(EnrollRequest),
    /// An enrolled agent (client certificate with an agent identity) opens its session.
    Agent(AgentHello),
    /// An admin CLI (client certificate with an admin identity) sends requests.
    Admin(AdminHello),
    /// An enrolled agent opens a connection for its bulk transfers (artifacts, caches,
    /// releases), beside its session: the coordinator welcomes it and serves the
    /// streams the agent opens on it, as on the session's connection, but registers no
    /// session. Transfers get QUIC limits sized for bulk there, which idle sessions
    /// must not pay for (docs/decisions/0086-fleet-scale-transport.md). A coordinator that
    /// predates it closes the connection as malformed; the agent then transfers on its
    /// session's connection, as before.
    Transfers(TransfersHello),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransfersHello {
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token_id: TokenId,
    /// The token's secret, compared in constant time against its stored hash.
    pub token_secret: String,
    /// DER PKCS#10 request. Only its public key is used.
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
    pub hostname: String,
    /// Labels the agent asks for; the token's labels are added on top and win.
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentHello {
    pub agent_version: String,
    pub hostname: String,
    /// Automatic labels (os, arch, hostname) plus the agent's configured ones.
    pub labels: Labels,
    /// What this agent can do, e.g. `shell`, `docker`.
    pub capabilities: Vec<String>,
    /// How many jobs it runs at once.
    pub slots: u32,
    pub figures: HostFigures,
    /// Jobs this agent is still running (after a reconnect), so their leases hold.
    pub running: Vec<RunningJob>,
    /// The port of this agent's peer listener, where other hosts fetch the release
    /// chunks it holds; `None` when it serves no peers.
    pub peer_port: Option<u16>,
}

/// A job attempt an agent is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    pub job: JobId,
    pub attempt: Attempt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminHello {
    pub client_version: String,
}

/// The coordinator's one answer to a hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome(Welcome),
    Enrolled(Enrolled),
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    pub coordinator_version: String,
    /// The identity the coordinator saw in the client certificate.
    pub identity: String,
    /// How often the agent should send a heartbeat.
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub agent_id: AgentId,
    pub certificate_pem: String,
    pub ca_certificate_pem: String,
    /// Labels the coordinator recorded (requested plus the token's).
    pub labels: Labels,
}

/// A refusal, with a machine-readable reason and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    UnsupportedVersion,
    TokenUnknown,
    TokenExpired,
    TokenUsedUp,
    TokenMalformed,
    BadCsr,
    NotAuthenticated,
    WrongRole,
    Revoked,
    BadRequest,
    Internal,
}

/// Figures an agent reports about its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HostFigures {
    pub cpu_count: u32,
    /// Average use over all CPUs since the previous report, 0..=100.
    pub cpu_percent: f32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// The filesystem holding the agent's data directory.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_average: [f32; 3],
    pub uptime_secs: u64,
}

/// Agent to coordinator, after the welcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Heartbeat(HostFigures),
    /// A CSR for a fresh key; the coordinator signs it for the same identity.
    RenewCertificate {
        #[serde(with = "serde_bytes")]
        csr_der: Vec<u8>,
    },
    /// The agent takes the job; its lease starts now.
    JobAccepted {
        job: JobId,
        attempt: Attempt,
    },
    /// The agent cannot take the job (no free slot, cannot prepare it).
    JobRejected {
        job: JobId,
        attempt: Attempt,
        reason: String,
    },
    /// The job ended. Sent until acknowledged, also across reconnects.
    JobFinished(JobResult),
    /// A deployment step ended.
    DeployResult(DeployResult),
    /// Output of an ad-hoc command.
    ExecOutput {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// An ad-hoc command ended: its exit code, or why it could not run.
    ExecDone {
        id: u64,
        result: Result<i32, String>,
    },
    /// The job ended, with the values of the `outputs:` it declares (masked where a
    /// secret was in them). `JobResult` could not gain a field (postcard reads fields by
    /// position), so this variant is appended; an agent sends it instead of
    /// `JobFinished` only for a job that came with `DispatchJob` and declares outputs or
    /// ran in an image (its digest, under [`IMAGE_DIGEST_OUTPUT`](crate::IMAGE_DIGEST_OUTPUT)), so
    /// only coordinators that understand it (version 3 and later) ever receive it. Sent
    /// until acknowledged, like `JobFinished`.
    JobFinishedWithOutputs {
        result: JobResult,
        outputs: Labels,
    },
}

impl AgentMessage {
    /// The message reporting `result`, with `outputs` when the job declares any.
    pub fn job_finished(result: JobResult, outputs: Option<Labels>) -> Self {
        match outputs {
            Some(outputs) => Self::JobFinishedWithOutputs { result, outputs },
            None => Self::JobFinished(result),
        }
    }
}

/// How a job attempt ended, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: JobId,
    pub attempt: Attempt,
    pub outcome: JobOutcome,
    /// Log chunks the attempt produced (sequence numbers `0..log_chunks`), so the
    /// coordinator knows when its copy of the log is complete.
    pub log_chunks: u64,
    pub started_at: UnixMillis,
    pub finished_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    Succeeded,
    /// A step exited non-zero (or was killed by a signal, reported as 128 + signal).
    Failed {
        exit_code: i32,
        step: u32,
    },
    TimedOut,
    Cancelled,
    /// The job could not be started (workspace, image, spawn failure).
    Error {
        message: String,
    },
}

/// Coordinator to agent, after the welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    CertificateRenewed {
        certificate_pem: String,
        not_after: UnixMillis,
    },
    RenewalRefused {
        message: String,
    },
    /// Run this job; answer with `JobAccepted` or `JobRejected`.
    Dispatch(Box<JobAssignment>),
    /// Stop this job attempt: SIGTERM to its process group, SIGKILL after the grace.
    Cancel {
        job: JobId,
        attempt: Attempt,
    },
    /// The job's result is durable; the agent may forget it.
    JobFinishedAck {
        job: JobId,
        attempt: Attempt,
    },
    /// Do one step of a deployment; answer with `DeployResult`.
    Deploy(Box<DeployCommand>),
    /// Run an ad-hoc command now (`gantry exec`); answer with `ExecOutput`s and `ExecDone`.
    Exec(ExecCommand),
    /// A message the agent sent was refused by the authorization table (it named work
    /// the agent does not hold); nothing was done with it.
    Refused {
        message: String,
    },
    /// Run this job, with its execution options; answer as for `Dispatch`. Sent only to
    /// agents whose hello version is at least [`crate::EXECUTION_VERSION`] (see
    /// [`crate::execution`] for why this is a variant of its own).
    DispatchJob {
        assignment: Box<JobAssignment>,
        execution: Box<JobExecution>,
    },
}

impl CoordinatorMessage {
    /// The job assignment of a `Dispatch` or `DispatchJob`.
    pub fn assignment(&self) -> Option<&JobAssignment> {
        match self {
            Self::Dispatch(assignment) | Self::DispatchJob { assignment, .. } => Some(assignment),
            _ => None,
        }
    }
}

/// Everything an agent needs to run one job attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAssignment {
    pub job: JobId,
    pub attempt: Attempt,
    pub run: RunId,
    pub pipeline: String,
    pub name: String,
    pub steps: Vec<StepSpec>,
    /// The job's declared environment (pipeline, then job level), already expanded. The
    /// agent adds only `GANTRY_*` variables and the step's own env.
    pub env: Labels,
    pub timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL on cancel or timeout.
    pub kill_grace_ms: u64,
    pub image: Option<String>,
    /// Values of the secrets the job references, for `${{ secrets.NAME }}` and masking.
    pub secrets: Labels,
    /// The run's source tree, fetched into the workspace before the first step.
    pub source: Option<String>,
    /// Whether the job receives artifacts (its needs produced some, or it names some in
    /// `download`); the agent asks with `ResolveRequest::JobArtifacts`.
    pub downloads: bool,
    /// The artifact to upload when every step succeeded.
    pub artifact: Option<ArtifactSpec>,
    /// The cache to restore before the first step and save after a success.
    pub cache: Option<CacheSpec>,
}

/// A job's `artifacts:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSpec {
    pub name: String,
    /// Workspace-relative paths or globs (`*`, `**`), already checked to stay inside.
    pub paths: Vec<String>,
    pub expire_in_secs: u64,
}

/// A job's `cache:`. `key` and `restore_keys` may still hold `${{ hashFiles(...) }}`,
/// which only the agent can evaluate (it hashes workspace files).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CacheSpec {
    pub key: String,
    pub restore_keys: Vec<String>,
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    pub name: String,
    pub run: String,
    pub working_directory: Option<String>,
    pub env: Labels,
}

/// First frame of every stream other than the control stream, saying what it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOpen {
    /// Agent to coordinator: the log of a job attempt. The coordinator answers with one
    /// `LogControl::Resume`, then a `LogControl::Ack` each time chunks are durable.
    Logs { job: JobId, attempt: Attempt },
    /// Admin to coordinator: the stored log of a job from chunk `from_seq`, then (with
    /// `follow`) live output until the job ends.
    FollowLogs {
        job: JobId,
        from_seq: u64,
        follow: bool,
    },
    /// Admin to coordinator: live job states of a run until it ends.
    FollowRun { run: RunId },
    /// Admin to coordinator: a source tree (tar) follows as `SourceData` frames until
    /// the stream ends; the coordinator answers `SourceStored` once it is durable.
    UploadSource { bytes: u64 },
    /// Agent to coordinator: send the source tree of this attempt's run as `SourceData`
    /// frames, then end the stream.
    FetchSource { job: JobId, attempt: Attempt },
    /// Which manifests may the reader fetch? One `ResolveReply` answers.
    Resolve(ResolveRequest),
    /// A manifest's bytes, as `ManifestFrame`s.
    GetManifest { grant: Grant, manifest: Digest },
    /// Chunks of `manifest`: `ChunkWants` in, `ChunkFrame`s out.
    FetchChunks { grant: Grant, manifest: Digest },
    /// An upload session: `UploadRequest`s in, `UploadReply`s out.
    Upload { grant: Grant, target: UploadTarget },
    /// Chunks of upload `session` (opened on the same connection): `ChunkPut`s in, one
    /// `PutReply` out once they are durable.
    PutChunks { session: u64 },
    /// Admin to coordinator: run a command on every matching host; `ExecEvent`s out.
    Exec(ExecRequest),
    /// Agent to coordinator: the agent binary with this SHA-256 (hex), as `SourceData`
    /// pieces; the stream ends without data if the coordinator has no such binary.
    FetchAgentBinary { sha256: String },
    /// Agent to coordinator: the report files of an attempt whose job declares
    /// `reports:`, as [`ReportUpload`](crate::ReportUpload)s; one
    /// [`ReportsStored`](crate::ReportsStored) answers once the summary is durable.
    /// Appended: sent only to coordinators that dispatched the job with its reports.
    Reports { job: JobId, attempt: Attempt },
}

/// Agent to coordinator on a log stream: one chunk of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub seq: u64,
    /// Raw bytes (any encoding; invalid UTF-8 is kept as is).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Coordinator to agent on a log stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogControl {
    /// The first chunk the coordinator does not have yet: the agent resumes from there.
    Resume { next_seq: u64 },
    /// Every chunk below `next_seq` is durable; the agent may drop them from its spool.
    Ack { next_seq: u64 },
}

/// Coordinator to admin on a follow stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FollowEvent {
    Log(LogChunk),
    Job(JobView),
    /// Nothing more will come: the job or run has ended, in this state.
    End {
        state: String,
    },
    Error(AdminError),
}

/// Admin CLI to coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    CreateToken {
        ttl_secs: u64,
        uses: u32,
        labels: Labels,
    },
    ListAgents,
    ShowAgent {
        agent_id: AgentId,
    },
    RevokeAgent {
        agent_id: AgentId,
    },
    /// Sets `set` and removes `remove` on the agent's labels.
    LabelAgent {
        agent_id: AgentId,
        set: Labels,
        remove: Vec<String>,
    },
    Status,
    /// The newest `limit` audit entries.
    Audit {
        limit: u32,
    },
    /// Parses and checks a pipeline file without running it.
    Validate {
        file_name: String,
        text: String,
    },
    /// Starts a run of a pipeline file.
    SubmitRun(SubmitRun),
    ListRuns {
        limit: u32,
    },
    ShowRun {
        run: RunId,
    },
    CancelRun {
        run: RunId,
    },
    /// Starts a new run with the same pipeline, ref and inputs.
    RetryRun {
        run: RunId,
    },
    ListJobs {
        run: Option<RunId>,
        limit: u32,
    },
    ShowJob {
        job: JobId,
    },
    Approve {
        job: JobId,
    },
    /// Registers a pipeline file for its `on.push` and `on.schedule` triggers (replacing
    /// a registration of the same pipeline name).
    AddTrigger {
        file_name: String,
        text: String,
    },
    ListTriggers,
    RemoveTrigger {
        name: String,
    },
    /// Stores a secret, encrypted at rest.
    SetSecret {
        name: String,
        value: String,
        /// Only deployments to this environment receive it.
        environment: Option<String>,
    },
    ListSecrets,
    RemoveSecret {
        name: String,
    },
    /// The artifacts of a run.
    ListArtifacts {
        run: RunId,
    },
    /// Stored caches, newest first.
    ListCaches,
    /// Removes caches whose key is `key` (in every pipeline and branch unless narrowed).
    RemoveCache {
        key: String,
        pipeline: Option<String>,
        branch: Option<String>,
    },
    /// Creates an environment, or changes one (`replace`).
    PutEnvironment {
        name: String,
        select: Labels,
        approvals: u32,
        wait_ms: u64,
        branches: Vec<String>,
        replace: bool,
    },
    ListEnvironments,
    ShowEnvironment {
        name: String,
    },
    ListDeployments {
        environment: Option<String>,
        limit: u32,
    },
    ShowDeployment {
        id: u64,
    },
    /// Approves a deployment waiting for approvals (never one you started).
    ApproveDeployment {
        id: u64,
    },
    /// Goes on from a canary pause.
    PromoteDeployment {
        id: u64,
    },
    /// Stops a deployment and rolls back what it switched.
    AbortDeployment {
        id: u64,
    },
    /// Back to a release the hosts still hold.
    Rollback(RollbackRequest),
    /// Rolls the coordinator's agent binary out to the matching agents in waves
    /// (`gantry agents upgrade`); answers with the upgrade's deployment.
    UpgradeAgents {
        select: Labels,
        /// Agents restarted at once.
        batch: u32,
        /// Agents that may fail before the upgrade stops and rolls back.
        failure_budget: u32,
        /// Longest one agent may take (waiting for its running jobs included).
        timeout_ms: u64,
    },
    /// Delivery figures per environment over the last `since_ms` (`gantry stats`).
    Stats {
        since_ms: u64,
        environment: Option<String>,
    },
    /// Signs a CSR for another admin identity (`gantry admin add`).
    IssueAdmin {
        name: String,
        #[serde(with = "serde_bytes")]
        csr_der: Vec<u8>,
    },
    /// Expires artifacts, evicts caches and deletes unreferenced chunks now. `grace_secs`
    /// overrides how old an unreferenced chunk must be before it goes.
    Gc {
        dry_run: bool,
        grace_secs: Option<u64>,
    },
    /// Issues a dashboard login token (`gantry admin token`).
    CreateLoginToken {
        name: String,
        role: crate::web::Role,
        ttl_secs: u64,
    },
    ListLoginTokens,
    /// Revokes a login token by id; its sessions end at their next request.
    RevokeLoginToken {
        id: String,
    },
    /// Adds a webhook target (`gantry webhooks add`). `events` empty means every kind;
    /// `ca_pem` replaces the system roots for an https URL.
    AddWebhook {
        url: String,
        format: crate::web::WebhookFormat,
        events: Vec<String>,
        ca_pem: Option<String>,
    },
    ListWebhooks,
    RemoveWebhook {
        id: u64,
    },
    /// `gantry repos add`: a repository the coordinator mirrors.
    AddRepo(crate::repos::AddRepo),
    ListRepos,
    ShowRepo {
        name: String,
    },
    RemoveRepo {
        name: String,
    },
    /// `gantry run --repo`: a run of the pipeline file at a commit of a repository.
    RunRepo(crate::repos::RunRepo),
    /// The values of a job's `outputs:` as its last finished attempt reported them.
    /// Appended (so older variants keep their encoding); the CLI sends it only to
    /// coordinators of protocol version [`crate::EXECUTION_VERSION`] or later.
    ShowJobOutputs {
        job: JobId,
    },
    /// What a job's test and coverage reports say (`reports:`), as its last attempt
    /// that sent them reported. Appended, like `ShowJobOutputs`.
    ShowJobReport {
        job: JobId,
    },
}

/// Declares a struct with the fields given first, then what a [`SubmitRun`] says of
/// the run (`..submitted`), then the fields given after. The coordinator's stored run
/// record is declared with it too: it keeps what was submitted, between fields of its
/// own, and postcard reads fields by position, so one list keeps the two in step (the
/// store's tests pin the record's bytes, so a field added here is caught there before
/// it changes what is on disk).
#[macro_export]
macro_rules! submitted_run_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$before_attr:meta])* pub $before:ident: $before_type:ty,)*
            ..submitted,
            $($(#[$after_attr:meta])* pub $after:ident: $after_type:ty,)*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $($(#[$before_attr])* pub $before: $before_type,)*
            pub file_name: String,
            pub text: String,
            /// Branch or tag, e.g. `main` (the `branch` of conditions).
            pub git_ref: String,
            pub commit: Option<String>,
            /// `manual`, `push` or `schedule`.
            pub event: String,
            pub inputs: $crate::Labels,
            $($(#[$after_attr])* pub $after: $after_type,)*
        }
    };
}

submitted_run_struct! {
    /// A run to start: the pipeline file and where it comes from.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SubmitRun {
        ..submitted,
        /// The uploaded source tree the run's jobs start from, if any.
        pub source: Option<String>,
    }
}

/// Coordinator to admin CLI, one per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    TokenCreated(TokenCreated),
    Agents(Vec<AgentView>),
    Agent(AgentView),
    Status(StatusView),
    Audit(Vec<AuditView>),
    Validated {
        jobs: Vec<String>,
    },
    Run(RunView),
    Runs(Vec<RunView>),
    Job(JobView),
    Jobs(Vec<JobView>),
    /// Names of the stored secrets (never their values).
    Secrets(Vec<String>),
    Triggers(Vec<TriggerView>),
    Artifacts(Vec<ArtifactView>),
    Caches(Vec<CacheView>),
    Gc(GcReport),
    Environments(Vec<EnvironmentView>),
    Environment(EnvironmentView),
    Deployments(Vec<DeploymentView>),
    Deployment(DeploymentView),
    Stats(Vec<crate::deploy::DeliveryStats>),
    AdminIssued {
        certificate_pem: String,
        ca_certificate_pem: String,
    },
    Done {
        message: String,
    },
    Error(AdminError),
    LoginTokenCreated(crate::web::LoginTokenCreated),
    LoginTokens(Vec<crate::web::LoginTokenView>),
    WebhookAdded(crate::web::WebhookAdded),
    Webhooks(Vec<crate::web::WebhookView>),
    Repos(Vec<crate::repos::RepoView>),
    Repo(crate::repos::RepoView),
    /// A job's outputs (`ShowJobOutputs`); empty if it declares or reported none.
    JobOutputs(Labels),
    /// A job's test report (`ShowJobReport`); none if it declares or sent none.
    JobReport(Option<crate::TestReport>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token_id: TokenId,
    /// The whole token string to hand to `gantry-agent enroll --token`.
    pub token: String,
    pub expires_at: UnixMillis,
    pub uses: u32,
    pub labels: Labels,
}

/// An admin request that could not be done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    pub kind: AdminErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminErrorKind {
    NotFound,
    InvalidInput,
    Internal,
    /// The authorization table does not let the caller make this request.
    Forbidden,
}

/// A pipeline run as the CLI shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    pub run: RunId,
    pub pipeline: String,
    pub state: String,
    pub git_ref: String,
    pub commit: Option<String>,
    pub event: String,
    pub inputs: Labels,
    pub created_at: UnixMillis,
    pub finished_at: Option<UnixMillis>,
    pub created_by: String,
    pub jobs: Vec<JobView>,
}

/// Declares a struct that begins with a job's fields as [`JobView`] shows them, its
/// `state` of the type given, and goes on with the fields given. The coordinator's
/// stored job record is declared with it too: it is what the view shows plus what only
/// the store keeps, and postcard reads fields by position, so one list keeps the two in
/// step (the store's tests pin the record's bytes, so a field added here is caught
/// there before it changes what is on disk).
#[macro_export]
macro_rules! job_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            state: $state:ty,
            $($(#[$field_attr:meta])* pub $field:ident: $type:ty,)*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            pub job: $crate::JobId,
            pub name: String,
            pub needs: Vec<String>,
            pub state: $state,
            pub attempt: $crate::Attempt,
            pub agent: Option<$crate::AgentId>,
            pub exit_code: Option<i32>,
            pub started_at: Option<$crate::UnixMillis>,
            pub finished_at: Option<$crate::UnixMillis>,
            $($(#[$field_attr])* pub $field: $type,)*
        }
    };
}

job_struct! {
    /// A job as the CLI shows it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct JobView {
        state: String,
        pub log_bytes: u64,
        /// Part of this attempt's log could not be stored (the coordinator's disk was
        /// full): the log lacks its end until the agent's resend gets through.
        pub log_incomplete: bool,
    }
}

/// Where an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    Connected,
    Disconnected,
    Revoked,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Revoked => "revoked",
        }
    }
}

/// An agent as the admin CLI shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub agent_id: AgentId,
    pub hostname: String,
    pub state: AgentState,
    pub labels: Labels,
    pub capabilities: Vec<String>,
    pub slots: u32,
    pub agent_version: String,
    pub enrolled_at: UnixMillis,
    pub last_seen: Option<UnixMillis>,
    pub remote_address: Option<String>,
    pub figures: Option<HostFigures>,
    pub certificate_not_after: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub coordinator_version: String,
    pub protocol_version: u16,
    pub listen_address: String,
    pub uptime_secs: u64,
    pub agents_total: u64,
    pub agents_connected: u64,
    pub agents_revoked: u64,
    pub tokens_active: u64,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    pub at: UnixMillis,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// A pipeline registered for triggers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerView {
    pub name: String,
    pub file_name: String,
    /// Push filter as written (`branches`, `tags`, `paths`), empty if none.
    pub push: Option<String>,
    /// Cron expressions.
    pub schedules: Vec<String>,
    pub added_by: String,
    pub added_at: UnixMillis,
}

/// A piece of a source tree archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceData(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The coordinator's answer to an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceStored {
    /// Stored durably under this id (`sha256:<hex>` of the archive).
    Stored {
        source: String,
        bytes: u64,
    },
    Refused {
        message: String,
    },
}
