//! The coordinator's chunk files: the only module that reads or writes them.
//!
//! Owns `DATA_DIR/cas/`: `chunks/<2 hex>/<62 hex>` (a chunk's zstd-compressed bytes, named
//! by the BLAKE3 digest of its uncompressed bytes), `tmp/` (chunks being written) and
//! `quarantine/` (chunks found corrupt, kept for inspection and never served).
//!
//! Durability: a chunk is written to `tmp/`, renamed into place, and counted as stored
//! only once [`ChunkStore::sync`] has returned and the store's index says so. `sync` is
//! one `syncfs(2)` for a whole batch rather than an `fsync` per chunk: a 1 GiB upload is
//! about 16,000 chunks, and 16,000 fsyncs at ~1-2 ms each would cap uploads at well under
//! 100 MB/s, while one syncfs per 32 MiB batch costs a few milliseconds. A crash before
//! the index commit leaves files the index does not know; they are never served (a chunk
//! is served only if indexed) and garbage collection removes them.
//!
//! It must not know about the index (that is the store's), about manifests or about who
//! may read what.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use gantry_protocol::Digest;

/// Why a chunk cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ChunkReadError {
    #[error("chunk {0} is not on disk")]
    Missing(Digest),
    #[error("chunk {digest} is corrupt on the coordinator's disk ({reason}); it was moved to {quarantined}")]
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

/// The chunk directory. Cheap to clone (a path), so blocking tasks take their own copy.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
}

impl ChunkStore {
    /// Opens (creating if needed) the chunk directories under `root` and clears `tmp/`,
    /// where only a crash can have left anything.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        let store = Self {
            root: root.to_path_buf(),
        };
        fs::create_dir_all(store.chunks_dir())?;
        fs::create_dir_all(store.quarantine_dir())?;
        let tmp = store.tmp_dir();
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(store)
    }

    fn chunks_dir(&self) -> PathBuf {
        self.root.join("chunks")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    /// Where a chunk lives: `chunks/ab/cdef…`, 256 directories so none grows past a few
    /// thousand entries per million chunks.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = hex(digest);
        self.chunks_dir().join(&hex[..2]).join(&hex[2..])
    }

    /// Writes a chunk's compressed bytes under its name, not yet durable: call
    /// [`Self::sync`] before recording it in the index. Writing a chunk that is already
    /// there replaces it with the same content, which is harmless.
    pub fn write_unsynced(&self, digest: &Digest, compressed: &[u8]) -> std::io::Result<()> {
        let final_path = self.path(digest);
        let mut tmp = tempfile::NamedTempFile::new_in(self.tmp_dir())?;
        tmp.as_file_mut().write_all(compressed)?;
        match tmp.persist(&final_path) {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == ErrorKind::NotFound => {
                // First chunk under this two-hex prefix.
                if let Some(parent) = final_path.parent() {
                    fs::create_dir_all(parent)?;
                }
                e.file.persist(&final_path).map(|_| ()).map_err(|e| e.error)
            }
            Err(e) => Err(e.error),
        }
    }

    /// Makes every chunk written so far (and its rename) durable: one `syncfs` of the
    /// filesystem holding the chunk directory.
    pub fn sync(&self) -> std::io::Result<()> {
        let dir = File::open(self.chunks_dir())?;
        rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
    }

    /// Reads a chunk and checks it before it may be served: it must decompress within
    /// its declared size and hash to its name. A chunk that fails is moved to
    /// `quarantine/` and reported as [`ChunkReadError::Corrupt`], never returned.
    pub fn read_verified(&self, digest: &Digest, size: u32) -> Result<Vec<u8>, ChunkReadError> {
        let path = self.path(digest);
        let compressed = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ChunkReadError::Missing(*digest))
            }
            Err(source) => {
                return Err(ChunkReadError::Io {
                    digest: *digest,
                    source,
                })
            }
        };
        match gantry_cas::decompress(&compressed, size as usize, digest) {
            Ok(_) => Ok(compressed),
            Err(e) => {
                let quarantined = self.quarantine(digest);
                Err(ChunkReadError::Corrupt {
                    digest: *digest,
                    reason: e.to_string(),
                    quarantined,
                })
            }
        }
    }

    /// Moves a chunk file to `quarantine/`; returns where it went (or why it could not).
    fn quarantine(&self, digest: &Digest) -> String {
        let to = self.quarantine_dir().join(format!(
            "{}-{}",
            hex(digest),
            gantry_protocol::UnixMillis::now().0
        ));
        match fs::rename(self.path(digest), &to) {
            Ok(()) => to.display().to_string(),
            Err(e) => format!("nowhere (cannot move it: {e})"),
        }
    }

    /// Deletes a chunk file; a missing one is fine. Returns the bytes freed.
    pub fn remove(&self, digest: &Digest) -> std::io::Result<u64> {
        let path = self.path(digest);
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

    /// Every chunk file on disk with its size and modification time (unix ms), for
    /// garbage collection of files the index does not know. Files whose names are not
    /// digests are skipped.
    pub fn list(&self) -> std::io::Result<Vec<(Digest, u64, u64)>> {
        let mut out = Vec::new();
        for prefix in fs::read_dir(self.chunks_dir())? {
            let prefix = prefix?;
            let Some(prefix_name) = prefix.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !prefix.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(prefix.path())? {
                let file = file?;
                let Some(rest) = file.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Ok(digest) = format!("blake3:{prefix_name}{rest}").parse::<Digest>() else {
                    continue;
                };
                let meta = file.metadata()?;
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                out.push((digest, meta.len(), modified));
            }
        }
        Ok(out)
    }
}

