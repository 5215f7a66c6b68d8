//! Downloads: a manifest, the chunks the cache lacks (several streams at once, each
//! chunk verified, a corrupt one fetched again), then extraction from the cache.
//!
//! A deployment's hosts also fetch from each other ([`Swarm`]): the release's chunk list
//! is cut into one contiguous range per host; each host fetches its own range from the
//! coordinator (publishing it to its cache in small segments, so it can be served as it
//! arrives) and every other range from the host that owns it. A peer that cannot be
//! reached, stalls for [`limits::PEER_STALL`] or does not have a chunk costs only a
//! fallback: the rest of its range comes from the coordinator. Whatever a peer sends is
//! verified like anything else before it is extracted.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_cas::{EntryKind, Existing, Manifest};
use gantry_protocol::{
    limits, ChunkFrame, ChunkWants, Digest, Grant, ManifestFrame, ReceivedChunkFrame, StreamOpen,
    MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::{Bytes, Connection};
use tokio::task::JoinSet;

use crate::{CachedChunk, ChunkCache, HandOff, TransferError, TransferOptions};

/// Rounds of fetching again chunks that arrived corrupt (or went bad in the cache)
/// before the download gives up.
const MAX_REFETCH_ROUNDS: usize = 3;

/// Segment size for a staging host's own range: its chunks become visible to the peers
/// waiting for them after at most this much per stream (256 KiB is ~4 chunks; a whole
/// 64 MiB segment would hold every peer back until the range is nearly done, and on a
/// link shared by many hosts even 1 MiB per stream took seconds).
const PUBLISH_BYTES: u64 = 256 * 1024;

/// A connection to a peer, possibly still being made: fetching from the coordinator
/// starts at once, and a peer's range waits only for its own handshake.
#[derive(Debug, Clone)]
pub struct PeerLink(tokio::sync::watch::Receiver<PeerDial>);

/// Where a [`PeerLink`]'s dial is.
#[derive(Debug, Clone)]
pub enum PeerDial {
    Pending,
    Connected(Connection),
    /// It could not be reached: its range comes from the coordinator.
    Unreachable,
}

impl PeerLink {
    /// A link whose dial the caller finishes through the sender.
    pub fn pending() -> (tokio::sync::watch::Sender<PeerDial>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(PeerDial::Pending);
        (tx, Self(rx))
    }

    /// The connection once the dial ends, or `None` if it failed (a sender dropped
    /// before it answered counts as a failure).
    pub async fn connected(&mut self) -> Option<Connection> {
        let dial = self
            .0
            .wait_for(|d| !matches!(d, PeerDial::Pending))
            .await
            .ok()?;
        match &*dial {
            PeerDial::Connected(conn) => Some(conn.clone()),
            PeerDial::Pending | PeerDial::Unreachable => None,
        }
    }

    /// Whether the dial ended with a connection (for logs, after the download).
    pub fn is_connected(&self) -> bool {
        matches!(&*self.0.borrow(), PeerDial::Connected(_))
    }
}

/// Other hosts to fetch a release's chunks from, besides the coordinator: the hosts of
/// one deployment's staging, in the order the coordinator gave every one of them.
#[derive(Debug, Default)]
pub struct Swarm {
    /// One slot per host: a link to its peer listener, or `None` (this host).
    pub peers: Vec<Option<PeerLink>>,
    /// This host's place in that order: the range it fetches from the coordinator and
    /// serves to the others. `None` when it serves no one.
    pub me: Option<usize>,
}

/// Where a download's bytes come from: the coordinator (the manifest, and any chunk no
/// peer brings), under `grant`, and the peers of `swarm`.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub coordinator: &'a Connection,
    pub grant: &'a Grant,
    pub swarm: &'a Swarm,
}

/// The contiguous ranges of `len` chunks that `hosts` hosts own, in order; the first
/// `len % hosts` ranges are one longer.
pub fn owner_ranges(len: usize, hosts: usize) -> Vec<std::ops::Range<usize>> {
    let hosts = hosts.max(1);
    (0..hosts)
        .map(|k| (k * len / hosts)..((k + 1) * len / hosts))
        .collect()
}

/// What one download did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownloadFigures {
    pub files: u64,
    /// Bytes of the files written.
    pub bytes: u64,
    /// Distinct chunks the manifest names.
    pub chunks: u64,
    /// Chunks fetched, from the coordinator or from peers (the rest came from the cache).
    pub chunks_fetched: u64,
    /// Compressed bytes received.
    pub bytes_fetched: u64,
    /// Of those, the chunks and bytes that came from peers.
    pub chunks_from_peers: u64,
    pub bytes_from_peers: u64,
    /// Chunks that arrived corrupt (or were corrupt in the cache) and were fetched again.
    pub chunks_refetched: u64,
    /// Chunks the cache keeps in the files the download wrote rather than in a copy of
    /// their own ([`ChunkCache::adopt`]).
    pub chunks_kept_in_place: u64,
    pub fetch_time: Duration,
    pub extract_time: Duration,
}

