//! Agents and join tokens (tables `agents` and `tokens`): enrollment spends a token's use
//! and stores the agent in one commit; revocation is a field of the agent record;
//! presence (last seen, figures, what the hello said) is written in batches by
//! [`Store::record_presence`], because it acknowledges nothing.

use std::ops::ControlFlow;

use gantry_protocol::{AgentId, HostFigures, Labels, TokenId, UnixMillis};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::audit::AuditEntry;
use super::db::{decode, encode, eng, scan, update, Store, StoreError, TokenRefusal};

/// Agents by id (`ag-…`) → [`AgentRecord`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// Join tokens by id (`tk-…`) → [`TokenRecord`].
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(AGENTS).map_err(eng!("open agents"))?;
    tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
    Ok(())
}

/// An enrolled agent as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub hostname: String,
    /// Labels the agent reports about itself (os, arch, hostname, its config).
    pub reported_labels: Labels,
    /// Labels from its join token and from `gantry agents label`; these win over reported ones.
    pub assigned_labels: Labels,
    pub capabilities: Vec<String>,
    pub slots: u32,
    pub agent_version: String,
    pub enrolled_at: UnixMillis,
    pub enrolled_with: TokenId,
    pub last_seen: Option<UnixMillis>,
    pub last_address: Option<String>,
    pub figures: Option<HostFigures>,
    pub certificate_serial: String,
    pub certificate_not_after: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

impl AgentRecord {
    /// Reported labels overlaid with assigned ones.
    pub fn effective_labels(&self) -> Labels {
        let mut labels = self.reported_labels.clone();
        labels.extend(
            self.assigned_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        labels
    }
}

/// A join token as stored: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    pub secret_sha256: Vec<u8>,
    pub created_at: UnixMillis,
    pub created_by: String,
    pub expires_at: UnixMillis,
    pub uses_allowed: u32,
    pub uses: u32,
    pub labels: Labels,
}

impl TokenRecord {
    /// Whether the token may enroll one more agent at `now`.
    pub fn check(&self, now: UnixMillis) -> Result<(), TokenRefusal> {
        if now >= self.expires_at {
            return Err(TokenRefusal::Expired {
                id: self.id.clone(),
                expired_at_ms: self.expires_at.0,
            });
        }
        if self.uses >= self.uses_allowed {
            return Err(TokenRefusal::UsedUp {
                id: self.id.clone(),
                uses: self.uses,
            });
        }
        Ok(())
    }
}

/// Presence facts of a connected agent, flushed in batches.
#[derive(Debug, Clone)]
pub struct Presence {
    pub agent_id: AgentId,
    pub last_seen: UnixMillis,
    pub address: String,
    pub figures: Option<HostFigures>,
    pub hello: Option<HelloFacts>,
}

/// What an agent said about itself in its hello.
#[derive(Debug, Clone)]
pub struct HelloFacts {
    pub hostname: String,
    pub labels: Labels,
    pub capabilities: Vec<String>,
    pub slots: u32,
    pub agent_version: String,
}

/// Counts for `gantry status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub agents: u64,
    pub revoked: u64,
    pub tokens_active: u64,
}

impl Store {
    /// Stores a new token and its audit entry.
    pub fn create_token(&self, token: &TokenRecord, audit: &AuditEntry) -> Result<(), StoreError> {
        let ops = ["open tokens", "write token"];
        self.put_audited(TOKENS, token.id.as_str(), token, ops, audit)
    }

