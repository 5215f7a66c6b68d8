//! A commit's tree as a content-addressed manifest (the chunk store's format), with the
//! checks a workspace needs and a blob memo so an unchanged file is never read twice.
//!
//! The walk lists the tree once (`git ls-tree -r -t -l`), checks every path, the file
//! count and the total size *before* reading any blob, then streams only the blobs the
//! [`BlobMemo`] does not know through one `git cat-file --batch`, cutting each into
//! chunks as it arrives. A commit that changes one file of 50,000 reads and chunks one
//! blob.
//!
//! What a workspace cannot hold safely is refused or neutralised, never passed on:
//! - a `.git` component at any level (any case: `.GIT` is the same directory on a
//!   case-insensitive filesystem), `.` or `..`, an empty or non-UTF-8 name: refused,
//!   as git itself refuses to check such a tree out;
//! - `.gitmodules` that is a symlink: refused (git refuses it too);
//! - a symlink whose target leaves the tree (absolute, or `..` past the root, or `..`
//!   after another link): neutralised by default, written as a small regular file that
//!   holds the target text, which is exactly what git does where symlinks are off
//!   (`core.symlinks=false`), so the workspace's `git status` stays clean; or refused,
//!   as the repository configures ([`SymlinkPolicy`]). Neutralising is the default
//!   because real repositories hold absolute links (to `/usr/share/...`, to a build
//!   output) that their jobs never follow, and refusing them would make those
//!   repositories unbuildable while a file holding the text is harmless;
//! - hooks: nothing from the tree ever lands in the workspace's `.git` (that directory
//!   is written by [`crate::workspace`] from the coordinator's payload alone, with no
//!   hooks directory and a config that names no hooks path).
//!
//! Extraction then adds its own guarantees (`gantry_cas::extract`): nothing is written
//! outside the destination whatever the manifest says.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gantry_cas::{chunk_reader, next_cut, Bytes, ChunkRef, Digest, Entry, EntryKind, Manifest};
use serde::{Deserialize, Serialize};

use crate::catfile;
use crate::error::GitError;
use crate::mirror::Mirror;
use crate::oid::ObjectId;
use crate::run::{self, Invocation};
use crate::submodule::{self, Mirrors};

/// Bounds on one checkout (the superproject and its merged submodules together).
#[derive(Debug, Clone)]
pub struct CheckoutLimits {
    /// Bytes of all files together.
    pub max_total_bytes: u64,
    /// Files and symlinks together.
    pub max_files: u64,
    /// Bytes of the longest path (Linux's PATH_MAX is the most a manifest carries).
    pub max_path_bytes: usize,
    /// Most components in a path.
    pub max_depth: usize,
}

impl Default for CheckoutLimits {
    /// 16 GiB in 1,000,000 files, paths up to 4,096 bytes and 128 levels: far past any
    /// source tree we know of (the Linux kernel is ~1.5 GiB in ~90,000 files), short of
    /// what would exhaust a build host's disk or the manifest's own limits.
    fn default() -> Self {
        Self {
            max_total_bytes: 16 * 1024 * 1024 * 1024,
            max_files: 1_000_000,
            max_path_bytes: gantry_cas::MAX_PATH_BYTES,
            max_depth: 128,
        }
    }
}

/// What happens to a symlink whose target leaves the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SymlinkPolicy {
    /// Written as a regular file holding the target text (git's `core.symlinks=false`).
    #[default]
    Neutralise,
    /// The checkout is refused.
    Refuse,
}

/// How to turn a commit into a manifest.
#[derive(Debug, Clone, Default)]
pub struct CheckoutOptions {
    pub limits: CheckoutLimits,
    pub symlinks: SymlinkPolicy,
    /// Merge each submodule's tree at its path (fetching it into its own mirror).
    pub submodules: bool,
}

/// A blob's place in the chunk store: its size and chunks, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunks {
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

