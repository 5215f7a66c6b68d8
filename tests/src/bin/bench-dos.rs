//! Denial-of-service benchmark: prints the dispatch latency (run stored → the agent holds
//! the dispatch, p50 and p99) of a well-behaved agent
//! - alone,
//! - while another agent floods its control stream with heartbeats as fast as it can
//!   (and how many per second it gets through, and the coordinator's CPU meanwhile),
//! - while hundreds of clients without certificates connect over and over (half silent
//!   after the handshake, half sending hellos that are refused).
//!
//! Run: `cargo build --release --bins && cargo run --release -p gantry-tests --bin bench-dos`
//! (`--runs N` changes the 50 dispatches per phase, `--storm N` the 300 storm clients).
//! Each phase lasts at least 10 s (the flood's after 3 s to fill its windows), one
//! dispatch after another, so the well-behaved agent's own load is the same in each.
//! Figures are printed, never asserted: `tests/dos.rs` asserts generous bounds.

use std::time::{Duration, Instant};

use gantry_protocol::Labels;
use gantry_tests::flood::{self, Flooder, Storm, StormKind};
use gantry_tests::peers::RawAgent;
use gantry_tests::{Agent, Coordinator};

fn arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of a process so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

fn report(what: &str, latencies: &[Duration]) {
    println!(
        "{what:44} p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}  ({} dispatches)",
        flood::quantile(latencies, 0.5),
        flood::quantile(latencies, 0.99),
        flood::quantile(latencies, 1.0),
        latencies.len()
    );
}

/// Dispatches for at least 10 s and `runs` dispatches: their latencies, and the
/// coordinator's CPU meanwhile (percent of one core).
async fn phase(
    admin: &mut gantry_tests::raw::RawClient,
    agent: &mut RawAgent,
    runs: usize,
    pid: u32,
) -> (Vec<Duration>, f64) {
    let (cpu0, at0) = (cpu(pid), Instant::now());
    let mut latencies = Vec::new();
    while latencies.len() < runs || at0.elapsed() < Duration::from_secs(10) {
        latencies.extend(flood::dispatch_latencies(admin, agent, "good", 1).await);
    }
    let busy = cpu(pid).saturating_sub(cpu0).as_secs_f64() / at0.elapsed().as_secs_f64();
    (latencies, busy * 100.0)
}

fn main() {
    let runs = arg("--runs", 50);
    let storm_clients = arg("--storm", 300);
    let mut c = Coordinator::start();
    let pid = c.server().pid();
    let token = c.token(&["--uses", "2"]);
    let good = Agent::enroll(&token, &[]);
    let bad = Agent::enroll(&token, &[]);
    let ca_der = gantry_certs::pem_to_der(&c.ca_pem()).expect("ca der");
    let admin_pem = c.admin_pem();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut admin = flood::admin(&c.address, &ca_der, &admin_pem).await;
        let mut agent = RawAgent::connect_with_labels(
            &c.address,
            good.dir.path(),
            Labels::from([("lat".to_owned(), "good".to_owned())]),
        )
        .await;
        // Warm up (first runs parse, allocate, open files).
        flood::dispatch_latencies(&mut admin, &mut agent, "good", 5).await;
        let alone = phase(&mut admin, &mut agent, runs, pid).await;
        report("alone", &alone.0);
        println!("  coordinator CPU {:.0}% of one core", alone.1);

        let flooder = Flooder::heartbeats(&c.address, bad.dir.path()).await;
        // Steady state: the first seconds only fill the flow-control windows.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (sent0, at0) = (flooder.sent(), Instant::now());
        let during = phase(&mut admin, &mut agent, runs, pid).await;
        let secs = at0.elapsed().as_secs_f64();
        report("one agent flooding heartbeats", &during.0);
        println!(
            "  coordinator CPU {:.0}% of one core; flooder: {} heartbeats written in the first 3 s, {:.0}/s after; {}",
            during.1,
            sent0,
            (flooder.sent() - sent0) as f64 / secs,
            flooder
                .closed()
                .map_or_else(|| "still connected".to_owned(), |r| format!("closed: {r}"))
        );
        drop(flooder);

        let silent = Storm::start(&c.address, &ca_der, storm_clients / 2, StormKind::Silent);
        let hellos = Storm::start(&c.address, &ca_der, storm_clients / 2, StormKind::Hello);
        let at0 = Instant::now();
        let stormed = phase(&mut admin, &mut agent, runs, pid).await;
        let secs = at0.elapsed().as_secs_f64();
        report(&format!("{storm_clients} clients without certificates"), &stormed.0);
        println!(
            "  coordinator CPU {:.0}% of one core; storm: {:.0} handshakes/s, {:.0} hellos refused/s",
            stormed.1,
            (silent.handshakes() + hellos.handshakes()) as f64 / secs,
            hellos.refusals() as f64 / secs,
        );
    });
}
