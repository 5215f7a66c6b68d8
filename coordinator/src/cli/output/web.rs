//! Dashboard login tokens and webhook targets as tables, and as JSON.

use std::fmt::Write as _;

use gantry_protocol::{AdminResponse, UnixMillis};

use crate::cli::output::table::{human_duration, rfc3339, rows_of, table};

/// The JSON of this module's responses (`None` for others).
pub fn json(resp: &AdminResponse) -> Option<Result<serde_json::Value, serde_json::Error>> {
    Some(match resp {
        AdminResponse::LoginTokenCreated(t) => serde_json::to_value(t),
        AdminResponse::LoginTokens(t) => serde_json::to_value(t),
        AdminResponse::WebhookAdded(w) => serde_json::to_value(w),
        AdminResponse::Webhooks(w) => serde_json::to_value(w),
        _ => return None,
    })
}

/// The text of this module's responses (`None` for others).
pub fn text(resp: &AdminResponse, now: UnixMillis) -> Option<String> {
    Some(match resp {
        AdminResponse::LoginTokenCreated(t) => {
            eprintln!(
                "login token {} for {} ({}), expires {}; it is shown only now: paste it into the dashboard's login page",
                t.id,
                t.name,
                t.role,
                rfc3339(t.expires_at)
            );
            format!("{}\n", t.token)
        }
        AdminResponse::LoginTokens(tokens) => {
            let headers = ["ID", "NAME", "ROLE", "CREATED BY", "EXPIRES", "STATE"];
            let rows = rows_of(&headers, tokens, |t| {
                let state = match t.revoked_at {
                    Some(at) => format!("revoked {}", rfc3339(at)),
                    None if t.expires_at <= now => "expired".into(),
                    None => format!("valid for {}", human_duration(t.expires_at.millis_since(now))),
                };
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.role.to_string(),
                    t.created_by.clone(),
                    rfc3339(t.expires_at),
                    state,
                ]
            });
            table(&rows)
        }
        AdminResponse::WebhookAdded(w) => format!(
            "webhook {} added: {} ({})\nsecret: {}\nThe secret is shown only now. Receivers check `X-Gantry-Signature: sha256=<hex>`, the HMAC-SHA256 of the body keyed with it.\n",
            w.webhook.id,
            w.webhook.url,
            w.webhook.format.as_str(),
            w.secret
        ),
        AdminResponse::Webhooks(hooks) => {
            let headers = ["ID", "FORMAT", "EVENTS", "URL", "LAST DELIVERY"];
            let rows = rows_of(&headers, hooks, |w| {
                vec![
                    w.id.to_string(),
                    w.format.as_str().to_owned(),
                    if w.events.is_empty() {
                        "all".into()
                    } else {
                        w.events.join(",")
                    },
                    w.url.clone(),
                    w.deliveries.last().map_or_else(
                        || "-".into(),
                        |d| {
                            format!(
                                "{} ({} ago)",
                                d.outcome,
                                human_duration(now.millis_since(d.at))
                            )
                        },
                    ),
                ]
            });
            let mut out = table(&rows);
            for w in hooks.iter().filter(|w| !w.deliveries.is_empty()) {
                let _ = write!(out, "\nwebhook {} deliveries (newest last):\n", w.id);
                for d in &w.deliveries {
                    let _ = writeln!(
                        out,
                        "  {}  {:<13} attempt {}  {:<9} {:>4}  {:>6}  {}",
                        rfc3339(d.at),
                        d.event,
                        d.attempt,
                        d.outcome,
                        d.status.map_or_else(|| "-".into(), |s| s.to_string()),
                        human_duration(d.duration_ms),
                        d.error.as_deref().unwrap_or("")
                    );
                }
            }
            out
        }
        _ => return None,
    })
}
