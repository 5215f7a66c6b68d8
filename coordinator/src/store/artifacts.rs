//! Artifacts, caches, manifests, the chunk index and the source trees of repository
//! runs (tables `artifacts`, `caches`, `manifests`, `chunks`, `source_trees`), and the
//! garbage collection that spans them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;

use gantry_protocol::{ArtifactView, CacheView, Digest, GcReport, RunId, UnixMillis};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::audit::AuditEntry;
use super::db::{collect, decode, encode, eng, scan, scan_raw, update, Store, StoreError};
use super::deployments::releases_in_use;

/// Chunk index: digest bytes → [`ChunkRecord`]. A chunk is stored only if it is here.
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// Manifests by digest bytes: their canonical encoding.
const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("manifests");
/// Artifacts by (run, name) → [`ArtifactView`].
const ARTIFACTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("artifacts");
/// Caches by `pipeline \0 branch \0 key` → [`CacheView`].
const CACHES: TableDefinition<&str, &[u8]> = TableDefinition::new("caches");
/// Manifests of commits stored as runs' sources (trees and `.git` payloads) by digest
/// bytes → when they were last stored (millis): garbage collection keeps them for
/// [`SOURCE_TREE_KEEP_MS`] after that.
const SOURCE_TREES: TableDefinition<&[u8], u64> = TableDefinition::new("source_trees");

/// How long a source tree outlives its last storing: a run retried after that fails to
/// fetch its source (the run is started again from the repository instead).
pub const SOURCE_TREE_KEEP_MS: u64 = 30 * 24 * 3600 * 1000;

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
    tx.open_table(MANIFESTS).map_err(eng!("open manifests"))?;
    tx.open_table(ARTIFACTS).map_err(eng!("open artifacts"))?;
    tx.open_table(CACHES).map_err(eng!("open caches"))?;
    tx.open_table(SOURCE_TREES)
        .map_err(eng!("open source trees"))?;
    Ok(())
}

/// Garbage collection: forgets source trees not stored again within
/// [`SOURCE_TREE_KEEP_MS`] and adds the others' manifests to `roots`.
fn source_trees_in_use(
    tx: &redb::WriteTransaction,
    now: UnixMillis,
    roots: &mut HashSet<Digest>,
) -> Result<(), StoreError> {
    let mut table = tx
        .open_table(SOURCE_TREES)
        .map_err(eng!("open source trees"))?;
    let mut old = Vec::new();
    for row in table.iter().map_err(eng!("scan source trees"))? {
        let (k, v) = row.map_err(eng!("scan source trees"))?;
        let Ok(bytes) = <[u8; 32]>::try_from(k.value()) else {
            continue;
        };
        if now.0.saturating_sub(v.value()) > SOURCE_TREE_KEEP_MS {
            old.push(bytes);
        } else {
            roots.insert(Digest::from_bytes(bytes));
        }
    }
    for key in old {
        table
            .remove(key.as_slice())
            .map_err(eng!("remove source tree"))?;
    }
    Ok(())
}

/// A stored chunk: its uncompressed size, where its compressed bytes are (pack, offset,
/// length), when it was written (garbage collection leaves young unreferenced chunks
/// alone) and the checksum of its stored bytes ([`crate::base::chunks::stored_check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub size: u32,
    pub stored_bytes: u32,
    pub pack: u64,
    pub offset: u64,
    pub written_at: UnixMillis,
    /// `None` for a chunk indexed before checksums were kept: it is verified in full
    /// each time it is served.
    pub check: Option<u64>,
}

/// [`ChunkRecord`] as coordinators before the checksum stored it: the same fields, one
/// fewer at the end. Read, never written.
#[derive(Deserialize)]
struct ChunkRecordWithoutCheck {
    size: u32,
    stored_bytes: u32,
    pack: u64,
    offset: u64,
    written_at: UnixMillis,
}

