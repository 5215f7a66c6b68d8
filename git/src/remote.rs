//! Where a repository lives and how to authenticate to it, turned into the environment
//! of one git invocation.
//!
//! Credentials never go into a URL, an argument list or a file in the mirror:
//! - an https token reaches git through an inline credential helper
//!   (`credential.helper=!f() {...}`, set by `GIT_CONFIG_*` variables) that prints it
//!   from the process environment, so it is sent only when the server asks (HTTP 401),
//!   only to that server, and is readable only by the coordinator's own user (argv is
//!   world-readable in /proc, the environment is not);
//! - an ssh key is a file named in `GIT_SSH_COMMAND` with `IdentitiesOnly=yes`, no agent,
//!   no user ssh config (`-F /dev/null`) and `BatchMode=yes`. Host keys follow the
//!   repository's [`KnownHosts`] policy: `Pinned` (the default to recommend) accepts only
//!   keys already in its file; `AcceptNew` records the first key seen for a host and
//!   refuses a changed one later (trust on first use). The user's and the system's
//!   known_hosts files are never read.
//!
//! Transports are allowed by scheme (`protocol.allow=never`, then https, http, ssh and
//! git); `file` only when the repository itself is local, so a `.gitmodules` of a remote
//! repository cannot make the coordinator read another repository off its own disk;
//! `ext::` never.

use std::path::{Path, PathBuf};

use crate::error::GitError;

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How ssh decides whether to trust a server's host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownHosts {
    /// Only keys already in this file (`StrictHostKeyChecking=yes`).
    Pinned(PathBuf),
    /// The first key seen for a host is written to this file and trusted from then on;
    /// a different key later is refused (`StrictHostKeyChecking=accept-new`).
    AcceptNew(PathBuf),
}

/// How the coordinator authenticates to a repository's server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    /// Anonymous (public https, `git://`, local paths).
    #[default]
    None,
    /// An ssh private key file (mode 0600, as ssh requires) for `ssh://` and `user@host:path`.
    SshKey {
        key_file: PathBuf,
        known_hosts: KnownHosts,
    },
    /// An https token (a forge access token or password), sent as HTTP basic auth when
    /// the server asks. Gitea/Forgejo and GitHub take any username with a token; GitLab
    /// wants `oauth2` (or the token's name).
    Token { username: String, token: Secret },
}

/// `GIT_CONFIG_*` lines for one invocation.
pub(crate) type ConfigLines = Vec<(String, String)>;
/// Environment variables for one invocation.
pub(crate) type EnvVars = Vec<(String, std::ffi::OsString)>;

/// How a URL is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Https,
    Http,
    Ssh,
    Git,
    Local,
}

/// A repository's address with its credentials. The URL is checked when it is made and
/// never carries a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    url: String,
    transport: Transport,
    credentials: Credentials,
    ca_file: Option<PathBuf>,
}

impl Remote {
    /// Checks `url` and pairs it with `credentials`. Refused: a URL with a password in
    /// it, an unknown scheme (`ext::`, `fd::`), a token over plain http to anything but
    /// loopback, a token for ssh or a key for https, and ssh without a key.
    pub fn new(url: impl Into<String>, credentials: Credentials) -> Result<Self, GitError> {
        let url = url.into();
        let transport = transport_of(&url)?;
        if let Some(userinfo) = userinfo_of(&url) {
            if userinfo.contains(':') {
                return Err(GitError::Config(format!(
                    "repository URL {} carries a password; give the token as a secret instead (it must never be stored in a URL)",
                    redact(&url)
                )));
            }
        }
        match (&credentials, transport) {
            (Credentials::Token { .. }, Transport::Https)
            | (Credentials::None, _)
            | (Credentials::SshKey { .. }, Transport::Ssh) => {}
            (Credentials::Token { .. }, Transport::Http) => {
                if !is_loopback_url(&url) {
                    return Err(GitError::Config(format!(
                        "repository URL {url} is plain http: a token would travel unencrypted; use https"
                    )));
                }
            }
            (Credentials::Token { .. }, _) => {
                return Err(GitError::Config(format!(
                    "a token authenticates https only, and {url} is not an https URL"
                )))
            }
            (Credentials::SshKey { .. }, _) => {
                return Err(GitError::Config(format!(
                    "an ssh key authenticates ssh only, and {url} is not an ssh URL"
                )))
            }
        }
        if transport == Transport::Ssh && credentials == Credentials::None {
            return Err(GitError::Config(format!(
                "{url} is an ssh URL: give the repository an ssh key file and a known_hosts file"
            )));
        }
        if let Credentials::SshKey { key_file, .. } = &credentials {
            if !key_file.is_absolute() {
                return Err(GitError::Config(format!(
                    "ssh key file {} must be an absolute path",
                    key_file.display()
                )));
            }
        }
        Ok(Self {
            url,
            transport,
            credentials,
            ca_file: None,
        })
    }

