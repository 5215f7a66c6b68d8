//! Property tests of the deployment gates: random requests (releases from random
//! branches under random rules, rollbacks, agent upgrades) in a few environments, driven
//! by random approvals (by anyone, the author included, twice), aborts, engines ending,
//! late and foreign events and time passing. An observer that knows only what was asked
//! checks every command as it comes out:
//! - no deployment starts without its approvals (distinct people, never the author),
//!   before its wait has passed (counted from its last approval, or its request), or
//!   from a branch its rules do not allow;
//! - two deployments never run at once in one environment, and a queue moves in request
//!   order;
//! - after every step, each deployment that has not ended waits on people, on a deadline
//!   the machine reports, or on a running deployment of its environment: none is stuck;
//! - once people approve and time runs out, every requested deployment has ended
//!   started, refused or cancelled;
//! - a machine restored at random points (from its gates, as the coordinator does from
//!   its records, or through postcard) says exactly what a twin that never stopped says.

use std::collections::{BTreeMap, BTreeSet};

use gantry_deploy::gates::{
    Command, Denial, Event, Gate, Gates, Purpose, Refusal, Request, Rules, Stage,
};
use gantry_protocol::UnixMillis;
use proptest::prelude::*;

const ENVIRONMENTS: [&str; 3] = ["prod", "stage", "(agents)"];
const PEOPLE: [&str; 4] = ["ann", "bob", "cat", "dan"];
const BRANCHES: [&str; 3] = ["main", "release/1", "feature/x"];
const GLOBS: [&[&str]; 3] = [&[], &["main"], &["release/*", "main"]];

/// Where the observer believes a deployment is, from the commands alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Awaiting,
    Waiting(UnixMillis),
    Queued,
    Running,
    Finished,
    Refused,
    Cancelled,
}

#[derive(Debug)]
struct Tracked {
    request: Request,
    approvers: BTreeSet<String>,
    /// When its approvals were complete (its request, if it needs none).
    approved_at: Option<UnixMillis>,
    fate: Fate,
}

impl Tracked {
    fn ended(&self) -> bool {
        matches!(self.fate, Fate::Finished | Fate::Refused | Fate::Cancelled)
    }
}

#[derive(Default)]
struct Observer {
    now: UnixMillis,
    deployments: BTreeMap<u64, Tracked>,
}

impl Observer {
    fn running_in(&self, environment: &str) -> Vec<u64> {
        self.deployments
            .iter()
            .filter(|(_, t)| t.request.environment == environment && t.fate == Fate::Running)
            .map(|(id, _)| *id)
            .collect()
    }

    fn tracked(&mut self, deployment: u64) -> &mut Tracked {
        self.deployments
            .get_mut(&deployment)
            .unwrap_or_else(|| panic!("a command names deployment {deployment}, never requested"))
    }

