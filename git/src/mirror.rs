//! Bare mirrors on the coordinator: one per repository URL, fetched incrementally.
//!
//! A mirror is a bare repository whose `origin` is the repository's URL as configured
//! (never with credentials: those come from [`Remote`] on each call). It holds the
//! server's branches and tags under the same names (`refs/heads/*`, `refs/tags/*`);
//! other refs (pull-request heads) are fetched by name when a run needs them.
//!
//! Callers serialise calls that write one mirror (two fetches into one mirror at once
//! race for git's ref locks); reads may run beside a fetch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::GitError;
use crate::oid::ObjectId;
use crate::remote::{Remote, Transport};
use crate::run::{self, GitProgram, Invocation};

/// Deadlines of a mirror's git invocations.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// A fetch from the server (network bound; a first fetch of a large repository).
    pub fetch_deadline: Duration,
    /// Reading the mirror (resolving a ref, listing a tree, reading a file).
    pub local_deadline: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        Self {
            fetch_deadline: Duration::from_secs(30 * 60),
            local_deadline: Duration::from_secs(10 * 60),
        }
    }
}

/// What to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// Every branch and tag; branches and tags deleted on the server go too.
    All,
    /// One ref: a full name (`refs/heads/main`, `refs/tags/v1`, `refs/pull/7/head`) or
    /// a branch name (`main`, taken as `refs/heads/main`).
    Ref(String),
    /// One commit by id (servers allow this for reachable commits).
    Commit(ObjectId),
}

/// A bare mirror of one repository.
#[derive(Debug, Clone)]
pub struct Mirror {
    git: GitProgram,
    dir: PathBuf,
    remote: Remote,
    options: MirrorOptions,
}

impl Mirror {
    /// Opens the mirror at `dir`, creating it (a bare repository) if it does not exist,
    /// and points its `origin` at `remote`'s URL. Refuses a SHA-256 repository.
    pub fn open(
        git: GitProgram,
        dir: impl Into<PathBuf>,
        remote: Remote,
        options: MirrorOptions,
    ) -> Result<Self, GitError> {
        let dir = dir.into();
        let mirror = Self {
            git,
            dir,
            remote,
            options,
        };
        if !mirror.dir.join("HEAD").exists() {
            std::fs::create_dir_all(&mirror.dir)
                .map_err(GitError::file("creating the mirror directory", &mirror.dir))?;
            run::run_ok(
                &mirror.git,
                Invocation::new(
                    format!("creating the mirror of {}", mirror.remote.url()),
                    Some(&mirror.dir),
                    mirror.options.local_deadline,
                )
                .args(["init", "--quiet", "--bare", "--object-format=sha1"]),
            )?;
        }
        let format = mirror.local(
            "reading the mirror's object format",
            &["rev-parse", "--show-object-format"],
        )?;
        if format.trim_ascii() != b"sha1" {
            return Err(GitError::Config(format!(
                "the mirror of {} uses object format {}; only sha1 repositories are supported",
                mirror.remote.url(),
                String::from_utf8_lossy(format.trim_ascii())
            )));
        }
        mirror.local(
            "setting the mirror's origin",
            &["config", "remote.origin.url", mirror.remote.url()],
        )?;
        Ok(mirror)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    pub(crate) fn git(&self) -> &GitProgram {
        &self.git
    }

    pub(crate) fn options(&self) -> &MirrorOptions {
        &self.options
    }

    /// A local (no network) git invocation in the mirror, named `what (url)`.
    fn local_invocation(&self, what: &str) -> Invocation<'_> {
        Invocation::new(
            format!("{what} ({})", self.remote.url()),
            Some(&self.dir),
            self.options.local_deadline,
        )
    }

    /// Runs a local (no network) git command in the mirror and returns its output.
    pub(crate) fn local(&self, what: &str, args: &[&str]) -> Result<Vec<u8>, GitError> {
        run::run_ok(&self.git, self.local_invocation(what).args(args))
    }

