//! Manifests: the content-addressed description of a tree (paths, kinds, modes, sizes,
//! chunk lists), their canonical postcard encoding, and the validation every manifest
//! passes before it is trusted.
//!
//! There is no hardlink kind: a hardlinked file is recorded as independent files with
//! the same chunks (which deduplicate), so extraction never creates a hardlink.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{CasError, Digest, PathProblem, SymlinkProblem, MAX_CHUNK};

/// Format version written as the first byte of every encoded manifest.
pub const MANIFEST_VERSION: u8 = 1;
/// Most entries one manifest may hold.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Most bytes all files of one manifest may declare together (64 GiB).
pub const MAX_TOTAL_SIZE: u64 = 64 * 1024 * 1024 * 1024;
/// Largest encoded manifest accepted by [`Manifest::decode`] (256 MiB).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024 * 1024;
/// Longest path (and symlink target) in bytes, Linux's PATH_MAX.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path component in bytes, Linux's NAME_MAX.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// A tree: its entries sorted by path in the canonical encoding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

/// One path of the tree. `path` is relative and `/`-separated; parents that have no
/// entry of their own are created on extraction with default permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file: permission bits (`mode & 0o7777`), its size and its chunks in
    /// order. `size` always equals the sum of the chunk sizes.
    File {
        mode: u32,
        size: u64,
        chunks: Vec<ChunkRef>,
    },
    /// A symlink, target recorded as read. Only relative targets that stay inside the
    /// tree pass validation.
    Symlink { target: String },
    /// A directory and its permission bits.
    Dir { mode: u32 },
}

/// A chunk of a file: its digest and uncompressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    pub size: u32,
}

/// What goes on the wire: a version byte, then the entries.
#[derive(Serialize)]
struct WireRef<'a> {
    version: u8,
    entries: &'a [Entry],
}

#[derive(Deserialize)]
struct Wire {
    version: u8,
    entries: Vec<Entry>,
}

impl Manifest {
    /// A manifest of `entries`, sorted by path.
    pub fn new(mut entries: Vec<Entry>) -> Self {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Self { entries }
    }

    /// The canonical bytes: entries sorted by path (sorted here if they are not).
    /// Encoding does not validate; [`Manifest::decode`] does.
    pub fn encode(&self) -> Vec<u8> {
        let sorted;
        let entries = if self.entries.is_sorted_by(|a, b| a.path <= b.path) {
            &self.entries
        } else {
            let mut copy = self.entries.clone();
            copy.sort_by(|a, b| a.path.cmp(&b.path));
            sorted = copy;
            &sorted
        };
        // postcard only fails to serialize on types it cannot represent (maps with
        // non-serializable keys, unknown lengths); these types have none.
        postcard::to_stdvec(&WireRef {
            version: MANIFEST_VERSION,
            entries,
        })
        .expect("postcard encoding of a manifest")
    }

    /// The manifest's id: BLAKE3 of [`Manifest::encode`].
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }

    /// Decodes and validates canonical bytes. Refuses anything [`Manifest::validate`]
    /// refuses, unsorted entries, overlong integers, trailing bytes and unknown versions.
    pub fn decode(bytes: &[u8]) -> Result<Self, CasError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(CasError::TooLarge {
                what: "encoded manifest",
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        match bytes.first() {
            None => {
                return Err(CasError::ManifestEncoding {
                    reason: "empty input".to_owned(),
                })
            }
            Some(&found) if found != MANIFEST_VERSION => {
                return Err(CasError::UnsupportedManifestVersion {
                    found,
                    supported: MANIFEST_VERSION,
                })
            }
            Some(_) => {}
        }
        // The entry count comes right after the version byte. Checking it before
        // deserializing bounds memory by MAX_ENTRIES rather than by the input length:
        // a minimal entry takes 4 bytes on the wire but about 80 in memory.
        if let Some(count) = read_varint(&bytes[1..]) {
            if count > MAX_ENTRIES as u64 {
                return Err(CasError::TooManyEntries {
                    count: usize::try_from(count).unwrap_or(usize::MAX),
                    limit: MAX_ENTRIES,
                });
            }
        }
        let (wire, rest): (Wire, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|err| CasError::ManifestEncoding {
                reason: err.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(CasError::ManifestEncoding {
                reason: format!("{} trailing bytes", rest.len()),
            });
        }
        debug_assert_eq!(wire.version, MANIFEST_VERSION);
        let manifest = Self {
            entries: wire.entries,
        };
        manifest.validate()?;
        for pair in manifest.entries.windows(2) {
            if pair[0].path > pair[1].path {
                return Err(CasError::NotCanonical {
                    path: pair[1].path.clone(),
                });
            }
        }
        // postcard also reads an integer written with more bytes than it needs (`0xa4
        // 0x00` for 36), so sorted entries are not enough: only the one encoding of
        // these entries is accepted, which keeps bytes and digest one-to-one (found by
        // the `manifest` fuzz target).
        if manifest.encode() != bytes {
            return Err(CasError::ManifestEncoding {
                reason: "not the canonical encoding of its entries (an integer is written with more bytes than it needs)".to_owned(),
            });
        }
        Ok(manifest)
    }

    /// Checks everything extraction relies on: entry count, safe relative paths, no
    /// duplicates, no entry under a symlink or a file, file sizes equal to their chunks,
    /// chunk sizes within [`MAX_CHUNK`], a bounded total size, and symlink targets that
    /// stay inside the tree. Order is not checked here (see [`Manifest::decode`]).
    pub fn validate(&self) -> Result<(), CasError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(CasError::TooManyEntries {
                count: self.entries.len(),
                limit: MAX_ENTRIES,
            });
        }
        let mut kinds: HashMap<&str, &EntryKind> = HashMap::with_capacity(self.entries.len());
        for entry in &self.entries {
            check_path(&entry.path).map_err(|problem| CasError::InvalidPath {
                path: entry.path.clone(),
                problem,
            })?;
            if kinds.insert(&entry.path, &entry.kind).is_some() {
                return Err(CasError::DuplicateEntry {
                    path: entry.path.clone(),
                });
            }
        }
        let mut total: u64 = 0;
        for entry in &self.entries {
            for (slash, _) in entry.path.match_indices('/') {
                let parent = &entry.path[..slash];
                match kinds.get(parent) {
                    Some(EntryKind::Symlink { .. }) => {
                        return Err(CasError::ThroughSymlink {
                            path: entry.path.clone(),
                            link: parent.to_owned(),
                        })
                    }
                    Some(EntryKind::File { .. }) => {
                        return Err(CasError::ParentNotDir {
                            path: entry.path.clone(),
                            parent: parent.to_owned(),
                        })
                    }
                    Some(EntryKind::Dir { .. }) | None => {}
                }
            }
            match &entry.kind {
                EntryKind::File { size, chunks, .. } => {
                    let mut chunks_total: u64 = 0;
                    for chunk in chunks {
                        if chunk.size == 0 || chunk.size as usize > MAX_CHUNK {
                            return Err(CasError::BadChunkSize {
                                path: entry.path.clone(),
                                size: chunk.size,
                                limit: MAX_CHUNK as u32,
                            });
                        }
                        chunks_total += u64::from(chunk.size);
                        // Checked per chunk, so neither sum ever exceeds
                        // MAX_TOTAL_SIZE + MAX_CHUNK and nothing can overflow.
                        if total + chunks_total > MAX_TOTAL_SIZE {
                            return Err(CasError::TooLarge {
                                what: "manifest total file size",
                                size: total + chunks_total,
                                limit: MAX_TOTAL_SIZE,
                            });
                        }
                    }
                    if chunks_total != *size {
                        return Err(CasError::FileSizeMismatch {
                            path: entry.path.clone(),
                            declared: *size,
                            chunks_total,
                        });
                    }
                    total += chunks_total;
                }
                EntryKind::Symlink { target } => {
                    check_symlink(&entry.path, target, &kinds).map_err(|problem| {
                        CasError::UnsafeSymlink {
                            path: entry.path.clone(),
                            target: target.clone(),
                            problem,
                        }
                    })?;
                }
                EntryKind::Dir { .. } => {}
            }
        }
        Ok(())
    }
}

