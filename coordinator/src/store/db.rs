//! What every table family of the store stands on: the [`Store`] handle over the redb
//! database, the store's errors, the record encoding (postcard), one write transaction
//! per change, and [`scan_raw`], the one loop that reads many rows of a table. The
//! families call it, or [`scan`], [`collect`] and [`Store::all`], which decode on top of
//! it, instead of writing their own "iterate, decode, collect" loop; [`Store::get`] and
//! [`update`] do the same for one row read, and one row read, changed and written.
//!
//! It knows one table, `meta`, which holds small named values for more than one family;
//! every other table belongs to a family module beside it (the store's root lists them
//! all).

use std::ops::ControlFlow;

use gantry_protocol::{AgentId, TokenId};
use redb::{AccessGuard, Database, Key, ReadableDatabase, ReadableTable, TableDefinition, Value};
use serde::{de::DeserializeOwned, Serialize};

/// Small named values: `schema_version` (checked by [`Store::open`]) and the
/// scheduler's core and legacy snapshot (written by the `runs` family).
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The durable store. Each family module adds its methods in an `impl Store` of its own.
#[derive(Debug)]
pub struct Store {
    pub(super) db: Database,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("store schema version {found} is newer than this coordinator understands ({supported}); upgrade gantry")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("store {op} failed: {detail}")]
    Engine { op: &'static str, detail: String },
    #[error("corrupt {what} record {key}: {detail}")]
    Corrupt {
        what: &'static str,
        key: String,
        detail: String,
    },
    #[error("no agent {0}")]
    UnknownAgent(AgentId),
    #[error(transparent)]
    Token(#[from] TokenRefusal),
}

/// Why a join token cannot be used. Each case is reported to the enrolling agent as is.
/// (Here rather than with the tokens' table because [`StoreError`] carries it.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("join token {0} is unknown to this coordinator (never created, or wrong secret)")]
    Unknown(TokenId),
    #[error("join token {id} expired at {expired_at_ms} (unix ms); create a new one with `gantry token create`")]
    Expired { id: TokenId, expired_at_ms: u64 },
    #[error("join token {id} has been used {uses} times, all it allows; create a new one with `gantry token create`")]
    UsedUp { id: TokenId, uses: u32 },
}

/// A storage engine failure during `op`.
pub(super) fn engine(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
    move |e| StoreError::Engine {
        op,
        detail: e.to_string(),
    }
}

/// `.map_err(eng!("read agent"))`: [`engine`] as a closure over any displayable error.
macro_rules! eng {
    ($op:literal) => {
        |e| $crate::store::db::engine($op)(&e)
    };
}
pub(super) use eng;

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|e| StoreError::Engine {
        op: "encode",
        detail: e.to_string(),
    })
}

pub(super) fn decode<T: DeserializeOwned>(
    what: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        what,
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

/// A table key as a corrupt-record error names it.
pub(super) trait KeyName: Key + 'static {
    fn name(key: &Self::SelfType<'_>) -> String;
}

impl KeyName for &'static str {
    fn name(key: &&str) -> String {
        (*key).to_owned()
    }
}

impl KeyName for u64 {
    fn name(key: &u64) -> String {
        key.to_string()
    }
}

/// A job: `run.index`.
impl KeyName for (u64, u32) {
    fn name(&(run, index): &(u64, u32)) -> String {
        format!("{run}.{index}")
    }
}

/// An artifact: `run/name`.
impl KeyName for (u64, &'static str) {
    fn name(&(run, name): &(u64, &str)) -> String {
        format!("{run}/{name}")
    }
}

/// One row as a table's `iter()` or `range()` yields it.
pub(super) type Row<'a, K, V> = redb::Result<(AccessGuard<'a, K>, AccessGuard<'a, V>)>;

