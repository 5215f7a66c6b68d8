//! Building a manifest from a directory on disk. Reads only: symlinks are recorded, never
//! followed, and the caller stores each chunk through a callback.

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::{
    chunk_reader, Bytes, CasError, ChunkRef, Digest, Entry, EntryKind, Manifest, PathProblem,
};

/// Builds the manifest of everything under `root` (not `root` itself), walking in sorted
/// order, and calls `on_chunk` once per chunk read (repeated chunks are passed again; the
/// caller deduplicates). The result is validated: a tree holding a symlink that points
/// outside it, an absolute symlink, a FIFO, socket or device, or a non-UTF-8 name is
/// refused rather than producing a manifest that extraction would refuse.
///
/// Hardlinks are not preserved: each link becomes an independent file.
pub fn build_manifest(
    root: &Path,
    mut on_chunk: impl FnMut(Digest, &Bytes) -> Result<(), CasError>,
) -> Result<Manifest, CasError> {
    let mut entries = BTreeMap::new();
    walk_dir(root, "", &mut entries, &mut on_chunk)?;
    finish(entries)
}

/// Builds the manifest of a selection: each of `paths` (relative to `root`) with, for
/// directories, everything under them, plus a `Dir` entry for each parent between `root`
/// and a selected path. Overlapping selections are recorded once. A selected path must
/// not go through a symlink under `root` (that would read outside the tree); `.` selects
/// the whole root.
pub fn build_manifest_for(
    root: &Path,
    paths: &[PathBuf],
    mut on_chunk: impl FnMut(Digest, &Bytes) -> Result<(), CasError>,
) -> Result<Manifest, CasError> {
    let mut entries = BTreeMap::new();
    for selected in paths {
        let mut relative = String::new();
        let components: Vec<Component<'_>> = selected.components().collect();
        for (index, component) in components.iter().enumerate() {
            let name = match component {
                Component::Normal(name) => name.to_str().ok_or_else(|| CasError::NonUtf8Path {
                    path: selected.clone(),
                })?,
                Component::CurDir => continue,
                other => {
                    let problem = match other {
                        Component::ParentDir => PathProblem::ParentDir,
                        _ => PathProblem::Absolute,
                    };
                    return Err(CasError::InvalidPath {
                        path: selected.display().to_string(),
                        problem,
                    });
                }
            };
            if !relative.is_empty() {
                relative.push('/');
            }
            relative.push_str(name);
            let on_disk = root.join(&relative);
            let meta = fs::symlink_metadata(&on_disk)
                .map_err(CasError::io(format!("reading {}", on_disk.display())))?;
            let is_last = index + 1 == components.len();
            if is_last {
                if meta.is_dir() {
                    entries.insert(relative.clone(), dir_entry(&relative, &meta));
                    walk_dir(&on_disk, &relative, &mut entries, &mut on_chunk)?;
                } else {
                    record(&on_disk, &relative, &meta, &mut entries, &mut on_chunk)?;
                }
            } else if meta.file_type().is_symlink() {
                return Err(CasError::ThroughSymlink {
                    path: selected.display().to_string(),
                    link: relative,
                });
            } else if meta.is_dir() {
                entries
                    .entry(relative.clone())
                    .or_insert_with(|| dir_entry(&relative, &meta));
            } else {
                return Err(CasError::ParentNotDir {
                    path: selected.display().to_string(),
                    parent: relative,
                });
            }
        }
        // An empty selection (`""` or `.`) means the whole root.
        if relative.is_empty() {
            walk_dir(root, "", &mut entries, &mut on_chunk)?;
        }
    }
    finish(entries)
}

fn finish(entries: BTreeMap<String, Entry>) -> Result<Manifest, CasError> {
    let manifest = Manifest {
        entries: entries.into_values().collect(),
    };
    manifest.validate()?;
    Ok(manifest)
}

fn dir_entry(relative: &str, meta: &Metadata) -> Entry {
    Entry {
        path: relative.to_owned(),
        kind: EntryKind::Dir {
            mode: meta.permissions().mode() & 0o7777,
        },
    }
}

/// Records every entry under `dir` (whose manifest path is `prefix`), recursing into
/// directories in name order. Symlinks are recorded, not followed.
fn walk_dir(
    dir: &Path,
    prefix: &str,
    entries: &mut BTreeMap<String, Entry>,
    on_chunk: &mut impl FnMut(Digest, &Bytes) -> Result<(), CasError>,
) -> Result<(), CasError> {
    let mut children = Vec::new();
    for child in fs::read_dir(dir).map_err(CasError::io(format!("listing {}", dir.display())))? {
        let child = child.map_err(CasError::io(format!("listing {}", dir.display())))?;
        let name = child.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| CasError::NonUtf8Path { path: child.path() })?;
        children.push(name.to_owned());
    }
    children.sort();
    for name in children {
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let on_disk = dir.join(&name);
        let meta = fs::symlink_metadata(&on_disk)
            .map_err(CasError::io(format!("reading {}", on_disk.display())))?;
        if meta.is_dir() {
            entries.insert(relative.clone(), dir_entry(&relative, &meta));
            walk_dir(&on_disk, &relative, entries, on_chunk)?;
        } else {
            record(&on_disk, &relative, &meta, entries, on_chunk)?;
        }
    }
    Ok(())
}

/// Records one non-directory: a regular file (chunked) or a symlink.
fn record(
    on_disk: &Path,
    relative: &str,
    meta: &Metadata,
    entries: &mut BTreeMap<String, Entry>,
    on_chunk: &mut impl FnMut(Digest, &Bytes) -> Result<(), CasError>,
) -> Result<(), CasError> {
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        let target = fs::read_link(on_disk)
            .map_err(CasError::io(format!("reading link {}", on_disk.display())))?;
        let target = target
            .into_os_string()
            .into_string()
            .map_err(|_| CasError::NonUtf8Path {
                path: on_disk.to_owned(),
            })?;
        EntryKind::Symlink { target }
    } else if file_type.is_file() {
        let file =
            File::open(on_disk).map_err(CasError::io(format!("opening {}", on_disk.display())))?;
        let mut chunks = Vec::new();
        let mut size: u64 = 0;
        let mut reader = chunk_reader(file);
        while let Some(chunk) = reader.next_chunk() {
            let (digest, data) = chunk.map_err(|err| match err {
                CasError::Io { source, .. } => CasError::Io {
                    context: format!("reading {}", on_disk.display()),
                    source,
                },
                other => other,
            })?;
            on_chunk(digest, &data)?;
            // Chunks are at most MAX_CHUNK (256 KiB) long, which fits in u32.
            let chunk_size = data.len() as u32;
            size += u64::from(chunk_size);
            chunks.push(ChunkRef {
                digest,
                size: chunk_size,
            });
        }
        // The size is what was read, not what metadata said: a file that grows or
        // shrinks while it is read still gets a consistent entry.
        EntryKind::File {
            mode: meta.permissions().mode() & 0o7777,
            size,
            chunks,
        }
    } else {
        return Err(CasError::Unsupported {
            path: on_disk.to_owned(),
            kind: special_kind(meta),
        });
    };
    entries.insert(
        relative.to_owned(),
        Entry {
            path: relative.to_owned(),
            kind,
        },
    );
    Ok(())
}

fn special_kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let file_type = meta.file_type();
    if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device"
    } else {
        "special file"
    }
}
