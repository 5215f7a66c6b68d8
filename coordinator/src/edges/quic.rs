//! The coordinator's QUIC server: accepting connections, reading the hello, and running
//! enrollment, agent sessions and admin sessions.
//!
//! What a connection may do depends only on the certificate it presented:
//! no certificate → enroll, nothing else; an agent certificate → an agent session;
//! an admin certificate → admin requests. Anything else is refused with a reason the
//! peer can show, and the connection closed with a [`CloseCode`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gantry_certs::{CertAuthority, Identity, JoinToken, RevocationSet};
use gantry_protocol::{
    limits, AdminError, AdminRequest, AdminResponse, AgentHello, AgentId, AgentMessage, AgentState,
    AgentView, AuditView, CloseCode, CoordinatorMessage, EnrollRequest, Enrolled, HelloError,
    HelloReply, HostFigures, Intent, JobId, Labels, Refusal, RefusalReason, StatusView, StreamOpen,
    TokenCreated, TokenId, UnixMillis, Welcome,
};
use gantry_scheduler::Event;
use gantry_transport::{Connection, FrameReader, FrameWriter, Incoming, Listener, TransportError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::base::authz::{Principal, Request};
use crate::base::logs::LogStore;
use crate::base::secrets::SecretKey;
use crate::deployments::AdminOp;
use crate::engine::{AgentOutbox, Engine, Input};
use crate::runs::{internal, invalid};

use crate::store::{
    AgentRecord, AuditEntry, EnvironmentRecord, HelloFacts, Presence, Store, StoreError,
    TokenRecord, TokenRefusal,
};

/// How often presence (last seen, figures) is written to the store. Presence is not an
/// acknowledgement, so batching it keeps 10,000 heartbeats/5 s from becoming 2,000 fsyncs/s.
pub const PRESENCE_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// How stale a connected agent's stored presence may become. Views of connected agents
/// read the registry, so the stored copy matters only after a crash (a departure and a
/// graceful shutdown write the exact figures). Rewriting every heard agent's record at
/// each flush was, with 10,000 agents, ~5,000 record rewrites a second for figures no
/// one reads (ARCHITECTURE.md, "Presence is stored once a minute").
pub const PRESENCE_PERSIST_INTERVAL: Duration = Duration::from_secs(60);
/// Handshakes in progress at once; more are refused until some finish (connection storms).
pub const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Longest join token lifetime and use count an admin may ask for.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
pub const MAX_TOKEN_USES: u32 = 100_000;
/// Longest close reason sent; QUIC close frames must fit in one packet.
const MAX_REASON_BYTES: usize = 400;

/// Settings the server runs with, from `coordinator.toml`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub advertise: String,
    pub agent_cert_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub artifacts: crate::base::config::ArtifactSettings,
    /// `agent_binary` from `coordinator.toml` (else found next to `gantry`).
    pub agent_binary: Option<std::path::PathBuf>,
    pub webhooks: crate::base::config::WebhookSettings,
}

/// Which presence [`Coordinator::flush_presence`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceFlush {
    /// Departures, new sessions, and connected agents not written for
    /// [`PRESENCE_PERSIST_INTERVAL`] (the periodic flush).
    Due,
    /// Everything not yet written (shutdown).
    Everything,
}

impl PresenceFlush {
    /// Whether a connected session's presence is written now: it changed (`dirty`), and
    /// it was never written (a new session: its hello facts), was last written
    /// [`PRESENCE_PERSIST_INTERVAL`] ago, or this is the shutdown flush.
    fn writes(self, dirty: bool, persisted_at: Option<Instant>, now: Instant) -> bool {
        let stale = persisted_at
            .is_none_or(|at| now.saturating_duration_since(at) >= PRESENCE_PERSIST_INTERVAL);
        dirty && (stale || self == PresenceFlush::Everything)
    }
}

/// A live agent session as the registry holds it.
#[derive(Debug)]
struct LiveSession {
    session: u64,
    conn: Connection,
    address: String,
    last_seen: UnixMillis,
    figures: Option<HostFigures>,
    hello: Option<HelloFacts>,
    /// Hostname and labels (reported and assigned) as of the hello, for deployments.
    hostname: String,
    labels: Labels,
    /// Where the other hosts of a deployment reach this agent's peer listener: the
    /// address this session comes from, with the port the hello named.
    peer_address: Option<String>,
    /// Presence changed since it was last written to the store.
    dirty: bool,
    /// When this session's presence was last written (`None`: not yet).
    persisted_at: Option<Instant>,
    /// A heartbeat arrived since the last flush: its leases are due for renewal.
    heard: bool,
    /// Messages for the agent (dispatches, cancels, acknowledgements), sent in order.
    outbound: mpsc::UnboundedSender<CoordinatorMessage>,
}

/// Live agent sessions by agent id, and presence not yet written to the store.
#[derive(Debug, Default)]
struct Registry {
    live: HashMap<AgentId, LiveSession>,
    departed: Vec<Presence>,
}

/// The coordinator's shared state.
#[derive(Debug)]
pub struct Coordinator {
    pub(crate) store: Arc<Store>,
    ca: CertAuthority,
    revoked: RevocationSet,
    registry: Arc<Mutex<Registry>>,
    settings: Settings,
    started_at: Instant,
    next_session: AtomicU64,
    handshakes: Semaphore,
    /// Connections without a certificate waiting for their hello.
    unauthenticated: Semaphore,
    pub(crate) engine: Engine,
    pub(crate) logs: Arc<LogStore>,
    pub(crate) secret_key: Arc<SecretKey>,
    pub(crate) sources: Arc<crate::base::sources::SourceStore>,
    pub(crate) metrics: Arc<crate::base::metrics::Metrics>,
    pub(crate) artifacts: Arc<crate::artifacts::Artifacts>,
    /// Run and job events on their way to webhook targets (never waited on).
    pub(crate) notifier: Arc<crate::notify::Notifier>,
    pub(crate) webhooks: Arc<crate::webhooks::Webhooks>,
    /// Numbers connections, so an upload session is fed only by the connection that
    /// opened it.
    next_connection: AtomicU64,
    pub(crate) deployments: crate::deployments::Deployments,
    /// Ad-hoc commands in flight (`gantry exec`), by id.
    execs: Arc<crate::exec::Execs>,
}

/// The engine's and the deployments' way to reach agents and secrets.
struct Outbox {
    registry: Arc<Mutex<Registry>>,
    store: Arc<Store>,
    secret_key: Arc<SecretKey>,
    deployments: crate::deployments::Deployments,
    runner: AgentId,
}

impl Outbox {
    /// Values of the secrets named, among those `allowed` lets through by scope.
    fn open_secrets(&self, names: &[String], allowed: impl Fn(Option<&String>) -> bool) -> Labels {
        let mut out = Labels::new();
        if names.is_empty() {
            return out;
        }
        let scopes = match self.store.secret_scopes() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read secret scopes: {e}");
                return out;
            }
        };
        match self.store.secrets() {
            Ok(all) => {
                for (name, sealed) in all
                    .into_iter()
                    .filter(|(n, _)| names.contains(n) && allowed(scopes.get(n)))
                {
                    match self.secret_key.open(&name, &sealed) {
                        Ok(value) => {
                            out.insert(name, value);
                        }
                        Err(e) => tracing::error!("{e}"),
                    }
                }
            }
            Err(e) => tracing::error!("cannot read secrets: {e}"),
        }
        out
    }
}

impl AgentOutbox for Outbox {
    fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool {
        if *agent == self.runner {
            return self.deployments.route_from_scheduler(message);
        }
        lock(&self.registry)
            .live
            .get(agent)
            .is_some_and(|s| s.outbound.send(message).is_ok())
    }

    /// Jobs get only secrets scoped to no environment (a scoped one goes only to
    /// deployments to its environment; submission refuses jobs that name one).
    fn secrets(&self, names: &[String]) -> Labels {
        self.open_secrets(names, |scope| scope.is_none())
    }
}

impl crate::deployments::Fleet for Outbox {
    fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool {
        AgentOutbox::send(self, agent, message)
    }

    fn connected(&self) -> Vec<(AgentId, String, Labels)> {
        lock(&self.registry)
            .live
            .iter()
            .map(|(id, s)| (id.clone(), s.hostname.clone(), s.labels.clone()))
            .collect()
    }

    fn secrets_for(&self, environment: &str, names: &[String]) -> Labels {
        self.open_secrets(names, |scope| scope.is_none_or(|s| s == environment))
    }

    fn peer_address(&self, agent: &AgentId) -> Option<String> {
        lock(&self.registry)
            .live
            .get(agent)
            .and_then(|s| s.peer_address.clone())
    }
}

/// `ip:port` of an agent's peer listener, from the address its session comes from (an
/// IPv4 address seen through a dual-stack socket is written as IPv4, which is what the
/// other hosts dial).
fn peer_address(remote: std::net::SocketAddr, port: u16) -> String {
    let ip = match remote.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 @ std::net::IpAddr::V4(_) => v4,
    };
    std::net::SocketAddr::new(ip, port).to_string()
}

