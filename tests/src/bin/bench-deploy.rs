//! Deployment benchmark: prints
//! - staging time of a 100 MB release (random bytes, so nothing deduplicates) to 5, 10
//!   and 20 hosts, with and without peer fetching: first as this machine allows, then
//!   with every host's link and the coordinator's emulated at `--link` MiB/s each way
//!   (`--max-transfer-rate` on the agents, `[artifacts] max_send_rate` on the
//!   coordinator);
//! - the time to roll back 20 hosts (`gantry rollback`, end to end, and the deployment's
//!   own duration);
//! - the `gantry exec` round trip of `true` on 1, 10 and 100 agents (one admin
//!   connection held open; and the CLI end to end, its process start and handshake
//!   included).
//!
//! Why emulated links: every host here is a process on the same 2 cores, so without a
//! cap each host's download competes with every other for CPU, and staging time grows
//! with the total bytes moved whatever the scheme. On real hosts each has its own link
//! and CPU; the cap puts the bottleneck where it is in a fleet (the links), which is what
//! peer fetching is for. Both are printed.
//!
//! Run: `cargo build --release --bins && cargo run --release -p gantry-tests --bin bench-deploy`
//! Options: `--size-mb 100`, `--hosts 5,10,20`, `--link 16` (MiB/s; 0 skips the emulated
//! runs), `--exec-agents 100`, `--peers-only` (skips the runs without peer fetching,
//! the longest ones with emulated links). Figures are printed, never asserted. Targets (issue 5):
//! staging time from 5 to 20 hosts grows less than 1.5 times; `exec` on 100 agents
//! under 100 ms.

use std::time::{Duration, Instant};

use gantry_protocol::{ExecEvent, ExecRequest, Labels, StreamOpen};
use gantry_tests::admin::Admin;
use gantry_tests::pct;
use gantry_tests::{Agent, Coordinator, CoordinatorOptions};
use serde_json::Value;

/// Longest a benchmark deployment may take.
const RUN_DEADLINE: Duration = Duration::from_secs(900);

struct Options {
    size_mb: u64,
    hosts: Vec<usize>,
    link_mib: u64,
    exec_agents: usize,
    peers_only: bool,
}

fn options() -> anyhow::Result<Options> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Ok(Options {
        size_mb: value("--size-mb").map_or(Ok(100), |v| v.parse())?,
        hosts: match value("--hosts") {
            Some(v) => v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            None => vec![5, 10, 20],
        },
        link_mib: value("--link").map_or(Ok(16), |v| v.parse())?,
        exec_agents: value("--exec-agents").map_or(Ok(100), |v| v.parse())?,
        peers_only: args.iter().any(|a| a == "--peers-only"),
    })
}

/// Builds `size_mb` MB of random bytes as an artifact and deploys it to every
/// `role=web` host at once (staging is what is measured; switching is a no-op).
fn pipeline(size_mb: u64, marker: &str) -> String {
    format!(
        r"
name: bench
jobs:
  build:
    runs-on: {{ role: build }}
    steps:
      - run: |
          mkdir -p out
          head -c {size_mb}000000 /dev/urandom > out/blob
          echo {marker} > out/marker
    artifacts: {{ name: blob, paths: [out/] }}
  ship:
    needs: build
    deploy:
      environment: bench
      artifact: blob
      app: blob
      strategy: rolling
      rolling: {{ batch: 100%, failure-budget: 0 }}
      hooks:
        start: 'true'
        stop: 'true'
        timeout: 10s
      health:
        command: 'true'
        interval: 50ms
        retries: 1
        deadline: 10s
      timeouts: {{ stage: 10m, activate: 1m }}
"
    )
}

/// The newest deployment's view.
fn latest_deployment(c: &Coordinator) -> anyhow::Result<Value> {
    let list = c
        .gantry(&["deployments", "list", "--env", "bench", "--json"])
        .json();
    let id = list[0]["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no deployment: {list}"))?;
    Ok(
        c.gantry(&["deployments", "show", &id.to_string(), "--json"])
            .json(),
    )
}

/// Staging time: from the deployment's start to its last host staged.
fn staging_secs(d: &Value) -> anyhow::Result<f64> {
    let started = d["started_at"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("not started: {d}"))?;
    let last = d["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().filter_map(|h| h["staged_at"].as_u64()).max())
        .ok_or_else(|| anyhow::anyhow!("no host staged: {d}"))?;
    Ok((last.saturating_sub(started)) as f64 / 1000.0)
}

/// Removes what a host kept from earlier runs (chunk cache, deployed releases), so every
/// run fetches the whole release.
fn reset(agent: &Agent) {
    for dir in ["cache", "deploy"] {
        let _ = std::fs::remove_dir_all(agent.dir.path().join(dir));
    }
}

fn stop(agents: &mut [Agent]) {
    for a in agents {
        if let Some(p) = a.proc.as_mut() {
            p.terminate();
        }
        a.proc = None;
    }
}

fn start(agents: &mut [Agent], extra: &[String]) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    for a in agents {
        a.start_with(&extra);
    }
}

