//! Per-chunk zstd compression, and a decompressor whose memory is bounded whatever the
//! input: a chunk never decodes to more than [`MAX_CHUNK`] bytes, and its digest is
//! checked before the bytes are handed back.

use std::cell::RefCell;

use zstd::bulk::{Compressor, Decompressor};

use crate::{CasError, Digest, MAX_CHUNK};

/// zstd level for chunks. Level 3 is zstd's default: several hundred MB/s per core,
/// which keeps compression off the critical path of a transfer. When to change: raise
/// it only if a benchmark shows the network, not the CPU, is the bottleneck.
pub const COMPRESSION_LEVEL: i32 = 3;

/// The largest compressed chunk accepted: zstd's worst case for [`MAX_CHUNK`] bytes.
/// Anything bigger cannot be an honest chunk and is refused before decoding.
/// This is zstd's `ZSTD_COMPRESSBOUND` formula for inputs of at least 128 KiB (checked
/// against `zstd_safe::compress_bound` in a test).
pub const MAX_COMPRESSED_CHUNK: usize = MAX_CHUNK + (MAX_CHUNK >> 8);

/// The largest back-reference window a chunk may use, as a power of two. 2^18 is
/// [`MAX_CHUNK`]; zstd shrinks the window to the input size, so every chunk this crate
/// compresses fits, and a hostile frame cannot make the decoder reserve a larger window.
const WINDOW_LOG_MAX: u32 = 18;

// One zstd context of each kind per thread, reused for every chunk. A fresh context per
// chunk (what `zstd::bulk::compress` does) zeroes its tables each time: 7% of an
// uploading agent's CPU time, plus the context allocation, in the artifact benchmark.
thread_local! {
    static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses one chunk.
pub fn compress(chunk: &[u8]) -> Vec<u8> {
    // Compressing an in-memory slice into a buffer of zstd's bound only fails if zstd
    // cannot allocate its context, which is an out-of-memory condition rather than an
    // input error.
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = slot.get_or_insert_with(|| {
            Compressor::new(COMPRESSION_LEVEL).expect("a zstd compression context")
        });
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk.len()));
        compressor
            .compress_to_buffer(chunk, &mut out)
            .expect("zstd compression of an in-memory chunk into its bound");
        out
    })
}

/// Decompresses one chunk that should hold `expected_len` bytes whose digest is
/// `expected_digest`.
///
/// Memory is bounded: `expected_len` must be at most [`MAX_CHUNK`], the output buffer is
/// never larger than `expected_len` (zstd will not write past it), and the window is
/// capped. A frame that declares or produces more than `expected_len` bytes is
/// [`CasError::TooLarge`];
/// undecodable input is [`CasError::CorruptChunk`]; bytes that decode but hash
/// differently are [`CasError::DigestMismatch`].
pub fn decompress(
    compressed: &[u8],
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<Vec<u8>, CasError> {
    if expected_len > MAX_CHUNK {
        return Err(CasError::TooLarge {
            what: "declared chunk size",
            size: expected_len as u64,
            limit: MAX_CHUNK as u64,
        });
    }
    if compressed.len() > MAX_COMPRESSED_CHUNK {
        return Err(CasError::TooLarge {
            what: "compressed chunk",
            size: compressed.len() as u64,
            limit: MAX_COMPRESSED_CHUNK as u64,
        });
    }
    let corrupt = |reason: String| CasError::CorruptChunk {
        digest: *expected_digest,
        reason,
    };
    // A frame that records its content size is checked before decoding anything.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(compressed) {
        if declared > expected_len as u64 {
            return Err(CasError::TooLarge {
                what: "chunk's zstd frame content size",
                size: declared,
                limit: expected_len as u64,
            });
        }
    }

    if let Some(window) = first_frame_window(compressed) {
        if window > 1 << WINDOW_LOG_MAX {
            return Err(CasError::TooLarge {
                what: "chunk's zstd window",
                size: window,
                limit: 1 << WINDOW_LOG_MAX,
            });
        }
    }

    // Into a buffer of exactly `expected_len` bytes of capacity: zstd refuses to write
    // past it, so no input can make this allocate more.
    let mut out = Vec::with_capacity(expected_len);
    let decoded = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut decompressor = Decompressor::new()
                .map_err(|err| corrupt(format!("cannot start zstd decoder: {err}")))?;
            decompressor
                .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
                .map_err(|err| corrupt(format!("cannot limit zstd window: {err}")))?;
            *slot = Some(decompressor);
        }
        let Some(decompressor) = slot.as_mut() else {
            return Err(corrupt("no zstd decoder".to_owned()));
        };
        decompressor
            .decompress_to_buffer(compressed, &mut out)
            .map_err(|err| {
                if err.to_string().contains("Destination buffer is too small") {
                    CasError::TooLarge {
                        what: "decompressed chunk",
                        size: expected_len as u64 + 1,
                        limit: expected_len as u64,
                    }
                } else {
                    corrupt(format!("zstd: {err}"))
                }
            })
    });
    decoded?;
    if out.len() < expected_len {
        return Err(corrupt(format!(
            "decompressed to {} bytes, expected {expected_len}",
            out.len()
        )));
    }
    let actual = Digest::of(&out);
    if actual != *expected_digest {
        return Err(CasError::DigestMismatch {
            expected: *expected_digest,
            actual,
        });
    }
    Ok(out)
}

/// The window size the first zstd frame declares, read from its header (RFC 8878,
/// section 3.1.1.1), or `None` for a single-segment frame (its window is its content
/// size, checked above) or input that is not a zstd frame (the decoder refuses it).
/// Checking it here turns a frame that asks for a large window into a size refusal
/// rather than a generic decoder error; later frames are still capped by the decoder.
fn first_frame_window(compressed: &[u8]) -> Option<u64> {
    const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    let (magic, rest) = compressed.split_first_chunk::<4>()?;
    if *magic != MAGIC {
        return None;
    }
    let (&descriptor, rest) = rest.split_first()?;
    let single_segment = descriptor & 0x20 != 0;
    if single_segment {
        return None;
    }
    let &window_descriptor = rest.first()?;
    let window_log = 10 + u64::from(window_descriptor >> 3);
    let window_base = 1u64 << window_log;
    Some(window_base + (window_base / 8) * u64::from(window_descriptor & 7))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_compressed_chunk_is_zstd_bound() {
        assert_eq!(
            MAX_COMPRESSED_CHUNK,
            zstd::zstd_safe::compress_bound(MAX_CHUNK)
        );
    }
}
