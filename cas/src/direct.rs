//! Writing a large file's bytes past the page cache (`O_DIRECT`), with a fallback to
//! ordinary writes wherever direct I/O is refused; and reading files whose bytes are
//! read once each past it too ([`ReadOnceFile`]).
//!
//! Why: on the machines we measure (a VM with a virtio disk), buffered writes fall from
//! ~2.4 GB/s to ~500 MB/s once about 1 GiB is dirty, and the kernel's copy into the page
//! cache was 55% of both cores while a 1 GiB artifact was extracted; direct writes of the
//! same gigabyte run at 1.3–1.7 GB/s (`dd oflag=direct`, three in a row). Only files of
//! at least [`DIRECT_WRITE_MIN`] are written this way: for small files the synchronous
//! device write per file costs more than the copy it saves.
//!
//! Direct writes must start at aligned offsets, from aligned memory, in aligned lengths:
//! bytes gather in an aligned buffer and go out [`BLOCK`] at a time; the unaligned tail
//! is written after `O_DIRECT` is switched off again. A filesystem that refuses direct
//! I/O (`EINVAL` from `fcntl` or from a write; tmpfs on older kernels) just gets
//! ordinary writes.

use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use rustix::fs::OFlags;

use crate::spare::SpareBuffers;

/// Files at least this large are written with `O_DIRECT`.
pub const DIRECT_WRITE_MIN: u64 = 8 * 1024 * 1024;
/// Bytes handed to the kernel per direct write.
const BLOCK: usize = 4 * 1024 * 1024;
/// Alignment of offsets, lengths and memory: 4 KiB covers every common logical block
/// size (512 and 4,096 bytes).
pub(crate) const ALIGN: usize = 4096;

/// Buffers of finished writers kept for the next ones (at most 4, 16 MiB): the
/// coordinator starts a writer per pack (every 32 MiB of an upload) and an agent one per
/// cache segment, so without reuse the buffers alone would be an eighth of the bytes
/// written, all of it fresh memory (see [`crate::spare`]).
static SPARE_BLOCKS: SpareBuffers = SpareBuffers::new(BLOCK + ALIGN, 4);

/// An aligned buffer of [`BLOCK`] bytes, `filled` of them in use. Its memory goes back
/// to [`SPARE_BLOCKS`] when it is dropped.
struct Block {
    storage: Vec<u8>,
    start: usize,
    filled: usize,
}

impl Block {
    fn new() -> Self {
        let storage = SPARE_BLOCKS.take();
        // A Vec's buffer never moves, so its aligned start is the same every time.
        let start = storage.as_ptr().align_offset(ALIGN);
        Self {
            storage,
            start,
            filled: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.filled]
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        SPARE_BLOCKS.give_back(std::mem::take(&mut self.storage));
    }
}

/// A file being written, directly while that works.
///
/// Two buffers take turns: one fills on the caller's thread while a writing thread
/// hands the other to the kernel, so the device write (~3 ms per 4 MiB block) overlaps
/// the caller's work on the next block (reading and checking chunks) instead of
/// following it; extracting a 1 GiB artifact left one core idle half the time before.
pub struct DirectWriter {
    current: Block,
    /// Full blocks to the writing thread (`None` once finishing).
    full: Option<mpsc::SyncSender<Block>>,
    /// Written blocks back from it, to fill again.
    empty: mpsc::Receiver<Block>,
    /// Gives the file back (and whether it is still in direct mode), or the first error.
    thread: Option<JoinHandle<io::Result<(File, bool)>>>,
    /// Zero blocks are skipped (see [`Self::sparse`]).
    sparse: bool,
    /// Bytes appended so far: the file's length once finished.
    appended: u64,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("buffered", &self.current.filled)
            .finish_non_exhaustive()
    }
}

impl DirectWriter {
    /// Takes over `file` (opened for writing, empty) and turns on `O_DIRECT` if its
    /// filesystem allows it.
    pub fn new(file: File) -> io::Result<Self> {
        Self::start(file, false)
    }

    /// [`Self::new`] for a file that may hold long runs of zeros (an extracted file):
    /// every aligned [`ALIGN`]-byte block of zeros is skipped, not written, so it stays
    /// a hole, and [`Self::finish`] sets the file's length to every byte appended.
    pub fn sparse(file: File) -> io::Result<Self> {
        Self::start(file, true)
    }