/// Fetches a manifest and checks that it is the one asked for and well formed.
pub async fn fetch_manifest(
    conn: &Connection,
    grant: &Grant,
    digest: &Digest,
) -> Result<Manifest, TransferError> {
    let open = StreamOpen::GetManifest {
        grant: grant.clone(),
        manifest: *digest,
    };
    let (mut writer, mut reader) = conn.open_stream_with(&open).await?;
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
    let swarm = Swarm::default();
    let sources = Sources {
        coordinator: conn,
        grant,
        swarm: &swarm,
    };
    download_tree(
        sources,
        manifest_digest,
        manifest,
        cache,
        dest,
        existing,
        options,
    )
    .await
}

/// The distinct chunks of a manifest with their uncompressed sizes: what a host serving
/// peers checks their wants against.
pub fn chunk_sizes(manifest: &Manifest) -> HashMap<Digest, u32> {
    chunk_list(manifest).into_iter().collect()
}

/// Like [`download`], for a manifest already fetched (and checked against
/// `manifest_digest` by [`fetch_manifest`]), fetching from the swarm's peers as well.
pub async fn download_tree(
    sources: Sources<'_>,
    manifest_digest: &Digest,
    manifest: Arc<Manifest>,
    cache: &ChunkCache,
    dest: &Path,
    existing: Existing,
    options: &TransferOptions,
) -> Result<DownloadFigures, TransferError> {
    // A tree that cannot fit is refused before a chunk is fetched (the extraction checks
    // again once `dest` exists): fetching it all first would fill the chunk cache's disk,
    // often the same one, for nothing.
    gantry_cas::check_free_space(&manifest, dest)?;
    // Files are written while chunks still arrive, so a download that fails may have
    // written some: what it created at the top of `dest` goes again, and the destination
    // is left as it was found (apart from files it replaced, as any failed merge).
    let created = absent_top_levels(&manifest, dest);
    // The work: fetch and extract, again for chunks found corrupt.
    let downloaded: Result<DownloadFigures, TransferError> = async {
        let (conn, grant) = (sources.coordinator, sources.grant);
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
            // Extraction runs while the chunks arrive, each file written as soon as its
            // chunks are in the cache (it waits for the ones that are not yet): the machine
            // that fetched 1 GiB and then wrote it left a core idle for the whole write.
            let started = Instant::now();
            let fetch_ended = FetchEnded::default();
            let uncached: Vec<(Digest, u32)> = chunks
                .iter()
                .filter(|(d, _)| !cache.contains(d))
                .copied()
                .collect();
            // With every chunk cached already (a cache restored again), nothing arrives
            // and the files can be written by several threads at once.
            let all_cached = uncached.is_empty();
            // The fetch keeps within a window of the extraction (in memory), unless it
            // fetches ranges for peers, or chunks found corrupt, which the extraction
            // reaches in no particular order.
            let alongside = round == 0 && sources.swarm.peers.is_empty() && !all_cached;
            let (ahead_limit, fetch_ahead) = if alongside {
                let (limit, ahead) = AheadLimit::new(&chunks);
                (Some(limit), Some(ahead))
            } else {
                (None, None)
            };
            // The chunks of large files go from the fetch to the extraction in memory, and
            // the cache then keeps them in the files written: a first download writes its
            // bytes once. Not for a swarm (peers read this host's range from its segments
            // as it arrives), nor across filesystems (the cache links the files).
            let handoff = if alongside && cache.same_filesystem(dest) {
                Some(HandOff::new(chunks_to_hand_off(&manifest, &uncached)))
            } else {
                None
            };
            let kept_handoff = handoff.clone();
            let extracting = {
                let (manifest, cache, dest) = (manifest.clone(), cache.clone(), dest.to_path_buf());
                let (ended, runtime) = (fetch_ended.flag(), tokio::runtime::Handle::current());
                let handoff = handoff.clone();
                tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let result = if all_cached {
                        extract_all_cached(&manifest, &dest, &cache, mode).map(|()| 0)
                    } else {
                        let waiting = Arrivals {
                            cache: &cache,
                            ended: &ended,
                            runtime: &runtime,
                            ahead: ahead_limit.map(std::cell::RefCell::new),
                            cached: std::cell::RefCell::new(cache.reader()),
                            handoff: handoff.as_ref(),
                        };
                        extract_from_cache(&manifest, &dest, &cache, mode, &waiting)
                    };
                    (result, started.elapsed())
                })
            };
            let fetched = async {
                let wanted = if round == 0 && !sources.swarm.peers.is_empty() {
                    fetch_from_swarm(
                        sources,
                        manifest_digest,
                        &chunks,
                        cache,
                        options,
                        &mut figures,
                    )
                    .await?;
                    // What the peers did not bring.
                    uncached
                        .into_iter()
                        .filter(|(d, _)| !cache.contains(d))
                        .collect()
                } else {
                    uncached
                };
                fetch_into_cache(
                    conn,
                    grant,
                    manifest_digest,
                    wanted,
                    cache,
                    options,
                    &mut figures,
                    SEGMENT_DEFAULT,
                    fetch_ahead,
                    handoff,
                )
                .await
            }
            .await;
            figures.fetch_time += started.elapsed();
            // The extraction now finds every chunk that came, or stops at the first that
            // did not.
            drop(fetch_ended);
            let waited = Instant::now();
            let (extracted, extracting_time) = extracting
                .await
                .map_err(|e| TransferError::Corrupt(format!("extraction stopped: {e}")))?;
            let extracted = extracted.map(|kept| figures.chunks_kept_in_place += kept);
            // An extraction that stopped early leaves chunks handed to it unextracted (up to
            // the hand-off's 128 MiB: the fetch runs on to the end once the extraction is
            // gone). They arrived and were verified, so the next attempt must not fetch
            // them again.
            if let Some(handoff) = kept_handoff {
                let cache = cache.clone();
                match tokio::task::spawn_blocking(move || cache.keep_handed_off(&handoff)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("cannot cache chunks a failed extraction left: {e}"),
                    Err(e) => tracing::warn!("caching chunks a failed extraction left stopped: {e}"),
                }
            }
            // What extraction took beyond the fetch (its whole time when every chunk was in
            // the cache already).
            figures.extract_time += waited.elapsed().min(extracting_time);
            fetched?;
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
    .await;
    if downloaded.is_err() {
        remove_created(dest, &created);
    }
    downloaded
}

