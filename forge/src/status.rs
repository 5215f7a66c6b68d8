//! Commit statuses going back to the forge: the one HTTP request that sets a commit's
//! status, per forge, and how Gantry's run and job states map onto each forge's states.
//!
//! Owns the request shapes (method, URL, headers, JSON body) and their limits. It must
//! not send anything: the coordinator's HTTP client does, driven by
//! [`crate::reporter::Reporter`].
//!
//! | | GitHub (and Enterprise) | Gitea / Forgejo | GitLab |
//! |---|---|---|---|
//! | request | `POST {api}/repos/{owner}/{repo}/statuses/{sha}` | `POST {api}/repos/{owner}/{repo}/statuses/{sha}` | `POST {api}/projects/{id or url-encoded path}/statuses/{sha}` |
//! | API base | `https://api.github.com`, `https://HOST/api/v3` | `https://HOST/api/v1` | `https://HOST/api/v4` |
//! | auth | `Authorization: Bearer TOKEN` | `Authorization: token TOKEN` | `PRIVATE-TOKEN: TOKEN` |
//! | body | `state`, `target_url`, `description`, `context` | `state`, `target_url`, `description`, `context` | `state`, `name`, `target_url`, `description`, `ref` |
//! | states | pending, success, failure, error | pending, success, error, failure, warning | pending, running, success, failed, canceled |
//! | description | 140 characters (longer is refused with 422) | 255 (kept for display) | 255 |
//!
//! GitHub also wants `Accept: application/vnd.github+json`, `X-GitHub-Api-Version`
//! and a `User-Agent`. Gantry's states map as: queued → pending; running → pending
//! (GitLab: running); succeeded → success; failed → failure (GitLab: failed);
//! cancelled → error (GitLab: canceled), with "cancelled" in the description, since
//! GitHub and Gitea have no state of their own for it.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::types::{quote, CommitId, Forge};

/// Longest context (GitHub) or name (GitLab) sent. Both forges store it in a 255-byte
/// column; a longer one is cut and ends with a hash of the whole, so two long job names
/// never share a status.
pub const MAX_CONTEXT_BYTES: usize = 255;

/// Longest `target_url` sent; the dashboard's links are far shorter.
pub const MAX_TARGET_URL_BYTES: usize = 2048;

/// The states a Gantry run or job reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GantryState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl GantryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the run or job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// The state `forge` is sent for `state`.
pub fn forge_state(forge: Forge, state: GantryState) -> &'static str {
    match (forge, state) {
        (Forge::Gitlab, GantryState::Running) => "running",
        (_, GantryState::Queued | GantryState::Running) => "pending",
        (_, GantryState::Succeeded) => "success",
        (Forge::Gitlab, GantryState::Failed) => "failed",
        (_, GantryState::Failed) => "failure",
        (Forge::Gitlab, GantryState::Cancelled) => "canceled",
        (_, GantryState::Cancelled) => "error",
    }
}

/// Longest description `forge` takes, in characters.
pub fn description_limit(forge: Forge) -> usize {
    match forge {
        Forge::Github => 140,
        Forge::Gitea | Forge::Gitlab => 255,
    }
}

/// The usual API base of a forge whose web address is `web_base` (`https://host` or
/// `https://host/prefix`): `https://api.github.com` for github.com, `/api/v3` under
/// GitHub Enterprise Server, `/api/v1` under Gitea, `/api/v4` under GitLab.
pub fn default_api_base(forge: Forge, web_base: &str) -> String {
    let web_base = web_base.trim_end_matches('/');
    match forge {
        Forge::Github
            if web_base.eq_ignore_ascii_case("https://github.com")
                || web_base.eq_ignore_ascii_case("https://www.github.com") =>
        {
            "https://api.github.com".to_owned()
        }
        Forge::Github => format!("{web_base}/api/v3"),
        Forge::Gitea => format!("{web_base}/api/v1"),
        Forge::Gitlab => format!("{web_base}/api/v4"),
    }
}

