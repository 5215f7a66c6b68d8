//! The coordinator's half of a workspace's `.git`: everything the agent needs to write a
//! shallow repository beside the extracted files, and nothing it can get elsewhere.
//!
//! Design for bytes on the wire: the blobs are already in the workspace (they came
//! through the chunk store), so the payload carries only
//! - a pack (`git pack-objects`, with its `.idx`) of the commits within the depth, every
//!   tree of the built commit, and the annotated tags that point into those commits;
//! - the refs (the branch being built, `refs/remotes/origin/<branch>`, tags on the
//!   included commits), `shallow` (the commits whose parents were left out) and HEAD;
//! - the index's recipe (path, mode, blob id of every file, prefix-compressed: ~25 bytes
//!   a file), from which the agent writes the index with the stat data of the files as
//!   materialised, so `git status` is clean without hashing a single file;
//! - a config that names the repository's URL without credentials, marks the pack as a
//!   promisor pack (a partial clone with `blob:none`, so git knows the missing blobs of
//!   older commits are missing on purpose and `git fsck`/`gc` do not call the repository
//!   corrupt) and sets `core.symlinks=false` when a symlink was neutralised.
//!
//! For 50,000 files in ~2,500 directories that is ~1 MiB of recipe and ~1-2 MiB of pack;
//! shipped through the chunk store as one file, a one-file commit re-sends a few chunks
//! of the recipe (its entries keep their order) and the pack.

use std::fmt::Write as _;
use std::io::Write as _;
use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use crate::catfile;
use crate::error::GitError;
use crate::mirror::Mirror;
use crate::oid::ObjectId;
use crate::run::{self, Invocation};
use crate::tree::{IndexEntry, TreeCheckout};

/// Format version of [`GitPayload::encode`].
pub const PAYLOAD_VERSION: u8 = 1;

/// Largest encoded payload [`GitPayload::decode`] accepts (512 MiB: a pack of every
/// commit of a very long history).
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024 * 1024;

/// How much history the workspace's `.git` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Depth {
    /// The built commit and its ancestors up to this many commits deep (`git clone
    /// --depth N`): `1` is the commit alone.
    Commits(NonZeroU32),
    /// Every commit (no `shallow` file). Older commits' trees are not carried.
    Full,
}

/// What to build the `.git` for.
#[derive(Debug, Clone)]
pub struct PayloadRequest<'a> {
    /// The walked tree of the built commit ([`crate::checkout_tree`]).
    pub checkout: &'a TreeCheckout,
    pub depth: Depth,
    /// The ref being built (`refs/heads/main`: HEAD is that branch; anything else,
    /// a tag or a pull request's ref, or `None`: HEAD is detached at the commit).
    pub reference: Option<&'a str>,
    /// The URL the workspace's `origin` names (the repository's, with no credentials);
    /// `None` leaves the workspace without a remote.
    pub remote_url: Option<&'a str>,
}

/// The `.git` of a workspace, as the coordinator sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitPayload {
    pub head: ObjectId,
    /// The branch HEAD names (`refs/heads/...`), or `None` for a detached HEAD.
    pub head_ref: Option<String>,
    /// Refs for `packed-refs`, sorted by name, each with its peeled commit if it is an
    /// annotated tag.
    pub refs: Vec<PackedRef>,
    pub shallow: Vec<ObjectId>,
    /// The pack's name (`pack-<name>.pack`), its bytes and its index.
    pub pack_name: String,
    #[serde(with = "serde_bytes")]
    pub pack: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub pack_index: Vec<u8>,
    /// The text of `.git/config`.
    pub config: String,
    /// The index's entries, sorted by path, prefix-compressed ([`encode_index`]).
    #[serde(with = "serde_bytes")]
    pub index: Vec<u8>,
}

/// One line of `packed-refs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedRef {
    pub name: String,
    pub target: ObjectId,
    pub peeled: Option<ObjectId>,
}

/// What producing a payload measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PayloadFigures {
    pub commits: u64,
    pub trees: u64,
    pub tags: u64,
    pub pack_bytes: u64,
    pub index_bytes: u64,
}

#[derive(Serialize)]
struct WireRef<'a> {
    version: u8,
    payload: &'a GitPayload,
}

#[derive(Deserialize)]
struct Wire {
    version: u8,
    payload: GitPayload,
}

