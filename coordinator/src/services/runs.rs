//! Pipeline runs from the outside: admin requests about runs, jobs and secrets, job log
//! uploads from agents, and follow streams for `gantry logs --follow` and `gantry run
//! --follow`.
//!
//! Owns the checks made before anything is stored (the pipeline parses, its inputs and
//! secrets exist, an approval is for a job that waits for one) and the rule that an
//! agent may upload logs only for attempts handed to it. Scheduling itself is the
//! engine's; storage is the store's and the log store's.

use std::sync::Arc;
use std::time::Duration;

use gantry_protocol::{
    AdminError, AdminErrorKind, AdminRequest, AdminResponse, AgentId, Attempt, FollowEvent, JobId,
    JobView, LogChunk, LogControl, RunId, RunView, SubmitRun, UnixMillis,
};
use gantry_scheduler::Event;
use gantry_transport::{FrameReader, FrameWriter, TransportError};
use tokio::sync::{broadcast, mpsc};

use crate::engine::{self, Change, Input};
use crate::quic::{AbortOnDrop, Coordinator};
use crate::store::{AuditEntry, JobRecord, RunRecord, StoreError};

/// Most runs or jobs one listing returns.
const MAX_LIST: u32 = 1000;
/// Most bytes of stored log sent per batch to a follower.
const FOLLOW_BATCH_BYTES: usize = 1024 * 1024;
/// How often a follower re-reads the job from the store, in case it missed a change.
const FOLLOW_RECHECK: Duration = Duration::from_millis(500);

pub(crate) fn invalid(message: String) -> AdminError {
    AdminError {
        kind: AdminErrorKind::InvalidInput,
        message,
    }
}

pub(crate) fn not_found(message: String) -> AdminError {
    AdminError {
        kind: AdminErrorKind::NotFound,
        message,
    }
}

#[allow(clippy::needless_pass_by_value)] // used as map_err(internal)
pub(crate) fn internal(e: StoreError) -> AdminError {
    AdminError {
        kind: AdminErrorKind::Internal,
        message: e.to_string(),
    }
}

/// Where a follow stream goes: an admin's QUIC stream, or a browser's Server-Sent
/// Events connection (`dashboard.rs`). Both get the same events in the same order.
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

