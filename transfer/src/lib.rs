//! `gantry-transfer`: the client side of artifact and cache transfers, shared by the
//! agent (a job's inputs and outputs) and the admin CLI (`gantry artifacts get`).
//!
//! Owns: fetching a manifest and checking it against its digest; fetching the chunks a
//! local [`ChunkCache`] lacks over several streams at once, verifying every chunk and
//! fetching again any that arrive corrupt; extracting from the cache (never writing
//! outside the destination, see `gantry-cas`); and uploading a tree so that only the
//! chunks the coordinator lacks are sent, then committing its manifest.
//!
//! Resumption is by construction: a download keeps every verified chunk in the cache, so
//! after a dropped connection a new attempt fetches only the rest; an upload asks again
//! which chunks are missing, so a new attempt sends only those.
//!
//! It also serves chunks from the cache to peers ([`serve_chunks`]), and fetches from
//! them ([`Swarm`]), for a deployment's hosts staging one release together.
//!
//! It must not know where the cache lives or why a transfer happens: callers pass a
//! [`Connection`], a [`Grant`] and a cache (and decide who may fetch from them).

mod cache;
mod download;
mod limit;
mod serve;
mod upload;

use gantry_protocol::Digest;
use gantry_transport::{Bytes, TransportError};

pub use cache::{
    CacheFigures, CacheReader, CacheWriter, CachedChunk, ChunkCache, HandOff, Pin, ADOPT_MIN_FILE,
};
pub use download::{
    chunk_sizes, download, download_tree, fetch_manifest, owner_ranges, DownloadFigures, PeerDial,
    PeerLink, Sources, Swarm,
};
pub use limit::RateLimit;
pub use serve::{serve_chunks, ServeFigures};
pub use upload::{upload, UploadFigures};

/// Sends one chunk as a `ChunkFrame::Data`: the frame's head, then `data` (the chunk's
/// stored, compressed bytes) handed to quinn as it is, not copied into an encoded frame.
pub async fn send_chunk_data(
    writer: &mut gantry_transport::FrameWriter,
    digest: Digest,
    size: u32,
    data: impl Into<Bytes>,
) -> Result<(), TransportError> {
    let data = data.into();
    let head = gantry_protocol::ChunkFrame::data_frame_head(digest, size, data.len())?;
    let mut pieces = [Bytes::from(head), data];
    writer.send_pieces(&mut pieces).await
}

/// Streams used at once by one transfer unless the caller says otherwise. Four keep a
/// loopback or LAN link busy while one stream waits on disk or verification.
pub const DEFAULT_STREAMS: usize = 4;

/// How a transfer is run.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Parallel streams (at least 1).
    pub streams: usize,
    /// A byte rate shared with every other transfer holding the same limit.
    pub limit: Option<std::sync::Arc<RateLimit>>,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            streams: DEFAULT_STREAMS,
            limit: None,
        }
    }
}

/// Why a transfer failed. [`TransferError::is_retryable`] tells a broken connection
/// (try again on the next one; the work done so far is kept) from a refusal.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("the connection broke during the transfer: {0}")]
    Transport(#[from] TransportError),
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error("the coordinator cannot serve chunk {digest}: {reason}")]
    Unavailable { digest: Digest, reason: String },
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Cas(#[from] gantry_cas::CasError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator answered out of turn: {0}")]
    Protocol(String),
}

impl TransferError {
    /// Whether trying again on a new connection can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transport(_))
    }

    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// `1.5 MiB`, for log lines.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
