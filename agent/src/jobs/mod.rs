//! The jobs this agent runs, and their logs, across connections.
//!
//! Owns: accepting or rejecting a dispatched job (slots), preparing its workspace (the
//! run's source tree, artifacts and cache in; for an isolated job, a uid of its own with
//! its own home, and the workspace handed to that uid), running its steps ([`steps`]), saving its
//! outputs, its log ([`logs`]: masked chunks spooled and uploaded on a stream of its
//! own), and keeping each result until the coordinator acknowledges it. Jobs outlive
//! connections: a dropped connection only pauses uploads; the next connection reports
//! the running jobs and resumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_protocol::{
    AgentMessage, ArtifactWhen, Attempt, Checkout, JobAssignment, JobExecution, JobId, JobOutcome,
    JobResult, Labels, RunningJob, StreamOpen, TreeSource, UnixMillis,
};
use gantry_transport::{Connection, TransportError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::base::files::fresh_dir;
use crate::base::mask::Masker;
use crate::runner::isolation::{process_uids, Isolation, Sandbox};
use crate::runner::LogSink;
use crate::transfers::artifacts::{ArtifactError, JobIo, RestoredCache};
use crate::transfers::{ConnectionSource, TransferLink, Transfers};
use logs::{chunk_log, upload, LogProgress, DEFAULT_LOG_CAP_BYTES};

pub mod logs;
pub mod reports;
pub mod steps;

/// Time between SIGTERM and SIGKILL when the assignment does not say.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);

type Key = (JobId, Attempt);

/// Why a dispatched job is not taken; the text goes back to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error(
        "this agent is about to restart into a new binary (a fleet upgrade); it takes no new job"
    )]
    Draining,
    #[error("all {0} slots are busy")]
    Busy(u32),
    #[error("cannot create the log spool {}: {source}", path.display())]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a job ended in an error before or after its steps; the text goes to its log.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot create the workspace {}: {source}", path.display())]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no connection to the coordinator to fetch the source tree from")]
    NoSourceConnection,
    #[error("cannot prepare the source tree: {0}")]
    Source(#[from] SourceError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Reports(#[from] reports::ReportsError),
    #[error("cannot check out the run's source: {0}")]
    Checkout(#[from] crate::transfers::checkout::CheckoutError),
    #[error("{0}: the job's timeout passed")]
    Deadline(&'static str),
    #[error("{0}: the job was cancelled")]
    Cancelled(&'static str),
    #[error("this agent refuses jobs: {0}")]
    Unisolated(String),
    #[error("cannot give the job a user of its own: all {0} uids of --job-uids are taken")]
    NoUid(u32),
    #[error("cannot prepare the job's own user (uid {uid}) in {}: {source}", path.display())]
    Sandbox {
        uid: u32,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The run's source tree could not be fetched or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Transport(TransportError),
    #[error("the source transfer broke off: {0}")]
    BrokeOff(TransportError),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the source tree arrived as {got}, not {expected}: refusing it")]
    Digest { got: String, expected: String },
    #[error("{0}")]
    UnpackTask(tokio::task::JoinError),
    #[error("cannot read {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Archive(std::io::Error),
    #[error("{}: {source}", path.display())]
    Entry {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the archive entry {} would land outside the workspace", path.display())]
    Outside { path: PathBuf },
    #[error("cannot write the workspace's .git: {0}")]
    Git(#[from] gantry_git::GitError),
    #[error(transparent)]
    Tree(gantry_protocol::TreeSourceError),
    #[error("checkout.path {0:?} must be a relative path inside the workspace")]
    Path(String),
}

/// Where a job's checkout goes: the workspace, or `checkout.path` inside it (created).
/// The pipeline crate already refused paths that leave the workspace; this refuses them
/// again, since the agent trusts no path it is sent.
fn checkout_dir(
    workspace: &Path,
    spec: &gantry_protocol::CheckoutSpec,
) -> Result<PathBuf, SourceError> {
    let Some(path) = &spec.path else {
        return Ok(workspace.to_path_buf());
    };
    let relative = Path::new(path);
    let inside = !path.is_empty()
        && relative.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    if !inside {
        return Err(SourceError::Path(path.clone()));
    }
    let dest = workspace.join(relative);
    std::fs::create_dir_all(&dest).map_err(|source| SourceError::Write {
        path: dest.clone(),
        source,
    })?;
    Ok(dest)
}

/// A finished attempt as reported: its result, and its outputs when it declares any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub result: JobResult,
    pub outputs: Option<Labels>,
}

impl Report {
    /// The message that reports it.
    pub fn message(&self) -> AgentMessage {
        AgentMessage::job_finished(self.result.clone(), self.outputs.clone())
    }
}

/// Why this agent cannot run a job as its execution asks, if it cannot: what it does not
/// do yet is refused at dispatch (so the coordinator offers the job elsewhere) rather
/// than ignored.
pub fn unsupported(execution: &JobExecution) -> Option<String> {
    let pulls = |i: &gantry_protocol::Image| {
        i.pull == gantry_protocol::PullPolicy::Always || i.credentials.is_some()
    };
    if execution.services.len() > gantry_protocol::limits::MAX_SERVICES {
        return Some(format!(
            "the job has {} services; this agent (gantry-agent {}) starts at most {}",
            execution.services.len(),
            env!("CARGO_PKG_VERSION"),
            gantry_protocol::limits::MAX_SERVICES
        ));
    }
    // A job's own image is pulled as its policy says (`runner::images`); services'
    // images are not yet.
    let reason = if execution.services.iter().any(|s| pulls(&s.image)) {
        "pulling service images (pull: always, registry credentials)"
    } else if execution.caches.len() > 1 || execution.caches.iter().any(|c| c.home) {
        "several caches or caches under $HOME"
    } else {
        return None;
    };
    Some(format!(
        "this agent (gantry-agent {}) cannot run {reason} yet",
        env!("CARGO_PKG_VERSION")
    ))
}

#[derive(Debug)]
struct Entry {
    spool: PathBuf,
    progress: watch::Sender<LogProgress>,
    cancel: watch::Sender<bool>,
    /// Set when the job ended; kept until the coordinator acknowledges it.
    result: Option<Report>,
    result_acked: bool,
    uploading: bool,
    /// The uid the job runs as while it runs (isolated jobs only).
    uid: Option<u32>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<Key, Entry>,
    conn: Option<Connection>,
    /// The session's transfer connection (artifacts, caches), while there is a session.
    link: Option<Arc<TransferLink>>,
    /// The agent will restart into another binary: it takes no new job.
    draining: bool,
}

/// The agent's jobs. Cheap to clone; all clones share the same state.
#[derive(Debug, Clone)]
pub struct JobManager {
    inner: Arc<Mutex<Inner>>,
    transfers: Transfers,
    work_dir: PathBuf,
    spool_dir: PathBuf,
    slots: u32,
    log_cap: u64,
    isolation: Isolation,
    /// This agent's id, labelled on the containers and networks of its jobs.
    agent: String,
    finished_tx: mpsc::UnboundedSender<Report>,
}

impl JobManager {
    /// `data_dir` holds `work/` (job workspaces) and `spool/` (unacknowledged log chunks).
    /// Results of finished jobs arrive on the returned receiver, for the session to send.
    /// Jobs run as `isolation` says; `agent` is this agent's id.
    pub fn new(
        data_dir: &Path,
        slots: u32,
        transfers: Transfers,
        isolation: Isolation,
        agent: &str,
    ) -> (Self, mpsc::UnboundedReceiver<Report>) {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        let manager = Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            transfers,
            work_dir: data_dir.join("work"),
            spool_dir: data_dir.join("spool"),
            slots: slots.max(1),
            log_cap: DEFAULT_LOG_CAP_BYTES,
            isolation,
            agent: agent.to_owned(),
            finished_tx,
        };
        (manager, finished_rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops (or resumes) taking new jobs, ahead of a restart into another binary.
    pub fn set_draining(&self, draining: bool) {
        self.lock().draining = draining;
    }

    /// Attempts whose result is not acknowledged, for the hello (left out, one that finished offline is declared lost).
    pub fn running(&self) -> Vec<RunningJob> {
        self.lock()
            .jobs
            .iter()
            .filter(|(_, e)| !e.result_acked)
            .map(|((job, attempt), _)| RunningJob {
                job: *job,
                attempt: *attempt,
            })
            .collect()
    }

    /// Takes a dispatched job. A repeat of an attempt already held is accepted again
    /// (the coordinator may re-send after a reconnect); a new one needs a free slot.
    pub fn start(
        &self,
        assignment: JobAssignment,
        execution: JobExecution,
    ) -> Result<(), Rejected> {
        let key = (assignment.job, assignment.attempt);
        let mut inner = self.lock();
        if inner.jobs.contains_key(&key) {
            return Ok(());
        }
        if inner.draining {
            return Err(Rejected::Draining);
        }
        let busy = inner.jobs.values().filter(|e| e.result.is_none()).count();
        if busy >= self.slots as usize {
            return Err(Rejected::Busy(self.slots));
        }
        let name = format!("{}-{}", assignment.job, assignment.attempt);
        let spool = self.spool_dir.join(&name);
        fresh_dir(&spool).map_err(|source| Rejected::Spool {
            path: spool.clone(),
            source,
        })?;
        let uid = match &self.isolation {
            Isolation::Users { uids, .. } => {
                // A uid some process still runs as (a job of an agent that crashed, or
                // of another agent given the same range) is not handed out.
                let busy = process_uids();
                uids.free(|uid| {
                    busy.contains(&uid)
                        || inner
                            .jobs
                            .values()
                            .any(|e| e.result.is_none() && e.uid == Some(uid))
                })
            }
            Isolation::Off | Isolation::Unavailable(_) => None,
        };
        let (progress, _) = watch::channel(LogProgress::default());
        let (cancel, cancel_rx) = watch::channel(false);
        inner.jobs.insert(
            key,
            Entry {
                spool: spool.clone(),
                progress: progress.clone(),
                cancel,
                result: None,
                result_acked: false,
                uploading: false,
                uid,
            },
        );
        let conn = inner.conn.clone();
        drop(inner);
        info!(job = %assignment.job, attempt = assignment.attempt, name = %assignment.name, "job accepted");
        let workspace = self.work_dir.join(&name);
        let me = self.clone();
        tokio::spawn(async move {
            me.execute(
                (assignment, execution),
                (workspace, uid),
                spool,
                progress,
                cancel_rx,
            )
            .await;
        });
        if let Some(conn) = conn {
            self.spawn_upload(key, conn);
        }
        Ok(())
    }

    /// Runs one job in `workspace` as `uid` (isolated jobs) to its end and keeps its
    /// result until acknowledged.
    async fn execute(
        &self,
        (assignment, execution): (JobAssignment, JobExecution),
        (workspace, uid): (PathBuf, Option<u32>),
        spool: PathBuf,
        progress: watch::Sender<LogProgress>,
        cancel: watch::Receiver<bool>,
    ) {
        let key = (assignment.job, assignment.attempt);
        let started_at = UnixMillis::now();
        let (log_tx, log_rx) = mpsc::channel(256);
        let masker = Masker::new(assignment.secrets.values().map(String::as_str));
        let chunker = tokio::spawn(chunk_log(
            log_rx,
            masker,
            spool,
            progress.clone(),
            self.log_cap,
        ));
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(assignment.timeout_ms.max(1));
        let mut stop = cancel.clone();
        // Outside the workspace, so nothing in it reaches artifacts or caches.
        let temp = PathBuf::from(format!("{}.tmp", workspace.display()));
        let mut sandbox = None;
        let inputs = async {
            let user = self.sandbox(uid, &workspace)?;
            sandbox.clone_from(&user);
            fresh_dir(&workspace).map_err(|source| JobError::Workspace {
                path: workspace.clone(),
                source,
            })?;
            if let (Some(source), Checkout::Source(spec)) =
                (&assignment.source, &execution.checkout)
            {
                let dest = checkout_dir(&workspace, spec)?;
                if TreeSource::is_tree(source) {
                    let tree = TreeSource::parse(source).map_err(SourceError::Tree)?;
                    let scratch = PathBuf::from(format!("{}.git-payload", workspace.display()));
                    self.io(&assignment, &workspace, &log_tx)
                        .checkout(&tree, spec, &dest, &scratch)
                        .await?;
                } else {
                    self.fetch_source(key, source, &dest).await?;
                }
            }
            let restored = self
                .prepare_inputs(&assignment, &workspace, &log_tx)
                .await?;
            if let Some(user) = &user {
                // Everything the job starts with becomes its own, and only its own.
                user.adopt(&workspace).map_err(|source| JobError::Sandbox {
                    uid: user.uid,
                    path: workspace.clone(),
                    source,
                })?;
            }
            Ok(restored)
        };
        let prepared = bounded(inputs, deadline, &mut stop, "preparing the job's inputs").await;
        let (mut outcome, outputs) = match &prepared {
            Ok(_) => {
                let run = steps::run_job(
                    &assignment,
                    &execution,
                    &workspace,
                    &temp,
                    &log_tx,
                    cancel,
                    sandbox.as_ref(),
                    &self.agent,
                )
                .await;
                (run.outcome, run.outputs)
            }
            Err(e) => {
                let message = e.to_string();
                let _ = log_tx
                    .send(format!("\u{2716} {message}\n").into_bytes())
                    .await;
                (JobOutcome::Error { message }, None)
            }
        };
        let succeeded = outcome == JobOutcome::Succeeded;
        let prepared_ok = prepared.is_ok();
        let upload = match execution.artifact_when {
            ArtifactWhen::OnSuccess => succeeded,
            ArtifactWhen::OnFailure => {
                matches!(outcome, JobOutcome::Failed { .. } | JobOutcome::TimedOut)
            }
            ArtifactWhen::Always => prepared.is_ok() && outcome != JobOutcome::Cancelled,
        };
        if upload || succeeded {
            let restored = prepared.ok().flatten().filter(|_| succeeded);
            let saved =
                self.save_outputs(&assignment, &workspace, &log_tx, upload, restored.as_ref());
            // Saving after a timeout gets its own bound: the job's has passed.
            let save_deadline = deadline.max(tokio::time::Instant::now() + SAVE_AFTER_FAILURE);
            if let Err(e) =
                bounded(saved, save_deadline, &mut stop, "saving the job's outputs").await
            {
                let message = e.to_string();
                let _ = log_tx
                    .send(format!("\u{2716} {message}\n").into_bytes())
                    .await;
                if succeeded {
                    outcome = JobOutcome::Error { message };
                }
            }
        }
        if let Some(reports) = &execution.reports {
            if prepared_ok && outcome != JobOutcome::Cancelled {
                let sent = self.send_reports(key, reports, &workspace, &assignment);
                let save_deadline = deadline.max(tokio::time::Instant::now() + SAVE_AFTER_FAILURE);
                let line = match bounded(
                    sent,
                    save_deadline,
                    &mut stop,
                    "sending the job's test reports",
                )
                .await
                {
                    Ok(report) => {
                        let mut lines =
                            vec![format!("\u{2912} test reports: {}\n", report.summary())];
                        lines.extend(
                            report
                                .notes
                                .iter()
                                .map(|n| format!("\u{26a0} test reports: {n}\n")),
                        );
                        lines.concat()
                    }
                    Err(e) => format!("\u{26a0} test reports not stored: {e}\n"),
                };
                let _ = log_tx.send(line.into_bytes()).await;
            }
        }
        drop(log_tx);
        let log_chunks = chunker.await.unwrap_or(0);
        progress.send_modify(|p| p.finished = true);
        for (what, dir) in [
            ("the workspace", &workspace),
            ("the job's temporary directory", &temp),
        ] {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(job = %key.0, "cannot remove {what} {}: {e}", dir.display());
                }
            }
        }
        if let Some(sandbox) = sandbox {
            // Off the runtime: the kernel may hold a cgroup busy for a moment after its
            // last process exited, and its removal waits for that.
            let removed = tokio::task::spawn_blocking(move || sandbox.remove()).await;
            if let Some(e) = removed.map_err(std::io::Error::other).and_then(|r| r).err() {
                warn!(job = %key.0, "cannot remove the job's home, temporary directory or cgroup: {e}");
            }
        }
        let result = JobResult {
            job: key.0,
            attempt: key.1,
            outcome: outcome.clone(),
            log_chunks,
            started_at,
            finished_at: UnixMillis::now(),
        };
        info!(job = %key.0, attempt = key.1, ?outcome, "job finished");
        let report = Report { result, outputs };
        if let Some(entry) = self.lock().jobs.get_mut(&key) {
            entry.result = Some(report.clone());
        }
        let _ = self.finished_tx.send(report);
    }

    /// The job's own user (`uid`, given at [`Self::start`]) with a fresh home and
    /// temporary directory beside `workspace`; none when isolation is off; an error when
    /// isolation is required and this agent cannot provide it.
    fn sandbox(&self, uid: Option<u32>, workspace: &Path) -> Result<Option<Sandbox>, JobError> {
        match (&self.isolation, uid) {
            (Isolation::Off, _) => Ok(None),
            (Isolation::Unavailable(why), _) => Err(JobError::Unisolated(why.clone())),
            (Isolation::Users { uids, .. }, None) => Err(JobError::NoUid(uids.len())),
            (Isolation::Users { cgroups, .. }, Some(uid)) => {
                let name = workspace.file_name().unwrap_or_default().to_string_lossy();
                Sandbox::create(workspace, uid, cgroups.as_ref(), &name)
                    .map(Some)
                    .map_err(|source| JobError::Sandbox {
                        uid,
                        path: workspace.to_path_buf(),
                        source,
                    })
            }
        }
    }

    /// The job's side of its transfers.
    fn io<'a>(
        &'a self,
        assignment: &'a JobAssignment,
        workspace: &'a Path,
        log: &'a LogSink,
    ) -> JobIo<'a> {
        JobIo {
            transfers: &self.transfers,
            source: self,
            job: assignment,
            workspace,
            log,
        }
    }

    /// Downloads the job's artifacts and restores its cache; returns the cache's key.
    async fn prepare_inputs(
        &self,
        assignment: &JobAssignment,
        workspace: &Path,
        log: &LogSink,
    ) -> Result<Option<RestoredCache>, JobError> {
        let io = self.io(assignment, workspace, log);
        if assignment.downloads {
            io.download_inputs().await?;
        }
        match &assignment.cache {
            Some(spec) => Ok(Some(io.restore_cache(spec).await?)),
            None => Ok(None),
        }
    }

    /// Uploads the artifact when `upload` (an error fails a job that succeeded) and
    /// saves the cache that was `restored` (best effort).
    async fn save_outputs(
        &self,
        assignment: &JobAssignment,
        workspace: &Path,
        log: &LogSink,
        upload: bool,
        restored: Option<&RestoredCache>,
    ) -> Result<(), JobError> {
        let io = self.io(assignment, workspace, log);
        if upload {
            io.upload_artifact().await?;
        }
        if let (Some(spec), Some(restored)) = (&assignment.cache, restored) {
            io.save_cache(spec, restored).await;
        }
        Ok(())
    }

    /// Sends the job's report files over the current connection (waiting up to a minute
    /// for one) and returns the summary the coordinator stored.
    async fn send_reports(
        &self,
        key: Key,
        reports: &gantry_protocol::Reports,
        workspace: &Path,
        assignment: &JobAssignment,
    ) -> Result<gantry_protocol::TestReport, JobError> {
        let conn = self
            .wait_for_connection()
            .await
            .ok_or(reports::ReportsError::NoConnection)?;
        let secrets = assignment.secrets.values().cloned().collect();
        Ok(reports::send(&conn, key, reports, workspace, secrets).await?)
    }

    /// The current connection, waiting up to [`SOURCE_CONNECT_WAIT`] for one.
    async fn wait_for_connection(&self) -> Option<Connection> {
        let deadline = tokio::time::Instant::now() + SOURCE_CONNECT_WAIT;
        loop {
            if let Some(conn) = self.lock().conn.clone() {
                return Some(conn);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fetches the run's source tree over the current connection (waiting up to a minute
    /// for one), checks its SHA-256 against its id, and unpacks it into `workspace`.
    async fn fetch_source(&self, key: Key, source: &str, workspace: &Path) -> Result<(), JobError> {
        let conn = self
            .wait_for_connection()
            .await
            .ok_or(JobError::NoSourceConnection)?;
        let archive = self
            .spool_dir
            .join(format!("{}-{}.source.tar", key.0, key.1));
        let fetched = async {
            let (mut writer, mut reader) =
                conn.open_stream().await.map_err(SourceError::Transport)?;
            writer
                .send(&StreamOpen::FetchSource {
                    job: key.0,
                    attempt: key.1,
                })
                .await
                .map_err(SourceError::Transport)?;
            writer.finish();
            let write_err = |source| SourceError::Write {
                path: archive.clone(),
                source,
            };
            let mut file = std::fs::File::create(&archive).map_err(write_err)?;
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            while let Some(gantry_protocol::SourceData(piece)) =
                reader.recv().await.map_err(SourceError::BrokeOff)?
            {
                digest.update(&piece);
                std::io::Write::write_all(&mut file, &piece).map_err(write_err)?;
            }
            let got = format!("sha256:{}", gantry_certs::hex(digest.finish().as_ref()));
            if got != source {
                return Err(SourceError::Digest {
                    got,
                    expected: source.to_owned(),
                });
            }
            Ok::<_, SourceError>(())
        }
        .await;
        let unpacked = match fetched {
            Ok(()) => {
                let (archive, workspace) = (archive.clone(), workspace.to_path_buf());
                tokio::task::spawn_blocking(move || unpack_source(&archive, &workspace))
                    .await
                    .map_err(SourceError::UnpackTask)
                    .and_then(|r| r)
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&archive);
        Ok(unpacked?)
    }

    /// Stops a job attempt (SIGTERM to its process group, SIGKILL after the grace).
    pub fn cancel(&self, job: JobId, attempt: Attempt) {
        if let Some(entry) = self.lock().jobs.get(&(job, attempt)) {
            info!(%job, attempt, "cancelling job");
            let _ = entry.cancel.send(true);
        }
    }

    /// The coordinator stored the result: forget the job once its log is also stored.
    pub fn result_acked(&self, job: JobId, attempt: Attempt) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(&(job, attempt)) {
            entry.result_acked = true;
        }
        Self::forget_done(&mut inner);
    }

    fn forget_done(inner: &mut Inner) {
        let done: Vec<Key> = inner
            .jobs
            .iter()
            .filter(|(_, e)| {
                let p = *e.progress.borrow();
                e.result_acked && p.done()
            })
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            if let Some(entry) = inner.jobs.remove(&key) {
                let _ = std::fs::remove_dir_all(&entry.spool);
                debug!(job = %key.0, attempt = key.1, "job forgotten: result and log are stored");
            }
        }
    }

    /// A new connection (and the session's transfer link): uploads resume on it;
    /// returns results still to be reported.
    pub fn attach(&self, conn: &Connection, link: Option<Arc<TransferLink>>) -> Vec<Report> {
        let keys: Vec<Key> = {
            let mut inner = self.lock();
            inner.conn = Some(conn.clone());
            inner.link = link;
            inner.jobs.keys().copied().collect()
        };
        for key in keys {
            self.spawn_upload(key, conn.clone());
        }
        self.lock()
            .jobs
            .values()
            .filter(|e| !e.result_acked)
            .filter_map(|e| e.result.clone())
            .collect()
    }

    /// The connection is gone; uploads wait for the next one. The session's transfer
    /// connection is closed with it.
    pub fn detach(&self) {
        let link = {
            let mut inner = self.lock();
            inner.conn = None;
            inner.link.take()
        };
        if let Some(link) = link {
            link.close();
        }
    }

    fn spawn_upload(&self, key: Key, conn: Connection) {
        let (spool, progress) = {
            let mut inner = self.lock();
            let Some(entry) = inner.jobs.get_mut(&key) else {
                return;
            };
            let p = *entry.progress.borrow();
            if entry.uploading || (p.done()) {
                return;
            }
            entry.uploading = true;
            (entry.spool.clone(), entry.progress.clone())
        };
        let me = self.clone();
        tokio::spawn(async move {
            match upload(&conn, key, &spool, &progress).await {
                Ok(()) => debug!(job = %key.0, "log upload complete"),
                Err(e) => debug!(job = %key.0, "log upload paused: {e}"),
            }
            let again = {
                let mut inner = me.lock();
                if let Some(entry) = inner.jobs.get_mut(&key) {
                    entry.uploading = false;
                }
                Self::forget_done(&mut inner);
                // The connection may have been replaced while this upload was failing.
                let pending = inner.jobs.get(&key).is_some_and(|e| {
                    let p = *e.progress.borrow();
                    !(p.done())
                });
                inner.conn.clone().filter(|_| pending)
            };
            if let Some(conn) = again {
                if conn.close_reason().is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    me.spawn_upload(key, conn);
                }
            }
        });
    }
}

impl ConnectionSource for JobManager {
    fn current(&self) -> Option<Connection> {
        self.lock().conn.clone()
    }

    fn transfer_link(&self) -> Option<Arc<TransferLink>> {
        self.lock().link.clone()
    }
}

/// Makes the data directory safe to run isolated jobs from: the directory itself and
/// `work/` can be passed through (0711: a job reaches its own workspace but lists
/// nothing), every other directory in it (`tls/`, `spool/`, the chunk cache) is the
/// agent's alone (0700), and so is `agent.toml`. `deploy/` keeps its mode: deployed apps
/// may run as other users.
pub fn seal_data_dir(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot set the mode of {}: {e}", path.display()),
            )
        })
    };
    std::fs::create_dir_all(data_dir.join("work"))?;
    mode(data_dir, 0o711)?;
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() {
            match name.to_str() {
                Some("work") => mode(&entry.path(), 0o711)?,
                Some("deploy") => {}
                _ => mode(&entry.path(), 0o700)?,
            }
        } else if name == "agent.toml" {
            mode(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Runs `work` until it ends, the job's deadline passes or the job is cancelled.
async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, JobError>>,
    deadline: tokio::time::Instant,
    cancel: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Result<T, JobError> {
    tokio::select! {
        result = work => result,
        () = tokio::time::sleep_until(deadline) => Err(JobError::Deadline(what)),
        _ = cancel.wait_for(|c| *c) => Err(JobError::Cancelled(what)),
    }
}

/// How long saving an artifact may take after a job failed or timed out
/// (`artifacts.when: on-failure` or `always`), when the job's own deadline has passed.
const SAVE_AFTER_FAILURE: Duration = Duration::from_secs(300);

/// How long a job waits for a connection to fetch its source tree.
const SOURCE_CONNECT_WAIT: Duration = Duration::from_secs(60);

/// Unpacks a source tree archive into `workspace`. Entries that would land outside it
/// (absolute paths, `..`, through a symlink) are refused by the tar reader and end the
/// job with an error. Modes are kept, so scripts stay executable.
fn unpack_source(archive: &Path, workspace: &Path) -> Result<(), SourceError> {
    let file = std::fs::File::open(archive).map_err(|source| SourceError::Open {
        path: archive.to_path_buf(),
        source,
    })?;
    let mut tar = tar::Archive::new(file);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    for entry in tar.entries().map_err(SourceError::Archive)? {
        let mut entry = entry.map_err(SourceError::Archive)?;
        let path = entry.path().map_err(SourceError::Archive)?.into_owned();
        // unpack_in returns false for an entry that would escape the workspace.
        let inside = entry
            .unpack_in(workspace)
            .map_err(|source| SourceError::Entry {
                path: path.clone(),
                source,
            })?;
        if !inside {
            return Err(SourceError::Outside { path });
        }
    }
    write_git_dir(workspace)
}

/// Turns the `.git` file a repository's source archive ends with (the coordinator's
/// `.git` payload, after [`gantry_protocol::GIT_PAYLOAD_MAGIC`]) into the workspace's
/// `.git` directory. Anything else at `.git` (an uploaded tree has none) is left alone.
fn write_git_dir(workspace: &Path) -> Result<(), SourceError> {
    let path = workspace.join(".git");
    let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
    if !is_file {
        return Ok(());
    }
    let bytes = std::fs::read(&path).map_err(|source| SourceError::Open {
        path: path.clone(),
        source,
    })?;
    let Some(encoded) = bytes.strip_prefix(gantry_protocol::GIT_PAYLOAD_MAGIC) else {
        return Ok(());
    };
    let payload = gantry_git::GitPayload::decode(encoded)?;
    std::fs::remove_file(&path).map_err(|source| SourceError::Write {
        path: path.clone(),
        source,
    })?;
    gantry_git::write_git_dir(workspace, &payload)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_archive_unpacks_and_an_escaping_entry_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("src.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&archive).expect("create"));
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o755);
        header.set_cksum();
        builder
            .append_data(&mut header, "bin/run.sh", &b"ok\n"[..])
            .expect("append");
        builder.into_inner().expect("finish");
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(&ws).expect("ws");
        unpack_source(&archive, &ws).expect("unpack");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(ws.join("bin/run.sh"))
                    .expect("file")
                    .permissions()
            ) & 0o777,
            0o755
        );

        // An entry named ../escaped, written raw (the tar builder itself refuses such names).
        let evil = dir.path().join("evil.tar");
        let mut raw = [0u8; 512];
        raw[..12].copy_from_slice(b"../escaped\0\0");
        let mut header = tar::Header::from_byte_slice(&raw).clone();
        header.set_size(4);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(b"evil");
        bytes.resize(1024 + 1024, 0);
        std::fs::write(&evil, bytes).expect("write");
        let err = unpack_source(&evil, &ws).expect_err("refused").to_string();
        assert!(
            err.contains("outside the workspace") || err.contains(".."),
            "{err}"
        );
        assert!(
            !dir.path().join("escaped").exists(),
            "nothing written outside the workspace"
        );
    }
}
