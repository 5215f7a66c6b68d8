//! `gantry`: the coordinator server and its admin CLI in one binary.
//!
//! This file owns argument parsing, exit codes and output formatting; the work is done
//! in the modules. Exit codes: 0 success, 1 the work failed, 2 usage or input error,
//! 3 cannot reach or authenticate to the coordinator.

mod artifacts;
mod auth;
mod authz;
mod bundle;
mod chunks;
mod cli;
mod cli_artifacts;
mod cli_deploy;
mod cli_web;
mod client;
mod config;
mod dashboard;
mod demo;
mod deployments;
mod distribute;
mod engine;
mod exec;
mod http;
mod http_client;
mod init;
mod logs;
mod metrics;
mod notify;
mod output;
mod ownership;
mod runs;
mod secrets;
mod server;
mod sources;
mod stats;
mod store;
mod triggers;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use gantry_protocol::{AdminRequest, AdminResponse, AgentId};

use crate::client::{AdminClient, ClientError};
use crate::config::{AdminContext, CoordinatorConfig, DataDir};

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
    Token(TokenCommand),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// The coordinator's state at a glance.
    Status(JsonFlag),
    /// The newest entries of the audit log.
    Audit(AuditArgs),
    /// Start a coordinator and three agents in a temporary directory and show them connected.
    Demo(demo::DemoArgs),
    /// Check a pipeline file without running it (no coordinator needed).
    Validate {
        /// Pipeline file.
        #[arg(default_value = gantry_pipeline::DEFAULT_FILE_NAME)]
        file: PathBuf,
    },
    /// Run a pipeline file now.
    Run(cli::RunArgs),
    /// Pipeline runs.
    #[command(subcommand)]
    Pipelines(cli::PipelinesCommand),
    /// Jobs of runs.
    #[command(subcommand)]
    Jobs(cli::JobsCommand),
    /// Show a job's output; --follow keeps showing it live until the job ends.
    Logs {
        /// Job id, RUN.INDEX (e.g. 42.3).
        job: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Approve a manual job (`when: manual`) so it runs.
    Approve { job: String },
    /// Secrets given to jobs that reference them as ${{ secrets.NAME }}.
    #[command(subcommand)]
    Secrets(cli::SecretsCommand),
    /// Pipelines started by the push webhook and by cron schedules.
    #[command(subcommand)]
    Triggers(cli::TriggersCommand),
    /// Files jobs passed on (`artifacts:` in a pipeline).
    #[command(subcommand)]
    Artifacts(cli_artifacts::ArtifactsCommand),
    /// Caches jobs saved (`cache:` in a pipeline).
    #[command(subcommand)]
    Cache(cli_artifacts::CacheCommand),
    /// Expire artifacts, evict caches and delete chunks nothing references, now.
    Gc(cli_artifacts::GcArgs),
    /// Environments: which hosts a deployment targets and what guards it.
    #[command(subcommand)]
    Env(cli_deploy::EnvCommand),
    /// Deployment history: who deployed what, where, when, and how each host fared.
    #[command(subcommand)]
    Deployments(cli_deploy::DeploymentsCommand),
    /// Act on a running deployment: approve, promote a canary, abort.
    #[command(subcommand)]
    Deploy(cli_deploy::DeployCommand),
    /// Put an environment back on an earlier release its hosts still hold.
    Rollback(cli_deploy::RollbackArgs),
    /// Run a command on every matching connected host now.
    Exec(cli_deploy::ExecArgs),
    /// Delivery figures per environment: deployment frequency, lead time, change failure
    /// rate, time to restore.
    Stats(cli_deploy::StatsArgs),
    /// Offline bundles: the agent, the CA, an install script, the unit, maybe a token.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Print the one command that installs, enrolls and starts an agent on a new host.
    #[command(name = "install-command")]
    Installer(bundle::InstallCommandArgs),
    /// Access: dashboard login tokens, and credentials for other admins.
    #[command(subcommand)]
    Admin(cli_web::AdminCommand),
    /// Webhook targets notified of run (and job) events.
    #[command(subcommand)]
    Webhooks(cli_web::WebhooksCommand),
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// Data directory made by `gantry init`.
    #[arg(long, env = "GANTRY_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Configuration file [default: DATA_DIR/coordinator.toml].
    #[arg(long, env = "GANTRY_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// How many entries, newest last.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token; prints the token alone (or JSON with --json).
    Create {
        /// How long the token can be used, e.g. 15m, 2h, 7d.
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Label given to agents enrolled with it (repeatable), key=value.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// List enrolled agents with their state and figures.
    List(JsonFlag),
    /// Show one agent.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its connection closes at once and it can never connect again.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Roll the coordinator's agent binary out to matching agents in waves: each agent
    /// restarts into it once its running jobs end; past the failure budget, the
    /// restarted ones go back. Waits for the end (exit 0 if every agent upgraded).
    Upgrade(cli_deploy::UpgradeArgs),
    /// Set labels (key=value) or remove them (key-) on an agent.
    Label {
        id: String,
        #[arg(required = true)]
        changes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub(crate) enum Failure {
    Work(anyhow::Error),
    Usage(anyhow::Error),
    Unreachable(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable(e) => Self::Unreachable(e),
            ClientError::Rejected(m) => Self::Usage(anyhow::anyhow!(m)),
            ClientError::Failed(m) => Self::Work(anyhow::anyhow!(m)),
        }
    }
}

pub(crate) fn usage(e: anyhow::Error) -> Failure {
    Failure::Usage(e)
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(Failure::Work(e)) => report(&e, 1),
        Err(Failure::Usage(e)) => report(&e, 2),
        Err(Failure::Unreachable(e)) => report(&e, 3),
    }
}

fn report(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(code)
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

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Init(args) => init::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Server(args) => serve(args).await.map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(args).await,
        Command::Token(TokenCommand::Create {
            ttl,
            uses,
            labels,
            json,
        }) => {
            let ttl = config::parse_duration(&ttl)
                .context("--ttl")
                .map_err(usage)?;
            let labels = config::parse_labels(&labels)
                .context("--label")
                .map_err(usage)?;
            let resp = admin(AdminRequest::CreateToken {
                ttl_secs: ttl.as_secs().max(1),
                uses,
                labels,
            })
            .await?;
            output::print_response(&resp, json)
        }
        Command::Agents(cmd) => {
            let (req, json) = match cmd {
                AgentsCommand::Upgrade(args) => return cli_deploy::upgrade_agents(args).await,
                AgentsCommand::List(f) => (AdminRequest::ListAgents, f.json),
                AgentsCommand::Show { id, json } => (
                    AdminRequest::ShowAgent {
                        agent_id: agent_id(&id)?,
                    },
                    json,
                ),
                AgentsCommand::Revoke { id, json } => (
                    AdminRequest::RevokeAgent {
                        agent_id: agent_id(&id)?,
                    },
                    json,
                ),
                AgentsCommand::Label { id, changes, json } => {
                    let mut set = Vec::new();
                    let mut remove = Vec::new();
                    for c in changes {
                        match c.strip_suffix('-') {
                            Some(k) if !c.contains('=') => {
                                config::check_label_key(k).map_err(usage)?;
                                remove.push(k.to_owned());
                            }
                            _ => set.push(c),
                        }
                    }
                    let set = config::parse_labels(&set).map_err(usage)?;
                    (
                        AdminRequest::LabelAgent {
                            agent_id: agent_id(&id)?,
                            set,
                            remove,
                        },
                        json,
                    )
                }
            };
            let resp = admin(req).await?;
            output::print_response(&resp, json)
        }
        Command::Status(f) => {
            let resp = admin(AdminRequest::Status).await?;
            output::print_response(&resp, f.json)
        }
        Command::Validate { file } => cli::validate(&file),
        Command::Run(args) => cli::run(args).await,
        Command::Pipelines(cmd) => cli::pipelines(cmd).await,
        Command::Jobs(cmd) => cli::jobs(cmd).await,
        Command::Logs { job, follow } => cli::logs(&job, follow).await,
        Command::Approve { job } => {
            let job = cli::job_id(&job)?;
            let resp = admin(AdminRequest::Approve { job }).await?;
            output::print_response(&resp, false)
        }
        Command::Secrets(cmd) => cli::secrets(cmd).await,
        Command::Triggers(cmd) => cli::triggers(cmd).await,
        Command::Artifacts(cmd) => cli_artifacts::artifacts(cmd).await,
        Command::Cache(cmd) => cli_artifacts::cache(cmd).await,
        Command::Gc(args) => cli_artifacts::gc(args).await,
        Command::Env(cmd) => cli_deploy::env(cmd).await,
        Command::Deployments(cmd) => cli_deploy::deployments(cmd).await,
        Command::Deploy(cmd) => cli_deploy::deploy(cmd).await,
        Command::Rollback(args) => cli_deploy::rollback(args).await,
        Command::Exec(args) => cli_deploy::exec(args).await,
        Command::Stats(args) => cli_deploy::stats(args).await,
        Command::Bundle(cmd) => bundle::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Installer(args) => bundle::install_command(&args).map(|()| ExitCode::SUCCESS),
        Command::Admin(cmd) => cli_web::admin_command(cmd).await,
        Command::Webhooks(cmd) => cli_web::webhooks(cmd).await,
        Command::Audit(a) => {
            let resp = admin(AdminRequest::Audit { limit: a.limit }).await?;
            output::print_response(&resp, a.json)
        }
    }
}

