//! One app's directory on this host, and the rules for changing it.
//!
//! Owns `<root>/<app>/`: `releases/<id>/` (one per release, the artifact's tree with
//! `shared/` directories linked in), `current` (a symlink switched atomically: a new
//! link under a temporary name, renamed over the old one), `shared/`, and for
//! blue-green `slots/blue` and `slots/green`. `.gantry/` holds the highest epoch seen
//! (steps from older epochs are refused: a coordinator acting on stale state), the live
//! slot, and the release before the current one. It runs nothing: hooks and checks are
//! the deployer's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use gantry_protocol::{AppSpec, DeployCommand, HostReport, Labels};

use crate::base::files::{sync_dir, write_durably};
use crate::base::process::inherited_env;

/// Why an app's directory cannot be used or changed as asked.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("refusing app name {0:?}")]
    BadName(String),
    #[error("stale epoch {epoch}: this host has seen epoch {seen} for {app}; refusing a step from an older deployment")]
    StaleEpoch { epoch: u64, seen: u64, app: String },
    #[error("cannot create {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot switch {}: {source}", path.display())]
    Switch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove the current link: {0}")]
    RemoveCurrent(std::io::Error),
    #[error("cannot replace {} with the shared one: {source}", path.display())]
    ReplaceShared {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot link {}: {source}", path.display())]
    LinkShared {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn create_dir_all(path: &Path) -> Result<(), AppError> {
    std::fs::create_dir_all(path).map_err(|source| AppError::Create {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), AppError> {
    write_durably(path, bytes).map_err(|source| AppError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The highest epoch this host has seen for an app (0 when none).
fn seen_epoch(app_dir: &Path) -> u64 {
    std::fs::read_to_string(app_dir.join(".gantry/epoch"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `Err` if `command`'s epoch is older than one its app has seen on this host.
pub(super) fn stale_epoch(root: &Path, command: &DeployCommand) -> Result<(), AppError> {
    if gantry_pipeline::app_name_problem(&command.app.name).is_some() {
        return Ok(()); // refused with the reason when the step runs
    }
    let seen = seen_epoch(&root.join(&command.app.name));
    if command.epoch < seen {
        return Err(AppError::StaleEpoch {
            epoch: command.epoch,
            seen,
            app: command.app.name.clone(),
        });
    }
    Ok(())
}

/// A blue-green slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Blue,
    Green,
}

impl Slot {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }

    pub(super) fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    pub(super) fn port(self, bg: &gantry_protocol::BlueGreen) -> u16 {
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
pub(super) struct App<'a> {
    pub(super) spec: &'a AppSpec,
    root: PathBuf,
    pub(super) dir: PathBuf,
}

impl<'a> App<'a> {
    pub(super) fn new(root: &Path, spec: &'a AppSpec) -> Result<Self, AppError> {
        if gantry_pipeline::app_name_problem(&spec.name).is_some() {
            return Err(AppError::BadName(spec.name.clone()));
        }
        let dir = root.join(&spec.name);
        for sub in ["releases", "shared", ".gantry"] {
            create_dir_all(&dir.join(sub))?;
        }
        Ok(Self {
            spec,
            root: root.to_path_buf(),
            dir,
        })
    }

    /// Refuses a step from an epoch older than one this app has seen; records a newer
    /// one (durably) before doing anything.
    pub(super) fn check_epoch(&self, epoch: u64) -> Result<(), AppError> {
        let seen = seen_epoch(&self.dir);
        if epoch < seen {
            return Err(AppError::StaleEpoch {
                epoch,
                seen,
                app: self.spec.name.clone(),
            });
        }
        if epoch > seen {
            write(
                &self.dir.join(".gantry/epoch"),
                epoch.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    pub(super) fn release_dir(&self, id: &str) -> PathBuf {
        self.dir.join("releases").join(id)
    }

    fn link_target(path: &Path) -> Option<String> {
        let target = std::fs::read_link(path).ok()?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    }

    pub(super) fn current(&self) -> Option<String> {
        Self::link_target(&self.dir.join("current"))
    }

    pub(super) fn current_dir(&self) -> PathBuf {
        self.current()
            .map_or_else(|| self.dir.clone(), |id| self.release_dir(&id))
    }

    /// Points `link` at `target` atomically: a new link, renamed over the old one.
    fn swap_link(link: &Path, target: &Path) -> Result<(), AppError> {
        let tmp = link.with_file_name(format!(
            ".{}.tmp",
            link.file_name().and_then(|n| n.to_str()).unwrap_or("link")
        ));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).map_err(|source| AppError::Create {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, link).map_err(|source| AppError::Switch {
            path: link.to_path_buf(),
            source,
        })?;
        if let Some(parent) = link.parent() {
            sync_dir(parent);
        }
        Ok(())
    }

    pub(super) fn point_current(&self, id: &str) -> Result<(), AppError> {
        Self::swap_link(&self.dir.join("current"), &Path::new("releases").join(id))
    }

    pub(super) fn remove_current(&self) -> Result<(), AppError> {
        match std::fs::remove_file(self.dir.join("current")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AppError::RemoveCurrent(e)),
        }
    }

    pub(super) fn slot_release(&self, slot: Slot) -> Option<String> {
        Self::link_target(&self.dir.join("slots").join(slot.name()))
    }

    pub(super) fn point_slot(&self, slot: Slot, id: &str) -> Result<(), AppError> {
        let slots = self.dir.join("slots");
        create_dir_all(&slots)?;
        Self::swap_link(&slots.join(slot.name()), &Path::new("../releases").join(id))
    }

    pub(super) fn live_slot(&self) -> Option<Slot> {
        std::fs::read_to_string(self.dir.join(".gantry/live-slot"))
            .ok()
            .and_then(|s| Slot::parse(&s))
    }

    pub(super) fn live_port(&self) -> Option<u16> {
        let bg = self.spec.blue_green.as_ref()?;
        Some(self.live_slot().unwrap_or(Slot::Blue).port(bg))
    }

    pub(super) fn write_live_slot(&self, slot: Slot) -> Result<(), AppError> {
        write(&self.dir.join(".gantry/live-slot"), slot.name().as_bytes())
    }

    pub(super) fn write_previous(&self, previous: Option<&str>) -> Result<(), AppError> {
        write(
            &self.dir.join(".gantry/previous"),
            previous.unwrap_or("").as_bytes(),
        )
    }

    /// Links each `shared/` directory into a release, replacing what the artifact had
    /// there.
    pub(super) fn link_shared(&self, release: &Path) -> Result<(), AppError> {
        for path in &self.spec.shared {
            let shared = self.dir.join("shared").join(path);
            create_dir_all(&shared)?;
            let inside = release.join(path);
            match std::fs::symlink_metadata(&inside) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&inside),
                Ok(_) => std::fs::remove_file(&inside),
                Err(_) => Ok(()),
            }
            .map_err(|source| AppError::ReplaceShared {
                path: inside.clone(),
                source,
            })?;
            if let Some(parent) = inside.parent() {
                create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(&shared, &inside).map_err(|source| {
                AppError::LinkShared {
                    path: inside.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Releases on the host, oldest first (by when they were staged).
    pub(super) fn releases(&self) -> Vec<String> {
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
    pub(super) fn prune(&self, log: &mut Vec<String>) {
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

    /// The environment of a hook or a command check: what the agent passes on, the
    /// host's labels as `GANTRY_LABEL_*`, the app's variables, then `GANTRY_*`.
    pub(super) fn hook_env(&self, release: &str, slot: Option<Slot>, labels: &Labels) -> Labels {
        let mut env = inherited_env();
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

    pub(super) fn report(&self) -> HostReport {
        HostReport {
            current: self.current(),
            releases: self.releases(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let err = app.check_epoch(4).expect_err("older").to_string();
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
}
