//! Uploads: chunk a tree, ask which chunks the coordinator lacks, send only those over
//! several streams, then commit the manifest.
//!
//! One pass over the files: a blocking thread walks and chunks them (through
//! `gantry_cas::build_manifest_for`), samples each chunk to decide whether compressing
//! it pays, and hands it over a bounded channel; the async side asks about them in
//! batches and gives the missing ones to the put streams in turn. A put stream
//! compresses a chunk worth it on a blocking thread and sends any other as a zstd frame
//! of raw blocks made of slices of the chunk itself. Memory stays bounded by the channel
//! and batch sizes (a few tens of MiB at most), whatever the size of the tree.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_cas::{EntryKind, Manifest};
use gantry_protocol::{
    ChunkPut, Committed, Digest, Grant, PutReply, StreamOpen, UploadReply, UploadRequest,
    UploadTarget, MANIFEST_PIECE_BYTES, MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::{Bytes, Connection, FrameReader, FrameWriter};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::{RateLimit, TransferError, TransferOptions};

/// Chunks asked about in one `Have` (fewer when the files pause).
const HAVE_BATCH: usize = 256;
/// Chunks waiting between the chunking thread and the async side.
const CHUNKED_AHEAD: usize = 64;
/// Chunks queued per put stream.
const QUEUED_PER_STREAM: usize = 8;
/// Commits retried when the coordinator reports chunks gone since it said it had them.
const MAX_COMMITS: usize = 4;

/// What one upload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadFigures {
    pub files: u64,
    pub bytes: u64,
    /// Distinct chunks in the tree.
    pub chunks: u64,
    /// Chunks sent (the rest the coordinator had already).
    pub chunks_sent: u64,
    /// Compressed bytes sent.
    pub bytes_sent: u64,
    pub time: Duration,
}

