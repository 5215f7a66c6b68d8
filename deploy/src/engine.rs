//! The deployment state machine: [`Deployment::handle`] is the only way it changes.

use gantry_protocol::{AgentId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::types::{
    Amount, Command, Event, Host, HostState, Outcome, Pause, Phase, Plan, StepError, Strategy,
};

/// A step the engine asks a host to take, and the host reports on.
#[derive(Debug, Clone, Copy)]
enum Step {
    Stage,
    Activate,
    Verify,
    RollBack,
}

impl Step {
    /// What the step's report is called in the log.
    fn report(self) -> &'static str {
        match self {
            Step::Stage => "staging",
            Step::Activate => "switch",
            Step::Verify => "check",
            Step::RollBack => "rollback",
        }
    }

    /// Whether a host in `state` is taking this step (its report is awaited).
    fn is_taken_in(self, state: &HostState) -> bool {
        matches!(
            (self, state),
            (Step::Stage, HostState::Staging { .. })
                | (Step::Activate, HostState::Activating { .. })
                | (Step::Verify, HostState::Verifying { .. })
                | (Step::RollBack, HostState::RollingBack { .. })
        )
    }
}

/// One deployment. Serde, so the coordinator persists it whole after every step and
/// resumes it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    plan: Plan,
    phase: Phase,
    hosts: Vec<Host>,
    /// Host indexes of each wave, fixed when staging ends.
    waves: Vec<Vec<usize>>,
    /// Hosts that failed: staging, switching or a check.
    failures: u32,
    /// Hosts that did not answer a canary analysis check.
    inconclusive: Vec<AgentId>,
}

