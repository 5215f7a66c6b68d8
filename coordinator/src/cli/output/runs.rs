//! Runs, jobs, artifacts and caches as tables and details.

use std::fmt::Write as _;

use gantry_protocol::{JobView, RunView, UnixMillis};

use crate::cli::output::table::{human_bytes, human_duration, rfc3339, rows_of, table};

pub fn artifacts_table(artifacts: &[gantry_protocol::ArtifactView], now: UnixMillis) -> String {
    let headers = [
        "NAME",
        "JOB",
        "FILES",
        "SIZE",
        "CHUNKS",
        "EXPIRES IN",
        "MANIFEST",
    ];
    let rows = rows_of(&headers, artifacts, |a| {
        vec![
            a.name.clone(),
            format!("{} ({})", a.job, a.job_name),
            a.files.to_string(),
            human_bytes(a.bytes),
            a.chunks.to_string(),
            human_duration(a.expires_at.millis_since(now)),
            a.manifest.to_string()[..19].to_owned(),
        ]
    });
    table(&rows)
}

pub fn caches_table(caches: &[gantry_protocol::CacheView], now: UnixMillis) -> String {
    let headers = [
        "KEY",
        "PIPELINE",
        "BRANCH",
        "FILES",
        "SIZE",
        "CREATED",
        "LAST USED",
    ];
    let rows = rows_of(&headers, caches, |c| {
        vec![
            c.key.clone(),
            c.pipeline.clone(),
            c.branch.clone(),
            c.files.to_string(),
            human_bytes(c.bytes),
            format!("{} ago", human_duration(now.millis_since(c.created_at))),
            format!("{} ago", human_duration(now.millis_since(c.last_used))),
        ]
    });
    table(&rows)
}

pub fn gc_summary(r: &gantry_protocol::GcReport) -> String {
    let verb = if r.dry_run { "would free" } else { "freed" };
    format!(
        "{verb} {} in {} chunks; {} artifacts expired, {} caches evicted\nkept {} chunks ({} in all, {} unreferenced but protected: open uploads or younger than the grace)\n",
        human_bytes(r.bytes_freed),
        r.chunks_deleted,
        r.artifacts_expired,
        r.caches_evicted,
        r.chunks_kept + r.chunks_protected,
        human_bytes(r.bytes_kept),
        r.chunks_protected,
    )
}

pub fn runs_table(runs: &[RunView], now: UnixMillis) -> String {
    let headers = ["RUN", "PIPELINE", "STATE", "REF", "STARTED", "JOBS"];
    let rows = rows_of(&headers, runs, |r| {
        let done = r.jobs.iter().filter(|j| j.state == "succeeded").count();
        vec![
            r.run.to_string(),
            r.pipeline.clone(),
            r.state.clone(),
            r.git_ref.clone(),
            format!("{} ago", human_duration(now.millis_since(r.created_at))),
            format!("{done}/{} succeeded", r.jobs.len()),
        ]
    });
    table(&rows)
}

/// The `gantry jobs list` table.
pub fn jobs_table(jobs: &[JobView]) -> String {
    let headers = [
        "JOB", "NAME", "STATE", "ATTEMPT", "AGENT", "EXIT", "DURATION", "LOG",
    ];
    let rows = rows_of(&headers, jobs, |j| {
        vec![
            j.job.to_string(),
            j.name.clone(),
            j.state.clone(),
            j.attempt.to_string(),
            j.agent
                .as_ref()
                .map_or_else(|| "-".into(), ToString::to_string),
            j.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            match (j.started_at, j.finished_at) {
                (Some(s), Some(f)) => human_duration(f.millis_since(s)),
                _ => "-".into(),
            },
            log_size(j),
        ]
    });
    table(&rows)
}

