//! Repositories on the coordinator (`gantry repos`) and runs of a repository's commit
//! (`gantry run --repo`): the admin requests' shapes.
//!
//! Credentials travel one way only, from the admin to the coordinator: an ssh key's
//! text in [`RepoAuth::SshKey`] is sealed on arrival, and no view carries it back.

use serde::{Deserialize, Serialize};

use crate::{Digest, Labels};

/// How the coordinator authenticates to a repository's server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepoAuth {
    /// Anonymous: public https, `git://`, `file://` and local paths.
    None,
    /// An https token, read from the stored secret of this name at each fetch.
    TokenSecret(String),
    /// An ssh private key (its PEM text), stored sealed like a secret.
    SshKey(String),
}

/// `gantry repos add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRepo {
    pub name: String,
    pub url: String,
    /// `gitea` (or `forgejo`), `gitlab`, `github`; `None` for a plain git server.
    pub forge: Option<String>,
    pub auth: RepoAuth,
    /// The pipeline file, read from each commit built; `None` is `gantry.yml`.
    pub pipeline_file: Option<String>,
    /// Fetch every this many seconds and run for each branch head that moved.
    pub poll_secs: Option<u64>,
    /// The stored secret (`gantry secrets set NAME`) the forge's webhook is signed
    /// with; `None` refuses every delivery to `/hooks/repos/NAME`.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// Run pull requests from forks (untrusted: no secrets); refused if `false`.
    #[serde(default)]
    pub fork_pull_requests: bool,
    /// The forge's API base for commit statuses (`https://host/api/v1`); `None` derives
    /// it from the URL and the forge.
    #[serde(default)]
    pub api_url: Option<String>,
    /// The stored secret holding the forge API token for statuses; `None` uses the
    /// `TokenSecret` of `auth`.
    #[serde(default)]
    pub status_token_secret: Option<String>,
}

impl AddRepo {
    /// The repository at `url` as `name` with every option off: no forge, anonymous,
    /// the default pipeline file, no polling, no webhook and no commit statuses.
    pub fn plain(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            forge: None,
            auth: RepoAuth::None,
            pipeline_file: None,
            poll_secs: None,
            webhook_secret: None,
            fork_pull_requests: false,
            api_url: None,
            status_token_secret: None,
        }
    }
}

/// `gantry run --repo NAME [--ref R] [--input k=v]...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRepo {
    pub repo: String,
    /// A branch, tag, full ref or commit id; `None` is the repository's default branch.
    pub git_ref: Option<String>,
    pub inputs: Labels,
}

