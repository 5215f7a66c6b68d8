//! The one error type of the crate. Each refusal is its own variant, naming the entry
//! or chunk it concerns, so callers (and tests) can match on what went wrong.

use std::io;
use std::path::PathBuf;

use crate::Digest;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CasError {
    #[error(transparent)]
    InvalidDigest(#[from] gantry_protocol::DigestParseError),

    #[error("chunk digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },

    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },

    #[error("chunk {digest} is corrupt: {reason}")]
    CorruptChunk { digest: Digest, reason: String },

    #[error("manifest is not a valid encoding: {reason}")]
    ManifestEncoding { reason: String },

    #[error(
        "manifest format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedManifestVersion { found: u8, supported: u8 },

    #[error("manifest has {count} entries, more than the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },

    #[error("entry `{path}`: unsafe path: {problem}")]
    InvalidPath { path: String, problem: PathProblem },

    #[error("entry `{path}` appears more than once")]
    DuplicateEntry { path: String },

    #[error("entry `{path}` is out of order: manifest entries must be sorted by path")]
    NotCanonical { path: String },

    #[error("entry `{path}` declares {declared} bytes but its chunks hold {chunks_total}")]
    FileSizeMismatch {
        path: String,
        declared: u64,
        chunks_total: u64,
    },

    #[error("entry `{path}` has a chunk of {size} bytes; chunks must hold 1 to {limit} bytes")]
    BadChunkSize { path: String, size: u32, limit: u32 },

    #[error("entry `{path}`: symlink to `{target}` refused: {problem}")]
    UnsafeSymlink {
        path: String,
        target: String,
        problem: SymlinkProblem,
    },

    #[error("entry `{path}` lies under `{link}`, which is a symlink; writing through symlinks is refused")]
    ThroughSymlink { path: String, link: String },

    #[error("entry `{path}` lies under `{parent}`, which is not a directory")]
    ParentNotDir { path: String, parent: String },

    #[error("destination {} must be a new or empty directory", dest.display())]
    DestinationNotEmpty { dest: PathBuf },

    #[error(
        "not enough free space in {}: the tree needs {} ({needed} bytes) and {} ({available} bytes) are available",
        dest.display(), human(*needed), human(*available)
    )]
    NoSpace {
        dest: PathBuf,
        needed: u64,
        available: u64,
    },

    #[error("{} is a {kind}, which artifacts cannot hold", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },

    #[error("{} is not valid UTF-8; artifact paths must be", path.display())]
    NonUtf8Path { path: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl CasError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Why a manifest path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("the path is empty")]
    Empty,
    #[error("the path is absolute")]
    Absolute,
    #[error("it has a `..` component")]
    ParentDir,
    #[error("it has a `.` component")]
    CurDir,
    #[error("it has an empty component (`//` or a trailing `/`)")]
    EmptyComponent,
    #[error("it contains a NUL byte")]
    Nul,
    #[error("it is longer than the limit")]
    TooLong,
}

/// Why a symlink target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SymlinkProblem {
    #[error("the target is empty")]
    Empty,
    #[error("the target is absolute")]
    Absolute,
    #[error("the target contains a NUL byte")]
    Nul,
    #[error("the target leaves the extraction directory")]
    Escapes,
    #[error(
        "the target goes through another symlink and then `..`, which cannot be checked lexically"
    )]
    DotDotAfterSymlink,
    #[error("the target is longer than the limit")]
    TooLong,
}

/// `n` bytes in binary units, for people (`1.5 GiB`).
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
