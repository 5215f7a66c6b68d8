//! Mirrors against real servers on loopback: git daemon, git http-backend (with basic
//! auth) and sshd. Each bad input gets its own test and its own one-line error.

mod support;

use std::path::Path;
use std::time::Duration;

use gantry_git::{
    Credentials, Fetch, GitError, GitProgram, KnownHosts, Mirror, MirrorOptions, ObjectId, Remote,
    Secret,
};
use support::{git, GitDaemon, HttpGit, ServedRepo, Sshd};

fn oid(hex: &str) -> ObjectId {
    ObjectId::from_hex(hex).expect("commit id")
}

fn mirror(dir: &Path, remote: Remote) -> Mirror {
    Mirror::open(
        GitProgram::default(),
        dir.join("mirror.git"),
        remote,
        MirrorOptions::default(),
    )
    .expect("open mirror")
}

/// Everything on disk under `dir`, as text, to look for a leaked secret.
fn all_text_under(dir: &Path) -> String {
    let mut text = String::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).expect("list").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    text
}

#[test]
fn git_daemon_mirror_fetches_incrementally_and_prunes_deleted_branches() {
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    served.write(&[("README", b"one\n")]);
    let first = served.commit_and_push("first", "main");
    git(&served.work, &["tag", "-a", "-m", "release", "v1"]);
    git(&served.work, &["push", "-q", "origin", "v1"]);
    served.commit_and_push("feature", "feature");
    let daemon = GitDaemon::start(root.path());

    let local = tempfile::tempdir().expect("tempdir");
    let remote = Remote::new(daemon.url("app"), Credentials::None).expect("remote");
    let mirror = mirror(local.path(), remote);
    mirror.fetch(&Fetch::All).expect("first fetch");
    assert_eq!(
        mirror.resolve("refs/heads/main").expect("main"),
        oid(&first)
    );
    assert_eq!(
        mirror
            .resolve("refs/tags/v1")
            .expect("tag peels to its commit"),
        oid(&first)
    );

    served.write(&[("README", b"two\n")]);
    let second = served.commit_and_push("second", "main");
    mirror.fetch(&Fetch::Ref("main".into())).expect("one ref");
    assert_eq!(
        mirror.resolve("refs/heads/main").expect("main"),
        oid(&second)
    );

    git(&served.bare, &["branch", "-D", "feature"]);
    mirror.fetch(&Fetch::All).expect("fetch after a deletion");
    let err = mirror.resolve("refs/heads/feature").expect_err("pruned");
    assert!(matches!(err, GitError::RefNotFound { .. }), "{err}");
}

#[test]
fn a_deleted_branch_is_ref_not_found() {
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    served.commit_and_push("first", "main");
    let daemon = GitDaemon::start(root.path());
    let local = tempfile::tempdir().expect("tempdir");
    let mirror = mirror(
        local.path(),
        Remote::new(daemon.url("app"), Credentials::None).expect("remote"),
    );
    let err = mirror
        .fetch(&Fetch::Ref("gone".into()))
        .expect_err("no such branch");
    assert!(
        matches!(&err, GitError::RefNotFound { reference, .. } if reference == "refs/heads/gone"),
        "{err}"
    );
    assert_eq!(err.to_string().lines().count(), 1, "{err}");
    assert!(err.to_string().contains("refs/heads/gone"), "{err}");
}

#[test]
fn a_force_pushed_away_commit_is_commit_not_found() {
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    let kept = served.commit_and_push("kept", "main");
    served.write(&[("x", b"x")]);
    let lost = served.commit_and_push("lost", "main");
    git(&served.work, &["reset", "-q", "--hard", &kept]);
    git(
        &served.work,
        &["push", "-q", "-f", "origin", "HEAD:refs/heads/main"],
    );
    // Forges serve an unreachable commit by id until they collect it; this one is gone.
    git(&served.bare, &["reflog", "expire", "--expire=now", "--all"]);
    git(&served.bare, &["gc", "-q", "--prune=now"]);
    let daemon = GitDaemon::start(root.path());
    let local = tempfile::tempdir().expect("tempdir");
    let mirror = mirror(
        local.path(),
        Remote::new(daemon.url("app"), Credentials::None).expect("remote"),
    );
    mirror
        .ensure_commit(oid(&kept))
        .expect("a reachable commit is fetched by id");
    let err = mirror
        .ensure_commit(oid(&lost))
        .expect_err("force-pushed away");
    assert!(matches!(err, GitError::CommitNotFound { .. }), "{err}");
    assert!(err.to_string().contains(&lost), "{err}");
}

