//! The scheduler's async shell: feeds it events, carries out its commands.
//!
//! Owns the one [`Scheduler`] of the coordinator, in one task. Sessions and admin
//! requests send [`Input`]s; the task takes every input that is waiting (a batch), runs
//! them through the scheduler with the current time, commits all their effects (job and
//! run records, results, the parts of the scheduler's state that changed) in one store
//! transaction, and only then acknowledges results, sends dispatches and cancels to
//! agents, and tells followers. It also wakes the scheduler at its next deadline (offer
//! and lease expiry, timeouts). Runs are rebuilt after a restart from the snapshot plus
//! the stored runs.
//!
//! One file (about 700 lines of code, the rest tests) because it is one thing: the
//! task, the batch it commits, and the translation both ways between the pipeline and
//! the scheduler (plans in, dispatches and stored states out) that the batch needs.
//! It must not know sessions: it reaches agents through [`AgentOutbox`].

use std::collections::HashMap;
use std::sync::Arc;

use gantry_pipeline::Pipeline;
use gantry_protocol::{
    AgentId, Attempt, ConditionValue, CoordinatorMessage, JobAssignment, JobExecution, JobId,
    JobOutcome, JobResult, Labels, RunId, StepSpec, UnixMillis,
};
use gantry_scheduler::{
    Changes, Command, Event, FailReason, JobPlan, JobState, Outcome, RunState, Scheduler, Snapshot,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::services::runner::DEPLOY_RUNNER_LABEL;
use crate::store::{
    JobChange, JobRecord, JobStatus, RunChange, RunRecord, RunRepoRecord, RunStatus,
    SchedulerWrite, Store, StoreError, StoredScheduler,
};

/// Time between SIGTERM and SIGKILL when a job is cancelled or times out.
pub const KILL_GRACE_MS: u64 = 10_000;
/// Most inputs handled in one batch (one store commit).
const MAX_BATCH: usize = 512;

/// Why the engine cannot start: the scheduler cannot be restored from the store.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored scheduler state is unreadable: {0}")]
    Unreadable(postcard::Error),
}

/// Something for the scheduler.
#[derive(Debug)]
pub enum Input {
    Event(Event),
    /// A run was stored: schedule it.
    Submitted {
        run: Box<RunRecord>,
        pipeline: Arc<Pipeline>,
        plans: Vec<JobPlan>,
        priority: i32,
    },
    /// An agent reported a result (with the job's outputs, when it declares any);
    /// `ack` answers once both are durable.
    Finished {
        agent: AgentId,
        result: JobResult,
        outputs: Option<Labels>,
        ack: oneshot::Sender<()>,
    },
}

/// A stored change, as followers see it.
#[derive(Debug, Clone)]
pub enum Change {
    Job(JobRecord),
    Run(RunRecord),
}

/// Where the engine sends messages to agents: the live sessions.
pub trait AgentOutbox: Send + Sync + 'static {
    /// Queues `message` for `agent`'s session; `false` if it has none.
    fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool;
    /// Values of secrets by name, for a job that references them.
    fn secrets(&self, names: &[String]) -> Labels;
    /// Whether `agent` understands `DispatchJob` (its hello was of protocol version
    /// [`gantry_protocol::EXECUTION_VERSION`] or later).
    fn speaks_execution(&self, agent: &AgentId) -> bool;
}

/// The scheduler label of agents that run execution options (`DispatchJob`); a job whose
/// execution is not plain requires it, so it is never placed on an older agent.
pub fn execution_label() -> String {
    capability_label("execution")
}

/// The label of agents that check out a run's source through the chunk store
/// (protocol [`gantry_protocol::TREE_SOURCE_VERSION`] or later).
pub fn tree_source_label() -> String {
    capability_label("tree-source")
}

/// Handle to the engine task.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Input>,
    changes: broadcast::Sender<Change>,
}

impl Engine {
    pub fn send(&self, input: Input) {
        // The engine task lives as long as the server; a send after shutdown is moot.
        let _ = self.tx.send(input);
    }

    pub fn event(&self, event: Event) {
        self.send(Input::Event(event));
    }

