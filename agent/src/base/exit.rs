//! Exit codes shared by every command, as DESIGN.md fixes them for all Gantry binaries.

/// The work failed, or a local resource (disk, signal handler) did.
pub const FAILURE: u8 = 1;
/// Usage or input error: a malformed token, a missing enrollment, a bad flag.
pub const USAGE: u8 = 2;
/// Cannot reach or authenticate to the coordinator (refused, revoked, unreachable).
pub const COORDINATOR: u8 = 3;
