//! Scale benchmark: one coordinator and thousands of simulated agents on this machine.
//!
//! For each fleet size (1,000 and 10,000 by default, each against a fresh coordinator)
//! it prints:
//! - enrollment and first connection of every agent,
//! - the coordinator's resident memory and CPU while idle (heartbeats only, at the
//!   production interval of 5 s), over `--idle-secs`,
//! - the time for every agent to be welcomed again after the coordinator is restarted
//!   (SIGTERM, as `systemctl restart` does, then `gantry server` again),
//! - dispatch latency (run stored → dispatch received by the agent), p50/p99, one
//!   one-job run at a time, with the whole fleet connected and heartbeating,
//! - dispatch throughput: a burst of one job per agent (runs of 500 jobs), from the
//!   first submission to the last result stored, and each job's wait in that burst.
//!
//! The agents are `gantry-loadagent` processes (`--processes`, 4 by default), each
//! holding its share of the agents, each agent with its own key and certificate, over
//! UDP sockets shared by 250 agents each (so no file-descriptor limit needs raising: the
//! coordinator uses one socket for all of them, and a load process one per 250 agents).
//!
//! Run: `cargo build --release --bins -p gantry-tests -p gantry-coordinator -p gantry-agent
//! && target/release/bench-scale` (`--agents 1000,10000 --processes 4 --idle-secs 30
//! --samples 200`). Figures are printed, never asserted: the machine is shared and noisy;
//! 1,000 agents is the baseline measured in the same run. Targets at 10,000 agents
//! (issue 7): under 1 GiB resident, under 25% of one core idle, every agent back within
//! 60 s of a restart, dispatch p99 under 100 ms.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gantry_protocol::RunId;
use gantry_tests::admin::Admin;
use gantry_tests::load::{now_ns, trivial_pipeline, LoadEvent};
use gantry_tests::pct;
use gantry_tests::{bin, Coordinator, CoordinatorOptions, Proc};

/// Jobs per run in the burst (a pipeline holds at most 512).
const BURST_RUN_JOBS: usize = 500;
/// Linux reports /proc/<pid>/stat times in USER_HZ, which is 100 on every architecture.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone)]
struct Args {
    scales: Vec<usize>,
    processes: usize,
    idle_secs: u64,
    samples: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut a = Self {
            scales: vec![1_000, 10_000],
            processes: 4,
            idle_secs: 30,
            samples: 200,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--agents" => {
                    a.scales = value
                        .split(',')
                        .map(|n| n.replace('_', "").parse())
                        .collect::<Result<_, _>>()
                        .context("--agents takes a comma-separated list of counts")?;
                }
                "--processes" => a.processes = value.parse::<usize>()?.max(1),
                "--idle-secs" => a.idle_secs = value.parse::<u64>()?.max(1),
                "--samples" => a.samples = value.parse::<usize>()?.max(1),
                other => anyhow::bail!("unknown argument {other:?}"),
            }
        }
        Ok(a)
    }
}

/// Resident and peak memory of a process, KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User plus system CPU time of a process so far, in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after its closing parenthesis are
    // fixed: state is field 3, utime 14 and stime 15.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    num(11) + num(12)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// CPU use of `pids` between two tick readings, as a percentage of one core.
fn cpu_percent(before: u64, after: u64, wall: Duration) -> f64 {
    after.saturating_sub(before) as f64 / TICKS_PER_SEC / wall.as_secs_f64() * 100.0
}

/// The load processes and what they reported.
struct Fleet {
    procs: Vec<Proc>,
    /// Held open: a load process exits when its stdin closes.
    _stdins: Vec<ChildStdin>,
    events: mpsc::Receiver<(usize, Option<LoadEvent>)>,
    agents: usize,
    enrolled: Vec<Option<u64>>,
    live: Vec<usize>,
    welcomes: Vec<u64>,
    /// When the live total last reached `agents` (wall-clock ns), if it is there now.
    all_live_at: Option<u128>,
    /// First receipt of each job's first attempt, and each job's acknowledged result.
    dispatched: HashMap<(u64, u32), u128>,
    acked: HashMap<(u64, u32), u128>,
}