    /// Atomically checks the token (`secret_ok` tells whether the presented secret matched
    /// its hash), spends one use, and stores the new agent. The agent record is built by
    /// `make_agent` from the token, so token labels reach the agent in the same commit.
    pub fn enroll(
        &self,
        token_id: &TokenId,
        secret_ok: impl FnOnce(&TokenRecord) -> bool,
        now: UnixMillis,
        make_agent: impl FnOnce(
            &TokenRecord,
            &dyn Fn(&AgentId) -> bool,
        ) -> Result<AgentRecord, StoreError>,
    ) -> Result<AgentRecord, StoreError> {
        self.write(|tx| {
            let mut tokens = tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
            let mut token: TokenRecord =
                match tokens.get(token_id.as_str()).map_err(eng!("read token"))? {
                    Some(v) => decode("token", token_id.as_str(), v.value())?,
                    None => return Err(TokenRefusal::Unknown(token_id.clone()).into()),
                };
            if !secret_ok(&token) {
                return Err(TokenRefusal::Unknown(token_id.clone()).into());
            }
            token.check(now)?;
            token.uses += 1;
            tokens
                .insert(token_id.as_str(), encode(&token)?.as_slice())
                .map_err(eng!("write token"))?;
            drop(tokens);
            let mut agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            let id_in_use = |id: &AgentId| agents.get(id.as_str()).map_or(true, |v| v.is_some());
            let agent = make_agent(&token, &id_in_use)?;
            agents
                .insert(agent.id.as_str(), encode(&agent)?.as_slice())
                .map_err(eng!("write agent"))?;
            drop(agents);
            Self::append_audit(
                tx,
                &AuditEntry {
                    at: now,
                    actor: format!("gantry://agent/{}", agent.id),
                    action: "agent.enroll".into(),
                    detail: format!(
                        "hostname={} token={} certificate_serial={}",
                        agent.hostname, token_id, agent.certificate_serial
                    ),
                },
            )?;
            Ok(agent)
        })
    }

