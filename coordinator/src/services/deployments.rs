//! Deployments: the coordinator's shell around the `gantry-deploy` state machine.
//!
//! Owns every deployment that has not ended, in one task (the manager): it feeds the
//! gate machine ([`gantry_deploy::gates`], which decides approvals, the wait timer,
//! branch rules and one deployment at a time per environment) and does what it says,
//! picks the target hosts when a deployment starts, feeds the engine the hosts' results
//! and the clock, sends the steps the engine asks for, and persists the whole record
//! (engine and gate state included) after every change, so a restarted coordinator
//! resumes each deployment where it was: steps in flight are sent again when their host
//! reconnects (hosts answer a step they already did from what they kept), and deadlines
//! are wall-clock times.
//!
//! A pipeline job with `deploy:` runs on a virtual agent, the deploy runner: the
//! scheduler offers it the job like any other (it carries the reserved label only such
//! jobs ask for), the manager accepts it, runs the deployment, writes the deployment's
//! log into the job's log, and reports the job's result when the deployment ends. The
//! scheduler, its leases and its retries need nothing special for deploy jobs.
//!
//! It reads the clock once per input (at the top of its loop) and passes that `now` down;
//! it makes no gate decision itself. It must not know how sessions or streams work: it
//! reaches hosts through [`Fleet`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use gantry_deploy::gates::{
    Command as GateCommand, Denial, Event as GateEvent, Gate, Gates, Purpose, Request, Rules, Stage,
};
use gantry_deploy::{
    Amount, CanaryStep, Command as EngineCommand, Deployment, Event as EngineEvent, HostState,
    Limits, Outcome, Pause, Phase, Plan, StepError, Strategy,
};
use gantry_pipeline::{DeploySpec, DeployStrategy, HostAmount};
use gantry_protocol::{
    AdminResponse, AgentBinary, AgentId, AppSpec, Attempt, CoordinatorMessage, DeployCommand,
    DeployLogLine, DeployOp, DeployResult, DeploymentHost, DeploymentView, EnvRelease,
    EnvironmentView, ExecHost, Hooks, JobId, JobOutcome, JobResult, Labels, ReleaseSpec,
    RollbackRequest, UnixMillis,
};
use tokio::sync::{mpsc, oneshot};

use crate::base::labels::labels_text;
use crate::base::logs::LogStore;
use crate::services::engine::{Engine, Input};
use crate::services::runner::{deploy_runner, DEPLOY_RUNNER_LABEL};
use crate::store::{AuditEntry, EnvironmentRecord, Store};
// The stored deployment record lives with its table in the store; its old paths stay.
pub use crate::store::{DeploymentRecord, DeploymentStatus as Status, HostNote, Kind};

/// Deployment log lines kept in the record (the job's log keeps every line).
const MAX_LOG_LINES: usize = 2_000;
/// Deployments a deploy runner runs at once (one per environment anyway).
const RUNNER_SLOTS: u32 = 256;
/// How often the deploy runner renews its leases (they last 30 s).
const RUNNER_HEARTBEAT: Duration = Duration::from_secs(5);
/// Longest wait between checks when nothing is due (a safety net, not a mechanism).
const IDLE_WAKE: Duration = Duration::from_secs(30);

/// The coordinator's hosts, as deployments need them.
pub trait Fleet: Send + Sync + 'static {
    /// Queues a message for a host's session; `false` if it has none.
    fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool;
    /// Connected hosts: id, hostname and labels (reported and assigned).
    fn connected(&self) -> Vec<(AgentId, String, Labels)>;
    /// Values of secrets for a deployment to `environment`: secrets scoped to it or to
    /// none. Names with no such secret are missing from the answer.
    fn secrets_for(&self, environment: &str, names: &[String]) -> Labels;
    /// Where a connected host serves peers (`ip:port`), if it does.
    fn peer_address(&self, agent: &AgentId) -> Option<String>;
}

/// The environment name fleet upgrades go under: not a valid environment name, so it
/// is never one people create, and upgrades run one at a time.
pub const UPGRADES: &str = "(agents)";

impl DeploymentRecord {
    /// What the gate machine knows of this deployment, from the fields that keep it
    /// (author, approvals, wait, status); `None` once it has ended.
    fn gate(&self) -> Option<Gate> {
        let stage = match self.status {
            Status::AwaitingApproval => Stage::AwaitingApproval,
            Status::Waiting { until } => Stage::Waiting { until },
            Status::Queued => Stage::Queued,
            Status::Running => Stage::Running,
            Status::Ended { .. } => return None,
        };
        Some(Gate {
            environment: self.environment.clone(),
            author: self.created_by.clone(),
            approvals_needed: self.approvals_needed,
            approvals: self.approvals.clone(),
            wait_ms: self.wait_ms,
            stage,
        })
    }

    /// `succeeded`, `staging`, `awaiting-promotion`, ... as listings show it.
    pub fn state_name(&self) -> String {
        match &self.status {
            Status::AwaitingApproval => "waiting-for-approval".into(),
            Status::Waiting { .. } => "waiting".into(),
            Status::Queued => "queued".into(),
            Status::Ended { state, .. } => state.clone(),
            Status::Running => match self.engine.as_ref().map(Deployment::phase) {
                None | Some(Phase::NotStarted | Phase::Staging) => "staging".into(),
                Some(Phase::Wave { .. }) => "switching".into(),
                Some(Phase::Paused { .. }) => "paused".into(),
                Some(Phase::Verifying { .. }) => "analysing".into(),
                Some(Phase::AwaitingPromotion { .. }) => "awaiting-promotion".into(),
                Some(Phase::RollingBack { .. }) => "rolling-back".into(),
                Some(Phase::Done(o)) => outcome_state(o).into(),
            },
        }
    }

    fn reason(&self) -> Option<String> {
        match &self.status {
            Status::Ended { reason, .. } => reason.clone(),
            Status::AwaitingApproval => Some(format!(
                "{} of {} approvals; `gantry deploy approve {}`",
                self.approvals.len(),
                self.approvals_needed,
                self.id
            )),
            Status::Queued => Some(format!(
                "another deployment to {} is running",
                self.environment
            )),
            _ => match self.engine.as_ref().map(Deployment::phase) {
                Some(Phase::AwaitingPromotion { reason, .. } | Phase::RollingBack { reason }) => {
                    Some(reason.clone())
                }
                _ => None,
            },
        }
    }

    fn push_log(&mut self, at: UnixMillis, agent: Option<AgentId>, text: String) {
        self.log.push(DeployLogLine { at, agent, text });
        if self.log.len() > MAX_LOG_LINES {
            let extra = self.log.len() - MAX_LOG_LINES;
            self.log.drain(..extra);
            self.log_dropped += extra as u64;
        }
    }

    /// The view `gantry deployments show` prints.
    pub fn view(&self) -> DeploymentView {
        let states: HashMap<&AgentId, &gantry_deploy::Host> = self
            .engine
            .as_ref()
            .map(|e| e.hosts().iter().map(|h| (&h.agent, h)).collect())
            .unwrap_or_default();
        let hosts = self
            .hosts
            .iter()
            .map(|(agent, note)| {
                let host = states.get(agent);
                let (state, reason) = host.map_or(("pending", None), |h| {
                    (h.state.name(), host_reason(&h.state))
                });
                DeploymentHost {
                    agent: agent.clone(),
                    hostname: note.hostname.clone(),
                    state: state.into(),
                    reason,
                    previous: note.previous.clone(),
                    staged_at: host.and_then(|h| h.staged_at),
                    activated_at: host.and_then(|h| h.activated_at),
                    ended_at: host.and_then(|h| h.ended_at),
                }
            })
            .collect();
        DeploymentView {
            id: self.id,
            environment: self.environment.clone(),
            app: self.app.name.clone(),
            release: self.release.clone(),
            strategy: match self.kind {
                Kind::App => strategy_name(&self.strategy).into(),
                Kind::AgentUpgrade { .. } => "agent-upgrade".into(),
            },
            epoch: self.epoch,
            state: self.state_name(),
            reason: self.reason(),
            created_by: self.created_by.clone(),
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            run: self.job.map(|(j, _)| j.run),
            job: self.job.map(|(j, _)| j),
            approvals: self.approvals.clone(),
            approvals_needed: self.approvals_needed,
            hosts,
            log: self.log.clone(),
        }
    }
}

