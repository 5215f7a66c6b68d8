//! Misbehaving peers at volume, for the denial-of-service tests (`tests/dos.rs`) and
//! `bench-dos`: an agent flooding its control stream as fast as the connection takes
//! frames, a storm of clients without certificates, a flood of handshakes that never
//! finish, and the dispatch latency a well-behaved agent sees meanwhile.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_certs::ClientTls;
use gantry_protocol::{
    limits, AdminHello, AdminRequest, AdminResponse, AgentHello, AgentMessage, CoordinatorMessage,
    EnrollRequest, HelloReply, HostFigures, Intent, JobOutcome, JobResult, Labels, SubmitRun,
    TokenId, UnixMillis,
};
use gantry_transport::{Connection, Dialer};

use crate::peers::RawAgent;
use crate::raw::{self, RawClient};
use crate::DEADLINE;

/// The TLS of the agent enrolled into `agent_dir`.
pub fn agent_tls(agent_dir: &Path) -> rustls::ClientConfig {
    let ca_pem = std::fs::read_to_string(agent_dir.join("tls/ca.pem")).expect("agent ca");
    let identity = std::fs::read_to_string(agent_dir.join("tls/agent.pem")).expect("agent pem");
    let ca_der = gantry_certs::pem_to_der(&ca_pem).expect("ca der");
    ClientTls::mutual(&ca_der, &identity, &identity).expect("tls")
}

fn agent_hello(labels: Labels) -> Intent {
    Intent::Agent(AgentHello {
        agent_version: "flood".into(),
        hostname: "flood".into(),
        labels,
        capabilities: vec![],
        slots: 1,
        figures: HostFigures::default(),
        running: vec![],
        peer_port: None,
    })
}

/// Sends an agent's hello (no labels) on a raw client's control stream; returns the
/// coordinator's reply.
pub async fn say_agent_hello(client: &mut RawClient) -> Option<HelloReply> {
    let hello = gantry_protocol::encode_hello(&agent_hello(Labels::new()), limits::MAX_FRAME_BYTES)
        .expect("hello");
    client.writer.send_frame(&hello).await.expect("send hello");
    client.reader.recv::<HelloReply>().await.expect("reply")
}

/// An enrolled agent that sends heartbeats on its control stream as fast as the
/// connection takes them, reading nothing.
#[derive(Debug)]
pub struct Flooder {
    pub conn: Connection,
    _dialer: Dialer,
    /// Bytes of one heartbeat frame.
    pub frame_len: usize,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<String>,
}

impl Drop for Flooder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Flooder {
    /// Connects as the agent enrolled into `agent_dir` and starts flooding.
    pub async fn heartbeats(address: &str, agent_dir: &Path) -> Self {
        let mut client = raw::connect(address, agent_tls(agent_dir))
            .await
            .expect("connect");
        let reply = say_agent_hello(&mut client).await;
        assert!(matches!(reply, Some(HelloReply::Welcome(_))), "{reply:?}");
        let RawClient {
            dialer,
            conn,
            mut writer,
            mut reader,
        } = client;
        // One heartbeat frame, sent in batches of 64 per write.
        let frame = gantry_protocol::encode_frame(
            &AgentMessage::Heartbeat(HostFigures::default()),
            limits::MAX_FRAME_BYTES,
        )
        .expect("frame");
        let batch: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 64)
            .collect();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            // The coordinator's messages are drained so its writes never stall on us.
            let drain =
                tokio::spawn(async move { while let Ok(Some(_)) = reader.recv_payload().await {} });
            let end = loop {
                if let Err(e) = writer.send_frame(&batch).await {
                    break e.to_string();
                }
                counter.fetch_add(64, Ordering::Relaxed);
            };
            drain.abort();
            end
        });
        Self {
            conn,
            _dialer: dialer,
            frame_len: frame.len(),
            sent,
            task,
        }
    }

    /// Heartbeats written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Whether the coordinator has closed the flooder's connection (and why).
    pub fn closed(&self) -> Option<String> {
        self.conn.close_reason().map(|e| e.to_string())
    }
}

