//! The typed pipeline model, as the rest of Gantry sees it after parsing.
//!
//! Where a key says how an agent runs a job (image, services, checkout, reports, step
//! options), the model holds protocol's type for it, so the coordinator passes on what
//! the file says without a translation of its own ([`Job::execution`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gantry_protocol::{
    Checkout, HealthCommand, Image, JobCache, JobExecution, Reports, Service, Shell, StepOptions,
};
use serde::{Deserialize, Serialize};

use crate::condition::{Condition, StaticContext};
use crate::cron::CronSchedule;
use crate::deploy::{DeploySpec, EnvironmentSpec};
use crate::glob::glob_match;
use crate::inputs::InputSpec;
use crate::outputs::{ArtifactSpec, CacheSpec};

/// A parsed, validated and matrix-expanded pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    pub name: String,
    /// Higher dispatches first.
    pub priority: i32,
    pub env: BTreeMap<String, String>,
    pub triggers: Triggers,
    /// Environments the file (and the pipelines it calls) define (`environments:`).
    pub environments: BTreeMap<String, EnvironmentSpec>,
    /// Jobs in file order, matrix expansions in matrix order; a job that calls a
    /// pipeline (`uses:`) is replaced by that pipeline's jobs, named `caller/job`.
    pub jobs: Vec<Job>,
    /// `concurrency:` of the whole pipeline: runs in the same group wait for (or, with
    /// `cancel_in_progress`, cancel) the one running. The group may hold `inputs.*`,
    /// `git.*`, `event.*` and `env.*` references, filled in when the run starts.
    pub concurrency: Option<Concurrency>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triggers {
    pub push: Option<PushFilter>,
    pub schedules: Vec<CronSchedule>,
    /// Inputs a manual run may set; a manual run is always allowed. A called pipeline's
    /// inputs are these too (its caller sets them with `with:`).
    pub inputs: BTreeMap<String, InputSpec>,
    /// `on.call`: the file may be called by another pipeline's job (`uses:`).
    pub call: Option<CallSpec>,
}

/// What a reusable pipeline declares for its callers (`on.call`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSpec {
    /// Secrets every caller passes (`secrets: { NAME: ${{ secrets.X }} }`); inside the
    /// called pipeline, `${{ secrets.NAME }}` is then the caller's secret `X`.
    pub secrets: Vec<String>,
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
    /// `test (linux, 1.80)` for a matrix expansion, the key otherwise.
    pub name: String,
    /// The YAML key the job came from; `caller/key` for a job of a called pipeline.
    pub key: String,
    /// Names of the jobs this one waits for; a need on a matrix job lists every
    /// expansion, a need on a job that calls a pipeline lists every job of that pipeline.
    pub needs: Vec<String>,
    /// Labels an agent must all carry. A bare label in the file is already its pair
    /// here (`linux` is `os=linux`, `gpu` is `gpu=true`).
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
    /// `image:`: the job's steps run in a container of it.
    pub image: Option<Image>,
    /// This expansion's matrix values; empty for a plain job.
    pub matrix: BTreeMap<String, String>,
    /// What the job passes on (`artifacts:`), uploaded as its `when` says.
    pub artifact: Option<ArtifactSpec>,
    /// What the job reuses across runs (`cache:`, one or a list), in file order, with
    /// distinct keys.
    pub caches: Vec<CacheSpec>,
    /// `download:`: the artifacts it takes; `None` takes every artifact of its needs.
    pub download: Option<Vec<String>>,
    /// `deploy:`: the coordinator deploys instead of an agent running steps.
    pub deploy: Option<DeploySpec>,
    /// `outputs:`: name to a template of `steps.ID.outputs.NAME` (and run-wide)
    /// references, filled in by the agent after the last step; later jobs read them as
    /// `needs.KEY.outputs.NAME`.
    pub outputs: BTreeMap<String, String>,
    /// `services:`: containers started before the first step, in file order.
    pub services: Vec<Service>,
    /// `reports:`: JUnit and coverage files the coordinator reads, whatever the outcome.
    pub reports: Option<Reports>,
    /// `environment:` (any job), or a deploy job's `deploy.environment`: approvals, wait
    /// timer, branch rules and the environment's secrets apply to the job. For a job
    /// that is not a deploy job, the coordinator applies the gate before dispatch.
    pub environment: Option<JobEnvironment>,
    /// What the workspace holds before the first step (`checkout:`).
    pub checkout: Checkout,
    /// `concurrency:` of this job; `None` runs it whenever the scheduler may.
    pub concurrency: Option<Concurrency>,
    /// `strategy.fail-fast`: when one expansion of this job's matrix fails, the others
    /// still pending or running are cancelled. False unless the file says so (every
    /// expansion runs, as before the key existed).
    pub fail_fast: bool,
    /// `strategy.max-parallel`: most expansions of this matrix running at once.
    pub max_parallel: Option<u32>,
    /// For a job of a called pipeline: the key of the job that called it.
    pub called_by: Option<String>,
}

