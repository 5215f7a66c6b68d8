//! The coordinator: one of each service, built in the order they need each other, and
//! what the edges hold (`Arc<Coordinator>`). Building it restores the scheduler and the
//! unfinished deployments from the store and starts their tasks; it must run inside the
//! async runtime.
//!
//! Also the engine's and the deployment manager's way to reach agents and secrets
//! ([`Outbox`]): dispatches to the deploy runner go to the deployment manager, every
//! other message to the agent's live session.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_certs::{CertAuthority, RevocationSet};
use gantry_protocol::{AgentId, CoordinatorMessage, Labels, UnixMillis};

use crate::base::config::{ArtifactSettings, WebhookSettings};
use crate::base::disk::DiskSpace;
use crate::base::logs::LogStore;
use crate::base::metrics::{Gauges, Metrics};
use crate::base::seal::{SecretError, SecretKey};
use crate::base::sources::SourceStore;
use crate::services::access::Access;
use crate::services::agents::Agents;
use crate::services::artifacts::Artifacts;
use crate::services::deployments::{DeployError, Deployments, Fleet};
use crate::services::engine::{AgentOutbox, Engine, EngineError};
use crate::services::exec::Execs;
use crate::services::notify::{watch_engine, Notifier};
use crate::services::repos::status::ForgeStatus;
use crate::services::repos::Repos;
use crate::services::runner::deploy_runner;
use crate::services::runs::Runs;
use crate::services::secrets::Secrets;
use crate::services::triggers::Triggers;
use crate::services::upgrades::Upgrades;
use crate::services::webhooks::Webhooks;
use crate::store::{Store, StoreError};

/// Settings the coordinator runs with, from `coordinator.toml`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub advertise: String,
    pub agent_cert_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub artifacts: ArtifactSettings,
    /// `agent_binary` from `coordinator.toml` (else found next to `gantry`).
    pub agent_binary: Option<PathBuf>,
    pub webhooks: WebhookSettings,
    /// The data directory's low-space watermark in bytes (`--min-free-space`; 0: off).
    pub min_free_space: u64,
    /// `public_url` from `coordinator.toml`, checked: where links to runs point.
    pub public_url: Option<String>,
}

