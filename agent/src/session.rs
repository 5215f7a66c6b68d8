//! `gantry-agent run`: the long-lived session with the coordinator.
//!
//! One loop: connect with the agent's certificate, say hello, then heartbeat at the
//! interval the coordinator asks for while reading its messages; renew the certificate
//! over the live session when it is due; on any failure wait a jittered, growing delay
//! and connect again. It stops for good only on a signal (exit 0) or when the coordinator
//! says this agent is revoked. The decisions are made by the pure functions in
//! [`crate::base::backoff`], [`crate::base::renewal`] and [`classify_error`]; this module does the I/O.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_certs::{Identity, IdentityError};
use gantry_protocol::{
    limits, AgentHello, AgentId, AgentMessage, CloseCode, CoordinatorMessage, HelloReply, Intent,
    Labels, RefusalReason, UnixMillis, Welcome,
};
use gantry_transport::{Connection, Dialer, FrameReader, FrameWriter, Profile, TransportError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::base::backoff::{self, next_delay};
use crate::base::datadir::{self, Credentials, DataDir, DataDirError};
use crate::base::figures::{FiguresError, HostSampler};
use crate::base::renewal::RenewalPlan;
use crate::jobs::JobManager;
use crate::runner::isolation::Isolation;
use crate::transfers::peers::PeerError;
use crate::transfers::TransferLink;

/// How long the QUIC/TLS handshake may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// How long the close frame gets to go out on shutdown before the process exits.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data_dir: PathBuf,
    /// `--label` flags; they win over the labels saved at enrollment.
    pub labels: Labels,
    pub slots: u32,
    pub max_backoff: Duration,
    pub hostname: String,
    pub capabilities: Vec<String>,
    /// Quota of the local chunk cache, in bytes.
    pub cache_bytes: u64,
    /// Streams one artifact or cache transfer uses at once.
    pub transfer_streams: usize,
    /// A cap on artifact and cache traffic, in bytes per second.
    pub max_transfer_rate: Option<u64>,
    /// Where deployed apps live (`<root>/<app>/releases/...`).
    pub deploy_root: PathBuf,
    /// Where the other hosts of a deployment fetch release chunks from this one; `None`
    /// serves no peers.
    pub peer_listen: Option<std::net::SocketAddr>,
    /// How jobs are kept from the agent and from each other.
    pub isolation: crate::runner::isolation::Isolation,
}

/// Why `run` stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("the enrolled certificate is unreadable: {0}")]
    Certificate(#[from] CertificateError),
    #[error("this agent was revoked by the coordinator; enroll it again with a new token")]
    Revoked,
    #[error(transparent)]
    Figures(#[from] FiguresError),
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
    #[error("{0}; pick another --peer-listen address, or --peer-listen off")]
    Peers(PeerError),
    #[error("cannot open the chunk cache in {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make the data directory safe for isolated jobs: {0}")]
    Seal(std::io::Error),
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::DataDir(e) => e.exit_code(),
            Self::Certificate(_) | Self::Peers(_) => crate::base::exit::USAGE,
            Self::Revoked => crate::base::exit::COORDINATOR,
            Self::Figures(_) | Self::Signals(_) | Self::Cache { .. } | Self::Seal(_) => {
                crate::base::exit::FAILURE
            }
        }
    }
}

