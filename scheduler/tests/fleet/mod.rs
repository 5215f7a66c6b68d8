//! A simulated fleet around the real scheduler: a coordinator shell, agents and the
//! network between them, all in one thread on one simulated clock (`Driver::now`), driven
//! by one seeded `Rng`. The same seed gives the same run, step for step.
//!
//! It models, and must be kept true to:
//! - the coordinator's shell (`coordinator/src/services/engine.rs`, `edges/quic/agent.rs`, `base/logs.rs`): inputs
//!   are handled in batches; a batch's effects (job and run records, results, the
//!   scheduler snapshot) are committed before anything is acknowledged, dispatched or
//!   cancelled; a restart restores the last committed snapshot and submits again the
//!   stored runs it lacks, through a batch (`engine.rs` does not commit that yet: see
//!   ARCHITECTURE.md, "Known gaps"); a session silent for three heartbeats is closed; a newer
//!   session of an agent replaces the older one (whose end is reported in either order);
//!   a log chunk is appended in order (a repeat is ignored, a gap ends the stream) and
//!   acknowledged once stored; a log stream resumes at the stored point.
//! - the agent (`agent/src/session.rs`, `jobs.rs`): it accepts a dispatch while a slot is
//!   free (a repeat of an attempt it holds is accepted again), runs the job for a random
//!   time within its timeout, numbers its log chunks, uploads them on every new
//!   connection from the coordinator's resume point, keeps its result until acknowledged and sends it again on every new
//!   connection, reports the attempts whose result is not acknowledged in its hello,
//!   reconnects with jittered backoff, and when it crashes forgets everything.
//! - the network: per-message latency (FIFO per connection and direction, as on a QUIC
//!   stream), duplicated agent messages, connections that break (messages in flight
//!   lost), and partitions that heal (messages held until then; past the idle timeout
//!   the connection dies on both sides).
//!
//! `Driver::step` checks the scheduler's own invariants after every event; this module
//! checks, after every simulated step, what only the whole world can see: no attempt of
//! a job is handed to two agents, an agent that reconnects holding an attempt keeps it,
//! no acknowledged result or log chunk is lost (across coordinator crashes), stored
//! records agree with the scheduler; and, once faults stop, that every job and run ends
//! in a terminal state by a deadline and every agent has handed over everything it held.

use std::collections::{BTreeMap, BTreeSet};

use gantry_protocol::{limits, AgentId, Attempt, JobId, Labels, RunId, UnixMillis};
use gantry_scheduler::{Command, Event, JobState, Outcome, RunState, TIMEOUT_GRACE_SECS};

use crate::common::{self, Driver, Rng};

type Key = (JobId, Attempt);
type ConnId = u64;

/// How often agents heartbeat (the protocol default).
const HEARTBEAT_MS: u64 = limits::DEFAULT_HEARTBEAT_INTERVAL.as_millis() as u64;
/// The coordinator closes a session silent for three heartbeats (`edges/quic/agent.rs`).
const SILENCE_MS: u64 = 3 * HEARTBEAT_MS;
/// A connection that hears nothing for this long is dead on the agent's side.
const IDLE_TIMEOUT_MS: u64 = limits::IDLE_TIMEOUT.as_millis() as u64;
/// The agent's reconnect backoff: full jitter, from 200 ms doubling up to this cap.
const BACKOFF_BASE_MS: u64 = 200;
const BACKOFF_CAP_MS: u64 = 5_000;
/// How long a dial into a partition takes to fail (the agent's connect deadline).
const CONNECT_DEADLINE_MS: u64 = 10_000;
/// Simulated time with faults, then the time everything has to settle without them:
/// a lease (30 s) plus an offer (10 s) per infra retry, a timeout backstop, and jobs of
/// up to 40 s leave a wide margin inside 30 minutes.
const FAULT_PHASE_MS: u64 = 10 * 60 * 1_000;
const SETTLE_DEADLINE_MS: u64 = 30 * 60 * 1_000;

/// What a seed did, so tests can show that faults really happened.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub steps: u64,
    pub runs: u64,
    pub dispatches: u64,
    pub coordinator_crashes: u64,
    /// Crashes that lost a batch the scheduler had handled but the store had not committed.
    pub lost_batches: u64,
    pub agent_crashes: u64,
    pub partitions: u64,
    pub broken_connections: u64,
    pub duplicates: u64,
    pub acked_results: u64,
    pub acked_chunks: u64,
    pub replaced_sessions: u64,
}

impl std::ops::AddAssign<&Report> for Report {
    fn add_assign(&mut self, other: &Report) {
        self.steps += other.steps;
        self.runs += other.runs;
        self.dispatches += other.dispatches;
        self.coordinator_crashes += other.coordinator_crashes;
        self.lost_batches += other.lost_batches;
        self.agent_crashes += other.agent_crashes;
        self.partitions += other.partitions;
        self.broken_connections += other.broken_connections;
        self.duplicates += other.duplicates;
        self.acked_results += other.acked_results;
        self.acked_chunks += other.acked_chunks;
        self.replaced_sessions += other.replaced_sessions;
    }
}

/// Runs one seed to the end: faults, then settling, checking every invariant after every
/// step. Panics with the seed in the message on the first violation.
pub fn run_seed(seed: u64) -> Report {
    let mut sim = Sim::new(seed);
    let start = sim.now();
    while sim.now() < start + FAULT_PHASE_MS {
        sim.step(true);
    }
    sim.stop_faults();
    while !sim.settled() {
        assert!(
            sim.now() < start + SETTLE_DEADLINE_MS,
            "seed {seed}: not settled {} minutes after faults stopped: {}",
            (SETTLE_DEADLINE_MS - FAULT_PHASE_MS) / 60_000,
            sim.unsettled()
        );
        sim.step(false);
    }
    sim.final_checks();
    // The scheduler is deterministic: the same history gives the same commands.
    assert_eq!(
        common::replay(&sim.d.history),
        sim.d.log,
        "seed {seed}: replaying the history gives other commands"
    );
    sim.report
}

// ---- messages and the network ----

/// Agent to coordinator.
#[derive(Debug, Clone)]
enum Up {
    Hello { running: Vec<Key> },
    Heartbeat,
    Accepted(Key),
    Rejected(Key),
    Finished { key: Key, outcome: Outcome },
    LogOpen(Key),
    LogChunk { key: Key, seq: u64, data: u64 },
}

