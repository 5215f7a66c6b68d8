//! The deployment engine, step by step: each strategy's path, failures within and past
//! the budget, deadlines, promotion and abort. Time is a number; nothing sleeps.

use gantry_deploy::{
    Amount, CanaryStep, Command, Deployment, Event, HostState, Limits, Outcome, Pause, Phase, Plan,
    StepError, Strategy,
};
use gantry_protocol::{AgentId, UnixMillis};

fn agent(n: u8) -> AgentId {
    AgentId::from_random(&[n; 6])
}

fn plan(hosts: u8, strategy: Strategy) -> Plan {
    Plan {
        hosts: (1..=hosts).map(agent).collect(),
        strategy,
        limits: Limits {
            stage_ms: 1_000,
            activate_ms: 1_000,
            verify_ms: 1_000,
            rollback_ms: 1_000,
            promotion_timeout_ms: 10_000,
            stage_seeds: 0,
        },
    }
}

fn rolling(batch: u32, budget: u32) -> Strategy {
    Strategy::Rolling {
        batch: Amount::Count(batch),
        failure_budget: Amount::Count(budget),
        pause_ms: 0,
    }
}

/// The operations a batch of commands asks for, as (kind, host) pairs.
fn ops(commands: &[Command]) -> Vec<(&'static str, AgentId)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Stage { host } => Some(("stage", host.clone())),
            Command::Activate { host } => Some(("activate", host.clone())),
            Command::Verify { host } => Some(("verify", host.clone())),
            Command::Rollback { host } => Some(("rollback", host.clone())),
            _ => None,
        })
        .collect()
}

fn t(ms: u64) -> UnixMillis {
    UnixMillis(1_000_000 + ms)
}

/// How a test host answers an operation: `None` is silence.
type Answer<'a> = &'a dyn Fn(&str, &AgentId) -> Option<Result<(), String>>;

/// Answers every operation a batch asked for with `answer(kind, host)`, recursively,
/// until nothing more is asked. Returns every operation asked for.
fn drive(
    d: &mut Deployment,
    now: UnixMillis,
    first: &[Command],
    answer: Answer<'_>,
) -> Vec<(&'static str, AgentId)> {
    let mut asked = Vec::new();
    let mut pending = ops(first);
    while let Some((kind, host)) = pending.pop() {
        asked.push((kind, host.clone()));
        let Some(result) = answer(kind, &host) else {
            continue;
        };
        let result = result.map_err(StepError::from);
        let event = match kind {
            "stage" => Event::Staged { host, result },
            "activate" => Event::Activated { host, result },
            "verify" => Event::Verified { host, result },
            _ => Event::RolledBack { host, result },
        };
        pending.extend(ops(&d.handle(now, event)));
    }
    asked
}

#[allow(clippy::unnecessary_wraps)] // it must have the shape of an `Answer`
fn all_ok(_: &str, _: &AgentId) -> Option<Result<(), String>> {
    Some(Ok(()))
}

#[test]
fn a_rolling_deployment_stages_everywhere_then_switches_in_batches() {
    let mut d = Deployment::new(plan(5, rolling(2, 0)));
    let started = d.handle(t(0), Event::Start);
    let stages = ops(&started);
    assert_eq!(stages.len(), 5, "every host stages before any switch");
    assert!(stages.iter().all(|(k, _)| *k == "stage"));
    let asked = drive(&mut d, t(1), &started, &all_ok);
    assert_eq!(
        d.phase(),
        &Phase::Done(Outcome::Succeeded { failed_hosts: 0 })
    );
    assert!(d.hosts().iter().all(|h| h.state == HostState::Active));
    // Waves of 2, 2, 1: the first activation only after the last stage answer.
    let first_activate = asked
        .iter()
        .position(|(k, _)| *k == "activate")
        .expect("activate");
    assert!(asked[..first_activate].iter().all(|(k, _)| *k == "stage"));
    assert_eq!(
        d.waves().iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 2, 1]
    );
}

