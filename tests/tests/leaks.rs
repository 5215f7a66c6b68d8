//! End-to-end tests of what a job's output and artifacts must not lose or leak, with
//! the real `gantry` and `gantry-agent` binaries on loopback (issue 25's contained
//! leaks): the end of a long log, encoded secrets, terminal control sequences, and
//! sparse or oversized artifacts.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gantry_tests::{bin, job_named, Coordinator, DEADLINE};

/// `gantry logs JOB` as raw bytes (a log may be tens of MB, and not UTF-8).
fn log_bytes(c: &Coordinator, job: &str, extra: &[&str]) -> Vec<u8> {
    let out = Command::new(bin("gantry"))
        .arg("logs")
        .arg(job)
        .args(extra)
        .env("GANTRY_CONFIG", c.context())
        .env("GANTRY_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run gantry logs");
    assert!(
        out.status.success(),
        "gantry logs {job} {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Polls the stored log every 200 ms until `cond` holds (a finished job's last chunks
/// may land just after its state), panicking with the log's end after `deadline`.
fn wait_log(
    c: &Coordinator,
    job: &str,
    deadline: Duration,
    cond: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let until = Instant::now() + deadline;
    loop {
        let log = log_bytes(c, job, &[]);
        if cond(&log) {
            return log;
        }
        assert!(
            Instant::now() < until,
            "log of {job} never matched; its last 2 KB: {}",
            String::from_utf8_lossy(&log[log.len().saturating_sub(2048)..])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A log between the cap's head (50 MiB) and the cap (100 MiB) used to keep its first
/// 50 MiB and silently drop the rest: the last line and the failing step's exit status.
#[test]
fn a_60_mb_log_keeps_its_last_line_and_exit_status_and_says_where_its_head_ended() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline(
        "jobs:\n  loud:\n    steps: [{ run: \"yes 'a line of output printed again and again' | head -c 60000000; echo; echo the very last line; exit 3\" }]\n",
        &[],
    );
    let view = c.wait_run(run, Duration::from_secs(180));
    assert_eq!(job_named(&view, "loud")["state"], "failed", "{view}");
    let job = format!("{run}.0");
    let log = wait_log(&c, &job, DEADLINE, |log| {
        contains(log, "step 1 exited with 3".as_bytes())
    });
    assert!(
        log.len() > 60_000_000,
        "the whole log is kept: {} bytes",
        log.len()
    );
    let end = String::from_utf8_lossy(&log[log.len() - 200..]).into_owned();
    assert!(
        end.contains("the very last line\n\u{2716} step 1 exited with 3\n"),
        "the last line and the exit status end the log: {end}"
    );
    assert!(
        contains(&log, b"[gantry: this log passed 50 MiB;"),
        "a note says where the head ended"
    );
}

/// A job printing its secret base64-encoded (alone, and after 1 and 2 other bytes, so
/// at each alignment), JSON-escaped and URL-encoded: the stored log holds none of it.
#[test]
fn encoded_forms_of_a_secret_are_masked_in_the_stored_log() {
    use base64::Engine as _;
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let value = "s3cr3t/t0ken value\"x";
    c.set_secret("API_TOKEN", value);
    let yaml = r#"jobs:
  leaky:
    steps:
      - run: |
          SECRET='${{ secrets.API_TOKEN }}'
          echo -n "$SECRET" | base64
          printf 'a%s' "$SECRET" | base64
          printf 'ab%s' "$SECRET" | base64 -w0; echo
          printf '{"token":"%s"}\n' "$(printf %s "$SECRET" | sed 's/"/\\"/g')"
          echo "url: s3cr3t%2Ft0ken%20value%22x"
          echo done
"#;
    let run = c.run_pipeline(yaml, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let job = format!("{run}.0");
    let log = wait_log(&c, &job, DEADLINE, |log| contains(log, b"done\n"));
    let text = String::from_utf8_lossy(&log).into_owned();
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    // The part of each encoding that only the secret's bytes decide (a few characters
    // at each edge mix in the bytes around it).
    let whole = b64(value.as_bytes());
    for (what, leaked) in [
        ("base64", &whole[..24]),
        (
            "base64 after 1 byte",
            &b64(format!("a{value}").as_bytes())[4..24],
        ),
        (
            "base64 after 2 bytes",
            &b64(format!("ab{value}").as_bytes())[4..24],
        ),
        ("JSON", r#"s3cr3t/t0ken value\"x"#),
        ("URL", "s3cr3t%2Ft0ken%20value%22x"),
        ("plain", value),
    ] {
        assert!(
            !text.contains(leaked),
            "{what} form leaked ({leaked}): {text}"
        );
    }
    assert!(text.contains("{\"token\":\"***\"}"), "{text}");
    assert!(text.contains("url: ***"), "{text}");
}

/// What a hostile job prints: a clipboard write (OSC 52), a title change, a screen
/// erase and a cursor move, with colours around them.
const HOSTILE: &str = r"jobs:
  hostile:
    steps:
      - run: |
          printf 'before \033]52;c;aGVsbG8=\007 \033]0;owned\007 \033[2J\033[1;1H \033[31mred\033[0m after\n'
";

/// `--raw` writes the stored bytes unchanged, escape sequences and all.
#[test]
fn logs_raw_writes_the_stored_bytes_unchanged() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline(HOSTILE, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let job = format!("{run}.0");
    let stored = wait_log(&c, &job, DEADLINE, |log| contains(log, b"after\n"));
    let expected: &[u8] =
        b"before \x1b]52;c;aGVsbG8=\x07 \x1b]0;owned\x07 \x1b[2J\x1b[1;1H \x1b[31mred\x1b[0m after\n";
    assert!(contains(&stored, expected), "{stored:?}");
    let raw = log_bytes(&c, &job, &["--raw"]);
    assert_eq!(raw, stored, "--raw is the stored log, byte for byte");

    // On a terminal (a pty from util-linux's `script`), only the colours stay live.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping the terminal case: `script` (util-linux) is not installed");
        return;
    }
    let shown = Command::new("script")
        .args(["-qec"])
        .arg(format!("{} logs {job}", bin("gantry").display()))
        .arg("/dev/null")
        .env("GANTRY_CONFIG", c.context())
        .env("GANTRY_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    assert!(shown.status.success(), "{shown:?}");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(
            r"before \x1b]52;c;aGVsbG8=\x07 \x1b]0;owned\x07 \x1b[2J\x1b[1;1H \x1b[31mred\x1b[0m after"
                .replace(r"\x1b[31m", "\x1b[31m")
                .replace(r"\x1b[0m", "\x1b[0m")
                .as_str()
        ),
        "{text:?}"
    );
    assert!(
        !shown.stdout.contains(&0x07),
        "no BEL reaches the terminal: {text:?}"
    );
    assert!(
        !contains(&shown.stdout, b"\x1b]") && !contains(&shown.stdout, b"\x1b[2J"),
        "{text:?}"
    );
}

/// A job's 1 GiB sparse file (a few bytes of data) is written sparse by
/// `gantry artifacts get`, not as 1 GiB of zeros.
#[test]
fn a_sparse_artifact_is_extracted_sparse() {
    use std::os::unix::fs::MetadataExt;
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline(
        "jobs:\n  sparse:\n    steps: [{ run: 'mkdir out && truncate -s 1G out/big && printf head | dd of=out/big conv=notrunc status=none && printf tail | dd of=out/big bs=1 seek=1073741820 conv=notrunc status=none' }]\n    artifacts: { name: holes, paths: [out] }\n",
        &[],
    );
    let view = c.wait_run(run, Duration::from_secs(180));
    assert_eq!(view["state"], "succeeded", "{view}");
    let dest = c.dir.path().join("got");
    c.gantry(&[
        "artifacts",
        "get",
        &run.to_string(),
        "holes",
        "-o",
        dest.to_str().expect("utf8"),
    ])
    .expect_code(0);
    let big = dest.join("out/big");
    let meta = std::fs::metadata(&big).expect("big");
    assert_eq!(meta.len(), 1 << 30, "its length is whole");
    assert!(
        meta.blocks() * 512 <= 4 * 1024 * 1024,
        "{} bytes allocated for a 1 GiB file holding 8 bytes",
        meta.blocks() * 512
    );
    let mut file = std::fs::File::open(&big).expect("open");
    let mut end = [0u8; 4];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::End(-4)).expect("seek");
    std::io::Read::read_exact(&mut file, &mut end).expect("read");
    assert_eq!(&end, b"tail");
}

/// `gantry artifacts get` into a filesystem too small for the artifact (a 4 MiB tmpfs,
/// mounted for the test: root only, else skipped) refuses before writing, naming the
/// size needed and the space available.
#[test]
fn an_artifact_larger_than_the_free_space_is_refused() {
    let c = Coordinator::start();
    let small = c.dir.path().join("small");
    std::fs::create_dir(&small).expect("mountpoint");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs (not root?)");
        return;
    }
    let _unmount = Unmount(small.clone());
    let _agents = c.agents_running(1, &[]);
    let run = c.run_pipeline(
        "jobs:\n  big:\n    steps: [{ run: 'mkdir out && head -c 8000000 /dev/urandom > out/big.bin' }]\n    artifacts: { name: big, paths: [out] }\n",
        &[],
    );
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    let dest = small.join("got");
    let out = c.gantry(&[
        "artifacts",
        "get",
        &run.to_string(),
        "big",
        "-o",
        dest.to_str().expect("utf8"),
    ]);
    assert_ne!(out.code, 0, "refused: {out:?}");
    assert!(
        out.stderr.contains("not enough free space in")
            && out.stderr.contains("the tree needs 7.6 MiB")
            && out.stderr.contains("are available"),
        "{}",
        out.stderr
    );
    assert!(
        std::fs::read_dir(&small).expect("list").count() == 0,
        "nothing left behind"
    );
}

/// Unmounts a filesystem mounted for a test when dropped (also when the test panics).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
