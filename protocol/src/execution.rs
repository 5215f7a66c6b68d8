//! How an agent runs a job beyond its steps' text: per-step options, service
//! containers, the image's pull policy and registry credentials, output declarations,
//! when the artifact is uploaded, test reports, caches and the checkout.
//!
//! The pipeline crate reads these from the file (its model uses these very types, so
//! what the file says is what the agent gets); the coordinator passes them on in a
//! [`JobExecution`] beside the [`JobAssignment`](crate::JobAssignment) of one attempt.
//!
//! # Old and new peers
//!
//! postcard is not self-describing: a struct's fields are read by position, a missing
//! trailing field is an error (serde defaults do not apply) and so are unread trailing
//! bytes. So these fields could not be added to `JobAssignment` without breaking every
//! agent of protocol version 2. Instead they travel in a message variant of their own,
//! [`CoordinatorMessage::DispatchJob`](crate::CoordinatorMessage::DispatchJob), appended
//! to the enum (so existing variants keep their encoding), which the coordinator sends
//! only to agents whose hello says [`EXECUTION_VERSION`] or later:
//! - an agent of version 2 gets `Dispatch` as before, and only jobs whose execution
//!   [`JobExecution::is_plain`] (a v2 agent would silently ignore the rest);
//! - an agent of version 3 gets `DispatchJob` for every job (also plain ones, so it has
//!   one code path), and still understands `Dispatch` from a version 2 coordinator.
//!
//! Every struct here also has serde defaults, so self-describing encodings (JSON in the
//! dashboard's API, fixtures) may leave fields out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::messages::CacheSpec;
use crate::status::StatusExpr;

/// The first protocol version whose agents understand `DispatchJob`.
pub const EXECUTION_VERSION: u16 = 3;

/// Default `checkout.depth`: the pushed commit alone, as GitHub Actions does. It is the
/// cheapest checkout (one commit's tree plus a one-commit `.git`); jobs that run
/// `git describe` or diff against history ask for `depth: full` or a number.
pub const DEFAULT_CHECKOUT_DEPTH: u32 = 1;

/// The key under which a job run in an image reports that image's digest among its
/// outputs (`JobFinishedWithOutputs`): the registry's manifest digest, or the image ID
/// of an image only built or loaded on the agent (`sha256:...` either way). It travels
/// with the outputs because `JobResult` cannot gain a field; no pipeline output can be
/// named so (output names have no `.`), and `gantry jobs show` shows it apart, as
/// `image_digest`. Counts against no output limit: one more entry of about 80 bytes.
pub const IMAGE_DIGEST_OUTPUT: &str = "gantry.image-digest";

/// An output name, in `outputs:` and in a `$GANTRY_OUTPUT` file: 1 to
/// [`MAX_OUTPUT_NAME_LEN`](crate::limits::MAX_OUTPUT_NAME_LEN) letters, digits, `_` and
/// `-`, starting with a letter or `_`.
pub fn is_output_name(name: &str) -> bool {
    (1..=crate::limits::MAX_OUTPUT_NAME_LEN).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// What a job attempt needs besides its [`JobAssignment`](crate::JobAssignment).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobExecution {
    /// One entry per step of the assignment, in the same order. Empty: every step has
    /// the defaults ([`StepOptions::default`]).
    pub steps: Vec<StepOptions>,
    /// Containers started before the first step on a network of the job's own, and
    /// always removed after the last (also after a crash: swept at agent start).
    pub services: Vec<Service>,
    /// The job's image with its pull policy and credentials; its `name` is the
    /// assignment's `image`, which this replaces when present.
    pub image: Option<Image>,
    /// `outputs:` as declared: output name to a template in which the agent fills in
    /// `${{ steps.ID.outputs.NAME }}` after the last step. At most
    /// [`MAX_JOB_OUTPUTS`](crate::limits::MAX_JOB_OUTPUTS).
    pub outputs: BTreeMap<String, String>,
    /// When the assignment's artifact is uploaded.
    pub artifact_when: ArtifactWhen,
    /// Test and coverage reports to upload for the coordinator to read; they are
    /// uploaded whatever the outcome (a failing run is when they matter).
    pub reports: Option<Reports>,
    /// Every cache of the job, in order; when this is sent, the assignment's `cache`
    /// is its first entry's spec (for version 2 agents) and is not used besides.
    pub caches: Vec<JobCache>,
    /// What to materialise in the workspace before the first step.
    pub checkout: Checkout,
}

impl JobExecution {
    /// Whether a version 2 agent, which knows only the assignment, runs the job as
    /// asked: every option has its default, at most one cache (the assignment's) and not
    /// under `$HOME`, and an image without credentials that need not be pulled every
    /// time. (A version 2 agent never pulls: with `if-not-present` it runs an image it
    /// has and fails with its own clear error on one it lacks, as it always did.)
    pub fn is_plain(&self) -> bool {
        let plain_caches = self.caches.len() <= 1 && self.caches.iter().all(|c| !c.home);
        let plain_image = self
            .image
            .as_ref()
            .is_none_or(|i| i.pull != PullPolicy::Always && i.credentials.is_none());
        self.steps.iter().all(|s| *s == StepOptions::default())
            && self.services.is_empty()
            && plain_image
            && self.outputs.is_empty()
            && self.artifact_when == ArtifactWhen::OnSuccess
            && self.reports.is_none()
            && plain_caches
            && self.checkout == Checkout::default()
    }
}

