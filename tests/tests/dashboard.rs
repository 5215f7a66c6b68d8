//! The web dashboard end to end, with the real binaries: its API and login rules over
//! raw HTTP, then the pages in a real headless Chromium (live log latency, the DAG, a
//! viewer who cannot trigger anything, screenshots of the main pages).
//!
//! The browser test needs Chromium (`apt-get install chromium`); without it it skips
//! and says so (it fails under `GANTRY_REQUIRE_ALL_TESTS=1`, as in CI), and
//! `GANTRY_SKIP_BROWSER_TESTS=1` skips it either way. Screenshots go to
//! `GANTRY_SCREENSHOT_DIR`, else `target/dashboard-screenshots`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use gantry_tests::browser::{screenshot_dir, Browser};
use gantry_tests::{wait_for, Coordinator, CoordinatorOptions, DEADLINE};
use serde_json::Value;

/// An answer, read until the server closed the connection.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// One request on a fresh connection.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.extend([*k, ": ", *v, "\r\n"]);
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn login_token(c: &Coordinator, role: &str, name: &str, ttl: &str) -> String {
    let token = c
        .gantry(&[
            "admin", "token", "--role", role, "--name", name, "--ttl", ttl,
        ])
        .expect_code(0)
        .stdout
        .trim()
        .to_owned();
    assert!(token.starts_with("glt1_"), "{token}");
    token
}

fn run_count(c: &Coordinator) -> usize {
    c.gantry(&["pipelines", "list", "--json"])
        .expect_code(0)
        .json()
        .as_array()
        .map_or(0, Vec::len)
}

