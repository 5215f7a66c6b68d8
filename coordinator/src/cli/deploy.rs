//! The deployment commands of the admin CLI: `gantry env`, `gantry deployments`,
//! `gantry deploy approve|promote|abort`, `gantry rollback`, `gantry exec` and
//! `gantry admin add`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{
    AdminRequest, AdminResponse, AgentId, DeploymentView, EnvironmentView, ExecEvent, ExecRequest,
    RollbackRequest, StreamOpen, UnixMillis,
};

use crate::base::{config, labels};
use crate::cli::connect::{admin, connect};
use crate::cli::context;
use crate::cli::failure::{usage, Failure};
use crate::cli::output::{human_duration, rfc3339, table};

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

/// `gantry stats` as a table: one row per environment.
pub fn stats_table(stats: &[gantry_protocol::DeliveryStats]) -> String {
    let mut rows = vec![[
        "ENV",
        "CHANGES",
        "PER DAY",
        "LEAD TIME (MEDIAN/P90)",
        "FAILURE RATE",
        "TIME TO RESTORE (MEDIAN)",
        "ROLLBACKS",
    ]
    .map(str::to_owned)
    .to_vec()];
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), human_duration);
    for s in stats {
        rows.push(vec![
            s.environment.clone(),
            format!("{} ({} ok)", s.changes, s.succeeded),
            format!("{:.2}", s.deployments_per_day),
            format!("{} / {}", ms(s.lead_time_median_ms), ms(s.lead_time_p90_ms)),
            s.change_failure_rate.map_or_else(
                || "-".to_owned(),
                |r| format!("{:.0}% ({} of {})", r * 100.0, s.failed_changes, s.changes),
            ),
            format!(
                "{} ({} restores)",
                ms(s.time_to_restore_median_ms),
                s.restores
            ),
            s.rollbacks.to_string(),
        ]);
    }
    table(&rows)
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
        return print(&resp, false);
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

fn print(resp: &AdminResponse, json: bool) -> Result<ExitCode, Failure> {
    crate::cli::output::print_response(resp, json)
}

