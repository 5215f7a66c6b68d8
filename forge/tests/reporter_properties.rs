//! Property tests of the status reporter: random histories of state changes, answers
//! (delivered, server errors, 429s, rate limits with a wait, refusals, transport
//! errors), lost and late answers, spurious ticks and time passing, followed by a drain
//! in which every send succeeds. Checked after every step and at the end:
//! - the queue never exceeds its bounds, and no more requests are out than allowed;
//! - nothing waits without a deadline: while anything is queued or in flight a `Wake`
//!   later than now is returned, and none when nothing waits;
//! - nothing is sent again after the forge refused it (401, 422);
//! - the drain ends, and then, for every key whose newest state the forge did not
//!   refuse, the forge's last applied state is the newest one (queue bounds larger
//!   than the keys, so nothing is dropped).

use std::collections::{HashMap, HashSet};

use gantry_forge::reporter::{
    Command, Event, Reporter, ReporterConfig, RequestId, SendResult, StatusChange,
};
use gantry_forge::status::{job_context, run_context, GantryState, StatusTarget, StatusUpdate};
use gantry_forge::{CommitId, Forge};
use gantry_protocol::UnixMillis;
use proptest::prelude::*;

const REPOS: [&str; 2] = ["alpha", "beta"];
const COMMITS: [char; 3] = ['a', 'b', 'c'];
/// 2 repositories × 3 commits × 2 contexts.
const KEYS: usize = 12;

