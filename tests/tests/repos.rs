//! End-to-end tests of repositories (`gantry repos`) and runs of their commits (`gantry
//! run --repo`), with the real binaries and a git repository served over `file://` on
//! the same host: the job's workspace holds the commit's files and a `.git` that git
//! itself reads, and the job's environment names the commit.

use std::path::{Path, PathBuf};

use gantry_tests::{wait_for, Coordinator, DEADLINE};

/// A repository with a working tree, committed to with the `git` program.
struct Upstream {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const PIPELINE: &str = r#"name: from-git
jobs:
  show:
    checkout: { depth: 2 }
    steps:
      - run: |
          echo "HEAD=$(git rev-parse HEAD)"
          echo "COMMIT=$GANTRY_COMMIT"
          echo "EXPR=${{ git.commit }}"
          echo "REF=$GANTRY_REF BRANCH=$GANTRY_BRANCH TAG=$GANTRY_TAG"
          echo "EVENT=$GANTRY_EVENT REPO=$GANTRY_REPO ACTOR=$GANTRY_ACTOR"
          echo "SUBJECT=$(git log -1 --format=%s)"
          echo "DESCRIBE=$(git describe --tags 2>&1)"
          echo "STATUS=[$(git status --porcelain)]"
          echo "FILE=$(cat version.txt)"
          echo "DEPTH=$(git rev-list --count HEAD)"
  bare:
    checkout: false
    steps:
      - run: echo "ENTRIES=$(ls -A | wc -l) COMMIT=$GANTRY_COMMIT"
"#;

impl Upstream {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app");
        std::fs::create_dir(&path).expect("mkdir");
        let up = Self { _dir: dir, path };
        up.git(&["init", "--quiet", "--initial-branch=main"]);
        up
    }

    fn git(&self, args: &[&str]) -> String {
        gantry_tests::git(&self.path, args)
    }

