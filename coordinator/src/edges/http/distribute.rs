//! What the coordinator hands to new hosts: the install script, its CA certificate and
//! the agent binary with its unit and environment file, on the HTTP side
//! (`GET /install.sh`, `/ca.pem`, `/agent/gantry-agent`, `/agent/gantry-agent.service`,
//! `/agent/agent.env`), and the pieces `gantry bundle create` puts into offline bundles.
//!
//! Also the HTTP side's transport rule: TLS with the coordinator certificate, or plain
//! HTTP on a loopback address only.
//!
//! The install script is `packaging/install.sh`, compiled in. When served, three lines of
//! it are filled in: the URL the client used (from its `Host` header), the CA
//! fingerprint and the SHA-256 of the agent binary. A client that fetched it over TLS
//! checked against that CA (see `gantry install-command`) can trust all three.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::base::config::{CoordinatorConfig, DataDir};
use crate::edges::http::request::Request;
use crate::services::upgrades::{find_agent_binary, sha256_file};

/// `packaging/install.sh`, the one installer for both the online and the offline path.
pub const INSTALL_SCRIPT: &str = include_str!("../../../../packaging/install.sh");
/// `packaging/systemd/gantry-agent.service`.
pub const AGENT_UNIT: &str = include_str!("../../../../packaging/systemd/gantry-agent.service");
/// `packaging/agent.env`, the unit's environment file.
pub const AGENT_ENV: &str = include_str!("../../../../packaging/agent.env");

/// A download of the agent binary gets this long: 60 MB at 1 Mbit/s takes 8 minutes.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Longest `Host` header taken into the served script (a DNS name is at most 253).
const MAX_HOST_LEN: usize = 270;

/// Whether the HTTP side on `addr` speaks TLS: `http_tls` if set, else on for anything
/// but loopback. Plain HTTP on any other address is refused, because metrics and the
/// install script would then travel unauthenticated.
pub fn http_uses_tls(
    config: &CoordinatorConfig,
    addr: std::net::SocketAddr,
) -> anyhow::Result<bool> {
    match config.http_tls {
        Some(false) if !addr.ip().is_loopback() => anyhow::bail!(
            "http_listen {addr} is not a loopback address, but http_tls is false: plain HTTP is allowed on loopback only; remove http_tls (TLS is the default) or listen on 127.0.0.1"
        ),
        Some(tls) => Ok(tls),
        None => Ok(!addr.ip().is_loopback()),
    }
}

/// The install script with the three served values filled in. Each placeholder line
/// appears exactly once in the script (a unit test holds it to that).
pub fn served_install_script(url: &str, ca_fingerprint: &str, agent_sha256: &str) -> String {
    INSTALL_SCRIPT
        .replacen(
            "\nCOORDINATOR_URL=''\n",
            &format!("\nCOORDINATOR_URL='{url}'\n"),
            1,
        )
        .replacen(
            "\nCA_FINGERPRINT=''\n",
            &format!("\nCA_FINGERPRINT='{ca_fingerprint}'\n"),
            1,
        )
        .replacen(
            "\nAGENT_SHA256=''\n",
            &format!("\nAGENT_SHA256='{agent_sha256}'\n"),
            1,
        )
}

/// Why a client's `Host` header cannot go into the install script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHost {
    #[error("send a Host header (HTTP/1.1)")]
    Missing,
    #[error("the Host header {0:?} is not a host name or address with an optional port")]
    Invalid(String),
}

/// Why the agent binary cannot be served: where it should be, or why it cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ServeBinaryError {
    /// Found at start-up or not; the message is the whole chain, to say how to fix it.
    #[error("{0}")]
    NotFound(String),
    #[error("{}: {source}", .path.display())]
    Metadata {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Digest(String),
}

/// The base URL a client reached us under, from its `Host` header. Only host name and
/// port characters are allowed, since the value is written into a shell script.
pub fn base_url(scheme: &str, host: Option<&str>) -> Result<String, BadHost> {
    let host = host.ok_or(BadHost::Missing)?;
    let ok = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !ok {
        return Err(BadHost::Invalid(host.chars().take(80).collect()));
    }
    Ok(format!("{scheme}://{host}"))
}

