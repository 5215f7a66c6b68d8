//! The data directory's free space against its low-space watermark (`gantry server
//! --min-free-space`): the decision (is the disk low?, [`assess`]), the last sample of
//! the free space ([`DiskSpace`], refreshed every [`SAMPLE_INTERVAL`] by its loop, never
//! per request), and how a write that ran out of space is told ([`OutOfSpace`]).
//!
//! At or under the watermark the coordinator refuses new runs and uploads (sources,
//! artifacts and caches) with [`LowSpace`]'s message, and `/readyz` and `/metrics` say
//! so. Jobs already running go on: their logs are small next to uploads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::base::text::human_bytes;

/// The watermark when none is given: room for a few uploads and the store's own growth.
pub const DEFAULT_MIN_FREE_SPACE: &str = "512MiB";

/// How often the free space is measured: a statvfs costs microseconds, but requests
/// never wait for one, and 5 s is short next to how fast an upload fills a disk that
/// has the default 512 MiB left (at 100 MiB/s, the last sample is at most 500 MiB old).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// What [`DiskSpace`] holds before its first sample, and after a sample failed: unknown,
/// so nothing is refused on its account.
const UNKNOWN: u64 = u64::MAX;

/// The data directory is at or under its watermark.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the coordinator's data directory {} has {} free, under its {} watermark (--min-free-space): free space there, or lower the watermark", .dir.display(), human_bytes(*.free), human_bytes(*.min_free))]
pub struct LowSpace {
    pub dir: PathBuf,
    pub free: u64,
    pub min_free: u64,
}

/// A write into the data directory failed because its file system is full.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator is out of space: its data directory {} is full ({what}: {source}); free space there and try again", .dir.display())]
pub struct OutOfSpace {
    pub dir: PathBuf,
    /// What was being written, e.g. "storing a pack of chunks".
    pub what: String,
    pub source: std::io::Error,
}

/// The decision: `free` bytes against a watermark of `min_free` (0 turns it off). Low at
/// or under the watermark.
pub fn assess(dir: &Path, free: u64, min_free: u64) -> Result<(), LowSpace> {
    if min_free > 0 && free <= min_free {
        Err(LowSpace {
            dir: dir.to_path_buf(),
            free,
            min_free,
        })
    } else {
        Ok(())
    }
}

/// Whether an I/O error is the file system being full (ENOSPC) or over a quota (EDQUOT).
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    let raw = e.raw_os_error();
    raw == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || raw == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// The data directory's free space as last sampled, and its watermark.
#[derive(Debug)]
pub struct DiskSpace {
    dir: PathBuf,
    min_free: u64,
    free: AtomicU64,
}

impl DiskSpace {
    /// Watches `dir` against `min_free` bytes, sampling it once now.
    pub fn new(dir: &Path, min_free: u64) -> Self {
        let space = Self {
            dir: dir.to_path_buf(),
            min_free,
            free: AtomicU64::new(UNKNOWN),
        };
        space.sample();
        space
    }

    /// Measures the free space (what an unprivileged writer may use) and keeps it.
    pub fn sample(&self) {
        let free = match rustix::fs::statvfs(&self.dir) {
            Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot measure the free space: {e}");
                UNKNOWN
            }
        };
        let was = self.free.swap(free, Ordering::Relaxed);
        let (low_now, low_before) = (
            assess(&self.dir, free, self.min_free).is_err(),
            assess(&self.dir, was, self.min_free).is_err(),
        );
        if low_now && !low_before {
            tracing::warn!(
                dir = %self.dir.display(),
                free,
                min_free = self.min_free,
                "the data directory is low on space: refusing new runs and uploads"
            );
        } else if low_before && !low_now {
            tracing::info!(dir = %self.dir.display(), free, "the data directory has room again");
        }
    }

    /// The free bytes as last sampled, if the sample worked.
    pub fn free_bytes(&self) -> Option<u64> {
        Some(self.free.load(Ordering::Relaxed)).filter(|f| *f != UNKNOWN)
    }

    /// Refuses when the last sample is at or under the watermark.
    pub fn check(&self) -> Result<(), LowSpace> {
        assess(&self.dir, self.free.load(Ordering::Relaxed), self.min_free)
    }

    /// Names a write that failed for want of space; `None` for other failures.
    pub fn out_of_space(&self, what: &str, e: &std::io::Error) -> Option<OutOfSpace> {
        is_out_of_space(e).then(|| OutOfSpace {
            dir: self.dir.clone(),
            what: what.to_string(),
            source: std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or_default()),
        })
    }

    /// Samples every [`SAMPLE_INTERVAL`], forever (the server aborts it).
    pub async fn sample_periodically(self: std::sync::Arc<Self>) {
        loop {
            tokio::time::sleep(SAMPLE_INTERVAL).await;
            let me = self.clone();
            // statvfs may block on a hung network file system: keep it off the runtime.
            let _ = tokio::task::spawn_blocking(move || me.sample()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn low_at_or_under_the_watermark_and_never_when_it_is_off() {
        let dir = Path::new("/data");
        assert!(assess(dir, 513 * MIB, 512 * MIB).is_ok());
        assert!(assess(dir, 512 * MIB, 512 * MIB).is_err());
        assert!(assess(dir, 0, 512 * MIB).is_err());
        assert!(assess(dir, 0, 0).is_ok(), "0 turns the watermark off");
        assert!(
            assess(dir, UNKNOWN, 512 * MIB).is_ok(),
            "unknown is not low"
        );
    }

    #[test]
    fn the_refusal_names_the_directory_the_figures_and_the_option() {
        let e = assess(Path::new("/x"), 300 * MIB, 512 * MIB).expect_err("low");
        assert_eq!(
            e.to_string(),
            "the coordinator's data directory /x has 300.0MiB free, under its 512.0MiB \
             watermark (--min-free-space): free space there, or lower the watermark"
        );
    }

    #[test]
    fn only_a_full_file_system_is_out_of_space() {
        let space = DiskSpace {
            dir: PathBuf::from("/x"),
            min_free: 0,
            free: AtomicU64::new(UNKNOWN),
        };
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = space.out_of_space("storing a pack", &full).expect("ENOSPC");
        assert!(
            e.to_string().starts_with(
                "the coordinator is out of space: its data directory /x is full (storing a pack: "
            ),
            "{e}"
        );
        assert!(is_out_of_space(&std::io::Error::from_raw_os_error(
            libc::EDQUOT
        )));
        let other = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(space.out_of_space("storing a pack", &other).is_none());
    }

    #[test]
    fn a_real_directory_is_sampled_and_a_huge_watermark_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = DiskSpace::new(dir.path(), u64::MAX - 1);
        assert!(space.free_bytes().is_some());
        assert!(space.check().is_err());
        assert!(DiskSpace::new(dir.path(), 0).check().is_ok());
    }
}
