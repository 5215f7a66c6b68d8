//! End-to-end tests of a registered repository's forge webhook (`POST
//! /hooks/repos/NAME`), with the real binaries, a bare git repository on `file://` as
//! the remote, and Gitea-signed deliveries (HMAC-SHA256 of the body, bare hex, in
//! `X-Gitea-Signature`) sent over raw HTTP on loopback.

use std::path::PathBuf;

use gantry_tests::http::exchange;
use gantry_tests::requires::require;
use gantry_tests::{git, job_named, Agent, Coordinator, CoordinatorOptions, DEADLINE};

const SECRET: &str = "hook-s3cret";

const PIPELINE: &str = r#"name: hooked
on:
  push: { branches: [main], tags: ['v*'] }
jobs:
  show:
    steps:
      - run: |
          echo "HEAD=$(git rev-parse HEAD)"
          echo "EVENT=$GANTRY_EVENT ACTOR=$GANTRY_ACTOR REF=$GANTRY_REF"
          echo "PR=$GANTRY_PR_NUMBER BASE=$GANTRY_PR_BASE"
"#;

/// A bare repository (the remote the coordinator mirrors) and a clone that pushes to it.
struct Remote {
    _dir: tempfile::TempDir,
    bare: PathBuf,
    work: PathBuf,
}

impl Remote {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bare = dir.path().join("app.git");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("mkdir");
        let r = Self {
            _dir: dir,
            bare,
            work,
        };
        git(
            r.bare.parent().expect("parent"),
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch=main",
                "app.git",
            ],
        );
        r.git(&["init", "--quiet", "--initial-branch=main"]);
        r.git(&["remote", "add", "origin", &r.url()]);
        r
    }

    fn git(&self, args: &[&str]) -> String {
        git(&self.work, args)
    }

    /// Commits `files` in the clone; the commit's id.
    fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, text) in files {
            std::fs::write(self.work.join(name), text).expect("write");
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn push(&self, refspec: &str) {
        self.git(&["push", "--quiet", "origin", refspec]);
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

fn sign(body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    gantry_certs::hex(ring::hmac::sign(&key, body.as_bytes()).as_ref())
}

/// POSTs `body` to `/hooks/repos/{repo}` as Gitea event `event`, signed with
/// `signature` (`None`: no signature header).
fn deliver(
    http: &str,
    repo: &str,
    event: &str,
    signature: Option<String>,
    body: &str,
) -> (u16, String) {
    let mut req = format!(
        "POST /hooks/repos/{repo} HTTP/1.1\r\nHost: gantry\r\nContent-Type: application/json\r\nX-Gitea-Event: {event}\r\nX-GitHub-Event: {event}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(sig) = signature {
        req.extend(["X-Gitea-Signature: ", sig.as_str(), "\r\n"]);
    }
    req.push_str("\r\n");
    req.push_str(body);
    let response = exchange(http, req.as_bytes());
    (response.status, response.body)
}

/// The run a delivery answered 202 for, once it ended, and its first job's log.
fn run_of(c: &Coordinator, (status, text): (u16, String)) -> (serde_json::Value, String) {
    assert_eq!(status, 202, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).expect("json");
    let run = answer["run"].as_u64().expect("run");
    let view = c.wait_run(run, DEADLINE);
    let log = c.logs(&format!("{run}.0"));
    assert_eq!(view["state"], "succeeded", "{view}\n{log}");
    assert_eq!(view["commit"], answer["commit"], "{view}");
    (view, log)
}

fn repository() -> serde_json::Value {
    serde_json::json!({
        "id": 1, "full_name": "team/app",
        "clone_url": "https://gitea.example/team/app.git",
        "html_url": "https://gitea.example/team/app",
    })
}

fn push_body(git_ref: &str, before: &str, after: &str) -> String {
    serde_json::json!({
        "ref": git_ref, "before": before, "after": after,
        "commits": [], "total_commits": 0,
        "repository": repository(),
        "pusher": { "login": "alice" }, "sender": { "login": "alice" },
    })
    .to_string()
}

fn pull_body(number: u64, head: &str, fork: bool) -> String {
    let head_repo = if fork {
        serde_json::json!({ "id": 2, "full_name": "mallory/app" })
    } else {
        repository()
    };
    serde_json::json!({
        "action": "opened", "number": number,
        "pull_request": {
            "number": number, "title": "a change", "user": { "login": "bob" },
            "head": { "ref": "feature", "sha": head, "repo_id": head_repo["id"], "repo": head_repo },
            "base": { "ref": "main", "sha": head, "repo_id": 1, "repo": repository() },
        },
        "repository": repository(),
        "sender": { "login": "bob" },
    })
    .to_string()
}

/// A coordinator with HTTP, the remote added as `app` with the webhook secret.
fn setup(remote: &Remote, extra: &[&str]) -> (Coordinator, String) {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let http = c.http_address.clone().expect("http");
    c.set_secret("HOOK", SECRET);
    let url = remote.url();
    let mut args = vec![
        "repos",
        "add",
        "app",
        "--url",
        &url,
        "--forge",
        "gitea",
        "--webhook-secret",
        "HOOK",
        "--json",
    ];
    args.extend_from_slice(extra);
    let added = c.gantry(&args).expect_code(0).json();
    assert!(
        added["webhook"]
            .as_str()
            .is_some_and(|w| w.contains("secret HOOK")),
        "{added}"
    );
    (c, http)
}

#[test]
fn bad_deliveries_are_refused_with_their_status_and_reason_and_start_nothing() {
    let remote = Remote::new();
    let head = remote.commit(&[("gantry.yml", PIPELINE)], "first");
    remote.push("main");
    let (c, http) = setup(&remote, &[]);
    let body = push_body("refs/heads/main", &"0".repeat(40), &head);

    let (status, text) = deliver(&http, "nope", "push", Some(sign(&body)), &body);
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("no repository \\\"nope\\\""), "{text}");

    let (status, text) = deliver(&http, "app", "push", None, &body);
    assert_eq!(status, 401, "{text}");
    assert!(
        text.contains("X-Gitea-Signature header is missing"),
        "{text}"
    );

    let (status, text) = deliver(&http, "app", "push", Some(sign("other body")), &body);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("does not match the body"), "{text}");

    let broken = "{\"ref\": \"refs/heads/main\", \"after\": ";
    let (status, text) = deliver(&http, "app", "push", Some(sign(broken)), broken);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("payload"), "{text}");

    // A fork's pull request, in a repository that did not opt in.
    let fork = pull_body(9, &head, true);
    let (status, text) = deliver(&http, "app", "pull_request", Some(sign(&fork)), &fork);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("comes from a fork"), "{text}");

    assert!(c.runs().is_empty(), "{:?}", c.runs());
}

