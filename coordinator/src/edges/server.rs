//! `gantry server`: loads the configuration and keys from the data directory, builds the
//! coordinator, binds the QUIC listener and (if configured) the HTTP side, and runs
//! until SIGTERM or SIGINT. The composition root: the only code that starts every part.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::base::config::{CoordinatorConfig, DataDir};
use crate::edges::http::{distribute, server as http};
use crate::edges::quic::listener;
use crate::services::coordinator::{Coordinator, Settings};
use crate::store;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Data directory made by `gantry init`.
    #[arg(long, env = "GANTRY_DATA_DIR", default_value = crate::base::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Configuration file [default: DATA_DIR/coordinator.toml].
    #[arg(long, env = "GANTRY_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Refuse new runs and uploads while the data directory has this much free space or
    /// less (e.g. `1GiB`; `0` turns it off); `/readyz` and `/metrics` say so.
    #[arg(long, env = "GANTRY_MIN_FREE_SPACE", default_value = crate::base::disk::DEFAULT_MIN_FREE_SPACE)]
    pub min_free_space: String,
}

/// Why the server did not start or stopped, by exit code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration, the data directory or its keys are wrong: exit code 2.
    #[error("{0:#}")]
    Setup(anyhow::Error),
    /// The server could not run (the store, a socket): exit code 1.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

#[allow(clippy::needless_pass_by_value)] // used as map_err(setup)
fn setup(e: anyhow::Error) -> ServeError {
    ServeError::Setup(e)
}

/// Runs the coordinator until SIGTERM or SIGINT.
pub async fn run(args: ServerArgs) -> Result<(), ServeError> {
    let data = DataDir(args.data_dir);
    let config_path = args.config.unwrap_or_else(|| data.config());
    let config = CoordinatorConfig::load(&config_path).map_err(setup)?;
    let settings = Settings {
        listen: config.listen.clone(),
        advertise: config.advertise.clone(),
        agent_cert_ttl: config.agent_cert_ttl().map_err(setup)?,
        heartbeat_interval: config.heartbeat_interval().map_err(setup)?,
        artifacts: config.artifacts.settings().map_err(setup)?,
        agent_binary: config.agent_binary.as_ref().map(PathBuf::from),
        webhooks: config.webhooks.settings().map_err(setup)?,
        public_url: config.public_url().map_err(setup)?,
        min_free_space: crate::base::config::parse_bytes(&args.min_free_space)
            .context("--min-free-space")
            .map_err(setup)?,
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let ca = gantry_certs::CertAuthority::from_pem(
        &read(data.ca_cert()).map_err(setup)?,
        &read(data.ca_key()).map_err(setup)?,
    )
    .context("the CA in the data directory")
    .map_err(setup)?;
    let server_pem = read(data.server_cert()).map_err(setup)?;
    let store = store::Store::open(&data.store()).map_err(|e| ServeError::Failed(e.into()))?;
    let revoked = gantry_certs::RevocationSet::default();
    let coordinator = Coordinator::new(store, ca, revoked.clone(), settings, &data.0)
        .map_err(|e| ServeError::Failed(e.into()))?;
    let tls = gantry_certs::ServerTls::config(
        coordinator_ca_der(&data).map_err(setup)?.as_slice(),
        &server_pem,
        &server_pem,
        revoked,
    )
    .context("the coordinator certificate")
    .map_err(setup)?;
    let listen: std::net::SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen address {:?} is not ip:port", config.listen))
        .map_err(setup)?;
    // Stable across restarts (see Listener::bind); derived so there is no extra secret file.
    let reset_secret = gantry_certs::sha256(
        &[
            b"gantry stateless reset v1\n".as_slice(),
            read(data.ca_key()).map_err(setup)?.as_bytes(),
        ]
        .concat(),
    );
    let listener = gantry_transport::Listener::bind(listen, tls, &reset_secret)
        .map_err(|e| ServeError::Failed(e.into()))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ServeError::Failed(e.into()))?;
    tracing::info!(address = %bound, advertise = %config.advertise, "gantry server listening (ALPN gantry/1)");
    println!("gantry server listening on {bound}");
    let coordinator = Arc::new(coordinator);
    let http = match &config.http_listen {
        Some(addr) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .with_context(|| format!("http_listen {addr:?} is not ip:port"))
                .map_err(setup)?;
            let uses_tls = distribute::http_uses_tls(&config, addr).map_err(setup)?;
            let tls = if uses_tls {
                let ca_der = coordinator_ca_der(&data).map_err(setup)?;
                let tls = gantry_certs::ServerTls::https(&ca_der, &server_pem, &server_pem)
                    .context("the coordinator certificate, for the HTTP side")
                    .map_err(setup)?;
                Some(Arc::new(tls))
            } else {
                None
            };
            let dist = distribute::Distribution::new(&config, &data, uses_tls).map_err(setup)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))
                .map_err(ServeError::Failed)?;
            let scheme = if uses_tls { "https" } else { "http" };
            println!("gantry http listening on {addr} ({scheme})");
            Some(tokio::spawn(http::serve(
                coordinator.clone(),
                listener,
                tls,
                Arc::new(dist),
            )))
        }
        None => None,
    };
    let schedules = tokio::spawn(coordinator.triggers.clone().schedule_loop());
    let polls = tokio::spawn(coordinator.repos.clone().poll_loop());
    let collector = tokio::spawn(coordinator.artifacts.clone().collect_periodically());
    let disk = tokio::spawn(coordinator.disk.clone().sample_periodically());
    listener::serve(coordinator, listener, shutdown_signal()).await;
    schedules.abort();
    polls.abort();
    collector.abort();
    disk.abort();
    if let Some(h) = http {
        h.abort();
    }
    Ok(())
}

fn coordinator_ca_der(data: &DataDir) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read_to_string(data.ca_cert())
        .with_context(|| format!("cannot read {}", data.ca_cert().display()))?;
    Ok(gantry_certs::pem_to_der(&pem)?)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    } else {
        tracing::warn!("cannot install signal handlers; stop the server with SIGKILL");
        std::future::pending::<()>().await;
    }
}
