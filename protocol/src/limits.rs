//! Explicit limits both sides enforce. Each says when to change it.

use std::time::Duration;

/// Largest control frame payload. Control messages are small (a heartbeat is ~60 bytes,
/// an agent list of 1,000 agents ~300 KiB); bulk data never goes on the control stream.
/// Raise it only together with the admin listing sizes it bounds.
pub const MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;

/// Largest hello, read before the peer is authenticated. The biggest real one is an
/// agent's (64 labels of 63+255 bytes, a running-job entry per slot) at ~43 KiB; an
/// enrollment's CSR is ~500 bytes. Capping it bounds what a storm of unauthenticated
/// connections can make the coordinator buffer: `MAX_PENDING_HANDSHAKES` × this, 64 MiB.
/// Raise it only with the label limits.
pub const MAX_HELLO_BYTES: u32 = 64 * 1024;

/// Largest first frame of a stream other than the control stream (a `StreamOpen`). The
/// biggest real one is an exec request (a 64 KiB command and up to ~21 KiB of label
/// selector).
/// Raise it with `MAX_COMMAND_BYTES` in the coordinator's `exec.rs`.
pub const MAX_STREAM_OPEN_BYTES: u32 = 96 * 1024;

/// Once the first byte of a frame has arrived, the rest of it must arrive within this:
/// a peer that trickles a frame a byte at a time is cut off instead of holding a stream
/// and a partly filled buffer forever. Quiet streams between frames are not affected.
/// 30 s carries the largest frame (4 MiB) at ~1.1 Mbit/s; raise it for slower links.
pub const FRAME_COMPLETION_DEADLINE: Duration = Duration::from_secs(30);

/// Longest the coordinator waits for a peer to read one frame it sends (room in the
/// stream's flow-control window). A peer that opens a bulk stream (a download, the agent
/// binary) or its control stream and stops reading has that stream reset after this,
/// freeing the task, the file and the buffers behind it. 30 s is ~1,000 times what a
/// 256 KiB frame takes at 100 Mbit/s; raise it for links where a frame takes longer.
/// Admins' follow and exec streams are exempt: a paused `gantry logs -f | less` holds
/// only its own stream.
pub const STREAM_WRITE_STALL: Duration = Duration::from_secs(30);

/// Connections without a client certificate (enrollments, or anyone) that may be waiting
/// for their hello at once, out of `MAX_PENDING_HANDSHAKES`: more are closed at once
/// with `Busy`. A storm of clients that finish TLS and then say nothing can then never
/// hold the handshake slots reconnecting agents need. Enrollments are rare and quick;
/// raise it only if many hosts enroll at the same moment over slow links.
pub const MAX_UNAUTHENTICATED_PENDING: usize = 256;

/// Control messages per second the coordinator reads from one agent session, after a
/// burst of `AGENT_MESSAGE_BURST`. An honest agent sends a heartbeat every few seconds
/// and a few messages per job; beyond the rate the coordinator reads the session more
/// slowly, so QUIC flow control throttles a flooding agent at its own connection and the
/// flood never reaches the scheduler or other agents' CPU share. Raise it for agents
/// that run hundreds of jobs of a second or less at once, or stream `gantry exec` output
/// faster than ~3 MB/s (16 KiB pieces).
pub const AGENT_MESSAGES_PER_SEC: u32 = 200;
/// Messages an agent session may send at once above `AGENT_MESSAGES_PER_SEC` (results
/// spooled across a reconnect arrive together).
pub const AGENT_MESSAGE_BURST: u32 = 2_000;

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