    fn absorb(&mut self, commands: &[Command]) {
        let now = self.now;
        for command in commands {
            match command {
                Command::Refuse {
                    deployment,
                    refusal,
                } => {
                    let running = |env: &str| self.running_in(env);
                    let justified = match refusal {
                        Refusal::Branch { branch, .. } => {
                            let t = &self.deployments[deployment];
                            !t.request.rules.branches.is_empty()
                                && !t
                                    .request
                                    .rules
                                    .branches
                                    .iter()
                                    .any(|g| gantry_pipeline::glob_match(g, branch))
                        }
                        Refusal::Running {
                            environment,
                            running: r,
                        } => running(environment).contains(r),
                        Refusal::UpgradeUnderWay { pending } => {
                            self.deployments.get(pending).is_some_and(|t| !t.ended())
                        }
                    };
                    assert!(
                        justified,
                        "{deployment} refused without reason: {refusal:?}"
                    );
                    let t = self.tracked(*deployment);
                    assert_eq!(t.fate, Fate::Awaiting, "only a new request is refused");
                    assert!(t.approvers.is_empty());
                    t.fate = Fate::Refused;
                }
                Command::AwaitApproval { deployment, needed } => {
                    let t = self.tracked(*deployment);
                    assert_eq!(*needed, t.request.approvals_needed());
                    assert!(*needed > 0);
                }
                Command::Approved {
                    deployment,
                    approval,
                } => {
                    let t = self.tracked(*deployment);
                    assert_eq!(t.fate, Fate::Awaiting, "approved while {:?}", t.fate);
                    assert_ne!(approval.by, t.request.author, "the author approved");
                    assert!(
                        t.approvers.insert(approval.by.clone()),
                        "{} approved twice",
                        approval.by
                    );
                    assert_eq!(approval.at, now);
                    if t.approvers.len() == t.request.approvals_needed() as usize {
                        t.approved_at = Some(now);
                    }
                }
                Command::Deny {
                    deployment,
                    by,
                    denial,
                } => {
                    let known = self.deployments.get(deployment);
                    match denial {
                        Denial::Unknown => assert!(known.is_none_or(Tracked::ended)),
                        Denial::NotAwaiting => {
                            assert!(known.is_some_and(|t| t.fate != Fate::Awaiting
                                || t.approvers.len() >= t.request.approvals_needed() as usize));
                        }
                        Denial::Author => {
                            assert!(known.is_some_and(|t| t.request.author == *by));
                        }
                        Denial::AlreadyApproved { more } => {
                            let t = known.expect("known");
                            assert!(t.approvers.contains(by));
                            assert_eq!(
                                *more as usize,
                                t.request.approvals_needed() as usize - t.approvers.len()
                            );
                        }
                    }
                }
                Command::AwaitTimer { deployment, until } => {
                    let t = self.tracked(*deployment);
                    let from = t.approved_at.expect("a timer runs only once approved");
                    assert_eq!(*until, from.plus_millis(t.request.wait_ms()));
                    assert!(t.request.wait_ms() > 0);
                    t.fate = Fate::Waiting(*until);
                }
                Command::Queue { deployment, behind } => {
                    let environment = self.tracked(*deployment).request.environment.clone();
                    let b = &self.deployments[behind];
                    assert_eq!(b.request.environment, environment);
                    assert!(
                        b.fate == Fate::Running || (b.fate == Fate::Queued && behind < deployment),
                        "{deployment} queued behind {behind}, which is {:?}",
                        b.fate
                    );
                    self.tracked(*deployment).fate = Fate::Queued;
                }
                Command::Start { deployment } => {
                    let t = &self.deployments[deployment];
                    let environment = t.request.environment.clone();
                    assert!(
                        t.approvers.len() >= t.request.approvals_needed() as usize,
                        "{deployment} started with {} of {} approvals",
                        t.approvers.len(),
                        t.request.approvals_needed()
                    );
                    let ready_at = t
                        .approved_at
                        .expect("approved")
                        .plus_millis(t.request.wait_ms());
                    assert!(
                        now >= ready_at,
                        "{deployment} started at {now:?}, its wait ends at {ready_at:?}"
                    );
                    if let Purpose::Release { branch } = &t.request.purpose {
                        let globs = &t.request.rules.branches;
                        assert!(
                            globs.is_empty()
                                || globs.iter().any(|g| gantry_pipeline::glob_match(g, branch)),
                            "{deployment} started from {branch}, outside {globs:?}"
                        );
                    }
                    assert!(
                        matches!(t.fate, Fate::Awaiting | Fate::Waiting(_) | Fate::Queued),
                        "{deployment} started while {:?}",
                        t.fate
                    );
                    let running = self.running_in(&environment);
                    assert!(
                        running.is_empty(),
                        "{deployment} started while {running:?} run in {environment}"
                    );
                    if t.fate == Fate::Queued {
                        let first = self
                            .deployments
                            .iter()
                            .find(|(_, o)| {
                                o.request.environment == environment && o.fate == Fate::Queued
                            })
                            .map(|(id, _)| *id);
                        assert_eq!(first, Some(*deployment), "the queue moves in request order");
                    }
                    self.tracked(*deployment).fate = Fate::Running;
                }
                Command::Cancel { deployment, .. } => {
                    let t = self.tracked(*deployment);
                    assert!(
                        matches!(t.fate, Fate::Awaiting | Fate::Waiting(_) | Fate::Queued),
                        "cancelled while {:?}",
                        t.fate
                    );
                    t.fate = Fate::Cancelled;
                }
                Command::Abort { deployment, .. } => {
                    assert_eq!(self.tracked(*deployment).fate, Fate::Running);
                }
            }
        }
    }