fn lock(m: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn truncate(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

impl Coordinator {
    /// `/metrics` in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let gauges = crate::base::metrics::Gauges {
            agents_connected: lock(&self.registry).live.len() as u64,
            agents_enrolled: self.store.counts(UnixMillis::now()).map_or(0, |c| c.agents),
        };
        self.metrics.render(gauges)
    }

    /// Whether the coordinator can serve: its store answers.
    pub fn ready(&self) -> bool {
        self.store.counts(UnixMillis::now()).is_ok()
    }

    /// The value of one stored secret (for the coordinator's own use, e.g. the webhook secret).
    pub fn outbox_secret(&self, name: &str) -> Option<String> {
        let sealed = self
            .store
            .secrets()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)?
            .1;
        self.secret_key.open(name, &sealed).ok()
    }

    /// Builds the coordinator and starts its engine (restoring the scheduler from the
    /// store). Must run inside the async runtime.
    pub fn new(
        store: Store,
        ca: CertAuthority,
        revoked: RevocationSet,
        settings: Settings,
        data_dir: &std::path::Path,
    ) -> Result<Self, String> {
        for id in store.revoked_agents().map_err(|e| e.to_string())? {
            revoked.insert(id);
        }
        let store = Arc::new(store);
        let secret_key = Arc::new(
            SecretKey::load_or_create(&data_dir.join("secrets.key")).map_err(|e| e.to_string())?,
        );
        let registry = Arc::new(Mutex::new(Registry::default()));
        let (deployments, deploy_inbox) = crate::deployments::Deployments::channel(store.clone());
        let outbox = Arc::new(Outbox {
            registry: registry.clone(),
            store: store.clone(),
            secret_key: secret_key.clone(),
            deployments: deployments.clone(),
            runner: crate::deployments::deploy_runner(),
        });
        let metrics = Arc::new(crate::base::metrics::Metrics::default());
        let engine = Engine::start(store.clone(), outbox.clone(), metrics.clone())?;
        let logs = Arc::new(LogStore::new(&data_dir.join("logs")));
        let notifier = Arc::new(crate::notify::Notifier::new(metrics.clone()));
        deployments.start(
            deploy_inbox,
            outbox,
            engine.clone(),
            logs.clone(),
            notifier.clone(),
            metrics.clone(),
        )?;
        crate::notify::watch_engine(engine.subscribe(), store.clone(), notifier.clone());
        let webhooks = crate::webhooks::Webhooks::start(
            store.clone(),
            secret_key.clone(),
            metrics.clone(),
            settings.webhooks.clone(),
            notifier.clone(),
        );
        let artifacts = Arc::new(
            crate::artifacts::Artifacts::open(
                store.clone(),
                &data_dir.join("cas"),
                settings.artifacts.clone(),
                metrics.clone(),
            )
            .map_err(|e| {
                format!(
                    "cannot open the chunk store in {}: {e}",
                    data_dir.join("cas").display()
                )
            })?,
        );
        Ok(Self {
            store,
            ca,
            revoked,
            registry,
            settings,
            started_at: Instant::now(),
            next_session: AtomicU64::new(1),
            handshakes: Semaphore::new(MAX_PENDING_HANDSHAKES),
            unauthenticated: Semaphore::new(limits::MAX_UNAUTHENTICATED_PENDING),
            engine,
            logs,
            sources: Arc::new(crate::base::sources::SourceStore::new(
                &data_dir.join("sources"),
            )),
            metrics,
            secret_key,
            artifacts,
            notifier,
            webhooks,
            next_connection: AtomicU64::new(1),
            deployments,
            execs: Arc::new(crate::exec::Execs::default()),
        })
    }

    /// Accepts connections until `shutdown` resolves, then closes them all and flushes presence.
    pub async fn serve(
        self: Arc<Self>,
        listener: Listener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let flusher = {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PRESENCE_FLUSH_INTERVAL);
                loop {
                    tick.tick().await;
                    // A commit (an fsync) must not hold up a worker thread: quinn's
                    // endpoint driver and the sessions run there.
                    let me = me.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || me.flush_presence(PresenceFlush::Due))
                            .await;
                }
            })
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = listener.accept() => {
                    let Some(incoming) = incoming else { break };
                    let me = self.clone();
                    tokio::spawn(async move { me.handle_incoming(incoming).await });
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: closing every connection");
        listener.close(
            CloseCode::ShuttingDown,
            "coordinator shutting down; reconnect shortly",
        );
        flusher.abort();
        self.flush_presence(PresenceFlush::Everything);
        let _ = tokio::time::timeout(Duration::from_secs(2), listener.wait_idle()).await;
    }

    /// Writes pending presence in one commit, and renews the leases of every agent heard
    /// from since the last flush. Failures are logged and retried next tick.
    ///
    /// Departures and new sessions (their hello facts) are written at the first flush; a
    /// connected agent's heartbeat figures at most every [`PRESENCE_PERSIST_INTERVAL`],
    /// unless `what` is [`PresenceFlush::Everything`] (shutdown).
    ///
    /// Heartbeats reach the scheduler from here, in one burst per flush (taken in
    /// batches of up to 512), rather than each on its own: with 10,000 agents that was
    /// 2,000 wake-ups of the engine a second for events that almost never change
    /// anything. A lease (30 s) is renewed at most one flush interval (2 s) late.
    pub fn flush_presence(&self, what: PresenceFlush) {
        let mut heard = Vec::new();
        let now = Instant::now();
        let batch = {
            let mut reg = lock(&self.registry);
            let mut batch = std::mem::take(&mut reg.departed);
            for (id, s) in &mut reg.live {
                if s.heard {
                    s.heard = false;
                    heard.push(id.clone());
                }
                if what.writes(s.dirty, s.persisted_at, now) {
                    s.dirty = false;
                    s.persisted_at = Some(now);
                    batch.push(Presence {
                        agent_id: id.clone(),
                        last_seen: s.last_seen,
                        address: s.address.clone(),
                        figures: s.figures.clone(),
                        hello: s.hello.take(),
                    });
                }
            }
            batch
        };
        for agent in heard {
            self.engine.event(Event::AgentHeartbeat { agent });
        }
        if let Err(e) = self.store.record_presence(&batch) {
            tracing::warn!(error = %e, agents = batch.len(), "could not record agent presence; will retry");
            lock(&self.registry).departed.extend(batch);
        }
    }

    async fn handle_incoming(self: Arc<Self>, incoming: Incoming) {
        let remote = incoming.remote_address();
        let Ok(handshake_slot) = self.handshakes.try_acquire() else {
            tracing::warn!(%remote, "refusing connection: {MAX_PENDING_HANDSHAKES} handshakes already in progress");
            incoming.refuse();
            return;
        };
        let started = Instant::now();
        let conn = match incoming.handshake(limits::HANDSHAKE_DEADLINE).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(%remote, error = %e, "handshake failed");
                return;
            }
        };
        // Past TLS, a connection without a certificate waits for its hello in a pool of
        // its own, so such connections can never hold every handshake slot.
        let unauthenticated_slot = if conn.peer_certificates().is_none() {
            if let Ok(slot) = self.unauthenticated.try_acquire() {
                Some(slot)
            } else {
                tracing::warn!(%remote, "refusing a connection without a certificate: {} are waiting for their hello", limits::MAX_UNAUTHENTICATED_PENDING);
                conn.close(
                    CloseCode::Busy,
                    "too many connections without a certificate are waiting; try again shortly",
                );
                return;
            }
        } else {
            None
        };
        drop(handshake_slot);
        let remaining = limits::HANDSHAKE_DEADLINE.saturating_sub(started.elapsed());
        let (mut writer, mut reader) = match conn.accept_control(remaining).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%remote, error = %e, "no control stream");
                conn.close(
                    CloseCode::Timeout,
                    "no control stream opened before the handshake deadline",
                );
                return;
            }
        };
        let remaining = limits::HANDSHAKE_DEADLINE.saturating_sub(started.elapsed());
        // Nothing about the peer is known yet: its hello gets a small buffer.
        reader.set_limit(limits::MAX_HELLO_BYTES);
        let payload = match tokio::time::timeout(remaining, reader.recv_payload()).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                close_for(&conn, &e);
                return;
            }
            Err(_) => {
                conn.close(CloseCode::Timeout, "no hello before the handshake deadline");
                return;
            }
        };
        drop(unauthenticated_slot);
        reader.set_limit(limits::MAX_FRAME_BYTES);
        let hello = match gantry_protocol::decode_hello(&payload) {
            Ok(h) => h,
            Err(HelloError::UnsupportedVersion { theirs, min, max }) => {
                let msg = format!(
                    "unsupported protocol version {theirs}: this coordinator (gantry {}) speaks versions {min}..={max}; install a matching gantry-agent",
                    env!("CARGO_PKG_VERSION")
                );
                tracing::info!(%remote, "{msg}");
                refuse(
                    &conn,
                    &mut writer,
                    CloseCode::UnsupportedVersion,
                    RefusalReason::UnsupportedVersion,
                    msg,
                )
                .await;
                return;
            }
            Err(e) => {
                tracing::info!(%remote, error = %e, "bad hello");
                conn.close(CloseCode::Malformed, truncate(&e.to_string()));
                return;
            }
        };
        let identity = conn
            .peer_certificates()
            .map(|chain| Identity::from_cert_der(&chain[0]));
        // What the connection may do comes from its certificate alone, and the
        // authorization table decides; every refusal carries the reason the peer shows.
        let principal = match &identity {
            Some(Ok(Identity::Agent(_))) => Principal::Agent,
            Some(Ok(Identity::Admin(_))) => Principal::Admin,
            // A certificate that names no agent or admin grants nothing.
            None | Some(Ok(Identity::Coordinator) | Err(_)) => Principal::None,
        };
        let request = match &hello.intent {
            Intent::Enroll(_) => Request::SessionEnroll,
            Intent::Agent(_) => Request::SessionAgent,
            Intent::Admin(_) => Request::SessionAdmin,
        };
        let checked = self.metrics.authz.check(request, principal, || {
            match (&hello.intent, &identity) {
                (_, Some(Err(e))) => format!("client certificate names no Gantry identity: {e}"),
                (Intent::Enroll(_), Some(_)) => {
                    "enrollment must come from a connection without a client certificate".to_owned()
                }
                (_, None) => "no client certificate: an unauthenticated connection may only enroll with a join token".to_owned(),
                (Intent::Admin(_), Some(Ok(other))) => {
                    format!("{other} is not an admin: admin commands need an admin certificate")
                }
                (Intent::Agent(_), Some(Ok(other))) => {
                    format!("{other} is not an agent: an agent session needs an agent certificate")
                }
            }
        });
        let message = match checked {
            Ok(()) => match (hello.intent, identity) {
                (Intent::Enroll(req), None) => return self.enroll(&conn, &mut writer, req).await,
                (Intent::Agent(h), Some(Ok(Identity::Agent(id)))) => {
                    return self.agent_session(conn, writer, reader, id, h).await;
                }
                (Intent::Admin(_), Some(Ok(identity))) => {
                    return self
                        .admin_session(conn, writer, reader, identity.uri(), principal)
                        .await;
                }
                _ => (
                    RefusalReason::Internal,
                    format!("the authorization table allows {request} for {principal}, but this coordinator cannot serve it"),
                ),
            },
            Err(denied) => {
                let reason = match (principal, request) {
                    (Principal::None, _) => RefusalReason::NotAuthenticated,
                    (_, Request::SessionEnroll) => RefusalReason::BadRequest,
                    _ => RefusalReason::WrongRole,
                };
                (reason, denied.to_string())
            }
        };
        let (reason, message) = message;
        tracing::info!(%remote, "{message}");
        refuse(&conn, &mut writer, CloseCode::Unauthorized, reason, message).await;
    }

    async fn enroll(&self, conn: &Connection, writer: &mut FrameWriter, req: EnrollRequest) {
        let remote = conn.remote_address();
        match self.try_enroll(&req, remote.to_string()) {
            Ok(enrolled) => {
                tracing::info!(%remote, agent = %enrolled.agent_id, "agent enrolled");
                if let Err(e) = writer.send(&HelloReply::Enrolled(enrolled)).await {
                    tracing::warn!(%remote, error = %e, "could not send the enrollment reply");
                }
                writer.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            }
            Err(refusal) => {
                tracing::info!(%remote, reason = ?refusal.reason, "enrollment refused: {}", refusal.message);
                refuse(
                    conn,
                    writer,
                    CloseCode::EnrollmentRefused,
                    refusal.reason,
                    refusal.message,
                )
                .await;
            }
        }
    }

    /// Checks the token and CSR and stores the agent. Nothing is stored, and no
    /// certificate leaves, unless every check passes and the commit is durable.
    fn try_enroll(&self, req: &EnrollRequest, remote: String) -> Result<Enrolled, Refusal> {
        let refusal = |reason, message: String| Refusal { reason, message };
        let token_id = TokenId::parse(req.token_id.as_str()).map_err(|e| {
            refusal(
                RefusalReason::TokenMalformed,
                format!("malformed join token: {e}"),
            )
        })?;
        if req.token_secret.len() != 64 || !req.token_secret.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(refusal(
                RefusalReason::TokenMalformed,
                "malformed join token: the secret is not 64 hex digits".into(),
            ));
        }
        let labels =
            check_labels(&req.labels).map_err(|m| refusal(RefusalReason::BadRequest, m))?;
        let hostname: String = req
            .hostname
            .chars()
            .filter(|c| !c.is_control())
            .take(253)
            .collect();
        let now_sys = SystemTime::now();
        let now = UnixMillis::now();
        // A token that cannot enroll is refused after one read, before the CSR is
        // checked and signed and before the store's write lock is taken: a storm of
        // forged enrollments costs a lookup each. The write below checks it again.
        let token_refusal = |t: TokenRefusal| {
            let reason = match t {
                TokenRefusal::Unknown(_) => RefusalReason::TokenUnknown,
                TokenRefusal::Expired { .. } => RefusalReason::TokenExpired,
                TokenRefusal::UsedUp { .. } => RefusalReason::TokenUsedUp,
            };
            refusal(reason, t.to_string())
        };
        match self.store.token(&token_id) {
            Ok(Some(token))
                if gantry_certs::token::secret_matches(&req.token_secret, &token.secret_sha256) =>
            {
                token.check(now).map_err(token_refusal)?;
            }
            Ok(_) => return Err(token_refusal(TokenRefusal::Unknown(token_id))),
            Err(e) => {
                return Err(refusal(
                    RefusalReason::Internal,
                    format!("coordinator could not read the join token: {e}"),
                ))
            }
        }
        let mut agent_id = AgentId::from_random(&gantry_certs::random_bytes::<6>());
        // All-zero is the deploy runner's id; a 1-in-2^48 draw of it is drawn again.
        while agent_id == crate::deployments::deploy_runner() {
            agent_id = AgentId::from_random(&gantry_certs::random_bytes::<6>());
        }
        let cert = self
            .ca
            .sign_csr(
                &req.csr_der,
                &Identity::Agent(agent_id.clone()),
                now_sys,
                self.settings.agent_cert_ttl,
            )
            .map_err(|e| {
                refusal(
                    RefusalReason::BadCsr,
                    format!("certificate request refused: {e}"),
                )
            })?;
        let record = self.store.enroll(
            &token_id,
            |token| gantry_certs::token::secret_matches(&req.token_secret, &token.secret_sha256),
            now,
            |token, taken| {
                if taken(&agent_id) {
                    return Err(StoreError::Engine {
                        op: "enroll",
                        detail: "agent id collision; enroll again".into(),
                    });
                }
                Ok(AgentRecord {
                    id: agent_id.clone(),
                    hostname,
                    reported_labels: labels.clone(),
                    assigned_labels: token.labels.clone(),
                    capabilities: Vec::new(),
                    slots: 0,
                    agent_version: String::new(),
                    enrolled_at: now,
                    enrolled_with: token.id.clone(),
                    last_seen: Some(now),
                    last_address: Some(remote),
                    figures: None,
                    certificate_serial: cert.serial_hex.clone(),
                    certificate_not_after: cert.not_after,
                    revoked_at: None,
                })
            },
        );
        match record {
            Ok(record) => Ok(Enrolled {
                agent_id,
                certificate_pem: cert.pem,
                ca_certificate_pem: self.ca.cert_pem().to_owned(),
                labels: record.effective_labels(),
            }),
            Err(StoreError::Token(t)) => {
                let reason = match t {
                    TokenRefusal::Unknown(_) => RefusalReason::TokenUnknown,
                    TokenRefusal::Expired { .. } => RefusalReason::TokenExpired,
                    TokenRefusal::UsedUp { .. } => RefusalReason::TokenUsedUp,
                };
                Err(refusal(reason, t.to_string()))
            }
            Err(e) => {
                tracing::error!(error = %e, "enrollment failed in the store");
                Err(refusal(
                    RefusalReason::Internal,
                    format!("coordinator could not store the enrollment: {e}"),
                ))
            }
        }
    }

    async fn agent_session(
        self: &Arc<Self>,
        conn: Connection,
        mut writer: FrameWriter,
        mut reader: FrameReader,
        id: AgentId,
        hello: AgentHello,
    ) {
        let remote = conn.remote_address();
        let record = match self.store.agent(&id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let msg = format!("agent {id} is not enrolled with this coordinator; enroll it again with a new token");
                refuse(
                    &conn,
                    &mut writer,
                    CloseCode::Unauthorized,
                    RefusalReason::NotAuthenticated,
                    msg,
                )
                .await;
                return;
            }
            Err(e) => {
                refuse(
                    &conn,
                    &mut writer,
                    CloseCode::ShuttingDown,
                    RefusalReason::Internal,
                    format!("store error: {e}"),
                )
                .await;
                return;
            }
        };
        if record.revoked_at.is_some() || self.revoked.contains(&id) {
            let msg = format!("agent {id} has been revoked; enroll it again with a new token");
            refuse(
                &conn,
                &mut writer,
                CloseCode::Revoked,
                RefusalReason::Revoked,
                msg,
            )
            .await;
            return;
        }
        let labels = match check_labels(&hello.labels) {
            Ok(l) => l,
            Err(msg) => {
                refuse(
                    &conn,
                    &mut writer,
                    CloseCode::Malformed,
                    RefusalReason::BadRequest,
                    msg,
                )
                .await;
                return;
            }
        };
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let now = UnixMillis::now();
        let facts = HelloFacts {
            hostname: hello.hostname.chars().take(253).collect(),
            labels,
            capabilities: hello
                .capabilities
                .into_iter()
                .take(32)
                .map(|c| c.chars().take(64).collect())
                .collect(),
            slots: hello.slots.clamp(1, 1024),
            agent_version: hello.agent_version.chars().take(64).collect(),
        };
        let (outbound, mut outbound_rx) = mpsc::unbounded_channel();
        let effective_labels = {
            let mut l = facts.labels.clone();
            l.extend(record.assigned_labels.clone());
            // Capabilities become labels only the scheduler sees, so a job that needs one
            // (an `image:` job needs docker) goes only to agents that have it.
            for cap in &facts.capabilities {
                l.insert(crate::engine::capability_label(cap), "true".into());
            }
            l
        };
        let slots = facts.slots;
        let hostname = facts.hostname.clone();
        let peer_address = hello
            .peer_port
            .filter(|port| *port != 0)
            .map(|port| peer_address(remote, port));
        let replaced = lock(&self.registry).live.insert(
            id.clone(),
            LiveSession {
                session,
                conn: conn.clone(),
                address: remote.to_string(),
                last_seen: now,
                figures: Some(hello.figures),
                hello: Some(facts),
                hostname,
                labels: effective_labels.clone(),
                peer_address,
                dirty: true,
                persisted_at: None,
                heard: false,
                outbound,
            },
        );
        if let Some(old) = replaced {
            old.conn.close(
                CloseCode::Replaced,
                "a newer session of this agent replaced this one",
            );
        }
        tracing::info!(agent = %id, %remote, "agent connected");
        let welcome = HelloReply::Welcome(Welcome {
            protocol_version: gantry_protocol::PROTOCOL_VERSION,
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
            identity: Identity::Agent(id.clone()).uri(),
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u64,
        });
        let mut end = "the agent ended the session".to_owned();
        // An agent that stops reading its control stream is cut off rather than left
        // holding its session (and the messages queued for it) forever.
        writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
        if let Err(e) = writer.send(&welcome).await {
            end = e.to_string();
        } else {
            let running = hello.running.iter().map(|r| (r.job, r.attempt)).collect();
            self.engine.event(Event::AgentConnected {
                agent: id.clone(),
                labels: effective_labels,
                slots,
                running,
            });
            self.deployments.connected(id.clone());
            let streams = AbortOnDrop(tokio::spawn(
                self.clone().agent_streams(conn.clone(), id.clone()),
            ));
            let (inbound_tx, mut inbound) = mpsc::channel(64);
            // Frame reads are not cancel-safe, so they run in their own task. It reads at
            // most AGENT_MESSAGES_PER_SEC (after a burst): a flooding agent is slowed by
            // its own connection's flow control, not by the scheduler or other agents.
            let flood_agent = id.clone();
            let reader_task = AbortOnDrop(tokio::spawn(async move {
                let mut bucket =
                    TokenBucket::new(limits::AGENT_MESSAGES_PER_SEC, limits::AGENT_MESSAGE_BURST);
                let mut throttled = false;
                loop {
                    let msg = reader.recv::<AgentMessage>().await;
                    let last = !matches!(msg, Ok(Some(_)));
                    if let Some(wait) = bucket.take(tokio::time::Instant::now()) {
                        if !throttled {
                            throttled = true;
                            tracing::warn!(agent = %flood_agent, "agent sends more than {} messages/s: reading its session more slowly", limits::AGENT_MESSAGES_PER_SEC);
                        }
                        tokio::time::sleep(wait).await;
                    }
                    if inbound_tx.send(msg).await.is_err() || last {
                        return;
                    }
                }
            }));
            // An agent that misses three heartbeats (at least 5 s) is treated as gone: its
            // session is closed so no new work is offered to it. Its leases still run their
            // full course in the scheduler, so a live agent behind a slow link loses nothing.
            let silence_limit = (self.settings.heartbeat_interval * 3).max(Duration::from_secs(5));
            let mut last_heard = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(last_heard + silence_limit) => {
                        let reason = format!("no heartbeat for {} s", silence_limit.as_secs());
                        conn.close(CloseCode::Timeout, &reason);
                        end = reason;
                        break;
                    }
                    msg = inbound.recv() => match msg {
                        Some(Ok(Some(msg))) => {
                            last_heard = tokio::time::Instant::now();
                            if let Err(e) = self.agent_message(&id, session, msg, &mut writer).await {
                                close_for(&conn, &e);
                                end = e.to_string();
                                break;
                            }
                        }
                        Some(Ok(None)) | None => break,
                        Some(Err(e)) => {
                            close_for(&conn, &e);
                            end = e.to_string();
                            break;
                        }
                    },
                    out = outbound_rx.recv() => match out {
                        Some(message) => {
                            if let Err(e) = writer.send(&message).await {
                                close_for(&conn, &e);
                                end = e.to_string();
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
            drop(reader_task);
            drop(streams);
            self.execs.host_gone(&id, "the host disconnected");
            self.engine
                .event(Event::AgentDisconnected { agent: id.clone() });
        }
        tracing::info!(agent = %id, %remote, "agent disconnected: {end}");
        let mut reg = lock(&self.registry);
        if reg.live.get(&id).is_some_and(|s| s.session == session) {
            if let Some(s) = reg.live.remove(&id) {
                reg.departed.push(Presence {
                    agent_id: id,
                    last_seen: UnixMillis::now(),
                    address: s.address,
                    figures: s.figures,
                    hello: s.hello,
                });
            }
        }
    }

    /// Acts on one message from an agent's control stream.
    async fn agent_message(
        &self,
        id: &AgentId,
        session: u64,
        msg: AgentMessage,
        writer: &mut FrameWriter,
    ) -> Result<(), TransportError> {
        if let Some(row) = Request::of_agent_message(&msg) {
            let (holds, why) = self.holds(id, &msg);
            if let Err(denied) = self
                .metrics
                .authz
                .check(row, Principal::agent(holds), || why)
            {
                return writer
                    .send(&CoordinatorMessage::Refused {
                        message: denied.to_string(),
                    })
                    .await;
            }
        }
        match msg {
            AgentMessage::Heartbeat(figures) => {
                let mut reg = lock(&self.registry);
                if let Some(s) = reg.live.get_mut(id).filter(|s| s.session == session) {
                    s.last_seen = UnixMillis::now();
                    s.figures = Some(figures);
                    s.dirty = true;
                    // The scheduler hears of it with the next presence flush, however
                    // many heartbeats arrive until then (a flooding agent costs nothing
                    // more there).
                    s.heard = true;
                }
            }
            AgentMessage::RenewCertificate { csr_der } => {
                let reply = self.renew(id, &csr_der);
                writer.send(&reply).await?;
            }
            AgentMessage::JobAccepted { job, attempt } => {
                self.engine.event(Event::JobAccepted {
                    job,
                    attempt,
                    agent: id.clone(),
                });
            }
            AgentMessage::JobRejected {
                job,
                attempt,
                reason,
            } => {
                self.engine.event(Event::JobRejected {
                    job,
                    attempt,
                    agent: id.clone(),
                    reason,
                });
            }
            AgentMessage::DeployResult(result) => self.deployments.result(id.clone(), result),
            AgentMessage::ExecOutput { id: exec, data } => self.execs.output(exec, id, data),
            AgentMessage::ExecDone { id: exec, result } => self.execs.done(exec, id, result),
            AgentMessage::JobFinished(result) => {
                let (job, attempt) = (result.job, result.attempt);
                let (ack, acked) = oneshot::channel();
                self.engine.send(Input::Finished {
                    agent: id.clone(),
                    result,
                    ack,
                });
                // The acknowledgement goes out once the result is durable; meanwhile the
                // session keeps serving. An unacknowledged result is sent again by the agent.
                let outbound = lock(&self.registry)
                    .live
                    .get(id)
                    .filter(|s| s.session == session)
                    .map(|s| s.outbound.clone());
                tokio::spawn(async move {
                    if acked.await.is_ok() {
                        if let Some(out) = outbound {
                            let _ = out.send(CoordinatorMessage::JobFinishedAck { job, attempt });
                        }
                    }
                });
            }
        }
        Ok(())
    }

    /// Reads a stream's first frame (at most [`limits::MAX_STREAM_OPEN_BYTES`], within
    /// the handshake deadline); `None` if it ended or was bad (logged).
    async fn stream_open(reader: &mut FrameReader, who: &str) -> Option<StreamOpen> {
        reader.set_limit(limits::MAX_STREAM_OPEN_BYTES);
        let open = reader
            .recv_within::<StreamOpen>(limits::HANDSHAKE_DEADLINE, "the stream's first frame")
            .await;
        reader.set_limit(limits::MAX_FRAME_BYTES);
        match open {
            Ok(Some(open)) => Some(open),
            Ok(None) => None,
            Err(e) => {
                tracing::info!(%who, "bad stream: {e}");
                reader.stop(CloseCode::Malformed);
                None
            }
        }
    }

    /// Accepts the streams an admin opens besides the control stream (follows, uploads,
    /// artifact downloads). The authorization table is asked for every one.
    async fn admin_streams(self: Arc<Self>, conn: Connection, actor: String, principal: Principal) {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let peer = crate::artifacts::Peer::Admin(actor.clone());
        while let Ok((mut writer, mut reader)) = conn.accept_stream().await {
            let me = self.clone();
            let peer = peer.clone();
            let actor = actor.clone();
            tokio::spawn(async move {
                let Some(open) = Self::stream_open(&mut reader, &actor).await else {
                    return;
                };
                let row = Request::of_stream(&open);
                if let Err(denied) = me
                    .metrics
                    .authz
                    .check(row, principal, || stream_detail(row).into())
                {
                    refuse_stream(&open, &denied, writer, reader).await;
                    return;
                }
                // Follows and execs stream to the admin's own terminal, which may pause
                // (a pager); everything else is bulk and must be read.
                if !matches!(
                    open,
                    StreamOpen::FollowLogs { .. }
                        | StreamOpen::FollowRun { .. }
                        | StreamOpen::Exec(_)
                ) {
                    writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
                }
                let result = match open {
                    StreamOpen::FollowLogs {
                        job,
                        from_seq,
                        follow,
                    } => crate::runs::follow_logs(&me, job, from_seq, follow, &mut writer).await,
                    StreamOpen::FollowRun { run } => {
                        crate::runs::follow_run(&me, run, &mut writer).await
                    }
                    StreamOpen::UploadSource { bytes } => {
                        let reply = match me.sources.receive(&mut reader, bytes).await {
                            Ok((source, bytes)) => {
                                me.metrics.source_bytes(bytes);
                                gantry_protocol::SourceStored::Stored { source, bytes }
                            }
                            Err(message) => gantry_protocol::SourceStored::Refused { message },
                        };
                        writer.send(&reply).await
                    }
                    StreamOpen::Exec(request) => {
                        let targets = me.exec_targets(&request.select);
                        let sender = me.clone();
                        crate::exec::run(
                            &me.execs,
                            &request,
                            targets,
                            move |agent, message| sender.send_to(agent, message),
                            &mut writer,
                        )
                        .await
                    }
                    open @ (StreamOpen::Resolve(_)
                    | StreamOpen::GetManifest { .. }
                    | StreamOpen::FetchChunks { .. }
                    | StreamOpen::Upload { .. }
                    | StreamOpen::PutChunks { .. }) => {
                        if let Err(e) = me
                            .artifacts
                            .serve(&peer, connection, open, writer, reader)
                            .await
                        {
                            tracing::info!(?peer, "artifact stream refused or broken: {e}");
                        }
                        return;
                    }
                    StreamOpen::Logs { .. }
                    | StreamOpen::FetchSource { .. }
                    | StreamOpen::FetchAgentBinary { .. } => {
                        tracing::error!("the authorization table allows {row} for {principal}, but only agents can be served it");
                        writer.reset(CloseCode::Unauthorized);
                        return;
                    }
                };
                if let Err(e) = result {
                    tracing::debug!("follow stream ended: {e}");
                }
                writer.finish();
            });
        }
    }

    /// Accepts the streams an agent opens besides the control stream (job logs, source
    /// trees, artifacts and caches). A stream that names work is checked against the
    /// authorization table by its handler, which knows who holds that work; every other
    /// stream is checked here, for an agent as such.
    async fn agent_streams(self: Arc<Self>, conn: Connection, agent: AgentId) {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        while let Ok((mut writer, mut reader)) = conn.accept_stream().await {
            let me = self.clone();
            let agent = agent.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                let Some(open) = Self::stream_open(&mut reader, agent.as_str()).await else {
                    return;
                };
                let row = Request::of_stream(&open);
                if !row.names_work() {
                    if let Err(denied) = me
                        .metrics
                        .authz
                        .check(row, Principal::Agent, || stream_detail(row).into())
                    {
                        refuse_stream(&open, &denied, writer, reader).await;
                        return;
                    }
                }
                writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
                match open {
                    StreamOpen::Logs { job, attempt } => {
                        if let Err(e) =
                            crate::runs::receive_log(&me, &agent, job, attempt, writer, reader)
                                .await
                        {
                            tracing::info!(%agent, %job, attempt, "log stream ended: {e}");
                        }
                    }
                    StreamOpen::FetchAgentBinary { sha256 } => {
                        if let Err(e) = me.send_agent_binary(&sha256, &mut writer).await {
                            tracing::info!(%agent, "agent binary fetch refused or broken: {e}");
                        }
                        writer.finish();
                    }
                    StreamOpen::FetchSource { job, attempt } => {
                        if let Err(e) =
                            crate::runs::send_source(&me, &agent, job, attempt, &mut writer).await
                        {
                            tracing::info!(%agent, %job, attempt, "source fetch refused or broken: {e}");
                        }
                        writer.finish();
                    }
                    open @ (StreamOpen::Resolve(_)
                    | StreamOpen::GetManifest { .. }
                    | StreamOpen::FetchChunks { .. }
                    | StreamOpen::Upload { .. }
                    | StreamOpen::PutChunks { .. }) => {
                        let peer = crate::artifacts::Peer::Agent(agent.clone());
                        if let Err(e) = me
                            .artifacts
                            .serve(&peer, connection, open, writer, reader)
                            .await
                        {
                            tracing::info!(%agent, "artifact stream refused or broken: {e}");
                        }
                        tracing::debug!(%agent, path = %conn.path_summary(), "artifact stream ended");
                    }
                    StreamOpen::FollowLogs { .. }
                    | StreamOpen::FollowRun { .. }
                    | StreamOpen::UploadSource { .. }
                    | StreamOpen::Exec(_) => {
                        tracing::error!(%agent, "the authorization table allows {row} for agents, but only admins can be served it");
                        writer.reset(CloseCode::Unauthorized);
                    }
                }
            });
        }
    }

    /// Whether agent `id` holds the work `message` names, and if not, why.
    fn holds(&self, id: &AgentId, message: &AgentMessage) -> (bool, String) {
        let handed = |job: JobId, attempt: gantry_protocol::Attempt| match self.store.job(job) {
            Ok(Some(record))
                if record
                    .attempts
                    .iter()
                    .any(|(a, who)| *a == attempt && who == id) =>
            {
                (true, String::new())
            }
            Ok(Some(_)) => (
                false,
                format!("attempt {attempt} of job {job} was not handed to {id}"),
            ),
            Ok(None) => (false, format!("no job {job}")),
            Err(e) => (false, format!("cannot read job {job}: {e}")),
        };
        match message {
            AgentMessage::JobAccepted { job, attempt }
            | AgentMessage::JobRejected { job, attempt, .. } => handed(*job, *attempt),
            AgentMessage::JobFinished(result) => handed(result.job, result.attempt),
            AgentMessage::DeployResult(result) => match self.store.deployment(result.deployment) {
                Ok(Some(d)) if d.hosts.contains_key(id) => (true, String::new()),
                Ok(Some(_)) => (
                    false,
                    format!("{id} is not a target of deployment {}", result.deployment),
                ),
                Ok(None) => (false, format!("no deployment {}", result.deployment)),
                Err(e) => (
                    false,
                    format!("cannot read deployment {}: {e}", result.deployment),
                ),
            },
            AgentMessage::ExecOutput { id: exec, .. } | AgentMessage::ExecDone { id: exec, .. } => {
                if self.execs.targets(*exec, id) {
                    (true, String::new())
                } else {
                    (false, format!("exec {exec} is not running on {id}"))
                }
            }
            AgentMessage::Heartbeat(_) | AgentMessage::RenewCertificate { .. } => {
                (true, String::new())
            }
        }
    }

    fn renew(&self, id: &AgentId, csr_der: &[u8]) -> CoordinatorMessage {
        let identity = Identity::Agent(id.clone());
        let cert = match self.ca.sign_csr(
            csr_der,
            &identity,
            SystemTime::now(),
            self.settings.agent_cert_ttl,
        ) {
            Ok(c) => c,
            Err(e) => {
                return CoordinatorMessage::RenewalRefused {
                    message: format!("certificate request refused: {e}"),
                }
            }
        };
        let audit = AuditEntry {
            at: UnixMillis::now(),
            actor: identity.uri(),
            action: "agent.renew".into(),
            detail: format!("certificate_serial={}", cert.serial_hex),
        };
        let stored = self.store.update_agent(id, Some(&audit), |r| {
            r.certificate_serial.clone_from(&cert.serial_hex);
            r.certificate_not_after = cert.not_after;
        });
        match stored {
            Ok(_) => {
                tracing::info!(agent = %id, "certificate renewed");
                CoordinatorMessage::CertificateRenewed {
                    certificate_pem: cert.pem,
                    not_after: cert.not_after,
                }
            }
            Err(e) => CoordinatorMessage::RenewalRefused {
                message: format!("could not record the renewal: {e}"),
            },
        }
    }

    async fn admin_session(
        self: &Arc<Self>,
        conn: Connection,
        mut writer: FrameWriter,
        mut reader: FrameReader,
        actor: String,
        principal: Principal,
    ) {
        let welcome = HelloReply::Welcome(Welcome {
            protocol_version: gantry_protocol::PROTOCOL_VERSION,
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
            identity: actor.clone(),
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u64,
        });
        writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
        if writer.send(&welcome).await.is_err() {
            return;
        }
        let _streams = AbortOnDrop(tokio::spawn(self.clone().admin_streams(
            conn.clone(),
            actor.clone(),
            principal,
        )));
        loop {
            match reader.recv::<AdminRequest>().await {
                Ok(Some(req)) => {
                    let checked =
                        self.metrics
                            .authz
                            .check(Request::of_admin(&req), principal, String::new);
                    let response = match (checked, req) {
                        (Err(denied), _) => {
                            AdminResponse::Error(crate::base::authz::forbidden(&denied))
                        }
                        (
                            Ok(()),
                            AdminRequest::Gc {
                                dry_run,
                                grace_secs,
                            },
                        ) => self.gc(&actor, dry_run, grace_secs).await,
                        (Ok(()), AdminRequest::ApproveDeployment { id }) => {
                            self.deployments.admin(&actor, AdminOp::Approve(id)).await
                        }
                        (Ok(()), AdminRequest::PromoteDeployment { id }) => {
                            self.deployments.admin(&actor, AdminOp::Promote(id)).await
                        }
                        (Ok(()), AdminRequest::AbortDeployment { id }) => {
                            self.deployments.admin(&actor, AdminOp::Abort(id)).await
                        }
                        (
                            Ok(()),
                            AdminRequest::UpgradeAgents {
                                select,
                                batch,
                                failure_budget,
                                timeout_ms,
                            },
                        ) => {
                            self.upgrade_agents(&actor, select, batch, failure_budget, timeout_ms)
                                .await
                        }
                        (Ok(()), AdminRequest::Rollback(request)) => {
                            self.deployments
                                .admin(&actor, AdminOp::Rollback(request))
                                .await
                        }
                        (Ok(()), other) => self.answer_admin(&actor, other),
                    };
                    if writer.send(&response).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    close_for(&conn, &e);
                    return;
                }
            }
        }
    }

    /// Answers one admin request from the dashboard, as `principal` (a login's role),
    /// once the authorization table allows it.
    pub fn admin_request(
        &self,
        actor: &str,
        principal: Principal,
        req: AdminRequest,
    ) -> AdminResponse {
        match self
            .metrics
            .authz
            .check(Request::of_admin(&req), principal, String::new)
        {
            Ok(()) => self.answer_admin(actor, req),
            Err(denied) => AdminResponse::Error(crate::base::authz::forbidden(&denied)),
        }
    }

    /// Answers one admin request the authorization table allowed. Every change is
    /// durable (with its audit entry) before the response is built.
    fn answer_admin(&self, actor: &str, req: AdminRequest) -> AdminResponse {
        let now = UnixMillis::now();
        let audit = |action: &str, detail: String| AuditEntry {
            at: now,
            actor: actor.to_owned(),
            action: action.to_owned(),
            detail,
        };
        let result: Result<AdminResponse, AdminError> = (|| match req {
            AdminRequest::CreateToken {
                ttl_secs,
                uses,
                labels,
            } => {
                if ttl_secs == 0 || ttl_secs > MAX_TOKEN_TTL.as_secs() {
                    return Err(invalid(format!(
                        "token lifetime must be between 1s and {}d",
                        MAX_TOKEN_TTL.as_secs() / 86_400
                    )));
                }
                if uses == 0 || uses > MAX_TOKEN_USES {
                    return Err(invalid(format!(
                        "token uses must be between 1 and {MAX_TOKEN_USES}"
                    )));
                }
                let labels = check_labels(&labels).map_err(invalid)?;
                let token = JoinToken::generate(&self.settings.advertise, &self.ca.fingerprint());
                let record = TokenRecord {
                    id: token.id.clone(),
                    secret_sha256: gantry_certs::token::hash_secret(&token.secret).to_vec(),
                    created_at: now,
                    created_by: actor.to_owned(),
                    expires_at: now.plus_secs(ttl_secs),
                    uses_allowed: uses,
                    uses: 0,
                    labels: labels.clone(),
                };
                let detail = format!(
                    "token={} ttl_secs={ttl_secs} uses={uses} labels={labels:?}",
                    token.id
                );
                self.store
                    .create_token(&record, &audit("token.create", detail))
                    .map_err(internal)?;
                Ok(AdminResponse::TokenCreated(TokenCreated {
                    token_id: token.id.clone(),
                    token: token.encode(),
                    expires_at: record.expires_at,
                    uses,
                    labels,
                }))
            }
            AdminRequest::ListAgents => {
                let mut views: Vec<AgentView> = self
                    .store
                    .agents()
                    .map_err(internal)?
                    .iter()
                    .map(|r| self.view(r))
                    .collect();
                views.sort_by(|a, b| {
                    a.hostname
                        .cmp(&b.hostname)
                        .then_with(|| a.agent_id.cmp(&b.agent_id))
                });
                Ok(AdminResponse::Agents(views))
            }
            AdminRequest::ShowAgent { agent_id } => {
                let record = self
                    .store
                    .agent(&agent_id)
                    .map_err(internal)?
                    .ok_or_else(|| agent_not_found(&agent_id))?;
                Ok(AdminResponse::Agent(self.view(&record)))
            }
            AdminRequest::RevokeAgent { agent_id } => {
                let record = self
                    .store
                    .update_agent(
                        &agent_id,
                        Some(&audit("agent.revoke", format!("agent={agent_id}"))),
                        |r| {
                            r.revoked_at.get_or_insert(now);
                        },
                    )
                    .map_err(|e| store_err(e, &agent_id))?;
                self.revoked.insert(agent_id.clone());
                let live = lock(&self.registry).live.remove(&agent_id);
                if let Some(s) = live {
                    s.conn.close(
                        CloseCode::Revoked,
                        &format!("agent {agent_id} was revoked by {actor}"),
                    );
                    tracing::info!(agent = %agent_id, "revoked: live connection closed");
                }
                Ok(AdminResponse::Agent(self.view(&record)))
            }
            AdminRequest::LabelAgent {
                agent_id,
                set,
                remove,
            } => {
                let set = check_labels(&set).map_err(invalid)?;
                let detail = format!("agent={agent_id} set={set:?} remove={remove:?}");
                let record = self
                    .store
                    .update_agent(&agent_id, Some(&audit("agent.label", detail)), |r| {
                        for k in &remove {
                            r.assigned_labels.remove(k);
                        }
                        r.assigned_labels.extend(set);
                    })
                    .map_err(|e| store_err(e, &agent_id))?;
                Ok(AdminResponse::Agent(self.view(&record)))
            }
            AdminRequest::Status => {
                let counts = self.store.counts(now).map_err(internal)?;
                let connected = lock(&self.registry).live.len() as u64;
                Ok(AdminResponse::Status(StatusView {
                    coordinator_version: env!("CARGO_PKG_VERSION").into(),
                    protocol_version: gantry_protocol::PROTOCOL_VERSION,
                    listen_address: self.settings.listen.clone(),
                    uptime_secs: self.started_at.elapsed().as_secs(),
                    agents_total: counts.agents,
                    agents_connected: connected,
                    agents_revoked: counts.revoked,
                    tokens_active: counts.tokens_active,
                }))
            }
            run_request @ (AdminRequest::Validate { .. }
            | AdminRequest::SubmitRun(_)
            | AdminRequest::ListRuns { .. }
            | AdminRequest::ShowRun { .. }
            | AdminRequest::CancelRun { .. }
            | AdminRequest::RetryRun { .. }
            | AdminRequest::ListJobs { .. }
            | AdminRequest::ShowJob { .. }
            | AdminRequest::Approve { .. }
            | AdminRequest::AddTrigger { .. }
            | AdminRequest::ListTriggers
            | AdminRequest::RemoveTrigger { .. }
            | AdminRequest::SetSecret { .. }
            | AdminRequest::ListSecrets
            | AdminRequest::RemoveSecret { .. }) => crate::runs::admin(self, actor, run_request),
            AdminRequest::ListArtifacts { run } => self
                .artifacts
                .list(run)
                .map(AdminResponse::Artifacts)
                .map_err(|m| AdminError {
                    kind: gantry_protocol::AdminErrorKind::Internal,
                    message: m,
                }),
            AdminRequest::ListCaches => {
                self.artifacts
                    .caches()
                    .map(AdminResponse::Caches)
                    .map_err(|m| AdminError {
                        kind: gantry_protocol::AdminErrorKind::Internal,
                        message: m,
                    })
            }
            AdminRequest::RemoveCache {
                key,
                pipeline,
                branch,
            } => {
                let detail = format!("key={key} pipeline={pipeline:?} branch={branch:?}");
                let gone = self
                    .store
                    .remove_caches(
                        |c| {
                            c.key == key
                                && pipeline.as_ref().is_none_or(|p| &c.pipeline == p)
                                && branch.as_ref().is_none_or(|b| &c.branch == b)
                        },
                        &audit("cache.remove", detail),
                    )
                    .map_err(internal)?;
                if gone.is_empty() {
                    return Err(crate::runs::not_found(format!(
                        "no cache with key {key:?}{}; `gantry cache list` shows them",
                        match (&pipeline, &branch) {
                            (None, None) => String::new(),
                            _ => format!(" (pipeline {pipeline:?}, branch {branch:?})"),
                        }
                    )));
                }
                Ok(AdminResponse::Caches(gone))
            }
            web_request @ (AdminRequest::CreateLoginToken { .. }
            | AdminRequest::ListLoginTokens
            | AdminRequest::RevokeLoginToken { .. }) => {
                crate::auth::admin(self, actor, web_request)
            }
            hook_request @ (AdminRequest::AddWebhook { .. }
            | AdminRequest::ListWebhooks
            | AdminRequest::RemoveWebhook { .. }) => self.webhooks.admin(actor, hook_request),
            AdminRequest::Gc { .. } => Err(invalid(
                "garbage collection is answered by the session, not here".into(),
            )),
            AdminRequest::PutEnvironment {
                name,
                select,
                approvals,
                wait_ms,
                branches,
                replace,
            } => {
                if let Some(problem) = gantry_pipeline::environment_name_problem(&name) {
                    return Err(invalid(format!(
                        "invalid environment name {name:?}: {problem}"
                    )));
                }
                let select = check_labels(&select).map_err(invalid)?;
                if approvals > MAX_APPROVALS {
                    return Err(invalid(format!(
                        "--approvals {approvals}: at most {MAX_APPROVALS}"
                    )));
                }
                if wait_ms > MAX_WAIT_MS {
                    return Err(invalid(format!(
                        "--wait: at most {} days",
                        MAX_WAIT_MS / 86_400_000
                    )));
                }
                if let Some(bad) = branches
                    .iter()
                    .find(|b| b.is_empty() || b.len() > 255 || b.chars().any(char::is_control))
                {
                    return Err(invalid(format!(
                        "invalid branch pattern {bad:?}: 1 to 255 printable characters, like main or release/*"
                    )));
                }
                let detail = format!(
                    "name={name} select={select:?} approvals={approvals} wait_ms={wait_ms} branches={branches:?}"
                );
                let record = EnvironmentRecord {
                    name,
                    select,
                    approvals,
                    wait_ms,
                    branches,
                    epoch: 0,
                    current: None,
                    history: Vec::new(),
                    created_by: actor.to_owned(),
                    created_at: now,
                };
                let action = if replace {
                    "environment.update"
                } else {
                    "environment.create"
                };
                match self
                    .store
                    .put_environment(record, replace, &audit(action, detail))
                    .map_err(internal)?
                {
                    Ok(stored) => Ok(AdminResponse::Environment(
                        crate::deployments::environment_view(&self.store, stored),
                    )),
                    Err(message) if replace => Err(crate::runs::not_found(message)),
                    Err(message) => Err(invalid(message)),
                }
            }
            AdminRequest::ListEnvironments => Ok(AdminResponse::Environments(
                self.store
                    .environments()
                    .map_err(internal)?
                    .into_iter()
                    .map(|r| crate::deployments::environment_view(&self.store, r))
                    .collect(),
            )),
            AdminRequest::ShowEnvironment { name } => {
                let record = self
                    .store
                    .environment(&name)
                    .map_err(internal)?
                    .ok_or_else(|| {
                        crate::runs::not_found(format!(
                            "no environment {name}; `gantry env list` shows them"
                        ))
                    })?;
                Ok(AdminResponse::Environment(
                    crate::deployments::environment_view(&self.store, record),
                ))
            }
            AdminRequest::ListDeployments { environment, limit } => {
                if let Some(env) = &environment {
                    if self.store.environment(env).map_err(internal)?.is_none() {
                        return Err(crate::runs::not_found(format!(
                            "no environment {env}; `gantry env list` shows them"
                        )));
                    }
                }
                let limit = limit.clamp(1, 1000) as usize;
                let views = self
                    .store
                    .deployments(usize::MAX, false)
                    .map_err(internal)?
                    .into_iter()
                    .filter(|d| environment.as_ref().is_none_or(|e| &d.environment == e))
                    .take(limit)
                    .map(|d| {
                        let mut view = d.view();
                        view.log.clear();
                        view
                    })
                    .collect();
                Ok(AdminResponse::Deployments(views))
            }
            AdminRequest::ShowDeployment { id } => {
                let record = self
                    .store
                    .deployment(id)
                    .map_err(internal)?
                    .ok_or_else(|| {
                        crate::runs::not_found(format!(
                            "no deployment {id}; `gantry deployments list` shows them"
                        ))
                    })?;
                Ok(AdminResponse::Deployment(record.view()))
            }
            AdminRequest::ApproveDeployment { .. }
            | AdminRequest::PromoteDeployment { .. }
            | AdminRequest::AbortDeployment { .. }
            | AdminRequest::Rollback(_)
            | AdminRequest::UpgradeAgents { .. } => Err(invalid(
                "deployment changes are answered by the session, not here".into(),
            )),
            AdminRequest::Stats {
                since_ms,
                environment,
            } => {
                let names: Vec<String> = match environment {
                    Some(env) => {
                        if self.store.environment(&env).map_err(internal)?.is_none() {
                            return Err(crate::runs::not_found(format!(
                                "no environment {env}; `gantry env list` shows them"
                            )));
                        }
                        vec![env]
                    }
                    None => self
                        .store
                        .environments()
                        .map_err(internal)?
                        .into_iter()
                        .map(|e| e.name)
                        .collect(),
                };
                let mut run_created: HashMap<gantry_protocol::RunId, Option<UnixMillis>> =
                    HashMap::new();
                let mut facts = Vec::new();
                for record in self
                    .store
                    .deployments(usize::MAX, false)
                    .map_err(internal)?
                {
                    let created = match record.job {
                        Some((job, _)) => *run_created.entry(job.run).or_insert_with(|| {
                            self.store.run(job.run).ok().flatten().map(|r| r.created_at)
                        }),
                        None => None,
                    };
                    facts.extend(crate::stats::Fact::of(&record, created));
                }
                let since = UnixMillis(now.0.saturating_sub(since_ms));
                Ok(AdminResponse::Stats(crate::stats::compute(
                    &facts,
                    &names,
                    since,
                    UnixMillis(now.0 + 1),
                )))
            }
            AdminRequest::IssueAdmin { name, csr_der } => {
                if !gantry_certs::identity::valid_admin_name(&name) {
                    return Err(invalid(format!(
                        "invalid admin name {name:?}: use 1 to 64 of a-z 0-9 . _ -"
                    )));
                }
                let cert = self
                    .ca
                    .sign_csr(
                        &csr_der,
                        &Identity::Admin(name.clone()),
                        SystemTime::now(),
                        gantry_certs::ADMIN_CERT_LIFETIME,
                    )
                    .map_err(|e| invalid(format!("certificate request refused: {e}")))?;
                let detail = format!("name={name} certificate_serial={}", cert.serial_hex);
                self.store
                    .audit(&audit("admin.issue", detail))
                    .map_err(internal)?;
                Ok(AdminResponse::AdminIssued {
                    certificate_pem: cert.pem,
                    ca_certificate_pem: self.ca.cert_pem().to_owned(),
                })
            }
            AdminRequest::Audit { limit } => {
                let entries = self
                    .store
                    .audit_tail(limit.clamp(1, 10_000) as usize)
                    .map_err(internal)?;
                Ok(AdminResponse::Audit(
                    entries
                        .into_iter()
                        .map(|e| AuditView {
                            at: e.at,
                            actor: e.actor,
                            action: e.action,
                            detail: e.detail,
                        })
                        .collect(),
                ))
            }
        })();
        result.unwrap_or_else(AdminResponse::Error)
    }

    /// `gantry gc`: expires, evicts and collects now, and records who asked.
    async fn gc(&self, actor: &str, dry_run: bool, grace_secs: Option<u64>) -> AdminResponse {
        let grace = grace_secs.map(Duration::from_secs);
        match self.artifacts.collect_garbage(dry_run, grace).await {
            Ok(report) => {
                if !dry_run {
                    let entry = AuditEntry {
                        at: UnixMillis::now(),
                        actor: actor.to_owned(),
                        action: "gc".into(),
                        detail: format!(
                            "artifacts_expired={} caches_evicted={} chunks_deleted={} bytes_freed={}",
                            report.artifacts_expired,
                            report.caches_evicted,
                            report.chunks_deleted,
                            report.bytes_freed
                        ),
                    };
                    if let Err(e) = self.store.audit(&entry) {
                        tracing::warn!("cannot audit a garbage collection: {e}");
                    }
                }
                AdminResponse::Gc(report)
            }
            Err(message) => AdminResponse::Error(AdminError {
                kind: gantry_protocol::AdminErrorKind::Internal,
                message,
            }),
        }
    }

    fn view(&self, r: &AgentRecord) -> AgentView {
        let reg = lock(&self.registry);
        let live = reg.live.get(&r.id);
        let state = if r.revoked_at.is_some() {
            AgentState::Revoked
        } else if live.is_some() {
            AgentState::Connected
        } else {
            AgentState::Disconnected
        };
        let mut labels = r.effective_labels();
        let (mut hostname, mut capabilities, mut slots, mut version) = (
            r.hostname.clone(),
            r.capabilities.clone(),
            r.slots,
            r.agent_version.clone(),
        );
        if let Some(h) = live.and_then(|s| s.hello.as_ref()) {
            // Hello facts not yet flushed to the store are fresher.
            hostname.clone_from(&h.hostname);
            capabilities.clone_from(&h.capabilities);
            slots = h.slots;
            version.clone_from(&h.agent_version);
            let mut l = h.labels.clone();
            l.extend(r.assigned_labels.clone());
            labels = l;
        }
        AgentView {
            agent_id: r.id.clone(),
            hostname,
            state,
            labels,
            capabilities,
            slots,
            agent_version: version,
            enrolled_at: r.enrolled_at,
            last_seen: live.map(|s| s.last_seen).or(r.last_seen),
            remote_address: live
                .map(|s| s.address.clone())
                .or_else(|| r.last_address.clone()),
            figures: live
                .and_then(|s| s.figures.clone())
                .or_else(|| r.figures.clone()),
            certificate_not_after: r.certificate_not_after,
            revoked_at: r.revoked_at,
        }
    }
}

