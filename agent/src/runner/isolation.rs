//! Keeping a job away from the agent and from other jobs: a user of its own, and a PID
//! namespace that ends with it.
//!
//! Owns: the isolation setting (`--isolation`, `--job-uids`) and what it comes to on this
//! host ([`Isolation`]: whether the agent holds the privileges it needs, decided by the
//! pure [`decide`]); a job's [`Sandbox`] (its uid and gid, its own home and temporary
//! directory, mode 0700, owned by that uid); handing a workspace over to that uid; and
//! `gantry-agent job-init` ([`job_init`]), the small init every isolated step runs
//! under. job-init enters a new PID and mount namespace, mounts that namespace's
//! `/proc`, the job's own directory on `/tmp` and `/var/tmp` and a tmpfs on `/dev/shm`,
//! and forks the step's process as pid 1's only child with the job's uid, no
//! supplementary groups and no capabilities. When the step's process exits, pid 1 exits
//! and the kernel kills everything left in the namespace (`setsid` and double-forked
//! processes included); SIGTERM to the step reaches all of them through pid 1.
//!
//! It must not decide which uid a job gets (the jobs layer hands them out, one per
//! running job) nor what a step runs.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use super::cgroups::{self, CgroupError, Cgroups, JobCgroup, JobLimits};

/// The uids jobs run as when `--job-uids` is not given: far above the ranges distributions
/// hand to people and system services, and below the ones container runtimes map.
pub const DEFAULT_JOB_UIDS: &str = "90000-90999";

/// Capabilities the agent needs to isolate jobs: CAP_CHOWN (0), CAP_DAC_OVERRIDE (1),
/// CAP_FOWNER (3), CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7), CAP_SYS_ADMIN (21).
const NEEDED_CAPS: [(u32, &str); 7] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (21, "CAP_SYS_ADMIN"),
];

/// `--isolation`: whether jobs must run isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationMode {
    /// Every job runs isolated; without the privileges for it the agent refuses jobs.
    Required,
    /// Jobs run as the agent's own user, as one process group (trusted work only).
    Off,
}

/// An `--isolation` value that is neither `required` nor `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid isolation {0:?}: expected required or off")]
pub struct BadIsolationMode(String);

impl std::str::FromStr for IsolationMode {
    type Err = BadIsolationMode;

    fn from_str(text: &str) -> Result<Self, BadIsolationMode> {
        match text {
            "required" => Ok(Self::Required),
            "off" => Ok(Self::Off),
            _ => Err(BadIsolationMode(text.to_owned())),
        }
    }
}

/// `--job-uids`: the uids (and the gids of the same numbers) jobs run as, one per
/// running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub fn len(&self) -> u32 {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The lowest uid of the range that `taken` does not hold.
    pub fn free(&self, taken: impl Fn(u32) -> bool) -> Option<u32> {
        (self.first..=self.last).find(|uid| !taken(*uid))
    }
}

/// A `--job-uids` value that is not a range of uids jobs may run as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid uid range {0:?}: expected FIRST-LAST, like 90000-90999, with 1000 <= FIRST <= LAST < 4294967295")]
pub struct BadUidRange(String);

impl std::str::FromStr for UidRange {
    type Err = BadUidRange;