/// Declares a struct with a repository's fields as [`RepoView`] shows them, how it
/// authenticates (`$auth`) and its branch and tag heads (`heads`) of the types given,
/// and goes on with the fields given. The coordinator's stored repository record is
/// declared with it too: postcard reads fields by position, so one list keeps the two
/// in step (the store's tests pin the record's bytes, so a field added here is caught
/// there before it changes what is on disk).
#[macro_export]
macro_rules! repo_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $(#[$auth_attr:meta])*
            pub $auth:ident: $auth_type:ty,
            $(#[$heads_attr:meta])*
            pub heads: $heads_type:ty,
            $($(#[$field_attr:meta])* pub $field:ident: $type:ty,)*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            pub name: String,
            pub url: String,
            /// `gitea`, `gitlab` or `github`, as `gantry_forge::Forge` names them.
            pub forge: Option<String>,
            $(#[$auth_attr])*
            pub $auth: $auth_type,
            pub pipeline_file: String,
            pub poll_secs: Option<u64>,
            pub created_at: $crate::UnixMillis,
            pub created_by: String,
            /// The last fetch that succeeded.
            pub fetched_at: Option<$crate::UnixMillis>,
            /// The last fetch's error, cleared by the next success.
            pub last_error: Option<String>,
            $(#[$heads_attr])*
            pub heads: $heads_type,
            $($(#[$field_attr])* pub $field: $type,)*
        }
    };
}

repo_struct! {
    /// A repository as admins see it (never its credentials).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RepoView {
        /// `none`, `token from secret NAME` or `ssh key`.
        pub auth: String,
        /// Branch and tag heads as of the last fetch: (full ref, commit).
        pub heads: Vec<(String, String)>,
        /// Webhook deliveries (`POST /hooks/repos/NAME`): `off`, or the secret they are
        /// signed with and whether fork pull requests run.
        #[serde(default)]
        pub webhook: String,
        /// Where commit statuses go (`POST {api}/...`), or why none are sent.
        #[serde(default)]
        pub status_api: String,
        /// The last commit statuses that did not reach the forge (attempts that failed,
        /// statuses given up or refused), oldest first, one line each.
        #[serde(default)]
        pub status_failures: Vec<String>,
    }
}

/// How a source archive built from a commit starts its root `.git` entry: a regular
/// file holding the workspace's `.git` (`gantry_git::GitPayload`), which the agent
/// turns into the directory. A walked tree can never hold a `.git` path itself.
pub const GIT_PAYLOAD_MAGIC: &[u8] = b"gantry-git-payload/1\n";

/// The first protocol version whose agents check out a run's [`TreeSource`] through the
/// chunk store; the coordinator sends jobs of such runs only to them (a capability
/// label), older agents keep getting source archives.
pub const TREE_SOURCE_VERSION: u16 = 4;

/// How a [`TreeSource`] is written in a run's `source` (where a source archive is
/// `sha256:<hex>`).
pub const TREE_SOURCE_PREFIX: &str = "tree;";

/// Most `.git` payloads one run's source carries (one per distinct `checkout.depth`).
pub const MAX_SOURCE_DEPTHS: usize = 16;

/// A commit as a run's source through the chunk store: the manifest of its tree (the
/// agent materialises it fetching only the chunks its cache lacks), the same tree with
/// submodules merged when a job asks for them, and per `checkout.depth` a manifest of
/// one file, `payload`, holding the workspace's `.git` (`gantry_git::GitPayload`, after
/// [`GIT_PAYLOAD_MAGIC`]).
///
/// It travels as the run's `source` string (`tree;tree=blake3:…;sub=…;git.1=…;git.full=…`)
/// so the assignment keeps its shape; an agent tells it from an archive id by
/// [`TREE_SOURCE_PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSource {
    pub tree: Digest,
    pub with_submodules: Option<Digest>,
    /// `(depth, manifest)`: `None` is the whole history; sorted, at most
    /// [`MAX_SOURCE_DEPTHS`].
    pub git: Vec<(Option<u32>, Digest)>,
}

/// A run's `source` that starts like a [`TreeSource`] but is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the run's source {text:?} is not a chunk-store checkout: {problem}")]
pub struct TreeSourceError {
    pub text: String,
    pub problem: &'static str,
}

impl TreeSource {
    /// Whether a run's `source` names a tree rather than an archive.
    pub fn is_tree(source: &str) -> bool {
        source.starts_with(TREE_SOURCE_PREFIX)
    }

    pub fn encode(&self) -> String {
        let mut parts = vec![format!("{TREE_SOURCE_PREFIX}tree={}", self.tree)];
        if let Some(sub) = &self.with_submodules {
            parts.push(format!("sub={sub}"));
        }
        for (depth, digest) in &self.git {
            parts.push(match depth {
                Some(n) => format!("git.{n}={digest}"),
                None => format!("git.full={digest}"),
            });
        }
        parts.join(";")
    }

    pub fn parse(text: &str) -> Result<Self, TreeSourceError> {
        let bad = |problem| TreeSourceError {
            text: text.chars().take(200).collect(),
            problem,
        };
        let rest = text
            .strip_prefix(TREE_SOURCE_PREFIX)
            .ok_or_else(|| bad("it does not start with `tree;`"))?;
        let (mut tree, mut with_submodules, mut git) = (None, None, Vec::new());
        for part in rest.split(';') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("a part has no `=`"))?;
            let digest: Digest = value.parse().map_err(|_| bad("a digest does not parse"))?;
            match key {
                "tree" if tree.is_none() => tree = Some(digest),
                "sub" if with_submodules.is_none() => with_submodules = Some(digest),
                "git.full" => git.push((None, digest)),
                _ => {
                    let depth = key
                        .strip_prefix("git.")
                        .and_then(|n| n.parse::<u32>().ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("a key is unknown or repeated"))?;
                    git.push((Some(depth), digest));
                }
            }
        }
        if git.len() > MAX_SOURCE_DEPTHS {
            return Err(bad("it names too many depths"));
        }
        git.sort_by_key(|(d, _)| d.map_or(u64::MAX, u64::from));
        if git.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(bad("a depth is named twice"));
        }
        Ok(Self {
            tree: tree.ok_or_else(|| bad("it names no tree"))?,
            with_submodules,
            git,
        })
    }

    /// The tree a job checks out: with submodules when it asks and they were merged.
    pub fn tree_for(&self, submodules: bool) -> Digest {
        match (submodules, self.with_submodules) {
            (true, Some(sub)) => sub,
            _ => self.tree,
        }
    }

    /// The `.git` for a job asking `depth` (`None`: full): that depth, else the
    /// shallowest deeper one (a job gets at least what it asked).
    pub fn git_for(&self, depth: Option<u32>) -> Option<Digest> {
        let want = depth.map_or(u64::MAX, u64::from);
        self.git
            .iter()
            .find(|(d, _)| d.map_or(u64::MAX, u64::from) >= want)
            .map(|(_, digest)| *digest)
    }

    /// Every manifest it names (what a job of the run may read).
    pub fn manifests(&self) -> impl Iterator<Item = Digest> + '_ {
        std::iter::once(self.tree)
            .chain(self.with_submodules)
            .chain(self.git.iter().map(|(_, d)| *d))
    }
}