/// The digest, size and version of an agent binary, checking that it runs.
fn describe_agent_binary(path: &std::path::Path) -> Result<gantry_protocol::AgentBinary, String> {
    let sha256 = crate::distribute::sha256_file(path).map_err(|e| e.to_string())?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version exited with {}: not a working agent binary; fix agent_binary in coordinator.toml",
            path.display(),
            out.status
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(gantry_protocol::AgentBinary {
        sha256,
        version,
        bytes,
    })
}

/// Most approvals an environment may require.
const MAX_APPROVALS: u32 = 10;
/// Longest wait timer an environment may have: 30 days.
const MAX_WAIT_MS: u64 = 30 * 86_400_000;

impl Coordinator {
    /// Connected hosts whose labels match `select`, by hostname.
    fn exec_targets(&self, select: &Labels) -> Vec<gantry_protocol::ExecHost> {
        let mut hosts: Vec<(AgentId, String)> = lock(&self.registry)
            .live
            .iter()
            .filter(|(_, s)| gantry_scheduler::labels_match(&s.labels, select))
            .map(|(id, s)| (id.clone(), s.hostname.clone()))
            .collect();
        hosts.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        crate::deployments::distinct_names(&mut hosts);
        hosts
            .into_iter()
            .map(|(agent, hostname)| gantry_protocol::ExecHost { agent, hostname })
            .collect()
    }

