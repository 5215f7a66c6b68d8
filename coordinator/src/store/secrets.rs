//! Sealed secrets (tables `secrets` and `secret_scopes`): the store keeps what the
//! caller sealed, and the environment each scoped secret belongs to.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::audit::AuditEntry;
use super::db::{eng, scan_raw, Store, StoreError};

/// Secrets by name → the value sealed by the caller (AES-256-GCM, see `base::seal`).
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
/// The environment a secret is scoped to, by secret name (absent: any job may use it).
const SECRET_SCOPES: TableDefinition<&str, &str> = TableDefinition::new("secret_scopes");

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(SECRETS).map_err(eng!("open secrets"))?;
    tx.open_table(SECRET_SCOPES)
        .map_err(eng!("open secret scopes"))?;
    Ok(())
}

impl Store {
    /// Stores an encrypted secret (the caller encrypts), the environment it is scoped
    /// to (if any), and its audit entry.
    pub fn put_secret(
        &self,
        name: &str,
        sealed: &[u8],
        environment: Option<&str>,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(SECRETS).map_err(eng!("open secrets"))?;
            table.insert(name, sealed).map_err(eng!("write secret"))?;
            drop(table);
            let mut scopes = tx
                .open_table(SECRET_SCOPES)
                .map_err(eng!("open secret scopes"))?;
            match environment {
                Some(env) => {
                    scopes
                        .insert(name, env)
                        .map_err(eng!("write secret scope"))?;
                }
                None => {
                    scopes.remove(name).map_err(eng!("write secret scope"))?;
                }
            }
            drop(scopes);
            Self::append_audit(tx, audit)
        })
    }

    /// Removes a secret; `false` if there was none.
    pub fn remove_secret(&self, name: &str, audit: &AuditEntry) -> Result<bool, StoreError> {
        self.write(|tx| {
            tx.open_table(SECRET_SCOPES)
                .map_err(eng!("open secret scopes"))?
                .remove(name)
                .map_err(eng!("remove secret scope"))?;
            Ok(())
        })?;
        self.remove_named(SECRETS, name, audit)
    }

    /// The environment each scoped secret belongs to.
    pub fn secret_scopes(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx
            .open_table(SECRET_SCOPES)
            .map_err(eng!("open secret scopes"))?;
        let mut out = BTreeMap::new();
        scan_raw(table.iter(), "scan secret scopes", |k, v| {
            out.insert(k.value().to_owned(), v.value().to_owned());
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(out)
    }

    /// Every secret, sealed, by name.
    pub fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(SECRETS).map_err(eng!("open secrets"))?;
        let mut out = Vec::new();
        scan_raw(table.iter(), "scan secrets", |k, v| {
            out.push((k.value().to_owned(), v.value().to_vec()));
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(out)
    }
}
