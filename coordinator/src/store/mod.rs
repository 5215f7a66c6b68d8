//! The durable store: the only module of the coordinator that knows redb.
//!
//! It holds agents, join tokens, revocations (as a field of the agent record) and the
//! audit log, each record postcard-encoded under a typed key. Every method that changes
//! state commits with `Durability::Immediate` before it returns, so a caller may
//! acknowledge what it just stored. Live session facts (last seen, figures) are written
//! in batches by [`Store::record_presence`], because they are not acknowledgements.

use std::path::Path;

use std::collections::{BTreeMap, HashMap, HashSet};

use gantry_protocol::{
    AgentId, ArtifactView, Attempt, CacheView, Digest, EnvRelease, GcReport, HostFigures, JobId,
    Labels, RunId, TokenId, UnixMillis,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs");
const JOBS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("jobs");
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
const TRIGGERS: TableDefinition<&str, &[u8]> = TableDefinition::new("triggers");
/// Chunk index: digest bytes → [`ChunkRecord`]. A chunk is stored only if it is here.
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
/// Manifests by digest bytes: their canonical encoding.
const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("manifests");
/// Artifacts by (run, name) → [`ArtifactView`].
const ARTIFACTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("artifacts");
/// Caches by `pipeline \0 branch \0 key` → [`CacheView`].
const CACHES: TableDefinition<&str, &[u8]> = TableDefinition::new("caches");
/// The environment a secret is scoped to, by secret name (absent: any job may use it).
const SECRET_SCOPES: TableDefinition<&str, &str> = TableDefinition::new("secret_scopes");
/// Environments by name → [`EnvironmentRecord`].
const ENVIRONMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("environments");
/// Deployments by id → [`DeploymentRecord`].
const DEPLOYMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("deployments");
/// The scheduler's state in parts, each written only when it changes: run headers by
/// run, jobs by (run, index), and the small rest under `meta["scheduler.core"]`. The
/// engine encodes them; the store keeps bytes.
const SCHEDULER_RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("scheduler_runs");
const SCHEDULER_JOBS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("scheduler_jobs");
/// Where the whole scheduler snapshot was kept before it was stored in parts; read
/// once after an upgrade, removed by the first write of the parts.
const LEGACY_SCHEDULER_KEY: &str = "scheduler";
const SCHEDULER_CORE_KEY: &str = "scheduler.core";

/// Version of the record layouts below; bump with a migration when a record changes shape.
const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("store schema version {found} is newer than this coordinator understands ({supported}); upgrade gantry")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("store {op} failed: {detail}")]
    Engine { op: &'static str, detail: String },
    #[error("corrupt {what} record {key}: {detail}")]
    Corrupt {
        what: &'static str,
        key: String,
        detail: String,
    },
    #[error("no agent {0}")]
    UnknownAgent(AgentId),
    #[error(transparent)]
    Token(#[from] TokenRefusal),
}

/// Why a join token cannot be used. Each case is reported to the enrolling agent as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("join token {0} is unknown to this coordinator (never created, or wrong secret)")]
    Unknown(TokenId),
    #[error("join token {id} expired at {expired_at_ms} (unix ms); create a new one with `gantry token create`")]
    Expired { id: TokenId, expired_at_ms: u64 },
    #[error("join token {id} has been used {uses} times, all it allows; create a new one with `gantry token create`")]
    UsedUp { id: TokenId, uses: u32 },
}

fn engine(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
    move |e| StoreError::Engine {
        op,
        detail: e.to_string(),
    }
}

macro_rules! eng {
    ($op:literal) => {
        |e| engine($op)(&e)
    };
}

mod web;
pub use web::{LoginTokenRecord, WebhookRecord};

/// An enrolled agent as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub hostname: String,
    /// Labels the agent reports about itself (os, arch, hostname, its config).
    pub reported_labels: Labels,
    /// Labels from its join token and from `gantry agents label`; these win over reported ones.
    pub assigned_labels: Labels,
    pub capabilities: Vec<String>,
    pub slots: u32,
    pub agent_version: String,
    pub enrolled_at: UnixMillis,
    pub enrolled_with: TokenId,
    pub last_seen: Option<UnixMillis>,
    pub last_address: Option<String>,
    pub figures: Option<HostFigures>,
    pub certificate_serial: String,
    pub certificate_not_after: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

impl AgentRecord {
    /// Reported labels overlaid with assigned ones.
    pub fn effective_labels(&self) -> Labels {
        let mut labels = self.reported_labels.clone();
        labels.extend(
            self.assigned_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        labels
    }
}

/// A join token as stored: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    pub secret_sha256: Vec<u8>,
    pub created_at: UnixMillis,
    pub created_by: String,
    pub expires_at: UnixMillis,
    pub uses_allowed: u32,
    pub uses: u32,
    pub labels: Labels,
}

impl TokenRecord {
    /// Whether the token may enroll one more agent at `now`.
    pub fn check(&self, now: UnixMillis) -> Result<(), TokenRefusal> {
        if now >= self.expires_at {
            return Err(TokenRefusal::Expired {
                id: self.id.clone(),
                expired_at_ms: self.expires_at.0,
            });
        }
        if self.uses >= self.uses_allowed {
            return Err(TokenRefusal::UsedUp {
                id: self.id.clone(),
                uses: self.uses,
            });
        }
        Ok(())
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: UnixMillis,
    /// Identity URI of who did it (`gantry://admin/ops`, `gantry://agent/ag-…`).
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// A pipeline run as stored. The pipeline text is kept so a run can be retried, and so
/// the scheduler can be rebuilt after a restart, from exactly what was submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: RunId,
    pub pipeline: String,
    pub file_name: String,
    pub text: String,
    pub git_ref: String,
    pub commit: Option<String>,
    pub event: String,
    pub inputs: Labels,
    pub created_at: UnixMillis,
    pub created_by: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub finished_at: Option<UnixMillis>,
    /// The uploaded source tree (`sha256:<hex>`), if the run has one.
    pub source: Option<String>,
}

/// A job as stored: its latest state as the scheduler reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: JobId,
    pub name: String,
    pub needs: Vec<String>,
    pub state: String,
    pub attempt: Attempt,
    pub agent: Option<AgentId>,
    pub exit_code: Option<i32>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// Chunks the agent reported for the finished attempt; `None` while running.
    pub log_chunks: Option<u64>,
    /// Every attempt handed out and the agent it went to: an agent may upload logs only
    /// for attempts listed here under its own id.
    pub attempts: Vec<(Attempt, AgentId)>,
}

/// A pipeline registered for its push and schedule triggers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRecord {
    pub name: String,
    pub file_name: String,
    pub text: String,
    pub added_by: String,
    pub added_at: UnixMillis,
    /// Schedules are checked for firings after this time (unix seconds).
    pub schedule_checked_until: u64,
}

/// A change to one job record.
pub type JobChange = (JobId, Box<dyn Fn(&mut JobRecord) + Send>);

