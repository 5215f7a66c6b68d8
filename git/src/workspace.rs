//! The agent's half of a workspace's `.git`: written from a [`GitPayload`] into a
//! workspace whose files were just extracted, with no `git` program.
//!
//! The index is written here, with the stat data of each file as it is on disk, so
//! `git status` compares stat data and hashes nothing. One subtlety: git treats an
//! entry whose mtime is not strictly older than the index file (to the second: Debian's
//! git is built without nanosecond timestamps) as "racily clean" and re-hashes the file.
//! Files written in the second the index is written would all be hashed. So the second
//! the index is written in (`T`, read from the filesystem's own clock through the lock
//! file) is taken first, every file whose mtime is `T` or later gets its mtime set back
//! to `T - 1` (same nanoseconds), and that is what the index records. A later edit
//! gives the file a new mtime that differs from the recorded one, so it is still seen;
//! unlike an index dated into the future, no edit can hide in the same second.
//!
//! Run it after anything that changes the files' ownership or modes (`chown` to the job's
//! user changes ctime, which the index records); git also refuses a repository owned by
//! another user ("dubious ownership"), so the `.git` must belong to the job's user.
//!
//! It must not write outside `workspace/.git` except to set those file times, and
//! refuses index paths that would leave the workspace.

use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::GitError;
use crate::payload::{decode_index, GitPayload};
use crate::tree::IndexEntry;

/// What writing the `.git` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkspaceFigures {
    pub index_entries: u64,
    /// Files whose mtime was set back a second so git does not re-hash them.
    pub mtimes_adjusted: u64,
    pub bytes_written: u64,
}

/// Writes `payload` as `workspace/.git`. The workspace must hold the checkout's files
/// (extracted from the same commit's manifest) and no `.git` yet.
pub fn write_git_dir(workspace: &Path, payload: &GitPayload) -> Result<WorkspaceFigures, GitError> {
    let meta = fs::symlink_metadata(workspace)
        .map_err(GitError::file("checking the workspace", workspace))?;
    if !meta.is_dir() {
        return Err(GitError::Payload(format!(
            "workspace {} is not a directory",
            workspace.display()
        )));
    }
    let entries = decode_index(&payload.index)?;
    for entry in &entries {
        check_index_path(&entry.path)?;
    }
    check_name(&payload.pack_name)?;
    let dot_git = workspace.join(".git");
    let mut figures = WorkspaceFigures::default();
    // `create` (not `create_all`) fails if anything is there already, a link included.
    mkdir(&dot_git)?;
    for dir in [
        "objects",
        "objects/pack",
        "objects/info",
        "refs",
        "refs/heads",
        "refs/tags",
        "info",
    ] {
        mkdir(&dot_git.join(dir))?;
    }
    let head = match &payload.head_ref {
        Some(branch) => {
            check_ref_name(branch)?;
            format!("ref: {branch}\n")
        }
        None => format!("{}\n", payload.head),
    };
    let mut write = |relative: &str, bytes: &[u8]| -> Result<(), GitError> {
        figures.bytes_written += bytes.len() as u64;
        write_new(&dot_git.join(relative), bytes)
    };
    write("HEAD", head.as_bytes())?;
    write("config", payload.config.as_bytes())?;
    write("description", b"Checked out by Gantry\n")?;
    if !payload.shallow.is_empty() {
        let mut text = String::new();
        for commit in &payload.shallow {
            let _ = writeln!(text, "{commit}");
        }
        write("shallow", text.as_bytes())?;
    }
    let mut packed = String::from("# pack-refs with: peeled fully-peeled sorted \n");
    for reference in &payload.refs {
        check_ref_name(&reference.name)?;
        let _ = writeln!(packed, "{} {}", reference.target, reference.name);
        if let Some(peeled) = reference.peeled {
            let _ = writeln!(packed, "^{peeled}");
        }
    }
    write("packed-refs", packed.as_bytes())?;
    let pack = format!("objects/pack/pack-{}", payload.pack_name);
    write(&format!("{pack}.pack"), &payload.pack)?;
    write(&format!("{pack}.idx"), &payload.pack_index)?;
    // Marks the pack's objects as coming from a partial clone (see the config).
    write(&format!("{pack}.promisor"), b"")?;

    let (adjusted, index_bytes) = write_index(workspace, &dot_git, &entries)?;
    figures.index_entries = entries.len() as u64;
    figures.mtimes_adjusted = adjusted;
    figures.bytes_written += index_bytes;
    Ok(figures)
}

