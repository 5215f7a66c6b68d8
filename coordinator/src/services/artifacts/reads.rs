//! Reads: resolving a job's grant to the artifacts and caches it may restore, and
//! serving manifests and chunks. Chunks are read ahead of the sender in spans of
//! neighbours, checked before they are sent, and a corrupt one is quarantined and its
//! pack scrubbed, never served.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use gantry_cas::{Bytes, EntryKind, Manifest};
use gantry_protocol::{
    CacheHit, CacheView, ChunkFrame, ChunkWants, Digest, Grant, ManifestFrame, ResolveReply,
    ResolveRequest, StreamOpen, UnixMillis, MANIFEST_PIECE_BYTES, MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::{FrameReader, FrameWriter, TransportError};
use tokio::sync::mpsc;

use crate::base::authz::Request;
use crate::base::chunks::{ChunkReadError, ChunkStore, Location};
use crate::services::artifacts::frames::read_ahead;
use crate::services::artifacts::{
    lock, refuse, Artifacts, Peer, StreamError, MAX_CACHED_MANIFESTS,
};
use crate::store::{ChunkRecord, Store};

impl Artifacts {
    pub(super) fn resolve(
        &self,
        peer: &Peer,
        request: ResolveRequest,
    ) -> Result<ResolveReply, StreamError> {
        match request {
            ResolveRequest::JobArtifacts { job, attempt } => {
                let scope = self
                    .scope(
                        Request::StreamResolveJobArtifacts,
                        peer,
                        &Grant::Job { job, attempt },
                    )?
                    .ok_or(StreamError::AdminResolve)?;
                let spec = scope.spec()?;
                let stored = self.store.artifacts_of(scope.run.run)?;
                let chosen = match &spec.download {
                    None => stored
                        .into_iter()
                        .filter(|a| spec.needs.contains(&a.job_name))
                        .collect(),
                    Some(names) => {
                        let mut chosen = Vec::new();
                        for name in names {
                            let found =
                                stored.iter().find(|a| &a.name == name).ok_or_else(|| {
                                    StreamError::NeverUploaded {
                                        name: name.clone(),
                                        run: scope.run.run,
                                    }
                                })?;
                            chosen.push(found.clone());
                        }
                        chosen
                    }
                };
                Ok(ResolveReply::Artifacts(chosen))
            }
            ResolveRequest::Cache {
                job,
                attempt,
                key,
                restore_keys,
            } => {
                let scope = self
                    .scope(
                        Request::StreamResolveCache,
                        peer,
                        &Grant::Job { job, attempt },
                    )?
                    .ok_or(StreamError::AdminCache)?;
                if scope.spec().ok().and_then(|s| s.caches.first()).is_none() {
                    return Err(StreamError::NoCacheDeclared(job));
                }
                let caches = self.store.caches()?;
                let hit = find_cache(
                    &caches,
                    &scope.pipeline.name,
                    &self.cache_scopes(&scope.run),
                    &key,
                    &restore_keys,
                );
                if let Some(hit) = &hit {
                    if let Err(e) = self.store.touch_cache(&hit.cache, UnixMillis::now()) {
                        tracing::warn!("cannot record a cache's use: {e}");
                    }
                }
                Ok(ResolveReply::Cache(hit))
            }
            // Only admins may (the stream's dispatcher asked the table).
            ResolveRequest::Artifact { run, name } => {
                let found = self
                    .store
                    .artifacts_of(run)?
                    .into_iter()
                    .find(|a| a.name == name)
                    .ok_or(StreamError::NoArtifact { run, name })?;
                Ok(ResolveReply::Artifacts(vec![found]))
            }
        }
    }

    pub(super) async fn send_manifest(
        &self,
        peer: &Peer,
        grant: &Grant,
        manifest: &Digest,
        writer: &mut FrameWriter,
    ) -> Result<(), StreamError> {
        let row = Request::of_stream(&StreamOpen::GetManifest {
            grant: grant.clone(),
            manifest: *manifest,
        });
        let bytes = self
            .check_readable(row, peer, grant, manifest)
            .and_then(|()| {
                self.store
                    .manifest(manifest)?
                    .ok_or(StreamError::NoManifest(*manifest))
            });
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                return Err(refuse(writer, e, |message| ManifestFrame::Refused { message }).await)
            }
        };
        let send = async {
            writer
                .send(&ManifestFrame::Start {
                    bytes: bytes.len() as u64,
                })
                .await?;
            for piece in bytes.chunks(MANIFEST_PIECE_BYTES) {
                writer.send(&ManifestFrame::Piece(piece.to_vec())).await?;
            }
            Ok::<_, TransportError>(())
        };
        Ok(send.await?)
    }

    /// The chunks of a stored manifest with their sizes (cached).
    pub(super) fn chunk_sizes(
        &self,
        manifest: &Digest,
    ) -> Result<Arc<HashMap<Digest, u32>>, StreamError> {
        if let Some(sizes) = lock(&self.manifests).get(manifest) {
            return Ok(sizes.clone());
        }
        let bytes = self
            .store
            .manifest(manifest)?
            .ok_or(StreamError::NoManifest(*manifest))?;
        let decoded = Manifest::decode(&bytes).map_err(|e| StreamError::UnreadableManifest {
            manifest: *manifest,
            detail: e.to_string(),
        })?;
        let sizes: HashMap<Digest, u32> = decoded
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => Some(chunks),
                _ => None,
            })
            .flatten()
            .map(|c| (c.digest, c.size))
            .collect();
        let sizes = Arc::new(sizes);
        let mut cache = lock(&self.manifests);
        if cache.len() >= MAX_CACHED_MANIFESTS {
            cache.clear();
        }
        cache.insert(*manifest, sizes.clone());
        Ok(sizes)
    }

    pub(super) async fn send_chunks(
        &self,
        peer: &Peer,
        grant: &Grant,
        manifest: &Digest,
        writer: &mut FrameWriter,
        reader: FrameReader,
    ) -> Result<(), StreamError> {
        let sizes = match self
            .check_readable(
                Request::of_stream(&StreamOpen::FetchChunks {
                    grant: grant.clone(),
                    manifest: *manifest,
                }),
                peer,
                grant,
                manifest,
            )
            .and_then(|()| self.chunk_sizes(manifest))
        {
            Ok(s) => s,
            Err(e) => {
                return Err(refuse(writer, e, |message| ChunkFrame::Refused { message }).await)
            }
        };
        let mut wants = read_ahead::<ChunkWants>(reader);
        // Reading and verifying happen on a blocking thread ahead of the sender, so
        // disk, hashing and the network overlap.
        let (want_tx, want_rx) = std::sync::mpsc::channel::<(Digest, u32)>();
        let (ready_tx, mut ready) = mpsc::channel::<Served>(READY_CHUNKS);
        let (chunks, store) = (self.chunks.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || read_wants(&store, &chunks, &want_rx, &ready_tx));
        let (mut wanted, mut sent) = (0u64, 0u64);
        let mut wants_done = false;
        loop {
            if wants_done && sent == wanted {
                return Ok(());
            }
            tokio::select! {
                want = wants.recv(), if !wants_done => match want {
                    Some(Ok(Some(ChunkWants(digests)))) => {
                        if digests.len() > MAX_DIGESTS_PER_FRAME {
                            return Err(refuse(writer, StreamError::TooManyDigests, |message| ChunkFrame::Refused { message }).await);
                        }
                        for digest in digests {
                            let Some(&size) = sizes.get(&digest) else {
                                let e = StreamError::NotInManifest { digest, manifest: *manifest };
                                return Err(refuse(writer, e, |message| ChunkFrame::Refused { message }).await);
                            };
                            wanted += 1;
                            if want_tx.send((digest, size)).is_err() {
                                return Err(StreamError::ReaderStopped);
                            }
                        }
                    }
                    Some(Ok(None)) | None => wants_done = true,
                    Some(Err(e)) => return Err(e.into()),
                },
                served = ready.recv() => {
                    let Some(served) = served else {
                        return Err(StreamError::ReaderStopped);
                    };
                    match served {
                        Served::Data { digest, size, data } => {
                            if let Some(limit) = &self.send_limit {
                                limit.take(data.len()).await;
                            }
                            self.metrics.artifact_bytes_sent(data.len() as u64);
                            // The chunk's bytes go to quinn as they were read, behind
                            // the frame's head, rather than copied into an encoded frame.
                            gantry_transfer::send_chunk_data(writer, digest, size, data).await?;
                        }
                        Served::Unavailable { digest, reason } => {
                            tracing::error!(chunk = %digest, "not serving a chunk: {reason}");
                            self.metrics.chunk_unavailable();
                            // The index must stop saying it is stored, so the next upload
                            // of this content stores it again.
                            if let Err(e) = self.store.forget_chunks(std::slice::from_ref(&digest)) {
                                tracing::error!("cannot drop the unavailable chunk from the index: {e}");
                            }
                            writer
                                .send(&ChunkFrame::Unavailable { digest, reason })
                                .await?;
                        }
                    }
                    sent += 1;
                }
            }
        }
    }
}

