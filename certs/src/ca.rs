//! The certificate authority: creating it, and issuing every certificate Gantry uses.
//!
//! Leaf certificates get fields set here and nowhere else: a random 127-bit serial, a
//! validity window that starts five minutes in the past (clock skew between hosts) and
//! ends after the caller's lifetime, exactly one identity URI SAN, key usage for
//! signatures only, one extended key usage, and an explicit "not a CA" constraint.

use std::time::{Duration, SystemTime};

use gantry_protocol::UnixMillis;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::csr::{self, CsrError};
use crate::identity::Identity;
use crate::tls::TlsError;

/// How far back a leaf's `not_before` is set, to tolerate clocks that disagree.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// Lifetime of the CA certificate.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the coordinator's server certificate (renewed by re-running init in this
/// release; see docs/decisions/0007-certificate-lifetimes.md).
pub const COORDINATOR_CERT_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Lifetime of an admin client certificate made by `gantry init`.
pub const ADMIN_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of an agent certificate; agents renew at two thirds of it.
pub const DEFAULT_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A certificate this CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: Vec<u8>,
    /// Serial in lower-case hex, for the audit log.
    pub serial_hex: String,
    pub not_after: UnixMillis,
}

/// The CA's certificate and key.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: KeyPair,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn rcgen_err(what: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |e| TlsError::Issue {
        what,
        detail: e.to_string(),
    }
}

impl CertAuthority {
    /// Creates a new CA named `name` (P-256 key, 10 years, may sign leaves only).
    pub fn create(name: &str, now: SystemTime) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Gantry CA {name}"));
        dn.push(DnType::OrganizationName, "Gantry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from(now + CA_LIFETIME);
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    /// Loads a CA from its PEM certificate and PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem {
            what: "CA key",
            detail: e.to_string(),
        })?;
        let cert_der = crate::pem_to_der(cert_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA key in PEM. Whoever holds it can mint any identity: store it mode 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA key as PKCS#8 DER, for signing that is not certificate issuance (offline
    /// bundles, see [`crate::bundle`]).
    pub(crate) fn key_pkcs8_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// `sha256:<hex>` of the CA certificate, as carried in join tokens.
    pub fn fingerprint(&self) -> String {
        crate::fingerprint(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, TlsError> {
        Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key)
            .map_err(rcgen_err("CA issuer"))
    }

    /// Issues the coordinator's server certificate with a fresh key. `extra_names` are the
    /// DNS names or IP addresses it is advertised under, besides the fixed server name.
    pub fn issue_coordinator(
        &self,
        extra_names: &[String],
        now: SystemTime,
    ) -> Result<(IssuedCert, String), TlsError> {
        let key = KeyPair::generate().map_err(rcgen_err("coordinator key"))?;
        let mut sans = vec![
            SanType::DnsName(
                gantry_protocol::COORDINATOR_SERVER_NAME
                    .try_into()
                    .map_err(rcgen_err("server name"))?,
            ),
            SanType::URI(
                Identity::Coordinator
                    .uri()
                    .try_into()
                    .map_err(rcgen_err("identity URI"))?,
            ),
        ];
        for name in extra_names {
            match name.parse::<std::net::IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(rcgen_err("advertised name"))?,
                )),
            }
        }
        let params = leaf_params(
            sans,
            "Gantry coordinator",
            ExtendedKeyUsagePurpose::ServerAuth,
            now,
            COORDINATOR_CERT_LIFETIME,
        );
        let issued = self.sign(&params, &key)?;
        Ok((issued, key.serialize_pem()))
    }

    /// Issues an admin client certificate with a fresh key (used by `gantry init`, which
    /// runs on the coordinator host, so the key is created where it is first stored).
    pub fn issue_admin(
        &self,
        name: &str,
        now: SystemTime,
    ) -> Result<(IssuedCert, String), TlsError> {
        if !crate::identity::valid_admin_name(name) {
            return Err(TlsError::Issue {
                what: "admin certificate",
                detail: format!("invalid admin name {name:?}: use 1 to 64 of a-z 0-9 . _ -"),
            });
        }
        let key = KeyPair::generate().map_err(rcgen_err("admin key"))?;
        let identity = Identity::Admin(name.to_owned());
        let sans = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(rcgen_err("identity URI"))?,
        )];
        let params = leaf_params(
            sans,
            &identity.uri(),
            ExtendedKeyUsagePurpose::ClientAuth,
            now,
            ADMIN_CERT_LIFETIME,
        );
        let issued = self.sign(&params, &key)?;
        Ok((issued, key.serialize_pem()))
    }

    /// Signs a CSR for `identity`. Only the CSR's public key is used (after checking the
    /// CSR's self-signature proves possession of the private key); the subject, SANs,
    /// extensions and any requested CA flag or validity are ignored.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, CsrError> {
        let public_key = csr::public_key_from_csr(csr_der)?;
        let sans = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|e: rcgen::Error| CsrError::Sign(e.to_string()))?,
        )];
        let params = leaf_params(
            sans,
            &identity.uri(),
            ExtendedKeyUsagePurpose::ClientAuth,
            now,
            lifetime,
        );
        let issuer = self.issuer().map_err(|e| CsrError::Sign(e.to_string()))?;
        let cert = params
            .signed_by(&public_key, &issuer)
            .map_err(|e| CsrError::Sign(e.to_string()))?;
        Ok(issued(&params, &cert))
    }

    fn sign(&self, params: &CertificateParams, key: &KeyPair) -> Result<IssuedCert, TlsError> {
        let issuer = self.issuer()?;
        let cert = params
            .signed_by(key, &issuer)
            .map_err(rcgen_err("certificate"))?;
        Ok(issued(params, &cert))
    }
}

