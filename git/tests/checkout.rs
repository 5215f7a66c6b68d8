//! A commit's tree as a manifest, its limits and refusals, and the workspace's `.git`
//! checked with the real git program.

mod support;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;

use gantry_cas::{Bytes, Digest, EntryKind, Existing};
use gantry_git::{
    build_payload, checkout_tree, write_git_dir, CheckoutLimits, CheckoutOptions, Credentials,
    Depth, GitError, GitPayload, GitProgram, MemoryMemo, Mirror, MirrorOptions, Mirrors, ObjectId,
    PayloadRequest, Remote, SymlinkPolicy, TreeCheckout,
};
use support::{git, ServedRepo};

/// A served repository and a mirror of it that fetched everything.
struct Fixture {
    _root: tempfile::TempDir,
    served: ServedRepo,
    mirror: Mirror,
    mirrors: Mirrors,
    chunks: HashMap<Digest, Vec<u8>>,
}

impl Fixture {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let served = ServedRepo::new(root.path(), "app");
        let mirror = Mirror::open(
            GitProgram::default(),
            root.path().join("mirrors/app.git"),
            Remote::new(served.bare.to_string_lossy(), Credentials::None).expect("remote"),
            MirrorOptions::default(),
        )
        .expect("mirror");
        let mirrors = Mirrors {
            root: root.path().join("mirrors"),
            git: GitProgram::default(),
            options: MirrorOptions::default(),
        };
        Self {
            _root: root,
            served,
            mirror,
            mirrors,
            chunks: HashMap::new(),
        }
    }

    fn push(&self, message: &str) -> ObjectId {
        let head = self.served.commit_and_push(message, "main");
        self.mirror.fetch(&gantry_git::Fetch::All).expect("fetch");
        ObjectId::from_hex(&head).expect("id")
    }

    /// Serves a repository `lib` beside the app (one commit, `lib.txt`), adds it to the
    /// app as the submodule `vendor/lib` with a relative URL, and pushes: the served
    /// lib, its head and the app's new head.
    fn push_with_a_submodule(&self) -> (ServedRepo, String, ObjectId) {
        let root = self.served.bare.parent().expect("root").to_owned();
        let lib = ServedRepo::new(&root, "lib");
        lib.write(&[("lib.txt", b"library\n")]);
        let lib_head = lib.commit_and_push("lib", "main");
        self.served.write(&[("app.txt", b"app\n")]);
        git(
            &self.served.work,
            &[
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "-q",
                "../lib.git",
                "vendor/lib",
            ],
        );
        let head = self.push("with a submodule");
        (lib, lib_head, head)
    }

    fn checkout(
        &mut self,
        commit: ObjectId,
        options: &CheckoutOptions,
        memo: &MemoryMemo,
    ) -> Result<TreeCheckout, GitError> {
        let chunks = &mut self.chunks;
        checkout_tree(
            &self.mirror,
            commit,
            options,
            memo,
            Some(&self.mirrors),
            |digest, bytes: &Bytes| {
                chunks.insert(digest, bytes.to_vec());
                Ok::<(), String>(())
            },
        )
    }

    /// Extracts a checkout's files from the chunks stored so far.
    fn extract(&self, checkout: &TreeCheckout, dest: &Path) {
        gantry_cas::extract_with(&checkout.manifest, dest, Existing::Refuse, |digest| {
            self.chunks
                .get(digest)
                .cloned()
                .ok_or_else(|| gantry_cas::CasError::CorruptChunk {
                    digest: *digest,
                    reason: "not stored".into(),
                })
        })
        .expect("extract");
    }

    /// Extracts a checkout and writes its `.git`, as the agent would.
    fn materialise(&self, checkout: &TreeCheckout, depth: Depth, dest: &Path) -> GitPayload {
        self.extract(checkout, dest);
        let (payload, _) = build_payload(
            &self.mirror,
            &PayloadRequest {
                checkout,
                depth,
                reference: Some("refs/heads/main"),
                remote_url: Some(self.mirror.remote().url()),
            },
        )
        .expect("payload");
        // What travels is the encoded form.
        let payload = GitPayload::decode(&payload.encode()).expect("decode");
        write_git_dir(dest, &payload).expect("write .git");
        payload
    }
}

