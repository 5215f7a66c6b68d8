//! The agent binary this coordinator hands out: where it is, its digest and version,
//! the stream agents fetch it on, and `gantry agents upgrade`, which checks it and hands
//! the rollout to the deployment manager (waves, failure budget and rollback are its).
//!
//! The same binary is served to new hosts on the HTTP side (`edges::http::distribute`)
//! and put into offline bundles (`gantry bundle create`); both find it here.

use std::path::{Path, PathBuf};

use gantry_protocol::{AdminErrorKind, AdminResponse, AgentBinary, Labels};
use gantry_transport::{FrameWriter, TransportError};

use crate::base::error::{admin_error, AdminFailure};
use crate::base::labels::{check_labels, LabelError};
use crate::base::sources::{send_file, SendFileError};
use crate::services::deployments::{AdminOp, AgentUpgrade, Deployments};

/// Bytes of the agent binary per frame sent to an agent.
const SEND_PIECE_BYTES: usize = 256 * 1024;

/// Why the agent binary cannot be found, described or sent.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("the agent binary {} does not exist; fix agent_binary in coordinator.toml or --agent-binary", .0.display())]
    Missing(PathBuf),
    #[error("cannot find the running gantry executable")]
    NoExecutable(#[source] std::io::Error),
    #[error("no agent binary at {} or {}; install the gantry-agent binary there, or set agent_binary in coordinator.toml", .0.display(), .1.display())]
    NotFound(PathBuf, PathBuf),
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {} --version: {source}", .path.display())]
    Run {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} --version exited with {status}: not a working agent binary; fix agent_binary in coordinator.toml", .path.display())]
    Broken {
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("asked for agent binary {asked}, but {} is {actual}", .path.display())]
    Mismatch {
        asked: String,
        path: PathBuf,
        actual: String,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why `gantry agents upgrade` is refused before it starts.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("--timeout must be at least 1s")]
    Timeout,
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error("{0}")]
    Check(#[from] tokio::task::JoinError),
}

impl AdminFailure for UpgradeError {
    fn kind(&self) -> AdminErrorKind {
        AdminErrorKind::InvalidInput
    }
}

/// Where the agent binary is: `configured` (from coordinator.toml or a flag), else
/// `../lib/gantry/gantry-agent` from the running `gantry` (the .deb, the container
/// image), else `gantry-agent` beside it (a cargo build, a tarball).
pub fn find_agent_binary(configured: Option<&Path>) -> Result<PathBuf, BinaryError> {
    if let Some(path) = configured {
        if !path.is_file() {
            return Err(BinaryError::Missing(path.to_path_buf()));
        }
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(BinaryError::NoExecutable)?;
    let dir = exe.parent().unwrap_or_else(|| Path::new("/"));
    let candidates = [
        dir.join("../lib/gantry/gantry-agent"),
        dir.join("gantry-agent"),
    ];
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let [packaged, beside] = candidates;
    Err(BinaryError::NotFound(packaged, beside))
}

/// SHA-256 (hex) of a file, read in 64 KiB pieces.
pub fn sha256_file(path: &Path) -> Result<String, BinaryError> {
    use std::io::Read as _;
    let read = |source| BinaryError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(gantry_certs::hex(ctx.finish().as_ref()))
}

/// The digest, size and version of an agent binary, checking that it runs.
fn describe(path: &Path) -> Result<AgentBinary, BinaryError> {
    let sha256 = sha256_file(path)?;
    let bytes = std::fs::metadata(path)
        .map_err(|source| BinaryError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| BinaryError::Run {
            path: path.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(BinaryError::Broken {
            path: path.to_path_buf(),
            status: out.status,
        });
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(AgentBinary {
        sha256,
        version,
        bytes,
    })
}

/// The upgrades service; one per coordinator.
#[derive(Debug)]
pub struct Upgrades {
    /// `agent_binary` from `coordinator.toml` (else found next to `gantry`).
    configured: Option<PathBuf>,
    deployments: Deployments,
}

impl Upgrades {
    pub fn new(configured: Option<PathBuf>, deployments: Deployments) -> Self {
        Self {
            configured,
            deployments,
        }
    }

    /// The agent binary new hosts get and fleet upgrades install.
    pub fn agent_binary(&self) -> Result<PathBuf, BinaryError> {
        find_agent_binary(self.configured.as_deref())
    }

    /// `gantry agents upgrade`: checks the agent binary (digest, size, that it runs),
    /// then hands the rollout to the deployment manager.
    pub async fn start(
        &self,
        actor: &str,
        select: &Labels,
        batch: u32,
        failure_budget: u32,
        timeout_ms: u64,
    ) -> AdminResponse {
        match self.check(select, timeout_ms).await {
            Ok((select, binary)) => {
                self.deployments
                    .admin(
                        actor,
                        AdminOp::UpgradeAgents(AgentUpgrade {
                            select,
                            batch,
                            failure_budget,
                            timeout_ms,
                            binary,
                        }),
                    )
                    .await
            }
            Err(e) => AdminResponse::Error(admin_error(&e)),
        }
    }

    async fn check(
        &self,
        select: &Labels,
        timeout_ms: u64,
    ) -> Result<(Labels, AgentBinary), UpgradeError> {
        let select = check_labels(select)?;
        if timeout_ms < 1000 {
            return Err(UpgradeError::Timeout);
        }
        let path = self.agent_binary()?;
        let binary = tokio::task::spawn_blocking(move || describe(&path)).await??;
        Ok((select, binary))
    }

    /// Streams the agent binary to an agent, if its digest is the one asked for.
    pub async fn send(&self, sha256: &str, writer: &mut FrameWriter) -> Result<(), BinaryError> {
        let path = self.agent_binary()?;
        let actual = sha256_file(&path)?;
        if actual != sha256 {
            return Err(BinaryError::Mismatch {
                asked: sha256.to_owned(),
                path,
                actual,
            });
        }
        send_file(&path, SEND_PIECE_BYTES, writer)
            .await
            .map_err(|e| match e {
                SendFileError::Read(source) => BinaryError::Unreadable { path, source },
                SendFileError::Transport(e) => BinaryError::Transport(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_agent_binary_must_exist() {
        let err =
            find_agent_binary(Some(Path::new("/nonexistent/gantry-agent"))).expect_err("missing");
        assert!(err.to_string().contains("agent_binary"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gantry-agent");
        std::fs::write(&path, b"\x7fELF").expect("write");
        assert_eq!(find_agent_binary(Some(&path)).expect("found"), path);
        assert_eq!(
            sha256_file(&path).expect("digest"),
            gantry_certs::hex(&gantry_certs::sha256(b"\x7fELF"))
        );
    }
}
