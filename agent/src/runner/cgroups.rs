//! Per-job resource limits with control groups: memory, number of processes, CPU.
//!
//! Owns: the limits an operator sets for every job ([`JobLimits`], from `--job-memory`,
//! `--job-pids`, `--job-cpus`); finding where this agent may create cgroups
//! ([`Cgroups::detect`]: under the agent's own cgroup of each cgroup v1 controller, so
//! a job stays inside whatever limits the agent itself has); what files a job's cgroup
//! gets ([`limit_writes`], pure); creating a job's cgroup and removing it after the job
//! ([`JobCgroup`]). A job's processes join it through job-init (`--cgroup`), before the
//! step's process exists, so nothing escapes it. Docker jobs get the same limits through
//! the container's HostConfig (`runner::docker`).
//!
//! cgroup v2 (a unified hierarchy with controllers) is detected and said at start but
//! not used yet: a v2 child needs its parent free of processes, so the agent would first
//! move itself into a leaf of a delegated subtree.
//!
//! It must not decide what a job runs or when it ends.

use std::path::{Path, PathBuf};

/// Where the cgroup v1 controllers are mounted, one directory each.
const V1_ROOT: &str = "/sys/fs/cgroup";
/// The pids limit when `--job-pids` is not given: room for parallel builds with many
/// threads (threads count), far below the kernel's pid_max.
pub const DEFAULT_JOB_PIDS: u64 = 16_384;
/// `cpu.cfs_period_us` the CPU quota is expressed against (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The limits every job gets; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobLimits {
    /// Bytes of memory (and of memory plus swap, where the kernel accounts swap).
    pub memory: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// CPUs' worth of time, e.g. 1.5.
    pub cpus: Option<f64>,
}

impl JobLimits {
    /// The CPU quota in microseconds per [`CPU_PERIOD_US`], at least 1 ms.
    fn cpu_quota_us(&self) -> Option<u64> {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        self.cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1_000))
    }

    /// The same limits in the Docker engine's terms: (memory bytes, pids, nano CPUs).
    pub fn docker(&self) -> (Option<i64>, Option<i64>, Option<i64>) {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        #[allow(clippy::cast_possible_truncation)]
        let nano = self.cpus.map(|c| (c * 1e9).round() as i64);
        (self.memory.map(int), self.pids.map(int), nano)
    }
}

/// A cgroup v1 controller a limit lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Self; 3] = [Self::Memory, Self::Pids, Self::Cpu];

    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Pids => "pids",
            Self::Cpu => "cpu",
        }
    }
}

/// The files a job's cgroup gets, in order (memory+swap only after memory: the kernel
/// refuses a memsw limit below the memory one). `memsw` says whether the kernel
/// accounts swap.
pub fn limit_writes(limits: &JobLimits, memsw: bool) -> Vec<(Controller, &'static str, String)> {
    let mut writes = Vec::new();
    if let Some(bytes) = limits.memory {
        writes.push((
            Controller::Memory,
            "memory.limit_in_bytes",
            bytes.to_string(),
        ));
        if memsw {
            writes.push((
                Controller::Memory,
                "memory.memsw.limit_in_bytes",
                bytes.to_string(),
            ));
        }
    }
    if let Some(pids) = limits.pids {
        writes.push((Controller::Pids, "pids.max", pids.to_string()));
    }
    if let Some(quota) = limits.cpu_quota_us() {
        writes.push((
            Controller::Cpu,
            "cpu.cfs_period_us",
            CPU_PERIOD_US.to_string(),
        ));
        writes.push((Controller::Cpu, "cpu.cfs_quota_us", quota.to_string()));
    }
    writes
}

/// The agent's own cgroup path in each v1 controller, from `/proc/self/cgroup`
/// (`ID:CONTROLLERS:PATH` lines; v2's line has no controllers).
fn own_paths(proc_cgroup: &str) -> Vec<(Controller, String)> {
    let mut paths = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        for c in Controller::ALL {
            if controllers.split(',').any(|n| n == c.name()) {
                paths.push((c, path.to_owned()));
            }
        }
    }
    paths
}

/// Where this agent makes job cgroups, and the limits they get.
#[derive(Debug, Clone, PartialEq)]
pub struct Cgroups {
    /// The agent's own cgroup directory in each controller a limit needs.
    parents: Vec<(Controller, PathBuf)>,
    limits: JobLimits,
    memsw: bool,
}

