//! Running a job's steps in Docker containers, through the Engine API on the local unix
//! socket (bollard, with no TLS, SSH or HTTP transport built in).
//!
//! Owns: finding and pinging the local engine ([`DockerClient`]), having the job's
//! image (through `runner::images`: its pull policy and credentials, and its digest), and
//! one container per step ([`DockerRunner`]): its configuration ([`container_config`],
//! pure), its output (into the same [`LogSink`] as shell steps), stopping it on cancel or
//! timeout, and removing it on every path. A job with services has its steps' containers
//! join the services' network ([`DockerRunner::on_network`]); every container carries
//! [`AGENT_LABEL`], so a crash leaves nothing the next start does not sweep. It must not
//! decide what a step's environment is (that is the job's), and must not leave a
//! container behind.
//!
//! Decisions, with their reasons:
//! - One container per step, not one per job with `docker exec` per step. A step is then
//!   the container's main process: its exit code comes from `wait`, stop/kill reach it
//!   directly, and the image needs no idle process (`sleep infinity`, which minimal
//!   images may lack) to keep a job container alive. Steps share state only through
//!   `/workspace`, as shell steps share it through the workspace directory.
//! - The container runs as the agent's own uid:gid, so every file a step creates in the
//!   bind-mounted workspace belongs to the agent and the agent's `remove_dir_all` of the
//!   workspace after the job cannot fail on root-owned files. Images whose tools insist
//!   on root do not suit this; an agent that runs as root gives them root.
//! - The step's script runs as PID 1 of the container, without an init. PID 1 ignores
//!   signals it has no handler for, so SIGTERM only ends a step whose script traps it;
//!   every other step is killed with SIGKILL when the grace period ends. An init
//!   (`--init`) would forward SIGTERM, but it depends on `docker-init` being installed
//!   next to the daemon, which is not true of every engine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_protocol::{JobAssignment, Labels};
use tracing::warn;

use super::cgroups::JobLimits;
use super::images::{self, ImageError, ImageRequest};
use super::isolation::Sandbox;
use super::{LogSink, Step, StepExit, StepRunner, Stop, DRAIN_DEADLINE};
use crate::base::labels::capabilities_with;

/// Where the job's workspace appears inside every step's container.
pub const CONTAINER_WORKSPACE: &str = "/workspace";
/// Where the job's temporary directory (`$GANTRY_OUTPUT` files) appears in containers.
pub const CONTAINER_TEMP: &str = "/gantry/tmp";
/// Label on every container the agent creates; its value is the job id (`RUN.INDEX`).
pub const JOB_LABEL: &str = "gantry.job";
/// Label with the job attempt.
pub const ATTEMPT_LABEL: &str = "gantry.attempt";
/// Label on every container and network the agent creates for a job (steps and
/// services): the agent's id, so a sweep at the next start removes only its own.
pub const AGENT_LABEL: &str = "gantry.agent";
/// Label with the 1-based step number.
pub const STEP_LABEL: &str = "gantry.step";
/// How long the engine may take to answer a ping before the agent calls it absent.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Default location of the engine's socket when `DOCKER_HOST` does not name one.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Bound on each engine call that is not waiting for a step (create, start, kill,
/// remove): a hung daemon must not hang the job forever.
const ENGINE_CALL_DEADLINE: Duration = Duration::from_secs(60);
/// Read/write timeout of the HTTP client, in seconds. Waiting for a step can take as
/// long as the job's timeout (up to a week), so bollard's two-minute default would cut
/// the `wait` call; our own deadlines bound everything instead.
const CLIENT_TIMEOUT_SECS: u64 = 8 * 24 * 3600;

/// The socket to use: the path of a `unix://` `DOCKER_HOST`, or `default` when
/// `DOCKER_HOST` is unset or empty. Other schemes (tcp, ssh, npipe) are not supported:
/// the agent talks to the engine on its own host only, so `None`.
pub fn socket_path(docker_host: Option<&str>, default: &Path) -> Option<PathBuf> {
    match docker_host.map(str::trim) {
        None | Some("") => Some(default.to_path_buf()),
        Some(host) => host
            .strip_prefix("unix://")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
    }
}

