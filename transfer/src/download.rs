//! Downloads: a manifest, the chunks the cache lacks (several streams at once, each
//! chunk verified, a corrupt one fetched again), then extraction from the cache.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_cas::{EntryKind, Existing, Manifest};
use gantry_protocol::{
    ChunkFrame, ChunkWants, Digest, Grant, ManifestFrame, StreamOpen, MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::Connection;
use tokio::task::JoinSet;

use crate::{ChunkCache, TransferError, TransferOptions};

/// Rounds of fetching again chunks that arrived corrupt (or went bad in the cache)
/// before the download gives up.
const MAX_REFETCH_ROUNDS: usize = 3;

/// What one download did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownloadFigures {
    pub files: u64,
    /// Bytes of the files written.
    pub bytes: u64,
    /// Distinct chunks the manifest names.
    pub chunks: u64,
    /// Chunks fetched from the coordinator (the rest came from the cache).
    pub chunks_fetched: u64,
    /// Compressed bytes received.
    pub bytes_fetched: u64,
    /// Chunks that arrived corrupt (or were corrupt in the cache) and were fetched again.
    pub chunks_refetched: u64,
    pub fetch_time: Duration,
    pub extract_time: Duration,
}

/// Fetches a manifest and checks that it is the one asked for and well formed.
pub async fn fetch_manifest(
    conn: &Connection,
    grant: &Grant,
    digest: &Digest,
) -> Result<Manifest, TransferError> {
    let (mut writer, mut reader) = conn.open_stream().await?;
    writer
        .send(&StreamOpen::GetManifest {
            grant: grant.clone(),
            manifest: *digest,
        })
        .await?;
    writer.finish();
    let declared = match reader.recv::<ManifestFrame>().await? {
        Some(ManifestFrame::Start { bytes }) => bytes,
        Some(ManifestFrame::Refused { message }) => return Err(TransferError::Refused(message)),
        other => {
            return Err(TransferError::Protocol(format!(
                "expected a manifest, got {other:?}"
            )))
        }
    };
    if declared > gantry_cas::MAX_MANIFEST_BYTES as u64 {
        return Err(TransferError::Corrupt(format!(
            "manifest {digest} is declared as {declared} bytes, more than the limit of {}",
            gantry_cas::MAX_MANIFEST_BYTES
        )));
    }
    let mut bytes = Vec::with_capacity(declared.min(16 << 20) as usize);
    while (bytes.len() as u64) < declared {
        match reader.recv::<ManifestFrame>().await? {
            Some(ManifestFrame::Piece(piece)) if bytes.len() + piece.len() <= declared as usize => {
                bytes.extend_from_slice(&piece);
            }
            other => {
                return Err(TransferError::Protocol(format!(
                    "manifest {digest} broke off after {} of {declared} bytes ({})",
                    bytes.len(),
                    match other {
                        Some(_) => "an unexpected frame",
                        None => "end of stream",
                    }
                )))
            }
        }
    }
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(TransferError::Corrupt(format!(
            "manifest {digest} arrived as {actual}: refused"
        )));
    }
    Manifest::decode(&bytes)
        .map_err(|e| TransferError::Corrupt(format!("manifest {digest} is refused: {e}")))
}

/// Every distinct chunk of a manifest with its size, in manifest order.
fn chunk_list(manifest: &Manifest) -> Vec<(Digest, u32)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in &manifest.entries {
        if let EntryKind::File { chunks, .. } = &entry.kind {
            for c in chunks {
                if seen.insert(c.digest) {
                    out.push((c.digest, c.size));
                }
            }
        }
    }
    out
}

