//! Crash consistency with the real binaries: the coordinator, then agents, killed with
//! SIGKILL at seeded random moments while jobs print numbered lines, over and over.
//!
//! What the coordinator showed before a kill is what it had acknowledged: a finished
//! job's state and exit code, and every log line `gantry logs` printed. After every
//! restart all of it must still be there (a log only grows, from the same start), the
//! store must open (the server answers) and nothing may panic; at the end every run
//! ends, every log holds each of its lines exactly once, in order, and a job whose agent
//! died was run again or marked lost, never dropped.
//!
//! `GANTRY_CRASH_CYCLES` sets the kills per test (CI: 3); `GANTRY_CRASH_SEED` picks the
//! moments (printed when a test starts, for a rerun of the same choices).

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_tests::{wait_for, Agent, Coordinator, DEADLINE};
use serde_json::Value;

/// Lines each job prints, one every 50 ms, so a job runs ~3 s.
const LINES: u32 = 60;

/// A run of three jobs: two in parallel, a third after both. Each prints `LINES`
/// numbered lines prefixed with its id, with no other output (the agent's own step
/// header and markers do not start with a job id).
const PIPELINE: &str = "jobs:
  a:
    steps: [{ run: 'for i in $(seq 1 60); do echo \"$GANTRY_JOB_ID line $i\"; sleep 0.05; done' }]
  b:
    steps: [{ run: 'for i in $(seq 1 60); do echo \"$GANTRY_JOB_ID line $i\"; sleep 0.05; done' }]
  c:
    needs: [a, b]
    steps: [{ run: 'for i in $(seq 1 60); do echo \"$GANTRY_JOB_ID line $i\"; sleep 0.05; done' }]
";

fn cycles() -> u32 {
    std::env::var("GANTRY_CRASH_CYCLES").map_or(3, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("GANTRY_CRASH_CYCLES={v:?}: {e}"))
    })
}

fn rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("GANTRY_CRASH_SEED").map_or_else(
        |_| fastrand::u64(..),
        |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("GANTRY_CRASH_SEED={v:?}: {e}"))
        },
    );
    eprintln!("{test}: GANTRY_CRASH_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

/// What the coordinator showed of one job.
#[derive(Debug, Clone)]
struct Seen {
    state: String,
    attempt: u64,
    exit_code: Option<i64>,
    log: String,
}

impl Seen {
    fn finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "succeeded" | "failed" | "timed-out" | "lost" | "cancelled" | "skipped"
        )
    }
}

/// Every job of every run, with its log (read after its state, so the log is at least
/// as new as the state). A job `previous` saw finished with its whole log keeps that log
/// without asking again: the checks compare its state, and `finish` reads every log anew.
fn observe(c: &Coordinator, previous: &BTreeMap<String, Seen>) -> BTreeMap<String, Seen> {
    let jobs = c
        .gantry(&["jobs", "list", "--limit", "100000", "--json"])
        .expect_code(0)
        .json();
    let Value::Array(jobs) = jobs else {
        panic!("jobs list is not an array: {jobs}");
    };
    jobs.iter()
        .map(|job| {
            let id = format!("{}.{}", job["job"]["run"], job["job"]["index"]);
            let now = seen_from(job, String::new());
            let settled = previous
                .get(&id)
                .filter(|p| p.finished() && p.state == now.state && p.attempt == now.attempt)
                .filter(|p| line_count(&id, &p.log) == LINES as usize);
            let seen = if let Some(p) = settled {
                seen_from(job, p.log.clone())
            } else {
                let (view, log) = log_of_attempt(c, &id, job.clone());
                seen_from(&view, log)
            };
            (id, seen)
        })
        .collect()
}

fn seen_from(view: &Value, log: String) -> Seen {
    Seen {
        state: view["state"].as_str().unwrap_or_default().to_owned(),
        attempt: view["attempt"].as_u64().unwrap_or(0),
        exit_code: view["exit_code"].as_i64(),
        log,
    }
}