/// The socket this agent uses: `DOCKER_HOST` if it is a `unix://` address, else `default`.
pub fn configured_socket(default: &Path) -> Result<PathBuf, SocketError> {
    let host = std::env::var("DOCKER_HOST").ok();
    socket_path(host.as_deref(), default)
        .ok_or_else(|| SocketError::NotUnix(host.unwrap_or_default()))
}

/// `DOCKER_HOST` names an engine the agent does not talk to.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "DOCKER_HOST={0} is not a unix:// socket; the agent only talks to a local Docker engine"
    )]
    NotUnix(String),
}

/// The engine on a socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no Docker socket at {0}")]
    NoSocket(String),
    #[error("cannot use the Docker socket {address}: {source}")]
    Client {
        address: String,
        source: bollard::errors::Error,
    },
    #[error("the Docker engine at {address} does not answer: {source}")]
    NoAnswer {
        address: String,
        source: bollard::errors::Error,
    },
    #[error("the Docker engine at {address} did not answer a ping within {PING_TIMEOUT:?}")]
    PingTimeout { address: String },
}

/// Why a job's steps cannot run, or one step could not, in containers.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("this agent cannot run jobs in image {image}: {source}")]
    Socket { image: String, source: SocketError },
    #[error(
        "this agent cannot run jobs in image {image}: {source} (is Docker installed and running?)"
    )]
    Connect { image: String, source: ConnectError },
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{}", missing_image_message(image))]
    MissingImage { image: String },
    #[error("cannot inspect the image {image}: {source}")]
    Inspect { image: String, source: EngineError },
    #[error("cannot resolve the workspace {}: {source}", path.display())]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create a container from {image}: {source}")]
    Create { image: String, source: EngineError },
    #[error("cannot attach to the container: {0}")]
    Attach(EngineError),
    #[error("cannot start the container: {0}")]
    Start(EngineError),
    #[error("waiting for the container failed: {0}")]
    Wait(bollard::errors::Error),
    #[error("the Docker engine closed the wait for the container")]
    WaitClosed,
}

/// The engine this agent uses cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("{0} (is Docker installed and running?)")]
    Connect(#[from] ConnectError),
}

/// A client of the engine on a local socket, after a ping answered within
/// [`PING_TIMEOUT`].
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
}

impl DockerClient {
    /// Connects to the engine on `socket` and pings it.
    pub async fn connect(socket: &Path) -> Result<Self, ConnectError> {
        let address = socket.display().to_string();
        if !socket.exists() {
            return Err(ConnectError::NoSocket(address));
        }
        let docker =
            Docker::connect_with_unix(&address, CLIENT_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|source| ConnectError::Client {
                    address: address.clone(),
                    source,
                })?;
        match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
            Ok(Ok(_)) => Ok(Self { docker }),
            Ok(Err(source)) => Err(ConnectError::NoAnswer { address, source }),
            Err(_) => Err(ConnectError::PingTimeout { address }),
        }
    }

    /// Connects to the engine this agent uses (see [`configured_socket`]) and pings it.
    pub async fn local() -> Result<Self, LocalError> {
        let socket = configured_socket(Path::new(DEFAULT_SOCKET))?;
        Ok(Self::connect(&socket).await?)
    }

    /// The engine's API.
    pub(crate) fn engine(&self) -> &Docker {
        &self.docker
    }

    /// Whether `image` is on this host. Never pulls.
    pub(crate) async fn check_image(&self, image: &str) -> Result<(), DockerError> {
        match bounded(self.docker.inspect_image(image)).await {
            Ok(_) => Ok(()),
            Err(EngineError::Api(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })) => Err(DockerError::MissingImage {
                image: image.to_owned(),
            }),
            Err(source) => Err(DockerError::Inspect {
                image: image.to_owned(),
                source,
            }),
        }
    }
}

/// Whether a Docker engine answers on this host (see [`configured_socket`]). Blocks for
/// at most about [`PING_TIMEOUT`]; safe to call from inside an async runtime, because
/// the ping runs on a thread and runtime of its own.
pub fn available(default_socket: &Path) -> bool {
    let Ok(socket) = configured_socket(default_socket) else {
        return false;
    };
    let probe = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(DockerClient::connect(&socket)).ok()
    });
    probe.join().ok().flatten().is_some()
}