/// Remembers which chunks each blob was cut into, so an unchanged blob is not read
/// again. The coordinator backs it with its store; [`MemoryMemo`] is for tests and
/// benchmarks.
///
/// `put` is called once every chunk of the blob has been handed to the chunk sink. The
/// store behind it must not keep an entry whose chunks may not be durable (or were
/// collected since): a memo hit means "these chunks are in the store".
pub trait BlobMemo: Sync {
    fn get(&self, blob: &ObjectId) -> Option<BlobChunks>;
    fn put(&self, blob: &ObjectId, chunks: &BlobChunks);
}

/// A [`BlobMemo`] in memory.
#[derive(Debug, Default)]
pub struct MemoryMemo(Mutex<HashMap<ObjectId, BlobChunks>>);

impl MemoryMemo {
    pub fn len(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl BlobMemo for MemoryMemo {
    fn get(&self, blob: &ObjectId) -> Option<BlobChunks> {
        self.0.lock().ok()?.get(blob).cloned()
    }

    fn put(&self, blob: &ObjectId, chunks: &BlobChunks) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(*blob, chunks.clone());
        }
    }
}

/// A file of the workspace as git's index records it: what the agent writes into the
/// index once the file is on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub path: String,
    /// Git's mode: `0o100644`, `0o100755`, `0o120000` (symlink) or `0o160000`
    /// (submodule commit).
    pub mode: u32,
    pub oid: ObjectId,
}

/// A submodule that was merged into the checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedSubmodule {
    pub path: String,
    pub url: String,
    pub commit: ObjectId,
}

/// What the walk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeFigures {
    pub files: u64,
    pub bytes: u64,
    /// Distinct blobs read and chunked (the memo knew the others).
    pub blobs_read: u64,
    pub blobs_from_memo: u64,
    pub bytes_read: u64,
    /// Chunks handed to the sink (repeats included).
    pub chunks_produced: u64,
    pub list_time: Duration,
    pub read_time: Duration,
}

/// A commit's tree in the chunk store's terms.
#[derive(Debug, Clone)]
pub struct TreeCheckout {
    pub commit: ObjectId,
    pub tree: ObjectId,
    /// The tree to extract (submodules merged if asked).
    pub manifest: Manifest,
    /// The superproject's index, sorted by path: files, symlinks and submodule commits.
    pub index: Vec<IndexEntry>,
    /// Every tree object of the commit, root first (what the workspace's `.git` needs
    /// for `git status`).
    pub trees: Vec<ObjectId>,
    /// Symlinks written as files holding their target (see [`SymlinkPolicy`]).
    pub neutralised: Vec<String>,
    pub submodules: Vec<MergedSubmodule>,
    pub figures: TreeFigures,
}

/// Turns `commit` (already in `mirror`) into a manifest, handing each chunk of each
/// blob the memo does not know to `on_chunk` (repeats included; the sink deduplicates).
/// With `options.submodules`, `mirrors` gives each submodule its own mirror (fetched
/// with the superproject's credentials); without it, submodules stay empty directories.
///
/// A chunk of a large blob shares its 2 MiB read window with its neighbours: a sink
/// that keeps the `Bytes` past its call (to batch writes) keeps the window alive, so
/// it should bound how many it holds.
pub fn checkout_tree<E: std::fmt::Display>(
    mirror: &Mirror,
    commit: ObjectId,
    options: &CheckoutOptions,
    memo: &dyn BlobMemo,
    mirrors: Option<&Mirrors>,
    mut on_chunk: impl FnMut(Digest, &Bytes) -> Result<(), E>,
) -> Result<TreeCheckout, GitError> {
    let mut sink = |blob: &ObjectId, digest: Digest, bytes: &Bytes| {
        on_chunk(digest, bytes).map_err(|e| GitError::Store {
            blob: *blob,
            reason: e.to_string(),
        })
    };
    let mut walk = Walk {
        options,
        memo,
        mirrors,
        entries: BTreeMap::new(),
        neutralised: Vec::new(),
        submodules: Vec::new(),
        figures: TreeFigures::default(),
        files: 0,
        bytes: 0,
    };
    let top = walk.walk(mirror, commit, "", 0, &mut sink)?;
    let manifest = Manifest::new(walk.entries.into_values().collect());
    manifest.validate().map_err(|e| GitError::UnsafePath {
        commit,
        path: String::new(),
        reason: format!("the checkout would not extract safely: {e}"),
    })?;
    let mut figures = walk.figures;
    figures.files = walk.files;
    figures.bytes = walk.bytes;
    Ok(TreeCheckout {
        commit,
        tree: top.tree,
        manifest,
        index: top.index,
        trees: top.trees,
        neutralised: walk.neutralised,
        submodules: walk.submodules,
        figures,
    })
}

