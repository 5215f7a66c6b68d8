//! The status reporter: a sans-IO machine that decides which commit status to send
//! when, retries what failed, and forgets what no longer matters. The coordinator's
//! shell feeds it [`Event`]s with the current time and carries out its [`Command`]s
//! (an HTTP request, a timer); it never reads a clock, draws randomness of its own or
//! touches a socket.
//!
//! # Semantics
//!
//! - **Key.** A status is identified by (repository, commit, context). Per key, at most
//!   one request is in flight, so the forge receives a key's states in the order they
//!   changed.
//! - **Coalescing.** Only the newest state per key waits to be sent. A state that
//!   changes while an older one waits replaces it; one that changes while an older one
//!   is in flight waits for that answer, and is sent next whatever the answer. A failed
//!   attempt with a newer state waiting is not retried: the newer one goes instead
//!   (after the failed one's backoff). All three count as `superseded`.
//! - **Answers.** 2xx: delivered. 408, 425, 429, 5xx, a transport error, a rate limit
//!   ([`SendResult::RateLimited`], waiting at least as long as the forge asks), or no
//!   answer within [`ReporterConfig::send_deadline_ms`]: retried with exponential backoff and
//!   jitter (base × 3^(n−1), capped, "equal jitter": half fixed, half drawn from a
//!   generator seeded with [`ReporterConfig::jitter_seed`]), at most
//!   [`ReporterConfig::max_attempts`] attempts, then given up and recorded. Any other
//!   status (401, 403, 404, 422, other 4xx, a redirect) is permanent: recorded, never
//!   sent again. With the defaults the waits are 2.5–5, 7.5–15, 22.5–45, 67.5–135 and
//!   150–300 s: a forge that is down for up to ~4 minutes still gets every final state.
//! - **Bounds.** At most [`ReporterConfig::max_queued`] states wait (4,096 by
//!   default) and at most [`ReporterConfig::max_queued_per_repo`] (1,024) per
//!   repository, so one repository whose forge is down cannot crowd out the others.
//!   When a bound is reached, the waiting state changed least recently is dropped,
//!   counted and recorded. At most [`ReporterConfig::max_in_flight`] requests (8) are
//!   out at once. The last [`ReporterConfig::failures_kept`] failures (20) per
//!   repository are kept for `gantry repos show`, for at most [`MAX_REPOS_RECORDED`]
//!   repositories.
//! - **Timers.** Every call returns, last, at most one [`Command::Wake`]: the time of
//!   the earliest deadline (a retry's, or an in-flight request's). The shell replaces
//!   its timer with it, or clears the timer when there is none, and sends
//!   [`Event::Tick`] when it fires. Nothing waits without a deadline: while anything is
//!   queued or in flight, a `Wake` is returned, always later than `now`.
//!
//! Invariants (property-tested in `tests/reporter_properties.rs`): the newest state of
//! a key is eventually delivered when sends succeed, and is the last one delivered for
//! it; nothing is sent again after a permanent failure of it; the queue never exceeds
//! its bounds; nothing waits without a deadline.
//!
//! GitLab refuses to set a state a status already has ("Cannot transition status via
//! :run from :running", 400): the coordinator should report each transition once, and
//! a retry of a request that reached GitLab but whose answer was lost ends as a
//! recorded 400 for a status that is in fact set.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use gantry_protocol::UnixMillis;
use serde::Serialize;

use crate::status::{
    status_request, GantryState, HttpRequest, StatusError, StatusTarget, StatusUpdate,
};
use crate::types::CommitId;

/// Repositories whose failures are remembered; past it, the one whose newest failure
/// is oldest is forgotten. Registered repositories are far fewer.
pub const MAX_REPOS_RECORDED: usize = 4096;

