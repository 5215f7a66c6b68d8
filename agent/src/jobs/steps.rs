//! Running a job's steps, in order, through the step runner the job calls for: the shell
//! on this host, or Docker containers when the job names an image.
//!
//! Owns: the job's workspace (it exists), each step's working directory (inside the
//! workspace, never outside), the environment a step sees (only the job's declared
//! variables, `GANTRY_*`, secrets substituted, and what the runner adds: `PATH`/`HOME`
//! on the shell, nothing in a container), the log's step headers and verdict lines, and
//! turning step exits into a [`JobOutcome`]. How a step's process or container runs is
//! the runner's business (`runner`); what happens to the output after the [`LogSink`]
//! is not this module's.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use gantry_protocol::{JobAssignment, JobOutcome, Labels};
use tokio::sync::watch;

use crate::runner::docker::DockerRunner;
use crate::runner::isolation::Sandbox;
use crate::runner::shell::ShellRunner;
use crate::runner::{LogSink, Step, StepExit, StepRunner, Stop, StopReason};

/// Runs every step of `job` in `workspace` until one fails, the job is cancelled
/// (`cancel` becomes true) or its timeout passes. A job with an image runs each step in
/// a container of that image; a job with a `sandbox` runs its shell steps as that user.
pub async fn run_job(
    job: &JobAssignment,
    workspace: &Path,
    log: &LogSink,
    cancel: watch::Receiver<bool>,
    sandbox: Option<&Sandbox>,
) -> JobOutcome {
    let outcome = run_steps(job, workspace, log, cancel, sandbox).await;
    // The coordinator keeps only the outcome's kind: the log is where the reason shows.
    if let JobOutcome::Error { message } = &outcome {
        let _ = log.send(format!("\u{2716} {message}\n").into_bytes()).await;
    }
    outcome
}

async fn run_steps(
    job: &JobAssignment,
    workspace: &Path,
    log: &LogSink,
    cancel: watch::Receiver<bool>,
    sandbox: Option<&Sandbox>,
) -> JobOutcome {
    // The caller makes the workspace fresh (and may have unpacked the run's source
    // tree into it); this only makes sure it exists.
    if let Err(e) = std::fs::create_dir_all(workspace) {
        return JobOutcome::Error {
            message: format!("cannot create the workspace {}: {e}", workspace.display()),
        };
    }
    match &job.image {
        None => {
            let runner = ShellRunner::new(workspace, sandbox);
            run_with(&runner, job, workspace, log, cancel).await
        }
        Some(image) => match DockerRunner::prepare(image, workspace, sandbox).await {
            Ok(runner) => run_with(&runner, job, workspace, log, cancel).await,
            Err(e) => JobOutcome::Error {
                message: e.to_string(),
            },
        },
    }
}

/// Runs the steps with `runner`, each after the one before succeeded.
async fn run_with<R: StepRunner>(
    runner: &R,
    job: &JobAssignment,
    workspace: &Path,
    log: &LogSink,
    cancel: watch::Receiver<bool>,
) -> JobOutcome {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(job.timeout_ms);
    let mut halt = Stop::new(deadline, Duration::from_millis(job.kill_grace_ms), cancel);
    let total = job.steps.len();
    for (index, spec) in job.steps.iter().enumerate() {
        let host_dir = match step_dir(workspace, spec.working_directory.as_deref()) {
            Ok(dir) => dir,
            Err(e) => {
                return JobOutcome::Error {
                    message: e.to_string(),
                }
            }
        };
        let header = format!("\u{25b6} step {}/{total}: {}\n", index + 1, spec.name);
        let _ = log.send(header.into_bytes()).await;
        let mut env = runner.base_env();
        env.extend(gantry_env(job, &spec.env, &runner.workspace(), index));
        let step = Step {
            job,
            number: index + 1,
            script: substitute_secrets(&spec.run, &job.secrets),
            env,
            working_directory: spec.working_directory.as_deref(),
            host_dir,
        };
        let exit = match runner.run(&step, log, &mut halt).await {
            Ok(exit) => exit,
            Err(e) => {
                return JobOutcome::Error {
                    message: e.to_string(),
                }
            }
        };
        match exit {
            StepExit::Code(0) => {}
            StepExit::Code(code) => {
                let _ = log
                    .send(format!("\u{2716} step {} exited with {code}\n", index + 1).into_bytes())
                    .await;
                return JobOutcome::Failed {
                    exit_code: code,
                    step: u32::try_from(index).unwrap_or(u32::MAX),
                };
            }
            StepExit::Stopped(StopReason::Cancelled) => {
                let _ = log.send(b"\xe2\x96\xa0 cancelled\n".to_vec()).await;
                return JobOutcome::Cancelled;
            }
            StepExit::Stopped(StopReason::TimedOut) => {
                let _ = log
                    .send(format!("\u{25a0} timed out after {} ms\n", job.timeout_ms).into_bytes())
                    .await;
                return JobOutcome::TimedOut;
            }
        }
    }
    JobOutcome::Succeeded
}