    /// Trusts the certificates in `ca_file` (PEM) for https instead of the system's: a
    /// forge on an isolated network with its own CA.
    #[must_use]
    pub fn with_ca_file(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The same credentials for another URL (a submodule's): they follow the
    /// superproject's, as git's own credential lookup would.
    pub(crate) fn with_url(&self, url: &str) -> Result<Self, GitError> {
        let transport = transport_of(url)?;
        let credentials = match (&self.credentials, transport) {
            (Credentials::Token { .. }, Transport::Https | Transport::Http)
            | (Credentials::SshKey { .. }, Transport::Ssh) => self.credentials.clone(),
            _ => Credentials::None,
        };
        let mut remote = Self::new(url, credentials)?;
        remote.ca_file.clone_from(&self.ca_file);
        Ok(remote)
    }

    /// Configuration lines (`GIT_CONFIG_*`) and environment variables for a git that
    /// talks to this remote.
    pub(crate) fn git_environment(&self, allow_local: bool) -> (ConfigLines, EnvVars) {
        let mut config: Vec<(String, String)> = vec![
            ("protocol.allow".into(), "never".into()),
            ("protocol.https.allow".into(), "always".into()),
            ("protocol.http.allow".into(), "always".into()),
            ("protocol.ssh.allow".into(), "always".into()),
            ("protocol.git.allow".into(), "always".into()),
            (
                "protocol.file.allow".into(),
                if allow_local { "always" } else { "never" }.into(),
            ),
            // An empty value clears every helper configured before this one.
            ("credential.helper".into(), String::new()),
            // A stalled transfer (under 1 KB/s for a minute) fails instead of waiting
            // for the whole deadline.
            ("http.lowSpeedLimit".into(), "1000".into()),
            ("http.lowSpeedTime".into(), "60".into()),
            // Fetches never start a background gc that outlives the call (it would
            // escape the process group and the deadline); `Mirror::maintain` runs it.
            ("gc.auto".into(), "0".into()),
            ("maintenance.auto".into(), "false".into()),
            ("fetch.writeCommitGraph".into(), "false".into()),
        ];
        if let Some(ca_file) = &self.ca_file {
            config.push((
                "http.sslCAInfo".into(),
                ca_file.to_string_lossy().into_owned(),
            ));
        }
        let mut env: Vec<(String, std::ffi::OsString)> = Vec::new();
        match &self.credentials {
            Credentials::None => {}
            Credentials::Token { username, token } => {
                config.push((
                    "credential.helper".into(),
                    "!f() { test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' \"$GANTRY_GIT_USERNAME\" \"$GANTRY_GIT_TOKEN\"; }; f".into(),
                ));
                env.push(("GANTRY_GIT_USERNAME".into(), username.into()));
                env.push(("GANTRY_GIT_TOKEN".into(), token.expose().into()));
            }
            Credentials::SshKey {
                key_file,
                known_hosts,
            } => {
                env.push((
                    "GIT_SSH_COMMAND".into(),
                    ssh_command(key_file, known_hosts).into(),
                ));
                env.push(("GIT_SSH_VARIANT".into(), "ssh".into()));
            }
        }
        (config, env)
    }

    /// Removes any trace of the credentials from a message git printed.
    pub(crate) fn scrub(&self, text: &str) -> String {
        match &self.credentials {
            Credentials::Token { token, .. } if !token.expose().is_empty() => {
                text.replace(token.expose(), "***")
            }
            _ => text.to_owned(),
        }
    }
}

/// The ssh command git runs: this key only, no agent, no user config, no prompts.
fn ssh_command(key_file: &Path, known_hosts: &KnownHosts) -> String {
    let (strict, file) = match known_hosts {
        KnownHosts::Pinned(file) => ("yes", file),
        KnownHosts::AcceptNew(file) => ("accept-new", file),
    };
    format!(
        "ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o IdentityAgent=none -o BatchMode=yes \
         -o StrictHostKeyChecking={strict} -o UserKnownHostsFile={known} -o GlobalKnownHostsFile=/dev/null \
         -o ConnectTimeout=20 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o LogLevel=ERROR",
        key = shell_quote(&key_file.to_string_lossy()),
        known = shell_quote(&file.to_string_lossy()),
    )
}

/// Quotes a word for `sh` (git runs `GIT_SSH_COMMAND` through the shell).
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// Which transport a URL uses; refuses the ones Gantry does not allow.
pub(crate) fn transport_of(url: &str) -> Result<Transport, GitError> {
    let lower = url.to_ascii_lowercase();
    if url.is_empty() || url.contains('\n') || url.contains('\0') {
        return Err(GitError::Config(format!(
            "repository URL {url:?} is empty or has a control character"
        )));
    }
    if url.starts_with('-') {
        return Err(GitError::Config(format!(
            "repository URL {url:?} starts with `-`"
        )));
    }
    if lower.starts_with("https://") {
        Ok(Transport::Https)
    } else if lower.starts_with("http://") {
        Ok(Transport::Http)
    } else if lower.starts_with("ssh://") || lower.starts_with("git+ssh://") {
        Ok(Transport::Ssh)
    } else if lower.starts_with("git://") {
        Ok(Transport::Git)
    } else if lower.starts_with("file://") || url.starts_with('/') {
        Ok(Transport::Local)
    } else if lower.contains("::") || lower.contains("://") {
        Err(GitError::Config(format!(
            "repository URL {url} uses a transport Gantry does not allow (https, http, ssh, git and local paths are)"
        )))
    } else if is_scp_like(url) {
        Ok(Transport::Ssh)
    } else {
        Err(GitError::Config(format!(
            "repository URL {url} is neither a URL (https://, ssh://, git://, file://), an scp-like ssh address (user@host:path) nor an absolute path"
        )))
    }
}

/// `user@host:path` or `host:path` (git's scp-like syntax): a colon before any slash.
fn is_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash && colon > 0,
        (Some(colon), None) => colon > 0,
        _ => false,
    }
}

