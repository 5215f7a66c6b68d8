//! The checks behind Gantry's fuzz targets, one function per target, and the seed
//! corpus they start from ([`seeds`]).
//!
//! Each function takes arbitrary bytes, feeds them to one piece of code that reads
//! untrusted input, and asserts what must hold for every input: no panic, memory bounded
//! by the limits that code declares (the fuzzer's `-rss_limit_mb` catches the rest), and
//! a property that makes a wrong answer visible (what decodes encodes back to the same
//! bytes; what is refused says why). The targets in `fuzz_targets/` only call these, so
//! `cargo test` here runs every check over the seeds without libFuzzer.
//!
//! To fuzz a new message type, add one line to [`MESSAGE_TYPES`] and a sample of it to
//! [`seeds`]; a new target gets a function here, a file in `fuzz_targets/`, a `[[bin]]`
//! in Cargo.toml and an entry in [`TARGETS`].

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use gantry_protocol::{
    decode_hello, decode_payload, frame, hello, limits, AdminRequest, AdminResponse, AgentMessage,
    ChunkFrame, ChunkPut, ChunkWants, CoordinatorMessage, ExecEvent, FollowEvent, FrameDecoder,
    FrameError, HelloReply, Intent, LogChunk, LogControl, ManifestFrame, PutReply,
    ReceivedChunkFrame, ReportUpload, ReportsStored, ResolveReply, SourceData, SourceStored,
    StreamOpen, UploadReply, UploadRequest,
};
use serde::{de::DeserializeOwned, Serialize};

pub mod seeds;

/// A check over one input.
pub type Check = fn(&[u8]);

/// Every target: its name (the `[[bin]]` and the corpus folder) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("frame_decoder", frame_decoder),
    ("messages", messages),
    ("pipeline", pipeline),
    ("manifest", manifest),
    ("decompress", decompress),
    ("csr_intake", csr_intake),
    ("reports", reports),
];

/// The sans-IO frame decoder, fed the input in pieces of 1 to 256 bytes (the first byte
/// says how many), as a QUIC stream might deliver it.
///
/// Holds: every payload is within the frame limit; the frames taken out, framed again,
/// are exactly the start of the input and the rest is still buffered; a refusal comes
/// only from a header over the limit.
pub fn frame_decoder(data: &[u8]) {
    let Some((&piece, input)) = data.split_first() else {
        return;
    };
    let limit = limits::MAX_FRAME_BYTES;
    let mut decoder = FrameDecoder::new(limit);
    let mut reframed = Vec::new();
    for bytes in input.chunks(usize::from(piece) + 1) {
        decoder.push(bytes);
        loop {
            match decoder.next_payload() {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= limit as usize, "payload over the limit");
                    reframed.extend(frame::frame_raw(&payload, limit).expect("reframe"));
                    let _ = decode_payload::<AgentMessage>(&payload);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, .. }) => {
                    let start = reframed.len();
                    let header: [u8; 4] = input[start..start + 4].try_into().expect("header");
                    assert_eq!(len, u64::from(u32::from_be_bytes(header)));
                    assert!(len > u64::from(limit));
                    return;
                }
                Err(other) => panic!("the frame decoder refused for another reason: {other}"),
            }
        }
    }
    assert_eq!(reframed.len() + decoder.buffered(), input.len());
    assert_eq!(&input[..reframed.len()], &reframed[..]);
}