/// What the engine writes of the scheduler's state with a batch: the encoded parts that
/// changed (`None`: delete; a deleted run takes all its jobs with it).
#[derive(Debug, Default)]
pub struct SchedulerWrite {
    pub core: Vec<u8>,
    pub runs: Vec<(RunId, Option<Vec<u8>>)>,
    pub jobs: Vec<(JobId, Option<Vec<u8>>)>,
}

/// The scheduler's state as stored.
#[derive(Debug)]
pub enum StoredScheduler {
    /// Nothing stored yet.
    None,
    /// One whole snapshot, as coordinators before the parts stored it.
    Legacy(Vec<u8>),
    /// The parts: core, run headers, jobs (encoded).
    Parts {
        core: Vec<u8>,
        runs: Vec<Vec<u8>>,
        jobs: Vec<Vec<u8>>,
    },
}
/// A change to one run record.
pub type RunChange = (RunId, Box<dyn Fn(&mut RunRecord) + Send>);

/// Presence facts of a connected agent, flushed in batches.
#[derive(Debug, Clone)]
pub struct Presence {
    pub agent_id: AgentId,
    pub last_seen: UnixMillis,
    pub address: String,
    pub figures: Option<HostFigures>,
    pub hello: Option<HelloFacts>,
}

/// What an agent said about itself in its hello.
#[derive(Debug, Clone)]
pub struct HelloFacts {
    pub hostname: String,
    pub labels: Labels,
    pub capabilities: Vec<String>,
    pub slots: u32,
    pub agent_version: String,
}

/// Counts for `gantry status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub agents: u64,
    pub revoked: u64,
    pub tokens_active: u64,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|e| StoreError::Engine {
        op: "encode",
        detail: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(
    what: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        what,
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

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
            tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
            tx.open_table(AUDIT).map_err(eng!("open audit"))?;
            tx.open_table(RUNS).map_err(eng!("open runs"))?;
            tx.open_table(JOBS).map_err(eng!("open jobs"))?;
            tx.open_table(SECRETS).map_err(eng!("open secrets"))?;
            tx.open_table(TRIGGERS).map_err(eng!("open triggers"))?;
            tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            tx.open_table(MANIFESTS).map_err(eng!("open manifests"))?;
            tx.open_table(ARTIFACTS).map_err(eng!("open artifacts"))?;
            tx.open_table(CACHES).map_err(eng!("open caches"))?;
            tx.open_table(SECRET_SCOPES)
                .map_err(eng!("open secret scopes"))?;
            tx.open_table(ENVIRONMENTS)
                .map_err(eng!("open environments"))?;
            tx.open_table(DEPLOYMENTS)
                .map_err(eng!("open deployments"))?;
            tx.open_table(SCHEDULER_RUNS)
                .map_err(eng!("open scheduler runs"))?;
            tx.open_table(SCHEDULER_JOBS)
                .map_err(eng!("open scheduler jobs"))?;
            web::create_tables(&tx)?;
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

    fn write<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_write().map_err(eng!("begin"))?;
        let out = f(&tx)?;
        tx.commit().map_err(eng!("commit"))?;
        Ok(out)
    }

    fn append_audit(tx: &redb::WriteTransaction, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut audit = tx.open_table(AUDIT).map_err(eng!("open audit"))?;
        let next = audit
            .last()
            .map_err(eng!("read audit"))?
            .map_or(1, |(k, _)| k.value() + 1);
        audit
            .insert(next, encode(entry)?.as_slice())
            .map_err(eng!("write audit"))?;
        Ok(())
    }

    /// Appends an audit entry on its own.
    pub fn audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.write(|tx| Self::append_audit(tx, entry))
    }

    /// Stores a new token and its audit entry.
    pub fn create_token(&self, token: &TokenRecord, audit: &AuditEntry) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut tokens = tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
            tokens
                .insert(token.id.as_str(), encode(token)?.as_slice())
                .map_err(eng!("write token"))?;
            drop(tokens);
            Self::append_audit(tx, audit)
        })
    }

    /// Atomically checks the token (`secret_ok` tells whether the presented secret matched
    /// its hash), spends one use, and stores the new agent. The agent record is built by
    /// `make_agent` from the token, so token labels reach the agent in the same commit.
    pub fn enroll(
        &self,
        token_id: &TokenId,
        secret_ok: impl FnOnce(&TokenRecord) -> bool,
        now: UnixMillis,
        make_agent: impl FnOnce(
            &TokenRecord,
            &dyn Fn(&AgentId) -> bool,
        ) -> Result<AgentRecord, StoreError>,
    ) -> Result<AgentRecord, StoreError> {
        self.write(|tx| {
            let mut tokens = tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
            let mut token: TokenRecord =
                match tokens.get(token_id.as_str()).map_err(eng!("read token"))? {
                    Some(v) => decode("token", token_id.as_str(), v.value())?,
                    None => return Err(TokenRefusal::Unknown(token_id.clone()).into()),
                };
            if !secret_ok(&token) {
                return Err(TokenRefusal::Unknown(token_id.clone()).into());
            }
            token.check(now)?;
            token.uses += 1;
            tokens
                .insert(token_id.as_str(), encode(&token)?.as_slice())
                .map_err(eng!("write token"))?;
            drop(tokens);
            let mut agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            let id_in_use = |id: &AgentId| agents.get(id.as_str()).map_or(true, |v| v.is_some());
            let agent = make_agent(&token, &id_in_use)?;
            agents
                .insert(agent.id.as_str(), encode(&agent)?.as_slice())
                .map_err(eng!("write agent"))?;
            drop(agents);
            Self::append_audit(
                tx,
                &AuditEntry {
                    at: now,
                    actor: format!("gantry://agent/{}", agent.id),
                    action: "agent.enroll".into(),
                    detail: format!(
                        "hostname={} token={} certificate_serial={}",
                        agent.hostname, token_id, agent.certificate_serial
                    ),
                },
            )?;
            Ok(agent)
        })
    }

    /// A join token, read without taking the write lock.
    pub fn token(&self, id: &TokenId) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let tokens = tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
        match tokens.get(id.as_str()).map_err(eng!("read token"))? {
            Some(v) => Ok(Some(decode("token", id.as_str(), v.value())?)),
            None => Ok(None),
        }
    }

    pub fn agent(&self, id: &AgentId) -> Result<Option<AgentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
        match agents.get(id.as_str()).map_err(eng!("read agent"))? {
            Some(v) => Ok(Some(decode("agent", id.as_str(), v.value())?)),
            None => Ok(None),
        }
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
        let mut out = Vec::new();
        for item in agents.iter().map_err(eng!("scan agents"))? {
            let (k, v) = item.map_err(eng!("scan agents"))?;
            out.push(decode("agent", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Applies `change` to one agent and records `audit`, in one commit.
    pub fn update_agent(
        &self,
        id: &AgentId,
        audit: Option<&AuditEntry>,
        change: impl FnOnce(&mut AgentRecord),
    ) -> Result<AgentRecord, StoreError> {
        self.write(|tx| {
            let mut agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            let mut record: AgentRecord =
                match agents.get(id.as_str()).map_err(eng!("read agent"))? {
                    Some(v) => decode("agent", id.as_str(), v.value())?,
                    None => return Err(StoreError::UnknownAgent(id.clone())),
                };
            change(&mut record);
            agents
                .insert(id.as_str(), encode(&record)?.as_slice())
                .map_err(eng!("write agent"))?;
            drop(agents);
            if let Some(entry) = audit {
                Self::append_audit(tx, entry)?;
            }
            Ok(record)
        })
    }

    /// Writes a batch of presence facts in one commit. Unknown agents are skipped.
    pub fn record_presence(&self, batch: &[Presence]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut agents = tx.open_table(AGENTS).map_err(eng!("open agents"))?;
            for p in batch {
                let mut record: AgentRecord = match agents
                    .get(p.agent_id.as_str())
                    .map_err(eng!("read agent"))?
                {
                    Some(v) => decode("agent", p.agent_id.as_str(), v.value())?,
                    None => continue,
                };
                record.last_seen = Some(p.last_seen);
                record.last_address = Some(p.address.clone());
                if let Some(f) = &p.figures {
                    record.figures = Some(f.clone());
                }
                if let Some(h) = &p.hello {
                    record.hostname.clone_from(&h.hostname);
                    record.reported_labels.clone_from(&h.labels);
                    record.capabilities.clone_from(&h.capabilities);
                    record.slots = h.slots;
                    record.agent_version.clone_from(&h.agent_version);
                }
                agents
                    .insert(p.agent_id.as_str(), encode(&record)?.as_slice())
                    .map_err(eng!("write agent"))?;
            }
            Ok(())
        })
    }

    /// Identities of every revoked agent, to load into the TLS verifier at start.
    pub fn revoked_agents(&self) -> Result<Vec<AgentId>, StoreError> {
        Ok(self
            .agents()?
            .into_iter()
            .filter(|a| a.revoked_at.is_some())
            .map(|a| a.id)
            .collect())
    }

    pub fn counts(&self, now: UnixMillis) -> Result<Counts, StoreError> {
        let agents = self.agents()?;
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let tokens = tx.open_table(TOKENS).map_err(eng!("open tokens"))?;
        let mut tokens_active = 0;
        for item in tokens.iter().map_err(eng!("scan tokens"))? {
            let (k, v) = item.map_err(eng!("scan tokens"))?;
            let token: TokenRecord = decode("token", k.value(), v.value())?;
            if token.check(now).is_ok() {
                tokens_active += 1;
            }
        }
        Ok(Counts {
            agents: agents.len() as u64,
            revoked: agents.iter().filter(|a| a.revoked_at.is_some()).count() as u64,
            tokens_active,
        })
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let audit = tx.open_table(AUDIT).map_err(eng!("open audit"))?;
        let total = audit.len().map_err(eng!("count audit"))?;
        let mut out = Vec::new();
        for item in audit.iter().map_err(eng!("scan audit"))?.rev().take(limit) {
            let (k, v) = item.map_err(eng!("scan audit"))?;
            out.push(decode("audit", &k.value().to_string(), v.value())?);
        }
        out.reverse();
        debug_assert!(out.len() as u64 <= total);
        Ok(out)
    }
}

