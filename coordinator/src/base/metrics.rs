//! The coordinator's figures, rendered in the Prometheus text format on `/metrics`.
//!
//! Owns the counters and histograms; the engine, the log receiver and the server bump
//! them, and `render` reads them (with the gauges it is given) without locks on the hot
//! paths: every counter is an atomic.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the dispatch latency histogram buckets: queued to accepted.
const DISPATCH_BUCKETS: [f64; 10] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
];
/// Upper bounds (seconds) of the job duration histogram buckets.
const DURATION_BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0];
/// Job outcomes counted, in the order they are rendered.
pub const OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "timed-out",
    "lost",
    "cancelled",
    "skipped",
];
/// Run outcomes counted.
pub const RUN_OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];
/// How deployments end (`deployments.rs` state names).
pub const DEPLOYMENT_OUTCOMES: [&str; 4] = ["succeeded", "rolled-back", "failed", "cancelled"];
/// How webhook deliveries (one event to one target) end: accepted by the receiver,
/// given up on, or never tried because the target had too many pending.
pub const WEBHOOK_OUTCOMES: [&str; 3] = ["delivered", "failed", "dropped"];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, u64, f64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new((vec![0; bounds.len()], 0, 0.0)),
        }
    }

    fn observe(&self, seconds: f64) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, bound) in self.bounds.iter().enumerate() {
            if seconds <= *bound {
                st.0[i] += 1;
            }
        }
        st.1 += 1;
        st.2 += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&st.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            st.1, st.2, st.1
        );
    }
}

/// Everything `/metrics` shows besides the gauges read at render time.
#[derive(Debug)]
pub struct Metrics {
    jobs_dispatched: AtomicU64,
    job_outcomes: [AtomicU64; OUTCOMES.len()],
    run_outcomes: [AtomicU64; RUN_OUTCOMES.len()],
    deployment_outcomes: [AtomicU64; DEPLOYMENT_OUTCOMES.len()],
    log_bytes: AtomicU64,
    source_bytes: AtomicU64,
    artifact_bytes_received: AtomicU64,
    artifact_bytes_sent: AtomicU64,
    chunks_deduplicated: AtomicU64,
    chunks_refused: AtomicU64,
    chunks_unavailable: AtomicU64,
    queue_depth: AtomicU64,
    webhook_deliveries: [AtomicU64; WEBHOOK_OUTCOMES.len()],
    webhook_attempts: AtomicU64,
    webhook_events_dropped: AtomicU64,
    /// Commit-status requests to forges that were answered 2xx, and that failed.
    forge_status_delivered: AtomicU64,
    forge_status_failed: AtomicU64,
    /// Commit statuses that never reached their forge (refused, given up, dropped).
    forge_status_lost: AtomicU64,
    dispatch_latency: Histogram,
    job_duration: Histogram,
    /// Every authorization decision (`authz.rs`).
    pub authz: crate::base::authz::Decisions,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            jobs_dispatched: AtomicU64::new(0),
            job_outcomes: Default::default(),
            run_outcomes: Default::default(),
            deployment_outcomes: Default::default(),
            log_bytes: AtomicU64::new(0),
            source_bytes: AtomicU64::new(0),
            artifact_bytes_received: AtomicU64::new(0),
            artifact_bytes_sent: AtomicU64::new(0),
            chunks_deduplicated: AtomicU64::new(0),
            chunks_refused: AtomicU64::new(0),
            chunks_unavailable: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            webhook_deliveries: Default::default(),
            webhook_attempts: AtomicU64::new(0),
            webhook_events_dropped: AtomicU64::new(0),
            forge_status_delivered: AtomicU64::new(0),
            forge_status_failed: AtomicU64::new(0),
            forge_status_lost: AtomicU64::new(0),
            dispatch_latency: Histogram::new(&DISPATCH_BUCKETS),
            job_duration: Histogram::new(&DURATION_BUCKETS),
            authz: crate::base::authz::Decisions::default(),
        }
    }
}

/// Gauges read when `/metrics` is rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub agents_connected: u64,
    pub agents_enrolled: u64,
    /// The data directory's free bytes as last sampled (left out when unknown).
    pub data_dir_free_bytes: Option<u64>,
    /// The data directory is at or under its low-space watermark.
    pub data_dir_low_space: bool,
}

impl Metrics {
    /// Jobs waiting for an agent, as of the engine's last step.
    pub fn set_queue_depth(&self, depth: u64) {
        self.queue_depth.store(depth, Ordering::Relaxed);
    }

