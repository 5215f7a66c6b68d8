//! Why a deployment cannot be created or started, each case saying what was being
//! done: a deploy job's `✖` line in its log, a refused `gantry rollback` or `gantry
//! agents upgrade`, a deployment that ends before its engine starts, or a coordinator
//! that cannot load its unfinished deployments.

use gantry_deploy::gates::Refusal;
use gantry_protocol::{JobId, RunId};

use crate::services::runner::DEPLOY_RUNNER_LABEL;
use crate::store::StoreError;

/// Why a deployment cannot be created or started.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The store could not be read or written while doing `doing` ("reading run 4").
    #[error("{doing}: {source}")]
    Store {
        doing: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot store the deployment: {0}")]
    Save(#[source] StoreError),
    #[error("run {0} is not stored")]
    NoRun(RunId),
    #[error("the run's pipeline no longer parses: {0}")]
    Pipeline(#[source] gantry_pipeline::Errors),
    #[error("job {0} is not in its pipeline")]
    NoJob(JobId),
    #[error("job {0} has no `deploy:`; only deploy jobs may ask for {DEPLOY_RUNNER_LABEL}")]
    NotADeployJob(String),
    #[error(
        "run {run} has no artifact \"{artifact}\" to deploy: the job that declares it did not upload it"
    )]
    NoArtifact { run: RunId, artifact: String },
    #[error(
        "no environment {0}: create it with `gantry env create {0} --select KEY=VALUE`, or define it under `environments:` in the pipeline file"
    )]
    NoEnvironment(String),
    #[error(
        "secret {name} does not exist; set it with `gantry secrets set {name} --environment {environment}`"
    )]
    NoSecret { name: String, environment: String },
    #[error(
        "secret {name} is scoped to environment {scope}; a deployment to {environment} may not use it"
    )]
    SecretScope {
        name: String,
        scope: String,
        environment: String,
    },
    /// The gates refuse the request (a branch rule, a deployment running, an upgrade
    /// under way).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(
        "no connected host matches environment {environment}'s selector {selector} ({enrolled} enrolled host(s) match; `gantry agents list` shows which are connected)"
    )]
    NoHost {
        environment: String,
        selector: String,
        enrolled: usize,
    },
    #[error("nothing was deployed to {0} yet: nothing to roll back")]
    NothingDeployed(String),
    #[error("{environment} never ran release {release}; its releases: {}", known.join(", "))]
    UnknownRelease {
        environment: String,
        release: String,
        known: Vec<String>,
    },
    #[error("{environment} has no release before {current} to go back to")]
    NoEarlierRelease {
        environment: String,
        current: String,
    },
    #[error("deployment {deployment} that installed {release} is no longer stored")]
    SourceGone { deployment: u64, release: String },
}

impl DeployError {
    /// A store failure while doing `doing`.
    pub(super) fn store(doing: impl Into<String>) -> impl FnOnce(StoreError) -> Self {
        let doing = doing.into();
        move |source| Self::Store { doing, source }
    }
}
