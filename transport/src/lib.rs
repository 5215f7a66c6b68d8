//! `gantry-transport`: the only code in Gantry that knows quinn.
//!
//! It owns the QUIC endpoint configuration (ALPN, limits, timeouts), connecting and
//! accepting with deadlines, and typed length-delimited frames over QUIC streams with the
//! size limit checked before allocation. Coordinator, agent and admin CLI speak in the
//! types here ([`Listener`], [`Connection`], [`FrameWriter`], [`FrameReader`]) and never
//! name a quinn type, so the transport can be swapped or simulated behind this API.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Shared byte buffers, as [`FrameWriter::send_pieces`] takes them.
pub use bytes::Bytes;
use gantry_protocol::frame::{check_len, HEADER_LEN};
use gantry_protocol::{limits, CloseCode, FrameError};
use serde::{de::DeserializeOwned, Serialize};

mod udp;

/// What went wrong on a connection or stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve {address:?}: {detail}")]
    Resolve { address: String, detail: String },
    #[error("cannot connect to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("connection closed by the peer: {reason} ({code})")]
    ClosedByPeer {
        code: String,
        close_code: Option<u32>,
        reason: String,
    },
    #[error("connection lost: {0}")]
    Lost(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("endpoint error: {0}")]
    Endpoint(String),
    /// The peer reset or stopped the stream with this code (e.g. `Unauthorized`: the
    /// coordinator's authorization table refused the stream; its log says why).
    #[error("the peer {how} the stream: {name} ({code})")]
    StreamReset {
        how: &'static str,
        code: u64,
        name: String,
    },
}

impl TransportError {
    /// The Gantry close code the peer sent, if it closed the connection with one.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            Self::ClosedByPeer {
                close_code: Some(c),
                ..
            } => CloseCode::from_u32(*c),
            _ => None,
        }
    }

    /// The Gantry close code a peer reset or stopped a stream with, if it did.
    pub fn stream_code(&self) -> Option<CloseCode> {
        match self {
            Self::StreamReset { code, .. } => {
                u32::try_from(*code).ok().and_then(CloseCode::from_u32)
            }
            _ => None,
        }
    }

    /// True when a TLS alert says our certificate was refused (revoked, unknown CA, ...).
    pub fn is_certificate_refusal(&self) -> bool {
        let text = self.to_string();
        text.contains("certificate") || text.contains("Certificate")
    }
}

/// The framed halves of a bidirectional stream quinn opened or accepted.
fn framed(
    stream: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
) -> Result<(FrameWriter, FrameReader), TransportError> {
    let (send, recv) = stream.map_err(|e| from_connection_error(&e))?;
    Ok((FrameWriter::new(send), FrameReader::new(recv)))
}

fn from_connection_error(err: &quinn::ConnectionError) -> TransportError {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner()).ok();
            let name = code
                .and_then(CloseCode::from_u32)
                .map_or_else(|| "unknown code".to_owned(), |c| format!("{c:?}"));
            TransportError::ClosedByPeer {
                code: name,
                close_code: code,
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        quinn::ConnectionError::ConnectionClosed(close) => TransportError::ClosedByPeer {
            code: format!("transport {:?}", close.error_code),
            close_code: None,
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => TransportError::Lost(other.to_string()),
    }
}

/// What a connection is for, which decides its QUIC limits.
///
/// An agent's session carries a few small frames a second for as long as the agent
/// runs, and a coordinator holds one per agent: 10,000 of them. Bulk transfers carry
/// gigabytes for a while. Limits sized for bulk cost every idle session: quinn keeps a
/// send buffer of the path's MTU per connection, and path MTU discovery fills it with
/// probes of up to [`limits::MAX_UDP_PAYLOAD`] bytes, so on loopback every session held
/// ~64 KiB of the coordinator's memory for nothing, and each reconnecting agent cost
/// ~12 probes of up to 65,000 bytes each way (docs/decisions/0086-fleet-scale-transport.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// An agent's session: 1,452-byte packets at most, both ways (what this side sends,
    /// and, through the `max_udp_payload_size` this endpoint announces, what the peer
    /// sends), quinn's default initial congestion window, modest windows.
    Control,
    /// Bulk transfers: path MTU discovery up to [`limits::MAX_UDP_PAYLOAD`], a large
    /// initial congestion window, large windows.
    Bulk,
    /// [`Profile::Bulk`] without keep-alives: the connection closes itself after
    /// [`limits::IDLE_TIMEOUT`] without a transfer (an agent's transfer connection,
    /// which must not stay open beside its session once the transfers are done).
    Transfers,
}

