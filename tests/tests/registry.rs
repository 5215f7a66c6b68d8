//! End-to-end tests of image pulls (issue 26): a job's `image:` comes from a registry
//! as its pull policy says (`never`, `if-not-present`, `always`), with credentials from
//! the coordinator's secrets, and the digest of the image the job ran in shows in
//! `gantry jobs show --json`.
//!
//! The registry is Debian's `docker-registry` (the CNCF distribution registry), started
//! by the test on a loopback port with htpasswd authentication; the Docker engine allows
//! plain HTTP to registries on 127.0.0.0/8. The image is the host's static busybox on
//! an empty root (`docker import`, as FROM scratch), pushed there by the test. Without
//! the registry, busybox-static or a running engine the test skips saying what to
//! install (it fails instead under `GANTRY_REQUIRE_ALL_TESTS=1`, as in CI).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use gantry_tests::{job_named, requires, wait_for, Coordinator, Proc, DEADLINE};

const BUSYBOX: &str = "/bin/busybox";
const USER: &str = "ci";
/// The registry user's password, and its bcrypt hash for the registry's htpasswd file
/// (made once with `crypt(3)`, cost 5: this is a throwaway test credential).
const PASSWORD: &str = "gantry-registry-test-pw";
const PASSWORD_BCRYPT: &str = "$2b$05$9P4bB6lloCBZFAK2spCp/OXQqlosSRtfatdhH.XjUs832RZIwTfaO";

/// `docker ARGS` with the CLI's configuration (where `docker login` keeps credentials)
/// in `config`, never the user's own; must succeed; returns stdout.
fn docker(config: &Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Command::new("docker")
        .args(args)
        .env("DOCKER_CONFIG", config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run docker {}: {e}", args.join(" ")));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait docker");
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A registry on a loopback port, stopped when dropped.
struct Registry {
    _proc: Proc,
    _dir: tempfile::TempDir,
    address: String,
}

impl Registry {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let address = format!("127.0.0.1:{port}");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("{USER}:{PASSWORD_BCRYPT}\n")).expect("htpasswd");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\nhttp:\n  addr: {address}\nauth:\n  htpasswd:\n    realm: gantry-test\n    path: {htpasswd}\n",
                data = dir.path().join("data").display(),
                htpasswd = htpasswd.display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let proc = Proc {
            child,
            name: "docker-registry".into(),
        };
        wait_for("the registry to answer", DEADLINE, || {
            std::net::TcpStream::connect(&address).ok().map(|_| ())
        });
        Self {
            _proc: proc,
            _dir: dir,
            address,
        }
    }
}

