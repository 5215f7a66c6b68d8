//! Environments and deployments (tables `environments` and `deployments`).

use std::collections::{BTreeMap, HashSet};
use std::ops::ControlFlow;

use gantry_deploy::{Deployment, Limits, Strategy};
use gantry_protocol::{
    AgentBinary, AgentId, AppSpec, Approval, Attempt, DeployLogLine, DeployOp, Digest, EnvRelease,
    JobId, Labels, ReleaseSpec, UnixMillis,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::audit::AuditEntry;
use super::db::{decode, encode, eng, scan, update, Store, StoreError};

/// Environments by name → [`EnvironmentRecord`].
const ENVIRONMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("environments");
/// Deployments by number (from 1) → [`DeploymentRecord`].
const DEPLOYMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("deployments");

/// Releases an environment remembers.
pub const ENV_HISTORY: usize = 20;

/// Adds to `roots` the manifests of releases environments ran (a rollback may stage
/// one on a new host) and of deployments under way: garbage collection keeps them,
/// whatever their artifact's expiry.
pub(super) fn releases_in_use(
    tx: &redb::WriteTransaction,
    roots: &mut HashSet<Digest>,
) -> Result<(), StoreError> {
    let envs = tx
        .open_table(ENVIRONMENTS)
        .map_err(eng!("open environments"))?;
    scan(
        envs.iter(),
        "scan environments",
        "environment",
        |_, env: EnvironmentRecord| {
            roots.extend(env.history.iter().map(|r| r.release.manifest));
            roots.extend(env.current.iter().map(|r| r.release.manifest));
            ControlFlow::Continue(())
        },
    )?;
    drop(envs);
    let deployments = tx
        .open_table(DEPLOYMENTS)
        .map_err(eng!("open deployments"))?;
    scan(
        deployments.iter(),
        "scan deployments",
        "deployment",
        |_, record: DeploymentRecord| {
            if !record.is_ended() {
                roots.insert(record.release.manifest);
            }
            ControlFlow::Continue(())
        },
    )
}

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(ENVIRONMENTS)
        .map_err(eng!("open environments"))?;
    tx.open_table(DEPLOYMENTS)
        .map_err(eng!("open deployments"))?;
    Ok(())
}

/// Where a deployment is before and after its engine runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    AwaitingApproval,
    /// Approved; starts at `until` (the environment's wait timer).
    Waiting {
        until: UnixMillis,
    },
    /// Ready, behind another deployment to the same environment.
    Queued,
    Running,
    Ended {
        /// `succeeded`, `rolled-back`, `failed` or `cancelled`.
        state: String,
        reason: Option<String>,
    },
}

/// What the coordinator keeps of one host in one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNote {
    pub hostname: String,
    /// The release the host ran before this deployment (what a rollback goes back to).
    pub previous: Option<String>,
    /// The step sent and not yet answered: its number and what it asked.
    pub in_flight: Option<(u64, DeployOp)>,
}

/// A deployment as stored, engine state included, so it resumes after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: u64,
    pub environment: String,
    pub epoch: u64,
    /// The app as hosts get it, with `${{ secrets.NAME }}` not yet filled in (values
    /// are never stored here; they are filled in for each step sent).
    pub app: AppSpec,
    pub release: ReleaseSpec,
    pub strategy: Strategy,
    pub limits: Limits,
    pub created_by: String,
    pub created_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// The pipeline job (and attempt) this deployment is, if a job started it.
    pub job: Option<(JobId, Attempt)>,
    pub approvals: Vec<Approval>,
    pub approvals_needed: u32,
    pub wait_ms: u64,
    pub status: Status,
    pub engine: Option<Deployment>,
    pub hosts: BTreeMap<AgentId, HostNote>,
    pub next_seq: u64,
    pub log: Vec<DeployLogLine>,
    /// Lines dropped from the front of `log` to keep it bounded.
    pub log_dropped: u64,
    /// When the first host failed after its switch (for time to restore).
    pub first_failure_at: Option<UnixMillis>,
    pub kind: Kind,
}

