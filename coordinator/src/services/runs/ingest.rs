//! What an agent sends and fetches for a job attempt on streams of their own: its log
//! (resume point, chunks, acknowledgements after fsync), its run's source tree, and its
//! test and coverage report files (read by `gantry-reports`, summary stored, then
//! answered). All are refused unless the attempt was handed to that agent.

use gantry_protocol::{
    AgentId, Attempt, CloseCode, JobId, LogChunk, LogControl, ReportUpload, ReportsStored, RunId,
};
use gantry_transport::{FrameReader, FrameWriter, TransportError};
use tokio::sync::mpsc;

use crate::base::authz::{Denied, Principal, Request};
use crate::base::disk::OutOfSpace;
use crate::base::logs::{Appended, LogError};
use crate::base::tasks::AbortOnDrop;
use crate::services::holds::{self, Hold};
use crate::services::runs::Runs;
use crate::store::StoreError;

/// Chunks written, synced and acknowledged together (one fsync per batch).
const LOG_BATCH: usize = 256;

/// Why a log or source stream ended early. Only logged: the agent sends its log again
/// from the last acknowledged chunk, and fetches the source again.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Refused(#[from] Denied),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the log writer stopped: {0}")]
    Writer(#[from] tokio::task::JoinError),
    #[error("no run {0}")]
    NoRun(RunId),
    #[error("run {0} has no source tree")]
    NoSource(RunId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    OutOfSpace(OutOfSpace),
    #[error("the report stream ended before its end")]
    ReportsCut,
    #[error("the report reader stopped: {0}")]
    ReportTask(tokio::task::JoinError),
}

impl Runs {
    /// Asks the authorization table whether `agent` may make `row` for an attempt: it
    /// holds the work if the attempt was handed to it (its log may come after the attempt
    /// ended, from its spool).
    fn handed_to(
        &self,
        row: Request,
        agent: &AgentId,
        job: JobId,
        attempt: Attempt,
    ) -> Result<(), Denied> {
        let (holds, why) = holds::attempt_or_why(&self.store, agent, job, attempt, Hold::Handed);
        self.metrics
            .authz
            .check(row, Principal::agent(holds), || why)
    }

    /// Receives one job attempt's log from an agent: resume point, chunks,
    /// acknowledgements after fsync. Refused unless the attempt was handed to this agent.
    pub async fn receive_log(
        &self,
        agent: &AgentId,
        job: JobId,
        attempt: Attempt,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) -> Result<(), IngestError> {
        if let Err(denied) = self.handed_to(Request::StreamLogs, agent, job, attempt) {
            writer.reset(CloseCode::Unauthorized);
            reader.stop(CloseCode::Unauthorized);
            return Err(denied.into());
        }
        let log = self.logs.open(job, attempt)?;
        // The agent drops what it holds below the resume point, so that point must be
        // durable: chunks written by a stream that broke before its fsync are synced here
        // (a no-op when nothing is pending), never acknowledged unsynced.
        let synced = log.clone();
        let next_seq = tokio::task::spawn_blocking(move || synced.sync()).await??;
        writer.send(&LogControl::Resume { next_seq }).await?;
        let (tx, mut rx) = mpsc::channel::<Result<Option<LogChunk>, TransportError>>(64);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let item = reader.recv::<LogChunk>().await;
                let last = !matches!(item, Ok(Some(_)));
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        }));
        let mut done = false;
        while !done {
            let Some(first) = rx.recv().await else { break };
            // Everything already received is written, then synced once and acknowledged
            // once: one fsync per batch, not per chunk.
            let mut batch = vec![first];
            while batch.len() < LOG_BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            for item in batch {
                match item? {
                    Some(chunk) => match log.append(chunk.seq, &chunk.data) {
                        Ok(Appended::Stored) => self.metrics.log_bytes(chunk.data.len() as u64),
                        Ok(Appended::Duplicate) => {}
                        Err(e) => return Err(self.log_short((job, attempt), log.next_seq(), e)),
                    },
                    None => done = true,
                }
            }
            let log2 = log.clone();
            let next = match tokio::task::spawn_blocking(move || log2.sync()).await? {
                Ok(next) => next,
                Err(e) => return Err(self.log_short((job, attempt), log.next_seq(), e)),
            };
            writer.send(&LogControl::Ack { next_seq: next }).await?;
        }
        // The agent ends the stream once every chunk is acknowledged: the log is whole,
        // whatever an earlier stream could not store.
        if done && self.logs.is_incomplete(job, attempt) {
            self.logs.mark_complete(job, attempt);
            tracing::info!(%job, attempt, "the log is complete again: the agent resent what could not be stored");
        }
        writer.finish();
        Ok(())
    }

    /// A chunk from `seq` on could not be stored. When the disk is full the log is marked
    /// incomplete (the job's view and the end of its log say so) and the error names the
    /// cause; the agent keeps its spool and sends again, which completes the log once
    /// there is room.
    fn log_short(&self, (job, attempt): (JobId, Attempt), seq: u64, e: LogError) -> IngestError {
        let full = match &e {
            LogError::Io { path, source } => self
                .disk
                .out_of_space(&format!("storing the log {path}"), source),
            LogError::Gap { .. } | LogError::TooLarge { .. } => None,
        };
        let Some(full) = full else { return e.into() };
        if self.logs.mark_incomplete(job, attempt, seq) {
            tracing::warn!(%job, attempt, seq, "the log is incomplete: {full}");
        }
        IngestError::OutOfSpace(full)
    }

    /// Receives an attempt's report files, reads them one at a time into a summary,
    /// stores it durably and answers with it. A file that cannot be read becomes a note of
    /// the summary; the job's outcome is the agent's, whatever its reports say.
    pub async fn receive_reports(
        &self,
        agent: &AgentId,
        job: JobId,
        attempt: Attempt,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) -> Result<(), IngestError> {
        if let Err(denied) = self.handed_to(Request::StreamReports, agent, job, attempt) {
            let message = denied.to_string();
            let _ = writer.send(&ReportsStored::Refused { message }).await;
            writer.finish();
            reader.stop(CloseCode::Unauthorized);
            return Err(denied.into());
        }
        let mut read = gantry_reports::Reader::new(attempt);
        loop {
            match reader.recv::<ReportUpload>().await? {
                Some(ReportUpload::File { kind, path, data }) => {
                    // Parsing a few MiB of XML is CPU work: off the async workers.
                    read = tokio::task::spawn_blocking(move || {
                        read.file(kind, &path, &data);
                        read
                    })
                    .await
                    .map_err(IngestError::ReportTask)?;
                }
                Some(ReportUpload::Note(note)) => read.note(&note),
                Some(ReportUpload::End) => break,
                None => return Err(IngestError::ReportsCut),
            }
        }
        let report = read.finish();
        let store = self.store.clone();
        let stored = report.clone();
        tokio::task::spawn_blocking(move || store.put_job_report(job, &stored))
            .await
            .map_err(IngestError::ReportTask)??;
        tracing::info!(%job, attempt, "test reports: {}", report.summary());
        writer.send(&ReportsStored::Stored(report)).await?;
        writer.finish();
        Ok(())
    }

    /// Sends the source tree of a job attempt's run to the agent it was handed to.
    pub async fn send_source(
        &self,
        agent: &AgentId,
        job: JobId,
        attempt: Attempt,
        writer: &mut FrameWriter,
    ) -> Result<(), IngestError> {
        if let Err(denied) = self.handed_to(Request::StreamFetchSource, agent, job, attempt) {
            writer.reset(CloseCode::Unauthorized);
            return Err(denied.into());
        }
        let run = self
            .store
            .run(job.run)?
            .ok_or(IngestError::NoRun(job.run))?;
        let source = run.source.ok_or(IngestError::NoSource(job.run))?;
        Ok(self.sources.send(&source, writer).await?)
    }
}
