//! Who may do what: **the authorization table** of Gantry, in one place.
//!
//! Every request the coordinator serves is one [`Request`]: the hello of each kind of
//! session, every [`AdminRequest`], every [`StreamOpen`] (split by the grant it names
//! where the grant changes who may use it), every agent control message that touches
//! work, and every HTTP route. [`Request::who_may`] says which [`Principal`]s may make
//! it; the coordinator asks [`Request::allows`] (through `coordinator/src/base/authz.rs`,
//! which also counts every decision) on every path, and never decides by itself.
//!
//! A principal is what the coordinator can tell about a caller from its credential and
//! from the work the request names:
//! - [`Principal::None`]: no certificate on QUIC, no (valid) login on HTTP;
//! - [`Principal::Agent`]: an agent certificate; for a request that names work (a job
//!   attempt, a deployment, an exec, an upload session), the agent that holds it;
//! - [`Principal::OtherAgent`]: an agent certificate whose agent does not hold that work;
//! - [`Principal::Viewer`], [`Principal::Operator`]: a dashboard login token's role
//!   (HTTP only);
//! - [`Principal::Admin`]: an admin certificate (QUIC) or an admin login token (HTTP).
//!
//! Certificates are QUIC credentials and login tokens HTTP ones. A caller without a
//! credential for a request's channel is `none` there, so on a QUIC-only row the viewer
//! and operator cells equal the `none` cell, and on an HTTP-only row both agent cells do
//! ([`quic`] and [`http`] write the rows that way; a unit test holds every row to it).
//!
//! Adding a variant to `AdminRequest`, `StreamOpen` or `AgentMessage` fails to compile
//! until [`Request::of_admin`], [`Request::of_stream`] or [`Request::of_agent_message`]
//! maps it to a row, and a new row fails to compile until [`Request::who_may`] gives it
//! an entry; `tests/tests/authz.rs` performs every row as every principal against the
//! real binary and checks the answer, and the count of decisions, against this table.

use crate::transfer::{Grant, ResolveRequest};
use crate::web::Role;
use crate::{AdminRequest, AgentMessage, StreamOpen};

/// Who is asking, as far as authorization is concerned (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    None,
    Agent,
    OtherAgent,
    Viewer,
    Operator,
    Admin,
}

impl Principal {
    pub const ALL: [Self; 6] = [
        Self::None,
        Self::Agent,
        Self::OtherAgent,
        Self::Viewer,
        Self::Operator,
        Self::Admin,
    ];

    /// The label in metrics and in ARCHITECTURE.md's table.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Agent => "agent",
            Self::OtherAgent => "other-agent",
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// The principal of a dashboard login with `role`.
    pub const fn of_role(role: Role) -> Self {
        match role {
            Role::Viewer => Self::Viewer,
            Role::Operator => Self::Operator,
            Role::Admin => Self::Admin,
        }
    }

