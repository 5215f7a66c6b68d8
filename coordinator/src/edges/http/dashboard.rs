//! The web dashboard on the HTTP side: its pages (HTML, CSS and vanilla JavaScript
//! compiled into the binary, no build step, no external asset), the JSON API they
//! read, and live updates as Server-Sent Events.
//!
//! Owns routing of `/`, `/login`, `/agents`, `/runs/...`, `/jobs/...`, `/deployments`,
//! `/assets/...` and `/api/...`. Reads go through the coordinator's admin request
//! handling (the admin router (`admin::answer`)), so the dashboard shows exactly what
//! `gantry ... --json` shows; changes (retry, cancel, approve) go through it too, as
//! the logged-in user, where the authorization table decides. Every route is a row of
//! that table (`gantry_protocol::authz`): a route that issues an admin request is that
//! request's row, asked by the admin router (`admin::answer`); the others are asked here. Live streams reuse the follow machinery
//! of the runs service (`follow_logs`, `follow_run`), the same the CLI's `--follow` uses.
//!
//! Limits: requests as `request.rs` bounds them (16 KiB head, 1 MiB body, 10 s to
//! arrive); at most [`MAX_STREAMS`] live streams at once (more get 503 and the page
//! tries again 5 s later); a stream lasts at most [`STREAM_LIFETIME`] (the browser
//! reconnects, resuming the log from `Last-Event-ID`); a keep-alive comment every
//! [`KEEPALIVE`]; a client that does not take an event within [`WRITE_DEADLINE`] is
//! cut off, and one that closes its connection frees its slot at once;
//! [`STREAM_BUFFER`] events are buffered per stream.

use std::sync::Arc;
use std::time::Duration;

use gantry_protocol::{
    AdminErrorKind, AdminRequest, AdminResponse, FollowEvent, JobId, RunId, UnixMillis,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use crate::admin;
use crate::base::authz::{Principal, Request as Row};
use crate::edges::http::auth::{self, Denied, User};
use crate::edges::http::request::Request;
use crate::services::coordinator::Coordinator;
use crate::services::runs::follow::FollowSink;

/// Live streams (job logs, run progress) open at once. A browser tab holds one.
pub const MAX_STREAMS: usize = 64;
/// Longest a live stream stays open before the browser is told to reconnect.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(3600);
/// How often an idle stream sends a comment, so dead clients and idle proxies notice.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// How long one event may take to write before the client is cut off.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Events buffered per stream between the follower and the socket.
pub const STREAM_BUFFER: usize = 256;
/// Most runs one listing returns.
const MAX_RUNS: u32 = 200;

const INDEX_HTML: &str = include_str!("../../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../../assets/dashboard/style.css");

/// Every page and asset is ours: no CDN, no inline script, nothing framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Deployments, newest first (at most 100), with their per-host states; logs are left
/// out (`gantry deployments show ID` has them).
pub fn deployments(coord: &Coordinator) -> Vec<serde_json::Value> {
    coord
        .store
        .deployments(100, false)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| {
            let mut view = d.view();
            view.log.clear();
            serde_json::to_value(view).ok()
        })
        .collect()
}

/// The dashboard's state on the HTTP side.
#[derive(Debug)]
pub struct Dashboard {
    sessions: auth::Sessions,
    scheme: &'static str,
    streams: Arc<Semaphore>,
}

/// One answer.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    fn denied(d: &Denied) -> Self {
        Self::error(d.status(), &d.to_string())
    }

    fn asset(content_type: &'static str, body: &str) -> Self {
        Self {
            status: 200,
            content_type,
            body: body.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    }
}

async fn write_reply<S: AsyncWrite + Unpin>(stream: &mut S, reply: Reply) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nContent-Security-Policy: {CSP}\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&reply.body).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(WRITE_DEADLINE, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the client took longer than 10 s to read",
            ))
        })
    {
        tracing::debug!("dashboard reply not delivered: {e}");
    }
}

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Page,
    Asset(&'static str, &'static str),
    Login,
    Logout,
    Me,
    Agents,
    Runs { limit: u32 },
    Run(RunId),
    RunEvents(RunId),
    RetryRun(RunId),
    CancelRun(RunId),
    Job(JobId),
    JobLog(JobId),
    Approve(JobId),
    Deployments,
    NotFound,
}

