//! End-to-end tests of the foundation: enrollment, sessions, trust and bad input, with
//! the real `gantry` and `gantry-agent` binaries on loopback.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use gantry_certs::{ClientTls, JoinToken};
use gantry_protocol::{
    hello::encode_hello_with_version, limits, AdminHello, AgentHello, CloseCode, EnrollRequest,
    HelloReply, HostFigures, Intent, Labels, RefusalReason, TokenId,
};
use gantry_tests::{raw, wait_for, Agent, Coordinator, CoordinatorOptions, DEADLINE};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn three_agents_enroll_and_show_as_connected_with_their_figures() {
    let c = Coordinator::start();
    let token = c.token(&["--uses", "3", "--label", "site=paris"]);
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| Agent::enroll(&token, &["--label", &format!("rack=r{i}")]))
        .collect();
    for a in &mut agents {
        a.start();
    }
    let list = wait_for("3 connected agents with figures", DEADLINE, || {
        let l = c.agents();
        let ready = l
            .iter()
            .filter(|a| {
                a["state"] == "Connected" && a["figures"]["cpu_count"].as_u64().unwrap_or(0) > 0
            })
            .count();
        (ready == 3).then_some(l)
    });
    for a in &list {
        let labels = &a["labels"];
        assert_eq!(labels["site"], "paris", "token label: {a}");
        assert_eq!(
            labels["os"],
            std::env::consts::OS,
            "automatic os label: {a}"
        );
        assert_eq!(
            labels["arch"],
            std::env::consts::ARCH,
            "automatic arch label: {a}"
        );
        assert!(
            labels["hostname"].is_string(),
            "automatic hostname label: {a}"
        );
        assert!(
            labels["rack"].as_str().is_some_and(|r| r.starts_with('r')),
            "configured label: {a}"
        );
        let f = &a["figures"];
        assert!(
            f["memory_total_bytes"].as_u64().unwrap_or(0) > 0,
            "memory figure: {a}"
        );
        assert!(
            f["memory_used_bytes"].as_u64().unwrap_or(0) > 0,
            "memory figure: {a}"
        );
        assert!(
            f["disk_total_bytes"].as_u64().unwrap_or(0) > 0,
            "disk figure: {a}"
        );
        assert!(
            a["capabilities"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "shell")),
            "capabilities: {a}"
        );
        assert!(
            a["remote_address"]
                .as_str()
                .is_some_and(|r| r.starts_with("127.0.0.1:")),
            "address: {a}"
        );
    }
    let ids: Vec<&str> = list.iter().filter_map(|a| a["agent_id"].as_str()).collect();
    for a in &agents {
        assert!(ids.contains(&a.id.as_str()), "{} listed", a.id);
        // The private key never left the agent and is readable by its owner only.
        let mode = std::fs::metadata(a.dir.path().join("tls").join("agent.pem"))
            .expect("agent.pem")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "agent key file mode");
    }
    let table = c.gantry(&["agents", "list"]).expect_code(0).stdout;
    assert_eq!(
        table.lines().filter(|l| l.contains(" connected ")).count(),
        3,
        "{table}"
    );
    let status = c.gantry(&["status", "--json"]).expect_code(0).json();
    assert_eq!(status["agents_connected"], 3, "{status}");
    let ca_key_mode = std::fs::metadata(c.data_dir().join("tls").join("ca-key.pem"))
        .expect("ca key")
        .permissions()
        .mode();
    assert_eq!(ca_key_mode & 0o777, 0o600, "CA key file mode");
}

