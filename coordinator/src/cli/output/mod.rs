//! How admin responses are shown: aligned tables for people, `--json` for scripts.
//! [`print_response`] picks the form of each response; the tables are by domain
//! (`runs.rs`, `fleet.rs`, `deploy.rs`, `web.rs`, `repos.rs`), built with `table.rs`. A job's log
//! bound for a terminal goes through `terminal.rs` first.

pub mod deploy;
pub mod fleet;
pub mod repos;
pub mod runs;
pub mod table;
pub mod terminal;
pub mod web;

use std::process::ExitCode;

use gantry_protocol::{AdminResponse, UnixMillis};

use crate::cli::failure::Failure;
use crate::cli::output::fleet::{agent_detail, agents_table};
use crate::cli::output::runs::{
    artifacts_table, caches_table, gc_summary, job_detail, job_outputs, job_report, jobs_table,
    run_detail, runs_table,
};
use crate::cli::output::table::rows_of;
pub use crate::cli::output::table::{human_bytes, human_duration, rfc3339, table};

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
            AdminResponse::JobOutputs(o) => serde_json::to_value(o),
            AdminResponse::JobReport(r) => serde_json::to_value(r),
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
            AdminResponse::Repos(r) => serde_json::to_value(r),
            AdminResponse::Repo(r) => serde_json::to_value(r),
            web @ (AdminResponse::LoginTokenCreated(_)
            | AdminResponse::LoginTokens(_)
            | AdminResponse::WebhookAdded(_)
            | AdminResponse::Webhooks(_)) => web::json(web).unwrap_or(Ok(serde_json::Value::Null)),
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
        AdminResponse::JobOutputs(o) => print!("{}", job_outputs(o)),
        AdminResponse::JobReport(r) => print!("{}", job_report(r.as_ref())),
        AdminResponse::Jobs(jobs) => print!("{}", jobs_table(jobs)),
        AdminResponse::Secrets(names) => {
            for n in names {
                println!("{n}");
            }
        }
        AdminResponse::Triggers(triggers) => {
            let headers = ["PIPELINE", "FILE", "PUSH", "SCHEDULES", "ADDED BY"];
            let rows = rows_of(&headers, triggers, |t| {
                vec![
                    t.name.clone(),
                    t.file_name.clone(),
                    t.push.clone().unwrap_or_else(|| "-".into()),
                    if t.schedules.is_empty() {
                        "-".into()
                    } else {
                        t.schedules.join("; ")
                    },
                    t.added_by.clone(),
                ]
            });
            print!("{}", table(&rows));
        }
        AdminResponse::Artifacts(artifacts) => {
            print!("{}", artifacts_table(artifacts, UnixMillis::now()));
        }
        AdminResponse::Caches(caches) => print!("{}", caches_table(caches, UnixMillis::now())),
        AdminResponse::Gc(report) => print!("{}", gc_summary(report)),
        AdminResponse::Environments(envs) => {
            print!("{}", deploy::environments_table(envs));
        }
        AdminResponse::Environment(e) => print!("{}", deploy::environment_detail(e)),
        AdminResponse::Deployments(d) => {
            print!("{}", deploy::deployments_table(d, UnixMillis::now()));
        }
        AdminResponse::Deployment(d) => {
            print!("{}", deploy::deployment_detail(d, UnixMillis::now()));
        }
        AdminResponse::Stats(stats) => print!("{}", deploy::stats_table(stats)),
        AdminResponse::AdminIssued { .. } => println!("admin certificate issued"),
        AdminResponse::Done { message } => println!("{message}"),
        AdminResponse::Error(e) => println!("error: {}", e.message),
        AdminResponse::Repos(r) => print!("{}", repos::repos_table(r)),
        AdminResponse::Repo(r) => print!("{}", repos::repo_detail(r)),
        web @ (AdminResponse::LoginTokenCreated(_)
        | AdminResponse::LoginTokens(_)
        | AdminResponse::WebhookAdded(_)
        | AdminResponse::Webhooks(_)) => {
            print!("{}", web::text(web, UnixMillis::now()).unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}
