//! Bad input around artifacts, each refused with a clear error through the real
//! binaries: hostile manifests and chunks served to the CLI by a fake coordinator,
//! forged and oversized chunks and escaping manifests uploaded by a raw agent, reads
//! and writes outside what an agent holds, and a chunk corrupted on the coordinator's
//! disk (reported, quarantined, never served).

use std::collections::HashMap;
use std::path::Path;

use gantry_cas::{ChunkRef, Entry, EntryKind, Manifest};
use gantry_protocol::{
    ChunkFrame, ChunkPut, ChunkWants, Digest, Grant, JobId, ManifestFrame, PutReply, ResolveReply,
    ResolveRequest, RunId, StreamOpen, UploadReply, UploadRequest, UploadTarget,
};
use gantry_tests::peers::{FakeCoordinator, RawAgent, Served};
use gantry_tests::{bin, wait_for, Agent, Coordinator, Run, DEADLINE};

const DATA: &[u8] = b"payload\n";

fn file(path: &str, data: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File {
            mode: 0o644,
            size: data.len() as u64,
            chunks: vec![ChunkRef {
                digest: Digest::of(data),
                size: data.len() as u32,
            }],
        },
    }
}

fn link(path: &str, target: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Symlink {
            target: target.into(),
        },
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Dir { mode: 0o755 },
    }
}

