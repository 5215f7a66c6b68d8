//! Example-based tests of the scheduler's semantics, one behaviour each.

mod common;

use common::{agent, connect, jid, labels, plan, submit, Driver};
use gantry_protocol::{JobId, Labels, RunId, UnixMillis};
use gantry_scheduler::{
    Command, Event, FailReason, JobState, Outcome, PlanError, RunState, Scheduler, StatusExpr,
    LEASE_DURATION_SECS, OFFER_TIMEOUT_SECS, TIMEOUT_GRACE_SECS,
};

/// The agent and attempt holding a job; panics if none does.
fn holder(d: &Driver, job: JobId) -> (gantry_protocol::AgentId, u32) {
    let state = d.state(job);
    let (agent, attempt) = state
        .agent()
        .unwrap_or_else(|| panic!("{job} is {state:?}"));
    (agent.clone(), attempt)
}

fn accept(d: &mut Driver, job: JobId) -> Vec<Command> {
    let (agent, attempt) = holder(d, job);
    d.step(Event::JobAccepted {
        job,
        attempt,
        agent,
    })
}

fn finish(d: &mut Driver, job: JobId, outcome: Outcome) -> Vec<Command> {
    let (agent, attempt) = holder(d, job);
    d.step(Event::JobFinished {
        job,
        attempt,
        agent,
        outcome,
    })
}

fn run_to(d: &mut Driver, job: JobId, outcome: Outcome) {
    accept(d, job);
    finish(d, job, outcome);
}

fn failed(code: i32) -> Outcome {
    Outcome::Failed { exit_code: code }
}

/// One agent with plenty of slots and no labels.
fn driver_with_agent() -> Driver {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 16));
    d
}

fn is_offered(state: &JobState) -> bool {
    matches!(state, JobState::Offered { .. })
}

#[test]
fn dag_jobs_wait_for_their_needs() {
    // 0 → 1 → 3, 0 → 2 → 3 (a diamond).
    let mut d = driver_with_agent();
    d.step(submit(
        1,
        "p",
        0,
        vec![
            plan(1, 0, &[]),
            plan(1, 1, &[0]),
            plan(1, 2, &[0]),
            plan(1, 3, &[1, 2]),
        ],
    ));
    assert!(is_offered(&d.state(jid(1, 0))));
    for index in 1..=3 {
        assert_eq!(d.state(jid(1, index)), JobState::Pending);
    }
    run_to(&mut d, jid(1, 0), Outcome::Succeeded);
    assert!(is_offered(&d.state(jid(1, 1))));
    assert!(is_offered(&d.state(jid(1, 2))));
    assert_eq!(d.state(jid(1, 3)), JobState::Pending);
    run_to(&mut d, jid(1, 1), Outcome::Succeeded);
    assert_eq!(d.state(jid(1, 3)), JobState::Pending, "still needs 2");
    run_to(&mut d, jid(1, 2), Outcome::Succeeded);
    run_to(&mut d, jid(1, 3), Outcome::Succeeded);
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Succeeded));
    let order: Vec<u32> = d.dispatches().iter().map(|(j, _, _)| j.index).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
}

#[test]
fn matrix_fan_in_runs_after_every_cell() {
    let mut d = driver_with_agent();
    let mut jobs: Vec<_> = (0..4).map(|i| plan(1, i, &[])).collect();
    jobs.push(plan(1, 4, &[0, 1, 2, 3]));
    d.step(submit(1, "p", 0, jobs));
    for cell in 0..4 {
        assert_eq!(d.state(jid(1, 4)), JobState::Pending, "before cell {cell}");
        run_to(&mut d, jid(1, cell), Outcome::Succeeded);
    }
    assert!(is_offered(&d.state(jid(1, 4))));
}

