//! Looking at runs and acting on them: `gantry pipelines list|show|cancel`, `gantry jobs
//! list|show`, `gantry approve`. A change is audited and durable before the engine
//! hears of it.

use gantry_protocol::{JobId, JobView, RunId, RunView};
use gantry_scheduler::Event;

use crate::base::audit::Acting;
use crate::services::runs::{RunError, Runs, MAX_LIST};
use crate::store::JobStatus;

impl Runs {
    /// The newest `limit` runs (1 to 1,000), with their jobs.
    pub fn list(&self, limit: u32) -> Result<Vec<RunView>, RunError> {
        self.store
            .runs(limit.clamp(1, MAX_LIST) as usize)?
            .into_iter()
            .map(|r| self.run_view(r))
            .collect()
    }

    pub fn show(&self, run: RunId) -> Result<RunView, RunError> {
        self.run_view(self.find_run(run)?)
    }

    /// Asks the engine to cancel a run that has not ended.
    pub fn cancel(&self, cx: &Acting<'_>, run: RunId) -> Result<String, RunError> {
        let record = self.find_run(run)?;
        if record.finished_at.is_some() {
            return Err(RunError::Ended {
                run,
                state: record.state.to_string(),
            });
        }
        self.store
            .audit(&cx.audit("run.cancel", format!("run={run}")))?;
        self.engine.event(Event::CancelRun { run });
        Ok(format!("cancelling run {run}"))
    }

    /// The jobs of one run, or of the newest runs; at most `limit` (1 to 1,000).
    pub fn jobs(&self, run: Option<RunId>, limit: u32) -> Result<Vec<JobView>, RunError> {
        let runs = match run {
            Some(run) => vec![self.find_run(run)?],
            None => self.store.runs(limit.clamp(1, MAX_LIST) as usize)?,
        };
        let mut jobs = Vec::new();
        for r in runs {
            jobs.extend(
                self.store
                    .jobs_of(r.run)?
                    .into_iter()
                    .map(|j| self.job_view(j)),
            );
        }
        jobs.truncate(limit.clamp(1, MAX_LIST) as usize);
        Ok(jobs)
    }

    pub fn job(&self, job: JobId) -> Result<JobView, RunError> {
        Ok(self.job_view(self.find_job(job)?))
    }

    /// The outputs the job's last finished attempt reported.
    pub fn job_outputs(&self, job: JobId) -> Result<gantry_protocol::Labels, RunError> {
        self.find_job(job)?;
        Ok(self.store.job_outputs(job)?)
    }

    /// What the job's test and coverage reports said, if it sent any.
    pub fn job_report(&self, job: JobId) -> Result<Option<gantry_protocol::TestReport>, RunError> {
        self.find_job(job)?;
        Ok(self.store.job_report(job)?)
    }

    /// Lets a manual job (`when: manual`) that waits for approval run.
    pub fn approve(&self, cx: &Acting<'_>, job: JobId) -> Result<String, RunError> {
        let record = self.find_job(job)?;
        if record.state != JobStatus::AwaitingApproval {
            return Err(RunError::NotAwaitingApproval {
                job,
                name: record.name,
                state: record.state.to_string(),
            });
        }
        self.store
            .audit(&cx.audit("job.approve", format!("job={job} name={}", record.name)))?;
        self.engine.event(Event::Approve { job });
        Ok(format!("approved job {job} ({})", record.name))
    }
}
