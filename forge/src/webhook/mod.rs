//! Incoming webhooks: checking that a delivery comes from the forge (each forge signs
//! its own way) and reading it into one [`ForgeEvent`].
//!
//! Owns: the body bound, the per-forge signature checks, the event header names, and
//! the payload shapes of push, tag, ref-deletion and pull/merge-request events of
//! GitHub (and GitHub Enterprise), Gitea/Forgejo and GitLab. It must not look up
//! repositories, start runs or answer HTTP: [`WebhookError::http_status`] says which
//! status the shell should answer with.
//!
//! How each forge signs (checked in constant time, with ring):
//! - GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, keyed with the
//!   webhook's secret; the event is `X-GitHub-Event`.
//! - Gitea/Forgejo: `X-Gitea-Signature` / `X-Forgejo-Signature: <hex HMAC-SHA256>`
//!   (no prefix); the event is `X-Gitea-Event` / `X-Forgejo-Event`. Gitea also sends
//!   GitHub's headers, so its own are looked at first.
//! - GitLab: `X-Gitlab-Token: <the secret itself>`; the event is `X-Gitlab-Event`
//!   (`Push Hook`, `Tag Push Hook`, `Merge Request Hook`). The token is compared as
//!   HMACs of both values under the secret, so neither its bytes nor its length leak
//!   through timing.
//!
//! Use [`receive`]: it bounds the body, checks the forge's headers and the signature,
//! and only then reads the payload. [`peek_repository`] reads the repository from an
//! unverified body, for a shell that must know the repository to know its secret.
//!
//! Work is bounded on any input: the body is at most [`MAX_BODY_BYTES`] and is read
//! once by serde_json (linear time); fields nobody needs are skipped without being
//! stored (serde_json skips with a loop of its own, and refuses nesting deeper than 128
//! levels in what it builds, so no input recurses deeply); kept strings are
//! length-checked; changed paths stop at [`MAX_CHANGED_PATHS`]. Nothing here panics on
//! input (`tests/webhooks.rs` feeds it arbitrary bytes and mutated fixtures).

mod gitlab;
mod hub;

use std::collections::HashSet;

use ring::hmac;

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

/// Bounds, authenticates and reads one delivery for a repository registered on
/// `forge` whose webhook secret is `secret`. `headers` are as received (names in any
/// case).
pub fn receive(
    forge: Forge,
    secret: &[u8],
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Delivery, WebhookError> {
    check_size(body)?;
    check_forge(forge, headers)?;
    verify(forge, secret, headers, body)?;
    parse_verified(forge, headers, body)
}

/// Which forge sent a delivery, from its headers. Gitea and Forgejo also send GitHub's
/// headers, so theirs are looked at first.
pub fn detect_forge(headers: &[(String, String)]) -> Result<Forge, WebhookError> {
    if header(headers, "x-gitlab-event").is_some() || header(headers, "x-gitlab-token").is_some() {
        Ok(Forge::Gitlab)
    } else if header(headers, "x-forgejo-event").is_some()
        || header(headers, "x-gitea-event").is_some()
    {
        Ok(Forge::Gitea)
    } else if header(headers, "x-github-event").is_some() {
        Ok(Forge::Github)
    } else {
        Err(WebhookError::UnknownForge)
    }
}

/// The repository a delivery names, read WITHOUT checking its signature: only for
/// finding which registered repository (and so which secret) it is for. Never act on
/// anything else from an unverified body.
pub fn peek_repository(forge: Forge, body: &[u8]) -> Result<RepoIdentity, WebhookError> {
    check_size(body)?;
    match forge {
        Forge::Github | Forge::Gitea => hub::peek_repository(forge, body),
        Forge::Gitlab => gitlab::peek_repository(body),
    }
}

/// Checks the delivery's signature (or GitLab's token) against `secret`.
pub fn verify(
    forge: Forge,
    secret: &[u8],
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::NoSecret(forge));
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    match forge {
        Forge::Github => {
            let name = "X-Hub-Signature-256";
            let value = header(headers, name).ok_or(WebhookError::MissingSignature {
                forge,
                header: name,
            })?;
            let bad = WebhookError::BadSignature {
                forge,
                header: name,
            };
            let hex = value.trim().strip_prefix("sha256=").ok_or(bad.clone())?;
            let tag = decode_hex(hex).ok_or(bad.clone())?;
            hmac::verify(&key, body, &tag).map_err(|_| bad)
        }
        Forge::Gitea => {
            let (name, value) = ["X-Forgejo-Signature", "X-Gitea-Signature"]
                .into_iter()
                .find_map(|name| header(headers, name).map(|v| (name, v)))
                .ok_or(WebhookError::MissingSignature {
                    forge,
                    header: "X-Gitea-Signature",
                })?;
            let bad = WebhookError::BadSignature {
                forge,
                header: name,
            };
            let tag = decode_hex(value.trim()).ok_or(bad.clone())?;
            hmac::verify(&key, body, &tag).map_err(|_| bad)
        }
        Forge::Gitlab => {
            let name = "X-Gitlab-Token";
            let token = header(headers, name).ok_or(WebhookError::MissingSignature {
                forge,
                header: name,
            })?;
            // Equal tokens have equal HMACs; `hmac::verify` compares in constant time
            // and the token's length only changes how long the HMAC takes to compute.
            let expected = hmac::sign(&key, secret);
            hmac::verify(&key, token.as_bytes(), expected.as_ref()).map_err(|_| {
                WebhookError::BadSignature {
                    forge,
                    header: name,
                }
            })
        }
    }
}