impl Deployment {
    pub fn new(plan: Plan) -> Self {
        let hosts = plan
            .hosts
            .iter()
            .map(|agent| Host {
                agent: agent.clone(),
                state: HostState::Pending,
                staged_at: None,
                activated_at: None,
                ended_at: None,
                touched: false,
            })
            .collect();
        Self {
            plan,
            phase: Phase::NotStarted,
            hosts,
            waves: Vec::new(),
            failures: 0,
            inconclusive: Vec::new(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The hosts each wave switches, once staging has ended.
    pub fn waves(&self) -> Vec<Vec<AgentId>> {
        self.waves
            .iter()
            .map(|w| w.iter().map(|&i| self.hosts[i].agent.clone()).collect())
            .collect()
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn is_done(&self) -> bool {
        self.phase.is_terminal()
    }

    /// The most hosts that may fail before the deployment rolls back.
    pub fn failure_budget(&self) -> usize {
        let total = self.hosts.len();
        match &self.plan.strategy {
            Strategy::Rolling { failure_budget, .. }
            | Strategy::Canary { failure_budget, .. }
            | Strategy::BlueGreen { failure_budget } => failure_budget.of(total),
            Strategy::Rollback { .. } => total,
        }
    }

    /// When [`Event::Tick`] must next be sent, if anything is waiting on time.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        let phase = match &self.phase {
            Phase::Paused { until, .. } | Phase::AwaitingPromotion { until, .. } => Some(*until),
            _ => None,
        };
        self.hosts
            .iter()
            .filter_map(|h| h.state.deadline())
            .chain(phase)
            .min()
    }

    /// Feeds one event; returns what the shell must do.
    pub fn handle(&mut self, now: UnixMillis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        if self.is_done() {
            if !matches!(event, Event::Tick) {
                out.push(log(format!("ignored {event:?}: the deployment has ended")));
            }
            return out;
        }
        match event {
            Event::Start => self.start(now, &mut out),
            Event::Staged { host, result } => {
                self.on_report(now, &host, Step::Stage, result, &mut out);
            }
            Event::Activated { host, result } => {
                self.on_report(now, &host, Step::Activate, result, &mut out);
            }
            Event::Verified { host, result } => {
                self.on_report(now, &host, Step::Verify, result, &mut out);
            }
            Event::RolledBack { host, result } => {
                self.on_report(now, &host, Step::RollBack, result, &mut out);
            }
            Event::Promote => self.promote(now, &mut out),
            Event::Abort { by } => {
                if matches!(self.phase, Phase::RollingBack { .. }) {
                    out.push(log("already rolling back".into()));
                } else {
                    self.begin_rollback(now, format!("aborted by {by}"), &mut out);
                }
            }
            Event::Tick => self.tick(now, &mut out),
        }
        self.settle(now, &mut out);
        out
    }

    fn index(&self, host: &AgentId) -> Option<usize> {
        self.hosts.iter().position(|h| &h.agent == host)
    }

    /// The index of `host` when its report on `step` is awaited (it is taking that
    /// step); otherwise logs why the report is ignored and gives `None`. Check and
    /// rollback reports from a host that is not a target are dropped without a line,
    /// and their late ones logged without the host's state, as they always were.
    fn awaited_report(&self, host: &AgentId, step: Step, out: &mut Vec<Command>) -> Option<usize> {
        let what = step.report();
        let detailed = matches!(step, Step::Stage | Step::Activate);
        let Some(i) = self.index(host) else {
            if detailed {
                out.push(log(format!(
                    "ignored a {what} report from {host}, not a target"
                )));
            }
            return None;
        };
        let state = &self.hosts[i].state;
        if !step.is_taken_in(state) {
            out.push(log(if detailed {
                format!(
                    "ignored a late {what} report from {host} ({})",
                    state.name()
                )
            } else {
                format!("ignored a late {what} report from {host}")
            }));
            return None;
        }
        Some(i)
    }

    /// Asks host `i` to take `step`, which it must report on before the step's limit.
    fn ask(&mut self, i: usize, step: Step, now: UnixMillis, out: &mut Vec<Command>) {
        let limits = &self.plan.limits;
        let until = now.plus_millis(match step {
            Step::Stage => limits.stage_ms,
            Step::Activate => limits.activate_ms,
            Step::Verify => limits.verify_ms,
            Step::RollBack => limits.rollback_ms,
        });
        let host = self.hosts[i].agent.clone();
        let (state, command) = match step {
            Step::Stage => (HostState::Staging { until }, Command::Stage { host }),
            Step::Activate => (HostState::Activating { until }, Command::Activate { host }),
            Step::Verify => (HostState::Verifying { until }, Command::Verify { host }),
            Step::RollBack => (HostState::RollingBack { until }, Command::Rollback { host }),
        };
        self.set_host(i, state, now, out);
        out.push(command);
    }

    /// A host's report on a step it was asked to take.
    fn on_report(
        &mut self,
        now: UnixMillis,
        host: &AgentId,
        step: Step,
        result: Result<(), StepError>,
        out: &mut Vec<Command>,
    ) {
        let Some(i) = self.awaited_report(host, step, out) else {
            return;
        };
        match (step, result) {
            (Step::Stage, Ok(())) => {
                self.hosts[i].staged_at = Some(now);
                self.set_host(i, HostState::Staged, now, out);
            }
            (Step::Stage, Err(StepError { reason })) => self.stage_failed(i, reason, now, out),
            (Step::Activate, Ok(())) => {
                self.hosts[i].activated_at = Some(now);
                self.set_host(i, HostState::Active, now, out);
            }
            (Step::Activate, Err(StepError { reason })) => self.host_failed(i, reason, now, out),
            (Step::Verify, Ok(())) => self.set_host(i, HostState::Active, now, out),
            (Step::Verify, Err(StepError { reason })) => {
                self.host_failed(i, format!("canary analysis: {reason}"), now, out);
            }
            (Step::RollBack, Ok(())) => self.set_host(i, HostState::RolledBack, now, out),
            (Step::RollBack, Err(StepError { reason })) => {
                out.push(log(format!("rollback failed on {host}: {reason}")));
                self.set_host(i, HostState::RollbackFailed { reason }, now, out);
            }
        }
    }

    fn set_host(&mut self, i: usize, state: HostState, now: UnixMillis, out: &mut Vec<Command>) {
        let host = &mut self.hosts[i];
        if state.is_terminal() || matches!(state, HostState::Active) {
            host.ended_at = Some(now);
        }
        host.state = state.clone();
        out.push(Command::HostChanged {
            host: host.agent.clone(),
            state,
        });
    }

    fn set_phase(&mut self, phase: Phase, out: &mut Vec<Command>) {
        self.phase = phase.clone();
        out.push(Command::PhaseChanged { phase });
    }

    fn start(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        if self.phase != Phase::NotStarted {
            out.push(log("ignored a second start".into()));
            return;
        }
        if self.hosts.is_empty() {
            self.set_phase(
                Phase::Done(Outcome::Failed {
                    reason: "no host matches the environment".into(),
                }),
                out,
            );
            return;
        }
        if let Strategy::Rollback { .. } = self.plan.strategy {
            // The release is already on every host: nothing to stage.
            for i in 0..self.hosts.len() {
                self.set_host(i, HostState::Staged, now, out);
            }
            self.end_staging(now, out);
            return;
        }
        self.set_phase(Phase::Staging, out);
        self.stage_more(now, out);
    }

    /// Starts staging on pending hosts, as many as the seeding allows.
    fn stage_more(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        let seeds = self.plan.limits.stage_seeds as usize;
        let staged = self
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Staged)
            .count();
        let allowed = if seeds == 0 {
            usize::MAX
        } else {
            seeds.saturating_mul(1 + staged)
        };
        let mut in_flight = self
            .hosts
            .iter()
            .filter(|h| matches!(h.state, HostState::Staging { .. }))
            .count();
        for i in 0..self.hosts.len() {
            if in_flight >= allowed {
                break;
            }
            if self.hosts[i].state == HostState::Pending {
                self.ask(i, Step::Stage, now, out);
                in_flight += 1;
            }
        }
    }

    fn stage_failed(&mut self, i: usize, reason: String, now: UnixMillis, out: &mut Vec<Command>) {
        self.failures += 1;
        out.push(log(format!(
            "staging failed on {}: {reason}",
            self.hosts[i].agent
        )));
        self.set_host(i, HostState::StageFailed { reason }, now, out);
        if self.failures as usize > self.failure_budget() {
            let reason = format!(
                "staging failed on {} hosts, more than the failure budget of {}; no host was switched",
                self.failures,
                self.failure_budget()
            );
            self.finish(now, Outcome::Failed { reason }, out);
        }
    }

    /// Staging is over when no host is pending or staging: fix the waves and start.
    fn end_staging(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        let ready: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| self.hosts[i].state == HostState::Staged)
            .collect();
        if ready.is_empty() {
            let reason = "no host could stage the release".to_owned();
            self.finish(now, Outcome::Failed { reason }, out);
            return;
        }
        let n = ready.len();
        self.waves = match &self.plan.strategy {
            Strategy::Rolling { batch, .. } => ready
                .chunks(batch.of(n).max(1))
                .map(<[usize]>::to_vec)
                .collect(),
            Strategy::Rollback { parallelism } => ready
                .chunks((*parallelism as usize).max(1))
                .map(<[usize]>::to_vec)
                .collect(),
            Strategy::BlueGreen { .. } => vec![ready],
            Strategy::Canary { steps, .. } => {
                let mut waves = Vec::new();
                let mut done = 0;
                for step in steps {
                    let upto = Amount::Percent(step.percent).of(n).max(1).max(done);
                    if upto > done {
                        waves.push(ready[done..upto].to_vec());
                        done = upto;
                    }
                }
                if done < n {
                    waves.push(ready[done..].to_vec());
                }
                waves
            }
        };
        out.push(log(format!(
            "{n} hosts staged; switching them in {} wave(s)",
            self.waves.len()
        )));
        self.start_wave(0, now, out);
    }