    /// Stored changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Restores the scheduler from the store and starts the engine task.
    pub fn start(
        store: Arc<Store>,
        outbox: Arc<dyn AgentOutbox>,
        metrics: Arc<crate::base::metrics::Metrics>,
    ) -> Result<Self, EngineError> {
        let now = UnixMillis::now();
        let unreadable = EngineError::Unreadable;
        let scheduler = match store.scheduler_state()? {
            StoredScheduler::Parts { core, runs, jobs } => {
                let core = postcard::from_bytes(&core).map_err(unreadable)?;
                let runs = runs
                    .iter()
                    .map(|b| postcard::from_bytes(b))
                    .collect::<Result<_, _>>()
                    .map_err(unreadable)?;
                let jobs = jobs
                    .iter()
                    .map(|b| postcard::from_bytes(b))
                    .collect::<Result<_, _>>()
                    .map_err(unreadable)?;
                Scheduler::restore(Snapshot::from_parts(core, runs, jobs), now)
            }
            StoredScheduler::Legacy(bytes) => {
                let snapshot = postcard::from_bytes(&bytes).map_err(unreadable)?;
                let mut scheduler = Scheduler::restore(snapshot, now);
                // Stored whole by an older coordinator: the first batch stores it in parts.
                scheduler.mark_all_unsaved();
                scheduler
            }
            StoredScheduler::None => Scheduler::new(),
        };
        let mut contexts = HashMap::new();
        let mut resubmit = Vec::new();
        for record in store.unfinished_runs()? {
            let pipeline = match gantry_pipeline::parse(&record.file_name, &record.text) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::error!(run = %record.run, "stored pipeline no longer parses, run cannot continue: {e}");
                    continue;
                }
            };
            if scheduler.run_state(record.run).is_none() {
                // Stored but not yet in the snapshot (crash between the two): submit again.
                resubmit.push((record.run, pipeline.clone()));
            }
            let repo = run_repo(&store, record.run);
            contexts.insert(
                record.run,
                RunContext {
                    record,
                    pipeline,
                    repo,
                },
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (changes, _) = broadcast::channel(4096);
        let engine = Self {
            tx,
            changes: changes.clone(),
        };
        // Through the channel, not straight into the scheduler: the commands a
        // resubmission yields (a skipped root job, a run that ends at once) must be
        // committed like any other batch's, and the first batch does that.
        for (run, pipeline) in resubmit {
            let record = contexts[&run].record.clone();
            // A store that cannot say which agents may take the run's jobs must not
            // let them go to any agent: the run waits for the next start.
            let agent_labels = match store.run_agent_labels(run) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%run, "cannot read the run's agent labels, not resubmitting it: {e}");
                    continue;
                }
            };
            let plans = plans_for(run, &pipeline, &record, &agent_labels);
            engine.send(Input::Submitted {
                run: Box::new(record),
                priority: pipeline.priority,
                pipeline,
                plans,
            });
        }
        let task = EngineTask {
            scheduler,
            contexts,
            store,
            outbox,
            changes,
            metrics,
            queued_at: HashMap::new(),
        };
        tokio::spawn(task.run(rx));
        Ok(engine)
    }
}

#[derive(Debug)]
struct RunContext {
    record: RunRecord,
    pipeline: Arc<Pipeline>,
    /// The repository side of a run built from a repository's commit.
    repo: Option<RunRepoRecord>,
}

impl RunContext {
    /// The run-wide values of `git.*`, `event.*` and `GANTRY_*`.
    fn git(&self) -> gantry_pipeline::StaticContext {
        git_context(&self.record, self.repo.as_ref())
    }
}

/// The run-wide values of `git.*`, `event.*` and `GANTRY_*` of a stored run.
fn git_context(r: &RunRecord, repo: Option<&RunRepoRecord>) -> gantry_pipeline::StaticContext {
    let full_ref = repo.map_or(String::new(), |p| p.full_ref.clone());
    gantry_pipeline::StaticContext {
        branch: full_ref.strip_prefix("refs/heads/").map_or_else(
            || {
                if repo.is_none() {
                    r.git_ref.clone()
                } else {
                    String::new()
                }
            },
            str::to_owned,
        ),
        tag: full_ref
            .strip_prefix("refs/tags/")
            .unwrap_or_default()
            .to_owned(),
        git_ref: full_ref,
        event: r.event.clone(),
        commit: r.commit.clone().unwrap_or_default(),
        repo: repo.map(|p| p.repo.clone()).unwrap_or_default(),
        actor: r.created_by.clone(),
        pr_number: repo
            .and_then(|p| p.pr_number)
            .map(|n| n.to_string())
            .unwrap_or_default(),
        pr_base: repo.and_then(|p| p.pr_base.clone()).unwrap_or_default(),
        ..gantry_pipeline::StaticContext::default()
    }
}

/// A run's pipeline-level `concurrency:` group with its references filled in the way a
/// job's fields are (`git.*`, `event.*`, `inputs.*`, `env.*`), or `None` without one.
pub fn concurrency_group(
    pipeline: &Pipeline,
    record: &RunRecord,
    repo: Option<&RunRepoRecord>,
) -> Option<String> {
    let group = &pipeline.concurrency.as_ref()?.group;
    let ctx = gantry_pipeline::StaticContext {
        inputs: effective_inputs(pipeline, &record.inputs),
        env: pipeline.env.clone(),
        ..git_context(record, repo)
    };
    Some(ctx.expand(group))
}

/// The repository side of a run, if it has one (a store error is logged: the run's jobs
/// then lack `GANTRY_REPO`, which is better than not running).
fn run_repo(store: &Store, run: RunId) -> Option<RunRepoRecord> {
    store.run_repo(run).unwrap_or_else(|e| {
        tracing::error!(%run, "cannot read the run's repository: {e}");
        None
    })
}

struct EngineTask {
    metrics: Arc<crate::base::metrics::Metrics>,
    /// When each queued job was queued, for the dispatch latency histogram.
    queued_at: HashMap<JobId, std::time::Instant>,
    scheduler: Scheduler,
    contexts: HashMap<RunId, RunContext>,
    store: Arc<Store>,
    outbox: Arc<dyn AgentOutbox>,
    changes: broadcast::Sender<Change>,
}

