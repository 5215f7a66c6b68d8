//! Per-chunk zstd compression, and a decompressor whose memory is bounded whatever the
//! input: a chunk never decodes to more than [`MAX_CHUNK`] bytes, and its digest is
//! checked before the bytes are handed back.

use std::cell::RefCell;

use bytes::Bytes;
use gantry_protocol::pieces::{copy_from_pieces, join_pieces, pieces_in};
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
    static SAMPLER: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// zstd's frame magic number, little-endian on the wire (RFC 8878, section 3.1.1).
const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The largest block a zstd frame may hold (RFC 8878, `Block_Maximum_Size`).
const MAX_BLOCK: usize = 128 * 1024;

/// Bytes sampled from the middle of a chunk to decide whether compressing it pays.
const SAMPLE_BYTES: usize = 8 * 1024;

/// zstd level for the sample: -1, zstd's fastest regular mode, tests 8 KiB in 2.5 µs
/// where level 3 took 6.7 µs (measured on this machine), a third of the cost of hashing
/// an average chunk. It still squeezes text to ~58% (level 3: 44%), far under
/// [`WORTH_COMPRESSING`]; data whose redundancy only level 3 finds is stored raw.
const SAMPLE_LEVEL: i32 = -1;

/// A sample that shrinks by less than this (compressed/original) marks its chunk as
/// incompressible. When to change: lower it to store more chunks raw (cheaper uploads,
/// larger stores); the artifact benchmark's random data compresses to ~100.03%.
const WORTH_COMPRESSING: f64 = 0.97;

/// Compresses one chunk, or, when a sample of it does not compress (random data,
/// archives, images: zstd level 3 on them was a fifth of an uploading agent's CPU for
/// nothing), stores it in a zstd frame of raw blocks ([`RawFrameLayout`]). Either way the
/// result is one zstd frame that [`decompress`] (or any zstd decoder) reads back.
pub fn compress(chunk: &[u8]) -> Vec<u8> {
    if worth_compressing(chunk) {
        zstd_frame(chunk)
    } else {
        RawFrameLayout::of(chunk.len()).assemble(chunk)
    }
}

/// Whether compressing `chunk` pays: a sample of [`SAMPLE_BYTES`] from its middle must
/// shrink below [`WORTH_COMPRESSING`]. Chunks of at most twice the sample are always
/// compressed. A chunk whose only redundancy lies further apart than the sample is
/// stored raw, which costs space, never correctness.
pub fn worth_compressing(chunk: &[u8]) -> bool {
    if chunk.len() <= 2 * SAMPLE_BYTES {
        return true;
    }
    let start = (chunk.len() - SAMPLE_BYTES) / 2;
    let sample = &chunk[start..start + SAMPLE_BYTES];
    let squeezed = compress_with(&SAMPLER, SAMPLE_LEVEL, sample).len();
    (squeezed as f64) < sample.len() as f64 * WORTH_COMPRESSING
}

/// A zstd frame of raw blocks for a chunk of some length, as (header bytes, the range
/// of the chunk that follows them) in order: a single-segment frame header with a
/// 4-byte content size (so the window is the content size, within [`WINDOW_LOG_MAX`])
/// and the first block's header, then each further block's 3-byte header (RFC 8878,
/// sections 3.1.1.1 and 3.1.1.2). Blocks are at most [`MAX_BLOCK`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrameLayout {
    parts: Vec<(Vec<u8>, std::ops::Range<usize>)>,
}

impl RawFrameLayout {
    /// The layout for a chunk of `len` bytes (at most [`MAX_CHUNK`]: the content size
    /// field is 32 bits).
    pub fn of(len: usize) -> Self {
        let content_size = u32::try_from(len).unwrap_or(u32::MAX);
        let mut first = Vec::with_capacity(MAGIC.len() + 5 + 3);
        first.extend_from_slice(&MAGIC);
        // Frame header descriptor: content size field of 4 bytes (flag 2), single
        // segment, no checksum, no dictionary.
        first.push(0b1010_0000);
        first.extend_from_slice(&content_size.to_le_bytes());
        if len == 0 {
            // One empty raw block, marked last.
            first.extend_from_slice(&[1, 0, 0]);
            return Self {
                parts: vec![(first, 0..0)],
            };
        }
        let blocks = len.div_ceil(MAX_BLOCK);
        let mut parts = Vec::with_capacity(blocks);
        let mut header = first;
        for index in 0..blocks {
            let start = index * MAX_BLOCK;
            let end = (start + MAX_BLOCK).min(len);
            let last = u32::from(index + 1 == blocks);
            // Bit 0: last block; bits 1-2: type (0 = raw); bits 3-23: size (at most
            // 128 KiB).
            let block = last | (((end - start) as u32) << 3);
            header.extend_from_slice(&block.to_le_bytes()[..3]);
            parts.push((std::mem::take(&mut header), start..end));
        }
        Self { parts }
    }

