//! Service containers benchmark (issue 26): what `services:` adds to a job. Prints, for
//! a shell job running `true` on one agent with the host's Docker engine:
//! - the job's duration (the agent's start to finish, so network and containers
//!   created, waited for and removed) without services, with one service that has no
//!   health check (ready once it has run for 0.5 s), and with one whose health check
//!   (`wget` of busybox's `httpd`, every 100 ms) must pass, p50/p90;
//! - the "ready after" time the agent logs for the service (create, start, healthy).
//!
//! The image is imported from the host's static busybox, so no registry is involved:
//! `cargo build --bins && cargo run -p gantry-tests --bin bench-services` (`--samples N`
//! changes the 10). Figures are printed, never asserted.

use std::time::Duration;

use gantry_tests::containers::{busybox_image, BUSYBOX};
use gantry_tests::pct;
use gantry_tests::{job_named, Coordinator};

/// Longest one benchmark run may take.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms (n={})",
        pct(&ms, 0.5),
        pct(&ms, 0.9),
        ms.last().copied().unwrap_or(f64::NAN),
        ms.len()
    )
}

/// The number after "is ready after " in a job's log.
fn ready_ms(log: &str) -> Option<f64> {
    let rest = log.split("is ready after ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let samples: usize = args
        .iter()
        .position(|a| a == "--samples")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(10), |s| s.parse())?;
    anyhow::ensure!(
        std::path::Path::new(BUSYBOX).is_file(),
        "bench-services needs busybox-static at {BUSYBOX} (apt-get install busybox-static)"
    );
    let image = busybox_image(
        "gantry-bench-services",
        &["sh", "sleep", "httpd", "wget"],
        &[("www/index.html", "ok\n")],
    );
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let tag = &image.tag;
    let modes = [
        ("no services", String::new()),
        (
            "one service, no health check",
            format!("    services:\n      idle:\n        image: {tag}\n        command: [sleep, '300']\n"),
        ),
        (
            "one service with a health check every 100 ms",
            format!("    services:\n      web:\n        image: {tag}\n        command: [httpd, -f, -p, '8080', -h, /www]\n        ports: ['8080']\n        health:\n          cmd: wget -q -O /dev/null http://127.0.0.1:8080/\n          interval: 100ms\n          retries: 100\n"),
        ),
    ];
    println!("bench-services: {samples} jobs per mode, one at a time, one agent");
    for (name, services) in &modes {
        let yaml = format!("jobs:\n  one:\n{services}    steps: [{{ run: 'true' }}]\n");
        let (mut durations, mut ready) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let run = c.run_pipeline(&yaml, &[]);
            let view = c.wait_run(run, RUN_DEADLINE);
            let job = job_named(&view, "one");
            anyhow::ensure!(job["state"] == "succeeded", "the job failed: {view}");
            let started = job["started_at"].as_f64().unwrap_or(f64::NAN);
            let finished = job["finished_at"].as_f64().unwrap_or(f64::NAN);
            durations.push(finished - started);
            if let Some(ms) = ready_ms(&c.logs(&format!("{run}.0"))) {
                ready.push(ms);
            }
        }
        println!("{name}:");
        println!("  job duration: {}", summary(durations));
        if !ready.is_empty() {
            println!("  service ready after: {}", summary(ready));
        }
    }
    Ok(())
}
