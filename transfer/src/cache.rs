//! A local chunk cache: compressed chunks on disk, evicted least recently used first
//! when they pass a size quota, so a repeated download costs no network.
//!
//! Owns one directory of segments: `<16 hex>.seg` holds chunks back to back, exactly as
//! received (compressed), and `<16 hex>.idx` lists them (digest, offset, length). A
//! download appends what it fetches to segments of up to 64 MiB; a segment's chunks
//! become visible when its index is written. Eviction and "recently used" are per
//! segment: the chunks of one download age together, which is how they are used.
//!
//! Why segments and not a file per chunk: a 1 GiB download is ~16,000 chunks, and
//! creating 16,000 files cost an agent more than half of its CPU time in ext4's inode
//! allocation in the download benchmark.
//!
//! Segments of a download's size ([`gantry_cas::DIRECT_WRITE_MIN`] and up) are written
//! past the page cache ([`gantry_cas::DirectWriter`]), and chunks are read back from
//! disk past it too ([`gantry_cas::ReadOnceFile`]): a download writes every byte twice (its
//! cache, then its files), and on the VMs we measure each new page-cache page costs a
//! fault in the host (~2.3 s per GiB), which was the largest part of a downloading
//! agent's CPU time. What a download reads back a moment after writing it (its
//! extraction runs a segment or so behind its fetch) comes from memory instead: the
//! last [`RECENT_BYTES`] of the chunks it appended are kept there while it runs.
//!
//! Nothing is fsynced: a cache may lose entries in a crash. A segment without its index
//! is removed at start; a torn or corrupt chunk is caught when it is read (every read is
//! verified against its digest by the caller) and dropped with [`ChunkCache::remove`].
//! Chunks being downloaded or extracted are pinned, and a segment holding a pinned chunk
//! is never evicted, so a download larger than the quota still completes (the cache then
//! shrinks back once unpinned).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gantry_protocol::Digest;
use gantry_transport::Bytes;

/// A segment is closed (and its chunks become visible) at this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// A publishing writer's segment also closes once it is this old, so a chunk other hosts
/// wait for is visible this soon after it arrives whatever the stream's rate.
const PUBLISH_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(500);
/// A publishing writer whose chunks arrive this far apart (a slow link: on a 4 MiB/s
/// link shared by 20 hosts' ranges, one every second or two) closes its segment after
/// each chunk: waiting for the next one would hold back chunks peers are asking for,
/// and a peer that waits [`gantry_protocol::limits::PEER_STALL`] gives up on the host.
const PUBLISH_SLOW_GAP: std::time::Duration = std::time::Duration::from_millis(200);
/// Open segment files kept for reading; the set is cleared when it reaches this size.
const MAX_OPEN_SEGMENTS: usize = 64;
/// One index entry: digest, offset, length.
const ENTRY_BYTES: usize = 32 + 8 + 4;
/// Chunks appended last, kept in memory for the reads that follow at once: a download's
/// extraction takes each chunk a moment after it arrived ([`ChunkCache::take_appended`])
/// and reads nothing back from disk as long as what it has yet to reach fits here (its
/// fetch keeps within 48 MiB of it, see `download.rs`). Only chunks a download has
/// pinned are kept, until it takes them or unpins them: an idle agent holds none, and
/// a later download reads (and verifies) what is on disk.
pub const RECENT_BYTES: usize = 64 * 1024 * 1024;
/// Most bytes a [`CacheReader`] reads from a segment at once, once its reads of that
/// segment run in order. Chunks read one by one past the page cache are a synchronous
/// device read of ~80 KiB each: a download of a 1 GiB artifact whose chunks were all
/// cached ran at ~400 MB/s, slower than fetching them, most of it waiting on the disk.
pub const READ_AHEAD_BYTES: u64 = 2 * 1024 * 1024;
/// Segments a [`CacheReader`] reads ahead in at once: a download's fetch streams deal a
/// tree's chunks out in turn ([`crate::DEFAULT_STREAMS`] of them) and each appends its
/// share to a segment of its own, so the tree read back in order goes through that
/// many segments in turn. Bounds what a reader holds to 16 MiB.
const READ_AHEAD_SEGMENTS: usize = 8;

/// Fewest bytes a file of a download must have for its chunks to be kept where the
/// download writes them ([`ChunkCache::adopt`]) instead of in a segment: below it, the
/// link and index of each file would cost more than the copy they save (the 20,000-file
/// cache of the benchmark would be 20,000 links).
pub const ADOPT_MIN_FILE: u64 = 8 * 1024 * 1024;
/// Most bytes of chunks one download hands over in memory to its extraction ([`HandOff`])
/// at once. A download's fetch keeps within 48 MiB of its extraction, so this is only
/// reached when that window was lifted; past it, chunks go to a segment as any other.
const HANDOFF_BYTES: usize = 128 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
struct Slot {
    segment: u64,
    offset: u64,
    len: u32,
    /// The chunk's uncompressed bytes, in a file a download wrote ([`ChunkCache::adopt`]);
    /// otherwise its compressed frame, in a segment.
    raw: bool,
}

/// Where [`ChunkCache::locate`] found a chunk.
enum Located {
    InMemory(Bytes),
    OnDisk { slot: Slot, segment_bytes: u64 },
}

/// A cached chunk's bytes as the cache holds them, unverified: open them with
/// [`CachedChunk::open`], which checks them against the digest asked for.
#[derive(Debug, Clone)]
pub enum CachedChunk {
    /// Its compressed frame, as it was received.
    Frame(Bytes),
    /// Its uncompressed bytes, read from a file a download wrote ([`ChunkCache::adopt`]).
    Raw(Bytes),
}

impl CachedChunk {
    fn from_slot(slot: Slot, bytes: Bytes) -> Self {
        if slot.raw {
            Self::Raw(bytes)
        } else {
            Self::Frame(bytes)
        }
    }

    /// Checks the bytes against the chunk's size and digest (bounded decompression for
    /// a frame, a hash for raw bytes) and keeps them for writing out.
    pub fn open(
        self,
        len: usize,
        digest: &Digest,
    ) -> Result<gantry_cas::VerifiedChunk, gantry_cas::CasError> {
        match self {
            Self::Frame(frame) => gantry_cas::open_chunk(frame, len, digest),
            Self::Raw(bytes) => gantry_cas::open_raw_chunk(bytes, len, digest),
        }
    }

    /// [`Self::open`]'s check without keeping the bytes.
    pub fn verify(&self, len: usize, digest: &Digest) -> Result<(), gantry_cas::CasError> {
        match self {
            Self::Frame(frame) => gantry_cas::verify_chunk(frame, len, digest),
            Self::Raw(bytes) => gantry_cas::check_raw_chunk(bytes, len, digest),
        }
    }