    /// A join token, read without taking the write lock.
    pub fn token(&self, id: &TokenId) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, id.as_str(), ["open tokens", "read token"], "token")
    }

    pub fn agent(&self, id: &AgentId) -> Result<Option<AgentRecord>, StoreError> {
        self.get(AGENTS, id.as_str(), ["open agents", "read agent"], "agent")
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.all(AGENTS, ["open agents", "scan agents"], "agent")
    }

    /// Applies `change` to one agent and records `audit`, in one commit.
    pub fn update_agent(
        &self,
        id: &AgentId,
        audit: Option<&AuditEntry>,
        change: impl FnOnce(&mut AgentRecord),
    ) -> Result<AgentRecord, StoreError> {
        self.write(|tx| {
            let mut agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            let record = update(
                &mut agents,
                id.as_str(),
                ["read agent", "write agent"],
                "agent",
                change,
            )?
            .ok_or_else(|| StoreError::UnknownAgent(id.clone()))?;
            drop(agents);
            if let Some(entry) = audit {
                Self::append_audit(tx, entry)?;
            }
            Ok(record)
        })
    }

    /// Writes a batch of presence facts in one commit. Unknown agents are skipped.
    pub fn record_presence(&self, batch: &[Presence]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            for p in batch {
                // An unknown agent (revoked and removed meanwhile) is skipped.
                update(
                    &mut agents,
                    p.agent_id.as_str(),
                    ["read agent", "write agent"],
                    "agent",
                    |record: &mut AgentRecord| {
                        record.last_seen = Some(p.last_seen);
                        record.last_address = Some(p.address.clone());
                        if let Some(f) = &p.figures {
                            record.figures = Some(f.clone());
                        }
                        if let Some(h) = &p.hello {
                            record.hostname.clone_from(&h.hostname);
                            record.reported_labels.clone_from(&h.labels);
                            record.capabilities.clone_from(&h.capabilities);
                            record.slots = h.slots;
                            record.agent_version.clone_from(&h.agent_version);
                        }
                    },
                )?;
            }
            Ok(())
        })
    }

    /// Identities of every revoked agent, to load into the TLS verifier at start.
    pub fn revoked_agents(&self) -> Result<Vec<AgentId>, StoreError> {
        Ok(self
            .agents()?
            .into_iter()
            .filter(|a| a.revoked_at.is_some())
            .map(|a| a.id)
            .collect())
    }

    pub fn counts(&self, now: UnixMillis) -> Result<Counts, StoreError> {
        let agents = self.agents()?;
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let tokens = tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
        let mut tokens_active = 0;
        scan(
            tokens.iter(),
            "scan tokens",
            "token",
            |_, token: TokenRecord| {
                if token.check(now).is_ok() {
                    tokens_active += 1;
                }
                ControlFlow::Continue(())
            },
        )?;
        Ok(Counts {
            agents: agents.len() as u64,
            revoked: agents.iter().filter(|a| a.revoked_at.is_some()).count() as u64,
            tokens_active,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(now: UnixMillis, uses_allowed: u32) -> TokenRecord {
        TokenRecord {
            id: TokenId::parse("tk-0123456789abcdef").expect("id"),
            secret_sha256: vec![1; 32],
            created_at: now,
            created_by: "test".into(),
            expires_at: now.plus_secs(60),
            uses_allowed,
            uses: 0,
            labels: Labels::from([("site".to_owned(), "paris".to_owned())]),
        }
    }

    fn audit(action: &str) -> AuditEntry {
        AuditEntry {
            at: UnixMillis(1),
            actor: "gantry://admin/t".into(),
            action: action.into(),
            detail: String::new(),
        }
    }

    fn agent_from(token: &TokenRecord, n: u8) -> AgentRecord {
        AgentRecord {
            id: AgentId::from_random(&[n; 6]),
            hostname: format!("host{n}"),
            reported_labels: Labels::new(),
            assigned_labels: token.labels.clone(),
            capabilities: vec![],
            slots: 1,
            agent_version: "t".into(),
            enrolled_at: UnixMillis(1),
            enrolled_with: token.id.clone(),
            last_seen: None,
            last_address: None,
            figures: None,
            certificate_serial: "01".into(),
            certificate_not_after: UnixMillis(2),
            revoked_at: None,
        }
    }

    #[test]
    fn enrollment_spends_uses_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let now = UnixMillis(1_000_000);
        let t = token(now, 1);
        {
            let store = Store::open(&path).expect("open");
            store
                .create_token(&t, &audit("token.create"))
                .expect("create");
            let a = store
                .enroll(&t.id, |_| true, now, |tok, _| Ok(agent_from(tok, 1)))
                .expect("enroll");
            assert_eq!(a.assigned_labels["site"], "paris");
            let err = store
                .enroll(&t.id, |_| true, now, |tok, _| Ok(agent_from(tok, 2)))
                .expect_err("used up");
            assert!(
                matches!(err, StoreError::Token(TokenRefusal::UsedUp { uses: 1, .. })),
                "{err}"
            );
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.agents().expect("agents").len(),
            1,
            "the refused enrollment stored nothing"
        );
        let actions: Vec<String> = store
            .audit_tail(10)
            .expect("audit")
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(actions, vec!["token.create", "agent.enroll"]);
    }

    #[test]
    fn expired_unknown_and_wrong_secret_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("open");
        let now = UnixMillis(1_000_000);
        let t = token(now, 5);
        store
            .create_token(&t, &audit("token.create"))
            .expect("create");
        let later = now.plus_secs(61);
        let err = store
            .enroll(&t.id, |_| true, later, |tok, _| Ok(agent_from(tok, 1)))
            .expect_err("expired");
        assert!(
            matches!(err, StoreError::Token(TokenRefusal::Expired { .. })),
            "{err}"
        );
        let err = store
            .enroll(&t.id, |_| false, now, |tok, _| Ok(agent_from(tok, 1)))
            .expect_err("wrong secret");
        assert!(
            matches!(err, StoreError::Token(TokenRefusal::Unknown(_))),
            "{err}"
        );
        let other = TokenId::parse("tk-ffffffffffffffff").expect("id");
        let err = store
            .enroll(&other, |_| true, now, |tok, _| Ok(agent_from(tok, 1)))
            .expect_err("unknown");
        assert!(
            matches!(err, StoreError::Token(TokenRefusal::Unknown(_))),
            "{err}"
        );
        assert!(store.agents().expect("agents").is_empty());
        assert_eq!(store.counts(now).expect("counts").tokens_active, 1);
    }
}
