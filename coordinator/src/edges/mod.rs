//! The edges: where requests come in. The QUIC listener and its sessions (agents,
//! admins, enrollment), the HTTP side (push webhook, health, metrics, install script,
//! dashboard), and `gantry server`, which starts them. Edges turn what arrives into
//! calls on the services and the admin router, and what those answer into replies.

pub mod http;
pub mod quic;
pub mod server;