/// The first components of the manifest's paths that `dest` does not hold yet.
fn absent_top_levels(manifest: &Manifest, dest: &Path) -> Vec<String> {
    let mut names: Vec<String> = manifest
        .entries
        .iter()
        .filter_map(|e| e.path.split('/').next())
        .filter(|name| !matches!(*name, "" | "." | ".."))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names.retain(|name| std::fs::symlink_metadata(dest.join(name)).is_err());
    names
}

/// Removes what a failed download created (never following a symlink: a link is
/// removed as itself, and `remove_dir_all` does not descend through links).
fn remove_created(dest: &Path, names: &[String]) {
    for name in names {
        let path = dest.join(name);
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(_) => continue,
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed what a failed download wrote");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot remove what a failed download wrote: {e}");
            }
        }
    }
}

/// How often an extraction waiting for a chunk checks that the fetch is still going.
const ARRIVAL_POLL: Duration = Duration::from_millis(20);

/// How far (in bytes of the tree's chunk list) a download's fetch may run ahead of
/// its extraction. Its streams deliver the chunks each in turn, and one stream falling
/// behind held the extraction while the others ran on: at a fixed budget of chunks
/// kept in memory ([`crate::cache::RECENT_BYTES`]), those they brought were dropped
/// from memory before the extraction reached them and read back from disk (the 1 GiB
/// benchmark download ended seconds after its fetch). Within this window every chunk
/// is extracted from memory; a stream that reaches its edge waits, and QUIC's flow
/// control holds its sender.
const FETCH_AHEAD: u64 = 48 * 1024 * 1024;

/// How long the extraction waits for a chunk that should be arriving before it lifts
/// the fetch's window (see [`Arrivals::wait_for`]): a safety valve, never expected to
/// open. At the benchmark's rates a chunk arrives in well under a millisecond.
const STUCK_EXTRACTION: Duration = Duration::from_secs(1);

/// Where each chunk of a tree lies in its chunk list (bytes before it), and how far
/// the fetch may go: what a fetch stream waits on to stay within [`FETCH_AHEAD`].
#[derive(Clone)]
struct FetchAhead {
    positions: Arc<HashMap<Digest, u64>>,
    limit: tokio::sync::watch::Receiver<u64>,
}

impl FetchAhead {
    /// Waits until the extraction is near enough for `digest` to be fetched.
    async fn wait_until_wanted(&mut self, digest: &Digest) {
        let position = self.positions.get(digest).copied().unwrap_or(0);
        // An error means the extraction is gone: nothing to wait for.
        let _ = self.limit.wait_for(|limit| position < *limit).await;
    }
}

/// The extraction's side of [`FetchAhead`]: moves the limit as the extraction moves,
/// and lifts it while the extraction waits for a chunk it passed before (one a later
/// file repeats, whose segment may not be published yet) and once it ends, so the
/// fetch never waits on an extraction that waits on the fetch.
struct AheadLimit {
    positions: Arc<HashMap<Digest, u64>>,
    limit: tokio::sync::watch::Sender<u64>,
    reached: u64,
}

impl AheadLimit {
    fn new(chunks: &[(Digest, u32)]) -> (Self, FetchAhead) {
        let mut positions = HashMap::with_capacity(chunks.len());
        let mut at = 0u64;
        for (digest, size) in chunks {
            positions.entry(*digest).or_insert(at);
            at += u64::from(*size);
        }
        let positions = Arc::new(positions);
        let (limit, watched) = tokio::sync::watch::channel(FETCH_AHEAD);
        (
            Self {
                positions: positions.clone(),
                limit,
                reached: 0,
            },
            FetchAhead {
                positions,
                limit: watched,
            },
        )
    }

    /// The extraction asks for `digest`; returns whether it is behind (passed before).
    fn asking_for(&mut self, digest: &Digest) -> bool {
        let position = self.positions.get(digest).copied().unwrap_or(0);
        if position < self.reached {
            self.lift();
            return true;
        }
        self.reached = position;
        self.resume();
        false
    }

    /// Lets the fetch run on whatever the extraction wants (see [`Arrivals::wait_for`]).
    fn lift(&mut self) {
        self.set_limit(u64::MAX);
    }

    /// The window of the chunk the extraction has reached (again, once it has the chunk
    /// it went back for).
    fn resume(&mut self) {
        self.set_limit(self.reached.saturating_add(FETCH_AHEAD));
    }

