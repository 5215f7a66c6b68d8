//! Downloads are extracted while their chunks arrive: against an in-process server that
//! speaks the real chunk protocol over QUIC and sends chunks slowly, the tree still
//! arrives whole and exact (a file large enough for direct writes included); and when
//! the connection drops half way, what the download created in the destination goes
//! again while what was there before stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry_cas::Existing;
use gantry_certs::{CertAuthority, ClientTls, RevocationSet, ServerTls};
use gantry_protocol::{
    ChunkFrame, ChunkWants, CloseCode, Digest, Grant, ManifestFrame, StreamOpen,
};
use gantry_transfer::{ChunkCache, DownloadFigures, TransferError, TransferOptions};
use gantry_transport::{Connection, Dialer, Listener};

const DEADLINE: Duration = Duration::from_secs(60);

/// Compressed chunks and their sizes by digest, as the coordinator stores them.
type Store = HashMap<Digest, (u32, Vec<u8>)>;

/// SplitMix64 bytes: incompressible, reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A source tree: a 9 MiB file (written with direct I/O), two small ones in `lib/`.
fn source_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let files = vec![
        (PathBuf::from("big.bin"), noise(9 << 20, 1)),
        (PathBuf::from("lib/a.txt"), b"first small file\n".to_vec()),
        (PathBuf::from("lib/b.bin"), noise(300_000, 2)),
    ];
    for (path, bytes) in &files {
        let at = root.join(path);
        std::fs::create_dir_all(at.parent().expect("parent")).expect("dirs");
        std::fs::write(at, bytes).expect("write");
    }
    files
}

/// How the server behaves.
#[derive(Clone, Copy, Default)]
struct Serving {
    /// Between two chunks of a stream.
    pause: Duration,
    /// Closes the connection once this many chunks went out (over all streams).
    cut_after: Option<usize>,
}

/// Serves one connection: the manifest and chunks from `store`.
async fn serve(conn: Connection, manifest: Vec<u8>, store: Arc<Store>, how: Serving) {
    let served = Arc::new(AtomicUsize::new(0));
    while let Ok((mut writer, mut reader)) = conn.accept_stream().await {
        let (manifest, store, served, conn) = (
            manifest.clone(),
            store.clone(),
            served.clone(),
            conn.clone(),
        );
        tokio::spawn(async move {
            match reader.recv::<StreamOpen>().await {
                Ok(Some(StreamOpen::GetManifest { .. })) => {
                    let start = ManifestFrame::Start {
                        bytes: manifest.len() as u64,
                    };
                    writer.send(&start).await.expect("manifest start");
                    writer
                        .send(&ManifestFrame::Piece(manifest))
                        .await
                        .expect("manifest piece");
                    writer.finish();
                }
                Ok(Some(StreamOpen::FetchChunks { .. })) => {
                    let mut wanted = Vec::new();
                    while let Ok(Some(ChunkWants(batch))) = reader.recv::<ChunkWants>().await {
                        wanted.extend(batch);
                    }
                    for digest in wanted {
                        tokio::time::sleep(how.pause).await;
                        let n = served.fetch_add(1, Ordering::SeqCst);
                        if how.cut_after.is_some_and(|cut| n >= cut) {
                            conn.close(CloseCode::Normal, "cut off by the test");
                            return;
                        }
                        let (size, data) = store[&digest].clone();
                        let frame = ChunkFrame::Data { digest, size, data };
                        if writer.send(&frame).await.is_err() {
                            return;
                        }
                    }
                    writer.finish();
                }
                other => panic!("unexpected stream: {other:?}"),
            }
        });
    }
}

/// Builds the manifest of `root`, starts a server for it and connects to it.
async fn start(root: &Path, how: Serving) -> (Connection, Digest) {
    let mut store = Store::new();
    let manifest = gantry_cas::build_manifest_for(
        root,
        &[PathBuf::from("big.bin"), PathBuf::from("lib")],
        |digest, data| {
            store.insert(digest, (data.len() as u32, gantry_cas::compress(data)));
            Ok(())
        },
    )
    .expect("manifest");
    let bytes = manifest.encode();
    let digest = Digest::of(&bytes);

    let now = SystemTime::now();
    let ca = CertAuthority::create("streaming test CA", now).expect("CA");
    let (cert, key) = ca.issue_coordinator(&[], now).expect("coordinator cert");
    let tls = ServerTls::config(ca.cert_der(), &cert.pem, &key, RevocationSet::default())
        .expect("server tls");
    let listener = Listener::bind(
        "127.0.0.1:0".parse().expect("addr"),
        tls,
        &gantry_certs::random_bytes::<32>(),
    )
    .expect("bind");
    let address = listener.local_addr().expect("local addr").to_string();
    let store = Arc::new(store);
    tokio::spawn(async move {
        let incoming = listener.accept().await.expect("an incoming connection");
        let conn = incoming.handshake(DEADLINE).await.expect("handshake");
        serve(conn, bytes, store, how).await;
        // Dropping the endpoint at once can drop the close frame of a connection the
        // server cut off: the client then waits out its idle timeout (30-40 s).
        let _ = tokio::time::timeout(DEADLINE, listener.wait_idle()).await;
    });
    let dialer =
        Dialer::new(ClientTls::pinned(&ca.fingerprint()).expect("tls"), false).expect("dialer");
    let conn = dialer.connect(&address, DEADLINE).await.expect("connect");
    (conn, digest)
}