/// A step's options beyond its text.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StepOptions {
    /// The step's `id`: later steps and the job's `outputs:` read what it wrote to
    /// `$GANTRY_OUTPUT` as `steps.ID.outputs.NAME`.
    pub id: Option<String>,
    /// Whether the step runs, over the steps before it (see [`StatusExpr`]); comparisons
    /// against `needs` outputs are already resolved, `steps` outputs are left.
    pub condition: StatusExpr,
    /// A failure of this step does not fail the job; later steps see it as a success.
    pub continue_on_error: bool,
    /// The step's own time limit; the job's timeout still bounds it.
    pub timeout_ms: Option<u64>,
    pub shell: Shell,
}

/// What runs a step's `run` text. The script is passed as an argument (it holds its
/// secrets filled in, and a secret never reaches the disk); only [`Shell::Command`]
/// writes it to a file in the job's temporary directory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Shell {
    /// `/bin/sh -e -c SCRIPT`: stops at the first failing command. The default.
    #[default]
    Sh,
    /// `bash --noprofile --norc -eo pipefail -c SCRIPT`: a failure inside a pipe fails
    /// too.
    Bash,
    /// `python3 -c SCRIPT`.
    Python,
    /// `pwsh -NoProfile -NonInteractive -Command SCRIPT`.
    Pwsh,
    /// A command template split on whitespace, with `{0}` replaced by FILE, e.g.
    /// `perl {0}`; the pipeline crate checks it holds `{0}` once.
    Command(String),
}

/// A container image and how to get it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Image {
    /// A Docker reference: `postgres:16`, `registry.local:5000/team/app@sha256:...`.
    pub name: String,
    pub pull: PullPolicy,
    /// Credentials for the registry in `name`; only ever from secrets.
    pub credentials: Option<RegistryCredentials>,
}

/// When the agent pulls an image from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Never: the image must be on the agent (loaded with `docker load` or
    /// distributed by the coordinator). The job fails if it is not.
    Never,
    /// Pull only when the agent does not have the reference. The default: it costs
    /// nothing when the image is there, and works on first use when a registry is.
    #[default]
    IfNotPresent,
    /// Pull before every job, so a moving tag (`:latest`) is current.
    Always,
}

/// Registry credentials. Both fields are references, never secret values: the
/// coordinator adds the named secrets to the assignment's `secrets`, and the agent fills
/// them in when it pulls (and masks them in the log).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryCredentials {
    /// A user name, literal or a `${{ secrets.NAME }}` reference.
    pub username: String,
    /// The name of the secret holding the password or token.
    pub password_secret: String,
}

/// A service container beside a job (a database, a cache, a queue).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    /// A DNS label, unique in the job: the host name the job's containers reach the
    /// service by on the job's network.
    pub name: String,
    pub image: Image,
    /// Its environment; values may hold `${{ secrets.NAME }}`, filled in by the agent.
    pub env: BTreeMap<String, String>,
    /// Ports published on the agent's loopback interface, for jobs that run in a shell
    /// on the host (container jobs reach the service by name on any port).
    pub ports: Vec<ServicePort>,
    /// Arguments replacing the image's command; empty keeps the image's.
    pub command: Vec<String>,
    /// How the agent knows the service is ready; without it the service is ready once
    /// its container runs.
    pub health: Option<ServiceHealth>,
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServicePort {
    /// The port inside the container.
    pub container: u16,
    /// The loopback port on the agent; `None` lets the engine pick a free one, so two
    /// jobs on one agent never fight over a port. A job on the host sees it as
    /// `GANTRY_SERVICE_<NAME>_PORT_<CONTAINER>` (NAME upper-cased, `-` as `_`, `_UDP`
    /// appended for UDP) beside `GANTRY_SERVICE_<NAME>_HOST=127.0.0.1`; a job in a
    /// container sees the container port and the service's name there.
    pub host: Option<u16>,
    pub protocol: PortProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

/// A service's readiness check, run inside its container as Docker health checks are.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceHealth {
    pub cmd: HealthCommand,
    /// Time between checks.
    pub interval_ms: u64,
    /// Failed checks (after the start period) before the job fails with the service's
    /// log.
    pub retries: u32,
    /// Time after start during which failed checks do not count.
    pub start_period_ms: u64,
    /// Longest one check may take.
    pub timeout_ms: u64,
}

/// A command run in a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthCommand {
    /// Run by the container's `/bin/sh -c` (Docker's `CMD-SHELL`).
    Shell(String),
    /// Run as these arguments, without a shell (Docker's `CMD`).
    Exec(Vec<String>),
}

impl Default for HealthCommand {
    fn default() -> Self {
        Self::Exec(Vec::new())
    }
}

