//! Signatures on offline bundles: the CA vouches for a bundle's SHA-256.
//!
//! What is signed is a one-line statement, `gantry-bundle-v1 sha256:<hex>\n`, not the
//! archive itself: the statement names the digest the operator also compares, it can be
//! rebuilt with `printf` on any host, and its first byte (`g`) can never start a DER
//! structure, so a bundle signature can never pass for a certificate signature made
//! with the same key. The signature is ECDSA P-256 with SHA-256 in ASN.1 DER, carried as
//! standard base64, so `openssl dgst -sha256 -verify` checks it as well as
//! [`verify`] does.
//!
//! This module owns the statement, signing with the CA key and verifying against a CA
//! certificate; it knows nothing of archives or files.

use base64::Engine;
use ring::signature::{self, KeyPair as _};

use crate::CertAuthority;

/// The statement's prefix: it names the format, so a future format cannot be confused
/// with this one.
pub const STATEMENT_PREFIX: &str = "gantry-bundle-v1";

/// Why a bundle signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleSignatureError {
    #[error("the SHA-256 {0:?} is not 64 hex digits")]
    BadDigest(String),
    #[error("the signature is not base64: {0}")]
    NotBase64(String),
    #[error("the CA certificate is unreadable: {0}")]
    BadCa(String),
    #[error("the CA key cannot sign bundles: {0}")]
    Key(String),
    #[error("the signature does not match this SHA-256 and CA: the bundle was changed, or it was signed by another coordinator")]
    Mismatch,
}

/// The exact bytes signed for a bundle whose SHA-256 is `digest_hex`.
pub fn statement(digest_hex: &str) -> Result<String, BundleSignatureError> {
    let hex = normalize_digest(digest_hex)?;
    Ok(format!("{STATEMENT_PREFIX} sha256:{hex}\n"))
}

/// Lower-case 64 hex digits, accepting an optional `sha256:` prefix and upper case.
pub fn normalize_digest(digest_hex: &str) -> Result<String, BundleSignatureError> {
    let trimmed = digest_hex.trim();
    let hex = trimmed.strip_prefix("sha256:").unwrap_or(trimmed);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BundleSignatureError::BadDigest(
            digest_hex.chars().take(80).collect(),
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// Signs the statement for `digest_hex` with the CA key; returns base64 (standard
/// alphabet, padded) of the DER signature.
pub fn sign(ca: &CertAuthority, digest_hex: &str) -> Result<String, BundleSignatureError> {
    let message = statement(digest_hex)?;
    let rng = ring::rand::SystemRandom::new();
    let key = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &ca.key_pkcs8_der(),
        &rng,
    )
    .map_err(|e| BundleSignatureError::Key(format!("not an ECDSA P-256 key ({e})")))?;
    // Refuse a key that is not the certificate's: a bundle signed by it would never verify.
    if public_key(ca.cert_der())? != key.public_key().as_ref() {
        return Err(BundleSignatureError::Key(
            "the key does not belong to the CA certificate".into(),
        ));
    }
    let sig = key
        .sign(&rng, message.as_bytes())
        .map_err(|e| BundleSignatureError::Key(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sig.as_ref()))
}

/// Checks `signature_b64` over the statement for `digest_hex` against the CA
/// certificate `ca_der`.
pub fn verify(
    ca_der: &[u8],
    digest_hex: &str,
    signature_b64: &str,
) -> Result<(), BundleSignatureError> {
    let message = statement(digest_hex)?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|e| BundleSignatureError::NotBase64(e.to_string()))?;
    let key = public_key(ca_der)?;
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(message.as_bytes(), &sig)
        .map_err(|_| BundleSignatureError::Mismatch)
}

/// The uncompressed P-256 point of a certificate's subject public key.
fn public_key(cert_der: &[u8]) -> Result<Vec<u8>, BundleSignatureError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| BundleSignatureError::BadCa(e.to_string()))?;
    let spki = cert.public_key();
    // id-ecPublicKey with the prime256v1 curve; anything else is not a Gantry CA.
    let ec = x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let p256 = x509_parser::oid_registry::OID_EC_P256;
    let curve_ok = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|oid| oid == p256);
    if spki.algorithm.algorithm != ec || !curve_ok {
        return Err(BundleSignatureError::BadCa(
            "its key is not ECDSA P-256".into(),
        ));
    }
    Ok(spki.subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    const DIGEST: &str = "5f3a0c7e9b2d4f6a8c1e3b5d7f9a2c4e6b8d0f1a3c5e7b9d2f4a6c8e0b1d3f5a";

    #[test]
    fn a_signature_verifies_for_its_digest_and_ca_only() {
        let now = SystemTime::now();
        let ca = CertAuthority::create("bundle test", now).expect("ca");
        let sig = sign(&ca, DIGEST).expect("sign");
        verify(ca.cert_der(), DIGEST, &sig).expect("verifies");
        // The same digest written differently is the same statement.
        verify(
            ca.cert_der(),
            &format!("sha256:{}", DIGEST.to_uppercase()),
            &sig,
        )
        .expect("prefix and case do not matter");

        let mut other_digest = DIGEST.to_owned();
        other_digest.replace_range(0..1, "6");
        assert_eq!(
            verify(ca.cert_der(), &other_digest, &sig),
            Err(BundleSignatureError::Mismatch)
        );
        let other_ca = CertAuthority::create("another", now).expect("ca");
        assert_eq!(
            verify(other_ca.cert_der(), DIGEST, &sig),
            Err(BundleSignatureError::Mismatch)
        );
        // One flipped bit anywhere in the signature is refused.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&sig)
            .expect("b64");
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let bad = base64::engine::general_purpose::STANDARD.encode(bad);
            assert!(verify(ca.cert_der(), DIGEST, &bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn bad_input_is_named() {
        let ca = CertAuthority::create("bundle test", SystemTime::now()).expect("ca");
        assert!(matches!(
            sign(&ca, "abc"),
            Err(BundleSignatureError::BadDigest(_))
        ));
        assert!(matches!(
            verify(ca.cert_der(), DIGEST, "not base64!"),
            Err(BundleSignatureError::NotBase64(_))
        ));
        assert!(matches!(
            verify(b"garbage", DIGEST, "AAAA"),
            Err(BundleSignatureError::BadCa(_))
        ));
        assert_eq!(
            statement(DIGEST).expect("statement"),
            format!("gantry-bundle-v1 sha256:{DIGEST}\n")
        );
    }
}