/// Every type that arrives as one postcard payload, in selector order (the first input
/// byte, modulo the count, picks one; selector 0 is the hello). One line per type.
pub const MESSAGE_TYPES: &[(&str, Check)] = &[
    ("hello", hello_round_trip),
    ("Intent", round_trip::<Intent>),
    ("HelloReply", round_trip::<HelloReply>),
    ("AgentMessage", round_trip::<AgentMessage>),
    ("CoordinatorMessage", round_trip::<CoordinatorMessage>),
    ("StreamOpen", round_trip::<StreamOpen>),
    ("LogChunk", round_trip::<LogChunk>),
    ("LogControl", round_trip::<LogControl>),
    ("FollowEvent", round_trip::<FollowEvent>),
    ("AdminRequest", round_trip::<AdminRequest>),
    ("AdminResponse", round_trip::<AdminResponse>),
    ("SourceData", round_trip::<SourceData>),
    ("SourceStored", round_trip::<SourceStored>),
    // Bulk transfers: read by the coordinator from agents, and by agents from the
    // coordinator and from each other (peers serving a release).
    ("ResolveReply", round_trip::<ResolveReply>),
    ("ManifestFrame", round_trip::<ManifestFrame>),
    ("ChunkWants", round_trip::<ChunkWants>),
    ("ChunkFrame", chunk_frame),
    ("UploadRequest", round_trip::<UploadRequest>),
    ("UploadReply", round_trip::<UploadReply>),
    ("ChunkPut", chunk_put),
    ("PutReply", round_trip::<PutReply>),
    ("ExecEvent", round_trip::<ExecEvent>),
    // Test reports: files from agents, the coordinator's answer.
    ("ReportUpload", round_trip::<ReportUpload>),
    ("ReportsStored", round_trip::<ReportsStored>),
];

/// One message of the type the first byte selects (see [`MESSAGE_TYPES`]).
pub fn messages(data: &[u8]) {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let (_, check) = MESSAGE_TYPES[usize::from(selector) % MESSAGE_TYPES.len()];
    check(payload);
}

/// Decodes `payload` as `T`; what decodes must encode to bytes that decode to the same
/// encoding (compared as bytes, so a NaN in host figures compares equal to itself).
fn round_trip<T: Serialize + DeserializeOwned>(payload: &[u8]) {
    let Ok(message) = decode_payload::<T>(payload) else {
        return;
    };
    let bytes = postcard::to_stdvec(&message).expect("a decoded message encodes");
    let again = decode_payload::<T>(&bytes).expect("an encoded message decodes");
    assert_eq!(
        postcard::to_stdvec(&again).expect("encode again"),
        bytes,
        "encoding is not stable"
    );
}

/// A `ChunkPut` both ways a receiver may decode it, owned and left in the pieces it
/// arrived in (`decode_received_pieces`, as the coordinator reads uploads): both accept
/// exactly the same payloads, with the same fields and data, whether it arrived whole or
/// cut where the payload's last byte says (in the head for short payloads) and in the
/// middle.
fn chunk_put(payload: &[u8]) {
    round_trip::<ChunkPut>(payload);
    let cut = usize::from(payload.last().copied().unwrap_or(0)).min(payload.len());
    let middle = cut.max(payload.len() / 2);
    let len = payload.len();
    for edges in [&[0, len][..], &[0, cut, middle, len][..]] {
        let pieces: Vec<gantry_cas::Bytes> = edges
            .windows(2)
            .map(|piece| gantry_cas::Bytes::copy_from_slice(&payload[piece[0]..piece[1]]))
            .collect();
        let in_pieces =
            ChunkPut::decode_received_pieces(&pieces, payload.len()).map(|chunk| ChunkPut {
                digest: chunk.digest,
                size: chunk.size,
                data: chunk.data_pieces().concat(),
            });
        decoders_agree(payload, in_pieces);
    }
}

/// A `ChunkFrame`, as [`chunk_put`].
fn chunk_frame(payload: &[u8]) {
    round_trip::<ChunkFrame>(payload);
    let received = ChunkFrame::decode_received(payload.to_vec()).map(|frame| match frame {
        ReceivedChunkFrame::Data(chunk) => ChunkFrame::Data {
            digest: chunk.digest,
            size: chunk.size,
            data: chunk.data().to_vec(),
        },
        ReceivedChunkFrame::Unavailable { digest, reason } => {
            ChunkFrame::Unavailable { digest, reason }
        }
        ReceivedChunkFrame::Refused { message } => ChunkFrame::Refused { message },
    });
    decoders_agree(payload, received);
}

