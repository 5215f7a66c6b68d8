//! Packaging end to end: offline bundles, the HTTPS side that serves new hosts, the
//! systemd units, the .deb packages on Debian and the `FROM scratch` image.
//!
//! The first tests need only this host (and curl, openssl optional). The Docker tests
//! need a running engine and no registry: Debian comes from `debootstrap` of a minbase
//! bookworm (from the host's Debian mirror) imported as `gantry-test-debian:bookworm-1`
//! and kept as a cache (remove the image to rebuild it); the .debs come from cargo-deb
//! over the binaries already built for the tests (`--profile dev --no-build`, so no
//! release build); the scratch image from `packaging/container/build.sh`. Every
//! container, network and volume a test makes is removed when it ends, also on panic.
//! Without Docker, debootstrap (while the image is not built) or cargo-deb they skip,
//! saying what to install (they fail instead under `GANTRY_REQUIRE_ALL_TESTS=1`, as in
//! CI; see `gantry_tests::requires`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_tests::{bin, requires, wait_for, Coordinator, CoordinatorOptions, Run, DEADLINE};
use serde_json::Value;

/// The cached Debian image. Bump the suffix when `debian_image` changes what it holds.
const DEBIAN_IMAGE: &str = "gantry-test-debian:bookworm-1";
/// Building the Debian image: debootstrap downloads ~60 MB, ~40 s on a good mirror.
const IMAGE_BUILD_SECS: u64 = 900;
/// Any single docker or in-container command.
const COMMAND_SECS: u64 = 180;

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// `prog args...` killed after `secs` (coreutils `timeout`), so no test waits forever.
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

fn docker(args: &[&str]) -> Run {
    run(bounded(COMMAND_SECS, "docker").args(args))
}

