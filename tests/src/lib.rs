//! Test harness for Gantry's end-to-end tests and benchmarks: starts the real `gantry`
//! and `gantry-agent` binaries on loopback, each in its own temporary directory, and
//! stops every process it started when dropped (also when a test panics).
//!
//! Binaries are found next to the test executable's `deps/` folder (where cargo puts
//! them when the workspace is tested), or in `GANTRY_BIN_DIR`.

pub mod admin;
pub mod browser;
pub mod containers;
pub mod flood;
pub mod forge;
pub mod http;
pub mod layering;
pub mod load;
pub mod peers;
pub mod requires;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Deadline for anything a test waits on, unless it says otherwise.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Runs the `git` program in `dir` as a fixed test user, without the host's global
/// configuration; its trimmed output (panics with git's error if it fails).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Tester",
            "-c",
            "user.email=t@example.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Path of one of our binaries.
/// `--isolation` for the agents tests start (unless a test passes its own):
/// `GANTRY_TEST_ISOLATION` (`required` runs every job isolated, which needs root), `off`
/// when unset.
pub fn isolation_setting() -> String {
    std::env::var("GANTRY_TEST_ISOLATION").unwrap_or_else(|_| "off".to_owned())
}

pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("GANTRY_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo nextest run --workspace` (or `cargo build --bins` first), or set GANTRY_BIN_DIR",
        path.display()
    );
    path
}

/// Polls `cond` every 20 ms until it returns `Some`, panicking with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free UDP port on 127.0.0.1 (bound, read, released).
pub fn free_udp_port() -> u16 {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    sock.local_addr().expect("addr").port()
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Sends SIGTERM and waits up to 10 s for the process to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        self.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
            let _ = self.child.kill();
            self.child.wait().expect("wait")
        })
    }

    /// SIGSTOP: the process stays, unresponsive, until killed (a hung or frozen host).
    pub fn freeze(&mut self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    /// SIGKILL, like a crash or power loss.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself within `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to every process in the process group `pgid`.
#[allow(unsafe_code)]
pub(crate) fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) touches no memory of ours; a gone group fails with ESRCH.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) touches no memory of ours; a stale pid fails with ESRCH.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Output of a CLI run, with helpers for assertions.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: lossy(out.stdout),
            stderr: lossy(out.stderr),
        }
    }

    /// Panics with both streams unless the exit code is `code`. Returns the run for
    /// further checks, which callers that only care about the code may drop.
    #[allow(clippy::return_self_not_must_use)]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "expected exit code {code}, got {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A coordinator with its own data directory, admin context and port.
#[derive(Debug)]
pub struct Coordinator {
    pub dir: tempfile::TempDir,
    pub address: String,
    /// `ip:port` of the HTTP side, when started with it.
    pub http_address: Option<String>,
    pub server: Option<Proc>,
    /// Arguments `gantry server` is started with besides `--data-dir`.
    pub server_args: Vec<String>,
}

/// Options for [`Coordinator::start_with`].
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    pub agent_cert_ttl: String,
    pub heartbeat_interval: String,
    /// Serve the HTTP side (webhook, health) on a free loopback port.
    pub http: bool,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            agent_cert_ttl: "1d".into(),
            heartbeat_interval: "1s".into(),
            http: false,
        }
    }
}

impl Coordinator {
    pub fn start() -> Self {
        Self::start_with(&CoordinatorOptions::default())
    }

