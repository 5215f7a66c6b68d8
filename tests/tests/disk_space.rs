//! End-to-end tests of a coordinator whose data directory runs low on space or fills up
//! (issue 25), with the real `gantry` and `gantry-agent` binaries on loopback and the
//! data directory on a small tmpfs (mounted for the test: root only, else skipped by
//! the `requires` rule): new runs refused naming the cause, `/readyz` and `/metrics`
//! saying so, an upload that runs into a full disk told that the coordinator is out
//! of space, and a job whose log could not be stored in full marked so.

use std::path::PathBuf;
use std::process::Command;

use gantry_tests::http::{get, metric};
use gantry_tests::{
    job_named, requires, wait_for, Agent, Coordinator, CoordinatorOptions, DEADLINE,
};

/// Lazily unmounts a file system mounted for a test when dropped (also when the test
/// panics, and while the server may still hold files open there).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A coordinator (with its HTTP side) whose data directory is moved onto a tmpfs of
/// `size`, restarted with `server_args`; `None` (the test skips) when no tmpfs can be
/// mounted.
fn on_small_tmpfs(test: &str, size: &str, server_args: &[&str]) -> Option<(Coordinator, Unmount)> {
    let mut c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    c.server().terminate();
    let data = c.data_dir();
    let before = c.dir.path().join("coordinator.before");
    std::fs::rename(&data, &before).expect("move the data directory aside");
    std::fs::create_dir(&data).expect("mountpoint");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !requires::require(
        mounted,
        test,
        "root, to mount a tmpfs",
        "run the tests as root",
    ) {
        return None;
    }
    let unmount = Unmount(data.clone());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(before.join("."))
        .arg(&data)
        .status()
        .expect("cp");
    assert!(copied.success(), "copy the data directory onto the tmpfs");
    c.server_args = server_args.iter().map(|s| (*s).to_owned()).collect();
    c.start_server();
    Some((c, unmount))
}

/// [`on_small_tmpfs`] of 16 MiB with the watermark off (so the disk can fill up), and one
/// agent connected.
fn small_and_unguarded_with_an_agent(test: &str) -> Option<(Coordinator, Unmount, Vec<Agent>)> {
    let (c, unmount) = on_small_tmpfs(test, "16m", &["--min-free-space", "0"])?;
    let agents = c.agents_running(1, &[]);
    Some((c, unmount, agents))
}

/// A watermark above all the tmpfs holds: `gantry run` is refused naming the directory,
/// the figures and the option; `/readyz` is not ready and says why; `/metrics` shows the
/// free bytes and the low-space gauge.
#[test]
fn a_data_directory_under_its_watermark_refuses_runs_and_says_so_on_readyz_and_metrics() {
    let test = "a_data_directory_under_its_watermark_refuses_runs";
    let Some((c, _unmount)) = on_small_tmpfs(test, "64m", &["--min-free-space", "1GiB"]) else {
        return;
    };
    let file = c.dir.path().join("pipeline.yml");
    std::fs::write(&file, "jobs:\n  a:\n    steps: [{ run: 'true' }]\n").expect("pipeline");
    let out = c.gantry(&["run", file.to_str().expect("utf8"), "--no-source"]);
    assert_ne!(out.code, 0, "refused: {out:?}");
    let data = c.data_dir();
    let cause = format!("the coordinator's data directory {} has ", data.display());
    assert!(
        out.stderr.contains(&cause)
            && out
                .stderr
                .contains("free, under its 1.0GiB watermark (--min-free-space)"),
        "{}",
        out.stderr
    );
    // A source upload is refused the same way, before any byte is stored.
    let src = c.dir.path().join("src");
    std::fs::create_dir(&src).expect("src");
    std::fs::write(src.join("a.txt"), "a").expect("a.txt");
    let out = c.gantry(&[
        "run",
        file.to_str().expect("utf8"),
        "--source",
        src.to_str().expect("utf8"),
    ]);
    assert_ne!(out.code, 0, "refused: {out:?}");
    assert!(out.stderr.contains(&cause), "{}", out.stderr);
    assert_eq!(
        c.gantry(&["pipelines", "list", "--json"])
            .expect_code(0)
            .json(),
        serde_json::json!([]),
        "no run was stored"
    );

    let http = c.http_address.clone().expect("http side");
    let ready = get(&http, "/readyz");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready.body.contains("watermark (--min-free-space)")
            && ready.body.contains(&data.display().to_string()),
        "{}",
        ready.body
    );
    let metrics = get(&http, "/metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert_eq!(metric(&metrics.body, "gantry_data_dir_low_space"), 1);
    let free = metric(&metrics.body, "gantry_data_dir_free_bytes");
    assert!(free > 0 && free <= 64 << 20, "free bytes {free}");
}

