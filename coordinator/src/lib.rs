//! Gantry's coordinator as a library; the `gantry` binary (`main.rs`) parses the command
//! line and calls into it.

mod base;
pub mod cli;
mod edges;
mod services;
mod store;

pub use edges::server;

// Transitional: the old flat paths, while imports move to the layered ones.
use edges::http::{auth, dashboard, distribute, server as http};
use edges::quic;
use services::{artifacts, deployments, engine, exec, notify, runs, stats, triggers, webhooks};
