//! What starts runs besides `gantry run`: the push webhook and cron schedules, and the
//! registered pipelines they start (`gantry triggers add|list|rm`).
//!
//! Owns: checking a webhook's HMAC-SHA256 signature (GitHub's `X-Hub-Signature-256` or
//! Gitea's `X-Gitea-Signature`) against the `GANTRY_WEBHOOK_SECRET` secret, reading a
//! GitHub/Gitea-style push payload, matching it against registered pipelines' `on.push`
//! filters, and firing registered pipelines' `on.schedule` cron expressions. Runs are
//! submitted through the same path as `gantry run`, so they are stored before any
//! answer is given.

use std::sync::Arc;
use std::time::Duration;

use gantry_protocol::{AdminErrorKind, Labels, RunId, SubmitRun, TriggerView, UnixMillis};
use ring::hmac;

use crate::base::audit::Acting;
use crate::base::error::AdminFailure;
use crate::services::runs::Runs;
use crate::store::{Store, StoreError, TriggerRecord};

/// The secret that signs webhooks, stored with `gantry secrets set`.
pub const WEBHOOK_SECRET: &str = "GANTRY_WEBHOOK_SECRET";
/// How often schedules are checked; cron has one-minute resolution.
pub const SCHEDULE_TICK: Duration = Duration::from_secs(10);

/// A push, as the webhook payload describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Full ref, `refs/heads/main` or `refs/tags/v1.2`.
    pub git_ref: String,
    pub commit: Option<String>,
    /// Paths added, modified or removed by the pushed commits.
    pub changed_paths: Vec<String>,
}

/// Why a webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no signature: send X-Hub-Signature-256 (sha256=<hex>) or X-Gitea-Signature (<hex>)")]
    Unsigned,
    #[error("the signature does not match the body and the webhook secret")]
    BadSignature,
    #[error("the payload is not a push event: {0}")]
    Payload(String),
}

/// Checks the HMAC-SHA256 signature of `body`. `signature` is the header value, with or
/// without the `sha256=` prefix.
pub fn verify_signature(
    secret: &[u8],
    body: &[u8],
    signature: Option<&str>,
) -> Result<(), WebhookError> {
    let hex = signature.ok_or(WebhookError::Unsigned)?.trim();
    let hex = hex.strip_prefix("sha256=").unwrap_or(hex);
    let tag = decode_hex(hex).ok_or(WebhookError::BadSignature)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, body, &tag).map_err(|_| WebhookError::BadSignature)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads a GitHub/Gitea push payload. A branch deletion (the new commit all zeros) is
/// `Ok(None)`: nothing to build.
pub fn parse_push(body: &[u8]) -> Result<Option<Push>, WebhookError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::Payload(e.to_string()))?;
    let git_ref = value["ref"]
        .as_str()
        .ok_or_else(|| WebhookError::Payload("no \"ref\" field".into()))?;
    if !git_ref.starts_with("refs/heads/") && !git_ref.starts_with("refs/tags/") {
        return Err(WebhookError::Payload(format!(
            "ref {git_ref:?} is neither a branch nor a tag"
        )));
    }
    let commit = value["after"].as_str().map(str::to_owned);
    if commit
        .as_deref()
        .is_some_and(|c| !c.is_empty() && c.bytes().all(|b| b == b'0'))
        || value["deleted"].as_bool() == Some(true)
    {
        return Ok(None);
    }
    let mut changed_paths = Vec::new();
    for commit in value["commits"].as_array().into_iter().flatten() {
        for key in ["added", "modified", "removed"] {
            for path in commit[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
            {
                if !changed_paths.iter().any(|p| p == path) {
                    changed_paths.push(path.to_owned());
                }
            }
        }
    }
    Ok(Some(Push {
        git_ref: git_ref.to_owned(),
        commit,
        changed_paths,
    }))
}

/// `main` for `refs/heads/main`, `v1` for `refs/tags/v1`.
pub fn short_ref(full: &str) -> &str {
    full.strip_prefix("refs/heads/")
        .or_else(|| full.strip_prefix("refs/tags/"))
        .unwrap_or(full)
}

