//! `gantry-protocol`: everything the coordinator, its agents and the admin CLI must agree
//! on, and nothing else.
//!
//! This crate owns the message types of each direction, the length-delimited postcard
//! framing, the versioned hello, the explicit limits, the close codes, the typed ids and content digests.
//! It must not know about sockets, quinn, storage or processes: the only I/O-shaped code
//! here is a sans-IO frame decoder that takes bytes and hands back frames, so it can be
//! fuzzed and tested without a network.

pub mod authz;
pub mod deploy;
pub mod digest;
pub mod execution;
pub mod frame;
pub mod hello;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod pieces;
pub mod reports;
pub mod repos;
pub mod status;
pub mod template;
pub mod transfer;
pub mod web;

pub use deploy::*;
pub use digest::{Digest, DigestParseError, DIGEST_PREFIX};
pub use execution::*;
pub use frame::{decode_payload, encode_frame, FrameDecoder, FrameError};
pub use hello::{decode_hello, encode_hello, Hello, HelloError};
pub use ids::{civil_from_days, AgentId, Attempt, IdError, JobId, RunId, TokenId, UnixMillis};
pub use messages::*;
pub use reports::{Coverage, ReportKind, ReportUpload, ReportsStored, TestFailure, TestReport};
pub use repos::{
    AddRepo, RepoAuth, RepoView, RunRepo, TreeSource, TreeSourceError, GIT_PAYLOAD_MAGIC,
    MAX_SOURCE_DEPTHS, TREE_SOURCE_PREFIX, TREE_SOURCE_VERSION,
};
pub use status::{CompareOp, ConditionValue, StatusExpr};
pub use transfer::*;
pub use web::*;

/// ALPN protocol id; a peer that does not offer it fails the QUIC handshake.
pub const ALPN: &[u8] = b"gantry/1";

/// ALPN of the peer listener agents run to serve release chunks to each other during a
/// deployment's staging; distinct from [`ALPN`], so neither endpoint can be mistaken for
/// the other.
pub const PEER_ALPN: &[u8] = b"gantry-peer/1";

/// The TLS server name a host asks for when it dials a peer. Peers are verified by the
/// agent identity in their certificate (the coordinator names it), not by this name.
pub const PEER_SERVER_NAME: &str = "peer.gantry.internal";

/// Version of the message schema carried in every hello. Bump it when a message changes
/// shape; the coordinator accepts `MIN_SUPPORTED_VERSION..=PROTOCOL_VERSION`. Version 3
/// added `CoordinatorMessage::DispatchJob` ([`EXECUTION_VERSION`]), which only agents
/// of version 3 are sent. Version 4 ([`TREE_SOURCE_VERSION`]) changed no message: its
/// agents check out a run's [`TreeSource`] through the chunk store, so only they get the
/// jobs of such runs.
pub const PROTOCOL_VERSION: u16 = 4;
/// Oldest hello version the coordinator still speaks. Version 2 added artifacts and caches
/// to job assignments, which a version 1 agent cannot decode, so 1 is no longer spoken.
/// Version 2 agents are still served: every message they can be sent has its version 2
/// shape.
pub const MIN_SUPPORTED_VERSION: u16 = 2;

/// The TLS server name every client asks for. The coordinator's certificate carries it as
/// a DNS SAN whatever address it is reached at, so agents can dial an IP, a hostname or a
/// NAT'd address and still verify the certificate against the pinned CA.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.gantry.internal";

/// The label an agent started with `gantry-agent run --untrusted-work` announces. Like
/// every `gantry.reserved/` label it reserves the agent: it takes only jobs that ask for
/// it, which are the jobs of untrusted runs (fork pull requests), so untrusted code and
/// trusted work never share a host, its caches or its workspaces. The one reserved label
/// an agent may announce for itself: it only narrows what the agent is given.
pub const UNTRUSTED_WORK_LABEL: &str = "gantry.reserved/untrusted";

/// Application close codes, sent in QUIC CONNECTION_CLOSE frames with a reason text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly end of a session.
    Normal = 0,
    /// The peer sent a frame over the size limit.
    FrameTooLarge = 1,
    /// The peer sent bytes that are not a valid frame or message.
    Malformed = 2,
    /// The hello named a protocol version this side does not speak.
    UnsupportedVersion = 3,
    /// The peer is not allowed to do what it asked (no certificate, wrong role).
    Unauthorized = 4,
    /// The agent's identity has been revoked.
    Revoked = 5,
    /// The peer did not complete a step before its deadline.
    Timeout = 6,
    /// A newer session for the same agent replaced this one.
    Replaced = 7,
    /// The coordinator is shutting down; reconnect later.
    ShuttingDown = 8,
    /// The enrollment was refused (bad token or CSR).
    EnrollmentRefused = 9,
    /// Too many connections are waiting; try again shortly.
    Busy = 10,
}

impl CloseCode {
    pub fn from_u32(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::FrameTooLarge,
            2 => Self::Malformed,
            3 => Self::UnsupportedVersion,
            4 => Self::Unauthorized,
            5 => Self::Revoked,
            6 => Self::Timeout,
            7 => Self::Replaced,
            8 => Self::ShuttingDown,
            9 => Self::EnrollmentRefused,
            10 => Self::Busy,
            _ => return None,
        })
    }
}