    /// Each piece of header and the range of the chunk that follows it.
    pub fn parts(&self) -> &[(Vec<u8>, std::ops::Range<usize>)] {
        &self.parts
    }

    /// The frame's length.
    pub fn frame_len(&self) -> usize {
        self.parts.iter().map(|(h, r)| h.len() + r.len()).sum()
    }

    /// The frame itself, for `chunk` (of the length the layout was made for). Costs
    /// one copy.
    pub fn assemble(&self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.frame_len());
        for (header, range) in &self.parts {
            out.extend_from_slice(header);
            out.extend_from_slice(&chunk[range.clone()]);
        }
        out
    }
}

/// `chunk` as a zstd frame of raw blocks (see [`RawFrameLayout`]). Costs one copy.
#[cfg(test)]
fn raw_frame(chunk: &[u8]) -> Vec<u8> {
    RawFrameLayout::of(chunk.len()).assemble(chunk)
}

/// `chunk` compressed into one zstd frame at [`COMPRESSION_LEVEL`], whatever its
/// content (see [`compress`] for the choice).
pub fn zstd_frame(chunk: &[u8]) -> Vec<u8> {
    compress_with(&COMPRESSOR, COMPRESSION_LEVEL, chunk)
}

/// Compresses `chunk` at `level` with this thread's context in `slot`.
fn compress_with(
    slot: &'static std::thread::LocalKey<RefCell<Option<Compressor<'static>>>>,
    level: i32,
    chunk: &[u8],
) -> Vec<u8> {
    // Compressing an in-memory slice into a buffer of zstd's bound only fails if zstd
    // cannot allocate its context, which is an out-of-memory condition rather than an
    // input error.
    slot.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor =
            slot.get_or_insert_with(|| Compressor::new(level).expect("a zstd compression context"));
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
    check_bounds(compressed.len(), expected_len)?;
    decode_checked(compressed, expected_len, expected_digest)
}

/// The size limits every chunk meets before any decoding: a declared size of at most
/// [`MAX_CHUNK`], compressed bytes of at most [`MAX_COMPRESSED_CHUNK`].
fn check_bounds(compressed_len: usize, expected_len: usize) -> Result<(), CasError> {
    if expected_len > MAX_CHUNK {
        return Err(CasError::TooLarge {
            what: "declared chunk size",
            size: expected_len as u64,
            limit: MAX_CHUNK as u64,
        });
    }
    if compressed_len > MAX_COMPRESSED_CHUNK {
        return Err(CasError::TooLarge {
            what: "compressed chunk",
            size: compressed_len as u64,
            limit: MAX_COMPRESSED_CHUNK as u64,
        });
    }
    Ok(())
}