/// `gantry logs` shows the newest attempt, which can move on while it is read (a lost
/// job offered again): the log is taken only if the attempt is the same afterwards.
/// Returns the view read before the log, and the log.
fn log_of_attempt(c: &Coordinator, job: &str, mut view: Value) -> (Value, String) {
    for _ in 0..5 {
        let log = c.logs(job);
        let after = c
            .gantry(&["jobs", "show", job, "--json"])
            .expect_code(0)
            .json();
        if after["attempt"] == view["attempt"] {
            return (view, log);
        }
        view = after;
    }
    panic!("{job}: its attempt changed on each of 5 readings of its log")
}

fn line_count(job: &str, log: &str) -> usize {
    log.matches(&format!("{job} line ")).count()
}

/// The numbered lines of a job's log are `1..=n` for some n, each once and in order;
/// with `complete`, n is `LINES`.
fn check_lines(job: &str, log: &str, complete: bool) {
    let prefix = format!("{job} line ");
    let numbers: Vec<u32> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.trim().parse().unwrap_or(0))
        .collect();
    let expected: Vec<u32> = (1..=u32::try_from(numbers.len()).unwrap_or(0)).collect();
    assert_eq!(
        numbers, expected,
        "{job}: lines missing, repeated or out of order:\n{log}"
    );
    if complete {
        assert_eq!(numbers.len() as u32, LINES, "{job}: incomplete log:\n{log}");
    }
}

/// Nothing the coordinator showed before is gone now: finished jobs keep their outcome,
/// logs keep every line they had (the same attempt's log only grows).
fn check_nothing_lost(before: &BTreeMap<String, Seen>, now: &BTreeMap<String, Seen>) {
    for (job, was) in before {
        let Some(is) = now.get(job) else {
            panic!("{job} ({was:?}) is gone");
        };
        if was.finished() {
            assert_eq!(
                (&is.state, is.attempt, is.exit_code),
                (&was.state, was.attempt, was.exit_code),
                "{job} had finished and changed"
            );
        }
        if is.attempt == was.attempt {
            assert!(
                is.log.starts_with(&was.log),
                "{job}: the log shown before the kill is not the start of the log now\nbefore:\n{}\nnow:\n{}",
                was.log,
                is.log
            );
        }
        check_lines(job, &is.log, false);
    }
}

/// The server's log shows no panic and no trouble opening its store.
fn check_server_log(c: &Coordinator) {
    let log = c.log();
    for bad in ["panicked", "cannot open the store", "unreadable"] {
        assert!(!log.contains(bad), "the server log says {bad:?}:\n{log}");
    }
}

/// Waits until every run has ended and every succeeded job's log is whole (the last
/// chunks may still be on their way when the result is stored); returns every job with
/// its log read anew.
fn finish(c: &Coordinator, runs: &[u64]) -> BTreeMap<String, Seen> {
    for run in runs {
        c.wait_run(*run, Duration::from_secs(120));
    }
    // Reading every log takes a while with hundreds of jobs: a minute, checked between
    // readings, and the jobs still short are named if it runs out.
    let until = std::time::Instant::now() + 2 * DEADLINE;
    loop {
        let seen = observe(c, &BTreeMap::new());
        let short: Vec<String> = seen
            .iter()
            .filter(|(job, s)| s.state == "succeeded" && line_count(job, &s.log) != LINES as usize)
            .map(|(job, s)| {
                format!(
                    "{job} (attempt {}): {} lines",
                    s.attempt,
                    line_count(job, &s.log)
                )
            })
            .collect();
        if short.is_empty() {
            return seen;
        }
        assert!(
            std::time::Instant::now() < until,
            "logs still incomplete after every run ended: {short:?}"
        );
    }
}

