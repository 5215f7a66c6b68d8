//! How a CLI command fails, by exit code: 1 the work failed (a job, a deployment), 2
//! usage or input error, 3 cannot reach or authenticate to the coordinator. Only
//! `main.rs` turns a [`Failure`] into the process's exit code.

use crate::cli::client::ClientError;

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// Exit code 1.
    Work(anyhow::Error),
    /// Exit code 2.
    Usage(anyhow::Error),
    /// Exit code 3.
    Unreachable(anyhow::Error),
}

impl Failure {
    /// The process exit code this failure maps to, and its error.
    pub fn exit(self) -> (u8, anyhow::Error) {
        match self {
            Self::Work(e) => (1, e),
            Self::Usage(e) => (2, e),
            Self::Unreachable(e) => (3, e),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable(e) => Self::Unreachable(e),
            ClientError::Rejected(m) => Self::Usage(anyhow::anyhow!(m)),
            ClientError::Failed(m) => Self::Work(anyhow::anyhow!(m)),
        }
    }
}

/// A usage or input error (exit code 2), for `map_err`.
pub fn usage(e: anyhow::Error) -> Failure {
    Failure::Usage(e)
}