impl Fleet {
    fn start(token: &str, agents: usize, processes: usize, name: &str) -> anyhow::Result<Self> {
        let (tx, events) = mpsc::channel();
        let mut procs = Vec::new();
        let mut stdins = Vec::new();
        for p in 0..processes {
            let share = agents / processes + usize::from(p < agents % processes);
            let mut child = Command::new(bin("gantry-loadagent"))
                .args(["--token", token, "--agents", &share.to_string()])
                .args(["--name", &format!("{name}-p{p}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start gantry-loadagent (cargo build --release --bins)")?;
            let stdout = child.stdout.take().context("no stdout")?;
            stdins.push(child.stdin.take().context("no stdin")?);
            procs.push(Proc {
                child,
                name: format!("load process {p}"),
            });
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((p, LoadEvent::parse(&line))).is_err() {
                        return;
                    }
                }
                // The process ended: tell the benchmark rather than let it wait.
                let _ = tx.send((p, None));
            });
        }
        Ok(Self {
            procs,
            _stdins: stdins,
            events,
            agents,
            enrolled: vec![None; processes],
            live: vec![0; processes],
            welcomes: vec![0; processes],
            all_live_at: None,
            dispatched: HashMap::new(),
            acked: HashMap::new(),
        })
    }

    fn live_total(&self) -> usize {
        self.live.iter().sum()
    }

    fn welcomes_total(&self) -> u64 {
        self.welcomes.iter().sum()
    }

    fn record(&mut self, p: usize, event: Option<LoadEvent>) -> anyhow::Result<()> {
        match event {
            None => anyhow::bail!("load process {p} exited"),
            Some(LoadEvent::Fatal(message)) => anyhow::bail!("load process {p}: {message}"),
            Some(LoadEvent::Enrolled { millis, .. }) => self.enrolled[p] = Some(millis),
            Some(LoadEvent::Live {
                live,
                welcomes,
                at_ns,
            }) => {
                self.live[p] = live;
                self.welcomes[p] = welcomes;
                if self.live_total() == self.agents {
                    self.all_live_at.get_or_insert(at_ns);
                } else {
                    self.all_live_at = None;
                }
            }
            Some(LoadEvent::Dispatch {
                run,
                index,
                attempt,
                at_ns,
            }) => {
                if attempt == 1 {
                    self.dispatched.entry((run, index)).or_insert(at_ns);
                }
            }
            Some(LoadEvent::Acked { run, index, at_ns }) => {
                self.acked.entry((run, index)).or_insert(at_ns);
            }
        }
        Ok(())
    }

    /// Takes events until `done` holds or `deadline` passes; returns whether it held.
    fn wait(
        &mut self,
        deadline: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<bool> {
        let until = Instant::now() + deadline;
        loop {
            if done(self) {
                return Ok(true);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            match self.events.recv_timeout(left) {
                Ok((p, event)) => self.record(p, event)?,
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(false),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("every load process is gone")
                }
            }
        }
    }

    /// Takes events for `time`, whatever they are.
    fn idle(&mut self, time: Duration) -> anyhow::Result<()> {
        self.wait(time, |_| false).map(|_| ())
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
}

/// Figures of one fleet size, as text (a phase that did not finish says so).
#[derive(Debug, Default)]
struct Figures {
    agents: usize,
    enroll: String,
    connect: String,
    baseline: String,
    rss_idle: String,
    cpu_idle: String,
    load_cpu: String,
    fds: String,
    reconnect: String,
    reconnect_cpu: String,
    rss_after_restart: String,
    latency: String,
    throughput: String,
    burst_wait: String,
}

/// Starts `gantry server` again on the coordinator's data directory, logging where
/// the harness does; returns its pid.
fn spawn_server(coordinator: &mut Coordinator) -> anyhow::Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(coordinator.dir.path().join("server.log"))?;
    let child = Command::new(bin("gantry"))
        .args(["server", "--data-dir"])
        .arg(coordinator.data_dir())
        .env("GANTRY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start gantry server")?;
    let pid = child.id();
    coordinator.server = Some(Proc {
        child,
        name: "gantry server".into(),
    });
    Ok(pid)
}

