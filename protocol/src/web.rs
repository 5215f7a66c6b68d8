//! What the admin CLI and the coordinator agree on about the HTTP side's users and
//! outgoing notifications: dashboard login tokens and their roles, and webhook targets
//! with their delivery log.
//!
//! Only the shapes live here. What each role may do is the authorization table's
//! (`authz.rs`); how events are delivered is `coordinator/src/services/webhooks.rs`.

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// What a dashboard login may do. Ordered: each role can do everything the one before it
/// can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Also starts, retries and cancels runs and approves manual jobs.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    pub const ALL: [Self; 3] = [Self::Viewer, Self::Operator, Self::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role {:?}: use viewer, operator or admin",
                    s.chars().take(40).collect::<String>()
                )
            })
    }
}

/// A login token just issued. `token` is shown once; the coordinator keeps its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginTokenCreated {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub expires_at: UnixMillis,
    /// The whole token, to paste into the dashboard's login page.
    pub token: String,
}

/// A login token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginTokenView {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: UnixMillis,
    pub created_by: String,
    pub expires_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

/// How a webhook body is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebhookFormat {
    /// `{"event", "at", "summary", "data": {...}}`.
    Json,
    /// Slack's incoming-webhook shape, `{"text", "blocks"}` (Mattermost and Rocket.Chat
    /// read it too).
    Slack,
}

impl WebhookFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Slack => "slack",
        }
    }
}

impl std::str::FromStr for WebhookFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Self::Json),
            "slack" => Ok(Self::Slack),
            other => Err(format!(
                "unknown webhook format {:?}: use json or slack",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// A webhook target as listed, with its newest delivery results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookView {
    pub id: u64,
    pub url: String,
    pub format: WebhookFormat,
    /// Event kinds delivered (`run.finished`, ...); empty means every kind.
    pub events: Vec<String>,
    /// Whether HTTPS is verified against a CA given with `--ca` rather than the system's.
    pub custom_ca: bool,
    pub created_at: UnixMillis,
    pub created_by: String,
    /// Newest last.
    pub deliveries: Vec<DeliveryView>,
}

/// One delivery attempt of one event to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryView {
    pub at: UnixMillis,
    pub event: String,
    /// 1 for the first try.
    pub attempt: u32,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why the attempt failed (connection, TLS, timeout, status), if it did.
    pub error: Option<String>,
    pub duration_ms: u64,
    /// `delivered`, `retrying` or `failed` (no attempt left, or a status not worth
    /// retrying).
    pub outcome: String,
}

/// A webhook target just added; `secret` (the HMAC key) is shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookAdded {
    pub webhook: WebhookView,
    pub secret: String,
}
