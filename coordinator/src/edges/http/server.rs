//! The coordinator's HTTP side: the push webhook and a health check.
//!
//! A deliberately small HTTP/1.1 server (one request per connection, `Connection:
//! close`) with explicit bounds: 16 KiB of headers, 1 MiB of body, 10 s to send a
//! request. It speaks TLS with the coordinator certificate, or plain HTTP on loopback
//! addresses only (the rule is `distribute::http_uses_tls`); the TLS handshake has the
//! same 10 s.
//!
//! Routes: `POST /hooks/push` (signed with `GANTRY_WEBHOOK_SECRET`), `POST
//! /hooks/repos/NAME` (a registered repository's forge webhook, signed with its
//! `--webhook-secret`: `services::repos::hooks`), `GET /healthz`,
//! `GET /readyz` (the store answers and the data directory is above its low-space
//! watermark), `GET /metrics` (Prometheus text format), what
//! new hosts download (`/install.sh`, `/ca.pem`, `/agent/...`: `distribute.rs`), and
//! the web dashboard with its API and live streams (`/`, `/api/...`: `dashboard.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::base::authz::Request as Row;
use crate::edges::http::dashboard::Dashboard;
use crate::edges::http::distribute::Distribution;
use crate::edges::http::request::{read_request, Request, RequestError};
use crate::services::coordinator::Coordinator;
use crate::services::repos::hooks::HookOutcome;
use crate::services::triggers;

