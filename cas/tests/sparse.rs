//! Holes stay holes: a sparse file extracted takes the blocks of its data, not its
//! length, both when it is written ordinarily (small files) and past the page cache
//! (large ones); and a tree that would not fit is refused before anything is written.

use std::collections::HashMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use gantry_cas::{build_manifest, extract, space_needed, CasError, Digest, Manifest};

/// Builds `src`'s manifest, keeping each distinct chunk in memory.
fn build(src: &Path) -> (Manifest, HashMap<Digest, Vec<u8>>) {
    let mut chunks = HashMap::new();
    let manifest = build_manifest(src, |digest, data| {
        chunks.entry(digest).or_insert_with(|| data.to_vec());
        Ok(())
    })
    .expect("build");
    (manifest, chunks)
}

/// A file of `len` bytes, all holes but `marks` (offset, bytes).
fn sparse_file(path: &Path, len: u64, marks: &[(u64, &[u8])]) {
    let mut file = fs::File::create(path).expect("create");
    file.set_len(len).expect("set_len");
    for (at, bytes) in marks {
        file.seek(SeekFrom::Start(*at)).expect("seek");
        file.write_all(bytes).expect("write");
    }
}

const MIB: u64 = 1024 * 1024;

/// A file of the test: name, length, and its bytes of data (offset, bytes).
type SparseSpec = (&'static str, u64, &'static [(u64, &'static [u8])]);

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").blocks() * 512
}

#[test]
fn sparse_files_are_extracted_sparse_and_whole() {
    let root = tempfile::tempdir().expect("tempdir");
    let (src, dest) = (root.path().join("src"), root.path().join("dest"));
    fs::create_dir(&src).expect("src");
    // Large (past the page cache), small (written ordinarily), and one ending in a hole.
    let files: [SparseSpec; 3] = [
        (
            "large",
            96 * MIB,
            &[
                (0, b"head"),
                (40 * MIB + 3, b"middle"),
                (96 * MIB - 4, b"tail"),
            ],
        ),
        ("small", 4 * MIB, &[(5, b"five"), (2 * MIB, b"two")]),
        ("ends-in-a-hole", 12 * MIB, &[(1, b"x")]),
    ];
    for (name, len, marks) in files {
        sparse_file(&src.join(name), len, marks);
    }
    let (manifest, chunks) = build(&src);
    assert!(
        space_needed(&manifest) < 4 * MIB,
        "the zero chunks are not counted: {}",
        space_needed(&manifest)
    );
    extract(&manifest, &dest, |d| Ok(chunks[d].clone())).expect("extract");
    for (name, len, marks) in files {
        let (a, b) = (src.join(name), dest.join(name));
        assert_eq!(fs::metadata(&b).expect("meta").len(), len, "{name}: length");
        assert!(
            allocated(&b) <= 2 * MIB,
            "{name}: {} bytes allocated for {len} bytes with {} of data",
            allocated(&b),
            marks.len()
        );
        assert_eq!(
            fs::read(&a).expect("src"),
            fs::read(&b).expect("dest"),
            "{name}: bytes"
        );
    }
}

/// A tree larger than the free space of its destination's filesystem is refused before
/// anything is written, naming both sizes. The filesystem is a 4 MiB tmpfs mounted for
/// the test (root only; otherwise the check itself is covered by extract.rs's unit test).
#[test]
fn a_tree_larger_than_the_free_space_is_refused_before_writing() {
    let root = tempfile::tempdir().expect("tempdir");
    let small = root.path().join("small");
    fs::create_dir(&small).expect("mountpoint");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs (not root?)");
        return;
    }
    let _unmount = Unmount(&small);
    let src = root.path().join("src");
    fs::create_dir(&src).expect("src");
    // 8 MB of data that does not compress or dedup (a simple generator).
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let data: Vec<u8> = (0..8_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(src.join("big.bin"), &data).expect("write");
    let (manifest, chunks) = build(&src);
    let dest = small.join("out");
    let err = extract(&manifest, &dest, |d| Ok(chunks[d].clone())).expect_err("refused");
    assert!(matches!(err, CasError::NoSpace { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("not enough free space in") && text.contains("needs 7.6 MiB (8003584 bytes)"),
        "{text}"
    );
    assert_eq!(
        fs::read_dir(&dest).map_or(0, Iterator::count),
        0,
        "nothing written"
    );
}

/// Unmounts a filesystem mounted for a test when dropped (also when the test panics).
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}
