//! Checkout benchmark (issue 24): prints, in one run on loopback, for a generated
//! repository of ~1 GiB in ~50,000 files served by `git daemon`:
//! - what a CI runner does today: `git clone --depth 1` (first run), and in that clone
//!   `git fetch --depth 1` + `git checkout -f` after a one-file commit (GitLab's default);
//! - Gantry's parts, from `gantry-git`: the coordinator's mirror fetch, the commit's tree
//!   turned into a chunk-store manifest (first commit, then the one-file commit through
//!   the blob memo), the workspace `.git` payload, and the agent's materialisation of a
//!   clean workspace (extraction from a warm local chunk cache plus writing the `.git`),
//!   checked with `git status`; and the bytes the agent would receive for each run
//!   (chunks its cache lacks, compressed, plus the payload);
//! - end to end, with the real binaries (a `gantry server` and one `gantry-agent`
//!   beside the daemon): `gantry repos add`, then `gantry run --repo` of the first commit
//!   and of the one-file commit on the same agent, each with the time from the trigger
//!   to the first step running and the agent's checkout line from the job's log (chunks
//!   and compressed bytes it fetched, fetch and extract times). `GANTRY_BENCH_NO_E2E=1`
//!   skips it; `GANTRY_BENCH_NO_PARTS=1` skips the in-process parts.
//!
//! Run: `cargo build --release --bins && cargo run --release -p gantry-tests --bin
//! bench-checkout` (needs git; the end-to-end part starts the binaries beside this one). Options
//! through the environment: `GANTRY_BENCH_FILES` (default 50000), `GANTRY_BENCH_MIB`
//! (default 1024), `GANTRY_BENCH_DIR` (where the generated repository is kept between
//! runs; default a directory under the system's temp dir, removed at the end). The
//! content is deterministic: half the bytes in many small text-like files (they
//! compress ~3x, like source code), half in one large incompressible file per 1,000
//! files (like vendored assets). Figures are printed, never asserted; wall-clock times
//! on a shared machine are noisy, so CPU seconds of the child git processes are printed
//! beside them.

use std::collections::HashSet;
use std::io::{BufWriter, Write as _};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use gantry_cas::{Bytes, Digest, Existing};
use gantry_git::{
    build_payload, checkout_tree, write_git_dir, CheckoutOptions, Credentials, Depth, Fetch,
    GitPayload, GitProgram, MemoryMemo, Mirror, MirrorOptions, ObjectId, PayloadRequest, Remote,
    TreeCheckout,
};
use gantry_transfer::ChunkCache;

/// The pipeline of the generated repository: its one step says when it started.
const PIPELINE: &str =
    "name: bench\njobs:\n  build:\n    steps:\n      - run: date +STEP_AT=%s.%N\n";

/// Fixed identity and dates: the same options give the same commits on every run.
const AUTHOR: &str = "Bench <bench@example.invalid> 1767225600 +0000";