pub fn run_detail(r: &RunView, now: UnixMillis) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "run            {}", r.run);
    let _ = writeln!(s, "pipeline       {}", r.pipeline);
    let _ = writeln!(s, "state          {}", r.state);
    let _ = writeln!(
        s,
        "ref            {}{}",
        r.git_ref,
        r.commit
            .as_ref()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "event          {}", r.event);
    let _ = writeln!(
        s,
        "started        {} ({} ago) by {}",
        rfc3339(r.created_at),
        human_duration(now.millis_since(r.created_at)),
        r.created_by
    );
    if let Some(f) = r.finished_at {
        let _ = writeln!(
            s,
            "finished       {} after {}",
            rfc3339(f),
            human_duration(f.millis_since(r.created_at))
        );
    }
    if !r.inputs.is_empty() {
        let _ = writeln!(
            s,
            "inputs         {}",
            r.inputs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s.push('\n');
    s.push_str(&jobs_table(&r.jobs));
    s
}

/// A job's outputs under the job's detail: one `name = value` line each, a multi-line
/// value indented under its name; nothing when there are none.
pub fn job_outputs(outputs: &gantry_protocol::Labels) -> String {
    let mut s = String::new();
    if outputs.is_empty() {
        return s;
    }
    let _ = writeln!(s, "outputs");
    for (name, value) in outputs {
        if value.contains('\n') {
            let _ = writeln!(s, "  {name} =");
            for line in value.lines() {
                let _ = writeln!(s, "    {line}");
            }
        } else {
            let _ = writeln!(s, "  {name} = {value}");
        }
    }
    s
}

/// A job's test report under the job's detail: counts, coverage, each failed test with
/// its output indented under it, notes; nothing when the job sent no reports.
pub fn job_report(report: Option<&gantry_protocol::TestReport>) -> String {
    let mut s = String::new();
    let Some(r) = report else { return s };
    if r.total() > 0 || r.coverage.is_none() {
        let _ = writeln!(
            s,
            "tests          {} passed, {} failed, {} skipped (attempt {})",
            r.passed, r.failed, r.skipped, r.attempt
        );
    }
    if let Some(c) = &r.coverage {
        let _ = writeln!(s, "coverage       {}", c.percent());
    }
    if !r.failures.is_empty() {
        let _ = writeln!(s, "failed tests");
        for f in &r.failures {
            let kind = if f.error { ", error" } else { "" };
            let _ = writeln!(s, "  {} ({}{kind})", f.name, f.file);
            for line in f.output.lines() {
                let _ = writeln!(s, "    {line}");
            }
        }
        let more = r.failed.saturating_sub(r.failures.len() as u64);
        if more > 0 {
            let _ = writeln!(s, "  and {more} more");
        }
    }
    for note in &r.notes {
        let _ = writeln!(s, "report note    {note}");
    }
    s
}

pub fn job_detail(j: &JobView) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "job            {}", j.job);
    let _ = writeln!(s, "name           {}", j.name);
    let _ = writeln!(s, "state          {}", j.state);
    let _ = writeln!(s, "attempt        {}", j.attempt);
    let _ = writeln!(
        s,
        "needs          {}",
        if j.needs.is_empty() {
            "-".to_owned()
        } else {
            j.needs.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "agent          {}",
        j.agent
            .as_ref()
            .map_or_else(|| "-".into(), ToString::to_string)
    );
    if let Some(c) = j.exit_code {
        let _ = writeln!(s, "exit code      {c}");
    }
    if let Some(t) = j.started_at {
        let _ = writeln!(s, "started        {}", rfc3339(t));
    }
    if let Some(t) = j.finished_at {
        let _ = writeln!(s, "finished       {}", rfc3339(t));
    }
    let _ = writeln!(s, "log            {}", log_size(j));
    s
}

/// A job's log size, and whether its end is missing.
fn log_size(j: &JobView) -> String {
    if j.log_incomplete {
        format!(
            "{} (incomplete: the coordinator ran out of space storing it)",
            human_bytes(j.log_bytes)
        )
    } else {
        human_bytes(j.log_bytes)
    }
}