/// With the watermark off, a job's artifact larger than the tmpfs fills it mid-upload:
/// the uploader (the agent, in the job's log and state) is told the coordinator is out
/// of space, not that a stream closed without an answer.
#[test]
fn an_upload_that_fills_the_data_directory_is_told_the_coordinator_is_out_of_space() {
    let test = "an_upload_that_fills_the_data_directory";
    let Some((c, _unmount, _agents)) = small_and_unguarded_with_an_agent(test) else {
        return;
    };
    let run = c.run_pipeline(
        "jobs:\n  big:\n    steps: [{ run: 'mkdir out && head -c 24000000 /dev/urandom > out/big.bin' }]\n    artifacts: { name: big, paths: [out] }\n",
        &[],
    );
    // Generous: 24 MB written, chunked and sent by debug builds on a loaded machine.
    let view = c.wait_run(run, 3 * DEADLINE);
    assert_eq!(view["state"], "failed", "{view}");
    assert_eq!(job_named(&view, "big")["state"], "failed", "{view}");
    // A finished job's last log lines may land just after its state.
    let cause = "the coordinator is out of space: its data directory";
    let log = wait_for("the job's log to say why", DEADLINE, || {
        let log = c.logs(&format!("{run}.0"));
        log.contains(cause).then_some(log)
    });
    assert!(
        log.contains(&c.data_dir().display().to_string()),
        "{log}\n{view}"
    );
    assert!(
        !log.contains("without saying the chunks were stored"),
        "{log}"
    );
    // The abandoned pack was removed: the coordinator has room again.
    let http = c.http_address.clone().expect("http side");
    assert_eq!(get(&http, "/readyz").status, 200);
}

/// The data directory fills up while a job prints: the job still succeeds, but its view
/// (`jobs show`, JSON and text) and the end of its log say the log is incomplete; once
/// there is room again the agent's resend completes the log and the mark goes.
#[test]
fn a_log_that_fills_the_data_directory_is_marked_incomplete_until_it_is_stored() {
    let test = "a_log_that_fills_the_data_directory";
    let Some((c, _unmount, _agents)) = small_and_unguarded_with_an_agent(test) else {
        return;
    };
    let go = c.dir.path().join("go");
    let run = c.run_pipeline(
        &format!(
            "jobs:\n  chatty:\n    steps: [{{ run: 'echo before; while [ ! -e {} ]; do sleep 0.1; done; head -c 1000000 /dev/urandom | base64; echo last line' }}]\n",
            go.display()
        ),
        &[],
    );
    let job = format!("{run}.0");
    wait_for("the first line in the stored log", DEADLINE, || {
        c.logs(&job).contains("before").then_some(())
    });
    // Fill the tmpfs (dd stops at ENOSPC), then let the job print.
    let filler = c.data_dir().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("dd");
    std::fs::write(&go, "").expect("go");
    let view = c.wait_run(run, 2 * DEADLINE);
    assert_eq!(job_named(&view, "chatty")["state"], "succeeded", "{view}");
    let shown = wait_for("the job to say its log is incomplete", DEADLINE, || {
        let shown = c
            .gantry(&["jobs", "show", &job, "--json"])
            .expect_code(0)
            .json();
        (shown["log_incomplete"] == true).then_some(shown)
    });
    assert_eq!(shown["state"], "succeeded", "{shown}");
    let detail = c.gantry(&["jobs", "show", &job]).expect_code(0).stdout;
    assert!(
        detail.contains("(incomplete: the coordinator ran out of space storing it)"),
        "{detail}"
    );
    let log = c.logs(&job);
    assert!(log.contains("before\n"), "{log}");
    assert!(
        log.ends_with("[gantry: this log is incomplete: the coordinator ran out of space storing it; the rest is stored when there is room and the agent sends it again]\n"),
        "{log}"
    );
    assert!(!log.contains("last line"), "{log}");

    // Room again: the agent's resend completes the log, and the mark goes.
    std::fs::remove_file(&filler).expect("remove the filler");
    let log = wait_for(
        "the log to be completed by the agent's resend",
        2 * DEADLINE,
        || {
            let log = c.logs(&job);
            log.contains("last line\n").then_some(log)
        },
    );
    assert!(!log.contains("[gantry: this log is incomplete"), "{log}");
    let shown = c
        .gantry(&["jobs", "show", &job, "--json"])
        .expect_code(0)
        .json();
    assert_eq!(shown["log_incomplete"], false, "{shown}");
}
