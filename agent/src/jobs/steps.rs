//! Running a job's steps, in order, through the step runner the job calls for: the shell
//! on this host, or Docker containers when the job names an image.
//!
//! Owns: the job's workspace and temporary directory (they exist), each step's working
//! directory (inside the workspace, never outside), the step options (`if` over the
//! steps before, `continue-on-error`, `timeout` within the job's, `shell`), each step's
//! `$GANTRY_OUTPUT` file and what it wrote (`steps.ID.outputs.NAME`, filled into later
//! steps and the job's `outputs:`), the environment a step sees (only the job's declared
//! variables, `GANTRY_*`, secrets and step outputs substituted, and what the runner
//! adds: `PATH`/`HOME` on the shell, nothing in a container), the log's step headers and
//! verdict lines, and turning step exits into a [`JobOutcome`]. How a step's process or
//! container runs is the runner's business (`runner`); what happens to the output after
//! the [`LogSink`] is not this module's.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use gantry_protocol::limits::MAX_OUTPUT_VALUE_BYTES;
use gantry_protocol::{
    ConditionValue, JobAssignment, JobExecution, JobOutcome, Labels, PullPolicy, Shell,
    StepOptions, IMAGE_DIGEST_OUTPUT,
};
use tokio::sync::watch;

use crate::base::mask::Masker;
use crate::base::outputs::{parse_output_file, OutputFileError};
use crate::runner::docker::DockerRunner;
use crate::runner::images::{ImageRequest, PullAuth};
use crate::runner::isolation::Sandbox;
use crate::runner::services::{service_env, ServiceOwner, Services};
use crate::runner::shell::ShellRunner;
use crate::runner::{LogSink, Step, StepExit, StepRunner, Stop, StopReason};

/// Exit code a step gets when its own `timeout` ends it, as `timeout(1)` reports.
pub const STEP_TIMEOUT_EXIT: i32 = 124;

/// What a job's steps came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepsRun {
    pub outcome: JobOutcome,
    /// The job's `outputs:` with their values (masked where a secret was in one);
    /// `None` when the job declares none.
    pub outputs: Option<Labels>,
}

/// Outputs steps wrote, by step id.
type StepOutputs = BTreeMap<String, BTreeMap<String, String>>;

/// Runs the steps of `job` in `workspace`, each when its condition holds over the steps
/// before it, until the job is cancelled (`cancel` becomes true) or its timeout passes,
/// then fills in the job's outputs. A job with an image runs each step in a container
/// of that image. `temp` is the job's temporary directory, outside the workspace; a
/// job with a `sandbox` runs its steps as that user, with its limits. A job with
/// `services:` starts them first (their containers labelled with `agent`, this agent's
/// id), copies their output into the log when it fails, and removes them at the end.
#[allow(clippy::too_many_arguments)]
pub async fn run_job(
    job: &JobAssignment,
    execution: &JobExecution,
    workspace: &Path,
    temp: &Path,
    log: &LogSink,
    cancel: watch::Receiver<bool>,
    sandbox: Option<&Sandbox>,
    agent: &str,
) -> StepsRun {
    let mut written = StepOutputs::new();
    let run = StepLoop {
        job,
        execution,
        workspace,
        temp,
        log,
        cancel,
        deadline: tokio::time::Instant::now() + Duration::from_millis(job.timeout_ms),
        agent,
        services: ServiceSetup::default(),
        owner: sandbox.map(|s| (s.uid, s.gid)),
    };
    let mut digest = None;
    let (outcome, said) = run_steps(run, &mut written, sandbox, &mut digest).await;
    // The coordinator keeps only the outcome's kind: the log is where the reason shows.
    if let (JobOutcome::Error { message }, false) = (&outcome, said) {
        let _ = log.send(format!("\u{2716} {message}\n").into_bytes()).await;
    }
    let mut outputs = if execution.outputs.is_empty() {
        None
    } else {
        Some(job_outputs(&execution.outputs, &written, &job.secrets, log).await)
    };
    if let Some(digest) = digest {
        outputs
            .get_or_insert_with(Labels::new)
            .insert(IMAGE_DIGEST_OUTPUT.to_owned(), digest);
    }
    StepsRun { outcome, outputs }
}