    /// Moves the limit, waking the fetch streams only when it changed (the extraction
    /// sets it for every chunk).
    fn set_limit(&mut self, limit: u64) {
        self.limit.send_if_modified(|current| {
            let moved = *current != limit;
            *current = limit;
            moved
        });
    }
}

impl Drop for AheadLimit {
    fn drop(&mut self) {
        self.lift();
    }
}

/// Set when a download's fetching ends, however it ends (dropped with it, so an
/// abandoned download never leaves its extraction waiting).
#[derive(Default)]
struct FetchEnded(Arc<std::sync::atomic::AtomicBool>);

impl FetchEnded {
    fn flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.0.clone()
    }
}

impl Drop for FetchEnded {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Where the extraction (a blocking thread) waits for chunks still being fetched.
struct Arrivals<'a> {
    cache: &'a ChunkCache,
    ended: &'a std::sync::atomic::AtomicBool,
    runtime: &'a tokio::runtime::Handle,
    /// The fetch's window, when it runs alongside this extraction.
    ahead: Option<std::cell::RefCell<AheadLimit>>,
    /// Reads what was cached before, ahead in its segments.
    cached: std::cell::RefCell<crate::CacheReader>,
    /// Chunks the fetch hands over in memory (see [`HandOff`]).
    handoff: Option<&'a HandOff>,
}

impl Arrivals<'_> {
    /// A chunk's compressed bytes, waiting while the fetch may still bring it; `None`
    /// once the fetch has ended without it. A chunk this download just fetched comes
    /// from memory as soon as it is appended to the cache, before its segment is
    /// written and published ([`ChunkCache::take_appended`]); any other from the cache,
    /// read ahead in its segment when the chunks come in order ([`crate::CacheReader`]).
    fn wait_for(&self, digest: &Digest) -> Option<CachedChunk> {
        let (mut published, mut appended) =
            (self.cache.subscribe(), self.cache.subscribe_appended());
        if let Some(ahead) = &self.ahead {
            ahead.borrow_mut().asking_for(digest);
        }
        let found = self.look_or_wait(digest, &mut published, &mut appended);
        if let Some(ahead) = &self.ahead {
            // After going back for a chunk, or after the window was lifted for one
            // that kept away, the fetch keeps to the window again.
            ahead.borrow_mut().resume();
        }
        found
    }

    fn look_or_wait(
        &self,
        digest: &Digest,
        published: &mut tokio::sync::watch::Receiver<u64>,
        appended: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Option<CachedChunk> {
        let (waiting_since, mut lifted) = (Instant::now(), false);
        loop {
            // Read the flag before looking, so a chunk that arrived just before the
            // fetch ended is still found by the look after it.
            let ended = self.ended.load(std::sync::atomic::Ordering::Acquire);
            let handed = self.handoff.and_then(|handoff| handoff.take(digest));
            if let Some(found) = handed
                .or_else(|| self.cache.take_appended(digest))
                .map(CachedChunk::Frame)
                .or_else(|| self.cached.borrow_mut().get(digest))
            {
                return Some(found);
            }
            if ended {
                return None;
            }
            if !lifted && waiting_since.elapsed() >= STUCK_EXTRACTION {
                // Whatever keeps the chunk away (it should be ahead of the fetch or in
                // memory), the fetch must not also wait for this extraction: let it run
                // on and finish its segments, which publishes the chunk.
                if let Some(ahead) = &self.ahead {
                    tracing::info!(chunk = %digest, "the extraction waited {STUCK_EXTRACTION:?} for a chunk; the fetch may run ahead until it comes");
                    ahead.borrow_mut().lift();
                }
                lifted = true;
            }
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(ARRIVAL_POLL, async {
                    tokio::select! {
                        _ = published.changed() => {}
                        _ = appended.changed() => {}
                    }
                })
                .await
            });
        }
    }
}

/// The cache's own segment size: chunks fetched for this host alone.
const SEGMENT_DEFAULT: u64 = u64::MAX;