/// How the reporter retries and what it bounds. Every field says when to change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReporterConfig {
    /// The first retry waits between half of this and this; each next one three times
    /// longer. Lower it on a forge in the same room.
    pub retry_base_ms: u64,
    /// No retry waits longer than this.
    pub retry_cap_ms: u64,
    /// Attempts per state, the first included (at least 1).
    pub max_attempts: u32,
    /// A request without an answer after this is counted as failed and retried; the
    /// shell's own HTTP timeout should be shorter. Raise it only for forges slower than
    /// this to answer.
    pub send_deadline_ms: u64,
    /// Requests out at once (at least 1). This bounds concurrency, not rate: forges
    /// limit writes per token (GitHub's secondary limits: about 80 a minute and 500 an
    /// hour), which coalescing and [`SendResult::RateLimited`] deal with.
    pub max_in_flight: usize,
    /// States waiting to be sent, in all (at least 1).
    pub max_queued: usize,
    /// States waiting to be sent for one repository (at least 1).
    pub max_queued_per_repo: usize,
    /// Failures remembered per repository.
    pub failures_kept: usize,
    /// Seeds the jitter of retry waits. The shell passes a random value at start; tests
    /// a fixed one.
    pub jitter_seed: u64,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        Self {
            retry_base_ms: 5_000,
            retry_cap_ms: 300_000,
            max_attempts: 6,
            send_deadline_ms: 60_000,
            max_in_flight: 8,
            max_queued: 4096,
            max_queued_per_repo: 1024,
            failures_kept: 20,
            jitter_seed: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

/// One attempt to send a status. A retry is a new attempt with a new id, so a late
/// answer to a written-off attempt is recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RequestId(pub u64);

/// A status to report, with the request that reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The registered repository's name in Gantry.
    pub repo: String,
    pub update: StatusUpdate,
    pub request: HttpRequest,
}

impl StatusChange {
    /// Builds the request for `update` on `target`.
    pub fn new(
        repo: &str,
        target: &StatusTarget,
        update: StatusUpdate,
    ) -> Result<Self, StatusError> {
        let request = status_request(target, &update)?;
        Ok(Self {
            repo: repo.to_owned(),
            update,
            request,
        })
    }
}

// Events are moved once into `handle`; boxing the large variant would only add an
// allocation per state change.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A run's or job's state changed; report it.
    StateChanged(StatusChange),
    /// What became of a [`Command::Send`].
    Sent { id: RequestId, result: SendResult },
    /// The last [`Command::Wake`]'s time came.
    Tick,
    /// The repository was removed: forget its queue and failures.
    RepositoryRemoved { repo: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// The forge answered with this status.
    Status(u16),
    /// No answer: connection refused or reset, TLS failure, timeout; the text says which.
    Transport(String),
    /// The forge said the token is over its rate limit: GitHub answers 403 or 429 with
    /// `X-RateLimit-Remaining: 0` or `Retry-After`, GitLab 429. Only a shell that reads
    /// the answer's headers can tell a rate limit from a refusal; it reports it so,
    /// with `Retry-After` in milliseconds when given. Retried like a server error, not
    /// before `retry_after_ms` (at most [`MAX_RETRY_AFTER_MS`]).
    RateLimited { retry_after_ms: Option<u64> },
}

/// The longest `Retry-After` honoured: a forge asking for more is retried after this.
pub const MAX_RETRY_AFTER_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Carry out `request`, then report [`Event::Sent`] with `id`.
    Send {
        id: RequestId,
        repo: String,
        request: HttpRequest,
    },
    /// Send [`Event::Tick`] at this time (replaces any earlier timer).
    Wake { at: UnixMillis },
}

/// A status that did not reach the forge, for `gantry repos show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureRecord {
    pub at: UnixMillis,
    pub commit: CommitId,
    pub context: String,
    pub state: GantryState,
    /// Attempts made.
    pub attempts: u32,
    pub reason: FailureReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum FailureReason {
    /// The forge refused it; not retried.
    Refused { status: u16 },
    /// Every attempt failed; the last error.
    GaveUp { last_error: String },
    /// The queue was full; this state changed least recently.
    Dropped { bound: usize },
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused { status } => {
                let hint = match status {
                    401 => "the forge refused the token: set a valid one on the repository",
                    403 => "the token may not set commit statuses: give it that right (GitHub: commit statuses write; Gitea: write:repository; GitLab: api); on GitHub a 403 can also be a rate limit",
                    404 => "the forge does not know the repository or commit, or the token cannot see them: check the repository's URL and token",
                    422 => "the forge refused the status: the commit is unknown to it, or the commit has too many statuses for this context",
                    300..=399 => "the API answered with a redirect: set the repository's API base to where it points",
                    _ => "the forge refused the request",
                };
                write!(f, "refused with HTTP {status}: {hint}")
            }
            Self::GaveUp { last_error } => {
                write!(f, "gave up after every attempt failed; last: {last_error}")
            }
            Self::Dropped { bound } => write!(
                f,
                "dropped: {bound} statuses were already waiting (is the forge unreachable?)"
            ),
        }
    }
}

