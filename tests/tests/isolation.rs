//! End-to-end tests of job isolation (issue 25), with the real `gantry` and
//! `gantry-agent` binaries on loopback: a job runs as a uid of its own in a PID
//! namespace of its own, so it cannot read its agent's key, another job's workspace or
//! environment, nor leave a process behind; an agent that cannot isolate refuses jobs
//! and says why. These run as root (the agent needs root to isolate); without root they
//! skip, or fail under `GANTRY_REQUIRE_ALL_TESTS=1`.

use std::path::Path;
use std::time::Duration;

use gantry_tests::requires::require;
use gantry_tests::{job_named, wait_for, Agent, Coordinator, DEADLINE};

/// The user an unprivileged agent runs as in these tests.
const NOBODY: u32 = 65534;

fn is_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    require(euid == 0, test, "root", "run the tests as root")
}

fn isolated_agents(c: &Coordinator, n: usize, extra: &[&str]) -> Vec<Agent> {
    let token = c.token(&["--uses", &n.to_string()]);
    let mut agents: Vec<Agent> = (0..n).map(|_| Agent::enroll(&token, &[])).collect();
    for a in &mut agents {
        let mut args = vec!["--isolation", "required"];
        args.extend_from_slice(extra);
        a.start_with(&args);
    }
    c.wait_connected(n);
    agents
}

/// A directory every job may read and write (mode 1777), for handing markers between
/// a test and its jobs; not under `/tmp` nor `/var/tmp`, which each isolated job has of
/// its own.
fn exchange_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("gantry-isolation-")
        .tempdir_in("/run")
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    dir
}

/// A pipeline of `jobs`: (name, extra lines of the job, its one step's script).
fn pipeline(jobs: &[(&str, &str, &str)]) -> String {
    use std::fmt::Write as _;
    let mut yaml = String::from("jobs:\n");
    for (name, extra, script) in jobs {
        let _ = writeln!(yaml, "  {name}:");
        for line in extra.lines() {
            let _ = writeln!(yaml, "    {line}");
        }
        yaml.push_str("    steps:\n      - run: |\n");
        for line in script.lines() {
            let _ = writeln!(yaml, "          {line}");
        }
    }
    yaml
}

/// The job reads `../../tls/agent.pem` (its workspace is DATA/work/NAME), the data
/// directory named on its parent's command line (`/proc/$PPID/cmdline`), and the key by
/// its absolute path; it tries to write `tls/`. Each fails: the key stays the agent's.
#[test]
fn a_job_cannot_read_the_agent_key_by_relative_path_or_through_proc() {
    if !is_root("a_job_cannot_read_the_agent_key") {
        return;
    }
    let c = Coordinator::start();
    let agents = isolated_agents(&c, 1, &[]);
    let data = agents[0].dir.path().display().to_string();
    let script = format!(
        "echo uid=$(id -u)\n\
         cat ../../tls/agent.pem || echo refused-relative\n\
         d=$(tr '\\0' '\\n' < /proc/$PPID/cmdline | sed -n '/^--data-dir$/{{n;p}}')\n\
         echo \"parent names data dir: [$d]\"\n\
         cat \"${{d:-/nonexistent}}/tls/agent.pem\" || echo refused-proc\n\
         cat {data}/tls/agent.pem || echo refused-absolute\n\
         touch ../../tls/planted || echo refused-write\n\
         ls ../.. || echo refused-list\n"
    );
    let run = c.run_pipeline(&pipeline(&[("thief", "", &script)]), &[]);
    let view = c.wait_run(run, DEADLINE);
    let log = c.logs(&format!("{run}.0"));
    assert_eq!(job_named(&view, "thief")["state"], "succeeded", "{log}");
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("BEGIN CERTIFICATE"),
        "the job read the agent's key:\n{log}"
    );
    for refused in [
        "refused-relative",
        "refused-proc",
        "refused-absolute",
        "refused-write",
        "refused-list",
    ] {
        assert!(log.contains(refused), "no {refused} in:\n{log}");
    }
    assert!(!log.contains("uid=0\n"), "the job ran as root:\n{log}");
    assert!(
        !Path::new(&data).join("tls/planted").exists(),
        "the job wrote the agent's tls/"
    );
}