    fn from_str(text: &str) -> Result<Self, BadUidRange> {
        let bad = || BadUidRange(text.to_owned());
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        // Below 1000 live the system's own users; u32::MAX is "no uid" to the kernel.
        if first < 1000 || last < first || last == u32::MAX {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

/// What the isolation setting comes to on this host.
#[derive(Debug, Clone, PartialEq)]
pub enum Isolation {
    /// Jobs run as the agent's user.
    Off,
    /// Each running job gets a uid of the range, and a cgroup with the limits when the
    /// host has cgroups (`limits_off` says why not, when it has not).
    Users {
        uids: UidRange,
        cgroups: Option<Cgroups>,
        limits_off: Option<String>,
    },
    /// Isolation is required and the agent cannot provide it: every job is refused with
    /// this reason.
    Unavailable(String),
}

impl Isolation {
    /// The line the agent logs at start, so an operator sees what jobs get.
    pub fn describe(&self) -> String {
        match self {
            Self::Off => "job isolation is off (--isolation off): jobs run as this agent's user and can read its data directory and keys; run only trusted work here".into(),
            Self::Users { uids, cgroups, limits_off } => {
                let limits = match (cgroups, limits_off) {
                    (Some(c), _) => format!("with the limits {:?} ({})", c.limits(), c.hierarchy()),
                    (None, Some(why)) => format!("without resource limits: {why}"),
                    (None, None) => "without resource limits (none set)".to_owned(),
                };
                format!("jobs run isolated: each as its own uid of {}-{}, in its own PID namespace, {limits}", uids.first, uids.last)
            }
            Self::Unavailable(why) => format!("jobs cannot be isolated, so this agent refuses every job: {why}"),
        }
    }
}

/// The decision: `privilege` is what [`privilege`] found (Err says what is missing),
/// `cgroups` what [`Cgroups::detect`] found.
pub fn decide(
    mode: IsolationMode,
    uids: UidRange,
    slots: u32,
    privilege: Result<(), PrivilegeError>,
    cgroups: Result<Option<Cgroups>, CgroupError>,
) -> Isolation {
    match (mode, privilege) {
        (IsolationMode::Off, _) => Isolation::Off,
        (IsolationMode::Required, Err(why)) => Isolation::Unavailable(format!(
            "{why}; run the agent as root (or give it those capabilities), or pass --isolation off on a host that runs only trusted work"
        )),
        (IsolationMode::Required, Ok(())) if uids.len() < slots => {
            Isolation::Unavailable(format!(
                "--job-uids {}-{} holds {} uids, fewer than the {slots} slots",
                uids.first,
                uids.last,
                uids.len()
            ))
        }
        (IsolationMode::Required, Ok(())) => {
            let (cgroups, limits_off) = match cgroups {
                Ok(c) => (c, None),
                Err(why) => (None, Some(why.to_string())),
            };
            Isolation::Users {
                uids,
                cgroups,
                limits_off,
            }
        }
    }
}

/// The default `--isolation`: required when the agent can isolate (root, or the
/// capabilities), off otherwise (an unprivileged agent runs trusted work as before, and
/// says so at start).
pub fn default_mode() -> IsolationMode {
    if privilege().is_ok() {
        IsolationMode::Required
    } else {
        IsolationMode::Off
    }
}

/// Why the agent cannot isolate jobs: what [`privilege`] found missing.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read /proc/self/status to check capabilities: {0}")]
    Unreadable(#[source] std::io::Error),
    #[error(transparent)]
    Missing(#[from] MissingCaps),
}

/// Capabilities isolation needs that the agent's process lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the agent runs as uid {uid} without {}", missing.join(", "))]
pub struct MissingCaps {
    /// The real uid, as `/proc/self/status` gives it (`?` if it does not).
    pub uid: String,
    /// The names of the missing capabilities, in `NEEDED_CAPS` order.
    pub missing: Vec<&'static str>,
}

/// Whether this process holds every capability isolation needs (root normally does);
/// Err names the missing ones and the user the agent runs as.
pub fn privilege() -> Result<(), PrivilegeError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Unreadable)?;
    Ok(missing_caps(&status)?)
}

/// The pure half of [`privilege`]: reads `CapEff` and `Uid` from a `/proc/PID/status`.
fn missing_caps(status: &str) -> Result<(), MissingCaps> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let eff = field("CapEff:")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| eff & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let uid = field("Uid:")
        .and_then(|u| u.split_whitespace().nth(1))
        .unwrap_or("?");
    Err(MissingCaps {
        uid: uid.to_owned(),
        missing,
    })
}

/// A job's own identity on this host.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub uid: u32,
    /// The gid of the same number.
    pub gid: u32,
    /// `HOME` for the job: its own, mode 0700.
    pub home: PathBuf,
    /// `TMPDIR` for the job: its own, mode 0700.
    pub tmp: PathBuf,
    /// The job's cgroup, when the host has them and limits are set.
    pub cgroup: Option<JobCgroup>,
    /// The limits, for runners that apply them themselves (Docker).
    pub limits: JobLimits,
}

