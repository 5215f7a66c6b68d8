//! Moving bytes between this host and the coordinator or its peers: what every
//! transfer shares ([`Transfers`]: the local chunk cache and the rate caps), where a
//! transfer gets its connection ([`ConnectionSource`]) and how it resumes on the next
//! one when a connection breaks ([`with_retries`]). [`artifacts`] holds a job's inputs
//! and outputs; [`peers`] serves and fetches deployment releases between hosts.
//!
//! The transfers themselves are `gantry-transfer`'s. This layer must not know jobs'
//! steps or deployment steps: they call it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gantry_transfer::{ChunkCache, TransferError, TransferOptions};
use gantry_transport::Connection;

use crate::runner::LogSink;

pub mod artifacts;
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

/// Waits up to [`CONNECTION_WAIT`] for a connection that is not closed.
async fn live_connection(source: &dyn ConnectionSource) -> Result<Connection, RetryError> {
    let deadline = tokio::time::Instant::now() + CONNECTION_WAIT;
    loop {
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
