//! End-to-end tests of commit statuses going back to the forge: runs of a registered
//! repository (`gantry run --repo`) report pending then success or failure on their
//! commit to a status receiver on loopback that plays GitHub's, Gitea's or GitLab's
//! API and checks each request against that forge's documented shape
//! (`gantry_tests::forge`); a failed request is retried; an unreachable forge never
//! holds up a run, and its failures show in `gantry repos show` and on `/metrics`.

use std::path::PathBuf;
use std::process::Command;

use gantry_tests::forge::{StatusApi, StatusReceiver};
use gantry_tests::http::metric;
use gantry_tests::{wait_for, Coordinator, CoordinatorOptions, DEADLINE};

const PIPELINE: &str = r#"name: checks
jobs:
  test:
    steps:
      - run: test "$(cat result.txt)" = pass
"#;

/// A repository at `.../octo/app` (so its forge path is `octo/app`), committed to with
/// the `git` program.
struct Upstream {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Upstream {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("octo").join("app");
        std::fs::create_dir_all(&path).expect("mkdir");
        let up = Self { _dir: dir, path };
        up.git(&["init", "--quiet", "--initial-branch=main"]);
        up
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=T", "-c", "user.email=t@example.invalid"])
            .args(args)
            .current_dir(&self.path)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn commit(&self, result: &str) -> String {
        std::fs::write(self.path.join("gantry.yml"), PIPELINE).expect("write");
        std::fs::write(self.path.join("result.txt"), result).expect("write");
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "-m", result]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

fn add_repo(c: &Coordinator, name: &str, up: &Upstream, forge: &str, api: &str, secret: &str) {
    c.gantry(&[
        "repos",
        "add",
        name,
        "--url",
        &up.url(),
        "--forge",
        forge,
        "--api-url",
        api,
        "--status-token-secret",
        secret,
    ])
    .expect_code(0);
}

/// Runs `gantry run --repo NAME` to its end; the run's view.
fn run_repo(c: &Coordinator, name: &str) -> serde_json::Value {
    let started = c
        .gantry(&["run", "--repo", name, "--json"])
        .expect_code(0)
        .json();
    c.wait_run(started["run"].as_u64().expect("run number"), DEADLINE)
}

/// The states `receiver` accepted for `sha`, in order.
fn states_for(receiver: &StatusReceiver, sha: &str, n: usize) -> Vec<String> {
    wait_for(&format!("{n} statuses on {sha}"), DEADLINE, || {
        let states: Vec<String> = receiver
            .accepted()
            .into_iter()
            .filter(|s| s.sha == sha)
            .map(|s| s.state)
            .collect();
        (states.len() >= n).then_some(states)
    })
}

/// The dashboard's address the coordinator is told (`public_url`); statuses link there.
const PUBLIC_URL: &str = "https://ci.example.com";

fn coordinator() -> Coordinator {
    let mut c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    c.restart_with_config(&format!(
        "public_url = \"{PUBLIC_URL}/\"\n[webhooks]\nretry_base = \"200ms\"\nattempts = 3\ntimeout = \"1s\"\n"
    ));
    c
}

#[test]
fn runs_report_pending_then_success_or_failure_to_github_gitea_and_gitlab_and_a_500_is_retried() {
    let up = Upstream::new();
    let passing = up.commit("pass");
    let c = coordinator();
    let _agents = c.agents_running(1, &[]);
    let github = StatusReceiver::start(StatusApi::Github, "ghp_test");
    let gitea = StatusReceiver::start(StatusApi::Gitea, "gitea_test");
    c.set_secret("GH_TOKEN", "ghp_test");
    c.set_secret("GITEA_TOKEN", "gitea_test");
    add_repo(&c, "gh", &up, "github", &github.api_base(), "GH_TOKEN");
    add_repo(&c, "gt", &up, "gitea", &gitea.api_base(), "GITEA_TOKEN");
    let shown = c.gantry(&["repos", "show", "gh"]).expect_code(0).stdout;
    assert!(
        shown.contains(&format!("statuses to    {} (octo/app)", github.api_base())),
        "{shown}"
    );

    let view = run_repo(&c, "gh");
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(
        states_for(&github, &passing, 2),
        ["pending", "success"],
        "pending then success, in order"
    );
    for r in github.requests() {
        assert_eq!(r.method, "POST");
        assert!(
            r.path
                .starts_with(&format!("/api/v3/repos/octo/app/statuses/{passing}")),
            "{}",
            r.path
        );
        assert_eq!(r.header("Authorization"), Some("Bearer ghp_test"));
        let accepted = r.verdict.as_ref().expect("a well-formed GitHub request");
        assert_eq!(accepted.context, "gantry/checks");
        assert_eq!(
            accepted.target_url.as_deref(),
            Some(format!("{PUBLIC_URL}/runs/{}", view["run"]).as_str()),
            "the status links to the run's dashboard page"
        );
    }

    // A failing commit reports failure on Gitea.
    let failing = up.commit("fail");
    let view = run_repo(&c, "gt");
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(states_for(&gitea, &failing, 2), ["pending", "failure"]);
    for r in gitea.requests() {
        assert_eq!(r.method, "POST");
        assert!(
            r.path
                .starts_with(&format!("/api/v1/repos/octo/app/statuses/{failing}")),
            "{}",
            r.path
        );
        assert_eq!(r.header("Authorization"), Some("token gitea_test"));
        assert!(r.verdict.is_ok(), "{:?}", r.verdict);
    }

    // GitLab: its own states (running, failed), the project path url-encoded, the
    // token in PRIVATE-TOKEN, and the ref the run built.
    let gitlab = StatusReceiver::start(StatusApi::Gitlab, "glpat_test");
    c.set_secret("GL_TOKEN", "glpat_test");
    add_repo(&c, "gl", &up, "gitlab", &gitlab.api_base(), "GL_TOKEN");
    let view = run_repo(&c, "gl");
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(states_for(&gitlab, &failing, 2), ["running", "failed"]);
    for r in gitlab.requests() {
        assert!(
            r.path.starts_with("/api/v4/projects/") && r.path.contains("%2Focto%2Fapp/statuses/"),
            "{}",
            r.path
        );
        assert_eq!(r.header("PRIVATE-TOKEN"), Some("glpat_test"));
        let accepted = r.verdict.as_ref().expect("a well-formed GitLab request");
        assert_eq!(accepted.git_ref.as_deref(), Some("main"));
    }

    // GitHub answers the next two requests 500: the final state is retried until it
    // is accepted (a pending that failed gives way to the newer state).
    github.fail_next(2, 500);
    let view = run_repo(&c, "gh");
    assert_eq!(view["state"], "failed", "{view}");
    let last = states_for(&github, &failing, 1);
    assert_eq!(last.last().map(String::as_str), Some("failure"), "{last:?}");
    let tried: Vec<(String, u16)> = github
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(&failing))
        .map(|r| (r.verdict.map(|v| v.state).unwrap_or_default(), r.answered))
        .collect();
    // Which states meet the two 500s depends on whether the run ends before the
    // pending's retry (200 ms): either way both were refused, and the final state was
    // sent again until it was accepted.
    assert!(
        tried.iter().filter(|(_, code)| *code == 500).count() == 2
            && tried.last() == Some(&("failure".to_owned(), 201)),
        "two requests were refused with 500 and the failure state was accepted last: {tried:?}"
    );

