//! The coordinator's chunk files: the only module that reads or writes them.
//!
//! Owns `DATA_DIR/cas/`: `packs/<16 hex>.pack` (zstd-compressed chunks stored back to
//! back; where each chunk sits is the store's index), `tmp/` (packs being written) and
//! `quarantine/` (copies of chunks found corrupt, kept for inspection, never served).
//!
//! Why packs and not a file per chunk: a 1 GiB upload is ~16,000 chunks, and creating
//! 16,000 files (temporary name, rename) cost the coordinator about half a millisecond
//! each in ext4's inode allocation, a third of its CPU time in the upload benchmark. A
//! pack holds one upload batch (up to 32 MiB, or what arrived in 500 ms), so the same
//! upload makes about 32 files.
//!
//! Durability: a pack is written under `tmp/` (past the page cache, see [`PackWriter`]),
//! fsynced, renamed into `packs/`, and the directory fsynced; only then does the store index its chunks. A crash before the index
//! commit leaves a pack nothing points at, which garbage collection removes.
//!
//! It must not know about the index (that is the store's), about manifests or about who
//! may read what.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gantry_cas::{Bytes, DirectWriter, ReadOnceFile};
use gantry_protocol::Digest;

/// Open pack files kept for reading; the set is cleared when it reaches this size.
const MAX_OPEN_PACKS: usize = 64;

/// Where a chunk's compressed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
}

/// Why a chunk cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ChunkReadError {
    #[error("chunk {0} is not stored")]
    Missing(Digest),
    #[error("chunk {digest} is corrupt on the coordinator's disk ({reason}); a copy was put in quarantine at {quarantined}")]
    Corrupt {
        digest: Digest,
        reason: String,
        quarantined: String,
    },
    #[error("cannot read chunk {digest}: {source}")]
    Io {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
}

/// The chunk directory. Cheap to clone; clones share open pack files.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
    open: Arc<Mutex<HashMap<u64, Arc<ReadOnceFile>>>>,
}

/// A pack being written: chunks are appended, then [`PackWriter::sync`] and
/// [`SyncedPack::publish`] make it durable under its final name.
///
/// Its bytes go to disk past the page cache ([`DirectWriter`]): a pack is fsynced at
/// once and read back, if ever, long after, so caching it buys nothing, and the copy
/// into the page cache was more than half of the coordinator's CPU time in the upload
/// benchmark (on a VM whose host reclaims freed pages, filling the page cache with
/// fresh pages costs ~2.3 s per GiB; see
/// docs/decisions/0077-bulk-data-past-page-cache.md).
#[derive(Debug)]
pub struct PackWriter {
    id: u64,
    file: DirectWriter,
    /// The temporary name, removed if the pack is abandoned.
    path: tempfile::TempPath,
    len: u64,
    packs_dir: PathBuf,
}

impl PackWriter {
    /// Appends a chunk's compressed bytes; returns where it sits.
    pub fn append(&mut self, compressed: &[u8]) -> std::io::Result<Location> {
        self.append_slices([compressed])
    }

    /// [`Self::append`] for compressed bytes that arrived in pieces (their
    /// concatenation), written as they lie.
    pub fn append_pieces(&mut self, pieces: &[Bytes]) -> std::io::Result<Location> {
        self.append_slices(pieces.iter().map(|piece| &piece[..]))
    }

    /// Appends one chunk given as consecutive slices.
    fn append_slices<'a>(
        &mut self,
        slices: impl IntoIterator<Item = &'a [u8]>,
    ) -> std::io::Result<Location> {
        let offset = self.len;
        let mut len = 0usize;
        for slice in slices {
            self.file.write(slice)?;
            len += slice.len();
        }
        self.len += len as u64;
        Ok(Location {
            pack: self.id,
            offset,
            len: u32::try_from(len).map_err(|_| {
                std::io::Error::other(format!("a chunk of {len} bytes does not fit a pack entry"))
            })?,
        })
    }

    /// Writes what is still buffered and fsyncs the pack, still under its temporary
    /// name (the slow part, which an upload overlaps with receiving its next batch).
    pub fn sync(self) -> std::io::Result<SyncedPack> {
        self.file.finish()?.sync_all()?;
        Ok(SyncedPack {
            id: self.id,
            path: self.path,
            packs_dir: self.packs_dir,
        })
    }

    /// [`Self::sync`] then [`SyncedPack::publish`].
    pub fn finish(self) -> std::io::Result<()> {
        self.sync()?.publish()
    }
}