/// What this host can run: always `shell`, plus `docker` when a Docker engine answers a
/// ping within two seconds, on the `unix://` socket of `DOCKER_HOST` or else on
/// `docker_socket`. A socket file alone is not enough: a stopped daemon leaves it behind.
/// Checked once, at startup.
pub fn capabilities(docker_socket: &Path) -> Vec<String> {
    capabilities_with(available(docker_socket))
}

/// The message for an image that is not on this host (a service's: job images go
/// through `runner::images`, whose own message names the pull policy).
pub fn missing_image_message(image: &str) -> String {
    format!(
        "the image {image} is not on this host; load it with `docker load -i FILE` (or build it) on the agent"
    )
}

/// Runs a job's steps in containers of its image: one container per step, the job's
/// workspace bind-mounted into each.
#[derive(Clone)]
pub struct DockerRunner {
    client: DockerClient,
    image: String,
    /// The absolute host path of the job's workspace.
    host_workspace: PathBuf,
    /// The absolute host path of the job's temporary directory.
    host_temp: PathBuf,
    /// `uid:gid` the steps run as.
    user: String,
    /// Memory, processes and CPU each step's container may use.
    limits: JobLimits,
    /// The job's network (when it has services), which every step's container joins.
    network: Option<String>,
    /// This agent's id, labelled on every step's container ([`AGENT_LABEL`]) so a later
    /// start sweeps what a crash left.
    agent: Option<String>,
    /// The digest of the image the steps run in (`images::pick_digest`).
    digest: String,
}

impl DockerRunner {
    /// Steps' containers join `network` (the job's services' network, reaching each
    /// service by its name) and carry `agent`'s label.
    #[must_use]
    pub fn on_network(mut self, network: Option<&str>, agent: &str) -> Self {
        self.network = network.map(str::to_owned);
        self.agent = Some(agent.to_owned());
        self
    }

    /// Connects to the local engine (see [`configured_socket`]) and has the image as its
    /// pull policy says (pulling says so in `log`). An isolated job's steps run as its
    /// own uid:gid, with its limits.
    pub async fn prepare(
        request: &ImageRequest,
        workspace: &Path,
        temp: &Path,
        sandbox: Option<&Sandbox>,
        log: &LogSink,
    ) -> Result<Self, DockerError> {
        let image = request.name.as_str();
        let socket =
            configured_socket(Path::new(DEFAULT_SOCKET)).map_err(|source| DockerError::Socket {
                image: image.to_owned(),
                source,
            })?;
        let mut runner = Self::prepare_at(&socket, request, workspace, temp, log).await?;
        if let Some(sandbox) = sandbox {
            runner.user = format!("{}:{}", sandbox.uid, sandbox.gid);
            runner.limits = sandbox.limits;
        }
        Ok(runner)
    }

    /// [`DockerRunner::prepare`] with the engine on `socket`.
    pub async fn prepare_at(
        socket: &Path,
        request: &ImageRequest,
        workspace: &Path,
        temp: &Path,
        log: &LogSink,
    ) -> Result<Self, DockerError> {
        let image = request.name.as_str();
        let client =
            DockerClient::connect(socket)
                .await
                .map_err(|source| DockerError::Connect {
                    image: image.to_owned(),
                    source,
                })?;
        let digest = images::ensure(&client.docker, request, log).await?;
        let host_workspace =
            std::path::absolute(workspace).map_err(|source| DockerError::Workspace {
                path: workspace.to_path_buf(),
                source,
            })?;
        let host_temp = std::path::absolute(temp).map_err(|source| DockerError::Workspace {
            path: temp.to_path_buf(),
            source,
        })?;
        Ok(Self {
            client,
            image: image.to_owned(),
            host_workspace,
            host_temp,
            user: agent_user(),
            limits: JobLimits::default(),
            network: None,
            agent: None,
            digest,
        })
    }

    /// The digest of the image the steps run in: the registry's manifest digest, or the
    /// image ID of one only built or loaded here.
    pub fn image_digest(&self) -> &str {
        &self.digest
    }