    /// Writes the files and commits them; the new commit's id.
    fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, text) in files {
            let path = self.path.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

fn url_of(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// Runs `gantry run --repo` and waits for the run; its view and its first job's log.
fn run_repo(c: &Coordinator, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec!["run", "--repo", "app", "--json"];
    args.extend_from_slice(extra);
    let started = c.gantry(&args).expect_code(0).json();
    let run = started["run"].as_u64().expect("run number");
    let view = c.wait_run(run, DEADLINE);
    let log = c.logs(&format!("{run}.0"));
    (view, log)
}

#[test]
fn a_run_of_a_repository_builds_the_commit_with_its_git_context_and_the_next_commit_after_it() {
    let up = Upstream::new();
    let first = up.commit(
        &[("gantry.yml", PIPELINE), ("version.txt", "one\n")],
        "first version",
    );
    up.git(&["tag", "-a", "v1", "-m", "release one"]);
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);

    let added = c
        .gantry(&["repos", "add", "app", "--url", &up.url(), "--json"])
        .expect_code(0)
        .json();
    assert_eq!(added["name"], "app", "{added}");
    assert_eq!(added["auth"], "none", "{added}");
    let heads = added["heads"].to_string();
    assert!(
        heads.contains(&first) && heads.contains("refs/tags/v1"),
        "{added}"
    );

    let (view, log) = run_repo(&c, &[]);
    assert_eq!(view["state"], "succeeded", "{view}\n{log}");
    assert_eq!(view["commit"], first.as_str(), "{view}");
    assert_eq!(view["event"], "manual", "{view}");
    for line in [
        format!("HEAD={first}"),
        format!("COMMIT={first}"),
        format!("EXPR={first}"),
        "REF=refs/heads/main BRANCH=main TAG=".into(),
        "EVENT=manual REPO=app ACTOR=".into(),
        "SUBJECT=first version".into(),
        "DESCRIBE=v1".into(),
        "STATUS=[]".into(),
        "FILE=one".into(),
        "DEPTH=1".into(),
    ] {
        assert!(
            log.contains(&line),
            "{line:?} missing from the job's log:\n{log}"
        );
    }
    let bare = c.logs(&format!("{}.1", view["run"]));
    assert!(
        bare.contains(&format!("ENTRIES=0 COMMIT={first}")),
        "a job with checkout: false starts empty but knows the commit: {bare}"
    );

    // A second commit: the next run fetches it and builds it, not the first.
    let second = up.commit(&[("version.txt", "two\n")], "second version");
    let (view, log) = run_repo(&c, &[]);
    assert_eq!(view["state"], "succeeded", "{view}\n{log}");
    assert_eq!(view["commit"], second.as_str(), "{view}");
    assert!(log.contains(&format!("HEAD={second}")), "{log}");
    assert!(
        log.contains("FILE=two") && log.contains("SUBJECT=second version"),
        "{log}"
    );
    assert!(
        log.contains("DEPTH=2"),
        "checkout.depth 2 carries two commits: {log}"
    );

    // A tag builds the tagged commit, with the tag in its context.
    let (view, log) = run_repo(&c, &["--ref", "v1"]);
    assert_eq!(view["commit"], first.as_str(), "{view}");
    assert!(log.contains(&format!("HEAD={first}")), "{log}");
    assert!(log.contains("REF=refs/tags/v1 BRANCH= TAG=v1"), "{log}");
    assert!(log.contains("FILE=one"), "{log}");
}

#[test]
fn refs_and_repositories_that_do_not_exist_are_refused_with_the_reason_and_the_coordinator_keeps_working(
) {
    let up = Upstream::new();
    up.commit(
        &[("gantry.yml", PIPELINE), ("version.txt", "one\n")],
        "first",
    );
    let c = Coordinator::start();
    c.gantry(&["repos", "add", "app", "--url", &up.url()])
        .expect_code(0);

    let refused = c.gantry(&["run", "--repo", "app", "--ref", "no-such-branch"]);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("no ref \"no-such-branch\""),
        "{}",
        refused.stderr
    );
    let refused = c.gantry(&["run", "--repo", "other"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("no repository \"other\""),
        "{}",
        refused.stderr
    );

    // A commit without the pipeline file says which file is missing where.
    up.git(&["rm", "--quiet", "gantry.yml"]);
    up.git(&["commit", "--quiet", "-m", "drop the pipeline"]);
    let refused = c.gantry(&["run", "--repo", "app"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("has no pipeline file gantry.yml"),
        "{}",
        refused.stderr
    );

    // Bad additions: each says what is wrong, and nothing is stored.
    for (args, reason) in [
        (vec!["bad name", "--url", &up.url()[..]], "is not valid"),
        (vec!["app", "--url", &up.url()[..]], "exists"),
        (vec!["x1", "--url", "ext::sh -c id"], "ext"),
        (
            vec!["x2", "--url", "https://u:pw@example.invalid/r.git"],
            "password",
        ),
        (
            vec!["x3", "--url", &url_of(Path::new("/nonexistent/repo"))[..]],
            "nonexistent",
        ),
        (
            vec!["x4", "--url", &up.url()[..], "--forge", "bitbucket"],
            "unknown forge",
        ),
        (
            vec!["x5", "--url", &up.url()[..], "--token-secret", "NOPE"],
            "secret NOPE is not set",
        ),
        (
            vec!["x6", "--url", &up.url()[..], "--pipeline-file", "../x.yml"],
            "relative path",
        ),
        (
            vec!["x7", "--url", &up.url()[..], "--poll", "1s"],
            "out of range",
        ),
    ] {
        let mut full = vec!["repos", "add"];
        full.extend(args.iter().copied());
        let out = c.gantry(&full);
        assert_ne!(out.code, 0, "{full:?} was accepted");
        assert!(
            out.stderr.to_lowercase().contains(&reason.to_lowercase()),
            "{full:?}: {reason:?} not in {}",
            out.stderr
        );
    }

    // The server gone: the run is refused naming the repository, the fetch's error is
    // kept on it, and the coordinator answers on.
    let moved = up.path.with_extension("moved");
    std::fs::rename(&up.path, &moved).expect("move the repository away");
    let refused = c.gantry(&["run", "--repo", "app"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("repository app:"),
        "{}",
        refused.stderr
    );
    let shown = c
        .gantry(&["repos", "show", "app", "--json"])
        .expect_code(0)
        .json();
    assert!(shown["last_error"].is_string(), "{shown}");
    std::fs::rename(&moved, &up.path).expect("move the repository back");

    let list = c.gantry(&["repos", "list", "--json"]).expect_code(0).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let shown = c
        .gantry(&["repos", "show", "app", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(shown["url"], up.url().as_str(), "{shown}");
    assert_eq!(shown["pipeline_file"], "gantry.yml", "{shown}");
    let text = c.gantry(&["repos", "show", "app"]).expect_code(0).stdout;
    assert!(text.contains("refs/heads/main"), "{text}");

    c.gantry(&["repos", "rm", "app"]).expect_code(0);
    let list = c.gantry(&["repos", "list", "--json"]).expect_code(0).json();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert!(
        !c.data_dir().join("repos/app.git").exists(),
        "the mirror is deleted with the repository"
    );
    let gone = c.gantry(&["repos", "show", "app"]);
    assert_ne!(gone.code, 0);
    assert!(
        gone.stderr.contains("no repository \"app\""),
        "{}",
        gone.stderr
    );
    c.gantry(&["status"]).expect_code(0);
}

#[test]
fn a_polled_repository_runs_each_pushed_head_its_push_filter_matches_once() {
    let pipeline = PIPELINE.replace(
        "name: from-git\n",
        "name: from-git\non:\n  push: { branches: [main] }\n",
    );
    let up = Upstream::new();
    let first = up.commit(
        &[("gantry.yml", &pipeline), ("version.txt", "one\n")],
        "first",
    );
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    c.gantry(&["repos", "add", "app", "--url", &up.url(), "--poll", "10s"])
        .expect_code(0);

    // A branch the filter does not name, then a push to main.
    up.git(&["checkout", "--quiet", "-b", "feature"]);
    let feature = up.commit(&[("version.txt", "feature\n")], "on a feature branch");
    up.git(&["checkout", "--quiet", "main"]);
    let second = up.commit(&[("version.txt", "two\n")], "second");
    let polled = |commit: &str| {
        wait_for(&format!("a polled run of {commit}"), POLL_DEADLINE, || {
            c.runs().into_iter().find(|r| r["commit"] == commit)
        })
    };
    let run = polled(&second);
    assert_eq!(run["event"], "poll", "{run}");
    assert_eq!(run["git_ref"], "main", "{run}");
    let view = c.wait_run(run["run"].as_u64().expect("run"), DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = c.logs(&format!("{}.0", view["run"]));
    assert!(
        log.contains(&format!("HEAD={second}")) && log.contains("EVENT=poll"),
        "{log}"
    );

    // One more push: once it has run, the poll that saw `feature` is long over.
    let third = up.commit(&[("version.txt", "three\n")], "third");
    polled(&third);
    let all = c.runs();
    for commit in [&first, &feature] {
        assert!(
            all.iter().all(|r| r["commit"] != commit.as_str()),
            "{commit} was never pushed to a matching branch after the repository was added: {all:?}"
        );
    }
    assert_eq!(
        all.iter()
            .filter(|r| r["commit"] == second.as_str())
            .count(),
        1,
        "a head that did not move again runs once: {all:?}"
    );
}

/// Polls come every 10 s (the shortest interval): two of them, and the run's start.
const POLL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

#[test]
fn a_repository_schedule_runs_the_default_branch_head_at_that_moment_with_its_commit() {
    let pipeline = PIPELINE.replace(
        "name: from-git\n",
        "name: from-git\non:\n  schedule: [{ cron: '* * * * *' }]\n",
    );
    let up = Upstream::new();
    up.commit(
        &[("gantry.yml", &pipeline), ("version.txt", "one\n")],
        "first",
    );
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    c.gantry(&["repos", "add", "app", "--url", &up.url()])
        .expect_code(0);
    // Pushed after the add and never fetched since: the schedule fetches it.
    let head = up.commit(&[("version.txt", "two\n")], "second");
    // The next minute boundary is at most 60 s away, and schedules are checked every 10 s.
    let run = wait_for(
        "a scheduled run",
        std::time::Duration::from_secs(80),
        || c.runs().into_iter().find(|r| r["event"] == "schedule"),
    );
    assert_eq!(run["commit"], head.as_str(), "{run}");
    assert_eq!(run["git_ref"], "main", "{run}");
    let view = c.wait_run(run["run"].as_u64().expect("run"), DEADLINE);
    let log = c.logs(&format!("{}.0", view["run"]));
    assert!(
        log.contains(&format!("HEAD={head}")) && log.contains("EVENT=schedule"),
        "{log}"
    );
}

/// `gantry demo` builds from a git repository it creates: it shows the commit it made
/// with the run, and the release job's log names that very commit, read by `git` from
/// the job's checkout (so the run was of the repository's HEAD, not of a file).
#[test]
fn the_demo_runs_its_pipeline_from_a_commit_and_shows_it() {
    let test = "the_demo_runs_its_pipeline_from_a_commit_and_shows_it";
    if !gantry_tests::requires::require_program(test, "git", "apt-get install git") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("demo.out");
    let child = std::process::Command::new(gantry_tests::bin("gantry"))
        .args(["demo", "--agents", "1"])
        .env("GANTRY_AGENT_BIN", gantry_tests::bin("gantry-agent"))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("demo.out"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("gantry demo");
    let mut demo = gantry_tests::Proc {
        child,
        name: "demo".into(),
    };
    let status = demo
        .wait_exit(std::time::Duration::from_secs(240))
        .expect("gantry demo did not finish within 240 s");
    let out = std::fs::read_to_string(&out_path).expect("demo output");
    assert!(status.success(), "gantry demo failed ({status}):\n{out}");

    // "== git repository DIR created: commit FULL "SUBJECT" by AUTHOR"
    let head = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("== git repository ")?
                .split_once(" created: commit ")
                .map(|(_, rest)| rest.to_owned())
        })
        .unwrap_or_else(|| panic!("the demo did not show its repository's commit:\n{out}"));
    let (commit, rest) = head.split_once(' ').expect("commit and subject");
    assert_eq!(commit.len(), 40, "a full commit id: {head}");
    assert!(
        rest.starts_with("\"Add the demo pipeline\" by Gantry Demo <"),
        "the commit's subject and author: {head}"
    );
    assert!(
        out.contains("(`gantry repos add demo-app --url file://"),
        "the repository was added to the coordinator:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "of commit {} \"Add the demo pipeline\" on main:",
            &commit[..7]
        )),
        "the run shows its commit:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "built from commit {commit}: Add the demo pipeline"
        )),
        "the release job built the repository's HEAD, read from its checkout:\n{out}"
    );
    assert!(out.contains("== run 1 succeeded"), "{out}");
    assert!(out.contains("== demo finished"), "{out}");
}

const CHECKOUTS: &str = r#"name: checkouts
jobs:
  root:
    steps:
      - run: |
          echo "DATA=$(ls data | wc -l)"
          echo "LOG=$(git log --oneline | wc -l)"
          echo "STATUS=[$(git status --porcelain)]"
  deep:
    checkout: { depth: 3, path: src/app }
    steps:
      - run: |
          echo "TOP=$(ls -A | tr '\n' ' ')"
          cd src/app
          echo "HEAD=$(git rev-parse HEAD)"
          echo "LOG=$(git log --oneline | wc -l)"
          echo "FILE=$(cat version.txt)"
          echo "STATUS=[$(git status --porcelain)]"
  full:
    checkout: { depth: full }
    steps:
      - run: echo "LOG=$(git log --oneline | wc -l)"
  none:
    checkout: false
    steps:
      - run: echo "ENTRIES=$(ls -A | wc -l)"
"#;

/// `fetched X of Y chunks` from a job log's checkout line (the tree, not its `.git`).
fn checkout_chunks(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("checkout: "))
        .unwrap_or_else(|| panic!("no checkout line in the job's log:\n{log}"));
    let after = line
        .split("fetched ")
        .nth(1)
        .unwrap_or_else(|| panic!("no figures in {line:?}"));
    let mut words = after.split_whitespace();
    let fetched = words.next().and_then(|w| w.parse().ok());
    let total = words.nth(1).and_then(|w| w.parse().ok());
    match (fetched, total) {
        (Some(f), Some(t)) => (f, t),
        _ => panic!("cannot read the chunk counts of {line:?}"),
    }
}