/// The first matching cache: for each scope in order, `key` exactly, then each restore
/// key as a prefix (the newest match), as GitHub Actions does.
fn find_cache(
    caches: &[CacheView],
    pipeline: &str,
    scopes: &[String],
    key: &str,
    restore_keys: &[String],
) -> Option<CacheHit> {
    for scope in scopes {
        let here: Vec<&CacheView> = caches
            .iter()
            .filter(|c| c.pipeline == pipeline && &c.branch == scope)
            .collect();
        if let Some(c) = here.iter().find(|c| c.key == key) {
            return Some(CacheHit {
                cache: (*c).clone(),
                exact: true,
            });
        }
        for prefix in restore_keys {
            if let Some(c) = here
                .iter()
                .filter(|c| c.key.starts_with(prefix.as_str()))
                .max_by_key(|c| c.created_at)
            {
                return Some(CacheHit {
                    cache: (*c).clone(),
                    exact: false,
                });
            }
        }
    }
    None
}

/// Chunks read and checked ahead of a fetch stream's sender.
const READY_CHUNKS: usize = 64;

/// Most bytes one read of a pack serves. A download asks for chunks in the order they
/// were uploaded, and each of its streams for the chunks one upload stream stored one
/// after the other in its packs (both deal them out in turn over the same number of
/// streams), so consecutive wants are usually neighbours in one pack. Read one by one
/// (a synchronous direct read of ~80 KiB each, ~110 µs on the disk we measure, longer
/// while the downloading agent writes), the reads bounded the whole download.
const SPAN_BYTES: u64 = 4 * 1024 * 1024;

