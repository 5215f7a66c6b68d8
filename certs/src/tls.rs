//! rustls configurations for every role, and the verifiers Gantry adds:
//! - the coordinator's client verifier checks the chain against the CA (webpki), lets a
//!   certificate-less client through only so it can enroll (the coordinator then allows
//!   nothing else), and refuses revoked agent identities during the handshake;
//! - an enrolling agent's server verifier trusts only a CA whose fingerprint matches the
//!   one in its join token, taken from the chain the coordinator presents;
//! - between peers (agents serving each other release chunks), each side requires an
//!   agent certificate from the CA, and the fetching side the very agent it dialed.
//!
//! TLS 1.3 only (QUIC requires it), ALPN `gantry/1` (`gantry-peer/1` between peers), no
//! 0-RTT.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use gantry_protocol::AgentId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("could not issue {what}: {detail}")]
    Issue { what: &'static str, detail: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

/// Agent identities whose certificates are refused, shared between the store (which
/// fills it) and the TLS verifier (which reads it on every handshake).
#[derive(Debug, Clone, Default)]
pub struct RevocationSet(Arc<RwLock<HashSet<AgentId>>>);

impl RevocationSet {
    pub fn insert(&self, id: AgentId) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
    }

    pub fn contains(&self, id: &AgentId) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }

    pub fn len(&self) -> usize {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

fn roots(ca_der: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(roots)
}

/// Server side (the coordinator).
#[derive(Debug)]
pub struct ServerTls;

impl ServerTls {
    /// `cert_pem` is the coordinator's certificate; the CA certificate is appended to the
    /// chain so enrolling agents can pin it by fingerprint.
    pub fn config(
        ca_der: &[u8],
        cert_pem: &str,
        key_pem: &str,
        revoked: RevocationSet,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = crate::crypto_provider();
        let clients = client_verifier(ca_der, &provider, CoordinatorClients { revoked })?;
        let mut chain = certs_from_pem(cert_pem, "coordinator certificate")?;
        chain.push(CertificateDer::from(ca_der.to_vec()));
        let key = key_from_pem(key_pem, "coordinator key")?;
        server_config(provider, clients, chain, key, gantry_protocol::ALPN)
    }
}

impl ServerTls {
    /// The coordinator's HTTP side over TLS (metrics, health, the install script and the
    /// agent binary): the same certificate as the QUIC endpoint with the CA appended, so
    /// `curl --cacert ca.pem` can check it; no client certificates; ALPN `http/1.1`.
    /// TLS 1.3 only, like the rest of the workspace (curl, Prometheus and every current
    /// client speak it).
    pub fn https(
        ca_der: &[u8],
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut chain = certs_from_pem(cert_pem, "coordinator certificate")?;
        chain.push(CertificateDer::from(ca_der.to_vec()));
        let key = key_from_pem(key_pem, "coordinator key")?;
        let clients = Arc::new(rustls::server::NoClientAuth);
        server_config(crate::crypto_provider(), clients, chain, key, b"http/1.1")
    }
}

/// Client side (agents and the admin CLI).
#[derive(Debug)]
pub struct ClientTls;

impl ClientTls {
    /// Mutual TLS: verifies the coordinator against `ca_der` and presents `cert_pem`.
    pub fn mutual(
        ca_der: &[u8],
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let provider = crate::crypto_provider();
        let verifier = ca_server(ca_der, &provider)?;
        let identity = (
            certs_from_pem(cert_pem, "client certificate")?,
            key_from_pem(key_pem, "client key")?,
        );
        client_config(provider, verifier, Some(identity), gantry_protocol::ALPN)
    }

    /// Verifies the coordinator against `ca_der` and presents no certificate. Only good
    /// for enrolling, and used by tests to prove nothing else is allowed that way.
    pub fn anonymous(ca_der: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let provider = crate::crypto_provider();
        let verifier = ca_server(ca_der, &provider)?;
        client_config(provider, verifier, None, gantry_protocol::ALPN)
    }

    /// For enrolling: no client certificate; the coordinator is trusted only if it
    /// presents a chain to the CA whose fingerprint the join token carries.
    pub fn pinned(ca_fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
        let provider = crate::crypto_provider();
        let verifier = Arc::new(ServerVerifier {
            provider: provider.clone(),
            rule: PinnedCa {
                fingerprint: ca_fingerprint.to_owned(),
            },
        });
        client_config(provider, verifier, None, gantry_protocol::ALPN)
    }
}

/// Peer transfers between agents (a deployment's hosts serving each other release
/// chunks). Both ends present their agent certificates, both are checked against the
/// CA, and both must be agent identities: the server side refuses admins and
/// certificate-less clients, and the client side accepts only the agent the coordinator
/// named. Agent certificates carry the client-auth usage only, so the client checks the
/// server's chain the way a server checks a client's. ALPN is
/// [`gantry_protocol::PEER_ALPN`].
#[derive(Debug)]
pub struct PeerTls;

impl PeerTls {
    /// The serving side: presents this agent's certificate, requires another agent's.
    pub fn server(
        ca_der: &[u8],
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = crate::crypto_provider();
        let clients = client_verifier(ca_der, &provider, PeerClients)?;
        let chain = certs_from_pem(cert_pem, "agent certificate")?;
        let key = key_from_pem(key_pem, "agent key")?;
        server_config(provider, clients, chain, key, gantry_protocol::PEER_ALPN)
    }

    /// The fetching side: presents this agent's certificate, and trusts the server only
    /// if its certificate chains to the CA and names agent `expected`.
    pub fn client(
        ca_der: &[u8],
        cert_pem: &str,
        key_pem: &str,
        expected: &AgentId,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let provider = crate::crypto_provider();
        let verifier = Arc::new(ServerVerifier {
            provider: provider.clone(),
            rule: ExpectedPeer {
                chain: ca_chain(ca_der, &provider, true)?,
                expected: expected.clone(),
            },
        });
        let identity = (
            certs_from_pem(cert_pem, "agent certificate")?,
            key_from_pem(key_pem, "agent key")?,
        );
        client_config(
            provider,
            verifier,
            Some(identity),
            gantry_protocol::PEER_ALPN,
        )
    }
}

/// webpki's check of the coordinator's chain against the CA.
fn ca_server(
    ca_der: &[u8],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca_der)?), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// webpki's check of a client certificate's chain against the CA; with `mandatory`