/// An admin connection speaking the protocol by hand.
pub async fn admin(address: &str, ca_der: &[u8], admin_pem: &str) -> RawClient {
    let mut client = raw::connect(
        address,
        ClientTls::mutual(ca_der, admin_pem, admin_pem).expect("tls"),
    )
    .await
    .expect("connect");
    let hello = Intent::Admin(AdminHello {
        client_version: "flood".into(),
    });
    client
        .writer
        .send_frame(&gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES).expect("hello"))
        .await
        .expect("send hello");
    let reply = client.reader.recv::<HelloReply>().await.expect("reply");
    assert!(matches!(reply, Some(HelloReply::Welcome(_))), "{reply:?}");
    client
}

/// Submits `n` one-job runs for the agent labelled `lat=<tag>` one after the other; for
/// each, the time from the coordinator storing the run (its answer) to the agent holding
/// the dispatch. The agent accepts and finishes each job at once.
pub async fn dispatch_latencies(
    admin: &mut RawClient,
    agent: &mut RawAgent,
    tag: &str,
    n: usize,
) -> Vec<Duration> {
    let text = format!(
        "name: latency\njobs:\n  one:\n    runs-on: {{ lat: {tag} }}\n    steps: [{{ run: 'true' }}]\n"
    );
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        admin
            .writer
            .send(&AdminRequest::SubmitRun(SubmitRun {
                file_name: "latency.yml".into(),
                text: text.clone(),
                git_ref: "main".into(),
                commit: None,
                event: "manual".into(),
                inputs: Labels::new(),
                source: None,
            }))
            .await
            .expect("submit");
        let run = match admin.reader.recv::<AdminResponse>().await.expect("answer") {
            Some(AdminResponse::Run(r)) => r.run,
            other => panic!("submit: {other:?}"),
        };
        let stored = Instant::now();
        let (job, attempt) = agent
            .expect("the dispatch", DEADLINE, |m| {
                m.assignment()
                    .filter(|a| a.job.run == run)
                    .map(|a| (a.job, a.attempt))
            })
            .await;
        latencies.push(stored.elapsed());
        agent.send(AgentMessage::JobAccepted { job, attempt });
        agent.send(AgentMessage::JobFinished(JobResult {
            job,
            attempt,
            outcome: JobOutcome::Succeeded,
            log_chunks: 0,
            started_at: UnixMillis::now(),
            finished_at: UnixMillis::now(),
        }));
        agent
            .expect("the result's acknowledgement", DEADLINE, |m| match m {
                CoordinatorMessage::JobFinishedAck { job: j, .. } if *j == job => Some(()),
                _ => None,
            })
            .await;
    }
    latencies
}

/// The `p` quantile (0..=1) of `samples`.
pub fn quantile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(idx.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// An enrollment with a well-formed join token no coordinator issued, and a valid CSR.
fn forged_enrollment() -> Intent {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr");
    Intent::Enroll(EnrollRequest {
        token_id: TokenId::parse("tk-00000000deadbeef").expect("token id"),
        token_secret: "0".repeat(64),
        csr_der: csr.der().to_vec(),
        hostname: "storm".into(),
        labels: Labels::new(),
    })
}

/// How storm clients behave once their TLS handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StormKind {
    /// Open the control stream and say nothing, until cut off.
    Silent,
    /// Send an admin hello without a certificate, read the refusal, go again.
    Hello,
    /// Enroll with a well-formed join token this coordinator never issued (and a valid
    /// CSR), read the refusal, go again.
    Enroll,
}

/// Clients without certificates connecting over and over until dropped.
#[derive(Debug)]
pub struct Storm {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    handshakes: Arc<AtomicU64>,
    refusals: Arc<AtomicU64>,
}