fn hex(digest: &Digest) -> String {
    let text = digest.to_string();
    text[gantry_protocol::DIGEST_PREFIX.len()..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> (Digest, Vec<u8>) {
        (Digest::of(data), gantry_cas::compress(data))
    }

    #[test]
    fn a_written_chunk_reads_back_verified_and_lists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        let (digest, packed) = chunk(b"hello chunk");
        store.write_unsynced(&digest, &packed).expect("write");
        store.sync().expect("sync");
        assert_eq!(store.read_verified(&digest, 11).expect("read"), packed);
        let listed = store.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, digest);
        assert_eq!(store.remove(&digest).expect("remove"), packed.len() as u64);
        assert!(matches!(
            store.read_verified(&digest, 11),
            Err(ChunkReadError::Missing(_))
        ));
    }

    #[test]
    fn a_corrupt_chunk_is_quarantined_and_never_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path()).expect("open");
        let data = vec![7u8; 4000];
        let (digest, packed) = chunk(&data);
        store.write_unsynced(&digest, &packed).expect("write");
        // Another chunk's valid bytes under this name: decodes, but hashes wrong.
        let other = gantry_cas::compress(&[8u8; 4000]);
        std::fs::write(store.path(&digest), other).expect("tamper");
        match store.read_verified(&digest, 4000) {
            Err(ChunkReadError::Corrupt { reason, .. }) => {
                assert!(reason.contains("digest mismatch"), "{reason}");
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        assert!(!store.path(&digest).exists(), "moved out of the way");
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .expect("quarantine")
                .count(),
            1
        );
        // Garbage that is not zstd at all.
        store.write_unsynced(&digest, &packed).expect("write");
        std::fs::write(store.path(&digest), b"garbage").expect("tamper");
        assert!(matches!(
            store.read_verified(&digest, 4000),
            Err(ChunkReadError::Corrupt { .. })
        ));
    }

    #[test]
    fn leftovers_in_tmp_are_cleared_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("tmp");
        std::fs::write(dir.path().join("tmp").join("half"), b"x").expect("write");
        ChunkStore::open(dir.path()).expect("open");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }
}
