//! Moving bytes between this host and the coordinator or its peers: what every
//! transfer shares ([`Transfers`]: the local chunk cache and the rate caps), where a
//! transfer gets its connection ([`ConnectionSource`]) and how it resumes on the next
//! one when a connection breaks ([`with_retries`]). Transfers to and from the
//! coordinator go on a connection of their own ([`TransferLink`]), with QUIC limits for
//! bulk that the session's connection does without. [`artifacts`] holds a job's inputs
//! and outputs; [`checkout`] a job's checkout of a commit through the chunk store; [`peers`] serves and fetches deployment releases between hosts.
//!
//! The transfers themselves are `gantry-transfer`'s. This layer must not know jobs'
//! steps or deployment steps: they call it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gantry_protocol::{limits, CloseCode, HelloReply, Intent, TransfersHello};
use gantry_transfer::{ChunkCache, TransferError, TransferOptions};
use gantry_transport::{Connection, Dialer, TransportError};

use crate::runner::LogSink;

pub mod artifacts;
pub mod checkout;
pub mod peers;

/// How long a transfer waits for a connection to the coordinator before giving up.
const CONNECTION_WAIT: Duration = Duration::from_secs(60);
/// Most attempts of one transfer across dropped connections.
const MAX_ATTEMPTS: u32 = 20;

/// What the agent's jobs share for transfers.
#[derive(Debug, Clone)]
pub struct Transfers {
    pub cache: ChunkCache,
    /// Downloads: streams, and the cap on what this agent receives.
    pub options: TransferOptions,
    /// Uploads (and serving peers): the cap on what this agent sends.
    pub send_options: TransferOptions,
}

/// Where a job gets its connection: the agent's current one, which changes when the
/// agent reconnects.
pub trait ConnectionSource: Send + Sync {
    fn current(&self) -> Option<Connection>;

    /// The session's transfer connection, if it has one to offer; transfers fall back
    /// to [`Self::current`] when it has none or it cannot be opened.
    fn transfer_link(&self) -> Option<Arc<TransferLink>> {
        None
    }
}

/// A session's connection for bulk transfers (`Intent::Transfers`), opened when a
/// transfer first needs it, with bulk QUIC limits (path MTU discovery up to
/// `limits::MAX_UDP_PAYLOAD`, large windows). The session's own connection keeps
/// 1,452-byte packets and small windows, which is what the coordinator pays per
/// connected agent. Without keep-alives, it closes itself after `limits::IDLE_TIMEOUT`
/// with no transfer, and it is opened again by the next one, so an agent holds it only
/// while it transfers (docs/decisions/0086-fleet-scale-transport.md).
#[derive(Debug)]
pub struct TransferLink {
    dialer: Dialer,
    address: String,
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// The coordinator does not serve transfer connections (it predates them): the
    /// session's connection carries the transfers for the rest of this session.
    unsupported: AtomicBool,
}

/// Why a transfer connection could not be opened.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the coordinator refused a transfer connection: {0}")]
    Refused(String),
    #[error("the coordinator answered a transfer connection with something else than a welcome")]
    Unexpected,
}

impl TransferLink {
    /// A link to `address` through `dialer` (made with `Profile::Transfers`).
    pub fn new(dialer: Dialer, address: String) -> Self {
        Self {
            dialer,
            address,
            conn: tokio::sync::Mutex::new(None),
            unsupported: AtomicBool::new(false),
        }
    }

