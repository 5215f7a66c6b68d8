//! Hosts as Docker containers on private networks, for the multi-host tests.
//!
//! Owns the test image (the shipped `FROM scratch` image of `packaging/container/` plus
//! the host's static busybox, so hooks, health checks and jobs have a shell; no registry
//! is used), and [`Scope`]: every container, network, volume and image a test makes,
//! removed when it drops, also on panic. Resources carry the label
//! `gantry.test.owner=<pid>`; a new scope first removes those of test processes that no
//! longer exist (one killed by nextest's timeout cannot run its drop).
//!
//! It must not know what the tests deploy: it only runs Docker.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{bin, requires, Run};

/// The host's static busybox (Debian busybox-static, installed by `.ci/run`).
pub const BUSYBOX: &str = "/bin/busybox";
/// Any single docker command, or command in a container.
pub const COMMAND_SECS: u64 = 120;
/// The label every resource a test makes carries: the pid of the test process.
const OWNER_LABEL: &str = "gantry.test.owner";

/// Whether Docker tests can run here: a running engine and busybox-static, else the
/// test skips saying what to install, or fails under `GANTRY_REQUIRE_ALL_TESTS=1`
/// (see [`crate::requires`]).
pub fn ready(test: &str) -> bool {
    requires::require_docker(test, Some(BUSYBOX))
}

/// `prog args...` killed after `secs` (coreutils `timeout`), so no command hangs a test.
fn bounded(secs: u64, prog: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &secs.to_string(), prog])
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Run {
    Run::from_output(
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}")),
    )
}

/// `docker args...`, whatever its exit code.
pub fn docker(args: &[&str]) -> Run {
    run(bounded(COMMAND_SECS, "docker").args(args))
}

/// `docker args...` that must succeed; its trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let r = docker(args);
    assert_eq!(
        r.code,
        0,
        "docker {} failed\nstdout: {}\nstderr: {}",
        args.join(" "),
        r.stdout,
        r.stderr
    );
    r.stdout.trim().to_owned()
}

/// `sh -c script` in a running container.
pub fn sh(container: &str, script: &str) -> Run {
    docker(&["exec", container, "sh", "-c", script])
}

