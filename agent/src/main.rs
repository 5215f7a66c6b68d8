//! The `gantry-agent` binary: command-line parsing, logging, the runtime, and turning
//! typed errors into the exit codes DESIGN.md fixes (0 success, 1 local failure, 2 usage
//! or input error, 3 cannot reach or authenticate to the coordinator). All behaviour
//! lives in the library; this file only wires it to a process.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gantry_agent::base::{bundle, datadir, duration, exit, figures, labels};
use gantry_agent::runner::{cgroups, docker, isolation};
use gantry_agent::{enroll, session};
use gantry_protocol::UNTRUSTED_WORK_LABEL;

#[derive(Debug, Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry's agent: enrolls with a coordinator and holds a session to it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this host with a join token from `gantry token create`.
    Enroll(EnrollArgs),
    /// Connect to the coordinator and stay connected.
    Run(RunArgs),
    /// Check the CA's signature on an offline bundle (install.sh uses it without openssl).
    VerifyBundle(VerifyBundleArgs),
    /// The init an isolated job's step runs under (the agent runs it; not for people).
    #[command(hide = true)]
    JobInit(JobInitArgs),
}

#[derive(Debug, Args)]
struct JobInitArgs {
    #[arg(long)]
    uid: u32,
    #[arg(long)]
    gid: u32,
    /// A cgroup's `cgroup.procs` to join first (repeatable).
    #[arg(long = "cgroup")]
    cgroups: Vec<PathBuf>,
    /// The job's own directory to mount on `/tmp`.
    #[arg(long)]
    tmp: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(Debug, Args)]
