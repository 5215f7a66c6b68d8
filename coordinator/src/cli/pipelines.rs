//! The admin CLI's pipeline commands: `run`, `validate`, `pipelines`, `jobs`, `logs`,
//! `approve`, `secrets`, `triggers`. Each builds a request, sends it, and prints the answer (or streams a
//! follow). Exit codes: 1 when a followed run fails, 2 for bad input, 3 when the
//! coordinator cannot be reached.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{
    AdminRequest, AdminResponse, FollowEvent, JobId, RunId, RunRepo, StreamOpen, SubmitRun,
};

use crate::base::labels;
use crate::cli::client::{AdminClient, ClientError, FETCH_DEADLINE};
use crate::cli::connect::{admin, connect};
use crate::cli::failure::{usage, Failure};
use crate::cli::output;
use crate::cli::output::terminal::Neutraliser;
use crate::cli::pipeline_files::{self, git};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline file.
    #[arg(default_value = gantry_pipeline::DEFAULT_FILE_NAME)]
    file: PathBuf,
    /// Run a repository's pipeline (see `gantry repos`) at --ref: the coordinator
    /// fetches it and builds the commit with the pipeline file found in it; no local file
    /// or tree is read.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["source", "no_source"])]
    repo: Option<String>,
    /// Branch or tag the run is for [default: the checkout's current branch, else main].
    /// With --repo: a branch, tag, full ref or commit id [default: main, else master].
    #[arg(long = "ref")]
    git_ref: Option<String>,
    /// Input value (repeatable), name=value.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Directory uploaded as the run's workspace [default: the git checkout holding FILE,
    /// else FILE's directory]. In a git checkout only files git tracks or would track
    /// (not ignored) are sent.
    #[arg(long, conflicts_with = "no_source")]
    source: Option<PathBuf>,
    /// Start the jobs in an empty workspace instead of uploading a source tree.
    #[arg(long)]
    no_source: bool,
    /// Show each job's progress until the run ends, then the logs of failed jobs; exit 1
    /// if the run fails.
    #[arg(long, short)]
    follow: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PipelinesCommand {
    /// The newest runs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One run with its jobs.
    Show {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: queued jobs are dropped, running ones are stopped.
    Cancel { run: String },
    /// Run the same pipeline, ref and inputs again, as a new run.
    Retry {
        run: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs of one run, or of the newest runs.
    List {
        #[arg(long)]
        run: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One job.
    Show {
        job: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TriggersCommand {
    /// Register a pipeline file so its `on.push` filters (webhook) and `on.schedule` cron
    /// expressions start runs. Registering a pipeline of the same name again replaces it.
    Add {
        #[arg(default_value = gantry_pipeline::DEFAULT_FILE_NAME)]
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Registered pipelines and their triggers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Unregister a pipeline by name.
    Rm { name: String },
}

pub async fn triggers(cmd: TriggersCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        TriggersCommand::Add { file, json } => {
            let local = pipeline_files::load(&file, &pipeline_files::root_of(&file))?;
            if let Err(errors) = &local.loaded {
                eprintln!("{errors}");
                return Err(usage(anyhow::anyhow!(
                    "{} has {} problem(s); nothing was registered",
                    local.file_name,
                    errors.0.len()
                )));
            }
            local.check_size()?;
            (
                AdminRequest::AddTrigger {
                    file_name: local.file_name,
                    text: local.text,
                },
                json,
            )
        }
        TriggersCommand::List { json } => (AdminRequest::ListTriggers, json),
        TriggersCommand::Rm { name } => (AdminRequest::RemoveTrigger { name }, false),
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Store a secret; its value is read from standard input (a trailing newline is dropped).
    Set {
        name: String,
        /// Only deployments to this environment receive it (no job's steps do).
        #[arg(long = "environment", value_name = "ENV")]
        environment: Option<String>,
    },
    /// Names of the stored secrets.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm { name: String },
}

pub fn job_id(text: &str) -> Result<JobId, Failure> {
    text.parse()
        .map_err(|e| usage(anyhow::anyhow!("{e}; `gantry jobs list` shows job ids")))
}

fn run_id(text: &str) -> Result<RunId, Failure> {
    text.parse().map_err(|e| {
        usage(anyhow::anyhow!(
            "{e}; `gantry pipelines list` shows run numbers"
        ))
    })
}

/// `gantry validate`: parses locally, with the files it includes or calls, and prints
/// every problem with its file, line and column.
pub fn validate(file: &Path) -> Result<ExitCode, Failure> {
    let local = pipeline_files::load(file, &pipeline_files::root_of(file))?;
    let name = local.file_name;
    match local.loaded {
        Ok(p) => {
            println!(
                "{name}: valid, {} jobs: {}",
                p.jobs.len(),
                p.jobs
                    .iter()
                    .map(|j| j.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Err(usage(anyhow::anyhow!(
                "{name} has {} problem(s)",
                errors.0.len()
            )))
        }
    }
}

pub async fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    if let Some(repo) = &args.repo {
        let inputs = labels::parse_labels(&args.inputs)
            .context("--input")
            .map_err(usage)?;
        let request = AdminRequest::RunRepo(RunRepo {
            repo: repo.clone(),
            git_ref: args.git_ref.clone(),
            inputs,
        });
        let mut client = connect().await?;
        let resp = client.request_within(&request, FETCH_DEADLINE).await?;
        return started(client, resp, &args).await;
    }
    let root = match &args.source {
        Some(dir) => dir.clone(),
        None => pipeline_files::root_of(&args.file),
    };
    let local = pipeline_files::load(&args.file, &root)?;
    if let Err(errors) = &local.loaded {
        eprintln!("{errors}");
        return Err(usage(anyhow::anyhow!(
            "{} has {} problem(s); nothing was run",
            local.file_name,
            errors.0.len()
        )));
    }
    local.check_size()?;
    let (file_name, text) = (local.file_name, local.text);
    let inputs = labels::parse_labels(&args.inputs)
        .context("--input")
        .map_err(usage)?;
    let dir = args
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let git_ref = args
        .git_ref
        .clone()
        .or_else(|| git(dir, &["rev-parse", "--abbrev-ref", "HEAD"]))
        .unwrap_or_else(|| "main".into());
    let commit = git(dir, &["rev-parse", "HEAD"]);
    let archive = if args.no_source {
        None
    } else {
        Some(source_archive(&root).map_err(usage)?)
    };
    let mut client = connect().await?;
    let source = match &archive {
        Some(file) => Some(client.upload_source(file.path()).await?),
        None => None,
    };
    let submit = SubmitRun {
        file_name,
        text,
        git_ref,
        commit,
        event: "manual".into(),
        inputs,
        source,
    };
    let resp = client.request(&AdminRequest::SubmitRun(submit)).await?;
    started(client, resp, &args).await
}

/// Tells of a run just started, or follows it with `--follow`.
async fn started(
    mut client: AdminClient,
    resp: AdminResponse,
    args: &RunArgs,
) -> Result<ExitCode, Failure> {
    let AdminResponse::Run(view) = &resp else {
        return Err(Failure::Work(anyhow::anyhow!(
            "unexpected response to a run request"
        )));
    };
    let run = view.run;
    if !args.follow {
        client.close().await;
        if args.json {
            return output::print_response(&resp, true);
        }
        println!(
            "run {run} started ({} jobs); follow it with `gantry pipelines show {run}`",
            view.jobs.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("run {run} of {}: {} jobs", view.pipeline, view.jobs.len());
    let code = follow_run(&mut client, run).await;
    client.close().await;
    code
}

/// Prints each job change of a run until it ends, then the logs of its failed jobs.
async fn follow_run(client: &mut AdminClient, run: RunId) -> Result<ExitCode, Failure> {
    let mut reader = client.follow(&StreamOpen::FollowRun { run }).await?;
    let mut failed = Vec::new();
    let final_state = loop {
        match reader.recv::<FollowEvent>().await {
            Ok(Some(FollowEvent::Job(j))) => {
                let agent = j
                    .agent
                    .as_ref()
                    .map(|a| format!(" on {a}"))
                    .unwrap_or_default();
                let exit = j
                    .exit_code
                    .map(|c| format!(" (exit {c})"))
                    .unwrap_or_default();
                println!(
                    "  {:<8} {:<32} {}{agent}{exit}",
                    j.job.to_string(),
                    j.name,
                    j.state
                );
                if matches!(j.state.as_str(), "failed" | "timed-out" | "lost") {
                    failed.push(j.job);
                }
                if j.state == "awaiting-approval" {
                    println!(
                        "           waiting for approval: `gantry approve {}`",
                        j.job
                    );
                }
            }
            Ok(Some(FollowEvent::End { state })) => break state,
            Ok(Some(FollowEvent::Error(e))) => return Err(usage(anyhow::anyhow!(e.message))),
            Ok(Some(FollowEvent::Log(_))) => {}
            Ok(None) => {
                return Err(Failure::Unreachable(anyhow::anyhow!(
                    "the coordinator ended the follow stream"
                )))
            }
            Err(e) => return Err(Failure::Unreachable(e.into())),
        }
    };
    failed.dedup();
    for job in failed {
        println!("\n--- log of failed job {job} ---");
        print_log(client, job, false, LogOutput::for_stdout(false)).await?;
    }
    println!("\nrun {run} {final_state}");
    Ok(if final_state == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// How a log's bytes reach stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// As stored (`--raw`, or stdout is not a terminal: a file or a pipe).
    Raw,
    /// Control sequences other than colours shown as text (see
    /// [`crate::cli::output::terminal`]): a job's output must not drive its reader's
    /// terminal (write the clipboard, retitle the window, rewrite the screen).
    Neutralised,
}

impl LogOutput {
    /// Neutralised when stdout is a terminal, unless `raw` is asked for.
    pub fn for_stdout(raw: bool) -> Self {
        use std::io::IsTerminal as _;
        if !raw && std::io::stdout().is_terminal() {
            Self::Neutralised
        } else {
            Self::Raw
        }
    }
}

/// Writes a job's log to stdout; with `follow`, until the job ends. Returns its final state.
async fn print_log(
    client: &mut AdminClient,
    job: JobId,
    follow: bool,
    output: LogOutput,
) -> Result<String, Failure> {
    let mut reader = client
        .follow(&StreamOpen::FollowLogs {
            job,
            from_seq: 0,
            follow,
        })
        .await?;
    let mut stdout = std::io::stdout().lock();
    let mut neutraliser = (output == LogOutput::Neutralised).then(Neutraliser::new);
    loop {
        match reader.recv::<FollowEvent>().await {
            Ok(Some(FollowEvent::Log(chunk))) => {
                let _ = match neutraliser.as_mut() {
                    Some(n) => stdout.write_all(&n.push(&chunk.data)),
                    None => stdout.write_all(&chunk.data),
                };
                let _ = stdout.flush();
            }
            Ok(Some(FollowEvent::End { state })) => {
                if let Some(n) = neutraliser.as_mut() {
                    let _ = stdout.write_all(&n.finish());
                    let _ = stdout.flush();
                }
                return Ok(state);
            }
            Ok(Some(FollowEvent::Error(e))) => return Err(ClientError::Rejected(e.message).into()),
            Ok(Some(FollowEvent::Job(_))) => {}
            Ok(None) => {
                return Err(Failure::Unreachable(anyhow::anyhow!(
                    "the coordinator ended the log stream"
                )))
            }
            Err(e) => return Err(Failure::Unreachable(e.into())),
        }
    }
}

/// `gantry logs JOB [--follow] [--raw]`.
pub async fn logs(job: &str, follow: bool, raw: bool) -> Result<ExitCode, Failure> {
    let job = job_id(job)?;
    let mut client = connect().await?;
    let result = print_log(&mut client, job, follow, LogOutput::for_stdout(raw)).await;
    client.close().await;
    result.map(|_| ExitCode::SUCCESS)
}

/// `gantry approve JOB`: lets a manual job (`when: manual`) run.
pub async fn approve(job: &str) -> Result<ExitCode, Failure> {
    let job = job_id(job)?;
    let resp = admin(AdminRequest::Approve { job }).await?;
    output::print_response(&resp, false)
}

pub async fn pipelines(cmd: PipelinesCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        PipelinesCommand::List { limit, json } => (AdminRequest::ListRuns { limit }, json),
        PipelinesCommand::Show { run, json } => {
            (AdminRequest::ShowRun { run: run_id(&run)? }, json)
        }
        PipelinesCommand::Cancel { run } => (AdminRequest::CancelRun { run: run_id(&run)? }, false),
        PipelinesCommand::Retry { run, json } => {
            (AdminRequest::RetryRun { run: run_id(&run)? }, json)
        }
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

pub async fn jobs(cmd: JobsCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        JobsCommand::List { run, limit, json } => (
            AdminRequest::ListJobs {
                run: run.as_deref().map(run_id).transpose()?,
                limit,
            },
            json,
        ),
        JobsCommand::Show { job, json } => return show_job(job_id(&job)?, json).await,
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

/// `gantry jobs show`: the job, and its outputs from coordinators that keep them.
async fn show_job(job: gantry_protocol::JobId, json: bool) -> Result<ExitCode, Failure> {
    let mut client = connect().await?;
    let shown = client.request(&AdminRequest::ShowJob { job }).await;
    let mut outputs = match &shown {
        Ok(_) if client.protocol_version >= gantry_protocol::EXECUTION_VERSION => {
            match client.request(&AdminRequest::ShowJobOutputs { job }).await {
                Ok(AdminResponse::JobOutputs(outputs)) => outputs,
                _ => gantry_protocol::Labels::new(),
            }
        }
        _ => gantry_protocol::Labels::new(),
    };
    // The agent reports the image's digest among the outputs; it is shown apart.
    let image_digest = outputs.remove(gantry_protocol::IMAGE_DIGEST_OUTPUT);
    // Coordinators that do not know the request answer with an error: no report.
    let report = match &shown {
        Ok(_) if client.protocol_version >= gantry_protocol::EXECUTION_VERSION => {
            match client.request(&AdminRequest::ShowJobReport { job }).await {
                Ok(AdminResponse::JobReport(report)) => report,
                _ => None,
            }
        }
        _ => None,
    };
    client.close().await;
    let AdminResponse::Job(view) = shown? else {
        return Err(Failure::Unreachable(anyhow::anyhow!(
            "the coordinator answered `jobs show` with something else"
        )));
    };
    if json {
        let mut value = serde_json::to_value(&view).map_err(|e| Failure::Unreachable(e.into()))?;
        value["outputs"] =
            serde_json::to_value(&outputs).map_err(|e| Failure::Unreachable(e.into()))?;
        value["image_digest"] = image_digest.map_or(serde_json::Value::Null, Into::into);
        value["report"] =
            serde_json::to_value(&report).map_err(|e| Failure::Unreachable(e.into()))?;
        if let Some(coverage) = report.as_ref().and_then(|r| r.coverage) {
            value["report"]["coverage"]["percent"] = coverage.percent().into();
        }
        println!("{value:#}");
    } else {
        output::print_response(&AdminResponse::Job(view), false)?;
        if let Some(digest) = image_digest {
            println!("image digest: {digest}");
        }
        output::print_response(&AdminResponse::JobOutputs(outputs), false)?;
        output::print_response(&AdminResponse::JobReport(report), false)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn secrets(cmd: SecretsCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        SecretsCommand::Set { name, environment } => {
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .context("cannot read the secret from standard input")
                .map_err(usage)?;
            let value = value
                .strip_suffix('\n')
                .map_or(value.as_str(), |v| v.strip_suffix('\r').unwrap_or(v))
                .to_owned();
            (
                AdminRequest::SetSecret {
                    name,
                    value,
                    environment,
                },
                false,
            )
        }
        SecretsCommand::List { json } => (AdminRequest::ListSecrets, json),
        SecretsCommand::Rm { name } => (AdminRequest::RemoveSecret { name }, false),
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

/// Largest source tree `gantry run` uploads.
const MAX_SOURCE_BYTES: u64 = 1024 * 1024 * 1024;

/// Packs the source tree under `root` into a temporary tar file: in a git checkout, the
/// files git tracks or would track (`git ls-files --cached --others --exclude-standard`),
/// else every file below `root` except `.git`. Symlinks are kept as symlinks.
fn source_archive(root: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let files = match std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => out
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
            .collect(),
        _ => walk(root, Path::new(""))?,
    };
    let tmp = tempfile::NamedTempFile::new()
        .context("cannot create a temporary file for the source tree")?;
    let mut builder = tar::Builder::new(tmp.reopen()?);
    builder.follow_symlinks(false);
    let mut total = 0u64;
    for rel in files {
        let full = root.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            continue;
        }; // tracked but deleted
        if !(meta.is_file() || meta.file_type().is_symlink()) {
            continue;
        }
        total += meta.len();
        if total > MAX_SOURCE_BYTES {
            anyhow::bail!(
                "the source tree under {} is over {} MiB; use --source DIR or --no-source",
                root.display(),
                MAX_SOURCE_BYTES >> 20
            );
        }
        builder
            .append_path_with_name(&full, &rel)
            .with_context(|| format!("cannot pack {}", full.display()))?;
    }
    builder
        .into_inner()
        .context("cannot finish the source archive")?
        .sync_all()?;
    Ok(tmp)
}

fn walk(root: &Path, rel: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let dir = root.join(rel);
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        let path = rel.join(&name);
        if entry.file_type()?.is_dir() {
            out.extend(walk(root, &path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}
