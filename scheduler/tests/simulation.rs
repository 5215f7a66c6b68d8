//! Seeded simulations of the scheduler.
//!
//! A simulated week: 10,000 seeded random events over a fleet and a stream of runs,
//! with invariants checked after every event, then a drain to the end. Deterministic:
//! the same seed replays the same week. Finished runs are forgotten as the coordinator
//! would after persisting them, which keeps the working set (and the test) small.
//!
//! A fleet under faults (`fleet`): a coordinator shell, agents and a network with
//! delays, duplicates, broken connections, partitions and crashes of either side, with
//! the whole world's invariants checked after every step. CI runs `CI_SEEDS` fixed
//! seeds; `GANTRY_SIM_SEEDS=N` runs seeds `0..N`, and `GANTRY_SIM_SEED=N` replays one.

mod common;
mod fleet;

use std::collections::BTreeMap;

use common::{apply_op, finish_world, Driver, Rng, World};
use gantry_scheduler::{Command, RunState};

#[test]
fn a_simulated_week_keeps_the_invariants() {
    for seed in [1_u64, 0x5eed] {
        let mut rng = Rng::new(seed);
        let mut world = World::random(&mut rng, 1, (4, 8), 12);
        // A steady stream: about one run per 16 events, so 150 keep the fleet busy without an ever-growing backlog.
        // Every label set the runs ask for exists somewhere in the fleet, so runs stall
        // only on disconnects and quiet hours, as in a real fleet.
        for (n, labels) in common::full_label_space().into_iter().enumerate() {
            world.agents.push((common::agent(100 + n as u8), labels, 2));
        }
        world.runs = (1..=150)
            .map(|run| common::random_run(&mut rng, run, 12))
            .collect();
        let mut d = Driver::default();
        let start = d.now;
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        // About ten coordinator restarts in the week.
        world.restart_below = 4;
        let mut ops = 0_u64;
        while d.history.len() < 10_000 {
            ops += 1;
            // Quiet hours now and then: the fleet idles, leases and offers run out.
            if rng.one_in(100) {
                d.advance_secs(3_600 + rng.below(3_600));
            }
            let (kind, a, b) = (rng.byte(), rng.byte(), rng.byte());
            apply_op(&mut d, &mut world, kind, a, b);
            if ops.is_multiple_of(50) {
                let finished: Vec<_> = d
                    .scheduler
                    .runs()
                    .filter(|(_, s)| s.is_terminal())
                    .collect();
                for (run, state) in finished {
                    *outcomes.entry(format!("{state:?}")).or_default() += 1;
                    assert!(d.forget_run(run));
                }
            }
        }
        assert!(
            d.now.millis_since(start) > 3 * 24 * 3_600_000,
            "at least three days passed"
        );
        finish_world(&mut d, &mut world);
        for (_, state) in d.scheduler.runs() {
            *outcomes.entry(format!("{state:?}")).or_default() += 1;
        }
        let dispatches = d
            .log
            .iter()
            .filter(|c| matches!(c, Command::Dispatch { .. }))
            .count();
        assert!(
            dispatches > 200,
            "seed {seed}: only {dispatches} dispatches"
        );
        // Replaying the same events on a fresh scheduler, without the checks, gives the
        // same commands (determinism) and shows the scheduler's own cost.
        #[allow(
            clippy::disallowed_methods,
            reason = "measures the replay for the figure printed below; decides nothing"
        )]
        let started = std::time::Instant::now();
        let replayed = common::replay(&d.history);
        let took = started.elapsed();
        assert_eq!(replayed, d.log, "seed {seed}: same events, same commands");
        eprintln!(
            "seed {seed}: {} events replayed in {took:?}",
            d.history.len()
        );
        for state in [RunState::Succeeded, RunState::Failed, RunState::Cancelled] {
            assert!(
                outcomes.get(&format!("{state:?}")).copied().unwrap_or(0) > 0,
                "seed {seed}: no run ended {state:?}: {outcomes:?}"
            );
        }
    }
}

/// Seeds the fleet simulation runs in CI: 0..CI_SEEDS, about 1.5 s in all.
const CI_SEEDS: u64 = 16;

/// The seeds to run: `GANTRY_SIM_SEED=N` for one, `GANTRY_SIM_SEEDS=N` for `0..N`,
/// else the CI set.
fn fleet_seeds() -> Vec<u64> {
    let read = |name: &str| {
        std::env::var(name).ok().map(|value| {
            value
                .trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}"))
        })
    };
    if let Some(seed) = read("GANTRY_SIM_SEED") {
        return vec![seed];
    }
    (0..read("GANTRY_SIM_SEEDS").unwrap_or(CI_SEEDS)).collect()
}

#[test]
fn a_fleet_under_crashes_partitions_and_delays_keeps_every_promise() {
    let seeds = fleet_seeds();
    #[allow(
        clippy::disallowed_methods,
        reason = "measures the simulation for the figure it prints; decides nothing"
    )]
    let started = std::time::Instant::now();
    let mut total = fleet::Report::default();
    for &seed in &seeds {
        let report = std::panic::catch_unwind(|| fleet::run_seed(seed)).unwrap_or_else(|panic| {
            eprintln!(
                "fleet simulation failed with seed {seed}; replay it with\n  \
                 GANTRY_SIM_SEED={seed} cargo nextest run -p gantry-scheduler --test simulation fleet"
            );
            std::panic::resume_unwind(panic)
        });
        total += &report;
    }
    eprintln!(
        "{} seeds in {:?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    // Every kind of fault happened and work was still done, so the invariants checked
    // inside were exercised (one replayed seed need not show every kind).
    assert!(
        total.runs > 0 && total.acked_results > 0 && total.acked_chunks > 0,
        "{total:?}"
    );
    if seeds.len() >= 8 {
        for (what, count) in [
            ("coordinator crashes", total.coordinator_crashes),
            ("lost batches", total.lost_batches),
            ("agent crashes", total.agent_crashes),
            ("partitions", total.partitions),
            ("broken connections", total.broken_connections),
            ("duplicates", total.duplicates),
            ("replaced sessions", total.replaced_sessions),
        ] {
            assert!(count > 0, "no {what} in {} seeds: {total:?}", seeds.len());
        }
    }
}