    /// Fetches from the server. Errors say what failed in one line: unreachable,
    /// authentication refused, host key not trusted, repository or ref not found,
    /// commit not found, deadline passed.
    pub fn fetch(&self, what: &Fetch) -> Result<(), GitError> {
        let mut args: Vec<String> = vec![
            "fetch".into(),
            "--quiet".into(),
            "--no-tags".into(),
            "--no-write-fetch-head".into(),
            "--no-recurse-submodules".into(),
        ];
        let reference = match what {
            Fetch::All => {
                args.push("--prune".into());
                args.push("origin".into());
                args.push("+refs/heads/*:refs/heads/*".into());
                args.push("+refs/tags/*:refs/tags/*".into());
                None
            }
            Fetch::Ref(name) => {
                let full = full_ref_name(name)?;
                args.push("origin".into());
                args.push(format!("+{full}:{full}"));
                Some(full)
            }
            Fetch::Commit(commit) => {
                args.push("origin".into());
                args.push(commit.to_string());
                Some(commit.to_string())
            }
        };
        let description = match what {
            Fetch::All => format!("fetching {}", self.remote.url()),
            Fetch::Ref(_) | Fetch::Commit(_) => format!(
                "fetching {} from {}",
                reference.as_deref().unwrap_or_default(),
                self.remote.url()
            ),
        };
        let allow_local = self.remote.transport() == Transport::Local;
        let (config, env) = self.remote.git_environment(allow_local);
        let mut inv = Invocation::new(
            description.clone(),
            Some(&self.dir),
            self.options.fetch_deadline,
        )
        .args(&args);
        inv.config = config;
        inv.extra_env = env;
        let finished = run::run(&self.git, inv)?;
        if finished.status.success() {
            return Ok(());
        }
        let stderr = self.remote.scrub(&finished.stderr);
        Err(classify(&description, self.remote.url(), &stderr, what))
    }

    /// Makes sure `commit` is in the mirror, fetching it by id if it is not. A commit
    /// the server no longer has (force-pushed away) is [`GitError::CommitNotFound`].
    pub fn ensure_commit(&self, commit: ObjectId) -> Result<(), GitError> {
        if self.has_commit(commit)? {
            return Ok(());
        }
        match self.fetch(&Fetch::Commit(commit)) {
            Ok(()) => {}
            Err(GitError::RefNotFound { .. } | GitError::CommitNotFound { .. }) => {
                return Err(GitError::CommitNotFound {
                    url: self.remote.url().to_owned(),
                    commit,
                })
            }
            Err(other) => return Err(other),
        }
        if self.has_commit(commit)? {
            Ok(())
        } else {
            Err(GitError::CommitNotFound {
                url: self.remote.url().to_owned(),
                commit,
            })
        }
    }

    /// Whether the mirror holds `commit` (as a commit).
    pub fn has_commit(&self, commit: ObjectId) -> Result<bool, GitError> {
        let inv = self
            .local_invocation(&format!("looking up {commit}"))
            .args(["cat-file", "-e"])
            .arg(format!("{commit}^{{commit}}"));
        Ok(run::run(&self.git, inv)?.status.success())
    }

    /// The commit a ref or revision names in the mirror (an annotated tag is peeled).
    pub fn resolve(&self, rev: &str) -> Result<ObjectId, GitError> {
        if rev.starts_with('-') || rev.contains(['\n', '\0']) {
            return Err(GitError::Config(format!("`{rev}` is not a revision")));
        }
        let inv = self
            .local_invocation(&format!("resolving `{rev}`"))
            .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
            .arg(format!("{rev}^{{commit}}"));
        let finished = run::run(&self.git, inv)?;
        if !finished.status.success() {
            return Err(GitError::RefNotFound {
                what: format!("resolving `{rev}`"),
                url: self.remote.url().to_owned(),
                reference: rev.to_owned(),
            });
        }
        ObjectId::from_hex_bytes(finished.stdout.trim_ascii()).ok_or_else(|| GitError::Parse {
            what: format!("resolving `{rev}`"),
            detail: String::from_utf8_lossy(&finished.stdout).into_owned(),
        })
    }

