//! The scheduler state machine. It owns runs, jobs, agents' capacity and the queue.
//! It must not read a clock, do I/O, spawn tasks or use randomness: the same events at
//! the same `now` values always give the same commands, which is what lets the property
//! tests and the simulation replay any failure exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use gantry_protocol::{AgentId, Attempt, JobId, Labels, RunId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::types::{
    Command, Event, FailReason, JobPlan, JobState, Outcome, PlanError, RunState,
    LEASE_DURATION_SECS, OFFER_TIMEOUT_SECS, TIMEOUT_GRACE_SECS,
};

/// Deterministic job scheduler: `handle(now, event) -> commands`.
///
/// Every call runs the same four steps: apply the event, expire offers, leases and
/// timeouts that are due at `now`, move pending jobs whose ancestors are all terminal
/// (evaluating their conditions), then dispatch queued jobs to free matching agents.
///
/// With 10,000 agents most events are heartbeats, so no step may cost a pass over every
/// agent: deadlines and free agents are kept in ordered indexes (`deadlines`, `free`),
/// and dispatch runs only when something that can make a queued job fit has happened
/// (`dispatch_due`). `check_invariants` checks the indexes against the states.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    runs: BTreeMap<RunId, RunEntry>,
    agents: BTreeMap<AgentId, AgentEntry>,
    /// Queued jobs: priority, then pipeline, then FIFO key (run submission number, job).
    queue: BTreeMap<i32, BTreeMap<String, BTreeSet<(u64, JobId)>>>,
    /// Per priority, the pipeline served last; the next dispatch starts after it.
    rr_cursor: BTreeMap<i32, String>,
    /// Submission counter: orders runs FIFO independently of their ids.
    next_seq: u64,
    /// Runs in which some job became terminal during the current `handle` call.
    dirty: BTreeSet<RunId>,
    /// Agents that can take work now (a live session, not draining, a free slot), most
    /// free slots first, then by id: dispatch's order of preference.
    free: BTreeSet<(Reverse<usize>, AgentId)>,
    /// Offered and running jobs by the time they need attention without an event
    /// (offer expiry, lease expiry, timeout backstop).
    deadlines: BTreeSet<(UnixMillis, JobId)>,
    /// Something happened that may let a queued job fit a free agent (a job queued, a
    /// slot freed, an agent connected). After `dispatch` no queued job fits any free
    /// agent, so without such a change there is nothing to look for.
    dispatch_due: bool,
    /// Run headers and jobs changed since the shell last took them (`take_changes`),
    /// so it can persist what changed instead of everything.
    unsaved_runs: BTreeSet<RunId>,
    unsaved_jobs: BTreeSet<JobId>,
}

/// A run: its header, saved on its own, then its jobs (postcard writes the header's
/// fields in line, so a whole snapshot reads as when they were listed here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunEntry {
    header: RunSnapshot,
    jobs: BTreeMap<u32, JobEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JobEntry {
    plan: JobPlan,
    state: JobState,
    /// The latest attempt number handed out; 0 before the first dispatch.
    attempt: Attempt,
    /// Re-runs spent on failures (bounded by `plan.retry`).
    failures: u32,
    /// Re-runs spent on lost leases and rejections (bounded by `plan.infra_retries`).
    losses: u32,
    /// Indices of all transitive needs, ascending.
    ancestors: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AgentEntry {
    labels: Labels,
    slots: u32,
    /// Live sessions. Usually 0 or 1, but a reconnecting agent's new session can start
    /// before the old one's end is reported (the shell reports each from its own task),
    /// so a flag would let that late end mark a live agent disconnected for good.
    sessions: u32,
    /// Jobs offered to or running on this agent: they use its slots.
    held: BTreeSet<JobId>,
    /// The agent is about to restart into another binary: no new work until its next
    /// session starts.
    draining: bool,
    /// Its free slots as listed in `Scheduler::free` (0: not listed).
    #[serde(skip)]
    listed_free: usize,
}

impl AgentEntry {
    /// An agent with these labels and slots, no session, no held jobs, not draining.
    fn new(labels: Labels, slots: u32) -> Self {
        AgentEntry {
            labels,
            slots,
            sessions: 0,
            held: BTreeSet::new(),
            draining: false,
            listed_free: 0,
        }
    }
}

/// Everything the scheduler knows, in a form that serializes with any serde format
/// (maps keyed by structs are flattened to lists). Restore it with `Scheduler::restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    runs: Vec<RunEntry>,
    agents: Vec<(AgentId, Labels, u32)>,
    /// Last, in line (postcard), as when its two fields were listed here.
    core: CoreSnapshot,
}

/// The part of the state that is neither a run nor a job: small, saved with every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreSnapshot {
    rr_cursor: Vec<(i32, String)>,
    next_seq: u64,
}

/// A run without its jobs, as saved on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    id: RunId,
    pipeline: String,
    priority: i32,
    seq: u64,
    state: RunState,
    cancel_requested: bool,
}

impl RunSnapshot {
    pub fn run(&self) -> RunId {
        self.id
    }
}

/// One job of a run, as saved on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSnapshot(JobEntry);

impl JobSnapshot {
    pub fn job(&self) -> JobId {
        self.0.plan.id
    }
}

/// What changed since the shell last asked ([`Scheduler::take_changes`]): the shell
/// stores these and, after a restart, rebuilds the state with [`Snapshot::from_parts`]
/// from everything it stored. Lease renewals are left out on purpose (as they are from
/// `Command::JobChanged`): `restore` renews every lease anyway.
#[derive(Debug, Clone, PartialEq)]
pub struct Changes {
    pub core: CoreSnapshot,
    /// Run headers to write; `None`: the run was forgotten, delete it and all its jobs.
    pub runs: Vec<(RunId, Option<RunSnapshot>)>,
    /// Jobs to write; `None`: delete (their run was forgotten).
    pub jobs: Vec<(JobId, Option<JobSnapshot>)>,
}

