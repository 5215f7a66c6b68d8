//! Runs, jobs, triggers and the scheduler's state (tables `runs`, `jobs`, `job_outputs`,
//! `job_reports`, `triggers`, `scheduler_runs`, `scheduler_jobs`, and the scheduler keys of `meta`).

use std::ops::ControlFlow;

use gantry_protocol::{AgentId, Attempt, JobId, Labels, RunId, TestReport, UnixMillis};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::audit::AuditEntry;
use super::db::{collect, encode, eng, scan_raw, update, Store, StoreError, META};

/// Runs by number (from 1) → [`RunRecord`].
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs");
/// Jobs by (run, index) → [`JobRecord`].
const JOBS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("jobs");
/// Jobs' `outputs:` values by (run, index) → [`Labels`], as the job's last finished
/// attempt reported them. A table of its own rather than a field of [`JobRecord`]
/// (postcard reads fields by position, so a new field would make every stored job
/// unreadable), written in the commit that stores the attempt's result.
const JOB_OUTPUTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("job_outputs");
/// Labels every agent of a run's jobs must carry on top of what each job asks for, by
/// run number → [`Labels`]: an untrusted run's (a fork pull request's jobs go only to
/// agents for untrusted work). Written in the run's own transaction, so no run is ever
/// stored without them; runs without a row have none.
const RUN_AGENT_LABELS: TableDefinition<u64, &[u8]> = TableDefinition::new("run_agent_labels");
/// Jobs' test report summaries by (run, index) → [`gantry_protocol::TestReport`], as the
/// last attempt that sent its report files left them (a table of its own for the same
/// reason as `job_outputs`); written before the attempt's result is reported.
const JOB_REPORTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("job_reports");
/// Pipelines registered for their triggers, by name → [`TriggerRecord`].
const TRIGGERS: TableDefinition<&str, &[u8]> = TableDefinition::new("triggers");
/// The scheduler's state in parts, each written only when it changes: run headers by
/// run, jobs by (run, index), and the small rest under `meta["scheduler.core"]`. The
/// engine encodes them; the store keeps bytes.
const SCHEDULER_RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("scheduler_runs");
const SCHEDULER_JOBS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("scheduler_jobs");
/// Where the whole scheduler snapshot was kept before it was stored in parts; read
/// once after an upgrade, removed by the first write of the parts.
const LEGACY_SCHEDULER_KEY: &str = "scheduler";
const SCHEDULER_CORE_KEY: &str = "scheduler.core";

/// Creates the tables so readers never meet a missing one; called by [`Store::open`].
pub(super) fn create_tables(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(RUNS).map_err(eng!("open runs"))?;
    tx.open_table(JOBS).map_err(eng!("open jobs"))?;
    tx.open_table(JOB_OUTPUTS)
        .map_err(eng!("open job outputs"))?;
    tx.open_table(RUN_AGENT_LABELS)
        .map_err(eng!("open run agent labels"))?;
    tx.open_table(JOB_REPORTS)
        .map_err(eng!("open job reports"))?;
    tx.open_table(TRIGGERS).map_err(eng!("open triggers"))?;
    tx.open_table(SCHEDULER_RUNS)
        .map_err(eng!("open scheduler runs"))?;
    tx.open_table(SCHEDULER_JOBS)
        .map_err(eng!("open scheduler jobs"))?;
    Ok(())
}

/// Defines a stored state: an enum whose on-disk form is its name, exactly as the
/// string field it replaced (postcard writes a string as its length, then its bytes),
/// so records written before the enum read back unchanged and records written now read
/// in older coordinators. A name this coordinator does not know is a corrupt record.
macro_rules! stored_state {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every state, in the order declared (the tests walk them all).
            #[cfg(test)]
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name, as stored and as listings show it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The state with this name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                Self::from_name(&name).ok_or_else(|| {
                    D::Error::custom(format_args!(
                        "unknown {} {name:?}",
                        stringify!($name)
                    ))
                })
            }
        }
    };
}

stored_state! {
    /// A run's state as stored.
    RunStatus {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

stored_state! {
    /// A job's state as stored: the scheduler's state of it, by name.
    JobStatus {
        Pending = "pending",
        /// A manual job (`when: manual`) waiting for `gantry jobs approve`.
        AwaitingApproval = "awaiting-approval",
        Queued = "queued",
        Offered = "offered",
        /// Running, and asked to stop.
        Cancelling = "cancelling",
        Running = "running",
        Succeeded = "succeeded",
        TimedOut = "timed-out",
        /// Its agent went away during the attempt.
        Lost = "lost",
        Failed = "failed",
        Cancelled = "cancelled",
        Skipped = "skipped",
    }
}

impl JobStatus {
    /// Whether this is an attempt on an agent that has not ended: offered to it, running
    /// there, or being cancelled.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            JobStatus::Offered | JobStatus::Running | JobStatus::Cancelling
        )
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::TimedOut
                | JobStatus::Lost
                | JobStatus::Cancelled
                | JobStatus::Skipped
        )
    }

    /// Whether the job failed, however (exit code, timeout, lost agent).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            JobStatus::Failed | JobStatus::TimedOut | JobStatus::Lost
        )
    }
}

