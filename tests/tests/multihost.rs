//! Deployments across separate hosts: the coordinator and six agents (one build host,
//! five web hosts) each in its own container on a private Docker network, with the real
//! binaries in the shipped image (plus busybox for hooks and health checks; see
//! `gantry_tests::containers`). A host cut off by a network partition costs only its
//! own part of a rolling deployment, and a deployment goes on where it was after the
//! coordinator's container restarts or is killed.
//!
//! The deployed service is busybox `httpd` serving the release on port 8080 of each
//! host, checked over HTTP by the agent; the release also carries a 4 MB blob, so the
//! hosts stage it from each other (peers are reached at the address the coordinator
//! sees each session at). Every container, network, volume and image is removed when a
//! test ends, also on panic. Without Docker or busybox-static the tests skip, saying
//! what to install (they fail instead under `GANTRY_REQUIRE_ALL_TESTS=1`, as in CI;
//! see `gantry_tests::requires`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use gantry_tests::containers::{self, docker, docker_ok, sh, sh_ok, Scope};
use gantry_tests::{wait_for, Run};
use serde_json::Value;

/// The web hosts: container hostnames `web1` to `web5`.
const WEB_HOSTS: usize = 5;
/// Where `gantry admin add` puts the second admin's context, inside the coordinator.
const ALICE: &str = "/var/lib/gantry/alice/context.toml";
/// The agents' data directory in the image; apps deploy under `deploy/`.
const AGENT_DATA: &str = "/var/lib/gantry-agent";
/// Generous: this machine may be busy with other builds and tests.
const LONG: Duration = Duration::from_secs(90);

/// A pipeline that builds release `version` (a 4 MB random blob and a `version` file)
/// on the build host and deploys it to `prod` one host at a time, `budget` failures
/// allowed. Each host's start hook serves the release with busybox httpd on port 8080
/// and records `start <release>` in the app's `shared/events`, then takes `start_secs`
/// more (a slow service start); the stop hook stops that server and records
/// `stop <release>`. The health check asks the server for the version.
fn pipeline(version: &str, budget: u32, start_secs: u32, stage_timeout: &str) -> String {
    format!(
        r#"
name: site
jobs:
  build:
    runs-on: {{ role: build }}
    steps:
      - run: |
          mkdir -p out
          head -c 4000000 /dev/urandom > out/blob
          sha256sum out/blob | cut -d' ' -f1 > out/blob.sha256
          echo {version} > out/version
    artifacts: {{ name: site, paths: [out/] }}
  ship:
    needs: build
    deploy:
      environment: prod
      artifact: site
      app: site
      strategy: rolling
      rolling: {{ batch: 1, failure-budget: {budget} }}
      hooks:
        start: |
          cd "$GANTRY_RELEASE_DIR/out"
          httpd -f -p 8080 -h . >>"$GANTRY_SHARED_DIR/httpd.log" 2>&1 &
          echo $! > "$GANTRY_SHARED_DIR/httpd.pid"
          echo "start $GANTRY_RELEASE" >> "$GANTRY_SHARED_DIR/events"
          sleep {start_secs}
        stop: |
          pid=$(cat "$GANTRY_SHARED_DIR/httpd.pid" 2>/dev/null) || pid=
          if [ -n "$pid" ]; then
            kill "$pid" 2>/dev/null
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
          fi
          echo "stop $GANTRY_RELEASE" >> "$GANTRY_SHARED_DIR/events"
        timeout: 20s
      health:
        http: "http://127.0.0.1:8080/version"
        body: {version}
        interval: 100ms
        deadline: 15s
      timeouts: {{ stage: {stage_timeout}, activate: 40s }}
"#
    )
}

/// A coordinator and its hosts, each a container on one internal network.
struct Fleet {
    net: String,
    coord: String,
    /// Web host containers, in hostname order (`web1`, `web2`, ...).
    web: Vec<String>,
    /// Dropped last: removes every container, the network, the volume and the images.
    scope: Scope,
}