    pub fn start_with(opts: &CoordinatorOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gantry-e2e-")
            .tempdir()
            .expect("tempdir");
        let address = format!("127.0.0.1:{}", free_udp_port());
        let http_address = opts.http.then(|| {
            let sock = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
            sock.local_addr().expect("addr").to_string()
        });
        let mut c = Self {
            dir,
            address,
            http_address,
            server: None,
            server_args: Vec::new(),
        };
        let data_dir = c.data_dir().to_str().expect("utf8").to_owned();
        let address = c.address.clone();
        let mut args = vec![
            "init",
            "--data-dir",
            &data_dir,
            "--listen",
            &address,
            "--advertise",
            &address,
            "--agent-cert-ttl",
            &opts.agent_cert_ttl,
            "--heartbeat-interval",
            &opts.heartbeat_interval,
        ];
        let http = c.http_address.clone().unwrap_or_default();
        if opts.http {
            args.extend_from_slice(&["--http-listen", &http]);
        }
        c.gantry(&args).expect_code(0);
        c.start_server();
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    pub fn context(&self) -> PathBuf {
        self.dir.path().join("admin").join("context.toml")
    }

    /// Starts `gantry server` and waits until it answers `gantry status`.
    pub fn start_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log");
        let child = Command::new(bin("gantry"))
            .args(["server", "--data-dir"])
            .arg(self.data_dir())
            .args(&self.server_args)
            // GANTRY_TEST_SERVER_LOG lets a benchmark ask for more, e.g. `debug` for the
            // QUIC path figures logged at the end of each artifact stream.
            .env(
                "GANTRY_LOG",
                std::env::var("GANTRY_TEST_SERVER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gantry server");
        self.server = Some(Proc {
            child,
            name: "gantry server".into(),
        });
        wait_for("the coordinator to answer status", DEADLINE, || {
            (self.gantry(&["status"]).code == 0).then_some(())
        });
    }

    /// Stops the server, appends `toml` to its `coordinator.toml`, and starts it again.
    pub fn restart_with_config(&mut self, toml: &str) {
        self.server().terminate();
        let path = self.data_dir().join("coordinator.toml");
        let mut text = std::fs::read_to_string(&path).expect("coordinator.toml");
        text.push('\n');
        text.push_str(toml);
        std::fs::write(&path, text).expect("write coordinator.toml");
        self.start_server();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn server(&mut self) -> &mut Proc {
        self.server.as_mut().expect("server running")
    }

    /// Runs the admin CLI with this coordinator's context.
    pub fn gantry(&self, args: &[&str]) -> Run {
        Run::from_output(
            Command::new(bin("gantry"))
                .args(args)
                .env("GANTRY_CONFIG", self.context())
                .env("GANTRY_LOG", "warn")
                .stdin(Stdio::null())
                .output()
                .expect("run gantry"),
        )
    }

    /// Creates a join token and returns its string.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.gantry(&args).expect_code(0).stdout.trim().to_owned()
    }

    /// `gantry agents list --json`.
    pub fn agents(&self) -> Vec<Value> {
        match self
            .gantry(&["agents", "list", "--json"])
            .expect_code(0)
            .json()
        {
            Value::Array(a) => a,
            other => panic!("agents list is not an array: {other}"),
        }
    }

    pub fn agent(&self, id: &str) -> Value {
        self.gantry(&["agents", "show", id, "--json"])
            .expect_code(0)
            .json()
    }

    /// Waits until `n` agents are connected, and returns the listing.
    pub fn wait_connected(&self, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} agents connected"), DEADLINE, || {
            let agents = self.agents();
            (agents.iter().filter(|a| a["state"] == "Connected").count() == n).then_some(agents)
        })
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("tls").join("ca.pem")).expect("ca.pem")
    }

    pub fn admin_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin").join("admin.pem")).expect("admin.pem")
    }
}

/// An agent with its own data directory.
#[derive(Debug)]
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub id: String,
    pub proc: Option<Proc>,
}

impl Agent {
    /// Runs `gantry-agent enroll` with `token` and extra args; returns the run.
    pub fn try_enroll(dir: &Path, token: &str, extra: &[&str]) -> Run {
        Run::from_output(
            Command::new(bin("gantry-agent"))
                .args(["enroll", "--token", token, "--data-dir"])
                .arg(dir)
                .args(extra)
                .env("GANTRY_LOG", "warn")
                .stdin(Stdio::null())
                .output()
                .expect("run gantry-agent enroll"),
        )
    }

    /// Enrolls a new agent with `token` (must succeed).
    pub fn enroll(token: &str, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gantry-agent-")
            .tempdir()
            .expect("tempdir");
        let run = Self::try_enroll(dir.path(), token, extra).expect_code(0);
        let id = run
            .stdout
            .split_whitespace()
            .find(|w| w.starts_with("ag-"))
            .unwrap_or_else(|| panic!("no agent id in enroll output: {}", run.stdout))
            .to_owned();
        Self {
            dir,
            id,
            proc: None,
        }
    }