/// Why a certificate's PEM cannot be read as one, or its validity found.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error(transparent)]
    Pem(#[from] gantry_certs::TlsError),
    #[error(transparent)]
    Parse(#[from] IdentityError),
}

/// Why a renewed certificate the coordinator sent is not installed (the agent keeps
/// the one it has and asks again).
#[derive(Debug, thiserror::Error)]
enum RenewalError {
    #[error("no renewal request is pending")]
    NotPending,
    #[error(transparent)]
    Unreadable(#[from] CertificateError),
    #[error("it names {0}, not this agent")]
    NotThisAgent(String),
    /// The certificate does not go with the pending key (or the CA): building the TLS
    /// configuration checks that.
    #[error(transparent)]
    Tls(gantry_certs::TlsError),
    #[error(transparent)]
    Save(#[from] DataDirError),
}

/// How a failed step should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The coordinator refuses this agent's identity: stop, do not retry.
    Revoked,
    /// Anything else: retry after a backoff delay.
    Retry,
}

/// Classifies a transport error. A revoked certificate shows either as an application
/// close with [`CloseCode::Revoked`] (revoked during a live session) or, when the
/// coordinator's TLS verifier refuses it during the handshake, as a TLS alert whose text
/// names the revocation; application closes with any other code never count as revoked,
/// whatever their reason text says.
pub fn classify_error(err: &TransportError) -> ErrorClass {
    let revoked = match err.close_code() {
        Some(code) => code == CloseCode::Revoked,
        None => err.to_string().to_lowercase().contains("revoked"),
    };
    if revoked {
        ErrorClass::Revoked
    } else {
        ErrorClass::Retry
    }
}

/// How one session ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    Revoked,
    /// Retry; `healthy` says it lasted long enough to reset the backoff.
    Failed {
        reason: String,
        healthy: bool,
    },
}

/// A message from the reader task.
enum Inbound {
    Message(CoordinatorMessage),
    Ended,
    Failed(TransportError),
}

/// Runs the agent until a signal or a revocation.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let data_dir = DataDir::new(&options.data_dir);
    let enrollment = data_dir.load()?;
    let (not_before, not_after) = validity(&enrollment.credentials)?;
    let labels = crate::base::labels::merge([
        &crate::base::labels::automatic(&options.hostname),
        &enrollment.config.labels,
        &options.labels,
    ]);
    let sampler = HostSampler::new(&options.data_dir)?;
    let shutdown = shutdown_signal()?;
    let transfers = crate::transfers::transfers(
        &options.data_dir,
        options.cache_bytes,
        options.transfer_streams,
        options.max_transfer_rate,
    )
    .map_err(|source| RunError::Cache {
        path: options.data_dir.join("cache"),
        source,
    })?;
    let peers = crate::transfers::peers::PeerService::start(
        options.data_dir.clone(),
        options.peer_listen,
        transfers.cache.clone(),
        transfers.send_options.limit.clone(),
    )
    .map_err(RunError::Peers)?;
    match &options.isolation {
        Isolation::Users { cgroups, .. } => {
            crate::jobs::seal_data_dir(&options.data_dir).map_err(RunError::Seal)?;
            if let Some(cgroups) = cgroups {
                cgroups.sweep();
            }
            info!("{}", options.isolation.describe());
        }
        Isolation::Off | Isolation::Unavailable(_) => warn!("{}", options.isolation.describe()),
    }
    // What a previous run of this agent left in Docker (it died mid-job) goes before
    // any job runs.
    crate::runner::services::sweep(enrollment.config.agent_id.as_str()).await;
    let (jobs, finished) = JobManager::new(
        &options.data_dir,
        options.slots,
        transfers.clone(),
        options.isolation.clone(),
        enrollment.config.agent_id.as_str(),
    );
    let (deploy_out, deploy_results) = mpsc::unbounded_channel();
    let upgrader = crate::deploy::upgrade::Upgrader::new(
        options.data_dir.clone(),
        jobs.clone(),
        std::sync::Arc::new(jobs.clone()),
    );
    let deployer = crate::deploy::Deployer::new(
        options.deploy_root.clone(),
        transfers,
        labels.clone(),
        std::sync::Arc::new(jobs.clone()),
        deploy_out,
        upgrader,
        peers.clone(),
    );
    let mut runner = Runner {
        agent_id: enrollment.config.agent_id,
        address: enrollment.config.coordinator_address,
        labels,
        options,
        data_dir,
        credentials: enrollment.credentials,
        renewal: RenewalPlan::new(not_before, not_after),
        pending_key: None,
        sampler,
        shutdown,
        jobs,
        finished,
        deployer,
        deploy_results,
        peers,
    };
    runner.run().await
}