impl Route {
    /// The route's row in the authorization table; `None` for a path that names nothing.
    fn row(self) -> Option<Row> {
        Some(match self {
            Self::Page => Row::HttpPage,
            Self::Asset(..) => Row::HttpAsset,
            Self::Login => Row::HttpLogin,
            Self::Logout => Row::HttpLogout,
            Self::Me => Row::HttpMe,
            Self::Agents => Row::AdminListAgents,
            Self::Runs { .. } => Row::AdminListRuns,
            Self::Run(_) => Row::AdminShowRun,
            Self::RunEvents(_) => Row::HttpRunEvents,
            Self::RetryRun(_) => Row::AdminRetryRun,
            Self::CancelRun(_) => Row::AdminCancelRun,
            Self::Job(_) => Row::AdminShowJob,
            Self::JobLog(_) => Row::HttpJobLog,
            Self::Approve(_) => Row::AdminApprove,
            Self::Deployments => Row::HttpDeployments,
            Self::NotFound => return None,
        })
    }
}

/// The authorization table's row of a dashboard request, if the path is the
/// dashboard's and names something.
#[cfg(test)]
pub fn row_of(method: &str, target: &str) -> Option<Row> {
    route(method, target)?.ok()?.row()
}

/// The status of a refusal: 401 asks for a login, 403 says the login is not enough.
fn refusal_status(principal: Principal) -> u16 {
    if principal == Principal::None {
        401
    } else {
        403
    }
}

/// Maps method and path to a route; `None` when the path is not the dashboard's.
fn route(method: &str, target: &str) -> Option<Result<Route, (u16, String)>> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let page = path == "/"
        || path == "/login"
        || path == "/agents"
        || path == "/runs"
        || path == "/deployments"
        || path.starts_with("/runs/")
        || path.starts_with("/jobs/");
    let get = method == "GET" || method == "HEAD";
    let need = |wanted: bool, allowed: &str, r: Route| {
        if wanted {
            Ok(r)
        } else {
            Err((405, format!("method not allowed: use {allowed}")))
        }
    };
    if page {
        return Some(need(get, "GET", Route::Page));
    }
    let asset = match path {
        "/assets/app.js" => Some(Route::Asset("text/javascript; charset=utf-8", APP_JS)),
        "/assets/style.css" => Some(Route::Asset("text/css; charset=utf-8", STYLE_CSS)),
        _ => None,
    };
    if let Some(a) = asset {
        return Some(need(get, "GET", a));
    }
    let rest = path.strip_prefix("/api/")?;
    // HEAD is for pages and assets; an API read (or a live stream) is a GET.
    let get = method == "GET";
    let post = method == "POST";
    let parts: Vec<&str> = rest.split('/').collect();
    let run = |s: &str| s.parse::<RunId>().map_err(|e| (404, e.to_string()));
    let job = |s: &str| s.parse::<JobId>().map_err(|e| (404, e.to_string()));
    Some((|| match parts.as_slice() {
        ["login"] => need(post, "POST", Route::Login),
        ["logout"] => need(post, "POST", Route::Logout),
        ["me"] => need(get, "GET", Route::Me),
        ["agents"] => need(get, "GET", Route::Agents),
        ["deployments"] => need(get, "GET", Route::Deployments),
        ["runs"] => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .map_or(Ok(50), str::parse::<u32>)
                .map_err(|_| (400, "limit must be a number".to_owned()))?
                .clamp(1, MAX_RUNS);
            need(get, "GET", Route::Runs { limit })
        }
        [r] if !r.is_empty() => Err((404, format!("no such API route /api/{rest}"))),
        ["runs", r] => need(get, "GET", Route::Run(run(r)?)),
        ["runs", r, "events"] => need(get, "GET", Route::RunEvents(run(r)?)),
        ["runs", r, "retry"] => need(post, "POST", Route::RetryRun(run(r)?)),
        ["runs", r, "cancel"] => need(post, "POST", Route::CancelRun(run(r)?)),
        ["jobs", j] => need(get, "GET", Route::Job(job(j)?)),
        ["jobs", j, "log"] => need(get, "GET", Route::JobLog(job(j)?)),
        ["jobs", j, "approve"] => need(post, "POST", Route::Approve(job(j)?)),
        _ => Ok(Route::NotFound),
    })())
}

