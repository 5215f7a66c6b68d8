//! Artifact, cache and chunk transfers: what goes on the bulk streams.
//!
//! Chunks and manifests never travel on the control stream. Each transfer opens its own
//! bidirectional stream whose first frame is a [`crate::StreamOpen`] naming it; several run
//! in parallel, so one large download never delays a heartbeat or another job's log.
//!
//! Reading (a job's inputs, `gantry artifacts get`):
//! 1. [`ResolveRequest`] → one [`ResolveReply`]: which manifests the reader may have
//!    (a job's artifacts, a cache hit), each as a view with its manifest digest.
//! 2. `GetManifest` → [`ManifestFrame`]s: the manifest's canonical bytes in pieces.
//! 3. `FetchChunks` → the reader sends [`ChunkWants`], the coordinator answers one
//!    [`ChunkFrame`] per wanted digest, in order. Chunks are verified on both sides.
//!
//! Writing (a job's artifact or cache):
//! 1. `Upload` opens a session; the coordinator answers [`UploadReply::Opened`].
//! 2. [`UploadRequest::Have`] → [`UploadReply::Missing`]: only missing chunks are sent.
//! 3. `PutChunks` streams (several at once) carry [`ChunkPut`]s of the session; each
//!    ends with one [`PutReply`] once its chunks are durable.
//! 4. [`UploadRequest::Commit`] plus the manifest pieces → [`UploadReply::Committed`], or
//!    [`UploadReply::Missing`] when chunks are gone (the uploader sends them and commits
//!    again).
//!
//! Byte payloads are `serde_bytes`: postcard writes them exactly as it writes a `Vec<u8>`
//! (a length, then the bytes), but in one copy instead of one call per byte, which was
//! a fifth of an agent's CPU time in a 1 GiB transfer.
//!
//! Every request names the [`Grant`] it relies on; the coordinator checks it against
//! what it handed to that agent. An admin's grant comes from its certificate.

use std::ops::Range;

use bytes::Bytes;

use serde::{Deserialize, Serialize};

use crate::frame::{decode_payload_borrowed, encode_frame_head, FrameError};
use crate::limits::MAX_FRAME_BYTES;
use crate::{Attempt, Digest, JobId, RunId, UnixMillis};

/// Most digests in one [`ChunkWants`] or [`UploadRequest::Have`]: 8,192 × 33 bytes is
/// about 270 KiB, well inside a frame, and a 1 GiB artifact of 64 KiB chunks needs two.
pub const MAX_DIGESTS_PER_FRAME: usize = 8192;
/// Size of the pieces a manifest travels in.
pub const MANIFEST_PIECE_BYTES: usize = 1024 * 1024;

/// What a transfer is allowed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    /// The job attempt the agent holds: it may read its run's artifacts and the caches
    /// its branch may see, and write its own job's artifact and cache.
    Job { job: JobId, attempt: Attempt },
    /// An admin connection: reads anything. Refused on an agent's connection.
    Admin,
    /// A host staging a deployment's release: reads that release's manifest and chunks,
    /// while the step is in flight.
    Deploy { deployment: u64, epoch: u64 },
}

/// Which manifests a reader may fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResolveRequest {
    /// The artifacts a job receives: all those of its `needs`, or the ones it names in
    /// `download`. Missing named ones are an error.
    JobArtifacts { job: JobId, attempt: Attempt },
    /// The cache a job restores: `key` exactly, then each of `restore_keys` as a prefix
    /// (newest first), in the job's own branch, then in the protected branches.
    Cache {
        job: JobId,
        attempt: Attempt,
        key: String,
        restore_keys: Vec<String>,
    },
    /// One artifact of a run (admins).
    Artifact { run: RunId, name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResolveReply {
    Artifacts(Vec<ArtifactView>),
    /// `None` when no cache matched.
    Cache(Option<CacheHit>),
    Refused {
        message: String,
    },
}

/// A cache that matched a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHit {
    pub cache: CacheView,
    /// Whether the key matched exactly (else a restore key matched as a prefix).
    pub exact: bool,
}

