//! What admins ask of artifacts and caches: listings, removing caches, and garbage
//! collection now (`gantry artifacts`, `gantry cache`, `gantry gc`).

use std::time::Duration;

use gantry_protocol::{AdminErrorKind, ArtifactView, CacheView, GcReport, RunId, UnixMillis};

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::services::artifacts::retention::GcError;
use crate::services::artifacts::Artifacts;
use crate::store::StoreError;

/// Why an artifact or cache request of an admin failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("no cache with key {key:?}{}; `gantry cache list` shows them", cache_scope(.pipeline.as_ref(), .branch.as_ref()))]
    NoCache {
        key: String,
        pipeline: Option<String>,
        branch: Option<String>,
    },
    #[error(transparent)]
    Collection(#[from] GcError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How `gantry cache rm` narrowed its key, as its refusal names it.
fn cache_scope(pipeline: Option<&String>, branch: Option<&String>) -> String {
    match (pipeline, branch) {
        (None, None) => String::new(),
        _ => format!(" (pipeline {pipeline:?}, branch {branch:?})"),
    }
}

impl AdminFailure for ArtifactError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::NoCache { .. } => AdminErrorKind::NotFound,
            Self::Collection(_) | Self::Store(_) => AdminErrorKind::Internal,
        }
    }
}

impl Artifacts {
    /// `gantry artifacts list RUN`.
    pub fn list(&self, run: RunId) -> Result<Vec<ArtifactView>, ArtifactError> {
        Ok(self.store.artifacts_of(run)?)
    }

    /// `gantry cache list`.
    pub fn caches(&self) -> Result<Vec<CacheView>, ArtifactError> {
        Ok(self.store.caches()?)
    }

    /// `gantry cache rm KEY`: every cache with that key, of one pipeline or branch or of
    /// all. Their chunks go at the next garbage collection.
    pub fn remove_caches(
        &self,
        cx: &Acting<'_>,
        key: String,
        pipeline: Option<String>,
        branch: Option<String>,
    ) -> Result<Vec<CacheView>, ArtifactError> {
        let detail = format!("key={key} pipeline={pipeline:?} branch={branch:?}");
        let gone = self.store.remove_caches(
            |c| {
                c.key == key
                    && pipeline.as_ref().is_none_or(|p| &c.pipeline == p)
                    && branch.as_ref().is_none_or(|b| &c.branch == b)
            },
            &cx.audit("cache.remove", detail),
        )?;
        if gone.is_empty() {
            return Err(ArtifactError::NoCache {
                key,
                pipeline,
                branch,
            });
        }
        Ok(gone)
    }

    /// `gantry gc`: expires, evicts and collects now, and records who asked (unless it
    /// was a dry run).
    pub async fn gc(
        &self,
        actor: &str,
        dry_run: bool,
        grace_secs: Option<u64>,
    ) -> Result<GcReport, ArtifactError> {
        let grace = grace_secs.map(Duration::from_secs);
        let report = self.collect_garbage(dry_run, grace).await?;
        if !dry_run {
            // Recorded when it is done, with what it freed.
            let entry = Acting::new(actor, UnixMillis::now()).audit(
                "gc",
                format!(
                    "artifacts_expired={} caches_evicted={} chunks_deleted={} bytes_freed={}",
                    report.artifacts_expired,
                    report.caches_evicted,
                    report.chunks_deleted,
                    report.bytes_freed
                ),
            );
            if let Err(e) = self.store.audit(&entry) {
                tracing::warn!("cannot audit a garbage collection: {e}");
            }
        }
        Ok(report)
    }
}