#[test]
fn a_push_runs_exactly_the_pushed_commit_and_a_pull_request_its_head_with_its_number() {
    let remote = Remote::new();
    let first = remote.commit(&[("gantry.yml", PIPELINE), ("v", "1")], "first");
    remote.push("main");
    let (c, http) = setup(&remote, &[]);
    let _agents = c.agents_running(1, &[]);

    // A newer commit is pushed; the delivery names it and the run builds it.
    let second = remote.commit(&[("v", "2")], "second");
    remote.push("main");
    let body = push_body("refs/heads/main", &first, &second);
    let (view, log) = run_of(&c, deliver(&http, "app", "push", Some(sign(&body)), &body));
    assert_eq!(view["commit"], second.as_str(), "{view}");
    assert!(log.contains(&format!("HEAD={second}")), "{log}");
    assert!(
        log.contains("EVENT=push ACTOR=alice REF=refs/heads/main"),
        "{log}"
    );

    // A tag the filter names runs as a tag.
    remote.git(&["tag", "v1"]);
    remote.push("v1");
    let body = push_body("refs/tags/v1", &"0".repeat(40), &second);
    let (_, log) = run_of(&c, deliver(&http, "app", "push", Some(sign(&body)), &body));
    assert!(
        log.contains("EVENT=tag ACTOR=alice REF=refs/tags/v1"),
        "{log}"
    );

    // A branch the filter does not name starts nothing, and says why.
    remote.git(&["checkout", "--quiet", "-b", "other"]);
    let other = remote.commit(&[("v", "3")], "other");
    remote.push("other");
    let body = push_body("refs/heads/other", &"0".repeat(40), &other);
    let (status, text) = deliver(&http, "app", "push", Some(sign(&body)), &body);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("no on.push filter matching"), "{text}");

    // A pull request's head lives only at refs/pull/7/head on the remote.
    let pr_head = remote.commit(&[("v", "4")], "pr change");
    remote.push("HEAD:refs/pull/7/head");
    let body = pull_body(7, &pr_head, false);
    let (_, log) = run_of(
        &c,
        deliver(&http, "app", "pull_request", Some(sign(&body)), &body),
    );
    assert!(log.contains(&format!("HEAD={pr_head}")), "{log}");
    assert!(log.contains("EVENT=pull_request ACTOR=bob"), "{log}");
    assert!(log.contains("PR=7 BASE=main"), "{log}");
    assert_eq!(c.runs().len(), 3, "{:?}", c.runs());
}

