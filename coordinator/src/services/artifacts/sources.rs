//! Commits stored as runs' sources (issue 24): the chunks of a walked tree go straight
//! into packs (no upload session: the coordinator is its own uploader), and each
//! manifest (the tree, a `.git` payload) is committed once every chunk it names is
//! durable, as a source tree that garbage collection keeps
//! (`store::SOURCE_TREE_KEEP_MS`). Jobs of a run may read the manifests its source
//! names (`scope.rs`).
//!
//! Blocking (compression, file writes, fsync): callers run it on a blocking thread.

use std::collections::HashSet;

use gantry_cas::Manifest;
use gantry_protocol::{Digest, UnixMillis};

use crate::base::chunks::{stored_check, PackWriter};
use crate::services::artifacts::{Artifacts, ChunkRefused, StreamError};
use crate::store::ChunkRecord;

/// Most compressed bytes in one pack before it is made durable.
const TREE_PACK_BYTES: usize = 32 * 1024 * 1024;

/// What a [`TreeWriter`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeFigures {
    /// Chunks new to the store, and their compressed bytes.
    pub chunks_written: u64,
    pub bytes_written: u64,
    /// Chunks handed over that the store already had.
    pub chunks_known: u64,
}

/// Writes chunks into the store for source trees; see the module's doc.
pub struct TreeWriter<'a> {
    artifacts: &'a Artifacts,
    pack: Option<PackWriter>,
    pack_bytes: usize,
    rows: Vec<(Digest, ChunkRecord)>,
    seen: HashSet<Digest>,
    pub figures: TreeFigures,
}

impl Artifacts {
    /// A writer of source trees' chunks and manifests.
    pub fn tree_writer(&self) -> Result<TreeWriter<'_>, StreamError> {
        self.disk.check()?;
        Ok(TreeWriter {
            artifacts: self,
            pack: None,
            pack_bytes: 0,
            rows: Vec::new(),
            seen: HashSet::new(),
            figures: TreeFigures::default(),
        })
    }
}

impl TreeWriter<'_> {
    /// Stores a chunk unless the store (or this writer) already has it.
    pub fn put(&mut self, digest: Digest, bytes: &[u8]) -> Result<(), StreamError> {
        if !self.seen.insert(digest) {
            return Ok(());
        }
        if self.artifacts.store.chunk(&digest)?.is_some() {
            self.figures.chunks_known += 1;
            return Ok(());
        }
        let compressed = gantry_cas::compress(bytes);
        let pack = match &mut self.pack {
            Some(pack) => pack,
            None => self.pack.insert(
                self.artifacts
                    .chunks
                    .new_pack()
                    .map_err(StreamError::PackStart)?,
            ),
        };
        let location = pack
            .append(&compressed)
            .map_err(|source| ChunkRefused::Write { digest, source })?;
        self.rows.push((
            digest,
            ChunkRecord {
                size: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                stored_bytes: location.len,
                pack: location.pack,
                offset: location.offset,
                written_at: UnixMillis::now(),
                check: Some(stored_check(&compressed)),
            },
        ));
        self.figures.chunks_written += 1;
        self.figures.bytes_written += compressed.len() as u64;
        self.pack_bytes += compressed.len();
        if self.pack_bytes >= TREE_PACK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes the chunks written so far durable and indexes them. Holds the collection
    /// lock shared from the pack's rename to the index commit, as uploads do.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        let Some(pack) = self.pack.take() else {
            return Ok(());
        };
        self.pack_bytes = 0;
        let synced = pack.sync().map_err(StreamError::PackSync)?;
        let _publishing = self.artifacts.collecting.blocking_read();
        synced.publish().map_err(StreamError::PackPublish)?;
        self.artifacts
            .store
            .add_chunks(&std::mem::take(&mut self.rows))?;
        Ok(())
    }

    /// Commits `manifest` as a source tree once its chunks are durable. `Ok(Err(missing))`
    /// names chunks the store lacks: a blob memo promised chunks that are gone (collected
    /// since, or never made durable); the caller walks again without the memo.
    pub fn commit(
        &mut self,
        manifest: &Manifest,
    ) -> Result<Result<Digest, Vec<Digest>>, StreamError> {
        self.flush()?;
        let bytes = manifest.encode();
        let digest = Digest::of(&bytes);
        let mut chunks = Vec::new();
        for entry in &manifest.entries {
            if let gantry_cas::EntryKind::File { chunks: c, .. } = &entry.kind {
                chunks.extend(c.iter().map(|c| c.digest));
            }
        }
        let missing =
            self.artifacts
                .store
                .commit_source_tree(&digest, &bytes, &chunks, UnixMillis::now())?;
        Ok(if missing.is_empty() {
            Ok(digest)
        } else {
            Err(missing)
        })
    }
}