fn check_size(body: &[u8]) -> Result<(), WebhookError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(WebhookError::TooLarge { bytes: body.len() });
    }
    Ok(())
}

/// Refuses a delivery whose headers say it comes from another forge than the
/// repository is registered with: its payload would be misread.
fn check_forge(expected: Forge, headers: &[(String, String)]) -> Result<(), WebhookError> {
    let found = [
        (Forge::Gitlab, "X-Gitlab-Event"),
        (Forge::Gitea, "X-Forgejo-Event"),
        (Forge::Gitea, "X-Gitea-Event"),
    ]
    .into_iter()
    .find(|(_, name)| header(headers, name).is_some());
    match found {
        Some((found, header)) if found != expected => Err(WebhookError::WrongForge {
            expected,
            found,
            header,
        }),
        _ => Ok(()),
    }
}

fn parse_verified(
    forge: Forge,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Delivery, WebhookError> {
    let event_header = match forge {
        Forge::Github => "X-GitHub-Event",
        Forge::Gitea => "X-Gitea-Event",
        Forge::Gitlab => "X-Gitlab-Event",
    };
    let event = match forge {
        Forge::Gitea => {
            header(headers, "X-Forgejo-Event").or_else(|| header(headers, event_header))
        }
        _ => header(headers, event_header),
    }
    .ok_or(WebhookError::MissingEvent {
        forge,
        header: event_header,
    })?
    .trim();
    let ctx = Ctx {
        forge,
        event: event.to_owned(),
        delivery: delivery_id(forge, headers),
    };
    match (forge, event) {
        (Forge::Github | Forge::Gitea, "push") => hub::push(&ctx, body),
        (Forge::Github | Forge::Gitea, "pull_request") => hub::pull_request(&ctx, body),
        (Forge::Github, "ping") => {
            Ok(ctx.ignored("ping: the webhook reaches Gantry and its signature is right".into()))
        }
        (Forge::Github | Forge::Gitea, "create") => Ok(ctx.ignored(
            "a created branch or tag also arrives as a push event, which is the one acted on"
                .into(),
        )),
        (Forge::Github, "delete") => Ok(ctx.ignored(
            "a deleted branch or tag also arrives as a push event, which is the one acted on"
                .into(),
        )),
        // Gitea announces deletions only with its own event.
        (Forge::Gitea, "delete") => hub::gitea_delete(&ctx, body),
        (Forge::Gitlab, "Push Hook" | "Tag Push Hook") => gitlab::push(&ctx, body),
        (Forge::Gitlab, "Merge Request Hook") => gitlab::merge_request(&ctx, body),
        _ => Err(WebhookError::UnsupportedEvent {
            forge,
            event: quote(event, 64),
        }),
    }
}

/// The forge's delivery id, if it is a sane token (printable ASCII, at most 128 bytes).
fn delivery_id(forge: Forge, headers: &[(String, String)]) -> Option<String> {
    let names: &[&str] = match forge {
        Forge::Github => &["X-GitHub-Delivery"],
        Forge::Gitea => &["X-Forgejo-Delivery", "X-Gitea-Delivery"],
        Forge::Gitlab => &["X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"],
    };
    names
        .iter()
        .find_map(|n| header(headers, n))
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
}

/// The first header named `name`, whatever the case of either.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// What every payload reader needs to build its results and errors.
pub(crate) struct Ctx {
    pub forge: Forge,
    pub event: String,
    /// The forge's id of the delivery, kept on the event.
    pub delivery: Option<String>,
}

impl Ctx {
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

/// A push of `git_ref` from `before` to `after` as the forge wrote them: a deletion
/// when `after` is all zeros or the forge says so, else the push with its changed
/// paths. `listed_all(n)` says whether `n` listed commits are all the push had.
pub(crate) fn push_kind(
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

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), body);
        crate::types::hex(tag.as_ref())
    }

    #[test]
    fn github_signatures_need_the_prefix_the_secret_and_the_body() {
        let body = br#"{"zen":"x"}"#;
        let good = format!("sha256={}", sign(b"s3cret", body));
        let h = headers(&[("x-hub-signature-256", &good)]);
        assert_eq!(verify(Forge::Github, b"s3cret", &h, body), Ok(()));
        let bare = headers(&[("X-Hub-Signature-256", &good[7..])]);
        let e = verify(Forge::Github, b"s3cret", &bare, body).expect_err("no prefix");
        assert_eq!(e.http_status(), 401);
        assert!(verify(Forge::Github, b"other", &h, body).is_err());
        assert!(verify(Forge::Github, b"s3cret", &h, b"tampered").is_err());
        let e = verify(Forge::Github, b"s3cret", &[], body).expect_err("unsigned");
        assert!(
            e.to_string()
                .contains("X-Hub-Signature-256 header is missing"),
            "{e}"
        );
        let zz = headers(&[("X-Hub-Signature-256", "sha256=zz")]);
        assert!(matches!(
            verify(Forge::Github, b"s3cret", &zz, body),
            Err(WebhookError::BadSignature { .. })
        ));
    }

    #[test]
    fn gitea_and_forgejo_signatures_are_bare_hex() {
        let body = b"{}";
        let sig = sign(b"k", body);
        for name in ["X-Gitea-Signature", "x-forgejo-signature"] {
            let h = headers(&[(name, &sig)]);
            assert_eq!(verify(Forge::Gitea, b"k", &h, body), Ok(()), "{name}");
        }
        let e = verify(Forge::Gitea, b"k", &[], body).expect_err("unsigned");
        assert!(e.to_string().contains("X-Gitea-Signature"), "{e}");
    }

    #[test]
    fn gitlab_tokens_must_equal_the_secret() {
        let h = headers(&[("X-Gitlab-Token", "tok")]);
        assert_eq!(verify(Forge::Gitlab, b"tok", &h, b"{}"), Ok(()));
        for wrong in ["to", "tok2", "TOK", ""] {
            let h = headers(&[("X-Gitlab-Token", wrong)]);
            assert!(
                verify(Forge::Gitlab, b"tok", &h, b"{}").is_err(),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn an_empty_secret_trusts_nothing() {
        let h = headers(&[("X-Gitlab-Token", "")]);
        let e = verify(Forge::Gitlab, b"", &h, b"{}").expect_err("no secret");
        assert_eq!(e, WebhookError::NoSecret(Forge::Gitlab));
        assert_eq!(e.http_status(), 503);
    }

    #[test]
    fn the_forge_is_read_from_its_own_headers_first() {
        let gitea = headers(&[("X-GitHub-Event", "push"), ("X-Gitea-Event", "push")]);
        assert_eq!(detect_forge(&gitea), Ok(Forge::Gitea));
        let github = headers(&[("X-GitHub-Event", "push")]);
        assert_eq!(detect_forge(&github), Ok(Forge::Github));
        let gitlab = headers(&[("X-Gitlab-Event", "Push Hook")]);
        assert_eq!(detect_forge(&gitlab), Ok(Forge::Gitlab));
        assert_eq!(detect_forge(&[]), Err(WebhookError::UnknownForge));
        let e = check_forge(Forge::Github, &gitea).expect_err("gitea as github");
        assert!(e.to_string().contains("--forge gitea"), "{e}");
    }

    #[test]
    fn oversized_bodies_are_refused_before_anything_else() {
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        let e = receive(Forge::Github, b"k", &[], &body).expect_err("too large");
        assert_eq!(e.http_status(), 413);
        assert!(e.to_string().contains("gantry run --repo"), "{e}");
    }

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
