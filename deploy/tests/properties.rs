//! Property tests: random plans driven by random event sequences (answers, failures,
//! silence, late and foreign reports, promotions, aborts, time passing). After every
//! step and at the end:
//! - a deployment that is not over always has a deadline (it can never hang);
//! - a rollback is only ever sent to a host the deployment switched (or tried to);
//! - a success never has more failed hosts than the budget allows;
//! - once time runs out every host is in a terminal state, none unknown;
//! - a rolled-back deployment leaves every switched host rolled back (or its rollback
//!   failed, said so), and no host running the release.

use std::collections::BTreeSet;

use gantry_deploy::{
    Amount, CanaryStep, Command, Deployment, Event, HostState, Limits, Outcome, Pause, Phase, Plan,
    StepError, Strategy,
};
use gantry_protocol::{AgentId, UnixMillis};
use proptest::prelude::*;

fn agent(n: u8) -> AgentId {
    AgentId::from_random(&[n; 6])
}

fn amount(kind: u8, value: u8) -> Amount {
    if kind.is_multiple_of(2) {
        Amount::Count(u32::from(value % 5))
    } else {
        Amount::Percent(value % 101)
    }
}

fn strategy(kind: u8, a: u8, b: u8, c: u8) -> Strategy {
    match kind % 4 {
        0 => Strategy::Rolling {
            batch: amount(a, b.max(1)),
            failure_budget: amount(b, c),
            pause_ms: u64::from(c % 3) * 100,
        },
        1 => Strategy::Canary {
            steps: (0..=(a % 3))
                .map(|i| CanaryStep {
                    percent: (i + 1) * 30,
                    pause: if (b >> i) & 1 == 0 {
                        Pause::UntilPromoted
                    } else {
                        Pause::For {
                            ms: u64::from(c % 4) * 100,
                        }
                    },
                })
                .collect(),
            failure_budget: amount(a, b % 3),
        },
        2 => Strategy::BlueGreen {
            failure_budget: amount(b, c % 3),
        },
        _ => Strategy::Rollback {
            parallelism: u32::from(a % 4),
        },
    }
}

