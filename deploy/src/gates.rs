//! Deployment gates: whether a requested deployment may run yet, as a state machine with
//! no I/O.
//!
//! [`Gates`] owns every deployment between its request and its end, across all
//! environments, because one of its rules spans deployments: one running deployment per
//! environment. [`Gates::handle`] takes the current time and an [`Event`] and returns the
//! [`Command`]s for the shell (the coordinator's deployment manager) to carry out: start
//! the deployment's engine, say why it waits, refuse it. Time is only ever the `now`
//! argument; [`Gates::next_deadline`] says when the shell must send [`Event::Tick`].
//!
//! # Semantics
//!
//! - **Rules are fixed at request.** A deployment keeps the approvals and wait its
//!   environment asked for when it was requested; changing the environment later changes
//!   only later deployments.
//! - **Branches.** A [`Purpose::Release`] from a branch that matches none of the
//!   environment's globs is refused ([`Refusal::Branch`]); no globs allow every branch.
//!   The glob syntax is the pipeline files' ([`gantry_pipeline::glob_match`]).
//! - **Approvals.** A deployment that needs approvals waits for that many distinct people
//!   other than its author. The author's approval, a second approval by one person, and
//!   any approval of a deployment that is not waiting for approvals are denied
//!   ([`Denial`]) and change nothing.
//! - **Wait timer.** Once its approvals are complete (at its request, if it needs none),
//!   a deployment with a wait waits that long, then is ready.
//! - **One at a time.** A ready deployment starts at once if nothing runs in its
//!   environment and no deployment requested before it is queued there; otherwise it is
//!   queued. When the running deployment ends ([`Event::Finished`]), the queued one
//!   requested first starts. Queues are ordered by deployment number, which the shell
//!   hands out in request order.
//! - **Rollbacks** ([`Purpose::Rollback`]) go back to a release the environment already
//!   approved: no approvals, no wait, no branch rule. One is refused while another
//!   deployment runs in its environment (aborting that one rolls it back).
//! - **Agent upgrades** ([`Purpose::AgentUpgrade`]) run under the rules they are given
//!   (the coordinator gives none) and are never queued: one is refused while another
//!   upgrade has not ended.
//! - **Abort.** Aborting a deployment that has not started ends it ([`Command::Cancel`]);
//!   aborting a running one asks the shell to abort its engine ([`Command::Abort`]), and
//!   it ends when the engine does ([`Event::Finished`]). Ending a deployment that never
//!   ran moves no queue: the coordinator's gate code before this machine started the
//!   next queued deployment whenever any deployment of the environment ended, so
//!   cancelling one that waited for approval while another ran started a second one
//!   beside it (the property tests find that history within a few hundred cases).
//!
//! Architecture invariants (property-tested in `tests/gate_properties.rs`):
//! - no deployment starts without its approvals, before its wait has passed, or from a
//!   branch its environment does not allow;
//! - two deployments never run at once in one environment;
//! - every deployment that is not running waits on people (approvals), on a deadline
//!   ([`Gates::next_deadline`]) or on a running deployment of its environment; none is
//!   left waiting on nothing;
//! - the state is plain data: [`Gates::restore`] from [`Gates::gates`] (what the
//!   coordinator keeps in its deployment records) behaves exactly as never stopping.
//!
//! It must not know about hosts, the engine's phases, the store or the clock.

use std::collections::{BTreeMap, BTreeSet};

use gantry_protocol::{Approval, UnixMillis};
use serde::{Deserialize, Serialize};

/// What an environment asks of a deployment before it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// Distinct people other than the author who must approve.
    pub approvals: u32,
    /// How long a deployment waits once approved (or requested, needing no approval).
    pub wait_ms: u64,
    /// Globs of the branches that may deploy; empty allows every branch.
    pub branches: Vec<String>,
}

/// What a deployment is for: it decides which gates apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// A release a run of `branch` built: every gate.
    Release { branch: String },
    /// Back to a release the environment ran before: no approval, no wait, no branch.
    Rollback,
    /// The agent binary to a fleet: the rules given, no branch, never queued.
    AgentUpgrade,
}

/// A deployment someone asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub environment: String,
    /// Who asked: they may not approve it.
    pub author: String,
    /// The environment's rules at the time of the request.
    pub rules: Rules,
    pub purpose: Purpose,
}