#[test]
fn conditions_decide_after_needs_finish() {
    // (outcome of the need, continue_on_error of the need, condition of the dependent,
    //  whether the dependent runs)
    let success = Outcome::Succeeded;
    let failure = failed(1);
    let cases = [
        (success, false, StatusExpr::Success, true),
        (failure, false, StatusExpr::Success, false),
        (success, false, StatusExpr::Failure, false),
        (failure, false, StatusExpr::Failure, true),
        (failure, false, StatusExpr::Always, true),
        (success, false, StatusExpr::Always, true),
        (failure, true, StatusExpr::Success, true),
        (failure, true, StatusExpr::Failure, false),
        (success, false, StatusExpr::Cancelled, false),
        (Outcome::TimedOut, false, StatusExpr::Failure, true),
        (
            failure,
            false,
            StatusExpr::Or(vec![StatusExpr::Success, StatusExpr::Failure]),
            true,
        ),
    ];
    for (n, (outcome, continue_on_error, condition, runs)) in cases.into_iter().enumerate() {
        let mut d = driver_with_agent();
        let mut need = plan(1, 0, &[]);
        need.continue_on_error = continue_on_error;
        let mut dependent = plan(1, 1, &[0]);
        dependent.condition = condition.clone();
        d.step(submit(1, "p", 0, vec![need, dependent]));
        run_to(&mut d, jid(1, 0), outcome);
        let state = d.state(jid(1, 1));
        if runs {
            assert!(is_offered(&state), "case {n}: {condition:?} → {state:?}");
        } else {
            assert_eq!(state, JobState::Skipped, "case {n}: {condition:?}");
        }
    }
}

#[test]
fn skipped_jobs_propagate_but_failure_sees_through_them() {
    // 0 fails; 1 (success) is skipped; 2 needs 1 with success → skipped; 3 needs 1 with
    // failure() → runs, because 0 is a transitive ancestor.
    let mut d = driver_with_agent();
    let mut on_failure = plan(1, 3, &[1]);
    on_failure.condition = StatusExpr::Failure;
    d.step(submit(
        1,
        "p",
        0,
        vec![
            plan(1, 0, &[]),
            plan(1, 1, &[0]),
            plan(1, 2, &[1]),
            on_failure,
        ],
    ));
    run_to(&mut d, jid(1, 0), failed(2));
    assert_eq!(d.state(jid(1, 1)), JobState::Skipped);
    assert_eq!(d.state(jid(1, 2)), JobState::Skipped);
    assert!(is_offered(&d.state(jid(1, 3))));
    run_to(&mut d, jid(1, 3), Outcome::Succeeded);
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Failed));
}

#[test]
fn continue_on_error_keeps_the_run_green() {
    let mut d = driver_with_agent();
    let mut flaky = plan(1, 0, &[]);
    flaky.continue_on_error = true;
    d.step(submit(1, "p", 0, vec![flaky, plan(1, 1, &[0])]));
    run_to(&mut d, jid(1, 0), failed(1));
    assert_eq!(
        d.state(jid(1, 0)),
        JobState::Failed {
            reason: FailReason::ExitCode(1)
        }
    );
    run_to(&mut d, jid(1, 1), Outcome::Succeeded);
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Succeeded));
}

#[test]
fn manual_jobs_wait_for_approval() {
    let mut d = driver_with_agent();
    let mut deploy = plan(1, 1, &[0]);
    deploy.manual = true;
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[]), deploy]));
    assert!(
        d.step(Event::Approve { job: jid(1, 1) }).is_empty(),
        "too early: ignored"
    );
    run_to(&mut d, jid(1, 0), Outcome::Succeeded);
    assert_eq!(d.state(jid(1, 1)), JobState::AwaitingApproval);
    d.advance_secs(3600);
    d.step(Event::Tick);
    assert_eq!(d.state(jid(1, 1)), JobState::AwaitingApproval);
    let out = d.step(Event::Approve { job: jid(1, 1) });
    assert!(out
        .iter()
        .any(|c| matches!(c, Command::Dispatch { job, .. } if *job == jid(1, 1))));
}