impl GitPayload {
    /// The bytes to ship (a version byte, then the payload).
    pub fn encode(&self) -> Vec<u8> {
        // postcard cannot fail on these types (no maps, known lengths).
        postcard::to_stdvec(&WireRef {
            version: PAYLOAD_VERSION,
            payload: self,
        })
        .unwrap_or_default()
    }

    /// Decodes bytes made by [`GitPayload::encode`], bounded and version-checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, GitError> {
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(GitError::Payload(format!(
                "the .git payload is {} bytes, more than the limit of {MAX_PAYLOAD_BYTES}",
                bytes.len()
            )));
        }
        match bytes.first() {
            Some(&PAYLOAD_VERSION) => {}
            Some(other) => {
                return Err(GitError::Payload(format!(
                    "the .git payload has format version {other}; this build reads version {PAYLOAD_VERSION}"
                )))
            }
            None => return Err(GitError::Payload("the .git payload is empty".into())),
        }
        let wire: Wire = postcard::from_bytes(bytes)
            .map_err(|e| GitError::Payload(format!("the .git payload is not valid: {e}")))?;
        debug_assert_eq!(wire.version, PAYLOAD_VERSION);
        Ok(wire.payload)
    }
}

/// Builds the `.git` payload for a walked commit: the commits within `depth`, the
/// commit's trees and the tags that point into those commits, packed by `git
/// pack-objects`.
pub fn build_payload(
    mirror: &Mirror,
    request: &PayloadRequest<'_>,
) -> Result<(GitPayload, PayloadFigures), GitError> {
    let head = request.checkout.commit;
    let (commits, shallow) = history(mirror, head, request.depth)?;
    let in_history: std::collections::HashSet<ObjectId> = commits.iter().copied().collect();

    let head_ref = match request.reference {
        Some(name) if name.starts_with("refs/heads/") => Some(crate::mirror::full_ref_name(name)?),
        _ => None,
    };
    let mut refs: Vec<PackedRef> = Vec::new();
    if let Some(branch) = &head_ref {
        refs.push(PackedRef {
            name: branch.clone(),
            target: head,
            peeled: None,
        });
        refs.push(PackedRef {
            name: format!(
                "refs/remotes/origin/{}",
                branch.trim_start_matches("refs/heads/")
            ),
            target: head,
            peeled: None,
        });
    }
    let mut tag_objects = Vec::new();
    for entry in mirror.refs()? {
        if !entry.name.starts_with("refs/tags/") {
            continue;
        }
        let points_at = if entry.is_tag_object {
            entry.peeled
        } else {
            Some(entry.target)
        };
        if points_at.is_some_and(|c| in_history.contains(&c)) {
            if entry.is_tag_object {
                tag_objects.push(entry.target);
            }
            refs.push(PackedRef {
                name: entry.name,
                target: entry.target,
                peeled: entry.is_tag_object.then_some(points_at).flatten(),
            });
        }
    }
    refs.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    refs.dedup_by(|a, b| a.name == b.name);

    let mut objects: Vec<ObjectId> = Vec::new();
    objects.extend(&commits);
    objects.extend(&request.checkout.trees);
    objects.extend(&tag_objects);
    let (pack_name, pack, pack_index) = pack_objects(mirror, &objects)?;

    let neutralised = !request.checkout.neutralised.is_empty();
    let config = config_text(request.remote_url, head_ref.as_deref(), neutralised)?;
    let index = encode_index(&request.checkout.index);
    let figures = PayloadFigures {
        commits: commits.len() as u64,
        trees: request.checkout.trees.len() as u64,
        tags: tag_objects.len() as u64,
        pack_bytes: (pack.len() + pack_index.len()) as u64,
        index_bytes: index.len() as u64,
    };
    Ok((
        GitPayload {
            head,
            head_ref,
            refs,
            shallow,
            pack_name,
            pack,
            pack_index,
            config,
            index,
        },
        figures,
    ))
}