/// Decodes a chunk (bounds already checked) with the capped decoder and checks its
/// length and digest.
fn decode_checked(
    compressed: &[u8],
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<Vec<u8>, CasError> {
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
    check_digest(Digest::of(&out), expected_digest)?;
    Ok(out)
}

/// Refuses bytes that hashed to `actual` when `expected` was asked for.
fn check_digest(actual: Digest, expected: &Digest) -> Result<(), CasError> {
    if actual != *expected {
        return Err(CasError::DigestMismatch {
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

/// A chunk's bytes, checked against the size and digest it was asked for: what
/// extraction writes. Made only by [`open_chunk`] (and by [`crate::extract_with`] for
/// the bytes its callback returns), so holding one means the check was done.
///
/// A chunk stored raw (a zstd frame of raw blocks, see [`compress`]) stays in its frame:
/// its blocks are hashed and written where they lie, which saves a copy of every byte
/// of an incompressible artifact on the way to its file.
#[derive(Debug)]
pub struct VerifiedChunk {
    digest: Digest,
    /// Shared, so a chunk already in memory (a download's cache keeps the chunks it
    /// just received) is checked and written where it lies.
    bytes: Bytes,
    /// Where the chunk's bytes lie in `bytes`, in order: all of it for a decoded chunk,
    /// each block of a raw frame (at most two: [`MAX_CHUNK`] is two [`MAX_BLOCK`]s).
    pieces: Vec<std::ops::Range<usize>>,
}

impl VerifiedChunk {
    /// Bytes already checked by the caller against `digest` (size and hash).
    pub(crate) fn checked(digest: Digest, bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let pieces = std::iter::once(0..bytes.len()).collect();
        Self {
            digest,
            bytes,
            pieces,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The chunk's uncompressed length.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(ExactSizeIterator::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk's bytes, in pieces that join to the whole.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|r| &self.bytes[r.clone()])
    }

    /// The chunk's bytes in one buffer (a copy only for a raw frame).
    pub fn into_bytes(self) -> Vec<u8> {
        match self.pieces.as_slice() {
            [only] if only.start == 0 && only.end == self.bytes.len() => self.bytes.into(),
            _ => self.pieces().flatten().copied().collect(),
        }
    }
}

/// Checks one compressed chunk like [`decompress`] and keeps it for writing out: a raw
/// frame is hashed in place and kept as it is, anything else is decoded (bounded) first.
/// The same inputs are refused with the same errors as by [`decompress`].
pub fn open_chunk(
    compressed: Bytes,
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<VerifiedChunk, CasError> {
    check_bounds(compressed.len(), expected_len)?;
    if let Some(pieces) = checked_raw_blocks(&compressed, expected_len, expected_digest)? {
        return Ok(VerifiedChunk {
            digest: *expected_digest,
            bytes: compressed,
            pieces,
        });
    }
    let bytes = decode_checked(&compressed, expected_len, expected_digest)?;
    Ok(VerifiedChunk::checked(*expected_digest, bytes))
}

/// Checks a chunk's uncompressed bytes (read back from where a download wrote them, see
/// the agent's chunk cache) against the size and digest asked for, and keeps them for
/// writing out. Mismatches are refused with the same errors as by [`decompress`].
pub fn open_raw_chunk(
    bytes: Bytes,
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<VerifiedChunk, CasError> {
    check_raw_chunk(&bytes, expected_len, expected_digest)?;
    Ok(VerifiedChunk::checked(*expected_digest, bytes))
}

/// [`open_raw_chunk`]'s check without keeping the bytes.
pub fn check_raw_chunk(
    bytes: &[u8],
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<(), CasError> {
    check_bounds(0, expected_len)?;
    if bytes.len() != expected_len {
        return Err(CasError::CorruptChunk {
            digest: *expected_digest,
            reason: format!("{} bytes, expected {expected_len}", bytes.len()),
        });
    }
    check_digest(Digest::of(bytes), expected_digest)
}

/// Checks one compressed chunk like [`decompress`] without keeping its bytes (the
/// coordinator, before storing or serving one): a raw frame costs a hash and no copy.
pub fn verify_chunk(
    compressed: &[u8],
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<(), CasError> {
    check_bounds(compressed.len(), expected_len)?;
    if checked_raw_blocks(compressed, expected_len, expected_digest)?.is_some() {
        return Ok(());
    }
    decode_checked(compressed, expected_len, expected_digest).map(drop)
}

/// For a raw frame ([`raw_blocks`]): its block ranges once they hash to
/// `expected_digest`, or the mismatch. `None` for any other frame, which the caller
/// decodes.
fn checked_raw_blocks(
    frame: &[u8],
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<Option<Vec<std::ops::Range<usize>>>, CasError> {
    let Some(pieces) = raw_blocks(frame, expected_len) else {
        return Ok(None);
    };
    let actual = Digest::of_pieces(pieces.iter().map(|r| &frame[r.clone()]));
    check_digest(actual, expected_digest)?;
    Ok(Some(pieces))
}

/// The block ranges of `frame` if it is laid out exactly as [`RawFrameLayout`] makes one for
/// `expected_len` bytes: the single-segment header with a 4-byte content size equal to
/// `expected_len`, then raw blocks only, the last one marked, summing to that size, and
/// nothing after. Such a frame decodes (by any zstd decoder) to its blocks joined, so
/// hashing them in place checks it; any other frame returns `None` and goes through the
/// decoder.
fn raw_blocks(frame: &[u8], expected_len: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let read = |at: usize, out: &mut [u8]| match frame.get(at..at + out.len()) {
        Some(bytes) => {
            out.copy_from_slice(bytes);
            true
        }
        None => false,
    };
    raw_block_ranges(frame.len(), read, expected_len)
}

/// [`raw_blocks`] for a frame of `len` bytes read through `read(offset, out)`, which
/// fills `out` from `offset` or returns false past the end: only headers (9 bytes, then
/// 3 per block) are read.
fn raw_block_ranges(
    len: usize,
    read: impl Fn(usize, &mut [u8]) -> bool,
    expected_len: usize,
) -> Option<Vec<std::ops::Range<usize>>> {
    let mut head = [0u8; 9];
    if !read(0, &mut head) || head[..4] != MAGIC {
        return None;
    }
    let descriptor = head[4];
    let content_size = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
    if descriptor != 0b1010_0000 || content_size as usize != expected_len {
        return None;
    }
    let mut at = MAGIC.len() + 5;
    let mut total = 0usize;
    let mut pieces = Vec::with_capacity(expected_len.div_ceil(MAX_BLOCK).max(1));
    loop {
        let mut header = [0u8; 3];
        if !read(at, &mut header) {
            return None;
        }
        let header = u32::from(header[0]) | u32::from(header[1]) << 8 | u32::from(header[2]) << 16;
        let (last, kind, size) = (header & 1 == 1, (header >> 1) & 3, (header >> 3) as usize);
        if kind != 0 || size > MAX_BLOCK {
            return None;
        }
        let start = at + 3;
        let end = start.checked_add(size)?;
        if end > len {
            return None;
        }
        pieces.push(start..end);
        total += size;
        at = end;
        if last {
            break;
        }
    }
    (at == len && total == expected_len).then_some(pieces)
}

/// [`verify_chunk`] for compressed bytes that arrived in pieces (the chunk is their
/// concatenation), as a receiver that does not join them has them: a raw frame is
/// hashed where its blocks lie, across the pieces, and anything else is joined into one
/// buffer and checked by [`verify_chunk`]. Accepts and refuses exactly what
/// `verify_chunk` does for the joined bytes.
pub fn verify_chunk_pieces(
    pieces: &[Bytes],
    expected_len: usize,
    expected_digest: &Digest,
) -> Result<(), CasError> {
    if let [only] = pieces {
        return verify_chunk(only, expected_len, expected_digest);
    }
    let len = pieces.iter().map(Bytes::len).sum();
    check_bounds(len, expected_len)?;
    if let Some(blocks) = raw_blocks_in_pieces(pieces, len, expected_len) {
        let actual = Digest::of_pieces(
            blocks
                .into_iter()
                .flat_map(|block| pieces_in(pieces, block).map(|(piece, within)| &piece[within])),
        );
        return check_digest(actual, expected_digest);
    }
    verify_chunk(&join_pieces(pieces), expected_len, expected_digest)
}

/// [`raw_blocks`] of the `len` bytes of `pieces` joined, reading across them.
fn raw_blocks_in_pieces(
    pieces: &[Bytes],
    len: usize,
    expected_len: usize,
) -> Option<Vec<std::ops::Range<usize>>> {
    let read = |at: usize, out: &mut [u8]| copy_from_pieces(pieces, at, out);
    raw_block_ranges(len, read, expected_len)
}

/// The window size the first zstd frame declares, read from its header (RFC 8878,
/// section 3.1.1.1), or `None` for a single-segment frame (its window is its content
/// size, checked above) or input that is not a zstd frame (the decoder refuses it).
/// Checking it here turns a frame that asks for a large window into a size refusal
/// rather than a generic decoder error; later frames are still capped by the decoder.
fn first_frame_window(compressed: &[u8]) -> Option<u64> {
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

    /// Bytes no compressor can shrink (an xorshift generator).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn raw_frames_of_every_block_layout_decode_to_their_bytes() {
        // Empty, one byte, on and around the 128 KiB block boundary, the largest chunk.
        for len in [0, 1, MAX_BLOCK - 1, MAX_BLOCK, MAX_BLOCK + 1, MAX_CHUNK] {
            let data = noise(len, len as u64 + 7);
            let frame = raw_frame(&data);
            assert_eq!(
                frame.len(),
                data.len() + 9 + 3 * len.div_ceil(MAX_BLOCK).max(1),
                "{len}: header, then 3 bytes per block"
            );
            // zstd itself reads the frame, and so does the bounded decoder.
            let by_zstd = zstd::bulk::decompress(&frame, len.max(1)).expect("zstd decodes it");
            assert_eq!(by_zstd, data, "{len}");
            if len > 0 {
                let ours = decompress(&frame, len, &Digest::of(&data)).expect("decodes");
                assert_eq!(ours, data, "{len}");
            }
        }
    }

    #[test]
    fn a_raw_layout_sent_as_headers_and_slices_is_a_frame_zstd_reads() {
        let random = noise(MAX_BLOCK + 5, 3);
        assert!(!worth_compressing(&random), "random data is stored raw");
        let layout = RawFrameLayout::of(random.len());
        assert_eq!(layout.parts().len(), 2, "two blocks");
        assert_eq!(layout.frame_len(), random.len() + 9 + 3 + 3);
        let mut sent = Vec::new();
        for (header, range) in layout.parts() {
            sent.extend_from_slice(header);
            sent.extend_from_slice(&random[range.clone()]);
        }
        assert_eq!(
            zstd::bulk::decompress(&sent, random.len()).expect("zstd reads it"),
            random
        );
        let zeros = vec![0u8; 64 * 1024];
        assert!(worth_compressing(&zeros), "zeros compress");
        let frame = zstd_frame(&zeros);
        assert!(frame.len() < 1024, "{}", frame.len());
    }

    #[test]
    fn incompressible_chunks_are_stored_raw_and_compressible_ones_compressed() {
        let random = noise(64 * 1024, 1);
        let stored = compress(&random);
        assert_eq!(
            stored,
            raw_frame(&random),
            "random data is stored as raw blocks"
        );
        assert_eq!(
            decompress(&stored, random.len(), &Digest::of(&random)).expect("random data decodes"),
            random
        );
        let text: Vec<u8> = b"gantry stores artifacts in chunks; "
            .iter()
            .copied()
            .cycle()
            .take(64 * 1024)
            .collect();
        let stored = compress(&text);
        assert!(stored.len() < text.len() / 10, "{} bytes", stored.len());
        assert_eq!(
            decompress(&stored, text.len(), &Digest::of(&text)).expect("text decodes"),
            text
        );
        // A raw frame still refuses a wrong declared size, like any frame.
        let frame = raw_frame(&random);
        assert!(matches!(
            decompress(&frame, random.len() - 1, &Digest::of(&random)),
            Err(CasError::TooLarge { .. })
        ));
    }

    /// The in-place check of raw frames must accept exactly what the decoder accepts,
    /// with the same bytes, and refuse the rest with the same kind of error: every
    /// header byte of a two-block raw frame is damaged in turn, the frame is cut short
    /// and lengthened, and compressed and empty chunks go the decoder's way.
    #[test]
    fn open_and_verify_agree_with_decompress_on_damaged_raw_frames() {
        let data = noise(MAX_BLOCK + 5000, 3);
        let digest = Digest::of(&data);
        let frame = raw_frame(&data);
        let mut cases: Vec<(String, Vec<u8>, usize)> = vec![
            ("intact".into(), frame.clone(), data.len()),
            (
                "one byte short".into(),
                frame[..frame.len() - 1].to_vec(),
                data.len(),
            ),
            (
                "a byte too many".into(),
                [&frame[..], &[0]].concat(),
                data.len(),
            ),
            ("declared one less".into(), frame.clone(), data.len() - 1),
            ("declared one more".into(), frame.clone(), data.len() + 1),
        ];
        let second_header = MAGIC.len() + 5 + 3 + MAX_BLOCK;
        for at in (0..MAGIC.len() + 5 + 3).chain(second_header..second_header + 3) {
            for flip in [0x01, 0x02, 0x04, 0x08, 0x80] {
                let mut bad = frame.clone();
                bad[at] ^= flip;
                cases.push((format!("byte {at} ^ {flip:#x}"), bad, data.len()));
            }
        }
        let mut payload = frame.clone();
        payload[MAGIC.len() + 5 + 3 + 10] ^= 1;
        cases.push(("a payload byte".into(), payload, data.len()));
        let text = vec![b'g'; 70_000];
        cases.push(("compressed".into(), compress(&text), text.len()));
        cases.push(("empty".into(), raw_frame(&[]), 0));

        for (what, bytes, len) in cases {
            let digest = if what == "compressed" {
                Digest::of(&text)
            } else if what == "empty" {
                Digest::of(&[])
            } else {
                digest
            };
            let decoded = decompress(&bytes, len, &digest);
            let opened = open_chunk(bytes.clone().into(), len, &digest);
            let verified = verify_chunk(&bytes, len, &digest);
            match (&decoded, opened) {
                (Ok(want), Ok(got)) => {
                    assert_eq!(got.len(), want.len(), "{what}");
                    assert_eq!(got.digest(), &digest, "{what}");
                    assert_eq!(&got.into_bytes(), want, "{what}");
                    assert!(verified.is_ok(), "{what}");
                }
                (Err(want), Err(got)) => {
                    let kind = |e: &CasError| std::mem::discriminant(e);
                    assert_eq!(kind(&got), kind(want), "{what}: {got} vs {want}");
                    let verified = verified.expect_err(&what);
                    assert_eq!(kind(&verified), kind(want), "{what}");
                }
                (want, got) => panic!("{what}: decompress {want:?}, open_chunk {got:?}"),
            }
            // In pieces, cut anywhere (in the headers, in a block, across the second
            // block's header, in three), the verdict is the same.
            let kind = |r: &Result<(), CasError>| r.as_ref().err().map(std::mem::discriminant);
            let mut splits: Vec<Vec<usize>> = (0..16).map(|c| vec![c]).collect();
            splits.extend((second_header.saturating_sub(2)..second_header + 5).map(|c| vec![c]));
            splits.push(vec![7, bytes.len() / 2, bytes.len().saturating_sub(1)]);
            for cuts in splits {
                let mut pieces = Vec::new();
                let mut at = 0;
                for cut in cuts
                    .into_iter()
                    .map(|c| c.min(bytes.len()))
                    .chain([bytes.len()])
                {
                    let cut = cut.max(at);
                    pieces.push(Bytes::copy_from_slice(&bytes[at..cut]));
                    at = cut;
                }
                assert_eq!(
                    raw_blocks_in_pieces(&pieces, bytes.len(), len),
                    raw_blocks(&bytes, len),
                    "{what}: the raw layout read across {} pieces",
                    pieces.len()
                );
                let in_pieces = verify_chunk_pieces(&pieces, len, &digest);
                let whole = verify_chunk(&bytes, len, &digest);
                assert_eq!(
                    kind(&in_pieces),
                    kind(&whole),
                    "{what}, {} pieces",
                    pieces.len()
                );
            }
        }
    }

    #[test]
    fn a_raw_chunk_is_kept_in_its_frame_and_joins_to_its_bytes() {
        let data = noise(MAX_CHUNK, 9);
        let chunk =
            open_chunk(raw_frame(&data).into(), data.len(), &Digest::of(&data)).expect("opens");
        let pieces: Vec<&[u8]> = chunk.pieces().collect();
        assert_eq!(pieces.len(), 2, "two 128 KiB blocks, read where they lie");
        assert_eq!(pieces.concat(), data);
    }

    #[test]
    fn max_compressed_chunk_is_zstd_bound() {
        assert_eq!(
            MAX_COMPRESSED_CHUNK,
            zstd::zstd_safe::compress_bound(MAX_CHUNK)
        );
    }
}
