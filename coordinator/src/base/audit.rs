//! Who acts, and when: the context every admin change carries ([`Acting`]), the one
//! place an audit entry is made, and the audit log as `gantry audit` shows it.
//!
//! An audit entry is written in the same store transaction as the change it records
//! (the store's writes take the entry), so a change is never durable without it.

use gantry_protocol::{AuditView, UnixMillis};

use crate::store::{AuditEntry, Store, StoreError};

/// Who is acting, and the time their request is answered at.
#[derive(Debug, Clone, Copy)]
pub struct Acting<'a> {
    /// Identity URI of the actor (`gantry://admin/ops`, `web:name:lt-…`, `gantry://trigger/push`).
    pub actor: &'a str,
    pub now: UnixMillis,
}

impl<'a> Acting<'a> {
    pub fn new(actor: &'a str, now: UnixMillis) -> Self {
        Self { actor, now }
    }

    /// The audit entry for `action` (`run.cancel`, `token.create`, ...) by this actor now.
    pub fn audit(&self, action: &str, detail: impl Into<String>) -> AuditEntry {
        AuditEntry {
            at: self.now,
            actor: self.actor.to_owned(),
            action: action.to_owned(),
            detail: detail.into(),
        }
    }
}

/// The newest `limit` entries (1 to 10,000), oldest first.
pub fn tail(store: &Store, limit: u32) -> Result<Vec<AuditView>, StoreError> {
    let entries = store.audit_tail(limit.clamp(1, 10_000) as usize)?;
    Ok(entries
        .into_iter()
        .map(|e| AuditView {
            at: e.at,
            actor: e.actor,
            action: e.action,
            detail: e.detail,
        })
        .collect())
}