impl Store {
    /// Stores a new run with its jobs, numbering it after the last run, in one commit.
    pub fn create_run(
        &self,
        make: impl FnOnce(RunId) -> (RunRecord, Vec<JobRecord>),
        audit: &AuditEntry,
    ) -> Result<(RunRecord, Vec<JobRecord>), StoreError> {
        self.write(|tx| {
            let mut runs = tx.open_table(RUNS).map_err(eng!("open runs"))?;
            let next = runs
                .last()
                .map_err(eng!("read runs"))?
                .map_or(1, |(k, _)| k.value() + 1);
            let (run, jobs) = make(RunId(next));
            runs.insert(next, encode(&run)?.as_slice())
                .map_err(eng!("write run"))?;
            drop(runs);
            let mut table = tx.open_table(JOBS).map_err(eng!("open jobs"))?;
            for job in &jobs {
                table
                    .insert((job.job.run.0, job.job.index), encode(job)?.as_slice())
                    .map_err(eng!("write job"))?;
            }
            drop(table);
            let mut entry = audit.clone();
            entry.detail = format!("run={next} {}", entry.detail);
            Self::append_audit(tx, &entry)?;
            Ok((run, jobs))
        })
    }

    pub fn run(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let runs = tx.open_table(RUNS).map_err(eng!("open runs"))?;
        match runs.get(run.0).map_err(eng!("read run"))? {
            Some(v) => Ok(Some(decode("run", &run.to_string(), v.value())?)),
            None => Ok(None),
        }
    }