    /// Runs one step in a container of its own and removes the container afterwards,
    /// whatever happened.
    async fn run_container(
        &self,
        spec: &StepContainer<'_>,
        log: &LogSink,
        halt: &mut Stop,
    ) -> Result<StepExit, DockerError> {
        let docker = &self.client.docker;
        let name = format!(
            "gantry-{}-a{}-s{}-{:08x}",
            spec.job.job,
            spec.job.attempt,
            spec.step_number,
            fastrand::u32(..)
        );
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let config = container_config(&self.image, spec);
        let created = bounded(docker.create_container(Some(options), config))
            .await
            .map_err(|source| DockerError::Create {
                image: self.image.clone(),
                source,
            })?;
        let mut guard = RemoveOnDrop {
            docker: Some(docker.clone()),
            id: created.id.clone(),
        };
        let exit = self.drive(&created.id, log, halt).await;
        let removed = remove_container(docker, &created.id).await;
        guard.docker = None;
        if let Err(e) = removed {
            warn!(container = %created.id, "cannot remove the container: {e}");
            let _ = log
                .send(format!("gantry: cannot remove container {name}: {e}\n").into_bytes())
                .await;
        }
        exit
    }

    /// Attaches, starts and waits for the container; stops it on cancel or timeout.
    async fn drive(
        &self,
        id: &str,
        log: &LogSink,
        halt: &mut Stop,
    ) -> Result<StepExit, DockerError> {
        let docker = &self.client.docker;
        // Attach before start, so not a byte of output is missed.
        let attach = AttachContainerOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = bounded(docker.attach_container(id, Some(attach)))
            .await
            .map_err(DockerError::Attach)?;
        let reader = tokio::spawn(pump(attached.output, log.clone()));
        let _abort = AbortOnDrop(reader.abort_handle());
        bounded(docker.start_container(id, None))
            .await
            .map_err(DockerError::Start)?;
        // `wait` with the default condition ("not-running") answers at once for a
        // container that has already exited, so asking after start loses nothing.
        let mut wait = docker.wait_container(id, None);
        let stopped = tokio::select! {
            status = wait.next() => Ok(wait_result(status)?),
            reason = halt.requested() => Err(reason),
        };
        let exit = match stopped {
            Ok(code) => StepExit::Code(code),
            Err(reason) => {
                self.signal(id, "SIGTERM").await;
                if tokio::time::timeout(halt.grace, wait.next()).await.is_err() {
                    self.signal(id, "SIGKILL").await;
                    let _ = tokio::time::timeout(ENGINE_CALL_DEADLINE, wait.next()).await;
                }
                StepExit::Stopped(reason)
            }
        };
        let _ = tokio::time::timeout(DRAIN_DEADLINE, reader).await;
        Ok(exit)
    }

    /// Sends `signal` to the container's main process; one that has exited is fine.
    async fn signal(&self, id: &str, signal: &str) {
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        if let Err(e) = bounded(self.client.docker.kill_container(id, Some(options))).await {
            tracing::debug!(container = %id, "{signal} not delivered: {e}");
        }
    }
}

impl StepRunner for DockerRunner {
    type Error = DockerError;

    fn workspace(&self) -> String {
        CONTAINER_WORKSPACE.to_owned()
    }

    fn temp_dir(&self) -> String {
        CONTAINER_TEMP.to_owned()
    }

    /// Nothing from the agent: a container gets its `PATH` from its image.
    fn base_env(&self) -> Labels {
        Labels::new()
    }

    async fn run(
        &self,
        step: &Step<'_>,
        log: &LogSink,
        halt: &mut Stop,
    ) -> Result<StepExit, DockerError> {
        let spec = StepContainer {
            job: step.job,
            step_number: step.number,
            command: step.command.clone(),
            env: step.env.clone(),
            host_workspace: self.host_workspace.clone(),
            host_temp: Some(self.host_temp.clone()),
            working_directory: step.working_directory,
            user: self.user.clone(),
            limits: self.limits,
            network: self.network.as_deref(),
            agent: self.agent.as_deref(),
        };
        self.run_container(&spec, log, halt).await
    }
}

