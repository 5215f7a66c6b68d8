//! An agent's session: its hello checked and registered, the control stream both ways
//! (heartbeats, job acceptance and results, deploy results, exec output, certificate
//! renewal; dispatches, cancels and acknowledgements), the streams it opens (logs,
//! sources, the agent binary, artifacts), and what bounds it (a message rate, a silence
//! limit, a stalled writer cut off).
//!
//! Every message that names work is checked against the authorization table with
//! whether this agent holds that work (`services::holds`).

use std::sync::Arc;
use std::time::Duration;

use gantry_certs::Identity;
use gantry_protocol::{
    limits, AgentHello, AgentId, AgentMessage, CloseCode, CoordinatorMessage, RefusalReason,
    StreamOpen, UnixMillis,
};
use gantry_scheduler::Event;
use gantry_transport::{Connection, FrameReader, FrameWriter, TransportError};
use tokio::sync::{mpsc, oneshot};

use crate::base::authz::{Principal, Request};
use crate::base::labels::check_agent_labels;
use crate::base::tasks::AbortOnDrop;
use crate::edges::quic::wire::{
    close_for, refuse, refuse_stream, stream_detail, stream_open, welcome, Numbers,
};
use crate::services::agents::LiveSession;
use crate::services::artifacts::Peer;
use crate::services::coordinator::Coordinator;
use crate::services::engine::{capability_label, execution_label, tree_source_label, Input};
use crate::services::holds::{self, Hold};
use crate::store::{AgentRecord, HelloFacts};

/// Runs an agent's session until it ends: the hello's facts registered, the
/// scheduler and the deployment manager told, then messages both ways. `version` is the
/// hello's protocol version: it decides whether the agent gets `DispatchJob`.
pub async fn session(
    coord: Arc<Coordinator>,
    conn: Connection,
    mut writer: FrameWriter,
    mut reader: FrameReader,
    id: AgentId,
    (hello, version): (AgentHello, u16),
    numbers: Numbers,
) {
    let remote = conn.remote_address();
    let Some(record) = admit(&coord, &conn, &mut writer, &id).await else {
        return;
    };
    let labels = match check_agent_labels(&hello.labels) {
        Ok(l) => l,
        Err(e) => {
            refuse(
                &conn,
                &mut writer,
                CloseCode::Malformed,
                RefusalReason::BadRequest,
                e.to_string(),
            )
            .await;
            return;
        }
    };
    let session = numbers.session;
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
            l.insert(capability_label(cap), "true".into());
        }
        // Only agents that run execution options get jobs that have them.
        if version >= gantry_protocol::EXECUTION_VERSION {
            l.insert(execution_label(), "true".into());
        } else {
            l.remove(&execution_label());
        }
        if version >= gantry_protocol::TREE_SOURCE_VERSION {
            l.insert(tree_source_label(), "true".into());
        } else {
            l.remove(&tree_source_label());
        }
        l
    };
    let slots = facts.slots;
    let peer_address = hello
        .peer_port
        .filter(|port| *port != 0)
        .map(|port| peer_address(remote, port));
    let registered = coord.agents.register(
        id.clone(),
        LiveSession::new(
            session,
            conn.clone(),
            now,
            hello.figures,
            facts,
            effective_labels.clone(),
            peer_address,
            outbound,
        ),
    );
    if let Err(superseded) = registered {
        tracing::info!(agent = %id, %remote, session, "{superseded}");
        refuse(
            &conn,
            &mut writer,
            CloseCode::Replaced,
            RefusalReason::BadRequest,
            superseded.to_string(),
        )
        .await;
        return;
    }
    tracing::info!(agent = %id, %remote, "agent connected");
    let welcome = welcome(
        Identity::Agent(id.clone()).uri(),
        coord.settings.heartbeat_interval,
    );
    let mut end = "the agent ended the session".to_owned();
    // An agent that stops reading its control stream is cut off rather than left
    // holding its session (and the messages queued for it) forever.
    writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
    if let Err(e) = writer.send(&welcome).await {
        end = e.to_string();
    } else {
        let running = hello.running.iter().map(|r| (r.job, r.attempt)).collect();
        coord.engine.event(Event::AgentConnected {
            agent: id.clone(),
            labels: effective_labels,
            slots,
            running,
        });
        coord.deployments.connected(id.clone());
        let streams = AbortOnDrop(tokio::spawn(streams(
            coord.clone(),
            conn.clone(),
            id.clone(),
            numbers.connection,
        )));
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
        let silence_limit = (coord.settings.heartbeat_interval * 3).max(Duration::from_secs(5));
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
                        if let Err(e) = message(&coord, &id, session, msg, &mut writer).await {
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
        coord.execs.host_gone(&id, "the host disconnected");
        coord
            .engine
            .event(Event::AgentDisconnected { agent: id.clone() });
    }
    tracing::info!(agent = %id, %remote, "agent disconnected: {end}");
    coord.agents.depart(id, session);
}

