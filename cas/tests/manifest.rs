//! Manifest encoding: canonical bytes, a stable digest, and decode-time validation.

mod common;

use common::{dir, file, raw, symlink, DATA};
use gantry_cas::{
    CasError, ChunkRef, Digest, Entry, EntryKind, Manifest, MANIFEST_VERSION, MAX_CHUNK,
};

fn sample() -> Manifest {
    Manifest::new(vec![
        file("src/main.rs", DATA),
        dir("src"),
        symlink("link", "src/main.rs"),
        file("empty", b""),
    ])
}

#[test]
fn round_trip() {
    let manifest = sample();
    let bytes = manifest.encode();
    assert_eq!(bytes[0], MANIFEST_VERSION);
    let back = Manifest::decode(&bytes).expect("decode");
    assert_eq!(back, manifest);
    assert_eq!(back.encode(), bytes);
}

#[test]
fn digest_is_stable_and_order_independent() {
    let sorted = sample();
    let mut shuffled = sorted.clone();
    shuffled.entries.reverse();
    assert_eq!(shuffled.encode(), sorted.encode());
    assert_eq!(shuffled.digest(), sorted.digest());
    assert_eq!(sorted.digest(), Digest::of(&sorted.encode()));
    // Pinned: a change here changes every manifest id, which must be deliberate (bump
    // MANIFEST_VERSION).
    let pinned = Manifest::new(vec![file("a", b"x")]);
    assert_eq!(
        pinned.digest().to_string(),
        "blake3:968e963679d736a7124ea014ddb806af18ec6e08e455caa98586b59586e5044d",
        "update deliberately"
    );
}

#[test]
fn unsorted_bytes_are_refused() {
    // Encode by hand in the wrong order: same postcard layout as the real encoding.
    #[derive(serde::Serialize)]
    struct Wire<'a> {
        version: u8,
        entries: &'a [Entry],
    }
    let entries = [file("b", DATA), file("a", DATA)];
    let bytes = postcard::to_stdvec(&Wire {
        version: MANIFEST_VERSION,
        entries: &entries,
    })
    .expect("encode");
    let err = Manifest::decode(&bytes).expect_err("refused");
    assert!(
        matches!(&err, CasError::NotCanonical { path } if path == "a"),
        "{err}"
    );
}

/// Regression (found by the `manifest` fuzz target): postcard reads `0xa4 0x00` as 36,
/// so a manifest with a mode written in two bytes decoded although it is not the
/// canonical encoding, and its digest differed from the digest of its bytes.
#[test]
fn overlong_integers_are_refused() {
    let manifest = Manifest::new(vec![dir("d")]);
    let canonical = manifest.encode();
    // Version, one entry, path "d", kind Dir (variant 2), then the mode 0o755 = 493 as
    // the two-byte varint 0xed 0x03.
    assert_eq!(canonical, [MANIFEST_VERSION, 1, 1, b'd', 2, 0xed, 0x03]);
    let mut overlong = canonical.clone();
    overlong[6] = 0x83; // 0xed 0x83 0x00: the same 493 in three bytes
    overlong.push(0x00);
    let err = Manifest::decode(&overlong).expect_err("refused");
    assert!(matches!(&err, CasError::ManifestEncoding { .. }), "{err}");
    assert!(err.to_string().contains("canonical"), "{err}");
    assert_eq!(Manifest::decode(&canonical).expect("canonical"), manifest);
}

#[test]
fn unknown_version_is_refused() {
    let mut bytes = sample().encode();
    bytes[0] = 99;
    let err = Manifest::decode(&bytes).expect_err("refused");
    assert!(
        matches!(err, CasError::UnsupportedManifestVersion { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn truncated_and_trailing_bytes_are_refused() {
    let bytes = sample().encode();
    let err = Manifest::decode(&bytes[..bytes.len() - 3]).expect_err("truncated");
    assert!(matches!(err, CasError::ManifestEncoding { .. }), "{err}");
    let mut longer = bytes.clone();
    longer.push(0);
    let err = Manifest::decode(&longer).expect_err("trailing");
    assert!(matches!(err, CasError::ManifestEncoding { .. }), "{err}");
    let err = Manifest::decode(&[]).expect_err("empty");
    assert!(matches!(err, CasError::ManifestEncoding { .. }), "{err}");
}

#[test]
fn huge_declared_entry_count_does_not_allocate_it() {
    // Version 1, then a varint entry count of about 2^62 and nothing else.
    let bytes = [
        MANIFEST_VERSION,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0x3f,
    ];
    let err = Manifest::decode(&bytes).expect_err("refused");
    assert!(matches!(err, CasError::TooManyEntries { .. }), "{err}");
    // Just above the limit, still refused from the count alone.
    let mut bytes = vec![MANIFEST_VERSION];
    let mut count = gantry_cas::MAX_ENTRIES as u64 + 1;
    while count >= 0x80 {
        bytes.push((count as u8 & 0x7f) | 0x80);
        count >>= 7;
    }
    bytes.push(count as u8);
    let err = Manifest::decode(&bytes).expect_err("refused");
    assert!(
        matches!(err, CasError::TooManyEntries { count, .. } if count == gantry_cas::MAX_ENTRIES + 1),
        "{err}"
    );
}

#[test]
fn oversized_chunk_is_refused() {
    let size = MAX_CHUNK as u32 + 1;
    let manifest = raw(vec![Entry {
        path: "big".to_owned(),
        kind: EntryKind::File {
            mode: 0o644,
            size: u64::from(size),
            chunks: vec![ChunkRef {
                digest: Digest::of(b""),
                size,
            }],
        },
    }]);
    let err = Manifest::decode(&manifest.encode()).expect_err("refused");
    assert!(
        matches!(&err, CasError::BadChunkSize { path, .. } if path == "big"),
        "{err}"
    );
}

#[test]
fn total_size_is_bounded() {
    // 300,000 maximal chunks declare about 73 GiB, above the 64 GiB bound.
    let chunk = ChunkRef {
        digest: Digest::of(b""),
        size: MAX_CHUNK as u32,
    };
    let chunks = vec![chunk; 300_000];
    let manifest = raw(vec![Entry {
        path: "huge".to_owned(),
        kind: EntryKind::File {
            mode: 0o644,
            size: 300_000 * MAX_CHUNK as u64,
            chunks,
        },
    }]);
    let err = manifest.validate().expect_err("refused");
    assert!(matches!(err, CasError::TooLarge { .. }), "{err}");
}

#[test]
fn too_many_entries_are_refused() {
    let entries = (0..=gantry_cas::MAX_ENTRIES)
        .map(|i| dir(&format!("d{i}")))
        .collect();
    let err = raw(entries).validate().expect_err("refused");
    assert!(matches!(err, CasError::TooManyEntries { .. }), "{err}");
}
