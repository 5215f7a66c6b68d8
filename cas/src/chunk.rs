//! Content-defined chunking with FastCDC (the 2020 variant), streaming over a reader.
//!
//! Chunk boundaries depend only on content, so an insertion shifts only the chunks
//! around it and the rest deduplicate. This module reads; it never stores.

use std::io::Read;

use fastcdc::v2020::FastCDC;

use crate::{CasError, Digest};

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

/// Bytes read from the input at a time. The chunker cuts within this window and moves
/// only the unfinished tail (under [`MAX_CHUNK`]) to its front before reading more, so a
/// byte is copied once from the kernel and at most once more. fastcdc's own
/// `StreamCDC` holds a `MAX_CHUNK` window and shifts the rest of it after every chunk:
/// on a 1 GiB upload that was ~3 bytes moved per byte chunked, the largest cost of the
/// uploading agent's chunking thread (more than the cutting and hashing).
const READ_WINDOW: usize = 2 * 1024 * 1024;

/// The chunks of a reader, each with its digest; cut exactly where fastcdc's
/// `StreamCDC` cuts (the same `cut_gear`, always given `MAX_CHUNK` bytes of lookahead
/// or the rest of the input), so stored artifacts keep deduplicating. Holds
/// [`READ_WINDOW`] bytes; the whole input is never held in memory.
pub struct Chunks<R: Read> {
    reader: R,
    window: Vec<u8>,
    /// `window[start..end]` is read and not yet cut.
    start: usize,
    end: usize,
    eof: bool,
    /// A read failed: the error was returned once, nothing follows it.
    failed: bool,
}

/// Cuts `reader` into content-defined chunks. An empty reader yields no chunks.
pub fn chunk_reader<R: Read>(reader: R) -> Chunks<R> {
    Chunks {
        reader,
        window: Vec::new(),
        start: 0,
        end: 0,
        eof: false,
        failed: false,
    }
}

impl<R: Read> Chunks<R> {
    /// The next chunk, borrowed from the window until the next call: callers that keep
    /// it copy it (the [`Iterator`] does).
    pub fn next_chunk(&mut self) -> Option<Result<(Digest, &[u8]), CasError>> {
        if self.failed {
            return None;
        }
        if self.end - self.start < MAX_CHUNK && !self.eof {
            if let Err(source) = self.refill() {
                self.failed = true;
                return Some(Err(CasError::Io {
                    context: "reading data to chunk".to_owned(),
                    source,
                }));
            }
        }
        let pending = &self.window[self.start..self.end];
        if pending.is_empty() {
            return None;
        }
        let (_, len) = FastCDC::new(pending, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).cut(0, pending.len());
        // cut_gear never returns 0 for a non-empty input; take the rest if it ever did.
        let len = if len == 0 { pending.len() } else { len };
        let chunk = &self.window[self.start..self.start + len];
        self.start += len;
        Some(Ok((Digest::of(chunk), chunk)))
    }

    /// Moves the uncut tail to the front and reads until the window is full or the
    /// input ends.
    fn refill(&mut self) -> std::io::Result<()> {
        if self.window.is_empty() {
            self.window = vec![0; READ_WINDOW];
        }
        self.window.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < self.window.len() {
            match self.reader.read(&mut self.window[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = Result<(Digest, Vec<u8>), CasError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk()
            .map(|chunk| chunk.map(|(digest, data)| (digest, data.to_vec())))
    }
}