fn main() -> anyhow::Result<()> {
    let files: usize = env_or("GANTRY_BENCH_FILES", 50_000)?;
    let mib: u64 = env_or("GANTRY_BENCH_MIB", 1024)?;
    let (root, _cleanup) = if let Some(dir) = std::env::var_os("GANTRY_BENCH_DIR") {
        (PathBuf::from(dir), None)
    } else {
        let dir = tempfile::Builder::new()
            .prefix("bench-checkout-")
            .tempdir()?;
        (dir.path().to_owned(), Some(dir))
    };
    std::fs::create_dir_all(&root)?;
    println!(
        "bench-checkout: {files} files, {mib} MiB, in {}",
        root.display()
    );

    let spec = RepoSpec {
        files,
        bytes: mib * 1024 * 1024,
    };
    let served = root.join("served/bench.git");
    let started = Instant::now();
    let (first, second) = generate(&served, &spec)?;
    println!(
        "repository ready in {:.1} s (first {first}, one-file commit {second})",
        secs(started.elapsed())
    );

    // Each run starts from the first commit; the one-file commit is pushed later.
    git(
        &served,
        &["update-ref", "refs/heads/main", &first.to_string()],
    )?;
    let daemon = Daemon::start(&root.join("served"))?;
    let url = format!("git://127.0.0.1:{}/bench.git", daemon.port);
    let scratch = root.join("run");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    std::fs::create_dir_all(&scratch)?;

    let mut report = Report::default();

    // What runners do: a shallow clone, then fetch and checkout after a commit.
    let clone_dir = scratch.join("clone");
    let clone = timed_git(
        &scratch,
        &[
            "clone",
            "-q",
            "--depth",
            "1",
            &url,
            clone_dir.to_str().unwrap_or("clone"),
        ],
    )?;
    report.row("git clone --depth 1 (first run)", clone, "");

    // Gantry's coordinator side, first commit.
    // `GANTRY_BENCH_NO_PARTS=1`: only the runners' figures and the end-to-end part.
    let parts = std::env::var_os("GANTRY_BENCH_NO_PARTS").is_none();
    let mut gantry = GantryParts::new(&scratch, &url)?;
    let run1 = if parts {
        let run1 = gantry.run(first, "first")?;
        Report::gantry("first commit", &run1);
        Some(run1)
    } else {
        None
    };

    // The one-file commit.
    git(
        &served,
        &["update-ref", "refs/heads/main", &second.to_string()],
    )?;
    let fetch = timed_git(
        &clone_dir,
        &["fetch", "-q", "--depth", "1", "origin", "main"],
    )?;
    let checkout = timed_git(&clone_dir, &["checkout", "-q", "-f", "FETCH_HEAD"])?;
    report.row("git fetch --depth 1 (one-file commit)", fetch, "");
    report.row("git checkout -f (one-file commit)", checkout, "");
    report.row(
        "runner follow-up total",
        Timing {
            wall: fetch.wall + checkout.wall,
            cpu: fetch.cpu + checkout.cpu,
        },
        "",
    );
    if let Some(run1) = run1 {
        let run2 = gantry.run(second, "second")?;
        Report::gantry("one-file commit", &run2);
        Report::print(&spec, &run1, &run2);
    }
    if std::env::var_os("GANTRY_BENCH_NO_E2E").is_none() {
        end_to_end(&served, &url, first, second)?;
    }
    drop(daemon);
    Ok(())
}

