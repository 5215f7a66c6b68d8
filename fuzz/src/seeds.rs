//! The seed corpus: real encodings of real values, so the fuzzer starts from inputs that
//! get past the first check of every decoder. `examples/seed_corpus.rs` writes them to
//! `corpus/<target>/<name>`; a test checks the committed files are current.

use std::collections::BTreeMap;

use gantry_protocol::{
    encode_frame, frame, hello, AdminError, AdminErrorKind, AdminHello, AdminRequest,
    AdminResponse, AgentHello, AgentId, AgentMessage, AppSpec, ArtifactSpec, CacheSpec, ChunkFrame,
    ChunkPut, ChunkWants, CoordinatorMessage, DeployCommand, DeployOp, DeployResult, Digest,
    EnrollRequest, ExecEvent, FollowEvent, Grant, HelloReply, Hooks, HostFigures, HostReport,
    Intent, JobAssignment, JobExecution, JobId, JobOutcome, JobResult, JobView, LogChunk,
    LogControl, ManifestFrame, PeerSource, PutReply, Refusal, RefusalReason, ReleaseSpec,
    ResolveReply, RunId, RunningJob, SourceData, SourceStored, StepOptions, StepSpec, StreamOpen,
    SubmitRun, TokenId, UnixMillis, UploadReply, UploadRequest, Welcome,
};
use serde::Serialize;

use crate::MESSAGE_TYPES;

/// One seed file.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
    /// False for seeds made with a fresh key pair, which differ on every run.
    pub deterministic: bool,
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push(Seed {
            target,
            name: name.to_owned(),
            bytes,
            deterministic: true,
        });
    };
    for (name, bytes) in messages() {
        add("messages", &name, bytes);
    }
    for (name, bytes) in frames() {
        add("frame_decoder", name, bytes);
    }
    for (name, text) in pipelines() {
        add("pipeline", name, text.into_bytes());
    }
    for (name, bytes) in manifests() {
        add("manifest", name, bytes);
    }
    for (name, bytes) in chunks() {
        add("decompress", name, bytes);
    }
    for (name, bytes) in report_files() {
        add("reports", name, bytes);
    }
    let csr = gantry_certs::generate_key_and_csr().expect("a CSR");
    out.push(Seed {
        target: "csr_intake",
        name: "p256-agent-csr".into(),
        bytes: csr.csr_der,
        deterministic: false,
    });
    out
}

fn job() -> JobId {
    JobId {
        run: RunId(42),
        index: 3,
    }
}

fn agent() -> AgentId {
    AgentId::from_random(&[0xa5; 6])
}