    /// Starts `gantry-agent run` with a short reconnect backoff cap.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// [`Self::start`] with extra `run` arguments (e.g. `--max-transfer-rate 4MiB`).
    ///
    /// Job isolation is off unless `extra` says `--isolation required` or
    /// `GANTRY_TEST_ISOLATION=required` is set ([`isolation_setting`]): most tests hand
    /// files to their jobs through the test's own (root-only) temporary directories, and
    /// tests/tests/isolation.rs tests isolation itself.
    pub fn start_with(&mut self, extra: &[&str]) {
        self.spawn(extra, None);
    }

    /// [`Self::start_with`] as the user `uid` (gid of the same number), its data
    /// directory handed to that user first: an agent without root's privileges.
    pub fn start_as(&mut self, uid: u32, extra: &[&str]) {
        chown_tree(self.dir.path(), uid);
        self.spawn(extra, Some(uid));
    }

    /// [`Self::start_as`] with the capabilities `caps` (names as in capabilities(7),
    /// e.g. `CAP_SETUID`) as ambient ones, everything else out of the bounding set and
    /// no new privileges, as systemd's `AmbientCapabilities=`, `CapabilityBoundingSet=`
    /// and `NoNewPrivileges=yes` start it (through util-linux `setpriv`). The isolation
    /// setting is left to the agent's default.
    pub fn start_as_with_capabilities(&mut self, uid: u32, caps: &[&str], extra: &[&str]) {
        chown_tree(self.dir.path(), uid);
        let list: Vec<String> = caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let list = list.join(",");
        let id = uid.to_string();
        let mut wrapper: Vec<String> = [
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps",
            &list,
            "--ambient-caps",
            &list,
            "--bounding-set",
            &format!("-all,{list}"),
            "--",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        wrapper.insert(0, "setpriv".to_owned());
        self.spawn_via(extra, Some(uid), Some(&wrapper));
    }

    fn spawn(&mut self, extra: &[&str], uid: Option<u32>) {
        self.spawn_via(extra, uid, None);
    }

    /// Starts the agent as `uid` (std sets it), or through `wrapper` (a program and its
    /// arguments, which runs the agent as `uid` itself).
    fn spawn_via(&mut self, extra: &[&str], uid: Option<u32>, wrapper: Option<&[String]>) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("log");
        let program = match uid {
            None => bin("gantry-agent"),
            Some(uid) => {
                // The build's target directory may be where another user cannot reach
                // (under /root in CI): that user runs a copy from its own directory.
                let copy = self.dir.path().join("gantry-agent.bin");
                std::fs::copy(bin("gantry-agent"), &copy).expect("copy gantry-agent");
                chown_tree(&copy, uid);
                copy
            }
        };
        let mut command = match wrapper {
            Some([wrapper, args @ ..]) => {
                let mut command = Command::new(wrapper);
                command.args(args).arg(program);
                command
            }
            _ => Command::new(program),
        };
        command
            .args(["run", "--max-backoff", "1s", "--data-dir"])
            .arg(self.dir.path())
            .args(extra)
            .env("GANTRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if wrapper.is_none() {
            command.env("GANTRY_AGENT_ISOLATION", isolation_setting());
        }
        if let (Some(uid), None) = (uid, wrapper) {
            // std drops the supplementary groups too when it sets the uid.
            command.uid(uid).gid(uid);
        }
        let child = command.spawn().expect("spawn gantry-agent run");
        self.proc = Some(Proc {
            child,
            name: format!("agent {}", self.id),
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("agent running")
    }
}

/// Hands `path` and everything under it to `uid` (gid of the same number).
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            chown_tree(&entry.expect("entry").path(), uid);
        }
    }
}

/// Raw protocol clients, for playing misbehaving or foreign peers.
pub mod raw {
    use std::time::Duration;

    use gantry_transport::{Connection, Dialer, FrameReader, FrameWriter, TransportError};

    /// A connected raw client.
    #[derive(Debug)]
    pub struct RawClient {
        pub dialer: Dialer,
        pub conn: Connection,
        pub writer: FrameWriter,
        pub reader: FrameReader,
    }

    /// Connects with `tls` and opens the control stream.
    pub async fn connect(
        address: &str,
        tls: rustls::ClientConfig,
    ) -> Result<RawClient, TransportError> {
        let dialer = Dialer::new(tls, false)?;
        let conn = dialer.connect(address, Duration::from_secs(10)).await?;
        let (writer, reader) = conn.open_control().await?;
        Ok(RawClient {
            dialer,
            conn,
            writer,
            reader,
        })
    }
}

