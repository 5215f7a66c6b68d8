//! End-to-end tests of the push webhook and cron schedules, with the real binaries and
//! raw HTTP requests on loopback.

use std::io::Write;
use std::time::Duration;

use gantry_tests::http::{exchange, get, metric};
use gantry_tests::{wait_for, Coordinator, CoordinatorOptions};

const SECRET: &str = "webhook-s3cret";

fn post(addr: &str, path: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: gantry\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.extend([k, ": ", v.as_str(), "\r\n"]);
    }
    req.push_str("\r\n");
    req.push_str(body);
    let response = exchange(addr, req.as_bytes());
    (response.status, response.body)
}

fn signature(body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    format!(
        "sha256={}",
        gantry_certs::hex(ring::hmac::sign(&key, body.as_bytes()).as_ref())
    )
}

fn set_secret(c: &Coordinator, name: &str, value: &str) {
    let mut child = std::process::Command::new(gantry_tests::bin("gantry"))
        .args(["secrets", "set", name])
        .env("GANTRY_CONFIG", c.context())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(value.as_bytes())
        .expect("write");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn a_signed_push_starts_matching_pipelines_and_records_ref_and_commit() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let http = c.http_address.clone().expect("http");
    let _agents = c.agents_running(1, &[]);
    let file = c.dir.path().join("gantry.yml");
    std::fs::write(&file, "name: app\non:\n  push: { branches: [main], paths: ['src/**'] }\njobs:\n  build:\n    steps: [{ run: echo built $GANTRY_RUN_ID }]\n").expect("write");
    c.gantry(&["triggers", "add", file.to_str().expect("utf8")])
        .expect_code(0);
    let listed = c
        .gantry(&["triggers", "list", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(listed[0]["name"], "app", "{listed}");

    let body = r#"{"ref":"refs/heads/main","after":"c0ffee","commits":[{"added":["src/lib.rs"],"modified":[],"removed":[]}]}"#;
    // Before the secret is set, webhooks are off and say how to turn them on.
    let (status, text) = post(
        &http,
        "/hooks/push",
        &[("X-Hub-Signature-256", signature(body))],
        body,
    );
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("gantry secrets set GANTRY_WEBHOOK_SECRET"),
        "{text}"
    );
    set_secret(&c, "GANTRY_WEBHOOK_SECRET", SECRET);

    // Unsigned and wrongly signed pushes are refused and start nothing.
    let (status, _) = post(&http, "/hooks/push", &[], body);
    assert_eq!(status, 401);
    let (status, _) = post(
        &http,
        "/hooks/push",
        &[("X-Hub-Signature-256", signature("other body"))],
        body,
    );
    assert_eq!(status, 401);
    assert!(c.runs().is_empty(), "no run from a refused webhook");

    // A signed push to main touching src/ starts the pipeline; the run records ref and commit.
    let (status, text) = post(
        &http,
        "/hooks/push",
        &[("X-Hub-Signature-256", signature(body))],
        body,
    );
    assert_eq!(status, 202, "{text}");
    let reply: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(reply["runs"], serde_json::json!([1]), "{reply}");
    let view = c.wait_run(1, gantry_tests::DEADLINE);
    assert_eq!(
        (
            view["state"].as_str(),
            view["git_ref"].as_str(),
            view["commit"].as_str(),
            view["event"].as_str()
        ),
        (
            Some("succeeded"),
            Some("main"),
            Some("c0ffee"),
            Some("push")
        )
    );

    // Gitea's header works too; another branch or untouched paths start nothing.
    let other_branch =
        r#"{"ref":"refs/heads/feature","after":"beef","commits":[{"modified":["src/a.rs"]}]}"#;
    let (status, text) = post(
        &http,
        "/hooks/push",
        &[(
            "X-Gitea-Signature",
            signature(other_branch)
                .trim_start_matches("sha256=")
                .to_owned(),
        )],
        other_branch,
    );
    assert_eq!(
        (
            status,
            serde_json::from_str::<serde_json::Value>(&text).expect("json")["runs"].clone()
        ),
        (202, serde_json::json!([]))
    );
    let docs_only =
        r#"{"ref":"refs/heads/main","after":"beef","commits":[{"modified":["docs/readme.md"]}]}"#;
    let (status, text) = post(
        &http,
        "/hooks/push",
        &[("X-Hub-Signature-256", signature(docs_only))],
        docs_only,
    );
    assert_eq!(
        (
            status,
            serde_json::from_str::<serde_json::Value>(&text).expect("json")["runs"].clone()
        ),
        (202, serde_json::json!([]))
    );
    assert_eq!(c.runs().len(), 1);
    // Garbage is a clear 400, oversize a 413.
    let (status, text) = post(
        &http,
        "/hooks/push",
        &[("X-Hub-Signature-256", signature("nope"))],
        "nope",
    );
    assert_eq!(status, 400, "{text}");
    let response = exchange(
        &http,
        b"POST /hooks/push HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
    );
    assert_eq!(
        response.status, 413,
        "a declared 100 MB body is refused before it is read: {}",
        response.head
    );
    assert_eq!(c.runs().len(), 1);
}

#[test]
fn a_cron_schedule_starts_a_run_at_the_next_minute() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let file = c.dir.path().join("nightly.yml");
    std::fs::write(&file, "name: every-minute\non:\n  schedule: [{ cron: '* * * * *' }]\njobs:\n  tick:\n    steps: [{ run: echo scheduled }]\n").expect("write");
    c.gantry(&["triggers", "add", file.to_str().expect("utf8")])
        .expect_code(0);
    // The next minute boundary is at most 60 s away, and schedules are checked every 10 s.
    let run = wait_for("a scheduled run", Duration::from_secs(80), || {
        c.runs().first().cloned()
    });
    assert_eq!(run["event"], "schedule", "{run}");
    let view = c.wait_run(run["run"].as_u64().expect("run"), gantry_tests::DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    // One run per firing, not one per check.
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        c.runs().len() <= 2,
        "at most one more run after another minute boundary"
    );
    // Removing the trigger stops it.
    c.gantry(&["triggers", "rm", "every-minute"]).expect_code(0);
    c.gantry(&["triggers", "rm", "every-minute"]).expect_code(2);
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_when_jobs_run() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let http = c.http_address.clone().expect("http");
    let _agents = c.agents_running(2, &[]);
    assert_eq!(get(&http, "/readyz").status, 200);
    let response = get(&http, "/metrics");
    assert_eq!(response.status, 200);
    assert!(
        response
            .head
            .contains("Content-Type: text/plain; version=0.0.4"),
        "Prometheus content type: {}",
        response.head
    );
    let before = response.body;
    assert_eq!(metric(&before, "gantry_agents_connected"), 2);
    assert_eq!(
        metric(&before, "gantry_job_outcomes_total{outcome=\"succeeded\"}"),
        0
    );
    assert_eq!(metric(&before, "gantry_dispatch_latency_seconds_count"), 0);

    let run = c.run_pipeline("jobs:\n  a:\n    steps: [{ run: echo hello }]\n  b:\n    needs: a\n    steps: [{ run: 'echo fail; exit 3' }]\n", &[]);
    c.wait_run(run, gantry_tests::DEADLINE);
    let after = wait_for(
        "the log bytes to be counted",
        gantry_tests::DEADLINE,
        || {
            let text = get(&http, "/metrics").body;
            (metric(&text, "gantry_log_bytes_total") > 0).then_some(text)
        },
    );
    assert_eq!(
        metric(&after, "gantry_job_outcomes_total{outcome=\"succeeded\"}"),
        1
    );
    assert_eq!(
        metric(&after, "gantry_job_outcomes_total{outcome=\"failed\"}"),
        1
    );
    assert_eq!(
        metric(&after, "gantry_run_outcomes_total{outcome=\"failed\"}"),
        1
    );
    assert_eq!(metric(&after, "gantry_jobs_dispatched_total"), 2);
    assert_eq!(metric(&after, "gantry_dispatch_latency_seconds_count"), 2);
    assert_eq!(metric(&after, "gantry_job_duration_seconds_count"), 2);
    assert_eq!(metric(&after, "gantry_queue_depth"), 0);
}
