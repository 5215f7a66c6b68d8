//! Job logs on the coordinator: one append-only file per job attempt, and live followers.
//!
//! Owns the files under `DATA_DIR/logs/<run>/<index>-<attempt>.log`. Each record is a
//! chunk as the agent numbered it: `seq` (u64 LE), `len` (u32 LE), then `len` bytes. A
//! chunk is acknowledged to the agent only after [`LiveLog::sync`] has fsynced the file, so
//! an acknowledged chunk survives a crash; a torn record at the end of a file (a crash
//! mid-write, never acknowledged) is cut off when the file is opened again. Chunks must
//! arrive in order: a repeat of a stored chunk is ignored, a gap is refused.
//!
//! A write or fsync that fails leaves the file as it was after the last good sync (a
//! half-written record is cut off at once), so the agent's resend lands where it should.
//! A log whose chunks could not be stored for lack of space is *incomplete*
//! ([`LogStore::mark_incomplete`]): said by the job's view and at the end of its log
//! until the agent's resend completes it. The mark is kept in memory and, where the
//! disk allows, in a marker file beside the log (`<index>-<attempt>.incomplete`), so it
//! outlives a restart.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use gantry_protocol::{Attempt, JobId, LogChunk};
use tokio::sync::broadcast;

const RECORD_HEADER: usize = 12;
/// Largest chunk accepted (agents cut at 64 KiB).
pub const MAX_CHUNK: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("log chunk {got} arrived but chunk {expected} is next: chunks must arrive in order")]
    Gap { expected: u64, got: u64 },
    #[error("log chunk {seq} has {len} bytes, over the {MAX_CHUNK}-byte limit")]
    TooLarge { seq: u64, len: usize },
}

/// What happened to an appended chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// Already stored (the agent resent it after a reconnect); ignored.
    Duplicate,
}

/// An open log: its file, how many chunks it holds, and who is following it.
#[derive(Debug)]
pub struct LiveLog {
    path: PathBuf,
    state: Mutex<LogState>,
    followers: broadcast::Sender<LogChunk>,
}

#[derive(Debug)]
struct LogState {
    file: File,
    /// Byte offset of each stored chunk's record: chunk `seq` starts at `offsets[seq]`.
    /// 8 bytes per chunk (a 100 MiB log has ~1,700), so a reader can seek straight to
    /// any chunk instead of reading the file from the start.
    offsets: Vec<u64>,
    /// Where the next record goes.
    end: u64,
    bytes: u64,
    unsynced: bool,
    /// Chunks, end and bytes as of the last good sync: what a failed write or fsync
    /// rolls back to.
    synced: (usize, u64, u64),
}

impl LogState {
    /// Forgets everything written since the last good sync, on disk and in the index: a
    /// failed write may have left half a record, and after a failed fsync the kernel may
    /// have dropped the pages, so the agent sends those chunks again.
    fn roll_back(&mut self) -> std::io::Result<()> {
        let (chunks, end, bytes) = self.synced;
        self.offsets.truncate(chunks);
        self.end = end;
        self.bytes = bytes;
        self.unsynced = false;
        self.file.set_len(end)
    }
}