/// The job's outcome, and whether an error's reason is already in the log; `digest`
/// gets the digest of the image the steps ran in, for a coordinator that reads it back.
async fn run_steps(
    run: StepLoop<'_>,
    written: &mut StepOutputs,
    sandbox: Option<&Sandbox>,
    digest: &mut Option<String>,
) -> (JobOutcome, bool) {
    let (workspace, temp) = (run.workspace, run.temp);
    // The caller makes the workspace fresh (and may have unpacked the run's source
    // tree into it); this only makes sure both directories exist.
    for dir in [workspace, temp] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            let message = format!("cannot create {}: {e}", dir.display());
            return (JobOutcome::Error { message }, false);
        }
    }
    if let Some(sandbox) = sandbox {
        // The step writes `$GANTRY_OUTPUT` here as the job's own user.
        if let Err(e) = sandbox.adopt(temp) {
            let message = format!("cannot give {} to uid {}: {e}", temp.display(), sandbox.uid);
            return (JobOutcome::Error { message }, false);
        }
    }
    if run.execution.services.is_empty() {
        return (run.with_runner(written, sandbox, digest).await, false);
    }
    (with_services(run, written, sandbox, digest).await, true)
}

/// Starts the job's services, runs its steps beside them, copies the services' output
/// into the log if the job did not succeed (after an error's reason), and removes them
/// whatever happened.
async fn with_services(
    mut run: StepLoop<'_>,
    written: &mut StepOutputs,
    sandbox: Option<&Sandbox>,
    digest: &mut Option<String>,
) -> JobOutcome {
    let owner = ServiceOwner {
        agent: run.agent.to_owned(),
        job: run.job.job,
        attempt: run.job.attempt,
    };
    let mut services = match Services::connect(owner).await {
        Ok(services) => services,
        Err(e) => {
            return JobOutcome::Error {
                message: e.to_string(),
            }
        }
    };
    let fill = |text: &str| substitute_secrets(text, &run.job.secrets);
    let mut halt = Stop::new(run.deadline, Duration::ZERO, run.cancel.clone());
    let started = tokio::select! {
        started = services.start(&run.execution.services, &fill, run.log) => Ok(started),
        reason = halt.requested() => Err(reason),
    };
    let outcome = match started {
        Ok(Ok(started)) => {
            run.services = ServiceSetup {
                network: services.network(),
                host_env: service_env(&started, false),
                container_env: service_env(&started, true),
            };
            run.with_runner(written, sandbox, digest).await
        }
        Ok(Err(e)) => JobOutcome::Error {
            message: e.to_string(),
        },
        Err(StopReason::Cancelled) => {
            run.note("\u{25a0} cancelled while the services started\n".to_owned())
                .await;
            JobOutcome::Cancelled
        }
        Err(StopReason::TimedOut) => {
            run.note(format!(
                "\u{25a0} timed out after {} ms while the services started\n",
                run.job.timeout_ms
            ))
            .await;
            JobOutcome::TimedOut
        }
    };
    if !matches!(outcome, JobOutcome::Succeeded | JobOutcome::Cancelled) {
        if let JobOutcome::Error { message } = &outcome {
            // Said before the services' output, which explains it.
            run.note(format!("\u{2716} {message}\n")).await;
        }
        services.copy_logs(run.log).await;
    }
    services.remove(run.log).await;
    outcome
}

/// The job's image as the runner gets it: the execution's (with its pull policy and the
/// registry's credentials filled in from the job's secrets), else the assignment's
/// plain name from a coordinator that sends no policy, which is never pulled (as
/// before pulls existed).
fn image_request(job: &JobAssignment, execution: &JobExecution) -> Option<ImageRequest> {
    match (&execution.image, &job.image) {
        (Some(image), _) => Some(ImageRequest {
            name: image.name.clone(),
            pull: image.pull,
            auth: image.credentials.as_ref().map(|c| PullAuth {
                username: substitute_secrets(&c.username, &job.secrets),
                password: job
                    .secrets
                    .get(&c.password_secret)
                    .cloned()
                    .unwrap_or_default(),
            }),
        }),
        (None, Some(name)) => Some(ImageRequest {
            name: name.clone(),
            pull: PullPolicy::Never,
            auth: None,
        }),
        (None, None) => None,
    }
}

