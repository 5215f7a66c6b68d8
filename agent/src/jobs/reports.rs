//! A job's test and coverage reports (`reports: { junit: [GLOBS], coverage: FILE }`):
//! after the last step, whatever the job's outcome (a failing run is when they matter),
//! the files the globs select in the workspace are masked like the log and sent to the
//! coordinator on a stream of their own, which reads them and stores a summary before
//! it answers. The job's result is sent after that answer, so a finished job's summary
//! is already there. Only regular files inside the workspace are sent (a symlink out of
//! it is not followed), each at most [`MAX_REPORT_FILE_BYTES`], at most
//! [`MAX_REPORT_FILES`]; what is left out is sent as a note the summary shows.

use std::io::Read;
use std::path::{Path, PathBuf};

use gantry_protocol::reports::{MAX_REPORT_FILES, MAX_REPORT_FILE_BYTES};
use gantry_protocol::{
    Attempt, JobId, ReportKind, ReportUpload, Reports, ReportsStored, StreamOpen, TestReport,
};
use gantry_transport::{Connection, TransportError};

use crate::base::mask::Masker;
use crate::transfers::artifacts::{select_paths, WalkError};

/// Why reports could not be sent (the job's outcome does not change; its log says so).
#[derive(Debug, thiserror::Error)]
pub enum ReportsError {
    #[error("no connection to the coordinator")]
    NoConnection,
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the coordinator ended the stream without an answer")]
    NoAnswer,
    #[error("the coordinator refused them: {0}")]
    Refused(String),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One thing to send: a file to read, or a note.
#[derive(Debug)]
enum Item {
    File { kind: ReportKind, path: String },
    Note(String),
}

/// Selects, reads, masks and sends the report files of attempt `key` run in
/// `workspace`; returns the summary the coordinator stored.
pub async fn send(
    conn: &Connection,
    key: (JobId, Attempt),
    reports: &Reports,
    workspace: &Path,
    secrets: Vec<String>,
) -> Result<TestReport, ReportsError> {
    let items = {
        let (reports, workspace) = (reports.clone(), workspace.to_path_buf());
        tokio::task::spawn_blocking(move || select(&reports, &workspace)).await??
    };
    let (mut writer, mut reader) = conn.open_stream().await?;
    writer
        .send(&StreamOpen::Reports {
            job: key.0,
            attempt: key.1,
        })
        .await?;
    for item in items {
        let upload = match item {
            Item::Note(note) => ReportUpload::Note(note),
            Item::File { kind, path } => {
                let (workspace, secrets) = (workspace.to_path_buf(), secrets.clone());
                let rel = path.clone();
                match tokio::task::spawn_blocking(move || read(&workspace, &rel, &secrets)).await? {
                    Ok(data) => ReportUpload::File { kind, path, data },
                    Err(note) => ReportUpload::Note(format!("{path} {note}")),
                }
            }
        };
        writer.send(&upload).await?;
    }
    writer.send(&ReportUpload::End).await?;
    writer.finish();
    match reader.recv::<ReportsStored>().await? {
        Some(ReportsStored::Stored(report)) => Ok(report),
        Some(ReportsStored::Refused { message }) => Err(ReportsError::Refused(message)),
        None => Err(ReportsError::NoAnswer),
    }
}

/// The files to send, in order (JUnit globs, then the coverage file), and notes for
/// patterns that matched nothing and files past the count limit.
fn select(reports: &Reports, workspace: &Path) -> Result<Vec<Item>, WalkError> {
    let mut items = Vec::new();
    let mut files = 0usize;
    let mut add = |kind, patterns: &[String], items: &mut Vec<Item>| -> Result<(), WalkError> {
        let (paths, unmatched) = select_paths(workspace, patterns)?;
        for pattern in unmatched {
            items.push(Item::Note(format!("{pattern} matched no file")));
        }
        for path in paths {
            let path = path.to_string_lossy().into_owned();
            if workspace.join(&path).is_dir() {
                items.push(Item::Note(format!(
                    "{path} is a directory: name its files (e.g. {path}/*.xml)"
                )));
            } else if files >= MAX_REPORT_FILES {
                items.push(Item::Note(format!(
                    "{path} not sent: a job sends at most {MAX_REPORT_FILES} report files"
                )));
            } else {
                files += 1;
                items.push(Item::File { kind, path });
            }
        }
        Ok(())
    };
    add(ReportKind::Junit, &reports.junit, &mut items)?;
    if let Some(coverage) = &reports.coverage {
        add(
            ReportKind::Coverage,
            std::slice::from_ref(coverage),
            &mut items,
        )?;
    }
    Ok(items)
}

/// Why a selected file is not sent (said in the summary as a note).
#[derive(Debug, thiserror::Error)]
enum Unsent {
    #[error("cannot be read: {0}")]
    Io(#[from] std::io::Error),
    #[error("leads out of the workspace (a symlink): not sent")]
    Outside,
    #[error("is not a regular file: not sent")]
    NotAFile,
    #[error("is {0} bytes; the most sent is {MAX_REPORT_FILE_BYTES}: not sent")]
    TooLarge(u64),
}

/// Reads `rel` in `workspace` (a regular file inside it, at most
/// [`MAX_REPORT_FILE_BYTES`]) with every secret masked; or why not.
fn read(workspace: &Path, rel: &str, secrets: &[String]) -> Result<Vec<u8>, Unsent> {
    let path: PathBuf = workspace.join(rel).canonicalize()?;
    if !path.starts_with(workspace.canonicalize()?) {
        return Err(Unsent::Outside);
    }
    let file = std::fs::File::open(&path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Unsent::NotAFile);
    }
    let limit = MAX_REPORT_FILE_BYTES as u64;
    if meta.len() > limit {
        return Err(Unsent::TooLarge(meta.len()));
    }
    let mut data = Vec::new();
    file.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(Unsent::TooLarge(data.len() as u64));
    }
    let mut mask = Masker::new(secrets.iter().map(String::as_str));
    let mut out = mask.push(&data);
    out.extend(mask.finish());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_selected_masked_and_kept_inside_the_workspace() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("out")).expect("mkdir");
        std::fs::write(ws.join("out/a.xml"), "<testsuite>hunter2</testsuite>").expect("write");
        std::fs::write(dir.path().join("secret"), "outside").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), ws.join("out/b.xml"))
            .expect("symlink");
        let reports = Reports {
            junit: vec!["out/*.xml".into(), "missing/*.xml".into()],
            coverage: Some("out".into()),
        };
        let items = select(&reports, &ws).expect("selects");
        let text = format!("{items:?}");
        assert!(text.contains("missing/*.xml matched no file"), "{text}");
        assert!(text.contains("out is a directory"), "{text}");
        let secrets = vec!["hunter2".to_owned()];
        assert_eq!(
            read(&ws, "out/a.xml", &secrets).expect("reads"),
            b"<testsuite>***</testsuite>"
        );
        let refused = read(&ws, "out/b.xml", &secrets).expect_err("a symlink out");
        assert!(matches!(refused, Unsent::Outside), "{refused}");
    }
}
