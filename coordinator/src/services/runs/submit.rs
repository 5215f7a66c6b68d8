//! Submitting runs: `gantry validate` on the server, `gantry run`, `gantry pipelines
//! retry`, and the triggers' runs. A run is checked, then stored with its jobs and its
//! audit entry in one commit, and only then handed to the engine and announced. A run
//! whose `concurrency:` has `cancel-in-progress: true` then cancels the earlier unfinished
//! runs of its group ([`superseded`] decides which).

use std::sync::Arc;

use gantry_protocol::{Labels, RunId, RunView, SubmitRun};

use crate::base::audit::Acting;
use crate::services::deployments::create_file_environments;
use crate::services::engine::{concurrency_group, job_ids, plans_for, Input};
use crate::services::notify::Event;
use crate::services::runs::{RunError, Runs};
use crate::store::{JobRecord, RunRecord, RunRepoRecord, RunStatus};

impl Runs {
    /// Parses a pipeline file without running it; the names of its jobs.
    pub fn validate(file_name: &str, text: &str) -> Result<Vec<String>, RunError> {
        let pipeline = gantry_pipeline::parse(file_name, text)?;
        Ok(pipeline.jobs.iter().map(|j| j.name.clone()).collect())
    }

    /// Runs again what a run ran: the same file, ref, commit, inputs and source.
    pub fn retry(&self, cx: &Acting<'_>, run: RunId) -> Result<RunView, RunError> {
        let record = self.find_run(run)?;
        let again = SubmitRun {
            file_name: record.file_name,
            text: record.text,
            git_ref: record.git_ref,
            commit: record.commit,
            event: record.event,
            inputs: record.inputs,
            source: record.source,
        };
        self.submit(cx, &again)
    }

    /// Checks and stores a run, then hands it to the engine.
    pub fn submit(&self, cx: &Acting<'_>, submit: &SubmitRun) -> Result<RunView, RunError> {
        self.submit_with(cx, submit, None, &Labels::new())
    }

    /// [`Runs::submit`] for a run of a repository's commit, with the repository side
    /// stored before the engine sees the run (its jobs' `GANTRY_REPO`, `git.*`).
    /// `agent_labels`: what every agent of its jobs must carry (an untrusted run's),
    /// stored with the run.
    pub fn submit_from_repo(
        &self,
        cx: &Acting<'_>,
        submit: &SubmitRun,
        repo: &RunRepoRecord,
        agent_labels: &Labels,
    ) -> Result<RunView, RunError> {
        self.submit_with(cx, submit, Some(repo), agent_labels)
    }