/// Decodes a chunk record of either layout.
fn decode_chunk_record(key: &str, bytes: &[u8]) -> Result<ChunkRecord, StoreError> {
    if let Ok(record) = postcard::from_bytes::<ChunkRecord>(bytes) {
        return Ok(record);
    }
    let old: ChunkRecordWithoutCheck = decode("chunk", key, bytes)?;
    Ok(ChunkRecord {
        size: old.size,
        stored_bytes: old.stored_bytes,
        pack: old.pack,
        offset: old.offset,
        written_at: old.written_at,
        check: None,
    })
}

/// What a commit of an artifact or cache came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Stored,
    /// These chunks of the manifest are not stored (never sent, or collected since).
    Missing(Vec<Digest>),
    /// A cache with this key exists in this scope already.
    CacheExists,
}

/// Retention rules for one garbage collection.
#[derive(Debug, Clone, Copy)]
pub struct GcRules {
    pub now: UnixMillis,
    /// Unreferenced chunks younger than this stay (uploads whose session was lost).
    pub grace_ms: u64,
    /// Caches are evicted, least recently used first, until they total this much.
    pub cache_quota_bytes: u64,
    /// Caches unused this long are evicted.
    pub cache_max_idle_ms: u64,
    pub dry_run: bool,
}

/// Which of `digests` the chunk index lacks, in the order given, each once (read or
/// write transaction alike).
fn absent(
    chunks: &impl ReadableTable<&'static [u8], &'static [u8]>,
    digests: &[Digest],
) -> Result<Vec<Digest>, StoreError> {
    let mut seen = HashSet::with_capacity(digests.len());
    let mut missing = Vec::new();
    for digest in digests {
        if seen.insert(*digest)
            && chunks
                .get(digest.as_bytes().as_slice())
                .map_err(eng!("read chunk"))?
                .is_none()
        {
            missing.push(*digest);
        }
    }
    Ok(missing)
}

/// Inside the commit of an artifact or cache: stores its manifest if the index holds
/// every chunk in `chunks`, and returns the chunks it lacks (none: stored).
fn put_manifest_if_complete(
    tx: &redb::WriteTransaction,
    digest: &Digest,
    manifest: &[u8],
    chunks: &[Digest],
) -> Result<Vec<Digest>, StoreError> {
    let missing = absent(&tx.open_table(CHUNKS).map_err(eng!("open chunks"))?, chunks)?;
    if missing.is_empty() {
        tx.open_table(MANIFESTS)
            .map_err(eng!("open manifests"))?
            .insert(digest.as_bytes().as_slice(), manifest)
            .map_err(eng!("write manifest"))?;
    }
    Ok(missing)
}

/// Garbage collection, first step: removes expired artifacts and adds the manifests of
/// the others to `roots`. Returns how many expired.
fn expire_artifacts(
    tx: &redb::WriteTransaction,
    now: UnixMillis,
    roots: &mut HashSet<Digest>,
) -> Result<u64, StoreError> {
    let mut artifacts = tx.open_table(ARTIFACTS).map_err(eng!("open artifacts"))?;
    let mut expired: Vec<(u64, String)> = Vec::new();
    scan(
        artifacts.iter(),
        "scan artifacts",
        "artifact",
        |k, view: ArtifactView| {
            if view.expires_at <= now {
                let (run, name) = k.value();
                expired.push((run, name.to_owned()));
            } else {
                roots.insert(view.manifest);
            }
            ControlFlow::Continue(())
        },
    )?;
    for (run, name) in &expired {
        artifacts
            .remove((*run, name.as_str()))
            .map_err(eng!("remove artifact"))?;
    }
    Ok(expired.len() as u64)
}

