//! Length-delimited postcard frames: a 4-byte big-endian payload length, then the payload.
//!
//! The length is checked against the limit before any buffer for the payload is
//! allocated, so a peer that announces a 4 GiB frame costs us four bytes of reading.
//! [`FrameDecoder`] is a sans-IO decoder (bytes in, frames out) used by tests and fuzzing;
//! the transport reads the header and payload from a QUIC stream with the same checks.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// What can go wrong turning bytes into messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u32 },
    #[error("malformed {what} message: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("could not encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
}

/// Checks an announced payload length against `limit`, before allocation.
pub fn check_len(len: u32, limit: u32) -> Result<usize, FrameError> {
    if len > limit {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            limit,
        });
    }
    Ok(len as usize)
}

/// Serializes `msg` into one frame (header included), refusing frames over `limit`.
///
/// The buffer is sized first (postcard's size pass only counts): growing it while
/// serializing a 256 KiB chunk copied it about twice over, a few percent of a bulk
/// transfer's CPU.
pub fn encode_frame<T: Serialize>(msg: &T, limit: u32) -> Result<Vec<u8>, FrameError> {
    let encode_error = |e: postcard::Error| FrameError::Encode {
        what: std::any::type_name::<T>(),
        detail: e.to_string(),
    };
    let size = postcard::experimental::serialized_size(msg).map_err(encode_error)?;
    if size > limit as usize {
        return Err(FrameError::TooLarge {
            len: size as u64,
            limit,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + size);
    out.resize(HEADER_LEN, 0);
    let out = postcard::to_extend(msg, out).map_err(encode_error)?;
    frame_payload_in_place(out, limit)
}

/// The frame of a message whose last field is a byte field, less that field's bytes:
/// the header (counting `body_len` bytes more) and the message up to the field's bytes.
/// The sender hands the bytes to the stream after it as they are, instead of copying a
/// chunk into its frame (a memcpy of every byte of a bulk transfer, on both ends).
///
/// `with_empty_body` is the message with that field empty; the field must be the last
/// thing it serializes (postcard writes an empty byte field as the single byte 0).
pub fn encode_frame_head<T: Serialize>(
    with_empty_body: &T,
    body_len: usize,
    limit: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut out = encode_frame(with_empty_body, limit)?;
    if out.len() <= HEADER_LEN || out.last() != Some(&0) {
        return Err(FrameError::Encode {
            what: std::any::type_name::<T>(),
            detail: "the message does not end with an empty byte field".to_owned(),
        });
    }
    out.pop();
    // A byte field's length is a varint, exactly as postcard writes a u64.
    let mut out = postcard::to_extend(&(body_len as u64), out).map_err(|e| FrameError::Encode {
        what: std::any::type_name::<T>(),
        detail: e.to_string(),
    })?;
    let payload_len = (out.len() - HEADER_LEN) as u64 + body_len as u64;
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|len| *len <= limit)
        .ok_or(FrameError::TooLarge {
            len: payload_len,
            limit,
        })?;
    out[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Writes the header in front of a payload that was serialized after `HEADER_LEN` zero bytes.
fn frame_payload_in_place(mut out: Vec<u8>, limit: u32) -> Result<Vec<u8>, FrameError> {
    let payload_len = out.len() - HEADER_LEN;
    let len = u32::try_from(payload_len).map_err(|_| FrameError::TooLarge {
        len: payload_len as u64,
        limit,
    })?;
    check_len(len, limit)?;
    out[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Frames raw payload bytes (used for the hello, whose payload has its own prefix).
pub fn frame_raw(payload: &[u8], limit: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.extend_from_slice(payload);
    frame_payload_in_place(out, limit)
}

/// Decodes one payload as `T`; trailing bytes are an error, so a frame is exactly one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    decode_payload_borrowed(payload)
}

/// [`decode_payload`] for a message that borrows from the payload (a byte field as
/// `&[u8]`), so its bytes are not copied out.
pub fn decode_payload_borrowed<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    let what = short_type_name::<T>();
    let (msg, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| FrameError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed {
            what,
            detail: format!("{} trailing bytes after the message", rest.len()),
        });
    }
    Ok(msg)
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Sans-IO frame decoder: feed it bytes as they arrive, take out whole payloads.
#[derive(Debug)]
pub struct FrameDecoder {
    limit: u32,
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            buf: Vec::new(),
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next whole payload, `Ok(None)` if more bytes are needed, or an error
    /// as soon as a header announces a frame over the limit (before buffering its body).
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.buf[..HEADER_LEN]);
        let len = check_len(u32::from_be_bytes(header), self.limit)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{AgentMessage, HostFigures};

    #[test]
    fn frames_round_trip_through_the_decoder_byte_by_byte() {
        let msgs = vec![
            AgentMessage::Heartbeat(HostFigures {
                cpu_count: 2,
                cpu_percent: 12.5,
                ..HostFigures::default()
            }),
            AgentMessage::RenewCertificate {
                csr_der: vec![1, 2, 3],
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode_frame(m, 1024).expect("encode"));
        }
        let mut dec = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for b in wire {
            dec.push(&[b]);
            while let Some(p) = dec.next_payload().expect("decode") {
                got.push(decode_payload::<AgentMessage>(&p).expect("payload"));
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_header_is_refused_before_the_body_arrives() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&u32::MAX.to_be_bytes());
        let err = dec.next_payload().expect_err("over the limit");
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: u64::from(u32::MAX),
                limit: 1024
            }
        );
        assert!(err.to_string().contains("exceeds the limit of 1024 bytes"));
    }

    #[test]
    fn encoding_over_the_limit_is_refused() {
        let big = AgentMessage::RenewCertificate {
            csr_der: vec![0; 2000],
        };
        assert!(matches!(
            encode_frame(&big, 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        let err = decode_payload::<AgentMessage>(&[0xff, 0xff, 0xff]).expect_err("garbage");
        assert!(
            err.to_string()
                .starts_with("malformed AgentMessage message"),
            "{err}"
        );
        let mut ok = postcard::to_stdvec(&AgentMessage::RenewCertificate { csr_der: vec![] })
            .expect("encode");
        ok.push(0);
        let err = decode_payload::<AgentMessage>(&ok).expect_err("trailing");
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
    }

    #[test]
    fn a_frame_head_and_its_body_are_the_frame_of_the_whole_message() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 300_000] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let whole = AgentMessage::RenewCertificate {
                csr_der: body.clone(),
            };
            let empty = AgentMessage::RenewCertificate { csr_der: vec![] };
            let mut framed = encode_frame_head(&empty, len, 1 << 20).expect("head");
            framed.extend_from_slice(&body);
            assert_eq!(
                framed,
                encode_frame(&whole, 1 << 20).expect("whole"),
                "{len}"
            );
        }
    }

    #[test]
    fn a_frame_head_is_refused_over_the_limit_or_without_a_trailing_byte_field() {
        let empty = AgentMessage::RenewCertificate { csr_der: vec![] };
        assert_eq!(
            encode_frame_head(&empty, 2000, 1024),
            Err(FrameError::TooLarge {
                len: 2003,
                limit: 1024
            })
        );
        let not_empty = AgentMessage::RenewCertificate { csr_der: vec![9] };
        let err = encode_frame_head(&not_empty, 10, 1024).expect_err("not an empty field");
        assert!(err.to_string().contains("empty byte field"), "{err}");
    }
}
