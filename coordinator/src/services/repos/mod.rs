//! Repositories the coordinator builds from (`gantry repos`), and runs of one of their
//! commits (`gantry run --repo`, the poller).
//!
//! Owns a bare mirror per repository under `DATA_DIR/repos/<name>.git`
//! (`gantry_git::Mirror`), fetched incrementally before each run and by the poller, one
//! fetch of a repository at a time; the repositories' credentials, which never leave the
//! coordinator (a token is read from its stored secret at each fetch; an ssh key is
//! stored sealed and written to a 0600 file only for the length of one git call); and
//! turning a ref into a run: resolve it to a commit, read the pipeline file from that
//! commit, store the commit's tree with its `.git` as the run's source (`source.rs`),
//! submit the run with the repository side recorded (`store::RunRepoRecord`).
//! `poll.rs` runs repositories added with `--poll` when a branch or tag head moves;
//! `hooks.rs` runs them when their forge's webhook says so.
//!
//! Everything git does blocks: it runs on blocking threads, never on the runtime's.

pub mod hooks;
pub mod poll;
pub mod source;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gantry_git::{
    Credentials, Fetch, GitError, GitProgram, KnownHosts, MemoryMemo, Mirror, MirrorOptions,
    Mirrors, ObjectId, Remote, Secret,
};
use gantry_protocol::{AddRepo, AdminErrorKind, Labels, RepoAuth, RepoView, RunRepo, RunView};

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::base::seal::{SecretError, SecretKey};
use crate::services::artifacts::Artifacts;
use crate::services::runs::{RunError, Runs};
use crate::services::secrets::Secrets;
use crate::store::{
    RepoCredentials, RepoHookRecord, RepoRecord, RepoStatusRecord, RunRepoRecord, Store, StoreError,
};

/// The pipeline file read from each commit when `--pipeline-file` is not given.
pub const DEFAULT_PIPELINE_FILE: &str = gantry_pipeline::DEFAULT_FILE_NAME;
/// Largest pipeline file read from a commit (the pipeline loader's own bound).
pub(crate) const MAX_PIPELINE_BYTES: u64 = 1024 * 1024;
/// `--poll` bounds: more often than every 10 s is a load on the forge, not polling.
pub const MIN_POLL_SECS: u64 = 10;
pub const MAX_POLL_SECS: u64 = 24 * 3600;

/// Why a repository request failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("repository name {0:?} is not valid: use 1 to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit")]
    BadName(String),
    #[error("a repository named {0:?} exists; remove it first with `gantry repos rm {0}`")]
    Exists(String),
    #[error("no repository {0:?}; `gantry repos list` shows them, `gantry repos add` adds one")]
    Unknown(String),
    #[error("unknown forge {0:?}: use gitea (or forgejo), gitlab or github")]
    BadForge(String),
    #[error("pipeline file {0:?} must be a relative path inside the repository, without `..`")]
    BadPipelineFile(String),
    #[error("--api-url: {0}")]
    BadApiUrl(String),
    #[error("--poll {0}s is out of range: use {MIN_POLL_SECS}s to {MAX_POLL_SECS}s")]
    BadPoll(u64),
    #[error("secret {0} is not set; set it with `gantry secrets set {0}` first")]
    NoSecret(String),
    #[error("the ssh key is not a private key in PEM or OpenSSH form (it should start with `-----BEGIN`)")]
    BadKey,
    #[error("repository {repo}: {source}")]
    Git {
        repo: String,
        #[source]
        source: GitError,
    },
    #[error("repository {repo} has no ref {reference:?} (after fetching {url}); `gantry repos show {repo}` lists its branches and tags")]
    NoRef {
        repo: String,
        reference: String,
        url: String,
    },
    #[error("repository {repo} has no branch to build by default; name one with --ref")]
    NoDefaultBranch { repo: String },
    #[error("repository {repo}: commit {commit} has no pipeline file {file}; add it, or point the repository at another with --pipeline-file")]
    NoPipelineFile {
        repo: String,
        commit: String,
        file: String,
    },
    #[error("repository {repo}: pipeline file {file} at commit {commit} is not UTF-8")]
    PipelineNotText {
        repo: String,
        commit: String,
        file: String,
    },
    #[error("repository {repo}: cannot store commit {commit} as the run's source: {detail}")]
    Source {
        repo: String,
        commit: String,
        detail: String,
    },
    #[error(transparent)]
    Seal(#[from] SecretError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("repository {repo}: {detail}")]
    Io { repo: String, detail: String },
}