fn mkdir(path: &Path) -> Result<(), GitError> {
    DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(GitError::file(
            "creating a directory of the workspace's .git",
            path,
        ))
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), GitError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(GitError::file("writing the workspace's .git", path))?;
    file.write_all(bytes)
        .map_err(GitError::file("writing the workspace's .git", path))
}

fn check_name(name: &str) -> Result<(), GitError> {
    if name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(GitError::Payload(format!(
            "pack name `{name}` is not 40 hex digits"
        )))
    }
}

fn check_ref_name(name: &str) -> Result<(), GitError> {
    let ok = name.starts_with("refs/")
        && !name.contains("..")
        && !name.chars().any(|c| c.is_control() || c == ' ')
        && !name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c.starts_with('.'));
    if ok {
        Ok(())
    } else {
        Err(GitError::Payload(format!("ref name `{name}` is not valid")))
    }
}

/// An index path must stay inside the workspace and out of `.git`.
fn check_index_path(path: &str) -> Result<(), GitError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.split('/').any(|c| {
            c.is_empty()
                || c == "."
                || c == ".."
                || c.trim_end_matches(['.', ' ']).eq_ignore_ascii_case(".git")
        });
    if bad {
        Err(GitError::Payload(format!(
            "index path `{path}` is not a safe workspace path"
        )))
    } else {
        Ok(())
    }
}

/// Stat data of one file as git's index records it.
#[derive(Default)]
struct Stat {
    ctime: (u32, u32),
    mtime: (u32, u32),
    dev: u32,
    ino: u32,
    uid: u32,
    gid: u32,
    size: u32,
}

fn stat_of(meta: &fs::Metadata) -> Stat {
    // The index stores 32-bit fields; git truncates the same way.
    Stat {
        ctime: (meta.ctime() as u32, meta.ctime_nsec() as u32),
        mtime: (meta.mtime() as u32, meta.mtime_nsec() as u32),
        dev: meta.dev() as u32,
        ino: meta.ino() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        size: meta.size() as u32,
    }
}

/// Writes `.git/index` (version 2) for `entries`, with each file's stat data; returns
/// how many mtimes were set back and the index's size.
fn write_index(
    workspace: &Path,
    dot_git: &Path,
    entries: &[IndexEntry],
) -> Result<(u64, u64), GitError> {
    let lock_path = dot_git.join("index.lock");
    let mut lock = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&lock_path)
        .map_err(GitError::file("creating the index", &lock_path))?;
    // The second this index is written in, by the filesystem's clock.
    let written_in = lock
        .metadata()
        .map_err(GitError::file("reading the index's time", &lock_path))?
        .mtime();

    let mut body: Vec<u8> = Vec::with_capacity(entries.len() * 80 + 32);
    body.extend_from_slice(b"DIRC");
    body.extend_from_slice(&2u32.to_be_bytes());
    body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    let mut adjusted = 0u64;
    let mut sorted: Vec<&IndexEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    for entry in sorted {
        let on_disk = workspace.join(&entry.path);
        let mut meta = fs::symlink_metadata(&on_disk).map_err(|e| {
            GitError::Payload(format!(
                "the workspace does not match the commit: `{}`: {e}",
                entry.path
            ))
        })?;
        let expected_ok = match entry.mode {
            0o160_000 => meta.is_dir(),
            // A symlink, or a neutralised one: a file holding its target.
            0o120_000 => meta.file_type().is_symlink() || meta.is_file(),
            _ => meta.is_file(),
        };
        if !expected_ok {
            return Err(GitError::Payload(format!(
                "the workspace does not match the commit: `{}` is not what the index records",
                entry.path
            )));
        }
        if entry.mode != 0o160_000 && meta.mtime() >= written_in {
            set_back(&on_disk, &meta, written_in)?;
            meta = fs::symlink_metadata(&on_disk)
                .map_err(GitError::file("checking a workspace file", &on_disk))?;
            adjusted += 1;
        }
        let stat = if entry.mode == 0o160_000 {
            // git compares nothing of a submodule's directory but its existence: zeros.
            Stat::default()
        } else {
            stat_of(&meta)
        };
        push_entry(&mut body, entry, &stat);
    }
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &body);
    body.extend_from_slice(digest.as_ref());
    lock.write_all(&body)
        .map_err(GitError::file("writing the index", &lock_path))?;
    // The index must be newer (to the second) than every entry it records; only a
    // clock stepped back while it was written could break that.
    let now = lock
        .metadata()
        .map_err(GitError::file("reading the index's time", &lock_path))?;
    if now.mtime() < written_in {
        set_file_time(&lock, written_in)?;
    }
    drop(lock);
    let index_path = dot_git.join("index");
    fs::rename(&lock_path, &index_path)
        .map_err(GitError::file("placing the index", &index_path))?;
    Ok((adjusted, body.len() as u64))
}

