//! End-to-end tests of jobs that run in Docker containers, with the real `gantry` and
//! `gantry-agent` binaries and the host's Docker engine.
//!
//! No registry is used: each test builds a tiny image from the host's static busybox
//! (`docker import` of a root filesystem with `bin/busybox` and a few links to it) under
//! a unique tag, and removes it when done. Without busybox-static or a running engine
//! the tests skip, saying what to install (they fail instead under
//! `GANTRY_REQUIRE_ALL_TESTS=1`, as in CI; see `gantry_tests::requires`).

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_tests::containers::{self, BusyboxImage, BUSYBOX};
use gantry_tests::{job_named, requires, wait_for, Agent, Coordinator, DEADLINE};

const NEED_DOCKER: &str = "Docker tests need a running Docker engine";
/// The coordinator gives every job 10 s between SIGTERM and SIGKILL; a `sleep` that is
/// PID 1 of its container ignores SIGTERM, so a cancel takes the whole grace.
const CANCEL_DEADLINE: Duration = Duration::from_secs(60);

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{NEED_DOCKER}: cannot run `docker {}`: {e}", args.join(" ")))
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Builds `gantry-test-busybox:<unique>` from the host's busybox, with no registry.
fn busybox_image() -> BusyboxImage {
    containers::busybox_image(
        "gantry-test-busybox",
        &["sh", "echo", "cat", "id", "sleep", "touch", "awk"],
        &[],
    )
}

/// Containers made from `image` (running or not) that carry the agent's job label.
fn containers_of(image: &BusyboxImage) -> Vec<String> {
    let filter = format!("ancestor={}", image.tag);
    let out = docker(&[
        "ps",
        "--all",
        "--quiet",
        "--filter",
        "label=gantry.job",
        "--filter",
        &filter,
    ]);
    assert!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The uid this test (and so the agents it starts) runs as.
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::metadata(dir.path()).expect("metadata").uid()
}

#[test]
fn a_job_with_an_image_runs_its_steps_in_containers_as_the_agent_and_leaves_none() {
    if !requires::require_docker(
        "a_job_with_an_image_runs_its_steps_in_containers_as_the_agent_and_leaves_none",
        Some(BUSYBOX),
    ) {
        return;
    }
    let image = busybox_image();
    let c = Coordinator::start();
    let agents = c.agents_running(1, &[]);
    let yaml = format!(
        "jobs:\n  boxed:\n    image: {tag}\n    env:\n      FLAVOUR: from-the-job\n    outputs:\n      where: ${{{{ steps.box.outputs.where }}}}\n    steps:\n      - name: inside\n        id: box\n        run: |\n          echo \"where=$GANTRY_OUTPUT\" >> \"$GANTRY_OUTPUT\"\n          cat /etc/os-release 2>/dev/null || echo in-container\n          echo \"uid=$(id -u)\"\n          echo \"flavour=$FLAVOUR ws=$GANTRY_WORKSPACE\"\n          echo \"home=${{HOME:-none}} path=${{PATH:-none}}\"\n          echo written > /workspace/made-in-container\n          touch /workspace/also-made\n      - name: next step sees the workspace\n        run: cat made-in-container; echo \"output ${{{{ steps.box.outputs.where }}}}\"\n  missing:\n    image: {{ name: 'gantry-test-missing:{missing}', pull: never }}\n    steps: [{{ run: 'echo ran-anyway' }}]\n",
        tag = image.tag,
        missing = unique()
    );
    let run = c.run_pipeline(&yaml, &[]);
    let view = c.wait_run(run, Duration::from_secs(90));

    let boxed = job_named(&view, "boxed");
    let log = c.logs(&format!("{run}.0"));
    assert_eq!(boxed["state"], "succeeded", "{view}\n{log}");
    assert!(log.contains("in-container\n"), "ran in the image: {log}");
    assert!(
        log.contains(&format!("uid={}\n", own_uid())),
        "runs as the agent's uid: {log}"
    );
    assert!(
        log.contains("flavour=from-the-job ws=/workspace\n"),
        "declared env and the container's workspace: {log}"
    );
    // Docker itself sets HOME (from the image, else `/`) and a default PATH; neither
    // may be the agent's own.
    for key in ["HOME", "PATH"] {
        if let Ok(host_value) = std::env::var(key) {
            let leaked = format!("{}={host_value}", key.to_lowercase());
            assert!(!log.contains(&leaked), "{key} leaked from the host: {log}");
        }
    }
    assert!(
        log.contains("written\n"),
        "the second step saw the file: {log}"
    );
    // $GANTRY_OUTPUT is in the job's temporary directory, mounted in every container.
    assert!(log.contains("output /gantry/tmp/output-1\n"), "{log}");
    let shown = c
        .gantry(&["jobs", "show", &format!("{run}.0"), "--json"])
        .expect_code(0)
        .json();
    assert_eq!(shown["outputs"]["where"], "/gantry/tmp/output-1", "{shown}");

    let missing = job_named(&view, "missing");
    assert_ne!(missing["state"], "succeeded", "{view}");
    let missing_log = c.logs(&format!("{run}.1"));
    assert!(
        missing_log.contains(
            "is not on this host and the job says pull: never; load it with `docker load -i FILE`"
        ),
        "the log says the image is missing and how to fix it: {missing_log}"
    );
    assert!(
        !missing_log.contains("ran-anyway"),
        "nothing ran: {missing_log}"
    );

    assert_eq!(
        containers_of(&image),
        Vec::<String>::new(),
        "no container is left behind"
    );
    let agent_log = agents[0].log();
    assert!(
        !agent_log.contains("cannot remove the workspace"),
        "files made in the container do not stop the workspace's removal: {agent_log}"
    );
}