/// Counts for `/metrics`, each since the reporter started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// States handed in.
    pub changes: u64,
    /// Requests sent (first attempts and retries).
    pub attempts: u64,
    pub delivered: u64,
    /// Failed attempts that will be tried again.
    pub retries: u64,
    /// Permanent failures.
    pub refused: u64,
    pub gave_up: u64,
    /// States replaced by a newer one of the same commit and context before reaching the forge.
    pub superseded: u64,
    /// States dropped because the queue was full.
    pub dropped: u64,
    /// Attempts that had no answer by their deadline.
    pub timed_out: u64,
    /// Attempts the forge answered with its rate limit.
    pub rate_limited: u64,
    /// Answers for attempts already written off.
    pub stale_answers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    repo: String,
    commit: CommitId,
    context: String,
}

#[derive(Debug)]
struct Pending {
    change: StatusChange,
    /// Failed attempts so far.
    attempts: u32,
    not_before: UnixMillis,
    /// When the state last changed, in arrival order: what a full queue drops first.
    order: u64,
}

#[derive(Debug)]
struct InFlight {
    id: RequestId,
    change: StatusChange,
    /// Attempts including this one.
    attempts: u32,
    deadline: UnixMillis,
    order: u64,
}

#[derive(Debug, Default)]
struct Slot {
    pending: Option<Pending>,
    in_flight: Option<InFlight>,
}

/// The machine; see the module documentation.
#[derive(Debug)]
pub struct Reporter {
    config: ReporterConfig,
    slots: BTreeMap<Key, Slot>,
    by_id: HashMap<RequestId, Key>,
    queued: usize,
    queued_per_repo: HashMap<String, usize>,
    failures: HashMap<String, VecDeque<FailureRecord>>,
    counters: Counters,
    next_id: u64,
    next_order: u64,
    rng: u64,
}

impl Reporter {
    /// Counts in `config` below 1 are raised to 1.
    pub fn new(mut config: ReporterConfig) -> Self {
        config.max_attempts = config.max_attempts.max(1);
        config.max_in_flight = config.max_in_flight.max(1);
        config.max_queued = config.max_queued.max(1);
        config.max_queued_per_repo = config.max_queued_per_repo.max(1);
        config.send_deadline_ms = config.send_deadline_ms.max(1);
        let rng = config.jitter_seed | 1;
        Self {
            config,
            slots: BTreeMap::new(),
            by_id: HashMap::new(),
            queued: 0,
            queued_per_repo: HashMap::new(),
            failures: HashMap::new(),
            counters: Counters::default(),
            next_id: 1,
            next_order: 0,
            rng,
        }
    }

    pub fn handle(&mut self, now: UnixMillis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        self.expire(now);
        match event {
            Event::StateChanged(change) => self.state_changed(now, change),
            Event::Sent { id, result } => self.sent(now, id, result),
            Event::Tick => {}
            Event::RepositoryRemoved { repo } => self.remove_repository(&repo),
        }
        self.dispatch(now, &mut out);
        if let Some(at) = self.next_deadline(now) {
            out.push(Command::Wake { at });
        }
        out
    }