/// The real coordinator and one agent (the binaries beside this one): the repository
/// added, then `gantry run --repo` of the first commit and of the one-file commit on the
/// same agent. For each: the time from the trigger to the first step running, and the
/// agent's checkout line (chunks and bytes it fetched, fetch and extract times).
fn end_to_end(served: &Path, url: &str, first: ObjectId, second: ObjectId) -> anyhow::Result<()> {
    use gantry_tests::{Coordinator, DEADLINE};
    git(
        served,
        &["update-ref", "refs/heads/main", &first.to_string()],
    )?;
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let started = Instant::now();
    c.gantry(&["repos", "add", "bench", "--url", url])
        .expect_code(0);
    println!(
        "end to end: repos add (the coordinator's first mirror fetch) {:>8.2} s",
        secs(started.elapsed())
    );
    let run_deadline = DEADLINE * 20;
    for (label, commit) in [
        ("first run (cold agent)", first),
        ("one-file commit (warm agent)", second),
    ] {
        git(
            served,
            &["update-ref", "refs/heads/main", &commit.to_string()],
        )?;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let started = Instant::now();
        let run = c
            .gantry(&["run", "--repo", "bench", "--json"])
            .expect_code(0)
            .json();
        let submitted = started.elapsed();
        let number = run["run"].as_u64().context("run number")?;
        let view = c.wait_run(number, run_deadline);
        let log = c.logs(&format!("{number}.0"));
        let step_at = log
            .lines()
            .find_map(|l| l.trim().strip_prefix("STEP_AT="))
            .and_then(|t| t.parse::<f64>().ok());
        let checkout = log
            .lines()
            .find(|l| l.contains("checkout: "))
            .unwrap_or("(no checkout line)");
        println!("end to end, {label}: run {number} {}", view["state"]);
        println!(
            "  gantry run --repo returned (fetch, walk, store)  {:>8.2} s",
            secs(submitted)
        );
        match step_at {
            Some(t) => println!(
                "  trigger to first step running                  {:>8.2} s",
                t - at
            ),
            None => println!("  trigger to first step running: no STEP_AT in the log:\n{log}"),
        }
        println!("  agent: {}", checkout.trim());
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={text} is not a number")),
        Err(_) => Ok(default),
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Wall time and the CPU time of child processes (git and its helpers).
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    wall: Duration,
    cpu: Duration,
}

/// CPU seconds used so far by this process's waited-for children.
fn children_cpu() -> Duration {
    Duration::from_secs_f64(proc_stat_cpu(13))
}

/// CPU seconds used so far by this process itself (all its threads).
fn self_cpu() -> Duration {
    Duration::from_secs_f64(proc_stat_cpu(11))
}

/// The sum of two consecutive clock-tick fields of /proc/self/stat, counted from the
/// field after the command name (11: utime and stime; 13: cutime and cstime).
fn proc_stat_cpu(first: usize) -> f64 {
    // /proc/self/stat fields 16 and 17: cutime and cstime in clock ticks.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command's `)`, field 3 (state) is index 0: utime is field 14, index 11.
    (ticks(first) + ticks(first + 1)) / 100.0
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn timed_git(dir: &Path, args: &[&str]) -> anyhow::Result<Timing> {
    let cpu = children_cpu();
    let started = Instant::now();
    git(dir, args)?;
    Ok(Timing {
        wall: started.elapsed(),
        cpu: children_cpu().saturating_sub(cpu),
    })
}

/// The generated repository's shape.
struct RepoSpec {
    files: usize,
    bytes: u64,
}

/// SplitMix64: fast, reproducible bytes and choices.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "self", "return", "match", "impl", "struct", "enum", "pub", "use", "crate",
    "where", "for", "in", "if", "else", "while", "loop", "break", "continue", "const", "static",
    "String", "Vec", "Option", "Result", "Some", "None", "Ok", "Err", "u64", "usize", "bool",
    "config", "buffer", "request", "response", "handler", "value", "index", "count", "error",
    "path", "name", "data", "state", "event", "client", "server", "token", "stream", "chunk",
];

/// The content of a small file: text-like lines (seeded by the file's index and the
/// revision, so changing one file changes nothing else).
fn small_file(index: usize, revision: u64, size: usize) -> Vec<u8> {
    let mut rng = Prng((index as u64) << 8 | revision);
    let mut out = Vec::with_capacity(size + 64);
    while out.len() < size {
        let indent = rng.below(4) as usize * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        for _ in 0..(3 + rng.below(9)) {
            out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            if rng.below(5) == 0 {
                out.extend_from_slice(format!("_{}", rng.below(1000)).as_bytes());
            }
            out.push(b' ');
        }
        out.extend_from_slice(b";\n");
    }
    out.truncate(size);
    out
}

fn large_file(index: usize, size: usize) -> Vec<u8> {
    let mut rng = Prng(0xA55E7 ^ (index as u64) << 20);
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Each file's path and size, deterministic for a spec.
fn layout(spec: &RepoSpec) -> Vec<(String, usize, bool)> {
    let large_count = (spec.files / 1000).max(1);
    let small_count = spec.files.saturating_sub(large_count);
    let large_size = (spec.bytes / 2 / large_count as u64) as usize;
    let small_mean = (spec.bytes / 2 / small_count.max(1) as u64) as usize;
    let mut rng = Prng(42);
    let mut out = Vec::with_capacity(spec.files);
    for i in 0..small_count {
        let size = 1 + rng.below(2 * small_mean as u64) as usize;
        out.push((
            format!("src/d{:03}/m{:02}/file{i:06}.rs", i / 500, (i / 50) % 10),
            size,
            false,
        ));
    }
    for i in 0..large_count {
        out.push((format!("assets/blob{i:04}.bin"), large_size, true));
    }
    out
}

/// Makes (or reuses) the served repository: the first commit with every file, and a
/// second commit changing one small file. Returns both commits.
fn generate(served: &Path, spec: &RepoSpec) -> anyhow::Result<(ObjectId, ObjectId)> {
    // v2: the first commit carries the pipeline the end-to-end runs build.
    let marker = served.join(format!("gantry-bench-v2-{}-{}", spec.files, spec.bytes));
    if marker.exists() {
        let first = git(served, &["rev-parse", "refs/bench/first"])?;
        let second = git(served, &["rev-parse", "refs/bench/second"])?;
        return Ok((parse_oid(&first)?, parse_oid(&second)?));
    }
    if served.exists() {
        std::fs::remove_dir_all(served)?;
    }
    std::fs::create_dir_all(served)?;
    git(served, &["init", "-q", "--bare", "-b", "main"])?;
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(served)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting git fast-import")?;
    let stdin = child.stdin.take().context("fast-import stdin")?;
    let mut out = BufWriter::with_capacity(1 << 20, stdin);
    let files = layout(spec);
    let message = "generated tree\n";
    write!(
        out,
        "commit refs/bench/first\nauthor {AUTHOR}\ncommitter {AUTHOR}\ndata {}\n{message}",
        message.len()
    )?;
    write!(
        out,
        "M 100644 inline gantry.yml\ndata {}\n{PIPELINE}\n",
        PIPELINE.len()
    )?;
    for (index, (path, size, large)) in files.iter().enumerate() {
        let data = if *large {
            large_file(index, *size)
        } else {
            small_file(index, 0, *size)
        };
        write!(out, "M 100644 inline {path}\ndata {}\n", data.len())?;
        out.write_all(&data)?;
        out.write_all(b"\n")?;
    }
    // The one-file commit: the middle small file, rewritten.
    let changed = files.len() / 2;
    let (path, size, _) = &files[changed];
    let data = small_file(changed, 1, *size);
    let message = "change one file\n";
    write!(out, "commit refs/bench/second\nauthor {AUTHOR}\ncommitter {AUTHOR}\ndata {}\n{message}from refs/bench/first\nM 100644 inline {path}\ndata {}\n", message.len(), data.len())?;
    out.write_all(&data)?;
    out.write_all(b"\n")?;
    out.flush()?;
    drop(out);
    let status = child.wait()?;
    if !status.success() {
        bail!("git fast-import failed: {status}");
    }
    git(
        served,
        &["update-ref", "refs/heads/main", "refs/bench/first"],
    )?;
    git(
        served,
        &["config", "uploadpack.allowReachableSHA1InWant", "true"],
    )?;
    std::fs::write(&marker, b"")?;
    let first = git(served, &["rev-parse", "refs/bench/first"])?;
    let second = git(served, &["rev-parse", "refs/bench/second"])?;
    Ok((parse_oid(&first)?, parse_oid(&second)?))
}

fn parse_oid(hex: &str) -> anyhow::Result<ObjectId> {
    ObjectId::from_hex(hex).with_context(|| format!("`{hex}` is not a commit id"))
}

/// `git daemon` on loopback, stopped when dropped.
struct Daemon {
    child: std::process::Child,
    port: u16,
}

impl Daemon {
    fn start(base: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // The daemon itself, not `git daemon`: `git` would run it as a child of its own
        // and killing `git` would leave the daemon behind.
        let exec_path = git(Path::new("/"), &["--exec-path"])?;
        let mut child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .args([
                "--export-all",
                "--reuseaddr",
                "--verbose",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting git daemon")?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let (ready, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut told = false;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !told && line.contains("Ready to rumble") {
                    let _ = ready.send(());
                    told = true;
                }
            }
        });
        let mut daemon = Self { child, port };
        if wait.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
            bail!("git daemon did not start within 20 s");
        }
        daemon.port = port;
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run's figures from Gantry's parts.
#[derive(Debug, Default, Clone)]
struct Figures {
    mirror_fetch: Timing,
    manifest: Duration,
    /// CPU of this process (chunking, hashing) and of git (listing, inflating blobs).
    manifest_cpu: Duration,
    manifest_git_cpu: Duration,
    /// Compressing and storing new chunks (the coordinator's chunk store's share).
    storing: Duration,
    blobs_read: u64,
    chunks_new: u64,
    chunks_total: u64,
    payload: Duration,
    payload_bytes: u64,
    /// The payload's chunks the agent's cache lacked, compressed.
    payload_new_bytes: u64,
    pack_bytes: u64,
    index_recipe_bytes: u64,
    /// Compressed bytes of the chunks the agent's cache lacked.
    chunk_bytes_sent: u64,
    materialise: Duration,
    extract: Duration,
    write_git: Duration,
    mtimes_adjusted: u64,
    git_status: Timing,
    files: u64,
    bytes: u64,
}

/// The coordinator's mirror and chunk store, and one agent's chunk cache.
struct GantryParts {
    scratch: PathBuf,
    mirror: Mirror,
    memo: MemoryMemo,
    /// The coordinator's chunk store (compressed chunks by digest).
    store: std::collections::HashMap<Digest, Bytes>,
    cache: ChunkCache,
    in_cache: HashSet<Digest>,
}

impl GantryParts {
    fn new(scratch: &Path, url: &str) -> anyhow::Result<Self> {
        let mirror = Mirror::open(
            GitProgram::default(),
            scratch.join("coordinator/mirror.git"),
            Remote::new(url, Credentials::None)?,
            MirrorOptions::default(),
        )?;
        let cache_dir = scratch.join("agent/cache");
        std::fs::create_dir_all(&cache_dir)?;
        let cache = ChunkCache::open(&cache_dir, 8 * 1024 * 1024 * 1024)?;
        Ok(Self {
            scratch: scratch.to_owned(),
            mirror,
            memo: MemoryMemo::default(),
            store: std::collections::HashMap::new(),
            cache,
            in_cache: HashSet::new(),
        })
    }

    /// The coordinator's work for a pushed commit, then the agent's for a job on it.
    fn run(&mut self, commit: ObjectId, name: &str) -> anyhow::Result<Figures> {
        let mut figures = Figures::default();
        let cpu = children_cpu();
        let started = Instant::now();
        self.mirror.fetch(&Fetch::All)?;
        figures.mirror_fetch = Timing {
            wall: started.elapsed(),
            cpu: children_cpu().saturating_sub(cpu),
        };

        let (own_cpu, git_cpu) = (self_cpu(), children_cpu());
        let started = Instant::now();
        // The coordinator stores what it has not got (compressed, as its packs hold it).
        // New chunks are copied out (a chunk of a large blob shares its read window)
        // and compressed after the walk, so its CPU is the walk's alone.
        let mut pending: Vec<(Digest, Vec<u8>)> = Vec::new();
        let mut seen: HashSet<Digest> = self.store.keys().copied().collect();
        let checkout = checkout_tree(
            &self.mirror,
            commit,
            &CheckoutOptions::default(),
            &self.memo,
            None,
            |digest, bytes: &Bytes| {
                if seen.insert(digest) {
                    pending.push((digest, bytes.to_vec()));
                }
                Ok::<(), String>(())
            },
        )?;
        figures.manifest = started.elapsed();
        figures.manifest_cpu = self_cpu().saturating_sub(own_cpu);
        figures.manifest_git_cpu = children_cpu().saturating_sub(git_cpu);
        let started = Instant::now();
        figures.chunks_new = pending.len() as u64;
        for (digest, bytes) in pending {
            self.store
                .insert(digest, Bytes::from(gantry_cas::compress(&bytes)));
        }
        figures.storing = started.elapsed();
        figures.blobs_read = checkout.figures.blobs_read;
        figures.files = checkout.figures.files;
        figures.bytes = checkout.figures.bytes;
        figures.chunks_total = distinct_chunks(&checkout);

        let started = Instant::now();
        let (payload, payload_figures) = build_payload(
            &self.mirror,
            &PayloadRequest {
                checkout: &checkout,
                depth: Depth::Commits(NonZeroU32::MIN),
                reference: Some("refs/heads/main"),
                remote_url: Some(self.mirror.remote().url()),
            },
        )?;
        let encoded = payload.encode();
        figures.payload = started.elapsed();
        figures.payload_bytes = encoded.len() as u64;
        // Shipped as one file through the chunk store, only its new chunks travel.
        let mut chunks = gantry_cas::chunk_reader(encoded.as_slice());
        while let Some(chunk) = chunks.next_chunk() {
            let (digest, data) = chunk?;
            if self.in_cache.insert(digest) {
                figures.payload_new_bytes += gantry_cas::compress(&data).len() as u64;
            }
        }
        figures.pack_bytes = payload_figures.pack_bytes;
        figures.index_recipe_bytes = payload_figures.index_bytes;

        // What travels to the agent: the chunks its cache lacks, and the payload.
        let mut writer = self.cache.writer()?;
        for entry in &checkout.manifest.entries {
            if let gantry_cas::EntryKind::File { chunks, .. } = &entry.kind {
                for chunk in chunks {
                    if self.in_cache.insert(chunk.digest) {
                        let frame = self
                            .store
                            .get(&chunk.digest)
                            .context("chunk missing from the store")?;
                        figures.chunk_bytes_sent += frame.len() as u64;
                        writer.append(&chunk.digest, frame.clone())?;
                    }
                }
            }
        }
        writer.finish()?;

        // The agent: a clean workspace from the warm cache, then the .git.
        let workspace = self.scratch.join(format!("agent/workspace-{name}"));
        let started = Instant::now();
        extract_from_cache(&checkout, &self.cache, &workspace)?;
        figures.extract = started.elapsed();
        let payload = GitPayload::decode(&encoded)?;
        let git_started = Instant::now();
        let written = write_git_dir(&workspace, &payload)?;
        figures.write_git = git_started.elapsed();
        figures.materialise = started.elapsed();
        figures.mtimes_adjusted = written.mtimes_adjusted;

        let cpu = children_cpu();
        let started = Instant::now();
        let status = git(&workspace, &["status", "--porcelain"])?;
        figures.git_status = Timing {
            wall: started.elapsed(),
            cpu: children_cpu().saturating_sub(cpu),
        };
        if !status.is_empty() {
            bail!(
                "the workspace of {name} is not clean: {}",
                status.lines().take(5).collect::<Vec<_>>().join("; ")
            );
        }
        let head = git(&workspace, &["rev-parse", "HEAD"])?;
        if head != commit.to_string() {
            bail!("the workspace of {name} is at {head}, not {commit}");
        }
        Ok(figures)
    }
}

fn distinct_chunks(checkout: &TreeCheckout) -> u64 {
    let mut seen = HashSet::new();
    for entry in &checkout.manifest.entries {
        if let gantry_cas::EntryKind::File { chunks, .. } = &entry.kind {
            seen.extend(chunks.iter().map(|c| c.digest));
        }
    }
    seen.len() as u64
}

/// The agent's extraction from its chunk cache (every chunk verified), on up to four
/// threads as the transfer crate does for a tree whose chunks are all cached.
fn extract_from_cache(
    checkout: &TreeCheckout,
    cache: &ChunkCache,
    dest: &Path,
) -> anyhow::Result<()> {
    let sizes = gantry_transfer::chunk_sizes(&checkout.manifest);
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(4);
    gantry_cas::extract_verified_parallel(
        &checkout.manifest,
        dest,
        Existing::Refuse,
        workers,
        || {
            let mut reader = cache.reader();
            let sizes = &sizes;
            move |digest: &Digest| {
                let size = sizes.get(digest).copied().unwrap_or(0) as usize;
                match reader.get(digest) {
                    Some(found) => found.open(size, digest),
                    None => Err(gantry_cas::CasError::CorruptChunk {
                        digest: *digest,
                        reason: "not in the cache".into(),
                    }),
                }
            }
        },
    )?;
    Ok(())
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, Timing, String)>,
}

