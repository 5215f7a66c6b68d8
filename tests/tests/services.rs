//! End-to-end tests of `services:` (service containers beside a job) with the real
//! `gantry` and `gantry-agent` binaries and the host's Docker engine.
//!
//! No registry: each test imports a tiny image from the host's static busybox, whose
//! `httpd` serves a page as the service and whose `wget` fetches it, and removes it when
//! done. Without busybox-static or a running engine the tests skip, saying what to
//! install (they fail instead under `GANTRY_REQUIRE_ALL_TESTS=1`, as in CI).

use std::time::Duration;

use gantry_tests::containers::{busybox_image, docker_ok, BusyboxImage, BUSYBOX};
use gantry_tests::{job_named, requires, wait_for, Agent, Coordinator, DEADLINE};

/// What the service's page says.
const PAGE: &str = "hello-from-the-service";
/// Long enough for an engine on a loaded machine to start a few containers and run
/// their health checks.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// The services' image: busybox with `httpd` and `wget`, and [`PAGE`] in `/www`.
fn service_image() -> BusyboxImage {
    busybox_image(
        "gantry-test-services",
        &["sh", "echo", "cat", "sleep", "httpd", "wget"],
        &[("www/index.html", &format!("{PAGE}\n"))],
    )
}

/// Containers (running or not) and networks labelled with agent `id`.
fn left_by(id: &str) -> (Vec<String>, Vec<String>) {
    let filter = format!("label=gantry.agent={id}");
    let containers = docker_ok(&["ps", "--all", "--quiet", "--filter", &filter]);
    let networks = docker_ok(&["network", "ls", "--quiet", "--filter", &filter]);
    let words = |s: String| s.split_whitespace().map(str::to_owned).collect();
    (words(containers), words(networks))
}

fn assert_nothing_left(agent: &Agent) {
    let (containers, networks) = left_by(&agent.id);
    assert!(
        containers.is_empty() && networks.is_empty(),
        "containers {containers:?} and networks {networks:?} of agent {} are left",
        agent.id
    );
}

/// The service `web`: busybox's httpd serving [`PAGE`] on port 8080, healthy once a
/// `wget` of it inside the container succeeds.
fn web_service(tag: &str) -> String {
    format!(
        "      web:\n        image: {tag}\n        command: [httpd, -f, -v, -p, '8080', -h, /www]\n        ports: ['8080']\n        health:\n          cmd: wget -q -O /dev/null http://127.0.0.1:8080/\n          interval: 200ms\n          retries: 50\n"
    )
}

#[test]
fn a_shell_job_and_a_container_job_reach_their_service_and_nothing_is_left() {
    let test = "a_shell_job_and_a_container_job_reach_their_service_and_nothing_is_left";
    if !requires::require_docker(test, Some(BUSYBOX)) {
        return;
    }
    let image = service_image();
    let c = Coordinator::start();
    let agents = c.agents_running(1, &[]);
    let web = web_service(&image.tag);
    let yaml = format!(
        "jobs:\n  on-host:\n    services:\n{web}    steps:\n      - run: |\n          echo \"host=$GANTRY_SERVICE_WEB_HOST port=$GANTRY_SERVICE_WEB_PORT_8080\"\n          {BUSYBOX} wget -q -O - \"http://$GANTRY_SERVICE_WEB_HOST:$GANTRY_SERVICE_WEB_PORT_8080/\"\n  in-container:\n    image: {tag}\n    services:\n{web}    steps:\n      - run: |\n          echo \"host=$GANTRY_SERVICE_WEB_HOST port=$GANTRY_SERVICE_WEB_PORT_8080\"\n          wget -q -O - http://web:8080/\n",
        tag = image.tag
    );
    let run = c.run_pipeline(&yaml, &[]);
    let view = c.wait_run(run, RUN_DEADLINE);
    let host_log = c.logs(&format!("{run}.0"));
    let container_log = c.logs(&format!("{run}.1"));
    assert_eq!(
        job_named(&view, "on-host")["state"],
        "succeeded",
        "{view}\n{host_log}"
    );
    assert_eq!(
        job_named(&view, "in-container")["state"],
        "succeeded",
        "{view}\n{container_log}"
    );
    // A shell job reaches the service on a loopback port the engine picked.
    assert!(host_log.contains("host=127.0.0.1 port="), "{host_log}");
    assert!(
        !host_log.contains("port=8080\n"),
        "a picked port: {host_log}"
    );
    assert!(host_log.contains(&format!("{PAGE}\n")), "{host_log}");
    assert!(
        host_log.contains("service web") && host_log.contains("is ready after"),
        "the log says when the service was ready: {host_log}"
    );
    // A container job reaches it by name on the job's network.
    assert!(
        container_log.contains("host=web port=8080\n"),
        "{container_log}"
    );
    assert!(
        container_log.contains(&format!("{PAGE}\n")),
        "{container_log}"
    );
    // A passing job's log holds none of the service's own output.
    assert!(
        !host_log.contains("its last 200 lines"),
        "no service output after a success: {host_log}"
    );
    assert_nothing_left(&agents[0]);
}

