//! A job's inputs and outputs on this host: the artifacts it receives before its first
//! step, the cache it restores and saves, and the artifact it uploads after a success.
//!
//! Owns the job-side rules: which workspace paths an artifact or cache takes (literal
//! paths and `*`/`**` globs, never leaving the workspace), how a cache key's
//! `hashFiles(...)` is computed, what the job log says about each transfer, and
//! resuming a transfer on the next connection when one drops. The transfers themselves
//! are `gantry-transfer`'s; the local chunk cache is shared by every job of the agent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gantry_cas::Existing;
use gantry_protocol::{
    CacheSpec, Committed, Digest, Grant, JobAssignment, ResolveReply, ResolveRequest, StreamOpen,
    UploadTarget,
};
use gantry_transfer::{DownloadFigures, TransferError, UploadFigures};
use gantry_transport::Connection;

use super::{say, with_retries, ConnectionSource, RetryError, Transfers};
use crate::runner::LogSink;

/// Most workspace entries a glob or hashFiles walks, so a huge tree cannot stall a job.
const MAX_WALK: usize = 500_000;

/// Why a job's inputs or outputs could not be moved; its text goes to the job's log.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Transfer(#[from] RetryError),
    #[error("the coordinator answered with something other than artifacts")]
    NotArtifacts,
    #[error("the coordinator answered with something other than a cache")]
    NotCache,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Paths(#[from] WalkError),
    #[error("artifact {name}: none of its paths ({}) exist in the workspace", paths.join(", "))]
    NothingToUpload { name: String, paths: Vec<String> },
}

/// A cache key that cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cache key {template}: {problem}")]
    Pattern { template: String, problem: String },
    #[error("cache key {template}: {source}")]
    Hash { template: String, source: WalkError },
    #[error("cache key {0}: a reference could not be filled in (only hashFiles, env, inputs and matrix can)")]
    Unfilled(String),
    #[error("cache key {0:?} must be 1 to {max} bytes once expanded", max = gantry_pipeline::MAX_CACHE_KEY)]
    Length(String),
}

/// The workspace could not be searched (for an artifact's paths, a cache's, or
/// `hashFiles`).
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("path {pattern}: {problem}")]
    BadPattern {
        pattern: String,
        problem: &'static str,
    },
    #[error("cannot list {}: {source}", dir.display())]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the workspace has more than {MAX_WALK} entries to search")]
    TooMany,
    #[error("cannot read {relative}: {source}")]
    Entry {
        relative: String,
        source: std::io::Error,
    },
    #[error("hashFiles: cannot read {relative}: {source}")]
    Hash {
        relative: String,
        source: std::io::Error,
    },
}

/// One job's side of its transfers: under the job's grant, to and from its workspace,
/// resuming on the next connection, saying so in its log.
pub struct JobIo<'a> {
    pub transfers: &'a Transfers,
    pub source: &'a dyn ConnectionSource,
    pub job: &'a JobAssignment,
    pub workspace: &'a Path,
    pub log: &'a LogSink,
}

impl JobIo<'_> {
    fn grant(&self) -> Grant {
        Grant::Job {
            job: self.job.job,
            attempt: self.job.attempt,
        }
    }

    /// Downloads `manifest` into the workspace, merging with what is there.
    async fn download(&self, manifest: Digest, what: &str) -> Result<DownloadFigures, RetryError> {
        self.download_into(manifest, what, self.workspace).await
    }

    /// Downloads `manifest` into `dest`, merging with what is there.
    pub(super) async fn download_into(
        &self,
        manifest: Digest,
        what: &str,
        dest: &Path,
    ) -> Result<DownloadFigures, RetryError> {
        with_retries(self.source, self.log, what, |conn| {
            let (grant, cache, options) = (
                self.grant(),
                self.transfers.cache.clone(),
                self.transfers.options.clone(),
            );
            let dest = dest.to_path_buf();
            async move {
                gantry_transfer::download(
                    &conn,
                    &grant,
                    &manifest,
                    &cache,
                    &dest,
                    Existing::Merge,
                    &options,
                )
                .await
            }
        })
        .await
    }

    /// Uploads `paths` of the workspace to `target`.
    async fn upload(
        &self,
        target: &UploadTarget,
        paths: &[PathBuf],
        what: &str,
    ) -> Result<(Option<Committed>, UploadFigures), RetryError> {
        with_retries(self.source, self.log, what, |conn| {
            let (grant, target, options) = (
                self.grant(),
                target.clone(),
                self.transfers.send_options.clone(),
            );
            let (root, paths) = (self.workspace.to_path_buf(), paths.to_vec());
            async move { gantry_transfer::upload(&conn, &grant, &target, &root, paths, &options).await }
        })
        .await
    }
}

