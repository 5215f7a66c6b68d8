//! A forge's commit-status API on loopback, for tests: a real HTTP/1.1 server (plain
//! HTTP) that takes GitHub's, Gitea/Forgejo's or GitLab's "set a commit status"
//! request, checks it against that forge's documented shape, records it with the
//! verdict, and answers as the forge would (201, or 401/404/405/422/400 with the
//! reasons). It can be told to fail the next N requests with a status, to test retries.
//!
//! The checks are written here from the forges' API documentation, independently of
//! `gantry-forge`, so a test that sends `gantry-forge`'s requests here checks the one
//! against the other:
//! - GitHub: `POST {prefix}/repos/{owner}/{repo}/statuses/{sha}`, `Authorization:
//!   Bearer TOKEN`, `Accept: application/vnd.github+json`, a `User-Agent`, JSON body
//!   with `state` in pending|success|failure|error, optional `target_url`,
//!   `description` (at most 140 characters) and `context`.
//! - Gitea/Forgejo: `POST {prefix}/repos/{owner}/{repo}/statuses/{sha}`,
//!   `Authorization: token TOKEN`, `state` in pending|success|error|failure|warning,
//!   optional `target_url`, `description`, `context`.
//! - GitLab: `POST {prefix}/projects/{id or url-encoded path}/statuses/{sha}`,
//!   `PRIVATE-TOKEN: TOKEN`, `state` in pending|running|success|failed|canceled|skipped,
//!   optional `ref`, `name` or `context`, `target_url`, `description` (at most 255),
//!   `coverage`, `pipeline_id`.
//!
//! Every request must carry `Content-Length` (at most 1 MiB) and
//! `Content-Type: application/json`. One request per connection; the server runs on
//! its own thread and stops (joined) when the receiver is dropped.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::wait_for;

/// Largest request head read.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body read.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Which forge's status API the receiver plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusApi {
    Github,
    Gitea,
    Gitlab,
}

impl StatusApi {
    /// The API path prefix the receiver serves under, as each forge's self-hosted
    /// edition does (GitHub Enterprise Server: `/api/v3`).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Github => "/api/v3",
            Self::Gitea => "/api/v1",
            Self::Gitlab => "/api/v4",
        }
    }

    fn states(self) -> &'static [&'static str] {
        match self {
            Self::Github => &["pending", "success", "failure", "error"],
            Self::Gitea => &["pending", "success", "error", "failure", "warning"],
            Self::Gitlab => &[
                "pending", "running", "success", "failed", "canceled", "skipped",
            ],
        }
    }
}

/// A status the receiver accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedStatus {
    /// `owner/repo`, or GitLab's project id or decoded path.
    pub project: String,
    pub sha: String,
    pub state: String,
    /// `context` (GitLab: `name` or `context`), `default` when absent as the forges do.
    pub context: String,
    pub description: Option<String>,
    pub target_url: Option<String>,
    /// GitLab's `ref`.
    pub git_ref: Option<String>,
}

/// One request as received, with what the receiver made of it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status accepted, or every problem found.
    pub verdict: Result<AcceptedStatus, Vec<String>>,
    /// What the receiver answered.
    pub answered: u16,
}

impl ReceivedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    requests: Vec<ReceivedRequest>,
    /// Injected failures: this many next requests get `fail_status`.
    fail_next: usize,
    fail_status: u16,
}

/// The receiver; see the module documentation.
pub struct StatusReceiver {
    api: StatusApi,
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StatusReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusReceiver")
            .field("api", &self.api)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StatusReceiver {
    /// Starts a receiver for `api` that accepts only `token`.
    pub fn start(api: StatusApi, token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the status receiver");
        let addr = listener.local_addr().expect("receiver address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            let token = token.to_owned();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        serve(stream, api, &token, &shared);
                    }
                }
            })
        };
        Self {
            api,
            addr,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// The API base to configure Gantry with: `http://127.0.0.1:PORT/api/vN`.
    pub fn api_base(&self) -> String {
        format!("http://{}{}", self.addr, self.api.prefix())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next `n` requests are recorded (with their verdict) and answered with
    /// `status` instead, whatever they are.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut shared = lock(&self.shared);
        shared.fail_next = n;
        shared.fail_status = status;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.shared).requests.clone()
    }

    /// The statuses answered with 201, in arrival order.
    pub fn accepted(&self) -> Vec<AcceptedStatus> {
        lock(&self.shared)
            .requests
            .iter()
            .filter(|r| r.answered == 201)
            .filter_map(|r| r.verdict.clone().ok())
            .collect()
    }

    /// Waits until `n` requests have arrived, at most `deadline`.
    pub fn wait_for_requests(&self, n: usize, deadline: Duration) -> Vec<ReceivedRequest> {
        wait_for(&format!("{n} status requests"), deadline, || {
            let got = self.requests();
            (got.len() >= n).then_some(got)
        })
    }
}