    /// Nothing that has not ended is left waiting on nothing.
    fn check_live(&self, gates: &Gates) {
        for (id, t) in &self.deployments {
            if t.ended() {
                assert!(gates.gate(*id).is_none(), "{id} ended but is still gated");
                continue;
            }
            let gate = gates
                .gate(*id)
                .unwrap_or_else(|| panic!("{id} vanished while {:?}", t.fate));
            match t.fate {
                Fate::Awaiting => assert_eq!(gate.stage, Stage::AwaitingApproval, "{id}"),
                Fate::Waiting(until) => {
                    assert_eq!(gate.stage, Stage::Waiting { until });
                    let deadline = gates.next_deadline().expect("a timer runs, so a deadline");
                    assert!(
                        deadline <= until,
                        "{id} waits until {until:?}, the deadline is {deadline:?}"
                    );
                }
                Fate::Queued => {
                    assert_eq!(gate.stage, Stage::Queued);
                    assert!(
                        !self.running_in(&t.request.environment).is_empty(),
                        "{id} is queued behind nothing"
                    );
                }
                Fate::Running => assert_eq!(gate.stage, Stage::Running),
                Fate::Finished | Fate::Refused | Fate::Cancelled => unreachable!(),
            }
        }
    }
}

fn request_for(
    environment: u8,
    author: u8,
    purpose: u8,
    approvals: u8,
    wait: u8,
    globs: u8,
) -> Request {
    let environment = ENVIRONMENTS[environment as usize % ENVIRONMENTS.len()];
    let purpose = if environment == "(agents)" {
        Purpose::AgentUpgrade
    } else if purpose.is_multiple_of(4) {
        Purpose::Rollback
    } else {
        Purpose::Release {
            branch: BRANCHES[purpose as usize % BRANCHES.len()].into(),
        }
    };
    Request {
        environment: environment.into(),
        author: PEOPLE[author as usize % PEOPLE.len()].into(),
        rules: Rules {
            approvals: u32::from(approvals % 4),
            wait_ms: [0, 0, 100, 250][wait as usize % 4],
            branches: GLOBS[globs as usize % GLOBS.len()]
                .iter()
                .map(|g| (*g).to_owned())
                .collect(),
        },
        purpose,
    }
}

/// The machine under test, restored now and then, and its twin that never stops.
struct Pair {
    restored: Gates,
    twin: Gates,
}

impl Pair {
    fn handle(&mut self, now: UnixMillis, event: &Event) -> Vec<Command> {
        let out = self.restored.handle(now, event.clone());
        let twin = self.twin.handle(now, event.clone());
        assert_eq!(
            out, twin,
            "a restored machine answered {event:?} differently"
        );
        assert_eq!(self.restored, self.twin);
        out
    }