/// The status context of a whole run: `gantry/<pipeline>`.
pub fn run_context(pipeline: &str) -> String {
    bounded_context(&format!("gantry/{pipeline}"))
}

/// The status context of one job: `gantry/<pipeline>/<job>`.
pub fn job_context(pipeline: &str, job: &str) -> String {
    bounded_context(&format!("gantry/{pipeline}/{job}"))
}

fn bounded_context(context: &str) -> String {
    let context: String = context
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if context.len() <= MAX_CONTEXT_BYTES {
        return context;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, context.as_bytes());
    let suffix = crate::types::hex(&digest.as_ref()[..4]);
    let mut end = MAX_CONTEXT_BYTES - suffix.len() - 1;
    while !context.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}~{suffix}", &context[..end])
}

/// Where and as whom statuses of one registered repository are sent.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusTarget {
    forge: Forge,
    api_base: String,
    /// `owner/repo` (GitHub, Gitea), or the GitLab project's id or path.
    project: String,
    token: String,
}

impl fmt::Debug for StatusTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusTarget")
            .field("forge", &self.forge)
            .field("api_base", &self.api_base)
            .field("project", &self.project)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl StatusTarget {
    /// `api_base` as [`default_api_base`] gives it (or the admin's); `project` is
    /// `owner/repo` on GitHub and Gitea, and the numeric id or the full path
    /// (`group/sub/project`) on GitLab; `token` is the API token with status rights
    /// (GitHub: "commit statuses: write"; Gitea: write:repository; GitLab: api).
    pub fn new(
        forge: Forge,
        api_base: &str,
        project: &str,
        token: &str,
    ) -> Result<Self, StatusError> {
        let api_base = api_base.trim().trim_end_matches('/');
        let scheme_ok = api_base.starts_with("https://") || api_base.starts_with("http://");
        if !scheme_ok
            || api_base.len() > MAX_TARGET_URL_BYTES
            || api_base
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '?' | '#'))
        {
            return Err(StatusError::ApiBase(quote(api_base, 80)));
        }
        let project = project.trim().trim_matches('/');
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        let project_ok = match forge {
            Forge::Github | Forge::Gitea => {
                let parts: Vec<&str> = project.split('/').collect();
                parts.len() == 2 && parts.iter().all(|p| segment_ok(p))
            }
            Forge::Gitlab => {
                project.bytes().all(|b| b.is_ascii_digit()) && !project.is_empty()
                    || project.split('/').all(segment_ok)
            }
        };
        if !project_ok {
            return Err(StatusError::Project {
                forge,
                project: quote(project, 80),
            });
        }
        if token.is_empty() || token.len() > 1024 || token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(StatusError::Token);
        }
        Ok(Self {
            forge,
            api_base: api_base.to_owned(),
            project: project.to_owned(),
            token: token.to_owned(),
        })
    }

    pub fn forge(&self) -> Forge {
        self.forge
    }

    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    pub fn project(&self) -> &str {
        &self.project
    }
}

/// One status to set on one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    pub commit: CommitId,
    /// [`run_context`] or [`job_context`]; one status per context and commit.
    pub context: String,
    pub state: GantryState,
    /// Cut to the forge's limit with `…`; empty sends the state's own words.
    pub description: String,
    /// The run's (or job's) dashboard page.
    pub target_url: Option<String>,
    /// The branch or tag (short name) built; GitLab attaches the status to that ref's
    /// pipeline with it.
    pub git_ref: Option<String>,
}

/// An HTTP request to carry out as is. Its `Debug` hides credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: &'static str,
    /// Absolute `http(s)://` URL.
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let secret = k.eq_ignore_ascii_case("authorization")
                    || k.eq_ignore_ascii_case("private-token");
                (*k, if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("API base {0} is not an http:// or https:// URL without spaces, query or fragment; use e.g. https://gitea.example.com/api/v1")]
    ApiBase(String),
    #[error("{project} does not name a {forge} repository; use owner/repo (GitLab: the project id or group/project)")]
    Project { forge: Forge, project: String },
    #[error("the forge token is empty, longer than 1024 bytes or has spaces or control characters; paste the token alone")]
    Token,
    #[error("status context {0} is empty, longer than 255 bytes or has control characters")]
    Context(String),
    #[error("target URL {0} is not an http:// or https:// URL of at most 2048 bytes")]
    TargetUrl(String),
}