#[test]
fn the_manifest_holds_the_tree_and_a_one_file_commit_reads_one_blob() {
    let mut fx = Fixture::new();
    let mut files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("src/m{i:02}/file.txt"),
                format!("content {i}\n").repeat(i + 1).into_bytes(),
            )
        })
        .collect();
    files.push((
        "big.bin".into(),
        (0..700_000u32).flat_map(u32::to_le_bytes).collect(),
    ));
    files.push(("run.sh".into(), b"#!/bin/sh\necho hi\n".to_vec()));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    fx.served.write(&refs);
    std::os::unix::fs::symlink("src/m01/file.txt", fx.served.work.join("link")).expect("symlink");
    std::fs::set_permissions(
        fx.served.work.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let first = fx.push("first");

    let memo = MemoryMemo::default();
    let options = CheckoutOptions::default();
    let checkout = fx.checkout(first, &options, &memo).expect("checkout");
    assert_eq!(checkout.figures.files, 43);
    assert_eq!(
        checkout.figures.blobs_read, 42,
        "distinct blobs, the link's target read apart"
    );
    let run = checkout
        .manifest
        .entries
        .iter()
        .find(|e| e.path == "run.sh")
        .expect("run.sh");
    assert!(matches!(run.kind, EntryKind::File { mode: 0o755, .. }));
    let link = checkout
        .manifest
        .entries
        .iter()
        .find(|e| e.path == "link")
        .expect("link");
    assert_eq!(
        link.kind,
        EntryKind::Symlink {
            target: "src/m01/file.txt".into()
        }
    );

    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    fx.materialise(&checkout, Depth::Commits(NonZeroU32::MIN), &ws);
    for (path, content) in &files {
        assert_eq!(
            &std::fs::read(ws.join(path)).expect("file"),
            content,
            "{path}"
        );
    }

    fx.served.write(&[("src/m07/file.txt", b"changed\n")]);
    let second = fx.push("second");
    let again = fx.checkout(second, &options, &memo).expect("checkout");
    assert_eq!(again.figures.blobs_read, 1, "only the changed file is read");
    assert_eq!(again.figures.blobs_from_memo, 41);
}