impl LiveLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn io(&self) -> impl Fn(std::io::Error) -> LogError + '_ {
        move |source| LogError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The first chunk not stored yet.
    pub fn next_seq(&self) -> u64 {
        self.lock().offsets.len() as u64
    }

    /// Bytes of output stored.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Appends chunk `seq` (not yet durable: call [`Self::sync`] before acknowledging).
    pub fn append(&self, seq: u64, data: &[u8]) -> Result<Appended, LogError> {
        if data.len() > MAX_CHUNK {
            return Err(LogError::TooLarge {
                seq,
                len: data.len(),
            });
        }
        let mut st = self.lock();
        let next_seq = st.offsets.len() as u64;
        if seq < next_seq {
            return Ok(Appended::Duplicate);
        }
        if seq > next_seq {
            return Err(LogError::Gap {
                expected: next_seq,
                got: seq,
            });
        }
        let mut record = Vec::with_capacity(RECORD_HEADER + data.len());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
        record.extend_from_slice(data);
        if let Err(e) = st.file.write_all(&record) {
            if let Err(cut) = st.roll_back() {
                tracing::warn!(path = %self.path.display(), "cannot cut a half-written log record off: {cut}");
            }
            return Err(self.io()(e));
        }
        let at = st.end;
        st.offsets.push(at);
        st.end += record.len() as u64;
        st.bytes += data.len() as u64;
        st.unsynced = true;
        drop(st);
        // Followers see a chunk as soon as it is written; only acknowledgement waits for fsync.
        let _ = self.followers.send(LogChunk {
            seq,
            data: data.to_vec(),
        });
        Ok(Appended::Stored)
    }

    /// Makes every appended chunk durable; returns the new acknowledgement point.
    pub fn sync(&self) -> Result<u64, LogError> {
        let mut st = self.lock();
        if st.unsynced {
            if let Err(e) = st.file.sync_data() {
                if let Err(cut) = st.roll_back() {
                    tracing::warn!(path = %self.path.display(), "cannot cut unsynced log records off: {cut}");
                }
                return Err(self.io()(e));
            }
            st.unsynced = false;
            st.synced = (st.offsets.len(), st.end, st.bytes);
        }
        Ok(st.offsets.len() as u64)
    }

    /// Subscribes to chunks appended from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LogChunk> {
        self.followers.subscribe()
    }

    /// Stored chunks from `from_seq` on, a contiguous run of at most `max_bytes` (at
    /// least one chunk if there is any).
    pub fn read_from(&self, from_seq: u64, max_bytes: usize) -> Result<Vec<LogChunk>, LogError> {
        let (start, end) = {
            let st = self.lock();
            match usize::try_from(from_seq)
                .ok()
                .and_then(|i| st.offsets.get(i))
            {
                Some(&start) => (start, st.end),
                None => return Ok(Vec::new()),
            }
        };
        let mut file = File::open(&self.path).map_err(self.io())?;
        file.seek(SeekFrom::Start(start)).map_err(self.io())?;
        let mut reader = std::io::BufReader::new(file);
        let mut out = Vec::new();
        let (mut pos, mut out_bytes, mut seq) = (start, 0usize, from_seq);
        while pos + RECORD_HEADER as u64 <= end {
            let mut header = [0u8; RECORD_HEADER];
            reader.read_exact(&mut header).map_err(self.io())?;
            let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
            if !out.is_empty() && out_bytes + len > max_bytes {
                break;
            }
            let mut data = vec![0u8; len.min(MAX_CHUNK)];
            reader.read_exact(&mut data).map_err(self.io())?;
            out.push(LogChunk { seq, data });
            out_bytes += len;
            pos += (RECORD_HEADER + len) as u64;
            seq += 1;
        }
        Ok(out)
    }
}

/// Reads the record headers of a log file (skipping payloads); returns each whole
/// record's offset and where whole records end. A torn or foreign record ends the scan.
fn index(file: &mut File) -> std::io::Result<(Vec<u64>, u64)> {
    let file_len = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::new(file);
    let mut offsets = Vec::new();
    let mut pos = 0u64;
    loop {
        let mut header = [0u8; RECORD_HEADER];
        if pos + RECORD_HEADER as u64 > file_len || reader.read_exact(&mut header).is_err() {
            break;
        }
        let seq = u64::from_le_bytes([
            header[0], header[1], header[2], header[3], header[4], header[5], header[6], header[7],
        ]);
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if seq != offsets.len() as u64
            || len > MAX_CHUNK
            || pos + (RECORD_HEADER + len) as u64 > file_len
        {
            break;
        }
        reader.seek_relative(i64::try_from(len).unwrap_or(i64::MAX))?;
        offsets.push(pos);
        pos += (RECORD_HEADER + len) as u64;
    }
    Ok((offsets, pos))
}

/// Every job log of a coordinator.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    /// Logs in use. Weak, so a log nobody holds (no upload, no follower) is closed and
    /// forgotten instead of keeping its file handle and index for the coordinator's life.
    open: Mutex<HashMap<(JobId, Attempt), Weak<LiveLog>>>,
    /// Logs marked incomplete by this process (the marker files may not have been
    /// writable), with the first chunk that could not be stored.
    incomplete: Mutex<HashMap<(JobId, Attempt), u64>>,
}