/// The agent's record, if it is enrolled and not revoked; otherwise the connection is
/// refused with the reason.
async fn admit(
    coord: &Coordinator,
    conn: &Connection,
    writer: &mut FrameWriter,
    id: &AgentId,
) -> Option<AgentRecord> {
    let record = match coord.store.agent(id) {
        Ok(Some(r)) => r,
        Ok(None) => {
            let msg = format!("agent {id} is not enrolled with this coordinator; enroll it again with a new token");
            refuse(
                conn,
                writer,
                CloseCode::Unauthorized,
                RefusalReason::NotAuthenticated,
                msg,
            )
            .await;
            return None;
        }
        Err(e) => {
            refuse(
                conn,
                writer,
                CloseCode::ShuttingDown,
                RefusalReason::Internal,
                format!("store error: {e}"),
            )
            .await;
            return None;
        }
    };
    if record.revoked_at.is_some() || coord.agents.is_revoked(id) {
        let msg = format!("agent {id} has been revoked; enroll it again with a new token");
        refuse(
            conn,
            writer,
            CloseCode::Revoked,
            RefusalReason::Revoked,
            msg,
        )
        .await;
        return None;
    }
    Some(record)
}

/// Serves an agent's transfer connection ([`gantry_protocol::Intent::Transfers`]) until
/// it closes: the streams the agent opens, exactly as on its session's connection, and
/// nothing else (no session is registered, nothing is dispatched on it). The agent lets
/// it close itself once idle (`IDLE_TIMEOUT`), so only agents transferring hold one.
pub async fn transfers(
    coord: Arc<Coordinator>,
    conn: Connection,
    mut writer: FrameWriter,
    id: AgentId,
    numbers: Numbers,
) {
    if admit(&coord, &conn, &mut writer, &id).await.is_none() {
        return;
    }
    let welcome = welcome(
        Identity::Agent(id.clone()).uri(),
        coord.settings.heartbeat_interval,
    );
    writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
    if let Err(e) = writer.send(&welcome).await {
        tracing::info!(agent = %id, "transfer connection ended before its welcome: {e}");
        return;
    }
    tracing::debug!(agent = %id, remote = %conn.remote_address(), "transfer connection opened");
    streams(coord, conn, id, numbers.connection).await;
}

