//! Isolation benchmark (issue 25): what a job pays for running as its own uid in its
//! own PID namespace and cgroup. Prints, with `--isolation off` and then `required` on
//! the same coordinator and agent in the same run:
//! - dispatch-to-first-output latency of a trivial job (run acknowledged → the job's
//!   first process wrote the time), p50/p90;
//! - wall time of a job running 1,000 short processes (`/bin/true` in a loop, timed
//!   inside the job) and of the whole run (acknowledged → finished), p50.
//!
//! Run as root (isolation needs it): `cargo build --release --bins && cargo run
//! --release -p gantry-tests --bin bench-isolation` (`--samples N` changes the 30).
//! Figures are printed, never asserted. Target: at most 5 ms added per job.

use std::time::Duration;

use gantry_tests::admin::Admin;
use gantry_tests::load::now_ns;
use gantry_tests::pct;
use gantry_tests::{Agent, Coordinator};

/// Longest a benchmark run may take before the benchmark gives up on it.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

fn summary(mut ms: Vec<f64>) -> (f64, String) {
    ms.sort_by(f64::total_cmp);
    let p50 = pct(&ms, 0.5);
    (
        p50,
        format!(
            "p50 {p50:.2} ms, p90 {:.2} ms, max {:.2} ms (n={})",
            pct(&ms, 0.9),
            ms.last().copied().unwrap_or(f64::NAN),
            ms.len()
        ),
    )
}

#[allow(clippy::cast_precision_loss)]
fn ms_between(from: u128, to: u128) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}

/// One mode's samples: (first output, 1,000 processes inside the job, whole run).
struct Figures {
    first_output: Vec<f64>,
    processes: Vec<f64>,
    process_runs: Vec<f64>,
}

async fn measure(
    admin: &mut Admin,
    dir: &std::path::Path,
    samples: usize,
) -> anyhow::Result<Figures> {
    let mut figures = Figures {
        first_output: Vec::new(),
        processes: Vec::new(),
        process_runs: Vec::new(),
    };
    for i in 0..samples {
        let file = dir.join(format!("start-{}-{i}", now_ns()));
        let yaml = format!(
            "jobs:\n  one:\n    steps: [{{ run: 'date +%s%N > {}' }}]\n",
            file.display()
        );
        let run = admin.submit(&yaml).await?;
        let acked = now_ns();
        admin.wait_run(run, RUN_DEADLINE).await?;
        let started: u128 = std::fs::read_to_string(&file)?.trim().parse()?;
        figures.first_output.push(ms_between(acked, started));
    }
    for i in 0..samples.div_ceil(6).max(3) {
        let file = dir.join(format!("procs-{}-{i}", now_ns()));
        let yaml = format!(
            "jobs:\n  many:\n    steps:\n      - run: |\n          s=$(date +%s%N); i=0\n          while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done\n          echo $s $(date +%s%N) > {}\n",
            file.display()
        );
        let run = admin.submit(&yaml).await?;
        let acked = now_ns();
        admin.wait_run(run, RUN_DEADLINE).await?;
        let done = now_ns();
        let text = std::fs::read_to_string(&file)?;
        let mut times = text.split_whitespace().map(str::parse::<u128>);
        let (Some(Ok(from)), Some(Ok(to))) = (times.next(), times.next()) else {
            anyhow::bail!("{} holds {text:?}, not two times", file.display());
        };
        figures.processes.push(ms_between(from, to));
        figures.process_runs.push(ms_between(acked, done));
    }
    Ok(figures)
}

fn main() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let samples: usize = std::env::args()
        .skip_while(|a| a != "--samples")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(30);
    let coordinator = Coordinator::start_with(&gantry_tests::CoordinatorOptions {
        agent_cert_ttl: "7d".into(),
        heartbeat_interval: "5s".into(),
        http: false,
    });
    let mut agent = Agent::enroll(&coordinator.token(&[]), &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The jobs write their times here, whatever uid they run as (not in /tmp nor
    // /var/tmp: an isolated job has its own).
    let scratch = tempfile::tempdir_in("/run")?;
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o1777))?;
    let mut results = Vec::new();
    for mode in ["off", "required"] {
        agent.start_with(&["--isolation", mode]);
        coordinator.wait_connected(1);
        let figures = rt.block_on(async {
            let mut admin = Admin::connect(&coordinator).await?;
            // Warm up: first runs pay for file creation and first-time paths.
            measure(&mut admin, scratch.path(), 3).await?;
            measure(&mut admin, scratch.path(), samples).await
        })?;
        agent.proc().terminate();
        agent.proc = None;
        wait_disconnected(&coordinator);
        results.push((mode, figures));
    }
    let mut p50s = Vec::new();
    for (mode, figures) in results {
        let (first, first_text) = summary(figures.first_output);
        let (procs, procs_text) = summary(figures.processes);
        let (runs, runs_text) = summary(figures.process_runs);
        println!("isolation {mode}:");
        println!("  dispatch to first output of a trivial job: {first_text}");
        println!("  1,000 short processes, inside the job:     {procs_text}");
        println!("  1,000 short processes, whole run:          {runs_text}");
        p50s.push((first, procs, runs));
    }
    if let [off, on] = p50s[..] {
        println!(
            "isolation adds (p50): {:+.2} ms to the first output, {:+.2} ms to 1,000 processes inside the job ({:+.3} ms each), {:+.2} ms to that whole run",
            on.0 - off.0,
            on.1 - off.1,
            (on.1 - off.1) / 1000.0,
            on.2 - off.2
        );
    }
    Ok(())
}

/// The agent has gone from the coordinator's list of connected agents.
fn wait_disconnected(coordinator: &Coordinator) {
    gantry_tests::wait_for("the agent to disconnect", Duration::from_secs(30), || {
        coordinator
            .agents()
            .iter()
            .all(|a| a["state"] != "Connected")
            .then_some(())
    });
}
