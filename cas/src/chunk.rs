//! Content-defined chunking with FastCDC (the 2020 variant), streaming over a reader.
//!
//! Chunk boundaries depend only on content, so an insertion shifts only the chunks
//! around it and the rest deduplicate. This module reads; it never stores.

use std::io::Read;

use std::sync::LazyLock;

use crate::cut::GearCutter;
use crate::spare::SpareBuffers;
use crate::{Bytes, CasError, Digest};

/// Smallest chunk FastCDC cuts (except the last chunk of a file).
///
/// When to change: raise it if per-chunk overhead (one index row, one request) dominates
/// for trees of small files; lower it to deduplicate finer-grained edits. Changing any of
/// these three constants changes every chunk boundary, so every existing artifact stops
/// deduplicating against new uploads once; ids stay valid because they hash content.
pub const MIN_CHUNK: usize = 16 * 1024;

/// Target average chunk size. When to change: see [`MIN_CHUNK`]; the issue's "a 1%
/// change re-sends under 3%" target is comfortable at 64 KiB for a 1 GiB artifact.
pub const AVG_CHUNK: usize = 64 * 1024;

/// Largest chunk FastCDC cuts, and the hard bound on any chunk's uncompressed size that
/// [`crate::decompress`] and [`crate::Manifest::decode`] enforce. When to change: see
/// [`MIN_CHUNK`]; raising it raises the memory a single chunk may take on decode.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Bytes read from the input at a time. The chunker cuts within this window; before
/// reading more it moves only the unfinished tail (under [`MAX_CHUNK`]) to the front of
/// the next window, so a byte is copied once from the kernel and at most once more.
/// fastcdc's own `StreamCDC` holds a `MAX_CHUNK` window and shifts the rest of it after
/// every chunk: on a 1 GiB upload that was ~3 bytes moved per byte chunked, the largest
/// cost of the uploading agent's chunking thread (more than the cutting and hashing).
const READ_WINDOW: usize = 2 * 1024 * 1024;

/// Windows kept for reuse once no chunk cut from them is alive (at most 16): a fresh
/// window is 512 fresh pages (see [`crate::spare`]). Chunks in flight keep their
/// windows; an upload's pipeline holds a few dozen MiB.
static SPARE_WINDOWS: SpareBuffers = SpareBuffers::new(READ_WINDOW, 16);

/// One window's bytes, shared by the chunks cut from it ([`Bytes::from_owner`]); goes
/// back to [`SPARE_WINDOWS`] when the last of them is dropped.
struct Window {
    buffer: Vec<u8>,
    filled: usize,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.buffer[..self.filled]
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        SPARE_WINDOWS.give_back(std::mem::take(&mut self.buffer));
    }
}

/// The cutter for [`MIN_CHUNK`], [`AVG_CHUNK`] and [`MAX_CHUNK`] (its gear table is
/// 2 KiB: built once).
static CUTTER: LazyLock<GearCutter> =
    LazyLock::new(|| GearCutter::new(MIN_CHUNK, AVG_CHUNK, MAX_CHUNK));

/// Length of the chunk that starts at `source[0]`, given all the bytes that follow it
/// up to [`MAX_CHUNK`] (fewer only at the end of the input): where fastcdc's v2020
/// chunker would cut, found ~1.2x as fast by hashing four stretches at once (`cut.rs`).
pub fn next_cut(source: &[u8]) -> usize {
    CUTTER.cut(source)
}

/// The chunks of a reader, each with its digest; cut exactly where fastcdc's
/// `StreamCDC` cuts (the same cut points, always given `MAX_CHUNK` bytes of lookahead
/// or the rest of the input), so stored artifacts keep deduplicating. Holds
/// [`READ_WINDOW`] bytes at a time, plus the windows that chunks still alive were cut
/// from; the whole input is never held in memory.
pub struct Chunks<R: Read> {
    reader: R,
    /// The bytes read; `window[start..]` is not yet cut.
    window: Bytes,
    start: usize,
    eof: bool,
    /// A read failed: the error was returned once, nothing follows it.
    failed: bool,
}

/// Cuts `reader` into content-defined chunks. An empty reader yields no chunks.
pub fn chunk_reader<R: Read>(reader: R) -> Chunks<R> {
    Chunks {
        reader,
        window: Bytes::new(),
        start: 0,
        eof: false,
        failed: false,
    }
}

impl<R: Read> Chunks<R> {
    /// The next chunk: a slice of the window it was cut from, shared, not copied.
    pub fn next_chunk(&mut self) -> Option<Result<(Digest, Bytes), CasError>> {
        if self.failed {
            return None;
        }
        if self.window.len() - self.start < MAX_CHUNK && !self.eof {
            if let Err(source) = self.refill() {
                self.failed = true;
                return Some(Err(CasError::Io {
                    context: "reading data to chunk".to_owned(),
                    source,
                }));
            }
        }
        let pending = &self.window[self.start..];
        if pending.is_empty() {
            return None;
        }
        let len = next_cut(pending);
        // A cut is never 0 for a non-empty input; take the rest if it ever were.
        let len = if len == 0 { pending.len() } else { len };
        let chunk = self.window.slice(self.start..self.start + len);
        self.start += len;
        Some(Ok((Digest::of(&chunk), chunk)))
    }

    /// Starts a new window with the uncut tail of the last one and reads until it is
    /// full or the input ends.
    fn refill(&mut self) -> std::io::Result<()> {
        let mut buffer = SPARE_WINDOWS.take();
        let tail = &self.window[self.start..];
        buffer[..tail.len()].copy_from_slice(tail);
        let mut filled = tail.len();
        let read = loop {
            if filled == buffer.len() {
                break Ok(());
            }
            match self.reader.read(&mut buffer[filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break Ok(());
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.window = Bytes::from_owner(Window { buffer, filled });
        self.start = 0;
        read
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = Result<(Digest, Vec<u8>), CasError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk()
            .map(|chunk| chunk.map(|(digest, data)| (digest, data.to_vec())))
    }
}
