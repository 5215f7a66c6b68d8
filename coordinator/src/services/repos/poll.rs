//! Polling (`gantry repos add --poll 60s`), for forges that cannot reach the
//! coordinator: each repository with an interval is fetched that often, and every branch
//! or tag whose head moved since the last fetch is a push the coordinator noticed itself.
//! It runs, with event `poll`, when the pipeline file at the new head has an `on.push`
//! filter that matches the ref and the paths changed since the old head (a new branch:
//! the paths its head commit changed).
//!
//! Bounded: one repository is fetched at a time, on a blocking thread; at most
//! [`MAX_RUNS_PER_POLL`] runs start from one fetch (a mass push of branches starts the
//! newest names first, and the rest are recorded as seen, not queued). A failed fetch
//! is recorded on the repository (`repos show`) and tried again at the next interval.
//!
//! Schedules: every repository's pipeline file, as it is at the default branch's last
//! fetched head, may have `on.schedule`; when one of its cron expressions fires, the
//! repository is fetched and the branch's head at that moment runs (event `schedule`,
//! its commit recorded). Missed firings collapse into one run, as for registered
//! pipelines (`services::triggers`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_git::ObjectId;
use gantry_protocol::{Labels, RunView, UnixMillis};

use crate::base::audit::Acting;
use crate::services::repos::{
    bundled, default_branch, RepoError, Repos, Target, MAX_PIPELINE_BYTES,
};
use crate::services::triggers::SCHEDULE_TICK;
use crate::store::RepoRecord;

/// How often the loop looks for a repository that is due.
const TICK: Duration = Duration::from_secs(2);
/// Most runs one poll of one repository starts.
pub const MAX_RUNS_PER_POLL: usize = 20;
/// Most changed paths read to match a push filter's `paths`.
pub(crate) const MAX_PATHS: usize = 10_000;
/// Who starts polled runs, as the audit log and `event.actor` name it.
const ACTOR: &str = "gantry://trigger/poll";
/// Who starts scheduled runs of a repository (as for registered pipelines).
const SCHEDULE_ACTOR: &str = "gantry://trigger/schedule";

impl Repos {
    /// Polls the repositories that have an interval, forever.
    pub async fn poll_loop(self: Arc<Self>) {
        let mut last: HashMap<String, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        let mut schedules_checked = Instant::now();
        loop {
            tick.tick().await;
            if schedules_checked.elapsed() >= SCHEDULE_TICK {
                schedules_checked = Instant::now();
                let this = self.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || this.fire_schedules()).await {
                    tracing::error!("schedule task failed: {e}");
                }
            }
            let repos = match self.store.repos() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("cannot read the repositories to poll: {e}");
                    continue;
                }
            };
            last.retain(|name, _| repos.iter().any(|r| &r.name == name));
            for repo in repos {
                let Some(secs) = repo.poll_secs else { continue };
                let due = last
                    .get(&repo.name)
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(secs));
                if !due {
                    continue;
                }
                last.insert(repo.name.clone(), Instant::now());
                let this = self.clone();
                let name = repo.name.clone();
                match tokio::task::spawn_blocking(move || this.poll_once(&repo)).await {
                    Ok(Ok(started)) if started > 0 => {
                        tracing::info!(repo = %name, runs = started, "poll started runs");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(repo = %name, "poll failed: {e}"),
                    Err(e) => tracing::error!(repo = %name, "poll task failed: {e}"),
                }
            }
        }
    }

    /// Fetches one repository and runs the refs whose head moved; how many runs started.
    /// Blocking.
    fn poll_once(&self, record: &RepoRecord) -> Result<usize, RepoError> {
        let moved = self.with_mirror(record, |mirror| {
            let heads = self.fetch_all(record, mirror)?;
            let mut moved = Vec::new();
            for (full_ref, commit) in moved_heads(&record.heads, &heads) {
                let old = record
                    .heads
                    .get(&full_ref)
                    .and_then(|c| ObjectId::from_hex(c));
                let paths = mirror
                    .changed_paths(old, commit, MAX_PATHS)
                    .unwrap_or_default();
                moved.push((full_ref, commit, paths));
            }
            Ok(moved)
        })?;
        let mut started = 0;
        for (full_ref, commit, paths) in moved.into_iter().take(MAX_RUNS_PER_POLL) {
            let target = Target {
                commit,
                full_ref: Some(full_ref.clone()),
            };
            match self.run_if_matching(record, target, &paths, "poll", ACTOR) {
                Ok(Some(_)) => started += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(repo = %record.name, reference = %full_ref, %commit, "polled run refused: {e}");
                }
            }
        }
        Ok(started)
    }

    /// Runs `target` as `event`, started by `actor`, if the pipeline file at its commit
    /// has a push filter that matches its ref and `paths` (the poller's and the push
    /// webhook's one rule); the run, or `None` if the filter does not match.
    pub(crate) fn run_if_matching(
        &self,
        record: &RepoRecord,
        target: Target,
        paths: &[String],
        event: &str,
        actor: &str,
    ) -> Result<Option<RunView>, RepoError> {
        let full_ref = target.full_ref.clone().unwrap_or_default();
        // The filter first, from the file alone: storing the tree is the costly part.
        let text = self.with_mirror(record, |mirror| {
            mirror
                .read_file(target.commit, &record.pipeline_file, MAX_PIPELINE_BYTES)
                .map(|t| {
                    t.and_then(|t| String::from_utf8(t).ok())
                        .map(|t| bundled(mirror, record, target.commit, &t))
                })
                .map_err(|source| RepoError::Git {
                    repo: record.name.clone(),
                    source,
                })
        })?;
        let matches = text
            .and_then(|t| gantry_pipeline::parse(&record.pipeline_file, &t).ok())
            .and_then(|p| p.triggers.push)
            .is_some_and(|f| f.matches(&full_ref, paths));
        if !matches {
            return Ok(None);
        }
        let prepared = self.prepare(record, None, Some(target))?;
        let cx = Acting::new(actor, UnixMillis::now());
        let view = self.submit(&cx, prepared, event, Labels::new())?;
        tracing::info!(repo = %record.name, run = %view.run, reference = %full_ref, event, "push started a run");
        Ok(Some(view))
    }
}

