//! Fleet upgrades with the real binaries: `gantry agents upgrade` rolls the coordinator's
//! agent binary out in waves, a running job is never killed by it, and an upgraded
//! binary that does not come up is rolled back from and set aside.

use std::path::{Path, PathBuf};

use gantry_tests::{bin, wait_for, Agent, Coordinator, DEADLINE};

/// Points the coordinator's `agent_binary` at `path` and restarts it.
fn serve_agent_binary(c: &mut Coordinator, path: &Path, agents: usize) {
    let config = c.data_dir().join("coordinator.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("agent_binary"))
        .collect();
    // Top-level keys must come before any [table].
    let body = format!(
        "agent_binary = {:?}\n{}\n",
        path.display().to_string(),
        kept.join("\n")
    );
    std::fs::write(&config, body).expect("write config");
    c.server().terminate();
    c.start_server();
    c.wait_connected(agents);
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A copy of the agent binary that differs by a few trailing bytes (still runs).
fn rebuilt_agent(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join("gantry-agent");
    let mut bytes = std::fs::read(bin("gantry-agent")).expect("agent binary");
    bytes.extend_from_slice(b"\ngantry test build 2\n");
    std::fs::write(&path, bytes).expect("write");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

fn exe_of(agent: &mut Agent) -> PathBuf {
    let pid = agent.proc().pid();
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link")
}

fn versions(c: &Coordinator) -> Vec<String> {
    c.agents()
        .iter()
        .map(|a| a["agent_version"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn an_upgrade_rolls_out_in_waves_and_never_kills_a_running_job() {
    let mut c = Coordinator::start();
    let mut agents = c.agents_running(3, &["--label", "role=ci"]);
    let new = rebuilt_agent(&c.dir.path().join("build-2"));
    let new_sha = sha256(&new);
    serve_agent_binary(&mut c, &new, 3);

    // A job that runs through the upgrade of its agent.
    let pipeline = "name: long\njobs:\n  work:\n    steps:\n      - run: |\n          echo started\n          sleep 6\n          echo finished\n";
    let run = c.run_pipeline(pipeline, &[]);
    c.wait_job_state(&format!("{run}.0"), "running", DEADLINE);

    let out = c
        .gantry(&[
            "agents",
            "upgrade",
            "--select",
            "role=ci",
            "--batch",
            "1",
            "--timeout",
            "60s",
            "--json",
        ])
        .expect_code(0);
    let view = out.json();
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["strategy"], "agent-upgrade");

    assert!(view["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .all(|h| h["state"] == "active"));

    let job = c.wait_run(run, DEADLINE);
    assert_eq!(job["state"], "succeeded", "the job was not killed: {job}");
    // Its agent restarted only after the job had ended and its result was stored.
    let work = &job["jobs"][0];
    let host = view["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["agent"] == work["agent"]))
        .expect("the job's agent was upgraded");
    assert!(
        host["activated_at"].as_u64() >= work["finished_at"].as_u64(),
        "restarted after the job ended: {host} {work}"
    );
    let log = c.logs(&format!("{run}.0"));
    assert!(log.contains("started") && log.contains("finished"), "{log}");

    for a in &mut agents {
        let exe = exe_of(a);
        assert_eq!(
            exe,
            a.dir.path().join("bin/gantry-agent"),
            "the agent process now runs the upgraded binary: {}",
            a.log()
        );
    }
    wait_for("every agent to report the new build", DEADLINE, || {
        versions(&c)
            .iter()
            .all(|v| v.contains(&new_sha[..12]))
            .then_some(())
    });
    // Agents keep taking work after the upgrade.
    let run = c.run_pipeline(
        "name: after\njobs:\n  a:\n    steps: [{ run: 'true' }]\n",
        &[],
    );
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
}

#[test]
fn a_binary_that_does_not_come_up_is_rolled_back_from_and_set_aside() {
    let mut c = Coordinator::start();
    let mut agents = c.agents_running(2, &["--label", "role=ci"]);
    let original: Vec<String> = versions(&c);
    // Answers --version like the real agent, fails at everything else.
    let version = std::process::Command::new(bin("gantry-agent"))
        .arg("--version")
        .output()
        .expect("version");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let dir = c.dir.path().join("broken");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let broken = dir.join("gantry-agent");
    std::fs::write(
        &broken,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{version}'; exit 0; fi\nexit 1\n"
        ),
    )
    .expect("write");
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    serve_agent_binary(&mut c, &broken, 2);

    let out = c.gantry(&[
        "agents",
        "upgrade",
        "--select",
        "role=ci",
        "--timeout",
        "4s",
        "--json",
    ]);
    assert_eq!(out.code, 1, "the upgrade did not succeed: {}", out.stdout);
    let view = out.json();
    assert_eq!(view["state"], "rolled-back", "{view}");
    let states: Vec<&str> = view["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["state"].as_str().unwrap_or_default())
        .collect();
    assert!(
        states.contains(&"untouched"),
        "the second agent was never restarted: {view}"
    );
    // The first agent restarted into the broken binary and died. Started again (as its
    // service manager would), it sets the binary aside and runs the installed one.
    let dead_index = (0..agents.len())
        .find(|&i| !agents[i].proc().is_running())
        .expect("one agent stopped");
    let dead = &mut agents[dead_index];
    assert!(dead.dir.path().join("bin/probation").exists());
    dead.start();
    c.wait_connected(2);
    assert!(
        dead.dir.path().join("bin/gantry-agent.failed").exists(),
        "{}",
        dead.log()
    );
    let mut now = versions(&c);
    now.sort();
    let mut before = original;
    before.sort();
    assert_eq!(now, before, "every agent runs its original build again");
}
