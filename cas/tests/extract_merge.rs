//! Extraction into a workspace that already holds files (a job's checkout, earlier
//! artifacts): directories are reused, files replaced, and nothing is ever written
//! through a symlink the workspace holds, whoever put it there.

mod common;

use std::fs;
use std::os::unix::fs::symlink as ln_s;

use common::{dir, fetch, file, symlink, DATA};
use gantry_cas::{extract_with, CasError, Existing, Manifest};

#[test]
fn files_merge_into_existing_directories_and_replace_files() {
    let root = tempfile::tempdir().expect("tempdir");
    let ws = root.path().join("ws");
    fs::create_dir_all(ws.join("out")).expect("out");
    fs::write(ws.join("out/old.txt"), b"keep me").expect("old");
    fs::write(ws.join("out/app.txt"), b"stale").expect("stale");
    fs::write(ws.join("README"), b"source").expect("readme");
    let manifest = Manifest::new(vec![
        dir("out"),
        file("out/app.txt", DATA),
        file("out/new.txt", DATA),
        symlink("out/latest", "app.txt"),
    ]);
    extract_with(&manifest, &ws, Existing::Merge, fetch).expect("merge");
    assert_eq!(fs::read(ws.join("out/app.txt")).expect("app"), DATA);
    assert_eq!(fs::read(ws.join("out/new.txt")).expect("new"), DATA);
    assert_eq!(fs::read(ws.join("out/old.txt")).expect("old"), b"keep me");
    assert_eq!(fs::read(ws.join("README")).expect("readme"), b"source");
    assert_eq!(fs::read(ws.join("out/latest")).expect("link"), DATA);
    // Merging the same tree again replaces rather than failing on what it wrote.
    extract_with(&manifest, &ws, Existing::Merge, fetch).expect("merge twice");
}

#[test]
fn a_workspace_symlink_is_never_written_through() {
    let root = tempfile::tempdir().expect("tempdir");
    let ws = root.path().join("ws");
    let outside = root.path().join("outside");
    fs::create_dir_all(&ws).expect("ws");
    fs::create_dir_all(&outside).expect("outside");
    // A checkout may hold a link pointing out of the workspace.
    ln_s(&outside, ws.join("out")).expect("link");
    let manifest = Manifest::new(vec![file("out/payload", DATA)]);
    let err = extract_with(&manifest, &ws, Existing::Merge, fetch).expect_err("refused");
    assert!(
        matches!(&err, CasError::ThroughSymlink { link, .. } if link == "out"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&outside).expect("outside").count(), 0);

    // A directory entry on top of that link is refused the same way.
    let manifest = Manifest::new(vec![dir("out")]);
    let err = extract_with(&manifest, &ws, Existing::Merge, fetch).expect_err("refused");
    assert!(matches!(err, CasError::ThroughSymlink { .. }), "{err}");
}

#[test]
fn a_file_entry_replaces_a_symlink_itself_not_its_target() {
    let root = tempfile::tempdir().expect("tempdir");
    let ws = root.path().join("ws");
    let target = root.path().join("precious");
    fs::create_dir_all(&ws).expect("ws");
    fs::write(&target, b"do not touch").expect("target");
    ln_s(&target, ws.join("app.txt")).expect("link");
    let manifest = Manifest::new(vec![file("app.txt", DATA)]);
    extract_with(&manifest, &ws, Existing::Merge, fetch).expect("merge");
    assert_eq!(fs::read(&target).expect("target"), b"do not touch");
    let meta = fs::symlink_metadata(ws.join("app.txt")).expect("meta");
    assert!(meta.is_file(), "the link was replaced by a regular file");
    assert_eq!(fs::read(ws.join("app.txt")).expect("app"), DATA);
}

#[test]
fn a_directory_in_the_way_of_a_file_is_refused_and_kept() {
    let root = tempfile::tempdir().expect("tempdir");
    let ws = root.path().join("ws");
    fs::create_dir_all(ws.join("out/inner")).expect("dirs");
    fs::write(ws.join("out/inner/x"), b"x").expect("x");
    let manifest = Manifest::new(vec![file("out", DATA)]);
    let err = extract_with(&manifest, &ws, Existing::Merge, fetch).expect_err("refused");
    assert!(
        err.to_string().contains("a directory is in the way"),
        "{err}"
    );
    assert_eq!(fs::read(ws.join("out/inner/x")).expect("kept"), b"x");
}