impl Coordinator {
    /// Writes `yaml` to a file and starts a run of it; returns the run number.
    pub fn run_pipeline(&self, yaml: &str, extra: &[&str]) -> u64 {
        let file = self.dir.path().join(format!("pipeline-{}.yml", unique()));
        std::fs::write(&file, yaml).expect("write pipeline");
        let mut args = vec!["run", file.to_str().expect("utf8"), "--json"];
        // The pipeline file sits in the coordinator's own temporary directory, which is no
        // source tree: send none unless the test names one.
        if !extra.contains(&"--source") {
            args.push("--no-source");
        }
        args.extend_from_slice(extra);
        let run = self.gantry(&args).expect_code(0).json();
        run["run"]
            .as_u64()
            .unwrap_or_else(|| panic!("no run number in {run}"))
    }

    /// `gantry pipelines list --json`: the newest runs.
    pub fn runs(&self) -> Vec<Value> {
        self.gantry(&["pipelines", "list", "--json"])
            .expect_code(0)
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `gantry pipelines show RUN --json`.
    pub fn run_view(&self, run: u64) -> Value {
        self.gantry(&["pipelines", "show", &run.to_string(), "--json"])
            .expect_code(0)
            .json()
    }

    /// Waits until the run has ended; returns its view.
    pub fn wait_run(&self, run: u64, deadline: Duration) -> Value {
        wait_for(&format!("run {run} to end"), deadline, || {
            let view = self.run_view(run);
            (!view["finished_at"].is_null()).then_some(view)
        })
    }

    /// Waits until `job` (e.g. "1.2") is in `state`; returns its view.
    pub fn wait_job_state(&self, job: &str, state: &str, deadline: Duration) -> Value {
        wait_for(&format!("job {job} to be {state}"), deadline, || {
            let view = self
                .gantry(&["jobs", "show", job, "--json"])
                .expect_code(0)
                .json();
            (view["state"] == state).then_some(view)
        })
    }

    /// The stored log of a job.
    pub fn logs(&self, job: &str) -> String {
        self.gantry(&["logs", job]).expect_code(0).stdout
    }

    /// Sets secret `name` to `value` through `gantry secrets set` (value on stdin).
    pub fn set_secret(&self, name: &str, value: &str) {
        use std::io::Write;
        let mut child = Command::new(bin("gantry"))
            .args(["secrets", "set", name])
            .env("GANTRY_CONFIG", self.context())
            .env("GANTRY_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn gantry secrets set");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{value}\n").as_bytes())
            .expect("write secret");
        assert!(child.wait().expect("secrets set").success());
    }

    /// Starts `n` enrolled agents with extra `run` arguments.
    pub fn agents_running(&self, n: usize, labels: &[&str]) -> Vec<Agent> {
        let token = self.token(&["--uses", &n.to_string()]);
        let mut agents: Vec<Agent> = (0..n).map(|_| Agent::enroll(&token, labels)).collect();
        for a in &mut agents {
            a.start();
        }
        self.wait_connected(n);
        agents
    }
}

/// A directory every job may read and write (mode 1777), for handing markers between a
/// test and its jobs whatever uid they run as: not the test's own temporary directories
/// (root-only), nor under `/tmp` or `/var/tmp`, which each isolated job has of its own.
pub fn exchange_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("gantry-exchange-")
        .tempdir_in("/run")
        .expect("a directory under /run");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    dir
}

/// The value at fraction `p` (0.5: the median) of `sorted`, by nearest rank; NaN when
/// there are none. The benchmarks' percentiles.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let index = (((sorted.len() - 1) as f64) * p).round() as usize;
    sorted[index]
}

/// The processes of this host (not zombies) whose command line is exactly `cmdline`
/// (arguments joined by spaces), as `PID: CMDLINE` lines; whatever PID namespace a job
/// started them in.
pub fn processes_running(cmdline: &str) -> Vec<String> {
    processes_where(|cmd| cmd.trim_end() == cmdline)
}

/// The processes of this host (not zombies) whose command line (arguments joined by
/// spaces) satisfies `wanted`, as `PID: CMDLINE` lines.
pub fn processes_where(wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'));
            (wanted(&cmd) && !zombie).then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Every file under `dir`, at any depth (for tests that look for a value on disk).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The job of a run view with this name.
pub fn job_named<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == name))
        .unwrap_or_else(|| panic!("no job {name} in {run}"))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
