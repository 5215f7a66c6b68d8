//! End-to-end tests of a pipeline's `concurrency:` group with the real `gantry` and
//! `gantry-agent` binaries: a newer run of the same group cancels the older one in
//! progress, other groups are left alone, and a bad group is refused before anything runs.

use gantry_tests::{job_named, Coordinator, DEADLINE};

/// One job that runs until `release` exists, under the group `ci-<branch>`.
fn held_pipeline(release: &std::path::Path) -> String {
    format!(
        "concurrency: {{ group: \"ci-${{{{ git.branch }}}}\", cancel-in-progress: true }}\njobs:\n  work:\n    steps: [{{ run: 'echo started; while [ ! -e {} ]; do sleep 0.1; done' }}]\n",
        release.display()
    )
}

fn all_succeed(c: &Coordinator, runs: &[u64]) {
    for &run in runs {
        let view = c.wait_run(run, DEADLINE);
        assert_eq!(view["state"], "succeeded", "{view}");
    }
}

#[test]
fn a_newer_run_of_the_same_group_cancels_the_older_one_and_other_groups_run_on() {
    let c = Coordinator::start();
    let _agents = c.agents_running(3, &[]);
    let release = c.dir.path().join("release");
    let yaml = held_pipeline(&release);

    let old_main = c.run_pipeline(&yaml, &["--ref", "main"]);
    let dev = c.run_pipeline(&yaml, &["--ref", "dev"]);
    c.wait_job_state(&format!("{old_main}.0"), "running", DEADLINE);
    c.wait_job_state(&format!("{dev}.0"), "running", DEADLINE);

    let new_main = c.run_pipeline(&yaml, &["--ref", "main"]);
    let old = c.wait_run(old_main, DEADLINE);
    assert_eq!(old["state"], "cancelled", "{old}");
    assert_eq!(job_named(&old, "work")["state"], "cancelled", "{old}");

    let audit = c.gantry(&["audit", "--json"]).expect_code(0).json();
    let reason =
        format!("run={old_main} reason=superseded by run {new_main} (concurrency group ci-main)");
    assert!(
        audit
            .as_array()
            .expect("audit")
            .iter()
            .any(|e| e["action"] == "run.cancel" && e["detail"].as_str() == Some(reason.as_str())),
        "the audit says which run superseded it: {audit}"
    );

    // The run of another branch is in another group: still running, untouched.
    let dev_view = c.run_view(dev);
    assert!(dev_view["finished_at"].is_null(), "{dev_view}");

    std::fs::write(&release, "").expect("release");
    all_succeed(&c, &[new_main, dev]);
}

#[test]
fn a_run_without_cancel_in_progress_leaves_the_older_run_alone() {
    let c = Coordinator::start();
    let _agents = c.agents_running(2, &[]);
    let release = c.dir.path().join("release");
    let yaml =
        held_pipeline(&release).replace("cancel-in-progress: true", "cancel-in-progress: false");
    let first = c.run_pipeline(&yaml, &["--ref", "main"]);
    c.wait_job_state(&format!("{first}.0"), "running", DEADLINE);
    let second = c.run_pipeline(&yaml, &["--ref", "main"]);
    std::fs::write(&release, "").expect("release");
    all_succeed(&c, &[first, second]);
}

#[test]
fn validate_refuses_a_bad_group_with_file_line_and_column() {
    let c = Coordinator::start();
    let file = c.dir.path().join("bad.yml");
    std::fs::write(
        &file,
        "concurrency:\n  group: \"ci-${{ secrets.TOKEN }}\"\njobs:\n  a:\n    steps: [{ run: x }]\n",
    )
    .expect("write");
    let out = c
        .gantry(&["validate", file.to_str().expect("utf8")])
        .expect_code(2);
    assert!(
        out.stderr.contains("bad.yml:2:")
            && out
                .stderr
                .contains("the pipeline's concurrency group cannot use secrets.TOKEN"),
        "{}",
        out.stderr
    );
}
