//! Artifact transfers under faults, with the real binaries: a download and an upload
//! cut off by a coordinator crash resume where they stopped, and garbage collection in
//! the middle of an upload takes none of its chunks. Transfers are slowed with the
//! agent's own `--max-transfer-rate`, so "in the middle" is a wide window rather than a
//! race.

use std::path::Path;

use gantry_tests::{job_named, wait_for, Agent, Coordinator, DEADLINE};

/// 24 MB of random data, about 300 chunks: 6 s at 4 MiB/s.
const PIPELINE: &str = r#"
name: big
jobs:
  produce:
    runs-on: { role: producer }
    steps:
      - run: |
          mkdir out
          head -c 24000000 /dev/urandom > out/blob
          sha256sum out/blob | cut -d' ' -f1 > out/blob.sha
    artifacts: { name: blob, paths: [out] }
  consume:
    needs: produce
    runs-on: { role: consumer }
    steps:
      - run: |
          test "$(sha256sum out/blob | cut -d' ' -f1)" = "$(cat out/blob.sha)"
          echo verified
"#;

/// A coordinator with a fast producer and a consumer, one of them slowed down.
fn setup(slow: &str) -> (Coordinator, Vec<Agent>) {
    let c = Coordinator::start();
    let token = c.token(&["--uses", "2"]);
    let mut agents = Vec::new();
    for role in ["producer", "consumer"] {
        let mut agent = Agent::enroll(&token, &["--label", &format!("role={role}")]);
        if role == slow {
            agent.start_with(&["--max-transfer-rate", "4MiB"]);
        } else {
            agent.start();
        }
        agents.push(agent);
    }
    c.wait_connected(2);
    (c, agents)
}

/// Bytes in the files of `dir` with extension `ext`: the coordinator's packs (chunks of
/// uploads made durable so far).
fn bytes_in(dir: &Path, ext: &str) -> u64 {
    std::fs::read_dir(dir).map_or(0, |files| {
        files
            .filter_map(Result::ok)
            .filter(|f| f.path().extension().is_some_and(|e| e == ext))
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// The size of the largest file called `name` under `dir`, looking `depth` levels down.
fn largest_file_named(dir: &Path, name: &str, depth: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut largest = 0;
    for entry in entries.filter_map(Result::ok) {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth > 0 {
            largest = largest.max(largest_file_named(&entry.path(), name, depth - 1));
        } else if kind.is_file() && entry.file_name() == name {
            largest = largest.max(entry.metadata().map_or(0, |m| m.len()));
        }
    }
    largest
}

/// `(done, total)` from a log line like "... fetched 120 of 370 chunks ...".
fn chunks_moved(log: &str, verb: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&format!("{verb} ")) && l.contains(" chunks"))
        .unwrap_or_else(|| panic!("no '{verb}' line in {log}"));
    let after = line.split(&format!("{verb} ")).nth(1).expect("figures");
    let mut words = after.split_whitespace();
    let done = words.next().and_then(|w| w.parse().ok()).expect("done");
    let total = words.nth(1).and_then(|w| w.parse().ok()).expect("total");
    (done, total)
}

#[test]
fn a_download_cut_off_by_a_coordinator_crash_resumes_where_it_stopped() {
    let (mut c, agents) = setup("consumer");
    let run = c.run_pipeline(PIPELINE, &[]);
    // The blob is large enough for the consumer's cache to keep its chunks in the file
    // the download writes (not in segments): how far that file got is how far the
    // download got.
    let consumer = agents[1].dir.path().to_path_buf();
    wait_for(
        "the consumer to have a quarter of the chunks",
        DEADLINE,
        || (largest_file_named(&consumer, "blob", 6) >= 6_000_000).then_some(()),
    );
    c.server().kill9();
    c.start_server();
    let view = c.wait_run(run, DEADLINE * 2);
    assert_eq!(view["state"], "succeeded", "{view}");
    let log = c.logs(&format!("{run}.1"));
    assert!(log.contains("verified"), "{log}");
    assert!(log.contains("resuming on the next connection"), "{log}");
    let (fetched, total) = chunks_moved(&log, "fetched");
    assert!(
        fetched < total * 9 / 10,
        "after the crash only the rest was fetched: {fetched} of {total}\n{log}"
    );
    assert_eq!(
        job_named(&view, "consume")["attempt"],
        1,
        "the job itself was not re-run"
    );
}

#[test]
fn an_upload_cut_off_by_a_coordinator_crash_sends_only_the_rest() {
    let (mut c, _agents) = setup("producer");
    let run = c.run_pipeline(PIPELINE, &[]);
    // Pack bytes on disk run ahead of what is durable and acknowledged by up to a sync
    // batch (seen: ~4 MB, a second at 4 MiB/s, on a loaded 2-core machine), so wait for
    // 40% on disk: at least a sixth is then acknowledged, and 3.5 s of upload remain.
    wait_for(
        "the coordinator to hold 40% of the upload",
        DEADLINE,
        || (bytes_in(&c.data_dir().join("cas/packs"), "pack") >= 10_000_000).then_some(()),
    );
    c.server().kill9();
    c.start_server();
    let view = c.wait_run(run, DEADLINE * 2);
    assert_eq!(view["state"], "succeeded", "{view}");
    let produce = c.logs(&format!("{run}.0"));
    assert!(
        produce.contains("resuming on the next connection"),
        "{produce}"
    );
    let (sent, total) = chunks_moved(&produce, "sent");
    assert!(
        sent < total * 9 / 10,
        "chunks made durable before the crash were not sent again: {sent} of {total}\n{produce}"
    );
    assert!(c.logs(&format!("{run}.1")).contains("verified"));
}

#[test]
fn garbage_collection_during_an_upload_takes_none_of_its_chunks() {
    let (c, _agents) = setup("producer");
    let run = c.run_pipeline(PIPELINE, &[]);
    wait_for(
        "the coordinator to hold some of the upload",
        DEADLINE,
        || (bytes_in(&c.data_dir().join("cas/packs"), "pack") >= 4_000_000).then_some(()),
    );
    // Twice, with no grace at all: only the open upload session protects its chunks.
    for _ in 0..2 {
        let report = c
            .gantry(&["gc", "--grace", "0s", "--json"])
            .expect_code(0)
            .json();
        assert_eq!(report["chunks_deleted"], 0, "{report}");
        assert!(report["chunks_protected"].as_u64() > Some(0), "{report}");
    }
    let view = c.wait_run(run, DEADLINE * 2);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert!(c.logs(&format!("{run}.1")).contains("verified"));
    // Once committed, the chunks are referenced: a collection keeps every one.
    let report = c
        .gantry(&["gc", "--grace", "0s", "--json"])
        .expect_code(0)
        .json();
    assert_eq!(report["chunks_deleted"], 0, "{report}");
    assert!(report["chunks_kept"].as_u64() >= Some(200), "{report}");
}