/// A download as an admin would make it, within [`DEADLINE`].
async fn download(
    conn: &Connection,
    manifest: &Digest,
    cache: &ChunkCache,
    dest: &Path,
    existing: Existing,
) -> Result<DownloadFigures, TransferError> {
    let options = TransferOptions::default();
    let downloading = gantry_transfer::download(
        conn,
        &Grant::Admin,
        manifest,
        cache,
        dest,
        existing,
        &options,
    );
    tokio::time::timeout(DEADLINE, downloading)
        .await
        .expect("the download ends within its deadline")
}

/// A source tree served as `how` says, a connection to its server, and an empty chunk
/// cache, all in one temporary directory (gone with the fixture).
struct Fixture {
    work: tempfile::TempDir,
    source: PathBuf,
    /// The tree's files and their bytes.
    files: Vec<(PathBuf, Vec<u8>)>,
    conn: Connection,
    manifest: Digest,
    cache_dir: PathBuf,
    cache: ChunkCache,
}

async fn fixture(how: Serving) -> Fixture {
    let work = tempfile::tempdir().expect("tempdir");
    let source = work.path().join("source");
    let files = source_tree(&source);
    let (conn, manifest) = start(&source, how).await;
    let cache_dir = work.path().join("cache");
    let cache = ChunkCache::open(&cache_dir, 1 << 30).expect("cache");
    Fixture {
        work,
        source,
        files,
        conn,
        manifest,
        cache_dir,
        cache,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_extracted_while_its_chunks_trickle_in_arrives_exact() {
    // 2 ms between chunks: the extraction catches up with the fetch and waits for
    // chunks over and over, instead of finding everything in the cache already.
    let Fixture {
        work,
        files,
        conn,
        manifest,
        cache,
        ..
    } = fixture(Serving {
        pause: Duration::from_millis(2),
        ..Serving::default()
    })
    .await;
    let dest = work.path().join("dest");
    let figures = download(&conn, &manifest, &cache, &dest, Existing::Refuse)
        .await
        .expect("download");
    assert_eq!(figures.files, 3);
    assert!(figures.chunks > 100, "{figures:?}");
    assert_eq!(figures.chunks_fetched, figures.chunks, "{figures:?}");
    for (path, bytes) in &files {
        let back = std::fs::read(dest.join(path)).expect("extracted file");
        assert!(back == *bytes, "{} differs", path.display());
    }
    conn.close(CloseCode::Normal, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_half_way_removes_what_it_created_and_keeps_what_was_there() {
    // big.bin is ~115 chunks: the cut comes in the middle of it.
    let Fixture {
        work,
        source,
        conn,
        manifest,
        cache,
        ..
    } = fixture(Serving {
        pause: Duration::from_millis(1),
        cut_after: Some(60),
    })
    .await;
    // A workspace that already holds `lib/`, with a file of its own.
    let dest = work.path().join("ws");
    std::fs::create_dir_all(dest.join("lib")).expect("lib");
    std::fs::write(dest.join("lib/mine.txt"), b"was here").expect("mine");
    let result = download(&conn, &manifest, &cache, &dest, Existing::Merge).await;
    assert!(result.is_err(), "the connection was cut: {result:?}");
    let mut names: Vec<String> = std::fs::read_dir(&dest)
        .expect("ws")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["lib"],
        "big.bin was created by the download and went again"
    );
    assert_eq!(
        std::fs::read(dest.join("lib/mine.txt")).expect("mine"),
        b"was here"
    );
    // What arrived stays in the cache for the next attempt: the part of big.bin written
    // before the cut is kept where it was written, so a new attempt fetches the rest.
    assert!(cache.figures().chunks > 0, "{:?}", cache.figures());
    conn.close(CloseCode::Normal, "done");
    let (conn, again) = start(&source, Serving::default()).await;
    assert_eq!(again, manifest);
    let figures = download(&conn, &manifest, &cache, &dest, Existing::Merge)
        .await
        .expect("the second attempt");
    assert!(
        figures.chunks_fetched < figures.chunks * 3 / 4,
        "only the rest was fetched: {figures:?}"
    );
    conn.close(CloseCode::Normal, "done");
}

/// Every chunk that arrived before a download failed is in the cache afterwards, so
/// the next attempt fetches nothing again. Here the extraction fails at once (a
/// directory stands where the large file goes) while the fetch goes on to the end: the
/// large file's chunks, which the fetch hands to the extraction in memory rather than
/// writing them to a segment, must not be dropped with the failed extraction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_fetched_for_an_extraction_that_failed_stay_cached() {
    let Fixture {
        work,
        conn,
        manifest,
        cache,
        ..
    } = fixture(Serving::default()).await;
    let dest = work.path().join("ws");
    std::fs::create_dir_all(dest.join("big.bin")).expect("a directory in the way");
    let result = download(&conn, &manifest, &cache, &dest, Existing::Merge).await;
    assert!(result.is_err(), "big.bin cannot be written: {result:?}");
    let cached = cache.figures().chunks;
    assert!(cached > 100, "big.bin's ~115 chunks are cached: {cached}");

    std::fs::remove_dir(dest.join("big.bin")).expect("out of the way");
    let figures = download(&conn, &manifest, &cache, &dest, Existing::Merge)
        .await
        .expect("the second attempt");
    assert_eq!(figures.chunks, cached, "{figures:?}");
    assert_eq!(
        figures.chunks_fetched, 0,
        "all came from the cache: {figures:?}"
    );
    conn.close(CloseCode::Normal, "done");
}

/// Bytes of the cache's files with extension `ext` (`seg`: segments of chunks copied
/// in; `lnk`: files of downloads linked in).
fn cache_bytes(cache_dir: &Path, ext: &str) -> u64 {
    std::fs::read_dir(cache_dir)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| std::fs::metadata(p).expect("metadata").len())
        .sum()
}

/// A first download writes a large file's bytes once: the cache keeps its chunks in
/// the file itself (a hard link), not in a copy. A second download reads them from
/// there and fetches nothing; after the file is changed in place, the changed chunk is
/// caught by verification and fetched again, and the tree still arrives exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_files_chunks_are_cached_in_the_file_the_download_wrote() {
    use std::os::unix::fs::MetadataExt;
    let Fixture {
        work,
        files,
        conn,
        manifest,
        cache_dir,
        cache,
        ..
    } = fixture(Serving::default()).await;
    let first = work.path().join("first");
    let figures = download(&conn, &manifest, &cache, &first, Existing::Refuse)
        .await
        .expect("download");
    assert_eq!(figures.chunks_fetched, figures.chunks, "{figures:?}");
    assert!(
        figures.chunks_kept_in_place > 100 && figures.chunks_kept_in_place < figures.chunks,
        "big.bin's ~115 chunks stay in it, lib/b.bin's go to a segment: {figures:?}"
    );
    let big = std::fs::metadata(first.join("big.bin")).expect("big.bin");
    assert_eq!(big.nlink(), 2, "linked into the cache");
    assert_eq!(cache_bytes(&cache_dir, "lnk"), 9 << 20);
    assert!(
        cache_bytes(&cache_dir, "seg") < 1 << 20,
        "big.bin was not copied into a segment: {} bytes",
        cache_bytes(&cache_dir, "seg")
    );

    let second = work.path().join("second");
    let figures = download(&conn, &manifest, &cache, &second, Existing::Refuse)
        .await
        .expect("download from the cache");
    assert_eq!(figures.chunks_fetched, 0, "{figures:?}");
    for (path, bytes) in &files {
        assert!(std::fs::read(second.join(path)).expect("file") == *bytes);
    }

    // A job rewrites a few bytes of its copy in place: the cache's link sees them.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(first.join("big.bin"))
            .expect("open");
        f.write_at(b"changed by the job", 4 << 20).expect("write");
    }
    let third = work.path().join("third");
    let figures = download(&conn, &manifest, &cache, &third, Existing::Refuse)
        .await
        .expect("download after the change");
    assert!(figures.chunks_refetched >= 1, "{figures:?}");
    assert!(figures.chunks_fetched >= 1, "{figures:?}");
    for (path, bytes) in &files {
        assert!(
            std::fs::read(third.join(path)).expect("file") == *bytes,
            "{} differs",
            path.display()
        );
    }
    conn.close(CloseCode::Normal, "done");
}