/// Two jobs of one run on one agent at once: `peek` tries to read `hold`'s workspace
/// file, its home, what it left in `/tmp`, `/var/tmp` and `/dev/shm`, and every `/proc/PID/environ` it can see for
/// `hold`'s secret; `hold` waits until `peek` is done, so both run together. Nothing
/// `hold` wrote to `/tmp`, `/var/tmp` or `/dev/shm` is on the host's afterwards.
#[test]
fn a_job_cannot_read_a_concurrent_jobs_workspace_or_environment() {
    if !is_root("a_job_cannot_read_a_concurrent_jobs_workspace") {
        return;
    }
    let c = Coordinator::start();
    let _agents = isolated_agents(&c, 1, &["--slots", "2"]);
    let x = exchange_dir();
    let x = x.path().display();
    let value = "hunter2-held-by-the-other-job";
    let tmp_file = format!("/tmp/gantry-held-{}", std::process::id());
    let var_tmp_file = format!("/var/tmp/gantry-held-{}", std::process::id());
    let shm_file = format!("/dev/shm/gantry-held-{}", std::process::id());
    let hold = format!(
        "echo $HELD > secret.txt; echo $HELD > $HOME/secret.txt\n\
         echo $HELD > {tmp_file}; chmod 644 {tmp_file}\n\
         echo $HELD > {var_tmp_file}.v; chmod 644 {var_tmp_file}.v\n\
         echo $HELD > {shm_file}; chmod 644 {shm_file}; touch {x}/ready\n\
         for i in $(seq 1 600); do [ -e {x}/done ] && break; sleep 0.05; done\n\
         [ -e {x}/done ]\n"
    );
    let peek = format!(
        "for i in $(seq 1 600); do [ -e {x}/ready ] && break; sleep 0.05; done\n\
         [ -e {x}/ready ]\n\
         other=$GANTRY_WORKSPACE/../$GANTRY_RUN_ID.0-1\n\
         cat $other/secret.txt || echo refused-workspace\n\
         cat $other.home/secret.txt || echo refused-home\n\
         cat {tmp_file} || echo refused-tmp\n\
         cat {var_tmp_file}.v || echo refused-var-tmp\n\
         cat {shm_file} || echo refused-shm\n\
         cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep '^HELD=' || echo refused-environ\n\
         touch {x}/done\n"
    );
    let env = format!("env: {{ HELD: {value} }}");
    let run = c.run_pipeline(
        &pipeline(&[("hold", &env, &hold), ("peek", "", &peek)]),
        &[],
    );
    let view = c.wait_run(run, Duration::from_secs(60));
    let log = c.logs(&format!("{run}.1"));
    assert_eq!(job_named(&view, "hold")["state"], "succeeded", "{view}");
    assert_eq!(job_named(&view, "peek")["state"], "succeeded", "{log}");
    assert!(!log.contains(value), "peek read hold's secret:\n{log}");
    for refused in [
        "refused-workspace",
        "refused-home",
        "refused-tmp",
        "refused-var-tmp",
        "refused-shm",
        "refused-environ",
    ] {
        assert!(log.contains(refused), "no {refused} in:\n{log}");
    }
    for file in [tmp_file, format!("{var_tmp_file}.v"), shm_file] {
        assert!(
            !Path::new(&file).exists(),
            "{file} reached the host's {}",
            Path::new(&file).parent().expect("dir").display()
        );
    }
}

/// The processes of this host whose command line starts with `needle`.
fn running_with(needle: &str) -> Vec<String> {
    gantry_tests::processes_where(|cmd| cmd.starts_with(needle))
}