impl AdminFailure for RepoError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::Unknown(_) | Self::NoRef { .. } => AdminErrorKind::NotFound,
            Self::Run(e) => e.kind(),
            Self::Store(_) | Self::Seal(_) | Self::Io { .. } => AdminErrorKind::Internal,
            _ => AdminErrorKind::InvalidInput,
        }
    }
}

/// The repositories service; one per coordinator.
#[derive(Debug)]
pub struct Repos {
    store: Arc<Store>,
    secrets: Arc<Secrets>,
    key: Arc<SecretKey>,
    runs: Arc<Runs>,
    /// Where commits are stored as runs' sources (the chunk store).
    artifacts: Arc<Artifacts>,
    /// Per repository, which chunks each blob was cut into (`source.rs`); in memory, so
    /// a restarted coordinator reads every blob of its first commit again.
    memos: Mutex<HashMap<String, Arc<MemoryMemo>>>,
    /// `DATA_DIR/repos`: the mirrors, `known_hosts`, and short-lived key files.
    dir: PathBuf,
    git: GitProgram,
    /// One fetch (or walk) of a repository at a time: git's ref locks race otherwise.
    busy: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Commit statuses back to the forge (`status.rs`).
    status: Arc<status::ForgeStatus>,
}

/// A fetched ref, ready to build.
#[derive(Debug, Clone)]
pub struct Target {
    pub commit: ObjectId,
    /// `refs/heads/main`, `refs/tags/v1`; `None` for a commit named by id.
    pub full_ref: Option<String>,
}

impl Target {
    /// What the run records as its `git_ref` (conditions' `branch`): the branch or tag
    /// name, or the commit for a bare commit.
    pub fn short_ref(&self) -> String {
        match &self.full_ref {
            Some(r) => r
                .strip_prefix("refs/heads/")
                .or_else(|| r.strip_prefix("refs/tags/"))
                .unwrap_or(r)
                .to_owned(),
            None => self.commit.to_string(),
        }
    }
}

impl Repos {
    pub fn new(
        store: Arc<Store>,
        secrets: Arc<Secrets>,
        key: Arc<SecretKey>,
        runs: Arc<Runs>,
        artifacts: Arc<Artifacts>,
        status: Arc<status::ForgeStatus>,
        data_dir: &Path,
    ) -> Self {
        Self {
            store,
            secrets,
            key,
            runs,
            artifacts,
            memos: Mutex::new(HashMap::new()),
            dir: data_dir.join("repos"),
            git: GitProgram::default(),
            busy: Mutex::new(HashMap::new()),
            status,
        }
    }

