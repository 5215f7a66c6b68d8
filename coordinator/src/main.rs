//! `gantry`: the coordinator server and its admin CLI in one binary.
//!
//! This file parses the command line, hands each command to the library
//! (`gantry_coordinator`), and maps failures to exit codes: 0 success, 1 the work
//! failed, 2 usage or input error, 3 cannot reach or authenticate to the coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gantry_coordinator::cli::{
    agents, artifacts, bundle, demo, deploy, init, pipelines, repos, web, Failure,
};
use gantry_coordinator::server::{self, ServerArgs};

#[derive(Debug, Parser)]
#[command(
    name = "gantry",
    version,
    about = "Gantry coordinator and admin CLI: CI/CD and fleet deployments on machines you own"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA, the coordinator certificate and the first admin credentials.
    Init(init::InitArgs),
    /// Run the coordinator.
    Server(ServerArgs),
    /// Join tokens for enrolling agents.
    #[command(subcommand)]
    Token(agents::TokenCommand),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// The coordinator's state at a glance.
    Status(agents::JsonFlag),
    /// The newest entries of the audit log.
    Audit(agents::AuditArgs),
    /// Start a coordinator and three agents in a temporary directory and show them connected.
    Demo(demo::DemoArgs),
    /// Check a pipeline file without running it (no coordinator needed).
    Validate {
        /// Pipeline file.
        #[arg(default_value = gantry_pipeline::DEFAULT_FILE_NAME)]
        file: PathBuf,
    },
    /// Run a pipeline file now.
    Run(pipelines::RunArgs),
    /// Pipeline runs.
    #[command(subcommand)]
    Pipelines(pipelines::PipelinesCommand),
    /// Jobs of runs.
    #[command(subcommand)]
    Jobs(pipelines::JobsCommand),
    /// Show a job's output; --follow keeps showing it live until the job ends.
    Logs {
        /// Job id, RUN.INDEX (e.g. 42.3).
        job: String,
        #[arg(long, short)]
        follow: bool,
        /// Write the log's bytes as stored. Without it, on a terminal, control sequences
        /// other than colours are shown as text (`\x1b]52;...`), so a job cannot drive
        /// the terminal reading its log.
        #[arg(long)]
        raw: bool,
    },
    /// Approve a manual job (`when: manual`) so it runs.
    Approve { job: String },
    /// Secrets given to jobs that reference them as ${{ secrets.NAME }}.
    #[command(subcommand)]
    Secrets(pipelines::SecretsCommand),
    /// Pipelines started by the push webhook and by cron schedules.
    #[command(subcommand)]
    Triggers(pipelines::TriggersCommand),
    /// Files jobs passed on (`artifacts:` in a pipeline).
    #[command(subcommand)]
    Artifacts(artifacts::ArtifactsCommand),
    /// Caches jobs saved (`cache:` in a pipeline).
    #[command(subcommand)]
    Cache(artifacts::CacheCommand),
    /// Expire artifacts, evict caches and delete chunks nothing references, now.
    Gc(artifacts::GcArgs),
    /// Environments: which hosts a deployment targets and what guards it.
    #[command(subcommand)]
    Env(deploy::EnvCommand),
    /// Deployment history: who deployed what, where, when, and how each host fared.
    #[command(subcommand)]
    Deployments(deploy::DeploymentsCommand),
    /// Act on a running deployment: approve, promote a canary, abort.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Put an environment back on an earlier release its hosts still hold.
    Rollback(deploy::RollbackArgs),
    /// Run a command on every matching connected host now.
    Exec(deploy::ExecArgs),
    /// Delivery figures per environment: deployment frequency, lead time, change failure
    /// rate, time to restore.
    Stats(deploy::StatsArgs),
    /// Offline bundles: the agent, the CA, an install script, the unit, maybe a token.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Print the one command that installs, enrolls and starts an agent on a new host.
    #[command(name = "install-command")]
    Installer(bundle::InstallCommandArgs),
    /// Access: dashboard login tokens, and credentials for other admins.
    #[command(subcommand)]
    Admin(web::AdminCommand),
    /// Webhook targets notified of run (and job) events.
    #[command(subcommand)]
    Webhooks(web::WebhooksCommand),
    /// Repositories the coordinator mirrors; `gantry run --repo NAME` builds their commits.
    #[command(subcommand)]
    Repos(repos::ReposCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(failure) => {
            let (code, e) = failure.exit();
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// One line per command, into the library.
async fn run(command: Command) -> Result<ExitCode, Failure> {
    let done = |()| ExitCode::SUCCESS;
    match command {
        Command::Server(args) => server::run(args).await.map(done).map_err(server_failure),
        Command::Init(args) => init::run(&args).map(done),
        Command::Demo(args) => demo::run(args).await,
        Command::Token(cmd) => agents::token(cmd).await,
        Command::Agents(cmd) => agents::agents(cmd).await,
        Command::Status(flag) => agents::status(flag).await,
        Command::Audit(args) => agents::audit(args).await,
        Command::Validate { file } => pipelines::validate(&file),
        Command::Run(args) => pipelines::run(args).await,
        Command::Pipelines(cmd) => pipelines::pipelines(cmd).await,
        Command::Jobs(cmd) => pipelines::jobs(cmd).await,
        Command::Logs { job, follow, raw } => pipelines::logs(&job, follow, raw).await,
        Command::Approve { job } => pipelines::approve(&job).await,
        Command::Secrets(cmd) => pipelines::secrets(cmd).await,
        Command::Triggers(cmd) => pipelines::triggers(cmd).await,
        Command::Artifacts(cmd) => artifacts::artifacts(cmd).await,
        Command::Cache(cmd) => artifacts::cache(cmd).await,
        Command::Gc(args) => artifacts::gc(args).await,
        Command::Env(cmd) => deploy::env(cmd).await,
        Command::Deployments(cmd) => deploy::deployments(cmd).await,
        Command::Deploy(cmd) => deploy::deploy(cmd).await,
        Command::Rollback(args) => deploy::rollback(args).await,
        Command::Exec(args) => deploy::exec(args).await,
        Command::Stats(args) => deploy::stats(args).await,
        Command::Bundle(cmd) => bundle::run(cmd).map(done),
        Command::Installer(args) => bundle::install_command(&args).map(done),
        Command::Admin(cmd) => web::admin_command(cmd).await,
        Command::Webhooks(cmd) => web::webhooks(cmd).await,
        Command::Repos(cmd) => repos::repos(cmd).await,
    }
}

/// A server that did not start or stopped: exit code 2 for its configuration, 1 else.
fn server_failure(e: server::ServeError) -> Failure {
    match e {
        server::ServeError::Setup(e) => Failure::Usage(e),
        server::ServeError::Failed(e) => Failure::Work(e),
    }
}