/// Reads a postcard (LEB128) varint of up to 64 bits, or `None` if `bytes` does not
/// start with one; the postcard decoder then reports the error.
fn read_varint(bytes: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for (index, &byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f).checked_shl(7 * index as u32)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Checks one manifest path: relative, `/`-separated, no empty, `.` or `..` component,
/// no NUL, within the length limits.
pub(crate) fn check_path(path: &str) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.contains('\0') {
        return Err(PathProblem::Nul);
    }
    if path.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong);
    }
    for component in path.split('/') {
        match component {
            "" => return Err(PathProblem::EmptyComponent),
            "." => return Err(PathProblem::CurDir),
            ".." => return Err(PathProblem::ParentDir),
            c if c.len() > MAX_COMPONENT_BYTES => return Err(PathProblem::TooLong),
            _ => {}
        }
    }
    Ok(())
}

fn check_symlink(
    path: &str,
    target: &str,
    kinds: &HashMap<&str, &EntryKind>,
) -> Result<(), SymlinkProblem> {
    check_symlink_target(
        path,
        target,
        |resolved| matches!(kinds.get(resolved), Some(EntryKind::Symlink { .. })),
        |_| Ok(()),
    )
}

/// Resolves `target` lexically from the directory holding the link at `path` and
/// refuses it if it leaves the tree's root. `is_symlink` says whether a path in the
/// tree is a link; `check_name` may refuse a component of the target (before it is
/// followed) with a problem of the caller's own.
///
/// Lexical resolution is only sound if no `..` follows a component that is itself a
/// symlink (`up -> ..` then `x -> up/..` resolves to `.` lexically but to the root's
/// parent on disk), so that case is refused too. Every link in a chain is checked on
/// its own, so a link to another link inside the tree is fine.
pub fn check_symlink_target<E: From<SymlinkProblem>>(
    path: &str,
    target: &str,
    is_symlink: impl Fn(&str) -> bool,
    check_name: impl Fn(&str) -> Result<(), E>,
) -> Result<(), E> {
    if target.is_empty() {
        return Err(SymlinkProblem::Empty.into());
    }
    if target.contains('\0') {
        return Err(SymlinkProblem::Nul.into());
    }
    if target.starts_with('/') {
        return Err(SymlinkProblem::Absolute.into());
    }
    if target.len() > MAX_PATH_BYTES {
        return Err(SymlinkProblem::TooLong.into());
    }
    let mut resolved: Vec<&str> = path.split('/').collect();
    resolved.pop();
    let mut through_symlink = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if through_symlink {
                    return Err(SymlinkProblem::DotDotAfterSymlink.into());
                }
                if resolved.pop().is_none() {
                    return Err(SymlinkProblem::Escapes.into());
                }
            }
            name => {
                check_name(name)?;
                resolved.push(name);
                if is_symlink(&resolved.join("/")) {
                    through_symlink = true;
                }
            }
        }
    }
    Ok(())
}
