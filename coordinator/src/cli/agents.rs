//! The admin CLI's fleet and coordinator commands: `gantry token create`, `gantry agents
//! list|show|revoke|label|upgrade`, `gantry status` and `gantry audit`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{AdminRequest, AgentId};

use crate::base::{config, labels};
use crate::cli::connect::admin;
use crate::cli::deploy::{upgrade_agents, UpgradeArgs};
use crate::cli::failure::{usage, Failure};
use crate::cli::output::print_response;

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// How many entries, newest last.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
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
pub enum AgentsCommand {
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
    Upgrade(UpgradeArgs),
    /// Set labels (key=value) or remove them (key-) on an agent.
    Label {
        id: String,
        #[arg(required = true)]
        changes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `gantry token ...`.
pub async fn token(cmd: TokenCommand) -> Result<ExitCode, Failure> {
    let TokenCommand::Create {
        ttl,
        uses,
        labels,
        json,
    } = cmd;
    let ttl = config::parse_duration(&ttl)
        .context("--ttl")
        .map_err(usage)?;
    let labels = labels::parse_labels(&labels)
        .context("--label")
        .map_err(usage)?;
    let resp = admin(AdminRequest::CreateToken {
        ttl_secs: ttl.as_secs().max(1),
        uses,
        labels,
    })
    .await?;
    print_response(&resp, json)
}

/// `gantry agents ...`.
pub async fn agents(cmd: AgentsCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        AgentsCommand::Upgrade(args) => return upgrade_agents(args).await,
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
                        labels::check_label_key(k).map_err(|e| usage(e.into()))?;
                        remove.push(k.to_owned());
                    }
                    _ => set.push(c),
                }
            }
            let set = labels::parse_labels(&set).map_err(|e| usage(e.into()))?;
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
    print_response(&resp, json)
}

/// `gantry status`.
pub async fn status(flag: JsonFlag) -> Result<ExitCode, Failure> {
    let resp = admin(AdminRequest::Status).await?;
    print_response(&resp, flag.json)
}

/// `gantry audit`.
pub async fn audit(args: AuditArgs) -> Result<ExitCode, Failure> {
    let resp = admin(AdminRequest::Audit { limit: args.limit }).await?;
    print_response(&resp, args.json)
}

fn agent_id(text: &str) -> Result<AgentId, Failure> {
    AgentId::parse(text)
        .map_err(|e| usage(anyhow::anyhow!("{e}; `gantry agents list` shows agent ids")))
}