#[test]
fn an_opted_in_repository_runs_a_fork_pull_request_only_if_its_pipeline_names_no_secret() {
    let remote = Remote::new();
    remote.commit(&[("gantry.yml", PIPELINE)], "first");
    remote.push("main");
    let (c, http) = setup(&remote, &["--allow-fork-pull-requests"]);
    c.set_secret("DEPLOY_KEY", "k");
    let greedy = remote.commit(
        &[(
            "gantry.yml",
            "name: greedy\njobs:\n  take:\n    steps: [{ run: 'echo ${{ secrets.DEPLOY_KEY }}' }]\n",
        )],
        "asks for a secret",
    );
    remote.push("HEAD:refs/pull/8/head");
    let body = pull_body(8, &greedy, true);
    let (status, text) = deliver(&http, "app", "pull_request", Some(sign(&body)), &body);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("secrets DEPLOY_KEY"), "{text}");
    assert!(c.runs().is_empty(), "{:?}", c.runs());

    let plain = remote.commit(&[("gantry.yml", PIPELINE)], "asks for nothing");
    remote.push("HEAD:refs/pull/8/head");
    let body = pull_body(8, &plain, true);
    let (status, text) = deliver(&http, "app", "pull_request", Some(sign(&body)), &body);
    assert_eq!(status, 202, "{text}");
}

/// A fork pull request's jobs go only to an agent started with `--untrusted-work`, and
/// such an agent takes nothing else: a push's run queued before the fork's stays queued
/// while the untrusted agent runs the fork's job, and runs when an ordinary agent comes.
#[test]
fn fork_pull_requests_run_only_on_agents_for_untrusted_work_and_those_take_nothing_else() {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if !require(
        root,
        "fork_pull_requests_run_only_on_agents_for_untrusted_work",
        "root (job isolation, which --untrusted-work requires)",
        "run the tests as root",
    ) {
        return;
    }
    let remote = Remote::new();
    let head = remote.commit(&[("gantry.yml", PIPELINE)], "first");
    remote.push("main");
    let (c, http) = setup(&remote, &["--allow-fork-pull-requests"]);
    let token = c.token(&["--uses", "3"]);

    // Without isolation an agent may not take untrusted work, and says so.
    let mut unisolated = Agent::enroll(&token, &[]);
    unisolated.start_with(&["--untrusted-work", "--isolation", "off"]);
    let status = unisolated.proc().wait_exit(DEADLINE).expect("it exits");
    assert_eq!(status.code(), Some(2), "{}", unisolated.log());
    assert!(
        unisolated
            .log()
            .contains("--untrusted-work needs job isolation"),
        "{}",
        unisolated.log()
    );

    let mut sandbox = Agent::enroll(&token, &[]);
    sandbox.start_with(&["--untrusted-work", "--isolation", "required"]);
    c.wait_connected(1);

    // A trusted push first: the only agent is for untrusted work, so it waits.
    let body = push_body("refs/heads/main", &"0".repeat(40), &head);
    let (status, text) = deliver(&http, "app", "push", Some(sign(&body)), &body);
    assert_eq!(status, 202, "{text}");
    let pushed = serde_json::from_str::<serde_json::Value>(&text).expect("json")["run"]
        .as_u64()
        .expect("run");

    let fork = remote.commit(&[("FORK", "a change from outside")], "from a fork");
    remote.push("HEAD:refs/pull/9/head");
    let body = pull_body(9, &fork, true);
    let (view, log) = run_of(
        &c,
        deliver(&http, "app", "pull_request", Some(sign(&body)), &body),
    );
    assert_eq!(
        job_named(&view, "show")["agent"],
        sandbox.id,
        "the fork's job ran on the agent for untrusted work: {view}"
    );
    assert!(log.contains("PR=9 BASE=main"), "{log}");

    // The push's job was first in the queue and the sandbox was free all along: had it
    // been allowed there, it would have run before the fork's.
    let waiting = c.run_view(pushed);
    let job = job_named(&waiting, "show");
    assert!(
        job["agent"].is_null() && waiting["finished_at"].is_null(),
        "a trusted job went to the agent for untrusted work: {waiting}"
    );

    let _ordinary = c.agents_running(1, &[]);
    let done = c.wait_run(pushed, DEADLINE);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_ne!(job_named(&done, "show")["agent"], sandbox.id, "{done}");
}
