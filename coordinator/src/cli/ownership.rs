//! Handing files made by `sudo gantry init` to the service user.
//!
//! The .deb creates `/var/lib/gantry` owned by the `gantry` system user, and the
//! operator runs `gantry init` as root (it also writes `/etc/gantry/coordinator.toml` and
//! root's admin context). Without this, the CA key and the store would belong to root
//! and the service, which runs as `gantry`, could not read them. The rule is simple: if
//! the data directory existed before init and belongs to someone other than the files
//! init made, everything init made inside it is given to the directory's owner.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context as _;

/// The owner of a data directory that existed before `gantry init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The owner of `dir` if it already exists, else `None` (init creates it, as us).
    pub fn of_existing(dir: &Path) -> Option<Self> {
        std::fs::metadata(dir).ok().map(|m| Self {
            uid: m.uid(),
            gid: m.gid(),
        })
    }

    /// Gives `dir` and everything under it to this owner, unless it already is theirs.
    /// Symlinks are changed themselves, never followed. Needs root when the owner is
    /// someone else, which is the only case where anything is done.
    pub fn chown_tree(self, dir: &Path) -> anyhow::Result<()> {
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("cannot inspect {}", path.display()))?;
            if meta.uid() != self.uid || meta.gid() != self.gid {
                std::os::unix::fs::lchown(&path, Some(self.uid), Some(self.gid)).with_context(
                    || {
                        format!(
                            "cannot give {} to uid {} (the owner of the data directory); run gantry init as root or as that user",
                            path.display(),
                            self.uid
                        )
                    },
                )?;
            }
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)
                    .with_context(|| format!("cannot list {}", path.display()))?
                {
                    pending.push(
                        entry
                            .with_context(|| format!("cannot list {}", path.display()))?
                            .path(),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_already_ours_is_left_alone_and_a_missing_dir_has_no_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("tls")).expect("mkdir");
        std::fs::write(dir.path().join("tls").join("ca.pem"), "x").expect("write");
        let owner = Owner::of_existing(dir.path()).expect("exists");
        // Same owner: nothing to change, so this works without privileges.
        owner.chown_tree(dir.path()).expect("no-op");
        let meta = std::fs::metadata(dir.path().join("tls").join("ca.pem")).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));
        assert_eq!(Owner::of_existing(&dir.path().join("missing")), None);
    }
}