#[derive(Debug, Clone, Copy)]
enum Op {
    Change {
        key: usize,
        state: u8,
    },
    Answer {
        pick: prop::sample::Index,
        outcome: u8,
    },
    /// The answer never comes (the connection hung; the shell's timeout failed).
    Lose {
        pick: prop::sample::Index,
    },
    /// An answer for a request already written off.
    Late {
        pick: prop::sample::Index,
    },
    Tick,
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 0u8..5).prop_map(|(key, state)| Op::Change { key, state }),
        4 => (any::<prop::sample::Index>(), 0u8..7).prop_map(|(pick, outcome)| Op::Answer { pick, outcome }),
        1 => any::<prop::sample::Index>().prop_map(|pick| Op::Lose { pick }),
        1 => any::<prop::sample::Index>().prop_map(|pick| Op::Late { pick }),
        1 => Just(Op::Tick),
        2 => (0u64..400_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn state(n: u8) -> GantryState {
    match n % 5 {
        0 => GantryState::Queued,
        1 => GantryState::Running,
        2 => GantryState::Succeeded,
        3 => GantryState::Failed,
        _ => GantryState::Cancelled,
    }
}

/// A request the reporter sent: its id, key, and the tag of the state it carries.
#[derive(Debug, Clone, Copy)]
struct Flight {
    id: RequestId,
    key: usize,
    tag: u64,
    deadline: UnixMillis,
}

struct Harness {
    reporter: Reporter,
    config: ReporterConfig,
    now: UnixMillis,
    wake: Option<UnixMillis>,
    /// Sends awaiting an answer.
    in_flight: Vec<Flight>,
    /// Sends whose answer will not come (until, maybe, after they were written off).
    lost: Vec<Flight>,
    /// The tag of each key's newest state.
    newest: HashMap<usize, u64>,
    /// The tag the forge last applied for each key.
    forge: HashMap<usize, u64>,
    refused: HashSet<u64>,
    key_of_tag: HashMap<u64, usize>,
    next_tag: u64,
    target: StatusTarget,
}

impl Harness {
    fn new(config: ReporterConfig) -> Self {
        Self {
            reporter: Reporter::new(config.clone()),
            config,
            now: UnixMillis(1_700_000_000_000),
            wake: None,
            in_flight: Vec::new(),
            lost: Vec::new(),
            newest: HashMap::new(),
            forge: HashMap::new(),
            refused: HashSet::new(),
            key_of_tag: HashMap::new(),
            next_tag: 0,
            target: StatusTarget::new(Forge::Github, "https://api.github.com", "o/r", "t")
                .expect("target"),
        }
    }

    fn change(&mut self, key: usize, n: u8) -> Result<(), TestCaseError> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let repo = REPOS[key / 6];
        let commit = COMMITS[(key / 2) % 3];
        let update = StatusUpdate {
            commit: CommitId::parse(&commit.to_string().repeat(40)).expect("sha"),
            context: if key.is_multiple_of(2) {
                run_context("ci")
            } else {
                job_context("ci", "test")
            },
            state: state(n),
            description: format!("n={tag}"),
            target_url: Some(format!("https://gantry.example/runs/{tag}")),
            git_ref: None,
        };
        let change = StatusChange::new(repo, &self.target, update).expect("change");
        self.newest.insert(key, tag);
        self.key_of_tag.insert(tag, key);
        self.handle(Event::StateChanged(change))
    }

    fn handle(&mut self, event: Event) -> Result<(), TestCaseError> {
        // A request still unanswered at its deadline was never answered: the shell's
        // own timeout is shorter. The reporter writes it off in this call.
        let now = self.now;
        let (expired, open): (Vec<Flight>, Vec<Flight>) =
            self.in_flight.drain(..).partition(|f| f.deadline <= now);
        self.in_flight = open;
        self.lost.extend(expired);
        let commands = self.reporter.handle(self.now, event);
        let mut wakes = Vec::new();
        for command in commands {
            match command {
                Command::Send { id, request, .. } => {
                    let body: serde_json::Value =
                        serde_json::from_slice(&request.body).expect("json body");
                    let tag: u64 = body["description"]
                        .as_str()
                        .and_then(|d| d.rsplit("n=").next())
                        .and_then(|n| n.parse().ok())
                        .expect("tagged description");
                    prop_assert!(
                        !self.refused.contains(&tag),
                        "state {tag} sent again after the forge refused it"
                    );
                    let key = self.key_of_tag[&tag];
                    prop_assert!(
                        !self.in_flight.iter().any(|f| f.key == key),
                        "two requests in flight for key {key}"
                    );
                    let deadline = self.now.plus_millis(self.config.send_deadline_ms);
                    self.in_flight.push(Flight {
                        id,
                        key,
                        tag,
                        deadline,
                    });
                }
                Command::Wake { at } => wakes.push(at),
            }
        }
        prop_assert!(wakes.len() <= 1, "several wakes: {wakes:?}");
        self.wake = wakes.first().copied();
        let waiting = self.reporter.queued() + self.reporter.in_flight();
        if waiting > 0 {
            let at = self.wake;
            prop_assert!(
                at.is_some_and(|at| at > self.now),
                "{waiting} waiting without a deadline after now ({at:?})"
            );
        } else {
            prop_assert!(self.wake.is_none(), "a timer with nothing waiting");
        }
        prop_assert!(self.reporter.queued() <= self.config.max_queued);
        for repo in REPOS {
            prop_assert!(self.reporter.queued_for(repo) <= self.config.max_queued_per_repo);
        }
        let out = self.reporter.in_flight();
        prop_assert!(out <= self.config.max_in_flight);
        prop_assert!(out >= self.in_flight.len() && out <= self.in_flight.len() + self.lost.len());
        Ok(())
    }

    fn answer(&mut self, index: usize, outcome: u8) -> Result<(), TestCaseError> {
        let Flight { id, key, tag, .. } = self.in_flight.remove(index);
        let result = match outcome {
            0 => {
                self.forge.insert(key, tag);
                SendResult::Status(201)
            }
            1 => SendResult::Status(502),
            2 => SendResult::Status(429),
            3 => {
                self.refused.insert(tag);
                SendResult::Status(401)
            }
            4 => {
                self.refused.insert(tag);
                SendResult::Status(422)
            }
            5 => SendResult::Transport("connection reset by peer".into()),
            _ => SendResult::RateLimited {
                retry_after_ms: Some((tag % 3) * 40_000),
            },
        };
        self.handle(Event::Sent { id, result })
    }

    /// A lost request's answer finally arrives, a success. If the reporter had not
    /// written the request off yet, it is an ordinary slow answer and the forge applied
    /// it; if it had, the shell's HTTP timeout (shorter than the reporter's deadline)
    /// had already ended it, so the forge did not.
    fn late(&mut self, index: usize) -> Result<(), TestCaseError> {
        let Flight { id, key, tag, .. } = self.lost.remove(index);
        let stale_before = self.reporter.counters().stale_answers;
        let forge_before = self.forge.get(&key).copied();
        self.forge.insert(key, tag);
        self.handle(Event::Sent {
            id,
            result: SendResult::Status(200),
        })?;
        if self.reporter.counters().stale_answers > stale_before {
            match forge_before {
                Some(previous) => self.forge.insert(key, previous),
                None => self.forge.remove(&key),
            };
        }
        Ok(())
    }

    /// Lets time pass as a shell would, ticking at each wake on the way.
    fn advance(&mut self, ms: u64) -> Result<(), TestCaseError> {
        let until = self.now.plus_millis(ms);
        for _ in 0..10_000 {
            match self.wake {
                Some(at) if at <= until => {
                    self.now = at;
                    self.handle(Event::Tick)?;
                }
                _ => break,
            }
        }
        self.now = until;
        Ok(())
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Change { key, state } => self.change(key, state),
            Op::Answer { pick, outcome } if !self.in_flight.is_empty() => {
                self.answer(pick.index(self.in_flight.len()), outcome)
            }
            Op::Lose { pick } if !self.in_flight.is_empty() => {
                let flight = self.in_flight.remove(pick.index(self.in_flight.len()));
                self.lost.push(flight);
                Ok(())
            }
            Op::Late { pick } if !self.lost.is_empty() => self.late(pick.index(self.lost.len())),
            Op::Tick => self.handle(Event::Tick),
            Op::Advance { ms } => self.advance(ms),
            _ => Ok(()),
        }
    }

    /// Every send succeeds and time runs to each wake, until nothing waits. Lost
    /// requests stay lost: the reporter must write them off by itself.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..100_000 {
            if !self.in_flight.is_empty() {
                self.answer(0, 0)?;
            } else if let Some(at) = self.wake {
                self.now = at;
                self.handle(Event::Tick)?;
            } else {
                break;
            }
        }
        prop_assert_eq!(
            self.reporter.queued() + self.reporter.in_flight(),
            0,
            "the drain did not end"
        );
        // Every state handed in ended exactly one way.
        let c = self.reporter.counters();
        prop_assert_eq!(
            c.changes,
            c.delivered + c.refused + c.gave_up + c.superseded + c.dropped,
            "{:?}",
            c
        );
        Ok(())
    }
}