impl Fleet {
    /// Builds the image, initializes the coordinator's data on a volume (heartbeats
    /// every `heartbeat`), starts it, and starts one build host and [`WEB_HOSTS`] web
    /// hosts that enroll and connect by themselves.
    fn start(what: &str, heartbeat: &str) -> Self {
        let mut scope = Scope::new(what);
        let image = scope.test_image();
        let net = scope.internal_network("net");
        let volume = scope.volume("coord-data");
        let data = format!("{volume}:/var/lib/gantry");
        docker_ok(&[
            "run",
            "--rm",
            "-v",
            &data,
            &image,
            "init",
            "--listen",
            "0.0.0.0:7443",
            "--advertise",
            "coord:7443",
            "--heartbeat-interval",
            heartbeat,
        ]);
        let coord = scope.container(
            "coord",
            &[
                "--network",
                &net,
                "--network-alias",
                "coord",
                "--hostname",
                "coord",
                "-e",
                "GANTRY_LOG=info",
                "-v",
                &data,
                &image,
            ],
        );
        let mut fleet = Self {
            net,
            coord,
            web: Vec::new(),
            scope,
        };
        fleet.wait_coordinator();
        let token = fleet
            .gantry(&["token", "create", "--uses", &(WEB_HOSTS + 1).to_string()])
            .expect_code(0)
            .stdout
            .trim()
            .to_owned();
        fleet.agent(&image, "build", "role=build", &token);
        for i in 1..=WEB_HOSTS {
            let name = fleet.agent(&image, &format!("web{i}"), "role=web", &token);
            fleet.web.push(name);
        }
        fleet.wait_connected(WEB_HOSTS + 1);
        fleet
    }

    /// A host named `hostname` (also its name on the network) that enrolls with
    /// `token` and runs the agent with `label`, under tini (`--init`) so the servers
    /// hooks leave behind are reaped.
    fn agent(&mut self, image: &str, hostname: &str, label: &str, token: &str) -> String {
        let script = format!(
            "gantry-agent enroll --token \"$1\" --data-dir {AGENT_DATA} && \
             exec gantry-agent run --max-backoff 1s --label {label} --data-dir {AGENT_DATA}"
        );
        let net = self.net.clone();
        self.scope.container(
            hostname,
            &[
                "--init",
                "--network",
                &net,
                "--network-alias",
                hostname,
                "--hostname",
                hostname,
                "-e",
                "GANTRY_LOG=info",
                "--entrypoint",
                "/bin/sh",
                image,
                "-c",
                &script,
                "sh",
                token,
            ],
        )
    }

    /// The admin CLI, run inside the coordinator's container with its admin context.
    fn gantry(&self, args: &[&str]) -> Run {
        let mut full = vec![
            "exec",
            "-e",
            "GANTRY_LOG=warn",
            self.coord.as_str(),
            "gantry",
        ];
        full.extend_from_slice(args);
        docker(&full)
    }

    fn gantry_json(&self, args: &[&str]) -> Value {
        self.gantry(args).expect_code(0).json()
    }

    fn wait_coordinator(&self) {
        wait_for("the coordinator to answer `gantry status`", LONG, || {
            (self.gantry(&["status"]).code == 0).then_some(())
        });
    }

    fn agents(&self) -> Vec<Value> {
        let r = self.gantry(&["agents", "list", "--json"]);
        if r.code != 0 {
            return Vec::new();
        }
        r.json().as_array().cloned().unwrap_or_default()
    }

    fn is_connected(&self, hostname: &str) -> bool {
        self.agents()
            .iter()
            .any(|a| a["hostname"] == hostname && a["state"] == "Connected")
    }

    fn wait_connected(&self, n: usize) {
        wait_for(&format!("{n} agents connected"), LONG, || {
            let agents = self.agents();
            (agents.iter().filter(|a| a["state"] == "Connected").count() == n).then_some(())
        });
    }

