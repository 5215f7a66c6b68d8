//! Artifacts and caches on the coordinator: the bulk streams that read and write them,
//! who may do what, and retention (expiry, eviction, garbage collection).
//!
//! Owns the rules: an agent reads only manifests of the run whose job it holds (the
//! run's artifacts, and the caches its branch may see) and writes only its own job's
//! declared artifact and cache; an admin reads everything. Chunks are verified before
//! they are stored (an uploader cannot plant bytes under another chunk's digest) and
//! again before they are served (a chunk corrupted on disk is quarantined and reported,
//! never sent). The index is the store's; chunk files are [`ChunkStore`]'s.
//!
//! Garbage collection never takes a chunk that a live manifest names, that an open
//! upload session has been told exists or has sent, or that was written less than the
//! grace period ago; and a commit re-checks every chunk in the same transaction that
//! stores the manifest, so a chunk collected between "you have it" and the commit is
//! reported missing and sent again rather than silently lost.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_cas::{Bytes, EntryKind, Manifest, MAX_CHUNK, MAX_COMPRESSED_CHUNK, MAX_MANIFEST_BYTES};
use gantry_pipeline::Pipeline;
use gantry_protocol::{
    AgentId, ArtifactView, CacheHit, CacheView, ChunkFrame, ChunkPut, ChunkWants, Committed,
    Digest, GcReport, Grant, ManifestFrame, PutReply, ReceivedChunkPieces, ResolveReply,
    ResolveRequest, RunId, StreamOpen, UnixMillis, UploadReply, UploadRequest, UploadTarget,
    MANIFEST_PIECE_BYTES, MAX_DIGESTS_PER_FRAME,
};
use gantry_transport::{FrameReader, FrameWriter, TransportError};
use tokio::sync::{mpsc, RwLock};

use crate::base::authz::{Principal, Request};
use crate::base::chunks::{
    stored_check_pieces, ChunkReadError, ChunkStore, Location, PackWriter, SyncedPack,
};
use crate::base::config::ArtifactSettings;
use crate::base::metrics::Metrics;
use crate::store::{ChunkRecord, CommitOutcome, GcRules, JobRecord, RunRecord, Store};

/// Most chunk bytes in one pack: one fsync per 32 MiB of upload.
const SYNC_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Longest time chunks of an upload stream wait to be made durable (their pack closed
/// and indexed): what a slow upload loses to a coordinator crash, and how long garbage
/// collection may wait for a batch.
const SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// Frames read ahead of processing on a bulk stream (each at most ~257 KiB).
const READ_AHEAD_FRAMES: usize = 16;
/// Parsed pipelines kept for authorization checks; cleared when full.
const MAX_CACHED_PIPELINES: usize = 256;
/// Decoded manifests (their chunk lists) kept for serving chunks; cleared when full.
const MAX_CACHED_MANIFESTS: usize = 64;

/// Who opened a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Agent(AgentId),
    Admin(String),
}

/// An upload in progress: what it writes and the chunks it holds on to.
#[derive(Debug)]
struct Session {
    connection: u64,
    peer: Peer,
    /// Chunks this session was told are stored, or stored itself: protected from
    /// garbage collection until the session ends.
    pinned: HashSet<Digest>,
}

#[derive(Debug, Default)]
struct Sessions {
    next: u64,
    open: HashMap<u64, Session>,
}

/// The artifact service; one per coordinator.
#[derive(Debug)]
pub struct Artifacts {
    store: Arc<Store>,
    chunks: ChunkStore,
    settings: ArtifactSettings,
    metrics: Arc<Metrics>,
    /// Uploads hold it shared from renaming a pack into place to indexing its chunks;
    /// garbage collection holds it exclusively, so it never deletes a pack about to be
    /// indexed.
    collecting: RwLock<()>,
    sessions: Mutex<Sessions>,
    pipelines: Mutex<HashMap<RunId, Arc<Pipeline>>>,
    manifests: Mutex<HashMap<Digest, Arc<HashMap<Digest, u32>>>>,
    /// `max_send_rate`: a cap on the chunk bytes served, across every reader.
    send_limit: Option<gantry_transfer::RateLimit>,
}

