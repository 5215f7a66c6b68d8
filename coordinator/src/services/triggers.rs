//! What starts runs besides `gantry run`: the push webhook and cron schedules.
//!
//! Owns: checking a webhook's HMAC-SHA256 signature (GitHub's `X-Hub-Signature-256` or
//! Gitea's `X-Gitea-Signature`) against the `GANTRY_WEBHOOK_SECRET` secret, reading a
//! GitHub/Gitea-style push payload, matching it against registered pipelines' `on.push`
//! filters, and firing registered pipelines' `on.schedule` cron expressions. Runs are
//! submitted through the same path as `gantry run`, so they are stored before any
//! answer is given.

use std::sync::Arc;
use std::time::Duration;

use gantry_protocol::{Labels, RunId, SubmitRun, UnixMillis};
use ring::hmac;

use crate::quic::Coordinator;

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

/// Starts a run of every registered pipeline whose push filter matches. Returns the runs
/// (stored before this returns) and, for each pipeline that could not start, why.
pub fn fire_push(coord: &Coordinator, push: &Push) -> (Vec<RunId>, Vec<String>) {
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    let triggers = match coord.store.triggers() {
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
        match crate::runs::submit_run(coord, "gantry://trigger/push", submit) {
            Ok(view) => runs.push(view.run),
            Err(e) => problems.push(format!("{}: {}", t.name, e.message)),
        }
    }
    (runs, problems)
}

/// Fires schedules forever: each registered pipeline whose cron expression had a
/// firing since it was last checked gets one run. After downtime, missed firings
/// collapse into one catch-up run, not one per missed minute.
pub async fn schedule_loop(coord: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(SCHEDULE_TICK);
    loop {
        tick.tick().await;
        let now_secs = UnixMillis::now().0 / 1000;
        let triggers = match coord.store.triggers() {
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
                match crate::runs::submit_run(&coord, "gantry://trigger/schedule", submit) {
                    Ok(view) => {
                        tracing::info!(run = %view.run, pipeline = %t.name, "scheduled run started");
                    }
                    Err(e) => {
                        tracing::warn!(pipeline = %t.name, "scheduled run refused: {}", e.message);
                    }
                }
            }
            t.schedule_checked_until = now_secs;
            if let Err(e) = coord.store.put_trigger(&t, None) {
                tracing::warn!("cannot record the schedule check: {e}");
            }
        }
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