    /// Copies the pipeline into the coordinator's container and starts a run of it.
    fn run_pipeline(&self, yaml: &str) -> u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("site.yml");
        std::fs::write(&file, yaml).expect("write pipeline");
        docker_ok(&[
            "cp",
            file.to_str().expect("utf8"),
            &format!("{}:/tmp/site.yml", self.coord),
        ]);
        let run = self.gantry_json(&["run", "/tmp/site.yml", "--no-source", "--json"]);
        run["run"].as_u64().expect("run number")
    }

    fn wait_run(&self, run: u64) -> Value {
        wait_for(&format!("run {run} to end"), LONG, || {
            let view = self.gantry_json(&["pipelines", "show", &run.to_string(), "--json"]);
            (!view["finished_at"].is_null()).then_some(view)
        })
    }

    /// The id of the newest deployment to prod, once there is one newer than `after`.
    fn deployment_after(&self, after: u64) -> u64 {
        wait_for("a new deployment to prod", LONG, || {
            self.gantry_json(&["deployments", "list", "--env", "prod", "--json"])
                .as_array()
                .and_then(|list| list.first())
                .and_then(|d| d["id"].as_u64())
                .filter(|id| *id > after)
        })
    }

    fn deployment(&self, id: u64) -> Value {
        self.gantry_json(&["deployments", "show", &id.to_string(), "--json"])
    }

    fn wait_deployment(&self, id: u64, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
        wait_for(&format!("deployment {id}: {what}"), LONG, || {
            let r = self.gantry(&["deployments", "show", &id.to_string(), "--json"]);
            // The coordinator may be restarting: ask again.
            (r.code == 0).then(|| r.json()).filter(|d| cond(d))
        })
    }

    fn wait_ended(&self, id: u64) -> Value {
        self.wait_deployment(id, "ended", |d| !d["finished_at"].is_null())
    }

    /// `gantry deploy approve ID` as alice (the runs' author is the admin).
    fn approve(&self, id: u64) {
        let r = docker(&[
            "exec",
            "-e",
            "GANTRY_LOG=warn",
            "-e",
            &format!("GANTRY_CONFIG={ALICE}"),
            &self.coord,
            "gantry",
            "deploy",
            "approve",
            &id.to_string(),
        ]);
        assert_eq!(r.code, 0, "approve {id}: {}{}", r.stdout, r.stderr);
    }

    /// What web host `i` serves on port 8080, fetched from the coordinator's container
    /// over the private network. By address, bounded by busybox `timeout`: this busybox
    /// (1.35, Debian 12) crashes in `wget -T` and in its name lookups next to the
    /// image's shared glibc.
    fn served_by(&self, i: usize) -> String {
        let address = docker_ok(&[
            "inspect",
            "--format",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.net
            ),
            &self.web[i],
        ]);
        sh_ok(
            &self.coord,
            &format!("timeout 10 wget -q -O - http://{address}:8080/version"),
        )
    }
}

/// The `version` of the release `current` points at on `host`.
fn current_version(host: &str) -> String {
    sh(
        host,
        &format!("cat {AGENT_DATA}/deploy/site/current/out/version"),
    )
    .stdout
    .trim()
    .to_owned()
}