/// Why the coordinator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    SecretKey(#[from] SecretError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The deployment manager cannot load the unfinished deployments.
    #[error(transparent)]
    Deployments(#[from] DeployError),
    #[error("cannot open the chunk store in {}: {source}", .dir.display())]
    Chunks {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The coordinator's services; one per process.
#[derive(Debug)]
pub struct Coordinator {
    pub settings: Settings,
    pub started_at: Instant,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// The data directory's free space against its watermark.
    pub disk: Arc<DiskSpace>,
    pub access: Access,
    pub agents: Arc<Agents>,
    pub secrets: Arc<Secrets>,
    pub engine: Engine,
    pub runs: Arc<Runs>,
    pub triggers: Arc<Triggers>,
    /// Repositories and their mirrors (`gantry repos`, `gantry run --repo`).
    pub repos: Arc<Repos>,
    pub sources: Arc<SourceStore>,
    pub artifacts: Arc<Artifacts>,
    pub deployments: Deployments,
    pub upgrades: Upgrades,
    pub webhooks: Arc<Webhooks>,
    /// Ad-hoc commands in flight (`gantry exec`), by id.
    pub execs: Arc<Execs>,
}

impl Coordinator {
    /// Builds the coordinator and starts its engine (restoring the scheduler from the
    /// store) and its deployment manager. Must run inside the async runtime.
    pub fn new(
        store: Store,
        ca: CertAuthority,
        revoked: RevocationSet,
        settings: Settings,
        data_dir: &Path,
    ) -> Result<Self, StartError> {
        for id in store.revoked_agents()? {
            revoked.insert(id);
        }
        let store = Arc::new(store);
        let secret_key = Arc::new(SecretKey::load_or_create(&data_dir.join("secrets.key"))?);
        let secrets = Arc::new(Secrets::new(store.clone(), secret_key.clone()));
        let agents = Arc::new(Agents::new(store.clone(), revoked));
        let (deployments, deploy_inbox) = Deployments::channel(store.clone());
        let outbox = Arc::new(Outbox {
            agents: agents.clone(),
            secrets: secrets.clone(),
            deployments: deployments.clone(),
            runner: deploy_runner(),
        });
        let metrics = Arc::new(Metrics::default());
        let disk = Arc::new(DiskSpace::new(data_dir, settings.min_free_space));
        let engine = Engine::start(store.clone(), outbox.clone(), metrics.clone())?;
        let logs = Arc::new(LogStore::new(&data_dir.join("logs")));
        let notifier = Arc::new(Notifier::new(metrics.clone()));
        deployments.start(
            deploy_inbox,
            outbox,
            engine.clone(),
            logs.clone(),
            notifier.clone(),
            metrics.clone(),
        )?;
        watch_engine(engine.subscribe(), store.clone(), notifier.clone());
        let webhooks = Webhooks::start(
            store.clone(),
            secret_key.clone(),
            metrics.clone(),
            settings.webhooks.clone(),
            notifier.clone(),
        );
        let cas = data_dir.join("cas");
        let artifacts = Arc::new(
            Artifacts::open(
                store.clone(),
                &cas,
                settings.artifacts.clone(),
                metrics.clone(),
                disk.clone(),
            )
            .map_err(|source| StartError::Chunks { dir: cas, source })?,
        );
        let sources = Arc::new(SourceStore::new(&data_dir.join("sources")));
        let runs = Arc::new(Runs::new(
            store.clone(),
            engine.clone(),
            logs,
            sources.clone(),
            metrics.clone(),
            notifier.clone(),
            disk.clone(),
        ));
        let forge_status = ForgeStatus::new(
            store.clone(),
            secrets.clone(),
            metrics.clone(),
            settings.webhooks.clone(),
            settings.public_url.clone(),
        );
        forge_status.start(engine.subscribe());
        let repos = Arc::new(Repos::new(
            store.clone(),
            secrets.clone(),
            secret_key.clone(),
            runs.clone(),
            artifacts.clone(),
            forge_status,
            data_dir,
        ));
        Ok(Self {
            repos,
            access: Access::new(
                store.clone(),
                ca,
                settings.agent_cert_ttl,
                settings.advertise.clone(),
            ),
            upgrades: Upgrades::new(settings.agent_binary.clone(), deployments.clone()),
            triggers: Arc::new(Triggers::new(store.clone(), runs.clone())),
            settings,
            started_at: Instant::now(),
            store,
            metrics,
            disk,
            agents,
            secrets,
            engine,
            runs,
            sources,
            artifacts,
            deployments,
            webhooks,
            execs: Arc::new(Execs::default()),
        })
    }

    /// `/metrics` in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let gauges = Gauges {
            agents_connected: self.agents.connected_count(),
            agents_enrolled: self.store.counts(UnixMillis::now()).map_or(0, |c| c.agents),
            data_dir_free_bytes: self.disk.free_bytes(),
            data_dir_low_space: self.disk.check().is_err(),
        };
        self.metrics.render(gauges)
    }

    /// Whether the coordinator can serve: its store answers (the data directory's space
    /// is `/readyz`'s other condition, `disk.check()`).
    pub fn ready(&self) -> bool {
        self.store.counts(UnixMillis::now()).is_ok()
    }
}

/// The engine's and the deployments' way to reach agents and secrets.
struct Outbox {
    agents: Arc<Agents>,
    secrets: Arc<Secrets>,
    deployments: Deployments,
    /// The deploy runner's id: what the scheduler sends it goes to the deployment
    /// manager.
    runner: AgentId,
}

impl AgentOutbox for Outbox {
    fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool {
        if *agent == self.runner {
            return self.deployments.route_from_scheduler(message);
        }
        self.agents.send(agent, message)
    }

    fn secrets(&self, names: &[String]) -> Labels {
        self.secrets.for_job(names)
    }

    fn speaks_execution(&self, agent: &AgentId) -> bool {
        // The deploy runner reads `Dispatch` only.
        *agent != self.runner
            && self
                .agents
                .has_label(agent, &crate::services::engine::execution_label())
    }
}

impl Fleet for Outbox {
    fn send(&self, agent: &AgentId, message: CoordinatorMessage) -> bool {
        AgentOutbox::send(self, agent, message)
    }

    fn connected(&self) -> Vec<(AgentId, String, Labels)> {
        self.agents.connected()
    }

    fn secrets_for(&self, environment: &str, names: &[String]) -> Labels {
        self.secrets.for_deployment(environment, names)
    }

    fn peer_address(&self, agent: &AgentId) -> Option<String> {
        self.agents.peer_address(agent)
    }
}