impl Profile {
    /// The largest UDP payload this side sends, and announces it accepts.
    fn max_udp_payload(self) -> u16 {
        match self {
            Self::Control => limits::CONTROL_UDP_PAYLOAD,
            Self::Bulk | Self::Transfers => limits::MAX_UDP_PAYLOAD,
        }
    }
}

/// The QUIC transport parameters of a connection for `profile`; see [`limits`] for why.
/// A QUIC client configuration from a TLS one, with the transport settings of `profile`.
fn client_config(
    tls: rustls::ClientConfig,
    profile: Profile,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Endpoint(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(profile)));
    Ok(config)
}

fn transport_config(profile: Profile) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(limits::MAX_BIDI_STREAMS.into());
    t.max_concurrent_uni_streams(limits::MAX_UNI_STREAMS.into());
    // IDLE_TIMEOUT is 30 s, well inside QUIC's VarInt range of milliseconds.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(limits::IDLE_TIMEOUT).ok());
    t.keep_alive_interval((profile != Profile::Transfers).then_some(limits::KEEP_ALIVE_INTERVAL));
    // Path MTU discovery may climb past Ethernet's 1500 bytes where the path allows
    // (loopback, jumbo frames); on a 1500-byte path it settles there after a few probes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(profile.max_udp_payload());
    t.mtu_discovery_config(Some(mtu));
    if profile == Profile::Control {
        t.stream_receive_window(limits::CONTROL_STREAM_RECEIVE_WINDOW.into());
        t.receive_window(limits::CONTROL_CONNECTION_RECEIVE_WINDOW.into());
        t.send_window(u64::from(limits::CONTROL_CONNECTION_RECEIVE_WINDOW));
        // quinn's default initial window (14,720 bytes) holds ten 1,452-byte packets:
        // an MTU probe and a close always fit (see below).
        return t;
    }
    t.stream_receive_window(limits::STREAM_RECEIVE_WINDOW.into());
    t.receive_window(limits::CONNECTION_RECEIVE_WINDOW.into());
    t.send_window(u64::from(limits::CONNECTION_RECEIVE_WINDOW));
    // The congestion window a connection starts with must hold an MTU probe and a
    // packet of the MTU already found, both up to MAX_UDP_PAYLOAD: quinn 0.11 holds a
    // closing connection's CONNECTION_CLOSE behind congestion control (quinn issue
    // #2785, fixed after 0.11.19) and stops loss detection once closed, so a close
    // while a probe filled the window was never sent. At quinn's default (14,720 bytes,
    // raised to two packets once the MTU grows) a connection refused right after its
    // handshake, which is when discovery probes, reached its peer as a stateless reset
    // instead of the refusal and its reason. Three packets' worth: slow start grows it
    // from there on loopback or a LAN; on a path with a 1,500-byte MTU it is ~130
    // packets, an initial burst a LAN absorbs.
    let mut congestion = quinn::congestion::CubicConfig::default();
    congestion.initial_window(3 * u64::from(limits::MAX_UDP_PAYLOAD));
    t.congestion_controller_factory(Arc::new(congestion));
    t
}