/// Why a trigger request failed.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error(transparent)]
    Pipeline(#[from] gantry_pipeline::Errors),
    #[error("{0} has no on.push or on.schedule trigger, so registering it would never run it")]
    NoTrigger(String),
    #[error("no trigger {0}; `gantry triggers list` shows them")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminFailure for TriggerError {
    fn kind(&self) -> AdminErrorKind {
        match self {
            Self::Pipeline(_) | Self::NoTrigger(_) => AdminErrorKind::InvalidInput,
            Self::NotFound(_) => AdminErrorKind::NotFound,
            Self::Store(_) => AdminErrorKind::Internal,
        }
    }
}

/// The triggers service; one per coordinator.
#[derive(Debug)]
pub struct Triggers {
    store: Arc<Store>,
    runs: Arc<Runs>,
}

impl Triggers {
    pub fn new(store: Arc<Store>, runs: Arc<Runs>) -> Self {
        Self { store, runs }
    }

    /// `gantry triggers add`: registers a pipeline that has a push or schedule trigger.
    pub fn add(
        &self,
        cx: &Acting<'_>,
        file_name: String,
        text: String,
    ) -> Result<TriggerView, TriggerError> {
        let pipeline = gantry_pipeline::parse(&file_name, &text)?;
        if pipeline.triggers.push.is_none() && pipeline.triggers.schedules.is_empty() {
            return Err(TriggerError::NoTrigger(file_name));
        }
        let record = TriggerRecord {
            name: pipeline.name.clone(),
            file_name,
            text,
            added_by: cx.actor.to_owned(),
            added_at: cx.now,
            schedule_checked_until: cx.now.0 / 1000,
        };
        self.store.put_trigger(
            &record,
            Some(&cx.audit("trigger.add", format!("pipeline={}", record.name))),
        )?;
        Ok(trigger_view(&record))
    }

    /// `gantry triggers list`.
    pub fn list(&self) -> Result<Vec<TriggerView>, TriggerError> {
        Ok(self.store.triggers()?.iter().map(trigger_view).collect())
    }

    /// `gantry triggers rm`.
    pub fn remove(&self, cx: &Acting<'_>, name: &str) -> Result<String, TriggerError> {
        if self.store.remove_trigger(
            name,
            &cx.audit("trigger.remove", format!("pipeline={name}")),
        )? {
            Ok(format!("trigger {name} removed"))
        } else {
            Err(TriggerError::NotFound(name.to_owned()))
        }
    }

    /// Starts a run of every registered pipeline whose push filter matches. Returns the runs
    /// (stored before this returns) and, for each pipeline that could not start, why.
    pub fn fire_push(&self, push: &Push) -> (Vec<RunId>, Vec<String>) {
        let mut runs = Vec::new();
        let mut problems = Vec::new();
        let triggers = match self.store.triggers() {
            Ok(t) => t,
            Err(e) => return (runs, vec![e.to_string()]),
        };
        for t in triggers {
            let Ok(pipeline) = gantry_pipeline::parse(&t.file_name, &t.text) else {
                continue;
            };
            let matches = pipeline
                .triggers
                .push
                .as_ref()
                .is_some_and(|f| f.matches(&push.git_ref, &push.changed_paths));
            if !matches {
                continue;
            }
            let submit = SubmitRun {
                file_name: t.file_name.clone(),
                text: t.text.clone(),
                git_ref: short_ref(&push.git_ref).to_owned(),
                commit: push.commit.clone(),
                event: "push".into(),
                inputs: Labels::new(),
                source: None,
            };
            let cx = Acting::new("gantry://trigger/push", UnixMillis::now());
            match self.runs.submit(&cx, &submit) {
                Ok(view) => runs.push(view.run),
                Err(e) => problems.push(format!("{}: {e}", t.name)),
            }
        }
        (runs, problems)
    }