/// Blobs up to this size are read whole and cut in place (see the walk); larger ones
/// stream through the chunker's window. Cut points are the same either way.
const SMALL_BLOB: u64 = 2 * gantry_cas::MAX_CHUNK as u64;

/// Submodules nest at most this deep (git has no limit; a cycle of submodules would
/// otherwise never end).
const MAX_SUBMODULE_DEPTH: usize = 8;

struct Walk<'a> {
    options: &'a CheckoutOptions,
    memo: &'a dyn BlobMemo,
    mirrors: Option<&'a Mirrors>,
    entries: BTreeMap<String, Entry>,
    neutralised: Vec<String>,
    submodules: Vec<MergedSubmodule>,
    figures: TreeFigures,
    files: u64,
    bytes: u64,
}

/// One repository's part of the walk.
struct Level {
    tree: ObjectId,
    index: Vec<IndexEntry>,
    trees: Vec<ObjectId>,
}

/// One line of `ls-tree`.
struct Listed {
    mode: u32,
    kind: Kind,
    oid: ObjectId,
    size: u64,
    path: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tree,
    File { executable: bool },
    Symlink,
    Gitlink,
}

impl Walk<'_> {
    fn walk(
        &mut self,
        mirror: &Mirror,
        commit: ObjectId,
        prefix: &str,
        depth: usize,
        sink: &mut dyn FnMut(&ObjectId, Digest, &Bytes) -> Result<(), GitError>,
    ) -> Result<Level, GitError> {
        let started = Instant::now();
        let tree = mirror.resolve_tree(commit)?;
        let listed = list_tree(mirror, commit)?;
        self.figures.list_time += started.elapsed();
        let limits = &self.options.limits;

        // Every check before any blob is read.
        let mut blobs: Vec<ObjectId> = Vec::new();
        let mut symlinks: Vec<ObjectId> = Vec::new();
        let mut trees = vec![tree];
        let mut index = Vec::new();
        let mut gitlinks = Vec::new();
        for item in &listed {
            let full = join(prefix, &item.path);
            check_path(commit, &item.path, &full, limits, item.kind)?;
            match item.kind {
                Kind::Tree => trees.push(item.oid),
                Kind::File { .. } => {
                    self.files += 1;
                    self.bytes += item.size;
                    blobs.push(item.oid);
                }
                Kind::Symlink => {
                    self.files += 1;
                    symlinks.push(item.oid);
                }
                Kind::Gitlink => gitlinks.push(item),
            }
            if self.files > limits.max_files {
                return Err(GitError::TooLarge {
                    commit,
                    what: "the number of files",
                    size: self.files,
                    limit: limits.max_files,
                });
            }
            if self.bytes > limits.max_total_bytes {
                return Err(GitError::TooLarge {
                    commit,
                    what: "the total size of the files (bytes)",
                    size: self.bytes,
                    limit: limits.max_total_bytes,
                });
            }
            if !matches!(item.kind, Kind::Tree) {
                index.push(IndexEntry {
                    path: item.path.clone(),
                    mode: item.mode,
                    oid: item.oid,
                });
            }
        }

        // Symlink targets (small; read whole).
        symlinks.sort_unstable();
        symlinks.dedup();
        let targets: HashMap<ObjectId, Vec<u8>> = catfile::read_small(
            mirror.git(),
            mirror.dir(),
            &format!(
                "reading symlinks of {} ({})",
                commit.short(),
                mirror.remote().url()
            ),
            &symlinks,
            gantry_cas::MAX_PATH_BYTES as u64 * 2,
            mirror.options().local_deadline,
        )?
        .into_iter()
        .map(|(header, data)| (header.oid, data))
        .collect();

        // Blobs the memo does not know, each read once.
        let read_started = Instant::now();
        let mut known: HashMap<ObjectId, BlobChunks> = HashMap::new();
        let mut to_read = Vec::new();
        blobs.sort_unstable();
        blobs.dedup();
        for blob in blobs {
            match self.memo.get(&blob) {
                Some(chunks) => {
                    self.figures.blobs_from_memo += 1;
                    known.insert(blob, chunks);
                }
                None => to_read.push(blob),
            }
        }
        // Read in path order: git packs a tree's blobs near each other.
        let order: HashMap<ObjectId, usize> = listed
            .iter()
            .enumerate()
            .map(|(i, item)| (item.oid, i))
            .collect();
        to_read.sort_by_key(|oid| order.get(oid).copied().unwrap_or(usize::MAX));
        let figures = &mut self.figures;
        let memo = self.memo;
        catfile::stream_objects(
            mirror.git(),
            mirror.dir(),
            &format!(
                "reading the files of {} ({})",
                commit.short(),
                mirror.remote().url()
            ),
            &to_read,
            mirror.options().local_deadline,
            |header, body| {
                let mut chunks = Vec::new();
                let mut size = 0u64;
                let mut emit = |digest: Digest, data: &Bytes| -> Result<(), GitError> {
                    sink(&header.oid, digest, data)?;
                    figures.chunks_produced += 1;
                    size += data.len() as u64;
                    chunks.push(ChunkRef {
                        digest,
                        // Chunks are at most MAX_CHUNK (256 KiB): fits.
                        size: data.len() as u32,
                    });
                    Ok(())
                };
                if header.size <= SMALL_BLOB {
                    // A small blob is read into a buffer of its own size: cut from the
                    // chunker's 2 MiB read window, each of 50,000 small files would
                    // keep a window alive for as long as the sink holds its chunk.
                    let mut data = Vec::with_capacity(header.size as usize);
                    body.read_to_end(&mut data)
                        .map_err(GitError::io(format!("reading blob {}", header.oid)))?;
                    let data = Bytes::from(data);
                    let mut at = 0;
                    while at < data.len() {
                        let cut = next_cut(&data[at..]).max(1).min(data.len() - at);
                        let chunk = data.slice(at..at + cut);
                        emit(Digest::of(&chunk), &chunk)?;
                        at += cut;
                    }
                } else {
                    let mut reader = chunk_reader(body);
                    while let Some(chunk) = reader.next_chunk() {
                        let (digest, data) = chunk.map_err(|e| GitError::Parse {
                            what: format!("reading blob {}", header.oid),
                            detail: e.to_string(),
                        })?;
                        emit(digest, &data)?;
                    }
                }
                if size != header.size {
                    return Err(GitError::Parse {
                        what: format!("reading blob {}", header.oid),
                        detail: format!("git announced {} bytes and sent {size}", header.size),
                    });
                }
                let blob = BlobChunks { size, chunks };
                memo.put(&header.oid, &blob);
                figures.blobs_read += 1;
                figures.bytes_read += size;
                known.insert(header.oid, blob);
                Ok(())
            },
        )?;
        self.figures.read_time += read_started.elapsed();

        // The manifest's entries.
        let link_paths: std::collections::HashSet<String> = listed
            .iter()
            .filter(|item| item.kind == Kind::Symlink)
            .map(|item| join(prefix, &item.path))
            .collect();
        for item in &listed {
            let full = join(prefix, &item.path);
            let kind = match item.kind {
                Kind::Tree | Kind::Gitlink => EntryKind::Dir { mode: 0o755 },
                Kind::File { executable } => {
                    let Some(blob) = known.get(&item.oid) else {
                        return Err(GitError::Parse {
                            what: format!("checking out {}", commit.short()),
                            detail: format!("blob {} of `{full}` was not read", item.oid),
                        });
                    };
                    EntryKind::File {
                        mode: if executable { 0o755 } else { 0o644 },
                        size: blob.size,
                        chunks: blob.chunks.clone(),
                    }
                }
                Kind::Symlink => {
                    let target = targets.get(&item.oid).cloned().unwrap_or_default();
                    self.symlink_entry(commit, &full, target, &link_paths, sink, item.oid)?
                }
            };
            self.entries
                .insert(full.clone(), Entry { path: full, kind });
        }

        // Submodules, merged at their paths.
        if self.options.submodules && !gitlinks.is_empty() {
            if depth >= MAX_SUBMODULE_DEPTH {
                return Err(GitError::Submodule {
                    commit,
                    path: prefix.to_owned(),
                    reason: format!("submodules nest more than {MAX_SUBMODULE_DEPTH} deep"),
                });
            }
            let Some(mirrors) = self.mirrors else {
                return Err(GitError::Config(
                    "submodules were asked for but no mirror directory for them was given".into(),
                ));
            };
            let declared = submodule::declared(mirror, commit)?;
            for link in gitlinks {
                let Some(url) = declared.get(&link.path) else {
                    return Err(GitError::Submodule {
                        commit,
                        path: join(prefix, &link.path),
                        reason: "has no URL in .gitmodules".into(),
                    });
                };
                let sub_mirror =
                    mirrors
                        .for_submodule(mirror, url)
                        .map_err(|e| GitError::Submodule {
                            commit,
                            path: join(prefix, &link.path),
                            reason: e.to_string(),
                        })?;
                sub_mirror.ensure_commit(link.oid)?;
                let full = join(prefix, &link.path);
                self.walk(&sub_mirror, link.oid, &full, depth + 1, sink)?;
                self.submodules.push(MergedSubmodule {
                    path: full,
                    url: sub_mirror.remote().url().to_owned(),
                    commit: link.oid,
                });
            }
        }
        Ok(Level { tree, index, trees })
    }

    /// A symlink's entry: kept if its target stays in the tree, otherwise neutralised
    /// (a file holding the target) or refused.
    fn symlink_entry(
        &mut self,
        commit: ObjectId,
        full: &str,
        target: Vec<u8>,
        link_paths: &std::collections::HashSet<String>,
        sink: &mut dyn FnMut(&ObjectId, Digest, &Bytes) -> Result<(), GitError>,
        oid: ObjectId,
    ) -> Result<EntryKind, GitError> {
        let problem = match std::str::from_utf8(&target) {
            Ok(text) => symlink_problem(full, text, link_paths),
            Err(_) => Some("its target is not UTF-8"),
        };
        let Some(problem) = problem else {
            let target = String::from_utf8(target).unwrap_or_default();
            return Ok(EntryKind::Symlink { target });
        };
        match self.options.symlinks {
            SymlinkPolicy::Refuse => Err(GitError::UnsafePath {
                commit,
                path: full.to_owned(),
                reason: format!(
                    "symlink to `{}`: {problem}",
                    String::from_utf8_lossy(&target)
                ),
            }),
            SymlinkPolicy::Neutralise => {
                self.neutralised.push(full.to_owned());
                let data = Bytes::from(target);
                let mut chunks = Vec::new();
                if !data.is_empty() {
                    let digest = Digest::of(&data);
                    sink(&oid, digest, &data)?;
                    self.figures.chunks_produced += 1;
                    chunks.push(ChunkRef {
                        digest,
                        size: data.len() as u32,
                    });
                }
                Ok(EntryKind::File {
                    mode: 0o644,
                    size: data.len() as u64,
                    chunks,
                })
            }
        }
    }
}

