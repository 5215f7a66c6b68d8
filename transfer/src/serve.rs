//! The serving side of a `FetchChunks` stream from the local chunk cache: how a host
//! serves the release it is staging to the other hosts of the same deployment.
//!
//! Who may ask, and for which release, is the caller's decision (the agent checks the
//! peer's identity against what the coordinator said); this module only checks that
//! every wanted chunk belongs to the release, answers in the order asked, and waits for
//! a chunk the host is still fetching as long as its fetch makes progress (at most
//! [`limits::PEER_CHUNK_WAIT`] without any).
//! What it sends is what its cache holds, unverified: every reader verifies each chunk
//! before extracting it, so a damaged chunk costs the reader a fetch from the
//! coordinator, never a wrong file.

use std::collections::HashMap;
use std::time::Duration;

use gantry_protocol::{limits, ChunkFrame, ChunkWants, Digest, MAX_DIGESTS_PER_FRAME};
use gantry_transport::{FrameReader, FrameWriter};

use crate::{CachedChunk, ChunkCache, RateLimit};

/// What one served stream did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeFigures {
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks answered as unavailable (not here, and not arriving in time).
    pub unavailable: u64,
}

/// Serves one `FetchChunks` stream (its `StreamOpen` already read): reads every
/// [`ChunkWants`] frame until the reader finishes its side, then answers each digest in
/// order. `still_fetching` says whether a chunk missing here may still arrive (this host
/// is fetching the release itself); `limit` caps what this host sends.
pub async fn serve_chunks<S: std::hash::BuildHasher>(
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    cache: &ChunkCache,
    sizes: &HashMap<Digest, u32, S>,
    still_fetching: &(dyn Fn() -> bool + Send + Sync),
    limit: Option<&RateLimit>,
) -> Result<ServeFigures, String> {
    let mut wanted: Vec<(Digest, u32)> = Vec::new();
    loop {
        let batch = tokio::time::timeout(limits::PEER_STALL, reader.recv::<ChunkWants>())
            .await
            .map_err(|_| "the peer sent no request in time".to_string())?
            .map_err(|e| e.to_string())?;
        let Some(ChunkWants(digests)) = batch else {
            break;
        };
        if digests.len() > MAX_DIGESTS_PER_FRAME || wanted.len() + digests.len() > sizes.len() {
            return refuse(writer, "more chunks asked for than the release has".into()).await;
        }
        for digest in digests {
            let Some(&size) = sizes.get(&digest) else {
                return refuse(
                    writer,
                    format!("chunk {digest} is not part of this release"),
                )
                .await;
            };
            wanted.push((digest, size));
        }
    }
    let mut figures = ServeFigures::default();
    let mut published = cache.subscribe();
    for (digest, size) in wanted {
        let Some(data) = chunk_when_here(cache, &digest, &mut published, still_fetching).await
        else {
            figures.unavailable += 1;
            let frame = ChunkFrame::Unavailable {
                digest,
                reason: "this host does not have it (yet)".into(),
            };
            writer.send(&frame).await.map_err(|e| e.to_string())?;
            // The reader stops at the first gap and asks the coordinator for the rest.
            break;
        };
        if let Some(limit) = limit {
            limit.take(data.len()).await;
        }
        figures.chunks += 1;
        figures.bytes += data.len() as u64;
        crate::send_chunk_data(writer, digest, size, data)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(figures)
}

async fn refuse(writer: &mut FrameWriter, message: String) -> Result<ServeFigures, String> {
    let _ = writer
        .send(&ChunkFrame::Refused {
            message: message.clone(),
        })
        .await;
    Err(message)
}

/// The chunk's bytes once the cache has them, waiting while this host still fetches the
/// release and its cache keeps receiving: at most [`limits::PEER_CHUNK_WAIT`] after the
/// last chunks arrived (a host behind a slow link may take long for its range, and is
/// waited for as long as it makes progress).
async fn chunk_when_here(
    cache: &ChunkCache,
    digest: &Digest,
    published: &mut tokio::sync::watch::Receiver<u64>,
    still_fetching: &(dyn Fn() -> bool + Send + Sync),
) -> Option<gantry_transport::Bytes> {
    let mut progress_at = tokio::time::Instant::now();
    loop {
        // Mark what has been seen before looking, so a segment published between the
        // look and the wait still wakes the wait.
        published.borrow_and_update();
        let (cache2, digest2) = (cache.clone(), *digest);
        let found =
            tokio::task::spawn_blocking(move || cache2.get(&digest2).map(CachedChunk::into_frame));
        if let Ok(Some(data)) = found.await {
            return Some(data);
        }
        let idle = progress_at.elapsed();
        if idle >= limits::PEER_CHUNK_WAIT || !still_fetching() {
            return None;
        }
        // A wake-up at least every 250 ms also notices a fetch that ended.
        let wait = limits::PEER_CHUNK_WAIT
            .saturating_sub(idle)
            .min(Duration::from_millis(250));
        if let Ok(Ok(())) = tokio::time::timeout(wait, published.changed()).await {
            progress_at = tokio::time::Instant::now();
        }
    }
}