/// Largest UDP payload of an agent's session (transport profile `Control`), both ways:
/// quinn's default ceiling, a 1500-byte Ethernet frame less the IPv6 and UDP headers.
/// A session carries a few small frames a second; at [`MAX_UDP_PAYLOAD`] the
/// coordinator kept a ~64 KiB send buffer per session (quinn's, sized to the MTU and
/// filled by discovery probes) and each reconnect cost ~12 probes of up to 65,000
/// bytes each way, whose padding quinn decodes a byte at a time: at 10,000 agents
/// 1,198 MiB resident idle and 158.6 s to all come back after a restart, against
/// 523 MiB and 32.7 s at this size (docs/decisions/0086-fleet-scale-transport.md). Bulk
/// transfers use a connection of their own at [`MAX_UDP_PAYLOAD`]. Change it only
/// with `bench-scale` figures at 10,000 agents.
pub const CONTROL_UDP_PAYLOAD: u16 = 1_452;
/// Per-stream receive window of an agent's session: quinn allocates for data as it
/// arrives, not for the window, so this bounds what a session may push ahead rather
/// than what it costs idle. A log stream runs at 256 KiB per round trip (256 MB/s at
/// 1 ms); the largest control frame (4 MiB) takes 16 windows.
pub const CONTROL_STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;
/// Receive (and send) window of an agent's session across its streams.
pub const CONTROL_CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Largest UDP payload accepted, and the ceiling of path MTU discovery. 1472 (quinn's
/// default) fits a 1500-byte Ethernet frame; paths with larger MTUs (loopback, jumbo
/// frames) then carry fewer, larger packets, and much of the cost of a bulk transfer is
/// per packet (crypto calls, ACKs, the kernel's per-datagram path). On a 1500-byte path
/// discovery settles at ~1450 after a few lost probes; on loopback it reaches this.
///
/// Why 65,000: loopback's MTU is 65,536 bytes, and one packet of ~64 KiB per send did a
/// tenth of the per-packet work of ten 6,550-byte packets in one GSO send: on the
/// artifact benchmark (1 GiB on loopback), CPU per GiB uploaded fell from 3.20 to 2.82
/// core-seconds and the upload went from 565 to 647 MB/s. It stays under
/// [`LARGEST_UDP_SEND`] with the IPv6 header too (65,536 − 40 − 8). quinn batches up to
/// ten packets per send whatever their size, so a batch larger than one send allows is
/// cut into several by the transport (`gantry-transport`'s socket); before that cut,
/// this ceiling had to stay at 6,550 (ten packets per send), and at 8,972 whole batches
/// vanished, quinn declared a black hole and fell back to 1,200 bytes.
/// When to change: lower it to 1472 if middleboxes mishandle the probes. It sizes each
/// endpoint's receive buffer (quinn reserves 64 GRO segments of it for each of 32
/// datagrams: address space, touched only as datagrams arrive).
pub const MAX_UDP_PAYLOAD: u16 = 65_000;

/// The largest UDP send Linux accepts: 65,535 bytes of IPv4 datagram less its 20-byte
/// IP and 8-byte UDP headers. A GSO send counts all its segments together.
pub const LARGEST_UDP_SEND: usize = 65_507;

const _: () = assert!(
    MAX_UDP_PAYLOAD as usize <= LARGEST_UDP_SEND,
    "one packet of MAX_UDP_PAYLOAD bytes must fit in one UDP send"
);

/// Kernel buffer asked for each UDP socket, each way. With the common 208 KiB default, a
/// burst of bulk data on a fast path (loopback, LAN) overflows the receive buffer; the
/// losses make congestion control halve its window and MTU discovery fall back to 1200
/// bytes (measured: 1,748 packets lost in a 512 MiB transfer on loopback). When to
/// change: raise it with `net.core.rmem_max` for links faster than ~10 Gbit/s.
pub const UDP_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Longest label key and value accepted, and most labels per agent.
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 255;
pub const MAX_LABELS: usize = 64;

/// Longest a staging host waits for a peer's handshake before it fetches that peer's
/// range of the release from the coordinator instead. Peers share a network; 3 s is
/// about ten times a handshake over a slow LAN. Raise it only for peers across a WAN.
pub const PEER_CONNECT_DEADLINE: Duration = Duration::from_secs(3);

/// A peer that sends no chunk for this long is given up on and the rest of its range
/// comes from the coordinator. It covers the serving host still fetching its own range
/// (which it serves as it arrives). Raise it for links where one chunk (at most
/// 256 KiB compressed) takes longer than this.
pub const PEER_STALL: Duration = Duration::from_secs(10);

/// How long a serving host holds a request for a chunk it is still fetching itself,
/// counted from the last chunks its own fetch brought, before answering that it does
/// not have it. Half of [`PEER_STALL`], so the fetching host hears "unavailable" (and
/// asks the coordinator) before it would give up.
pub const PEER_CHUNK_WAIT: Duration = Duration::from_secs(5);

/// How long a host serves a release to the other hosts it was staged with, counted from
/// the stage step. Twice the default staging deadline (10 min).
pub const PEER_SHARE_TTL: Duration = Duration::from_secs(20 * 60);

/// Peer connections one agent serves at once; more are refused (the fetcher then asks
/// the coordinator). A deployment to N hosts opens N - 1 per host.
pub const MAX_PEER_CONNECTIONS: usize = 256;

/// Releases one agent shares at once (one per deployment staging on it).
pub const MAX_PEER_SHARES: usize = 64;

/// Hosts that stage one release as one swarm. A larger deployment is cut into swarms of
/// this many (in the coordinator's order of hosts), each fetching the release from the
/// coordinator about once, so the coordinator sends ~N/32 copies and each host dials at
/// most 31 peers. Raise it when the coordinator's link is the bottleneck and hosts can
/// afford more peer connections.
pub const PEER_SWARM_HOSTS: usize = 32;

/// Outputs a job declares (`outputs:`). With [`MAX_OUTPUT_VALUE_BYTES`] each, one job's
/// outputs are at most 32 × 16 KiB = 512 KiB, an eighth of a control frame
/// ([`MAX_FRAME_BYTES`]), so the result that carries them always fits. Raise it only
/// with the frame limit.
pub const MAX_JOB_OUTPUTS: usize = 32;

/// Names one step may write to its `$GANTRY_OUTPUT` file; more fail the step with the
/// count. Step outputs stay on the agent, so this bounds the agent's memory per step.
pub const MAX_STEP_OUTPUTS: usize = 64;

/// Longest output name: letters, digits, `_` and `-`.
pub const MAX_OUTPUT_NAME_LEN: usize = 64;

/// Longest output value (a version, a digest, a URL, a short JSON document). Larger
/// data goes in an artifact. A longer value fails the step that wrote it, naming the
/// output and the limit.
pub const MAX_OUTPUT_VALUE_BYTES: usize = 16 * 1024;

/// Longest heredoc delimiter in a `$GANTRY_OUTPUT` file (`NAME<<DELIMITER`): a
/// random token such as `EOF_3f2a...` fits; the file size limit below counts on it.
pub const MAX_OUTPUT_DELIMITER_LEN: usize = 64;

/// Largest `$GANTRY_OUTPUT` file the agent reads after a step: every name and value at
/// their limits, with a heredoc delimiter line (at most 64 bytes) around each value:
/// 64 × (64 + 16 Ki + 2 × 64 + 8) ≈ 1.02 MiB, rounded up to 1 MiB + 64 KiB. A larger
/// file fails the step before it is parsed.
pub const MAX_OUTPUT_FILE_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// References to `needs.JOB.outputs.NAME` in one job's text. The coordinator fills them
/// in when it dispatches the job, so they add at most 64 × 16 KiB = 1 MiB to the
/// assignment, which leaves 3 MiB of the 4 MiB frame for the job's own text (its file
/// is at most 1 MiB). The pipeline crate refuses a job with more.
pub const MAX_OUTPUT_REFERENCES: usize = 64;

const _: () = assert!(
    MAX_JOB_OUTPUTS * (MAX_OUTPUT_VALUE_BYTES + MAX_OUTPUT_NAME_LEN)
        <= MAX_FRAME_BYTES as usize / 4,
    "one job's outputs must fit well inside a control frame"
);
const _: () = assert!(
    MAX_OUTPUT_REFERENCES * MAX_OUTPUT_VALUE_BYTES <= MAX_FRAME_BYTES as usize / 4,
    "filled-in output references must leave most of a dispatch frame to the job"
);

/// Most service containers one job starts (`services:`). Each is a container and a
/// health-check loop on the agent beside the job's own work; a job needing more is
/// better split. Raise it with the pipeline loader and agents together: an agent
/// refuses a job over the limit it knows.
pub const MAX_SERVICES: usize = 10;

/// Most ports one service publishes.
pub const MAX_SERVICE_PORTS: usize = 16;