/// Sets a file's (or link's own) mtime to `second - 1`, keeping its nanoseconds and atime.
fn set_back(path: &Path, meta: &fs::Metadata, second: i64) -> Result<(), GitError> {
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        last_modification: Timespec {
            tv_sec: second - 1,
            tv_nsec: meta.mtime_nsec(),
        },
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
        GitError::File {
            context: "setting a workspace file's time",
            path: PathBuf::from(path),
            source: e.into(),
        }
    })
}

fn set_file_time(file: &File, second: i64) -> Result<(), GitError> {
    use rustix::fs::{Timespec, Timestamps};
    let at = Timespec {
        tv_sec: second,
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        file,
        &Timestamps {
            last_access: at,
            last_modification: at,
        },
    )
    .map_err(|e| GitError::Io {
        context: "setting the index's time".into(),
        source: e.into(),
    })
}

/// One version-2 index entry: stat data, mode, id, flags, path, NUL padding to 8 bytes.
fn push_entry(out: &mut Vec<u8>, entry: &IndexEntry, stat: &Stat) {
    let entry_start = out.len();
    for field in [
        stat.ctime.0,
        stat.ctime.1,
        stat.mtime.0,
        stat.mtime.1,
        stat.dev,
        stat.ino,
        entry.mode,
        stat.uid,
        stat.gid,
        stat.size,
    ] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out.extend_from_slice(entry.oid.as_bytes());
    let name_len = entry.path.len().min(0xfff) as u16;
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(entry.path.as_bytes());
    let len = out.len() - entry_start;
    let padded = (len + 8) & !7;
    out.resize(entry_start + padded, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_padded_to_eight_bytes_with_at_least_one_nul() {
        let stat = Stat {
            ctime: (1, 2),
            mtime: (3, 4),
            dev: 5,
            ino: 6,
            uid: 7,
            gid: 8,
            size: 9,
        };
        for len in 1..20 {
            let entry = IndexEntry {
                path: "x".repeat(len),
                mode: 0o100_644,
                oid: crate::oid::ObjectId([0xab; 20]),
            };
            let mut out = Vec::new();
            push_entry(&mut out, &entry, &stat);
            assert_eq!(out.len() % 8, 0);
            assert_eq!(out[62 + len], 0, "NUL after the path");
            assert!(out.len() - (62 + len) <= 8);
        }
    }

    #[test]
    fn unsafe_index_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            ".git/config",
            "a/.GIT/x",
            "a//b",
        ] {
            assert!(check_index_path(bad).is_err(), "{bad}");
        }
        assert!(check_index_path("src/.gitignore").is_ok());
    }
}