/// Asks the coordinator one resolve question.
async fn resolve(
    conn: &Connection,
    request: &ResolveRequest,
) -> Result<ResolveReply, TransferError> {
    let open = StreamOpen::Resolve(request.clone());
    let (mut writer, mut reader) = conn.open_stream_with(&open).await?;
    writer.finish();
    match reader.recv::<ResolveReply>().await? {
        Some(ResolveReply::Refused { message }) => Err(TransferError::Refused(message)),
        Some(reply) => Ok(reply),
        None => Err(TransferError::Protocol("no answer to a resolve".into())),
    }
}

impl JobIo<'_> {
    /// Downloads the artifacts the job receives into its workspace.
    pub async fn download_inputs(&self) -> Result<(), ArtifactError> {
        let request = ResolveRequest::JobArtifacts {
            job: self.job.job,
            attempt: self.job.attempt,
        };
        let reply = with_retries(
            self.source,
            self.log,
            "finding the job's artifacts",
            |conn| {
                let request = request.clone();
                async move { resolve(&conn, &request).await }
            },
        )
        .await?;
        let ResolveReply::Artifacts(artifacts) = reply else {
            return Err(ArtifactError::NotArtifacts);
        };
        for artifact in artifacts {
            let what = format!("downloading artifact {}", artifact.name);
            let figures = self.download(artifact.manifest, &what).await?;
            say(
                self.log,
                &format!(
                    "\u{2913} artifact {} from {}: {}\n",
                    artifact.name,
                    artifact.job_name,
                    describe_download(&figures),
                ),
            )
            .await;
        }
        Ok(())
    }

    /// Computes the cache key and restores the best matching cache into the workspace.
    /// A miss is not an error; neither is a failed restore (a cache is an optimization),
    /// which is said in the log.
    pub async fn restore_cache(&self, spec: &CacheSpec) -> Result<RestoredCache, ArtifactError> {
        let key = expand_key(&spec.key, self.workspace)?;
        let restore_keys = spec
            .restore_keys
            .iter()
            .map(|k| expand_key(k, self.workspace))
            .collect::<Result<Vec<_>, _>>()?;
        let request = ResolveRequest::Cache {
            job: self.job.job,
            attempt: self.job.attempt,
            key: key.clone(),
            restore_keys,
        };
        let reply = with_retries(self.source, self.log, "looking up the cache", |conn| {
            let request = request.clone();
            async move { resolve(&conn, &request).await }
        })
        .await?;
        let hit = match reply {
            ResolveReply::Cache(Some(hit)) => hit,
            ResolveReply::Cache(None) => {
                say(self.log, &format!("\u{2913} cache miss for key {key}\n")).await;
                return Ok(RestoredCache { key, exact: false });
            }
            _ => return Err(ArtifactError::NotCache),
        };
        let what = format!("restoring cache {}", hit.cache.key);
        let restored = self.download(hit.cache.manifest, &what).await;
        match restored {
            Ok(figures) => {
                say(
                    self.log,
                    &format!(
                        "\u{2913} cache {} ({}, from branch {}): {}\n",
                        hit.cache.key,
                        if hit.exact {
                            "exact match"
                        } else {
                            "restore key"
                        },
                        hit.cache.branch,
                        describe_download(&figures),
                    ),
                )
                .await;
                Ok(RestoredCache {
                    key,
                    exact: hit.exact,
                })
            }
            Err(e) => {
                say(
                    self.log,
                    &format!("\u{26a0} {e}; continuing without the cache\n"),
                )
                .await;
                Ok(RestoredCache { key, exact: false })
            }
        }
    }

    /// Uploads the job's artifact. Paths that match nothing are named in the log; an
    /// artifact with no files at all is an error (the job promised an output).
    pub async fn upload_artifact(&self) -> Result<(), ArtifactError> {
        let Some(spec) = &self.job.artifact else {
            return Ok(());
        };
        let (paths, unmatched) = select_paths(self.workspace, &spec.paths)?;
        for pattern in &unmatched {
            say(
                self.log,
                &format!(
                    "\u{26a0} artifact {}: {pattern} matched nothing\n",
                    spec.name
                ),
            )
            .await;
        }
        if paths.is_empty() {
            return Err(ArtifactError::NothingToUpload {
                name: spec.name.clone(),
                paths: spec.paths.clone(),
            });
        }
        let target = UploadTarget::Artifact {
            name: spec.name.clone(),
            expire_in_secs: spec.expire_in_secs,
        };
        let what = format!("uploading artifact {}", spec.name);
        let (committed, figures) = self.upload(&target, &paths, &what).await?;
        let manifest = match committed {
            Some(Committed::Artifact(a)) => a.manifest.to_string(),
            _ => String::new(),
        };
        say(
            self.log,
            &format!(
                "\u{2912} artifact {}: {}; {manifest}\n",
                spec.name,
                describe_upload(&figures),
            ),
        )
        .await;
        Ok(())
    }

    /// Saves the job's cache under the key computed at restore, unless that key was an
    /// exact hit. Failures are said in the log and do not fail the job.
    pub async fn save_cache(&self, spec: &CacheSpec, restored: &RestoredCache) {
        if restored.exact {
            say(
                self.log,
                &format!(
                    "\u{2912} cache {} was restored exactly; not saved again\n",
                    restored.key
                ),
            )
            .await;
            return;
        }
        let (paths, _) = match select_paths(self.workspace, &spec.paths) {
            Ok(found) => found,
            Err(e) => {
                say(self.log, &format!("\u{26a0} cache not saved: {e}\n")).await;
                return;
            }
        };
        if paths.is_empty() {
            say(
                self.log,
                &format!(
                    "\u{26a0} cache not saved: none of {} exist\n",
                    spec.paths.join(", ")
                ),
            )
            .await;
            return;
        }
        let target = UploadTarget::Cache {
            key: restored.key.clone(),
        };
        let saved = self.upload(&target, &paths, "saving the cache").await;
        let line = match saved {
            Ok((Some(_), figures)) => format!(
                "\u{2912} cache {}: {}\n",
                restored.key,
                describe_upload(&figures),
            ),
            Ok((None, _)) => format!(
                "\u{2912} cache {} exists already (saved by another job); caches never change\n",
                restored.key
            ),
            Err(e) => format!("\u{26a0} cache not saved: {e}\n"),
        };
        say(self.log, &line).await;
    }
}

