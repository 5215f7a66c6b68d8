//! End-to-end tests of pipelines: DAG order across agents, matrix, conditions, manual
//! gates, cancel, timeout, lost agents, coordinator restarts and secret masking, with the
//! real `gantry` and `gantry-agent` binaries on loopback.

use std::path::Path;
use std::time::Duration;

use gantry_tests::{job_named, wait_for, Agent, Coordinator, DEADLINE};

fn ms(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

#[test]
fn the_example_pipeline_runs_its_dag_in_order_across_two_agents() {
    let c = Coordinator::start();
    let _agents = c.agents_running(2, &[]);
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ci.yml"))
            .expect("example");
    let run = c.run_pipeline(&example, &["--ref", "main"]);
    // The manual gate holds `release` until approved.
    c.wait_job_state(&format!("{run}.6"), "awaiting-approval", DEADLINE);
    let before = c.run_view(run);
    assert!(
        before["finished_at"].is_null(),
        "the run waits for the gate"
    );
    c.gantry(&["approve", &format!("{run}.6")]).expect_code(0);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");

    let names = [
        "lint",
        "test (1, debug)",
        "test (2, debug)",
        "test (3, release)",
        "build",
        "report-failure",
        "release",
        "deploy",
    ];
    let jobs: Vec<&serde_json::Value> = names.iter().map(|n| job_named(&view, n)).collect();
    assert_eq!(
        jobs[5]["state"], "skipped",
        "if: failure() does not run when nothing failed"
    );
    assert_eq!(
        jobs[7]["state"], "skipped",
        "the deployment runs only with the input deploy=yes"
    );
    for j in jobs.iter().filter(|j| j["state"] != "skipped") {
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    // Every job started after all of its needs finished.
    for j in jobs.iter().filter(|j| j["state"] == "succeeded") {
        for need in j["needs"].as_array().expect("needs") {
            let need = job_named(&view, need.as_str().expect("name"));
            assert!(
                ms(j, "started_at") >= ms(need, "finished_at"),
                "{} started before {} finished",
                j["name"],
                need["name"]
            );
        }
    }
    // The three test shards ran (matrix with include), and both agents did work.
    let agents: std::collections::BTreeSet<&str> =
        jobs.iter().filter_map(|j| j["agent"].as_str()).collect();
    assert_eq!(agents.len(), 2, "work was spread over both agents: {view}");
    assert!(c
        .logs(&format!("{run}.3"))
        .contains("testing shard 3 in release mode"));
    let build_log = c.logs(&format!("{run}.4"));
    assert!(
        build_log.contains("hello from hello"),
        "inputs default and env reach the job: {build_log}"
    );
}

#[test]
fn a_failed_job_runs_failure_handlers_retries_and_fails_the_run_with_exit_1() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let file = c.dir.path().join("fail.yml");
    std::fs::write(
        &file,
        "jobs:\n  flaky:\n    retry: 1\n    steps: [{ run: 'echo attempt $GANTRY_ATTEMPT; exit 7' }]\n  cleanup:\n    needs: flaky\n    if: failure()\n    steps: [{ run: echo cleaning up }]\n  deploy:\n    needs: flaky\n    steps: [{ run: echo never }]\n",
    )
    .expect("write");
    let out = c
        .gantry(&["run", file.to_str().expect("utf8"), "--follow"])
        .expect_code(1);
    assert!(
        out.stdout.contains("log of failed job"),
        "shows the failing job's log: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("attempt 2"),
        "the retry's log is shown: {}",
        out.stdout
    );
    assert!(out.stdout.contains("run 1 failed"), "{}", out.stdout);
    let view = c.run_view(1);
    let flaky = job_named(&view, "flaky");
    assert_eq!(
        (
            flaky["state"].as_str(),
            flaky["attempt"].as_u64(),
            flaky["exit_code"].as_i64()
        ),
        (Some("failed"), Some(2), Some(7))
    );
    assert_eq!(job_named(&view, "cleanup")["state"], "succeeded");
    assert_eq!(job_named(&view, "deploy")["state"], "skipped");
}

#[test]
fn cancel_kills_the_whole_process_tree_and_timeout_ends_a_job() {
    let c = Coordinator::start();
    let _agents = c.agents_running(2, &[]);
    // Found by their command lines (a job's `$!` is a pid of its own PID namespace when
    // the agent isolates it): durations no other test uses.
    let tag = 3_000 + u64::from(std::process::id() % 900);
    let (outer, inner) = (format!("sleep {tag}"), format!("sleep {}", tag + 1));
    let x = gantry_tests::exchange_dir();
    let started = x.path().join("started");
    let yaml = format!(
        "jobs:\n  tree:\n    steps:\n      - run: |\n          {outer} & echo a >> {p}\n          sh -c '{inner} & echo b >> {p}; wait' &\n          echo started\n          wait\n  slow:\n    timeout: 1s\n    steps: [{{ run: 'echo going; sleep 300' }}]\n",
        p = started.display()
    );
    let run = c.run_pipeline(&yaml, &[]);
    wait_for("the job's processes to start", DEADLINE, || {
        (std::fs::read_to_string(&started)
            .unwrap_or_default()
            .lines()
            .count()
            == 2)
            .then_some(())
    });
    assert_eq!(
        (
            gantry_tests::processes_running(&outer).len(),
            gantry_tests::processes_running(&inner).len()
        ),
        (1, 1),
        "both processes run"
    );
    c.wait_job_state(&format!("{run}.1"), "timed-out", DEADLINE);
    c.gantry(&["pipelines", "cancel", &run.to_string()])
        .expect_code(0);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_eq!(job_named(&view, "tree")["state"], "cancelled");
    assert_eq!(
        job_named(&view, "slow")["state"],
        "timed-out",
        "the 1 s timeout ended it before the cancel: {view}"
    );
    for cmdline in [&outer, &inner] {
        let left = gantry_tests::processes_running(cmdline);
        assert!(left.is_empty(), "outlived the cancelled job: {left:?}");
    }
    assert!(
        c.logs(&format!("{run}.1")).contains("timed out"),
        "the log says why it stopped"
    );
}

#[test]
fn a_job_whose_agent_dies_is_run_again_on_another_agent() {
    let c = Coordinator::start();
    let token = c.token(&["--uses", "2"]);
    let mut first = Agent::enroll(&token, &[]);
    first.start();
    c.wait_connected(1);
    let x = gantry_tests::exchange_dir();
    // A file per attempt: with isolation each attempt may run as another uid, which
    // could not append to a file the first one created.
    let attempts_started = || {
        std::fs::read_dir(x.path()).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("attempt-"))
                .count()
        })
    };
    let run = c.run_pipeline(&format!("jobs:\n  work:\n    steps: [{{ run: 'echo ran > {d}/attempt-$GANTRY_ATTEMPT; sleep 3; echo done' }}]\n", d = x.path().display()), &[]);
    let job = format!("{run}.0");
    c.wait_job_state(&job, "running", DEADLINE);
    // Its step has begun (an isolated step starts a few ms after the job does).
    wait_for("the first attempt's step to start", DEADLINE, || {
        (attempts_started() == 1).then_some(())
    });
    // The agent holding the job dies without a word; a second agent is available.
    first.proc().kill9();
    let mut second = Agent::enroll(&token, &[]);
    second.start();
    // The lease (30 s) must run out before the job is declared lost and re-run.
    let view = c.wait_run(run, Duration::from_secs(90));
    assert_eq!(view["state"], "succeeded", "{view}");
    let work = job_named(&view, "work");
    // Attempt 1 was lost with its agent; the re-run is a later attempt (offers that time
    // out also count as attempts).
    assert!(
        work["attempt"].as_u64().unwrap_or(0) >= 2,
        "re-run as a new attempt: {work}"
    );
    assert_eq!(
        attempts_started(),
        2,
        "ran twice: once lost, once to the end"
    );
    assert_eq!(
        work["agent"].as_str(),
        Some(second.id.as_str()),
        "re-run on the other agent"
    );
    assert!(c.logs(&job).contains("done"));
}