/// Deploys a fresh `size_mb` release to `hosts` fresh hosts; returns the staging time.
fn staging_run(
    c: &Coordinator,
    web: &mut [Agent],
    hosts: usize,
    size_mb: u64,
    flags: &[String],
) -> anyhow::Result<(f64, Value)> {
    stop(web);
    for a in &web[..hosts] {
        reset(a);
    }
    start(&mut web[..hosts], flags);
    c.wait_connected(hosts + 1);
    let run = c.run_pipeline(&pipeline(size_mb, "staging"), &[]);
    let view = c.wait_run(run, RUN_DEADLINE);
    anyhow::ensure!(view["state"] == "succeeded", "the run failed: {view}");
    let d = latest_deployment(c)?;
    Ok((staging_secs(&d)?, d))
}

fn staging(
    c: &mut Coordinator,
    web: &mut [Agent],
    o: &Options,
    link: Option<u64>,
) -> anyhow::Result<Vec<(usize, f64, f64)>> {
    let mut rows = Vec::new();
    for &hosts in &o.hosts {
        let mut flags: Vec<String> = Vec::new();
        if let Some(mib) = link {
            flags.extend(["--max-transfer-rate".into(), format!("{mib}MiB")]);
        }
        let mut off = flags.clone();
        off.extend(["--peer-listen".into(), "off".into()]);
        let without = if o.peers_only {
            f64::NAN
        } else {
            staging_run(c, web, hosts, o.size_mb, &off)?.0
        };
        let (with, d) = staging_run(c, web, hosts, o.size_mb, &flags)?;
        let from_peers: Vec<String> = d["log"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["text"].as_str())
            .filter(|t| t.contains("staged release"))
            .filter_map(|t| t.split_once("chunks (").map(|(_, r)| r.to_owned()))
            .take(1)
            .collect();
        let without_text = if without.is_nan() {
            "skipped".to_owned()
        } else {
            format!("{without:.2} s")
        };
        println!(
            "  {hosts:>3} hosts: {without_text:>9} without peers, {with:>7.2} s with peers  (a host's line: {})",
            from_peers.first().map_or("-", String::as_str)
        );
        rows.push((hosts, without, with));
    }
    Ok(rows)
}

fn growth(rows: &[(usize, f64, f64)]) {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return;
    };
    println!(
        "  growth from {} to {} hosts: {:.2}x without peers, {:.2}x with peers (target < 1.5x with peers)",
        first.0,
        last.0,
        last.1 / first.1,
        last.2 / first.2
    );
}

/// `gantry rollback` of every host, after a second release: end to end and the
/// deployment's own duration.
fn rollback(c: &Coordinator, web: &mut [Agent], hosts: usize) -> anyhow::Result<()> {
    stop(web);
    for a in &web[..hosts] {
        reset(a);
    }
    start(&mut web[..hosts], &[]);
    c.wait_connected(hosts + 1);
    for marker in ["v1", "v2"] {
        let run = c.run_pipeline(&pipeline(1, marker), &[]);
        let view = c.wait_run(run, RUN_DEADLINE);
        anyhow::ensure!(view["state"] == "succeeded", "the run failed: {view}");
    }
    let started = Instant::now();
    let out = c.gantry(&[
        "rollback",
        "bench",
        "--parallel",
        &hosts.to_string(),
        "--json",
    ]);
    let wall = started.elapsed();
    anyhow::ensure!(
        out.code == 0,
        "rollback failed: {} {}",
        out.stdout,
        out.stderr
    );
    let d = out.json();
    let took = d["finished_at"].as_u64().unwrap_or(0) as f64
        - d["started_at"].as_u64().unwrap_or(0) as f64;
    let back = web[..hosts]
        .iter()
        .filter(|a| {
            std::fs::read_to_string(a.dir.path().join("deploy/blob/current/out/marker"))
                .is_ok_and(|m| m.trim() == "v1")
        })
        .count();
    println!(
        "  {hosts} hosts back on v1 ({back} checked on disk): {:.0} ms for the deployment, {:.0} ms end to end (CLI start to exit)",
        took,
        wall.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (n={})",
        pct(&ms, 0.5),
        pct(&ms, 0.9),
        ms.last().copied().unwrap_or(f64::NAN),
        ms.len()
    )
}

