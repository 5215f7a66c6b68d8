//! Running a job's steps under the shell on this host, or in Docker containers when the
//! job names an image ([`crate::docker`]).
//!
//! Owns: the job's fresh workspace, each step's process (its own process group, so a
//! cancel or timeout reaches every process the step started), the environment a step
//! sees (only the job's declared variables, `GANTRY_*`, and for shell steps `PATH`/`HOME`
//! so tools can be found), and turning exits into a [`JobOutcome`]. Output goes to a
//! [`LogSink`]; what happens to it after that is not this module's business.

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use gantry_protocol::{JobAssignment, JobOutcome, Labels};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

/// Where a step's output goes: raw byte pieces in the order they were read.
pub type LogSink = mpsc::Sender<Vec<u8>>;

/// How long a step's pipes may stay open after its process group was killed.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Why the job is being stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    TimedOut,
}

/// Where a job's steps run.
enum Runner {
    Shell,
    /// In containers of the job's image; `workspace` is the absolute host path that is
    /// bind-mounted into them.
    Docker {
        engine: crate::docker::Engine,
        workspace: PathBuf,
        user: String,
    },
}

/// Runs every step of `job` in `workspace` until one fails, the job is cancelled
/// (`cancel` becomes true) or its timeout passes. A job with an image runs each step in
/// a container of that image (see [`crate::docker`]).
pub async fn run_job(
    job: &JobAssignment,
    workspace: &Path,
    log: &LogSink,
    cancel: watch::Receiver<bool>,
) -> JobOutcome {
    let outcome = run_steps(job, workspace, log, cancel).await;
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
    mut cancel: watch::Receiver<bool>,
) -> JobOutcome {
    // The caller makes the workspace fresh (and may have unpacked the run's source
    // tree into it); this only makes sure it exists.
    if let Err(e) = std::fs::create_dir_all(workspace) {
        return JobOutcome::Error {
            message: format!("cannot create the workspace {}: {e}", workspace.display()),
        };
    }
    let runner = match &job.image {
        None => Runner::Shell,
        Some(image) => {
            let engine = match crate::docker::Engine::prepare(image).await {
                Ok(engine) => engine,
                Err(message) => return JobOutcome::Error { message },
            };
            let workspace = match std::path::absolute(workspace) {
                Ok(path) => path,
                Err(e) => {
                    return JobOutcome::Error {
                        message: format!(
                            "cannot resolve the workspace {}: {e}",
                            workspace.display()
                        ),
                    }
                }
            };
            Runner::Docker {
                engine,
                workspace,
                user: crate::docker::agent_user(),
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(job.timeout_ms);
    let grace = Duration::from_millis(job.kill_grace_ms);
    let total = job.steps.len();
    for (index, step) in job.steps.iter().enumerate() {
        let cwd = match step_dir(workspace, step.working_directory.as_deref()) {
            Ok(dir) => dir,
            Err(message) => return JobOutcome::Error { message },
        };
        let header = format!("\u{25b6} step {}/{total}: {}\n", index + 1, step.name);
        let _ = log.send(header.into_bytes()).await;
        let script = substitute_secrets(&step.run, &job.secrets);
        let exit = match &runner {
            Runner::Shell => {
                let env = step_env(job, &step.env, workspace, index);
                run_step(&script, &cwd, &env, log, deadline, grace, &mut cancel).await
            }
            Runner::Docker {
                engine,
                workspace,
                user,
            } => {
                let spec = crate::docker::StepContainer {
                    job,
                    step_number: index + 1,
                    script,
                    env: gantry_env(job, &step.env, crate::docker::CONTAINER_WORKSPACE, index),
                    host_workspace: workspace.clone(),
                    working_directory: step.working_directory.as_deref(),
                    user: user.clone(),
                };
                engine
                    .run_step(&spec, log, deadline, grace, &mut cancel)
                    .await
            }
        };
        let exit = match exit {
            Ok(exit) => exit,
            Err(message) => return JobOutcome::Error { message },
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

/// How a step's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepExit {
    /// Exit code, or 128 + signal number when killed by a signal.
    Code(i32),
    Stopped(StopReason),
}

async fn run_step(
    script: &str,
    cwd: &Path,
    env: &Labels,
    log: &LogSink,
    deadline: tokio::time::Instant,
    grace: Duration,
    cancel: &mut watch::Receiver<bool>,
) -> Result<StepExit, String> {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-e")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: signals to -pgid reach everything the step starts.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh in {}: {e}", cwd.display()))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or("the step's process has no id")?;
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
        status = child.wait() => {
            let status = status.map_err(|e| format!("waiting for the step failed: {e}"))?;
            Ok(StepExit::Code(exit_code(status)))
        }
        () = tokio::time::sleep_until(deadline) => Err(StopReason::TimedOut),
        () = wait_true(cancel) => Err(StopReason::Cancelled),
    };
    let exit = match stopped {
        Ok(exit) => exit,
        Err(reason) => {
            signal_group(pgid, libc::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
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

/// Copies a pipe into the log in pieces of at most 32 KiB, until end of file.
async fn pump(mut pipe: impl tokio::io::AsyncRead + Unpin, log: LogSink) {
    let mut buf = vec![0u8; 32 * 1024];
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

pub(crate) async fn wait_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        // The sender is gone: nobody can cancel any more.
        std::future::pending::<()>().await;
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Sends `signal` to every process of the group `pgid`; a group that is gone is fine.
#[allow(unsafe_code)]
pub fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory effects; a negative pid addresses the group, and
        // pgid > 1 rules out "every process" (-1) and our own group (0).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// The environment of one shell step: `PATH` and `HOME` from the agent, then
/// [`gantry_env`]'s (which win).
fn step_env(job: &JobAssignment, step_env: &Labels, workspace: &Path, index: usize) -> Labels {
    let mut env = Labels::new();
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_owned(), v);
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.extend(gantry_env(
        job,
        step_env,
        &workspace.display().to_string(),
        index,
    ));
    env
}

/// The environment every step sees, on the host or in a container: `GANTRY_*` (with the
/// workspace as the step sees it), then the job's declared variables, then the step's.
/// Nothing from the agent's own environment: a container gets its `PATH` from its image.
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

/// The step's working directory inside the workspace; never outside it.
fn step_dir(workspace: &Path, working_directory: Option<&str>) -> Result<PathBuf, String> {
    let Some(rel) = working_directory else {
        return Ok(workspace.to_path_buf());
    };
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "working-directory {rel:?} must be a relative path inside the workspace"
        ));
    }
    let dir = workspace.join(rel_path);
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create working-directory {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Removes whatever is at `dir` and creates it empty.
pub fn fresh_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::{JobId, RunId, StepSpec};

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
        let outcome = run_job(job, &dir.path().join("ws"), &tx, cancel_rx).await;
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
