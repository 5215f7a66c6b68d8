//! A job's log on this host: its output masked and cut into sequence-numbered chunks
//! spooled to disk ([`chunk_log`]), and the spool uploaded on a stream of its own from
//! where the coordinator's durable copy ends ([`upload`]), so a dropped connection
//! leaves no gap and no duplicate. Chunks the coordinator acknowledged are deleted.
//!
//! It knows nothing of jobs' steps or of which jobs run: the job manager feeds it
//! output and connections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_protocol::{Attempt, JobId, LogChunk, LogControl, StreamOpen};
use gantry_transport::{Connection, TransportError};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::base::mask::Masker;

/// Output is sent at least this often while a job prints.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Output is sent this long after the job stops writing (a line, a prompt), so live
/// followers see it at once while a burst still coalesces into one chunk.
pub const COALESCE: Duration = Duration::from_millis(5);
/// Largest chunk; a chunk is cut earlier when this much output is waiting.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// Default cap on one job's log: the first half and the last half are kept (a log
/// between the two is kept whole).
pub const DEFAULT_LOG_CAP_BYTES: u64 = 100 * 1024 * 1024;
/// Progress of one job's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogProgress {
    /// Chunks written to the spool: `0..produced`.
    pub produced: u64,
    /// Chunks the coordinator holds durably: `0..acked`.
    pub acked: u64,
    /// No more chunks will come.
    pub finished: bool,
}

impl LogProgress {
    /// Every chunk there will be is written and acknowledged.
    pub fn done(&self) -> bool {
        self.finished && self.acked >= self.produced
    }
}

/// Sends the spooled chunks of one job from where the coordinator's copy ends, then
/// every new chunk as it is written, until the job is finished and all is acknowledged.
pub async fn upload(
    conn: &Connection,
    (job, attempt): (JobId, Attempt),
    spool: &Path,
    progress: &watch::Sender<LogProgress>,
) -> Result<(), TransportError> {
    let (mut writer, mut reader) = conn.open_stream().await?;
    writer.send(&StreamOpen::Logs { job, attempt }).await?;
    let next_seq = match reader.recv::<LogControl>().await? {
        Some(LogControl::Resume { next_seq }) => next_seq,
        other => {
            return Err(TransportError::Lost(format!(
                "expected a log resume point, got {other:?}"
            )))
        }
    };
    acknowledge(spool, progress, next_seq);
    // Acknowledgements are read by their own task: a frame read is not cancel-safe.
    let acks = {
        let (spool, progress) = (spool.to_path_buf(), progress.clone());
        tokio::spawn(async move {
            while let Ok(Some(LogControl::Ack { next_seq } | LogControl::Resume { next_seq })) =
                reader.recv::<LogControl>().await
            {
                acknowledge(&spool, &progress, next_seq);
            }
        })
    };
    let mut acks = AbortOnDrop(acks);
    let mut watcher = progress.subscribe();
    let mut sent = next_seq;
    loop {
        let p = *watcher.borrow_and_update();
        while sent < p.produced {
            let data = std::fs::read(chunk_path(spool, sent)).map_err(|e| {
                TransportError::Lost(format!("spooled chunk {sent} unreadable: {e}"))
            })?;
            writer.send(&LogChunk { seq: sent, data }).await?;
            sent += 1;
        }
        if p.done() {
            writer.finish();
            return Ok(());
        }
        tokio::select! {
            changed = watcher.changed() => if changed.is_err() { return Ok(()) },
            // Acknowledgements stop when the stream or connection breaks. Once every chunk
            // is sent and the job is over nothing else wakes this loop, and an upload left
            // waiting here blocks every later one of this job (found by tests/crash.rs).
            _ = &mut acks.0 => {
                return Err(TransportError::Lost(
                    "the log stream ended before every chunk was acknowledged".into(),
                ))
            }
        }
    }
}

fn acknowledge(spool: &Path, progress: &watch::Sender<LogProgress>, next_seq: u64) {
    let before = progress.borrow().acked;
    for seq in before..next_seq {
        let _ = std::fs::remove_file(chunk_path(spool, seq));
    }
    progress.send_modify(|p| p.acked = p.acked.max(next_seq));
}

fn chunk_path(spool: &Path, seq: u64) -> PathBuf {
    spool.join(format!("{seq:012}.chunk"))
}