    fn start(file: File, sparse: bool) -> io::Result<Self> {
        let direct = set_direct(&file, true).is_ok();
        let (full, full_rx) = mpsc::sync_channel::<Block>(1);
        let (empty_tx, empty) = mpsc::sync_channel::<Block>(2);
        // The second buffer starts out empty, waiting to be filled.
        let _ = empty_tx.send(Block::new());
        let thread = std::thread::Builder::new()
            .name("gantry-direct-write".into())
            .spawn(move || {
                let mut file = file;
                let mut direct = direct;
                for mut block in full_rx {
                    if sparse {
                        write_skipping_zeros(&mut file, &mut direct, block.bytes())?;
                    } else {
                        write_all_direct(&mut file, &mut direct, block.bytes())?;
                    }
                    block.filled = 0;
                    // The caller may have finished and gone: nothing to hand back to.
                    let _ = empty_tx.send(block);
                }
                Ok((file, direct))
            })?;
        Ok(Self {
            current: Block::new(),
            full: Some(full),
            empty,
            thread: Some(thread),
            sparse,
            appended: 0,
        })
    }

    /// Appends `data`.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.appended += data.len() as u64;
        while !data.is_empty() {
            let block = &mut self.current;
            let n = (BLOCK - block.filled).min(data.len());
            let at = block.start + block.filled;
            block.storage[at..at + n].copy_from_slice(&data[..n]);
            block.filled += n;
            data = &data[n..];
            if block.filled == BLOCK {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Sends the current block to the writing thread and takes the other one back.
    fn hand_over(&mut self) -> io::Result<()> {
        let Ok(next) = self.empty.recv() else {
            return Err(self.stopped());
        };
        let full = std::mem::replace(&mut self.current, next);
        let sent = self.full.as_ref().map(|tx| tx.send(full));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stopped()),
        }
    }

    /// Tells the writing thread that no more blocks come and waits for it: the file
    /// (and whether it is still in direct mode), or the thread's first error.
    fn join(&mut self) -> io::Result<(File, bool)> {
        self.full = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the direct writing thread panicked")),
            None => Err(io::Error::other("the direct writing thread stopped")),
        }
    }

    /// The writing thread's error, once it has stopped early.
    fn stopped(&mut self) -> io::Error {
        self.join()
            .err()
            .unwrap_or_else(|| io::Error::other("the direct writing thread stopped"))
    }

    /// Writes what is left and returns the file, back in ordinary (buffered) mode.
    pub fn finish(mut self) -> io::Result<File> {
        // The aligned part goes out through the thread, the unaligned tail after it.
        let aligned = self.current.filled / ALIGN * ALIGN;
        let tail = self.current.bytes()[aligned..].to_vec();
        self.current.filled = aligned;
        if aligned > 0 {
            self.hand_over()?;
        }
        let (mut file, direct) = self.join()?;
        if direct {
            set_direct(&file, false)?;
        }
        file.write_all(&tail)?;
        if self.sparse {
            // Skipped zeros at the end are not in the file until its length says so.
            file.set_len(self.appended)?;
        }
        Ok(file)
    }
}

impl Drop for DirectWriter {
    /// An abandoned writer (an extraction that failed) still waits for its thread, so no
    /// write to the file happens after the caller has moved on.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// A file whose bytes are read once each (a pack the coordinator serves chunks from, a
/// cache segment an agent reads back): read past the page cache.
///
/// Why: on a VM whose host reclaims the pages its guest frees, a page the page cache
/// takes for a read is as dear as one it takes for a write: serving a just uploaded
/// gigabyte back cost the coordinator 3.7 core-seconds when its pages were kept, and
/// still ~2 when each chunk's pages were dropped after the read (61% of its CPU in the
/// kernel's copy out of those fresh pages).
///
/// Direct reads need aligned offsets, lengths and memory: each read covers the aligned
/// blocks around the bytes asked for, into memory of its own that the returned bytes
/// keep (the allocator reuses it once they are dropped). A filesystem that refuses
/// direct I/O gets ordinary reads, whose pages are dropped afterwards
/// (`POSIX_FADV_DONTNEED`).
#[derive(Debug)]
pub struct ReadOnceFile {
    file: File,
    direct: bool,
}

impl ReadOnceFile {
    /// Opens `path` for reading, directly where its filesystem allows it.
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlags::DIRECT.bits().cast_signed())
            .open(path);
        match direct {
            Ok(file) => Ok(Self { file, direct: true }),
            Err(e) if e.raw_os_error() == Some(einval()) => Ok(Self {
                file: File::open(path)?,
                direct: false,
            }),
            Err(e) => Err(e),
        }
    }

    /// The `len` bytes at `offset`; an error if the file ends before them. The bytes
    /// stay where the read put them: slices of the result share its buffer.
    pub fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if self.direct {
            match read_direct(&self.file, offset, len) {
                Err(e) if e.raw_os_error() == Some(einval()) => {}
                done => return done,
            }
        }
        read_and_drop(&self.file, offset, len).map(Bytes::from)
    }
}