/// A stored artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub run: RunId,
    pub job: JobId,
    pub job_name: String,
    pub name: String,
    pub manifest: Digest,
    /// Bytes of all files (uncompressed).
    pub bytes: u64,
    pub files: u64,
    pub chunks: u64,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
}

/// A stored cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheView {
    pub pipeline: String,
    pub branch: String,
    pub key: String,
    pub manifest: Digest,
    pub bytes: u64,
    pub files: u64,
    pub created_at: UnixMillis,
    pub last_used: UnixMillis,
    /// The job that saved it.
    pub job: JobId,
}

/// Coordinator to reader on a `GetManifest` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestFrame {
    /// The manifest's length; pieces follow until that many bytes arrived.
    Start {
        bytes: u64,
    },
    Piece(#[serde(with = "serde_bytes")] Vec<u8>),
    Refused {
        message: String,
    },
}

/// Reader to coordinator on a `FetchChunks` stream: chunks wanted, answered in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkWants(pub Vec<Digest>);

/// Coordinator to reader on a `FetchChunks` stream, one per wanted digest (or one
/// `Refused` for the whole stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkFrame {
    /// The chunk, zstd-compressed; `size` is its uncompressed length.
    Data {
        digest: Digest,
        size: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The coordinator cannot serve this chunk (missing, or found corrupt on its disk
    /// and quarantined); the reason says which.
    Unavailable {
        digest: Digest,
        reason: String,
    },
    Refused {
        message: String,
    },
}

/// What an upload session writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadTarget {
    /// The job's artifact, kept `expire_in_secs` (0: the coordinator's default).
    Artifact { name: String, expire_in_secs: u64 },
    /// The job's cache under `key`, in its run's branch scope.
    Cache { key: String },
}