/// The environment every step sees, on the host or in a container: `GANTRY_*` (with the
/// workspace as the step sees it), then the job's declared variables, then the step's.
/// Nothing from the agent's own environment: the runner adds what it must.
fn gantry_env(job: &JobAssignment, step_env: &Labels, workspace: &str, index: usize) -> Labels {
    let mut env = Labels::new();
    env.insert("GANTRY".into(), "true".into());
    env.insert("GANTRY_RUN_ID".into(), job.run.to_string());
    env.insert("GANTRY_JOB_ID".into(), job.job.to_string());
    env.insert("GANTRY_JOB_NAME".into(), job.name.clone());
    env.insert("GANTRY_PIPELINE".into(), job.pipeline.clone());
    env.insert("GANTRY_ATTEMPT".into(), job.attempt.to_string());
    env.insert("GANTRY_STEP".into(), (index + 1).to_string());
    env.insert("GANTRY_WORKSPACE".into(), workspace.to_owned());
    for (k, v) in job.env.iter().chain(step_env) {
        env.insert(k.clone(), substitute_secrets(v, &job.secrets));
    }
    env
}

/// Replaces `${{ secrets.NAME }}` (spaces optional) with the secret's value.
pub fn substitute_secrets(text: &str, secrets: &Labels) -> String {
    gantry_protocol::template::expand(text, |expr| {
        expr.strip_prefix("secrets.")
            .and_then(|name| secrets.get(name.trim()))
            .cloned()
    })
}

/// A step's `working-directory` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StepDirError {
    #[error("working-directory {0:?} must be a relative path inside the workspace")]
    Outside(String),
    #[error("cannot create working-directory {}: {source}", dir.display())]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The step's working directory inside the workspace; never outside it.