/// Asks for [`limits::UDP_SOCKET_BUFFER`] bytes of kernel buffer each way. The kernel
/// caps the request at `net.core.rmem_max`/`wmem_max` (often 208 KiB); a refusal is
/// harmless, only slower, so it is logged, not fatal.
fn size_buffers(socket: &std::net::UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    for (what, result) in [
        (
            "receive",
            socket.set_recv_buffer_size(limits::UDP_SOCKET_BUFFER),
        ),
        (
            "send",
            socket.set_send_buffer_size(limits::UDP_SOCKET_BUFFER),
        ),
    ] {
        if let Err(e) = result {
            tracing::debug!("cannot enlarge the UDP {what} buffer: {e}");
        }
    }
}

/// The endpoint settings both sides share: how large a datagram we accept, which the
/// peer's path MTU discovery takes as its ceiling.
fn endpoint_config(
    endpoint_config: &mut quinn::EndpointConfig,
    max_udp_payload: u16,
) -> Result<(), TransportError> {
    endpoint_config
        .max_udp_payload_size(max_udp_payload)
        .map_err(|e| TransportError::Endpoint(format!("max UDP payload: {e}")))?;
    Ok(())
}

/// The coordinator's listening endpoint.
#[derive(Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    _io: IoThread,
}

/// The thread whose runtime drives the listener's endpoint: reads every datagram from
/// the socket and hands it to its connection. Stopped when the listener is dropped.
///
/// Why a thread of its own: on the shared runtime the endpoint driver is one task among
/// four per connection, and after each batch of datagrams it waits behind every task
/// those datagrams woke. With 10,000 agents it fell so far behind that the socket's
/// receive queue (4 MiB, the kernel's `rmem_max`) overflowed: a third of all datagrams
/// were dropped, heartbeats arrived 15 s late, sessions were closed as silent and
/// handshakes timed out, and the reconnections made it worse
/// (docs/decisions/0063-listener-socket-thread.md). Connections, their crypto and
/// timers still run on the caller's runtime.
#[derive(Debug)]
struct IoThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Listener {
    /// Binds `addr` with the given TLS server configuration (TLS 1.3, ALPN set, no 0-RTT).
    ///
    /// `reset_secret` must be the same across restarts of the same coordinator: QUIC
    /// stateless-reset tokens are derived from it, so after a crash the restarted server
    /// can tell each agent at its next packet that its old connection is gone. Without it
    /// agents would wait out the idle timeout (30 s) before reconnecting.
    pub fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        reset_secret: &[u8],
    ) -> Result<Self, TransportError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TransportError::Endpoint(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        // Bulk limits for every connection: this side's path MTU discovery is capped by
        // the `max_udp_payload_size` each client announces, so an agent's session
        // (Profile::Control) stays at 1,452-byte packets both ways while its transfer
        // connection climbs to the path's MTU. The windows only bound what a peer may
        // send ahead; quinn allocates for data as it arrives, not for the window.
        let mut transport = transport_config(Profile::Bulk);
        // Every client (agent, admin CLI) sends keep-alives, which keep the connection
        // and any NAT mapping alive both ways. The server's own would only add a PING
        // and its ACK every 10 s per connection: with 10,000 agents, a third of the
        // packets an idle coordinator handles
        // (docs/decisions/0064-no-server-keep-alives.md).
        transport.keep_alive_interval(None);
        config.transport_config(Arc::new(transport));
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        self::endpoint_config(&mut endpoint_config, limits::MAX_UDP_PAYLOAD)?;
        // Connection ids are validated with a keyed hash; a restarted server must use the
        // same key or it drops old connections' packets as invalid instead of resetting them.
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(
            &ring::digest::digest(&ring::digest::SHA256, reset_secret).as_ref()[..8],
        );
        let cid_key = u64::from_le_bytes(cid_key);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = std::net::UdpSocket::bind(addr)
            .map_err(|e| TransportError::Endpoint(format!("cannot listen on {addr}: {e}")))?;
        size_buffers(&socket);
        let (made_tx, made) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("gantry-quic-io".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = made_tx.send(Err(format!("no runtime for the socket: {e}")));
                        return;
                    }
                };
                // Made inside this runtime, so its driver is spawned (and its socket
                // registered) here.
                let endpoint = rt.block_on(async {
                    let runtime = quinn::default_runtime().ok_or("no async runtime")?;
                    let socket = udp::bounded_sends(&runtime, socket).map_err(|e| e.to_string())?;
                    quinn::Endpoint::new_with_abstract_socket(
                        endpoint_config,
                        Some(config),
                        socket,
                        runtime,
                    )
                    .map_err(|e| e.to_string())
                });
                let ok = endpoint.is_ok();
                let _ = made_tx.send(endpoint);
                if ok {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                }
            })
            .map_err(|e| {
                TransportError::Endpoint(format!("cannot start the socket thread: {e}"))
            })?;
        let endpoint = made
            .recv()
            .map_err(|_| TransportError::Endpoint("the socket thread died".into()))?
            .map_err(|e| TransportError::Endpoint(format!("cannot listen on {addr}: {e}")))?;
        Ok(Self {
            endpoint,
            _io: IoThread { stop: Some(stop) },
        })
    }

    /// Replaces the TLS configuration for new connections (an agent's peer listener
    /// after its certificate was renewed); live connections keep theirs.
    pub fn set_tls(&self, tls: rustls::ServerConfig) -> Result<(), TransportError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TransportError::Endpoint(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config(Profile::Bulk)));
        self.endpoint.set_server_config(Some(config));
        Ok(())
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Endpoint(e.to_string()))
    }

    /// Waits for the next incoming connection attempt; `None` once the listener is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        self.endpoint.accept().await.map(Incoming)
    }

    /// Closes every connection with `code` and stops accepting.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.endpoint.close((code as u32).into(), reason.as_bytes());
    }

    /// Waits until every connection has been closed and its close frame sent.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// A connection attempt that has not finished its handshake.