    /// The chunk as a zstd frame, to send to a peer: raw bytes are framed as raw blocks
    /// (one copy), which every reader checks like any other frame.
    pub fn into_frame(self) -> Bytes {
        match self {
            Self::Frame(frame) => frame,
            Self::Raw(bytes) => {
                Bytes::from(gantry_cas::RawFrameLayout::of(bytes.len()).assemble(&bytes))
            }
        }
    }
}

/// The bytes as the cache holds them (a frame, or a chunk's raw bytes).
impl std::ops::Deref for CachedChunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Frame(bytes) | Self::Raw(bytes) => bytes,
        }
    }
}

/// Tests compare what a segment gives back with the frame appended.
#[cfg(test)]
impl PartialEq<Bytes> for CachedChunk {
    fn eq(&self, other: &Bytes) -> bool {
        matches!(self, Self::Frame(frame) if frame == other)
    }
}

#[derive(Debug)]
struct Segment {
    bytes: u64,
    used: u64,
    digests: Vec<Digest>,
    /// A file a download wrote, linked into the cache ([`ChunkCache::adopt`]), rather
    /// than a segment of frames.
    linked: bool,
}

/// The two kinds of file the cache holds, each with its index beside it: segments of
/// compressed frames (`.seg`, `.idx`) and files downloads wrote, hard-linked in
/// (`.lnk`, `.lidx`).
fn file_extensions(linked: bool) -> (&'static str, &'static str) {
    if linked {
        ("lnk", "lidx")
    } else {
        ("seg", "idx")
    }
}

/// Chunks one download will extract into large files of its own: its cache writers
/// hand them over in memory instead of writing them to a segment, and once a file is
/// written the cache keeps its chunks where they lie ([`ChunkCache::adopt`]). A first
/// download of a 1 GiB artifact so writes its bytes once instead of twice, which on
/// the VMs we measure is the disk time that bounded it. Per download (two downloads of
/// the same artifact at once each get their own); whatever its extraction never took (it
/// stopped first) is written to a segment afterwards ([`ChunkCache::keep_handed_off`]).
#[derive(Debug, Clone, Default)]
pub struct HandOff(Arc<Mutex<HandOffState>>);

#[derive(Debug, Default)]
struct HandOffState {
    wanted: HashSet<Digest>,
    held: HashMap<Digest, Bytes>,
    bytes: usize,
}