/// What the HTTP side hands out. Built once at start.
#[derive(Debug)]
pub struct Distribution {
    scheme: &'static str,
    ca_pem: String,
    ca_fingerprint: String,
    /// `Err` keeps the reason, so the routes can say how to fix it.
    agent_binary: Result<PathBuf, ServeBinaryError>,
    /// (length, modification time) of the binary, and its SHA-256: hashing 30 MB on
    /// every request would cost ~100 ms of CPU each, and an upgrade changes both stamps.
    agent_digest: Mutex<Option<((u64, SystemTime), String)>>,
}

impl Distribution {
    pub fn new(config: &CoordinatorConfig, data: &DataDir, tls: bool) -> anyhow::Result<Self> {
        let ca_pem = std::fs::read_to_string(data.ca_cert())
            .with_context(|| format!("cannot read {}", data.ca_cert().display()))?;
        let ca_fingerprint = gantry_certs::fingerprint(&gantry_certs::pem_to_der(&ca_pem)?);
        let agent_binary = find_agent_binary(config.agent_binary.as_deref().map(Path::new))
            .map_err(|e| ServeBinaryError::NotFound(format!("{:#}", anyhow::Error::from(e))));
        match &agent_binary {
            Ok(path) => {
                tracing::info!(path = %path.display(), "serving the agent binary on /agent/gantry-agent");
            }
            Err(e) => tracing::warn!("not serving the agent binary: {e}"),
        }
        Ok(Self {
            scheme: if tls { "https" } else { "http" },
            ca_pem,
            ca_fingerprint,
            agent_binary,
            agent_digest: Mutex::new(None),
        })
    }

    async fn agent_digest(&self, path: &Path) -> Result<String, ServeBinaryError> {
        let meta = std::fs::metadata(path).map_err(|source| ServeBinaryError::Metadata {
            path: path.to_path_buf(),
            source,
        })?;
        let stamp = (
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        {
            let cached = self
                .agent_digest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((s, digest)) = cached.as_ref() {
                if *s == stamp {
                    return Ok(digest.clone());
                }
            }
        }
        let owned = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || sha256_file(&owned))
            .await
            .map_err(|e| ServeBinaryError::Digest(e.to_string()))?
            .map_err(|e| ServeBinaryError::Digest(format!("{:#}", anyhow::Error::from(e))))?;
        *self
            .agent_digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((stamp, digest.clone()));
        Ok(digest)
    }

    /// Answers the routes this module owns; `None` for any other path.
    pub async fn route(&self, req: &Request) -> Option<Response> {
        let owned = matches!(
            req.path.as_str(),
            "/install.sh"
                | "/ca.pem"
                | "/agent/gantry-agent"
                | "/agent/gantry-agent.service"
                | "/agent/agent.env"
        );
        if !owned {
            return None;
        }
        if req.method != "GET" {
            return Some(Response::text(405, "method not allowed: use GET\n"));
        }
        let text = |body: &str| Response::Bytes {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        };
        Some(match req.path.as_str() {
            "/ca.pem" => Response::Bytes {
                status: 200,
                content_type: "application/x-pem-file",
                body: self.ca_pem.as_bytes().to_vec(),
            },
            "/agent/gantry-agent.service" => text(AGENT_UNIT),
            "/agent/agent.env" => text(AGENT_ENV),
            "/agent/gantry-agent" => match &self.agent_binary {
                Ok(path) => Response::File(path.clone()),
                Err(e) => Response::text(503, &format!("{e}\n")),
            },
            _ => self.install_script(req).await,
        })
    }

    async fn install_script(&self, req: &Request) -> Response {
        let url = match base_url(self.scheme, req.header("host")) {
            Ok(url) => url,
            Err(e) => return Response::text(400, &format!("{e}\n")),
        };
        let path = match &self.agent_binary {
            Ok(path) => path,
            Err(e) => return Response::text(503, &format!("{e}\n")),
        };
        match self.agent_digest(path).await {
            Ok(digest) => Response::Bytes {
                status: 200,
                content_type: "text/x-shellscript; charset=utf-8",
                body: served_install_script(&url, &self.ca_fingerprint, &digest).into_bytes(),
            },
            Err(e) => Response::text(503, &format!("cannot read the agent binary: {e}\n")),
        }
    }
}

