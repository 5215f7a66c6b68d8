//! Message types, one enum per direction and role.
//!
//! Control-stream conversation:
//! 1. the client sends a hello ([`crate::hello`]) whose [`Intent`] says what it is;
//! 2. the coordinator answers with one [`HelloReply`];
//! 3. an agent then sends [`AgentMessage`]s and receives [`CoordinatorMessage`]s, while
//!    an admin sends [`AdminRequest`]s and receives one [`AdminResponse`] for each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AgentId, TokenId, UnixMillis};

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token_id: TokenId,
    /// The token's secret, compared in constant time against its stored hash.
    pub token_secret: String,
    /// DER PKCS#10 request. Only its public key is used.
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
        csr_der: Vec<u8>,
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
}

/// Coordinator to admin CLI, one per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    TokenCreated(TokenCreated),
    Agents(Vec<AgentView>),
    Agent(AgentView),
    Status(StatusView),
    Audit(Vec<AuditView>),
    Error(AdminError),
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
