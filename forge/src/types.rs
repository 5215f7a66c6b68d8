//! The normalized vocabulary every forge is translated into: which forge, commit ids,
//! refs, repository identities and the events a webhook can start work with.
//!
//! Every value here has been checked on the way in (see [`crate::webhook`]): a commit id
//! is hex of the right length, a ref name passes git's own rules for ref names, names
//! have no control characters. Values from a forge end up in job environments
//! (`GANTRY_REF`), git command lines and log lines, so they are refused rather than
//! escaped when they do not fit.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The forge software on the other side. Forgejo is a fork of Gitea with the same
/// webhook payloads and status API, so it is `Gitea` here; only its header names differ
/// (`X-Forgejo-*`, which it sends beside `X-Gitea-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    Github,
    Gitea,
    Gitlab,
}

impl Forge {
    pub const ALL: [Forge; 3] = [Forge::Github, Forge::Gitea, Forge::Gitlab];

    /// `github`, `gitea` (also `forgejo`) or `gitlab`, as `gantry repos add --forge` takes it.
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "github" => Some(Self::Github),
            "gitea" | "forgejo" => Some(Self::Gitea),
            "gitlab" => Some(Self::Gitlab),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Gitea => "gitea",
            Self::Gitlab => "gitlab",
        }
    }

    /// How people call it in messages.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Github => "GitHub",
            Self::Gitea => "Gitea/Forgejo",
            Self::Gitlab => "GitLab",
        }
    }
}

impl fmt::Display for Forge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// A commit id: 40 (SHA-1) or 64 (SHA-256 repositories) lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitId(String);

impl CommitId {
    /// Accepts upper-case digits and stores them lower-case.
    pub fn parse(text: &str) -> Result<Self, String> {
        let ok_len = text.len() == 40 || text.len() == 64;
        if !ok_len || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{} is not a commit id (40 or 64 hex digits)",
                quote(text, 80)
            ));
        }
        Ok(Self(text.to_ascii_lowercase()))
    }

    /// `None` for the all-zero id forges send for "no commit" (a created or deleted ref).
    pub fn parse_nonzero(text: &str) -> Result<Option<Self>, String> {
        let id = Self::parse(text)?;
        Ok((!id.is_zero()).then_some(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, as shown on dashboards.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    fn is_zero(&self) -> bool {
        self.0.bytes().all(|b| b == b'0')
    }
}

impl TryFrom<String> for CommitId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Self::parse(&value)
    }
}

impl From<CommitId> for String {
    fn from(value: CommitId) -> Self {
        value.0
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest ref name accepted (the part after `refs/heads/` or `refs/tags/`). Git has no
/// limit of its own, but a ref is a file name on most servers (255 bytes per component);
/// 1 KiB allows deep `a/b/c` hierarchies and keeps environment variables small.
pub const MAX_REF_NAME_BYTES: usize = 1024;

/// A branch or a tag, by its short name (`main`, `v1.2`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GitRef {
    Branch(String),
    Tag(String),
}

impl GitRef {
    /// Reads a full ref (`refs/heads/main`, `refs/tags/v1`). `Ok(None)` for refs that are
    /// neither (`refs/pull/1/head`, `refs/notes/x`); an error for a name git itself
    /// would refuse.
    pub fn parse_full(full: &str) -> Result<Option<Self>, String> {
        if let Some(name) = full.strip_prefix("refs/heads/") {
            check_ref_name(name)?;
            Ok(Some(Self::Branch(name.to_owned())))
        } else if let Some(name) = full.strip_prefix("refs/tags/") {
            check_ref_name(name)?;
            Ok(Some(Self::Tag(name.to_owned())))
        } else {
            Ok(None)
        }
    }

    /// A branch by its short name, checked like [`GitRef::parse_full`].
    pub fn branch(name: &str) -> Result<Self, String> {
        check_ref_name(name)?;
        Ok(Self::Branch(name.to_owned()))
    }

    /// A tag by its short name, checked like [`GitRef::parse_full`].
    pub fn tag(name: &str) -> Result<Self, String> {
        check_ref_name(name)?;
        Ok(Self::Tag(name.to_owned()))
    }

    /// `refs/heads/<name>` or `refs/tags/<name>`.
    pub fn full(&self) -> String {
        match self {
            Self::Branch(name) => format!("refs/heads/{name}"),
            Self::Tag(name) => format!("refs/tags/{name}"),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Branch(name) | Self::Tag(name) => name,
        }
    }

    pub fn is_tag(&self) -> bool {
        matches!(self, Self::Tag(_))
    }
}

impl fmt::Display for GitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full())
    }
}