/// Masks output and cuts it into chunks: at most [`MAX_CHUNK_BYTES`], written at least
/// every [`FLUSH_INTERVAL`]. The first half of `cap` (the head) is sent as it comes; past
/// it, a note says so and the rest is held and sent when the output ends, whole if it is
/// at most the other half of `cap`, else its last half of `cap` after a line saying how
/// much of the middle was cut. Returns the number of chunks written.
pub async fn chunk_log(
    mut pieces: mpsc::Receiver<Vec<u8>>,
    mut masker: Masker,
    spool: PathBuf,
    progress: watch::Sender<LogProgress>,
    cap: u64,
) -> u64 {
    let mut state = Chunker {
        spool,
        progress,
        pending: Vec::new(),
        seq: 0,
        emitted: 0,
        head_limit: cap / 2,
        tail: std::collections::VecDeque::new(),
        tail_limit: usize::try_from(cap / 2).unwrap_or(usize::MAX),
        cut: 0,
        passed_head: false,
    };
    // A chunk goes out COALESCE after output pauses, or FLUSH_INTERVAL after its first
    // byte, or at MAX_CHUNK_BYTES, whichever is first: a line printed alone reaches
    // followers in milliseconds, and a flood still travels in large chunks.
    let mut first_byte_at: Option<tokio::time::Instant> = None;
    let mut last_byte_at = tokio::time::Instant::now();
    loop {
        let flush_at =
            first_byte_at.map(|first| (first + FLUSH_INTERVAL).min(last_byte_at + COALESCE));
        let wait = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            piece = pieces.recv() => match piece {
                Some(piece) => {
                    let visible = masker.push(&piece);
                    state.take(&visible);
                    last_byte_at = tokio::time::Instant::now();
                    if state.pending.is_empty() {
                        first_byte_at = None;
                    } else {
                        first_byte_at.get_or_insert(last_byte_at);
                    }
                    if state.pending.len() >= MAX_CHUNK_BYTES {
                        state.flush();
                        first_byte_at = None;
                    }
                }
                None => break,
            },
            () = wait => {
                state.flush();
                first_byte_at = None;
            }
        }
    }
    let rest = masker.finish();
    state.take(&rest);
    state.flush();
    // Whatever passed the head is sent now (after a note of what was cut, if anything
    // was): the end of a log (the last lines, the failing step's exit status) is what its
    // reader came for, so it is never dropped, whatever the size.
    if state.passed_head {
        if let Some(note) = state.cut_note() {
            state.pending.extend_from_slice(note.as_bytes());
        }
        let tail: Vec<u8> = state.tail.drain(..).collect();
        state.pending.extend_from_slice(&tail);
        state.flush();
    }
    state.seq
}

struct Chunker {
    spool: PathBuf,
    progress: watch::Sender<LogProgress>,
    pending: Vec<u8>,
    seq: u64,
    emitted: u64,
    head_limit: u64,
    tail: std::collections::VecDeque<u8>,
    tail_limit: usize,
    cut: u64,
    /// Output went past the head: it is held (its last `tail_limit` bytes) until the end.
    passed_head: bool,
}

impl Chunker {
    /// What is said between the head and the held tail when the middle was cut.
    fn cut_note(&self) -> Option<String> {
        let mib = |b: u64| b / (1024 * 1024);
        (self.cut > 0).then(|| {
            format!(
                "[gantry: {} bytes were cut from the middle of this log; the first {} MiB and the last {} MiB are kept]\n",
                self.cut,
                mib(self.head_limit),
                mib(self.tail_limit as u64)
            )
        })
    }

