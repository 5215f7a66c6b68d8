//! Every `*.yml` under the repository's `examples/` directory must parse.

use std::path::Path;

#[test]
fn examples_parse() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!(
            "no examples directory at {}; nothing to check",
            dir.display()
        );
        return;
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for entry in entries {
        let path = entry.expect("readable examples directory").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable example");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("example.yml");
        checked += 1;
        if let Err(errors) = gantry_pipeline::parse(name, &text) {
            failures.push(errors.to_string());
        }
    }
    eprintln!("checked {checked} examples");
    assert!(
        failures.is_empty(),
        "examples that do not parse:\n{}",
        failures.join("\n")
    );
}