#[test]
fn bad_tokens_are_refused_with_the_reason_and_nothing_is_issued() {
    let c = Coordinator::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let refused = |token: &str, code: i32, reason: &str| {
        let dir = scratch.path().join(format!("a{}", fastrand_name()));
        let run = Agent::try_enroll(&dir, token, &[]).expect_code(code);
        assert!(
            run.stderr.contains(reason),
            "expected {reason:?} in: {}",
            run.stderr
        );
        assert!(
            !dir.join("tls").join("agent.pem").exists(),
            "no certificate may be written after: {}",
            run.stderr
        );
    };

    // Malformed: caught before anything is sent.
    refused("gjt1_not-a-token", 2, "malformed join token");
    refused("hello", 2, "malformed join token");

    // Unknown: well-formed, for this coordinator, but never created (or a wrong secret).
    let good = c.token(&["--uses", "1"]);
    let mut forged = JoinToken::parse(&good).expect("parse");
    forged.id = TokenId::parse("tk-00000000deadbeef").expect("id");
    refused(&forged.encode(), 3, "is unknown to this coordinator");
    let mut wrong_secret = JoinToken::parse(&good).expect("parse");
    wrong_secret.secret = "0".repeat(64);
    refused(&wrong_secret.encode(), 3, "is unknown to this coordinator");

    // Reused: the first use enrolls, the second is refused.
    let _first = Agent::enroll(&good, &[]);
    refused(&good, 3, "has been used 1 times");

    // Expired: wait (on the coordinator's own count of active tokens) until it lapses.
    let short = c.token(&["--ttl", "1s"]);
    wait_for("the 1 s token to expire", DEADLINE, || {
        let s = c.gantry(&["status", "--json"]).expect_code(0).json();
        (s["tokens_active"] == 0).then_some(())
    });
    refused(&short, 3, "expired");

    // Only the one good enrollment exists.
    assert_eq!(
        c.agents().len(),
        1,
        "refused enrollments must store nothing"
    );
    let audit = c.gantry(&["audit", "--json"]).expect_code(0).json();
    let enrolls = audit
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["action"] == "agent.enroll")
        .count();
    assert_eq!(enrolls, 1, "{audit}");
}

fn fastrand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A CSR that asks for a CA, extra SANs and a long lifetime gets none of them.
#[test]
fn a_greedy_csr_gets_a_plain_short_lived_agent_certificate() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        agent_cert_ttl: "1h".into(),
        ..CoordinatorOptions::default()
    });
    let token = JoinToken::parse(&c.token(&[])).expect("token");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut wish = rcgen::CertificateParams::new(vec![
        "coordinator.gantry.internal".to_owned(),
        "evil.example".to_owned(),
    ])
    .expect("params");
    wish.subject_alt_names.push(rcgen::SanType::URI(
        "gantry://admin/root".try_into().expect("uri"),
    ));
    wish.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    wish.not_after = rcgen::date_time_ymd(2200, 1, 1);
    let csr = wish.serialize_request(&key).expect("csr");

    let reply = rt().block_on(async {
        let mut client = raw::connect(
            &c.address,
            ClientTls::pinned(&token.ca_fingerprint).expect("tls"),
        )
        .await
        .expect("connect");
        let intent = Intent::Enroll(EnrollRequest {
            token_id: token.id.clone(),
            token_secret: token.secret.clone(),
            csr_der: csr.der().to_vec(),
            hostname: "greedy".into(),
            labels: Labels::new(),
        });
        client
            .writer
            .send_frame(
                &gantry_protocol::encode_hello(&intent, limits::MAX_FRAME_BYTES).expect("hello"),
            )
            .await
            .expect("send");
        client
            .reader
            .recv::<HelloReply>()
            .await
            .expect("reply")
            .expect("some reply")
    });
    let HelloReply::Enrolled(enrolled) = reply else {
        panic!("expected enrollment, got {reply:?}")
    };
    let der = gantry_certs::pem_to_der(&enrolled.certificate_pem).expect("der");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    assert!(
        !cert
            .basic_constraints()
            .expect("bc")
            .is_some_and(|bc| bc.value.ca),
        "must not be a CA"
    );
    let sans = cert
        .subject_alternative_name()
        .expect("san")
        .expect("present")
        .value
        .general_names
        .len();
    assert_eq!(sans, 1, "exactly one SAN, the agent identity");
    assert_eq!(
        gantry_certs::Identity::from_cert_der(&der).expect("identity"),
        gantry_certs::Identity::Agent(enrolled.agent_id.clone())
    );
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(
        eku.client_auth && !eku.server_auth && !eku.any,
        "client auth only"
    );
    let (_, not_after) = gantry_certs::cert_validity(&der).expect("validity");
    let lifetime =
        Duration::from_millis(not_after.millis_since(gantry_protocol::UnixMillis::now()));
    assert!(
        lifetime <= Duration::from_secs(3600),
        "lifetime is the coordinator's 1h, not the CSR's: {lifetime:?}"
    );
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the CSR's key, nothing else"
    );
}