    /// An agent, classified by whether it holds the work a request names.
    pub const fn agent(holds: bool) -> Self {
        if holds {
            Self::Agent
        } else {
            Self::OtherAgent
        }
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    fn phrase(self) -> &'static str {
        match self {
            Self::None => "an unauthenticated client",
            Self::Agent => "an agent",
            Self::OtherAgent => "an agent that does not hold this work",
            Self::Viewer => "a viewer",
            Self::Operator => "an operator",
            Self::Admin => "an admin",
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of principals: one row of the table.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Who(u8);

impl Who {
    pub const NOBODY: Self = Self(0);
    pub const NONE: Self = Self(Principal::None.bit());
    /// The agent holding the work the request names.
    pub const AGENT: Self = Self(Principal::Agent.bit());
    pub const OTHER_AGENT: Self = Self(Principal::OtherAgent.bit());
    pub const VIEWER: Self = Self(Principal::Viewer.bit());
    pub const OPERATOR: Self = Self(Principal::Operator.bit());
    pub const ADMIN: Self = Self(Principal::Admin.bit());
    /// Any enrolled agent, whatever it holds (requests that name no work).
    pub const ANY_AGENT: Self = Self::AGENT.or(Self::OTHER_AGENT);
    /// Every dashboard role.
    pub const READERS: Self = Self::VIEWER.or(Self::OPERATOR).or(Self::ADMIN);
    pub const OPERATORS: Self = Self::OPERATOR.or(Self::ADMIN);
    pub const EVERYONE: Self = Self(0b11_1111);

    #[must_use]
    pub const fn or(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn allows(self, principal: Principal) -> bool {
        self.0 & principal.bit() != 0
    }

    pub fn principals(self) -> impl Iterator<Item = Principal> {
        Principal::ALL.into_iter().filter(move |p| self.allows(*p))
    }
}

impl std::fmt::Debug for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("nobody");
        }
        let names: Vec<&str> = self.principals().map(Principal::as_str).collect();
        f.write_str(&names.join(", "))
    }
}

/// A QUIC-only row: a login token is no QUIC credential, so a viewer or operator there
/// is `none` and gets what `none` gets.
pub const fn quic(who: Who) -> Who {
    if who.allows(Principal::None) {
        who.or(Who::VIEWER).or(Who::OPERATOR)
    } else {
        Who(who.0 & !(Who::VIEWER.0 | Who::OPERATOR.0))
    }
}

/// An HTTP-only row: agents hold no login token, so on HTTP they are `none`.
pub const fn http(who: Who) -> Who {
    if who.allows(Principal::None) {
        who.or(Who::ANY_AGENT)
    } else {
        Who(who.0 & !Who::ANY_AGENT.0)
    }
}

/// Where a request travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A QUIC connection: the hello, admin requests, streams, agent messages.
    Quic,
    /// The HTTP side only.
    Http,
    /// An admin request the dashboard also issues, as the logged-in user.
    Both,
}

macro_rules! requests {
    ($($variant:ident = $name:literal, $what:literal;)*) => {
        /// One row of the authorization table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Request {
            $(#[doc = $what] $variant,)*
        }

        impl Request {
            /// Every row, in order; `ALL[r.index()] == r`.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The row's name, as in metrics: `admin.create_token`, `stream.logs`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// What the request does, for people.
            pub const fn what(self) -> &'static str {
                match self {
                    $(Self::$variant => $what,)*
                }
            }
        }
    };
}