/// What a job's services give its steps: the network their containers join and the
/// addresses they reach the services at.
#[derive(Debug, Default)]
struct ServiceSetup {
    network: Option<String>,
    host_env: Labels,
    container_env: Labels,
}

/// One job's steps and what they run with.
struct StepLoop<'a> {
    job: &'a JobAssignment,
    execution: &'a JobExecution,
    workspace: &'a Path,
    temp: &'a Path,
    log: &'a LogSink,
    cancel: watch::Receiver<bool>,
    /// The job's deadline: its timeout from when its steps (or services) began.
    deadline: tokio::time::Instant,
    /// This agent's id, labelled on the job's containers.
    agent: &'a str,
    services: ServiceSetup,
    /// The uid and gid an isolated job's steps run as: they own the files the agent
    /// makes for a step in `temp` (`$GANTRY_OUTPUT`, a command template's script).
    owner: Option<(u32, u32)>,
}

impl StepLoop<'_> {
    /// Gives a file the agent made for a step to the job's own user, when it has one
    /// (the file's directory is the job's, mode 0700).
    fn hand_over(&self, path: &Path) -> std::io::Result<()> {
        match self.owner {
            Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Runs the steps on the shell, or in containers of the job's image.
    async fn with_runner(
        &self,
        written: &mut StepOutputs,
        sandbox: Option<&Sandbox>,
        digest: &mut Option<String>,
    ) -> JobOutcome {
        let (workspace, temp) = (self.workspace, self.temp);
        match image_request(self.job, self.execution) {
            None => {
                self.with(
                    &ShellRunner::new(workspace, temp, sandbox),
                    &self.services.host_env,
                    written,
                )
                .await
            }
            Some(request) => {
                match DockerRunner::prepare(&request, workspace, temp, sandbox, self.log).await {
                    Ok(runner) => {
                        // Only a coordinator that sent the image with its policy
                        // (protocol 3) reads the digest back.
                        if self.execution.image.is_some() {
                            *digest = Some(runner.image_digest().to_owned());
                        }
                        let runner =
                            runner.on_network(self.services.network.as_deref(), self.agent);
                        self.with(&runner, &self.services.container_env, written)
                            .await
                    }
                    Err(e) => JobOutcome::Error {
                        message: e.to_string(),
                    },
                }
            }
        }
    }

    async fn note(&self, line: String) {
        let _ = self.log.send(line.into_bytes()).await;
    }

    /// Runs the steps with `runner`. A failed step (without `continue-on-error`) fails
    /// the job, and later steps run only if their condition says so (`failure()`,
    /// `always()`); the job's outcome names the first failed step. A cancel or the job's
    /// timeout ends the job at once.
    /// `service_env` is where the steps reach the job's services.
    async fn with<R: StepRunner>(
        &self,
        runner: &R,
        service_env: &Labels,
        written: &mut StepOutputs,
    ) -> JobOutcome {
        let job = self.job;
        let job_deadline = self.deadline;
        let grace = Duration::from_millis(job.kill_grace_ms);
        let total = job.steps.len();
        let default = StepOptions::default();
        let (mut all_succeeded, mut any_failed) = (true, false);
        let mut first_failure = None;
        for (index, spec) in job.steps.iter().enumerate() {
            let number = index + 1;
            let options = self.execution.steps.get(index).unwrap_or(&default);
            let known = |value: &ConditionValue| match value {
                ConditionValue::StepOutput { step, name } => {
                    written.get(step).and_then(|o| o.get(name)).cloned()
                }
                _ => None,
            };
            // A name may show earlier steps' outputs (never secrets: the file says so).
            let name = fill_in(&spec.name, &Labels::new(), written);
            if !options
                .condition
                .eval_with_outputs(all_succeeded, any_failed, false, &known)
            {
                self.note(format!(
                    "\u{23ed} step {number}/{total}: {name} skipped: its if: is false\n"
                ))
                .await;
                continue;
            }
            let host_dir = match step_dir(self.workspace, spec.working_directory.as_deref()) {
                Ok(dir) => dir,
                Err(e) => {
                    return JobOutcome::Error {
                        message: e.to_string(),
                    }
                }
            };
            self.note(format!("\u{25b6} step {number}/{total}: {name}\n"))
                .await;
            let fill = |text: &str| fill_in(text, &job.secrets, written);
            let output_name = format!("output-{number}");
            let host_output = self.temp.join(&output_name);
            if let Err(e) =
                std::fs::write(&host_output, b"").and_then(|()| self.hand_over(&host_output))
            {
                return JobOutcome::Error {
                    message: format!("cannot create {}: {e}", host_output.display()),
                };
            }
            let mut env = runner.base_env();
            env.extend(service_env.clone());
            env.extend(gantry_env(
                job,
                &spec.env,
                &runner.workspace(),
                index,
                &fill,
            ));
            env.insert(
                "GANTRY_OUTPUT".into(),
                format!("{}/{output_name}", runner.temp_dir()),
            );
            let command = match command_line(
                &options.shell,
                &spec.run,
                fill(&spec.run),
                self.temp,
                &runner.temp_dir(),
                number,
            ) {
                Ok(command) => command,
                Err(e) => {
                    return JobOutcome::Error {
                        message: e.to_string(),
                    }
                }
            };
            let step_deadline = options.timeout_ms.map_or(job_deadline, |ms| {
                job_deadline.min(tokio::time::Instant::now() + Duration::from_millis(ms))
            });
            let mut halt = Stop::new(step_deadline, grace, self.cancel.clone());
            let step = Step {
                job,
                number,
                command,
                env,
                working_directory: spec.working_directory.as_deref(),
                host_dir,
            };
            let exit = match runner.run(&step, self.log, &mut halt).await {
                Ok(exit) => exit,
                Err(e) => {
                    return JobOutcome::Error {
                        message: e.to_string(),
                    }
                }
            };
            let outputs = read_outputs(&host_output);
            let _ = std::fs::remove_file(&host_output);
            let failed_with = match exit {
                StepExit::Code(code) => {
                    if code != 0 {
                        self.note(format!("\u{2716} step {number} exited with {code}\n"))
                            .await;
                    }
                    let malformed = match outputs {
                        Ok(outputs) => {
                            if let Some(id) = &options.id {
                                written.insert(id.clone(), outputs);
                            }
                            false
                        }
                        Err(e) => {
                            self.note(format!("\u{2716} step {number}: {e}\n")).await;
                            true
                        }
                    };
                    match code {
                        0 if malformed => Some(1),
                        0 => None,
                        code => Some(code),
                    }
                }
                StepExit::Stopped(StopReason::Cancelled) => {
                    self.note("\u{25a0} cancelled\n".to_owned()).await;
                    return JobOutcome::Cancelled;
                }
                StepExit::Stopped(StopReason::TimedOut) if step_deadline < job_deadline => {
                    self.note(format!(
                        "\u{25a0} step {number} timed out after its timeout of {} ms\n",
                        options.timeout_ms.unwrap_or_default()
                    ))
                    .await;
                    Some(STEP_TIMEOUT_EXIT)
                }
                StepExit::Stopped(StopReason::TimedOut) => {
                    self.note(format!("\u{25a0} timed out after {} ms\n", job.timeout_ms))
                        .await;
                    return JobOutcome::TimedOut;
                }
            };
            let Some(code) = failed_with else {
                continue;
            };
            if options.continue_on_error {
                self.note(format!(
                    "\u{2139} step {number} failed with continue-on-error: the job goes on as if it succeeded\n"
                ))
                .await;
                continue;
            }
            all_succeeded = false;
            any_failed = true;
            first_failure.get_or_insert(JobOutcome::Failed {
                exit_code: code,
                step: u32::try_from(index).unwrap_or(u32::MAX),
            });
        }
        first_failure.unwrap_or(JobOutcome::Succeeded)
    }
}

/// The environment every step sees, on the host or in a container: `GANTRY_*` (with the
/// workspace as the step sees it), then the job's declared variables, then the step's,
/// with secrets and step outputs filled in (`fill`). Nothing from the agent's own
/// environment: the runner adds what it must.
fn gantry_env(
    job: &JobAssignment,
    step_env: &Labels,
    workspace: &str,
    index: usize,
    fill: &dyn Fn(&str) -> String,
) -> Labels {
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
        env.insert(k.clone(), fill(v));
    }
    env
}

