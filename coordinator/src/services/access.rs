//! Who may connect, and as whom: join tokens and enrollment, agent certificate renewal,
//! admin certificates, and dashboard login tokens. The one module that signs
//! certificates with the coordinator's CA.
//!
//! Owns the checks made before a credential exists: an enrollment stores nothing and
//! signs nothing unless the token is known, unexpired and not used up and the CSR is
//! acceptable, and the commit (which spends the token) is durable; a certificate keeps
//! only the CSR's public key (`gantry_certs` sets every other field). Login tokens are
//! stored as SHA-256 of their secret; checking a presented one is the HTTP side's
//! (`edges::http::auth`), with [`LoginToken::parse`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry_certs::{CertAuthority, Identity, JoinToken};
use gantry_protocol::{
    AdminErrorKind, AgentId, CoordinatorMessage, EnrollRequest, Enrolled, Labels,
    LoginTokenCreated, LoginTokenView, Refusal, RefusalReason, Role, TokenCreated, TokenId,
    UnixMillis,
};

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::base::labels::{check_labels, LabelError};
use crate::services::runner::deploy_runner;
use crate::store::{AgentRecord, LoginTokenRecord, Store, StoreError, TokenRecord, TokenRefusal};

/// Longest join token lifetime and use count an admin may ask for.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
pub const MAX_TOKEN_USES: u32 = 100_000;
/// Prefix of a login token string; the version lets the format change later.
pub const TOKEN_PREFIX: &str = "glt1_";
/// Longest login token lifetime.
pub const MAX_LOGIN_TTL: Duration = Duration::from_secs(365 * 86_400);
/// Longest login token name.
const MAX_NAME_LEN: usize = 64;

/// Why an access request failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("token lifetime must be between 1s and {}d", MAX_TOKEN_TTL.as_secs() / 86_400)]
    TokenLifetime,
    #[error("token uses must be between 1 and {MAX_TOKEN_USES}")]
    TokenUses,
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("invalid admin name {0:?}: use 1 to 64 of a-z 0-9 . _ -")]
    AdminName(String),
    #[error("certificate request refused: {0}")]
    Csr(gantry_certs::CsrError),
    #[error("a login token's name must be 1 to {MAX_NAME_LEN} printable characters without ':'")]
    LoginName,
    #[error("a login token's lifetime must be between 1s and {}d", MAX_LOGIN_TTL.as_secs() / 86_400)]
    LoginLifetime,
    #[error("no login token {0:?}; `gantry admin token list` shows them")]
    NoLoginToken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminFailure for AccessError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::NoLoginToken(_) => AdminErrorKind::NotFound,
            Self::Store(_) => AdminErrorKind::Internal,
            _ => AdminErrorKind::InvalidInput,
        }
    }
}

/// A login token taken apart: `glt1_<16 hex id>_<64 hex secret>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginToken {
    /// `lt-<16 hex>`.
    pub id: String,
    /// 64 lower-case hex digits.
    pub secret: String,
}

/// Why a presented login token is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedLoginToken {
    #[error("a login token starts with {TOKEN_PREFIX}; copy the whole token `gantry admin token` printed")]
    NoPrefix,
    #[error("malformed login token; copy the whole token `gantry admin token` printed")]
    Shape,
}

impl LoginToken {
    pub fn generate() -> Self {
        Self {
            id: format!(
                "lt-{}",
                gantry_certs::hex(&gantry_certs::random_bytes::<8>())
            ),
            secret: gantry_certs::hex(&gantry_certs::random_bytes::<32>()),
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "{TOKEN_PREFIX}{}_{}",
            self.id.trim_start_matches("lt-"),
            self.secret
        )
    }

    /// Parses a token string, checking its shape only.
    pub fn parse(text: &str) -> Result<Self, MalformedLoginToken> {
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(MalformedLoginToken::NoPrefix)?;
        match body.split_once('_') {
            Some((id, secret)) if hex(id, 16) && hex(secret, 64) => Ok(Self {
                id: format!("lt-{id}"),
                secret: secret.to_owned(),
            }),
            _ => Err(MalformedLoginToken::Shape),
        }
    }
}

