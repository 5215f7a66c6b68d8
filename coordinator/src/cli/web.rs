//! The admin CLI's commands for the HTTP side's users and notifications:
//! `gantry admin token` (dashboard login tokens) and `gantry webhooks add|list|rm`, and
//! how their answers are printed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{AdminRequest, AdminResponse, Role, WebhookFormat};

use crate::base::config;
use crate::cli::connect::admin;
use crate::cli::context;
use crate::cli::failure::{usage, Failure};
use crate::cli::output;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Issue a dashboard login token (printed once), or list or revoke them.
    Token(TokenArgs),
    /// Issue credentials for another admin (a person who may approve deployments):
    /// writes ca.pem, admin.pem and context.toml into DIR.
    Add {
        name: String,
        #[arg(long, short = 'o', value_name = "DIR")]
        output: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: Option<TokenCommand>,
    /// What the token may do: viewer (read only), operator (also retry, cancel,
    /// approve) or admin.
    #[arg(long)]
    role: Option<String>,
    /// How long the token works, e.g. 12h, 30d (at most 365d).
    #[arg(long, default_value = "30d")]
    ttl: String,
    /// Who the token is for; shown in the dashboard and the audit log [default: the role].
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Login tokens with their role, expiry and revocation (never the secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a login token: its browser sessions end at their next request.
    Revoke {
        /// Token id, lt-... (from `gantry admin token list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Add a target notified of events; prints the secret that signs its deliveries once.
    Add {
        /// http:// (a receiver on your network) or https:// URL.
        url: String,
        /// Body shape: json (generic) or slack (Slack-compatible `text` and `blocks`).
        #[arg(long, default_value = "json")]
        format: String,
        /// Comma-separated event kinds: run.started, run.finished, job.failed [default: all].
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// PEM file of the CA that signed the receiver's certificate (a private CA),
        /// instead of the system's CA bundle.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Targets with their newest delivery results.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a target by number.
    Rm { id: u64 },
}

pub async fn admin_command(cmd: AdminCommand) -> Result<ExitCode, Failure> {
    let args = match cmd {
        AdminCommand::Token(args) => args,
        AdminCommand::Add { name, output } => return add_admin(&name, &output).await,
    };
    let (req, json) = match args.command {
        Some(TokenCommand::List { json }) => (AdminRequest::ListLoginTokens, json),
        Some(TokenCommand::Revoke { id }) => (AdminRequest::RevokeLoginToken { id }, false),
        None => {
            let role: Role = args
                .role
                .as_deref()
                .ok_or_else(|| {
                    usage(anyhow::anyhow!(
                        "--role is required: viewer, operator or admin"
                    ))
                })?
                .parse()
                .map_err(|e: String| usage(anyhow::anyhow!(e)))?;
            let ttl = config::parse_duration(&args.ttl)
                .context("--ttl")
                .map_err(usage)?;
            let name = args.name.unwrap_or_else(|| role.as_str().to_owned());
            (
                AdminRequest::CreateLoginToken {
                    name,
                    role,
                    ttl_secs: ttl.as_secs().max(1),
                },
                args.json,
            )
        }
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

pub async fn webhooks(cmd: WebhooksCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        WebhooksCommand::Add {
            url,
            format,
            events,
            ca,
            json,
        } => {
            let format: WebhookFormat = format
                .parse()
                .map_err(|e: String| usage(anyhow::anyhow!(e)))?;
            let ca_pem = match ca {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read the CA file {}", path.display()))
                        .map_err(usage)?,
                ),
                None => None,
            };
            let events = events
                .into_iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            (
                AdminRequest::AddWebhook {
                    url,
                    format,
                    events,
                    ca_pem,
                },
                json,
            )
        }
        WebhooksCommand::List { json } => (AdminRequest::ListWebhooks, json),
        WebhooksCommand::Rm { id } => (AdminRequest::RemoveWebhook { id }, false),
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

/// `gantry admin add`: the key is made here and never leaves this machine; the
/// coordinator signs its CSR.
pub async fn add_admin(name: &str, output: &std::path::Path) -> Result<ExitCode, Failure> {
    let (name, output) = (name.to_owned(), output.to_path_buf());
    if !gantry_certs::identity::valid_admin_name(&name) {
        return Err(usage(anyhow::anyhow!(
            "invalid admin name {name:?}: use 1 to 64 of a-z 0-9 . _ -"
        )));
    }
    let context =
        context::AdminContext::read(&context::context_path().map_err(usage)?).map_err(usage)?;
    if output.join("context.toml").exists() {
        return Err(usage(anyhow::anyhow!(
            "{} already holds a context.toml; choose another directory",
            output.display()
        )));
    }
    let key = gantry_certs::generate_key_and_csr()
        .map_err(|e| Failure::Work(anyhow::anyhow!("cannot make a key: {e}")))?;
    let resp = admin(AdminRequest::IssueAdmin {
        name: name.clone(),
        csr_der: key.csr_der,
    })
    .await?;
    let AdminResponse::AdminIssued {
        certificate_pem,
        ca_certificate_pem,
    } = resp
    else {
        return output::print_response(&resp, false);
    };
    std::fs::create_dir_all(&output)
        .with_context(|| format!("cannot create {}", output.display()))
        .map_err(Failure::Work)?;
    let write = |file: &str, text: &str, private: bool| {
        let path = output.join(file);
        let r = if private {
            gantry_certs::keyfile::write_private(&path, text.as_bytes())
        } else {
            gantry_certs::keyfile::write_public(&path, text.as_bytes())
        };
        r.with_context(|| format!("cannot write {}", path.display()))
            .map_err(Failure::Work)
    };
    write("ca.pem", &ca_certificate_pem, false)?;
    write(
        "admin.pem",
        &format!("{certificate_pem}{}", key.key_pem),
        true,
    )?;
    let ctx = context::AdminContext {
        address: context.address,
        ca: "ca.pem".into(),
        credentials: "admin.pem".into(),
    };
    write(
        "context.toml",
        &toml::to_string(&ctx).map_err(|e| Failure::Work(e.into()))?,
        false,
    )?;
    println!("admin {name}: credentials in {}", output.display());
    println!(
        "use them with: GANTRY_CONFIG={} gantry ...",
        output.join("context.toml").display()
    );
    Ok(ExitCode::SUCCESS)
}