impl Report {
    fn row(&mut self, what: &str, timing: Timing, note: &str) {
        println!(
            "{what:<48} {:>8.2} s wall {:>8.2} s cpu(git) {note}",
            secs(timing.wall),
            secs(timing.cpu)
        );
        self.rows.push((what.to_owned(), timing, note.to_owned()));
    }

    fn gantry(label: &str, f: &Figures) {
        println!("gantry, {label}:");
        println!(
            "  mirror fetch                                 {:>8.2} s wall {:>8.2} s cpu(git)",
            secs(f.mirror_fetch.wall),
            secs(f.mirror_fetch.cpu)
        );
        println!("  tree to manifest                             {:>8.2} s ({} files, {:.1} MiB; {} blobs read, {} new chunks of {})", secs(f.manifest), f.files, f.bytes as f64 / 1_048_576.0, f.blobs_read, f.chunks_new, f.chunks_total);
        println!(
            "    cpu: {:.2} s chunking and hashing here, {:.2} s in git (listing, inflating)",
            secs(f.manifest_cpu),
            secs(f.manifest_git_cpu)
        );
        println!(
            "  compressing the new chunks into the store    {:>8.2} s",
            secs(f.storing)
        );
        println!("  .git payload                                 {:>8.2} s ({} bytes: pack {} + index recipe {})", secs(f.payload), f.payload_bytes, f.pack_bytes, f.index_recipe_bytes);
        println!("  materialise (warm cache)                     {:>8.2} s (extract {:.2} s, .git {:.2} s, {} mtimes set back)", secs(f.materialise), secs(f.extract), secs(f.write_git), f.mtimes_adjusted);
        println!(
            "  git status in the workspace                  {:>8.2} s wall {:>8.2} s cpu (clean)",
            secs(f.git_status.wall),
            secs(f.git_status.cpu)
        );
        println!(
            "  bytes to the agent                           {:>8} (chunks {} + payload {})",
            f.chunk_bytes_sent + f.payload_bytes,
            f.chunk_bytes_sent,
            f.payload_bytes
        );
        println!(
            "  ... with the payload through the chunk store {:>8} (its new chunks, compressed: {})",
            f.chunk_bytes_sent + f.payload_new_bytes,
            f.payload_new_bytes
        );
    }

    fn print(spec: &RepoSpec, first: &Figures, second: &Figures) {
        let sent = second.chunk_bytes_sent + second.payload_bytes;
        let deduplicated = second.chunk_bytes_sent + second.payload_new_bytes;
        println!(
            "follow-up bytes to the agent: {sent} = {:.3}% of the repository ({} bytes of files); {deduplicated} = {:.3}% with the payload through the chunk store",
            sent as f64 * 100.0 / first.bytes.max(1) as f64,
            first.bytes,
            deduplicated as f64 * 100.0 / first.bytes.max(1) as f64,
        );
        println!(
            "generated: {} files requested, {} MiB requested; first run sent {:.1} MiB",
            spec.files,
            spec.bytes / 1_048_576,
            (first.chunk_bytes_sent + first.payload_bytes) as f64 / 1_048_576.0
        );
    }
}
