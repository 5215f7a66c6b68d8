//! End-to-end tests of reuse in pipeline files: YAML merge keys, template jobs with
//! `extends:` and `include:` of other files of the tree, through the real `gantry
//! validate`, `gantry run` (a local directory) and `gantry run --repo` (a commit, whose
//! included files come from the same commit).

use std::fmt::Write as _;
use std::path::Path;

use gantry_tests::{Coordinator, DEADLINE};

/// The top file: a GitLab-style anchor at the top level merged into a job, templates
/// from an included file, and a job of the included file.
const TOP: &str = r#"include: ci/templates.yml
.defaults: &defaults
  timeout: 5m
  env: { FROM_ANCHOR: anchored, OWN: own }
jobs:
  test:
    <<: *defaults
    extends: .node
    needs: lint
    steps:
      - run: echo "test node=$NODE_FLAVOUR anchor=$FROM_ANCHOR own=$OWN shared=$SHARED"
"#;

const TEMPLATES: &str = r#"include: ci/shared.yml
jobs:
  .base:
    env: { NODE_FLAVOUR: base, SHARED_BY: base }
  .node:
    extends: .base
    env: { NODE_FLAVOUR: twenty }
  lint:
    extends: .node
    steps: [{ run: echo "lint node=$NODE_FLAVOUR by=$SHARED_BY" }]
"#;

const SHARED: &str = "env: { SHARED: yes-shared }\n";

fn write(root: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
}

#[test]
fn a_pipeline_split_over_files_validates_runs_and_keeps_its_files_for_a_retry() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let tree = tempfile::tempdir().expect("tempdir");
    write(
        tree.path(),
        &[
            ("gantry.yml", TOP),
            ("ci/templates.yml", TEMPLATES),
            ("ci/shared.yml", SHARED),
        ],
    );
    let top = tree.path().join("gantry.yml");
    let top = top.to_str().expect("utf8");

    let out = c.gantry(&["validate", top]).expect_code(0);
    assert!(
        out.stdout.contains("gantry.yml: valid, 2 jobs: lint, test"),
        "{}",
        out.stdout
    );

    let out = c.gantry(&["run", top, "--follow"]).expect_code(0);
    assert!(out.stdout.contains("run 1 succeeded"), "{}", out.stdout);
    let lint = c.logs("1.0");
    assert!(
        lint.contains("lint node=twenty by=base"),
        "the included file's job, its template chain and the env of a file it includes: {lint}"
    );
    let test = c.logs("1.1");
    assert!(
        test.contains("test node=twenty anchor=anchored own=own shared=yes-shared"),
        "merge key, template from an included file and the job's own env together: {test}"
    );

    // The run keeps the files as they were: with the included files gone from the tree,
    // a retry still runs the same pipeline.
    std::fs::remove_dir_all(tree.path().join("ci")).expect("rm");
    let retried = c
        .gantry(&["pipelines", "retry", "1", "--json"])
        .expect_code(0)
        .json();
    let run = retried["run"].as_u64().expect("run number");
    let view = c.wait_run(run, DEADLINE);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert!(c
        .logs(&format!("{run}.1"))
        .contains("test node=twenty anchor=anchored own=own shared=yes-shared"));

    // And now that they are gone, validate and run say which include cannot be read,
    // where it is written.
    let out = c.gantry(&["validate", top]).expect_code(2);
    assert!(
        out.stderr
            .contains("gantry.yml:1:10: cannot read ci/templates.yml:"),
        "{}",
        out.stderr
    );
    c.gantry(&["run", top]).expect_code(2);
}

#[test]
fn a_called_pipeline_from_another_file_runs_under_the_caller_s_name() {
    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let tree = tempfile::tempdir().expect("tempdir");
    write(
        tree.path(),
        &[
            (
                "gantry.yml",
                "jobs:\n  build: { steps: [{ run: echo built }] }\n  deploy-eu:\n    uses: ci/deploy.yml\n    needs: build\n    with: { region: eu }\n",
            ),
            (
                "ci/deploy.yml",
                "on:\n  call: {}\n  inputs:\n    region: { type: choice, options: [eu, us], required: true }\njobs:\n  plan: { steps: [{ run: \"echo planning ${{ inputs.region }}\" }] }\n",
            ),
        ],
    );
    let top = tree.path().join("gantry.yml");
    let out = c
        .gantry(&["run", top.to_str().expect("utf8"), "--follow"])
        .expect_code(0);
    assert!(out.stdout.contains("run 1 succeeded"), "{}", out.stdout);
    assert!(out.stdout.contains("deploy-eu/plan"), "{}", out.stdout);
    assert!(c.logs("1.1").contains("planning eu"), "{}", c.logs("1.1"));
}