fn labels() -> gantry_protocol::Labels {
    [("os", "linux"), ("arch", "x86_64")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn figures() -> HostFigures {
    HostFigures {
        cpu_count: 8,
        cpu_percent: 12.5,
        memory_total_bytes: 16 << 30,
        memory_used_bytes: 3 << 30,
        disk_total_bytes: 512 << 30,
        disk_free_bytes: 100 << 30,
        load_average: [0.5, 0.25, 0.125],
        uptime_secs: 86_400,
    }
}

fn job_view() -> JobView {
    JobView {
        job: job(),
        name: "test (1, debug)".into(),
        needs: vec!["lint".into()],
        state: "running".into(),
        attempt: 2,
        agent: Some(agent()),
        exit_code: None,
        started_at: Some(UnixMillis(1_750_000_000_000)),
        finished_at: None,
        log_bytes: 4096,
        log_incomplete: false,
    }
}

/// Samples of every message type, each prefixed with its selector in [`MESSAGE_TYPES`].
fn messages() -> Vec<(String, Vec<u8>)> {
    let intent_agent = Intent::Agent(AgentHello {
        agent_version: "0.1.0".into(),
        hostname: "build-1".into(),
        labels: labels(),
        capabilities: vec!["shell".into(), "docker".into()],
        slots: 2,
        figures: figures(),
        running: vec![RunningJob {
            job: job(),
            attempt: 1,
        }],
        peer_port: Some(7444),
    });
    let intent_enroll = Intent::Enroll(EnrollRequest {
        token_id: TokenId::from_random(&[0x11; 8]),
        token_secret: "s3cr3t".into(),
        csr_der: vec![0x30, 0x82, 0x01, 0x0a],
        hostname: "web-1".into(),
        labels: labels(),
    });
    let intent_admin = Intent::Admin(AdminHello {
        client_version: "0.1.0".into(),
    });
    let assignment = JobAssignment {
        job: job(),
        attempt: 1,
        run: RunId(42),
        pipeline: "demo-ci".into(),
        name: "build".into(),
        steps: vec![StepSpec {
            name: "compile".into(),
            run: "make && echo ${{ secrets.TOKEN }}".into(),
            working_directory: Some("src".into()),
            env: labels(),
        }],
        env: labels(),
        timeout_ms: 300_000,
        kill_grace_ms: 10_000,
        image: Some("alpine:3".into()),
        secrets: [("TOKEN".to_owned(), "hunter2".to_owned())].into(),
        source: Some("sha256:00ff".into()),
        downloads: true,
        artifact: Some(ArtifactSpec {
            name: "app".into(),
            paths: vec!["out/".into(), "**/*.so".into()],
            expire_in_secs: 86_400,
        }),
        cache: Some(CacheSpec {
            key: "deps-${{ hashFiles('Cargo.lock') }}".into(),
            restore_keys: vec!["deps-".into()],
            paths: vec!["target/".into()],
        }),
    };
    let chunk = Digest::of(b"chunk one");
    let release = ReleaseSpec {
        id: "r12-3f9c0a12".into(),
        version: "1.4.2".into(),
        manifest: Digest::of(b"a manifest"),
    };
    let stage = DeployCommand {
        deployment: 12,
        epoch: 3,
        seq: 1,
        app: AppSpec {
            name: "web".into(),
            hooks: Hooks::default(),
            health: None,
            keep: 5,
            shared: vec!["logs".into()],
            env: labels(),
            secrets: Vec::new(),
            blue_green: None,
        },
        op: DeployOp::Stage {
            release,
            peers: vec![PeerSource {
                agent: agent(),
                address: "10.0.0.7:7444".into(),
            }],
        },
    };
    let mut samples: Vec<(&str, &str, Vec<u8>)> = vec![
        ("Intent", "agent", enc(&intent_agent)),
        ("Intent", "enroll", enc(&intent_enroll)),
        (
            "HelloReply",
            "welcome",
            enc(&HelloReply::Welcome(Welcome {
                protocol_version: 1,
                coordinator_version: "0.1.0".into(),
                identity: format!("gantry://agent/{}", agent()),
                heartbeat_interval_ms: 5_000,
            })),
        ),
        (
            "HelloReply",
            "refused",
            enc(&HelloReply::Refused(Refusal {
                reason: RefusalReason::TokenExpired,
                message: "the token expired".into(),
            })),
        ),
        (
            "AgentMessage",
            "heartbeat",
            enc(&AgentMessage::Heartbeat(figures())),
        ),
        (
            "AgentMessage",
            "finished",
            enc(&AgentMessage::JobFinished(JobResult {
                job: job(),
                attempt: 1,
                outcome: JobOutcome::Failed {
                    exit_code: 7,
                    step: 1,
                },
                log_chunks: 12,
                started_at: UnixMillis(1_750_000_000_000),
                finished_at: UnixMillis(1_750_000_060_000),
            })),
        ),
        (
            "AgentMessage",
            "finished-with-outputs",
            enc(&AgentMessage::JobFinishedWithOutputs {
                result: JobResult {
                    job: job(),
                    attempt: 1,
                    outcome: JobOutcome::Succeeded,
                    log_chunks: 3,
                    started_at: UnixMillis(1_750_000_000_000),
                    finished_at: UnixMillis(1_750_000_005_000),
                },
                outputs: [
                    ("version".to_owned(), "1.4.2".to_owned()),
                    ("notes".to_owned(), "first\nsecond".to_owned()),
                ]
                .into(),
            }),
        ),
        (
            "AgentMessage",
            "rejected",
            enc(&AgentMessage::JobRejected {
                job: job(),
                attempt: 2,
                reason: "all 2 slots are busy".into(),
            }),
        ),
        (
            "CoordinatorMessage",
            "dispatch",
            enc(&CoordinatorMessage::Dispatch(Box::new(assignment.clone()))),
        ),
        (
            "CoordinatorMessage",
            "dispatch-job",
            enc(&CoordinatorMessage::DispatchJob {
                assignment: Box::new(assignment),
                execution: Box::new(JobExecution {
                    steps: vec![StepOptions {
                        id: Some("version".into()),
                        continue_on_error: true,
                        timeout_ms: Some(60_000),
                        ..StepOptions::default()
                    }],
                    outputs: BTreeMap::from([(
                        "version".into(),
                        "${{ steps.version.outputs.v }}".into(),
                    )]),
                    ..JobExecution::default()
                }),
            }),
        ),
        (
            "CoordinatorMessage",
            "deploy-stage",
            enc(&CoordinatorMessage::Deploy(Box::new(stage))),
        ),
        (
            "AgentMessage",
            "deploy-result",
            enc(&AgentMessage::DeployResult(DeployResult {
                deployment: 12,
                seq: 1,
                outcome: Ok(HostReport {
                    current: Some("r12-3f9c0a12".into()),
                    releases: vec!["r11-00aa".into(), "r12-3f9c0a12".into()],
                }),
                log: vec!["staged".into()],
            })),
        ),
        (
            "StreamOpen",
            "fetch-chunks",
            enc(&StreamOpen::FetchChunks {
                grant: Grant::Deploy {
                    deployment: 12,
                    epoch: 3,
                },
                manifest: Digest::of(b"a manifest"),
            }),
        ),
        (
            "ResolveReply",
            "refused",
            enc(&ResolveReply::Refused {
                message: "no such artifact".into(),
            }),
        ),
        (
            "ManifestFrame",
            "start",
            enc(&ManifestFrame::Start { bytes: 1_234 }),
        ),
        (
            "ManifestFrame",
            "piece",
            enc(&ManifestFrame::Piece(b"GMAN manifest bytes".to_vec())),
        ),
        ("ChunkWants", "two", enc(&ChunkWants(vec![chunk, chunk]))),
        (
            "ChunkFrame",
            "data",
            enc(&ChunkFrame::Data {
                digest: chunk,
                size: 9,
                data: gantry_cas::compress(b"chunk one"),
            }),
        ),
        (
            "ChunkFrame",
            "unavailable",
            enc(&ChunkFrame::Unavailable {
                digest: chunk,
                reason: "not here (yet)".into(),
            }),
        ),
        (
            "UploadRequest",
            "have",
            enc(&UploadRequest::Have(vec![chunk])),
        ),
        (
            "UploadRequest",
            "commit",
            enc(&UploadRequest::Commit {
                manifest_bytes: 4_096,
            }),
        ),
        (
            "UploadReply",
            "missing",
            enc(&UploadReply::Missing(vec![chunk])),
        ),
        (
            "ChunkPut",
            "chunk",
            enc(&ChunkPut {
                digest: chunk,
                size: 9,
                data: gantry_cas::compress(b"chunk one"),
            }),
        ),
        (
            "PutReply",
            "stored",
            enc(&PutReply::Stored {
                chunks: 3,
                bytes: 196_608,
            }),
        ),
        (
            "ExecEvent",
            "done",
            enc(&ExecEvent::Done {
                agent: agent(),
                result: Ok(0),
                millis: 12,
            }),
        ),
        (
            "CoordinatorMessage",
            "ack",
            enc(&CoordinatorMessage::JobFinishedAck {
                job: job(),
                attempt: 1,
            }),
        ),
        (
            "StreamOpen",
            "logs",
            enc(&StreamOpen::Logs {
                job: job(),
                attempt: 1,
            }),
        ),
        (
            "StreamOpen",
            "follow",
            enc(&StreamOpen::FollowLogs {
                job: job(),
                from_seq: 5,
                follow: true,
            }),
        ),
        (
            "LogChunk",
            "line",
            enc(&LogChunk {
                seq: 7,
                data: b"line 7 \xff\xfe\n".to_vec(),
            }),
        ),
        (
            "LogControl",
            "resume",
            enc(&LogControl::Resume { next_seq: 3 }),
        ),
        ("FollowEvent", "job", enc(&FollowEvent::Job(job_view()))),
        (
            "FollowEvent",
            "error",
            enc(&FollowEvent::Error(AdminError {
                kind: AdminErrorKind::NotFound,
                message: "no job 42.3".into(),
            })),
        ),
        (
            "AdminRequest",
            "submit",
            enc(&AdminRequest::SubmitRun(SubmitRun {
                file_name: "ci.yml".into(),
                text: "jobs:\n  a:\n    steps: [{ run: make }]\n".into(),
                git_ref: "main".into(),
                commit: Some("0123abcd".into()),
                event: "manual".into(),
                inputs: labels(),
                source: None,
            })),
        ),
        (
            "AdminRequest",
            "label",
            enc(&AdminRequest::LabelAgent {
                agent_id: agent(),
                set: labels(),
                remove: vec!["gpu".into()],
            }),
        ),
        (
            "AdminRequest",
            "show-job-outputs",
            enc(&AdminRequest::ShowJobOutputs { job: job() }),
        ),
        (
            "AdminResponse",
            "job-outputs",
            enc(&AdminResponse::JobOutputs(
                [("version".to_owned(), "1.4.2".to_owned())].into(),
            )),
        ),
        (
            "AdminRequest",
            "show-job-report",
            enc(&AdminRequest::ShowJobReport { job: job() }),
        ),
        (
            "AdminResponse",
            "job-report",
            enc(&AdminResponse::JobReport(Some(test_report()))),
        ),
        (
            "StreamOpen",
            "reports",
            enc(&StreamOpen::Reports {
                job: job(),
                attempt: 2,
            }),
        ),
        (
            "ReportUpload",
            "junit",
            enc(&gantry_protocol::ReportUpload::File {
                kind: gantry_protocol::ReportKind::Junit,
                path: "reports/unit.xml".into(),
                data: JUNIT.as_bytes().to_vec(),
            }),
        ),
        (
            "ReportUpload",
            "note",
            enc(&gantry_protocol::ReportUpload::Note(
                "missing/*.xml matched no file".into(),
            )),
        ),
        (
            "ReportsStored",
            "stored",
            enc(&gantry_protocol::ReportsStored::Stored(test_report())),
        ),
        (
            "AdminResponse",
            "jobs",
            enc(&AdminResponse::Jobs(vec![job_view(), job_view()])),
        ),
        (
            "AdminResponse",
            "done",
            enc(&AdminResponse::Done {
                message: "approved".into(),
            }),
        ),
        (
            "SourceData",
            "piece",
            enc(&SourceData(b"ustar\0 tar bytes".to_vec())),
        ),
        (
            "SourceStored",
            "stored",
            enc(&SourceStored::Stored {
                source: "sha256:00ff".into(),
                bytes: 10_240,
            }),
        ),
    ];
    let framed = hello::encode_hello(&intent_agent, u32::MAX).expect("hello");
    samples.push(("hello", "agent", framed[frame::HEADER_LEN..].to_vec()));
    let framed = hello::encode_hello_with_version(9, &intent_admin, u32::MAX).expect("hello");
    samples.push((
        "hello",
        "future-version",
        framed[frame::HEADER_LEN..].to_vec(),
    ));

    let selector: BTreeMap<&str, u8> = MESSAGE_TYPES
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (*name, u8::try_from(i).expect("under 256 message types")))
        .collect();
    samples
        .into_iter()
        .map(|(ty, name, payload)| {
            let mut bytes = vec![selector[ty]];
            bytes.extend(payload);
            (format!("{ty}-{name}"), bytes)
        })
        .collect()
}

fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encoding")
}