/// The access service; one per coordinator.
#[derive(Debug)]
pub struct Access {
    store: Arc<Store>,
    ca: CertAuthority,
    /// Lifetime of agent certificates (agents renew at two thirds of it).
    agent_cert_ttl: Duration,
    /// `host:port` agents dial, carried in join tokens.
    advertise: String,
}

impl Access {
    pub fn new(
        store: Arc<Store>,
        ca: CertAuthority,
        agent_cert_ttl: Duration,
        advertise: String,
    ) -> Self {
        Self {
            store,
            ca,
            agent_cert_ttl,
            advertise,
        }
    }

    /// `gantry token create`: a join token for `uses` enrollments within `ttl_secs`,
    /// giving the agents it enrolls `labels`.
    pub fn create_join_token(
        &self,
        cx: &Acting<'_>,
        ttl_secs: u64,
        uses: u32,
        labels: &Labels,
    ) -> Result<TokenCreated, AccessError> {
        if ttl_secs == 0 || ttl_secs > MAX_TOKEN_TTL.as_secs() {
            return Err(AccessError::TokenLifetime);
        }
        if uses == 0 || uses > MAX_TOKEN_USES {
            return Err(AccessError::TokenUses);
        }
        let labels = check_labels(labels)?;
        let token = JoinToken::generate(&self.advertise, &self.ca.fingerprint());
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: gantry_certs::token::hash_secret(&token.secret).to_vec(),
            created_at: cx.now,
            created_by: cx.actor.to_owned(),
            expires_at: cx.now.plus_secs(ttl_secs),
            uses_allowed: uses,
            uses: 0,
            labels: labels.clone(),
        };
        let detail = format!(
            "token={} ttl_secs={ttl_secs} uses={uses} labels={labels:?}",
            token.id
        );
        self.store
            .create_token(&record, &cx.audit("token.create", detail))?;
        Ok(TokenCreated {
            token_id: token.id.clone(),
            token: token.encode(),
            expires_at: record.expires_at,
            uses,
            labels,
        })
    }

    /// Checks the token and CSR and stores the agent. Nothing is stored, and no
    /// certificate leaves, unless every check passes and the commit is durable.
    pub fn enroll(&self, req: &EnrollRequest, remote: String) -> Result<Enrolled, Refusal> {
        let refusal = |reason, message: String| Refusal { reason, message };
        let token_id = TokenId::parse(req.token_id.as_str()).map_err(|e| {
            refusal(
                RefusalReason::TokenMalformed,
                format!("malformed join token: {e}"),
            )
        })?;
        if req.token_secret.len() != 64 || !req.token_secret.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(refusal(
                RefusalReason::TokenMalformed,
                "malformed join token: the secret is not 64 hex digits".into(),
            ));
        }
        let labels = check_labels(&req.labels)
            .map_err(|e| refusal(RefusalReason::BadRequest, e.to_string()))?;
        let hostname: String = req
            .hostname
            .chars()
            .filter(|c| !c.is_control())
            .take(253)
            .collect();
        let now_sys = SystemTime::now();
        let now = UnixMillis::now();
        // A token that cannot enroll is refused after one read, before the CSR is
        // checked and signed and before the store's write lock is taken: a storm of
        // forged enrollments costs a lookup each. The write below checks it again.
        match self.store.token(&token_id) {
            Ok(Some(token))
                if gantry_certs::token::secret_matches(&req.token_secret, &token.secret_sha256) =>
            {
                token.check(now).map_err(|t| token_refusal(&t))?;
            }
            Ok(_) => return Err(token_refusal(&TokenRefusal::Unknown(token_id))),
            Err(e) => {
                return Err(refusal(
                    RefusalReason::Internal,
                    format!("coordinator could not read the join token: {e}"),
                ))
            }
        }
        let mut agent_id = AgentId::from_random(&gantry_certs::random_bytes::<6>());
        // All-zero is the deploy runner's id; a 1-in-2^48 draw of it is drawn again.
        while agent_id == deploy_runner() {
            agent_id = AgentId::from_random(&gantry_certs::random_bytes::<6>());
        }
        let cert = self
            .ca
            .sign_csr(
                &req.csr_der,
                &Identity::Agent(agent_id.clone()),
                now_sys,
                self.agent_cert_ttl,
            )
            .map_err(|e| {
                refusal(
                    RefusalReason::BadCsr,
                    format!("certificate request refused: {e}"),
                )
            })?;
        let record = self.store.enroll(
            &token_id,
            |token| gantry_certs::token::secret_matches(&req.token_secret, &token.secret_sha256),
            now,
            |token, taken| {
                if taken(&agent_id) {
                    return Err(StoreError::Engine {
                        op: "enroll",
                        detail: "agent id collision; enroll again".into(),
                    });
                }
                Ok(AgentRecord {
                    id: agent_id.clone(),
                    hostname,
                    reported_labels: labels.clone(),
                    assigned_labels: token.labels.clone(),
                    capabilities: Vec::new(),
                    slots: 0,
                    agent_version: String::new(),
                    enrolled_at: now,
                    enrolled_with: token.id.clone(),
                    last_seen: Some(now),
                    last_address: Some(remote),
                    figures: None,
                    certificate_serial: cert.serial_hex.clone(),
                    certificate_not_after: cert.not_after,
                    revoked_at: None,
                })
            },
        );
        match record {
            Ok(record) => Ok(Enrolled {
                agent_id,
                certificate_pem: cert.pem,
                ca_certificate_pem: self.ca.cert_pem().to_owned(),
                labels: record.effective_labels(),
            }),
            Err(StoreError::Token(t)) => Err(token_refusal(&t)),
            Err(e) => {
                tracing::error!(error = %e, "enrollment failed in the store");
                Err(refusal(
                    RefusalReason::Internal,
                    format!("coordinator could not store the enrollment: {e}"),
                ))
            }
        }
    }

    /// Signs a renewed certificate for a connected agent (its CSR came over its session),
    /// recording the new serial; the answer goes back on the session.
    pub fn renew(&self, id: &AgentId, csr_der: &[u8]) -> CoordinatorMessage {
        let identity = Identity::Agent(id.clone());
        let cert =
            match self
                .ca
                .sign_csr(csr_der, &identity, SystemTime::now(), self.agent_cert_ttl)
            {
                Ok(c) => c,
                Err(e) => {
                    return CoordinatorMessage::RenewalRefused {
                        message: format!("certificate request refused: {e}"),
                    }
                }
            };
        let uri = identity.uri();
        let audit = Acting::new(&uri, UnixMillis::now()).audit(
            "agent.renew",
            format!("certificate_serial={}", cert.serial_hex),
        );
        let stored = self.store.update_agent(id, Some(&audit), |r| {
            r.certificate_serial.clone_from(&cert.serial_hex);
            r.certificate_not_after = cert.not_after;
        });
        match stored {
            Ok(_) => {
                tracing::info!(agent = %id, "certificate renewed");
                CoordinatorMessage::CertificateRenewed {
                    certificate_pem: cert.pem,
                    not_after: cert.not_after,
                }
            }
            Err(e) => CoordinatorMessage::RenewalRefused {
                message: format!("could not record the renewal: {e}"),
            },
        }
    }

    /// `gantry admin add`: an admin certificate for `name` from its CSR, with the CA's
    /// certificate to trust the coordinator by. Returns both PEMs.
    pub fn issue_admin(
        &self,
        cx: &Acting<'_>,
        name: &str,
        csr_der: &[u8],
    ) -> Result<(String, String), AccessError> {
        if !gantry_certs::identity::valid_admin_name(name) {
            return Err(AccessError::AdminName(name.to_owned()));
        }
        let cert = self
            .ca
            .sign_csr(
                csr_der,
                &Identity::Admin(name.to_owned()),
                SystemTime::now(),
                gantry_certs::ADMIN_CERT_LIFETIME,
            )
            .map_err(AccessError::Csr)?;
        let detail = format!("name={name} certificate_serial={}", cert.serial_hex);
        self.store.audit(&cx.audit("admin.issue", detail))?;
        Ok((cert.pem, self.ca.cert_pem().to_owned()))
    }

    /// `gantry admin token create`: a login token for the dashboard.
    pub fn create_login_token(
        &self,
        cx: &Acting<'_>,
        name: String,
        role: Role,
        ttl_secs: u64,
    ) -> Result<LoginTokenCreated, AccessError> {
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name.chars().any(|c| c.is_control() || c == ':')
        {
            return Err(AccessError::LoginName);
        }
        if ttl_secs == 0 || ttl_secs > MAX_LOGIN_TTL.as_secs() {
            return Err(AccessError::LoginLifetime);
        }
        let token = LoginToken::generate();
        let record = LoginTokenRecord {
            id: token.id.clone(),
            name,
            role,
            secret_sha256: gantry_certs::token::hash_secret(&token.secret).to_vec(),
            created_at: cx.now,
            created_by: cx.actor.to_owned(),
            expires_at: cx.now.plus_secs(ttl_secs),
            revoked_at: None,
        };
        let detail = format!(
            "token={} name={} role={role} ttl_secs={ttl_secs}",
            record.id, record.name
        );
        self.store
            .create_login_token(&record, &cx.audit("login_token.create", detail))?;
        Ok(LoginTokenCreated {
            id: record.id,
            name: record.name,
            role,
            expires_at: record.expires_at,
            token: token.encode(),
        })
    }

    /// `gantry admin token list`.
    pub fn login_tokens(&self) -> Result<Vec<LoginTokenView>, AccessError> {
        Ok(self
            .store
            .login_tokens()?
            .iter()
            .map(login_token_view)
            .collect())
    }

    /// `gantry admin token revoke`: it stops working at once, sessions included.
    pub fn revoke_login_token(
        &self,
        cx: &Acting<'_>,
        id: &str,
    ) -> Result<LoginTokenView, AccessError> {
        let record = self
            .store
            .revoke_login_token(
                id,
                cx.now,
                &cx.audit("login_token.revoke", format!("token={id}")),
            )?
            .ok_or_else(|| AccessError::NoLoginToken(id.to_owned()))?;
        Ok(login_token_view(&record))
    }
}