/// Logs in and returns the session cookie (`name=value`).
fn login(addr: &str, token: &str) -> String {
    let r = http(
        addr,
        "POST",
        "/api/login",
        &[("X-Gantry-CSRF", "1"), ("Content-Type", "application/json")],
        &serde_json::json!({ "token": token }).to_string(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let cookie = r.header("set-cookie").expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain loopback HTTP cannot carry a Secure cookie: {cookie}"
    );
    cookie.split(';').next().expect("name=value").to_owned()
}

const WAITING_PIPELINE: &str = "name: gated\njobs:\n  build:\n    steps: [{ run: echo built }]\n  release:\n    needs: build\n    when: manual\n    steps: [{ run: echo released }]\n";

#[test]
fn the_api_needs_a_login_and_a_viewer_cannot_change_anything() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let addr = c.http_address.clone().expect("http");
    let _agents = c.agents_running(1, &[]);
    let viewer = login_token(&c, "viewer", "vera", "1d");
    let operator = login_token(&c, "operator", "otto", "1d");
    let run = c.run_pipeline(WAITING_PIPELINE, &[]);
    c.wait_job_state(&format!("{run}.1"), "awaiting-approval", DEADLINE);

    // The pages are public (they hold no data); the API is not.
    let page = http(&addr, "GET", "/runs/1", &[], "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/app.js"), "{}", page.body);
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    for path in [
        "/api/runs",
        "/api/agents",
        "/api/runs/1",
        "/api/jobs/1.0/log",
        "/api/me",
    ] {
        assert_eq!(http(&addr, "GET", path, &[], "").status, 401, "{path}");
    }
    let bad = format!("glt1_{}_{}", "0".repeat(16), "0".repeat(64));
    for token in ["nonsense", bad.as_str()] {
        let bearer = format!("Bearer {token}");
        assert_eq!(
            http(&addr, "GET", "/api/runs", &[("Authorization", &bearer)], "").status,
            401
        );
    }
    // Logging in needs the CSRF header too, and a real token.
    let no_header = http(
        &addr,
        "POST",
        "/api/login",
        &[],
        &format!("{{\"token\":\"{viewer}\"}}"),
    );
    assert_eq!(no_header.status, 403, "{no_header:?}");
    let wrong = http(
        &addr,
        "POST",
        "/api/login",
        &[("X-Gantry-CSRF", "1")],
        &format!("{{\"token\":\"{bad}\"}}"),
    );
    assert_eq!(wrong.status, 401);

    // A viewer reads everything the CLI shows...
    let vcookie = login(&addr, &viewer);
    let me = http(&addr, "GET", "/api/me", &[("Cookie", &vcookie)], "").json();
    assert_eq!(
        (me["name"].as_str(), me["role"].as_str()),
        (Some("vera"), Some("viewer"))
    );
    assert_eq!(me["can"]["retry_run"], false);
    let runs = http(&addr, "GET", "/api/runs", &[("Cookie", &vcookie)], "").json();
    let cli = c
        .gantry(&["pipelines", "list", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(runs[0]["run"], cli[0]["run"]);
    assert_eq!(runs[0]["jobs"], cli[0]["jobs"], "the same views as the CLI");
    let agents = http(&addr, "GET", "/api/agents", &[("Cookie", &vcookie)], "").json();
    assert_eq!(agents.as_array().map(Vec::len), Some(1), "{agents}");
    let deployments = http(
        &addr,
        "GET",
        "/api/deployments",
        &[("Cookie", &vcookie)],
        "",
    );
    assert_eq!((deployments.status, deployments.body.as_str()), (200, "[]"));

    // ...and can change nothing: every mutating route answers 403 and nothing happens,
    // by cookie (with the CSRF header) or by bearer token.
    let vbearer = format!("Bearer {viewer}");
    for path in [
        "/api/runs/1/retry",
        "/api/runs/1/cancel",
        "/api/jobs/1.1/approve",
    ] {
        let by_cookie = http(
            &addr,
            "POST",
            path,
            &[("Cookie", &vcookie), ("X-Gantry-CSRF", "1")],
            "",
        );
        assert_eq!(by_cookie.status, 403, "{path}: {by_cookie:?}");
        assert!(
            by_cookie
                .body
                .contains("the authorization table allows operator, admin"),
            "{}",
            by_cookie.body
        );
        let by_bearer = http(&addr, "POST", path, &[("Authorization", &vbearer)], "");
        assert_eq!(by_bearer.status, 403, "{path}");
    }
    assert_eq!(run_count(&c), 1, "no run was created");
    assert_eq!(
        c.gantry(&["jobs", "show", "1.1", "--json"])
            .expect_code(0)
            .json()["state"],
        "awaiting-approval",
        "nothing was approved"
    );

    // An operator may, but a browser's request needs the CSRF header and our origin.
    let ocookie = login(&addr, &operator);
    let forged = http(
        &addr,
        "POST",
        "/api/jobs/1.1/approve",
        &[("Cookie", &ocookie)],
        "",
    );
    assert_eq!(forged.status, 403, "no CSRF header: {forged:?}");
    let cross = http(
        &addr,
        "POST",
        "/api/jobs/1.1/approve",
        &[
            ("Cookie", &ocookie),
            ("X-Gantry-CSRF", "1"),
            ("Origin", "http://evil.example"),
        ],
        "",
    );
    assert_eq!(cross.status, 403, "another origin: {cross:?}");
    let origin = format!("http://{addr}");
    let approved = http(
        &addr,
        "POST",
        "/api/jobs/1.1/approve",
        &[
            ("Cookie", &ocookie),
            ("X-Gantry-CSRF", "1"),
            ("Origin", &origin),
        ],
        "",
    );
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    let retried = http(
        &addr,
        "POST",
        "/api/runs/1/retry",
        &[("Cookie", &ocookie), ("X-Gantry-CSRF", "1")],
        "",
    );
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(retried.json()["run"], 2);
    assert_eq!(run_count(&c), 2);
    let audit = c.gantry(&["audit", "--json"]).expect_code(0).json();
    let entries = audit.as_array().expect("audit");
    assert!(
        entries.iter().any(|e| e["action"] == "login_token.create"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("role=viewer"))),
        "token issuance is audited: {audit}"
    );
    assert!(
        entries.iter().any(|e| e["action"] == "job.approve"
            && e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("web:otto:"))),
        "the dashboard user is the actor: {audit}"
    );

    // A revoked token ends its sessions at once; an expired one stops working.
    let listed = c
        .gantry(&["admin", "token", "list", "--json"])
        .expect_code(0)
        .json();
    let otto = listed
        .as_array()
        .and_then(|l| l.iter().find(|t| t["name"] == "otto"))
        .expect("otto listed")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    c.gantry(&["admin", "token", "revoke", &otto])
        .expect_code(0);
    assert_eq!(
        http(&addr, "GET", "/api/me", &[("Cookie", &ocookie)], "").status,
        401
    );
    c.gantry(&["admin", "token", "revoke", "lt-0000000000000000"])
        .expect_code(2);
    let brief = login_token(&c, "operator", "brief", "1s");
    let bcookie = login(&addr, &brief);
    wait_for("a 1 s token to expire", Duration::from_secs(5), || {
        (http(&addr, "GET", "/api/me", &[("Cookie", &bcookie)], "").status == 401).then_some(())
    });
    c.gantry(&["admin", "token", "--role", "root"])
        .expect_code(2);
    c.gantry(&["admin", "token", "--name", "x"]).expect_code(2);
}