impl EngineTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            let deadline = self.scheduler.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => {
                        tokio::time::sleep(std::time::Duration::from_millis(
                            at.millis_since(UnixMillis::now()),
                        ))
                        .await;
                    }
                    None => std::future::pending().await,
                }
            };
            let mut batch = Vec::new();
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => batch.push(input),
                    None => return,
                },
                () = sleep => batch.push(Input::Event(Event::Tick)),
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(input) => batch.push(input),
                    Err(_) => break,
                }
            }
            self.step(batch);
        }
    }

    /// Handles a batch: scheduler first, then one commit, then the outside world.
    fn step(&mut self, batch: Vec<Input>) {
        let now = UnixMillis::now();
        let mut commands = Vec::new();
        let mut acks = Vec::new();
        let mut job_changes: Vec<JobChange> = Vec::new();
        let mut outputs_reported: Vec<(JobId, Labels)> = Vec::new();
        for input in batch {
            match input {
                Input::Event(event) => commands.extend(self.scheduler.handle(now, event)),
                Input::Submitted {
                    run,
                    pipeline,
                    plans,
                    priority,
                } => {
                    let name = pipeline.name.clone();
                    let repo = run_repo(&self.store, run.run);
                    self.contexts.insert(
                        run.run,
                        RunContext {
                            record: *run.clone(),
                            pipeline,
                            repo,
                        },
                    );
                    commands.extend(self.scheduler.handle(
                        now,
                        Event::RunSubmitted {
                            run: run.run,
                            pipeline: name,
                            priority,
                            jobs: plans,
                        },
                    ));
                }
                Input::Finished {
                    agent,
                    result,
                    outputs,
                    ack,
                } => {
                    if let Some(outputs) = outputs {
                        outputs_reported.push((result.job, outputs));
                        // Before the need's result: its dependents' conditions are
                        // evaluated when it finishes.
                        let resolved = self.conditions_with_outputs(result.job, &outputs_reported);
                        for event in resolved {
                            commands.extend(self.scheduler.handle(now, event));
                        }
                    }
                    let outcome = match &result.outcome {
                        JobOutcome::Succeeded => Outcome::Succeeded,
                        JobOutcome::Failed { exit_code, .. } => Outcome::Failed {
                            exit_code: *exit_code,
                        },
                        JobOutcome::TimedOut => Outcome::TimedOut,
                        JobOutcome::Cancelled => Outcome::Cancelled,
                        // Could not even start: report as a failure with the shell's
                        // "cannot execute" code, so it is retried like one.
                        JobOutcome::Error { .. } => Outcome::Failed { exit_code: 126 },
                    };
                    self.metrics.job_duration(
                        result.finished_at.millis_since(result.started_at) as f64 / 1000.0,
                    );
                    let (chunks, attempt) = (result.log_chunks, result.attempt);
                    let (started, finished) = (result.started_at, result.finished_at);
                    job_changes.push((
                        result.job,
                        Box::new(move |r: &mut JobRecord| {
                            if r.attempt == attempt {
                                r.log_chunks = Some(chunks);
                                r.started_at = Some(started);
                                r.finished_at = Some(finished);
                            }
                        }),
                    ));
                    commands.extend(self.scheduler.handle(
                        now,
                        Event::JobFinished {
                            job: result.job,
                            attempt: result.attempt,
                            agent,
                            outcome,
                        },
                    ));
                    acks.push(ack);
                }
            }
        }
        let mut run_changes: Vec<RunChange> = Vec::new();
        let mut finished_runs = Vec::new();
        for command in &commands {
            self.observe(command);
        }
        self.metrics
            .set_queue_depth(self.scheduler.queue_len() as u64);
        for command in &commands {
            match command {
                Command::JobChanged {
                    job,
                    attempt,
                    state,
                } => job_changes.push((*job, record_change(*attempt, state.clone(), now))),
                Command::RunChanged { run, state } => {
                    let state = *state;
                    if state.is_terminal() {
                        finished_runs.push(*run);
                    }
                    run_changes.push((
                        *run,
                        Box::new(move |r: &mut RunRecord| {
                            r.state = run_status(state);
                            if state.is_terminal() {
                                r.finished_at.get_or_insert(now);
                            }
                        }),
                    ));
                }
                Command::RunRejected { run, error } => {
                    tracing::error!(%run, "scheduler refused a stored run: {error}");
                    run_changes.push((
                        *run,
                        Box::new(move |r: &mut RunRecord| {
                            r.state = RunStatus::Failed;
                            r.finished_at.get_or_insert(now);
                        }),
                    ));
                }
                Command::Dispatch { .. } | Command::Cancel { .. } => {}
            }
        }
        for run in &finished_runs {
            self.scheduler.forget_run(*run);
        }
        // Only what changed is written: with thousands of jobs in flight the whole state
        // was megabytes per batch (see docs/decisions/0069-scheduler-state-in-parts.md).
        let changes = self.scheduler.take_changes();
        let write = if changes.is_empty() {
            None
        } else {
            match encode_changes(&changes) {
                Ok(write) => Some(write),
                Err(e) => {
                    tracing::error!("cannot encode the scheduler state: {e}");
                    self.scheduler.keep_unsaved(&changes);
                    None
                }
            }
        };
        if write.is_none() && run_changes.is_empty() && job_changes.is_empty() {
            self.carry_out(&commands);
            return;
        }
        let store = &self.store;
        match blocking(|| {
            store.apply(
                &job_changes,
                &outputs_reported,
                &run_changes,
                write.as_ref(),
            )
        }) {
            Ok((jobs, runs)) => {
                for ack in acks {
                    let _ = ack.send(());
                }
                for r in &runs {
                    if let Some(ctx) = self.contexts.get_mut(&r.run) {
                        ctx.record = r.clone();
                    }
                }
                self.carry_out(&commands);
                for job in jobs {
                    let _ = self.changes.send(Change::Job(job));
                }
                for run in runs {
                    let _ = self.changes.send(Change::Run(run));
                }
                for run in finished_runs {
                    self.contexts.remove(&run);
                }
            }
            Err(e) => {
                // Nothing is acknowledged: agents resend their results, and dispatches
                // are not sent (their offers time out and are made again).
                tracing::error!("cannot store scheduler changes: {e}");
                self.scheduler.keep_unsaved(&changes);
            }
        }
    }

    /// Feeds the figures of `/metrics` from one command.
    fn observe(&mut self, command: &Command) {
        match command {
            Command::Dispatch { .. } => self.metrics.dispatched(),
            Command::JobChanged { job, state, .. } => match state {
                JobState::Queued => {
                    self.queued_at
                        .entry(*job)
                        .or_insert_with(std::time::Instant::now);
                }
                JobState::Running { .. } => {
                    if let Some(at) = self.queued_at.remove(job) {
                        self.metrics.dispatch_latency(at.elapsed().as_secs_f64());
                    }
                }
                s if s.is_terminal() => {
                    self.queued_at.remove(job);
                    self.metrics.job_ended(job_status(s).as_str());
                }
                _ => {}
            },
            Command::RunChanged { state, .. } if state.is_terminal() => {
                self.metrics.run_ended(run_status(*state).as_str());
            }
            _ => {}
        }
    }

    fn carry_out(&self, commands: &[Command]) {
        for command in commands {
            match command {
                Command::Dispatch {
                    job,
                    attempt,
                    agent,
                    ..
                } => {
                    let Some((assignment, execution)) = self.assignment(*job, *attempt) else {
                        tracing::error!(%job, "no pipeline for a dispatched job");
                        continue;
                    };
                    let message = if self.outbox.speaks_execution(agent) {
                        CoordinatorMessage::DispatchJob {
                            assignment: Box::new(assignment),
                            execution: Box::new(execution),
                        }
                    } else if execution.is_plain() || self.deploys(*job) {
                        // The deploy runner reads the assignment alone.
                        CoordinatorMessage::Dispatch(Box::new(assignment))
                    } else {
                        // The job requires the execution label, so only an agent that
                        // reconnected older between the offer and now gets here.
                        tracing::warn!(%job, %agent, "the agent no longer runs execution options; the offer will time out and be made again");
                        continue;
                    };
                    if !self.outbox.send(agent, message) {
                        tracing::warn!(%job, %agent, "agent has no session; the offer will time out and be made again");
                    }
                }
                Command::Cancel {
                    job,
                    attempt,
                    agent,
                } => {
                    self.outbox.send(
                        agent,
                        CoordinatorMessage::Cancel {
                            job: *job,
                            attempt: *attempt,
                        },
                    );
                }
                _ => {}
            }
        }
    }

    /// Whether `job` is a deploy job (run by the deploy runner, not an agent).
    fn deploys(&self, job: JobId) -> bool {
        self.contexts
            .get(&job.run)
            .and_then(|ctx| ctx.pipeline.jobs.get(job.index as usize))
            .is_some_and(|spec| spec.deploy.is_some())
    }

    /// The conditions of the jobs that need `finished`, with every output of their needs
    /// known so far filled in (`reported` holds this batch's, not yet stored): events
    /// for the jobs whose condition compares a need's output.
    fn conditions_with_outputs(&self, finished: JobId, reported: &[(JobId, Labels)]) -> Vec<Event> {
        let Some(ctx) = self.contexts.get(&finished.run) else {
            return Vec::new();
        };
        let Some(done) = ctx.pipeline.jobs.get(finished.index as usize) else {
            return Vec::new();
        };
        let static_ctx = static_context(&ctx.pipeline, &ctx.record);
        let mut events = Vec::new();
        for (id, job) in job_ids(finished.run, &ctx.pipeline) {
            if !job.needs.contains(&done.name) {
                continue;
            }
            let folded = job.condition.fold(&static_ctx, &job.matrix);
            let needs = self.needs_outputs_with(finished.run, &ctx.pipeline, job, reported);
            let known = |value: &ConditionValue| match value {
                ConditionValue::NeedsOutput { job, name } => needs_output(&needs, job, name),
                _ => None,
            };
            let resolved = folded.resolve_outputs(&known);
            if resolved != folded {
                events.push(Event::ConditionResolved {
                    job: id,
                    condition: resolved,
                });
            }
        }
        events
    }

    /// The outputs of `spec`'s needs by job key (several expansions of a matrix job
    /// share their key: a value one of them reported wins over an empty one).
    fn needs_outputs(
        &self,
        run: RunId,
        pipeline: &Pipeline,
        spec: &gantry_pipeline::Job,
    ) -> NeedsOutputs {
        self.needs_outputs_with(run, pipeline, spec, &[])
    }

    /// [`Self::needs_outputs`], with outputs reported in this batch (not yet stored)
    /// taking the place of stored ones.
    fn needs_outputs_with(
        &self,
        run: RunId,
        pipeline: &Pipeline,
        spec: &gantry_pipeline::Job,
        reported: &[(JobId, Labels)],
    ) -> NeedsOutputs {
        let mut outputs = NeedsOutputs::new();
        for need in &spec.needs {
            let Some(index) = pipeline.jobs.iter().position(|j| &j.name == need) else {
                continue;
            };
            let id = JobId {
                run,
                index: u32::try_from(index).unwrap_or(u32::MAX),
            };
            let values = match reported.iter().rev().find(|(job, _)| *job == id) {
                Some((_, values)) => values.clone(),
                None => self.store.job_outputs(id).unwrap_or_else(|e| {
                    tracing::error!(job = %id, "cannot read the job's outputs: {e}");
                    Labels::new()
                }),
            };
            let entry = outputs.entry(pipeline.jobs[index].key.clone()).or_default();
            for (name, value) in values {
                if !value.is_empty() || !entry.contains_key(&name) {
                    entry.insert(name, value);
                }
            }
        }
        outputs
    }

    /// Builds what the agent needs for one attempt, from the stored pipeline, with the
    /// needs' outputs filled in.
    fn assignment(&self, job: JobId, attempt: Attempt) -> Option<(JobAssignment, JobExecution)> {
        let ctx = self.contexts.get(&job.run)?;
        let spec = ctx.pipeline.jobs.get(job.index as usize)?;
        let git = ctx.git();
        let needs = self.needs_outputs(job.run, &ctx.pipeline, spec);
        let expand = |text: &str| {
            expand_references(text, &ctx.record.inputs, &git, &ctx.pipeline, spec, &needs)
        };
        let mut execution = spec.execution(&gantry_pipeline::StaticContext {
            inputs: effective_inputs(&ctx.pipeline, &ctx.record.inputs),
            env: ctx.pipeline.env.clone(),
            ..git.clone()
        });
        let known = |value: &ConditionValue| match value {
            ConditionValue::NeedsOutput { job, name } => needs_output(&needs, job, name),
            _ => None,
        };
        for step in &mut execution.steps {
            step.condition = step.condition.resolve_outputs(&known);
        }
        for template in execution.outputs.values_mut() {
            *template = expand(template);
        }
        for cache in &mut execution.caches {
            cache.spec.key = expand(&cache.spec.key);
            for key in &mut cache.spec.restore_keys {
                *key = expand(key);
            }
        }
        let mut env = git_env(&git);
        for (k, v) in ctx.pipeline.env.iter().chain(&spec.env) {
            env.insert(k.clone(), expand(v));
        }
        let names: Vec<String> = gantry_pipeline::referenced_secrets(spec)
            .into_iter()
            .collect();
        let steps = spec
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepSpec {
                name: s.name.clone().unwrap_or_else(|| {
                    s.run.lines().next().map_or_else(
                        || format!("step {}", i + 1),
                        |l| l.chars().take(60).collect(),
                    )
                }),
                run: expand(&s.run),
                working_directory: s.working_directory.as_deref().map(expand),
                env: s.env.iter().map(|(k, v)| (k.clone(), expand(v))).collect(),
            })
            .collect();
        let assignment = JobAssignment {
            job,
            attempt,
            run: job.run,
            pipeline: ctx.pipeline.name.clone(),
            name: spec.name.clone(),
            steps,
            env,
            timeout_ms: spec.timeout_ms,
            kill_grace_ms: KILL_GRACE_MS,
            image: spec.image.as_ref().map(|i| i.name.clone()),
            secrets: self.outbox.secrets(&names),
            // `checkout: false`: the job starts in an empty workspace.
            source: ctx
                .record
                .source
                .clone()
                .filter(|_| spec.checkout != gantry_protocol::Checkout::Skip),
            downloads: match &spec.download {
                Some(names) => !names.is_empty(),
                // Only a round trip worth making: some need declares an artifact.
                None => spec.needs.iter().any(|n| {
                    ctx.pipeline
                        .job(n)
                        .is_some_and(|need| need.artifact.is_some())
                }),
            },
            artifact: spec
                .artifact
                .as_ref()
                .map(|a| gantry_protocol::ArtifactSpec {
                    name: a.name.clone(),
                    paths: a.paths.clone(),
                    expire_in_secs: a.expire_in_secs,
                }),
            cache: spec.caches.first().map(|c| gantry_protocol::CacheSpec {
                key: expand(&c.key),
                restore_keys: c.restore_keys.iter().map(|k| expand(k)).collect(),
                paths: c.paths.clone(),
            }),
        };
        Some((assignment, execution))
    }
}