impl Mirror {
    /// The tree of a commit.
    pub(crate) fn resolve_tree(&self, commit: ObjectId) -> Result<ObjectId, GitError> {
        let out = self.local(
            "reading a commit's tree",
            &[
                "rev-parse",
                "--verify",
                "--end-of-options",
                &format!("{commit}^{{tree}}"),
            ],
        )?;
        ObjectId::from_hex_bytes(out.trim_ascii()).ok_or_else(|| GitError::Parse {
            what: "reading a commit's tree".into(),
            detail: String::from_utf8_lossy(&out).into_owned(),
        })
    }
}

fn join(prefix: &str, path: &str) -> String {
    if prefix.is_empty() {
        path.to_owned()
    } else {
        format!("{prefix}/{path}")
    }
}

/// `git ls-tree -r -t -l -z` of a commit, parsed.
fn list_tree(mirror: &Mirror, commit: ObjectId) -> Result<Vec<Listed>, GitError> {
    let what = format!(
        "listing the tree of {} ({})",
        commit.short(),
        mirror.remote().url()
    );
    let out = run::run_ok(
        mirror.git(),
        Invocation::new(
            what.clone(),
            Some(mirror.dir()),
            mirror.options().local_deadline,
        )
        .args([
            "ls-tree",
            "-r",
            "-t",
            "-l",
            "-z",
            "--full-tree",
            "--end-of-options",
        ])
        .arg(commit.to_string()),
    )?;
    let mut listed = Vec::new();
    for record in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let bad = || GitError::Parse {
            what: what.clone(),
            detail: format!("unexpected line `{}`", String::from_utf8_lossy(record)),
        };
        let tab = record.iter().position(|b| *b == b'\t').ok_or_else(bad)?;
        let (meta, path) = (&record[..tab], &record[tab + 1..]);
        let meta = std::str::from_utf8(meta).map_err(|_| bad())?;
        let mut fields = meta.split_ascii_whitespace();
        let (Some(mode), Some(kind), Some(oid), Some(size)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        let mode = u32::from_str_radix(mode, 8).map_err(|_| bad())?;
        let oid = ObjectId::from_hex(oid).ok_or_else(bad)?;
        let path = String::from_utf8(path.to_vec()).map_err(|_| GitError::UnsafePath {
            commit,
            path: String::from_utf8_lossy(path).into_owned(),
            reason: "the name is not UTF-8; workspaces hold UTF-8 paths only".into(),
        })?;
        let kind = match (kind, mode) {
            ("tree", _) => Kind::Tree,
            ("commit", _) => Kind::Gitlink,
            ("blob", 0o120_000) => Kind::Symlink,
            ("blob", 0o100_755) => Kind::File { executable: true },
            ("blob", _) => Kind::File { executable: false },
            _ => return Err(bad()),
        };
        // Git's canonical modes; 100664 and the like (old git) read as 100644.
        let mode = match kind {
            Kind::Tree => 0o040_000,
            Kind::Gitlink => 0o160_000,
            Kind::Symlink => 0o120_000,
            Kind::File { executable: true } => 0o100_755,
            Kind::File { executable: false } => 0o100_644,
        };
        let size = if matches!(kind, Kind::File { .. } | Kind::Symlink) {
            size.parse().map_err(|_| bad())?
        } else {
            0
        };
        listed.push(Listed {
            mode,
            kind,
            oid,
            size,
            path,
        });
    }
    Ok(listed)
}