/// Like [`sh`], and the script must succeed; its trimmed stdout.
pub fn sh_ok(container: &str, script: &str) -> String {
    let r = sh(container, script);
    assert_eq!(
        r.code, 0,
        "in {container}: {script}\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r.stdout.trim().to_owned()
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Containers, networks, volumes and images one test made; removed on drop.
#[derive(Debug)]
pub struct Scope {
    prefix: String,
    owner: String,
    containers: Vec<String>,
    networks: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Scope {
    /// A new scope named `gantry-test-<what>-<pid>-<nanos>`; first removes what test
    /// processes that are gone left behind.
    pub fn new(what: &str) -> Self {
        sweep_orphans();
        Self {
            prefix: format!("gantry-test-{what}-{}", unique()),
            owner: format!("{OWNER_LABEL}={}", std::process::id()),
            containers: Vec::new(),
            networks: Vec::new(),
            volumes: Vec::new(),
            images: Vec::new(),
        }
    }

    /// The full name of this scope's `what`.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// A bridge network with no route out (`--internal`); containers on it find each
    /// other by name.
    pub fn internal_network(&mut self, what: &str) -> String {
        let name = self.name(what);
        docker_ok(&[
            "network",
            "create",
            "--internal",
            "--label",
            &self.owner,
            &name,
        ]);
        self.networks.push(name.clone());
        name
    }

    pub fn volume(&mut self, what: &str) -> String {
        let name = self.name(what);
        docker_ok(&["volume", "create", "--label", &self.owner, &name]);
        self.volumes.push(name.clone());
        name
    }

    /// `docker run -d --name <prefix>-<what> args...`; the container's name.
    pub fn container(&mut self, what: &str, args: &[&str]) -> String {
        let name = self.name(what);
        let mut full = vec!["run", "-d", "--name", &name, "--label", &self.owner];
        full.extend_from_slice(args);
        // Registered before it starts, so a failed start is cleaned up too.
        self.containers.push(name.clone());
        docker_ok(&full);
        name
    }

    /// Builds the test image: `packaging/container/build.sh`'s image with busybox (and a
    /// link for each of its applets) in `/bin`, `PATH=/usr/bin:/bin`, and an agent data
    /// directory `/var/lib/gantry-agent` owned by the image's user (uid 10001). Returns
    /// its tag.
    pub fn test_image(&mut self) -> String {
        let base = format!("gantry-test-scratch:{}", unique());
        self.images.push(base.clone());
        let bins = bin("gantry");
        let bin_dir = bins.parent().expect("bin dir");
        let built = run(bounded(COMMAND_SECS * 2, "sh")
            .arg(workspace_root().join("packaging/container/build.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(["--tag", &base]));
        assert_eq!(
            built.code, 0,
            "packaging/container/build.sh: {}{}",
            built.stdout, built.stderr
        );

        let ctx = tempfile::Builder::new()
            .prefix("gantry-test-image-")
            .tempdir()
            .expect("tempdir");
        let bin = ctx.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::create_dir_all(ctx.path().join("agent")).expect("agent dir");
        std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
        let applets = run(Command::new(BUSYBOX).arg("--list"));
        assert_eq!(applets.code, 0, "busybox --list: {}", applets.stderr);
        for applet in applets.stdout.lines().map(str::trim) {
            if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("link applet");
            }
        }
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!(
                "FROM {base}\n\
                 COPY bin/ /bin/\n\
                 COPY --chown=10001:10001 agent/ /var/lib/gantry-agent/\n\
                 ENV PATH=/usr/bin:/bin\n"
            ),
        )
        .expect("Dockerfile");
        let tag = format!("gantry-test-fleet:{}", unique());
        self.images.push(tag.clone());
        let ctx_path = ctx.path().to_str().expect("utf8");
        docker_ok(&[
            "build",
            "--quiet",
            "--label",
            &self.owner,
            "--tag",
            &tag,
            ctx_path,
        ]);
        tag
    }

    /// The last lines of every container's output, for a failing test's message.
    fn dump_logs(&self) {
        for c in &self.containers {
            let r = docker(&["logs", "--tail", "60", c]);
            eprintln!(
                "---- docker logs {c} (last 60 lines)\n{}{}",
                r.stdout, r.stderr
            );
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for c in &self.containers {
            quiet(&["rm", "--force", "--volumes", c]);
        }
        for n in &self.networks {
            quiet(&["network", "rm", n]);
        }
        for v in &self.volumes {
            quiet(&["volume", "rm", "--force", v]);
        }
        for i in self.images.iter().rev() {
            quiet(&["image", "rm", "--force", i]);
        }
    }
}

fn quiet(args: &[&str]) {
    let _ = bounded(60, "docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes containers, networks, volumes and images labelled with the pid of a test
/// process that no longer exists (killed before its scope could drop).
fn sweep_orphans() {
    let listing = |kind: &[&str], format: &str| -> Vec<(String, String)> {
        let mut args = kind.to_vec();
        let filter = format!("label={OWNER_LABEL}");
        args.extend_from_slice(&["--filter", &filter, "--format", format]);
        docker(&args)
            .stdout
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, owner)| (id.to_owned(), owner.to_owned()))
            .collect()
    };
    let owner = format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    let gone = |pid: &str| !Path::new("/proc").join(pid).exists();
    let kinds: [(&[&str], &[&str]); 3] = [
        (&["ps", "--all"], &["rm", "--force", "--volumes"]),
        (&["network", "ls"], &["network", "rm"]),
        (&["volume", "ls"], &["volume", "rm", "--force"]),
    ];
    for (list, remove) in kinds {
        let format = if list[0] == "volume" {
            format!("{{{{.Name}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}")
        } else {
            owner.clone()
        };
        for (id, pid) in listing(list, &format) {
            if gone(&pid) {
                let mut args = remove.to_vec();
                args.push(&id);
                quiet(&args);
            }
        }
    }
    // Images are named `<repository>:<pid>-<nanos>` (see `unique`).
    for repository in ["gantry-test-fleet", "gantry-test-scratch"] {
        let listed = docker(&["image", "ls", repository, "--format", "{{.Tag}}"]);
        for tag in listed.stdout.lines() {
            let pid = tag.split('-').next().unwrap_or_default();
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && gone(pid) {
                quiet(&["image", "rm", "--force", &format!("{repository}:{tag}")]);
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A tiny image imported from the host's static busybox (no registry), removed when
/// dropped (also when the test panics).
pub struct BusyboxImage {
    pub tag: String,
}

impl Drop for BusyboxImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "--force", &self.tag])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Imports `<name>:<unique>`: [`BUSYBOX`] at `/bin/busybox` with `tools` linked to it in
/// `/bin`, an empty `/tmp`, and `files` (path relative to the root, contents).
pub fn busybox_image(name: &str, tools: &[&str], files: &[(&str, &str)]) -> BusyboxImage {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs/bin");
    std::fs::create_dir_all(root.join("tmp")).expect("rootfs/tmp");
    std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
    for tool in tools {
        std::os::unix::fs::symlink("busybox", bin.join(tool)).expect("link");
    }
    for (path, contents) in files {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("file's directory");
        }
        std::fs::write(path, contents).expect("file");
    }
    let tar = dir.path().join("rootfs.tar");
    let tarred = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(tarred.success(), "tar of the rootfs failed");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let image = BusyboxImage {
        tag: format!("{name}:{}-{nanos}", std::process::id()),
    };
    docker_ok(&["import", tar.to_str().expect("utf8"), &image.tag]);
    image
}
