//! What every QUIC session shares: the welcome, reading a stream's first frame,
//! refusing a connection or a stream with a reason the peer can show, and closing a
//! connection for a stream error with the matching code.

use std::time::Duration;

use gantry_protocol::{limits, CloseCode, HelloReply, Refusal, RefusalReason, StreamOpen, Welcome};
use gantry_transport::{Connection, FrameReader, FrameWriter, TransportError};

use crate::base::authz::{forbidden, Denied, Request};

/// Longest close reason sent; QUIC close frames must fit in one packet.
const MAX_REASON_BYTES: usize = 400;

/// What a session is numbered by: `session` numbers an agent's sessions (so an old
/// one's end does not remove a newer one), `connection` numbers connections (so an
/// upload session is fed only by the connection that opened it).
#[derive(Debug, Clone, Copy)]
pub struct Numbers {
    pub session: u64,
    pub connection: u64,
}

/// The reply to an accepted hello: who the peer is, and how often an agent sends
/// heartbeats.
pub fn welcome(identity: String, heartbeat_interval: Duration) -> HelloReply {
    HelloReply::Welcome(Welcome {
        protocol_version: gantry_protocol::PROTOCOL_VERSION,
        coordinator_version: env!("CARGO_PKG_VERSION").into(),
        identity,
        heartbeat_interval_ms: heartbeat_interval.as_millis() as u64,
    })
}

/// `reason` cut to what a close frame carries.
pub fn truncate(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Reads a stream's first frame (at most [`limits::MAX_STREAM_OPEN_BYTES`], within
/// the handshake deadline); `None` if it ended or was bad (logged).
pub async fn stream_open(reader: &mut FrameReader, who: &str) -> Option<StreamOpen> {
    reader.set_limit(limits::MAX_STREAM_OPEN_BYTES);
    let open = reader
        .recv_within::<StreamOpen>(limits::HANDSHAKE_DEADLINE, "the stream's first frame")
        .await;
    reader.set_limit(limits::MAX_FRAME_BYTES);
    match open {
        Ok(Some(open)) => Some(open),
        Ok(None) => None,
        Err(e) => {
            tracing::info!(%who, "bad stream: {e}");
            reader.stop(CloseCode::Malformed);
            None
        }
    }
}

/// Closes a connection for a stream error, with the matching code and the error as reason.
pub fn close_for(conn: &Connection, e: &TransportError) {
    let code = match e {
        TransportError::Frame(gantry_protocol::FrameError::TooLarge { .. }) => {
            CloseCode::FrameTooLarge
        }
        TransportError::Frame(_) => CloseCode::Malformed,
        TransportError::Timeout { .. } => CloseCode::Timeout,
        _ => return,
    };
    tracing::info!(remote = %conn.remote_address(), error = %e, "closing connection");
    conn.close(code, truncate(&e.to_string()));
}

/// Sends a typed refusal, lets the peer read it, then closes with `code`.
pub async fn refuse(
    conn: &Connection,
    writer: &mut FrameWriter,
    code: CloseCode,
    reason: RefusalReason,
    message: String,
) {
    let _ = writer
        .send(&HelloReply::Refused(Refusal {
            reason,
            message: message.clone(),
        }))
        .await;
    writer.finish();
    // A peer that read the refusal closes by itself; one that does not is cut off after 1 s.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(code, truncate(&message));
}

/// What a refusal of `row` says besides the table, when the caller is who it is.
pub fn stream_detail(row: Request) -> &'static str {
    match row {
        Request::StreamResolveArtifact => "only admins ask for an artifact by run and name",
        Request::StreamGetManifestAdmin
        | Request::StreamFetchChunksAdmin
        | Request::StreamUploadAdmin => "an agent cannot use an admin grant",
        Request::StreamUploadDeploy => "a deploy grant reads only its deployment's release",
        Request::StreamUploadJob => "uploads are made by the job that declares them",
        Request::StreamLogs
        | Request::StreamFetchSource
        | Request::StreamFetchAgentBinary
        | Request::StreamReports => "only agents open this stream",
        _ => "only admins open this stream",
    }
}

/// Tells a peer the authorization table refused its stream: in the stream's own reply
/// type when it has a refusal, else by resetting the stream with `Unauthorized` (the
/// coordinator's log says why). The peer is told to stop sending either way.
pub async fn refuse_stream(
    open: &StreamOpen,
    denied: &Denied,
    mut writer: FrameWriter,
    mut reader: FrameReader,
) {
    use gantry_protocol::{
        ChunkFrame, ExecEvent, FollowEvent, ManifestFrame, PutReply, ResolveReply, SourceStored,
        UploadReply,
    };
    let message = denied.to_string();
    writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
    let sent = match open {
        StreamOpen::Resolve(_) => writer.send(&ResolveReply::Refused { message }).await,
        StreamOpen::GetManifest { .. } => writer.send(&ManifestFrame::Refused { message }).await,
        StreamOpen::FetchChunks { .. } => writer.send(&ChunkFrame::Refused { message }).await,
        StreamOpen::Upload { .. } => writer.send(&UploadReply::Refused { message }).await,
        StreamOpen::PutChunks { .. } => writer.send(&PutReply::Refused { message }).await,
        StreamOpen::UploadSource { .. } => writer.send(&SourceStored::Refused { message }).await,
        StreamOpen::Exec(_) => writer.send(&ExecEvent::Refused { message }).await,
        StreamOpen::FollowLogs { .. } | StreamOpen::FollowRun { .. } => {
            writer.send(&FollowEvent::Error(forbidden(denied))).await
        }
        StreamOpen::Reports { .. } => {
            writer
                .send(&gantry_protocol::ReportsStored::Refused { message })
                .await
        }
        StreamOpen::Logs { .. }
        | StreamOpen::FetchSource { .. }
        | StreamOpen::FetchAgentBinary { .. } => {
            writer.reset(CloseCode::Unauthorized);
            reader.stop(CloseCode::Unauthorized);
            return;
        }
    };
    if sent.is_ok() {
        writer.finish();
    }
    reader.stop(CloseCode::Unauthorized);
}
