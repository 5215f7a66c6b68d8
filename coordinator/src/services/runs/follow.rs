//! Following a run or a job live: `gantry logs --follow` and `gantry run --follow` over
//! QUIC, and the dashboard's Server-Sent Events, get the same events in the same order.
//! Stored chunks first, then live ones; the store is the truth and the engine's change
//! feed only says when to look again, so a lagging follower reads the file instead and
//! never misses a chunk.

use std::collections::HashMap;
use std::time::Duration;

use gantry_protocol::{Attempt, FollowEvent, JobId, LogChunk, RunId};
use gantry_transport::{FrameWriter, TransportError};
use tokio::sync::broadcast;

use crate::base::error::admin_error;
use crate::base::logs::LiveLog;
use crate::services::engine::Change;
use crate::services::runs::{RunError, Runs};
use crate::store::{JobRecord, Store};

/// Most bytes of stored log sent per batch to a follower.
const FOLLOW_BATCH_BYTES: usize = 1024 * 1024;
/// How often a follower re-reads the job from the store, in case it missed a change.
const FOLLOW_RECHECK: Duration = Duration::from_millis(500);

/// Where a follow stream goes: an admin's QUIC stream, or a browser's Server-Sent
/// Events connection (`edges::http::dashboard`). Both get the same events in the same order.
pub trait FollowSink {
    type Error;
    fn send(
        &mut self,
        event: &FollowEvent,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send;
}

impl FollowSink for FrameWriter {
    type Error = TransportError;
    async fn send(&mut self, event: &FollowEvent) -> Result<(), TransportError> {
        FrameWriter::send(self, event).await
    }
}

impl Runs {
    /// Streams a job's log to an admin: stored chunks from `from_seq`, then (with `follow`)
    /// live chunks until the job has ended and its log is complete. A retried job's next
    /// attempt is followed on.
    pub async fn follow_logs<W: FollowSink + Send>(
        &self,
        job: JobId,
        from_seq: u64,
        follow: bool,
        writer: &mut W,
    ) -> Result<(), W::Error> {
        let mut changes = self.engine.subscribe();
        let mut record = match self.find_job(job) {
            Ok(r) => r,
            Err(e) => return writer.send(&FollowEvent::Error(admin_error(&e))).await,
        };
        let mut next = from_seq;
        let mut attempt = record.attempt;
        loop {
            if attempt == 0 {
                if !follow || record.state.is_terminal() {
                    return writer
                        .send(&FollowEvent::End {
                            state: record.state.to_string(),
                        })
                        .await;
                }
                record = wait_for_change(&self.store, &mut changes, job, &record).await;
                attempt = record.attempt;
                continue;
            }
            let log = match self.logs.open(job, attempt) {
                Ok(l) => l,
                Err(e) => {
                    return writer
                        .send(&FollowEvent::Error(admin_error(&RunError::Log(e))))
                        .await
                }
            };
            let mut live = log.subscribe();
            next = send_stored(&log, next, writer).await?;
            if !follow {
                return self.end_log(job, &record, next, writer).await;
            }
            loop {
                // A log that could not be stored in full ends where it stops once the job
                // has: its agent's resend may take as long as the disk stays full.
                let short = record.state.is_terminal() && self.logs.is_incomplete(job, attempt);
                if complete(&record, attempt, next) || (short && record.attempt == attempt) {
                    return self.end_log(job, &record, next, writer).await;
                }
                if record.attempt > attempt {
                    break;
                }
                tokio::select! {
                    chunk = live.recv() => match chunk {
                        Ok(chunk) if chunk.seq == next => {
                            next += 1;
                            writer.send(&FollowEvent::Log(chunk)).await?;
                        }
                        // Missed or out of order (a lagging follower): read the file instead.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => next = send_stored(&log, next, writer).await?,
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    change = changes.recv() => {
                        if let Ok(Change::Job(r)) = change {
                            if r.job == job {
                                record = r;
                            }
                        }
                    }
                    () = tokio::time::sleep(FOLLOW_RECHECK) => {
                        if let Ok(Some(r)) = self.store.job(job) {
                            record = r;
                        }
                        next = send_stored(&log, next, writer).await?;
                    }
                }
            }
            // A new attempt: its log starts at chunk 0.
            attempt = record.attempt;
            next = 0;
        }
    }

    /// Ends a log stream with the job's state, after a line saying the log is
    /// incomplete if part of it could not be stored and is still missing (`next`: the
    /// chunk after the last one sent; the note takes that number, never stored).
    async fn end_log<W: FollowSink + Send>(
        &self,
        job: JobId,
        record: &JobRecord,
        next: u64,
        writer: &mut W,
    ) -> Result<(), W::Error> {
        let whole = record.log_chunks.is_some_and(|n| next >= n);
        if record.attempt > 0 && !whole && self.logs.is_incomplete(job, record.attempt) {
            let note = "\n[gantry: this log is incomplete: the coordinator ran out of space storing it; the rest is stored when there is room and the agent sends it again]\n";
            writer
                .send(&FollowEvent::Log(LogChunk {
                    seq: next,
                    data: note.as_bytes().to_vec(),
                }))
                .await?;
        }
        writer
            .send(&FollowEvent::End {
                state: record.state.to_string(),
            })
            .await
    }

    /// Streams a run's job states to an admin until the run ends.
    pub async fn follow_run<W: FollowSink + Send>(
        &self,
        run: RunId,
        writer: &mut W,
    ) -> Result<(), W::Error> {
        let mut changes = self.engine.subscribe();
        let record = match self.find_run(run) {
            Ok(r) => r,
            Err(e) => return writer.send(&FollowEvent::Error(admin_error(&e))).await,
        };
        let mut last: HashMap<JobId, JobRecord> = HashMap::new();
        let mut state = record.state;
        let mut finished = record.finished_at.is_some();
        loop {
            // Sends whatever changed since the last look (the store is the truth; the change
            // feed only says when to look again).
            if let Ok(jobs) = self.store.jobs_of(run) {
                for j in jobs {
                    if last.get(&j.job) != Some(&j) {
                        last.insert(j.job, j.clone());
                        writer.send(&FollowEvent::Job(self.job_view(j))).await?;
                    }
                }
            }
            if finished {
                return writer
                    .send(&FollowEvent::End {
                        state: state.to_string(),
                    })
                    .await;
            }
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(Change::Run(r)) if r.run == run => {
                        state = r.state;
                        finished = r.finished_at.is_some();
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                () = tokio::time::sleep(FOLLOW_RECHECK) => {
                    if let Ok(Some(r)) = self.store.run(run) {
                        state = r.state;
                        finished = r.finished_at.is_some();
                    }
                }
            }
        }
    }
}

/// Whether the followed attempt has ended with every chunk sent.
fn complete(record: &JobRecord, attempt: Attempt, next: u64) -> bool {
    if record.attempt != attempt {
        return false;
    }
    match record.log_chunks {
        Some(n) => next >= n,
        // Ended without a report from its agent (lost, cancelled before it started).
        None => record.state.is_terminal(),
    }
}

async fn send_stored<W: FollowSink + Send>(
    log: &LiveLog,
    mut next: u64,
    writer: &mut W,
) -> Result<u64, W::Error> {
    loop {
        let chunks = match log.read_from(next, FOLLOW_BATCH_BYTES) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read a log: {e}");
                return Ok(next);
            }
        };
        if chunks.is_empty() {
            return Ok(next);
        }
        for chunk in chunks {
            next = chunk.seq + 1;
            writer.send(&FollowEvent::Log(chunk)).await?;
        }
    }
}

/// The job's record once it changes (the change feed, or the store at the next
/// recheck).
async fn wait_for_change(
    store: &Store,
    changes: &mut broadcast::Receiver<Change>,
    job: JobId,
    current: &JobRecord,
) -> JobRecord {
    loop {
        tokio::select! {
            change = changes.recv() => {
                if let Ok(Change::Job(r)) = change {
                    if r.job == job {
                        return r;
                    }
                }
            }
            () = tokio::time::sleep(FOLLOW_RECHECK) => {
                if let Ok(Some(r)) = store.job(job) {
                    if &r != current {
                        return r;
                    }
                }
            }
        }
    }
}
