//! Which work an agent holds: the one rule by which an agent may touch a job attempt or
//! a deployment's release (DESIGN: "an agent can only touch what belongs to the work
//! leased to it"). The session (job messages), the log and source streams, and the
//! artifact streams all ask here; the authorization table then decides with the answer
//! (`Principal::agent(holds)`).
//!
//! Two strengths, because two kinds of request need them:
//! - [`Hold::Handed`]: the attempt was handed to the agent at some point. Its log, its
//!   acceptance and its result may arrive after the attempt ended (from the agent's
//!   spool, after a reconnect), so having been handed it is enough.
//! - [`Hold::Running`]: the attempt is the job's current one, on this agent, and still
//!   live (offered, running or cancelling). Artifacts and caches are read and written
//!   only by a job that runs.

use gantry_protocol::{AgentId, Attempt, Digest, JobId};

use crate::store::{JobRecord, Store, StoreError};

/// How an agent must hold an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// It was handed the attempt (it may since have ended).
    Handed,
    /// The attempt is the job's current one on this agent, and live.
    Running,
}

/// The answer for an attempt: the job as stored, and why the agent does not hold it.
#[derive(Debug)]
pub struct Held {
    pub record: Option<JobRecord>,
    /// `None`: it holds it.
    pub refusal: Option<String>,
}

/// Whether `agent` holds attempt `attempt` of `job` as `hold` asks.
pub fn attempt(
    store: &Store,
    agent: &AgentId,
    job: JobId,
    attempt: Attempt,
    hold: Hold,
) -> Result<Held, StoreError> {
    let record = store.job(job)?;
    let refusal = match (&record, hold) {
        (None, _) => Some(format!("no job {job}")),
        (Some(r), Hold::Handed) => (!was_handed(r, agent, attempt))
            .then(|| format!("attempt {attempt} of job {job} was not handed to {agent}")),
        (Some(r), Hold::Running) => {
            let running = r.attempt == attempt
                && r.agent.as_ref() == Some(agent)
                && was_handed(r, agent, attempt)
                && r.state.is_live();
            (!running).then(|| {
                format!(
                    "attempt {attempt} of job {job} is not running on {agent} (it is {} attempt {} there)",
                    r.state, r.attempt
                )
            })
        }
    };
    Ok(Held { record, refusal })
}

/// [`attempt`] as the authorization table takes it: whether the agent holds it, and if
/// not, why. A store that cannot be read holds nothing.
pub fn attempt_or_why(
    store: &Store,
    agent: &AgentId,
    job: JobId,
    attempt_no: Attempt,
    hold: Hold,
) -> (bool, String) {
    match attempt(store, agent, job, attempt_no, hold) {
        Ok(Held { refusal: None, .. }) => (true, String::new()),
        Ok(Held {
            refusal: Some(why), ..
        }) => (false, why),
        Err(e) => (false, format!("cannot read job {job}: {e}")),
    }
}

fn was_handed(record: &JobRecord, agent: &AgentId, attempt: Attempt) -> bool {
    record
        .attempts
        .iter()
        .any(|(a, who)| *a == attempt && who == agent)
}

/// What a deploy grant names besides the deployment: the epoch it was issued in and the
/// release manifest it reads.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    pub epoch: u64,
    pub manifest: &'a Digest,
}

/// Why `agent` does not hold `deployment` (`None`: it does): it must be one of its
/// targets; with a `release`, the deployment must also still run, in that epoch, with
/// that release.
pub fn deployment(
    store: &Store,
    agent: &AgentId,
    deployment: u64,
    release: Option<Release<'_>>,
) -> Result<Option<String>, StoreError> {
    let record = store.deployment(deployment)?;
    Ok(match (&record, release) {
        (None, _) => Some(format!("no deployment {deployment}")),
        (Some(r), Some(rel)) if r.epoch != rel.epoch => Some(format!(
            "deployment {deployment} has epoch {}, not {}",
            r.epoch, rel.epoch
        )),
        (Some(r), Some(_)) if r.is_ended() => Some(format!("deployment {deployment} has ended")),
        (Some(r), _) if !r.hosts.contains_key(agent) => Some(format!(
            "{agent} is not a target of deployment {deployment}"
        )),
        (Some(r), Some(rel)) if r.release.manifest != *rel.manifest => Some(format!(
            "manifest {} is not deployment {deployment}'s release",
            rel.manifest
        )),
        (Some(_), _) => None,
    })
}
