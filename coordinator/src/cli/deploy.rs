//! The deployment commands of the admin CLI: `gantry env`, `gantry deployments`,
//! `gantry deploy approve|promote|abort`, `gantry rollback`, `gantry exec` and
//! `gantry admin add`.

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{
    AdminRequest, AdminResponse, AgentId, DeploymentView, ExecEvent, ExecRequest, RollbackRequest,
    StreamOpen,
};

use crate::base::{config, labels};
use crate::cli::connect::{admin, connect};
use crate::cli::failure::{usage, Failure};
use crate::cli::output::{human_duration, table};

/// Longest `gantry rollback` waits for the rollback to end before it says so.
const ROLLBACK_WAIT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Args)]
pub struct EnvRules {
    /// Labels a host must carry to be a target: key=value, comma-separated or repeated.
    #[arg(long, value_name = "KEY=VALUE,...", required = true)]
    select: Vec<String>,
    /// Distinct people (never the one who started it) who must approve a deployment.
    #[arg(long, default_value_t = 0)]
    approvals: u32,
    /// Time a deployment waits once approved before it starts, e.g. 10m.
    #[arg(long, value_name = "DURATION")]
    wait: Option<String>,
    /// Branches allowed to deploy here (glob, repeatable); any branch if none.
    #[arg(long = "branch", value_name = "GLOB")]
    branches: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create an environment: which hosts it targets and what guards it.
    Create {
        name: String,
        #[command(flatten)]
        rules: EnvRules,
    },
    /// Replace an environment's rules (its history and epoch are kept).
    Update {
        name: String,
        #[command(flatten)]
        rules: EnvRules,
    },
    /// Environments, their hosts and current releases.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One environment: rules, hosts, current release and history.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeploymentsCommand {
    /// Deployments, newest first.
    List {
        /// Only deployments to this environment.
        #[arg(long = "env", value_name = "ENV")]
        environment: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One deployment: who, what, when, every host's outcome and timings, and its log.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Approve a deployment waiting for approvals (one you did not start).
    Approve {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Go on from a canary step that waits for a person.
    Promote {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Stop a deployment; every host it switched goes back to its previous release.
    Abort {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    environment: String,
    /// Release id (or version) to go back to [default: the one before the current].
    #[arg(long, value_name = "RELEASE")]
    to: Option<String>,
    /// Hosts switched at once [default: all].
    #[arg(long, default_value_t = 0)]
    parallel: u32,
    /// Return once the rollback has started instead of waiting for it to end.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Labels a host must carry: key=value, comma-separated or repeated [default: every
    /// connected host].
    #[arg(long, value_name = "KEY=VALUE,...")]
    select: Vec<String>,
    /// Hosts running the command at once [default: all].
    #[arg(long, default_value_t = 0)]
    parallel: u32,
    /// Longest the command may run on a host, e.g. 30s.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    timeout: String,
    /// The command, run with /bin/sh -c on each host.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The window, back from now, e.g. 7d.
    #[arg(long, default_value = "30d", value_name = "DURATION")]
    since: String,
    /// Only this environment.
    #[arg(long = "env", value_name = "ENV")]
    environment: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn stats(args: StatsArgs) -> Result<ExitCode, Failure> {
    let since = config::parse_duration(&args.since)
        .context("--since")
        .map_err(usage)?;
    let resp = admin(AdminRequest::Stats {
        since_ms: u64::try_from(since.as_millis()).unwrap_or(u64::MAX),
        environment: args.environment,
    })
    .await?;
    print(&resp, args.json)
}

fn selector(pairs: &[String]) -> Result<gantry_protocol::Labels, Failure> {
    let split: Vec<String> = pairs
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    labels::parse_labels(&split)
        .context("--select")
        .map_err(usage)
}

pub async fn env(cmd: EnvCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        EnvCommand::Create { name, rules } => (put_environment(name, &rules, false)?, rules.json),
        EnvCommand::Update { name, rules } => (put_environment(name, &rules, true)?, rules.json),
        EnvCommand::List { json } => (AdminRequest::ListEnvironments, json),
        EnvCommand::Show { name, json } => (AdminRequest::ShowEnvironment { name }, json),
    };
    print(&admin(req).await?, json)
}

fn put_environment(name: String, rules: &EnvRules, replace: bool) -> Result<AdminRequest, Failure> {
    let wait_ms = match &rules.wait {
        Some(w) => u64::try_from(
            config::parse_duration(w)
                .context("--wait")
                .map_err(usage)?
                .as_millis(),
        )
        .unwrap_or(u64::MAX),
        None => 0,
    };
    Ok(AdminRequest::PutEnvironment {
        name,
        select: selector(&rules.select)?,
        approvals: rules.approvals,
        wait_ms,
        branches: rules.branches.clone(),
        replace,
    })
}

pub async fn deployments(cmd: DeploymentsCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        DeploymentsCommand::List {
            environment,
            limit,
            json,
        } => (AdminRequest::ListDeployments { environment, limit }, json),
        DeploymentsCommand::Show { id, json } => (AdminRequest::ShowDeployment { id }, json),
    };
    print(&admin(req).await?, json)
}

pub async fn deploy(cmd: DeployCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        DeployCommand::Approve { id, json } => (AdminRequest::ApproveDeployment { id }, json),
        DeployCommand::Promote { id, json } => (AdminRequest::PromoteDeployment { id }, json),
        DeployCommand::Abort { id, json } => (AdminRequest::AbortDeployment { id }, json),
    };
    print(&admin(req).await?, json)
}

/// Starts a rollback and (unless `--no-wait`) waits for it to end: exit 0 if every
/// host is back, 1 if not.
pub async fn rollback(args: RollbackArgs) -> Result<ExitCode, Failure> {
    let request = AdminRequest::Rollback(RollbackRequest {
        environment: args.environment.clone(),
        to: args.to.clone(),
        parallelism: args.parallel,
    });
    start_and_wait(request, args.no_wait, args.json, |view| {
        format!(
            "deployment {}: rolling {} back to {} ({})",
            view.id, view.environment, view.release.id, view.release.version
        )
    })
    .await
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Labels an agent must carry: key=value, comma-separated or repeated [default:
    /// every connected agent].
    #[arg(long, value_name = "KEY=VALUE,...")]
    select: Vec<String>,
    /// Agents restarted at once.
    #[arg(long, default_value_t = 1)]
    batch: u32,
    /// Agents that may fail before the upgrade stops and the restarted ones go back.
    #[arg(long, default_value_t = 0)]
    failure_budget: u32,
    /// Longest one agent may take, waiting for its running jobs included.
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    timeout: String,
    /// Return once the upgrade has started instead of waiting for it to end.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

/// Starts a fleet upgrade and (unless `--no-wait`) waits for it to end.
pub async fn upgrade_agents(args: UpgradeArgs) -> Result<ExitCode, Failure> {
    let timeout = config::parse_duration(&args.timeout)
        .context("--timeout")
        .map_err(usage)?;
    let request = AdminRequest::UpgradeAgents {
        select: selector(&args.select)?,
        batch: args.batch,
        failure_budget: args.failure_budget,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    start_and_wait(request, args.no_wait, args.json, |view| {
        format!(
            "deployment {}: upgrading agents to {} ({})",
            view.id, view.release.version, view.release.id
        )
    })
    .await
}

/// Sends a request that starts a deployment, then polls it until it ends (at most
/// [`ROLLBACK_WAIT`]); exit 0 if it succeeded.
async fn start_and_wait(
    request: AdminRequest,
    no_wait: bool,
    json: bool,
    started_line: impl Fn(&DeploymentView) -> String,
) -> Result<ExitCode, Failure> {
    let mut client = connect().await?;
    let started = client.request(&request).await?;
    let AdminResponse::Deployment(mut view) = started else {
        client.close().await;
        return print(&started, json);
    };
    if !json {
        println!("{}", started_line(&view));
    }
    let deadline = tokio::time::Instant::now() + ROLLBACK_WAIT;
    while !no_wait && !ended(&view.state) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match client
            .request(&AdminRequest::ShowDeployment { id: view.id })
            .await?
        {
            AdminResponse::Deployment(v) => view = v,
            other => {
                client.close().await;
                return print(&other, json);
            }
        }
    }
    client.close().await;
    print(&AdminResponse::Deployment(view.clone()), json)?;
    Ok(if no_wait || view.state == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn ended(state: &str) -> bool {
    matches!(state, "succeeded" | "rolled-back" | "failed" | "cancelled")
}

/// Runs a command on every matching host; prints output prefixed by host, then a
/// summary. Exit 0 if it exited 0 everywhere, 1 if not, 2 if refused.
pub async fn exec(args: ExecArgs) -> Result<ExitCode, Failure> {
    let timeout = config::parse_duration(&args.timeout)
        .context("--timeout")
        .map_err(usage)?;
    let request = ExecRequest {
        select: selector(&args.select)?,
        parallel: args.parallel,
        command: args.command.join(" "),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let mut client = connect().await?;
    let mut reader = client.follow(&StreamOpen::Exec(request)).await?;
    let mut names: HashMap<AgentId, String> = HashMap::new();
    let mut partial: HashMap<AgentId, Vec<u8>> = HashMap::new();
    // Each host's name, its `ExecDone` result as the protocol carries it (the exit code,
    // or the agent's reason the command could not run), and how long it took (ms).
    let mut results: Vec<(String, Result<i32, String>, u64)> = Vec::new();
    let mut expected = usize::MAX;
    let mut stdout = std::io::stdout().lock();
    let width =
        |names: &HashMap<AgentId, String>| names.values().map(String::len).max().unwrap_or(0);
    while results.len() < expected {
        let event = reader
            .recv::<ExecEvent>()
            .await
            .map_err(|e| Failure::Unreachable(e.into()))?;
        match event {
            Some(ExecEvent::Targets(hosts)) => {
                expected = hosts.len();
                for h in hosts {
                    names.insert(h.agent, h.hostname);
                }
            }
            Some(ExecEvent::Output { agent, data }) => {
                let name = names
                    .get(&agent)
                    .cloned()
                    .unwrap_or_else(|| agent.to_string());
                let buf = partial.entry(agent).or_default();
                buf.extend_from_slice(&data);
                while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    let _ = write!(stdout, "{name:<w$} | ", w = width(&names));
                    let _ = stdout.write_all(&line);
                }
                let _ = stdout.flush();
            }
            Some(ExecEvent::Done {
                agent,
                result,
                millis,
            }) => {
                let name = names
                    .get(&agent)
                    .cloned()
                    .unwrap_or_else(|| agent.to_string());
                if let Some(rest) = partial.remove(&agent).filter(|r| !r.is_empty()) {
                    let _ = write!(stdout, "{name:<w$} | ", w = width(&names));
                    let _ = stdout.write_all(&rest);
                    let _ = writeln!(stdout);
                }
                results.push((name, result, millis));
            }
            Some(ExecEvent::Refused { message }) => {
                client.close().await;
                return Err(usage(anyhow::anyhow!(message)));
            }
            None => {
                client.close().await;
                return Err(Failure::Unreachable(anyhow::anyhow!(
                    "the coordinator ended the exec stream after {} of {} hosts",
                    results.len(),
                    expected
                )));
            }
        }
    }
    client.close().await;
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rows = vec![vec![
        "HOST".to_owned(),
        "EXIT".to_owned(),
        "TIME".to_owned(),
    ]];
    let mut failed = 0;
    for (name, result, millis) in &results {
        let exit = match result {
            Ok(0) => "0".to_owned(),
            Ok(code) => {
                failed += 1;
                code.to_string()
            }
            Err(reason) => {
                failed += 1;
                format!("error: {reason}")
            }
        };
        rows.push(vec![name.clone(), exit, human_duration(*millis)]);
    }
    let _ = writeln!(stdout);
    let _ = write!(stdout, "{}", table(&rows));
    let _ = writeln!(
        stdout,
        "{} host(s): {} ok, {failed} failed",
        results.len(),
        results.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print(resp: &AdminResponse, json: bool) -> Result<ExitCode, Failure> {
    crate::cli::output::print_response(resp, json)
}