struct Runner {
    agent_id: AgentId,
    address: String,
    labels: Labels,
    options: RunOptions,
    data_dir: DataDir,
    credentials: Credentials,
    renewal: RenewalPlan,
    /// The key of the last renewal request, waiting for its certificate.
    pending_key: Option<String>,
    sampler: HostSampler,
    shutdown: watch::Receiver<bool>,
    jobs: JobManager,
    /// Results of jobs that ended, to report (and re-report until acknowledged).
    finished: mpsc::UnboundedReceiver<crate::jobs::Report>,
    deployer: crate::deploy::Deployer,
    /// Deployment results and exec output, to send (a result lost with a connection is
    /// asked for again: the coordinator resends the step).
    deploy_results: mpsc::UnboundedReceiver<AgentMessage>,
    /// Serves release chunks to the other hosts of a deployment; its port goes in the
    /// hello.
    peers: crate::transfers::peers::PeerService,
}

impl Runner {
    async fn run(&mut self) -> Result<(), RunError> {
        let mut attempt: u32 = 0;
        loop {
            match self.session().await {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Revoked => return Err(RunError::Revoked),
                SessionEnd::Failed { reason, healthy } => {
                    if healthy {
                        attempt = 0;
                    }
                    let delay = next_delay(
                        attempt,
                        backoff::BASE_DELAY,
                        self.options.max_backoff,
                        fastrand::f64(),
                    );
                    attempt = attempt.saturating_add(1);
                    warn!(
                        address = %self.address,
                        attempt,
                        "connection to the coordinator failed: {reason}; reconnecting in {} ms",
                        delay.as_millis()
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = wait_for_shutdown(&mut self.shutdown) => return Ok(()),
                    }
                }
            }
        }
    }

    /// One connection, from dialing to its end.
    async fn session(&mut self) -> SessionEnd {
        let ipv6 = match gantry_transport::resolve(&self.address) {
            Ok(addr) => addr.is_ipv6(),
            Err(e) => {
                return SessionEnd::Failed {
                    reason: e.to_string(),
                    healthy: false,
                }
            }
        };
        // The session's connection with small limits (it is what the coordinator holds
        // for each agent); transfers get a connection of their own with bulk limits.
        let dialers = self
            .credentials
            .dialer(ipv6, Profile::Control)
            .and_then(|d| Ok((d, self.credentials.dialer(ipv6, Profile::Transfers)?)));
        let (dialer, transfer_dialer) = match dialers {
            Ok(d) => d,
            Err(e) => {
                return SessionEnd::Failed {
                    reason: e.to_string(),
                    healthy: false,
                }
            }
        };
        let link = Arc::new(TransferLink::new(transfer_dialer, self.address.clone()));
        let mut shutdown = self.shutdown.clone();
        let opened = tokio::select! {
            opened = self.open(&dialer) => opened,
            () = wait_for_shutdown(&mut shutdown) => return SessionEnd::Shutdown,
        };
        let (conn, writer, reader, welcome) = match opened {
            Ok(opened) => opened,
            Err(end) => return end,
        };
        info!(address = %self.address, agent_id = %self.agent_id, "connected to {} as {}", self.address, self.agent_id);
        let welcomed_at = Instant::now();
        let end = self.live(&conn, link, writer, reader, &welcome).await;
        self.jobs.detach();
        if matches!(end, SessionEnd::Shutdown) {
            conn.close(CloseCode::Normal, "agent shutting down");
        }
        // Lets the close frame (ours or an acknowledgement of theirs) go out.
        dialer.shutdown(CLOSE_GRACE).await;
        match end {
            SessionEnd::Failed { reason, .. } => SessionEnd::Failed {
                reason,
                healthy: welcomed_at.elapsed() > backoff::HEALTHY_SESSION,
            },
            other => other,
        }
    }

