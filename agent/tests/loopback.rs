//! The real `gantry-agent` binary against a minimal in-process coordinator on loopback:
//! enrollment and the files it writes, the session hello and heartbeats, certificate
//! renewal over the live session, shutdown on SIGTERM, and both ways a revocation
//! reaches the agent (a close during the session, a refused handshake afterwards).
//!
//! The fake coordinator speaks the real protocol through gantry-transport and signs with
//! a real gantry-certs CA; it accepts any well-formed token, which is the coordinator's
//! business to check, not the agent's.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use gantry_certs::{CertAuthority, Identity, JoinToken, RevocationSet, ServerTls};
use gantry_protocol::{
    decode_hello, AgentHello, AgentId, AgentMessage, CloseCode, CoordinatorMessage, Enrolled,
    HelloReply, HostFigures, Intent, Refusal, RefusalReason, Welcome,
};
use gantry_transport::{Connection, Listener};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug)]
enum Event {
    Hello(AgentHello),
    Heartbeat(HostFigures),
    Renewed,
    Closed(Option<CloseCode>),
    Connection(Connection),
}

struct FakeCoordinator {
    address: String,
    fingerprint: String,
    revoked: RevocationSet,
    events: mpsc::UnboundedReceiver<Event>,
}

impl FakeCoordinator {
    fn start(agent_lifetime: Duration) -> Self {
        let now = SystemTime::now();
        let ca = CertAuthority::create("test CA", now).expect("CA");
        let (cert, key) = ca.issue_coordinator(&[], now).expect("coordinator cert");
        let revoked = RevocationSet::default();
        let tls =
            ServerTls::config(ca.cert_der(), &cert.pem, &key, revoked.clone()).expect("server tls");
        let listener = Listener::bind(
            "127.0.0.1:0".parse().expect("addr"),
            tls,
            &gantry_certs::random_bytes::<32>(),
        )
        .expect("bind");
        let address = listener.local_addr().expect("local addr").to_string();
        let fingerprint = ca.fingerprint();
        let (tx, events) = mpsc::unbounded_channel();
        let ca = std::sync::Arc::new(ca);
        tokio::spawn(async move {
            while let Some(incoming) = listener.accept().await {
                let (ca, tx) = (ca.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.handshake(Duration::from_secs(5)).await {
                        serve(conn, &ca, agent_lifetime, &tx).await;
                    }
                });
            }
        });
        Self {
            address,
            fingerprint,
            revoked,
            events,
        }
    }

    fn token(&self) -> String {
        JoinToken::generate(&self.address, &self.fingerprint).encode()
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("coordinator event in time")
            .expect("event")
    }
}

async fn serve(
    conn: Connection,
    ca: &CertAuthority,
    lifetime: Duration,
    events: &mpsc::UnboundedSender<Event>,
) {
    let Ok((mut writer, mut reader)) = conn.accept_control(Duration::from_secs(5)).await else {
        return;
    };
    let Ok(Some(payload)) = reader.recv_payload().await else {
        return;
    };
    let Ok(hello) = decode_hello(&payload) else {
        return;
    };
    match hello.intent {
        Intent::Enroll(request) => {
            let agent_id = AgentId::from_random(&gantry_certs::random_bytes::<6>());
            let reply = match ca.sign_csr(
                &request.csr_der,
                &Identity::Agent(agent_id.clone()),
                SystemTime::now(),
                lifetime,
            ) {
                Ok(cert) => HelloReply::Enrolled(Enrolled {
                    agent_id,
                    certificate_pem: cert.pem,
                    ca_certificate_pem: ca.cert_pem().to_owned(),
                    labels: request.labels,
                }),
                Err(e) => HelloReply::Refused(Refusal {
                    reason: RefusalReason::BadCsr,
                    message: e.to_string(),
                }),
            };
            let _ = writer.send(&reply).await;
            let _ = conn.closed().await;
        }
        Intent::Agent(agent_hello) => {
            let identity = conn
                .peer_certificates()
                .and_then(|c| Identity::from_cert_der(&c[0]).ok());
            let Some(identity) = identity else { return };
            let welcome = Welcome {
                protocol_version: gantry_protocol::PROTOCOL_VERSION,
                coordinator_version: "fake".into(),
                identity: identity.uri(),
                heartbeat_interval_ms: 100,
            };
            let _ = events.send(Event::Hello(agent_hello));
            let _ = events.send(Event::Connection(conn.clone()));
            if writer.send(&HelloReply::Welcome(welcome)).await.is_err() {
                return;
            }
            loop {
                match reader.recv::<AgentMessage>().await {
                    Ok(Some(AgentMessage::Heartbeat(figures))) => {
                        let _ = events.send(Event::Heartbeat(figures));
                    }
                    Ok(Some(AgentMessage::RenewCertificate { csr_der })) => {
                        let message =
                            match ca.sign_csr(&csr_der, &identity, SystemTime::now(), lifetime) {
                                Ok(cert) => CoordinatorMessage::CertificateRenewed {
                                    certificate_pem: cert.pem,
                                    not_after: cert.not_after,
                                },
                                Err(e) => CoordinatorMessage::RenewalRefused {
                                    message: e.to_string(),
                                },
                            };
                        let _ = writer.send(&message).await;
                        let _ = events.send(Event::Renewed);
                    }
                    // This fake coordinator dispatches no jobs, deployments or commands.
                    Ok(Some(
                        AgentMessage::JobAccepted { .. }
                        | AgentMessage::JobRejected { .. }
                        | AgentMessage::JobFinished(_)
                        | AgentMessage::JobFinishedWithOutputs { .. }
                        | AgentMessage::DeployResult(_)
                        | AgentMessage::ExecOutput { .. }
                        | AgentMessage::ExecDone { .. },
                    )) => {}
                    Ok(None) | Err(_) => {
                        let code = conn.closed().await.close_code();
                        let _ = events.send(Event::Closed(code));
                        return;
                    }
                }
            }
        }
        // This fake coordinator has no transfers to serve.
        Intent::Admin(_) | Intent::Transfers(_) => {}
    }
}