    /// A note, once, where the head ends, sent at once: followers see why live output
    /// stops there, and every log longer than its head says so, cut or not.
    fn note_head_passed(&mut self) {
        if !self.passed_head {
            self.passed_head = true;
            let note = format!(
                "\n[gantry: this log passed {} MiB; what follows is sent when the job ends (its last {} MiB if it is longer)]\n",
                self.head_limit / (1024 * 1024),
                self.tail_limit / (1024 * 1024)
            );
            self.pending.extend_from_slice(note.as_bytes());
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = usize::try_from(
            self.head_limit
                .saturating_sub(self.emitted + self.pending.len() as u64),
        )
        .unwrap_or(usize::MAX);
        let (head, rest) = bytes.split_at(room.min(bytes.len()));
        self.pending.extend_from_slice(head);
        if rest.is_empty() {
            return;
        }
        self.note_head_passed();
        self.tail.extend(rest);
        if self.tail.len() > self.tail_limit {
            let excess = self.tail.len() - self.tail_limit;
            self.tail.drain(..excess);
            self.cut += excess as u64;
        }
    }

    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(MAX_CHUNK_BYTES);
            let chunk: Vec<u8> = self.pending.drain(..n).collect();
            if let Err(e) = std::fs::write(chunk_path(&self.spool, self.seq), &chunk) {
                warn!("cannot spool log chunk {}: {e}; output is lost", self.seq);
                continue;
            }
            self.emitted += chunk.len() as u64;
            self.seq += 1;
            let seq = self.seq;
            self.progress.send_modify(|p| p.produced = seq);
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_chunker_keeps_head_and_tail_and_says_what_was_cut() {
        let pieces = (0..30u8).map(|i| vec![b'a' + (i % 26); 100]).collect();
        let (text, chunks, produced) = chunk_all(pieces, 1000).await;
        assert!(text.starts_with(&"a".repeat(100)), "head kept");
        assert!(
            text.contains("[gantry: 2000 bytes were cut from the middle of this log"),
            "{text}"
        );
        assert!(text.ends_with(&"d".repeat(100)), "tail kept: {text}");
        assert_eq!(produced, chunks);
    }

    async fn chunked(pieces: Vec<Vec<u8>>, cap: u64) -> String {
        chunk_all(pieces, cap).await.0
    }

    /// The log `pieces` come to under `cap`, the chunks it took and the chunks the
    /// progress says were produced.
    async fn chunk_all(pieces: Vec<Vec<u8>>, cap: u64) -> (String, u64, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel(16);
        let (progress, _) = watch::channel(LogProgress::default());
        let task = tokio::spawn(chunk_log(
            rx,
            Masker::new([]),
            dir.path().to_path_buf(),
            progress.clone(),
            cap,
        ));
        for piece in pieces {
            tx.send(piece).await.expect("send");
        }
        drop(tx);
        let chunks = task.await.expect("chunker");
        let mut log = Vec::new();
        for seq in 0..chunks {
            log.extend(std::fs::read(chunk_path(dir.path(), seq)).expect("chunk"));
        }
        let produced = progress.borrow().produced;
        (String::from_utf8(log).expect("utf8"), chunks, produced)
    }

    /// A log longer than the head but within the cap used to lose everything past the
    /// head without a word (its last lines and exit status included).
    #[tokio::test]
    async fn a_log_between_head_and_cap_is_kept_whole_with_a_note_where_the_head_ends() {
        let body: Vec<Vec<u8>> = (0..7u8).map(|i| vec![b'a' + i; 100]).collect();
        let mut pieces = body.clone();
        pieces.push(b"last line\nstep 1 exited with 3\n".to_vec());
        let text = chunked(pieces, 1000).await;
        let note = "\n[gantry: this log passed 0 MiB; what follows is sent when the job ends";
        let at = text
            .find(note)
            .unwrap_or_else(|| panic!("note missing: {text}"));
        assert_eq!(at, 500, "the note is where the head ends");
        let without_note: String = text[..at].to_owned()
            + text[at + 1..]
                .split_once('\n')
                .map(|(_, rest)| rest)
                .expect("note line");
        let expected: Vec<u8> = body.concat();
        assert!(
            without_note.starts_with(std::str::from_utf8(&expected).expect("utf8")),
            "every byte kept: {text}"
        );
        assert!(
            text.ends_with("last line\nstep 1 exited with 3\n"),
            "{text}"
        );
        assert!(!text.contains("were cut"), "nothing was cut: {text}");
        // At most the head: no note at all.
        let small = chunked(vec![b"short\n".to_vec()], 1000).await;
        assert_eq!(small, "short\n");
    }

    /// Every size past the head keeps the end; past the cap the cut is said.
    #[tokio::test]
    async fn every_size_past_the_head_keeps_the_last_line() {
        for total in [600usize, 999, 1000, 1001, 1500, 5000] {
            let mut pieces: Vec<Vec<u8>> = vec![vec![b'x'; total - 5]];
            pieces.push(b"END!\n".to_vec());
            let text = chunked(pieces, 1000).await;
            assert!(text.ends_with("END!\n"), "{total}: {text}");
            assert!(text.contains("[gantry: this log passed"), "{total}");
            assert_eq!(text.contains("were cut"), total > 1000, "{total}: {text}");
        }
    }
}
