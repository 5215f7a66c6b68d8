//! What deployments make of the stored deployment ([`DeploymentRecord`], kept with its
//! engine and gate state in the store's `deployments` table so a restarted coordinator
//! resumes it): its gate, its bounded log, and what listings show of it (its state
//! name, the reason it gives, the view `gantry deployments show` prints). No I/O here.

use std::collections::{BTreeMap, HashMap};

use gantry_deploy::gates::{Gate, Stage};
use gantry_deploy::{Deployment, HostState, Outcome, Phase, Strategy};
use gantry_protocol::{AgentId, DeployLogLine, DeploymentHost, DeploymentView, UnixMillis};

// The stored deployment record lives with its table in the store; this file adds what
// deployments make of it.
pub(super) use crate::store::{DeploymentRecord, DeploymentStatus as Status, HostNote, Kind};

/// Deployment log lines kept in the record (the job's log keeps every line).
const MAX_LOG_LINES: usize = 2_000;

/// The environment name fleet upgrades go under: not a valid environment name, so it
/// is never one people create, and upgrades run one at a time.
pub const UPGRADES: &str = "(agents)";

impl DeploymentRecord {
    /// What the gate machine knows of this deployment, from the fields that keep it
    /// (author, approvals, wait, status); `None` once it has ended.
    pub(super) fn gate(&self) -> Option<Gate> {
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

    pub(super) fn reason(&self) -> Option<String> {
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

    pub(super) fn push_log(&mut self, at: UnixMillis, agent: Option<AgentId>, text: String) {
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
pub(super) fn within_budget(
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

pub(super) fn host_reason(state: &HostState) -> Option<String> {
    match state {
        HostState::StageFailed { reason }
        | HostState::Failed { reason }
        | HostState::RollbackFailed { reason } => Some(reason.clone()),
        _ => None,
    }
}

pub(super) fn outcome_state(outcome: &Outcome) -> &'static str {
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