impl Dashboard {
    pub fn new(tls: bool) -> Self {
        Self {
            sessions: auth::Sessions::default(),
            scheme: if tls { "https" } else { "http" },
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }

    /// Who made `req`, as the authorization table knows principals: `none` without a
    /// credential, or with one refused (the caller decides whether that matters).
    pub fn principal(&self, coord: &Coordinator, req: &Request) -> Principal {
        auth::identify(&coord.store, &self.sessions, req, UnixMillis::now())
            .ok()
            .flatten()
            .map_or(Principal::None, |u| u.principal())
    }

    /// Answers `req` if its path is the dashboard's; `false` leaves it to others.
    pub async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        coord: &Arc<Coordinator>,
        req: &Request,
        stream: &mut S,
    ) -> bool {
        let Some(route) = route(&req.method, &req.path) else {
            return false;
        };
        let reply = match route {
            Err((status, message)) => Reply::error(status, &message),
            Ok(Route::Login) => self.login(coord, req),
            Ok(route) => match self.authorize(coord, req, route) {
                Err(reply) => reply,
                Ok(user) => match route {
                    Route::Page => Reply::asset("text/html; charset=utf-8", INDEX_HTML),
                    Route::Asset(content_type, body) => Reply::asset(content_type, body),
                    Route::RunEvents(run) => {
                        return self.stream(coord, stream, Live::Run(run)).await;
                    }
                    Route::JobLog(job) => {
                        let from = req
                            .header("last-event-id")
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0);
                        return self.stream(coord, stream, Live::Job(job, from)).await;
                    }
                    other => self.api(coord, req, user.as_ref(), other).await,
                },
            },
        };
        let reply = if req.method == "HEAD" {
            Reply {
                body: Vec::new(),
                ..reply
            }
        } else {
            reply
        };
        write_reply(stream, reply).await;
        true
    }

    /// Identifies the caller and, for a route that is not an admin request (those are
    /// asked by the admin router (`admin::answer`)), asks the authorization table.
    fn authorize(
        &self,
        coord: &Coordinator,
        req: &Request,
        route: Route,
    ) -> Result<Option<User>, Reply> {
        let row = route.row();
        let user = match auth::identify(&coord.store, &self.sessions, req, UnixMillis::now()) {
            Ok(user) => user,
            // A refused credential on a public row is no credential.
            Err(_) if row.is_some_and(|r| r.allows(Principal::None)) => None,
            Err(d) => return Err(Reply::denied(&d)),
        };
        let principal = user.as_ref().map_or(Principal::None, User::principal);
        match row {
            // An admin request's row is asked by the admin router (`admin::answer`).
            Some(row) if row.is_admin_request() => {}
            Some(row) => {
                if let Err(denied) = coord.metrics.authz.check(row, principal, String::new) {
                    return Err(Reply::error(refusal_status(principal), &denied.to_string()));
                }
            }
            // No such API route: say so only to a logged-in user.
            None if user.is_none() => {
                return Err(Reply::error(
                    401,
                    "log in with a token from `gantry admin token`",
                ))
            }
            None => {}
        }
        Ok(user)
    }

    fn login(&self, coord: &Coordinator, req: &Request) -> Reply {
        if let Err(d) = auth::check_csrf(req) {
            return Reply::denied(&d);
        }
        let token = serde_json::from_slice::<serde_json::Value>(&req.body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned));
        let Some(token) = token else {
            return Reply::error(400, "send {\"token\": \"glt1_...\"}");
        };
        let now = UnixMillis::now();
        // The login's principal is the token it presents.
        let verified = auth::verify_token(&coord.store, &token, now);
        let principal = verified
            .as_ref()
            .map_or(Principal::None, |r| Principal::of_role(r.role));
        let checked = coord.metrics.authz.check(Row::HttpLogin, principal, || {
            verified
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()
        });
        match (checked, verified) {
            (Err(d), _) => {
                tracing::info!("dashboard login refused: {d}");
                Reply::error(refusal_status(principal), &d.to_string())
            }
            (Ok(()), Err(d)) => Reply::denied(&d),
            (Ok(()), Ok(record)) => {
                let (session, lasts) = self.sessions.open(&record, now);
                let secure = if self.scheme == "https" {
                    "; Secure"
                } else {
                    ""
                };
                let mut reply = Reply::json(
                    200,
                    &serde_json::json!({ "name": record.name, "role": record.role.as_str() }),
                );
                reply.headers.push((
                    "Set-Cookie",
                    format!(
                        "{}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
                        auth::SESSION_COOKIE,
                        lasts.as_secs()
                    ),
                ));
                tracing::info!(token = %record.id, name = %record.name, role = %record.role, "dashboard login");
                reply
            }
        }
    }

    async fn api(
        &self,
        coord: &Coordinator,
        req: &Request,
        user: Option<&User>,
        route: Route,
    ) -> Reply {
        let principal = user.map_or(Principal::None, User::principal);
        // A browser's change must come from our own pages.
        if req.method == "POST" && user.is_some_and(|u| u.by_cookie) {
            if let Err(d) = auth::check_csrf(req) {
                tracing::info!(who = ?user.map(User::actor), "dashboard request refused: {d}");
                return Reply::denied(&d);
            }
        }
        let request = match route {
            Route::Me => {
                // What the page may offer, from the same table the requests are checked by.
                let can = [
                    ("view", Row::AdminListRuns),
                    ("retry_run", Row::AdminRetryRun),
                    ("cancel_run", Row::AdminCancelRun),
                    ("approve_job", Row::AdminApprove),
                ];
                return Reply::json(
                    200,
                    &serde_json::json!({
                        "name": user.map(|u| u.name.clone()),
                        "role": user.map(|u| u.role.as_str()),
                        "token": user.map(|u| u.token_id.clone()),
                        "can": can
                            .iter()
                            .map(|(name, row)| ((*name).to_owned(), serde_json::Value::Bool(row.allows(principal))))
                            .collect::<serde_json::Map<_, _>>(),
                    }),
                );
            }
            Route::Logout => {
                if let Some(id) = auth::cookie(req, auth::SESSION_COOKIE) {
                    self.sessions.close(id);
                }
                let mut reply = Reply::json(200, &serde_json::json!({ "logged_out": true }));
                reply.headers.push((
                    "Set-Cookie",
                    format!(
                        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
                        auth::SESSION_COOKIE
                    ),
                ));
                return reply;
            }
            Route::Agents => AdminRequest::ListAgents,
            Route::Runs { limit } => AdminRequest::ListRuns { limit },
            Route::Run(run) => AdminRequest::ShowRun { run },
            Route::Job(job) => AdminRequest::ShowJob { job },
            Route::RetryRun(run) => AdminRequest::RetryRun { run },
            Route::CancelRun(run) => AdminRequest::CancelRun { run },
            Route::Approve(job) => AdminRequest::Approve { job },
            Route::Deployments => {
                return Reply::json(200, &serde_json::Value::Array(deployments(coord)))
            }
            Route::NotFound => return Reply::error(404, "no such API route"),
            Route::Page
            | Route::Asset(..)
            | Route::Login
            | Route::RunEvents(_)
            | Route::JobLog(_) => return Reply::error(500, "route handled elsewhere"),
        };
        let actor = user.map_or_else(|| "web:anonymous".to_owned(), User::actor);
        let response = admin::answer(coord, &actor, principal, request).await;
        if let AdminResponse::Run(run) = &response {
            return run_with_reports(coord, &actor, principal, run).await;
        }
        answer(response, principal)
    }

    /// Streams a run's job states, or a job's log and state, as Server-Sent Events.
    async fn stream<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        coord: &Arc<Coordinator>,
        stream: &mut S,
        live: Live,
    ) -> bool {
        let Ok(_slot) = self.streams.clone().try_acquire_owned() else {
            let mut reply = Reply::error(
                503,
                &format!("{MAX_STREAMS} live streams are open; try again shortly"),
            );
            reply.headers.push(("Retry-After", "5".into()));
            write_reply(stream, reply).await;
            return true;
        };
        let (mut reader, mut stream) = tokio::io::split(stream);
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\nX-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\n\r\nretry: 2000\n\n";
        if write_within(&mut stream, head.as_bytes()).await.is_err() {
            return true;
        }
        let (tx, mut rx) = mpsc::channel::<String>(STREAM_BUFFER);
        let follow = follow(coord.clone(), live, tx);
        tokio::pin!(follow);
        let lifetime = tokio::time::sleep(STREAM_LIFETIME);
        tokio::pin!(lifetime);
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let mut following = true;
        // A client sends nothing after its request, so a read that ends means it left:
        // its slot is freed now rather than at the next keep-alive.
        let mut sink = [0u8; 512];
        loop {
            let event = tokio::select! {
                read = reader.read(&mut sink) => match read {
                    Ok(n) if n > 0 => continue,
                    _ => break,
                },
                () = &mut follow, if following => {
                    following = false;
                    continue;
                }
                event = rx.recv() => match event {
                    Some(e) => e,
                    // The follower ended and everything it sent is written.
                    None => break,
                },
                _ = keepalive.tick() => ": keep-alive\n\n".to_owned(),
                () = &mut lifetime => break,
            };
            if write_within(&mut stream, event.as_bytes()).await.is_err() {
                break;
            }
        }
        let _ = stream.shutdown().await;
        true
    }
}