struct VerifyBundleArgs {
    /// The CA certificate (PEM) that must have signed it.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// The bundle's SHA-256, as printed by `gantry bundle create`.
    #[arg(long, value_name = "HEX")]
    sha256: String,
    /// The signature, as printed by `gantry bundle create`.
    #[arg(long, value_name = "BASE64")]
    signature: String,
    /// The bundle file; when given, its SHA-256 is checked too.
    #[arg(long, value_name = "FILE")]
    bundle: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DataDirArg {
    /// Where the agent keeps its identity and configuration.
    #[arg(long, env = "GANTRY_AGENT_DATA_DIR", default_value = datadir::DEFAULT_DATA_DIR, value_name = "DIR")]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The join token (`gjt1_...`).
    #[arg(long, value_name = "TOKEN")]
    token: String,
    #[command(flatten)]
    data_dir: DataDirArg,
    /// A label to ask for and to report on every connection (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = labels::parse_label)]
    labels: Vec<(String, String)>,
    /// Replace an existing enrollment in the data directory.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// A label to report, overriding one saved at enrollment (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = labels::parse_label)]
    labels: Vec<(String, String)>,
    /// How many jobs this agent runs at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    slots: u32,
    /// Longest delay between reconnect attempts (e.g. 500ms, 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = duration::parse_duration, value_name = "DURATION")]
    max_backoff: Duration,
    /// Size of the local chunk cache that makes repeated artifact and cache downloads
    /// free (e.g. 5GiB, 500MiB); least recently used chunks go first.
    #[arg(long, env = "GANTRY_AGENT_CACHE_SIZE", default_value = "5GiB", value_parser = parse_size, value_name = "SIZE")]
    cache_size: u64,
    /// Streams one artifact or cache transfer uses at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    transfer_streams: u16,
    /// Cap on artifact, cache and release traffic, each way (e.g. 20MiB: this agent
    /// receives at most 20 MiB per second, and sends at most as much in uploads and to
    /// peers); no cap unless given.
    #[arg(long, env = "GANTRY_AGENT_MAX_TRANSFER_RATE", value_parser = parse_size, value_name = "SIZE")]
    max_transfer_rate: Option<u64>,
    /// UDP address where the other hosts of a deployment fetch the release chunks this
    /// host holds (peers reach it at the address the coordinator sees this agent at,
    /// with this port), or `off` to serve no peers.
    #[arg(long, env = "GANTRY_AGENT_PEER_LISTEN", default_value = "0.0.0.0:0", value_parser = parse_peer_listen, value_name = "ADDR|off")]
    peer_listen: PeerListen,
    /// Where deployed apps live: `<DIR>/<app>/releases/`, `current`, `shared/`
    /// [default: DATA_DIR/deploy].
    #[arg(long, env = "GANTRY_AGENT_DEPLOY_ROOT", value_name = "DIR")]
    deploy_root: Option<PathBuf>,
    /// `required`: each job runs as a uid of its own (see --job-uids) in its own PID
    /// namespace, and without the privileges for that (root, or CAP_SETUID, CAP_SETGID,
    /// CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_KILL and CAP_SYS_ADMIN) the agent
    /// refuses every job and says why; `off`: jobs run as the agent's user (trusted work
    /// only) [default: required when the agent has those privileges, off otherwise].
    #[arg(long, env = "GANTRY_AGENT_ISOLATION", value_name = "required|off")]
    isolation: Option<isolation::IsolationMode>,
    /// The uids isolated jobs run as (with the gids of the same numbers), one per
    /// running job; no user on this host may own them.
    #[arg(long, env = "GANTRY_AGENT_JOB_UIDS", default_value = isolation::DEFAULT_JOB_UIDS, value_name = "FIRST-LAST")]
    job_uids: isolation::UidRange,
    /// Memory each isolated or Docker job may use (e.g. 4GiB; swap included where the
    /// kernel accounts it); the kernel's OOM killer stops the job's processes past it.
    /// No limit unless given.
    #[arg(long, env = "GANTRY_AGENT_JOB_MEMORY", value_parser = parse_size, value_name = "SIZE")]
    job_memory: Option<u64>,
    /// Processes and threads each isolated or Docker job may have at once (a fork bomb
    /// stops there).
    #[arg(long, env = "GANTRY_AGENT_JOB_PIDS", default_value_t = cgroups::DEFAULT_JOB_PIDS, value_parser = clap::value_parser!(u64).range(8..), value_name = "N")]
    job_pids: u64,
    /// CPUs' worth of time each isolated or Docker job may use (e.g. 2 or 0.5). No limit
    /// unless given.
    #[arg(long, env = "GANTRY_AGENT_JOB_CPUS", value_parser = parse_cpus, value_name = "CPUS")]
    job_cpus: Option<f64>,
    /// Reserve this agent for untrusted work (fork pull requests of repositories that
    /// allow them): it announces the label `gantry.reserved/untrusted=true` and the
    /// coordinator gives it those runs' jobs and nothing else. Requires job isolation:
    /// without it the agent refuses to start.
    #[arg(long, env = "GANTRY_AGENT_UNTRUSTED_WORK")]
    untrusted_work: bool,
}

/// `--peer-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct PeerListen(Option<std::net::SocketAddr>);

/// Why an option's value is refused (clap prints it after the option's name).
#[derive(Debug, thiserror::Error)]
enum ValueError {
    #[error("invalid peer address {0:?}: expected IP:PORT (like 0.0.0.0:7444) or off")]
    PeerAddress(String),
    #[error("invalid size {0:?}: expected a number then a unit, like 5GiB or 20MB")]
    SizeNumber(String),
    #[error("invalid size {0:?}: unit must be B, KiB, MiB, GiB, TiB, KB, MB or GB")]
    SizeUnit(String),
    #[error("size {0:?} is too large")]
    SizeTooLarge(String),
    #[error("invalid CPU count {0:?}: expected a number of CPUs like 2 or 0.5, at least 0.01")]
    Cpus(String),
}

fn parse_cpus(text: &str) -> Result<f64, ValueError> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|c| c.is_finite() && *c >= 0.01 && *c <= 10_000.0)
        .ok_or_else(|| ValueError::Cpus(text.to_owned()))
}

fn parse_peer_listen(text: &str) -> Result<PeerListen, ValueError> {
    if text == "off" {
        return Ok(PeerListen(None));
    }
    text.parse()
        .map(|a| PeerListen(Some(a)))
        .map_err(|_| ValueError::PeerAddress(text.to_owned()))
}

/// Parses a size like `5GiB`, `500MiB`, `20MB` or a plain number of bytes.
fn parse_size(text: &str) -> Result<u64, ValueError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| ValueError::SizeNumber(text.to_owned()))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(ValueError::SizeUnit(text.to_owned())),
    };
    n.checked_mul(scale)
        .ok_or_else(|| ValueError::SizeTooLarge(text.to_owned()))
}