    /// `gantry repos add`: checks everything, makes the mirror and fetches it once (an
    /// unreachable server or refused credentials fail here, and nothing is kept), then
    /// stores the repository.
    pub async fn add(
        self: &Arc<Self>,
        cx: &Acting<'_>,
        add: AddRepo,
    ) -> Result<RepoView, RepoError> {
        check_name(&add.name)?;
        let forge = match &add.forge {
            Some(f) => Some(
                gantry_forge::Forge::parse(f)
                    .ok_or_else(|| RepoError::BadForge(f.clone()))?
                    .as_str()
                    .to_owned(),
            ),
            None => None,
        };
        let pipeline_file = add
            .pipeline_file
            .clone()
            .unwrap_or_else(|| DEFAULT_PIPELINE_FILE.to_owned());
        check_pipeline_file(&pipeline_file)?;
        let api_url = match add.api_url.as_deref().map(str::trim) {
            Some(api) => {
                gantry_forge::status::StatusTarget::new(
                    gantry_forge::Forge::Github,
                    api,
                    "o/r",
                    "t",
                )
                .map_err(|e| RepoError::BadApiUrl(e.to_string()))?;
                Some(api.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        if let Some(name) = &add.status_token_secret {
            if self.secrets.value(name).is_none() {
                return Err(RepoError::NoSecret(name.clone()));
            }
        }
        let status = RepoStatusRecord {
            api_url,
            token_secret: add.status_token_secret.clone(),
        };
        if let Some(secs) = add.poll_secs {
            if !(MIN_POLL_SECS..=MAX_POLL_SECS).contains(&secs) {
                return Err(RepoError::BadPoll(secs));
            }
        }
        if self.store.repo(&add.name)?.is_some() {
            return Err(RepoError::Exists(add.name));
        }
        if let Some(name) = &add.webhook_secret {
            if self.secrets.value(name).is_none() {
                return Err(RepoError::NoSecret(name.clone()));
            }
        }
        let hook = RepoHookRecord {
            secret: add.webhook_secret.clone(),
            fork_pull_requests: add.fork_pull_requests,
        };
        let credentials = match &add.auth {
            RepoAuth::None => RepoCredentials::None,
            RepoAuth::TokenSecret(name) => {
                if self.secrets.value(name).is_none() {
                    return Err(RepoError::NoSecret(name.clone()));
                }
                RepoCredentials::TokenSecret(name.clone())
            }
            RepoAuth::SshKey(text) => {
                if !text.trim_start().starts_with("-----BEGIN") {
                    return Err(RepoError::BadKey);
                }
                RepoCredentials::SshKey(self.key.seal(&key_seal_name(&add.name), text.as_bytes())?)
            }
        };
        let mut record = RepoRecord {
            name: add.name.clone(),
            url: add.url.clone(),
            forge,
            credentials,
            pipeline_file,
            poll_secs: add.poll_secs,
            created_at: cx.now,
            created_by: cx.actor.to_owned(),
            fetched_at: None,
            last_error: None,
            heads: BTreeMap::new(),
            schedule_checked_until: cx.now.0 / 1000,
        };
        let this = self.clone();
        let probe = record.clone();
        let heads = tokio::task::spawn_blocking(move || {
            let fetched = this.with_mirror(&probe, |mirror| {
                mirror
                    .fetch(&Fetch::All)
                    .and_then(|()| heads_of(mirror))
                    .map_err(|source| RepoError::Git {
                        repo: probe.name.clone(),
                        source,
                    })
            });
            if fetched.is_err() {
                let _ = std::fs::remove_dir_all(this.mirror_dir(&probe.name));
            }
            fetched
        })
        .await
        .map_err(|e| RepoError::Io {
            repo: add.name.clone(),
            detail: format!("the fetch task failed: {e}"),
        })??;
        record.heads = heads;
        record.fetched_at = Some(cx.now);
        let audit = cx.audit(
            "repo.add",
            format!(
                "repo={} url={}",
                record.name,
                gantry_git::redact(&record.url)
            ),
        );
        if !self.store.add_repo(&record, &hook, &audit)? {
            return Err(RepoError::Exists(record.name));
        }
        self.store.set_repo_status(&record.name, Some(&status))?;
        Ok(self.view(record)?)
    }

    pub fn list(&self) -> Result<Vec<RepoView>, RepoError> {
        self.store
            .repos()?
            .into_iter()
            .map(|r| Ok(self.view(r)?))
            .collect()
    }

    pub fn show(&self, name: &str) -> Result<RepoView, RepoError> {
        Ok(self.view(self.find(name)?)?)
    }

    /// `gantry repos rm`: forgets the repository and deletes its mirror. Runs already
    /// made from it keep their source.
    pub fn remove(&self, cx: &Acting<'_>, name: &str) -> Result<String, RepoError> {
        let audit = cx.audit("repo.remove", format!("repo={name}"));
        if !self.store.remove_repo(name, &audit)? {
            return Err(RepoError::Unknown(name.to_owned()));
        }
        self.store.set_repo_status(name, None)?;
        self.status.forget(name);
        let lock = self.lock_of(name);
        let _held = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = std::fs::remove_dir_all(self.mirror_dir(name)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(repo = name, "cannot delete the mirror: {e}");
            }
        }
        Ok(format!("removed repository {name}"))
    }

    /// `gantry run --repo`: fetches, resolves the ref and starts a run of the commit.
    pub async fn run(
        self: &Arc<Self>,
        cx: &Acting<'_>,
        request: RunRepo,
    ) -> Result<RunView, RepoError> {
        let record = self.find(&request.repo)?;
        let this = self.clone();
        let wanted = request.git_ref.clone();
        let prepared =
            tokio::task::spawn_blocking(move || this.prepare(&record, wanted.as_deref(), None))
                .await
                .map_err(|e| RepoError::Io {
                    repo: request.repo.clone(),
                    detail: format!("the fetch task failed: {e}"),
                })??;
        self.submit(cx, prepared, "manual", request.inputs)
    }

    /// Submits a prepared commit as a run of `event`.
    pub(crate) fn submit(
        &self,
        cx: &Acting<'_>,
        prepared: Prepared,
        event: &str,
        inputs: Labels,
    ) -> Result<RunView, RepoError> {
        let submit = gantry_protocol::SubmitRun {
            file_name: prepared.pipeline_file,
            text: prepared.text,
            git_ref: prepared.target.short_ref(),
            commit: Some(prepared.target.commit.to_string()),
            event: event.to_owned(),
            inputs,
            source: Some(prepared.source),
        };
        let repo = RunRepoRecord {
            repo: prepared.repo,
            full_ref: prepared.target.full_ref.unwrap_or_default(),
            pr_number: prepared.pull_request.as_ref().map(|(n, _)| *n),
            pr_base: prepared.pull_request.map(|(_, base)| base),
        };
        Ok(self
            .runs
            .submit_from_repo(cx, &submit, &repo, &prepared.agent_labels)?)
    }

    /// Fetches the repository, resolves `wanted` (the default branch if `None`; `known`
    /// skips resolving for the poller, which already has the commit), reads the pipeline
    /// file at the commit and stores the commit's tree as a source. Blocking.
    pub(crate) fn prepare(
        &self,
        record: &RepoRecord,
        wanted: Option<&str>,
        known: Option<Target>,
    ) -> Result<Prepared, RepoError> {
        let repo = record.name.clone();
        let git = |source| RepoError::Git {
            repo: repo.clone(),
            source,
        };
        self.with_mirror(record, |mirror| {
            let target = if let Some(t) = known {
                t
            } else {
                let heads = self.fetch_all(record, mirror)?;
                resolve(mirror, record, &heads, wanted)?
            };
            let commit = target.commit;
            let text = mirror
                .read_file(commit, &record.pipeline_file, MAX_PIPELINE_BYTES)
                .map_err(git)?
                .ok_or_else(|| RepoError::NoPipelineFile {
                    repo: record.name.clone(),
                    commit: commit.to_string(),
                    file: record.pipeline_file.clone(),
                })?;
            let text = String::from_utf8(text).map_err(|_| RepoError::PipelineNotText {
                repo: record.name.clone(),
                commit: commit.to_string(),
                file: record.pipeline_file.clone(),
            })?;
            let text = bundled(mirror, record, commit, &text);
            let wants = source::SourceWants::of(&record.pipeline_file, &text);
            let stored = self.store_commit(record, mirror, &target, &wants)?;
            tracing::info!(repo = %record.name, %commit, files = stored.files, bytes = stored.bytes, chunks_written = stored.figures.chunks_written, bytes_written = stored.figures.bytes_written, "commit stored as a source tree");
            Ok(Prepared {
                repo: record.name.clone(),
                pipeline_file: record.pipeline_file.clone(),
                text,
                target,
                source: stored.source,
                pull_request: None,
                agent_labels: Labels::new(),
            })
        })
    }

    /// Fetches every branch and tag into `mirror` and records the outcome on the
    /// repository (`repos show`); the heads after the fetch.
    fn fetch_all(
        &self,
        record: &RepoRecord,
        mirror: &Mirror,
    ) -> Result<BTreeMap<String, String>, RepoError> {
        let fetched = mirror.fetch(&Fetch::All).and_then(|()| heads_of(mirror));
        self.note_fetch(&record.name, fetched.as_ref());
        fetched.map_err(|source| RepoError::Git {
            repo: record.name.clone(),
            source,
        })
    }

    /// Records a fetch's outcome on the repository: its heads, or its error.
    fn note_fetch(&self, name: &str, outcome: Result<&BTreeMap<String, String>, &GitError>) {
        let now = gantry_protocol::UnixMillis::now();
        let updated = self.store.update_repo(name, |r| match outcome {
            Ok(heads) => {
                r.heads.clone_from(heads);
                r.fetched_at = Some(now);
                r.last_error = None;
            }
            Err(e) => r.last_error = Some(e.to_string()),
        });
        if let Err(e) = updated {
            tracing::warn!(repo = name, "cannot record the fetch: {e}");
        }
    }

    fn find(&self, name: &str) -> Result<RepoRecord, RepoError> {
        self.store
            .repo(name)?
            .ok_or_else(|| RepoError::Unknown(name.to_owned()))
    }

    fn mirror_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.git"))
    }

    fn lock_of(&self, name: &str) -> Arc<Mutex<()>> {
        self.busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Stores `target`'s commit as a run's source through the chunk store, with the
    /// repository's blob memo; a memo gone stale (its chunks collected) is dropped and
    /// the walk made again without it.
    fn store_commit(
        &self,
        record: &RepoRecord,
        mirror: &Mirror,
        target: &Target,
        wants: &source::SourceWants,
    ) -> Result<source::StoredTree, RepoError> {
        let mirrors = Mirrors {
            root: self.dir.join("submodules"),
            git: self.git.clone(),
            options: MirrorOptions::default(),
        };
        let memo_of = |fresh: bool| {
            let mut memos = self
                .memos
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if fresh {
                memos.remove(&record.name);
            }
            memos.entry(record.name.clone()).or_default().clone()
        };
        let store = |memo: &MemoryMemo| {
            source::store_commit(
                mirror,
                target.commit,
                target.full_ref.as_deref(),
                wants,
                memo,
                Some(&mirrors),
                &self.artifacts,
            )
        };
        let stored = match store(&memo_of(false)) {
            Err(source::TreeError::Stale(n)) => {
                tracing::info!(repo = %record.name, chunks = n, "the blob memo named chunks no longer stored; walking the commit again without it");
                store(&memo_of(true))
            }
            other => other,
        };
        stored.map_err(|e| RepoError::Source {
            repo: record.name.clone(),
            commit: target.commit.to_string(),
            detail: e.to_string(),
        })
    }

    /// Opens the repository's mirror with its credentials (an ssh key written to a
    /// private file for the call's length) and runs `f` on it, alone.
    fn with_mirror<T>(
        &self,
        record: &RepoRecord,
        f: impl FnOnce(&Mirror) -> Result<T, RepoError>,
    ) -> Result<T, RepoError> {
        let lock = self.lock_of(&record.name);
        let _held = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let io = |detail: String| RepoError::Io {
            repo: record.name.clone(),
            detail,
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io(format!("cannot create {}: {e}", self.dir.display())))?;
        let mut _key_file = None;
        let credentials = match &record.credentials {
            RepoCredentials::None => Credentials::None,
            RepoCredentials::TokenSecret(name) => Credentials::Token {
                // Gitea/Forgejo and GitHub take any user with a token; GitLab wants oauth2.
                username: if record.forge.as_deref() == Some("gitlab") {
                    "oauth2".into()
                } else {
                    "gantry".into()
                },
                token: Secret::new(
                    self.secrets
                        .value(name)
                        .ok_or_else(|| RepoError::NoSecret(name.clone()))?,
                ),
            },
            RepoCredentials::SshKey(sealed) => {
                let text = self.key.open(&key_seal_name(&record.name), sealed)?;
                let file = tempfile::Builder::new()
                    .prefix(".ssh-key-")
                    .tempfile_in(&self.dir)
                    .map_err(|e| io(format!("cannot write the ssh key file: {e}")))?;
                std::fs::write(file.path(), text.as_bytes())
                    .map_err(|e| io(format!("cannot write the ssh key file: {e}")))?;
                let path = file.path().to_path_buf();
                _key_file = Some(file);
                Credentials::SshKey {
                    key_file: path,
                    known_hosts: KnownHosts::AcceptNew(self.dir.join("known_hosts")),
                }
            }
        };
        let git = |source| RepoError::Git {
            repo: record.name.clone(),
            source,
        };
        let remote = Remote::new(record.url.clone(), credentials).map_err(git)?;
        let mirror = Mirror::open(
            self.git.clone(),
            self.mirror_dir(&record.name),
            remote,
            MirrorOptions::default(),
        )
        .map_err(git)?;
        f(&mirror)
    }
}

/// A commit ready to run: its pipeline file and its stored source.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub repo: String,
    pub pipeline_file: String,
    pub text: String,
    pub target: Target,
    pub source: String,
    /// For a pull request's run: its number and target branch (`GANTRY_PR_*`).
    pub pull_request: Option<(u64, String)>,
    /// Labels every agent of the run's jobs must carry: an untrusted run's
    /// (`gantry_forge::trust::Privileges::required_agent_labels`); empty otherwise.
    pub agent_labels: Labels,
}

/// The pipeline file's `text` at `commit` as a run keeps it: with the files it includes
/// or calls, read from the same commit (`gantry_pipeline::bundle`), so that parsing it
/// again later needs neither the mirror nor the commit. A file that does not load is
/// bundled all the same: the run's submit parses it again and reports its problems.
pub(crate) fn bundled(
    mirror: &Mirror,
    record: &RepoRecord,
    commit: ObjectId,
    text: &str,
) -> String {
    let files = CommitFiles { mirror, commit };
    gantry_pipeline::bundle(&record.pipeline_file, text, &files).1
}

/// The files of one commit of a mirror, for `include:` and `uses:`.
struct CommitFiles<'m> {
    mirror: &'m Mirror,
    commit: ObjectId,
}

