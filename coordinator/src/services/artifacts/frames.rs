//! Reading a bulk stream's frames on their own task, a few ahead of the work.

use gantry_cas::Bytes;
use gantry_protocol::{ChunkPut, ReceivedChunkPieces};
use gantry_transport::{FrameReader, TransportError};
use tokio::sync::mpsc;

/// Frames read ahead of processing on a bulk stream (each at most ~257 KiB).
const READ_AHEAD_FRAMES: usize = 16;

/// Reads frames of one type on their own task (a frame read is not cancel-safe), a few
/// ahead of the consumer.
pub(super) fn read_ahead<T: serde::de::DeserializeOwned + Send + 'static>(
    reader: FrameReader,
) -> mpsc::Receiver<Result<Option<T>, TransportError>> {
    read_ahead_with(reader, |pieces, _| {
        gantry_protocol::decode_payload(&gantry_protocol::pieces::join_pieces(&pieces))
    })
}

/// [`read_ahead`] for the [`ChunkPut`]s of a put stream, each left in the pieces it
/// arrived in ([`ChunkPut::decode_received_pieces`]): joining them was a copy of every
/// byte uploaded.
pub(super) fn read_ahead_chunk_puts(
    reader: FrameReader,
) -> mpsc::Receiver<Result<Option<ReceivedChunkPieces>, TransportError>> {
    read_ahead_with(reader, |pieces, len| {
        ChunkPut::decode_received_pieces(&pieces, len)
    })
}

/// [`read_ahead`], decoding each payload, as the pieces it arrived in and its length,
/// with `decode`.
fn read_ahead_with<T: Send + 'static>(
    mut reader: FrameReader,
    decode: fn(Vec<Bytes>, usize) -> Result<T, gantry_protocol::FrameError>,
) -> mpsc::Receiver<Result<Option<T>, TransportError>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD_FRAMES);
    tokio::spawn(async move {
        loop {
            let item = match reader.recv_payload_pieces().await {
                Ok(Some((pieces, len))) => {
                    decode(pieces, len).map(Some).map_err(TransportError::from)
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let last = !matches!(item, Ok(Some(_)));
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    rx
}
