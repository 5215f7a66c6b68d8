//! The services: what the coordinator does, independent of how requests arrive. The
//! scheduler's shell (engine), runs, artifacts, deployments, notifications and webhooks,
//! triggers, ad-hoc commands and delivery figures. Services import the base layer and
//! each other (never in a cycle); never the admin router, an edge or the CLI.

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
pub mod runner;
pub mod runs;
pub mod secrets;
pub mod stats;
pub mod triggers;
pub mod upgrades;
pub mod webhooks;