#[test]
fn failures_are_retried_up_to_retry_times() {
    let mut d = driver_with_agent();
    let mut job = plan(1, 0, &[]);
    job.retry = 2;
    d.step(submit(1, "p", 0, vec![job]));
    for expected_attempt in 1..=3 {
        assert_eq!(holder(&d, jid(1, 0)).1, expected_attempt);
        run_to(&mut d, jid(1, 0), failed(7));
    }
    assert_eq!(
        d.state(jid(1, 0)),
        JobState::Failed {
            reason: FailReason::ExitCode(7)
        }
    );
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Failed));
}

#[test]
fn lost_leases_use_infra_retries_then_fail_lost() {
    let mut d = driver_with_agent();
    let mut job = plan(1, 0, &[]);
    job.retry = 5; // must not be spent on losses
    job.infra_retries = 2;
    d.step(submit(1, "p", 0, vec![job]));
    for expected_attempt in 1..=3 {
        assert_eq!(holder(&d, jid(1, 0)).1, expected_attempt);
        accept(&mut d, jid(1, 0));
        d.step(Event::AgentDisconnected { agent: agent(1) });
        d.advance_secs(LEASE_DURATION_SECS - 1);
        d.step(Event::Tick);
        assert!(
            matches!(d.state(jid(1, 0)), JobState::Running { .. }),
            "lease still valid"
        );
        d.advance_secs(1);
        d.step(Event::Tick);
        assert!(
            !matches!(d.state(jid(1, 0)), JobState::Running { .. }),
            "lease ran out"
        );
        d.step(connect(&agent(1), Labels::new(), 16));
    }
    assert_eq!(
        d.state(jid(1, 0)),
        JobState::Failed {
            reason: FailReason::Lost
        }
    );
}

/// Regression (found by the fleet simulation, seed 0): an agent reconnects while the
/// coordinator still holds its old session; the new session starts, then the old one's
/// end is reported. The agent must still get work: with a connected flag, that late end
/// left a live agent marked disconnected until its next reconnect, and jobs only it
/// could run waited forever.
#[test]
fn a_replaced_sessions_late_end_does_not_disconnect_the_new_session() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 1));
    d.step(connect(&agent(1), Labels::new(), 1));
    d.step(Event::AgentDisconnected { agent: agent(1) });
    assert_eq!(d.scheduler.agent_is_connected(&agent(1)), Some(true));
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[])]));
    assert_eq!(
        holder(&d, jid(1, 0)),
        (agent(1), 1),
        "dispatched to the live session"
    );
    // Once the new session ends too, nothing more goes to the agent.
    d.step(Event::AgentDisconnected { agent: agent(1) });
    assert_eq!(d.scheduler.agent_is_connected(&agent(1)), Some(false));
    finish(&mut d, jid(1, 0), Outcome::Succeeded);
    d.step(submit(2, "p", 0, vec![plan(2, 0, &[])]));
    assert_eq!(d.state(jid(2, 0)), JobState::Queued);
    // A stray end (none left to end) does not make the count wrap or go negative.
    d.step(Event::AgentDisconnected { agent: agent(1) });
    d.step(connect(&agent(1), Labels::new(), 1));
    assert_eq!(holder(&d, jid(2, 0)), (agent(1), 1));
}

#[test]
fn reconnect_keeps_reported_jobs_and_loses_the_rest() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 2));
    let mut long = plan(1, 0, &[]);
    long.timeout_ms = 0; // no timeout: only the lease can end it
    d.step(submit(1, "p", 0, vec![long, plan(1, 1, &[])]));
    accept(&mut d, jid(1, 0));
    accept(&mut d, jid(1, 1));
    d.step(Event::AgentDisconnected { agent: agent(1) });
    d.advance_secs(20);
    d.step(Event::Tick);
    // Back within the lease, still running 1.0 but no longer 1.1 (and a stray attempt).
    let out = d.step(Event::AgentConnected {
        agent: agent(1),
        labels: Labels::new(),
        slots: 2,
        running: vec![(jid(1, 0), 1), (jid(9, 9), 4)],
    });
    assert!(
        out.contains(&Command::Cancel {
            job: jid(9, 9),
            attempt: 4,
            agent: agent(1)
        }),
        "stray attempt is stopped"
    );
    let JobState::Running {
        lease_expires_at, ..
    } = d.state(jid(1, 0))
    else {
        panic!("1.0 kept running");
    };
    assert_eq!(
        lease_expires_at,
        d.now.plus_secs(LEASE_DURATION_SECS),
        "lease renewed"
    );
    // 1.1 was lost at once, re-queued as attempt 2 and offered again to the free slot.
    assert_eq!(holder(&d, jid(1, 1)).1, 2);
    // Heartbeats keep 1.0 alive well past the original lease.
    for _ in 0..10 {
        d.advance_secs(20);
        d.step(Event::AgentHeartbeat { agent: agent(1) });
    }
    assert!(matches!(
        d.state(jid(1, 0)),
        JobState::Running { attempt: 1, .. }
    ));
}

