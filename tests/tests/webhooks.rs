//! Outgoing webhooks end to end, with the real binaries and receivers in this test:
//! deliveries are signed (HMAC-SHA256 with the target's secret) and shaped (generic
//! JSON, Slack's `text` and `blocks`); receivers that never answer, fail or refuse
//! connections never delay a run; failures are retried with backoff, then given up.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_tests::http::metric;
use gantry_tests::{wait_for, Coordinator, CoordinatorOptions, DEADLINE};
use serde_json::Value;

/// How a test receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// 200 after reading the request.
    Accept,
    /// This status, always.
    Status(u16),
    /// Reads the request and never answers (holds the connection).
    Silent,
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A tiny HTTP/1.1 server on loopback that records every request.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let got = Arc::new(Mutex::new(Vec::new()));
        let log = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || serve(stream, behaviour, &log));
            }
        });
        Self { url, got }
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }

    fn wait(&self, what: &str, n: usize, deadline: Duration) -> Vec<Received> {
        wait_for(what, deadline, || {
            let got = self.requests();
            (got.len() >= n).then_some(got)
        })
    }
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, log: &Mutex<Vec<Received>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    let (head_end, length) = loop {
        let Ok(n) = stream.read(&mut piece) else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&piece[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end, length);
        }
    };
    while buf.len() < head_end + 4 + length {
        let Ok(n) = stream.read(&mut piece) else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&piece[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    log.lock().expect("lock").push(Received {
        at: Instant::now(),
        path,
        headers,
        body: buf[head_end + 4..head_end + 4 + length].to_vec(),
    });
    let status = match behaviour {
        Behaviour::Accept => 200,
        Behaviour::Status(s) => s,
        Behaviour::Silent => {
            // Hold the connection open without a word until the sender gives up.
            let _ = stream.read(&mut piece);
            return;
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// Whether `signature` (the header) is HMAC-SHA256 of `body` keyed with `secret`.
fn signed(secret: &str, body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &tag).is_ok()
}

/// `gantry webhooks add ... --json`: the new target's number and secret.
fn add_webhook(c: &Coordinator, args: &[&str]) -> (u64, String) {
    let mut all = vec!["webhooks", "add"];
    all.extend_from_slice(args);
    all.push("--json");
    let added = c.gantry(&all).expect_code(0).json();
    let secret = added["secret"].as_str().expect("secret").to_owned();
    assert_eq!(secret.len(), 64, "256 bits, hex: {added}");
    (added["webhook"]["id"].as_u64().expect("id"), secret)
}

fn get_metrics(addr: &str) -> String {
    gantry_tests::http::get(addr, "/metrics").body
}

#[test]
fn deliveries_are_signed_and_shaped_as_generic_json_and_slack() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let _agents = c.agents_running(1, &[]);
    let json_receiver = Receiver::start(Behaviour::Accept);
    let slack_receiver = Receiver::start(Behaviour::Accept);
    let (json_id, json_secret) = add_webhook(
        &c,
        &[
            &json_receiver.url,
            "--format",
            "json",
            "--events",
            "run.started,run.finished,job.failed",
        ],
    );
    let (_, slack_secret) = add_webhook(
        &c,
        &[
            &slack_receiver.url,
            "--format",
            "slack",
            "--events",
            "run.finished",
        ],
    );
    // Bad targets are refused with the reason.
    let bad = c
        .gantry(&["webhooks", "add", "ftp://x/", "--format", "json"])
        .expect_code(2);
    assert!(bad.stderr.contains("http:// or https://"), "{}", bad.stderr);
    let bad = c
        .gantry(&[
            "webhooks",
            "add",
            &json_receiver.url,
            "--events",
            "run.exploded",
        ])
        .expect_code(2);
    assert!(
        bad.stderr.contains("run.started, run.finished, job.failed"),
        "{}",
        bad.stderr
    );
    c.gantry(&["webhooks", "add", &json_receiver.url, "--format", "xml"])
        .expect_code(2);
    let ca = c.data_dir().join("tls").join("ca.pem");
    let bad = c
        .gantry(&[
            "webhooks",
            "add",
            &json_receiver.url,
            "--ca",
            ca.to_str().expect("utf8"),
        ])
        .expect_code(2);
    assert!(bad.stderr.contains("https:// URLs only"), "{}", bad.stderr);

    // The failing job's test report is in its notification and the run's.
    let run = c.run_pipeline(
        r#"name: shop
jobs:
  build:
    steps: [{ run: echo ok }]
  test:
    needs: build
    reports: { junit: [junit.xml] }
    steps:
      - run: |
          echo '<testsuite><testcase name="pays"/><testcase classname="cart" name="adds_an_item"><failure message="expected 2"/></testcase></testsuite>' > junit.xml
          exit 3
"#,
        &[],
    );
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "failed");

    let got = json_receiver.wait("three generic deliveries", 3, DEADLINE);
    let kinds: Vec<String> = got
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    for kind in ["run.started", "job.failed", "run.finished"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    for r in &got {
        assert_eq!(r.path, "/hook");
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert!(
            signed(&json_secret, &r.body, r.header("X-Gantry-Signature")),
            "signature of {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            !signed(&slack_secret, &r.body, r.header("X-Gantry-Signature")),
            "another target's secret does not verify it"
        );
        let body = r.json();
        assert_eq!(r.header("X-Gantry-Event"), body["event"].as_str());
        assert_eq!(r.header("X-Gantry-Delivery"), body["delivery"].as_str());
        assert!(
            body["at"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{body}"
        );
        assert_eq!(body["data"]["run"], run, "{body}");
        assert_eq!(body["data"]["pipeline"], "shop", "{body}");
    }
    let failed = got
        .iter()
        .map(Received::json)
        .find(|b| b["event"] == "job.failed")
        .expect("job.failed");
    assert_eq!(failed["data"]["name"], "test");
    assert_eq!(failed["data"]["exit_code"], 3);
    assert_eq!(failed["path"], format!("/jobs/{run}.1"));
    let tests = &failed["data"]["tests"];
    assert_eq!(
        (&tests["passed"], &tests["failed"]),
        (&1.into(), &1.into()),
        "{failed}"
    );
    assert_eq!(
        tests["failures"][0]["name"], "cart.adds_an_item",
        "{failed}"
    );
    assert_eq!(tests["failures"][0]["output"], "expected 2", "{failed}");
    let finished = got
        .iter()
        .map(Received::json)
        .find(|b| b["event"] == "run.finished")
        .expect("run.finished");
    assert_eq!(finished["data"]["state"], "failed");
    assert_eq!(finished["data"]["tests"]["failed"], 1, "{finished}");
    assert_eq!(
        finished["summary"],
        format!("Run {run} (shop, main) failed")
    );

    let slack = slack_receiver.wait("one Slack delivery", 1, DEADLINE);
    assert!(signed(
        &slack_secret,
        &slack[0].body,
        slack[0].header("X-Gantry-Signature")
    ));
    let body = slack[0].json();
    assert_eq!(body["text"], format!("Run {run} (shop, main) failed"));
    let blocks = body["blocks"].as_array().expect("blocks");
    assert_eq!(blocks[0]["type"], "section");
    assert_eq!(blocks[0]["text"]["type"], "mrkdwn");
    assert!(
        blocks[1]["fields"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{body}"
    );
    assert_eq!(blocks.last().expect("context")["type"], "context");
    assert!(
        body.to_string().contains("1 passed, 1 failed, 0 skipped")
            && body.to_string().contains("cart.adds_an_item"),
        "the Slack message lists the failed test: {body}"
    );

    // The filters held: one sender handles events in order, so once run.finished (the
    // last event) reached both, nothing filtered out can still come.
    assert_eq!(slack_receiver.requests().len(), 1);
    assert_eq!(json_receiver.requests().len(), 3);

    // The delivery log and the metrics show them (recorded once the answer is read).
    let first = wait_for("three delivery results", DEADLINE, || {
        let listed = c
            .gantry(&["webhooks", "list", "--json"])
            .expect_code(0)
            .json();
        let first = listed
            .as_array()?
            .iter()
            .find(|w| w["id"] == json_id)?
            .clone();
        (first["deliveries"].as_array()?.len() == 3).then_some(first)
    });
    let deliveries = first["deliveries"].as_array().expect("deliveries");
    assert!(
        deliveries
            .iter()
            .all(|d| d["outcome"] == "delivered" && d["status"] == 200),
        "{first}"
    );
    let table = c.gantry(&["webhooks", "list"]).expect_code(0).stdout;
    assert!(
        table.contains("delivered") && table.contains(&json_receiver.url),
        "{table}"
    );
    let http = c.http_address.clone().expect("http");
    let metrics = wait_for("four deliveries counted", DEADLINE, || {
        let m = get_metrics(&http);
        (metric(&m, "gantry_webhook_deliveries_total{outcome=\"delivered\"}") == 4).then_some(m)
    });
    assert_eq!(
        metric(
            &metrics,
            "gantry_webhook_deliveries_total{outcome=\"failed\"}"
        ),
        0
    );
    assert_eq!(metric(&metrics, "gantry_webhook_events_dropped_total"), 0);

    // Removing a target stops its deliveries; the audit log names where they went, not
    // the URL's path (which can be a credential).
    c.gantry(&["webhooks", "rm", &json_id.to_string()])
        .expect_code(0);
    c.gantry(&["webhooks", "rm", &json_id.to_string()])
        .expect_code(2);
    let audit = c.gantry(&["audit", "--json"]).expect_code(0).stdout;
    assert!(
        audit.contains("webhook.add") && audit.contains("webhook.remove"),
        "{audit}"
    );
    assert!(!audit.contains("/hook"), "{audit}");
}

/// A pipeline of three short jobs in a row, and how long the coordinator took to run it
/// (from its own timestamps).
fn timed_run(c: &Coordinator) -> u64 {
    let run = c.run_pipeline(
        "name: chain\njobs:\n  a:\n    steps: [{ run: echo a }]\n  b:\n    needs: a\n    steps: [{ run: echo b }]\n  c:\n    needs: b\n    steps: [{ run: 'echo c; exit 1' }]\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "failed", "{view}");
    view["finished_at"].as_u64().expect("finished") - view["created_at"].as_u64().expect("created")
}

#[test]
fn receivers_that_never_answer_fail_or_refuse_never_delay_a_run() {
    let mut c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    // Short retries so the test sees them all: 3 attempts, waits of 100-200 ms then
    // 300-600 ms, 1 s per attempt.
    c.restart_with_config("[webhooks]\nretry_base = \"200ms\"\nattempts = 3\ntimeout = \"1s\"\n");
    let http = c.http_address.clone().expect("http");
    let _agents = c.agents_running(1, &[]);
    let baseline = (0..2).map(|_| timed_run(&c)).min().expect("runs");

    let silent = Receiver::start(Behaviour::Silent);
    let failing = Receiver::start(Behaviour::Status(500));
    let refusing = Receiver::start(Behaviour::Status(401));
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/nobody-home", l.local_addr().expect("addr"))
    };
    for url in [&silent.url, &failing.url, &refusing.url, &closed] {
        add_webhook(&c, &[url]);
    }
    let with_bad_receivers = (0..3).map(|_| timed_run(&c)).max().expect("runs");
    println!("run time: {baseline} ms without webhooks, at most {with_bad_receivers} ms with silent, failing and closed receivers");
    assert!(
        with_bad_receivers < baseline + 1000,
        "bad receivers slowed runs from {baseline} ms to {with_bad_receivers} ms"
    );

    // Each run sends run.started, job.failed and run.finished. The failing receiver
    // gets every delivery three times, with backoff between attempts.
    let got = failing.wait(
        "every attempt at the failing receiver",
        3 * 3 * 3,
        Duration::from_secs(20),
    );
    let mut by_delivery: std::collections::BTreeMap<String, Vec<Instant>> =
        std::collections::BTreeMap::new();
    for r in &got {
        by_delivery
            .entry(
                r.header("X-Gantry-Delivery")
                    .expect("delivery id")
                    .to_owned(),
            )
            .or_default()
            .push(r.at);
    }
    assert_eq!(by_delivery.len(), 9, "nine deliveries");
    for (id, times) in &by_delivery {
        assert_eq!(
            times.len(),
            3,
            "delivery {id} is tried three times, keeping its id"
        );
        let first_wait = times[1] - times[0];
        let second_wait = times[2] - times[1];
        assert!(
            first_wait >= Duration::from_millis(90),
            "{id}: first retry after {first_wait:?}"
        );
        assert!(
            second_wait >= Duration::from_millis(290),
            "{id}: second retry after {second_wait:?}"
        );
    }
    // A 401 is the receiver refusing: not retried (the exact attempt count below holds
    // it to one attempt per delivery).
    refusing.wait("the refusing receiver's deliveries", 9, DEADLINE);

    let metrics = wait_for("every delivery to end", Duration::from_secs(30), || {
        let m = get_metrics(&http);
        // 9 deliveries to each of 4 targets end as failed (the silent one after its
        // three 1 s timeouts).
        (metric(&m, "gantry_webhook_deliveries_total{outcome=\"failed\"}") == 36).then_some(m)
    });
    assert_eq!(
        metric(
            &metrics,
            "gantry_webhook_deliveries_total{outcome=\"delivered\"}"
        ),
        0
    );
    assert_eq!(
        metric(&metrics, "gantry_webhook_attempts_total"),
        9 * (3 + 3 + 3 + 1),
        "three attempts to the silent, failing and closed receivers, one to the refusing one"
    );
    assert_eq!(refusing.requests().len(), 9);
    let listed = c
        .gantry(&["webhooks", "list", "--json"])
        .expect_code(0)
        .json();
    for w in listed.as_array().expect("list") {
        let last = w["deliveries"]
            .as_array()
            .and_then(|d| d.last())
            .expect("a delivery");
        assert_eq!(last["outcome"], "failed", "{w}");
        assert!(
            last["error"].as_str().is_some_and(|e| !e.is_empty()),
            "why it failed: {w}"
        );
    }
    // The coordinator is still as quick afterwards.
    let after = timed_run(&c);
    assert!(
        after < baseline + 1000,
        "{after} ms after the storm vs {baseline} ms"
    );
}
