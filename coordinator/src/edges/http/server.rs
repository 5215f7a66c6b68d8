//! The coordinator's HTTP side: the push webhook and a health check.
//!
//! A deliberately small HTTP/1.1 server (one request per connection, `Connection:
//! close`) with explicit bounds: 16 KiB of headers, 1 MiB of body, 10 s to send a
//! request. It speaks TLS with the coordinator certificate, or plain HTTP on loopback
//! addresses only (the rule is `distribute::http_uses_tls`); the TLS handshake has the
//! same 10 s.
//!
//! Routes: `POST /hooks/push` (signed with `GANTRY_WEBHOOK_SECRET`), `GET /healthz`,
//! `GET /readyz` (the store answers), `GET /metrics` (Prometheus text format), what
//! new hosts download (`/install.sh`, `/ca.pem`, `/agent/...`: `distribute.rs`), and
//! the web dashboard with its API and live streams (`/`, `/api/...`: `dashboard.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::distribute::Distribution;
use crate::quic::Coordinator;
use crate::triggers;

const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_BODY_BYTES: usize = 1024 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read; each maps to a status code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("headers larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("connection closed before the request was complete")]
    Incomplete,
}

/// Parses a request from `buf` if it is complete: `Ok(None)` means read more.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, RequestError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEADER_BYTES {
            Err(RequestError::HeadersTooLarge)
        } else {
            Ok(None)
        };
    };
    if head_end > MAX_HEADER_BYTES {
        return Err(RequestError::HeadersTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| RequestError::Malformed("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(format!(
            "bad request line {request_line:?}"
        )));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(RequestError::Malformed(format!(
            "unsupported version {version:?}"
        )));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| RequestError::Malformed(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let length = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| RequestError::Malformed("bad Content-Length".into()))?,
        None => 0,
    };
    if length > MAX_BODY_BYTES {
        return Err(RequestError::BodyTooLarge);
    }
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Ok(None);
    }
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: buf[body_start..body_start + length].to_vec(),
    }))
}

/// Serves until the listener fails; over TLS when `tls` is given.
pub async fn serve(
    coord: Arc<Coordinator>,
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    dist: Arc<Distribution>,
) {
    let dashboard = Arc::new(crate::dashboard::Dashboard::new(tls.is_some()));
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

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(4096);
    let mut piece = [0u8; 8192];
    loop {
        if let Some(req) = parse_request(&buf)? {
            return Ok(req);
        }
        let n = stream
            .read(&mut piece)
            .await
            .map_err(|e| RequestError::Malformed(e.to_string()))?;
        if n == 0 {
            return Err(RequestError::Incomplete);
        }
        buf.extend_from_slice(&piece[..n]);
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(
    coord: &Arc<Coordinator>,
    dist: &Distribution,
    dashboard: &crate::dashboard::Dashboard,
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
            if req.path == "/metrics" {
                // The Prometheus text exposition format, version 0.0.4.
                content_type = "text/plain; version=0.0.4; charset=utf-8";
            }
            route(coord, &req)
        }
    };
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let response = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The authorization table's row of a path served here or by `distribute.rs` (the
/// dashboard's are `dashboard::row_of`'s).
pub fn row_of(path: &str) -> Option<crate::base::authz::Request> {
    use crate::base::authz::Request as R;
    Some(match path {
        "/healthz" => R::HttpHealthz,
        "/readyz" => R::HttpReadyz,
        "/metrics" => R::HttpMetrics,
        "/hooks/push" => R::HttpPushHook,
        "/install.sh" => R::HttpInstallScript,
        "/ca.pem" => R::HttpCaPem,
        "/agent/gantry-agent" => R::HttpAgentBinary,
        "/agent/gantry-agent.service" => R::HttpAgentUnit,
        "/agent/agent.env" => R::HttpAgentEnv,
        _ => return None,
    })
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn route(coord: &Coordinator, req: &Request) -> (u16, String) {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => (200, serde_json::json!({ "status": "ok" }).to_string()),
        ("GET", "/readyz") => {
            if coord.ready() {
                (200, serde_json::json!({ "status": "ready" }).to_string())
            } else {
                (503, error_json("the store does not answer"))
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
    let Some(secret) = coord.outbox_secret(triggers::WEBHOOK_SECRET) else {
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
            let (runs, problems) = triggers::fire_push(coord, &push);
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
        use crate::base::authz::Request as R;
        for row in R::ALL {
            let Some((method, template)) = row.http_route() else {
                continue;
            };
            let path = template.replace("{run}", "7").replace("{job}", "7.1");
            let found = crate::dashboard::row_of(method, &path).or_else(|| row_of(&path));
            assert_eq!(found, Some(*row), "{method} {path}");
            assert!(
                crate::dashboard::row_of(method, &path).is_none() || row_of(&path).is_none(),
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
            let row = crate::dashboard::row_of(method, path).expect(path);
            assert!(row.http_route().is_some(), "{path}: {row}");
        }
    }

    #[test]
    fn requests_parse_incrementally_and_limits_hold() {
        let raw = b"POST /hooks/push HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Hub-Signature-256: sha256=ab\r\n\r\nhello";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw[..cut]), Ok(None), "incomplete at {cut}");
        }
        let req = parse_request(raw).expect("ok").expect("complete");
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice()),
            ("POST", "/hooks/push", &b"hello"[..])
        );
        assert_eq!(req.header("x-hub-signature-256"), Some("sha256=ab"));
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(
            parse_request(big.as_bytes()),
            Err(RequestError::BodyTooLarge)
        );
        assert_eq!(
            parse_request(&vec![b'a'; MAX_HEADER_BYTES + 1]),
            Err(RequestError::HeadersTooLarge)
        );
        assert!(matches!(
            parse_request(b"GARBAGE\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"GET / SPDY/3\r\n\r\n"),
            Err(RequestError::Malformed(_))
        ));
    }
}
