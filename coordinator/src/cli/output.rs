//! How admin responses are shown: aligned tables for people, `--json` for scripts.

use std::fmt::Write as _;
use std::process::ExitCode;

use gantry_protocol::{AdminResponse, AgentView, JobView, RunView, UnixMillis};

pub use crate::base::text::{human_bytes, human_duration};
use crate::cli::failure::Failure;

/// Prints a response as a table or JSON.
pub fn print_response(resp: &AdminResponse, json: bool) -> Result<ExitCode, Failure> {
    if json {
        let value = match resp {
            AdminResponse::TokenCreated(t) => serde_json::to_value(t),
            AdminResponse::Agents(a) => serde_json::to_value(a),
            AdminResponse::Agent(a) => serde_json::to_value(a),
            AdminResponse::Status(s) => serde_json::to_value(s),
            AdminResponse::Audit(a) => serde_json::to_value(a),
            AdminResponse::Validated { jobs } => {
                serde_json::to_value(serde_json::json!({ "valid": true, "jobs": jobs }))
            }
            AdminResponse::Run(r) => serde_json::to_value(r),
            AdminResponse::Runs(r) => serde_json::to_value(r),
            AdminResponse::Job(j) => serde_json::to_value(j),
            AdminResponse::Jobs(j) => serde_json::to_value(j),
            AdminResponse::Secrets(s) => serde_json::to_value(s),
            AdminResponse::Triggers(t) => serde_json::to_value(t),
            AdminResponse::Artifacts(a) => serde_json::to_value(a),
            AdminResponse::Caches(c) => serde_json::to_value(c),
            AdminResponse::Gc(g) => serde_json::to_value(g),
            AdminResponse::Environments(e) => serde_json::to_value(e),
            AdminResponse::Environment(e) => serde_json::to_value(e),
            AdminResponse::Deployments(d) => serde_json::to_value(d),
            AdminResponse::Deployment(d) => serde_json::to_value(d),
            AdminResponse::Stats(s) => serde_json::to_value(s),
            AdminResponse::AdminIssued { .. } => {
                serde_json::to_value(serde_json::json!({ "issued": true }))
            }
            AdminResponse::Done { message } => {
                serde_json::to_value(serde_json::json!({ "message": message }))
            }
            AdminResponse::Error(e) => serde_json::to_value(e),
            web @ (AdminResponse::LoginTokenCreated(_)
            | AdminResponse::LoginTokens(_)
            | AdminResponse::WebhookAdded(_)
            | AdminResponse::Webhooks(_)) => {
                crate::cli::web::json(web).unwrap_or(Ok(serde_json::Value::Null))
            }
        }
        .map_err(|e| Failure::Work(e.into()))?;
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(|e| Failure::Work(e.into()))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    match resp {
        AdminResponse::TokenCreated(t) => println!("{}", t.token),
        AdminResponse::Agents(agents) => print!("{}", agents_table(agents, UnixMillis::now())),
        AdminResponse::Agent(a) => print!("{}", agent_detail(a, UnixMillis::now())),
        AdminResponse::Status(s) => {
            println!(
                "coordinator    gantry {} (protocol {})",
                s.coordinator_version, s.protocol_version
            );
            println!("listening on   {}", s.listen_address);
            println!("uptime         {}", human_duration(s.uptime_secs * 1000));
            println!(
                "agents         {} connected, {} enrolled, {} revoked",
                s.agents_connected, s.agents_total, s.agents_revoked
            );
            println!("join tokens    {} active", s.tokens_active);
        }
        AdminResponse::Audit(entries) => {
            for e in entries {
                println!(
                    "{}  {:<28} {:<14} {}",
                    rfc3339(e.at),
                    e.actor,
                    e.action,
                    e.detail
                );
            }
        }
        AdminResponse::Validated { jobs } => {
            println!("valid: {} jobs ({})", jobs.len(), jobs.join(", "));
        }
        AdminResponse::Run(r) => print!("{}", run_detail(r, UnixMillis::now())),
        AdminResponse::Runs(runs) => print!("{}", runs_table(runs, UnixMillis::now())),
        AdminResponse::Job(j) => print!("{}", job_detail(j)),
        AdminResponse::Jobs(jobs) => print!("{}", jobs_table(jobs)),
        AdminResponse::Secrets(names) => {
            for n in names {
                println!("{n}");
            }
        }
        AdminResponse::Triggers(triggers) => {
            let mut rows = vec![["PIPELINE", "FILE", "PUSH", "SCHEDULES", "ADDED BY"]
                .map(str::to_owned)
                .to_vec()];
            for t in triggers {
                rows.push(vec![
                    t.name.clone(),
                    t.file_name.clone(),
                    t.push.clone().unwrap_or_else(|| "-".into()),
                    if t.schedules.is_empty() {
                        "-".into()
                    } else {
                        t.schedules.join("; ")
                    },
                    t.added_by.clone(),
                ]);
            }
            print!("{}", table(&rows));
        }
        AdminResponse::Artifacts(artifacts) => {
            print!("{}", artifacts_table(artifacts, UnixMillis::now()));
        }
        AdminResponse::Caches(caches) => print!("{}", caches_table(caches, UnixMillis::now())),
        AdminResponse::Gc(report) => print!("{}", gc_summary(report)),
        AdminResponse::Environments(envs) => {
            print!("{}", crate::cli::deploy::environments_table(envs));
        }
        AdminResponse::Environment(e) => print!("{}", crate::cli::deploy::environment_detail(e)),
        AdminResponse::Deployments(d) => {
            print!(
                "{}",
                crate::cli::deploy::deployments_table(d, UnixMillis::now())
            );
        }
        AdminResponse::Deployment(d) => {
            print!(
                "{}",
                crate::cli::deploy::deployment_detail(d, UnixMillis::now())
            );
        }
        AdminResponse::Stats(stats) => print!("{}", crate::cli::deploy::stats_table(stats)),
        AdminResponse::AdminIssued { .. } => println!("admin certificate issued"),
        AdminResponse::Done { message } => println!("{message}"),
        AdminResponse::Error(e) => println!("error: {}", e.message),
        web @ (AdminResponse::LoginTokenCreated(_)
        | AdminResponse::LoginTokens(_)
        | AdminResponse::WebhookAdded(_)
        | AdminResponse::Webhooks(_)) => {
            print!(
                "{}",
                crate::cli::web::text(web, UnixMillis::now()).unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn artifacts_table(artifacts: &[gantry_protocol::ArtifactView], now: UnixMillis) -> String {
    let mut rows = vec![[
        "NAME",
        "JOB",
        "FILES",
        "SIZE",
        "CHUNKS",
        "EXPIRES IN",
        "MANIFEST",
    ]
    .map(str::to_owned)
    .to_vec()];
    for a in artifacts {
        rows.push(vec![
            a.name.clone(),
            format!("{} ({})", a.job, a.job_name),
            a.files.to_string(),
            human_bytes(a.bytes),
            a.chunks.to_string(),
            human_duration(a.expires_at.millis_since(now)),
            a.manifest.to_string()[..19].to_owned(),
        ]);
    }
    table(&rows)
}

fn caches_table(caches: &[gantry_protocol::CacheView], now: UnixMillis) -> String {
    let mut rows = vec![[
        "KEY",
        "PIPELINE",
        "BRANCH",
        "FILES",
        "SIZE",
        "CREATED",
        "LAST USED",
    ]
    .map(str::to_owned)
    .to_vec()];
    for c in caches {
        rows.push(vec![
            c.key.clone(),
            c.pipeline.clone(),
            c.branch.clone(),
            c.files.to_string(),
            human_bytes(c.bytes),
            format!("{} ago", human_duration(now.millis_since(c.created_at))),
            format!("{} ago", human_duration(now.millis_since(c.last_used))),
        ]);
    }
    table(&rows)
}

fn gc_summary(r: &gantry_protocol::GcReport) -> String {
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

fn runs_table(runs: &[RunView], now: UnixMillis) -> String {
    let mut rows = vec![["RUN", "PIPELINE", "STATE", "REF", "STARTED", "JOBS"]
        .map(str::to_owned)
        .to_vec()];
    for r in runs {
        let done = r.jobs.iter().filter(|j| j.state == "succeeded").count();
        rows.push(vec![
            r.run.to_string(),
            r.pipeline.clone(),
            r.state.clone(),
            r.git_ref.clone(),
            format!("{} ago", human_duration(now.millis_since(r.created_at))),
            format!("{done}/{} succeeded", r.jobs.len()),
        ]);
    }
    table(&rows)
}

/// The `gantry jobs list` table.
pub fn jobs_table(jobs: &[JobView]) -> String {
    let mut rows = vec![[
        "JOB", "NAME", "STATE", "ATTEMPT", "AGENT", "EXIT", "DURATION", "LOG",
    ]
    .map(str::to_owned)
    .to_vec()];
    for j in jobs {
        rows.push(vec![
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
            human_bytes(j.log_bytes),
        ]);
    }
    table(&rows)
}

fn run_detail(r: &RunView, now: UnixMillis) -> String {
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

fn job_detail(j: &JobView) -> String {
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
    let _ = writeln!(s, "log            {}", human_bytes(j.log_bytes));
    s
}

/// The `gantry agents list` table.
pub fn agents_table(agents: &[AgentView], now: UnixMillis) -> String {
    let mut rows = vec![[
        "AGENT",
        "HOSTNAME",
        "STATE",
        "LAST SEEN",
        "CPU",
        "MEMORY",
        "LOAD",
        "LABELS",
    ]
    .map(str::to_owned)
    .to_vec()];
    for a in agents {
        let f = a.figures.as_ref();
        rows.push(vec![
            a.agent_id.to_string(),
            a.hostname.clone(),
            a.state.as_str().to_owned(),
            a.last_seen.map_or_else(
                || "never".to_owned(),
                |t| format!("{} ago", human_duration(now.millis_since(t))),
            ),
            f.map_or_else(
                || "-".into(),
                |f| format!("{:.0}% of {}", f.cpu_percent, f.cpu_count),
            ),
            f.map_or_else(
                || "-".into(),
                |f| {
                    format!(
                        "{}/{}",
                        human_bytes(f.memory_used_bytes),
                        human_bytes(f.memory_total_bytes)
                    )
                },
            ),
            f.map_or_else(|| "-".into(), |f| format!("{:.2}", f.load_average[0])),
            a.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    table(&rows)
}

fn agent_detail(a: &AgentView, now: UnixMillis) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "agent          {}", a.agent_id);
    let _ = writeln!(s, "hostname       {}", a.hostname);
    let _ = writeln!(s, "state          {}", a.state.as_str());
    let _ = writeln!(
        s,
        "version        {}",
        if a.agent_version.is_empty() {
            "-"
        } else {
            &a.agent_version
        }
    );
    let _ = writeln!(
        s,
        "address        {}",
        a.remote_address.as_deref().unwrap_or("-")
    );
    let _ = writeln!(s, "enrolled       {}", rfc3339(a.enrolled_at));
    let _ = writeln!(
        s,
        "last seen      {}",
        a.last_seen.map_or_else(
            || "never".into(),
            |t| format!("{} ago", human_duration(now.millis_since(t)))
        )
    );
    let _ = writeln!(
        s,
        "certificate    valid until {}",
        rfc3339(a.certificate_not_after)
    );
    if let Some(r) = a.revoked_at {
        let _ = writeln!(s, "revoked        {}", rfc3339(r));
    }
    let _ = writeln!(s, "slots          {}", a.slots);
    let _ = writeln!(s, "capabilities   {}", a.capabilities.join(", "));
    let _ = writeln!(
        s,
        "labels         {}",
        a.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(f) = &a.figures {
        let _ = writeln!(
            s,
            "cpu            {:.1}% of {} cores",
            f.cpu_percent, f.cpu_count
        );
        let _ = writeln!(
            s,
            "memory         {} used of {}",
            human_bytes(f.memory_used_bytes),
            human_bytes(f.memory_total_bytes)
        );
        let _ = writeln!(
            s,
            "disk           {} free of {}",
            human_bytes(f.disk_free_bytes),
            human_bytes(f.disk_total_bytes)
        );
        let _ = writeln!(
            s,
            "load           {:.2} {:.2} {:.2}",
            f.load_average[0], f.load_average[1], f.load_average[2]
        );
        let _ = writeln!(s, "uptime         {}", human_duration(f.uptime_secs * 1000));
    }
    s
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// UTC timestamp `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(t: UnixMillis) -> String {
    t.to_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(UnixMillis(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UnixMillis(1_795_000_000_000)),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0GiB");
        assert_eq!(human_duration(1500), "1s");
        assert_eq!(human_duration(90_000), "1m30s");
        let t = table(&[
            vec!["A".into(), "B".into()],
            vec!["long".into(), "x".into()],
        ]);
        assert_eq!(t, "A     B\nlong  x\n");
    }
}