/// What a live stream follows: a run, or a job from a log chunk on.
#[derive(Debug, Clone, Copy)]
enum Live {
    Run(RunId),
    Job(JobId, u64),
}

async fn write_within<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    tokio::time::timeout(WRITE_DEADLINE, write)
        .await
        .map_err(|_| std::io::Error::other("the client did not read for 10 s"))?
}

/// A follow stream's events as SSE text, into the stream's buffer.
struct SseSink {
    tx: mpsc::Sender<String>,
    /// On a job's stream: only this job's state changes pass.
    only_job: Option<JobId>,
}

/// The follower went away (the browser closed the stream).
#[derive(Debug)]
struct Gone;

impl FollowSink for SseSink {
    type Error = Gone;
    async fn send(&mut self, event: &FollowEvent) -> Result<(), Gone> {
        let text = match event {
            FollowEvent::Log(chunk) => format!(
                "id: {}\nevent: log\ndata: {}\n\n",
                chunk.seq + 1,
                serde_json::json!({ "seq": chunk.seq, "text": String::from_utf8_lossy(&chunk.data) })
            ),
            FollowEvent::Job(view) => {
                if self.only_job.is_some_and(|j| j != view.job) {
                    return Ok(());
                }
                format!(
                    "event: job\ndata: {}\n\n",
                    serde_json::to_string(view).map_err(|_| Gone)?
                )
            }
            FollowEvent::End { state } => format!(
                "event: end\ndata: {}\n\n",
                serde_json::json!({ "state": state })
            ),
            FollowEvent::Error(e) => format!(
                "event: problem\ndata: {}\n\n",
                serde_json::json!({ "error": e.message })
            ),
        };
        self.tx.send(text).await.map_err(|_| Gone)
    }
}