#[test]
fn foreign_missing_and_wrong_role_certificates_are_refused() {
    let c = Coordinator::start();
    let mut agent = Agent::enroll(&c.token(&[]), &[]);
    agent.start();
    c.wait_connected(1);

    // An admin context from another coordinator's CA, pointed at this coordinator.
    let other = Coordinator::start();
    let ctx_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(ctx_dir.path().join("ca.pem"), c.ca_pem()).expect("ca");
    std::fs::write(ctx_dir.path().join("admin.pem"), other.admin_pem()).expect("creds");
    let ctx = ctx_dir.path().join("context.toml");
    std::fs::write(
        &ctx,
        format!(
            "address = {:?}\nca = \"ca.pem\"\ncredentials = \"admin.pem\"\n",
            c.address
        ),
    )
    .expect("ctx");
    let run = gantry_tests::Run::from_output(
        std::process::Command::new(gantry_tests::bin("gantry"))
            .args(["status"])
            .env("GANTRY_CONFIG", &ctx)
            .output()
            .expect("run"),
    );
    let run = run.expect_code(3);
    assert!(
        run.stderr.to_lowercase().contains("certificate"),
        "foreign CA refused during the handshake: {}",
        run.stderr
    );

    // The agent's own certificate on an admin command.
    std::fs::copy(
        agent.dir.path().join("tls").join("agent.pem"),
        ctx_dir.path().join("admin.pem"),
    )
    .expect("copy");
    let run = gantry_tests::Run::from_output(
        std::process::Command::new(gantry_tests::bin("gantry"))
            .args(["agents", "list"])
            .env("GANTRY_CONFIG", &ctx)
            .output()
            .expect("run"),
    );
    let run = run.expect_code(3);
    assert!(run.stderr.contains("is not an admin"), "{}", run.stderr);

    // No certificate at all on the agent path.
    let ca_der = gantry_certs::pem_to_der(&c.ca_pem()).expect("ca der");
    let reply = rt().block_on(async {
        let mut client = raw::connect(&c.address, ClientTls::anonymous(&ca_der).expect("tls"))
            .await
            .expect("connect");
        let hello = Intent::Agent(AgentHello {
            agent_version: "test".into(),
            hostname: "anon".into(),
            labels: Labels::new(),
            capabilities: vec![],
            slots: 1,
            figures: HostFigures::default(),
            running: vec![],
            peer_port: None,
        });
        client
            .writer
            .send_frame(
                &gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES).expect("hello"),
            )
            .await
            .expect("send");
        client
            .reader
            .recv::<HelloReply>()
            .await
            .expect("reply")
            .expect("some reply")
    });
    match reply {
        HelloReply::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::NotAuthenticated);
            assert!(r.message.contains("may only enroll"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The real agent was never disturbed.
    assert!(agent.proc().is_running());
    assert_eq!(c.wait_connected(1).len(), 1);
}

#[test]
fn revoking_closes_the_live_connection_within_a_second_and_refuses_the_next_handshake() {
    let mut c = Coordinator::start();
    let token = c.token(&["--uses", "2"]);
    let mut victim = Agent::enroll(&token, &[]);
    let mut bystander = Agent::enroll(&token, &[]);
    victim.start();
    bystander.start();
    c.wait_connected(2);

    c.gantry(&["agents", "revoke", &victim.id]).expect_code(0);
    let revoked_at = Instant::now();
    let status = victim
        .proc()
        .wait_exit(Duration::from_secs(5))
        .expect("the revoked agent stops");
    let closed_after = revoked_at.elapsed();
    assert!(
        closed_after < Duration::from_secs(1),
        "live connection closed after {closed_after:?}"
    );
    assert_eq!(
        status.code(),
        Some(3),
        "revoked agent exits 3: {}",
        victim.log()
    );
    assert!(victim.log().contains("revoked"), "{}", victim.log());

    // The next handshake is refused.
    victim.start();
    let status = victim.proc().wait_exit(DEADLINE).expect("refused again");
    assert_eq!(status.code(), Some(3), "{}", victim.log());

    let shown = c.agent(&victim.id);
    assert_eq!(shown["state"], "Revoked", "{shown}");
    assert!(shown["revoked_at"].is_u64());
    let table = c.gantry(&["agents", "list"]).expect_code(0).stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains(&victim.id) && l.contains("revoked")),
        "{table}"
    );
    // The other agent stayed connected throughout.
    assert!(bystander.proc().is_running());
    assert_eq!(c.agent(&bystander.id)["state"], "Connected");
    assert_eq!(
        bystander.log().matches("connected to").count(),
        1,
        "bystander never reconnected: {}",
        bystander.log()
    );

    // Revocation survives a coordinator restart.
    c.server().terminate();
    c.start_server();
    assert_eq!(c.agent(&victim.id)["state"], "Revoked");
}

