//! Every hostile manifest is refused with its own error, and nothing appears outside the
//! destination. Each test extracts into `<tmp>/dest` and then checks that `<tmp>` holds
//! nothing but `dest` (and, where the attack aims at it, that the target is untouched).

mod common;

use std::fs;
use std::path::Path;

use common::{dir, fetch, file, listing, raw, symlink, DATA};
use gantry_cas::{extract, CasError, Manifest, PathProblem, SymlinkProblem};

/// Extracts `manifest` into a fresh `<tmp>/dest`, expects a refusal, checks nothing was
/// written outside `dest`, and returns the error.
fn refused(manifest: &Manifest) -> CasError {
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let err = extract(manifest, &dest, fetch).expect_err("extraction must be refused");
    assert_nothing_outside(root.path());
    // The same manifest arriving as bytes is refused at decode, before extraction.
    assert!(
        Manifest::decode(&manifest.encode()).is_err(),
        "decode must refuse it too"
    );
    err
}

fn assert_nothing_outside(root: &Path) {
    let names = listing(root);
    assert!(
        names == ["dest"] || names.is_empty(),
        "something was written outside dest: {names:?}"
    );
}

#[test]
fn dotdot_component_is_refused() {
    let err = refused(&raw(vec![file("../escaped", DATA)]));
    assert!(
        matches!(&err, CasError::InvalidPath { path, problem: PathProblem::ParentDir } if path == "../escaped"),
        "{err}"
    );
    assert!(err.to_string().contains("../escaped"), "{err}");
}

#[test]
fn dotdot_in_the_middle_is_refused() {
    let err = refused(&raw(vec![file("a/../../escaped", DATA)]));
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
}

#[test]
fn absolute_path_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let target = root.path().join("escaped");
    let manifest = raw(vec![file(target.to_str().expect("utf-8"), DATA)]);
    let err = extract(&manifest, &root.path().join("dest"), fetch).expect_err("refused");
    assert!(
        matches!(
            err,
            CasError::InvalidPath {
                problem: PathProblem::Absolute,
                ..
            }
        ),
        "{err}"
    );
    assert!(!target.exists());
    assert_nothing_outside(root.path());
}

#[test]
fn empty_and_dot_components_are_refused() {
    for (path, expected) in [
        ("", PathProblem::Empty),
        ("a//b", PathProblem::EmptyComponent),
        ("a/", PathProblem::EmptyComponent),
        ("./a", PathProblem::CurDir),
        ("a/\0b", PathProblem::Nul),
    ] {
        let err = refused(&raw(vec![file(path, DATA)]));
        assert!(
            matches!(&err, CasError::InvalidPath { problem, .. } if *problem == expected),
            "{path:?}: {err}"
        );
    }
}

#[test]
fn absolute_symlink_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let outside = root.path().join("outside");
    fs::create_dir(&outside).expect("outside dir");
    let manifest = raw(vec![
        symlink("link", outside.to_str().expect("utf-8")),
        file("link/f", DATA),
    ]);
    let err = extract(&manifest, &root.path().join("dest"), fetch).expect_err("refused");
    assert!(
        matches!(&err, CasError::UnsafeSymlink { path, problem: SymlinkProblem::Absolute, .. } if path == "link"),
        "{err}"
    );
    assert!(listing(&outside).is_empty(), "written through the link");
    let mut names = listing(root.path());
    names.retain(|name| name != "dest");
    assert_eq!(names, ["outside"], "something was written outside dest");
    assert!(!root.path().join("dest/link").exists());
}

#[test]
fn relative_symlink_leaving_dest_is_refused() {
    let err = refused(&raw(vec![symlink("sub/link", "../../x")]));
    assert!(
        matches!(&err, CasError::UnsafeSymlink { path, problem: SymlinkProblem::Escapes, .. } if path == "sub/link"),
        "{err}"
    );
}

