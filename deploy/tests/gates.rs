//! The deployment gates, step by step: approvals (the author's, twice by one person),
//! the wait timer and when it counts from, branch rules, one deployment per environment
//! with the others queued in order, aborts before and after the start, rollbacks and
//! agent upgrades. Time is a number; nothing sleeps.

use gantry_deploy::gates::{
    Command, Denial, Event, Gates, Purpose, Refusal, Request, Rules, Stage,
};
use gantry_protocol::{Approval, UnixMillis};

const T0: UnixMillis = UnixMillis(1_000_000);

fn rules(approvals: u32, wait_ms: u64, branches: &[&str]) -> Rules {
    Rules {
        approvals,
        wait_ms,
        branches: branches.iter().map(|b| (*b).to_owned()).collect(),
    }
}

fn release(environment: &str, author: &str, rules: Rules, branch: &str) -> Request {
    Request {
        environment: environment.into(),
        author: author.into(),
        rules,
        purpose: Purpose::Release {
            branch: branch.into(),
        },
    }
}

fn request(gates: &mut Gates, now: UnixMillis, deployment: u64, request: Request) -> Vec<Command> {
    gates.handle(
        now,
        Event::Requested {
            deployment,
            request,
        },
    )
}

fn approve(gates: &mut Gates, now: UnixMillis, deployment: u64, by: &str) -> Vec<Command> {
    gates.handle(
        now,
        Event::Approved {
            deployment,
            by: by.into(),
        },
    )
}

fn start(deployment: u64) -> Command {
    Command::Start { deployment }
}

#[test]
fn a_deployment_with_no_rules_starts_at_once() {
    let mut gates = Gates::new();
    let out = request(
        &mut gates,
        T0,
        1,
        release("prod", "ann", Rules::default(), "x"),
    );
    assert_eq!(out, vec![start(1)]);
    assert_eq!(gates.running("prod"), Some(1));
    assert_eq!(gates.next_deadline(), None);
}

#[test]
fn approvals_need_distinct_people_other_than_the_author_then_the_wait_counts_from_the_last() {
    let mut gates = Gates::new();
    let out = request(
        &mut gates,
        T0,
        7,
        release("prod", "ann", rules(2, 2_000, &[]), "main"),
    );
    assert_eq!(
        out,
        vec![Command::AwaitApproval {
            deployment: 7,
            needed: 2
        }]
    );
    let deny = |by: &str, denial| Command::Deny {
        deployment: 7,
        by: by.into(),
        denial,
    };
    assert_eq!(
        approve(&mut gates, T0.plus_millis(10), 7, "ann"),
        vec![deny("ann", Denial::Author)],
        "the author cannot approve"
    );
    let bob_at = T0.plus_millis(20);
    assert_eq!(
        approve(&mut gates, bob_at, 7, "bob"),
        vec![Command::Approved {
            deployment: 7,
            approval: Approval {
                by: "bob".into(),
                at: bob_at
            }
        }]
    );
    assert_eq!(
        approve(&mut gates, T0.plus_millis(30), 7, "bob"),
        vec![deny("bob", Denial::AlreadyApproved { more: 1 })],
        "one person approves once"
    );
    let cat_at = T0.plus_millis(5_000);
    let until = cat_at.plus_millis(2_000);
    assert_eq!(
        approve(&mut gates, cat_at, 7, "cat"),
        vec![
            Command::Approved {
                deployment: 7,
                approval: Approval {
                    by: "cat".into(),
                    at: cat_at
                }
            },
            Command::AwaitTimer {
                deployment: 7,
                until
            }
        ],
        "the wait counts from the last approval, not the request"
    );
    assert_eq!(
        approve(&mut gates, cat_at, 7, "dan"),
        vec![deny("dan", Denial::NotAwaiting)],
        "approvals are complete"
    );
    assert_eq!(gates.next_deadline(), Some(until));
    assert!(
        gates
            .handle(UnixMillis(until.0 - 1), Event::Tick)
            .is_empty(),
        "not a millisecond early"
    );
    assert_eq!(gates.handle(until, Event::Tick), vec![start(7)]);
    assert_eq!(gates.next_deadline(), None);
    assert_eq!(
        approve(&mut gates, until, 99, "dan"),
        vec![Command::Deny {
            deployment: 99,
            by: "dan".into(),
            denial: Denial::Unknown
        }]
    );
}