/// A chunk read for a fetch stream, or why it cannot be.
enum Served {
    Data {
        digest: Digest,
        size: u32,
        data: Bytes,
    },
    Unavailable {
        digest: Digest,
        reason: String,
    },
}

/// One wanted chunk and where the index says it is (`None`: not stored, or the index
/// could not be read; [`read_chunk`] says which).
struct Want {
    digest: Digest,
    size: u32,
    record: Option<ChunkRecord>,
}

/// A wanted chunk the index placed in a pack.
struct Placed {
    digest: Digest,
    size: u32,
    record: ChunkRecord,
}

/// The chunk reader of one fetch stream: reads the wanted chunks in order, each run
/// of neighbours in a pack with one read ([`SPAN_BYTES`]), checks each chunk and
/// hands it to the sender. Returns when either side goes away.
fn read_wants(
    store: &Store,
    chunks: &ChunkStore,
    wants: &std::sync::mpsc::Receiver<(Digest, u32)>,
    ready: &mpsc::Sender<Served>,
) {
    let lookup = |(digest, size): (Digest, u32)| Want {
        digest,
        size,
        record: store.chunk(&digest).ok().flatten(),
    };
    let mut next: Option<Want> = None;
    loop {
        let first = match next.take() {
            Some(want) => want,
            None => match wants.recv() {
                Ok(want) => lookup(want),
                Err(_) => return,
            },
        };
        let Some(record) = first.record else {
            let (digest, size) = (first.digest, first.size);
            let unplaced = served(digest, size, read_chunk(store, chunks, &digest, size));
            if ready.blocking_send(unplaced).is_err() {
                return;
            }
            continue;
        };
        // Extend the run with the wants already queued that lie right after it.
        let mut run = vec![Placed {
            digest: first.digest,
            size: first.size,
            record,
        }];
        let mut span = u64::from(record.stored_bytes);
        while span < SPAN_BYTES {
            let Ok(want) = wants.try_recv().map(lookup) else {
                break;
            };
            let last = run[run.len() - 1].record;
            match want.record {
                Some(record)
                    if record.pack == last.pack
                        && record.offset == last.offset + u64::from(last.stored_bytes) =>
                {
                    span += u64::from(record.stored_bytes);
                    run.push(Placed {
                        digest: want.digest,
                        size: want.size,
                        record,
                    });
                }
                _ => {
                    next = Some(want);
                    break;
                }
            }
        }
        for served in read_run(store, chunks, run) {
            if ready.blocking_send(served).is_err() {
                return;
            }
        }
    }
}

