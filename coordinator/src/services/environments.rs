//! Environments and the deployment history as admins look at them: `gantry env
//! create|update|list|show` and `gantry deployments list|show`. Running deployments, and
//! acting on them, is the deployment manager's (`services::deployments`).

use gantry_protocol::{AdminErrorKind, DeploymentView, EnvironmentView, Labels};

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::base::labels::{check_labels, LabelError};
use crate::services::deployments::environment_view;
use crate::store::{EnvironmentConflict, EnvironmentRecord, Store, StoreError};

/// Most approvals an environment may require.
const MAX_APPROVALS: u32 = 10;
/// Longest wait timer an environment may have: 30 days.
const MAX_WAIT_MS: u64 = 30 * 86_400_000;
/// Most deployments one listing returns.
const MAX_LIST: u32 = 1000;

/// Why an environment or deployment request failed.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("invalid environment name {name:?}: {problem}")]
    BadName { name: String, problem: &'static str },
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("--approvals {0}: at most {MAX_APPROVALS}")]
    TooManyApprovals(u32),
    #[error("--wait: at most {} days", MAX_WAIT_MS / 86_400_000)]
    WaitTooLong,
    #[error("invalid branch pattern {0:?}: 1 to 255 printable characters, like main or release/*")]
    BadBranch(String),
    /// The store refused to create an environment that exists, or to update one that
    /// does not.
    #[error(transparent)]
    Conflict(#[from] EnvironmentConflict),
    #[error("no environment {0}; `gantry env list` shows them")]
    NoEnvironment(String),
    #[error("no deployment {0}; `gantry deployments list` shows them")]
    NoDeployment(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminFailure for EnvironmentError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::Conflict(EnvironmentConflict::Missing(_))
            | Self::NoEnvironment(_)
            | Self::NoDeployment(_) => AdminErrorKind::NotFound,
            Self::Store(_) => AdminErrorKind::Internal,
            _ => AdminErrorKind::InvalidInput,
        }
    }
}

/// An environment's rules, as `gantry env create|update` gives them.
#[derive(Debug, Clone)]
pub struct Rules {
    pub select: Labels,
    pub approvals: u32,
    pub wait_ms: u64,
    pub branches: Vec<String>,
}

/// `gantry env create` (or, with `replace`, `update`).
pub fn put(
    store: &Store,
    cx: &Acting<'_>,
    name: String,
    rules: Rules,
    replace: bool,
) -> Result<EnvironmentView, EnvironmentError> {
    if let Some(problem) = gantry_pipeline::environment_name_problem(&name) {
        return Err(EnvironmentError::BadName { name, problem });
    }
    let select = check_labels(&rules.select)?;
    let Rules {
        approvals,
        wait_ms,
        branches,
        ..
    } = rules;
    if approvals > MAX_APPROVALS {
        return Err(EnvironmentError::TooManyApprovals(approvals));
    }
    if wait_ms > MAX_WAIT_MS {
        return Err(EnvironmentError::WaitTooLong);
    }
    if let Some(bad) = branches
        .iter()
        .find(|b| b.is_empty() || b.len() > 255 || b.chars().any(char::is_control))
    {
        return Err(EnvironmentError::BadBranch(bad.clone()));
    }
    let detail = format!(
        "name={name} select={select:?} approvals={approvals} wait_ms={wait_ms} branches={branches:?}"
    );
    let record = EnvironmentRecord {
        name,
        select,
        approvals,
        wait_ms,
        branches,
        epoch: 0,
        current: None,
        history: Vec::new(),
        created_by: cx.actor.to_owned(),
        created_at: cx.now,
    };
    let action = if replace {
        "environment.update"
    } else {
        "environment.create"
    };
    let stored = store.put_environment(record, replace, &cx.audit(action, detail))??;
    Ok(environment_view(store, stored))
}

/// `gantry env list`.
pub fn list(store: &Store) -> Result<Vec<EnvironmentView>, EnvironmentError> {
    Ok(store
        .environments()?
        .into_iter()
        .map(|r| environment_view(store, r))
        .collect())
}

/// `gantry env show`.
pub fn show(store: &Store, name: &str) -> Result<EnvironmentView, EnvironmentError> {
    let record = store
        .environment(name)?
        .ok_or_else(|| EnvironmentError::NoEnvironment(name.to_owned()))?;
    Ok(environment_view(store, record))
}

/// Refuses an environment that does not exist.
pub fn must_exist(store: &Store, name: &str) -> Result<(), EnvironmentError> {
    match store.environment(name)? {
        Some(_) => Ok(()),
        None => Err(EnvironmentError::NoEnvironment(name.to_owned())),
    }
}

/// `gantry deployments list`: the newest `limit` (1 to 1,000), of one environment or of
/// all, without their logs.
pub fn deployments(
    store: &Store,
    environment: Option<&str>,
    limit: u32,
) -> Result<Vec<DeploymentView>, EnvironmentError> {
    if let Some(env) = environment {
        must_exist(store, env)?;
    }
    let limit = limit.clamp(1, MAX_LIST) as usize;
    Ok(store
        .deployments(usize::MAX, false)?
        .into_iter()
        .filter(|d| environment.is_none_or(|e| d.environment == e))
        .take(limit)
        .map(|d| {
            let mut view = d.view();
            view.log.clear();
            view
        })
        .collect())
}

/// `gantry deployments show`.
pub fn deployment(store: &Store, id: u64) -> Result<DeploymentView, EnvironmentError> {
    let record = store
        .deployment(id)?
        .ok_or(EnvironmentError::NoDeployment(id))?;
    Ok(record.view())
}