/// Garbage collection, second step: evicts idle caches, then the least recently used
/// beyond the quota, and adds the manifests of those kept to `roots`. Returns how many
/// went.
fn evict_caches(
    tx: &redb::WriteTransaction,
    rules: &GcRules,
    roots: &mut HashSet<Digest>,
) -> Result<u64, StoreError> {
    let mut caches = tx.open_table(CACHES).map_err(eng!("open caches"))?;
    let mut all: Vec<CacheView> = collect(caches.iter(), "scan caches", "cache")?;
    all.sort_by_key(|c| std::cmp::Reverse(c.last_used));
    let mut total: u64 = 0;
    let mut evicted = 0;
    for view in all {
        let idle = rules.now.millis_since(view.last_used) >= rules.cache_max_idle_ms;
        if idle || total.saturating_add(view.bytes) > rules.cache_quota_bytes {
            evicted += 1;
            caches
                .remove(cache_key(&view.pipeline, &view.branch, &view.key).as_str())
                .map_err(eng!("remove cache"))?;
        } else {
            total += view.bytes;
            roots.insert(view.manifest);
        }
    }
    Ok(evicted)
}

/// Garbage collection, third step: removes the manifests not in `roots` and returns the
/// chunks the others name.
fn drop_unused_manifests(
    tx: &redb::WriteTransaction,
    roots: &HashSet<Digest>,
) -> Result<HashSet<Digest>, StoreError> {
    let mut manifests = tx.open_table(MANIFESTS).map_err(eng!("open manifests"))?;
    let mut referenced: HashSet<Digest> = HashSet::new();
    let mut unused: Vec<Vec<u8>> = Vec::new();
    scan_raw(manifests.iter(), "scan manifests", |k, v| {
        let key = k.value();
        let digest = <[u8; 32]>::try_from(key)
            .map(Digest::from_bytes)
            .map_err(|_| StoreError::Corrupt {
                what: "manifest",
                key: format!("{} bytes", key.len()),
                detail: "key is not a 32-byte digest".into(),
            })?;
        if !roots.contains(&digest) {
            unused.push(key.to_vec());
            return Ok(ControlFlow::Continue(()));
        }
        let manifest =
            gantry_cas::Manifest::decode(v.value()).map_err(|e| StoreError::Corrupt {
                what: "manifest",
                key: digest.to_string(),
                detail: e.to_string(),
            })?;
        for entry in &manifest.entries {
            if let gantry_cas::EntryKind::File { chunks, .. } = &entry.kind {
                referenced.extend(chunks.iter().map(|c| c.digest));
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    for key in &unused {
        manifests
            .remove(key.as_slice())
            .map_err(eng!("remove manifest"))?;
    }
    Ok(referenced)
}

/// Garbage collection, last step: removes the index rows of chunks no remaining
/// manifest names, unless `protected` holds them (open uploads) or they are younger
/// than the grace, and counts them all in `report`. Returns the removed chunks, whose
/// files the caller deletes.
fn sweep_chunks(
    tx: &redb::WriteTransaction,
    rules: &GcRules,
    referenced: &HashSet<Digest>,
    protected: &HashSet<Digest>,
    report: &mut GcReport,
) -> Result<Vec<Digest>, StoreError> {
    let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
    let mut sizes: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut doomed = Vec::new();
    scan_raw(chunks.iter(), "scan chunks", |k, v| {
        let key = k.value();
        let record = decode_chunk_record("index", v.value())?;
        let Ok(bytes) = <[u8; 32]>::try_from(key) else {
            return Ok(ControlFlow::Continue(()));
        };
        let digest = Digest::from_bytes(bytes);
        if referenced.contains(&digest) {
            report.chunks_kept += 1;
            report.bytes_kept += u64::from(record.stored_bytes);
        } else if protected.contains(&digest)
            || rules.now.millis_since(record.written_at) < rules.grace_ms
        {
            report.chunks_protected += 1;
            report.bytes_kept += u64::from(record.stored_bytes);
        } else {
            sizes.insert(key.to_vec(), u64::from(record.stored_bytes));
            doomed.push(digest);
        }
        Ok(ControlFlow::Continue(()))
    })?;
    report.chunks_deleted = doomed.len() as u64;
    report.bytes_freed = sizes.values().sum();
    for key in sizes.keys() {
        chunks
            .remove(key.as_slice())
            .map_err(eng!("remove chunk"))?;
    }
    Ok(doomed)
}

/// A cache's key in the table: scope and key, separated by NUL (which none may contain).
fn cache_key(pipeline: &str, branch: &str, key: &str) -> String {
    format!("{pipeline}\0{branch}\0{key}")
}

impl Store {
    /// Which of `digests` the index lacks, in the order given, each once.
    pub fn missing_chunks(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        absent(
            &tx.open_table(CHUNKS).map_err(eng!("open chunks"))?,
            digests,
        )
    }

    /// Records chunks whose files are durable, in one commit.
    pub fn add_chunks(&self, rows: &[(Digest, ChunkRecord)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            for (digest, record) in rows {
                chunks
                    .insert(digest.as_bytes().as_slice(), encode(record)?.as_slice())
                    .map_err(eng!("write chunk"))?;
            }
            Ok(())
        })
    }

    /// Stores an artifact and its manifest if every chunk it names is stored, replacing
    /// an artifact of the same name in the run (a retried job uploads again). One commit,
    /// so garbage collection sees either the artifact with all its chunks or neither.
    pub fn commit_artifact(
        &self,
        view: &ArtifactView,
        manifest: &[u8],
        chunks: &[Digest],
    ) -> Result<CommitOutcome, StoreError> {
        self.write(|tx| {
            let missing = put_manifest_if_complete(tx, &view.manifest, manifest, chunks)?;
            if !missing.is_empty() {
                return Ok(CommitOutcome::Missing(missing));
            }
            tx.open_table(ARTIFACTS)
                .map_err(eng!("open artifacts"))?
                .insert((view.run.0, view.name.as_str()), encode(view)?.as_slice())
                .map_err(eng!("write artifact"))?;
            Ok(CommitOutcome::Stored)
        })
    }

    /// Stores a cache and its manifest if every chunk is stored and no cache of that key
    /// exists in its scope (caches never change once written).
    pub fn commit_cache(
        &self,
        view: &CacheView,
        manifest: &[u8],
        chunks: &[Digest],
    ) -> Result<CommitOutcome, StoreError> {
        self.write(|tx| {
            let name = cache_key(&view.pipeline, &view.branch, &view.key);
            let mut caches = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            if caches
                .get(name.as_str())
                .map_err(eng!("read cache"))?
                .is_some()
            {
                return Ok(CommitOutcome::CacheExists);
            }
            let missing = put_manifest_if_complete(tx, &view.manifest, manifest, chunks)?;
            if !missing.is_empty() {
                return Ok(CommitOutcome::Missing(missing));
            }
            caches
                .insert(name.as_str(), encode(view)?.as_slice())
                .map_err(eng!("write cache"))?;
            Ok(CommitOutcome::Stored)
        })
    }

    /// Stores a source tree's manifest (a commit's tree or a `.git` payload) if every
    /// chunk it names is stored, or refreshes its time if it is; returns the chunks the
    /// index lacks (none: stored).
    pub fn commit_source_tree(
        &self,
        digest: &Digest,
        manifest: &[u8],
        chunks: &[Digest],
        now: UnixMillis,
    ) -> Result<Vec<Digest>, StoreError> {
        self.write(|tx| {
            let missing = put_manifest_if_complete(tx, digest, manifest, chunks)?;
            if missing.is_empty() {
                tx.open_table(SOURCE_TREES)
                    .map_err(eng!("open source trees"))?
                    .insert(digest.as_bytes().as_slice(), now.0)
                    .map_err(eng!("write source tree"))?;
            }
            Ok(missing)
        })
    }

    /// The artifacts of a run, by name.
    pub fn artifacts_of(&self, run: RunId) -> Result<Vec<ArtifactView>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(ARTIFACTS).map_err(eng!("open artifacts"))?;
        collect(
            table.range((run.0, "")..(run.0 + 1, "")),
            "scan artifacts",
            "artifact",
        )
    }

    /// A manifest's canonical bytes.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(MANIFESTS).map_err(eng!("open manifests"))?;
        Ok(table
            .get(digest.as_bytes().as_slice())
            .map_err(eng!("read manifest"))?
            .map(|v| v.value().to_vec()))
    }

    /// Every cache, newest first.
    pub fn caches(&self) -> Result<Vec<CacheView>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(CACHES).map_err(eng!("open caches"))?;
        let mut out: Vec<CacheView> = Vec::new();
        // Named `pipeline/branch/key` in an error, not by the NUL-separated key.
        scan_raw(table.iter(), "scan caches", |k, v| {
            out.push(decode("cache", &k.value().replace('\0', "/"), v.value())?);
            Ok(ControlFlow::Continue(()))
        })?;
        out.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.key.cmp(&b.key))
        });
        Ok(out)
    }

    /// Records that a cache was restored now (eviction is least recently used first).
    pub fn touch_cache(&self, cache: &CacheView, now: UnixMillis) -> Result<(), StoreError> {
        self.write(|tx| {
            let name = cache_key(&cache.pipeline, &cache.branch, &cache.key);
            let mut table = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            update(
                &mut table,
                name.as_str(),
                ["read cache", "write cache"],
                "cache",
                |current: &mut CacheView| current.last_used = now,
            )?;
            Ok(())
        })
    }

    /// Removes the caches `remove` selects (with an audit entry when any went); returns
    /// them.
    pub fn remove_caches(
        &self,
        remove: impl Fn(&CacheView) -> bool,
        audit: &AuditEntry,
    ) -> Result<Vec<CacheView>, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            let mut gone = Vec::new();
            scan(
                table.iter(),
                "scan caches",
                "cache",
                |_, view: CacheView| {
                    if remove(&view) {
                        gone.push(view);
                    }
                    ControlFlow::Continue(())
                },
            )?;
            for view in &gone {
                table
                    .remove(cache_key(&view.pipeline, &view.branch, &view.key).as_str())
                    .map_err(eng!("remove cache"))?;
            }
            drop(table);
            if !gone.is_empty() {
                let mut entry = audit.clone();
                entry.detail = format!("{} removed={}", entry.detail, gone.len());
                Self::append_audit(tx, &entry)?;
            }
            Ok(gone)
        })
    }

    /// One garbage collection of the index, in one commit: expires artifacts, evicts
    /// caches (idle ones, then least recently used beyond the quota), drops manifests
    /// nothing references, and removes index rows of chunks no remaining manifest names,
    /// unless `protected` holds them (open uploads) or they are younger than the grace.
    /// Returns the report and the chunks whose files the caller must delete.
    pub fn collect_garbage(
        &self,
        rules: GcRules,
        protected: &HashSet<Digest>,
    ) -> Result<(GcReport, Vec<Digest>), StoreError> {
        let tx = self.db.begin_write().map_err(eng!("begin"))?;
        let mut report = GcReport {
            dry_run: rules.dry_run,
            ..GcReport::default()
        };
        // Manifests something still needs: live artifacts, kept caches, and releases
        // environments ran (a rollback may stage one on a new host) or deployments under
        // way run, whatever their artifact's expiry.
        let mut roots: HashSet<Digest> = HashSet::new();
        report.artifacts_expired = expire_artifacts(&tx, rules.now, &mut roots)?;
        report.caches_evicted = evict_caches(&tx, &rules, &mut roots)?;
        releases_in_use(&tx, &mut roots)?;
        source_trees_in_use(&tx, rules.now, &mut roots)?;
        let referenced = drop_unused_manifests(&tx, &roots)?;
        let mut doomed = sweep_chunks(&tx, &rules, &referenced, protected, &mut report)?;
        if rules.dry_run {
            tx.abort().map_err(eng!("abort"))?;
            doomed.clear();
        } else {
            tx.commit().map_err(eng!("commit"))?;
        }
        Ok((report, doomed))
    }

    /// Where a chunk is, if stored.
    pub fn chunk(&self, digest: &Digest) -> Result<Option<ChunkRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
        match chunks
            .get(digest.as_bytes().as_slice())
            .map_err(eng!("read chunk"))?
        {
            Some(v) => Ok(Some(decode_chunk_record(&digest.to_string(), v.value())?)),
            None => Ok(None),
        }
    }

    /// Live bytes per pack, and the chunks of the packs in `detail` (for compaction).
    #[allow(clippy::type_complexity)] // a one-off pair of maps read in one transaction
    pub fn pack_usage(
        &self,
        detail: &HashSet<u64>,
    ) -> Result<(HashMap<u64, u64>, HashMap<u64, Vec<(Digest, ChunkRecord)>>), StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut rows: HashMap<u64, Vec<(Digest, ChunkRecord)>> = HashMap::new();
        scan_raw(chunks.iter(), "scan chunks", |k, v| {
            let record = decode_chunk_record("index", v.value())?;
            *live.entry(record.pack).or_default() += u64::from(record.stored_bytes);
            if detail.contains(&record.pack) {
                if let Ok(bytes) = <[u8; 32]>::try_from(k.value()) {
                    rows.entry(record.pack)
                        .or_default()
                        .push((Digest::from_bytes(bytes), record));
                }
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok((live, rows))
    }

    /// Points chunks at their new places (after compaction), in one commit; a chunk
    /// whose row changed meanwhile is left alone.
    pub fn relocate_chunks(
        &self,
        moves: &[(Digest, ChunkRecord, ChunkRecord)],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            for (digest, from, to) in moves {
                let current: Option<ChunkRecord> = match chunks
                    .get(digest.as_bytes().as_slice())
                    .map_err(eng!("read chunk"))?
                {
                    Some(v) => Some(decode_chunk_record(&digest.to_string(), v.value())?),
                    None => None,
                };
                if current.as_ref() == Some(from) {
                    chunks
                        .insert(digest.as_bytes().as_slice(), encode(to)?.as_slice())
                        .map_err(eng!("write chunk"))?;
                }
            }
            Ok(())
        })
    }

    /// Drops chunks from the index (found missing or corrupt on disk), so the next upload
    /// of their content stores them again.
    pub fn forget_chunks(&self, digests: &[Digest]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            for digest in digests {
                chunks
                    .remove(digest.as_bytes().as_slice())
                    .map_err(eng!("remove chunk"))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_records_written_before_checksums_read_back_without_one() {
        #[derive(Serialize)]
        struct Old {
            size: u32,
            stored_bytes: u32,
            pack: u64,
            offset: u64,
            written_at: UnixMillis,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("open");
        let (old_digest, new_digest) = (Digest::of(b"old"), Digest::of(b"new"));
        let old = Old {
            size: 3,
            stored_bytes: 12,
            pack: 0xabc,
            offset: 4096,
            written_at: UnixMillis(5),
        };
        store
            .write(|tx| {
                let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
                chunks
                    .insert(old_digest.as_bytes().as_slice(), encode(&old)?.as_slice())
                    .map_err(eng!("write chunk"))?;
                Ok(())
            })
            .expect("write an old record");
        let new = ChunkRecord {
            size: 3,
            stored_bytes: 12,
            pack: 0xabc,
            offset: 8192,
            written_at: UnixMillis(6),
            check: Some(u64::MAX),
        };
        store.add_chunks(&[(new_digest, new)]).expect("add");
        assert_eq!(
            store.chunk(&old_digest).expect("read"),
            Some(ChunkRecord {
                size: 3,
                stored_bytes: 12,
                pack: 0xabc,
                offset: 4096,
                written_at: UnixMillis(5),
                check: None,
            })
        );
        assert_eq!(store.chunk(&new_digest).expect("read"), Some(new));
        let (_, rows) = store
            .pack_usage(&HashSet::from([0xabc]))
            .expect("pack usage");
        assert_eq!(rows[&0xabc].len(), 2);
    }
}
