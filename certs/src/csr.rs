//! Certificate signing requests: making one on the agent, and reading only its public
//! key on the coordinator.

use rcgen::{CertificateParams, KeyPair, PublicKeyData, SignatureAlgorithm};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Unparsable(String),
    #[error("CSR signature does not verify: the request was not signed by the key it carries")]
    BadSignature,
    #[error("CSR key type {0} is not supported: use ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
    #[error("CSR has {0} trailing bytes after the request")]
    Trailing(usize),
    #[error("could not sign the certificate: {0}")]
    Sign(String),
}

/// A fresh key pair and a CSR for it, made on the host that keeps the key.
#[derive(Debug)]
pub struct KeyAndCsr {
    pub key_pem: String,
    pub csr_der: Vec<u8>,
}

/// Generates a P-256 key and a CSR carrying nothing but its public key.
pub fn generate_key_and_csr() -> Result<KeyAndCsr, CsrError> {
    let key = KeyPair::generate().map_err(|e| CsrError::Sign(e.to_string()))?;
    let params = CertificateParams::default();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CsrError::Sign(e.to_string()))?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_der: csr.der().to_vec(),
    })
}

/// The public key from a CSR, in the form rcgen signs.
#[derive(Debug)]
pub(crate) struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses a CSR, checks its self-signature, and returns only its public key.
pub(crate) fn public_key_from_csr(der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Unparsable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Trailing(rest.len()));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg_oid = &spki.algorithm.algorithm;
    let alg = if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Some(c) if c == OID_NIST_EC_P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            other => return Err(CsrError::UnsupportedKey(format!("EC on curve {other:?}"))),
        }
    } else if *alg_oid == OID_SIG_ED25519 {
        &rcgen::PKCS_ED25519
    } else {
        return Err(CsrError::UnsupportedKey(alg_oid.to_id_string()));
    };
    Ok(CsrPublicKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_csr_is_accepted() {
        let k = generate_key_and_csr().expect("csr");
        let pk = public_key_from_csr(&k.csr_der).expect("parse");
        let key = KeyPair::from_pem(&k.key_pem).expect("key");
        assert_eq!(pk.der_bytes(), key.public_key_raw());
    }

    #[test]
    fn bad_csrs_are_refused_with_a_reason() {
        assert!(matches!(
            public_key_from_csr(b"not a csr"),
            Err(CsrError::Unparsable(_))
        ));
        let mut k = generate_key_and_csr().expect("csr");
        // Flip a bit in the signature (the last bytes of the DER): possession is not proven.
        let last = k.csr_der.len() - 1;
        k.csr_der[last] ^= 0x01;
        assert_eq!(
            public_key_from_csr(&k.csr_der).map(|_| ()),
            Err(CsrError::BadSignature)
        );
        let mut k = generate_key_and_csr().expect("csr");
        k.csr_der.push(0);
        assert_eq!(
            public_key_from_csr(&k.csr_der).map(|_| ()),
            Err(CsrError::Trailing(1))
        );
    }
}