impl LogStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
            incomplete: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, job: JobId, attempt: Attempt) -> PathBuf {
        self.dir
            .join(job.run.to_string())
            .join(format!("{}-{attempt}.log", job.index))
    }

    fn marker(&self, job: JobId, attempt: Attempt) -> PathBuf {
        self.path(job, attempt).with_extension("incomplete")
    }

    fn incomplete_set(&self) -> std::sync::MutexGuard<'_, HashMap<(JobId, Attempt), u64>> {
        self.incomplete
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks a log incomplete: chunk `seq` (and what follows) could not be stored.
    /// Returns whether the mark is new. The marker file is written where the disk allows
    /// (an empty file usually fits where a chunk did not); the mark holds in memory either way.
    pub fn mark_incomplete(&self, job: JobId, attempt: Attempt, seq: u64) -> bool {
        let new = self.incomplete_set().insert((job, attempt), seq).is_none();
        let marker = self.marker(job, attempt);
        if new && !marker.exists() {
            if let Err(e) = std::fs::write(&marker, seq.to_string()) {
                tracing::warn!(path = %marker.display(), "cannot write the marker of an incomplete log (the mark holds until a restart): {e}");
            }
        }
        new
    }

    /// The log holds every chunk again (the agent's resend got through): the mark goes.
    pub fn mark_complete(&self, job: JobId, attempt: Attempt) {
        self.incomplete_set().remove(&(job, attempt));
        match std::fs::remove_file(self.marker(job, attempt)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(job = %job, attempt, "cannot remove the marker of a log now complete: {e}");
            }
            _ => {}
        }
    }

    /// Whether the log of this attempt is marked incomplete.
    pub fn is_incomplete(&self, job: JobId, attempt: Attempt) -> bool {
        self.incomplete_set().contains_key(&(job, attempt)) || self.marker(job, attempt).exists()
    }

    /// Opens (creating if needed) the log of a job attempt, cutting off a torn tail.
    pub fn open(&self, job: JobId, attempt: Attempt) -> Result<Arc<LiveLog>, LogError> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(log) = open.get(&(job, attempt)).and_then(Weak::upgrade) {
            return Ok(log);
        }
        open.retain(|_, log| log.strong_count() > 0);
        let path = self.path(job, attempt);
        let io = |source| LogError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let (offsets, end) = index(&mut file).map_err(io)?;
        if file.metadata().map_err(io)?.len() > end {
            tracing::warn!(path = %path.display(), "cutting a torn record off the end of a log (it was never acknowledged)");
            file.set_len(end).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        let bytes = end - offsets.len() as u64 * RECORD_HEADER as u64;
        let offsets_len = offsets.len();
        let (followers, _) = broadcast::channel(1024);
        let log = Arc::new(LiveLog {
            path,
            state: Mutex::new(LogState {
                file,
                offsets,
                end,
                bytes,
                unsynced: false,
                synced: (offsets_len, end, bytes),
            }),
            followers,
        });
        open.insert((job, attempt), Arc::downgrade(&log));
        Ok(log)
    }

    /// How many logs are open (held by an upload or a follower).
    #[cfg(test)]
    pub fn open_count(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|l| l.strong_count() > 0)
            .count()
    }

    /// Whether a log exists for this attempt (without creating it).
    pub fn exists(&self, job: JobId, attempt: Attempt) -> bool {
        self.path(job, attempt).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::RunId;

    const JOB: JobId = JobId {
        run: RunId(7),
        index: 2,
    };

    #[test]
    fn chunks_append_in_order_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::new(dir.path());
        let log = store.open(JOB, 1).expect("open");
        assert_eq!(log.append(0, b"hello ").expect("0"), Appended::Stored);
        assert_eq!(log.append(1, b"world\n").expect("1"), Appended::Stored);
        assert_eq!(log.append(1, b"world\n").expect("dup"), Appended::Duplicate);
        assert!(matches!(
            log.append(5, b"x"),
            Err(LogError::Gap {
                expected: 2,
                got: 5
            })
        ));
        assert_eq!(log.sync().expect("sync"), 2);
        drop(log);
        // A crash mid-write leaves half a record.
        let path = dir.path().join("7").join("2-1.log");
        let mut f = OpenOptions::new().append(true).open(&path).expect("file");
        f.write_all(&2u64.to_le_bytes()).expect("torn");
        f.write_all(&[9, 0]).expect("torn");
        drop(f);
        let log = store.open(JOB, 1).expect("reopen");
        assert_eq!(log.next_seq(), 2);
        assert_eq!(log.bytes(), 12);
        let text: Vec<u8> = log
            .read_from(0, usize::MAX)
            .expect("read")
            .into_iter()
            .flat_map(|c| c.data)
            .collect();
        assert_eq!(text, b"hello world\n");
        assert_eq!(log.append(2, b"!").expect("2"), Appended::Stored);
        assert_eq!(
            log.read_from(1, 1).expect("read").len(),
            1,
            "max_bytes still returns one chunk"
        );
    }

    #[test]
    fn a_log_nobody_holds_is_closed_and_reopens_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::new(dir.path());
        let log = store.open(JOB, 1).expect("open");
        log.append(0, b"kept").expect("append");
        log.sync().expect("sync");
        let again = store.open(JOB, 1).expect("shared");
        assert!(Arc::ptr_eq(&log, &again), "one instance while it is in use");
        drop((log, again));
        for attempt in 2..50 {
            drop(store.open(JOB, attempt).expect("open"));
        }
        assert_eq!(
            store.open_count(),
            0,
            "no handle kept for logs nobody holds"
        );
        let reopened = store.open(JOB, 1).expect("reopen");
        assert_eq!(reopened.next_seq(), 1);
        assert_eq!(reopened.bytes(), 4);
    }

    #[test]
    fn an_incomplete_mark_outlives_a_restart_and_goes_when_the_log_is_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::new(dir.path());
        drop(store.open(JOB, 1).expect("open"));
        assert!(!store.is_incomplete(JOB, 1));
        assert!(store.mark_incomplete(JOB, 1, 3), "a new mark");
        assert!(!store.mark_incomplete(JOB, 1, 4), "already marked");
        assert!(
            !store.is_incomplete(JOB, 2),
            "another attempt is not marked"
        );
        let restarted = LogStore::new(dir.path());
        assert!(restarted.is_incomplete(JOB, 1), "the marker file holds it");
        restarted.mark_complete(JOB, 1);
        assert!(!restarted.is_incomplete(JOB, 1));
        assert!(!LogStore::new(dir.path()).is_incomplete(JOB, 1));
    }

    #[tokio::test]
    async fn followers_see_chunks_as_they_are_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::new(dir.path());
        let log = store.open(JOB, 1).expect("open");
        let mut rx = log.subscribe();
        log.append(0, b"live").expect("append");
        assert_eq!(
            rx.recv().await.expect("chunk"),
            LogChunk {
                seq: 0,
                data: b"live".to_vec()
            }
        );
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use gantry_protocol::RunId;

    #[test]
    fn reading_in_batches_returns_every_chunk_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::new(dir.path());
        let job = JobId {
            run: RunId(1),
            index: 0,
        };
        let log = store.open(job, 1).expect("open");
        // Uneven sizes, as real output makes them: a small chunk after a large one that
        // did not fit must not be sent ahead of it.
        let sizes: Vec<usize> = (0..100)
            .map(|i| if i % 3 == 0 { 8_192 } else { 65_536 })
            .collect();
        for (seq, size) in sizes.iter().enumerate() {
            log.append(seq as u64, &vec![b'x'; *size]).expect("append");
        }
        let mut next = 0;
        let mut total = 0;
        loop {
            let chunks = log.read_from(next, 1024 * 1024).expect("read");
            if chunks.is_empty() {
                break;
            }
            for c in chunks {
                assert_eq!(c.seq, next);
                next += 1;
                total += c.data.len();
            }
        }
        assert_eq!(next, 100);
        assert_eq!(total, sizes.iter().sum::<usize>());
    }
}
