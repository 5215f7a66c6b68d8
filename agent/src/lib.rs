//! `gantry-agent`: the program that runs on build hosts and target servers.
//!
//! This crate owns the agent's side of a session: enrolling with a join token, holding
//! one mutually authenticated connection to the coordinator, reconnecting with backoff,
//! renewing its certificate over the live session, reporting host figures, and running
//! the jobs the coordinator pushes ([`jobs`], [`exec`], in containers through
//! [`docker`]) with their logs masked
//! ([`mask`]), spooled and uploaded. It must
//! not know about the coordinator's store or scheduler, and it never names a quinn type:
//! all networking goes through `gantry-transport`.
//!
//! The decisions (when to retry, when a certificate is due for renewal, which labels win)
//! are pure functions in [`backoff`], [`renewal`] and [`labels`], tested without sockets
//! or clocks; [`enroll`] and [`session`] are the thin async shells that do the I/O.

pub mod artifacts;
pub mod backoff;
pub mod bundle;
pub mod datadir;
pub mod deploy;
pub mod docker;
pub mod duration;
pub mod enroll;
pub mod exec;
pub mod figures;
pub mod health;
pub mod jobs;
pub mod labels;
pub mod mask;
pub mod peers;
pub mod renewal;
pub mod session;
pub mod upgrade;

/// Exit codes shared by every command, as DESIGN.md fixes them for all Gantry binaries.
pub mod exit {
    /// The work failed, or a local resource (disk, signal handler) did.
    pub const FAILURE: u8 = 1;
    /// Usage or input error: a malformed token, a missing enrollment, a bad flag.
    pub const USAGE: u8 = 2;
    /// Cannot reach or authenticate to the coordinator (refused, revoked, unreachable).
    pub const COORDINATOR: u8 = 3;
}