#[derive(Debug)]
pub struct Incoming(quinn::Incoming);

impl Incoming {
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    /// Completes the handshake within `deadline`.
    pub async fn handshake(self, deadline: Duration) -> Result<Connection, TransportError> {
        let connecting = self.0.accept().map_err(|e| from_connection_error(&e))?;
        match tokio::time::timeout(deadline, connecting).await {
            Ok(Ok(conn)) => Ok(Connection(conn)),
            Ok(Err(e)) => Err(from_connection_error(&e)),
            Err(_) => Err(TransportError::Timeout {
                what: "the TLS handshake",
                after: deadline,
            }),
        }
    }

    /// Refuses the attempt without doing a handshake (e.g. when shutting down).
    pub fn refuse(self) {
        self.0.refuse();
    }

    /// Whether the peer proved it receives at its source address (it echoed a Retry
    /// token): a spoofed or fire-and-forget sender never does.
    pub fn address_validated(&self) -> bool {
        self.0.remote_address_validated()
    }

    /// Answers with a Retry, keeping no state: the peer must come back with the token,
    /// which proves its address. `None`: the Retry is sent; the attempt is given back
    /// if its address is already validated (a Retry is sent at most once per attempt).
    pub fn retry(self) -> Option<Self> {
        self.0.retry().err().map(|e| Self(e.into_incoming()))
    }
}

/// An established, authenticated QUIC connection.
#[derive(Debug, Clone)]
pub struct Connection(quinn::Connection);

