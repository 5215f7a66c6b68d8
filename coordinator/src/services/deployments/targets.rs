//! The hosts as deployments see them: [`Fleet`] (what the manager may ask of the
//! coordinator's sessions), the hosts a deployment starts on, the rules fleet upgrades
//! run under, hostnames told apart, and the environment view with the enrolled hosts
//! its selector matches.

use std::collections::HashMap;

use gantry_protocol::{AgentId, CoordinatorMessage, EnvironmentView, ExecHost, Labels, UnixMillis};

use super::error::DeployError;
use super::record::UPGRADES;
use crate::base::labels::labels_text;
use crate::services::runner::deploy_runner;
use crate::store::{EnvironmentRecord, Store};

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

/// The hosts a deployment to `env` starts on: the connected ones its selector matches
/// (never the deploy runner), by hostname then id, their names told apart. None is an
/// error that says how many enrolled hosts match.
pub(super) fn targets(
    fleet: &dyn Fleet,
    store: &Store,
    env: &EnvironmentRecord,
) -> Result<Vec<(AgentId, String)>, DeployError> {
    let runner = deploy_runner();
    let mut targets: Vec<(AgentId, String)> = fleet
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
        let enrolled = store.agents().map_or(0, |all| {
            all.iter()
                .filter(|a| {
                    a.revoked_at.is_none()
                        && gantry_scheduler::labels_match(&a.effective_labels(), &env.select)
                })
                .count()
        });
        return Err(DeployError::NoHost {
            environment: env.name.clone(),
            selector: labels_text(&env.select),
            enrolled,
        });
    }
    Ok(targets)
}

/// The rules fleet upgrades run under: no approvals, no wait, any branch.
pub(super) fn upgrades_environment(select: Labels) -> EnvironmentRecord {
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
