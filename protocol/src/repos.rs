//! Repositories on the coordinator (`gantry repos`) and runs of a repository's commit
//! (`gantry run --repo`): the admin requests' shapes.
//!
//! Credentials travel one way only, from the admin to the coordinator: an ssh key's
//! text in [`RepoAuth::SshKey`] is sealed on arrival, and no view carries it back.

use serde::{Deserialize, Serialize};

use crate::Labels;

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