/// The request that sets `update` on `target`'s forge.
pub fn status_request(
    target: &StatusTarget,
    update: &StatusUpdate,
) -> Result<HttpRequest, StatusError> {
    let context = &update.context;
    if context.is_empty()
        || context.len() > MAX_CONTEXT_BYTES
        || context.chars().any(char::is_control)
    {
        return Err(StatusError::Context(quote(context, 80)));
    }
    if let Some(url) = &update.target_url {
        let ok = (url.starts_with("https://") || url.starts_with("http://"))
            && url.len() <= MAX_TARGET_URL_BYTES
            && !url.chars().any(|c| c.is_control() || c.is_whitespace());
        if !ok {
            return Err(StatusError::TargetUrl(quote(url, 80)));
        }
    }
    let forge = target.forge;
    let state = forge_state(forge, update.state);
    let description = describe(forge, update);
    let sha = update.commit.as_str();
    let mut body = serde_json::Map::new();
    body.insert("state".into(), state.into());
    if let Some(url) = &update.target_url {
        body.insert("target_url".into(), url.as_str().into());
    }
    body.insert("description".into(), description.into());
    let (url, auth) = match forge {
        Forge::Github => {
            body.insert("context".into(), context.as_str().into());
            (
                format!(
                    "{}/repos/{}/statuses/{sha}",
                    target.api_base, target.project
                ),
                ("Authorization", format!("Bearer {}", target.token)),
            )
        }
        Forge::Gitea => {
            body.insert("context".into(), context.as_str().into());
            (
                format!(
                    "{}/repos/{}/statuses/{sha}",
                    target.api_base, target.project
                ),
                ("Authorization", format!("token {}", target.token)),
            )
        }
        Forge::Gitlab => {
            body.insert("name".into(), context.as_str().into());
            if let Some(git_ref) = update.git_ref.as_deref().filter(|r| !r.is_empty()) {
                body.insert("ref".into(), git_ref.into());
            }
            (
                format!(
                    "{}/projects/{}/statuses/{sha}",
                    target.api_base,
                    percent_encode(&target.project)
                ),
                ("PRIVATE-TOKEN", target.token.clone()),
            )
        }
    };
    let mut headers = vec![
        auth,
        ("Content-Type", "application/json".to_owned()),
        (
            "User-Agent",
            concat!("gantry/", env!("CARGO_PKG_VERSION")).to_owned(),
        ),
    ];
    match forge {
        Forge::Github => {
            headers.push(("Accept", "application/vnd.github+json".to_owned()));
            headers.push(("X-GitHub-Api-Version", "2022-11-28".to_owned()));
        }
        Forge::Gitea | Forge::Gitlab => headers.push(("Accept", "application/json".to_owned())),
    }
    Ok(HttpRequest {
        method: "POST",
        url,
        headers,
        body: serde_json::Value::Object(body).to_string().into_bytes(),
    })
}

