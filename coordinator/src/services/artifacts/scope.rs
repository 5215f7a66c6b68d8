//! The one check of who may read or write what: an agent holds the attempt its job
//! grant names ([`Hold::Running`], `services::holds`), or is a target of the running
//! deployment whose release its deploy grant names; it writes only its own job's
//! declared artifact or cache, and feeds only upload sessions its connection opened.
//! An admin may read anything and writes nothing. Every artifact stream asks here before
//! it serves, and the authorization table decides with the answer.

use std::sync::Arc;

use gantry_pipeline::Pipeline;
use gantry_protocol::{AgentId, Digest, Grant, JobId, StreamOpen, TreeSource, UploadTarget};

use crate::base::authz::{Principal, Request};
use crate::services::artifacts::{lock, Artifacts, Peer, StreamError, MAX_CACHED_PIPELINES};
use crate::services::holds::{self, Held, Hold, Release};
use crate::store::{JobRecord, RunRecord};

/// What a job's grant resolved to.
pub(super) struct JobScope {
    pub job: JobRecord,
    pub run: RunRecord,
    pub pipeline: Arc<Pipeline>,
}

impl JobScope {
    /// The job's spec in its pipeline.
    pub(super) fn spec(&self) -> Result<&gantry_pipeline::Job, StreamError> {
        self.pipeline
            .jobs
            .get(self.job.job.index as usize)
            .ok_or(StreamError::NotInPipeline)
    }
}

impl Artifacts {
    /// Resolves a grant to the job it names, asking the authorization table for `row`
    /// with the agent classified by whether it holds that job attempt (it is running on
    /// it). `Ok(None)` is an admin, who may read anything (the stream's dispatcher asked
    /// the table for admins).
    pub(super) fn scope(
        &self,
        row: Request,
        peer: &Peer,
        grant: &Grant,
    ) -> Result<Option<JobScope>, StreamError> {
        let (agent, job, attempt) = match (peer, grant) {
            (Peer::Admin(_), _) => return Ok(None),
            (Peer::Agent(agent), Grant::Job { job, attempt }) => (agent, *job, *attempt),
            // Not a job's grant: the table decides for an agent as such.
            (Peer::Agent(_), Grant::Admin | Grant::Deploy { .. }) => {
                self.metrics.authz.check(row, Principal::Agent, || {
                    "an agent cannot use this grant here".into()
                })?;
                return Ok(None);
            }
        };
        let Held { record, refusal } =
            holds::attempt(&self.store, agent, job, attempt, Hold::Running)?;
        self.metrics
            .authz
            .check(row, Principal::agent(refusal.is_none()), || {
                refusal.unwrap_or_default()
            })?;
        let record = record.ok_or(StreamError::NoJob(job))?;
        let run = self.run(job)?;
        let pipeline = self.pipeline(&run)?;
        Ok(Some(JobScope {
            job: record,
            run,
            pipeline,
        }))
    }

    fn run(&self, job: JobId) -> Result<RunRecord, StreamError> {
        self.store.run(job.run)?.ok_or(StreamError::NoRun(job.run))
    }

