//! The HTTP side's durable records, part of the store (the only module that knows
//! redb): dashboard login tokens (only the SHA-256 of their secret) and webhook targets
//! (their HMAC secret sealed with the coordinator's secrets key). Every change commits
//! with its audit entry, durably, before it returns.

use gantry_protocol::{Role, UnixMillis, WebhookFormat};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::audit::AuditEntry;
use super::db::{encode, eng, update, Store, StoreError};

/// Login tokens by id (`lt-<16 hex>`) → [`LoginTokenRecord`].
const LOGIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("login_tokens");
/// Webhook targets by number → [`WebhookRecord`].
const WEBHOOKS: TableDefinition<u64, &[u8]> = TableDefinition::new("webhooks");

/// A dashboard login token as stored: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginTokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub secret_sha256: Vec<u8>,
    pub created_at: UnixMillis,
    pub created_by: String,
    pub expires_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

/// A webhook target as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub id: u64,
    pub url: String,
    pub format: WebhookFormat,
    /// Event kinds delivered; empty means every kind.
    pub events: Vec<String>,
    /// PEM of the CA that verifies an https receiver instead of the system roots.
    pub ca_pem: Option<String>,
    /// The HMAC key, sealed (AES-256-GCM) under the name `webhook:<id>`.
    pub sealed_secret: Vec<u8>,
    pub created_at: UnixMillis,
    pub created_by: String,
}

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(LOGIN_TOKENS)
        .map_err(eng!("open login tokens"))?;
    tx.open_table(WEBHOOKS).map_err(eng!("open webhooks"))?;
    Ok(())
}

impl Store {
    /// Stores a new login token and its audit entry.
    pub fn create_login_token(
        &self,
        token: &LoginTokenRecord,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let ops = ["open login tokens", "write login token"];
        self.put_audited(LOGIN_TOKENS, token.id.as_str(), token, ops, audit)
    }

    pub fn login_token(&self, id: &str) -> Result<Option<LoginTokenRecord>, StoreError> {
        self.get(
            LOGIN_TOKENS,
            id,
            ["open login tokens", "read login token"],
            "login token",
        )
    }

    /// Every login token, oldest first.
    pub fn login_tokens(&self) -> Result<Vec<LoginTokenRecord>, StoreError> {
        let mut out: Vec<LoginTokenRecord> = self.all(
            LOGIN_TOKENS,
            ["open login tokens", "scan login tokens"],
            "login token",
        )?;
        out.sort_by_key(|t| t.created_at);
        Ok(out)
    }

    /// Marks a login token revoked (once; a second revocation keeps the first time).
    /// `None` if there is no such token.
    pub fn revoke_login_token(
        &self,
        id: &str,
        now: UnixMillis,
        audit: &AuditEntry,
    ) -> Result<Option<LoginTokenRecord>, StoreError> {
        self.write(|tx| {
            let mut table = tx
                .open_table(LOGIN_TOKENS)
                .map_err(eng!("open login tokens"))?;
            let Some(record) = update(
                &mut table,
                id,
                ["read login token", "write login token"],
                "login token",
                |record: &mut LoginTokenRecord| {
                    record.revoked_at.get_or_insert(now);
                },
            )?
            else {
                return Ok(None);
            };
            drop(table);
            Self::append_audit(tx, audit)?;
            Ok(Some(record))
        })
    }

    /// Stores a new webhook target numbered after the last one; `make` builds it from
    /// its number (the secret is sealed under a name that includes it).
    pub fn add_webhook(
        &self,
        make: impl FnOnce(u64) -> Result<WebhookRecord, StoreError>,
        audit: &AuditEntry,
    ) -> Result<WebhookRecord, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(WEBHOOKS).map_err(eng!("open webhooks"))?;
            let next = table
                .last()
                .map_err(eng!("read webhooks"))?
                .map_or(1, |(k, _)| k.value() + 1);
            let record = make(next)?;
            table
                .insert(next, encode(&record)?.as_slice())
                .map_err(eng!("write webhook"))?;
            drop(table);
            let mut entry = audit.clone();
            entry.detail = format!("webhook={next} {}", entry.detail);
            Self::append_audit(tx, &entry)?;
            Ok(record)
        })
    }

    /// Every webhook target, in the order they were added.
    pub fn webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        self.all(WEBHOOKS, ["open webhooks", "scan webhooks"], "webhook")
    }

    /// Removes a webhook target; `false` if there was none with that number.
    pub fn remove_webhook(&self, id: u64, audit: &AuditEntry) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(WEBHOOKS).map_err(eng!("open webhooks"))?;
            let existed = table.remove(id).map_err(eng!("remove webhook"))?.is_some();
            drop(table);
            if existed {
                Self::append_audit(tx, audit)?;
            }
            Ok(existed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(action: &str) -> AuditEntry {
        AuditEntry {
            at: UnixMillis(1),
            actor: "gantry://admin/t".into(),
            action: action.into(),
            detail: String::new(),
        }
    }

    #[test]
    fn login_tokens_and_webhooks_survive_reopen_and_are_audited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        {
            let store = Store::open(&path).expect("open");
            let token = LoginTokenRecord {
                id: "lt-0123456789abcdef".into(),
                name: "ci".into(),
                role: Role::Viewer,
                secret_sha256: vec![7; 32],
                created_at: UnixMillis(5),
                created_by: "gantry://admin/t".into(),
                expires_at: UnixMillis(10),
                revoked_at: None,
            };
            store
                .create_login_token(&token, &audit("login_token.create"))
                .expect("create");
            let made = store
                .add_webhook(
                    |id| {
                        Ok(WebhookRecord {
                            id,
                            url: "http://127.0.0.1:1/h".into(),
                            format: WebhookFormat::Slack,
                            events: vec!["run.finished".into()],
                            ca_pem: None,
                            sealed_secret: vec![1, 2, 3],
                            created_at: UnixMillis(6),
                            created_by: "gantry://admin/t".into(),
                        })
                    },
                    &audit("webhook.add"),
                )
                .expect("add");
            assert_eq!(made.id, 1);
            let revoked = store
                .revoke_login_token(&token.id, UnixMillis(7), &audit("login_token.revoke"))
                .expect("revoke")
                .expect("known");
            assert_eq!(revoked.revoked_at, Some(UnixMillis(7)));
            assert!(store
                .revoke_login_token("lt-ffffffffffffffff", UnixMillis(7), &audit("x"))
                .expect("revoke")
                .is_none());
        }
        let store = Store::open(&path).expect("reopen");
        let tokens = store.login_tokens().expect("tokens");
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0].revoked_at, Some(UnixMillis(7)));
        assert_eq!(
            store.webhooks().expect("webhooks")[0].format,
            WebhookFormat::Slack
        );
        assert!(store
            .remove_webhook(1, &audit("webhook.remove"))
            .expect("rm"));
        assert!(!store
            .remove_webhook(1, &audit("webhook.remove"))
            .expect("rm again"));
        let actions: Vec<String> = store
            .audit_tail(10)
            .expect("audit")
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(
            actions,
            [
                "login_token.create",
                "webhook.add",
                "login_token.revoke",
                "webhook.remove"
            ]
        );
    }
}