requests! {
    SessionEnroll = "session.enroll", "enroll with a join token and a CSR";
    SessionAgent = "session.agent", "open an agent session";
    SessionAdmin = "session.admin", "open an admin session";

    AdminCreateToken = "admin.create_token", "create a join token";
    AdminListAgents = "admin.list_agents", "list agents";
    AdminShowAgent = "admin.show_agent", "show an agent";
    AdminRevokeAgent = "admin.revoke_agent", "revoke an agent";
    AdminLabelAgent = "admin.label_agent", "label an agent";
    AdminStatus = "admin.status", "show the coordinator's status";
    AdminAudit = "admin.audit", "read the audit log";
    AdminValidate = "admin.validate", "validate a pipeline file";
    AdminSubmitRun = "admin.submit_run", "start a run";
    AdminListRuns = "admin.list_runs", "list runs";
    AdminShowRun = "admin.show_run", "show a run";
    AdminCancelRun = "admin.cancel_run", "cancel a run";
    AdminRetryRun = "admin.retry_run", "retry a run";
    AdminListJobs = "admin.list_jobs", "list jobs";
    AdminShowJob = "admin.show_job", "show a job";
    AdminApprove = "admin.approve", "approve a manual job";
    AdminAddTrigger = "admin.add_trigger", "register a pipeline's triggers";
    AdminListTriggers = "admin.list_triggers", "list triggers";
    AdminRemoveTrigger = "admin.remove_trigger", "remove a trigger";
    AdminSetSecret = "admin.set_secret", "store a secret";
    AdminListSecrets = "admin.list_secrets", "list secret names";
    AdminRemoveSecret = "admin.remove_secret", "remove a secret";
    AdminListArtifacts = "admin.list_artifacts", "list a run's artifacts";
    AdminListCaches = "admin.list_caches", "list caches";
    AdminRemoveCache = "admin.remove_cache", "remove caches";
    AdminPutEnvironment = "admin.put_environment", "create or change an environment";
    AdminListEnvironments = "admin.list_environments", "list environments";
    AdminShowEnvironment = "admin.show_environment", "show an environment";
    AdminListDeployments = "admin.list_deployments", "list deployments";
    AdminShowDeployment = "admin.show_deployment", "show a deployment";
    AdminApproveDeployment = "admin.approve_deployment", "approve a deployment";
    AdminPromoteDeployment = "admin.promote_deployment", "promote a paused deployment";
    AdminAbortDeployment = "admin.abort_deployment", "abort a deployment";
    AdminRollback = "admin.rollback", "roll an environment back";
    AdminUpgradeAgents = "admin.upgrade_agents", "upgrade agents";
    AdminStats = "admin.stats", "read delivery figures";
    AdminIssueAdmin = "admin.issue_admin", "issue another admin's certificate";
    AdminGc = "admin.gc", "collect garbage";
    AdminCreateLoginToken = "admin.create_login_token", "issue a dashboard login token";
    AdminListLoginTokens = "admin.list_login_tokens", "list login tokens";
    AdminRevokeLoginToken = "admin.revoke_login_token", "revoke a login token";
    AdminAddWebhook = "admin.add_webhook", "add a webhook target";
    AdminListWebhooks = "admin.list_webhooks", "list webhook targets";
    AdminRemoveWebhook = "admin.remove_webhook", "remove a webhook target";
    AdminAddRepo = "admin.add_repo", "add a repository";
    AdminListRepos = "admin.list_repos", "list repositories";
    AdminShowRepo = "admin.show_repo", "show a repository";
    AdminRemoveRepo = "admin.remove_repo", "remove a repository";
    AdminRunRepo = "admin.run_repo", "run a repository's pipeline at a ref";

    StreamLogs = "stream.logs", "upload a job attempt's log";
    StreamFollowLogs = "stream.follow_logs", "follow a job's log";
    StreamFollowRun = "stream.follow_run", "follow a run";
    StreamUploadSource = "stream.upload_source", "upload a source tree";
    StreamFetchSource = "stream.fetch_source", "fetch a job attempt's source tree";
    StreamResolveJobArtifacts = "stream.resolve_job_artifacts", "resolve a job attempt's artifacts";
    StreamResolveCache = "stream.resolve_cache", "resolve a job attempt's cache";
    StreamResolveArtifact = "stream.resolve_artifact", "resolve an artifact by run and name";
    StreamGetManifestJob = "stream.get_manifest.job", "read a manifest for a job attempt";
    StreamGetManifestDeploy = "stream.get_manifest.deploy", "read a deployment's release manifest";
    StreamGetManifestAdmin = "stream.get_manifest.admin", "read any manifest";
    StreamFetchChunksJob = "stream.fetch_chunks.job", "fetch chunks for a job attempt";
    StreamFetchChunksDeploy = "stream.fetch_chunks.deploy", "fetch a deployment's release chunks";
    StreamFetchChunksAdmin = "stream.fetch_chunks.admin", "fetch any chunks";
    StreamUploadJob = "stream.upload.job", "upload a job attempt's artifact or cache";
    StreamUploadDeploy = "stream.upload.deploy", "upload under a deploy grant";
    StreamUploadAdmin = "stream.upload.admin", "upload under an admin grant";
    StreamPutChunks = "stream.put_chunks", "send chunks into an upload session";
    StreamExec = "stream.exec", "run a command on hosts";
    StreamFetchAgentBinary = "stream.fetch_agent_binary", "fetch the agent binary";
    StreamReports = "stream.reports", "send a job attempt's test and coverage reports";

    AgentJobAccepted = "agent.job_accepted", "accept a job attempt";
    AgentJobRejected = "agent.job_rejected", "reject a job attempt";
    AgentJobFinished = "agent.job_finished", "report a job attempt's result";
    AgentDeployResult = "agent.deploy_result", "report a deployment step's result";
    AgentExecOutput = "agent.exec_output", "send an exec's output";
    AgentExecDone = "agent.exec_done", "end an exec on a host";

    HttpPage = "http.page", "load a dashboard page";
    HttpAsset = "http.asset", "load a dashboard asset";
    HttpLogin = "http.login", "log in to the dashboard";
    HttpLogout = "http.logout", "log out of the dashboard";
    HttpMe = "http.me", "read who is logged in";
    HttpDeployments = "http.deployments", "list deployments on the dashboard";
    HttpRunEvents = "http.run_events", "stream a run's progress";
    HttpJobLog = "http.job_log", "stream a job's log";
    HttpHealthz = "http.healthz", "check liveness";
    HttpReadyz = "http.readyz", "check readiness";
    HttpMetrics = "http.metrics", "read metrics";
    HttpPushHook = "http.push_hook", "deliver a push webhook";
    HttpRepoHook = "http.repo_hook", "deliver a repository's forge webhook";
    HttpInstallScript = "http.install_script", "download the installer";
    HttpCaPem = "http.ca_pem", "download the CA certificate";
    HttpAgentBinary = "http.agent_binary", "download the agent binary";
    HttpAgentUnit = "http.agent_unit", "download the agent's systemd unit";
    HttpAgentEnv = "http.agent_env", "download the agent's options file";
}

