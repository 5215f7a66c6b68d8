//! Environments, deployments and delivery figures as tables and details.

use std::collections::HashMap;
use std::fmt::Write as _;

use gantry_protocol::{AgentId, DeploymentView, EnvironmentView, UnixMillis};

use crate::base::labels::labels_text;
use crate::cli::output::table::{human_duration, rfc3339, rows_of, table};

/// `gantry stats` as a table: one row per environment.
pub fn stats_table(stats: &[gantry_protocol::DeliveryStats]) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), human_duration);
    let headers = [
        "ENV",
        "CHANGES",
        "PER DAY",
        "LEAD TIME (MEDIAN/P90)",
        "FAILURE RATE",
        "TIME TO RESTORE (MEDIAN)",
        "ROLLBACKS",
    ];
    let rows = rows_of(&headers, stats, |s| {
        vec![
            s.environment.clone(),
            format!("{} ({} ok)", s.changes, s.succeeded),
            format!("{:.2}", s.deployments_per_day),
            format!("{} / {}", ms(s.lead_time_median_ms), ms(s.lead_time_p90_ms)),
            s.change_failure_rate.map_or_else(
                || "-".to_owned(),
                |r| format!("{:.0}% ({} of {})", r * 100.0, s.failed_changes, s.changes),
            ),
            format!(
                "{} ({} restores)",
                ms(s.time_to_restore_median_ms),
                s.restores
            ),
            s.rollbacks.to_string(),
        ]
    });
    table(&rows)
}

pub fn environments_table(envs: &[EnvironmentView]) -> String {
    let headers = [
        "NAME",
        "SELECT",
        "HOSTS",
        "APPROVALS",
        "WAIT",
        "BRANCHES",
        "CURRENT",
    ];
    let rows = rows_of(&headers, envs, |e| {
        vec![
            e.name.clone(),
            labels_text(&e.select),
            e.hosts.len().to_string(),
            e.approvals.to_string(),
            if e.wait_ms == 0 {
                "-".into()
            } else {
                human_duration(e.wait_ms)
            },
            if e.branches.is_empty() {
                "any".into()
            } else {
                e.branches.join(",")
            },
            e.current.as_ref().map_or_else(
                || "-".into(),
                |c| format!("{} ({})", c.release.id, c.release.version),
            ),
        ]
    });
    table(&rows)
}

pub fn environment_detail(e: &EnvironmentView) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<12}{v}");
    };
    line("name", e.name.clone());
    line("select", labels_text(&e.select));
    line("approvals", e.approvals.to_string());
    line(
        "wait",
        if e.wait_ms == 0 {
            "-".into()
        } else {
            human_duration(e.wait_ms)
        },
    );
    line(
        "branches",
        if e.branches.is_empty() {
            "any".into()
        } else {
            e.branches.join(", ")
        },
    );
    line("epoch", e.epoch.to_string());
    line(
        "current",
        e.current.as_ref().map_or_else(
            || "-".into(),
            |c| {
                format!(
                    "{} ({}) by deployment {}",
                    c.release.id, c.release.version, c.deployment
                )
            },
        ),
    );
    line(
        "created",
        format!("{} by {}", rfc3339(e.created_at), e.created_by),
    );
    let _ = writeln!(s, "\nhosts ({}):", e.hosts.len());
    for h in &e.hosts {
        let _ = writeln!(s, "  {}  {}", h.hostname, h.agent);
    }
    if !e.history.is_empty() {
        s.push_str("\nhistory (newest first):\n");
        let headers = ["RELEASE", "VERSION", "APP", "DEPLOYMENT", "AT"];
        let rows = rows_of(&headers, &e.history, |r| {
            vec![
                r.release.id.clone(),
                r.release.version.clone(),
                r.app.clone(),
                r.deployment.to_string(),
                rfc3339(r.at),
            ]
        });
        for l in table(&rows).lines() {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

fn host_counts(d: &DeploymentView) -> String {
    let active = d.hosts.iter().filter(|h| h.state == "active").count();
    format!("{active}/{}", d.hosts.len())
}

pub fn deployments_table(deployments: &[DeploymentView], now: UnixMillis) -> String {
    let headers = [
        "ID", "ENV", "APP", "RELEASE", "STRATEGY", "STATE", "ACTIVE", "BY", "AGE",
    ];
    let rows = rows_of(&headers, deployments, |d| {
        vec![
            d.id.to_string(),
            d.environment.clone(),
            d.app.clone(),
            format!("{} ({})", d.release.id, d.release.version),
            d.strategy.clone(),
            d.state.clone(),
            host_counts(d),
            d.created_by.clone(),
            human_duration(now.millis_since(d.created_at)),
        ]
    });
    table(&rows)
}

pub fn deployment_detail(d: &DeploymentView, now: UnixMillis) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<12}{v}");
    };
    line("deployment", d.id.to_string());
    line(
        "environment",
        format!("{} (epoch {})", d.environment, d.epoch),
    );
    line(
        "release",
        format!("{} ({}) of {}", d.release.id, d.release.version, d.app),
    );
    line("strategy", d.strategy.clone());
    line(
        "state",
        match &d.reason {
            Some(r) => format!("{}: {r}", d.state),
            None => d.state.clone(),
        },
    );
    line(
        "created",
        format!("{} by {}", rfc3339(d.created_at), d.created_by),
    );
    if let Some(job) = d.job {
        line("job", format!("{job} (`gantry logs {job}`)"));
    }
    if d.approvals_needed > 0 {
        let by: Vec<String> = d.approvals.iter().map(|a| a.by.clone()).collect();
        line(
            "approvals",
            format!(
                "{}/{} {}",
                d.approvals.len(),
                d.approvals_needed,
                by.join(", ")
            ),
        );
    }
    if let Some(start) = d.started_at {
        let took = d.finished_at.unwrap_or(now).millis_since(start);
        line(
            "took",
            format!(
                "{}{}",
                human_duration(took),
                if d.finished_at.is_some() {
                    ""
                } else {
                    " so far"
                }
            ),
        );
    }
    let since = |t: Option<UnixMillis>| {
        t.zip(d.started_at).map_or_else(
            || "-".into(),
            |(t, s)| format!("+{}", human_duration(t.millis_since(s))),
        )
    };
    let headers = [
        "HOST", "STATE", "PREVIOUS", "STAGED", "SWITCHED", "ENDED", "REASON",
    ];
    let rows = rows_of(&headers, &d.hosts, |h| {
        vec![
            h.hostname.clone(),
            h.state.clone(),
            h.previous.clone().unwrap_or_else(|| "-".into()),
            since(h.staged_at),
            since(h.activated_at),
            since(h.ended_at),
            h.reason.clone().unwrap_or_default(),
        ]
    });
    s.push('\n');
    s.push_str(&table(&rows));
    if !d.log.is_empty() {
        let names: HashMap<&AgentId, &str> = d
            .hosts
            .iter()
            .map(|h| (&h.agent, h.hostname.as_str()))
            .collect();
        s.push_str("\nlog:\n");
        for l in &d.log {
            let host = l
                .agent
                .as_ref()
                .map(|a| format!("[{}] ", names.get(a).copied().unwrap_or(a.as_str())))
                .unwrap_or_default();
            let _ = writeln!(s, "  {} {host}{}", rfc3339(l.at), l.text);
        }
    }
    s
}
