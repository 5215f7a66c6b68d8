//! `gantry-forge`: Gantry's side of the forges a team points at it (Gitea and Forgejo,
//! GitLab, GitHub and GitHub Enterprise), as pure code the coordinator calls.
//!
//! - [`webhook`]: a delivery in (headers and body), checked the way its forge signs
//!   it, read into one [`ForgeEvent`] (push, tag, ref deletion, pull/merge request) or
//!   a typed refusal that says what to fix.
//! - [`status`]: the HTTP request that sets a commit's status on each forge, and how
//!   Gantry's run and job states map onto the forge's.
//! - [`reporter`]: a sans-IO machine that sends those requests with coalescing,
//!   retries, backoff and bounded queues, and remembers what failed.
//! - [`trust`]: the untrusted-change rule (fork pull requests) and its threat model.
//!
//! Architecture invariants:
//! - no I/O: no sockets, no files, no clock reads, no global randomness. Time and
//!   randomness come in as parameters (`now`, a jitter seed); requests go out as data.
//! - nothing from a forge is trusted before its signature is checked, and nothing in a
//!   payload can make this crate panic, allocate beyond its bounds or loop unbounded.
//! - it knows nothing of the store, the scheduler, pipelines or git: the coordinator
//!   maps events to runs and run states to [`status::StatusUpdate`]s.

pub mod reporter;
pub mod status;
pub mod trust;
mod types;
pub mod webhook;

pub use types::{
    check_ref_name, CommitId, EventKind, Forge, ForgeEvent, GitRef, PullRequest, PullRequestAction,
    Push, RepoIdentity, RepoLocation, MAX_REF_NAME_BYTES,
};
