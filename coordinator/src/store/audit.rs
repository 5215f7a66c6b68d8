//! The audit log (table `audit`): one [`AuditEntry`] per change, numbered in order.
//! Every family commits its change and the change's entry in one transaction, through
//! [`Store::append_audit`].

use gantry_protocol::UnixMillis;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::db::{collect, encode, eng, engine, KeyName, Store, StoreError};

/// Audit entries by number (from 1, in the order written) → [`AuditEntry`].
pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: UnixMillis,
    /// Identity URI of who did it (`gantry://admin/ops`, `gantry://agent/ag-…`).
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// Creates the table so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(AUDIT).map_err(eng!("open audit"))?;
    Ok(())
}

impl Store {
    /// Appends `entry` inside the transaction of the change it records.
    pub(super) fn append_audit(
        tx: &redb::WriteTransaction,
        entry: &AuditEntry,
    ) -> Result<(), StoreError> {
        let mut audit = tx.open_table(AUDIT).map_err(eng!("open audit"))?;
        let next = audit
            .last()
            .map_err(eng!("read audit"))?
            .map_or(1, |(k, _)| k.value() + 1);
        audit
            .insert(next, encode(entry)?.as_slice())
            .map_err(eng!("write audit"))?;
        Ok(())
    }

    /// Writes `record` under `key` in `table` with its audit entry, in one commit. `ops`
    /// name opening the table and writing the row in an engine error.
    pub(super) fn put_audited<K: KeyName, T: Serialize>(
        &self,
        table: TableDefinition<'_, K, &'static [u8]>,
        key: K::SelfType<'_>,
        record: &T,
        ops: [&'static str; 2],
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut rows = tx.open_table(table).map_err(|e| engine(ops[0])(&e))?;
            rows.insert(key, encode(record)?.as_slice())
                .map_err(|e| engine(ops[1])(&e))?;
            drop(rows);
            Self::append_audit(tx, audit)
        })
    }

    /// Appends an audit entry on its own.
    pub fn audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.write(|tx| Self::append_audit(tx, entry))
    }

    /// Records one audit entry on its own (for changes stored elsewhere).
    pub fn append_audit_entry(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.write(|tx| Self::append_audit(tx, entry))
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let audit = tx.open_table(AUDIT).map_err(eng!("open audit"))?;
        let total = audit.len().map_err(eng!("count audit"))?;
        let mut out: Vec<AuditEntry> = collect(
            audit.iter().map(|rows| rows.rev().take(limit)),
            "scan audit",
            "audit",
        )?;
        out.reverse();
        debug_assert!(out.len() as u64 <= total);
        Ok(out)
    }

    /// Removes the entry `name` of a table keyed by name, with its audit entry (only
    /// when something was removed); `false` if there was none.
    pub(super) fn remove_named(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(table).map_err(eng!("open table"))?;
            let existed = t.remove(name).map_err(eng!("remove"))?.is_some();
            drop(t);
            if existed {
                Self::append_audit(tx, audit)?;
            }
            Ok(existed)
        })
    }
}