/// What a job's grant resolved to.
struct JobScope {
    job: JobRecord,
    run: RunRecord,
    pipeline: Arc<Pipeline>,
}

impl JobScope {
    fn spec(&self) -> Option<&gantry_pipeline::Job> {
        self.pipeline.jobs.get(self.job.job.index as usize)
    }
}

fn settings_limit(settings: &ArtifactSettings) -> Option<gantry_transfer::RateLimit> {
    settings.max_send_rate.map(gantry_transfer::RateLimit::new)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends a session when its stream task ends, however it ends.
struct SessionGuard<'a> {
    artifacts: &'a Artifacts,
    id: u64,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        lock(&self.artifacts.sessions).open.remove(&self.id);
    }
}

impl Artifacts {
    pub fn open(
        store: Arc<Store>,
        dir: &std::path::Path,
        settings: ArtifactSettings,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            send_limit: settings_limit(&settings),
            store,
            chunks: ChunkStore::open(dir)?,
            settings,
            metrics,
            collecting: RwLock::new(()),
            sessions: Mutex::new(Sessions::default()),
            pipelines: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
        })
    }

    /// Serves one bulk stream. `connection` identifies the connection, so upload
    /// sessions can only be fed from the connection that opened them.
    pub async fn serve(
        &self,
        peer: &Peer,
        connection: u64,
        open: StreamOpen,
        mut writer: FrameWriter,
        reader: FrameReader,
    ) -> Result<(), String> {
        let result = match open {
            StreamOpen::Resolve(request) => {
                let reply = self
                    .resolve(peer, request)
                    .unwrap_or_else(|message| ResolveReply::Refused { message });
                writer.send(&reply).await.map_err(|e| e.to_string())
            }
            StreamOpen::GetManifest { grant, manifest } => {
                self.send_manifest(peer, &grant, &manifest, &mut writer)
                    .await
            }
            StreamOpen::FetchChunks { grant, manifest } => {
                self.send_chunks(peer, &grant, &manifest, &mut writer, reader)
                    .await
            }
            StreamOpen::Upload { grant, target } => {
                self.upload(peer, connection, &grant, &target, &mut writer, reader)
                    .await
            }
            StreamOpen::PutChunks { session } => {
                self.put_chunks(peer, connection, session, &mut writer, reader)
                    .await
            }
            other => Err(format!("not an artifact stream: {other:?}")),
        };
        writer.finish();
        result
    }

    /// Resolves a grant to the job it names, asking the authorization table for `row`
    /// with the agent classified by whether it holds that job attempt (it is running on
    /// it). `Ok(None)` is an admin, who may read anything (the stream's dispatcher asked
    /// the table for admins).
    fn scope(&self, row: Request, peer: &Peer, grant: &Grant) -> Result<Option<JobScope>, String> {
        let (agent, job, attempt) = match (peer, grant) {
            (Peer::Admin(_), _) => return Ok(None),
            (Peer::Agent(agent), Grant::Job { job, attempt }) => (agent, *job, *attempt),
            // Not a job's grant: the table decides for an agent as such.
            (Peer::Agent(_), Grant::Admin | Grant::Deploy { .. }) => {
                return self
                    .metrics
                    .authz
                    .check(row, Principal::Agent, || {
                        "an agent cannot use this grant here".into()
                    })
                    .map(|()| None)
                    .map_err(|d| d.to_string());
            }
        };
        let record = self.store.job(job).map_err(|e| e.to_string())?;
        let (holds, why) = match &record {
            None => (false, format!("no job {job}")),
            Some(record) => {
                let holds = record.attempt == attempt
                    && record.agent.as_ref() == Some(agent)
                    && record
                        .attempts
                        .iter()
                        .any(|(a, who)| *a == attempt && who == agent)
                    && matches!(record.state.as_str(), "offered" | "running" | "cancelling");
                (
                    holds,
                    format!(
                        "attempt {attempt} of job {job} is not running on {agent} (it is {} attempt {} there)",
                        record.state, record.attempt
                    ),
                )
            }
        };
        self.metrics
            .authz
            .check(row, Principal::agent(holds), || why)
            .map_err(|d| d.to_string())?;
        let Some(record) = record else {
            return Err(format!("no job {job}"));
        };
        let run = self
            .store
            .run(job.run)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no run {}", job.run))?;
        let pipeline = self.pipeline(&run)?;
        Ok(Some(JobScope {
            job: record,
            run,
            pipeline,
        }))
    }

    fn pipeline(&self, run: &RunRecord) -> Result<Arc<Pipeline>, String> {
        if let Some(p) = lock(&self.pipelines).get(&run.run) {
            return Ok(p.clone());
        }
        let parsed = Arc::new(
            gantry_pipeline::parse(&run.file_name, &run.text)
                .map_err(|e| format!("the run's pipeline no longer parses: {e}"))?,
        );
        let mut cache = lock(&self.pipelines);
        if cache.len() >= MAX_CACHED_PIPELINES {
            cache.clear();
        }
        cache.insert(run.run, parsed.clone());
        Ok(parsed)
    }

    /// The caches a run's jobs may restore, in the order they are tried: the run's own
    /// branch, then (unless the branch is protected) each protected branch.
    fn cache_scopes(&self, run: &RunRecord) -> Vec<String> {
        let mut scopes = vec![run.git_ref.clone()];
        if !self.settings.protected_branches.contains(&run.git_ref) {
            scopes.extend(self.settings.protected_branches.iter().cloned());
        }
        scopes
    }

    fn resolve(&self, peer: &Peer, request: ResolveRequest) -> Result<ResolveReply, String> {
        match request {
            ResolveRequest::JobArtifacts { job, attempt } => {
                let scope = self
                    .scope(
                        Request::StreamResolveJobArtifacts,
                        peer,
                        &Grant::Job { job, attempt },
                    )?
                    .ok_or("admins ask for one artifact by run and name")?;
                let spec = scope.spec().ok_or("the job is not in its pipeline")?;
                let stored = self
                    .store
                    .artifacts_of(scope.run.run)
                    .map_err(|e| e.to_string())?;
                let chosen = match &spec.download {
                    None => stored
                        .into_iter()
                        .filter(|a| spec.needs.contains(&a.job_name))
                        .collect(),
                    Some(names) => {
                        let mut chosen = Vec::new();
                        for name in names {
                            let found = stored.iter().find(|a| &a.name == name).ok_or_else(|| {
                                format!("artifact \"{name}\" was never uploaded in run {}: the job that declares it did not succeed", scope.run.run)
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
                    .ok_or("admins do not restore caches")?;
                if scope.spec().and_then(|s| s.cache.as_ref()).is_none() {
                    return Err(format!("job {job} declares no cache"));
                }
                let caches = self.store.caches().map_err(|e| e.to_string())?;
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
                    .artifacts_of(run)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|a| a.name == name)
                    .ok_or_else(|| {
                        format!("run {run} has no artifact \"{name}\"; `gantry artifacts list {run}` shows them")
                    })?;
                Ok(ResolveReply::Artifacts(vec![found]))
            }
        }
    }

    /// Whether `peer` may read `manifest` under `grant`.
    fn check_readable(
        &self,
        row: Request,
        peer: &Peer,
        grant: &Grant,
        manifest: &Digest,
    ) -> Result<(), String> {
        if let (Peer::Agent(agent), Grant::Deploy { deployment, epoch }) = (peer, grant) {
            return self.check_release(row, agent, *deployment, *epoch, manifest);
        }
        let Some(scope) = self.scope(row, peer, grant)? else {
            return Ok(());
        };
        let artifacts = self
            .store
            .artifacts_of(scope.run.run)
            .map_err(|e| e.to_string())?;
        if artifacts.iter().any(|a| a.manifest == *manifest) {
            return Ok(());
        }
        let scopes = self.cache_scopes(&scope.run);
        let caches = self.store.caches().map_err(|e| e.to_string())?;
        if caches.iter().any(|c| {
            c.manifest == *manifest
                && c.pipeline == scope.pipeline.name
                && scopes.contains(&c.branch)
        }) {
            return Ok(());
        }
        Err(format!(
            "manifest {manifest} is not an artifact of run {} nor a cache its jobs may restore: refused",
            scope.run.run
        ))
    }

    /// A host staging a deployment reads that deployment's release, while the
    /// deployment runs and the host is one of its targets: the work a deploy grant names.
    fn check_release(
        &self,
        row: Request,
        agent: &AgentId,
        deployment: u64,
        epoch: u64,
        manifest: &Digest,
    ) -> Result<(), String> {
        let record = self
            .store
            .deployment(deployment)
            .map_err(|e| e.to_string())?;
        let why = match &record {
            None => Some(format!("no deployment {deployment}")),
            Some(r) if r.epoch != epoch => Some(format!(
                "deployment {deployment} has epoch {}, not {epoch}",
                r.epoch
            )),
            Some(r) if r.is_ended() => Some(format!("deployment {deployment} has ended")),
            Some(r) if !r.hosts.contains_key(agent) => Some(format!(
                "{agent} is not a target of deployment {deployment}"
            )),
            Some(r) if r.release.manifest != *manifest => Some(format!(
                "manifest {manifest} is not deployment {deployment}'s release"
            )),
            Some(_) => None,
        };
        let holds = why.is_none();
        self.metrics
            .authz
            .check(row, Principal::agent(holds), || why.unwrap_or_default())
            .map_err(|d| d.to_string())
    }

    async fn send_manifest(
        &self,
        peer: &Peer,
        grant: &Grant,
        manifest: &Digest,
        writer: &mut FrameWriter,
    ) -> Result<(), String> {
        let row = Request::of_stream(&StreamOpen::GetManifest {
            grant: grant.clone(),
            manifest: *manifest,
        });
        let bytes = self
            .check_readable(row, peer, grant, manifest)
            .and_then(|()| {
                self.store
                    .manifest(manifest)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no manifest {manifest}"))
            });
        let bytes = match bytes {
            Ok(b) => b,
            Err(message) => {
                let _ = writer
                    .send(&ManifestFrame::Refused {
                        message: message.clone(),
                    })
                    .await;
                return Err(message);
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
        send.await.map_err(|e| e.to_string())
    }

    /// The chunks of a stored manifest with their sizes (cached).
    fn chunk_sizes(&self, manifest: &Digest) -> Result<Arc<HashMap<Digest, u32>>, String> {
        if let Some(sizes) = lock(&self.manifests).get(manifest) {
            return Ok(sizes.clone());
        }
        let bytes = self
            .store
            .manifest(manifest)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no manifest {manifest}"))?;
        let decoded = Manifest::decode(&bytes)
            .map_err(|e| format!("stored manifest {manifest} is unreadable: {e}"))?;
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

    async fn send_chunks(
        &self,
        peer: &Peer,
        grant: &Grant,
        manifest: &Digest,
        writer: &mut FrameWriter,
        reader: FrameReader,
    ) -> Result<(), String> {
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
            Err(message) => {
                let _ = writer
                    .send(&ChunkFrame::Refused {
                        message: message.clone(),
                    })
                    .await;
                return Err(message);
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
                            let message = format!("more than {MAX_DIGESTS_PER_FRAME} digests in one request");
                            let _ = writer.send(&ChunkFrame::Refused { message: message.clone() }).await;
                            return Err(message);
                        }
                        for digest in digests {
                            let Some(&size) = sizes.get(&digest) else {
                                let message = format!("chunk {digest} is not part of manifest {manifest}: refused");
                                let _ = writer.send(&ChunkFrame::Refused { message: message.clone() }).await;
                                return Err(message);
                            };
                            wanted += 1;
                            if want_tx.send((digest, size)).is_err() {
                                return Err("the chunk reader stopped".into());
                            }
                        }
                    }
                    Some(Ok(None)) | None => wants_done = true,
                    Some(Err(e)) => return Err(e.to_string()),
                },
                served = ready.recv() => {
                    let Some(served) = served else {
                        return Err("the chunk reader stopped".into());
                    };
                    match served {
                        Served::Data { digest, size, data } => {
                            if let Some(limit) = &self.send_limit {
                                limit.take(data.len()).await;
                            }
                            self.metrics.artifact_bytes_sent(data.len() as u64);
                            // The chunk's bytes go to quinn as they were read, behind
                            // the frame's head, rather than copied into an encoded frame.
                            gantry_transfer::send_chunk_data(writer, digest, size, data)
                                .await
                                .map_err(|e| e.to_string())?;
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
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    sent += 1;
                }
            }
        }
    }

    async fn upload(
        &self,
        peer: &Peer,
        connection: u64,
        grant: &Grant,
        target: &UploadTarget,
        writer: &mut FrameWriter,
        reader: FrameReader,
    ) -> Result<(), String> {
        let scope = match self.check_writable(peer, grant, target) {
            Ok(scope) => scope,
            Err(message) => {
                let _ = writer
                    .send(&UploadReply::Refused {
                        message: message.clone(),
                    })
                    .await;
                return Err(message);
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
        writer
            .send(&UploadReply::Opened { session: id })
            .await
            .map_err(|e| e.to_string())?;
        let mut requests = read_ahead::<UploadRequest>(reader);
        loop {
            let request = match requests.recv().await {
                Some(Ok(Some(r))) => r,
                Some(Ok(None)) | None => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
            };
            let reply = match request {
                UploadRequest::Have(digests) => {
                    if digests.len() > MAX_DIGESTS_PER_FRAME {
                        UploadReply::Refused {
                            message: format!(
                                "more than {MAX_DIGESTS_PER_FRAME} digests in one request"
                            ),
                        }
                    } else {
                        let missing = self
                            .store
                            .missing_chunks(&digests)
                            .map_err(|e| e.to_string())?;
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
                        Ok(bytes) => self.commit(scope.as_ref(), target, &bytes)?,
                        Err(message) => UploadReply::Refused { message },
                    }
                }
                UploadRequest::ManifestPiece(_) => UploadReply::Refused {
                    message: "a manifest piece arrived outside a commit".into(),
                },
            };
            let last = matches!(reply, UploadReply::Refused { .. });
            writer.send(&reply).await.map_err(|e| e.to_string())?;
            if last {
                return Ok(());
            }
        }
    }

    /// Whether `peer` may write `target` under `grant`: an agent only its own job's
    /// declared artifact or cache. Admins write nothing here.
    fn check_writable(
        &self,
        peer: &Peer,
        grant: &Grant,
        target: &UploadTarget,
    ) -> Result<Option<JobScope>, String> {
        let row = Request::of_stream(&StreamOpen::Upload {
            grant: grant.clone(),
            target: target.clone(),
        });
        let scope = self
            .scope(row, peer, grant)?
            .ok_or("uploads are made by the job that declares them")?;
        let spec = scope.spec().ok_or("the job is not in its pipeline")?;
        match target {
            UploadTarget::Artifact { name, .. } => match &spec.artifact {
                Some(a) if &a.name == name => {}
                Some(a) => {
                    return Err(format!(
                        "job {} declares artifact \"{}\", not \"{name}\": refused",
                        spec.name, a.name
                    ))
                }
                None => return Err(format!("job {} declares no artifact: refused", spec.name)),
            },
            UploadTarget::Cache { key } => {
                if spec.cache.is_none() {
                    return Err(format!("job {} declares no cache: refused", spec.name));
                }
                if key.is_empty()
                    || key.len() > gantry_pipeline::MAX_CACHE_KEY
                    || key.chars().any(char::is_control)
                {
                    return Err(format!(
                        "cache key must be 1 to {} printable bytes",
                        gantry_pipeline::MAX_CACHE_KEY
                    ));
                }
            }
        }
        Ok(Some(scope))
    }

    /// Validates a manifest and stores the artifact or cache it describes.
    fn commit(
        &self,
        scope: Option<&JobScope>,
        target: &UploadTarget,
        bytes: &[u8],
    ) -> Result<UploadReply, String> {
        let Some(scope) = scope else {
            return Ok(UploadReply::Refused {
                message: "uploads are made by the job that declares them".into(),
            });
        };
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
                let outcome = self
                    .store
                    .commit_artifact(&view, bytes, &chunks)
                    .map_err(|e| e.to_string())?;
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
                let outcome = self
                    .store
                    .commit_cache(&view, bytes, &chunks)
                    .map_err(|e| e.to_string())?;
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

    async fn put_chunks(
        &self,
        peer: &Peer,
        connection: u64,
        session: u64,
        writer: &mut FrameWriter,
        reader: FrameReader,
    ) -> Result<(), String> {
        // The work a put stream names is its upload session, held by the connection (and
        // peer) that opened it.
        let owned = lock(&self.sessions)
            .open
            .get(&session)
            .is_some_and(|s| s.connection == connection && &s.peer == peer);
        let principal = match peer {
            Peer::Agent(_) => Principal::agent(owned),
            Peer::Admin(_) => Principal::Admin,
        };
        let checked = self
            .metrics
            .authz
            .check(Request::StreamPutChunks, principal, || {
                format!("upload session {session} is not open on this connection")
            });
        if let Err(denied) = checked {
            let message = denied.to_string();
            let _ = writer
                .send(&PutReply::Refused {
                    message: message.clone(),
                })
                .await;
            return Err(message);
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
            Ok::<(), String>(())
        };
        let receiver = self.receive_batches(peer, &mut puts, writer, to_publish);
        let ((stored_chunks, stored_bytes), ()) = tokio::try_join!(receiver, publisher)?;
        self.metrics.artifact_bytes_received(stored_bytes);
        writer
            .send(&PutReply::Stored {
                chunks: stored_chunks,
                bytes: stored_bytes,
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// A put stream's chunks, verified and appended to packs of up to
    /// [`SYNC_BATCH_BYTES`] (or [`SYNC_INTERVAL`] of arrivals); each pack, once its fsync
    /// has started, goes to `to_publish`. Returns the chunks and bytes stored. A bad
    /// chunk refuses the stream (told to the uploader through `writer`).
    async fn receive_batches(
        &self,
        peer: &Peer,
        puts: &mut mpsc::Receiver<Result<Option<ReceivedChunkPieces>, TransportError>>,
        writer: &mut FrameWriter,
        to_publish: mpsc::Sender<Syncing>,
    ) -> Result<(u64, u64), String> {
        let (mut stored_chunks, mut stored_bytes) = (0u64, 0u64);
        let mut done = false;
        while !done {
            let first = match puts.recv().await {
                Some(Ok(Some(put))) => put,
                Some(Ok(None)) | None => break,
                Some(Err(e)) => return Err(e.to_string()),
            };
            // A batch (one pack) ends at SYNC_BATCH_BYTES, after SYNC_INTERVAL (so a slow
            // upload is made durable at least that often), or with the stream.
            let batch_ends = tokio::time::Instant::now() + SYNC_INTERVAL;
            let mut pack = Some(
                self.chunks
                    .new_pack()
                    .map_err(|e| format!("cannot start a pack: {e}"))?,
            );
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
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => break,
                    }
                }
                let batch = std::mem::take(&mut work);
                let packer = pack.take().ok_or("internal: no pack")?;
                let (packer, written) =
                    tokio::task::spawn_blocking(move || verify_and_append(packer, batch))
                        .await
                        .map_err(|e| e.to_string())?;
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
                    Err(message) => {
                        self.metrics.chunk_refused();
                        tracing::warn!(?peer, "refusing an upload: {message}");
                        let _ = writer
                            .send(&PutReply::Refused {
                                message: message.clone(),
                            })
                            .await;
                        return Err(message);
                    }
                }
                if done || pack_bytes >= SYNC_BATCH_BYTES {
                    break;
                }
                tokio::select! {
                    put = puts.recv() => match put {
                        Some(Ok(Some(put))) => work.push(put),
                        Some(Ok(None)) | None => { done = true; break; }
                        Some(Err(e)) => return Err(e.to_string()),
                    },
                    () = tokio::time::sleep_until(batch_ends) => break,
                }
            }
            let pack = pack.ok_or("internal: no pack")?;
            let syncing = tokio::task::spawn_blocking(move || (pack.sync(), rows));
            // A publisher that stopped has failed; its error is the stream's.
            if to_publish.send(syncing).await.is_err() {
                break;
            }
        }
        Ok((stored_chunks, stored_bytes))
    }

    /// Waits for a pack's fsync, then renames it into place and indexes its chunks, pinned
    /// to the session. From the rename to the index commit it holds the collection lock
    /// shared, so garbage collection never sees the pack unindexed.
    async fn publish(&self, session: u64, syncing: Syncing) -> Result<(), String> {
        let (synced, rows) = syncing.await.map_err(|e| e.to_string())?;
        let pack = synced.map_err(|e| format!("cannot sync a pack of chunks: {e}"))?;
        let _publishing = self.collecting.read().await;
        tokio::task::spawn_blocking(move || pack.publish())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot store a pack of chunks: {e}"))?;
        self.store.add_chunks(&rows).map_err(|e| e.to_string())?;
        if let Some(s) = lock(&self.sessions).open.get_mut(&session) {
            s.pinned.extend(rows.iter().map(|(d, _)| *d));
        }
        Ok(())
    }

    /// Expires, evicts and collects now. Holds the collection lock exclusively, so no
    /// chunk is being written meanwhile.
    pub async fn collect_garbage(
        &self,
        dry_run: bool,
        grace: Option<Duration>,
    ) -> Result<GcReport, String> {
        let _exclusive = self.collecting.write().await;
        let grace = grace.unwrap_or(self.settings.gc_grace);
        let protected: HashSet<Digest> = lock(&self.sessions)
            .open
            .values()
            .flat_map(|s| s.pinned.iter().copied())
            .collect();
        let now = UnixMillis::now();
        let rules = GcRules {
            now,
            grace_ms: grace.as_millis() as u64,
            cache_quota_bytes: self.settings.cache_quota_bytes,
            cache_max_idle_ms: self.settings.cache_max_idle.as_millis() as u64,
            dry_run,
        };
        let store = self.store.clone();
        let chunks = self.chunks.clone();
        let report = tokio::task::spawn_blocking(move || {
            let (mut report, _dropped) = store
                .collect_garbage(rules, &protected)
                .map_err(|e| e.to_string())?;
            // What is freed on disk: packs nothing uses, and the dead part of packs
            // that were rewritten.
            report.bytes_freed = collect_packs(&store, &chunks, rules.grace_ms, dry_run)?;
            Ok::<_, String>(report)
        })
        .await
        .map_err(|e| e.to_string())??;
        lock(&self.manifests).clear();
        tracing::info!(?report, "garbage collection done");
        Ok(report)
    }

    /// Runs garbage collection every `gc_interval`, forever.
    pub async fn collect_periodically(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.gc_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.collect_garbage(false, None).await {
                tracing::error!("garbage collection failed: {e}");
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

/// Reads frames of one type on their own task (a frame read is not cancel-safe), a few
/// ahead of the consumer.
fn read_ahead<T: serde::de::DeserializeOwned + Send + 'static>(
    reader: FrameReader,
) -> mpsc::Receiver<Result<Option<T>, TransportError>> {
    read_ahead_with(reader, |pieces, _| {
        gantry_protocol::decode_payload(&gantry_protocol::pieces::join_pieces(&pieces))
    })
}

/// [`read_ahead`] for the [`ChunkPut`]s of a put stream, each left in the pieces it
/// arrived in ([`ChunkPut::decode_received_pieces`]): joining them was a copy of every
/// byte uploaded.
fn read_ahead_chunk_puts(
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

/// Reads the manifest pieces of a commit: exactly `declared` bytes, at most
/// [`MAX_MANIFEST_BYTES`].
async fn receive_manifest(
    requests: &mut mpsc::Receiver<Result<Option<UploadRequest>, TransportError>>,
    declared: u64,
) -> Result<Vec<u8>, String> {
    if declared == 0 || declared > MAX_MANIFEST_BYTES as u64 {
        return Err(format!(
            "a manifest of {declared} bytes is refused: it must be 1 to {MAX_MANIFEST_BYTES} bytes"
        ));
    }
    let mut bytes = Vec::with_capacity(declared.min(16 * 1024 * 1024) as usize);
    while (bytes.len() as u64) < declared {
        match requests.recv().await {
            Some(Ok(Some(UploadRequest::ManifestPiece(piece)))) => {
                if bytes.len() as u64 + piece.len() as u64 > declared {
                    return Err(format!(
                        "more than the declared {declared} manifest bytes arrived"
                    ));
                }
                bytes.extend_from_slice(&piece);
            }
            Some(Ok(Some(other))) => {
                return Err(format!("expected a manifest piece, got {other:?}"))
            }
            Some(Ok(None)) | None => return Err("the stream ended inside a manifest".into()),
            Some(Err(e)) => return Err(e.to_string()),
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
) -> (PackWriter, Result<Vec<(Digest, ChunkRecord)>, String>) {
    let now = UnixMillis::now();
    let mut rows = Vec::with_capacity(puts.len());
    for put in puts {
        let data = put.data_pieces();
        if put.size == 0 || put.size as usize > MAX_CHUNK || put.data_len() > MAX_COMPRESSED_CHUNK {
            let message = format!(
                "chunk {} is refused: {} bytes ({} compressed) is outside 1..={MAX_CHUNK} ({MAX_COMPRESSED_CHUNK} compressed)",
                put.digest,
                put.size,
                put.data_len()
            );
            return (pack, Err(message));
        }
        if let Err(e) = gantry_cas::verify_chunk_pieces(data, put.size as usize, &put.digest) {
            return (pack, Err(format!("chunk {} is refused: {e}", put.digest)));
        }
        let location = match pack.append_pieces(data) {
            Ok(l) => l,
            Err(e) => return (pack, Err(format!("cannot write chunk {}: {e}", put.digest))),
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

/// Packs at most half full of live chunks are rewritten, so dead chunks never take more
/// than about as much disk as live ones.
const COMPACT_BELOW_LIVE_SHARE: f64 = 0.5;

/// The pack side of a garbage collection, after the index dropped dead chunks: deletes
/// packs nothing points at (once older than the grace, so a pack whose chunks are being
/// indexed right now is spared), and rewrites packs mostly dead. Returns the bytes
/// freed on disk.
fn collect_packs(
    store: &Store,
    chunks: &ChunkStore,
    grace_ms: u64,
    dry_run: bool,
) -> Result<u64, String> {
    let now = UnixMillis::now();
    let packs = chunks.list_packs().map_err(|e| e.to_string())?;
    let (live, _) = store
        .pack_usage(&HashSet::new())
        .map_err(|e| e.to_string())?;
    let mut freed = 0u64;
    let mut sparse = HashSet::new();
    for (pack, size, modified) in &packs {
        match live.get(pack) {
            None if now.millis_since(UnixMillis(*modified)) >= grace_ms => {
                freed += size;
                if !dry_run {
                    chunks.remove_pack(*pack).map_err(|e| e.to_string())?;
                }
            }
            Some(&bytes) if (bytes as f64) < (*size as f64) * COMPACT_BELOW_LIVE_SHARE => {
                sparse.insert(*pack);
                freed += size - bytes;
            }
            // Young and unindexed (being indexed now), or mostly live: kept.
            _ => {}
        }
    }
    if dry_run || sparse.is_empty() {
        return Ok(freed);
    }
    let (_, rows) = store.pack_usage(&sparse).map_err(|e| e.to_string())?;
    for (old, rows) in rows {
        let mut writer = chunks.new_pack().map_err(|e| e.to_string())?;
        let mut moves = Vec::with_capacity(rows.len());
        for (digest, record) in rows {
            let data = chunks
                .read_raw(Location {
                    pack: record.pack,
                    offset: record.offset,
                    len: record.stored_bytes,
                })
                .map_err(|e| format!("compacting pack {old:016x}: {e}"))?;
            let location = writer.append(&data).map_err(|e| e.to_string())?;
            let relocated = ChunkRecord {
                pack: location.pack,
                offset: location.offset,
                ..record
            };
            moves.push((digest, record, relocated));
        }
        writer.finish().map_err(|e| e.to_string())?;
        store.relocate_chunks(&moves).map_err(|e| e.to_string())?;
        chunks.remove_pack(old).map_err(|e| e.to_string())?;
    }
    Ok(freed)
}

impl Artifacts {
    /// Admin: the artifacts of a run.
    pub fn list(&self, run: RunId) -> Result<Vec<ArtifactView>, String> {
        self.store.artifacts_of(run).map_err(|e| e.to_string())
    }

    /// Admin: every cache.
    pub fn caches(&self) -> Result<Vec<CacheView>, String> {
        self.store.caches().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::chunks::stored_check;
    use gantry_protocol::JobId;

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
