//! Service containers beside a job (`services:`): a database, a cache, a queue, started
//! before the first step on a Docker network of the job's own and removed after the
//! last, whatever happened.
//!
//! Owns: the job's network (`gantry-job-<JOB>-<ATTEMPT>`), each service's container
//! ([`service_config`], pure: the image's entrypoint, the service's `command`, its
//! environment, its ports published on `127.0.0.1`, Docker's own health check from
//! `health:`, labels naming the job and this agent), waiting until every service is
//! healthy (or failing with the service's name and its last check's output), the
//! addresses a job's steps reach them at ([`service_env`], pure), the services' last
//! [`SERVICE_LOG_LINES`] lines for the job log, removal of every container and the
//! network, and [`sweep`]: what an agent that died mid-job left, removed at the next
//! start by the [`AGENT_LABEL`] naming this agent.
//!
//! It must not pull images (as the step runner, it runs only images on this host), must
//! not decide when a job fails (it reports; the job decides) and must not touch
//! containers or networks of another agent.
//!
//! Decisions, with their reasons:
//! - Readiness is Docker's own health check (`Healthcheck` in the container's
//!   configuration), not `docker exec` from the agent: the engine already implements
//!   interval, timeout, retries and start period exactly as the file's keys mean them,
//!   keeps the last outputs, and the agent only polls `inspect`.
//! - Ports are published on `127.0.0.1` only, never on every interface: a test
//!   database is not a service for the network the agent sits on. An unnamed host port
//!   lets the engine choose a free one, so two jobs on one agent never collide; the job
//!   learns it from `GANTRY_SERVICE_<NAME>_PORT_<CONTAINER>`.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HealthStatusEnum, HostConfig,
    NetworkCreateRequest, NetworkingConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_protocol::{Attempt, HealthCommand, JobId, Labels, PortProtocol, Service, ServicePort};
use tracing::{info, warn};

pub use super::docker::AGENT_LABEL;
use super::docker::{
    bounded, remove_container, DockerClient, DockerError, EngineError, LocalError, ATTEMPT_LABEL,
    JOB_LABEL,
};
use super::LogSink;

/// Label on a service's container: the service's name.
pub const SERVICE_LABEL: &str = "gantry.service";
/// Lines of each service's output copied into the log of a job that failed.
pub const SERVICE_LOG_LINES: usize = 200;
/// Longest health-check output quoted in a failure (Docker keeps up to 4 KiB).
const HEALTH_OUTPUT_BYTES: usize = 1024;
/// Time between two looks at a starting service.
const POLL: Duration = Duration::from_millis(200);
/// Slack on top of a service's own health budget before the agent gives up waiting for
/// the engine to decide (an engine slow to start the container, or to run checks).
const HEALTH_SLACK: Duration = Duration::from_secs(30);
/// How long a service without a health check must keep running to count as started.
const SETTLE: Duration = Duration::from_millis(500);

/// Whose services these are: the names and labels of their containers and network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceOwner {
    /// This agent's id (see [`AGENT_LABEL`]).
    pub agent: String,
    pub job: JobId,
    pub attempt: Attempt,
}

impl ServiceOwner {
    /// The job's network: `gantry-job-<JOB>-<ATTEMPT>-<AGENT>`. The agent's id makes
    /// it unique on a host that several agents (of several coordinators, whose job ids
    /// repeat) share: container names must be unique, and network names had better be.
    pub fn network(&self) -> String {
        format!("gantry-job-{}-{}-{}", self.job, self.attempt, self.agent)
    }

    /// A service's container: `gantry-job-<JOB>-<ATTEMPT>-<AGENT>-<SERVICE>`.
    pub fn container(&self, service: &str) -> String {
        format!("{}-{service}", self.network())
    }

    /// A label filter matching everything of this job attempt on this agent.
    pub fn filter(&self) -> Vec<String> {
        let mut labels: Vec<String> = self
            .labels()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        labels
    }

