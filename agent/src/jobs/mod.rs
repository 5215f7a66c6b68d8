//! The jobs this agent runs, and their logs, across connections.
//!
//! Owns: accepting or rejecting a dispatched job (slots), running it (through
//! [`crate::exec`]), cutting its output into masked, sequence-numbered chunks spooled to
//! disk, uploading the spool on a stream of its own (resuming where the coordinator's
//! durable copy ends, so there are no gaps or duplicates), and keeping each result until
//! the coordinator acknowledges it. Jobs outlive connections: a dropped connection only
//! pauses uploads; the next connection reports the running jobs and resumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_protocol::{
    Attempt, JobAssignment, JobId, JobResult, LogChunk, LogControl, RunningJob, StreamOpen,
    UnixMillis,
};
use gantry_transport::{Connection, TransportError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::base::files::fresh_dir;
use crate::base::mask::Masker;
use crate::runner::LogSink;
use crate::transfers::artifacts::{self, ArtifactError, RestoredCache};
use crate::transfers::{ConnectionSource, Transfers};

pub mod steps;

/// Output is sent at least this often while a job prints.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Output is sent this long after the job stops writing (a line, a prompt), so live
/// followers see it at once while a burst still coalesces into one chunk.
pub const COALESCE: Duration = Duration::from_millis(5);
/// Largest chunk; a chunk is cut earlier when this much output is waiting.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// Default cap on one job's log: the first half and the last half are kept.
pub const DEFAULT_LOG_CAP_BYTES: u64 = 100 * 1024 * 1024;
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
    #[error("{0}: the job's timeout passed")]
    Deadline(&'static str),
    #[error("{0}: the job was cancelled")]
    Cancelled(&'static str),
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
}

/// Progress of one job's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LogProgress {
    /// Chunks written to the spool: `0..produced`.
    produced: u64,
    /// Chunks the coordinator holds durably: `0..acked`.
    acked: u64,
    /// No more chunks will come.
    finished: bool,
}

#[derive(Debug)]
struct Entry {
    spool: PathBuf,
    progress: watch::Sender<LogProgress>,
    cancel: watch::Sender<bool>,
    /// Set when the job ended; kept until the coordinator acknowledges it.
    result: Option<JobResult>,
    result_acked: bool,
    uploading: bool,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<Key, Entry>,
    conn: Option<Connection>,
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
    finished_tx: mpsc::UnboundedSender<JobResult>,
}

impl JobManager {
    /// `data_dir` holds `work/` (job workspaces) and `spool/` (unacknowledged log chunks).
    /// Results of finished jobs arrive on the returned receiver, for the session to send.
    pub fn new(
        data_dir: &Path,
        slots: u32,
        transfers: Transfers,
    ) -> (Self, mpsc::UnboundedReceiver<JobResult>) {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        let manager = Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            transfers,
            work_dir: data_dir.join("work"),
            spool_dir: data_dir.join("spool"),
            slots: slots.max(1),
            log_cap: DEFAULT_LOG_CAP_BYTES,
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
    pub fn start(&self, assignment: JobAssignment) -> Result<(), Rejected> {
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
            },
        );
        let conn = inner.conn.clone();
        drop(inner);
        info!(job = %assignment.job, attempt = assignment.attempt, name = %assignment.name, "job accepted");
        let workspace = self.work_dir.join(&name);
        let me = self.clone();
        tokio::spawn(async move {
            me.execute(assignment, workspace, spool, progress, cancel_rx)
                .await;
        });
        if let Some(conn) = conn {
            self.spawn_upload(key, conn);
        }
        Ok(())
    }

    async fn execute(
        &self,
        assignment: JobAssignment,
        workspace: PathBuf,
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
        let inputs = async {
            fresh_dir(&workspace).map_err(|source| JobError::Workspace {
                path: workspace.clone(),
                source,
            })?;
            if let Some(source) = &assignment.source {
                self.fetch_source(key, source, &workspace).await?;
            }
            self.prepare_inputs(&assignment, &workspace, &log_tx).await
        };
        let prepared = bounded(inputs, deadline, &mut stop, "preparing the job's inputs").await;
        let mut outcome = match &prepared {
            Ok(_) => steps::run_job(&assignment, &workspace, &log_tx, cancel).await,
            Err(e) => {
                let message = e.to_string();
                let _ = log_tx
                    .send(format!("\u{2716} {message}\n").into_bytes())
                    .await;
                gantry_protocol::JobOutcome::Error { message }
            }
        };
        if outcome == gantry_protocol::JobOutcome::Succeeded {
            let restored = prepared.ok().flatten();
            let outputs = self.save_outputs(&assignment, &workspace, &log_tx, restored.as_ref());
            if let Err(e) = bounded(outputs, deadline, &mut stop, "saving the job's outputs").await
            {
                let message = e.to_string();
                let _ = log_tx
                    .send(format!("\u{2716} {message}\n").into_bytes())
                    .await;
                outcome = gantry_protocol::JobOutcome::Error { message };
            }
        }
        drop(log_tx);
        let log_chunks = chunker.await.unwrap_or(0);
        progress.send_modify(|p| p.finished = true);
        if let Err(e) = std::fs::remove_dir_all(&workspace) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(job = %key.0, "cannot remove the workspace {}: {e}", workspace.display());
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
        if let Some(entry) = self.lock().jobs.get_mut(&key) {
            entry.result = Some(result.clone());
        }
        let _ = self.finished_tx.send(result);
    }

    /// Downloads the job's artifacts and restores its cache; returns the cache's key.
    async fn prepare_inputs(
        &self,
        assignment: &JobAssignment,
        workspace: &Path,
        log: &LogSink,
    ) -> Result<Option<RestoredCache>, JobError> {
        if assignment.downloads {
            artifacts::download_inputs(&self.transfers, self, assignment, workspace, log).await?;
        }
        match &assignment.cache {
            Some(spec) => {
                artifacts::restore_cache(&self.transfers, self, assignment, spec, workspace, log)
                    .await
                    .map(Some)
                    .map_err(JobError::from)
            }
            None => Ok(None),
        }
    }

    /// Uploads the artifact (an error fails the job) and saves the cache (best effort).
    async fn save_outputs(
        &self,
        assignment: &JobAssignment,
        workspace: &Path,
        log: &LogSink,
        restored: Option<&RestoredCache>,
    ) -> Result<(), JobError> {
        artifacts::upload_artifact(&self.transfers, self, assignment, workspace, log).await?;
        if let (Some(spec), Some(restored)) = (&assignment.cache, restored) {
            artifacts::save_cache(
                &self.transfers,
                self,
                assignment,
                spec,
                restored,
                workspace,
                log,
            )
            .await;
        }
        Ok(())
    }

    /// Fetches the run's source tree over the current connection (waiting up to a minute
    /// for one), checks its SHA-256 against its id, and unpacks it into `workspace`.
    async fn fetch_source(&self, key: Key, source: &str, workspace: &Path) -> Result<(), JobError> {
        let deadline = tokio::time::Instant::now() + SOURCE_CONNECT_WAIT;
        let conn = loop {
            if let Some(conn) = self.lock().conn.clone() {
                break conn;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(JobError::NoSourceConnection);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
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
                e.result_acked && p.finished && p.acked >= p.produced
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

    /// A new connection: uploads resume on it; returns results still to be reported.
    pub fn attach(&self, conn: &Connection) -> Vec<JobResult> {
        let keys: Vec<Key> = {
            let mut inner = self.lock();
            inner.conn = Some(conn.clone());
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

    /// The connection is gone; uploads wait for the next one.
    pub fn detach(&self) {
        self.lock().conn = None;
    }

    fn spawn_upload(&self, key: Key, conn: Connection) {
        let (spool, progress) = {
            let mut inner = self.lock();
            let Some(entry) = inner.jobs.get_mut(&key) else {
                return;
            };
            let p = *entry.progress.borrow();
            if entry.uploading || (p.finished && p.acked >= p.produced) {
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
                    !(p.finished && p.acked >= p.produced)
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

/// Sends the spooled chunks of one job from where the coordinator's copy ends, then
/// every new chunk as it is written, until the job is finished and all is acknowledged.
async fn upload(
    conn: &Connection,
    key: Key,
    spool: &Path,
    progress: &watch::Sender<LogProgress>,
) -> Result<(), TransportError> {
    let (mut writer, mut reader) = conn.open_stream().await?;
    writer
        .send(&StreamOpen::Logs {
            job: key.0,
            attempt: key.1,
        })
        .await?;
    let next_seq = match reader.recv::<LogControl>().await? {
        Some(LogControl::Resume { next_seq }) => next_seq,
        other => {
            return Err(TransportError::Lost(format!(
                "expected a log resume point, got {other:?}"
            )))
        }
    };
    acknowledge(spool, progress, next_seq);
    // Acknowledgements are read by their own task: a frame read is not cancel-safe.
    let acks = {
        let (spool, progress) = (spool.to_path_buf(), progress.clone());
        tokio::spawn(async move {
            while let Ok(Some(LogControl::Ack { next_seq } | LogControl::Resume { next_seq })) =
                reader.recv::<LogControl>().await
            {
                acknowledge(&spool, &progress, next_seq);
            }
        })
    };
    let mut acks = AbortOnDrop(acks);
    let mut watcher = progress.subscribe();
    let mut sent = next_seq;
    loop {
        let p = *watcher.borrow_and_update();
        while sent < p.produced {
            let data = std::fs::read(chunk_path(spool, sent)).map_err(|e| {
                TransportError::Lost(format!("spooled chunk {sent} unreadable: {e}"))
            })?;
            writer.send(&LogChunk { seq: sent, data }).await?;
            sent += 1;
        }
        if p.finished && p.acked >= p.produced {
            writer.finish();
            return Ok(());
        }
        tokio::select! {
            changed = watcher.changed() => if changed.is_err() { return Ok(()) },
            // Acknowledgements stop when the stream or connection breaks. Once every chunk
            // is sent and the job is over nothing else wakes this loop, and an upload left
            // waiting here blocks every later one of this job (found by tests/crash.rs).
            _ = &mut acks.0 => {
                return Err(TransportError::Lost(
                    "the log stream ended before every chunk was acknowledged".into(),
                ))
            }
        }
    }
}

fn acknowledge(spool: &Path, progress: &watch::Sender<LogProgress>, next_seq: u64) {
    let before = progress.borrow().acked;
    for seq in before..next_seq {
        let _ = std::fs::remove_file(chunk_path(spool, seq));
    }
    progress.send_modify(|p| p.acked = p.acked.max(next_seq));
}

fn chunk_path(spool: &Path, seq: u64) -> PathBuf {
    spool.join(format!("{seq:012}.chunk"))
}

/// Masks output and cuts it into chunks: at most [`MAX_CHUNK_BYTES`], written at least
/// every [`FLUSH_INTERVAL`]. Past `cap` bytes, the middle of the log is dropped: the first
/// half of the cap is sent as it comes, the last half is held and sent at the end, after
/// a line saying how much was cut. Returns the number of chunks written.
async fn chunk_log(
    mut pieces: mpsc::Receiver<Vec<u8>>,
    mut masker: Masker,
    spool: PathBuf,
    progress: watch::Sender<LogProgress>,
    cap: u64,
) -> u64 {
    let mut state = Chunker {
        spool,
        progress,
        pending: Vec::new(),
        seq: 0,
        emitted: 0,
        head_limit: cap / 2,
        tail: std::collections::VecDeque::new(),
        tail_limit: usize::try_from(cap / 2).unwrap_or(usize::MAX),
        cut: 0,
    };
    // A chunk goes out COALESCE after output pauses, or FLUSH_INTERVAL after its first
    // byte, or at MAX_CHUNK_BYTES, whichever is first: a line printed alone reaches
    // followers in milliseconds, and a flood still travels in large chunks.
    let mut first_byte_at: Option<tokio::time::Instant> = None;
    let mut last_byte_at = tokio::time::Instant::now();
    loop {
        let flush_at =
            first_byte_at.map(|first| (first + FLUSH_INTERVAL).min(last_byte_at + COALESCE));
        let wait = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            piece = pieces.recv() => match piece {
                Some(piece) => {
                    let visible = masker.push(&piece);
                    state.take(&visible);
                    last_byte_at = tokio::time::Instant::now();
                    if state.pending.is_empty() {
                        first_byte_at = None;
                    } else {
                        first_byte_at.get_or_insert(last_byte_at);
                    }
                    if state.pending.len() >= MAX_CHUNK_BYTES {
                        state.flush();
                        first_byte_at = None;
                    }
                }
                None => break,
            },
            () = wait => {
                state.flush();
                first_byte_at = None;
            }
        }
    }
    let rest = masker.finish();
    state.take(&rest);
    state.flush();
    if state.cut > 0 {
        let note = format!("\n[gantry: {} bytes were cut from the middle of this log; the first and last {} MiB are kept]\n", state.cut, state.head_limit / (1024 * 1024));
        state.pending.extend_from_slice(note.as_bytes());
        let tail: Vec<u8> = state.tail.drain(..).collect();
        state.pending.extend_from_slice(&tail);
        state.flush();
    }
    state.seq
}

struct Chunker {
    spool: PathBuf,
    progress: watch::Sender<LogProgress>,
    pending: Vec<u8>,
    seq: u64,
    emitted: u64,
    head_limit: u64,
    tail: std::collections::VecDeque<u8>,
    tail_limit: usize,
    cut: u64,
}

impl Chunker {
    fn take(&mut self, bytes: &[u8]) {
        let room = usize::try_from(
            self.head_limit
                .saturating_sub(self.emitted + self.pending.len() as u64),
        )
        .unwrap_or(usize::MAX);
        let (head, rest) = bytes.split_at(room.min(bytes.len()));
        self.pending.extend_from_slice(head);
        self.tail.extend(rest);
        if self.tail.len() > self.tail_limit {
            let excess = self.tail.len() - self.tail_limit;
            self.tail.drain(..excess);
            self.cut += excess as u64;
        }
    }

    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(MAX_CHUNK_BYTES);
            let chunk: Vec<u8> = self.pending.drain(..n).collect();
            if let Err(e) = std::fs::write(chunk_path(&self.spool, self.seq), &chunk) {
                warn!("cannot spool log chunk {}: {e}; output is lost", self.seq);
                continue;
            }
            self.emitted += chunk.len() as u64;
            self.seq += 1;
            let seq = self.seq;
            self.progress.send_modify(|p| p.produced = seq);
        }
    }
}

impl ConnectionSource for JobManager {
    fn current(&self) -> Option<Connection> {
        self.lock().conn.clone()
    }
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
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

    #[tokio::test]
    async fn the_chunker_keeps_head_and_tail_and_says_what_was_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel(16);
        let (progress, _) = watch::channel(LogProgress::default());
        let task = tokio::spawn(chunk_log(
            rx,
            Masker::new([]),
            dir.path().to_path_buf(),
            progress.clone(),
            1000,
        ));
        for i in 0..30u8 {
            tx.send(vec![b'a' + (i % 26); 100]).await.expect("send");
        }
        drop(tx);
        let chunks = task.await.expect("chunker");
        let mut log = Vec::new();
        for seq in 0..chunks {
            log.extend(std::fs::read(chunk_path(dir.path(), seq)).expect("chunk"));
        }
        let text = String::from_utf8_lossy(&log);
        assert!(text.starts_with(&"a".repeat(100)), "head kept");
        assert!(
            text.contains("[gantry: 2000 bytes were cut from the middle of this log"),
            "{text}"
        );
        assert!(text.ends_with(&"d".repeat(100)), "tail kept: {text}");
        assert_eq!(progress.borrow().produced, chunks);
    }
}
