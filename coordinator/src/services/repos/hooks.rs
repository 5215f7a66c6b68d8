//! Forge webhooks of registered repositories (`POST /hooks/repos/NAME`): a delivery is
//! checked the way the repository's forge signs it, with the stored secret named by
//! `repos add --webhook-secret` (`gantry_forge::webhook::receive`), then turned into at
//! most one run:
//! - a push of a branch or a tag runs the pushed commit (event `push` or `tag`, actor
//!   the pusher) when the pipeline file at that commit has an `on.push` filter that
//!   matches, the rule the poller uses (`Repos::run_if_matching`);
//! - a pull or merge request opened, updated or reopened runs its head commit, fetched
//!   from the target repository's `refs/pull/N/head` (GitLab:
//!   `refs/merge-requests/N/head`), with event `pull_request` and the number and base
//!   branch recorded for `GANTRY_PR_NUMBER` / `GANTRY_PR_BASE`;
//! - a deleted ref, a ping or an action that asks for nothing starts nothing.
//!
//! Fork pull requests follow `gantry_forge::trust`: refused unless the repository was
//! added with `--allow-fork-pull-requests`; then a pipeline that names a secret, an
//! environment or a deployment is refused (`trust::check_needs`), so an untrusted run
//! never receives a secret, and its jobs go only to agents for untrusted work (the
//! policy's labels, stored with the run: `Store::run_agent_labels`).

use std::sync::Arc;

use gantry_forge::trust::{self, ForkPolicy, TrustPolicy, Verdict};
use gantry_forge::webhook::{self, Delivery, WebhookError};
use gantry_forge::{EventKind, Forge, ForgeEvent, PullRequest, Push};
use gantry_git::{Fetch, GitError, ObjectId};
use gantry_protocol::{Labels, RunView, UnixMillis};

use crate::base::audit::Acting;
use crate::services::repos::poll::MAX_PATHS;
use crate::services::repos::{bundled, RepoError, Repos, Target, MAX_PIPELINE_BYTES};
use crate::store::RepoRecord;

/// What a delivery did.
#[derive(Debug)]
pub enum HookOutcome {
    Started(RunView),
    /// Well-formed and authentic, but it starts nothing; the reason is answered.
    Nothing(String),
}

/// Why a delivery was refused; [`HookError::http_status`] is the answer's status.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no repository {0:?} on this coordinator; the webhook URL is /hooks/repos/NAME with NAME as `gantry repos list` shows it")]
    Unknown(String),
    #[error("repository {0} has no --forge, so Gantry cannot tell how its webhooks are signed; remove it and add it again with --forge gitea|gitlab|github")]
    NoForge(String),
    #[error("repository {0} takes no webhooks: add it with --webhook-secret NAME (a stored secret) to set the secret the forge signs with")]
    Off(String),
    #[error("repository {repo}: {source}")]
    Delivery {
        repo: String,
        #[source]
        source: WebhookError,
    },
    #[error("repository {repo}: {reason}")]
    Refused { repo: String, reason: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl HookError {
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Unknown(_) => 404,
            Self::NoForge(_) | Self::Off(_) => 503,
            Self::Delivery { source, .. } => source.http_status(),
            Self::Refused { .. } => 403,
            Self::Repo(RepoError::Store(_) | RepoError::Io { .. } | RepoError::Seal(_)) => 500,
            // The repository's own state (an unreachable remote, a commit without a
            // pipeline file, a pipeline the run's checks refuse): the forge's log shows it.
            Self::Repo(_) => 422,
        }
    }
}