impl Request {
    /// **The table.** No wildcard: a new row must say who may make it.
    // Rows with the same answer stay apart when their reasons differ (the comments).
    #[allow(clippy::match_same_arms)]
    pub const fn who_may(self) -> Who {
        use Request as R;
        match self {
            R::SessionEnroll => quic(Who::NONE),
            R::SessionAgent => quic(Who::ANY_AGENT),
            R::SessionAdmin => quic(Who::ADMIN),

            // What the dashboard shows and does, as the logged-in user; the rest is the
            // admin CLI's alone.
            R::AdminListAgents | R::AdminListRuns | R::AdminShowRun | R::AdminShowJob => {
                Who::READERS
            }
            R::AdminRetryRun | R::AdminCancelRun | R::AdminApprove => Who::OPERATORS,
            R::AdminCreateToken
            | R::AdminShowAgent
            | R::AdminRevokeAgent
            | R::AdminLabelAgent
            | R::AdminStatus
            | R::AdminAudit
            | R::AdminValidate
            | R::AdminSubmitRun
            | R::AdminListJobs
            | R::AdminAddTrigger
            | R::AdminListTriggers
            | R::AdminRemoveTrigger
            | R::AdminSetSecret
            | R::AdminListSecrets
            | R::AdminRemoveSecret
            | R::AdminListArtifacts
            | R::AdminListCaches
            | R::AdminRemoveCache
            | R::AdminPutEnvironment
            | R::AdminListEnvironments
            | R::AdminShowEnvironment
            | R::AdminListDeployments
            | R::AdminShowDeployment
            | R::AdminApproveDeployment
            | R::AdminPromoteDeployment
            | R::AdminAbortDeployment
            | R::AdminRollback
            | R::AdminUpgradeAgents
            | R::AdminStats
            | R::AdminIssueAdmin
            | R::AdminGc
            | R::AdminCreateLoginToken
            | R::AdminListLoginTokens
            | R::AdminRevokeLoginToken
            | R::AdminAddWebhook
            | R::AdminListWebhooks
            | R::AdminRemoveWebhook
            | R::AdminAddRepo
            | R::AdminListRepos
            | R::AdminShowRepo
            | R::AdminRemoveRepo
            | R::AdminRunRepo => Who::ADMIN,

            // The holder: the agent the attempt was handed to (a log or result may come
            // after the attempt ended, from the agent's spool).
            R::StreamLogs | R::StreamFetchSource | R::StreamReports => quic(Who::AGENT),
            R::StreamFollowLogs | R::StreamFollowRun | R::StreamUploadSource | R::StreamExec => {
                quic(Who::ADMIN)
            }
            // The holder: the agent the attempt is running on.
            R::StreamResolveJobArtifacts | R::StreamResolveCache | R::StreamUploadJob => {
                quic(Who::AGENT)
            }
            R::StreamResolveArtifact | R::StreamGetManifestAdmin | R::StreamFetchChunksAdmin => {
                quic(Who::ADMIN)
            }
            // Admins read anything, whatever grant they name; for a deploy grant the
            // holder is a target host of the running deployment.
            R::StreamGetManifestJob
            | R::StreamFetchChunksJob
            | R::StreamGetManifestDeploy
            | R::StreamFetchChunksDeploy => quic(Who::AGENT.or(Who::ADMIN)),
            // Uploads are made by the job that declares them, never under another grant.
            R::StreamUploadDeploy | R::StreamUploadAdmin => quic(Who::NOBODY),
            // The holder: the connection that opened the upload session.
            R::StreamPutChunks => quic(Who::AGENT),
            // Names no work: any enrolled agent may upgrade itself.
            R::StreamFetchAgentBinary => quic(Who::ANY_AGENT),

            // The holder: the agent the attempt was handed to; for a deployment, a target
            // host; for an exec, a host it was sent to.
            R::AgentJobAccepted
            | R::AgentJobRejected
            | R::AgentJobFinished
            | R::AgentDeployResult
            | R::AgentExecOutput
            | R::AgentExecDone => quic(Who::AGENT),

            // The page shell and assets hold no data; what new hosts download, health and
            // metrics are public by design (a host has no credential yet; Prometheus
            // scrapes without one). A push webhook is authenticated by its signature, not
            // by a principal: anyone holding the webhook secret may deliver one (a repository's
            // webhook: its own secret).
            R::HttpPage
            | R::HttpAsset
            | R::HttpHealthz
            | R::HttpReadyz
            | R::HttpMetrics
            | R::HttpPushHook
            | R::HttpRepoHook
            | R::HttpInstallScript
            | R::HttpCaPem
            | R::HttpAgentBinary
            | R::HttpAgentUnit
            | R::HttpAgentEnv => http(Who::EVERYONE),
            // The login's principal is the token in its body.
            R::HttpLogin
            | R::HttpLogout
            | R::HttpMe
            | R::HttpDeployments
            | R::HttpRunEvents
            | R::HttpJobLog => http(Who::READERS),
        }
    }