    /// The agent binary new hosts get and fleet upgrades install.
    fn agent_binary(&self) -> Result<std::path::PathBuf, String> {
        crate::distribute::find_agent_binary(self.settings.agent_binary.as_deref())
            .map_err(|e| e.to_string())
    }

    /// `gantry agents upgrade`: checks the agent binary (digest, size, that it runs),
    /// then hands the rollout to the deployment manager.
    async fn upgrade_agents(
        &self,
        actor: &str,
        select: Labels,
        batch: u32,
        failure_budget: u32,
        timeout_ms: u64,
    ) -> AdminResponse {
        let error = |message: String| {
            AdminResponse::Error(AdminError {
                kind: gantry_protocol::AdminErrorKind::InvalidInput,
                message,
            })
        };
        let select = match check_labels(&select) {
            Ok(s) => s,
            Err(e) => return error(e),
        };
        if timeout_ms < 1000 {
            return error("--timeout must be at least 1s".into());
        }
        let path = match self.agent_binary() {
            Ok(p) => p,
            Err(e) => return error(e),
        };
        let described = tokio::task::spawn_blocking(move || describe_agent_binary(&path)).await;
        let binary = match described {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return error(e),
            Err(e) => return error(e.to_string()),
        };
        self.deployments
            .admin(
                actor,
                AdminOp::UpgradeAgents {
                    select,
                    batch,
                    failure_budget,
                    timeout_ms,
                    binary,
                },
            )
            .await
    }