/// Refuses a path a workspace must not hold.
fn check_path(
    commit: ObjectId,
    path: &str,
    full: &str,
    limits: &CheckoutLimits,
    kind: Kind,
) -> Result<(), GitError> {
    let refuse = |reason: String| {
        Err(GitError::UnsafePath {
            commit,
            path: full.to_owned(),
            reason,
        })
    };
    if full.len() > limits.max_path_bytes {
        return refuse(format!(
            "the path is {} bytes, more than the limit of {}",
            full.len(),
            limits.max_path_bytes
        ));
    }
    let depth = full.split('/').count();
    if depth > limits.max_depth {
        return refuse(format!(
            "the path is {depth} levels deep, more than the limit of {}",
            limits.max_depth
        ));
    }
    for component in path.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return refuse(format!("it has a `{component}` component"));
        }
        if component.contains('\0') {
            return refuse("it contains a NUL byte".into());
        }
        if is_dot_git(component) {
            return refuse(
                "a committed `.git` would let the tree replace the workspace's repository (its config, its hooks); git refuses to check it out too".into(),
            );
        }
        if component.len() > gantry_cas::MAX_COMPONENT_BYTES {
            return refuse(format!(
                "a name is longer than {} bytes",
                gantry_cas::MAX_COMPONENT_BYTES
            ));
        }
    }
    if kind == Kind::Symlink && path.eq_ignore_ascii_case(".gitmodules") {
        return refuse("`.gitmodules` is a symlink, which git refuses too".into());
    }
    Ok(())
}