#[test]
fn stale_and_foreign_reports_are_ignored() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 1));
    d.step(connect(&agent(2), Labels::new(), 1));
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[])]));
    let (first_agent, _) = holder(&d, jid(1, 0));
    // The offer expires; the job is offered again as attempt 2.
    d.advance_secs(OFFER_TIMEOUT_SECS);
    d.step(Event::Tick);
    let (second_agent, attempt) = holder(&d, jid(1, 0));
    assert_eq!(attempt, 2);
    let before = d.state(jid(1, 0));
    let stale = [
        Event::JobFinished {
            job: jid(1, 0),
            attempt: 1,
            agent: first_agent.clone(),
            outcome: Outcome::Succeeded,
        },
        Event::JobRejected {
            job: jid(1, 0),
            attempt: 1,
            agent: first_agent.clone(),
            reason: "busy".into(),
        },
        Event::JobFinished {
            job: jid(1, 0),
            attempt: 2,
            agent: agent(77),
            outcome: failed(1),
        },
        Event::JobFinished {
            job: jid(5, 0),
            attempt: 1,
            agent: first_agent.clone(),
            outcome: failed(1),
        },
    ];
    for event in stale {
        assert!(d.step(event.clone()).is_empty(), "{event:?}");
        assert_eq!(d.state(jid(1, 0)), before);
    }
    // A late acceptance of attempt 1 is answered with a cancel for attempt 1 only.
    let out = d.step(Event::JobAccepted {
        job: jid(1, 0),
        attempt: 1,
        agent: first_agent.clone(),
    });
    assert_eq!(
        out,
        vec![Command::Cancel {
            job: jid(1, 0),
            attempt: 1,
            agent: first_agent
        }]
    );
    assert_eq!(d.state(jid(1, 0)), before);
    assert_eq!(holder(&d, jid(1, 0)), (second_agent, 2));
}

#[test]
fn jobs_go_only_to_matching_agents() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), labels(&[("os", "mac")]), 4));
    let mut job = plan(1, 0, &[]);
    job.runs_on = labels(&[("os", "linux"), ("arch", "arm64")]);
    d.step(submit(1, "p", 0, vec![job, plan(1, 1, &[])]));
    assert_eq!(d.state(jid(1, 0)), JobState::Queued);
    assert_eq!(
        holder(&d, jid(1, 1)).0,
        agent(1),
        "the unlabelled job is not blocked"
    );
    d.step(connect(&agent(2), labels(&[("os", "linux")]), 4));
    assert_eq!(d.state(jid(1, 0)), JobState::Queued, "arch missing");
    d.step(connect(
        &agent(3),
        labels(&[("os", "linux"), ("arch", "arm64"), ("gpu", "1")]),
        4,
    ));
    assert_eq!(holder(&d, jid(1, 0)).0, agent(3));
}

#[test]
fn slots_bound_concurrency() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 2));
    d.step(submit(1, "p", 0, (0..5).map(|i| plan(1, i, &[])).collect()));
    assert_eq!(d.dispatches().len(), 2);
    assert_eq!(d.scheduler.queue_len(), 3);
    assert_eq!(d.scheduler.agent_load(&agent(1)), Some((2, 2)));
    accept(&mut d, jid(1, 0));
    assert_eq!(d.dispatches().len(), 2, "running still uses the slot");
    finish(&mut d, jid(1, 0), Outcome::Succeeded);
    assert_eq!(d.dispatches().len(), 3);
    assert_eq!(d.scheduler.queue_len(), 2);
}