/// Why a deployment that succeeded with failed hosts says so, naming where each failed
/// host was left: a host that could not stage was never switched (it still runs the
/// previous release, nothing was rolled back there), unlike one that failed after its
/// switch and went back.
fn within_budget(
    failed_hosts: u32,
    hosts: &[gantry_deploy::Host],
    notes: &BTreeMap<AgentId, HostNote>,
) -> String {
    let name = |h: &gantry_deploy::Host| {
        notes
            .get(&h.agent)
            .map_or_else(|| h.agent.to_string(), |n| n.hostname.clone())
    };
    let group = |what: &str, pick: fn(&HostState) -> bool| {
        let names: Vec<String> = hosts.iter().filter(|h| pick(&h.state)).map(name).collect();
        (!names.is_empty()).then(|| format!("{what}: {}", names.join(", ")))
    };
    let parts: Vec<String> = [
        group(
            "could not stage, never switched, still on the previous release",
            |s| matches!(s, HostState::StageFailed { .. }),
        ),
        group("rolled back to the previous release", |s| {
            matches!(s, HostState::RolledBack)
        }),
        group("could not be rolled back", |s| {
            matches!(s, HostState::RollbackFailed { .. })
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        format!("{failed_hosts} host(s) failed within the failure budget")
    } else {
        format!(
            "{failed_hosts} host(s) failed within the failure budget ({})",
            parts.join("; ")
        )
    }
}

fn host_reason(state: &HostState) -> Option<String> {
    match state {
        HostState::StageFailed { reason }
        | HostState::Failed { reason }
        | HostState::RollbackFailed { reason } => Some(reason.clone()),
        _ => None,
    }
}

fn outcome_state(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::RolledBack { .. } => "rolled-back",
        Outcome::Failed { .. } => "failed",
    }
}

pub fn strategy_name(strategy: &Strategy) -> &'static str {
    match strategy {
        Strategy::Rolling { .. } => "rolling",
        Strategy::Canary { .. } => "canary",
        Strategy::BlueGreen { .. } => "blue-green",
        Strategy::Rollback { .. } => "rollback",
    }
}

/// What people ask of deployments through the admin API.
#[derive(Debug)]
pub enum AdminOp {
    Approve(u64),
    Promote(u64),
    Abort(u64),
    Rollback(RollbackRequest),
    UpgradeAgents {
        select: Labels,
        batch: u32,
        failure_budget: u32,
        timeout_ms: u64,
        binary: AgentBinary,
    },
}

/// Everything the manager reacts to.
#[derive(Debug)]
enum DeployInput {
    /// The scheduler offered a deploy job to the deploy runner.
    Dispatch { job: JobId, attempt: Attempt },
    /// The scheduler wants a deploy job stopped (its run was cancelled).
    Cancel { job: JobId, attempt: Attempt },
    Result {
        agent: AgentId,
        result: DeployResult,
    },
    /// A host (re)connected: send it the steps it has in flight again.
    Connected { agent: AgentId },
    Admin {
        actor: String,
        op: AdminOp,
        reply: oneshot::Sender<AdminResponse>,
    },
}

/// Handle to the deployment manager. Cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    tx: mpsc::UnboundedSender<DeployInput>,
    store: Arc<Store>,
}

impl std::fmt::Debug for Deployments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployments").finish_non_exhaustive()
    }
}

/// The manager's end of the channel, created before the engine so the engine's outbox
/// can route the deploy runner's messages here.
pub struct Inbox(mpsc::UnboundedReceiver<DeployInput>);

impl Deployments {
    pub fn channel(store: Arc<Store>) -> (Self, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx, store }, Inbox(rx))
    }

    /// Starts the manager: loads unfinished deployments and connects the deploy runner.
    pub fn start(
        &self,
        inbox: Inbox,
        fleet: Arc<dyn Fleet>,
        engine: Engine,
        logs: Arc<LogStore>,
        notifier: Arc<crate::services::notify::Notifier>,
        metrics: Arc<crate::base::metrics::Metrics>,
    ) -> Result<(), String> {
        let mut active = BTreeMap::new();
        let mut recent = Vec::new();
        for record in self
            .store
            .deployments(usize::MAX, false)
            .map_err(|e| e.to_string())?
        {
            if record.is_ended() {
                if recent.len() < 200 {
                    recent.push(record);
                }
            } else {
                active.insert(record.id, record);
            }
        }
        let gates = Gates::restore(active.values().filter_map(|r| Some((r.id, r.gate()?))));
        let manager = Manager {
            active,
            outgoing: Vec::new(),
            store: self.store.clone(),
            fleet,
            engine,
            logs,
            notifier,
            metrics,
            gates,
            gate_commands: VecDeque::new(),
            carrying_out: false,
        };
        manager.connect_runner();
        manager.report_unreported(UnixMillis::now(), &recent);
        tokio::spawn(manager.run(inbox.0));
        Ok(())
    }

    /// Routes what the scheduler sends the deploy runner.
    pub fn route_from_scheduler(&self, message: CoordinatorMessage) -> bool {
        let input = match message {
            CoordinatorMessage::Dispatch(a) => DeployInput::Dispatch {
                job: a.job,
                attempt: a.attempt,
            },
            CoordinatorMessage::Cancel { job, attempt } => DeployInput::Cancel { job, attempt },
            _ => return true,
        };
        self.tx.send(input).is_ok()
    }

    pub fn result(&self, agent: AgentId, result: DeployResult) {
        let _ = self.tx.send(DeployInput::Result { agent, result });
    }

    pub fn connected(&self, agent: AgentId) {
        let _ = self.tx.send(DeployInput::Connected { agent });
    }

    /// Carries out an admin operation and answers when it is durable.
    pub async fn admin(&self, actor: &str, op: AdminOp) -> AdminResponse {
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(DeployInput::Admin {
            actor: actor.to_owned(),
            op,
            reply,
        });
        if sent.is_err() {
            return refused("the deployment manager is not running; restart the coordinator");
        }
        answer.await.unwrap_or_else(|_| {
            refused("the deployment manager stopped before answering; see the coordinator's log")
        })
    }
}

fn refused(message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error(gantry_protocol::AdminError {
        kind: gantry_protocol::AdminErrorKind::InvalidInput,
        message: message.into(),
    })
}

fn not_found(message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error(gantry_protocol::AdminError {
        kind: gantry_protocol::AdminErrorKind::NotFound,
        message: message.into(),
    })
}

struct Manager {
    active: BTreeMap<u64, DeploymentRecord>,
    /// Steps to send once the records that name them are stored: a host may ask for
    /// its release the moment it gets the step, and the grant is checked against the
    /// stored deployment.
    outgoing: Vec<(u64, AgentId, u64, DeployOp)>,
    store: Arc<Store>,
    fleet: Arc<dyn Fleet>,
    engine: Engine,
    logs: Arc<LogStore>,
    /// Webhooks hear when a deployment waits for approvals and when one ends.
    notifier: Arc<crate::services::notify::Notifier>,
    metrics: Arc<crate::base::metrics::Metrics>,
    /// When a deployment may start; rebuilt from the records at start.
    gates: Gates,
    /// The gates' commands not yet carried out, in order. One may end a deployment
    /// whose end makes the gates say more; those wait their turn here rather than run
    /// inside the one that caused them (so a record never ends up saying `queued` after
    /// it started).
    gate_commands: VecDeque<GateCommand>,
    carrying_out: bool,
}