    /// Fires schedules forever: each registered pipeline whose cron expression had a
    /// firing since it was last checked gets one run. After downtime, missed firings
    /// collapse into one catch-up run, not one per missed minute.
    pub async fn schedule_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SCHEDULE_TICK);
        loop {
            tick.tick().await;
            let now_secs = UnixMillis::now().0 / 1000;
            let triggers = match self.store.triggers() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("cannot read triggers: {e}");
                    continue;
                }
            };
            for mut t in triggers {
                let Ok(pipeline) = gantry_pipeline::parse(&t.file_name, &t.text) else {
                    continue;
                };
                if pipeline.triggers.schedules.is_empty() {
                    continue;
                }
                let due = pipeline.triggers.schedules.iter().any(|c| {
                    c.next_after(t.schedule_checked_until)
                        .is_some_and(|at| at <= now_secs)
                });
                if due {
                    let submit = SubmitRun {
                        file_name: t.file_name.clone(),
                        text: t.text.clone(),
                        git_ref: "main".into(),
                        commit: None,
                        event: "schedule".into(),
                        inputs: Labels::new(),
                        source: None,
                    };
                    let cx = Acting::new("gantry://trigger/schedule", UnixMillis::now());
                    match self.runs.submit(&cx, &submit) {
                        Ok(view) => {
                            tracing::info!(run = %view.run, pipeline = %t.name, "scheduled run started");
                        }
                        Err(e) => {
                            tracing::warn!(pipeline = %t.name, "scheduled run refused: {e}");
                        }
                    }
                }
                t.schedule_checked_until = now_secs;
                if let Err(e) = self.store.put_trigger(&t, None) {
                    tracing::warn!("cannot record the schedule check: {e}");
                }
            }
        }
    }
}

/// A registered pipeline as admins see it: its push filter and schedules.
fn trigger_view(t: &TriggerRecord) -> TriggerView {
    let parsed = gantry_pipeline::parse(&t.file_name, &t.text).ok();
    TriggerView {
        name: t.name.clone(),
        file_name: t.file_name.clone(),
        push: parsed
            .as_ref()
            .and_then(|p| p.triggers.push.as_ref())
            .map(|f| {
                format!(
                    "branches={:?} tags={:?} paths={:?}",
                    f.branches, f.tags, f.paths
                )
            }),
        schedules: parsed
            .map(|p| {
                p.triggers
                    .schedules
                    .iter()
                    .map(|c| c.expression.clone())
                    .collect()
            })
            .unwrap_or_default(),
        added_by: t.added_by.clone(),
        added_at: t.added_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body);
        format!("sha256={}", gantry_certs::hex(tag.as_ref()))
    }

    #[test]
    fn signatures_verify_only_for_the_right_secret_and_body() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = sign(b"s3cret", body);
        assert_eq!(verify_signature(b"s3cret", body, Some(&sig)), Ok(()));
        assert_eq!(
            verify_signature(b"s3cret", body, Some(sig.trim_start_matches("sha256="))),
            Ok(()),
            "Gitea sends bare hex"
        );
        assert_eq!(
            verify_signature(b"other", body, Some(&sig)),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"s3cret", b"tampered", Some(&sig)),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"s3cret", body, None),
            Err(WebhookError::Unsigned)
        );
        assert_eq!(
            verify_signature(b"s3cret", body, Some("sha256=zz")),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn push_payloads_are_read_and_deletions_ignored() {
        let body = br#"{"ref":"refs/heads/main","after":"abc123","commits":[{"added":["src/a.rs"],"modified":["README.md"],"removed":[]},{"modified":["src/a.rs"]}]}"#;
        let push = parse_push(body).expect("ok").expect("a push");
        assert_eq!(push.git_ref, "refs/heads/main");
        assert_eq!(push.commit.as_deref(), Some("abc123"));
        assert_eq!(push.changed_paths, vec!["src/a.rs", "README.md"]);
        assert_eq!(short_ref(&push.git_ref), "main");
        assert_eq!(short_ref("refs/tags/v1.0"), "v1.0");
        let deletion =
            br#"{"ref":"refs/heads/old","after":"0000000000000000000000000000000000000000"}"#;
        assert_eq!(parse_push(deletion).expect("ok"), None);
        assert!(matches!(
            parse_push(b"not json"),
            Err(WebhookError::Payload(_))
        ));
        assert!(matches!(
            parse_push(br#"{"ref":"refs/pull/1/head"}"#),
            Err(WebhookError::Payload(_))
        ));
    }
}