/// Runs `f`, which waits on the disk (a commit's fsync), without holding up the tasks
/// queued on this worker thread: on a multi-threaded runtime they are handed to another
/// thread first. With 10,000 agents a commit on a worker stalled the sessions behind it
/// (docs/decisions/0062-commits-off-worker-threads.md). Only commits pay for the
/// hand-off; most batches (heartbeats) commit nothing.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The scheduler's changed parts as the store keeps them (postcard).
fn encode_changes(changes: &Changes) -> Result<SchedulerWrite, postcard::Error> {
    Ok(SchedulerWrite {
        core: postcard::to_stdvec(&changes.core)?,
        runs: changes
            .runs
            .iter()
            .map(|(id, run)| Ok((*id, run.as_ref().map(postcard::to_stdvec).transpose()?)))
            .collect::<Result<_, postcard::Error>>()?,
        jobs: changes
            .jobs
            .iter()
            .map(|(id, job)| Ok((*id, job.as_ref().map(postcard::to_stdvec).transpose()?)))
            .collect::<Result<_, postcard::Error>>()?,
    })
}

/// A job's `GANTRY_*` variables of the run's commit and event (the agent adds the ids).
fn git_env(git: &gantry_pipeline::StaticContext) -> Labels {
    [
        ("GANTRY_COMMIT", &git.commit),
        ("GANTRY_REF", &git.git_ref),
        ("GANTRY_BRANCH", &git.branch),
        ("GANTRY_TAG", &git.tag),
        ("GANTRY_EVENT", &git.event),
        ("GANTRY_ACTOR", &git.actor),
        ("GANTRY_REPO", &git.repo),
        ("GANTRY_PR_NUMBER", &git.pr_number),
        ("GANTRY_PR_BASE", &git.pr_base),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.clone()))
    .collect()
}

