//! Stored secrets: setting, listing and removing them (`gantry secrets`), and opening
//! them for the work that may have them.
//!
//! Owns the scope rule at the moment of use: a job gets only secrets scoped to no
//! environment; a deployment to an environment gets those and the ones scoped to it.
//! (Submission refuses a job that names a secret it could not get: `runs`.) Values are
//! sealed at rest with the key in the data directory (`base::seal`); this module is the
//! only one that opens them, and only to hand them to a dispatch or to the coordinator's
//! own use (the push webhook's secret).

use std::sync::Arc;

use gantry_protocol::{AdminErrorKind, Labels};

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::base::seal::{valid_name, SecretError, SecretKey};
use crate::store::{Store, StoreError};

/// Largest secret value.
const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Why a secret request failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("no environment {0}; create it with `gantry env create {0} --select KEY=VALUE` first")]
    NoEnvironment(String),
    #[error("invalid secret name {0:?}: use 1 to 64 of A-Z 0-9 _, starting with a letter")]
    BadName(String),
    #[error("a secret value must be 1 byte to 64 KiB")]
    BadValue,
    #[error("no secret {0}; `gantry secrets list` shows them")]
    NotFound(String),
    #[error(transparent)]
    Seal(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminFailure for SecretsError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::NoEnvironment(_) | Self::NotFound(_) => AdminErrorKind::NotFound,
            Self::BadName(_) | Self::BadValue => AdminErrorKind::InvalidInput,
            Self::Seal(_) | Self::Store(_) => AdminErrorKind::Internal,
        }
    }
}

/// The secret service; one per coordinator.
#[derive(Debug)]
pub struct Secrets {
    store: Arc<Store>,
    key: Arc<SecretKey>,
}

impl Secrets {
    pub fn new(store: Arc<Store>, key: Arc<SecretKey>) -> Self {
        Self { store, key }
    }

    /// `gantry secrets set`: seals and stores a value, for jobs and deployments
    /// (`environment: None`) or for deployments to one environment. Returns what to tell
    /// the admin.
    pub fn set(
        &self,
        cx: &Acting<'_>,
        name: &str,
        value: &str,
        environment: Option<&str>,
    ) -> Result<String, SecretsError> {
        if let Some(env) = environment {
            if self.store.environment(env)?.is_none() {
                return Err(SecretsError::NoEnvironment(env.to_owned()));
            }
        }
        if !valid_name(name) {
            return Err(SecretsError::BadName(name.to_owned()));
        }
        if value.is_empty() || value.len() > MAX_VALUE_BYTES {
            return Err(SecretsError::BadValue);
        }
        let sealed = self.key.seal(name, value.as_bytes())?;
        let detail = format!("name={name} environment={}", environment.unwrap_or("-"));
        self.store
            .put_secret(name, &sealed, environment, &cx.audit("secret.set", detail))?;
        Ok(match environment {
            Some(env) => format!("secret {name} stored; only deployments to {env} receive it"),
            None => format!("secret {name} stored"),
        })
    }

    /// `gantry secrets list`: the names, never the values.
    pub fn names(&self) -> Result<Vec<String>, SecretsError> {
        Ok(self.store.secrets()?.into_iter().map(|(n, _)| n).collect())
    }

    /// `gantry secrets rm`.
    pub fn remove(&self, cx: &Acting<'_>, name: &str) -> Result<String, SecretsError> {
        if self
            .store
            .remove_secret(name, &cx.audit("secret.remove", format!("name={name}")))?
        {
            Ok(format!("secret {name} removed"))
        } else {
            Err(SecretsError::NotFound(name.to_owned()))
        }
    }

    /// Values for a job that references `names`: only secrets scoped to no environment
    /// (a scoped one goes only to deployments to its environment).
    pub fn for_job(&self, names: &[String]) -> Labels {
        self.open(names, |scope| scope.is_none())
    }

    /// Values for a deployment to `environment`: secrets scoped to it or to none. Names
    /// with no such secret are missing from the answer.
    pub fn for_deployment(&self, environment: &str, names: &[String]) -> Labels {
        self.open(names, |scope| scope.is_none_or(|s| s == environment))
    }

    /// The value of one stored secret, for the coordinator's own use (the push webhook's
    /// `GANTRY_WEBHOOK_SECRET`).
    pub fn value(&self, name: &str) -> Option<String> {
        let sealed = self
            .store
            .secrets()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)?
            .1;
        self.key.open(name, &sealed).ok()
    }

    /// Values of the secrets named, among those `allowed` lets through by scope. A secret
    /// that cannot be read or opened is left out and logged: the job then fails on its
    /// missing variable, where its log says so.
    fn open(&self, names: &[String], allowed: impl Fn(Option<&String>) -> bool) -> Labels {
        let mut out = Labels::new();
        if names.is_empty() {
            return out;
        }
        let scopes = match self.store.secret_scopes() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read secret scopes: {e}");
                return out;
            }
        };
        match self.store.secrets() {
            Ok(all) => {
                for (name, sealed) in all
                    .into_iter()
                    .filter(|(n, _)| names.contains(n) && allowed(scopes.get(n)))
                {
                    match self.key.open(&name, &sealed) {
                        Ok(value) => {
                            out.insert(name, value);
                        }
                        Err(e) => tracing::error!("{e}"),
                    }
                }
            }
            Err(e) => tracing::error!("cannot read secrets: {e}"),
        }
        out
    }
}