/// `.git` in any case, and the forms Windows and macOS filesystems read as `.git`
/// (trailing dots and spaces), which git refuses as well.
fn is_dot_git(component: &str) -> bool {
    component
        .trim_end_matches(['.', ' '])
        .eq_ignore_ascii_case(".git")
        || component.eq_ignore_ascii_case("git~1")
}

/// Why a symlink's target leaves the tree, resolved lexically from the link's
/// directory (the rules `gantry_cas` validates manifests by), or `None` if it stays.
fn symlink_problem(
    path: &str,
    target: &str,
    link_paths: &std::collections::HashSet<String>,
) -> Option<&'static str> {
    use gantry_cas::SymlinkProblem as P;
    let checked = gantry_cas::check_symlink_target(
        path,
        target,
        |resolved| link_paths.contains(resolved),
        |name| {
            if is_dot_git(name) {
                Err(LinkProblem::IntoDotGit)
            } else {
                Ok(())
            }
        },
    );
    Some(match checked.err()? {
        LinkProblem::IntoDotGit => "the target points into `.git`",
        LinkProblem::Cas(P::Empty) => "the target is empty",
        LinkProblem::Cas(P::Nul) => "the target contains a NUL byte",
        LinkProblem::Cas(P::Absolute) => "the target is absolute, outside the workspace",
        LinkProblem::Cas(P::TooLong) => "the target is too long",
        LinkProblem::Cas(P::DotDotAfterSymlink) => {
            "the target goes through another symlink and then `..`, which cannot be checked"
        }
        LinkProblem::Cas(P::Escapes) => "the target leaves the workspace",
    })
}

