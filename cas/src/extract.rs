//! Writing a manifest's tree under a destination directory, never outside it.
//!
//! Layers of defence, each sufficient against a well-formed attack on its own:
//! - the manifest is validated first ([`Manifest::validate`]): relative paths without
//!   `..`, no duplicates, nothing under a symlink or a file, symlink targets that stay
//!   inside the tree;
//! - the destination must be new or empty, files are created with `O_EXCL`
//!   (`create_new`) and directories one component at a time, so nothing pre-existing is
//!   followed or overwritten;
//! - every parent component is checked with `symlink_metadata` before anything is
//!   created under it, and symlinks are created last, after every file and directory,
//!   so no write ever happens while a link from the manifest exists on disk.
//!
//! There are no hardlinks in the format, so none are created. Setuid and setgid bits are
//! dropped on extraction. On a refusal or an error, what was already written stays under
//! `dest` for the caller to remove; nothing is ever written outside it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::direct::{DirectWriter, DIRECT_WRITE_MIN};
use crate::{CasError, Digest, EntryKind, Manifest, VerifiedChunk};

/// Mode bits applied on extraction: permissions and the sticky bit, never setuid or
/// setgid (an artifact must not mint privileged binaries).
const APPLIED_MODE_BITS: u32 = 0o1777;

/// What extraction does with what is already in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// The destination must not exist or be empty: nothing is ever overwritten.
    Refuse,
    /// The destination may hold files (a job's workspace): real directories are reused,
    /// a file or symlink where the manifest puts a file or symlink is replaced (the link
    /// itself, never what it points to), and a directory where the manifest puts a file
    /// is refused. Parents are still checked one by one: nothing is written through a
    /// symlink, whoever made it.
    Merge,
}

/// Writes `manifest`'s tree under `dest`, which must not exist yet or be an empty
/// directory. `fetch` returns a chunk's uncompressed bytes (typically through
/// [`crate::decompress`]); their size and digest are checked again here.
pub fn extract(
    manifest: &Manifest,
    dest: &Path,
    fetch: impl FnMut(&Digest) -> Result<Vec<u8>, CasError>,
) -> Result<(), CasError> {
    extract_with(manifest, dest, Existing::Refuse, fetch)
}

/// [`extract`], choosing what happens to what `dest` already holds.
pub fn extract_with(
    manifest: &Manifest,
    dest: &Path,
    existing: Existing,
    mut fetch: impl FnMut(&Digest) -> Result<Vec<u8>, CasError>,
) -> Result<(), CasError> {
    // The bytes are labelled with the digest they hash to; a label that is not the one
    // asked for is refused below, after the size check, like any mismatch.
    extract_verified(manifest, dest, existing, |digest| {
        let data = fetch(digest)?;
        Ok(VerifiedChunk::checked(Digest::of(&data), data))
    })
}

/// [`extract_with`] for a `fetch` that returns chunks already checked
/// ([`crate::open_chunk`]): they are not hashed again, only matched by digest and size
/// against the manifest. What a download uses.
pub fn extract_verified(
    manifest: &Manifest,
    dest: &Path,
    existing: Existing,
    fetch: impl FnMut(&Digest) -> Result<VerifiedChunk, CasError>,
) -> Result<(), CasError> {
    extract_verified_noting(manifest, dest, existing, fetch, |_, _, _| {})
}

/// [`extract_verified`], telling `written` of each file once it is closed: where it is,
/// its entry, and how many of the entry's chunks (from the first) its bytes on disk
/// hold. That is all of them for a file written whole; when writing a file stops at an
/// error, what was written is flushed first and the count says how far it got (a file
/// that got no chunk is not told). A download's chunk cache uses it to keep a large
/// file's chunks where they were written instead of in a second copy.
pub fn extract_verified_noting(
    manifest: &Manifest,
    dest: &Path,
    existing: Existing,
    mut fetch: impl FnMut(&Digest) -> Result<VerifiedChunk, CasError>,
    mut written: impl FnMut(&Path, &crate::Entry, usize),
) -> Result<(), CasError> {
    let entries = prepare(manifest, dest, existing)?;
    let merge = existing == Existing::Merge;

    // Pass 1: directories and files, parents before children.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in &entries {
        match &entry.kind {
            EntryKind::Dir { mode } => dir_modes.push(make_dir(dest, entry, *mode, merge)?),
            EntryKind::File { .. } => {
                let on_disk = ensure_parents(dest, &entry.path)?;
                let (result, chunks_written) = write_file(&on_disk, entry, merge, &mut fetch);
                if chunks_written > 0 {
                    written(&on_disk, entry, chunks_written);
                }
                result?;
            }
            EntryKind::Symlink { .. } => {}
        }
    }
    finish_tree(dest, &entries, &dir_modes, merge)
}