#[test]
fn over_https_the_session_cookie_is_secure_and_other_origins_are_refused() {
    let mut c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    // Loopback may be plain; ask for TLS (a top-level key, so before any [table]).
    let path = c.data_dir().join("coordinator.toml");
    c.server().terminate();
    let config = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, format!("http_tls = true\n{config}")).expect("config");
    c.start_server();
    let addr = c.http_address.clone().expect("http");
    let ca = c.dir.path().join("ca-for-curl.pem");
    std::fs::write(&ca, c.ca_pem()).expect("ca");
    let token = login_token(&c, "operator", "otto", "1d");
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("timeout")
            .args(["30", "curl", "-sS", "-i", "--cacert"])
            .arg(&ca)
            .args(args)
            .output()
            .expect("curl (apt-get install curl)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let body = serde_json::json!({ "token": token }).to_string();
    let login = curl(&[
        "-X",
        "POST",
        "-H",
        "X-Gantry-CSRF: 1",
        "-d",
        &body,
        &format!("https://{addr}/api/login"),
    ]);
    let cookie_line = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("a session cookie over HTTPS: {login}"));
    assert!(cookie_line.contains("; Secure"), "{cookie_line}");
    let cookie = cookie_line
        .split_once(':')
        .and_then(|(_, v)| v.trim().split(';').next())
        .expect("cookie")
        .to_owned();
    // Another origin is refused; ours passes.
    let refused = curl(&[
        "-X",
        "POST",
        "-H",
        "X-Gantry-CSRF: 1",
        "-H",
        "Origin: https://evil.example",
        "-H",
        &format!("Cookie: {cookie}"),
        &format!("https://{addr}/api/runs/1/cancel"),
    ]);
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let allowed = curl(&[
        "-X",
        "POST",
        "-H",
        "X-Gantry-CSRF: 1",
        "-H",
        &format!("Origin: https://{addr}"),
        "-H",
        &format!("Cookie: {cookie}"),
        &format!("https://{addr}/api/runs/1/cancel"),
    ]);
    assert!(
        allowed.starts_with("HTTP/1.1 404"),
        "past the origin check to the run lookup (there is no run 1): {allowed}"
    );
}

#[test]
fn live_streams_are_capped_and_say_so() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let addr = c.http_address.clone().expect("http");
    let _agents = c.agents_running(1, &[]);
    let viewer = login_token(&c, "viewer", "vera", "1d");
    let run = c.run_pipeline(WAITING_PIPELINE, &[]);
    c.wait_job_state(&format!("{run}.1"), "awaiting-approval", DEADLINE);
    // 64 streams of a run that waits for approval stay open...
    let open: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            write!(s, "GET /api/runs/{run}/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {viewer}\r\n\r\n").expect("write");
            let mut head = [0u8; 15];
            s.read_exact(&mut head).expect("stream head");
            assert_eq!(&head, b"HTTP/1.1 200 OK");
            s
        })
        .collect();
    // ...and the 65th is told to come back, while plain requests still work.
    let bearer = format!("Bearer {viewer}");
    let refused = http(
        &addr,
        "GET",
        &format!("/api/runs/{run}/events"),
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after").as_deref(), Some("5"));
    assert_eq!(
        http(&addr, "GET", "/api/runs", &[("Authorization", &bearer)], "").status,
        200
    );
    drop(open);
    wait_for("a stream slot to free up", DEADLINE, || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(s, "GET /api/runs/{run}/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {viewer}\r\n\r\n").expect("write");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        (&head == b"HTTP/1.1 200").then_some(())
    });
}