/// Removes the container, killing it first if it still runs.
pub(crate) async fn remove_container(docker: &Docker, id: &str) -> Result<(), EngineError> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match bounded(docker.remove_container(id, Some(options))).await {
        Err(EngineError::Api(bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        })) => Ok(()),
        other => other,
    }
}

/// The exit code from the first answer of `wait`. bollard reports a non-zero exit as an
/// error carrying the code; a stream that ends without an answer is a lost engine.
fn wait_result(
    status: Option<Result<bollard::models::ContainerWaitResponse, bollard::errors::Error>>,
) -> Result<i32, DockerError> {
    match status {
        Some(Ok(response)) => Ok(clamp_code(response.status_code)),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
            Ok(clamp_code(code))
        }
        Some(Err(e)) => Err(DockerError::Wait(e)),
        None => Err(DockerError::WaitClosed),
    }
}

fn clamp_code(code: i64) -> i32 {
    i32::try_from(code).unwrap_or(i32::MAX)
}

/// Everything about one step's container that comes from the job: the input of
/// [`container_config`].
#[derive(Debug, Clone)]
pub struct StepContainer<'a> {
    pub job: &'a JobAssignment,
    /// 1-based, as in the log headers and `GANTRY_STEP`.
    pub step_number: usize,
    /// The step's program and arguments (see [`crate::runner::Step::command`]).
    pub command: Vec<String>,
    /// The step's environment, as the job builds it for containers.
    pub env: Labels,
    /// The job's workspace on this host; must be absolute.
    pub host_workspace: PathBuf,
    /// The job's temporary directory on this host, mounted at [`CONTAINER_TEMP`].
    pub host_temp: Option<PathBuf>,
    /// The step's `working-directory`, already checked to stay inside the workspace.
    pub working_directory: Option<&'a str>,
    /// `uid:gid` the step runs as.
    pub user: String,
    /// Memory (swap included), processes and CPU the container may use.
    pub limits: JobLimits,
    /// The job's network, when it has services.
    pub network: Option<&'a str>,
    /// This agent's id, for the container's agent label.
    pub agent: Option<&'a str>,
}