#[test]
fn a_failure_past_the_budget_rolls_back_every_switched_host() {
    let mut d = Deployment::new(plan(4, rolling(2, 0)));
    let bad = agent(3);
    let started = d.handle(t(0), Event::Start);
    let asked = drive(&mut d, t(1), &started, &|kind, host| {
        Some(if kind == "activate" && *host == bad {
            Err("health check: connection refused".into())
        } else {
            Ok(())
        })
    });
    let Phase::Done(Outcome::RolledBack { reason }) = d.phase() else {
        panic!("expected a rollback, got {:?}", d.phase());
    };
    assert!(
        reason.contains("more than the failure budget of 0"),
        "{reason}"
    );
    let rolled: Vec<&AgentId> = asked
        .iter()
        .filter(|(k, _)| *k == "rollback")
        .map(|(_, h)| h)
        .collect();
    // Wave 1 (hosts 1, 2) switched and went back; host 3 failed and went back; host 4
    // (same wave) was switched too and went back; nothing else was touched.
    for h in d.hosts() {
        if h.touched {
            assert_eq!(h.state, HostState::RolledBack, "{}", h.agent);
            assert!(rolled.contains(&&h.agent));
        } else {
            assert_eq!(h.state, HostState::Untouched);
            assert!(
                !rolled.contains(&&h.agent),
                "untouched hosts are not rolled back"
            );
        }
    }
}

#[test]
fn a_failure_within_the_budget_rolls_back_that_host_alone() {
    let mut d = Deployment::new(plan(4, rolling(4, 1)));
    let bad = agent(2);
    let started = d.handle(t(0), Event::Start);
    drive(&mut d, t(1), &started, &|kind, host| {
        Some(if kind == "activate" && *host == bad {
            Err("unhealthy".into())
        } else {
            Ok(())
        })
    });
    assert_eq!(
        d.phase(),
        &Phase::Done(Outcome::Succeeded { failed_hosts: 1 })
    );
    for h in d.hosts() {
        let want = if h.agent == bad {
            HostState::RolledBack
        } else {
            HostState::Active
        };
        assert_eq!(h.state, want, "{}", h.agent);
    }
}

#[test]
fn budgets_are_exceeded_only_by_more_failures_than_allowed() {
    // Percent budgets round up: 25% of 4 hosts is 1 host.
    assert_eq!(Amount::Percent(25).of(4), 1);
    assert_eq!(Amount::Percent(10).of(15), 2);
    assert_eq!(Amount::Percent(0).of(15), 0);
    assert_eq!(Amount::Count(9).of(3), 3);
    let d = Deployment::new(plan(
        4,
        Strategy::Rolling {
            batch: Amount::Percent(50),
            failure_budget: Amount::Percent(25),
            pause_ms: 0,
        },
    ));
    assert_eq!(d.failure_budget(), 1);
}

#[test]
fn a_host_that_never_answers_fails_at_its_deadline() {
    let mut d = Deployment::new(plan(3, rolling(3, 1)));
    let silent = agent(2);
    let started = d.handle(t(0), Event::Start);
    drive(&mut d, t(1), &started, &|kind, host| {
        (kind == "stage" || *host != silent).then_some(Ok(()))
    });
    assert!(matches!(d.phase(), Phase::Wave { index: 0 }));
    let deadline = d.next_deadline().expect("the silent host has a deadline");
    let after = d.handle(deadline, Event::Tick);
    // Within the budget: it is sent back (and that rollback has its own deadline).
    assert!(ops(&after).contains(&("rollback", silent.clone())));
    let deadline = d.next_deadline().expect("rollback deadline");
    d.handle(deadline, Event::Tick);
    assert_eq!(
        d.phase(),
        &Phase::Done(Outcome::Succeeded { failed_hosts: 1 })
    );
    let host = d.hosts().iter().find(|h| h.agent == silent).expect("host");
    assert!(
        matches!(host.state, HostState::RollbackFailed { .. }),
        "{:?}",
        host.state
    );
    assert!(d.next_deadline().is_none(), "nothing waits any more");
}