/// Memory holding an aligned region (`start..start + len` of `storage`), given to
/// [`Bytes::from_owner`] so slices of it need no copy.
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }
}

impl AsRef<[u8]> for AlignedBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for AlignedBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn read_direct(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let align = ALIGN as u64;
    let start = offset / align * align;
    let end = (offset + len as u64).div_ceil(align) * align;
    let span = usize::try_from(end - start).map_err(io::Error::other)?;
    let skip = (offset - start) as usize;
    let mut buffer = AlignedBuffer::new(span);
    let aligned = buffer.as_mut();
    // The last block may be short where the file ends inside it. A read that stops
    // short anywhere else is continued from where it stopped; continued at an unaligned
    // offset, a direct read fails with EINVAL and the caller reads ordinarily, which
    // reports a file that ends too soon.
    let mut got = 0;
    while got < skip + len {
        match file.read_at(&mut aligned[got..], start + got as u64) {
            Ok(0) => return Err(io::Error::from(ErrorKind::UnexpectedEof)),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Bytes::from_owner(buffer).slice(skip..skip + len))
}

/// An ordinary read whose pages are dropped from the page cache afterwards (those it
/// shares with the bytes around it stay).
fn read_and_drop(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset)?;
    if let Some(len) = std::num::NonZeroU64::new(len as u64) {
        // Only advice: refused, it costs memory, never correctness.
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
    Ok(data)
}

/// [`write_all_direct`], seeking over each run of whole [`ALIGN`]-byte blocks of zeros
/// instead of writing it (the file's offset stays aligned: `bytes` starts aligned, and
/// every run skipped or written is a multiple of [`ALIGN`] but the last).
pub(crate) fn write_skipping_zeros(
    file: &mut File,
    direct: &mut bool,
    bytes: &[u8],
) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut at = 0;
    while at < bytes.len() {
        let zero = is_zero_block(&bytes[at..]);
        let mut end = at;
        while end < bytes.len() && is_zero_block(&bytes[end..]) == zero {
            end = (end + ALIGN).min(bytes.len());
        }
        if zero {
            let skip = i64::try_from(end - at).map_err(io::Error::other)?;
            file.seek(SeekFrom::Current(skip))?;
        } else {
            write_all_direct(file, direct, &bytes[at..end])?;
        }
        at = end;
    }
    Ok(())
}