    /// The newest `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let runs = tx.open_table(RUNS).map_err(eng!("open runs"))?;
        let mut out = Vec::new();
        for item in runs.iter().map_err(eng!("scan runs"))?.rev().take(limit) {
            let (k, v) = item.map_err(eng!("scan runs"))?;
            out.push(decode("run", &k.value().to_string(), v.value())?);
        }
        Ok(out)
    }

    /// Runs that have not ended, oldest first (to rebuild the scheduler after a restart).
    pub fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let mut runs = self.runs(usize::MAX)?;
        runs.retain(|r| r.finished_at.is_none());
        runs.reverse();
        Ok(runs)
    }

    pub fn jobs_of(&self, run: RunId) -> Result<Vec<JobRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let jobs = tx.open_table(JOBS).map_err(eng!("open jobs"))?;
        let mut out = Vec::new();
        for item in jobs
            .range((run.0, 0)..=(run.0, u32::MAX))
            .map_err(eng!("scan jobs"))?
        {
            let (k, v) = item.map_err(eng!("scan jobs"))?;
            let (r, i) = k.value();
            out.push(decode("job", &format!("{r}.{i}"), v.value())?);
        }
        Ok(out)
    }

    pub fn job(&self, job: JobId) -> Result<Option<JobRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let jobs = tx.open_table(JOBS).map_err(eng!("open jobs"))?;
        match jobs.get((job.run.0, job.index)).map_err(eng!("read job"))? {
            Some(v) => Ok(Some(decode("job", &job.to_string(), v.value())?)),
            None => Ok(None),
        }
    }

    /// Applies job and run changes and the scheduler's changed parts in one commit (the
    /// effects of one batch of scheduler steps). Returns the changed records.
    pub fn apply(
        &self,
        jobs: &[JobChange],
        runs: &[RunChange],
        scheduler: Option<&SchedulerWrite>,
    ) -> Result<(Vec<JobRecord>, Vec<RunRecord>), StoreError> {
        self.write(|tx| {
            let mut changed_jobs = Vec::new();
            let mut changed_runs = Vec::new();
            if let Some(write) = scheduler {
                Self::write_scheduler(tx, write)?;
            }
            let mut table = tx.open_table(JOBS).map_err(eng!("open jobs"))?;
            for (id, change) in jobs {
                let key = (id.run.0, id.index);
                let mut record: JobRecord = match table.get(key).map_err(eng!("read job"))? {
                    Some(v) => decode("job", &id.to_string(), v.value())?,
                    None => continue,
                };
                change(&mut record);
                table
                    .insert(key, encode(&record)?.as_slice())
                    .map_err(eng!("write job"))?;
                changed_jobs.push(record);
            }
            drop(table);
            let mut table = tx.open_table(RUNS).map_err(eng!("open runs"))?;
            for (id, change) in runs {
                let mut record: RunRecord = match table.get(id.0).map_err(eng!("read run"))? {
                    Some(v) => decode("run", &id.to_string(), v.value())?,
                    None => continue,
                };
                change(&mut record);
                table
                    .insert(id.0, encode(&record)?.as_slice())
                    .map_err(eng!("write run"))?;
                changed_runs.push(record);
            }
            Ok((changed_jobs, changed_runs))
        })
    }

    fn write_scheduler(
        tx: &redb::WriteTransaction,
        write: &SchedulerWrite,
    ) -> Result<(), StoreError> {
        let mut meta = tx.open_table(META).map_err(eng!("open meta"))?;
        meta.insert(SCHEDULER_CORE_KEY, write.core.as_slice())
            .map_err(eng!("write scheduler core"))?;
        meta.remove(LEGACY_SCHEDULER_KEY)
            .map_err(eng!("remove the legacy scheduler snapshot"))?;
        drop(meta);
        let mut runs = tx
            .open_table(SCHEDULER_RUNS)
            .map_err(eng!("open scheduler runs"))?;
        let mut jobs = tx
            .open_table(SCHEDULER_JOBS)
            .map_err(eng!("open scheduler jobs"))?;
        for (run, bytes) in &write.runs {
            if let Some(b) = bytes {
                runs.insert(run.0, b.as_slice())
                    .map_err(eng!("write scheduler run"))?;
            } else {
                runs.remove(run.0).map_err(eng!("remove scheduler run"))?;
                jobs.retain_in((run.0, 0)..=(run.0, u32::MAX), |_, _| false)
                    .map_err(eng!("remove scheduler jobs"))?;
            }
        }
        for (job, bytes) in &write.jobs {
            let key = (job.run.0, job.index);
            if let Some(b) = bytes {
                jobs.insert(key, b.as_slice())
                    .map_err(eng!("write scheduler job"))?;
            } else {
                jobs.remove(key).map_err(eng!("remove scheduler job"))?;
            }
        }
        Ok(())
    }

    /// The scheduler's state as the last [`Self::apply`] left it.
    pub fn scheduler_state(&self) -> Result<StoredScheduler, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let meta = tx.open_table(META).map_err(eng!("open meta"))?;
        if let Some(core) = meta
            .get(SCHEDULER_CORE_KEY)
            .map_err(eng!("read scheduler core"))?
        {
            let core = core.value().to_vec();
            let mut runs = Vec::new();
            let mut jobs = Vec::new();
            let table = tx
                .open_table(SCHEDULER_RUNS)
                .map_err(eng!("open scheduler runs"))?;
            for item in table.iter().map_err(eng!("scan scheduler runs"))? {
                runs.push(
                    item.map_err(eng!("scan scheduler runs"))?
                        .1
                        .value()
                        .to_vec(),
                );
            }
            let table = tx
                .open_table(SCHEDULER_JOBS)
                .map_err(eng!("open scheduler jobs"))?;
            for item in table.iter().map_err(eng!("scan scheduler jobs"))? {
                jobs.push(
                    item.map_err(eng!("scan scheduler jobs"))?
                        .1
                        .value()
                        .to_vec(),
                );
            }
            return Ok(StoredScheduler::Parts { core, runs, jobs });
        }
        Ok(
            match meta
                .get(LEGACY_SCHEDULER_KEY)
                .map_err(eng!("read scheduler snapshot"))?
            {
                Some(v) => StoredScheduler::Legacy(v.value().to_vec()),
                None => StoredScheduler::None,
            },
        )
    }

    /// Registers (or replaces) a trigger and records the audit entry.
    pub fn put_trigger(
        &self,
        trigger: &TriggerRecord,
        audit: Option<&AuditEntry>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(TRIGGERS).map_err(eng!("open triggers"))?;
            table
                .insert(trigger.name.as_str(), encode(trigger)?.as_slice())
                .map_err(eng!("write trigger"))?;
            drop(table);
            match audit {
                Some(a) => Self::append_audit(tx, a),
                None => Ok(()),
            }
        })
    }

    /// Removes a trigger; `false` if there was none.
    pub fn remove_trigger(&self, name: &str, audit: &AuditEntry) -> Result<bool, StoreError> {
        self.remove_named(TRIGGERS, name, audit)
    }

    /// Removes the entry `name` of a table keyed by name, with its audit entry (only
    /// when something was removed); `false` if there was none.
    fn remove_named(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(table).map_err(eng!("open table"))?;
            let existed = t.remove(name).map_err(eng!("remove"))?.is_some();
            drop(t);
            if existed {
                Self::append_audit(tx, audit)?;
            }
            Ok(existed)
        })
    }

    pub fn triggers(&self) -> Result<Vec<TriggerRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(TRIGGERS).map_err(eng!("open triggers"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(eng!("scan triggers"))? {
            let (k, v) = item.map_err(eng!("scan triggers"))?;
            out.push(decode("trigger", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Stores an encrypted secret (the caller encrypts), the environment it is scoped
    /// to (if any), and its audit entry.
    pub fn put_secret(
        &self,
        name: &str,
        sealed: &[u8],
        environment: Option<&str>,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(SECRETS).map_err(eng!("open secrets"))?;
            table.insert(name, sealed).map_err(eng!("write secret"))?;
            drop(table);
            let mut scopes = tx
                .open_table(SECRET_SCOPES)
                .map_err(eng!("open secret scopes"))?;
            match environment {
                Some(env) => {
                    scopes
                        .insert(name, env)
                        .map_err(eng!("write secret scope"))?;
                }
                None => {
                    scopes.remove(name).map_err(eng!("write secret scope"))?;
                }
            }
            drop(scopes);
            Self::append_audit(tx, audit)
        })
    }

    /// Removes a secret; `false` if there was none.
    pub fn remove_secret(&self, name: &str, audit: &AuditEntry) -> Result<bool, StoreError> {
        self.write(|tx| {
            tx.open_table(SECRET_SCOPES)
                .map_err(eng!("open secret scopes"))?
                .remove(name)
                .map_err(eng!("remove secret scope"))?;
            Ok(())
        })?;
        self.remove_named(SECRETS, name, audit)
    }

    /// The environment each scoped secret belongs to.
    pub fn secret_scopes(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx
            .open_table(SECRET_SCOPES)
            .map_err(eng!("open secret scopes"))?;
        let mut out = BTreeMap::new();
        for item in table.iter().map_err(eng!("scan secret scopes"))? {
            let (k, v) = item.map_err(eng!("scan secret scopes"))?;
            out.insert(k.value().to_owned(), v.value().to_owned());
        }
        Ok(out)
    }

    /// Creates an environment (or replaces one, with `replace`), with its audit entry.
    /// Refuses to create one that exists unless replacing, and to replace one that does
    /// not; the epoch and history of a replaced environment are kept.
    pub fn put_environment(
        &self,
        mut record: EnvironmentRecord,
        replace: bool,
        audit: &AuditEntry,
    ) -> Result<Result<EnvironmentRecord, String>, StoreError> {
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
                (Some(_), false) => {
                    return Ok(Err(format!(
                        "environment {} exists; change it with `gantry env update`",
                        record.name
                    )))
                }
                (None, true) => {
                    return Ok(Err(format!(
                        "no environment {}; create it with `gantry env create`",
                        record.name
                    )))
                }
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
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx
            .open_table(ENVIRONMENTS)
            .map_err(eng!("open environments"))?;
        match table.get(name).map_err(eng!("read environment"))? {
            Some(v) => Ok(Some(decode("environment", name, v.value())?)),
            None => Ok(None),
        }
    }

    pub fn environments(&self) -> Result<Vec<EnvironmentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx
            .open_table(ENVIRONMENTS)
            .map_err(eng!("open environments"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(eng!("scan environments"))? {
            let (k, v) = item.map_err(eng!("scan environments"))?;
            out.push(decode("environment", k.value(), v.value())?);
        }
        Ok(out)
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
        let mut env: EnvironmentRecord =
            match envs.get(environment).map_err(eng!("read environment"))? {
                Some(v) => decode("environment", environment, v.value())?,
                None => {
                    return Err(StoreError::Engine {
                        op: "create deployment",
                        detail: format!("no environment {environment}"),
                    })
                }
            };
        env.epoch += 1;
        envs.insert(environment, encode(&env)?.as_slice())
            .map_err(eng!("write environment"))?;
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
                let env: Option<EnvironmentRecord> = match envs
                    .get(record.environment.as_str())
                    .map_err(eng!("read environment"))?
                {
                    Some(v) => Some(decode("environment", &record.environment, v.value())?),
                    None => None,
                };
                if let Some(mut env) = env {
                    env.current = Some(release.clone());
                    env.history.insert(0, release.clone());
                    env.history.truncate(crate::deployments::ENV_HISTORY);
                    envs.insert(record.environment.as_str(), encode(&env)?.as_slice())
                        .map_err(eng!("write environment"))?;
                }
            }
            Ok(())
        })
    }

    pub fn deployment(&self, id: u64) -> Result<Option<DeploymentRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx
            .open_table(DEPLOYMENTS)
            .map_err(eng!("open deployments"))?;
        match table.get(id).map_err(eng!("read deployment"))? {
            Some(v) => Ok(Some(decode("deployment", &id.to_string(), v.value())?)),
            None => Ok(None),
        }
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
        for item in table.iter().map_err(eng!("scan deployments"))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(eng!("scan deployments"))?;
            let record: DeploymentRecord = decode("deployment", &k.value().to_string(), v.value())?;
            if !unfinished || record.finished_at.is_none() {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Records one audit entry on its own (for changes stored elsewhere).
    pub fn append_audit_entry(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.write(|tx| Self::append_audit(tx, entry))
    }

    /// Every secret, sealed, by name.
    pub fn secrets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(SECRETS).map_err(eng!("open secrets"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(eng!("scan secrets"))? {
            let (k, v) = item.map_err(eng!("scan secrets"))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }
}

/// An environment as stored (its view without the live host list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentRecord {
    pub name: String,
    pub select: Labels,
    pub approvals: u32,
    pub wait_ms: u64,
    pub branches: Vec<String>,
    pub epoch: u64,
    pub current: Option<EnvRelease>,
    pub history: Vec<EnvRelease>,
    pub created_by: String,
    pub created_at: UnixMillis,
}

/// A deployment as stored, engine state included, so it resumes after a restart.
pub type DeploymentRecord = crate::deployments::DeploymentRecord;

/// A stored chunk: its uncompressed size, where its compressed bytes are (pack, offset,
/// length), when it was written (garbage collection leaves young unreferenced chunks
/// alone) and the checksum of its stored bytes ([`crate::base::chunks::stored_check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub size: u32,
    pub stored_bytes: u32,
    pub pack: u64,
    pub offset: u64,
    pub written_at: UnixMillis,
    /// `None` for a chunk indexed before checksums were kept: it is verified in full
    /// each time it is served.
    pub check: Option<u64>,
}

/// [`ChunkRecord`] as coordinators before the checksum stored it: the same fields, one
/// fewer at the end. Read, never written.
#[derive(Deserialize)]
struct ChunkRecordWithoutCheck {
    size: u32,
    stored_bytes: u32,
    pack: u64,
    offset: u64,
    written_at: UnixMillis,
}

/// Decodes a chunk record of either layout.
fn decode_chunk_record(key: &str, bytes: &[u8]) -> Result<ChunkRecord, StoreError> {
    if let Ok(record) = postcard::from_bytes::<ChunkRecord>(bytes) {
        return Ok(record);
    }
    let old: ChunkRecordWithoutCheck = decode("chunk", key, bytes)?;
    Ok(ChunkRecord {
        size: old.size,
        stored_bytes: old.stored_bytes,
        pack: old.pack,
        offset: old.offset,
        written_at: old.written_at,
        check: None,
    })
}

/// What a commit of an artifact or cache came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Stored,
    /// These chunks of the manifest are not stored (never sent, or collected since).
    Missing(Vec<Digest>),
    /// A cache with this key exists in this scope already.
    CacheExists,
}