/// The busybox image (an empty root with `bin/busybox` and links), imported as `tag`.
fn import_busybox(config: &Path, tag: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("rootfs/bin");
    std::fs::create_dir_all(&bin).expect("rootfs/bin");
    std::fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
    for tool in ["sh", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(tool)).expect("link");
    }
    let tar = dir.path().join("rootfs.tar");
    let tarred = Command::new("tar")
        .arg("-C")
        .arg(dir.path().join("rootfs"))
        .args(["-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tarred.success(), "tar of the rootfs failed");
    docker(config, &["import", tar.to_str().expect("utf8"), tag], None);
}

/// Removes the test's image tag from the engine when dropped.
struct Untag(String, std::path::PathBuf);

impl Drop for Untag {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "--force", &self.0])
            .env("DOCKER_CONFIG", &self.1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn job_yaml(name: &str, image: &str, pull: &str, credentials: &str) -> String {
    format!(
        "  {name}:\n    image:\n      name: {image}\n      pull: {pull}\n{credentials}    steps: [{{ run: 'echo inside-{name}' }}]\n"
    )
}

const CREDENTIALS: &str =
    "      credentials:\n        username: ci\n        password: ${{ secrets.REGISTRY_PASSWORD }}\n";
const WRONG_CREDENTIALS: &str =
    "      credentials:\n        username: ci\n        password: ${{ secrets.WRONG_PASSWORD }}\n";

#[test]
fn images_are_pulled_as_their_policy_says_with_credentials_from_secrets_and_the_digest_is_shown() {
    const TEST: &str = "images_are_pulled_as_their_policy_says_with_credentials_from_secrets_and_the_digest_is_shown";
    if !requires::require_docker(TEST, Some(BUSYBOX))
        || !requires::require_program(TEST, "docker-registry", "apt-get install docker-registry")
    {
        return;
    }
    let config = tempfile::tempdir().expect("docker config dir");
    let config = config.path();
    let registry = Registry::start();
    let image = format!("{}/gantry-test:{}", registry.address, std::process::id());
    let _untag = Untag(image.clone(), config.to_path_buf());
    import_busybox(config, &image);
    docker(
        config,
        &["login", &registry.address, "-u", USER, "--password-stdin"],
        Some(PASSWORD),
    );
    docker(config, &["push", &image], None);
    let pushed = docker(
        config,
        &[
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &image,
        ],
        None,
    );
    let Some((_, digest)) = pushed.split_once('@') else {
        panic!("no digest in {pushed}");
    };
    let digest = digest.to_owned();
    docker(config, &["logout", &registry.address], None);
    // Only the registry has it now.
    docker(config, &["image", "rm", &image], None);

    let c = Coordinator::start();
    c.set_secret("REGISTRY_PASSWORD", PASSWORD);
    c.set_secret("WRONG_PASSWORD", "not-the-password");
    let _agents = c.agents_running(1, &[]);

    // Nothing pulled yet: `never` refuses, and the registry refuses a pull without
    // credentials or with wrong ones; each says so.
    let refused = c.run_pipeline(
        &format!(
            "jobs:\n{}{}{}",
            job_yaml("never", &image, "never", ""),
            job_yaml("anonymous", &image, "always", ""),
            job_yaml("wrong", &image, "if-not-present", WRONG_CREDENTIALS),
        ),
        &[],
    );
    let view = c.wait_run(refused, Duration::from_secs(120));
    for (index, name, says) in [
        (
            0,
            "never",
            "is not on this host and the job says pull: never",
        ),
        (1, "anonymous", "the registry wants credentials"),
        (2, "wrong", "the registry refused the credentials"),
    ] {
        let log = c.logs(&format!("{refused}.{index}"));
        assert_ne!(job_named(&view, name)["state"], "succeeded", "{view}");
        assert!(log.contains(says), "{name}: no `{says}` in:\n{log}\n{view}");
        assert!(
            !log.contains(&format!("inside-{name}")),
            "{name} ran:\n{log}"
        );
        assert!(!log.contains("not-the-password"), "{log}");
    }

    // `always` with the right credentials pulls, runs, and records the digest.
    let pulled = c.run_pipeline(
        &format!(
            "jobs:\n{}",
            job_yaml("pulled", &image, "always", CREDENTIALS)
        ),
        &[],
    );
    let view = c.wait_run(pulled, Duration::from_secs(120));
    let log = c.logs(&format!("{pulled}.0"));
    assert_eq!(
        job_named(&view, "pulled")["state"],
        "succeeded",
        "{view}\n{log}"
    );
    assert!(log.contains("inside-pulled"), "{log}");
    assert!(
        log.contains(&format!("pulling {image}")),
        "the log says it pulled:\n{log}"
    );
    assert!(
        !log.contains(PASSWORD),
        "the password reached the log:\n{log}"
    );
    let shown = c
        .gantry(&["jobs", "show", &format!("{pulled}.0"), "--json"])
        .expect_code(0)
        .json();
    assert_eq!(shown["image_digest"], digest.as_str(), "{shown}");
    assert_eq!(
        shown["outputs"],
        serde_json::json!({}),
        "the digest is no output: {shown}"
    );

    // Now on the agent: `if-not-present` and `never` use it without the registry (no
    // credentials given, which the registry would refuse).
    let cached = c.run_pipeline(
        &format!(
            "jobs:\n{}{}",
            job_yaml("present", &image, "if-not-present", ""),
            job_yaml("local", &image, "never", ""),
        ),
        &[],
    );
    let view = c.wait_run(cached, Duration::from_secs(120));
    for (index, name) in [(0, "present"), (1, "local")] {
        let log = c.logs(&format!("{cached}.{index}"));
        assert_eq!(
            job_named(&view, name)["state"],
            "succeeded",
            "{view}\n{log}"
        );
        assert!(!log.contains("pulling"), "{name} pulled:\n{log}");
        let shown = c
            .gantry(&["jobs", "show", &format!("{cached}.{index}"), "--json"])
            .expect_code(0)
            .json();
        assert_eq!(shown["image_digest"], digest.as_str(), "{shown}");
    }
}