impl HandOff {
    /// A hand-off of `digests` (each should occur once in the tree: a chunk taken once
    /// is gone from memory).
    pub fn new(digests: impl IntoIterator<Item = Digest>) -> Self {
        Self(Arc::new(Mutex::new(HandOffState {
            wanted: digests.into_iter().collect(),
            ..HandOffState::default()
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandOffState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `digest` is one the download wants handed over.
    pub fn wants(&self, digest: &Digest) -> bool {
        self.lock().wanted.contains(digest)
    }

    /// Keeps a wanted chunk's frame for the extraction, unless that would pass
    /// [`HANDOFF_BYTES`]; returns it back when it is not kept.
    fn hold(&self, digest: &Digest, frame: Bytes) -> Option<Bytes> {
        let mut state = self.lock();
        if !state.wanted.contains(digest) || state.bytes + frame.len() > HANDOFF_BYTES {
            return Some(frame);
        }
        state.bytes += frame.len();
        if let Some(old) = state.held.insert(*digest, frame) {
            state.bytes -= old.len();
        }
        None
    }

    /// Takes a chunk's frame handed over by a writer.
    pub fn take(&self, digest: &Digest) -> Option<Bytes> {
        let mut state = self.lock();
        let frame = state.held.remove(digest)?;
        state.bytes -= frame.len();
        Some(frame)
    }

    /// Takes every chunk still held, and wants no more.
    fn drain(&self) -> Vec<(Digest, Bytes)> {
        let mut state = self.lock();
        state.wanted.clear();
        state.bytes = 0;
        state.held.drain().collect()
    }

    /// Bytes held now (for tests).
    pub fn held_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// The pinned chunks appended last, oldest first out, within [`RECENT_BYTES`]. Only a
/// copy: whether a chunk is in the cache is the index's to say.
#[derive(Debug, Default)]
struct Recent {
    chunks: HashMap<Digest, Bytes>,
    order: VecDeque<Digest>,
    bytes: usize,
}

impl Recent {
    fn insert(&mut self, digest: Digest, data: Bytes) {
        let len = data.len();
        match self.chunks.insert(digest, data) {
            Some(old) => self.bytes -= old.len(),
            None => self.order.push_back(digest),
        }
        self.bytes += len;
        while self.bytes > RECENT_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // A digest removed and appended again is queued twice; its first turn
            // drops it a little early, which costs a read from disk, nothing more.
            if let Some(old) = self.chunks.remove(&oldest) {
                self.bytes -= old.len();
            }
        }
    }

    fn remove(&mut self, digest: &Digest) {
        if let Some(old) = self.chunks.remove(digest) {
            self.bytes -= old.len();
        }
    }
}

#[derive(Debug, Default)]
struct Index {
    chunks: HashMap<Digest, Slot>,
    recent: Recent,
    segments: HashMap<u64, Segment>,
    /// (last use, segment), oldest first: the eviction order.
    by_use: BTreeSet<(u64, u64)>,
    /// How many live pins hold each chunk.
    pins: HashMap<Digest, u32>,
    total: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, segment: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(s) = self.segments.get_mut(&segment) {
            self.by_use.remove(&(s.used, segment));
            s.used = tick;
            self.by_use.insert((tick, segment));
        }
    }

    fn add_segment(&mut self, id: u64, bytes: u64, entries: &[(Digest, u64, u32)], linked: bool) {
        self.tick += 1;
        for (digest, offset, len) in entries {
            self.chunks.insert(
                *digest,
                Slot {
                    segment: id,
                    offset: *offset,
                    len: *len,
                    raw: linked,
                },
            );
        }
        self.segments.insert(
            id,
            Segment {
                bytes,
                used: self.tick,
                digests: entries.iter().map(|(d, _, _)| *d).collect(),
                linked,
            },
        );
        self.by_use.insert((self.tick, id));
        self.total += bytes;
    }

    /// Counts a segment (one still indexed) at `bytes` from now on.
    fn resize_segment(&mut self, id: u64, bytes: u64) {
        if let Some(s) = self.segments.get_mut(&id) {
            self.total = self.total - s.bytes + bytes;
            s.bytes = bytes;
        }
    }

    /// Forgets a segment; returns whether it was a linked file.
    fn drop_segment(&mut self, id: u64) -> bool {
        let Some(s) = self.segments.remove(&id) else {
            return false;
        };
        {
            self.by_use.remove(&(s.used, id));
            self.total -= s.bytes;
            for d in &s.digests {
                if self.chunks.get(d).is_some_and(|slot| slot.segment == id) {
                    self.chunks.remove(d);
                }
            }
        }
        s.linked
    }
}

/// Figures for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheFigures {
    pub chunks: u64,
    pub bytes: u64,
    pub quota: u64,
}

/// The cache. Cheap to clone; clones share the index.
#[derive(Debug, Clone)]
pub struct ChunkCache {
    dir: PathBuf,
    quota: u64,
    index: Arc<Mutex<Index>>,
    open: Arc<Mutex<HashMap<u64, Arc<gantry_cas::ReadOnceFile>>>>,
    /// Counts segments made visible, so a host serving peers can wait for a chunk it is
    /// still fetching instead of polling.
    published: Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts chunks kept in memory as they were appended (see [`Self::take_appended`]),
    /// so a download's extraction can wait for the next one instead of polling.
    appended: Arc<tokio::sync::watch::Sender<u64>>,
}

/// A segment (or linked file) found at start: last use, id, size, index entries, and
/// whether it is a linked file.
type FoundSegment = (
    std::time::SystemTime,
    u64,
    u64,
    Vec<(Digest, u64, u32)>,
    bool,
);

fn segment_name(id: u64, ext: &str) -> String {
    format!("{id:016x}.{ext}")
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir` with a quota in bytes, indexing what is there
    /// (segments ordered by their last recorded use) and removing half-written segments.
    pub fn open(dir: &Path, quota: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut found: Vec<FoundSegment> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            let Some((hex, ext)) = name.split_once('.') else {
                continue;
            };
            let id = u64::from_str_radix(hex, 16).ok();
            match (ext, id) {
                ("idx" | "lidx", Some(id)) => {
                    let linked = ext == "lidx";
                    let data = dir.join(segment_name(id, file_extensions(linked).0));
                    let entries = fs::read(&path).ok().and_then(|b| parse_index(&b));
                    let (Some(entries), Ok(meta)) = (entries, fs::metadata(&data)) else {
                        let _ = fs::remove_file(&path);
                        let _ = fs::remove_file(&data);
                        continue;
                    };
                    let used = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    found.push((used, id, meta.len(), entries, linked));
                }
                ("seg" | "lnk", Some(id)) => {
                    // Data whose index was never written: a crash mid-download.
                    let index = file_extensions(ext == "lnk").1;
                    if !dir.join(segment_name(id, index)).exists() {
                        let _ = fs::remove_file(&path);
                    }
                }
                _ if name.starts_with(".tmp") => {
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
        found.sort_by_key(|(used, id, _, _, _)| (*used, *id));
        let mut index = Index::default();
        for (_, id, bytes, entries, linked) in found {
            index.add_segment(id, bytes, &entries, linked);
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            quota,
            index: Arc::new(Mutex::new(index)),
            open: Arc::new(Mutex::new(HashMap::new())),
            published: Arc::new(tokio::sync::watch::Sender::new(0)),
            appended: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        cache.evict()?;
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn segment_file(
        &self,
        id: u64,
        linked: bool,
    ) -> std::io::Result<Arc<gantry_cas::ReadOnceFile>> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = open.get(&id) {
            return Ok(f.clone());
        }
        let file = Arc::new(gantry_cas::ReadOnceFile::open(
            &self.dir.join(segment_name(id, file_extensions(linked).0)),
        )?);
        if open.len() >= MAX_OPEN_SEGMENTS {
            open.clear();
        }
        open.insert(id, file.clone());
        Ok(file)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().chunks.contains_key(digest)
    }

    /// A chunk's bytes, if cached (and marks its segment used): from memory when it was
    /// appended lately, otherwise read from its segment or linked file. The caller
    /// verifies them ([`CachedChunk::open`]) and calls [`Self::remove`] if they are bad.
    pub fn get(&self, digest: &Digest) -> Option<CachedChunk> {
        match self.locate(digest)? {
            Located::InMemory(data) => Some(CachedChunk::Frame(data)),
            Located::OnDisk { slot, .. } => self
                .read_slot(digest, slot, slot.len as usize)
                .map(|data| CachedChunk::from_slot(slot, data)),
        }
    }

    /// A reader for chunks asked for mostly in the order they were appended (a download
    /// restoring a tree it cached before), which reads ahead in their segments.
    pub fn reader(&self) -> CacheReader {
        CacheReader {
            cache: self.clone(),
            cursors: Vec::new(),
            disk_reads: 0,
        }
    }

    /// Where a chunk is, if cached (and marks its segment used).
    fn locate(&self, digest: &Digest) -> Option<Located> {
        let mut index = self.lock();
        let slot = *index.chunks.get(digest)?;
        index.touch(slot.segment);
        if let Some(data) = index.recent.chunks.get(digest).cloned() {
            return Some(Located::InMemory(data));
        }
        let segment_bytes = index.segments.get(&slot.segment).map_or(0, |s| s.bytes);
        Some(Located::OnDisk {
            slot,
            segment_bytes,
        })
    }

    /// `len` bytes of a chunk's segment from the chunk's start (the chunk and what
    /// follows it). A chunk whose bytes cannot be read (its segment deleted or
    /// truncated behind our back) is forgotten.
    fn read_slot(&self, digest: &Digest, slot: Slot, len: usize) -> Option<Bytes> {
        let read = self
            .segment_file(slot.segment, slot.raw)
            .and_then(|f| f.read(slot.offset, len));
        match read {
            Ok(data) => Some(data),
            Err(_) if len > slot.len as usize => self.read_slot(digest, slot, slot.len as usize),
            Err(_) => {
                self.remove(digest);
                None
            }
        }
    }

    /// Starts writing a segment; chunks appended become visible when it is finished.
    pub fn writer(&self) -> std::io::Result<CacheWriter> {
        CacheWriter::new(self.clone(), SEGMENT_BYTES, false)
    }

    /// Like [`Self::writer`], but segments close (and their chunks become visible) every
    /// `segment_bytes`, at most [`PUBLISH_MAX_AGE`] after their first chunk, and after
    /// every chunk when chunks come [`PUBLISH_SLOW_GAP`] apart: for chunks other hosts
    /// wait for (a staging host's own range, which it serves as it arrives).
    pub fn writer_publishing_every(&self, segment_bytes: u64) -> std::io::Result<CacheWriter> {
        CacheWriter::new(self.clone(), segment_bytes.clamp(1, SEGMENT_BYTES), true)
    }

    /// Changes each time chunks become visible; wait on it for a chunk not there yet.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Takes a pinned chunk's compressed bytes out of memory as soon as it is appended,
    /// before its segment is published: for the download that pinned and fetched it,
    /// whose extraction then follows its fetch closely instead of a segment behind.
    /// Taken, a chunk leaves memory, so what memory holds is what the extraction has
    /// yet to reach (a chunk a tree uses twice is read the second time through
    /// [`Self::get`], which answers only for published chunks).
    pub fn take_appended(&self, digest: &Digest) -> Option<Bytes> {
        let mut index = self.lock();
        let data = index.recent.chunks.get(digest).cloned()?;
        index.recent.remove(digest);
        Some(data)
    }

    /// Changes each time a chunk is kept in memory on its way in (see
    /// [`Self::take_appended`]).
    pub fn subscribe_appended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Stores one chunk's compressed bytes (already verified by the caller).
    pub fn put(&self, digest: &Digest, compressed: &[u8]) -> std::io::Result<()> {
        // Through a writer that hands nothing off: a chunk put is stored.
        let mut writer = self.writer()?;
        writer.append(digest, Bytes::copy_from_slice(compressed))?;
        writer.finish()
    }

    /// Keeps the chunks of a file a download has just written where they lie, instead of
    /// in a copy: the file is hard-linked into the cache and `chunks` (digest, offset in
    /// the file, length) indexed as its raw bytes. The file's size counts against the
    /// quota, and the link keeps its bytes when the job deletes the file, until it is
    /// evicted like a segment. A job that changes the file in place changes what the
    /// cache reads too: every read is verified, so such a chunk is dropped and fetched
    /// again, never used. `file` must be on the cache's filesystem
    /// ([`Self::same_filesystem`]).
    pub fn adopt(&self, file: &Path, chunks: &[(Digest, u64, u32)]) -> std::io::Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let id = new_segment_id();
        let link = self.dir.join(segment_name(id, file_extensions(true).0));
        fs::hard_link(file, &link)?;
        let indexed = fs::metadata(&link)
            .and_then(|meta| write_index(&self.dir, id, true, chunks).map(|()| meta.len()));
        let bytes = match indexed {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_file(&link);
                return Err(e);
            }
        };
        self.lock().add_segment(id, bytes, chunks, true);
        self.published.send_modify(|n| *n += 1);
        self.evict()
    }

    /// Writes the chunks `handoff` still holds to a segment: a download whose extraction
    /// stopped (a chunk that never came, a full disk) keeps what it fetched for the next
    /// attempt. Returns how many there were. Call it once the fetch has ended.
    pub fn keep_handed_off(&self, handoff: &HandOff) -> std::io::Result<usize> {
        let held = handoff.drain();
        if held.is_empty() {
            return Ok(0);
        }
        let count = held.len();
        let mut writer = self.writer()?;
        for (digest, frame) in held {
            writer.append(&digest, frame)?;
        }
        writer.finish()?;
        Ok(count)
    }

    /// Whether `path` (or, if it does not exist yet, its nearest existing ancestor) is on
    /// the cache's filesystem, where [`Self::adopt`] can link it.
    pub fn same_filesystem(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(cache) = fs::metadata(&self.dir) else {
            return false;
        };
        path.ancestors()
            .find_map(|p| fs::metadata(p).ok())
            .is_some_and(|meta| meta.dev() == cache.dev())
    }

    /// Forgets a chunk (found corrupt). Its bytes stay in their segment until the
    /// segment is evicted.
    pub fn remove(&self, digest: &Digest) {
        let mut index = self.lock();
        index.chunks.remove(digest);
        index.recent.remove(digest);
    }

    /// Keeps `digests` (and so their segments) from eviction until the guard is dropped.
    pub fn pin(&self, digests: impl IntoIterator<Item = Digest>) -> Pin {
        let digests: Vec<Digest> = digests.into_iter().collect();
        let mut index = self.lock();
        for d in &digests {
            *index.pins.entry(*d).or_default() += 1;
        }
        Pin {
            cache: self.clone(),
            digests,
        }
    }

    /// Removes least recently used segments without pinned chunks until the cache fits
    /// its quota.
    fn evict(&self) -> std::io::Result<()> {
        self.recount_linked_files();
        let doomed: Vec<(u64, bool)> = {
            let mut index = self.lock();
            let mut doomed = Vec::new();
            let mut total = index.total;
            for (_, id) in &index.by_use {
                if total <= self.quota {
                    break;
                }
                let Some(segment) = index.segments.get(id) else {
                    continue;
                };
                if segment.digests.iter().any(|d| index.pins.contains_key(d)) {
                    continue;
                }
                total -= segment.bytes;
                doomed.push(*id);
            }
            doomed
                .into_iter()
                .map(|id| (id, index.drop_segment(id)))
                .collect::<Vec<_>>()
        };
        for (id, linked) in doomed {
            self.open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            let (data, index) = file_extensions(linked);
            for ext in [index, data] {
                match fs::remove_file(self.dir.join(segment_name(id, ext))) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Counts each linked file ([`Self::adopt`]) at its size now: the job that wrote it
    /// may have appended to it (or cut it short) since, and its disk space is the
    /// cache's once the workspace is gone. One `stat` per linked file; each is at least
    /// [`ADOPT_MIN_FILE`], so a 10 GiB cache holds at most 1,280 of them. A file that
    /// cannot be read keeps its last size (its chunks fail their checks when read).
    fn recount_linked_files(&self) {
        let linked: Vec<u64> = self
            .lock()
            .segments
            .iter()
            .filter(|(_, s)| s.linked)
            .map(|(id, _)| *id)
            .collect();
        let sizes: Vec<(u64, u64)> = linked
            .into_iter()
            .filter_map(|id| {
                let path = self.dir.join(segment_name(id, file_extensions(true).0));
                fs::metadata(path).ok().map(|meta| (id, meta.len()))
            })
            .collect();
        let mut index = self.lock();
        for (id, bytes) in sizes {
            index.resize_segment(id, bytes);
        }
    }

    pub fn figures(&self) -> CacheFigures {
        let index = self.lock();
        CacheFigures {
            chunks: index.chunks.len() as u64,
            bytes: index.total,
            quota: self.quota,
        }
    }
}

/// Writes the index of segment (or linked file) `id`, through a temporary name so that
/// a crash leaves either the whole index or none.
fn write_index(
    dir: &Path,
    id: u64,
    linked: bool,
    entries: &[(Digest, u64, u32)],
) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for (digest, offset, len) in entries {
        bytes.extend_from_slice(digest.as_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
    }
    let name = segment_name(id, file_extensions(linked).1);
    let tmp = dir.join(format!(".tmp-{name}"));
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, dir.join(name))
}

fn parse_index(bytes: &[u8]) -> Option<Vec<(Digest, u64, u32)>> {
    if !bytes.len().is_multiple_of(ENTRY_BYTES) {
        return None;
    }
    bytes
        .chunks_exact(ENTRY_BYTES)
        .map(|e| {
            let digest = Digest::from_bytes(e[..32].try_into().ok()?);
            let offset = u64::from_le_bytes(e[32..40].try_into().ok()?);
            let len = u32::from_le_bytes(e[40..44].try_into().ok()?);
            Some((digest, offset, len))
        })
        .collect()
}

/// Appends chunks to segments of the cache; call [`CacheWriter::finish`] to make the
/// last one visible (a writer dropped unfinished leaves a segment removed at next start).
#[derive(Debug)]
pub struct CacheWriter {
    cache: ChunkCache,
    id: u64,
    file: SegmentFile,
    len: u64,
    entries: Vec<(Digest, u64, u32)>,
    /// The segment closes at this size.
    segment_bytes: u64,
    /// For a publishing writer: when the segment's first chunk came, and the previous
    /// chunk (or the writer's start), to close it by [`PUBLISH_MAX_AGE`] and
    /// [`PUBLISH_SLOW_GAP`] as well as by size.
    publish: Option<PublishClock>,
    /// Chunks given to a download's extraction instead of written (see [`HandOff`]).
    handoff: Option<HandOff>,
}

/// A segment's file: written past the page cache when segments are large (see the
/// module docs), through it when they are small (a publishing writer's 256 KiB, where
/// a direct write per segment would cost more than the copy it saves).
#[derive(Debug)]
enum SegmentFile {
    Buffered(File),
    Direct(gantry_cas::DirectWriter),
}

impl SegmentFile {
    fn create(path: &Path, segment_bytes: u64) -> std::io::Result<Self> {
        let file = File::create(path)?;
        Ok(if segment_bytes >= gantry_cas::DIRECT_WRITE_MIN {
            Self::Direct(gantry_cas::DirectWriter::new(file)?)
        } else {
            Self::Buffered(file)
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Buffered(file) => file.write_all(data),
            Self::Direct(writer) => writer.write(data),
        }
    }

    /// Writes what is still buffered (no fsync: the cache is not durable).
    fn finish(self) -> std::io::Result<()> {
        match self {
            Self::Buffered(_) => Ok(()),
            Self::Direct(writer) => writer.finish().map(drop),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PublishClock {
    first: Option<std::time::Instant>,
    previous: std::time::Instant,
}

impl CacheWriter {
    fn new(cache: ChunkCache, segment_bytes: u64, publish: bool) -> std::io::Result<Self> {
        let id = new_segment_id();
        let file = SegmentFile::create(&cache.dir.join(segment_name(id, "seg")), segment_bytes)?;
        Ok(Self {
            cache,
            id,
            file,
            len: 0,
            entries: Vec::new(),
            segment_bytes,
            publish: publish.then(|| PublishClock {
                first: None,
                previous: std::time::Instant::now(),
            }),
            handoff: None,
        })
    }

    /// Hands the chunks `handoff` wants to it instead of writing them (see [`HandOff`]).
    #[must_use]
    pub fn handing_off(mut self, handoff: HandOff) -> Self {
        self.handoff = Some(handoff);
        self
    }

    /// Appends a chunk (also kept in memory while a download has it pinned, see
    /// [`RECENT_BYTES`]); rolls over to a new segment at the writer's segment size
    /// (and, publishing, by age and on a slow stream).
    pub fn append(&mut self, digest: &Digest, compressed: Bytes) -> std::io::Result<()> {
        let compressed = if let Some(handoff) = &self.handoff {
            let Some(kept_back) = handoff.hold(digest, compressed) else {
                self.cache.appended.send_modify(|n| *n += 1);
                return Ok(());
            };
            kept_back
        } else {
            compressed
        };
        self.file.write(&compressed)?;
        let len = compressed.len();
        self.entries.push((*digest, self.len, len as u32));
        self.len += len as u64;
        let mut index = self.cache.lock();
        let pinned = index.pins.contains_key(digest);
        if pinned {
            index.recent.insert(*digest, compressed);
        }
        drop(index);
        if pinned {
            self.cache.appended.send_modify(|n| *n += 1);
        }
        let mut close = self.len >= self.segment_bytes;
        if let Some(clock) = &mut self.publish {
            let now = std::time::Instant::now();
            let first = *clock.first.get_or_insert(now);
            close |= now.duration_since(first) >= PUBLISH_MAX_AGE
                || now.duration_since(clock.previous) >= PUBLISH_SLOW_GAP;
            clock.previous = now;
        }
        if close {
            let mut next = Self::new(self.cache.clone(), self.segment_bytes, false)?;
            next.publish = self.publish.map(|clock| PublishClock {
                first: None,
                previous: clock.previous,
            });
            next.handoff.clone_from(&self.handoff);
            std::mem::replace(self, next).finish()?;
        }
        Ok(())
    }

    /// Writes the segment's index and makes its chunks visible; evicts to the quota.
    pub fn finish(self) -> std::io::Result<()> {
        let written = self.file.finish();
        if self.entries.is_empty() {
            let _ = fs::remove_file(self.cache.dir.join(segment_name(self.id, "seg")));
            return written;
        }
        written?;
        write_index(&self.cache.dir, self.id, false, &self.entries)?;
        self.cache
            .lock()
            .add_segment(self.id, self.len, &self.entries, false);
        self.cache.published.send_modify(|n| *n += 1);
        self.cache.evict()
    }
}

/// A segment id unique within the directory: the time in nanoseconds, mixed with a
/// per-process counter and the process id (two agents may share no cache, but tests run
/// several processes at once). Uniqueness, not secrecy, is what matters here.
fn new_segment_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    now ^ n.rotate_left(48) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Chunks kept from eviction while a download or extraction needs them.
#[derive(Debug)]
pub struct Pin {
    cache: ChunkCache,
    digests: Vec<Digest>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        {
            let mut index = self.cache.lock();
            for d in &self.digests {
                if let Some(n) = index.pins.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        index.pins.remove(d);
                        index.recent.remove(d);
                    }
                }
            }
        }
        if let Err(e) = self.cache.evict() {
            tracing::warn!("cannot shrink the chunk cache: {e}");
        }
    }
}

/// Reads cached chunks for one reader that asks for them mostly in the order they were
/// appended: a download of a tree whose chunks it cached before reads them back in the
/// order it fetched them, from the segments its fetch streams wrote, in turn. Once a
/// chunk asked for lies after the last one read from the same segment (within
/// [`READ_AHEAD_BYTES`]), one read takes it and what follows it, up to
/// [`READ_AHEAD_BYTES`], and the next chunks of that segment come from those bytes. A
/// chunk asked for out of order is read alone, so a reader that skips about reads no
/// more than it asks for. Like [`ChunkCache::get`], it returns bytes unverified.
#[derive(Debug)]
pub struct CacheReader {
    cache: ChunkCache,
    /// The segments read last, at most [`READ_AHEAD_SEGMENTS`], most recent last.
    cursors: Vec<SegmentCursor>,
    disk_reads: u64,
}

/// Where a [`CacheReader`] is in one segment.
#[derive(Debug)]
struct SegmentCursor {
    segment: u64,
    /// The end of the chunk read last.
    last_end: u64,
    /// Bytes read ahead: where they start in the segment, the bytes.
    held: Option<(u64, Bytes)>,
}

impl CacheReader {
    /// A chunk's bytes, if cached.
    pub fn get(&mut self, digest: &Digest) -> Option<CachedChunk> {
        let (slot, segment_bytes) = match self.cache.locate(digest)? {
            Located::InMemory(data) => return Some(CachedChunk::Frame(data)),
            Located::OnDisk {
                slot,
                segment_bytes,
            } => (slot, segment_bytes),
        };
        let len = slot.len as usize;
        let (start, end) = (slot.offset, slot.offset + u64::from(slot.len));
        let mut cursor =
            if let Some(i) = self.cursors.iter().position(|c| c.segment == slot.segment) {
                self.cursors.remove(i)
            } else {
                if self.cursors.len() >= READ_AHEAD_SEGMENTS {
                    self.cursors.remove(0);
                }
                SegmentCursor {
                    segment: slot.segment,
                    last_end: u64::MAX,
                    held: None,
                }
            };
        let held = cursor.held.as_ref().and_then(|(held_start, held)| {
            let from = start.checked_sub(*held_start)? as usize;
            (from + len <= held.len()).then(|| held.slice(from..from + len))
        });
        let found = held.or_else(|| {
            let in_order = start >= cursor.last_end && start - cursor.last_end <= READ_AHEAD_BYTES;
            let span = if in_order {
                segment_bytes
                    .saturating_sub(start)
                    .min(READ_AHEAD_BYTES)
                    .max(u64::from(slot.len))
            } else {
                u64::from(slot.len)
            };
            self.disk_reads += 1;
            let data = self.cache.read_slot(digest, slot, span as usize)?;
            if data.len() > len {
                cursor.held = Some((start, data.clone()));
                Some(data.slice(..len))
            } else {
                Some(data)
            }
        });
        if found.is_some() {
            cursor.last_end = end;
        }
        self.cursors.push(cursor);
        found.map(|data| CachedChunk::from_slot(slot, data))
    }

    /// How many reads of segments this reader made: for tests and figures.
    pub fn disk_reads(&self) -> u64 {
        self.disk_reads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    /// Chunks peers wait for must not wait for a segment to fill: on a slow stream each
    /// is visible as soon as it is appended (a plain writer's only when it finishes).
    /// Only lower bounds on time are used (sleeps), so a busy machine cannot fail it.
    #[test]
    fn a_publishing_writer_shows_a_slow_streams_chunks_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        let mut slow = cache.writer_publishing_every(1 << 20).expect("writer");
        for n in 3..6 {
            std::thread::sleep(PUBLISH_SLOW_GAP + std::time::Duration::from_millis(20));
            slow.append(&digest(n), Bytes::from(vec![n; 100]))
                .expect("append");
            assert!(
                cache.contains(&digest(n)),
                "chunk {n}, {PUBLISH_SLOW_GAP:?} after the one before, is visible at once"
            );
        }
        slow.finish().expect("finish");

        // A plain writer publishes only when it finishes, however slowly chunks come.
        let mut plain = cache.writer().expect("writer");
        std::thread::sleep(PUBLISH_SLOW_GAP + std::time::Duration::from_millis(20));
        plain
            .append(&digest(7), Bytes::from(vec![7; 100]))
            .expect("append");
        assert!(!cache.contains(&digest(7)));
        plain.finish().expect("finish");
        assert!(cache.contains(&digest(7)));
    }

    /// A download reads back what it just appended from memory; past the memory budget,
    /// after it ends and after the process restarts, the same bytes come from the
    /// segment on disk; a chunk removed as corrupt is served from neither.
    #[test]
    fn recent_chunks_are_read_from_memory_and_older_ones_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        let filler_count = RECENT_BYTES / 100_000 + 1;
        let fillers: Vec<Digest> = (0..filler_count)
            .map(|n| Digest::of(&n.to_le_bytes()))
            .collect();
        // A download pins what it fetches.
        let download = cache.pin(fillers.iter().copied().chain([digest(0), digest(9)]));
        // A download's segment size, so the segment is written past the page cache.
        let mut writer =
            CacheWriter::new(cache.clone(), gantry_cas::DIRECT_WRITE_MIN, false).expect("writer");
        let chunk = |n: u8| Bytes::from(vec![n; 100_000]);
        writer.append(&digest(0), chunk(0)).expect("append");
        assert!(cache.get(&digest(0)).is_none(), "invisible until published");
        writer.finish().expect("finish");
        let from_memory = cache.get(&digest(0)).expect("cached");
        assert_eq!(from_memory, chunk(0));
        assert!(
            cache.lock().recent.chunks.contains_key(&digest(0)),
            "still in memory"
        );

        // Fill memory past its budget: the first chunk leaves it but not the cache.
        let mut writer = cache.writer().expect("writer");
        for filler in &fillers {
            writer
                .append(filler, Bytes::from(vec![1u8; 100_000]))
                .expect("append");
        }
        writer.finish().expect("finish");
        {
            let index = cache.lock();
            assert!(!index.recent.chunks.contains_key(&digest(0)));
            assert!(index.recent.bytes <= RECENT_BYTES, "{}", index.recent.bytes);
        }
        assert_eq!(cache.get(&digest(0)).expect("from disk"), chunk(0));
        let reopened = ChunkCache::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(reopened.get(&digest(0)).expect("from disk"), chunk(0));

        // The download's extraction takes what it reads: out of memory, still cached.
        let filler = cache
            .take_appended(&fillers[filler_count - 1])
            .expect("in memory");
        assert!(
            cache.take_appended(&fillers[filler_count - 1]).is_none(),
            "taken once"
        );
        assert_eq!(
            cache.get(&fillers[filler_count - 1]).expect("from disk"),
            filler,
            "from disk"
        );

        // A chunk found corrupt is forgotten, in memory as well.
        cache.put(&digest(9), &[9; 10]).expect("put");
        assert!(cache.lock().recent.chunks.contains_key(&digest(9)));
        cache.remove(&digest(9));
        assert!(cache.get(&digest(9)).is_none());
        assert!(!cache.lock().recent.chunks.contains_key(&digest(9)));

        // Once the download ends, memory holds nothing, and unpinned chunks never go
        // there: later reads come from disk (where damage is found and fetched again).
        assert!(!cache.lock().recent.chunks.is_empty());
        drop(download);
        assert!(cache.lock().recent.chunks.is_empty());
        assert_eq!(cache.lock().recent.bytes, 0);
        cache.put(&digest(10), &[10; 10]).expect("put");
        assert!(cache.lock().recent.chunks.is_empty());
        assert_eq!(cache.get(&digest(10)).as_deref(), Some(&[10u8; 10][..]));
    }

    /// Chunks read back in the order they were appended take one read per
    /// READ_AHEAD_BYTES, not one per chunk; out of order, each is read alone; either way
    /// every chunk comes back exact, and a segment cut short behind the cache's back
    /// loses only the chunks it no longer holds.
    #[test]
    fn a_reader_in_order_reads_ahead_and_out_of_order_reads_what_it_asks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        // 200 chunks of 40,000 bytes: 8 MB in one segment, written past the page cache.
        let chunk = |n: usize| Bytes::from(vec![(n % 251) as u8; 40_000]);
        let digests: Vec<Digest> = (0..200u32).map(|n| Digest::of(&n.to_le_bytes())).collect();
        let mut writer = CacheWriter::new(cache.clone(), 2 * gantry_cas::DIRECT_WRITE_MIN, false)
            .expect("writer");
        for (n, d) in digests.iter().enumerate() {
            writer.append(d, chunk(n)).expect("append");
        }
        writer.finish().expect("finish");

        let mut reader = cache.reader();
        for (n, d) in digests.iter().enumerate() {
            assert_eq!(reader.get(d).expect("cached"), chunk(n), "chunk {n}");
        }
        // The first chunk alone, then 8 MB in reads of READ_AHEAD_BYTES.
        let expected = 1 + (199 * 40_000u64).div_ceil(READ_AHEAD_BYTES);
        assert_eq!(reader.disk_reads(), expected);

        // Chunks dealt out in turn to two segments (as a download's streams append
        // them) and read back in turn: each segment is still read ahead.
        let dealt: Vec<Digest> = (1000..1200u32)
            .map(|n| Digest::of(&n.to_le_bytes()))
            .collect();
        let mut writers = [0, 1].map(|_| {
            CacheWriter::new(cache.clone(), 2 * gantry_cas::DIRECT_WRITE_MIN, false)
                .expect("writer")
        });
        for (n, d) in dealt.iter().enumerate() {
            writers[n % 2].append(d, chunk(n)).expect("append");
        }
        for writer in writers {
            writer.finish().expect("finish");
        }
        let mut reader = cache.reader();
        for (n, d) in dealt.iter().enumerate() {
            assert_eq!(reader.get(d).expect("cached"), chunk(n), "dealt chunk {n}");
        }
        let per_segment = 1 + (99 * 40_000u64).div_ceil(READ_AHEAD_BYTES);
        assert_eq!(reader.disk_reads(), 2 * per_segment);

        let mut reader = cache.reader();
        for n in [150, 10, 120, 30, 199, 0] {
            assert_eq!(
                reader.get(&digests[n]).expect("cached"),
                chunk(n),
                "chunk {n}"
            );
        }
        assert_eq!(reader.disk_reads(), 6, "one read per chunk out of order");
        assert!(reader.get(&Digest::of(b"never cached")).is_none());

        // Cut the segment after its 100th chunk: reading in order still returns the
        // first 100 exact, and forgets the rest rather than returning short bytes.
        let first_segment = cache.lock().chunks[&digests[0]].segment;
        let segment = dir.path().join(segment_name(first_segment, "seg"));
        File::options()
            .write(true)
            .open(&segment)
            .and_then(|f| f.set_len(100 * 40_000))
            .expect("truncate");
        let mut reader = cache.reader();
        for (n, d) in digests.iter().enumerate() {
            let got = reader.get(d);
            if n < 100 {
                assert_eq!(got.expect("still there"), chunk(n), "chunk {n}");
            } else {
                assert!(got.is_none(), "chunk {n} is past the end");
                assert!(!cache.contains(d), "chunk {n} forgotten");
            }
        }
    }

    #[test]
    fn least_recently_used_segments_go_first_and_pinned_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 300).expect("open");
        for n in 0..3 {
            cache.put(&digest(n), &[n; 100]).expect("put");
        }
        assert_eq!(cache.figures().bytes, 300);
        // Using chunk 0 makes chunk 1's segment the oldest.
        assert_eq!(cache.get(&digest(0)).as_deref(), Some(&[0u8; 100][..]));
        cache.put(&digest(3), &[3; 100]).expect("put");
        assert!(!cache.contains(&digest(1)), "least recently used went");
        assert!(cache.contains(&digest(0)) && cache.contains(&digest(2)));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            6,
            "three segments, each with its index"
        );

        // Pinned chunks (a download pins its chunks before fetching them) survive even
        // when the cache is over its quota; an unpinned newcomer does not.
        let pin = cache.pin([digest(0), digest(2), digest(3), digest(4)]);
        cache.put(&digest(4), &[4; 100]).expect("put");
        assert!(cache.contains(&digest(0)) && cache.contains(&digest(2)));
        assert_eq!(cache.figures().chunks, 4, "over quota while pinned");
        cache.put(&digest(5), &[5; 100]).expect("put");
        assert!(!cache.contains(&digest(5)), "unpinned, so it goes at once");
        drop(pin);
        assert!(cache.figures().bytes <= 300, "shrinks once unpinned");
    }

    #[test]
    fn the_index_is_rebuilt_from_disk_and_half_written_segments_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = ChunkCache::open(dir.path(), 1 << 20).expect("open");
            let mut writer = cache.writer().expect("writer");
            writer
                .append(&digest(1), Bytes::from_static(b"one"))
                .expect("append");
            writer
                .append(&digest(2), Bytes::from_static(b"two!"))
                .expect("append");
            writer.finish().expect("finish");
            let mut crashed = cache.writer().expect("writer");
            crashed
                .append(&digest(3), Bytes::from_static(b"never indexed"))
                .expect("append");
            drop(crashed); // a crash: the segment was never finished
            assert!(!cache.contains(&digest(3)), "invisible until finished");
        }
        let again = ChunkCache::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(again.figures().chunks, 2);
        assert_eq!(again.figures().bytes, 7);
        assert_eq!(again.get(&digest(2)).as_deref(), Some(&b"two!"[..]));
        assert!(!again.contains(&digest(3)));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            2,
            "the unfinished segment was removed"
        );
        // A quota smaller than what is there shrinks it at once.
        let small = ChunkCache::open(dir.path(), 4).expect("reopen small");
        assert_eq!(small.figures().bytes, 0);
    }

    /// The chunks of a file a download wrote are kept in it, not copied: read back raw
    /// and verified, still there once the job deletes its copy and after a restart,
    /// and gone with the link when evicted. A file changed in place is caught by the
    /// check every read gets.
    #[test]
    fn an_adopted_files_chunks_are_read_where_they_lie_until_evicted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache_dir = dir.path().join("cache");
        let cache = ChunkCache::open(&cache_dir, 1 << 30).expect("open");
        let file = dir.path().join("workspace-file");
        let (first, second) = (vec![1u8; 70_000], vec![2u8; 50_000]);
        std::fs::write(&file, [first.as_slice(), second.as_slice()].concat()).expect("write");
        let (d1, d2) = (Digest::of(&first), Digest::of(&second));
        assert!(cache.same_filesystem(&file));
        assert!(cache.same_filesystem(&dir.path().join("not/made/yet")));
        cache
            .adopt(&file, &[(d1, 0, 70_000), (d2, 70_000, 50_000)])
            .expect("adopt");
        assert_eq!(cache.figures().chunks, 2);
        assert_eq!(cache.figures().bytes, 120_000, "the file's size counts");
        let linked = cache_dir.join(segment_name(cache.lock().chunks[&d1].segment, "lnk"));
        {
            use std::os::unix::fs::MetadataExt;
            let (a, b) = (
                std::fs::metadata(&file).expect("file"),
                std::fs::metadata(&linked).expect("link"),
            );
            assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "a link, not a copy");
        }

        // The job deletes its file; the cache still reads (and the reader in order too).
        std::fs::remove_file(&file).expect("rm");
        let got = cache.get(&d2).expect("cached");
        assert!(matches!(got, CachedChunk::Raw(_)), "{got:?}");
        let verified = got.open(50_000, &d2).expect("verifies");
        assert_eq!(verified.into_bytes(), second);
        let mut reader = cache.reader();
        for (d, bytes) in [(d1, &first), (d2, &second)] {
            let got = reader.get(&d).expect("cached").open(bytes.len(), &d);
            assert_eq!(got.expect("verifies").into_bytes(), *bytes);
        }
        // Raw bytes sent to a peer go as a frame any reader can check.
        let frame = cache.get(&d1).expect("cached").into_frame();
        assert!(gantry_cas::verify_chunk(&frame, 70_000, &d1).is_ok());

        // A restart indexes the linked file again.
        drop((cache, reader));
        let cache = ChunkCache::open(&cache_dir, 1 << 30).expect("reopen");
        assert_eq!(cache.figures().bytes, 120_000);
        assert!(cache.get(&d1).expect("cached").verify(70_000, &d1).is_ok());

        // Changed in place (through the link, as a job writing its file would), the bytes
        // no longer match: the caller's check refuses them.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&linked)
                .expect("open");
            f.write_at(b"x", 100).expect("write");
        }
        assert!(cache.get(&d1).expect("cached").verify(70_000, &d1).is_err());
        assert!(cache.get(&d2).expect("cached").verify(50_000, &d2).is_ok());
        drop(cache);

        // A job appending to its file grows the cache: the growth counts against the
        // quota at the next eviction (here, after a small segment is written), and the
        // least recently used file goes first.
        let cache = ChunkCache::open(&cache_dir, 200_000).expect("reopen");
        {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&linked)
                .expect("open");
            f.write_all(&vec![3u8; 100_000]).expect("append");
        }
        let mut writer = cache.writer().expect("writer");
        writer
            .append(&digest(9), Bytes::from(vec![9; 300]))
            .expect("append");
        writer.finish().expect("finish");
        assert!(!cache.contains(&d2), "the grown file is evicted");
        assert!(cache.contains(&digest(9)));
        assert_eq!(cache.figures().bytes, 300);
        let left: Vec<PathBuf> = std::fs::read_dir(&cache_dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(
            left.iter().all(|path| {
                let ext = path.extension().and_then(|e| e.to_str());
                ext == Some("seg") || ext == Some("idx")
            }),
            "link and index go: {left:?}"
        );
    }

    /// A writer handing off gives the wanted chunks to the download's extraction in
    /// memory and writes only the others; a link without its index (a crash between
    /// the two) goes at the next start.
    #[test]
    fn a_writer_handing_off_writes_only_what_is_not_wanted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        let handoff = HandOff::new([digest(1)]);
        let mut writer = cache.writer().expect("writer").handing_off(handoff.clone());
        writer
            .append(&digest(1), Bytes::from(vec![1; 1000]))
            .expect("append");
        writer
            .append(&digest(2), Bytes::from(vec![2; 300]))
            .expect("append");
        writer.finish().expect("finish");
        assert!(!cache.contains(&digest(1)), "handed off, not cached");
        assert!(cache.contains(&digest(2)));
        assert_eq!(
            cache.figures().bytes,
            300,
            "only the other chunk was written"
        );
        assert_eq!(handoff.held_bytes(), 1000);
        assert_eq!(handoff.take(&digest(1)).as_deref(), Some(&[1u8; 1000][..]));
        assert!(handoff.take(&digest(1)).is_none(), "taken once");
        assert_eq!(handoff.held_bytes(), 0);

        std::fs::write(dir.path().join(segment_name(7, "lnk")), b"orphan").expect("write");
        drop(cache);
        let again = ChunkCache::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(again.figures().chunks, 1);
        assert!(!dir.path().join(segment_name(7, "lnk")).exists());
    }

    /// A hand-off holds at most [`HANDOFF_BYTES`]: past it, a wanted chunk is written to
    /// the segment like any other, so memory stays bounded whatever the fetch does.
    #[test]
    fn a_handoff_past_its_cap_writes_to_the_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        // One buffer shared by every chunk: the cap counts each, memory holds one.
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        let wanted: Vec<Digest> = (0..=HANDOFF_BYTES >> 20)
            .map(|i| Digest::of(&(i as u64).to_le_bytes()))
            .collect();
        let handoff = HandOff::new(wanted.iter().copied());
        let mut writer = cache.writer().expect("writer").handing_off(handoff.clone());
        for digest in &wanted {
            writer.append(digest, mib.clone()).expect("append");
        }
        writer.finish().expect("finish");
        assert_eq!(handoff.held_bytes(), HANDOFF_BYTES);
        let last = wanted[wanted.len() - 1];
        assert!(!cache.contains(&wanted[0]), "held, not written");
        assert!(cache.contains(&last), "past the cap, written");
        assert_eq!(cache.figures().bytes, 1 << 20);
        assert!(handoff.take(&last).is_none());
    }
}