/// The description sent: the caller's, or the state in words; control characters
/// replaced; cut to the forge's limit with `…`. A cancelled state says so in words,
/// because GitHub and Gitea show it as an error.
fn describe(forge: Forge, update: &StatusUpdate) -> String {
    let text = if update.description.trim().is_empty() {
        update.state.as_str().to_owned()
    } else {
        update.description.clone()
    };
    let text = if update.state == GantryState::Cancelled
        && forge != Forge::Gitlab
        && !text.to_ascii_lowercase().contains("cancel")
    {
        format!("cancelled: {text}")
    } else {
        text
    };
    let limit = description_limit(forge);
    let clean: Vec<char> = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= limit {
        return clean.into_iter().collect();
    }
    let mut cut: String = clean[..limit - 1].iter().collect();
    cut.push('…');
    cut
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a GitLab
/// project path is one path segment (`group%2Fproject`).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(state: GantryState) -> StatusUpdate {
        StatusUpdate {
            commit: CommitId::parse("ec26c3e57ca3a959ca5aad62de7213c562f8c821").expect("sha"),
            context: run_context("ci"),
            state,
            description: String::new(),
            target_url: Some("https://gantry.example/runs/7".into()),
            git_ref: Some("main".into()),
        }
    }

    fn body(req: &HttpRequest) -> serde_json::Value {
        serde_json::from_slice(&req.body).expect("json")
    }

    fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
        req.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn every_state_maps_to_a_state_each_forge_accepts() {
        let allowed = |forge| match forge {
            Forge::Github => &["pending", "success", "failure", "error"][..],
            Forge::Gitea => &["pending", "success", "error", "failure", "warning"][..],
            Forge::Gitlab => &["pending", "running", "success", "failed", "canceled"][..],
        };
        for forge in Forge::ALL {
            for state in [
                GantryState::Queued,
                GantryState::Running,
                GantryState::Succeeded,
                GantryState::Failed,
                GantryState::Cancelled,
            ] {
                let sent = forge_state(forge, state);
                assert!(
                    allowed(forge).contains(&sent),
                    "{forge} {state:?} -> {sent}"
                );
            }
        }
        assert_eq!(forge_state(Forge::Gitlab, GantryState::Running), "running");
        assert_eq!(forge_state(Forge::Github, GantryState::Running), "pending");
        assert_eq!(forge_state(Forge::Gitlab, GantryState::Queued), "pending");
        assert_eq!(
            forge_state(Forge::Gitlab, GantryState::Cancelled),
            "canceled"
        );
        assert_eq!(forge_state(Forge::Gitea, GantryState::Failed), "failure");
    }

    #[test]
    fn github_requests_follow_the_rest_api() {
        let target = StatusTarget::new(
            Forge::Github,
            "https://ghe.example/api/v3/",
            "octo/hello",
            "ghp_x",
        )
        .expect("target");
        let req = status_request(&target, &update(GantryState::Failed)).expect("request");
        assert_eq!(req.method, "POST");
        assert_eq!(
            req.url,
            "https://ghe.example/api/v3/repos/octo/hello/statuses/ec26c3e57ca3a959ca5aad62de7213c562f8c821"
        );
        assert_eq!(header(&req, "authorization"), Some("Bearer ghp_x"));
        assert_eq!(header(&req, "accept"), Some("application/vnd.github+json"));
        assert!(header(&req, "user-agent").is_some());
        let b = body(&req);
        assert_eq!(b["state"], "failure");
        assert_eq!(b["context"], "gantry/ci");
        assert_eq!(b["target_url"], "https://gantry.example/runs/7");
        assert!(b.get("ref").is_none());
    }

    #[test]
    fn gitea_requests_use_a_token_header() {
        let target = StatusTarget::new(
            Forge::Gitea,
            "http://gitea.lan:3000/api/v1",
            "team/app",
            "t0k",
        )
        .expect("target");
        let req = status_request(&target, &update(GantryState::Cancelled)).expect("request");
        assert_eq!(
            req.url,
            "http://gitea.lan:3000/api/v1/repos/team/app/statuses/ec26c3e57ca3a959ca5aad62de7213c562f8c821"
        );
        assert_eq!(header(&req, "authorization"), Some("token t0k"));
        let b = body(&req);
        assert_eq!(b["state"], "error");
        assert_eq!(b["description"], "cancelled");
    }

    #[test]
    fn gitlab_requests_encode_the_project_path_and_name_the_ref() {
        let target = StatusTarget::new(
            Forge::Gitlab,
            "https://gitlab.example/api/v4",
            "group/sub/app",
            "glpat",
        )
        .expect("target");
        let req = status_request(&target, &update(GantryState::Running)).expect("request");
        assert_eq!(
            req.url,
            "https://gitlab.example/api/v4/projects/group%2Fsub%2Fapp/statuses/ec26c3e57ca3a959ca5aad62de7213c562f8c821"
        );
        assert_eq!(header(&req, "private-token"), Some("glpat"));
        let b = body(&req);
        assert_eq!(b["state"], "running");
        assert_eq!(b["name"], "gantry/ci");
        assert_eq!(b["ref"], "main");
        let numeric = StatusTarget::new(
            Forge::Gitlab,
            "https://gitlab.example/api/v4",
            "17",
            "glpat",
        )
        .expect("target");
        let req = status_request(&numeric, &update(GantryState::Running)).expect("request");
        assert!(req.url.contains("/projects/17/statuses/"), "{}", req.url);
    }

    #[test]
    fn descriptions_fit_each_forges_limit() {
        for forge in Forge::ALL {
            let target =
                StatusTarget::new(forge, "https://x.example/api", "o/r", "t").expect("target");
            let mut u = update(GantryState::Failed);
            u.description = "é".repeat(1000);
            let b = body(&status_request(&target, &u).expect("request"));
            let sent = b["description"].as_str().expect("string");
            assert_eq!(sent.chars().count(), description_limit(forge), "{forge}");
            assert!(sent.ends_with('…'));
        }
    }

    #[test]
    fn long_contexts_are_cut_but_stay_distinct() {
        let a = job_context("ci", &format!("{}a", "x".repeat(300)));
        let b = job_context("ci", &format!("{}b", "x".repeat(300)));
        assert!(a.len() <= MAX_CONTEXT_BYTES && b.len() <= MAX_CONTEXT_BYTES);
        assert_ne!(a, b);
        assert_eq!(job_context("ci", "test (linux)"), "gantry/ci/test (linux)");
    }

    #[test]
    fn bad_targets_and_updates_are_refused_with_the_fix() {
        assert!(matches!(
            StatusTarget::new(Forge::Github, "ftp://x", "o/r", "t"),
            Err(StatusError::ApiBase(_))
        ));
        let e = StatusTarget::new(Forge::Github, "https://api.github.com", "o/r/x", "t")
            .expect_err("path");
        assert!(e.to_string().contains("owner/repo"), "{e}");
        assert!(StatusTarget::new(Forge::Gitea, "https://g", "../r", "t").is_err());
        assert_eq!(
            StatusTarget::new(
                Forge::Github,
                "https://api.github.com",
                "o/r",
                "a\r\nX-Evil: 1"
            ),
            Err(StatusError::Token)
        );
        let target =
            StatusTarget::new(Forge::Github, "https://api.github.com", "o/r", "t").expect("target");
        let mut u = update(GantryState::Queued);
        u.target_url = Some("javascript:alert(1)".into());
        assert!(matches!(
            status_request(&target, &u),
            Err(StatusError::TargetUrl(_))
        ));
        let mut u = update(GantryState::Queued);
        u.context = String::new();
        assert!(matches!(
            status_request(&target, &u),
            Err(StatusError::Context(_))
        ));
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let target = StatusTarget::new(Forge::Github, "https://api.github.com", "o/r", "sekrit")
            .expect("target");
        let req = status_request(&target, &update(GantryState::Queued)).expect("request");
        assert!(!format!("{target:?}{req:?}").contains("sekrit"));
    }

    #[test]
    fn api_bases_follow_each_forges_convention() {
        for (forge, web, api) in [
            (
                Forge::Github,
                "https://github.com/",
                "https://api.github.com",
            ),
            (Forge::Github, "https://ghe.corp", "https://ghe.corp/api/v3"),
            (Forge::Gitea, "https://git.lan/", "https://git.lan/api/v1"),
            (
                Forge::Gitlab,
                "https://gl.lan/gitlab",
                "https://gl.lan/gitlab/api/v4",
            ),
        ] {
            assert_eq!(default_api_base(forge, web), api, "{web}");
        }
    }
}