impl gantry_pipeline::Resolver for CommitFiles<'_> {
    fn read_file(&self, path: &str) -> Result<String, String> {
        match self.mirror.read_file(self.commit, path, MAX_PIPELINE_BYTES) {
            Ok(Some(bytes)) => String::from_utf8(bytes)
                .map_err(|_| format!("{path} at commit {} is not UTF-8 text", self.commit.short())),
            Ok(None) => Err(format!(
                "commit {} has no file {path} (paths are relative to the repository's root)",
                self.commit.short()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The name an ssh key is sealed under (a sealed value opens only under its name).
fn key_seal_name(repo: &str) -> String {
    format!("repo-ssh-key:{repo}")
}

fn check_name(name: &str) -> Result<(), RepoError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::BadName(name.to_owned()))
    }
}

fn check_pipeline_file(path: &str) -> Result<(), RepoError> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains(['\n', '\0', ':']);
    if ok {
        Ok(())
    } else {
        Err(RepoError::BadPipelineFile(path.to_owned()))
    }
}

/// The mirror's branch and tag heads: full ref → commit (annotated tags peeled).
fn heads_of(mirror: &Mirror) -> Result<BTreeMap<String, String>, GitError> {
    Ok(mirror
        .refs()?
        .into_iter()
        .map(|r| (r.name, r.peeled.unwrap_or(r.target).to_string()))
        .collect())
}