fn generous() -> ReporterConfig {
    ReporterConfig {
        max_attempts: 1_000,
        max_in_flight: 3,
        max_queued: 64,
        max_queued_per_repo: 32,
        failures_kept: 1_000,
        jitter_seed: 7,
        ..ReporterConfig::default()
    }
}

fn tight() -> ReporterConfig {
    ReporterConfig {
        max_attempts: 3,
        max_in_flight: 1,
        max_queued: 3,
        max_queued_per_repo: 2,
        send_deadline_ms: 10_000,
        retry_base_ms: 1_000,
        retry_cap_ms: 20_000,
        failures_kept: 5,
        jitter_seed: 11,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_newest_state_wins_once_sends_succeed(ops in proptest::collection::vec(op(), 1..120)) {
        let mut h = Harness::new(generous());
        for op in ops {
            h.step(op)?;
        }
        h.drain()?;
        prop_assert_eq!(h.reporter.counters().dropped, 0);
        for (key, newest) in &h.newest {
            if h.refused.contains(newest) {
                continue;
            }
            prop_assert_eq!(h.forge.get(key), Some(newest), "key {} ends on an older state", key);
        }
    }

    #[test]
    fn tight_bounds_hold_and_everything_ends(ops in proptest::collection::vec(op(), 1..200)) {
        let mut h = Harness::new(tight());
        for op in ops {
            h.step(op)?;
        }
        h.drain()?;
        for repo in REPOS {
            prop_assert!(h.reporter.failures(repo).count() <= 5);
        }
    }
}
