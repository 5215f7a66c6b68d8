//! The bottom layer: pieces that know no session, no job and no deployment.
//!
//! Decisions as pure functions ([`backoff`], [`renewal`], [`labels`]), formats and
//! parsers ([`duration`], [`mask`], [`bundle`], [`outputs`]), the host's figures ([`figures`]), the
//! data directory's files ([`datadir`]), exit codes ([`exit`]), and the filesystem and
//! process habits the layers above share ([`files`], [`process`]). Nothing here imports
//! from another layer of the agent.

pub mod backoff;
pub mod bundle;
pub mod datadir;
pub mod duration;
pub mod exit;
pub mod figures;
pub mod files;
pub mod labels;
pub mod mask;
pub mod outputs;
pub mod process;
pub mod renewal;
