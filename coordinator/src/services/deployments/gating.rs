//! The gate machine's side of the manager: events go to [`gantry_deploy::gates`], and
//! its commands are carried out in order (hold a deployment awaiting approvals, on its
//! wait timer or queued; record an approval; start, refuse, cancel or abort one). The
//! decisions are the machine's; this file only does what it says.

use gantry_deploy::gates::{Command as GateCommand, Event as GateEvent, Request};
use gantry_deploy::Event as EngineEvent;
use gantry_protocol::UnixMillis;

use super::manager::Manager;
use super::record::{DeploymentRecord, Status};

impl Manager {
    /// Feeds a stored deployment's request to the gates and does what they say.
    pub(super) fn request(&mut self, now: UnixMillis, id: u64, request: Request) {
        self.gate_event(
            now,
            GateEvent::Requested {
                deployment: id,
                request,
            },
        );
    }

    pub(super) fn gate_event(&mut self, now: UnixMillis, event: GateEvent) {
        let commands = self.gates.handle(now, event);
        self.carry_out(now, commands);
    }

    /// Does what the gates said, in order, and what they say meanwhile after it.
    pub(super) fn carry_out(&mut self, now: UnixMillis, commands: Vec<GateCommand>) {
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
    pub(super) fn hold(
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

    pub(super) fn gate_command(&mut self, now: UnixMillis, command: GateCommand) {
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

    /// Aborts a deployment: the gates cancel it if it has not started, or have its
    /// engine roll it back.
    pub(super) fn abort(&mut self, now: UnixMillis, id: u64, by: &str) {
        self.gate_event(
            now,
            GateEvent::Aborted {
                deployment: id,
                by: by.to_owned(),
            },
        );
    }
}
