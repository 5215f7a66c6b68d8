//! End-to-end tests of outputs through the real binaries: a step writes
//! `$GANTRY_OUTPUT`, its job's `outputs:` reach the coordinator with the result, later
//! jobs get them filled into `env`, `run`, step conditions and their own `if:`, `gantry jobs show` prints
//! them, a malformed file fails its step with the line, and a value derived from a
//! secret is masked everywhere (never stored in plain text).

use gantry_tests::{files_under, job_named, Coordinator, DEADLINE};

const SECRET: &str = "0utput-s3cret-value";

#[test]
fn a_version_flows_from_build_to_a_later_job_and_secret_outputs_stay_masked() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    c.set_secret("API_TOKEN", SECRET);
    let yaml = r#"
jobs:
  build:
    outputs:
      version: ${{ steps.v.outputs.version }}
      notes: ${{ steps.v.outputs.notes }}
      derived: ${{ steps.v.outputs.token }}
    steps:
      - id: v
        run: |
          echo "version=1.4.2" >> "$GANTRY_OUTPUT"
          printf 'notes<<EOF\nfirst line\nsecond line\nEOF\n' >> "$GANTRY_OUTPUT"
          echo "token=key-${{ secrets.API_TOKEN }}" >> "$GANTRY_OUTPUT"
      - run: echo "in-job ${{ steps.v.outputs.version }}"
  deploy:
    needs: build
    env:
      VERSION: ${{ needs.build.outputs.version }}
    steps:
      - run: echo "deploying $VERSION as ${{ needs.build.outputs.version }} derived=[${{ needs.build.outputs.derived }}]"
      - run: echo only-for-1.4.2
        if: needs.build.outputs.version == '1.4.2'
      - run: echo never-for-9
        if: needs.build.outputs.version == '9'
  malformed:
    steps:
      - run: echo 'this is not an output' >> "$GANTRY_OUTPUT"
  release:
    needs: build
    if: needs.build.outputs.version == '1.4.2'
    steps: [{ run: echo releasing }]
  hotfix:
    needs: build
    if: needs.build.outputs.version == '9'
    steps: [{ run: echo never }]
"#;
    let run = c.run_pipeline(yaml, &[]);
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(job_named(&view, "build")["state"], "succeeded", "{view}");
    assert_eq!(job_named(&view, "deploy")["state"], "succeeded", "{view}");
    assert!(c.logs(&format!("{run}.0")).contains("in-job 1.4.2\n"));
    let deploy = c.logs(&format!("{run}.1"));
    assert!(
        deploy.contains("deploying 1.4.2 as 1.4.2 derived=[key-***]"),
        "{deploy}"
    );
    assert!(deploy.contains("only-for-1.4.2\n"), "{deploy}");
    assert!(!deploy.contains("never-for-9\n"), "{deploy}");
    // A job's own if: compares its needs' outputs once they are reported.
    assert_eq!(job_named(&view, "release")["state"], "succeeded", "{view}");
    assert_eq!(job_named(&view, "hotfix")["state"], "skipped", "{view}");

    let shown = c
        .gantry(&["jobs", "show", &format!("{run}.0"), "--json"])
        .expect_code(0)
        .json();
    assert_eq!(shown["outputs"]["version"], "1.4.2", "{shown}");
    assert_eq!(
        shown["outputs"]["notes"], "first line\nsecond line",
        "{shown}"
    );
    assert_eq!(shown["outputs"]["derived"], "key-***", "{shown}");
    let text = c
        .gantry(&["jobs", "show", &format!("{run}.0")])
        .expect_code(0)
        .stdout;
    assert!(text.contains("  version = 1.4.2\n"), "{text}");
    assert!(
        text.contains("  notes =\n    first line\n    second line\n"),
        "{text}"
    );

    let malformed = job_named(&view, "malformed");
    assert_eq!(malformed["state"], "failed", "{view}");
    let log = c.logs(&format!("{run}.2"));
    assert!(
        log.contains("$GANTRY_OUTPUT line 1: expected NAME=VALUE or NAME<<DELIMITER, found `this is not an output`"),
        "{log}"
    );
    // The secret never reaches the coordinator's disk, through outputs or otherwise.
    for file in files_under(&c.data_dir()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "secret in plain text in {}",
            file.display()
        );
    }
}