fn labels_text(labels: &gantry_protocol::Labels) -> String {
    if labels.is_empty() {
        return "(every host)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn environments_table(envs: &[EnvironmentView]) -> String {
    let mut rows = vec![[
        "NAME",
        "SELECT",
        "HOSTS",
        "APPROVALS",
        "WAIT",
        "BRANCHES",
        "CURRENT",
    ]
    .map(str::to_owned)
    .to_vec()];
    for e in envs {
        rows.push(vec![
            e.name.clone(),
            labels_text(&e.select),
            e.hosts.len().to_string(),
            e.approvals.to_string(),
            if e.wait_ms == 0 {
                "-".into()
            } else {
                human_duration(e.wait_ms)
            },
            if e.branches.is_empty() {
                "any".into()
            } else {
                e.branches.join(",")
            },
            e.current.as_ref().map_or_else(
                || "-".into(),
                |c| format!("{} ({})", c.release.id, c.release.version),
            ),
        ]);
    }
    table(&rows)
}

pub fn environment_detail(e: &EnvironmentView) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<12}{v}");
    };
    line("name", e.name.clone());
    line("select", labels_text(&e.select));
    line("approvals", e.approvals.to_string());
    line(
        "wait",
        if e.wait_ms == 0 {
            "-".into()
        } else {
            human_duration(e.wait_ms)
        },
    );
    line(
        "branches",
        if e.branches.is_empty() {
            "any".into()
        } else {
            e.branches.join(", ")
        },
    );
    line("epoch", e.epoch.to_string());
    line(
        "current",
        e.current.as_ref().map_or_else(
            || "-".into(),
            |c| {
                format!(
                    "{} ({}) by deployment {}",
                    c.release.id, c.release.version, c.deployment
                )
            },
        ),
    );
    line(
        "created",
        format!("{} by {}", rfc3339(e.created_at), e.created_by),
    );
    let _ = writeln!(s, "\nhosts ({}):", e.hosts.len());
    for h in &e.hosts {
        let _ = writeln!(s, "  {}  {}", h.hostname, h.agent);
    }
    if !e.history.is_empty() {
        s.push_str("\nhistory (newest first):\n");
        let mut rows = vec![["RELEASE", "VERSION", "APP", "DEPLOYMENT", "AT"]
            .map(str::to_owned)
            .to_vec()];
        for r in &e.history {
            rows.push(vec![
                r.release.id.clone(),
                r.release.version.clone(),
                r.app.clone(),
                r.deployment.to_string(),
                rfc3339(r.at),
            ]);
        }
        for l in table(&rows).lines() {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

fn host_counts(d: &DeploymentView) -> String {
    let active = d.hosts.iter().filter(|h| h.state == "active").count();
    format!("{active}/{}", d.hosts.len())
}

pub fn deployments_table(deployments: &[DeploymentView], now: UnixMillis) -> String {
    let mut rows = vec![[
        "ID", "ENV", "APP", "RELEASE", "STRATEGY", "STATE", "ACTIVE", "BY", "AGE",
    ]
    .map(str::to_owned)
    .to_vec()];
    for d in deployments {
        rows.push(vec![
            d.id.to_string(),
            d.environment.clone(),
            d.app.clone(),
            format!("{} ({})", d.release.id, d.release.version),
            d.strategy.clone(),
            d.state.clone(),
            host_counts(d),
            d.created_by.clone(),
            human_duration(now.millis_since(d.created_at)),
        ]);
    }
    table(&rows)
}

pub fn deployment_detail(d: &DeploymentView, now: UnixMillis) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<12}{v}");
    };
    line("deployment", d.id.to_string());
    line(
        "environment",
        format!("{} (epoch {})", d.environment, d.epoch),
    );
    line(
        "release",
        format!("{} ({}) of {}", d.release.id, d.release.version, d.app),
    );
    line("strategy", d.strategy.clone());
    line(
        "state",
        match &d.reason {
            Some(r) => format!("{}: {r}", d.state),
            None => d.state.clone(),
        },
    );
    line(
        "created",
        format!("{} by {}", rfc3339(d.created_at), d.created_by),
    );
    if let Some(job) = d.job {
        line("job", format!("{job} (`gantry logs {job}`)"));
    }
    if d.approvals_needed > 0 {
        let by: Vec<String> = d.approvals.iter().map(|a| a.by.clone()).collect();
        line(
            "approvals",
            format!(
                "{}/{} {}",
                d.approvals.len(),
                d.approvals_needed,
                by.join(", ")
            ),
        );
    }
    if let Some(start) = d.started_at {
        let took = d.finished_at.unwrap_or(now).millis_since(start);
        line(
            "took",
            format!(
                "{}{}",
                human_duration(took),
                if d.finished_at.is_some() {
                    ""
                } else {
                    " so far"
                }
            ),
        );
    }
    let since = |t: Option<UnixMillis>| {
        t.zip(d.started_at).map_or_else(
            || "-".into(),
            |(t, s)| format!("+{}", human_duration(t.millis_since(s))),
        )
    };
    let mut rows = vec![[
        "HOST", "STATE", "PREVIOUS", "STAGED", "SWITCHED", "ENDED", "REASON",
    ]
    .map(str::to_owned)
    .to_vec()];
    for h in &d.hosts {
        rows.push(vec![
            h.hostname.clone(),
            h.state.clone(),
            h.previous.clone().unwrap_or_else(|| "-".into()),
            since(h.staged_at),
            since(h.activated_at),
            since(h.ended_at),
            h.reason.clone().unwrap_or_default(),
        ]);
    }
    s.push('\n');
    s.push_str(&table(&rows));
    if !d.log.is_empty() {
        let names: HashMap<&AgentId, &str> = d
            .hosts
            .iter()
            .map(|h| (&h.agent, h.hostname.as_str()))
            .collect();
        s.push_str("\nlog:\n");
        for l in &d.log {
            let host = l
                .agent
                .as_ref()
                .map(|a| format!("[{}] ", names.get(a).copied().unwrap_or(a.as_str())))
                .unwrap_or_default();
            let _ = writeln!(s, "  {} {host}{}", rfc3339(l.at), l.text);
        }
    }
    s
}