/// Runs the follower(s) of a live stream until they end. A job's stream carries its
/// log (`follow_logs`) and its state changes (`follow_run`, filtered to the job); it
/// ends when the log does.
async fn follow(coord: Arc<Coordinator>, live: Live, tx: mpsc::Sender<String>) {
    match live {
        Live::Run(run) => {
            let mut sink = SseSink { tx, only_job: None };
            let _ = coord.runs.follow_run(run, &mut sink).await;
        }
        Live::Job(job, from_seq) => {
            let mut log_sink = SseSink {
                tx: tx.clone(),
                only_job: Some(job),
            };
            let mut state_sink = StateOnly(SseSink {
                tx,
                only_job: Some(job),
            });
            let logs = coord.runs.follow_logs(job, from_seq, true, &mut log_sink);
            let states = coord.runs.follow_run(job.run, &mut state_sink);
            tokio::pin!(logs, states);
            // The run's follower ends with the run; the log's decides for a job.
            let mut states_done = false;
            loop {
                tokio::select! {
                    _ = &mut logs => break,
                    _ = &mut states, if !states_done => states_done = true,
                }
            }
        }
    }
}

/// Passes a run follower's job states but not its end (a job stream ends with its log).
struct StateOnly(SseSink);

impl FollowSink for StateOnly {
    type Error = Gone;
    async fn send(&mut self, event: &FollowEvent) -> Result<(), Gone> {
        match event {
            FollowEvent::Job(_) => self.0.send(event).await,
            _ => Ok(()),
        }
    }
}