/// Whether the [`ALIGN`] bytes at the start of `bytes` are a whole block of zeros (a
/// shorter rest never is: it is written, so the file's length stays right).
pub(crate) fn is_zero_block(bytes: &[u8]) -> bool {
    // 16 bytes at a time: a byte loop with an early exit is not vectorised, and every
    // byte extracted passes here.
    bytes.len() >= ALIGN
        && bytes[..ALIGN]
            .chunks_exact(16)
            .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Writes `bytes` (a multiple of [`ALIGN`] long while `direct`) at the file's offset.
fn write_all_direct(file: &mut File, direct: &mut bool, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match file.write(&bytes[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Direct I/O refused after all (or a short write left the offset
            // unaligned): the rest goes through the page cache.
            Err(e) if *direct && e.raw_os_error() == Some(einval()) => {
                set_direct(file, false)?;
                *direct = false;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(file, flags)?;
    Ok(())
}

fn einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around every boundary: under one alignment unit, exactly one block, a
    /// block and a ragged tail, several blocks.
    #[test]
    fn every_byte_arrives_in_order_whatever_the_sizes_and_filesystem() {
        let dirs: Vec<std::path::PathBuf> = [Some(std::env::temp_dir()), shm()]
            .into_iter()
            .flatten()
            .collect();
        for dir in dirs {
            let dir = tempfile::tempdir_in(&dir).expect("temp dir");
            for size in [0, 100, ALIGN, BLOCK, BLOCK + 1, 3 * BLOCK + 4097] {
                let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4093) as u8).collect();
                let path = dir.path().join(format!("f{size}"));
                let mut writer =
                    DirectWriter::new(File::create(&path).expect("create")).expect("writer");
                // Pieces of uneven sizes, as chunks come.
                for piece in data.chunks(65_537) {
                    writer.write(piece).expect("write");
                }
                drop(writer.finish().expect("finish"));
                let back = std::fs::read(&path).expect("read back");
                assert_eq!(back.len(), size, "{}", path.display());
                assert!(back == data, "{} differs", path.display());
            }
        }
    }

    /// A device that refuses the bytes (a full disk: `/dev/full` answers `ENOSPC`) is
    /// reported by `write` or `finish`, never lost with the writing thread or hung on.
    #[test]
    fn a_write_error_on_the_writing_thread_reaches_the_caller() {
        let full = std::path::Path::new("/dev/full");
        if !full.exists() {
            eprintln!("SKIPPED: no /dev/full on this machine");
            return;
        }
        let file = File::options()
            .write(true)
            .open(full)
            .expect("open /dev/full");
        let mut writer = DirectWriter::new(file).expect("writer");
        let block = vec![1u8; BLOCK];
        let mut failed = None;
        for _ in 0..4 {
            if let Err(e) = writer.write(&block) {
                failed = Some(e);
                break;
            }
        }
        let err = match failed {
            Some(e) => e,
            None => writer
                .finish()
                .expect_err("a full device must fail the write"),
        };
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error()),
            "{err}"
        );
    }

    /// Where the temporary directory's filesystem cannot refuse a direct write (tmpfs
    /// has no O_DIRECT; overlayfs, a container's `/tmp`, takes unaligned ones), the test
    /// below cannot provoke the refusal: it skips with one line, as the tests crate's
    /// tests do without their extras, unless `GANTRY_REQUIRE_ALL_TESTS=1` (CI) makes
    /// that a failure.
    fn cannot_refuse(dir: &std::path::Path, why: &str) {
        let line = format!(
            "a_direct_write_refused_with_einval_is_written_ordinarily needs its temporary \
             directory ({}) on ext4 or xfs (set TMPDIR to one there): {why}",
            dir.display()
        );
        assert!(
            std::env::var("GANTRY_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "{line}; GANTRY_REQUIRE_ALL_TESTS=1 makes that a failure"
        );
        eprintln!("skipping: {line}");
    }

    /// A direct write the kernel refuses with EINVAL (here: from memory and with a
    /// length that are not aligned, as a filesystem that takes the flag but not the
    /// I/O would refuse it) goes through the page cache instead, and every byte lands.
    #[test]
    fn a_direct_write_refused_with_einval_is_written_ordinarily() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("refused");
        let mut file = File::create(&path).expect("create");
        if let Err(e) = set_direct(&file, true) {
            cannot_refuse(dir.path(), &format!("no O_DIRECT there ({e})"));
            return;
        }
        let backing: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // One byte into a Vec (never 512-byte aligned there) and 4,001 bytes long.
        let bytes = &backing[1..4002];
        let mut direct = true;
        write_all_direct(&mut file, &mut direct, bytes).expect("written ordinarily");
        if direct {
            assert_eq!(std::fs::read(&path).expect("read back"), bytes);
            cannot_refuse(dir.path(), "it took an unaligned direct write");
            return;
        }
        assert!(!direct, "the refusal switched direct I/O off");
        let flags = rustix::fs::fcntl_getfl(&file).expect("flags");
        assert!(
            !flags.contains(OFlags::DIRECT),
            "O_DIRECT is off on the file"
        );
        drop(file);
        assert_eq!(std::fs::read(&path).expect("read back"), bytes);
    }

    /// Reads at every kind of offset and length (aligned or not, across block edges, up
    /// to the end of the file) return exactly those bytes, on a filesystem with direct
    /// I/O and on tmpfs; a read past the end fails instead of returning less.
    #[test]
    fn read_once_returns_exactly_the_bytes_asked_for_wherever_they_lie() {
        let dirs: Vec<std::path::PathBuf> = [Some(std::env::temp_dir()), shm()]
            .into_iter()
            .flatten()
            .collect();
        let size = 3 * ALIGN * 17 + 1234;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 + i / 511) as u8).collect();
        for dir in dirs {
            let dir = tempfile::tempdir_in(&dir).expect("temp dir");
            let path = dir.path().join("pack");
            std::fs::write(&path, &data).expect("write");
            let file = ReadOnceFile::open(&path).expect("open");
            for (offset, len) in [
                (0, 1),
                (0, ALIGN),
                (1, ALIGN),
                (ALIGN - 1, 2),
                (5000, 70_000),
                (size - 1234, 1234),
                (size - 1, 1),
                (0, size),
                (17, 0),
            ] {
                let got = file.read(offset as u64, len).expect("read");
                assert_eq!(got.len(), len, "{offset}+{len} in {}", dir.path().display());
                assert!(got[..] == data[offset..offset + len], "{offset}+{len}");
            }
            let past = file.read((size - 10) as u64, 11);
            assert_eq!(
                past.expect_err("past the end").kind(),
                ErrorKind::UnexpectedEof
            );
        }
    }

    fn shm() -> Option<std::path::PathBuf> {
        let shm = std::path::PathBuf::from("/dev/shm");
        shm.is_dir().then_some(shm)
    }
}