impl Request {
    /// Approvals the deployment needs: the rules', except a rollback's (none).
    pub fn approvals_needed(&self) -> u32 {
        match self.purpose {
            Purpose::Rollback => 0,
            Purpose::Release { .. } | Purpose::AgentUpgrade => self.rules.approvals,
        }
    }

    /// The wait once approved: the rules', except a rollback's (none).
    pub fn wait_ms(&self) -> u64 {
        match self.purpose {
            Purpose::Rollback => 0,
            Purpose::Release { .. } | Purpose::AgentUpgrade => self.rules.wait_ms,
        }
    }

    /// The stage a deployment requested at `now` enters before the queue is consulted:
    /// the shell stores it with the new record, so a record written just before a crash
    /// resumes where [`Event::Requested`] would have put it.
    pub fn first_stage(&self, now: UnixMillis) -> Stage {
        if self.approvals_needed() > 0 {
            Stage::AwaitingApproval
        } else if self.wait_ms() > 0 {
            Stage::Waiting {
                until: now.plus_millis(self.wait_ms()),
            }
        } else {
            Stage::Queued
        }
    }
}

/// Why a request is refused before it becomes a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error(
        "branch {branch} may not deploy to {environment} (allowed: {}); `gantry env update {environment} --branch GLOB` changes that",
        allowed.join(", ")
    )]
    Branch {
        branch: String,
        environment: String,
        allowed: Vec<String>,
    },
    #[error("deployment {running} to {environment} is running; `gantry deploy abort {running}` rolls it back")]
    Running { environment: String, running: u64 },
    #[error(
        "agent upgrade {pending} is under way; wait for it or `gantry deploy abort {pending}`"
    )]
    UpgradeUnderWay { pending: u64 },
}

/// Why an approval is denied. It changes nothing; the shell tells the approver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Denial {
    /// No such deployment is pending (never requested, or ended).
    Unknown,
    /// The deployment is not waiting for approvals (it waits on time, is queued or runs).
    NotAwaiting,
    /// The author asked for the deployment: another person must approve it.
    Author,
    /// This person approved already; `more` approvals from others are still needed.
    AlreadyApproved { more: u32 },
}

/// Where a deployment is between its request and its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    AwaitingApproval,
    /// Approved; ready at `until` (the wait timer).
    Waiting {
        until: UnixMillis,
    },
    /// Ready, behind another deployment of the same environment.
    Queued,
    /// Started: its engine runs until [`Event::Finished`].
    Running,
}

/// One deployment's gates: everything the machine knows of it. The coordinator keeps
/// each field in its deployment record and rebuilds the machine from them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    pub environment: String,
    pub author: String,
    pub approvals_needed: u32,
    /// Accepted approvals, in order: distinct people, none of them the author.
    pub approvals: Vec<Approval>,
    pub wait_ms: u64,
    pub stage: Stage,
}

impl Gate {
    fn complete(&self) -> bool {
        self.approvals.len() >= self.approvals_needed as usize
    }
}

/// Everything that can happen to the gates. Time is not a field: it is `now`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A deployment numbered `deployment` (higher than every earlier one) is requested.
    /// A number already pending is ignored.
    Requested { deployment: u64, request: Request },
    /// `by` approves the deployment.
    Approved { deployment: u64, by: String },
    /// `by` aborts the deployment (or its run was cancelled).
    Aborted { deployment: u64, by: String },
    /// The deployment ended after [`Command::Start`]: its engine finished, or the shell
    /// could not start it. Ignored for a deployment that has not started.
    Finished { deployment: u64 },
    /// Nothing but time passing; send it at [`Gates::next_deadline`].
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Refused: the deployment never enters the gates.
    Refuse { deployment: u64, refusal: Refusal },
    /// Waits for `needed` approvals from people other than its author.
    AwaitApproval { deployment: u64, needed: u32 },
    /// An approval was accepted: record it.
    Approved { deployment: u64, approval: Approval },
    /// An approval was denied: tell `by` why.
    Deny {
        deployment: u64,
        by: String,
        denial: Denial,
    },
    /// Approved; waits for its wait timer until `until`.
    AwaitTimer { deployment: u64, until: UnixMillis },
    /// Ready, queued behind `behind` (the environment's running deployment, or one
    /// requested earlier and queued).
    Queue { deployment: u64, behind: u64 },
    /// Start it now: pick its hosts and run its engine. Send [`Event::Finished`] when it
    /// ends, or at once if it cannot start.
    Start { deployment: u64 },
    /// Ended before it started, aborted by `by`.
    Cancel { deployment: u64, by: String },
    /// Abort its running engine (which rolls back); [`Event::Finished`] follows.
    Abort { deployment: u64, by: String },
}

