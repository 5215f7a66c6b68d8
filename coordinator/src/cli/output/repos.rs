//! Repositories as a table and as a detail page.

use std::fmt::Write as _;

use gantry_protocol::RepoView;

use crate::cli::output::table::{rfc3339, rows_of, table};

pub fn repos_table(repos: &[RepoView]) -> String {
    let headers = ["NAME", "URL", "FORGE", "AUTH", "POLL", "LAST FETCH"];
    let rows = rows_of(&headers, repos, |r| {
        vec![
            r.name.clone(),
            r.url.clone(),
            r.forge.clone().unwrap_or_else(|| "-".into()),
            r.auth.clone(),
            r.poll_secs.map_or_else(|| "-".into(), |s| format!("{s}s")),
            last_fetch(r),
        ]
    });
    table(&rows)
}

pub fn repo_detail(r: &RepoView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "repository     {}", r.name);
    let _ = writeln!(out, "url            {}", r.url);
    let _ = writeln!(out, "forge          {}", r.forge.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "auth           {}", r.auth);
    let _ = writeln!(out, "pipeline file  {}", r.pipeline_file);
    let poll = r
        .poll_secs
        .map_or_else(|| "off".into(), |s| format!("every {s}s"));
    let _ = writeln!(out, "poll           {poll}");
    let _ = writeln!(out, "webhook        {}", r.webhook);
    let _ = writeln!(
        out,
        "added          {} by {}",
        rfc3339(r.created_at),
        r.created_by
    );
    let _ = writeln!(out, "last fetch     {}", last_fetch(r));
    for (name, commit) in &r.heads {
        let _ = writeln!(out, "  {commit}  {name}");
    }
    let _ = writeln!(out, "statuses to    {}", r.status_api);
    if !r.status_failures.is_empty() {
        let _ = writeln!(out, "status failures (last {}):", r.status_failures.len());
        for line in &r.status_failures {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn last_fetch(r: &RepoView) -> String {
    match (&r.last_error, r.fetched_at) {
        (Some(e), _) => format!("failed: {e}"),
        (None, Some(at)) => rfc3339(at),
        (None, None) => "never".into(),
    }
}