#[test]
fn the_workspace_git_answers_rev_parse_log_describe_and_a_clean_status() {
    let mut fx = Fixture::new();
    fx.served.write(&[("zero.txt", b"0\n")]);
    fx.push("zero");
    fx.served.write(&[("a.txt", b"a\n"), ("dir/b.txt", b"b\n")]);
    fx.push("one");
    git(&fx.served.work, &["tag", "-a", "-m", "release 1", "v1"]);
    git(&fx.served.work, &["push", "-q", "origin", "v1"]);
    fx.served.write(&[("a.txt", b"a2\n")]);
    fx.push("two");
    fx.served.write(&[("dir/c.txt", b"c\n")]);
    let head = fx.push("three: the built commit");

    let memo = MemoryMemo::default();
    let checkout = fx
        .checkout(head, &CheckoutOptions::default(), &memo)
        .expect("checkout");
    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    let payload = fx.materialise(
        &checkout,
        Depth::Commits(NonZeroU32::new(3).expect("3")),
        &ws,
    );
    assert_eq!(
        payload.shallow.len(),
        1,
        "the third commit (\"one\") is the boundary"
    );

    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), head.to_string());
    assert_eq!(
        git(&ws, &["log", "-1", "--format=%s"]),
        "three: the built commit"
    );
    assert_eq!(git(&ws, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");
    assert_eq!(
        git(&ws, &["describe", "--tags"]),
        format!("v1-2-g{}", &head.to_string()[..7])
    );
    assert_eq!(
        git(&ws, &["status", "--porcelain"]),
        "",
        "a fresh workspace is clean"
    );
    assert_eq!(git(&ws, &["rev-parse", "--is-shallow-repository"]), "true");
    assert_eq!(git(&ws, &["log", "--format=%s"]).lines().count(), 3);
    assert_eq!(
        git(&ws, &["config", "remote.origin.url"]),
        fx.mirror.remote().url()
    );
    assert!(!ws.join(".git/hooks").exists(), "no hooks directory");

    // An edit is seen; a new file is untracked.
    std::fs::write(ws.join("dir/b.txt"), b"edited\n").expect("edit");
    std::fs::write(ws.join("new.txt"), b"n\n").expect("new");
    assert_eq!(
        git(&ws, &["status", "--porcelain"]),
        "M dir/b.txt\n?? new.txt"
    );
}

#[test]
fn git_status_hashes_no_file_written_in_the_same_second_as_the_index() {
    let mut fx = Fixture::new();
    fx.served.write(&[("same.txt", b"0123456789\n")]);
    let head = fx.push("one");
    let memo = MemoryMemo::default();
    let checkout = fx
        .checkout(head, &CheckoutOptions::default(), &memo)
        .expect("checkout");
    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    fx.extract(&checkout, &ws);
    let (payload, _) = build_payload(
        &fx.mirror,
        &PayloadRequest {
            checkout: &checkout,
            depth: Depth::Full,
            reference: None,
            remote_url: None,
        },
    )
    .expect("payload");
    // A file dated at or after the second the index is written in (here, 5 s on, so
    // the test does not depend on where a second boundary falls) would be racy.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 5;
    let touched = std::process::Command::new("touch")
        .arg("-m")
        .arg(format!("--date=@{later}"))
        .arg(ws.join("same.txt"))
        .status()
        .expect("touch");
    assert!(touched.success());
    let figures = write_git_dir(&ws, &payload).expect(".git");
    assert_eq!(figures.mtimes_adjusted, 1);

    // Swap the file's bytes for others of the same size and put its mtime back: only
    // a git that hashes the file can tell (ctime is left out of the comparison).
    let path = ws.join("same.txt");
    let before = std::fs::metadata(&path).expect("stat");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"abcdefghij\n"))
        .expect("overwrite in place");
    let status = std::process::Command::new("touch")
        .arg("-m")
        .arg(format!(
            "--date=@{}.{:09}",
            std::os::unix::fs::MetadataExt::mtime(&before),
            std::os::unix::fs::MetadataExt::mtime_nsec(&before)
        ))
        .arg(&path)
        .status()
        .expect("touch");
    assert!(status.success());
    assert_eq!(
        git(
            &ws,
            &["-c", "core.trustctime=false", "status", "--porcelain"]
        ),
        "",
        "git re-read the file: its index entry was racy"
    );

    // A real edit, even of the same size in the same second, gets a new mtime, which
    // is not the one set back and recorded: git sees it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"ABCDEFGHIJ\n"))
        .expect("edit in place");
    assert_eq!(
        git(
            &ws,
            &["-c", "core.trustctime=false", "status", "--porcelain"]
        ),
        "M same.txt",
        "porcelain output, trimmed"
    );
}

#[test]
fn limits_refuse_an_oversized_checkout_with_a_clear_error() {
    let mut fx = Fixture::new();
    fx.served
        .write(&[("a", &[1u8; 5000]), ("b", b"b"), ("c/d/e/f", b"deep")]);
    let head = fx.push("one");
    let memo = MemoryMemo::default();
    let cases = [
        (
            CheckoutLimits {
                max_total_bytes: 4096,
                ..CheckoutLimits::default()
            },
            "total size",
        ),
        (
            CheckoutLimits {
                max_files: 2,
                ..CheckoutLimits::default()
            },
            "number of files",
        ),
        (
            CheckoutLimits {
                max_depth: 3,
                ..CheckoutLimits::default()
            },
            "levels deep",
        ),
        (
            CheckoutLimits {
                max_path_bytes: 5,
                ..CheckoutLimits::default()
            },
            "bytes, more than",
        ),
    ];
    for (limits, says) in cases {
        let options = CheckoutOptions {
            limits,
            ..CheckoutOptions::default()
        };
        let err = fx
            .checkout(head, &options, &memo)
            .expect_err("over the limit");
        assert!(err.to_string().contains(says), "{err}");
        assert!(
            matches!(err, GitError::TooLarge { .. } | GitError::UnsafePath { .. }),
            "{err}"
        );
    }
    assert!(
        memo.is_empty(),
        "limits are checked before any blob is read"
    );
}