/// Framed control streams: the first byte is the piece size the target feeds.
fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let limit = gantry_protocol::limits::MAX_FRAME_BYTES;
    let mut stream = vec![0u8];
    for message in [
        AgentMessage::Heartbeat(figures()),
        AgentMessage::JobAccepted {
            job: job(),
            attempt: 1,
        },
        AgentMessage::RenewCertificate {
            csr_der: vec![0x30; 40],
        },
    ] {
        stream.extend(encode_frame(&message, limit).expect("frame"));
    }
    let mut torn = stream.clone();
    torn[0] = 6;
    torn.truncate(torn.len() - 3);
    let mut oversized = vec![255u8];
    oversized.extend((limit + 1).to_be_bytes());
    oversized.extend([0; 16]);
    vec![
        ("three-frames-byte-by-byte", stream),
        ("torn-tail-in-sevens", torn),
        ("oversized-header", oversized),
    ]
}

fn pipelines() -> Vec<(&'static str, String)> {
    vec![
        ("example-ci", include_str!("../../examples/ci.yml").to_owned()),
        (
            "matrix-conditions-retry",
            "name: m\non:\n  schedule: ['*/15 9-17 * * 1-5']\n  push: { branches: [main, 'release/*'], paths: ['src/**'] }\njobs:\n  t:\n    strategy: { matrix: { os: [linux, mac], v: ['1.80', '1.88'], exclude: [{ os: mac, v: '1.80' }] } }\n    runs-on: { os: '${{ matrix.os }}' }\n    retry: 2\n    timeout: 90s\n    continue-on-error: true\n    steps: [{ name: 'v ${{ matrix.v }}', run: 'echo ${{ matrix.v }}', env: { A: '1' } }]\n  after:\n    needs: [t]\n    if: always() && !cancelled() && (branch == 'main' || inputs.force == 'yes')\n    steps: [{ run: 'echo ${{ secrets.TOKEN }}', working-directory: sub }]\n".to_owned(),
        ),
        (
            "bundle-include-extends-merge",
            // What a run stores for a pipeline that includes another file: a bundle.
            gantry_pipeline::bundle(
                "gantry.yml",
                "include: ci/templates.yml\n.defaults: &d { timeout: 5m, env: { A: '1' } }\njobs:\n  t:\n    <<: *d\n    extends: [.base]\n    needs: lint\n    steps: [{ run: 'echo $A $B' }]\n",
                &std::collections::HashMap::from([(
                    "ci/templates.yml".to_owned(),
                    "env: { B: '2' }\njobs:\n  .base: { runs-on: linux, env: { C: '3' } }\n  lint: { extends: .base, steps: [{ run: lint }] }\n".to_owned(),
                )]),
            )
            .1,
        ),
        (
            "anchors-and-errors",
            "base: &b { steps: [{ run: x }] }\njobs:\n  a: *b\n  b:\n    needs: nope\n    runs-on: { 'Bad Key': 1 }\n    steps: [{ run: [not, a, string] }]\n".to_owned(),
        ),
    ]
}