/// Coordinator to agent.
#[derive(Debug, Clone)]
enum Down {
    Welcome,
    Dispatch {
        key: Key,
        timeout_ms: u64,
    },
    Cancel(Key),
    FinishedAck(Key),
    LogResume {
        key: Key,
        next_seq: u64,
    },
    LogAck {
        key: Key,
        next_seq: u64,
    },
    /// The log stream was refused or ended (a gap): the agent opens it again.
    LogRefused(Key),
}

#[derive(Debug, Clone)]
enum Msg {
    Up(Up),
    Down(Down),
    /// The other side closed the connection (a close frame, or a stateless reset).
    Closed,
}

#[derive(Debug)]
struct Packet {
    conn: ConnId,
    agent: usize,
    to_coordinator: bool,
    msg: Msg,
}

#[derive(Debug, Default)]
struct Network {
    /// Keyed by (delivery time, send order).
    in_flight: BTreeMap<(u64, u64), Packet>,
    sent: u64,
    /// Latest delivery time per connection and direction, so each lane stays FIFO.
    lanes: BTreeMap<(ConnId, bool), u64>,
    open: BTreeSet<ConnId>,
    next_conn: ConnId,
    /// Per agent: (partition start, heal time).
    partitions: BTreeMap<usize, (u64, u64)>,
}

impl Network {
    fn connect(&mut self) -> ConnId {
        self.next_conn += 1;
        self.open.insert(self.next_conn);
        self.next_conn
    }

    /// Closes a connection: whatever is in flight on it is lost.
    fn close(&mut self, conn: ConnId) {
        self.open.remove(&conn);
        self.in_flight
            .retain(|_, p| p.conn != conn || matches!(p.msg, Msg::Closed));
    }

    /// The coordinator died under a connection: what it already sent still arrives
    /// (packets on the wire are not recalled), what was on its way to it is lost.
    fn coordinator_gone(&mut self, conn: ConnId) {
        self.open.remove(&conn);
        self.in_flight
            .retain(|_, p| p.conn != conn || !p.to_coordinator);
    }

    fn partitioned(&self, agent: usize, now: u64) -> bool {
        self.partitions
            .get(&agent)
            .is_some_and(|(from, to)| (*from..*to).contains(&now))
    }

    /// Sends `msg`; it is dropped if the connection is closed (except a close notice).
    fn send(&mut self, rng: &mut Rng, now: u64, packet: Packet) {
        if !self.open.contains(&packet.conn) && !matches!(packet.msg, Msg::Closed) {
            return;
        }
        // Mostly a LAN; one message in twenty crosses a slow or congested path.
        let latency = if rng.one_in(20) {
            range(rng, 50, 3_000)
        } else {
            range(rng, 1, 50)
        };
        let lane = self
            .lanes
            .entry((packet.conn, packet.to_coordinator))
            .or_default();
        let at = (now + latency).max(*lane);
        *lane = at;
        self.sent += 1;
        self.in_flight.insert((at, self.sent), packet);
    }

    /// Takes the packets due at `now`, in order. A packet that cannot cross a partition
    /// stays, and so does everything behind it in its lane (QUIC delivers a stream in
    /// order, retransmitting until the path heals).
    fn due(&mut self, now: u64) -> Vec<Packet> {
        let mut blocked = BTreeSet::new();
        let mut keys = Vec::new();
        for (key, p) in self.in_flight.range(..=(now, u64::MAX)) {
            let lane = (p.conn, p.to_coordinator);
            if blocked.contains(&lane) {
                continue;
            }
            if self.partitioned(p.agent, now) {
                blocked.insert(lane);
                continue;
            }
            keys.push(*key);
        }
        keys.into_iter()
            .filter_map(|key| self.in_flight.remove(&key))
            .collect()
    }
}

fn range(rng: &mut Rng, low: u64, high: u64) -> u64 {
    low + rng.below(high - low + 1)
}

/// The bytes of chunk `seq` of an attempt's log, reduced to a number: the agent writes
/// it, the coordinator stores it, the checks recompute it.
fn chunk_data(key: Key, seq: u64) -> u64 {
    let mut rng = Rng::new(key.0.run.0 ^ (u64::from(key.0.index) << 20) ^ (u64::from(key.1) << 40));
    for _ in 0..=(seq % 4) {
        rng.next_u64();
    }
    rng.next_u64() ^ seq
}

// ---- the agent ----

#[derive(Debug)]
struct AgentJob {
    /// What it will report when it ends.
    outcome: Outcome,
    ends_at: u64,
    next_chunk_at: u64,
    /// Chunks written to the spool: `0..produced`.
    produced: u64,
    /// Chunks the coordinator holds: `0..acked` (dropped from the spool).
    acked: u64,
    /// The open log stream: its connection and the next chunk to send on it.
    stream: Option<(ConnId, u64)>,
    /// A log stream asked for on this connection, not answered yet.
    opening: Option<ConnId>,
    finished: bool,
    result_acked: bool,
}

impl AgentJob {
    fn log_pending(&self) -> bool {
        !(self.finished && self.acked >= self.produced)
    }
}

#[derive(Debug)]
struct Conn {
    id: ConnId,
    welcomed: bool,
}

#[derive(Debug)]
struct SimAgent {
    id: AgentId,
    labels: Labels,
    slots: u32,
    alive: bool,
    restarts_at: u64,
    conn: Option<Conn>,
    dial_at: u64,
    /// Failed dials since the last welcome, for the backoff.
    failures: u32,
    next_heartbeat: u64,
    jobs: BTreeMap<Key, AgentJob>,
}

impl SimAgent {
    /// The attempts whose result the coordinator does not have yet: running ones and
    /// finished ones whose result is not acknowledged (`JobManager::running`).
    fn held(&self) -> Vec<Key> {
        self.jobs
            .iter()
            .filter(|(_, j)| !j.result_acked)
            .map(|(k, _)| *k)
            .collect()
    }
}

// ---- the coordinator's store and shell ----

#[derive(Debug, Clone)]
struct StoredJob {
    attempt: Attempt,
    state: JobState,
    /// Every attempt handed out, and to whom (the log upload check reads it).
    attempts: Vec<(Attempt, AgentId)>,
}

#[derive(Debug, Clone)]
struct StoredRun {
    submitted: Event,
    state: RunState,
}