/// Git's rules for a ref name (`git check-ref-format`), plus one of Gantry's: no
/// component starts with `-`, so a name can never be read as an option by a git command
/// line it ends up on.
pub fn check_ref_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("ref name {}: {why}", quote(name, 80)));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_REF_NAME_BYTES {
        return bad(&format!("is longer than {MAX_REF_NAME_BYTES} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return bad(&format!(
            "has the character {c:?}, which git refuses in ref names"
        ));
    }
    if name.contains("..") || name.contains("@{") || name == "@" || name.contains("//") {
        return bad("has `..`, `@{`, `//` or is `@`, which git refuses");
    }
    if name.starts_with('/') || name.ends_with('/') || name.ends_with('.') {
        return bad("starts or ends with `/`, or ends with `.`");
    }
    for component in name.split('/') {
        // Git refuses `.lock` exactly; any case is refused here, for servers on
        // case-insensitive file systems.
        if component.starts_with('.') || component.to_ascii_lowercase().ends_with(".lock") {
            return bad("has a component starting with `.` or ending with `.lock`");
        }
        if component.starts_with('-') {
            return bad("has a component starting with `-`");
        }
    }
    Ok(())
}

/// Which repository an event is about, as the forge names it: enough to find the
/// registered repository it belongs to ([`RepoIdentity::matches_url`]) and, for GitLab,
/// the project id its status API is addressed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoIdentity {
    /// `owner/name` (GitHub, Gitea) or the project path with its groups
    /// (`group/subgroup/project`, GitLab).
    pub full_name: String,
    /// The forge's numeric id of the repository or project, when the payload has it.
    pub id: Option<u64>,
    /// Clone URLs the payload names (HTTP(S) and SSH).
    pub clone_urls: Vec<String>,
    /// The repository's web page.
    pub web_url: Option<String>,
}

impl RepoIdentity {
    /// Whether `url` (a registered repository's clone URL, in any of the forms git
    /// accepts: `https://host/o/r(.git)`, `ssh://git@host:22/o/r`, `git@host:o/r.git`)
    /// names this repository: same host (ports ignored, since SSH and HTTPS differ) and
    /// same path, compared without `.git`, trailing slashes and case (all three forges
    /// treat repository paths case-insensitively).
    pub fn matches_url(&self, url: &str) -> bool {
        let Some(wanted) = RepoLocation::parse(url) else {
            return false;
        };
        self.clone_urls
            .iter()
            .chain(self.web_url.iter())
            .filter_map(|u| RepoLocation::parse(u))
            .any(|known| known == wanted)
    }
}

/// A repository URL reduced to what identifies it: lower-case host without port, and
/// lower-case path without `.git` and surrounding slashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoLocation {
    pub host: String,
    pub path: String,
}

impl RepoLocation {
    pub fn parse(url: &str) -> Option<Self> {
        let url = url.trim();
        let (authority, path) = if let Some((scheme, rest)) = url.split_once("://") {
            if !matches!(
                scheme.to_ascii_lowercase().as_str(),
                "http" | "https" | "ssh" | "git" | "git+ssh" | "ssh+git"
            ) {
                return None;
            }
            match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            }
        } else {
            // scp-like `user@host:path`, as git reads it when there is no `://`.
            let (authority, path) = url.split_once(':')?;
            if authority.contains('/') {
                return None;
            }
            (authority, path)
        };
        let host_port = authority.rsplit('@').next()?;
        let host = if let Some(v6) = host_port.strip_prefix('[') {
            v6.split(']').next()?
        } else {
            host_port.split(':').next()?
        };
        let path = path.split(['?', '#']).next()?.trim_matches('/');
        let path = path
            .strip_suffix(".git")
            .unwrap_or(path)
            .trim_end_matches('/');
        if host.is_empty() || path.is_empty() {
            return None;
        }
        Some(Self {
            host: host.to_ascii_lowercase(),
            path: path.to_ascii_lowercase(),
        })
    }
}

/// One webhook delivery that asks for work, normalized across forges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeEvent {
    pub forge: Forge,
    /// The forge's id of this delivery (`X-GitHub-Delivery`, `X-Gitea-Delivery`,
    /// `X-Gitlab-Event-UUID`): redelivering the same event keeps it, so a shell can drop
    /// duplicates.
    pub delivery: Option<String>,
    /// The repository the event happened in (for a pull request: its target).
    pub repository: RepoIdentity,
    /// Who caused it: the pusher, or who opened or updated the pull request.
    pub actor: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A branch or a tag now points at a commit (created, moved or force-pushed).
    Push(Push),
    /// A branch or a tag was deleted: nothing to build, but runs of it may be stopped.
    RefDeleted {
        git_ref: GitRef,
        /// Where it pointed before, when the forge says.
        before: Option<CommitId>,
    },
    /// A pull or merge request was opened, got new commits, or was reopened.
    PullRequest(PullRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub git_ref: GitRef,
    /// Where the ref pointed before; `None` when the push created it.
    pub before: Option<CommitId>,
    /// The commit to build.
    pub after: CommitId,
    /// Paths added, modified or removed by the pushed commits, each once, in the order
    /// first seen (at most [`crate::webhook::MAX_CHANGED_PATHS`]).
    pub changed_paths: Vec<String>,
    /// Whether `changed_paths` is the whole list. It is not when the forge listed only
    /// some commits (GitLab lists 20, GitHub 2,048), when a created ref came without a
    /// commit list, or when the list passed Gantry's bound. A `paths:` filter should then
    /// let the push through rather than guess.
    pub paths_complete: bool,
}