const JUNIT: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
  <testcase classname="tests.math" name="test_add"/>
  <testcase classname="tests.math" name="test_div"><failure message="ZeroDivisionError">&gt; 1 / 0</failure><system-out>out</system-out></testcase>
  <testcase name="later"><skipped/></testcase>
  <testsuite name="inner"><testcase name="e"><error><![CDATA[boom]]></error></testcase></testsuite>
</testsuite></testsuites>
"#;

fn test_report() -> gantry_protocol::TestReport {
    gantry_protocol::TestReport {
        attempt: 2,
        files: 2,
        passed: 10,
        failed: 1,
        skipped: 2,
        failures: vec![gantry_protocol::TestFailure {
            name: "tests.math.test_div".into(),
            file: "reports/unit.xml".into(),
            error: false,
            output: "ZeroDivisionError\n> 1 / 0".into(),
        }],
        coverage: Some(gantry_protocol::Coverage::from_lines(13, 16)),
        notes: vec!["missing/*.xml matched no file".into()],
    }
}

/// Report files, each after the byte that says how to read it (even: `JUnit`, odd:
/// coverage).
fn report_files() -> Vec<(&'static str, Vec<u8>)> {
    let with = |kind: u8, text: &str| [&[kind], text.as_bytes()].concat();
    vec![
        ("junit-pytest", with(0, JUNIT)),
        ("junit-malformed", with(0, "<testsuite><testcase name='a'>")),
        (
            "cobertura",
            with(
                1,
                r#"<coverage line-rate="0.81" lines-covered="13" lines-valid="16"><packages/></coverage>"#,
            ),
        ),
        (
            "jacoco",
            with(
                1,
                r#"<report name="r"><counter type="LINE" missed="1" covered="3"/></report>"#,
            ),
        ),
        (
            "lcov",
            with(
                1,
                "TN:\nSF:a.rs\nDA:1,1\nDA:2,0\nLF:2\nLH:1\nend_of_record\n",
            ),
        ),
    ]
}