    /// The labels of the job's network and containers.
    pub fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (AGENT_LABEL.to_owned(), self.agent.clone()),
            (JOB_LABEL.to_owned(), self.job.to_string()),
            (ATTEMPT_LABEL.to_owned(), self.attempt.to_string()),
        ])
    }
}

/// Why a job's services did not come up, or could not be looked after.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("this agent cannot start the job's services: {0}")]
    Docker(#[source] LocalError),
    #[error("service {service}: {source}")]
    Image {
        service: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot create the job's network {network}: {source}")]
    Network {
        network: String,
        #[source]
        source: EngineError,
    },
    #[error("cannot create service {service}'s container from {image}: {source}")]
    Create {
        service: String,
        image: String,
        #[source]
        source: EngineError,
    },
    #[error("cannot start service {service}: {source}")]
    Start {
        service: String,
        #[source]
        source: EngineError,
    },
    #[error("cannot inspect service {service}: {source}")]
    Inspect {
        service: String,
        #[source]
        source: EngineError,
    },
    #[error("service {service} exited with code {code} before it was ready (its output is below)")]
    Exited { service: String, code: i64 },
    #[error("service {service} is unhealthy: {checks} health checks failed in a row; the last said: {last}")]
    Unhealthy {
        service: String,
        checks: i64,
        last: String,
    },
    #[error(
        "service {service} was not healthy within {waited:?}; the last health check said: {last}"
    )]
    NotReady {
        service: String,
        waited: Duration,
        last: String,
    },
}

/// A service that runs, with the loopback ports its container ports were published on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub name: String,
    /// Container port and protocol to the loopback port the engine published it on.
    pub ports: Vec<(ServicePort, u16)>,
}

/// The environment variable naming a service's port: `GANTRY_SERVICE_<NAME>_PORT_<PORT>`
/// (NAME upper-cased, `-` as `_`; `_UDP` appended for a UDP port).
pub fn port_variable(service: &str, port: &ServicePort) -> String {
    let udp = match port.protocol {
        PortProtocol::Tcp => "",
        PortProtocol::Udp => "_UDP",
    };
    format!("{}_PORT_{}{udp}", service_prefix(service), port.container)
}

fn service_prefix(service: &str) -> String {
    format!(
        "GANTRY_SERVICE_{}",
        service.to_ascii_uppercase().replace('-', "_")
    )
}

/// What a job's steps see of its services: for each, `GANTRY_SERVICE_<NAME>_HOST` and a
/// `GANTRY_SERVICE_<NAME>_PORT_<PORT>` per published port, the address a step reaches it
/// at. A step on the host (`in_container` false) reaches `127.0.0.1` and the published
/// loopback port; a step in a container reaches the service by name on the job's
/// network, at the container port.
pub fn service_env(started: &[Started], in_container: bool) -> Labels {
    let mut env = Labels::new();
    for service in started {
        let host = if in_container {
            service.name.clone()
        } else {
            "127.0.0.1".to_owned()
        };
        env.insert(format!("{}_HOST", service_prefix(&service.name)), host);
        for (port, published) in &service.ports {
            let value = if in_container {
                port.container
            } else {
                *published
            };
            env.insert(port_variable(&service.name, port), value.to_string());
        }
    }
    env
}

fn port_key(port: ServicePort) -> String {
    let protocol = match port.protocol {
        PortProtocol::Tcp => "tcp",
        PortProtocol::Udp => "udp",
    };
    format!("{}/{protocol}", port.container)
}