/// An answer from [`Distribution::route`].
#[derive(Debug)]
pub enum Response {
    Bytes {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// A file streamed from disk, so a 30 MB binary is never held in memory.
    File(PathBuf),
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Self::Bytes {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }

    /// Writes the response and closes the connection.
    pub async fn write<S: AsyncWrite + Unpin>(self, stream: &mut S) -> std::io::Result<()> {
        match self {
            Self::Bytes {
                status,
                content_type,
                body,
            } => {
                stream
                    .write_all(head(status, content_type, body.len() as u64).as_bytes())
                    .await?;
                stream.write_all(&body).await?;
            }
            Self::File(path) => {
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => {
                        let body =
                            format!("cannot read the agent binary {}: {e}\n", path.display());
                        return Box::pin(Self::text(503, &body).write(stream)).await;
                    }
                };
                let len = file.metadata().await?.len();
                stream
                    .write_all(head(200, "application/octet-stream", len).as_bytes())
                    .await?;
                // Exactly the announced length, even if the file is replaced meanwhile
                // (an upgrade renames a new file over it; this handle keeps the old one).
                let mut limited = tokio::io::AsyncReadExt::take(file, len);
                tokio::time::timeout(DOWNLOAD_DEADLINE, tokio::io::copy(&mut limited, stream))
                    .await
                    .map_err(|_| std::io::Error::other("download took longer than 15 minutes"))??;
            }
        }
        stream.flush().await?;
        stream.shutdown().await
    }
}

fn head(status: u16, content_type: &str, len: u64) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_script_gets_exactly_the_three_values() {
        for marker in ["COORDINATOR_URL=''", "CA_FINGERPRINT=''", "AGENT_SHA256=''"] {
            let lines = INSTALL_SCRIPT.lines().filter(|l| *l == marker).count();
            assert_eq!(lines, 1, "{marker} appears once as a line of install.sh");
        }
        let fp = format!("sha256:{}", "ab".repeat(32));
        let digest = "cd".repeat(32);
        let served = served_install_script("https://coord:8443", &fp, &digest);
        assert!(served.contains("\nCOORDINATOR_URL='https://coord:8443'\n"));
        assert!(served.contains(&format!("\nCA_FINGERPRINT='{fp}'\n")));
        assert!(served.contains(&format!("\nAGENT_SHA256='{digest}'\n")));
        assert_eq!(
            served.lines().count(),
            INSTALL_SCRIPT.lines().count(),
            "nothing else changes"
        );
    }

    #[test]
    fn only_host_names_and_ports_make_a_url() {
        assert_eq!(
            base_url("https", Some("coord.example.net:8443")),
            Ok("https://coord.example.net:8443".into())
        );
        assert_eq!(
            base_url("http", Some("[::1]:7080")),
            Ok("http://[::1]:7080".into())
        );
        for bad in ["", "a b", "x';rm -rf /;'", "host/evil", "h$(id)"] {
            assert!(base_url("https", Some(bad)).is_err(), "{bad}");
        }
        assert!(base_url("https", None).is_err());
        assert!(base_url("https", Some(&"a".repeat(MAX_HOST_LEN + 1))).is_err());
    }

    #[test]
    fn plain_http_is_for_loopback_only() {
        let mut config = CoordinatorConfig {
            listen: "0.0.0.0:7443".into(),
            advertise: "coord:7443".into(),
            agent_cert_ttl: "7d".into(),
            heartbeat_interval: "5s".into(),
            http_listen: None,
            http_tls: None,
            agent_binary: None,
            artifacts: crate::base::config::ArtifactsConfig::default(),
            webhooks: crate::base::config::WebhooksConfig::default(),
            public_url: None,
        };
        let loopback = "127.0.0.1:7080".parse().expect("addr");
        let public = "0.0.0.0:8443".parse().expect("addr");
        assert!(!http_uses_tls(&config, loopback).expect("plain on loopback"));
        assert!(http_uses_tls(&config, public).expect("tls elsewhere"));
        config.http_tls = Some(true);
        assert!(http_uses_tls(&config, loopback).expect("tls on loopback on request"));
        config.http_tls = Some(false);
        let err = http_uses_tls(&config, public).expect_err("plain elsewhere");
        assert!(err.to_string().contains("loopback only"), "{err}");
    }
}