    /// Connects, opens the control stream, says hello and reads the welcome.
    async fn open(
        &mut self,
        dialer: &Dialer,
    ) -> Result<(Connection, FrameWriter, FrameReader, Welcome), SessionEnd> {
        let failed = |e: &TransportError| match classify_error(e) {
            ErrorClass::Revoked => SessionEnd::Revoked,
            ErrorClass::Retry => SessionEnd::Failed {
                reason: e.to_string(),
                healthy: false,
            },
        };
        let conn = dialer
            .connect(&self.address, CONNECT_DEADLINE)
            .await
            .map_err(|e| failed(&e))?;
        let hello = Intent::Agent(AgentHello {
            // The version and which build of it: a fleet upgrade names binaries by digest.
            agent_version: match crate::deploy::upgrade::own_sha256() {
                Ok(sha) => format!("{} ({})", env!("CARGO_PKG_VERSION"), &sha[..12]),
                Err(_) => env!("CARGO_PKG_VERSION").to_owned(),
            },
            hostname: self.options.hostname.clone(),
            labels: self.labels.clone(),
            capabilities: self.options.capabilities.clone(),
            slots: self.options.slots,
            figures: self.sampler.sample(),
            running: self.jobs.running(),
            peer_port: self.peers.port(),
        });
        let opened = async {
            let (mut writer, mut reader) = conn.open_control().await?;
            let frame = gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES)?;
            writer.send_frame(&frame).await?;
            let reply = reader
                .recv_within::<HelloReply>(limits::HANDSHAKE_DEADLINE, "the coordinator's welcome")
                .await?;
            Ok::<_, TransportError>((writer, reader, reply))
        }
        .await;
        let (writer, reader, reply) = match opened {
            Ok(opened) => opened,
            // A stream error right after the handshake may be the TLS refusal arriving
            // late: the connection's own close reason is the better explanation.
            Err(e) => return Err(failed(&conn.close_reason().unwrap_or(e))),
        };
        match reply {
            Some(HelloReply::Welcome(welcome)) => {
                crate::deploy::upgrade::confirm(&self.options.data_dir);
                Ok((conn, writer, reader, welcome))
            }
            Some(HelloReply::Refused(refusal)) if refusal.reason == RefusalReason::Revoked => {
                Err(SessionEnd::Revoked)
            }
            Some(HelloReply::Refused(refusal)) => Err(SessionEnd::Failed {
                reason: format!("refused ({:?}): {}", refusal.reason, refusal.message),
                healthy: false,
            }),
            Some(HelloReply::Enrolled(_)) => {
                conn.close(CloseCode::Malformed, "expected a welcome");
                Err(SessionEnd::Failed {
                    reason: "the coordinator answered with an enrollment".into(),
                    healthy: false,
                })
            }
            None => Err(match conn.close_reason() {
                Some(e) => failed(&e),
                None => SessionEnd::Failed {
                    reason: "the coordinator ended the stream without a welcome".into(),
                    healthy: false,
                },
            }),
        }
    }

    /// The welcomed session: heartbeats, renewals, and the coordinator's messages.
    async fn live(
        &mut self,
        conn: &Connection,
        link: Arc<TransferLink>,
        mut writer: FrameWriter,
        reader: FrameReader,
        welcome: &Welcome,
    ) -> SessionEnd {
        let interval = match welcome.heartbeat_interval_ms {
            0 => limits::DEFAULT_HEARTBEAT_INTERVAL,
            ms => Duration::from_millis(ms),
        };
        // The hello carried fresh figures, so the first heartbeat waits one interval.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (inbound_tx, mut inbound) = mpsc::channel(8);
        // Reading runs in its own task because a frame read is not cancel-safe: dropping
        // it half way inside select! would lose the bytes already read.
        let reader_task = AbortOnDrop(tokio::spawn(read_messages(reader, inbound_tx)));
        // Renewal may already be due (e.g. after a long outage): ask at once.
        if let Err(e) = self.maybe_renew(&mut writer).await {
            return transport_end(conn, &e);
        }
        // Logs resume on this connection; results not yet acknowledged are sent again.
        for report in self.jobs.attach(conn, Some(link)) {
            if let Err(e) = writer.send(&report.message()).await {
                return transport_end(conn, &e);
            }
        }
        let mut shutdown = self.shutdown.clone();
        let end = loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let figures = self.sampler.sample();
                    if let Err(e) = writer.send(&AgentMessage::Heartbeat(figures)).await {
                        break transport_end(conn, &e);
                    }
                    if let Err(e) = self.maybe_renew(&mut writer).await {
                        break transport_end(conn, &e);
                    }
                }
                message = self.deploy_results.recv() => {
                    if let Some(message) = message {
                        if let Err(e) = writer.send(&message).await {
                            break transport_end(conn, &e);
                        }
                    }
                }
                report = self.finished.recv() => {
                    if let Some(report) = report {
                        if let Err(e) = writer.send(&report.message()).await {
                            break transport_end(conn, &e);
                        }
                    }
                }
                inbound = inbound.recv() => match inbound {
                    Some(Inbound::Message(message)) => {
                        if let Some(reply) = self.handle(message) {
                            if let Err(e) = writer.send(&reply).await {
                                break transport_end(conn, &e);
                            }
                        }
                    }
                    Some(Inbound::Failed(e)) => break transport_end(conn, &e),
                    Some(Inbound::Ended) | None => {
                        break match conn.close_reason() {
                            Some(e) => transport_end(conn, &e),
                            None => SessionEnd::Failed { reason: "the coordinator ended the control stream".into(), healthy: false },
                        };
                    }
                },
                () = wait_for_shutdown(&mut shutdown) => break SessionEnd::Shutdown,
            }
        };
        drop(reader_task);
        end
    }

    /// Sends a renewal request if the certificate is due and none went out recently.
    async fn maybe_renew(&mut self, writer: &mut FrameWriter) -> Result<(), TransportError> {
        let now = UnixMillis::now();
        if !self.renewal.should_request(now) {
            return Ok(());
        }
        let key = match gantry_certs::generate_key_and_csr() {
            Ok(key) => key,
            Err(e) => {
                // Recorded as an attempt so a broken key generator is retried once a minute.
                self.renewal.requested(now);
                warn!("cannot generate a key for certificate renewal: {e}");
                return Ok(());
            }
        };
        writer
            .send(&AgentMessage::RenewCertificate {
                csr_der: key.csr_der,
            })
            .await?;
        self.renewal.requested(now);
        self.pending_key = Some(key.key_pem);
        info!(
            not_after = self.renewal.not_after.0,
            "certificate due for renewal; sent a new CSR"
        );
        Ok(())
    }

    /// Acts on one coordinator message; returns the reply to send, if any.
    fn handle(&mut self, message: CoordinatorMessage) -> Option<AgentMessage> {
        match message {
            CoordinatorMessage::Dispatch(assignment) => {
                return self.handle(CoordinatorMessage::DispatchJob {
                    assignment,
                    execution: Box::default(),
                });
            }
            CoordinatorMessage::DispatchJob {
                assignment,
                execution,
            } => {
                let (job, attempt) = (assignment.job, assignment.attempt);
                if let Some(reason) = crate::jobs::unsupported(&execution) {
                    warn!(%job, attempt, "rejecting job: {reason}");
                    return Some(AgentMessage::JobRejected {
                        job,
                        attempt,
                        reason,
                    });
                }
                return Some(match self.jobs.start(*assignment, *execution) {
                    Ok(()) => AgentMessage::JobAccepted { job, attempt },
                    Err(reason) => {
                        warn!(%job, attempt, "rejecting job: {reason}");
                        AgentMessage::JobRejected {
                            job,
                            attempt,
                            reason: reason.to_string(),
                        }
                    }
                });
            }
            CoordinatorMessage::Cancel { job, attempt } => self.jobs.cancel(job, attempt),
            CoordinatorMessage::JobFinishedAck { job, attempt } => {
                self.jobs.result_acked(job, attempt);
            }
            CoordinatorMessage::CertificateRenewed {
                certificate_pem,
                not_after,
            } => {
                if let Err(reason) = self.install_renewed(&certificate_pem) {
                    warn!("ignoring renewed certificate (valid until {not_after:?}): {reason}");
                }
            }
            CoordinatorMessage::Deploy(command) => self.deployer.deploy(*command),
            CoordinatorMessage::Exec(command) => self.deployer.exec(command),
            CoordinatorMessage::RenewalRefused { message } => {
                // The renewal plan already waits a minute before the next request.
                warn!("certificate renewal refused: {message}; retrying in at most a minute");
            }
            CoordinatorMessage::Refused { message } => {
                // Work this agent no longer holds (e.g. a job given to another agent
                // meanwhile); nothing was done with the message.
                warn!("the coordinator refused a message: {message}");
            }
        }
        None
    }

    /// Checks a renewed certificate against the pending key and our identity, writes it
    /// with the key atomically, and uses it from the next connection on.
    fn install_renewed(&mut self, certificate_pem: &str) -> Result<(), RenewalError> {
        let key_pem = self
            .pending_key
            .as_deref()
            .ok_or(RenewalError::NotPending)?;
        let credentials = Credentials {
            ca_der: self.credentials.ca_der.clone(),
            identity_pem: datadir::identity_pem(certificate_pem, key_pem),
        };
        let der = credentials.cert_der().map_err(CertificateError::from)?;
        match Identity::from_cert_der(&der).map_err(CertificateError::from)? {
            Identity::Agent(id) if id == self.agent_id => {}
            other => return Err(RenewalError::NotThisAgent(other.uri())),
        }
        // Building the TLS config checks the certificate against the pending key.
        gantry_certs::ClientTls::mutual(
            &credentials.ca_der,
            &credentials.identity_pem,
            &credentials.identity_pem,
        )
        .map_err(RenewalError::Tls)?;
        let (not_before, not_after) = validity(&credentials)?;
        self.data_dir.write_identity(&credentials.identity_pem)?;
        self.credentials = credentials;
        self.pending_key = None;
        self.renewal.renewed(not_before, not_after);
        info!(
            not_after = not_after.0,
            "certificate renewed, valid until {}",
            not_after.to_rfc3339()
        );
        Ok(())
    }
}