#[test]
fn a_coordinator_restart_mid_job_loses_no_log_line_and_the_result_arrives() {
    let mut c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline("jobs:\n  count:\n    steps: [{ run: 'for i in $(seq 1 40); do echo line $i; sleep 0.1; done' }]\n", &[]);
    let job = format!("{run}.0");
    wait_for("some output", DEADLINE, || {
        c.logs(&job).contains("line 5").then_some(())
    });
    c.server().kill9();
    std::thread::sleep(Duration::from_millis(800)); // the job keeps printing while no coordinator listens
    c.start_server();
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = wait_for("the whole log", DEADLINE, || {
        let log = c.logs(&job);
        log.contains("line 40").then_some(log)
    });
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("line ")).collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(
        lines, expected,
        "every line once, in order, across the restart"
    );
}

#[test]
fn secrets_reach_only_their_job_and_never_the_stored_log() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let set = std::process::Command::new(gantry_tests::bin("gantry"))
        .args(["secrets", "set", "API_TOKEN"])
        .env("GANTRY_CONFIG", c.context())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"s3cr3t-t0ken-value\n")?;
            child.wait()
        })
        .expect("secrets set");
    assert!(set.success());
    // The secret is printed whole, split across two writes 300 ms apart (so across two
    // log chunks), and in the environment of a job that does not reference it.
    let yaml = "jobs:\n  uses:\n    steps:\n      - run: |\n          echo \"whole: ${{ secrets.API_TOKEN }}\"\n          T='${{ secrets.API_TOKEN }}'\n          printf 'split: %s' \"$(echo $T | cut -c1-7)\"; sleep 0.3; printf '%s\\n' \"$(echo $T | cut -c8-)\"\n  other:\n    steps: [{ run: 'echo \"other sees: ${API_TOKEN:-nothing}\"' }]\n";
    let run = c.run_pipeline(yaml, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = c.logs(&format!("{run}.0"));
    assert!(!log.contains("s3cr3t-t0ken-value"), "secret leaked: {log}");
    assert!(log.contains("whole: ***"), "{log}");
    assert!(log.contains("split: ***"), "masked across chunks: {log}");
    assert!(c.logs(&format!("{run}.1")).contains("other sees: nothing"));
    // Nothing on the coordinator's disk holds the value: logs, store, or anything else.
    for entry in gantry_tests::files_under(&c.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(18).any(|w| w == b"s3cr3t-t0ken-value"),
            "secret in plain text in {}",
            entry.display()
        );
    }
    // A pipeline that uses a secret that is not set is refused before it runs.
    let file = c.dir.path().join("missing.yml");
    std::fs::write(
        &file,
        "jobs:\n  a:\n    steps: [{ run: 'echo ${{ secrets.NOPE }}' }]\n",
    )
    .expect("write");
    let out = c
        .gantry(&["run", file.to_str().expect("utf8")])
        .expect_code(2);
    assert!(
        out.stderr.contains("secret NOPE, which is not set"),
        "{}",
        out.stderr
    );
}