/// What happened to a pull or merge request. Other actions (labels, comments, closing)
/// start nothing and are answered as ignored, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullRequestAction {
    Opened,
    /// New commits on its head (GitHub `synchronize`, Gitea `synchronized`, GitLab
    /// `update` with `oldrev`).
    Synchronized,
    Reopened,
}

impl PullRequestAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "opened",
            Self::Synchronized => "synchronized",
            Self::Reopened => "reopened",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub action: PullRequestAction,
    /// The number people see (`#12`, GitLab's `!12`).
    pub number: u64,
    /// The title, control characters replaced, cut to 256 characters.
    pub title: String,
    /// Who opened it, when the payload names them (GitLab's has only a numeric id).
    pub author: Option<String>,
    /// The commit to build: the head of the source branch.
    pub head_commit: CommitId,
    /// The source branch, in the head repository.
    pub head_ref: String,
    /// The target branch, in this repository.
    pub base_ref: String,
    /// Where the head branch lives; `None` when the forge no longer knows it (a deleted
    /// fork).
    pub head_repository: Option<RepoIdentity>,
    /// Whether the head lives in another repository than the target. When the payload
    /// cannot tell (a missing or deleted head repository), this is `true`: an unknown
    /// origin is treated as a fork.
    pub from_fork: bool,
    /// Label names on the pull request.
    pub labels: Vec<String>,
}

impl PullRequest {
    /// The ref in the *target* repository that holds the head commit, which is where a
    /// mirror fetches a fork's change from without credentials for the fork.
    pub fn head_fetch_ref(&self, forge: Forge) -> String {
        match forge {
            Forge::Github | Forge::Gitea => format!("refs/pull/{}/head", self.number),
            Forge::Gitlab => format!("refs/merge-requests/{}/head", self.number),
        }
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

/// `text` in quotes for a message, cut to `max` characters, control characters escaped.
pub(crate) fn quote(text: &str, max: usize) -> String {
    let mut cut: String = text.chars().take(max).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ids_are_hex_of_sha1_or_sha256_length() {
        let sha1 = "DA1560886D4F094C3E6C9EF40349F7D38B5D27D7";
        let id = CommitId::parse(sha1).expect("valid");
        assert_eq!(id.as_str(), sha1.to_ascii_lowercase());
        assert_eq!(id.short(), "da1560886d4f");
        assert!(CommitId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "abc", &"g".repeat(40), &"a".repeat(41), &"a".repeat(63)] {
            let e = CommitId::parse(bad).expect_err(bad);
            assert!(e.contains("40 or 64 hex digits"), "{e}");
        }
        assert_eq!(CommitId::parse_nonzero(&"0".repeat(40)), Ok(None));
    }

    #[test]
    fn ref_names_follow_gits_rules_and_never_look_like_options() {
        assert_eq!(
            GitRef::parse_full("refs/heads/feature/x-1"),
            Ok(Some(GitRef::Branch("feature/x-1".into())))
        );
        assert_eq!(
            GitRef::parse_full("refs/tags/v1.2.3"),
            Ok(Some(GitRef::Tag("v1.2.3".into())))
        );
        assert_eq!(GitRef::parse_full("refs/pull/1/head"), Ok(None));
        for bad in [
            "refs/heads/",
            "refs/heads/a..b",
            "refs/heads/a b",
            "refs/heads/-x",
            "refs/heads/a/-x",
            "refs/heads/x.lock",
            "refs/heads/.hidden",
            "refs/heads/a\nb",
            "refs/heads/a~1",
            "refs/heads/a@{1}",
            "refs/heads/a/",
            "refs/heads/a.",
        ] {
            assert!(GitRef::parse_full(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("refs/heads/{}", "a".repeat(MAX_REF_NAME_BYTES + 1));
        assert!(GitRef::parse_full(&long).is_err());
        assert_eq!(GitRef::Tag("v1".into()).full(), "refs/tags/v1");
    }

    #[test]
    fn repository_urls_match_across_https_ssh_and_scp_forms() {
        let identity = RepoIdentity {
            full_name: "Mike/Diaspora".into(),
            id: Some(15),
            clone_urls: vec![
                "http://example.com/mike/diaspora.git".into(),
                "git@example.com:mike/diaspora.git".into(),
            ],
            web_url: Some("http://example.com/mike/diaspora".into()),
        };
        for same in [
            "https://example.com/mike/diaspora",
            "https://Example.com:8443/Mike/Diaspora.git/",
            "ssh://git@example.com:2222/mike/diaspora.git",
            "git@example.com:mike/diaspora",
        ] {
            assert!(identity.matches_url(same), "{same}");
        }
        for other in [
            "https://example.com/mike/diaspora-fork",
            "https://example.org/mike/diaspora",
            "file:///srv/mike/diaspora",
            "not a url",
        ] {
            assert!(!identity.matches_url(other), "{other}");
        }
    }
}