/// A daemon started with `setsid` and a double-forked process leave with their job:
/// when it succeeds, when it times out and when it is cancelled.
#[test]
fn nothing_a_job_started_outlives_it() {
    if !is_root("nothing_a_job_started_outlives_it") {
        return;
    }
    let c = Coordinator::start();
    let _agents = isolated_agents(&c, 1, &["--slots", "3"]);
    // Unique durations, so the processes are this test's own.
    let tag = 3_000 + u64::from(std::process::id() % 900);
    let escape = |n: u64| {
        format!(
            "setsid sleep {tag}.{n}1 & (sh -c \"sleep {tag}.{n}2 &\" &); sh -c \"setsid sh -c \\\"sleep {tag}.{n}3 &\\\" &\"; sleep 0.2; echo escaped"
        )
    };
    let yaml = pipeline(&[
        ("done", "", &escape(1)),
        ("late", "timeout: 2s", &format!("{}\nsleep 300", escape(2))),
        ("stopped", "", &format!("{}\nsleep 300", escape(3))),
    ]);
    let run = c.run_pipeline(&yaml, &[]);
    let stopped = format!("{run}.2");
    wait_for("the stopped job's escapes", DEADLINE, || {
        c.logs(&stopped).contains("escaped").then_some(())
    });
    c.wait_job_state(&format!("{run}.1"), "timed-out", DEADLINE);
    c.gantry(&["pipelines", "cancel", &run.to_string()])
        .expect_code(0);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(job_named(&view, "done")["state"], "succeeded", "{view}");
    assert_eq!(job_named(&view, "late")["state"], "timed-out", "{view}");
    assert_eq!(job_named(&view, "stopped")["state"], "cancelled", "{view}");
    // The kernel ends a namespace's processes as its init exits; give it a moment.
    let needle = format!("sleep {tag}.");
    wait_until_gone(&needle, "jobs");
}

/// An agent running as `nobody` cannot switch users: with `--isolation required` it
/// stays connected, says so when it starts, and fails every job with the reason.
#[test]
fn an_unprivileged_agent_refuses_isolated_work_and_says_why() {
    if !is_root("an_unprivileged_agent_refuses_isolated_work") {
        return;
    }
    let c = Coordinator::start();
    let token = c.token(&[]);
    let mut agent = Agent::enroll(&token, &[]);
    agent.start_as(NOBODY, &["--isolation", "required"]);
    c.wait_connected(1);
    let run = c.run_pipeline(
        "jobs:\n  untrusted:\n    steps: [{ run: 'echo ran as $(id -u)' }]\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    let log = c.logs(&format!("{run}.0"));
    assert_ne!(job_named(&view, "untrusted")["state"], "succeeded", "{log}");
    assert!(!log.contains("ran as"), "the job ran:\n{log}");
    assert!(
        log.contains(&format!(
            "this agent refuses jobs: the agent runs as uid {NOBODY} without CAP_CHOWN"
        )) && log.contains("run the agent as root"),
        "the log says why and what to do:\n{log}"
    );
    assert!(
        agent
            .log()
            .contains("jobs cannot be isolated, so this agent refuses every job"),
        "the agent says so at start:\n{}",
        agent.log()
    );
}

/// The agent's own cgroup directory of a cgroup v1 controller (the agent is this test's
/// child, so it is in the test's cgroups), when the host has that controller.
fn own_v1_cgroup(controller: &str) -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        names.split(',').any(|n| n == controller).then_some(path)
    })?;
    let dir = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'));
    dir.join("cgroup.procs").is_file().then_some(dir)
}