/// When a job's artifact is uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ArtifactWhen {
    /// When every step succeeded (steps with `continue-on-error` count as succeeded).
    #[default]
    OnSuccess,
    /// When the job failed or timed out, e.g. logs and screenshots of failing tests.
    OnFailure,
    /// Whatever the outcome, except a job cancelled before its first step.
    Always,
}

/// Test and coverage reports the coordinator reads.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Reports {
    /// Workspace-relative globs of JUnit XML files.
    pub junit: Vec<String>,
    /// A workspace-relative Cobertura XML or LCOV file.
    pub coverage: Option<String>,
}

/// A cache with where its paths live.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobCache {
    /// The key, restore keys and paths; a path starting with `~/` is under the job's
    /// `$HOME` (only when `home` is true), every other path is workspace-relative.
    pub spec: CacheSpec,
    /// The file said `home: true`: the cache may hold paths under `$HOME` (a package
    /// manager's download cache), which the agent confines to the job's own home.
    pub home: bool,
}

/// What the workspace holds before the first step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Checkout {
    /// `checkout: false`: an empty workspace (a job that only deploys or notifies).
    Skip,
    /// The run's source. A run without a repository (`gantry run` from a directory)
    /// gets the uploaded tree and ignores `depth` and `submodules`.
    Source(CheckoutSpec),
}

impl Default for Checkout {
    fn default() -> Self {
        Self::Source(CheckoutSpec::default())
    }
}

/// How much of the repository a checkout brings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckoutSpec {
    /// Commits of history in the workspace's `.git`; `None` is the whole history.
    pub depth: Option<u32>,
    /// Whether submodules are checked out too (with the repository's credentials, on
    /// the coordinator).
    pub submodules: bool,
    /// A workspace-relative directory to check out into; the workspace's root if `None`.
    pub path: Option<String>,
}

impl Default for CheckoutSpec {
    fn default() -> Self {
        Self {
            depth: Some(DEFAULT_CHECKOUT_DEPTH),
            submodules: false,
            path: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_execution_is_plain_and_each_option_is_not() {
        assert!(JobExecution::default().is_plain());
        let changed: Vec<JobExecution> = vec![
            JobExecution {
                steps: vec![StepOptions {
                    continue_on_error: true,
                    ..StepOptions::default()
                }],
                ..JobExecution::default()
            },
            JobExecution {
                services: vec![Service::default()],
                ..JobExecution::default()
            },
            JobExecution {
                image: Some(Image {
                    name: "x".into(),
                    pull: PullPolicy::Always,
                    credentials: None,
                }),
                ..JobExecution::default()
            },
            JobExecution {
                artifact_when: ArtifactWhen::Always,
                ..JobExecution::default()
            },
            JobExecution {
                checkout: Checkout::Skip,
                ..JobExecution::default()
            },
            JobExecution {
                caches: vec![JobCache::default(), JobCache::default()],
                ..JobExecution::default()
            },
        ];
        for execution in changed {
            assert!(!execution.is_plain(), "{execution:?}");
        }
        // A step list of defaults is as plain as an empty one.
        assert!(JobExecution {
            steps: vec![StepOptions::default(); 3],
            caches: vec![JobCache::default()],
            image: Some(Image {
                name: "x".into(),
                pull: PullPolicy::IfNotPresent,
                credentials: None,
            }),
            ..JobExecution::default()
        }
        .is_plain());
    }

    #[test]
    fn dispatch_keeps_its_version_2_encoding_and_dispatch_job_is_new() {
        use crate::{CoordinatorMessage, JobAssignment, JobId, RunId};
        let assignment = JobAssignment {
            job: JobId {
                run: RunId(1),
                index: 0,
            },
            attempt: 1,
            run: RunId(1),
            pipeline: "p".into(),
            name: "j".into(),
            steps: Vec::new(),
            env: BTreeMap::new(),
            timeout_ms: 1,
            kill_grace_ms: 1,
            image: None,
            secrets: BTreeMap::new(),
            source: None,
            downloads: false,
            artifact: None,
            cache: None,
        };
        // `Dispatch` is variant 2, as a version 2 agent reads it.
        let old = postcard::to_stdvec(&CoordinatorMessage::Dispatch(Box::new(assignment.clone())))
            .expect("encode");
        assert_eq!(old[0], 2);
        let new = CoordinatorMessage::DispatchJob {
            assignment: Box::new(assignment),
            execution: Box::new(JobExecution {
                checkout: Checkout::Skip,
                ..JobExecution::default()
            }),
        };
        let bytes = postcard::to_stdvec(&new).expect("encode");
        assert_eq!(bytes[0], 8, "appended after every existing variant");
        assert_eq!(
            postcard::from_bytes::<CoordinatorMessage>(&bytes).expect("decode"),
            new
        );
    }

    #[test]
    fn json_may_leave_fields_out() {
        let execution: JobExecution =
            serde_json::from_str(r#"{"checkout":{"Source":{"path":"src"}}}"#).expect("parse");
        assert_eq!(
            execution.checkout,
            Checkout::Source(CheckoutSpec {
                path: Some("src".into()),
                ..CheckoutSpec::default()
            })
        );
        assert!(execution.steps.is_empty());
    }
}