/// A cache restore's result: the key it computed, and whether it hit exactly (then the
/// cache is not saved again).
#[derive(Debug, Clone)]
pub struct RestoredCache {
    pub key: String,
    pub exact: bool,
}

/// "F files, SIZE; VERB M of C chunks (BYTES)": the start of an upload's or a
/// download's line of figures, `moved` the chunks and bytes that travelled.
fn transfer_line(files: u64, bytes: u64, verb: &str, moved: (u64, u64), chunks: u64) -> String {
    format!(
        "{files} files, {}; {verb} {} of {chunks} chunks ({})",
        gantry_transfer::human_bytes(bytes),
        moved.0,
        gantry_transfer::human_bytes(moved.1),
    )
}

/// One line of figures for an upload, as the job log shows it.
fn describe_upload(f: &UploadFigures) -> String {
    let sent = (f.chunks_sent, f.bytes_sent);
    format!(
        "{} in {:.2} s",
        transfer_line(f.files, f.bytes, "sent", sent, f.chunks),
        f.time.as_secs_f64(),
    )
}

/// One line of figures for a download, as the job log shows it.
pub(super) fn describe_download(f: &DownloadFigures) -> String {
    let refetched = if f.chunks_refetched > 0 {
        format!(
            " ({} refetched after failing verification)",
            f.chunks_refetched
        )
    } else {
        String::new()
    };
    let in_place = if f.chunks_kept_in_place > 0 {
        format!("; {} chunks cached in place", f.chunks_kept_in_place)
    } else {
        String::new()
    };
    let fetched = (f.chunks_fetched, f.bytes_fetched);
    format!(
        "{}{refetched} in {:.2} s, extracted in {:.2} s{in_place}",
        transfer_line(f.files, f.bytes, "fetched", fetched, f.chunks),
        f.fetch_time.as_secs_f64(),
        f.extract_time.as_secs_f64(),
    )
}

