//! Deployments: the coordinator's shell around the `gantry-deploy` state machines.
//!
//! Every deployment that has not ended lives in one task (the manager): it feeds the
//! gate machine ([`gantry_deploy::gates`], which decides approvals, the wait timer,
//! branch rules and one deployment at a time per environment) and does what it says,
//! picks the target hosts when a deployment starts, feeds the engine the hosts' results
//! and the clock, sends the steps the engine asks for, and persists the whole record
//! (engine and gate state included) after every change, so a restarted coordinator
//! resumes each deployment where it was: steps in flight are sent again when their host
//! reconnects (hosts answer a step they already did from what they kept), and deadlines
//! are wall-clock times.
//!
//! A pipeline job with `deploy:` runs on a virtual agent, the deploy runner: the
//! scheduler offers it the job like any other (it carries the reserved label only such
//! jobs ask for), the manager accepts it, runs the deployment, writes the deployment's
//! log into the job's log, and reports the job's result when the deployment ends. The
//! scheduler, its leases and its retries need nothing special for deploy jobs.
//!
//! The manager reads the clock once per input (at the top of its loop) and passes that
//! `now` down; it makes no gate decision itself. It does not know how sessions or
//! streams work: it reaches hosts through [`Fleet`].
//!
//! The files, each importing only the ones above it in this list:
//! - `error`: [`DeployError`], why a deployment cannot be created or started;
//! - `record`: what deployments make of the stored record (its gate, its log, its view);
//! - `spec`: a pipeline file's `deploy:` and `environments:` turned into what the engine
//!   and the hosts get;
//! - `targets`: the hosts ([`Fleet`]), which of them a deployment starts on, the rules
//!   fleet upgrades run under, and the environment view with the hosts its selector
//!   matches;
//! - `manager`: the task, its inputs, its loop, and its log and persistence helpers;
//! - `create`: deployments created (from a deploy job, `gantry rollback`, `gantry agents
//!   upgrade`), asked of the gates before they are numbered;
//! - `gating`: the gates' commands carried out (hold, start, refuse, cancel, abort);
//! - `running`: a started deployment driven on its hosts, to its end;
//! - `admin`: approve, promote, abort and the views they answer with;
//! - `handle`: [`Deployments`], the rest of the coordinator's handle on the task.

mod admin;
mod create;
mod error;
mod gating;
mod handle;
mod manager;
mod record;
mod running;
mod spec;
mod targets;

pub use error::DeployError;
pub use handle::Deployments;
pub use manager::{AdminOp, AgentUpgrade};
pub use spec::create_file_environments;
pub use targets::{distinct_names, environment_view, Fleet};