fn issued(params: &CertificateParams, cert: &rcgen::Certificate) -> IssuedCert {
    let serial_hex = params
        .serial_number
        .as_ref()
        .map(|s| crate::hex(&s.to_bytes()))
        .unwrap_or_default();
    let not_after_ms = params.not_after.unix_timestamp().max(0) as u64 * 1000;
    IssuedCert {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        serial_hex,
        not_after: UnixMillis(not_after_ms),
    }
}

fn leaf_params(
    sans: Vec<SanType>,
    common_name: &str,
    eku: ExtendedKeyUsagePurpose,
    now: SystemTime,
    lifetime: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.serial_number = Some(random_serial());
    params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
    params.not_after = OffsetDateTime::from(now + lifetime);
    params.use_authority_key_identifier_extension = true;
    params
}

/// 16 random bytes with the top bit cleared, so the DER integer stays positive and 16 bytes.
fn random_serial() -> SerialNumber {
    let mut bytes = crate::random_bytes::<16>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6; // never a leading zero byte, so the encoding length is fixed
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::AgentId;
    use x509_parser::prelude::parse_x509_certificate;

    fn agent() -> Identity {
        Identity::Agent(AgentId::parse("ag-0123456789ab").expect("id"))
    }

    /// A CSR that asks for everything it must not get: CA, extra SANs, server auth,
    /// a long validity. The issued certificate has none of it.
    #[test]
    fn csr_wishes_are_ignored() {
        let now = SystemTime::now();
        let ca = CertAuthority::create("test", now).expect("ca");
        let key = KeyPair::generate().expect("key");
        let mut wish =
            CertificateParams::new(vec!["evil.example.com".to_owned(), "10.0.0.1".to_owned()])
                .expect("params");
        wish.subject_alt_names
            .push(SanType::URI("gantry://admin/root".try_into().expect("uri")));
        wish.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        wish.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::Any,
        ];
        wish.not_after = rcgen::date_time_ymd(2200, 1, 1);
        let csr = wish.serialize_request(&key).expect("csr");

        let lifetime = Duration::from_secs(3600);
        let cert = ca
            .sign_csr(csr.der(), &agent(), now, lifetime)
            .expect("signed");
        let (_, x509) = parse_x509_certificate(&cert.der).expect("parse");

        let bc = x509.basic_constraints().expect("bc").expect("present");
        assert!(!bc.value.ca, "issued certificate must not be a CA");
        let sans: Vec<String> = x509
            .subject_alternative_name()
            .expect("san")
            .expect("present")
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        assert_eq!(sans, vec![format!("URI({:?})", agent().uri())]);
        let eku = x509
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        let validity = x509.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(
            span.cast_unsigned(),
            (lifetime + CLOCK_SKEW_ALLOWANCE).as_secs()
        );
        assert_eq!(Identity::from_cert_der(&cert.der), Ok(agent()));
        // The public key is the CSR's, so the agent's key never left the agent.
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        // Signed by the CA.
        let (_, ca_x509) = parse_x509_certificate(ca.cert_der()).expect("ca");
        x509.verify_signature(Some(ca_x509.public_key()))
            .expect("signature by CA");
    }

    #[test]
    fn serials_are_random_and_positive() {
        let now = SystemTime::now();
        let ca = CertAuthority::create("test", now).expect("ca");
        let a = ca.issue_admin("a", now).expect("a").0;
        let b = ca.issue_admin("a", now).expect("b").0;
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_eq!(a.serial_hex.len(), 32);
        assert!(u8::from_str_radix(&a.serial_hex[..2], 16).expect("hex") < 0x80);
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = CertAuthority::create("test", SystemTime::now()).expect("ca");
        let again = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("load");
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert!(CertAuthority::from_pem("garbage", "garbage").is_err());
    }
}
