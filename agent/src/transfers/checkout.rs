//! A job's checkout of a commit stored through the chunk store ([`TreeSource`]): the
//! tree the job asks for (with or without submodules) is downloaded like an artifact,
//! fetching only the chunks the agent's cache lacks, into the workspace or its
//! `checkout.path`; then the `.git` for the job's depth (a one-file manifest holding the
//! coordinator's `gantry_git::GitPayload`) is fetched beside it and written as the
//! checkout's `.git` directory, with an index whose stat data matches the files as they
//! landed (so `git status` is clean without hashing).

use std::path::{Path, PathBuf};

use gantry_protocol::{CheckoutSpec, Digest, TreeSource, GIT_PAYLOAD_MAGIC};

use super::artifacts::{describe_download, JobIo};
use super::{say, RetryError};

/// The file a `.git` payload's manifest holds (the coordinator's `PAYLOAD_FILE`).
const PAYLOAD_FILE: &str = "payload";

/// Why a checkout failed; its text goes to the job's log.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Transfer(#[from] RetryError),
    #[error("the run's source names no .git for depth {0}")]
    NoDepth(String),
    #[error("cannot read the .git payload {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {0} is not a .git payload (it lacks the payload header)")]
    NotAPayload(Digest),
    #[error("cannot write the checkout's .git: {0}")]
    Git(#[from] gantry_git::GitError),
    #[error("writing the checkout's .git stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl JobIo<'_> {
    /// Checks out `source` as `spec` asks into `dest` (the workspace or a directory in
    /// it), saying in the job's log what was fetched. `scratch` is a directory outside
    /// the workspace for the `.git` payload, removed before returning.
    pub async fn checkout(
        &self,
        source: &TreeSource,
        spec: &CheckoutSpec,
        dest: &Path,
        scratch: &Path,
    ) -> Result<(), CheckoutError> {
        let tree = source.tree_for(spec.submodules);
        let figures = self
            .download_into(tree, "checking out the commit", dest)
            .await?;
        let depth = |d: Option<u32>| d.map_or_else(|| "full".to_owned(), |n| n.to_string());
        let payload = source
            .git_for(spec.depth)
            .ok_or_else(|| CheckoutError::NoDepth(depth(spec.depth)))?;
        let _ = std::fs::remove_dir_all(scratch);
        let git = self
            .download_into(payload, "fetching the checkout's .git", scratch)
            .await;
        let written = match git {
            Ok(git_figures) => {
                let (file, dest_dir) = (scratch.join(PAYLOAD_FILE), dest.to_path_buf());
                tokio::task::spawn_blocking(move || write_git(&file, &dest_dir, payload))
                    .await
                    .map_err(CheckoutError::from)
                    .and_then(|r| r)
                    .map(|()| git_figures)
            }
            Err(e) => Err(e.into()),
        };
        let _ = std::fs::remove_dir_all(scratch);
        let git_figures = written?;
        say(
            self.log,
            &format!(
                "\u{2913} checkout: {}; .git (depth {}): {}\n",
                describe_download(&figures),
                depth(spec.depth),
                describe_download(&git_figures),
            ),
        )
        .await;
        Ok(())
    }
}

/// Reads the payload file and writes the `.git` directory into `dest`.
fn write_git(file: &Path, dest: &Path, manifest: Digest) -> Result<(), CheckoutError> {
    let bytes = std::fs::read(file).map_err(|source| CheckoutError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let encoded = bytes
        .strip_prefix(GIT_PAYLOAD_MAGIC)
        .ok_or(CheckoutError::NotAPayload(manifest))?;
    let payload = gantry_git::GitPayload::decode(encoded)?;
    gantry_git::write_git_dir(dest, &payload)?;
    Ok(())
}
