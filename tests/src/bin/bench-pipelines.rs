//! Pipelines benchmark: prints
//! - dispatch latency (run acknowledged → the job's process started), p50/p99, with 1 and
//!   with 100 connected agents,
//! - trivial jobs completed per second (one run of 300 `true` jobs on 100 agents),
//! - log throughput of one job printing 200 MB,
//! - live log latency (line written on the agent → line seen by a follower), p50/p99.
//!
//! Run: `cargo build --release --bins && cargo run --release -p gantry-tests --bin bench-pipelines`
//! Figures are printed, never asserted. Targets (issue 3): dispatch p99 < 10 ms, live log
//! p99 < 50 ms on loopback.

use std::time::{Duration, Instant};

use gantry_protocol::{FollowEvent, JobId, StreamOpen};
use gantry_tests::admin::Admin;
use gantry_tests::load::now_ns;
use gantry_tests::pct;
use gantry_tests::{Agent, Coordinator};

/// Longest a benchmark run may take before the benchmark gives up on it.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        pct(&ms, 0.5),
        pct(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
        ms.len()
    )
}

/// Dispatch latency samples: submit a one-job run, read the time its process started.
async fn dispatch_latency(
    admin: &mut Admin,
    dir: &std::path::Path,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for i in 0..samples {
        let file = dir.join(format!("start-{i}"));
        let yaml = format!(
            "jobs:\n  one:\n    steps: [{{ run: 'date +%s%N > {}' }}]\n",
            file.display()
        );
        let acked = {
            let run = admin.submit(&yaml).await?;
            let acked = now_ns();
            admin.wait_run(run, RUN_DEADLINE).await?;
            acked
        };
        let started: u128 = std::fs::read_to_string(&file)?.trim().parse()?;
        out.push(started.saturating_sub(acked) as f64 / 1e6);
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let coordinator = Coordinator::start_with(&gantry_tests::CoordinatorOptions {
        agent_cert_ttl: "7d".into(),
        heartbeat_interval: "5s".into(),
        http: false,
    });
    let token = coordinator.token(&["--uses", "100", "--ttl", "1h"]);
    let mut agents = vec![Agent::enroll(&token, &[])];
    agents[0].start();
    coordinator.wait_connected(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let scratch = tempfile::tempdir()?;
    let mut admin = rt.block_on(Admin::connect(&coordinator))?;

    // Warm up (first run pays for file creation and first-time paths).
    rt.block_on(dispatch_latency(&mut admin, scratch.path(), 5))?;
    let one_agent = rt.block_on(dispatch_latency(&mut admin, scratch.path(), 100))?;

    // Live log latency: a line with its own timestamp every 20 ms, read by a follower.
    let live = rt.block_on(async {
        let run = admin.submit("jobs:\n  tick:\n    steps: [{ run: 'for i in $(seq 1 300); do date +%s%N; sleep 0.02; done' }]\n").await?;
        let job = JobId { run, index: 0 };
        let mut r = admin.follow(&StreamOpen::FollowLogs { job, from_seq: 0, follow: true }).await?;
        let mut lat = Vec::new();
        let mut partial = String::new();
        while let Some(ev) = r.recv::<FollowEvent>().await? {
            match ev {
                FollowEvent::Log(chunk) => {
                    let seen = now_ns();
                    partial.push_str(&String::from_utf8_lossy(&chunk.data));
                    while let Some(nl) = partial.find('\n') {
                        let line: String = partial.drain(..=nl).collect();
                        if let Ok(ts) = line.trim().parse::<u128>() {
                            lat.push(seen.saturating_sub(ts) as f64 / 1e6);
                        }
                    }
                }
                FollowEvent::End { .. } => break,
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(lat)
    })?;

    // 200 MB of output from one job.
    let (log_secs, log_stored) = rt.block_on(async {
        let started = Instant::now();
        let run = admin.submit("jobs:\n  flood:\n    steps: [{ run: 'yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | head -c 200000000' }]\n").await?;
        let job = JobId { run, index: 0 };
        admin.wait_run(run, RUN_DEADLINE).await?;
        // The log is complete once a non-following read returns all of it.
        let mut r = admin.follow(&StreamOpen::FollowLogs { job, from_seq: 0, follow: true }).await?;
        let mut bytes = 0u64;
        while let Some(ev) = r.recv::<FollowEvent>().await? {
            match ev {
                FollowEvent::Log(chunk) => bytes += chunk.data.len() as u64,
                FollowEvent::End { .. } => break,
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>((started.elapsed().as_secs_f64(), bytes))
    })?;

    // 100 agents.
    for _ in 1..100 {
        let mut a = Agent::enroll(&token, &[]);
        a.start();
        agents.push(a);
    }
    coordinator.wait_connected(100);
    let hundred = rt.block_on(dispatch_latency(&mut admin, scratch.path(), 100))?;
    let (jobs, jobs_secs) = rt.block_on(async {
        let yaml: String = std::iter::once("jobs:\n".to_owned())
            .chain((0..300).map(|i| format!("  j{i}:\n    steps: [{{ run: 'true' }}]\n")))
            .collect();
        let started = Instant::now();
        let run = admin.submit(&yaml).await?;
        let state = admin.wait_run(run, RUN_DEADLINE).await?;
        anyhow::ensure!(state == "succeeded", "the 300-job run ended {state}");
        Ok::<_, anyhow::Error>((300, started.elapsed().as_secs_f64()))
    })?;

    println!(
        "gantry pipelines benchmark ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  dispatch latency, 1 agent           {}",
        summary(one_agent)
    );
    println!("  dispatch latency, 100 agents        {}", summary(hundred));
    println!(
        "  trivial jobs, 100 agents            {jobs} jobs in {jobs_secs:.2} s = {:.0} jobs/s",
        f64::from(jobs) / jobs_secs
    );
    println!(
        "  one job printing 200 MB             {log_secs:.2} s = {:.0} MB/s end to end ({:.0} MB stored: the 100 MiB cap keeps head and tail)",
        200.0 / log_secs,
        log_stored as f64 / 1e6
    );
    println!("  live log latency (line -> follower) {}", summary(live));
    drop(admin);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