#[test]
fn validate_names_file_line_and_column_for_every_error() {
    let c = Coordinator::start();
    let file = c.dir.path().join("bad.yml");
    std::fs::write(&file, "jobs:\n  build:\n    needs: [lnt]\n    steps: [{ run: make }]\n  lint:\n    runs-on: { Bad Key: x }\n    steps: [{ run: make lint }]\n").expect("write");
    let out = c
        .gantry(&["validate", file.to_str().expect("utf8")])
        .expect_code(2);
    assert!(
        out.stderr.contains("bad.yml:3:13: needs names \"lnt\""),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("bad.yml:6:16:"),
        "label key error with its position: {}",
        out.stderr
    );
    // A run of a broken file is refused the same way, and nothing runs.
    let out = c
        .gantry(&["run", file.to_str().expect("utf8")])
        .expect_code(2);
    assert!(out.stderr.contains("bad.yml:3:13"), "{}", out.stderr);
    assert_eq!(
        c.gantry(&["pipelines", "list", "--json"])
            .expect_code(0)
            .json(),
        serde_json::json!([])
    );
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ci.yml");
    let out = c
        .gantry(&["validate", good.to_str().expect("utf8")])
        .expect_code(0);
    assert!(out.stdout.contains("valid, 8 jobs"), "{}", out.stdout);
}

#[test]
fn jobs_go_only_to_agents_whose_labels_match() {
    let c = Coordinator::start();
    let token = c.token(&["--uses", "2"]);
    let mut gpu = Agent::enroll(&token, &["--label", "gpu=yes"]);
    let mut plain = Agent::enroll(&token, &[]);
    gpu.start();
    plain.start();
    c.wait_connected(2);
    let run = c.run_pipeline("jobs:\n  train:\n    runs-on: { gpu: 'yes' }\n    steps: [{ run: echo training }]\n  nowhere:\n    runs-on: { gpu: 'tpu' }\n    steps: [{ run: echo never }]\n", &[]);
    let train = c.wait_job_state(&format!("{run}.0"), "succeeded", DEADLINE);
    assert_eq!(train["agent"].as_str(), Some(gpu.id.as_str()));
    let nowhere = c
        .gantry(&["jobs", "show", &format!("{run}.1"), "--json"])
        .expect_code(0)
        .json();
    assert_eq!(
        nowhere["state"], "queued",
        "no matching agent, so it waits: {nowhere}"
    );
}