    /// Compressed chunk bytes stored from uploads.
    pub fn artifact_bytes_received(&self, bytes: u64) {
        self.artifact_bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Compressed chunk bytes served to readers.
    pub fn artifact_bytes_sent(&self, bytes: u64) {
        self.artifact_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Chunks an uploader did not have to send because they were stored already.
    pub fn chunks_deduplicated(&self, count: u64) {
        self.chunks_deduplicated.fetch_add(count, Ordering::Relaxed);
    }

    /// An uploaded chunk failed verification.
    pub fn chunk_refused(&self) {
        self.chunks_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A stored chunk could not be served (missing or corrupt on disk).
    pub fn chunk_unavailable(&self) {
        self.chunks_unavailable.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dispatched(&self) {
        self.jobs_dispatched.fetch_add(1, Ordering::Relaxed);
    }

    /// A job reached a final state (`outcome` is its stored state name).
    pub fn job_ended(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.job_outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn run_ended(&self, outcome: &str) {
        if let Some(i) = RUN_OUTCOMES.iter().position(|o| *o == outcome) {
            self.run_outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn deployment_ended(&self, outcome: &str) {
        if let Some(i) = DEPLOYMENT_OUTCOMES.iter().position(|o| *o == outcome) {
            self.deployment_outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn log_bytes(&self, n: u64) {
        self.log_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn source_bytes(&self, n: u64) {
        self.source_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// A webhook delivery ended (`outcome` is one of [`WEBHOOK_OUTCOMES`]).
    pub fn webhook_delivery(&self, outcome: &str) {
        if let Some(i) = WEBHOOK_OUTCOMES.iter().position(|o| *o == outcome) {
            self.webhook_deliveries[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One HTTP attempt of a webhook delivery was made.
    pub fn webhook_attempt(&self) {
        self.webhook_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// A notification event was lost before delivery (its queue was full).
    pub fn webhook_event_dropped(&self) {
        self.webhook_events_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// One commit-status request to a forge ended, answered 2xx or not.
    pub fn forge_status_attempt(&self, delivered: bool) {
        let counter = if delivered {
            &self.forge_status_delivered
        } else {
            &self.forge_status_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Commit statuses lost so far (the reporter's own count).
    pub fn forge_status_lost(&self, total: u64) {
        self.forge_status_lost.store(total, Ordering::Relaxed);
    }

    /// Time from a job being queued to an agent accepting it.
    pub fn dispatch_latency(&self, seconds: f64) {
        self.dispatch_latency.observe(seconds);
    }

    /// Run time of a finished job attempt, as its agent measured it.
    pub fn job_duration(&self, seconds: f64) {
        self.job_duration.observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "gantry_agents_connected",
            "Agents with a live session.",
            gauges.agents_connected,
        );
        gauge(
            &mut out,
            "gantry_agents_enrolled",
            "Agents enrolled (revoked ones included).",
            gauges.agents_enrolled,
        );
        if let Some(free) = gauges.data_dir_free_bytes {
            gauge(
                &mut out,
                "gantry_data_dir_free_bytes",
                "Free bytes in the data directory's file system, sampled every 5 s.",
                free,
            );
        }
        gauge(
            &mut out,
            "gantry_data_dir_low_space",
            "1 while the data directory is at or under its low-space watermark (new runs and uploads are refused).",
            u64::from(gauges.data_dir_low_space),
        );
        gauge(
            &mut out,
            "gantry_queue_depth",
            "Jobs waiting for an agent.",
            self.queue_depth.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP gantry_jobs_dispatched_total Job attempts offered to agents.\n# TYPE gantry_jobs_dispatched_total counter\ngantry_jobs_dispatched_total {}",
            self.jobs_dispatched.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP gantry_job_outcomes_total Jobs that reached a final state, by state.\n# TYPE gantry_job_outcomes_total counter");
        for (name, count) in OUTCOMES.iter().zip(&self.job_outcomes) {
            let _ = writeln!(
                out,
                "gantry_job_outcomes_total{{outcome=\"{name}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP gantry_run_outcomes_total Pipeline runs that ended, by state.\n# TYPE gantry_run_outcomes_total counter");
        for (name, count) in RUN_OUTCOMES.iter().zip(&self.run_outcomes) {
            let _ = writeln!(
                out,
                "gantry_run_outcomes_total{{outcome=\"{name}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP gantry_deployment_outcomes_total Deployments that ended, by state.\n# TYPE gantry_deployment_outcomes_total counter");
        for (name, count) in DEPLOYMENT_OUTCOMES.iter().zip(&self.deployment_outcomes) {
            let _ = writeln!(
                out,
                "gantry_deployment_outcomes_total{{outcome=\"{name}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP gantry_log_bytes_total Job log bytes stored.\n# TYPE gantry_log_bytes_total counter\ngantry_log_bytes_total {}",
            self.log_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP gantry_source_bytes_total Source tree bytes uploaded.\n# TYPE gantry_source_bytes_total counter\ngantry_source_bytes_total {}",
            self.source_bytes.load(Ordering::Relaxed)
        );
        let counters = [
            (
                "gantry_artifact_bytes_received_total",
                "Compressed chunk bytes stored from artifact and cache uploads.",
                &self.artifact_bytes_received,
            ),
            (
                "gantry_artifact_bytes_sent_total",
                "Compressed chunk bytes served to agents and admins.",
                &self.artifact_bytes_sent,
            ),
            (
                "gantry_chunks_deduplicated_total",
                "Chunks uploaders did not send because they were stored already.",
                &self.chunks_deduplicated,
            ),
            (
                "gantry_chunks_refused_total",
                "Uploaded chunks refused because they failed verification.",
                &self.chunks_refused,
            ),
            (
                "gantry_chunks_unavailable_total",
                "Stored chunks found missing or corrupt when they were to be served.",
                &self.chunks_unavailable,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP gantry_webhook_deliveries_total Webhook deliveries (one event to one target) that ended, by outcome.\n# TYPE gantry_webhook_deliveries_total counter");
        for (name, count) in WEBHOOK_OUTCOMES.iter().zip(&self.webhook_deliveries) {
            let _ = writeln!(
                out,
                "gantry_webhook_deliveries_total{{outcome=\"{name}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let webhook_counters = [
            (
                "gantry_webhook_attempts_total",
                "HTTP requests made to webhook receivers, retries included.",
                &self.webhook_attempts,
            ),
            (
                "gantry_webhook_events_dropped_total",
                "Notification events dropped before delivery because their queue was full.",
                &self.webhook_events_dropped,
            ),
            (
                "gantry_forge_status_requests_delivered_total",
                "Commit-status requests the forge answered with 2xx.",
                &self.forge_status_delivered,
            ),
            (
                "gantry_forge_status_requests_failed_total",
                "Commit-status requests that failed (no answer, or not 2xx), retries included.",
                &self.forge_status_failed,
            ),
            (
                "gantry_forge_statuses_lost_total",
                "Commit statuses that never reached the forge: refused, given up after every retry, or dropped from a full queue.",
                &self.forge_status_lost,
            ),
        ];
        for (name, help, value) in webhook_counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.dispatch_latency.render(
            &mut out,
            "gantry_dispatch_latency_seconds",
            "Time from a job being queued to an agent accepting it.",
        );
        self.job_duration.render(
            &mut out,
            "gantry_job_duration_seconds",
            "Run time of finished job attempts.",
        );
        self.authz.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_exposition_lines_that_move() {
        let m = Metrics::default();
        m.job_ended("succeeded");
        m.job_ended("succeeded");
        m.job_ended("no-such-state");
        m.deployment_ended("rolled-back");
        m.dispatch_latency(0.003);
        m.log_bytes(42);
        m.set_queue_depth(1);
        let text = m.render(Gauges {
            agents_connected: 3,
            agents_enrolled: 4,
            data_dir_free_bytes: Some(1 << 30),
            data_dir_low_space: true,
        });
        assert!(
            text.contains("gantry_data_dir_free_bytes 1073741824\n"),
            "{text}"
        );
        assert!(text.contains("gantry_data_dir_low_space 1\n"), "{text}");
        assert!(
            text.contains("gantry_job_outcomes_total{outcome=\"succeeded\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("gantry_agents_connected 3\n"));
        assert!(
            text.contains("gantry_deployment_outcomes_total{outcome=\"rolled-back\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("gantry_log_bytes_total 42\n"));
        assert!(text.contains("gantry_dispatch_latency_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("gantry_dispatch_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("gantry_dispatch_latency_seconds_count 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            assert!(value.parse::<f64>().is_ok(), "value of {line}");
            assert!(name.starts_with("gantry_"), "{line}");
        }
    }
}
