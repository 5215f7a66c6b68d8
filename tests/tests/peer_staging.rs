//! Hosts staging a release fetch it from each other, with the real binaries: the
//! coordinator sends about one copy whatever the number of hosts, a host that stops
//! answering costs only a fallback to the coordinator, and a host serves its release
//! only to the hosts the coordinator named, under that deployment's grant.

use std::path::Path;
use std::time::Duration;

use gantry_certs::PeerTls;
use gantry_protocol::{ChunkFrame, ChunkWants, Digest, Grant, StreamOpen};
use gantry_tests::http::{get, metric};
use gantry_tests::{free_udp_port, Agent, Coordinator, CoordinatorOptions, DEADLINE};
use serde_json::Value;

/// Size of the release the tests deploy: ~90 chunks, so four hosts own ~23 each.
const RELEASE_BYTES: u64 = 6_000_000;

/// Builds a release of `RELEASE_BYTES` random bytes and deploys it to `env` (hosts
/// labelled `role=web`, one at a time, `budget` of them may fail).
fn pipeline(env: &str, budget: u32) -> String {
    format!(
        r"
name: blob
jobs:
  build:
    runs-on: {{ role: build }}
    steps:
      - run: |
          mkdir -p out
          head -c {RELEASE_BYTES} /dev/urandom > out/blob
          sha256sum out/blob | cut -d' ' -f1 > out/blob.sha256
    artifacts: {{ name: blob, paths: [out/] }}
  ship:
    needs: build
    deploy:
      environment: {env}
      artifact: blob
      app: blob
      strategy: rolling
      rolling: {{ batch: 1, failure-budget: {budget} }}
      health:
        command: sha256sum out/blob | cut -d' ' -f1 | cmp -s - out/blob.sha256
        interval: 50ms
        retries: 1
        deadline: 5s
      timeouts: {{ stage: 8s, activate: 10s }}
"
    )
}

fn deployment(c: &Coordinator, env: &str) -> Value {
    let list = c
        .gantry(&["deployments", "list", "--env", env, "--json"])
        .expect_code(0)
        .json();
    let id = list[0]["id"].as_u64().expect("a deployment");
    c.gantry(&["deployments", "show", &id.to_string(), "--json"])
        .expect_code(0)
        .json()
}

/// The staging line of each host in the deployment's log.
fn staging_lines(d: &Value) -> Vec<String> {
    d["log"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|l| l["text"].as_str())
        .filter(|t| t.contains("staged release"))
        .map(str::to_owned)
        .collect()
}

fn sent_bytes(http: &str) -> u64 {
    metric(
        &get(http, "/metrics").body,
        "gantry_artifact_bytes_sent_total",
    )
}

fn web_hosts(c: &Coordinator, n: usize, extra: &[&str]) -> Vec<Agent> {
    let token = c.token(&["--uses", &n.to_string()]);
    let mut agents: Vec<Agent> = (0..n)
        .map(|_| Agent::enroll(&token, &["--label", "role=web"]))
        .collect();
    for a in &mut agents {
        a.start_with(extra);
    }
    agents
}

fn builder(c: &Coordinator) -> Agent {
    let mut agent = Agent::enroll(&c.token(&[]), &["--label", "role=build"]);
    agent.start();
    agent
}

fn deployed_blob_ok(agent: &Agent) -> bool {
    let current = agent.dir.path().join("deploy/blob/current/out");
    let (Ok(blob), Ok(sum)) = (
        std::fs::read(current.join("blob")),
        std::fs::read_to_string(current.join("blob.sha256")),
    ) else {
        return false;
    };
    blob.len() as u64 == RELEASE_BYTES
        && gantry_certs::hex(ring::digest::digest(&ring::digest::SHA256, &blob).as_ref())
            == sum.trim()
}