/// The commit a run of `wanted` builds: a full ref, a branch, a tag or a commit id; with
/// no ref, `main`, else `master`, else the only branch.
fn resolve(
    mirror: &Mirror,
    record: &RepoRecord,
    heads: &BTreeMap<String, String>,
    wanted: Option<&str>,
) -> Result<Target, RepoError> {
    let found = |full: &str| {
        heads
            .get(full)
            .and_then(|c| ObjectId::from_hex(c))
            .map(|commit| Target {
                commit,
                full_ref: Some(full.to_owned()),
            })
    };
    let Some(wanted) = wanted else {
        let branches: Vec<&String> = heads
            .keys()
            .filter(|r| r.starts_with("refs/heads/"))
            .collect();
        return found("refs/heads/main")
            .or_else(|| found("refs/heads/master"))
            .or_else(|| match branches.as_slice() {
                [only] => found(only),
                _ => None,
            })
            .ok_or_else(|| RepoError::NoDefaultBranch {
                repo: record.name.clone(),
            });
    };
    if let Some(t) = found(wanted)
        .or_else(|| found(&format!("refs/heads/{wanted}")))
        .or_else(|| found(&format!("refs/tags/{wanted}")))
    {
        return Ok(t);
    }
    if let Some(commit) = ObjectId::from_hex(wanted) {
        return match mirror.ensure_commit(commit) {
            Ok(()) => Ok(Target {
                commit,
                full_ref: None,
            }),
            Err(GitError::CommitNotFound { .. }) => Err(RepoError::NoRef {
                repo: record.name.clone(),
                reference: wanted.to_owned(),
                url: gantry_git::redact(&record.url),
            }),
            Err(source) => Err(RepoError::Git {
                repo: record.name.clone(),
                source,
            }),
        };
    }
    Err(RepoError::NoRef {
        repo: record.name.clone(),
        reference: wanted.to_owned(),
        url: gantry_git::redact(&record.url),
    })
}

