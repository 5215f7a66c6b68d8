//! Enrolled agents and the live sessions of the connected ones: the registry every part
//! that reaches an agent goes through, presence (last seen, figures, hello facts)
//! written to the store in batches, and the agent admin requests (`gantry agents
//! list|show|revoke|label`, `gantry status`).
//!
//! The QUIC edge registers a session when an agent's hello is accepted and removes it
//! when the session ends; everything else (the engine's dispatches, deployments, `gantry
//! exec`, revocation) only looks sessions up here and queues messages on them. It must
//! not read or write a connection itself, beyond closing one that was revoked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_certs::RevocationSet;
use gantry_protocol::{
    AdminErrorKind, AgentId, AgentState, AgentView, CloseCode, CoordinatorMessage, ExecHost,
    HostFigures, Labels, StatusView, UnixMillis,
};
use gantry_scheduler::Event;
use gantry_transport::Connection;
use tokio::sync::mpsc;

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::base::labels::{check_labels, LabelError};
use crate::services::deployments::distinct_names;
use crate::services::engine::Engine;
use crate::store::{AgentRecord, HelloFacts, Presence, Store, StoreError};

/// How often presence (last seen, figures) is written to the store. Presence is not an
/// acknowledgement, so batching it keeps 10,000 heartbeats/5 s from becoming 2,000 fsyncs/s.
pub const PRESENCE_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// How stale a connected agent's stored presence may become. Views of connected agents
/// read the registry, so the stored copy matters only after a crash (a departure and a
/// graceful shutdown write the exact figures). Rewriting every heard agent's record at
/// each flush was, with 10,000 agents, ~5,000 record rewrites a second for figures no
/// one reads (docs/decisions/0071-presence-once-a-minute.md).
pub const PRESENCE_PERSIST_INTERVAL: Duration = Duration::from_secs(60);

/// Why an agent request failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent {0}; `gantry agents list` shows the enrolled ones")]
    NotFound(AgentId),
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownAgent(id) => Self::NotFound(id),
            other => Self::Store(other),
        }
    }
}

impl AdminFailure for AgentError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::NotFound(_) => AdminErrorKind::NotFound,
            Self::Labels(_) => AdminErrorKind::InvalidInput,
            Self::Store(_) => AdminErrorKind::Internal,
        }
    }
}

/// Which presence [`Agents::flush_presence`] writes.
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

/// A live agent session, as the QUIC edge registers it.
#[derive(Debug)]
pub struct LiveSession {
    /// Numbers the agent's sessions, so an old session's end does not remove a newer one.
    pub session: u64,
    pub conn: Connection,
    pub address: String,
    pub last_seen: UnixMillis,
    pub figures: Option<HostFigures>,
    pub hello: Option<HelloFacts>,
    /// Hostname and labels (reported and assigned) as of the hello, for deployments.
    pub hostname: String,
    pub labels: Labels,
    /// Where the other hosts of a deployment reach this agent's peer listener: the
    /// address this session comes from, with the port the hello named.
    pub peer_address: Option<String>,
    /// Messages for the agent (dispatches, cancels, acknowledgements), sent in order.
    pub outbound: mpsc::UnboundedSender<CoordinatorMessage>,
    /// Presence changed since it was last written to the store.
    dirty: bool,
    /// When this session's presence was last written (`None`: not yet).
    persisted_at: Option<Instant>,
    /// A heartbeat arrived since the last flush: its leases are due for renewal.
    heard: bool,
}

impl LiveSession {
    /// A session that has just said hello: its presence is written at the next flush.
    #[allow(clippy::too_many_arguments)] // one per fact of a hello, named at the call
    pub fn new(
        session: u64,
        conn: Connection,
        last_seen: UnixMillis,
        figures: HostFigures,
        hello: HelloFacts,
        labels: Labels,
        peer_address: Option<String>,
        outbound: mpsc::UnboundedSender<CoordinatorMessage>,
    ) -> Self {
        Self {
            session,
            address: conn.remote_address().to_string(),
            conn,
            last_seen,
            figures: Some(figures),
            hostname: hello.hostname.clone(),
            hello: Some(hello),
            labels,
            peer_address,
            outbound,
            dirty: true,
            persisted_at: None,
            heard: false,
        }
    }
}