/// With `--job-pids 64 --job-memory 64MiB`, a fork bomb hits its process limit and a
/// job growing a string to 1 GiB is stopped by the memory limit; the agent stays
/// connected, runs the next job, and leaves no job cgroup behind.
#[test]
fn a_fork_bomb_and_a_memory_hog_are_stopped_at_their_limits_and_the_agent_runs_the_next_job() {
    let test = "a_fork_bomb_and_a_memory_hog_are_stopped_at_their_limits";
    if !is_root(test)
        || !require(
            own_v1_cgroup("pids").is_some() && own_v1_cgroup("memory").is_some(),
            test,
            "the cgroup v1 pids and memory controllers",
            "a host booted with cgroup v1 mounted at /sys/fs/cgroup/{pids,memory}",
        )
    {
        return;
    }
    let c = Coordinator::start();
    let mut agents = isolated_agents(&c, 1, &["--job-pids", "64", "--job-memory", "64MiB"]);
    let bomb = c.run_pipeline(
        &pipeline(&[(
            "bomb",
            "timeout: 30s",
            "bomb() { bomb | bomb & }\nbomb\nsleep 2\necho survived",
        )]),
        &[],
    );
    let view = c.wait_run(bomb, Duration::from_secs(60));
    let log = c.logs(&format!("{bomb}.0"));
    assert!(
        log.to_lowercase().contains("fork"),
        "the bomb ran into its process limit:\n{}",
        &log[..log.len().min(4000)]
    );
    assert_ne!(job_named(&view, "bomb")["state"], "timed-out", "{view}");

    let hog = c.run_pipeline(
        &pipeline(&[(
            "hog",
            "",
            "awk 'BEGIN { s = \"x\"; for (i = 0; i < 30; i++) s = s s; print length(s) }'",
        )]),
        &[],
    );
    let view = c.wait_run(hog, Duration::from_secs(60));
    let log = c.logs(&format!("{hog}.0"));
    assert_eq!(job_named(&view, "hog")["state"], "failed", "{log}");
    assert!(!log.contains("1073741824"), "the hog got its GiB:\n{log}");

    let next = c.run_pipeline(&pipeline(&[("next", "", "echo still here")]), &[]);
    let view = c.wait_run(next, DEADLINE);
    assert_eq!(job_named(&view, "next")["state"], "succeeded", "{view}");
    assert!(c.logs(&format!("{next}.0")).contains("still here"));
    assert!(agents[0].proc().is_running(), "the agent survived");
    assert_eq!(c.wait_connected(1).len(), 1);

    let prefix = format!("gantry-{}-", agents[0].proc().pid());
    for controller in ["pids", "memory"] {
        let dir = own_v1_cgroup(controller).expect("cgroup");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("read cgroup")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(
            left.is_empty(),
            "job cgroups left in {}: {left:?}",
            dir.display()
        );
    }
}

/// A process left running as a uid of the range (a job of an agent that crashed, or of
/// another agent given the same range) keeps that uid from the next job, which would
/// otherwise share it and could read its workspace.
#[test]
fn a_uid_some_process_still_runs_as_is_not_handed_to_a_job() {
    use std::os::unix::process::CommandExt;
    if !is_root("a_uid_some_process_still_runs_as_is_not_handed_to_a_job") {
        return;
    }
    let mut squatter = gantry_tests::Proc {
        child: std::process::Command::new("sleep")
            .arg("300")
            .uid(91_000)
            .gid(91_000)
            .spawn()
            .expect("spawn sleep as uid 91000"),
        name: "a process left as uid 91000".into(),
    };
    let c = Coordinator::start();
    let _agents = isolated_agents(&c, 1, &["--job-uids", "91000-91009"]);
    let run = c.run_pipeline(&pipeline(&[("next", "", "echo uid=$(id -u)")]), &[]);
    let view = c.wait_run(run, DEADLINE);
    let log = c.logs(&format!("{run}.0"));
    assert_eq!(job_named(&view, "next")["state"], "succeeded", "{log}");
    assert!(
        log.contains("uid=91001\n"),
        "the job got a free uid:\n{log}"
    );
    squatter.kill9();
}

