//! End-to-end tests of step options through the real binaries: `if` over earlier steps,
//! `continue-on-error`, a step's own `timeout`, and `shell`. They pass only if the
//! coordinator sends the options (`DispatchJob`) and the agent runs them.

use gantry_protocol::{CoordinatorMessage, Labels, RunId};
use gantry_tests::peers::RawAgent;
use gantry_tests::{job_named, Agent, Coordinator, DEADLINE};

#[test]
fn step_conditions_continue_on_error_timeouts_and_shells_decide_what_runs() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let yaml = r#"
jobs:
  failing:
    steps:
      - run: echo first
      - run: exit 3
        continue-on-error: true
      - run: echo after-a-tolerated-failure
      - name: slow
        run: echo slow-started; sleep 300
        timeout: 1s
      - run: echo "never-after""-a-failure"
      - run: echo "failure-handler""-ran"
        if: failure()
      - run: false | true; echo "pipefail""-missed"
        shell: bash
        if: always()
      - run: echo "always""-ran"
        if: always()
  tolerant:
    steps:
      - run: exit 5
        continue-on-error: true
      - run: echo still-green
"#;
    let run = c.run_pipeline(yaml, &[]);
    let view = c.wait_run(run, DEADLINE);
    let failing = job_named(&view, "failing");
    assert_eq!(failing["state"], "failed", "{view}");
    assert_eq!(
        failing["exit_code"], 124,
        "the first failure is the step timeout, reported as timeout(1) does: {view}"
    );
    let log = c.logs(&format!("{run}.0"));
    for expected in [
        "first\n",
        "after-a-tolerated-failure\n",
        "slow-started\n",
        "step 4 timed out after its timeout of 1000 ms",
        "failure-handler-ran\n",
        "step 7 exited with 1",
        "always-ran\n",
    ] {
        assert!(log.contains(expected), "{expected:?} missing from:\n{log}");
    }
    assert!(
        !log.contains("never-after-a-failure\n"),
        "a success() step ran after a failure:\n{log}"
    );
    assert!(
        !log.contains("pipefail-missed"),
        "bash ran without pipefail:\n{log}"
    );
    assert!(
        log.contains("step 5/8: echo \"never-after\"\"-a-failure\" skipped: its if: is false"),
        "a skipped step says so:\n{log}"
    );
    let tolerant = job_named(&view, "tolerant");
    assert_eq!(
        tolerant["state"], "succeeded",
        "continue-on-error keeps the job green: {view}"
    );
    assert!(c.logs(&format!("{run}.1")).contains("still-green\n"));
}

/// An agent of protocol 2 would ignore step options, so it gets plain jobs as
/// `Dispatch` (as before) and never a job with options; an agent of this release gets
/// every job as `DispatchJob`.
#[test]
fn an_older_agent_gets_only_plain_jobs_and_a_current_one_gets_dispatch_job() {
    let c = Coordinator::start();
    let old = Agent::enroll(&c.token(&["--label", "raw=yes"]), &[]);
    let current = Agent::enroll(&c.token(&["--label", "raw=yes"]), &[]);
    let yaml = "jobs:\n  plain:\n    runs-on: { raw: \"yes\" }\n    steps: [{ run: 'true' }]\n  options:\n    runs-on: { raw: \"yes\" }\n    steps: [{ run: 'true', continue-on-error: true }]\n";
    let run = c.run_pipeline(yaml, &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let labels = Labels::from([("raw".to_owned(), "yes".to_owned())]);
        let mut v2 = RawAgent::connect_as(&c.address, old.dir.path(), labels.clone(), 2).await;
        let plain = v2
            .expect("the plain job, as Dispatch", DEADLINE, |m| match m {
                CoordinatorMessage::Dispatch(a) if a.job.run == RunId(run) => Some(a.name.clone()),
                _ => None,
            })
            .await;
        assert_eq!(plain, "plain");
        let mut v3 = RawAgent::connect_as(
            &c.address,
            current.dir.path(),
            labels,
            gantry_protocol::PROTOCOL_VERSION,
        )
        .await;
        let options = v3
            .expect(
                "the job with options, as DispatchJob",
                DEADLINE,
                |m| match m {
                    CoordinatorMessage::DispatchJob {
                        assignment,
                        execution,
                    } if assignment.job.run == RunId(run) => Some((
                        assignment.name.clone(),
                        execution.steps[0].continue_on_error,
                    )),
                    _ => None,
                },
            )
            .await;
        assert_eq!(options, ("options".to_owned(), true));
        // Both jobs were queued when the old agent said hello, so a wrong offer of the
        // second would have come with the first, long before this.
        let offered: Vec<String> = v2
            .drain()
            .iter()
            .filter_map(|m| m.assignment().map(|a| a.name.clone()))
            .collect();
        assert!(offered.is_empty(), "the old agent was offered {offered:?}");
    });
}

/// `artifacts.when` decides whether a failed job's files are kept: `on-failure` keeps
/// the test report of a failing job and nothing of a passing one; `always` keeps both.
#[test]
fn artifacts_are_uploaded_when_their_when_says() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let yaml = r"
jobs:
  failing:
    artifacts: { name: failing-report, paths: [report.txt], when: on-failure }
    steps: [{ run: 'echo failed-test > report.txt; exit 1' }]
  passing:
    artifacts: { name: passing-report, paths: [report.txt], when: on-failure }
    steps: [{ run: 'echo fine > report.txt' }]
  always:
    artifacts: { name: always-report, paths: [report.txt], when: always }
    steps: [{ run: 'echo kept > report.txt; exit 2' }]
";
    let run = c.run_pipeline(yaml, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(job_named(&view, "failing")["state"], "failed", "{view}");
    assert_eq!(job_named(&view, "passing")["state"], "succeeded", "{view}");
    let listed = c
        .gantry(&["artifacts", "list", &run.to_string(), "--json"])
        .expect_code(0)
        .json();
    let mut names: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["always-report", "failing-report"], "{listed}");
}