impl Repos {
    /// Starts a run of each repository whose pipeline's schedule fired since it was last
    /// checked. Blocking.
    fn fire_schedules(&self) {
        let repos = match self.store.repos() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read the repositories' schedules: {e}");
                return;
            }
        };
        let now_secs = UnixMillis::now().0 / 1000;
        for record in repos {
            if self.schedule_due(&record, now_secs) {
                let fired = self.prepare(&record, None, None).and_then(|prepared| {
                    let cx = Acting::new(SCHEDULE_ACTOR, UnixMillis::now());
                    self.submit(&cx, prepared, "schedule", Labels::new())
                });
                match fired {
                    Ok(view) => {
                        tracing::info!(repo = %record.name, run = %view.run, "scheduled run started");
                    }
                    Err(e) => tracing::warn!(repo = %record.name, "scheduled run refused: {e}"),
                }
            }
            let noted = self.store.update_repo(&record.name, |r| {
                r.schedule_checked_until = now_secs;
            });
            if let Err(e) = noted {
                tracing::warn!(repo = %record.name, "cannot record the schedule check: {e}");
            }
        }
    }

    /// Whether the pipeline at the default branch's last fetched head has a cron
    /// expression that fired after the last check.
    fn schedule_due(&self, record: &RepoRecord, now_secs: u64) -> bool {
        let Some(head) = default_branch(&record.heads)
            .and_then(|b| record.heads.get(b))
            .and_then(|c| ObjectId::from_hex(c))
        else {
            return false;
        };
        let text = self.with_mirror(record, |mirror| {
            mirror
                .read_file(head, &record.pipeline_file, MAX_PIPELINE_BYTES)
                .map(|t| {
                    t.and_then(|t| String::from_utf8(t).ok())
                        .map(|t| bundled(mirror, record, head, &t))
                })
                .map_err(|source| RepoError::Git {
                    repo: record.name.clone(),
                    source,
                })
        });
        let Some(pipeline) = text
            .ok()
            .flatten()
            .and_then(|t| gantry_pipeline::parse(&record.pipeline_file, &t).ok())
        else {
            return false;
        };
        pipeline.triggers.schedules.iter().any(|c| {
            c.next_after(record.schedule_checked_until)
                .is_some_and(|at| at <= now_secs)
        })
    }
}

/// Refs whose commit is new or changed from `before` to `after`, newest name first
/// (deleted refs start nothing).
fn moved_heads(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<(String, ObjectId)> {
    after
        .iter()
        .rev()
        .filter(|(name, commit)| before.get(*name) != Some(*commit))
        .filter_map(|(name, commit)| Some((name.clone(), ObjectId::from_hex(commit)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_and_moved_heads_count() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let before = BTreeMap::from([
            ("refs/heads/main".to_owned(), a.clone()),
            ("refs/heads/old".to_owned(), a.clone()),
            ("refs/heads/gone".to_owned(), a.clone()),
        ]);
        let after = BTreeMap::from([
            ("refs/heads/main".to_owned(), b.clone()),
            ("refs/heads/old".to_owned(), a.clone()),
            ("refs/heads/new".to_owned(), a.clone()),
        ]);
        let moved: Vec<String> = moved_heads(&before, &after)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(moved, ["refs/heads/new", "refs/heads/main"]);
    }
}