/// Maps an error on a live session to how the session ends.
fn transport_end(conn: &Connection, err: &TransportError) -> SessionEnd {
    // A write can fail with a generic "connection lost" while the connection itself
    // recorded the peer's close code; prefer the latter.
    let err = conn.close_reason().unwrap_or_else(|| err.clone());
    match classify_error(&err) {
        ErrorClass::Revoked => SessionEnd::Revoked,
        ErrorClass::Retry => SessionEnd::Failed {
            reason: err.to_string(),
            healthy: false,
        },
    }
}

/// Forwards control-stream messages to the session until the stream ends or fails.
async fn read_messages(mut reader: FrameReader, to_session: mpsc::Sender<Inbound>) {
    loop {
        let inbound = match reader.recv::<CoordinatorMessage>().await {
            Ok(Some(message)) => Inbound::Message(message),
            Ok(None) => Inbound::Ended,
            Err(e) => Inbound::Failed(e),
        };
        let last = !matches!(inbound, Inbound::Message(_));
        if to_session.send(inbound).await.is_err() || last {
            return;
        }
    }
}

/// Aborts a task when the session that owns it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn validity(credentials: &Credentials) -> Result<(UnixMillis, UnixMillis), CertificateError> {
    let der = credentials.cert_der()?;
    Ok(gantry_certs::cert_validity(&der)?)
}