/// The gates of every deployment that has not ended. Serde, and rebuilt by
/// [`Gates::restore`] from its [`Gate`]s alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gates {
    pending: BTreeMap<u64, Gate>,
}

impl Gates {
    pub fn new() -> Self {
        Self::default()
    }

    /// The machine as it was, from the gates [`Gates::gates`] listed.
    pub fn restore(gates: impl IntoIterator<Item = (u64, Gate)>) -> Self {
        Self {
            pending: gates.into_iter().collect(),
        }
    }

    /// Every pending deployment's gate, by number: the whole state.
    pub fn gates(&self) -> impl Iterator<Item = (u64, &Gate)> {
        self.pending.iter().map(|(id, gate)| (*id, gate))
    }

    pub fn gate(&self, deployment: u64) -> Option<&Gate> {
        self.pending.get(&deployment)
    }

    /// The deployment running in `environment`, if one is.
    pub fn running(&self, environment: &str) -> Option<u64> {
        self.in_environment(environment)
            .find(|(_, g)| g.stage == Stage::Running)
            .map(|(id, _)| id)
    }

    /// Whether a request would be refused, and why: a shell may ask before it numbers
    /// and stores the deployment (a refused request then costs nothing), and
    /// [`Event::Requested`] asks again.
    pub fn admit(&self, request: &Request) -> Result<(), Refusal> {
        match &request.purpose {
            Purpose::Release { branch } => {
                let allowed = &request.rules.branches;
                if allowed.is_empty()
                    || allowed
                        .iter()
                        .any(|glob| gantry_pipeline::glob_match(glob, branch))
                {
                    Ok(())
                } else {
                    Err(Refusal::Branch {
                        branch: branch.clone(),
                        environment: request.environment.clone(),
                        allowed: allowed.clone(),
                    })
                }
            }
            Purpose::Rollback => match self.running(&request.environment) {
                Some(running) => Err(Refusal::Running {
                    environment: request.environment.clone(),
                    running,
                }),
                None => Ok(()),
            },
            Purpose::AgentUpgrade => match self.in_environment(&request.environment).next() {
                Some((pending, _)) => Err(Refusal::UpgradeUnderWay { pending }),
                None => Ok(()),
            },
        }
    }