#[test]
fn higher_priority_goes_first_and_runs_stay_fifo() {
    let mut d = Driver::default();
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[]), plan(1, 1, &[])]));
    d.step(submit(2, "p", 0, vec![plan(2, 0, &[])]));
    d.step(submit(3, "q", 5, vec![plan(3, 0, &[])]));
    d.step(connect(&agent(1), Labels::new(), 1));
    let mut order = Vec::new();
    for _ in 0..4 {
        let (job, _, _) = d.dispatches().last().cloned().expect("a dispatch");
        order.push(job);
        run_to(&mut d, job, Outcome::Succeeded);
    }
    assert_eq!(order, vec![jid(3, 0), jid(1, 0), jid(1, 1), jid(2, 0)]);
}

#[test]
fn pipelines_of_equal_priority_take_turns() {
    let mut d = Driver::default();
    // Pipeline "big" queues 6 jobs before "small" queues 3.
    d.step(submit(
        1,
        "big",
        0,
        (0..6).map(|i| plan(1, i, &[])).collect(),
    ));
    d.step(submit(
        2,
        "small",
        0,
        (0..3).map(|i| plan(2, i, &[])).collect(),
    ));
    d.step(connect(&agent(1), Labels::new(), 1));
    let mut order = Vec::new();
    while let Some(job) = d
        .all_jobs()
        .into_iter()
        .find(|(_, s)| is_offered(s))
        .map(|(j, _)| j)
    {
        order.push(job.run.0);
        run_to(&mut d, job, Outcome::Succeeded);
    }
    assert_eq!(order, vec![1, 2, 1, 2, 1, 2, 1, 1, 1]);
}

#[test]
fn cancel_run_stops_everything_but_cleanup() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 1));
    let mut cleanup = plan(1, 3, &[0]);
    cleanup.condition = StatusExpr::Always;
    let mut manual = plan(1, 4, &[0]);
    manual.manual = true;
    manual.condition = StatusExpr::Always;
    d.step(submit(
        1,
        "p",
        0,
        vec![
            plan(1, 0, &[]),
            plan(1, 1, &[]),
            plan(1, 2, &[0]),
            cleanup,
            manual,
        ],
    ));
    accept(&mut d, jid(1, 0));
    assert_eq!(d.state(jid(1, 1)), JobState::Queued, "one slot only");
    let out = d.step(Event::CancelRun { run: RunId(1) });
    assert!(out.contains(&Command::Cancel {
        job: jid(1, 0),
        attempt: 1,
        agent: agent(1)
    }));
    assert!(matches!(
        d.state(jid(1, 0)),
        JobState::Running {
            cancelling: true,
            ..
        }
    ));
    assert_eq!(d.state(jid(1, 1)), JobState::Cancelled);
    assert_eq!(d.state(jid(1, 2)), JobState::Cancelled);
    assert_eq!(
        d.state(jid(1, 3)),
        JobState::Pending,
        "always() waits for its needs"
    );
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Running));
    // The agent stops the job with a failure: no retry, and cleanup runs.
    finish(&mut d, jid(1, 0), failed(143));
    assert_eq!(
        d.state(jid(1, 0)),
        JobState::Failed {
            reason: FailReason::ExitCode(143)
        }
    );
    assert_eq!(
        d.state(jid(1, 4)),
        JobState::Cancelled,
        "no approvals in a cancelled run"
    );
    run_to(&mut d, jid(1, 3), Outcome::Succeeded);
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Cancelled));
}

