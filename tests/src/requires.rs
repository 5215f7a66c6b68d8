//! What a test needs beyond Rust and this repository (an "extra"), and the one rule for
//! when it is missing: the test skips with one line naming what to install, so the
//! README's `cargo nextest run --workspace` passes on a fresh machine; under
//! `GANTRY_REQUIRE_ALL_TESTS=1` (which `.ci/run` sets after installing every extra) a
//! missing extra fails the test instead, so CI never passes by skipping.
//!
//! The extras: a running Docker engine, Debian's `busybox-static` (the Docker tests'
//! image), `debootstrap` and `cargo-deb` (the packaging tests), Chromium (the dashboard
//! test), `systemd-analyze` (the unit check), root to mount a tmpfs (the disk-space
//! tests). `git/tests/support`'s sshd check follows the same rule with its own copy of
//! it: `gantry-git` cannot depend on this crate, which depends on it; so does
//! `gantry-cas`'s test of a refused direct write, which needs its temporary directory on
//! ext4 or xfs (not tmpfs, not a container's overlay).
//!
//! The older per-family switches keep working: `GANTRY_SKIP_DOCKER_TESTS=1` skips a
//! Docker test whose extras are missing even under `GANTRY_REQUIRE_ALL_TESTS=1`, and
//! `GANTRY_SKIP_BROWSER_TESTS=1` skips the browser test outright (`browser.rs`).
//!
//! It must not install anything: it only looks and says.

use std::path::Path;
use std::process::{Command, Stdio};

/// Set to `1` to make a missing extra a test failure rather than a skip.
pub const REQUIRE_ALL: &str = "GANTRY_REQUIRE_ALL_TESTS";
/// Set to `1` to skip the Docker tests whose extras are missing, whatever `REQUIRE_ALL`.
pub const SKIP_DOCKER: &str = "GANTRY_SKIP_DOCKER_TESTS";
/// How the Docker engine is installed on Debian.
pub const INSTALL_DOCKER: &str = "apt-get install docker.io, and start the engine";
/// How busybox-static is installed on Debian.
pub const INSTALL_BUSYBOX: &str = "apt-get install busybox-static";

fn env_is_one(name: &str) -> bool {
    std::env::var(name).as_deref() == Ok("1")
}

/// The decision for an extra that is missing: `false` (skip, after one line on stderr
/// naming the test, what is missing and how to install it), or a panic with the same
/// words under `GANTRY_REQUIRE_ALL_TESTS=1` unless `skip_var` is set to `1`.
///
/// # Panics
///
/// When `GANTRY_REQUIRE_ALL_TESTS=1` and `skip_var` is not set to `1`.
pub fn missing(test: &str, what: &str, install: &str, skip_var: Option<&str>) -> bool {
    let line = format!("{test} needs {what} ({install})");
    let skipped_by_var = skip_var.is_some_and(env_is_one);
    assert!(
        skipped_by_var || !env_is_one(REQUIRE_ALL),
        "{line}; {REQUIRE_ALL}=1 makes a missing extra a failure"
    );
    eprintln!("skipping: {line}");
    false
}

/// `present`, or what [`missing`] decides.
pub fn require(present: bool, test: &str, what: &str, install: &str) -> bool {
    present || missing(test, what, install, None)
}

/// Whether `name` is a file in one of `PATH`'s directories.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// The program `name` on `PATH`, e.g. `require_program(test, "debootstrap", "apt-get
/// install debootstrap")`.
pub fn require_program(test: &str, name: &str, install: &str) -> bool {
    require(on_path(name), test, name, install)
}

/// A file at a fixed path, e.g. the static busybox the Docker tests copy into images.
pub fn require_file(test: &str, path: &str, what: &str, install: &str) -> bool {
    require(
        Path::new(path).is_file(),
        test,
        &format!("{what} at {path}"),
        install,
    )
}

/// Whether `cargo <subcommand> --version` runs (cargo as the test was started with).
pub fn cargo_has(subcommand: &str) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    Command::new("timeout")
        .args(["-k", "5", "60", &cargo, subcommand, "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A cargo subcommand, e.g. `cargo deb`.
pub fn require_cargo_subcommand(test: &str, subcommand: &str, install: &str) -> bool {
    require(
        cargo_has(subcommand),
        test,
        &format!("cargo {subcommand}"),
        install,
    )
}

/// Whether a Docker engine answers `docker info` within 60 s.
pub fn docker_engine_runs() -> bool {
    Command::new("timeout")
        .args([
            "-k",
            "5",
            "60",
            "docker",
            "info",
            "--format",
            "{{.ServerVersion}}",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Docker test's extras: a running engine and, with `busybox`, the host's static
/// busybox (`path`) the test image is built from. `GANTRY_SKIP_DOCKER_TESTS=1` skips
/// when one is missing, even under `GANTRY_REQUIRE_ALL_TESTS=1`.
pub fn require_docker(test: &str, busybox: Option<&str>) -> bool {
    if let Some(path) = busybox {
        if !Path::new(path).is_file() {
            return missing(
                test,
                &format!("busybox-static at {path}"),
                INSTALL_BUSYBOX,
                Some(SKIP_DOCKER),
            );
        }
    }
    docker_engine_runs()
        || missing(
            test,
            "a running Docker engine",
            INSTALL_DOCKER,
            Some(SKIP_DOCKER),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_on_path_is_found_and_a_made_up_one_is_not() {
        assert!(on_path("sh"));
        assert!(!on_path("gantry-no-such-program-9f3c"));
    }
}
