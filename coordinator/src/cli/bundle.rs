//! `gantry bundle create` (an offline bundle for hosts that cannot reach the coordinator's
//! HTTP side) and `gantry install-command` (the one command for hosts that can).
//!
//! A bundle is a plain tar: `install.sh` first (so `tar -xOf FILE install.sh` reads
//! little), then `gantry-agent`, `ca.pem`, `gantry-agent.service`, `agent.env`,
//! `bundle-info` and, with `--token`, `token`. Its SHA-256 and the CA's signature over
//! that digest (`gantry_certs::bundle`) are printed, never stored in it: a file cannot
//! carry a digest of itself. Both go to the new host by another path than the file (a
//! screen, a ticket, a phone) and `install.sh` checks both before it installs anything.
//!
//! Both commands run on the coordinator host: the bundle needs the CA key, and both take
//! the paths `gantry server` takes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_certs::{CertAuthority, JoinToken};

use crate::base::config::{self, CoordinatorConfig, DataDir};
use crate::base::labels;
use crate::cli::context::{context_path, AdminContext};
use crate::cli::failure::{usage, Failure};
use crate::edges::http::distribute;
use crate::services::upgrades::{find_agent_binary, sha256_file};

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write an offline bundle and print its SHA-256 and the CA's signature.
    Create(CreateArgs),
}

/// Where the coordinator's files are, as `gantry server` takes them.
#[derive(Debug, Args)]
pub struct CoordinatorPaths {
    /// Data directory made by `gantry init`.
    #[arg(long, env = "GANTRY_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Configuration file [default: DATA_DIR/coordinator.toml, else
    /// /etc/gantry/coordinator.toml as the .deb lays it out].
    #[arg(long, env = "GANTRY_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
}

/// Where the .deb keeps the configuration (see packaging/systemd/gantry.service).
const PACKAGED_CONFIG: &str = "/etc/gantry/coordinator.toml";