/// Whether session `newcomer` may replace the agent's `live` one. Sessions are numbered
/// in the order their connections arrived, so only a later connection replaces: a hello
/// that arrives late on a connection from the agent's previous life is refused instead
/// of closing the session the agent now uses.
fn supersedes(newcomer: u64, live: Option<u64>) -> bool {
    live.is_none_or(|live| newcomer > live)
}

/// A hello came on a connection older than the agent's live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this connection is older than the agent's live session ({live}): a hello from its previous life cannot replace it; the agent goes on on its newer connection")]
pub struct Superseded {
    pub live: u64,
}

/// Live agent sessions by agent id, and presence not yet written to the store.
#[derive(Debug, Default)]
struct Registry {
    live: HashMap<AgentId, LiveSession>,
    departed: Vec<Presence>,
}

/// The agents service; one per coordinator.
#[derive(Debug)]
pub struct Agents {
    registry: Mutex<Registry>,
    store: Arc<Store>,
    /// Certificates of revoked agents; the TLS configuration refuses them.
    revoked: RevocationSet,
}

impl Agents {
    pub fn new(store: Arc<Store>, revoked: RevocationSet) -> Self {
        Self {
            registry: Mutex::default(),
            store,
            revoked,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a session; the agent's previous session, if any, is closed.
    pub fn register(&self, id: AgentId, session: LiveSession) -> Result<(), Superseded> {
        let mut reg = self.lock();
        let live = reg.live.get(&id).map(|s| s.session);
        if !supersedes(session.session, live) {
            return Err(Superseded {
                live: live.unwrap_or_default(),
            });
        }
        let replaced = reg.live.insert(id, session);
        drop(reg);
        if let Some(old) = replaced {
            old.conn.close(
                CloseCode::Replaced,
                "a newer session of this agent replaced this one",
            );
        }
        Ok(())
    }

    /// Ends session `session` of `id` (unless a newer one replaced it); its presence is
    /// written at the next flush.
    pub fn depart(&self, id: AgentId, session: u64) {
        let mut reg = self.lock();
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

    /// A heartbeat on session `session` of `id`. The scheduler hears of it with the next
    /// presence flush, however many heartbeats arrive until then (a flooding agent costs
    /// nothing more there).
    pub fn heartbeat(&self, id: &AgentId, session: u64, figures: HostFigures) {
        let mut reg = self.lock();
        if let Some(s) = reg.live.get_mut(id).filter(|s| s.session == session) {
            s.last_seen = UnixMillis::now();
            s.figures = Some(figures);
            s.dirty = true;
            s.heard = true;
        }
    }

    /// The message queue of session `session` of `id`, while it is the live one.
    pub fn outbound(
        &self,
        id: &AgentId,
        session: u64,
    ) -> Option<mpsc::UnboundedSender<CoordinatorMessage>> {
        self.lock()
            .live
            .get(id)
            .filter(|s| s.session == session)
            .map(|s| s.outbound.clone())
    }

    /// Queues a message for a connected agent; `false` if it has no session.
    pub fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool {
        self.lock()
            .live
            .get(agent)
            .is_some_and(|s| s.outbound.send(message).is_ok())
    }

    /// Connected agents: id, hostname and labels (reported and assigned).
    pub fn connected(&self) -> Vec<(AgentId, String, Labels)> {
        self.lock()
            .live
            .iter()
            .map(|(id, s)| (id.clone(), s.hostname.clone(), s.labels.clone()))
            .collect()
    }

    /// How many agents are connected.
    pub fn connected_count(&self) -> u64 {
        self.lock().live.len() as u64
    }

    /// Whether a connected agent's labels (capabilities among them) hold `key=true`.
    pub fn has_label(&self, agent: &AgentId, key: &str) -> bool {
        self.lock()
            .live
            .get(agent)
            .is_some_and(|s| s.labels.get(key).is_some_and(|v| v == "true"))
    }

    /// Where a connected agent serves peers (`ip:port`), if it does.
    pub fn peer_address(&self, agent: &AgentId) -> Option<String> {
        self.lock()
            .live
            .get(agent)
            .and_then(|s| s.peer_address.clone())
    }

    /// Whether `agent` has been revoked since the coordinator started or before.
    pub fn is_revoked(&self, agent: &AgentId) -> bool {
        self.revoked.contains(agent)
    }

    /// Connected hosts whose labels match `select`, by hostname (`gantry exec`).
    pub fn matching(&self, select: &Labels) -> Vec<ExecHost> {
        let mut hosts: Vec<(AgentId, String)> = self
            .lock()
            .live
            .iter()
            .filter(|(_, s)| gantry_scheduler::labels_match(&s.labels, select))
            .map(|(id, s)| (id.clone(), s.hostname.clone()))
            .collect();
        hosts.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        distinct_names(&mut hosts);
        hosts
            .into_iter()
            .map(|(agent, hostname)| ExecHost { agent, hostname })
            .collect()
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
    pub fn flush_presence(&self, what: PresenceFlush, engine: &Engine) {
        let mut heard = Vec::new();
        let now = Instant::now();
        let batch = {
            let mut reg = self.lock();
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
            engine.event(Event::AgentHeartbeat { agent });
        }
        if let Err(e) = self.store.record_presence(&batch) {
            tracing::warn!(error = %e, agents = batch.len(), "could not record agent presence; will retry");
            self.lock().departed.extend(batch);
        }
    }

    /// `gantry agents list`: every enrolled agent, by hostname.
    pub fn list(&self) -> Result<Vec<AgentView>, AgentError> {
        let mut views: Vec<AgentView> = self.store.agents()?.iter().map(|r| self.view(r)).collect();
        views.sort_by(|a, b| {
            a.hostname
                .cmp(&b.hostname)
                .then_with(|| a.agent_id.cmp(&b.agent_id))
        });
        Ok(views)
    }

    /// `gantry agents show`.
    pub fn show(&self, agent_id: &AgentId) -> Result<AgentView, AgentError> {
        let record = self
            .store
            .agent(agent_id)?
            .ok_or_else(|| AgentError::NotFound(agent_id.clone()))?;
        Ok(self.view(&record))
    }

    /// `gantry agents revoke`: durable first, then its certificate is refused and its
    /// live connection closed.
    pub fn revoke(&self, cx: &Acting<'_>, agent_id: &AgentId) -> Result<AgentView, AgentError> {
        let now = cx.now;
        let record = self.store.update_agent(
            agent_id,
            Some(&cx.audit("agent.revoke", format!("agent={agent_id}"))),
            |r| {
                r.revoked_at.get_or_insert(now);
            },
        )?;
        self.revoked.insert(agent_id.clone());
        let live = self.lock().live.remove(agent_id);
        if let Some(s) = live {
            s.conn.close(
                CloseCode::Revoked,
                &format!("agent {agent_id} was revoked by {}", cx.actor),
            );
            tracing::info!(agent = %agent_id, "revoked: live connection closed");
        }
        Ok(self.view(&record))
    }

    /// `gantry agents label`: sets and removes assigned labels.
    pub fn label(
        &self,
        cx: &Acting<'_>,
        agent_id: &AgentId,
        set: &Labels,
        remove: &[String],
    ) -> Result<AgentView, AgentError> {
        let set = check_labels(set)?;
        let detail = format!("agent={agent_id} set={set:?} remove={remove:?}");
        let record =
            self.store
                .update_agent(agent_id, Some(&cx.audit("agent.label", detail)), |r| {
                    for k in remove {
                        r.assigned_labels.remove(k);
                    }
                    r.assigned_labels.extend(set);
                })?;
        Ok(self.view(&record))
    }

    /// `gantry status`: the coordinator's state at a glance.
    pub fn status(
        &self,
        now: UnixMillis,
        listen_address: &str,
        started_at: Instant,
    ) -> Result<StatusView, AgentError> {
        let counts = self.store.counts(now)?;
        Ok(StatusView {
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: gantry_protocol::PROTOCOL_VERSION,
            listen_address: listen_address.to_owned(),
            uptime_secs: started_at.elapsed().as_secs(),
            agents_total: counts.agents,
            agents_connected: self.connected_count(),
            agents_revoked: counts.revoked,
            tokens_active: counts.tokens_active,
        })
    }

    /// An agent as admins see it: its record, with what its live session knows fresher.
    fn view(&self, r: &AgentRecord) -> AgentView {
        let reg = self.lock();
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn only_a_later_connection_replaces_a_live_session() {
        assert!(supersedes(1, None), "no live session");
        assert!(supersedes(8, Some(7)), "the agent's next life");
        assert!(
            !supersedes(6, Some(7)),
            "a late hello from an earlier connection"
        );
        assert!(!supersedes(7, Some(7)), "the same session again");
    }
}