/// The owned decoding of `payload` and `received` (another decoder's result, as the
/// owned type) are both refusals or the same message.
fn decoders_agree<T: DeserializeOwned + PartialEq + std::fmt::Debug>(
    payload: &[u8],
    received: Result<T, FrameError>,
) {
    match (decode_payload::<T>(payload), received) {
        (Ok(owned), Ok(received)) => assert_eq!(owned, received, "the decoders disagree"),
        (Err(_), Err(_)) => {}
        (owned, received) => panic!(
            "the decoders disagree: owned {:?}, received {:?}",
            owned.is_ok(),
            received.is_ok()
        ),
    }
}

/// The hello: magic and version checked before the body; what decodes encodes back.
fn hello_round_trip(payload: &[u8]) {
    match decode_hello(payload) {
        Ok(decoded) => {
            let framed = hello::encode_hello_with_version(
                decoded.version,
                &decoded.intent,
                limits::MAX_FRAME_BYTES,
            )
            .expect("a decoded hello encodes");
            let again = decode_hello(&framed[frame::HEADER_LEN..]).expect("decodes again");
            assert_eq!(again.version, decoded.version);
        }
        Err(gantry_protocol::HelloError::NotGantry) => {
            assert!(payload.len() < 6 || &payload[..4] != hello::MAGIC);
        }
        Err(_) => {}
    }
}

/// A pipeline file (UTF-8 only; the CLI refuses anything else before parsing). A
/// refusal names at least one problem, each at a 1-based line and column.
pub fn pipeline(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match gantry_pipeline::parse("fuzz.yml", text) {
        Ok(pipeline) => assert!(pipeline.jobs.len() <= gantry_pipeline::MAX_JOBS),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal with no reason");
            for error in &errors.0 {
                assert!(error.line >= 1 && error.column >= 1, "{error}");
            }
        }
    }
}

/// A test or coverage report file as an agent sends it (the first byte chooses `JUnit` or
/// coverage), read into a summary by the coordinator's reader.
///
/// Holds: no panic; the summary stays within the limits `gantry_protocol::reports`
/// declares (failures kept, their names and outputs, notes, cases counted, a line rate
/// of at most 100%).
pub fn reports(data: &[u8]) {
    use gantry_protocol::reports::{
        MAX_FAILURE_OUTPUT_BYTES, MAX_KEPT_FAILURES, MAX_NOTE_BYTES, MAX_REPORT_NOTES,
        MAX_TEST_CASES, MAX_TEST_NAME_BYTES,
    };
    let Some((&kind, file)) = data.split_first() else {
        return;
    };
    let kind = if kind % 2 == 0 {
        gantry_protocol::ReportKind::Junit
    } else {
        gantry_protocol::ReportKind::Coverage
    };
    let report = gantry_reports::read_one(kind, file);
    assert!(report.total() <= MAX_TEST_CASES);
    assert!(report.failures.len() <= MAX_KEPT_FAILURES);
    assert!(report.failures.len() as u64 <= report.failed);
    for f in &report.failures {
        assert!(f.name.len() <= MAX_TEST_NAME_BYTES, "{}", f.name.len());
        // The output is cut to the limit plus the mark saying how much was cut.
        assert!(
            f.output.len() <= MAX_FAILURE_OUTPUT_BYTES + 64,
            "{}",
            f.output.len()
        );
    }
    assert!(report.notes.len() <= MAX_REPORT_NOTES);
    assert!(report.notes.iter().all(|n| n.len() <= MAX_NOTE_BYTES));
    assert_eq!(
        report.files + u32::from(!report.notes.is_empty()),
        1,
        "{report:?}"
    );
    if let Some(c) = report.coverage {
        assert!(c.basis_points <= 10_000, "{c:?}");
    }
}

