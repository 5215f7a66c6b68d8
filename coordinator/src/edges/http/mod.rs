//! The HTTP side: a small bounded HTTP/1.1 server (`server.rs`), who is asking
//! (`auth.rs`), the web dashboard (`dashboard.rs`) and what new hosts download
//! (`distribute.rs`).

pub mod auth;
pub mod dashboard;
pub mod distribute;
pub mod request;
pub mod server;
