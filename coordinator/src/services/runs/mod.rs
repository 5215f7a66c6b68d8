//! Pipeline runs: submitting them (`gantry run`, triggers, retries), listing, showing,
//! cancelling and approving their jobs, following their logs and states live, and the
//! agents' side (job log uploads, source tree fetches).
//!
//! Owns the checks made before anything is stored (the pipeline parses, its inputs and
//! secrets exist, an approval is for a job that waits for one) and the rule that an
//! agent may upload logs and fetch sources only for attempts handed to it
//! (`services::holds`). Scheduling itself is the engine's; storage is the store's and
//! the log store's.
//!
//! - `submit.rs`: validate, submit, retry;
//! - `control.rs`: listings, cancel, approve;
//! - `follow.rs`: follow streams, to the CLI (QUIC) and the dashboard (Server-Sent Events);
//! - `ingest.rs`: what agents send and fetch for an attempt.

pub mod control;
pub mod follow;
pub mod ingest;
pub mod submit;

use std::sync::Arc;

use gantry_protocol::{AdminErrorKind, JobId, JobView, RunId, RunView};

use crate::base::disk::{DiskSpace, LowSpace};
use crate::base::error::AdminFailure;
use crate::base::logs::{LogError, LogStore};
use crate::base::metrics::Metrics;
use crate::base::sources::SourceStore;
use crate::services::deployments::DeployError;
use crate::services::engine::Engine;
use crate::services::notify::Notifier;
use crate::store::{JobRecord, RunRecord, Store, StoreError};

/// Most runs or jobs one listing returns.
const MAX_LIST: u32 = 1000;

/// Why a run request failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Pipeline(#[from] gantry_pipeline::Errors),
    #[error("no run {0}; `gantry pipelines list` shows the runs")]
    NoRun(RunId),
    #[error("no job {0}; `gantry jobs list` shows the jobs")]
    NoJob(JobId),
    #[error("run {run} already ended ({state})")]
    Ended { run: RunId, state: String },
    #[error("job {job} ({name}) is {state}, not awaiting approval")]
    NotAwaitingApproval {
        job: JobId,
        name: String,
        state: String,
    },
    #[error("input {name:?} is not declared by the pipeline (declared: {declared:?}); declare it under on.inputs")]
    UndeclaredInput { name: String, declared: Vec<String> },
    #[error(
        "source tree {0} was never uploaded (or is malformed); upload it again with `gantry run`"
    )]
    NoSource(String),
    #[error("job {job:?} uses secret {secret}, which is not set; set it with `gantry secrets set {secret}`")]
    UnsetSecret { job: String, secret: String },
    #[error("job {job:?} uses secret {secret}, which is scoped to environment {scope}: only a job deploying to {scope} receives it")]
    ScopedSecret {
        job: String,
        secret: String,
        scope: String,
    },
    #[error("cannot create the pipeline's environments: {0}")]
    Environments(#[source] DeployError),
    /// A job's log cannot be opened (told to a follower).
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory is at or under its watermark: no new runs.
    #[error(transparent)]
    LowSpace(#[from] LowSpace),
}

impl AdminFailure for RunError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::NoRun(_) | Self::NoJob(_) => AdminErrorKind::NotFound,
            Self::Environments(_) | Self::Store(_) | Self::LowSpace(_) => AdminErrorKind::Internal,
            // A log that cannot be opened included, as a follower has always been told it.
            _ => AdminErrorKind::InvalidInput,
        }
    }
}

/// The runs service; one per coordinator.
#[derive(Debug)]
pub struct Runs {
    store: Arc<Store>,
    engine: Engine,
    logs: Arc<LogStore>,
    sources: Arc<SourceStore>,
    metrics: Arc<Metrics>,
    /// Runs started go out as notifications.
    notifier: Arc<Notifier>,
    /// New runs are refused while the data directory is low on space.
    disk: Arc<DiskSpace>,
}

impl Runs {
    pub fn new(
        store: Arc<Store>,
        engine: Engine,
        logs: Arc<LogStore>,
        sources: Arc<SourceStore>,
        metrics: Arc<Metrics>,
        notifier: Arc<Notifier>,
        disk: Arc<DiskSpace>,
    ) -> Self {
        Self {
            store,
            engine,
            logs,
            sources,
            metrics,
            notifier,
            disk,
        }
    }

    fn find_run(&self, run: RunId) -> Result<RunRecord, RunError> {
        self.store.run(run)?.ok_or(RunError::NoRun(run))
    }

    fn find_job(&self, job: JobId) -> Result<JobRecord, RunError> {
        self.store.job(job)?.ok_or(RunError::NoJob(job))
    }

    fn run_view(&self, r: RunRecord) -> Result<RunView, RunError> {
        let jobs = self.store.jobs_of(r.run)?;
        Ok(self.views(r, jobs))
    }

    fn views(&self, r: RunRecord, jobs: Vec<JobRecord>) -> RunView {
        RunView {
            run: r.run,
            pipeline: r.pipeline,
            state: r.state.to_string(),
            git_ref: r.git_ref,
            commit: r.commit,
            event: r.event,
            inputs: r.inputs,
            created_at: r.created_at,
            finished_at: r.finished_at,
            created_by: r.created_by,
            jobs: jobs.into_iter().map(|j| self.job_view(j)).collect(),
        }
    }

    /// A job as admins see it, with the size of its current attempt's log and whether
    /// part of it could not be stored (marked, and not every chunk its agent reported is
    /// stored yet: the resend may have got through before its stream ended).
    pub fn job_view(&self, j: JobRecord) -> JobView {
        let log = (j.attempt > 0 && self.logs.exists(j.job, j.attempt))
            .then(|| self.logs.open(j.job, j.attempt).ok())
            .flatten();
        let log_bytes = log.as_ref().map_or(0, |l| l.bytes());
        let stored = log.as_ref().map_or(0, |l| l.next_seq());
        let log_incomplete = j.attempt > 0
            && self.logs.is_incomplete(j.job, j.attempt)
            && j.log_chunks.is_none_or(|n| stored < n);
        JobView {
            job: j.job,
            name: j.name,
            needs: j.needs,
            state: j.state.to_string(),
            attempt: j.attempt,
            agent: j.agent,
            exit_code: j.exit_code,
            started_at: j.started_at,
            finished_at: j.finished_at,
            log_bytes,
            log_incomplete,
        }
    }
}
