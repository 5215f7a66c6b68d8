//! What every payload reader shares: the bounds, the refusals and what a delivery
//! asks for, and the checked readers of names, commit ids, refs, URLs, labels and a
//! push's commits. It must not know any one forge's payload shape (`hub.rs` and
//! `gitlab.rs` do) nor how deliveries are authenticated (`mod.rs`).

use std::collections::HashSet;

use crate::types::{quote, Forge, ForgeEvent, RepoIdentity};

/// Largest webhook body accepted. GitHub lists at most 2,048 commits in a push, each
/// ~1.5–2 KiB of JSON with its file lists, so its largest ordinary pushes are ~4 MiB;
/// GitLab lists 20 commits. Twice that leaves room for long path lists. A larger body
/// (a push of thousands of commits with huge file lists) is refused with 413: trigger
/// that commit with `gantry run --repo` or let polling find it. The shell should refuse
/// to read more than this before calling in (it is also checked here).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Distinct changed paths kept from one push. `paths:` filters need a few; 20,000 is
/// a large monorepo merge. Beyond it [`crate::Push::paths_complete`] is false.
pub const MAX_CHANGED_PATHS: usize = 20_000;

/// Longest changed path kept (Linux's PATH_MAX); a longer one marks the list incomplete.
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest name (user, repository path) accepted; forges allow far less (GitHub 39
/// characters per user, GitLab 255 per path component).
pub const MAX_NAME_BYTES: usize = 512;

/// Longest URL kept from a payload; longer ones are dropped, not refused.
pub const MAX_URL_BYTES: usize = 2048;

/// Why a delivery was refused. Every message says what was wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook body is {bytes} bytes, more than the {MAX_BODY_BYTES} accepted: a push of thousands of commits; run that commit with `gantry run --repo` or let polling find it")]
    TooLarge { bytes: usize },
    #[error("not a forge webhook delivery: none of X-GitHub-Event, X-Gitea-Event, X-Forgejo-Event or X-Gitlab-Event is present; point the forge's webhook at this URL, or call the API for manual runs")]
    UnknownForge,
    #[error("this delivery comes from {found} ({header} is present) but the repository is registered as {expected}; register it with `--forge {}`", found.as_str())]
    WrongForge {
        expected: Forge,
        found: Forge,
        header: &'static str,
    },
    #[error("no webhook secret is set for this repository, so no delivery can be trusted; set one on the repository and the same value on the {0} webhook")]
    NoSecret(Forge),
    #[error("the {header} header is missing: set a secret on the {forge} webhook, the same as the repository's webhook secret in Gantry")]
    MissingSignature { forge: Forge, header: &'static str },
    #[error("{header} does not match the body and the repository's webhook secret: the secret on the {forge} webhook differs from Gantry's, or the body was changed on the way")]
    BadSignature { forge: Forge, header: &'static str },
    #[error("the {header} header is missing: {forge} names the event in it; is this delivery from {forge}?")]
    MissingEvent { forge: Forge, header: &'static str },
    #[error("{forge} event {event} is not one Gantry acts on; on the webhook, select only push and pull request (GitLab: merge request) events")]
    UnsupportedEvent { forge: Forge, event: String },
    #[error("{forge} {event} payload: {problem}")]
    Malformed {
        forge: Forge,
        event: String,
        problem: String,
    },
}

impl WebhookError {
    /// The status a shell answers the forge with. Forges show it in their delivery
    /// log, next to the body (the error message).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            Self::MissingSignature { .. } | Self::BadSignature { .. } => 401,
            Self::NoSecret(_) => 503,
            Self::UnknownForge
            | Self::WrongForge { .. }
            | Self::MissingEvent { .. }
            | Self::UnsupportedEvent { .. }
            | Self::Malformed { .. } => 400,
        }
    }
}

/// What a verified delivery asks for.
// Returned once per delivery; boxing the event would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Event(ForgeEvent),
    /// A well-formed delivery that starts nothing (a ping, a closed pull request, a
    /// label change); answer 200 with the reason so the forge's log shows it.
    Ignored(Ignored),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub forge: Forge,
    pub event: String,
    pub reason: String,
}

/// What every payload reader needs to build its results and errors.
pub(crate) struct Ctx {
    pub forge: Forge,
    pub event: String,
    /// The forge's id of the delivery, kept on the event.
    pub delivery: Option<String>,
}

impl Ctx {
    /// For reading a payload before its event is known (to find its repository).
    pub fn peek(forge: Forge) -> Self {
        Ctx {
            forge,
            event: "webhook".into(),
            delivery: None,
        }
    }

    pub fn malformed(&self, problem: impl Into<String>) -> WebhookError {
        WebhookError::Malformed {
            forge: self.forge,
            event: quote(&self.event, 64),
            problem: problem.into(),
        }
    }