    /// Streams the agent binary to an agent, if its digest is the one asked for.
    async fn send_agent_binary(
        &self,
        sha256: &str,
        writer: &mut FrameWriter,
    ) -> Result<(), String> {
        use std::io::Read as _;
        let path = self.agent_binary()?;
        let actual = crate::distribute::sha256_file(&path).map_err(|e| e.to_string())?;
        if actual != sha256 {
            return Err(format!(
                "asked for agent binary {sha256}, but {} is {actual}",
                path.display()
            ));
        }
        let mut file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            writer
                .send(&gantry_protocol::SourceData(buf[..n].to_vec()))
                .await
                .map_err(|e| e.to_string())?;
        }
    }

    /// Queues a message for a connected host; `false` if it has no session.
    fn send_to(&self, agent: &AgentId, message: CoordinatorMessage) -> bool {
        lock(&self.registry)
            .live
            .get(agent)
            .is_some_and(|s| s.outbound.send(message).is_ok())
    }
}

/// Validates labels from the wire with the same rules as the CLI.
fn check_labels(labels: &Labels) -> Result<Labels, String> {
    crate::base::labels::check_labels(labels).map_err(|e| e.to_string())
}

fn agent_not_found(id: &AgentId) -> AdminError {
    crate::runs::not_found(format!(
        "no agent {id}; `gantry agents list` shows the enrolled ones"
    ))
}

