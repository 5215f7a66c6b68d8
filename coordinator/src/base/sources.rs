//! Source trees uploaded by `gantry run` (a repository's commit goes through the chunk
//! store instead, `services::repos::source`), kept until their runs no longer need them.
//!
//! Owns `DATA_DIR/sources/<sha256 hex>.tar`: an upload is written to a temporary file
//! while its SHA-256 is computed, fsynced, and renamed to its content address, so the
//! same tree uploaded twice is stored once and a crash never leaves a partial archive
//! under a real name. Agents fetch the archive of their attempt's run. (Issue 4 moves
//! source trees onto the content-addressed chunk store; this module is then replaced.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use gantry_protocol::SourceData;
use gantry_transport::{FrameReader, FrameWriter, TransportError};

/// Largest source tree accepted.
pub const MAX_SOURCE_BYTES: u64 = 1024 * 1024 * 1024;
/// Size of the pieces an archive travels in.
pub const PIECE_BYTES: usize = 1024 * 1024;

/// Why an uploaded source tree was refused or not stored; `gantry run` shows it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the source tree is {0} bytes, over the {MAX_SOURCE_BYTES}-byte limit; use --no-source or a smaller --source")]
    TooLarge(u64),
    #[error("cannot create {}: {source}", .dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create a temporary file: {0}")]
    Temporary(std::io::Error),
    #[error("more than the declared {0} bytes arrived")]
    Overflow(u64),
    #[error("cannot write the source tree: {0}")]
    Write(std::io::Error),
    #[error("the upload broke off: {0}")]
    BrokeOff(TransportError),
    #[error("the upload ended after {received} of {declared} bytes")]
    Short { received: u64, declared: u64 },
    #[error("cannot sync the source tree: {0}")]
    Sync(std::io::Error),
    /// A digest that makes no valid id (a bug, never the uploader's doing).
    #[error("internal: bad source id")]
    BadId,
    #[error("cannot store the source tree: failed to persist temporary file: {0}")]
    Store(std::io::Error),
    #[error("cannot sync {}: {source}", .dir.display())]
    SyncDir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl SourceError {
    /// The file system's error behind a failed write, if that is what failed.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            Self::Dir { source, .. } | Self::SyncDir { source, .. } => Some(source),
            Self::Temporary(e) | Self::Write(e) | Self::Sync(e) | Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct SourceStore {
    dir: PathBuf,
}

/// Whether `id` has the shape of a source id (`sha256:<64 hex>`).
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl SourceStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, id: &str) -> Option<PathBuf> {
        valid_id(id).then(|| self.dir.join(format!("{}.tar", &id[7..])))
    }

    pub fn exists(&self, id: &str) -> bool {
        self.path(id).is_some_and(|p| p.exists())
    }

    /// Receives an archive of `declared` bytes from `reader`; returns its id once durable.
    pub async fn receive(
        &self,
        reader: &mut FrameReader,
        declared: u64,
    ) -> Result<(String, u64), SourceError> {
        if declared > MAX_SOURCE_BYTES {
            return Err(SourceError::TooLarge(declared));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| SourceError::Dir {
            dir: self.dir.clone(),
            source,
        })?;
        let tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(SourceError::Temporary)?;
        let mut file = tmp.as_file();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut received = 0u64;
        loop {
            match reader.recv::<SourceData>().await {
                Ok(Some(SourceData(piece))) => {
                    received += piece.len() as u64;
                    if received > declared {
                        return Err(SourceError::Overflow(declared));
                    }
                    digest.update(&piece);
                    file.write_all(&piece).map_err(SourceError::Write)?;
                }
                Ok(None) => break,
                Err(e) => return Err(SourceError::BrokeOff(e)),
            }
        }
        if received != declared {
            return Err(SourceError::Short { received, declared });
        }
        let id = self.persist(tmp, &digest.finish())?;
        Ok((id, received))
    }

    /// Syncs `tmp` and renames it to its content address.
    fn persist(
        &self,
        tmp: tempfile::NamedTempFile,
        digest: &ring::digest::Digest,
    ) -> Result<String, SourceError> {
        tmp.as_file().sync_all().map_err(SourceError::Sync)?;
        let id = format!("sha256:{}", gantry_certs::hex(digest.as_ref()));
        let path = self.path(&id).ok_or(SourceError::BadId)?;
        tmp.persist(&path)
            .map_err(|e| SourceError::Store(e.error))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| SourceError::SyncDir {
                dir: self.dir.clone(),
                source,
            })?;
        Ok(id)
    }

    /// Sends a stored archive as `SourceData` frames.
    pub async fn send(&self, id: &str, writer: &mut FrameWriter) -> Result<(), TransportError> {
        let Some(path) = self.path(id) else {
            return Err(TransportError::Lost(format!("invalid source id {id}")));
        };
        send_file(&path, PIECE_BYTES, writer)
            .await
            .map_err(|e| match e {
                SendFileError::Read(e) => {
                    TransportError::Lost(format!("source {id} unreadable: {e}"))
                }
                SendFileError::Transport(e) => e,
            })
    }
}

/// Why a file could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendFileError {
    #[error(transparent)]
    Read(std::io::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Sends the file at `path` as `SourceData` frames of at most `piece` bytes: how source
/// trees and the agent binary travel to agents.
pub async fn send_file(
    path: &Path,
    piece: usize,
    writer: &mut FrameWriter,
) -> Result<(), SendFileError> {
    let mut file = std::fs::File::open(path).map_err(SendFileError::Read)?;
    let mut buf = vec![0u8; piece];
    loop {
        let n = file.read(&mut buf).map_err(SendFileError::Read)?;
        if n == 0 {
            return Ok(());
        }
        writer.send(&SourceData(buf[..n].to_vec())).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ids_are_sha256_only() {
        assert!(valid_id(&format!("sha256:{}", "a".repeat(64))));
        for bad in [
            "",
            "sha256:",
            "sha256:../../etc/passwd",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("md5:{}", "a".repeat(64)),
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