impl Drop for StatusReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request, judges it, records it and answers.
fn serve(mut stream: TcpStream, api: StatusApi, token: &str, shared: &Mutex<Shared>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Some((method, path, headers, body)) = read_request(&mut stream) else {
        return;
    };
    let (status, verdict) = judge(api, token, &method, &path, &headers, &body);
    let mut shared = lock(shared);
    let answered = if shared.fail_next > 0 {
        shared.fail_next -= 1;
        shared.fail_status
    } else {
        status
    };
    shared.requests.push(ReceivedRequest {
        method,
        path,
        headers,
        body,
        verdict: verdict.clone(),
        answered,
    });
    drop(shared);
    let body = match (&verdict, answered) {
        (Ok(accepted), 201) => serde_json::json!({
            "id": 1,
            "state": accepted.state,
            "context": accepted.context,
            "description": accepted.description,
            "target_url": accepted.target_url,
        }),
        (Err(problems), s) if s == status => serde_json::json!({ "message": problems.join("; ") }),
        _ => serde_json::json!({ "message": "injected failure" }),
    }
    .to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {answered} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(answered),
        body.len()
    );
}

fn reason(status: u16) -> &'static str {
    match status {
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

type Request = (String, String, Vec<(String, String)>, Vec<u8>);

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD_BYTES {
            let _ = stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
            return None;
        }
        let n = stream.read(&mut piece).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&piece[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let Some(length) = length.filter(|l| *l <= MAX_BODY_BYTES) else {
        let _ = stream.write_all(
            b"HTTP/1.1 411 Length Required\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        );
        return None;
    };
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut piece).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&piece[..n]);
    }
    body.truncate(length);
    Some((method, path, headers, body))
}

/// The status a forge answers `request` with, and the accepted status or the problems.
fn judge(
    api: StatusApi,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, Result<AcceptedStatus, Vec<String>>) {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let Some((project, sha)) = parse_path(api, path) else {
        let expected = match api {
            StatusApi::Github | StatusApi::Gitea => "/repos/{owner}/{repo}/statuses/{sha}",
            StatusApi::Gitlab => "/projects/{id or url-encoded path}/statuses/{sha}",
        };
        return (
            404,
            Err(vec![format!(
                "path {path:?} is not {}{expected} with a 40- or 64-digit sha",
                api.prefix()
            )]),
        );
    };
    if method != "POST" {
        return (405, Err(vec![format!("method {method} is not POST")]));
    }
    let (auth_ok, expected_auth) = match api {
        StatusApi::Github => (
            header("authorization") == Some(&format!("Bearer {token}")),
            "Authorization: Bearer TOKEN",
        ),
        StatusApi::Gitea => (
            header("authorization") == Some(&format!("token {token}")),
            "Authorization: token TOKEN",
        ),
        StatusApi::Gitlab => (
            header("private-token") == Some(token),
            "PRIVATE-TOKEN: TOKEN",
        ),
    };
    if !auth_ok {
        return (
            401,
            Err(vec![format!(
                "credentials missing or wrong: expected {expected_auth}"
            )]),
        );
    }
    let mut problems = Vec::new();
    if !header("content-type").is_some_and(|v| v.starts_with("application/json")) {
        problems.push("Content-Type is not application/json".to_owned());
    }
    if api == StatusApi::Github {
        if header("accept") != Some("application/vnd.github+json") {
            problems.push("Accept is not application/vnd.github+json".to_owned());
        }
        if header("user-agent").is_none_or(str::is_empty) {
            problems.push("no User-Agent (GitHub refuses requests without one)".to_owned());
        }
    }
    let json: Value = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(_) => return (400, Err(vec!["the body is not a JSON object".to_owned()])),
        Err(e) => return (400, Err(vec![format!("the body is not JSON: {e}")])),
    };
    let string = |field: &str, problems: &mut Vec<String>| match json.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            problems.push(format!("{field} is not a string: {other}"));
            None
        }
    };
    let state = string("state", &mut problems);
    match &state {
        None => problems.push("state is missing".to_owned()),
        Some(s) if !api.states().contains(&s.as_str()) => problems.push(format!(
            "state {s:?} is not one of {}",
            api.states().join(", ")
        )),
        Some(_) => {}
    }
    let description = string("description", &mut problems);
    let limit = match api {
        StatusApi::Github => Some(140),
        StatusApi::Gitlab => Some(255),
        StatusApi::Gitea => None,
    };
    if let (Some(d), Some(limit)) = (&description, limit) {
        if d.chars().count() > limit {
            problems.push(format!(
                "description is too long (maximum is {limit} characters)"
            ));
        }
    }
    let target_url = string("target_url", &mut problems);
    if let Some(url) = &target_url {
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.contains(char::is_whitespace)
        {
            problems.push(format!("target_url {url:?} is not an http(s) URL"));
        }
    }
    let context = match api {
        StatusApi::Gitlab => {
            string("name", &mut problems).or_else(|| string("context", &mut problems))
        }
        _ => string("context", &mut problems),
    }
    .unwrap_or_else(|| "default".to_owned());
    let git_ref = match api {
        StatusApi::Gitlab => {
            if json.get("coverage").is_some_and(|c| !c.is_number()) {
                problems.push("coverage is not a number".to_owned());
            }
            if json.get("pipeline_id").is_some_and(|p| !p.is_u64()) {
                problems.push("pipeline_id is not an integer".to_owned());
            }
            string("ref", &mut problems)
        }
        _ => None,
    };
    if !problems.is_empty() {
        // GitHub and Gitea answer validation failures with 422, GitLab with 400.
        let status = if api == StatusApi::Gitlab { 400 } else { 422 };
        return (status, Err(problems));
    }
    (
        201,
        Ok(AcceptedStatus {
            project,
            sha,
            state: state.unwrap_or_default(),
            context,
            description,
            target_url,
            git_ref,
        }),
    )
}