/// The branch a run without a ref builds: `main`, else `master`, else the only branch.
/// (A mirror does not follow the server's HEAD, so the name decides.)
pub(crate) fn default_branch(heads: &BTreeMap<String, String>) -> Option<&str> {
    let mut branches = heads.keys().filter(|r| r.starts_with("refs/heads/"));
    if heads.contains_key("refs/heads/main") {
        return Some("refs/heads/main");
    }
    if heads.contains_key("refs/heads/master") {
        return Some("refs/heads/master");
    }
    match (branches.next(), branches.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// A stored repository as admins see it, with its webhook settings.
impl Repos {
    fn view(&self, r: RepoRecord) -> Result<RepoView, StoreError> {
        let hook = self.store.repo_hook(&r.name)?;
        let status_api = self.status.describe(&r);
        let status_failures = self.status.failures(&r.name);
        Ok(view(r, &hook, status_api, status_failures))
    }
}

/// A repository as admins see it.
fn view(
    r: RepoRecord,
    hook: &RepoHookRecord,
    status_api: String,
    status_failures: Vec<String>,
) -> RepoView {
    RepoView {
        status_api,
        status_failures,
        webhook: match &hook.secret {
            None => "off (no --webhook-secret)".into(),
            Some(secret) => format!(
                "POST /hooks/repos/{} signed with secret {secret}; fork pull requests {}",
                r.name,
                if hook.fork_pull_requests {
                    "run untrusted"
                } else {
                    "refused"
                }
            ),
        },
        auth: match &r.credentials {
            RepoCredentials::None => "none".into(),
            RepoCredentials::TokenSecret(name) => format!("token from secret {name}"),
            RepoCredentials::SshKey(_) => "ssh key".into(),
        },
        name: r.name,
        url: r.url,
        forge: r.forge,
        pipeline_file: r.pipeline_file,
        poll_secs: r.poll_secs,
        created_at: r.created_at,
        created_by: r.created_by,
        fetched_at: r.fetched_at,
        last_error: r.last_error,
        heads: r.heads.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_pipeline_paths_are_checked() {
        for good in ["app", "my-app.v2", "A_1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in [".gantry.yml", "ci/pipeline.yml"] {
            assert!(check_pipeline_file(good).is_ok(), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x.yml", "a//b", "a/./b", "HEAD:x"] {
            assert!(check_pipeline_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_source_carries_every_depth_and_submodules_jobs_ask_for() {
        let wants =
            |jobs: &str| source::SourceWants::of("gantry.yml", &format!("name: d\njobs:\n{jobs}"));
        let job = |name: &str, checkout: &str| {
            format!("  {name}:\n    checkout: {checkout}\n    steps: [{{ run: 'true' }}]\n")
        };
        let depths = |w: source::SourceWants| w.depths.into_iter().collect::<Vec<_>>();
        assert_eq!(depths(wants(&job("a", "true"))), [Some(1)]);
        assert_eq!(
            depths(wants(
                &(job("a", "{ depth: 5 }") + &job("b", "{ depth: 2 }"))
            )),
            [Some(2), Some(5)]
        );
        let full = wants(&(job("a", "{ depth: full, submodules: true }") + &job("b", "false")));
        assert!(full.submodules);
        assert_eq!(depths(full), [None]);
        assert_eq!(depths(wants(&job("a", "false"))), [Some(1)]);
    }

    #[test]
    fn short_refs_are_branch_or_tag_names() {
        let commit = ObjectId([7; 20]);
        let t = |r: Option<&str>| Target {
            commit,
            full_ref: r.map(str::to_owned),
        };
        assert_eq!(t(Some("refs/heads/main")).short_ref(), "main");
        assert_eq!(t(Some("refs/tags/v1")).short_ref(), "v1");
        assert_eq!(t(None).short_ref(), commit.to_string());
    }
}