impl Manager {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<DeployInput>) {
        let mut heartbeat = tokio::time::interval(RUNNER_HEARTBEAT);
        loop {
            let now = UnixMillis::now();
            let wake = self
                .next_deadline()
                .map_or(IDLE_WAKE, |at| Duration::from_millis(at.millis_since(now)))
                .min(IDLE_WAKE);
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.handle(UnixMillis::now(), input),
                    None => return,
                },
                () = tokio::time::sleep(wake) => self.tick(UnixMillis::now()),
                _ = heartbeat.tick() => self.engine.event(gantry_scheduler::Event::AgentHeartbeat {
                    agent: deploy_runner(),
                }),
            }
        }
    }

    /// Tells the scheduler the deploy runner is here, holding the jobs of unfinished
    /// deployments (so their leases survive a restart).
    fn connect_runner(&self) {
        let running = self.active.values().filter_map(|r| r.job).collect();
        self.engine.event(gantry_scheduler::Event::AgentConnected {
            agent: deploy_runner(),
            labels: Labels::from([(DEPLOY_RUNNER_LABEL.to_owned(), "true".to_owned())]),
            slots: RUNNER_SLOTS,
            running,
        });
    }

    /// Reports again the job results of ended deployments whose job the scheduler did
    /// not record as ended (the coordinator stopped in between).
    fn report_unreported(&self, now: UnixMillis, recent: &[DeploymentRecord]) {
        for record in recent {
            let Some((job, attempt)) = record.job else {
                continue;
            };
            let unreported = matches!(self.store.job(job), Ok(Some(j))
                if j.attempt == attempt && !j.state.is_terminal());
            if unreported {
                self.report_job(now, record);
            }
        }
    }

    fn next_deadline(&self) -> Option<UnixMillis> {
        self.active
            .values()
            .filter(|r| matches!(r.status, Status::Running))
            .filter_map(|r| r.engine.as_ref().and_then(Deployment::next_deadline))
            .chain(self.gates.next_deadline())
            .min()
    }

    fn handle(&mut self, now: UnixMillis, input: DeployInput) {
        match input {
            DeployInput::Dispatch { job, attempt } => self.dispatch(now, job, attempt),
            DeployInput::Cancel { job, attempt } => {
                let id = self
                    .active
                    .values()
                    .find(|r| r.job == Some((job, attempt)))
                    .map(|r| r.id);
                if let Some(id) = id {
                    self.abort(now, id, "the run's cancellation");
                }
            }
            DeployInput::Result { agent, result } => self.result(now, &agent, result),
            DeployInput::Connected { agent } => self.resend(&agent),
            DeployInput::Admin { actor, op, reply } => {
                let answer = self.admin(now, &actor, &op);
                let _ = reply.send(answer);
            }
        }
    }

    /// Time passed: engines whose deadline came get a tick, then the gates (a wait
    /// timer that ran out starts its deployment or queues it). Engines go first so a
    /// deployment that ends at this instant frees its environment for one whose timer
    /// ends at the same instant.
    fn tick(&mut self, now: UnixMillis) {
        let due: Vec<u64> = self
            .active
            .values()
            .filter(|r| {
                matches!(r.status, Status::Running)
                    && r.engine
                        .as_ref()
                        .and_then(Deployment::next_deadline)
                        .is_some_and(|at| at <= now)
            })
            .map(|r| r.id)
            .collect();
        for id in due {
            self.feed(now, id, EngineEvent::Tick);
        }
        self.gate_event(now, GateEvent::Tick);
    }

    // ---- starting deployments -------------------------------------------------------

    fn dispatch(&mut self, now: UnixMillis, job: JobId, attempt: Attempt) {
        self.engine.event(gantry_scheduler::Event::JobAccepted {
            job,
            attempt,
            agent: deploy_runner(),
        });
        if self.active.values().any(|r| r.job == Some((job, attempt))) {
            return;
        }
        match self.create_for_job(now, job, attempt) {
            Ok((id, request)) => self.request(now, id, request),
            Err(message) => {
                tracing::info!(%job, attempt, "deploy job refused: {message}");
                self.job_log(job, attempt, &format!("\u{2716} {message}"));
                self.finish_job(now, job, attempt, false, now);
            }
        }
    }

    /// Builds and stores the deployment a deploy job asks for.
    fn create_for_job(
        &mut self,
        now: UnixMillis,
        job: JobId,
        attempt: Attempt,
    ) -> Result<(u64, Request), String> {
        let run = self
            .store
            .run(job.run)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("run {} is not stored", job.run))?;
        let pipeline = gantry_pipeline::parse(&run.file_name, &run.text)
            .map_err(|e| format!("the run's pipeline no longer parses: {e}"))?;
        let spec = pipeline
            .jobs
            .get(job.index as usize)
            .ok_or_else(|| format!("job {job} is not in its pipeline"))?;
        let deploy = spec.deploy.as_ref().ok_or_else(|| {
            format!(
                "job {} has no `deploy:`; only deploy jobs may ask for {DEPLOY_RUNNER_LABEL}",
                spec.name
            )
        })?;
        let env = self.environment(&deploy.environment)?;
        let branch = run.git_ref.clone();
        let request = self.admit(&env, &run.created_by, Purpose::Release { branch })?;
        let artifact = self
            .store
            .artifacts_of(job.run)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|a| a.name == deploy.artifact)
            .ok_or_else(|| {
                format!(
                    "run {} has no artifact \"{}\" to deploy: the job that declares it did not upload it",
                    job.run, deploy.artifact
                )
            })?;
        self.check_secrets(deploy, &env.name)?;
        let hex = artifact.manifest.to_string();
        let short = hex.trim_start_matches(gantry_protocol::DIGEST_PREFIX);
        let release = ReleaseSpec {
            id: format!("r{}-{}", job.run, &short[..8.min(short.len())]),
            version: deploy
                .version
                .clone()
                .unwrap_or_else(|| format!("{}.{}", job.run, job.index + 1)),
            manifest: artifact.manifest,
        };
        let (strategy, blue_green) = engine_strategy(&deploy.strategy);
        let app = app_spec(deploy, blue_green);
        let limits = Limits {
            stage_ms: deploy.stage_timeout_ms,
            activate_ms: deploy.activate_timeout_ms,
            verify_ms: deploy
                .health
                .as_ref()
                .map_or(60_000, |h| h.deadline_ms + h.timeout_ms + 10_000),
            rollback_ms: deploy.activate_timeout_ms,
            ..Limits::default()
        };
        let record = self.create(
            now,
            &env,
            &request,
            Kind::App,
            app,
            release,
            strategy,
            limits,
            Some((job, attempt)),
            &format!("run={} job={}", job.run, spec.name),
        )?;
        let id = record.id;
        self.job_log(
            job,
            attempt,
            &format!(
                "deployment {id} of {} ({}) to {}, epoch {}: `gantry deployments show {id}`",
                record.release.id, record.release.version, record.environment, record.epoch
            ),
        );
        Ok((id, request))
    }

    fn environment(&self, name: &str) -> Result<EnvironmentRecord, String> {
        self.store
            .environment(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "no environment {name}: create it with `gantry env create {name} --select KEY=VALUE`, or define it under `environments:` in the pipeline file"
                )
            })
    }

    /// Every secret the deployment names exists and may go to this environment.
    fn check_secrets(&self, deploy: &DeploySpec, environment: &str) -> Result<(), String> {
        let names = hook_secret_names(&deploy.env, &deploy.hooks);
        if names.is_empty() {
            return Ok(());
        }
        let scopes = self.store.secret_scopes().map_err(|e| e.to_string())?;
        let stored: Vec<String> = self
            .store
            .secrets()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for name in &names {
            if !stored.contains(name) {
                return Err(format!(
                    "secret {name} does not exist; set it with `gantry secrets set {name} --environment {environment}`"
                ));
            }
            if let Some(scope) = scopes.get(name).filter(|s| *s != environment) {
                return Err(format!(
                    "secret {name} is scoped to environment {scope}; a deployment to {environment} may not use it"
                ));
            }
        }
        Ok(())
    }

    /// The request for a deployment to `env` under its current rules, if the gates would
    /// take it. Asked before the deployment is numbered and stored, so a refused one (a
    /// branch the environment does not allow, a rollback while another runs, a second
    /// fleet upgrade) costs no deployment and no epoch.
    fn admit(
        &self,
        env: &EnvironmentRecord,
        author: &str,
        purpose: Purpose,
    ) -> Result<Request, String> {
        let request = Request {
            environment: env.name.clone(),
            author: author.to_owned(),
            rules: Rules {
                approvals: env.approvals,
                wait_ms: env.wait_ms,
                branches: env.branches.clone(),
            },
            purpose,
        };
        self.gates.admit(&request).map_err(|r| r.to_string())?;
        Ok(request)
    }

    /// Stores a new deployment, its gates at their first stage: what
    /// [`GateEvent::Requested`] would make of it, so a crash before the request is fed
    /// resumes it there.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        now: UnixMillis,
        env: &EnvironmentRecord,
        request: &Request,
        kind: Kind,
        app: AppSpec,
        release: ReleaseSpec,
        strategy: Strategy,
        limits: Limits,
        job: Option<(JobId, Attempt)>,
        detail: &str,
    ) -> Result<DeploymentRecord, String> {
        let created_by = request.author.as_str();
        let approvals_needed = request.approvals_needed();
        let wait_ms = request.wait_ms();
        let status = match request.first_stage(now) {
            Stage::AwaitingApproval => Status::AwaitingApproval,
            Stage::Waiting { until } => Status::Waiting { until },
            Stage::Queued | Stage::Running => Status::Queued,
        };
        let audit = AuditEntry {
            at: now,
            actor: created_by.to_owned(),
            action: "deployment.create".into(),
            detail: format!("environment={} release={} {detail}", env.name, release.id),
        };
        let fenced = matches!(kind, Kind::App).then_some(env.name.as_str());
        let record = self
            .store
            .create_deployment(
                fenced,
                |id, epoch| DeploymentRecord {
                    id,
                    environment: env.name.clone(),
                    epoch,
                    app,
                    release,
                    strategy,
                    limits,
                    created_by: created_by.to_owned(),
                    created_at: now,
                    started_at: None,
                    finished_at: None,
                    job,
                    approvals: Vec::new(),
                    approvals_needed,
                    wait_ms,
                    status,
                    engine: None,
                    hosts: BTreeMap::new(),
                    next_seq: 1,
                    log: Vec::new(),
                    log_dropped: 0,
                    first_failure_at: None,
                    kind,
                },
                &audit,
            )
            .map_err(|e| format!("cannot store the deployment: {e}"))?;
        self.active.insert(record.id, record.clone());
        Ok(record)
    }

    /// Feeds a stored deployment's request to the gates and does what they say.
    fn request(&mut self, now: UnixMillis, id: u64, request: Request) {
        self.gate_event(
            now,
            GateEvent::Requested {
                deployment: id,
                request,
            },
        );
    }

    fn gate_event(&mut self, now: UnixMillis, event: GateEvent) {
        let commands = self.gates.handle(now, event);
        self.carry_out(now, commands);
    }

    /// Does what the gates said, in order, and what they say meanwhile after it.
    fn carry_out(&mut self, now: UnixMillis, commands: Vec<GateCommand>) {
        self.gate_commands.extend(commands);
        if self.carrying_out {
            return;
        }
        self.carrying_out = true;
        while let Some(command) = self.gate_commands.pop_front() {
            self.gate_command(now, command);
        }
        self.carrying_out = false;
    }

    /// Records where a deployment waits, says why in its log and stores it; `false` if
    /// it is not active.
    fn hold(
        &mut self,
        now: UnixMillis,
        id: u64,
        status: Status,
        why: impl FnOnce(&DeploymentRecord) -> String,
    ) -> bool {
        let Some(rec) = self.active.get_mut(&id) else {
            return false;
        };
        rec.status = status;
        let text = why(rec);
        self.log(id, now, None, text);
        self.save(now, id);
        true
    }

    fn gate_command(&mut self, now: UnixMillis, command: GateCommand) {
        match command {
            GateCommand::AwaitApproval {
                deployment: id,
                needed,
            } => {
                let held = self.hold(now, id, Status::AwaitingApproval, |rec| {
                    format!(
                        "waiting for {needed} approval(s) from people other than {}: `gantry deploy approve {id}`",
                        rec.created_by
                    )
                });
                let Some(rec) = self.active.get(&id).filter(|_| held) else {
                    return;
                };
                self.notifier
                    .emit(crate::services::notify::Event::deployment(
                        crate::services::notify::EventKind::DeploymentAwaitingApproval,
                        &rec.view(),
                    ));
            }
            GateCommand::Approved {
                deployment: id,
                approval,
            } => {
                let by = approval.by.clone();
                let Some(rec) = self.active.get_mut(&id) else {
                    return;
                };
                rec.approvals.push(approval);
                self.log(id, now, None, format!("approved by {by}"));
                self.audit(now, &by, "deployment.approve", id);
                self.save(now, id);
            }
            GateCommand::AwaitTimer {
                deployment: id,
                until,
            } => {
                self.hold(now, id, Status::Waiting { until }, |rec| {
                    format!(
                        "waiting {} s (the environment's wait timer) before starting",
                        rec.wait_ms.div_ceil(1000)
                    )
                });
            }
            GateCommand::Queue { deployment: id, .. } => {
                self.hold(now, id, Status::Queued, |rec| {
                    format!("queued behind another deployment to {}", rec.environment)
                });
            }
            GateCommand::Start { deployment: id } => self.begin(now, id),
            GateCommand::Refuse {
                deployment: id,
                refusal,
            } => self.end_unstarted(now, id, "failed", &refusal.to_string()),
            GateCommand::Cancel { deployment: id, by } => self.end_unstarted(
                now,
                id,
                "cancelled",
                &format!("cancelled by {by} before it started"),
            ),
            GateCommand::Abort { deployment: id, by } => {
                self.feed(now, id, EngineEvent::Abort { by });
            }
            // Answered to the approver by `admin`.
            GateCommand::Deny { .. } => {}
        }
    }

    /// Picks the target hosts and starts the engine.
    fn begin(&mut self, now: UnixMillis, id: u64) {
        let Some(env_name) = self.active.get(&id).map(|r| r.environment.clone()) else {
            return;
        };
        let upgrade_select = match self.active.get(&id).map(|r| &r.kind) {
            Some(Kind::AgentUpgrade { select, .. }) => Some(select.clone()),
            _ => None,
        };
        let env = match upgrade_select {
            Some(select) => upgrades_environment(select),
            None => match self.environment(&env_name) {
                Ok(env) => env,
                Err(message) => return self.end_unstarted(now, id, "failed", &message),
            },
        };
        let runner = deploy_runner();
        let mut targets: Vec<(AgentId, String)> = self
            .fleet
            .connected()
            .into_iter()
            .filter(|(agent, _, labels)| {
                *agent != runner && gantry_scheduler::labels_match(labels, &env.select)
            })
            .map(|(agent, hostname, _)| (agent, hostname))
            .collect();
        targets.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        distinct_names(&mut targets);
        if targets.is_empty() {
            let enrolled = self.store.agents().map_or(0, |all| {
                all.iter()
                    .filter(|a| {
                        a.revoked_at.is_none()
                            && gantry_scheduler::labels_match(&a.effective_labels(), &env.select)
                    })
                    .count()
            });
            return self.end_unstarted(
                now,
                id,
                "failed",
                &format!(
                    "no connected host matches environment {}'s selector {} ({enrolled} enrolled host(s) match; `gantry agents list` shows which are connected)",
                    env.name,
                    labels_text(&env.select)
                ),
            );
        }
        let Some(rec) = self.active.get_mut(&id) else {
            return;
        };
        let plan = Plan {
            hosts: targets.iter().map(|(a, _)| a.clone()).collect(),
            strategy: match &rec.strategy {
                // `--parallel 0` means every host at once.
                Strategy::Rollback { parallelism: 0 } => Strategy::Rollback {
                    parallelism: u32::try_from(targets.len()).unwrap_or(u32::MAX),
                },
                other => other.clone(),
            },
            limits: rec.limits,
        };
        rec.hosts = targets
            .iter()
            .map(|(agent, hostname)| {
                (
                    agent.clone(),
                    HostNote {
                        hostname: hostname.clone(),
                        previous: None,
                        in_flight: None,
                    },
                )
            })
            .collect();
        rec.engine = Some(Deployment::new(plan));
        rec.status = Status::Running;
        rec.started_at = Some(now);
        let names: Vec<&str> = targets.iter().map(|(_, h)| h.as_str()).collect();
        let text = format!(
            "starting: {} of {} ({}) to {} host(s): {}",
            strategy_name(&rec.strategy),
            rec.release.id,
            rec.release.version,
            targets.len(),
            names.join(", ")
        );
        self.log(id, now, None, text);
        self.feed(now, id, EngineEvent::Start);
    }

    // ---- running deployments --------------------------------------------------------

    /// Feeds the engine one event and carries out what it asks.
    fn feed(&mut self, now: UnixMillis, id: u64, event: EngineEvent) {
        let Some(commands) = self
            .active
            .get_mut(&id)
            .and_then(|r| r.engine.as_mut())
            .map(|e| e.handle(now, event))
        else {
            return;
        };
        let mut ended = None;
        for command in commands {
            match command {
                EngineCommand::Stage { host } => {
                    let op = self.active.get(&id).map(|r| match &r.kind {
                        Kind::App => DeployOp::Stage {
                            release: r.release.clone(),
                            peers: Vec::new(),
                        },
                        Kind::AgentUpgrade { binary, .. } => DeployOp::UpgradeStage {
                            binary: binary.clone(),
                        },
                    });
                    if let Some(op) = op {
                        self.send_op(id, &host, op);
                    }
                }
                EngineCommand::Activate { host } => {
                    let op = self.active.get(&id).map(|r| match &r.kind {
                        Kind::App => DeployOp::Activate {
                            release: r.release.clone(),
                        },
                        Kind::AgentUpgrade { binary, .. } => DeployOp::UpgradeActivate {
                            binary: binary.clone(),
                        },
                    });
                    if let Some(op) = op {
                        self.send_op(id, &host, op);
                    }
                }
                EngineCommand::Verify { host } => self.send_op(id, &host, DeployOp::Verify),
                EngineCommand::Rollback { host } => {
                    let to = self
                        .active
                        .get(&id)
                        .and_then(|r| r.hosts.get(&host))
                        .and_then(|n| n.previous.clone());
                    let upgrade = self
                        .active
                        .get(&id)
                        .is_some_and(|r| matches!(r.kind, Kind::AgentUpgrade { .. }));
                    let op = if upgrade {
                        DeployOp::UpgradeRollback { to }
                    } else {
                        DeployOp::Rollback { to }
                    };
                    self.send_op(id, &host, op);
                }
                EngineCommand::HostChanged { host, state } => {
                    if matches!(state, HostState::Failed { .. }) {
                        if let Some(rec) = self.active.get_mut(&id) {
                            rec.first_failure_at.get_or_insert(now);
                        }
                    }
                    if let Some(reason) = host_reason(&state) {
                        let text = format!("{}: {reason}", state.name());
                        self.log(id, now, Some(&host), text);
                    }
                    if state.is_terminal() || matches!(state, HostState::Active) {
                        if let Some(note) = self
                            .active
                            .get_mut(&id)
                            .and_then(|r| r.hosts.get_mut(&host))
                        {
                            note.in_flight = None;
                        }
                    }
                }
                EngineCommand::PhaseChanged { phase } => {
                    if let Phase::Done(outcome) = phase {
                        ended = Some(outcome);
                    }
                }
                EngineCommand::Log { message } => self.log(id, now, None, message),
            }
        }
        match ended {
            Some(outcome) => self.end(now, id, &outcome),
            None => self.save(now, id),
        }
    }

    /// Records one step for a host as in flight; it is sent once stored (see
    /// [`Self::save`]).
    fn send_op(&mut self, id: u64, host: &AgentId, op: DeployOp) {
        let Some(rec) = self.active.get_mut(&id) else {
            return;
        };
        let seq = rec.next_seq;
        rec.next_seq += 1;
        if let Some(note) = rec.hosts.get_mut(host) {
            note.in_flight = Some((seq, op.clone()));
        }
        if matches!(
            op,
            DeployOp::UpgradeActivate { .. } | DeployOp::UpgradeRollback { .. }
        ) {
            // The agent restarts once its jobs end: offer it nothing new meanwhile.
            self.engine.event(gantry_scheduler::Event::AgentDraining {
                agent: host.clone(),
                draining: true,
            });
        }
        self.outgoing.push((id, host.clone(), seq, op));
    }

    /// Sends the steps recorded since the last save.
    fn send_outgoing(&mut self, now: UnixMillis) {
        for (id, host, seq, op) in std::mem::take(&mut self.outgoing) {
            if !self.send_step(id, &host, seq, op) {
                let text = "not connected: the step waits for the host until its deadline".into();
                self.log(id, now, Some(&host), text);
            }
        }
    }

    fn send_step(&self, id: u64, host: &AgentId, seq: u64, mut op: DeployOp) -> bool {
        let Some(rec) = self.active.get(&id) else {
            return false;
        };
        if let DeployOp::Stage { peers, .. } = &mut op {
            // Filled in at each send, from the hosts' sessions as they are now (a host's
            // peer port changes when it restarts); every host of one swarm gets the list
            // in the same order (the record's), so they agree on who owns which range of
            // the release.
            let swarm = rec
                .hosts
                .keys()
                .position(|a| a == host)
                .map_or(0, |i| i / gantry_protocol::limits::PEER_SWARM_HOSTS);
            *peers = rec
                .hosts
                .keys()
                .skip(swarm * gantry_protocol::limits::PEER_SWARM_HOSTS)
                .take(gantry_protocol::limits::PEER_SWARM_HOSTS)
                .filter_map(|agent| {
                    self.fleet
                        .peer_address(agent)
                        .map(|address| gantry_protocol::PeerSource {
                            agent: agent.clone(),
                            address,
                        })
                })
                .collect();
        }
        let command = DeployCommand {
            deployment: id,
            epoch: rec.epoch,
            seq,
            app: self.app_for_host(rec),
            op,
        };
        self.fleet
            .send(host, CoordinatorMessage::Deploy(Box::new(command)))
    }

    /// The app with its secrets filled in, for one step.
    fn app_for_host(&self, rec: &DeploymentRecord) -> AppSpec {
        let mut app = rec.app.clone();
        let names = hook_secret_names(&app.env, &app.hooks);
        if names.is_empty() {
            return app;
        }
        let values = self.fleet.secrets_for(&rec.environment, &names);
        let fill = |text: &str| {
            gantry_protocol::template::expand(text, |expr| {
                expr.strip_prefix("secrets.")
                    .and_then(|n| values.get(n.trim()))
                    .cloned()
            })
        };
        for value in app.env.values_mut() {
            *value = fill(value);
        }
        let h = &mut app.hooks;
        for hook in [
            &mut h.stop,
            &mut h.start,
            &mut h.restart,
            &mut h.pre_start,
            &mut h.post_start,
        ]
        .into_iter()
        .flatten()
        {
            *hook = fill(hook);
        }
        app.secrets = values.into_values().filter(|v| !v.is_empty()).collect();
        app
    }

    /// A host (re)connected: send its in-flight steps again (it answers a step it
    /// already did from what it kept).
    fn resend(&mut self, agent: &AgentId) {
        let pending: Vec<(u64, u64, DeployOp)> = self
            .active
            .values()
            .filter(|r| matches!(r.status, Status::Running))
            .filter_map(|r| {
                let (seq, op) = r.hosts.get(agent)?.in_flight.clone()?;
                Some((r.id, seq, op))
            })
            .collect();
        for (id, seq, op) in pending {
            tracing::debug!(deployment = id, %agent, seq, "sending an in-flight step again");
            self.send_step(id, agent, seq, op);
        }
    }

    fn result(&mut self, now: UnixMillis, agent: &AgentId, result: DeployResult) {
        let id = result.deployment;
        let Some(rec) = self.active.get_mut(&id) else {
            tracing::debug!(deployment = id, %agent, "result for a deployment that has ended");
            return;
        };
        let Some(note) = rec.hosts.get_mut(agent) else {
            tracing::warn!(deployment = id, %agent, "result from a host not in the deployment");
            return;
        };
        let Some((seq, op)) = note.in_flight.clone().filter(|(s, _)| *s == result.seq) else {
            tracing::debug!(deployment = id, %agent, seq = result.seq, "result for a step not in flight");
            return;
        };
        note.in_flight = None;
        if let (DeployOp::Stage { .. } | DeployOp::UpgradeStage { .. }, Ok(report)) =
            (&op, &result.outcome)
        {
            note.previous.clone_from(&report.current);
        }
        for line in result.log {
            self.log(id, now, Some(agent), line);
        }
        if result.outcome.is_err()
            && matches!(
                op,
                DeployOp::UpgradeActivate { .. } | DeployOp::UpgradeRollback { .. }
            )
        {
            self.engine.event(gantry_scheduler::Event::AgentDraining {
                agent: agent.clone(),
                draining: false,
            });
        }
        let outcome = result.outcome.map(|_| ()).map_err(StepError::from);
        tracing::debug!(deployment = id, %agent, seq, ok = outcome.is_ok(), "deploy step ended");
        let host = agent.clone();
        let event = match op {
            DeployOp::Stage { .. } | DeployOp::UpgradeStage { .. } => EngineEvent::Staged {
                host,
                result: outcome,
            },
            DeployOp::Activate { .. } | DeployOp::UpgradeActivate { .. } => {
                EngineEvent::Activated {
                    host,
                    result: outcome,
                }
            }
            DeployOp::Verify => EngineEvent::Verified {
                host,
                result: outcome,
            },
            DeployOp::Rollback { .. } | DeployOp::UpgradeRollback { .. } => {
                EngineEvent::RolledBack {
                    host,
                    result: outcome,
                }
            }
        };
        self.feed(now, id, event);
    }

    // ---- ending deployments ---------------------------------------------------------

    fn end(&mut self, now: UnixMillis, id: u64, outcome: &Outcome) {
        let Some(rec) = self.active.get_mut(&id) else {
            return;
        };
        let reason = match outcome {
            Outcome::Succeeded { failed_hosts: 0 } => None,
            Outcome::Succeeded { failed_hosts } => Some(within_budget(
                *failed_hosts,
                rec.engine.as_ref().map_or(&[], |e| e.hosts()),
                &rec.hosts,
            )),
            Outcome::RolledBack { reason } | Outcome::Failed { reason } => Some(reason.clone()),
        };
        rec.status = Status::Ended {
            state: outcome_state(outcome).into(),
            reason: reason.clone(),
        };
        rec.finished_at = Some(now);
        let text = match &reason {
            Some(r) => format!("{}: {r}", outcome_state(outcome)),
            None => outcome_state(outcome).to_owned(),
        };
        self.log(id, now, None, text);
        self.close(now, id, matches!(outcome, Outcome::Succeeded { .. }));
    }

    /// Ends a deployment that never started its engine.
    fn end_unstarted(&mut self, now: UnixMillis, id: u64, state: &str, reason: &str) {
        let Some(rec) = self.active.get_mut(&id) else {
            return;
        };
        rec.status = Status::Ended {
            state: state.into(),
            reason: Some(reason.to_owned()),
        };
        rec.finished_at = Some(now);
        self.log(id, now, None, format!("{state}: {reason}"));
        self.close(now, id, false);
    }

    /// Stores the ended deployment (and the environment's new release), reports its
    /// job, and tells the gates (which may start the next one queued).
    fn close(&mut self, now: UnixMillis, id: u64, succeeded: bool) {
        let Some(rec) = self.active.remove(&id) else {
            return;
        };
        self.outgoing.retain(|(of, ..)| *of != id);
        let release = (succeeded && matches!(rec.kind, Kind::App)).then(|| EnvRelease {
            release: rec.release.clone(),
            app: rec.app.name.clone(),
            deployment: rec.id,
            at: rec.finished_at.unwrap_or(now),
        });
        if let Err(e) = self.store.save_deployment(&rec, release.as_ref()) {
            tracing::error!(deployment = id, "cannot store the deployment's end: {e}");
        }
        tracing::info!(deployment = id, environment = %rec.environment, state = %rec.state_name(), "deployment ended");
        self.metrics.deployment_ended(&rec.state_name());
        let mut view = rec.view();
        view.log.clear();
        self.notifier
            .emit(crate::services::notify::Event::deployment(
                crate::services::notify::EventKind::DeploymentFinished,
                &view,
            ));
        self.report_job(now, &rec);
        self.gate_event(now, GateEvent::Finished { deployment: id });
    }

    fn report_job(&self, now: UnixMillis, rec: &DeploymentRecord) {
        if let Some((job, attempt)) = rec.job {
            let ok = matches!(&rec.status, Status::Ended { state, .. } if state == "succeeded");
            let started_at = rec.started_at.unwrap_or(rec.created_at);
            self.finish_job(now, job, attempt, ok, started_at);
        }
    }

    fn finish_job(
        &self,
        now: UnixMillis,
        job: JobId,
        attempt: Attempt,
        succeeded: bool,
        started_at: UnixMillis,
    ) {
        let log_chunks = match self.logs.open(job, attempt) {
            Ok(log) => {
                if let Err(e) = log.sync() {
                    tracing::warn!(%job, "cannot sync the deploy job's log: {e}");
                }
                log.next_seq()
            }
            Err(_) => 0,
        };
        let (ack, _) = oneshot::channel();
        self.engine.send(Input::Finished {
            agent: deploy_runner(),
            result: JobResult {
                job,
                attempt,
                outcome: if succeeded {
                    JobOutcome::Succeeded
                } else {
                    JobOutcome::Failed {
                        exit_code: 1,
                        step: 0,
                    }
                },
                log_chunks,
                started_at,
                finished_at: now,
            },
            ack,
        });
    }

    /// Aborts a deployment: the gates cancel it if it has not started, or have its
    /// engine roll it back.
    fn abort(&mut self, now: UnixMillis, id: u64, by: &str) {
        self.gate_event(
            now,
            GateEvent::Aborted {
                deployment: id,
                by: by.to_owned(),
            },
        );
    }

    // ---- admin operations -----------------------------------------------------------

    fn admin(&mut self, now: UnixMillis, actor: &str, op: &AdminOp) -> AdminResponse {
        let id = match &op {
            AdminOp::Approve(id) | AdminOp::Promote(id) | AdminOp::Abort(id) => *id,
            AdminOp::Rollback(req) => {
                return match self.rollback(now, actor, req) {
                    Ok(id) => self.view_of(id),
                    Err(message) => refused(message),
                }
            }
            AdminOp::UpgradeAgents {
                select,
                batch,
                failure_budget,
                timeout_ms,
                binary,
            } => {
                return match self.upgrade(
                    now,
                    actor,
                    select,
                    *batch,
                    *failure_budget,
                    *timeout_ms,
                    binary,
                ) {
                    Ok(id) => self.view_of(id),
                    Err(message) => refused(message),
                }
            }
        };
        let Some(rec) = self.active.get(&id) else {
            return match self.store.deployment(id) {
                Ok(Some(r)) => refused(format!(
                    "deployment {id} has ended ({}); nothing to change",
                    r.state_name()
                )),
                Ok(None) => not_found(format!(
                    "no deployment {id}; `gantry deployments list` shows them"
                )),
                Err(e) => refused(e.to_string()),
            };
        };
        match op {
            AdminOp::Approve(_) => {
                let state = rec.state_name();
                let commands = self.gates.handle(
                    now,
                    GateEvent::Approved {
                        deployment: id,
                        by: actor.to_owned(),
                    },
                );
                let denial = commands.iter().find_map(|c| match c {
                    GateCommand::Deny { denial, .. } => Some(*denial),
                    _ => None,
                });
                if let Some(denial) = denial {
                    return refused(match denial {
                        Denial::Unknown | Denial::NotAwaiting => {
                            format!("deployment {id} is not waiting for approval (it is {state})")
                        }
                        Denial::Author => {
                            format!("you started deployment {id}; another person must approve it")
                        }
                        Denial::AlreadyApproved { more } => format!(
                            "you already approved deployment {id}; it needs {more} more approval(s) from other people"
                        ),
                    });
                }
                self.carry_out(now, commands);
            }
            AdminOp::Promote(_) => {
                let awaiting = matches!(
                    rec.engine.as_ref().map(Deployment::phase),
                    Some(Phase::AwaitingPromotion { .. })
                );
                if !awaiting {
                    return refused(format!(
                        "deployment {id} is not waiting for promotion (it is {})",
                        rec.state_name()
                    ));
                }
                self.log(id, now, None, format!("promoted by {actor}"));
                self.audit(now, actor, "deployment.promote", id);
                self.feed(now, id, EngineEvent::Promote);
            }
            AdminOp::Abort(_) => {
                self.audit(now, actor, "deployment.abort", id);
                self.abort(now, id, actor);
            }
            AdminOp::Rollback(_) | AdminOp::UpgradeAgents { .. } => {}
        }
        self.view_of(id)
    }

    fn view_of(&self, id: u64) -> AdminResponse {
        match self.active.get(&id) {
            Some(r) => AdminResponse::Deployment(r.view()),
            None => match self.store.deployment(id) {
                Ok(Some(r)) => AdminResponse::Deployment(r.view()),
                Ok(None) => not_found(format!("no deployment {id}")),
                Err(e) => refused(e.to_string()),
            },
        }
    }

    fn audit(&self, now: UnixMillis, actor: &str, action: &str, id: u64) {
        let entry = AuditEntry {
            at: now,
            actor: actor.to_owned(),
            action: action.to_owned(),
            detail: format!("deployment={id}"),
        };
        if let Err(e) = self.store.append_audit_entry(&entry) {
            tracing::warn!("cannot record {action}: {e}");
        }
    }

    /// `gantry rollback`: a deployment of a release the hosts still hold, with no
    /// staging and no analysis.
    fn rollback(
        &mut self,
        now: UnixMillis,
        actor: &str,
        req: &RollbackRequest,
    ) -> Result<u64, String> {
        let env = self.environment(&req.environment)?;
        let request = self.admit(&env, actor, Purpose::Rollback)?;
        let current = env.current.as_ref().ok_or_else(|| {
            format!(
                "nothing was deployed to {} yet: nothing to roll back",
                env.name
            )
        })?;
        let target = match &req.to {
            Some(to) => env
                .history
                .iter()
                .find(|r| r.release.id == *to || r.release.version == *to)
                .ok_or_else(|| {
                    let known: Vec<&str> =
                        env.history.iter().map(|r| r.release.id.as_str()).collect();
                    format!(
                        "{} never ran release {to}; its releases: {}",
                        env.name,
                        known.join(", ")
                    )
                })?,
            None => env
                .history
                .iter()
                .find(|r| r.release.id != current.release.id)
                .ok_or_else(|| {
                    format!(
                        "{} has no release before {} to go back to",
                        env.name, current.release.id
                    )
                })?,
        }
        .clone();
        let source = self
            .store
            .deployment(target.deployment)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "deployment {} that installed {} is no longer stored",
                    target.deployment, target.release.id
                )
            })?;
        let record = self.create(
            now,
            &env,
            &request,
            Kind::App,
            source.app.clone(),
            target.release.clone(),
            Strategy::Rollback {
                parallelism: req.parallelism,
            },
            source.limits,
            None,
            &format!("rollback from={}", current.release.id),
        )?;
        let id = record.id;
        self.log(
            id,
            now,
            None,
            format!(
                "rollback of {} from {} to {} requested by {actor}",
                env.name, current.release.id, target.release.id
            ),
        );
        self.request(now, id, request);
        Ok(id)
    }

    /// `gantry agents upgrade`: the agent binary to the matching agents, in waves of
    /// `batch`, each restarting once its jobs end; past the failure budget, the
    /// restarted ones go back to the binary they ran.
    #[allow(clippy::too_many_arguments)]
    fn upgrade(
        &mut self,
        now: UnixMillis,
        actor: &str,
        select: &Labels,
        batch: u32,
        failure_budget: u32,
        timeout_ms: u64,
        binary: &AgentBinary,
    ) -> Result<u64, String> {
        let env = upgrades_environment(select.clone());
        let request = self.admit(&env, actor, Purpose::AgentUpgrade)?;
        let short = &binary.sha256[..binary.sha256.len().min(12)];
        let record = self.create(
            now,
            &env,
            &request,
            Kind::AgentUpgrade {
                select: select.clone(),
                binary: binary.clone(),
            },
            AppSpec {
                name: "gantry-agent".into(),
                hooks: Hooks::default(),
                health: None,
                keep: 2,
                shared: Vec::new(),
                env: Labels::new(),
                secrets: Vec::new(),
                blue_green: None,
            },
            ReleaseSpec {
                id: format!("agent-{short}"),
                version: binary.version.clone(),
                manifest: gantry_protocol::Digest::of(binary.sha256.as_bytes()),
            },
            Strategy::Rolling {
                batch: Amount::Count(batch.max(1)),
                failure_budget: Amount::Count(failure_budget),
                pause_ms: 0,
            },
            Limits {
                stage_ms: 5 * 60_000,
                activate_ms: timeout_ms,
                verify_ms: 60_000,
                rollback_ms: timeout_ms,
                ..Limits::default()
            },
            None,
            &format!("agent upgrade select={select:?} sha256={}", binary.sha256),
        )?;
        let id = record.id;
        self.log(
            id,
            now,
            None,
            format!(
                "agent upgrade to {} ({short}) of the agents matching {}, {} at a time",
                binary.version,
                labels_text(select),
                batch.max(1)
            ),
        );
        self.request(now, id, request);
        Ok(id)
    }

    // ---- logs and persistence -------------------------------------------------------

    fn log(&mut self, id: u64, at: UnixMillis, agent: Option<&AgentId>, text: String) {
        if let Some(rec) = self.active.get_mut(&id) {
            rec.push_log(at, agent.cloned(), text);
        }
        self.job_line(id, agent, rec_last_text(self.active.get(&id)));
    }

    /// Copies a deployment's newest log line into its job's log, prefixed by host.
    fn job_line(&self, id: u64, agent: Option<&AgentId>, text: Option<String>) {
        let (Some(rec), Some(text)) = (self.active.get(&id), text) else {
            return;
        };
        let Some((job, attempt)) = rec.job else {
            return;
        };
        let line = match agent.and_then(|a| rec.hosts.get(a)) {
            Some(note) => format!("[{}] {text}", note.hostname),
            None => text,
        };
        self.job_log(job, attempt, &line);
    }

    fn job_log(&self, job: JobId, attempt: Attempt, line: &str) {
        match self.logs.open(job, attempt) {
            Ok(log) => {
                let mut data = line.as_bytes().to_vec();
                data.truncate(crate::base::logs::MAX_CHUNK - 1);
                data.push(b'\n');
                if let Err(e) = log.append(log.next_seq(), &data) {
                    tracing::warn!(%job, "cannot write the deploy job's log: {e}");
                }
            }
            Err(e) => tracing::warn!(%job, "cannot open the deploy job's log: {e}"),
        }
    }

    /// Stores a deployment, then sends the steps it recorded. If the store fails, the
    /// steps are not sent: they stay in flight and go out when their host reconnects or
    /// the next save succeeds, and their deadlines still end them.
    fn save(&mut self, now: UnixMillis, id: u64) {
        if let Some(rec) = self.active.get(&id) {
            if let Err(e) = self.store.save_deployment(rec, None) {
                tracing::error!(deployment = id, "cannot store the deployment: {e}");
                return;
            }
        }
        self.send_outgoing(now);
    }
}