/// `(project, sha)` from a status path of `api`, or `None` when it is not one.
fn parse_path(api: StatusApi, path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix(api.prefix())?;
    let segments: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let sha_ok =
        |s: &str| (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit());
    match (api, segments.as_slice()) {
        (StatusApi::Github | StatusApi::Gitea, ["repos", owner, repo, "statuses", sha])
            if name_ok(owner) && name_ok(repo) && sha_ok(sha) =>
        {
            Some((format!("{owner}/{repo}"), (*sha).to_owned()))
        }
        (StatusApi::Gitlab, ["projects", id, "statuses", sha]) if sha_ok(sha) => {
            let project = percent_decode(id)?;
            let ok = project.bytes().all(|b| b.is_ascii_digit()) || project.split('/').all(name_ok);
            ok.then(|| (project, (*sha).to_owned()))
        }
        _ => None,
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Sends `method url` with `headers` and `body` on a fresh connection (plain HTTP)
/// and returns the answer's status: the small client the receiver's own tests, and
/// tests that drive `gantry-forge`'s reporter, use.
pub fn send(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url} is not an http:// URL"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream =
        TcpStream::connect(authority).map_err(|e| format!("connect {authority}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    let _ = write!(
        request,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "no HTTP status in {:?}",
                answer.chars().take(80).collect::<String>()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_forge::reporter::{
        Command, Event, Reporter, ReporterConfig, SendResult, StatusChange,
    };
    use gantry_forge::status::{
        job_context, run_context, status_request, GantryState, StatusTarget, StatusUpdate,
    };
    use gantry_forge::{CommitId, Forge};
    use gantry_protocol::UnixMillis;

    const TOKEN: &str = "tok-123";
    const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
    const STATES: [GantryState; 5] = [
        GantryState::Queued,
        GantryState::Running,
        GantryState::Succeeded,
        GantryState::Failed,
        GantryState::Cancelled,
    ];

    fn forge_of(api: StatusApi) -> Forge {
        match api {
            StatusApi::Github => Forge::Github,
            StatusApi::Gitea => Forge::Gitea,
            StatusApi::Gitlab => Forge::Gitlab,
        }
    }

    fn update(state: GantryState, description: &str) -> StatusUpdate {
        StatusUpdate {
            commit: CommitId::parse(SHA).expect("sha"),
            context: job_context("ci", "test (linux)"),
            state,
            description: description.to_owned(),
            target_url: Some("http://127.0.0.1:8080/runs/7".into()),
            git_ref: Some("main".into()),
        }
    }

    fn post(receiver: &StatusReceiver, path: &str, headers: &[(&str, String)], body: &str) -> u16 {
        let url = format!("http://{}{path}", receiver.addr());
        send("POST", &url, headers, body.as_bytes()).expect("exchange")
    }

    /// Path, headers, body, expected status, a word the reason must contain.
    type Case<'a> = (String, Vec<(&'a str, String)>, &'a str, u16, &'a str);

    fn github_headers(token: &str) -> Vec<(&'static str, String)> {
        vec![
            ("Authorization", format!("Bearer {token}")),
            ("Accept", "application/vnd.github+json".into()),
            ("User-Agent", "test".into()),
            ("Content-Type", "application/json".into()),
        ]
    }

    #[test]
    fn gantry_forge_requests_are_accepted_by_every_forge_api() {
        for api in [StatusApi::Github, StatusApi::Gitea, StatusApi::Gitlab] {
            let receiver = StatusReceiver::start(api, TOKEN);
            let project = if api == StatusApi::Gitlab {
                "group/sub/app"
            } else {
                "team/app"
            };
            let target = StatusTarget::new(forge_of(api), &receiver.api_base(), project, TOKEN)
                .expect("target");
            for state in STATES {
                let request =
                    status_request(&target, &update(state, &"x".repeat(400))).expect("request");
                let status = send(
                    request.method,
                    &request.url,
                    &request.headers,
                    &request.body,
                )
                .expect("exchange");
                let last = receiver.requests().pop().expect("recorded");
                assert_eq!(status, 201, "{api:?} {state:?}: {:?}", last.verdict);
            }
            let accepted = receiver.accepted();
            assert_eq!(accepted.len(), STATES.len());
            let first = &accepted[0];
            assert_eq!(first.project, project);
            assert_eq!(first.sha, SHA);
            assert_eq!(first.context, "gantry/ci/test (linux)");
            assert_eq!(
                first.target_url.as_deref(),
                Some("http://127.0.0.1:8080/runs/7")
            );
            if api == StatusApi::Gitlab {
                assert_eq!(first.git_ref.as_deref(), Some("main"));
                assert_eq!(accepted[1].state, "running");
            }
        }
    }

    #[test]
    fn requests_off_the_documented_shape_are_refused_with_the_reason() {
        let gh = StatusReceiver::start(StatusApi::Github, TOKEN);
        let path = format!("/api/v3/repos/team/app/statuses/{SHA}");
        let good = r#"{"state":"success","context":"gantry/ci"}"#;
        assert_eq!(post(&gh, &path, &github_headers(TOKEN), good), 201);
        let cases: Vec<Case> = vec![
            (path.clone(), github_headers("wrong"), good, 401, "Bearer"),
            (
                path.clone(),
                vec![("Content-Type", "application/json".into())],
                good,
                401,
                "Bearer",
            ),
            (
                "/api/v3/repos/team/statuses/abc".into(),
                github_headers(TOKEN),
                good,
                404,
                "statuses",
            ),
            (
                format!("/api/v3/repos/team/app/statuses/{}", "z".repeat(40)),
                github_headers(TOKEN),
                good,
                404,
                "sha",
            ),
            (
                path.clone(),
                github_headers(TOKEN),
                r#"{"state":"failed"}"#,
                422,
                "failed",
            ),
            (
                path.clone(),
                github_headers(TOKEN),
                r#"{"context":"c"}"#,
                422,
                "state is missing",
            ),
            (
                path.clone(),
                github_headers(TOKEN),
                "not json",
                400,
                "not JSON",
            ),
            (
                path.clone(),
                github_headers(TOKEN),
                r#"{"state":"error","target_url":"ftp://x"}"#,
                422,
                "target_url",
            ),
        ];
        for (path, headers, body, status, reason) in &cases {
            assert_eq!(post(&gh, path, headers, body), *status, "{path} {body}");
            let last = gh.requests().pop().expect("recorded");
            let problems = last.verdict.expect_err("refused").join("; ");
            assert!(problems.contains(reason), "{problems}");
        }
        let long = format!(r#"{{"state":"error","description":"{}"}}"#, "d".repeat(141));
        assert_eq!(post(&gh, &path, &github_headers(TOKEN), &long), 422);
        let mut no_agent = github_headers(TOKEN);
        no_agent.retain(|(k, _)| *k != "User-Agent");
        assert_eq!(post(&gh, &path, &no_agent, good), 422);
        let url = format!("http://{}{path}", gh.addr());
        assert_eq!(send("GET", &url, &github_headers(TOKEN), b""), Ok(405));

        let gitea = StatusReceiver::start(StatusApi::Gitea, TOKEN);
        let path = format!("/api/v1/repos/team/app/statuses/{SHA}");
        let bearer = vec![
            ("Authorization", format!("Bearer {TOKEN}")),
            ("Content-Type", "application/json".into()),
        ];
        assert_eq!(
            post(&gitea, &path, &bearer, good),
            401,
            "Gitea's documented scheme is `token`"
        );
        let token = vec![
            ("Authorization", format!("token {TOKEN}")),
            ("Content-Type", "application/json".into()),
        ];
        assert_eq!(post(&gitea, &path, &token, r#"{"state":"warning"}"#), 201);
        assert_eq!(post(&gitea, &path, &token, r#"{"state":"running"}"#), 422);

        let gitlab = StatusReceiver::start(StatusApi::Gitlab, TOKEN);
        let headers = vec![
            ("PRIVATE-TOKEN", TOKEN.to_owned()),
            ("Content-Type", "application/json".into()),
        ];
        let raw_slash = format!("/api/v4/projects/group/app/statuses/{SHA}");
        assert_eq!(
            post(&gitlab, &raw_slash, &headers, r#"{"state":"running"}"#),
            404
        );
        let encoded = format!("/api/v4/projects/group%2Fapp/statuses/{SHA}");
        assert_eq!(
            post(
                &gitlab,
                &encoded,
                &headers,
                r#"{"state":"running","name":"n"}"#
            ),
            201
        );
        assert_eq!(
            post(&gitlab, &encoded, &headers, r#"{"state":"failure"}"#),
            400
        );
        assert_eq!(
            post(
                &gitlab,
                &encoded,
                &headers,
                r#"{"state":"failed","coverage":"high"}"#
            ),
            400
        );
        assert_eq!(gitlab.accepted()[0].project, "group/app");
    }

    #[test]
    fn injected_failures_come_first_then_requests_are_judged_again() {
        let receiver = StatusReceiver::start(StatusApi::Github, TOKEN);
        receiver.fail_next(2, 503);
        let path = format!("/api/v3/repos/team/app/statuses/{SHA}");
        let body = r#"{"state":"pending"}"#;
        let answers: Vec<u16> = (0..3)
            .map(|_| post(&receiver, &path, &github_headers(TOKEN), body))
            .collect();
        assert_eq!(answers, [503, 503, 201]);
        assert_eq!(receiver.requests().len(), 3);
        assert_eq!(receiver.accepted().len(), 1);
    }

    /// The reporter driven by a minimal shell: real HTTP to the receiver, and a virtual
    /// clock that jumps to each wake instead of sleeping.
    #[test]
    fn the_reporter_retries_through_injected_failures_and_the_newest_state_lands() {
        let receiver = StatusReceiver::start(StatusApi::Gitea, TOKEN);
        receiver.fail_next(2, 502);
        let target = StatusTarget::new(Forge::Gitea, &receiver.api_base(), "team/app", TOKEN)
            .expect("target");
        let mut reporter = Reporter::new(ReporterConfig {
            jitter_seed: 3,
            ..ReporterConfig::default()
        });
        let mut now = UnixMillis(1_700_000_000_000);
        let mut commands = Vec::new();
        for state in [
            GantryState::Queued,
            GantryState::Running,
            GantryState::Succeeded,
        ] {
            let mut u = update(state, "");
            u.context = run_context("ci");
            let change = StatusChange::new("app", &target, u).expect("change");
            commands.extend(reporter.handle(now, Event::StateChanged(change)));
        }
        for _ in 0..50 {
            let mut next = Vec::new();
            let mut wake = None;
            for command in commands.drain(..) {
                match command {
                    Command::Send { id, request, .. } => {
                        let result = match send(
                            request.method,
                            &request.url,
                            &request.headers,
                            &request.body,
                        ) {
                            Ok(status) => SendResult::Status(status),
                            Err(e) => SendResult::Transport(e),
                        };
                        next.extend(reporter.handle(now, Event::Sent { id, result }));
                    }
                    Command::Wake { at } => wake = Some(at),
                }
            }
            if next.is_empty() {
                match wake {
                    Some(at) => {
                        now = at;
                        next = reporter.handle(now, Event::Tick);
                    }
                    None => break,
                }
            }
            commands = next;
        }
        let answered: Vec<u16> = receiver.requests().iter().map(|r| r.answered).collect();
        assert_eq!(
            answered,
            [502, 502, 201],
            "queued failed twice, then success went alone"
        );
        let accepted = receiver.accepted();
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].state, "success");
        let c = reporter.counters();
        assert_eq!((c.retries, c.superseded, c.delivered), (1, 2, 1), "{c:?}");
    }
}