    fn start_wave(&mut self, index: usize, now: UnixMillis, out: &mut Vec<Command>) {
        if index >= self.waves.len() {
            let failed_hosts = self.failures;
            self.finish(now, Outcome::Succeeded { failed_hosts }, out);
            return;
        }
        self.set_phase(Phase::Wave { index }, out);
        for i in self.waves[index].clone() {
            if self.hosts[i].state != HostState::Staged {
                continue;
            }
            self.hosts[i].touched = true;
            self.ask(i, Step::Activate, now, out);
        }
    }

    /// A switched host failed (its switch, its health, or a check).
    fn host_failed(&mut self, i: usize, reason: String, now: UnixMillis, out: &mut Vec<Command>) {
        let agent = self.hosts[i].agent.clone();
        self.failures += 1;
        out.push(log(format!("{agent} failed: {reason}")));
        if let Strategy::Rollback { .. } = self.plan.strategy {
            // A rollback is not rolled back: the host stays failed, said so.
            self.set_host(i, HostState::RollbackFailed { reason }, now, out);
            return;
        }
        self.set_host(i, HostState::Failed { reason }, now, out);
        if matches!(self.phase, Phase::RollingBack { .. }) {
            self.roll_back_host(i, now, out);
        } else if self.failures as usize > self.failure_budget() {
            let reason = format!(
                "{} hosts failed, more than the failure budget of {} (last: {agent})",
                self.failures,
                self.failure_budget()
            );
            self.begin_rollback(now, reason, out);
        } else {
            out.push(log(format!(
                "{agent} goes back to the previous release ({} of {} failures allowed used)",
                self.failures,
                self.failure_budget()
            )));
            self.roll_back_host(i, now, out);
        }
    }

