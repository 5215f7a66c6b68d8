//! Git sources for Gantry: the coordinator's bare mirrors, a commit's tree as a
//! chunk-store manifest, and the shallow `.git` a job's workspace gets.
//!
//! Coordinator side:
//! - [`Mirror`]: a bare mirror per repository, created and fetched incrementally with
//!   the `git` program (https, ssh, git://, local paths) under a deadline, with
//!   credentials ([`Credentials`]) that never reach a URL on disk, an argument list or
//!   a build host; errors say in one line what failed ([`GitError`]);
//! - [`checkout_tree`]: the manifest of a commit's tree (paths, modes, chunk lists) and
//!   the chunks to store, through a [`BlobMemo`] so an unchanged blob is never chunked
//!   twice; limits, `.git` tricks and symlinks out of the tree are refused or
//!   neutralised there; submodules merged at their paths ([`Mirrors`]);
//! - [`build_payload`]: the `.git` a workspace gets for a depth ([`GitPayload`]).
//!
//! Agent side: [`write_git_dir`] writes that payload into a workspace once its files
//! are extracted, with an index whose stat data makes `git status` clean without
//! hashing, and needs no `git` program.
//!
//! It must not know the coordinator's store, its network, or why a checkout happens:
//! callers pass chunk sinks, memos and directories. Everything here is blocking (git
//! processes, file reads and hashing): async callers run it on a blocking thread.
//! The choice of the `git` program over gitoxide is measured in
//! `docs/decisions/0084-git-implementation.md`.

mod catfile;
mod error;
mod mirror;
mod oid;
mod payload;
mod remote;
mod run;
mod submodule;
mod tree;
mod workspace;

pub use error::GitError;
pub use mirror::{Fetch, Mirror, MirrorOptions, RefEntry};
pub use oid::ObjectId;
pub use payload::{
    build_payload, decode_index, encode_index, Depth, GitPayload, PackedRef, PayloadFigures,
    PayloadRequest, MAX_PAYLOAD_BYTES, PAYLOAD_VERSION,
};
pub use remote::{redact, Credentials, KnownHosts, Remote, Secret, Transport};
pub use run::GitProgram;
pub use submodule::Mirrors;
pub use tree::{
    checkout_tree, BlobChunks, BlobMemo, CheckoutLimits, CheckoutOptions, IndexEntry, MemoryMemo,
    MergedSubmodule, SymlinkPolicy, TreeCheckout, TreeFigures,
};
pub use workspace::{write_git_dir, WorkspaceFigures};