fn agent_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry-agent"));
    cmd.args(args)
        .env("GANTRY_LOG", "info")
        .env_remove("GANTRY_AGENT_DATA_DIR");
    cmd
}

/// Runs a short command to completion off the async runtime.
async fn agent_output(args: &[&str]) -> Output {
    let mut cmd = agent_command(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run gantry-agent"))
        .await
        .expect("join")
}

fn spawn_run(data_dir: &Path, extra: &[&str]) -> Child {
    let dir = data_dir.to_str().expect("utf-8 path");
    let mut args = vec!["run", "--data-dir", dir, "--max-backoff", "300ms"];
    args.extend_from_slice(extra);
    agent_command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run")
}

/// Waits for the child to exit, bounded, without blocking the runtime.
async fn wait_exit(mut child: Child) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                return (status.code(), stderr);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gantry-agent did not exit in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

async fn enroll(coordinator: &FakeCoordinator, data_dir: &Path, labels: &[&str]) -> String {
    let token = coordinator.token();
    let dir = data_dir.to_str().expect("utf-8 path");
    let mut args = vec!["enroll", "--token", &token, "--data-dir", dir];
    for label in labels {
        args.extend(["--label", label]);
    }
    let out = agent_output(&args).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

#[tokio::test]
async fn enroll_then_run_heartbeats_and_stops_cleanly_on_sigterm() {
    let mut coordinator = FakeCoordinator::start(Duration::from_secs(3600));
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("agent");

    let stdout = enroll(&coordinator, &data_dir, &["role=web"]).await;
    let expected_suffix = format!(" with coordinator {}\n", coordinator.address);
    assert!(
        stdout.starts_with("enrolled as ag-") && stdout.ends_with(&expected_suffix),
        "{stdout}"
    );
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&data_dir.join("tls/agent.pem")), 0o600);
    assert_eq!(mode(&data_dir.join("tls/ca.pem")), 0o644);
    let identity = std::fs::read_to_string(data_dir.join("tls/agent.pem")).expect("agent.pem");
    assert!(
        identity.contains("BEGIN CERTIFICATE") && identity.contains("PRIVATE KEY"),
        "{identity}"
    );
    let config = std::fs::read_to_string(data_dir.join("agent.toml")).expect("agent.toml");
    let agent_id = stdout.trim_end().split(' ').nth(2).expect("agent id");
    assert!(
        config.contains(agent_id)
            && config.contains(&coordinator.address)
            && config.contains("role = \"web\""),
        "{config}"
    );

    // A second enrollment over the first is refused unless forced.
    let token = coordinator.token();
    let dir = data_dir.to_str().expect("utf-8");
    let again = agent_output(&["enroll", "--token", &token, "--data-dir", dir]).await;
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let child = spawn_run(
        &data_dir,
        &["--label", "zone=eu", "--label", "role=db", "--slots", "3"],
    );
    let pid = child.id().to_string();
    let Event::Hello(hello) = coordinator.next().await else {
        panic!("expected a hello first")
    };
    assert_eq!(
        hello.labels.get("os").map(String::as_str),
        Some(std::env::consts::OS)
    );
    assert_eq!(
        hello.labels.get("arch").map(String::as_str),
        Some(std::env::consts::ARCH)
    );
    assert!(hello.labels.contains_key("hostname"));
    assert_eq!(
        hello.labels.get("role").map(String::as_str),
        Some("db"),
        "flags win over enrollment labels"
    );
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("eu"));
    assert!(hello.capabilities.contains(&"shell".to_owned()));
    assert_eq!(hello.slots, 3);
    assert!(
        hello.figures.cpu_count >= 1 && hello.figures.memory_total_bytes > 0,
        "{:?}",
        hello.figures
    );

    let mut heartbeats = 0;
    while heartbeats < 2 {
        if let Event::Heartbeat(figures) = coordinator.next().await {
            assert!(figures.memory_total_bytes > 0);
            heartbeats += 1;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    loop {
        if let Event::Closed(code) = coordinator.next().await {
            assert_eq!(code, Some(CloseCode::Normal));
            break;
        }
    }
    let (code, stderr) = wait_exit(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "connected to {} as {agent_id}",
            coordinator.address
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn renews_over_the_session_then_exits_3_when_revoked_live_and_at_the_handshake() {
    // Certificates are backdated 5 minutes for clock skew, so a 60 s lifetime is due for
    // renewal the moment the session starts.
    let mut coordinator = FakeCoordinator::start(Duration::from_secs(60));
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("agent");
    let stdout = enroll(&coordinator, &data_dir, &[]).await;
    let agent_id = AgentId::parse(stdout.split(' ').nth(2).expect("id")).expect("agent id");
    let identity_path = data_dir.join("tls/agent.pem");
    let before = std::fs::read_to_string(&identity_path).expect("agent.pem");

    let child = spawn_run(&data_dir, &[]);
    let conn = loop {
        if let Event::Connection(conn) = coordinator.next().await {
            break conn;
        }
    };
    loop {
        if matches!(coordinator.next().await, Event::Renewed) {
            break;
        }
    }
    // The agent writes the new identity after it reads the answer: wait for the file.
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        let now = std::fs::read_to_string(&identity_path).expect("agent.pem");
        if now != before {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent.pem was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(mode(&identity_path), 0o600);
    let key_of = |pem: &str| {
        pem[pem
            .find("-----BEGIN PRIVATE KEY")
            .expect("key in identity file")..]
            .to_owned()
    };
    assert_ne!(
        key_of(&before),
        key_of(&after),
        "renewal must use a fresh key"
    );

    conn.close(CloseCode::Revoked, "agent revoked");
    let (code, stderr) = wait_exit(child).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(
            "error: this agent was revoked by the coordinator; enroll it again with a new token"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("certificate renewed, valid until"),
        "{stderr}"
    );

    // Next time the TLS handshake itself refuses the (renewed) certificate.
    coordinator.revoked.insert(agent_id);
    let (code, stderr) = wait_exit(spawn_run(&data_dir, &[])).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("this agent was revoked by the coordinator"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_coordinator_is_retried_with_logged_delays_until_sigint() {
    let coordinator = FakeCoordinator::start(Duration::from_secs(3600));
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("agent");
    enroll(&coordinator, &data_dir, &[]).await;
    // Point the enrollment at port 0, which every connect attempt fails on at once.
    let config_path = data_dir.join("agent.toml");
    let config = std::fs::read_to_string(&config_path).expect("agent.toml");
    std::fs::write(
        &config_path,
        config.replace(&coordinator.address, "127.0.0.1:0"),
    )
    .expect("rewrite");

    let mut child = spawn_run(&data_dir, &[]);
    let stderr = child.stderr.take().expect("stderr");
    let pid = child.id().to_string();
    let log = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        let mut signalled = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.expect("stderr line");
            if line.contains("reconnecting in")
                && !signalled
                && seen
                    .iter()
                    .filter(|l: &&String| l.contains("reconnecting in"))
                    .count()
                    >= 2
            {
                Command::new("kill")
                    .args(["-INT", &pid])
                    .status()
                    .expect("kill");
                signalled = true;
            }
            seen.push(line);
        }
        seen.join("\n")
    });
    let log = tokio::time::timeout(WAIT, log)
        .await
        .expect("agent exits after SIGINT")
        .expect("join");
    let (code, _) = wait_exit(child).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.matches("reconnecting in").count() >= 3, "{log}");
    assert!(
        log.contains("127.0.0.1:0"),
        "each failure names its reason: {log}"
    );
}
