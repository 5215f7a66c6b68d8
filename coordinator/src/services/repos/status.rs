//! Commit statuses back to the forge: the shell around `gantry_forge::reporter`.
//!
//! Owns the task that watches the engine's broadcast of stored run changes (as
//! `notify.rs` does), turns each state change of a run built from a repository into a
//! `gantry_forge::status::StatusUpdate` on the run's commit, feeds it to the sans-IO
//! [`Reporter`] with the time, and carries out its commands: each request is sent on a
//! task of its own with the coordinator's HTTP client, its answer fed back; one timer
//! for the reporter's next deadline. It also remembers the last failed attempts per
//! repository for `gantry repos show`, and publishes figures on `/metrics`.
//!
//! It never makes the scheduler wait: the engine only broadcasts (a lagging watcher
//! loses changes, logged), and nothing here is awaited by a run. A repository reports
//! only with a forge (`--forge`) and a token (`--token-secret`); the API base is
//! `--api-url` or derived from the URL (`gantry_forge::status::default_api_base`).
//! Retries follow `[webhooks]` in `coordinator.toml` (base wait, attempts, timeout).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use gantry_forge::reporter::{
    Command, Event, Reporter, ReporterConfig, RequestId, SendResult, StatusChange,
};
use gantry_forge::status::{
    default_api_base, forge_state, run_context, GantryState, StatusError, StatusTarget,
    StatusUpdate,
};
use gantry_forge::{CommitId, Forge};
use gantry_protocol::{RunId, UnixMillis};
use tokio::sync::{broadcast, mpsc};

use crate::base::config::WebhookSettings;
use crate::base::http_client::{self, Url};
use crate::base::metrics::Metrics;
use crate::services::engine::Change;
use crate::services::secrets::Secrets;
use crate::store::{RepoCredentials, RepoRecord, RepoStatusRecord, RunRecord, RunStatus, Store};

/// Failed attempts remembered per repository for `gantry repos show`.
const ATTEMPTS_KEPT: usize = 10;
/// Runs whose last reported state is remembered, so a re-broadcast is not sent twice
/// (GitLab refuses a transition to the state a status already has).
const RUNS_REMEMBERED: usize = 4096;