/// The container of one service, `fill` having put secrets into its environment and
/// commands: its image with the image's own entrypoint, `command` replacing the image's
/// command when given, its ports published on `127.0.0.1` (on the port the file names,
/// or one the engine picks), Docker's health check from `health:`, attached to
/// `network` under the service's name, labelled with `owner`'s labels and the service.
pub fn service_config(
    owner: &ServiceOwner,
    service: &Service,
    fill: &(dyn Fn(&str) -> String + Sync),
) -> ContainerCreateBody {
    let network = owner.network();
    let mut labels = owner.labels();
    labels.insert(SERVICE_LABEL.to_owned(), service.name.clone());
    let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = service
        .ports
        .iter()
        .map(|port| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".to_owned()),
                // Empty: the engine picks a free port.
                host_port: Some(port.host.map(|p| p.to_string()).unwrap_or_default()),
            };
            (port_key(*port), Some(vec![binding]))
        })
        .collect();
    let healthcheck = service.health.as_ref().map(|health| {
        let test = match &health.cmd {
            HealthCommand::Shell(script) => vec!["CMD-SHELL".to_owned(), fill(script)],
            HealthCommand::Exec(args) => std::iter::once("CMD".to_owned())
                .chain(args.iter().map(|a| fill(a)))
                .collect(),
        };
        let nanos = |ms: u64| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        HealthConfig {
            test: Some(test),
            interval: Some(nanos(health.interval_ms)),
            timeout: Some(nanos(health.timeout_ms)),
            retries: Some(i64::from(health.retries)),
            start_period: Some(nanos(health.start_period_ms)),
            start_interval: None,
        }
    });
    ContainerCreateBody {
        image: Some(service.image.name.clone()),
        cmd: (!service.command.is_empty())
            .then(|| service.command.iter().map(|a| fill(a)).collect()),
        env: Some(
            service
                .env
                .iter()
                .map(|(k, v)| format!("{k}={}", fill(v)))
                .collect(),
        ),
        exposed_ports: Some(service.ports.iter().map(|p| port_key(*p)).collect()),
        healthcheck,
        labels: Some(labels),
        host_config: Some(HostConfig {
            network_mode: Some(network.clone()),
            port_bindings: Some(port_bindings),
            ..HostConfig::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network,
                EndpointSettings {
                    aliases: Some(vec![service.name.clone()]),
                    ..EndpointSettings::default()
                },
            )])),
        }),
        ..ContainerCreateBody::default()
    }
}

/// How long to wait for a service to become healthy: its start period, then as many
/// checks as it may fail (each an interval plus its timeout), plus [`HEALTH_SLACK`].
pub fn health_budget(service: &Service) -> Duration {
    let ms = service.health.as_ref().map_or(0, |h| {
        h.start_period_ms.saturating_add(
            (h.interval_ms.saturating_add(h.timeout_ms)).saturating_mul(u64::from(h.retries) + 1),
        )
    });
    Duration::from_millis(ms) + HEALTH_SLACK
}

/// A job's services on this host: what was created, so that all of it is removed.
/// Dropped without [`Services::remove`] (the job's task was aborted), it removes them
/// in the background.
pub struct Services {
    client: DockerClient,
    owner: ServiceOwner,
    network: Option<String>,
    /// Service name and container id, in start order.
    containers: Vec<(String, String)>,
}

impl Services {
    /// Connects to the local engine; nothing is created yet.
    pub async fn connect(owner: ServiceOwner) -> Result<Self, ServiceError> {
        let client = DockerClient::local().await.map_err(ServiceError::Docker)?;
        Ok(Self {
            client,
            owner,
            network: None,
            containers: Vec::new(),
        })
    }

    /// The job's network, once created; steps' containers join it.
    pub fn network(&self) -> Option<String> {
        self.network.as_ref().map(|_| self.owner.network())
    }

