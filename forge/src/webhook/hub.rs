//! GitHub's payloads, and Gitea/Forgejo's, which copy their shape (`ref`, `before`,
//! `after`, `commits[].added|modified|removed`, `repository.full_name`,
//! `pull_request.head|base`, `sender.login`). Where they differ:
//! - the pull request's new-commits action is `synchronize` on GitHub and
//!   `synchronized` on Gitea (`modules/structs/hook.go`, `HookIssueSynchronized`);
//! - Gitea counts the pushed commits in `total_commits` and says which repository a
//!   pull request's branch lives in with `head.repo_id`;
//! - GitHub lists at most 2,048 commits in a push and marks a deletion with
//!   `deleted: true`; Gitea announces deletions with a `delete` event of its own
//!   (`ref` is the short name, `ref_type` is `branch` or `tag`).
//!
//! Fields are all optional here so that a missing one gets a message naming it, and
//! fields nobody needs are skipped by serde without being stored.

use serde::Deserialize;

use super::read::{
    display_text, label_names, Ctx, Delivery, PushCommit, PushParts, RepoFields, WebhookError,
};
use crate::types::{EventKind, Forge, GitRef, PullRequest, PullRequestAction, RepoIdentity};

/// GitHub stops listing a push's commits here.
const GITHUB_MAX_LISTED_COMMITS: usize = 2048;

#[derive(Deserialize)]
struct User {
    login: Option<String>,
    /// Gitea's users carry both `login` and `username`.
    username: Option<String>,
    /// GitHub's `pusher` has only `name` and `email`.
    name: Option<String>,
}

impl User {
    fn handle(self) -> Option<String> {
        self.login.or(self.username).or(self.name)
    }
}

#[derive(Deserialize)]
struct Repo {
    id: Option<u64>,
    full_name: Option<String>,
    clone_url: Option<String>,
    ssh_url: Option<String>,
    html_url: Option<String>,
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    deleted: Option<bool>,
    commits: Option<Vec<PushCommit>>,
    total_commits: Option<u64>,
    repository: Option<Repo>,
    pusher: Option<User>,
    sender: Option<User>,
}

