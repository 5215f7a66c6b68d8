//! Notification events and the bounded queue that carries them to the webhook sender.
//!
//! Owns the event kinds (run started, run finished, job failed; deployment events are
//! added as more kinds), the shape of an event (a one-line summary, facts for chat
//! formats, machine-readable data, the dashboard path), the queue, and the watcher that
//! turns the engine's stored changes into events.
//!
//! Nothing here may ever make the scheduler wait: the engine only broadcasts its
//! changes (a non-blocking send it already does for followers), and [`Notifier::emit`]
//! never waits: when the queue holds [`QUEUE_CAPACITY`] events it drops the oldest and
//! counts it (`gantry_webhook_events_dropped_total`). Delivery is `webhooks.rs`.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use gantry_protocol::{JobId, RunId, TestFailure, TestReport, UnixMillis};
use tokio::sync::broadcast;

use crate::base::metrics::Metrics;
use crate::services::engine::Change;
use crate::store::{JobRecord, RunRecord, Store};

/// Events held for the sender. At ~1 KiB each, 1,024 events are about 1 MiB; the
/// sender drains them in microseconds unless every delivery slot is busy.
pub const QUEUE_CAPACITY: usize = 1024;
/// Runs and job attempts remembered so a re-broadcast record is not announced twice.
const RECENT: usize = 4096;

/// What happened. Its name (`run.finished`) is what webhook filters and payloads use.
///
/// A new kind needs only a variant here and a [`Notifier::emit`] after the commit that
/// makes it true (the deployment manager emits its two); filters, payloads and delivery
/// need nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    RunStarted,
    RunFinished,
    JobFailed,
    /// A deployment waits for approvals (tells the people who may give them).
    DeploymentAwaitingApproval,
    DeploymentFinished,
}

impl EventKind {
    pub const ALL: [Self; 5] = [
        Self::RunStarted,
        Self::RunFinished,
        Self::JobFailed,
        Self::DeploymentAwaitingApproval,
        Self::DeploymentFinished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunStarted => "run.started",
            Self::RunFinished => "run.finished",
            Self::JobFailed => "job.failed",
            Self::DeploymentAwaitingApproval => "deployment.awaiting-approval",
            Self::DeploymentFinished => "deployment.finished",
        }
    }

    pub fn parse(name: &str) -> Result<Self, UnknownEvent> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| UnknownEvent(name.chars().take(40).collect()))
    }
}

/// An event name that is none of [`EventKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event {:?}: use {}", .0, EventKind::ALL.map(EventKind::as_str).join(", "))]
pub struct UnknownEvent(String);

/// One notification, whatever it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub at: UnixMillis,
    /// One line for people: "Run 12 (app, main) failed".
    pub summary: String,
    /// Label and value pairs shown by chat formats.
    pub facts: Vec<(String, String)>,
    /// The dashboard page about it, e.g. `/runs/12`.
    pub path: String,
    /// The subject, machine-readable (the `data` of the generic JSON payload).
    pub data: serde_json::Value,
}

impl Event {
    pub fn run_started(run: &RunRecord) -> Self {
        Self {
            kind: EventKind::RunStarted,
            at: run.created_at,
            summary: format!(
                "Run {} ({}, {}) started by {}",
                run.run, run.pipeline, run.git_ref, run.created_by
            ),
            facts: run_facts(run),
            path: format!("/runs/{}", run.run),
            data: run_data(run),
        }
    }

    pub fn run_finished(run: &RunRecord) -> Self {
        let at = run.finished_at.unwrap_or(run.created_at);
        let mut facts = run_facts(run);
        facts.push((
            "Duration".into(),
            crate::base::text::human_duration(at.millis_since(run.created_at)),
        ));
        Self {
            kind: EventKind::RunFinished,
            at,
            summary: format!(
                "Run {} ({}, {}) {}",
                run.run, run.pipeline, run.git_ref, run.state
            ),
            facts,
            path: format!("/runs/{}", run.run),
            data: run_data(run),
        }
    }