/// Pseudo-random bytes (incompressible, different per seed): files the chunker cannot
/// share between each other.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

#[test]
fn checkouts_come_through_the_chunk_store_with_each_jobs_depth_and_path_and_a_one_file_commit_fetches_only_its_chunks(
) {
    let up = Upstream::new();
    let data: Vec<(String, String)> = (0..40)
        .map(|i| (format!("data/f{i:02}.txt"), noise(i, 96 * 1024)))
        .collect();
    let mut files: Vec<(&str, &str)> = data.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    files.extend([("gantry.yml", CHECKOUTS), ("version.txt", "one\n")]);
    up.commit(&files, "first");
    up.commit(&[("notes.txt", "a\n")], "second");
    up.commit(&[("notes.txt", "b\n")], "third");
    let fourth = up.commit(&[("notes.txt", "c\n")], "fourth");
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    c.gantry(&["repos", "add", "app", "--url", &up.url()])
        .expect_code(0);

    let (view, root) = run_repo(&c, &[]);
    assert_eq!(view["state"], "succeeded", "{view}\n{root}");
    let run = view["run"].as_u64().expect("run");
    let log = |job: u32| c.logs(&format!("{run}.{job}"));
    assert!(root.contains("DATA=40"), "{root}");
    assert!(
        root.contains("LOG=1\n"),
        "the default depth is one commit: {root}"
    );
    assert!(root.contains("STATUS=[]"), "{root}");
    let (fetched, total) = checkout_chunks(&root);
    assert!(total >= 40, "40 distinct files of 96 KiB: {root}");
    let deep = log(1);
    assert!(
        deep.contains("TOP=src ") && deep.contains(&format!("HEAD={fourth}")),
        "checkout.path puts the checkout in a subdirectory: {deep}"
    );
    assert!(deep.contains("LOG=3\n"), "depth 3: {deep}");
    assert!(
        deep.contains("FILE=one") && deep.contains("STATUS=[]"),
        "{deep}"
    );
    let full = log(2);
    assert!(full.contains("LOG=4\n"), "depth full: {full}");
    let none = log(3);
    assert!(none.contains("ENTRIES=0"), "checkout: false: {none}");
    assert!(!none.contains("checkout: "), "{none}");

    // One file changed: the same agent fetches that file's chunk and nothing else of
    // the tree (a job that ran after the first may find even that one cached).
    let fifth = up.commit(&[("version.txt", "two\n")], "fifth");
    let (view, root) = run_repo(&c, &[]);
    assert_eq!(view["state"], "succeeded", "{view}\n{root}");
    let run = view["run"].as_u64().expect("run");
    let (again, total_again) = checkout_chunks(&root);
    assert!(
        again <= 1 && total_again == total,
        "the second run fetched {again} of {total_again} chunks (the first {fetched} of {total}):\n{root}"
    );
    let deep = c.logs(&format!("{run}.1"));
    assert!(
        deep.contains(&format!("HEAD={fifth}")) && deep.contains("FILE=two"),
        "{deep}"
    );
    let (deep_again, _) = checkout_chunks(&deep);
    assert!(deep_again <= 1, "{deep}");
}

#[test]
fn a_job_that_asks_for_submodules_gets_them_and_one_that_does_not_gets_an_empty_directory() {
    let lib = Upstream::new();
    lib.commit(&[("lib.txt", "from the submodule\n")], "lib");
    let up = Upstream::new();
    up.git(&[
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "--quiet",
        &lib.url(),
        "vendor/lib",
    ]);
    let pipeline = r#"name: subs
jobs:
  with:
    checkout: { submodules: true }
    steps:
      - run: echo "LIB=$(cat vendor/lib/lib.txt)"
  without:
    steps:
      - run: echo "ENTRIES=$(ls -A vendor/lib | wc -l)"
"#;
    up.commit(&[("gantry.yml", pipeline)], "with a submodule");
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    c.gantry(&["repos", "add", "app", "--url", &up.url()])
        .expect_code(0);
    let (view, with) = run_repo(&c, &[]);
    assert_eq!(view["state"], "succeeded", "{view}\n{with}");
    assert!(with.contains("LIB=from the submodule"), "{with}");
    let without = c.logs(&format!("{}.1", view["run"]));
    assert!(without.contains("ENTRIES=0"), "{without}");
}