/// What a deployment installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A release of an app, to an environment's hosts.
    App,
    /// The coordinator's agent binary, to the agents matching `select`
    /// (`gantry agents upgrade`).
    AgentUpgrade { select: Labels, binary: AgentBinary },
}

impl DeploymentRecord {
    pub fn is_ended(&self) -> bool {
        matches!(self.status, Status::Ended { .. })
    }
}

gantry_protocol::environment_struct! {
    /// An environment as stored: its view without the live host list.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EnvironmentRecord {}
}

/// Why [`Store::put_environment`] stored nothing: the environment to create exists, or
/// the one to replace does not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvironmentConflict {
    #[error("environment {0} exists; change it with `gantry env update`")]
    Exists(String),
    #[error("no environment {0}; create it with `gantry env create`")]
    Missing(String),
}

impl Store {
    /// Creates an environment (or replaces one, with `replace`), with its audit entry.
    /// Refuses to create one that exists unless replacing, and to replace one that does
    /// not; the epoch and history of a replaced environment are kept.
    pub fn put_environment(
        &self,
        mut record: EnvironmentRecord,
        replace: bool,
        audit: &AuditEntry,
    ) -> Result<Result<EnvironmentRecord, EnvironmentConflict>, StoreError> {
        self.write(|tx| {
            let mut table = tx
                .open_table(ENVIRONMENTS)
                .map_err(eng!("open environments"))?;
            let existing: Option<EnvironmentRecord> = match table
                .get(record.name.as_str())
                .map_err(eng!("read environment"))?
            {
                Some(v) => Some(decode("environment", &record.name, v.value())?),
                None => None,
            };
            match (existing, replace) {
                (Some(_), false) => return Ok(Err(EnvironmentConflict::Exists(record.name))),
                (None, true) => return Ok(Err(EnvironmentConflict::Missing(record.name))),
                (Some(old), true) => {
                    record.epoch = old.epoch;
                    record.current = old.current;
                    record.history = old.history;
                    record.created_by = old.created_by;
                    record.created_at = old.created_at;
                }
                (None, false) => {}
            }
            table
                .insert(record.name.as_str(), encode(&record)?.as_slice())
                .map_err(eng!("write environment"))?;
            drop(table);
            Self::append_audit(tx, audit)?;
            Ok(Ok(record))
        })
    }

    pub fn environment(&self, name: &str) -> Result<Option<EnvironmentRecord>, StoreError> {
        self.get(
            ENVIRONMENTS,
            name,
            ["open environments", "read environment"],
            "environment",
        )
    }

    pub fn environments(&self) -> Result<Vec<EnvironmentRecord>, StoreError> {
        self.all(
            ENVIRONMENTS,
            ["open environments", "scan environments"],
            "environment",
        )
    }

    /// Stores a new deployment, numbered after the last one, with the environment's
    /// next epoch, in one commit (so epochs of one environment only grow). With no
    /// environment (a fleet upgrade), the epoch is 0.
    pub fn create_deployment(
        &self,
        environment: Option<&str>,
        make: impl FnOnce(u64, u64) -> DeploymentRecord,
        audit: &AuditEntry,
    ) -> Result<DeploymentRecord, StoreError> {
        self.write(|tx| {
            let epoch = match environment {
                Some(environment) => Self::next_epoch(tx, environment)?,
                None => 0,
            };
            let mut table = tx
                .open_table(DEPLOYMENTS)
                .map_err(eng!("open deployments"))?;
            let id = table
                .last()
                .map_err(eng!("read deployments"))?
                .map_or(1, |(k, _)| k.value() + 1);
            let record = make(id, epoch);
            table
                .insert(id, encode(&record)?.as_slice())
                .map_err(eng!("write deployment"))?;
            drop(table);
            let mut entry = audit.clone();
            entry.detail = format!("deployment={id} {}", entry.detail);
            Self::append_audit(tx, &entry)?;
            Ok(record)
        })
    }

