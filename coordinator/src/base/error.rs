//! How a failure reaches an admin: every service's typed error says which kind of
//! failure it is ([`AdminFailure`]), and the admin router and the follow streams turn it
//! into the [`AdminError`] the CLI maps to an exit code (invalid input and not found
//! exit 2, internal exits 1) and the dashboard to an HTTP status. The message is the
//! error's own, unchanged.

use gantry_protocol::{AdminError, AdminErrorKind};

use crate::store::StoreError;

/// An error an admin request can end in.
pub trait AdminFailure: std::error::Error {
    fn kind(&self) -> AdminErrorKind;
}

/// The wire form of `e`.
pub fn admin_error<E: AdminFailure + ?Sized>(e: &E) -> AdminError {
    AdminError {
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// A store that cannot be read or written is the coordinator's failure, never the
/// caller's.
impl AdminFailure for StoreError {
    fn kind(&self) -> AdminErrorKind {
        AdminErrorKind::Internal
    }
}