fn rec_last_text(rec: Option<&DeploymentRecord>) -> Option<String> {
    rec.and_then(|r| r.log.last()).map(|l| l.text.clone())
}

/// The rules fleet upgrades run under: no approvals, no wait, any branch.
fn upgrades_environment(select: Labels) -> EnvironmentRecord {
    EnvironmentRecord {
        name: UPGRADES.into(),
        select,
        approvals: 0,
        wait_ms: 0,
        branches: Vec::new(),
        epoch: 0,
        current: None,
        history: Vec::new(),
        created_by: String::new(),
        created_at: UnixMillis(0),
    }
}

/// Hosts that share a hostname (several agents on one machine) are told apart by
/// their agent id: `web-1 (ag-3f9c0a12b7e4)`.
pub fn distinct_names(hosts: &mut [(AgentId, String)]) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, name) in hosts.iter() {
        *counts.entry(name.clone()).or_default() += 1;
    }
    for (agent, name) in hosts.iter_mut() {
        if counts.get(name.as_str()).copied().unwrap_or(0) > 1 {
            *name = format!("{name} ({agent})");
        }
    }
}

fn amount(a: HostAmount) -> Amount {
    match a {
        HostAmount::Count(n) => Amount::Count(n),
        HostAmount::Percent(p) => Amount::Percent(p),
    }
}

