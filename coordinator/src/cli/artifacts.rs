//! The artifact, cache and garbage-collection commands of the admin CLI:
//! `gantry artifacts list|get`, `gantry cache list|rm`, `gantry gc`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_protocol::{AdminRequest, Grant, ResolveReply, ResolveRequest, RunId, StreamOpen};
use gantry_transfer::{ChunkCache, TransferError, TransferOptions};

use crate::cli::connect::{admin, connect};
use crate::cli::failure::{usage, Failure};
use crate::cli::output;

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// The artifacts a run's jobs uploaded.
    List {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Downloads an artifact into a new or empty directory.
    Get {
        run: String,
        name: String,
        /// Where to write it (created if missing; must be empty).
        #[arg(long, short = 'o', value_name = "DIR")]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Stored caches, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Removes the caches with this key (in every pipeline and branch unless narrowed).
    Rm {
        key: String,
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long)]
        branch: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Say what would go, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Collect unreferenced chunks at least this old (default: the coordinator's
    /// artifacts.gc_grace, 1h); `0s` takes every unreferenced chunk that no open upload
    /// holds.
    #[arg(long, value_name = "DURATION")]
    grace: Option<String>,
    #[arg(long)]
    json: bool,
}

fn run_id(text: &str) -> Result<RunId, Failure> {
    text.parse::<RunId>()
        .map_err(|e| usage(anyhow::anyhow!("{e}; `gantry pipelines list` shows runs")))
}

pub async fn artifacts(cmd: ArtifactsCommand) -> Result<ExitCode, Failure> {
    match cmd {
        ArtifactsCommand::List { run, json } => {
            let resp = admin(AdminRequest::ListArtifacts { run: run_id(&run)? }).await?;
            output::print_response(&resp, json)
        }
        ArtifactsCommand::Get {
            run,
            name,
            output,
            json,
        } => get(run_id(&run)?, name, output, json).await,
    }
}

async fn get(run: RunId, name: String, dest: PathBuf, json: bool) -> Result<ExitCode, Failure> {
    let existed = dest.exists();
    if let Ok(mut entries) = std::fs::read_dir(&dest) {
        if entries.next().is_some() {
            return Err(usage(anyhow::anyhow!(
                "{} is not empty: artifacts are written into a new or empty directory",
                dest.display()
            )));
        }
    } else if dest.exists() {
        return Err(usage(anyhow::anyhow!(
            "{} exists and is not a directory",
            dest.display()
        )));
    }
    let client = connect().await?;
    let conn = client.connection().clone();
    let resolved = async {
        let open = StreamOpen::Resolve(ResolveRequest::Artifact {
            run,
            name: name.clone(),
        });
        let (mut writer, mut reader) = conn.open_stream_with(&open).await?;
        writer.finish();
        reader.recv::<ResolveReply>().await
    }
    .await
    .map_err(|e| Failure::Unreachable(e.into()))?;
    let artifact = match resolved {
        Some(ResolveReply::Artifacts(mut found)) if found.len() == 1 => found.remove(0),
        Some(ResolveReply::Refused { message }) => return Err(usage(anyhow::anyhow!(message))),
        other => {
            return Err(Failure::Work(anyhow::anyhow!(
                "unexpected answer from the coordinator: {other:?}"
            )))
        }
    };
    // The CLI keeps no cache between runs: chunks pass through a temporary directory.
    let scratch = tempfile::Builder::new()
        .prefix("gantry-get-")
        .tempdir()
        .context("cannot create a temporary directory")
        .map_err(Failure::Work)?;
    let cache = ChunkCache::open(scratch.path(), u64::MAX)
        .context("cannot create a temporary chunk cache")
        .map_err(Failure::Work)?;
    let figures = gantry_transfer::download(
        &conn,
        &Grant::Admin,
        &artifact.manifest,
        &cache,
        &dest,
        gantry_cas::Existing::Refuse,
        &TransferOptions::default(),
    )
    .await;
    let figures = match figures {
        Ok(f) => f,
        Err(e) => {
            // The destination was new or empty: leave it as it was, not half written.
            discard(&dest, existed);
            return Err(match e {
                TransferError::Transport(t) => Failure::Unreachable(t.into()),
                TransferError::Refused(m) => usage(anyhow::anyhow!(m)),
                other => Failure::Work(anyhow::anyhow!("artifact {name} of run {run}: {other}")),
            });
        }
    };
    client.close().await;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "artifact": artifact,
                "output": dest,
                "files": figures.files,
                "bytes": figures.bytes,
                "chunks": figures.chunks,
                "chunks_fetched": figures.chunks_fetched,
                "bytes_fetched": figures.bytes_fetched,
            })
        );
    } else {
        println!(
            "{name} of run {run}: {} files, {} written to {}",
            figures.files,
            output::human_bytes(figures.bytes),
            dest.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes what a failed download wrote into `dest`, which was empty (or absent) before.
fn discard(dest: &std::path::Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(dest);
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dest) {
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let _ = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

pub async fn cache(cmd: CacheCommand) -> Result<ExitCode, Failure> {
    let (req, json) = match cmd {
        CacheCommand::List { json } => (AdminRequest::ListCaches, json),
        CacheCommand::Rm {
            key,
            pipeline,
            branch,
            json,
        } => (
            AdminRequest::RemoveCache {
                key,
                pipeline,
                branch,
            },
            json,
        ),
    };
    let resp = admin(req).await?;
    output::print_response(&resp, json)
}

pub async fn gc(args: GcArgs) -> Result<ExitCode, Failure> {
    let grace_secs = args
        .grace
        .as_deref()
        .map(|g| {
            crate::base::config::parse_duration(g)
                .context("--grace")
                .map_err(usage)
        })
        .transpose()?
        .map(|d: Duration| d.as_secs());
    let resp = admin(AdminRequest::Gc {
        dry_run: args.dry_run,
        grace_secs,
    })
    .await?;
    output::print_response(&resp, args.json)
}
