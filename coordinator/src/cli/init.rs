//! `gantry init`: creates a coordinator's data directory (CA, server certificate, config,
//! store) and the first admin's credentials and CLI context.
//!
//! Keys are written mode 0600 through temp-file-and-rename. It refuses to run over an
//! existing data directory, because a new CA would orphan every enrolled agent.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Args;
use gantry_certs::keyfile::{write_private, write_public};
use gantry_certs::CertAuthority;

use crate::base::config::{self, CoordinatorConfig, DataDir};
use crate::cli::context::{self, AdminContext};
use crate::cli::failure::Failure;
use crate::store::{AuditEntry, Store};

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Data directory to create.
    #[arg(long, env = "GANTRY_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// UDP address the server listens on.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    pub listen: String,
    /// host:port agents dial, written into join tokens [default: the listen address, or
    /// this host's name if listening on all interfaces].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Name of the first admin.
    #[arg(long, default_value = "admin")]
    pub admin_name: String,
    /// Lifetime of agent certificates (agents renew at two thirds of it).
    #[arg(long, default_value = "7d")]
    pub agent_cert_ttl: String,
    /// How often agents send heartbeats.
    #[arg(long, default_value = "5s")]
    pub heartbeat_interval: String,
    /// Address of the HTTP side (push webhook, health, metrics, install script), e.g.
    /// 127.0.0.1:7080, or 0.0.0.0:8443 (served over TLS with the coordinator
    /// certificate: plain HTTP is allowed on loopback only). Off unless given.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Serve the HTTP side over TLS even on a loopback address.
    #[arg(long)]
    pub http_tls: bool,
    /// Where to write coordinator.toml [default: DATA_DIR/coordinator.toml]; the .deb
    /// keeps it in /etc/gantry.
    #[arg(long, env = "GANTRY_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where to write the admin CLI context [default: GANTRY_CONFIG or ~/.config/gantry/context.toml].
    #[arg(long)]
    pub context: Option<PathBuf>,
}

pub fn run(args: &InitArgs) -> Result<(), Failure> {
    let usage = Failure::Usage;
    let work = Failure::Work;
    let listen: std::net::SocketAddr = args
        .listen
        .parse()
        .with_context(|| {
            format!(
                "--listen {:?} is not ip:port (e.g. 0.0.0.0:7443)",
                args.listen
            )
        })
        .map_err(usage)?;
    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None if listen.ip().is_unspecified() => format!("{}:{}", hostname(), listen.port()),
        None => listen.to_string(),
    };
    let (adv_host, adv_port) = advertise
        .rsplit_once(':')
        .with_context(|| format!("--advertise {advertise:?} is not host:port"))
        .map_err(usage)?;
    adv_port
        .parse::<u16>()
        .with_context(|| format!("--advertise {advertise:?}: port is not a number"))
        .map_err(usage)?;
    let adv_host = adv_host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let config = CoordinatorConfig {
        listen: args.listen.clone(),
        advertise: advertise.clone(),
        agent_cert_ttl: args.agent_cert_ttl.clone(),
        heartbeat_interval: args.heartbeat_interval.clone(),
        http_listen: args.http_listen.clone(),
        http_tls: args.http_tls.then_some(true),
        agent_binary: None,
        artifacts: crate::base::config::ArtifactsConfig::default(),
        webhooks: crate::base::config::WebhooksConfig::default(),
        public_url: None,
    };
    config
        .agent_cert_ttl()
        .context("--agent-cert-ttl")
        .map_err(usage)?;
    config
        .heartbeat_interval()
        .context("--heartbeat-interval")
        .map_err(usage)?;
    if !gantry_certs::identity::valid_admin_name(&args.admin_name) {
        return Err(usage(anyhow::anyhow!(
            "--admin-name {:?}: use 1 to 64 of a-z 0-9 . _ -",
            args.admin_name
        )));
    }
    let context_path = match &args.context {
        Some(p) => p.clone(),
        None => context::context_path().map_err(usage)?,
    };

    let data = DataDir(args.data_dir.clone());
    let config_path = args.config.clone().unwrap_or_else(|| data.config());
    if let Some(found) = [data.config(), config_path.clone(), data.ca_key()]
        .into_iter()
        .find(|p| p.exists())
    {
        return Err(usage(anyhow::anyhow!(
            "{} is already initialized (found {}); a new CA would orphan every enrolled agent. Use another --data-dir and --config, or remove them first",
            data.0.display(),
            found.display()
        )));
    }
    // `sudo gantry init` on a packaged install: the data directory belongs to the
    // service user, and so must everything made in it.
    let owner = crate::cli::ownership::Owner::of_existing(&data.0);
    create_private_dir(&data.0).map_err(work)?;
    create_private_dir(&data.tls()).map_err(work)?;

    let now = SystemTime::now();
    let ca = CertAuthority::create(&adv_host, now).map_err(|e| work(e.into()))?;
    let (server, server_key) = ca
        .issue_coordinator(std::slice::from_ref(&adv_host), now)
        .map_err(|e| work(e.into()))?;
    let (admin, admin_key) = ca
        .issue_admin(&args.admin_name, now)
        .map_err(|e| work(e.into()))?;

    let write = |path: &Path, text: &str, private: bool| {
        let r = if private {
            write_private(path, text.as_bytes())
        } else {
            write_public(path, text.as_bytes())
        };
        r.with_context(|| format!("cannot write {}", path.display()))
            .map_err(Failure::Work)
    };
    write(&data.ca_cert(), ca.cert_pem(), false)?;
    write(&data.ca_key(), &ca.key_pem(), true)?;
    write(
        &data.server_cert(),
        &format!("{}{}", server.pem, server_key),
        true,
    )?;
    let store = Store::open(&data.store()).map_err(|e| work(e.into()))?;
    store
        .audit(&AuditEntry {
            at: gantry_protocol::UnixMillis::now(),
            actor: gantry_certs::Identity::Admin(args.admin_name.clone()).uri(),
            action: "coordinator.init".into(),
            detail: format!("ca={} advertise={advertise}", ca.fingerprint()),
        })
        .map_err(|e| work(e.into()))?;
    drop(store);
    if let Some(owner) = owner {
        owner.chown_tree(&data.0).map_err(work)?;
    }
    // The config is written last: its presence marks a complete init.
    write(
        &config_path,
        &toml::to_string(&config).map_err(|e| work(e.into()))?,
        false,
    )?;

    let ctx_dir = context_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    create_private_dir(&ctx_dir).map_err(work)?;
    write(&ctx_dir.join("ca.pem"), ca.cert_pem(), false)?;
    write(
        &ctx_dir.join("admin.pem"),
        &format!("{}{}", admin.pem, admin_key),
        true,
    )?;
    let ctx = AdminContext {
        address: advertise.clone(),
        ca: "ca.pem".into(),
        credentials: "admin.pem".into(),
    };
    write(
        &context_path,
        &toml::to_string(&ctx).map_err(|e| work(e.into()))?,
        false,
    )?;

    println!("initialized coordinator in {}", data.0.display());
    println!("  CA fingerprint  {}", ca.fingerprint());
    println!("  listen          {}   advertise {advertise}", args.listen);
    println!(
        "  admin           {} (context {})",
        args.admin_name,
        context_path.display()
    );
    if args.config.is_some() {
        println!(
            "next: gantry server --data-dir {} --config {}",
            data.0.display(),
            config_path.display()
        );
    } else {
        println!("next: gantry server --data-dir {}", data.0.display());
    }
    Ok(())
}

fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
