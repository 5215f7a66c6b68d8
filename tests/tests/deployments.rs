//! End-to-end tests of deployments with the real binaries on several agents: rolling
//! deployments that succeed and that roll back on a failed health check, canaries paused,
//! promoted and aborted, blue-green switches and instant rollbacks, approvals and the wait
//! timer, one deployment at a time per environment, a host lost mid-deployment, a
//! coordinator restored from an old backup (stale epochs), scoped secrets, and `gantry
//! exec` over ten agents.
//!
//! The deployed "service" is a directory and hooks that record what they did in the
//! app's `shared/` directory; health checks are commands that read the release (`ok` or
//! `bad` in `out/status`), so the tests need no ports.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gantry_tests::{wait_for, Agent, Coordinator, DEADLINE};
use serde_json::Value;

/// A pipeline that builds a release marked `marker` (healthy or not) and deploys it to
/// `env` with `strategy` (YAML lines under `deploy:`, indented six spaces).
fn pipeline(env: &str, marker: &str, healthy: bool, strategy: &str) -> String {
    let status = if healthy { "ok" } else { "bad" };
    format!(
        r#"
name: web
jobs:
  build:
    steps:
      - run: |
          mkdir -p out
          echo {status} > out/status
          echo {marker} > out/version
    artifacts: {{ name: site, paths: [out/] }}
  ship:
    needs: build
    deploy:
      environment: {env}
      artifact: site
      app: web
{strategy}
      hooks:
        start: echo "start $GANTRY_RELEASE $GANTRY_SLOT" >> "$GANTRY_SHARED_DIR/events"
        stop: echo "stop $GANTRY_RELEASE $GANTRY_SLOT" >> "$GANTRY_SHARED_DIR/events"
        timeout: 10s
      health:
        command: grep -q ok out/status
        interval: 50ms
        retries: 1
        deadline: 2s
      timeouts: {{ stage: 20s, activate: 10s }}
"#
    )
}

const ROLLING: &str = "      strategy: rolling\n      rolling: { batch: 1, failure-budget: 0 }";

fn started_agents(c: &Coordinator, n: usize, labels: &[&str]) -> Vec<Agent> {
    let mut args = Vec::new();
    for l in labels {
        args.extend_from_slice(&["--label", l]);
    }
    c.agents_running(n, &args)
}

fn app_dir(agent: &Agent) -> PathBuf {
    agent.dir.path().join("deploy").join("web")
}