fn agent_id(text: &str) -> Result<AgentId, Failure> {
    AgentId::parse(text)
        .map_err(|e| usage(anyhow::anyhow!("{e}; `gantry agents list` shows agent ids")))
}

/// Connects with the admin context.
pub(crate) async fn connect() -> Result<AdminClient, Failure> {
    let path = config::context_path().map_err(usage)?;
    let ctx = AdminContext::load(&path).map_err(usage)?;
    Ok(AdminClient::connect(&ctx).await?)
}

/// Connects with the admin context and sends one request.
pub(crate) async fn admin(req: AdminRequest) -> Result<AdminResponse, Failure> {
    let path = config::context_path().map_err(usage)?;
    let ctx = AdminContext::load(&path).map_err(usage)?;
    let mut client = AdminClient::connect(&ctx).await?;
    let resp = client.request(&req).await;
    client.close().await;
    Ok(resp?)
}

async fn serve(args: ServerArgs) -> Result<(), Failure> {
    let data = DataDir(args.data_dir);
    let config_path = args.config.unwrap_or_else(|| data.config());
    let config = CoordinatorConfig::load(&config_path).map_err(usage)?;
    let settings = server::Settings {
        listen: config.listen.clone(),
        advertise: config.advertise.clone(),
        agent_cert_ttl: config.agent_cert_ttl().map_err(usage)?,
        heartbeat_interval: config.heartbeat_interval().map_err(usage)?,
        artifacts: config.artifacts.settings().map_err(usage)?,
        agent_binary: config.agent_binary.as_ref().map(PathBuf::from),
        webhooks: config.webhooks.settings().map_err(usage)?,
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let ca = gantry_certs::CertAuthority::from_pem(
        &read(data.ca_cert()).map_err(usage)?,
        &read(data.ca_key()).map_err(usage)?,
    )
    .context("the CA in the data directory")
    .map_err(usage)?;
    let server_pem = read(data.server_cert()).map_err(usage)?;
    let store = store::Store::open(&data.store()).map_err(|e| Failure::Work(e.into()))?;
    let revoked = gantry_certs::RevocationSet::default();
    let coordinator = server::Coordinator::new(store, ca, revoked.clone(), settings, &data.0)
        .map_err(|e| Failure::Work(anyhow::anyhow!(e)))?;
    let tls = gantry_certs::ServerTls::config(
        coordinator_ca_der(&data).map_err(usage)?.as_slice(),
        &server_pem,
        &server_pem,
        revoked,
    )
    .context("the coordinator certificate")
    .map_err(usage)?;
    let listen: std::net::SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen address {:?} is not ip:port", config.listen))
        .map_err(usage)?;
    // Stable across restarts (see Listener::bind); derived so there is no extra secret file.
    let reset_secret = gantry_certs::sha256(
        &[
            b"gantry stateless reset v1\n".as_slice(),
            read(data.ca_key()).map_err(usage)?.as_bytes(),
        ]
        .concat(),
    );
    let listener = gantry_transport::Listener::bind(listen, tls, &reset_secret)
        .map_err(|e| Failure::Work(e.into()))?;
    let bound = listener.local_addr().map_err(|e| Failure::Work(e.into()))?;
    tracing::info!(address = %bound, advertise = %config.advertise, "gantry server listening (ALPN gantry/1)");
    println!("gantry server listening on {bound}");
    let coordinator = Arc::new(coordinator);
    let http = match &config.http_listen {
        Some(addr) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .with_context(|| format!("http_listen {addr:?} is not ip:port"))
                .map_err(usage)?;
            let uses_tls = distribute::http_uses_tls(&config, addr).map_err(usage)?;
            let tls = if uses_tls {
                let ca_der = coordinator_ca_der(&data).map_err(usage)?;
                let tls = gantry_certs::ServerTls::https(&ca_der, &server_pem, &server_pem)
                    .context("the coordinator certificate, for the HTTP side")
                    .map_err(usage)?;
                Some(Arc::new(tls))
            } else {
                None
            };
            let dist = distribute::Distribution::new(&config, &data, uses_tls).map_err(usage)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))
                .map_err(Failure::Work)?;
            let scheme = if uses_tls { "https" } else { "http" };
            println!("gantry http listening on {addr} ({scheme})");
            Some(tokio::spawn(http::serve(
                coordinator.clone(),
                listener,
                tls,
                Arc::new(dist),
            )))
        }
        None => None,
    };
    let schedules = tokio::spawn(triggers::schedule_loop(coordinator.clone()));
    let collector = tokio::spawn(coordinator.artifacts.clone().collect_periodically());
    coordinator.serve(listener, shutdown_signal()).await;
    schedules.abort();
    collector.abort();
    if let Some(h) = http {
        h.abort();
    }
    Ok(())
}

fn coordinator_ca_der(data: &DataDir) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read_to_string(data.ca_cert())
        .with_context(|| format!("cannot read {}", data.ca_cert().display()))?;
    Ok(gantry_certs::pem_to_der(&pem)?)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    } else {
        tracing::warn!("cannot install signal handlers; stop the server with SIGKILL");
        std::future::pending::<()>().await;
    }
}