    fn roll_back_host(&mut self, i: usize, now: UnixMillis, out: &mut Vec<Command>) {
        self.ask(i, Step::RollBack, now, out);
    }

    fn begin_rollback(&mut self, now: UnixMillis, reason: String, out: &mut Vec<Command>) {
        out.push(log(format!("rolling back: {reason}")));
        self.set_phase(Phase::RollingBack { reason }, out);
        for i in 0..self.hosts.len() {
            match &self.hosts[i].state {
                HostState::Pending | HostState::Staging { .. } | HostState::Staged => {
                    self.set_host(i, HostState::Untouched, now, out);
                }
                HostState::Active
                | HostState::Activating { .. }
                | HostState::Verifying { .. }
                | HostState::Failed { .. } => self.roll_back_host(i, now, out),
                _ => {}
            }
        }
    }

    fn promote(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        if let Phase::AwaitingPromotion { next, .. } = self.phase {
            out.push(log("promoted".into()));
            self.inconclusive.clear();
            self.start_wave(next, now, out);
        } else {
            out.push(log(format!(
                "nothing to promote: the deployment is {}",
                phase_name(&self.phase)
            )));
        }
    }

    /// Deadlines: operations past theirs fail; pauses end.
    fn tick(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        for i in 0..self.hosts.len() {
            let Some(until) = self.hosts[i].state.deadline() else {
                continue;
            };
            if until > now {
                continue;
            }
            let agent = self.hosts[i].agent.clone();
            match self.hosts[i].state {
                HostState::Staging { .. } => self.stage_failed(
                    i,
                    format!(
                        "staging did not finish within {} s",
                        self.plan.limits.stage_ms / 1000
                    ),
                    now,
                    out,
                ),
                HostState::Activating { .. } => self.host_failed(
                    i,
                    format!(
                        "did not switch and become healthy within {} s",
                        self.plan.limits.activate_ms / 1000
                    ),
                    now,
                    out,
                ),
                HostState::Verifying { .. } => {
                    // No answer is not a failure: the result is inconclusive.
                    out.push(log(format!("{agent} did not answer its check")));
                    self.inconclusive.push(agent);
                    self.set_host(i, HostState::Active, now, out);
                }
                HostState::RollingBack { .. } => {
                    let reason = format!(
                        "did not confirm its rollback within {} s",
                        self.plan.limits.rollback_ms / 1000
                    );
                    out.push(log(format!("{agent} {reason}")));
                    self.set_host(i, HostState::RollbackFailed { reason }, now, out);
                }
                _ => {}
            }
            if self.is_done() {
                return;
            }
        }
        match self.phase.clone() {
            Phase::Paused { until, next } if until <= now => {
                if matches!(self.plan.strategy, Strategy::Canary { .. }) {
                    self.analyse(next, now, out);
                } else {
                    self.start_wave(next, now, out);
                }
            }
            Phase::AwaitingPromotion { until, .. } if until <= now => {
                let reason = format!(
                    "not promoted within {} s",
                    self.plan.limits.promotion_timeout_ms / 1000
                );
                self.begin_rollback(now, reason, out);
            }
            _ => {}
        }
    }

