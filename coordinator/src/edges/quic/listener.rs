//! The QUIC listener and admission: accepting connections, bounding the handshakes in
//! progress, reading the hello, and handing each connection to the session its
//! certificate allows. Also the presence flush timer and the shutdown (every connection
//! closed, presence written).
//!
//! What a connection may do depends only on the certificate it presented:
//! no certificate → enroll, nothing else; an agent certificate → an agent session;
//! an admin certificate → admin requests. Anything else is refused with a reason the
//! peer can show, and the connection closed with a [`CloseCode`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_certs::Identity;
use gantry_protocol::{limits, CloseCode, HelloError, Intent, RefusalReason};
use gantry_transport::{Incoming, Listener};
use tokio::sync::Semaphore;

use crate::base::authz::{Principal, Request};
use crate::edges::quic::wire::{close_for, refuse, truncate, Numbers};
use crate::edges::quic::{admin, agent, enroll};
use crate::services::agents::{PresenceFlush, PRESENCE_FLUSH_INTERVAL};
use crate::services::coordinator::Coordinator;

/// Handshakes in progress at once; more are refused until some finish (connection storms).
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Handshakes in progress from which a new attempt must first prove its address with a
/// Retry (one more round trip, no state kept until it comes back). A sender that never
/// reads what it is sent (spoofed addresses, raw Initial packets) can then hold at most
/// these slots, and the rest stay free for clients that answer, enrolled agents among them.
pub const RETRY_FROM: usize = MAX_PENDING_HANDSHAKES / 4;

/// What is done with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Take a handshake slot if one is free (the semaphore decides; none free: refused).
    Handshake,
    /// Ask it to prove its address first (stateless).
    Retry,
}

/// The decision for an attempt arriving while `pending` handshakes are in progress:
/// below [`RETRY_FROM`] everyone is served at once; from there only attempts whose
/// address is validated try for a slot, and the others are sent a Retry (even when
/// every slot is taken: it costs nothing, and the answer may find a free one).
fn admit(pending: usize, address_validated: bool) -> Admit {
    if !address_validated && pending >= RETRY_FROM {
        Admit::Retry
    } else {
        Admit::Handshake
    }
}

/// Accepts connections for `coord` until `shutdown` resolves, then closes them all and
/// flushes presence.
pub async fn serve(
    coord: Arc<Coordinator>,
    listener: Listener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let admission = Arc::new(Admission {
        coord,
        handshakes: Semaphore::new(MAX_PENDING_HANDSHAKES),
        unauthenticated: Semaphore::new(limits::MAX_UNAUTHENTICATED_PENDING),
        next_session: AtomicU64::new(1),
        next_connection: AtomicU64::new(1),
    });
    admission.serve(listener, shutdown).await;
}

/// The listener's state: the coordinator, and the bounds on connections being admitted.
struct Admission {
    coord: Arc<Coordinator>,
    handshakes: Semaphore,
    /// Connections without a certificate waiting for their hello.
    unauthenticated: Semaphore,
    next_session: AtomicU64,
    next_connection: AtomicU64,
}

impl Admission {
    fn numbers(&self) -> Numbers {
        Numbers {
            session: self.next_session.fetch_add(1, Ordering::Relaxed),
            connection: self.next_connection.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Accepts connections until `shutdown` resolves, then closes them all and flushes
    /// presence.
    async fn serve(
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
                    let _ = tokio::task::spawn_blocking(move || {
                        me.coord
                            .agents
                            .flush_presence(PresenceFlush::Due, &me.coord.engine);
                    })
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
        self.coord
            .agents
            .flush_presence(PresenceFlush::Everything, &self.coord.engine);
        let _ = tokio::time::timeout(Duration::from_secs(2), listener.wait_idle()).await;
    }

    /// Admits one connection: a Retry first if handshakes pile up ([`admit`]), a
    /// handshake slot (at most [`MAX_PENDING_HANDSHAKES`] at once), the TLS handshake
    /// and the hello within [`limits::HANDSHAKE_DEADLINE`], then the session its
    /// certificate and the authorization table allow, or a refusal.
    async fn handle_incoming(self: Arc<Self>, incoming: Incoming) {
        let remote = incoming.remote_address();
        // Numbered on arrival, not at the hello: an agent's connections arrive in the
        // order of its lives, while a hello can be late (a slow or stalled peer), and a
        // late hello from an older connection must not pass for the newest one.
        let numbers = self.numbers();
        let pending = MAX_PENDING_HANDSHAKES - self.handshakes.available_permits();
        let incoming = match admit(pending, incoming.address_validated()) {
            Admit::Handshake => incoming,
            Admit::Retry => match incoming.retry() {
                None => {
                    tracing::debug!(%remote, pending, "asked a connection attempt to prove its address (Retry)");
                    return;
                }
                // Validated already: it takes its chance at a slot.
                Some(incoming) => incoming,
            },
        };
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
            // A transfer connection is an agent's, and may do what its session may.
            Intent::Agent(_) | Intent::Transfers(_) => Request::SessionAgent,
            Intent::Admin(_) => Request::SessionAdmin,
        };
        let checked = self.coord.metrics.authz.check(request, principal, || {
            match (&hello.intent, &identity) {
                (_, Some(Err(e))) => format!("client certificate names no Gantry identity: {e}"),
                (Intent::Enroll(_), Some(_)) => {
                    "enrollment must come from a connection without a client certificate".to_owned()
                }
                (_, None) => "no client certificate: an unauthenticated connection may only enroll with a join token".to_owned(),
                (Intent::Admin(_), Some(Ok(other))) => {
                    format!("{other} is not an admin: admin commands need an admin certificate")
                }
                (Intent::Agent(_) | Intent::Transfers(_), Some(Ok(other))) => {
                    format!("{other} is not an agent: an agent session needs an agent certificate")
                }
            }
        });
        let version = hello.version;
        let message = match checked {
            Ok(()) => match (hello.intent, identity) {
                (Intent::Enroll(req), None) => {
                    return enroll::session(&self.coord, &conn, &mut writer, req).await;
                }
                (Intent::Agent(h), Some(Ok(Identity::Agent(id)))) => {
                    return agent::session(
                        self.coord.clone(),
                        conn,
                        writer,
                        reader,
                        id,
                        (h, version),
                        numbers,
                    )
                    .await;
                }
                (Intent::Transfers(_), Some(Ok(Identity::Agent(id)))) => {
                    return agent::transfers(self.coord.clone(), conn, writer, id, numbers).await;
                }
                (Intent::Admin(_), Some(Ok(identity))) => {
                    let actor = identity.uri();
                    return admin::session(self.coord.clone(), conn, writer, reader, actor, principal, numbers)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_prove_their_address_once_handshakes_pile_up() {
        assert_eq!(admit(0, false), Admit::Handshake);
        assert_eq!(admit(RETRY_FROM - 1, false), Admit::Handshake);
        assert_eq!(admit(RETRY_FROM, false), Admit::Retry);
        assert_eq!(admit(RETRY_FROM, true), Admit::Handshake);
        // Unproven attempts are asked to prove themselves even with every slot taken:
        // a Retry keeps nothing, and the answer may find a free slot.
        assert_eq!(admit(MAX_PENDING_HANDSHAKES, false), Admit::Retry);
        assert_eq!(admit(MAX_PENDING_HANDSHAKES, true), Admit::Handshake);
    }
}