#[test]
fn a_symlink_out_of_the_tree_is_neutralised_or_refused_and_nothing_lands_outside() {
    let mut fx = Fixture::new();
    fx.served.write(&[("ok.txt", b"ok\n")]);
    let outside = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(outside.path(), fx.served.work.join("escape")).expect("symlink");
    std::os::unix::fs::symlink("../../etc/passwd", fx.served.work.join("up")).expect("symlink");
    let head = fx.push("links out");
    let memo = MemoryMemo::default();

    let refuse = CheckoutOptions {
        symlinks: SymlinkPolicy::Refuse,
        ..CheckoutOptions::default()
    };
    let err = fx.checkout(head, &refuse, &memo).expect_err("refused");
    assert!(
        matches!(&err, GitError::UnsafePath { path, .. } if path == "escape"),
        "{err}"
    );

    let checkout = fx
        .checkout(head, &CheckoutOptions::default(), &memo)
        .expect("neutralised");
    assert_eq!(
        checkout.neutralised,
        vec!["escape".to_owned(), "up".to_owned()]
    );
    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    fx.materialise(&checkout, Depth::Commits(NonZeroU32::MIN), &ws);
    let escape = std::fs::symlink_metadata(ws.join("escape")).expect("escape");
    assert!(escape.is_file(), "written as a file holding the target");
    assert_eq!(
        std::fs::read_to_string(ws.join("escape")).expect("read"),
        outside.path().to_string_lossy()
    );
    assert_eq!(std::fs::read_dir(outside.path()).expect("list").count(), 0);
    assert_eq!(git(&ws, &["config", "core.symlinks"]), "false");
    assert_eq!(
        git(&ws, &["status", "--porcelain"]),
        "",
        "git sees the links as git without symlinks would"
    );
}

/// Commits a tree made with plumbing (git's porcelain refuses these names).
fn commit_crafted_tree(fx: &Fixture, entries: &str) -> ObjectId {
    let work = &fx.served.work;
    let tree = {
        let mut child = std::process::Command::new("git")
            .args(["mktree", "--missing"])
            .current_dir(work)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("mktree");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), entries.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("mktree");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let commit = git(work, &["commit-tree", &tree, "-m", "crafted"]);
    git(
        work,
        &[
            "push",
            "-q",
            "-f",
            "origin",
            &format!("{commit}:refs/heads/crafted"),
        ],
    );
    fx.mirror.fetch(&gantry_git::Fetch::All).expect("fetch");
    ObjectId::from_hex(&commit).expect("id")
}

#[test]
fn a_committed_dot_git_at_any_level_is_refused() {
    let mut fx = Fixture::new();
    fx.served.write(&[("x", b"x")]);
    fx.push("base");
    let work = fx.served.work.clone();
    let hook = git(&work, &["hash-object", "-w", "--stdin"]);
    let _ = hook;
    // A blob for a malicious config and hook.
    std::fs::write(work.join("payload"), b"[core]\n\thooksPath = /tmp\n").expect("write");
    let blob = git(&work, &["hash-object", "-w", "payload"]);
    let dot_git = git_mktree(&work, &format!("100644 blob {blob}\tconfig\n"));
    let nested = git_mktree(&work, &format!("040000 tree {dot_git}\t.GIT\n"));
    for (name, entries) in [
        ("top", format!("040000 tree {dot_git}\t.git\n")),
        ("nested", format!("040000 tree {nested}\tsub\n")),
        ("file", format!("100644 blob {blob}\t.git\n")),
    ] {
        let commit = commit_crafted_tree(&fx, &entries);
        let memo = MemoryMemo::default();
        let err = fx
            .checkout(commit, &CheckoutOptions::default(), &memo)
            .expect_err(name);
        assert!(matches!(err, GitError::UnsafePath { .. }), "{name}: {err}");
        assert!(err.to_string().contains(".git"), "{name}: {err}");
    }
}