/// Uploads `paths` (relative to `root`; directories whole) as `target`. Returns what was
/// committed, or `None` for a cache whose key exists already (caches never change).
pub async fn upload(
    conn: &Connection,
    grant: &Grant,
    target: &UploadTarget,
    root: &Path,
    paths: Vec<PathBuf>,
    options: &TransferOptions,
) -> Result<(Option<Committed>, UploadFigures), TransferError> {
    let started = Instant::now();
    let open = StreamOpen::Upload {
        grant: grant.clone(),
        target: target.clone(),
    };
    let (mut session, mut replies) = conn.open_stream_with(&open).await?;
    let id = match replies.recv::<UploadReply>().await? {
        Some(UploadReply::Opened { session }) => session,
        Some(UploadReply::Refused { message }) => return Err(TransferError::Refused(message)),
        other => {
            return Err(TransferError::Protocol(format!(
                "expected an open upload session, got {other:?}"
            )))
        }
    };

    // The chunking thread. It also samples each chunk to decide whether compressing it
    // pays (2.5 µs a chunk): on a blocking thread per chunk, as the compression itself
    // runs, the handoff cost more than the sample.
    let (chunk_tx, mut chunked) = mpsc::channel::<(Digest, Chunk)>(CHUNKED_AHEAD);
    let producer = {
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || {
            gantry_cas::build_manifest_for(&root, &paths, |digest, data| {
                chunk_tx
                    .blocking_send((digest, Chunk::sampled(data.clone())))
                    .map_err(|_| gantry_cas::CasError::Io {
                        context: "handing a chunk to the upload".into(),
                        source: std::io::Error::other("the upload stopped"),
                    })
            })
        })
    };

    let mut puts = PutStreams::new(conn.clone(), id, options);
    let mut figures = UploadFigures::default();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut batch: Vec<(Digest, Chunk)> = Vec::new();
    let mut producing = true;
    while producing || !batch.is_empty() {
        if producing {
            match chunked.recv().await {
                Some((digest, data)) => {
                    if seen.insert(digest) {
                        batch.push((digest, data));
                    }
                    // Take what else is ready without waiting.
                    while batch.len() < HAVE_BATCH {
                        match chunked.try_recv() {
                            Ok((digest, data)) => {
                                if seen.insert(digest) {
                                    batch.push((digest, data));
                                }
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                producing = false;
                                break;
                            }
                        }
                    }
                }
                None => producing = false,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
        let missing = ask_missing(&mut session, &mut replies, digests).await?;
        let missing: HashSet<Digest> = missing.into_iter().collect();
        for (digest, data) in batch.drain(..) {
            if missing.contains(&digest) {
                puts.send(digest, data).await?;
            }
        }
    }
    let manifest = producer
        .await
        .map_err(|e| TransferError::Corrupt(format!("chunking stopped: {e}")))??;
    let sent = puts.finish().await?;
    figures.chunks_sent += sent.0;
    figures.bytes_sent += sent.1;
    for entry in &manifest.entries {
        if let EntryKind::File { size, .. } = &entry.kind {
            figures.files += 1;
            figures.bytes += size;
        }
    }
    figures.chunks = seen.len() as u64;

    let encoded = manifest.encode();
    for _ in 0..MAX_COMMITS {
        session
            .send(&UploadRequest::Commit {
                manifest_bytes: encoded.len() as u64,
            })
            .await?;
        for piece in encoded.chunks(MANIFEST_PIECE_BYTES) {
            session
                .send(&UploadRequest::ManifestPiece(piece.to_vec()))
                .await?;
        }
        match replies.recv::<UploadReply>().await? {
            Some(UploadReply::Committed(committed)) => {
                session.finish();
                figures.time = started.elapsed();
                return Ok((Some(committed), figures));
            }
            Some(UploadReply::CacheExists { .. }) => {
                session.finish();
                figures.time = started.elapsed();
                return Ok((None, figures));
            }
            Some(UploadReply::Missing(missing)) => {
                // Collected between our question and the commit: send them and try again.
                tracing::info!(
                    chunks = missing.len(),
                    "the coordinator lost chunks before the commit; sending them again"
                );
                let mut again = PutStreams::new(conn.clone(), id, options);
                for (digest, data) in read_chunks(root, &manifest, &missing)? {
                    again
                        .send(digest, Chunk::sampled(Bytes::from(data)))
                        .await?;
                }
                let sent = again.finish().await?;
                figures.chunks_sent += sent.0;
                figures.bytes_sent += sent.1;
            }
            Some(UploadReply::Refused { message }) => return Err(TransferError::Refused(message)),
            other => {
                return Err(TransferError::Protocol(format!(
                    "expected a commit answer, got {other:?}"
                )))
            }
        }
    }
    Err(TransferError::Corrupt(format!(
        "the coordinator still lacked chunks after {MAX_COMMITS} commits"
    )))
}

/// Asks which of `digests` the coordinator lacks.
async fn ask_missing(
    session: &mut FrameWriter,
    replies: &mut FrameReader,
    digests: Vec<Digest>,
) -> Result<Vec<Digest>, TransferError> {
    let mut missing = Vec::new();
    for part in digests.chunks(MAX_DIGESTS_PER_FRAME) {
        session.send(&UploadRequest::Have(part.to_vec())).await?;
        match replies.recv::<UploadReply>().await? {
            Some(UploadReply::Missing(m)) => missing.extend(m),
            Some(UploadReply::Refused { message }) => return Err(TransferError::Refused(message)),
            other => {
                return Err(TransferError::Protocol(format!(
                    "expected the missing chunks, got {other:?}"
                )))
            }
        }
    }
    Ok(missing)
}

/// Reads the chunks `wanted` back from the files of `manifest` under `root`, checking
/// each still hashes to its digest (a file changed since it was chunked is an error).
fn read_chunks(
    root: &Path,
    manifest: &Manifest,
    wanted: &[Digest],
) -> Result<Vec<(Digest, Vec<u8>)>, TransferError> {
    let wanted: HashSet<&Digest> = wanted.iter().collect();
    let mut found: HashMap<Digest, Vec<u8>> = HashMap::new();
    for entry in &manifest.entries {
        let EntryKind::File { chunks, .. } = &entry.kind else {
            continue;
        };
        if !chunks.iter().any(|c| wanted.contains(&c.digest)) {
            continue;
        }
        let path = root.join(&entry.path);
        let file = std::fs::File::open(&path)
            .map_err(TransferError::io(format!("reopening {}", path.display())))?;
        let mut offset = 0u64;
        for c in chunks {
            if wanted.contains(&c.digest) && !found.contains_key(&c.digest) {
                let mut data = vec![0u8; c.size as usize];
                file.read_exact_at(&mut data, offset)
                    .map_err(TransferError::io(format!("reading {}", path.display())))?;
                if Digest::of(&data) != c.digest {
                    return Err(TransferError::Corrupt(format!(
                        "{} changed while it was being uploaded",
                        path.display()
                    )));
                }
                found.insert(c.digest, data);
            }
            offset += u64::from(c.size);
        }
    }
    Ok(found.into_iter().collect())
}

/// A chunk on its way to a put stream, with whether compressing it pays.
struct Chunk {
    /// Shares the chunker's window (no copy).
    data: Bytes,
    compress: bool,
}

impl Chunk {
    /// Takes the sample that decides compression (on the caller's thread).
    fn sampled(data: Bytes) -> Self {
        Self {
            compress: gantry_cas::worth_compressing(&data),
            data,
        }
    }
}

/// The put streams of one session, fed in turn; opened on first use.
struct PutStreams {
    conn: Connection,
    session: u64,
    streams: usize,
    limit: Option<Arc<RateLimit>>,
    queues: Vec<mpsc::Sender<(Digest, Chunk)>>,
    tasks: JoinSet<Result<(u64, u64), TransferError>>,
    next: usize,
}

impl PutStreams {
    fn new(conn: Connection, session: u64, options: &TransferOptions) -> Self {
        Self {
            conn,
            session,
            streams: options.streams.clamp(1, 16),
            limit: options.limit.clone(),
            queues: Vec::new(),
            tasks: JoinSet::new(),
            next: 0,
        }
    }

    async fn send(&mut self, digest: Digest, chunk: Chunk) -> Result<(), TransferError> {
        if self.queues.len() < self.streams {
            let (tx, rx) = mpsc::channel(QUEUED_PER_STREAM);
            let (conn, session, limit) = (self.conn.clone(), self.session, self.limit.clone());
            self.tasks
                .spawn(async move { put_stream(conn, session, rx, limit).await });
            self.queues.push(tx);
        }
        let queue = &self.queues[self.next % self.queues.len()];
        self.next += 1;
        if queue.send((digest, chunk)).await.is_err() {
            // The stream's task ended early: its error says why.
            return Err(self.first_error().await);
        }
        Ok(())
    }

    async fn first_error(&mut self) -> TransferError {
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Err(e)) => return e,
                Err(e) => return TransferError::Corrupt(format!("an upload stream stopped: {e}")),
                Ok(Ok(_)) => {}
            }
        }
        TransferError::Protocol("an upload stream ended early".into())
    }

    /// Closes the queues and waits until every stream's chunks are durable; returns the
    /// chunks and compressed bytes sent.
    async fn finish(mut self) -> Result<(u64, u64), TransferError> {
        self.queues.clear();
        let (mut chunks, mut bytes) = (0, 0);
        while let Some(joined) = self.tasks.join_next().await {
            let (c, b) = joined
                .map_err(|e| TransferError::Corrupt(format!("an upload stream stopped: {e}")))??;
            chunks += c;
            bytes += b;
        }
        Ok((chunks, bytes))
    }
}

