//! Foundation benchmark: prints
//! - time from `gantry-agent run` to connected (median and p90 of 20 starts),
//! - the coordinator's resident memory idle and with 1,000 agent connections held by this
//!   one process (each enrolled for real, each heartbeating at the production interval),
//! - the agent's idle resident memory and the binaries' sizes.
//!
//! Run: `cargo build --release --bins && cargo run --release -p gantry-tests --bin bench-foundation`
//! (`--agents N` changes the 1,000). Figures are printed, never asserted: the machines are
//! shared and noisy, and the baseline (idle coordinator) is measured in the same run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_certs::{ClientTls, JoinToken};
use gantry_protocol::{
    limits, AgentHello, AgentMessage, EnrollRequest, HelloReply, HostFigures, Intent, Labels,
};
use gantry_tests::{bin, wait_for, Agent, Coordinator, CoordinatorOptions, Proc};
use gantry_transport::Dialer;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let agents_wanted: usize = std::env::args()
        .skip_while(|a| a != "--agents")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1000);
    let mut coordinator = Coordinator::start_with(&CoordinatorOptions {
        agent_cert_ttl: "7d".into(),
        heartbeat_interval: "5s".into(),
        http: false,
    });
    std::thread::sleep(Duration::from_secs(1));
    let server_pid = coordinator.server().pid();
    let idle_rss = rss_kib(server_pid);

    // 1. gantry-agent run → connected, 20 times.
    let agent = Agent::enroll(&coordinator.token(&[]), &[]);
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let mut child = Command::new(bin("gantry-agent"))
            .args(["run", "--data-dir"])
            .arg(agent.dir.path())
            .env("GANTRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let mut proc = Proc {
            child,
            name: "agent".into(),
        };
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = lines
                .next()
                .ok_or_else(|| anyhow::anyhow!("agent exited before connecting"))??;
            if line.contains("connected to") {
                times.push(started.elapsed());
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent did not connect within 30 s"
            );
        }
        proc.terminate();
        // The coordinator must see the old session end before the next start, or the
        // next one would replace it and measure a different path.
        wait_for(
            "the agent to show as disconnected",
            Duration::from_secs(10),
            || (coordinator.agent(&agent.id)["state"] == "Disconnected").then_some(()),
        );
    }
    times.sort();

    // 2. Agent idle memory: connected and heartbeating for 6 s.
    let mut idle_agent = Agent::enroll(&coordinator.token(&[]), &[]);
    idle_agent.start();
    coordinator.wait_connected(1);
    std::thread::sleep(Duration::from_secs(6));
    let agent_rss = rss_kib(idle_agent.proc().pid());
    drop(idle_agent);

    // 3. 1,000 agent connections held by this process.
    let token = coordinator.token(&["--uses", &agents_wanted.to_string(), "--ttl", "1h"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let address = coordinator.address.clone();
    let (enroll_time, connect_time, _sessions) =
        rt.block_on(hold_agents(&address, &token, agents_wanted))?;
    wait_for(
        "all benchmark agents connected",
        Duration::from_secs(120),
        || {
            let s = coordinator.gantry(&["status", "--json"]).json();
            (s["agents_connected"].as_u64() == Some(agents_wanted as u64)).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(6)); // a heartbeat round and a presence flush
    let loaded_rss = rss_kib(server_pid);

    let size = |name: &str| std::fs::metadata(bin(name)).map_or(0, |m| m.len());
    println!(
        "gantry foundation benchmark ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  gantry-agent run -> connected       median {:?}, p90 {:?}, min {:?}, max {:?} (n=20)",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        times[0],
        times[times.len() - 1]
    );
    println!(
        "  coordinator RSS idle (0 sessions)   {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  coordinator RSS, {agents_wanted} agents       {:.1} MiB  (+{:.1} KiB per connection)",
        loaded_rss as f64 / 1024.0,
        (loaded_rss.saturating_sub(idle_rss)) as f64 / agents_wanted as f64
    );
    println!(
        "  enrolling {agents_wanted} agents             {enroll_time:?} ({:.0}/s)",
        agents_wanted as f64 / enroll_time.as_secs_f64()
    );
    println!("  connecting {agents_wanted} agents            {connect_time:?}");
    println!(
        "  agent RSS idle (heartbeating)       {:.1} MiB",
        agent_rss as f64 / 1024.0
    );
    println!(
        "  binary size gantry                  {:.1} MiB",
        size("gantry") as f64 / 1_048_576.0
    );
    println!(
        "  binary size gantry-agent            {:.1} MiB",
        size("gantry-agent") as f64 / 1_048_576.0
    );
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Enrolls `n` agents with `token` and holds a heartbeating session for each, all from
/// this process over one UDP socket per 250 connections.
async fn hold_agents(
    address: &str,
    token: &str,
    n: usize,
) -> anyhow::Result<(Duration, Duration, Vec<tokio::task::JoinHandle<()>>)> {
    let token = JoinToken::parse(token)?;
    let pinned = ClientTls::pinned(&token.ca_fingerprint)?;
    let enroll_dialer = Arc::new(Dialer::new(pinned, false)?);
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (dialer, limit, token, address) = (
            enroll_dialer.clone(),
            limit.clone(),
            token.clone(),
            address.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let _slot = limit.acquire().await?;
            let key = gantry_certs::generate_key_and_csr()?;
            let conn = dialer.connect(&address, Duration::from_secs(30)).await?;
            let (mut w, mut r) = conn.open_control().await?;
            let intent = Intent::Enroll(EnrollRequest {
                token_id: token.id.clone(),
                token_secret: token.secret.clone(),
                csr_der: key.csr_der,
                hostname: format!("bench-{i}"),
                labels: Labels::new(),
            });
            w.send_frame(&gantry_protocol::encode_hello(
                &intent,
                limits::MAX_FRAME_BYTES,
            )?)
            .await?;
            match r.recv::<HelloReply>().await? {
                Some(HelloReply::Enrolled(e)) => {
                    conn.close(gantry_protocol::CloseCode::Normal, "enrolled");
                    Ok::<_, anyhow::Error>((
                        e.ca_certificate_pem,
                        format!("{}{}", e.certificate_pem, key.key_pem),
                    ))
                }
                other => anyhow::bail!("enrollment {i} failed: {other:?}"),
            }
        }));
    }
    let mut identities = Vec::new();
    for t in tasks {
        identities.push(t.await??);
    }
    let enroll_time = started.elapsed();

    let started = Instant::now();
    let dialers: Vec<Arc<Dialer>> = (0..n.div_ceil(250))
        .map(|_| {
            let (ca, creds) = &identities[0];
            let ca_der = gantry_certs::pem_to_der(ca)?;
            Ok(Arc::new(Dialer::new(
                ClientTls::mutual(&ca_der, creds, creds)?,
                false,
            )?))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut sessions = Vec::new();
    let mut connects = Vec::new();
    for (i, (ca, creds)) in identities.into_iter().enumerate() {
        let dialer = dialers[i / 250].clone();
        let (limit, address) = (limit.clone(), address.to_owned());
        connects.push(tokio::spawn(async move {
            let slot = limit.acquire().await?;
            let ca_der = gantry_certs::pem_to_der(&ca)?;
            let conn = dialer
                .connect_with(
                    ClientTls::mutual(&ca_der, &creds, &creds)?,
                    gantry_transport::Dialled::Coordinator,
                    &address,
                    Duration::from_secs(30),
                )
                .await?;
            let (mut w, mut r) = conn.open_control().await?;
            let hello = Intent::Agent(AgentHello {
                agent_version: "bench".into(),
                hostname: format!("bench-{i}"),
                labels: Labels::new(),
                capabilities: vec!["shell".into()],
                slots: 1,
                figures: HostFigures {
                    cpu_count: 1,
                    ..HostFigures::default()
                },
                running: vec![],
                peer_port: None,
            });
            w.send_frame(&gantry_protocol::encode_hello(
                &hello,
                limits::MAX_FRAME_BYTES,
            )?)
            .await?;
            let Some(HelloReply::Welcome(welcome)) = r.recv::<HelloReply>().await? else {
                anyhow::bail!("session {i} not welcomed");
            };
            drop(slot);
            Ok::<_, anyhow::Error>(tokio::spawn(async move {
                let _conn = conn;
                let mut tick =
                    tokio::time::interval(Duration::from_millis(welcome.heartbeat_interval_ms));
                loop {
                    tick.tick().await;
                    if w.send(&AgentMessage::Heartbeat(HostFigures {
                        cpu_count: 1,
                        ..HostFigures::default()
                    }))
                    .await
                    .is_err()
                    {
                        return;
                    }
                }
            }))
        }));
    }
    for c in connects {
        sessions.push(c.await??);
    }
    Ok((enroll_time, started.elapsed(), sessions))
}