/// `docker args...` that must succeed; returns its trimmed stdout.
fn docker_ok(args: &[&str]) -> String {
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

/// `sh -c script` inside a container.
fn exec(container: &str, script: &str) -> Run {
    docker(&["exec", container, "sh", "-c", script])
}

/// Like [`exec`], and the script must succeed.
fn exec_ok(container: &str, script: &str) -> String {
    let r = exec(container, script);
    assert_eq!(
        r.code, 0,
        "in {container}: {script}\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r.stdout.trim().to_owned()
}

/// How the packaging tests' cargo-deb is installed (`.ci/run` pins the same version).
const INSTALL_CARGO_DEB: &str = "cargo install cargo-deb --locked --version '~3.8'";

/// Whether a Docker packaging test can run: a running engine, and the Debian image or
/// debootstrap to build it. Else the test skips saying what to install, or fails under
/// `GANTRY_REQUIRE_ALL_TESTS=1`; `GANTRY_SKIP_DOCKER_TESTS=1` skips it either way.
fn docker_ready(test: &str) -> bool {
    if !requires::require_docker(test, None) {
        return false;
    }
    if docker(&["image", "inspect", DEBIAN_IMAGE]).code == 0 {
        return true;
    }
    for (program, install) in [
        ("debootstrap", "apt-get install debootstrap"),
        ("flock", "apt-get install util-linux"),
    ] {
        if !requires::on_path(program) {
            return requires::missing(
                test,
                &format!("{program} to build {DEBIAN_IMAGE}"),
                install,
                Some(requires::SKIP_DOCKER),
            );
        }
    }
    true
}

/// Containers, networks, volumes and images a test made, removed on drop.
struct Scope {
    prefix: String,
    containers: Vec<String>,
    networks: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Scope {
    fn new() -> Self {
        Self {
            prefix: format!("gantry-test-pkg-{}", unique()),
            containers: Vec::new(),
            networks: Vec::new(),
            volumes: Vec::new(),
            images: Vec::new(),
        }
    }

    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// A bridge network; `--internal` ones have no route to the outside at all.
    fn network(&mut self, internal: bool) -> String {
        let name = self.name("net");
        let mut args = vec!["network", "create"];
        if internal {
            args.push("--internal");
        }
        args.push(&name);
        docker_ok(&args);
        self.networks.push(name.clone());
        name
    }

    fn volume(&mut self) -> String {
        let name = self.name("data");
        docker_ok(&["volume", "create", &name]);
        self.volumes.push(name.clone());
        name
    }

    /// `docker run -d --name <prefix>-<what> args...`; returns the container name.
    fn container(&mut self, what: &str, args: &[&str]) -> String {
        let name = self.name(what);
        let mut full = vec!["run", "-d", "--name", &name];
        full.extend_from_slice(args);
        // Registered before it starts, so a failed start is cleaned up too.
        self.containers.push(name.clone());
        docker_ok(&full);
        name
    }

    /// A Debian container that idles until removed.
    fn debian(&mut self, what: &str, network: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "--network",
            network,
            "--network-alias",
            what,
            "--hostname",
            what,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[DEBIAN_IMAGE, "sleep", "infinity"]);
        self.container(what, &args)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = bounded(60, "docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for c in &self.containers {
            quiet(&["rm", "--force", "--volumes", c]);
        }
        for n in &self.networks {
            quiet(&["network", "rm", n]);
        }
        for v in &self.volumes {
            quiet(&["volume", "rm", "--force", v]);
        }
        for i in &self.images {
            quiet(&["image", "rm", "--force", i]);
        }
    }
}

/// The Debian mirror the host's apt uses (debootstrap fetches from it), or
/// `GANTRY_DEBIAN_MIRROR`.
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("GANTRY_DEBIAN_MIRROR") {
        return m;
    }
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list.d"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path()
                    .extension()
                    .is_some_and(|x| x == "sources" || x == "list")
                {
                    texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for text in texts {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let url = match words.as_slice() {
                ["URIs:" | "deb", url, ..] => *url,
                _ => continue,
            };
            if url.starts_with("http") && url.trim_end_matches('/').ends_with("/debian") {
                return url.to_owned();
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Builds the Debian image once per host (a lock makes parallel tests wait for the first).
fn debian_image() {
    if docker(&["image", "inspect", DEBIAN_IMAGE]).code == 0 {
        return;
    }
    // `docker_ready` made sure debootstrap and flock are here.
    let dir = tempfile::Builder::new()
        .prefix("gantry-debootstrap-")
        .tempdir()
        .expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    // curl for the online install; nothing else beyond minbase (no openssl, no sudo).
    let script = format!(
        "docker image inspect {image} >/dev/null 2>&1 && exit 0
         debootstrap --variant=minbase --include=curl bookworm '{root}' '{mirror}' >'{root}.log' 2>&1 \
           || {{ tail -20 '{root}.log' >&2; exit 1; }}
         tar -C '{root}' -c . | docker import --change 'CMD [\"/bin/bash\"]' - {image} >/dev/null",
        image = DEBIAN_IMAGE,
        root = rootfs.display(),
        mirror = debian_mirror(),
    );
    let started = std::time::Instant::now();
    let r = run(bounded(IMAGE_BUILD_SECS, "flock").args([
        "/tmp/gantry-test-debian-image.lock",
        "sh",
        "-c",
        &script,
    ]));
    assert_eq!(
        r.code, 0,
        "building {DEBIAN_IMAGE} failed (debootstrap from {}; set GANTRY_DEBIAN_MIRROR to use another mirror):\n{}",
        debian_mirror(),
        r.stderr
    );
    eprintln!(
        "built {DEBIAN_IMAGE} in {:.0?} (kept as a cache)",
        started.elapsed()
    );
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The directory holding the binaries under test.
fn bin_dir() -> PathBuf {
    bin("gantry").parent().expect("bin dir").to_path_buf()
}

/// `.deb`s of both packages from the binaries under test, in `out`.
fn build_debs(out: &Path) -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The test checked first that `cargo deb` runs (`requires::cargo_has`).
    // cargo-deb finds the binaries under CARGO_TARGET_DIR/<profile>; the test binaries'
    // own directory says where that is.
    let target_dir = bin_dir().parent().expect("target dir").to_path_buf();
    let mut debs = Vec::new();
    for package in ["gantry-coordinator", "gantry-agent"] {
        let r = run(bounded(300, &cargo)
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", &target_dir)
            .args([
                "deb",
                "-p",
                package,
                "--no-build",
                "--profile",
                "dev",
                "--fast",
                "-o",
            ])
            .arg(out));
        assert_eq!(r.code, 0, "cargo deb -p {package} failed: {}", r.stderr);
        let path = r
            .stdout
            .lines()
            .rev()
            .find(|l| Path::new(l.trim()).extension().is_some_and(|x| x == "deb"))
            .unwrap_or_else(|| panic!("cargo deb printed no .deb path: {}", r.stdout))
            .trim()
            .to_owned();
        debs.push(PathBuf::from(path));
    }
    let agent = debs.pop().expect("agent deb");
    let coordinator = debs.pop().expect("coordinator deb");
    (coordinator, agent)
}

/// Emulates the part of systemd the packages rely on, inside a container without it:
/// starts `$1.service` from its installed unit file as its `User=`, with its
/// `EnvironmentFile=` and exactly its `ExecStart=` line; a unit with
/// `AmbientCapabilities=` gets those (and `CapabilityBoundingSet=`, `NoNewPrivileges=`)
/// through `setpriv`. Output goes to /var/log/$1.log.
const RUN_UNIT: &str = r#"
unit=/usr/lib/systemd/system/$1.service
[ -r "$unit" ] || { echo "no $unit" >&2; exit 1; }
user=$(sed -n 's/^User=//p' "$unit")
env_file=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$unit")
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
caps() { sed -n "s/^$1=//p" "$unit" | tr 'A-Z ' 'a-z,' | sed 's/cap_/+/g'; }
ambient=$(caps AmbientCapabilities)
as_user="runuser -u $user --"
if [ -n "$ambient" ]; then
    nnp=$(sed -n 's/^NoNewPrivileges=yes$/--no-new-privs/p' "$unit")
    as_user="setpriv --reuid=$user --regid=$(sed -n 's/^Group=//p' "$unit") --init-groups $nnp --inh-caps=$ambient --ambient-caps=$ambient --bounding-set=-all,$(caps CapabilityBoundingSet) --"
fi
exec $as_user sh -c '
    set -a
    if [ -n "$1" ] && [ -r "$1" ]; then . "$1"; fi
    set +a
    eval "exec $2"' sh "$env_file" "$exec_start" >>"/var/log/$1.log" 2>&1 </dev/null
"#;

fn start_unit(container: &str, unit: &str) {
    docker_ok(&["exec", "-d", container, "sh", "-c", RUN_UNIT, "sh", unit]);
}

/// JSON from a command's stdout.
fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits until the coordinator in `container` lists `n` connected agents.
fn wait_agents(container: &str, gantry: &str, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} agents connected to the coordinator in {container}"),
        Duration::from_secs(60),
        || {
            let r = docker(&["exec", container, gantry, "agents", "list", "--json"]);
            if r.code != 0 {
                return None;
            }
            let Value::Array(agents) = json(&r.stdout) else {
                return None;
            };
            (agents.iter().filter(|a| a["state"] == "Connected").count() == n).then_some(agents)
        },
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    gantry_certs::hex(&gantry_certs::sha256(bytes))
}

/// A PATH holding the tools install.sh needs, minus openssl: a minimal Debian host.
fn path_without_openssl(dir: &Path) -> PathBuf {
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).expect("tools dir");
    for tool in [
        "sh",
        "sha256sum",
        "cut",
        "tar",
        "sed",
        "base64",
        "tr",
        "mktemp",
        "rm",
        "mkdir",
        "chmod",
        "cat",
        "printf",
        "dirname",
        "id",
    ] {
        let found = run(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
        let path = found.stdout.trim();
        if path.starts_with('/') {
            std::os::unix::fs::symlink(path, tools.join(tool)).expect("link tool");
        }
    }
    tools
}

/// The bundle members' names in archive order.
fn bundle_members(bundle: &Path) -> Vec<String> {
    let r = run(Command::new("tar").arg("-tf").arg(bundle));
    assert_eq!(r.code, 0, "tar -tf: {}", r.stderr);
    r.stdout.lines().map(str::to_owned).collect()
}

#[test]
fn a_bundle_verifies_with_or_without_openssl_and_any_changed_byte_is_refused() {
    let c = Coordinator::start();
    let token = c.token(&["--ttl", "1h"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("gantry-bundle.tar");
    let data_dir = c.data_dir();
    let created = c
        .gantry(&[
            "bundle",
            "create",
            "-o",
            bundle.to_str().expect("utf8"),
            "--token",
            &token,
            "--data-dir",
            data_dir.to_str().expect("utf8"),
            "--json",
        ])
        .expect_code(0)
        .json();
    let bytes = std::fs::read(&bundle).expect("bundle written");
    let digest = created["sha256"].as_str().expect("sha256").to_owned();
    let signature = created["signature"].as_str().expect("signature").to_owned();
    assert_eq!(
        digest,
        sha256_hex(&bytes),
        "the printed digest is the file's"
    );
    let ca_fp = gantry_certs::fingerprint(&gantry_certs::pem_to_der(&c.ca_pem()).expect("ca"));
    assert_eq!(created["ca_fingerprint"], ca_fp.as_str());
    gantry_certs::bundle::verify(
        &gantry_certs::pem_to_der(&c.ca_pem()).expect("ca"),
        &digest,
        &signature,
    )
    .expect("the printed signature is the CA's over the digest");
    let command = created["install_command"].as_str().expect("command");
    assert!(
        command.starts_with("echo '") && command.contains("| sha256sum -c - && tar -xOf gantry-bundle.tar install.sh | sh -s -- --bundle gantry-bundle.tar"),
        "the printed command checks the digest with the host's sha256sum first: {command}"
    );
    assert_eq!(
        bundle_members(&bundle),
        [
            "install.sh",
            "gantry-agent",
            "ca.pem",
            "gantry-agent.service",
            "agent.env",
            "bundle-info",
            "token"
        ],
        "install.sh comes first, the token last"
    );
    let listing = run(Command::new("tar").arg("-tvf").arg(&bundle)).stdout;
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rw-------") && l.ends_with(" token")),
        "the token is private in the archive: {listing}"
    );
    let agent_in_bundle = run(Command::new("sh").arg("-c").arg(format!(
        "tar -xOf '{}' gantry-agent | sha256sum | cut -d' ' -f1",
        bundle.display()
    )));
    assert_eq!(
        agent_in_bundle.stdout.trim(),
        sha256_hex(&std::fs::read(bin("gantry-agent")).expect("agent")),
        "the bundled agent is the coordinator's sibling binary"
    );

    let script = dir.path().join("install.sh");
    let extracted = run(Command::new("sh").arg("-c").arg(format!(
        "tar -xOf '{}' install.sh > '{}'",
        bundle.display(),
        script.display()
    )));
    assert_eq!(extracted.code, 0, "{}", extracted.stderr);
    let no_openssl = path_without_openssl(dir.path());
    let has_openssl = run(Command::new("sh").args(["-c", "command -v openssl"])).code == 0;
    let check =
        |file: &Path, digest: &str, signature: &str, extra: &[&str], path: Option<&Path>| {
            let mut cmd = Command::new("sh");
            cmd.arg(&script)
                .args(["--check", "--bundle"])
                .arg(file)
                .args(["--sha256", digest, "--signature", signature])
                .args(extra)
                .stdin(Stdio::null());
            if let Some(p) = path {
                cmd.env("PATH", p);
            }
            run(&mut cmd)
        };

    let with_default = check(&bundle, &digest, &signature, &[], None).expect_code(0);
    let expected_verifier = if has_openssl {
        "checked with openssl"
    } else {
        "checked with the bundled gantry-agent"
    };
    assert!(
        with_default.stderr.contains("bundle verified")
            && with_default.stderr.contains(expected_verifier),
        "{}",
        with_default.stderr
    );
    assert!(with_default.stderr.contains("it carries a join token"));
    let minimal = check(&bundle, &digest, &signature, &[], Some(&no_openssl)).expect_code(0);
    assert!(
        minimal
            .stderr
            .contains("checked with the bundled gantry-agent"),
        "without openssl the digest-verified agent checks the signature: {}",
        minimal.stderr
    );
    let pinned = check(
        &bundle,
        &digest,
        &signature,
        &["--ca-fingerprint", &ca_fp],
        None,
    );
    pinned.expect_code(0);

    // Any changed byte: a tar header, the script, the agent binary, the padding at the end.
    let offsets = [100, 700, bytes.len() / 2, bytes.len() - 1];
    for offset in offsets {
        let mut tampered = bytes.clone();
        tampered[offset] ^= 0x20;
        let file = dir.path().join(format!("tampered-{offset}.tar"));
        std::fs::write(&file, &tampered).expect("write tampered");
        for path in [None, Some(no_openssl.as_path())] {
            let r = check(&file, &digest, &signature, &[], path).expect_code(2);
            assert!(
                r.stderr.contains("was changed or damaged")
                    && r.stderr.contains("nothing was installed"),
                "byte {offset}: {}",
                r.stderr
            );
        }
    }
    // A digest that matches with a signature that does not (mistyped, or another CA's).
    let mut bad_signature = signature.clone().into_bytes();
    bad_signature[20] = if bad_signature[20] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let bad_signature = String::from_utf8(bad_signature).expect("ascii");
    for path in [None, Some(no_openssl.as_path())] {
        let r = check(&bundle, &digest, &bad_signature, &[], path).expect_code(2);
        assert!(
            r.stderr.contains("signature does not verify"),
            "{}",
            r.stderr
        );
    }
    let other_fp = format!("sha256:{}", "0".repeat(64));
    let r = check(
        &bundle,
        &digest,
        &signature,
        &["--ca-fingerprint", &other_fp],
        None,
    )
    .expect_code(2);
    assert!(
        r.stderr.contains(&format!("the bundle's CA is {ca_fp}")),
        "{}",
        r.stderr
    );
    let r = run(Command::new("sh")
        .arg(&script)
        .arg("--bundle")
        .arg(&bundle)
        .stdin(Stdio::null()))
    .expect_code(2);
    assert!(r.stderr.contains("--sha256 is required"), "{}", r.stderr);

    // A token for another coordinator is refused when making the bundle.
    let foreign = gantry_certs::JoinToken::generate("elsewhere:7443", &other_fp).encode();
    let r = c
        .gantry(&[
            "bundle",
            "create",
            "-o",
            dir.path().join("x.tar").to_str().expect("utf8"),
            "--token",
            &foreign,
            "--data-dir",
            data_dir.to_str().expect("utf8"),
        ])
        .expect_code(2);
    assert!(
        r.stderr.contains("create the token on this coordinator"),
        "{}",
        r.stderr
    );
    assert!(!dir.path().join("x.tar").exists(), "nothing is written");
}

fn curl(args: &[&str]) -> Run {
    run(bounded(30, "curl").args(args))
}

#[test]
fn the_https_side_serves_the_installer_the_ca_and_the_agent() {
    let mut c = Coordinator::start_with(&CoordinatorOptions {
        http: true,
        ..CoordinatorOptions::default()
    });
    // Loopback may be plain; ask for TLS to test it here.
    let config_path = c.data_dir().join("coordinator.toml");
    c.server().terminate();
    let config = std::fs::read_to_string(&config_path).expect("config");
    // Top-level keys go before any [table] the file may hold.
    std::fs::write(&config_path, format!("http_tls = true\n{config}")).expect("config");
    c.start_server();
    let http = c.http_address.clone().expect("http address");
    let base = format!("https://{http}");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, c.ca_pem()).expect("ca");
    let ca_arg = ca.to_str().expect("utf8");

    let health = curl(&["-fsS", "--cacert", ca_arg, &format!("{base}/healthz")]).expect_code(0);
    assert_eq!(health.stdout, r#"{"status":"ok"}"#);
    let metrics = curl(&["-fsS", "--cacert", ca_arg, &format!("{base}/metrics")]).expect_code(0);
    assert!(metrics.stdout.contains("gantry_"), "{}", metrics.stdout);
    let plain = curl(&["-sS", &format!("http://{http}/healthz")]);
    assert_ne!(
        plain.code, 0,
        "no plain HTTP on the TLS port: {}",
        plain.stdout
    );
    let unpinned = curl(&["-sS", &format!("{base}/healthz")]);
    assert_ne!(
        unpinned.code, 0,
        "the certificate is not trusted without our CA"
    );

    let served_ca = curl(&["-fsSk", &format!("{base}/ca.pem")]).expect_code(0);
    assert_eq!(served_ca.stdout, c.ca_pem());
    let script = curl(&["-fsS", "--cacert", ca_arg, &format!("{base}/install.sh")]).expect_code(0);
    let agent_bytes = std::fs::read(bin("gantry-agent")).expect("agent");
    let ca_fp = gantry_certs::fingerprint(&gantry_certs::pem_to_der(&c.ca_pem()).expect("ca"));
    for line in [
        format!("COORDINATOR_URL='{base}'"),
        format!("CA_FINGERPRINT='{ca_fp}'"),
        format!("AGENT_SHA256='{}'", sha256_hex(&agent_bytes)),
    ] {
        assert!(
            script.stdout.lines().any(|l| l == line),
            "{line} in the served script"
        );
    }
    let downloaded = dir.path().join("gantry-agent");
    curl(&[
        "-fsS",
        "--cacert",
        ca_arg,
        &format!("{base}/agent/gantry-agent"),
        "-o",
        downloaded.to_str().expect("utf8"),
    ])
    .expect_code(0);
    assert!(
        std::fs::read(&downloaded).expect("downloaded") == agent_bytes,
        "the served agent is the coordinator's sibling binary, byte for byte"
    );
    let unit = curl(&[
        "-fsS",
        "--cacert",
        ca_arg,
        &format!("{base}/agent/gantry-agent.service"),
    ])
    .expect_code(0);
    let packaged_unit =
        std::fs::read_to_string(workspace_root().join("packaging/systemd/gantry-agent.service"))
            .expect("unit");
    assert_eq!(unit.stdout, packaged_unit);
    let injected = curl(&[
        "-sS",
        "--cacert",
        ca_arg,
        "-H",
        "Host: x';reboot;'",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/install.sh"),
    ]);
    assert_eq!(
        injected.stdout, "400",
        "a Host header that is no host is refused"
    );

    let data_dir = c.data_dir();
    let token = c.token(&[]);
    let command = c
        .gantry(&[
            "install-command",
            "--token",
            &token,
            "--data-dir",
            data_dir.to_str().expect("utf8"),
        ])
        .expect_code(0)
        .stdout;
    assert!(
        command.contains(&format!("curl -fsSk {base}/ca.pem"))
            && command.contains(&format!(
                "grep -q '^{} '",
                ca_fp.trim_start_matches("sha256:")
            ))
            && command.contains(&format!(
                "--cacert \"$f\" {base}/install.sh | sh -s -- --token {token}"
            )),
        "the command pins the CA by fingerprint before it runs anything: {command}"
    );

    // Plain HTTP is refused off loopback, with the fix in the message.
    c.server().terminate();
    let config = std::fs::read_to_string(&config_path).expect("config");
    let public = config
        .replace(
            &format!("http_listen = \"{http}\""),
            "http_listen = \"0.0.0.0:0\"",
        )
        .replace("http_tls = true", "http_tls = false");
    std::fs::write(&config_path, public).expect("config");
    let refused = run(bounded(30, bin("gantry").to_str().expect("utf8"))
        .args(["server", "--data-dir"])
        .arg(&data_dir))
    .expect_code(2);
    assert!(
        refused
            .stderr
            .contains("plain HTTP is allowed on loopback only"),
        "{}",
        refused.stderr
    );
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !requires::require_program(
        "the_units_pass_systemd_analyze_verify",
        "systemd-analyze",
        "apt-get install systemd",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in ["gantry.service", "gantry-agent.service"] {
        let text = std::fs::read_to_string(workspace_root().join("packaging/systemd").join(unit))
            .expect("unit");
        // verify also checks that ExecStart's binary exists: point it at the built ones.
        let local = text.replace("/usr/bin/", &format!("{}/", bin_dir().display()));
        let path = dir.path().join(unit);
        std::fs::write(&path, local).expect("write unit");
        let r = run(bounded(60, "systemd-analyze").arg("verify").arg(&path));
        assert!(
            r.code == 0 && r.stderr.trim().is_empty(),
            "{unit}: systemd-analyze verify says\n{}{}",
            r.stdout,
            r.stderr
        );
    }
}

#[test]
fn the_debs_install_on_debian_and_the_agent_enrolls_connects_and_runs_a_job() {
    const TEST: &str = "the_debs_install_on_debian_and_the_agent_enrolls_connects_and_runs_a_job";
    if !docker_ready(TEST)
        || !(requires::cargo_has("deb")
            || requires::missing(
                TEST,
                "cargo-deb",
                INSTALL_CARGO_DEB,
                Some(requires::SKIP_DOCKER),
            ))
    {
        return;
    }
    debian_image();
    let debs = tempfile::tempdir().expect("tempdir");
    let (coordinator_deb, agent_deb) = build_debs(debs.path());
    let mut scope = Scope::new();
    // Nothing here needs the outside world.
    let net = scope.network(true);
    let mount = format!("{}:/debs:ro", debs.path().display());
    let coord = scope.debian("debcoord", &net, &["-v", &mount]);
    // The agent isolates jobs under the unit's capabilities, which include CAP_SYS_ADMIN
    // for namespaces and mounts: more than Docker's default set and seccomp profile let
    // a container use (the unit itself gets no more than its capabilities).
    let agent = scope.debian(
        "debagent",
        &net,
        &[
            "-v",
            &mount,
            "--cap-add",
            "SYS_ADMIN",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
        ],
    );
    let deb_name = |p: &Path| p.file_name().expect("name").to_string_lossy().into_owned();

    exec_ok(
        &coord,
        &format!("dpkg -i /debs/{}", deb_name(&coordinator_deb)),
    );
    let facts = exec_ok(
        &coord,
        "getent passwd gantry | cut -d: -f6,7; stat -c '%U:%G %a' /var/lib/gantry /etc/gantry; \
         test -x /usr/bin/gantry && test -x /usr/lib/gantry/gantry-agent && echo binaries; \
         test -f /usr/lib/systemd/system/gantry.service && echo unit; \
         test -L /etc/systemd/system/multi-user.target.wants/gantry.service || echo not-enabled",
    );
    assert_eq!(
        facts,
        "/var/lib/gantry:/usr/sbin/nologin\ngantry:gantry 700\nroot:root 755\nbinaries\nunit\nnot-enabled",
        "system user, directories, binaries, unit installed but not enabled"
    );
    // As the README says: init as root, with the configuration in /etc/gantry.
    exec_ok(
        &coord,
        "gantry init --data-dir /var/lib/gantry --config /etc/gantry/coordinator.toml \
         --listen 0.0.0.0:7443 --advertise debcoord:7443 --http-listen 0.0.0.0:8443",
    );
    let owned = exec_ok(
        &coord,
        "stat -c '%U %a %n' /var/lib/gantry/tls/ca-key.pem /etc/gantry/coordinator.toml; \
         find /var/lib/gantry ! -user gantry",
    );
    assert_eq!(
        owned, "gantry 600 /var/lib/gantry/tls/ca-key.pem\nroot 644 /etc/gantry/coordinator.toml",
        "init as root gives everything in the data directory to the service user"
    );
    start_unit(&coord, "gantry");
    wait_for("the packaged coordinator to answer", DEADLINE, || {
        (exec(&coord, "gantry status").code == 0).then_some(())
    });
    let token = exec_ok(&coord, "gantry token create --label site=deb");
    // The CLI helpers find the packaged configuration in /etc/gantry by themselves.
    let command = exec_ok(&coord, &format!("gantry install-command --token {token}"));
    assert!(
        command.contains("https://debcoord:8443/install.sh"),
        "{command}"
    );

    exec_ok(&agent, &format!("dpkg -i /debs/{}", deb_name(&agent_deb)));
    let facts = exec_ok(
        &agent,
        "getent passwd gantry-agent | cut -d: -f6,7; stat -c '%U:%G %a' /var/lib/gantry-agent; \
         grep -c agent.env /var/lib/dpkg/info/gantry-agent.conffiles",
    );
    assert_eq!(
        facts,
        "/var/lib/gantry-agent:/usr/sbin/nologin\ngantry-agent:gantry-agent 700\n1"
    );
    exec_ok(
        &agent,
        &format!("runuser -u gantry-agent -- gantry-agent enroll --token {token} --data-dir /var/lib/gantry-agent"),
    );
    exec_ok(
        &agent,
        r#"sed -i 's/^GANTRY_AGENT_ARGS=.*/GANTRY_AGENT_ARGS="--label from=envfile --slots 2"/' /etc/gantry/agent.env"#,
    );
    // The packaged coordinator serves HTTPS and its own copy of the agent.
    let served = exec_ok(
        &agent,
        "curl -fsSk https://debcoord:8443/ca.pem -o /tmp/ca.pem && \
         curl -fsS --cacert /tmp/ca.pem https://debcoord:8443/agent/gantry-agent | sha256sum | cut -c1-64",
    );
    let shipped = exec_ok(
        &coord,
        "sha256sum /usr/lib/gantry/gantry-agent | cut -c1-64",
    );
    assert_eq!(
        served, shipped,
        "the coordinator serves /usr/lib/gantry/gantry-agent"
    );
    start_unit(&agent, "gantry-agent");
    let agents = wait_agents(&coord, "gantry", 1);
    let labels = &agents[0]["labels"];
    assert_eq!(labels["site"], "deb", "the token's label: {}", agents[0]);
    assert_eq!(
        labels["from"], "envfile",
        "agent.env reaches ExecStart: {}",
        agents[0]
    );

    // A job runs isolated under the packaged agent: a uid of its own, no capabilities.
    exec_ok(
        &coord,
        "printf 'jobs:\\n  who:\\n    steps:\\n      - run: echo uid=$(id -u) && grep ^CapEff /proc/self/status\\n' > /tmp/who.yml && \
         gantry run /tmp/who.yml --no-source --follow",
    );
    let log = exec_ok(&coord, "gantry logs 1.0");
    let agent_log = exec_ok(&agent, "cat /var/log/gantry-agent.log");
    assert!(
        log.contains("uid=900") && log.contains("0000000000000000"),
        "the job ran as a uid of its own without capabilities: {log}\n{agent_log}"
    );
    assert!(
        agent_log.contains("jobs run isolated"),
        "the agent says so at start: {agent_log}"
    );
}

#[test]
fn the_scratch_image_serves_new_hosts_online_and_offline_and_a_tampered_bundle_is_refused() {
    if !docker_ready(
        "the_scratch_image_serves_new_hosts_online_and_offline_and_a_tampered_bundle_is_refused",
    ) {
        return;
    }
    debian_image();
    let mut scope = Scope::new();
    let image = format!("gantry-test-scratch:{}", unique());
    scope.images.push(image.clone());
    let build = run(bounded(COMMAND_SECS, "sh")
        .arg(workspace_root().join("packaging/container/build.sh"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--tag", &image]));
    assert_eq!(build.code, 0, "build.sh: {}{}", build.stdout, build.stderr);
    let shell = docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        &image,
        "-c",
        "true",
    ]);
    assert_ne!(shell.code, 0, "a FROM scratch image has no shell");

    // One private network with no route out: the coordinator and two new hosts.
    let net = scope.network(true);
    let volume = scope.volume();
    let data = format!("{volume}:/var/lib/gantry");
    docker_ok(&[
        "run",
        "--rm",
        "-v",
        &data,
        &image,
        "init",
        "--listen",
        "0.0.0.0:7443",
        "--advertise",
        "coord:7443",
        "--http-listen",
        "0.0.0.0:8443",
    ]);
    let coord = scope.container(
        "coord",
        &[
            "--network",
            &net,
            "--network-alias",
            "coord",
            "-v",
            &data,
            &image,
        ],
    );
    wait_for(
        "the coordinator in the scratch image to answer",
        DEADLINE,
        || (docker(&["exec", &coord, "/usr/bin/gantry", "status"]).code == 0).then_some(()),
    );
    let gantry = |args: &[&str]| {
        let mut full = vec!["exec", coord.as_str(), "/usr/bin/gantry"];
        full.extend_from_slice(args);
        docker_ok(&full)
    };

    // Online: the printed one-liner, with curl, from a host that reaches only the coordinator.
    let online = scope.debian("online", &net, &[]);
    let token = gantry(&["token", "create", "--label", "via=curl"]);
    let online_command = gantry(&["install-command", "--token", &token]);
    let command = online_command.clone();
    assert!(command.contains("https://coord:8443/ca.pem"), "{command}");
    let fp_hex = command
        .split("grep -q '^")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("fingerprint in the command")
        .to_owned();
    let forged = command.replace(&fp_hex, &"0".repeat(64));
    let r = exec(&online, &forged);
    assert_ne!(r.code, 0, "a CA with another fingerprint stops the command");
    assert!(r.stderr.contains("does not present the CA"), "{}", r.stderr);
    assert_eq!(
        exec_ok(
            &online,
            "test -e /usr/bin/gantry-agent && echo installed || echo absent"
        ),
        "absent"
    );
    let r = exec(&online, &command);
    assert_eq!(r.code, 0, "install command: {}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("downloaded the agent from https://coord:8443"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("without supervision"),
        "no systemd here, and it says so: {}",
        r.stderr
    );
    wait_agents(&coord, "/usr/bin/gantry", 1);

    // Offline: a bundle made in the coordinator's container, carried to a host with no network.
    let token = gantry(&["token", "create", "--ttl", "1h", "--label", "via=bundle"]);
    let created = json(&gantry(&[
        "bundle",
        "create",
        "-o",
        "/var/lib/gantry/bundle.tar",
        "--token",
        &token,
        "--json",
    ]));
    let digest = created["sha256"].as_str().expect("sha256").to_owned();
    let signature = created["signature"].as_str().expect("signature").to_owned();
    let command = created["install_command"]
        .as_str()
        .expect("command")
        .to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("bundle.tar");
    docker_ok(&[
        "cp",
        &format!("{coord}:/var/lib/gantry/bundle.tar"),
        good.to_str().expect("utf8"),
    ]);
    let mut bytes = std::fs::read(&good).expect("bundle");
    assert_eq!(sha256_hex(&bytes), digest);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let tampered = dir.path().join("tampered.tar");
    std::fs::write(&tampered, &bytes).expect("tampered");

    let offline = scope.debian("offline", &net, &[]);
    let outside = exec(
        &offline,
        "curl -m 5 -sS http://deb.debian.org/ -o /dev/null",
    );
    assert_ne!(outside.code, 0, "the offline host cannot reach the outside");
    docker_ok(&[
        "cp",
        good.to_str().expect("utf8"),
        &format!("{offline}:/root/bundle.tar"),
    ]);
    docker_ok(&[
        "cp",
        tampered.to_str().expect("utf8"),
        &format!("{offline}:/root/tampered.tar"),
    ]);
    let nothing_installed = "test ! -e /usr/bin/gantry-agent && ! getent passwd gantry-agent \
                             && test ! -e /var/lib/gantry-agent && echo clean";
    // The printed command, pointed at the tampered file: the host's sha256sum stops it.
    let r = exec(
        &offline,
        &format!(
            "cd /root && {}",
            command.replace("bundle.tar", "tampered.tar")
        ),
    );
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("FAILED") || r.stderr.contains("FAILED"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(exec_ok(&offline, nothing_installed), "clean");
    // Someone skips that check and runs install.sh on the tampered file: it refuses too.
    let r = exec(
        &offline,
        &format!(
            "cd /root && tar -xOf bundle.tar install.sh > install.sh && \
             sh install.sh --bundle tampered.tar --sha256 {digest} --signature {signature}"
        ),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("was changed or damaged") && r.stderr.contains("nothing was installed"),
        "{}",
        r.stderr
    );
    assert_eq!(exec_ok(&offline, nothing_installed), "clean");

    let r = exec(&offline, &format!("cd /root && {command}"));
    assert_eq!(r.code, 0, "bundle install: {}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("checked with the bundled gantry-agent"),
        "minbase has no openssl: {}",
        r.stderr
    );
    let agents = wait_agents(&coord, "/usr/bin/gantry", 2);
    let vias: Vec<&str> = agents
        .iter()
        .filter_map(|a| a["labels"]["via"].as_str())
        .collect();
    assert!(
        vias.contains(&"curl") && vias.contains(&"bundle"),
        "{agents:?}"
    );

    // Running the install command again is the upgrade: same enrollment, one agent.
    let r = exec(&online, &online_command);
    assert_eq!(r.code, 0, "reinstall: {}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("already enrolled")
            && r.stderr.contains("stopped the agent started earlier"),
        "{}",
        r.stderr
    );
    let running = exec_ok(
        &online,
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = gantry-agent ] \
         && ! grep -q '^State:.Z' $p/status && echo $p; done | wc -l",
    );
    assert_eq!(
        running, "1",
        "the old agent was stopped before the new one started"
    );
    let home = exec_ok(
        &online,
        "runuser -u gantry-agent -- cat /proc/$(cat /var/lib/gantry-agent/agent.pid)/environ \
         | tr '\\0' '\\n' | grep ^HOME=",
    );
    assert_eq!(
        home, "HOME=/var/lib/gantry-agent",
        "the agent has its own HOME, not root's"
    );
    wait_agents(&coord, "/usr/bin/gantry", 2);
}