/// Answers the run, job and secret requests of an admin.
pub fn admin(
    coord: &Coordinator,
    actor: &str,
    req: AdminRequest,
) -> Result<AdminResponse, AdminError> {
    let now = UnixMillis::now();
    let audit = |action: &str, detail: String| AuditEntry {
        at: now,
        actor: actor.to_owned(),
        action: action.to_owned(),
        detail,
    };
    match req {
        AdminRequest::Validate { file_name, text } => {
            let pipeline =
                gantry_pipeline::parse(&file_name, &text).map_err(|e| invalid(e.to_string()))?;
            Ok(AdminResponse::Validated {
                jobs: pipeline.jobs.iter().map(|j| j.name.clone()).collect(),
            })
        }
        AdminRequest::SubmitRun(submit) => submit_run(coord, actor, submit).map(AdminResponse::Run),
        AdminRequest::ListRuns { limit } => {
            let runs = coord
                .store
                .runs(limit.clamp(1, MAX_LIST) as usize)
                .map_err(internal)?;
            let views = runs
                .into_iter()
                .map(|r| run_view(coord, r))
                .collect::<Result<_, _>>()?;
            Ok(AdminResponse::Runs(views))
        }
        AdminRequest::ShowRun { run } => {
            Ok(AdminResponse::Run(run_view(coord, find_run(coord, run)?)?))
        }
        AdminRequest::CancelRun { run } => {
            let record = find_run(coord, run)?;
            if record.finished_at.is_some() {
                return Err(invalid(format!(
                    "run {run} already ended ({})",
                    record.state
                )));
            }
            coord
                .store
                .audit(&audit("run.cancel", format!("run={run}")))
                .map_err(internal)?;
            coord.engine.event(Event::CancelRun { run });
            Ok(AdminResponse::Done {
                message: format!("cancelling run {run}"),
            })
        }
        AdminRequest::RetryRun { run } => {
            let record = find_run(coord, run)?;
            let again = SubmitRun {
                file_name: record.file_name,
                text: record.text,
                git_ref: record.git_ref,
                commit: record.commit,
                event: record.event,
                inputs: record.inputs,
                source: record.source,
            };
            submit_run(coord, actor, again).map(AdminResponse::Run)
        }
        AdminRequest::ListJobs { run, limit } => {
            let runs = match run {
                Some(run) => vec![find_run(coord, run)?],
                None => coord
                    .store
                    .runs(limit.clamp(1, MAX_LIST) as usize)
                    .map_err(internal)?,
            };
            let mut jobs = Vec::new();
            for r in runs {
                jobs.extend(
                    coord
                        .store
                        .jobs_of(r.run)
                        .map_err(internal)?
                        .into_iter()
                        .map(|j| job_view(coord, j)),
                );
            }
            jobs.truncate(limit.clamp(1, MAX_LIST) as usize);
            Ok(AdminResponse::Jobs(jobs))
        }
        AdminRequest::ShowJob { job } => {
            Ok(AdminResponse::Job(job_view(coord, find_job(coord, job)?)))
        }
        AdminRequest::Approve { job } => {
            let record = find_job(coord, job)?;
            if record.state != "awaiting-approval" {
                return Err(invalid(format!(
                    "job {job} ({}) is {}, not awaiting approval",
                    record.name, record.state
                )));
            }
            coord
                .store
                .audit(&audit(
                    "job.approve",
                    format!("job={job} name={}", record.name),
                ))
                .map_err(internal)?;
            coord.engine.event(Event::Approve { job });
            Ok(AdminResponse::Done {
                message: format!("approved job {job} ({})", record.name),
            })
        }
        AdminRequest::AddTrigger { file_name, text } => {
            let pipeline =
                gantry_pipeline::parse(&file_name, &text).map_err(|e| invalid(e.to_string()))?;
            if pipeline.triggers.push.is_none() && pipeline.triggers.schedules.is_empty() {
                return Err(invalid(format!("{file_name} has no on.push or on.schedule trigger, so registering it would never run it")));
            }
            let record = crate::store::TriggerRecord {
                name: pipeline.name.clone(),
                file_name,
                text,
                added_by: actor.to_owned(),
                added_at: now,
                schedule_checked_until: now.0 / 1000,
            };
            coord
                .store
                .put_trigger(
                    &record,
                    Some(&audit("trigger.add", format!("pipeline={}", record.name))),
                )
                .map_err(internal)?;
            Ok(AdminResponse::Triggers(vec![trigger_view(&record)]))
        }
        AdminRequest::ListTriggers => Ok(AdminResponse::Triggers(
            coord
                .store
                .triggers()
                .map_err(internal)?
                .iter()
                .map(trigger_view)
                .collect(),
        )),
        AdminRequest::RemoveTrigger { name } => {
            if coord
                .store
                .remove_trigger(&name, &audit("trigger.remove", format!("pipeline={name}")))
                .map_err(internal)?
            {
                Ok(AdminResponse::Done {
                    message: format!("trigger {name} removed"),
                })
            } else {
                Err(not_found(format!(
                    "no trigger {name}; `gantry triggers list` shows them"
                )))
            }
        }
        AdminRequest::SetSecret {
            name,
            value,
            environment,
        } => {
            if let Some(env) = &environment {
                if coord.store.environment(env).map_err(internal)?.is_none() {
                    return Err(not_found(format!(
                        "no environment {env}; create it with `gantry env create {env} --select KEY=VALUE` first"
                    )));
                }
            }
            if !crate::base::secrets::valid_name(&name) {
                return Err(invalid(format!("invalid secret name {name:?}: use 1 to 64 of A-Z 0-9 _, starting with a letter")));
            }
            if value.is_empty() || value.len() > 64 * 1024 {
                return Err(invalid("a secret value must be 1 byte to 64 KiB".into()));
            }
            let sealed = coord
                .secret_key
                .seal(&name, value.as_bytes())
                .map_err(|e| AdminError {
                    kind: AdminErrorKind::Internal,
                    message: e.to_string(),
                })?;
            coord
                .store
                .put_secret(
                    &name,
                    &sealed,
                    environment.as_deref(),
                    &audit(
                        "secret.set",
                        format!(
                            "name={name} environment={}",
                            environment.as_deref().unwrap_or("-")
                        ),
                    ),
                )
                .map_err(internal)?;
            Ok(AdminResponse::Done {
                message: match &environment {
                    Some(env) => {
                        format!("secret {name} stored; only deployments to {env} receive it")
                    }
                    None => format!("secret {name} stored"),
                },
            })
        }
        AdminRequest::ListSecrets => Ok(AdminResponse::Secrets(
            coord
                .store
                .secrets()
                .map_err(internal)?
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
        )),
        AdminRequest::RemoveSecret { name } => {
            if coord
                .store
                .remove_secret(&name, &audit("secret.remove", format!("name={name}")))
                .map_err(internal)?
            {
                Ok(AdminResponse::Done {
                    message: format!("secret {name} removed"),
                })
            } else {
                Err(not_found(format!(
                    "no secret {name}; `gantry secrets list` shows them"
                )))
            }
        }
        other => Err(invalid(format!("unexpected request {other:?}"))),
    }
}

