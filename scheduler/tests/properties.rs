//! Property tests: random worlds (1–3 runs of up to 12 jobs with random DAGs, 1–4 agents
//! with random labels and slots) under random interleavings of every event, with time
//! advancing. `Driver::step` checks after every event that no job is held twice, no agent
//! exceeds its slots, nothing is dispatched before its needs are terminal or to a
//! non-matching agent, and the scheduler's indexes agree with its states; the drain then
//! checks that every job and run reaches a terminal state.

mod common;

use common::{apply_op, finish_world, Driver, Rng, World};
use proptest::prelude::*;

proptest! {
    // No regression files: a failure prints its seed and shrunk ops, which is what a
    // fixed unit test should be made of.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_event_sequences_keep_the_invariants(
        seed in any::<u64>(),
        ops in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..300),
    ) {
        let mut rng = Rng::new(seed);
        let mut world = World::random(&mut rng, 3, (1, 4), 12);
        let mut d = Driver::default();
        for (kind, a, b) in ops {
            apply_op(&mut d, &mut world, kind, a, b);
        }
        finish_world(&mut d, &mut world);
    }
}