/// The outputs of a job's needs: job key → output name → value.
type NeedsOutputs = HashMap<String, Labels>;

/// `needs.JOB.outputs.NAME`'s value: what `JOB` reported, empty if it reported no such
/// output (as in GitHub Actions); `None` if `JOB` is not a need.
fn needs_output(needs: &NeedsOutputs, job: &str, name: &str) -> Option<String> {
    needs
        .get(job)
        .map(|outputs| outputs.get(name).cloned().unwrap_or_default())
}

/// Expands `${{ inputs.NAME }}`, `${{ git.* }}`, `${{ event.* }}`, `${{ env.NAME }}` and
/// `${{ needs.JOB.outputs.NAME }}`; leaves `${{ secrets.* }}` and `${{ steps.* }}` to the
/// agent.
fn expand_references(
    text: &str,
    inputs: &Labels,
    git: &gantry_pipeline::StaticContext,
    pipeline: &Pipeline,
    job: &gantry_pipeline::Job,
    needs: &NeedsOutputs,
) -> String {
    gantry_protocol::template::expand(text, |expr| {
        if expr.starts_with("git.") || expr.starts_with("event.") {
            gantry_pipeline::parse_reference(expr)
                .ok()
                .and_then(|r| git.value(&r))
        } else if let Some(rest) = expr.strip_prefix("needs.") {
            let (job, name) = rest.rsplit_once(".outputs.")?;
            needs_output(needs, job, name)
        } else if let Some(name) = expr.strip_prefix("inputs.") {
            inputs.get(name).cloned().or_else(|| {
                pipeline
                    .triggers
                    .inputs
                    .get(name)
                    .and_then(|i| i.default.clone())
            })
        } else if let Some(name) = expr.strip_prefix("env.") {
            job.env
                .get(name)
                .or_else(|| pipeline.env.get(name))
                .cloned()
        } else {
            None
        }
    })
}