fn trigger_view(t: &crate::store::TriggerRecord) -> gantry_protocol::TriggerView {
    let parsed = gantry_pipeline::parse(&t.file_name, &t.text).ok();
    gantry_protocol::TriggerView {
        name: t.name.clone(),
        file_name: t.file_name.clone(),
        push: parsed
            .as_ref()
            .and_then(|p| p.triggers.push.as_ref())
            .map(|f| {
                format!(
                    "branches={:?} tags={:?} paths={:?}",
                    f.branches, f.tags, f.paths
                )
            }),
        schedules: parsed
            .map(|p| {
                p.triggers
                    .schedules
                    .iter()
                    .map(|c| c.expression.clone())
                    .collect()
            })
            .unwrap_or_default(),
        added_by: t.added_by.clone(),
        added_at: t.added_at,
    }
}

fn find_run(coord: &Coordinator, run: RunId) -> Result<RunRecord, AdminError> {
    coord.store.run(run).map_err(internal)?.ok_or_else(|| {
        not_found(format!(
            "no run {run}; `gantry pipelines list` shows the runs"
        ))
    })
}

fn find_job(coord: &Coordinator, job: JobId) -> Result<JobRecord, AdminError> {
    coord
        .store
        .job(job)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("no job {job}; `gantry jobs list` shows the jobs")))
}