/// The container of one step: the image, the step's command, its environment and nothing
/// else, the workspace bind-mounted at [`CONTAINER_WORKSPACE`] (and the job's temporary
/// directory at [`CONTAINER_TEMP`]), the step's working directory under it, the agent's
/// (or the isolated job's) uid:gid, the job's limits, and labels naming the job.
pub fn container_config(image: &str, spec: &StepContainer<'_>) -> ContainerCreateBody {
    let (memory, pids_limit, nano_cpus) = spec.limits.docker();
    let working_dir = match spec.working_directory {
        Some(rel) => format!(
            "{CONTAINER_WORKSPACE}/{}",
            rel.trim_start_matches("./").trim_end_matches('/')
        ),
        None => CONTAINER_WORKSPACE.to_owned(),
    };
    let mut labels = HashMap::from([
        (JOB_LABEL.to_owned(), spec.job.job.to_string()),
        (ATTEMPT_LABEL.to_owned(), spec.job.attempt.to_string()),
        (STEP_LABEL.to_owned(), spec.step_number.to_string()),
    ]);
    if let Some(agent) = spec.agent {
        labels.insert(AGENT_LABEL.to_owned(), agent.to_owned());
    }
    ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(spec.command.clone()),
        // An empty entrypoint: the image's own entrypoint must not wrap the step.
        entrypoint: Some(Vec::new()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: Some(working_dir),
        user: Some(spec.user.clone()),
        labels: Some(labels),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(HostConfig {
            mounts: Some(
                std::iter::once((CONTAINER_WORKSPACE, &spec.host_workspace))
                    .chain(spec.host_temp.iter().map(|t| (CONTAINER_TEMP, t)))
                    .map(|(target, source)| Mount {
                        target: Some(target.to_owned()),
                        source: Some(source.display().to_string()),
                        typ: Some(MountType::BIND),
                        read_only: Some(false),
                        ..Mount::default()
                    })
                    .collect(),
            ),
            memory,
            // Memory plus swap equal to memory: no swap beyond the limit.
            memory_swap: memory,
            pids_limit,
            nano_cpus,
            network_mode: spec.network.map(str::to_owned),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

/// `uid:gid` of this agent process, for [`StepContainer::user`].
#[allow(unsafe_code)]
pub fn agent_user() -> String {
    // SAFETY: getuid(2) and getgid(2) cannot fail and touch no memory of ours.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!("{uid}:{gid}")
}

/// Copies the container's output into the log until the attach stream ends.
async fn pump(
    mut output: std::pin::Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                > + Send,
        >,
    >,
    log: LogSink,
) {
    while let Some(Ok(piece)) = output.next().await {
        let bytes = piece.into_bytes();
        if !bytes.is_empty() && log.send(bytes.to_vec()).await.is_err() {
            return;
        }
    }
}

/// An engine call failed, or took longer than [`ENGINE_CALL_DEADLINE`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Api(#[from] bollard::errors::Error),
    #[error("the Docker engine did not answer within {ENGINE_CALL_DEADLINE:?}")]
    Deadline,
}

pub(crate) async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(ENGINE_CALL_DEADLINE, call).await {
        Ok(result) => result.map_err(EngineError::Api),
        Err(_) => Err(EngineError::Deadline),
    }
}

/// Removes a container when dropped while still armed: the job's task was aborted (the
/// agent is shutting down) between create and the normal removal.
struct RemoveOnDrop {
    docker: Option<Docker>,
    id: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else {
            return;
        };
        let id = std::mem::take(&mut self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = remove_container(&docker, &id).await {
                    warn!(container = %id, "cannot remove the container: {e}");
                }
            });
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::{JobId, RunId, StepSpec};

    fn job() -> JobAssignment {
        JobAssignment {
            job: JobId {
                run: RunId(7),
                index: 2,
            },
            attempt: 3,
            run: RunId(7),
            pipeline: "p".into(),
            name: "j".into(),
            steps: vec![StepSpec {
                name: "s".into(),
                run: "echo hi".into(),
                working_directory: None,
                env: Labels::new(),
            }],
            env: Labels::new(),
            timeout_ms: 1000,
            kill_grace_ms: 500,
            image: Some("img:1".into()),
            secrets: Labels::new(),
            source: None,
            downloads: false,
            artifact: None,
            cache: None,
        }
    }

    fn spec<'a>(job: &'a JobAssignment, working_directory: Option<&'a str>) -> StepContainer<'a> {
        StepContainer {
            job,
            step_number: 1,
            command: vec![
                "/bin/sh".to_owned(),
                "-e".to_owned(),
                "-c".to_owned(),
                "echo hi".to_owned(),
            ],
            env: Labels::from([
                ("A".to_owned(), "1".to_owned()),
                ("GANTRY_WORKSPACE".to_owned(), "/workspace".to_owned()),
            ]),
            host_workspace: PathBuf::from("/var/lib/gantry-agent/work/7.2-3"),
            host_temp: None,
            working_directory,
            user: "1000:1000".into(),
            limits: JobLimits {
                memory: Some(64 << 20),
                pids: Some(100),
                cpus: Some(0.5),
            },
            network: None,
            agent: None,
        }
    }

    #[test]
    fn the_container_runs_the_script_with_only_the_step_environment() {
        let j = job();
        let config = container_config("img:1", &spec(&j, None));
        assert_eq!(config.image.as_deref(), Some("img:1"));
        assert_eq!(
            config.cmd,
            Some(vec![
                "/bin/sh".to_owned(),
                "-e".to_owned(),
                "-c".to_owned(),
                "echo hi".to_owned()
            ])
        );
        assert_eq!(config.entrypoint, Some(Vec::new()));
        assert_eq!(
            config.env,
            Some(vec![
                "A=1".to_owned(),
                "GANTRY_WORKSPACE=/workspace".to_owned()
            ])
        );
        assert_eq!(config.working_dir.as_deref(), Some("/workspace"));
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        let labels = config.labels.expect("labels");
        assert_eq!(labels.get(JOB_LABEL).map(String::as_str), Some("7.2"));
        assert_eq!(labels.get(ATTEMPT_LABEL).map(String::as_str), Some("3"));
        assert_eq!(labels.get(STEP_LABEL).map(String::as_str), Some("1"));
        let host = config.host_config.expect("host config");
        let mounts = host.mounts.expect("mounts");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(
            mounts[0].source.as_deref(),
            Some("/var/lib/gantry-agent/work/7.2-3")
        );
        assert_eq!(mounts[0].target.as_deref(), Some("/workspace"));
        // Nothing else from the host: no network mode, privileges or extra binds.
        assert!(host.binds.is_none() && host.privileged.is_none() && host.network_mode.is_none());
        // The job's limits, swap included in the memory one.
        assert_eq!(
            (
                host.memory,
                host.memory_swap,
                host.pids_limit,
                host.nano_cpus
            ),
            (Some(64 << 20), Some(64 << 20), Some(100), Some(500_000_000))
        );
    }

    #[test]
    fn the_working_directory_is_under_the_container_workspace() {
        let j = job();
        for (rel, expected) in [
            ("sub/dir", "/workspace/sub/dir"),
            ("./sub/", "/workspace/sub"),
        ] {
            let config = container_config("img:1", &spec(&j, Some(rel)));
            assert_eq!(config.working_dir.as_deref(), Some(expected), "{rel}");
        }
    }

    #[test]
    fn the_socket_comes_from_a_unix_docker_host_or_the_default() {
        let default = Path::new("/var/run/docker.sock");
        assert_eq!(socket_path(None, default), Some(default.to_path_buf()));
        assert_eq!(socket_path(Some(""), default), Some(default.to_path_buf()));
        assert_eq!(
            socket_path(Some("unix:///run/user/1000/docker.sock"), default),
            Some(PathBuf::from("/run/user/1000/docker.sock"))
        );
        assert_eq!(socket_path(Some("tcp://10.0.0.1:2376"), default), None);
        assert_eq!(socket_path(Some("unix://"), default), None);
    }

    #[test]
    fn wait_answers_map_to_exit_codes() {
        let ok = bollard::models::ContainerWaitResponse {
            status_code: 0,
            error: None,
        };
        assert_eq!(wait_result(Some(Ok(ok))).ok(), Some(0));
        let killed = bollard::errors::Error::DockerContainerWaitError {
            error: String::new(),
            code: 137,
        };
        assert_eq!(wait_result(Some(Err(killed))).ok(), Some(137));
        assert!(wait_result(None).is_err());
    }

    #[tokio::test]
    async fn an_image_job_without_an_engine_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _rx) = tokio::sync::mpsc::channel(8);
        let request = ImageRequest {
            name: "app:1".into(),
            pull: gantry_protocol::PullPolicy::Never,
            auth: None,
        };
        let message = DockerRunner::prepare_at(
            &dir.path().join("absent.sock"),
            &request,
            dir.path(),
            dir.path(),
            &log,
        )
        .await
        .err()
        .expect("no engine")
        .to_string();
        assert!(
            message.starts_with("this agent cannot run jobs in image app:1: no Docker socket at"),
            "{message}"
        );
    }

    #[test]
    fn an_absent_socket_means_no_docker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_a_socket = dir.path().join("docker.sock");
        std::fs::write(&not_a_socket, b"").expect("touch");
        // A plain file where the socket should be: nothing answers the ping.
        if std::env::var_os("DOCKER_HOST").is_none() {
            assert!(!available(&dir.path().join("absent.sock")));
            assert!(!available(&not_a_socket));
        }
    }

    #[test]
    fn docker_capability_follows_the_engine_not_the_socket_file() {
        assert_eq!(capabilities_with(false), ["shell"]);
        assert_eq!(capabilities_with(true), ["shell", "docker"]);
        if std::env::var_os("DOCKER_HOST").is_none() {
            // A socket file that nothing listens on is no Docker.
            let dir = tempfile::tempdir().expect("tempdir");
            let socket = dir.path().join("docker.sock");
            std::fs::write(&socket, b"").expect("touch");
            assert_eq!(capabilities(&socket), ["shell"]);
        }
    }
}