#[test]
fn cancelled_jobs_are_never_retried() {
    let mut d = driver_with_agent();
    let mut job = plan(1, 0, &[]);
    job.retry = 3;
    d.step(submit(1, "p", 0, vec![job, plan(1, 1, &[0])]));
    accept(&mut d, jid(1, 0));
    d.step(Event::CancelJob { job: jid(1, 0) });
    // The lease runs out without a report: the job ends Cancelled, not Lost.
    d.step(Event::AgentDisconnected { agent: agent(1) });
    d.advance_secs(LEASE_DURATION_SECS);
    d.step(Event::Tick);
    assert_eq!(d.state(jid(1, 0)), JobState::Cancelled);
    assert_eq!(d.state(jid(1, 1)), JobState::Skipped);
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Cancelled));
    assert_eq!(d.dispatches().len(), 1);
}

#[test]
fn offered_jobs_cancel_at_once() {
    let mut d = driver_with_agent();
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[])]));
    let out = d.step(Event::CancelJob { job: jid(1, 0) });
    assert!(out.contains(&Command::Cancel {
        job: jid(1, 0),
        attempt: 1,
        agent: agent(1)
    }));
    assert_eq!(d.state(jid(1, 0)), JobState::Cancelled);
    assert_eq!(d.scheduler.agent_load(&agent(1)), Some((0, 16)));
}

#[test]
fn timeout_backstop_cancels_and_fails() {
    let mut d = driver_with_agent();
    let mut job = plan(1, 0, &[]);
    job.timeout_ms = 120_000;
    d.step(submit(1, "p", 0, vec![job]));
    accept(&mut d, jid(1, 0));
    let backstop = UnixMillis(d.now.0 + 120_000).plus_secs(TIMEOUT_GRACE_SECS);
    // Heartbeats keep the lease; only the backstop can end the job.
    while d.now.plus_secs(10) < backstop {
        d.advance_secs(10);
        d.step(Event::AgentHeartbeat { agent: agent(1) });
        assert!(matches!(d.state(jid(1, 0)), JobState::Running { .. }));
    }
    assert_eq!(d.scheduler.next_deadline(), Some(backstop));
    d.now = backstop;
    let out = d.step(Event::Tick);
    assert!(out.contains(&Command::Cancel {
        job: jid(1, 0),
        attempt: 1,
        agent: agent(1)
    }));
    assert_eq!(
        d.state(jid(1, 0)),
        JobState::Failed {
            reason: FailReason::TimedOut
        }
    );
}

#[test]
fn next_deadline_follows_offers_and_leases() {
    let mut d = driver_with_agent();
    assert_eq!(d.scheduler.next_deadline(), None);
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[])]));
    assert_eq!(
        d.scheduler.next_deadline(),
        Some(d.now.plus_secs(OFFER_TIMEOUT_SECS))
    );
    d.advance_secs(3);
    accept(&mut d, jid(1, 0));
    assert_eq!(
        d.scheduler.next_deadline(),
        Some(d.now.plus_secs(LEASE_DURATION_SECS))
    );
    d.advance_secs(5);
    d.step(Event::AgentHeartbeat { agent: agent(1) });
    assert_eq!(
        d.scheduler.next_deadline(),
        Some(d.now.plus_secs(LEASE_DURATION_SECS))
    );
    finish(&mut d, jid(1, 0), Outcome::Succeeded);
    assert_eq!(d.scheduler.next_deadline(), None);
}

#[test]
fn rejections_use_infra_retries() {
    let mut d = driver_with_agent();
    let mut job = plan(1, 0, &[]);
    job.infra_retries = 1;
    d.step(submit(1, "p", 0, vec![job]));
    for _ in 0..2 {
        let (agent, attempt) = holder(&d, jid(1, 0));
        d.step(Event::JobRejected {
            job: jid(1, 0),
            attempt,
            agent,
            reason: "no docker".into(),
        });
    }
    assert_eq!(
        d.state(jid(1, 0)),
        JobState::Failed {
            reason: FailReason::Rejected("no docker".into())
        }
    );
}

