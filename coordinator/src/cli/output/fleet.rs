//! Agents as a table and in detail.

use std::fmt::Write as _;

use gantry_protocol::{AgentView, UnixMillis};

use crate::cli::output::table::{human_bytes, human_duration, rfc3339, rows_of, table};

/// The `gantry agents list` table.
pub fn agents_table(agents: &[AgentView], now: UnixMillis) -> String {
    let headers = [
        "AGENT",
        "HOSTNAME",
        "STATE",
        "LAST SEEN",
        "CPU",
        "MEMORY",
        "LOAD",
        "LABELS",
    ];
    let rows = rows_of(&headers, agents, |a| {
        let f = a.figures.as_ref();
        vec![
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
        ]
    });
    table(&rows)
}

pub fn agent_detail(a: &AgentView, now: UnixMillis) -> String {
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