/// Checks and stores a run, then hands it to the engine.
#[allow(clippy::needless_pass_by_value)] // the request is consumed by the caller's match
pub(crate) fn submit_run(
    coord: &Coordinator,
    actor: &str,
    submit: SubmitRun,
) -> Result<RunView, AdminError> {
    let pipeline = gantry_pipeline::parse(&submit.file_name, &submit.text)
        .map_err(|e| invalid(e.to_string()))?;
    for name in submit.inputs.keys() {
        if !pipeline.triggers.inputs.contains_key(name) {
            let declared: Vec<&String> = pipeline.triggers.inputs.keys().collect();
            return Err(invalid(format!("input {name:?} is not declared by the pipeline (declared: {declared:?}); declare it under on.inputs")));
        }
    }
    if let Some(source) = &submit.source {
        if !coord.sources.exists(source) {
            return Err(invalid(format!("source tree {source} was never uploaded (or is malformed); upload it again with `gantry run`")));
        }
    }
    let stored: Vec<String> = coord
        .store
        .secrets()
        .map_err(internal)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let scopes = coord.store.secret_scopes().map_err(internal)?;
    for job in &pipeline.jobs {
        for secret in gantry_pipeline::referenced_secrets(job) {
            if !stored.contains(&secret) {
                return Err(invalid(format!("job {:?} uses secret {secret}, which is not set; set it with `gantry secrets set {secret}`", job.name)));
            }
            if let Some(scope) = scopes.get(&secret) {
                let deploys_there = job.deploy.as_ref().is_some_and(|d| &d.environment == scope);
                if !deploys_there {
                    return Err(invalid(format!("job {:?} uses secret {secret}, which is scoped to environment {scope}: only a job deploying to {scope} receives it", job.name)));
                }
            }
        }
    }
    crate::deployments::create_file_environments(&coord.store, &pipeline, actor).map_err(|e| {
        AdminError {
            kind: AdminErrorKind::Internal,
            message: format!("cannot create the pipeline's environments: {e}"),
        }
    })?;
    let now = UnixMillis::now();
    let audit = AuditEntry {
        at: now,
        actor: actor.to_owned(),
        action: "run.create".into(),
        detail: format!("pipeline={} ref={}", pipeline.name, submit.git_ref),
    };
    let (record, jobs) = coord
        .store
        .create_run(
            |run| {
                let record = RunRecord {
                    run,
                    pipeline: pipeline.name.clone(),
                    file_name: submit.file_name.clone(),
                    text: submit.text.clone(),
                    git_ref: submit.git_ref.clone(),
                    commit: submit.commit.clone(),
                    event: submit.event.clone(),
                    inputs: submit.inputs.clone(),
                    created_at: now,
                    created_by: actor.to_owned(),
                    state: "running".into(),
                    finished_at: None,
                    source: submit.source.clone(),
                };
                let jobs = pipeline
                    .jobs
                    .iter()
                    .enumerate()
                    .map(|(i, j)| JobRecord {
                        job: JobId {
                            run,
                            index: u32::try_from(i).unwrap_or(u32::MAX),
                        },
                        name: j.name.clone(),
                        needs: j.needs.clone(),
                        state: "pending".into(),
                        attempt: 0,
                        agent: None,
                        exit_code: None,
                        started_at: None,
                        finished_at: None,
                        log_chunks: None,
                        attempts: Vec::new(),
                    })
                    .collect();
                (record, jobs)
            },
            &audit,
        )
        .map_err(internal)?;
    let plans = engine::plans_for(record.run, &pipeline, &record);
    let priority = pipeline.priority;
    coord.engine.send(Input::Submitted {
        run: Box::new(record.clone()),
        pipeline: Arc::new(pipeline),
        plans,
        priority,
    });
    tracing::info!(run = %record.run, pipeline = %record.pipeline, "run created");
    coord
        .notifier
        .emit(crate::notify::Event::run_started(&record));
    Ok(views(coord, record, jobs))
}

fn views(coord: &Coordinator, r: RunRecord, jobs: Vec<JobRecord>) -> RunView {
    RunView {
        run: r.run,
        pipeline: r.pipeline,
        state: r.state,
        git_ref: r.git_ref,
        commit: r.commit,
        event: r.event,
        inputs: r.inputs,
        created_at: r.created_at,
        finished_at: r.finished_at,
        created_by: r.created_by,
        jobs: jobs.into_iter().map(|j| job_view(coord, j)).collect(),
    }
}

fn run_view(coord: &Coordinator, r: RunRecord) -> Result<RunView, AdminError> {
    let jobs = coord.store.jobs_of(r.run).map_err(internal)?;
    Ok(views(coord, r, jobs))
}

pub fn job_view(coord: &Coordinator, j: JobRecord) -> JobView {
    let log_bytes = if j.attempt > 0 && coord.logs.exists(j.job, j.attempt) {
        coord.logs.open(j.job, j.attempt).map_or(0, |l| l.bytes())
    } else {
        0
    };
    JobView {
        job: j.job,
        name: j.name,
        needs: j.needs,
        state: j.state,
        attempt: j.attempt,
        agent: j.agent,
        exit_code: j.exit_code,
        started_at: j.started_at,
        finished_at: j.finished_at,
        log_bytes,
    }
}

