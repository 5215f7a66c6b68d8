//! Running a deploy hook or a command check: `/bin/sh -c` in the release's directory,
//! in a process group of its own, with exactly the environment it is given, bounded by
//! a timeout (SIGTERM to the group, SIGKILL [`HOOK_KILL_GRACE`] later).
//!
//! Its output goes to a file, not a pipe, so a hook may leave a server running without
//! either side blocking on the other; the last [`HOOK_OUTPUT_TAIL`] bytes of it come
//! back for the log. What a hook's exit means is the deployer's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_protocol::Labels;

use crate::base::process::{exit_code, group_of, signal_group};

/// Hook output kept for the log.
const HOOK_OUTPUT_TAIL: usize = 8 * 1024;
/// Time between SIGTERM and SIGKILL for a hook past its timeout.
const HOOK_KILL_GRACE: Duration = Duration::from_secs(5);

/// Why a hook could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot create a file for hook output: {0}")]
    OutputFile(std::io::Error),
    #[error("cannot share the hook output file: {0}")]
    ShareOutput(std::io::Error),
    #[error("cannot start /bin/sh in {}: {source}", dir.display())]
    Spawn {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for the hook failed: {0}")]
    Wait(std::io::Error),
    #[error("did not finish within {} s and was stopped", .0.as_secs())]
    TimedOut(Duration),
}

/// Runs `/bin/sh -c script` in `dir` with exactly `env`, its output to a file; returns
/// the exit code and the tail of the output. Past `timeout` its process group gets
/// SIGTERM, then SIGKILL.
pub async fn run_shell(
    script: &str,
    dir: &Path,
    env: &Labels,
    timeout: Duration,
) -> Result<(i32, String), HookError> {
    let output = tempfile::tempfile().map_err(HookError::OutputFile)?;
    let stderr = output.try_clone().map_err(HookError::ShareOutput)?;
    let stdout = output.try_clone().map_err(HookError::ShareOutput)?;
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    crate::base::process::without_ambient_capabilities(&mut command);
    let mut child = command.spawn().map_err(|source| HookError::Spawn {
        dir: dir.to_path_buf(),
        source,
    })?;
    let pgid = group_of(&child);
    let code = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => exit_code(status),
        Ok(Err(e)) => return Err(HookError::Wait(e)),
        Err(_) => {
            signal_group(pgid, libc::SIGTERM);
            if tokio::time::timeout(HOOK_KILL_GRACE, child.wait())
                .await
                .is_err()
            {
                signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
            }
            return Err(HookError::TimedOut(timeout));
        }
    };
    Ok((code, tail(output)))
}

/// The last [`HOOK_OUTPUT_TAIL`] bytes of a file, as text.
fn tail(mut file: std::fs::File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.seek(SeekFrom::End(0)).unwrap_or(0);
    let start = len.saturating_sub(HOOK_OUTPUT_TAIL as u64);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_ok() {
        let _ = file.take(HOOK_OUTPUT_TAIL as u64).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
