//! Deployment steps on this host: staging a release (from the coordinator and the other
//! hosts of the deployment), activating it, checking its health, rolling back, and the
//! steps of a fleet upgrade of the agent itself ([`upgrade`]).
//!
//! Steps of one app run one at a time, in arrival order; steps are idempotent and their
//! results are kept, so a step the coordinator sends again after a reconnect is answered
//! from what was done. The app's directory and its rules are [`app`]'s; hooks run
//! through [`hooks`] and their output, with secrets masked, goes into the deployment's
//! log; health checks are [`health`]'s. Ad-hoc commands (`gantry exec`) are
//! [`commands`]'s: they run in the deploy root but touch no release.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_cas::Existing;
use gantry_protocol::{
    AgentMessage, DeployCommand, DeployOp, DeployResult, ExecCommand, Grant, HostReport, Labels,
    PeerSource, ReleaseSpec,
};
use tokio::sync::mpsc;

use crate::base::files::sync_dir;
use crate::transfers::peers::PeerService;
use crate::transfers::{with_retries, ConnectionSource, RetryError, Transfers};
use app::{stale_epoch, App, AppError, Slot};
use commands::AdHocCommands;
use health::{ProbeError, Unhealthy};
use hooks::{run_shell, HookError};
use upgrade::{UpgradeError, Upgrader};

pub mod app;
pub mod commands;
pub mod health;
pub mod hooks;
pub mod upgrade;

/// Results kept to answer steps sent again.
const KEPT_RESULTS: usize = 1024;

/// Why a deployment step failed; its text is the step's outcome and the log's last line.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error("the {name} hook exited with {code}")]
    HookExit { name: String, code: i32 },
    #[error(transparent)]
    Unhealthy(#[from] Unhealthy),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Fetch(#[from] RetryError),
    #[error("cannot clear {}: {source}", path.display())]
    Clear {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move the release into place: {0}")]
    MoveRelease(std::io::Error),
    #[error("release {0} is not on this host (it was never staged, or was pruned)")]
    NotStaged(String),
    #[error("release {0} is in no slot; stage it first")]
    InNoSlot(String),
    #[error("the {0} slot holds no release to go back to")]
    EmptySlot(&'static str),
    #[error("release {0} is no longer on this host")]
    Gone(String),
    #[error("internal: an upgrade step reached the app steps")]
    UpgradeAsAppStep,
}

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
    upgrader: Upgrader,
    peers: PeerService,
    commands: AdHocCommands,
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
        upgrader: Upgrader,
        peers: PeerService,
    ) -> Self {
        let commands = AdHocCommands::new(root.clone(), out.clone());
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
                commands,
            }),
        }
    }

    /// Runs an ad-hoc command (see [`commands`]).
    pub fn exec(&self, command: ExecCommand) {
        self.inner.commands.run(command);
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
        if let Err(e) = fenced {
            let message = e.to_string();
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
            // The wire carries the error as text (`DeployResult.outcome`).
            let outcome = me.step(&command, &mut log).await.map_err(|e| e.to_string());
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

    async fn step(
        &self,
        c: &DeployCommand,
        log: &mut Vec<String>,
    ) -> Result<HostReport, StepError> {
        // A fleet upgrade's steps concern the agent itself, not an app.
        match &c.op {
            DeployOp::UpgradeStage { binary } => {
                return Ok(self.inner.upgrader.stage(binary, log).await?)
            }
            DeployOp::UpgradeActivate { binary } => {
                return Ok(self.inner.upgrader.activate(binary, log).await?)
            }
            DeployOp::UpgradeRollback { to } => {
                return Ok(self.inner.upgrader.rollback(to.as_deref(), log).await?)
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
            | DeployOp::UpgradeRollback { .. } => return Err(StepError::UpgradeAsAppStep),
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
    ) -> Result<(), StepError> {
        let dir = app.release_dir(&release.id);
        if dir.is_dir() {
            log.push(format!("release {} is already on this host", release.id));
        } else {
            let partial = app
                .dir
                .join("releases")
                .join(format!(".partial-{}", release.id));
            if partial.exists() {
                std::fs::remove_dir_all(&partial).map_err(|source| StepError::Clear {
                    path: partial.clone(),
                    source,
                })?;
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
            let fetched = with_retries(
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
            std::fs::rename(&partial, &dir).map_err(StepError::MoveRelease)?;
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
    ) -> Result<(), StepError> {
        if !app.release_dir(&release.id).is_dir() {
            return Err(StepError::NotStaged(release.id.clone()));
        }
        if let Some(bg) = &app.spec.blue_green {
            let slot = [Slot::Blue, Slot::Green]
                .into_iter()
                .find(|s| app.slot_release(*s).as_deref() == Some(release.id.as_str()))
                .ok_or_else(|| StepError::InNoSlot(release.id.clone()))?;
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
    ) -> Result<(), StepError> {
        if let Some(bg) = &app.spec.blue_green {
            // The old slot is still running: switching back is instant.
            let back = app.live_slot().map_or(Slot::Blue, Slot::other);
            let release = app
                .slot_release(back)
                .ok_or(StepError::EmptySlot(back.name()))?;
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
            return Err(StepError::Gone(target.to_owned()));
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
    ) -> Result<(), StepError> {
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
    ) -> Result<(), StepError> {
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
    ) -> Result<(), StepError> {
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
    ) -> Result<(), StepError> {
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
            code => Err(StepError::HookExit {
                name: name.to_owned(),
                code,
            }),
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
    ) -> Result<(), StepError> {
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
                match run_shell(&script, &dir, &env, timeout).await {
                    Ok((0, _)) => Ok(()),
                    Ok((code, out)) => Err(ProbeError::CommandExit {
                        code,
                        last_line: out.lines().last().unwrap_or_default().to_owned(),
                    }),
                    Err(e) => Err(ProbeError::Command(Box::new(e))),
                }
            }
        };
        let started = std::time::Instant::now();
        health::check(check, &fill, run_command).await?;
        log.push(format!(
            "healthy after {:.2} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}

fn mask(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .expect_err("timed out")
            .to_string();
        assert!(err.contains("did not finish"), "{err}");
        assert_eq!(
            mask("token hunter2 here", &["hunter2".into()]),
            "token *** here"
        );
    }
}
