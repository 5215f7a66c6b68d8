//! Outgoing webhooks: targets (`gantry webhooks add|list|rm`), payloads (generic JSON
//! and Slack-compatible), their HMAC signature, and delivery with retries.
//!
//! Owns the sender task that drains the notification queue (`notify.rs`): for each
//! event it picks the targets whose filter matches and starts one delivery per target.
//! A delivery POSTs the body signed with `X-Gantry-Signature: sha256=<hex HMAC-SHA256
//! of the body, keyed with the target's secret>` and retries failures (no answer,
//! 408, 425, 429, 5xx) with exponential backoff and jitter: with the default 10 s base,
//! waits of 5–10, 15–30, 45–90 and 90–180 s between 5 attempts, so a delivery gives up
//! within about 5 minutes. Other statuses (a 4xx says the receiver refuses it) are not
//! retried. Each attempt has 10 s.
//!
//! Bounds, so a dead receiver costs little and never reaches the scheduler: at most
//! 256 deliveries in progress in all (more events wait in the notification queue, which
//! drops its oldest beyond 1,024), at most 64 per target (beyond, that target's new
//! deliveries are dropped and counted), at most 16 HTTP exchanges at once. The last
//! [`LOG_PER_TARGET`] attempts per target are kept in memory for `gantry webhooks
//! list` (a restart clears them). Deliveries to one target may arrive out of order;
//! each body carries its event time and a delivery id that retries keep.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_protocol::{
    AdminErrorKind, DeliveryView, UnixMillis, WebhookAdded, WebhookFormat, WebhookView,
};
use ring::hmac;
use tokio::sync::Semaphore;

use crate::base::audit::Acting;
use crate::base::config::WebhookSettings;
use crate::base::error::AdminFailure;
use crate::base::http_client::{self, TlsConfigError, Url, UrlError};
use crate::base::metrics::Metrics;
use crate::base::seal::SecretKey;
use crate::services::notify::{Event, EventKind, Notifier, UnknownEvent};
use crate::store::{Store, StoreError, WebhookRecord};

/// Why a webhook request failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Event(#[from] UnknownEvent),
    #[error("--ca applies to https:// URLs only")]
    CaWithoutTls,
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("at most {MAX_TARGETS} webhook targets; remove one first")]
    TooMany,
    #[error("no webhook {0}; `gantry webhooks list` shows them")]
    NotFound(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminFailure for WebhookError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::NotFound(_) => AdminErrorKind::NotFound,
            Self::Store(_) => AdminErrorKind::Internal,
            _ => AdminErrorKind::InvalidInput,
        }
    }
}

/// Delivery attempts kept per target for `gantry webhooks list`.
pub const LOG_PER_TARGET: usize = 20;
/// Deliveries in progress (sending or waiting to retry) in all.
const MAX_PENDING: usize = 256;
/// Deliveries in progress per target; a target that stops answering holds at most these.
const MAX_PENDING_PER_TARGET: usize = 64;
/// HTTP exchanges at once.
const MAX_CONNECTIONS: usize = 16;
/// Most webhook targets.
const MAX_TARGETS: usize = 100;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Gantry-Signature";

/// How long to wait after attempt `failed` (1 for the first) failed: exponential
/// (base × 3^(n-1), at most 18 × base) with "equal jitter" (half fixed, half random,
/// `random` in 0..1), so receivers coming back are not hit by every sender at once.
pub fn backoff(failed: u32, base: Duration, random: f64) -> Duration {
    let factor = 3u32.saturating_pow(failed.saturating_sub(1)).min(18);
    let full = base.saturating_mul(factor);
    full / 2 + full.div_f64(2.0).mul_f64(random.clamp(0.0, 1.0))
}

/// HMAC-SHA256 of `body` keyed with `secret`, as the signature header carries it.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        gantry_certs::hex(hmac::sign(&key, body).as_ref())
    )
}

/// Whether an answer with this status is worth trying again.
fn retryable(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

/// Slack's mrkdwn needs `&`, `<` and `>` escaped.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The body sent for `event` in `format`.
pub fn payload(format: WebhookFormat, event: &Event, delivery: &str) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Json => serde_json::json!({
            "event": event.kind.as_str(),
            "delivery": delivery,
            "at": event.at.to_rfc3339(),
            "summary": event.summary,
            "path": event.path,
            "data": event.data,
        }),
        WebhookFormat::Slack => {
            // Slack shows at most 10 fields in a section.
            let fields: Vec<serde_json::Value> = event
                .facts
                .iter()
                .take(10)
                .map(|(label, value)| {
                    serde_json::json!({
                        "type": "mrkdwn",
                        "text": format!("*{}*\n{}", slack_escape(label), slack_escape(value)),
                    })
                })
                .collect();
            serde_json::json!({
                "text": event.summary,
                "blocks": [
                    {
                        "type": "section",
                        "text": { "type": "mrkdwn", "text": format!("*{}*", slack_escape(&event.summary)) },
                    },
                    { "type": "section", "fields": fields },
                    {
                        "type": "context",
                        "elements": [{
                            "type": "mrkdwn",
                            "text": format!("gantry · {} · {} · {}", event.kind.as_str(), event.at.to_rfc3339(), slack_escape(&event.path)),
                        }],
                    },
                ],
            })
        }
    };
    value.to_string().into_bytes()
}

