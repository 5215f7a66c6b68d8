//! Decompression is bounded and verified. This binary installs a counting global
//! allocator, so the bomb tests can assert how much the Rust side allocated; tests in
//! this file run one at a time through `SERIAL` so their counts do not mix.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::Prng;
use gantry_cas::{compress, decompress, CasError, Digest, MAX_CHUNK};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

// Reason: a global allocator cannot be written without `unsafe`; this one only forwards
// to the system allocator and counts, and exists in this test binary alone.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator, under the same contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the peak bytes allocated (Rust heap) above what
/// was live when it started. zstd's own C allocations are not counted; its window is
/// capped by `decompress` instead.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let baseline = CURRENT.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - baseline)
}

/// 100 MB of zeros compressed by a streaming encoder, which does not record the content
/// size in the frame header. With `window_log` the window is as small as an honest
/// chunk's, so the header passes every check and only the output bound can stop it.
fn streamed_bomb(window_log: Option<u32>) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    if let Some(log) = window_log {
        encoder.window_log(log).expect("window log");
    }
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..100 {
        encoder.write_all(&zeros).expect("compress zeros");
    }
    encoder.finish().expect("finish")
}

#[test]
fn streamed_bomb_is_refused_within_the_bound() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bomb = streamed_bomb(Some(18));
    assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
    let declared = 64 * 1024;
    let (result, peak) = peak_during(|| decompress(&bomb, declared, &Digest::of(b"whatever")));
    let err = result.expect_err("bomb must be refused");
    assert!(
        matches!(
            err,
            CasError::TooLarge {
                what: "decompressed chunk",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        peak <= MAX_CHUNK + 64 * 1024,
        "allocated {peak} bytes while refusing a bomb declared at {declared}"
    );
}

#[test]
fn streamed_bomb_with_a_large_window_is_refused_from_its_header() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bomb = streamed_bomb(None);
    let (result, peak) = peak_during(|| decompress(&bomb, 64 * 1024, &Digest::of(b"x")));
    let err = result.expect_err("bomb must be refused");
    assert!(
        matches!(
            err,
            CasError::TooLarge {
                what: "chunk's zstd window",
                ..
            }
        ),
        "{err}"
    );
    assert!(peak < 64 * 1024, "allocated {peak} bytes before refusing");
}

#[test]
fn bomb_declaring_its_size_is_refused_before_decoding() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Built one megabyte at a time with a pledged size, so the header records 100 MB.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder
        .set_pledged_src_size(Some(100 << 20))
        .expect("pledge");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..100 {
        encoder.write_all(&zeros).expect("compress zeros");
    }
    let bomb = encoder.finish().expect("finish");
    let (result, peak) = peak_during(|| decompress(&bomb, 64 * 1024, &Digest::of(b"x")));
    let err = result.expect_err("bomb must be refused");
    assert!(
        matches!(err, CasError::TooLarge { size, .. } if size == 100 << 20),
        "{err}"
    );
    assert!(peak < 64 * 1024, "allocated {peak} bytes before refusing");
}

#[test]
fn declared_size_above_max_chunk_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = vec![7u8; 1000];
    let err = decompress(&compress(&data), MAX_CHUNK + 1, &Digest::of(&data)).expect_err("refused");
    assert!(matches!(err, CasError::TooLarge { .. }), "{err}");
}

#[test]
fn oversized_compressed_input_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let junk = Prng::new(9).bytes(gantry_cas::MAX_COMPRESSED_CHUNK + 1);
    let err = decompress(&junk, 1024, &Digest::of(b"x")).expect_err("refused");
    assert!(matches!(err, CasError::TooLarge { .. }), "{err}");
}

#[test]
fn round_trip_of_a_chunk() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut prng = Prng::new(1);
    for len in [1, 100, 64 * 1024, MAX_CHUNK] {
        let data = prng.bytes(len);
        let packed = compress(&data);
        let back = decompress(&packed, len, &Digest::of(&data)).expect("decompress");
        assert_eq!(back, data);
    }
    // Compressible data really compresses.
    let text = b"abcd".repeat(16 * 1024);
    assert!(compress(&text).len() < text.len() / 10);
}

#[test]
fn chunk_with_wrong_digest_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = Prng::new(2).bytes(10_000);
    let wrong = Digest::of(b"something else");
    let err = decompress(&compress(&data), data.len(), &wrong).expect_err("refused");
    assert!(
        matches!(err, CasError::DigestMismatch { expected, actual } if expected == wrong && actual == Digest::of(&data)),
        "{err}"
    );
}

#[test]
fn truncated_chunk_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = Prng::new(3).bytes(50_000);
    let packed = compress(&data);
    let err = decompress(&packed[..packed.len() / 2], data.len(), &Digest::of(&data))
        .expect_err("refused");
    assert!(matches!(err, CasError::CorruptChunk { .. }), "{err}");
}

#[test]
fn corrupted_chunk_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = b"some compressible text, ".repeat(2000);
    let mut packed = compress(&data);
    for index in (packed.len() / 3)..(packed.len() / 3 + 8) {
        packed[index] ^= 0x5a;
    }
    let err = decompress(&packed, data.len(), &Digest::of(&data)).expect_err("refused");
    // Depending on which bits flipped, zstd notices or the digest does; either way the
    // bytes never come back.
    assert!(
        matches!(
            err,
            CasError::CorruptChunk { .. } | CasError::DigestMismatch { .. }
        ),
        "{err}"
    );
}

#[test]
fn garbage_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let err = decompress(b"not zstd at all", 15, &Digest::of(b"x")).expect_err("refused");
    assert!(matches!(err, CasError::CorruptChunk { .. }), "{err}");
}

#[test]
fn short_output_is_refused() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let data = vec![1u8; 1000];
    // Honest bytes, dishonest declared length: stream-encoded so no header size exists.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder.window_log(18).expect("window log");
    encoder.write_all(&data).expect("write");
    let packed = encoder.finish().expect("finish");
    let err = decompress(&packed, 2000, &Digest::of(&data)).expect_err("refused");
    assert!(matches!(err, CasError::CorruptChunk { .. }), "{err}");
}
