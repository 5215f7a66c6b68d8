//! Running steps as processes on this host (`/bin/sh -e -c SCRIPT` unless the step's
//! `shell` says otherwise).
//!
//! Owns each step's process: its own process group (so a cancel or timeout reaches
//! every process the step started, and whatever it left running goes when it ends), its
//! output read from pipes in pieces of at most 32 KiB, and its exit code. The
//! environment is exactly the one the step is given (`env_clear` first). An isolated
//! job's steps run under `gantry-agent job-init` as the job's own user, in a PID
//! namespace that ends with the step ([`super::isolation`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use gantry_protocol::Labels;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::isolation::Sandbox;
use super::{LogSink, Step, StepExit, StepRunner, Stop, DRAIN_DEADLINE};
use crate::base::process::{exit_code, group_of, inherited_env, signal_group};

/// Largest piece of output read from a step's pipe at once.
const PIPE_PIECE: usize = 32 * 1024;

/// Why a shell step could not run.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("cannot start {program} in {}: {source}", dir.display())]
    Spawn {
        program: String,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the step has no command to run")]
    NoCommand,
    #[error("the step's process has no id")]
    NoProcessId,
    #[error("waiting for the step failed: {0}")]
    Wait(std::io::Error),
}

/// Runs a job's steps as processes on this host, in its workspace.
#[derive(Debug, Clone)]
pub struct ShellRunner {
    workspace: PathBuf,
    temp: PathBuf,
    /// The job's own user, when the job is isolated.
    sandbox: Option<Sandbox>,
}

impl ShellRunner {
    pub fn new(workspace: &Path, temp: &Path, sandbox: Option<&Sandbox>) -> Self {
        Self {
            workspace: workspace.to_path_buf(),
            temp: temp.to_path_buf(),
            sandbox: sandbox.cloned(),
        }
    }
}

impl StepRunner for ShellRunner {
    type Error = ShellError;

    fn workspace(&self) -> String {
        self.workspace.display().to_string()
    }

    fn temp_dir(&self) -> String {
        self.temp.display().to_string()
    }

    /// `PATH` and `HOME` from the agent, so tools can be found; an isolated job's own
    /// `HOME` and `TMPDIR` instead of the agent's.
    fn base_env(&self) -> Labels {
        let mut env = inherited_env();
        env.extend(self.sandbox.iter().flat_map(Sandbox::env));
        env
    }

    async fn run(
        &self,
        step: &Step<'_>,
        log: &LogSink,
        halt: &mut Stop,
    ) -> Result<StepExit, ShellError> {
        let (program, args) = step.command.split_first().ok_or(ShellError::NoCommand)?;
        let mut command = match &self.sandbox {
            None => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
            Some(sandbox) => {
                let whole: Vec<&str> = step.command.iter().map(String::as_str).collect();
                let (job_init, job_init_args) = sandbox.wrap(&whole);
                let mut command = Command::new(job_init);
                command.args(job_init_args);
                command
            }
        };
        run_process(&mut command, &step.host_dir, &step.env, log, halt).await
    }
}

async fn run_process(
    command: &mut Command,
    cwd: &Path,
    env: &Labels,
    log: &LogSink,
    halt: &mut Stop,
) -> Result<StepExit, ShellError> {
    command
        .current_dir(cwd)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: signals to -pgid reach everything the step starts.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| ShellError::Spawn {
        program: command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned(),
        dir: cwd.to_path_buf(),
        source,
    })?;
    let pgid = group_of(&child);
    if pgid == 0 {
        return Err(ShellError::NoProcessId);
    }
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, log.clone()))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, log.clone()))),
    ];
    let stopped = tokio::select! {
        status = child.wait() => Ok(StepExit::Code(exit_code(status.map_err(ShellError::Wait)?))),
        reason = halt.requested() => Err(reason),
    };
    let exit = match stopped {
        Ok(exit) => exit,
        Err(reason) => {
            signal_group(pgid, libc::SIGTERM);
            if tokio::time::timeout(halt.grace, child.wait())
                .await
                .is_err()
            {
                signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
            }
            StepExit::Stopped(reason)
        }
    };
    // Whatever the step left running in its group (background jobs, daemons) goes now,
    // so nothing outlives the step and its pipes close.
    signal_group(pgid, libc::SIGKILL);
    for reader in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(DRAIN_DEADLINE, reader).await;
    }
    Ok(exit)
}

/// Copies a pipe into the log in pieces of at most [`PIPE_PIECE`], until end of file.
async fn pump(mut pipe: impl tokio::io::AsyncRead + Unpin, log: LogSink) {
    let mut buf = vec![0u8; PIPE_PIECE];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if log.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}