impl CoordinatorPaths {
    fn load_config(&self) -> anyhow::Result<CoordinatorConfig> {
        let data = DataDir(self.data_dir.clone());
        let path = match &self.config {
            Some(path) => path.clone(),
            None if !data.config().exists() && Path::new(PACKAGED_CONFIG).exists() => {
                PathBuf::from(PACKAGED_CONFIG)
            }
            None => data.config(),
        };
        CoordinatorConfig::load(&path)
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The bundle file to write.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
    /// A join token to put in the bundle (from `gantry token create`; give it a TTL long
    /// enough to carry the file). Whoever holds the file can enroll with it.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The agent binary to bundle [default: the one the coordinator serves].
    #[arg(long, value_name = "FILE")]
    agent_binary: Option<PathBuf>,
    #[command(flatten)]
    paths: CoordinatorPaths,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct InstallCommandArgs {
    /// The join token the new host enrolls with (from `gantry token create`).
    #[arg(long, value_name = "TOKEN")]
    token: String,
    /// The coordinator's HTTP side as new hosts reach it, e.g.
    /// https://coord.example.net:8443 [default: the advertised host with the port of
    /// http_listen, from coordinator.toml].
    #[arg(long)]
    url: Option<String>,
    /// A label the agent asks for at enrollment (repeatable), key=value.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    #[command(flatten)]
    paths: CoordinatorPaths,
}

pub fn run(cmd: BundleCommand) -> Result<(), Failure> {
    match cmd {
        BundleCommand::Create(args) => create(&args),
    }
}

/// One bundle member.
struct Member<'a> {
    name: &'static str,
    mode: u32,
    source: Source<'a>,
}

enum Source<'a> {
    Text(&'a str),
    File(&'a Path),
}

fn create(args: &CreateArgs) -> Result<(), Failure> {
    let data = DataDir(args.paths.data_dir.clone());
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {}; run this on the coordinator host as root or as its user (gantry), with --data-dir pointing at its data directory",
                p.display()
            )
        })
    };
    let ca = CertAuthority::from_pem(
        &read(data.ca_cert()).map_err(usage)?,
        &read(data.ca_key()).map_err(usage)?,
    )
    .context("the CA in the data directory")
    .map_err(usage)?;
    let configured = match &args.agent_binary {
        Some(path) => Some(path.clone()),
        None => args
            .paths
            .load_config()
            .map_err(usage)?
            .agent_binary
            .map(PathBuf::from),
    };
    let agent = find_agent_binary(configured.as_deref()).map_err(|e| usage(e.into()))?;
    let token = match &args.token {
        Some(text) => Some(checked_token(text, &ca.fingerprint()).map_err(usage)?),
        None => None,
    };
    let info = format!(
        "gantry offline bundle, format 1\ngantry {}\nca {}\n",
        env!("CARGO_PKG_VERSION"),
        ca.fingerprint()
    );
    let mut members = vec![
        Member {
            name: "install.sh",
            mode: 0o755,
            source: Source::Text(distribute::INSTALL_SCRIPT),
        },
        Member {
            name: "gantry-agent",
            mode: 0o755,
            source: Source::File(&agent),
        },
        Member {
            name: "ca.pem",
            mode: 0o644,
            source: Source::Text(ca.cert_pem()),
        },
        Member {
            name: "gantry-agent.service",
            mode: 0o644,
            source: Source::Text(distribute::AGENT_UNIT),
        },
        Member {
            name: "agent.env",
            mode: 0o644,
            source: Source::Text(distribute::AGENT_ENV),
        },
        Member {
            name: "bundle-info",
            mode: 0o644,
            source: Source::Text(&info),
        },
    ];
    let token_line = token.as_ref().map(|t| format!("{t}\n"));
    if let Some(line) = &token_line {
        members.push(Member {
            name: "token",
            mode: 0o600,
            source: Source::Text(line),
        });
    }
    write_archive(&args.output, &members).map_err(Failure::Work)?;
    let digest = sha256_file(&args.output).map_err(|e| Failure::Work(e.into()))?;
    let signature = gantry_certs::bundle::sign(&ca, &digest)
        .context("signing the bundle with the CA key")
        .map_err(Failure::Work)?;
    let size = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    let command = offline_command(&args.output, &digest, &signature);
    if args.json {
        let out = serde_json::json!({
            "path": args.output,
            "bytes": size,
            "sha256": digest,
            "signature": signature,
            "ca_fingerprint": ca.fingerprint(),
            "token": token.is_some(),
            "agent_binary": agent,
            "install_command": command,
        });
        println!("{out:#}");
        return Ok(());
    }
    println!(
        "wrote {} ({:.1} MiB; agent from {}; {})",
        args.output.display(),
        size as f64 / (1024.0 * 1024.0),
        agent.display(),
        if token.is_some() {
            "with a join token"
        } else {
            "no join token"
        }
    );
    println!("  sha256     {digest}");
    println!("  signature  {signature}");
    println!("  CA         {}", ca.fingerprint());
    println!("Carry the digest and signature separately from the file. On the new host, as root, in the bundle's directory (no network needed):");
    println!("  {command}");
    if token.is_some() {
        eprintln!("note: the bundle carries a join token: whoever holds the file can enroll an agent until the token expires or is used up");
    }
    Ok(())
}

/// Parses a join token and checks it is for this coordinator's CA.
fn checked_token(text: &str, ca_fingerprint: &str) -> anyhow::Result<String> {
    let token = JoinToken::parse(text).context("--token")?;
    anyhow::ensure!(
        token.ca_fingerprint == ca_fingerprint,
        "--token is for the CA {}, but this coordinator's CA is {ca_fingerprint}; create the token on this coordinator",
        token.ca_fingerprint
    );
    Ok(text.trim().to_owned())
}