#[test]
fn staging_failures_past_the_budget_end_the_deployment_before_any_switch() {
    let mut d = Deployment::new(plan(3, rolling(1, 0)));
    let started = d.handle(t(0), Event::Start);
    let asked = drive(&mut d, t(1), &started, &|kind, host| {
        Some(if kind == "stage" && *host == agent(1) {
            Err("disk full".into())
        } else {
            Ok(())
        })
    });
    assert!(
        matches!(d.phase(), Phase::Done(Outcome::Failed { .. })),
        "{:?}",
        d.phase()
    );
    assert!(
        !asked.iter().any(|(k, _)| *k == "activate"),
        "nothing was switched"
    );
}

fn canary(pause: Pause) -> Strategy {
    Strategy::Canary {
        steps: vec![
            CanaryStep { percent: 25, pause },
            CanaryStep { percent: 50, pause },
            CanaryStep {
                percent: 100,
                pause: Pause::For { ms: 0 },
            },
        ],
        failure_budget: Amount::Count(0),
    }
}

#[test]
fn a_canary_waits_for_promotion_then_goes_on() {
    let mut d = Deployment::new(plan(8, canary(Pause::UntilPromoted)));
    let started = d.handle(t(0), Event::Start);
    drive(&mut d, t(1), &started, &all_ok);
    let Phase::AwaitingPromotion { next, reason, .. } = d.phase().clone() else {
        panic!("expected a pause, got {:?}", d.phase());
    };
    assert_eq!(next, 1);
    assert!(reason.contains("2 of 8 hosts"), "{reason}");
    let active = d
        .hosts()
        .iter()
        .filter(|h| h.state == HostState::Active)
        .count();
    assert_eq!(active, 2, "25% switched");
    let promoted = d.handle(t(2), Event::Promote);
    drive(&mut d, t(3), &promoted, &all_ok);
    assert!(matches!(
        d.phase(),
        Phase::AwaitingPromotion { next: 2, .. }
    ));
    let promoted = d.handle(t(4), Event::Promote);
    drive(&mut d, t(5), &promoted, &all_ok);
    assert_eq!(
        d.phase(),
        &Phase::Done(Outcome::Succeeded { failed_hosts: 0 })
    );
}

#[test]
fn an_aborted_canary_rolls_back_its_canaries_only() {
    let mut d = Deployment::new(plan(8, canary(Pause::UntilPromoted)));
    let started = d.handle(t(0), Event::Start);
    drive(&mut d, t(1), &started, &all_ok);
    let aborted = d.handle(
        t(2),
        Event::Abort {
            by: "gantry://admin/ops".into(),
        },
    );
    let rolled = ops(&aborted);
    assert_eq!(rolled.len(), 2, "the two canaries: {rolled:?}");
    drive(&mut d, t(3), &aborted, &all_ok);
    assert!(
        matches!(d.phase(), Phase::Done(Outcome::RolledBack { reason }) if reason.contains("aborted by gantry://admin/ops"))
    );
    assert_eq!(
        d.hosts()
            .iter()
            .filter(|h| h.state == HostState::RolledBack)
            .count(),
        2
    );
    assert_eq!(
        d.hosts()
            .iter()
            .filter(|h| h.state == HostState::Untouched)
            .count(),
        6
    );
}

#[test]
fn a_canary_analysis_without_answer_pauses_and_never_promotes_by_itself() {
    let mut d = Deployment::new(plan(4, canary(Pause::For { ms: 500 })));
    let started = d.handle(t(0), Event::Start);
    drive(&mut d, t(1), &started, &all_ok);
    assert!(matches!(d.phase(), Phase::Paused { .. }));
    // The pause ends: the canary is checked again, and does not answer.
    let checks = d.handle(t(600), Event::Tick);
    assert_eq!(ops(&checks).len(), 1);
    assert!(matches!(d.phase(), Phase::Verifying { .. }));
    d.handle(t(2_000), Event::Tick);
    let Phase::AwaitingPromotion { reason, until, .. } = d.phase().clone() else {
        panic!("expected a pause, got {:?}", d.phase());
    };
    assert!(reason.contains("inconclusive"), "{reason}");
    // Nobody promotes: past the promotion timeout it rolls back, not forward.
    let ended = d.handle(until, Event::Tick);
    drive(&mut d, until, &ended, &all_ok);
    assert!(
        matches!(d.phase(), Phase::Done(Outcome::RolledBack { reason }) if reason.contains("not promoted")),
        "{:?}",
        d.phase()
    );
}