    /// A canary analysis: check every switched host again.
    fn analyse(&mut self, next: usize, now: UnixMillis, out: &mut Vec<Command>) {
        self.set_phase(Phase::Verifying { next }, out);
        self.inconclusive.clear();
        for i in 0..self.hosts.len() {
            if self.hosts[i].state == HostState::Active {
                self.ask(i, Step::Verify, now, out);
            }
        }
    }

    /// Moves the deployment on once nothing it waits for is in flight.
    fn settle(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        for _ in 0..self.hosts.len() + 2 {
            let before = self.phase.clone();
            let busy = self.hosts.iter().any(|h| h.state.deadline().is_some());
            match self.phase.clone() {
                Phase::Staging => {
                    self.stage_more(now, out);
                    let staging = self
                        .hosts
                        .iter()
                        .any(|h| matches!(h.state, HostState::Pending | HostState::Staging { .. }));
                    if !staging {
                        self.end_staging(now, out);
                    }
                }
                // A wave is over when its hosts have answered and any single-host
                // rollback it caused has too.
                Phase::Wave { index } if !busy => self.after_wave(index, now, out),
                Phase::Verifying { next } if !busy => {
                    if self.inconclusive.is_empty() {
                        self.start_wave(next, now, out);
                    } else {
                        let reason = format!(
                            "inconclusive: {} did not answer the analysis; promote or abort",
                            self.inconclusive
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        self.await_promotion(next, reason, now, out);
                    }
                }
                Phase::RollingBack { reason } if !busy => {
                    self.finish(now, Outcome::RolledBack { reason }, out);
                }
                _ => {}
            }
            if self.phase == before {
                return;
            }
        }
    }

    /// Stops until someone promotes (or aborts) the deployment, saying why.
    fn await_promotion(
        &mut self,
        next: usize,
        reason: String,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        out.push(log(reason.clone()));
        let until = now.plus_millis(self.plan.limits.promotion_timeout_ms);
        let phase = Phase::AwaitingPromotion {
            next,
            reason,
            until,
        };
        self.set_phase(phase, out);
    }

    fn after_wave(&mut self, index: usize, now: UnixMillis, out: &mut Vec<Command>) {
        let next = index + 1;
        if next >= self.waves.len() {
            self.start_wave(next, now, out);
            return;
        }
        match &self.plan.strategy {
            Strategy::Rolling { pause_ms, .. } if *pause_ms > 0 => {
                let until = now.plus_millis(*pause_ms);
                self.set_phase(Phase::Paused { until, next }, out);
            }
            Strategy::Canary { steps, .. } => {
                let pause = steps.get(index).map_or(Pause::For { ms: 0 }, |s| s.pause);
                let switched = self.waves[..=index].iter().map(Vec::len).sum::<usize>();
                let total: usize = self.waves.iter().map(Vec::len).sum();
                match pause {
                    Pause::For { ms } => {
                        out.push(log(format!(
                            "canary step {} done ({switched} of {total} hosts); analysing in {} s",
                            index + 1,
                            ms / 1000
                        )));
                        let until = now.plus_millis(ms);
                        self.set_phase(Phase::Paused { until, next }, out);
                    }
                    Pause::UntilPromoted => {
                        let reason = format!(
                            "canary step {} done ({switched} of {total} hosts); waiting for promote",
                            index + 1
                        );
                        self.await_promotion(next, reason, now, out);
                    }
                }
            }
            _ => self.start_wave(next, now, out),
        }
    }

    fn finish(&mut self, now: UnixMillis, outcome: Outcome, out: &mut Vec<Command>) {
        for i in 0..self.hosts.len() {
            if matches!(
                self.hosts[i].state,
                HostState::Pending | HostState::Staging { .. } | HostState::Staged
            ) {
                self.set_host(i, HostState::Untouched, now, out);
            }
        }
        self.set_phase(Phase::Done(outcome), out);
    }
}

fn log(message: String) -> Command {
    Command::Log { message }
}

/// A phase's name for messages.
pub fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::NotStarted => "not started",
        Phase::Staging => "staging",
        Phase::Wave { .. } => "switching",
        Phase::Paused { .. } => "paused",
        Phase::Verifying { .. } => "analysing",
        Phase::AwaitingPromotion { .. } => "awaiting promotion",
        Phase::RollingBack { .. } => "rolling back",
        Phase::Done(_) => "done",
    }
}