#[cfg(test)]
mod tree_source_tests {
    use super::*;

    #[test]
    fn a_tree_source_round_trips_and_picks_depths() {
        let d = |b: u8| Digest::from_bytes([b; 32]);
        let source = TreeSource {
            tree: d(1),
            with_submodules: Some(d(2)),
            git: vec![(Some(1), d(3)), (Some(10), d(4)), (None, d(5))],
        };
        let text = source.encode();
        assert!(TreeSource::is_tree(&text));
        assert!(!TreeSource::is_tree("sha256:00"));
        assert_eq!(TreeSource::parse(&text), Ok(source.clone()));
        assert_eq!(source.git_for(Some(1)), Some(d(3)));
        assert_eq!(source.git_for(Some(5)), Some(d(4)));
        assert_eq!(source.git_for(Some(11)), Some(d(5)));
        assert_eq!(source.git_for(None), Some(d(5)));
        assert_eq!(source.tree_for(true), d(2));
        assert_eq!(source.tree_for(false), d(1));
        assert_eq!(source.manifests().count(), 5);
        // Pinned: runs store this text.
        assert!(text.starts_with("tree;tree=blake3:0101"), "{text}");
        assert!(text.contains(";git.1=blake3:0303") && text.contains(";git.full=blake3:0505"));
    }

    #[test]
    fn a_bad_tree_source_is_refused() {
        for bad in [
            "tree;",
            "tree;sub=blake3:00",
            "tree;tree=x",
            "tree;tree=blake3:0101010101010101010101010101010101010101010101010101010101010101;git.0=blake3:0101010101010101010101010101010101010101010101010101010101010101",
            "tree;tree=blake3:0101010101010101010101010101010101010101010101010101010101010101;what=blake3:0101010101010101010101010101010101010101010101010101010101010101",
        ] {
            assert!(TreeSource::parse(bad).is_err(), "{bad}");
        }
    }
}