#[test]
fn a_wait_with_no_approvals_counts_from_the_request() {
    let mut gates = Gates::new();
    let out = request(
        &mut gates,
        T0,
        1,
        release("prod", "ann", rules(0, 500, &[]), "x"),
    );
    let until = T0.plus_millis(500);
    assert_eq!(
        out,
        vec![Command::AwaitTimer {
            deployment: 1,
            until
        }]
    );
    assert_eq!(
        gates.gate(1).map(|g| g.stage),
        Some(Stage::Waiting { until })
    );
}

#[test]
fn a_branch_that_matches_no_rule_is_refused_and_leaves_no_trace() {
    let mut gates = Gates::new();
    let protected = rules(0, 0, &["main", "release/*"]);
    let refused = request(
        &mut gates,
        T0,
        1,
        release("prod", "ann", protected.clone(), "feature/x"),
    );
    let refusal = Refusal::Branch {
        branch: "feature/x".into(),
        environment: "prod".into(),
        allowed: vec!["main".into(), "release/*".into()],
    };
    assert_eq!(
        refused,
        vec![Command::Refuse {
            deployment: 1,
            refusal: refusal.clone()
        }]
    );
    assert_eq!(
        refusal.to_string(),
        "branch feature/x may not deploy to prod (allowed: main, release/*); `gantry env update prod --branch GLOB` changes that"
    );
    assert_eq!(gates.gates().count(), 0);
    assert_eq!(
        request(
            &mut gates,
            T0,
            2,
            release("prod", "ann", protected, "release/2.0")
        ),
        vec![start(2)]
    );
}

#[test]
fn one_deployment_runs_per_environment_and_the_queue_moves_in_request_order() {
    let mut gates = Gates::new();
    let none = Rules::default;
    assert_eq!(
        request(&mut gates, T0, 1, release("prod", "ann", none(), "x")),
        vec![start(1)]
    );
    // Another environment is independent.
    assert_eq!(
        request(&mut gates, T0, 2, release("stage", "ann", none(), "x")),
        vec![start(2)]
    );
    assert_eq!(
        request(&mut gates, T0, 4, release("prod", "ann", none(), "x")),
        vec![Command::Queue {
            deployment: 4,
            behind: 1
        }]
    );
    // 3 was requested before 4 but approved after: it still goes first.
    request(
        &mut gates,
        T0,
        3,
        release("prod", "ann", rules(1, 0, &[]), "x"),
    );
    let out = approve(&mut gates, T0, 3, "bob");
    assert_eq!(
        out.last(),
        Some(&Command::Queue {
            deployment: 3,
            behind: 1
        })
    );
    assert_eq!(
        gates.handle(T0, Event::Finished { deployment: 1 }),
        vec![start(3)]
    );
    assert_eq!(
        gates.handle(T0, Event::Finished { deployment: 3 }),
        vec![start(4)]
    );
    assert_eq!(gates.handle(T0, Event::Finished { deployment: 4 }), vec![]);
    assert_eq!(gates.running("prod"), None);
    assert_eq!(gates.running("stage"), Some(2));
}

#[test]
fn two_timers_ending_together_start_one_and_queue_the_other() {
    let mut gates = Gates::new();
    request(
        &mut gates,
        T0,
        1,
        release("prod", "ann", rules(0, 100, &[]), "x"),
    );
    request(
        &mut gates,
        T0,
        2,
        release("prod", "ann", rules(0, 100, &[]), "x"),
    );
    assert_eq!(
        gates.handle(T0.plus_millis(100), Event::Tick),
        vec![
            start(1),
            Command::Queue {
                deployment: 2,
                behind: 1
            }
        ]
    );
}