impl Sandbox {
    /// Creates `<base>.home` and `<base>.tmp` afresh, owned by `uid`, mode 0700, and the
    /// job's cgroup `name` when `cgroups` is given.
    pub fn create(
        base: &Path,
        uid: u32,
        cgroups: Option<&Cgroups>,
        name: &str,
    ) -> std::io::Result<Self> {
        let with = |suffix: &str| {
            let mut name = base.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        let sandbox = Self {
            uid,
            gid: uid,
            home: with(".home"),
            tmp: with(".tmp"),
            cgroup: cgroups.map(|c| c.create(name)).transpose()?,
            limits: cgroups.map(Cgroups::limits).unwrap_or_default(),
        };
        for dir in [&sandbox.home, &sandbox.tmp] {
            remove_tree(dir)?;
            std::fs::create_dir(dir)?;
            sandbox.adopt(dir)?;
        }
        Ok(sandbox)
    }

    /// Hands `dir` and everything under it to the job's uid (symlinks themselves, never
    /// what they point to), and makes `dir` itself 0700.
    pub fn adopt(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        chown_tree(dir, self.uid, self.gid)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    /// Removes the home and temporary directories, and the cgroup.
    pub fn remove(&self) -> std::io::Result<()> {
        remove_tree(&self.home)?;
        remove_tree(&self.tmp)?;
        self.cgroup.as_ref().map_or(Ok(()), JobCgroup::remove)
    }

    /// The variables a step of this job starts from: its own `HOME` and `TMPDIR`.
    pub fn env(&self) -> [(String, String); 2] {
        [
            ("HOME".into(), self.home.display().to_string()),
            ("TMPDIR".into(), self.tmp.display().to_string()),
        ]
    }

    /// The program and arguments that run `argv` under job-init as this sandbox's user.
    pub fn wrap(&self, argv: &[&str]) -> (PathBuf, Vec<String>) {
        let mut init_args = vec![
            "job-init".to_owned(),
            "--uid".to_owned(),
            self.uid.to_string(),
            "--gid".to_owned(),
            self.gid.to_string(),
        ];
        for file in self.cgroup.iter().flat_map(JobCgroup::procs_files) {
            init_args.push("--cgroup".to_owned());
            init_args.push(file.display().to_string());
        }
        init_args.push("--tmp".to_owned());
        init_args.push(self.tmp.display().to_string());
        init_args.push("--".to_owned());
        init_args.extend(argv.iter().map(|a| (*a).to_owned()));
        // This very binary, even after an upgrade replaced the file on disk.
        (PathBuf::from("/proc/self/exe"), init_args)
    }
}

/// The uids this host's processes run as (the owner of each `/proc/PID`).
pub fn process_uids() -> std::collections::BTreeSet<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.uid())
        .collect()
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// What `gantry-agent job-init` is told.
#[derive(Debug, Clone)]
pub struct JobInit {
    pub uid: u32,
    pub gid: u32,
    /// `cgroup.procs` files to join first.
    pub cgroup_procs: Vec<PathBuf>,
    /// The job's own temporary directory, mounted on `/tmp` in the namespace.
    pub tmp: Option<PathBuf>,
    /// The program and its arguments.
    pub argv: Vec<String>,
}

/// `gantry-agent job-init --uid U --gid G [--cgroup PROCS_FILE]... [--tmp DIR] --
/// PROGRAM ARGS...`: joins the cgroups, then runs PROGRAM as U:G in a new PID and mount
/// namespace (with DIR as its `/tmp`) and returns its exit code (128 + signal when
/// killed).
/// Called in a fresh, single-threaded process (the agent execs itself), so fork is safe.
/// Errors before PROGRAM runs are written to stderr (the step's log) and return 126.
#[allow(unsafe_code)]
pub fn job_init(init: &JobInit) -> i32 {
    let JobInit {
        uid,
        gid,
        cgroup_procs,
        tmp,
        argv,
    } = init;
    let (uid, gid) = (*uid, *gid);
    let fail = init_error;
    if let Err(e) = cgroups::join(cgroup_procs) {
        eprintln!("gantry-agent job-init: cannot join the job's cgroup: {e}");
        return 126;
    }
    let Some(argv) = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).ok())
        .collect::<Option<Vec<_>>>()
        .filter(|a| !a.is_empty())
    else {
        eprintln!("gantry-agent job-init: no program, or a NUL byte in its arguments");
        return 126;
    };
    let forwarded = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    // SAFETY: plain libc calls on a single-threaded process; every pointer passed lives
    // across the call, and the child only execs or exits.
    unsafe {
        // Signals are taken with sigwait: each needs a handler so that pid 1 of the new
        // namespace receives it at all (the kernel drops signals pid 1 leaves at default).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for sig in forwarded.iter().chain(&[libc::SIGCHLD]) {
            libc::signal(*sig, noop as *const () as libc::sighandler_t);
            libc::sigaddset(&raw mut set, *sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        // A job ends with its agent: an agent killed outright takes this process along,
        // and with it pid 1 and the whole namespace (the coordinator runs the job again).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() == 1 {
            eprintln!("gantry-agent job-init: the agent is gone");
            return 126;
        }
        if libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) != 0 {
            return fail("cannot create the job's PID and mount namespaces");
        }
        // This process stays outside the namespace (the agent's child, in its process
        // group); its child is pid 1 inside.
        let init = libc::fork();
        if init < 0 {
            return fail("cannot fork the job's init");
        }
        if init > 0 {
            return supervise(init, &set, &forwarded);
        }
        // pid 1: dies with the process above, so with the agent too.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // Mounts stay in this namespace, and /proc shows only the job's processes.
        let root = c"/";
        let proc_ = c"/proc";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            libc::_exit(fail("cannot make the job's mounts private"));
        }
        if libc::mount(
            c"proc".as_ptr(),
            proc_.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            libc::_exit(fail("cannot mount the job's /proc"));
        }
        if let Some(tmp) = tmp {
            if let Err(e) = private_tmp(tmp) {
                eprintln!("gantry-agent job-init: cannot give the job its own /tmp, /var/tmp and /dev/shm: {e}");
                libc::_exit(126);
            }
        }
        let step = libc::fork();
        if step < 0 {
            libc::_exit(fail("cannot fork the step"));
        }
        if step == 0 {
            libc::_exit(become_job(uid, gid, &argv, &set));
        }
        // Exiting ends the namespace: the kernel kills whatever is left in it.
        libc::_exit(reap_until(step, &set, &forwarded));
    }
}