/// The marker of the release `current` points at on `agent`, if any.
fn current_marker(agent: &Agent) -> Option<String> {
    std::fs::read_to_string(app_dir(agent).join("current/out/version"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn deployments(c: &Coordinator, env: &str) -> Vec<Value> {
    c.gantry(&["deployments", "list", "--env", env, "--json"])
        .expect_code(0)
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn deployment(c: &Coordinator, id: u64) -> Value {
    c.gantry(&["deployments", "show", &id.to_string(), "--json"])
        .expect_code(0)
        .json()
}

/// The newest deployment to `env`, once there is one.
fn latest_id(c: &Coordinator, env: &str, after: u64) -> u64 {
    wait_for(&format!("a deployment to {env}"), DEADLINE, || {
        deployments(c, env)
            .first()
            .and_then(|d| d["id"].as_u64())
            .filter(|id| *id > after)
    })
}

fn wait_state(c: &Coordinator, id: u64, state: &str, deadline: Duration) -> Value {
    wait_for(&format!("deployment {id} to be {state}"), deadline, || {
        let d = deployment(c, id);
        (d["state"] == state).then_some(d)
    })
}

fn host_states(d: &Value) -> Vec<String> {
    d["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| h["state"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn events(agent: &Agent) -> String {
    std::fs::read_to_string(app_dir(agent).join("shared/events")).unwrap_or_default()
}

fn create_env(c: &Coordinator, name: &str, extra: &[&str]) {
    let mut args = vec!["env", "create", name, "--select", "role=web"];
    args.extend_from_slice(extra);
    c.gantry(&args).expect_code(0);
}

#[test]
fn rolling_deploys_switch_every_host_and_a_failing_health_check_puts_all_back() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 3, &["role=web"]);
    create_env(&c, "prod", &[]);

    let run = c.run_pipeline(&pipeline("prod", "v1", true, ROLLING), &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let first = latest_id(&c, "prod", 0);
    let d = deployment(&c, first);
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(host_states(&d), vec!["active"; 3], "{d}");
    for a in &agents {
        assert_eq!(current_marker(a).as_deref(), Some("v1"), "{}", a.log());
    }
    // Staged everywhere before the first switch: the last host staged before the first
    // one switched.
    let hosts = d["hosts"].as_array().expect("hosts");
    let last_staged = hosts.iter().filter_map(|h| h["staged_at"].as_u64()).max();
    let first_switched = hosts
        .iter()
        .filter_map(|h| h["activated_at"].as_u64())
        .min();
    assert!(last_staged <= first_switched, "stage then switch: {d}");
    // The job's log is the deployment's log.
    let log = c.logs(&format!("{run}.1"));
    assert!(log.contains("healthy after"), "{log}");
    assert!(log.contains("succeeded"), "{log}");

    // A release whose health check fails: the first host fails, the budget (0) is
    // exceeded, and every host ends on v1 without anyone doing anything.
    let run = c.run_pipeline(&pipeline("prod", "v2", false, ROLLING), &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "failed", "the deploy job fails: {view}");
    let second = latest_id(&c, "prod", first);
    let d = deployment(&c, second);
    assert_eq!(d["state"], "rolled-back", "{d}");
    assert!(
        d["reason"].as_str().unwrap_or_default().contains("budget"),
        "the reason says why: {d}"
    );
    let mut states = host_states(&d);
    states.sort();
    assert_eq!(states, vec!["rolled-back", "untouched", "untouched"], "{d}");
    for a in &agents {
        assert_eq!(current_marker(a).as_deref(), Some("v1"), "{}", a.log());
    }
    let env = c
        .gantry(&["env", "show", "prod", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(
        env["current"]["deployment"].as_u64(),
        Some(first),
        "the environment still runs the first release: {env}"
    );

    // v3 succeeds; `gantry rollback prod` goes back to v1 on every host, without
    // staging, and says so.
    let run = c.run_pipeline(&pipeline("prod", "v3", true, ROLLING), &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    for a in &agents {
        assert_eq!(current_marker(a).as_deref(), Some("v3"));
    }
    let started = Instant::now();
    let out = c.gantry(&["rollback", "prod"]).expect_code(0);
    let took = started.elapsed();
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
    for a in &agents {
        assert_eq!(current_marker(a).as_deref(), Some("v1"), "{}", a.log());
    }
    eprintln!("rollback of 3 hosts took {took:?} end to end (CLI included)");
    let env = c
        .gantry(&["env", "show", "prod", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(
        env["current"]["release"]["id"],
        deployment(&c, first)["release"]["id"],
        "the environment's current release is v1 again: {env}"
    );
    // The delivery figures count three changes: v1 ok, v2 rolled back by itself, v3 ok
    // but undone by hand; two restores; one rollback.
    let delivery = c
        .gantry(&["stats", "--env", "prod", "--json"])
        .expect_code(0)
        .json();
    let prod = &delivery[0];
    assert_eq!(prod["environment"], "prod", "{delivery}");
    assert_eq!(prod["changes"], 3, "{delivery}");
    assert_eq!(prod["succeeded"], 2, "{delivery}");
    assert_eq!(prod["failed_changes"], 2, "{delivery}");
    assert_eq!(prod["rollbacks"], 1, "{delivery}");
    assert_eq!(prod["restores"], 2, "{delivery}");
    assert!(prod["lead_time_median_ms"].as_u64().is_some(), "{delivery}");
    let table = c.gantry(&["stats"]).expect_code(0).stdout;
    assert!(table.contains("67% (2 of 3)"), "{table}");
    // Going back to a release the environment never ran is refused, clearly.
    let bad = c.gantry(&["rollback", "prod", "--to", "r999-nothing"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("never ran release"), "{}", bad.stderr);
}

#[test]
fn a_canary_pauses_for_promotion_and_an_abort_rolls_it_back() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 4, &["role=web"]);
    create_env(&c, "prod", &[]);
    let run = c.run_pipeline(&pipeline("prod", "v1", true, ROLLING), &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    let first = latest_id(&c, "prod", 0);

    let canary =
        "      strategy: canary\n      canary:\n        steps: [{ percent: 25, pause: manual }, { percent: 100 }]";
    let run = c.run_pipeline(&pipeline("prod", "v2", true, canary), &[]);
    let id = latest_id(&c, "prod", first);
    let d = wait_state(&c, id, "awaiting-promotion", DEADLINE);
    let active = host_states(&d).iter().filter(|s| *s == "active").count();
    assert_eq!(active, 1, "25% of 4 hosts run the canary: {d}");
    let on_v2 = agents
        .iter()
        .filter(|a| current_marker(a).as_deref() == Some("v2"))
        .count();
    assert_eq!(on_v2, 1);
    // Nothing happens by itself: still paused a moment later.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(deployment(&c, id)["state"], "awaiting-promotion");
    c.gantry(&["deploy", "promote", &id.to_string()])
        .expect_code(0);
    let d = wait_state(&c, id, "succeeded", DEADLINE);
    assert_eq!(host_states(&d), vec!["active"; 4], "{d}");
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    let refused = c.gantry(&["deploy", "promote", &id.to_string()]);
    assert_eq!(refused.code, 2, "promoting an ended deployment is refused");
    assert!(refused.stderr.contains("has ended"), "{}", refused.stderr);

    let run = c.run_pipeline(&pipeline("prod", "v3", true, canary), &[]);
    let id3 = latest_id(&c, "prod", id);
    wait_state(&c, id3, "awaiting-promotion", DEADLINE);
    c.gantry(&["deploy", "abort", &id3.to_string()])
        .expect_code(0);
    let d = wait_state(&c, id3, "rolled-back", DEADLINE);
    assert!(
        d["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("aborted by"),
        "{d}"
    );
    for a in &agents {
        assert_eq!(current_marker(a).as_deref(), Some("v2"), "{}", a.log());
    }
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "failed");
}

#[test]
fn blue_green_switches_every_host_at_once_and_rolls_back_to_the_warm_slot() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 3, &["role=web"]);
    create_env(&c, "prod", &[]);
    let blue_green = "      strategy: blue-green\n      blue-green:\n        ports: [18001, 18002]\n        switch: echo \"$GANTRY_SLOT\" > \"$GANTRY_SHARED_DIR/live\"";
    let live = |a: &Agent| {
        std::fs::read_to_string(app_dir(a).join("shared/live"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let run = c.run_pipeline(&pipeline("prod", "v1", true, blue_green), &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    for a in &agents {
        assert_eq!(live(a), "blue");
    }
    let run = c.run_pipeline(&pipeline("prod", "v2", true, blue_green), &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    for a in &agents {
        assert_eq!(live(a), "green", "{}", a.log());
        assert_eq!(current_marker(a).as_deref(), Some("v2"));
        // The old slot was never stopped: it stays warm for a rollback.
        assert!(!events(a).contains("stop"), "{}", events(a));
    }
    let started = Instant::now();
    c.gantry(&["rollback", "prod"]).expect_code(0);
    let took = started.elapsed();
    for a in &agents {
        assert_eq!(live(a), "blue", "{}", a.log());
        assert_eq!(current_marker(a).as_deref(), Some("v1"));
    }
    eprintln!("blue-green rollback of 3 hosts took {took:?} end to end");
}

#[test]
fn approvals_need_distinct_people_other_than_the_author_then_the_wait_timer_runs() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 2, &["role=web"]);
    create_env(
        &c,
        "prod",
        &["--approvals", "2", "--wait", "2s", "--branch", "main"],
    );
    // A branch the environment does not allow fails the deploy job at once, saying why.
    let run = c.run_pipeline(
        &pipeline("prod", "v0", true, ROLLING),
        &["--ref", "feature/x"],
    );
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "failed");
    let log = c.logs(&format!("{run}.1"));
    assert!(log.contains("may not deploy to prod"), "{log}");

    let run = c.run_pipeline(&pipeline("prod", "v1", true, ROLLING), &["--ref", "main"]);
    let id = latest_id(&c, "prod", 0);
    wait_state(&c, id, "waiting-for-approval", DEADLINE);
    let own = c.gantry(&["deploy", "approve", &id.to_string()]);
    assert_eq!(own.code, 2, "the author cannot approve: {}", own.stdout);
    assert!(own.stderr.contains("another person"), "{}", own.stderr);

    let as_admin = |name: &str| -> PathBuf {
        let dir = c.dir.path().join(format!("admin-{name}"));
        c.gantry(&[
            "admin",
            "add",
            name,
            "--output",
            dir.to_str().expect("utf8"),
        ])
        .expect_code(0);
        dir.join("context.toml")
    };
    let approve = |ctx: &Path| {
        gantry_tests::Run::from_output(
            std::process::Command::new(gantry_tests::bin("gantry"))
                .args(["deploy", "approve", &id.to_string(), "--json"])
                .env("GANTRY_CONFIG", ctx)
                .output()
                .expect("gantry"),
        )
    };
    let alice = as_admin("alice");
    let bob = as_admin("bob");
    let d = approve(&alice).expect_code(0).json();
    assert_eq!(d["state"], "waiting-for-approval", "1 of 2: {d}");
    let again = approve(&alice);
    assert_eq!(again.code, 2, "one person approves once");
    assert!(
        again.stderr.contains("already approved"),
        "{}",
        again.stderr
    );
    for a in &agents {
        assert_eq!(current_marker(a), None, "nothing deployed before approval");
    }
    let d = approve(&bob).expect_code(0).json();
    assert_eq!(d["state"], "waiting", "approved, now the wait timer: {d}");
    let approved_at = d["approvals"][1]["at"].as_u64().expect("approval time");
    let d = wait_state(&c, id, "succeeded", DEADLINE);
    let started = d["started_at"].as_u64().expect("started");
    assert!(
        started >= approved_at + 2000,
        "the wait timer held it 2 s after the last approval: {d}"
    );
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    for a in &agents {
        assert_eq!(current_marker(a).as_deref(), Some("v1"));
    }
}

/// Runs `gantry` with another admin's context (created on first use).
fn gantry_as(c: &Coordinator, name: &str, args: &[&str]) -> gantry_tests::Run {
    let dir = c.dir.path().join(format!("admin-{name}"));
    if !dir.exists() {
        let output = dir.to_str().expect("utf8");
        c.gantry(&["admin", "add", name, "--output", output])
            .expect_code(0);
    }
    gantry_tests::Run::from_output(
        std::process::Command::new(gantry_tests::bin("gantry"))
            .args(args)
            .env("GANTRY_CONFIG", dir.join("context.toml"))
            .output()
            .expect("gantry"),
    )
}

#[test]
fn one_deployment_runs_per_environment_and_cancelling_another_does_not_start_the_queued_one() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 2, &["role=web"]);
    create_env(&c, "prod", &["--approvals", "1"]);
    let approve = |id: u64| {
        gantry_as(
            &c,
            "alice",
            &["deploy", "approve", &id.to_string(), "--json"],
        )
        .expect_code(0)
        .json()
    };
    // A canary that waits for promotion holds the environment as long as nobody acts.
    let canary =
        "      strategy: canary\n      canary:\n        steps: [{ percent: 50, pause: manual }, { percent: 100 }]";
    let run_a = c.run_pipeline(&pipeline("prod", "v1", true, canary), &[]);
    let a = latest_id(&c, "prod", 0);
    wait_state(&c, a, "waiting-for-approval", DEADLINE);
    approve(a);
    wait_state(&c, a, "awaiting-promotion", DEADLINE);

    let run_b = c.run_pipeline(&pipeline("prod", "v2", true, ROLLING), &[]);
    let b = latest_id(&c, "prod", a);
    wait_state(&c, b, "waiting-for-approval", DEADLINE);
    let d = approve(b);
    assert_eq!(d["state"], "queued", "approved while {a} runs: {d}");

    // A third deployment is cancelled while it waits for approval: the queued one still
    // waits for the running one (it is decided before the abort is answered).
    let run_c = c.run_pipeline(&pipeline("prod", "v3", true, ROLLING), &[]);
    let third = latest_id(&c, "prod", b);
    wait_state(&c, third, "waiting-for-approval", DEADLINE);
    c.gantry(&["deploy", "abort", &third.to_string()])
        .expect_code(0);
    assert_eq!(deployment(&c, third)["state"], "cancelled");
    let d = deployment(&c, b);
    assert_eq!(
        d["state"], "queued",
        "two deployments would run at once: {d}"
    );
    assert!(d["started_at"].is_null(), "{d}");
    assert_eq!(c.wait_run(run_c, DEADLINE)["state"], "failed");

    // The running one ends; the queued one starts after it, and ends last.
    c.gantry(&["deploy", "promote", &a.to_string()])
        .expect_code(0);
    let first = wait_state(&c, a, "succeeded", DEADLINE);
    let second = wait_state(&c, b, "succeeded", DEADLINE);
    let ended = first["finished_at"].as_u64().expect("finished");
    let started = second["started_at"].as_u64().expect("started");
    assert!(
        started >= ended,
        "{b} started before {a} ended: {first}\n{second}"
    );
    assert_eq!(c.wait_run(run_a, DEADLINE)["state"], "succeeded");
    assert_eq!(c.wait_run(run_b, DEADLINE)["state"], "succeeded");
    for agent in &agents {
        assert_eq!(
            current_marker(agent).as_deref(),
            Some("v2"),
            "{}",
            agent.log()
        );
    }
}

#[test]
fn a_host_lost_mid_deployment_is_failed_by_its_deadline_and_the_rest_goes_on() {
    let c = Coordinator::start();
    let mut agents = started_agents(&c, 3, &["role=web"]);
    create_env(&c, "prod", &[]);
    // One host at a time, each start taking 1 s; one failed host is within the budget.
    let slow = "      strategy: rolling\n      rolling: { batch: 1, failure-budget: 1 }";
    let text = pipeline("prod", "v1", true, slow)
        .replace("start: echo", "start: sleep 1; echo")
        .replace("activate: 10s", "activate: 4s");
    let run = c.run_pipeline(&text, &[]);
    let id = latest_id(&c, "prod", 0);
    let d = wait_state(&c, id, "switching", DEADLINE);
    // The hosts switch in agent-id order (they share a hostname): stop the last one.
    let last = d["hosts"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|h| h["agent"].as_str())
        .expect("hosts")
        .to_owned();
    let frozen = agents.iter_mut().find(|a| a.id == last).expect("agent");
    frozen.proc().freeze();
    let started = Instant::now();
    let d = wait_for("the deployment to end", DEADLINE, || {
        let d = deployment(&c, id);
        (!d["finished_at"].is_null()).then_some(d)
    });
    let took = started.elapsed();
    assert_eq!(d["state"], "succeeded", "within the failure budget: {d}");
    let lost_host = d["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["agent"] == last.as_str()))
        .expect("lost host")
        .clone();
    assert!(
        lost_host["state"] == "rollback-failed" || lost_host["state"] == "rolled-back",
        "the lost host ended by its deadlines: {lost_host}"
    );
    assert!(
        d["reason"].as_str().unwrap_or_default().contains("1 host"),
        "{d}"
    );
    assert!(
        took < Duration::from_secs(25),
        "ended by the activate and rollback deadlines, not hung: {took:?}"
    );
    for a in agents.iter().filter(|a| a.id != last) {
        assert_eq!(current_marker(a).as_deref(), Some("v1"));
    }
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    let frozen = agents.iter_mut().find(|a| a.id == last).expect("agent");
    frozen.proc().kill9();
}

#[test]
fn a_coordinator_restored_from_an_old_backup_is_refused_by_hosts_that_saw_newer_epochs() {
    let mut c = Coordinator::start();
    let agents = started_agents(&c, 2, &["role=web"]);
    create_env(&c, "prod", &[]);
    let deploy = |c: &Coordinator, marker: &str| {
        let run = c.run_pipeline(&pipeline("prod", marker, true, ROLLING), &[]);
        c.wait_run(run, DEADLINE)
    };
    assert_eq!(deploy(&c, "v1")["state"], "succeeded");
    c.server().terminate();
    let backup = c.dir.path().join("backup");
    copy_dir(&c.data_dir(), &backup);
    c.start_server();
    c.wait_connected(2);
    assert_eq!(deploy(&c, "v2")["state"], "succeeded");
    assert_eq!(deploy(&c, "v3")["state"], "succeeded");
    c.server().terminate();
    std::fs::remove_dir_all(c.data_dir()).expect("remove");
    copy_dir(&backup, &c.data_dir());
    c.start_server();
    c.wait_connected(2);
    // The restored coordinator believes prod's epoch is 1: its next deployment carries
    // epoch 2, older than the 3 the hosts saw. Every host refuses it.
    let view = deploy(&c, "v4");
    assert_eq!(view["state"], "failed", "{view}");
    let id = latest_id(&c, "prod", 1);
    let d = deployment(&c, id);
    assert_eq!(d["epoch"], 2, "{d}");
    let text = d.to_string();
    assert!(text.contains("epoch"), "the refusal names the epoch: {d}");
    for a in &agents {
        assert_eq!(
            current_marker(a).as_deref(),
            Some("v3"),
            "hosts keep what the newer coordinator deployed: {}",
            a.log()
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}

#[test]
fn environment_scoped_secrets_reach_only_deployments_to_that_environment() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 1, &["role=web"]);
    create_env(&c, "prod", &[]);
    let set = std::process::Command::new(gantry_tests::bin("gantry"))
        .args(["secrets", "set", "DB_PASSWORD", "--environment", "prod"])
        .env("GANTRY_CONFIG", c.context())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"hunter2-prod\n")?;
            child.wait()
        })
        .expect("secrets set");
    assert!(set.success());

    // A job's steps may not use it: refused at submission, saying why.
    let steps =
        "name: s\njobs:\n  leak:\n    steps: [{ run: 'echo ${{ secrets.DB_PASSWORD }}' }]\n";
    let file = c.dir.path().join("leak.yml");
    std::fs::write(&file, steps).expect("write");
    let refused = c.gantry(&["run", file.to_str().expect("utf8"), "--no-source"]);
    assert_eq!(refused.code, 2, "{}", refused.stdout);
    assert!(
        refused.stderr.contains("scoped to environment prod"),
        "{}",
        refused.stderr
    );

    // A deployment to prod gets it in its hooks' environment; the log masks it.
    let text = pipeline("prod", "v1", true, ROLLING)
        .replace(
            "      hooks:\n",
            "      env: { DB: \"${{ secrets.DB_PASSWORD }}\" }\n      hooks:\n",
        )
        .replace(
            "start: echo",
            "start: echo \"$DB\" > \"$GANTRY_SHARED_DIR/db\"; echo \"db is $DB\"; echo",
        );
    let run = c.run_pipeline(&text, &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    let stored = std::fs::read_to_string(app_dir(&agents[0]).join("shared/db")).expect("db");
    assert_eq!(stored.trim(), "hunter2-prod");
    let log = c.logs(&format!("{run}.1"));
    assert!(log.contains("db is ***"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
    // Another environment's deployment may not name it.
    create_env(&c, "staging", &[]);
    let other = text.replace("environment: prod", "environment: staging");
    let file = c.dir.path().join("other.yml");
    std::fs::write(&file, other).expect("write");
    let refused = c.gantry(&["run", file.to_str().expect("utf8"), "--no-source"]);
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains("scoped to environment prod"),
        "{}",
        refused.stderr
    );
}

#[test]
fn exec_runs_a_command_on_ten_agents_and_summarizes_each_host() {
    let c = Coordinator::start();
    let agents = started_agents(&c, 10, &["role=web"]);
    let out = c
        .gantry(&["exec", "--select", "role=web", "--", "echo hello from $$"])
        .expect_code(0);
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("| hello from"))
        .collect();
    assert_eq!(
        lines.len(),
        10,
        "every host answered, prefixed: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("10 host(s): 10 ok, 0 failed"),
        "{}",
        out.stdout
    );

    // A command that fails on some hosts: exit 1, and the summary says where.
    std::fs::create_dir_all(agents[3].dir.path().join("deploy")).expect("mkdir");
    std::fs::write(agents[3].dir.path().join("deploy/marker"), "x").expect("marker");
    let out = c.gantry(&["exec", "--parallel", "3", "--", "test -e marker"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("10 host(s): 1 ok, 9 failed"),
        "{}",
        out.stdout
    );

    // Timeouts end each host; no match is refused.
    let out = c.gantry(&["exec", "--timeout", "500ms", "--", "sleep 30"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("10 host(s): 0 ok, 10 failed"),
        "{}",
        out.stdout
    );
    let none = c.gantry(&["exec", "--select", "role=db", "--", "true"]);
    assert_eq!(none.code, 2);
    assert!(
        none.stderr.contains("no connected host matches role=db"),
        "{}",
        none.stderr
    );
}
