//! The services: what the coordinator does, however requests arrive. Each is a struct
//! holding only what it uses (or, for the stateless ones, functions over the store), and
//! `coordinator.rs` builds one of each in the order they need each other:
//! the scheduler's shell (`engine`, with the deploy runner's id in `runner`), `runs`,
//! `artifacts`, `deployments` (the deployment manager) and `environments`, `agents`
//! (live sessions, presence), `access` (tokens, enrollment, certificates), the one
//! holding rule (`holds`), `secrets`, `notify` and `webhooks`, `triggers`, `repos` (mirrors, runs of a commit), `exec`,
//! `upgrades` and `stats`. Services import the base layer and each other, never in a
//! cycle; never the admin router, an edge or the CLI.

pub mod access;
pub mod agents;
pub mod artifacts;
pub mod coordinator;
pub mod deployments;
pub mod engine;
pub mod environments;
pub mod exec;
pub mod holds;
pub mod notify;
pub mod repos;
pub mod runner;
pub mod runs;
pub mod secrets;
pub mod stats;
pub mod triggers;
pub mod upgrades;
pub mod webhooks;