/// What is known of a run when it starts, for folding conditions.
fn static_context(pipeline: &Pipeline, record: &RunRecord) -> gantry_pipeline::StaticContext {
    gantry_pipeline::StaticContext {
        branch: record.git_ref.clone(),
        event: record.event.clone(),
        inputs: effective_inputs(pipeline, &record.inputs),
        env: pipeline.env.clone(),
        ..gantry_pipeline::StaticContext::default()
    }
}

/// The scheduler's plans for a stored run.
/// `agent_labels`: what every agent of the run must carry on top of each job's labels
/// (an untrusted run's; see [`Store::run_agent_labels`]). They are reserved labels no
/// pipeline can ask for, so adding them never contradicts a job's own.
pub fn plans_for(
    run: RunId,
    pipeline: &Pipeline,
    record: &RunRecord,
    agent_labels: &Labels,
) -> Vec<JobPlan> {
    let ctx = static_context(pipeline, record);
    let index_of: HashMap<&str, u32> = pipeline
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    job_ids(run, pipeline)
        .map(|(id, job)| JobPlan {
            id,
            name: job.name.clone(),
            pipeline: pipeline.name.clone(),
            needs: job
                .needs
                .iter()
                .filter_map(|n| index_of.get(n.as_str()))
                .map(|&index| JobId { run, index })
                .collect(),
            runs_on: {
                let mut labels = required_labels(job, &ctx, record.source.as_deref());
                labels.extend(agent_labels.clone());
                labels
            },
            condition: job.condition.fold(&ctx, &job.matrix),
            manual: job.manual,
            retry: job.retry,
            infra_retries: gantry_scheduler::DEFAULT_INFRA_RETRIES,
            timeout_ms: job.timeout_ms,
            continue_on_error: job.continue_on_error,
        })
        .collect()
}

/// The jobs of a run's pipeline with their ids (`RUN.INDEX`, in file order).
pub fn job_ids(
    run: RunId,
    pipeline: &Pipeline,
) -> impl Iterator<Item = (JobId, &gantry_pipeline::Job)> {
    pipeline.jobs.iter().enumerate().map(move |(i, job)| {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        (JobId { run, index }, job)
    })
}

