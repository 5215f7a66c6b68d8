//! `gantry-agent enroll`: trading a join token and a locally made CSR for a certificate.
//!
//! The private key is generated here and never leaves the host: only the CSR goes to the
//! coordinator. The coordinator is trusted only if it presents the CA whose fingerprint
//! the token carries, and the CA certificate it sends back is checked against that same
//! fingerprint before it is saved as the agent's trust anchor.

use std::path::PathBuf;
use std::time::Duration;

use gantry_certs::{ClientTls, Identity, JoinToken};
use gantry_protocol::{
    limits, AgentId, CloseCode, EnrollRequest, HelloReply, Intent, Labels, Refusal,
};
use gantry_transport::{Dialer, TransportError};

use crate::base::datadir::{self, AgentConfig, Credentials, DataDir, DataDirError};

/// How long to wait for the coordinator to answer the QUIC/TLS handshake.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// How long close frames get to go out before the process exits.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub data_dir: PathBuf,
    pub token: String,
    pub labels: Labels,
    /// Replace an existing enrollment in the data directory.
    pub force: bool,
    pub hostname: String,
}

/// A completed enrollment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub agent_id: AgentId,
    pub coordinator_address: String,
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Token(#[from] gantry_certs::TokenError),
    #[error("{} is already enrolled (found {}); pass --force to enroll again and replace it", data_dir.display(), found.display())]
    AlreadyEnrolled { data_dir: PathBuf, found: PathBuf },
    #[error("cannot generate the agent key: {0}")]
    Key(#[from] gantry_certs::CsrError),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] gantry_certs::TlsError),
    #[error("cannot reach the coordinator at {address}: {source}")]
    Connect {
        address: String,
        source: TransportError,
    },
    #[error("enrollment refused: {0}")]
    Refused(Refusal),
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),
    #[error("the coordinator sent a CA certificate with fingerprint {got}, but the token pins {expected}; refusing to trust it")]
    CaMismatch { expected: String, got: String },
    #[error(transparent)]
    Storage(#[from] DataDirError),
}

impl EnrollError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Token(_) | Self::AlreadyEnrolled { .. } => crate::base::exit::USAGE,
            Self::Connect { .. }
            | Self::Refused(_)
            | Self::Protocol(_)
            | Self::CaMismatch { .. } => crate::base::exit::COORDINATOR,
            Self::Key(_) | Self::Tls(_) => crate::base::exit::FAILURE,
            Self::Storage(e) => e.exit_code(),
        }
    }
}

/// Enrolls this host. Nothing is written before the token parses and the data directory
/// is known to be free (or `force` is set), and nothing but the final files is written.
pub async fn enroll(options: EnrollOptions) -> Result<Enrolled, EnrollError> {
    let token = JoinToken::parse(&options.token)?;
    let data_dir = DataDir::new(&options.data_dir);
    if let Some(found) = data_dir.existing_enrollment() {
        if !options.force {
            return Err(EnrollError::AlreadyEnrolled {
                data_dir: options.data_dir.clone(),
                found,
            });
        }
    }
    let key = gantry_certs::generate_key_and_csr()?;
    let request = EnrollRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        csr_der: key.csr_der,
        hostname: options.hostname.clone(),
        labels: options.labels.clone(),
    };
    let address = token.coordinator_address.clone();
    let connect_err = |source| EnrollError::Connect {
        address: address.clone(),
        source,
    };
    let ipv6 = gantry_transport::resolve(&address)
        .map_err(connect_err)?
        .is_ipv6();
    // One small exchange: the session's limits (a fleet enrolling at once costs the
    // coordinator no bulk-sized buffers or MTU probes).
    let dialer = Dialer::with_profile(
        ClientTls::pinned(&token.ca_fingerprint)?,
        ipv6,
        gantry_transport::Profile::Control,
    )
    .map_err(connect_err)?;
    let reply = exchange(&dialer, &address, &request).await;
    dialer.shutdown(CLOSE_GRACE).await;
    let enrolled = match reply.map_err(connect_err)? {
        HelloReply::Enrolled(enrolled) => enrolled,
        HelloReply::Refused(refusal) => return Err(EnrollError::Refused(refusal)),
        HelloReply::Welcome(_) => {
            return Err(EnrollError::Protocol(
                "a session welcome instead of an enrollment".into(),
            ))
        }
    };

    let ca_der = gantry_certs::pem_to_der(&enrolled.ca_certificate_pem)
        .map_err(|e| EnrollError::Protocol(format!("the CA certificate is unreadable: {e}")))?;
    let got = gantry_certs::fingerprint(&ca_der);
    if got != token.ca_fingerprint {
        return Err(EnrollError::CaMismatch {
            expected: token.ca_fingerprint,
            got,
        });
    }
    let credentials = Credentials {
        ca_der,
        identity_pem: datadir::identity_pem(&enrolled.certificate_pem, &key.key_pem),
    };
    check_certificate(&credentials, &enrolled.agent_id)?;
    let config = AgentConfig {
        agent_id: enrolled.agent_id.clone(),
        coordinator_address: address.clone(),
        labels: options.labels,
    };
    data_dir.write_enrollment(&config, &enrolled.ca_certificate_pem, &credentials)?;
    Ok(Enrolled {
        agent_id: enrolled.agent_id,
        coordinator_address: address,
    })
}

/// Connects, sends the enroll hello and reads the one reply.
async fn exchange(
    dialer: &Dialer,
    address: &str,
    request: &EnrollRequest,
) -> Result<HelloReply, TransportError> {
    let conn = dialer.connect(address, CONNECT_DEADLINE).await?;
    let result = async {
        let (mut writer, mut reader) = conn.open_control().await?;
        let frame = gantry_protocol::encode_hello(
            &Intent::Enroll(request.clone()),
            limits::MAX_FRAME_BYTES,
        )?;
        writer.send_frame(&frame).await?;
        match reader
            .recv_within(
                limits::HANDSHAKE_DEADLINE,
                "the coordinator's answer to the enrollment",
            )
            .await?
        {
            Some(reply) => Ok(reply),
            // The coordinator ended the stream without answering: its close reason says why.
            None => Err(conn.close_reason().unwrap_or_else(|| {
                TransportError::Lost("the coordinator closed the stream without answering".into())
            })),
        }
    }
    .await;
    conn.close(CloseCode::Normal, "enrollment done");
    result
}

/// The issued certificate must name the agent id we were given and match our key.
fn check_certificate(credentials: &Credentials, agent_id: &AgentId) -> Result<(), EnrollError> {
    let der = credentials
        .cert_der()
        .map_err(|e| EnrollError::Protocol(format!("the certificate is unreadable: {e}")))?;
    match Identity::from_cert_der(&der) {
        Ok(Identity::Agent(id)) if &id == agent_id => {}
        Ok(other) => {
            return Err(EnrollError::Protocol(format!(
                "the certificate names {}, not agent {agent_id}",
                other.uri()
            )));
        }
        Err(e) => {
            return Err(EnrollError::Protocol(format!(
                "the certificate names no agent: {e}"
            )))
        }
    }
    ClientTls::mutual(
        &credentials.ca_der,
        &credentials.identity_pem,
        &credentials.identity_pem,
    )
    .map(drop)
    .map_err(|e| {
        EnrollError::Protocol(format!(
            "the certificate does not match the key sent for signing: {e}"
        ))
    })
}
