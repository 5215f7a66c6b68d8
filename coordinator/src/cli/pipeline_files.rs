//! Reading a local pipeline file and the files it includes or calls, for `gantry
//! validate`, `gantry run` and `gantry triggers add`.
//!
//! Paths in `include:` and `uses:` are relative to the root of the tree the pipeline
//! belongs to: the git checkout holding the file (else the file's directory, or
//! `--source` for `gantry run`), the same tree `gantry run` uploads as the workspace, as
//! a repository's run reads them from its commit. The CLI sends the coordinator the
//! bundle `gantry_pipeline::bundle` makes, so the run keeps the files as they were.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use gantry_pipeline::{Errors, Pipeline, Resolver, MAX_FILE_SIZE};

use crate::cli::failure::{usage, Failure};

/// A pipeline file read from disk, with the files it reads.
pub struct LocalPipeline {
    /// The file's path under the root (`/`-separated), or its name if it lies outside.
    pub file_name: String,
    /// What to send: the file's text, or a bundle of it and the files it reads.
    pub text: String,
    pub loaded: Result<Pipeline, Errors>,
}

/// Reads `file` and loads it with the files it names under `root`.
pub fn load(file: &Path, root: &Path) -> Result<LocalPipeline, Failure> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the pipeline file {}", file.display()))
        .map_err(usage)?;
    let root = root
        .canonicalize()
        .with_context(|| format!("cannot open the directory {}", root.display()))
        .map_err(usage)?;
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let file_name = file
        .canonicalize()
        .ok()
        .and_then(|full| {
            let relative = full.strip_prefix(&root).ok()?;
            let parts: Option<Vec<&str>> = relative.iter().map(|p| p.to_str()).collect();
            Some(parts?.join("/"))
        })
        .filter(|n| !n.is_empty())
        .unwrap_or(name);
    let files = LocalFiles { root };
    let (loaded, text) = gantry_pipeline::bundle(&file_name, &text, &files);
    Ok(LocalPipeline {
        file_name,
        text,
        loaded,
    })
}

/// Most bytes of pipeline text one request may carry: a frame, less room for the rest of
/// the request.
const MAX_SENT_TEXT: usize = gantry_protocol::limits::MAX_FRAME_BYTES as usize - 64 * 1024;

impl LocalPipeline {
    /// Refuses, with its size, a pipeline whose files together would not fit in the
    /// request that sends them.
    pub fn check_size(&self) -> Result<(), Failure> {
        if self.text.len() > MAX_SENT_TEXT {
            return Err(usage(anyhow::anyhow!(
                "{} and the files it includes are {} bytes together; a request carries at most {MAX_SENT_TEXT}: make the included files smaller or fewer",
                self.file_name,
                self.text.len()
            )));
        }
        Ok(())
    }
}

/// The root of the tree `file` belongs to: its git checkout, else its directory.
pub fn root_of(file: &Path) -> PathBuf {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    git(dir, &["rev-parse", "--show-toplevel"]).map_or_else(|| dir.to_path_buf(), PathBuf::from)
}

/// Files under a directory, never outside it (a symbolic link leading out is refused).
struct LocalFiles {
    /// Canonical.
    root: PathBuf,
}

impl Resolver for LocalFiles {
    fn read_file(&self, path: &str) -> Result<String, String> {
        let shown = self.root.join(path);
        let full = shown
            .canonicalize()
            .map_err(|e| format!("{}: {e}", shown.display()))?;
        if !full.starts_with(&self.root) {
            return Err(format!(
                "{} leads outside {} (a symbolic link); include only files of the tree",
                shown.display(),
                self.root.display()
            ));
        }
        let file = std::fs::File::open(&full).map_err(|e| format!("{}: {e}", shown.display()))?;
        let mut text = String::new();
        // One byte more than the most a file may hold, so the loader can say it is too
        // large without this reading a file of any size.
        file.take(u64::try_from(MAX_FILE_SIZE).unwrap_or(u64::MAX) + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", shown.display()))?;
        Ok(text)
    }
}

/// The output of `git ARGS` run in `dir`, trimmed; `None` if git fails or prints
/// nothing (or `HEAD`, a detached checkout's branch).
pub(crate) fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty() && text != "HEAD").then_some(text)
}