/// How a job ended after agents died under it: it succeeded with its whole log, or it
/// was lost (only once every infra retry was spent: three attempts), or it was skipped
/// because a job it needs was lost. Never anything else, never unfinished.
fn check_ended_despite_lost_agents(job: &str, seen: &Seen, all: &BTreeMap<String, Seen>) {
    match seen.state.as_str() {
        "succeeded" => check_lines(job, &seen.log, true),
        "lost" => assert!(seen.attempt >= 3, "{job} lost with retries left: {seen:?}"),
        "skipped" => {
            let run = job.split('.').next().unwrap_or_default();
            let need_lost = all
                .iter()
                .any(|(other, s)| other.starts_with(&format!("{run}.")) && s.state == "lost");
            assert!(need_lost, "{job} skipped though nothing it needs was lost");
        }
        other => panic!("{job} ended {other}: {seen:?}"),
    }
}

#[test]
fn coordinator_killed_at_random_moments_loses_nothing_it_acknowledged() {
    let mut rng = rng("coordinator_killed_at_random_moments_loses_nothing_it_acknowledged");
    let mut c = Coordinator::start();
    let _agents = c.agents_running(2, &[]);
    let mut runs = Vec::new();
    let mut seen = BTreeMap::new();
    for cycle in 0..cycles() {
        let run = c.run_pipeline(PIPELINE, &[]);
        runs.push(run);
        // A random moment: once some job of this run has printed a random number of
        // lines (past its last line: once it has finished).
        let job = format!("{run}.{}", rng.u32(0..3));
        let line = rng.u32(1..=LINES + 10);
        wait_for(&format!("{job} to reach line {line}"), DEADLINE, || {
            let view = c
                .gantry(&["jobs", "show", &job, "--json"])
                .expect_code(0)
                .json();
            let printed = line_count(&job, &c.logs(&job));
            (printed >= line as usize || view["state"] == "succeeded").then_some(())
        });
        let before = observe(&c, &seen);
        c.server().kill9();
        c.start_server();
        check_server_log(&c);
        seen = observe(&c, &before);
        check_nothing_lost(&before, &seen);
        eprintln!("cycle {cycle}: killed at {job} line {line}; nothing lost");
    }
    let end = finish(&c, &runs);
    for (job, seen) in &end {
        // No agent died, so no job had to be given up or run again from the start.
        assert_eq!(seen.state, "succeeded", "{job}: {seen:?}");
        check_lines(job, &seen.log, true);
    }
    assert_eq!(end.len(), runs.len() * 3);
    check_server_log(&c);
}

