//! Running the `git` program: every invocation has a deadline, bounded output, a clean
//! environment and its own process group.
//!
//! A git that runs past its deadline is killed with its whole process group (the ssh,
//! `git-remote-https` and `git-upload-pack` processes it started), so nothing is left
//! behind. Standard output is kept up to a limit (past it the group is killed and the
//! call fails); standard error keeps its last [`STDERR_TAIL`] bytes for the error
//! message. The environment is cleared: the coordinator's own `GIT_*` variables, its
//! user's `~/.gitconfig` and the system's `/etc/gitconfig` (credential helpers, `url.*.
//! insteadOf`, hooks paths) never reach a fetch; what a call needs is passed explicitly.
//!
//! This module must not know what a call is for: callers name it (`what`) for errors.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::error::GitError;

/// Bytes of standard error kept for an error message (its end, where git says why).
pub(crate) const STDERR_TAIL: usize = 16 * 1024;

/// Standard output kept by default: enough for `ls-tree` of a 1,000,000-entry tree
/// (~100 bytes an entry) and not much more.
pub(crate) const DEFAULT_MAX_STDOUT: usize = 128 * 1024 * 1024;

/// The git program and the environment every call gets.
#[derive(Debug, Clone)]
pub struct GitProgram {
    program: PathBuf,
    /// PATH for git's own helpers and for ssh.
    path_var: OsString,
    home: Option<OsString>,
}

impl Default for GitProgram {
    fn default() -> Self {
        Self::new("git")
    }
}

impl GitProgram {
    /// `program` is the git binary (a bare name is looked up on PATH).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            path_var: std::env::var_os("PATH")
                .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin")),
            home: std::env::var_os("HOME"),
        }
    }

    /// A command for `git ARGS` with the clean environment and `config` passed through
    /// `GIT_CONFIG_COUNT` (never on the command line, where other users can read it).
    pub(crate) fn command(&self, dir: Option<&Path>, config: &[(String, String)]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.env_clear()
            .env("PATH", &self.path_var)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ATTR_NOSYSTEM", "1")
            // A `git://` or `file://` URL typed by a user may name any transport; with
            // this set to 0 only the `protocol.*.allow` lines below decide.
            .env("GIT_PROTOCOL_FROM_USER", "0")
            .env("GIT_CONFIG_COUNT", config.len().to_string());
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
        for (index, (key, value)) in config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{index}"), key)
                .env(format!("GIT_CONFIG_VALUE_{index}"), value);
        }
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }
}

/// One git invocation to run to completion.
pub(crate) struct Invocation<'a> {
    pub what: String,
    pub args: Vec<OsString>,
    pub dir: Option<&'a Path>,
    pub config: Vec<(String, String)>,
    pub extra_env: Vec<(String, OsString)>,
    pub stdin: Option<Vec<u8>>,
    pub deadline: Duration,
    pub max_stdout: usize,
}

impl<'a> Invocation<'a> {
    pub(crate) fn new(what: impl Into<String>, dir: Option<&'a Path>, deadline: Duration) -> Self {
        Self {
            what: what.into(),
            args: Vec::new(),
            dir,
            config: Vec::new(),
            extra_env: Vec::new(),
            stdin: None,
            deadline,
            max_stdout: DEFAULT_MAX_STDOUT,
        }
    }

    pub(crate) fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
}

/// What a finished invocation left.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Finished {
    /// The last non-empty line of standard error, for one-line messages.
    pub(crate) fn last_error_line(&self) -> String {
        last_line(&self.stderr)
    }
}

pub(crate) fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("(no error output)")
        .to_owned()
}

/// Kills a process group when its deadline passes, unless disarmed first (dropped).
pub(crate) struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Watchdog {
    pub(crate) fn arm(child: &Child, deadline: Duration) -> Self {
        let (disarm, armed) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let pid = rustix::process::Pid::from_raw(child.id().cast_signed());
        let flag = Arc::clone(&fired);
        let thread = std::thread::Builder::new()
            .name("git-deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(deadline) {
                    flag.store(true, Ordering::SeqCst);
                    if let Some(pid) = pid {
                        // The child leads its own group (process_group(0)): this ends
                        // git and every helper it started.
                        let _ =
                            rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                    }
                }
            })
            .ok();
        Self {
            disarm: Some(disarm),
            fired,
            thread,
            started: Instant::now(),
        }
    }

    pub(crate) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Kills a child's whole process group (its own, from `process_group(0)`).
pub(crate) fn kill_group(child: &Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id().cast_signed()) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Reads standard error keeping its last [`STDERR_TAIL`] bytes.
pub(crate) fn spawn_stderr_reader(
    mut stderr: std::process::ChildStderr,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
            }
        }
        if tail.len() > STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
        String::from_utf8_lossy(&tail).into_owned()
    })
}

