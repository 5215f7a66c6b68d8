//! Peer transfers: this host serving the release it stages to the other hosts of the
//! same deployment, and dialing them to fetch theirs.
//!
//! Owns the peer listener (`--peer-listen`, QUIC with ALPN `gantry-peer/1`, mutual TLS
//! with agent certificates on both sides) and the shares: for each release being staged
//! here, which deployment and epoch it belongs to and which agents the coordinator named
//! as its fellow hosts. A peer may fetch only chunks of a release it was named for, only
//! under that deployment's grant, only until the share expires
//! ([`limits::PEER_SHARE_TTL`]); anything else is refused. Chunks are served from the
//! local chunk cache as they arrive (`gantry_transfer::serve_chunks`).
//!
//! It must not decide what to deploy or where chunks come from otherwise: the deployer
//! registers shares and asks for connections; the download logic is in
//! `gantry-transfer`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gantry_certs::{Identity, PeerTls};
use gantry_protocol::{limits, AgentId, ChunkFrame, Digest, Grant, PeerSource, StreamOpen};
use gantry_transfer::{ChunkCache, PeerDial, PeerLink, RateLimit};
use gantry_transport::{Connection, Dialer, FrameWriter, Listener, TransportError};

use crate::base::datadir::{CredentialsError, DataDir, DataDirError};

/// Why the peer side cannot start, a peer cannot be reached, or a fetch was not served.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("peer TLS: {0}")]
    Tls(gantry_certs::TlsError),
    #[error("cannot listen for peers on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: TransportError,
    },
    #[error(transparent)]
    Dialer(#[from] CredentialsError),
    #[error(transparent)]
    Connect(TransportError),
    /// The fetch was refused; the peer was told this.
    #[error("{0}")]
    Refused(String),
    /// Serving broke off (`gantry_transfer::serve_chunks`' reason).
    #[error("{0}")]
    Serve(String),
}

/// A release this host shares while (and for a while after) it stages it.
#[derive(Debug)]
struct Share {
    deployment: u64,
    epoch: u64,
    /// The other hosts of the staging, as the coordinator named them.
    allowed: HashSet<AgentId>,
    /// The release's chunks and their sizes; `None` until this host has the manifest.
    sizes: Option<Arc<HashMap<Digest, u32>>>,
    /// Whether this host is still fetching the release (a missing chunk may arrive).
    fetching: Arc<AtomicBool>,
    expires: Instant,
}

#[derive(Debug)]
struct Inner {
    /// This agent.
    me: AgentId,
    data_dir: DataDir,
    listener: Option<Listener>,
    cache: ChunkCache,
    /// Caps what this host sends to peers (shared with its uploads).
    send_limit: Option<Arc<RateLimit>>,
    shares: Mutex<HashMap<Digest, Share>>,
    /// Wakes requests that arrived before this host's own stage step.
    shares_changed: tokio::sync::Notify,
    serving: AtomicUsize,
    /// Outgoing peer connections (one UDP socket for all of them).
    dialer: tokio::sync::OnceCell<Dialer>,
}

/// The peer side of this agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerService {
    inner: Arc<Inner>,
}

