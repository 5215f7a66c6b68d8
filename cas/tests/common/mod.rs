//! Helpers shared by the integration tests: a seeded PRNG (no `rand` dependency) and
//! manifest builders for hostile inputs.

#![allow(dead_code)] // Reason: each test binary uses a different subset of these helpers.

use std::path::Path;

use gantry_cas::{ChunkRef, Digest, Entry, EntryKind, Manifest};

/// SplitMix64: tiny, seedable and good enough for test data.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

pub fn file(path: &str, data: &[u8]) -> Entry {
    let chunks = if data.is_empty() {
        Vec::new()
    } else {
        vec![ChunkRef {
            digest: Digest::of(data),
            size: data.len() as u32,
        }]
    };
    Entry {
        path: path.to_owned(),
        kind: EntryKind::File {
            mode: 0o644,
            size: data.len() as u64,
            chunks,
        },
    }
}

pub fn symlink(path: &str, target: &str) -> Entry {
    Entry {
        path: path.to_owned(),
        kind: EntryKind::Symlink {
            target: target.to_owned(),
        },
    }
}

pub fn dir(path: &str) -> Entry {
    Entry {
        path: path.to_owned(),
        kind: EntryKind::Dir { mode: 0o755 },
    }
}

/// A manifest kept in the given order (not sorted), as a hostile peer could send it.
pub fn raw(entries: Vec<Entry>) -> Manifest {
    Manifest { entries }
}

/// A fetch that serves `data` for its digest (every test file uses the same bytes).
pub const DATA: &[u8] = b"payload\n";

pub fn fetch(digest: &Digest) -> Result<Vec<u8>, gantry_cas::CasError> {
    if *digest == Digest::of(DATA) {
        Ok(DATA.to_vec())
    } else {
        Err(gantry_cas::CasError::CorruptChunk {
            digest: *digest,
            reason: "not in the test store".to_owned(),
        })
    }
}

/// Names of everything directly in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list directory")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}