#[test]
fn symlink_to_dest_parent_is_refused() {
    let err = refused(&raw(vec![symlink("up", "..")]));
    assert!(
        matches!(
            err,
            CasError::UnsafeSymlink {
                problem: SymlinkProblem::Escapes,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn dotdot_after_another_symlink_is_refused() {
    // `d/up -> ..` is the root, fine; `x -> d/up/..` is `d` lexically but the root's
    // parent on disk.
    let err = refused(&raw(vec![
        dir("d"),
        symlink("d/up", ".."),
        symlink("x", "d/up/.."),
    ]));
    assert!(
        matches!(&err, CasError::UnsafeSymlink { path, problem: SymlinkProblem::DotDotAfterSymlink, .. } if path == "x"),
        "{err}"
    );
}

#[test]
fn file_through_symlink_is_refused() {
    // The link itself points inside the tree, so only the entry under it is wrong.
    let err = refused(&raw(vec![dir("x"), symlink("a", "x"), file("a/b", DATA)]));
    assert!(
        matches!(&err, CasError::ThroughSymlink { path, link } if path == "a/b" && link == "a"),
        "{err}"
    );
}

#[test]
fn file_through_symlink_listed_first_is_refused() {
    // Entry order must not matter: the file comes before the link that would redirect it.
    let err = refused(&raw(vec![file("a/b", DATA), symlink("a", ".")]));
    assert!(matches!(err, CasError::ThroughSymlink { .. }), "{err}");
}

#[test]
fn entry_under_a_file_is_refused() {
    let err = refused(&raw(vec![file("a", DATA), file("a/b", DATA)]));
    assert!(
        matches!(&err, CasError::ParentNotDir { path, parent } if path == "a/b" && parent == "a"),
        "{err}"
    );
}

#[test]
fn duplicate_file_is_refused() {
    let err = refused(&raw(vec![file("a", DATA), file("a", DATA)]));
    assert!(
        matches!(&err, CasError::DuplicateEntry { path } if path == "a"),
        "{err}"
    );
}

#[test]
fn duplicate_with_different_kinds_is_refused() {
    let err = refused(&raw(vec![file("a", DATA), symlink("a", "b")]));
    assert!(
        matches!(&err, CasError::DuplicateEntry { path } if path == "a"),
        "{err}"
    );
}

#[test]
fn non_empty_destination_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    fs::create_dir(&dest).expect("dest");
    fs::write(dest.join("existing"), b"old").expect("write");
    let err = extract(&raw(vec![file("existing", DATA)]), &dest, fetch).expect_err("refused");
    assert!(matches!(err, CasError::DestinationNotEmpty { .. }), "{err}");
    assert_eq!(fs::read(dest.join("existing")).expect("read"), b"old");
}

#[test]
fn destination_that_is_a_symlink_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let outside = root.path().join("outside");
    fs::create_dir(&outside).expect("outside");
    let dest = root.path().join("dest");
    std::os::unix::fs::symlink(&outside, &dest).expect("symlink");
    let err = extract(&raw(vec![file("f", DATA)]), &dest, fetch).expect_err("refused");
    assert!(matches!(err, CasError::DestinationNotEmpty { .. }), "{err}");
    assert!(listing(&outside).is_empty());
}

#[test]
fn chunk_not_matching_its_digest_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let manifest = raw(vec![file("f", DATA)]);
    // Same length, different bytes.
    let err = extract(&manifest, &dest, |_| Ok(b"PAYLOAD\n".to_vec())).expect_err("refused");
    assert!(
        matches!(err, CasError::DigestMismatch { expected, .. } if expected == gantry_cas::Digest::of(DATA)),
        "{err}"
    );
    assert_nothing_outside(root.path());
}

#[test]
fn chunk_of_wrong_size_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let manifest = raw(vec![file("f", DATA)]);
    let err = extract(&manifest, &dest, |_| Ok(vec![0; 1 << 20])).expect_err("refused");
    assert!(matches!(err, CasError::CorruptChunk { .. }), "{err}");
}

#[test]
fn file_size_not_matching_chunks_is_refused() {
    let mut entry = file("f", DATA);
    if let gantry_cas::EntryKind::File { size, .. } = &mut entry.kind {
        *size = 1 << 40;
    }
    let err = refused(&raw(vec![entry]));
    assert!(
        matches!(&err, CasError::FileSizeMismatch { path, .. } if path == "f"),
        "{err}"
    );
}