/// A pack whose bytes are on disk under its temporary name.
#[derive(Debug)]
pub struct SyncedPack {
    id: u64,
    path: tempfile::TempPath,
    packs_dir: PathBuf,
}

impl SyncedPack {
    /// Renames the pack into place and fsyncs the directory; after this its chunks
    /// may be indexed. Garbage collection must not run between this and the index
    /// commit (the pack would look unused).
    pub fn publish(self) -> std::io::Result<()> {
        let path = self.packs_dir.join(pack_name(self.id));
        self.path.persist(&path).map_err(|e| e.error)?;
        File::open(&self.packs_dir)?.sync_all()
    }
}

/// The checksum of a chunk's stored bytes that the index keeps ([`ChunkStore::checked`]):
/// XXH3-64, which any change to the bytes alters except with odds of 2^-64.
pub fn stored_check(stored: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(stored)
}

/// [`stored_check`] of the concatenation of `pieces` (the same value).
pub fn stored_check_pieces(pieces: &[Bytes]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    for piece in pieces {
        hasher.update(piece);
    }
    hasher.digest()
}

fn pack_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

impl ChunkStore {
    /// Opens (creating if needed) the chunk directories under `root` and clears `tmp/`,
    /// where only a crash can have left anything.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        let store = Self {
            root: root.to_path_buf(),
            open: Arc::new(Mutex::new(HashMap::new())),
        };
        fs::create_dir_all(store.packs_dir())?;
        fs::create_dir_all(store.quarantine_dir())?;
        let tmp = store.tmp_dir();
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(store)
    }

    fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    /// The file of a pack.
    pub fn pack_path(&self, pack: u64) -> PathBuf {
        self.packs_dir().join(pack_name(pack))
    }

    /// Starts a pack with a fresh random id.
    pub fn new_pack(&self) -> std::io::Result<PackWriter> {
        let id = u64::from_le_bytes(gantry_certs::random_bytes::<8>());
        let (file, path) = tempfile::NamedTempFile::new_in(self.tmp_dir())?.into_parts();
        Ok(PackWriter {
            id,
            file: DirectWriter::new(file)?,
            path,
            len: 0,
            packs_dir: self.packs_dir(),
        })
    }

    fn pack_file(&self, pack: u64) -> std::io::Result<Arc<ReadOnceFile>> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(file) = open.get(&pack) {
            return Ok(file.clone());
        }
        let file = Arc::new(ReadOnceFile::open(&self.pack_path(pack))?);
        if open.len() >= MAX_OPEN_PACKS {
            open.clear();
        }
        open.insert(pack, file.clone());
        Ok(file)
    }

    /// Forgets an open pack (it was deleted or replaced).
    fn close_pack(&self, pack: u64) {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&pack);
    }

    /// Reads bytes of a pack without checking them: one chunk's compressed bytes
    /// (compaction copies them as they are; they were verified when written), or the
    /// span of several chunks stored one after the other (a download asks for them in
    /// the order they were uploaded), which one read serves. Read past the page cache
    /// ([`ReadOnceFile`]).
    pub fn read_raw(&self, location: Location) -> std::io::Result<Bytes> {
        let file = self.pack_file(location.pack)?;
        file.read(location.offset, location.len as usize)
    }

    /// Reads a chunk and checks it before it may be served ([`Self::checked`]). A chunk
    /// that fails is copied to `quarantine/` and reported as [`ChunkReadError::Corrupt`],
    /// never returned.
    pub fn read_verified(
        &self,
        digest: &Digest,
        location: Location,
        size: u32,
        check: Option<u64>,
    ) -> Result<Bytes, ChunkReadError> {
        let compressed = match self.read_raw(location) {
            Ok(bytes) => bytes,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::UnexpectedEof) => {
                return Err(ChunkReadError::Missing(*digest))
            }
            Err(source) => {
                return Err(ChunkReadError::Io {
                    digest: *digest,
                    source,
                })
            }
        };
        self.checked(digest, compressed, size, check)
    }

    /// Checks a chunk's bytes read from its pack before they may be served.
    ///
    /// With `check`, the [`stored_check`] the index recorded when the chunk was written
    /// (after it was verified against its digest), bytes that still match it are served:
    /// what the disk could have done to them since (bit rot, a torn or misplaced write)
    /// changes the checksum. Without one (a chunk indexed before checksums were kept), or
    /// when it does not match, the chunk is verified in full: it must decompress within
    /// its declared size and hash to its digest. The full check of every chunk served
    /// was ~9% of both cores' time in the 1 GiB download benchmark; the checksum costs a
    /// tenth of that. The receiver verifies every chunk against its digest in any case.
    pub fn checked(
        &self,
        digest: &Digest,
        compressed: Bytes,
        size: u32,
        check: Option<u64>,
    ) -> Result<Bytes, ChunkReadError> {
        if check.is_some_and(|check| stored_check(&compressed) == check) {
            return Ok(compressed);
        }
        match gantry_cas::verify_chunk(&compressed, size as usize, digest) {
            Ok(()) => {
                if check.is_some() {
                    // The index's checksum is what is wrong; the bytes are the chunk's.
                    tracing::warn!(chunk = %digest, "a stored chunk matches its digest but not the checksum the index holds for it; serving it");
                }
                Ok(compressed)
            }
            Err(e) => Err(ChunkReadError::Corrupt {
                digest: *digest,
                reason: e.to_string(),
                quarantined: self.quarantine(digest, &compressed),
            }),
        }
    }

    /// Keeps a copy of bad bytes for inspection; returns where (or why not).
    fn quarantine(&self, digest: &Digest, bytes: &[u8]) -> String {
        let text = digest.to_string();
        let name = format!(
            "{}-{}",
            &text[gantry_protocol::DIGEST_PREFIX.len()..],
            gantry_protocol::UnixMillis::now().0
        );
        let to = self.quarantine_dir().join(name);
        match fs::write(&to, bytes) {
            Ok(()) => to.display().to_string(),
            Err(e) => format!("nowhere (cannot write it: {e})"),
        }
    }

    /// Deletes a pack; a missing one is fine. Returns the bytes freed.
    pub fn remove_pack(&self, pack: u64) -> std::io::Result<u64> {
        self.close_pack(pack);
        let path = self.pack_path(pack);
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Every pack on disk: id, size and modification time (unix ms).
    pub fn list_packs(&self) -> std::io::Result<Vec<(u64, u64, u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.packs_dir())? {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".pack"))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            let meta = entry.metadata()?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            out.push((id, meta.len(), modified));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each chunk's digest, where it was stored, its size and the checksum of its
    /// stored bytes.
    fn pack_of(store: &ChunkStore, chunks: &[&[u8]]) -> Vec<(Digest, Location, u32, u64)> {
        let mut writer = store.new_pack().expect("pack");
        let mut out = Vec::new();
        for data in chunks {
            let stored = gantry_cas::compress(data);
            let location = writer.append(&stored).expect("append");
            out.push((
                Digest::of(data),
                location,
                data.len() as u32,
                stored_check(&stored),
            ));
        }
        writer.finish().expect("finish");
        out
    }

    #[test]
    fn chunks_read_back_verified_from_their_pack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        let chunks = pack_of(&store, &[b"first chunk", b"second one"]);
        for (digest, location, size, check) in &chunks {
            // With the index's checksum, and fully verified without one.
            for check in [Some(*check), None] {
                let packed = store
                    .read_verified(digest, *location, *size, check)
                    .expect("read");
                assert!(gantry_cas::decompress(&packed, *size as usize, digest).is_ok());
            }
        }
        let packs = store.list_packs().expect("list");
        assert_eq!(packs.len(), 1);
        assert_eq!(packs[0].0, chunks[0].1.pack);
        assert!(store.remove_pack(packs[0].0).expect("remove") > 0);
        assert!(matches!(
            store.read_verified(&chunks[0].0, chunks[0].1, chunks[0].2, Some(chunks[0].3)),
            Err(ChunkReadError::Missing(_))
        ));
    }

    /// A chunk received in pieces is stored as their concatenation, between whole
    /// chunks, and its checksum is the one of the joined bytes.
    #[test]
    fn a_chunk_appended_in_pieces_reads_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        let mut writer = store.new_pack().expect("pack");
        let before = gantry_cas::compress(b"before");
        writer.append(&before).expect("append");
        // Incompressible (xorshift), so stored as a raw frame of two blocks.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let stored = gantry_cas::compress(&data);
        assert!(stored.len() > data.len(), "stored raw");
        let cuts = [0, 7, 65_000, 65_000, stored.len()];
        let pieces: Vec<Bytes> = cuts
            .windows(2)
            .map(|w| Bytes::copy_from_slice(&stored[w[0]..w[1]]))
            .collect();
        assert_eq!(stored_check_pieces(&pieces), stored_check(&stored));
        let location = writer.append_pieces(&pieces).expect("append pieces");
        assert_eq!(location.len as usize, stored.len());
        writer.append(&before).expect("append");
        writer.finish().expect("finish");
        let digest = Digest::of(&data);
        let read = store
            .read_verified(
                &digest,
                location,
                data.len() as u32,
                Some(stored_check(&stored)),
            )
            .expect("read");
        assert_eq!(&read[..], &stored[..]);
    }

    /// Flips one bit of a stored chunk's bytes on disk, at `at` bytes into the chunk.
    fn flip_bit(store: &ChunkStore, location: Location, at: u64) {
        let path = store.pack_path(location.pack);
        let mut bytes = std::fs::read(&path).expect("pack");
        bytes[(location.offset + at) as usize] ^= 0x10;
        std::fs::write(&path, bytes).expect("tamper");
        store.close_pack(location.pack);
    }

    #[test]
    fn a_corrupt_chunk_is_quarantined_and_never_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        // Incompressible bytes, stored as they are: one flipped bit changes the data
        // itself, not only the compressed form around it.
        let mut data = vec![0u8; 64 * 1024];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let other = vec![7u8; 4000];
        let chunks = pack_of(&store, &[&data, &other]);
        // One bit, deep inside the first chunk: the checksum the index keeps catches it,
        // and so does the full check of a chunk indexed without one.
        let (digest, location, size, check) = chunks[0];
        flip_bit(&store, location, 40_000);
        for check in [Some(check), None] {
            match store.read_verified(&digest, location, size, check) {
                Err(ChunkReadError::Corrupt { quarantined, .. }) => {
                    assert!(quarantined.contains("quarantine"), "{quarantined}");
                }
                other => panic!("expected corrupt, got {other:?}"),
            }
        }
        // (Two copies, unless both reads fell in the same millisecond, which names them.)
        assert!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .expect("quarantine")
                .count()
                >= 1
        );
        // Its neighbour in the pack is untouched and still served.
        let (digest, location, size, check) = chunks[1];
        assert!(store
            .read_verified(&digest, location, size, Some(check))
            .is_ok());
    }

    #[test]
    fn a_sound_chunk_whose_indexed_checksum_is_wrong_is_verified_in_full_and_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        let (digest, location, size, check) = pack_of(&store, &[b"sound bytes"])[0];
        let packed = store
            .read_verified(&digest, location, size, Some(check ^ 1))
            .expect("a chunk that hashes to its digest is served");
        assert!(gantry_cas::decompress(&packed, size as usize, &digest).is_ok());
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .expect("quarantine")
                .count(),
            0
        );
    }

    #[test]
    fn an_unfinished_pack_never_appears_and_tmp_is_cleared_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        let mut writer = store.new_pack().expect("pack");
        writer.append(b"half").expect("append");
        std::mem::forget(writer); // a crash: neither finished nor cleaned up
        assert!(store.list_packs().expect("list").is_empty());
        ChunkStore::open(dir.path()).expect("reopen");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }
}