#[test]
fn an_unreachable_server_is_unreachable_and_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let local = tempfile::tempdir().expect("tempdir");
    for url in [
        format!("git://127.0.0.1:{port}/x.git"),
        format!("http://127.0.0.1:{port}/x.git"),
    ] {
        let mirror = Mirror::open(
            GitProgram::default(),
            local.path().join(format!("m{}", url.len())),
            Remote::new(url.clone(), Credentials::None).expect("remote"),
            MirrorOptions::default(),
        )
        .expect("open");
        let err = mirror.fetch(&Fetch::All).expect_err("nothing listens");
        assert!(matches!(err, GitError::Unreachable { .. }), "{url}: {err}");
        assert!(err.is_transient());
    }
}

#[test]
fn a_silent_server_is_stopped_at_the_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Accepts and never answers; the held connection ends with the test.
    let holder = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    let local = tempfile::tempdir().expect("tempdir");
    let mirror = Mirror::open(
        GitProgram::default(),
        local.path().join("m.git"),
        Remote::new(format!("git://127.0.0.1:{port}/x.git"), Credentials::None).expect("remote"),
        MirrorOptions {
            fetch_deadline: Duration::from_secs(2),
            local_deadline: Duration::from_secs(30),
        },
    )
    .expect("open");
    let err = mirror.fetch(&Fetch::All).expect_err("deadline");
    assert!(matches!(err, GitError::TimedOut { .. }), "{err}");
    drop(holder.join());
}

#[test]
fn https_token_fetches_and_never_lands_on_disk_or_in_errors() {
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    let head = served.commit_and_push("first", "main");
    let http = HttpGit::start(root.path(), Some(("ci", "s3cret-token")));
    let token = |t: &str| Credentials::Token {
        username: "ci".into(),
        token: Secret::new(t),
    };

    let local = tempfile::tempdir().expect("tempdir");
    let good = Mirror::open(
        GitProgram::default(),
        local.path().join("good.git"),
        Remote::new(http.url("app"), token("s3cret-token")).expect("remote"),
        MirrorOptions::default(),
    )
    .expect("open");
    good.fetch(&Fetch::All).expect("fetch with the token");
    assert_eq!(good.resolve("main").expect("main"), oid(&head));
    assert!(
        !all_text_under(local.path()).contains("s3cret-token"),
        "the token is on disk"
    );

    let bad = Mirror::open(
        GitProgram::default(),
        local.path().join("bad.git"),
        Remote::new(http.url("app"), token("wrong-token")).expect("remote"),
        MirrorOptions::default(),
    )
    .expect("open");
    let err = bad.fetch(&Fetch::All).expect_err("bad token");
    assert!(matches!(err, GitError::AuthRefused { .. }), "{err}");
    assert!(!err.to_string().contains("wrong-token"), "{err}");

    let none = Mirror::open(
        GitProgram::default(),
        local.path().join("none.git"),
        Remote::new(http.url("app"), Credentials::None).expect("remote"),
        MirrorOptions::default(),
    )
    .expect("open");
    let err = none.fetch(&Fetch::All).expect_err("no credentials");
    assert!(matches!(err, GitError::AuthRefused { .. }), "{err}");

    let missing = Mirror::open(
        GitProgram::default(),
        local.path().join("missing.git"),
        Remote::new(http.url("nope"), token("s3cret-token")).expect("remote"),
        MirrorOptions::default(),
    )
    .expect("open");
    let err = missing.fetch(&Fetch::All).expect_err("no such repository");
    assert!(matches!(err, GitError::RepositoryNotFound { .. }), "{err}");
}

