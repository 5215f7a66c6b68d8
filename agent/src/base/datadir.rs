//! The agent's data directory and everything it keeps there.
//!
//! Layout (all under the data directory, created with mode 0700):
//! - `agent.toml`: agent id, coordinator address and the labels given at enrollment
//!   (mode 0644; written last, so its presence means the enrollment is complete);
//! - `tls/ca.pem`: the coordinator's CA certificate (mode 0644);
//! - `tls/agent.pem`: the agent's certificate followed by its private key, in one file
//!   written atomically with mode 0600, so a renewal swaps certificate and key together
//!   and a crash can never leave a certificate paired with the wrong key.
//!
//! This module owns reading and writing those files; it knows nothing about networking.

use std::io;
use std::path::{Path, PathBuf};

use gantry_certs::keyfile;
use gantry_protocol::{AgentId, Labels};
use serde::{Deserialize, Serialize};

/// Default data directory, overridable by `--data-dir` and `GANTRY_AGENT_DATA_DIR`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/gantry-agent";

/// What went wrong with the data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("not enrolled: run gantry-agent enroll --token ... first ({} is missing)", path.display())]
    NotEnrolled { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{} is not valid: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
}

impl DataDirError {
    /// Missing or unreadable enrollment files are the operator's input to fix; failing
    /// to write is a local failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotEnrolled { .. } | Self::Invalid { .. } | Self::Read { .. } => {
                super::exit::USAGE
            }
            Self::Write { .. } => super::exit::FAILURE,
        }
    }
}

/// The contents of `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    pub agent_id: AgentId,
    /// `host:port` of the coordinator, from the join token.
    pub coordinator_address: String,
    /// Labels given with `--label` at enrollment; merged under the run-time flags.
    #[serde(default)]
    pub labels: Labels,
}

/// The agent's TLS material as loaded from (or about to be written to) disk.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_der: Vec<u8>,
    /// Certificate PEM followed by private key PEM, exactly as in `tls/agent.pem`.
    pub identity_pem: String,
}

impl Credentials {
    /// DER of the agent's own certificate (the first certificate in the identity file).
    pub fn cert_der(&self) -> Result<Vec<u8>, gantry_certs::TlsError> {
        gantry_certs::pem_to_der(&self.identity_pem)
    }

    /// A dialer presenting this identity and trusting only this CA, its connections
    /// with the QUIC limits of `profile` (the session's: `Control`; transfers' and
    /// peers': bulk). rustls checks here that the key matches the certificate, so a
    /// mismatched pair fails before any connection is tried.
    pub fn dialer(
        &self,
        ipv6: bool,
        profile: gantry_transport::Profile,
    ) -> Result<gantry_transport::Dialer, CredentialsError> {
        let tls =
            gantry_certs::ClientTls::mutual(&self.ca_der, &self.identity_pem, &self.identity_pem)?;
        Ok(gantry_transport::Dialer::with_profile(tls, ipv6, profile)?)
    }
}

/// Why credentials could not be turned into a dialer.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the agent certificate or key is unusable: {0}")]
    Tls(#[from] gantry_certs::TlsError),
    #[error(transparent)]
    Transport(#[from] gantry_transport::TransportError),
}

/// Joins a certificate PEM and a key PEM into the one identity file.
pub fn identity_pem(cert_pem: &str, key_pem: &str) -> String {
    let mut out = String::with_capacity(cert_pem.len() + key_pem.len() + 1);
    out.push_str(cert_pem.trim_end());
    out.push('\n');
    out.push_str(key_pem.trim_end());
    out.push('\n');
    out
}

/// Everything `run` needs from a completed enrollment.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub config: AgentConfig,
    pub credentials: Credentials,
}