/// Fewest files for which [`extract_verified_parallel`] uses more than one thread.
pub const PARALLEL_MIN_FILES: usize = 64;

/// [`extract_verified`] with the files written by up to `workers` threads at once,
/// each fetching through its own `fetch_for()`: for a tree of many files whose chunks
/// are all at hand (a cache restored from the local chunk cache). There, creating the
/// files is most of the time, and on one thread the other cores sat idle: restoring
/// 20,000 files spent ~70% of its thread in ext4's inode allocation.
///
/// Directories (and every file's parents) are made first, on the calling thread, with
/// the same checks; then each worker writes a contiguous share of the files, in path
/// order, with `create_new` in directories made or checked above; symlinks and
/// directory modes follow once every worker is done. The first error stops the other
/// workers at their next file and is returned (what was written stays, as for
/// [`extract_verified`]).
pub fn extract_verified_parallel<F>(
    manifest: &Manifest,
    dest: &Path,
    existing: Existing,
    workers: usize,
    fetch_for: impl Fn() -> F + Sync,
) -> Result<(), CasError>
where
    F: FnMut(&Digest) -> Result<VerifiedChunk, CasError>,
{
    let entries = prepare(manifest, dest, existing)?;
    let merge = existing == Existing::Merge;

    // Pass 1a: directories, and each file's place (its parents made and checked).
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut files: Vec<(PathBuf, &crate::Entry)> = Vec::new();
    for entry in &entries {
        match &entry.kind {
            EntryKind::Dir { mode } => dir_modes.push(make_dir(dest, entry, *mode, merge)?),
            EntryKind::File { .. } => files.push((ensure_parents(dest, &entry.path)?, entry)),
            EntryKind::Symlink { .. } => {}
        }
    }

    // Pass 1b: the files, in contiguous shares.
    let workers = if files.len() < PARALLEL_MIN_FILES {
        1
    } else {
        workers.clamp(1, files.len())
    };
    let share = files.len().div_ceil(workers).max(1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written: Vec<Result<(), CasError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(share)
            .map(|mine| {
                let (stop, fetch_for) = (&stop, &fetch_for);
                scope.spawn(move || {
                    let mut fetch = fetch_for();
                    for (on_disk, entry) in mine {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        if let (Err(e), _) = write_file(on_disk, entry, merge, &mut fetch) {
                            stop.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(CasError::Io {
                        context: format!("extracting into {}", dest.display()),
                        source: std::io::Error::other("an extraction thread panicked"),
                    })
                })
            })
            .collect()
    });
    // A share that stopped because another failed returned Ok: the failure is the error.
    written.into_iter().collect::<Result<(), CasError>>()?;
    finish_tree(dest, &entries, &dir_modes, merge)
}

/// Validates the manifest, prepares `dest`, and returns the entries in path order
/// (parents before children).
fn prepare<'m>(
    manifest: &'m Manifest,
    dest: &Path,
    existing: Existing,
) -> Result<Vec<&'m crate::Entry>, CasError> {
    manifest.validate()?;
    match existing {
        Existing::Refuse => prepare_destination(dest)?,
        Existing::Merge => prepare_merge_destination(dest)?,
    }
    check_free_space(manifest, dest)?;
    let mut entries: Vec<_> = manifest.entries.iter().collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Most distinct chunk sizes checked for being all zeros (see [`space_needed`]): at most
/// 16 hashes of at most 256 KiB, ~4 MiB hashed per extraction.
const ZERO_SIZES_CHECKED: usize = 16;