    /// The repository's recorded failures, oldest first.
    pub fn failures(&self, repo: &str) -> impl Iterator<Item = &FailureRecord> {
        self.failures.get(repo).into_iter().flatten()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// States waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// States waiting to be sent for one repository.
    pub fn queued_for(&self, repo: &str) -> usize {
        self.queued_per_repo.get(repo).copied().unwrap_or(0)
    }

    /// Requests out.
    pub fn in_flight(&self) -> usize {
        self.by_id.len()
    }

    pub fn config(&self) -> &ReporterConfig {
        &self.config
    }

    fn state_changed(&mut self, now: UnixMillis, change: StatusChange) {
        self.counters.changes += 1;
        let key = Key {
            repo: change.repo.clone(),
            commit: change.update.commit.clone(),
            context: change.update.context.clone(),
        };
        let waiting = self.slots.get(&key).is_some_and(|s| s.pending.is_some());
        if !waiting {
            self.make_room(now, &key.repo);
            self.count_queued(&key.repo, 1);
        }
        let order = self.next_order;
        self.next_order += 1;
        let slot = self.slots.entry(key).or_default();
        let not_before = match slot.pending.take() {
            Some(previous) => {
                self.counters.superseded += 1;
                previous.not_before.max(now)
            }
            None => now,
        };
        slot.pending = Some(Pending {
            change,
            attempts: 0,
            not_before,
            order,
        });
    }

    fn sent(&mut self, now: UnixMillis, id: RequestId, result: SendResult) {
        let Some(key) = self.by_id.remove(&id) else {
            self.counters.stale_answers += 1;
            return;
        };
        let Some(flight) = self.slots.get_mut(&key).and_then(|s| s.in_flight.take()) else {
            self.counters.stale_answers += 1;
            return;
        };
        match result {
            SendResult::Status(200..=299) => self.counters.delivered += 1,
            SendResult::Status(status @ (408 | 425 | 429 | 500..=599)) => {
                self.retry_or_give_up(now, &key, flight, format!("HTTP {status}"), 0);
            }
            SendResult::Status(status) => {
                self.counters.refused += 1;
                self.record(
                    now,
                    &flight.change,
                    flight.attempts,
                    FailureReason::Refused { status },
                );
            }
            SendResult::Transport(error) => {
                let error: String = error.chars().take(512).collect();
                self.retry_or_give_up(now, &key, flight, error, 0);
            }
            SendResult::RateLimited { retry_after_ms } => {
                self.counters.rate_limited += 1;
                let wait = retry_after_ms.unwrap_or(0).min(MAX_RETRY_AFTER_MS);
                self.retry_or_give_up(now, &key, flight, "rate limited by the forge".into(), wait);
            }
        }
        self.drop_if_empty(&key);
    }

    /// After a failed attempt: give up when attempts are used up; let a newer waiting
    /// state go instead; or wait (the backoff, and at least `min_wait_ms`) and try again.
    fn retry_or_give_up(
        &mut self,
        now: UnixMillis,
        key: &Key,
        flight: InFlight,
        error: String,
        min_wait_ms: u64,
    ) {
        if flight.attempts >= self.config.max_attempts {
            self.counters.gave_up += 1;
            self.record(
                now,
                &flight.change,
                flight.attempts,
                FailureReason::GaveUp { last_error: error },
            );
            return;
        }
        let not_before = now.plus_millis(self.backoff_ms(flight.attempts).max(min_wait_ms));
        if let Some(newer) = self.slots.get_mut(key).and_then(|s| s.pending.as_mut()) {
            self.counters.superseded += 1;
            newer.not_before = newer.not_before.max(not_before);
            return;
        }
        self.counters.retries += 1;
        self.make_room(now, &key.repo);
        self.count_queued(&key.repo, 1);
        self.slots.entry(key.clone()).or_default().pending = Some(Pending {
            change: flight.change,
            attempts: flight.attempts,
            not_before,
            order: flight.order,
        });
    }

    /// Writes off in-flight requests whose deadline passed.
    fn expire(&mut self, now: UnixMillis) {
        let expired: Vec<Key> = self
            .slots
            .iter()
            .filter(|(_, s)| s.in_flight.as_ref().is_some_and(|f| f.deadline <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            let Some(flight) = self.slots.get_mut(&key).and_then(|s| s.in_flight.take()) else {
                continue;
            };
            self.by_id.remove(&flight.id);
            self.counters.timed_out += 1;
            let error = format!("no answer within {} ms", self.config.send_deadline_ms);
            self.retry_or_give_up(now, &key, flight, error, 0);
            self.drop_if_empty(&key);
        }
    }

    fn dispatch(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        let room = self.config.max_in_flight.saturating_sub(self.by_id.len());
        if room == 0 {
            return;
        }
        let mut ready: Vec<(UnixMillis, u64, Key)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.in_flight.is_none())
            .filter_map(|(k, s)| s.pending.as_ref().map(|p| (p, k)))
            .filter(|(p, _)| p.not_before <= now)
            .map(|(p, k)| (p.not_before, p.order, k.clone()))
            .collect();
        ready.sort();
        for (_, _, key) in ready.into_iter().take(room) {
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            let Some(pending) = slot.pending.take() else {
                continue;
            };
            let id = RequestId(self.next_id);
            self.next_id += 1;
            self.counters.attempts += 1;
            out.push(Command::Send {
                id,
                repo: key.repo.clone(),
                request: pending.change.request.clone(),
            });
            slot.in_flight = Some(InFlight {
                id,
                change: pending.change,
                attempts: pending.attempts + 1,
                deadline: now.plus_millis(self.config.send_deadline_ms),
                order: pending.order,
            });
            self.by_id.insert(id, key.clone());
            self.count_queued(&key.repo, -1);
        }
    }

    /// The earliest time something waits for, if anything does. A waiting state that is
    /// due but held back by `max_in_flight` waits for an in-flight request, whose
    /// deadline is counted instead.
    fn next_deadline(&self, now: UnixMillis) -> Option<UnixMillis> {
        self.slots
            .values()
            .filter_map(|s| match (&s.in_flight, &s.pending) {
                (Some(f), _) => Some(f.deadline),
                (None, Some(p)) if p.not_before > now => Some(p.not_before),
                (None, _) => None,
            })
            .min()
    }

    /// Drops the least recently changed waiting states until one more fits, for
    /// `repo` and in all.
    fn make_room(&mut self, now: UnixMillis, repo: &str) {
        while self.queued_for(repo) >= self.config.max_queued_per_repo {
            if !self.drop_oldest(now, Some(repo), self.config.max_queued_per_repo) {
                break;
            }
        }
        while self.queued >= self.config.max_queued {
            if !self.drop_oldest(now, None, self.config.max_queued) {
                break;
            }
        }
    }

    fn drop_oldest(&mut self, now: UnixMillis, repo: Option<&str>, bound: usize) -> bool {
        let oldest = self
            .slots
            .iter()
            .filter(|(k, _)| repo.is_none_or(|r| k.repo == r))
            .filter_map(|(k, s)| s.pending.as_ref().map(|p| (p.order, k)))
            .min()
            .map(|(_, k)| k.clone());
        let Some(key) = oldest else {
            return false;
        };
        let Some(pending) = self.slots.get_mut(&key).and_then(|s| s.pending.take()) else {
            return false;
        };
        self.count_queued(&key.repo, -1);
        self.counters.dropped += 1;
        self.record(
            now,
            &pending.change,
            pending.attempts,
            FailureReason::Dropped { bound },
        );
        self.drop_if_empty(&key);
        true
    }

    fn remove_repository(&mut self, repo: &str) {
        let keys: Vec<Key> = self
            .slots
            .keys()
            .filter(|k| k.repo == repo)
            .cloned()
            .collect();
        for key in keys {
            if let Some(slot) = self.slots.remove(&key) {
                if let Some(flight) = slot.in_flight {
                    self.by_id.remove(&flight.id);
                }
                if slot.pending.is_some() {
                    self.queued -= 1;
                }
            }
        }
        self.queued_per_repo.remove(repo);
        self.failures.remove(repo);
    }

    fn count_queued(&mut self, repo: &str, delta: isize) {
        self.queued = self.queued.saturating_add_signed(delta);
        let n = self.queued_per_repo.entry(repo.to_owned()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.queued_per_repo.remove(repo);
        }
    }

    fn drop_if_empty(&mut self, key: &Key) {
        if self
            .slots
            .get(key)
            .is_some_and(|s| s.pending.is_none() && s.in_flight.is_none())
        {
            self.slots.remove(key);
        }
    }

    fn record(
        &mut self,
        now: UnixMillis,
        change: &StatusChange,
        attempts: u32,
        reason: FailureReason,
    ) {
        if !self.failures.contains_key(&change.repo) && self.failures.len() >= MAX_REPOS_RECORDED {
            let stalest = self
                .failures
                .iter()
                .map(|(repo, records)| (records.back().map(|r| r.at), repo))
                .min()
                .map(|(_, repo)| repo.clone());
            if let Some(repo) = stalest {
                self.failures.remove(&repo);
            }
        }
        let records = self.failures.entry(change.repo.clone()).or_default();
        records.push_back(FailureRecord {
            at: now,
            commit: change.update.commit.clone(),
            context: change.update.context.clone(),
            state: change.update.state,
            attempts,
            reason,
        });
        while records.len() > self.config.failures_kept {
            records.pop_front();
        }
        if records.is_empty() {
            self.failures.remove(&change.repo);
        }
    }

    /// The wait after `failed` attempts: base × 3^(failed−1), capped, with equal jitter.
    fn backoff_ms(&mut self, failed: u32) -> u64 {
        let factor = 3u64.saturating_pow(failed.saturating_sub(1));
        let full = self
            .config
            .retry_base_ms
            .saturating_mul(factor)
            .min(self.config.retry_cap_ms)
            .max(1);
        let half = full / 2;
        half + self.next_random() % (full - half + 1)
    }

    /// xorshift64*: enough to spread retries; not for secrets.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::run_context;
    use crate::Forge;

    fn change(repo: &str, commit: char, state: GantryState) -> StatusChange {
        let target =
            StatusTarget::new(Forge::Github, "https://api.github.com", "o/r", "t").expect("target");
        let update = StatusUpdate {
            commit: CommitId::parse(&commit.to_string().repeat(40)).expect("sha"),
            context: run_context("ci"),
            state,
            description: String::new(),
            target_url: None,
            git_ref: None,
        };
        StatusChange::new(repo, &target, update).expect("change")
    }

    fn sends(commands: &[Command]) -> Vec<RequestId> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Send { id, .. } => Some(*id),
                Command::Wake { .. } => None,
            })
            .collect()
    }

    fn wake(commands: &[Command]) -> Option<UnixMillis> {
        commands.iter().find_map(|c| match c {
            Command::Wake { at } => Some(*at),
            Command::Send { .. } => None,
        })
    }

    /// Hands in one state at `t(0)` and answers its request at `t(1)` with `result`.
    fn answer_first(r: &mut Reporter, result: SendResult) -> Vec<Command> {
        let out = r.handle(
            t(0),
            Event::StateChanged(change("a", 'a', GantryState::Queued)),
        );
        let id = sends(&out)[0];
        r.handle(t(1), Event::Sent { id, result })
    }

    fn t(ms: u64) -> UnixMillis {
        UnixMillis(1_000_000 + ms)
    }

    #[test]
    fn a_state_is_sent_at_once_and_delivered() {
        let mut r = Reporter::new(ReporterConfig::default());
        let out = r.handle(
            t(0),
            Event::StateChanged(change("a", 'a', GantryState::Running)),
        );
        let ids = sends(&out);
        assert_eq!(ids.len(), 1);
        assert_eq!(wake(&out), Some(t(60_000)), "the in-flight deadline");
        let out = r.handle(
            t(5),
            Event::Sent {
                id: ids[0],
                result: SendResult::Status(201),
            },
        );
        assert!(out.is_empty(), "nothing left, no timer: {out:?}");
        assert_eq!(r.counters().delivered, 1);
    }

    #[test]
    fn server_errors_are_retried_with_growing_jittered_waits_then_given_up() {
        let mut r = Reporter::new(ReporterConfig::default());
        let mut out = r.handle(
            t(0),
            Event::StateChanged(change("a", 'a', GantryState::Failed)),
        );
        let mut now = t(0);
        let mut waits = Vec::new();
        for _ in 0..6 {
            let id = sends(&out)[0];
            out = r.handle(
                now,
                Event::Sent {
                    id,
                    result: SendResult::Status(503),
                },
            );
            let Some(at) = wake(&out) else { break };
            waits.push(at.0 - now.0);
            now = at;
            out = r.handle(now, Event::Tick);
        }
        assert_eq!(waits.len(), 5, "{waits:?}");
        let bounds = [
            (2_500, 5_000),
            (7_500, 15_000),
            (22_500, 45_000),
            (67_500, 135_000),
            (150_000, 300_000),
        ];
        for (wait, (lo, hi)) in waits.iter().zip(bounds) {
            assert!((lo..=hi).contains(wait), "{wait} not in {lo}..={hi}");
        }
        assert_eq!(r.counters().gave_up, 1);
        let failure = r.failures("a").last().expect("recorded");
        assert_eq!(failure.attempts, 6);
        assert!(
            failure.reason.to_string().contains("HTTP 503"),
            "{}",
            failure.reason
        );
        assert_eq!(r.queued() + r.in_flight(), 0);
    }

    #[test]
    fn rate_limits_wait_at_least_as_long_as_the_forge_asks() {
        let mut r = Reporter::new(ReporterConfig::default());
        let out = answer_first(
            &mut r,
            SendResult::RateLimited {
                retry_after_ms: Some(600_000),
            },
        );
        assert_eq!(wake(&out), Some(t(600_001)));
        assert_eq!(r.counters().rate_limited, 1);
        assert_eq!(sends(&r.handle(t(600_001), Event::Tick)).len(), 1);
    }

    #[test]
    fn permanent_refusals_are_recorded_and_not_retried() {
        let mut r = Reporter::new(ReporterConfig::default());
        let out = answer_first(&mut r, SendResult::Status(401));
        assert!(out.is_empty(), "{out:?}");
        let failure = r.failures("a").last().expect("recorded");
        assert!(
            failure.reason.to_string().contains("token"),
            "{}",
            failure.reason
        );
        assert!(r.handle(t(10_000_000), Event::Tick).is_empty());
    }

    #[test]
    fn a_newer_state_replaces_a_waiting_one_and_follows_an_in_flight_one() {
        let mut r = Reporter::new(ReporterConfig::default());
        let out = r.handle(
            t(0),
            Event::StateChanged(change("a", 'a', GantryState::Queued)),
        );
        let first = sends(&out)[0];
        // Two changes while the first is out: only the newest waits.
        assert!(sends(&r.handle(
            t(1),
            Event::StateChanged(change("a", 'a', GantryState::Running))
        ))
        .is_empty());
        assert!(sends(&r.handle(
            t(2),
            Event::StateChanged(change("a", 'a', GantryState::Succeeded))
        ))
        .is_empty());
        assert_eq!(r.queued(), 1);
        assert_eq!(r.counters().superseded, 1);
        let out = r.handle(
            t(3),
            Event::Sent {
                id: first,
                result: SendResult::Status(500),
            },
        );
        let next = sends(&out);
        assert!(
            next.is_empty(),
            "the newer one waits for the failed one's backoff"
        );
        let at = wake(&out).expect("timer");
        let out = r.handle(at, Event::Tick);
        let Some(Command::Send { request, .. }) = out.first() else {
            panic!("expected a send: {out:?}")
        };
        assert!(String::from_utf8_lossy(&request.body).contains("\"success\""));
    }

    #[test]
    fn requests_without_an_answer_are_written_off_at_their_deadline() {
        let mut r = Reporter::new(ReporterConfig::default());
        let out = r.handle(
            t(0),
            Event::StateChanged(change("a", 'a', GantryState::Queued)),
        );
        let lost = sends(&out)[0];
        let out = r.handle(t(60_000), Event::Tick);
        assert_eq!(r.counters().timed_out, 1);
        assert!(sends(&out).is_empty());
        let at = wake(&out).expect("retry timer");
        let out = r.handle(at, Event::Tick);
        assert_eq!(sends(&out).len(), 1, "retried");
        r.handle(
            at,
            Event::Sent {
                id: lost,
                result: SendResult::Status(200),
            },
        );
        assert_eq!(r.counters().stale_answers, 1, "the late answer is ignored");
    }

    #[test]
    fn a_full_queue_drops_the_least_recently_changed_state() {
        let config = ReporterConfig {
            max_in_flight: 1,
            max_queued: 2,
            ..ReporterConfig::default()
        };
        let mut r = Reporter::new(config);
        for (i, c) in ['a', 'b', 'c', 'd'].into_iter().enumerate() {
            r.handle(
                t(i as u64),
                Event::StateChanged(change("a", c, GantryState::Queued)),
            );
        }
        // 'a' is in flight, 'b' was dropped for 'd'.
        assert_eq!(r.queued(), 2);
        assert_eq!(r.counters().dropped, 1);
        let dropped = r.failures("a").last().expect("recorded");
        assert_eq!(dropped.commit.as_str(), "b".repeat(40));
    }

    #[test]
    fn removing_a_repository_forgets_it() {
        let mut r = Reporter::new(ReporterConfig::default());
        let out = r.handle(
            t(0),
            Event::StateChanged(change("a", 'a', GantryState::Queued)),
        );
        let id = sends(&out)[0];
        r.handle(
            t(1),
            Event::Sent {
                id,
                result: SendResult::Status(404),
            },
        );
        r.handle(
            t(2),
            Event::StateChanged(change("a", 'b', GantryState::Queued)),
        );
        let out = r.handle(t(3), Event::RepositoryRemoved { repo: "a".into() });
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(r.failures("a").count(), 0);
        assert_eq!(r.queued() + r.in_flight(), 0);
    }
}
