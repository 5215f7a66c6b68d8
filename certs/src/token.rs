//! Join tokens: how a new agent proves it may enroll, and how it finds and verifies the
//! coordinator before trusting it.
//!
//! A token string is `gjt1_` followed by base64url (no padding) of four lines: the
//! coordinator address, the CA fingerprint, the token id and the secret. It is one
//! shell-safe word. The coordinator stores only the SHA-256 of the secret (the secret is
//! 256 random bits, so a fast hash is enough), with the expiry, use count and labels.

use base64::Engine;
use gantry_protocol::TokenId;

const PREFIX: &str = "gjt1_";
const SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `host:port` of the coordinator's QUIC endpoint.
    pub coordinator_address: String,
    /// `sha256:<hex>` of the CA certificate.
    pub ca_fingerprint: String,
    pub id: TokenId,
    /// 64 lower-case hex digits.
    pub secret: String,
}

/// Why a token string is not a token. The coordinator adds its own reasons (unknown,
/// expired, used up) when it checks a well-formed token against its store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token: {0}; copy the whole token printed by `gantry token create`")]
    Malformed(String),
}

impl JoinToken {
    /// Draws a new token for a coordinator.
    pub fn generate(coordinator_address: &str, ca_fingerprint: &str) -> Self {
        let id = TokenId::from_random(&crate::random_bytes::<8>());
        let secret = crate::hex(&crate::random_bytes::<SECRET_BYTES>());
        Self {
            coordinator_address: coordinator_address.to_owned(),
            ca_fingerprint: ca_fingerprint.to_owned(),
            id,
            secret,
        }
    }

    /// The one-word token string.
    pub fn encode(&self) -> String {
        let text = format!(
            "{}\n{}\n{}\n{}",
            self.coordinator_address, self.ca_fingerprint, self.id, self.secret
        );
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
        )
    }

    /// Parses a token string, checking the shape of every field.
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        let token = token.trim();
        let body = token
            .strip_prefix(PREFIX)
            .ok_or_else(|| TokenError::Malformed(format!("it does not start with {PREFIX:?}")))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(format!("it is not valid base64url ({e})")))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| TokenError::Malformed("it does not decode to text".into()))?;
        let fields: Vec<&str> = text.split('\n').collect();
        let [address, fingerprint, id, secret] = fields[..] else {
            return Err(TokenError::Malformed(format!(
                "it has {} fields, expected 4",
                fields.len()
            )));
        };
        if address.is_empty() || !address.contains(':') {
            return Err(TokenError::Malformed(format!(
                "coordinator address {address:?} is not host:port"
            )));
        }
        let fp_ok = fingerprint
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && is_lower_hex(h));
        if !fp_ok {
            return Err(TokenError::Malformed(
                "CA fingerprint is not sha256:<64 hex digits>".into(),
            ));
        }
        let id = TokenId::parse(id).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if secret.len() != SECRET_BYTES * 2 || !is_lower_hex(secret) {
            return Err(TokenError::Malformed("secret is not 64 hex digits".into()));
        }
        Ok(Self {
            coordinator_address: address.to_owned(),
            ca_fingerprint: fingerprint.to_owned(),
            id,
            secret: secret.to_owned(),
        })
    }
}

/// SHA-256 of a token secret, as stored.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    crate::sha256(secret.as_bytes())
}

/// Compares a presented secret with a stored hash in constant time.
pub fn secret_matches(secret: &str, stored_hash: &[u8]) -> bool {
    let presented = hash_secret(secret);
    if stored_hash.len() != presented.len() {
        return false;
    }
    presented
        .iter()
        .zip(stored_hash)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_one_shell_word() {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let t = JoinToken::generate("[::1]:7443", &fp);
        let s = t.encode();
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{s}"
        );
        assert_eq!(JoinToken::parse(&s), Ok(t.clone()));
        assert!(secret_matches(&t.secret, &hash_secret(&t.secret)));
        assert!(!secret_matches(&t.secret, &hash_secret("other")));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        let cases = [
            ("hello", "does not start with"),
            ("gjt1_!!!", "not valid base64url"),
            ("gjt1_aGVsbG8", "has 1 fields"),
        ];
        for (token, expect) in cases {
            let err = JoinToken::parse(token).expect_err(token).to_string();
            assert!(err.contains(expect), "{token}: {err}");
            assert!(err.starts_with("malformed join token"), "{err}");
        }
        let fp = format!("sha256:{}", "ab".repeat(32));
        let mut t = JoinToken::generate("127.0.0.1:1", &fp);
        t.secret = "short".into();
        let err = JoinToken::parse(&t.encode())
            .expect_err("short secret")
            .to_string();
        assert!(err.contains("secret is not 64 hex digits"), "{err}");
    }
}
