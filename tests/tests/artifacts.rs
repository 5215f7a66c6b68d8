//! End-to-end tests of artifacts and caches with the real binaries: jobs pass files to
//! the jobs that need them, caches are restored by key and branch, the admin CLI lists
//! and downloads artifacts, and garbage collection keeps what is live.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gantry_tests::{job_named, wait_for, Coordinator, DEADLINE};

const BUILD_AND_USE: &str = r#"
name: art
jobs:
  build:
    steps:
      - run: |
          mkdir -p out/bin out/docs
          printf 'hello artifact\n' > out/bin/app
          chmod 755 out/bin/app
          printf 'read me\n' > out/docs/README
          ln -s bin/app out/latest
          echo not-kept > scratch.txt
    artifacts:
      name: app
      paths: [out/]
      expire-in: 2d
  report:
    steps:
      - run: mkdir -p rep && echo report-body > rep/r.txt
    artifacts: { name: report, paths: ["rep/*.txt"] }
  test:
    needs: [build, report]
    steps:
      - run: |
          test -x out/bin/app
          cat out/bin/app
          test "$(readlink out/latest)" = bin/app
          cat rep/r.txt
          test ! -e scratch.txt
  pick:
    needs: [build, report]
    download: [report]
    steps:
      - run: |
          test ! -e out && cat rep/r.txt
"#;

#[test]
fn jobs_receive_the_artifacts_of_their_needs_and_the_cli_lists_and_gets_them() {
    let c = Coordinator::start();
    let _agents = c.agents_running(2, &[]);
    let run = c.run_pipeline(BUILD_AND_USE, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(job_named(&view, "test")["state"], "succeeded");
    let test_log = c.logs(&format!("{run}.2"));
    assert!(test_log.contains("hello artifact"), "{test_log}");
    assert!(test_log.contains("report-body"), "{test_log}");
    assert!(
        test_log.contains("artifact app from build: 2 files"),
        "the log says what arrived: {test_log}"
    );
    let pick_log = c.logs(&format!("{run}.3"));
    assert!(
        !pick_log.contains("artifact app"),
        "download: [report] takes only that: {pick_log}"
    );

    let listed = c
        .gantry(&["artifacts", "list", &run.to_string(), "--json"])
        .expect_code(0)
        .json();
    let names: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["app", "report"]);
    let app = &listed[0];
    assert_eq!(
        app["files"], 2,
        "regular files; the symlink is an entry of its own"
    );
    assert_eq!(app["job_name"], "build");
    assert!(app["manifest"]
        .as_str()
        .is_some_and(|m| m.starts_with("blake3:")));
    let lifetime =
        app["expires_at"].as_u64().expect("expires") - app["created_at"].as_u64().expect("created");
    assert_eq!(lifetime, 2 * 86_400_000, "expire-in: 2d");

    let out = c.dir.path().join("got");
    c.gantry(&[
        "artifacts",
        "get",
        &run.to_string(),
        "app",
        "-o",
        out.to_str().expect("utf8"),
    ])
    .expect_code(0);
    assert_eq!(
        std::fs::read_to_string(out.join("out/bin/app")).expect("app"),
        "hello artifact\n"
    );
    let mode = std::fs::metadata(out.join("out/bin/app"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "modes survive");
    assert_eq!(
        std::fs::read_link(out.join("out/latest")).expect("link"),
        Path::new("bin/app")
    );
    // Into a non-empty directory: refused, nothing changed.
    let err = c
        .gantry(&[
            "artifacts",
            "get",
            &run.to_string(),
            "app",
            "-o",
            out.to_str().expect("utf8"),
        ])
        .expect_code(2);
    assert!(err.stderr.contains("is not empty"), "{}", err.stderr);
    let err = c
        .gantry(&[
            "artifacts",
            "get",
            &run.to_string(),
            "nope",
            "-o",
            c.dir.path().join("x").to_str().expect("utf8"),
        ])
        .expect_code(2);
    assert!(
        err.stderr.contains("has no artifact \"nope\""),
        "{}",
        err.stderr
    );
}

#[test]
fn an_artifact_whose_paths_match_nothing_fails_its_job_with_the_reason() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline(
        "jobs:\n  a:\n    steps: [{ run: 'true' }]\n    artifacts: { paths: [missing/, 'x/*.bin'] }\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "failed", "{view}");
    let log = c.logs(&format!("{run}.0"));
    assert!(
        log.contains("none of its paths (missing/, x/*.bin) exist"),
        "{log}"
    );
}

#[test]
fn a_symlink_leaving_the_workspace_is_refused_at_upload() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline(
        "jobs:\n  a:\n    steps: [{ run: 'mkdir out && ln -s /etc/passwd out/pw' }]\n    artifacts: { paths: [out] }\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "failed", "{view}");
    let log = c.logs(&format!("{run}.0"));
    assert!(
        log.contains("out/pw") && log.contains("the target is absolute"),
        "{log}"
    );
}

const CACHED: &str = r#"
name: cached
jobs:
  deps:
    cache:
      key: deps-${{ hashFiles('lock.txt') }}
      restore-keys: [deps-]
      paths: [vendor]
    steps:
      - run: |
          if [ -f vendor/made-by ]; then echo "restored from $(cat vendor/made-by)"; else echo "cold"; fi
          mkdir -p vendor && cat lock.txt > vendor/made-by
"#;

#[test]
fn caches_restore_by_key_then_prefix_and_protected_branches_keep_to_themselves() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    // Each run's source tree holds a lock.txt, whose hash is in the cache key.
    let run_with_lock = |lock: &str, branch: &str| {
        let source = c.dir.path().join(format!("src-{lock}-{branch}"));
        std::fs::create_dir_all(&source).expect("source");
        std::fs::write(source.join("lock.txt"), lock).expect("lock");
        let run = c.run_pipeline(
            CACHED,
            &["--ref", branch, "--source", source.to_str().expect("utf8")],
        );
        let view = c.wait_run(run, DEADLINE);
        assert_eq!(view["state"], "succeeded", "{view}");
        c.logs(&format!("{run}.0"))
    };
    let first = run_with_lock("A", "main");
    assert!(
        first.contains("cold") && first.contains("cache miss"),
        "{first}"
    );
    let second = run_with_lock("A", "main");
    assert!(second.contains("restored from A"), "{second}");
    assert!(second.contains("exact match"), "{second}");
    assert!(second.contains("not saved again"), "{second}");

    // A feature branch with another lock file falls back to main's cache through the
    // restore key, then saves its own under its own key.
    let feature = run_with_lock("B", "feature");
    assert!(
        feature.contains("restored from A")
            && feature.contains("restore key")
            && feature.contains("from branch main"),
        "{feature}"
    );
    let caches = c.gantry(&["cache", "list", "--json"]).expect_code(0).json();
    let caches = caches.as_array().expect("array").clone();
    let branch_of = |i: usize| caches[i]["branch"].as_str().unwrap_or_default();
    assert_eq!(caches.len(), 2, "{caches:?}");
    assert_eq!(
        (branch_of(0), branch_of(1)),
        ("feature", "main"),
        "newest first"
    );

    // Main never restores a cache written by another branch: with its own cache gone,
    // main goes cold although the feature branch holds an exact match for lock B.
    let main_key = caches[1]["key"].as_str().expect("key");
    c.gantry(&["cache", "rm", main_key, "--branch", "main"])
        .expect_code(0);
    let cold = run_with_lock("B", "main");
    assert!(
        cold.contains("cold") && cold.contains("cache miss"),
        "{cold}"
    );
    let err = c.gantry(&["cache", "rm", "no-such-key"]).expect_code(2);
    assert!(err.stderr.contains("no cache with key"), "{}", err.stderr);
}

