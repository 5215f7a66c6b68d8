//! Extraction with the files written by several threads at once (a tree restored from
//! the local chunk cache): the same tree, the same checks, the same refusals as on one
//! thread.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use common::{dir, file, raw, symlink, Prng};
use gantry_cas::{
    extract_verified_parallel, open_chunk, Bytes, CasError, Digest, Entry, EntryKind, Existing,
    Manifest, VerifiedChunk, PARALLEL_MIN_FILES,
};

/// Stored frames by digest, as a cache holds them.
struct Store(HashMap<Digest, (Bytes, usize)>);

impl Store {
    fn of(files: &[(String, Vec<u8>)]) -> Self {
        Self(
            files
                .iter()
                .filter(|(_, data)| !data.is_empty())
                .map(|(_, data)| {
                    let stored = Bytes::from(gantry_cas::compress(data));
                    (Digest::of(data), (stored, data.len()))
                })
                .collect(),
        )
    }

    fn open(&self, digest: &Digest) -> Result<VerifiedChunk, CasError> {
        let (stored, size) = self.0.get(digest).ok_or(CasError::CorruptChunk {
            digest: *digest,
            reason: "not in the test store".into(),
        })?;
        open_chunk(stored.clone(), *size, digest)
    }
}

/// 300 files of 0-3 KiB in 12 directories, one of them read-only.
fn tree() -> (Vec<Entry>, Vec<(String, Vec<u8>)>) {
    let mut rng = Prng::new(11);
    let mut entries = vec![dir("src"), dir("src/locked")];
    let mut files = Vec::new();
    for i in 0..300 {
        let path = match i % 12 {
            0 => format!("src/locked/f{i:03}"),
            d => format!("src/d{d:02}/f{i:03}"),
        };
        let len = (rng.next_u64() % 3072) as usize;
        let data = rng.bytes(len);
        entries.push(file(&path, &data));
        files.push((path, data));
    }
    entries.push(symlink("src/latest", "d01/f001"));
    for entry in &mut entries {
        if let (EntryKind::Dir { mode }, "src/locked") = (&mut entry.kind, entry.path.as_str()) {
            *mode = 0o555;
        }
    }
    (entries, files)
}

#[test]
fn a_tree_written_by_several_threads_arrives_exact() {
    let (entries, files) = tree();
    assert!(files.len() >= PARALLEL_MIN_FILES);
    let store = Store::of(&files);
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let threads = Mutex::new(HashSet::new());
    extract_verified_parallel(&Manifest::new(entries), &dest, Existing::Refuse, 4, || {
        threads
            .lock()
            .expect("threads")
            .insert(std::thread::current().id());
        |digest: &Digest| store.open(digest)
    })
    .expect("extract");
    assert_eq!(
        threads.lock().expect("threads").len(),
        4,
        "each of the 4 workers fetched its own share"
    );
    for (path, data) in &files {
        assert!(
            fs::read(dest.join(path)).expect("extracted file") == *data,
            "{path} differs"
        );
    }
    let locked = fs::metadata(dest.join("src/locked")).expect("locked");
    assert_eq!(
        locked.permissions().mode() & 0o777,
        0o555,
        "a read-only directory gets its mode after its files are written"
    );
    assert_eq!(
        fs::read_link(dest.join("src/latest")).expect("symlink"),
        Path::new("d01/f001")
    );
    // Let the temporary directory go.
    fs::set_permissions(dest.join("src/locked"), fs::Permissions::from_mode(0o755))
        .expect("unlock");
}

#[test]
fn a_bad_chunk_in_one_share_fails_the_extraction_with_its_digest() {
    let (entries, files) = tree();
    let store = Store::of(&files);
    // The 250th file, in the last worker's share, gets another file's bytes.
    let (victim, _) = &files[250];
    let victim_digest = Digest::of(&files[250].1);
    let wrong = Digest::of(&files[3].1);
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let err =
        extract_verified_parallel(&Manifest::new(entries), &dest, Existing::Refuse, 3, || {
            |digest: &Digest| {
                if *digest == victim_digest {
                    store.open(&wrong)
                } else {
                    store.open(digest)
                }
            }
        })
        .expect_err("a chunk that is not the one asked for is refused");
    assert!(
        matches!(&err, CasError::CorruptChunk { digest, .. } | CasError::DigestMismatch { expected: digest, .. } if *digest == victim_digest),
        "{victim}: {err}"
    );
    // Nothing was written outside `dest`.
    assert_eq!(common::listing(root.path()), ["dest"]);
}

#[test]
fn a_hostile_manifest_is_refused_before_any_thread_writes() {
    let (mut entries, files) = tree();
    let store = Store::of(&files);
    entries.push(file("../escaped", b"x"));
    let root = tempfile::tempdir().expect("tempdir");
    let dest = root.path().join("dest");
    let err = extract_verified_parallel(&raw(entries), &dest, Existing::Refuse, 4, || {
        |digest: &Digest| store.open(digest)
    })
    .expect_err("refused");
    assert!(err.to_string().contains(".."), "{err}");
    assert_eq!(common::listing(root.path()), Vec::<String>::new());
}

#[test]
fn merged_into_a_workspace_its_symlinks_are_never_written_through() {
    let (entries, files) = tree();
    let store = Store::of(&files);
    let root = tempfile::tempdir().expect("tempdir");
    let (ws, outside) = (root.path().join("ws"), root.path().join("outside"));
    fs::create_dir_all(ws.join("src")).expect("ws");
    fs::create_dir_all(&outside).expect("outside");
    let precious = root.path().join("precious");
    fs::write(&precious, b"do not touch").expect("precious");
    // A file entry's place holds a link to a file outside: the link itself is replaced.
    fs::create_dir_all(ws.join("src/d01")).expect("d01");
    std::os::unix::fs::symlink(&precious, ws.join("src/d01/f001")).expect("file link");
    let open = |digest: &Digest| store.open(digest);
    extract_verified_parallel(
        &Manifest::new(entries.clone()),
        &ws,
        Existing::Merge,
        4,
        || open,
    )
    .expect("merge");
    assert_eq!(fs::read(&precious).expect("precious"), b"do not touch");
    assert!(fs::symlink_metadata(ws.join("src/d01/f001"))
        .expect("replaced")
        .is_file());
    assert!(fs::read(ws.join("src/d01/f001")).expect("f001") == files[1].1);

    // A directory of the tree is a link out of the workspace: refused, nothing written
    // outside.
    let ws2 = root.path().join("ws2");
    fs::create_dir_all(ws2.join("src")).expect("ws2");
    std::os::unix::fs::symlink(&outside, ws2.join("src/d05")).expect("dir link");
    let err = extract_verified_parallel(&Manifest::new(entries), &ws2, Existing::Merge, 4, || open)
        .expect_err("refused");
    assert!(
        matches!(&err, CasError::ThroughSymlink { link, .. } if link == "src/d05"),
        "{err}"
    );
    assert_eq!(common::listing(&outside), Vec::<String>::new());
    for ws in [&ws, &ws2] {
        let locked = ws.join("src/locked");
        if locked.exists() {
            fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).expect("unlock");
        }
    }
}