/// false, a client without a certificate gets through it.
fn ca_chain(
    ca_der: &[u8],
    provider: &Arc<rustls::crypto::CryptoProvider>,
    mandatory: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_der)?), provider.clone());
    let builder = if mandatory {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// The CA's chain check with `rule` on top of it.
fn client_verifier<R: ClientRule + 'static>(
    ca_der: &[u8],
    provider: &Arc<rustls::crypto::CryptoProvider>,
    rule: R,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(Arc::new(ClientVerifier {
        chain: ca_chain(ca_der, provider, R::MANDATORY)?,
        provider: provider.clone(),
        rule,
    }))
}

/// Every server configuration: TLS 1.3 only, this certificate chain and key, one ALPN
/// protocol, no 0-RTT.
fn server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    clients: Arc<dyn ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Every client configuration: TLS 1.3 only, the server checked by `verifier`, this
/// certificate and key presented (or none), one ALPN protocol, no 0-RTT.
fn client_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// What a client verifier adds to the CA's chain check: whether a client must present a
/// certificate, and which identities may connect. [`ClientVerifier`] does the rest,
/// once for every rule.
trait ClientRule: std::fmt::Debug + Send + Sync {
    /// Whether a client without a certificate is refused during the handshake.
    const MANDATORY: bool;

    /// Whether the identity of a certificate whose chain checked out may connect.
    fn admit(&self, identity: Identity) -> Result<(), rustls::Error>;
}