/// Reads a run of neighbouring chunks (one or more) with one read and checks each; a
/// run whose read fails (its pack compacted or gone meanwhile) is read chunk by chunk
/// with [`read_chunk`], which looks each one up again.
fn read_run(store: &Store, chunks: &ChunkStore, run: Vec<Placed>) -> Vec<Served> {
    let (first, last) = (run[0].record, run[run.len() - 1].record);
    let (pack, start) = (first.pack, first.offset);
    let len = last.offset + u64::from(last.stored_bytes) - start;
    let Ok(span) = chunks.read_raw(Location {
        pack,
        offset: start,
        len: len as u32,
    }) else {
        return run
            .into_iter()
            .map(|Placed { digest, size, .. }| {
                served(digest, size, read_chunk(store, chunks, &digest, size))
            })
            .collect();
    };
    let mut scrubbed = false;
    run.into_iter()
        .map(
            |Placed {
                 digest,
                 size,
                 record,
             }| {
                let at = (record.offset - start) as usize;
                let bytes = span.slice(at..at + record.stored_bytes as usize);
                let checked = chunks.checked(&digest, bytes, size, record.check);
                if matches!(checked, Err(ChunkReadError::Corrupt { .. })) && !scrubbed {
                    scrub_pack(store, chunks, pack);
                    scrubbed = true;
                }
                served(digest, size, checked)
            },
        )
        .collect()
}

fn served(digest: Digest, size: u32, read: Result<Bytes, ChunkReadError>) -> Served {
    match read {
        Ok(data) => Served::Data { digest, size, data },
        Err(e) => Served::Unavailable {
            digest,
            reason: e.to_string(),
        },
    }
}

/// Reads a stored chunk where the index says it is, verified. A chunk compacted into
/// another pack between the lookup and the read is looked up once more.
fn read_chunk(
    store: &Store,
    chunks: &ChunkStore,
    digest: &Digest,
    size: u32,
) -> Result<Bytes, ChunkReadError> {
    for _ in 0..2 {
        let record = store
            .chunk(digest)
            .map_err(|e| ChunkReadError::Io {
                digest: *digest,
                source: std::io::Error::other(e.to_string()),
            })?
            .ok_or(ChunkReadError::Missing(*digest))?;
        let location = Location {
            pack: record.pack,
            offset: record.offset,
            len: record.stored_bytes,
        };
        match chunks.read_verified(digest, location, size, record.check) {
            Err(ChunkReadError::Missing(_)) => {}
            Err(corrupt @ ChunkReadError::Corrupt { .. }) => {
                scrub_pack(store, chunks, record.pack);
                return Err(corrupt);
            }
            other => return other,
        }
    }
    Err(ChunkReadError::Missing(*digest))
}