#[test]
fn aborting_before_the_start_cancels_and_after_asks_the_engine() {
    let mut gates = Gates::new();
    request(
        &mut gates,
        T0,
        1,
        release("prod", "ann", Rules::default(), "x"),
    );
    request(
        &mut gates,
        T0,
        2,
        release("prod", "ann", rules(1, 0, &[]), "x"),
    );
    request(
        &mut gates,
        T0,
        3,
        release("prod", "ann", Rules::default(), "x"),
    );
    let abort = |gates: &mut Gates, deployment| {
        gates.handle(
            T0,
            Event::Aborted {
                deployment,
                by: "bob".into(),
            },
        )
    };
    // Aborting one that waits for approval while 1 runs and 3 is queued starts nothing:
    // 1 still runs.
    assert_eq!(
        abort(&mut gates, 2),
        vec![Command::Cancel {
            deployment: 2,
            by: "bob".into()
        }]
    );
    assert_eq!(
        abort(&mut gates, 1),
        vec![Command::Abort {
            deployment: 1,
            by: "bob".into()
        }],
        "a running deployment ends when its engine does"
    );
    assert_eq!(gates.running("prod"), Some(1));
    assert_eq!(
        abort(&mut gates, 3),
        vec![Command::Cancel {
            deployment: 3,
            by: "bob".into()
        }]
    );
    assert_eq!(gates.handle(T0, Event::Finished { deployment: 1 }), vec![]);
    assert!(
        abort(&mut gates, 1).is_empty(),
        "an ended deployment is not aborted twice"
    );
    assert_eq!(gates.gates().count(), 0);
}

#[test]
fn a_rollback_skips_approvals_wait_and_branches_but_not_a_running_deployment() {
    let mut gates = Gates::new();
    let strict = rules(3, 60_000, &["main"]);
    let rollback = |author: &str| Request {
        environment: "prod".into(),
        author: author.into(),
        rules: strict.clone(),
        purpose: Purpose::Rollback,
    };
    assert_eq!(request(&mut gates, T0, 1, rollback("ann")), vec![start(1)]);
    let refusal = Refusal::Running {
        environment: "prod".into(),
        running: 1,
    };
    assert_eq!(gates.admit(&rollback("bob")), Err(refusal.clone()));
    assert_eq!(
        refusal.to_string(),
        "deployment 1 to prod is running; `gantry deploy abort 1` rolls it back"
    );
    // A deployment waiting for approval does not stop a rollback.
    gates.handle(T0, Event::Finished { deployment: 1 });
    request(
        &mut gates,
        T0,
        2,
        release("prod", "ann", strict.clone(), "main"),
    );
    assert_eq!(request(&mut gates, T0, 3, rollback("ann")), vec![start(3)]);
}

#[test]
fn an_agent_upgrade_is_refused_while_another_has_not_ended() {
    let mut gates = Gates::new();
    let upgrade = Request {
        environment: "(agents)".into(),
        author: "ann".into(),
        rules: Rules::default(),
        purpose: Purpose::AgentUpgrade,
    };
    assert_eq!(request(&mut gates, T0, 1, upgrade.clone()), vec![start(1)]);
    let refusal = Refusal::UpgradeUnderWay { pending: 1 };
    assert_eq!(
        request(&mut gates, T0, 2, upgrade.clone()),
        vec![Command::Refuse {
            deployment: 2,
            refusal: refusal.clone()
        }]
    );
    assert_eq!(
        refusal.to_string(),
        "agent upgrade 1 is under way; wait for it or `gantry deploy abort 1`"
    );
    gates.handle(T0, Event::Finished { deployment: 1 });
    assert_eq!(request(&mut gates, T0, 3, upgrade), vec![start(3)]);
}

#[test]
fn a_number_already_pending_is_not_requested_twice() {
    let mut gates = Gates::new();
    request(
        &mut gates,
        T0,
        1,
        release("prod", "ann", rules(1, 0, &[]), "x"),
    );
    assert!(request(
        &mut gates,
        T0,
        1,
        release("prod", "bob", Rules::default(), "x")
    )
    .is_empty());
    assert_eq!(gates.gate(1).map(|g| g.author.as_str()), Some("ann"));
}

#[test]
fn a_record_stored_just_before_a_crash_resumes_from_its_first_stage() {
    // The shell stores a new record with `first_stage` before it feeds the request: a
    // crash in between leaves a ready deployment queued behind nothing. Restored, it
    // starts; a waiting one keeps its timer.
    let ready = release("prod", "ann", Rules::default(), "x");
    let waiting = release("stage", "ann", rules(0, 500, &[]), "x");
    let gate = |r: &Request| gantry_deploy::gates::Gate {
        environment: r.environment.clone(),
        author: r.author.clone(),
        approvals_needed: r.approvals_needed(),
        approvals: Vec::new(),
        wait_ms: r.wait_ms(),
        stage: r.first_stage(T0),
    };
    let mut gates = Gates::restore([(1, gate(&ready)), (2, gate(&waiting))]);
    assert_eq!(gates.handle(T0, Event::Tick), vec![start(1)]);
    assert_eq!(gates.next_deadline(), Some(T0.plus_millis(500)));
}