fn secs(ns: u128) -> f64 {
    ns as f64 / 1e9
}

fn measure(args: &Args, agents: usize, rt: &tokio::runtime::Runtime) -> anyhow::Result<Figures> {
    let mut f = Figures {
        agents,
        ..Figures::default()
    };
    let mut coordinator = Coordinator::start_with(&CoordinatorOptions {
        agent_cert_ttl: "7d".into(),
        heartbeat_interval: "5s".into(),
        http: false,
    });
    let pid = coordinator.server().pid();
    std::thread::sleep(Duration::from_secs(1));
    let (t0, w0) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let (rss0, _) = memory_kib(pid);
    f.baseline = format!(
        "{:.1} MiB, {:.1}% CPU",
        rss0 as f64 / 1024.0,
        cpu_percent(t0, cpu_ticks(pid), w0.elapsed())
    );
    eprintln!("[{agents}] coordinator without agents: {}", f.baseline);

    // Enrollment and first connection.
    let token = coordinator.token(&["--uses", &agents.to_string(), "--ttl", "2h"]);
    let started = Instant::now();
    let mut fleet = Fleet::start(&token, agents, args.processes.min(agents), "bench")?;
    let enroll_deadline = Duration::from_secs(60) + Duration::from_millis(50 * agents as u64);
    if !fleet.wait(enroll_deadline, |f| f.enrolled.iter().all(Option::is_some))? {
        anyhow::bail!("enrollment of {agents} agents did not finish in {enroll_deadline:?}");
    }
    let enroll = started.elapsed();
    f.enroll = format!(
        "{:.1} s ({:.0}/s)",
        enroll.as_secs_f64(),
        agents as f64 / enroll.as_secs_f64()
    );
    eprintln!("[{agents}] enrolled: {}", f.enroll);
    let connect_deadline = Duration::from_secs(300);
    f.connect = if fleet.wait(connect_deadline, |f| f.all_live_at.is_some())? {
        format!(
            "{:.1} s",
            started.elapsed().as_secs_f64() - enroll.as_secs_f64()
        )
    } else {
        format!(
            "only {} of {agents} in {connect_deadline:?}",
            fleet.live_total()
        )
    };
    eprintln!("[{agents}] connected: {}", f.connect);

    // Idle: two heartbeat rounds and a presence flush to settle, then the window.
    fleet.idle(Duration::from_secs(12))?;
    let load_pids = fleet.pids();
    let load_ticks = |pids: &[u32]| pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    let (t0, l0, w0) = (cpu_ticks(pid), load_ticks(&load_pids), Instant::now());
    fleet.idle(Duration::from_secs(args.idle_secs))?;
    let wall = w0.elapsed();
    let (rss, hwm) = memory_kib(pid);
    f.cpu_idle = format!("{:.1}% of one core", cpu_percent(t0, cpu_ticks(pid), wall));
    f.rss_idle = format!(
        "{:.1} MiB ({:.1} KiB per agent above the empty coordinator; peak {:.1} MiB)",
        rss as f64 / 1024.0,
        rss.saturating_sub(rss0) as f64 / agents as f64,
        hwm as f64 / 1024.0
    );
    let load_rss: u64 = load_pids.iter().map(|p| memory_kib(*p).0).sum();
    f.load_cpu = format!(
        "{:.1}% of one core, {:.0} MiB, for all load processes",
        cpu_percent(l0, load_ticks(&load_pids), wall),
        load_rss as f64 / 1024.0
    );
    f.fds = format!("{} open descriptors", open_fds(pid));
    eprintln!(
        "[{agents}] idle: {}, {}; load processes {}",
        f.rss_idle, f.cpu_idle, f.load_cpu
    );

    // Restart: SIGTERM (every connection closed with "shutting down"), start again.
    let welcomes_before = fleet.welcomes_total();
    let stop_ns = now_ns();
    coordinator.server().terminate();
    let spawn_ns = now_ns();
    // Not `start_server`, which waits for `gantry status`: during the storm that CLI's
    // own handshake competes with 10,000 agents'. The agents say when they are back.
    let pid = spawn_server(&mut coordinator)?;
    let ticks_at_start = cpu_ticks(pid);
    let reconnect_deadline = Duration::from_secs(180);
    let back = fleet.wait(reconnect_deadline, |f| {
        f.all_live_at.is_some() && f.welcomes_total() >= welcomes_before + agents as u64
    })?;
    let storm_ticks = cpu_ticks(pid).saturating_sub(ticks_at_start);
    f.reconnect = match (back, fleet.all_live_at) {
        (true, Some(at)) => format!(
            "{:.1} s after SIGTERM ({:.1} s after the new process started)",
            secs(at.saturating_sub(stop_ns)),
            secs(at.saturating_sub(spawn_ns))
        ),
        _ => format!(
            "only {} of {agents} back within {reconnect_deadline:?}",
            fleet.live_total()
        ),
    };
    f.reconnect_cpu = format!(
        "{:.1} CPU seconds for the new coordinator until all were back",
        storm_ticks as f64 / TICKS_PER_SEC
    );
    eprintln!("[{agents}] reconnect: {}; {}", f.reconnect, f.reconnect_cpu);
    fleet.idle(Duration::from_secs(12))?;
    let (rss, _) = memory_kib(pid);
    f.rss_after_restart = format!("{:.1} MiB", rss as f64 / 1024.0);

    // Dispatch latency, one run at a time.
    let ca = coordinator.ca_pem();
    let admin_pem = coordinator.admin_pem();
    let mut admin = rt.block_on(async {
        let mut tries = 0;
        loop {
            match Admin::connect_to(&coordinator.address, &ca, &admin_pem).await {
                Ok(admin) => return Ok(admin),
                Err(e) if tries >= 30 => return Err(e),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })?;
    let connected = rt.block_on(admin.agents_connected())?;
    if connected != agents as u64 {
        eprintln!("[{agents}] the coordinator counts {connected} agents connected");
    }
    let one = trivial_pipeline(1);
    let mut latencies = Vec::new();
    for _ in 0..args.samples {
        let run = rt.block_on(admin.submit(&one))?;
        let acked = now_ns();
        let key = (run.0, 0);
        if !fleet.wait(Duration::from_secs(30), |f| f.acked.contains_key(&key))? {
            anyhow::bail!("run {run} was not dispatched and finished within 30 s");
        }
        if let Some(at) = fleet.dispatched.get(&key) {
            latencies.push(at.saturating_sub(acked) as f64 / 1e6);
        }
    }
    latencies.sort_by(f64::total_cmp);
    f.latency = format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    eprintln!("[{agents}] dispatch latency: {}", f.latency);

    // Throughput: one job per agent, in runs of 500, submitted back to back.
    let burst_start = now_ns();
    let ticks_before = cpu_ticks(pid);
    let mut runs: Vec<(RunId, usize, u128)> = Vec::new();
    let mut left = agents;
    while left > 0 {
        let jobs = left.min(BURST_RUN_JOBS);
        let run = rt.block_on(admin.submit(&trivial_pipeline(jobs)))?;
        runs.push((run, jobs, now_ns()));
        left -= jobs;
    }
    let keys: Vec<(u64, u32, u128)> = runs
        .iter()
        .flat_map(|(run, jobs, at)| (0..*jobs as u32).map(move |i| (run.0, i, *at)))
        .collect();
    let burst_deadline = Duration::from_secs(600);
    let done = fleet.wait(burst_deadline, |f| {
        keys.iter().all(|(r, i, _)| f.acked.contains_key(&(*r, *i)))
    })?;
    let burst_cpu = cpu_ticks(pid).saturating_sub(ticks_before) as f64 / TICKS_PER_SEC;
    let last_ack = keys
        .iter()
        .filter_map(|(r, i, _)| fleet.acked.get(&(*r, *i)))
        .max()
        .copied()
        .unwrap_or(burst_start);
    let last_dispatch = keys
        .iter()
        .filter_map(|(r, i, _)| fleet.dispatched.get(&(*r, *i)))
        .max()
        .copied()
        .unwrap_or(burst_start);
    let acked_count = keys
        .iter()
        .filter(|(r, i, _)| fleet.acked.contains_key(&(*r, *i)))
        .count();
    let mut states = HashMap::<String, usize>::new();
    for (run, _, _) in &runs {
        let state = rt
            .block_on(admin.wait_run(*run, Duration::from_secs(60)))
            .unwrap_or_else(|e| format!("not ended ({e})"));
        *states.entry(state).or_default() += 1;
    }
    let span = secs(last_ack.saturating_sub(burst_start));
    f.throughput = if done {
        format!(
            "{:.0} jobs/s ({agents} jobs in {span:.2} s; all dispatched after {:.2} s; {burst_cpu:.1} CPU s; runs: {states:?})",
            agents as f64 / span,
            secs(last_dispatch.saturating_sub(burst_start))
        )
    } else {
        format!("only {acked_count} of {agents} results stored within {burst_deadline:?}")
    };
    let mut waits: Vec<f64> = keys
        .iter()
        .filter_map(|(r, i, at)| {
            fleet
                .dispatched
                .get(&(*r, *i))
                .map(|d| d.saturating_sub(*at) as f64 / 1e6)
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    f.burst_wait = format!(
        "p50 {:.1} ms, p99 {:.1} ms (run stored → dispatch received, n={})",
        pct(&waits, 0.5),
        pct(&waits, 0.99),
        waits.len()
    );
    eprintln!(
        "[{agents}] throughput: {}; waits {}",
        f.throughput, f.burst_wait
    );
    drop(admin);
    drop(fleet);
    Ok(f)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut all = Vec::new();
    for &agents in &args.scales {
        match measure(&args, agents, &rt) {
            Ok(f) => all.push(f),
            Err(e) => {
                eprintln!("[{agents}] benchmark failed: {e:#}");
                all.push(Figures {
                    agents,
                    enroll: format!("failed: {e:#}"),
                    ..Figures::default()
                });
            }
        }
    }
    println!(
        "gantry scale benchmark ({} build, {} load processes, heartbeats every 5 s)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        args.processes
    );
    for f in &all {
        println!("  {} agents", f.agents);
        let rows = [
            ("enrolling", &f.enroll),
            ("all connected after enrolling", &f.connect),
            ("coordinator without agents", &f.baseline),
            ("coordinator RSS idle", &f.rss_idle),
            ("coordinator CPU idle", &f.cpu_idle),
            ("coordinator descriptors", &f.fds),
            ("load processes idle", &f.load_cpu),
            ("all reconnected after restart", &f.reconnect),
            ("reconnect storm CPU", &f.reconnect_cpu),
            ("coordinator RSS after restart", &f.rss_after_restart),
            ("dispatch latency (one at a time)", &f.latency),
            ("dispatch throughput (burst)", &f.throughput),
            ("wait in that burst", &f.burst_wait),
        ];
        for (name, value) in rows {
            if !value.is_empty() {
                println!("    {name:<34} {value}");
            }
        }
    }
    println!(
        "  targets at 10,000 agents: RSS < 1024 MiB, idle CPU < 25% of one core, all back < 60 s, dispatch p99 < 100 ms"
    );
    Ok(())
}
