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
mod read;

use ring::hmac;

pub use read::{
    Delivery, Ignored, WebhookError, MAX_BODY_BYTES, MAX_CHANGED_PATHS, MAX_NAME_BYTES,
    MAX_PATH_BYTES, MAX_URL_BYTES,
};

use crate::types::{quote, Forge, RepoIdentity};
use read::Ctx;

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
}