#[test]
fn a_large_log_reads_back_whole_and_in_order() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    // 3 MB in lines of varying length, so chunks have uneven sizes.
    let run = c.run_pipeline(
        "jobs:\n  big:\n    steps: [{ run: \"awk 'BEGIN { for (i = 0; i < 30000; i++) printf \\\"line %d %*s\\\\n\\\", i, i % 97, \\\"x\\\" }'\" }]\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = wait_for("the whole log", DEADLINE, || {
        let log = c.logs(&format!("{run}.0"));
        log.contains("line 29999 ").then_some(log)
    });
    let numbers: Vec<u32> = log
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (0..30_000).collect::<Vec<u32>>(),
        "every line once, in order"
    );
}

#[test]
fn gantry_run_uploads_the_source_tree_as_the_jobs_workspace() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let pipeline = "jobs:\n  build:\n    steps:\n      - run: ./build.sh\n      - run: test ! -e ignored.txt && test ! -d .git && echo clean\n  again:\n    needs: build\n    steps: [{ run: cat data/input.txt }]\n";
    // A plain directory: every file is sent, modes kept.
    let plain = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(plain.path().join("data")).expect("mkdir");
    std::fs::write(plain.path().join("data/input.txt"), "hello source\n").expect("write");
    std::fs::write(
        plain.path().join("build.sh"),
        "#!/bin/sh\necho \"built from $(cat data/input.txt)\"\n",
    )
    .expect("write");
    std::fs::set_permissions(
        plain.path().join("build.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::write(plain.path().join("gantry.yml"), pipeline).expect("write");
    let out = c
        .gantry(&[
            "run",
            plain.path().join("gantry.yml").to_str().expect("utf8"),
            "--follow",
        ])
        .expect_code(0);
    assert!(out.stdout.contains("run 1 succeeded"), "{}", out.stdout);
    assert!(
        c.logs("1.0").contains("built from hello source"),
        "{}",
        c.logs("1.0")
    );
    assert!(
        c.logs("1.1").contains("hello source"),
        "every job of the run starts from the same tree"
    );

    // A git checkout: only what git tracks or would track; ignored files and .git stay home.
    let repo = tempfile::tempdir().expect("tempdir");
    assert!(std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(repo.path())
        .status()
        .expect("git")
        .success());
    std::fs::create_dir_all(repo.path().join("data")).expect("mkdir");
    std::fs::write(repo.path().join("data/input.txt"), "from git\n").expect("write");
    std::fs::write(repo.path().join("build.sh"), "#!/bin/sh\necho built\n").expect("write");
    std::fs::set_permissions(
        repo.path().join("build.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::write(repo.path().join(".gitignore"), "ignored.txt\n").expect("write");
    std::fs::write(repo.path().join("ignored.txt"), "secret scratch\n").expect("write");
    std::fs::write(repo.path().join("gantry.yml"), pipeline).expect("write");
    let out = c
        .gantry(&[
            "run",
            repo.path().join("gantry.yml").to_str().expect("utf8"),
            "--follow",
        ])
        .expect_code(0);
    assert!(out.stdout.contains("run 2 succeeded"), "{}", out.stdout);
    assert!(c.logs("2.0").contains("clean"), "{}", c.logs("2.0"));
    assert!(c.logs("2.1").contains("from git"));

    // --no-source: an empty workspace.
    let out = c
        .gantry(&[
            "run",
            plain.path().join("gantry.yml").to_str().expect("utf8"),
            "--follow",
            "--no-source",
        ])
        .expect_code(1);
    assert!(
        out.stdout.contains("run 3 failed"),
        "./build.sh is not there without the source: {}",
        out.stdout
    );
}

#[test]
fn invalid_utf8_and_long_lines_pass_through_untouched() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    // Bytes that are not UTF-8, and one 200,000-character line (no truncation).
    let run = c.run_pipeline(
        "jobs:\n  bytes:\n    steps: [{ run: \"printf 'bad \\\\377\\\\376 bytes\\\\n'; head -c 200000 /dev/zero | tr '\\\\0' x; echo; echo after\" }]\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let out = std::process::Command::new(gantry_tests::bin("gantry"))
        .args(["logs", &format!("{run}.0")])
        .env("GANTRY_CONFIG", c.context())
        .output()
        .expect("logs");
    assert!(out.status.success());
    assert!(
        out.stdout.windows(12).any(|w| w == b"bad \xff\xfe bytes"),
        "raw bytes kept as they were: {:?}",
        &out.stdout[..out.stdout.len().min(80)]
    );
    let long = out
        .stdout
        .split(|b| *b == b'\n')
        .find(|l| l.first() == Some(&b'x'))
        .expect("long line");
    assert_eq!(long.len(), 200_000, "the long line is whole");
    assert!(
        out.stdout.ends_with(b"after\n"),
        "output after them is intact"
    );
}