fn store_err(e: StoreError, id: &AgentId) -> AdminError {
    match e {
        StoreError::UnknownAgent(_) => agent_not_found(id),
        other => internal(other),
    }
}

/// Closes a connection for a stream error, with the matching code and the error as reason.
fn close_for(conn: &Connection, e: &TransportError) {
    let code = match e {
        TransportError::Frame(gantry_protocol::FrameError::TooLarge { .. }) => {
            CloseCode::FrameTooLarge
        }
        TransportError::Frame(_) => CloseCode::Malformed,
        TransportError::Timeout { .. } => CloseCode::Timeout,
        _ => return,
    };
    tracing::info!(remote = %conn.remote_address(), error = %e, "closing connection");
    conn.close(code, truncate(&e.to_string()));
}

/// Sends a typed refusal, lets the peer read it, then closes with `code`.
async fn refuse(
    conn: &Connection,
    writer: &mut FrameWriter,
    code: CloseCode,
    reason: RefusalReason,
    message: String,
) {
    let _ = writer
        .send(&HelloReply::Refused(Refusal {
            reason,
            message: message.clone(),
        }))
        .await;
    writer.finish();
    // A peer that read the refusal closes by itself; one that does not is cut off after 1 s.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(code, truncate(&message));
}

/// What a refusal of `row` says besides the table, when the caller is who it is.
fn stream_detail(row: Request) -> &'static str {
    match row {
        Request::StreamResolveArtifact => "only admins ask for an artifact by run and name",
        Request::StreamGetManifestAdmin
        | Request::StreamFetchChunksAdmin
        | Request::StreamUploadAdmin => "an agent cannot use an admin grant",
        Request::StreamUploadDeploy => "a deploy grant reads only its deployment's release",
        Request::StreamUploadJob => "uploads are made by the job that declares them",
        Request::StreamLogs | Request::StreamFetchSource | Request::StreamFetchAgentBinary => {
            "only agents open this stream"
        }
        _ => "only admins open this stream",
    }
}

