//! Writes: an upload session (which chunks are missing, the manifest committed with
//! every chunk re-checked in the same transaction) and the put streams that carry the
//! chunks, verified, into packs that are fsynced and indexed while the stream goes on.

use std::collections::HashSet;
use std::time::Duration;

use gantry_cas::{EntryKind, Manifest, MAX_CHUNK, MAX_COMPRESSED_CHUNK, MAX_MANIFEST_BYTES};
use gantry_protocol::{
    ArtifactView, CacheView, Committed, Digest, Grant, PutReply, ReceivedChunkPieces, UnixMillis,
    UploadReply, UploadRequest, UploadTarget, MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::{FrameReader, FrameWriter, TransportError};
use tokio::sync::mpsc;

use crate::base::chunks::{stored_check_pieces, PackWriter, SyncedPack};
use crate::base::disk::OutOfSpace;
use crate::services::artifacts::frames::{read_ahead, read_ahead_chunk_puts};
use crate::services::artifacts::scope::JobScope;
use crate::services::artifacts::{
    lock, refuse, Artifacts, ChunkRefused, Peer, Session, SessionGuard, StreamError,
};
use crate::store::{ChunkRecord, CommitOutcome};

/// Most chunk bytes in one pack: one fsync per 32 MiB of upload.
const SYNC_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Longest time chunks of an upload stream wait to be made durable (their pack closed
/// and indexed): what a slow upload loses to a coordinator crash, and how long garbage
/// collection may wait for a batch.
const SYNC_INTERVAL: Duration = Duration::from_millis(500);

impl Artifacts {
    pub(super) async fn upload(
        &self,
        peer: &Peer,
        connection: u64,
        grant: &Grant,
        target: &UploadTarget,
        writer: &mut FrameWriter,
        reader: FrameReader,
    ) -> Result<(), StreamError> {
        if let Err(low) = self.disk.check() {
            let e = StreamError::LowSpace(low);
            return Err(refuse(writer, e, |message| UploadReply::Refused { message }).await);
        }
        let scope = match self.check_writable(peer, grant, target) {
            Ok(scope) => scope,
            Err(e) => {
                return Err(refuse(writer, e, |message| UploadReply::Refused { message }).await)
            }
        };
        let id = {
            let mut sessions = lock(&self.sessions);
            sessions.next += 1;
            let id = sessions.next;
            sessions.open.insert(
                id,
                Session {
                    connection,
                    peer: peer.clone(),
                    pinned: HashSet::new(),
                },
            );
            id
        };
        let _guard = SessionGuard {
            artifacts: self,
            id,
        };
        writer.send(&UploadReply::Opened { session: id }).await?;
        let mut requests = read_ahead::<UploadRequest>(reader);
        loop {
            let request = match requests.recv().await {
                Some(Ok(Some(r))) => r,
                Some(Ok(None)) | None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
            };
            let reply = match request {
                UploadRequest::Have(digests) => {
                    if digests.len() > MAX_DIGESTS_PER_FRAME {
                        UploadReply::Refused {
                            message: StreamError::TooManyDigests.to_string(),
                        }
                    } else {
                        let missing = self.store.missing_chunks(&digests)?;
                        let absent: HashSet<&Digest> = missing.iter().collect();
                        let present: Vec<Digest> = digests
                            .iter()
                            .filter(|d| !absent.contains(d))
                            .copied()
                            .collect();
                        self.metrics.chunks_deduplicated(present.len() as u64);
                        if let Some(s) = lock(&self.sessions).open.get_mut(&id) {
                            s.pinned.extend(present);
                        }
                        UploadReply::Missing(missing)
                    }
                }
                UploadRequest::Commit { manifest_bytes } => {
                    match receive_manifest(&mut requests, manifest_bytes).await {
                        Ok(bytes) => self.commit(&scope, target, &bytes)?,
                        Err(e) => UploadReply::Refused {
                            message: e.to_string(),
                        },
                    }
                }
                UploadRequest::ManifestPiece(_) => UploadReply::Refused {
                    message: "a manifest piece arrived outside a commit".into(),
                },
            };
            let last = matches!(reply, UploadReply::Refused { .. });
            writer.send(&reply).await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Validates a manifest and stores the artifact or cache it describes.
    pub(super) fn commit(
        &self,
        scope: &JobScope,
        target: &UploadTarget,
        bytes: &[u8],
    ) -> Result<UploadReply, StreamError> {
        let manifest = match Manifest::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                return Ok(UploadReply::Refused {
                    message: format!("the manifest is refused: {e}"),
                })
            }
        };
        let digest = Digest::of(bytes);
        let mut chunks = Vec::new();
        let (mut files, mut total) = (0u64, 0u64);
        for entry in &manifest.entries {
            if let EntryKind::File {
                size, chunks: c, ..
            } = &entry.kind
            {
                files += 1;
                total += size;
                chunks.extend(c.iter().map(|c| c.digest));
            }
        }
        let now = UnixMillis::now();
        let spec_name = scope.spec().map(|s| s.name.clone()).unwrap_or_default();
        let (outcome, committed) = match target {
            UploadTarget::Artifact {
                name,
                expire_in_secs,
            } => {
                let expire = if *expire_in_secs == 0 {
                    gantry_pipeline::DEFAULT_EXPIRE_IN_SECS
                } else {
                    (*expire_in_secs).min(gantry_pipeline::MAX_EXPIRE_IN_SECS)
                };
                let view = ArtifactView {
                    run: scope.run.run,
                    job: scope.job.job,
                    job_name: spec_name,
                    name: name.clone(),
                    manifest: digest,
                    bytes: total,
                    files,
                    chunks: chunks.len() as u64,
                    created_at: now,
                    expires_at: now.plus_secs(expire),
                };
                let outcome = self.store.commit_artifact(&view, bytes, &chunks)?;
                (outcome, Committed::Artifact(view))
            }
            UploadTarget::Cache { key } => {
                let view = CacheView {
                    pipeline: scope.pipeline.name.clone(),
                    branch: scope.run.git_ref.clone(),
                    key: key.clone(),
                    manifest: digest,
                    bytes: total,
                    files,
                    created_at: now,
                    last_used: now,
                    job: scope.job.job,
                };
                let outcome = self.store.commit_cache(&view, bytes, &chunks)?;
                (outcome, Committed::Cache(view))
            }
        };
        Ok(match outcome {
            CommitOutcome::Stored => {
                tracing::info!(job = %scope.job.job, manifest = %digest, files, bytes = total, "stored {}", match &committed { Committed::Artifact(a) => format!("artifact {}", a.name), Committed::Cache(c) => format!("cache {}", c.key) });
                UploadReply::Committed(committed)
            }
            CommitOutcome::Missing(missing) => UploadReply::Missing(missing),
            CommitOutcome::CacheExists => UploadReply::CacheExists {
                key: match target {
                    UploadTarget::Cache { key } => key.clone(),
                    UploadTarget::Artifact { name, .. } => name.clone(),
                },
            },
        })
    }

    pub(super) async fn put_chunks(
        &self,
        peer: &Peer,
        connection: u64,
        session: u64,
        writer: &mut FrameWriter,
        reader: FrameReader,
    ) -> Result<(), StreamError> {
        if let Err(e) = self.check_put(peer, connection, session) {
            return Err(refuse(writer, e, |message| PutReply::Refused { message }).await);
        }
        if let Err(low) = self.disk.check() {
            let e = StreamError::LowSpace(low);
            return Err(refuse(writer, e, |message| PutReply::Refused { message }).await);
        }
        let mut puts = read_ahead_chunk_puts(reader);
        // Each batch's pack is fsynced, renamed into place and indexed while the stream
        // goes on receiving the next ones. Publishing a pack waits for its fsync and then
        // for the packs directory's (100-130 ms each in a trace of the benchmark on a
        // slow disk, four streams at once, every ~0.43 s per stream), and the stream used
        // to wait for that before reading on, holding its sender through QUIC's flow
        // control. On that disk the upload stayed disk-bound all the same (a few percent
        // faster at best). At most two batches wait behind the one being received (one
        // publishing, one queued), so what a crash can lose stays bounded.
        let (to_publish, mut publishing) = mpsc::channel::<Syncing>(1);
        let publisher = async {
            while let Some(syncing) = publishing.recv().await {
                self.publish(session, syncing).await?;
            }
            Ok::<(), StreamError>(())
        };
        let receiver = self.receive_batches(peer, &mut puts, writer, to_publish);
        let (stored_chunks, stored_bytes) = match tokio::try_join!(receiver, publisher) {
            Ok((stored, ())) => stored,
            // A full disk is the uploader's to hear about, not a stream that just ends.
            Err(e) => match self.out_of_space(&e) {
                Some(full) => {
                    tracing::warn!(?peer, "refusing an upload: {full}");
                    let e = StreamError::OutOfSpace(full);
                    return Err(refuse(writer, e, |message| PutReply::Refused { message }).await);
                }
                // A chunk that could not be written otherwise, refused as it always was.
                None if matches!(e, StreamError::Chunk(ChunkRefused::Write { .. })) => {
                    self.metrics.chunk_refused();
                    tracing::warn!(?peer, "refusing an upload: {e}");
                    return Err(refuse(writer, e, |message| PutReply::Refused { message }).await);
                }
                None => return Err(e),
            },
        };
        self.metrics.artifact_bytes_received(stored_bytes);
        writer
            .send(&PutReply::Stored {
                chunks: stored_chunks,
                bytes: stored_bytes,
            })
            .await?;
        Ok(())
    }

    /// A put stream's chunks, verified and appended to packs of up to
    /// [`SYNC_BATCH_BYTES`] (or [`SYNC_INTERVAL`] of arrivals); each pack, once its fsync
    /// has started, goes to `to_publish`. Returns the chunks and bytes stored. A bad
    /// chunk refuses the stream (told to the uploader through `writer`).
    pub(super) async fn receive_batches(
        &self,
        peer: &Peer,
        puts: &mut mpsc::Receiver<Result<Option<ReceivedChunkPieces>, TransportError>>,
        writer: &mut FrameWriter,
        to_publish: mpsc::Sender<Syncing>,
    ) -> Result<(u64, u64), StreamError> {
        let (mut stored_chunks, mut stored_bytes) = (0u64, 0u64);
        let mut done = false;
        while !done {
            let first = match puts.recv().await {
                Some(Ok(Some(put))) => put,
                Some(Ok(None)) | None => break,
                Some(Err(e)) => return Err(e.into()),
            };
            // A batch (one pack) ends at SYNC_BATCH_BYTES, after SYNC_INTERVAL (so a slow
            // upload is made durable at least that often), or with the stream.
            let batch_ends = tokio::time::Instant::now() + SYNC_INTERVAL;
            let mut pack = Some(self.chunks.new_pack().map_err(StreamError::PackStart)?);
            let mut rows: Vec<(Digest, ChunkRecord)> = Vec::new();
            let mut pack_bytes = 0usize;
            let mut work = vec![first];
            loop {
                // Take whatever else already arrived, up to ~4 MiB per blocking call.
                let mut work_bytes: usize = work.iter().map(ReceivedChunkPieces::data_len).sum();
                while work_bytes < 4 * 1024 * 1024 {
                    match puts.try_recv() {
                        Ok(Ok(Some(put))) => {
                            work_bytes += put.data_len();
                            work.push(put);
                        }
                        Ok(Ok(None)) => {
                            done = true;
                            break;
                        }
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => break,
                    }
                }
                let batch = std::mem::take(&mut work);
                let packer = pack.take().ok_or(StreamError::NoPack)?;
                let (packer, written) =
                    tokio::task::spawn_blocking(move || verify_and_append(packer, batch)).await?;
                pack = Some(packer);
                match written {
                    Ok(new_rows) => {
                        for (digest, record) in new_rows {
                            pack_bytes += record.stored_bytes as usize;
                            stored_chunks += 1;
                            stored_bytes += u64::from(record.stored_bytes);
                            rows.push((digest, record));
                        }
                    }
                    Err(refused @ ChunkRefused::Write { .. }) => {
                        // Told by `put_chunks`, which names a full disk as such.
                        return Err(StreamError::Chunk(refused));
                    }
                    Err(refused) => {
                        self.metrics.chunk_refused();
                        tracing::warn!(?peer, "refusing an upload: {refused}");
                        let e = StreamError::Chunk(refused);
                        return Err(
                            refuse(writer, e, |message| PutReply::Refused { message }).await
                        );
                    }
                }
                if done || pack_bytes >= SYNC_BATCH_BYTES {
                    break;
                }
                tokio::select! {
                    put = puts.recv() => match put {
                        Some(Ok(Some(put))) => work.push(put),
                        Some(Ok(None)) | None => { done = true; break; }
                        Some(Err(e)) => return Err(e.into()),
                    },
                    () = tokio::time::sleep_until(batch_ends) => break,
                }
            }
            let pack = pack.ok_or(StreamError::NoPack)?;
            let syncing = tokio::task::spawn_blocking(move || (pack.sync(), rows));
            // A publisher that stopped has failed; its error is the stream's.
            if to_publish.send(syncing).await.is_err() {
                break;
            }
        }
        Ok((stored_chunks, stored_bytes))
    }

    /// A failed write into the chunk store that ran out of space, named as such.
    fn out_of_space(&self, e: &StreamError) -> Option<OutOfSpace> {
        let (what, source) = match e {
            StreamError::PackStart(source) => ("starting a pack of chunks", source),
            StreamError::PackSync(source) => ("syncing a pack of chunks", source),
            StreamError::PackPublish(source) => ("storing a pack of chunks", source),
            StreamError::Chunk(ChunkRefused::Write { source, .. }) => ("writing a chunk", source),
            _ => return None,
        };
        self.disk.out_of_space(what, source)
    }

    /// Waits for a pack's fsync, then renames it into place and indexes its chunks, pinned
    /// to the session. From the rename to the index commit it holds the collection lock
    /// shared, so garbage collection never sees the pack unindexed.
    pub(super) async fn publish(&self, session: u64, syncing: Syncing) -> Result<(), StreamError> {
        let (synced, rows) = syncing.await?;
        let pack = synced.map_err(StreamError::PackSync)?;
        let _publishing = self.collecting.read().await;
        tokio::task::spawn_blocking(move || pack.publish())
            .await?
            .map_err(StreamError::PackPublish)?;
        self.store.add_chunks(&rows)?;
        if let Some(s) = lock(&self.sessions).open.get_mut(&session) {
            s.pinned.extend(rows.iter().map(|(d, _)| *d));
        }
        Ok(())
    }
}

/// Reads the manifest pieces of a commit: exactly `declared` bytes, at most
/// [`MAX_MANIFEST_BYTES`].
async fn receive_manifest(
    requests: &mut mpsc::Receiver<Result<Option<UploadRequest>, TransportError>>,
    declared: u64,
) -> Result<Vec<u8>, StreamError> {
    if declared == 0 || declared > MAX_MANIFEST_BYTES as u64 {
        return Err(StreamError::ManifestSize(declared));
    }
    let mut bytes = Vec::with_capacity(declared.min(16 * 1024 * 1024) as usize);
    while (bytes.len() as u64) < declared {
        match requests.recv().await {
            Some(Ok(Some(UploadRequest::ManifestPiece(piece)))) => {
                if bytes.len() as u64 + piece.len() as u64 > declared {
                    return Err(StreamError::ManifestOverflow(declared));
                }
                bytes.extend_from_slice(&piece);
            }
            Some(Ok(Some(other))) => return Err(StreamError::NotAPiece(format!("{other:?}"))),
            Some(Ok(None)) | None => return Err(StreamError::ManifestCut),
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(bytes)
}

/// A pack being fsynced on a blocking thread, with the index rows of its chunks.
type Syncing = tokio::task::JoinHandle<(std::io::Result<SyncedPack>, Vec<(Digest, ChunkRecord)>)>;

/// Checks each uploaded chunk (sizes within bounds, decompresses within its size, hashes
/// to its digest) and appends it to the pack. The first bad chunk refuses the batch.
/// Returns the pack back (it moves in and out of the blocking thread).
fn verify_and_append(
    mut pack: PackWriter,
    puts: Vec<ReceivedChunkPieces>,
) -> (PackWriter, Result<Vec<(Digest, ChunkRecord)>, ChunkRefused>) {
    let now = UnixMillis::now();
    let mut rows = Vec::with_capacity(puts.len());
    for put in puts {
        let data = put.data_pieces();
        if put.size == 0 || put.size as usize > MAX_CHUNK || put.data_len() > MAX_COMPRESSED_CHUNK {
            let refused = ChunkRefused::Size {
                digest: put.digest,
                size: put.size,
                compressed: put.data_len(),
            };
            return (pack, Err(refused));
        }
        if let Err(e) = gantry_cas::verify_chunk_pieces(data, put.size as usize, &put.digest) {
            let refused = ChunkRefused::Corrupt {
                digest: put.digest,
                detail: e.to_string(),
            };
            return (pack, Err(refused));
        }
        let location = match pack.append_pieces(data) {
            Ok(l) => l,
            Err(source) => {
                let refused = ChunkRefused::Write {
                    digest: put.digest,
                    source,
                };
                return (pack, Err(refused));
            }
        };
        rows.push((
            put.digest,
            ChunkRecord {
                size: put.size,
                stored_bytes: location.len,
                pack: location.pack,
                offset: location.offset,
                written_at: now,
                check: Some(stored_check_pieces(data)),
            },
        ));
    }
    (pack, Ok(rows))
}