extern "C" fn noop(_: libc::c_int) {}

/// In the job's mount namespace: `tmp` becomes `/tmp` and `/var/tmp` (one directory: the
/// job's), and `/dev/shm` a tmpfs of its own, so nothing a job leaves there reaches
/// another job, and it goes with the job's directory (`/dev/shm` with the step). When
/// `tmp`'s directory (the agent's `work/`) itself lies under `/tmp` or `/var/tmp` (an
/// agent whose data directory is there), that directory is bound back at its path inside
/// the new one, so the workspace, `HOME` and `TMPDIR` keep their paths.
#[allow(unsafe_code)]
fn private_tmp(tmp: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other(format!("{} has a NUL byte", p.display())))
    };
    let mount = |from: &Path,
                 to: &Path,
                 fstype: Option<&std::ffi::CStr>,
                 flags,
                 data: Option<&std::ffi::CStr>| {
        let (from, to) = (cstr(from)?, cstr(to)?);
        // SAFETY: every string lives across the call.
        let done = unsafe {
            libc::mount(
                from.as_ptr(),
                to.as_ptr(),
                fstype.map_or(std::ptr::null(), std::ffi::CStr::as_ptr),
                flags,
                data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(with_target(&std::io::Error::last_os_error(), to.to_bytes()))
        }
    };
    let bind = |from: &std::fs::File, to: &Path| {
        let from = PathBuf::from(format!("/proc/self/fd/{}", from.as_raw_fd()));
        mount(&from, to, None, libc::MS_BIND | libc::MS_REC, None)
    };
    let work = tmp
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent", tmp.display())))?;
    // Held open across the mounts that may hide their paths.
    let work_dir = std::fs::File::open(work)?;
    let tmp_dir = std::fs::File::open(tmp)?;
    for target in ["/tmp", "/var/tmp"].map(Path::new) {
        // A host without /var/tmp keeps it that way.
        if target != Path::new("/tmp") && !target.is_dir() {
            continue;
        }
        bind(&tmp_dir, target)?;
        if let Ok(rel) = work.strip_prefix(target) {
            let at = target.join(rel);
            std::fs::create_dir_all(&at)?;
            bind(&work_dir, &at)?;
        }
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        mount(
            Path::new("tmpfs"),
            shm,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"mode=1777"),
        )?;
    }
    Ok(())
}

