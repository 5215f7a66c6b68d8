//! Content-defined chunking with FastCDC (the 2020 variant), streaming over a reader.
//!
//! Chunk boundaries depend only on content, so an insertion shifts only the chunks
//! around it and the rest deduplicate. This module reads; it never stores.

use std::io::Read;

use fastcdc::v2020::StreamCDC;

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

/// An iterator over the chunks of a reader, each with its digest. Reads at most
/// [`MAX_CHUNK`] bytes ahead; the whole input is never held in memory.
pub struct Chunks<R: Read> {
    inner: StreamCDC<R>,
}

/// Cuts `reader` into content-defined chunks. An empty reader yields no chunks.
pub fn chunk_reader<R: Read>(reader: R) -> Chunks<R> {
    Chunks {
        inner: StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK),
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = Result<(Digest, Vec<u8>), CasError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.next()?;
        Some(match item {
            Ok(chunk) => Ok((Digest::of(&chunk.data), chunk.data)),
            Err(err) => Err(CasError::Io {
                context: "reading data to chunk".to_owned(),
                source: err.into(),
            }),
        })
    }
}
