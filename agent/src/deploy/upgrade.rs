//! Fleet upgrades on this host: fetching a new agent binary from the coordinator, and
//! restarting into it once no job runs, or back into the one before.
//!
//! Owns `DATA/bin/`: `gantry-agent` (the binary an upgrade installed; `gantry-agent run`
//! execs it at start when it is not older than itself), `gantry-agent.previous` (the one
//! before, for a rollback), `.staged-<sha256>` (fetched, checked, not yet used),
//! `gantry-agent.failed` (an upgraded binary that did not come up) and `probation`
//! (written before restarting into an upgraded binary, removed by it once the
//! coordinator welcomed it; one still there at the next start means the upgraded binary
//! never got that far, so the installed one runs instead). The installed binary (the
//! package's) is never written: an agent running as an unprivileged user can upgrade
//! itself, and removing `DATA/bin/gantry-agent` always goes back to the package.
//!
//! A restart is an `exec` of the new binary with the same arguments: the process keeps
//! its pid (systemd sees no exit); the connection drops, the new binary connects, and
//! the coordinator sends the step again, which it answers from what it runs.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use gantry_transport::TransportError;
use std::time::Duration;

use gantry_protocol::{AgentBinary, HostReport, SourceData, StreamOpen};

use crate::base::files::{sha256_file, sync_dir, write_durably};
use crate::jobs::JobManager;
use crate::transfers::ConnectionSource;

/// The environment variable that carries the installed binary's path across restarts.
const INSTALLED_ENV: &str = "GANTRY_AGENT_INSTALLED_BINARY";
const UPGRADED: &str = "gantry-agent";
const PREVIOUS: &str = "gantry-agent.previous";
const FAILED: &str = "gantry-agent.failed";
const PROBATION: &str = "probation";
/// Longest a new binary may take to print its version.
const VERSION_CHECK: Duration = Duration::from_secs(10);
/// How often a draining agent looks whether its jobs have ended.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// Largest agent binary accepted.
const MAX_BINARY_BYTES: u64 = 512 * 1024 * 1024;

fn bin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("bin")
}

/// The binary this process runs cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OwnBinaryError {
    #[error("cannot find my binary: {0}")]
    Find(std::io::Error),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The SHA-256 of the binary this process runs (computed once).
pub fn own_sha256() -> Result<String, Arc<OwnBinaryError>> {
    static OWN: OnceLock<Result<String, Arc<OwnBinaryError>>> = OnceLock::new();
    OWN.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| Arc::new(OwnBinaryError::Find(e)))?;
        sha256_file(&exe).map_err(|source| Arc::new(OwnBinaryError::Read { path: exe, source }))
    })
    .clone()
}

/// A binary's `--version` did not answer as an agent's does.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("cannot run {}: {source}", binary.display())]
    Run {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{} --version exited with {status}: not a working agent binary", binary.display())]
    Exit {
        binary: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("{} --version did not answer within {} s", binary.display(), VERSION_CHECK.as_secs())]
    NoAnswer { binary: PathBuf },
}

/// Restarting into another binary failed (a restart that works does not return).
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("cannot write {}: {source}", path.display())]
    Probation {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot restart into {}: {source}", binary.display())]
    Exec {
        binary: PathBuf,
        source: std::io::Error,
    },
}

/// Why an upgrade step failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    OwnBinary(#[from] Arc<OwnBinaryError>),
    #[error("a {0}-byte agent binary is too large")]
    TooLarge(u64),
    #[error("cannot create {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    VersionCheck(tokio::task::JoinError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("the fetched binary says it is {got:?}, not {expected:?}")]
    WrongVersion { got: String, expected: String },
    #[error("no connection to the coordinator to fetch the agent binary from")]
    NoConnection,
    #[error(transparent)]
    Transport(TransportError),
    #[error("the agent binary's transfer broke off: {0}")]
    BrokeOff(TransportError),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the coordinator sent more bytes than the binary has")]
    TooManyBytes,
    #[error("the coordinator has no agent binary {0} (did its agent_binary change?)")]
    NoSuchBinary(String),
    #[error("the agent binary arrived as {got}, not {expected}: refusing it")]
    DigestMismatch { got: String, expected: String },
    #[error("cannot make {} executable: {source}", path.display())]
    MakeExecutable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot keep {}: {source}", path.display())]
    Keep {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this binary did not come up here before (kept as {}); not trying it again", kept.display())]
    FailedBefore { kept: PathBuf },
    #[error("the binary is not staged here; stage it first")]
    NotStaged,
    #[error("cannot keep the previous binary: {0}")]
    KeepPrevious(std::io::Error),
    #[error("cannot install {}: {source}", path.display())]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Restart(#[from] RestartError),
    #[error("cannot find the installed agent binary")]
    NoInstalledBinary,
    #[error("cannot restore the previous binary: {0}")]
    RestorePrevious(std::io::Error),
    #[error("cannot set the upgraded binary aside: {0}")]
    SetAside(std::io::Error),
    #[error("no binary {0} here to go back to")]
    NothingToGoBackTo(String),
}