#[test]
fn oversized_frames_garbage_and_unsupported_versions_close_only_that_connection() {
    let c = Coordinator::start();
    let mut agent = Agent::enroll(&c.token(&[]), &[]);
    agent.start();
    c.wait_connected(1);
    let ca_der = gantry_certs::pem_to_der(&c.ca_pem()).expect("ca der");
    let admin = c.admin_pem();
    let tls = || ClientTls::mutual(&ca_der, &admin, &admin).expect("tls");
    let rt = rt();

    // A frame header announcing more than the limit.
    let err = rt.block_on(async {
        let mut client = raw::connect(&c.address, tls()).await.expect("connect");
        let too_big = (limits::MAX_FRAME_BYTES + 1).to_be_bytes();
        client
            .writer
            .send_frame(&too_big)
            .await
            .expect("send header");
        client.reader.recv_payload().await.expect_err("closed")
    });
    assert_eq!(err.close_code(), Some(CloseCode::FrameTooLarge), "{err}");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");

    // Garbage bytes.
    let err = rt.block_on(async {
        let mut client = raw::connect(&c.address, tls()).await.expect("connect");
        client
            .writer
            .send_frame(b"\x00\x00\x00\x10GET / HTTP/1.1\r\n")
            .await
            .expect("send");
        client.reader.recv_payload().await.expect_err("closed")
    });
    assert_eq!(err.close_code(), Some(CloseCode::Malformed), "{err}");
    assert!(err.to_string().contains("not a Gantry hello"), "{err}");

    // A hello from a future protocol version.
    let (reply, err) = rt.block_on(async {
        let mut client = raw::connect(&c.address, tls()).await.expect("connect");
        let hello = encode_hello_with_version(
            999,
            &Intent::Admin(AdminHello {
                client_version: "9.9".into(),
            }),
            limits::MAX_FRAME_BYTES,
        )
        .expect("hello");
        client.writer.send_frame(&hello).await.expect("send");
        let reply = client
            .reader
            .recv::<HelloReply>()
            .await
            .expect("reply")
            .expect("some");
        (reply, client.conn.closed().await)
    });
    match reply {
        HelloReply::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::UnsupportedVersion);
            assert!(
                r.message.contains("unsupported protocol version 999"),
                "{}",
                r.message
            );
            assert!(
                r.message.contains(&format!(
                    "{}..={}",
                    gantry_protocol::MIN_SUPPORTED_VERSION,
                    gantry_protocol::PROTOCOL_VERSION
                )),
                "names both versions: {}",
                r.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        err.close_code(),
        Some(CloseCode::UnsupportedVersion),
        "{err}"
    );

    // The real agent never noticed.
    assert!(agent.proc().is_running());
    assert_eq!(c.agent(&agent.id)["state"], "Connected");
    assert_eq!(
        agent.log().matches("connected to").count(),
        1,
        "agent never reconnected: {}",
        agent.log()
    );
}