/// The scheduler label that says an agent has a capability.
pub fn capability_label(capability: &str) -> String {
    format!("gantry.capability/{capability}")
}

/// Labels a job needs: its `runs-on`, plus `docker` for an `image:` job, plus the
/// execution label when its execution is not plain (agents older than protocol version
/// 3 would ignore its options), plus the tree-source label when it checks out a commit
/// stored through the chunk store. A deploy job runs on the coordinator's deploy runner
/// alone.
fn required_labels(
    job: &gantry_pipeline::Job,
    ctx: &gantry_pipeline::StaticContext,
    source: Option<&str>,
) -> Labels {
    if job.deploy.is_some() {
        return Labels::from([(DEPLOY_RUNNER_LABEL.to_owned(), "true".to_owned())]);
    }
    let mut labels = job.runs_on.clone();
    if job.image.is_some() {
        labels.insert(capability_label("docker"), "true".into());
    }
    if !job.execution(ctx).is_plain() {
        labels.insert(execution_label(), "true".into());
    }
    if source.is_some_and(gantry_protocol::TreeSource::is_tree)
        && job.checkout != gantry_protocol::Checkout::Skip
    {
        labels.insert(tree_source_label(), "true".into());
    }
    labels
}

/// Inputs given, with the pipeline's defaults for the others.
pub fn effective_inputs(pipeline: &Pipeline, given: &Labels) -> Labels {
    let mut inputs: Labels = pipeline
        .triggers
        .inputs
        .iter()
        .filter_map(|(k, spec)| spec.default.clone().map(|d| (k.clone(), d)))
        .collect();
    inputs.extend(given.clone());
    inputs
}

fn record_change(
    attempt: Attempt,
    state: JobState,
    now: UnixMillis,
) -> Box<dyn Fn(&mut JobRecord) + Send> {
    Box::new(move |r: &mut JobRecord| {
        r.state = job_status(&state);
        if attempt > 0 {
            r.attempt = attempt;
        }
        match &state {
            JobState::Offered { agent, attempt, .. } => {
                r.agent = Some(agent.clone());
                if !r.attempts.iter().any(|(a, _)| a == attempt) {
                    r.attempts.push((*attempt, agent.clone()));
                }
                r.exit_code = None;
                r.finished_at = None;
                r.log_chunks = None;
            }
            JobState::Running {
                agent, started_at, ..
            } => {
                r.agent = Some(agent.clone());
                r.started_at = Some(*started_at);
            }
            JobState::Failed {
                reason: FailReason::ExitCode(code),
            } => {
                r.exit_code = Some(*code);
                r.finished_at.get_or_insert(now);
            }
            s if s.is_terminal() => {
                r.finished_at.get_or_insert(now);
            }
            _ => {}
        }
    })
}

/// How a scheduler's job state is stored (and shown).
pub fn job_status(state: &JobState) -> JobStatus {
    match state {
        JobState::Pending => JobStatus::Pending,
        JobState::AwaitingApproval => JobStatus::AwaitingApproval,
        JobState::Queued => JobStatus::Queued,
        JobState::Offered { .. } => JobStatus::Offered,
        JobState::Running {
            cancelling: true, ..
        } => JobStatus::Cancelling,
        JobState::Running { .. } => JobStatus::Running,
        JobState::Succeeded => JobStatus::Succeeded,
        JobState::Failed {
            reason: FailReason::TimedOut,
        } => JobStatus::TimedOut,
        JobState::Failed {
            reason: FailReason::Lost,
        } => JobStatus::Lost,
        JobState::Failed { .. } => JobStatus::Failed,
        JobState::Cancelled => JobStatus::Cancelled,
        JobState::Skipped => JobStatus::Skipped,
    }
}

