//! Per-job resource limits with control groups: memory, number of processes, CPU.
//!
//! Owns: the limits an operator sets for every job ([`JobLimits`], from `--job-memory`,
//! `--job-pids`, `--job-cpus`); finding where this agent may create cgroups
//! ([`Cgroups::detect`]); what files a job's cgroup gets ([`limit_writes`] for v1,
//! [`limit_writes_v2`] for v2, pure); creating a job's cgroup and removing it after the
//! job ([`JobCgroup`]). A job's processes join it through job-init (`--cgroup`), before
//! the step's process exists, so nothing escapes it. Docker jobs get the same limits
//! through the container's HostConfig (`runner::docker`).
//!
//! Which hierarchy: a host whose `/sys/fs/cgroup` is itself a cgroup2 mount (it has
//! `cgroup.controllers`: Debian 11+, Ubuntu 21.10+, Fedora 31+) is driven as v2; any
//! other (v1, or hybrid: v1 controllers with an empty `unified/`) as v1.
//! - v1: a job's group sits under the agent's own cgroup of each controller, so a job
//!   stays inside whatever limits the agent itself has.
//! - v2: the agent's own cgroup must be delegated to it (systemd's `Delegate=yes`: the
//!   controllers are available in it and it may write there). A v2 group with
//!   controllers enabled for its children may hold no processes itself, so at start the
//!   agent moves itself into a leaf `agent/` of its own cgroup, enables the controllers
//!   the limits need in its `cgroup.subtree_control`, and makes each job's group beside
//!   that leaf. Not delegated, it says why and jobs run isolated without limits.
//!
//! It must not decide what a job runs or when it ends.

use std::path::{Path, PathBuf};

/// Where the cgroup v1 controllers are mounted (one directory each), or the cgroup v2
/// hierarchy.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
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

/// A controller a limit lives in (named the same in v1 and v2).
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

/// The files a v2 job's cgroup gets, in order. `swap` says whether the kernel accounts
/// swap (`memory.swap.max` exists): then the job gets none, as v1's memory+swap limit
/// equal to the memory one allows none.
pub fn limit_writes_v2(limits: &JobLimits, swap: bool) -> Vec<(&'static str, String)> {
    let mut writes = Vec::new();
    if let Some(bytes) = limits.memory {
        writes.push(("memory.max", bytes.to_string()));
        if swap {
            writes.push(("memory.swap.max", "0".to_owned()));
        }
    }
    if let Some(pids) = limits.pids {
        writes.push(("pids.max", pids.to_string()));
    }
    if let Some(quota) = limits.cpu_quota_us() {
        writes.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}")));
    }
    writes
}