/// How long a client has for the TLS handshake, and then to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Serves until the listener fails; over TLS when `tls` is given.
pub async fn serve(
    coord: Arc<Coordinator>,
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    dist: Arc<Distribution>,
) {
    let dashboard = Arc::new(Dashboard::new(tls.is_some()));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let coord = coord.clone();
                let dist = dist.clone();
                let acceptor = acceptor.clone();
                let dashboard = dashboard.clone();
                tokio::spawn(async move {
                    let Some(acceptor) = acceptor else {
                        return handle(&coord, &dist, &dashboard, stream).await;
                    };
                    match tokio::time::timeout(REQUEST_DEADLINE, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => handle(&coord, &dist, &dashboard, tls_stream).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "https handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "https handshake took longer than 10 s"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!("http accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(
    coord: &Arc<Coordinator>,
    dist: &Distribution,
    dashboard: &Dashboard,
    mut stream: S,
) {
    let mut content_type = "application/json";
    let (status, body) = match tokio::time::timeout(REQUEST_DEADLINE, read_request(&mut stream))
        .await
    {
        Err(_) => (
            408,
            error_json("the request took longer than 10 s to arrive"),
        ),
        Ok(Err(RequestError::Incomplete)) => return,
        Ok(Err(e @ RequestError::BodyTooLarge)) => (413, error_json(&e.to_string())),
        Ok(Err(e @ RequestError::HeadersTooLarge)) => (431, error_json(&e.to_string())),
        Ok(Err(e)) => (400, error_json(&e.to_string())),
        Ok(Ok(req)) => {
            if dashboard.handle(coord, &req, &mut stream).await {
                return;
            }
            // Every other route is a row of the authorization table too.
            let refused = row_of(&req.path).and_then(|row| {
                let principal = dashboard.principal(coord, &req);
                coord
                    .metrics
                    .authz
                    .check(row, principal, String::new)
                    .err()
                    .map(|d| (principal, d))
            });
            if let Some((principal, denied)) = refused {
                let status = if principal == crate::base::authz::Principal::None {
                    401
                } else {
                    403
                };
                let body = error_json(&denied.to_string());
                let response = format!("HTTP/1.1 {status} Refused\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            }
            if let Some(response) = dist.route(&req).await {
                if let Err(e) = response.write(&mut stream).await {
                    tracing::debug!("http response to {} not delivered: {e}", req.path);
                }
                return;
            }
            if let Some(name) = req.path.strip_prefix(REPO_HOOKS) {
                repo_hook(coord, name, &req).await
            } else {
                if req.path == "/metrics" {
                    // The Prometheus text exposition format, version 0.0.4.
                    content_type = "text/plain; version=0.0.4; charset=utf-8";
                }
                route(coord, &req)
            }
        }
    };
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let response = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The authorization table's row of a path served here or by `distribute.rs` (the
/// dashboard's are `crate::edges::http::dashboard::row_of`'s).
pub fn row_of(path: &str) -> Option<Row> {
    use Row as R;
    Some(match path {
        "/healthz" => R::HttpHealthz,
        "/readyz" => R::HttpReadyz,
        "/metrics" => R::HttpMetrics,
        "/hooks/push" => R::HttpPushHook,
        p if p.starts_with(REPO_HOOKS) => R::HttpRepoHook,
        "/install.sh" => R::HttpInstallScript,
        "/ca.pem" => R::HttpCaPem,
        "/agent/gantry-agent" => R::HttpAgentBinary,
        "/agent/gantry-agent.service" => R::HttpAgentUnit,
        "/agent/agent.env" => R::HttpAgentEnv,
        _ => return None,
    })
}

/// Where a registered repository's forge webhook is delivered: this, then its name.
const REPO_HOOKS: &str = "/hooks/repos/";

/// `POST /hooks/repos/NAME`: a forge's delivery for one repository; 202 with the run
/// started, 200 with why nothing started, or the refusal's status and reason.
async fn repo_hook(coord: &Coordinator, name: &str, req: &Request) -> (u16, String) {
    if req.method != "POST" {
        return (
            405,
            error_json("method not allowed: forges POST their webhooks"),
        );
    }
    match coord.repos.deliver(name, &req.headers, &req.body).await {
        Ok(HookOutcome::Started(run)) => (
            202,
            serde_json::json!({ "run": run.run.0, "commit": run.commit }).to_string(),
        ),
        Ok(HookOutcome::Nothing(reason)) => (
            200,
            serde_json::json!({ "run": null, "note": reason }).to_string(),
        ),
        Err(e) => {
            tracing::warn!(repo = name, "repository webhook refused: {e}");
            (e.http_status(), error_json(&e.to_string()))
        }
    }
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn route(coord: &Coordinator, req: &Request) -> (u16, String) {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => (200, serde_json::json!({ "status": "ok" }).to_string()),
        ("GET", "/readyz") => {
            if !coord.ready() {
                (503, error_json("the store does not answer"))
            } else if let Err(low) = coord.disk.check() {
                (503, error_json(&low.to_string()))
            } else {
                (200, serde_json::json!({ "status": "ready" }).to_string())
            }
        }
        ("GET", "/metrics") => (200, coord.render_metrics()),
        ("POST", "/hooks/push") => push_hook(coord, req),
        (_, "/hooks/push" | "/healthz") => (405, error_json("method not allowed")),
        _ => (
            404,
            error_json(
                "no such route; try GET /healthz, /metrics, /install.sh or POST /hooks/push",
            ),
        ),
    }
}

fn push_hook(coord: &Coordinator, req: &Request) -> (u16, String) {
    let Some(secret) = coord.secrets.value(triggers::WEBHOOK_SECRET) else {
        return (
            503,
            error_json(
                "webhooks are off: set the secret with `gantry secrets set GANTRY_WEBHOOK_SECRET`",
            ),
        );
    };
    let signature = req
        .header("x-hub-signature-256")
        .or_else(|| req.header("x-gitea-signature"));
    if let Err(e) = triggers::verify_signature(secret.as_bytes(), &req.body, signature) {
        tracing::warn!("webhook refused: {e}");
        return (401, error_json(&e.to_string()));
    }
    if req
        .header("x-github-event")
        .or_else(|| req.header("x-gitea-event"))
        .is_some_and(|e| e == "ping")
    {
        return (200, serde_json::json!({ "pong": true }).to_string());
    }
    match triggers::parse_push(&req.body) {
        Err(e) => (400, error_json(&e.to_string())),
        Ok(None) => (
            200,
            serde_json::json!({ "runs": [], "note": "branch deletion: nothing to run" })
                .to_string(),
        ),
        Ok(Some(push)) => {
            let (runs, problems) = coord.triggers.fire_push(&push);
            tracing::info!(git_ref = %push.git_ref, runs = runs.len(), "push webhook");
            (202, serde_json::json!({ "runs": runs.iter().map(|r| r.0).collect::<Vec<_>>(), "problems": problems }).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row the table says the HTTP side serves is served by the router that says
    /// so, and nothing else claims it.
    #[test]
    fn every_http_row_of_the_authorization_table_is_routed_to_its_row() {
        for row in Row::ALL {
            let Some((method, template)) = row.http_route() else {
                continue;
            };
            let path = template.replace("{run}", "7").replace("{job}", "7.1");
            let found =
                crate::edges::http::dashboard::row_of(method, &path).or_else(|| row_of(&path));
            assert_eq!(found, Some(*row), "{method} {path}");
            assert!(
                crate::edges::http::dashboard::row_of(method, &path).is_none()
                    || row_of(&path).is_none(),
                "{path} is claimed twice"
            );
        }
        // And every route either router knows has a row that says it is on HTTP.
        for (method, path) in [
            ("GET", "/login"),
            ("GET", "/runs/3"),
            ("GET", "/jobs/3.1"),
            ("GET", "/assets/style.css"),
            ("GET", "/api/runs?limit=5"),
        ] {
            let row = crate::edges::http::dashboard::row_of(method, path).expect(path);
            assert!(row.http_route().is_some(), "{path}: {row}");
        }
    }
}
