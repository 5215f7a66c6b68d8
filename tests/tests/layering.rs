//! The layering check over the workspace: every crate with a `layers.toml` (see
//! `gantry_tests::layering` for its format and rules) imports only downward, has no
//! import cycle inside a layer, and declares every file. CI runs this with the other
//! tests; it prints each crate's layers and how many exceptions remain.

use std::path::{Path, PathBuf};

use gantry_tests::layering::{check_crate, crates_with_layers, Violation};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Crates that must keep a layer table: deleting one must not silently turn its check off.
const REQUIRED: &[&str] = &["agent", "coordinator"];

#[test]
fn every_crate_with_a_layer_table_imports_only_downward() {
    let crates = crates_with_layers(&workspace()).expect("list the workspace");
    let names: Vec<String> = crates
        .iter()
        .filter_map(|dir| dir.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    println!("layering: checking {}", names.join(", "));
    for required in REQUIRED {
        assert!(
            names.iter().any(|name| name == required),
            "{required}/layers.toml is missing: the layering check needs it"
        );
    }
    let mut failures = Vec::new();
    for dir in &crates {
        let report = check_crate(dir).unwrap_or_else(|e| panic!("{e}"));
        print!("{report}");
        if !report.is_clean() {
            failures.push(report.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "the layering check failed:\n{}",
        failures.join("\n")
    );
}

/// Copies `files` and `src/` of `from` into `to`.
fn copy_crate(from: &Path, to: &Path) {
    for file in ["Cargo.toml", "layers.toml"] {
        std::fs::copy(from.join(file), to.join(file)).expect("copy crate file");
    }
    copy_tree(&from.join("src"), &to.join("src"));
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The file of the first module the bottom layer of `crate_dir` declares.
fn bottom_file(crate_dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(crate_dir.join("layers.toml")).expect("layers.toml");
    let table: toml::Table = toml::from_str(&text).expect("layers.toml parses");
    let module = table["layers"][0]["modules"][0]
        .as_str()
        .expect("a module name")
        .to_owned();
    let src = crate_dir.join("src");
    match module.as_str() {
        "crate" => return src.join("lib.rs"),
        "main" => return src.join("main.rs"),
        _ => {}
    }
    let relative: PathBuf = module.split("::").collect();
    [
        src.join(&relative).with_extension("rs"),
        src.join(&relative).join("mod.rs"),
    ]
    .into_iter()
    .find(|path| path.is_file())
    .unwrap_or_else(|| panic!("no file for the bottom module {module}"))
}

/// Plants `import` at the end of the bottom module of a copy of `crate_name` and
/// checks that the report names it, at its line, as an upward import of `to`.
fn planted_upward_import_is_named(crate_name: &str, import: &str, to: &str) {
    let copy = tempfile::tempdir().expect("tempdir");
    copy_crate(&workspace().join(crate_name), copy.path());
    let bottom = bottom_file(copy.path());
    let mut text = std::fs::read_to_string(&bottom).expect("read the bottom module");
    text.push('\n');
    text.push_str(import);
    text.push('\n');
    let planted_line = text.lines().count();
    std::fs::write(&bottom, text).expect("plant the import");

    let report = check_crate(copy.path()).expect("check runs");
    let planted: Vec<&Violation> = report
        .violations
        .iter()
        .filter(|v| {
            matches!(v, Violation::Upward { line, to_module, .. }
            if *line == planted_line && to_module.starts_with(to))
        })
        .collect();
    assert_eq!(planted.len(), 1, "{report}");
    println!("{}", planted[0]);
}

/// The check on the real agent fails the moment a module of its bottom layer imports
/// the session (the top one).
#[test]
fn a_planted_upward_import_in_the_agent_fails() {
    planted_upward_import_is_named("agent", "use crate::session::Planted;", "session");
}

/// The check on the real coordinator fails the moment the server side imports the admin
/// CLI: a planted import of it in the store (the bottom layer) is named, with its line.
#[test]
fn a_planted_import_of_the_cli_in_the_coordinator_fails() {
    planted_upward_import_is_named("coordinator", "use crate::cli::failure::Failure;", "cli");
}
