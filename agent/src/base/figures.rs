//! Host figures for heartbeats, read with sysinfo.
//!
//! Idle memory matters (the agent sits on every server and its RSS is benchmarked), so
//! the sampler keeps one `System` with nothing loaded but the CPU list and RAM counters,
//! and one disk list whose entry for the data directory is the only one ever refreshed.
//! No process table is ever read.

use std::path::Path;

use gantry_protocol::HostFigures;
use sysinfo::{DiskRefreshKind, Disks, MemoryRefreshKind, System};

/// Why the sampler could not start.
#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    #[error("cannot read host figures: {0}")]
    Unavailable(#[from] sysinfo::Error),
}

/// Reads [`HostFigures`] for the host and the filesystem holding the data directory.
pub struct HostSampler {
    system: System,
    disks: Disks,
    /// Index in `disks` of the filesystem holding the data directory, if one matched.
    data_disk: Option<usize>,
}

impl HostSampler {
    pub fn new(data_dir: &Path) -> Result<Self, FiguresError> {
        let mut system = System::new()?;
        // CPU usage is a difference between two readings: take the first one now so the
        // first heartbeat reports usage since start rather than since boot.
        system.refresh_cpu_usage();
        let disks =
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage())?;
        // Resolve symlinks so /var/lib -> /data/var/lib finds /data's filesystem.
        let dir = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        let data_disk = longest_mount_prefix(disks.iter().map(sysinfo::Disk::mount_point), &dir);
        Ok(Self {
            system,
            disks,
            data_disk,
        })
    }

    /// Samples the figures; CPU usage is the average since the previous sample.
    pub fn sample(&mut self) -> HostFigures {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let (disk_total_bytes, disk_free_bytes) =
            match self.data_disk.and_then(|i| self.disks.get_mut(i)) {
                Some(disk) => {
                    disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                    (disk.total_space(), disk.available_space())
                }
                None => (0, 0),
            };
        // Load average and uptime are unsupported on some platforms; zero says "unknown"
        // without failing a heartbeat over it.
        let load_average = System::load_average().map_or([0.0; 3], |l| {
            [l.one as f32, l.five as f32, l.fifteen as f32]
        });
        HostFigures {
            cpu_count: u32::try_from(self.system.cpus().len()).unwrap_or(u32::MAX),
            cpu_percent: self.system.global_cpu_usage().clamp(0.0, 100.0),
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            disk_total_bytes,
            disk_free_bytes,
            load_average,
            uptime_secs: System::uptime().unwrap_or(0),
        }
    }
}

/// The index of the mount point that is the longest prefix of `dir` (whole path
/// components, so `/var/lib2` is not under `/var/lib`).
pub fn longest_mount_prefix<'a>(
    mount_points: impl IntoIterator<Item = &'a Path>,
    dir: &Path,
) -> Option<usize> {
    mount_points
        .into_iter()
        .enumerate()
        .filter(|(_, mount)| dir.starts_with(mount))
        .max_by_key(|(_, mount)| mount.components().count())
        .map(|(i, _)| i)
}

/// The host's name as the OS reports it, or `unknown` when it cannot be read (the name
/// is only a label and a display value; the agent's identity is its certificate).
pub fn hostname() -> String {
    System::host_name()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deepest_matching_mount_wins() {
        let mounts = [
            Path::new("/"),
            Path::new("/var/lib"),
            Path::new("/var"),
            Path::new("/var/lib2"),
        ];
        assert_eq!(
            longest_mount_prefix(mounts, Path::new("/var/lib/gantry-agent")),
            Some(1)
        );
        assert_eq!(
            longest_mount_prefix(mounts, Path::new("/var/lib2x/a")),
            Some(2)
        );
        assert_eq!(longest_mount_prefix(mounts, Path::new("/home/x")), Some(0));
        assert_eq!(
            longest_mount_prefix([Path::new("/data")], Path::new("/home")),
            None
        );
    }

    #[test]
    fn samples_describe_this_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sampler = HostSampler::new(dir.path()).expect("sampler");
        let figures = sampler.sample();
        assert!(figures.cpu_count >= 1, "{figures:?}");
        assert!(
            figures.memory_total_bytes > 0
                && figures.memory_used_bytes <= figures.memory_total_bytes,
            "{figures:?}"
        );
        assert!((0.0..=100.0).contains(&figures.cpu_percent), "{figures:?}");
        if sampler.data_disk.is_some() {
            assert!(
                figures.disk_free_bytes <= figures.disk_total_bytes,
                "{figures:?}"
            );
        }
    }
}
