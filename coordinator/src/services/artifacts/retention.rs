//! Retention: expiring artifacts, evicting caches, and collecting the chunks and packs
//! nothing references, periodically and on `gantry gc`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use gantry_protocol::{Digest, GcReport, UnixMillis};

use crate::base::chunks::{ChunkStore, Location};
use crate::services::artifacts::{lock, Artifacts};
use crate::store::{ChunkRecord, GcRules, Store, StoreError};

/// Why a garbage collection stopped; what it freed before stays freed, and the next
/// one starts over.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listing, writing or removing packs.
    #[error(transparent)]
    Packs(#[from] std::io::Error),
    #[error("compacting pack {pack:016x}: {source}")]
    Compact { pack: u64, source: std::io::Error },
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Artifacts {
    /// Expires, evicts and collects now. Holds the collection lock exclusively, so no
    /// chunk is being written meanwhile.
    pub async fn collect_garbage(
        &self,
        dry_run: bool,
        grace: Option<Duration>,
    ) -> Result<GcReport, GcError> {
        let _exclusive = self.collecting.write().await;
        let grace = grace.unwrap_or(self.settings.gc_grace);
        let protected: HashSet<Digest> = lock(&self.sessions)
            .open
            .values()
            .flat_map(|s| s.pinned.iter().copied())
            .collect();
        let now = UnixMillis::now();
        let rules = GcRules {
            now,
            grace_ms: grace.as_millis() as u64,
            cache_quota_bytes: self.settings.cache_quota_bytes,
            cache_max_idle_ms: self.settings.cache_max_idle.as_millis() as u64,
            dry_run,
        };
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let report = tokio::task::spawn_blocking(move || {
            let (mut report, _dropped) = store.collect_garbage(rules, &protected)?;
            // What is freed on disk: packs nothing uses, and the dead part of packs
            // that were rewritten.
            report.bytes_freed = collect_packs(&store, &chunks, rules.grace_ms, dry_run)?;
            Ok::<_, GcError>(report)
        })
        .await??;
        lock(&self.manifests).clear();
        tracing::info!(?report, "garbage collection done");
        Ok(report)
    }

    /// Runs garbage collection every `gc_interval`, forever.
    pub async fn collect_periodically(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.gc_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.collect_garbage(false, None).await {
                tracing::error!("garbage collection failed: {e}");
            }
        }
    }
}

/// Packs at most half full of live chunks are rewritten, so dead chunks never take more
/// than about as much disk as live ones.
const COMPACT_BELOW_LIVE_SHARE: f64 = 0.5;

/// The pack side of a garbage collection, after the index dropped dead chunks: deletes
/// packs nothing points at (once older than the grace, so a pack whose chunks are being
/// indexed right now is spared), and rewrites packs mostly dead. Returns the bytes
/// freed on disk.
fn collect_packs(
    store: &Store,
    chunks: &ChunkStore,
    grace_ms: u64,
    dry_run: bool,
) -> Result<u64, GcError> {
    let now = UnixMillis::now();
    let packs = chunks.list_packs()?;
    let (live, _) = store.pack_usage(&HashSet::new())?;
    let mut freed = 0u64;
    let mut sparse = HashSet::new();
    for (pack, size, modified) in &packs {
        match live.get(pack) {
            None if now.millis_since(UnixMillis(*modified)) >= grace_ms => {
                freed += size;
                if !dry_run {
                    chunks.remove_pack(*pack)?;
                }
            }
            Some(&bytes) if (bytes as f64) < (*size as f64) * COMPACT_BELOW_LIVE_SHARE => {
                sparse.insert(*pack);
                freed += size - bytes;
            }
            // Young and unindexed (being indexed now), or mostly live: kept.
            _ => {}
        }
    }
    if dry_run || sparse.is_empty() {
        return Ok(freed);
    }
    let (_, rows) = store.pack_usage(&sparse)?;
    for (old, rows) in rows {
        let mut writer = chunks.new_pack()?;
        let mut moves = Vec::with_capacity(rows.len());
        for (digest, record) in rows {
            let data = chunks
                .read_raw(Location {
                    pack: record.pack,
                    offset: record.offset,
                    len: record.stored_bytes,
                })
                .map_err(|source| GcError::Compact { pack: old, source })?;
            let location = writer.append(&data)?;
            let relocated = ChunkRecord {
                pack: location.pack,
                offset: location.offset,
                ..record
            };
            moves.push((digest, record, relocated));
        }
        writer.finish()?;
        store.relocate_chunks(&moves)?;
        chunks.remove_pack(old)?;
    }
    Ok(freed)
}
