//! Webhook deliveries of each forge, built from the payload examples of its
//! documentation (trimmed, under `fixtures/`), signed as that forge signs them, and
//! read into normalized events; then every kind of bad input, each refused with a
//! typed error that says what to fix; then arbitrary and mutated bodies, which are
//! refused or read but never panic.

use gantry_forge::webhook::{self, Delivery, WebhookError, MAX_BODY_BYTES};
use gantry_forge::{CommitId, EventKind, Forge, ForgeEvent, GitRef, PullRequestAction};
use proptest::prelude::*;
use ring::hmac;

const SECRET: &[u8] = b"webhook-s3cret";

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .concat()
}

fn hmac_hex(body: &[u8]) -> String {
    hex(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, SECRET), body).as_ref())
}

/// The headers `forge` sends with `event`, signed with [`SECRET`].
fn signed_headers(forge: Forge, event: &str, body: &[u8]) -> Vec<(String, String)> {
    let pairs: Vec<(&str, String)> = match forge {
        Forge::Github => vec![
            ("X-GitHub-Event", event.into()),
            (
                "X-GitHub-Delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            ),
            ("X-Hub-Signature-256", format!("sha256={}", hmac_hex(body))),
            ("Content-Type", "application/json".into()),
        ],
        // Gitea sends its own headers and GitHub's (`services/webhook/deliver.go`).
        Forge::Gitea => vec![
            ("X-Gitea-Event", event.into()),
            (
                "X-Gitea-Delivery",
                "f6266f16-1bf3-46a5-9ea4-602e06ead473".into(),
            ),
            ("X-Gitea-Signature", hmac_hex(body)),
            ("X-GitHub-Event", event.into()),
            ("X-Hub-Signature-256", format!("sha256={}", hmac_hex(body))),
        ],
        Forge::Gitlab => vec![
            ("X-Gitlab-Event", event.into()),
            (
                "X-Gitlab-Token",
                String::from_utf8_lossy(SECRET).into_owned(),
            ),
            (
                "X-Gitlab-Event-UUID",
                "13792a34-cac6-4fda-95a8-c58e00a3954e".into(),
            ),
        ],
    };
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn receive(forge: Forge, event: &str, body: &[u8]) -> Result<Delivery, WebhookError> {
    webhook::receive(forge, SECRET, &signed_headers(forge, event, body), body)
}

fn event(forge: Forge, name: &str, body: &[u8]) -> ForgeEvent {
    match receive(forge, name, body) {
        Ok(Delivery::Event(e)) => e,
        other => panic!("{forge} {name}: expected an event, got {other:?}"),
    }
}

fn sha(text: &str) -> CommitId {
    CommitId::parse(text).expect("fixture sha")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn github_branch_pushes_carry_commits_paths_and_the_pusher() {
    let e = event(
        Forge::Github,
        "push",
        include_bytes!("fixtures/github/push.json"),
    );
    assert_eq!(
        e.delivery.as_deref(),
        Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
    );
    assert_eq!(e.actor, "Codertocat");
    assert_eq!(e.repository.full_name, "Codertocat/Hello-World");
    assert_eq!(e.repository.id, Some(186_853_002));
    assert!(e
        .repository
        .matches_url("git@github.com:codertocat/hello-world.git"));
    let EventKind::Push(push) = e.kind else {
        panic!("not a push: {:?}", e.kind)
    };
    assert_eq!(push.git_ref, GitRef::Branch("main".into()));
    assert_eq!(
        push.before,
        Some(sha("6113728f27ae82c7b1a177c8d03f9e96e0adf246"))
    );
    assert_eq!(push.after, sha("9c3a4b5e1f2d3c4b5a6978877665544332211009"));
    assert_eq!(
        push.changed_paths,
        strings(&["src/parser.rs", "README.md", "src/lexer.rs"])
    );
    assert!(push.paths_complete);
}

#[test]
fn github_tag_pushes_and_deletions_are_told_apart() {
    let tag = event(
        Forge::Github,
        "push",
        include_bytes!("fixtures/github/push_tag.json"),
    );
    let EventKind::Push(push) = tag.kind else {
        panic!("not a push: {:?}", tag.kind)
    };
    assert_eq!(push.git_ref, GitRef::Tag("v1.0.0".into()));
    assert_eq!(push.before, None, "created");
    assert!(!push.paths_complete, "a created ref lists no commits");
    let deleted = event(
        Forge::Github,
        "push",
        include_bytes!("fixtures/github/push_delete.json"),
    );
    assert_eq!(
        deleted.kind,
        EventKind::RefDeleted {
            git_ref: GitRef::Branch("feature/old".into()),
            before: Some(sha("6113728f27ae82c7b1a177c8d03f9e96e0adf246")),
        }
    );
}

#[test]
fn github_fork_pull_requests_say_they_come_from_a_fork() {
    let e = event(
        Forge::Github,
        "pull_request",
        include_bytes!("fixtures/github/pull_request_opened_fork.json"),
    );
    assert_eq!(e.actor, "contributor");
    assert_eq!(e.repository.full_name, "Codertocat/Hello-World");
    let EventKind::PullRequest(pr) = e.kind else {
        panic!("not a pull request: {:?}", e.kind)
    };
    assert_eq!(pr.action, PullRequestAction::Opened);
    assert_eq!(pr.number, 2);
    assert_eq!(
        pr.head_commit,
        sha("ec26c3e57ca3a959ca5aad62de7213c562f8c821")
    );
    assert_eq!(
        (pr.head_ref.as_str(), pr.base_ref.as_str()),
        ("changes", "main")
    );
    assert_eq!(pr.author.as_deref(), Some("contributor"));
    assert!(pr.from_fork);
    assert_eq!(
        pr.head_repository.map(|r| r.full_name).as_deref(),
        Some("contributor/Hello-World")
    );
    assert_eq!(pr.labels, strings(&["bug"]));
    assert_eq!(pr.title, "Update the README with new information.");
}

#[test]
fn github_same_repository_pull_requests_are_not_forks() {
    let e = event(
        Forge::Github,
        "pull_request",
        include_bytes!("fixtures/github/pull_request_synchronize.json"),
    );
    let EventKind::PullRequest(pr) = e.kind else {
        panic!("not a pull request: {:?}", e.kind)
    };
    assert_eq!(pr.action, PullRequestAction::Synchronized);
    assert!(!pr.from_fork);
    assert_eq!(pr.head_fetch_ref(Forge::Github), "refs/pull/2/head");
}

#[test]
fn github_pull_requests_whose_fork_was_deleted_count_as_forks() {
    let mut v: serde_json::Value = serde_json::from_slice(include_bytes!(
        "fixtures/github/pull_request_synchronize.json"
    ))
    .expect("fixture");
    v["pull_request"]["head"]["repo"] = serde_json::Value::Null;
    let body = v.to_string();
    let e = event(Forge::Github, "pull_request", body.as_bytes());
    let EventKind::PullRequest(pr) = e.kind else {
        panic!("not a pull request")
    };
    assert!(pr.from_fork && pr.head_repository.is_none());
}

#[test]
fn other_pull_request_actions_and_pings_are_ignored_with_a_reason() {
    let mut v: serde_json::Value = serde_json::from_slice(include_bytes!(
        "fixtures/github/pull_request_synchronize.json"
    ))
    .expect("fixture");
    v["action"] = "labeled".into();
    let body = v.to_string();
    let Ok(Delivery::Ignored(ignored)) = receive(Forge::Github, "pull_request", body.as_bytes())
    else {
        panic!("labeled was not ignored")
    };
    assert!(ignored.reason.contains("\"labeled\""), "{}", ignored.reason);
    let Ok(Delivery::Ignored(ping)) = receive(
        Forge::Github,
        "ping",
        include_bytes!("fixtures/github/ping.json"),
    ) else {
        panic!("ping was not ignored")
    };
    assert!(ping.reason.starts_with("ping"), "{}", ping.reason);
}

#[test]
fn gitea_pushes_pull_requests_and_deletions_are_read() {
    let push = event(
        Forge::Gitea,
        "push",
        include_bytes!("fixtures/gitea/push.json"),
    );
    assert_eq!(push.actor, "gitea");
    assert_eq!(
        push.delivery.as_deref(),
        Some("f6266f16-1bf3-46a5-9ea4-602e06ead473")
    );
    assert!(push
        .repository
        .matches_url("ssh://gitea@localhost:2222/gitea/webhooks.git"));
    let EventKind::Push(p) = push.kind else {
        panic!("not a push")
    };
    assert_eq!(p.git_ref, GitRef::Branch("develop".into()));
    assert_eq!(p.changed_paths, strings(&["docs/hooks.md", "README.md"]));
    assert!(p.paths_complete);

    let pr = event(
        Forge::Gitea,
        "pull_request",
        include_bytes!("fixtures/gitea/pull_request_synchronized_fork.json"),
    );
    assert_eq!(pr.actor, "outsider");
    let EventKind::PullRequest(pr) = pr.kind else {
        panic!("not a pull request")
    };
    assert_eq!(pr.action, PullRequestAction::Synchronized);
    assert_eq!(pr.number, 12);
    assert!(pr.from_fork, "head.repo_id 141 is not base.repo_id 140");
    assert_eq!(pr.labels, strings(&["enhancement"]));

    let deleted = event(
        Forge::Gitea,
        "delete",
        include_bytes!("fixtures/gitea/delete.json"),
    );
    assert_eq!(
        deleted.kind,
        EventKind::RefDeleted {
            git_ref: GitRef::Branch("develop".into()),
            before: None
        }
    );
}

#[test]
fn forgejo_headers_are_accepted() {
    let body = include_bytes!("fixtures/gitea/push.json");
    let headers: Vec<(String, String)> = [
        ("X-Forgejo-Event", "push".to_owned()),
        ("X-Forgejo-Signature", hmac_hex(body)),
        ("X-Forgejo-Delivery", "d-1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(webhook::detect_forge(&headers), Ok(Forge::Gitea));
    let Ok(Delivery::Event(e)) = webhook::receive(Forge::Gitea, SECRET, &headers, body) else {
        panic!("forgejo push refused")
    };
    assert_eq!(e.delivery.as_deref(), Some("d-1"));
}

#[test]
fn gitlab_pushes_know_when_the_commit_list_was_cut() {
    let e = event(
        Forge::Gitlab,
        "Push Hook",
        include_bytes!("fixtures/gitlab/push.json"),
    );
    assert_eq!(e.actor, "jsmith");
    assert_eq!(e.repository.full_name, "mike/diaspora");
    assert_eq!(e.repository.id, Some(15));
    assert!(e
        .repository
        .matches_url("https://example.com/mike/diaspora"));
    let EventKind::Push(p) = e.kind else {
        panic!("not a push")
    };
    assert_eq!(p.after, sha("da1560886d4f094c3e6c9ef40349f7d38b5d27d7"));
    assert_eq!(
        p.changed_paths,
        strings(&["CHANGELOG", "app/controller/application.rb"])
    );
    assert!(
        !p.paths_complete,
        "total_commits_count is 4 but 2 commits are listed"
    );

    let tag = event(
        Forge::Gitlab,
        "Tag Push Hook",
        include_bytes!("fixtures/gitlab/tag_push.json"),
    );
    assert_eq!(tag.actor, "John Smith", "tag pushes carry only user_name");
    let EventKind::Push(t) = tag.kind else {
        panic!("not a push")
    };
    assert_eq!(t.git_ref, GitRef::Tag("v1.0.0".into()));
}

#[test]
fn gitlab_merge_requests_from_other_projects_are_forks() {
    let e = event(
        Forge::Gitlab,
        "Merge Request Hook",
        include_bytes!("fixtures/gitlab/merge_request_open_fork.json"),
    );
    assert_eq!(e.actor, "root");
    assert_eq!(e.repository.full_name, "gitlabhq/gitlab-test");
    let EventKind::PullRequest(mr) = e.kind else {
        panic!("not a merge request")
    };
    assert_eq!(mr.action, PullRequestAction::Opened);
    assert_eq!(mr.number, 1);
    assert_eq!(
        mr.head_commit,
        sha("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    );
    assert_eq!(
        (mr.head_ref.as_str(), mr.base_ref.as_str()),
        ("ms-viewport", "master")
    );
    assert!(mr.from_fork, "source_project_id 14, target 1");
    assert_eq!(
        mr.head_fetch_ref(Forge::Gitlab),
        "refs/merge-requests/1/head"
    );
    assert_eq!(mr.labels, strings(&["API"]));

    let update = event(
        Forge::Gitlab,
        "Merge Request Hook",
        include_bytes!("fixtures/gitlab/merge_request_update.json"),
    );
    let EventKind::PullRequest(mr) = update.kind else {
        panic!("not a merge request")
    };
    assert_eq!(mr.action, PullRequestAction::Synchronized);
    assert!(!mr.from_fork);
}

#[test]
fn gitlab_updates_without_new_commits_are_ignored() {
    let mut v: serde_json::Value =
        serde_json::from_slice(include_bytes!("fixtures/gitlab/merge_request_update.json"))
            .expect("fixture");
    v["object_attributes"]
        .as_object_mut()
        .expect("object")
        .remove("oldrev");
    let body = v.to_string();
    let Ok(Delivery::Ignored(i)) = receive(Forge::Gitlab, "Merge Request Hook", body.as_bytes())
    else {
        panic!("a label change started work")
    };
    assert!(i.reason.contains("without new commits"), "{}", i.reason);
}

#[test]
fn bad_signatures_and_tokens_are_refused_naming_the_header() {
    let body: &[u8] = include_bytes!("fixtures/github/push.json");
    for forge in Forge::ALL {
        let event = match forge {
            Forge::Gitlab => "Push Hook",
            _ => "push",
        };
        let headers = signed_headers(forge, event, body);
        let wrong = webhook::receive(forge, b"another secret", &headers, body)
            .expect_err("wrong secret accepted");
        assert!(
            matches!(wrong, WebhookError::BadSignature { .. }),
            "{forge}: {wrong}"
        );
        assert_eq!(wrong.http_status(), 401);
        let unsigned: Vec<(String, String)> = headers
            .into_iter()
            .filter(|(k, _)| {
                let k = k.to_ascii_lowercase();
                !k.contains("signature") && !k.contains("token")
            })
            .collect();
        let missing = webhook::receive(forge, SECRET, &unsigned, body).expect_err("unsigned");
        let WebhookError::MissingSignature { header, .. } = &missing else {
            panic!("{forge}: {missing}")
        };
        assert!(missing.to_string().contains(header), "{missing}");
    }
    // A body changed after signing.
    let mut headers = signed_headers(Forge::Github, "push", body);
    headers.retain(|(k, _)| k != "X-Hub-Signature-256");
    headers.push((
        "X-Hub-Signature-256".into(),
        format!("sha256={}", hmac_hex(b"{}")),
    ));
    assert!(matches!(
        webhook::receive(Forge::Github, SECRET, &headers, body),
        Err(WebhookError::BadSignature { .. })
    ));
}

#[test]
fn unknown_events_missing_event_headers_and_other_forges_are_refused() {
    let body: &[u8] = br#"{"action":"created"}"#;
    let e = receive(Forge::Github, "issues", body).expect_err("issues");
    assert!(matches!(e, WebhookError::UnsupportedEvent { .. }));
    assert!(e.to_string().contains("push and pull request"), "{e}");
    let e = receive(Forge::Gitlab, "System Hook", body).expect_err("system hook");
    assert!(matches!(e, WebhookError::UnsupportedEvent { .. }), "{e}");

    let mut headers = signed_headers(Forge::Github, "push", body);
    headers.retain(|(k, _)| k != "X-GitHub-Event");
    let e = webhook::receive(Forge::Github, SECRET, &headers, body).expect_err("no event");
    assert!(e.to_string().contains("X-GitHub-Event"), "{e}");

    let gitea = signed_headers(Forge::Gitea, "push", body);
    let e = webhook::receive(Forge::Github, SECRET, &gitea, body).expect_err("wrong forge");
    assert!(matches!(e, WebhookError::WrongForge { .. }), "{e}");
}

#[test]
fn malformed_payloads_name_the_field_or_position() {
    let cases: &[(&str, &str, &str)] = &[
        ("push", "not json", "line 1 column"),
        (
            "push",
            r#"{"ref":"refs/heads/main"}"#,
            "repository is missing",
        ),
        (
            "push",
            r#"{"ref":"refs/heads/a..b","after":"x","repository":{"full_name":"o/r"},"sender":{"login":"u"}}"#,
            "ref name",
        ),
        (
            "push",
            r#"{"ref":"refs/heads/main","after":"xyz","repository":{"full_name":"o/r"},"sender":{"login":"u"}}"#,
            "after:",
        ),
        (
            "push",
            r#"{"ref":"refs/heads/main","after":"9c3a4b5e1f2d3c4b5a6978877665544332211009","repository":{"full_name":"o/r"}}"#,
            "sender.login is missing",
        ),
        (
            "pull_request",
            r#"{"action":"opened","repository":{"full_name":"o/r"},"sender":{"login":"u"},"pull_request":{"number":1,"head":{"ref":"x"},"base":{"ref":"main"}}}"#,
            "pull_request.head.sha is missing",
        ),
        (
            "pull_request",
            r#"{"action":"opened","number":"one"}"#,
            "invalid type",
        ),
        (
            "push",
            r#"{"ref":"refs/heads/main","repository":{"full_name":"o/\u0007r"}}"#,
            "control characters",
        ),
    ];
    for (name, body, expected) in cases {
        let e = receive(Forge::Github, name, body.as_bytes()).expect_err(body);
        assert!(matches!(e, WebhookError::Malformed { .. }), "{body}: {e}");
        assert_eq!(e.http_status(), 400);
        assert!(e.to_string().contains(expected), "{body}: {e}");
    }
}

#[test]
fn refs_that_are_neither_branches_nor_tags_are_ignored() {
    let body = r#"{"ref":"refs/notes/commits","after":"9c3a4b5e1f2d3c4b5a6978877665544332211009","repository":{"full_name":"o/r"},"sender":{"login":"u"}}"#;
    assert!(matches!(
        receive(Forge::Github, "push", body.as_bytes()),
        Ok(Delivery::Ignored(_))
    ));
}

#[test]
fn deeply_nested_bodies_are_refused_without_exhausting_the_stack() {
    // serde_json skips a field nobody reads with a loop of its own, and refuses nesting
    // deeper than 128 where it builds values: neither recurses 100,000 levels deep.
    let deep =
        |open: &str, close: &str| format!("{}{}", open.repeat(100_000), close.repeat(100_000));
    let skipped = format!(r#"{{"ref":"refs/heads/main","extra":{}}}"#, deep("[", "]"));
    let e = receive(Forge::Github, "push", skipped.as_bytes()).expect_err("no repository");
    assert!(e.to_string().contains("repository is missing"), "{e}");
    let read = format!(
        r#"{{"ref":"refs/heads/main","commits":[{{"added":{}}}]}}"#,
        deep("[", "]")
    );
    let e = receive(Forge::Github, "push", read.as_bytes()).expect_err("nested");
    assert!(matches!(e, WebhookError::Malformed { .. }), "{e}");
    let objects = deep(r#"{"a":"#, "}");
    let e = receive(Forge::Gitlab, "Push Hook", objects.as_bytes()).expect_err("nested");
    assert!(matches!(e, WebhookError::Malformed { .. }), "{e}");
}

#[test]
fn the_repository_can_be_read_before_the_secret_is_known() {
    let id = webhook::peek_repository(Forge::Gitlab, include_bytes!("fixtures/gitlab/push.json"))
        .expect("project");
    assert_eq!(id.full_name, "mike/diaspora");
    let id = webhook::peek_repository(Forge::Github, include_bytes!("fixtures/github/push.json"))
        .expect("repository");
    assert_eq!(id.full_name, "Codertocat/Hello-World");
    assert!(webhook::peek_repository(Forge::Github, b"{}").is_err());
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    assert!(matches!(
        webhook::peek_repository(Forge::Github, &big),
        Err(WebhookError::TooLarge { .. })
    ));
}

const FIXTURES: &[(Forge, &str, &[u8])] = &[
    (
        Forge::Github,
        "push",
        include_bytes!("fixtures/github/push.json"),
    ),
    (
        Forge::Github,
        "pull_request",
        include_bytes!("fixtures/github/pull_request_opened_fork.json"),
    ),
    (
        Forge::Gitea,
        "pull_request",
        include_bytes!("fixtures/gitea/pull_request_synchronized_fork.json"),
    ),
    (
        Forge::Gitea,
        "delete",
        include_bytes!("fixtures/gitea/delete.json"),
    ),
    (
        Forge::Gitlab,
        "Push Hook",
        include_bytes!("fixtures/gitlab/push.json"),
    ),
    (
        Forge::Gitlab,
        "Merge Request Hook",
        include_bytes!("fixtures/gitlab/merge_request_open_fork.json"),
    ),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes, signed correctly, are read or refused; nothing panics.
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048), which in 0usize..6) {
        let (forge, name, _) = FIXTURES[which];
        let _ = receive(forge, name, &body);
        let _ = webhook::peek_repository(forge, &body);
    }

    /// Fixtures with bytes flipped, cut or repeated are read or refused; nothing panics,
    /// and whatever is read still holds only checked values.
    #[test]
    fn mutated_fixtures_never_panic(
        which in 0usize..6,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let (forge, name, fixture) = FIXTURES[which];
        let mut body = fixture.to_vec();
        for (at, byte, kind) in edits {
            if body.is_empty() {
                break;
            }
            let i = at.index(body.len());
            match kind {
                0 => body[i] = byte,
                1 => body.truncate(i),
                _ => {
                    let piece = body[i..].iter().take(64).copied().collect::<Vec<_>>();
                    body.splice(i..i, piece);
                }
            }
        }
        if let Ok(Delivery::Event(e)) = receive(forge, name, &body) {
            prop_assert!(!e.actor.is_empty() && !e.actor.chars().any(char::is_control));
            prop_assert!(!e.repository.full_name.chars().any(char::is_control));
            if let EventKind::Push(p) = &e.kind {
                prop_assert!(gantry_forge::check_ref_name(p.git_ref.name()).is_ok());
            }
        }
    }
}