/// An admin response as an HTTP answer to `principal`.
/// A run as `/api/runs/N` shows it: the run, and `reports`, each of its jobs' test
/// report summary by job id (asked for through the same router, as the same user).
async fn run_with_reports(
    coord: &Coordinator,
    actor: &str,
    principal: Principal,
    run: &gantry_protocol::RunView,
) -> Reply {
    let mut reports = serde_json::Map::new();
    for job in &run.jobs {
        let request = AdminRequest::ShowJobReport { job: job.job };
        if let AdminResponse::JobReport(Some(report)) =
            admin::answer(coord, actor, principal, request).await
        {
            let mut value = serde_json::to_value(&report).unwrap_or_default();
            if let Some(c) = &report.coverage {
                value["coverage"]["percent"] = c.percent().into();
            }
            value["summary"] = report.summary().into();
            reports.insert(job.job.to_string(), value);
        }
    }
    match serde_json::to_value(run) {
        Ok(mut value) => {
            value["reports"] = serde_json::Value::Object(reports);
            Reply::json(200, &value)
        }
        Err(e) => Reply::error(500, &e.to_string()),
    }
}

fn answer(resp: AdminResponse, principal: Principal) -> Reply {
    let value = match resp {
        AdminResponse::Error(e) => {
            let status = match e.kind {
                AdminErrorKind::NotFound => 404,
                AdminErrorKind::InvalidInput => 400,
                AdminErrorKind::Internal => 500,
                AdminErrorKind::Forbidden => refusal_status(principal),
            };
            return Reply::error(status, &e.message);
        }
        AdminResponse::Agents(a) => serde_json::to_value(a),
        AdminResponse::Runs(r) => serde_json::to_value(r),
        AdminResponse::Run(r) => serde_json::to_value(r),
        AdminResponse::Job(j) => serde_json::to_value(j),
        AdminResponse::Done { message } => Ok(serde_json::json!({ "message": message })),
        other => return Reply::error(500, &format!("unexpected answer {other:?}")),
    };
    match value {
        Ok(v) => Reply::json(200, &v),
        Err(e) => Reply::error(500, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_recognised_and_everything_else_is_left_alone() {
        assert_eq!(route("GET", "/"), Some(Ok(Route::Page)));
        assert_eq!(route("GET", "/runs/4"), Some(Ok(Route::Page)));
        assert_eq!(route("GET", "/jobs/4.1"), Some(Ok(Route::Page)));
        assert_eq!(
            route("GET", "/api/runs?limit=5"),
            Some(Ok(Route::Runs { limit: 5 }))
        );
        assert_eq!(
            route("GET", "/api/runs?limit=99999"),
            Some(Ok(Route::Runs { limit: MAX_RUNS }))
        );
        assert_eq!(route("GET", "/api/runs/4"), Some(Ok(Route::Run(RunId(4)))));
        assert_eq!(
            route("POST", "/api/runs/4/retry"),
            Some(Ok(Route::RetryRun(RunId(4))))
        );
        assert_eq!(
            route("GET", "/api/jobs/4.2/log"),
            Some(Ok(Route::JobLog(JobId {
                run: RunId(4),
                index: 2
            })))
        );
        assert!(matches!(
            route("GET", "/api/runs/4/retry"),
            Some(Err((405, _)))
        ));
        assert!(matches!(route("POST", "/agents"), Some(Err((405, _)))));
        assert!(matches!(route("GET", "/api/runs/x"), Some(Err((404, _)))));
        assert!(matches!(route("GET", "/api/jobs/4"), Some(Err((404, _)))));
        assert!(matches!(
            route("GET", "/api/runs?limit=x"),
            Some(Err((400, _)))
        ));
        assert_eq!(
            route("GET", "/api/nothing/here/at/all"),
            Some(Ok(Route::NotFound))
        );
        for theirs in [
            "/metrics",
            "/healthz",
            "/install.sh",
            "/hooks/push",
            "/runsx",
            "/apix",
        ] {
            assert_eq!(route("GET", theirs), None, "{theirs}");
        }
    }

    #[test]
    fn the_pages_load_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            // The SVG namespace is a name, never fetched; nothing else may be absolute.
            let text = text.replace("'http://www.w3.org/2000/svg'", "");
            for external in ["http://", "https://", "//cdn", "@import", "url(http"] {
                assert!(!text.contains(external), "{name} mentions {external}");
            }
        }
        assert!(
            !INDEX_HTML.contains("<script>"),
            "no inline script (the CSP forbids it)"
        );
        assert!(
            !APP_JS.contains("innerHTML"),
            "text goes in as text, never as HTML"
        );
    }
}
