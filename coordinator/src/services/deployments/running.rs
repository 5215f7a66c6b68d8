//! A started deployment driven on its hosts: starting the engine on the hosts
//! `targets` picks, feeding it events and sending the steps it asks for (with secrets and peers
//! filled in at each send), taking the hosts' results, sending in-flight steps again to
//! a host that reconnects, and ending the deployment (stored with the environment's new
//! release, reported to its job, told to the gates).

use gantry_deploy::gates::Event as GateEvent;
use gantry_deploy::{
    Command as EngineCommand, Deployment, Event as EngineEvent, HostState, Outcome, Phase, Plan,
    StepError, Strategy,
};
use gantry_protocol::{
    AgentId, AppSpec, CoordinatorMessage, DeployCommand, DeployOp, DeployResult, EnvRelease,
    UnixMillis,
};

use super::manager::Manager;
use super::record::{
    host_reason, outcome_state, strategy_name, within_budget, DeploymentRecord, HostNote, Kind,
    Status,
};
use super::spec::hook_secret_names;
use super::targets::{targets, upgrades_environment};

impl Manager {
    /// Picks the target hosts and starts the engine.
    pub(super) fn begin(&mut self, now: UnixMillis, id: u64) {
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
                Err(e) => return self.end_unstarted(now, id, "failed", &e.to_string()),
            },
        };
        let targets = match targets(self.fleet.as_ref(), &self.store, &env) {
            Ok(targets) => targets,
            Err(e) => return self.end_unstarted(now, id, "failed", &e.to_string()),
        };
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
    pub(super) fn feed(&mut self, now: UnixMillis, id: u64, event: EngineEvent) {
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
    pub(super) fn send_op(&mut self, id: u64, host: &AgentId, op: DeployOp) {
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
    pub(super) fn send_outgoing(&mut self, now: UnixMillis) {
        for (id, host, seq, op) in std::mem::take(&mut self.outgoing) {
            if !self.send_step(id, &host, seq, op) {
                let text = "not connected: the step waits for the host until its deadline".into();
                self.log(id, now, Some(&host), text);
            }
        }
    }

    pub(super) fn send_step(&self, id: u64, host: &AgentId, seq: u64, mut op: DeployOp) -> bool {
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
    pub(super) fn app_for_host(&self, rec: &DeploymentRecord) -> AppSpec {
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
    pub(super) fn resend(&mut self, agent: &AgentId) {
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

    pub(super) fn result(&mut self, now: UnixMillis, agent: &AgentId, result: DeployResult) {
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

    pub(super) fn end(&mut self, now: UnixMillis, id: u64, outcome: &Outcome) {
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
    pub(super) fn end_unstarted(&mut self, now: UnixMillis, id: u64, state: &str, reason: &str) {
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
    pub(super) fn close(&mut self, now: UnixMillis, id: u64, succeeded: bool) {
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
}
