//! Step runners: how one step of a job runs, whatever runs it.
//!
//! Owns the contract between a job and what executes its steps ([`StepRunner`]): a
//! step's script, environment and working directory go in ([`Step`]); its output goes to
//! a [`LogSink`] as raw pieces; the job's deadline or a cancel stops it ([`Stop`]:
//! SIGTERM, then SIGKILL once the grace has passed); a [`StepExit`] comes out. The
//! runners are [`shell::ShellRunner`] (a process group on this host, or an isolated
//! job's own user and PID namespace: [`isolation`]) and [`docker::DockerRunner`] (one
//! container per step); a job picks one for all its steps. Beside them, [`services`]
//! starts a job's service containers (on the Docker engine, with the Docker runner's
//! client) and removes them.
//!
//! It must not decide which steps run, in what order, or what their environment holds:
//! that is the job's (`jobs::steps`). Runners never import each other.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use gantry_protocol::{JobAssignment, Labels};
use tokio::sync::{mpsc, watch};

pub mod cgroups;
pub mod docker;
pub mod images;
pub mod isolation;
pub mod services;
pub mod shell;

/// Where a step's output goes: raw byte pieces in the order they were read.
pub type LogSink = mpsc::Sender<Vec<u8>>;

/// How long a step's output may keep draining after the step was stopped: its pipes (or
/// the container's attach stream) can stay open in a process that escaped the group.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Why a step is being stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    TimedOut,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExit {
    /// Exit code, or 128 + signal number when killed by a signal.
    Code(i32),
    Stopped(StopReason),
}

/// One step, ready to run: everything the job decided about it.
#[derive(Debug, Clone)]
pub struct Step<'a> {
    pub job: &'a JobAssignment,
    /// 1-based, as in the log headers and `GANTRY_STEP`.
    pub number: usize,
    /// What runs the step: a program and its arguments, the script among them (after
    /// secret substitution) or in a file they name; `jobs::steps` builds it from the
    /// step's `shell`.
    pub command: Vec<String>,
    /// The whole environment the step sees.
    pub env: Labels,
    /// The step's `working-directory` as written, checked to stay inside the workspace.
    pub working_directory: Option<&'a str>,
    /// That directory on this host, created.
    pub host_dir: PathBuf,
}

/// When a step must stop early: the job's deadline passes, or the job is cancelled.
/// One per job: every step shares the deadline.
#[derive(Debug)]
pub struct Stop {
    deadline: tokio::time::Instant,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    cancel: watch::Receiver<bool>,
}

impl Stop {
    /// `cancel` becomes true when the job is cancelled.
    pub fn new(
        deadline: tokio::time::Instant,
        grace: Duration,
        cancel: watch::Receiver<bool>,
    ) -> Self {
        Self {
            deadline,
            grace,
            cancel,
        }
    }

    /// Resolves when the step must stop, saying why; never, if neither happens. Safe to
    /// drop unfinished (in a `select!`).
    pub async fn requested(&mut self) -> StopReason {
        tokio::select! {
            () = tokio::time::sleep_until(self.deadline) => StopReason::TimedOut,
            () = wait_true(&mut self.cancel) => StopReason::Cancelled,
        }
    }
}

async fn wait_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        // The sender is gone: nobody can cancel any more.
        std::future::pending::<()>().await;
    }
}

/// What runs a job's steps.
pub trait StepRunner: Sync {
    /// Why a step could not be run (not a failing step: that is a [`StepExit::Code`]).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The workspace as the steps see it (`GANTRY_WORKSPACE`).
    fn workspace(&self) -> String;

    /// The job's temporary directory as the steps see it (where `$GANTRY_OUTPUT` files
    /// and script files live, outside the workspace).
    fn temp_dir(&self) -> String;

    /// The environment a step starts from, before the job's own variables.
    fn base_env(&self) -> Labels;

    /// Runs one step until it exits, or until `halt` says it must end (then it is
    /// stopped, and its output drained for at most [`DRAIN_DEADLINE`]).
    fn run(
        &self,
        step: &Step<'_>,
        log: &LogSink,
        halt: &mut Stop,
    ) -> impl Future<Output = Result<StepExit, Self::Error>> + Send;
}
