//! `gantry-deploy`: the deployment engine, a state machine with no I/O.
//!
//! One [`Deployment`] takes a release to a set of hosts: it stages the release on every
//! host first, then switches hosts in waves (rolling), in growing steps with pauses and
//! analysis (canary), or all at once between two warm slots (blue-green), and rolls back
//! every host it switched when more hosts fail than the budget allows. It never does
//! I/O: [`Deployment::handle`] takes the current time and an [`Event`] and returns the
//! [`Command`]s for the shell (the coordinator) to carry out; time is only ever the `now`
//! argument. That is what lets the property tests run thousands of random histories.
//!
//! Architecture invariants:
//! - every host reaches a terminal [`HostState`] by a deadline: each operation on a host
//!   has one, and a host whose operation passes its deadline is failed (or, in a
//!   rollback, left as `RollbackFailed`), never left waiting;
//! - the failure budget is never exceeded silently: when failures pass it, the
//!   deployment rolls back and ends [`Outcome::RolledBack`] with the reason;
//! - a deployment that rolls back sends a rollback to every host it switched (or tried
//!   to switch), and to no other host.
//!
//! Before a deployment runs, [`gates::Gates`] decides when it may: approvals, the wait
//! timer, branch rules and one running deployment per environment, in the same style
//! (`handle(now, event)` returning commands). Its names (`Event`, `Command`) are its
//! own, so it is a module rather than re-exported here.
//!
//! It must not know about agents' connections, the store or the pipeline format (the
//! gates borrow only the pipeline crate's glob matcher, so branch rules mean what they
//! mean in pipeline files).

mod engine;
pub mod gates;
mod types;

pub use engine::Deployment;
pub use types::*;