#[test]
fn agents_killed_mid_job_have_their_jobs_run_again_or_marked_lost() {
    let mut rng = rng("agents_killed_mid_job_have_their_jobs_run_again_or_marked_lost");
    let c = Coordinator::start();
    let token = c.token(&["--uses", "2"]);
    let mut agents: Vec<Agent> = (0..2).map(|_| Agent::enroll(&token, &[])).collect();
    for agent in &mut agents {
        agent.start();
    }
    c.wait_connected(2);
    let mut runs = Vec::new();
    let mut seen = BTreeMap::new();
    let mut killed: BTreeMap<String, u64> = BTreeMap::new();
    for cycle in 0..cycles() {
        let run = c.run_pipeline(PIPELINE, &[]);
        runs.push(run);
        // A random job of this run, once it has printed a random number of lines (in the
        // first half, so its agent dies well before the job could end by itself).
        let job = format!("{run}.{}", rng.u32(0..3));
        let line = rng.u32(1..=LINES / 2);
        let view = wait_for(&format!("{job} to reach line {line}"), DEADLINE, || {
            let view = c
                .gantry(&["jobs", "show", &job, "--json"])
                .expect_code(0)
                .json();
            let printed = line_count(&job, &c.logs(&job));
            let state = view["state"].as_str().unwrap_or_default();
            if matches!(state, "succeeded" | "failed" | "lost") {
                // It ran past the moment (a slow machine): no kill this cycle.
                return Some(Err(format!("{state} with {printed} lines")));
            }
            (state == "running" && printed >= line as usize).then_some(Ok(view))
        });
        let view = match view {
            Ok(view) => view,
            Err(seen) => {
                eprintln!("cycle {cycle}: {job} was {seen} before line {line}; no kill");
                continue;
            }
        };
        let holder = view["agent"].as_str().expect("a running job has an agent");
        let before = observe(&c, &seen);
        let victim = agents
            .iter_mut()
            .find(|a| a.id == holder)
            .expect("the holder is one of ours");
        victim.proc().kill9();
        // A job that got to the end just before the kill may have reported its result;
        // only one that had not is required to run again.
        let attempt = view["attempt"].as_u64().unwrap_or(0);
        let ended = victim.log().lines().any(|l| {
            l.contains("job finished") && l.contains(&format!("job={job} attempt={attempt} "))
        });
        // Half the time it comes back at once (its new session replaces the one the
        // coordinator still holds), half once the coordinator has noticed it is gone.
        if rng.bool() {
            wait_for("the coordinator to notice the dead agent", DEADLINE, || {
                let agent = c.agent(holder);
                (agent["state"] == "Disconnected").then_some(())
            });
        }
        victim.start();
        if !ended {
            killed.insert(job.clone(), attempt);
        }
        c.wait_connected(2);
        seen = observe(&c, &before);
        check_nothing_lost(&before, &seen);
        eprintln!("cycle {cycle}: killed the agent running {job} at line {line}");
    }
    assert!(
        cycles() == 0 || !killed.is_empty(),
        "no agent was killed under a running job"
    );
    let end = finish(&c, &runs);
    for (job, seen) in &end {
        check_ended_despite_lost_agents(job, seen, &end);
        if let Some(attempt) = killed.get(job).filter(|_| seen.state == "succeeded") {
            assert!(seen.attempt > *attempt, "{job} was not run again: {seen:?}");
        }
    }
    assert_eq!(end.len(), runs.len() * 3);
    check_server_log(&c);
}

/// Regression: a job's last chunks were sent but not yet acknowledged when the
/// coordinator died. The agent's upload then waited for acknowledgements that could not
/// come, still marked in progress, so no upload on the next connection ever sent those
/// chunks: the log stayed short for good. Here the coordinator is frozen while the job
/// prints its last lines and ends, then killed and restarted.
#[test]
fn unacknowledged_last_chunks_are_sent_again_after_a_coordinator_crash() {
    let mut c = Coordinator::start();
    let agents = c.agents_running(1, &[]);
    let marker = c.dir.path().join("go-on");
    let run = c.run_pipeline(
        &format!(
            "jobs:\n  tail:\n    steps: [{{ run: 'for i in $(seq 1 5); do echo \"$GANTRY_JOB_ID line $i\"; done; for i in $(seq 1 600); do [ -e {m} ] && break; sleep 0.05; done; for i in $(seq 6 60); do echo \"$GANTRY_JOB_ID line $i\"; done' }}]\n",
            m = marker.display()
        ),
        &[],
    );
    let job = format!("{run}.0");
    wait_for("the first lines", DEADLINE, || {
        (line_count(&job, &c.logs(&job)) == 5).then_some(())
    });
    c.server().freeze();
    std::fs::write(&marker, "").expect("marker");
    wait_for("the agent to finish the job", DEADLINE, || {
        agents[0]
            .log()
            .lines()
            .any(|l| l.contains("job finished") && l.contains(&format!("job={job} ")))
            .then_some(())
    });
    c.server().kill9();
    c.start_server();
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = wait_for("the whole log", DEADLINE, || {
        let log = c.logs(&job);
        (line_count(&job, &log) == LINES as usize).then_some(log)
    });
    check_lines(&job, &log, true);
}