/// The lines of `host`'s `shared/events` (what its hooks did, in order).
fn events(host: &str) -> Vec<String> {
    sh(host, &format!("cat {AGENT_DATA}/deploy/site/shared/events"))
        .stdout
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The blob `current` holds on `host` is whole (its SHA-256 is the build's).
fn blob_ok(host: &str) -> bool {
    let out = format!("{AGENT_DATA}/deploy/site/current/out");
    sh(
        host,
        &format!("sha256sum {out}/blob | cut -d' ' -f1 | cmp -s - {out}/blob.sha256"),
    )
    .code
        == 0
}

fn hostname(i: usize) -> String {
    format!("web{}", i + 1)
}

/// The deployment's record of the host called `hostname`.
fn host<'a>(d: &'a Value, hostname: &str) -> &'a Value {
    d["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["hostname"] == hostname))
        .unwrap_or_else(|| panic!("{hostname} is not a target: {d}"))
}

fn states(d: &Value) -> Vec<String> {
    d["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| h["state"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The "staged release" line each host logged, by hostname.
fn staging_lines(d: &Value) -> Vec<(String, String)> {
    let by_agent = |agent: &Value| {
        d["hosts"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["agent"] == *agent))
            .and_then(|h| h["hostname"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    d["log"]
        .as_array()
        .expect("log")
        .iter()
        .filter(|l| {
            l["text"]
                .as_str()
                .is_some_and(|t| t.contains("staged release"))
        })
        .map(|l| {
            (
                by_agent(&l["agent"]),
                l["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn unix_millis() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("millis fit in u64")
}

fn millis(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a time: {v}"))
}

#[test]
fn a_partitioned_host_holds_up_neither_the_others_staging_nor_the_rolling_deployment() {
    if !containers::ready(
        "a_partitioned_host_holds_up_neither_the_others_staging_nor_the_rolling_deployment",
    ) {
        return;
    }
    // Heartbeats at the default 5 s: the coordinator notices a silent host after 15 s,
    // so a host cut off just before a deployment starts is still one of its targets.
    let fleet = Fleet::start("partition", "5s");
    fleet
        .gantry(&["admin", "add", "alice", "--output", "/var/lib/gantry/alice"])
        .expect_code(0);
    fleet
        .gantry(&[
            "env",
            "create",
            "prod",
            "--select",
            "role=web",
            "--approvals",
            "1",
        ])
        .expect_code(0);
    let yaml = |version: &str| pipeline(version, 1, 0, "20s");

    // v1 everywhere, the hosts fetching the release from each other across the network.
    let run = fleet.run_pipeline(&yaml("v1"));
    let first = fleet.deployment_after(0);
    fleet.wait_deployment(first, "waiting for approval", |d| {
        d["state"] == "waiting-for-approval"
    });
    fleet.approve(first);
    assert_eq!(fleet.wait_run(run)["state"], "succeeded");
    let d = fleet.deployment(first);
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(states(&d), vec!["active"; WEB_HOSTS], "{d}");
    let lines = staging_lines(&d);
    assert_eq!(lines.len(), WEB_HOSTS, "{lines:?}");
    for (hostname, line) in &lines {
        assert!(
            line.contains(&format!("from {0} of {0} peers", WEB_HOSTS - 1)),
            "{hostname} reached every other host: {line}"
        );
    }
    for (i, web) in fleet.web.iter().enumerate() {
        assert_eq!(fleet.served_by(i), "v1");
        assert!(blob_ok(web), "the release is whole on {}", hostname(i));
    }

    // v2: web3 is cut off while the deployment waits for its approval, so it is still
    // a target when it starts. It never gets its stage step; the others cannot reach it
    // as a peer and fetch its range from the coordinator; it fails by its staging
    // deadline (20 s), within the failure budget (1); the rest switch.
    let run = fleet.run_pipeline(&yaml("v2"));
    let second = fleet.deployment_after(first);
    fleet.wait_deployment(second, "waiting for approval", |d| {
        d["state"] == "waiting-for-approval"
    });
    let cut = &fleet.web[2];
    docker_ok(&["network", "disconnect", &fleet.net, cut]);
    let cut_at = Instant::now();
    fleet.approve(second);
    let d = fleet.wait_ended(second);
    eprintln!(
        "the deployment ended {:.1?} after the partition",
        cut_at.elapsed()
    );
    assert_eq!(
        d["state"], "succeeded",
        "one host lost is within the budget: {d}"
    );
    assert!(
        d["reason"].as_str().unwrap_or_default().ends_with(
            "1 host(s) failed within the failure budget (could not stage, never switched, \
                 still on the previous release: web3)"
        ),
        "the reason says where web3 was left: {d}"
    );
    let lost = host(&d, "web3");
    assert_eq!(lost["state"], "stage-failed", "{d}");
    assert!(
        lost["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("staging did not finish within 20 s"),
        "{lost}"
    );
    let lost_at = millis(&lost["ended_at"]);
    let lines = staging_lines(&d);
    assert_eq!(
        lines
            .iter()
            .map(|(h, _)| h.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["web1", "web2", "web4", "web5"]),
        "{lines:?}"
    );
    for (hostname, line) in &lines {
        assert!(
            line.contains(&format!(
                "from {} of {} peers",
                WEB_HOSTS - 2,
                WEB_HOSTS - 1
            )),
            "{hostname} fetched from every host but the cut-off one: {line}"
        );
        let staged = millis(&host(&d, hostname)["staged_at"]);
        assert!(
            staged < lost_at,
            "{hostname} staged without waiting for web3's deadline: {d}"
        );
    }
    for (i, web) in fleet.web.iter().enumerate() {
        if i == 2 {
            continue;
        }
        assert_eq!(host(&d, &hostname(i))["state"], "active", "{d}");
        assert_eq!(fleet.served_by(i), "v2");
        assert!(blob_ok(web), "the release is whole on {}", hostname(i));
    }
    assert_eq!(fleet.wait_run(run)["state"], "succeeded");
    // The cut-off host was never touched: it still runs and serves v1.
    assert_eq!(current_version(cut), "v1");
    assert_eq!(
        sh_ok(cut, "timeout 10 wget -q -O - http://127.0.0.1:8080/version"),
        "v1"
    );
    let r1 = fleet.deployment(first)["release"]["id"]
        .as_str()
        .expect("release id")
        .to_owned();
    assert_eq!(events(cut), vec![format!("start {r1}")]);

    // The partition heals: web3 reconnects by itself and takes the next release, from
    // its peers like everyone else.
    wait_for("the coordinator to see web3 gone", LONG, || {
        (!fleet.is_connected("web3")).then_some(())
    });
    docker_ok(&["network", "connect", "--alias", "web3", &fleet.net, cut]);
    wait_for("web3 to reconnect by itself", LONG, || {
        fleet.is_connected("web3").then_some(())
    });
    let run = fleet.run_pipeline(&yaml("v3"));
    let third = fleet.deployment_after(second);
    fleet.wait_deployment(third, "waiting for approval", |d| {
        d["state"] == "waiting-for-approval"
    });
    fleet.approve(third);
    assert_eq!(fleet.wait_run(run)["state"], "succeeded");
    let d = fleet.deployment(third);
    assert_eq!(states(&d), vec!["active"; WEB_HOSTS], "{d}");
    for (hostname, line) in staging_lines(&d) {
        assert!(
            line.contains(&format!("from {0} of {0} peers", WEB_HOSTS - 1)),
            "{hostname}: {line}"
        );
    }
    for i in 0..WEB_HOSTS {
        assert_eq!(fleet.served_by(i), "v3");
    }
}

/// How the coordinator's container goes down mid-deployment.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// `docker restart`: SIGTERM, a clean shutdown, a new start.
    Restart,
    /// `docker kill` (SIGKILL), then `docker start`.
    Crash,
}

#[test]
fn a_rolling_deployment_goes_on_correctly_after_the_coordinator_restarts_or_crashes() {
    if !containers::ready(
        "a_rolling_deployment_goes_on_correctly_after_the_coordinator_restarts_or_crashes",
    ) {
        return;
    }
    let fleet = Fleet::start("restart", "1s");
    fleet
        .gantry(&["env", "create", "prod", "--select", "role=web"])
        .expect_code(0);
    let mut last_release: Option<String> = None;
    let mut expected: Vec<String> = Vec::new();
    let mut previous = 0;
    for (version, outage) in [("v1", Outage::Restart), ("v2", Outage::Crash)] {
        // One host at a time, each start taking 2 s: the coordinator goes down while
        // some hosts are switched, one is switching and the rest wait.
        let run = fleet.run_pipeline(&pipeline(version, 0, 2, "60s"));
        let id = fleet.deployment_after(previous);
        previous = id;
        let before = fleet.wait_deployment(id, "switching, at least one host active", |d| {
            let active = states(d).iter().filter(|s| *s == "active").count();
            d["state"] == "switching" && (1..=2).contains(&active)
        });
        let switched_before: BTreeSet<String> = before["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .filter(|h| h["state"] == "active")
            .filter_map(|h| h["hostname"].as_str().map(str::to_owned))
            .collect();
        let down_at = Instant::now();
        let down_ms = unix_millis();
        match outage {
            Outage::Restart => {
                docker_ok(&["restart", "--time", "30", &fleet.coord]);
            }
            Outage::Crash => {
                docker_ok(&["kill", &fleet.coord]);
                docker_ok(&["start", &fleet.coord]);
            }
        }
        fleet.wait_coordinator();
        fleet.wait_connected(WEB_HOSTS + 1);
        eprintln!(
            "{outage:?} during {version}: coordinator back and every agent reconnected in {:.1?}",
            down_at.elapsed()
        );

        let d = fleet.wait_ended(id);
        assert_eq!(d["state"], "succeeded", "{outage:?}: {d}");
        assert!(d["reason"].is_null(), "no host failed: {d}");
        assert_eq!(states(&d), vec!["active"; WEB_HOSTS], "{d}");
        // The restarted coordinator switched the rest: they became active after the
        // container went down (one more may have finished between the look and the
        // outage).
        let after: Vec<&str> = d["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .filter(|h| millis(&h["activated_at"]) > down_ms)
            .filter_map(|h| h["hostname"].as_str())
            .collect();
        assert!(
            after.len() + 1 >= WEB_HOSTS - switched_before.len(),
            "{outage:?}: switched before {switched_before:?}, after {after:?}: {d}"
        );
        let view = fleet.wait_run(run);
        assert_eq!(
            view["state"], "succeeded",
            "the deploy job's result arrives after the {outage:?}: {view}"
        );
        // Every host switched exactly once: no step done twice, none skipped.
        let release = d["release"]["id"].as_str().expect("release id").to_owned();
        if let Some(last) = &last_release {
            expected.push(format!("stop {last}"));
        }
        expected.push(format!("start {release}"));
        last_release = Some(release);
        for (i, web) in fleet.web.iter().enumerate() {
            assert_eq!(
                events(web),
                expected,
                "{outage:?}: the hooks {} ran",
                hostname(i)
            );
            assert_eq!(fleet.served_by(i), version);
            assert!(blob_ok(web), "the release is whole on {}", hostname(i));
        }
    }
}
