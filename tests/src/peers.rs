//! Protocol peers that misbehave on purpose, for the tests of what Gantry refuses:
//! a raw agent that holds a real job attempt and then tries what an attacker would, and
//! a fake coordinator that serves hostile manifests and chunks to the real CLI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gantry_certs::{CertAuthority, ClientTls, RevocationSet, ServerTls};
use gantry_protocol::{
    limits, AgentHello, AgentMessage, ArtifactView, ChunkFrame, ChunkWants, CoordinatorMessage,
    Digest, HelloReply, HostFigures, Intent, JobAssignment, JobId, Labels, ManifestFrame,
    ResolveReply, RunId, StreamOpen, UnixMillis, Welcome,
};
use gantry_transport::{Connection, Dialer, FrameReader, FrameWriter, Listener};
use tokio::sync::mpsc;

use crate::DEADLINE;

/// An agent speaking the protocol by hand with a real enrolled identity: it heartbeats,
/// takes dispatches when asked, and lets a test open any stream it likes.
#[derive(Debug)]
pub struct RawAgent {
    pub conn: Connection,
    _dialer: Dialer,
    to_coordinator: mpsc::UnboundedSender<AgentMessage>,
    from_coordinator: mpsc::UnboundedReceiver<CoordinatorMessage>,
    /// Messages received but not yet asked for by [`Self::expect`].
    backlog: Vec<CoordinatorMessage>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RawAgent {
    /// Connects with the identity of an agent enrolled into `agent_dir` (not running),
    /// reporting the label `raw=yes`.
    pub async fn connect(address: &str, agent_dir: &Path) -> Self {
        Self::connect_with_labels(
            address,
            agent_dir,
            Labels::from([("raw".to_owned(), "yes".to_owned())]),
        )
        .await
    }

    /// [`Self::connect`], reporting `labels`.
    pub async fn connect_with_labels(address: &str, agent_dir: &Path, labels: Labels) -> Self {
        Self::connect_as(
            address,
            agent_dir,
            labels,
            gantry_protocol::PROTOCOL_VERSION,
        )
        .await
    }

    /// [`Self::connect_with_labels`], saying hello as an agent of protocol `version`
    /// (to play an agent of an older release).
    pub async fn connect_as(address: &str, agent_dir: &Path, labels: Labels, version: u16) -> Self {
        let ca_pem = std::fs::read_to_string(agent_dir.join("tls/ca.pem")).expect("agent ca");
        let identity = std::fs::read_to_string(agent_dir.join("tls/agent.pem")).expect("agent pem");
        let ca_der = gantry_certs::pem_to_der(&ca_pem).expect("ca der");
        let tls = ClientTls::mutual(&ca_der, &identity, &identity).expect("tls");
        let dialer = Dialer::new(tls, false).expect("dialer");
        let conn = dialer
            .connect(address, Duration::from_secs(10))
            .await
            .expect("connect");
        let (mut writer, mut reader) = conn.open_control().await.expect("control");
        let hello = Intent::Agent(AgentHello {
            agent_version: "raw".into(),
            hostname: "raw-agent".into(),
            labels,
            capabilities: vec![],
            slots: 4,
            figures: HostFigures::default(),
            running: vec![],
            peer_port: None,
        });
        writer
            .send_frame(
                &gantry_protocol::hello::encode_hello_with_version(
                    version,
                    &hello,
                    limits::MAX_FRAME_BYTES,
                )
                .expect("hello"),
            )
            .await
            .expect("send hello");
        match reader.recv::<HelloReply>().await.expect("reply") {
            Some(HelloReply::Welcome(Welcome { .. })) => {}
            other => panic!("expected a welcome, got {other:?}"),
        }
        let (to_coordinator, mut outgoing) = mpsc::unbounded_channel::<AgentMessage>();
        let (incoming, from_coordinator) = mpsc::unbounded_channel();
        let reading = tokio::spawn(async move {
            while let Ok(Some(message)) = reader.recv::<CoordinatorMessage>().await {
                if incoming.send(message).is_err() {
                    return;
                }
            }
        });
        let writing = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                let message = tokio::select! {
                    _ = tick.tick() => AgentMessage::Heartbeat(HostFigures::default()),
                    m = outgoing.recv() => match m { Some(m) => m, None => return },
                };
                if writer.send(&message).await.is_err() {
                    return;
                }
            }
        });
        Self {
            conn,
            _dialer: dialer,
            to_coordinator,
            from_coordinator,
            backlog: Vec::new(),
            tasks: vec![reading, writing],
        }
    }

    /// Waits (within `deadline`) for the first message, kept or new, that `pick` takes;
    /// the others are kept for later calls.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        mut pick: impl FnMut(&CoordinatorMessage) -> Option<T>,
    ) -> T {
        if let Some(i) = self.backlog.iter().position(|m| pick(m).is_some()) {
            let message = self.backlog.remove(i);
            if let Some(v) = pick(&message) {
                return v;
            }
        }
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let message = tokio::time::timeout_at(until, self.from_coordinator.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out after {deadline:?} waiting for {what}; kept: {:?}",
                        self.backlog
                    )
                })
                .unwrap_or_else(|| panic!("the session ended while waiting for {what}"));
            if let Some(v) = pick(&message) {
                return v;
            }
            self.backlog.push(message);
        }
    }

    /// Waits for the next dispatch and accepts it.
    pub async fn accept_dispatch(&mut self) -> JobAssignment {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let message = tokio::time::timeout_at(deadline, self.from_coordinator.recv())
                .await
                .expect("a dispatch before the deadline")
                .expect("the session is open");
            if let Some(assignment) = message.assignment() {
                let assignment = assignment.clone();
                self.to_coordinator
                    .send(AgentMessage::JobAccepted {
                        job: assignment.job,
                        attempt: assignment.attempt,
                    })
                    .expect("send accept");
                return assignment;
            }
        }
    }

    /// Every message received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<CoordinatorMessage> {
        let mut messages = std::mem::take(&mut self.backlog);
        while let Ok(message) = self.from_coordinator.try_recv() {
            messages.push(message);
        }
        messages
    }

    /// Sends a message on the control stream.
    pub fn send(&self, message: AgentMessage) {
        self.to_coordinator.send(message).expect("send");
    }

    /// Opens a stream and sends its first frame.
    pub async fn stream(&self, open: &StreamOpen) -> (FrameWriter, FrameReader) {
        let (mut writer, reader) = self.conn.open_stream().await.expect("open stream");
        writer.send(open).await.expect("send open");
        (writer, reader)
    }
}