/// How a scheduler's run state is stored (and shown).
pub fn run_status(state: RunState) -> RunStatus {
    match state {
        RunState::Running => RunStatus::Running,
        RunState::Succeeded => RunStatus::Succeeded,
        RunState::Failed => RunStatus::Failed,
        RunState::Cancelled => RunStatus::Cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manual run of `text` on `main`, as `gantry run` stores it.
    fn run_record(run: RunId, pipeline: &str, text: &str) -> RunRecord {
        RunRecord {
            run,
            pipeline: pipeline.into(),
            file_name: "p.yml".into(),
            text: text.into(),
            git_ref: "main".into(),
            commit: None,
            event: "manual".into(),
            inputs: Labels::new(),
            created_at: UnixMillis::now(),
            created_by: "t".into(),
            state: RunStatus::Running,
            finished_at: None,
            source: None,
        }
    }

    struct NoAgents;
    impl AgentOutbox for NoAgents {
        fn send(&self, _: &AgentId, _: CoordinatorMessage) -> bool {
            false
        }
        fn secrets(&self, _: &[String]) -> Labels {
            Labels::new()
        }
        fn speaks_execution(&self, _: &AgentId) -> bool {
            false
        }
    }

    /// A crash between storing a run and storing the scheduler's state leaves a run the
    /// snapshot lacks. Its resubmission at start must be committed: here its only job's
    /// condition is false, so the run must end (skipped) in the store, not stay pending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_stored_but_missing_from_the_snapshot_is_resubmitted_and_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("state.redb")).expect("store"));
        let text = "jobs:\n  only:\n    if: branch == 'release'\n    steps: [{ run: x }]\n";
        let (run, _) = store
            .create_run(
                |run| {
                    let record = run_record(run, "p", text);
                    let job = JobRecord::pending(JobId { run, index: 0 }, "only".into(), vec![]);
                    (record, vec![job])
                },
                &Labels::new(),
                &crate::store::AuditEntry {
                    at: UnixMillis::now(),
                    actor: "t".into(),
                    action: "run.create".into(),
                    detail: String::new(),
                },
            )
            .expect("create run");
        assert!(matches!(
            store.scheduler_state().expect("state"),
            StoredScheduler::None
        ));
        let _engine = Engine::start(store.clone(), Arc::new(NoAgents), Arc::default())
            .expect("engine starts");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stored = store.run(run.run).expect("read run").expect("run stored");
            let job = store.jobs_of(run.run).expect("read jobs");
            if stored.finished_at.is_some() && job[0].state != JobStatus::Pending {
                assert_eq!(
                    job[0].state,
                    JobStatus::Skipped,
                    "the job's condition is false"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the resubmitted run never ended in the store: run {stored:?}, job {:?}",
                job[0]
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A job whose options an older agent would ignore goes only to agents that said
    /// protocol version 3 or later (the session gives them the execution label).
    #[test]
    fn jobs_with_execution_options_need_an_agent_that_runs_them() {
        let text = "jobs:\n  plain:\n    steps: [{ run: x }]\n  options:\n    steps: [{ run: y, continue-on-error: true }]\n  outputs:\n    outputs: { v: '${{ steps.s.outputs.v }}' }\n    steps: [{ id: s, run: z }]\n";
        let pipeline = gantry_pipeline::parse("p.yml", text).expect("parse");
        let record = run_record(RunId(3), &pipeline.name, text);
        let plans = plans_for(RunId(3), &pipeline, &record, &Labels::new());
        let needs_execution = |i: usize| plans[i].runs_on.get(&execution_label()).cloned();
        assert_eq!(needs_execution(0), None, "a plain job runs anywhere");
        assert_eq!(needs_execution(1).as_deref(), Some("true"));
        assert_eq!(needs_execution(2).as_deref(), Some("true"));
    }

    /// A job checking out a commit stored through the chunk store goes only to agents
    /// of protocol version 4 or later (the session gives them the tree-source label);
    /// `checkout: false` and a run of an uploaded archive run anywhere.
    #[test]
    fn jobs_checking_out_a_tree_need_an_agent_that_reads_one() {
        let text = "jobs:\n  build:\n    steps: [{ run: x }]\n  notify:\n    checkout: false\n    steps: [{ run: y }]\n";
        let pipeline = gantry_pipeline::parse("p.yml", text).expect("parse");
        let mut record = run_record(RunId(4), &pipeline.name, text);
        let digest = gantry_protocol::Digest::from_bytes([1; 32]);
        record.source = Some(
            gantry_protocol::TreeSource {
                tree: digest,
                with_submodules: None,
                git: vec![(Some(1), digest)],
            }
            .encode(),
        );
        let plans = plans_for(RunId(4), &pipeline, &record, &Labels::new());
        let needs_tree = |i: usize| plans[i].runs_on.get(&tree_source_label()).cloned();
        assert_eq!(needs_tree(0).as_deref(), Some("true"));
        assert_eq!(needs_tree(1), None, "checkout: false needs no source");
        record.source = Some(format!("sha256:{}", "0".repeat(64)));
        let plans = plans_for(RunId(4), &pipeline, &record, &Labels::new());
        assert_eq!(plans[0].runs_on.get(&tree_source_label()), None);
    }

    #[test]
    fn needs_outputs_fill_in_and_an_unreported_one_is_empty() {
        let needs = NeedsOutputs::from([(
            "build".to_owned(),
            Labels::from([("version".to_owned(), "1.4.2".to_owned())]),
        )]);
        assert_eq!(
            needs_output(&needs, "build", "version").as_deref(),
            Some("1.4.2")
        );
        assert_eq!(needs_output(&needs, "build", "other").as_deref(), Some(""));
        assert_eq!(needs_output(&needs, "lint", "version"), None, "not a need");
    }

    #[test]
    fn image_jobs_need_a_docker_capable_agent_and_needs_map_to_job_ids() {
        let text = "jobs:\n  a:\n    runs-on: { os: linux }\n    steps: [{ run: x }]\n  b:\n    needs: a\n    image: alpine:3\n    steps: [{ run: y }]\n";
        let pipeline = gantry_pipeline::parse("p.yml", text).expect("parse");
        let record = run_record(RunId(9), &pipeline.name, text);
        let plans = plans_for(RunId(9), &pipeline, &record, &Labels::new());
        assert_eq!(
            plans[0].runs_on,
            Labels::from([("os".to_owned(), "linux".to_owned())])
        );
        assert_eq!(
            plans[1]
                .runs_on
                .get("gantry.capability/docker")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            plans[1].needs,
            vec![JobId {
                run: RunId(9),
                index: 0
            }]
        );
    }
}