    /// The event this delivery asks for.
    pub fn event(
        &self,
        repository: RepoIdentity,
        actor: String,
        kind: crate::EventKind,
    ) -> Delivery {
        Delivery::Event(ForgeEvent {
            forge: self.forge,
            delivery: self.delivery.clone(),
            repository,
            actor,
            kind,
        })
    }

    pub fn ignored(&self, reason: String) -> Delivery {
        Delivery::Ignored(Ignored {
            forge: self.forge,
            event: self.event.clone(),
            reason,
        })
    }

    /// Reads the body as `T`, naming the line and column of a syntax or type error.
    pub fn json<T: serde::de::DeserializeOwned>(&self, body: &[u8]) -> Result<T, WebhookError> {
        serde_json::from_slice(body).map_err(|e| {
            self.malformed(format!(
                "{e}; the body must be the forge's JSON payload (on the webhook, choose the content type application/json)"
            ))
        })
    }

    /// A required name-like field: present, non-empty, no control characters, bounded.
    pub fn name(&self, value: Option<String>, field: &str) -> Result<String, WebhookError> {
        let value = value.ok_or_else(|| self.malformed(format!("{field} is missing")))?;
        if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(char::is_control) {
            return Err(self.malformed(format!(
                "{field} {} is empty, longer than {MAX_NAME_BYTES} bytes or has control characters",
                quote(&value, 64)
            )));
        }
        Ok(value)
    }

    /// The ref of a push: a branch or a tag, or the answer that ignores any other ref.
    pub fn push_ref(
        &self,
        value: Option<String>,
    ) -> Result<Result<crate::GitRef, Delivery>, WebhookError> {
        let full = value.ok_or_else(|| self.malformed("ref is missing"))?;
        match crate::GitRef::parse_full(&full).map_err(|e| self.malformed(e))? {
            Some(git_ref) => Ok(Ok(git_ref)),
            None => Ok(Err(self.ignored(format!(
                "ref {} is neither a branch nor a tag",
                quote(&full, 80)
            )))),
        }
    }

    /// A required commit id field.
    pub fn commit(
        &self,
        value: Option<&str>,
        field: &str,
    ) -> Result<crate::CommitId, WebhookError> {
        let value = value.ok_or_else(|| self.malformed(format!("{field} is missing")))?;
        crate::CommitId::parse(value).map_err(|e| self.malformed(format!("{field}: {e}")))
    }

    /// A branch name field (the short form, as pull requests give it).
    pub fn branch(&self, value: Option<String>, field: &str) -> Result<String, WebhookError> {
        let value = value.ok_or_else(|| self.malformed(format!("{field} is missing")))?;
        crate::types::check_ref_name(&value)
            .map_err(|e| self.malformed(format!("{field}: {e}")))?;
        Ok(value)
    }
}

/// A payload's repository object, whatever the forge calls its fields.
pub(crate) struct RepoFields {
    /// The forge's name of the full-name field, for the error that names it.
    pub name_field: &'static str,
    pub full_name: Option<String>,
    pub id: Option<u64>,
    /// HTTP(S) and SSH.
    pub clone_urls: [Option<String>; 2],
    pub web_url: Option<String>,
}

impl Ctx {
    /// The identity of the required repository object at `field`.
    pub fn identity(
        &self,
        repo: Option<impl Into<RepoFields>>,
        field: &str,
    ) -> Result<RepoIdentity, WebhookError> {
        let repo: RepoFields = repo
            .ok_or_else(|| self.malformed(format!("{field} is missing")))?
            .into();
        Ok(RepoIdentity {
            full_name: self.name(repo.full_name, &format!("{field}.{}", repo.name_field))?,
            id: repo.id,
            clone_urls: repo.clone_urls.into_iter().filter_map(keep_url).collect(),
            web_url: keep_url(repo.web_url),
        })
    }
}

/// A URL worth keeping from a payload, or nothing.
pub(crate) fn keep_url(value: Option<String>) -> Option<String> {
    value.filter(|u| {
        !u.is_empty()
            && u.len() <= MAX_URL_BYTES
            && !u.chars().any(|c| c.is_control() || c.is_whitespace())
    })
}

