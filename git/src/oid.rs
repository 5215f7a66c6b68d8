//! Git object ids (SHA-1, the only object format this crate handles; a SHA-256
//! repository is refused with a clear error when its mirror is opened).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A git object id: 20 bytes of SHA-1, written as 40 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(pub [u8; 20]);

impl ObjectId {
    /// Parses 40 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 40 {
            return None;
        }
        let mut out = [0u8; 20];
        for (index, pair) in bytes.chunks_exact(2).enumerate() {
            out[index] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }

    /// Parses the first 40 bytes of `bytes` as hex.
    pub(crate) fn from_hex_bytes(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes.get(..40)?)
            .ok()
            .and_then(Self::from_hex)
    }

    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> String {
        let mut hex = self.to_string();
        hex.truncate(12);
        hex
    }
}

fn nibble(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl std::str::FromStr for ObjectId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s).ok_or_else(|| format!("`{s}` is not a 40-digit hex object id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_refusals() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        let id = ObjectId::from_hex(hex).expect("valid");
        assert_eq!(id.to_string(), hex);
        assert_eq!(id.short(), "0123456789ab");
        assert_eq!(ObjectId::from_hex(&hex.to_uppercase()), Some(id));
        assert!(ObjectId::from_hex(&hex[1..]).is_none());
        assert!(ObjectId::from_hex("g123456789abcdef0123456789abcdef01234567").is_none());
    }
}