/// An artifact manifest. Only canonical bytes decode, so what decodes encodes back to
/// exactly the input (and its digest is the input's), and it passes validation.
pub fn manifest(data: &[u8]) {
    let Ok(manifest) = gantry_cas::Manifest::decode(data) else {
        return;
    };
    assert_eq!(manifest.encode(), data, "a non-canonical manifest decoded");
    assert_eq!(manifest.digest(), gantry_cas::Digest::of(data));
    manifest.validate().expect("a decoded manifest is valid");
}

/// A compressed chunk: 3 bytes of declared length (0 to twice [`gantry_cas::MAX_CHUNK`]),
/// then the zstd frame. A declared length over the chunk limit is refused; anything
/// else either fails cleanly or decodes to exactly the declared length, which decoding
/// again with the digest it reported then confirms.
pub fn decompress(data: &[u8]) {
    let Some((declared, compressed)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max = gantry_cas::MAX_CHUNK;
    let expected_len =
        u32::from_le_bytes([declared[0], declared[1], declared[2], 0]) as usize % (2 * max + 1);
    let empty = gantry_cas::Digest::of(b"");
    match gantry_cas::decompress(compressed, expected_len, &empty) {
        Ok(out) => assert!(out.is_empty() && expected_len == 0),
        Err(gantry_cas::CasError::DigestMismatch { actual, .. }) => {
            assert!(expected_len <= max);
            let out = gantry_cas::decompress(compressed, expected_len, &actual)
                .expect("the same chunk with its own digest decodes");
            assert_eq!(out.len(), expected_len);
        }
        Err(_) => {}
    }
    if expected_len > max {
        assert!(gantry_cas::decompress(compressed, expected_len, &empty).is_err());
    }
}

/// The coordinator's CSR intake: parse, check the self-signature, keep only the public
/// key and sign. A certificate that comes out names exactly the identity asked for.
pub fn csr_intake(data: &[u8]) {
    sign_csr(data);
}

/// Signs `csr` for a fixed agent identity with a CA made once; whether it was signed.
fn sign_csr(csr: &[u8]) -> bool {
    static CA: OnceLock<gantry_certs::CertAuthority> = OnceLock::new();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let ca = CA.get_or_init(|| gantry_certs::CertAuthority::create("fuzz", now).expect("CA"));
    let identity = gantry_certs::Identity::Agent(gantry_protocol::AgentId::from_random(&[7; 6]));
    let Ok(issued) = ca.sign_csr(csr, &identity, now, Duration::from_hours(1)) else {
        return false;
    };
    let named = gantry_certs::Identity::from_cert_der(&issued.der)
        .expect("an issued certificate names an identity");
    assert_eq!(named, identity);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_passes_its_check() {
        for seed in seeds::all() {
            let (_, check) = TARGETS
                .iter()
                .find(|(name, _)| *name == seed.target)
                .unwrap_or_else(|| panic!("seed for unknown target {}", seed.target));
            check(&seed.bytes);
        }
    }

    #[test]
    fn every_target_and_message_type_has_seeds() {
        let all = seeds::all();
        for (target, _) in TARGETS {
            assert!(
                all.iter().any(|s| s.target == *target),
                "no seed for {target}"
            );
        }
        for (selector, (name, _)) in MESSAGE_TYPES.iter().enumerate() {
            let seeded = all
                .iter()
                .any(|s| s.target == "messages" && usize::from(s.bytes[0]) == selector);
            assert!(seeded, "no seed for message type {name}");
        }
    }

    /// The committed corpus is what the generator makes now (regenerate with
    /// `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus`). Seeds that
    /// hold a fresh key pair differ on every run: those need only exist.
    #[test]
    fn the_committed_corpus_is_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for seed in seeds::all() {
            let path = root.join(seed.target).join(&seed.name);
            let stored = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; regenerate the corpus", path.display()));
            if seed.deterministic {
                assert_eq!(
                    stored,
                    seed.bytes,
                    "{} is stale; regenerate",
                    path.display()
                );
            } else {
                assert_eq!(seed.target, "csr_intake", "only CSRs hold fresh keys");
                assert!(sign_csr(&stored), "{} is no longer signed", path.display());
            }
        }
    }
}