/// Bytes `manifest`'s tree takes on disk, at most: each file's bytes less its chunks of
/// zeros (written as holes), rounded up to whole 4 KiB blocks, and a block per directory.
/// A chunk of zeros is recognised by its digest: the chunk sizes that repeat most (runs
/// of zeros cut into chunks of one size) are hashed as zeros once each.
pub fn space_needed(manifest: &Manifest) -> u64 {
    let mut repeats: std::collections::HashMap<(Digest, u32), u64> =
        std::collections::HashMap::new();
    for entry in &manifest.entries {
        if let EntryKind::File { chunks, .. } = &entry.kind {
            for c in chunks {
                *repeats.entry((c.digest, c.size)).or_default() += 1;
            }
        }
    }
    let mut repeated: Vec<(u64, u32)> = repeats
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&(_, size), &n)| (n, size))
        .collect();
    repeated.sort_unstable_by(|a, b| b.cmp(a));
    let mut zero_digests = std::collections::HashSet::new();
    let mut sizes_seen = std::collections::HashSet::new();
    for (_, size) in repeated {
        if sizes_seen.len() >= ZERO_SIZES_CHECKED {
            break;
        }
        if sizes_seen.insert(size) {
            zero_digests.insert(Digest::of(&vec![0u8; size as usize]));
        }
    }
    let round_up = |n: u64| n.div_ceil(HOLE_BLOCK) * HOLE_BLOCK;
    manifest
        .entries
        .iter()
        .map(|entry| match &entry.kind {
            EntryKind::File { chunks, size, .. } => {
                let zeros: u64 = chunks
                    .iter()
                    .filter(|c| zero_digests.contains(&c.digest))
                    .map(|c| u64::from(c.size))
                    .sum();
                round_up(size.saturating_sub(zeros))
            }
            EntryKind::Dir { .. } => HOLE_BLOCK,
            EntryKind::Symlink { .. } => 0,
        })
        .fold(0u64, u64::saturating_add)
}

/// Refuses, before anything is written or fetched, a tree that would not fit on the
/// filesystem `dest` is (or will be, when it does not exist yet) on: see
/// [`space_needed`]. Every extraction checks it; a download calls it before fetching.
/// Files a merge would replace are not counted as freed, so near a full disk a merge
/// may be refused that would just have fit.
pub fn check_free_space(manifest: &Manifest, dest: &Path) -> Result<(), CasError> {
    let existing = dest.ancestors().find(|p| p.exists()).unwrap_or(dest);
    check_space(dest, space_needed(manifest), free_space(existing))
}

