//! The QUIC side: the listener and its admission (`listener.rs`), and the sessions a
//! connection can be, by the certificate it presents: enrollment (`enroll.rs`), an
//! agent (`agent.rs`) or an admin (`admin.rs`). `wire.rs` holds what they share.
//! Only this edge (through `gantry_transport`) touches connections and streams.

pub mod admin;
pub mod agent;
pub mod enroll;
pub mod listener;
pub mod wire;
