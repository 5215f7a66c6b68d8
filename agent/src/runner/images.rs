//! Getting a job's image onto this host before its first step: the pull policy, the
//! registry's credentials, and the digest of the image the job ran in.
//!
//! Owns: what a policy does with an image that is or is not here ([`action`], pure);
//! which registry an image reference names and how a bare reference is completed
//! ([`registry_of`], [`with_default_tag`], pure); which digest stands for the image
//! ([`pick_digest`], pure); and the engine calls ([`ensure`]: inspect, pull with the
//! credentials, inspect again). Job images use it through `DockerRunner::prepare_image`;
//! service containers call [`ensure`] for each service's image the same way.
//!
//! It must not read secrets (the jobs layer fills the credentials in from the job's
//! secrets), and must not write a credential anywhere but the engine's pull request:
//! nothing goes to the log, the disk or an error message.

use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;
use gantry_protocol::PullPolicy;

use super::LogSink;

/// Longest a pull may take: a multi-gigabyte toolchain image on a slow link, but not a
/// registry that stopped answering forever.
pub const PULL_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Bound on an inspect (a local call of the engine).
const INSPECT_DEADLINE: Duration = Duration::from_secs(60);
/// Docker Hub, the registry of references that name none.
const DOCKER_HUB: &str = "docker.io";

/// A job's (or a service's) image as the agent gets it.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageRequest {
    /// A Docker reference, as written in the pipeline.
    pub name: String,
    pub pull: PullPolicy,
    /// The registry's credentials, filled in from the job's secrets.
    pub auth: Option<PullAuth>,
}

/// A registry user and password (or token). Its `Debug` shows no password.
#[derive(Clone, PartialEq, Eq)]
pub struct PullAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for ImageRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageRequest")
            .field("name", &self.name)
            .field("pull", &self.pull)
            .field("auth", &self.auth.as_ref().map(|a| &a.username))
            .finish()
    }
}

/// What to do about an image before the job's first step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It is here and the policy does not ask for a fresh copy.
    Use,
    Pull,
    /// It is not here and the policy forbids pulling.
    Missing,
}

/// What `policy` does with an image that is (`present`) or is not on this host.
pub fn action(policy: PullPolicy, present: bool) -> Action {
    match (policy, present) {
        (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => Action::Pull,
        (PullPolicy::Never, false) => Action::Missing,
        (PullPolicy::IfNotPresent | PullPolicy::Never, true) => Action::Use,
    }
}

/// The policy as written in a pipeline.
pub fn policy_name(policy: PullPolicy) -> &'static str {
    match policy {
        PullPolicy::Never => "never",
        PullPolicy::IfNotPresent => "if-not-present",
        PullPolicy::Always => "always",
    }
}

/// The registry a reference names: its first path component when that has a `.` or a
/// `:` or is `localhost` (Docker's rule), else Docker Hub.
pub fn registry_of(name: &str) -> &str {
    match name.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => DOCKER_HUB,
    }
}

/// The reference without its tag or digest (`127.0.0.1:5000/test` of
/// `127.0.0.1:5000/test:1`).
fn repository_of(name: &str) -> &str {
    let name = name.split_once('@').map_or(name, |(repo, _)| repo);
    match name.rsplit_once(':') {
        // A colon after the last slash is a tag; before it, a registry's port.
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    }
}

/// `name` with `:latest` when it has neither a tag nor a digest, as `docker pull` reads
/// it: the engine's pull of a bare name would fetch every tag.
pub fn with_default_tag(name: &str) -> String {
    if repository_of(name) == name {
        format!("{name}:latest")
    } else {
        name.to_owned()
    }
}

/// The digest recorded for the job: the registry's manifest digest (`sha256:...` of the
/// `repo@sha256:...` entry of the image's `RepoDigests` for `name`'s repository) when
/// the image came from a registry, else the image's own ID (`sha256:...`, also content
/// addressed) for an image only built or loaded here.
pub fn pick_digest(name: &str, repo_digests: &[String], id: &str) -> String {
    let repo = repository_of(name);
    let bare = |r: &str| {
        r.strip_prefix("docker.io/library/")
            .or_else(|| r.strip_prefix("docker.io/"))
            .unwrap_or(r)
            .to_owned()
    };
    repo_digests
        .iter()
        .filter_map(|d| d.split_once('@'))
        .find(|(r, _)| bare(r) == bare(repo))
        .map_or_else(|| id.to_owned(), |(_, digest)| digest.to_owned())
}