gantry_protocol::submitted_run_struct! {
    /// A pipeline run as stored. The pipeline text is kept so a run can be retried, and
    /// so the scheduler can be rebuilt after a restart, from exactly what was submitted.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RunRecord {
        pub run: RunId,
        pub pipeline: String,
        ..submitted,
        pub created_at: UnixMillis,
        pub created_by: String,
        pub state: RunStatus,
        pub finished_at: Option<UnixMillis>,
        /// The uploaded source tree (`sha256:<hex>`), if the run has one.
        pub source: Option<String>,
    }
}

gantry_protocol::job_struct! {
    /// A job as stored: its latest state as the scheduler reported it, with the fields
    /// of the view it is shown as (its state typed), then what only the store keeps.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct JobRecord {
        state: JobStatus,
        /// Chunks the agent reported for the finished attempt; `None` while running.
        pub log_chunks: Option<u64>,
        /// Every attempt handed out and the agent it went to: an agent may upload logs
        /// only for attempts listed here under its own id.
        pub attempts: Vec<(Attempt, AgentId)>,
    }
}

impl JobRecord {
    /// A job as a run is submitted: pending, never attempted.
    pub fn pending(job: JobId, name: String, needs: Vec<String>) -> Self {
        JobRecord {
            job,
            name,
            needs,
            state: JobStatus::Pending,
            attempt: 0,
            agent: None,
            exit_code: None,
            started_at: None,
            finished_at: None,
            log_chunks: None,
            attempts: Vec::new(),
        }
    }
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

impl Store {
    /// Stores a new run with its jobs, numbering it after the last run, in one commit.
    /// `agent_labels`: labels every agent of the run's jobs must carry (see
    /// [`Store::run_agent_labels`]); empty for a trusted run.
    pub fn create_run(
        &self,
        make: impl FnOnce(RunId) -> (RunRecord, Vec<JobRecord>),
        agent_labels: &Labels,
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
            if !agent_labels.is_empty() {
                tx.open_table(RUN_AGENT_LABELS)
                    .map_err(eng!("open run agent labels"))?
                    .insert(next, encode(agent_labels)?.as_slice())
                    .map_err(eng!("write run agent labels"))?;
            }
            let mut entry = audit.clone();
            entry.detail = format!("run={next} {}", entry.detail);
            Self::append_audit(tx, &entry)?;
            Ok((run, jobs))
        })
    }

    /// The labels every agent of `run`'s jobs must carry on top of each job's own: an
    /// untrusted run's; empty for every other run.
    pub fn run_agent_labels(&self, run: RunId) -> Result<Labels, StoreError> {
        Ok(self
            .get(
                RUN_AGENT_LABELS,
                run.0,
                ["open run agent labels", "read run agent labels"],
                "run agent labels",
            )?
            .unwrap_or_default())
    }

    pub fn run(&self, run: RunId) -> Result<Option<RunRecord>, StoreError> {
        self.get(RUNS, run.0, ["open runs", "read run"], "run")
    }

    /// The newest `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(eng!("begin read"))?;
        let runs = tx.open_table(RUNS).map_err(eng!("open runs"))?;
        collect(
            runs.iter().map(|rows| rows.rev().take(limit)),
            "scan runs",
            "run",
        )
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
        collect(
            jobs.range((run.0, 0)..=(run.0, u32::MAX)),
            "scan jobs",
            "job",
        )
    }

    pub fn job(&self, job: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.get(
            JOBS,
            (job.run.0, job.index),
            ["open jobs", "read job"],
            "job",
        )
    }

    /// The outputs a job's last finished attempt reported; empty if none.
    pub fn job_outputs(&self, job: JobId) -> Result<Labels, StoreError> {
        Ok(self
            .get(
                JOB_OUTPUTS,
                (job.run.0, job.index),
                ["open job outputs", "read job outputs"],
                "job outputs",
            )?
            .unwrap_or_default())
    }

    /// The test report summary of a job's last attempt that sent one.
    pub fn job_report(&self, job: JobId) -> Result<Option<TestReport>, StoreError> {
        self.get(
            JOB_REPORTS,
            (job.run.0, job.index),
            ["open job reports", "read job report"],
            "job report",
        )
    }

    /// Stores a job attempt's test report summary (durably, before it returns).
    pub fn put_job_report(&self, job: JobId, report: &TestReport) -> Result<(), StoreError> {
        let bytes = encode(report)?;
        self.write(|tx| {
            tx.open_table(JOB_REPORTS)
                .map_err(eng!("open job reports"))?
                .insert((job.run.0, job.index), bytes.as_slice())
                .map_err(eng!("write job report"))?;
            Ok(())
        })
    }

    /// Applies job and run changes, jobs' reported outputs and the scheduler's changed
    /// parts in one commit (the effects of one batch of scheduler steps). Returns the
    /// changed records.
    pub fn apply(
        &self,
        jobs: &[JobChange],
        outputs: &[(JobId, Labels)],
        runs: &[RunChange],
        scheduler: Option<&SchedulerWrite>,
    ) -> Result<(Vec<JobRecord>, Vec<RunRecord>), StoreError> {
        self.write(|tx| {
            if !outputs.is_empty() {
                let mut table = tx
                    .open_table(JOB_OUTPUTS)
                    .map_err(eng!("open job outputs"))?;
                for (job, values) in outputs {
                    let bytes = encode(values)?;
                    table
                        .insert((job.run.0, job.index), bytes.as_slice())
                        .map_err(eng!("write job outputs"))?;
                }
            }
            let mut changed_jobs = Vec::new();
            let mut changed_runs = Vec::new();
            if let Some(write) = scheduler {
                Self::write_scheduler(tx, write)?;
            }
            let mut table = tx.open_table(JOBS).map_err(eng!("open jobs"))?;
            for (id, change) in jobs {
                let key = (id.run.0, id.index);
                changed_jobs.extend(update(
                    &mut table,
                    key,
                    ["read job", "write job"],
                    "job",
                    change,
                )?);
            }
            drop(table);
            let mut table = tx.open_table(RUNS).map_err(eng!("open runs"))?;
            for (id, change) in runs {
                changed_runs.extend(update(
                    &mut table,
                    id.0,
                    ["read run", "write run"],
                    "run",
                    change,
                )?);
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
            scan_raw(table.iter(), "scan scheduler runs", |_, v| {
                runs.push(v.value().to_vec());
                Ok(ControlFlow::Continue(()))
            })?;
            let table = tx
                .open_table(SCHEDULER_JOBS)
                .map_err(eng!("open scheduler jobs"))?;
            scan_raw(table.iter(), "scan scheduler jobs", |_, v| {
                jobs.push(v.value().to_vec());
                Ok(ControlFlow::Continue(()))
            })?;
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

    pub fn triggers(&self) -> Result<Vec<TriggerRecord>, StoreError> {
        self.all(TRIGGERS, ["open triggers", "scan triggers"], "trigger")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run record as coordinators wrote it while its state was a `String` (postcard:
    /// run 7, pipeline `app`, file `p.yml`, no text, ref `main`, no commit, event
    /// `manual`, no inputs, created at 5 by `t`, state `cancelled`, finished at 6, no
    /// source).
    const RUN_WITH_STRING_STATE: &[u8] =
        b"\x07\x03app\x05p.yml\x00\x04main\x00\x06manual\x00\x05\x01t\x09cancelled\x01\x06\x00";

    /// A job record as coordinators wrote it while its state was a `String`: job 7.2
    /// `build` needing `lint`, state `timed-out`, attempt 3, no agent, no exit code,
    /// started at 1000, finished at 2000, 4 log chunks, no attempts listed.
    const JOB_WITH_STRING_STATE: &[u8] =
        b"\x07\x02\x05build\x01\x04lint\x09timed-out\x03\x00\x00\x01\xe8\x07\x01\xd0\x0f\x01\x04\x00";

    #[test]
    fn records_written_with_string_states_read_back_and_are_written_the_same() {
        let run: RunRecord = postcard::from_bytes(RUN_WITH_STRING_STATE).expect("old run");
        assert_eq!(run.run, RunId(7));
        assert_eq!(run.state, RunStatus::Cancelled);
        assert_eq!(run.finished_at, Some(UnixMillis(6)));
        assert_eq!(encode(&run).expect("encode"), RUN_WITH_STRING_STATE);

        let job: JobRecord = postcard::from_bytes(JOB_WITH_STRING_STATE).expect("old job");
        assert_eq!(
            job.job,
            JobId {
                run: RunId(7),
                index: 2
            }
        );
        assert_eq!(job.state, JobStatus::TimedOut);
        assert_eq!(job.log_chunks, Some(4));
        assert_eq!(encode(&job).expect("encode"), JOB_WITH_STRING_STATE);
    }

    #[test]
    fn every_state_is_stored_as_its_name_and_an_unknown_name_is_refused() {
        for state in JobStatus::ALL {
            let bytes = encode(state).expect("encode");
            assert_eq!(bytes, encode(&state.as_str()).expect("encode name"));
            assert_eq!(postcard::from_bytes::<JobStatus>(&bytes).ok(), Some(*state));
        }
        for state in RunStatus::ALL {
            let bytes = encode(state).expect("encode");
            assert_eq!(bytes, encode(&state.as_str()).expect("encode name"));
            assert_eq!(postcard::from_bytes::<RunStatus>(&bytes).ok(), Some(*state));
        }
        let unknown = encode(&"paused").expect("encode");
        assert!(postcard::from_bytes::<JobStatus>(&unknown).is_err());
        assert!(postcard::from_bytes::<RunStatus>(&unknown).is_err());
    }
}