/// The commits within `depth` of `head` and the shallow boundary (included commits
/// with a parent left out), walking parents breadth first as `git clone --depth` does.
fn history(
    mirror: &Mirror,
    head: ObjectId,
    depth: Depth,
) -> Result<(Vec<ObjectId>, Vec<ObjectId>), GitError> {
    if depth == Depth::Full {
        let out = mirror.local("listing history", &["rev-list", &head.to_string()])?;
        let commits = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                ObjectId::from_hex_bytes(l).ok_or_else(|| GitError::Parse {
                    what: "listing history".into(),
                    detail: String::from_utf8_lossy(l).into_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((commits, Vec::new()));
    }
    let Depth::Commits(limit) = depth else {
        return Ok((vec![head], Vec::new()));
    };
    let mut seen = std::collections::HashSet::from([head]);
    let mut commits = vec![head];
    let mut level = vec![head];
    let mut shallow = Vec::new();
    for distance in 0..limit.get() {
        let last_level = distance + 1 == limit.get();
        let read = catfile::read_small(
            mirror.git(),
            mirror.dir(),
            &format!(
                "reading history of {} ({})",
                head.short(),
                mirror.remote().url()
            ),
            &level,
            16 * 1024 * 1024,
            mirror.options().local_deadline,
        )?;
        let mut next = Vec::new();
        for (header, body) in read {
            let parents = parents_of(&body);
            if last_level {
                if !parents.is_empty() {
                    shallow.push(header.oid);
                }
                continue;
            }
            for parent in parents {
                if seen.insert(parent) {
                    commits.push(parent);
                    next.push(parent);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    shallow.sort();
    Ok((commits, shallow))
}

/// The `parent` lines of a commit object's header.
fn parents_of(body: &[u8]) -> Vec<ObjectId> {
    let mut parents = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        if line.is_empty() {
            break;
        }
        if let Some(hex) = line.strip_prefix(b"parent ") {
            if let Some(oid) = ObjectId::from_hex_bytes(hex) {
                parents.push(oid);
            }
        }
    }
    parents
}

/// Packs exactly `objects` (no traversal) and returns the pack's name, bytes and index.
fn pack_objects(
    mirror: &Mirror,
    objects: &[ObjectId],
) -> Result<(String, Vec<u8>, Vec<u8>), GitError> {
    let scratch = tempfile::Builder::new()
        .prefix("gantry-pack-")
        .tempdir()
        .map_err(GitError::io("making a directory for the workspace pack"))?;
    let base = scratch.path().join("pack");
    let mut list = Vec::with_capacity(objects.len() * 41);
    for oid in objects {
        writeln!(list, "{oid}").map_err(GitError::io("listing objects"))?;
    }
    let mut inv = Invocation::new(
        format!("packing the workspace's .git ({})", mirror.remote().url()),
        Some(mirror.dir()),
        mirror.options().local_deadline,
    )
    .args(["pack-objects", "--quiet"])
    .arg(&base);
    inv.stdin = Some(list);
    let out = run::run_ok(mirror.git(), inv)?;
    let name = String::from_utf8_lossy(out.trim_ascii()).into_owned();
    if name.len() != 40 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(GitError::Parse {
            what: "packing the workspace's .git".into(),
            detail: format!("pack name `{name}`"),
        });
    }
    let pack_path = scratch.path().join(format!("pack-{name}.pack"));
    let idx_path = scratch.path().join(format!("pack-{name}.idx"));
    let pack = std::fs::read(&pack_path).map_err(GitError::file("reading the pack", &pack_path))?;
    let idx =
        std::fs::read(&idx_path).map_err(GitError::file("reading the pack index", &idx_path))?;
    Ok((name, pack, idx))
}

/// A config value in double quotes (git's escapes); control characters refused.
fn quoted(value: &str) -> Result<String, GitError> {
    if value.chars().any(char::is_control) {
        return Err(GitError::Config(format!(
            "{value:?} has a control character and cannot go into a git config"
        )));
    }
    Ok(format!(
        "\"{}\"",
        value.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// The workspace's `.git/config`.
fn config_text(
    remote_url: Option<&str>,
    branch: Option<&str>,
    symlinks_neutralised: bool,
) -> Result<String, GitError> {
    let mut text = String::new();
    let version = u8::from(remote_url.is_some());
    let _ = write!(
        text,
        "[core]\n\trepositoryformatversion = {version}\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n"
    );
    if symlinks_neutralised {
        text.push_str("\tsymlinks = false\n");
    }
    if let Some(url) = remote_url {
        let url = crate::remote::redact(url);
        let _ = write!(
            text,
            "[remote \"origin\"]\n\turl = {}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n\tpromisor = true\n\tpartialclonefilter = blob:none\n[extensions]\n\tpartialclone = origin\n",
            quoted(&url)?
        );
        if let Some(branch) = branch {
            let short = branch.trim_start_matches("refs/heads/");
            let _ = write!(
                text,
                "[branch {}]\n\tremote = origin\n\tmerge = {}\n",
                quoted(short)?,
                quoted(branch)?
            );
        }
    }
    Ok(text)
}

/// Encodes index entries (sorted by path) compactly: per entry the length of the
/// prefix shared with the previous path, the rest of the path, the mode and the id.
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 32);
    write_varint(&mut out, entries.len() as u64);
    let mut previous: &[u8] = b"";
    for entry in entries {
        let path = entry.path.as_bytes();
        let shared = previous
            .iter()
            .zip(path)
            .take_while(|(a, b)| a == b)
            .count();
        write_varint(&mut out, shared as u64);
        write_varint(&mut out, (path.len() - shared) as u64);
        out.extend_from_slice(&path[shared..]);
        write_varint(&mut out, u64::from(entry.mode));
        out.extend_from_slice(entry.oid.as_bytes());
        previous = path;
    }
    out
}

/// Decodes [`encode_index`]'s bytes, refusing anything malformed.
pub fn decode_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, GitError> {
    let bad =
        |what: &str| GitError::Payload(format!("the .git payload's index is malformed: {what}"));
    let mut at = 0usize;
    let count = read_varint(bytes, &mut at).ok_or_else(|| bad("no entry count"))?;
    // Every entry takes at least 23 bytes: the count cannot promise more than that.
    if count > (bytes.len() / 23) as u64 + 1 {
        return Err(bad("the entry count exceeds the bytes"));
    }
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(count as usize);
    let mut previous: Vec<u8> = Vec::new();
    for _ in 0..count {
        let shared = read_varint(bytes, &mut at).ok_or_else(|| bad("truncated"))? as usize;
        let rest = read_varint(bytes, &mut at).ok_or_else(|| bad("truncated"))? as usize;
        if shared > previous.len() || rest > gantry_cas::MAX_PATH_BYTES {
            return Err(bad("a path length is out of range"));
        }
        let suffix = bytes.get(at..at + rest).ok_or_else(|| bad("truncated"))?;
        at += rest;
        let mut path = previous[..shared].to_vec();
        path.extend_from_slice(suffix);
        let mode = read_varint(bytes, &mut at).ok_or_else(|| bad("truncated"))?;
        let oid = bytes.get(at..at + 20).ok_or_else(|| bad("truncated"))?;
        at += 20;
        let mut id = [0u8; 20];
        id.copy_from_slice(oid);
        let text = String::from_utf8(path.clone()).map_err(|_| bad("a path is not UTF-8"))?;
        if path <= previous && !entries.is_empty() {
            return Err(bad("paths are not sorted"));
        }
        entries.push(IndexEntry {
            path: text,
            mode: u32::try_from(mode).map_err(|_| bad("a mode is out of range"))?,
            oid: ObjectId(id),
        });
        previous = path;
    }
    if at != bytes.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(entries)
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in 0..10 {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f).checked_shl(7 * shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_recipe_round_trips_and_refuses_garbage() {
        let entries = vec![
            IndexEntry {
                path: "a/b.txt".into(),
                mode: 0o100_644,
                oid: ObjectId([1; 20]),
            },
            IndexEntry {
                path: "a/c.sh".into(),
                mode: 0o100_755,
                oid: ObjectId([2; 20]),
            },
            IndexEntry {
                path: "z".into(),
                mode: 0o120_000,
                oid: ObjectId([3; 20]),
            },
        ];
        let bytes = encode_index(&entries);
        assert_eq!(decode_index(&bytes).expect("decodes"), entries);
        assert!(decode_index(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_index(&longer).is_err());
        assert!(decode_index(&[0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    #[test]
    fn config_values_cannot_inject_sections() {
        assert!(config_text(Some("https://h/r\n[core]\n\thooksPath=/tmp"), None, false).is_err());
        let text =
            config_text(Some("https://h/r\"x"), Some("refs/heads/m\"a"), true).expect("config");
        assert!(text.contains("url = \"https://h/r\\\"x\""), "{text}");
        assert!(text.contains("symlinks = false"), "{text}");
    }
}