/// `error` with the mount point it happened at.
fn with_target(error: &std::io::Error, target: &[u8]) -> std::io::Error {
    std::io::Error::new(
        error.kind(),
        format!("{}: {error}", String::from_utf8_lossy(target)),
    )
}

/// Says on stderr (the step's log) what failed with the last OS error; the exit code
/// for "could not run the program".
fn init_error(what: &str) -> i32 {
    eprintln!(
        "gantry-agent job-init: {what}: {}",
        std::io::Error::last_os_error()
    );
    126
}

/// The step's process: drops to the job's user and execs the program; returns only on
/// failure.
#[allow(unsafe_code)]
unsafe fn become_job(uid: u32, gid: u32, argv: &[CString], set: &libc::sigset_t) -> i32 {
    let fail = init_error;
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
        libc::signal(sig, libc::SIG_DFL);
    }
    libc::sigprocmask(libc::SIG_UNBLOCK, set, std::ptr::null_mut());
    if libc::setgroups(0, std::ptr::null()) != 0 {
        return fail("cannot drop supplementary groups");
    }
    if libc::setgid(gid) != 0 {
        return fail(&format!("cannot switch to gid {gid}"));
    }
    if libc::setuid(uid) != 0 {
        return fail(&format!("cannot switch to uid {uid}"));
    }
    // An agent given capabilities as ambient ones (the packaged unit) keeps them across
    // setuid (from a uid other than 0 the kernel clears none) and would pass them on
    // across exec, and its inheritable ones would meet a program's file capabilities:
    // the job gets none, in every set.
    libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    );
    if !drop_all_capabilities() {
        return fail("cannot drop the agent's capabilities");
    }
    if libc::getuid() != uid || libc::geteuid() != uid {
        eprintln!("gantry-agent job-init: still not uid {uid} after setuid");
        return 126;
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    libc::execv(ptrs[0], ptrs.as_ptr());
    fail(&format!("cannot run {}", argv[0].to_string_lossy()))
}

/// Drops every capability of the calling thread (and so of the threads and children it
/// makes later): ambient, effective, permitted, inheritable. For an agent that runs
/// jobs as its own user; best effort (it had none to drop, most often).
#[allow(unsafe_code)]
pub fn drop_capabilities() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    drop_all_capabilities();
}

/// Empties this process's effective, permitted and inheritable capability sets
/// (`capset(2)`; libc has no wrapper).
#[allow(unsafe_code)]
fn drop_all_capabilities() -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version 3 takes two data structs; both live across the call.
    unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) == 0 }
}