/// Acts on one message from an agent's control stream.
async fn message(
    coord: &Coordinator,
    id: &AgentId,
    session: u64,
    msg: AgentMessage,
    writer: &mut FrameWriter,
) -> Result<(), TransportError> {
    if let Some(row) = Request::of_agent_message(&msg) {
        let (holds, why) = holds(coord, id, &msg);
        if let Err(denied) = coord
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
        AgentMessage::Heartbeat(figures) => coord.agents.heartbeat(id, session, figures),
        AgentMessage::RenewCertificate { csr_der } => {
            let reply = coord.access.renew(id, &csr_der);
            writer.send(&reply).await?;
        }
        AgentMessage::JobAccepted { job, attempt } => {
            coord.engine.event(Event::JobAccepted {
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
            coord.engine.event(Event::JobRejected {
                job,
                attempt,
                agent: id.clone(),
                reason,
            });
        }
        AgentMessage::DeployResult(result) => coord.deployments.result(id.clone(), result),
        AgentMessage::ExecOutput { id: exec, data } => coord.execs.output(exec, id, data),
        AgentMessage::ExecDone { id: exec, result } => coord.execs.done(exec, id, result),
        AgentMessage::JobFinished(result) => finished(coord, id, session, result, None),
        AgentMessage::JobFinishedWithOutputs { result, outputs } => {
            finished(coord, id, session, result, Some(outputs));
        }
    }
    Ok(())
}

/// Hands a job's result (and outputs) to the engine and acknowledges it to the agent
/// once it is durable; meanwhile the session keeps serving. An unacknowledged result is
/// sent again by the agent.
fn finished(
    coord: &Coordinator,
    id: &AgentId,
    session: u64,
    result: gantry_protocol::JobResult,
    outputs: Option<gantry_protocol::Labels>,
) {
    let (job, attempt) = (result.job, result.attempt);
    let (ack, acked) = oneshot::channel();
    coord.engine.send(Input::Finished {
        agent: id.clone(),
        result,
        outputs,
        ack,
    });
    let outbound = coord.agents.outbound(id, session);
    tokio::spawn(async move {
        if acked.await.is_ok() {
            if let Some(out) = outbound {
                let _ = out.send(CoordinatorMessage::JobFinishedAck { job, attempt });
            }
        }
    });
}

/// Whether agent `id` holds the work `message` names, and if not, why.
fn holds(coord: &Coordinator, id: &AgentId, message: &AgentMessage) -> (bool, String) {
    let handed = |job, attempt| holds::attempt_or_why(&coord.store, id, job, attempt, Hold::Handed);
    match message {
        AgentMessage::JobAccepted { job, attempt }
        | AgentMessage::JobRejected { job, attempt, .. } => handed(*job, *attempt),
        AgentMessage::JobFinished(result) | AgentMessage::JobFinishedWithOutputs { result, .. } => {
            handed(result.job, result.attempt)
        }
        AgentMessage::DeployResult(result) => {
            match holds::deployment(&coord.store, id, result.deployment, None) {
                Ok(None) => (true, String::new()),
                Ok(Some(why)) => (false, why),
                Err(e) => (
                    false,
                    format!("cannot read deployment {}: {e}", result.deployment),
                ),
            }
        }
        AgentMessage::ExecOutput { id: exec, .. } | AgentMessage::ExecDone { id: exec, .. } => {
            if coord.execs.targets(*exec, id) {
                (true, String::new())
            } else {
                (false, format!("exec {exec} is not running on {id}"))
            }
        }
        AgentMessage::Heartbeat(_) | AgentMessage::RenewCertificate { .. } => (true, String::new()),
    }
}

/// Accepts the streams an agent opens besides the control stream (job logs, source
/// trees, artifacts and caches). A stream that names work is checked against the
/// authorization table by its handler, which knows who holds that work; every other
/// stream is checked here, for an agent as such.
async fn streams(coord: Arc<Coordinator>, conn: Connection, agent: AgentId, connection: u64) {
    while let Ok((mut writer, mut reader)) = conn.accept_stream().await {
        let me = coord.clone();
        let agent = agent.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let Some(open) = stream_open(&mut reader, agent.as_str()).await else {
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
                    if let Err(e) = me
                        .runs
                        .receive_log(&agent, job, attempt, writer, reader)
                        .await
                    {
                        tracing::info!(%agent, %job, attempt, "log stream ended: {e}");
                    }
                }
                StreamOpen::Reports { job, attempt } => {
                    if let Err(e) = me
                        .runs
                        .receive_reports(&agent, job, attempt, writer, reader)
                        .await
                    {
                        tracing::info!(%agent, %job, attempt, "report stream refused or broken: {e}");
                    }
                }
                StreamOpen::FetchAgentBinary { sha256 } => {
                    if let Err(e) = me.upgrades.send(&sha256, &mut writer).await {
                        tracing::info!(%agent, "agent binary fetch refused or broken: {e}");
                    }
                    writer.finish();
                }
                StreamOpen::FetchSource { job, attempt } => {
                    if let Err(e) = me.runs.send_source(&agent, job, attempt, &mut writer).await {
                        tracing::info!(%agent, %job, attempt, "source fetch refused or broken: {e}");
                    }
                    writer.finish();
                }
                open @ (StreamOpen::Resolve(_)
                | StreamOpen::GetManifest { .. }
                | StreamOpen::FetchChunks { .. }
                | StreamOpen::Upload { .. }
                | StreamOpen::PutChunks { .. }) => {
                    let peer = Peer::Agent(agent.clone());
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
}
