//! Build a manifest of a real tree, store its chunks compressed, extract elsewhere, and
//! get the same tree back: contents, modes, symlinks, and the same manifest digest.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::Prng;
use gantry_cas::{
    build_manifest, build_manifest_for, compress, decompress, extract, CasError, Digest, EntryKind,
    Manifest, PathProblem, SymlinkProblem,
};

/// An in-memory chunk store: compressed chunks by digest, with their uncompressed size.
#[derive(Default)]
struct Store {
    chunks: HashMap<Digest, (usize, Vec<u8>)>,
    puts: usize,
}

impl Store {
    fn put(&mut self, digest: Digest, data: &[u8]) {
        self.puts += 1;
        self.chunks
            .entry(digest)
            .or_insert_with(|| (data.len(), compress(data)));
    }

    fn get(&self, digest: &Digest) -> Result<Vec<u8>, CasError> {
        let (len, packed) = self.chunks.get(digest).expect("chunk was stored");
        decompress(packed, *len, digest)
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A tree with an empty file, a multi-chunk file, a duplicate file, a nested directory,
/// an executable, a private file, a file symlink, a directory symlink and a dangling one.
fn make_tree(root: &Path) {
    let mut prng = Prng::new(5);
    fs::create_dir_all(root.join("a/b/c")).expect("dirs");
    fs::write(root.join("empty"), b"").expect("write");
    let big = prng.bytes(700_000);
    fs::write(root.join("a/big.bin"), &big).expect("write");
    fs::write(root.join("a/b/copy.bin"), &big).expect("write");
    fs::write(root.join("a/b/c/deep.txt"), b"deep\n").expect("write");
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
    set_mode(&root.join("run.sh"), 0o755);
    fs::write(root.join("secret"), b"s3cret").expect("write");
    set_mode(&root.join("secret"), 0o600);
    set_mode(&root.join("a/b"), 0o750);
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("../..", root.join("a/b/up")).expect("symlink");
    std::os::unix::fs::symlink("missing", root.join("dangling")).expect("symlink");
}

#[test]
fn build_extract_and_compare() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);

    let mut store = Store::default();
    let manifest = build_manifest(&src, |digest, data| {
        store.put(digest, data);
        Ok(())
    })
    .expect("build");
    // The 700,000-byte file twice: its chunks are passed twice but stored once.
    assert!(store.puts > store.chunks.len());

    let paths: Vec<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "a",
            "a/b",
            "a/b/c",
            "a/b/c/deep.txt",
            "a/b/copy.bin",
            "a/b/up",
            "a/big.bin",
            "dangling",
            "empty",
            "link",
            "run.sh",
            "secret"
        ]
    );

    // Through bytes, as it would travel.
    let manifest = Manifest::decode(&manifest.encode()).expect("decode");
    let dest = work.path().join("dest");
    extract(&manifest, &dest, |digest| store.get(digest)).expect("extract");

    for file in [
        "empty",
        "a/big.bin",
        "a/b/copy.bin",
        "a/b/c/deep.txt",
        "run.sh",
        "secret",
    ] {
        assert_eq!(
            fs::read(dest.join(file)).expect("read extracted"),
            fs::read(src.join(file)).expect("read source"),
            "{file}"
        );
    }
    let mode = |p: PathBuf| fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(dest.join("run.sh")), 0o755);
    assert_eq!(mode(dest.join("secret")), 0o600);
    assert_eq!(mode(dest.join("a/b")), 0o750);
    for link in ["link", "a/b/up", "dangling"] {
        assert_eq!(
            fs::read_link(dest.join(link)).expect("readlink"),
            fs::read_link(src.join(link)).expect("readlink"),
        );
    }
    assert_eq!(
        fs::read(dest.join("link")).expect("through link"),
        b"deep\n"
    );

    // The extracted tree builds to the very same manifest.
    let again = build_manifest(&dest, |_, _| Ok(())).expect("rebuild");
    assert_eq!(again.digest(), manifest.digest());
}

#[test]
fn selection_builds_only_what_is_asked() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let manifest = build_manifest_for(
        &src,
        &[
            PathBuf::from("a/b/c"),
            PathBuf::from("run.sh"),
            PathBuf::from("a/b/c/deep.txt"),
        ],
        |_, _| Ok(()),
    )
    .expect("build");
    let paths: Vec<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a", "a/b", "a/b/c", "a/b/c/deep.txt", "run.sh"]);
    assert!(matches!(
        manifest.entries[1].kind,
        EntryKind::Dir { mode: 0o750 }
    ));
}

#[test]
fn selecting_dot_is_the_whole_tree() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let whole = build_manifest(&src, |_, _| Ok(())).expect("build");
    let dot = build_manifest_for(&src, &[PathBuf::from(".")], |_, _| Ok(())).expect("build");
    assert_eq!(dot.digest(), whole.digest());
}

#[test]
fn selection_outside_root_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let err = build_manifest_for(&src, &[PathBuf::from("../src/run.sh")], |_, _| Ok(()))
        .expect_err("refused");
    assert!(
        matches!(
            err,
            CasError::InvalidPath {
                problem: PathProblem::ParentDir,
                ..
            }
        ),
        "{err}"
    );
    // `a/b/up` is a symlink to the root: selecting through it is refused.
    let err = build_manifest_for(&src, &[PathBuf::from("a/b/up/run.sh")], |_, _| Ok(()))
        .expect_err("refused");
    assert!(matches!(err, CasError::ThroughSymlink { .. }), "{err}");
}

#[test]
fn tree_with_escaping_symlink_is_refused_at_build() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fs::create_dir(&src).expect("dir");
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs")).expect("symlink");
    let err = build_manifest(&src, |_, _| Ok(())).expect_err("refused");
    assert!(
        matches!(
            err,
            CasError::UnsafeSymlink {
                problem: SymlinkProblem::Absolute,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn chunk_callback_errors_stop_the_build() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let err = build_manifest(&src, |_, _| {
        Err(CasError::Io {
            context: "storing chunk".to_owned(),
            source: std::io::Error::other("disk full"),
        })
    })
    .expect_err("fails");
    assert!(err.to_string().contains("disk full"), "{err}");
}