#[test]
fn invalid_plans_are_rejected_whole() {
    let mut cyclic = vec![plan(1, 0, &[2]), plan(1, 1, &[0]), plan(1, 2, &[1])];
    cyclic.push(plan(1, 3, &[]));
    let cases: Vec<(Vec<gantry_scheduler::JobPlan>, PlanError)> = vec![
        (cyclic, PlanError::Cycle(jid(1, 0))),
        (vec![plan(1, 0, &[0])], PlanError::Cycle(jid(1, 0))),
        (
            vec![plan(1, 0, &[5])],
            PlanError::UnknownNeed {
                job: jid(1, 0),
                need: jid(1, 5),
            },
        ),
        (
            vec![plan(1, 0, &[]), plan(1, 0, &[])],
            PlanError::DuplicateJob(jid(1, 0)),
        ),
        (
            vec![plan(2, 0, &[])],
            PlanError::ForeignJob {
                run: RunId(1),
                job: jid(2, 0),
            },
        ),
    ];
    for (jobs, error) in cases {
        let mut d = driver_with_agent();
        let out = d.step(submit(1, "p", 0, jobs));
        assert_eq!(
            out,
            vec![Command::RunRejected {
                run: RunId(1),
                error
            }]
        );
        assert_eq!(d.scheduler.run_state(RunId(1)), None);
    }
    let mut d = driver_with_agent();
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[])]));
    let out = d.step(submit(1, "p", 0, vec![]));
    assert_eq!(
        out,
        vec![Command::RunRejected {
            run: RunId(1),
            error: PlanError::DuplicateRun(RunId(1))
        }]
    );
}

#[test]
fn an_empty_run_succeeds_at_once() {
    let mut d = Driver::default();
    let out = d.step(submit(1, "p", 0, vec![]));
    assert_eq!(
        out,
        vec![
            Command::RunChanged {
                run: RunId(1),
                state: RunState::Running
            },
            Command::RunChanged {
                run: RunId(1),
                state: RunState::Succeeded
            }
        ]
    );
    assert!(d.scheduler.forget_run(RunId(1)));
    assert_eq!(d.scheduler.run_state(RunId(1)), None);
}

#[test]
fn snapshot_restores_and_extends_leases() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 1));
    let mut long = plan(1, 0, &[]);
    // The timeout backstop is not extended by restore (a job past timeout + grace is
    // over, outage or not), so this job gets an hour.
    long.timeout_ms = 3_600_000;
    d.step(submit(
        1,
        "p",
        0,
        vec![long, plan(1, 1, &[]), plan(1, 2, &[0])],
    ));
    accept(&mut d, jid(1, 0));
    let snapshot = d.scheduler.snapshot();
    let bytes = postcard::to_stdvec(&snapshot).expect("postcard");
    let json = serde_json::to_string(&snapshot).expect("json");
    assert_eq!(
        postcard::from_bytes::<gantry_scheduler::Snapshot>(&bytes).expect("decode"),
        snapshot
    );
    let from_json: gantry_scheduler::Snapshot = serde_json::from_str(&json).expect("decode json");
    assert_eq!(from_json, snapshot);

    // The coordinator was down for ten minutes.
    d.advance_secs(600);
    d.scheduler = Scheduler::restore(from_json, d.now);
    d.scheduler
        .check_invariants()
        .expect("consistent after restore");
    assert_eq!(d.scheduler.queue_len(), 1);
    assert_eq!(
        d.scheduler.next_deadline(),
        Some(d.now.plus_secs(LEASE_DURATION_SECS))
    );
    // The agent reconnects still running 1.0, and the job carries on to the end.
    d.step(Event::AgentConnected {
        agent: agent(1),
        labels: Labels::new(),
        slots: 1,
        running: vec![(jid(1, 0), 1)],
    });
    assert!(matches!(
        d.state(jid(1, 0)),
        JobState::Running { attempt: 1, .. }
    ));
    finish(&mut d, jid(1, 0), Outcome::Succeeded);
    d.drain(&[Labels::new()]);
    assert_eq!(d.scheduler.run_state(RunId(1)), Some(RunState::Succeeded));
}