/// Why a job's image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image {image} is not on this host and the job says pull: never; load it with `docker load -i FILE` (or build it) on the agent, or let the agent pull it (pull: if-not-present)")]
    Missing { image: String },
    #[error("cannot inspect the image {image}: {source}")]
    Inspect {
        image: String,
        source: bollard::errors::Error,
    },
    #[error("the Docker engine did not answer an inspect of {image} within {INSPECT_DEADLINE:?}")]
    InspectDeadline { image: String },
    #[error("cannot pull {image} from {registry}: {message}{}", hint(message, *with_credentials))]
    Pull {
        image: String,
        registry: String,
        message: String,
        with_credentials: bool,
    },
    #[error("the pull of {image} did not finish within {PULL_DEADLINE:?}")]
    PullDeadline { image: String },
    #[error("the pull of {image} ended but the engine does not have it")]
    NotAfterPull { image: String },
}

/// What to do about a refused pull, from the engine's message.
fn hint(message: &str, with_credentials: bool) -> &'static str {
    let denied = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "denied",
        "401",
        "403",
    ]
    .iter()
    .any(|w| message.to_lowercase().contains(w));
    match (denied, with_credentials) {
        (true, false) => " (the registry wants credentials: give the image credentials: { username, password: ${{ secrets.NAME }} })",
        (true, true) => " (the registry refused the credentials: check the user name and the secret named in credentials.password)",
        (false, _) => "",
    }
}

/// The image's repository digests and ID, or `None` when the engine does not have it.
async fn inspect(
    docker: &Docker,
    image: &str,
) -> Result<Option<(Vec<String>, String)>, ImageError> {
    match tokio::time::timeout(INSPECT_DEADLINE, docker.inspect_image(image)).await {
        Err(_) => Err(ImageError::InspectDeadline {
            image: image.to_owned(),
        }),
        Ok(Ok(found)) => Ok(Some((
            found.repo_digests.unwrap_or_default(),
            found.id.unwrap_or_default(),
        ))),
        Ok(Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        })) => Ok(None),
        Ok(Err(source)) => Err(ImageError::Inspect {
            image: image.to_owned(),
            source,
        }),
    }
}

/// Makes sure the engine has `request`'s image as its policy says, pulling it with its
/// credentials when needed (saying so in the job's log), and returns its digest
/// ([`pick_digest`]).
pub async fn ensure(
    docker: &Docker,
    request: &ImageRequest,
    log: &LogSink,
) -> Result<String, ImageError> {
    let name = request.name.as_str();
    let found = inspect(docker, name).await?;
    let found = match action(request.pull, found.is_some()) {
        Action::Use => found,
        Action::Missing => {
            return Err(ImageError::Missing {
                image: name.to_owned(),
            })
        }
        Action::Pull => {
            let registry = registry_of(name);
            let _ = log
                .send(
                    format!(
                        "\u{25b6} pulling {name} from {registry} (pull: {})\n",
                        policy_name(request.pull)
                    )
                    .into_bytes(),
                )
                .await;
            pull(docker, request).await?;
            inspect(docker, name).await?
        }
    };
    let Some((repo_digests, id)) = found else {
        return Err(ImageError::NotAfterPull {
            image: name.to_owned(),
        });
    };
    let digest = pick_digest(name, &repo_digests, &id);
    let _ = log
        .send(format!("image {name}: {digest}\n").into_bytes())
        .await;
    Ok(digest)
}

