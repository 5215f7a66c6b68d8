//! What people do to a deployment through the admin API once it exists: approve it
//! (the gates say whether that approval counts), promote a canary waiting for it, or
//! abort it; each audited, each answered with the deployment's view. Rollbacks and
//! fleet upgrades create deployments (`create`).

use gantry_deploy::gates::{Command as GateCommand, Denial, Event as GateEvent};
use gantry_deploy::{Deployment, Event as EngineEvent, Phase};
use gantry_protocol::{AdminResponse, UnixMillis};

use super::manager::{AdminOp, Manager};
use crate::store::AuditEntry;

pub(super) fn refused(message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error(gantry_protocol::AdminError {
        kind: gantry_protocol::AdminErrorKind::InvalidInput,
        message: message.into(),
    })
}

pub(super) fn not_found(message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error(gantry_protocol::AdminError {
        kind: gantry_protocol::AdminErrorKind::NotFound,
        message: message.into(),
    })
}

impl Manager {
    pub(super) fn admin(&mut self, now: UnixMillis, actor: &str, op: &AdminOp) -> AdminResponse {
        let id = match &op {
            AdminOp::Approve(id) | AdminOp::Promote(id) | AdminOp::Abort(id) => *id,
            AdminOp::Rollback(req) => {
                return match self.rollback(now, actor, req) {
                    Ok(id) => self.view_of(id),
                    Err(e) => refused(e.to_string()),
                }
            }
            AdminOp::UpgradeAgents(upgrade) => {
                return match self.upgrade(now, actor, upgrade) {
                    Ok(id) => self.view_of(id),
                    Err(e) => refused(e.to_string()),
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
            AdminOp::Rollback(_) | AdminOp::UpgradeAgents(_) => {}
        }
        self.view_of(id)
    }

    pub(super) fn view_of(&self, id: u64) -> AdminResponse {
        match self.active.get(&id) {
            Some(r) => AdminResponse::Deployment(r.view()),
            None => match self.store.deployment(id) {
                Ok(Some(r)) => AdminResponse::Deployment(r.view()),
                Ok(None) => not_found(format!("no deployment {id}")),
                Err(e) => refused(e.to_string()),
            },
        }
    }

    pub(super) fn audit(&self, now: UnixMillis, actor: &str, action: &str, id: u64) {
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
}