impl Changes {
    /// Nothing but the core, which changes only along with a run or a job.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.jobs.is_empty()
    }
}

impl Snapshot {
    /// The snapshot the stored parts add up to. It names no agent that holds nothing:
    /// after a restart every agent is disconnected until it says hello again, with its
    /// labels and slots, so nothing else about an idle agent is worth storing.
    pub fn from_parts(core: CoreSnapshot, runs: Vec<RunSnapshot>, jobs: Vec<JobSnapshot>) -> Self {
        let mut entries: BTreeMap<RunId, RunEntry> = runs
            .into_iter()
            .map(|r| {
                (
                    r.id,
                    RunEntry {
                        header: r,
                        jobs: BTreeMap::new(),
                    },
                )
            })
            .collect();
        for JobSnapshot(job) in jobs {
            if let Some(run) = entries.get_mut(&job.plan.id.run) {
                run.jobs.insert(job.plan.id.index, job);
            }
        }
        Self {
            runs: entries.into_values().collect(),
            agents: Vec::new(),
            core,
        }
    }
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event at time `now` and returns what the shell must do, in order.
    pub fn handle(&mut self, now: UnixMillis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::RunSubmitted {
                run,
                pipeline,
                priority,
                jobs,
            } => self.submit(run, pipeline, priority, jobs, &mut out),
            Event::AgentConnected {
                agent,
                labels,
                slots,
                running,
            } => self.agent_connected(now, &agent, labels, slots, &running, &mut out),
            Event::AgentDisconnected { agent } => {
                if let Some(entry) = self.agents.get_mut(&agent) {
                    entry.sessions = entry.sessions.saturating_sub(1);
                }
                self.relist(&agent);
            }
            Event::AgentHeartbeat { agent } => self.renew_leases(now, &agent),
            Event::AgentDraining { agent, draining } => {
                if let Some(entry) = self.agents.get_mut(&agent) {
                    entry.draining = draining;
                }
                self.relist(&agent);
            }
            Event::JobAccepted {
                job,
                attempt,
                agent,
            } => self.accepted(now, job, attempt, agent, &mut out),
            Event::JobRejected {
                job,
                attempt,
                agent,
                reason,
            } => {
                if matches!(self.job_state(job), Some(JobState::Offered { agent: a, attempt: n, .. }) if *a == agent && *n == attempt)
                {
                    self.infra_retry_or(job, FailReason::Rejected(reason), &mut out);
                }
            }
            Event::JobFinished {
                job,
                attempt,
                agent,
                outcome,
            } => self.finished(job, attempt, &agent, outcome, &mut out),
            Event::ConditionResolved { job, condition } => {
                if let Some(entry) = self.job_mut(job) {
                    if entry.state == JobState::Pending {
                        entry.plan.condition = condition;
                        self.unsaved_jobs.insert(job);
                    }
                }
            }
            Event::CancelRun { run } => self.cancel_run(run, &mut out),
            Event::CancelJob { job } => {
                if self.job_state(job).is_some_and(|s| !s.is_terminal()) {
                    self.cancel_job(job, &mut out);
                }
            }
            Event::Approve { job } => {
                if self.job_state(job) == Some(&JobState::AwaitingApproval) {
                    self.set_state(job, JobState::Queued, &mut out);
                }
            }
            Event::Tick => {}
        }
        self.expire(now, &mut out);
        self.settle(&mut out);
        self.dispatch(now, &mut out);
        out
    }

    /// The earliest time at which something will happen without an event (an offer or a
    /// lease runs out, a timeout backstop fires). The shell sends `Event::Tick` then.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    pub fn run_state(&self, run: RunId) -> Option<RunState> {
        self.runs.get(&run).map(|r| r.header.state)
    }

    pub fn job_state(&self, job: JobId) -> Option<&JobState> {
        self.job(job).map(|entry| &entry.state)
    }

    /// The latest attempt number handed out for a job (0 if never dispatched).
    pub fn job_attempt(&self, job: JobId) -> Option<Attempt> {
        self.job(job).map(|entry| entry.attempt)
    }

    /// The plan a job was submitted with.
    pub fn job_plan(&self, job: JobId) -> Option<&JobPlan> {
        self.job(job).map(|entry| &entry.plan)
    }

    /// A run's jobs in index order with their states; empty for an unknown run.
    pub fn jobs_of(&self, run: RunId) -> Vec<(JobId, &JobState)> {
        self.runs
            .get(&run)
            .map(|r| r.jobs.values().map(|j| (j.plan.id, &j.state)).collect())
            .unwrap_or_default()
    }

    /// All known runs, in id order.
    pub fn runs(&self) -> impl Iterator<Item = (RunId, RunState)> + '_ {
        self.runs.values().map(|r| (r.header.id, r.header.state))
    }

    /// How many jobs are `Queued`.
    pub fn queue_len(&self) -> usize {
        self.queue
            .values()
            .flat_map(BTreeMap::values)
            .map(BTreeSet::len)
            .sum()
    }

    /// An agent's used and total slots, if the agent is known.
    pub fn agent_load(&self, agent: &AgentId) -> Option<(usize, u32)> {
        self.agents.get(agent).map(|a| (a.held.len(), a.slots))
    }

    /// Whether new work may go to the agent (it has a live session), if it is known.
    pub fn agent_is_connected(&self, agent: &AgentId) -> Option<bool> {
        self.agents.get(agent).map(|a| a.sessions > 0)
    }

    /// Drops a terminal run (after the coordinator has persisted it) so memory stays
    /// bounded. Returns false, and keeps the run, if it is unknown or not terminal.
    pub fn forget_run(&mut self, run: RunId) -> bool {
        if self
            .runs
            .get(&run)
            .is_some_and(|r| r.header.state.is_terminal())
        {
            self.runs.remove(&run);
            self.unsaved_runs.insert(run);
            true
        } else {
            false
        }
    }

    /// The state to persist. Indexes (queue, agents' held jobs) are derived again on
    /// restore, so a snapshot cannot hold an inconsistent index.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            runs: self.runs.values().cloned().collect(),
            agents: self
                .agents
                .iter()
                .map(|(id, a)| (id.clone(), a.labels.clone(), a.slots))
                .collect(),
            core: self.core(),
        }
    }

    /// The part of the state that is neither a run nor a job.
    fn core(&self) -> CoreSnapshot {
        CoreSnapshot {
            rr_cursor: self
                .rr_cursor
                .iter()
                .map(|(p, s)| (*p, s.clone()))
                .collect(),
            next_seq: self.next_seq,
        }
    }

    /// What changed since the last call, for the shell to store (see [`Changes`]).
    pub fn take_changes(&mut self) -> Changes {
        let runs = std::mem::take(&mut self.unsaved_runs)
            .into_iter()
            .map(|id| {
                let header = self.runs.get(&id).map(|r| r.header.clone());
                (id, header)
            })
            .collect();
        let jobs = std::mem::take(&mut self.unsaved_jobs)
            .into_iter()
            .map(|id| (id, self.job(id).cloned().map(JobSnapshot)))
            .collect();
        Changes {
            core: self.core(),
            runs,
            jobs,
        }
    }

    /// The shell could not store `changes`: they are taken again next time.
    pub fn keep_unsaved(&mut self, changes: &Changes) {
        self.unsaved_runs
            .extend(changes.runs.iter().map(|(id, _)| *id));
        self.unsaved_jobs
            .extend(changes.jobs.iter().map(|(id, _)| *id));
    }

    /// Marks everything unsaved, so the next `take_changes` holds the whole state (after
    /// a restore from an older form of storage).
    pub fn mark_all_unsaved(&mut self) {
        for run in self.runs.values() {
            self.unsaved_runs.insert(run.header.id);
            self.unsaved_jobs
                .extend(run.jobs.values().map(|j| j.plan.id));
        }
    }

    /// Rebuilds the scheduler after a coordinator restart at time `now`. Every agent
    /// starts disconnected (its session died with the old process), and every lease and
    /// offer is extended to at least a full period from `now`: the time the coordinator
    /// was down is not the agents' fault. Agents then reconnect and report what they
    /// still run, as after any blip. The timeout backstop is not extended: a job that
    /// ran past its timeout plus grace during the outage is over either way.
    pub fn restore(snapshot: Snapshot, now: UnixMillis) -> Self {
        let mut scheduler = Self {
            next_seq: snapshot.core.next_seq,
            rr_cursor: snapshot.core.rr_cursor.into_iter().collect(),
            ..Self::default()
        };
        for (id, labels, slots) in snapshot.agents {
            scheduler.agents.insert(id, AgentEntry::new(labels, slots));
        }
        for mut run in snapshot.runs {
            for job in run.jobs.values_mut() {
                match &mut job.state {
                    JobState::Offered {
                        offer_expires_at, ..
                    } => {
                        *offer_expires_at =
                            (*offer_expires_at).max(now.plus_secs(OFFER_TIMEOUT_SECS));
                    }
                    JobState::Running {
                        lease_expires_at, ..
                    } => {
                        *lease_expires_at =
                            (*lease_expires_at).max(now.plus_secs(LEASE_DURATION_SECS));
                    }
                    _ => {}
                }
                let id = job.plan.id;
                if job.state == JobState::Queued {
                    scheduler
                        .queue
                        .entry(run.header.priority)
                        .or_default()
                        .entry(run.header.pipeline.clone())
                        .or_default()
                        .insert((run.header.seq, id));
                }
                if let Some((agent, _)) = job.state.agent() {
                    scheduler
                        .agents
                        .entry(agent.clone())
                        .or_insert_with(|| AgentEntry::new(Labels::new(), 0))
                        .held
                        .insert(id);
                }
                if let Some(at) = deadline_of(job) {
                    scheduler.deadlines.insert((at, id));
                }
            }
            scheduler.runs.insert(run.header.id, run);
        }
        // Every agent starts disconnected, so none is free; reconnections list them.
        scheduler.dispatch_due = true;
        scheduler
    }

    /// Checks the scheduler's internal consistency; for tests and debug assertions.
    /// Returns a description of the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let queued: BTreeSet<JobId> = self
            .queue
            .values()
            .flat_map(BTreeMap::values)
            .flatten()
            .map(|(_, job)| *job)
            .collect();
        if queued.len() != self.queue_len() {
            return Err("a job is queued twice".into());
        }
        let mut held_anywhere = BTreeSet::new();
        for (agent_id, agent) in &self.agents {
            for job in &agent.held {
                if !held_anywhere.insert(*job) {
                    return Err(format!("job {job} is held by two agents"));
                }
                match self.job_state(*job).and_then(JobState::agent) {
                    Some((holder, _)) if holder == agent_id => {}
                    other => {
                        return Err(format!(
                            "agent {agent_id} holds {job} but its state names {other:?}"
                        ))
                    }
                }
            }
        }
        let free: BTreeSet<(Reverse<usize>, AgentId)> = self
            .agents
            .iter()
            .filter_map(|(id, a)| {
                let n = free_slots(a);
                (n > 0).then(|| (Reverse(n), id.clone()))
            })
            .collect();
        if free != self.free {
            return Err(format!(
                "free agent index {:?} disagrees with the agents {:?}",
                self.free, free
            ));
        }
        let deadlines: BTreeSet<(UnixMillis, JobId)> = self
            .runs
            .values()
            .flat_map(|r| r.jobs.values())
            .filter_map(|j| deadline_of(j).map(|at| (at, j.plan.id)))
            .collect();
        if deadlines != self.deadlines {
            return Err(format!(
                "deadline index {:?} disagrees with the job states {:?}",
                self.deadlines, deadlines
            ));
        }
        for run in self.runs.values() {
            for job in run.jobs.values() {
                let id = job.plan.id;
                if (job.state == JobState::Queued) != queued.contains(&id) {
                    return Err(format!("queue index disagrees with state of {id}"));
                }
                if job.state.agent().is_some() != held_anywhere.contains(&id) {
                    return Err(format!("agent index disagrees with state of {id}"));
                }
                let left_pending = job.state != JobState::Pending;
                let cancelled_early = job.state == JobState::Cancelled;
                if left_pending && !cancelled_early {
                    for ancestor in &job.ancestors {
                        if !run.jobs[ancestor].state.is_terminal() {
                            return Err(format!(
                                "{id} is {:?} before its ancestor {}.{ancestor} is terminal",
                                job.state, run.header.id
                            ));
                        }
                    }
                }
            }
            let all_terminal = run.jobs.values().all(|j| j.state.is_terminal());
            if all_terminal != run.header.state.is_terminal() {
                return Err(format!(
                    "run {} is {:?} while all_terminal = {all_terminal}",
                    run.header.id, run.header.state
                ));
            }
        }
        Ok(())
    }

    // ---- events ----

    fn submit(
        &mut self,
        run: RunId,
        pipeline: String,
        priority: i32,
        jobs: Vec<JobPlan>,
        out: &mut Vec<Command>,
    ) {
        let ancestors = match self.validate(run, &jobs) {
            Ok(ancestors) => ancestors,
            Err(error) => {
                out.push(Command::RunRejected { run, error });
                return;
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let jobs: BTreeMap<u32, JobEntry> = jobs
            .into_iter()
            .map(|plan| {
                let index = plan.id.index;
                let entry = JobEntry {
                    ancestors: ancestors.get(&index).cloned().unwrap_or_default(),
                    plan,
                    state: JobState::Pending,
                    attempt: 0,
                    failures: 0,
                    losses: 0,
                };
                (index, entry)
            })
            .collect();
        out.push(Command::RunChanged {
            run,
            state: RunState::Running,
        });
        for job in jobs.values() {
            out.push(Command::JobChanged {
                job: job.plan.id,
                attempt: 0,
                state: JobState::Pending,
            });
        }
        self.unsaved_runs.insert(run);
        self.unsaved_jobs.extend(jobs.values().map(|j| j.plan.id));
        self.runs.insert(
            run,
            RunEntry {
                header: RunSnapshot {
                    id: run,
                    pipeline,
                    priority,
                    seq,
                    state: RunState::Running,
                    cancel_requested: false,
                },
                jobs,
            },
        );
        // An empty run, or one whose roots are ready, settles at once.
        self.dirty.insert(run);
    }

    /// Checks a plan and returns every job's ancestors (transitive needs).
    fn validate(&self, run: RunId, jobs: &[JobPlan]) -> Result<BTreeMap<u32, Vec<u32>>, PlanError> {
        if self.runs.contains_key(&run) {
            return Err(PlanError::DuplicateRun(run));
        }
        let mut needs: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for plan in jobs {
            if plan.id.run != run {
                return Err(PlanError::ForeignJob { run, job: plan.id });
            }
            if needs.insert(plan.id.index, Vec::new()).is_some() {
                return Err(PlanError::DuplicateJob(plan.id));
            }
        }
        for plan in jobs {
            for need in &plan.needs {
                if need.run != run || !needs.contains_key(&need.index) {
                    return Err(PlanError::UnknownNeed {
                        job: plan.id,
                        need: *need,
                    });
                }
            }
            if let Some(list) = needs.get_mut(&plan.id.index) {
                list.extend(plan.needs.iter().map(|n| n.index));
            }
        }
        // Kahn's algorithm: repeatedly take the jobs whose needs are all placed; what
        // remains when nothing can be taken is on (or behind) a cycle.
        let mut ancestors: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        while ancestors.len() < needs.len() {
            let ready: Vec<u32> = needs
                .iter()
                .filter(|(index, direct)| {
                    !ancestors.contains_key(index)
                        && direct.iter().all(|n| ancestors.contains_key(n))
                })
                .map(|(index, _)| *index)
                .collect();
            if ready.is_empty() {
                let stuck = needs
                    .keys()
                    .find(|index| !ancestors.contains_key(index))
                    .copied()
                    .unwrap_or_default();
                return Err(PlanError::Cycle(gantry_protocol::JobId {
                    run,
                    index: stuck,
                }));
            }
            for index in ready {
                let mut all = BTreeSet::new();
                for need in &needs[&index] {
                    all.insert(*need);
                    all.extend(ancestors[need].iter().copied());
                }
                ancestors.insert(index, all);
            }
        }
        Ok(ancestors
            .into_iter()
            .map(|(index, set)| (index, set.into_iter().collect()))
            .collect())
    }

    fn agent_connected(
        &mut self,
        now: UnixMillis,
        agent: &AgentId,
        labels: Labels,
        slots: u32,
        running: &[(JobId, Attempt)],
        out: &mut Vec<Command>,
    ) {
        let entry = self
            .agents
            .entry(agent.clone())
            .or_insert_with(|| AgentEntry::new(Labels::new(), 0));
        entry.labels = labels;
        entry.slots = slots;
        entry.sessions = entry.sessions.saturating_add(1);
        entry.draining = false;
        // Its labels may have changed, which can make a queued job fit it.
        self.dispatch_due = true;
        let held: Vec<JobId> = entry.held.iter().copied().collect();
        for job in held {
            let Some(state) = self.job_state(job).cloned() else {
                continue;
            };
            let reported = state
                .agent()
                .is_some_and(|(_, attempt)| running.contains(&(job, attempt)));
            match state {
                JobState::Running {
                    agent,
                    attempt,
                    cancelling,
                    ..
                } if reported => {
                    // Renew in place: lease renewals are not reported as changes.
                    self.set_lease(job, |_| now.plus_secs(LEASE_DURATION_SECS));
                    if cancelling {
                        // The cancel may have been lost with the old connection.
                        out.push(Command::Cancel {
                            job,
                            attempt,
                            agent,
                        });
                    }
                }
                JobState::Running { .. } => self.lost(job, out),
                JobState::Offered { agent, attempt, .. } if reported => {
                    self.start(now, job, agent, attempt, out);
                }
                // The offer never reached the agent, or died with the old connection.
                JobState::Offered { .. } => self.set_state(job, JobState::Queued, out),
                _ => {}
            }
        }
        // Attempts the agent runs that we no longer lease to it: stop them, so they do not
        // use capacity we count as free.
        for &(job, attempt) in running {
            let ours = self
                .job_state(job)
                .and_then(JobState::agent)
                .is_some_and(|(holder, n)| holder == agent && n == attempt);
            if !ours {
                out.push(Command::Cancel {
                    job,
                    attempt,
                    agent: agent.clone(),
                });
            }
        }
        self.relist(agent);
    }

    fn renew_leases(&mut self, now: UnixMillis, agent: &AgentId) {
        let Some(entry) = self.agents.get(agent) else {
            return;
        };
        let held: Vec<JobId> = entry.held.iter().copied().collect();
        let renewed = now.plus_secs(LEASE_DURATION_SECS);
        for job in held {
            self.set_lease(job, |lease| lease.max(renewed));
        }
    }

    /// Changes a running job's lease in place (not reported, not saved: `restore`
    /// renews every lease), keeping the deadline index in step.
    fn set_lease(&mut self, job: JobId, lease: impl FnOnce(UnixMillis) -> UnixMillis) {
        let Some(entry) = self.job_mut(job) else {
            return;
        };
        let before = deadline_of(entry);
        if let JobState::Running {
            lease_expires_at, ..
        } = &mut entry.state
        {
            *lease_expires_at = lease(*lease_expires_at);
        }
        let after = deadline_of(entry);
        if before != after {
            if let Some(at) = before {
                self.deadlines.remove(&(at, job));
            }
            if let Some(at) = after {
                self.deadlines.insert((at, job));
            }
        }
    }

    /// Puts an agent in `free` as its free slots now say (or takes it out).
    fn relist(&mut self, agent: &AgentId) {
        let Some(entry) = self.agents.get_mut(agent) else {
            return;
        };
        let free = free_slots(entry);
        if free == entry.listed_free {
            return;
        }
        if entry.listed_free > 0 {
            self.free
                .remove(&(Reverse(entry.listed_free), agent.clone()));
        }
        if free > 0 {
            self.free.insert((Reverse(free), agent.clone()));
        }
        if free > entry.listed_free {
            self.dispatch_due = true;
        }
        entry.listed_free = free;
    }

    fn accepted(
        &mut self,
        now: UnixMillis,
        job: JobId,
        attempt: Attempt,
        agent: AgentId,
        out: &mut Vec<Command>,
    ) {
        match self.job_state(job) {
            Some(JobState::Offered {
                agent: holder,
                attempt: n,
                ..
            }) if *holder == agent && *n == attempt => self.start(now, job, agent, attempt, out),
            Some(JobState::Running {
                agent: holder,
                attempt: n,
                ..
            }) if *holder == agent && *n == attempt => self.renew_leases(now, &agent),
            // A late acceptance of an attempt we gave up on. The agent is about to run
            // work nobody tracks (and that uses a slot we count as free), so it is told
            // to stop that attempt; this is the one stale event that yields a command.
            _ => out.push(Command::Cancel {
                job,
                attempt,
                agent,
            }),
        }
    }

    fn start(
        &mut self,
        now: UnixMillis,
        job: JobId,
        agent: AgentId,
        attempt: Attempt,
        out: &mut Vec<Command>,
    ) {
        let state = JobState::Running {
            agent,
            attempt,
            lease_expires_at: now.plus_secs(LEASE_DURATION_SECS),
            started_at: now,
            cancelling: false,
        };
        self.set_state(job, state, out);
    }

    fn finished(
        &mut self,
        job: JobId,
        attempt: Attempt,
        agent: &AgentId,
        outcome: Outcome,
        out: &mut Vec<Command>,
    ) {
        let cancelling = match self.job_state(job) {
            Some(JobState::Offered {
                agent: holder,
                attempt: n,
                ..
            }) if holder == agent && *n == attempt => false,
            Some(JobState::Running {
                agent: holder,
                attempt: n,
                cancelling,
                ..
            }) if holder == agent && *n == attempt => *cancelling,
            _ => return,
        };
        let failure = match outcome {
            Outcome::Succeeded => return self.set_state(job, JobState::Succeeded, out),
            Outcome::Cancelled => return self.set_state(job, JobState::Cancelled, out),
            Outcome::Failed { exit_code } => FailReason::ExitCode(exit_code),
            Outcome::TimedOut => FailReason::TimedOut,
        };
        if cancelling {
            // A job asked to stop is never retried, whatever it reports.
            self.set_state(job, JobState::Failed { reason: failure }, out);
        } else {
            self.retry_or_fail(job, failure, out);
        }
    }

    fn cancel_run(&mut self, run: RunId, out: &mut Vec<Command>) {
        let Some(entry) = self.runs.get_mut(&run) else {
            return;
        };
        if entry.header.state.is_terminal() {
            return;
        }
        entry.header.cancel_requested = true;
        self.unsaved_runs.insert(run);
        let jobs: Vec<(JobId, bool)> = entry
            .jobs
            .values()
            .map(|j| (j.plan.id, j.plan.condition.mentions_cancellation()))
            .collect();
        for (job, survives_cancel) in jobs {
            let pending = self.job_state(job) == Some(&JobState::Pending);
            if pending && survives_cancel {
                continue;
            }
            if self.job_state(job).is_some_and(|s| !s.is_terminal()) {
                self.cancel_job(job, out);
            }
        }
        self.dirty.insert(run);
    }

    /// Cancels one non-terminal job: at once if no agent has it, through the agent if
    /// one does.
    fn cancel_job(&mut self, job: JobId, out: &mut Vec<Command>) {
        let Some(state) = self.job_state(job).cloned() else {
            return;
        };
        match state {
            JobState::Offered { agent, attempt, .. } => {
                out.push(Command::Cancel {
                    job,
                    attempt,
                    agent,
                });
                self.set_state(job, JobState::Cancelled, out);
            }
            JobState::Running {
                agent,
                attempt,
                lease_expires_at,
                started_at,
                cancelling,
            } => {
                out.push(Command::Cancel {
                    job,
                    attempt,
                    agent: agent.clone(),
                });
                if !cancelling {
                    let state = JobState::Running {
                        agent,
                        attempt,
                        lease_expires_at,
                        started_at,
                        cancelling: true,
                    };
                    self.set_state(job, state, out);
                }
            }
            JobState::Pending | JobState::AwaitingApproval | JobState::Queued => {
                self.set_state(job, JobState::Cancelled, out);
            }
            JobState::Succeeded
            | JobState::Failed { .. }
            | JobState::Cancelled
            | JobState::Skipped => {}
        }
    }

    // ---- outcomes ----

    /// A failure (exit code or timeout): re-queue while `retry` allows, else fail.
    fn retry_or_fail(&mut self, job: JobId, reason: FailReason, out: &mut Vec<Command>) {
        self.requeue_within(job, reason, out, |e| (&mut e.failures, e.plan.retry));
    }

    /// An infrastructure failure (lost lease, rejection): re-queue while
    /// `infra_retries` allows, else fail with `reason`.
    fn infra_retry_or(&mut self, job: JobId, reason: FailReason, out: &mut Vec<Command>) {
        self.requeue_within(job, reason, out, |e| (&mut e.losses, e.plan.infra_retries));
    }

    /// Re-queues `job`, counting the try, while the count `budget` picks (tries used, tries
    /// allowed) has room; else fails it with `reason`.
    fn requeue_within(
        &mut self,
        job: JobId,
        reason: FailReason,
        out: &mut Vec<Command>,
        budget: fn(&mut JobEntry) -> (&mut u32, u32),
    ) {
        let Some(entry) = self.job_mut(job) else {
            return;
        };
        let (used, allowed) = budget(entry);
        if *used < allowed {
            *used += 1;
            self.set_state(job, JobState::Queued, out);
        } else {
            self.set_state(job, JobState::Failed { reason }, out);
        }
    }

    /// The agent holding a running job stopped answering for it.
    fn lost(&mut self, job: JobId, out: &mut Vec<Command>) {
        if matches!(
            self.job_state(job),
            Some(JobState::Running {
                cancelling: true,
                ..
            })
        ) {
            self.set_state(job, JobState::Cancelled, out);
        } else {
            self.infra_retry_or(job, FailReason::Lost, out);
        }
    }

    // ---- time ----

    fn expire(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        // Most events arrive with nothing due; finding that out needs no copies.
        if self.next_deadline().is_none_or(|due| due > now) {
            return;
        }
        let due: BTreeSet<JobId> = self
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, job)| *job)
            .collect();
        for job in due {
            let Some(entry) = self.job(job) else {
                continue;
            };
            match entry.state.clone() {
                JobState::Offered {
                    offer_expires_at, ..
                } if now >= offer_expires_at => self.set_state(job, JobState::Queued, out),
                JobState::Running {
                    lease_expires_at, ..
                } if now >= lease_expires_at => self.lost(job, out),
                JobState::Running {
                    agent,
                    attempt,
                    started_at,
                    cancelling,
                    ..
                } if backstop(started_at, entry.plan.timeout_ms).is_some_and(|b| now >= b) => {
                    out.push(Command::Cancel {
                        job,
                        attempt,
                        agent,
                    });
                    if cancelling {
                        self.set_state(job, JobState::Cancelled, out);
                    } else {
                        self.retry_or_fail(job, FailReason::TimedOut, out);
                    }
                }
                _ => {}
            }
        }
    }

    // ---- the DAG ----

    /// Moves pending jobs whose ancestors are all terminal, in every run touched during
    /// this call, until nothing changes; then closes runs whose jobs are all terminal.
    fn settle(&mut self, out: &mut Vec<Command>) {
        while let Some(run) = self.dirty.pop_first() {
            while let Some(entry) = self.runs.get(&run) {
                let mut moves = Vec::new();
                for job in entry.jobs.values() {
                    if job.state != JobState::Pending {
                        continue;
                    }
                    let ancestors: Vec<&JobEntry> =
                        job.ancestors.iter().map(|a| &entry.jobs[a]).collect();
                    if !ancestors.iter().all(|a| a.state.is_terminal()) {
                        continue;
                    }
                    let all_succeeded = ancestors.iter().all(|a| counts_as_success(a));
                    let any_failed = ancestors.iter().any(|a| counts_as_failure(a));
                    let run_cancelled = entry.header.cancel_requested;
                    let next = if !job
                        .plan
                        .condition
                        .eval(all_succeeded, any_failed, run_cancelled)
                    {
                        JobState::Skipped
                    } else if job.plan.manual && run_cancelled {
                        // Nobody is going to approve work in a cancelled run.
                        JobState::Cancelled
                    } else if job.plan.manual {
                        JobState::AwaitingApproval
                    } else {
                        JobState::Queued
                    };
                    moves.push((job.plan.id, next));
                }
                if moves.is_empty() {
                    break;
                }
                for (job, next) in moves {
                    self.set_state(job, next, out);
                }
            }
            let Some(entry) = self.runs.get_mut(&run) else {
                continue;
            };
            if entry.header.state == RunState::Running
                && entry.jobs.values().all(|j| j.state.is_terminal())
            {
                entry.header.state = if entry.header.cancel_requested {
                    RunState::Cancelled
                } else if entry.jobs.values().any(counts_as_failure) {
                    RunState::Failed
                } else if entry.jobs.values().any(|j| j.state == JobState::Cancelled) {
                    RunState::Cancelled
                } else {
                    RunState::Succeeded
                };
                self.unsaved_runs.insert(run);
                out.push(Command::RunChanged {
                    run,
                    state: entry.header.state,
                });
            }
        }
    }

    // ---- dispatch ----

    /// Offers queued jobs to free matching agents until no queued job fits anywhere.
    ///
    /// Order: higher priority first; within a priority, pipelines take turns (the one
    /// after the pipeline served last, in name order, wrapping); within a pipeline, run
    /// submission order then job index. A job that no free agent matches does not block
    /// the jobs behind it. Among matching agents, the one with the most free slots wins
    /// (ties: smallest id), which spreads load.
    fn dispatch(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        if !std::mem::take(&mut self.dispatch_due) {
            return;
        }
        // Label sets that no free agent matches. Free agents only get fewer during this
        // call, so each such set is looked up against them once, not once per job.
        let mut unmatched: Vec<Labels> = Vec::new();
        loop {
            if self.free.is_empty() {
                return;
            }
            let mut pick = None;
            'priorities: for (priority, pipelines) in self.queue.iter().rev() {
                // Pipelines after the one served last come first, then the rest.
                let (after, before): (Vec<_>, Vec<_>) = match self.rr_cursor.get(priority) {
                    Some(cursor) => pipelines.iter().partition(|(p, _)| *p > cursor),
                    None => (pipelines.iter().collect(), Vec::new()),
                };
                for (pipeline, jobs) in after.into_iter().chain(before) {
                    for (_, job) in jobs {
                        let Some(plan) = self.job(*job).map(|j| &j.plan) else {
                            continue;
                        };
                        if unmatched.contains(&plan.runs_on) {
                            continue;
                        }
                        // `free` is in order of preference: the first match is the best.
                        let best = self.free.iter().find(|(_, id)| {
                            self.agents
                                .get(id)
                                .is_some_and(|a| labels_match(&a.labels, &plan.runs_on))
                        });
                        match best {
                            Some((_, agent)) => {
                                pick = Some((*priority, pipeline.clone(), *job, agent.clone()));
                                break 'priorities;
                            }
                            None => unmatched.push(plan.runs_on.clone()),
                        }
                    }
                }
            }
            let Some((priority, pipeline, job, agent)) = pick else {
                return;
            };
            self.rr_cursor.insert(priority, pipeline);
            let Some(entry) = self.job_mut(job) else {
                return;
            };
            let attempt = entry.attempt + 1;
            let dispatch = Command::Dispatch {
                job,
                attempt,
                agent: agent.clone(),
                name: entry.plan.name.clone(),
                pipeline: entry.plan.pipeline.clone(),
                timeout_ms: entry.plan.timeout_ms,
            };
            let state = JobState::Offered {
                agent,
                attempt,
                offer_expires_at: now.plus_secs(OFFER_TIMEOUT_SECS),
            };
            self.set_state(job, state, out);
            out.push(dispatch);
        }
    }

    // ---- bookkeeping ----

    /// The only place a job's state changes: keeps the queue and the agents' held sets
    /// in step, reports the change, and marks the run for settling.
    fn set_state(&mut self, job: JobId, state: JobState, out: &mut Vec<Command>) {
        let Some(run) = self.runs.get_mut(&job.run) else {
            return;
        };
        let (priority, seq) = (run.header.priority, run.header.seq);
        let Some(entry) = run.jobs.get_mut(&job.index) else {
            return;
        };
        if let Some((_, attempt)) = state.agent() {
            entry.attempt = entry.attempt.max(attempt);
        }
        let old_deadline = deadline_of(entry);
        let old = std::mem::replace(&mut entry.state, state.clone());
        let new_deadline = deadline_of(entry);
        let attempt = entry.attempt;
        if old_deadline != new_deadline {
            if let Some(at) = old_deadline {
                self.deadlines.remove(&(at, job));
            }
            if let Some(at) = new_deadline {
                self.deadlines.insert((at, job));
            }
        }
        self.unsaved_jobs.insert(job);
        if old == JobState::Queued {
            if let Some(pipelines) = self.queue.get_mut(&priority) {
                if let Some(jobs) = pipelines.get_mut(&run.header.pipeline) {
                    jobs.remove(&(seq, job));
                    if jobs.is_empty() {
                        pipelines.remove(&run.header.pipeline);
                    }
                }
                if pipelines.is_empty() {
                    self.queue.remove(&priority);
                }
            }
        }
        if state == JobState::Queued {
            self.queue
                .entry(priority)
                .or_default()
                .entry(run.header.pipeline.clone())
                .or_default()
                .insert((seq, job));
            self.dispatch_due = true;
        }
        if let Some((agent, _)) = old.agent() {
            if let Some(a) = self.agents.get_mut(agent) {
                a.held.remove(&job);
            }
            let agent = agent.clone();
            self.relist(&agent);
        }
        if let Some((agent, _)) = state.agent() {
            if let Some(a) = self.agents.get_mut(agent) {
                a.held.insert(job);
            }
            let agent = agent.clone();
            self.relist(&agent);
        }
        if state.is_terminal() {
            self.dirty.insert(job.run);
        }
        out.push(Command::JobChanged {
            job,
            attempt,
            state,
        });
    }

    fn job(&self, job: JobId) -> Option<&JobEntry> {
        self.runs.get(&job.run)?.jobs.get(&job.index)
    }

    fn job_mut(&mut self, job: JobId) -> Option<&mut JobEntry> {
        self.runs.get_mut(&job.run)?.jobs.get_mut(&job.index)
    }
}

