//! Artifacts and caches on the coordinator: the bulk streams that read and write them,
//! who may do what, and retention (expiry, eviction, garbage collection).
//!
//! Owns the rules: an agent reads only manifests of the run whose job it holds (the
//! run's artifacts and source, and the caches its branch may see) and writes only its own job's
//! declared artifact and cache; an admin reads everything. Chunks are verified before
//! they are stored (an uploader cannot plant bytes under another chunk's digest) and
//! again before they are served (a chunk corrupted on disk is quarantined and reported,
//! never sent). The index is the store's; chunk files are [`ChunkStore`]'s.
//!
//! Garbage collection never takes a chunk that a live manifest names, that an open
//! upload session has been told exists or has sent, or that was written less than the
//! grace period ago; and a commit re-checks every chunk in the same transaction that
//! stores the manifest, so a chunk collected between "you have it" and the commit is
//! reported missing and sent again rather than silently lost.
//!
//! - `scope.rs`: the one check of who may read or write what (an agent holds the
//!   attempt its grant names, `services::holds`; a deploy grant names a running
//!   deployment's release);
//! - `reads.rs`: resolving grants, manifests and chunks to readers, verified;
//! - `writes.rs`: uploads, chunk packs and commits;
//! - `retention.rs`: expiry, eviction and garbage collection;
//! - `sources.rs`: commits stored as runs' sources (a tree's chunks and manifests);
//! - `admin.rs`: what admins ask of artifacts and caches;
//! - `frames.rs`: reading a stream's frames ahead of the work.

pub mod admin;
mod frames;
mod reads;
pub mod retention;
mod scope;
pub mod sources;
mod writes;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use gantry_cas::{MAX_CHUNK, MAX_COMPRESSED_CHUNK, MAX_MANIFEST_BYTES};
use gantry_pipeline::Pipeline;
use gantry_protocol::{
    AgentId, Digest, JobId, ResolveReply, RunId, StreamOpen, MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::{FrameReader, FrameWriter, TransportError};
use tokio::sync::RwLock;

use crate::base::authz::Denied;
use crate::base::chunks::ChunkStore;
use crate::base::config::ArtifactSettings;
use crate::base::disk::{DiskSpace, LowSpace, OutOfSpace};
use crate::base::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Parsed pipelines kept for authorization checks; cleared when full.
const MAX_CACHED_PIPELINES: usize = 256;

/// Decoded manifests (their chunk lists) kept for serving chunks; cleared when full.
const MAX_CACHED_MANIFESTS: usize = 64;

/// Why an artifact stream was refused or broke. Its message is what the peer is told
/// (in the stream's own reply type, where it has a refusal) and what the coordinator
/// logs.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The authorization table refused (its message says why).
    #[error(transparent)]
    Refused(#[from] Denied),
    #[error("no job {0}")]
    NoJob(JobId),
    #[error("no run {0}")]
    NoRun(RunId),
    #[error("the run's pipeline no longer parses: {0}")]
    Pipeline(gantry_pipeline::Errors),
    #[error("the job is not in its pipeline")]
    NotInPipeline,
    #[error("admins ask for one artifact by run and name")]
    AdminResolve,
    #[error("admins do not restore caches")]
    AdminCache,
    #[error("job {0} declares no cache")]
    NoCacheDeclared(JobId),
    #[error("artifact \"{name}\" was never uploaded in run {run}: the job that declares it did not succeed")]
    NeverUploaded { name: String, run: RunId },
    #[error("run {run} has no artifact \"{name}\"; `gantry artifacts list {run}` shows them")]
    NoArtifact { run: RunId, name: String },
    #[error("manifest {manifest} is not an artifact of run {run} nor a cache its jobs may restore: refused")]
    NotReadable { manifest: Digest, run: RunId },
    #[error("no manifest {0}")]
    NoManifest(Digest),
    #[error("stored manifest {manifest} is unreadable: {detail}")]
    UnreadableManifest { manifest: Digest, detail: String },
    #[error("more than {MAX_DIGESTS_PER_FRAME} digests in one request")]
    TooManyDigests,
    #[error("chunk {digest} is not part of manifest {manifest}: refused")]
    NotInManifest { digest: Digest, manifest: Digest },
    #[error("the chunk reader stopped")]
    ReaderStopped,
    #[error("uploads are made by the job that declares them")]
    NotUploader,
    #[error("job {job} declares artifact \"{declared}\", not \"{name}\": refused")]
    OtherArtifact {
        job: String,
        declared: String,
        name: String,
    },
    #[error("job {0} declares no artifact: refused")]
    NoArtifactDeclared(String),
    #[error("job {0} declares no cache: refused")]
    NoCacheToWrite(String),
    #[error(
        "cache key must be 1 to {} printable bytes",
        gantry_pipeline::MAX_CACHE_KEY
    )]
    CacheKey,
    #[error("a manifest of {0} bytes is refused: it must be 1 to {MAX_MANIFEST_BYTES} bytes")]
    ManifestSize(u64),
    #[error("more than the declared {0} manifest bytes arrived")]
    ManifestOverflow(u64),
    #[error("expected a manifest piece, got {0}")]
    NotAPiece(String),
    #[error("the stream ended inside a manifest")]
    ManifestCut,
    #[error("cannot start a pack: {0}")]
    PackStart(std::io::Error),
    /// A batch of chunks lost its pack (a bug, never a peer's doing).
    #[error("internal: no pack")]
    NoPack,
    #[error(transparent)]
    Chunk(#[from] ChunkRefused),
    #[error("cannot sync a pack of chunks: {0}")]
    PackSync(std::io::Error),
    #[error("cannot store a pack of chunks: {0}")]
    PackPublish(std::io::Error),
    /// A blocking task (a pack's fsync, a batch's checks) did not finish.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("not an artifact stream: {0}")]
    NotArtifactStream(String),
    /// The data directory is at or under its watermark: no new uploads.
    #[error(transparent)]
    LowSpace(#[from] LowSpace),
    /// A write ran out of space.
    #[error(transparent)]
    OutOfSpace(#[from] OutOfSpace),
}

/// Why an uploaded chunk is refused; the first bad chunk refuses its put stream.
#[derive(Debug, thiserror::Error)]
pub enum ChunkRefused {
    #[error("chunk {digest} is refused: {size} bytes ({compressed} compressed) is outside 1..={MAX_CHUNK} ({MAX_COMPRESSED_CHUNK} compressed)")]
    Size {
        digest: Digest,
        size: u32,
        compressed: usize,
    },
    #[error("chunk {digest} is refused: {detail}")]
    Corrupt { digest: Digest, detail: String },
    #[error("cannot write chunk {digest}: {source}")]
    Write {
        digest: Digest,
        source: std::io::Error,
    },
}

/// Tells the peer why its stream is refused, in the stream's own refusal frame (made by
/// `frame` from the message), and hands the error back for the caller to return.
async fn refuse<F: serde::Serialize>(
    writer: &mut FrameWriter,
    e: StreamError,
    frame: impl FnOnce(String) -> F,
) -> StreamError {
    let _ = writer.send(&frame(e.to_string())).await;
    e
}

/// Who opened a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Agent(AgentId),
    Admin(String),
}

/// An upload in progress: what it writes and the chunks it holds on to.
#[derive(Debug)]
struct Session {
    connection: u64,
    peer: Peer,
    /// Chunks this session was told are stored, or stored itself: protected from
    /// garbage collection until the session ends.
    pinned: HashSet<Digest>,
}

#[derive(Debug, Default)]
struct Sessions {
    next: u64,
    open: HashMap<u64, Session>,
}

/// The artifact service; one per coordinator.
#[derive(Debug)]
pub struct Artifacts {
    store: Arc<Store>,
    chunks: ChunkStore,
    settings: ArtifactSettings,
    metrics: Arc<Metrics>,
    /// Uploads are refused while the data directory is low on space, and a write that
    /// runs out of it is told as such.
    disk: Arc<DiskSpace>,
    /// Uploads hold it shared from renaming a pack into place to indexing its chunks;
    /// garbage collection holds it exclusively, so it never deletes a pack about to be
    /// indexed.
    collecting: RwLock<()>,
    sessions: Mutex<Sessions>,
    pipelines: Mutex<HashMap<RunId, Arc<Pipeline>>>,
    manifests: Mutex<HashMap<Digest, Arc<HashMap<Digest, u32>>>>,
    /// `max_send_rate`: a cap on the chunk bytes served, across every reader.
    send_limit: Option<gantry_transfer::RateLimit>,
}

fn settings_limit(settings: &ArtifactSettings) -> Option<gantry_transfer::RateLimit> {
    settings.max_send_rate.map(gantry_transfer::RateLimit::new)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends a session when its stream task ends, however it ends.
struct SessionGuard<'a> {
    artifacts: &'a Artifacts,
    id: u64,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        lock(&self.artifacts.sessions).open.remove(&self.id);
    }
}

