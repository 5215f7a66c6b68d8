//! [`Deployments`]: the handle the rest of the coordinator holds on the deployment
//! manager. It starts the task (loading the unfinished deployments) and sends it what
//! happens elsewhere: the scheduler's offers to the deploy runner, hosts' results and
//! reconnections, admin operations (answered once they are durable).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use gantry_deploy::gates::Gates;
use gantry_protocol::{AdminResponse, AgentId, CoordinatorMessage, DeployResult, UnixMillis};
use tokio::sync::{mpsc, oneshot};

use super::admin::refused;
use super::error::DeployError;
use super::manager::{AdminOp, DeployInput, Manager};
use super::targets::Fleet;
use crate::base::logs::LogStore;
use crate::services::engine::Engine;
use crate::store::Store;

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
    ) -> Result<(), DeployError> {
        let mut active = BTreeMap::new();
        let mut recent = Vec::new();
        for record in self
            .store
            .deployments(usize::MAX, false)
            .map_err(DeployError::store("loading the unfinished deployments"))?
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