/// Tells a peer the authorization table refused its stream: in the stream's own reply
/// type when it has a refusal, else by resetting the stream with `Unauthorized` (the
/// coordinator's log says why). The peer is told to stop sending either way.
async fn refuse_stream(
    open: &StreamOpen,
    denied: &crate::base::authz::Denied,
    mut writer: FrameWriter,
    mut reader: FrameReader,
) {
    use gantry_protocol::{
        ChunkFrame, ExecEvent, FollowEvent, ManifestFrame, PutReply, ResolveReply, SourceStored,
        UploadReply,
    };
    let message = denied.to_string();
    writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
    let sent = match open {
        StreamOpen::Resolve(_) => writer.send(&ResolveReply::Refused { message }).await,
        StreamOpen::GetManifest { .. } => writer.send(&ManifestFrame::Refused { message }).await,
        StreamOpen::FetchChunks { .. } => writer.send(&ChunkFrame::Refused { message }).await,
        StreamOpen::Upload { .. } => writer.send(&UploadReply::Refused { message }).await,
        StreamOpen::PutChunks { .. } => writer.send(&PutReply::Refused { message }).await,
        StreamOpen::UploadSource { .. } => writer.send(&SourceStored::Refused { message }).await,
        StreamOpen::Exec(_) => writer.send(&ExecEvent::Refused { message }).await,
        StreamOpen::FollowLogs { .. } | StreamOpen::FollowRun { .. } => {
            writer
                .send(&FollowEvent::Error(crate::base::authz::forbidden(denied)))
                .await
        }
        StreamOpen::Logs { .. }
        | StreamOpen::FetchSource { .. }
        | StreamOpen::FetchAgentBinary { .. } => {
            writer.reset(CloseCode::Unauthorized);
            reader.stop(CloseCode::Unauthorized);
            return;
        }
    };
    if sent.is_ok() {
        writer.finish();
    }
    reader.stop(CloseCode::Unauthorized);
}