/// `environment:` of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnvironment {
    /// A literal environment name, or `${{ inputs.NAME }}` where `NAME` is a `choice`
    /// input whose every option is a valid environment name (the coordinator fills it
    /// in when the run starts: [`StaticContext::expand`]).
    pub name: String,
    /// Where the deployed thing is reached, shown on the run and in the environment's
    /// history; may hold `needs` and `steps` outputs (filled in when the job ends).
    pub url: Option<String>,
}

/// `concurrency:` of a pipeline or a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    /// The group's name; may hold `inputs.*`, `git.*`, `event.*` and `env.*`
    /// references (and matrix values, filled in already).
    pub group: String,
    /// A new run (or job) in the group cancels the one in progress instead of waiting
    /// for it.
    pub cancel_in_progress: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// `id:`: later steps and `outputs:` read this step's outputs as
    /// `steps.ID.outputs.NAME`.
    pub id: Option<String>,
    pub name: Option<String>,
    pub run: String,
    pub working_directory: Option<String>,
    pub env: BTreeMap<String, String>,
    /// `if:` over the steps before it; `success()` by default.
    pub condition: Condition,
    pub continue_on_error: bool,
    /// The step's own limit, at most the job's timeout.
    pub timeout_ms: Option<u64>,
    pub shell: Shell,
}

impl Job {
    /// Whether the job needs an agent with Docker: it has an image or services.
    pub fn needs_docker(&self) -> bool {
        self.image.is_some() || !self.services.is_empty()
    }

    /// The execution options an agent gets for this job: step conditions folded with
    /// what is known when the run starts (`ctx.env` is the pipeline's env; the job's is
    /// added), leaving `needs` outputs for the coordinator to resolve at dispatch
    /// (`StatusExpr::resolve_outputs`) and `steps` outputs for the agent; everything
    /// else as read.
    pub fn execution(&self, ctx: &StaticContext) -> JobExecution {
        let mut step_ctx = ctx.clone();
        step_ctx
            .env
            .extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        JobExecution {
            steps: self
                .steps
                .iter()
                .map(|step| StepOptions {
                    id: step.id.clone(),
                    condition: step.condition.fold(&step_ctx, &self.matrix),
                    continue_on_error: step.continue_on_error,
                    timeout_ms: step.timeout_ms,
                    shell: step.shell.clone(),
                })
                .collect(),
            services: self.services.clone(),
            image: self.image.clone(),
            outputs: self.outputs.clone(),
            artifact_when: self.artifact.as_ref().map(|a| a.when).unwrap_or_default(),
            reports: self.reports.clone(),
            caches: self
                .caches
                .iter()
                .map(|c| JobCache {
                    spec: gantry_protocol::CacheSpec {
                        key: c.key.clone(),
                        restore_keys: c.restore_keys.clone(),
                        paths: c.paths.clone(),
                    },
                    home: c.home,
                })
                .collect(),
            checkout: self.checkout.clone(),
        }
    }
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

/// Names of the secrets a job refers to as `${{ secrets.NAME }}` (in its env, steps,
/// services, deploy hooks and env) or names as a registry password: the secrets the
/// coordinator sends with the job.
pub fn referenced_secrets(job: &Job) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut scan = |text: &str| {
        for (_, expr) in crate::refs::references(text).into_iter().flatten() {
            if let Ok(crate::refs::Reference::Secret(name)) = crate::refs::parse_reference(expr) {
                names.insert(name);
            }
        }
    };
    for value in job.env.values() {
        scan(value);
    }
    for step in &job.steps {
        scan(&step.run);
        for value in step.env.values() {
            scan(value);
        }
    }
    let mut passwords = Vec::new();
    for image in job
        .image
        .iter()
        .chain(job.services.iter().map(|s| &s.image))
    {
        if let Some(credentials) = &image.credentials {
            scan(&credentials.username);
            passwords.push(credentials.password_secret.clone());
        }
    }
    for service in &job.services {
        for value in service.env.values().chain(&service.command) {
            scan(value);
        }
        if let Some(health) = &service.health {
            match &health.cmd {
                HealthCommand::Shell(text) => scan(text),
                HealthCommand::Exec(args) => args.iter().for_each(|a| scan(a)),
            }
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
    names.extend(passwords);
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