/// The controllers `limits` needs, each once, in [`Controller::ALL`]'s order.
fn needed(limits: &JobLimits) -> Vec<Controller> {
    let used: Vec<Controller> = limit_writes(limits, false)
        .into_iter()
        .map(|(c, _, _)| c)
        .collect();
    Controller::ALL
        .into_iter()
        .filter(|c| used.contains(c))
        .collect()
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

/// The agent's own cgroup v2 path, from `/proc/self/cgroup`'s `0::PATH` line.
fn own_v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Why job limits cannot be applied on this host; the agent then runs jobs isolated
/// without limits and logs this at start.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cgroup v1 {controller} controller is not mounted at {mount}")]
    V1NotMounted {
        controller: &'static str,
        mount: PathBuf,
    },
    #[error("/proc/self/cgroup has no cgroup v2 line (0::PATH) on this cgroup v2 host")]
    NoV2Path,
    #[error("cgroup v2: the {missing} controller(s) are not delegated to the agent's cgroup {dir} (its cgroup.controllers lacks them); run the agent in a cgroup delegated to it (systemd: Delegate=yes, as the packaged unit does; or `systemd-run -p Delegate=yes ...`)")]
    NotDelegated { dir: PathBuf, missing: String },
    #[error("cgroup v2: cannot {what} {path}: {source}; run the agent in a cgroup of its own delegated to it (systemd: Delegate=yes, as the packaged unit does)")]
    V2Setup {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a host's job cgroups go.
#[derive(Debug, Clone, PartialEq)]
enum Layout {
    /// The agent's own cgroup directory in each v1 controller a limit needs; `memsw`:
    /// the kernel accounts swap.
    V1 {
        parents: Vec<(Controller, PathBuf)>,
        memsw: bool,
    },
    /// The agent's own (delegated) v2 cgroup, whose children jobs' groups are; `swap`:
    /// the kernel accounts swap.
    V2 { parent: PathBuf, swap: bool },
}

/// The leaf of its own v2 cgroup the agent moves itself into (not `gantry-PID-...`, so
/// [`Cgroups::sweep`] leaves it alone).
const V2_AGENT_LEAF: &str = "agent";

/// Where this agent makes job cgroups, and the limits they get.
#[derive(Debug, Clone, PartialEq)]
pub struct Cgroups {
    layout: Layout,
    limits: JobLimits,
}

impl Cgroups {
    /// Finds (v1) or prepares (v2: moves the agent into a leaf of its own cgroup and
    /// enables the controllers for its children) where jobs' cgroups go, for the
    /// controllers `limits` needs. `Ok(None)` when no limit is set; Err says why the
    /// limits cannot be applied on this host.
    pub fn detect(limits: JobLimits) -> Result<Option<Self>, CgroupError> {
        let path = Path::new("/proc/self/cgroup");
        let own = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::detect_at(Path::new(CGROUP_ROOT), &own, std::process::id(), limits)
    }

    /// [`Self::detect`] against a cgroup mount at `root`, this process's
    /// `/proc/self/cgroup` text `own` and its `pid` (tests lay `root` out in a
    /// temporary directory).
    fn detect_at(
        root: &Path,
        own: &str,
        pid: u32,
        limits: JobLimits,
    ) -> Result<Option<Self>, CgroupError> {
        let needed = needed(&limits);
        if needed.is_empty() {
            return Ok(None);
        }
        let layout = if root.join("cgroup.controllers").is_file() {
            setup_v2(root, own, pid, &needed)?
        } else {
            find_v1(root, own, &needed)?
        };
        Ok(Some(Self { layout, limits }))
    }

    pub fn limits(&self) -> JobLimits {
        self.limits
    }

    /// `v1` or `v2`, for the agent's start line.
    pub fn hierarchy(&self) -> &'static str {
        match self.layout {
            Layout::V1 { .. } => "cgroup v1",
            Layout::V2 { .. } => "cgroup v2",
        }
    }

    /// The directories every job cgroup is made in.
    fn parents(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V1 { parents, .. } => parents.iter().map(|(_, p)| p.as_path()).collect(),
            Layout::V2 { parent, .. } => vec![parent.as_path()],
        }
    }

    /// Creates the job's cgroup `name` (in every controller, on v1), with the limits
    /// written.
    pub fn create(&self, name: &str) -> std::io::Result<JobCgroup> {
        let name = format!("gantry-{}-{name}", std::process::id());
        let cgroup = JobCgroup {
            dirs: self.parents().iter().map(|p| p.join(&name)).collect(),
        };
        for dir in &cgroup.dirs {
            match std::fs::create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(with_path(&e, dir))
                }
                _ => {}
            }
        }
        let writes: Vec<(PathBuf, String)> = match &self.layout {
            Layout::V1 { parents, memsw } => limit_writes(&self.limits, *memsw)
                .into_iter()
                .filter_map(|(controller, file, value)| {
                    let index = parents.iter().position(|(c, _)| *c == controller)?;
                    Some((cgroup.dirs[index].join(file), value))
                })
                .collect(),
            Layout::V2 { swap, .. } => limit_writes_v2(&self.limits, *swap)
                .into_iter()
                .map(|(file, value)| (cgroup.dirs[0].join(file), value))
                .collect(),
        };
        for (path, value) in writes {
            std::fs::write(&path, &value).map_err(|e| with_path(&e, &path))?;
        }
        Ok(cgroup)
    }

    /// Removes job cgroups left by agents that are gone (a crash, a kill): named
    /// `gantry-PID-...` with no process PID any more. Best effort.
    pub fn sweep(&self) {
        for parent in self.parents() {
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

/// v1: the agent's own cgroup in each needed controller, mounted at `root/<name>`.
fn find_v1(root: &Path, own: &str, needed: &[Controller]) -> Result<Layout, CgroupError> {
    let own = own_paths(own);
    let mut parents = Vec::new();
    for c in needed {
        let mount = root.join(c.name());
        let path = own.iter().find(|(o, _)| o == c).map(|(_, p)| p);
        match path.map(|p| mount.join(p.trim_start_matches('/'))) {
            Some(dir) if dir.join("cgroup.procs").is_file() => parents.push((*c, dir)),
            _ => {
                return Err(CgroupError::V1NotMounted {
                    controller: c.name(),
                    mount,
                })
            }
        }
    }
    let memsw = parents
        .iter()
        .any(|(c, d)| *c == Controller::Memory && d.join("memory.memsw.limit_in_bytes").is_file());
    Ok(Layout::V1 { parents, memsw })
}

/// v2: checks that the agent's own cgroup offers the `needed` controllers, moves process
/// `pid` into its leaf [`V2_AGENT_LEAF`] and enables the controllers for the children.
/// Each step is idempotent (an agent restarted in the same cgroup does it again).
fn setup_v2(
    root: &Path,
    own: &str,
    pid: u32,
    needed: &[Controller],
) -> Result<Layout, CgroupError> {
    let path = own_v2_path(own).ok_or(CgroupError::NoV2Path)?;
    let dir = root.join(path.trim_start_matches('/'));
    let controllers_file = dir.join("cgroup.controllers");
    let available =
        std::fs::read_to_string(&controllers_file).map_err(|source| CgroupError::Read {
            path: controllers_file,
            source,
        })?;
    let missing: Vec<&str> = needed
        .iter()
        .map(|c| c.name())
        .filter(|n| !available.split_whitespace().any(|a| a == *n))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::NotDelegated {
            dir,
            missing: missing.join(", "),
        });
    }
    let step = |what: &'static str, path: PathBuf, result: std::io::Result<()>| {
        result.map_err(|source| CgroupError::V2Setup { what, path, source })
    };
    let leaf = dir.join(V2_AGENT_LEAF);
    match std::fs::create_dir(&leaf) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            step("create the agent's leaf cgroup", leaf.clone(), Err(e))?;
        }
        _ => {}
    }
    let procs = leaf.join("cgroup.procs");
    step(
        "move the agent into",
        procs.clone(),
        std::fs::write(&procs, pid.to_string()),
    )?;
    let enable: Vec<String> = needed.iter().map(|c| format!("+{}", c.name())).collect();
    let subtree = dir.join("cgroup.subtree_control");
    step(
        "enable the controllers for jobs in",
        subtree.clone(),
        std::fs::write(&subtree, enable.join(" ")),
    )?;
    let swap = dir.join("memory.swap.max").is_file();
    Ok(Layout::V2 { parent: dir, swap })
}