/// `X.Y.Z` from `gantry-agent X.Y.Z`, as numbers, for comparing.
fn version_numbers(text: &str) -> Vec<u64> {
    text.split_whitespace()
        .last()
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// What `binary --version` prints (its first line), if it runs and exits 0 in time.
fn version_of(binary: &Path) -> Result<String, VersionError> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| VersionError::Run {
            binary: binary.to_path_buf(),
            source,
        })?;
    let deadline = std::time::Instant::now() + VERSION_CHECK;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => {
                return Err(VersionError::Exit {
                    binary: binary.to_path_buf(),
                    status,
                })
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VersionError::NoAnswer {
                    binary: binary.to_path_buf(),
                });
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read as _;
        let _ = stdout.read_to_string(&mut out);
    }
    Ok(out.lines().next().unwrap_or_default().trim().to_owned())
}

/// Called first by `gantry-agent run`: if a fleet upgrade left a binary in `DATA/bin`
/// and this process is not it, restart into it (this returns only when it does not).
/// An upgraded binary on probation (it never reached the coordinator) is set aside, and
/// one older than this binary (the package was upgraded since) is not used.
pub fn run_upgraded_binary(data_dir: &Path) {
    let dir = bin_dir(data_dir);
    let upgraded = dir.join(UPGRADED);
    if !upgraded.exists() {
        return;
    }
    let (Ok(own), Ok(target)) = (
        std::env::current_exe().and_then(std::fs::canonicalize),
        std::fs::canonicalize(&upgraded),
    ) else {
        return;
    };
    if own == target {
        return;
    }
    if dir.join(PROBATION).exists() {
        eprintln!(
            "warning: the upgraded agent binary {} did not reach the coordinator last time; running the installed one and keeping it as {}",
            upgraded.display(),
            dir.join(FAILED).display()
        );
        let _ = std::fs::rename(&upgraded, dir.join(FAILED));
        let _ = std::fs::remove_file(dir.join(PROBATION));
        return;
    }
    match version_of(&upgraded) {
        Ok(v) if version_numbers(&v) < version_numbers(env!("CARGO_PKG_VERSION")) => {
            eprintln!(
                "note: the installed agent ({}) is newer than the upgraded one in {} ({v}); running the installed one",
                env!("CARGO_PKG_VERSION"),
                upgraded.display()
            );
        }
        Ok(_) => {
            let err = restart_into(&upgraded, data_dir, true);
            eprintln!("warning: {err}; running the installed binary");
        }
        Err(e) => eprintln!("warning: {e}; running the installed binary"),
    }
}

/// Called once the coordinator welcomed this process: the binary works here.
pub fn confirm(data_dir: &Path) {
    let probation = bin_dir(data_dir).join(PROBATION);
    if probation.exists() {
        if let Err(e) = std::fs::remove_file(&probation) {
            tracing::warn!("cannot remove {}: {e}", probation.display());
        } else {
            tracing::info!("the upgraded agent binary is confirmed");
        }
    }
}

/// The binary the host installed (where the first process of this agent came from).
fn installed_binary() -> Option<PathBuf> {
    std::env::var_os(INSTALLED_ENV)
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
}

/// Replaces this process with `binary`, same arguments; returns only on failure.
fn restart_into(binary: &Path, data_dir: &Path, probation: bool) -> RestartError {
    if probation {
        let path = bin_dir(data_dir).join(PROBATION);
        if let Err(source) = write_durably(&path, b"1") {
            return RestartError::Probation { path, source };
        }
    }
    let installed = installed_binary().unwrap_or_else(|| binary.to_path_buf());
    let source = std::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .env(INSTALLED_ENV, installed)
        .exec();
    RestartError::Exec {
        binary: binary.to_path_buf(),
        source,
    }
}