/// The handshake-signature half of a verifier, the same for client and server
/// verifiers: checked with the provider's algorithms, as webpki's own verifiers do.
/// rustls declares these methods on two traits ([`ServerCertVerifier`] and
/// [`ClientCertVerifier`]) with no common one to implement once, hence a macro;
/// it expands inside an `impl` whose type has a `provider` field.
macro_rules! signature_checks {
    () => {
        signature_checks!(verify_tls12_signature);
        signature_checks!(verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
    ($check:ident) => {
        fn $check(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::$check(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }
    };
}

/// A client verifier: webpki checks the chain against the CA, the provider's algorithms
/// the handshake signatures, then the rule checks the identity the certificate names.
#[derive(Debug)]
struct ClientVerifier<R> {
    chain: Arc<dyn ClientCertVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    rule: R,
}

impl<R: ClientRule> ClientCertVerifier for ClientVerifier<R> {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        R::MANDATORY
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = Identity::from_cert_der(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.rule.admit(identity)?;
        Ok(verified)
    }

    signature_checks!();
}

/// The coordinator's clients: agents that are not revoked, and admins. A client with no
/// certificate gets through the handshake only to enroll: the coordinator allows it
/// nothing else.
#[derive(Debug)]
struct CoordinatorClients {
    revoked: RevocationSet,
}

impl ClientRule for CoordinatorClients {
    const MANDATORY: bool = false;

    fn admit(&self, identity: Identity) -> Result<(), rustls::Error> {
        match identity {
            Identity::Agent(id) if self.revoked.contains(&id) => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            Identity::Agent(_) | Identity::Admin(_) => Ok(()),
            Identity::Coordinator => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }
}

/// A peer server's clients: agents only, each with its certificate.
#[derive(Debug)]
struct PeerClients;

impl ClientRule for PeerClients {
    const MANDATORY: bool = true;

    fn admit(&self, identity: Identity) -> Result<(), rustls::Error> {
        match identity {
            Identity::Agent(_) => Ok(()),
            Identity::Admin(_) | Identity::Coordinator => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }
}

/// What a server presents in a handshake, as rustls hands it to a verifier.
struct Presented<'a> {
    end_entity: &'a CertificateDer<'a>,
    intermediates: &'a [CertificateDer<'a>],
    server_name: &'a ServerName<'a>,
    ocsp_response: &'a [u8],
    now: UnixTime,
}

/// What a server verifier checks of the server's certificate. [`ServerVerifier`] checks
/// the handshake signatures with the provider's algorithms, once for every rule.
trait ServerRule: std::fmt::Debug + Send + Sync {
    fn verify(
        &self,
        provider: &Arc<rustls::crypto::CryptoProvider>,
        server: &Presented<'_>,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

#[derive(Debug)]
struct ServerVerifier<R> {
    provider: Arc<rustls::crypto::CryptoProvider>,
    rule: R,
}

impl<R: ServerRule> ServerCertVerifier for ServerVerifier<R> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let server = Presented {
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        };
        self.rule.verify(&self.provider, &server)
    }

    signature_checks!();
}

/// The fetching host's view of a peer: its chain is checked as a client certificate's
/// would be (agent certificates are for client auth), then its identity must be the
/// agent the coordinator named. The TLS server name is not used.
#[derive(Debug)]
struct ExpectedPeer {
    chain: Arc<dyn ClientCertVerifier>,
    expected: AgentId,
}

impl ServerRule for ExpectedPeer {
    fn verify(
        &self,
        _provider: &Arc<rustls::crypto::CryptoProvider>,
        server: &Presented<'_>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(server.end_entity, server.intermediates, server.now)?;
        match Identity::from_cert_der(server.end_entity) {
            Ok(Identity::Agent(id)) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(other) => Err(rustls::Error::General(format!(
                "the peer presented {other:?}, not agent {}: refusing it",
                self.expected
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }
}

/// An enrolling agent's view of the coordinator: trusted only with a chain to the CA
/// whose fingerprint the join token carries, taken from the chain presented.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl ServerRule for PinnedCa {
    fn verify(
        &self,
        provider: &Arc<rustls::crypto::CryptoProvider>,
        server: &Presented<'_>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = server
            .intermediates
            .iter()
            .find(|c| crate::fingerprint(c) == self.fingerprint)
        else {
            return Err(rustls::Error::General(format!(
                "the coordinator did not present the CA with fingerprint {}: the token is for another coordinator, or something is intercepting the connection",
                self.fingerprint
            )));
        };
        let roots = roots(ca).map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(
            server.end_entity,
            &[],
            server.server_name,
            server.ocsp_response,
            server.now,
        )
    }
}