/// First frame of an `Upload` stream's conversation, after the `StreamOpen`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadRequest {
    /// Which of these chunks does the coordinator lack? Those it has are kept for this
    /// session (garbage collection will not take them) until it ends.
    Have(Vec<Digest>),
    /// The manifest follows in `ManifestPiece`s of this many bytes in total; then the
    /// coordinator stores the artifact or cache if every chunk is there.
    Commit {
        manifest_bytes: u64,
    },
    ManifestPiece(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadReply {
    /// The session is open; `PutChunks` streams name it.
    Opened {
        session: u64,
    },
    /// The chunks the coordinator lacks (answer to `Have`, or to a commit whose manifest
    /// names chunks it does not hold).
    Missing(Vec<Digest>),
    /// Stored and durable.
    Committed(Committed),
    /// A cache with this key already exists in this scope; caches never change.
    CacheExists {
        key: String,
    },
    Refused {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Committed {
    Artifact(ArtifactView),
    Cache(CacheView),
}

/// One chunk on a `PutChunks` stream: zstd-compressed bytes of `size` uncompressed bytes
/// whose BLAKE3 digest is `digest`. The coordinator checks all three before storing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPut {
    pub digest: Digest,
    pub size: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl ChunkPut {
    /// The frame of a `ChunkPut` less its `data_len` bytes of data, which the sender
    /// writes after it as they are (see [`encode_frame_head`]).
    pub fn frame_head(digest: Digest, size: u32, data_len: usize) -> Result<Vec<u8>, FrameError> {
        let empty = ChunkPut {
            digest,
            size,
            data: Vec::new(),
        };
        encode_frame_head(&empty, data_len, MAX_FRAME_BYTES)
    }
}

impl ChunkPut {
    /// Decodes a `ChunkPut` payload received in pieces (their concatenation; `len`
    /// bytes in all), leaving the data in them: only the head (at most
    /// [`CHUNK_PUT_HEAD_MAX`] bytes) is copied. Accepts and refuses exactly the payloads
    /// [`crate::decode_payload`] does.
    pub fn decode_received_pieces(
        pieces: &[Bytes],
        len: usize,
    ) -> Result<ReceivedChunkPieces, FrameError> {
        let malformed = |detail: String| FrameError::Malformed {
            what: "ChunkPutRef",
            detail,
        };
        let total: usize = pieces.iter().map(Bytes::len).sum();
        if total != len {
            return Err(malformed(format!(
                "{total} bytes in the pieces of a {len}-byte payload"
            )));
        }
        // postcard writes the fields in order, with no framing: the digest's 32 bytes,
        // the size as a varint, then the data as a varint length and the bytes.
        let mut head = [0u8; CHUNK_PUT_HEAD_MAX];
        let head_len = len.min(CHUNK_PUT_HEAD_MAX);
        crate::pieces::copy_from_pieces(pieces, 0, &mut head[..head_len]);
        let decode_error = |e: postcard::Error| malformed(e.to_string());
        let ((digest, size), rest) =
            postcard::take_from_bytes::<(Digest, u32)>(&head[..head_len]).map_err(decode_error)?;
        let (data_len, rest) = postcard::take_from_bytes::<usize>(rest).map_err(decode_error)?;
        let start = head_len - rest.len();
        let available = len - start;
        if data_len > available {
            return Err(decode_error(postcard::Error::DeserializeUnexpectedEnd));
        }
        if data_len < available {
            return Err(malformed(format!(
                "{} trailing bytes after the message",
                available - data_len
            )));
        }
        Ok(ReceivedChunkPieces {
            digest,
            size,
            data: slice_pieces(pieces, start..len),
            data_len,
        })
    }
}

/// The most bytes a [`ChunkPut`] payload holds before its data: the digest (32), the
/// size (a varint of at most 5) and the data's length (a varint of at most 10).
pub const CHUNK_PUT_HEAD_MAX: usize = 64;

/// A [`ChunkPut`] as it arrived in pieces: its data is the concatenation of
/// [`ReceivedChunkPieces::data_pieces`], which share quinn's receive buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedChunkPieces {
    pub digest: Digest,
    /// Uncompressed length.
    pub size: u32,
    data: Vec<Bytes>,
    data_len: usize,
}

impl ReceivedChunkPieces {
    /// The chunk's compressed bytes, in pieces that join to the whole.
    pub fn data_pieces(&self) -> &[Bytes] {
        &self.data
    }

    /// Length of the chunk's compressed bytes.
    pub fn data_len(&self) -> usize {
        self.data_len
    }
}

/// The pieces covering `range` of `pieces` joined, sharing their buffers.
fn slice_pieces(pieces: &[Bytes], range: Range<usize>) -> Vec<Bytes> {
    crate::pieces::pieces_in(pieces, range)
        .map(|(piece, within)| piece.slice(within))
        .collect()
}

impl ChunkFrame {
    /// The frame of a `ChunkFrame::Data` less its `data_len` bytes of data, which the
    /// sender writes after it as they are (see [`encode_frame_head`]).
    pub fn data_frame_head(
        digest: Digest,
        size: u32,
        data_len: usize,
    ) -> Result<Vec<u8>, FrameError> {
        let empty = ChunkFrame::Data {
            digest,
            size,
            data: Vec::new(),
        };
        encode_frame_head(&empty, data_len, MAX_FRAME_BYTES)
    }

    /// Decodes a `ChunkFrame` payload, leaving a chunk's data where it arrived.
    pub fn decode_received(payload: Vec<u8>) -> Result<ReceivedChunkFrame, FrameError> {
        let (digest, size, data) = match decode_payload_borrowed(&payload)? {
            ChunkFrameRef::Data { digest, size, data } => {
                (digest, size, range_within(&payload, data))
            }
            ChunkFrameRef::Unavailable { digest, reason } => {
                return Ok(ReceivedChunkFrame::Unavailable { digest, reason })
            }
            ChunkFrameRef::Refused { message } => {
                return Ok(ReceivedChunkFrame::Refused { message })
            }
        };
        Ok(ReceivedChunkFrame::Data(ReceivedChunk {
            digest,
            size,
            payload,
            data,
        }))
    }
}

/// A chunk as it arrived in a frame: the frame's payload, and which bytes of it are the
/// chunk's (zstd-compressed) data. Decoding into a `Vec<u8>` field instead copies every
/// chunk once more, a memcpy of every byte a transfer moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedChunk {
    pub digest: Digest,
    /// Uncompressed length.
    pub size: u32,
    payload: Vec<u8>,
    data: Range<usize>,
}

impl ReceivedChunk {
    /// The chunk's compressed bytes.
    pub fn data(&self) -> &[u8] {
        &self.payload[self.data.clone()]
    }

    /// The frame's payload and where the chunk's compressed bytes lie in it, for a
    /// receiver that keeps them without copying them out.
    pub fn into_payload(self) -> (Vec<u8>, Range<usize>) {
        (self.payload, self.data)
    }
}

/// A [`ChunkFrame`] as it arrived, its data left in the frame's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceivedChunkFrame {
    Data(ReceivedChunk),
    Unavailable { digest: Digest, reason: String },
    Refused { message: String },
}