/// Turns SIGTERM and SIGINT into a watch flag every wait in the session can select on.
fn shutdown_signal() -> Result<watch::Receiver<bool>, RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => debug!("SIGTERM received"),
            _ = interrupt.recv() => debug!("SIGINT received"),
        }
        info!("shutting down");
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Resolves once shutdown was asked for (or can no longer be signalled).
async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after it sent `true`.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_is_recognised_only_where_it_is_meant() {
        let revoked_close = TransportError::ClosedByPeer {
            code: "Revoked".into(),
            close_code: Some(5),
            reason: "agent revoked".into(),
        };
        assert_eq!(classify_error(&revoked_close), ErrorClass::Revoked);
        let tls_alert = TransportError::Connect {
            address: "127.0.0.1:7443".into(),
            detail: "aborted by peer: the cryptographic handshake failed: error 44: invalid peer certificate: Revoked".into(),
        };
        assert_eq!(classify_error(&tls_alert), ErrorClass::Revoked);
        let replaced = TransportError::ClosedByPeer {
            code: "Replaced".into(),
            close_code: Some(7),
            reason: "not revoked, replaced".into(),
        };
        assert_eq!(classify_error(&replaced), ErrorClass::Retry);
        let refused = TransportError::Connect {
            address: "127.0.0.1:1".into(),
            detail: "connection refused".into(),
        };
        assert_eq!(classify_error(&refused), ErrorClass::Retry);
        let shutting_down = TransportError::ClosedByPeer {
            code: "ShuttingDown".into(),
            close_code: Some(8),
            reason: String::new(),
        };
        assert_eq!(classify_error(&shutting_down), ErrorClass::Retry);
    }
}