fn manifests() -> Vec<(&'static str, Vec<u8>)> {
    use gantry_cas::{ChunkRef, Digest, Entry, EntryKind, Manifest};
    let chunk = |bytes: &[u8]| ChunkRef {
        digest: Digest::of(bytes),
        size: u32::try_from(bytes.len()).expect("small"),
    };
    let tree = Manifest::new(vec![
        Entry {
            path: "bin".into(),
            kind: EntryKind::Dir { mode: 0o755 },
        },
        Entry {
            path: "bin/app".into(),
            kind: EntryKind::File {
                mode: 0o755,
                size: 11,
                chunks: vec![chunk(b"hello"), chunk(b" world")],
            },
        },
        Entry {
            path: "current".into(),
            kind: EntryKind::Symlink {
                target: "bin/app".into(),
            },
        },
        Entry {
            path: "empty.txt".into(),
            kind: EntryKind::File {
                mode: 0o644,
                size: 0,
                chunks: Vec::new(),
            },
        },
    ]);
    vec![
        ("tree", tree.encode()),
        ("empty", Manifest::default().encode()),
    ]
}

/// Compressed chunks: 3 bytes of declared length (little-endian), then the zstd frame.
fn chunks() -> Vec<(&'static str, Vec<u8>)> {
    let with_len = |declared: usize, compressed: Vec<u8>| {
        let mut out = u32::try_from(declared).expect("small").to_le_bytes()[..3].to_vec();
        out.extend(compressed);
        out
    };
    let text: Vec<u8> = (0..4_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    let noise: Vec<u8> = (0..1_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    // Past a 16 KiB chunk, noise no compressor shrinks is stored as a frame of raw
    // blocks: 20,000 bytes of an xorshift generator make one.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let incompressible: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    vec![
        ("text", with_len(text.len(), gantry_cas::compress(&text))),
        ("noise", with_len(noise.len(), gantry_cas::compress(&noise))),
        (
            "raw-blocks",
            with_len(incompressible.len(), gantry_cas::compress(&incompressible)),
        ),
        ("short-declared", with_len(10, gantry_cas::compress(&text))),
    ]
}