/// The engine's strategy for a pipeline's, and the blue-green slots if any.
fn engine_strategy(strategy: &DeployStrategy) -> (Strategy, Option<gantry_protocol::BlueGreen>) {
    match strategy {
        DeployStrategy::Rolling {
            batch,
            failure_budget,
            pause_ms,
        } => (
            Strategy::Rolling {
                batch: amount(*batch),
                failure_budget: amount(*failure_budget),
                pause_ms: *pause_ms,
            },
            None,
        ),
        DeployStrategy::Canary {
            steps,
            failure_budget,
        } => (
            Strategy::Canary {
                steps: steps
                    .iter()
                    .map(|(percent, pause)| CanaryStep {
                        percent: *percent,
                        pause: pause.map_or(Pause::UntilPromoted, |ms| Pause::For { ms }),
                    })
                    .collect(),
                failure_budget: amount(*failure_budget),
            },
            None,
        ),
        DeployStrategy::BlueGreen {
            blue_port,
            green_port,
            switch,
        } => (
            Strategy::BlueGreen {
                failure_budget: Amount::Count(0),
            },
            Some(gantry_protocol::BlueGreen {
                blue_port: *blue_port,
                green_port: *green_port,
                switch: switch.clone(),
            }),
        ),
    }
}

fn app_spec(deploy: &DeploySpec, blue_green: Option<gantry_protocol::BlueGreen>) -> AppSpec {
    AppSpec {
        name: deploy.app.clone(),
        hooks: deploy.hooks.clone(),
        health: deploy.health.clone(),
        keep: deploy.keep,
        shared: deploy.shared.clone(),
        env: deploy.env.clone(),
        secrets: Vec::new(),
        blue_green,
    }
}