    fn restore(&mut self, through_postcard: bool) {
        self.restored = if through_postcard {
            let bytes = postcard::to_stdvec(&self.restored).expect("encode");
            postcard::from_bytes(&bytes).expect("decode")
        } else {
            // As the coordinator does: from each record's fields.
            let gates: Vec<(u64, Gate)> = self
                .restored
                .gates()
                .map(|(id, g)| (id, g.clone()))
                .collect();
            Gates::restore(gates)
        };
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn random_histories_keep_every_gate(
        actions in prop::collection::vec(
            (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()),
            0..150,
        ),
    ) {
        let mut pair = Pair { restored: Gates::new(), twin: Gates::new() };
        let mut seen = Observer { now: UnixMillis(1_000_000), ..Observer::default() };
        let mut next_id = 1u64;
        for (what, a, b, c, d, e) in actions {
            let now = seen.now;
            let commands = match what % 12 {
                0..=2 => {
                    let request = request_for(a, b, c, d, e, what / 12);
                    let id = next_id;
                    next_id += 1;
                    seen.deployments.insert(id, Tracked {
                        approved_at: (request.approvals_needed() == 0).then_some(now),
                        request: request.clone(),
                        approvers: BTreeSet::new(),
                        fate: Fate::Awaiting,
                    });
                    // The shell may ask first; whether it does changes nothing.
                    if e.is_multiple_of(2) && pair.restored.admit(&request).is_err() {
                        seen.deployments.get_mut(&id).expect("tracked").fate = Fate::Refused;
                        Vec::new()
                    } else {
                        let out = pair.handle(now, &Event::Requested { deployment: id, request });
                        prop_assert!(!out.is_empty(), "a request is always answered");
                        out
                    }
                }
                3..=5 => {
                    let deployment = u64::from(a) % (next_id + 1);
                    let by = PEOPLE[b as usize % PEOPLE.len()].to_owned();
                    pair.handle(now, &Event::Approved { deployment, by })
                }
                6 => {
                    let deployment = u64::from(a) % (next_id + 1);
                    pair.handle(now, &Event::Aborted { deployment, by: "eve".into() })
                }
                7 | 8 => {
                    // An engine ends: one of the running deployments.
                    let running: Vec<u64> = seen.deployments.iter()
                        .filter(|(_, t)| t.fate == Fate::Running).map(|(id, _)| *id).collect();
                    if running.is_empty() {
                        Vec::new()
                    } else {
                        let deployment = running[a as usize % running.len()];
                        seen.tracked(deployment).fate = Fate::Finished;
                        pair.handle(now, &Event::Finished { deployment })
                    }
                }
                9 => {
                    // A late or foreign end: ignored unless it is running.
                    let deployment = u64::from(a) % (next_id + 1);
                    if seen.deployments.get(&deployment).is_some_and(|t| t.fate == Fate::Running) {
                        seen.tracked(deployment).fate = Fate::Finished;
                    }
                    pair.handle(now, &Event::Finished { deployment })
                }
                10 => {
                    seen.now = now.plus_millis(u64::from(a) * 3);
                    pair.handle(seen.now, &Event::Tick)
                }
                _ => {
                    pair.restore(a.is_multiple_of(2));
                    Vec::new()
                }
            };
            seen.absorb(&commands);
            seen.check_live(&pair.restored);
        }

        // People approve everything still waiting for them, engines end and time runs
        // out: every deployment ends.
        for _ in 0..1_000 {
            let awaiting: Vec<(u64, String)> = pair.restored.gates()
                .filter(|(_, g)| g.stage == Stage::AwaitingApproval)
                .map(|(id, g)| (id, g.author.clone()))
                .collect();
            let running: Vec<u64> = pair.restored.gates()
                .filter(|(_, g)| g.stage == Stage::Running).map(|(id, _)| id).collect();
            if awaiting.is_empty() && running.is_empty() && pair.restored.next_deadline().is_none() {
                break;
            }
            for (deployment, author) in awaiting {
                for by in PEOPLE.iter().filter(|p| **p != author) {
                    let out = pair.handle(seen.now, &Event::Approved { deployment, by: (*by).into() });
                    seen.absorb(&out);
                }
            }
            if let Some(at) = pair.restored.next_deadline() {
                seen.now = seen.now.max(at);
                let out = pair.handle(seen.now, &Event::Tick);
                seen.absorb(&out);
            }
            for deployment in running {
                seen.tracked(deployment).fate = Fate::Finished;
                let out = pair.handle(seen.now, &Event::Finished { deployment });
                seen.absorb(&out);
            }
            seen.check_live(&pair.restored);
        }
        prop_assert_eq!(pair.restored.gates().count(), 0, "gates left pending");
        for (id, t) in &seen.deployments {
            prop_assert!(t.ended(), "deployment {} ended {:?}", id, t.fate);
        }
    }
}
