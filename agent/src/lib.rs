//! `gantry-agent`: the program that runs on build hosts and target servers.
//!
//! This crate owns the agent's side of a session: enrolling with a join token, holding
//! one mutually authenticated connection to the coordinator, reconnecting with backoff,
//! renewing its certificate over the live session, reporting host figures, running the
//! jobs the coordinator pushes with their logs masked, spooled and uploaded, carrying
//! out deployment steps on this host, and serving release chunks to its peers. It must
//! not know about the coordinator's store or scheduler, and it never names a quinn type:
//! all networking goes through `gantry-transport`.
//!
//! Its folders are layers, bottom first; a module imports only from its own layer or
//! lower ones, and the files of one layer import each other without a cycle
//! (`agent/layers.toml` declares them; `tests/tests/layering.rs` checks every import):
//! - [`base`]: pure pieces and the host's files: backoff, renewal, labels, duration,
//!   masking, figures, the data directory, exit codes, process and file habits;
//! - [`runner`]: how one step runs (the [`runner::StepRunner`] trait), on the shell or
//!   in Docker containers, and a job's service containers; runners never import each
//!   other;
//! - [`transfers`]: artifacts and caches to and from the coordinator, release chunks
//!   between peers, and resuming on the next connection;
//! - [`jobs`]: accepting jobs, running their steps through a runner, spooling and
//!   uploading their logs;
//! - [`deploy`]: deployment steps on this host (releases, hooks, health checks), fleet
//!   upgrades of the agent itself, and ad-hoc commands;
//! - top: [`session`] (the connection to the coordinator, which drives everything
//!   below) and [`enroll`]; `main.rs` only parses arguments.
//!
//! The decisions (when to retry, when a certificate is due for renewal, which labels
//! win, when an app is healthy) are pure functions tested without sockets or clocks;
//! [`enroll`], [`session`] and the layers' services are the shells that do the I/O.

pub mod base;
pub mod deploy;
pub mod enroll;
pub mod jobs;
pub mod runner;
pub mod session;
pub mod transfers;