impl Cgroups {
    /// Finds the agent's own cgroups for the controllers `limits` needs. `Ok(None)`
    /// when no limit is set; Err says why the limits cannot be applied on this host.
    pub fn detect(limits: JobLimits) -> Result<Option<Self>, String> {
        let needed: Vec<Controller> = limit_writes(&limits, false)
            .into_iter()
            .map(|(c, _, _)| c)
            .collect();
        if needed.is_empty() {
            return Ok(None);
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_paths(&own);
        let mut parents = Vec::new();
        for c in Controller::ALL.into_iter().filter(|c| needed.contains(c)) {
            let mount = Path::new(V1_ROOT).join(c.name());
            let path = own.iter().find(|(o, _)| *o == c).map(|(_, p)| p);
            let dir = path.map(|p| mount.join(p.trim_start_matches('/')));
            match dir {
                Some(dir) if dir.join("cgroup.procs").is_file() => parents.push((c, dir)),
                _ if Path::new(V1_ROOT).join("cgroup.controllers").is_file() => {
                    return Err("this host has cgroup v2, which the agent does not drive yet: pass no --job-memory, --job-pids or --job-cpus, or boot with cgroup v1".into());
                }
                _ => {
                    return Err(format!(
                        "the cgroup v1 {} controller is not mounted at {}",
                        c.name(),
                        mount.display()
                    ))
                }
            }
        }
        let memsw = parents.iter().any(|(c, d)| {
            *c == Controller::Memory && d.join("memory.memsw.limit_in_bytes").is_file()
        });
        Ok(Some(Self {
            parents,
            limits,
            memsw,
        }))
    }

    pub fn limits(&self) -> JobLimits {
        self.limits
    }

    /// Creates the job's cgroup `name` in every controller, with the limits written.
    pub fn create(&self, name: &str) -> std::io::Result<JobCgroup> {
        let name = format!("gantry-{}-{name}", std::process::id());
        let cgroup = JobCgroup {
            dirs: self
                .parents
                .iter()
                .map(|(c, parent)| (*c, parent.join(&name)))
                .collect(),
        };
        for (_, dir) in &cgroup.dirs {
            match std::fs::create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(with_path(&e, dir))
                }
                _ => {}
            }
        }
        for (controller, file, value) in limit_writes(&self.limits, self.memsw) {
            if let Some((_, dir)) = cgroup.dirs.iter().find(|(c, _)| *c == controller) {
                let path = dir.join(file);
                std::fs::write(&path, &value).map_err(|e| with_path(&e, &path))?;
            }
        }
        Ok(cgroup)
    }

    /// Removes job cgroups left by agents that are gone (a crash, a kill): named
    /// `gantry-PID-...` with no process PID any more. Best effort.
    pub fn sweep(&self) {
        for (_, parent) in &self.parents {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name
                    .strip_prefix("gantry-")
                    .and_then(|rest| rest.split('-').next());
                if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }
}

fn with_path(e: &std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// One job's cgroup, in each controller.
#[derive(Debug, Clone, PartialEq)]
pub struct JobCgroup {
    dirs: Vec<(Controller, PathBuf)>,
}

impl JobCgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Removes the cgroup. Its processes are gone once the job's steps ended (each
    /// step's namespace dies with it), but the kernel may take a moment to let go of
    /// them: retried for up to a second.
    pub fn remove(&self) -> std::io::Result<()> {
        for (_, dir) in &self.dirs {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(with_path(&e, dir)),
                }
            }
        }
        Ok(())
    }
}

/// Joins this process to the cgroups whose `cgroup.procs` files are given (job-init).
pub fn join(procs_files: &[PathBuf]) -> std::io::Result<()> {
    let pid = std::process::id().to_string();
    for file in procs_files {
        std::fs::write(file, &pid).map_err(|e| with_path(&e, file))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_the_v1_files_in_order() {
        let limits = JobLimits {
            memory: Some(64 << 20),
            pids: Some(100),
            cpus: Some(1.5),
        };
        let writes = limit_writes(&limits, true);
        let names: Vec<_> = writes.iter().map(|(_, f, v)| format!("{f}={v}")).collect();
        assert_eq!(
            names,
            [
                "memory.limit_in_bytes=67108864",
                "memory.memsw.limit_in_bytes=67108864",
                "pids.max=100",
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=150000"
            ]
        );
        assert_eq!(
            limit_writes(&limits, false).len(),
            4,
            "no memsw without swap accounting"
        );
        assert!(limit_writes(&JobLimits::default(), true).is_empty());
        assert_eq!(
            limits.docker(),
            (Some(64 << 20), Some(100), Some(1_500_000_000))
        );
    }

    #[test]
    fn the_agents_own_cgroups_are_read_per_controller() {
        let own = own_paths(
            "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/x\n2:cpu,cpuacct:/c\n0::/\n",
        );
        assert_eq!(
            own,
            [
                (Controller::Pids, "/a".to_owned()),
                (Controller::Memory, "/process_api/x".to_owned()),
                (Controller::Cpu, "/c".to_owned()),
            ]
        );
    }
}