/// Free slots an agent offers: none without a live session or while draining.
fn free_slots(agent: &AgentEntry) -> usize {
    if agent.sessions > 0 && !agent.draining {
        (agent.slots as usize).saturating_sub(agent.held.len())
    } else {
        0
    }
}

/// When a job needs attention without an event: its offer's expiry, or the earlier of
/// its lease's expiry and its timeout backstop; none unless it is offered or running.
fn deadline_of(entry: &JobEntry) -> Option<UnixMillis> {
    match &entry.state {
        JobState::Offered {
            offer_expires_at, ..
        } => Some(*offer_expires_at),
        JobState::Running {
            lease_expires_at,
            started_at,
            ..
        } => Some(
            backstop(*started_at, entry.plan.timeout_ms)
                .map_or(*lease_expires_at, |b| b.min(*lease_expires_at)),
        ),
        _ => None,
    }
}

/// Labels under this prefix reserve an agent: it takes only jobs that ask for each of
/// them (the coordinator's deploy runner carries one; people cannot set them).
pub const RESERVED_LABEL_PREFIX: &str = "gantry.reserved/";

/// Whether an agent carries every label a job asks for, with the same value, and the
/// job asks for every reserved label the agent carries.
pub fn labels_match(agent: &Labels, runs_on: &Labels) -> bool {
    runs_on.iter().all(|(k, v)| agent.get(k) == Some(v))
        && agent
            .iter()
            .filter(|(k, _)| k.starts_with(RESERVED_LABEL_PREFIX))
            .all(|(k, v)| runs_on.get(k) == Some(v))
}