#[test]
fn mistakes_in_reuse_are_refused_at_their_file_line_and_column() {
    let c = Coordinator::start();
    let tree = tempfile::tempdir().expect("tempdir");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            // An error inside an included file names that file.
            &[
                ("gantry.yml", "include: ci/a.yml\njobs:\n  j: { extends: .a, steps: [{ run: x }] }\n"),
                ("ci/a.yml", "jobs:\n  .a:\n    retry: 99\n"),
            ],
            "ci/a.yml:3:12: retry is 99; the most is 10",
        ),
        (
            &[("gantry.yml", "include: ../outside.yml\njobs: { j: { steps: [{ run: x }] } }\n")],
            "gantry.yml:1:10: path \"../outside.yml\" must stay in the repository",
        ),
        (
            &[
                ("gantry.yml", "include: ci/a.yml\njobs: { j: { steps: [{ run: x }] } }\n"),
                ("ci/a.yml", "include: ci/b.yml\n"),
                ("ci/b.yml", "include: gantry.yml\n"),
            ],
            "ci/b.yml:1:10: includes form a cycle: gantry.yml -> ci/a.yml -> ci/b.yml -> gantry.yml",
        ),
        (
            &[(
                "gantry.yml",
                "jobs:\n  .a: { extends: .b }\n  .b: { extends: .a }\n  j: { extends: .a, steps: [{ run: x }] }\n",
            )],
            "gantry.yml:3:18: extends form a cycle: .a -> .b -> .a",
        ),
        (
            &[("gantry.yml", "jobs:\n  j: { extends: .nowhere, steps: [{ run: x }] }\n")],
            "gantry.yml:2:17: extends names \".nowhere\", which is not a template",
        ),
        (
            &[("gantry.yml", "jobs:\n  j:\n    <<: 3\n    steps: [{ run: x }]\n")],
            "gantry.yml:3:9: a merge key (<<) takes a mapping",
        ),
    ];
    for (i, (files, wanted)) in cases.iter().enumerate() {
        let dir = tree.path().join(format!("case{i}"));
        write(&dir, files);
        let top = dir.join("gantry.yml");
        let out = c
            .gantry(&["validate", top.to_str().expect("utf8")])
            .expect_code(2);
        assert!(
            out.stderr.contains(wanted),
            "wanted {wanted:?}, got:\n{}",
            out.stderr
        );
    }
    // A billion laughs through anchors and merge keys is refused, not expanded.
    let mut bomb = String::from(".l0: &l0 { a: x, b: x, c: x, d: x, e: x, f: x, g: x, h: x }\n");
    for level in 1..10 {
        let aliases: Vec<String> = (0..10).map(|i| format!("k{i}: *l{}", level - 1)).collect();
        writeln!(
            bomb,
            ".l{level}: &l{level} {{ <<: *l{}, {} }}",
            level - 1,
            aliases.join(", ")
        )
        .expect("writing to a String cannot fail");
    }
    bomb.push_str("jobs: { a: { <<: *l9, steps: [{ run: x }] } }\n");
    let dir = tree.path().join("bomb");
    write(&dir, &[("gantry.yml", &bomb)]);
    let out = c
        .gantry(&["validate", dir.join("gantry.yml").to_str().expect("utf8")])
        .expect_code(2);
    assert!(out.stderr.contains("YAML nodes"), "{}", out.stderr);
}

#[test]
fn a_repository_run_includes_files_from_the_commit_it_builds() {
    let upstream = tempfile::tempdir().expect("tempdir");
    let repo = upstream.path().join("app");
    std::fs::create_dir(&repo).expect("mkdir");
    let git = |args: &[&str]| gantry_tests::git(&repo, args);
    git(&["init", "--quiet", "--initial-branch=main"]);
    write(
        &repo,
        &[
            ("gantry.yml", TOP),
            ("ci/templates.yml", TEMPLATES),
            ("ci/shared.yml", SHARED),
        ],
    );
    git(&["add", "--all"]);
    git(&["commit", "--quiet", "-m", "first"]);

    let c = Coordinator::start();
    let _agents = c.agents_running(1, &[]);
    let url = format!("file://{}", repo.display());
    c.gantry(&["repos", "add", "app", "--url", &url])
        .expect_code(0);
    let run_repo = || {
        let started = c
            .gantry(&["run", "--repo", "app", "--json"])
            .expect_code(0)
            .json();
        let run = started["run"].as_u64().expect("run number");
        let view = c.wait_run(run, DEADLINE);
        assert_eq!(view["state"], "succeeded", "{view}");
        c.logs(&format!("{run}.1"))
    };
    let log = run_repo();
    assert!(
        log.contains("test node=twenty anchor=anchored own=own shared=yes-shared"),
        "{log}"
    );

    // A commit that changes only an included file: the next run reads it from that commit.
    write(&repo, &[("ci/shared.yml", "env: { SHARED: changed }\n")]);
    git(&["commit", "--quiet", "--all", "-m", "second"]);
    let log = run_repo();
    assert!(
        log.contains("test node=twenty anchor=anchored own=own shared=changed"),
        "{log}"
    );

    // A commit whose included file is broken is refused with that file's position.
    write(&repo, &[("ci/shared.yml", "env: [not, a, mapping]\n")]);
    git(&["commit", "--quiet", "--all", "-m", "broken"]);
    let out = c.gantry(&["run", "--repo", "app"]).expect_code(2);
    assert!(out.stderr.contains("ci/shared.yml:1:6:"), "{}", out.stderr);
}