    fn submit_with(
        &self,
        cx: &Acting<'_>,
        submit: &SubmitRun,
        repo: Option<&RunRepoRecord>,
        agent_labels: &Labels,
    ) -> Result<RunView, RunError> {
        self.disk.check()?;
        let pipeline = gantry_pipeline::parse(&submit.file_name, &submit.text)?;
        for name in submit.inputs.keys() {
            if !pipeline.triggers.inputs.contains_key(name) {
                return Err(RunError::UndeclaredInput {
                    name: name.clone(),
                    declared: pipeline.triggers.inputs.keys().cloned().collect(),
                });
            }
        }
        if let Some(source) = &submit.source {
            // A commit stored through the chunk store names manifests; an upload, an
            // archive.
            let exists = if gantry_protocol::TreeSource::is_tree(source) {
                match gantry_protocol::TreeSource::parse(source) {
                    Ok(tree) => {
                        let mut all = true;
                        for m in tree.manifests() {
                            all &= self.store.manifest(&m)?.is_some();
                        }
                        all
                    }
                    Err(_) => false,
                }
            } else {
                self.sources.exists(source)
            };
            if !exists {
                return Err(RunError::NoSource(source.clone()));
            }
        }
        let stored: Vec<String> = self.store.secrets()?.into_iter().map(|(n, _)| n).collect();
        let scopes = self.store.secret_scopes()?;
        for job in &pipeline.jobs {
            for secret in gantry_pipeline::referenced_secrets(job) {
                if !stored.contains(&secret) {
                    return Err(RunError::UnsetSecret {
                        job: job.name.clone(),
                        secret,
                    });
                }
                if let Some(scope) = scopes.get(&secret) {
                    let deploys_there =
                        job.deploy.as_ref().is_some_and(|d| &d.environment == scope);
                    if !deploys_there {
                        return Err(RunError::ScopedSecret {
                            job: job.name.clone(),
                            secret,
                            scope: scope.clone(),
                        });
                    }
                }
            }
        }
        create_file_environments(&self.store, &pipeline, cx.actor)
            .map_err(RunError::Environments)?;
        let now = cx.now;
        let audit = cx.audit(
            "run.create",
            format!("pipeline={} ref={}", pipeline.name, submit.git_ref),
        );
        let (record, jobs) = self.store.create_run(
            |run| {
                let record = RunRecord {
                    run,
                    pipeline: pipeline.name.clone(),
                    file_name: submit.file_name.clone(),
                    text: submit.text.clone(),
                    git_ref: submit.git_ref.clone(),
                    commit: submit.commit.clone(),
                    event: submit.event.clone(),
                    inputs: submit.inputs.clone(),
                    created_at: now,
                    created_by: cx.actor.to_owned(),
                    state: RunStatus::Running,
                    finished_at: None,
                    source: submit.source.clone(),
                };
                let jobs = job_ids(run, &pipeline)
                    .map(|(job, j)| JobRecord::pending(job, j.name.clone(), j.needs.clone()))
                    .collect();
                (record, jobs)
            },
            agent_labels,
            &audit,
        )?;
        if let Some(repo) = repo {
            self.store.put_run_repo(record.run, repo)?;
        }
        let group = concurrency_group(&pipeline, &record, repo).filter(|_| {
            pipeline
                .concurrency
                .as_ref()
                .is_some_and(|c| c.cancel_in_progress)
        });
        let plans = plans_for(record.run, &pipeline, &record, agent_labels);
        let priority = pipeline.priority;
        self.engine.send(Input::Submitted {
            run: Box::new(record.clone()),
            pipeline: Arc::new(pipeline),
            plans,
            priority,
        });
        tracing::info!(run = %record.run, pipeline = %record.pipeline, "run created");
        self.notifier.emit(Event::run_started(&record));
        if let Some(group) = group {
            // The new run is stored and started already: failing to cancel the older
            // ones must not report it as refused.
            if let Err(e) = self.supersede(cx, record.run, &group) {
                tracing::error!(run = %record.run, group, "cannot cancel the group's older runs: {e}");
            }
        }
        Ok(self.views(record, jobs))
    }

    /// Cancels the unfinished runs of `group` older than `run`, the way `gantry pipelines
    /// cancel` does, with the reason in the audit entry.
    fn supersede(&self, cx: &Acting<'_>, run: RunId, group: &str) -> Result<(), RunError> {
        let others = self.store.unfinished_runs()?;
        let groups = others.iter().map(|other| {
            // A stored run's file parsed when it was submitted; one that no longer does
            // (a newer parser) has no group and is left alone.
            let pipeline = gantry_pipeline::parse(&other.file_name, &other.text).ok();
            let repo = self.store.run_repo(other.run).ok().flatten();
            let group = pipeline.and_then(|p| concurrency_group(&p, other, repo.as_ref()));
            (other.run, group)
        });
        for old in superseded(run, group, groups) {
            self.store.audit(&cx.audit(
                "run.cancel",
                format!("run={old} reason=superseded by run {run} (concurrency group {group})"),
            ))?;
            tracing::info!(run = %old, by = %run, group, "run superseded");
            self.engine
                .event(gantry_scheduler::Event::CancelRun { run: old });
        }
        Ok(())
    }
}

/// The runs a new run of `group` supersedes: those submitted before it (a smaller id)
/// whose own group expands to the same text. Runs without a group are never touched.
pub(crate) fn superseded(
    run: RunId,
    group: &str,
    unfinished: impl IntoIterator<Item = (RunId, Option<String>)>,
) -> Vec<RunId> {
    unfinished
        .into_iter()
        .filter(|(other, g)| other.0 < run.0 && g.as_deref() == Some(group))
        .map(|(other, _)| other)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_earlier_runs_of_the_same_group_are_superseded() {
        let runs = [
            (RunId(1), Some("ci-main".to_owned())),
            (RunId(2), Some("ci-dev".to_owned())),
            (RunId(3), None),
            (RunId(4), Some("ci-main".to_owned())),
            (RunId(6), Some("ci-main".to_owned())),
        ];
        assert_eq!(
            superseded(RunId(5), "ci-main", runs.clone()),
            [RunId(1), RunId(4)]
        );
        assert_eq!(superseded(RunId(5), "ci-dev", runs.clone()), [RunId(2)]);
        assert!(superseded(RunId(5), "other", runs).is_empty());
    }
}