/// Secrets an app names (`${{ secrets.NAME }}` in its env and hooks), as a pipeline's
/// `deploy:` gives them or as stored in a deployment.
fn hook_secret_names(env: &Labels, hooks: &Hooks) -> Vec<String> {
    let h = hooks;
    let texts = env.values().chain(
        [&h.stop, &h.start, &h.restart, &h.pre_start, &h.post_start]
            .into_iter()
            .flatten(),
    );
    secret_names(texts)
}

fn secret_names<'a>(texts: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut names = Vec::new();
    for text in texts {
        gantry_protocol::template::expand(text, |expr| {
            if let Some(name) = expr.strip_prefix("secrets.") {
                let name = name.trim().to_owned();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            None
        });
    }
    names
}

/// The environment as `gantry env show` prints it: its record and the enrolled hosts
/// its selector matches now.
pub fn environment_view(store: &Store, record: EnvironmentRecord) -> EnvironmentView {
    let runner = deploy_runner();
    let hosts = store
        .agents()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            a.id != runner
                && a.revoked_at.is_none()
                && gantry_scheduler::labels_match(&a.effective_labels(), &record.select)
        })
        .map(|a| ExecHost {
            agent: a.id,
            hostname: a.hostname,
        })
        .collect();
    EnvironmentView {
        name: record.name,
        select: record.select,
        approvals: record.approvals,
        wait_ms: record.wait_ms,
        branches: record.branches,
        epoch: record.epoch,
        current: record.current,
        history: record.history,
        created_by: record.created_by,
        created_at: record.created_at,
        hosts,
    }
}