/// Pulls `request`'s image, bounded by [`PULL_DEADLINE`].
async fn pull(docker: &Docker, request: &ImageRequest) -> Result<(), ImageError> {
    let name = request.name.as_str();
    let registry = registry_of(name);
    let failed = |message: String| ImageError::Pull {
        image: name.to_owned(),
        registry: registry.to_owned(),
        message,
        with_credentials: request.auth.is_some(),
    };
    let reference = with_default_tag(name);
    let options = CreateImageOptionsBuilder::default()
        .from_image(&reference)
        .build();
    let credentials = request.auth.as_ref().map(|a| DockerCredentials {
        username: Some(a.username.clone()),
        password: Some(a.password.clone()),
        serveraddress: Some(registry.to_owned()),
        ..DockerCredentials::default()
    });
    let drain = async {
        let mut progress = docker.create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail {
                        return Err(failed(detail.message.unwrap_or_default()));
                    }
                }
                Err(e) => return Err(failed(engine_message(&e))),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(PULL_DEADLINE, drain).await {
        Ok(result) => result,
        Err(_) => Err(ImageError::PullDeadline {
            image: name.to_owned(),
        }),
    }
}

/// The engine's own message for a failed call, without bollard's wrapping.
fn engine_message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_pulls_uses_or_refuses() {
        use Action::{Missing, Pull, Use};
        let table = [
            (PullPolicy::Never, true, Use),
            (PullPolicy::Never, false, Missing),
            (PullPolicy::IfNotPresent, true, Use),
            (PullPolicy::IfNotPresent, false, Pull),
            (PullPolicy::Always, true, Pull),
            (PullPolicy::Always, false, Pull),
        ];
        for (policy, present, expected) in table {
            assert_eq!(
                action(policy, present),
                expected,
                "{policy:?} present={present}"
            );
        }
    }

    #[test]
    fn references_name_their_registry_and_get_latest_when_bare() {
        for (name, registry) in [
            ("127.0.0.1:5000/test:1", "127.0.0.1:5000"),
            ("registry.local/team/app@sha256:ab", "registry.local"),
            ("localhost/x", "localhost"),
            ("postgres:16", "docker.io"),
            ("team/app", "docker.io"),
        ] {
            assert_eq!(registry_of(name), registry, "{name}");
        }
        assert_eq!(
            with_default_tag("127.0.0.1:5000/test"),
            "127.0.0.1:5000/test:latest"
        );
        assert_eq!(
            with_default_tag("127.0.0.1:5000/test:1"),
            "127.0.0.1:5000/test:1"
        );
        assert_eq!(with_default_tag("alpine"), "alpine:latest");
        assert_eq!(with_default_tag("a/b@sha256:00"), "a/b@sha256:00");
    }

    #[test]
    fn the_digest_is_the_registrys_for_this_repository_else_the_image_id() {
        let digests = [
            "other.example/x@sha256:1111".to_owned(),
            "127.0.0.1:5000/test@sha256:2222".to_owned(),
        ];
        assert_eq!(
            pick_digest("127.0.0.1:5000/test:1", &digests, "sha256:9999"),
            "sha256:2222"
        );
        assert_eq!(
            pick_digest("local-only:1", &digests, "sha256:9999"),
            "sha256:9999",
            "built or loaded here: the image ID"
        );
        assert_eq!(
            pick_digest(
                "postgres:16",
                &["postgres@sha256:3333".to_owned()],
                "sha256:9"
            ),
            "sha256:3333"
        );
    }

    #[test]
    fn a_refused_pull_says_what_to_do_and_never_shows_the_password() {
        let e = ImageError::Pull {
            image: "127.0.0.1:5000/test:1".into(),
            registry: "127.0.0.1:5000".into(),
            message:
                "Head \"http://127.0.0.1:5000/v2/test/manifests/1\": no basic auth credentials"
                    .into(),
            with_credentials: false,
        };
        assert!(
            e.to_string().contains("the registry wants credentials"),
            "{e}"
        );
        let e = ImageError::Pull {
            image: "127.0.0.1:5000/test:1".into(),
            registry: "127.0.0.1:5000".into(),
            message: "unauthorized: authentication required".into(),
            with_credentials: true,
        };
        assert!(e.to_string().contains("refused the credentials"), "{e}");
        let request = ImageRequest {
            name: "x".into(),
            pull: PullPolicy::Always,
            auth: Some(PullAuth {
                username: "ci".into(),
                password: "hunter2".into(),
            }),
        };
        assert!(!format!("{request:?}").contains("hunter2"));
    }
}