impl Drop for Storm {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Storm {
    /// Starts `clients` storm clients of `kind` against `address`.
    pub fn start(address: &str, ca_der: &[u8], clients: usize, kind: StormKind) -> Self {
        let handshakes = Arc::new(AtomicU64::new(0));
        let refusals = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let address = address.to_owned();
                let tls = ClientTls::anonymous(ca_der).expect("tls");
                let (handshakes, refusals) = (handshakes.clone(), refusals.clone());
                let enroll = forged_enrollment();
                tokio::spawn(async move {
                    let Ok(dialer) = Dialer::new(tls, false) else {
                        return;
                    };
                    loop {
                        let Ok(conn) = dialer.connect(&address, Duration::from_secs(10)).await
                        else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        handshakes.fetch_add(1, Ordering::Relaxed);
                        let Ok((mut writer, mut reader)) = conn.open_control().await else {
                            continue;
                        };
                        match kind {
                            StormKind::Silent => {
                                // Nothing is sent; the stream opens with the first byte.
                                let _ = writer.send_frame(&[]).await;
                                let _ = conn.closed().await;
                            }
                            StormKind::Hello | StormKind::Enroll => {
                                let hello = if kind == StormKind::Hello {
                                    Intent::Admin(AdminHello {
                                        client_version: "storm".into(),
                                    })
                                } else {
                                    enroll.clone()
                                };
                                let Ok(frame) =
                                    gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES)
                                else {
                                    return;
                                };
                                if writer.send_frame(&frame).await.is_ok() {
                                    if let Ok(Some(HelloReply::Refused(_))) =
                                        reader.recv::<HelloReply>().await
                                    {
                                        refusals.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                conn.close(gantry_protocol::CloseCode::Normal, "storm");
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            tasks,
            handshakes,
            refusals,
        }
    }

    /// Handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Hellos refused so far.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

/// Connection attempts that never finish: each is one real QUIC Initial packet (made by
/// quinn-proto, so the coordinator accepts it as a new connection), sent from one UDP
/// socket whose replies are only counted, never answered. Every attempt the coordinator
/// takes on holds a handshake slot until its handshake deadline; one it answers with a
/// Retry holds nothing. Sends `per_round` attempts every 100 ms until dropped.
#[derive(Debug)]
pub struct HalfOpen {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    sent: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl HalfOpen {
    pub fn start(address: &str, ca_der: &[u8], per_round: usize) -> Self {
        let server: std::net::SocketAddr = address.parse().expect("coordinator address");
        let tls = ClientTls::anonymous(ca_der).expect("tls");
        let crypto =
            quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
        let config = quinn_proto::ClientConfig::new(Arc::new(crypto));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sent, retries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (stop, sent, retries) = (stop.clone(), sent.clone(), retries.clone());
            std::thread::spawn(move || {
                let mut datagram = Vec::new();
                let mut reply = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    // A fresh endpoint per round: the attempts are never driven, so
                    // nothing of them needs to be kept.
                    let mut endpoint = quinn_proto::Endpoint::new(
                        Arc::new(quinn_proto::EndpointConfig::default()),
                        None,
                        false,
                        None,
                    );
                    for _ in 0..per_round {
                        let now = Instant::now();
                        let Ok((_, mut conn)) = endpoint.connect(
                            now,
                            config.clone(),
                            server,
                            gantry_protocol::COORDINATOR_SERVER_NAME,
                        ) else {
                            continue;
                        };
                        datagram.clear();
                        if let Some(t) = conn.poll_transmit(now, 1, &mut datagram) {
                            if socket.send_to(&datagram[..t.size], server).is_ok() {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    // Replies are read (and Retry packets counted) until the next round:
                    // a long header whose type bits say Retry (QUIC v1, RFC 9000 17.2.5).
                    let round_ends = Instant::now() + Duration::from_millis(100);
                    while Instant::now() < round_ends {
                        if let Ok(n) = socket.recv(&mut reply) {
                            if n > 0 && reply[0] & 0xf0 == 0xf0 {
                                retries.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            sent,
            retries,
        }
    }

    /// Initial packets sent so far (each a connection attempt).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Retry packets the coordinator answered with so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}