/// Outside the namespace: passes signals on to pid 1 and returns its exit code.
#[allow(unsafe_code)]
unsafe fn supervise(init: libc::pid_t, set: &libc::sigset_t, forwarded: &[libc::c_int]) -> i32 {
    loop {
        let mut sig = 0;
        libc::sigwait(set, &raw mut sig);
        if forwarded.contains(&sig) {
            libc::kill(init, sig);
            continue;
        }
        let mut status = 0;
        if libc::waitpid(init, &raw mut status, libc::WNOHANG) == init {
            return status_code(status);
        }
    }
}

/// pid 1: reaps every orphan, passes signals to every process of the namespace, and
/// returns the step's exit code once the step's own process has exited.
#[allow(unsafe_code)]
unsafe fn reap_until(step: libc::pid_t, set: &libc::sigset_t, forwarded: &[libc::c_int]) -> i32 {
    loop {
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &raw mut status, libc::WNOHANG);
            if pid == step {
                return status_code(status);
            }
            if pid <= 0 {
                break;
            }
        }
        let mut sig = 0;
        libc::sigwait(set, &raw mut sig);
        if forwarded.contains(&sig) {
            // -1 from pid 1 is every process of the namespace but itself.
            libc::kill(-1, sig);
        }
    }
}

fn status_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_and_bad_ones_say_the_expected_form() {
        let r: UidRange = "90000-90999".parse().expect("range");
        assert_eq!((r.first, r.last, r.len()), (90000, 90999, 1000));
        assert_eq!(r.free(|u| u < 90002), Some(90002));
        for bad in ["", "90000", "5-10", "2000-1000", "a-b", "1000-4294967295"] {
            let err = bad.parse::<UidRange>().expect_err(bad).to_string();
            assert!(err.contains("expected FIRST-LAST"), "{err}");
        }
    }

    fn missing(uid: &str, cap: &'static str) -> PrivilegeError {
        PrivilegeError::Missing(MissingCaps {
            uid: uid.to_owned(),
            missing: vec![cap],
        })
    }

    #[test]
    fn a_required_isolation_without_privilege_refuses_and_says_why() {
        let uids: UidRange = "90000-90001".parse().expect("range");
        assert_eq!(
            decide(
                IsolationMode::Off,
                uids,
                8,
                Err(missing("1000", "x")),
                Ok(None)
            ),
            Isolation::Off
        );
        assert_eq!(
            decide(
                IsolationMode::Required,
                uids,
                2,
                Ok(()),
                Err(CgroupError::NoV2Path)
            ),
            Isolation::Users {
                uids,
                cgroups: None,
                limits_off: Some(CgroupError::NoV2Path.to_string())
            }
        );
        let Isolation::Unavailable(why) =
            decide(IsolationMode::Required, uids, 3, Ok(()), Ok(None))
        else {
            panic!("too few uids for the slots");
        };
        assert!(why.contains("fewer than the 3 slots"), "{why}");
        let Isolation::Unavailable(why) = decide(
            IsolationMode::Required,
            uids,
            1,
            Err(missing("1000", "CAP_SETUID")),
            Ok(None),
        ) else {
            panic!("no privilege");
        };
        assert!(why.contains("uid 1000 without CAP_SETUID"), "{why}");
        assert!(why.contains("--isolation off"), "{why}");
    }

    #[test]
    fn capabilities_are_read_from_the_status_file() {
        let root = "Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n";
        assert_eq!(missing_caps(root), Ok(()));
        let user = "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t00000000000000c0\n";
        let err = missing_caps(user).expect_err("unprivileged").to_string();
        assert!(
            err.starts_with("the agent runs as uid 1000 without CAP_CHOWN"),
            "{err}"
        );
        assert!(!err.contains("CAP_SETUID"), "it has CAP_SETUID: {err}");
    }
}
