//! A commit as a run's source, through the chunk store (issue 24): the files
//! `gantry_git::checkout_tree` walks (with its limits, `.git` tricks refused and
//! symlinks out of the tree neutralised) become a manifest whose chunks go into the
//! coordinator's packs, and the workspace's shallow `.git` (`gantry_git::build_payload`)
//! one more manifest per `checkout.depth` the run's jobs ask for: a single file,
//! `payload`, starting with [`GIT_PAYLOAD_MAGIC`]. The run's source names them all
//! ([`TreeSource`]); agents materialise a job's workspace from them, fetching only the
//! chunks their cache lacks, and write the `.git` with `gantry_git::write_git_dir`.
//!
//! A blob memo per repository (in memory, `Repos::memos`) makes a one-file commit read
//! and chunk one blob; a memo that promises chunks the store no longer has (garbage
//! collected) is caught when the manifest is committed, and the walk is made again
//! without it.
//!
//! Blocking (git processes, hashing, file writes): callers run it on a blocking thread.

use std::collections::BTreeSet;

use gantry_cas::{chunk_reader, ChunkRef, Entry, EntryKind, Manifest};
use gantry_git::{
    build_payload, checkout_tree, CheckoutOptions, Depth, GitError, MemoryMemo, Mirror, Mirrors,
    ObjectId, PayloadRequest,
};
use gantry_protocol::{Checkout, TreeSource, MAX_SOURCE_DEPTHS};

use crate::services::artifacts::sources::{TreeFigures, TreeWriter};
use crate::services::artifacts::{Artifacts, StreamError};

pub use gantry_protocol::GIT_PAYLOAD_MAGIC;

/// The file a `.git` payload's manifest holds.
pub const PAYLOAD_FILE: &str = "payload";

/// Why a commit could not become a source tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("cannot store the checkout: {0}")]
    Store(#[from] StreamError),
    #[error("cannot chunk the workspace's .git: {0}")]
    Payload(#[from] gantry_cas::CasError),
    #[error("{0} chunks the blob memo promised are gone from the store")]
    Stale(usize),
}

/// What the run's jobs ask of the checkout: every distinct `checkout.depth` (`None`:
/// full) and whether any asks for submodules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceWants {
    pub depths: BTreeSet<Option<u32>>,
    pub submodules: bool,
}

impl SourceWants {
    /// From the pipeline file's jobs; the default depth if no job checks out or the file
    /// does not parse (the run is then refused by the submit's own check).
    pub fn of(file_name: &str, text: &str) -> Self {
        let mut wants = Self::default();
        if let Ok(pipeline) = gantry_pipeline::parse(file_name, text) {
            for job in &pipeline.jobs {
                if let Checkout::Source(spec) = &job.checkout {
                    wants.depths.insert(spec.depth);
                    wants.submodules |= spec.submodules;
                }
            }
        }
        if wants.depths.is_empty() {
            wants
                .depths
                .insert(Some(gantry_protocol::DEFAULT_CHECKOUT_DEPTH));
        }
        // Bounded: past the limit, the deepest ones give way to `full` (every job still
        // gets at least the history it asked for).
        while wants.depths.len() > MAX_SOURCE_DEPTHS {
            let deepest = wants.depths.iter().rev().find(|d| d.is_some()).copied();
            if let Some(d) = deepest {
                wants.depths.remove(&d);
            }
            wants.depths.insert(None);
        }
        wants
    }
}

/// What [`store_commit`] stored.
#[derive(Debug, Clone)]
pub struct StoredTree {
    /// The run's source ([`TreeSource::encode`]).
    pub source: String,
    pub files: u64,
    pub bytes: u64,
    pub figures: TreeFigures,
}

/// Walks `commit` of `mirror` (and with submodules when a job asks, through
/// `mirrors`), stores its chunks and manifests, and a `.git` for each wanted depth (HEAD
/// on `full_ref` if it is a branch, else detached).
pub fn store_commit(
    mirror: &Mirror,
    commit: ObjectId,
    full_ref: Option<&str>,
    wants: &SourceWants,
    memo: &MemoryMemo,
    mirrors: Option<&Mirrors>,
    artifacts: &Artifacts,
) -> Result<StoredTree, TreeError> {
    let mut writer = artifacts.tree_writer()?;
    let walk = |submodules: bool, writer: &mut TreeWriter<'_>| {
        let options = CheckoutOptions {
            submodules,
            ..CheckoutOptions::default()
        };
        let tree = checkout_tree(mirror, commit, &options, memo, mirrors, |digest, bytes| {
            writer.put(digest, bytes)
        })?;
        let digest = writer
            .commit(&tree.manifest)?
            .map_err(|m| TreeError::Stale(m.len()))?;
        Ok::<_, TreeError>((tree, digest))
    };
    let (tree, tree_digest) = walk(false, &mut writer)?;
    let with_submodules = match mirrors {
        Some(_) if wants.submodules => Some(walk(true, &mut writer)?.1),
        _ => None,
    };
    let mut git = Vec::new();
    for depth in &wants.depths {
        let (payload, _) = build_payload(
            mirror,
            &PayloadRequest {
                checkout: &tree,
                depth: depth
                    .and_then(std::num::NonZeroU32::new)
                    .map_or(Depth::Full, Depth::Commits),
                reference: full_ref,
                remote_url: Some(mirror.remote().url()),
            },
        )?;
        let mut bytes = GIT_PAYLOAD_MAGIC.to_vec();
        bytes.extend_from_slice(&payload.encode());
        let mut chunks = Vec::new();
        let mut cut = chunk_reader(bytes.as_slice());
        while let Some(next) = cut.next_chunk() {
            let (digest, chunk) = next?;
            writer.put(digest, &chunk)?;
            chunks.push(ChunkRef {
                digest,
                size: u32::try_from(chunk.len()).unwrap_or(u32::MAX),
            });
        }
        let manifest = Manifest::new(vec![Entry {
            path: PAYLOAD_FILE.to_owned(),
            kind: EntryKind::File {
                mode: 0o600,
                size: bytes.len() as u64,
                chunks,
            },
        }]);
        let digest = writer
            .commit(&manifest)?
            .map_err(|m| TreeError::Stale(m.len()))?;
        git.push((*depth, digest));
    }
    let source = TreeSource {
        tree: tree_digest,
        with_submodules,
        git,
    };
    Ok(StoredTree {
        source: source.encode(),
        files: tree.figures.files,
        bytes: tree.figures.bytes,
        figures: writer.figures,
    })
}