/// Runs an invocation to completion within its deadline.
pub(crate) fn run(git: &GitProgram, inv: Invocation<'_>) -> Result<Finished, GitError> {
    let mut cmd = git.command(inv.dir, &inv.config);
    cmd.args(&inv.args);
    for (key, value) in &inv.extra_env {
        cmd.env(key, value);
    }
    cmd.stdin(if inv.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| GitError::Io {
        context: format!("{}: starting git", inv.what),
        source,
    })?;
    let watchdog = Watchdog::arm(&child, inv.deadline);
    let stdin_thread = match (child.stdin.take(), inv.stdin) {
        (Some(mut pipe), Some(bytes)) => Some(std::thread::spawn(move || {
            // A git that stops reading (it failed) closes the pipe: the error is its own.
            let _ = pipe.write_all(&bytes);
        })),
        _ => None,
    };
    let stderr_thread = child.stderr.take().map(spawn_stderr_reader);
    let mut overflow = false;
    let mut stdout = Vec::new();
    if let Some(mut pipe) = child.stdout.take() {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if stdout.len() + n > inv.max_stdout {
                        overflow = true;
                        kill_group(&child);
                        break;
                    }
                    stdout.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    let status = child.wait().map_err(|source| GitError::Io {
        context: format!("{}: waiting for git", inv.what),
        source,
    })?;
    if let Some(thread) = stdin_thread {
        let _ = thread.join();
    }
    let stderr = stderr_thread
        .and_then(|t| t.join().ok())
        .unwrap_or_default();
    let fired = watchdog.fired();
    let elapsed = watchdog.elapsed();
    drop(watchdog);
    if fired {
        return Err(GitError::TimedOut {
            what: inv.what,
            elapsed,
        });
    }
    if overflow {
        return Err(GitError::OutputTooLarge {
            what: inv.what,
            limit: inv.max_stdout,
        });
    }
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

/// Runs an invocation and requires success; a failure becomes [`GitError::Failed`].
pub(crate) fn run_ok(git: &GitProgram, inv: Invocation<'_>) -> Result<Vec<u8>, GitError> {
    let what = inv.what.clone();
    let finished = run(git, inv)?;
    if finished.status.success() {
        Ok(finished.stdout)
    } else {
        Err(GitError::Failed {
            what,
            status: finished.status.to_string(),
            detail: finished.last_error_line(),
        })
    }
}

/// A long-running git (`cat-file --batch`) whose pipes the caller drives, under a
/// deadline for the whole conversation.
pub(crate) struct Streaming {
    pub what: String,
    child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: ChildStdout,
    stderr: Option<std::thread::JoinHandle<String>>,
    watchdog: Option<Watchdog>,
}

impl Streaming {
    pub(crate) fn spawn(
        git: &GitProgram,
        what: impl Into<String>,
        dir: &Path,
        args: &[&str],
        deadline: Duration,
    ) -> Result<Self, GitError> {
        let what = what.into();
        let mut cmd = git.command(Some(dir), &[]);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| GitError::Io {
            context: format!("{what}: starting git"),
            source,
        })?;
        let watchdog = Watchdog::arm(&child, deadline);
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().map(spawn_stderr_reader);
        let Some(stdout) = child.stdout.take() else {
            kill_group(&child);
            let _ = child.wait();
            return Err(GitError::Io {
                context: format!("{what}: git's output"),
                source: std::io::Error::other("no stdout pipe"),
            });
        };
        Ok(Self {
            what,
            child,
            stdin,
            stdout,
            stderr,
            watchdog: Some(watchdog),
        })
    }

    /// The error to report for a read that failed or ended early: the deadline if it
    /// fired, otherwise git's last error line.
    pub(crate) fn failure(&mut self, detail: &str) -> GitError {
        kill_group(&self.child);
        let _ = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if let Some(watchdog) = &self.watchdog {
            if watchdog.fired() {
                return GitError::TimedOut {
                    what: self.what.clone(),
                    elapsed: watchdog.elapsed(),
                };
            }
        }
        let git_said = last_line(&stderr);
        GitError::Parse {
            what: self.what.clone(),
            detail: format!("{detail} (git: {git_said})"),
        }
    }

    /// Ends git and everything it started.
    pub(crate) fn kill(&mut self) {
        kill_group(&self.child);
        let _ = self.child.wait();
    }

    /// Closes standard input and waits for a clean exit.
    pub(crate) fn finish(mut self) -> Result<(), GitError> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let _ = (&mut self.stdout).take(1 << 20).read_to_end(&mut rest);
        let status = self.child.wait().map_err(|source| GitError::Io {
            context: format!("{}: waiting for git", self.what),
            source,
        })?;
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let fired = self.watchdog.as_ref().is_some_and(Watchdog::fired);
        if fired {
            return Err(GitError::TimedOut {
                what: self.what.clone(),
                elapsed: self
                    .watchdog
                    .as_ref()
                    .map_or(Duration::ZERO, Watchdog::elapsed),
            });
        }
        if status.success() {
            Ok(())
        } else {
            Err(GitError::Failed {
                what: self.what.clone(),
                status: status.to_string(),
                detail: last_line(&stderr),
            })
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // Finished or not, nothing outlives the conversation.
        if let Ok(None) = self.child.try_wait() {
            kill_group(&self.child);
            let _ = self.child.wait();
        }
        self.watchdog.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_its_limit_stops_git() {
        let mut inv =
            Invocation::new("printing the version", None, Duration::from_secs(30)).arg("--version");
        inv.max_stdout = 4;
        let err = run(&GitProgram::default(), inv).expect_err("over the limit");
        assert!(
            matches!(err, GitError::OutputTooLarge { limit: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_failure_reports_git_s_last_error_line() {
        let inv = Invocation::new(
            "reading a missing repository",
            Some(Path::new("/")),
            Duration::from_secs(30),
        )
        .args(["--git-dir=/nonexistent", "rev-parse", "HEAD"]);
        let err = run_ok(&GitProgram::default(), inv).expect_err("no repository");
        let text = err.to_string();
        assert!(
            text.starts_with("reading a missing repository: git failed"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
    }
}