/// Fetches every range of `chunks` the cache lacks from the host that owns it, and this
/// host's own range (and the ranges of hosts it could not reach) from the coordinator,
/// all at once. A peer that fails hands the rest of its range to the coordinator. Only
/// the coordinator's errors are returned; what no one brought is left for the caller.
async fn fetch_from_swarm(
    sources: Sources<'_>,
    manifest: &Digest,
    chunks: &[(Digest, u32)],
    cache: &ChunkCache,
    options: &TransferOptions,
    figures: &mut DownloadFigures,
) -> Result<(), TransferError> {
    let swarm = sources.swarm;
    let mut own = Vec::new();
    let mut orphaned = Vec::new();
    let mut peers = JoinSet::new();
    for (k, range) in owner_ranges(chunks.len(), swarm.peers.len())
        .into_iter()
        .enumerate()
    {
        let wanted: Vec<(Digest, u32)> = chunks[range]
            .iter()
            .filter(|(d, _)| !cache.contains(d))
            .copied()
            .collect();
        if wanted.is_empty() {
            continue;
        }
        match &swarm.peers[k] {
            _ if swarm.me == Some(k) => own = wanted,
            None => orphaned.extend(wanted),
            Some(link) => {
                let (link, coordinator) = (link.clone(), sources.coordinator.clone());
                let (grant, manifest, cache) = (sources.grant.clone(), *manifest, cache.clone());
                let limit = options.limit.clone();
                peers.spawn(async move {
                    fetch_range_from_peer(
                        link,
                        &coordinator,
                        &grant,
                        &manifest,
                        wanted,
                        &cache,
                        limit.as_deref(),
                    )
                    .await
                });
            }
        }
    }
    // This host's range goes first: the other hosts are waiting for it.
    own.extend(orphaned);
    let from_coordinator = fetch_into_cache(
        sources.coordinator,
        sources.grant,
        manifest,
        own,
        cache,
        options,
        figures,
        PUBLISH_BYTES,
        None,
        None,
    )
    .await;
    let mut failed = from_coordinator.err();
    while let Some(joined) = peers.join_next().await {
        match joined {
            Ok(Ok(range)) => {
                figures.chunks_fetched += range.from_peer.fetched + range.from_coordinator.fetched;
                figures.bytes_fetched += range.from_peer.bytes + range.from_coordinator.bytes;
                figures.chunks_from_peers += range.from_peer.fetched;
                figures.bytes_from_peers += range.from_peer.bytes;
            }
            Ok(Err(e)) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                failed.get_or_insert(TransferError::Corrupt(format!(
                    "a peer fetch task stopped: {e}"
                )));
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

struct RangeResult {
    from_peer: ShareResult,
    from_coordinator: ShareResult,
}

/// One range from the peer that owns it; whatever the peer does not bring (it cannot be
/// reached, stalls, lacks a chunk or refuses) from the coordinator. Errors are the
/// coordinator's only.
async fn fetch_range_from_peer(
    mut link: PeerLink,
    coordinator: &Connection,
    grant: &Grant,
    manifest: &Digest,
    wanted: Vec<(Digest, u32)>,
    cache: &ChunkCache,
    limit: Option<&crate::RateLimit>,
) -> Result<RangeResult, TransferError> {
    let how = ShareOptions {
        limit,
        segment_bytes: SEGMENT_DEFAULT,
        stall: Some(limits::PEER_STALL),
        ahead: None,
        handoff: None,
    };
    let mut result = RangeResult {
        from_peer: ShareResult::default(),
        from_coordinator: ShareResult::default(),
    };
    if let Some(peer) = link.connected().await {
        match fetch_share(&peer, grant, manifest, wanted.clone(), cache, &how).await {
            Ok(share) if share.corrupt.is_empty() => {
                result.from_peer = share;
                return Ok(result);
            }
            Ok(share) => {
                tracing::warn!(
                    peer = %peer.remote_address(),
                    corrupt = share.corrupt.len(),
                    "a peer sent chunks out of bounds; fetching them from the coordinator"
                );
                result.from_peer = share;
            }
            Err(e) => tracing::info!(
                peer = %peer.remote_address(),
                "peer fetch stopped ({e}); the rest of its range comes from the coordinator"
            ),
        }
    }
    let rest: Vec<(Digest, u32)> = wanted
        .into_iter()
        .filter(|(d, _)| !cache.contains(d))
        .collect();
    if !rest.is_empty() {
        let how = ShareOptions {
            limit,
            segment_bytes: SEGMENT_DEFAULT,
            stall: None,
            ahead: None,
            handoff: None,
        };
        result.from_coordinator =
            fetch_share(coordinator, grant, manifest, rest, cache, &how).await?;
    }
    Ok(result)
}

/// Fetches `wanted` into the cache over `options.streams` streams, in segments of
/// `segment_bytes`, no farther ahead of the extraction than `ahead` allows (if given),
/// handing the chunks `handoff` wants to the extraction instead of writing them.
/// Chunks that arrive corrupt are fetched again, up to [`MAX_REFETCH_ROUNDS`] times.
#[allow(clippy::too_many_arguments)] // one private helper; its callers read clearly
async fn fetch_into_cache(
    conn: &Connection,
    grant: &Grant,
    manifest: &Digest,
    mut wanted: Vec<(Digest, u32)>,
    cache: &ChunkCache,
    options: &TransferOptions,
    figures: &mut DownloadFigures,
    segment_bytes: u64,
    ahead: Option<FetchAhead>,
    handoff: Option<HandOff>,
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
            let (limit, handoff) = (options.limit.clone(), handoff.clone());
            // Only the first round runs alongside the extraction; chunks fetched again
            // are ones it has already asked for.
            let ahead = ahead.clone().filter(|_| round == 0);
            tasks.spawn(async move {
                let how = ShareOptions {
                    limit: limit.as_deref(),
                    segment_bytes,
                    stall: None,
                    ahead,
                    handoff,
                };
                fetch_share(&conn, &grant, &manifest, share, &cache, &how).await
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

#[derive(Default)]
struct ShareResult {
    fetched: u64,
    bytes: u64,
    /// Chunks whose bytes did not match their digest: not cached, to fetch again.
    corrupt: Vec<(Digest, u32)>,
}

/// How one stream fetches.
struct ShareOptions<'a> {
    limit: Option<&'a crate::RateLimit>,
    /// Segment size of the cache writer (see [`ChunkCache::writer_publishing_every`]).
    segment_bytes: u64,
    /// Gives up when no chunk arrives for this long (peers; the coordinator's streams
    /// end with their connection).
    stall: Option<Duration>,
    /// Keeps the stream within [`FETCH_AHEAD`] of the extraction.
    ahead: Option<FetchAhead>,
    /// Chunks handed to the extraction in memory rather than written to a segment.
    handoff: Option<HandOff>,
}

/// One stream's part of a download.
async fn fetch_share(
    conn: &Connection,
    grant: &Grant,
    manifest: &Digest,
    share: Vec<(Digest, u32)>,
    cache: &ChunkCache,
    how: &ShareOptions<'_>,
) -> Result<ShareResult, TransferError> {
    let open = StreamOpen::FetchChunks {
        grant: grant.clone(),
        manifest: *manifest,
    };
    let (mut writer, mut reader) = conn.open_stream_with(&open).await?;
    for batch in share.chunks(MAX_DIGESTS_PER_FRAME) {
        writer
            .send(&ChunkWants(batch.iter().map(|(d, _)| *d).collect()))
            .await?;
    }
    writer.finish();
    let sizes: HashMap<Digest, u32> = share.iter().copied().collect();
    let mut result = ShareResult::default();
    let mut writer = if how.segment_bytes == SEGMENT_DEFAULT {
        cache.writer()
    } else {
        cache.writer_publishing_every(how.segment_bytes)
    }
    .map_err(TransferError::io("cannot write to the chunk cache"))?;
    if let Some(handoff) = &how.handoff {
        writer = writer.handing_off(handoff.clone());
    }
    // Chunks go into segments of the cache on one blocking thread per stream, fed
    // through a channel: a blocking task per chunk (thousands a second) cost a fifth
    // of a downloading agent's CPU time in thread wake-ups.
    let (to_cache, arrivals) = tokio::sync::mpsc::channel(CACHE_QUEUE_CHUNKS);
    let caching = tokio::task::spawn_blocking(move || cache_arrivals(writer, arrivals));
    let received = receive_share(&mut reader, &share, &sizes, how, &to_cache, &mut result).await;
    // Whatever happened, what arrived is kept: the cache thread writes what is queued
    // and makes its segment visible, so a new attempt after a dropped connection
    // fetches only the rest.
    drop(to_cache);
    let cached = caching
        .await
        .map_err(|e| TransferError::Corrupt(format!("the cache writer stopped: {e}")))?;
    match (received, cached) {
        (_, Err(e)) => Err(TransferError::io("cannot write to the chunk cache")(e)),
        (Err(e), Ok(_)) => Err(e),
        (Ok(()), Ok(out_of_bounds)) => {
            result.corrupt.extend(out_of_bounds);
            Ok(result)
        }
    }
}

/// Chunks queued between a stream and its cache thread: ~4 MiB at most.
const CACHE_QUEUE_CHUNKS: usize = 16;

/// A received chunk on its way to the cache.
struct Arrival {
    digest: Digest,
    size: u32,
    data: Bytes,
}

/// The cache thread of one stream: appends each arrival to `writer` and finishes it
/// once the stream is done. Returns the chunks refused for their size (to fetch
/// again), or the first write error.
fn cache_arrivals(
    mut writer: crate::CacheWriter,
    mut arrivals: tokio::sync::mpsc::Receiver<Arrival>,
) -> std::io::Result<Vec<(Digest, u32)>> {
    let mut out_of_bounds = Vec::new();
    while let Some(Arrival { digest, size, data }) = arrivals.blocking_recv() {
        // Stored as received: every chunk is verified (bounded decompression, BLAKE3)
        // when it is read back to extract, which is also what catches a chunk damaged
        // in the cache. Verifying here too cost a fifth of a downloading agent's CPU
        // time for nothing. Only sizes past any chunk's are refused at once.
        if size as usize > gantry_cas::MAX_CHUNK || data.len() > gantry_cas::MAX_COMPRESSED_CHUNK {
            tracing::warn!("refusing chunk {digest}: out of bounds");
            out_of_bounds.push((digest, size));
            continue;
        }
        writer.append(&digest, data)?;
    }
    writer.finish()?;
    Ok(out_of_bounds)
}

/// Reads one stream's chunks (which come in the order asked for) and queues them for
/// its cache thread.
async fn receive_share(
    reader: &mut gantry_transport::FrameReader,
    share: &[(Digest, u32)],
    sizes: &HashMap<Digest, u32>,
    how: &ShareOptions<'_>,
    to_cache: &tokio::sync::mpsc::Sender<Arrival>,
    result: &mut ShareResult,
) -> Result<(), TransferError> {
    let limit = how.limit;
    let mut ahead = how.ahead.clone();
    for (next, _) in share {
        if let Some(ahead) = &mut ahead {
            ahead.wait_until_wanted(next).await;
        }
        let frame = match how.stall {
            None => reader.recv_payload().await?,
            Some(stall) => tokio::time::timeout(stall, reader.recv_payload())
                .await
                .map_err(|_| {
                    TransferError::Transport(gantry_transport::TransportError::Timeout {
                        what: "the next chunk",
                        after: stall,
                    })
                })??,
        };
        let payload = frame.ok_or_else(|| {
            TransferError::Protocol("the chunk stream ended before every chunk arrived".into())
        })?;
        // The chunk's data stays in the frame's payload (no copy out of it).
        match ChunkFrame::decode_received(payload)
            .map_err(gantry_transport::TransportError::from)?
        {
            ReceivedChunkFrame::Data(chunk) => {
                let (digest, size) = (chunk.digest, chunk.size);
                if sizes.get(&digest) != Some(&size) {
                    return Err(TransferError::Protocol(format!(
                        "chunk {digest} ({size} bytes) was not asked for"
                    )));
                }
                let (payload, range) = chunk.into_payload();
                let data = Bytes::from(payload).slice(range);
                if let Some(limit) = limit {
                    limit.take(data.len()).await;
                }
                result.fetched += 1;
                result.bytes += data.len() as u64;
                // The cache thread ends early only when a write failed; the caller
                // reports that error.
                if to_cache.send(Arrival { digest, size, data }).await.is_err() {
                    return Err(TransferError::Protocol("the cache writer stopped".into()));
                }
            }
            ReceivedChunkFrame::Unavailable { digest, reason } => {
                return Err(TransferError::Unavailable { digest, reason })
            }
            ReceivedChunkFrame::Refused { message } => return Err(TransferError::Refused(message)),
        }
    }
    Ok(())
}

/// Verifies every cached chunk of `chunks`, removing the corrupt ones; returns how many
/// went.
fn purge_corrupt(cache: &ChunkCache, chunks: &[(Digest, u32)]) -> u64 {
    let mut purged = 0;
    for (digest, size) in chunks {
        if let Some(found) = cache.get(digest) {
            if found.verify(*size as usize, digest).is_err() {
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

/// Writes the tree from the cache, waiting for chunks still arriving; returns how many
/// chunks the cache now keeps in the files written (see [`chunks_to_hand_off`]).
fn extract_from_cache(
    manifest: &Manifest,
    dest: &Path,
    cache: &ChunkCache,
    existing: Existing,
    arrivals: &Arrivals<'_>,
) -> Result<u64, ExtractError> {
    let sizes = chunk_sizes(manifest);
    let bad = std::sync::Mutex::new(None);
    let mut kept = 0;
    let result = gantry_cas::extract_verified_noting(
        manifest,
        dest,
        existing,
        |digest| open_found(cache, &sizes, digest, arrivals.wait_for(digest), &bad),
        |on_disk, entry, chunks_written| {
            if let Some(handoff) = arrivals.handoff {
                kept += keep_in_place(cache, handoff, on_disk, entry, chunks_written);
            }
        },
    );
    extraction_outcome(result, &bad).map(|()| kept)
}

/// The chunks a download hands from its fetch to its extraction and then keeps where
/// the extraction wrote them: those of `fetched` that lie in files of at least
/// [`crate::ADOPT_MIN_FILE`] and occur once in the tree (a chunk the tree repeats is
/// read back from the cache for its second place, so it goes to a segment).
fn chunks_to_hand_off(manifest: &Manifest, fetched: &[(Digest, u32)]) -> Vec<Digest> {
    let fetched: HashSet<Digest> = fetched.iter().map(|(d, _)| *d).collect();
    let mut uses: HashMap<Digest, (u32, bool)> = HashMap::new();
    for entry in &manifest.entries {
        if let EntryKind::File { size, chunks, .. } = &entry.kind {
            let large = *size >= crate::ADOPT_MIN_FILE;
            for chunk in chunks {
                let (count, in_large) = uses.entry(chunk.digest).or_insert((0, true));
                *count += 1;
                *in_large &= large;
            }
        }
    }
    uses.into_iter()
        .filter(|(digest, (count, in_large))| *count == 1 && *in_large && fetched.contains(digest))
        .map(|(digest, _)| digest)
        .collect()
}

/// Has the cache keep the chunks of a file just written (its first `chunks_written`)
/// that the download handed over, where they lie in it; returns how many. A file the
/// cache cannot link costs only a fetch the next time: the chunks were verified and
/// written, the download goes on.
fn keep_in_place(
    cache: &ChunkCache,
    handoff: &HandOff,
    on_disk: &Path,
    entry: &gantry_cas::Entry,
    chunks_written: usize,
) -> u64 {
    let EntryKind::File { chunks, .. } = &entry.kind else {
        return 0;
    };
    let mut offset = 0u64;
    let mut kept = Vec::new();
    for chunk in chunks.iter().take(chunks_written) {
        if handoff.wants(&chunk.digest) {
            kept.push((chunk.digest, offset, chunk.size));
        }
        offset += u64::from(chunk.size);
    }
    match cache.adopt(on_disk, &kept) {
        Ok(()) => kept.len() as u64,
        Err(e) => {
            tracing::warn!(file = %entry.path, "cannot keep the file's chunks in the cache: {e}");
            0
        }
    }
}

/// Most threads writing a tree's files at once (see [`extract_all_cached`]).
const MAX_EXTRACT_WORKERS: usize = 4;

/// Extracts a tree whose chunks were all cached before the download started, the files
/// written by one thread per core (at most [`MAX_EXTRACT_WORKERS`]), each reading ahead
/// in the cache on its own ([`gantry_cas::extract_verified_parallel`]). Restoring the
/// benchmark's 20,000-file cache a second time kept one core busy creating files and
/// left the other idle.
fn extract_all_cached(
    manifest: &Manifest,
    dest: &Path,
    cache: &ChunkCache,
    existing: Existing,
) -> Result<(), ExtractError> {
    let sizes = chunk_sizes(manifest);
    let bad = std::sync::Mutex::new(None);
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_EXTRACT_WORKERS);
    let result = gantry_cas::extract_verified_parallel(manifest, dest, existing, workers, || {
        let mut reader = cache.reader();
        let (sizes, bad) = (&sizes, &bad);
        move |digest: &Digest| open_found(cache, sizes, digest, reader.get(digest), bad)
    });
    extraction_outcome(result, &bad)
}

/// Checks a chunk found for the extraction (`None`: not in the cache). Each chunk is
/// checked once, here (bounded decompression or, for a raw frame, a hash of its blocks
/// where they lie); the extraction then only matches digests. A chunk missing or bad
/// is noted in `bad`, to be fetched again, and a bad one leaves the cache.
fn open_found(
    cache: &ChunkCache,
    sizes: &HashMap<Digest, u32>,
    digest: &Digest,
    found: Option<CachedChunk>,
    bad: &std::sync::Mutex<Option<Digest>>,
) -> Result<gantry_cas::VerifiedChunk, gantry_cas::CasError> {
    let note_bad = || {
        *bad.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(*digest);
    };
    let size = sizes.get(digest).copied().unwrap_or(0);
    let Some(found) = found else {
        note_bad();
        return Err(gantry_cas::CasError::CorruptChunk {
            digest: *digest,
            reason: "not in the cache".into(),
        });
    };
    found.open(size as usize, digest).inspect_err(|_| {
        cache.remove(digest);
        note_bad();
    })
}

/// An extraction's result, told apart: a chunk to fetch again, or another error.
fn extraction_outcome(
    result: Result<(), gantry_cas::CasError>,
    bad: &std::sync::Mutex<Option<Digest>>,
) -> Result<(), ExtractError> {
    let bad = *bad
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match (result, bad) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(digest)) => Err(BadChunk(digest)),
        (Err(e), None) => Err(Other(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::{owner_ranges, AheadLimit, FetchAhead, FETCH_AHEAD};
    use gantry_protocol::Digest;
    use std::time::Duration;

    /// The fetch runs at most FETCH_AHEAD ahead of the extraction; it is let go while
    /// the extraction goes back for a chunk it passed (whose segment may wait on the
    /// fetch), and for good once the extraction ends.
    #[tokio::test]
    async fn the_fetch_waits_at_the_edge_of_its_window_and_never_on_an_extraction_that_waits() {
        const MIB: u32 = 1024 * 1024;
        // 16 MiB chunks: chunk k starts at k * 16 MiB.
        let chunks: Vec<(Digest, u32)> = (0..10u8).map(|k| (Digest::of(&[k]), 16 * MIB)).collect();
        assert_eq!(
            FETCH_AHEAD,
            u64::from(3 * 16 * MIB),
            "the figures below assume 48 MiB"
        );
        let (mut extraction, fetch) = AheadLimit::new(&chunks);
        let soon = Duration::from_secs(5);
        let wanted = |k: usize| {
            let (digest, mut fetch): (Digest, FetchAhead) = (chunks[k].0, fetch.clone());
            tokio::spawn(async move { fetch.wait_until_wanted(&digest).await })
        };
        // Not started: chunks before 48 MiB may come, the one at 48 MiB waits.
        tokio::time::timeout(soon, wanted(2))
            .await
            .expect("within the window")
            .expect("task");
        let waiting = wanted(3);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "past the window, the fetch waits");
        // The extraction reaches 16 MiB: the window moves to 64 MiB.
        assert!(!extraction.asking_for(&chunks[1].0));
        tokio::time::timeout(soon, waiting)
            .await
            .expect("let go")
            .expect("task");
        let waiting = wanted(4);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Going back for a chunk it passed lifts the window while it waits for it.
        assert!(extraction.asking_for(&chunks[0].0));
        tokio::time::timeout(soon, waiting)
            .await
            .expect("lifted")
            .expect("task");
        tokio::time::timeout(soon, wanted(9))
            .await
            .expect("lifted")
            .expect("task");
        extraction.resume();
        let waiting = wanted(5);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "back to the window of 16 MiB");
        // An extraction that ends (done or failed) never leaves the fetch waiting.
        drop(extraction);
        tokio::time::timeout(soon, waiting)
            .await
            .expect("let go")
            .expect("task");
    }

    #[test]
    fn owner_ranges_cover_every_chunk_once_in_order_and_differ_by_at_most_one() {
        for (len, hosts) in [(0, 3), (1, 4), (7, 3), (90, 4), (1000, 32), (5, 1), (5, 0)] {
            let ranges = owner_ranges(len, hosts);
            assert_eq!(ranges.len(), hosts.max(1), "{len} chunks, {hosts} hosts");
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next, "contiguous: {ranges:?}");
                next = r.end;
            }
            assert_eq!(next, len, "every chunk: {ranges:?}");
            let sizes: Vec<usize> = ranges.iter().map(std::ops::Range::len).collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.zip(min).is_none_or(|(a, b)| a - b <= 1), "{sizes:?}");
        }
    }
}
