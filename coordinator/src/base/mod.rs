//! The bottom layer: what every part of the coordinator stands on, and that knows no
//! service. Configuration, the data directory's free space, the authorization table's counters, job logs, chunk packs,
//! sealed secrets, source trees, metrics and the small HTTP client. (The store, also at
//! this layer, is `crate::store`.) Nothing here imports a service, the admin router, an
//! edge or the CLI.

pub mod audit;
pub mod authz;
pub mod chunks;
pub mod config;
pub mod disk;
pub mod error;
pub mod http_client;
pub mod labels;
pub mod logs;
pub mod metrics;
pub mod seal;
pub mod sources;
pub mod tasks;
pub mod text;
