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
use std::time::Duration;

use gantry_protocol::{AgentBinary, HostReport, SourceData, StreamOpen};

use crate::artifacts::ConnectionSource;
use crate::jobs::JobManager;

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

/// Lower-case hex SHA-256 of a file.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(gantry_certs::hex(ctx.finish().as_ref()));
        }
        ctx.update(&buf[..n]);
    }
}

/// The SHA-256 of the binary this process runs (computed once).
pub fn own_sha256() -> Result<String, String> {
    static OWN: OnceLock<Result<String, String>> = OnceLock::new();
    OWN.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find my binary: {e}"))?;
        sha256_of(&exe).map_err(|e| format!("cannot read {}: {e}", exe.display()))
    })
    .clone()
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
fn version_of(binary: &Path) -> Result<String, String> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let deadline = std::time::Instant::now() + VERSION_CHECK;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => {
                return Err(format!(
                    "{} --version exited with {status}: not a working agent binary",
                    binary.display()
                ))
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not answer within {} s",
                    binary.display(),
                    VERSION_CHECK.as_secs()
                ));
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
fn restart_into(binary: &Path, data_dir: &Path, probation: bool) -> String {
    if probation {
        if let Err(e) = write_durably(&bin_dir(data_dir).join(PROBATION), b"1") {
            return e;
        }
    }
    let installed = installed_binary().unwrap_or_else(|| binary.to_path_buf());
    let err = std::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .env(INSTALLED_ENV, installed)
        .exec();
    format!("cannot restart into {}: {err}", binary.display())
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
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

    fn report() -> Result<HostReport, String> {
        Ok(HostReport {
            current: Some(own_sha256()?),
            releases: Vec::new(),
        })
    }

    fn staged(&self, sha256: &str) -> PathBuf {
        bin_dir(&self.data_dir).join(format!(".staged-{sha256}"))
    }

    /// Fetches the binary, checks its digest and that it runs, and keeps it ready.
    pub async fn stage(
        &self,
        binary: &AgentBinary,
        log: &mut Vec<String>,
    ) -> Result<HostReport, String> {
        if own_sha256()? == binary.sha256 {
            log.push(format!(
                "already running {} ({})",
                binary.version,
                short(&binary.sha256)
            ));
            return Self::report();
        }
        if binary.bytes > MAX_BINARY_BYTES {
            return Err(format!("a {}-byte agent binary is too large", binary.bytes));
        }
        let dir = bin_dir(&self.data_dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let staged = self.staged(&binary.sha256);
        if !(staged.exists() && sha256_of(&staged).ok().as_deref() == Some(binary.sha256.as_str()))
        {
            self.fetch(binary, &staged).await?;
        }
        let path = staged.clone();
        let version = tokio::task::spawn_blocking(move || version_of(&path))
            .await
            .map_err(|e| e.to_string())??;
        if version != binary.version {
            return Err(format!(
                "the fetched binary says it is {version:?}, not {:?}",
                binary.version
            ));
        }
        log.push(format!(
            "staged {} ({}, {} bytes); it runs",
            binary.version,
            short(&binary.sha256),
            binary.bytes
        ));
        Self::report()
    }

    async fn fetch(&self, binary: &AgentBinary, dest: &Path) -> Result<(), String> {
        let conn = self
            .source
            .current()
            .filter(|c| c.close_reason().is_none())
            .ok_or("no connection to the coordinator to fetch the agent binary from")?;
        let (mut writer, mut reader) = conn.open_stream().await.map_err(|e| e.to_string())?;
        writer
            .send(&StreamOpen::FetchAgentBinary {
                sha256: binary.sha256.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        writer.finish();
        let tmp = dest.with_extension("part");
        let mut file = std::fs::File::create(&tmp)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut bytes = 0u64;
        while let Some(SourceData(piece)) = reader
            .recv()
            .await
            .map_err(|e| format!("the agent binary's transfer broke off: {e}"))?
        {
            bytes += piece.len() as u64;
            if bytes > binary.bytes {
                let _ = std::fs::remove_file(&tmp);
                return Err("the coordinator sent more bytes than the binary has".into());
            }
            ctx.update(&piece);
            std::io::Write::write_all(&mut file, &piece)
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        }
        let got = gantry_certs::hex(ctx.finish().as_ref());
        if bytes == 0 {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "the coordinator has no agent binary {} (did its agent_binary change?)",
                short(&binary.sha256)
            ));
        }
        if got != binary.sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "the agent binary arrived as {}, not {}: refusing it",
                short(&got),
                short(&binary.sha256)
            ));
        }
        file.sync_all()
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        drop(file);
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| format!("cannot make {} executable: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dest).map_err(|e| format!("cannot keep {}: {e}", dest.display()))?;
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
    ) -> Result<HostReport, String> {
        if own_sha256()? == binary.sha256 {
            log.push(format!(
                "running {} ({})",
                binary.version,
                short(&binary.sha256)
            ));
            return Self::report();
        }
        let dir = bin_dir(&self.data_dir);
        if sha256_of(&dir.join(FAILED)).ok().as_deref() == Some(binary.sha256.as_str()) {
            return Err(format!(
                "this binary did not come up here before (kept as {}); not trying it again",
                dir.join(FAILED).display()
            ));
        }
        let staged = self.staged(&binary.sha256);
        if !staged.exists() {
            return Err("the binary is not staged here; stage it first".into());
        }
        self.drain(log).await;
        let upgraded = dir.join(UPGRADED);
        if upgraded.exists() {
            std::fs::rename(&upgraded, dir.join(PREVIOUS))
                .map_err(|e| format!("cannot keep the previous binary: {e}"))?;
        }
        std::fs::rename(&staged, &upgraded)
            .map_err(|e| format!("cannot install {}: {e}", upgraded.display()))?;
        sync_dir(&dir);
        tracing::info!(version = %binary.version, sha256 = %short(&binary.sha256), "restarting into the upgraded agent binary");
        let err = restart_into(&upgraded, &self.data_dir, true);
        self.jobs.set_draining(false);
        Err(err)
    }

    /// Restarts into the binary with SHA-256 `to` (the one before), or the installed one.
    pub async fn rollback(
        &self,
        to: Option<&str>,
        log: &mut Vec<String>,
    ) -> Result<HostReport, String> {
        let own = own_sha256()?;
        let dir = bin_dir(&self.data_dir);
        let upgraded = dir.join(UPGRADED);
        let installed = installed_binary().ok_or("cannot find the installed agent binary")?;
        let installed_sha = sha256_of(&installed).ok();
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
            && sha256_of(&previous).ok().as_deref() == to
            && to != installed_sha.as_deref()
        {
            std::fs::rename(&previous, &upgraded)
                .map_err(|e| format!("cannot restore the previous binary: {e}"))?;
            upgraded
        } else if to.is_none() || to == installed_sha.as_deref() {
            if upgraded.exists() {
                std::fs::rename(&upgraded, dir.join(FAILED))
                    .map_err(|e| format!("cannot set the upgraded binary aside: {e}"))?;
            }
            installed
        } else {
            self.jobs.set_draining(false);
            return Err(format!(
                "no binary {} here to go back to",
                short(to.unwrap_or_default())
            ));
        };
        sync_dir(&dir);
        let err = restart_into(
            &into,
            &self.data_dir,
            into != installed_binary().unwrap_or_default(),
        );
        self.jobs.set_draining(false);
        Err(err)
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
            sha256_of(&f).expect("sha"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