fn main() -> ExitCode {
    // clap prints its own message and exits with 2 on a usage error.
    let cli = Cli::parse();
    if let Command::JobInit(args) = &cli.command {
        // Before logging and the runtime: job-init forks, and stays out of the step's log.
        return job_init(args);
    }
    init_logging();
    if let Command::Run(args) = &cli.command {
        // A fleet upgrade may have left a newer binary for this agent: run that one.
        gantry_agent::deploy::upgrade::run_upgraded_binary(&args.data_dir.data_dir);
        // An agent that will not isolate needs no capabilities, and its jobs must not
        // inherit the packaged unit's: dropped before any thread or child exists.
        if args.isolation == Some(isolation::IsolationMode::Off) {
            isolation::drop_capabilities();
        }
    }
    let runtime = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match cli.command {
        Command::Enroll(args) => runtime.block_on(run_enroll(args)),
        Command::Run(args) => runtime.block_on(run_session(args)),
        Command::VerifyBundle(args) => verify_bundle(args),
        Command::JobInit(args) => job_init(&args),
    }
}

fn job_init(args: &JobInitArgs) -> ExitCode {
    let code = isolation::job_init(&isolation::JobInit {
        uid: args.uid,
        gid: args.gid,
        cgroup_procs: args.cgroups.clone(),
        tmp: args.tmp.clone(),
        argv: args.argv.clone(),
    });
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

fn verify_bundle(args: VerifyBundleArgs) -> ExitCode {
    let options = bundle::VerifyOptions {
        ca: args.ca,
        sha256: args.sha256,
        signature: args.signature,
        bundle: args.bundle,
    };
    match bundle::verify(&options) {
        Ok(fingerprint) => {
            println!("signature verified: signed by the CA {fingerprint}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// One thread is plenty for one connection and a heartbeat, and keeps idle memory low.
fn build_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run_enroll(args: EnrollArgs) -> ExitCode {
    let options = enroll::EnrollOptions {
        data_dir: args.data_dir.data_dir,
        token: args.token,
        labels: labels::from_pairs(args.labels),
        force: args.force,
        hostname: figures::hostname(),
    };
    match enroll::enroll(options).await {
        Ok(enrolled) => {
            println!(
                "enrolled as {} with coordinator {}",
                enrolled.agent_id, enrolled.coordinator_address
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run_session(args: RunArgs) -> ExitCode {
    let deploy_root = args
        .deploy_root
        .clone()
        .unwrap_or_else(|| args.data_dir.data_dir.join("deploy"));
    let limits = cgroups::JobLimits {
        memory: args.job_memory,
        pids: Some(args.job_pids),
        cpus: args.job_cpus,
    };
    let mode = args.isolation.unwrap_or_else(isolation::default_mode);
    let privilege = isolation::privilege();
    // Only an agent that will isolate touches cgroups (on v2 it moves itself into a
    // leaf of its own cgroup).
    let cgroups = if mode == isolation::IsolationMode::Required && privilege.is_ok() {
        cgroups::Cgroups::detect(limits)
    } else {
        Ok(None)
    };
    let isolation = isolation::decide(mode, args.job_uids, args.slots, privilege, cgroups);
    let mut labels = labels::from_pairs(args.labels);
    if args.untrusted_work {
        if !matches!(isolation, isolation::Isolation::Users { .. }) {
            eprintln!(
                "error: --untrusted-work needs job isolation, and here {}",
                isolation.describe()
            );
            return ExitCode::from(exit::USAGE);
        }
        labels.insert(UNTRUSTED_WORK_LABEL.to_owned(), "true".to_owned());
    }
    let options = session::RunOptions {
        data_dir: args.data_dir.data_dir,
        labels,
        slots: args.slots,
        max_backoff: args.max_backoff,
        hostname: figures::hostname(),
        capabilities: docker::capabilities(std::path::Path::new(docker::DEFAULT_SOCKET)),
        cache_bytes: args.cache_size,
        transfer_streams: usize::from(args.transfer_streams),
        max_transfer_rate: args.max_transfer_rate,
        deploy_root,
        peer_listen: args.peer_listen.0,
        isolation,
    };
    match session::run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