/// What a fake coordinator serves: one artifact's manifest bytes and the chunks it hands
/// out for each digest (compressed bytes and the size it claims), whatever they really
/// are.
#[derive(Debug, Clone)]
pub struct Served {
    pub manifest: Vec<u8>,
    pub chunks: HashMap<Digest, (u32, Vec<u8>)>,
}

/// A coordinator with its own CA that answers the admin CLI's artifact download with
/// whatever [`Served`] holds. Its admin context is written to `context`.
#[derive(Debug)]
pub struct FakeCoordinator {
    pub dir: tempfile::TempDir,
    pub context: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl FakeCoordinator {
    pub fn start(served: Served) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gantry-fake-")
            .tempdir()
            .expect("tempdir");
        let now = std::time::SystemTime::now();
        let ca = CertAuthority::create("fake", now).expect("ca");
        let (coordinator_cert, server_key) = ca.issue_coordinator(&[], now).expect("server cert");
        let (admin, admin_key) = ca.issue_admin("tester", now).expect("admin cert");
        let server_pem = format!("{}{server_key}", coordinator_cert.pem);
        let tls = ServerTls::config(
            ca.cert_der(),
            &server_pem,
            &server_pem,
            RevocationSet::default(),
        )
        .expect("server tls");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(async {
                Listener::bind(
                    "127.0.0.1:0".parse().expect("addr"),
                    tls,
                    b"fake coordinator reset key",
                )
            })
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("ca");
        std::fs::write(
            dir.path().join("admin.pem"),
            format!("{}{admin_key}", admin.pem),
        )
        .expect("admin");
        let context = dir.path().join("context.toml");
        std::fs::write(
            &context,
            format!("address = {address:?}\nca = \"ca.pem\"\ncredentials = \"admin.pem\"\n"),
        )
        .expect("context");
        let served = Arc::new(served);
        runtime.spawn(async move {
            while let Some(incoming) = listener.accept().await {
                let served = served.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.handshake(Duration::from_secs(10)).await else {
                        return;
                    };
                    let Ok((mut writer, mut reader)) =
                        conn.accept_control(Duration::from_secs(10)).await
                    else {
                        return;
                    };
                    if reader.recv_payload().await.is_err() {
                        return;
                    }
                    let welcome = HelloReply::Welcome(Welcome {
                        protocol_version: gantry_protocol::PROTOCOL_VERSION,
                        coordinator_version: "fake".into(),
                        identity: "gantry://admin/tester".into(),
                        heartbeat_interval_ms: 1000,
                    });
                    if writer.send(&welcome).await.is_err() {
                        return;
                    }
                    while let Ok((writer, reader)) = conn.accept_stream().await {
                        tokio::spawn(serve_stream(served.clone(), writer, reader));
                    }
                    drop(writer);
                });
            }
        });
        Self {
            dir,
            context,
            runtime: Some(runtime),
        }
    }
}

async fn serve_stream(served: Arc<Served>, mut writer: FrameWriter, mut reader: FrameReader) {
    let Ok(Some(open)) = reader.recv::<StreamOpen>().await else {
        return;
    };
    let digest = Digest::of(&served.manifest);
    let _ = match open {
        StreamOpen::Resolve(_) => {
            let view = ArtifactView {
                run: RunId(1),
                job: JobId {
                    run: RunId(1),
                    index: 0,
                },
                job_name: "build".into(),
                name: "app".into(),
                manifest: digest,
                bytes: 0,
                files: 0,
                chunks: 0,
                created_at: UnixMillis::now(),
                expires_at: UnixMillis::now().plus_secs(3600),
            };
            writer.send(&ResolveReply::Artifacts(vec![view])).await
        }
        StreamOpen::GetManifest { .. } => {
            async {
                writer
                    .send(&ManifestFrame::Start {
                        bytes: served.manifest.len() as u64,
                    })
                    .await?;
                writer
                    .send(&ManifestFrame::Piece(served.manifest.clone()))
                    .await
            }
            .await
        }
        StreamOpen::FetchChunks { .. } => {
            async {
                while let Some(ChunkWants(digests)) = reader.recv().await? {
                    for d in digests {
                        let frame = match served.chunks.get(&d) {
                            Some((size, data)) => ChunkFrame::Data {
                                digest: d,
                                size: *size,
                                data: data.clone(),
                            },
                            None => ChunkFrame::Unavailable {
                                digest: d,
                                reason: "the fake has no such chunk".into(),
                            },
                        };
                        writer.send(&frame).await?;
                    }
                }
                Ok(())
            }
            .await
        }
        _ => Ok(()),
    };
    writer.finish();
}