impl Connection {
    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote_address()
    }

    /// The DER certificate chain the peer presented, leaf first; `None` if it presented none.
    pub fn peer_certificates(&self) -> Option<Vec<Vec<u8>>> {
        let any = self.0.peer_identity()?;
        let certs = any
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        if certs.is_empty() {
            return None;
        }
        Some(certs.iter().map(|c| c.to_vec()).collect())
    }

    /// Opens the control stream (client side).
    pub async fn open_control(&self) -> Result<(FrameWriter, FrameReader), TransportError> {
        framed(self.0.open_bi().await)
    }

    /// Opens another bidirectional stream (logs, follows); its first frame says what it is.
    pub async fn open_stream(&self) -> Result<(FrameWriter, FrameReader), TransportError> {
        self.open_control().await
    }

    /// Opens another bidirectional stream and sends `open`, the first frame, which says
    /// what the stream is for.
    pub async fn open_stream_with<T: Serialize>(
        &self,
        open: &T,
    ) -> Result<(FrameWriter, FrameReader), TransportError> {
        let (mut writer, reader) = self.open_stream().await?;
        writer.send(open).await?;
        Ok((writer, reader))
    }

    /// Waits for the peer to open another bidirectional stream; `Err` once the connection ends.
    pub async fn accept_stream(&self) -> Result<(FrameWriter, FrameReader), TransportError> {
        framed(self.0.accept_bi().await)
    }

    /// Accepts the control stream the client opens (server side), within `deadline`.
    pub async fn accept_control(
        &self,
        deadline: Duration,
    ) -> Result<(FrameWriter, FrameReader), TransportError> {
        match tokio::time::timeout(deadline, self.0.accept_bi()).await {
            Ok(stream) => framed(stream),
            Err(_) => Err(TransportError::Timeout {
                what: "the control stream",
                after: deadline,
            }),
        }
    }

    /// Closes the connection with a Gantry close code and a reason the peer will log.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.0.close((code as u32).into(), reason.as_bytes());
    }

    /// Resolves when the connection is closed, with why.
    pub async fn closed(&self) -> TransportError {
        from_connection_error(&self.0.closed().await)
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<TransportError> {
        self.0.close_reason().map(|e| from_connection_error(&e))
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.0.rtt()
    }

    /// Path figures for tests and benchmarks: the MTU in use and what was lost.
    pub fn path_figures(&self) -> PathFigures {
        let stats = self.0.stats();
        PathFigures {
            mtu: stats.path.current_mtu,
            lost_packets: stats.path.lost_packets,
            black_holes: stats.path.black_holes_detected,
        }
    }

    /// Path figures for logs: current MTU, congestion window, losses.
    pub fn path_summary(&self) -> String {
        let stats = self.0.stats();
        format!(
            "mtu={} cwnd={} lost_packets={} black_holes={} probes_sent={} probes_lost={} rtt={:?}",
            stats.path.current_mtu,
            stats.path.cwnd,
            stats.path.lost_packets,
            stats.path.black_holes_detected,
            stats.path.sent_plpmtud_probes,
            stats.path.lost_plpmtud_probes,
            stats.path.rtt
        )
    }
}

/// What a connection's sending side has seen of its path (see [`Connection::path_figures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathFigures {
    /// The UDP payload size now in use: path MTU discovery's current value.
    pub mtu: u16,
    /// Packets this side declared lost.
    pub lost_packets: u64,
    /// Times quinn decided large packets were being dropped and fell back to 1,200 bytes.
    pub black_holes: u64,
}

/// What a client connection dials: the server name the handshake asks for, and what a
/// timeout says it waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialled {
    /// The coordinator.
    Coordinator,
    /// Another agent's peer listener (`tls` from `gantry_certs::PeerTls`, which checks
    /// the peer's identity; the server name is only a placeholder).
    Peer,
}

impl Dialled {
    fn server_name(self) -> &'static str {
        match self {
            Self::Coordinator => gantry_protocol::COORDINATOR_SERVER_NAME,
            Self::Peer => gantry_protocol::PEER_SERVER_NAME,
        }
    }

    fn handshake(self) -> &'static str {
        match self {
            Self::Coordinator => "the coordinator to answer the handshake",
            Self::Peer => "the peer to answer the handshake",
        }
    }
}

/// A client endpoint: one UDP socket from which connections are made.
#[derive(Debug)]
pub struct Dialer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    profile: Profile,
}