/// A token bucket: `rate` per second, at most `burst` saved up.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<tokio::time::Instant>,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: None,
        }
    }

    /// Takes a token; `Some(wait)` when there is none yet and the caller must wait that
    /// long for it (the token is then spent).
    fn take(&mut self, now: tokio::time::Instant) -> Option<Duration> {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Aborts a task when the session that owns it ends.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_lets_a_burst_through_then_holds_to_its_rate() {
        let start = tokio::time::Instant::now();
        let mut bucket = TokenBucket::new(100, 10);
        for _ in 0..10 {
            assert_eq!(bucket.take(start), None, "the burst");
        }
        let wait = bucket.take(start).expect("empty");
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-9, "{wait:?}");
        // Ten seconds later the bucket is full again (the token owed paid first), and
        // never holds more than the burst.
        let later = start + Duration::from_secs(10);
        let passed = (0..200)
            .take_while(|_| bucket.take(later).is_none())
            .count();
        assert_eq!(passed, 10, "the burst caps what is saved up");
    }

    #[test]
    fn heartbeat_presence_is_written_once_a_minute_and_new_sessions_and_shutdown_at_once() {
        let written = Instant::now();
        let soon_after = written + Duration::from_secs(10);
        let a_minute_later = written + PRESENCE_PERSIST_INTERVAL;
        let due = PresenceFlush::Due;
        // A new session (never written: its hello facts) at the first flush.
        assert!(due.writes(true, None, written));
        // Heartbeat figures: not again within the minute, then again.
        assert!(!due.writes(true, Some(written), soon_after));
        assert!(due.writes(true, Some(written), a_minute_later));
        // Shutdown writes whatever changed; nothing changed is never written.
        assert!(PresenceFlush::Everything.writes(true, Some(written), soon_after));
        assert!(!PresenceFlush::Everything.writes(false, Some(written), a_minute_later));
        assert!(!due.writes(false, None, written));
    }
}
