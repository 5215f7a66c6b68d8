//! Content-addressed artifacts: the pure core of Gantry's chunk store.
//!
//! This crate owns the formats and the rules: how a digest is written
//! ([`Digest`], `blake3:<hex>` of the *uncompressed* bytes), where files are cut into
//! chunks ([`chunk_reader`], FastCDC 2020), how a chunk is compressed and bounded on the
//! way back ([`compress`], [`decompress`]), what a tree looks like ([`Manifest`]), how a
//! manifest is built from a directory ([`build_manifest`]) and how it is written back
//! without ever leaving the destination ([`extract`]).
//!
//! It must not do networking, keep an index (redb lives in the coordinator) or decide
//! where chunks are stored: callers hand chunks out through callbacks and fetch them
//! back through callbacks. The filesystem is touched only by [`build_manifest`],
//! [`build_manifest_for`], [`extract`], [`DirectWriter`] and [`ReadOnceFile`] (files
//! written or read past the page cache: the extraction's large files, the coordinator's
//! packs and the agents' cache segments).
//!
//! Architecture Invariant: everything a peer sends (a manifest's bytes, a compressed
//! chunk) is bounded and verified here before anything is allocated for it or written
//! from it.

mod build;
mod chunk;
mod compress;
mod cut;
mod direct;
mod error;
mod extract;
mod manifest;
mod spare;

pub use build::{build_manifest, build_manifest_for};
/// Shared byte buffers, as [`open_chunk`] takes them.
pub use bytes::Bytes;
pub use chunk::{chunk_reader, next_cut, Chunks, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
pub use compress::{
    check_raw_chunk, compress, decompress, open_chunk, open_raw_chunk, verify_chunk,
    verify_chunk_pieces, worth_compressing, zstd_frame, RawFrameLayout, VerifiedChunk,
    COMPRESSION_LEVEL, MAX_COMPRESSED_CHUNK,
};
pub use direct::{DirectWriter, ReadOnceFile, DIRECT_WRITE_MIN};
pub use error::{CasError, PathProblem, SymlinkProblem};
pub use extract::{
    check_free_space, extract, extract_verified, extract_verified_noting,
    extract_verified_parallel, extract_with, space_needed, Existing, PARALLEL_MIN_FILES,
};
pub use gantry_protocol::{Digest, DigestParseError, DIGEST_PREFIX};
pub use manifest::{
    check_symlink_target, ChunkRef, Entry, EntryKind, Manifest, MANIFEST_VERSION,
    MAX_COMPONENT_BYTES, MAX_ENTRIES, MAX_MANIFEST_BYTES, MAX_PATH_BYTES, MAX_TOTAL_SIZE,
};
