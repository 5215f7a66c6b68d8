//! Writing a large file's bytes past the page cache (`O_DIRECT`), with a fallback to
//! ordinary writes wherever direct I/O is refused; and reading bytes read only once
//! without keeping them in the page cache ([`read_once`]).
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
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

use rustix::fs::OFlags;

/// Files at least this large are written with `O_DIRECT`.
pub const DIRECT_WRITE_MIN: u64 = 8 * 1024 * 1024;
/// Bytes handed to the kernel per direct write.
const BLOCK: usize = 4 * 1024 * 1024;
/// Alignment of offsets, lengths and memory: 4 KiB covers every common logical block
/// size (512 and 4,096 bytes).
const ALIGN: usize = 4096;

/// Buffers of finished writers kept for the next ones (at most this many, 16 MiB).
///
/// Why: fresh memory is not free. A new buffer is zeroed, and on a VM whose host takes
/// back the pages its guest frees (free page reporting, as on the machines we measure)
/// every first touch of a page is a fault in the host: ~9 µs per 4 KiB page, ~2.3 s
/// per GiB. The coordinator starts a writer per pack (every 32 MiB of an upload) and
/// an agent one per cache segment, so without reuse the buffers alone would be an
/// eighth of the bytes written, all of it fresh memory.
const MAX_SPARE_BUFFERS: usize = 4;
static SPARE_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn spare_buffers() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    SPARE_BUFFERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An aligned buffer of [`BLOCK`] bytes, `filled` of them in use. Its memory goes back
/// to [`SPARE_BUFFERS`] when it is dropped.
struct Block {
    storage: Vec<u8>,
    start: usize,
    filled: usize,
}

impl Block {
    fn new() -> Self {
        let storage = spare_buffers()
            .pop()
            .unwrap_or_else(|| vec![0u8; BLOCK + ALIGN]);
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
        let storage = std::mem::take(&mut self.storage);
        let mut spare = spare_buffers();
        if storage.len() == BLOCK + ALIGN && spare.len() < MAX_SPARE_BUFFERS {
            spare.push(storage);
        }
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
                    write_all_direct(&mut file, &mut direct, block.bytes())?;
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
        })
    }

    /// Appends `data`.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
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

/// Reads `len` bytes at `offset` and then drops the pages they filled from the page
/// cache (pages shared with the bytes around them stay): for data read once, such as a
/// chunk a coordinator serves from its pack or an agent reads back from its cache.
///
/// Why: kept, those pages would only grow the page cache, and on a VM whose host
/// reclaims the pages its guest frees every new page-cache page costs a fault in the
/// host (~2.3 s per GiB); dropped, the next read reuses the same pages. Reading a just
/// uploaded gigabyte back cost the coordinator 3.7 core-seconds with the pages kept.
pub fn read_once(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset)?;
    if let Some(len) = std::num::NonZeroU64::new(len as u64) {
        // Only advice: refused, it costs memory, never correctness.
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
    }
    Ok(data)
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

    fn shm() -> Option<std::path::PathBuf> {
        let shm = std::path::PathBuf::from("/dev/shm");
        shm.is_dir().then_some(shm)
    }
}