fn honest_chunks() -> HashMap<Digest, (u32, Vec<u8>)> {
    HashMap::from([(
        Digest::of(DATA),
        (DATA.len() as u32, gantry_cas::compress(DATA)),
    )])
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn hostile_manifests_and_chunks_are_refused_and_nothing_lands_outside() {
    let bomb = gantry_cas::compress(&vec![0u8; 64 << 20]);
    let hardlink_like = {
        // Version 1, one entry "h", entry kind variant 3: the format has no such kind
        // (there are no hardlinks), so this is what a manifest with one would look like.
        vec![1u8, 1, 1, b'h', 3, 0]
    };
    let cases: Vec<(&str, Served, &str)> = vec![
        (
            "a .. component",
            Served {
                manifest: Manifest {
                    entries: vec![file("../escaped", DATA)],
                }
                .encode(),
                chunks: honest_chunks(),
            },
            "it has a `..` component",
        ),
        (
            "an absolute path",
            Served {
                manifest: Manifest {
                    entries: vec![file("/tmp/gantry-escaped", DATA)],
                }
                .encode(),
                chunks: honest_chunks(),
            },
            "the path is absolute",
        ),
        (
            "a symlink out of the tree",
            Served {
                manifest: Manifest {
                    entries: vec![link("up", "../../outside")],
                }
                .encode(),
                chunks: honest_chunks(),
            },
            "the target leaves the extraction directory",
        ),
        (
            "an absolute symlink",
            Served {
                manifest: Manifest {
                    entries: vec![link("etc", "/etc")],
                }
                .encode(),
                chunks: honest_chunks(),
            },
            "the target is absolute",
        ),
        (
            "a file through a symlink",
            Served {
                manifest: Manifest::new(vec![dir("real"), link("a", "real"), file("a/f", DATA)])
                    .encode(),
                chunks: honest_chunks(),
            },
            "writing through symlinks is refused",
        ),
        (
            "a duplicate entry",
            Served {
                manifest: Manifest {
                    entries: vec![file("x", DATA), file("x", DATA)],
                }
                .encode(),
                chunks: honest_chunks(),
            },
            "appears more than once",
        ),
        (
            "a hardlink",
            Served {
                manifest: hardlink_like,
                chunks: honest_chunks(),
            },
            "manifest is not a valid encoding",
        ),
        (
            "a chunk whose bytes do not match its digest",
            Served {
                manifest: Manifest {
                    entries: vec![file("f", DATA)],
                }
                .encode(),
                chunks: HashMap::from([(
                    Digest::of(DATA),
                    (DATA.len() as u32, gantry_cas::compress(b"FORGED!\n")),
                )]),
            },
            "arrived corrupt",
        ),
        (
            "a decompression bomb",
            Served {
                manifest: Manifest {
                    entries: vec![file("f", DATA)],
                }
                .encode(),
                chunks: HashMap::from([(Digest::of(DATA), (DATA.len() as u32, bomb))]),
            },
            "arrived corrupt",
        ),
    ];
    for (what, served, needle) in cases {
        let fake = FakeCoordinator::start(served);
        let root = tempfile::tempdir().expect("tempdir");
        let dest = root.path().join("dest");
        let out = Run::from_output(
            std::process::Command::new(bin("gantry"))
                .args(["artifacts", "get", "1", "app", "-o"])
                .arg(&dest)
                .env("GANTRY_CONFIG", &fake.context)
                .env("GANTRY_LOG", "warn")
                .output()
                .expect("run gantry"),
        );
        assert_eq!(
            out.code, 1,
            "{what}: refused as failed work\n{}",
            out.stderr
        );
        assert!(out.stderr.contains(needle), "{what}: {}", out.stderr);
        let names = listing(root.path());
        assert!(
            names.is_empty() || names == ["dest"],
            "{what}: something was written outside the destination: {names:?}"
        );
        if dest.exists() {
            assert!(
                listing(&dest).is_empty(),
                "{what}: nothing is extracted from a refused download"
            );
        }
        assert!(!Path::new("/tmp/gantry-escaped").exists(), "{what}");
    }
}

/// The coordinator's peak resident memory so far, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_raw_agent_can_neither_forge_nor_reach_beyond_its_job() {
    let mut c = Coordinator::start();
    // A real agent produces an artifact in run 1 that the raw agent must not read.
    let _real = c.agents_running(1, &["--label", "role=real"]);
    let secret = c.run_pipeline(
        "jobs:\n  a:\n    runs-on: { role: real }\n    steps: [{ run: 'mkdir out && echo top-secret > out/s' }]\n    artifacts: { name: secret, paths: [out] }\n",
        &[],
    );
    assert_eq!(c.wait_run(secret, DEADLINE)["state"], "succeeded");
    let secret_manifest: Digest = c
        .gantry(&["artifacts", "list", &secret.to_string(), "--json"])
        .expect_code(0)
        .json()[0]["manifest"]
        .as_str()
        .expect("manifest")
        .parse()
        .expect("digest");

    let raw_identity = Agent::enroll(&c.token(&["--label", "raw=yes"]), &[]);
    let run = c.run_pipeline(
        "jobs:\n  victim:\n    runs-on: { raw: \"yes\" }\n    steps: [{ run: 'true' }]\n    artifacts: { name: app, paths: [out] }\n",
        &[],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pid = c.server().pid();
    rt.block_on(async {
        let mut raw = RawAgent::connect(&c.address, raw_identity.dir.path()).await;
        let job = raw.accept_dispatch().await;
        assert_eq!(job.job.run, RunId(run));
        let mine = Grant::Job {
            job: job.job,
            attempt: job.attempt,
        };

        // Writing an artifact the job does not declare.
        let (_w, mut r) = raw
            .stream(&StreamOpen::Upload {
                grant: mine.clone(),
                target: UploadTarget::Artifact {
                    name: "other".into(),
                    expire_in_secs: 0,
                },
            })
            .await;
        let reply = r.recv::<UploadReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(UploadReply::Refused { message }) if message.contains("declares artifact \"app\", not \"other\"")),
            "{reply:?}"
        );

        // Writing for a job attempt it does not hold.
        let (_w, mut r) = raw
            .stream(&StreamOpen::Upload {
                grant: Grant::Job {
                    job: JobId { run: RunId(secret), index: 0 },
                    attempt: 1,
                },
                target: UploadTarget::Artifact {
                    name: "secret".into(),
                    expire_in_secs: 0,
                },
            })
            .await;
        let reply = r.recv::<UploadReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(UploadReply::Refused { message }) if message.contains("is not running on")),
            "{reply:?}"
        );

        // Its own artifact: a session opens.
        let (mut session, mut replies) = raw
            .stream(&StreamOpen::Upload {
                grant: mine.clone(),
                target: UploadTarget::Artifact {
                    name: "app".into(),
                    expire_in_secs: 0,
                },
            })
            .await;
        let Some(UploadReply::Opened { session: id }) = replies.recv().await.expect("reply") else {
            panic!("no session");
        };

        // A chunk whose bytes do not match its digest.
        let (mut w, mut r) = raw.stream(&StreamOpen::PutChunks { session: id }).await;
        w.send(&ChunkPut {
            digest: Digest::of(b"honest"),
            size: 6,
            data: gantry_cas::compress(b"forged"),
        })
        .await
        .expect("send");
        w.finish();
        let reply = r.recv::<PutReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(PutReply::Refused { message }) if message.contains("digest mismatch")),
            "{reply:?}"
        );

        // The same in a chunk large enough to arrive in several pieces (a raw frame of
        // two blocks, ~200 KiB, over packets of at most 65,000 bytes), forged in the
        // second block: the coordinator checks it across the pieces.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let honest: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut forged_frame = gantry_cas::compress(&honest);
        assert!(forged_frame.len() > honest.len(), "incompressible: a raw frame");
        let last = forged_frame.len() - 10;
        forged_frame[last] ^= 0x40;
        let (mut w, mut r) = raw.stream(&StreamOpen::PutChunks { session: id }).await;
        w.send(&ChunkPut {
            digest: Digest::of(&honest),
            size: 200_000,
            data: forged_frame,
        })
        .await
        .expect("send");
        w.finish();
        let reply = r.recv::<PutReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(PutReply::Refused { message }) if message.contains("digest mismatch")),
            "{reply:?}"
        );

        // A decompression bomb: 64 MiB of zeros in a few KiB, claiming 64 KiB.
        let before = peak_rss_kib(pid);
        let (mut w, mut r) = raw.stream(&StreamOpen::PutChunks { session: id }).await;
        w.send(&ChunkPut {
            digest: Digest::of(&vec![0u8; 65536]),
            size: 65536,
            data: gantry_cas::compress(&vec![0u8; 64 << 20]),
        })
        .await
        .expect("send");
        w.finish();
        let reply = r.recv::<PutReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(PutReply::Refused { message }) if message.contains("more than the limit")),
            "{reply:?}"
        );
        let grew = peak_rss_kib(pid).saturating_sub(before);
        assert!(grew < 16 * 1024, "the coordinator's peak memory grew by {grew} KiB");

        // A manifest that escapes, then one naming a chunk never sent.
        let commit = |m: &Manifest| {
            let bytes = m.encode();
            [
                UploadRequest::Commit { manifest_bytes: bytes.len() as u64 },
                UploadRequest::ManifestPiece(bytes),
            ]
        };
        for request in commit(&Manifest { entries: vec![file("../escape", DATA)] }) {
            session.send(&request).await.expect("send");
        }
        let reply = replies.recv::<UploadReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(UploadReply::Refused { message }) if message.contains("unsafe path")),
            "{reply:?}"
        );
        let (mut session, mut replies) = raw
            .stream(&StreamOpen::Upload {
                grant: mine.clone(),
                target: UploadTarget::Artifact { name: "app".into(), expire_in_secs: 0 },
            })
            .await;
        let _opened = replies.recv::<UploadReply>().await.expect("reply");
        for request in commit(&Manifest { entries: vec![file("out/never-sent", b"never sent")] }) {
            session.send(&request).await.expect("send");
        }
        let reply = replies.recv::<UploadReply>().await.expect("reply");
        assert_eq!(reply, Some(UploadReply::Missing(vec![Digest::of(b"never sent")])));

        // Reading another run's artifact, by manifest, by chunks, by name, as an admin.
        let (_w, mut r) = raw
            .stream(&StreamOpen::GetManifest { grant: mine.clone(), manifest: secret_manifest })
            .await;
        let reply = r.recv::<ManifestFrame>().await.expect("reply");
        assert!(
            matches!(&reply, Some(ManifestFrame::Refused { message }) if message.contains(&format!("is not an artifact of run {run}"))),
            "{reply:?}"
        );
        let (mut w, mut r) = raw
            .stream(&StreamOpen::FetchChunks { grant: mine.clone(), manifest: secret_manifest })
            .await;
        let _ = w.send(&ChunkWants(vec![Digest::of(b"top-secret\n")])).await;
        let reply = r.recv::<ChunkFrame>().await.expect("reply");
        assert!(matches!(reply, Some(ChunkFrame::Refused { .. })), "{reply:?}");
        let (_w, mut r) = raw
            .stream(&StreamOpen::Resolve(ResolveRequest::Artifact { run: RunId(secret), name: "secret".into() }))
            .await;
        let reply = r.recv::<ResolveReply>().await.expect("reply");
        assert!(
            matches!(&reply, Some(ResolveReply::Refused { message }) if message.contains("only admins")),
            "{reply:?}"
        );
        let (_w, mut r) = raw
            .stream(&StreamOpen::GetManifest { grant: Grant::Admin, manifest: secret_manifest })
            .await;
        let reply = r.recv::<ManifestFrame>().await.expect("reply");
        assert!(
            matches!(&reply, Some(ManifestFrame::Refused { message }) if message.contains("cannot use an admin grant")),
            "{reply:?}"
        );
    });
    // Nothing was stored for the raw agent's run.
    let stored = c
        .gantry(&["artifacts", "list", &run.to_string(), "--json"])
        .expect_code(0)
        .json();
    assert_eq!(stored.as_array().map(Vec::len), Some(0), "{stored}");
}