/// What survives a coordinator crash.
#[derive(Debug, Default)]
struct Store {
    runs: BTreeMap<RunId, StoredRun>,
    jobs: BTreeMap<JobId, StoredJob>,
    /// Results the scheduler took, per attempt.
    results: BTreeMap<Key, Outcome>,
    /// Stored log chunks per attempt, in order.
    logs: BTreeMap<Key, Vec<u64>>,
}

#[derive(Debug)]
enum Input {
    Event(Event),
    /// A session started on `conn` (`event` is its `AgentConnected`).
    Connected {
        conn: ConnId,
        event: Event,
    },
    Submitted(RunId),
    Finished {
        agent: usize,
        conn: ConnId,
        key: Key,
        outcome: Outcome,
    },
}

#[derive(Debug)]
struct Session {
    conn: ConnId,
    last_heard: u64,
}

#[derive(Debug, Default)]
struct Shell {
    up: bool,
    back_at: u64,
    sessions: BTreeMap<usize, Session>,
    inbox: Vec<Input>,
    store: Store,
    /// Open log streams.
    streams: BTreeSet<(ConnId, Key)>,
    /// Log answers owed once this step's writes are stored: resumes, then acks.
    resumes: BTreeSet<(ConnId, usize, Key)>,
    acks: BTreeSet<(ConnId, usize, Key)>,
}

// ---- what was promised, for the checks ----

