//! Ad-hoc commands on this host (`gantry exec`): `/bin/sh -c` in the deploy root, its
//! output streamed to the session as it comes, then its exit.
//!
//! Owns each command's process group (killed at the command's timeout, and whatever it
//! left running killed when it ends) and the pieces of output it sends (at most
//! [`PIECE`] bytes each). It must not touch releases: that is the deployer's.

use std::path::PathBuf;
use std::time::Duration;

use gantry_protocol::{AgentMessage, ExecCommand};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::base::process::{exit_code, group_of, signal_group};

/// Largest piece of command output sent at once.
const PIECE: usize = 16 * 1024;
/// How long the output may keep draining after the command's group was killed.
const DRAIN: Duration = Duration::from_secs(2);

/// Why a command did not run to its exit.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot create {}: {source}", path.display())]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start /bin/sh: {0}")]
    Spawn(std::io::Error),
    #[error("waiting for the command failed: {0}")]
    Wait(std::io::Error),
    #[error("timed out after {} s", .0.as_secs())]
    TimedOut(Duration),
}

/// Runs ad-hoc commands in `root`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdHocCommands {
    root: PathBuf,
    out: mpsc::UnboundedSender<AgentMessage>,
}

impl AdHocCommands {
    /// `out` carries the output and the exit to the session.
    pub fn new(root: PathBuf, out: mpsc::UnboundedSender<AgentMessage>) -> Self {
        Self { root, out }
    }

    /// Runs a command in the background, streaming its output and then its exit.
    pub fn run(&self, command: ExecCommand) {
        let me = self.clone();
        tokio::spawn(async move {
            // The wire carries the error as text (`ExecDone.result`).
            let result = me.execute(&command).await.map_err(|e| e.to_string());
            let _ = me.out.send(AgentMessage::ExecDone {
                id: command.id,
                result,
            });
        });
    }

    async fn execute(&self, command: &ExecCommand) -> Result<i32, CommandError> {
        std::fs::create_dir_all(&self.root).map_err(|source| CommandError::Root {
            path: self.root.clone(),
            source,
        })?;
        let mut shell = tokio::process::Command::new("/bin/sh");
        shell
            .arg("-c")
            .arg(&command.command)
            .current_dir(&self.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        crate::base::process::without_ambient_capabilities(&mut shell);
        let mut child = shell.spawn().map_err(CommandError::Spawn)?;
        let pgid = group_of(&child);
        let pumps: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|pipe| tokio::spawn(forward(pipe, self.out.clone(), command.id)))
        .collect();
        let timeout = Duration::from_millis(command.timeout_ms.max(1));
        let result = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => Ok(exit_code(status)),
            Ok(Err(e)) => Err(CommandError::Wait(e)),
            Err(_) => {
                signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
                Err(CommandError::TimedOut(timeout))
            }
        };
        signal_group(pgid, libc::SIGKILL);
        for pump in pumps {
            let _ = tokio::time::timeout(DRAIN, pump).await;
        }
        result
    }
}

/// Sends a pipe's output to the session in pieces of at most [`PIECE`] bytes.
async fn forward(
    mut pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    out: mpsc::UnboundedSender<AgentMessage>,
    id: u64,
) {
    let mut buf = vec![0u8; PIECE];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0
            || out
                .send(AgentMessage::ExecOutput {
                    id,
                    data: buf[..n].to_vec(),
                })
                .is_err()
        {
            return;
        }
    }
}