#[test]
fn a_chunk_corrupted_on_the_coordinators_disk_is_reported_quarantined_and_never_served() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let pipeline = "name: p\njobs:\n  build:\n    steps: [{ run: 'mkdir out && seq 1 50000 > out/numbers' }]\n    artifacts: { name: app, paths: [out] }\n";
    let run = c.run_pipeline(pipeline, &[]);
    assert_eq!(c.wait_run(run, DEADLINE)["state"], "succeeded");
    // Damage the pack files holding the chunks: keep the length, flip the bytes.
    let packs = c.data_dir().join("cas/packs");
    let mut damaged = 0;
    for pack in std::fs::read_dir(&packs).expect("packs") {
        let path = pack.expect("pack").path();
        let mut bytes = std::fs::read(&path).expect("read");
        for b in &mut bytes {
            *b ^= 0x5a;
        }
        std::fs::write(&path, bytes).expect("write");
        damaged += 1;
    }
    assert!(damaged > 0);
    let dest = c.dir.path().join("got");
    let out = c
        .gantry(&[
            "artifacts",
            "get",
            &run.to_string(),
            "app",
            "-o",
            dest.to_str().expect("utf8"),
        ])
        .expect_code(1);
    assert!(
        out.stderr.contains("is corrupt on the coordinator's disk")
            && out.stderr.contains("quarantine"),
        "{}",
        out.stderr
    );
    assert!(
        !dest.join("out/numbers").exists(),
        "no file is written from a corrupt chunk"
    );
    wait_for("the server to log the corrupt chunk", DEADLINE, || {
        c.log().contains("not serving a chunk").then_some(())
    });
    assert!(!listing(&c.data_dir().join("cas/quarantine")).is_empty());
    // The producing pipeline runs again: the coordinator asks for the damaged chunks,
    // stores them again, and both runs' artifacts download whole.
    let again = c.run_pipeline(pipeline, &[]);
    assert_eq!(c.wait_run(again, DEADLINE)["state"], "succeeded");
    for r in [again, run] {
        let dest = c.dir.path().join(format!("healed-{r}"));
        c.gantry(&[
            "artifacts",
            "get",
            &r.to_string(),
            "app",
            "-o",
            dest.to_str().expect("utf8"),
        ])
        .expect_code(0);
        let numbers = std::fs::read_to_string(dest.join("out/numbers")).expect("numbers");
        assert_eq!(numbers.lines().count(), 50_000);
    }
}

