//! GitLab's payloads (`doc/user/project/integrations/webhook_events.md`):
//! - `Push Hook` / `Tag Push Hook`: `ref`, `before`, `after` (all zeros when the ref was
//!   deleted), `user_username`, `project.{id, path_with_namespace, git_http_url,
//!   git_ssh_url, web_url}`, `commits[]` with `added|modified|removed`. Only the newest
//!   20 commits are listed; `total_commits_count` has the real number.
//! - `Merge Request Hook`: `user.username`, `project` (the target), and
//!   `object_attributes.{iid, title, action, source_branch, target_branch,
//!   source_project_id, target_project_id, source, last_commit.id, oldrev, labels}`.
//!   `action` is one of open, close, reopen, update, approved, unapproved, approval,
//!   unapproval, merge; an `update` carries `oldrev` only when commits were pushed.

use serde::Deserialize;

use super::read::{
    display_text, label_names, Ctx, Delivery, PushCommit, PushParts, RepoFields, WebhookError,
};
use crate::types::{quote, EventKind, PullRequest, PullRequestAction, RepoIdentity};

#[derive(Deserialize)]
struct Project {
    id: Option<u64>,
    path_with_namespace: Option<String>,
    git_http_url: Option<String>,
    git_ssh_url: Option<String>,
    web_url: Option<String>,
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    user_username: Option<String>,
    user_name: Option<String>,
    project: Option<Project>,
    commits: Option<Vec<PushCommit>>,
    total_commits_count: Option<u64>,
}

#[derive(Deserialize)]
struct User {
    username: Option<String>,
}

#[derive(Deserialize)]
struct Label {
    title: Option<String>,
}

#[derive(Deserialize)]
struct LastCommit {
    id: Option<String>,
}

#[derive(Deserialize)]
struct MergeRequest {
    iid: Option<u64>,
    title: Option<String>,
    action: Option<String>,
    oldrev: Option<String>,
    source_branch: Option<String>,
    target_branch: Option<String>,
    source_project_id: Option<u64>,
    target_project_id: Option<u64>,
    source: Option<Project>,
    last_commit: Option<LastCommit>,
    labels: Option<Vec<Label>>,
}

#[derive(Deserialize)]
struct MergeRequestPayload {
    user: Option<User>,
    project: Option<Project>,
    object_attributes: Option<MergeRequest>,
    labels: Option<Vec<Label>>,
}

#[derive(Deserialize)]
struct ProjectOnly {
    project: Option<Project>,
}

impl From<Project> for RepoFields {
    fn from(p: Project) -> Self {
        RepoFields {
            name_field: "path_with_namespace",
            full_name: p.path_with_namespace,
            id: p.id,
            clone_urls: [p.git_http_url, p.git_ssh_url],
            web_url: p.web_url,
        }
    }
}

pub(super) fn peek_repository(body: &[u8]) -> Result<RepoIdentity, WebhookError> {
    let ctx = Ctx::peek(crate::Forge::Gitlab);
    let payload: ProjectOnly = ctx.json(body)?;
    ctx.identity(payload.project, "project")
}

pub(super) fn push(ctx: &Ctx, body: &[u8]) -> Result<Delivery, WebhookError> {
    let p: PushPayload = ctx.json(body)?;
    let total = p.total_commits_count;
    let push = PushParts {
        git_ref: p.git_ref,
        before: p.before,
        after: p.after,
        deleted: false,
        commits: p.commits,
        repository: (p.project.map(RepoFields::from), "project"),
        actor: (p.user_username.or(p.user_name), "user_username"),
    };
    ctx.push(push, |listed| {
        total.is_none_or(|total| total <= listed as u64)
    })
}

pub(super) fn merge_request(ctx: &Ctx, body: &[u8]) -> Result<Delivery, WebhookError> {
    let p: MergeRequestPayload = ctx.json(body)?;
    let mr = p
        .object_attributes
        .ok_or_else(|| ctx.malformed("object_attributes is missing"))?;
    let action = match mr.action.as_deref() {
        Some("open") => PullRequestAction::Opened,
        Some("reopen") => PullRequestAction::Reopened,
        Some("update") if mr.oldrev.as_deref().is_some_and(|r| !r.is_empty()) => {
            PullRequestAction::Synchronized
        }
        Some("update") => {
            return Ok(ctx.ignored(
                "merge request updated without new commits (no object_attributes.oldrev): title, labels or description changed".into(),
            ))
        }
        Some(other) => {
            return Ok(ctx.ignored(format!(
                "merge request action {} starts nothing; open, update with new commits and reopen do",
                quote(other, 64)
            )))
        }
        None => return Err(ctx.malformed("object_attributes.action is missing")),
    };
    let repository = ctx.identity(p.project, "project")?;
    let actor = ctx.name(p.user.and_then(|u| u.username), "user.username")?;
    let number = mr
        .iid
        .ok_or_else(|| ctx.malformed("object_attributes.iid is missing"))?;
    let head_commit = ctx.commit(
        mr.last_commit.and_then(|c| c.id).as_deref(),
        "object_attributes.last_commit.id",
    )?;
    let head_ref = ctx.branch(mr.source_branch, "object_attributes.source_branch")?;
    let base_ref = ctx.branch(mr.target_branch, "object_attributes.target_branch")?;
    let target_id = mr.target_project_id.or(repository.id);
    // An unknown source project counts as a fork.
    let from_fork = match (mr.source_project_id, target_id) {
        (Some(source), Some(target)) => source != target,
        _ => true,
    };
    let head_repository = match mr.source {
        Some(mut source) => {
            source.id = source.id.or(mr.source_project_id);
            Some(ctx.identity(Some(source), "object_attributes.source")?)
        }
        None => None,
    };
    let labels = mr.labels.or(p.labels).unwrap_or_default();
    Ok(ctx.event(
        repository,
        actor,
        EventKind::PullRequest(PullRequest {
            action,
            number,
            title: display_text(mr.title),
            author: None,
            head_commit,
            head_ref,
            base_ref,
            head_repository,
            from_fork,
            labels: label_names(labels.into_iter().map(|l| l.title)),
        }),
    ))
}