/// How long a put stream whose sending failed waits for the coordinator's refusal.
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

/// A put stream's send failed: the coordinator may have refused it mid-stream (a bad
/// chunk, a full disk) and stopped reading, so its refusal, when it sent one, is the
/// reason; else the send's own error.
async fn refusal_or(reader: &mut FrameReader, e: TransferError) -> TransferError {
    match tokio::time::timeout(REFUSAL_WAIT, reader.recv::<PutReply>()).await {
        Ok(Ok(Some(PutReply::Refused { message }))) => TransferError::Refused(message),
        _ => e,
    }
}

/// One put stream: compresses and sends what its queue brings, then waits for the
/// coordinator to say the chunks are durable.
async fn put_stream(
    conn: Connection,
    session: u64,
    mut queue: mpsc::Receiver<(Digest, Chunk)>,
    limit: Option<Arc<RateLimit>>,
) -> Result<(u64, u64), TransferError> {
    let open = StreamOpen::PutChunks { session };
    let (mut writer, mut reader) = conn.open_stream_with(&open).await?;
    let (mut chunks, mut bytes) = (0u64, 0u64);
    while let Some((digest, chunk)) = queue.recv().await {
        let size = chunk.data.len() as u32;
        // The frame goes to quinn in pieces: its head, then the compressed frame or the
        // raw-block headers between slices of the chunk itself, never copied into one
        // frame (two memcpys of every byte uploaded, when it was).
        let mut pieces = vec![Bytes::new()];
        if chunk.compress {
            let data = chunk.data;
            let frame = tokio::task::spawn_blocking(move || gantry_cas::zstd_frame(&data))
                .await
                .map_err(|e| TransferError::Corrupt(format!("compression stopped: {e}")))?;
            pieces.push(Bytes::from(frame));
        } else {
            let layout = gantry_cas::RawFrameLayout::of(chunk.data.len());
            let data = chunk.data;
            for (header, range) in layout.parts() {
                pieces.push(Bytes::copy_from_slice(header));
                pieces.push(data.slice(range.clone()));
            }
        }
        let data_len: usize = pieces.iter().map(Bytes::len).sum();
        let head = ChunkPut::frame_head(digest, size, data_len)
            .map_err(gantry_transport::TransportError::from)?;
        pieces[0] = Bytes::from(head);
        if let Some(limit) = &limit {
            limit.take(data_len).await;
        }
        chunks += 1;
        bytes += data_len as u64;
        if let Err(e) = writer.send_pieces(&mut pieces).await {
            return Err(refusal_or(&mut reader, e.into()).await);
        }
    }
    writer.finish();
    match reader.recv::<PutReply>().await? {
        Some(PutReply::Stored { .. }) => Ok((chunks, bytes)),
        Some(PutReply::Refused { message }) => Err(TransferError::Refused(message)),
        None => Err(TransferError::Protocol(
            "the coordinator closed an upload stream without saying the chunks were stored".into(),
        )),
    }
}
