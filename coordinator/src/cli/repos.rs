//! `gantry repos`: the repositories the coordinator mirrors and builds from. Each
//! command builds one request and prints the answer (`--json` for scripts). An ssh key
//! is read here and sent once, to be sealed on the coordinator; nothing prints it back.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{AddRepo, AdminRequest, RepoAuth};

use crate::base::config;
use crate::cli::client::FETCH_DEADLINE;
use crate::cli::connect::{admin, connect};
use crate::cli::failure::{usage, Failure};
use crate::cli::output;

#[derive(Debug, Subcommand)]
pub enum ReposCommand {
    /// Add a repository: the coordinator mirrors it (fetching it now, so a wrong URL or
    /// credential fails here) and `gantry run --repo NAME` builds its commits.
    Add(Box<AddArgs>),
    /// The repositories.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One repository: its URL, credentials' kind, last fetch and branch heads.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a repository and its mirror (runs made from it are kept).
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The repository's name on the coordinator (letters, digits, `-`, `_`, `.`).
    name: String,
    /// Where to fetch it: https://, ssh:// (or user@host:path), git://, file:// or a path
    /// on the coordinator host.
    #[arg(long)]
    url: String,
    /// The forge hosting it: gitea (or forgejo), gitlab or github.
    #[arg(long)]
    forge: Option<String>,
    /// A private key file for ssh URLs; stored encrypted on the coordinator.
    #[arg(long, value_name = "FILE", conflicts_with = "token_secret")]
    ssh_key: Option<PathBuf>,
    /// The stored secret (`gantry secrets set NAME`) holding an https access token.
    #[arg(long, value_name = "NAME")]
    token_secret: Option<String>,
    /// The pipeline file, read from each commit built [default: gantry.yml].
    #[arg(long, value_name = "PATH")]
    pipeline_file: Option<String>,
    /// Fetch this often and run each branch whose head moved (e.g. 60s, 5m), for forges
    /// that cannot reach the coordinator.
    #[arg(long, value_name = "INTERVAL")]
    poll: Option<String>,
    /// The stored secret (`gantry secrets set NAME`) the forge signs its webhook with;
    /// point the forge's webhook at `https://COORDINATOR/hooks/repos/NAME`.
    #[arg(long, value_name = "NAME")]
    webhook_secret: Option<String>,
    /// Run pull requests from forks, untrusted: a pipeline naming a secret, an
    /// environment or a deployment is refused for them. Refused by default.
    #[arg(long)]
    allow_fork_pull_requests: bool,
    /// The forge's API base for commit statuses (e.g. https://git.lan/api/v1), when it
    /// cannot be derived from --url; statuses need --forge and --token-secret too.
    #[arg(long, value_name = "URL")]
    api_url: Option<String>,
    /// The stored secret holding the forge API token for commit statuses, when it is
    /// not the --token-secret used to fetch (e.g. an ssh or file:// repository).
    #[arg(long, value_name = "NAME")]
    status_token_secret: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn repos(cmd: ReposCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        ReposCommand::Add(args) => return add(*args).await,
        ReposCommand::List { json } => (AdminRequest::ListRepos, json),
        ReposCommand::Show { name, json } => (AdminRequest::ShowRepo { name }, json),
        ReposCommand::Rm { name } => (AdminRequest::RemoveRepo { name }, false),
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

async fn add(args: AddArgs) -> Result<ExitCode, Failure> {
    let auth = match (&args.ssh_key, &args.token_secret) {
        (Some(file), _) => RepoAuth::SshKey(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the ssh key {}", file.display()))
                .map_err(usage)?,
        ),
        (None, Some(name)) => RepoAuth::TokenSecret(name.clone()),
        (None, None) => RepoAuth::None,
    };
    let poll_secs = match &args.poll {
        Some(text) => Some(
            config::parse_duration(text)
                .context("--poll")
                .map_err(usage)?
                .as_secs(),
        ),
        None => None,
    };
    let req = AdminRequest::AddRepo(AddRepo {
        name: args.name,
        url: args.url,
        forge: args.forge,
        auth,
        pipeline_file: args.pipeline_file,
        poll_secs,
        webhook_secret: args.webhook_secret,
        fork_pull_requests: args.allow_fork_pull_requests,
        api_url: args.api_url,
        status_token_secret: args.status_token_secret,
    });
    let mut client = connect().await?;
    let resp = client.request_within(&req, FETCH_DEADLINE).await;
    client.close().await;
    output::print_response(&resp?, args.json)
}