fn git_mktree(work: &Path, entries: &str) -> String {
    let mut child = std::process::Command::new("git")
        .args(["mktree"])
        .current_dir(work)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mktree");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), entries.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("mktree");
    assert!(out.status.success(), "mktree {entries}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn submodules_are_merged_at_their_paths_and_local_urls_of_remote_repos_refused() {
    let mut fx = Fixture::new();
    let (lib, lib_head, head) = fx.push_with_a_submodule();
    let memo = MemoryMemo::default();
    let options = CheckoutOptions {
        submodules: true,
        ..CheckoutOptions::default()
    };
    let checkout = fx.checkout(head, &options, &memo).expect("checkout");
    assert_eq!(checkout.submodules.len(), 1);
    assert_eq!(checkout.submodules[0].commit.to_string(), lib_head);
    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    fx.materialise(&checkout, Depth::Commits(NonZeroU32::MIN), &ws);
    assert_eq!(
        std::fs::read_to_string(ws.join("vendor/lib/lib.txt")).expect("merged"),
        "library\n"
    );
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");

    // The same .gitmodules seen from a repository that is not local is refused.
    std::fs::write(
        fx.served.work.join(".gitmodules"),
        format!(
            "[submodule \"lib\"]\n\tpath = vendor/lib\n\turl = {}\n",
            lib.bare.display()
        ),
    )
    .expect("write");
    let head = fx.push("absolute local submodule url");
    let remote_view = Mirror::open(
        GitProgram::default(),
        fx.mirror.dir(),
        Remote::new("https://forge.invalid/app.git", Credentials::None).expect("remote"),
        MirrorOptions::default(),
    )
    .expect("reopen");
    let err = checkout_tree(
        &remote_view,
        head,
        &options,
        &memo,
        Some(&fx.mirrors),
        |_, _: &Bytes| Ok::<(), String>(()),
    )
    .expect_err("local url refused");
    assert!(matches!(err, GitError::Submodule { .. }), "{err}");
    assert!(err.to_string().contains("local path"), "{err}");
}

#[test]
fn a_tag_build_gets_a_detached_head_full_history_and_an_exact_describe() {
    let mut fx = Fixture::new();
    for round in 0..3 {
        fx.served
            .write(&[("f.txt", format!("{round}\n").as_bytes())]);
        fx.push(&format!("commit {round}"));
    }
    git(&fx.served.work, &["tag", "v2"]);
    git(&fx.served.work, &["push", "-q", "origin", "v2"]);
    fx.mirror.fetch(&gantry_git::Fetch::All).expect("fetch");
    let head = fx.mirror.resolve("refs/tags/v2").expect("tag");
    let memo = MemoryMemo::default();
    let checkout = fx
        .checkout(head, &CheckoutOptions::default(), &memo)
        .expect("checkout");
    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    fx.extract(&checkout, &ws);
    let (payload, figures) = build_payload(
        &fx.mirror,
        &PayloadRequest {
            checkout: &checkout,
            depth: Depth::Full,
            reference: Some("refs/tags/v2"),
            remote_url: None,
        },
    )
    .expect("payload");
    assert_eq!(figures.commits, 3);
    write_git_dir(&ws, &payload).expect(".git");
    assert_eq!(git(&ws, &["describe", "--tags"]), "v2");
    assert_eq!(git(&ws, &["rev-parse", "--is-shallow-repository"]), "false");
    assert_eq!(
        git(&ws, &["rev-parse", "--abbrev-ref", "HEAD"]),
        "HEAD",
        "detached"
    );
    assert_eq!(git(&ws, &["log", "--format=%s"]).lines().count(), 3);
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");

    // The agent refuses to write over a .git that is already there.
    let err = write_git_dir(&ws, &payload).expect_err(".git exists");
    assert!(err.to_string().contains(".git"), "{err}");
    // And a payload that is not one.
    assert!(GitPayload::decode(b"").is_err());
    let mut garbage = payload.encode();
    garbage.truncate(garbage.len() / 2);
    assert!(GitPayload::decode(&garbage).is_err());
}

#[test]
fn without_submodules_the_gitlink_stays_an_empty_directory_and_status_is_clean() {
    let mut fx = Fixture::new();
    let (_lib, _lib_head, head) = fx.push_with_a_submodule();
    let memo = MemoryMemo::default();
    let checkout = fx
        .checkout(head, &CheckoutOptions::default(), &memo)
        .expect("checkout");
    assert!(checkout.submodules.is_empty());
    assert!(checkout
        .index
        .iter()
        .any(|e| e.path == "vendor/lib" && e.mode == 0o160_000));
    let dest = tempfile::tempdir().expect("tempdir");
    let ws = dest.path().join("ws");
    fx.materialise(&checkout, Depth::Commits(NonZeroU32::MIN), &ws);
    assert_eq!(
        std::fs::read_dir(ws.join("vendor/lib"))
            .expect("dir")
            .count(),
        0
    );
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
}
