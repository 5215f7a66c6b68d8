//! Ad-hoc fleet commands (`gantry exec`): one command on every matching connected host,
//! now, with the output streamed back to the admin as it comes.
//!
//! Owns the commands in flight: each has an id, the admin's stream waits on a channel
//! that the hosts' sessions feed ([`Execs::output`], [`Execs::done`]), and every host
//! ends by a deadline (its timeout plus a grace for the answer to travel), so the
//! stream always ends with one `Done` per target. Nothing here is stored: an exec is as
//! durable as the admin's connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use gantry_protocol::{AgentId, CoordinatorMessage, ExecCommand, ExecEvent, ExecHost, ExecRequest};
use gantry_transport::{FrameWriter, TransportError};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest command text.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest timeout an exec may ask for.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3_600_000;
/// Time after a host's timeout for its answer to arrive before it counts as lost.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum HostEvent {
    Output(Vec<u8>),
    /// The agent's `ExecDone` result as the protocol carries it: the exit code, or why
    /// the command could not run, in the agent's words. The coordinator only relays it.
    Done(Result<i32, String>),
}

/// One exec in flight: where its hosts' answers go, and which hosts it targets.
#[derive(Debug)]
struct Live {
    tx: mpsc::UnboundedSender<(AgentId, HostEvent)>,
    targets: HashSet<AgentId>,
}

/// The execs in flight, by id.
#[derive(Debug, Default)]
pub struct Execs {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

impl Execs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether exec `id` is in flight with `agent` among its hosts: the work an
    /// `ExecOutput` or `ExecDone` from that agent names.
    pub fn targets(&self, id: u64, agent: &AgentId) -> bool {
        self.lock()
            .get(&id)
            .is_some_and(|l| l.targets.contains(agent))
    }

    /// Output a host sent for exec `id`.
    pub fn output(&self, id: u64, agent: &AgentId, data: Vec<u8>) {
        if let Some(live) = self.lock().get(&id) {
            let _ = live.tx.send((agent.clone(), HostEvent::Output(data)));
        }
    }

    /// A host's command ended (`result` is the protocol's, relayed as it came).
    pub fn done(&self, id: u64, agent: &AgentId, result: Result<i32, String>) {
        if let Some(live) = self.lock().get(&id) {
            let _ = live.tx.send((agent.clone(), HostEvent::Done(result)));
        }
    }

    /// A host's session ended: every exec it runs ends for it (the command may still
    /// run there; its answer can no longer arrive).
    pub fn host_gone(&self, agent: &AgentId, reason: &str) {
        for live in self.lock().values() {
            let _ = live
                .tx
                .send((agent.clone(), HostEvent::Done(Err(reason.to_owned()))));
        }
    }
}

/// Removes an exec from the registry when its stream ends, however it ends.
struct Registered<'a> {
    execs: &'a Execs,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.execs.lock().remove(&self.id);
    }
}

/// Why a request is refused before anything runs; `None` if it is fine.
pub fn request_problem(request: &ExecRequest) -> Option<String> {
    if request.command.trim().is_empty() {
        return Some("the command is empty; give it after `--`, e.g. `gantry exec --select role=web -- uptime`".into());
    }
    if request.command.len() > MAX_COMMAND_BYTES {
        return Some(format!(
            "the command has {} bytes; at most {MAX_COMMAND_BYTES} (copy a script to the hosts and run that)",
            request.command.len()
        ));
    }
    if request.timeout_ms == 0 || request.timeout_ms > MAX_TIMEOUT_MS {
        return Some(format!(
            "timeout must be between 1 ms and {} h",
            MAX_TIMEOUT_MS / 3_600_000
        ));
    }
    None
}

/// Runs `request` on `targets`, at most `request.parallel` at once (0: all), writing
/// [`ExecEvent`]s to the admin's stream until every target is done.
pub async fn run(
    execs: &Execs,
    request: &ExecRequest,
    targets: Vec<ExecHost>,
    send: impl Fn(&AgentId, CoordinatorMessage) -> bool,
    writer: &mut FrameWriter,
) -> Result<(), TransportError> {
    if let Some(message) = request_problem(request) {
        return writer.send(&ExecEvent::Refused { message }).await;
    }
    if targets.is_empty() {
        let select: Vec<String> = request
            .select
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let message = format!(
            "no connected host matches {}; `gantry agents list` shows the hosts and their labels",
            if select.is_empty() {
                "(every host)".to_owned()
            } else {
                select.join(",")
            }
        );
        return writer.send(&ExecEvent::Refused { message }).await;
    }
    let id = execs.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hosts = targets.iter().map(|t| t.agent.clone()).collect();
    execs.lock().insert(id, Live { tx, targets: hosts });
    let _registered = Registered { execs, id };
    writer.send(&ExecEvent::Targets(targets.clone())).await?;

    let parallel = match request.parallel {
        0 => targets.len(),
        n => n as usize,
    };
    let limit = Duration::from_millis(request.timeout_ms) + ANSWER_GRACE;
    let mut waiting: VecDeque<AgentId> = targets.into_iter().map(|t| t.agent).collect();
    // Running hosts: when each started.
    let mut running: HashMap<AgentId, Instant> = HashMap::new();
    loop {
        while running.len() < parallel {
            let Some(agent) = waiting.pop_front() else {
                break;
            };
            let command = CoordinatorMessage::Exec(ExecCommand {
                id,
                command: request.command.clone(),
                timeout_ms: request.timeout_ms,
            });
            if send(&agent, command) {
                running.insert(agent, Instant::now());
            } else {
                let result = Err("not connected".into());
                writer
                    .send(&ExecEvent::Done {
                        agent,
                        result,
                        millis: 0,
                    })
                    .await?;
            }
        }
        if running.is_empty() && waiting.is_empty() {
            return Ok(());
        }
        let Some(deadline) = running.values().map(|at| *at + limit).min() else {
            continue;
        };
        tokio::select! {
            event = rx.recv() => {
                let Some((agent, event)) = event else { return Ok(()) };
                match event {
                    HostEvent::Output(data) => {
                        if running.contains_key(&agent) {
                            writer.send(&ExecEvent::Output { agent, data }).await?;
                        }
                    }
                    HostEvent::Done(result) => {
                        if let Some(started) = running.remove(&agent) {
                            let millis = started.elapsed().as_millis() as u64;
                            writer.send(&ExecEvent::Done { agent, result, millis }).await?;
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                let late: Vec<AgentId> = running
                    .iter()
                    .filter(|(_, at)| **at + limit <= now)
                    .map(|(a, _)| a.clone())
                    .collect();
                for agent in late {
                    running.remove(&agent);
                    let result = Err(format!(
                        "no answer within {} s (the timeout plus {} s)",
                        request.timeout_ms / 1000,
                        ANSWER_GRACE.as_secs()
                    ));
                    let millis = limit.as_millis() as u64;
                    writer.send(&ExecEvent::Done { agent, result, millis }).await?;
                }
            }
        }
    }
}
