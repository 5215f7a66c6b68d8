//! The `gantry` binary's handling of bad command lines and missing state, before any
//! network is involved. (These also make `cargo test --workspace` build the binary, which
//! the end-to-end tests in `tests/` drive.)

use std::process::Command;

fn gantry(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(args)
        .env("GANTRY_CONFIG", config)
        .output()
        .expect("run gantry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn admin_commands_without_a_context_exit_2_and_say_how_to_get_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, err) = gantry(&["agents", "list"], &dir.path().join("missing.toml"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot read the admin context") && err.contains("gantry init"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_usage_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = dir.path().join("ctx.toml");
    let cases: &[(&[&str], &str)] = &[
        (&["token", "create", "--ttl", "soon"], "invalid duration"),
        (
            &["token", "create", "--label", "Bad Key=x"],
            "invalid label",
        ),
        (&["agents", "show", "not-an-id"], "invalid AgentId"),
        (
            &["agents", "label", "ag-000000000000", "novalue"],
            "expected key=value",
        ),
        (
            &["init", "--data-dir", "/tmp/x", "--listen", "nowhere"],
            "is not ip:port",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expect) in cases {
        let (code, _, err) = gantry(args, &ctx);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
    }
}

#[test]
fn init_refuses_to_overwrite_an_existing_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let ctx = dir.path().join("ctx").join("context.toml");
    let data_arg = data.to_str().expect("utf8");
    let (code, out, err) = gantry(
        &["init", "--data-dir", data_arg, "--listen", "127.0.0.1:7443"],
        &ctx,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("CA fingerprint  sha256:"), "{out}");
    let ca_before = std::fs::read(data.join("tls").join("ca.pem")).expect("ca");
    let (code, _, err) = gantry(
        &["init", "--data-dir", data_arg, "--listen", "127.0.0.1:7443"],
        &ctx,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already initialized"), "{err}");
    assert_eq!(
        std::fs::read(data.join("tls").join("ca.pem")).expect("ca"),
        ca_before,
        "the CA was not replaced"
    );
}

#[test]
fn server_without_an_initialized_data_dir_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, err) = gantry(
        &["server", "--data-dir", dir.path().to_str().expect("utf8")],
        &dir.path().join("c.toml"),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("run `gantry init"), "{err}");
}