/// Expands `${{ hashFiles(...) }}` in a cache key (the coordinator already filled in
/// `env`, `inputs` and `matrix`). A reference that is still unexpanded is an error.
pub fn expand_key(template: &str, workspace: &Path) -> Result<String, KeyError> {
    let mut error = None;
    let key = gantry_protocol::template::expand(template, |expr| {
        match gantry_pipeline::hash_files_patterns(expr)? {
            Ok(patterns) => match hash_files(workspace, &patterns) {
                Ok(hex) => Some(hex),
                Err(source) => {
                    error = Some(KeyError::Hash {
                        template: template.to_owned(),
                        source,
                    });
                    Some(String::new())
                }
            },
            Err(problem) => {
                error = Some(KeyError::Pattern {
                    template: template.to_owned(),
                    problem,
                });
                Some(String::new())
            }
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if key.contains("${{") {
        return Err(KeyError::Unfilled(key));
    }
    if key.is_empty() || key.len() > gantry_pipeline::MAX_CACHE_KEY {
        return Err(KeyError::Length(key));
    }
    Ok(key)
}

/// `hashFiles(patterns)`: BLAKE3 over the sorted workspace paths matching any pattern,
/// each with its contents' digest; the empty string when nothing matches (as in GitHub
/// Actions, so a key still forms).
pub fn hash_files(workspace: &Path, patterns: &[String]) -> Result<String, WalkError> {
    let mut matched = BTreeSet::new();
    walk(workspace, &mut |relative, is_file| {
        if is_file
            && patterns
                .iter()
                .any(|p| gantry_pipeline::glob_match(p, relative))
        {
            matched.insert(relative.to_owned());
        }
    })?;
    if matched.is_empty() {
        return Ok(String::new());
    }
    let mut hasher = blake3::Hasher::new();
    for relative in matched {
        let path = workspace.join(&relative);
        let mut file_hasher = blake3::Hasher::new();
        let unreadable = |source| WalkError::Hash {
            relative: relative.clone(),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(unreadable)?;
        std::io::copy(&mut file, &mut file_hasher).map_err(unreadable)?;
        hasher.update(relative.as_bytes());
        hasher.update(&[0]);
        hasher.update(file_hasher.finalize().as_bytes());
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Walks the workspace (not following symlinks), calling `visit(relative, is_file)`.
fn walk(root: &Path, visit: &mut dyn FnMut(&str, bool)) -> Result<(), WalkError> {
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    let mut seen = 0usize;
    while let Some((dir, prefix)) = stack.pop() {
        let list = |source| WalkError::List {
            dir: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            seen += 1;
            if seen > MAX_WALK {
                return Err(WalkError::TooMany);
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let relative = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let kind = entry.file_type().map_err(|source| WalkError::Entry {
                relative: relative.clone(),
                source,
            })?;
            if kind.is_dir() {
                visit(&relative, false);
                stack.push((entry.path(), relative));
            } else {
                visit(&relative, kind.is_file());
            }
        }
    }
    Ok(())
}

/// The workspace paths an artifact or cache takes: literal paths that exist, and every
/// entry matching a glob. Returns them with the patterns that matched nothing.
pub fn select_paths(
    workspace: &Path,
    patterns: &[String],
) -> Result<(Vec<PathBuf>, Vec<String>), WalkError> {
    let mut selected = BTreeSet::new();
    let mut unmatched = Vec::new();
    for pattern in patterns {
        if let Some(problem) = gantry_pipeline::path_problem(pattern) {
            return Err(WalkError::BadPattern {
                pattern: pattern.clone(),
                problem,
            });
        }
        let trimmed = pattern.trim_end_matches('/');
        if trimmed.contains(['*', '?']) {
            let mut found = false;
            walk(workspace, &mut |relative, _| {
                if gantry_pipeline::glob_match(trimmed, relative) {
                    selected.insert(PathBuf::from(relative));
                    found = true;
                }
            })?;
            if !found {
                unmatched.push(pattern.clone());
            }
        } else if trimmed.is_empty() || trimmed == "." {
            selected.insert(PathBuf::from("."));
        } else if std::fs::symlink_metadata(workspace.join(trimmed)).is_ok() {
            selected.insert(PathBuf::from(trimmed));
        } else {
            unmatched.push(pattern.clone());
        }
    }
    Ok((selected.into_iter().collect(), unmatched))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_files_changes_with_content_and_is_empty_without_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("a/b")).expect("dirs");
        std::fs::write(ws.join("Cargo.lock"), b"v1").expect("lock");
        std::fs::write(ws.join("a/b/package-lock.json"), b"{}").expect("json");
        let one = hash_files(ws, &["Cargo.lock".into()]).expect("hash");
        assert_eq!(one.len(), 64);
        let both =
            hash_files(ws, &["Cargo.lock".into(), "**/package-lock.json".into()]).expect("hash");
        assert_ne!(one, both);
        std::fs::write(ws.join("Cargo.lock"), b"v2").expect("lock");
        assert_ne!(hash_files(ws, &["Cargo.lock".into()]).expect("hash"), one);
        assert_eq!(hash_files(ws, &["nothing/*".into()]).expect("hash"), "");
        let key = expand_key("deps-${{ hashFiles('Cargo.lock') }}", ws).expect("key");
        assert!(key.starts_with("deps-") && key.len() == 5 + 64, "{key}");
        assert!(
            expand_key("x-${{ env.UNSET }}", ws).is_err(),
            "unfilled references are refused"
        );
    }

    #[test]
    fn paths_and_globs_select_workspace_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("out/sub")).expect("dirs");
        std::fs::write(ws.join("out/app.bin"), b"x").expect("bin");
        std::fs::write(ws.join("out/sub/lib.a"), b"x").expect("lib");
        std::fs::write(ws.join("report.txt"), b"x").expect("report");
        let (paths, unmatched) = select_paths(
            ws,
            &[
                "out/".into(),
                "**/*.a".into(),
                "missing".into(),
                "*.txt".into(),
            ],
        )
        .expect("select");
        let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(paths, ["out", "out/sub/lib.a", "report.txt"]);
        assert_eq!(unmatched, ["missing"]);
        assert!(select_paths(ws, &["../x".into()]).is_err());
    }
}