/// Creates the environments a pipeline file defines that do not exist yet (an existing
/// one keeps its stored rules: a file cannot weaken an environment's protection).
pub fn create_file_environments(
    store: &Store,
    pipeline: &gantry_pipeline::Pipeline,
    actor: &str,
) -> Result<(), String> {
    for (name, spec) in &pipeline.environments {
        if store
            .environment(name)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            continue;
        }
        let now = UnixMillis::now();
        let record = EnvironmentRecord {
            name: name.clone(),
            select: spec.select.clone(),
            approvals: spec.approvals,
            wait_ms: spec.wait_ms,
            branches: spec.branches.clone(),
            epoch: 0,
            current: None,
            history: Vec::new(),
            created_by: actor.to_owned(),
            created_at: now,
        };
        let audit = AuditEntry {
            at: now,
            actor: actor.to_owned(),
            action: "environment.create".into(),
            detail: format!("name={name} from pipeline {}", pipeline.name),
        };
        // Created meanwhile by someone else: theirs stands.
        let _ = store
            .put_environment(record, false, &audit)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: u8, state: HostState) -> (gantry_deploy::Host, (AgentId, HostNote)) {
        let agent = AgentId::from_random(&[n; 6]);
        let host = gantry_deploy::Host {
            agent: agent.clone(),
            state,
            staged_at: None,
            activated_at: None,
            ended_at: None,
            touched: false,
        };
        let note = HostNote {
            hostname: format!("web{n}"),
            previous: None,
            in_flight: None,
        };
        (host, (agent, note))
    }

    #[test]
    fn a_host_that_could_not_stage_is_not_said_to_be_rolled_back() {
        let (hosts, notes): (Vec<_>, BTreeMap<_, _>) = [
            host(1, HostState::Active),
            host(
                3,
                HostState::StageFailed {
                    reason: "staging did not finish within 20 s".into(),
                },
            ),
        ]
        .into_iter()
        .unzip();
        assert_eq!(
            within_budget(1, &hosts, &notes),
            "1 host(s) failed within the failure budget (could not stage, never switched, still on the previous release: web3)"
        );
    }

    #[test]
    fn failed_hosts_are_named_by_where_they_were_left() {
        let (hosts, notes): (Vec<_>, BTreeMap<_, _>) = [
            host(1, HostState::RolledBack),
            host(2, HostState::Active),
            host(
                3,
                HostState::RollbackFailed {
                    reason: "did not confirm its rollback within 4 s".into(),
                },
            ),
            host(4, HostState::RolledBack),
        ]
        .into_iter()
        .unzip();
        assert_eq!(
            within_budget(3, &hosts, &notes),
            "3 host(s) failed within the failure budget (rolled back to the previous release: web1, web4; could not be rolled back: web3)"
        );
    }
}