fn with_path(e: &std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// One job's cgroup: its directory in each v1 controller, or its one v2 directory.
#[derive(Debug, Clone, PartialEq)]
pub struct JobCgroup {
    dirs: Vec<PathBuf>,
}

impl JobCgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the cgroup. Its processes are gone once the job's steps ended (each
    /// step's namespace dies with it), but the kernel may take a moment to let go of
    /// them: retried for up to a second.
    pub fn remove(&self) -> std::io::Result<()> {
        for dir in &self.dirs {
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
    /// A cgroup2 mount laid out in a temporary directory as systemd leaves a service
    /// with `Delegate=yes`: the controllers available in the service's cgroup, nothing
    /// enabled for its children yet, the agent's pid in it.
    fn fake_v2(controllers: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let service = root.path().join("system.slice/gantry-agent.service");
        std::fs::create_dir_all(&service).expect("mkdir");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .expect("root controllers");
        std::fs::write(service.join("cgroup.controllers"), controllers).expect("controllers");
        std::fs::write(service.join("cgroup.subtree_control"), "").expect("subtree");
        std::fs::write(service.join("cgroup.procs"), "4242\n").expect("procs");
        std::fs::write(service.join("memory.swap.max"), "max\n").expect("swap");
        (root, service)
    }

    const OWN_V2: &str = "0::/system.slice/gantry-agent.service\n";

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn limits_become_the_v2_files_in_order() {
        let limits = JobLimits {
            memory: Some(64 << 20),
            pids: Some(100),
            cpus: Some(1.5),
        };
        assert_eq!(
            limit_writes_v2(&limits, true),
            [
                ("memory.max", "67108864".to_owned()),
                ("memory.swap.max", "0".to_owned()),
                ("pids.max", "100".to_owned()),
                ("cpu.max", "150000 100000".to_owned()),
            ]
        );
        assert_eq!(
            limit_writes_v2(&limits, false).len(),
            3,
            "no swap file, no swap write"
        );
        assert!(limit_writes_v2(&JobLimits::default(), true).is_empty());
    }

    #[test]
    fn on_a_delegated_v2_cgroup_the_agent_moves_to_a_leaf_and_jobs_get_the_v2_files() {
        let (root, service) = fake_v2("cpu memory pids\n");
        let limits = JobLimits {
            memory: Some(1 << 30),
            pids: Some(512),
            cpus: Some(2.0),
        };
        let cgroups = Cgroups::detect_at(root.path(), OWN_V2, 4242, limits)
            .expect("delegated")
            .expect("limits set");
        assert_eq!(cgroups.hierarchy(), "cgroup v2");
        assert_eq!(
            read(&service.join("agent/cgroup.procs")),
            "4242",
            "the agent is in its leaf"
        );
        assert_eq!(
            read(&service.join("cgroup.subtree_control")),
            "+memory +pids +cpu",
            "the controllers the limits need, enabled for the children"
        );

        let job = cgroups.create("job-7").expect("create");
        let dir = service.join(format!("gantry-{}-job-7", std::process::id()));
        assert_eq!(
            job.procs_files(),
            [dir.join("cgroup.procs")],
            "one group on v2"
        );
        for (file, value) in [
            ("memory.max", "1073741824"),
            ("memory.swap.max", "0"),
            ("pids.max", "512"),
            ("cpu.max", "200000 100000"),
        ] {
            assert_eq!(read(&dir.join(file)), value, "{file}");
        }
        // On cgroupfs the kernel removes a group's files with it; here they are files.
        for file in std::fs::read_dir(&dir).expect("dir") {
            std::fs::remove_file(file.expect("entry").path()).expect("rm");
        }
        job.remove().expect("remove");
        assert!(!dir.exists(), "the job's group is gone");
        assert!(service.join("agent").is_dir(), "the agent's leaf stays");

        // Again, as an agent restarted in the same cgroup: every step is idempotent.
        Cgroups::detect_at(root.path(), OWN_V2, 4343, limits)
            .expect("again")
            .expect("limits set");
        assert_eq!(read(&service.join("agent/cgroup.procs")), "4343");
    }

    #[test]
    fn only_the_needed_v2_controllers_are_enabled_and_sweep_keeps_the_agents_leaf() {
        let (root, service) = fake_v2("pids\n");
        let pids_only = JobLimits {
            pids: Some(64),
            ..JobLimits::default()
        };
        let cgroups = Cgroups::detect_at(root.path(), OWN_V2, 1, pids_only)
            .expect("pids delegated")
            .expect("limits set");
        assert_eq!(read(&service.join("cgroup.subtree_control")), "+pids");
        // A group of an agent that is gone (no such pid), and one of this live agent.
        let gone = service.join("gantry-4294967-job-1");
        std::fs::create_dir(&gone).expect("mkdir");
        let job = cgroups.create("job-2").expect("create");
        cgroups.sweep();
        assert!(!gone.exists(), "the dead agent's group is swept");
        let live = job.procs_files()[0].parent().expect("dir").to_path_buf();
        assert!(live.is_dir(), "a live agent's group stays");
        assert!(service.join("agent").is_dir(), "the agent's leaf stays");
    }

    #[test]
    fn a_v2_cgroup_that_is_not_delegated_says_what_is_missing_and_how_to_fix_it() {
        // A service without Delegate=yes on v2: only what systemd enables for accounting.
        let (root, _service) = fake_v2("pids\n");
        let limits = JobLimits {
            memory: Some(1 << 30),
            pids: Some(64),
            cpus: Some(1.0),
        };
        let err = Cgroups::detect_at(root.path(), OWN_V2, 1, limits).expect_err("not delegated");
        let text = err.to_string();
        assert!(
            text.contains("memory, cpu controller(s) are not delegated"),
            "{text}"
        );
        assert!(text.contains("gantry-agent.service"), "{text}");
        assert!(text.contains("Delegate=yes"), "{text}");

        // No 0:: line on a v2 host, and a cgroup that is not there.
        let err = Cgroups::detect_at(root.path(), "1:name=systemd:/\n", 1, limits)
            .expect_err("no v2 line");
        assert!(matches!(err, CgroupError::NoV2Path), "{err}");
        let err = Cgroups::detect_at(root.path(), "0::/elsewhere\n", 1, limits)
            .expect_err("no such cgroup");
        assert!(
            err.to_string().contains("elsewhere/cgroup.controllers"),
            "{err}"
        );
    }

    #[test]
    fn a_v1_or_hybrid_host_is_driven_as_v1_under_the_agents_own_cgroups() {
        // Hybrid: v1 controllers, and a cgroup2 mount at unified/ with none.
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("unified")).expect("unified");
        std::fs::write(root.path().join("unified/cgroup.controllers"), "").expect("empty");
        let pids = root.path().join("pids/a");
        std::fs::create_dir_all(&pids).expect("pids");
        std::fs::write(pids.join("cgroup.procs"), "").expect("procs");
        let own = "8:pids:/a\n0::/\n";
        let limits = JobLimits {
            pids: Some(10),
            ..JobLimits::default()
        };
        let cgroups = Cgroups::detect_at(root.path(), own, 1, limits)
            .expect("v1")
            .expect("limits set");
        assert_eq!(cgroups.hierarchy(), "cgroup v1");
        let job = cgroups.create("j").expect("create");
        let dir = pids.join(format!("gantry-{}-j", std::process::id()));
        assert_eq!(read(&dir.join("pids.max")), "10");
        assert_eq!(job.procs_files(), [dir.join("cgroup.procs")]);
        let with_memory = JobLimits {
            memory: Some(1 << 20),
            ..limits
        };
        let err = Cgroups::detect_at(root.path(), own, 1, with_memory).expect_err("no memory");
        assert!(
            err.to_string()
                .contains("v1 memory controller is not mounted"),
            "{err}"
        );
    }
}
