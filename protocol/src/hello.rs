//! The versioned hello: the first frame a client sends on its control stream.
//!
//! Its payload is `b"GNTY"`, the protocol version as a big-endian u16, then the postcard
//! encoding of [`Intent`]. The fixed prefix means a coordinator can read the version and
//! refuse an unsupported one by name even when the rest of the hello has a shape it does
//! not know, and can tell garbage from an old or new Gantry peer.

use crate::messages::Intent;
use crate::{frame, FrameError, MIN_SUPPORTED_VERSION, PROTOCOL_VERSION};

/// First four payload bytes of every hello.
pub const MAGIC: &[u8; 4] = b"GNTY";

/// A decoded hello.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub version: u16,
    pub intent: Intent,
}

/// Why a hello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a Gantry hello: the first frame must start with \"GNTY\" and a version")]
    NotGantry,
    #[error(
        "unsupported protocol version {theirs}: this coordinator speaks versions {min}..={max}; \
         upgrade or downgrade the peer to match"
    )]
    UnsupportedVersion { theirs: u16, min: u16, max: u16 },
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Encodes a hello with the current protocol version as one frame.
pub fn encode_hello(intent: &Intent, limit: u32) -> Result<Vec<u8>, FrameError> {
    encode_hello_with_version(PROTOCOL_VERSION, intent, limit)
}

/// Encodes a hello claiming `version`; tests use it to play a peer from another release.
pub fn encode_hello_with_version(
    version: u16,
    intent: &Intent,
    limit: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut payload = Vec::with_capacity(64);
    payload.extend_from_slice(MAGIC);
    payload.extend_from_slice(&version.to_be_bytes());
    let payload = postcard::to_extend(intent, payload).map_err(|e| FrameError::Encode {
        what: "Intent",
        detail: e.to_string(),
    })?;
    frame::frame_raw(&payload, limit)
}

/// Decodes a hello payload (without the frame header), checking magic and version first.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, HelloError> {
    if payload.len() < MAGIC.len() + 2 || &payload[..MAGIC.len()] != MAGIC {
        return Err(HelloError::NotGantry);
    }
    let version = u16::from_be_bytes([payload[4], payload[5]]);
    if !(MIN_SUPPORTED_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(HelloError::UnsupportedVersion {
            theirs: version,
            min: MIN_SUPPORTED_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    let intent = frame::decode_payload::<Intent>(&payload[6..])?;
    Ok(Hello { version, intent })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::HEADER_LEN;
    use crate::messages::AdminHello;

    fn admin() -> Intent {
        Intent::Admin(AdminHello {
            client_version: "test".into(),
        })
    }

    #[test]
    fn hello_round_trips() {
        let frame = encode_hello(&admin(), 1024).expect("encode");
        let hello = decode_hello(&frame[HEADER_LEN..]).expect("decode");
        assert_eq!(
            hello,
            Hello {
                version: PROTOCOL_VERSION,
                intent: admin()
            }
        );
    }

    #[test]
    fn future_version_is_refused_by_number_even_if_the_body_is_unreadable() {
        let mut payload = MAGIC.to_vec();
        payload.extend_from_slice(&999u16.to_be_bytes());
        payload.extend_from_slice(&[0xde, 0xad]);
        let err = decode_hello(&payload).expect_err("version 999");
        assert_eq!(
            err,
            HelloError::UnsupportedVersion {
                theirs: 999,
                min: crate::MIN_SUPPORTED_VERSION,
                max: PROTOCOL_VERSION
            }
        );
        assert!(
            err.to_string().contains("unsupported protocol version 999"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_not_gantry() {
        assert_eq!(
            decode_hello(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::NotGantry)
        );
        assert_eq!(decode_hello(b""), Err(HelloError::NotGantry));
    }
}