/// Operations asked for and not yet answered.
#[derive(Default)]
struct World {
    outstanding: Vec<(&'static str, AgentId)>,
    rollback_targets: BTreeSet<AgentId>,
}

impl World {
    fn absorb(&mut self, d: &Deployment, commands: &[Command]) {
        for c in commands {
            let op = match c {
                Command::Stage { host } => ("stage", host.clone()),
                Command::Activate { host } => ("activate", host.clone()),
                Command::Verify { host } => ("verify", host.clone()),
                Command::Rollback { host } => {
                    let touched = d.hosts().iter().any(|h| &h.agent == host && h.touched);
                    assert!(touched, "rollback sent to {host}, which was never switched");
                    self.rollback_targets.insert(host.clone());
                    ("rollback", host.clone())
                }
                _ => continue,
            };
            self.outstanding.push(op);
        }
    }
}

fn event_for(kind: &str, host: AgentId, result: Result<(), StepError>) -> Event {
    match kind {
        "stage" => Event::Staged { host, result },
        "activate" => Event::Activated { host, result },
        "verify" => Event::Verified { host, result },
        _ => Event::RolledBack { host, result },
    }
}

fn check_running(d: &Deployment) {
    if !d.is_done() && d.phase() != &Phase::NotStarted {
        assert!(
            d.next_deadline().is_some(),
            "a running deployment must always wait on a deadline: {:?}\n{:?}",
            d.phase(),
            d.hosts()
        );
    }
    if let Phase::Done(Outcome::Succeeded { failed_hosts }) = d.phase() {
        assert!(
            *failed_hosts as usize <= d.failure_budget()
                || matches!(d.plan().strategy, Strategy::Rollback { .. }),
            "success with {failed_hosts} failures over a budget of {}",
            d.failure_budget()
        );
        assert_eq!(*failed_hosts, d.failures());
    }
}

fn check_done(d: &Deployment) {
    let Phase::Done(outcome) = d.phase() else {
        panic!("not done after time ran out: {:?}", d.phase());
    };
    for h in d.hosts() {
        assert!(
            h.state.is_terminal() || h.state == HostState::Active,
            "host {} ended {:?}",
            h.agent,
            h.state
        );
        assert!(h.state.deadline().is_none());
    }
    match outcome {
        Outcome::RolledBack { .. } => {
            for h in d.hosts() {
                assert_ne!(
                    h.state,
                    HostState::Active,
                    "{} still runs the release",
                    h.agent
                );
                if h.touched {
                    assert!(
                        matches!(
                            h.state,
                            HostState::RolledBack | HostState::RollbackFailed { .. }
                        ),
                        "switched host {} ended {:?}",
                        h.agent,
                        h.state
                    );
                }
            }
        }
        Outcome::Failed { .. } => {
            assert!(
                d.hosts().iter().all(|h| !h.touched),
                "a failed deployment switched nothing"
            );
        }
        Outcome::Succeeded { .. } => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_histories_keep_every_invariant(
        hosts in 1u8..12,
        kind in any::<u8>(),
        a in any::<u8>(),
        b in any::<u8>(),
        c in any::<u8>(),
        seeds in 0u32..3,
        actions in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..120),
    ) {
        let plan = Plan {
            hosts: (1..=hosts).map(agent).collect(),
            strategy: strategy(kind, a, b, c),
            limits: Limits {
                stage_ms: 1_000,
                activate_ms: 1_000,
                verify_ms: 500,
                rollback_ms: 1_000,
                promotion_timeout_ms: 5_000,
                stage_seeds: seeds,
            },
        };
        let mut d = Deployment::new(plan);
        let mut world = World::default();
        let mut now = UnixMillis(1_000_000);
        let started = d.handle(now, Event::Start);
        world.absorb(&d, &started);
        check_running(&d);
        for (what, pick, extra) in actions {
            let commands = match what % 10 {
                // Answer an outstanding operation, mostly with success.
                0..=5 if !world.outstanding.is_empty() => {
                    let (kind, host) = world.outstanding.remove(pick as usize % world.outstanding.len());
                    let result = if extra.is_multiple_of(5) { Err("boom".into()) } else { Ok(()) };
                    d.handle(now, event_for(kind, host, result))
                }
                // Drop an operation: its host never answers.
                6 if !world.outstanding.is_empty() => {
                    world.outstanding.remove(pick as usize % world.outstanding.len());
                    Vec::new()
                }
                // A late or foreign report.
                7 => {
                    let host = agent(pick % 14 + 1);
                    let kind = ["stage", "activate", "verify", "rollback"][extra as usize % 4];
                    d.handle(now, event_for(kind, host, Ok(())))
                }
                8 => {
                    now = now.plus_millis(u64::from(extra) * 20);
                    d.handle(now, Event::Tick)
                }
                _ => {
                    if extra.is_multiple_of(7) {
                        d.handle(now, Event::Abort { by: "prop".into() })
                    } else {
                        d.handle(now, Event::Promote)
                    }
                }
            };
            world.absorb(&d, &commands);
            check_running(&d);
        }
        // Time runs out: nobody answers any more.
        for _ in 0..200 {
            let Some(at) = d.next_deadline() else { break };
            now = now.max(at);
            let commands = d.handle(now, Event::Tick);
            world.absorb(&d, &commands);
            check_running(&d);
        }
        check_done(&d);
        // Only switched hosts were ever sent a rollback (checked as they were sent), and
        // no host a rollback was sent to ends up running the release.
        for host in &world.rollback_targets {
            let h = d.hosts().iter().find(|h| &h.agent == host).expect("target");
            prop_assert_ne!(&h.state, &HostState::Active, "{} was rolled back yet runs the release", host);
        }
    }
}

#[test]
fn a_deployment_survives_a_round_trip_through_postcard() {
    let plan = Plan {
        hosts: (1..=3).map(agent).collect(),
        strategy: strategy(1, 2, 3, 4),
        limits: Limits::default(),
    };
    let mut d = Deployment::new(plan);
    d.handle(UnixMillis(5), Event::Start);
    let bytes = postcard::to_stdvec(&d).expect("encode");
    let back: Deployment = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(
        back, d,
        "the coordinator persists and restores deployments whole"
    );
}