/// Carries out the upgrade steps of a fleet upgrade.
#[derive(Clone)]
pub struct Upgrader {
    data_dir: PathBuf,
    jobs: JobManager,
    source: Arc<dyn ConnectionSource>,
}

impl std::fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrader")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Upgrader {
    pub fn new(data_dir: PathBuf, jobs: JobManager, source: Arc<dyn ConnectionSource>) -> Self {
        Self {
            data_dir,
            jobs,
            source,
        }
    }

    fn report() -> Result<HostReport, UpgradeError> {
        Ok(HostReport {
            current: Some(own_sha256()?),
            releases: Vec::new(),
        })
    }

    /// When this process runs `binary` already: says so (`running` is the verb) and
    /// answers with the report; a step that finds its work done is done.
    fn if_running(
        binary: &AgentBinary,
        log: &mut Vec<String>,
        running: &str,
    ) -> Result<Option<HostReport>, UpgradeError> {
        if own_sha256()? != binary.sha256 {
            return Ok(None);
        }
        log.push(format!(
            "{running} {} ({})",
            binary.version,
            short(&binary.sha256)
        ));
        Self::report().map(Some)
    }

    fn staged(&self, sha256: &str) -> PathBuf {
        bin_dir(&self.data_dir).join(format!(".staged-{sha256}"))
    }

    /// Fetches the binary, checks its digest and that it runs, and keeps it ready.
    pub async fn stage(
        &self,
        binary: &AgentBinary,
        log: &mut Vec<String>,
    ) -> Result<HostReport, UpgradeError> {
        if let Some(report) = Self::if_running(binary, log, "already running")? {
            return Ok(report);
        }
        if binary.bytes > MAX_BINARY_BYTES {
            return Err(UpgradeError::TooLarge(binary.bytes));
        }
        let dir = bin_dir(&self.data_dir);
        std::fs::create_dir_all(&dir).map_err(|source| UpgradeError::Create {
            path: dir.clone(),
            source,
        })?;
        let staged = self.staged(&binary.sha256);
        if !(staged.exists()
            && sha256_file(&staged).ok().as_deref() == Some(binary.sha256.as_str()))
        {
            self.fetch(binary, &staged).await?;
        }
        let path = staged.clone();
        let version = tokio::task::spawn_blocking(move || version_of(&path))
            .await
            .map_err(UpgradeError::VersionCheck)??;
        if version != binary.version {
            return Err(UpgradeError::WrongVersion {
                got: version,
                expected: binary.version.clone(),
            });
        }
        log.push(format!(
            "staged {} ({}, {} bytes); it runs",
            binary.version,
            short(&binary.sha256),
            binary.bytes
        ));
        Self::report()
    }

    async fn fetch(&self, binary: &AgentBinary, dest: &Path) -> Result<(), UpgradeError> {
        let conn = self
            .source
            .current()
            .filter(|c| c.close_reason().is_none())
            .ok_or(UpgradeError::NoConnection)?;
        let open = StreamOpen::FetchAgentBinary {
            sha256: binary.sha256.clone(),
        };
        let (mut writer, mut reader) = conn
            .open_stream_with(&open)
            .await
            .map_err(UpgradeError::Transport)?;
        writer.finish();
        let tmp = dest.with_extension("part");
        let write_err = |source| UpgradeError::Write {
            path: tmp.clone(),
            source,
        };
        let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut bytes = 0u64;
        while let Some(SourceData(piece)) = reader.recv().await.map_err(UpgradeError::BrokeOff)? {
            bytes += piece.len() as u64;
            if bytes > binary.bytes {
                let _ = std::fs::remove_file(&tmp);
                return Err(UpgradeError::TooManyBytes);
            }
            ctx.update(&piece);
            std::io::Write::write_all(&mut file, &piece).map_err(write_err)?;
        }
        let got = gantry_certs::hex(ctx.finish().as_ref());
        if bytes == 0 {
            let _ = std::fs::remove_file(&tmp);
            return Err(UpgradeError::NoSuchBinary(short(&binary.sha256).to_owned()));
        }
        if got != binary.sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err(UpgradeError::DigestMismatch {
                got: short(&got).to_owned(),
                expected: short(&binary.sha256).to_owned(),
            });
        }
        file.sync_all().map_err(write_err)?;
        drop(file);
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|source| UpgradeError::MakeExecutable {
                path: tmp.clone(),
                source,
            })?;
        std::fs::rename(&tmp, dest).map_err(|source| UpgradeError::Keep {
            path: dest.to_path_buf(),
            source,
        })?;
        sync_dir(&bin_dir(&self.data_dir));
        Ok(())
    }

    /// Waits until no job runs (taking none meanwhile).
    async fn drain(&self, log: &mut Vec<String>) {
        self.jobs.set_draining(true);
        let mut said = false;
        loop {
            let running = self.jobs.running().len();
            if running == 0 {
                return;
            }
            if !said {
                tracing::info!(
                    "waiting for {running} job(s) to end before restarting into another binary"
                );
                log.push(format!("waiting for {running} running job(s) to end"));
                said = true;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Restarts into the staged binary once no job runs; answers when this step comes
    /// again to the restarted agent.
    pub async fn activate(
        &self,
        binary: &AgentBinary,
        log: &mut Vec<String>,
    ) -> Result<HostReport, UpgradeError> {
        if let Some(report) = Self::if_running(binary, log, "running")? {
            return Ok(report);
        }
        let dir = bin_dir(&self.data_dir);
        if sha256_file(&dir.join(FAILED)).ok().as_deref() == Some(binary.sha256.as_str()) {
            return Err(UpgradeError::FailedBefore {
                kept: dir.join(FAILED),
            });
        }
        let staged = self.staged(&binary.sha256);
        if !staged.exists() {
            return Err(UpgradeError::NotStaged);
        }
        self.drain(log).await;
        let upgraded = dir.join(UPGRADED);
        if upgraded.exists() {
            std::fs::rename(&upgraded, dir.join(PREVIOUS)).map_err(UpgradeError::KeepPrevious)?;
        }
        std::fs::rename(&staged, &upgraded).map_err(|source| UpgradeError::Install {
            path: upgraded.clone(),
            source,
        })?;
        sync_dir(&dir);
        tracing::info!(version = %binary.version, sha256 = %short(&binary.sha256), "restarting into the upgraded agent binary");
        let err = restart_into(&upgraded, &self.data_dir, true);
        self.jobs.set_draining(false);
        Err(err.into())
    }

    /// Restarts into the binary with SHA-256 `to` (the one before), or the installed one.
    pub async fn rollback(
        &self,
        to: Option<&str>,
        log: &mut Vec<String>,
    ) -> Result<HostReport, UpgradeError> {
        let own = own_sha256()?;
        let dir = bin_dir(&self.data_dir);
        let upgraded = dir.join(UPGRADED);
        let installed = installed_binary().ok_or(UpgradeError::NoInstalledBinary)?;
        let installed_sha = sha256_file(&installed).ok();
        let target = to.map(str::to_owned).or(installed_sha.clone());
        if target.as_deref() == Some(own.as_str()) {
            // Not restarted yet (or back already): make sure a restart keeps it so.
            self.jobs.set_draining(false);
            log.push(format!("running {} again", short(&own)));
            return Self::report();
        }
        self.drain(log).await;
        let previous = dir.join(PREVIOUS);
        let into = if to.is_some()
            && sha256_file(&previous).ok().as_deref() == to
            && to != installed_sha.as_deref()
        {
            std::fs::rename(&previous, &upgraded).map_err(UpgradeError::RestorePrevious)?;
            upgraded
        } else if to.is_none() || to == installed_sha.as_deref() {
            if upgraded.exists() {
                std::fs::rename(&upgraded, dir.join(FAILED)).map_err(UpgradeError::SetAside)?;
            }
            installed
        } else {
            self.jobs.set_draining(false);
            return Err(UpgradeError::NothingToGoBackTo(
                short(to.unwrap_or_default()).to_owned(),
            ));
        };
        sync_dir(&dir);
        let err = restart_into(
            &into,
            &self.data_dir,
            into != installed_binary().unwrap_or_default(),
        );
        self.jobs.set_draining(false);
        Err(err.into())
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_their_numbers() {
        assert!(version_numbers("gantry-agent 0.1.0") < version_numbers("0.2.0"));
        assert!(version_numbers("gantry-agent 0.10.0") > version_numbers("gantry-agent 0.9.9"));
        assert_eq!(version_numbers("gantry-agent 1.2.3"), vec![1, 2, 3]);
    }

    #[test]
    fn a_file_digest_is_its_sha256() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").expect("write");
        assert_eq!(
            sha256_file(&f).expect("sha"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
