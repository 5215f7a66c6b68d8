//! The typed pipeline model, as the rest of Gantry sees it after parsing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::cron::CronSchedule;
use crate::deploy::{DeploySpec, EnvironmentSpec};
use crate::glob::glob_match;
use crate::outputs::{ArtifactSpec, CacheSpec};

/// A parsed, validated and matrix-expanded pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    pub name: String,
    /// Higher dispatches first.
    pub priority: i32,
    pub env: BTreeMap<String, String>,
    pub triggers: Triggers,
    /// Environments the file defines (`environments:`).
    pub environments: BTreeMap<String, EnvironmentSpec>,
    /// Jobs in file order, matrix expansions in matrix order.
    pub jobs: Vec<Job>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triggers {
    pub push: Option<PushFilter>,
    pub schedules: Vec<CronSchedule>,
    /// Inputs a manual run may set; a manual run is always allowed.
    pub inputs: BTreeMap<String, InputSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub default: Option<String>,
}

/// Which pushes start the pipeline. Empty lists do not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushFilter {
    pub branches: Vec<String>,
    pub tags: Vec<String>,
    pub paths: Vec<String>,
}

impl PushFilter {
    /// Whether a push of `ref_name` (`refs/heads/main` or `refs/tags/v1`) changing
    /// `changed_paths` starts the pipeline.
    ///
    /// As in GitHub Actions: with only `tags` given, branch pushes do not match, and with
    /// only `branches` given, tag pushes do not. `paths` applies to branch pushes: at
    /// least one changed path must match one pattern.
    pub fn matches(&self, ref_name: &str, changed_paths: &[String]) -> bool {
        let any = |patterns: &[String], text: &str| patterns.iter().any(|p| glob_match(p, text));
        if let Some(branch) = ref_name.strip_prefix("refs/heads/") {
            let ref_ok = if self.branches.is_empty() {
                self.tags.is_empty()
            } else {
                any(&self.branches, branch)
            };
            ref_ok
                && (self.paths.is_empty()
                    || changed_paths.iter().any(|path| any(&self.paths, path)))
        } else if let Some(tag) = ref_name.strip_prefix("refs/tags/") {
            if self.tags.is_empty() {
                self.branches.is_empty()
            } else {
                any(&self.tags, tag)
            }
        } else {
            false
        }
    }
}

/// One runnable job; a matrix job appears once per combination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// `test (linux, 1.80)` for a matrix expansion, the YAML key otherwise.
    pub name: String,
    /// The YAML key the job came from.
    pub key: String,
    /// Names of the jobs this one waits for; a need on a matrix job lists every expansion.
    pub needs: Vec<String>,
    /// Labels an agent must all carry.
    pub runs_on: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: u64,
    /// Re-runs after a failure, at most 10.
    pub retry: u32,
    pub continue_on_error: bool,
    pub condition: Condition,
    /// Waits for approval (`when: manual`).
    pub manual: bool,
    pub image: Option<String>,
    /// This expansion's matrix values; empty for a plain job.
    pub matrix: BTreeMap<String, String>,
    /// What the job passes on (`artifacts:`), uploaded when every step succeeded.
    pub artifact: Option<ArtifactSpec>,
    /// What the job reuses across runs (`cache:`).
    pub cache: Option<CacheSpec>,
    /// `download:`: the artifacts it takes; `None` takes every artifact of its needs.
    pub download: Option<Vec<String>>,
    /// `deploy:`: the coordinator deploys instead of an agent running steps.
    pub deploy: Option<DeploySpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: Option<String>,
    pub run: String,
    pub working_directory: Option<String>,
    pub env: BTreeMap<String, String>,
}

impl Pipeline {
    /// The job with this (expanded) name.
    pub fn job(&self, name: &str) -> Option<&Job> {
        self.jobs.iter().find(|job| job.name == name)
    }

    /// Jobs ordered so every job follows its needs; ties keep file order. Parsing has
    /// already refused cycles, so every job appears.
    pub fn topological_order(&self) -> Vec<&Job> {
        let index: HashMap<&str, usize> = self
            .jobs
            .iter()
            .enumerate()
            .map(|(i, job)| (job.name.as_str(), i))
            .collect();
        let mut waiting: Vec<usize> = self
            .jobs
            .iter()
            .map(|job| {
                job.needs
                    .iter()
                    .filter(|n| index.contains_key(n.as_str()))
                    .count()
            })
            .collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); self.jobs.len()];
        for (i, job) in self.jobs.iter().enumerate() {
            for need in &job.needs {
                if let Some(&j) = index.get(need.as_str()) {
                    dependents[j].push(i);
                }
            }
        }
        let mut ready: BTreeSet<usize> =
            (0..self.jobs.len()).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(self.jobs.len());
        while let Some(i) = ready.pop_first() {
            order.push(&self.jobs[i]);
            for &d in &dependents[i] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        order
    }
}

/// Names of the secrets a job's steps and env refer to as `${{ secrets.NAME }}`.
pub fn referenced_secrets(job: &Job) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut scan = |text: &str| {
        let mut rest = text;
        while let Some(start) = rest.find("${{") {
            let after = &rest[start + 3..];
            let Some(end) = after.find("}}") else { break };
            if let Some(name) = after[..end].trim().strip_prefix("secrets.") {
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    names.insert(name.to_owned());
                }
            }
            rest = &after[end + 2..];
        }
    };
    for value in job.env.values() {
        scan(value);
    }
    for step in &job.steps {
        scan(&step.run);
        if let Some(name) = &step.name {
            scan(name);
        }
        for value in step.env.values() {
            scan(value);
        }
    }
    if let Some(deploy) = &job.deploy {
        for value in deploy.env.values() {
            scan(value);
        }
        let h = &deploy.hooks;
        for hook in [&h.stop, &h.start, &h.restart, &h.pre_start, &h.post_start]
            .into_iter()
            .flatten()
        {
            scan(hook);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(branches: &[&str], tags: &[&str], paths: &[&str]) -> PushFilter {
        let own = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        PushFilter {
            branches: own(branches),
            tags: own(tags),
            paths: own(paths),
        }
    }

    #[test]
    fn push_filter_table() {
        let changed = vec!["src/lib.rs".to_owned(), "README.md".to_owned()];
        let docs_only = vec!["docs/a.md".to_owned()];
        let f = filter(&["main", "release/*"], &["v*"], &["src/**"]);
        assert!(f.matches("refs/heads/main", &changed));
        assert!(f.matches("refs/heads/release/1.0", &changed));
        assert!(!f.matches("refs/heads/release/1.0/x", &changed));
        assert!(!f.matches("refs/heads/dev", &changed));
        assert!(!f.matches("refs/heads/main", &docs_only));
        assert!(f.matches("refs/tags/v1.0", &docs_only));
        assert!(!f.matches("refs/tags/x1", &changed));
        assert!(!f.matches("main", &changed));

        let all = filter(&[], &[], &[]);
        assert!(all.matches("refs/heads/any", &[]));
        assert!(all.matches("refs/tags/any", &[]));

        let tags_only = filter(&[], &["v*"], &[]);
        assert!(!tags_only.matches("refs/heads/main", &changed));
        assert!(tags_only.matches("refs/tags/v2", &changed));

        let branches_only = filter(&["main"], &[], &[]);
        assert!(!branches_only.matches("refs/tags/v2", &changed));
    }
}