#[test]
fn gc_expires_artifacts_and_deletes_only_unreferenced_chunks() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let pipeline = |name: &str, expire: &str, content: &str| {
        format!(
            "name: {name}\njobs:\n  a:\n    steps: [{{ run: 'mkdir out && head -c 300000 /dev/urandom > out/{content}' }}]\n    artifacts: {{ name: {name}, paths: [out], expire-in: {expire} }}\n"
        )
    };
    let short = c.run_pipeline(&pipeline("short", "1s", "s.bin"), &[]);
    let long = c.run_pipeline(&pipeline("long", "1d", "l.bin"), &[]);
    for run in [short, long] {
        assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    }
    // The 1 s artifact expires (a dry run changes nothing while we wait).
    wait_for("the short artifact to expire", DEADLINE, || {
        let dry = c
            .gantry(&["gc", "--dry-run", "--json"])
            .expect_code(0)
            .json();
        (dry["artifacts_expired"] == 1).then_some(())
    });
    let report = c
        .gantry(&["gc", "--grace", "0s", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(report["artifacts_expired"], 1, "{report}");
    assert!(report["chunks_deleted"].as_u64() > Some(0), "{report}");
    assert!(report["chunks_kept"].as_u64() > Some(0), "{report}");
    assert!(c
        .gantry(&["artifacts", "list", &short.to_string(), "--json"])
        .expect_code(0)
        .json()
        .as_array()
        .is_some_and(Vec::is_empty));
    // The live one still downloads whole.
    let out = c.dir.path().join("long");
    c.gantry(&[
        "artifacts",
        "get",
        &long.to_string(),
        "long",
        "-o",
        out.to_str().expect("utf8"),
    ])
    .expect_code(0);
    assert_eq!(
        std::fs::metadata(out.join("out/l.bin"))
            .expect("file")
            .len(),
        300_000
    );
    // A second collection finds nothing more to delete.
    let again = c
        .gantry(&["gc", "--grace", "0s", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(again["chunks_deleted"], 0, "{again}");
}