/// Replaces `${{ secrets.NAME }}` (spaces optional) with the secret's value.
pub fn substitute_secrets(text: &str, secrets: &Labels) -> String {
    fill_in(text, secrets, &StepOutputs::new())
}

/// Replaces `${{ secrets.NAME }}` with the secret's value and `${{ steps.ID.outputs.NAME }}`
/// with what that step wrote (empty if it wrote nothing, as in GitHub Actions); every
/// other reference is left as written.
fn fill_in(text: &str, secrets: &Labels, written: &StepOutputs) -> String {
    gantry_protocol::template::expand(text, |expr| {
        if let Some(name) = expr.strip_prefix("secrets.") {
            return secrets.get(name.trim()).cloned();
        }
        let (step, name) = step_output_reference(expr)?;
        Some(
            written
                .get(step)
                .and_then(|o| o.get(name))
                .cloned()
                .unwrap_or_default(),
        )
    })
}

/// `steps.ID.outputs.NAME` as (ID, NAME).
fn step_output_reference(expr: &str) -> Option<(&str, &str)> {
    let rest = expr.strip_prefix("steps.")?;
    let (step, name) = rest.split_once(".outputs.")?;
    (!step.is_empty() && !name.is_empty() && !name.contains('.')).then_some((step, name))
}

