//! A commit's tree as a run's source: the files `gantry_git::checkout_tree` walks
//! (with its limits, `.git` tricks refused and symlinks out of the tree neutralised),
//! written as the source archive agents already fetch and unpack, with the workspace's
//! shallow `.git` (`gantry_git::build_payload`) as one more entry.
//!
//! That entry is a regular file named `.git` at the archive's root, starting with
//! [`GIT_PAYLOAD_MAGIC`]: a path no walked tree can hold (a `.git` component is refused),
//! so it cannot collide with the repository's files. The agent takes it out after
//! unpacking and writes the real `.git` directory from it (`gantry_git::write_git_dir`),
//! with the index's stat data of the files as they landed. An agent that predates this
//! leaves it as a file git does not understand; the files are there all the same.
//!
//! Blocking (git processes, hashing, file writes): callers run it on a blocking thread.

use std::collections::HashMap;
use std::io::Write;

use gantry_cas::{Bytes, Digest, EntryKind};
use gantry_git::{
    build_payload, checkout_tree, CheckoutLimits, CheckoutOptions, Depth, GitError, MemoryMemo,
    Mirror, ObjectId, PayloadRequest,
};

use crate::base::sources::{SourceError, SourceStore, MAX_SOURCE_BYTES};

pub use gantry_protocol::GIT_PAYLOAD_MAGIC;

/// Why a commit could not become a source tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("cannot write the source archive: {0}")]
    Write(std::io::Error),
    #[error(transparent)]
    Store(#[from] SourceError),
}

/// What [`store_commit`] stored.
#[derive(Debug, Clone)]
pub struct StoredTree {
    /// The source id (`sha256:<hex>`) the run's jobs fetch.
    pub source: String,
    pub files: u64,
    pub bytes: u64,
}

/// Walks `commit` of `mirror`, writes its files and the workspace `.git` for `depth`
/// (HEAD on `full_ref` if it is a branch, else detached) into a source archive, and
/// stores it.
pub fn store_commit(
    mirror: &Mirror,
    commit: ObjectId,
    full_ref: Option<&str>,
    depth: Depth,
    sources: &SourceStore,
) -> Result<StoredTree, TreeError> {
    let options = CheckoutOptions {
        limits: CheckoutLimits {
            // The archive path bounds a source tree at this size.
            max_total_bytes: MAX_SOURCE_BYTES,
            ..CheckoutLimits::default()
        },
        ..CheckoutOptions::default()
    };
    // Every blob is read here (a fresh memo): the archive needs each file's bytes.
    // Bounded by the limit above; the chunk store path (issue 24) replaces this.
    let memo = MemoryMemo::default();
    let mut chunks: HashMap<Digest, Bytes> = HashMap::new();
    let tree = checkout_tree(mirror, commit, &options, &memo, None, |digest, bytes| {
        chunks.entry(digest).or_insert_with(|| bytes.clone());
        Ok::<(), std::convert::Infallible>(())
    })?;
    let (payload, _) = build_payload(
        mirror,
        &PayloadRequest {
            checkout: &tree,
            depth,
            reference: full_ref,
            remote_url: Some(mirror.remote().url()),
        },
    )?;
    let mut tmp = sources.temporary()?;
    {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(tmp.as_file_mut()));
        tar.mode(tar::HeaderMode::Deterministic);
        for entry in &tree.manifest.entries {
            let mut header = tar::Header::new_gnu();
            match &entry.kind {
                EntryKind::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, &entry.path, std::io::empty())
                        .map_err(TreeError::Write)?;
                }
                EntryKind::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, &entry.path, target)
                        .map_err(TreeError::Write)?;
                }
                EntryKind::File {
                    mode,
                    size,
                    chunks: refs,
                } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(*size);
                    let reader = FileReader {
                        parts: refs
                            .iter()
                            .map(|c| chunks.get(&c.digest).cloned().unwrap_or_default())
                            .collect(),
                        at: 0,
                    };
                    tar.append_data(&mut header, &entry.path, reader)
                        .map_err(TreeError::Write)?;
                }
            }
        }
        let mut bytes = GIT_PAYLOAD_MAGIC.to_vec();
        bytes.extend_from_slice(&payload.encode());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o600);
        header.set_size(bytes.len() as u64);
        tar.append_data(&mut header, ".git", bytes.as_slice())
            .map_err(TreeError::Write)?;
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(TreeError::Write)?;
    }
    let (source, _) = sources.keep(tmp)?;
    Ok(StoredTree {
        source,
        files: tree.figures.files,
        bytes: tree.figures.bytes,
    })
}

/// A file's bytes from its chunks, in order.
struct FileReader {
    parts: std::collections::VecDeque<Bytes>,
    at: usize,
}

impl std::io::Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(part) = self.parts.front() {
            if self.at < part.len() {
                let n = buf.len().min(part.len() - self.at);
                buf[..n].copy_from_slice(&part[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.parts.pop_front();
            self.at = 0;
        }
        Ok(0)
    }
}