/// Holds a share's "still fetching" mark; dropping it says the fetch is over.
#[derive(Debug)]
pub struct Fetching(Arc<AtomicBool>);

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl PeerService {
    /// Starts serving on `listen`; with `None` this host serves no peer (it still
    /// fetches from the peers it is given).
    pub fn start(
        data_dir: PathBuf,
        listen: Option<SocketAddr>,
        cache: ChunkCache,
        send_limit: Option<Arc<RateLimit>>,
    ) -> Result<Self, PeerError> {
        let data_dir = DataDir::new(data_dir);
        let me = data_dir.load()?.config.agent_id;
        let listener = match listen {
            None => None,
            Some(addr) => {
                let tls = server_tls(&data_dir)?;
                let secret: [u8; 32] = std::array::from_fn(|_| fastrand::u8(..));
                Some(
                    Listener::bind(addr, tls, &secret)
                        .map_err(|source| PeerError::Listen { addr, source })?,
                )
            }
        };
        let service = Self {
            inner: Arc::new(Inner {
                me,
                data_dir,
                listener,
                cache,
                send_limit,
                shares: Mutex::new(HashMap::new()),
                shares_changed: tokio::sync::Notify::new(),
                serving: AtomicUsize::new(0),
                dialer: tokio::sync::OnceCell::new(),
            }),
        };
        if service.inner.listener.is_some() {
            let me = service.clone();
            tokio::spawn(async move { me.accept_loop().await });
        }
        Ok(service)
    }

    /// The UDP port peers reach this host on, for the hello.
    pub fn port(&self) -> Option<u16> {
        self.inner
            .listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Share>> {
        self.inner
            .shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This agent's place in a stage step's peer list.
    pub fn position(&self, peers: &[PeerSource]) -> Option<usize> {
        peers.iter().position(|p| p.agent == self.inner.me)
    }

    /// Shares `manifest` of `deployment` with the other hosts `peers` names, and marks
    /// it as being fetched until the returned guard drops. Call [`Self::set_chunks`]
    /// once the manifest is known.
    pub fn share(
        &self,
        deployment: u64,
        epoch: u64,
        manifest: Digest,
        peers: &[PeerSource],
    ) -> Fetching {
        let me = &self.inner.me;
        // A renewed certificate is picked up here, before anyone is told to come.
        if let Some(listener) = &self.inner.listener {
            match server_tls(&self.inner.data_dir) {
                Ok(tls) => {
                    if let Err(e) = listener.set_tls(tls) {
                        tracing::warn!("cannot refresh the peer listener's certificate: {e}");
                    }
                }
                Err(e) => tracing::warn!("cannot refresh the peer listener's certificate: {e}"),
            }
        }
        let fetching = Arc::new(AtomicBool::new(true));
        let now = Instant::now();
        {
            let mut shares = self.lock();
            shares.retain(|_, s| s.expires > now);
            if shares.len() >= limits::MAX_PEER_SHARES && !shares.contains_key(&manifest) {
                // The oldest share goes: it is the one least likely to be asked for.
                if let Some(oldest) = shares
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(d, _)| *d)
                {
                    shares.remove(&oldest);
                }
            }
            let sizes = shares.get(&manifest).and_then(|s| s.sizes.clone());
            shares.insert(
                manifest,
                Share {
                    deployment,
                    epoch,
                    allowed: peers
                        .iter()
                        .map(|p| p.agent.clone())
                        .filter(|a| a != me)
                        .collect(),
                    sizes,
                    fetching: fetching.clone(),
                    expires: now + limits::PEER_SHARE_TTL,
                },
            );
        }
        self.inner.shares_changed.notify_waiters();
        Fetching(fetching)
    }

    /// The release's chunks, once this host fetched its manifest.
    pub fn set_chunks(&self, manifest: &Digest, sizes: HashMap<Digest, u32>) {
        if let Some(share) = self.lock().get_mut(manifest) {
            share.sizes = Some(Arc::new(sizes));
        }
        self.inner.shares_changed.notify_waiters();
    }

    /// Dials every peer but this host, in the background, each within
    /// [`limits::PEER_CONNECT_DEADLINE`]: one slot per peer (`None` for this host), each
    /// a link that says when its dial ended. A peer that cannot be reached costs only a
    /// fetch of its range from the coordinator, never a wait before the others start.
    pub fn connect_all(&self, peers: &[PeerSource]) -> Vec<Option<PeerLink>> {
        peers
            .iter()
            .map(|peer| {
                if peer.agent == self.inner.me {
                    return None;
                }
                let (tx, link) = PeerLink::pending();
                let (me, peer) = (self.clone(), peer.clone());
                tokio::spawn(async move {
                    let dial = match me.dial(&peer).await {
                        Ok(conn) => PeerDial::Connected(conn),
                        Err(e) => {
                            tracing::info!(peer = %peer.agent, address = %peer.address, "cannot reach peer: {e}");
                            PeerDial::Unreachable
                        }
                    };
                    let _ = tx.send(dial);
                });
                Some(link)
            })
            .collect()
    }

    async fn dial(&self, peer: &PeerSource) -> Result<Connection, PeerError> {
        let creds = self.inner.data_dir.load()?.credentials;
        let dialer = self
            .inner
            .dialer
            .get_or_try_init(|| async {
                creds
                    .dialer(false, gantry_transport::Profile::Bulk)
                    .map_err(PeerError::from)
            })
            .await?;
        let tls = PeerTls::client(
            &creds.ca_der,
            &creds.identity_pem,
            &creds.identity_pem,
            &peer.agent,
        )
        .map_err(PeerError::Tls)?;
        dialer
            .connect_with(
                tls,
                gantry_transport::Dialled::Peer,
                &peer.address,
                limits::PEER_CONNECT_DEADLINE,
            )
            .await
            .map_err(PeerError::Connect)
    }

    async fn accept_loop(self) {
        let Some(listener) = &self.inner.listener else {
            return;
        };
        while let Some(incoming) = listener.accept().await {
            if self.inner.serving.load(Ordering::Acquire) >= limits::MAX_PEER_CONNECTIONS {
                tracing::warn!(
                    "refusing a peer connection: {} already served",
                    limits::MAX_PEER_CONNECTIONS
                );
                incoming.refuse();
                continue;
            }
            self.inner.serving.fetch_add(1, Ordering::AcqRel);
            let me = self.clone();
            tokio::spawn(async move {
                match incoming.handshake(limits::HANDSHAKE_DEADLINE).await {
                    Ok(conn) => me.serve_connection(conn).await,
                    Err(e) => tracing::info!("peer handshake failed: {e}"),
                }
                me.inner.serving.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    async fn serve_connection(&self, conn: Connection) {
        let identity = conn
            .peer_certificates()
            .and_then(|c| c.into_iter().next())
            .map(|der| Identity::from_cert_der(&der));
        let Some(Ok(Identity::Agent(peer))) = identity else {
            // The TLS verifier admits agents only; this is a second line.
            conn.close(gantry_protocol::CloseCode::Unauthorized, "peers are agents");
            return;
        };
        loop {
            let Ok((writer, mut reader)) = conn.accept_stream().await else {
                return;
            };
            let me = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move {
                let open =
                    tokio::time::timeout(limits::PEER_STALL, reader.recv::<StreamOpen>()).await;
                let mut writer = writer;
                match open {
                    Ok(Ok(Some(StreamOpen::FetchChunks { grant, manifest }))) => {
                        if let Err(e) = me
                            .serve_fetch(&peer, &grant, &manifest, &mut writer, &mut reader)
                            .await
                        {
                            tracing::info!(%peer, %manifest, "peer fetch ended: {e}");
                        }
                    }
                    Ok(Ok(Some(other))) => {
                        let message = format!("a peer serves only chunk fetches, not {other:?}");
                        tracing::info!(%peer, "{message}");
                        let _ = writer.send(&ChunkFrame::Refused { message }).await;
                    }
                    _ => {}
                }
                writer.finish();
            });
        }
    }

    /// Checks a fetch against the share, waiting (bounded) for this host's own stage
    /// step and manifest, then serves it.
    async fn serve_fetch(
        &self,
        peer: &AgentId,
        grant: &Grant,
        manifest: &Digest,
        writer: &mut FrameWriter,
        reader: &mut gantry_transport::FrameReader,
    ) -> Result<(), PeerError> {
        let Grant::Deploy { deployment, epoch } = grant else {
            return refuse(writer, "peers serve only deployments' releases".into()).await;
        };
        let deadline = tokio::time::Instant::now() + limits::PEER_CHUNK_WAIT;
        let (sizes, fetching) = loop {
            let changed = self.inner.shares_changed.notified();
            let found = {
                let shares = self.lock();
                match shares.get(manifest) {
                    Some(s) if s.expires <= Instant::now() => Err("its share expired"),
                    Some(s) if s.deployment != *deployment || s.epoch != *epoch => {
                        Err("it is shared for another deployment")
                    }
                    Some(s) if !s.allowed.contains(peer) => {
                        Err("the coordinator did not name that agent as a fellow host")
                    }
                    Some(s) => Ok(s.sizes.clone().map(|z| (z, s.fetching.clone()))),
                    None => Ok(None),
                }
            };
            match found {
                Err(why) => {
                    return refuse(writer, format!("release {manifest} refused: {why}")).await
                }
                Ok(Some(ready)) => break ready,
                Ok(None) if tokio::time::Instant::now() >= deadline => {
                    return refuse(
                        writer,
                        format!("this host is not sharing release {manifest}"),
                    )
                    .await
                }
                Ok(None) => {
                    let _ = tokio::time::timeout_at(deadline, changed).await;
                }
            }
        };
        let still_fetching = move || fetching.load(Ordering::Acquire);
        let figures = gantry_transfer::serve_chunks(
            writer,
            reader,
            &self.inner.cache,
            &sizes,
            &still_fetching,
            self.inner.send_limit.as_deref(),
        )
        .await
        .map_err(PeerError::Serve)?;
        tracing::debug!(%peer, chunks = figures.chunks, bytes = figures.bytes, unavailable = figures.unavailable, "served a peer");
        Ok(())
    }
}

/// Tells the peer why its fetch is refused; the refusal is also the fetch's error.
async fn refuse(writer: &mut FrameWriter, message: String) -> Result<(), PeerError> {
    let _ = writer
        .send(&ChunkFrame::Refused {
            message: message.clone(),
        })
        .await;
    Err(PeerError::Refused(message))
}

fn server_tls(data_dir: &DataDir) -> Result<rustls::ServerConfig, PeerError> {
    let creds = data_dir.load()?.credentials;
    PeerTls::server(&creds.ca_der, &creds.identity_pem, &creds.identity_pem).map_err(PeerError::Tls)
}