    /// Creates the job's network, then starts each service in order and waits until it
    /// is ready: healthy when it has a health check, else running. `log` hears what
    /// happens; `fill` puts secrets into environments and commands.
    pub async fn start(
        &mut self,
        services: &[Service],
        fill: &(dyn Fn(&str) -> String + Sync),
        log: &LogSink,
    ) -> Result<Vec<Started>, ServiceError> {
        for service in services {
            self.client
                .check_image(&service.image.name)
                .await
                .map_err(|source| ServiceError::Image {
                    service: service.name.clone(),
                    source,
                })?;
        }
        let docker = self.client.engine().clone();
        let network = self.owner.network();
        let request = NetworkCreateRequest {
            name: network.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(self.owner.labels()),
            ..NetworkCreateRequest::default()
        };
        let created = bounded(docker.create_network(request))
            .await
            .map_err(|source| ServiceError::Network {
                network: network.clone(),
                source,
            })?;
        // Removed by id: Docker allows two networks of one name.
        self.network = Some(created.id);
        let mut started = Vec::new();
        for service in services {
            let began = tokio::time::Instant::now();
            let name = self.owner.container(&service.name);
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            let created = bounded(
                docker.create_container(Some(options), service_config(&self.owner, service, fill)),
            )
            .await
            .map_err(|source| ServiceError::Create {
                service: service.name.clone(),
                image: service.image.name.clone(),
                source,
            })?;
            self.containers
                .push((service.name.clone(), created.id.clone()));
            bounded(docker.start_container(&created.id, None))
                .await
                .map_err(|source| ServiceError::Start {
                    service: service.name.clone(),
                    source,
                })?;
            let ports = self.ready(service, &created.id).await?;
            let _ = log
                .send(
                    format!(
                        "\u{2139} service {} ({}) is ready after {} ms{}\n",
                        service.name,
                        service.image.name,
                        began.elapsed().as_millis(),
                        published(&ports)
                    )
                    .into_bytes(),
                )
                .await;
            started.push(Started {
                name: service.name.clone(),
                ports,
            });
        }
        Ok(started)
    }

    /// Waits until the service is healthy (or running, without a check), then reads the
    /// loopback ports its ports were published on.
    async fn ready(
        &self,
        service: &Service,
        id: &str,
    ) -> Result<Vec<(ServicePort, u16)>, ServiceError> {
        let docker = self.client.engine();
        let budget = health_budget(service);
        let began = tokio::time::Instant::now();
        let inspect_err = |source| ServiceError::Inspect {
            service: service.name.clone(),
            source,
        };
        let mut last = String::from("(no check has finished yet)");
        loop {
            let inspected = bounded(docker.inspect_container(id, None))
                .await
                .map_err(inspect_err)?;
            let state = inspected.state.unwrap_or_default();
            if state.running != Some(true) {
                return Err(ServiceError::Exited {
                    service: service.name.clone(),
                    code: state.exit_code.unwrap_or(-1),
                });
            }
            let health = state.health.unwrap_or_default();
            if let Some(result) = health.log.as_ref().and_then(|l| l.last()) {
                last = describe_check(result.exit_code, result.output.as_deref());
            }
            let ready = match (&service.health, health.status) {
                (None, _) => began.elapsed() >= SETTLE,
                (Some(_), Some(HealthStatusEnum::HEALTHY)) => true,
                (Some(_), Some(HealthStatusEnum::UNHEALTHY)) => {
                    return Err(ServiceError::Unhealthy {
                        service: service.name.clone(),
                        checks: health.failing_streak.unwrap_or_default(),
                        last,
                    });
                }
                (Some(_), _) => false,
            };
            if ready {
                let bound = inspected
                    .network_settings
                    .and_then(|n| n.ports)
                    .unwrap_or_default();
                return Ok(service
                    .ports
                    .iter()
                    .filter_map(|port| {
                        let host = bound
                            .get(&port_key(*port))?
                            .as_ref()?
                            .iter()
                            .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())?;
                        Some((*port, host))
                    })
                    .collect());
            }
            if began.elapsed() > budget {
                return Err(ServiceError::NotReady {
                    service: service.name.clone(),
                    waited: budget,
                    last,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Copies the last [`SERVICE_LOG_LINES`] lines of each service's output into `log`,
    /// under a header naming the service.
    /// A service that is no longer running says so with its exit code: one that died
    /// mid-job is often why the job failed.
    pub async fn copy_logs(&self, log: &LogSink) {
        let docker = self.client.engine();
        for (name, id) in &self.containers {
            let state = bounded(docker.inspect_container(id, None))
                .await
                .ok()
                .and_then(|i| i.state);
            let exited = match state {
                Some(state) if state.running == Some(false) => {
                    format!(" (it exited with code {})", state.exit_code.unwrap_or(-1))
                }
                _ => String::new(),
            };
            let _ = log
                .send(
                    format!("\u{2500}\u{2500} service {name}{exited}: its last {SERVICE_LOG_LINES} lines of output \u{2500}\u{2500}\n")
                        .into_bytes(),
                )
                .await;
            let options = LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .follow(false)
                .tail(&SERVICE_LOG_LINES.to_string())
                .build();
            let mut stream = docker.logs(id, Some(options));
            let mut ended_with_newline = true;
            let copied = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(piece) = stream.next().await {
                    let Ok(piece) = piece else { break };
                    let bytes = piece.into_bytes();
                    if bytes.is_empty() {
                        continue;
                    }
                    ended_with_newline = bytes.ends_with(b"\n");
                    if log.send(bytes.to_vec()).await.is_err() {
                        break;
                    }
                }
            })
            .await;
            if copied.is_err() {
                let _ = log
                    .send(b"\n(the engine did not hand over the whole output)\n".to_vec())
                    .await;
            } else if !ended_with_newline {
                let _ = log.send(b"\n".to_vec()).await;
            }
        }
    }

    /// Removes every service container and the network, and anything else labelled
    /// with this job attempt and agent (a container whose creation was cut short by a
    /// cancel); says in `log` what could not be removed (the next agent start sweeps it).
    pub async fn remove(mut self, log: &LogSink) {
        let docker = self.client.engine();
        let mut problems = remove_all(
            docker,
            std::mem::take(&mut self.containers),
            self.network.take(),
        )
        .await;
        problems.extend(remove_labelled(docker, &self.owner.filter()).await);
        for problem in problems {
            warn!(job = %self.owner.job, "{problem}");
            let _ = log.send(format!("gantry: {problem}\n").into_bytes()).await;
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if self.containers.is_empty() && self.network.is_none() {
            return;
        }
        let docker = self.client.engine().clone();
        let containers = std::mem::take(&mut self.containers);
        let network = self.network.take();
        let filter = self.owner.filter();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut problems = remove_all(&docker, containers, network).await;
                problems.extend(remove_labelled(&docker, &filter).await);
                for problem in problems {
                    warn!("{problem}");
                }
            });
        }
    }
}