/// A title for display: control characters become spaces, at most 256 characters.
pub(crate) fn display_text(value: Option<String>) -> String {
    value
        .unwrap_or_default()
        .chars()
        .take(256)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Label names: bounded in count and length, control characters dropped.
pub(crate) fn label_names(names: impl Iterator<Item = Option<String>>) -> Vec<String> {
    names
        .flatten()
        .filter(|n| !n.is_empty() && n.len() <= MAX_NAME_BYTES && !n.chars().any(char::is_control))
        .take(100)
        .collect()
}

/// One commit of a push's `commits` list; GitHub, Gitea and GitLab name these alike.
#[derive(serde::Deserialize)]
pub(crate) struct PushCommit {
    added: Option<Vec<String>>,
    modified: Option<Vec<String>>,
    removed: Option<Vec<String>>,
}

/// A push payload's fields, whatever the forge calls them.
pub(crate) struct PushParts {
    pub git_ref: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    /// Whether the forge says the ref was deleted (GitHub's `deleted`).
    pub deleted: bool,
    pub commits: Option<Vec<PushCommit>>,
    /// The repository object, and the field it is read from.
    pub repository: (Option<RepoFields>, &'static str),
    /// Who pushed, and the field it is read from.
    pub actor: (Option<String>, &'static str),
}

impl Ctx {
    /// What a push asks for: nothing for a ref that is neither a branch nor a tag, else
    /// the push (or deletion) of the repository by the actor. `listed_all(n)` says
    /// whether `n` listed commits are all the push had.
    pub fn push(
        &self,
        push: PushParts,
        listed_all: impl FnOnce(usize) -> bool,
    ) -> Result<Delivery, WebhookError> {
        let git_ref = match self.push_ref(push.git_ref)? {
            Ok(git_ref) => git_ref,
            Err(ignored) => return Ok(ignored),
        };
        let repository = self.identity(push.repository.0, push.repository.1)?;
        let actor = self.name(push.actor.0, push.actor.1)?;
        let kind = push_kind(
            self,
            git_ref,
            push.before.as_deref(),
            push.after.as_deref(),
            push.deleted,
            push.commits.unwrap_or_default(),
            listed_all,
        )?;
        Ok(self.event(repository, actor, kind))
    }
}

/// A push of `git_ref` from `before` to `after` as the forge wrote them: a deletion
/// when `after` is all zeros or the forge says so, else the push with its changed
/// paths. `listed_all(n)` says whether `n` listed commits are all the push had.
fn push_kind(
    ctx: &Ctx,
    git_ref: crate::GitRef,
    before: Option<&str>,
    after: Option<&str>,
    deleted: bool,
    commits: Vec<PushCommit>,
    listed_all: impl FnOnce(usize) -> bool,
) -> Result<crate::EventKind, WebhookError> {
    let before = match before {
        Some(b) => {
            crate::CommitId::parse_nonzero(b).map_err(|e| ctx.malformed(format!("before: {e}")))?
        }
        None => None,
    };
    let after = after.ok_or_else(|| ctx.malformed("after is missing"))?;
    let after =
        crate::CommitId::parse_nonzero(after).map_err(|e| ctx.malformed(format!("after: {e}")))?;
    let Some(after) = after.filter(|_| !deleted) else {
        return Ok(crate::EventKind::RefDeleted { git_ref, before });
    };
    let listed_all = !commits.is_empty() && listed_all(commits.len());
    let mut paths = ChangedPaths::default();
    for commit in commits {
        for list in [commit.added, commit.modified, commit.removed] {
            for path in list.unwrap_or_default() {
                paths.add(path);
            }
        }
    }
    let (changed_paths, paths_complete) = paths.finish(listed_all);
    Ok(crate::EventKind::Push(crate::Push {
        git_ref,
        before,
        after,
        changed_paths,
        paths_complete,
    }))
}

/// Changed paths of a push, each once, bounded.
#[derive(Default)]
struct ChangedPaths {
    seen: HashSet<String>,
    list: Vec<String>,
    overflow: bool,
}

impl ChangedPaths {
    fn add(&mut self, path: String) {
        if path.is_empty() || path.len() > MAX_PATH_BYTES || self.list.len() >= MAX_CHANGED_PATHS {
            if !self.seen.contains(&path) {
                self.overflow = true;
            }
            return;
        }
        if self.seen.insert(path.clone()) {
            self.list.push(path);
        }
    }

    /// The list, and whether it is whole given that the forge listed all commits.
    fn finish(self, forge_listed_all: bool) -> (Vec<String>, bool) {
        (self.list, forge_listed_all && !self.overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_paths_are_deduplicated_and_bounded() {
        let mut paths = ChangedPaths::default();
        for i in 0..(MAX_CHANGED_PATHS + 10) {
            paths.add(format!("p{i}"));
            paths.add("p0".into());
        }
        let (list, complete) = paths.finish(true);
        assert_eq!(list.len(), MAX_CHANGED_PATHS);
        assert!(!complete);
        let mut small = ChangedPaths::default();
        small.add("a".into());
        small.add("a".into());
        assert_eq!(small.finish(true), (vec!["a".to_owned()], true));
    }
}