#[test]
fn agents_reconnect_by_themselves_after_a_coordinator_crash_and_nothing_stored_is_lost() {
    let mut c = Coordinator::start();
    let token = c.token(&["--uses", "2", "--label", "tier=gold"]);
    let mut agents: Vec<Agent> = (0..2).map(|_| Agent::enroll(&token, &[])).collect();
    for a in &mut agents {
        a.start();
    }
    c.wait_connected(2);
    c.gantry(&["agents", "label", &agents[0].id, "role=web"])
        .expect_code(0);
    let spare = c.token(&["--ttl", "1h", "--uses", "5"]);
    let before: Vec<serde_json::Value> = agents.iter().map(|a| c.agent(&a.id)).collect();
    let audit_before = c.gantry(&["audit", "--json"]).expect_code(0).json();

    c.server().kill9();
    c.start_server();
    let after = c.wait_connected(2);

    for (a, old) in agents.iter_mut().zip(&before) {
        assert!(a.proc().is_running(), "agent kept running");
        let now = after
            .iter()
            .find(|x| x["agent_id"] == a.id.as_str())
            .expect("still enrolled");
        for field in ["hostname", "enrolled_at", "certificate_not_after", "labels"] {
            assert_eq!(now[field], old[field], "{field} survived the crash");
        }
    }
    assert_eq!(c.agent(&agents[0].id)["labels"]["role"], "web");
    assert_eq!(c.agent(&agents[1].id)["labels"]["tier"], "gold");
    let audit_after = c.gantry(&["audit", "--json"]).expect_code(0).json();
    let before_len = audit_before.as_array().expect("array").len();
    assert_eq!(
        &audit_after.as_array().expect("array")[..before_len],
        audit_before.as_array().expect("array").as_slice()
    );
    // The token made before the crash still works.
    let late = Agent::enroll(&spare, &[]);
    assert!(c.agents().iter().any(|a| a["agent_id"] == late.id.as_str()));
}

#[test]
fn agents_renew_their_certificate_over_the_live_session() {
    let c = Coordinator::start_with(&CoordinatorOptions {
        agent_cert_ttl: "6s".into(),
        heartbeat_interval: "500ms".into(),
        http: false,
    });
    let mut agent = Agent::enroll(&c.token(&[]), &[]);
    let first = c.agent(&agent.id)["certificate_not_after"]
        .as_u64()
        .expect("not_after");
    agent.start();
    c.wait_connected(1);
    let renewed = wait_for("a renewed certificate", DEADLINE, || {
        let now = c.agent(&agent.id)["certificate_not_after"]
            .as_u64()
            .unwrap_or(0);
        (now > first).then_some(now)
    });
    assert!(renewed > first);
    assert_eq!(
        agent.log().matches("connected to").count(),
        1,
        "renewed without reconnecting: {}",
        agent.log()
    );
    // The renewed certificate is what the agent uses from now on: restart it after the
    // first certificate has expired, and it still connects.
    wait_for("the first certificate to expire", DEADLINE, || {
        (gantry_protocol::UnixMillis::now().0 > first + 500).then_some(())
    });
    agent.proc().terminate();
    agent.start();
    wait_for(
        "reconnection with the renewed certificate",
        DEADLINE,
        || (agent.log().matches("connected to").count() >= 2).then_some(()),
    );
    let audit = c.gantry(&["audit", "--json"]).expect_code(0).json();
    assert!(
        audit
            .as_array()
            .expect("array")
            .iter()
            .any(|e| e["action"] == "agent.renew"),
        "{audit}"
    );
}