    /// Every branch and tag in the mirror with the object it points at (a tag's own
    /// object for an annotated tag) and, for annotated tags, the commit it peels to.
    pub fn refs(&self) -> Result<Vec<RefEntry>, GitError> {
        let out = self.local(
            "listing refs",
            &[
                "for-each-ref",
                "--format=%(objectname) %(objecttype) %(*objectname) %(refname)",
                "refs/heads",
                "refs/tags",
            ],
        )?;
        let mut refs = Vec::new();
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let text = String::from_utf8_lossy(line);
            let mut parts = text.splitn(4, ' ');
            let (Some(target), Some(kind), Some(peeled), Some(name)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(target) = ObjectId::from_hex(target) else {
                continue;
            };
            refs.push(RefEntry {
                name: name.to_owned(),
                target,
                is_tag_object: kind == "tag",
                peeled: ObjectId::from_hex(peeled),
            });
        }
        Ok(refs)
    }

    /// The bytes of the file at `path` in `commit` (the pipeline file), or `None` if
    /// there is no such file. Files larger than `max_bytes` are refused.
    pub fn read_file(
        &self,
        commit: ObjectId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let spec = format!("{commit}:{}", path.trim_start_matches('/'));
        let size_inv = self
            .local_invocation(&format!("reading {path} at {}", commit.short()))
            .args(["cat-file", "-s", "--end-of-options"])
            .arg(&spec);
        let sized = run::run(&self.git, size_inv)?;
        if !sized.status.success() {
            return Ok(None);
        }
        let size: u64 = String::from_utf8_lossy(sized.stdout.trim_ascii())
            .parse()
            .map_err(|_| GitError::Parse {
                what: format!("reading {path}"),
                detail: "size is not a number".into(),
            })?;
        if size > max_bytes {
            return Err(GitError::TooLarge {
                commit,
                what: "the file",
                size,
                limit: max_bytes,
            });
        }
        let kind = self.local(
            "reading a file's type",
            &["cat-file", "-t", "--end-of-options", &spec],
        )?;
        if kind.trim_ascii() != b"blob" {
            return Ok(None);
        }
        let mut inv = self
            .local_invocation(&format!("reading {path} at {}", commit.short()))
            .args(["cat-file", "blob", "--end-of-options"])
            .arg(&spec);
        inv.max_stdout = usize::try_from(max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        run::run_ok(&self.git, inv).map(Some)
    }

    /// The paths that differ between `from` and `to` (what a push filter's `paths`
    /// match), or, with no `from` (a new branch), the paths `to` changed against its
    /// first parent. At most `max` paths: a filter needs one match, not every path.
    pub fn changed_paths(
        &self,
        from: Option<ObjectId>,
        to: ObjectId,
        max: usize,
    ) -> Result<Vec<String>, GitError> {
        let (from_text, to_text) = (from.map(|c| c.to_string()), to.to_string());
        let mut args = vec![
            "diff-tree",
            "-r",
            "--root",
            "--no-commit-id",
            "--name-only",
            "-z",
        ];
        if let Some(from) = &from_text {
            args.push(from);
        }
        args.push(&to_text);
        let out = self.local(
            &format!("listing the paths changed by {}", to.short()),
            &args,
        )?;
        Ok(out
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .take(max)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect())
    }

    /// Packs the mirror's loose objects and small packs when git thinks it is due
    /// (`gc --auto`): fetches never do it themselves.
    pub fn maintain(&self) -> Result<(), GitError> {
        run::run_ok(
            &self.git,
            Invocation::new(
                format!("maintaining the mirror of {}", self.remote.url()),
                Some(&self.dir),
                self.options.fetch_deadline,
            )
            .args(["-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"]),
        )
        .map(drop)
    }
}

/// One ref of a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefEntry {
    pub name: String,
    /// What the ref points at: a commit, or a tag object for an annotated tag.
    pub target: ObjectId,
    pub is_tag_object: bool,
    /// For an annotated tag, the object it points at.
    pub peeled: Option<ObjectId>,
}

/// `main` -> `refs/heads/main`; a full name is checked and kept.
pub(crate) fn full_ref_name(name: &str) -> Result<String, GitError> {
    let bad = name.is_empty()
        || name.starts_with('-')
        || name.contains(['\n', '\0', ' ', ':', '~', '^', '?', '*', '[', '\\'])
        || name.contains("..")
        || name.contains("@{")
        || name.ends_with('/')
        || name.to_ascii_lowercase().ends_with(".lock");
    if bad {
        return Err(GitError::Config(format!(
            "`{name}` is not a valid ref name"
        )));
    }
    Ok(if name.starts_with("refs/") {
        name.to_owned()
    } else {
        format!("refs/heads/{name}")
    })
}