/// [`ChunkFrame`] borrowing a chunk's data from the payload; the same variants in the
/// same order, so the same wire form.
#[derive(Deserialize)]
enum ChunkFrameRef<'a> {
    Data {
        digest: Digest,
        size: u32,
        #[serde(with = "serde_bytes", borrow)]
        data: &'a [u8],
    },
    Unavailable {
        digest: Digest,
        reason: String,
    },
    Refused {
        message: String,
    },
}

/// Where `part`, a slice borrowed from `whole`, lies in it.
fn range_within(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// Coordinator to uploader at the end of a `PutChunks` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutReply {
    /// Every chunk of the stream is durable.
    Stored {
        chunks: u64,
        bytes: u64,
    },
    Refused {
        message: String,
    },
}

/// What `gantry gc` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GcReport {
    pub dry_run: bool,
    pub artifacts_expired: u64,
    pub caches_evicted: u64,
    pub chunks_deleted: u64,
    /// Bytes freed on disk (compressed chunk files).
    pub bytes_freed: u64,
    /// Chunks kept although nothing references them: in an upload that is still open, or
    /// written less than the grace period ago.
    pub chunks_protected: u64,
    pub chunks_kept: u64,
    pub bytes_kept: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serde_bytes` must not change the wire: a chunk's bytes are encoded exactly as a
    /// plain `Vec<u8>` would be (so a peer built either way reads the other).
    #[test]
    fn byte_payloads_keep_the_plain_vec_encoding() {
        #[derive(Serialize)]
        struct Plain {
            digest: Digest,
            size: u32,
            data: Vec<u8>,
        }
        let data = vec![7u8; 300];
        let put = ChunkPut {
            digest: Digest::of(&data),
            size: 300,
            data: data.clone(),
        };
        let plain = Plain {
            digest: put.digest,
            size: 300,
            data,
        };
        assert_eq!(
            postcard::to_stdvec(&put).expect("put"),
            postcard::to_stdvec(&plain).expect("plain")
        );
    }

    /// Splits `payload` at `cuts` into pieces, as quinn might hand it over.
    fn split(payload: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(payload.len())).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&payload.len()]) {
            pieces.push(Bytes::copy_from_slice(&payload[at..cut]));
            at = cut;
        }
        pieces
    }

    /// Decoding in pieces gives what decoding the joined payload gives, wherever the
    /// payload is cut, and refuses what it refuses (truncated, trailing bytes).
    #[test]
    fn a_chunk_put_decodes_alike_from_pieces_and_from_one_buffer() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let put = ChunkPut {
                digest: Digest::of(&data),
                size: u32::try_from(len).expect("small") + 1_000_000,
                data,
            };
            let payload = postcard::to_stdvec(&put).expect("encode");
            let whole = crate::decode_payload::<ChunkPut>(&payload).expect("whole");
            let mut splits: Vec<Vec<usize>> =
                (0..=payload.len().min(80)).map(|c| vec![c]).collect();
            splits.push(vec![1, 33, 34, payload.len() / 2, payload.len()]);
            splits.push(vec![payload.len().saturating_sub(1)]);
            for cuts in splits {
                let pieces = split(&payload, &cuts);
                let received = ChunkPut::decode_received_pieces(&pieces, payload.len())
                    .unwrap_or_else(|e| panic!("{len} bytes cut at {cuts:?}: {e}"));
                assert_eq!(received.digest, whole.digest);
                assert_eq!(received.size, whole.size);
                assert_eq!(received.data_len(), whole.data.len());
                let joined: Vec<u8> = received
                    .data_pieces()
                    .iter()
                    .flat_map(|p| p.to_vec())
                    .collect();
                assert_eq!(joined, whole.data, "{len} bytes cut at {cuts:?}");
            }
            for bad in [
                payload[..payload.len().saturating_sub(1)].to_vec(),
                [&payload[..], &[0]].concat(),
            ] {
                let cut = bad.len() / 3;
                assert!(crate::decode_payload::<ChunkPut>(&bad).is_err());
                let refused = ChunkPut::decode_received_pieces(&split(&bad, &[cut]), bad.len());
                assert!(
                    refused.is_err(),
                    "{} bytes of a {len}-byte put accepted in pieces",
                    bad.len()
                );
            }
        }
    }

    fn frame_and_payload(frame: &[u8]) -> Vec<u8> {
        frame[crate::frame::HEADER_LEN..].to_vec()
    }

    #[test]
    fn a_chunk_put_sent_as_head_and_data_is_the_frame_of_the_whole_put() {
        for len in [0usize, 1, 200, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let put = ChunkPut {
                digest: Digest::of(&data),
                size: 9_999,
                data: data.clone(),
            };
            let mut framed = ChunkPut::frame_head(put.digest, put.size, len).expect("head");
            framed.extend_from_slice(&data);
            let whole = crate::encode_frame(&put, MAX_FRAME_BYTES).expect("whole");
            assert_eq!(framed, whole, "{len} bytes");

            let payload = frame_and_payload(&whole);
            let received =
                ChunkPut::decode_received_pieces(&[Bytes::from(payload.clone())], payload.len())
                    .expect("decode");
            assert_eq!(
                (
                    received.digest,
                    received.size,
                    received.data_pieces().concat()
                ),
                (put.digest, put.size, data)
            );
        }
    }

    #[test]
    fn every_chunk_frame_decodes_received_as_it_was_sent() {
        let data = vec![5u8; 1000];
        let digest = Digest::of(&data);
        let mut framed = ChunkFrame::data_frame_head(digest, 77, data.len()).expect("head");
        framed.extend_from_slice(&data);
        let whole = ChunkFrame::Data {
            digest,
            size: 77,
            data: data.clone(),
        };
        assert_eq!(
            framed,
            crate::encode_frame(&whole, MAX_FRAME_BYTES).expect("whole")
        );
        match ChunkFrame::decode_received(frame_and_payload(&framed)).expect("data") {
            ReceivedChunkFrame::Data(chunk) => {
                assert_eq!(
                    (chunk.digest, chunk.size, chunk.data()),
                    (digest, 77, &data[..])
                );
            }
            other => panic!("expected data, got {other:?}"),
        }
        let unavailable = ChunkFrame::Unavailable {
            digest,
            reason: "quarantined".into(),
        };
        let refused = ChunkFrame::Refused {
            message: "no grant".into(),
        };
        let payload = |frame: &ChunkFrame| postcard::to_stdvec(frame).expect("encode");
        assert_eq!(
            ChunkFrame::decode_received(payload(&unavailable)).expect("unavailable"),
            ReceivedChunkFrame::Unavailable {
                digest,
                reason: "quarantined".into()
            }
        );
        assert_eq!(
            ChunkFrame::decode_received(payload(&refused)).expect("refused"),
            ReceivedChunkFrame::Refused {
                message: "no grant".into()
            }
        );
    }

    #[test]
    fn a_received_chunk_with_garbage_or_trailing_bytes_is_malformed() {
        let put = ChunkPut {
            digest: Digest::of(b"x"),
            size: 1,
            data: b"x".to_vec(),
        };
        let mut payload = postcard::to_stdvec(&put).expect("encode");
        payload.push(0);
        let len = payload.len();
        let err =
            ChunkPut::decode_received_pieces(&[Bytes::from(payload)], len).expect_err("trailing");
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
        // A data length past the end of the payload.
        let mut short = postcard::to_stdvec(&put).expect("encode");
        short.pop();
        let len = short.len();
        assert!(ChunkPut::decode_received_pieces(&[Bytes::from(short)], len).is_err());
        assert!(ChunkFrame::decode_received(vec![9, 9, 9]).is_err());
    }
}