#[test]
fn hosts_fetch_the_release_from_each_other_and_the_coordinator_sends_it_about_once() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    let http = c.http_address.clone().expect("http");
    let _builder = builder(&c);
    let hosts = web_hosts(&c, 4, &[]);
    c.wait_connected(5);
    c.gantry(&["env", "create", "prod", "--select", "role=web"])
        .expect_code(0);

    let before = sent_bytes(&http);
    let run = c.run_pipeline(&pipeline("prod", 0), &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let sent = sent_bytes(&http) - before;
    let d = deployment(&c, "prod");
    assert_eq!(d["state"], "succeeded", "{d}");
    for h in &hosts {
        assert!(deployed_blob_ok(h), "the release is whole on {}", h.id);
    }
    // Without peers the coordinator sends four copies (24 MB); with them each host
    // fetches its quarter from the coordinator and the rest from the other three.
    assert!(
        sent < 2 * RELEASE_BYTES,
        "the coordinator sent {sent} bytes for a {RELEASE_BYTES}-byte release to 4 hosts: {d}"
    );
    let lines = staging_lines(&d);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for line in &lines {
        assert!(line.contains("from 3 of 3 peers"), "{line}");
        assert!(
            !line.contains("(0 of them"),
            "every host got chunks from peers: {line}"
        );
    }
}

#[test]
fn a_peer_that_does_not_answer_costs_only_a_fallback_to_the_coordinator() {
    let c = Coordinator::start();
    let _builder = builder(&c);
    let mut hosts = web_hosts(&c, 3, &[]);
    c.wait_connected(4);
    c.gantry(&["env", "create", "prod", "--select", "role=web"])
        .expect_code(0);
    // One host freezes (still connected as far as the coordinator knows): the others
    // cannot reach it as a peer and fetch its range from the coordinator instead; it
    // fails by its staging deadline, within the failure budget of 1.
    hosts[2].proc().freeze();
    let run = c.run_pipeline(&pipeline("prod", 1), &[]);
    let view = c.wait_run(run, Duration::from_secs(60));
    let d = deployment(&c, "prod");
    assert_eq!(view["state"], "succeeded", "{view} {d}");
    assert_eq!(d["state"], "succeeded", "{d}");
    assert!(
        deployed_blob_ok(&hosts[0]) && deployed_blob_ok(&hosts[1]),
        "{d}"
    );
    let lines = staging_lines(&d);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert!(line.contains("from 1 of 2 peers"), "{line}");
    }
    let frozen = d["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["agent"] == hosts[2].id.as_str())
        .expect("the frozen host is a target");
    assert_eq!(frozen["state"], "stage-failed", "{d}");
}

/// What an agent's data directory holds to dial as that agent.
fn agent_tls(dir: &Path, expected: &str) -> rustls::ClientConfig {
    let ca_pem = std::fs::read_to_string(dir.join("tls/ca.pem")).expect("ca");
    let ca_der = gantry_certs::pem_to_der(&ca_pem).expect("ca der");
    let identity = std::fs::read_to_string(dir.join("tls/agent.pem")).expect("identity");
    PeerTls::client(
        &ca_der,
        &identity,
        &identity,
        &expected.parse().expect("agent id"),
    )
    .expect("peer tls")
}

/// Asks the peer at `address` for one chunk of `manifest` under `grant`, as the agent
/// whose data directory is `dir`; the first frame it answers, or the error.
async fn ask_peer(
    dir: &Path,
    peer_id: &str,
    address: &str,
    grant: Grant,
    manifest: Digest,
    chunk: Digest,
) -> Result<ChunkFrame, String> {
    let dialer =
        gantry_transport::Dialer::new(agent_tls(dir, peer_id), false).map_err(|e| e.to_string())?;
    let conn = dialer
        .connect_with(
            agent_tls(dir, peer_id),
            gantry_transport::Dialled::Peer,
            address,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut writer, mut reader) = conn.open_stream().await.map_err(|e| e.to_string())?;
    writer
        .send(&StreamOpen::FetchChunks { grant, manifest })
        .await
        .map_err(|e| e.to_string())?;
    writer
        .send(&ChunkWants(vec![chunk]))
        .await
        .map_err(|e| e.to_string())?;
    writer.finish();
    reader
        .recv::<ChunkFrame>()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no answer".to_string())
}