/// Receives one job attempt's log from an agent: resume point, chunks, acknowledgements
/// after fsync. Refused unless the attempt was handed to this agent.
pub async fn receive_log(
    coord: &Arc<Coordinator>,
    agent: &AgentId,
    job: JobId,
    attempt: Attempt,
    mut writer: FrameWriter,
    mut reader: FrameReader,
) -> Result<(), String> {
    if let Err(denied) = handed_to(
        coord,
        crate::base::authz::Request::StreamLogs,
        agent,
        job,
        attempt,
    ) {
        writer.reset(gantry_protocol::CloseCode::Unauthorized);
        reader.stop(gantry_protocol::CloseCode::Unauthorized);
        return Err(denied.to_string());
    }
    let log = coord.logs.open(job, attempt).map_err(|e| e.to_string())?;
    // The agent drops what it holds below the resume point, so that point must be
    // durable: chunks written by a stream that broke before its fsync are synced here
    // (a no-op when nothing is pending), never acknowledged unsynced.
    let synced = log.clone();
    let next_seq = tokio::task::spawn_blocking(move || synced.sync())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    writer
        .send(&LogControl::Resume { next_seq })
        .await
        .map_err(|e| e.to_string())?;
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
        // Everything already received is written, then synced once and acknowledged once:
        // one fsync per batch, not per chunk.
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        for item in batch {
            match item {
                Ok(Some(chunk)) => {
                    if log
                        .append(chunk.seq, &chunk.data)
                        .map_err(|e| e.to_string())?
                        == crate::base::logs::Appended::Stored
                    {
                        coord.metrics.log_bytes(chunk.data.len() as u64);
                    }
                }
                Ok(None) => done = true,
                Err(e) => return Err(e.to_string()),
            }
        }
        let log2 = log.clone();
        let next = tokio::task::spawn_blocking(move || log2.sync())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        writer
            .send(&LogControl::Ack { next_seq: next })
            .await
            .map_err(|e| e.to_string())?;
    }
    writer.finish();
    Ok(())
}

/// Sends the source tree of a job attempt's run to the agent it was handed to.
pub async fn send_source(
    coord: &Arc<Coordinator>,
    agent: &AgentId,
    job: JobId,
    attempt: Attempt,
    writer: &mut FrameWriter,
) -> Result<(), String> {
    if let Err(denied) = handed_to(
        coord,
        crate::base::authz::Request::StreamFetchSource,
        agent,
        job,
        attempt,
    ) {
        writer.reset(gantry_protocol::CloseCode::Unauthorized);
        return Err(denied.to_string());
    }
    let run = coord
        .store
        .run(job.run)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no run {}", job.run))?;
    let source = run
        .source
        .ok_or_else(|| format!("run {} has no source tree", job.run))?;
    coord
        .sources
        .send(&source, writer)
        .await
        .map_err(|e| e.to_string())
}

/// Asks the authorization table whether `agent` may make `row` for an attempt: it holds
/// the work if the attempt was handed to it (its log and result may come after the
/// attempt ended, from its spool).
fn handed_to(
    coord: &Coordinator,
    row: crate::base::authz::Request,
    agent: &AgentId,
    job: JobId,
    attempt: Attempt,
) -> Result<(), crate::base::authz::Denied> {
    let (holds, why) = match coord.store.job(job) {
        Ok(Some(record))
            if record
                .attempts
                .iter()
                .any(|(a, who)| *a == attempt && who == agent) =>
        {
            (true, String::new())
        }
        Ok(Some(_)) => (
            false,
            format!("attempt {attempt} of job {job} was not handed to {agent}"),
        ),
        Ok(None) => (false, format!("no job {job}")),
        Err(e) => (false, format!("cannot read job {job}: {e}")),
    };
    coord
        .metrics
        .authz
        .check(row, crate::base::authz::Principal::agent(holds), || why)
}