#[test]
fn the_dashboard_in_chromium_streams_logs_live_draws_the_dag_and_refuses_a_viewer() {
    let Some(browser) = Browser::launch_or_skip("the dashboard browser test") else {
        return;
    };
    let shots = screenshot_dir();
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let base = format!("http://{}", c.http_address.clone().expect("http"));
    let _agents = c.agents_running(2, &["--label", "role=build"]);
    let operator = login_token(&c, "operator", "otto", "1d");
    let viewer = login_token(&c, "viewer", "vera", "1d");
    let gate = c.dir.path().join("gate");
    let done = c.dir.path().join("done");
    let pipeline = format!(
        r#"name: web-app
env:
  GATE: {gate}
  DONE: {done}
jobs:
  build:
    steps: [{{ run: 'echo compiling; echo built web-app' }}]
  unit-tests:
    needs: build
    steps: [{{ run: 'echo 42 tests passed' }}]
  lint:
    needs: build
    steps: [{{ run: 'echo clean' }}]
  stream:
    needs: build
    steps:
      - run: |
          echo "waiting for the gate"
          while [ ! -e "$GATE" ]; do sleep 0.01; done
          echo "MARKER $(date +%s%3N)"
          while [ ! -e "$DONE" ]; do sleep 0.05; done
          echo "finished"
  package:
    needs: [unit-tests, lint, stream]
    steps: [{{ run: 'echo packaged' }}]
  release:
    needs: package
    when: manual
    steps: [{{ run: 'echo released' }}]
"#,
        gate = gate.display(),
        done = done.display()
    );
    let run = c.run_pipeline(&pipeline, &[]);
    assert_eq!(run, 1);

    // The operator logs in through the login page.
    let op = browser.tab(1280, 860);
    op.navigate(&format!("{base}/login"));
    op.wait_until(
        "the login page",
        "document.body.dataset.ready === 'login'",
        DEADLINE,
    );
    op.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('login-form').requestSubmit(); true",
        serde_json::json!(operator)
    ));
    op.wait_until(
        "the runs page after logging in",
        "document.body.dataset.ready === 'runs' && document.querySelector('tr[data-run=\"1\"]')",
        DEADLINE,
    );
    op.screenshot(&shots.join("runs.png"));

    op.navigate(&format!("{base}/agents"));
    op.wait_until(
        "two agents listed as connected",
        "document.querySelectorAll('#agents tr[data-agent] .s-connected').length === 2",
        DEADLINE,
    );
    op.screenshot(&shots.join("agents.png"));

    // The job page shows a line within a second of the job printing it.
    op.navigate(&format!("{base}/jobs/1.3"));
    op.wait_until("the stream job's first line", "document.getElementById('log') && document.getElementById('log').textContent.includes('waiting for the gate')", DEADLINE);
    op.eval(
        r"window.__marker = new Promise((resolve) => {
            const log = document.getElementById('log');
            const seen = () => {
                const m = log.textContent.match(/MARKER (\d+)/);
                if (m) resolve({ printed: Number(m[1]), seen: Date.now() });
                return !!m;
            };
            if (!seen()) new MutationObserver((_, obs) => { if (seen()) obs.disconnect(); })
                .observe(log, { childList: true, subtree: true, characterData: true });
        }); true",
    );
    let released = Instant::now();
    std::fs::write(&gate, b"").expect("open the gate");
    let marker = op.eval_within(
        "Promise.race([window.__marker, new Promise((_, no) => setTimeout(() => no(new Error('no MARKER line within 5 s')), 5000))])",
        Duration::from_secs(6),
    );
    let round_trip = released.elapsed();
    let latency_ms =
        marker["seen"].as_i64().expect("seen") - marker["printed"].as_i64().expect("printed");
    println!(
        "live log latency in the browser: {latency_ms} ms from the job printing the line to it being on the page ({} ms from the test opening the gate)",
        round_trip.as_millis()
    );
    assert!(
        (0..1000).contains(&latency_ms),
        "a line printed by a running job must appear on its page within 1 s; took {latency_ms} ms"
    );
    op.wait_until(
        "the job to show as running",
        "document.querySelector('.meta [data-state=\"running\"]')",
        DEADLINE,
    );
    op.screenshot(&shots.join("job-log.png"));

    // The run page draws the DAG and follows it live up to the manual gate.
    std::fs::write(&done, b"").expect("finish the job");
    op.navigate(&format!("{base}/runs/1"));
    op.wait_until("the DAG with six jobs and seven edges", "document.querySelectorAll('#dag g.node').length === 6 && document.querySelectorAll('#dag path.edge').length === 7", DEADLINE);
    op.wait_until("the release job to wait for approval", "document.querySelector('#dag g.node[data-job=\"1.5\"]').dataset.state === 'awaiting-approval'", DEADLINE);
    op.screenshot(&shots.join("run-dag.png"));

    // The viewer, in a browser of their own, sees the same run but no button to change
    // it; a forged request from their page is refused and nothing happens.
    let view = browser.tab(1280, 860);
    view.navigate(&format!("{base}/login"));
    view.wait_until(
        "the login page",
        "document.body.dataset.ready === 'login'",
        DEADLINE,
    );
    view.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('login-form').requestSubmit(); true",
        serde_json::json!(viewer)
    ));
    view.wait_until(
        "the runs page",
        "document.body.dataset.ready === 'runs'",
        DEADLINE,
    );
    view.navigate(&format!("{base}/runs/1"));
    view.wait_until("the run page", "document.body.dataset.ready === 'run' && document.querySelector('.who [data-role=\"viewer\"]')", DEADLINE);
    let buttons = view.eval("document.querySelectorAll('[data-action]').length");
    assert_eq!(
        buttons, 0,
        "a viewer gets no retry, cancel or approve button"
    );
    let before = run_count(&c);
    let status = view.eval("fetch('/api/runs/1/retry', { method: 'POST', headers: { 'X-Gantry-CSRF': '1' } }).then((r) => r.status)");
    assert_eq!(status, 403, "the viewer's retry is refused");
    let status = view.eval("fetch('/api/jobs/1.5/approve', { method: 'POST', headers: { 'X-Gantry-CSRF': '1' } }).then((r) => r.status)");
    assert_eq!(status, 403, "the viewer's approval is refused");
    assert_eq!(run_count(&c), before, "no run was created");
    assert_eq!(
        c.gantry(&["jobs", "show", "1.5", "--json"])
            .expect_code(0)
            .json()["state"],
        "awaiting-approval"
    );
    view.screenshot(&shots.join("run-viewer.png"));

    // The operator approves from the page; the DAG turns green live.
    op.eval("document.querySelector('button[data-action=\"approve\"]').click(); true");
    op.wait_until("the run to succeed", "document.querySelector('.meta [data-state=\"succeeded\"]') && document.querySelector('#dag g.node[data-job=\"1.5\"]').dataset.state === 'succeeded'", DEADLINE);
    assert_eq!(c.run_view(1)["state"], "succeeded");
    op.screenshot(&shots.join("run-succeeded.png"));
    // "Run again" starts a new run and opens it.
    op.eval("document.querySelector('button[data-action=\"retry\"]').click(); true");
    op.wait_until(
        "run 2's page",
        "location.pathname === '/runs/2' && document.body.dataset.ready === 'run'",
        DEADLINE,
    );
    assert_eq!(run_count(&c), before + 1);

    op.navigate(&format!("{base}/deployments"));
    op.wait_until(
        "the deployments page",
        "document.body.dataset.ready === 'deployments'",
        DEADLINE,
    );
    op.screenshot(&shots.join("deployments.png"));
    let mut names: Vec<String> = std::fs::read_dir(&shots)
        .expect("screenshots")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    println!(
        "dashboard screenshots in {}: {}",
        shots.display(),
        names.join(", ")
    );
    for name in ["agents.png", "runs.png", "run-dag.png", "job-log.png"] {
        let size = std::fs::metadata(shots.join(name)).map_or(0, |m| m.len());
        assert!(size > 5_000, "{name} is a real screenshot ({size} bytes)");
    }
}