#[test]
fn a_failing_health_check_fails_the_job_with_its_reason_and_a_failing_job_shows_service_logs() {
    // Also: a service's env gets its secret, masked in the copied output; a service
    // that died says so with its code; a job that times out beside a service leaves
    // nothing either.
    let test =
        "a_failing_health_check_fails_the_job_with_its_reason_and_a_failing_job_shows_service_logs";
    if !requires::require_docker(test, Some(BUSYBOX)) {
        return;
    }
    let image = service_image();
    let c = Coordinator::start();
    let agents = c.agents_running(1, &[]);
    c.set_secret("DB_PASSWORD", "s3cret-service-pw");
    let yaml = format!(
        "jobs:\n  sick:\n    services:\n      db:\n        image: {tag}\n        command: [sh, -c, 'echo db-is-warming-up; sleep 300']\n        health:\n          cmd: echo not-ready-yet; exit 1\n          interval: 200ms\n          retries: 3\n    steps:\n      - run: echo the-step-never-runs\n  failing:\n    services:\n      chatty:\n        image: {tag}\n        env:\n          PW: ${{{{ secrets.DB_PASSWORD }}}}\n        command: [sh, -c, 'echo chatty-says-hello pw=$PW; sleep 300']\n    steps:\n      - run: exit 3\n  slow:\n    timeout: 5s\n    services:\n      idle:\n        image: {tag}\n        command: [sleep, '300']\n    steps:\n      - run: sleep 300\n  dies:\n    services:\n      brief:\n        image: {tag}\n        command: [sh, -c, 'echo brief-going-away; sleep 1; exit 7']\n    steps:\n      - run: sleep 3; exit 1\n",
        tag = image.tag
    );
    let run = c.run_pipeline(&yaml, &[]);
    let view = c.wait_run(run, RUN_DEADLINE);

    let sick = job_named(&view, "sick");
    let sick_log = c.logs(&format!("{run}.0"));
    assert_ne!(sick["state"], "succeeded", "{view}\n{sick_log}");
    assert!(
        sick_log.contains(
            "service db is unhealthy: 3 health checks failed in a row; the last said: exit code 1, not-ready-yet"
        ),
        "the reason names the service and its last check: {sick_log}"
    );
    assert!(
        sick_log.contains("service db: its last 200 lines of output")
            && sick_log.contains("db-is-warming-up\n"),
        "the service's own output follows: {sick_log}"
    );
    assert!(
        !sick_log.contains("the-step-never-runs"),
        "no step ran: {sick_log}"
    );

    let failing = job_named(&view, "failing");
    let failing_log = c.logs(&format!("{run}.1"));
    assert_eq!(failing["state"], "failed", "{view}\n{failing_log}");
    assert!(
        failing_log.contains("service chatty: its last 200 lines of output")
            && failing_log.contains("chatty-says-hello pw=***\n"),
        "a failed job's log ends with its services' output, the secret masked: {failing_log}"
    );
    assert!(!failing_log.contains("s3cret-service-pw"), "{failing_log}");
    let dies_log = c.logs(&format!("{run}.3"));
    assert!(
        dies_log.contains("service brief (it exited with code 7): its last 200 lines of output")
            && dies_log.contains("brief-going-away\n"),
        "a service that died says so: {dies_log}"
    );
    let slow = job_named(&view, "slow");
    assert_eq!(
        slow["state"],
        "timed-out",
        "{view}\n{}",
        c.logs(&format!("{run}.2"))
    );
    assert_nothing_left(&agents[0]);
}

#[test]
fn a_cancelled_job_and_an_agent_killed_mid_job_leave_no_service_behind() {
    let test = "a_cancelled_job_and_an_agent_killed_mid_job_leave_no_service_behind";
    if !requires::require_docker(test, Some(BUSYBOX)) {
        return;
    }
    let image = service_image();
    let c = Coordinator::start();
    let mut agent = Agent::enroll(&c.token(&[]), &[]);
    agent.start();
    c.wait_connected(1);
    let web = web_service(&image.tag);
    let yaml = format!(
        "jobs:\n  waits:\n    services:\n{web}    steps:\n      - run: echo waiting; sleep 300\n"
    );
    let running = |agent: &Agent| {
        let (containers, networks) = left_by(&agent.id);
        (!containers.is_empty() && !networks.is_empty()).then_some(())
    };

    // A cancel while the step runs removes the service and the network.
    let run = c.run_pipeline(&yaml, &[]);
    wait_for("the job's service to run", RUN_DEADLINE, || running(&agent));
    c.wait_job_state(&format!("{run}.0"), "running", DEADLINE);
    c.gantry(&["pipelines", "cancel", &run.to_string()])
        .expect_code(0);
    let view = c.wait_run(run, RUN_DEADLINE);
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_nothing_left(&agent);

    // An agent killed mid-job leaves them; its next start sweeps them.
    let run = c.run_pipeline(&yaml, &[]);
    wait_for("the second job's service to run", RUN_DEADLINE, || {
        running(&agent)
    });
    agent.proc().kill9();
    let (old_containers, old_networks) = left_by(&agent.id);
    assert!(
        !old_containers.is_empty() && !old_networks.is_empty(),
        "the dead agent's service and network are left"
    );
    agent.start();
    // Only the old ones: the coordinator may give the job to the agent again, whose
    // new attempt starts a service of its own.
    wait_for(
        "the restarted agent to sweep its old service and network",
        DEADLINE,
        || {
            let (containers, networks) = left_by(&agent.id);
            let swept = !containers.iter().any(|c| old_containers.contains(c))
                && !networks.iter().any(|n| old_networks.contains(n));
            swept.then_some(())
        },
    );
    c.gantry(&["pipelines", "cancel", &run.to_string()])
        .expect_code(0);
    c.wait_run(run, RUN_DEADLINE);
    assert_nothing_left(&agent);
}