#[test]
fn a_host_serves_its_release_only_to_the_hosts_the_coordinator_named() {
    let c = Coordinator::start();
    let _builder = builder(&c);
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut hosts = web_hosts(&c, 1, &["--peer-listen", &listen]);
    hosts.extend(web_hosts(&c, 1, &[]));
    // An enrolled agent that is not a target of the deployment.
    let mut outsider = Agent::enroll(&c.token(&[]), &["--label", "role=other"]);
    outsider.start();
    c.wait_connected(4);
    c.gantry(&["env", "create", "prod", "--select", "role=web"])
        .expect_code(0);
    let run = c.run_pipeline(&pipeline("prod", 0), &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    let d = deployment(&c, "prod");
    let grant = Grant::Deploy {
        deployment: d["id"].as_u64().expect("id"),
        epoch: d["epoch"].as_u64().expect("epoch"),
    };
    let manifest: Digest = d["release"]["manifest"]
        .as_str()
        .expect("manifest")
        .parse()
        .expect("digest");
    // A chunk of the release, as the serving host's fellow host would ask for it.
    let blob = std::fs::read(hosts[0].dir.path().join("deploy/blob/current/out/blob"))
        .expect("the release is on the host");
    let chunk = gantry_cas::chunk_reader(&blob[..])
        .next()
        .expect("a chunk")
        .expect("chunking")
        .0;

    let served = hosts[0].id.clone();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ask = |dir: &Path, grant: Grant, manifest: Digest, chunk: Digest| {
        runtime.block_on(ask_peer(dir, &served, &listen, grant, manifest, chunk))
    };
    // The fellow host gets the chunk.
    match ask(hosts[1].dir.path(), grant.clone(), manifest, chunk) {
        Ok(ChunkFrame::Data { digest, .. }) => assert_eq!(digest, chunk),
        other => panic!("the fellow host should get the chunk: {other:?}"),
    }
    // Another enrolled agent, the right grant: refused, and told why.
    match ask(outsider.dir.path(), grant.clone(), manifest, chunk) {
        Ok(ChunkFrame::Refused { message }) => {
            assert!(message.contains("did not name"), "{message}");
        }
        other => panic!("an outsider must be refused: {other:?}"),
    }
    // The fellow host under another grant, or for another manifest: refused.
    let stale = Grant::Deploy {
        deployment: 999,
        epoch: 1,
    };
    match ask(hosts[1].dir.path(), stale, manifest, chunk) {
        Ok(ChunkFrame::Refused { message }) => {
            assert!(message.contains("another deployment"), "{message}");
        }
        other => panic!("another deployment's grant must be refused: {other:?}"),
    }
    match ask(hosts[1].dir.path(), grant.clone(), Digest::of(b"x"), chunk) {
        Ok(ChunkFrame::Refused { .. }) => {}
        other => panic!("another manifest must be refused: {other:?}"),
    }
    // A chunk that is not part of the release: refused.
    match ask(hosts[1].dir.path(), grant, manifest, Digest::of(b"x")) {
        Ok(ChunkFrame::Refused { message }) => {
            assert!(message.contains("not part of this release"), "{message}");
        }
        other => panic!("a chunk outside the release must be refused: {other:?}"),
    }
    // A host dialing expects the very agent the coordinator named: one that answers
    // with another identity is refused during the handshake.
    let err = runtime
        .block_on(ask_peer(
            hosts[1].dir.path(),
            &outsider.id,
            &listen,
            Grant::Admin,
            manifest,
            chunk,
        ))
        .expect_err("a peer with another identity is refused");
    assert!(err.contains("not agent"), "{err}");
    // None of this disturbed anyone's session.
    c.wait_connected(4);
}