/// The webhook sender and what it remembers.
#[derive(Debug)]
pub struct Webhooks {
    store: Arc<Store>,
    secret_key: Arc<SecretKey>,
    metrics: Arc<Metrics>,
    settings: WebhookSettings,
    log: Mutex<HashMap<u64, VecDeque<DeliveryView>>>,
    pending: Mutex<HashMap<u64, usize>>,
    slots: Arc<Semaphore>,
    connections: Semaphore,
}

/// One delivery's hold on its target's pending count.
struct PendingGuard {
    webhooks: Arc<Webhooks>,
    target: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = lock(&self.webhooks.pending);
        if let Some(n) = pending.get_mut(&self.target) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending.remove(&self.target);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Webhooks {
    /// Builds the sender and starts its task, which drains `notifier` until the
    /// runtime ends.
    pub fn start(
        store: Arc<Store>,
        secret_key: Arc<SecretKey>,
        metrics: Arc<Metrics>,
        settings: WebhookSettings,
        notifier: Arc<Notifier>,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            store,
            secret_key,
            metrics,
            settings,
            log: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(MAX_PENDING)),
            connections: Semaphore::new(MAX_CONNECTIONS),
        });
        let sender = me.clone();
        tokio::spawn(async move {
            loop {
                let event = notifier.next().await;
                sender.dispatch(Arc::new(event)).await;
            }
        });
        me
    }

    /// Starts one delivery per matching target. Waits only for a free delivery slot
    /// (never for a receiver), so a full house backs up into the notification queue.
    async fn dispatch(self: &Arc<Self>, event: Arc<Event>) {
        let targets = match self.store.webhooks() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    "cannot read webhook targets; {} not delivered: {e}",
                    event.kind.as_str()
                );
                return;
            }
        };
        for target in targets {
            let wanted =
                target.events.is_empty() || target.events.iter().any(|e| e == event.kind.as_str());
            if !wanted {
                continue;
            }
            {
                let mut pending = lock(&self.pending);
                let n = pending.entry(target.id).or_insert(0);
                if *n >= MAX_PENDING_PER_TARGET {
                    drop(pending);
                    self.record(
                        target.id,
                        &event,
                        0,
                        None,
                        Some(format!(
                            "{MAX_PENDING_PER_TARGET} deliveries already pending for this target"
                        )),
                        Duration::ZERO,
                        "dropped",
                    );
                    self.metrics.webhook_delivery("dropped");
                    continue;
                }
                *n += 1;
            }
            let guard = PendingGuard {
                webhooks: self.clone(),
                target: target.id,
            };
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            let event = event.clone();
            tokio::spawn(async move {
                me.deliver(&target, &event).await;
                drop(slot);
                drop(guard);
            });
        }
    }

    /// A delivery that cannot even be attempted (the target's secret, URL or TLS
    /// configuration is unusable): logged as failed, never retried.
    fn undeliverable(&self, target: u64, event: &Event, error: &dyn std::fmt::Display) {
        self.record(
            target,
            event,
            0,
            None,
            Some(error.to_string()),
            Duration::ZERO,
            "failed",
        );
        self.metrics.webhook_delivery("failed");
    }

    /// Delivers one event to one target, retrying as the module says.
    async fn deliver(&self, target: &WebhookRecord, event: &Event) {
        let delivery = format!(
            "d-{}",
            gantry_certs::hex(&gantry_certs::random_bytes::<8>())
        );
        let secret = match self
            .secret_key
            .open(&secret_name(target.id), &target.sealed_secret)
        {
            Ok(s) => s,
            Err(e) => {
                self.undeliverable(target.id, event, &e);
                return;
            }
        };
        let url = match Url::parse(&target.url) {
            Ok(u) => u,
            Err(e) => {
                self.undeliverable(target.id, event, &e);
                return;
            }
        };
        let tls = if url.tls {
            let config = match &target.ca_pem {
                Some(pem) => http_client::tls_with_ca(pem),
                None => http_client::tls_with_system_roots(),
            };
            match config {
                Ok(c) => Some(c),
                Err(e) => {
                    self.undeliverable(target.id, event, &e);
                    return;
                }
            }
        } else {
            None
        };
        let body = payload(target.format, event, &delivery);
        let headers = [
            ("Content-Type", "application/json".to_owned()),
            (SIGNATURE_HEADER, signature(&secret, &body)),
            ("X-Gantry-Event", event.kind.as_str().to_owned()),
            ("X-Gantry-Delivery", delivery.clone()),
        ];
        let attempts = self.settings.attempts.max(1);
        for attempt in 1..=attempts {
            let started = Instant::now();
            let result = {
                let _connection = self.connections.acquire().await;
                self.metrics.webhook_attempt();
                http_client::post(&url, tls.clone(), &headers, &body, self.settings.timeout).await
            };
            let took = started.elapsed();
            let last = attempt == attempts;
            match result {
                Ok(status) if (200..300).contains(&status) => {
                    self.record(
                        target.id,
                        event,
                        attempt,
                        Some(status),
                        None,
                        took,
                        "delivered",
                    );
                    self.metrics.webhook_delivery("delivered");
                    return;
                }
                Ok(status) if !retryable(status) => {
                    let why = format!("the receiver answered {status}; not retried");
                    self.record(
                        target.id,
                        event,
                        attempt,
                        Some(status),
                        Some(why),
                        took,
                        "failed",
                    );
                    self.metrics.webhook_delivery("failed");
                    tracing::warn!(
                        webhook = target.id,
                        status,
                        "webhook delivery refused by its receiver"
                    );
                    return;
                }
                Ok(status) => {
                    let outcome = if last { "failed" } else { "retrying" };
                    self.record(
                        target.id,
                        event,
                        attempt,
                        Some(status),
                        Some(format!("the receiver answered {status}")),
                        took,
                        outcome,
                    );
                }
                Err(e) => {
                    let outcome = if last { "failed" } else { "retrying" };
                    self.record(
                        target.id,
                        event,
                        attempt,
                        None,
                        Some(e.to_string()),
                        took,
                        outcome,
                    );
                }
            }
            if last {
                break;
            }
            tokio::time::sleep(backoff(attempt, self.settings.retry_base, fastrand::f64())).await;
        }
        self.metrics.webhook_delivery("failed");
        tracing::warn!(
            webhook = target.id,
            event = event.kind.as_str(),
            attempts,
            "webhook delivery failed; giving up"
        );
    }

    /// Adds an attempt to the target's delivery log. Callers write it before moving the
    /// delivery counters, so whoever sees a counter move also sees the entry.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        target: u64,
        event: &Event,
        attempt: u32,
        status: Option<u16>,
        error: Option<String>,
        took: Duration,
        outcome: &str,
    ) {
        let mut log = lock(&self.log);
        let entries = log.entry(target).or_default();
        entries.push_back(DeliveryView {
            at: UnixMillis::now(),
            event: event.kind.as_str().to_owned(),
            attempt,
            status,
            error,
            duration_ms: took.as_millis() as u64,
            outcome: outcome.to_owned(),
        });
        while entries.len() > LOG_PER_TARGET {
            entries.pop_front();
        }
    }

    fn view(&self, r: &WebhookRecord) -> WebhookView {
        WebhookView {
            id: r.id,
            url: r.url.clone(),
            format: r.format,
            events: r.events.clone(),
            custom_ca: r.ca_pem.is_some(),
            created_at: r.created_at,
            created_by: r.created_by.clone(),
            deliveries: lock(&self.log)
                .get(&r.id)
                .map(|d| d.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// `gantry webhooks add`: a target for `events` (all when empty) in `format`,
    /// trusting `ca_pem` for an https URL if given (else the system's CAs). Its signing
    /// secret is made here and shown once.
    pub fn add(
        &self,
        cx: &Acting<'_>,
        url: &str,
        format: WebhookFormat,
        events: &[String],
        ca_pem: Option<&str>,
    ) -> Result<WebhookAdded, WebhookError> {
        let parsed = Url::parse(url)?;
        let mut kinds: Vec<String> = Vec::new();
        for name in events {
            let kind = EventKind::parse(name.trim())?;
            if !kinds.iter().any(|k| k == kind.as_str()) {
                kinds.push(kind.as_str().to_owned());
            }
        }
        match (ca_pem, parsed.tls) {
            (Some(_), false) => return Err(WebhookError::CaWithoutTls),
            (Some(pem), true) => {
                http_client::parse_ca_pem(pem)?;
            }
            (None, true) => {
                http_client::tls_with_system_roots()?;
            }
            (None, false) => {}
        }
        if self.store.webhooks()?.len() >= MAX_TARGETS {
            return Err(WebhookError::TooMany);
        }
        let secret = gantry_certs::hex(&gantry_certs::random_bytes::<32>());
        // The URL's path can itself be a credential (Slack's are), so the audit log
        // names only where deliveries go.
        let detail = format!(
            "host={} format={} events={kinds:?} custom_ca={}",
            parsed.host_header(),
            format.as_str(),
            ca_pem.is_some()
        );
        let record = self.store.add_webhook(
            |id| {
                let sealed_secret = self
                    .secret_key
                    .seal(&secret_name(id), secret.as_bytes())
                    .map_err(|e| StoreError::Engine {
                        op: "seal webhook secret",
                        detail: e.to_string(),
                    })?;
                Ok(WebhookRecord {
                    id,
                    url: url.to_owned(),
                    format,
                    events: kinds.clone(),
                    ca_pem: ca_pem.map(str::to_owned),
                    sealed_secret,
                    created_at: cx.now,
                    created_by: cx.actor.to_owned(),
                })
            },
            &cx.audit("webhook.add", detail),
        )?;
        Ok(WebhookAdded {
            webhook: self.view(&record),
            secret,
        })
    }

    /// `gantry webhooks list`: the targets with their recent deliveries.
    pub fn list(&self) -> Result<Vec<WebhookView>, WebhookError> {
        Ok(self
            .store
            .webhooks()?
            .iter()
            .map(|r| self.view(r))
            .collect())
    }

    /// `gantry webhooks rm`.
    pub fn remove(&self, cx: &Acting<'_>, id: u64) -> Result<String, WebhookError> {
        let removed = self
            .store
            .remove_webhook(id, &cx.audit("webhook.remove", format!("webhook={id}")))?;
        if !removed {
            return Err(WebhookError::NotFound(id));
        }
        lock(&self.log).remove(&id);
        Ok(format!("webhook {id} removed"))
    }
}

/// The name a target's secret is sealed under, so a sealed secret copied to another
/// target does not open.
fn secret_name(id: u64) -> String {
    format!("webhook:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            kind: EventKind::RunFinished,
            at: UnixMillis(1_700_000_000_000),
            summary: "Run 3 (app, main) failed <oops> & more".into(),
            facts: vec![("State".into(), "failed".into())],
            path: "/runs/3".into(),
            data: serde_json::json!({ "run": 3, "state": "failed" }),
        }
    }

    #[test]
    fn backoff_grows_by_three_with_jitter_and_stays_within_five_minutes() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff(1, base, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(1, base, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(2, base, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(3, base, 1.0), Duration::from_secs(90));
        assert_eq!(
            backoff(4, base, 1.0),
            Duration::from_secs(180),
            "capped at 18 × base"
        );
        assert_eq!(backoff(9, base, 1.0), Duration::from_secs(180));
        let worst: Duration = (1..5).map(|n| backoff(n, base, 1.0)).sum();
        assert!(worst <= Duration::from_secs(310), "{worst:?}");
        let r = backoff(2, base, 0.5);
        assert!(
            r > Duration::from_secs(15) && r < Duration::from_secs(30),
            "{r:?}"
        );
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(crate::services::triggers::verify_signature(
            b"Jefe",
            b"what do ya want for nothing?",
            Some(&sig)
        )
        .is_ok());
    }

    #[test]
    fn payloads_have_the_generic_and_the_slack_shape() {
        let json: serde_json::Value =
            serde_json::from_slice(&payload(WebhookFormat::Json, &event(), "d-1")).expect("json");
        assert_eq!(json["event"], "run.finished");
        assert_eq!(json["delivery"], "d-1");
        assert_eq!(json["at"], "2023-11-14T22:13:20Z");
        assert_eq!(json["data"]["run"], 3);
        let slack: serde_json::Value =
            serde_json::from_slice(&payload(WebhookFormat::Slack, &event(), "d-1")).expect("json");
        assert_eq!(slack["text"], "Run 3 (app, main) failed <oops> & more");
        let blocks = slack["blocks"].as_array().expect("blocks");
        assert_eq!(blocks[0]["type"], "section");
        assert_eq!(
            blocks[0]["text"]["text"], "*Run 3 (app, main) failed &lt;oops&gt; &amp; more*",
            "mrkdwn is escaped"
        );
        assert_eq!(blocks[1]["fields"][0]["text"], "*State*\nfailed");
        assert_eq!(blocks[2]["type"], "context");
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for s in [408, 425, 429, 500, 502, 503] {
            assert!(retryable(s), "{s}");
        }
        for s in [200, 301, 400, 401, 403, 404, 410] {
            assert!(!retryable(s), "{s}");
        }
    }
}
