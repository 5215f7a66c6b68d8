//! The manager: the one task that owns every deployment that has not ended. It holds
//! the active records and the gates, reads the clock once per input at the top of its
//! loop and hands that `now` down, keeps the deploy runner's place in the scheduler
//! (connected, heartbeating, reporting its jobs' results), and writes each
//! deployment's log into its job's log. Saving a record is what sends the steps it
//! recorded. What it does with each input is in the sibling files, one `impl Manager`
//! each.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use gantry_deploy::gates::{Command as GateCommand, Event as GateEvent, Gates};
use gantry_deploy::{Deployment, Event as EngineEvent};
use gantry_protocol::{
    AdminResponse, AgentBinary, AgentId, Attempt, DeployOp, DeployResult, JobId, JobOutcome,
    JobResult, Labels, RollbackRequest, UnixMillis,
};
use tokio::sync::{mpsc, oneshot};

use super::record::{DeploymentRecord, Status};
use super::targets::Fleet;
use crate::base::logs::LogStore;
use crate::services::engine::{Engine, Input};
use crate::services::runner::{deploy_runner, DEPLOY_RUNNER_LABEL};
use crate::store::Store;

/// Deployments a deploy runner runs at once (one per environment anyway).
const RUNNER_SLOTS: u32 = 256;
/// How often the deploy runner renews its leases (they last 30 s).
const RUNNER_HEARTBEAT: Duration = Duration::from_secs(5);
/// Longest wait between checks when nothing is due (a safety net, not a mechanism).
const IDLE_WAKE: Duration = Duration::from_secs(30);

/// What people ask of deployments through the admin API.
#[derive(Debug)]
pub enum AdminOp {
    Approve(u64),
    Promote(u64),
    Abort(u64),
    Rollback(RollbackRequest),
    UpgradeAgents(AgentUpgrade),
}

/// `gantry agents upgrade` once the binary has been checked: what to roll it out to,
/// how many at once, how many may fail, how long one may take.
#[derive(Debug)]
pub struct AgentUpgrade {
    pub select: Labels,
    pub batch: u32,
    pub failure_budget: u32,
    pub timeout_ms: u64,
    pub binary: AgentBinary,
}

/// Everything the manager reacts to.
#[derive(Debug)]
pub(super) enum DeployInput {
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

pub(super) struct Manager {
    pub(super) active: BTreeMap<u64, DeploymentRecord>,
    /// Steps to send once the records that name them are stored: a host may ask for
    /// its release the moment it gets the step, and the grant is checked against the
    /// stored deployment.
    pub(super) outgoing: Vec<(u64, AgentId, u64, DeployOp)>,
    pub(super) store: Arc<Store>,
    pub(super) fleet: Arc<dyn Fleet>,
    pub(super) engine: Engine,
    pub(super) logs: Arc<LogStore>,
    /// Webhooks hear when a deployment waits for approvals and when one ends.
    pub(super) notifier: Arc<crate::services::notify::Notifier>,
    pub(super) metrics: Arc<crate::base::metrics::Metrics>,
    /// When a deployment may start; rebuilt from the records at start.
    pub(super) gates: Gates,
    /// The gates' commands not yet carried out, in order. One may end a deployment
    /// whose end makes the gates say more; those wait their turn here rather than run
    /// inside the one that caused them (so a record never ends up saying `queued` after
    /// it started).
    pub(super) gate_commands: VecDeque<GateCommand>,
    pub(super) carrying_out: bool,
}

impl Manager {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<DeployInput>) {
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
    pub(super) fn connect_runner(&self) {
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
    pub(super) fn report_unreported(&self, now: UnixMillis, recent: &[DeploymentRecord]) {
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

    pub(super) fn next_deadline(&self) -> Option<UnixMillis> {
        self.active
            .values()
            .filter(|r| matches!(r.status, Status::Running))
            .filter_map(|r| r.engine.as_ref().and_then(Deployment::next_deadline))
            .chain(self.gates.next_deadline())
            .min()
    }

    pub(super) fn handle(&mut self, now: UnixMillis, input: DeployInput) {
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
    pub(super) fn tick(&mut self, now: UnixMillis) {
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

    pub(super) fn report_job(&self, now: UnixMillis, rec: &DeploymentRecord) {
        if let Some((job, attempt)) = rec.job {
            let ok = matches!(&rec.status, Status::Ended { state, .. } if state == "succeeded");
            let started_at = rec.started_at.unwrap_or(rec.created_at);
            self.finish_job(now, job, attempt, ok, started_at);
        }
    }

    pub(super) fn finish_job(
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
            outputs: None,
            ack,
        });
    }

    pub(super) fn log(&mut self, id: u64, at: UnixMillis, agent: Option<&AgentId>, text: String) {
        if let Some(rec) = self.active.get_mut(&id) {
            rec.push_log(at, agent.cloned(), text);
        }
        self.job_line(id, agent, rec_last_text(self.active.get(&id)));
    }

    /// Copies a deployment's newest log line into its job's log, prefixed by host.
    pub(super) fn job_line(&self, id: u64, agent: Option<&AgentId>, text: Option<String>) {
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

    pub(super) fn job_log(&self, job: JobId, attempt: Attempt, line: &str) {
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
    pub(super) fn save(&mut self, now: UnixMillis, id: u64) {
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
