//! The enrollment session: a connection without a certificate presents a join token
//! and a CSR (its hello), and gets its certificate or a refusal. The checks and the
//! signing are the access service's; this side only carries the answer.

use std::time::Duration;

use gantry_protocol::{CloseCode, EnrollRequest, HelloReply};
use gantry_transport::{Connection, FrameWriter};

use crate::edges::quic::wire::refuse;
use crate::services::coordinator::Coordinator;

/// How long an enrolled agent is given to read its certificate before the connection
/// is closed.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Answers one enrollment.
pub async fn session(
    coord: &Coordinator,
    conn: &Connection,
    writer: &mut FrameWriter,
    req: EnrollRequest,
) {
    let remote = conn.remote_address();
    match coord.access.enroll(&req, remote.to_string()) {
        Ok(enrolled) => {
            tracing::info!(%remote, agent = %enrolled.agent_id, "agent enrolled");
            if let Err(e) = writer.send(&HelloReply::Enrolled(enrolled)).await {
                tracing::warn!(%remote, error = %e, "could not send the enrollment reply");
            }
            writer.finish();
            let _ = tokio::time::timeout(REPLY_GRACE, conn.closed()).await;
        }
        Err(refusal) => {
            tracing::info!(%remote, reason = ?refusal.reason, "enrollment refused: {}", refusal.message);
            refuse(
                conn,
                writer,
                CloseCode::EnrollmentRefused,
                refusal.reason,
                refusal.message,
            )
            .await;
        }
    }
}