/// A join token's refusal as the enrolling agent is told it.
fn token_refusal(t: &TokenRefusal) -> Refusal {
    let message = t.to_string();
    let reason = match t {
        TokenRefusal::Unknown(_) => RefusalReason::TokenUnknown,
        TokenRefusal::Expired { .. } => RefusalReason::TokenExpired,
        TokenRefusal::UsedUp { .. } => RefusalReason::TokenUsedUp,
    };
    Refusal { reason, message }
}

fn login_token_view(r: &LoginTokenRecord) -> LoginTokenView {
    LoginTokenView {
        id: r.id.clone(),
        name: r.name.clone(),
        role: r.role,
        created_at: r.created_at,
        created_by: r.created_by.clone(),
        expires_at: r.expires_at,
        revoked_at: r.revoked_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_tokens_round_trip_and_garbage_is_refused() {
        let token = LoginToken::generate();
        let text = token.encode();
        assert!(text.starts_with("glt1_"), "{text}");
        assert_eq!(LoginToken::parse(&text), Ok(token.clone()));
        assert_eq!(LoginToken::parse(&format!(" {text}\n")), Ok(token));
        for bad in [
            "",
            "glt1_",
            "glt1_abc_def",
            "gjt1_0123456789abcdef_00",
            &format!("glt1_0123456789abcdeF_{}", "a".repeat(64)),
            &format!("glt1_0123456789abcdef_{}", "a".repeat(63)),
        ] {
            assert!(LoginToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
