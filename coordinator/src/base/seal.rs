//! Secrets at rest: AES-256-GCM with a key kept in the data directory.
//!
//! Owns sealing and opening secret values. A sealed value is a 12-byte random nonce
//! followed by the ciphertext and tag; the secret's name is the associated data, so a
//! sealed value copied under another name does not open. The key (`secrets.key`, 32
//! random bytes, mode 0600) is created on first use; losing it loses the secrets, not
//! anything else.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secrets key {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("secret {0:?} could not be decrypted: the store or the key was changed")]
    Open(String),
    #[error("secret {0:?} could not be encrypted")]
    Seal(String),
}

/// The key that seals secrets.
pub struct SecretKey(LessSafeKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Loads the key at `path`, creating it (mode 0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        let err = |detail: String| SecretError::Key {
            path: path.display().to_string(),
            detail,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let fresh = gantry_certs::random_bytes::<32>();
                gantry_certs::keyfile::write_private(path, &fresh)
                    .map_err(|e| err(e.to_string()))?;
                fresh.to_vec()
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| err(format!("expected 32 bytes, found {}", bytes.len())))?;
        Ok(Self(LessSafeKey::new(unbound)))
    }

    pub fn seal(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, SecretError> {
        let nonce_bytes = gantry_certs::random_bytes::<NONCE_LEN>();
        let mut sealed = value.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| SecretError::Seal(name.to_owned()))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<String, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Open(name.to_owned()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SecretError::Open(name.to_owned()))?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| SecretError::Open(name.to_owned()))?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Open(name.to_owned()))
    }
}

/// Secret names: 1 to 64 of `[A-Z0-9_]`, starting with a letter (like environment variables).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_name_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.key");
        let key = SecretKey::load_or_create(&path).expect("key");
        let sealed = key.seal("DB_PASSWORD", b"hunter2").expect("seal");
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "stored encrypted"
        );
        assert_eq!(key.open("DB_PASSWORD", &sealed).expect("open"), "hunter2");
        assert!(key.open("OTHER", &sealed).is_err(), "bound to its name");
        let again = SecretKey::load_or_create(&path).expect("same key");
        assert_eq!(
            again.open("DB_PASSWORD", &sealed).expect("reopen"),
            "hunter2"
        );
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&path).expect("meta").permissions()
            ) & 0o777,
            0o600
        );
        std::fs::remove_file(&path).expect("rm");
        let other = SecretKey::load_or_create(&path).expect("new key");
        assert!(
            other.open("DB_PASSWORD", &sealed).is_err(),
            "another key cannot open it"
        );
        assert!(
            valid_name("DB_PASSWORD") && !valid_name("db") && !valid_name("1X") && !valid_name("")
        );
    }
}