/// Removes the containers (killing them), then the network; returns what failed.
async fn remove_all(
    docker: &Docker,
    containers: Vec<(String, String)>,
    network: Option<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, id) in containers {
        if let Err(e) = remove_container(docker, &id).await {
            problems.push(format!("cannot remove service {name}'s container: {e}"));
        }
    }
    if let Some(network) = network {
        if let Err(e) = remove_network(docker, &network).await {
            problems.push(format!("cannot remove the network {network}: {e}"));
        }
    }
    problems
}

async fn remove_network(docker: &Docker, network: &str) -> Result<(), EngineError> {
    match bounded(docker.remove_network(network)).await {
        Err(EngineError::Api(bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        })) => Ok(()),
        other => other,
    }
}

/// ` (6379/tcp on 127.0.0.1:49153, ...)`, or nothing without ports.
fn published(ports: &[(ServicePort, u16)]) -> String {
    if ports.is_empty() {
        return String::new();
    }
    let list: Vec<String> = ports
        .iter()
        .map(|(port, host)| format!("{} on 127.0.0.1:{host}", port_key(*port)))
        .collect();
    format!(" ({})", list.join(", "))
}

/// One health check's result as the failure quotes it: its exit code and output.
fn describe_check(code: Option<i64>, output: Option<&str>) -> String {
    let output = output.unwrap_or("").trim();
    let mut cut = output.len().min(HEALTH_OUTPUT_BYTES);
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    let shown = if output.is_empty() {
        "no output".to_owned()
    } else if cut < output.len() {
        format!("{}...", &output[..cut])
    } else {
        output.to_owned()
    };
    format!("exit code {}, {shown}", code.unwrap_or(-1))
}