#[test]
fn a_failed_canary_analysis_rolls_back() {
    let mut d = Deployment::new(plan(4, canary(Pause::For { ms: 0 })));
    let started = d.handle(t(0), Event::Start);
    // Everything passes until the canary's re-check.
    drive(&mut d, t(1), &started, &|kind, _| {
        (kind != "verify").then_some(Ok(()))
    });
    let checks = d.handle(t(2), Event::Tick);
    drive(&mut d, t(3), &checks, &|kind, _| {
        Some(if kind == "verify" {
            Err("error rate 12%".into())
        } else {
            Ok(())
        })
    });
    assert!(
        matches!(d.phase(), Phase::Done(Outcome::RolledBack { reason }) if reason.contains("failure budget")),
        "{:?}",
        d.phase()
    );
}

#[test]
fn blue_green_switches_all_hosts_at_once_and_switches_back_on_failure() {
    let bg = Strategy::BlueGreen {
        failure_budget: Amount::Count(0),
    };
    let mut ok = Deployment::new(plan(3, bg.clone()));
    let started = ok.handle(t(0), Event::Start);
    drive(&mut ok, t(1), &started, &all_ok);
    assert_eq!(ok.waves().len(), 1, "one traffic switch for every host");
    assert_eq!(
        ok.phase(),
        &Phase::Done(Outcome::Succeeded { failed_hosts: 0 })
    );

    let mut bad = Deployment::new(plan(3, bg));
    let started = bad.handle(t(0), Event::Start);
    let asked = drive(&mut bad, t(1), &started, &|kind, host| {
        Some(if kind == "activate" && *host == agent(3) {
            Err("switch hook failed".into())
        } else {
            Ok(())
        })
    });
    assert!(matches!(
        bad.phase(),
        Phase::Done(Outcome::RolledBack { .. })
    ));
    assert_eq!(asked.iter().filter(|(k, _)| *k == "rollback").count(), 3);
}

#[test]
fn an_on_demand_rollback_skips_staging_and_reports_failed_hosts() {
    let mut d = Deployment::new(plan(5, Strategy::Rollback { parallelism: 2 }));
    let started = d.handle(t(0), Event::Start);
    assert!(ops(&started).iter().all(|(k, _)| *k == "activate"));
    assert_eq!(ops(&started).len(), 2, "two at a time");
    drive(&mut d, t(1), &started, &|_, host| {
        Some(if *host == agent(4) {
            Err("release gone".into())
        } else {
            Ok(())
        })
    });
    assert_eq!(
        d.phase(),
        &Phase::Done(Outcome::Succeeded { failed_hosts: 1 })
    );
    let failed = d
        .hosts()
        .iter()
        .find(|h| h.agent == agent(4))
        .expect("host");
    assert!(matches!(failed.state, HostState::RollbackFailed { .. }));
}

#[test]
fn seeded_staging_starts_few_hosts_and_grows_as_hosts_finish() {
    let mut p = plan(10, rolling(10, 0));
    p.limits.stage_seeds = 2;
    let mut d = Deployment::new(p);
    let started = d.handle(t(0), Event::Start);
    assert_eq!(
        ops(&started).len(),
        2,
        "two seeds fetch from the coordinator"
    );
    let more = d.handle(
        t(1),
        Event::Staged {
            host: agent(1),
            result: Ok(()),
        },
    );
    assert_eq!(ops(&more).len(), 3, "one staged host lets two more start");
}

#[test]
fn late_and_foreign_reports_change_nothing() {
    let mut d = Deployment::new(plan(2, rolling(2, 0)));
    d.handle(t(0), Event::Start);
    let before = d.clone();
    let stranger = d.handle(
        t(1),
        Event::Activated {
            host: agent(9),
            result: Err("x".into()),
        },
    );
    assert!(ops(&stranger).is_empty());
    let early = d.handle(
        t(1),
        Event::RolledBack {
            host: agent(1),
            result: Ok(()),
        },
    );
    assert!(ops(&early).is_empty());
    assert_eq!(d, before, "nothing changed");
}