/// Retention rules for one garbage collection.
#[derive(Debug, Clone, Copy)]
pub struct GcRules {
    pub now: UnixMillis,
    /// Unreferenced chunks younger than this stay (uploads whose session was lost).
    pub grace_ms: u64,
    /// Caches are evicted, least recently used first, until they total this much.
    pub cache_quota_bytes: u64,
    /// Caches unused this long are evicted.
    pub cache_max_idle_ms: u64,
    pub dry_run: bool,
}

/// A cache's key in the table: scope and key, separated by NUL (which none may contain).
fn cache_key(pipeline: &str, branch: &str, key: &str) -> String {
    format!("{pipeline}\0{branch}\0{key}")
}

impl Store {
    /// Which of `digests` the index lacks, in the order given, each once.
    pub fn missing_chunks(&self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
        let mut seen = HashSet::with_capacity(digests.len());
        let mut missing = Vec::new();
        for digest in digests {
            if seen.insert(*digest)
                && chunks
                    .get(digest.as_bytes().as_slice())
                    .map_err(eng!("read chunk"))?
                    .is_none()
            {
                missing.push(*digest);
            }
        }
        Ok(missing)
    }

    /// Records chunks whose files are durable, in one commit.
    pub fn add_chunks(&self, rows: &[(Digest, ChunkRecord)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            for (digest, record) in rows {
                chunks
                    .insert(digest.as_bytes().as_slice(), encode(record)?.as_slice())
                    .map_err(eng!("write chunk"))?;
            }
            Ok(())
        })
    }

    /// The chunks among `digests` the index lacks, inside a write transaction.
    fn absent(tx: &redb::WriteTransaction, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        let chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
        let mut missing = Vec::new();
        let mut seen = HashSet::with_capacity(digests.len());
        for digest in digests {
            if seen.insert(*digest)
                && chunks
                    .get(digest.as_bytes().as_slice())
                    .map_err(eng!("read chunk"))?
                    .is_none()
            {
                missing.push(*digest);
            }
        }
        Ok(missing)
    }

    /// Stores an artifact and its manifest if every chunk it names is stored, replacing
    /// an artifact of the same name in the run (a retried job uploads again). One commit,
    /// so garbage collection sees either the artifact with all its chunks or neither.
    pub fn commit_artifact(
        &self,
        view: &ArtifactView,
        manifest: &[u8],
        chunks: &[Digest],
    ) -> Result<CommitOutcome, StoreError> {
        self.write(|tx| {
            let missing = Self::absent(tx, chunks)?;
            if !missing.is_empty() {
                return Ok(CommitOutcome::Missing(missing));
            }
            tx.open_table(MANIFESTS)
                .map_err(eng!("open manifests"))?
                .insert(view.manifest.as_bytes().as_slice(), manifest)
                .map_err(eng!("write manifest"))?;
            tx.open_table(ARTIFACTS)
                .map_err(eng!("open artifacts"))?
                .insert((view.run.0, view.name.as_str()), encode(view)?.as_slice())
                .map_err(eng!("write artifact"))?;
            Ok(CommitOutcome::Stored)
        })
    }

    /// Stores a cache and its manifest if every chunk is stored and no cache of that key
    /// exists in its scope (caches never change once written).
    pub fn commit_cache(
        &self,
        view: &CacheView,
        manifest: &[u8],
        chunks: &[Digest],
    ) -> Result<CommitOutcome, StoreError> {
        self.write(|tx| {
            let name = cache_key(&view.pipeline, &view.branch, &view.key);
            let mut caches = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            if caches
                .get(name.as_str())
                .map_err(eng!("read cache"))?
                .is_some()
            {
                return Ok(CommitOutcome::CacheExists);
            }
            let missing = Self::absent(tx, chunks)?;
            if !missing.is_empty() {
                return Ok(CommitOutcome::Missing(missing));
            }
            caches
                .insert(name.as_str(), encode(view)?.as_slice())
                .map_err(eng!("write cache"))?;
            drop(caches);
            tx.open_table(MANIFESTS)
                .map_err(eng!("open manifests"))?
                .insert(view.manifest.as_bytes().as_slice(), manifest)
                .map_err(eng!("write manifest"))?;
            Ok(CommitOutcome::Stored)
        })
    }

    /// The artifacts of a run, by name.
    pub fn artifacts_of(&self, run: RunId) -> Result<Vec<ArtifactView>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(ARTIFACTS).map_err(eng!("open artifacts"))?;
        let mut out = Vec::new();
        for item in table
            .range((run.0, "")..(run.0 + 1, ""))
            .map_err(eng!("scan artifacts"))?
        {
            let (k, v) = item.map_err(eng!("scan artifacts"))?;
            let (r, name) = k.value();
            out.push(decode("artifact", &format!("{r}/{name}"), v.value())?);
        }
        Ok(out)
    }

    /// A manifest's canonical bytes.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(MANIFESTS).map_err(eng!("open manifests"))?;
        Ok(table
            .get(digest.as_bytes().as_slice())
            .map_err(eng!("read manifest"))?
            .map(|v| v.value().to_vec()))
    }

    /// Every cache, newest first.
    pub fn caches(&self) -> Result<Vec<CacheView>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let table = tx.open_table(CACHES).map_err(eng!("open caches"))?;
        let mut out: Vec<CacheView> = Vec::new();
        for item in table.iter().map_err(eng!("scan caches"))? {
            let (k, v) = item.map_err(eng!("scan caches"))?;
            out.push(decode("cache", &k.value().replace('\0', "/"), v.value())?);
        }
        out.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.key.cmp(&b.key))
        });
        Ok(out)
    }

    /// Records that a cache was restored now (eviction is least recently used first).
    pub fn touch_cache(&self, cache: &CacheView, now: UnixMillis) -> Result<(), StoreError> {
        self.write(|tx| {
            let name = cache_key(&cache.pipeline, &cache.branch, &cache.key);
            let mut table = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            let current: Option<CacheView> =
                match table.get(name.as_str()).map_err(eng!("read cache"))? {
                    Some(v) => Some(decode("cache", &cache.key, v.value())?),
                    None => None,
                };
            if let Some(mut current) = current {
                current.last_used = now;
                table
                    .insert(name.as_str(), encode(&current)?.as_slice())
                    .map_err(eng!("write cache"))?;
            }
            Ok(())
        })
    }

    /// Removes the caches `remove` selects (with an audit entry when any went); returns
    /// them.
    pub fn remove_caches(
        &self,
        remove: impl Fn(&CacheView) -> bool,
        audit: &AuditEntry,
    ) -> Result<Vec<CacheView>, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            let mut gone = Vec::new();
            for item in table.iter().map_err(eng!("scan caches"))? {
                let (k, v) = item.map_err(eng!("scan caches"))?;
                let view: CacheView = decode("cache", k.value(), v.value())?;
                if remove(&view) {
                    gone.push(view);
                }
            }
            for view in &gone {
                table
                    .remove(cache_key(&view.pipeline, &view.branch, &view.key).as_str())
                    .map_err(eng!("remove cache"))?;
            }
            drop(table);
            if !gone.is_empty() {
                let mut entry = audit.clone();
                entry.detail = format!("{} removed={}", entry.detail, gone.len());
                Self::append_audit(tx, &entry)?;
            }
            Ok(gone)
        })
    }

    /// One garbage collection of the index, in one commit: expires artifacts, evicts
    /// caches (idle ones, then least recently used beyond the quota), drops manifests
    /// nothing references, and removes index rows of chunks no remaining manifest names,
    /// unless `protected` holds them (open uploads) or they are younger than the grace.
    /// Returns the report and the chunks whose files the caller must delete.
    pub fn collect_garbage(
        &self,
        rules: GcRules,
        protected: &HashSet<Digest>,
    ) -> Result<(GcReport, Vec<Digest>), StoreError> {
        let tx = self.db.begin_write().map_err(eng!("begin"))?;
        let mut report = GcReport {
            dry_run: rules.dry_run,
            ..GcReport::default()
        };
        let mut doomed = Vec::new();
        {
            let mut artifacts = tx.open_table(ARTIFACTS).map_err(eng!("open artifacts"))?;
            let mut roots: HashSet<Digest> = HashSet::new();
            let mut expired: Vec<(u64, String)> = Vec::new();
            for item in artifacts.iter().map_err(eng!("scan artifacts"))? {
                let (k, v) = item.map_err(eng!("scan artifacts"))?;
                let (run, name) = k.value();
                let view: ArtifactView = decode("artifact", name, v.value())?;
                if view.expires_at <= rules.now {
                    expired.push((run, name.to_owned()));
                } else {
                    roots.insert(view.manifest);
                }
            }
            report.artifacts_expired = expired.len() as u64;
            for (run, name) in &expired {
                artifacts
                    .remove((*run, name.as_str()))
                    .map_err(eng!("remove artifact"))?;
            }
            drop(artifacts);

            let mut caches = tx.open_table(CACHES).map_err(eng!("open caches"))?;
            let mut all: Vec<CacheView> = Vec::new();
            for item in caches.iter().map_err(eng!("scan caches"))? {
                let (k, v) = item.map_err(eng!("scan caches"))?;
                all.push(decode("cache", k.value(), v.value())?);
            }
            all.sort_by_key(|c| std::cmp::Reverse(c.last_used));
            let mut total: u64 = 0;
            for view in all {
                let idle = rules.now.millis_since(view.last_used) >= rules.cache_max_idle_ms;
                if idle || total.saturating_add(view.bytes) > rules.cache_quota_bytes {
                    report.caches_evicted += 1;
                    caches
                        .remove(cache_key(&view.pipeline, &view.branch, &view.key).as_str())
                        .map_err(eng!("remove cache"))?;
                } else {
                    total += view.bytes;
                    roots.insert(view.manifest);
                }
            }
            drop(caches);

            // Releases environments ran (a rollback may stage one on a new host) and
            // releases of deployments under way stay, whatever their artifact's expiry.
            let envs = tx
                .open_table(ENVIRONMENTS)
                .map_err(eng!("open environments"))?;
            for item in envs.iter().map_err(eng!("scan environments"))? {
                let (k, v) = item.map_err(eng!("scan environments"))?;
                let env: EnvironmentRecord = decode("environment", k.value(), v.value())?;
                roots.extend(env.history.iter().map(|r| r.release.manifest));
                roots.extend(env.current.iter().map(|r| r.release.manifest));
            }
            drop(envs);
            let deployments = tx
                .open_table(DEPLOYMENTS)
                .map_err(eng!("open deployments"))?;
            for item in deployments.iter().map_err(eng!("scan deployments"))? {
                let (k, v) = item.map_err(eng!("scan deployments"))?;
                let record: DeploymentRecord =
                    decode("deployment", &k.value().to_string(), v.value())?;
                if !record.is_ended() {
                    roots.insert(record.release.manifest);
                }
            }
            drop(deployments);

            let mut manifests = tx.open_table(MANIFESTS).map_err(eng!("open manifests"))?;
            let mut referenced: HashSet<Digest> = HashSet::new();
            let mut unused: Vec<Vec<u8>> = Vec::new();
            for item in manifests.iter().map_err(eng!("scan manifests"))? {
                let (k, v) = item.map_err(eng!("scan manifests"))?;
                let key = k.value();
                let digest = <[u8; 32]>::try_from(key)
                    .map(Digest::from_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        what: "manifest",
                        key: format!("{} bytes", key.len()),
                        detail: "key is not a 32-byte digest".into(),
                    })?;
                if !roots.contains(&digest) {
                    unused.push(key.to_vec());
                    continue;
                }
                let manifest =
                    gantry_cas::Manifest::decode(v.value()).map_err(|e| StoreError::Corrupt {
                        what: "manifest",
                        key: digest.to_string(),
                        detail: e.to_string(),
                    })?;
                for entry in &manifest.entries {
                    if let gantry_cas::EntryKind::File { chunks, .. } = &entry.kind {
                        referenced.extend(chunks.iter().map(|c| c.digest));
                    }
                }
            }
            for key in &unused {
                manifests
                    .remove(key.as_slice())
                    .map_err(eng!("remove manifest"))?;
            }
            drop(manifests);

            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            let mut sizes: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            for item in chunks.iter().map_err(eng!("scan chunks"))? {
                let (k, v) = item.map_err(eng!("scan chunks"))?;
                let key = k.value();
                let record = decode_chunk_record("index", v.value())?;
                let Ok(bytes) = <[u8; 32]>::try_from(key) else {
                    continue;
                };
                let digest = Digest::from_bytes(bytes);
                if referenced.contains(&digest) {
                    report.chunks_kept += 1;
                    report.bytes_kept += u64::from(record.stored_bytes);
                } else if protected.contains(&digest)
                    || rules.now.millis_since(record.written_at) < rules.grace_ms
                {
                    report.chunks_protected += 1;
                    report.bytes_kept += u64::from(record.stored_bytes);
                } else {
                    sizes.insert(key.to_vec(), u64::from(record.stored_bytes));
                    doomed.push(digest);
                }
            }
            report.chunks_deleted = doomed.len() as u64;
            report.bytes_freed = sizes.values().sum();
            for key in sizes.keys() {
                chunks
                    .remove(key.as_slice())
                    .map_err(eng!("remove chunk"))?;
            }
        }
        if rules.dry_run {
            tx.abort().map_err(eng!("abort"))?;
            doomed.clear();
        } else {
            tx.commit().map_err(eng!("commit"))?;
        }
        Ok((report, doomed))
    }

    /// Where a chunk is, if stored.
    pub fn chunk(&self, digest: &Digest) -> Result<Option<ChunkRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
        match chunks
            .get(digest.as_bytes().as_slice())
            .map_err(eng!("read chunk"))?
        {
            Some(v) => Ok(Some(decode_chunk_record(&digest.to_string(), v.value())?)),
            None => Ok(None),
        }
    }

    /// Live bytes per pack, and the chunks of the packs in `detail` (for compaction).
    #[allow(clippy::type_complexity)] // a one-off pair of maps read in one transaction
    pub fn pack_usage(
        &self,
        detail: &HashSet<u64>,
    ) -> Result<(HashMap<u64, u64>, HashMap<u64, Vec<(Digest, ChunkRecord)>>), StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut rows: HashMap<u64, Vec<(Digest, ChunkRecord)>> = HashMap::new();
        for item in chunks.iter().map_err(eng!("scan chunks"))? {
            let (k, v) = item.map_err(eng!("scan chunks"))?;
            let record = decode_chunk_record("index", v.value())?;
            *live.entry(record.pack).or_default() += u64::from(record.stored_bytes);
            if detail.contains(&record.pack) {
                if let Ok(bytes) = <[u8; 32]>::try_from(k.value()) {
                    rows.entry(record.pack)
                        .or_default()
                        .push((Digest::from_bytes(bytes), record));
                }
            }
        }
        Ok((live, rows))
    }

    /// Points chunks at their new places (after compaction), in one commit; a chunk
    /// whose row changed meanwhile is left alone.
    pub fn relocate_chunks(
        &self,
        moves: &[(Digest, ChunkRecord, ChunkRecord)],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            for (digest, from, to) in moves {
                let current: Option<ChunkRecord> = match chunks
                    .get(digest.as_bytes().as_slice())
                    .map_err(eng!("read chunk"))?
                {
                    Some(v) => Some(decode_chunk_record(&digest.to_string(), v.value())?),
                    None => None,
                };
                if current.as_ref() == Some(from) {
                    chunks
                        .insert(digest.as_bytes().as_slice(), encode(to)?.as_slice())
                        .map_err(eng!("write chunk"))?;
                }
            }
            Ok(())
        })
    }

    /// Drops chunks from the index (found missing or corrupt on disk), so the next upload
    /// of their content stores them again.
    pub fn forget_chunks(&self, digests: &[Digest]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
            for digest in digests {
                chunks
                    .remove(digest.as_bytes().as_slice())
                    .map_err(eng!("remove chunk"))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(now: UnixMillis, uses_allowed: u32) -> TokenRecord {
        TokenRecord {
            id: TokenId::parse("tk-0123456789abcdef").expect("id"),
            secret_sha256: vec![1; 32],
            created_at: now,
            created_by: "test".into(),
            expires_at: now.plus_secs(60),
            uses_allowed,
            uses: 0,
            labels: Labels::from([("site".to_owned(), "paris".to_owned())]),
        }
    }

    fn audit(action: &str) -> AuditEntry {
        AuditEntry {
            at: UnixMillis(1),
            actor: "gantry://admin/t".into(),
            action: action.into(),
            detail: String::new(),
        }
    }

    fn agent_from(token: &TokenRecord, n: u8) -> AgentRecord {
        AgentRecord {
            id: AgentId::from_random(&[n; 6]),
            hostname: format!("host{n}"),
            reported_labels: Labels::new(),
            assigned_labels: token.labels.clone(),
            capabilities: vec![],
            slots: 1,
            agent_version: "t".into(),
            enrolled_at: UnixMillis(1),
            enrolled_with: token.id.clone(),
            last_seen: None,
            last_address: None,
            figures: None,
            certificate_serial: "01".into(),
            certificate_not_after: UnixMillis(2),
            revoked_at: None,
        }
    }

    #[test]
    fn enrollment_spends_uses_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let now = UnixMillis(1_000_000);
        let t = token(now, 1);
        {
            let store = Store::open(&path).expect("open");
            store
                .create_token(&t, &audit("token.create"))
                .expect("create");
            let a = store
                .enroll(&t.id, |_| true, now, |tok, _| Ok(agent_from(tok, 1)))
                .expect("enroll");
            assert_eq!(a.assigned_labels["site"], "paris");
            let err = store
                .enroll(&t.id, |_| true, now, |tok, _| Ok(agent_from(tok, 2)))
                .expect_err("used up");
            assert!(
                matches!(err, StoreError::Token(TokenRefusal::UsedUp { uses: 1, .. })),
                "{err}"
            );
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.agents().expect("agents").len(),
            1,
            "the refused enrollment stored nothing"
        );
        let actions: Vec<String> = store
            .audit_tail(10)
            .expect("audit")
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(actions, vec!["token.create", "agent.enroll"]);
    }

    #[test]
    fn expired_unknown_and_wrong_secret_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("open");
        let now = UnixMillis(1_000_000);
        let t = token(now, 5);
        store
            .create_token(&t, &audit("token.create"))
            .expect("create");
        let later = now.plus_secs(61);
        let err = store
            .enroll(&t.id, |_| true, later, |tok, _| Ok(agent_from(tok, 1)))
            .expect_err("expired");
        assert!(
            matches!(err, StoreError::Token(TokenRefusal::Expired { .. })),
            "{err}"
        );
        let err = store
            .enroll(&t.id, |_| false, now, |tok, _| Ok(agent_from(tok, 1)))
            .expect_err("wrong secret");
        assert!(
            matches!(err, StoreError::Token(TokenRefusal::Unknown(_))),
            "{err}"
        );
        let other = TokenId::parse("tk-ffffffffffffffff").expect("id");
        let err = store
            .enroll(&other, |_| true, now, |tok, _| Ok(agent_from(tok, 1)))
            .expect_err("unknown");
        assert!(
            matches!(err, StoreError::Token(TokenRefusal::Unknown(_))),
            "{err}"
        );
        assert!(store.agents().expect("agents").is_empty());
        assert_eq!(store.counts(now).expect("counts").tokens_active, 1);
    }

    #[test]
    fn chunk_records_written_before_checksums_read_back_without_one() {
        #[derive(Serialize)]
        struct Old {
            size: u32,
            stored_bytes: u32,
            pack: u64,
            offset: u64,
            written_at: UnixMillis,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("open");
        let (old_digest, new_digest) = (Digest::of(b"old"), Digest::of(b"new"));
        let old = Old {
            size: 3,
            stored_bytes: 12,
            pack: 0xabc,
            offset: 4096,
            written_at: UnixMillis(5),
        };
        store
            .write(|tx| {
                let mut chunks = tx.open_table(CHUNKS).map_err(eng!("open chunks"))?;
                chunks
                    .insert(old_digest.as_bytes().as_slice(), encode(&old)?.as_slice())
                    .map_err(eng!("write chunk"))?;
                Ok(())
            })
            .expect("write an old record");
        let new = ChunkRecord {
            size: 3,
            stored_bytes: 12,
            pack: 0xabc,
            offset: 8192,
            written_at: UnixMillis(6),
            check: Some(u64::MAX),
        };
        store.add_chunks(&[(new_digest, new)]).expect("add");
        assert_eq!(
            store.chunk(&old_digest).expect("read"),
            Some(ChunkRecord {
                size: 3,
                stored_bytes: 12,
                pack: 0xabc,
                offset: 4096,
                written_at: UnixMillis(5),
                check: None,
            })
        );
        assert_eq!(store.chunk(&new_digest).expect("read"), Some(new));
        let (_, rows) = store
            .pack_usage(&HashSet::from([0xabc]))
            .expect("pack usage");
        assert_eq!(rows[&0xabc].len(), 2);
    }
}