/// Why a repository's commit statuses cannot be sent; each says what to fix.
#[derive(Debug, thiserror::Error)]
enum StatusSetupError {
    #[error("cannot report statuses: secret {0} is not set")]
    NoToken(String),
    /// The clone URL (credentials redacted) no API address can be derived from.
    #[error("cannot report statuses: no forge API address can be derived from {0}; add the repository with --api-url")]
    NoApiBase(String),
    #[error("cannot report statuses: {0}")]
    Target(#[from] StatusError),
}

/// The forge-status service; one per coordinator.
#[derive(Debug)]
pub struct ForgeStatus {
    store: Arc<Store>,
    secrets: Arc<Secrets>,
    metrics: Arc<Metrics>,
    settings: WebhookSettings,
    /// Where links to runs point (`coordinator.toml`'s `public_url`); none without it.
    public_url: Option<String>,
    shared: Mutex<Shared>,
}

#[derive(Debug)]
struct Shared {
    reporter: Reporter,
    /// What each request out is about: (repository, "abc1234 success").
    out: HashMap<RequestId, (String, String)>,
    /// The last failed attempts per repository, one line each.
    failed: HashMap<String, VecDeque<String>>,
    /// The forge state last handed in per run, oldest first.
    reported: VecDeque<(RunId, &'static str)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ForgeStatus {
    pub fn new(
        store: Arc<Store>,
        secrets: Arc<Secrets>,
        metrics: Arc<Metrics>,
        settings: WebhookSettings,
        public_url: Option<String>,
    ) -> Arc<Self> {
        let config = ReporterConfig {
            retry_base_ms: millis(settings.retry_base),
            max_attempts: settings.attempts,
            // The reporter's deadline only catches a send that never reports back: the
            // HTTP client's own timeout ends every attempt first.
            send_deadline_ms: millis(settings.timeout) * 2 + 1000,
            jitter_seed: u64::from_le_bytes(gantry_certs::random_bytes::<8>()),
            ..ReporterConfig::default()
        };
        Arc::new(Self {
            store,
            secrets,
            metrics,
            settings,
            public_url,
            shared: Mutex::new(Shared {
                reporter: Reporter::new(config),
                out: HashMap::new(),
                failed: HashMap::new(),
                reported: VecDeque::new(),
            }),
        })
    }

    /// Starts the task that reports the runs `changes` announces, until the runtime ends.
    pub fn start(self: &Arc<Self>, mut changes: broadcast::Receiver<Change>) {
        let me = self.clone();
        tokio::spawn(async move {
            let (answers, mut answered) = mpsc::unbounded_channel::<(RequestId, SendResult)>();
            let mut wake: Option<UnixMillis> = None;
            loop {
                let timer = async {
                    match wake {
                        Some(at) => {
                            let wait = at.millis_since(UnixMillis::now());
                            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let event = tokio::select! {
                    change = changes.recv() => match change {
                        Ok(Change::Run(run)) => match me.change_of(run.run, Some(run)) {
                            Some(change) => Event::StateChanged(change),
                            None => continue,
                        },
                        // A run's creation is not broadcast: its first job change says
                        // it started (the run's stored state is what is reported).
                        Ok(Change::Job(job)) => match me.change_of(job.job.run, None) {
                            Some(change) => Event::StateChanged(change),
                            None => continue,
                        },
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "forge statuses missed stored changes (the change feed overflowed)");
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    Some((id, result)) = answered.recv() => Event::Sent { id, result },
                    () = timer => Event::Tick,
                };
                wake = None;
                for command in me.handle(event) {
                    match command {
                        Command::Wake { at } => wake = Some(at),
                        Command::Send { id, request, .. } => {
                            let answers = answers.clone();
                            let timeout = me.settings.timeout;
                            tokio::spawn(async move {
                                let result =
                                    send(&request.url, &request.headers, &request.body, timeout)
                                        .await;
                                let _ = answers.send((id, result));
                            });
                        }
                    }
                }
            }
        });
    }

    /// Hands `event` to the reporter; notes what goes out and what failed.
    fn handle(&self, event: Event) -> Vec<Command> {
        let now = UnixMillis::now();
        let mut shared = lock(&self.shared);
        if let Event::Sent { id, result } = &event {
            if let Some((repo, what)) = shared.out.remove(id) {
                let error = match result {
                    SendResult::Status(code) if (200..300).contains(code) => None,
                    SendResult::Status(code) => Some(format!("HTTP {code}")),
                    SendResult::Transport(e) => Some(e.clone()),
                    SendResult::RateLimited { .. } => Some("rate limited".into()),
                };
                self.metrics.forge_status_attempt(error.is_none());
                if let Some(error) = error {
                    let line = format!("{} {what}: {error}", now.to_rfc3339());
                    let lines = shared.failed.entry(repo).or_default();
                    if lines.len() == ATTEMPTS_KEPT {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            }
        }
        let commands = shared.reporter.handle(now, event);
        for command in &commands {
            if let Command::Send { id, repo, request } = command {
                shared
                    .out
                    .insert(*id, (repo.clone(), describe_request(request)));
            }
        }
        let counters = shared.reporter.counters();
        self.metrics
            .forge_status_lost(counters.refused + counters.gave_up + counters.dropped);
        commands
    }

    /// The status change a stored run's state is, if its repository reports statuses
    /// and the forge has not been told this state yet.
    /// `run` is the run's record when the change carried it, else it is read.
    fn change_of(&self, id: RunId, run: Option<RunRecord>) -> Option<StatusChange> {
        let built = self.store.run_repo(id).ok()??;
        let run = match run {
            Some(r) => r,
            None => self.store.run(id).ok()??,
        };
        let record = self.store.repo(&built.repo).ok()??;
        let target = match self.target(&record) {
            Ok(Some(t)) => t,
            Ok(None) => return None,
            Err(reason) => {
                self.note(&record.name, reason.to_string());
                return None;
            }
        };
        let state = match run.state {
            RunStatus::Running => GantryState::Running,
            RunStatus::Succeeded => GantryState::Succeeded,
            RunStatus::Failed => GantryState::Failed,
            RunStatus::Cancelled => GantryState::Cancelled,
        };
        let commit = CommitId::parse(run.commit.as_deref()?).ok()?;
        let sent = forge_state(target.forge(), state);
        {
            let mut shared = lock(&self.shared);
            if shared
                .reported
                .iter()
                .any(|(r, s)| *r == run.run && *s == sent)
            {
                return None;
            }
            shared.reported.retain(|(r, _)| *r != run.run);
            if shared.reported.len() >= RUNS_REMEMBERED {
                shared.reported.pop_front();
            }
            shared.reported.push_back((run.run, sent));
        }
        let update = StatusUpdate {
            commit,
            context: run_context(&run.pipeline),
            state,
            description: format!("run {} {}", run.run, state.as_str()),
            target_url: self
                .public_url
                .as_ref()
                .map(|base| format!("{base}/runs/{}", run.run)),
            git_ref: Some(run.git_ref.clone()).filter(|r| !r.is_empty()),
        };
        match StatusChange::new(&record.name, &target, update) {
            Ok(change) => Some(change),
            Err(e) => {
                self.note(&record.name, e.to_string());
                None
            }
        }
    }

    /// Where `record`'s statuses go: `None` without a forge or a token; an error
    /// saying what to fix when they cannot be sent.
    fn target(&self, record: &RepoRecord) -> Result<Option<StatusTarget>, StatusSetupError> {
        let Some(forge) = forge_of(record) else {
            return Ok(None);
        };
        let given = self.store.repo_status(&record.name).unwrap_or_default();
        let Some(secret) = token_secret(record, &given) else {
            return Ok(None);
        };
        let token = self
            .secrets
            .value(secret)
            .ok_or_else(|| StatusSetupError::NoToken(secret.to_owned()))?;
        let api = api_base(record, &given, forge)?;
        Ok(Some(StatusTarget::new(
            forge,
            &api,
            &project_of(forge, &record.url),
            &token,
        )?))
    }

    /// What `gantry repos show` says about `record`'s statuses.
    pub fn describe(&self, record: &RepoRecord) -> String {
        let Some(forge) = forge_of(record) else {
            return "off (no --forge)".into();
        };
        let given = self.store.repo_status(&record.name).unwrap_or_default();
        if token_secret(record, &given).is_none() {
            return "off (no --token-secret or --status-token-secret)".into();
        }
        match api_base(record, &given, forge) {
            Ok(api) => format!("{api} ({})", project_of(forge, &record.url)),
            Err(e) => e.to_string(),
        }
    }

    /// `record`'s last failed attempts and the statuses the reporter gave up on.
    pub fn failures(&self, repo: &str) -> Vec<String> {
        let shared = lock(&self.shared);
        let mut lines: Vec<String> = shared
            .reporter
            .failures(repo)
            .map(|f| {
                format!(
                    "{} {} {} {}: {} ({} attempts)",
                    f.at.to_rfc3339(),
                    short(f.commit.as_str()),
                    f.context,
                    f.state.as_str(),
                    f.reason,
                    f.attempts
                )
            })
            .collect();
        lines.extend(shared.failed.get(repo).into_iter().flatten().cloned());
        lines
    }

    /// Forgets a removed repository's queue and failures.
    pub fn forget(&self, repo: &str) {
        let mut shared = lock(&self.shared);
        shared.failed.remove(repo);
        drop(shared.reporter.handle(
            UnixMillis::now(),
            Event::RepositoryRemoved {
                repo: repo.to_owned(),
            },
        ));
    }

    fn note(&self, repo: &str, reason: String) {
        tracing::warn!(repo, "{reason}");
        let mut shared = lock(&self.shared);
        let lines = shared.failed.entry(repo.to_owned()).or_default();
        if lines.back() != Some(&reason) {
            if lines.len() == ATTEMPTS_KEPT {
                lines.pop_front();
            }
            lines.push_back(reason);
        }
    }
}

/// The repository's forge. Repositories added before the name was stored as
/// `Forge::as_str` hold its display name lower-cased (`gitea/forgejo`).
fn forge_of(record: &RepoRecord) -> Option<Forge> {
    let name = record.forge.as_deref()?;
    Forge::parse(name).or_else(|| Forge::parse(name.split('/').next()?))
}

/// The secret holding the API token: the status one, else the fetch token's.
fn token_secret<'a>(record: &'a RepoRecord, given: &'a RepoStatusRecord) -> Option<&'a str> {
    match (&given.token_secret, &record.credentials) {
        (Some(name), _) | (None, RepoCredentials::TokenSecret(name)) => Some(name),
        (None, _) => None,
    }
}

/// The forge's API base: the admin's, else derived from the clone URL.
fn api_base(
    record: &RepoRecord,
    given: &RepoStatusRecord,
    forge: Forge,
) -> Result<String, StatusSetupError> {
    if let Some(api) = &given.api_url {
        return Ok(api.clone());
    }
    web_base(&record.url)
        .map(|web| default_api_base(forge, &web))
        .ok_or_else(|| StatusSetupError::NoApiBase(gantry_git::redact(&record.url)))
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

/// "abc1234 success" for a status request (its URL ends with the commit).
fn describe_request(request: &gantry_forge::status::HttpRequest) -> String {
    let sha = request.url.rsplit('/').next().unwrap_or("");
    let state = serde_json::from_slice::<serde_json::Value>(&request.body)
        .ok()
        .and_then(|b| b.get("state").and_then(|s| s.as_str()).map(str::to_owned))
        .unwrap_or_default();
    format!("{} {state}", short(sha))
}

/// Sends one status request; what became of it.
async fn send(
    url: &str,
    headers: &[(&'static str, String)],
    body: &[u8],
    timeout: std::time::Duration,
) -> SendResult {
    let url = match Url::parse(url) {
        Ok(u) => u,
        Err(e) => return SendResult::Transport(e.to_string()),
    };
    let tls = if url.tls {
        match http_client::tls_with_system_roots() {
            Ok(c) => Some(c),
            Err(e) => return SendResult::Transport(e.to_string()),
        }
    } else {
        None
    };
    let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (*k, v.clone())).collect();
    match http_client::post(&url, tls, &headers, body, timeout).await {
        Ok(code) => SendResult::Status(code),
        Err(e) => SendResult::Transport(e.to_string()),
    }
}

/// The web address of a forge from a clone URL: `https://host[:port]` for
/// `http(s)://[user@]host[:port]/...`, `https://host` for ssh; `None` otherwise.
fn web_base(url: &str) -> Option<String> {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority = rest.split('/').next()?;
        let host = authority.rsplit('@').next()?;
        return match scheme {
            "http" | "https" if !host.is_empty() => Some(format!("{scheme}://{host}")),
            "ssh" | "git" if !host.is_empty() => {
                Some(format!("https://{}", host.split(':').next()?))
            }
            _ => None,
        };
    }
    // scp-like `user@host:path`.
    let (left, _) = url.split_once(':')?;
    let host = left.rsplit('@').next()?;
    (!host.is_empty() && !host.contains('/')).then(|| format!("https://{host}"))
}

/// The repository's path on its forge: the URL's path without `.git`, its last two
/// segments (`owner/repo`) except on GitLab, whose projects nest in groups.
fn project_of(forge: Forge, url: &str) -> String {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
        None => url.split_once(':').map_or(url, |(_, p)| p),
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match forge {
        Forge::Gitlab => segments.join("/"),
        Forge::Github | Forge::Gitea => segments[segments.len().saturating_sub(2)..].join("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forge_addresses_come_from_clone_urls() {
        for (url, web) in [
            (
                "https://tok@git.lan:3000/team/app.git",
                Some("https://git.lan:3000"),
            ),
            ("git@github.com:octo/hello.git", Some("https://github.com")),
            ("ssh://git@gl.lan:2222/g/s/app", Some("https://gl.lan")),
            ("file:///srv/app", None),
            ("/srv/app", None),
        ] {
            assert_eq!(web_base(url).as_deref(), web, "{url}");
        }
        for (forge, url, project) in [
            (Forge::Github, "git@github.com:octo/hello.git", "octo/hello"),
            (Forge::Gitea, "https://git.lan/team/app.git/", "team/app"),
            (Forge::Gitlab, "https://gl.lan/g/sub/app.git", "g/sub/app"),
            (Forge::Github, "file:///tmp/x/owner/repo", "owner/repo"),
        ] {
            assert_eq!(project_of(forge, url), project, "{url}");
        }
    }
}
