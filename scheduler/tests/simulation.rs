//! A simulated week: 10,000 seeded random events over a fleet and a stream of runs,
//! with invariants checked after every event, then a drain to the end. Deterministic:
//! the same seed replays the same week. Finished runs are forgotten as the coordinator
//! would after persisting them, which keeps the working set (and the test) small.

mod common;

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
                    assert!(d.scheduler.forget_run(run));
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
