//! Deployment steps and ad-hoc commands on this host.
//!
//! Owns the host's deploy root: `<root>/<app>/releases/<id>/` (one per release, the
//! artifact's tree with `shared/` directories linked in), `current` (a symlink switched
//! atomically: a new link under a temporary name, renamed over the old one),
//! `shared/`, and for blue-green `slots/blue` and `slots/green`. `.gantry/` holds the
//! highest epoch seen (steps from older epochs are refused: a coordinator acting on
//! stale state), the live slot, and the release before the current one.
//!
//! Steps of one app run one at a time, in arrival order; steps are idempotent and their
//! results are kept, so a step the coordinator sends again after a reconnect is answered
//! from what was done. Hooks run under `/bin/sh -c` in their own process group with a
//! timeout; their output goes to a file (not a pipe), so a hook may leave a server
//! running without either side blocking on the other, and the last 8 KiB of it, with
//! secrets masked, go into the deployment's log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_cas::Existing;
use gantry_protocol::{
    AgentMessage, AppSpec, DeployCommand, DeployOp, DeployResult, ExecCommand, Grant, HostReport,
    Labels, PeerSource, ReleaseSpec,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::artifacts::{ConnectionSource, Transfers};

/// Results kept to answer steps sent again.
const KEPT_RESULTS: usize = 1024;
/// Hook output kept for the log.
const HOOK_OUTPUT_TAIL: usize = 8 * 1024;
/// Time between SIGTERM and SIGKILL for a hook past its timeout.
const HOOK_KILL_GRACE: Duration = Duration::from_secs(5);
/// Largest piece of ad-hoc command output sent at once.
const EXEC_PIECE: usize = 16 * 1024;

#[derive(Debug, Default)]
struct State {
    /// Results of steps done, with the epoch and operation they answered.
    done: HashMap<(u64, u64), (u64, DeployOp, DeployResult)>,
    order: VecDeque<(u64, u64)>,
    running: HashSet<(u64, u64)>,
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// The host's deployer. Cheap to clone.
#[derive(Clone)]
pub struct Deployer {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    transfers: Transfers,
    labels: Labels,
    source: Arc<dyn ConnectionSource>,
    out: mpsc::UnboundedSender<AgentMessage>,
    state: Mutex<State>,
    upgrader: crate::upgrade::Upgrader,
    peers: crate::peers::PeerService,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

impl Deployer {
    /// `out` carries results and exec output to the session.
    pub fn new(
        root: PathBuf,
        transfers: Transfers,
        labels: Labels,
        source: Arc<dyn ConnectionSource>,
        out: mpsc::UnboundedSender<AgentMessage>,
        upgrader: crate::upgrade::Upgrader,
        peers: crate::peers::PeerService,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                root,
                transfers,
                labels,
                source,
                out,
                state: Mutex::new(State::default()),
                upgrader,
                peers,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes one step: answers at once if it was done, ignores it if it is running,
    /// else runs it after the app's earlier steps.
    pub fn deploy(&self, command: DeployCommand) {
        let key = (command.deployment, command.seq);
        // A stale epoch is refused before anything else, the kept results included: a
        // coordinator restored from an old backup reuses deployment numbers, and must not
        // be answered with what a newer one was told.
        let upgrade = matches!(
            command.op,
            DeployOp::UpgradeStage { .. }
                | DeployOp::UpgradeActivate { .. }
                | DeployOp::UpgradeRollback { .. }
        );
        let fenced = if upgrade {
            Ok(()) // about the agent itself, not an app: no app epoch applies
        } else {
            stale_epoch(&self.inner.root, &command)
        };
        if let Err(message) = fenced {
            let _ = self
                .inner
                .out
                .send(AgentMessage::DeployResult(DeployResult {
                    deployment: command.deployment,
                    seq: command.seq,
                    outcome: Err(message.clone()),
                    log: vec![format!("\u{2716} {message}")],
                }));
            return;
        }
        let app_lock = {
            let mut state = self.lock();
            // A kept result answers only the same step (same epoch and operation).
            if let Some((epoch, op, result)) = state.done.get(&key) {
                if *epoch == command.epoch && *op == command.op {
                    let _ = self
                        .inner
                        .out
                        .send(AgentMessage::DeployResult(result.clone()));
                    return;
                }
                state.done.remove(&key);
            }
            if !state.running.insert(key) {
                return;
            }
            state
                .locks
                .entry(command.app.name.clone())
                .or_default()
                .clone()
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _serial = app_lock.lock().await;
            let mut log = Vec::new();
            let outcome = me.step(&command, &mut log).await;
            if let Err(e) = &outcome {
                log.push(format!("\u{2716} {e}"));
            }
            let result = DeployResult {
                deployment: command.deployment,
                seq: command.seq,
                outcome,
                log: log
                    .into_iter()
                    .map(|l| mask(&l, &command.app.secrets))
                    .collect(),
            };
            {
                let mut state = me.lock();
                state.running.remove(&key);
                state
                    .done
                    .insert(key, (command.epoch, command.op.clone(), result.clone()));
                state.order.push_back(key);
                while state.order.len() > KEPT_RESULTS {
                    if let Some(old) = state.order.pop_front() {
                        state.done.remove(&old);
                    }
                }
            }
            let _ = me.inner.out.send(AgentMessage::DeployResult(result));
        });
    }

    async fn step(&self, c: &DeployCommand, log: &mut Vec<String>) -> Result<HostReport, String> {
        // A fleet upgrade's steps concern the agent itself, not an app.
        match &c.op {
            DeployOp::UpgradeStage { binary } => {
                return self.inner.upgrader.stage(binary, log).await
            }
            DeployOp::UpgradeActivate { binary } => {
                return self.inner.upgrader.activate(binary, log).await
            }
            DeployOp::UpgradeRollback { to } => {
                return self.inner.upgrader.rollback(to.as_deref(), log).await
            }
            _ => {}
        }
        let app = App::new(&self.inner.root, &c.app)?;
        app.check_epoch(c.epoch)?;
        match &c.op {
            DeployOp::Stage { release, peers } => {
                self.stage(&app, c, release, peers, log).await?;
            }
            DeployOp::Activate { release } => self.activate(&app, release, log).await?,
            DeployOp::Verify => {
                let port = app.live_port();
                self.health(&app, port, None, log).await?;
            }
            DeployOp::Rollback { to } => self.rollback(&app, to.as_deref(), log).await?,
            DeployOp::UpgradeStage { .. }
            | DeployOp::UpgradeActivate { .. }
            | DeployOp::UpgradeRollback { .. } => {
                return Err("internal: an upgrade step reached the app steps".into())
            }
        }
        Ok(app.report())
    }

    async fn stage(
        &self,
        app: &App<'_>,
        c: &DeployCommand,
        release: &ReleaseSpec,
        peers: &[PeerSource],
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let dir = app.release_dir(&release.id);
        if dir.is_dir() {
            log.push(format!("release {} is already on this host", release.id));
        } else {
            let partial = app
                .dir
                .join("releases")
                .join(format!(".partial-{}", release.id));
            if partial.exists() {
                std::fs::remove_dir_all(&partial)
                    .map_err(|e| format!("cannot clear {}: {e}", partial.display()))?;
            }
            let grant = Grant::Deploy {
                deployment: c.deployment,
                epoch: c.epoch,
            };
            // The other hosts may ask for this release as soon as they get their own
            // step: share it first (its chunks once the manifest is here), then dial
            // them while fetching the manifest.
            let service = &self.inner.peers;
            let me = service.position(peers);
            let _fetching =
                me.map(|_| service.share(c.deployment, c.epoch, release.manifest, peers));
            let swarm_peers = if peers.len() > 1 {
                service.connect_all(peers)
            } else {
                Vec::new()
            };
            let swarm = gantry_transfer::Swarm {
                peers: swarm_peers,
                me,
            };
            let (sink, mut lines) = mpsc::channel::<Vec<u8>>(64);
            let fetched = crate::artifacts::with_retries(
                self.inner.source.as_ref(),
                &sink,
                "fetching the release",
                |conn| {
                    let (grant, cache) = (grant.clone(), self.inner.transfers.cache.clone());
                    let options = self.inner.transfers.options.clone();
                    let (manifest, dest) = (release.manifest, partial.clone());
                    let swarm = &swarm;
                    async move {
                        let tree =
                            gantry_transfer::fetch_manifest(&conn, &grant, &manifest).await?;
                        if me.is_some() {
                            service.set_chunks(&manifest, gantry_transfer::chunk_sizes(&tree));
                        }
                        let sources = gantry_transfer::Sources {
                            coordinator: &conn,
                            grant: &grant,
                            swarm,
                        };
                        gantry_transfer::download_tree(
                            sources,
                            &manifest,
                            Arc::new(tree),
                            &cache,
                            &dest,
                            Existing::Merge,
                            &options,
                        )
                        .await
                    }
                },
            )
            .await;
            drop(sink);
            while let Some(line) = lines.recv().await {
                log.push(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            let figures = fetched?;
            let reachable = swarm
                .peers
                .iter()
                .flatten()
                .filter(|link| link.is_connected())
                .count();
            let from_peers = if peers.len() > 1 {
                format!(
                    " ({} of them, {}, from {reachable} of {} peers)",
                    figures.chunks_from_peers,
                    gantry_transfer::human_bytes(figures.bytes_from_peers),
                    peers.len() - usize::from(me.is_some()),
                )
            } else {
                String::new()
            };
            log.push(format!(
                "staged release {} ({}): {} files, {}; fetched {} of {} chunks{from_peers} in {:.2} s",
                release.id,
                release.version,
                figures.files,
                gantry_transfer::human_bytes(figures.bytes),
                figures.chunks_fetched,
                figures.chunks,
                (figures.fetch_time + figures.extract_time).as_secs_f64()
            ));
            app.link_shared(&partial)?;
            std::fs::rename(&partial, &dir)
                .map_err(|e| format!("cannot move the release into place: {e}"))?;
            sync_dir(&app.dir.join("releases"));
        }
        if let Some(bg) = &app.spec.blue_green {
            // Blue-green stages into the idle slot: start it there and check it, while
            // the live slot keeps serving.
            let idle = app.live_slot().map_or(Slot::Blue, Slot::other);
            let port = idle.port(bg);
            if let Some(old) = app.slot_release(idle) {
                if old != release.id {
                    self.hook(
                        app,
                        "stop",
                        app.spec.hooks.stop.as_ref(),
                        &old,
                        Some(idle),
                        log,
                    )
                    .await?;
                }
            }
            app.point_slot(idle, &release.id)?;
            self.start_hooks(app, &release.id, Some(idle), false, log)
                .await?;
            self.health(app, Some(port), Some(&release.id), log).await?;
            log.push(format!(
                "release {} serves on the idle {} slot",
                release.id,
                idle.name()
            ));
        }
        Ok(())
    }

    async fn activate(
        &self,
        app: &App<'_>,
        release: &ReleaseSpec,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        if !app.release_dir(&release.id).is_dir() {
            return Err(format!(
                "release {} is not on this host (it was never staged, or was pruned)",
                release.id
            ));
        }
        if let Some(bg) = &app.spec.blue_green {
            let slot = [Slot::Blue, Slot::Green]
                .into_iter()
                .find(|s| app.slot_release(*s).as_deref() == Some(release.id.as_str()))
                .ok_or_else(|| format!("release {} is in no slot; stage it first", release.id))?;
            self.switch_traffic(app, bg, slot, log).await?;
            app.write_previous(app.current().as_deref())?;
            app.point_current(&release.id)?;
            self.health(app, Some(slot.port(bg)), None, log).await?;
            return Ok(());
        }
        let old = app.current();
        if old.as_deref() == Some(release.id.as_str()) {
            log.push(format!("release {} is already current", release.id));
        } else {
            self.switch(app, old.as_deref(), &release.id, log).await?;
            app.write_previous(old.as_deref())?;
        }
        self.health(app, None, None, log).await?;
        app.prune(log);
        Ok(())
    }

    async fn rollback(
        &self,
        app: &App<'_>,
        to: Option<&str>,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        if let Some(bg) = &app.spec.blue_green {
            // The old slot is still running: switching back is instant.
            let back = app.live_slot().map_or(Slot::Blue, Slot::other);
            let release = app.slot_release(back).ok_or_else(|| {
                format!("the {} slot holds no release to go back to", back.name())
            })?;
            self.switch_traffic(app, bg, back, log).await?;
            app.point_current(&release)?;
            log.push(format!(
                "traffic back on the {} slot ({release})",
                back.name()
            ));
            return Ok(());
        }
        let current = app.current();
        let Some(target) = to else {
            if let Some(old) = &current {
                self.hook(app, "stop", app.spec.hooks.stop.as_ref(), old, None, log)
                    .await?;
            }
            app.remove_current()?;
            log.push("no release before this one: the app is stopped".into());
            return Ok(());
        };
        if !app.release_dir(target).is_dir() {
            return Err(format!("release {target} is no longer on this host"));
        }
        if current.as_deref() != Some(target) {
            self.switch(app, current.as_deref(), target, log).await?;
        }
        self.health(app, None, None, log).await?;
        log.push(format!("back on release {target}"));
        Ok(())
    }

    /// Stop the old release, switch `current`, start the new one.
    async fn switch(
        &self,
        app: &App<'_>,
        old: Option<&str>,
        new: &str,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let restart = app.spec.hooks.restart.is_some() && old.is_some();
        if let (Some(old), false) = (old, restart) {
            self.hook(app, "stop", app.spec.hooks.stop.as_ref(), old, None, log)
                .await?;
        }
        app.point_current(new)?;
        log.push(format!("current: {} -> {new}", old.unwrap_or("(nothing)")));
        self.start_hooks(app, new, None, restart, log).await
    }

    async fn start_hooks(
        &self,
        app: &App<'_>,
        release: &str,
        slot: Option<Slot>,
        restart: bool,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let hooks = &app.spec.hooks;
        self.hook(
            app,
            "pre-start",
            hooks.pre_start.as_ref(),
            release,
            slot,
            log,
        )
        .await?;
        if restart {
            self.hook(app, "restart", hooks.restart.as_ref(), release, slot, log)
                .await?;
        } else {
            self.hook(app, "start", hooks.start.as_ref(), release, slot, log)
                .await?;
        }
        self.hook(
            app,
            "post-start",
            hooks.post_start.as_ref(),
            release,
            slot,
            log,
        )
        .await
    }

    async fn switch_traffic(
        &self,
        app: &App<'_>,
        bg: &gantry_protocol::BlueGreen,
        slot: Slot,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let release = app.slot_release(slot).unwrap_or_default();
        self.hook(app, "switch", Some(&bg.switch), &release, Some(slot), log)
            .await?;
        app.write_live_slot(slot)?;
        log.push(format!("traffic on the {} slot", slot.name()));
        Ok(())
    }

    /// Runs one hook, if the app has it.
    async fn hook(
        &self,
        app: &App<'_>,
        name: &str,
        script: Option<&String>,
        release: &str,
        slot: Option<Slot>,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let Some(script) = script else {
            return Ok(());
        };
        let dir = app.release_dir(release);
        let env = app.hook_env(release, slot, &self.inner.labels);
        let timeout = Duration::from_millis(app.spec.hooks.timeout_ms.max(1));
        let (code, output) = run_shell(script, &dir, &env, timeout).await?;
        for line in output.lines() {
            log.push(format!("[{name}] {line}"));
        }
        match code {
            0 => Ok(()),
            code => Err(format!("the {name} hook exited with {code}")),
        }
    }

    /// Checks the app is healthy: the current release, or `release` (blue-green staging
    /// checks the idle slot's release before it is current).
    async fn health(
        &self,
        app: &App<'_>,
        port: Option<u16>,
        release: Option<&str>,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let Some(check) = &app.spec.health else {
            return Ok(());
        };
        let labels = self.inner.labels.clone();
        let fill = move |text: &str| {
            gantry_protocol::template::expand(text, |expr| {
                if expr == "slot.port" {
                    port.map(|p| p.to_string())
                } else {
                    expr.strip_prefix("labels.")
                        .and_then(|k| labels.get(k))
                        .cloned()
                }
            })
        };
        let (dir, checked) = match release {
            Some(r) => (app.release_dir(r), r.to_owned()),
            None => (app.current_dir(), app.current().unwrap_or_default()),
        };
        let env = app.hook_env(&checked, None, &self.inner.labels);
        let timeout = Duration::from_millis(check.timeout_ms);
        let run_command = |script: String| {
            let (dir, env) = (dir.clone(), env.clone());
            async move {
                match run_shell(&script, &dir, &env, timeout).await? {
                    (0, _) => Ok(()),
                    (code, out) => Err(format!(
                        "the check exited with {code}: {}",
                        out.lines().last().unwrap_or_default()
                    )),
                }
            }
        };
        let started = std::time::Instant::now();
        crate::health::check(check, &fill, run_command).await?;
        log.push(format!(
            "healthy after {:.2} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Runs an ad-hoc command, streaming its output and then its exit.
    pub fn exec(&self, command: ExecCommand) {
        let me = self.clone();
        tokio::spawn(async move {
            let result = me.exec_inner(&command).await;
            let _ = me.inner.out.send(AgentMessage::ExecDone {
                id: command.id,
                result,
            });
        });
    }

    async fn exec_inner(&self, command: &ExecCommand) -> Result<i32, String> {
        std::fs::create_dir_all(&self.inner.root)
            .map_err(|e| format!("cannot create {}: {e}", self.inner.root.display()))?;
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&command.command)
            .current_dir(&self.inner.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or(0);
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
        .map(|mut pipe| {
            let (out, id) = (self.inner.out.clone(), command.id);
            tokio::spawn(async move {
                let mut buf = vec![0u8; EXEC_PIECE];
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
            })
        })
        .collect();
        let timeout = Duration::from_millis(command.timeout_ms.max(1));
        let status = tokio::time::timeout(timeout, child.wait()).await;
        let result = match status {
            Ok(Ok(status)) => Ok(exit_code(status)),
            Ok(Err(e)) => Err(format!("waiting for the command failed: {e}")),
            Err(_) => {
                crate::exec::signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
                Err(format!("timed out after {} s", timeout.as_secs()))
            }
        };
        crate::exec::signal_group(pgid, libc::SIGKILL);
        for pump in pumps {
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        result
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs `/bin/sh -c script` in `dir` with exactly `env`, its output to a file; returns
/// the exit code and the tail of the output. Past `timeout` its process group gets
/// SIGTERM, then SIGKILL.
async fn run_shell(
    script: &str,
    dir: &Path,
    env: &Labels,
    timeout: Duration,
) -> Result<(i32, String), String> {
    let output =
        tempfile::tempfile().map_err(|e| format!("cannot create a file for hook output: {e}"))?;
    let stderr = output
        .try_clone()
        .map_err(|e| format!("cannot share the hook output file: {e}"))?;
    let stdout = output
        .try_clone()
        .map_err(|e| format!("cannot share the hook output file: {e}"))?;
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh in {}: {e}", dir.display()))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .unwrap_or(0);
    let code = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => exit_code(status),
        Ok(Err(e)) => return Err(format!("waiting for the hook failed: {e}")),
        Err(_) => {
            crate::exec::signal_group(pgid, libc::SIGTERM);
            if tokio::time::timeout(HOOK_KILL_GRACE, child.wait())
                .await
                .is_err()
            {
                crate::exec::signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
            }
            return Err(format!(
                "did not finish within {} s and was stopped",
                timeout.as_secs()
            ));
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

fn mask(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A blue-green slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Blue,
    Green,
}

impl Slot {
    fn name(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    fn port(self, bg: &gantry_protocol::BlueGreen) -> u16 {
        match self {
            Self::Blue => bg.blue_port,
            Self::Green => bg.green_port,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "blue" => Some(Self::Blue),
            "green" => Some(Self::Green),
            _ => None,
        }
    }
}

/// One app's directory on this host.
/// `Err` if `command`'s epoch is older than one its app has seen on this host.
fn stale_epoch(root: &Path, command: &DeployCommand) -> Result<(), String> {
    if gantry_pipeline::app_name_problem(&command.app.name).is_some() {
        return Ok(()); // refused with the reason when the step runs
    }
    let path = root.join(&command.app.name).join(".gantry/epoch");
    let seen: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if command.epoch < seen {
        return Err(format!(
            "stale epoch {}: this host has seen epoch {seen} for {}; refusing a step from an older deployment",
            command.epoch, command.app.name
        ));
    }
    Ok(())
}

struct App<'a> {
    spec: &'a AppSpec,
    root: PathBuf,
    dir: PathBuf,
}

impl<'a> App<'a> {
    fn new(root: &Path, spec: &'a AppSpec) -> Result<Self, String> {
        if gantry_pipeline::app_name_problem(&spec.name).is_some() {
            return Err(format!("refusing app name {:?}", spec.name));
        }
        let dir = root.join(&spec.name);
        for sub in ["releases", "shared", ".gantry"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| format!("cannot create {}: {e}", dir.join(sub).display()))?;
        }
        Ok(Self {
            spec,
            root: root.to_path_buf(),
            dir,
        })
    }

    /// Refuses a step from an epoch older than one this app has seen; records a newer
    /// one (durably) before doing anything.
    fn check_epoch(&self, epoch: u64) -> Result<(), String> {
        let path = self.dir.join(".gantry/epoch");
        let seen: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if epoch < seen {
            return Err(format!(
                "stale epoch {epoch}: this host has seen epoch {seen} for {}; refusing a step from an older deployment",
                self.spec.name
            ));
        }
        if epoch > seen {
            write_durably(&path, epoch.to_string().as_bytes())?;
        }
        Ok(())
    }

    fn release_dir(&self, id: &str) -> PathBuf {
        self.dir.join("releases").join(id)
    }

    fn link_target(path: &Path) -> Option<String> {
        let target = std::fs::read_link(path).ok()?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    }

    fn current(&self) -> Option<String> {
        Self::link_target(&self.dir.join("current"))
    }

    fn current_dir(&self) -> PathBuf {
        self.current()
            .map_or_else(|| self.dir.clone(), |id| self.release_dir(&id))
    }

    /// Points `link` at `target` atomically: a new link, renamed over the old one.
    fn swap_link(link: &Path, target: &Path) -> Result<(), String> {
        let tmp = link.with_file_name(format!(
            ".{}.tmp",
            link.file_name().and_then(|n| n.to_str()).unwrap_or("link")
        ));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, link)
            .map_err(|e| format!("cannot switch {}: {e}", link.display()))?;
        if let Some(parent) = link.parent() {
            sync_dir(parent);
        }
        Ok(())
    }

    fn point_current(&self, id: &str) -> Result<(), String> {
        Self::swap_link(&self.dir.join("current"), &Path::new("releases").join(id))
    }

    fn remove_current(&self) -> Result<(), String> {
        match std::fs::remove_file(self.dir.join("current")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove the current link: {e}")),
        }
    }

    fn slot_release(&self, slot: Slot) -> Option<String> {
        Self::link_target(&self.dir.join("slots").join(slot.name()))
    }

    fn point_slot(&self, slot: Slot, id: &str) -> Result<(), String> {
        let slots = self.dir.join("slots");
        std::fs::create_dir_all(&slots)
            .map_err(|e| format!("cannot create {}: {e}", slots.display()))?;
        Self::swap_link(&slots.join(slot.name()), &Path::new("../releases").join(id))
    }

    fn live_slot(&self) -> Option<Slot> {
        std::fs::read_to_string(self.dir.join(".gantry/live-slot"))
            .ok()
            .and_then(|s| Slot::parse(&s))
    }

    fn live_port(&self) -> Option<u16> {
        let bg = self.spec.blue_green.as_ref()?;
        Some(self.live_slot().unwrap_or(Slot::Blue).port(bg))
    }

    fn write_live_slot(&self, slot: Slot) -> Result<(), String> {
        write_durably(&self.dir.join(".gantry/live-slot"), slot.name().as_bytes())
    }

    fn write_previous(&self, previous: Option<&str>) -> Result<(), String> {
        write_durably(
            &self.dir.join(".gantry/previous"),
            previous.unwrap_or("").as_bytes(),
        )
    }

    /// Links each `shared/` directory into a release, replacing what the artifact had
    /// there.
    fn link_shared(&self, release: &Path) -> Result<(), String> {
        for path in &self.spec.shared {
            let shared = self.dir.join("shared").join(path);
            std::fs::create_dir_all(&shared)
                .map_err(|e| format!("cannot create {}: {e}", shared.display()))?;
            let inside = release.join(path);
            match std::fs::symlink_metadata(&inside) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&inside),
                Ok(_) => std::fs::remove_file(&inside),
                Err(_) => Ok(()),
            }
            .map_err(|e| {
                format!(
                    "cannot replace {} with the shared one: {e}",
                    inside.display()
                )
            })?;
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            std::os::unix::fs::symlink(&shared, &inside)
                .map_err(|e| format!("cannot link {}: {e}", inside.display()))?;
        }
        Ok(())
    }

    /// Releases on the host, oldest first (by when they were staged).
    fn releases(&self) -> Vec<String> {
        let mut found: Vec<(std::time::SystemTime, String)> =
            std::fs::read_dir(self.dir.join("releases"))
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .filter_map(|e| {
                            let modified = e.metadata().ok()?.modified().ok()?;
                            Some((modified, e.file_name().to_string_lossy().into_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default();
        found.sort();
        found.into_iter().map(|(_, name)| name).collect()
    }

    /// Keeps the newest `keep` releases, and always the current, the previous and the
    /// slots' releases.
    fn prune(&self, log: &mut Vec<String>) {
        let releases = self.releases();
        let keep = self.spec.keep.max(1) as usize;
        let mut protected: HashSet<String> = releases.iter().rev().take(keep).cloned().collect();
        protected.extend(self.current());
        protected.extend(
            std::fs::read_to_string(self.dir.join(".gantry/previous"))
                .ok()
                .filter(|s| !s.is_empty()),
        );
        protected.extend(self.slot_release(Slot::Blue));
        protected.extend(self.slot_release(Slot::Green));
        for old in releases.iter().filter(|r| !protected.contains(*r)) {
            match std::fs::remove_dir_all(self.release_dir(old)) {
                Ok(()) => log.push(format!("pruned release {old}")),
                Err(e) => log.push(format!("cannot prune release {old}: {e}")),
            }
        }
    }

    fn hook_env(&self, release: &str, slot: Option<Slot>, labels: &Labels) -> Labels {
        let mut env = Labels::new();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                env.insert(key.to_owned(), v);
            }
        }
        env.entry("PATH".into())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
        for (k, v) in labels {
            let key: String = k
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            env.insert(format!("GANTRY_LABEL_{key}"), v.clone());
        }
        env.extend(self.spec.env.clone());
        env.insert("GANTRY_APP".into(), self.spec.name.clone());
        env.insert("GANTRY_APP_DIR".into(), self.dir.display().to_string());
        env.insert("GANTRY_DEPLOY_ROOT".into(), self.root.display().to_string());
        env.insert("GANTRY_RELEASE".into(), release.to_owned());
        env.insert(
            "GANTRY_RELEASE_DIR".into(),
            self.release_dir(release).display().to_string(),
        );
        env.insert(
            "GANTRY_SHARED_DIR".into(),
            self.dir.join("shared").display().to_string(),
        );
        if let (Some(slot), Some(bg)) = (slot, &self.spec.blue_green) {
            env.insert("GANTRY_SLOT".into(), slot.name().into());
            env.insert("GANTRY_PORT".into(), slot.port(bg).to_string());
        }
        env
    }

    fn report(&self) -> HostReport {
        HostReport {
            current: self.current(),
            releases: self.releases(),
        }
    }
}

/// Writes a small file by a temporary name, fsync and rename.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> AppSpec {
        AppSpec {
            name: name.into(),
            hooks: gantry_protocol::Hooks {
                timeout_ms: 5_000,
                ..gantry_protocol::Hooks::default()
            },
            health: None,
            keep: 2,
            shared: vec!["data".into()],
            env: Labels::new(),
            secrets: vec!["hunter2".into()],
            blue_green: None,
        }
    }

    #[test]
    fn epochs_only_move_forward() {
        let root = tempfile::tempdir().expect("tempdir");
        let s = spec("web");
        let app = App::new(root.path(), &s).expect("app");
        app.check_epoch(3).expect("first");
        app.check_epoch(3).expect("same epoch again");
        app.check_epoch(5).expect("newer");
        let err = app.check_epoch(4).expect_err("older");
        assert!(
            err.contains("stale epoch 4") && err.contains("seen epoch 5"),
            "{err}"
        );
        // It survives a restart of the agent: it is on disk.
        let again = App::new(root.path(), &s).expect("app");
        assert!(again.check_epoch(4).is_err());
    }

    #[test]
    fn current_switches_atomically_and_pruning_keeps_what_matters() {
        let root = tempfile::tempdir().expect("tempdir");
        let s = spec("web");
        let app = App::new(root.path(), &s).expect("app");
        for id in ["r1", "r2", "r3", "r4"] {
            std::fs::create_dir_all(app.release_dir(id)).expect("release");
            app.link_shared(&app.release_dir(id)).expect("shared");
            std::thread::sleep(Duration::from_millis(15)); // distinct modification times
        }
        app.point_current("r2").expect("point");
        assert_eq!(app.current().as_deref(), Some("r2"));
        app.write_previous(Some("r1")).expect("previous");
        let mut log = Vec::new();
        app.prune(&mut log);
        // keep 2 newest (r3, r4), plus current r2 and previous r1: nothing goes.
        assert_eq!(app.releases().len(), 4, "{log:?}");
        app.point_current("r4").expect("point");
        app.write_previous(Some("r3")).expect("previous");
        app.prune(&mut log);
        assert_eq!(app.releases(), ["r3", "r4"]);
        assert!(
            std::fs::symlink_metadata(app.release_dir("r4").join("data"))
                .expect("link")
                .file_type()
                .is_symlink(),
            "shared directories are links"
        );
    }

    #[tokio::test]
    async fn hooks_report_their_exit_and_output_and_are_stopped_at_their_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = Labels::from([("PATH".to_owned(), "/usr/bin:/bin".to_owned())]);
        let (code, out) = run_shell(
            "echo hello; exit 3",
            dir.path(),
            &env,
            Duration::from_secs(5),
        )
        .await
        .expect("ran");
        assert_eq!((code, out.trim()), (3, "hello"));
        // A hook may leave a server running: its output goes to a file, so nothing
        // waits for the server's end.
        let started = std::time::Instant::now();
        let (code, _) = run_shell(
            "sleep 30 & echo $! > server.pid; echo started",
            dir.path(),
            &env,
            Duration::from_secs(5),
        )
        .await
        .expect("ran");
        assert_eq!(code, 0);
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(dir.path().join("server.pid")).expect("pid");
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        let err = run_shell("sleep 30", dir.path(), &env, Duration::from_millis(200))
            .await
            .expect_err("timed out");
        assert!(err.contains("did not finish"), "{err}");
        assert_eq!(
            mask("token hunter2 here", &["hunter2".into()]),
            "token *** here"
        );
    }
}