/// Why a step's command line could not be made.
#[derive(Debug, thiserror::Error)]
enum CommandLineError {
    #[error("step {number}: a step with `shell: {template}` runs its script from a file, and a secret must never reach the disk; pass the secret in the step's env: and read the variable instead")]
    SecretInFile { number: usize, template: String },
    #[error("cannot write {}: {source}", file.display())]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// What runs a step's script under its `shell`. The script goes in an argument, never a
/// file, since it may hold secrets (which never reach the disk); only a command
/// template (`{0}` is a file) gets a file, so its script may not name a secret.
fn command_line(
    shell: &Shell,
    written_script: &str,
    script: String,
    temp: &Path,
    seen_temp: &str,
    number: usize,
) -> Result<Vec<String>, CommandLineError> {
    let own = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let mut argv = match shell {
        Shell::Sh => own(&["/bin/sh", "-e", "-c"]),
        Shell::Bash => own(&["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]),
        Shell::Python => own(&["python3", "-c"]),
        Shell::Pwsh => own(&["pwsh", "-NoProfile", "-NonInteractive", "-Command"]),
        Shell::Command(template) => {
            if written_script.contains("${{") && written_script.contains("secrets.") {
                return Err(CommandLineError::SecretInFile {
                    number,
                    template: template.clone(),
                });
            }
            let name = format!("step-{number}");
            let file = temp.join(&name);
            std::fs::write(&file, script)
                .map_err(|source| CommandLineError::Write { file, source })?;
            let seen = format!("{seen_temp}/{name}");
            return Ok(template
                .split_whitespace()
                .map(|arg| arg.replace("{0}", &seen))
                .collect());
        }
    };
    argv.push(script);
    Ok(argv)
}

/// Why a step's outputs could not be taken (the step then fails).
#[derive(Debug, thiserror::Error)]
enum ReadOutputsError {
    #[error("cannot read $GANTRY_OUTPUT: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Refused(#[from] OutputFileError),
}

/// What a step wrote to its `$GANTRY_OUTPUT` file (no more than the limit is read).
fn read_outputs(path: &Path) -> Result<BTreeMap<String, String>, ReadOutputsError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(gantry_protocol::limits::MAX_OUTPUT_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(parse_output_file(&bytes)?)
}

/// The job's `outputs:` filled in from what its steps wrote; a value holding a secret
/// (or an encoded form of one) has it masked, so it never reaches later jobs or
/// listings. A value over the limit is left empty, saying so in the log.
async fn job_outputs(
    declared: &BTreeMap<String, String>,
    written: &StepOutputs,
    secrets: &Labels,
    log: &LogSink,
) -> Labels {
    let mut masker = Masker::new(secrets.values().map(String::as_str));
    let mut outputs = Labels::new();
    for (name, template) in declared {
        let mut value = masker.mask_text(&fill_in(template, secrets, written));
        if value.len() > MAX_OUTPUT_VALUE_BYTES {
            let line = format!(
                "\u{2716} output {name} is {} bytes, over the limit of {MAX_OUTPUT_VALUE_BYTES}: it is left empty\n",
                value.len()
            );
            let _ = log.send(line.into_bytes()).await;
            value.clear();
        }
        outputs.insert(name.clone(), value);
    }
    outputs
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
        let (run, log) = run_with_options(job, &JobExecution::default(), cancel_after).await;
        (run.outcome, log)
    }

    async fn run_with_options(
        job: &JobAssignment,
        execution: &JobExecution,
        cancel_after: Option<Duration>,
    ) -> (StepsRun, String) {
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
        let ws = dir.path().join("ws");
        let temp = dir.path().join("tmp");
        let run = run_job(job, execution, &ws, &temp, &tx, cancel_rx, None, "agent").await;
        drop(tx);
        let mut out = Vec::new();
        while let Some(piece) = rx.recv().await {
            out.extend(piece);
        }
        (run, String::from_utf8_lossy(&out).into_owned())
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

    #[tokio::test]
    async fn conditions_continue_on_error_and_step_timeouts_decide_which_steps_run() {
        use gantry_protocol::StatusExpr;
        let j = job(
            &[
                "echo first",
                "exit 7",
                "echo after-success",
                "echo on-failure",
                "sleep 30",
                "echo always",
            ],
            20_000,
        );
        let execution = JobExecution {
            steps: vec![
                StepOptions::default(),
                StepOptions::default(),
                StepOptions::default(),
                StepOptions {
                    condition: StatusExpr::Failure,
                    ..StepOptions::default()
                },
                StepOptions {
                    condition: StatusExpr::Always,
                    timeout_ms: Some(300),
                    continue_on_error: true,
                    ..StepOptions::default()
                },
                StepOptions {
                    condition: StatusExpr::Always,
                    ..StepOptions::default()
                },
            ],
            ..JobExecution::default()
        };
        let (run, log) = run_with_options(&j, &execution, None).await;
        assert_eq!(
            run.outcome,
            JobOutcome::Failed {
                exit_code: 7,
                step: 1
            },
            "{log}"
        );
        assert!(log.contains("first\n"), "{log}");
        assert!(!log.contains("after-success\n"), "{log}");
        assert!(log.contains("step 3/6: s2 skipped"), "{log}");
        assert!(log.contains("on-failure\n"), "{log}");
        assert!(
            log.contains("step 5 timed out after its timeout of 300 ms"),
            "{log}"
        );
        assert!(log.contains("always\n"), "{log}");
        assert_eq!(run.outputs, None);

        // continue-on-error keeps the job green and later steps see a success.
        let j = job(&["exit 3", "echo next"], 10_000);
        let execution = JobExecution {
            steps: vec![StepOptions {
                continue_on_error: true,
                ..StepOptions::default()
            }],
            ..JobExecution::default()
        };
        let (run, log) = run_with_options(&j, &execution, None).await;
        assert_eq!(run.outcome, JobOutcome::Succeeded, "{log}");
        assert!(log.contains("next\n"), "{log}");
    }

    #[tokio::test]
    async fn step_outputs_reach_later_steps_conditions_and_the_jobs_outputs_masked() {
        use gantry_protocol::{CompareOp, StatusExpr};
        let j = job(
            &[
                "echo version=1.4.2 >> \"$GANTRY_OUTPUT\"; printf 'notes<<EOF\\na\\nb\\nEOF\\n' >> \"$GANTRY_OUTPUT\"; echo \"token=x${{ secrets.TOKEN }}y\" >> \"$GANTRY_OUTPUT\"",
                "echo \"got ${{ steps.v.outputs.version }} and $FROM_ENV\"",
                "echo skipped-by-output",
            ],
            10_000,
        );
        let mut j = j;
        j.steps[1].name = "show ${{ steps.v.outputs.version }}".into();
        j.steps[1]
            .env
            .insert("FROM_ENV".into(), "v${{ steps.v.outputs.version }}".into());
        let execution = JobExecution {
            steps: vec![
                StepOptions {
                    id: Some("v".into()),
                    ..StepOptions::default()
                },
                StepOptions::default(),
                StepOptions {
                    condition: StatusExpr::Compare {
                        left: ConditionValue::StepOutput {
                            step: "v".into(),
                            name: "version".into(),
                        },
                        op: CompareOp::Eq,
                        right: ConditionValue::Text("2.0".into()),
                    },
                    ..StepOptions::default()
                },
            ],
            outputs: BTreeMap::from([
                (
                    "version".to_owned(),
                    "${{ steps.v.outputs.version }}".to_owned(),
                ),
                (
                    "notes".to_owned(),
                    "${{ steps.v.outputs.notes }}".to_owned(),
                ),
                (
                    "token".to_owned(),
                    "${{ steps.v.outputs.token }}".to_owned(),
                ),
                (
                    "missing".to_owned(),
                    "<${{ steps.nope.outputs.x }}>".to_owned(),
                ),
            ]),
            ..JobExecution::default()
        };
        let (run, log) = run_with_options(&j, &execution, None).await;
        assert_eq!(run.outcome, JobOutcome::Succeeded, "{log}");
        assert!(log.contains("got 1.4.2 and v1.4.2\n"), "{log}");
        assert!(log.contains("step 2/3: show 1.4.2\n"), "{log}");
        assert!(log.contains("step 3/3: s2 skipped"), "{log}");
        let outputs = run.outputs.expect("declared outputs");
        assert_eq!(outputs["version"], "1.4.2");
        assert_eq!(outputs["notes"], "a\nb");
        assert_eq!(outputs["token"], "x***y", "a secret in an output is masked");
        assert_eq!(outputs["missing"], "<>");
    }

    #[tokio::test]
    async fn a_malformed_output_file_fails_the_step_naming_the_line() {
        let j = job(&["echo 'no equals sign' >> \"$GANTRY_OUTPUT\""], 10_000);
        let (outcome, log) = run(&j, None).await;
        assert_eq!(
            outcome,
            JobOutcome::Failed {
                exit_code: 1,
                step: 0
            },
            "{log}"
        );
        assert!(
            log.contains("$GANTRY_OUTPUT line 1: expected NAME=VALUE or NAME<<DELIMITER, found `no equals sign`"),
            "{log}"
        );
    }

    #[tokio::test]
    async fn shells_bash_fails_a_pipe_and_a_command_template_gets_a_file() {
        let j = job(
            &["false | true; echo not-reached", "echo from-template"],
            10_000,
        );
        let execution = JobExecution {
            steps: vec![
                StepOptions {
                    shell: Shell::Bash,
                    continue_on_error: true,
                    ..StepOptions::default()
                },
                StepOptions {
                    shell: Shell::Command("/bin/sh -e {0}".into()),
                    ..StepOptions::default()
                },
            ],
            ..JobExecution::default()
        };
        let (run, log) = run_with_options(&j, &execution, None).await;
        assert_eq!(run.outcome, JobOutcome::Succeeded, "{log}");
        assert!(!log.contains("not-reached"), "pipefail: {log}");
        assert!(log.contains("step 1 exited with 1"), "{log}");
        assert!(log.contains("from-template\n"), "{log}");
        // A command template never writes a secret to disk.
        let j = job(&["echo ${{ secrets.TOKEN }}"], 10_000);
        let execution = JobExecution {
            steps: vec![StepOptions {
                shell: Shell::Command("/bin/sh {0}".into()),
                ..StepOptions::default()
            }],
            ..JobExecution::default()
        };
        let (run, log) = run_with_options(&j, &execution, None).await;
        assert!(matches!(run.outcome, JobOutcome::Error { .. }), "{log}");
        assert!(log.contains("a secret must never reach the disk"), "{log}");
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