/// The one loop over many rows: walks `rows` (a table's `iter()` or `range()`, reversed
/// or cut short by the caller) in order and hands each key and value to `each` until it
/// breaks. `op` names the scan in an engine error. [`scan`] and [`collect`] decode the
/// records on top of it; this is for values that are not postcard records.
pub(super) fn scan_raw<'a, K: Key + 'static, V: Value + 'static, I>(
    rows: redb::Result<I>,
    op: &'static str,
    mut each: impl FnMut(
        &AccessGuard<'a, K>,
        &AccessGuard<'a, V>,
    ) -> Result<ControlFlow<()>, StoreError>,
) -> Result<(), StoreError>
where
    I: Iterator<Item = Row<'a, K, V>>,
{
    for row in rows.map_err(|e| engine(op)(&e))? {
        let (key, value) = row.map_err(|e| engine(op)(&e))?;
        if each(&key, &value)?.is_break() {
            break;
        }
    }
    Ok(())
}

/// [`scan_raw`] over a table of postcard records: each value is decoded as a `what`
/// record (a corrupt one is an error naming its key) and handed to `each` with its key.
pub(super) fn scan<'a, K: KeyName, T: DeserializeOwned, I>(
    rows: redb::Result<I>,
    op: &'static str,
    what: &'static str,
    mut each: impl FnMut(&AccessGuard<'a, K>, T) -> ControlFlow<()>,
) -> Result<(), StoreError>
where
    I: Iterator<Item = Row<'a, K, &'static [u8]>>,
{
    scan_raw(rows, op, |key, value| {
        let record = decode(what, &K::name(&key.value()), value.value())?;
        Ok(each(key, record))
    })
}

/// Every record of `rows`, decoded, in the order given.
pub(super) fn collect<'a, K: KeyName, T: DeserializeOwned, I>(
    rows: redb::Result<I>,
    op: &'static str,
    what: &'static str,
) -> Result<Vec<T>, StoreError>
where
    I: Iterator<Item = Row<'a, K, &'static [u8]>>,
{
    let mut out = Vec::new();
    scan(rows, op, what, |_, record| {
        out.push(record);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// The read-modify-write every family does on a table open for writing: reads the
/// record under `key` as a `what` record, lets `change` alter it and writes it back.
/// `None`, and nothing written, if there is no such row. `ops` name reading and writing
/// the row in an engine error.
#[allow(clippy::needless_pass_by_value)] // keys are small copies (`&str`, numbers, pairs)
pub(super) fn update<K: KeyName, T: Serialize + DeserializeOwned>(
    table: &mut redb::Table<'_, K, &'static [u8]>,
    key: K::SelfType<'_>,
    ops: [&'static str; 2],
    what: &'static str,
    change: impl FnOnce(&mut T),
) -> Result<Option<T>, StoreError> {
    let mut record: T = match table.get(&key).map_err(|e| engine(ops[0])(&e))? {
        Some(v) => decode(what, &K::name(&key), v.value())?,
        None => return Ok(None),
    };
    change(&mut record);
    table
        .insert(&key, encode(&record)?.as_slice())
        .map_err(|e| engine(ops[1])(&e))?;
    Ok(Some(record))
}

impl Store {
    /// Runs `f` in one write transaction and commits it durably before returning.
    pub(super) fn write<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_write().map_err(eng!("begin"))?;
        let out = f(&tx)?;
        tx.commit().map_err(eng!("commit"))?;
        Ok(out)
    }

    /// One record of `table` by key, decoded as a `what` record, read without taking the
    /// write lock. `ops` name opening the table and reading the row in an engine error.
    pub(super) fn get<K: KeyName, T: DeserializeOwned>(
        &self,
        table: TableDefinition<'_, K, &'static [u8]>,
        key: K::SelfType<'_>,
        ops: [&'static str; 2],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(table).map_err(|e| engine(ops[0])(&e))?;
        let name = K::name(&key);
        match table.get(key).map_err(|e| engine(ops[1])(&e))? {
            Some(v) => Ok(Some(decode(what, &name, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every record of `table`, decoded, in key order, read without taking the write
    /// lock. `ops` name opening and scanning the table in an engine error.
    pub(super) fn all<K: KeyName, T: DeserializeOwned>(
        &self,
        table: TableDefinition<'_, K, &'static [u8]>,
        ops: [&'static str; 2],
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(table).map_err(|e| engine(ops[0])(&e))?;
        collect(table.iter(), ops[1], what)
    }
}