#[test]
fn ssh_key_fetches_and_bad_keys_or_host_keys_are_refused() {
    let Some(sshd) = Sshd::start() else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    let head = served.commit_and_push("first", "main");
    let url = sshd.url(&served.bare);
    let local = tempfile::tempdir().expect("tempdir");
    let with = |name: &str, key: &Path, known: KnownHosts| {
        Mirror::open(
            GitProgram::default(),
            local.path().join(name),
            Remote::new(
                url.clone(),
                Credentials::SshKey {
                    key_file: key.to_owned(),
                    known_hosts: known,
                },
            )
            .expect("remote"),
            MirrorOptions::default(),
        )
        .expect("open")
    };

    let good = with(
        "good.git",
        &sshd.client_key,
        KnownHosts::Pinned(sshd.known_hosts.clone()),
    );
    good.fetch(&Fetch::All).expect("fetch over ssh");
    assert_eq!(good.resolve("main").expect("main"), oid(&head));

    let other_key = local.path().join("other_key");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let err = with(
        "badkey.git",
        &other_key,
        KnownHosts::Pinned(sshd.known_hosts.clone()),
    )
    .fetch(&Fetch::All)
    .expect_err("key not authorized");
    assert!(matches!(err, GitError::AuthRefused { .. }), "{err}");

    let empty = local.path().join("empty_known_hosts");
    std::fs::write(&empty, "").expect("write");
    let err = with("unknown.git", &sshd.client_key, KnownHosts::Pinned(empty))
        .fetch(&Fetch::All)
        .expect_err("host key unknown");
    assert!(matches!(err, GitError::HostKeyRejected { .. }), "{err}");

    let first_use = local.path().join("tofu_known_hosts");
    with(
        "tofu.git",
        &sshd.client_key,
        KnownHosts::AcceptNew(first_use.clone()),
    )
    .fetch(&Fetch::All)
    .expect("trust on first use");
    assert!(std::fs::read_to_string(&first_use)
        .expect("recorded")
        .contains("127.0.0.1"));
}

#[test]
fn a_local_path_mirrors_and_a_password_in_the_url_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    let head = served.commit_and_push("first", "main");
    let local = tempfile::tempdir().expect("tempdir");
    let mirror = mirror(
        local.path(),
        Remote::new(served.bare.to_string_lossy(), Credentials::None).expect("remote"),
    );
    mirror.fetch(&Fetch::All).expect("local fetch");
    assert_eq!(mirror.resolve("main").expect("main"), oid(&head));
    let err = Remote::new(
        "https://ci:hunter2@forge.example/app.git",
        Credentials::None,
    )
    .expect_err("password in URL");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn changed_paths_are_those_between_two_commits_or_of_a_new_head_against_its_parent() {
    let root = tempfile::tempdir().expect("tempdir");
    let served = ServedRepo::new(root.path(), "app");
    served.write(&[("README", b"one\n"), ("src/a.rs", b"a\n")]);
    let first = served.commit_and_push("first", "main");
    served.write(&[("src/a.rs", b"changed\n"), ("docs/b.md", b"b\n")]);
    let second = served.commit_and_push("second", "main");
    let local = tempfile::tempdir().expect("tempdir");
    let remote = Remote::new(
        format!("file://{}", served.bare.display()),
        Credentials::None,
    )
    .expect("remote");
    let mirror = mirror(local.path(), remote);
    mirror.fetch(&Fetch::All).expect("fetch");
    let between = mirror
        .changed_paths(Some(oid(&first)), oid(&second), 100)
        .expect("between");
    assert_eq!(between, ["docs/b.md", "src/a.rs"]);
    let root_commit = mirror.changed_paths(None, oid(&first), 100).expect("root");
    assert_eq!(root_commit, ["README", "src/a.rs"]);
    let new_head = mirror
        .changed_paths(None, oid(&second), 1)
        .expect("bounded");
    assert_eq!(new_head.len(), 1, "at most `max` paths: {new_head:?}");
}