/// When the timeout backstop fires for a job started at `started_at`; none without a
/// timeout.
fn backstop(started_at: UnixMillis, timeout_ms: u64) -> Option<UnixMillis> {
    (timeout_ms > 0)
        .then(|| UnixMillis(started_at.0.saturating_add(timeout_ms)).plus_secs(TIMEOUT_GRACE_SECS))
}

/// Succeeded, or failed with `continue_on_error`.
fn counts_as_success(job: &JobEntry) -> bool {
    match job.state {
        JobState::Succeeded => true,
        JobState::Failed { .. } => job.plan.continue_on_error,
        _ => false,
    }
}

/// Failed without `continue_on_error`.
fn counts_as_failure(job: &JobEntry) -> bool {
    matches!(job.state, JobState::Failed { .. }) && !job.plan.continue_on_error
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole snapshot (the legacy stored form) lists a run's header fields, then its
    /// jobs, and ends with the core's fields: embedding the header and the core changes
    /// no byte of that.
    #[test]
    fn a_whole_snapshot_encodes_as_when_its_fields_were_listed_flat() {
        let header = RunSnapshot {
            id: RunId(7),
            pipeline: "p".into(),
            priority: -2,
            seq: 300,
            state: RunState::Running,
            cancel_requested: true,
        };
        let entry = RunEntry {
            header: header.clone(),
            jobs: BTreeMap::new(),
        };
        let flat = (
            header.id,
            &header.pipeline,
            header.priority,
            header.seq,
            header.state,
            header.cancel_requested,
            &entry.jobs,
        );
        assert_eq!(
            postcard::to_stdvec(&entry).expect("entry"),
            postcard::to_stdvec(&flat).expect("flat")
        );

        let core = CoreSnapshot {
            rr_cursor: vec![(-2, "p".into())],
            next_seq: 301,
        };
        let snapshot = Snapshot {
            runs: vec![entry],
            agents: Vec::new(),
            core: core.clone(),
        };
        let flat = (
            &snapshot.runs,
            &snapshot.agents,
            &core.rr_cursor,
            core.next_seq,
        );
        assert_eq!(
            postcard::to_stdvec(&snapshot).expect("snapshot"),
            postcard::to_stdvec(&flat).expect("flat")
        );
    }
}