    /// Whether `principal` may make this request.
    pub const fn allows(self, principal: Principal) -> bool {
        self.who_may().allows(principal)
    }

    /// Position in [`Self::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Where the request travels.
    pub const fn channel(self) -> Channel {
        match (self.http_route().is_some(), self.is_admin_request()) {
            (true, true) => Channel::Both,
            (true, false) => Channel::Http,
            (false, _) => Channel::Quic,
        }
    }

    /// Whether the row is an [`AdminRequest`]'s (named `admin.*`).
    pub const fn is_admin_request(self) -> bool {
        let name = self.name().as_bytes();
        let prefix = b"admin.";
        if name.len() < prefix.len() {
            return false;
        }
        let mut i = 0;
        while i < prefix.len() {
            if name[i] != prefix[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    /// Whether the request names work its principal may or may not hold, so `agent` and
    /// `other agent` can differ.
    pub const fn names_work(self) -> bool {
        use Request as R;
        matches!(
            self,
            R::StreamLogs
                | R::StreamFetchSource
                | R::StreamReports
                | R::StreamResolveJobArtifacts
                | R::StreamResolveCache
                | R::StreamGetManifestJob
                | R::StreamGetManifestDeploy
                | R::StreamFetchChunksJob
                | R::StreamFetchChunksDeploy
                | R::StreamUploadJob
                | R::StreamPutChunks
                | R::AgentJobAccepted
                | R::AgentJobRejected
                | R::AgentJobFinished
                | R::AgentDeployResult
                | R::AgentExecOutput
                | R::AgentExecDone
        )
    }

    /// The HTTP method and path template (`{run}`, `{job}`) of a request the HTTP side
    /// serves. The dashboard's, `http.rs`'s and `distribute.rs`'s routers are checked
    /// against it by a test in `coordinator/src/edges/http/server.rs`.
    pub const fn http_route(self) -> Option<(&'static str, &'static str)> {
        use Request as R;
        Some(match self {
            R::AdminListAgents => ("GET", "/api/agents"),
            R::AdminListRuns => ("GET", "/api/runs"),
            R::AdminShowRun => ("GET", "/api/runs/{run}"),
            R::AdminShowJob => ("GET", "/api/jobs/{job}"),
            R::AdminRetryRun => ("POST", "/api/runs/{run}/retry"),
            R::AdminCancelRun => ("POST", "/api/runs/{run}/cancel"),
            R::AdminApprove => ("POST", "/api/jobs/{job}/approve"),
            R::HttpPage => ("GET", "/"),
            R::HttpAsset => ("GET", "/assets/app.js"),
            R::HttpLogin => ("POST", "/api/login"),
            R::HttpLogout => ("POST", "/api/logout"),
            R::HttpMe => ("GET", "/api/me"),
            R::HttpDeployments => ("GET", "/api/deployments"),
            R::HttpRunEvents => ("GET", "/api/runs/{run}/events"),
            R::HttpJobLog => ("GET", "/api/jobs/{job}/log"),
            R::HttpHealthz => ("GET", "/healthz"),
            R::HttpReadyz => ("GET", "/readyz"),
            R::HttpMetrics => ("GET", "/metrics"),
            R::HttpPushHook => ("POST", "/hooks/push"),
            R::HttpRepoHook => ("POST", "/hooks/repos/authz"),
            R::HttpInstallScript => ("GET", "/install.sh"),
            R::HttpCaPem => ("GET", "/ca.pem"),
            R::HttpAgentBinary => ("GET", "/agent/gantry-agent"),
            R::HttpAgentUnit => ("GET", "/agent/gantry-agent.service"),
            R::HttpAgentEnv => ("GET", "/agent/agent.env"),
            _ => return None,
        })
    }

    /// The row of an admin request.
    pub const fn of_admin(request: &AdminRequest) -> Self {
        use AdminRequest as A;
        use Request as R;
        match request {
            A::CreateToken { .. } => R::AdminCreateToken,
            A::ListAgents => R::AdminListAgents,
            A::ShowAgent { .. } => R::AdminShowAgent,
            A::RevokeAgent { .. } => R::AdminRevokeAgent,
            A::LabelAgent { .. } => R::AdminLabelAgent,
            A::Status => R::AdminStatus,
            A::Audit { .. } => R::AdminAudit,
            A::Validate { .. } => R::AdminValidate,
            A::SubmitRun(_) => R::AdminSubmitRun,
            A::ListRuns { .. } => R::AdminListRuns,
            A::ShowRun { .. } => R::AdminShowRun,
            A::CancelRun { .. } => R::AdminCancelRun,
            A::RetryRun { .. } => R::AdminRetryRun,
            A::ListJobs { .. } => R::AdminListJobs,
            A::ShowJob { .. } | A::ShowJobOutputs { .. } | A::ShowJobReport { .. } => {
                R::AdminShowJob
            }
            A::Approve { .. } => R::AdminApprove,
            A::AddTrigger { .. } => R::AdminAddTrigger,
            A::ListTriggers => R::AdminListTriggers,
            A::RemoveTrigger { .. } => R::AdminRemoveTrigger,
            A::SetSecret { .. } => R::AdminSetSecret,
            A::ListSecrets => R::AdminListSecrets,
            A::RemoveSecret { .. } => R::AdminRemoveSecret,
            A::ListArtifacts { .. } => R::AdminListArtifacts,
            A::ListCaches => R::AdminListCaches,
            A::RemoveCache { .. } => R::AdminRemoveCache,
            A::PutEnvironment { .. } => R::AdminPutEnvironment,
            A::ListEnvironments => R::AdminListEnvironments,
            A::ShowEnvironment { .. } => R::AdminShowEnvironment,
            A::ListDeployments { .. } => R::AdminListDeployments,
            A::ShowDeployment { .. } => R::AdminShowDeployment,
            A::ApproveDeployment { .. } => R::AdminApproveDeployment,
            A::PromoteDeployment { .. } => R::AdminPromoteDeployment,
            A::AbortDeployment { .. } => R::AdminAbortDeployment,
            A::Rollback(_) => R::AdminRollback,
            A::UpgradeAgents { .. } => R::AdminUpgradeAgents,
            A::Stats { .. } => R::AdminStats,
            A::IssueAdmin { .. } => R::AdminIssueAdmin,
            A::Gc { .. } => R::AdminGc,
            A::CreateLoginToken { .. } => R::AdminCreateLoginToken,
            A::ListLoginTokens => R::AdminListLoginTokens,
            A::RevokeLoginToken { .. } => R::AdminRevokeLoginToken,
            A::AddWebhook { .. } => R::AdminAddWebhook,
            A::ListWebhooks => R::AdminListWebhooks,
            A::RemoveWebhook { .. } => R::AdminRemoveWebhook,
            A::AddRepo(_) => R::AdminAddRepo,
            A::ListRepos => R::AdminListRepos,
            A::ShowRepo { .. } => R::AdminShowRepo,
            A::RemoveRepo { .. } => R::AdminRemoveRepo,
            A::RunRepo(_) => R::AdminRunRepo,
        }
    }

    /// The row of a stream's first frame.
    pub const fn of_stream(open: &StreamOpen) -> Self {
        use Request as R;
        use StreamOpen as S;
        match open {
            S::Logs { .. } => R::StreamLogs,
            S::FollowLogs { .. } => R::StreamFollowLogs,
            S::FollowRun { .. } => R::StreamFollowRun,
            S::UploadSource { .. } => R::StreamUploadSource,
            S::FetchSource { .. } => R::StreamFetchSource,
            S::Reports { .. } => R::StreamReports,
            S::Resolve(ResolveRequest::JobArtifacts { .. }) => R::StreamResolveJobArtifacts,
            S::Resolve(ResolveRequest::Cache { .. }) => R::StreamResolveCache,
            S::Resolve(ResolveRequest::Artifact { .. }) => R::StreamResolveArtifact,
            S::GetManifest { grant, .. } => match grant {
                Grant::Job { .. } => R::StreamGetManifestJob,
                Grant::Deploy { .. } => R::StreamGetManifestDeploy,
                Grant::Admin => R::StreamGetManifestAdmin,
            },
            S::FetchChunks { grant, .. } => match grant {
                Grant::Job { .. } => R::StreamFetchChunksJob,
                Grant::Deploy { .. } => R::StreamFetchChunksDeploy,
                Grant::Admin => R::StreamFetchChunksAdmin,
            },
            S::Upload { grant, .. } => match grant {
                Grant::Job { .. } => R::StreamUploadJob,
                Grant::Deploy { .. } => R::StreamUploadDeploy,
                Grant::Admin => R::StreamUploadAdmin,
            },
            S::PutChunks { .. } => R::StreamPutChunks,
            S::Exec(_) => R::StreamExec,
            S::FetchAgentBinary { .. } => R::StreamFetchAgentBinary,
        }
    }

    /// The row of an agent control message that touches work; `None` for those that
    /// touch only the sending agent itself (a heartbeat, renewing its own certificate),
    /// which its session already allows.
    pub const fn of_agent_message(message: &AgentMessage) -> Option<Self> {
        use AgentMessage as M;
        use Request as R;
        Some(match message {
            M::Heartbeat(_) | M::RenewCertificate { .. } => return None,
            M::JobAccepted { .. } => R::AgentJobAccepted,
            M::JobRejected { .. } => R::AgentJobRejected,
            M::JobFinished(_) | M::JobFinishedWithOutputs { .. } => R::AgentJobFinished,
            M::DeployResult(_) => R::AgentDeployResult,
            M::ExecOutput { .. } => R::AgentExecOutput,
            M::ExecDone { .. } => R::AgentExecDone,
        })
    }

    /// Checks `principal` against the table; the error says who was refused what and why
    /// (`detail`, e.g. why an agent does not hold the work).
    pub fn check(
        self,
        principal: Principal,
        detail: impl FnOnce() -> String,
    ) -> Result<(), Denied> {
        if self.allows(principal) {
            Ok(())
        } else {
            Err(Denied {
                request: self,
                principal,
                detail: detail(),
            })
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A request the table refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Denied {
    pub request: Request,
    pub principal: Principal,
    /// Why, beyond the table: e.g. which agent holds the work instead.
    pub detail: String,
}

impl Denied {
    /// The words every refusal by the table carries, whatever its detail.
    pub fn marker(request: Request) -> String {
        format!("may not {} ({})", request.what(), request.name())
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.detail.is_empty() {
            write!(f, "{}: ", self.detail)?;
        }
        write!(
            f,
            "{} {}; the authorization table allows {}",
            self.principal.phrase(),
            Self::marker(self.request),
            self.request.who_may()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_numbered_in_order_and_named_once() {
        for (i, r) in Request::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        let mut names: Vec<&str> = Request::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Request::ALL.len(), "row names are unique");
    }

    /// A credential that cannot be presented on a channel changes nothing there.
    #[test]
    fn a_principal_without_a_credential_for_the_channel_is_none_there() {
        for r in Request::ALL {
            let who = r.who_may();
            let none = who.allows(Principal::None);
            match r.channel() {
                Channel::Quic => {
                    for p in [Principal::Viewer, Principal::Operator] {
                        assert_eq!(who.allows(p), none, "{r}: {p} on QUIC is none");
                    }
                }
                Channel::Http => {
                    for p in [Principal::Agent, Principal::OtherAgent] {
                        assert_eq!(who.allows(p), none, "{r}: {p} on HTTP is none");
                    }
                }
                Channel::Both => {
                    assert!(!none, "{r}: an admin request needs a credential");
                }
            }
        }
    }

    #[test]
    fn only_requests_that_name_work_tell_the_holder_from_other_agents() {
        for r in Request::ALL {
            let who = r.who_may();
            if r.names_work() {
                assert!(
                    !who.allows(Principal::OtherAgent),
                    "{r}: an agent never touches work it does not hold"
                );
            } else {
                assert_eq!(
                    who.allows(Principal::Agent),
                    who.allows(Principal::OtherAgent),
                    "{r} names no work"
                );
            }
        }
    }

    #[test]
    fn the_invariants_of_design_md_hold() {
        for r in Request::ALL {
            let who = r.who_may();
            // An unauthenticated connection can do nothing but present a join token and a
            // CSR (on QUIC), or read what is public by design (on HTTP).
            if who.allows(Principal::None) {
                assert!(
                    *r == Request::SessionEnroll || r.channel() == Channel::Http,
                    "{r} is open to unauthenticated clients"
                );
            }
            // A viewer changes nothing.
            if who.allows(Principal::Viewer) && r.channel() == Channel::Both {
                assert!(
                    r.name().starts_with("admin.list") || r.name().starts_with("admin.show"),
                    "{r}: a viewer may only read"
                );
            }
            // Roles are ordered: whatever a viewer may do through the dashboard, an
            // operator and an admin may too.
            if r.channel() != Channel::Quic {
                if who.allows(Principal::Viewer) {
                    assert!(who.allows(Principal::Operator), "{r}");
                }
                if who.allows(Principal::Operator) {
                    assert!(who.allows(Principal::Admin), "{r}");
                }
            }
        }
        assert!(!Request::SessionAdmin.allows(Principal::Agent));
        assert!(!Request::SessionAgent.allows(Principal::Admin));
        assert!(!Request::SessionEnroll.allows(Principal::Agent));
    }

    #[test]
    fn refusals_say_who_was_refused_what_and_who_may() {
        let denied = Request::StreamLogs
            .check(Principal::OtherAgent, || {
                "attempt 1 of job 3.0 was not handed to ag-1".into()
            })
            .expect_err("refused");
        let text = denied.to_string();
        assert!(
            text.starts_with("attempt 1 of job 3.0 was not handed to ag-1: "),
            "{text}"
        );
        assert!(
            text.contains(&Denied::marker(Request::StreamLogs)),
            "{text}"
        );
        assert!(text.ends_with("allows agent"), "{text}");
        assert!(Request::StreamLogs
            .check(Principal::Agent, String::new)
            .is_ok());
        assert_eq!(Who::READERS.to_string(), "viewer, operator, admin");
        assert_eq!(Who::NOBODY.to_string(), "nobody");
    }
}