#[test]
fn every_change_is_reported() {
    // Replaying JobChanged commands reproduces every job's final state.
    let mut d = driver_with_agent();
    let mut job = plan(1, 0, &[]);
    job.retry = 1;
    d.step(submit(1, "p", 0, vec![job, plan(1, 1, &[0])]));
    run_to(&mut d, jid(1, 0), failed(1));
    run_to(&mut d, jid(1, 0), Outcome::Succeeded);
    run_to(&mut d, jid(1, 1), Outcome::Succeeded);
    let mut replayed = std::collections::BTreeMap::new();
    for command in &d.log {
        if let Command::JobChanged { job, state, .. } = command {
            replayed.insert(*job, state.clone());
        }
    }
    for (job, state) in d.all_jobs() {
        assert_eq!(replayed.get(&job), Some(&state), "{job}");
    }
}

#[test]
fn pending_jobs_in_a_cancelled_run_follow_their_conditions() {
    // (condition of a job that needs a running job, its state right after CancelRun,
    //  its state once the running job ends)
    let cases = [
        (
            StatusExpr::Success,
            JobState::Cancelled,
            JobState::Cancelled,
        ),
        (
            StatusExpr::Failure,
            JobState::Cancelled,
            JobState::Cancelled,
        ),
        (StatusExpr::Always, JobState::Pending, JobState::Queued),
        (StatusExpr::Cancelled, JobState::Pending, JobState::Queued),
        (
            StatusExpr::Not(Box::new(StatusExpr::Cancelled)),
            JobState::Pending,
            JobState::Skipped,
        ),
    ];
    for (condition, after_cancel, at_end) in cases {
        // "Queued" at the end means it went on to be offered to the (then free) agent.
        let mut d = Driver::default();
        d.step(connect(&agent(1), Labels::new(), 1));
        let mut dependent = plan(1, 1, &[0]);
        dependent.condition = condition.clone();
        d.step(submit(1, "p", 0, vec![plan(1, 0, &[]), dependent]));
        accept(&mut d, jid(1, 0));
        d.step(Event::CancelRun { run: RunId(1) });
        assert_eq!(d.state(jid(1, 1)), after_cancel, "{condition:?}");
        finish(&mut d, jid(1, 0), Outcome::Cancelled);
        let state = d.state(jid(1, 1));
        if at_end == JobState::Queued {
            assert!(is_offered(&state), "{condition:?}: {state:?}");
        } else {
            assert_eq!(state, at_end, "{condition:?}");
        }
    }
}

#[test]
fn a_draining_agent_keeps_its_jobs_but_gets_none_new_until_it_reconnects() {
    let mut d = Driver::default();
    d.step(connect(&agent(1), Labels::new(), 4));
    d.step(submit(1, "p", 0, vec![plan(1, 0, &[])]));
    accept(&mut d, jid(1, 0));
    d.step(Event::AgentDraining {
        agent: agent(1),
        draining: true,
    });
    let out = d.step(submit(2, "p", 0, vec![plan(2, 0, &[])]));
    assert!(
        !out.iter().any(|c| matches!(c, Command::Dispatch { .. })),
        "nothing new for a draining agent: {out:?}"
    );
    assert_eq!(d.state(jid(2, 0)), JobState::Queued);
    assert!(matches!(d.state(jid(1, 0)), JobState::Running { .. }));
    // Its restarted self connects: work flows again.
    d.step(Event::AgentDisconnected { agent: agent(1) });
    let out = d.step(connect(&agent(1), Labels::new(), 4));
    assert!(
        out.iter()
            .any(|c| matches!(c, Command::Dispatch { job, .. } if *job == jid(2, 0))),
        "{out:?}"
    );
    // Draining can be called off (a failed upgrade step).
    d.step(Event::AgentDraining {
        agent: agent(1),
        draining: true,
    });
    d.step(submit(3, "p", 0, vec![plan(3, 0, &[])]));
    assert_eq!(d.state(jid(3, 0)), JobState::Queued);
    d.step(Event::AgentDraining {
        agent: agent(1),
        draining: false,
    });
    assert!(
        !matches!(d.state(jid(3, 0)), JobState::Queued),
        "offered once undrained"
    );
}