/// Removes every container (running or not) and network labelled with this agent's id
/// ([`AGENT_LABEL`]): what a job's services and steps left when the agent died. Call at
/// agent start, before any job runs. Without a Docker engine there is nothing to sweep.
pub async fn sweep(agent: &str) {
    let Ok(client) = DockerClient::local().await else {
        return;
    };
    for problem in remove_labelled(client.engine(), &[format!("{AGENT_LABEL}={agent}")]).await {
        warn!("sweep: {problem}");
    }
}

/// Removes every container (running or not), then every network, carrying all of
/// `labels` (`KEY=VALUE`); returns what failed.
async fn remove_labelled(docker: &Docker, labels: &[String]) -> Vec<String> {
    let filters = HashMap::from([("label", labels.to_vec())]);
    let mut problems = Vec::new();
    let containers = bounded(
        docker.list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        )),
    )
    .await;
    let containers: Vec<(String, String)> = match containers {
        Ok(list) => list
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_else(|| id.clone());
                Some((name, id))
            })
            .collect(),
        Err(e) => {
            problems.push(format!("cannot list containers labelled {labels:?}: {e}"));
            Vec::new()
        }
    };
    let networks: Vec<String> = match bounded(
        docker.list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        )),
    )
    .await
    {
        // By id: Docker allows two networks of one name.
        Ok(list) => list.into_iter().filter_map(|n| n.id).collect(),
        Err(e) => {
            problems.push(format!("cannot list networks labelled {labels:?}: {e}"));
            Vec::new()
        }
    };
    if !containers.is_empty() || !networks.is_empty() {
        info!(
            containers = containers.len(),
            networks = networks.len(),
            "removing containers and networks labelled {labels:?}"
        );
    }
    problems.extend(remove_all(docker, containers, None).await);
    for network in networks {
        if let Err(e) = remove_network(docker, &network).await {
            problems.push(format!("cannot remove the network {network}: {e}"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::{Image, RunId, ServiceHealth};

    fn owner() -> ServiceOwner {
        ServiceOwner {
            agent: "agent-1".into(),
            job: JobId {
                run: RunId(7),
                index: 2,
            },
            attempt: 3,
        }
    }

    fn redis() -> Service {
        Service {
            name: "redis-cache".into(),
            image: Image {
                name: "redis:7".into(),
                ..Image::default()
            },
            env: Labels::from([("PASSWORD".to_owned(), "${{ secrets.PW }}".to_owned())]),
            ports: vec![
                ServicePort {
                    container: 6379,
                    host: None,
                    protocol: PortProtocol::Tcp,
                },
                ServicePort {
                    container: 53,
                    host: Some(10053),
                    protocol: PortProtocol::Udp,
                },
            ],
            command: vec!["redis-server".into(), "--save".into(), String::new()],
            health: Some(ServiceHealth {
                cmd: HealthCommand::Shell("redis-cli ping".into()),
                interval_ms: 1_000,
                retries: 5,
                start_period_ms: 2_000,
                timeout_ms: 500,
            }),
        }
    }

    #[test]
    fn names_and_labels_say_whose_they_are() {
        let o = owner();
        assert_eq!(o.network(), "gantry-job-7.2-3-agent-1");
        assert_eq!(o.container("db"), "gantry-job-7.2-3-agent-1-db");
        let labels = o.labels();
        assert_eq!(labels[AGENT_LABEL], "agent-1");
        assert_eq!(labels[JOB_LABEL], "7.2");
        assert_eq!(labels[ATTEMPT_LABEL], "3");
    }

    #[test]
    fn a_service_container_publishes_on_loopback_and_checks_with_dockers_health_check() {
        let fill = |s: &str| s.replace("${{ secrets.PW }}", "hunter2");
        let config = service_config(&owner(), &redis(), &fill);
        assert_eq!(config.image.as_deref(), Some("redis:7"));
        assert_eq!(
            config.cmd,
            Some(vec!["redis-server".into(), "--save".into(), String::new()])
        );
        assert!(config.entrypoint.is_none(), "the image's entrypoint stays");
        assert_eq!(config.env, Some(vec!["PASSWORD=hunter2".to_owned()]));
        let labels = config.labels.expect("labels");
        assert_eq!(labels[SERVICE_LABEL], "redis-cache");
        assert_eq!(labels[AGENT_LABEL], "agent-1");
        let health = config.healthcheck.expect("health");
        assert_eq!(
            health.test,
            Some(vec!["CMD-SHELL".to_owned(), "redis-cli ping".to_owned()])
        );
        assert_eq!(
            (
                health.interval,
                health.timeout,
                health.retries,
                health.start_period
            ),
            (
                Some(1_000_000_000),
                Some(500_000_000),
                Some(5),
                Some(2_000_000_000)
            )
        );
        let host = config.host_config.expect("host config");
        assert_eq!(
            host.network_mode.as_deref(),
            Some("gantry-job-7.2-3-agent-1")
        );
        let bindings = host.port_bindings.expect("bindings");
        let tcp = bindings["6379/tcp"].as_ref().expect("tcp");
        assert_eq!(tcp[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(tcp[0].host_port.as_deref(), Some(""), "the engine picks");
        let udp = bindings["53/udp"].as_ref().expect("udp");
        assert_eq!(udp[0].host_port.as_deref(), Some("10053"));
        let endpoints = config
            .networking_config
            .and_then(|n| n.endpoints_config)
            .expect("endpoints");
        assert_eq!(
            endpoints["gantry-job-7.2-3-agent-1"].aliases,
            Some(vec!["redis-cache".to_owned()]),
            "reachable by its name"
        );
    }

    #[test]
    fn a_list_health_command_runs_without_a_shell_and_no_command_keeps_the_images() {
        let mut service = redis();
        service.command.clear();
        if let Some(h) = service.health.as_mut() {
            h.cmd = HealthCommand::Exec(vec!["redis-cli".into(), "ping".into()]);
        }
        let config = service_config(&owner(), &service, &|s| s.to_owned());
        assert_eq!(config.cmd, None);
        assert_eq!(
            config.healthcheck.and_then(|h| h.test),
            Some(vec!["CMD".into(), "redis-cli".into(), "ping".into()])
        );
    }

    #[test]
    fn steps_on_the_host_get_loopback_ports_and_steps_in_containers_get_names() {
        let service = redis();
        let started = vec![Started {
            name: service.name.clone(),
            ports: vec![(service.ports[0], 49153), (service.ports[1], 10053)],
        }];
        let host = service_env(&started, false);
        assert_eq!(host["GANTRY_SERVICE_REDIS_CACHE_HOST"], "127.0.0.1");
        assert_eq!(host["GANTRY_SERVICE_REDIS_CACHE_PORT_6379"], "49153");
        assert_eq!(host["GANTRY_SERVICE_REDIS_CACHE_PORT_53_UDP"], "10053");
        let container = service_env(&started, true);
        assert_eq!(container["GANTRY_SERVICE_REDIS_CACHE_HOST"], "redis-cache");
        assert_eq!(container["GANTRY_SERVICE_REDIS_CACHE_PORT_6379"], "6379");
    }

    #[test]
    fn the_health_budget_covers_every_allowed_failure() {
        // 2 s start period, then 6 checks of (1 s interval + 0.5 s timeout), plus slack.
        assert_eq!(
            health_budget(&redis()),
            Duration::from_secs(2 + 9) + HEALTH_SLACK
        );
        let mut plain = redis();
        plain.health = None;
        assert_eq!(health_budget(&plain), HEALTH_SLACK);
    }

    #[test]
    fn a_check_is_quoted_with_its_code_and_bounded_output() {
        assert_eq!(
            describe_check(Some(1), Some("connection refused\n")),
            "exit code 1, connection refused"
        );
        assert_eq!(describe_check(Some(1), None), "exit code 1, no output");
        let long = "é".repeat(HEALTH_OUTPUT_BYTES);
        let quoted = describe_check(Some(2), Some(&long));
        assert!(quoted.len() < HEALTH_OUTPUT_BYTES + 32 && quoted.ends_with("..."));
    }
}
