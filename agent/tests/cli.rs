//! The real `gantry-agent` binary's command-line contract: exit codes, messages, and that
//! a failed command leaves nothing behind. Building this test also makes
//! `cargo test --workspace` build the binary the end-to-end tests drive.

use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str], data_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-agent"))
        .args(args)
        .env("GANTRY_AGENT_DATA_DIR", data_dir)
        .env_remove("GANTRY_LOG")
        .output()
        .expect("run gantry-agent")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn enroll_with_a_malformed_token_exits_2_names_the_problem_and_writes_nothing() {
    let parent = tempfile::tempdir().expect("tempdir");
    let data_dir = parent.path().join("agent");
    let out = agent(&["enroll", "--token", "not-a-token"], &data_dir);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("malformed join token"), "{err}");
    assert!(err.contains("does not start with \"gjt1_\""), "{err}");
    assert!(
        !data_dir.exists(),
        "a refused enrollment must not create the data directory"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn run_without_an_enrollment_exits_2_saying_so() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let out = agent(&["run"], data_dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not enrolled: run gantry-agent enroll --token ... first"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(data_dir.path())
            .expect("read dir")
            .count(),
        0,
        "run must not write anything"
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let out = agent(&["run", "--label", "no-equals-sign"], data_dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not KEY=VALUE"),
        "{}",
        stderr(&out)
    );
    let out = agent(&["run", "--max-backoff", "soon"], data_dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid duration"),
        "{}",
        stderr(&out)
    );
}