/// Bytes an unprivileged writer may still use on `dest`'s filesystem; `None` when the
/// filesystem does not say (then nothing is refused ahead: a write that fails says so).
fn free_space(dest: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dest).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Refuses an extraction of `needed` bytes into `dest` that `available` cannot hold,
/// before anything is written: a tree that does not fit would fill the disk (the job's,
/// and everything else on it) and fail half-written.
fn check_space(dest: &Path, needed: u64, available: Option<u64>) -> Result<(), CasError> {
    match available {
        Some(available) if needed > available => Err(CasError::NoSpace {
            dest: dest.to_owned(),
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

/// Makes (or, merging, reuses) a directory entry's directory; returns where it is and
/// the mode to give it once everything under it is written.
fn make_dir(
    dest: &Path,
    entry: &crate::Entry,
    mode: u32,
    merge: bool,
) -> Result<(PathBuf, u32), CasError> {
    let on_disk = ensure_parents(dest, &entry.path)?;
    if !(merge && is_real_dir(&on_disk, &entry.path)?) {
        create_dir_checked(&on_disk, &entry.path)?;
    }
    Ok((on_disk, mode))
}

/// Writes a file entry at `on_disk` (its parents already made and checked), each chunk
/// matched against the manifest by size and digest. Returns the outcome and how many of
/// the entry's chunks are on disk: on an error past the first chunk, what was written
/// is flushed (a large file's last partial block waits in its writer's buffer).
fn write_file(
    on_disk: &Path,
    entry: &crate::Entry,
    merge: bool,
    fetch: &mut impl FnMut(&Digest) -> Result<VerifiedChunk, CasError>,
) -> (Result<(), CasError>, usize) {
    let EntryKind::File { mode, chunks, size } = &entry.kind else {
        return (Ok(()), 0);
    };
    if merge {
        if let Err(e) = clear_for_replacement(on_disk, &entry.path) {
            return (Err(e), 0);
        }
    }
    let opened = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(on_disk)
        .map_err(|err| refuse_existing(err, &entry.path, "creating file"))
        .and_then(|file| {
            FileOut::new(file, *size).map_err(CasError::io(format!("writing `{}`", entry.path)))
        });
    let mut file = match opened {
        Ok(file) => file,
        Err(e) => return (Err(e), 0),
    };
    let mut chunks_written = 0;
    let wrote = chunks.iter().try_for_each(|chunk| {
        write_chunk(&mut file, entry, chunk, fetch)?;
        chunks_written += 1;
        Ok(())
    });
    let finished = file
        .finish()
        .map_err(CasError::io(format!("writing `{}`", entry.path)));
    let result = match (wrote, finished) {
        (Err(e), finished) => {
            // What the error left is on disk only if the flush worked.
            if finished.is_err() {
                chunks_written = 0;
            }
            Err(e)
        }
        (Ok(()), Err(e)) => {
            chunks_written = 0;
            Err(e)
        }
        (Ok(()), Ok(file)) => file
            .set_permissions(fs::Permissions::from_mode(mode & APPLIED_MODE_BITS))
            .map_err(CasError::io(format!("setting mode of `{}`", entry.path))),
    };
    (result, chunks_written)
}

/// Fetches one chunk of a file entry, checks it against the manifest and writes it.
fn write_chunk(
    file: &mut FileOut,
    entry: &crate::Entry,
    chunk: &crate::ChunkRef,
    fetch: &mut impl FnMut(&Digest) -> Result<VerifiedChunk, CasError>,
) -> Result<(), CasError> {
    let data = fetch(&chunk.digest)?;
    if data.len() != chunk.size as usize {
        return Err(CasError::CorruptChunk {
            digest: chunk.digest,
            reason: format!(
                "fetched {} bytes for entry `{}`, expected {}",
                data.len(),
                entry.path,
                chunk.size
            ),
        });
    }
    if *data.digest() != chunk.digest {
        return Err(CasError::DigestMismatch {
            expected: chunk.digest,
            actual: *data.digest(),
        });
    }
    for piece in data.pieces() {
        file.write(piece)
            .map_err(CasError::io(format!("writing `{}`", entry.path)))?;
    }
    Ok(())
}

/// Passes 2 and 3, once every file is written: symlinks, then directory modes.
fn finish_tree(
    dest: &Path,
    entries: &[&crate::Entry],
    dir_modes: &[(PathBuf, u32)],
    merge: bool,
) -> Result<(), CasError> {
    // Pass 2: symlinks, once nothing else will be written.
    for entry in entries {
        if let EntryKind::Symlink { target } = &entry.kind {
            let on_disk = ensure_parents(dest, &entry.path)?;
            if merge {
                clear_for_replacement(&on_disk, &entry.path)?;
            }
            std::os::unix::fs::symlink(target, &on_disk)
                .map_err(|err| refuse_existing(err, &entry.path, "creating symlink"))?;
        }
    }

    // Pass 3: directory modes, deepest first, so a read-only directory is locked only
    // after everything under it is written.
    for (on_disk, mode) in dir_modes.iter().rev() {
        let meta = fs::symlink_metadata(on_disk)
            .map_err(CasError::io(format!("checking {}", on_disk.display())))?;
        if !meta.is_dir() {
            return Err(CasError::Io {
                context: format!("setting mode of {}", on_disk.display()),
                source: std::io::Error::other("no longer a directory"),
            });
        }
        fs::set_permissions(
            on_disk,
            fs::Permissions::from_mode(mode & APPLIED_MODE_BITS),
        )
        .map_err(CasError::io(format!(
            "setting mode of {}",
            on_disk.display()
        )))?;
    }
    Ok(())
}

/// Where a file's bytes go: straight to the file, or for a large one past the page
/// cache (see [`crate::direct`]). Either way holes stay holes: every whole, aligned
/// 4 KiB block of zeros is skipped rather than written, and the file's length set at the
/// end, so a 4 GiB sparse file takes the blocks of its data on every host that extracts
/// it, not 4 GiB.
enum FileOut {
    /// The file and the offset its next byte goes to.
    Plain(fs::File, u64),
    Direct(DirectWriter),
}

/// Size and alignment of the blocks of zeros skipped (the common filesystem block).
const HOLE_BLOCK: u64 = crate::direct::ALIGN as u64;

impl FileOut {
    fn new(file: fs::File, size: u64) -> std::io::Result<Self> {
        Ok(if size >= DIRECT_WRITE_MIN {
            Self::Direct(DirectWriter::sparse(file)?)
        } else {
            Self::Plain(file, 0)
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(file, offset) => write_sparse(file, offset, data),
            Self::Direct(writer) => writer.write(data),
        }
    }

    fn finish(self) -> std::io::Result<fs::File> {
        match self {
            Self::Plain(file, len) => {
                // Zeros skipped at the end are in the file once its length says so.
                file.set_len(len)?;
                Ok(file)
            }
            Self::Direct(writer) => writer.finish(),
        }
    }
}

/// Writes `data` at `*offset` (the file's position), seeking over the whole aligned
/// [`HOLE_BLOCK`]s of zeros in it; the bytes before the first boundary and after the
/// last are written as they are.
fn write_sparse(file: &mut fs::File, offset: &mut u64, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let lead = usize::try_from((HOLE_BLOCK - *offset % HOLE_BLOCK) % HOLE_BLOCK)
        .map_or(data.len(), |lead| lead.min(data.len()));
    let (head, body) = data.split_at(lead);
    file.write_all(head)?;
    let mut at = 0;
    while at < body.len() {
        let zero = crate::direct::is_zero_block(&body[at..]);
        let mut end = at;
        while end < body.len() && crate::direct::is_zero_block(&body[end..]) == zero {
            end = (end + HOLE_BLOCK as usize).min(body.len());
        }
        if zero {
            let skip = i64::try_from(end - at).map_err(std::io::Error::other)?;
            file.seek(SeekFrom::Current(skip))?;
        } else {
            file.write_all(&body[at..end])?;
        }
        at = end;
    }
    *offset += data.len() as u64;
    Ok(())
}

/// Creates `dest` if it does not exist; otherwise it must be an empty directory and not
/// a symlink.
fn prepare_destination(dest: &Path) -> Result<(), CasError> {
    match fs::symlink_metadata(dest) {
        Err(err) if err.kind() == ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(CasError::io(format!("creating {}", dest.display())))
        }
        Err(err) => Err(CasError::io(format!("checking {}", dest.display()))(err)),
        Ok(meta) if meta.is_dir() => {
            let mut listing =
                fs::read_dir(dest).map_err(CasError::io(format!("listing {}", dest.display())))?;
            if listing.next().is_some() {
                return Err(CasError::DestinationNotEmpty {
                    dest: dest.to_owned(),
                });
            }
            Ok(())
        }
        Ok(_) => Err(CasError::DestinationNotEmpty {
            dest: dest.to_owned(),
        }),
    }
}

/// Creates `dest` if it does not exist; otherwise it must be a directory, not a symlink.
fn prepare_merge_destination(dest: &Path) -> Result<(), CasError> {
    match fs::symlink_metadata(dest) {
        Err(err) if err.kind() == ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(CasError::io(format!("creating {}", dest.display())))
        }
        Err(err) => Err(CasError::io(format!("checking {}", dest.display()))(err)),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(CasError::Io {
            context: format!("extracting into {}", dest.display()),
            source: std::io::Error::other("not a directory"),
        }),
    }
}

/// Whether a directory entry's place already holds a real directory (merge mode). A
/// symlink or a file there is refused.
fn is_real_dir(on_disk: &Path, path: &str) -> Result<bool, CasError> {
    match fs::symlink_metadata(on_disk) {
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(false),
        Err(err) => Err(CasError::io(format!("checking `{path}`"))(err)),
        Ok(meta) if meta.file_type().is_symlink() => Err(CasError::ThroughSymlink {
            path: path.to_owned(),
            link: path.to_owned(),
        }),
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(_) => Err(CasError::ParentNotDir {
            path: path.to_owned(),
            parent: path.to_owned(),
        }),
    }
}

/// Removes a file or symlink (the link, not its target) where a file or symlink is about
/// to be written (merge mode). A directory there is refused: it is never deleted.
fn clear_for_replacement(on_disk: &Path, path: &str) -> Result<(), CasError> {
    match fs::symlink_metadata(on_disk) {
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
        Err(err) => Err(CasError::io(format!("checking `{path}`"))(err)),
        Ok(meta) if meta.is_dir() => Err(CasError::Io {
            context: format!("writing `{path}`"),
            source: std::io::Error::other(
                "a directory is in the way; it is not deleted to make room for a file",
            ),
        }),
        Ok(_) => fs::remove_file(on_disk).map_err(CasError::io(format!("replacing `{path}`"))),
    }
}

/// Makes sure every parent of `path` exists under `dest` as a real directory (creating
/// missing ones one at a time) and returns where `path` itself goes.
fn ensure_parents(dest: &Path, path: &str) -> Result<PathBuf, CasError> {
    for (slash, _) in path.match_indices('/') {
        let parent = &path[..slash];
        check_parent(&dest.join(parent), path, parent)?;
    }
    Ok(dest.join(path))
}

/// Checks one parent component on disk: it must be a directory and not a symlink. A
/// missing parent is created (mode 0755, before umask).
fn check_parent(on_disk: &Path, path: &str, parent: &str) -> Result<(), CasError> {
    match fs::symlink_metadata(on_disk) {
        Ok(meta) if meta.file_type().is_symlink() => Err(CasError::ThroughSymlink {
            path: path.to_owned(),
            link: parent.to_owned(),
        }),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(CasError::ParentNotDir {
            path: path.to_owned(),
            parent: parent.to_owned(),
        }),
        Err(err) if err.kind() == ErrorKind::NotFound => {
            match DirBuilder::new().mode(0o755).create(on_disk) {
                Ok(()) => Ok(()),
                // Created by someone else in between: check again what it is.
                Err(err) if err.kind() == ErrorKind::AlreadyExists => {
                    let meta = fs::symlink_metadata(on_disk)
                        .map_err(CasError::io(format!("checking `{parent}`")))?;
                    if meta.is_dir() && !meta.file_type().is_symlink() {
                        Ok(())
                    } else {
                        Err(CasError::ThroughSymlink {
                            path: path.to_owned(),
                            link: parent.to_owned(),
                        })
                    }
                }
                Err(err) => Err(CasError::io(format!("creating `{parent}`"))(err)),
            }
        }
        Err(err) => Err(CasError::io(format!("checking `{parent}`"))(err)),
    }
}

/// Creates a listed directory. Parents sort before their children (`a` < `a/x`), so a
/// listed directory is never created implicitly first; if it exists, the path was named
/// twice or something raced us, and either way it is refused.
fn create_dir_checked(on_disk: &Path, path: &str) -> Result<(), CasError> {
    DirBuilder::new()
        .mode(0o700)
        .create(on_disk)
        .map_err(|err| refuse_existing(err, path, "creating directory"))
}

/// `AlreadyExists` from an exclusive create means the manifest (or someone racing us)
/// named the path twice.
fn refuse_existing(err: std::io::Error, path: &str, doing: &str) -> CasError {
    if err.kind() == ErrorKind::AlreadyExists {
        CasError::DuplicateEntry {
            path: path.to_owned(),
        }
    } else {
        CasError::io(format!("{doing} `{path}`"))(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_larger_than_the_free_space_is_refused_naming_both_sizes() {
        let dest = Path::new("/data/out");
        let err = check_space(dest, 3 << 30, Some(1 << 30)).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "not enough free space in /data/out: the tree needs 3.0 GiB (3221225472 bytes) and 1.0 GiB (1073741824 bytes) are available"
        );
        assert!(
            check_space(dest, 1 << 30, Some(1 << 30)).is_ok(),
            "exactly fits"
        );
        assert!(
            check_space(dest, u64::MAX, None).is_ok(),
            "unknown: not refused ahead"
        );
    }

    /// The on-disk check refuses a parent that is a symlink, whatever the manifest said
    /// (defence against a destination changed under us).
    #[test]
    fn parent_symlink_on_disk_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dest = root.path().join("dest");
        let outside = root.path().join("outside");
        fs::create_dir(&dest).expect("dest");
        fs::create_dir(&outside).expect("outside");
        std::os::unix::fs::symlink(&outside, dest.join("a")).expect("symlink");
        let err = ensure_parents(&dest, "a/b").expect_err("must refuse");
        assert!(
            matches!(&err, CasError::ThroughSymlink { path, link } if path == "a/b" && link == "a"),
            "{err}"
        );
        assert_eq!(fs::read_dir(&outside).expect("list").count(), 0);
    }

    #[test]
    fn parent_file_on_disk_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::write(root.path().join("a"), b"x").expect("write");
        let err = ensure_parents(root.path(), "a/b").expect_err("must refuse");
        assert!(matches!(err, CasError::ParentNotDir { .. }), "{err}");
    }
}