    /// The open transfer connection, or a new one; `None` when none can be had now (the
    /// caller uses the session's connection).
    pub async fn connection(&self) -> Option<Connection> {
        if self.unsupported.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Some(conn.clone());
        }
        *slot = None;
        match self.open().await {
            Ok(conn) => {
                *slot = Some(conn.clone());
                Some(conn)
            }
            Err(e) => {
                // A coordinator that predates transfer connections closes the connection
                // as malformed at the hello (or refuses it): do not ask again.
                let unsupported = matches!(e, LinkError::Refused(_) | LinkError::Unexpected)
                    || matches!(&e, LinkError::Transport(t) if t.close_code() == Some(CloseCode::Malformed));
                if unsupported {
                    self.unsupported.store(true, Ordering::Relaxed);
                }
                tracing::info!(address = %self.address, "no transfer connection ({e}); transferring on the session's connection");
                None
            }
        }
    }

    async fn open(&self) -> Result<Connection, LinkError> {
        let conn = self
            .dialer
            .connect(&self.address, limits::HANDSHAKE_DEADLINE)
            .await?;
        let hello = Intent::Transfers(TransfersHello {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        });
        let answer = async {
            let (mut writer, mut reader) = conn.open_control().await?;
            let frame = gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES)?;
            writer.send_frame(&frame).await?;
            reader
                .recv_within::<HelloReply>(limits::HANDSHAKE_DEADLINE, "the coordinator's welcome")
                .await
        }
        .await;
        match answer {
            Ok(Some(HelloReply::Welcome(_))) => Ok(conn),
            Ok(Some(HelloReply::Refused(refusal))) => Err(LinkError::Refused(refusal.message)),
            Ok(Some(HelloReply::Enrolled(_))) => {
                conn.close(CloseCode::Malformed, "expected a welcome");
                Err(LinkError::Unexpected)
            }
            // The hello's stream ended or broke: the connection's close says why.
            Ok(None) => Err(LinkError::Transport(conn.close_reason().unwrap_or(
                TransportError::Lost("the coordinator ended the stream without a welcome".into()),
            ))),
            Err(e) => Err(LinkError::Transport(conn.close_reason().unwrap_or(e))),
        }
    }

    /// Closes the transfer connection, if one is open (the session ended).
    pub fn close(&self) {
        if let Ok(slot) = self.conn.try_lock() {
            if let Some(conn) = slot.as_ref() {
                conn.close(CloseCode::Normal, "the agent's session ended");
            }
        }
    }
}

/// A transfer that did not complete, across every connection it was given.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("no connection to the coordinator for {} s", CONNECTION_WAIT.as_secs())]
    NoConnection,
    #[error("{what}: {source}")]
    Failed { what: String, source: TransferError },
    #[error("{what}: the connection broke {MAX_ATTEMPTS} times")]
    Exhausted { what: String },
}

/// Waits up to [`CONNECTION_WAIT`] for a connection that is not closed: the session's
/// transfer connection when it can be had, else the session's own.
async fn live_connection(source: &dyn ConnectionSource) -> Result<Connection, RetryError> {
    let deadline = tokio::time::Instant::now() + CONNECTION_WAIT;
    loop {
        if let Some(link) = source.transfer_link() {
            if let Some(conn) = link.connection().await {
                return Ok(conn);
            }
        }
        if let Some(conn) = source.current().filter(|c| c.close_reason().is_none()) {
            return Ok(conn);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(RetryError::NoConnection);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `op` on the current connection, again on the next one each time the connection
/// breaks (each attempt keeps what earlier ones achieved: cached chunks, stored chunks).
pub(crate) async fn with_retries<T, F, Fut>(
    source: &dyn ConnectionSource,
    log: &LogSink,
    what: &str,
    mut op: F,
) -> Result<T, RetryError>
where
    F: FnMut(Connection) -> Fut,
    Fut: std::future::Future<Output = Result<T, TransferError>>,
{
    for attempt in 1..=MAX_ATTEMPTS {
        let conn = live_connection(source).await?;
        match op(conn).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                say(
                    log,
                    &format!("\u{21bb} {what}: {e}; resuming on the next connection\n"),
                )
                .await;
                // Let the session notice the broken connection and make a new one.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(source) => {
                return Err(RetryError::Failed {
                    what: what.to_owned(),
                    source,
                })
            }
        }
    }
    Err(RetryError::Exhausted {
        what: what.to_owned(),
    })
}

pub(crate) async fn say(log: &LogSink, line: &str) {
    let _ = log.send(line.as_bytes().to_vec()).await;
}

/// Opens the agent's chunk cache and transfer settings.
pub fn transfers(
    data_dir: &Path,
    cache_bytes: u64,
    streams: usize,
    max_rate: Option<u64>,
) -> std::io::Result<Transfers> {
    // A link is full duplex: what the agent receives and what it sends have a cap each.
    let cap = || max_rate.map(|rate| Arc::new(gantry_transfer::RateLimit::new(rate)));
    Ok(Transfers {
        cache: ChunkCache::open(&data_dir.join("cache"), cache_bytes)?,
        options: TransferOptions {
            streams,
            limit: cap(),
        },
        send_options: TransferOptions {
            streams,
            limit: cap(),
        },
    })
}