impl Dialer {
    /// Creates a client endpoint on an ephemeral port of the unspecified address of
    /// `family`, for bulk transfers ([`Profile::Bulk`]: the admin CLI, peers).
    pub fn new(tls: rustls::ClientConfig, ipv6: bool) -> Result<Self, TransportError> {
        Self::with_profile(tls, ipv6, Profile::Bulk)
    }

    /// [`Self::new`] with the limits of `profile` for every connection it makes (an
    /// agent's session: [`Profile::Control`]). The profile also sets the largest
    /// datagram this endpoint announces it accepts, which caps the peer's packets.
    pub fn with_profile(
        tls: rustls::ClientConfig,
        ipv6: bool,
        profile: Profile,
    ) -> Result<Self, TransportError> {
        let config = client_config(tls, profile)?;
        let bind: SocketAddr = if ipv6 {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|e: std::net::AddrParseError| TransportError::Endpoint(e.to_string()))?;
        let socket = std::net::UdpSocket::bind(bind)
            .map_err(|e| TransportError::Endpoint(format!("cannot open a UDP socket: {e}")))?;
        size_buffers(&socket);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Endpoint("no async runtime".into()))?;
        let mut shared = quinn::EndpointConfig::default();
        endpoint_config(&mut shared, profile.max_udp_payload())?;
        let endpoint = udp::bounded_sends(&runtime, socket)
            .and_then(|socket| {
                quinn::Endpoint::new_with_abstract_socket(shared, None, socket, runtime)
            })
            .map_err(|e| TransportError::Endpoint(format!("cannot open a UDP socket: {e}")))?;
        Ok(Self {
            endpoint,
            config,
            profile,
        })
    }

    /// Resolves `address` (`host:port`), connects and completes the handshake within `deadline`.
    pub async fn connect(
        &self,
        address: &str,
        deadline: Duration,
    ) -> Result<Connection, TransportError> {
        self.dial(self.config.clone(), Dialled::Coordinator, address, deadline)
            .await
    }

    /// Like [`Self::connect`], but with another TLS identity and to `to`: lets one UDP
    /// socket carry the connections of many identities (load harnesses holding thousands
    /// of agents), and agents dial each other's peer listeners.
    pub async fn connect_with(
        &self,
        tls: rustls::ClientConfig,
        to: Dialled,
        address: &str,
        deadline: Duration,
    ) -> Result<Connection, TransportError> {
        let config = client_config(tls, self.profile)?;
        self.dial(config, to, address, deadline).await
    }

    async fn dial(
        &self,
        config: quinn::ClientConfig,
        to: Dialled,
        address: &str,
        deadline: Duration,
    ) -> Result<Connection, TransportError> {
        let addr = resolve(address)?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, to.server_name())
            .map_err(|e| TransportError::Connect {
                address: address.to_owned(),
                detail: e.to_string(),
            })?;
        match tokio::time::timeout(deadline, connecting).await {
            Ok(Ok(conn)) => Ok(Connection(conn)),
            Ok(Err(e)) => Err(match from_connection_error(&e) {
                TransportError::Lost(detail) => TransportError::Connect {
                    address: address.to_owned(),
                    detail,
                },
                other => other,
            }),
            Err(_) => Err(TransportError::Timeout {
                what: to.handshake(),
                after: deadline,
            }),
        }
    }

    /// Waits up to `deadline` for close frames to go out, so the peer learns why.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = tokio::time::timeout(deadline, self.endpoint.wait_idle()).await;
    }
}

/// Resolves `host:port` to the first address.
pub fn resolve(address: &str) -> Result<SocketAddr, TransportError> {
    address
        .to_socket_addrs()
        .map_err(|e| TransportError::Resolve {
            address: address.to_owned(),
            detail: e.to_string(),
        })?
        .next()
        .ok_or_else(|| TransportError::Resolve {
            address: address.to_owned(),
            detail: "no addresses".into(),
        })
}

/// Sending half of a stream, one frame per message.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    /// Longest one frame may wait for the peer to make room (to read); `None`: forever.
    stall: Option<Duration>,
}