    let shown = c
        .gantry(&["repos", "show", "gh", "--json"])
        .expect_code(0)
        .json();
    let failures = shown["status_failures"].to_string();
    assert!(
        failures.contains("HTTP 500"),
        "the retried 500 is shown: {shown}"
    );
}

#[test]
fn an_unreachable_forge_never_holds_up_a_run_and_its_failures_show_in_repos_show_and_metrics() {
    let up = Upstream::new();
    up.commit("pass");
    let c = coordinator();
    let _agents = c.agents_running(1, &[]);
    c.set_secret("GL_TOKEN", "glpat_test");
    // Nothing listens on port 1 of loopback.
    add_repo(
        &c,
        "down",
        &up,
        "gitlab",
        "http://127.0.0.1:1/api/v4",
        "GL_TOKEN",
    );
    let view = run_repo(&c, "down");
    assert_eq!(view["state"], "succeeded", "{view}");

    let http = c.http_address.clone().expect("http side");
    let metrics = wait_for("statuses given up", DEADLINE, || {
        let m = gantry_tests::http::get(&http, "/metrics").body;
        (metric(&m, "gantry_forge_statuses_lost_total") >= 1).then_some(m)
    });
    assert!(
        metric(&metrics, "gantry_forge_status_requests_failed_total") >= 3,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "gantry_forge_status_requests_delivered_total"),
        0
    );
    let shown = c
        .gantry(&["repos", "show", "down", "--json"])
        .expect_code(0)
        .json();
    let failures = shown["status_failures"].to_string();
    assert!(
        failures.contains("cannot connect to 127.0.0.1:1") && failures.contains("gave up"),
        "{shown}"
    );
    let text = c.gantry(&["repos", "show", "down"]).expect_code(0).stdout;
    assert!(text.contains("status failures (last"), "{text}");
}
