//! The admin CLI: the commands (`gantry agents`, `run`, `env`, ...), how their answers
//! are printed, the QUIC client they talk through, and the commands that run on the
//! coordinator host without a server (`init`, `bundle`, `demo`). A client of the
//! server: nothing on the server side imports it.

pub mod agents;
pub mod artifacts;
pub mod bundle;
pub mod client;
pub mod connect;
pub mod context;
pub mod demo;
pub mod deploy;
pub mod failure;
pub mod init;
pub mod output;
pub mod ownership;
pub mod pipeline_files;
pub mod pipelines;
pub mod repos;
pub mod web;

pub use failure::Failure;