/// After one corrupt chunk, checks every chunk of its pack (the damage may not stop at
/// one) and drops the bad ones from the index, so the next upload of their content
/// stores them again instead of being told they are there.
fn scrub_pack(store: &Store, chunks: &ChunkStore, pack: u64) {
    let rows = match store.pack_usage(&HashSet::from([pack])) {
        Ok((_, mut rows)) => rows.remove(&pack).unwrap_or_default(),
        Err(e) => {
            tracing::error!("cannot list the chunks of pack {pack:016x}: {e}");
            return;
        }
    };
    let bad: Vec<Digest> = rows
        .iter()
        .filter(|(digest, record)| {
            let location = Location {
                pack,
                offset: record.offset,
                len: record.stored_bytes,
            };
            // In full, not by checksum: a scrub follows damage already found, and is
            // rare.
            chunks
                .read_verified(digest, location, record.size, None)
                .is_err()
        })
        .map(|(digest, _)| *digest)
        .collect();
    tracing::error!(
        pack = format!("{pack:016x}"),
        bad = bad.len(),
        checked = rows.len(),
        "found corrupt chunks; dropping them from the index so uploads store them again"
    );
    if let Err(e) = store.forget_chunks(&bad) {
        tracing::error!("cannot drop corrupt chunks from the index: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::chunks::stored_check;
    use gantry_protocol::{JobId, RunId};

    /// Chunks of `sizes` bytes (distinct contents) written one after the other into one
    /// pack and indexed, as an upload stream stores them.
    fn stored_pack(
        store: &Store,
        chunks: &ChunkStore,
        seed: u8,
        sizes: &[usize],
    ) -> Vec<(Digest, u32, Vec<u8>)> {
        let mut pack = chunks.new_pack().expect("pack");
        let mut rows = Vec::new();
        let mut out = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..*size)
                .map(|b| (b as u8) ^ seed ^ (i as u8).wrapping_mul(31))
                .collect();
            let digest = Digest::of(&data);
            let stored = gantry_cas::compress(&data);
            let location = pack.append(&stored).expect("append");
            rows.push((
                digest,
                ChunkRecord {
                    size: data.len() as u32,
                    stored_bytes: location.len,
                    pack: location.pack,
                    offset: location.offset,
                    written_at: UnixMillis::now(),
                    check: Some(stored_check(&stored)),
                },
            ));
            out.push((digest, data.len() as u32, data));
        }
        pack.finish().expect("finish");
        store.add_chunks(&rows).expect("index");
        out
    }

    /// Everything `read_wants` hands the sender for `wants`, in order.
    fn serve(store: &Store, chunks: &ChunkStore, wants: &[(Digest, u32)]) -> Vec<Served> {
        let (want_tx, want_rx) = std::sync::mpsc::channel();
        for want in wants {
            want_tx.send(*want).expect("queue");
        }
        drop(want_tx);
        let (ready_tx, mut ready) = mpsc::channel(wants.len() + 1);
        read_wants(store, chunks, &want_rx, &ready_tx);
        drop(ready_tx);
        std::iter::from_fn(|| ready.try_recv().ok()).collect()
    }

    /// Neighbours in a pack are served from one read of their span, chunks elsewhere
    /// from reads of their own, each checked and in the order asked; a chunk damaged on
    /// disk inside a span is refused (its pack scrubbed from the index) while the rest of
    /// the span is still served.
    #[test]
    fn chunk_wants_are_served_in_order_from_spans_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("store");
        let chunks = ChunkStore::open(&dir.path().join("cas")).expect("chunks");
        let first = stored_pack(&store, &chunks, 1, &[70_000, 20_000, 130_000, 5]);
        let second = stored_pack(&store, &chunks, 2, &[40_000, 90_000]);
        // Both packs' chunks, interleaved so runs break, then a run of the first again.
        let order = [
            &first[0], &first[1], &first[2], &second[0], &second[1], &first[3], &first[0],
        ];
        let wants: Vec<(Digest, u32)> = order.iter().map(|(d, s, _)| (*d, *s)).collect();
        let served = serve(&store, &chunks, &wants);
        assert_eq!(served.len(), wants.len());
        for (got, (digest, size, data)) in served.iter().zip(order) {
            match got {
                Served::Data {
                    digest: d,
                    size: s,
                    data: bytes,
                } => {
                    assert_eq!((d, s), (digest, size));
                    let back = gantry_cas::decompress(bytes, *size as usize, digest)
                        .expect("a checked chunk");
                    assert!(back == *data);
                }
                Served::Unavailable { reason, .. } => panic!("{digest} unavailable: {reason}"),
            }
        }

        // Damage the second chunk of the first pack where it lies on disk.
        let record = store.chunk(&first[1].0).expect("index").expect("stored");
        let path = chunks.pack_path(record.pack);
        let mut bytes = std::fs::read(&path).expect("pack");
        for b in &mut bytes[record.offset as usize..][..record.stored_bytes as usize] {
            *b ^= 0xa5;
        }
        std::fs::write(&path, bytes).expect("damage");
        let wants: Vec<(Digest, u32)> = first[..3].iter().map(|(d, s, _)| (*d, *s)).collect();
        let served = serve(&store, &chunks, &wants);
        assert!(matches!(&served[0], Served::Data { digest, .. } if *digest == first[0].0));
        assert!(
            matches!(&served[1], Served::Unavailable { digest, reason } if *digest == first[1].0 && reason.contains("corrupt")),
            "the damaged chunk is refused"
        );
        assert!(matches!(&served[2], Served::Data { digest, .. } if *digest == first[2].0));
        assert_eq!(
            store.chunk(&first[1].0).expect("index"),
            None,
            "the damaged chunk left the index, so the next upload stores it again"
        );
        assert!(store.chunk(&first[0].0).expect("index").is_some());
    }

    fn cache(pipeline: &str, branch: &str, key: &str, at: u64) -> CacheView {
        CacheView {
            pipeline: pipeline.into(),
            branch: branch.into(),
            key: key.into(),
            manifest: Digest::of(key.as_bytes()),
            bytes: 1,
            files: 1,
            created_at: UnixMillis(at),
            last_used: UnixMillis(at),
            job: JobId {
                run: RunId(1),
                index: 0,
            },
        }
    }

    #[test]
    fn cache_lookup_tries_the_key_then_prefixes_branch_by_branch() {
        let caches = vec![
            cache("ci", "main", "deps-aaa", 1),
            cache("ci", "main", "deps-bbb", 2),
            cache("ci", "feature", "deps-ccc", 3),
            cache("other", "feature", "deps-zzz", 9),
        ];
        let scopes = |b: &str| -> Vec<String> {
            if b == "main" {
                vec!["main".into()]
            } else {
                vec![b.into(), "main".into()]
            }
        };
        let key = |hit: Option<CacheHit>| hit.map(|h| (h.cache.branch, h.cache.key, h.exact));
        let prefixes = ["deps-".to_owned()];
        // Exact key on its own branch.
        assert_eq!(
            key(find_cache(
                &caches,
                "ci",
                &scopes("main"),
                "deps-aaa",
                &prefixes
            )),
            Some(("main".into(), "deps-aaa".into(), true))
        );
        // A feature branch finds its own prefix match before main's exact key.
        assert_eq!(
            key(find_cache(
                &caches,
                "ci",
                &scopes("feature"),
                "deps-aaa",
                &prefixes
            )),
            Some(("feature".into(), "deps-ccc".into(), false))
        );
        // A new branch falls back to main, newest prefix match first.
        assert_eq!(
            key(find_cache(
                &caches,
                "ci",
                &scopes("new"),
                "deps-xxx",
                &prefixes
            )),
            Some(("main".into(), "deps-bbb".into(), false))
        );
        // Main never sees the feature branch's cache, and pipelines never mix.
        assert_eq!(
            key(find_cache(&caches, "ci", &scopes("main"), "deps-ccc", &[])),
            None
        );
        assert_eq!(
            key(find_cache(
                &caches,
                "ci",
                &scopes("feature"),
                "deps-zzz",
                &[]
            )),
            None
        );
    }
}