/// Writes the tar through a temporary file in the same directory, fsynced and renamed,
/// so a crash never leaves half a bundle under the final name.
fn write_archive(output: &Path, members: &[Member<'_>]) -> anyhow::Result<()> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".gantry-bundle-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut builder = tar::Builder::new(std::io::BufWriter::new(tmp.as_file()));
    for member in members {
        let mut header = tar::Header::new_ustar();
        header.set_mode(member.mode);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        match &member.source {
            Source::Text(text) => {
                header.set_size(text.len() as u64);
                builder
                    .append_data(&mut header, member.name, text.as_bytes())
                    .with_context(|| format!("cannot write {} into the bundle", member.name))?;
            }
            Source::File(path) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let len = file
                    .metadata()
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .len();
                header.set_size(len);
                builder
                    .append_data(&mut header, member.name, file)
                    .with_context(|| format!("cannot write {} into the bundle", path.display()))?;
            }
        }
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .context("cannot finish the bundle")?;
    tmp.as_file()
        .sync_all()
        .context("cannot flush the bundle to disk")?;
    tmp.persist(output)
        .with_context(|| format!("cannot write {}", output.display()))?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", dir.display()))
}

/// The command that checks and installs a bundle on the new host. The host's own
/// sha256sum checks the file before anything from it runs.
fn offline_command(output: &Path, digest: &str, signature: &str) -> String {
    let name = output.file_name().map_or_else(
        || "gantry-bundle.tar".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let file = shell_quote(&name);
    format!(
        "echo {check} | sha256sum -c - && tar -xOf {file} install.sh | sh -s -- --bundle {file} --sha256 {digest} --signature {signature}",
        check = shell_quote(&format!("{digest}  {name}")),
    )
}

/// Quotes a word for sh unless it is plainly safe.
fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@+,".contains(&b));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

pub fn install_command(args: &InstallCommandArgs) -> Result<(), Failure> {
    let config = args.paths.load_config();
    let url = match (&args.url, &config) {
        (Some(url), _) => url.trim_end_matches('/').to_owned(),
        (None, Ok(config)) => default_url(config).map_err(usage)?,
        (None, Err(e)) => {
            return Err(usage(anyhow::anyhow!(
                "pass --url https://HOST:PORT (the coordinator's HTTP side as new hosts reach it): {e:#}"
            )))
        }
    };
    let ca_pem = read_ca_pem(&args.paths).map_err(usage)?;
    let fingerprint = gantry_certs::fingerprint(
        &gantry_certs::pem_to_der(&ca_pem)
            .context("the CA certificate")
            .map_err(usage)?,
    );
    let token = checked_token(&args.token, &fingerprint).map_err(usage)?;
    labels::parse_labels(&args.labels)
        .context("--label")
        .map_err(usage)?;
    let command = online_command(&url, &fingerprint, &token, &args.labels).map_err(usage)?;
    eprintln!("# as root on the new host (put sudo before `sh -s` otherwise); it needs curl:");
    println!("{command}");
    Ok(())
}

/// `https://<advertised host>:<http_listen port>`, or http for a loopback listener.
fn default_url(config: &CoordinatorConfig) -> anyhow::Result<String> {
    let listen = config.http_listen.as_deref().context(
        "the HTTP side is off (no http_listen in coordinator.toml): set it, e.g. `http_listen = \"0.0.0.0:8443\"`, and restart the coordinator",
    )?;
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("http_listen {listen:?} is not ip:port"))?;
    let tls = distribute::http_uses_tls(config, addr)?;
    let host = match config.advertise.rsplit_once(':') {
        Some((host, _)) => host,
        None => config.advertise.as_str(),
    };
    let (scheme, host) = if tls {
        ("https", host.to_owned())
    } else {
        ("http", addr.ip().to_string())
    };
    Ok(format!("{scheme}://{host}:{}", addr.port()))
}

/// The CA certificate: from the data directory, else from the admin context (the data
/// directory is readable only by the coordinator's user).
fn read_ca_pem(paths: &CoordinatorPaths) -> anyhow::Result<String> {
    let data = DataDir(paths.data_dir.clone());
    if let Ok(pem) = std::fs::read_to_string(data.ca_cert()) {
        return Ok(pem);
    }
    let ctx = AdminContext::load(&context_path()?).with_context(|| {
        format!(
            "cannot read {} nor the admin context's CA",
            data.ca_cert().display()
        )
    })?;
    Ok(ctx.ca_pem)
}

/// The one command for a new host: fetch the CA, compare its fingerprint, then fetch
/// the install script over TLS checked against that CA and run it.
fn online_command(
    url: &str,
    fingerprint: &str,
    token: &str,
    labels: &[String],
) -> anyhow::Result<String> {
    let (scheme, host) = url
        .split_once("://")
        .with_context(|| format!("--url {url:?} is not https://HOST:PORT"))?;
    distribute::base_url(scheme, Some(host)).map_err(|e| anyhow::anyhow!("--url {url:?}: {e}"))?;
    let mut script_args = format!("--token {}", shell_quote(token));
    for label in labels {
        let _ = write!(script_args, " --label {}", shell_quote(label));
    }
    match scheme {
        "https" => {
            let hex = fingerprint.strip_prefix("sha256:").unwrap_or(fingerprint);
            Ok(format!(
                "f=$(mktemp) && curl -fsSk {url}/ca.pem -o \"$f\" && {{ sed '/^-----/d' \"$f\" | base64 -d | sha256sum | grep -q '^{hex} ' || {{ echo 'gantry: {url} does not present the CA {fingerprint}; refusing' >&2; false; }}; }} && curl -fsS --cacert \"$f\" {url}/install.sh | sh -s -- {script_args}; s=$?; rm -f \"$f\"; [ \"$s\" = 0 ]"
            ))
        }
        "http" => {
            let loopback = host.starts_with("127.")
                || host.starts_with("[::1]")
                || host.starts_with("localhost");
            anyhow::ensure!(
                loopback,
                "--url {url:?}: plain http is only for loopback; use https (the HTTP side serves TLS on any other address)"
            );
            Ok(format!(
                "curl -fsS {url}/install.sh | sh -s -- {script_args}"
            ))
        }
        other => anyhow::bail!("--url {url:?}: the scheme {other:?} is neither https nor http"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_they_need_it() {
        assert_eq!(shell_quote("gantry-bundle.tar"), "gantry-bundle.tar");
        assert_eq!(shell_quote("my bundle.tar"), "'my bundle.tar'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn the_offline_command_checks_the_digest_before_running_anything() {
        let digest = "ab".repeat(32);
        let cmd = offline_command(Path::new("/tmp/out/b.tar"), &digest, "c2ln");
        assert!(
            cmd.starts_with(&format!("echo '{digest}  b.tar' | sha256sum -c - && ")),
            "{cmd}"
        );
        assert!(
            cmd.contains("--sha256 ") && cmd.contains("--signature c2ln"),
            "{cmd}"
        );
    }

    #[test]
    fn the_online_command_pins_the_ca_and_refuses_plain_http_off_loopback() {
        let fp = format!("sha256:{}", "cd".repeat(32));
        let cmd = online_command("https://coord:8443", &fp, "gjt1_x", &["role=web".into()])
            .expect("https");
        assert!(
            cmd.contains(&format!("grep -q '^{} '", "cd".repeat(32))),
            "{cmd}"
        );
        assert!(
            cmd.contains("--cacert \"$f\" https://coord:8443/install.sh"),
            "{cmd}"
        );
        assert!(cmd.contains("--token gjt1_x --label role=web"), "{cmd}");
        assert!(online_command("http://127.0.0.1:7080", &fp, "t", &[]).is_ok());
        assert!(online_command("http://coord:7080", &fp, "t", &[]).is_err());
        assert!(online_command("https://coord;rm", &fp, "t", &[]).is_err());
        assert!(online_command("coord:8443", &fp, "t", &[]).is_err());
    }
}