    /// When [`Event::Tick`] must next be sent, if a wait timer runs.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.pending
            .values()
            .filter_map(|g| match g.stage {
                Stage::Waiting { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Feeds one event; returns what the shell must do.
    pub fn handle(&mut self, now: UnixMillis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::Requested {
                deployment,
                request,
            } => self.request(now, deployment, request, &mut out),
            Event::Approved { deployment, by } => self.approve(now, deployment, by, &mut out),
            Event::Aborted { deployment, by } => match self.pending.get(&deployment) {
                Some(gate) if gate.stage == Stage::Running => {
                    out.push(Command::Abort { deployment, by });
                }
                Some(_) => {
                    self.pending.remove(&deployment);
                    out.push(Command::Cancel { deployment, by });
                }
                None => {}
            },
            Event::Finished { deployment } => {
                if self.pending.get(&deployment).map(|g| g.stage) == Some(Stage::Running) {
                    self.pending.remove(&deployment);
                }
            }
            Event::Tick => {
                let due: Vec<u64> = self
                    .pending
                    .iter()
                    .filter(|(_, g)| matches!(g.stage, Stage::Waiting { until } if until <= now))
                    .map(|(id, _)| *id)
                    .collect();
                for deployment in due {
                    self.ready(deployment, &mut out);
                }
            }
        }
        self.settle(&mut out);
        out
    }

    fn in_environment<'a>(&'a self, environment: &'a str) -> impl Iterator<Item = (u64, &'a Gate)> {
        self.gates()
            .filter(move |(_, g)| g.environment == environment)
    }

    fn request(
        &mut self,
        now: UnixMillis,
        deployment: u64,
        request: Request,
        out: &mut Vec<Command>,
    ) {
        if self.pending.contains_key(&deployment) {
            return;
        }
        if let Err(refusal) = self.admit(&request) {
            out.push(Command::Refuse {
                deployment,
                refusal,
            });
            return;
        }
        let stage = request.first_stage(now);
        let gate = Gate {
            approvals_needed: request.approvals_needed(),
            wait_ms: request.wait_ms(),
            environment: request.environment,
            author: request.author,
            approvals: Vec::new(),
            stage,
        };
        let needed = gate.approvals_needed;
        self.pending.insert(deployment, gate);
        match stage {
            Stage::AwaitingApproval => out.push(Command::AwaitApproval { deployment, needed }),
            Stage::Waiting { until } => out.push(Command::AwaitTimer { deployment, until }),
            Stage::Queued | Stage::Running => self.ready(deployment, out),
        }
    }

    fn approve(&mut self, now: UnixMillis, deployment: u64, by: String, out: &mut Vec<Command>) {
        let Some(gate) = self.pending.get_mut(&deployment) else {
            out.push(Command::Deny {
                deployment,
                by,
                denial: Denial::Unknown,
            });
            return;
        };
        let denial = if gate.stage != Stage::AwaitingApproval {
            Some(Denial::NotAwaiting)
        } else if gate.author == by {
            Some(Denial::Author)
        } else if gate.approvals.iter().any(|a| a.by == by) {
            let more = (gate.approvals_needed as usize).saturating_sub(gate.approvals.len());
            Some(Denial::AlreadyApproved {
                more: u32::try_from(more).unwrap_or(u32::MAX),
            })
        } else {
            None
        };
        if let Some(denial) = denial {
            out.push(Command::Deny {
                deployment,
                by,
                denial,
            });
            return;
        }
        let approval = Approval { by, at: now };
        gate.approvals.push(approval.clone());
        out.push(Command::Approved {
            deployment,
            approval,
        });
        if !gate.complete() {
            return;
        }
        if gate.wait_ms > 0 {
            let until = now.plus_millis(gate.wait_ms);
            gate.stage = Stage::Waiting { until };
            out.push(Command::AwaitTimer { deployment, until });
        } else {
            self.ready(deployment, out);
        }
    }

    /// Ready: start now, or queue behind the environment's running deployment (or an
    /// earlier one already queued).
    fn ready(&mut self, deployment: u64, out: &mut Vec<Command>) {
        let Some(environment) = self.pending.get(&deployment).map(|g| g.environment.clone()) else {
            return;
        };
        let behind = self
            .in_environment(&environment)
            .find(|(id, g)| {
                *id != deployment
                    && (g.stage == Stage::Running || (*id < deployment && g.stage == Stage::Queued))
            })
            .map(|(id, _)| id);
        let Some(gate) = self.pending.get_mut(&deployment) else {
            return;
        };
        if let Some(behind) = behind {
            gate.stage = Stage::Queued;
            out.push(Command::Queue { deployment, behind });
        } else {
            gate.stage = Stage::Running;
            out.push(Command::Start { deployment });
        }
    }

    /// Starts the first queued deployment of every environment where none runs. After
    /// [`Event::Finished`] that is the queue moving on; after any other event it finds
    /// nothing (a queue always waits on a running deployment), except in state restored
    /// from a record stored between a request and its first gate.
    fn settle(&mut self, out: &mut Vec<Command>) {
        let mut running: BTreeSet<&str> = BTreeSet::new();
        let mut first_queued: BTreeMap<&str, u64> = BTreeMap::new();
        for (id, gate) in &self.pending {
            match gate.stage {
                Stage::Running => {
                    running.insert(&gate.environment);
                }
                Stage::Queued => {
                    first_queued.entry(&gate.environment).or_insert(*id);
                }
                Stage::AwaitingApproval | Stage::Waiting { .. } => {}
            }
        }
        let next: Vec<u64> = first_queued
            .into_iter()
            .filter(|(environment, _)| !running.contains(environment))
            .map(|(_, id)| id)
            .collect();
        for deployment in next {
            if let Some(gate) = self.pending.get_mut(&deployment) {
                gate.stage = Stage::Running;
                out.push(Command::Start { deployment });
            }
        }
    }
}