#[derive(Deserialize)]
struct Label {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Branch {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    repo_id: Option<u64>,
    repo: Option<Repo>,
}

#[derive(Deserialize)]
struct Pull {
    number: Option<u64>,
    title: Option<String>,
    user: Option<User>,
    head: Option<Branch>,
    base: Option<Branch>,
    labels: Option<Vec<Label>>,
}

#[derive(Deserialize)]
struct PullPayload {
    action: Option<String>,
    number: Option<u64>,
    pull_request: Option<Pull>,
    repository: Option<Repo>,
    sender: Option<User>,
}

#[derive(Deserialize)]
struct DeletePayload {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    ref_type: Option<String>,
    repository: Option<Repo>,
    sender: Option<User>,
}

#[derive(Deserialize)]
struct RepoOnly {
    repository: Option<Repo>,
}

impl From<Repo> for RepoFields {
    fn from(r: Repo) -> Self {
        RepoFields {
            name_field: "full_name",
            full_name: r.full_name,
            id: r.id,
            clone_urls: [r.clone_url, r.ssh_url],
            web_url: r.html_url,
        }
    }
}

pub(super) fn peek_repository(forge: Forge, body: &[u8]) -> Result<RepoIdentity, WebhookError> {
    let ctx = Ctx::peek(forge);
    let payload: RepoOnly = ctx.json(body)?;
    ctx.identity(payload.repository, "repository")
}

/// The handle of the user acting: `sender`'s, else `fallback`'s (GitHub's `pusher`).
fn handle(sender: Option<User>, fallback: Option<User>) -> Option<String> {
    sender
        .and_then(User::handle)
        .or_else(|| fallback.and_then(User::handle))
}

fn actor(ctx: &Ctx, sender: Option<User>) -> Result<String, WebhookError> {
    ctx.name(handle(sender, None), "sender.login")
}

pub(super) fn push(ctx: &Ctx, body: &[u8]) -> Result<Delivery, WebhookError> {
    let p: PushPayload = ctx.json(body)?;
    let (forge, total) = (ctx.forge, p.total_commits);
    let push = PushParts {
        git_ref: p.git_ref,
        before: p.before,
        after: p.after,
        deleted: p.deleted == Some(true),
        commits: p.commits,
        repository: (p.repository.map(RepoFields::from), "repository"),
        actor: (handle(p.sender, p.pusher), "sender.login"),
    };
    ctx.push(push, |listed| match (forge, total) {
        (_, Some(total)) => total <= listed as u64,
        (Forge::Github, None) => listed < GITHUB_MAX_LISTED_COMMITS,
        (_, None) => true,
    })
}

pub(super) fn gitea_delete(ctx: &Ctx, body: &[u8]) -> Result<Delivery, WebhookError> {
    let p: DeletePayload = ctx.json(body)?;
    let name = p.git_ref.ok_or_else(|| ctx.malformed("ref is missing"))?;
    let git_ref = match p.ref_type.as_deref() {
        // Older Gitea versions sent the full ref; newer ones the short name.
        _ if name.starts_with("refs/") => GitRef::parse_full(&name)
            .map_err(|e| ctx.malformed(e))?
            .ok_or_else(|| ctx.malformed(format!("ref {name:?} is neither a branch nor a tag")))?,
        Some("branch") => GitRef::branch(&name).map_err(|e| ctx.malformed(e))?,
        Some("tag") => GitRef::tag(&name).map_err(|e| ctx.malformed(e))?,
        other => {
            return Err(ctx.malformed(format!(
                "ref_type is {other:?}; expected \"branch\" or \"tag\""
            )))
        }
    };
    let repository = ctx.identity(p.repository, "repository")?;
    let actor = actor(ctx, p.sender)?;
    let kind = EventKind::RefDeleted {
        git_ref,
        before: None,
    };
    Ok(ctx.event(repository, actor, kind))
}

pub(super) fn pull_request(ctx: &Ctx, body: &[u8]) -> Result<Delivery, WebhookError> {
    let p: PullPayload = ctx.json(body)?;
    let action_text = p.action.ok_or_else(|| ctx.malformed("action is missing"))?;
    let synchronize = match ctx.forge {
        Forge::Gitea => "synchronized",
        _ => "synchronize",
    };
    let action = match action_text.as_str() {
        "opened" => PullRequestAction::Opened,
        "reopened" => PullRequestAction::Reopened,
        a if a == synchronize => PullRequestAction::Synchronized,
        other => {
            return Ok(ctx.ignored(format!(
                "pull request action {} starts nothing; opened, {synchronize} and reopened do",
                crate::types::quote(other, 64)
            )))
        }
    };
    let repository = ctx.identity(p.repository, "repository")?;
    let actor = actor(ctx, p.sender)?;
    let pr = p
        .pull_request
        .ok_or_else(|| ctx.malformed("pull_request is missing"))?;
    let number = pr
        .number
        .or(p.number)
        .ok_or_else(|| ctx.malformed("pull_request.number is missing"))?;
    let head = pr
        .head
        .ok_or_else(|| ctx.malformed("pull_request.head is missing"))?;
    let base = pr
        .base
        .ok_or_else(|| ctx.malformed("pull_request.base is missing"))?;
    let head_commit = ctx.commit(head.sha.as_deref(), "pull_request.head.sha")?;
    let head_ref = ctx.branch(head.git_ref, "pull_request.head.ref")?;
    let base_ref = ctx.branch(base.git_ref, "pull_request.base.ref")?;
    let base_id = base
        .repo
        .as_ref()
        .and_then(|r| r.id)
        .or(base.repo_id)
        .or(repository.id)
        .filter(|id| *id != 0);
    let head_id = head
        .repo
        .as_ref()
        .and_then(|r| r.id)
        .or(head.repo_id)
        .filter(|id| *id != 0);
    // A deleted fork leaves no repository on the head; whatever cannot be compared
    // counts as a fork.
    let head_repository = match head.repo {
        Some(repo) => Some(ctx.identity(Some(repo), "pull_request.head.repo")?),
        None => None,
    };
    let from_fork = match (head_id, base_id, &head_repository) {
        (Some(h), Some(b), _) => h != b,
        (_, _, Some(head_repo)) => !head_repo
            .full_name
            .eq_ignore_ascii_case(&repository.full_name),
        _ => true,
    };
    let author = pr
        .user
        .and_then(User::handle)
        .map(|a| ctx.name(Some(a), "pull_request.user.login"))
        .transpose()?;
    Ok(ctx.event(
        repository,
        actor,
        EventKind::PullRequest(PullRequest {
            action,
            number,
            title: display_text(pr.title),
            author,
            head_commit,
            head_ref,
            base_ref,
            head_repository,
            from_fork,
            labels: label_names(pr.labels.unwrap_or_default().into_iter().map(|l| l.name)),
        }),
    ))
}