#[test]
fn a_corrupt_chunk_in_the_agents_cache_is_fetched_again() {
    let c = Coordinator::start();
    let agents = c.agents_running(1, &[]);
    let pipeline = "name: p\njobs:\n  build:\n    steps: [{ run: 'mkdir out && seq 1 80000 > out/numbers' }]\n    artifacts: { name: app, paths: [out] }\n  use:\n    needs: build\n    steps: [{ run: 'wc -l out/numbers' }]\n";
    let first = c.run_pipeline(pipeline, &[]);
    assert_eq!(c.wait_run(first, DEADLINE)["state"], "succeeded");
    // The agent's cache now holds the chunks (in segment files); damage them all.
    let cache = agents[0].dir.path().join("cache");
    let mut damaged = 0;
    for segment in std::fs::read_dir(&cache).expect("cache") {
        let path = segment.expect("segment").path();
        if path.extension().is_some_and(|e| e == "seg") {
            let mut bytes = std::fs::read(&path).expect("read");
            for b in &mut bytes {
                *b ^= 0xa5;
            }
            std::fs::write(&path, bytes).expect("write");
            damaged += 1;
        }
    }
    assert!(damaged > 0, "the first download filled the cache");
    let second = c.run_pipeline(pipeline, &[]);
    let view = c.wait_run(second, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = c.logs(&format!("{second}.1"));
    assert!(log.contains("80000 out/numbers"), "{log}");
    assert!(
        log.contains("refetched after failing verification"),
        "{log}"
    );
}