/// One exec of `true` on the agents labelled `select`, over a held admin connection:
/// from opening the stream to the last host's result.
async fn exec_once(admin: &Admin, select: &str) -> anyhow::Result<(f64, usize)> {
    let (key, value) = select
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("bad selector"))?;
    let request = ExecRequest {
        select: Labels::from([(key.to_owned(), value.to_owned())]),
        parallel: 0,
        command: "true".into(),
        timeout_ms: 30_000,
    };
    let started = Instant::now();
    let mut events = admin.follow(&StreamOpen::Exec(request)).await?;
    let mut expected = usize::MAX;
    let mut done = 0;
    while done < expected {
        match events.recv::<ExecEvent>().await? {
            Some(ExecEvent::Targets(hosts)) => expected = hosts.len(),
            Some(ExecEvent::Done { result, agent, .. }) => {
                anyhow::ensure!(result == Ok(0), "{agent}: {result:?}");
                done += 1;
            }
            Some(ExecEvent::Output { .. }) => {}
            Some(ExecEvent::Refused { message }) => anyhow::bail!("refused: {message}"),
            None => anyhow::bail!("the exec stream ended after {done} of {expected}"),
        }
    }
    Ok((started.elapsed().as_secs_f64() * 1000.0, done))
}

fn exec(c: &Coordinator, count: usize, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let token = c.token(&["--uses", &count.to_string(), "--ttl", "1h"]);
    let mut agents: Vec<Agent> = (0..count)
        .map(|i| {
            let mut labels = vec!["--label", "exec=all"];
            if i < 10 {
                labels.extend(["--label", "first10=yes"]);
            }
            if i == 0 {
                labels.extend(["--label", "first1=yes"]);
            }
            Agent::enroll(&token, &labels)
        })
        .collect();
    start(&mut agents, &[]);
    c.wait_connected(count + 1);
    let admin = rt.block_on(Admin::connect(c))?;
    for (select, n) in [("first1=yes", 1), ("first10=yes", 10), ("exec=all", count)] {
        if n > count {
            continue;
        }
        // Warm up: the first exec on each agent pays for its first process spawn.
        rt.block_on(exec_once(&admin, select))?;
        let mut held = Vec::new();
        for _ in 0..30 {
            let (ms, hosts) = rt.block_on(exec_once(&admin, select))?;
            anyhow::ensure!(hosts == n, "{hosts} of {n} hosts answered");
            held.push(ms);
        }
        let mut cli = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            let out = c.gantry(&["exec", "--select", select, "--", "true"]);
            anyhow::ensure!(out.code == 0, "gantry exec failed: {}", out.stderr);
            cli.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "  {n:>3} agents: held connection {}; CLI end to end {}",
            summary(held),
            summary(cli)
        );
    }
    stop(&mut agents);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let most = o.hosts.iter().copied().max().unwrap_or(0).max(20);
    println!(
        "bench-deploy: {} MB releases to {:?} hosts, emulated links {} MiB/s, exec on up to {} agents",
        o.size_mb, o.hosts, o.link_mib, o.exec_agents
    );
    let mut c = Coordinator::start_with(&CoordinatorOptions {
        agent_cert_ttl: "7d".into(),
        heartbeat_interval: "5s".into(),
        http: false,
    });
    let mut builder = Agent::enroll(&c.token(&[]), &["--label", "role=build"]);
    builder.start();
    let token = c.token(&["--uses", &most.to_string(), "--ttl", "1h"]);
    let mut web: Vec<Agent> = (0..most)
        .map(|_| Agent::enroll(&token, &["--label", "role=web"]))
        .collect();
    c.gantry(&["env", "create", "bench", "--select", "role=web"])
        .expect_code(0);
    c.wait_connected(1);

    println!("\nstaging, every host on this machine's 2 cores (no link cap):");
    let rows = staging(&mut c, &mut web, &o, None)?;
    growth(&rows);

    println!("\nrolling back {most} hosts:");
    rollback(&c, &mut web, most)?;

    if o.link_mib > 0 {
        stop(&mut web);
        c.restart_with_config(&format!(
            "[artifacts]\nmax_send_rate = \"{}MiB\"\n",
            o.link_mib
        ));
        c.wait_connected(1);
        println!(
            "\nstaging with emulated links: every host and the coordinator at {} MiB/s each way:",
            o.link_mib
        );
        let rows = staging(&mut c, &mut web, &o, Some(o.link_mib))?;
        growth(&rows);
    }
    stop(&mut web);

    println!("\n`gantry exec -- true` round trip:");
    let rt = tokio::runtime::Runtime::new()?;
    exec(&c, o.exec_agents, &rt)?;
    Ok(())
}