#[test]
fn cancelling_a_container_job_stops_and_removes_its_container() {
    if !requires::require_docker(
        "cancelling_a_container_job_stops_and_removes_its_container",
        Some(BUSYBOX),
    ) {
        return;
    }
    let image = busybox_image();
    let c = Coordinator::start();
    let _agents = c.agents_running(2, &[]);
    let yaml = format!(
        "jobs:\n  sleeper:\n    image: {tag}\n    steps:\n      - run: |\n          echo started\n          sleep 300\n  slow:\n    image: {tag}\n    timeout: 1s\n    steps: [{{ run: 'echo going; sleep 300' }}]\n",
        tag = image.tag
    );
    let run = c.run_pipeline(&yaml, &[]);
    wait_for("the step's container to run", DEADLINE, || {
        (!containers_of(&image).is_empty()).then_some(())
    });
    // The 1 s timeout stops the other job's container (SIGTERM, then SIGKILL after the
    // grace, since `sleep` is PID 1) while this one still sleeps.
    c.wait_job_state(&format!("{run}.1"), "timed-out", CANCEL_DEADLINE);
    assert!(
        c.logs(&format!("{run}.1")).contains("timed out"),
        "the log says why it stopped"
    );
    c.gantry(&["pipelines", "cancel", &run.to_string()])
        .expect_code(0);
    let view = c.wait_run(run, CANCEL_DEADLINE);
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_eq!(job_named(&view, "sleeper")["state"], "cancelled", "{view}");
    assert_eq!(job_named(&view, "slow")["state"], "timed-out", "{view}");
    assert_eq!(
        containers_of(&image),
        Vec::<String>::new(),
        "the cancelled step's container was removed"
    );
}

/// An isolated agent's container jobs run as the job's own uid (the first of
/// `--job-uids`), not as the agent, and within `--job-memory`: a step growing a string
/// to 1 GiB in a 64 MiB container is stopped, and no container is left.
#[test]
fn an_isolated_agents_container_jobs_run_as_the_jobs_uid_within_its_memory_limit() {
    let test = "an_isolated_agents_container_jobs_run_as_the_jobs_uid_within_its_memory_limit";
    if !requires::require_docker(test, Some(BUSYBOX))
        || !requires::require(own_uid() == 0, test, "root", "run the tests as root")
    {
        return;
    }
    let image = busybox_image();
    let c = Coordinator::start();
    let mut agent = Agent::enroll(&c.token(&[]), &[]);
    agent.start_with(&["--isolation", "required", "--job-memory", "64MiB"]);
    c.wait_connected(1);
    let yaml = format!(
        "jobs:\n  boxed:\n    image: {tag}\n    steps:\n      - run: |\n          echo \"uid=$(id -u)\"\n          touch /workspace/mine\n  hog:\n    needs: [boxed]\n    image: {tag}\n    steps:\n      - run: awk 'BEGIN {{ s = \"x\"; for (i = 0; i < 30; i++) s = s s; print length(s) }}'\n",
        tag = image.tag
    );
    let run = c.run_pipeline(&yaml, &[]);
    let view = c.wait_run(run, Duration::from_secs(90));
    let log = c.logs(&format!("{run}.0"));
    assert_eq!(
        job_named(&view, "boxed")["state"],
        "succeeded",
        "{view}\n{log}"
    );
    assert!(log.contains("uid=90000\n"), "runs as the job's uid: {log}");
    let hog = c.logs(&format!("{run}.1"));
    assert_eq!(job_named(&view, "hog")["state"], "failed", "{view}\n{hog}");
    assert!(!hog.contains("1073741824"), "the hog got its GiB: {hog}");
    assert_eq!(
        containers_of(&image),
        Vec::<String>::new(),
        "no container is left behind"
    );
}
