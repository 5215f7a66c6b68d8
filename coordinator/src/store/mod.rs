//! The durable store: the only module of the coordinator that knows redb.
//!
//! Every record is postcard-encoded under a typed key. Every method that changes state
//! commits with `Durability::Immediate` before it returns, so a caller may acknowledge
//! what it just stored; a change and its audit entry share one commit. Live session
//! facts (last seen, figures) are written in batches by [`Store::record_presence`],
//! because they are not acknowledgements. Records import no service type: a service
//! keeps its decisions in its own `impl` of a record, never the record itself.
//!
//! The store is split by table family; each family module owns its tables (their
//! definitions are private to it), its records and its `impl Store` block. What they
//! all stand on is in `db` (the handle, errors, encoding, the one scan loop) and
//! `audit`. This root only opens the file: it creates every table and checks the schema
//! version.
//!
//! # Tables
//!
//! | table | key | value | module |
//! |---|---|---|---|
//! | `meta` | name (`&str`) | `schema_version` (postcard `u32`); `scheduler.core` and the legacy `scheduler` snapshot (the engine's bytes) | `db` (the scheduler keys are written by `runs`) |
//! | `audit` | number from 1 (`u64`) | [`AuditEntry`] | `audit` |
//! | `agents` | agent id (`&str`) | [`AgentRecord`] | `agents` |
//! | `tokens` | join token id (`&str`) | [`TokenRecord`] | `agents` |
//! | `runs` | run number (`u64`) | [`RunRecord`] | `runs` |
//! | `jobs` | (run, index) (`(u64, u32)`) | [`JobRecord`] | `runs` |
//! | `job_outputs` | (run, index) (`(u64, u32)`) | the job's `outputs:` values ([`gantry_protocol::Labels`]) | `runs` |
//! | `run_agent_labels` | run number (`u64`) | labels every agent of the run's jobs must carry ([`gantry_protocol::Labels`]; an untrusted run's) | `runs` |
//! | `job_reports` | (run, index) (`(u64, u32)`) | the job's test report summary ([`gantry_protocol::TestReport`]) | `runs` |
//! | `triggers` | pipeline name (`&str`) | [`TriggerRecord`] | `runs` |
//! | `scheduler_runs` | run number (`u64`) | a run header, as the engine encodes it | `runs` |
//! | `scheduler_jobs` | (run, index) (`(u64, u32)`) | a job, as the engine encodes it | `runs` |
//! | `secrets` | name (`&str`) | the sealed value (bytes) | `secrets` |
//! | `secret_scopes` | name (`&str`) | environment name (`&str`) | `secrets` |
//! | `environments` | name (`&str`) | [`EnvironmentRecord`] | `deployments` |
//! | `deployments` | number (`u64`) | [`DeploymentRecord`] | `deployments` |
//! | `chunks` | digest (32 bytes) | [`ChunkRecord`] (either layout) | `artifacts` |
//! | `manifests` | digest (32 bytes) | the manifest's canonical encoding | `artifacts` |
//! | `artifacts` | (run, name) (`(u64, &str)`) | [`gantry_protocol::ArtifactView`] | `artifacts` |
//! | `caches` | `pipeline \0 branch \0 key` (`&str`) | [`gantry_protocol::CacheView`] | `artifacts` |
//! | `source_trees` | digest (32 bytes) | when it was last stored (millis, `u64`) | `artifacts` |
//! | `login_tokens` | id, `lt-<16 hex>` (`&str`) | [`LoginTokenRecord`] | `web` |
//! | `webhooks` | number (`u64`) | [`WebhookRecord`] | `web` |
//! | `repos` | name (`&str`) | [`RepoRecord`] | `repos` |
//! | `run_repos` | run number (`u64`) | [`RunRepoRecord`] | `repos` |
//! | `repo_hooks` | repository name (`&str`) | [`RepoHookRecord`] | `repos` |
//! | `repo_status` | repository name (`&str`) | [`RepoStatusRecord`] | `repos` |
//! | `repo_status` | repository name (`&str`) | [`RepoStatusRecord`] | `repos` |
//! | `run_agent_labels` | run number (`u64`) | labels every agent of the run's jobs must carry ([`gantry_protocol::Labels`]; an untrusted run's) | `repos` |

use std::path::Path;

use redb::{Database, ReadableTable};

mod agents;
mod artifacts;
mod audit;
mod db;
mod deployments;
mod repos;
mod runs;
mod secrets;
mod web;

pub use agents::{AgentRecord, HelloFacts, Presence, TokenRecord};
pub use artifacts::{ChunkRecord, CommitOutcome, GcRules};
pub use audit::AuditEntry;
pub use db::{Store, StoreError, TokenRefusal};
pub use deployments::{
    DeploymentRecord, EnvironmentConflict, EnvironmentRecord, HostNote, Kind,
    Status as DeploymentStatus,
};
pub use repos::{RepoCredentials, RepoHookRecord, RepoRecord, RepoStatusRecord, RunRepoRecord};
pub use runs::{
    JobChange, JobRecord, JobStatus, RunChange, RunRecord, RunStatus, SchedulerWrite,
    StoredScheduler, TriggerRecord,
};
pub use web::{LoginTokenRecord, WebhookRecord};

use db::{decode, encode, eng, META};

/// Version of the record layouts; bump with a migration when a record changes shape.
const SCHEMA_VERSION: u32 = 1;

impl Store {
    /// Opens (or creates) the store file and checks its schema version.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let store = Self { db };
        let tx = store.db.begin_write().map_err(eng!("begin"))?;
        {
            // Create every table so readers never meet a missing one.
            audit::create_tables(&tx)?;
            agents::create_tables(&tx)?;
            runs::create_tables(&tx)?;
            secrets::create_tables(&tx)?;
            deployments::create_tables(&tx)?;
            artifacts::create_tables(&tx)?;
            web::create_tables(&tx)?;
            repos::create_tables(&tx)?;
            let mut meta = tx.open_table(META).map_err(eng!("open meta"))?;
            let found = match meta.get("schema_version").map_err(eng!("read meta"))? {
                Some(v) => Some(decode::<u32>("meta", "schema_version", v.value())?),
                None => None,
            };
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", encode(&SCHEMA_VERSION)?.as_slice())
                        .map_err(eng!("write meta"))?;
                }
            }
        }
        tx.commit().map_err(eng!("commit"))?;
        Ok(store)
    }
}
