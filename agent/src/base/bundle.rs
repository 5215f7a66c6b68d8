//! `gantry-agent verify-bundle`: checks the coordinator CA's signature on an offline
//! bundle's SHA-256 (see `gantry_certs::bundle`).
//!
//! `install.sh` uses it on hosts without openssl (a minimal Debian has none). It is
//! trustworthy there only because `install.sh` runs it after the host's own `sha256sum`
//! has matched the whole bundle, this binary included, against the digest the operator
//! carried to the host; on its own it proves nothing about the bundle it came in.

use std::path::{Path, PathBuf};

/// What `verify-bundle` checks.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The CA certificate (PEM) the signature must come from.
    pub ca: PathBuf,
    /// The SHA-256 the signature is over.
    pub sha256: String,
    /// Base64 of the DER ECDSA signature.
    pub signature: String,
    /// If given, its SHA-256 must also be `sha256`.
    pub bundle: Option<PathBuf>,
}

/// Why a bundle does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a PEM certificate: {detail}", path.display())]
    Ca { path: PathBuf, detail: String },
    #[error("the SHA-256 of {} is {actual}, not {expected}: the bundle was changed or damaged", path.display())]
    Digest {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error(transparent)]
    Signature(#[from] gantry_certs::bundle::BundleSignatureError),
}

impl VerifyError {
    /// A bundle that does not verify is bad input; an unreadable file too.
    pub fn exit_code(&self) -> u8 {
        super::exit::USAGE
    }
}

/// Checks the signature (and the file's digest when given); returns the CA fingerprint.
pub fn verify(options: &VerifyOptions) -> Result<String, VerifyError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VerifyError::Read { path, source }
    };
    let pem = std::fs::read_to_string(&options.ca).map_err(read_err(&options.ca))?;
    let ca_der = gantry_certs::pem_to_der(&pem).map_err(|e| VerifyError::Ca {
        path: options.ca.clone(),
        detail: e.to_string(),
    })?;
    let expected = gantry_certs::bundle::normalize_digest(&options.sha256)?;
    if let Some(path) = &options.bundle {
        let actual = super::files::sha256_file(path).map_err(read_err(path))?;
        if actual != expected {
            return Err(VerifyError::Digest {
                path: path.clone(),
                actual,
                expected,
            });
        }
    }
    gantry_certs::bundle::verify(&ca_der, &expected, &options.signature)?;
    Ok(gantry_certs::fingerprint(&ca_der))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use gantry_certs::CertAuthority;

    use super::*;

    #[test]
    fn a_signed_bundle_verifies_and_a_changed_one_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::create("verify test", SystemTime::now()).expect("ca");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).expect("write ca");
        let bundle = dir.path().join("bundle.tar");
        std::fs::write(&bundle, b"pretend this is a tar").expect("write bundle");
        let digest = gantry_certs::hex(&gantry_certs::sha256(b"pretend this is a tar"));
        let signature = gantry_certs::bundle::sign(&ca, &digest).expect("sign");
        let mut options = VerifyOptions {
            ca: ca_path,
            sha256: digest,
            signature,
            bundle: Some(bundle.clone()),
        };
        assert_eq!(verify(&options).expect("verifies"), ca.fingerprint());

        std::fs::write(&bundle, b"pretend this is a tar!").expect("tamper");
        let err = verify(&options).expect_err("changed file");
        assert!(matches!(err, VerifyError::Digest { .. }), "{err}");
        assert!(err.to_string().contains("changed or damaged"), "{err}");

        options.bundle = None;
        options.sha256 = gantry_certs::hex(&gantry_certs::sha256(b"pretend this is a tar!"));
        let err = verify(&options).expect_err("signature over another digest");
        assert!(matches!(err, VerifyError::Signature(_)), "{err}");
        assert_eq!(err.exit_code(), crate::base::exit::USAGE);
    }
}