/// A symlink target refused by `gantry_cas`'s rules, or by the workspace's own: no `.git`.
enum LinkProblem {
    Cas(gantry_cas::SymlinkProblem),
    IntoDotGit,
}

impl From<gantry_cas::SymlinkProblem> for LinkProblem {
    fn from(problem: gantry_cas::SymlinkProblem) -> Self {
        LinkProblem::Cas(problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_git_in_any_disguise_is_recognised() {
        for name in [".git", ".GIT", ".Git", ".git.", ".git ", "git~1"] {
            assert!(is_dot_git(name), "{name}");
        }
        for name in [".github", ".gitignore", "git", ".gitmodules"] {
            assert!(!is_dot_git(name), "{name}");
        }
    }

    #[test]
    fn symlinks_leaving_the_tree_are_found() {
        let entries = std::collections::HashSet::from(["a/up".to_owned()]);
        assert!(symlink_problem("a/l", "up/../x", &entries).is_some());
        assert_eq!(symlink_problem("a/l", "../b", &entries), None);
        assert_eq!(symlink_problem("a/l", "x/y", &entries), None);
        assert!(symlink_problem("a/l", "../../b", &entries).is_some());
        assert!(symlink_problem("l", "/etc/passwd", &entries).is_some());
        assert!(symlink_problem("l", ".git/config", &entries).is_some());
    }
}