    pub fn job_failed(job: &JobRecord, pipeline: &str) -> Self {
        let how = match (job.state.as_str(), job.exit_code) {
            ("failed", Some(code)) => format!("failed with exit code {code}"),
            ("timed-out", _) => "timed out".to_owned(),
            ("lost", _) => "was lost with its agent".to_owned(),
            (state, _) => state.to_owned(),
        };
        let mut facts = vec![
            ("Pipeline".to_owned(), pipeline.to_owned()),
            ("Job".to_owned(), format!("{} ({})", job.name, job.job)),
            ("State".to_owned(), job.state.to_string()),
            ("Attempt".to_owned(), job.attempt.to_string()),
        ];
        if let Some(agent) = &job.agent {
            facts.push(("Agent".into(), agent.to_string()));
        }
        Self {
            kind: EventKind::JobFailed,
            at: job.finished_at.unwrap_or_else(UnixMillis::now),
            summary: format!(
                "Job {} ({}) of run {} ({pipeline}) {how}",
                job.name, job.job, job.job.run
            ),
            facts,
            path: format!("/jobs/{}", job.job),
            data: serde_json::json!({
                "job": job.job.to_string(),
                "run": job.job.run.0,
                "pipeline": pipeline,
                "name": job.name,
                "state": job.state,
                "attempt": job.attempt,
                "exit_code": job.exit_code,
                "agent": job.agent.as_ref().map(ToString::to_string),
                "started_at": job.started_at.map(UnixMillis::to_rfc3339),
                "finished_at": job.finished_at.map(UnixMillis::to_rfc3339),
            }),
        }
    }
}

