//! A local chunk cache: compressed chunks on disk, evicted least recently used first
//! when they pass a size quota, so a repeated download costs no network.
//!
//! Owns one directory: `<2 hex>/<62 hex>` per chunk, exactly as received (compressed).
//! The index (size and last use of each chunk) lives in memory and is rebuilt from the
//! directory at start, ordered by modification time. Files are written to a temporary
//! name and renamed, without fsync: a cache may lose entries in a crash, and a torn or
//! corrupt entry is caught when it is read (every read is verified against its digest)
//! and removed.
//!
//! Chunks being downloaded or extracted are pinned and never evicted, so a download
//! larger than the quota still completes (the cache then shrinks back once unpinned).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gantry_protocol::Digest;

#[derive(Debug, Default)]
struct Index {
    /// Each chunk's stored size and the tick of its last use.
    entries: HashMap<Digest, (u64, u64)>,
    /// (tick, digest), oldest first: the eviction order.
    by_use: BTreeSet<(u64, Digest)>,
    /// How many live pins hold each chunk.
    pins: HashMap<Digest, u32>,
    total: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, digest: &Digest) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((_, used)) = self.entries.get_mut(digest) {
            self.by_use.remove(&(*used, *digest));
            *used = tick;
            self.by_use.insert((tick, *digest));
        }
    }

    fn insert(&mut self, digest: Digest, size: u64) {
        self.remove(&digest);
        self.tick += 1;
        self.entries.insert(digest, (size, self.tick));
        self.by_use.insert((self.tick, digest));
        self.total += size;
    }

    fn remove(&mut self, digest: &Digest) -> bool {
        match self.entries.remove(digest) {
            Some((size, used)) => {
                self.by_use.remove(&(used, *digest));
                self.total -= size;
                true
            }
            None => false,
        }
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
}

impl ChunkCache {
    /// Opens (creating) the cache in `dir` with a quota in bytes, indexing what is there.
    pub fn open(dir: &Path, quota: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir.join("tmp"))?;
        let mut found: Vec<(std::time::SystemTime, Digest, u64)> = Vec::new();
        for prefix in fs::read_dir(dir)? {
            let prefix = prefix?;
            let name = prefix.file_name();
            let Some(prefix_name) = name.to_str().filter(|n| n.len() == 2) else {
                continue;
            };
            for file in fs::read_dir(prefix.path())? {
                let file = file?;
                let Some(rest) = file.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Ok(digest) = format!("blake3:{prefix_name}{rest}").parse::<Digest>() else {
                    continue;
                };
                let meta = file.metadata()?;
                found.push((
                    meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    digest,
                    meta.len(),
                ));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, digest, size) in found {
            index.insert(digest, size);
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            quota,
            index: Arc::new(Mutex::new(index)),
        };
        cache.evict()?;
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let text = digest.to_string();
        let hex = &text[gantry_protocol::DIGEST_PREFIX.len()..];
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// A chunk's compressed bytes, if cached (and marks it used). The caller verifies
    /// them and calls [`Self::remove`] if they are bad.
    pub fn get(&self, digest: &Digest) -> Option<Vec<u8>> {
        if !self.contains(digest) {
            return None;
        }
        if let Ok(bytes) = fs::read(self.path(digest)) {
            self.lock().touch(digest);
            Some(bytes)
        } else {
            // Deleted behind our back: forget it.
            self.lock().remove(digest);
            None
        }
    }

    /// Stores a chunk's compressed bytes (already verified by the caller), then evicts
    /// down to the quota.
    pub fn put(&self, digest: &Digest, compressed: &[u8]) -> std::io::Result<()> {
        let path = self.path(digest);
        let mut tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))?;
        tmp.as_file_mut().write_all(compressed)?;
        if let Err(e) = tmp.persist(&path) {
            if e.error.kind() != ErrorKind::NotFound {
                return Err(e.error);
            }
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            e.file.persist(&path).map_err(|e| e.error)?;
        }
        self.lock().insert(*digest, compressed.len() as u64);
        self.evict()
    }

    /// Drops a chunk (found corrupt, or no longer wanted).
    pub fn remove(&self, digest: &Digest) {
        if self.lock().remove(digest) {
            let _ = fs::remove_file(self.path(digest));
        }
    }

    /// Keeps `digests` from eviction until the guard is dropped.
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

    /// Removes least recently used, unpinned chunks until the cache fits its quota.
    fn evict(&self) -> std::io::Result<()> {
        let doomed: Vec<Digest> = {
            let mut index = self.lock();
            let mut doomed = Vec::new();
            let mut total = index.total;
            for (_, digest) in &index.by_use {
                if total <= self.quota {
                    break;
                }
                if index.pins.contains_key(digest) {
                    continue;
                }
                if let Some((size, _)) = index.entries.get(digest) {
                    total -= size;
                    doomed.push(*digest);
                }
            }
            for d in &doomed {
                index.remove(d);
            }
            doomed
        };
        for digest in doomed {
            match fs::remove_file(self.path(&digest)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn figures(&self) -> CacheFigures {
        let index = self.lock();
        CacheFigures {
            chunks: index.entries.len() as u64,
            bytes: index.total,
            quota: self.quota,
        }
    }
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
                    }
                }
            }
        }
        if let Err(e) = self.cache.evict() {
            tracing::warn!("cannot shrink the chunk cache: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn least_recently_used_chunks_go_first_and_pinned_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), 300).expect("open");
        for n in 0..3 {
            cache.put(&digest(n), &[n; 100]).expect("put");
        }
        assert_eq!(cache.figures().bytes, 300);
        // Using chunk 0 makes chunk 1 the oldest.
        assert!(cache.get(&digest(0)).is_some());
        cache.put(&digest(3), &[3; 100]).expect("put");
        assert!(!cache.contains(&digest(1)), "least recently used went");
        assert!(cache.contains(&digest(0)) && cache.contains(&digest(2)));
        assert!(!cache.path(&digest(1)).exists(), "its file too");

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
    fn the_index_is_rebuilt_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = ChunkCache::open(dir.path(), 1 << 20).expect("open");
            cache.put(&digest(1), b"one").expect("put");
            cache.put(&digest(2), b"two!").expect("put");
        }
        let again = ChunkCache::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(again.figures().chunks, 2);
        assert_eq!(again.figures().bytes, 7);
        assert_eq!(again.get(&digest(2)).as_deref(), Some(&b"two!"[..]));
        // A quota smaller than what is there shrinks it at once.
        let small = ChunkCache::open(dir.path(), 4).expect("reopen small");
        assert!(small.figures().bytes <= 4);
    }
}
