//! The crate's one error type. Each case a caller acts on differently (tell the user to
//! fix credentials, retry later, fail the run for a missing commit) is its own variant;
//! every message is one line that says what failed and where.

use std::path::PathBuf;
use std::time::Duration;

use crate::oid::ObjectId;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GitError {
    /// The server could not be reached (name resolution, refused or timed-out
    /// connection, TLS failure).
    #[error("{what}: cannot reach {url}: {detail}")]
    Unreachable {
        what: String,
        url: String,
        detail: String,
    },

    /// The server answered but refused the credentials (or asked for credentials none
    /// were configured for).
    #[error("{what}: authentication refused by {url}: {detail}")]
    AuthRefused {
        what: String,
        url: String,
        detail: String,
    },

    /// The ssh server's host key is not the one the known_hosts policy expects.
    #[error("{what}: host key of {url} is not trusted: {detail} (add it to the known_hosts file the repository names)")]
    HostKeyRejected {
        what: String,
        url: String,
        detail: String,
    },

    /// The server has no repository at that address.
    #[error("{what}: no repository at {url}: {detail}")]
    RepositoryNotFound {
        what: String,
        url: String,
        detail: String,
    },

    /// A branch, tag or other ref the server does not have (a deleted branch).
    #[error("{what}: ref `{reference}` not found on {url} (deleted or renamed?)")]
    RefNotFound {
        what: String,
        url: String,
        reference: String,
    },

    /// A commit neither the mirror nor the server has (force-pushed away, or never
    /// pushed).
    #[error(
        "commit {commit} not found in the mirror of {url} nor on the server (force-pushed away?)"
    )]
    CommitNotFound { url: String, commit: ObjectId },

    /// A name that resolves to something other than a commit.
    #[error("`{name}` in the mirror of {url} is not a commit")]
    NotACommit { url: String, name: String },

    /// A git invocation ran past its deadline and was stopped with everything it started.
    #[error("{what}: stopped after {} s (the deadline)", elapsed.as_secs())]
    TimedOut { what: String, elapsed: Duration },

    /// A git invocation printed more than it is allowed to.
    #[error("{what}: printed more than {limit} bytes; stopped")]
    OutputTooLarge { what: String, limit: usize },

    /// Any other failure of a git invocation, with git's last line of error output.
    #[error("{what}: git failed ({status}): {detail}")]
    Failed {
        what: String,
        status: String,
        detail: String,
    },

    /// What git printed could not be understood.
    #[error("{what}: unexpected output from git: {detail}")]
    Parse { what: String, detail: String },

    /// A repository URL or option that cannot be used as given.
    #[error("{0}")]
    Config(String),

    /// The tree of a commit exceeds a configured limit.
    #[error("commit {commit}: {what} is {size}, more than the limit of {limit} (raise the repository's checkout limit if this is expected)")]
    TooLarge {
        commit: ObjectId,
        what: &'static str,
        size: u64,
        limit: u64,
    },

    /// A path in the tree that a workspace cannot hold safely.
    #[error("commit {commit}: path `{path}` refused: {reason}")]
    UnsafePath {
        commit: ObjectId,
        path: String,
        reason: String,
    },

    /// A submodule that cannot be checked out as declared.
    #[error("commit {commit}: submodule `{path}`: {reason}")]
    Submodule {
        commit: ObjectId,
        path: String,
        reason: String,
    },

    /// A `.git` payload or workspace that cannot be written.
    #[error("{0}")]
    Payload(String),

    /// The chunk store refused a chunk or a manifest.
    #[error(transparent)]
    Cas(#[from] gantry_cas::CasError),

    /// The caller's chunk sink failed.
    #[error("storing a chunk of blob {blob}: {reason}")]
    Store { blob: ObjectId, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context} ({}): {source}", path.display())]
    File {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl GitError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub(crate) fn file(
        context: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::File {
            context,
            path,
            source,
        }
    }

    /// Whether the same call may succeed later without anyone changing anything (the
    /// server was down, the network slow); a refusal of credentials or a missing ref
    /// will not go away by itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::TimedOut { .. })
    }
}