    /// A run's parsed pipeline, cached (at most [`MAX_CACHED_PIPELINES`]).
    fn pipeline(&self, run: &RunRecord) -> Result<Arc<Pipeline>, StreamError> {
        if let Some(p) = lock(&self.pipelines).get(&run.run) {
            return Ok(p.clone());
        }
        let parsed = Arc::new(
            gantry_pipeline::parse(&run.file_name, &run.text).map_err(StreamError::Pipeline)?,
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
    pub(super) fn cache_scopes(&self, run: &RunRecord) -> Vec<String> {
        let mut scopes = vec![run.git_ref.clone()];
        if !self.settings.protected_branches.contains(&run.git_ref) {
            scopes.extend(self.settings.protected_branches.iter().cloned());
        }
        scopes
    }

    /// Whether `peer` may read `manifest` under `grant`: the source or an artifact of the
    /// run whose job it holds, or a cache that job may restore; a deployment's release.
    pub(super) fn check_readable(
        &self,
        row: Request,
        peer: &Peer,
        grant: &Grant,
        manifest: &Digest,
    ) -> Result<(), StreamError> {
        if let (Peer::Agent(agent), Grant::Deploy { deployment, epoch }) = (peer, grant) {
            return self.check_release(row, agent, *deployment, *epoch, manifest);
        }
        let Some(scope) = self.scope(row, peer, grant)? else {
            return Ok(());
        };
        let source = scope
            .run
            .source
            .as_deref()
            .filter(|s| TreeSource::is_tree(s));
        if let Some(Ok(tree)) = source.map(TreeSource::parse) {
            if tree.manifests().any(|m| m == *manifest) {
                return Ok(());
            }
        }
        let artifacts = self.store.artifacts_of(scope.run.run)?;
        if artifacts.iter().any(|a| a.manifest == *manifest) {
            return Ok(());
        }
        let scopes = self.cache_scopes(&scope.run);
        let caches = self.store.caches()?;
        if caches.iter().any(|c| {
            c.manifest == *manifest
                && c.pipeline == scope.pipeline.name
                && scopes.contains(&c.branch)
        }) {
            return Ok(());
        }
        Err(StreamError::NotReadable {
            manifest: *manifest,
            run: scope.run.run,
        })
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
    ) -> Result<(), StreamError> {
        let release = Release { epoch, manifest };
        let why = holds::deployment(&self.store, agent, deployment, Some(release))?;
        self.metrics
            .authz
            .check(row, Principal::agent(why.is_none()), || {
                why.unwrap_or_default()
            })?;
        Ok(())
    }

    /// Whether `peer` may write `target` under `grant`: an agent only its own job's
    /// declared artifact or cache. Admins write nothing here.
    pub(super) fn check_writable(
        &self,
        peer: &Peer,
        grant: &Grant,
        target: &UploadTarget,
    ) -> Result<JobScope, StreamError> {
        let row = Request::of_stream(&StreamOpen::Upload {
            grant: grant.clone(),
            target: target.clone(),
        });
        let scope = self
            .scope(row, peer, grant)?
            .ok_or(StreamError::NotUploader)?;
        let spec = scope.spec()?;
        match target {
            UploadTarget::Artifact { name, .. } => match &spec.artifact {
                Some(a) if &a.name == name => {}
                Some(a) => {
                    return Err(StreamError::OtherArtifact {
                        job: spec.name.clone(),
                        declared: a.name.clone(),
                        name: name.clone(),
                    })
                }
                None => return Err(StreamError::NoArtifactDeclared(spec.name.clone())),
            },
            UploadTarget::Cache { key } => {
                if spec.caches.is_empty() {
                    return Err(StreamError::NoCacheToWrite(spec.name.clone()));
                }
                if key.is_empty()
                    || key.len() > gantry_pipeline::MAX_CACHE_KEY
                    || key.chars().any(char::is_control)
                {
                    return Err(StreamError::CacheKey);
                }
            }
        }
        Ok(scope)
    }

    /// Whether `peer` may put chunks into upload session `session`: the session is open
    /// on this connection, opened by this peer (the work a put stream names).
    pub(super) fn check_put(
        &self,
        peer: &Peer,
        connection: u64,
        session: u64,
    ) -> Result<(), StreamError> {
        let owned = lock(&self.sessions)
            .open
            .get(&session)
            .is_some_and(|s| s.connection == connection && &s.peer == peer);
        let principal = match peer {
            Peer::Agent(_) => Principal::agent(owned),
            Peer::Admin(_) => Principal::Admin,
        };
        self.metrics
            .authz
            .check(Request::StreamPutChunks, principal, || {
                format!("upload session {session} is not open on this connection")
            })?;
        Ok(())
    }
}