/// Downloads the tree of `manifest_digest` into `dest`: fetches the manifest, the chunks
/// `cache` lacks, and extracts. `existing` says whether `dest` may already hold files.
/// After a dropped connection, calling it again fetches only what the cache still lacks.
pub async fn download(
    conn: &Connection,
    grant: &Grant,
    manifest_digest: &Digest,
    cache: &ChunkCache,
    dest: &Path,
    existing: Existing,
    options: &TransferOptions,
) -> Result<DownloadFigures, TransferError> {
    let manifest = Arc::new(fetch_manifest(conn, grant, manifest_digest).await?);
    let chunks = chunk_list(&manifest);
    let _pin = cache.pin(chunks.iter().map(|(d, _)| *d));
    let mut figures = DownloadFigures {
        chunks: chunks.len() as u64,
        ..DownloadFigures::default()
    };
    for entry in &manifest.entries {
        if let EntryKind::File { size, .. } = &entry.kind {
            figures.files += 1;
            figures.bytes += size;
        }
    }
    let mut mode = existing;
    let mut round = 0;
    loop {
        let started = Instant::now();
        let wanted: Vec<(Digest, u32)> = chunks
            .iter()
            .filter(|(d, _)| !cache.contains(d))
            .copied()
            .collect();
        fetch_into_cache(
            conn,
            grant,
            manifest_digest,
            wanted,
            cache,
            options,
            &mut figures,
        )
        .await?;
        figures.fetch_time += started.elapsed();
        let started = Instant::now();
        let extracted = {
            let (manifest, cache, dest) = (manifest.clone(), cache.clone(), dest.to_path_buf());
            tokio::task::spawn_blocking(move || extract_from_cache(&manifest, &dest, &cache, mode))
                .await
                .map_err(|e| TransferError::Corrupt(format!("extraction stopped: {e}")))?
        };
        figures.extract_time += started.elapsed();
        match extracted {
            Ok(()) => return Ok(figures),
            // A cached chunk went bad: check every cached chunk of the tree once (a disk
            // that damaged one may have damaged more), drop the bad ones, fetch them
            // again and finish the tree, now merging over what the first pass wrote.
            Err(BadChunk(digest)) if round < MAX_REFETCH_ROUNDS => {
                let (cache2, chunks2) = (cache.clone(), chunks.clone());
                let purged = tokio::task::spawn_blocking(move || purge_corrupt(&cache2, &chunks2))
                    .await
                    .map_err(|e| TransferError::Corrupt(format!("cache check stopped: {e}")))?;
                tracing::warn!(chunk = %digest, purged, "cached chunks were corrupt; fetching them again");
                figures.chunks_refetched += purged.max(1);
                mode = Existing::Merge;
                round += 1;
            }
            Err(BadChunk(digest)) => {
                return Err(TransferError::Corrupt(format!(
                    "chunk {digest} arrived corrupt {} times in a row: the coordinator or the link is damaging data",
                    MAX_REFETCH_ROUNDS + 1
                )))
            }
            Err(Other(e)) => return Err(e),
        }
    }
}

