//! Gantry's coordinator as a library; the `gantry` binary (`main.rs`) parses the command
//! line and calls into it.

mod admin;
mod base;
pub mod cli;
mod edges;
mod services;
mod store;

pub use edges::server;

// The store still names the deployment record by its old path (`store.rs` aliases
// `crate::deployments::DeploymentRecord` and reads `ENV_HISTORY`); the store's split
// moves the record into the store. An exception in `layers.toml`, owned by "store".
use services::deployments;