impl FrameWriter {
    fn new(send: quinn::SendStream) -> Self {
        Self { send, stall: None }
    }

    /// Bounds how long each frame may wait for the peer to read: a peer that stops
    /// reading then has its stream reset (code `Timeout`) and the send fails, instead of
    /// holding the sender (and what it holds) forever. See [`limits::STREAM_WRITE_STALL`].
    pub fn set_stall_deadline(&mut self, stall: Option<Duration>) {
        self.stall = stall;
    }

    /// Encodes and sends one message.
    ///
    /// The encoded frame is handed to quinn whole, as owned bytes: `write_all` of a
    /// slice would copy it once more into quinn's send buffer.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), TransportError> {
        let frame = gantry_protocol::encode_frame(msg, limits::MAX_FRAME_BYTES)?;
        let outcome = within_stall(self.stall, self.send.write_chunk(frame.into())).await;
        self.settle(outcome)
    }

    /// Sends one frame given in pieces (a head from `encode_frame_head`, then the
    /// bytes of its last field, which may be slices of a larger buffer). Quinn keeps
    /// the pieces as they are until it packs them into packets: nothing is copied.
    pub async fn send_pieces(&mut self, pieces: &mut [Bytes]) -> Result<(), TransportError> {
        let outcome = within_stall(self.stall, self.send.write_all_chunks(pieces)).await;
        self.settle(outcome)
    }

    /// Sends bytes that are already one or more frames (or, in tests, deliberately not).
    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let outcome = within_stall(self.stall, self.send.write_all(frame)).await;
        self.settle(outcome)
    }

    /// Turns a write's outcome into the send's result. A write abandoned at the stall
    /// deadline resets the stream, so a partly written frame is never followed by
    /// another.
    fn settle(&mut self, outcome: WriteOutcome) -> Result<(), TransportError> {
        let written = match outcome {
            WriteOutcome::Done(written) => written,
            WriteOutcome::Stalled(after) => {
                self.reset(CloseCode::Timeout);
                return Err(TransportError::Timeout {
                    what: "the peer to read",
                    after,
                });
            }
        };
        written.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => from_connection_error(&c),
            quinn::WriteError::Stopped(code) => stream_reset("stopped", code),
            other => TransportError::Lost(other.to_string()),
        })
    }

    /// Ends the stream cleanly.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Abandons the stream: the peer's reads fail with `code` (what it had not read yet
    /// is discarded).
    pub fn reset(&mut self, code: CloseCode) {
        let _ = self.send.reset((code as u32).into());
    }
}

/// How a write on a [`FrameWriter`] ended: done (well or not), or still waiting for
/// the peer to read when the stall deadline passed.
enum WriteOutcome {
    Done(Result<(), quinn::WriteError>),
    Stalled(Duration),
}

/// Waits for `write`, for at most `stall` when there is one.
async fn within_stall(
    stall: Option<Duration>,
    write: impl std::future::Future<Output = Result<(), quinn::WriteError>>,
) -> WriteOutcome {
    match stall {
        None => WriteOutcome::Done(write.await),
        Some(after) => match tokio::time::timeout(after, write).await {
            Ok(written) => WriteOutcome::Done(written),
            Err(_) => WriteOutcome::Stalled(after),
        },
    }
}

fn stream_reset(how: &'static str, code: quinn::VarInt) -> TransportError {
    let code = code.into_inner();
    let name = u32::try_from(code)
        .ok()
        .and_then(CloseCode::from_u32)
        .map_or_else(|| "unknown code".to_owned(), |c| format!("{c:?}"));
    TransportError::StreamReset { how, code, name }
}

