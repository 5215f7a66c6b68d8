//! End-to-end tests of test reports through the real binaries: a job whose tests fail
//! sends its JUnit and coverage files after the failure, the coordinator reads them, and
//! `gantry jobs show` (text and `--json`) gives the counts, each failed test's name and
//! output, and the line rate; a malformed file is a note on the job, never a crash, and
//! a secret printed by a test is masked in the stored output. The run's dashboard API
//! (`/api/runs/N`, what its page draws) carries the same summaries.

use gantry_tests::{job_named, Coordinator, CoordinatorOptions, DEADLINE};

const SECRET: &str = "r3port-s3cret-value";

#[test]
fn failed_tests_and_coverage_are_shown_with_the_job() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let _agents = c.agents_running(1, &[]);
    c.set_secret("DB_PASSWORD", SECRET);
    let yaml = r#"
jobs:
  unit:
    env:
      PASSWORD: ${{ secrets.DB_PASSWORD }}
    reports:
      junit: [reports/*.xml, missing/*.xml]
      coverage: coverage.xml
    steps:
      - run: |
          mkdir -p reports
          cat > reports/api.xml <<EOF
          <?xml version="1.0" encoding="UTF-8"?>
          <testsuites>
            <testsuite name="api" tests="3">
              <testcase classname="api.users" name="creates_a_user"/>
              <testcase classname="api.users" name="rejects_a_bad_email">
                <failure message="expected 400, got 500">assertion failed at users.rs:42</failure>
                <system-out>connecting with $PASSWORD</system-out>
              </testcase>
              <testcase classname="api.users" name="later"><skipped/></testcase>
            </testsuite>
          </testsuites>
          EOF
          cat > reports/web.xml <<EOF
          <testsuite name="web"><testcase name="renders"/><testcase name="logs_in"><error message="timeout"/></testcase></testsuite>
          EOF
          echo '<coverage line-rate="0.5" lines-covered="13" lines-valid="16"/>' > coverage.xml
          exit 1
  broken:
    reports:
      junit: [junit.xml]
    steps:
      - run: printf '<testsuite><testcase name="a">' > junit.xml
"#;
    let run = c.run_pipeline(yaml, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(job_named(&view, "unit")["state"], "failed", "{view}");
    assert_eq!(job_named(&view, "broken")["state"], "succeeded", "{view}");

    let unit = format!("{run}.0");
    let shown = c
        .gantry(&["jobs", "show", &unit, "--json"])
        .expect_code(0)
        .json();
    let report = &shown["report"];
    assert_eq!(report["passed"], 2, "{shown}");
    assert_eq!(report["failed"], 2, "{shown}");
    assert_eq!(report["skipped"], 1, "{shown}");
    assert_eq!(report["files"], 3, "{shown}");
    assert_eq!(report["coverage"]["percent"], "81.25%", "{shown}");
    let failures = report["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 2, "{shown}");
    assert_eq!(
        failures[0]["name"], "api.users.rejects_a_bad_email",
        "{shown}"
    );
    assert_eq!(failures[0]["file"], "reports/api.xml", "{shown}");
    assert_eq!(
        failures[0]["output"],
        "expected 400, got 500\nassertion failed at users.rs:42\nconnecting with ***",
        "{shown}"
    );
    assert_eq!(failures[1]["name"], "logs_in", "{shown}");
    assert_eq!(failures[1]["error"], true, "{shown}");
    assert_eq!(
        report["notes"],
        serde_json::json!(["missing/*.xml matched no file"]),
        "{shown}"
    );

    let text = c.gantry(&["jobs", "show", &unit]).expect_code(0).stdout;
    for expected in [
        "tests          2 passed, 2 failed, 1 skipped (attempt 1)",
        "coverage       81.25%",
        "  api.users.rejects_a_bad_email (reports/api.xml)\n    expected 400, got 500\n",
        "  logs_in (reports/web.xml, error)",
        "report note    missing/*.xml matched no file",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    assert!(!text.contains(SECRET), "{text}");
    let log = c.logs(&unit);
    assert!(
        log.contains("test reports: 2 passed, 2 failed, 1 skipped; coverage 81.25%"),
        "{log}"
    );

    // The run's dashboard page gets the summaries with the run.
    let token = c
        .gantry(&[
            "admin", "token", "--role", "viewer", "--name", "vera", "--ttl", "1d",
        ])
        .expect_code(0)
        .stdout
        .trim()
        .to_owned();
    let addr = c.http_address.clone().expect("http");
    let api = gantry_tests::http::exchange(
        &addr,
        format!(
            "GET /api/runs/{run} HTTP/1.1\r\nHost: gantry\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(api.status, 200, "{api:?}");
    let page: serde_json::Value = serde_json::from_str(&api.body).expect("JSON");
    let on_page = &page["reports"][&unit];
    assert_eq!(
        on_page["summary"], "2 passed, 2 failed, 1 skipped; coverage 81.25%",
        "{page}"
    );
    assert_eq!(
        on_page["failures"][0]["name"], "api.users.rejects_a_bad_email",
        "{page}"
    );
    assert!(
        page["reports"][format!("{run}.1")]["notes"][0].is_string(),
        "{page}"
    );

    // A malformed file is a note on its job; the coordinator is still there to say so.
    let broken = c
        .gantry(&["jobs", "show", &format!("{run}.1"), "--json"])
        .expect_code(0)
        .json();
    let notes = broken["report"]["notes"].as_array().expect("notes");
    assert_eq!(notes.len(), 1, "{broken}");
    let note = notes[0].as_str().unwrap_or_default();
    assert!(
        note.starts_with("junit.xml is not well-formed XML"),
        "{broken}"
    );
    assert_eq!(broken["report"]["files"], 0, "{broken}");

    // Nothing the coordinator stored holds the secret a test printed.
    for file in gantry_tests::files_under(&c.data_dir()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the secret",
            file.display()
        );
    }
}