#[derive(Debug, Default)]
struct Oracle {
    /// Every (job, attempt) ever dispatched, and to whom.
    handed_to: BTreeMap<Key, AgentId>,
    /// Jobs whose terminal state the coordinator acknowledged to an agent (the result
    /// was committed before the acknowledgement left), with that state.
    acked_terminal: BTreeMap<JobId, JobState>,
    /// Per attempt, the highest log point acknowledged to its agent.
    acked_chunks: BTreeMap<Key, u64>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    /// The coordinator's scheduler; its clock is the world's.
    d: Driver,
    shell: Shell,
    agents: Vec<SimAgent>,
    net: Network,
    oracle: Oracle,
    next_run: u64,
    faults: bool,
    report: Report,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        // Every label set the runs ask for exists in the fleet (one agent each), plus up
        // to three agents with random labels; 1-3 slots each.
        let mut agents: Vec<(Labels, u32)> = common::full_label_space()
            .into_iter()
            .map(|labels| (labels, 1 + rng.below(3) as u32))
            .collect();
        for _ in 0..rng.below(4) {
            let mut labels = Labels::new();
            if rng.one_in(2) {
                labels.insert("os".into(), "linux".into());
            }
            agents.push((labels, 1 + rng.below(3) as u32));
        }
        let d = Driver::default();
        let now = d.now.0;
        let agents = agents
            .into_iter()
            .enumerate()
            .map(|(n, (labels, slots))| SimAgent {
                id: common::agent(n as u8 + 1),
                labels,
                slots,
                alive: true,
                restarts_at: 0,
                conn: None,
                dial_at: now + rng.below(1_000),
                failures: 0,
                next_heartbeat: 0,
                jobs: BTreeMap::new(),
            })
            .collect();
        Self {
            seed,
            rng,
            d,
            shell: Shell {
                up: true,
                ..Shell::default()
            },
            agents,
            net: Network::default(),
            oracle: Oracle::default(),
            next_run: 1,
            faults: true,
            report: Report::default(),
        }
    }

    fn now(&self) -> u64 {
        self.d.now.0
    }

    /// One step: time passes (10-500 ms), due messages arrive, the coordinator handles
    /// its batch, agents act, faults strike, and the invariants are checked.
    fn step(&mut self, faults: bool) {
        self.report.steps += 1;
        let advance = range(&mut self.rng, 10, 500);
        self.d.advance_ms(advance);
        let now = self.now();
        for packet in self.net.due(now) {
            if packet.to_coordinator {
                self.coordinator_receives(packet);
            } else {
                self.agent_receives(packet);
            }
        }
        if self.shell.up {
            self.operator(faults);
            self.coordinator_step();
        } else if now >= self.shell.back_at {
            self.coordinator_restarts();
        }
        for n in 0..self.agents.len() {
            self.agent_step(n);
        }
        if faults {
            self.inject_faults();
        }
        self.check();
    }

    // ---- faults ----

    fn inject_faults(&mut self) {
        let now = self.now();
        // Odds per step (~255 ms): a coordinator crash every ~4 minutes (plus those in
        // `engine_batch`), an agent crash, a partition and a broken connection about
        // every 40 s each.
        if self.shell.up && self.rng.one_in(1_000) {
            self.coordinator_crashes();
        }
        let n = self.rng.below(self.agents.len() as u64) as usize;
        if self.agents[n].alive && self.rng.one_in(150) {
            self.agent_crashes(n);
        }
        if !self.net.partitions.contains_key(&n) && self.rng.one_in(150) {
            // Short ones the connection rides out, long ones past the idle timeout.
            let length = if self.rng.one_in(2) {
                range(&mut self.rng, 500, 20_000)
            } else {
                range(&mut self.rng, 20_000, 90_000)
            };
            self.net.partitions.insert(n, (now, now + length));
            self.report.partitions += 1;
        }
        self.net.partitions.retain(|_, (_, heals)| *heals > now);
        if self.rng.one_in(150) {
            if let Some(conn) = self.agents[n].conn.as_ref().map(|c| c.id) {
                if self.net.open.contains(&conn) {
                    // The path broke: both sides learn it, each after its own delay.
                    self.net.close(conn);
                    self.report.broken_connections += 1;
                    for to_coordinator in [true, false] {
                        self.send(conn, n, to_coordinator, Msg::Closed);
                    }
                }
            }
        }
    }

    fn stop_faults(&mut self) {
        self.faults = false;
        self.net.partitions.clear();
        let now = self.now();
        for agent in &mut self.agents {
            if !agent.alive {
                agent.restarts_at = agent.restarts_at.min(now);
            }
        }
        if !self.shell.up {
            self.shell.back_at = self.shell.back_at.min(now);
        }
    }

    fn coordinator_crashes(&mut self) {
        let now = self.now();
        self.report.coordinator_crashes += 1;
        self.shell.up = false;
        self.shell.back_at = now + range(&mut self.rng, 200, 15_000);
        let sessions = std::mem::take(&mut self.shell.sessions);
        for (agent, session) in sessions {
            self.net.coordinator_gone(session.conn);
            // Agents learn at their next packet, which the restarted (or absent)
            // coordinator answers with a stateless reset: within a heartbeat.
            let notice = range(&mut self.rng, 0, HEARTBEAT_MS);
            self.net.send(
                &mut self.rng,
                now + notice,
                Packet {
                    conn: session.conn,
                    agent,
                    to_coordinator: false,
                    msg: Msg::Closed,
                },
            );
        }
        // Connections still opening die too; their agents time out or get a reset.
        let open: Vec<ConnId> = self.net.open.iter().copied().collect();
        for conn in open {
            self.net.coordinator_gone(conn);
            if let Some(n) = self
                .agents
                .iter()
                .position(|a| a.conn.as_ref().is_some_and(|c| c.id == conn))
            {
                self.send(conn, n, false, Msg::Closed);
            }
        }
        self.shell.inbox.clear();
        self.shell.streams.clear();
        self.shell.resumes.clear();
        self.shell.acks.clear();
    }

    fn coordinator_restarts(&mut self) {
        self.shell.up = true;
        self.d.crash();
        // Stored runs the snapshot lacks (stored, then a crash before the engine
        // committed them) are submitted again, and the result committed like any batch.
        let missing: Vec<RunId> = self
            .shell
            .store
            .runs
            .iter()
            .filter(|(run, r)| {
                !r.state.is_terminal() && self.d.scheduler.run_state(**run).is_none()
            })
            .map(|(run, _)| *run)
            .collect();
        for run in missing {
            self.shell.inbox.push(Input::Submitted(run));
        }
    }

    fn agent_crashes(&mut self, n: usize) {
        let now = self.now();
        self.report.agent_crashes += 1;
        let agent = &mut self.agents[n];
        agent.alive = false;
        agent.restarts_at = now + range(&mut self.rng, 100, 20_000);
        // Its spool and results go with it; the coordinator finds out by silence or when
        // the restarted agent's new session replaces the old one.
        agent.jobs.clear();
        agent.conn = None;
    }

    // ---- the operator: submits runs, approves gates, sometimes cancels ----

    fn operator(&mut self, faults: bool) {
        if faults && self.rng.one_in(40) {
            let run = self.next_run;
            self.next_run += 1;
            self.report.runs += 1;
            let submitted = common::random_run(&mut self.rng, run, 8);
            // `gantry run` stores the run before the engine sees it (`services/runs/submit.rs`).
            if let Event::RunSubmitted { jobs, .. } = &submitted {
                for plan in jobs {
                    self.shell.store.jobs.insert(
                        plan.id,
                        StoredJob {
                            attempt: 0,
                            state: JobState::Pending,
                            attempts: Vec::new(),
                        },
                    );
                }
            }
            self.shell.store.runs.insert(
                RunId(run),
                StoredRun {
                    submitted,
                    state: RunState::Running,
                },
            );
            self.shell.inbox.push(Input::Submitted(RunId(run)));
        }
        let waiting: Vec<JobId> = self
            .shell
            .store
            .jobs
            .iter()
            .filter(|(_, j)| j.state == JobState::AwaitingApproval)
            .map(|(job, _)| *job)
            .collect();
        for job in waiting {
            if self.rng.one_in(20) {
                self.shell.inbox.push(Input::Event(Event::Approve { job }));
            }
        }
        if faults && self.next_run > 1 && self.rng.one_in(1_000) {
            let run = RunId(1 + self.rng.below(self.next_run - 1));
            self.shell
                .inbox
                .push(Input::Event(Event::CancelRun { run }));
        }
    }

    // ---- the coordinator ----

    fn send(&mut self, conn: ConnId, agent: usize, to_coordinator: bool, msg: Msg) {
        let now = self.now();
        self.net.send(
            &mut self.rng,
            now,
            Packet {
                conn,
                agent,
                to_coordinator,
                msg,
            },
        );
    }

    fn send_down(&mut self, conn: ConnId, agent: usize, msg: Down) {
        self.send(conn, agent, false, Msg::Down(msg));
    }

    fn coordinator_receives(&mut self, packet: Packet) {
        let Packet {
            conn,
            agent: n,
            msg,
            ..
        } = packet;
        if !self.shell.up {
            return;
        }
        let id = self.agents[n].id.clone();
        let msg = match msg {
            Msg::Up(msg) => msg,
            Msg::Closed => {
                // The connection broke under the session: it ends.
                if self.shell.sessions.get(&n).is_some_and(|s| s.conn == conn) {
                    self.shell.sessions.remove(&n);
                    self.shell
                        .inbox
                        .push(Input::Event(Event::AgentDisconnected { agent: id }));
                }
                self.shell.streams.retain(|(c, _)| *c != conn);
                return;
            }
            Msg::Down(_) => unreachable!("a coordinator-bound packet carries an agent message"),
        };
        if !self.net.open.contains(&conn) {
            return;
        }
        if let Up::Hello { running } = msg {
            let old = self.shell.sessions.insert(
                n,
                Session {
                    conn,
                    last_heard: self.now(),
                },
            );
            let connected = Input::Connected {
                conn,
                event: Event::AgentConnected {
                    agent: id.clone(),
                    labels: self.agents[n].labels.clone(),
                    slots: self.agents[n].slots,
                    running,
                },
            };
            self.send_down(conn, n, Down::Welcome);
            match old {
                Some(old) => {
                    // The older session is closed as replaced; it reports its end on its
                    // own task, so the engine may see it before or after the new one.
                    self.report.replaced_sessions += 1;
                    self.net.close(old.conn);
                    self.send(old.conn, n, false, Msg::Closed);
                    self.shell.streams.retain(|(c, _)| *c != old.conn);
                    let ended = Input::Event(Event::AgentDisconnected { agent: id });
                    if self.rng.one_in(2) {
                        self.shell.inbox.extend([ended, connected]);
                    } else {
                        self.shell.inbox.extend([connected, ended]);
                    }
                }
                None => self.shell.inbox.push(connected),
            }
            return;
        }
        // Log streams live beside the session (a stream of the connection).
        match msg {
            Up::LogOpen(key) => {
                let handed = self
                    .shell
                    .store
                    .jobs
                    .get(&key.0)
                    .is_some_and(|j| j.attempts.contains(&(key.1, id.clone())));
                if handed {
                    self.shell.streams.insert((conn, key));
                    self.shell.resumes.insert((conn, n, key));
                } else {
                    self.send_down(conn, n, Down::LogRefused(key));
                }
                return;
            }
            Up::LogChunk { key, seq, data } => {
                if !self.shell.streams.contains(&(conn, key)) {
                    return;
                }
                let log = self.shell.store.logs.entry(key).or_default();
                let next = log.len() as u64;
                if seq == next {
                    assert_eq!(
                        data,
                        chunk_data(key, seq),
                        "seed {}: {key:?} chunk {seq} is not the one the agent wrote",
                        self.seed
                    );
                    log.push(data);
                    self.shell.acks.insert((conn, n, key));
                } else if seq > next {
                    // A gap: the stream is refused, the agent resumes on a new one.
                    self.shell.streams.remove(&(conn, key));
                    self.send_down(conn, n, Down::LogRefused(key));
                }
                return;
            }
            _ => {}
        }
        let now = self.now();
        let Some(session) = self.shell.sessions.get_mut(&n).filter(|s| s.conn == conn) else {
            return;
        };
        session.last_heard = now;
        let input = match msg {
            Up::Heartbeat => Input::Event(Event::AgentHeartbeat { agent: id }),
            Up::Accepted((job, attempt)) => Input::Event(Event::JobAccepted {
                job,
                attempt,
                agent: id,
            }),
            Up::Rejected((job, attempt)) => Input::Event(Event::JobRejected {
                job,
                attempt,
                agent: id,
                reason: "all slots are busy".into(),
            }),
            Up::Finished { key, outcome } => Input::Finished {
                agent: n,
                conn,
                key,
                outcome,
            },
            Up::Hello { .. } | Up::LogOpen(_) | Up::LogChunk { .. } => return,
        };
        self.shell.inbox.push(input);
    }

    /// One engine batch: handle, commit, then act. Also closes silent sessions and
    /// answers log streams.
    fn coordinator_step(&mut self) {
        let now = self.now();
        let silent: Vec<(usize, ConnId)> = self
            .shell
            .sessions
            .iter()
            .filter(|(_, s)| now >= s.last_heard + SILENCE_MS)
            .map(|(n, s)| (*n, s.conn))
            .collect();
        for (n, conn) in silent {
            self.shell.sessions.remove(&n);
            self.net.close(conn);
            self.send(conn, n, false, Msg::Closed);
            self.shell.streams.retain(|(c, _)| *c != conn);
            let agent = self.agents[n].id.clone();
            self.shell
                .inbox
                .push(Input::Event(Event::AgentDisconnected { agent }));
        }
        if self
            .d
            .scheduler
            .next_deadline()
            .is_some_and(|due| due.0 <= now)
        {
            self.shell.inbox.push(Input::Event(Event::Tick));
        }
        let batch = std::mem::take(&mut self.shell.inbox);
        if !batch.is_empty() {
            self.engine_batch(batch);
        }
        if self.shell.up {
            self.answer_logs();
        }
    }

    fn engine_batch(&mut self, batch: Vec<Input>) {
        let mut commands = Vec::new();
        let mut results = Vec::new();
        for input in batch {
            match input {
                Input::Connected { conn, event } => commands.extend(self.reconnect(conn, event)),
                Input::Event(event) => commands.extend(self.d.step(event)),
                Input::Submitted(run) => {
                    let event = self.shell.store.runs[&run].submitted.clone();
                    commands.extend(self.d.step(event));
                }
                Input::Finished {
                    agent,
                    conn,
                    key,
                    outcome,
                } => {
                    commands.extend(self.d.step(Event::JobFinished {
                        job: key.0,
                        attempt: key.1,
                        agent: self.agents[agent].id.clone(),
                        outcome,
                    }));
                    results.push((agent, conn, key, outcome));
                }
            }
        }
        // A crash here loses the batch: nothing of it was stored or said. With a batch
        // about every step, 1 in 600 is a lost batch every ~2.5 minutes.
        if self.faults && self.rng.one_in(600) {
            self.report.lost_batches += 1;
            self.coordinator_crashes();
            return;
        }
        self.commit(&commands, &results);
        // A crash between the commit and the messages: stored, never said.
        if self.faults && self.rng.one_in(1_200) {
            self.coordinator_crashes();
            return;
        }
        for (agent, conn, key, _) in results {
            self.send_down(conn, agent, Down::FinishedAck(key));
        }
        for command in commands {
            match command {
                Command::Dispatch {
                    job,
                    attempt,
                    agent,
                    timeout_ms,
                    ..
                } => {
                    self.report.dispatches += 1;
                    let n = self.agent_index(&agent);
                    if let Some(previous) =
                        self.oracle.handed_to.insert((job, attempt), agent.clone())
                    {
                        assert_eq!(
                            previous, agent,
                            "seed {}: attempt {attempt} of {job} handed to two agents",
                            self.seed
                        );
                    }
                    if let Some(conn) = self.shell.sessions.get(&n).map(|s| s.conn) {
                        self.send_down(
                            conn,
                            n,
                            Down::Dispatch {
                                key: (job, attempt),
                                timeout_ms,
                            },
                        );
                    }
                }
                Command::Cancel {
                    job,
                    attempt,
                    agent,
                } => {
                    let n = self.agent_index(&agent);
                    if let Some(conn) = self.shell.sessions.get(&n).map(|s| s.conn) {
                        self.send_down(conn, n, Down::Cancel((job, attempt)));
                    }
                }
                _ => {}
            }
        }
    }

    /// An agent's session starts. An attempt the agent still holds (running, or finished
    /// with its result not acknowledged) and the scheduler leases to it must stay with
    /// it: taking it away would run the job again, or mark it lost, although the agent
    /// is about to deliver its result.
    ///
    /// Only a hello from the agent's current connection speaks for what it holds: one
    /// sent by an earlier incarnation of a crashed agent can arrive after the new one's
    /// and replace its session; the scheduler then believes the stale list until the
    /// agent, closed as replaced, reconnects (work is delayed or repeated, never lost).
    fn reconnect(&mut self, conn: ConnId, event: Event) -> Vec<Command> {
        let Event::AgentConnected { agent: id, .. } = &event else {
            return self.d.step(event);
        };
        let id = id.clone();
        let n = self.agent_index(&id);
        let current = self.agents[n].conn.as_ref().is_some_and(|c| c.id == conn);
        let kept: Vec<Key> = self.agents[n]
            .jobs
            .iter()
            .filter(|(_, j)| !j.result_acked)
            .map(|(key, _)| *key)
            .filter(|(job, attempt)| {
                self.d.scheduler.job_state(*job).and_then(JobState::agent) == Some((&id, *attempt))
                    && !self.timer_due(*job)
                    && current
            })
            .collect();
        let commands = self.d.step(event);
        for (job, attempt) in kept {
            let state = self.d.scheduler.job_state(job);
            assert!(
                state.and_then(JobState::agent) == Some((&id, attempt)),
                "seed {}: agent {n} reconnected holding attempt {attempt} of {job}, which the scheduler took away: {state:?}",
                self.seed
            );
        }
        commands
    }

    /// Whether the scheduler may take a held job away on its own at `now`: its offer or
    /// lease ran out, or its timeout backstop fired (the agent was gone too long).
    fn timer_due(&self, job: JobId) -> bool {
        let now = self.d.now;
        match self.d.scheduler.job_state(job) {
            Some(JobState::Offered {
                offer_expires_at, ..
            }) => *offer_expires_at <= now,
            Some(JobState::Running {
                lease_expires_at,
                started_at,
                ..
            }) => {
                let timeout_ms = self.d.scheduler.job_plan(job).map_or(0, |p| p.timeout_ms);
                let backstop = started_at.0 + timeout_ms + TIMEOUT_GRACE_SECS * 1_000;
                *lease_expires_at <= now || (timeout_ms > 0 && backstop <= now.0)
            }
            _ => false,
        }
    }

    /// Stores a batch's effects and the snapshot in one transaction, then drops the
    /// runs that ended (`EngineTask::step`).
    fn commit(&mut self, commands: &[Command], results: &[(usize, ConnId, Key, Outcome)]) {
        let store = &mut self.shell.store;
        for (_, _, key, outcome) in results {
            if store.jobs.get(&key.0).is_some_and(|j| j.attempt == key.1) {
                store.results.insert(*key, *outcome);
            }
        }
        let mut finished = Vec::new();
        for command in commands {
            match command {
                Command::JobChanged {
                    job,
                    attempt,
                    state,
                } => {
                    let record = store.jobs.entry(*job).or_insert_with(|| StoredJob {
                        attempt: 0,
                        state: JobState::Pending,
                        attempts: Vec::new(),
                    });
                    record.attempt = record.attempt.max(*attempt);
                    if let JobState::Offered { agent, attempt, .. } = state {
                        if !record.attempts.iter().any(|(a, _)| a == attempt) {
                            record.attempts.push((*attempt, agent.clone()));
                        }
                    }
                    record.state = state.clone();
                }
                Command::RunChanged { run, state } => {
                    if let Some(record) = store.runs.get_mut(run) {
                        record.state = *state;
                    }
                    if state.is_terminal() {
                        finished.push(*run);
                    }
                }
                Command::RunRejected { run, error } => {
                    panic!("seed {}: run {run} rejected: {error}", self.seed)
                }
                Command::Dispatch { .. } | Command::Cancel { .. } => {}
            }
        }
        for run in finished {
            self.d.forget_run(run);
        }
        self.d.commit();
    }

    fn answer_logs(&mut self) {
        for (conn, n, key) in std::mem::take(&mut self.shell.resumes) {
            let next_seq = self
                .shell
                .store
                .logs
                .get(&key)
                .map_or(0, |l| l.len() as u64);
            self.send_down(conn, n, Down::LogResume { key, next_seq });
        }
        for (conn, n, key) in std::mem::take(&mut self.shell.acks) {
            if self.shell.streams.contains(&(conn, key)) {
                let next_seq = self
                    .shell
                    .store
                    .logs
                    .get(&key)
                    .map_or(0, |l| l.len() as u64);
                self.send_down(conn, n, Down::LogAck { key, next_seq });
            }
        }
    }

    fn agent_index(&self, id: &AgentId) -> usize {
        self.agents
            .iter()
            .position(|a| a.id == *id)
            .expect("commands name agents of the fleet")
    }

    // ---- the agents ----

    fn send_up(&mut self, n: usize, msg: Up) {
        let Some(conn) = self.agents[n].conn.as_ref().map(|c| c.id) else {
            return;
        };
        // Some agent messages arrive twice (a resend crossing its acknowledgement).
        let twice = self.faults
            && matches!(
                msg,
                Up::Accepted(_) | Up::Finished { .. } | Up::LogChunk { .. }
            )
            && self.rng.one_in(50);
        if twice {
            self.report.duplicates += 1;
            self.send(conn, n, true, Msg::Up(msg.clone()));
        }
        self.send(conn, n, true, Msg::Up(msg));
    }

    fn backoff(&mut self, n: usize) -> u64 {
        let agent = &mut self.agents[n];
        agent.failures = (agent.failures + 1).min(16);
        let ceiling = (BACKOFF_BASE_MS << agent.failures.min(10)).min(BACKOFF_CAP_MS);
        self.rng.below(ceiling + 1)
    }

    fn lose_connection(&mut self, n: usize) {
        let now = self.now();
        self.agents[n].conn = None;
        for job in self.agents[n].jobs.values_mut() {
            job.stream = None;
            job.opening = None;
        }
        let delay = self.backoff(n);
        self.agents[n].dial_at = now + delay;
    }

    fn agent_receives(&mut self, packet: Packet) {
        let n = packet.agent;
        let now = self.now();
        let agent = &self.agents[n];
        if !agent.alive || agent.conn.as_ref().is_none_or(|c| c.id != packet.conn) {
            return;
        }
        let msg = match packet.msg {
            Msg::Closed => return self.lose_connection(n),
            Msg::Down(msg) => msg,
            Msg::Up(_) => unreachable!("an agent-bound packet carries a coordinator message"),
        };
        match msg {
            Down::Welcome => {
                let agent = &mut self.agents[n];
                if let Some(conn) = agent.conn.as_mut() {
                    conn.welcomed = true;
                }
                agent.failures = 0;
                agent.next_heartbeat = now + HEARTBEAT_MS;
                let unacked: Vec<(Key, Outcome)> = agent
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.finished && !j.result_acked)
                    .map(|(k, j)| (*k, j.outcome))
                    .collect();
                for (key, outcome) in unacked {
                    self.send_up(n, Up::Finished { key, outcome });
                }
            }
            Down::Dispatch { key, timeout_ms } => {
                let agent = &self.agents[n];
                let busy = agent.jobs.values().filter(|j| !j.finished).count();
                if agent.jobs.contains_key(&key) {
                    self.send_up(n, Up::Accepted(key));
                } else if busy >= agent.slots as usize {
                    self.send_up(n, Up::Rejected(key));
                } else {
                    let job = self.start_job(timeout_ms);
                    self.agents[n].jobs.insert(key, job);
                    self.send_up(n, Up::Accepted(key));
                }
            }
            Down::Cancel(key) => {
                let grace = range(&mut self.rng, 0, 2_000);
                if let Some(job) = self.agents[n].jobs.get_mut(&key) {
                    if !job.finished && job.ends_at > now + grace {
                        job.ends_at = now + grace;
                        job.outcome = Outcome::Cancelled;
                    }
                }
            }
            Down::FinishedAck(key) => {
                if let Some(job) = self.agents[n].jobs.get_mut(&key) {
                    if job.finished && !job.result_acked {
                        job.result_acked = true;
                        let outcome = job.outcome;
                        self.result_acknowledged(key, outcome);
                    }
                }
            }
            Down::LogResume { key, next_seq } => {
                let conn = packet.conn;
                if let Some(job) = self.agents[n].jobs.get_mut(&key) {
                    if job.opening == Some(conn) {
                        job.opening = None;
                        job.acked = job.acked.max(next_seq);
                        job.stream = Some((conn, next_seq));
                        self.chunks_acknowledged(key, next_seq);
                    }
                }
            }
            Down::LogAck { key, next_seq } => {
                if let Some(job) = self.agents[n].jobs.get_mut(&key) {
                    job.acked = job.acked.max(next_seq);
                    self.chunks_acknowledged(key, next_seq);
                }
            }
            Down::LogRefused(key) => {
                if let Some(job) = self.agents[n].jobs.get_mut(&key) {
                    job.stream = None;
                    job.opening = None;
                }
            }
        }
    }

    fn start_job(&mut self, timeout_ms: u64) -> AgentJob {
        let now = self.now();
        let runs_for = range(&mut self.rng, 500, 40_000);
        let mut outcome = match self.rng.below(10) {
            0 => Outcome::Failed { exit_code: 1 },
            _ => Outcome::Succeeded,
        };
        let runs_for = if timeout_ms > 0 && runs_for > timeout_ms {
            outcome = Outcome::TimedOut;
            timeout_ms
        } else {
            runs_for
        };
        AgentJob {
            outcome,
            ends_at: now + runs_for,
            next_chunk_at: now + range(&mut self.rng, 100, 2_000),
            produced: 0,
            acked: 0,
            stream: None,
            opening: None,
            finished: false,
            result_acked: false,
        }
    }

    fn agent_step(&mut self, n: usize) {
        let now = self.now();
        if !self.agents[n].alive {
            if now >= self.agents[n].restarts_at {
                let agent = &mut self.agents[n];
                agent.alive = true;
                agent.failures = 0;
                agent.dial_at = now;
            }
            return;
        }
        // Dial.
        if self.agents[n].conn.is_none() && now >= self.agents[n].dial_at {
            if self.shell.up && !self.net.partitioned(n, now) {
                let conn = self.net.connect();
                self.agents[n].conn = Some(Conn {
                    id: conn,
                    welcomed: false,
                });
                let running = self.agents[n].held();
                self.send_up(n, Up::Hello { running });
            } else {
                let extra = if self.shell.up {
                    CONNECT_DEADLINE_MS
                } else {
                    0
                };
                let delay = self.backoff(n);
                self.agents[n].dial_at = now + delay + extra;
            }
        }
        // The idle timeout: a partition that outlasts it kills the connection here too.
        if let Some(conn) = self.agents[n].conn.as_ref().map(|c| c.id) {
            let cut_off = self
                .net
                .partitions
                .get(&n)
                .is_some_and(|(from, to)| now < *to && now >= from + IDLE_TIMEOUT_MS);
            if cut_off {
                self.net.close(conn);
                self.lose_connection(n);
            }
        }
        // Jobs: output, then the end.
        let mut ended = Vec::new();
        let keys: Vec<Key> = self.agents[n].jobs.keys().copied().collect();
        for key in &keys {
            let job = self.agents[n].jobs.get_mut(key).expect("listed");
            if job.finished {
                continue;
            }
            while job.next_chunk_at <= now.min(job.ends_at) {
                job.produced += 1;
                job.next_chunk_at += range(&mut self.rng, 100, 2_000);
            }
            if now >= job.ends_at {
                // The last words of the job ("job finished") are one more chunk.
                job.produced += 1;
                job.finished = true;
                ended.push((*key, job.outcome));
            }
        }
        let welcomed = self.agents[n].conn.as_ref().is_some_and(|c| c.welcomed);
        if !welcomed {
            return;
        }
        for (key, outcome) in ended {
            self.send_up(n, Up::Finished { key, outcome });
        }
        if now >= self.agents[n].next_heartbeat {
            self.agents[n].next_heartbeat = now + HEARTBEAT_MS;
            self.send_up(n, Up::Heartbeat);
        }
        // Log uploads: open a stream where none is, send what the spool has.
        let conn = self.agents[n].conn.as_ref().map_or(0, |c| c.id);
        let mut out = Vec::new();
        for (key, job) in &mut self.agents[n].jobs {
            if !job.log_pending() {
                continue;
            }
            match job.stream {
                Some((c, ref mut sent)) if c == conn => {
                    while *sent < job.produced {
                        out.push(Up::LogChunk {
                            key: *key,
                            seq: *sent,
                            data: chunk_data(*key, *sent),
                        });
                        *sent += 1;
                    }
                }
                _ if job.opening != Some(conn) => {
                    job.opening = Some(conn);
                    job.stream = None;
                    out.push(Up::LogOpen(*key));
                }
                _ => {}
            }
        }
        for msg in out {
            self.send_up(n, msg);
        }
        // A job whose result and whole log the coordinator holds is forgotten; the stored
        // log is then exactly what the job wrote, every chunk once.
        let done: Vec<(Key, u64)> = self.agents[n]
            .jobs
            .iter()
            .filter(|(_, j)| j.result_acked && !j.log_pending())
            .map(|(key, j)| (*key, j.produced))
            .collect();
        for (key, produced) in done {
            self.agents[n].jobs.remove(&key);
            let stored = self.shell.store.logs.get(&key).map_or(0, Vec::len) as u64;
            assert_eq!(
                stored, produced,
                "seed {}: agent {n} forgot {key:?} after writing {produced} chunks; {stored} are stored",
                self.seed
            );
        }
    }

    // ---- what was promised ----

    fn result_acknowledged(&mut self, key: Key, outcome: Outcome) {
        self.report.acked_results += 1;
        let Some(record) = self.shell.store.jobs.get(&key.0) else {
            panic!(
                "seed {}: result of {key:?} acknowledged but the job is not stored",
                self.seed
            );
        };
        if record.attempt != key.1 {
            return; // a stale attempt's result: acknowledged so the agent forgets it
        }
        let stored = self.shell.store.results.get(&key);
        assert_eq!(
            stored,
            Some(&outcome),
            "seed {}: result of {key:?} acknowledged but not stored",
            self.seed
        );
        // The commit that acknowledged the result also moved the job on: it cannot still
        // be held by this attempt.
        assert!(
            !matches!(record.state.agent(), Some((_, attempt)) if attempt == key.1),
            "seed {}: result of {key:?} acknowledged while the store still shows it held: {:?}",
            self.seed,
            record.state
        );
        if record.state.is_terminal() {
            self.oracle
                .acked_terminal
                .insert(key.0, record.state.clone());
        }
    }

    fn chunks_acknowledged(&mut self, key: Key, next_seq: u64) {
        let acked = self.oracle.acked_chunks.entry(key).or_default();
        if next_seq > *acked {
            self.report.acked_chunks += next_seq - *acked;
            *acked = next_seq;
        }
    }

    // ---- invariants ----

    fn check(&self) {
        let seed = self.seed;
        let store = &self.shell.store;
        // No acknowledged terminal state is lost or changed, whatever crashed.
        for (job, state) in &self.oracle.acked_terminal {
            let now = store.jobs.get(job).map(|j| &j.state);
            assert_eq!(
                now,
                Some(state),
                "seed {seed}: job {job} was acknowledged {state:?} and is now {now:?}"
            );
        }
        // No acknowledged log chunk is lost. (That each stored chunk is the one the agent
        // wrote at its place, once, is checked as it is stored: logs only grow.)
        for (key, acked) in &self.oracle.acked_chunks {
            let stored = store.logs.get(key).map_or(0, Vec::len) as u64;
            assert!(
                stored >= *acked,
                "seed {seed}: {key:?} acknowledged {acked} log chunks but {stored} are stored"
            );
        }
        // Only the agent an attempt was handed to runs it under a live lease.
        for (n, agent) in self.agents.iter().enumerate() {
            for key in agent.jobs.keys() {
                let handed = self.oracle.handed_to.get(key);
                assert_eq!(
                    handed,
                    Some(&agent.id),
                    "seed {seed}: agent {n} runs {key:?}, which was handed to {handed:?}"
                );
            }
        }
        if !self.shell.up {
            return;
        }
        // The scheduler and the store agree on every job the scheduler still holds, and
        // the scheduler offers work to exactly the agents with a live session, once the
        // batch is committed (the inbox is empty right after a step).
        if self.shell.inbox.is_empty() {
            for (n, agent) in self.agents.iter().enumerate() {
                let live = self.shell.sessions.contains_key(&n);
                let connected = self
                    .d
                    .scheduler
                    .agent_is_connected(&agent.id)
                    .unwrap_or(false);
                assert_eq!(
                    connected, live,
                    "seed {seed}: agent {n} has a live session: {live}; the scheduler thinks it is connected: {connected}"
                );
            }
            for (job, state) in self.d.job_refs() {
                let stored = store.jobs.get(&job).map(|j| &j.state);
                let same = stored.is_some_and(|s| same_state(s, state));
                assert!(
                    same,
                    "seed {seed}: {job} is {state:?} in the scheduler but {stored:?} in the store"
                );
            }
        }
    }

    fn settled(&self) -> bool {
        let store = &self.shell.store;
        self.shell.up
            && store.runs.values().all(|r| r.state.is_terminal())
            && store.jobs.values().all(|j| j.state.is_terminal())
            && self.agents.iter().all(|a| a.alive && a.jobs.is_empty())
    }

    fn unsettled(&self) -> String {
        let store = &self.shell.store;
        let runs: Vec<_> = store
            .runs
            .iter()
            .filter(|(_, r)| !r.state.is_terminal())
            .map(|(run, r)| format!("{run}: {:?}", r.state))
            .collect();
        let jobs: Vec<_> = store
            .jobs
            .iter()
            .filter(|(_, j)| !j.state.is_terminal())
            .map(|(job, j)| format!("{job}: {:?}", j.state))
            .collect();
        let agents: Vec<_> = self
            .agents
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.jobs.is_empty())
            .map(|(n, a)| format!("agent {n} holds {:?}", a.jobs.keys().collect::<Vec<_>>()))
            .collect();
        format!("runs {runs:?}; jobs {jobs:?}; {agents:?}")
    }

    /// After settling: the scheduler forgot every run (all ended and were persisted) and
    /// has nothing left to wake up for.
    fn final_checks(&self) {
        let seed = self.seed;
        assert_eq!(
            self.d.scheduler.runs().count(),
            0,
            "seed {seed}: finished runs are all forgotten"
        );
        assert_eq!(self.d.scheduler.next_deadline(), None, "seed {seed}");
    }
}

/// Whether a stored job state is the scheduler's, leaving out lease renewals and the
/// extensions a restore grants (which the scheduler does not report, by design).
fn same_state(stored: &JobState, live: &JobState) -> bool {
    fn without_deadlines(state: &JobState) -> JobState {
        let mut state = state.clone();
        match &mut state {
            JobState::Running {
                lease_expires_at, ..
            } => *lease_expires_at = UnixMillis(0),
            JobState::Offered {
                offer_expires_at, ..
            } => *offer_expires_at = UnixMillis(0),
            _ => {}
        }
        state
    }
    without_deadlines(stored) == without_deadlines(live)
}