/// Receiving half of a stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    limit: u32,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            limit: limits::MAX_FRAME_BYTES,
        }
    }

    /// Lowers (or restores) the largest frame this reader accepts, e.g.
    /// [`limits::MAX_HELLO_BYTES`] before the peer is authenticated. At most
    /// [`limits::MAX_FRAME_BYTES`].
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit.min(limits::MAX_FRAME_BYTES);
    }

    /// Tells the peer to stop sending on this stream (its writes fail with `code`).
    pub fn stop(&mut self, code: CloseCode) {
        let _ = self.recv.stop((code as u32).into());
    }

    /// Reads one frame's payload. `Ok(None)` at a clean end of stream between frames.
    /// The announced length is checked before the payload buffer is allocated.
    ///
    /// A quiet stream may wait as long as it likes for its next frame, but once a frame's
    /// first byte has arrived the whole frame must arrive within
    /// [`limits::FRAME_COMPLETION_DEADLINE`]: a peer trickling a frame a byte at a time
    /// gets a `Timeout` instead of holding the reader (and the frame's buffer) forever.
    pub async fn recv_payload(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        Ok(self
            .recv_payload_pieces()
            .await?
            .map(|(pieces, _)| gantry_protocol::pieces::join_pieces(&pieces)))
    }

    /// [`Self::recv_payload`] as the pieces quinn received it in (the payload is their
    /// concatenation) and its length, without copying them into one buffer: a 256 KiB
    /// chunk's frame arrives in four or more pieces, and joining them was a copy of every
    /// byte an upload sends (~2.6% of both cores on the coordinator's side of the artifact
    /// benchmark's upload).
    pub async fn recv_payload_pieces(
        &mut self,
    ) -> Result<Option<(Vec<Bytes>, usize)>, TransportError> {
        let mut header = [0u8; HEADER_LEN];
        loop {
            match self.recv.read(&mut header[..1]).await {
                Ok(Some(1)) => break,
                Ok(Some(_)) => {}
                Ok(None) => return Ok(None),
                Err(e) => return Err(read_error(e)),
            }
        }
        let after = limits::FRAME_COMPLETION_DEADLINE;
        tokio::time::timeout(after, self.rest_of_frame(header))
            .await
            .map_err(|_| TransportError::Timeout {
                what: "the rest of a frame",
                after,
            })?
            .map(Some)
    }

    async fn rest_of_frame(
        &mut self,
        mut header: [u8; HEADER_LEN],
    ) -> Result<(Vec<Bytes>, usize), TransportError> {
        match self.recv.read_exact(&mut header[1..]).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(FrameError::Malformed {
                    what: "frame header",
                    detail: format!("stream ended after {} of 4 header bytes", n + 1),
                }
                .into())
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        let len = check_len(u32::from_be_bytes(header), self.limit)?;
        // quinn's own buffers, kept as they are (nothing zeroed, nothing copied).
        let mut pieces = Vec::new();
        let mut received = 0;
        while received < len {
            match self.recv.read_chunk(len - received, true).await {
                Ok(Some(chunk)) => {
                    received += chunk.bytes.len();
                    pieces.push(chunk.bytes);
                }
                Ok(None) => {
                    return Err(FrameError::Malformed {
                        what: "frame",
                        detail: format!("stream ended after {received} of {len} payload bytes"),
                    }
                    .into())
                }
                Err(e) => return Err(read_error(e)),
            }
        }
        Ok((pieces, len))
    }

    /// Reads and decodes one message; `Ok(None)` at a clean end of stream.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, TransportError> {
        match self.recv_payload().await? {
            Some(p) => Ok(Some(gantry_protocol::decode_payload(&p)?)),
            None => Ok(None),
        }
    }

    /// [`Self::recv`] with a deadline.
    pub async fn recv_within<T: DeserializeOwned>(
        &mut self,
        deadline: Duration,
        what: &'static str,
    ) -> Result<Option<T>, TransportError> {
        tokio::time::timeout(deadline, self.recv())
            .await
            .map_err(|_| TransportError::Timeout {
                what,
                after: deadline,
            })?
    }
}

fn read_error(e: quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::ConnectionLost(c) => from_connection_error(&c),
        quinn::ReadError::Reset(code) => stream_reset("reset", code),
        other => TransportError::Lost(other.to_string()),
    }
}
