//! `gantry-certs`: Gantry's trust model in code.
//!
//! It owns the CA, issuing certificates (server, admin, and agent certificates from CSRs
//! of which only the public key is kept), identities and roles carried in URI SANs, join
//! tokens, the revocation set, and the rustls configurations built from all of these.
//! It must not know about storage engines or networking: callers hand it bytes and get
//! bytes and configs back. The only crypto provider is ring.

pub mod bundle;
pub mod ca;
pub mod csr;
pub mod identity;
pub mod keyfile;
pub mod tls;
pub mod token;

pub use ca::{CertAuthority, IssuedCert, ADMIN_CERT_LIFETIME};

pub use csr::{generate_key_and_csr, CsrError, KeyAndCsr};
pub use identity::{Identity, IdentityError, Role};
pub use tls::{ClientTls, PeerTls, RevocationSet, ServerTls, TlsError};
pub use token::{JoinToken, TokenError};

/// The one crypto provider of the workspace.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `sha256:<hex>` of a DER certificate: how a token pins the CA.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex(&sha256(der)))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Decodes the first certificate of a PEM text into DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| TlsError::Pem {
            what: "certificate",
            detail: e.to_string(),
        })
}

/// Validity window (`not_before`, `not_after`) of a DER certificate.
pub fn cert_validity(
    der: &[u8],
) -> Result<(gantry_protocol::UnixMillis, gantry_protocol::UnixMillis), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let to_ms = |t: x509_parser::time::ASN1Time| {
        gantry_protocol::UnixMillis(t.timestamp().max(0) as u64 * 1000)
    };
    Ok((
        to_ms(cert.validity().not_before),
        to_ms(cert.validity().not_after),
    ))
}

/// When a certificate should be renewed: after two thirds of its real lifetime. The
/// lifetime is measured from the moment of issue, which is `not_before` plus the clock
/// skew allowance that [`ca`] backdates every leaf by.
pub fn renewal_due_at(
    not_before: gantry_protocol::UnixMillis,
    not_after: gantry_protocol::UnixMillis,
) -> gantry_protocol::UnixMillis {
    let skew = ca::CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
    let window = not_after.millis_since(not_before);
    let issued = if window > skew {
        not_before.0 + skew
    } else {
        not_before.0
    };
    let lifetime = not_after.0.saturating_sub(issued);
    gantry_protocol::UnixMillis(issued + lifetime / 3 * 2)
}

/// Draws `N` random bytes from the system's secure generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // SystemRandom only fails if the OS has no entropy source, which is not recoverable.
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("the OS random number generator failed");
    out
}

#[cfg(test)]
mod tests {
    use gantry_protocol::UnixMillis;

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_real_lifetime() {
        let skew = super::ca::CLOCK_SKEW_ALLOWANCE.as_millis() as u64;
        let issued = 1_000_000_000;
        // A 6 s certificate backdated by the skew allowance is due 4 s after issue.
        let due = super::renewal_due_at(UnixMillis(issued - skew), UnixMillis(issued + 6_000));
        assert_eq!(due, UnixMillis(issued + 4_000));
        // A certificate from elsewhere without the backdating: two thirds of its window.
        let due = super::renewal_due_at(UnixMillis(0), UnixMillis(3_000));
        assert_eq!(due, UnixMillis(2_000));
    }
}