fn step_dir(workspace: &Path, working_directory: Option<&str>) -> Result<PathBuf, StepDirError> {
    let Some(rel) = working_directory else {
        return Ok(workspace.to_path_buf());
    };
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(StepDirError::Outside(rel.to_owned()));
    }
    let dir = workspace.join(rel_path);
    std::fs::create_dir_all(&dir).map_err(|source| StepDirError::Create {
        dir: dir.clone(),
        source,
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::{JobId, RunId, StepSpec};
    use tokio::sync::mpsc;

    fn job(steps: &[&str], timeout_ms: u64) -> JobAssignment {
        JobAssignment {
            job: JobId {
                run: RunId(1),
                index: 0,
            },
            attempt: 1,
            run: RunId(1),
            pipeline: "p".into(),
            name: "j".into(),
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepSpec {
                    name: format!("s{i}"),
                    run: (*s).to_owned(),
                    working_directory: None,
                    env: Labels::new(),
                })
                .collect(),
            env: Labels::from([("DECLARED".to_owned(), "yes".to_owned())]),
            timeout_ms,
            kill_grace_ms: 500,
            image: None,
            secrets: Labels::from([("TOKEN".to_owned(), "tok-123".to_owned())]),
            source: None,
            downloads: false,
            artifact: None,
            cache: None,
        }
    }

    async fn run(job: &JobAssignment, cancel_after: Option<Duration>) -> (JobOutcome, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = mpsc::channel(1024);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        if let Some(after) = cancel_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = cancel_tx.send(true);
            });
        } else {
            std::mem::forget(cancel_tx);
        }
        let outcome = run_job(job, &dir.path().join("ws"), &tx, cancel_rx, None).await;
        drop(tx);
        let mut out = Vec::new();
        while let Some(piece) = rx.recv().await {
            out.extend(piece);
        }
        (outcome, String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn steps_run_in_order_with_only_the_declared_environment() {
        // cargo sets CARGO for test processes: the agent's own environment must not leak.
        assert!(std::env::var_os("CARGO").is_some(), "test precondition");
        let j = job(
            &[
                "echo one; echo \"declared=$DECLARED private=${CARGO:-unset} job=$GANTRY_JOB_ID\"",
                "echo two >&2",
            ],
            10_000,
        );
        let (outcome, log) = run(&j, None).await;
        assert_eq!(outcome, JobOutcome::Succeeded, "{log}");
        assert!(
            log.contains("one\ndeclared=yes private=unset job=1.0\n"),
            "{log}"
        );
        assert!(
            log.find("one").expect("one") < log.find("two").expect("two"),
            "{log}"
        );
    }

    #[tokio::test]
    async fn a_failing_step_stops_the_job_with_its_exit_code() {
        let (outcome, log) = run(&job(&["exit 3", "echo never"], 10_000), None).await;
        assert_eq!(
            outcome,
            JobOutcome::Failed {
                exit_code: 3,
                step: 0
            }
        );
        assert!(!log.contains("never"), "{log}");
    }

    #[tokio::test]
    async fn secrets_are_substituted() {
        let (outcome, log) = run(
            &job(&["echo ${{ secrets.TOKEN }}-${{secrets.TOKEN}}"], 10_000),
            None,
        )
        .await;
        assert_eq!(outcome, JobOutcome::Succeeded);
        assert!(log.contains("tok-123-tok-123"), "{log}");
        // Unknown references and unclosed braces are left as written.
        let secrets = Labels::from([("A".to_owned(), "x".to_owned())]);
        assert_eq!(
            substitute_secrets("${{ secrets.B }} ${{ env.X }} ${{ secrets.A", &secrets),
            "${{ secrets.B }} ${{ env.X }} ${{ secrets.A"
        );
    }

    /// Cancel reaches the whole process tree: a background child that ignores nothing
    /// and a grandchild are gone afterwards.
    #[tokio::test]
    async fn cancel_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pids");
        let script = format!(
            "sleep 300 & echo $! > {p}; sh -c 'sleep 300' & echo $! >> {p}; wait",
            p = pidfile.display()
        );
        let (outcome, _) = run(&job(&[&script], 60_000), Some(Duration::from_millis(500))).await;
        assert_eq!(outcome, JobOutcome::Cancelled);
        let pids = std::fs::read_to_string(&pidfile).expect("pids");
        for pid in pids.split_whitespace() {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
                "process {pid} survived the cancel"
            );
        }
    }

    fn is_zombie(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
    }

    #[tokio::test]
    async fn a_step_that_ignores_sigterm_is_killed_after_the_grace() {
        let (outcome, log) = run(&job(&["trap '' TERM; echo started; sleep 300"], 300), None).await;
        assert_eq!(outcome, JobOutcome::TimedOut, "{log}");
        assert!(log.contains("started"), "{log}");
    }

    #[test]
    fn working_directories_stay_inside_the_workspace() {
        let ws = tempfile::tempdir().expect("tempdir");
        assert!(step_dir(ws.path(), Some("a/b")).is_ok());
        for bad in ["../x", "/etc", "a/../../x"] {
            assert!(step_dir(ws.path(), Some(bad)).is_err(), "{bad}");
        }
    }
}