    /// Increments an environment's epoch (inside the transaction creating a deployment).
    fn next_epoch(tx: &redb::WriteTransaction, environment: &str) -> Result<u64, StoreError> {
        let mut envs = tx
            .open_table(ENVIRONMENTS)
            .map_err(eng!("open environments"))?;
        let env: EnvironmentRecord = update(
            &mut envs,
            environment,
            ["read environment", "write environment"],
            "environment",
            |env: &mut EnvironmentRecord| env.epoch += 1,
        )?
        .ok_or_else(|| StoreError::Engine {
            op: "create deployment",
            detail: format!("no environment {environment}"),
        })?;
        Ok(env.epoch)
    }

    /// Saves a deployment; with `finished`, also records its release as the
    /// environment's current one, in the same commit.
    pub fn save_deployment(
        &self,
        record: &DeploymentRecord,
        finished: Option<&EnvRelease>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(DEPLOYMENTS)
                .map_err(eng!("open deployments"))?
                .insert(record.id, encode(record)?.as_slice())
                .map_err(eng!("write deployment"))?;
            if let Some(release) = finished {
                let mut envs = tx
                    .open_table(ENVIRONMENTS)
                    .map_err(eng!("open environments"))?;
                update(
                    &mut envs,
                    record.environment.as_str(),
                    ["read environment", "write environment"],
                    "environment",
                    |env: &mut EnvironmentRecord| {
                        env.current = Some(release.clone());
                        env.history.insert(0, release.clone());
                        env.history.truncate(ENV_HISTORY);
                    },
                )?;
            }
            Ok(())
        })
    }

    pub fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>, StoreError> {
        self.get(
            DEPLOYMENTS,
            id,
            ["open deployments", "read deployment"],
            "deployment",
        )
    }

    /// The newest deployments, newest first; `unfinished` keeps only those not ended.
    pub fn deployments(
        &self,
        limit: usize,
        unfinished: bool,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx
            .open_table(DEPLOYMENTS)
            .map_err(eng!("open deployments"))?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        scan(
            table.iter().map(Iterator::rev),
            "scan deployments",
            "deployment",
            |_, record: DeploymentRecord| {
                if !unfinished || record.finished_at.is_none() {
                    out.push(record);
                }
                if out.len() >= limit {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment record as coordinators wrote it when its fields were listed here
    /// (postcard: `prod`, selecting `env=prod`, 2 approvals, a 300 ms wait, branch `main`,
    /// epoch 3, no current release, no history, created by `t` at 5).
    const ENVIRONMENT: &[u8] =
        b"\x04prod\x01\x03env\x04prod\x02\xac\x02\x01\x04main\x03\x00\x00\x01t\x05";

    #[test]
    fn environment_records_keep_their_layout() {
        let record: EnvironmentRecord = decode("environment", "prod", ENVIRONMENT).expect("decode");
        assert_eq!(
            record,
            EnvironmentRecord {
                name: "prod".into(),
                select: Labels::from([("env".into(), "prod".into())]),
                approvals: 2,
                wait_ms: 300,
                branches: vec!["main".into()],
                epoch: 3,
                current: None,
                history: Vec::new(),
                created_by: "t".into(),
                created_at: UnixMillis(5),
            }
        );
        assert_eq!(encode(&record).expect("encode"), ENVIRONMENT);
    }

    #[test]
    fn creating_an_environment_twice_or_replacing_a_missing_one_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state.redb")).expect("store");
        let record: EnvironmentRecord = decode("environment", "prod", ENVIRONMENT).expect("decode");
        let audit = AuditEntry {
            at: UnixMillis(5),
            actor: "t".into(),
            action: "environment.create".into(),
            detail: String::new(),
        };
        let missing = store.put_environment(record.clone(), true, &audit);
        assert_eq!(
            missing.expect("store").map_err(|e| e.to_string()),
            Err("no environment prod; create it with `gantry env create`".into())
        );
        let created = store.put_environment(record.clone(), false, &audit);
        assert_eq!(created.expect("store"), Ok(record.clone()));
        let again = store.put_environment(record, false, &audit);
        assert_eq!(
            again.expect("store").map_err(|e| e.to_string()),
            Err("environment prod exists; change it with `gantry env update`".into())
        );
    }
}
