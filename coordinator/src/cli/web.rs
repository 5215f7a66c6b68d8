//! The admin CLI's commands for the HTTP side's users and notifications:
//! `gantry admin token` (dashboard login tokens) and `gantry webhooks add|list|rm`, and
//! how their answers are printed.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{AdminRequest, AdminResponse, Role, UnixMillis, WebhookFormat};

use crate::base::config;
use crate::cli::connect::admin;
use crate::cli::failure::{usage, Failure};
use crate::cli::output;
use crate::cli::output::{human_duration, rfc3339};

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
        AdminCommand::Add { name, output } => {
            return crate::cli::deploy::add_admin(&name, &output).await
        }
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

/// The JSON of this module's responses (`None` for others).
pub fn json(resp: &AdminResponse) -> Option<Result<serde_json::Value, serde_json::Error>> {
    Some(match resp {
        AdminResponse::LoginTokenCreated(t) => serde_json::to_value(t),
        AdminResponse::LoginTokens(t) => serde_json::to_value(t),
        AdminResponse::WebhookAdded(w) => serde_json::to_value(w),
        AdminResponse::Webhooks(w) => serde_json::to_value(w),
        _ => return None,
    })
}

/// The text of this module's responses (`None` for others).
pub fn text(resp: &AdminResponse, now: UnixMillis) -> Option<String> {
    Some(match resp {
        AdminResponse::LoginTokenCreated(t) => {
            eprintln!(
                "login token {} for {} ({}), expires {}; it is shown only now: paste it into the dashboard's login page",
                t.id,
                t.name,
                t.role,
                rfc3339(t.expires_at)
            );
            format!("{}\n", t.token)
        }
        AdminResponse::LoginTokens(tokens) => {
            let mut rows = vec![["ID", "NAME", "ROLE", "CREATED BY", "EXPIRES", "STATE"]
                .map(str::to_owned)
                .to_vec()];
            for t in tokens {
                let state = match t.revoked_at {
                    Some(at) => format!("revoked {}", rfc3339(at)),
                    None if t.expires_at <= now => "expired".into(),
                    None => format!("valid for {}", human_duration(t.expires_at.millis_since(now))),
                };
                rows.push(vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.role.to_string(),
                    t.created_by.clone(),
                    rfc3339(t.expires_at),
                    state,
                ]);
            }
            output::table(&rows)
        }
        AdminResponse::WebhookAdded(w) => format!(
            "webhook {} added: {} ({})\nsecret: {}\nThe secret is shown only now. Receivers check `X-Gantry-Signature: sha256=<hex>`, the HMAC-SHA256 of the body keyed with it.\n",
            w.webhook.id,
            w.webhook.url,
            w.webhook.format.as_str(),
            w.secret
        ),
        AdminResponse::Webhooks(hooks) => {
            let mut rows = vec![["ID", "FORMAT", "EVENTS", "URL", "LAST DELIVERY"]
                .map(str::to_owned)
                .to_vec()];
            for w in hooks {
                rows.push(vec![
                    w.id.to_string(),
                    w.format.as_str().to_owned(),
                    if w.events.is_empty() {
                        "all".into()
                    } else {
                        w.events.join(",")
                    },
                    w.url.clone(),
                    w.deliveries.last().map_or_else(
                        || "-".into(),
                        |d| {
                            format!(
                                "{} ({} ago)",
                                d.outcome,
                                human_duration(now.millis_since(d.at))
                            )
                        },
                    ),
                ]);
            }
            let mut out = output::table(&rows);
            for w in hooks.iter().filter(|w| !w.deliveries.is_empty()) {
                let _ = write!(out, "\nwebhook {} deliveries (newest last):\n", w.id);
                for d in &w.deliveries {
                    let _ = writeln!(
                        out,
                        "  {}  {:<13} attempt {}  {:<9} {:>4}  {:>6}  {}",
                        rfc3339(d.at),
                        d.event,
                        d.attempt,
                        d.outcome,
                        d.status.map_or_else(|| "-".into(), |s| s.to_string()),
                        human_duration(d.duration_ms),
                        d.error.as_deref().unwrap_or("")
                    );
                }
            }
            out
        }
        _ => return None,
    })
}
