//! Explicit limits both sides enforce. Each says when to change it.

use std::time::Duration;

/// Largest control frame payload. Control messages are small (a heartbeat is ~60 bytes,
/// an agent list of 1,000 agents ~300 KiB); bulk data never goes on the control stream.
/// Raise it only together with the admin listing sizes it bounds.
pub const MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;

/// Time a client has to finish the TLS handshake and send its hello. Slow links at 300 ms
/// RTT need ~1 s; 10 s leaves room and still frees a slot held by a silent peer quickly.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// A connection with no traffic for this long is closed. Agents heartbeat every
/// `DEFAULT_HEARTBEAT_INTERVAL` and QUIC keep-alives run every `KEEP_ALIVE_INTERVAL`, so
/// only a dead or partitioned peer reaches it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// QUIC keep-alive period; must stay well under `IDLE_TIMEOUT` and under NAT timeouts (~30 s).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How often an agent reports its host figures. The coordinator may override it in the
/// welcome; shorter means fresher figures and more store writes.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Concurrent bidirectional streams a peer may open: one control stream plus room for
/// bulk transfers (later issues). Keeping it small bounds per-connection memory.
pub const MAX_BIDI_STREAMS: u32 = 16;
/// Concurrent unidirectional streams a peer may open (log and chunk uploads).
pub const MAX_UNI_STREAMS: u32 = 16;
/// Per-stream receive window. 1 MiB keeps a single stream near line rate on loopback and
/// LAN RTTs while bounding buffered data per stream.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Per-connection receive window across all streams: bounds what one peer can make us buffer.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// Longest label key and value accepted, and most labels per agent.
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 255;
pub const MAX_LABELS: usize = 64;