fn userinfo_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    authority.rsplit_once('@').map(|(userinfo, _)| userinfo)
}

fn is_loopback_url(url: &str) -> bool {
    let Some(rest) = url.split_once("://").map(|(_, rest)| rest) else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(stripped) = host_port.strip_prefix('[') {
        stripped.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A URL with any password in it replaced by `***`, for messages and stored config.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_owned(),
    }
}

/// Resolves a submodule URL from `.gitmodules` against its superproject's URL, as git
/// does for `./` and `../` forms.
pub(crate) fn resolve_relative(superproject: &str, relative: &str) -> String {
    if !(relative.starts_with("./") || relative.starts_with("../")) {
        return relative.to_owned();
    }
    let mut base = superproject.trim_end_matches('/').to_owned();
    let mut rest = relative;
    loop {
        if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            match base.rfind(['/', ':']) {
                // `host:repo` loses its path but keeps the colon.
                Some(cut) if base.as_bytes()[cut] == b':' => base.truncate(cut + 1),
                Some(cut) => base.truncate(cut),
                None => base.clear(),
            }
        } else {
            break;
        }
    }
    if base.ends_with(':') {
        format!("{base}{rest}")
    } else {
        format!("{base}/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_classified_and_passwords_refused() {
        assert_eq!(transport_of("https://h/r.git").ok(), Some(Transport::Https));
        assert_eq!(transport_of("ssh://git@h:22/r").ok(), Some(Transport::Ssh));
        assert_eq!(transport_of("git@h:r.git").ok(), Some(Transport::Ssh));
        assert_eq!(transport_of("git://h/r").ok(), Some(Transport::Git));
        assert_eq!(transport_of("/srv/r.git").ok(), Some(Transport::Local));
        assert!(transport_of("ext::sh -c touch% /tmp/pwned").is_err());
        assert!(transport_of("-uhelp").is_err());
        assert!(transport_of("relative/path").is_err());
        let err = Remote::new("https://u:hunter2@h/r.git", Credentials::None)
            .expect_err("password in URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(redact("https://u:hunter2@h/r"), "https://u:***@h/r");
    }

    #[test]
    fn tokens_need_https_except_on_loopback() {
        let token = Credentials::Token {
            username: "x".into(),
            token: Secret::new("t"),
        };
        assert!(Remote::new("http://forge.example/r", token.clone()).is_err());
        assert!(Remote::new("http://127.0.0.1:8080/r", token.clone()).is_ok());
        assert!(Remote::new("git://h/r", token).is_err());
        assert!(Remote::new("ssh://h/r", Credentials::None).is_err());
    }

    #[test]
    fn a_private_ca_and_a_token_reach_git_through_its_environment_only() {
        let remote = Remote::new(
            "https://forge.internal/app.git",
            Credentials::Token {
                username: "ci".into(),
                token: Secret::new("t0ken"),
            },
        )
        .expect("remote")
        .with_ca_file("/etc/gantry/forge-ca.pem");
        let (config, env) = remote.git_environment(false);
        assert!(config.contains(&("http.sslCAInfo".into(), "/etc/gantry/forge-ca.pem".into())));
        assert!(config.contains(&("protocol.file.allow".into(), "never".into())));
        assert!(config.iter().all(|(_, value)| !value.contains("t0ken")));
        assert!(env
            .iter()
            .any(|(key, value)| key == "GANTRY_GIT_TOKEN" && value == "t0ken"));
        assert!(!format!("{remote:?}").contains("t0ken"));
    }

    #[test]
    fn relative_submodule_urls_resolve_like_git() {
        assert_eq!(
            resolve_relative("https://h/group/super.git", "../lib.git"),
            "https://h/group/lib.git"
        );
        assert_eq!(
            resolve_relative("https://h/group/super", "./sub"),
            "https://h/group/super/sub"
        );
        assert_eq!(
            resolve_relative("git@h:group/super.git", "../lib.git"),
            "git@h:group/lib.git"
        );
        assert_eq!(
            resolve_relative("/srv/super.git", "../lib.git"),
            "/srv/lib.git"
        );
        assert_eq!(resolve_relative("x", "https://o/lib"), "https://o/lib");
    }
}
