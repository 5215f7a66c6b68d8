//! BLAKE3 content digests (the ids of artifact chunks and manifests) and their one textual form, `blake3:<64 lowercase hex>`.
//!
//! A digest always names the uncompressed bytes, so recompressing a chunk (another zstd
//! level, another zstd version) never changes its id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The algorithm prefix of the textual form. Part of the id so that a future algorithm
/// can live next to this one without ambiguity.
pub const DIGEST_PREFIX: &str = "blake3:";

/// The BLAKE3 digest of some uncompressed bytes.
///
/// On the wire (postcard) it is its 32 raw bytes; in text, and in human-readable formats
/// such as the CLI's JSON, it is `blake3:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(deserializer).map(Self)
        }
    }
}

impl Digest {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Hashes the concatenation of `pieces` without joining them (a raw zstd frame's
    /// blocks, hashed where they lie): the same digest as [`Self::of`] of the whole.
    pub fn of_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = blake3::Hasher::new();
        for piece in pieces {
            hasher.update(piece);
        }
        Self(*hasher.finalize().as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(DIGEST_PREFIX)?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a digest's textual form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest `{input}`: expected `blake3:` followed by 64 lowercase hex digits")]
pub struct DigestParseError {
    /// The first 80 characters of what was given.
    pub input: String,
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = || DigestParseError {
            input: input.chars().take(80).collect(),
        };
        let hex = input.strip_prefix(DIGEST_PREFIX).ok_or_else(invalid)?;
        if hex.len() != 64 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            *byte = (hex_value(pair[0]).ok_or_else(invalid)? << 4)
                | hex_value(pair[1]).ok_or_else(invalid)?;
        }
        Ok(Self(bytes))
    }
}

/// Lowercase only: one digest has exactly one textual form, so strings compare equal
/// exactly when digests do.
fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let digest = Digest::of(b"hello");
        let text = digest.to_string();
        assert!(text.starts_with("blake3:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Digest>().ok(), Some(digest));
        // The known BLAKE3 value of the empty input pins the algorithm.
        assert_eq!(
            Digest::of(b"").to_string(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn postcard_carries_raw_bytes_and_json_the_text_form() {
        let digest = Digest::of(b"wire");
        let wire = postcard::to_stdvec(&digest).expect("postcard");
        assert_eq!(
            wire.as_slice(),
            digest.as_bytes(),
            "32 raw bytes, no length"
        );
        assert_eq!(postcard::from_bytes::<Digest>(&wire).ok(), Some(digest));
        let json = serde_json::to_string(&digest).expect("json");
        assert_eq!(json, format!("\"{digest}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).ok(), Some(digest));
    }

    #[test]
    fn parse_errors_say_what_is_expected() {
        let good = Digest::of(b"x").to_string();
        for bad in [
            "",
            "sha256:00",
            &good[7..],
            &good[..70],
            &good.to_uppercase(),
            &format!("{good}0"),
            &good.replace('a', "g"),
        ] {
            let err = bad.parse::<Digest>().expect_err(bad);
            assert!(
                err.to_string()
                    .contains("expected `blake3:` followed by 64 lowercase hex digits"),
                "{err}"
            );
        }
    }
}
