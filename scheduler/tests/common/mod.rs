//! Shared test harness: plan builders, a driver that checks the scheduler's invariants
//! after every event, and the drain that must bring every run to a terminal state.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;

use gantry_protocol::{AgentId, JobId, Labels, RunId, UnixMillis};
use gantry_scheduler::{
    Command, Event, JobPlan, JobState, Outcome, Scheduler, Snapshot, StatusExpr,
    DEFAULT_INFRA_RETRIES,
};

pub fn agent(n: u8) -> AgentId {
    AgentId::from_random(&[n; 6])
}

pub fn jid(run: u64, index: u32) -> JobId {
    JobId {
        run: RunId(run),
        index,
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A plain job: default condition, no labels, no retries beyond the infra default, a
/// 60 s timeout.
pub fn plan(run: u64, index: u32, needs: &[u32]) -> JobPlan {
    JobPlan {
        id: jid(run, index),
        name: format!("job-{run}.{index}"),
        pipeline: "p".to_owned(),
        needs: needs.iter().map(|n| jid(run, *n)).collect(),
        runs_on: Labels::new(),
        condition: StatusExpr::Success,
        manual: false,
        retry: 0,
        infra_retries: DEFAULT_INFRA_RETRIES,
        timeout_ms: 60_000,
        continue_on_error: false,
    }
}

pub fn submit(run: u64, pipeline: &str, priority: i32, jobs: Vec<JobPlan>) -> Event {
    Event::RunSubmitted {
        run: RunId(run),
        pipeline: pipeline.to_owned(),
        priority,
        jobs,
    }
}

pub fn connect(agent: &AgentId, labels: Labels, slots: u32) -> Event {
    Event::AgentConnected {
        agent: agent.clone(),
        labels,
        slots,
        running: Vec::new(),
    }
}

/// Drives a scheduler, advancing a clock and checking invariants after every event.
pub struct Driver {
    pub scheduler: Scheduler,
    pub now: UnixMillis,
    /// Every agent's labels and slots as it last announced them.
    pub agents: BTreeMap<AgentId, (Labels, u32)>,
    /// Every command ever returned, in order.
    pub log: Vec<Command>,
    /// Everything that happened, for replay.
    pub history: Vec<Happened>,
    /// The scheduler's parts as the coordinator's store last committed them, which is
    /// what a crashed coordinator comes back from.
    pub committed: Stored,
}

/// The scheduler's state as the coordinator stores it: in parts, postcard-encoded, each
/// written only when `take_changes` names it (as `coordinator/src/services/engine.rs` does).
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub core: Option<Vec<u8>>,
    pub runs: BTreeMap<RunId, Vec<u8>>,
    pub jobs: BTreeMap<JobId, Vec<u8>>,
}

impl Stored {
    /// Writes what changed since the last commit.
    pub fn commit(&mut self, scheduler: &mut Scheduler) {
        let changes = scheduler.take_changes();
        if changes.is_empty() {
            return;
        }
        self.core = Some(postcard::to_stdvec(&changes.core).expect("encode core"));
        for (run, header) in &changes.runs {
            if let Some(h) = header {
                self.runs
                    .insert(*run, postcard::to_stdvec(h).expect("encode run"));
            } else {
                self.runs.remove(run);
                self.jobs.retain(|job, _| job.run != *run);
            }
        }
        for (job, entry) in &changes.jobs {
            if let Some(e) = entry {
                self.jobs
                    .insert(*job, postcard::to_stdvec(e).expect("encode job"));
            } else {
                self.jobs.remove(job);
            }
        }
    }

    /// A scheduler restored at `now` from what was committed (empty if nothing was).
    pub fn restore(&self, now: UnixMillis) -> Scheduler {
        let Some(core) = &self.core else {
            return Scheduler::new();
        };
        let snapshot = Snapshot::from_parts(
            postcard::from_bytes(core).expect("decode core"),
            self.runs
                .values()
                .map(|b| postcard::from_bytes(b).expect("decode run"))
                .collect(),
            self.jobs
                .values()
                .map(|b| postcard::from_bytes(b).expect("decode job"))
                .collect(),
        );
        Scheduler::restore(snapshot, now)
    }
}

/// What a restored scheduler knows of runs and jobs: runs with their states, jobs with
/// their states and attempts, and the next deadline.
type RestoredView = (
    Vec<(RunId, gantry_scheduler::RunState)>,
    Vec<(JobId, JobState, u32)>,
    Option<UnixMillis>,
);

/// What a restored scheduler knows of runs and jobs (agents aside: the stored parts
/// leave idle agents out, since every agent says hello again after a restart).
fn restored_view(s: &Scheduler) -> RestoredView {
    let runs: Vec<_> = s.runs().collect();
    let jobs = runs
        .iter()
        .flat_map(|(run, _)| s.jobs_of(*run))
        .map(|(job, state)| (job, state.clone(), s.job_attempt(job).unwrap_or(0)))
        .collect();
    (runs, jobs, s.next_deadline())
}

/// One entry of a driver's history.
#[derive(Debug, Clone)]
pub enum Happened {
    Event(UnixMillis, Event),
    /// The coordinator restarted at this time: snapshot, encode, decode, restore.
    Restart(UnixMillis),
    /// The shell committed the scheduler's snapshot to its store.
    Commit,
    /// The coordinator crashed and came back at this time from the last commit, losing
    /// every event after it.
    Crash(UnixMillis),
    /// The shell dropped a finished run after persisting it.
    Forget(RunId),
}

/// Encodes a snapshot with postcard and restores it at `now`, as a restarted
/// coordinator would.
pub fn restart(scheduler: &Scheduler, now: UnixMillis) -> Scheduler {
    restore(&encode(scheduler), now)
}

/// The snapshot's bytes, as the coordinator stores them.
pub fn encode(scheduler: &Scheduler) -> Vec<u8> {
    postcard::to_stdvec(&scheduler.snapshot()).expect("encode snapshot")
}

/// A scheduler restored at `now` from stored snapshot bytes.
pub fn restore(bytes: &[u8], now: UnixMillis) -> Scheduler {
    let snapshot = postcard::from_bytes(bytes).expect("decode snapshot");
    Scheduler::restore(snapshot, now)
}

/// Replays a history on a fresh scheduler without any checks, returning every command.
pub fn replay(history: &[Happened]) -> Vec<Command> {
    let mut scheduler = Scheduler::new();
    let mut committed = Stored::default();
    let mut log = Vec::new();
    for happened in history {
        match happened {
            Happened::Event(now, event) => log.extend(scheduler.handle(*now, event.clone())),
            Happened::Restart(now) => scheduler = restart(&scheduler, *now),
            Happened::Commit => committed.commit(&mut scheduler),
            Happened::Crash(now) => scheduler = committed.restore(*now),
            Happened::Forget(run) => {
                scheduler.forget_run(*run);
            }
        }
    }
    log
}

impl Default for Driver {
    fn default() -> Self {
        Self {
            scheduler: Scheduler::new(),
            now: UnixMillis(1_700_000_000_000),
            agents: BTreeMap::new(),
            log: Vec::new(),
            history: Vec::new(),
            committed: Stored::default(),
        }
    }
}

impl Driver {
    pub fn advance_secs(&mut self, secs: u64) {
        self.now = self.now.plus_secs(secs);
    }

    pub fn advance_ms(&mut self, ms: u64) {
        self.now = UnixMillis(self.now.0 + ms);
    }

    /// Restarts the coordinator: the scheduler goes through a persisted snapshot.
    pub fn restart(&mut self) {
        self.scheduler = restart(&self.scheduler, self.now);
        self.history.push(Happened::Restart(self.now));
    }

    /// The shell commits what changed: the current state becomes what a crash comes
    /// back to. Checks that the parts stored so far restore to the same runs and jobs as
    /// the whole snapshot would.
    pub fn commit(&mut self) {
        self.committed.commit(&mut self.scheduler);
        self.history.push(Happened::Commit);
        let from_parts = restored_view(&self.committed.restore(self.now));
        let whole = restored_view(&restart(&self.scheduler, self.now));
        assert_eq!(
            from_parts, whole,
            "the stored parts restore to another state than the whole snapshot"
        );
    }

    /// The coordinator crashes and comes back now: everything since the last commit is
    /// gone, and the scheduler is restored from the committed parts (or starts empty).
    pub fn crash(&mut self) {
        self.scheduler = self.committed.restore(self.now);
        self.history.push(Happened::Crash(self.now));
    }

    /// Drops a finished run, as the shell does once it has persisted it.
    pub fn forget_run(&mut self, run: RunId) -> bool {
        self.history.push(Happened::Forget(run));
        self.scheduler.forget_run(run)
    }

    /// Applies one event, checks every invariant, and returns the commands.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        if let Event::AgentConnected {
            agent,
            labels,
            slots,
            ..
        } = &event
        {
            self.agents.insert(agent.clone(), (labels.clone(), *slots));
        }
        let shown = event.clone();
        self.history.push(Happened::Event(self.now, event.clone()));
        let out = self.scheduler.handle(self.now, event);
        if let Err(problem) = self.check(&out) {
            panic!(
                "after {shown:?} at {:?}: {problem}\ncommands: {out:#?}",
                self.now
            );
        }
        self.log.extend(out.iter().cloned());
        out
    }

    pub fn state(&self, job: JobId) -> JobState {
        self.scheduler.job_state(job).cloned().expect("known job")
    }

    /// Every job of every run, with its state, without copying.
    pub fn job_refs(&self) -> impl Iterator<Item = (JobId, &JobState)> + '_ {
        self.scheduler
            .runs()
            .flat_map(|(run, _)| self.scheduler.jobs_of(run))
    }

    /// Every job of every run, with its state.
    pub fn all_jobs(&self) -> Vec<(JobId, JobState)> {
        self.scheduler
            .runs()
            .flat_map(|(run, _)| {
                self.scheduler
                    .jobs_of(run)
                    .into_iter()
                    .map(|(id, s)| (id, s.clone()))
            })
            .collect()
    }

    /// The invariants that must hold after every step.
    pub fn check(&self, out: &[Command]) -> Result<(), String> {
        self.scheduler.check_invariants()?;
        // (1) No agent holds more jobs than its slots; each job has one holder (its
        // single state names at most one agent).
        let mut load: BTreeMap<&AgentId, u32> = BTreeMap::new();
        for (_, state) in self.job_refs() {
            if let Some((agent, _)) = state.agent() {
                *load.entry(agent).or_default() += 1;
            }
        }
        for (agent, used) in &load {
            let slots = self.agents.get(*agent).map_or(0, |(_, s)| *s);
            if *used > slots {
                return Err(format!(
                    "agent {agent} holds {used} jobs with {slots} slots"
                ));
            }
        }
        let mut dispatched = std::collections::BTreeSet::new();
        for command in out {
            let Command::Dispatch {
                job,
                attempt,
                agent,
                ..
            } = command
            else {
                continue;
            };
            if !dispatched.insert(*job) {
                return Err(format!("{job} dispatched twice in one step"));
            }
            let plan = self
                .scheduler
                .job_plan(*job)
                .ok_or("dispatched unknown job")?;
            // (3) Needs are terminal before dispatch.
            for need in &plan.needs {
                let need_state = self.scheduler.job_state(*need).ok_or("unknown need")?;
                if !need_state.is_terminal() {
                    return Err(format!(
                        "{job} dispatched while its need {need} is {need_state:?}"
                    ));
                }
            }
            // (4) Only to a matching agent.
            let (agent_labels, _) = self.agents.get(agent).ok_or("dispatch to unknown agent")?;
            // Checked here independently of the library's own matcher.
            let matches = plan
                .runs_on
                .iter()
                .all(|(key, value)| agent_labels.get(key) == Some(value));
            if !matches {
                return Err(format!("{job} dispatched to non-matching agent {agent}"));
            }
            match self.scheduler.job_state(*job) {
                Some(JobState::Offered {
                    agent: holder,
                    attempt: n,
                    ..
                }) if holder == agent && n == attempt => {}
                other => return Err(format!("{job} dispatched but is {other:?}")),
            }
        }
        Ok(())
    }

    /// Brings everything to an end: matching agents for every label combination the
    /// tests use, approvals, every held attempt finishing successfully, and time passing
    /// beyond every deadline. Asserts that every job and run ends terminal.
    pub fn drain(&mut self, label_space: &[Labels]) {
        for (n, labels) in label_space.iter().enumerate() {
            let id = agent(200 + u8::try_from(n).expect("few label sets"));
            self.step(connect(&id, labels.clone(), 1_000));
        }
        for _round in 0..500 {
            if self.scheduler.runs().all(|(_, state)| state.is_terminal()) {
                break;
            }
            for (job, state) in self.all_jobs() {
                match state {
                    JobState::AwaitingApproval => {
                        self.step(Event::Approve { job });
                    }
                    JobState::Offered { agent, attempt, .. }
                    | JobState::Running { agent, attempt, .. } => {
                        self.step(Event::JobFinished {
                            job,
                            attempt,
                            agent,
                            outcome: Outcome::Succeeded,
                        });
                    }
                    _ => {}
                }
            }
            self.advance_secs(61);
            self.step(Event::Tick);
        }
        for (job, state) in self.all_jobs() {
            assert!(state.is_terminal(), "{job} never finished: {state:?}");
        }
        for (run, state) in self.scheduler.runs() {
            assert!(state.is_terminal(), "run {run} never finished: {state:?}");
        }
        assert_eq!(self.scheduler.queue_len(), 0);
        assert_eq!(self.scheduler.next_deadline(), None);
    }

    /// The dispatches in the log, as (job, attempt, agent).
    pub fn dispatches(&self) -> Vec<(JobId, u32, AgentId)> {
        self.log
            .iter()
            .filter_map(|c| match c {
                Command::Dispatch {
                    job,
                    attempt,
                    agent,
                    ..
                } => Some((*job, *attempt, agent.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A small deterministic PRNG (splitmix64), so random tests need no rand crate and any
/// failure replays from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn byte(&mut self) -> u8 {
        (self.next_u64() & 0xff) as u8
    }
}

/// Every label set the random worlds ask for is a subset of one of these.
pub fn full_label_space() -> Vec<Labels> {
    let mut space = Vec::new();
    for os in ["linux", "mac"] {
        for arch in ["x86", "arm"] {
            space.push(labels(&[("os", os), ("arch", arch)]));
        }
    }
    space
}

/// A randomly generated set of runs (submitted when an op says so) and agents.
pub struct World {
    pub runs: Vec<Event>,
    pub submitted: usize,
    pub agents: Vec<(AgentId, Labels, u32)>,
    pub connected: std::collections::BTreeSet<AgentId>,
    /// A time-advance op whose second byte is below this restarts the coordinator
    /// instead (out of 256 values).
    pub restart_below: u8,
}

impl World {
    /// Up to `max_runs` runs of up to `max_jobs` jobs, and `min_agents..=max_agents`
    /// agents.
    pub fn random(
        rng: &mut Rng,
        max_runs: u64,
        (min_agents, max_agents): (u64, u64),
        max_jobs: u64,
    ) -> Self {
        let run_count = 1 + rng.below(max_runs);
        let runs = (1..=run_count)
            .map(|run| random_run(rng, run, max_jobs))
            .collect();
        let agent_count = min_agents + rng.below(max_agents - min_agents + 1);
        let agents = (0..agent_count)
            .map(|n| {
                let mut agent_labels = Labels::new();
                match rng.below(3) {
                    0 => {}
                    1 => {
                        agent_labels.insert("os".into(), "linux".into());
                    }
                    _ => {
                        agent_labels.insert("os".into(), "mac".into());
                    }
                }
                if rng.one_in(2) {
                    let arch = if rng.one_in(2) { "x86" } else { "arm" };
                    agent_labels.insert("arch".into(), arch.into());
                }
                let slots = 1 + rng.below(3) as u32;
                (agent(n as u8 + 1), agent_labels, slots)
            })
            .collect();
        Self {
            runs,
            submitted: 0,
            agents,
            connected: std::collections::BTreeSet::new(),
            restart_below: 32,
        }
    }
}

pub fn random_run(rng: &mut Rng, run: u64, max_jobs: u64) -> Event {
    let job_count = 1 + rng.below(max_jobs) as u32;
    let pipeline = ["alpha", "beta", "gamma"][rng.below(3) as usize];
    let jobs = (0..job_count)
        .map(|index| {
            let needs: Vec<u32> = (0..index).filter(|_| rng.one_in(4)).take(3).collect();
            let mut job = plan(run, index, &needs);
            pipeline.clone_into(&mut job.pipeline);
            job.runs_on = match rng.below(6) {
                0 => labels(&[("os", "linux")]),
                1 => labels(&[("os", "mac")]),
                2 => labels(&[("arch", "x86")]),
                3 => labels(&[("os", "linux"), ("arch", "arm")]),
                _ => Labels::new(),
            };
            job.condition = match rng.below(12) {
                0 => StatusExpr::Failure,
                1 => StatusExpr::Always,
                2 => StatusExpr::Cancelled,
                3 => StatusExpr::Not(Box::new(StatusExpr::Cancelled)),
                4 => StatusExpr::Or(vec![StatusExpr::Success, StatusExpr::Failure]),
                5 => StatusExpr::Const(false),
                _ => StatusExpr::Success,
            };
            job.manual = rng.one_in(10);
            job.retry = rng.below(3) as u32;
            job.infra_retries = rng.below(3) as u32;
            job.timeout_ms = if rng.one_in(3) {
                0
            } else {
                20_000 + rng.below(100_000)
            };
            job.continue_on_error = rng.one_in(6);
            job
        })
        .collect();
    submit(run, pipeline, rng.below(2) as i32, jobs)
}

/// One random step, decoded from three bytes so proptest can shrink it.
pub fn apply_op(d: &mut Driver, world: &mut World, kind: u8, a: u8, b: u8) {
    let held: Vec<(JobId, AgentId, u32, bool)> = d
        .job_refs()
        .filter_map(|(job, state)| {
            let offered = matches!(state, JobState::Offered { .. });
            state
                .agent()
                .map(|(agent, attempt)| (job, agent.clone(), attempt, offered))
        })
        .filter(|(_, agent, _, _)| world.connected.contains(agent))
        .collect();
    let pick = |n: usize| usize::from(a) % n.max(1);
    match kind % 16 {
        0 if b < world.restart_below => {
            // The coordinator restarts: persist, reload, and every session is gone.
            d.restart();
            world.connected.clear();
            d.step(Event::Tick);
        }
        0 => d.advance_ms(u64::from(a) * 200 + u64::from(b) * 50),
        1 => {
            if world.submitted < world.runs.len() {
                let event = world.runs[world.submitted].clone();
                world.submitted += 1;
                d.step(event);
            }
        }
        2 => {
            let (id, agent_labels, slots) = world.agents[pick(world.agents.len())].clone();
            // Report the attempts it holds (b % 3 == 0), none (1), or those plus a stray.
            let mut running: Vec<(JobId, u32)> = d
                .job_refs()
                .filter_map(|(job, state)| {
                    state
                        .agent()
                        .filter(|(holder, _)| **holder == id)
                        .map(|(_, attempt)| (job, attempt))
                })
                .collect();
            match b % 3 {
                0 => {}
                1 => running.clear(),
                _ => running.push((jid(1, 0), 99)),
            }
            world.connected.insert(id.clone());
            d.step(Event::AgentConnected {
                agent: id,
                labels: agent_labels,
                slots,
                running,
            });
        }
        3 => {
            let id = world.agents[pick(world.agents.len())].0.clone();
            world.connected.remove(&id);
            d.step(Event::AgentDisconnected { agent: id });
        }
        4 | 5 => {
            let id = world.agents[pick(world.agents.len())].0.clone();
            if world.connected.contains(&id) {
                d.step(Event::AgentHeartbeat { agent: id });
            }
        }
        6 | 7 => {
            if let Some((job, agent, attempt, _)) = held.get(pick(held.len())).cloned() {
                d.step(Event::JobAccepted {
                    job,
                    attempt,
                    agent,
                });
            }
        }
        8 => {
            if let Some((job, agent, attempt, true)) = held.get(pick(held.len())).cloned() {
                d.step(Event::JobRejected {
                    job,
                    attempt,
                    agent,
                    reason: "busy".into(),
                });
            }
        }
        9 | 10 => {
            if let Some((job, agent, attempt, _)) = held.get(pick(held.len())).cloned() {
                let outcome = match b % 6 {
                    0 => Outcome::Failed { exit_code: 1 },
                    1 => Outcome::TimedOut,
                    2 => Outcome::Cancelled,
                    _ => Outcome::Succeeded,
                };
                d.step(Event::JobFinished {
                    job,
                    attempt,
                    agent,
                    outcome,
                });
            }
        }
        11 => {
            // A stale or misdirected report must change nothing and yield nothing. Timers
            // due at `now` fire on any event, so they are flushed with a tick first.
            d.step(Event::Tick);
            let held: Vec<(JobId, AgentId, u32)> = d
                .job_refs()
                .filter_map(|(job, state)| {
                    state
                        .agent()
                        .map(|(agent, attempt)| (job, agent.clone(), attempt))
                })
                .collect();
            if let Some((job, agent, attempt)) = held.get(pick(held.len())).cloned() {
                let (agent, attempt) = if b.is_multiple_of(2) {
                    (agent, attempt.saturating_sub(1))
                } else {
                    (common_stranger(), attempt)
                };
                let before = d.state(job);
                let out = d.step(Event::JobFinished {
                    job,
                    attempt,
                    agent,
                    outcome: Outcome::Succeeded,
                });
                assert!(out.is_empty(), "stale report produced {out:?}");
                assert_eq!(d.state(job), before, "stale report changed {job}");
            }
        }
        12 => {
            if b.is_multiple_of(4) && world.submitted > 0 {
                let run = 1 + u64::from(a) % world.submitted as u64;
                d.step(Event::CancelRun { run: RunId(run) });
            }
        }
        13 => {
            if b.is_multiple_of(3) {
                let jobs: Vec<JobId> = d.job_refs().map(|(job, _)| job).collect();
                if let Some(job) = jobs.get(pick(jobs.len())) {
                    d.step(Event::CancelJob { job: *job });
                }
            }
        }
        14 => {
            let waiting: Vec<JobId> = d
                .job_refs()
                .filter(|(_, s)| **s == JobState::AwaitingApproval)
                .map(|(j, _)| j)
                .collect();
            if let Some(job) = waiting.get(pick(waiting.len())) {
                d.step(Event::Approve { job: *job });
            }
        }
        _ => {
            d.advance_ms(u64::from(a) * 250);
            d.step(Event::Tick);
        }
    }
}

/// An agent that never connects.
fn common_stranger() -> AgentId {
    agent(250)
}

/// Submits whatever the world has left, drains, and checks the end state.
pub fn finish_world(d: &mut Driver, world: &mut World) {
    while world.submitted < world.runs.len() {
        let event = world.runs[world.submitted].clone();
        world.submitted += 1;
        d.step(event);
    }
    d.drain(&full_label_space());
    check_outcomes(d);
}

/// Run outcomes agree with job outcomes, and every job's attempts only ever grew.
pub fn check_outcomes(d: &Driver) {
    for (run, run_state) in d.scheduler.runs() {
        let jobs = d.scheduler.jobs_of(run);
        if run_state == gantry_scheduler::RunState::Succeeded {
            for (job, state) in jobs {
                let plan = d.scheduler.job_plan(job).expect("plan");
                let fine = matches!(state, JobState::Succeeded | JobState::Skipped)
                    || (matches!(state, JobState::Failed { .. }) && plan.continue_on_error);
                assert!(fine, "run {run} succeeded but {job} is {state:?}");
            }
        }
    }
    let mut last_attempt: BTreeMap<JobId, u32> = BTreeMap::new();
    for (job, attempt, _) in d.dispatches() {
        let previous = last_attempt.insert(job, attempt).unwrap_or(0);
        assert!(
            attempt > previous,
            "{job}: attempt {attempt} after {previous}"
        );
    }
}