/// Paths inside one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("agent.toml")
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    pub fn ca_path(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.tls_dir().join("agent.pem")
    }

    /// The first file that shows an enrollment (complete or half-written) is here.
    pub fn existing_enrollment(&self) -> Option<PathBuf> {
        [self.config_path(), self.identity_path()]
            .into_iter()
            .find(|p| p.exists())
    }

    /// Creates the directory and `tls/`, owner-only: the identity file is a secret and
    /// even the file names say which coordinator this host trusts.
    pub fn create(&self) -> Result<(), DataDirError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [self.root.clone(), self.tls_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| DataDirError::Write {
                    path: dir.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Writes a fresh enrollment: CA, identity, then `agent.toml` last so a crash part
    /// way leaves no `agent.toml` and `run` reports "not enrolled" rather than half a state.
    pub fn write_enrollment(
        &self,
        config: &AgentConfig,
        ca_pem: &str,
        credentials: &Credentials,
    ) -> Result<(), DataDirError> {
        self.create()?;
        let ca = self.ca_path();
        keyfile::write_public(&ca, ca_pem.as_bytes())
            .map_err(|source| DataDirError::Write { path: ca, source })?;
        self.write_identity(&credentials.identity_pem)?;
        let path = self.config_path();
        let text = toml::to_string(config).map_err(|e| DataDirError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        keyfile::write_public(&path, text.as_bytes())
            .map_err(|source| DataDirError::Write { path, source })
    }

    /// Replaces `tls/agent.pem` atomically (temp file, fsync, rename) with mode 0600.
    pub fn write_identity(&self, identity_pem: &str) -> Result<(), DataDirError> {
        let path = self.identity_path();
        keyfile::write_private(&path, identity_pem.as_bytes())
            .map_err(|source| DataDirError::Write { path, source })
    }

    /// Loads a completed enrollment.
    pub fn load(&self) -> Result<Enrollment, DataDirError> {
        let config_path = self.config_path();
        let text = read_enrollment_file(&config_path)?;
        let config: AgentConfig = toml::from_str(&text).map_err(|e| DataDirError::Invalid {
            path: config_path.clone(),
            detail: e.to_string(),
        })?;
        // serde takes the id as any string; the id type's own parser checks its shape.
        AgentId::parse(config.agent_id.as_str()).map_err(|e| DataDirError::Invalid {
            path: config_path.clone(),
            detail: e.to_string(),
        })?;
        if config.coordinator_address.is_empty() {
            return Err(DataDirError::Invalid {
                path: config_path,
                detail: "coordinator_address is empty".into(),
            });
        }
        let ca_path = self.ca_path();
        let ca_pem = read_enrollment_file(&ca_path)?;
        let ca_der = gantry_certs::pem_to_der(&ca_pem).map_err(|e| DataDirError::Invalid {
            path: ca_path,
            detail: e.to_string(),
        })?;
        let identity_path = self.identity_path();
        let identity_pem = read_enrollment_file(&identity_path)?;
        let credentials = Credentials {
            ca_der,
            identity_pem,
        };
        credentials.cert_der().map_err(|e| DataDirError::Invalid {
            path: identity_path,
            detail: e.to_string(),
        })?;
        Ok(Enrollment {
            config,
            credentials,
        })
    }
}

fn read_enrollment_file(path: &Path) -> Result<String, DataDirError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            DataDirError::NotEnrolled {
                path: path.to_owned(),
            }
        } else {
            DataDirError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    use gantry_certs::{CertAuthority, Identity};

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn an_enrollment_round_trips_with_private_files_private() {
        let now = SystemTime::now();
        let ca = CertAuthority::create("test CA", now).expect("CA");
        let key = gantry_certs::generate_key_and_csr().expect("key");
        let agent_id = AgentId::from_random(&[0x5a; 6]);
        let cert = ca
            .sign_csr(
                &key.csr_der,
                &Identity::Agent(agent_id.clone()),
                now,
                Duration::from_secs(3600),
            )
            .expect("sign");
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(parent.path().join("agent"));
        assert!(matches!(dir.load(), Err(DataDirError::NotEnrolled { .. })));
        assert_eq!(dir.existing_enrollment(), None);

        let config = AgentConfig {
            agent_id,
            coordinator_address: "127.0.0.1:7443".into(),
            labels: [("role".to_owned(), "web".to_owned())].into(),
        };
        let credentials = Credentials {
            ca_der: ca.cert_der().to_vec(),
            identity_pem: identity_pem(&cert.pem, &key.key_pem),
        };
        dir.write_enrollment(&config, ca.cert_pem(), &credentials)
            .expect("write");
        assert_eq!(mode(dir.root()), 0o700);
        assert_eq!(mode(&dir.tls_dir()), 0o700);
        assert_eq!(mode(&dir.identity_path()), 0o600);
        assert_eq!(mode(&dir.ca_path()), 0o644);
        assert_eq!(dir.existing_enrollment(), Some(dir.config_path()));

        let loaded = dir.load().expect("load");
        assert_eq!(loaded.config, config);
        assert_eq!(loaded.credentials.ca_der, ca.cert_der());
        assert_eq!(loaded.credentials.cert_der().expect("cert"), cert.der);
        // The one identity file carries both halves, and they belong together.
        let creds = &loaded.credentials;
        gantry_certs::ClientTls::mutual(&creds.ca_der, &creds.identity_pem, &creds.identity_pem)
            .expect("certificate and key from one file make a client config");
    }

    #[test]
    fn a_tampered_agent_id_is_refused_by_name() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(parent.path());
        std::fs::write(
            dir.config_path(),
            "agent_id = \"../../etc\"\ncoordinator_address = \"h:1\"\n",
        )
        .expect("write");
        let err = dir.load().expect_err("bad id");
        assert!(matches!(err, DataDirError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("agent.toml"), "{err}");
        assert_eq!(err.exit_code(), crate::base::exit::USAGE);
    }
}