impl Event {
    /// A deployment that waits for approvals, or that ended.
    pub fn deployment(kind: EventKind, d: &gantry_protocol::DeploymentView) -> Self {
        let mut summary = match kind {
            EventKind::DeploymentAwaitingApproval => format!(
                "Deployment {} of {} ({}) to {} waits for {} approval(s): gantry deploy approve {}",
                d.id, d.app, d.release.version, d.environment, d.approvals_needed, d.id
            ),
            _ => format!(
                "Deployment {} of {} ({}) to {} {}",
                d.id, d.app, d.release.version, d.environment, d.state
            ),
        };
        if let (EventKind::DeploymentFinished, Some(reason)) = (kind, &d.reason) {
            summary.push_str(": ");
            summary.push_str(reason);
        }
        let active = d.hosts.iter().filter(|h| h.state == "active").count();
        Self {
            kind,
            at: d.finished_at.unwrap_or(d.created_at),
            summary,
            facts: vec![
                ("Environment".into(), d.environment.clone()),
                (
                    "Release".into(),
                    format!("{} ({})", d.release.id, d.release.version),
                ),
                ("Strategy".into(), d.strategy.clone()),
                ("State".into(), d.state.clone()),
                (
                    "Hosts active".into(),
                    format!("{active} of {}", d.hosts.len()),
                ),
                ("By".into(), d.created_by.clone()),
            ],
            path: "/deployments".into(),
            data: serde_json::to_value(d).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Failed test names a notification lists (the dashboard page has them all).
const NOTIFIED_FAILURES: usize = 10;

impl Event {
    /// Adds what test reports say (`reports:`), summed over `reports`: a "Tests" fact
    /// with the counts and coverage, a "Failed tests" fact with the first names, and
    /// `data.tests` with the counts and each listed failure's name, file and output.
    /// Nothing when there are no reports.
    pub fn with_tests(mut self, reports: &[TestReport]) -> Self {
        if reports.is_empty() {
            return self;
        }
        let sum = |f: fn(&TestReport) -> u64| reports.iter().map(f).sum::<u64>();
        let (passed, failed, skipped) = (sum(|r| r.passed), sum(|r| r.failed), sum(|r| r.skipped));
        let mut line = format!("{passed} passed, {failed} failed, {skipped} skipped");
        let coverage = match reports {
            [one] => one.coverage.map(|c| c.percent()),
            _ => None,
        };
        if let Some(c) = &coverage {
            line.push_str("; coverage ");
            line.push_str(c);
        }
        let failures: Vec<&TestFailure> = reports
            .iter()
            .flat_map(|r| &r.failures)
            .take(NOTIFIED_FAILURES)
            .collect();
        self.facts.push(("Tests".into(), line));
        if !failures.is_empty() {
            let mut names = failures
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let more = failed.saturating_sub(failures.len() as u64);
            if more > 0 {
                names = format!("{names} and {more} more");
            }
            self.facts.push(("Failed tests".into(), names));
        }
        self.data["tests"] = serde_json::json!({
            "passed": passed,
            "failed": failed,
            "skipped": skipped,
            "coverage": coverage,
            "failures": failures,
        });
        self
    }
}

/// The test report of a job's latest attempt, if that attempt sent one.
fn latest_report(store: &Store, job: &JobRecord) -> Option<TestReport> {
    store
        .job_report(job.job)
        .ok()
        .flatten()
        .filter(|r| r.attempt == job.attempt)
}

fn run_facts(run: &RunRecord) -> Vec<(String, String)> {
    let mut facts = vec![
        ("Pipeline".to_owned(), run.pipeline.clone()),
        ("Ref".to_owned(), run.git_ref.clone()),
        ("State".to_owned(), run.state.to_string()),
        ("Trigger".to_owned(), run.event.clone()),
    ];
    if let Some(commit) = &run.commit {
        facts.push(("Commit".into(), commit.chars().take(12).collect()));
    }
    facts
}

fn run_data(run: &RunRecord) -> serde_json::Value {
    serde_json::json!({
        "run": run.run.0,
        "pipeline": run.pipeline,
        "state": run.state,
        "ref": run.git_ref,
        "commit": run.commit,
        "event": run.event,
        "created_by": run.created_by,
        "created_at": run.created_at.to_rfc3339(),
        "finished_at": run.finished_at.map(UnixMillis::to_rfc3339),
    })
}

/// The bounded queue between event sources and the webhook sender.
#[derive(Debug)]
pub struct Notifier {
    queue: Mutex<VecDeque<Event>>,
    wake: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    capacity: usize,
}

impl Notifier {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_capacity(metrics, QUEUE_CAPACITY)
    }

    fn with_capacity(metrics: Arc<Metrics>, capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(64))),
            wake: tokio::sync::Notify::new(),
            metrics,
            capacity,
        }
    }

    /// Queues an event without ever waiting; a full queue loses its oldest event.
    pub fn emit(&self, event: Event) {
        let dropped = {
            let mut queue = self.lock();
            let dropped = if queue.len() >= self.capacity {
                queue.pop_front()
            } else {
                None
            };
            queue.push_back(event);
            dropped
        };
        if let Some(old) = dropped {
            self.metrics.webhook_event_dropped();
            tracing::warn!(
                event = old.kind.as_str(),
                "notification queue full ({} events): dropped the oldest",
                self.capacity
            );
        }
        self.wake.notify_one();
    }

    /// The oldest queued event, waiting for one.
    pub async fn next(&self) -> Event {
        loop {
            // Registered before looking, so an emit between the look and the wait is
            // not missed (Notify keeps one permit).
            let notified = self.wake.notified();
            if let Some(event) = self.lock().pop_front() {
                return event;
            }
            notified.await;
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A bounded set of recently seen keys (oldest forgotten first).
#[derive(Debug)]
struct Recent<K> {
    order: VecDeque<K>,
    set: HashSet<K>,
}

impl<K: Clone + Eq + std::hash::Hash> Recent<K> {
    fn new() -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    /// `true` the first time `key` is seen.
    fn first(&mut self, key: K) -> bool {
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Turns stored changes into events: a run that ended, a job attempt that failed for
/// good. Runs on its own task, reading the engine's broadcast of committed changes.
pub fn watch_engine(
    mut changes: broadcast::Receiver<Change>,
    store: Arc<Store>,
    notifier: Arc<Notifier>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut runs: Recent<RunId> = Recent::new();
        let mut jobs: Recent<(JobId, u32)> = Recent::new();
        loop {
            match changes.recv().await {
                Ok(Change::Run(run)) => {
                    if run.finished_at.is_some() && runs.first(run.run) {
                        let reports: Vec<_> = store
                            .jobs_of(run.run)
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|j| latest_report(&store, j))
                            .collect();
                        let event = Event::run_finished(&run).with_tests(&reports);
                        notifier.emit(event);
                    }
                }
                Ok(Change::Job(job)) => {
                    let failed = job.state.is_failure();
                    if failed && jobs.first((job.job, job.attempt)) {
                        let pipeline = match store.run(job.job.run) {
                            Ok(Some(r)) => r.pipeline,
                            _ => String::from("?"),
                        };
                        let report = latest_report(&store, &job);
                        let event =
                            Event::job_failed(&job, &pipeline).with_tests(report.as_slice());
                        notifier.emit(event);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // The engine never waits for us; we lost sight of `missed` changes.
                    tracing::warn!(
                        missed,
                        "notifications missed stored changes (the change feed overflowed)"
                    );
                    for _ in 0..missed {
                        notifier.metrics.webhook_event_dropped();
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_reports_add_counts_and_the_first_failed_names_to_an_event() {
        let report = TestReport {
            attempt: 1,
            passed: 3,
            failed: 12,
            failures: (0..12)
                .map(|i| TestFailure {
                    name: format!("t{i}"),
                    ..TestFailure::default()
                })
                .collect(),
            coverage: Some(gantry_protocol::Coverage::from_lines(1, 2)),
            ..TestReport::default()
        };
        let fact = |e: &Event, k: &str| {
            e.facts
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        };
        let one = Event::run_finished(&run(1, "failed")).with_tests(std::slice::from_ref(&report));
        assert_eq!(
            fact(&one, "Tests").as_deref(),
            Some("3 passed, 12 failed, 0 skipped; coverage 50.00%")
        );
        let names = fact(&one, "Failed tests").expect("failed names");
        assert!(
            names.starts_with("t0, t1, ") && names.ends_with("t9 and 2 more"),
            "{names}"
        );
        assert_eq!(
            one.data["tests"]["failures"].as_array().map(Vec::len),
            Some(10)
        );
        // Several jobs: counts add up, rates of different code do not.
        let two = Event::run_finished(&run(1, "failed")).with_tests(&[report.clone(), report]);
        assert_eq!(
            fact(&two, "Tests").as_deref(),
            Some("6 passed, 24 failed, 0 skipped")
        );
        let none = Event::run_finished(&run(1, "failed")).with_tests(&[]);
        assert!(none.data.get("tests").is_none() && fact(&none, "Tests").is_none());
    }

    fn run(n: u64, state: &str) -> RunRecord {
        RunRecord {
            run: RunId(n),
            pipeline: "app".into(),
            file_name: "gantry.yml".into(),
            text: String::new(),
            git_ref: "main".into(),
            commit: Some("0123456789abcdef".into()),
            event: "manual".into(),
            inputs: gantry_protocol::Labels::new(),
            created_at: UnixMillis(1_000),
            created_by: "gantry://admin/ops".into(),
            state: crate::store::RunStatus::from_name(state).expect("a run state"),
            finished_at: Some(UnixMillis(61_000)),
            source: None,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_event_and_counts_it() {
        let metrics = Arc::new(Metrics::default());
        let notifier = Notifier::with_capacity(metrics.clone(), 3);
        for n in 1..=5 {
            notifier.emit(Event::run_finished(&run(n, "succeeded")));
        }
        assert_eq!(notifier.len(), 3);
        let text = metrics.render(crate::base::metrics::Gauges::default());
        assert!(
            text.contains("gantry_webhook_events_dropped_total 2\n"),
            "{text}"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let first = rt.block_on(notifier.next());
        assert_eq!(first.path, "/runs/3", "the two oldest went");
    }

    #[test]
    fn events_say_what_happened_in_one_line_and_in_data() {
        let e = Event::run_finished(&run(12, "failed"));
        assert_eq!(e.kind.as_str(), "run.finished");
        assert_eq!(e.summary, "Run 12 (app, main) failed");
        assert_eq!(e.data["run"], 12);
        assert_eq!(e.data["finished_at"], "1970-01-01T00:01:01Z");
        assert!(
            e.facts.contains(&("Duration".into(), "1m0s".into())),
            "{:?}",
            e.facts
        );
        assert_eq!(EventKind::parse("job.failed"), Ok(EventKind::JobFailed));
        let err = EventKind::parse("run.exploded").expect_err("unknown");
        assert!(
            err.to_string()
                .contains("run.started, run.finished, job.failed"),
            "{err}"
        );
    }

    #[test]
    fn a_key_is_new_once_and_memory_is_bounded() {
        let mut recent = Recent::new();
        assert!(recent.first(1));
        assert!(!recent.first(1));
        for n in 2..(RECENT as u64 + 10) {
            recent.first(n);
        }
        assert_eq!(recent.order.len(), RECENT);
        assert!(recent.first(1), "forgotten after RECENT newer keys");
    }
}