impl Repos {
    /// Checks and acts on one delivery for repository `name`. `headers` as received.
    pub async fn deliver(
        self: &Arc<Self>,
        name: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<HookOutcome, HookError> {
        let record = self
            .store
            .repo(name)
            .map_err(RepoError::from)?
            .ok_or_else(|| HookError::Unknown(name.to_owned()))?;
        let hook = self.store.repo_hook(name).map_err(RepoError::from)?;
        // Repositories added before the name was fixed stored Gitea as `gitea/forgejo`.
        let forge = record
            .forge
            .as_deref()
            .and_then(|f| Forge::parse(f.split('/').next().unwrap_or(f)))
            .ok_or_else(|| HookError::NoForge(name.to_owned()))?;
        let secret_name = hook.secret.ok_or_else(|| HookError::Off(name.to_owned()))?;
        // A secret deleted since `repos add` leaves an empty key, which trusts nothing.
        let secret = self.secrets.value(&secret_name).unwrap_or_default();
        let delivery =
            webhook::receive(forge, secret.as_bytes(), headers, body).map_err(|source| {
                HookError::Delivery {
                    repo: name.to_owned(),
                    source,
                }
            })?;
        let event = match delivery {
            Delivery::Ignored(i) => return Ok(HookOutcome::Nothing(i.reason)),
            Delivery::Event(e) => e,
        };
        let policy = TrustPolicy {
            fork_pull_requests: if hook.fork_pull_requests {
                ForkPolicy::RunUntrusted
            } else {
                ForkPolicy::Refuse
            },
            ..TrustPolicy::default()
        };
        let privileges = match trust::decide(&policy, &event) {
            Verdict::Run(p) => p,
            Verdict::Refuse { reason } => {
                return Err(HookError::Refused {
                    repo: name.to_owned(),
                    reason,
                })
            }
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.act(&record, forge, &event, &policy, &privileges))
            .await
            .map_err(|e| RepoError::Io {
                repo: name.to_owned(),
                detail: format!("the webhook task failed: {e}"),
            })?
    }

    /// Turns an authentic, allowed event into a run. Blocking.
    fn act(
        &self,
        record: &RepoRecord,
        forge: Forge,
        event: &ForgeEvent,
        policy: &TrustPolicy,
        privileges: &trust::Privileges,
    ) -> Result<HookOutcome, HookError> {
        match &event.kind {
            EventKind::RefDeleted { git_ref, .. } => Ok(HookOutcome::Nothing(format!(
                "{} was deleted: nothing to run",
                git_ref.full()
            ))),
            EventKind::Push(push) => self.push(record, push, &event.actor),
            EventKind::PullRequest(pr) => {
                self.pull_request(record, forge, pr, &event.actor, policy, privileges)
            }
        }
    }

    fn push(
        &self,
        record: &RepoRecord,
        push: &Push,
        actor: &str,
    ) -> Result<HookOutcome, HookError> {
        let full_ref = push.git_ref.full();
        let commit = object_id(record, push.after.as_str())?;
        let before = push
            .before
            .as_ref()
            .and_then(|c| ObjectId::from_hex(c.as_str()));
        let paths = self.with_mirror(record, |mirror| {
            self.fetch_all(record, mirror)?;
            ensure(record, mirror.ensure_commit(commit), &full_ref, commit)?;
            // The forge's own list may be cut short (GitLab lists 20 commits); the
            // mirror's diff is the poller's, so both paths decide alike.
            Ok(mirror
                .changed_paths(before, commit, MAX_PATHS)
                .unwrap_or_else(|_| push.changed_paths.clone()))
        })?;
        let event = if push.git_ref.is_tag() { "tag" } else { "push" };
        let target = Target {
            commit,
            full_ref: Some(full_ref.clone()),
        };
        match self.run_if_matching(record, target, &paths, event, actor)? {
            Some(view) => Ok(HookOutcome::Started(view)),
            None => Ok(HookOutcome::Nothing(format!(
                "the pipeline file {} at {commit} has no on.push filter matching {full_ref}",
                record.pipeline_file
            ))),
        }
    }

    fn pull_request(
        &self,
        record: &RepoRecord,
        forge: Forge,
        pr: &PullRequest,
        actor: &str,
        policy: &TrustPolicy,
        privileges: &trust::Privileges,
    ) -> Result<HookOutcome, HookError> {
        let head_ref = pr.head_fetch_ref(forge);
        let commit = object_id(record, pr.head_commit.as_str())?;
        let text = self.with_mirror(record, |mirror| {
            let fetched = mirror.fetch(&Fetch::Ref(head_ref.clone()));
            ensure(record, fetched, &head_ref, commit)?;
            ensure(record, mirror.ensure_commit(commit), &head_ref, commit)?;
            mirror
                .read_file(commit, &record.pipeline_file, MAX_PIPELINE_BYTES)
                .map(|t| {
                    t.and_then(|t| String::from_utf8(t).ok())
                        .map(|t| bundled(mirror, record, commit, &t))
                })
                .map_err(|source| RepoError::Git {
                    repo: record.name.clone(),
                    source,
                })
        })?;
        // Untrusted runs are refused here, before anything is stored, if the pipeline
        // asks for what they may not have (the pipeline comes from the change itself,
        // with the files it includes from the same commit).
        if let Some(pipeline) =
            text.and_then(|t| gantry_pipeline::parse(&record.pipeline_file, &t).ok())
        {
            let needs = trust::Needs {
                secrets: pipeline
                    .jobs
                    .iter()
                    .flat_map(gantry_pipeline::referenced_secrets)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                environments: pipeline
                    .jobs
                    .iter()
                    .filter_map(|j| j.environment.as_ref().map(|e| e.name.clone()))
                    .collect(),
                deploys: pipeline.jobs.iter().any(|j| j.deploy.is_some()),
            };
            let withheld = trust::check_needs(policy, privileges, &needs).map_err(|reason| {
                HookError::Refused {
                    repo: record.name.clone(),
                    reason: format!("pull request #{}: {reason}", pr.number),
                }
            })?;
            if !withheld.is_empty() {
                // The default policy refuses instead; nothing withholds yet.
                return Err(HookError::Refused {
                    repo: record.name.clone(),
                    reason: withheld.explain().join("; "),
                });
            }
        }
        let target = Target {
            commit,
            full_ref: Some(head_ref),
        };
        let mut prepared = self.prepare(record, None, Some(target))?;
        prepared.pull_request = Some((pr.number, pr.base_ref.clone()));
        // Untrusted work goes only to agents for it; a trusted run's privileges ask for
        // no labels.
        prepared.agent_labels = privileges.required_agent_labels.clone();
        let cx = Acting::new(actor, UnixMillis::now());
        let view = self.submit(&cx, prepared, "pull_request", Labels::new())?;
        tracing::info!(repo = %record.name, run = %view.run, pr = pr.number, %commit, "pull request started a run");
        Ok(HookOutcome::Started(view))
    }
}

fn object_id(record: &RepoRecord, hex: &str) -> Result<ObjectId, HookError> {
    ObjectId::from_hex(hex).ok_or_else(|| HookError::Refused {
        repo: record.name.clone(),
        reason: format!("commit {hex:?} is not a SHA-1 object id; Gantry's mirrors are SHA-1"),
    })
}

/// A git step's outcome, with a missing commit or ref said as such.
fn ensure(
    record: &RepoRecord,
    outcome: Result<(), GitError>,
    reference: &str,
    commit: ObjectId,
) -> Result<(), RepoError> {
    outcome.map_err(|source| match source {
        GitError::CommitNotFound { .. } => RepoError::NoRef {
            repo: record.name.clone(),
            reference: format!("{reference} at {commit}"),
            url: gantry_git::redact(&record.url),
        },
        source => RepoError::Git {
            repo: record.name.clone(),
            source,
        },
    })
}