/// Streams a job's log to an admin: stored chunks from `from_seq`, then (with `follow`)
/// live chunks until the job has ended and its log is complete. A retried job's next
/// attempt is followed on.
pub async fn follow_logs<W: FollowSink + Send>(
    coord: &Arc<Coordinator>,
    job: JobId,
    from_seq: u64,
    follow: bool,
    writer: &mut W,
) -> Result<(), W::Error> {
    let mut changes = coord.engine.subscribe();
    let mut record = match coord.store.job(job) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return writer
                .send(&FollowEvent::Error(not_found(format!(
                    "no job {job}; `gantry jobs list` shows the jobs"
                ))))
                .await
        }
        Err(e) => return writer.send(&FollowEvent::Error(internal(e))).await,
    };
    let mut next = from_seq;
    let mut attempt = record.attempt;
    loop {
        if attempt == 0 {
            if !follow || engine::is_terminal_name(&record.state) {
                return writer
                    .send(&FollowEvent::End {
                        state: record.state,
                    })
                    .await;
            }
            record = wait_for_change(coord, &mut changes, job, &record).await;
            attempt = record.attempt;
            continue;
        }
        let log = match coord.logs.open(job, attempt) {
            Ok(l) => l,
            Err(e) => {
                return writer
                    .send(&FollowEvent::Error(invalid(e.to_string())))
                    .await
            }
        };
        let mut live = log.subscribe();
        next = send_stored(&log, next, writer).await?;
        if !follow {
            return writer
                .send(&FollowEvent::End {
                    state: record.state,
                })
                .await;
        }
        loop {
            if complete(&record, attempt, next) {
                return writer
                    .send(&FollowEvent::End {
                        state: record.state,
                    })
                    .await;
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
                    if let Ok(Some(r)) = coord.store.job(job) {
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

/// Whether the followed attempt has ended with every chunk sent.
fn complete(record: &JobRecord, attempt: Attempt, next: u64) -> bool {
    if record.attempt != attempt {
        return false;
    }
    match record.log_chunks {
        Some(n) => next >= n,
        // Ended without a report from its agent (lost, cancelled before it started).
        None => engine::is_terminal_name(&record.state),
    }
}

async fn send_stored<W: FollowSink + Send>(
    log: &crate::base::logs::LiveLog,
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

async fn wait_for_change(
    coord: &Coordinator,
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
                if let Ok(Some(r)) = coord.store.job(job) {
                    if &r != current {
                        return r;
                    }
                }
            }
        }
    }
}

/// Streams a run's job states to an admin until the run ends.
pub async fn follow_run<W: FollowSink + Send>(
    coord: &Arc<Coordinator>,
    run: RunId,
    writer: &mut W,
) -> Result<(), W::Error> {
    let mut changes = coord.engine.subscribe();
    let record = match coord.store.run(run) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return writer
                .send(&FollowEvent::Error(not_found(format!(
                    "no run {run}; `gantry pipelines list` shows the runs"
                ))))
                .await
        }
        Err(e) => return writer.send(&FollowEvent::Error(internal(e))).await,
    };
    let mut last: std::collections::HashMap<JobId, JobRecord> = std::collections::HashMap::new();
    let mut state = record.state.clone();
    let mut finished = record.finished_at.is_some();
    loop {
        // Sends whatever changed since the last look (the store is the truth; the change
        // feed only says when to look again).
        if let Ok(jobs) = coord.store.jobs_of(run) {
            for j in jobs {
                if last.get(&j.job) != Some(&j) {
                    last.insert(j.job, j.clone());
                    writer.send(&FollowEvent::Job(job_view(coord, j))).await?;
                }
            }
        }
        if finished {
            return writer.send(&FollowEvent::End { state }).await;
        }
        tokio::select! {
            change = changes.recv() => match change {
                Ok(Change::Run(r)) if r.run == run => {
                    state.clone_from(&r.state);
                    finished = r.finished_at.is_some();
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            () = tokio::time::sleep(FOLLOW_RECHECK) => {
                if let Ok(Some(r)) = coord.store.run(run) {
                    state.clone_from(&r.state);
                    finished = r.finished_at.is_some();
                }
            }
        }
    }
}