/// An agent killed outright (kill -9) takes its isolated jobs' processes with it,
/// daemons included: they would otherwise run on, unwatched, while the coordinator runs
/// the job again elsewhere.
#[test]
fn an_agent_killed_outright_takes_its_jobs_processes_along() {
    if !is_root("an_agent_killed_outright_takes_its_jobs_processes_along") {
        return;
    }
    let c = Coordinator::start();
    let mut agents = isolated_agents(&c, 1, &[]);
    let tag = 6_000 + u64::from(std::process::id() % 900);
    let script = format!("setsid sleep {tag}.1 &\nsleep {tag}.2 &\necho started\nwait");
    let run = c.run_pipeline(&pipeline(&[("orphaned", "", &script)]), &[]);
    let job = format!("{run}.0");
    wait_for("the job to start its processes", DEADLINE, || {
        c.logs(&job).contains("started").then_some(())
    });
    let needle = format!("sleep {tag}.");
    assert_eq!(running_with(&needle).len(), 2, "both sleeps run");
    agents[0].proc().kill9();
    wait_until_gone(&needle, "agent");
}

/// Waits up to [`DEADLINE`] until no process runs with `needle` in its command line,
/// failing with those left, which outlived their `owner`.
fn wait_until_gone(needle: &str, owner: &str) {
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        let left = running_with(needle);
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "processes outlived their {owner}: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The capabilities the packaged unit gives the agent (`AmbientCapabilities=`, the same
/// in `CapabilityBoundingSet=`).
fn packaged_unit_capabilities() -> Vec<String> {
    let unit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/gantry-agent.service");
    let text = std::fs::read_to_string(&unit).expect("the packaged agent unit");
    let line = |key: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {}", unit.display()))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let ambient = line("AmbientCapabilities=");
    assert_eq!(
        ambient,
        line("CapabilityBoundingSet="),
        "the unit bounds the agent to what it needs"
    );
    ambient
}

/// The agent started as the packaged unit starts it, as an unprivileged user with only
/// the unit's capabilities and no new privileges (no `--isolation`: the default
/// decides), isolates jobs within their limits: the job runs as a uid of its own
/// without any capability, cannot read the agent's key, and stops at the pids limit.
#[test]
fn the_packaged_units_capabilities_are_enough_to_isolate_jobs() {
    const TEST: &str = "the_packaged_units_capabilities_are_enough_to_isolate_jobs";
    if !is_root(TEST)
        || !gantry_tests::requires::require_program(TEST, "setpriv", "apt-get install util-linux")
    {
        return;
    }
    let caps = packaged_unit_capabilities();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let c = Coordinator::start();
    let mut agent = Agent::enroll(&c.token(&[]), &[]);
    agent.start_as_with_capabilities(NOBODY, &caps, &["--job-pids", "64"]);
    c.wait_connected(1);
    let script = "echo uid=$(id -u)\n\
         grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status\n\
         cat ../../tls/agent.pem || echo refused-key\n\
         (for i in $(seq 1 100); do sleep 5 & done) 2>/dev/null || echo fork-refused\n\
         pkill -u $(id -u) sleep || true\n";
    let run = c.run_pipeline(&pipeline(&[("untrusted", "", script)]), &[]);
    let view = c.wait_run(run, DEADLINE);
    let log = c.logs(&format!("{run}.0"));
    assert_eq!(
        job_named(&view, "untrusted")["state"],
        "succeeded",
        "{log}\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("jobs run isolated"),
        "the unit's capabilities make isolation the default:\n{}",
        agent.log()
    );
    let uid: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .and_then(|u| u.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uid in:\n{log}"));
    assert!(
        (90_000..=90_999).contains(&uid),
        "the job ran as {uid}:\n{log}"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        let value = log
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{set}:")))
            .map(str::trim);
        assert_eq!(
            value,
            Some("0000000000000000"),
            "the job holds capabilities ({set}):\n{log}"
        );
    }
    assert!(log.contains("refused-key"), "{log}");
    if agent.log().contains("without resource limits") {
        eprintln!("{TEST}: this host gives no cgroup for the pids limit; not checked");
    } else {
        assert!(
            log.contains("fork-refused"),
            "100 processes went past --job-pids 64:\n{log}"
        );
    }
}