/// Fetches `wanted` into the cache over `options.streams` streams. Chunks that arrive
/// corrupt are fetched again, up to [`MAX_REFETCH_ROUNDS`] times.
async fn fetch_into_cache(
    conn: &Connection,
    grant: &Grant,
    manifest: &Digest,
    mut wanted: Vec<(Digest, u32)>,
    cache: &ChunkCache,
    options: &TransferOptions,
    figures: &mut DownloadFigures,
) -> Result<(), TransferError> {
    for round in 0..=MAX_REFETCH_ROUNDS {
        if wanted.is_empty() {
            return Ok(());
        }
        if round > 0 {
            tracing::warn!(
                chunks = wanted.len(),
                "chunks arrived corrupt; fetching them again"
            );
            figures.chunks_refetched += wanted.len() as u64;
        }
        let streams = options.streams.clamp(1, 16).min(wanted.len());
        let mut shares: Vec<Vec<(Digest, u32)>> = vec![Vec::new(); streams];
        for (i, chunk) in wanted.iter().enumerate() {
            shares[i % streams].push(*chunk);
        }
        let mut tasks = JoinSet::new();
        for share in shares {
            let (conn, grant, manifest, cache) =
                (conn.clone(), grant.clone(), *manifest, cache.clone());
            let limit = options.limit.clone();
            tasks.spawn(async move {
                fetch_share(&conn, &grant, &manifest, share, &cache, limit.as_deref()).await
            });
        }
        // Every stream is waited for, even after one fails: each keeps what it verified
        // (a stream cut off mid-way makes its chunks visible on the way out), which a
        // stream aborted from here would not.
        let mut corrupt = Vec::new();
        let mut failed: Option<TransferError> = None;
        while let Some(joined) = tasks.join_next().await {
            let share = joined
                .map_err(|e| TransferError::Corrupt(format!("a fetch task stopped: {e}")))
                .and_then(|share| share);
            match share {
                Ok(share) => {
                    figures.chunks_fetched += share.fetched;
                    figures.bytes_fetched += share.bytes;
                    corrupt.extend(share.corrupt);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        wanted = corrupt;
    }
    Err(TransferError::Corrupt(format!(
        "{} chunks arrived corrupt {} times in a row: the coordinator or the link is damaging data",
        wanted.len(),
        MAX_REFETCH_ROUNDS + 1
    )))
}

struct ShareResult {
    fetched: u64,
    bytes: u64,
    /// Chunks whose bytes did not match their digest: not cached, to fetch again.
    corrupt: Vec<(Digest, u32)>,
}

/// One stream's part of a download.
async fn fetch_share(
    conn: &Connection,
    grant: &Grant,
    manifest: &Digest,
    share: Vec<(Digest, u32)>,
    cache: &ChunkCache,
    limit: Option<&crate::RateLimit>,
) -> Result<ShareResult, TransferError> {
    let (mut writer, mut reader) = conn.open_stream().await?;
    writer
        .send(&StreamOpen::FetchChunks {
            grant: grant.clone(),
            manifest: *manifest,
        })
        .await?;
    for batch in share.chunks(MAX_DIGESTS_PER_FRAME) {
        writer
            .send(&ChunkWants(batch.iter().map(|(d, _)| *d).collect()))
            .await?;
    }
    writer.finish();
    let sizes: HashMap<Digest, u32> = share.iter().copied().collect();
    let mut result = ShareResult {
        fetched: 0,
        bytes: 0,
        corrupt: Vec::new(),
    };
    // Verified chunks go into segments of the cache, written by the verifying threads.
    let writer = Arc::new(Mutex::new(
        cache
            .writer()
            .map_err(TransferError::io("cannot write to the chunk cache"))?,
    ));
    let mut verifying: JoinSet<Result<Option<(Digest, u32)>, TransferError>> = JoinSet::new();
    let received = receive_share(
        &mut reader,
        &sizes,
        share.len(),
        limit,
        &writer,
        &mut verifying,
        &mut result,
    )
    .await;
    // Whatever happened, what was verified is kept: wait for the verifications still
    // running, then make their segment visible, so a new attempt after a dropped
    // connection fetches only the rest.
    while let Some(joined) = verifying.join_next().await {
        if let Ok(Ok(Some(bad))) = joined {
            result.corrupt.push(bad);
        }
    }
    let writer = Arc::try_unwrap(writer)
        .map_err(|_| TransferError::Protocol("a verification outlived its stream".into()))?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let finished = tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(|e| TransferError::Corrupt(format!("the cache writer stopped: {e}")))?
        .map_err(TransferError::io("cannot write to the chunk cache"));
    received?;
    finished?;
    Ok(result)
}

/// Reads one stream's chunks, verifying each on a blocking thread (at most four at a
/// time) and appending the good ones to `writer`.
async fn receive_share(
    reader: &mut gantry_transport::FrameReader,
    sizes: &HashMap<Digest, u32>,
    count: usize,
    limit: Option<&crate::RateLimit>,
    writer: &Arc<Mutex<crate::CacheWriter>>,
    verifying: &mut JoinSet<Result<Option<(Digest, u32)>, TransferError>>,
    result: &mut ShareResult,
) -> Result<(), TransferError> {
    for _ in 0..count {
        let frame = reader.recv::<ChunkFrame>().await?.ok_or_else(|| {
            TransferError::Protocol("the chunk stream ended before every chunk arrived".into())
        })?;
        match frame {
            ChunkFrame::Data { digest, size, data } => {
                if sizes.get(&digest) != Some(&size) {
                    return Err(TransferError::Protocol(format!(
                        "chunk {digest} ({size} bytes) was not asked for"
                    )));
                }
                if let Some(limit) = limit {
                    limit.take(data.len()).await;
                }
                result.fetched += 1;
                result.bytes += data.len() as u64;
                if verifying.len() >= 4 {
                    if let Some(bad) = next_verified(verifying).await? {
                        result.corrupt.push(bad);
                    }
                }
                let writer = writer.clone();
                // Stored as received: every chunk is verified (bounded decompression,
                // BLAKE3) when it is read back to extract, which is also what catches a
                // chunk damaged in the cache. Verifying here too cost a fifth of a
                // downloading agent's CPU time for nothing.
                verifying.spawn_blocking(move || {
                    if size as usize > gantry_cas::MAX_CHUNK
                        || data.len() > gantry_cas::MAX_COMPRESSED_CHUNK
                    {
                        tracing::warn!(
                            "refusing chunk {digest} from the coordinator: out of bounds"
                        );
                        return Ok(Some((digest, size)));
                    }
                    writer
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .append(&digest, &data)
                        .map_err(TransferError::io("cannot write to the chunk cache"))?;
                    Ok(None)
                });
            }
            ChunkFrame::Unavailable { digest, reason } => {
                return Err(TransferError::Unavailable { digest, reason })
            }
            ChunkFrame::Refused { message } => return Err(TransferError::Refused(message)),
        }
    }
    while let Some(bad) = next_verified(verifying).await? {
        result.corrupt.push(bad);
    }
    Ok(())
}

/// Waits for one verification; `Ok(Some(chunk))` when it was corrupt. With nothing left
/// to wait for, `Ok(None)` as well, so callers loop until the set is empty.
async fn next_verified(
    set: &mut JoinSet<Result<Option<(Digest, u32)>, TransferError>>,
) -> Result<Option<(Digest, u32)>, TransferError> {
    loop {
        match set.join_next().await {
            None => return Ok(None),
            Some(Ok(Ok(Some(bad)))) => return Ok(Some(bad)),
            Some(Ok(Err(e))) => return Err(e),
            Some(Ok(Ok(None))) => {
                if set.is_empty() {
                    return Ok(None);
                }
            }
            Some(Err(e)) => {
                return Err(TransferError::Corrupt(format!(
                    "chunk verification stopped: {e}"
                )))
            }
        }
    }
}

/// Verifies every cached chunk of `chunks`, removing the corrupt ones; returns how many
/// went.
fn purge_corrupt(cache: &ChunkCache, chunks: &[(Digest, u32)]) -> u64 {
    let mut purged = 0;
    for (digest, size) in chunks {
        if let Some(compressed) = cache.get(digest) {
            if gantry_cas::decompress(&compressed, *size as usize, digest).is_err() {
                cache.remove(digest);
                purged += 1;
            }
        }
    }
    purged
}

/// Why an extraction from the cache stopped.
enum ExtractError {
    /// A cached chunk was missing or corrupt; it was removed from the cache.
    BadChunk(Digest),
    Other(TransferError),
}
use ExtractError::{BadChunk, Other};

fn extract_from_cache(
    manifest: &Manifest,
    dest: &Path,
    cache: &ChunkCache,
    existing: Existing,
) -> Result<(), ExtractError> {
    let sizes: HashMap<Digest, u32> = chunk_list(manifest).into_iter().collect();
    let mut bad: Option<Digest> = None;
    let result = gantry_cas::extract_with(manifest, dest, existing, |digest| {
        let size = sizes.get(digest).copied().unwrap_or(0);
        let Some(compressed) = cache.get(digest) else {
            bad = Some(*digest);
            return Err(gantry_cas::CasError::CorruptChunk {
                digest: *digest,
                reason: "not in the cache".into(),
            });
        };
        gantry_cas::decompress(&compressed, size as usize, digest).inspect_err(|_| {
            cache.remove(digest);
            bad = Some(*digest);
        })
    });
    match (result, bad) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(digest)) => Err(BadChunk(digest)),
        (Err(e), None) => Err(Other(e.into())),
    }
}
