//! End-to-end tests of step options through the real binaries: `if` over earlier steps,
//! `continue-on-error`, a step's own `timeout`, and `shell`. They pass only if the
//! coordinator sends the options (`DispatchJob`) and the agent runs them.

use gantry_tests::{job_named, Coordinator, DEADLINE};

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