/// Turns a failed network git's error output into the error a user can act on.
fn classify(what: &str, url: &str, stderr: &str, fetch: &Fetch) -> GitError {
    let lower = stderr.to_ascii_lowercase();
    let detail = run::last_line(stderr);
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let (what, url) = (what.to_owned(), url.to_owned());
    if has(&[
        "host key verification failed",
        "remote host identification has changed",
        "no ed25519 host key is known",
        "no rsa host key is known",
        "no ecdsa host key is known",
    ]) {
        return GitError::HostKeyRejected { what, url, detail };
    }
    if has(&[
        "authentication failed",
        "permission denied (publickey",
        "permission denied, please try again",
        "could not read username",
        "could not read password",
        "terminal prompts disabled",
        "returned error: 401",
        "returned error: 403",
        "invalid username or password",
    ]) {
        return GitError::AuthRefused { what, url, detail };
    }
    if has(&["not our ref", "unadvertised object", "not a valid object"]) {
        if let Fetch::Commit(commit) = fetch {
            return GitError::CommitNotFound {
                url,
                commit: *commit,
            };
        }
    }
    if has(&["couldn't find remote ref", "no such remote ref"]) {
        let reference = match fetch {
            Fetch::Ref(name) => full_ref_name(name).unwrap_or_else(|_| name.clone()),
            Fetch::Commit(commit) => commit.to_string(),
            Fetch::All => detail.clone(),
        };
        if let Fetch::Commit(commit) = fetch {
            return GitError::CommitNotFound {
                url,
                commit: *commit,
            };
        }
        return GitError::RefNotFound {
            what,
            url,
            reference,
        };
    }
    if has(&[
        "repository not found",
        "does not appear to be a git repository",
        "returned error: 404",
        "repository not exported",
        "no such repository",
    ]) || (lower.contains("repository '") && lower.contains("' not found"))
    {
        return GitError::RepositoryNotFound { what, url, detail };
    }
    if has(&[
        "could not resolve host",
        "could not resolve hostname",
        "connection refused",
        "unable to connect",
        "failed to connect",
        "could not connect",
        "connection timed out",
        "operation timed out",
        "no route to host",
        "network is unreachable",
        "connection reset",
        "connection closed by",
        "name or service not known",
        "kex_exchange_identification",
        "ssl certificate problem",
        "tls connect error",
        "gnutls",
        "the remote end hung up unexpectedly",
        "early eof",
    ]) {
        return GitError::Unreachable { what, url, detail };
    }
    GitError::Failed {
        what,
        status: "exit status".into(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_are_checked_and_completed() {
        assert_eq!(
            full_ref_name("main").ok().as_deref(),
            Some("refs/heads/main")
        );
        assert_eq!(
            full_ref_name("refs/pull/7/head").ok().as_deref(),
            Some("refs/pull/7/head")
        );
        for bad in ["", "-x", "a..b", "a:b", "x.lock", "a b", "HEAD@{1}"] {
            assert!(full_ref_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn git_messages_become_typed_errors() {
        let all = Fetch::All;
        let e = classify(
            "f",
            "u",
            "fatal: Authentication failed for 'http://x/'",
            &all,
        );
        assert!(matches!(e, GitError::AuthRefused { .. }), "{e}");
        let e = classify("f", "u", "ssh: connect to host 127.0.0.1 port 1: Connection refused\nfatal: Could not read from remote repository.", &all);
        assert!(matches!(e, GitError::Unreachable { .. }), "{e}");
        let e = classify(
            "f",
            "u",
            "fatal: couldn't find remote ref refs/heads/gone",
            &Fetch::Ref("gone".into()),
        );
        assert!(
            matches!(&e, GitError::RefNotFound { reference, .. } if reference == "refs/heads/gone"),
            "{e}"
        );
        let e = classify("f", "u", "Host key verification failed.", &all);
        assert!(matches!(e, GitError::HostKeyRejected { .. }), "{e}");
    }
}