impl Artifacts {
    pub fn open(
        store: Arc<Store>,
        dir: &std::path::Path,
        settings: ArtifactSettings,
        metrics: Arc<Metrics>,
        disk: Arc<DiskSpace>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            disk,
            send_limit: settings_limit(&settings),
            store,
            chunks: ChunkStore::open(dir)?,
            settings,
            metrics,
            collecting: RwLock::new(()),
            sessions: Mutex::new(Sessions::default()),
            pipelines: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
        })
    }

    /// Serves one bulk stream. `connection` identifies the connection, so upload
    /// sessions can only be fed from the connection that opened them.
    pub async fn serve(
        &self,
        peer: &Peer,
        connection: u64,
        open: StreamOpen,
        mut writer: FrameWriter,
        reader: FrameReader,
    ) -> Result<(), StreamError> {
        let result = match open {
            StreamOpen::Resolve(request) => {
                let reply = self
                    .resolve(peer, request)
                    .unwrap_or_else(|e| ResolveReply::Refused {
                        message: e.to_string(),
                    });
                writer.send(&reply).await.map_err(StreamError::from)
            }
            StreamOpen::GetManifest { grant, manifest } => {
                self.send_manifest(peer, &grant, &manifest, &mut writer)
                    .await
            }
            StreamOpen::FetchChunks { grant, manifest } => {
                self.send_chunks(peer, &grant, &manifest, &mut writer, reader)
                    .await
            }
            StreamOpen::Upload { grant, target } => {
                self.upload(peer, connection, &grant, &target, &mut writer, reader)
                    .await
            }
            StreamOpen::PutChunks { session } => {
                self.put_chunks(peer, connection, session, &mut writer, reader)
                    .await
            }
            other => Err(StreamError::NotArtifactStream(format!("{other:?}"))),
        };
        writer.finish();
        result
    }
}
