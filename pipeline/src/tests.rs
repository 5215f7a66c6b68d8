//! Data-driven tests of `parse`: fixture strings in, model or positioned errors out.

use std::collections::BTreeMap;

use crate::{parse, referenced_secrets, Condition, Pipeline, StaticContext, StatusExpr};

const FULL: &str = r#"name: demo
priority: 5
env: { K: v }
on:
  push: { branches: [main, "release/*"], tags: ["v*"], paths: ["src/**"] }
  schedule: [{ cron: "0 3 * * *" }]
  manual: {}
  inputs: { target: { default: "x86_64" } }
jobs:
  lint:
    runs-on: { os: linux }
    steps:
      - run: cargo fmt --check
        name: fmt
        working-directory: sub
        env: { A: b }
  test:
    needs: [lint]
    strategy:
      matrix:
        os: [linux, mac]
        rust: ["1.80", "1.81"]
        include: [{ os: linux, rust: nightly }]
        exclude: [{ os: mac, rust: "1.80" }]
    runs-on: { os: "${{ matrix.os }}" }
    timeout: 30m
    retry: 2
    continue-on-error: false
    env: { RUST: "${{ matrix.rust }}" }
    image: rust:1.80
    steps: [{ run: "cargo +${{ matrix.rust }} test --token ${{ secrets.TOKEN }}" }]
  deploy:
    needs: test
    if: success() && branch == 'main'
    when: manual
    steps:
      - run: |
          ./deploy.sh ${{ inputs.target }}
          echo ${{ secrets.DEPLOY_KEY }} ${{ env.K }}
"#;

fn ok(text: &str) -> Pipeline {
    match parse("gantry.yml", text) {
        Ok(pipeline) => pipeline,
        Err(errors) => panic!("expected a valid pipeline, got:\n{errors}"),
    }
}

#[test]
fn full_example() {
    let p = ok(FULL);
    assert_eq!(p.name, "demo");
    assert_eq!(p.priority, 5);
    assert_eq!(p.env["K"], "v");
    let push = p.triggers.push.as_ref().expect("push filter");
    assert_eq!(push.branches, ["main", "release/*"]);
    assert_eq!(push.tags, ["v*"]);
    assert_eq!(push.paths, ["src/**"]);
    assert_eq!(p.triggers.schedules.len(), 1);
    assert_eq!(p.triggers.schedules[0].expression, "0 3 * * *");
    assert_eq!(
        p.triggers.inputs["target"].default.as_deref(),
        Some("x86_64")
    );

    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lint",
            "test (linux, 1.80)",
            "test (linux, 1.81)",
            "test (mac, 1.81)",
            "test (linux, nightly)",
            "deploy"
        ]
    );
    let lint = p.job("lint").expect("lint");
    assert_eq!(lint.runs_on["os"], "linux");
    assert_eq!(lint.steps[0].name.as_deref(), Some("fmt"));
    assert_eq!(lint.steps[0].working_directory.as_deref(), Some("sub"));
    assert_eq!(lint.steps[0].env["A"], "b");
    assert_eq!(lint.timeout_ms, 3_600_000);
    assert_eq!(lint.retry, 0);
    assert_eq!(lint.condition, Condition::Success);
    assert!(!lint.manual);

    let mac = p.job("test (mac, 1.81)").expect("mac");
    assert_eq!(mac.key, "test");
    assert_eq!(mac.needs, ["lint"]);
    assert_eq!(mac.runs_on["os"], "mac");
    assert_eq!(mac.env["RUST"], "1.81");
    assert_eq!(mac.timeout_ms, 30 * 60_000);
    assert_eq!(mac.retry, 2);
    assert_eq!(
        mac.image.as_ref().map(|i| i.name.as_str()),
        Some("rust:1.80")
    );
    assert_eq!(
        mac.steps[0].run,
        "cargo +1.81 test --token ${{ secrets.TOKEN }}"
    );
    assert_eq!(
        mac.matrix,
        BTreeMap::from([("os".into(), "mac".into()), ("rust".into(), "1.81".into())])
    );

    let deploy = p.job("deploy").expect("deploy");
    assert!(deploy.manual);
    assert_eq!(
        deploy.needs,
        [
            "test (linux, 1.80)",
            "test (linux, 1.81)",
            "test (mac, 1.81)",
            "test (linux, nightly)"
        ]
    );
    assert!(deploy.steps[0].run.contains("${{ inputs.target }}"));
    assert!(deploy.steps[0].run.contains("${{ env.K }}"));
    let secrets: Vec<String> = referenced_secrets(deploy).into_iter().collect();
    assert_eq!(secrets, ["DEPLOY_KEY"]);
    assert_eq!(
        referenced_secrets(mac).into_iter().collect::<Vec<_>>(),
        ["TOKEN"]
    );

    let main = StaticContext {
        branch: "main".into(),
        event: "push".into(),
        ..StaticContext::default()
    };
    assert_eq!(
        deploy.condition.fold(&main, &deploy.matrix),
        StatusExpr::Success
    );
    let dev = StaticContext {
        branch: "dev".into(),
        ..main
    };
    assert_eq!(
        deploy.condition.fold(&dev, &deploy.matrix),
        StatusExpr::Const(false)
    );

    let order: Vec<&str> = p
        .topological_order()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, names);

    // The model round-trips through serde.
    let json = serde_json::to_string(&p).expect("serialize");
    let back: Pipeline = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, p);
}

#[test]
fn defaults_and_alternate_forms() {
    let p = match parse(
        "ci/build.yaml",
        "jobs:\n  b:\n    runs-on: [\"os=linux\", \"arch=x86_64\"]\n    matrix: { n: [1, 2] }\n    steps:\n      - run: echo ${{ matrix.n }}\n  a:\n    needs: b\n    if: ${{ always() }}\n    steps: [{ run: x }]\n",
    ) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(p.name, "build");
    assert_eq!(p.priority, 0);
    assert!(p.triggers.push.is_none());
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["b (1)", "b (2)", "a"]);
    assert_eq!(p.jobs[0].runs_on["arch"], "x86_64");
    assert_eq!(p.jobs[1].steps[0].run, "echo 2");
    assert_eq!(p.jobs[2].condition, Condition::Always);
    assert_eq!(p.jobs[2].needs, ["b (1)", "b (2)"]);
}

#[test]
fn trigger_shorthands() {
    let p = ok("on: push\njobs: { a: { steps: [{ run: x }] } }\n");
    assert_eq!(p.triggers.push, Some(crate::PushFilter::default()));
    let p = ok("on: [push, manual]\njobs: { a: { steps: [{ run: x }] } }\n");
    assert!(p.triggers.push.is_some());
    let p = ok("on: { manual: { inputs: { level: {} } } }\njobs: { a: { steps: [{ run: x }] } }\n");
    assert_eq!(p.triggers.inputs["level"].default, None);
    assert!(p.triggers.push.is_none());
}

#[test]
fn topological_order_follows_needs() {
    let p = ok("jobs:\n  c: { needs: [a, b], steps: [{ run: x }] }\n  b: { needs: a, steps: [{ run: x }] }\n  a: { steps: [{ run: x }] }\n");
    let order: Vec<&str> = p
        .topological_order()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["a", "b", "c"]);
}

#[test]
fn matrix_expansion_counts() {
    let cases: &[(&str, &[&str])] = &[
        (
            "{ a: [1, 2], b: [x, y] }",
            &["j (1, x)", "j (1, y)", "j (2, x)", "j (2, y)"],
        ),
        ("{ a: [1, 2], exclude: [{ a: 1 }] }", &["j (2)"]),
        // An include that agrees with existing combinations extends them.
        (
            "{ a: [1, 2], include: [{ a: 1, extra: e }] }",
            &["j (1, e)", "j (2)"],
        ),
        // An include with no match in the original values is a combination of its own.
        (
            "{ a: [1, 2], include: [{ a: 3 }] }",
            &["j (1)", "j (2)", "j (3)"],
        ),
        // Include alone.
        (
            "{ include: [{ a: 1 }, { a: 2, b: 3 }] }",
            &["j (1)", "j (2, 3)"],
        ),
    ];
    for (matrix, want) in cases {
        let text = format!("jobs:\n  j:\n    matrix: {matrix}\n    steps: [{{ run: x }}]\n");
        let p = ok(&text);
        let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(&names, want, "{matrix}");
    }
    // 16 x 16 = 256 is the most.
    let values: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let p = ok(&format!(
        "jobs:\n  j:\n    matrix: {{ a: [{list}], b: [{list}] }}\n    steps: [{{ run: x }}]\n"
    ));
    assert_eq!(p.jobs.len(), 256);
}

/// (name, fixture, line, column, message substring)
const BAD: &[(&str, &str, usize, usize, &str)] = &[
    (
        "malformed yaml",
        "jobs:\n  a: [1, 2\n",
        3,
        1,
        "invalid YAML",
    ),
    (
        "empty file",
        "",
        1,
        1,
        "the file is empty",
    ),
    (
        "not a mapping",
        "- a\n- b\n",
        1,
        1,
        "must be a mapping with a jobs key",
    ),
    (
        "unknown top key",
        "jobz: {}\n",
        1,
        1,
        "unknown key \"jobz\" in the pipeline; allowed keys are: name, priority, env, on, environments, jobs",
    ),
    (
        "unknown job key",
        "jobs:\n  a:\n    stepz: []\n    steps: [{ run: x }]\n",
        3,
        5,
        "unknown key \"stepz\" in job a; allowed keys are: runs-on, steps",
    ),
    (
        "unknown step key",
        "jobs:\n  a:\n    steps:\n      - uses: actions/checkout@v4\n",
        4,
        9,
        "unknown key \"uses\" in a step; allowed keys are: run, name, working-directory, env",
    ),
    (
        "duplicate key",
        "jobs:\n  a: { steps: [{ run: x }] }\n  a: { steps: [{ run: y }] }\n",
        3,
        3,
        "duplicate key \"a\" in jobs",
    ),
    (
        "missing jobs",
        "name: x\n",
        1,
        1,
        "the pipeline has no jobs key",
    ),
    (
        "empty jobs",
        "jobs: {}\n",
        1,
        7,
        "jobs is empty",
    ),
    (
        "wrong type for jobs",
        "jobs: [a]\n",
        1,
        7,
        "jobs must be a mapping, found a list",
    ),
    (
        "wrong type for priority",
        "priority: high\njobs: { a: { steps: [{ run: x }] } }\n",
        1,
        11,
        "priority must be an integer",
    ),
    (
        "wrong type for run",
        "jobs:\n  a:\n    steps: [{ run: [x] }]\n",
        3,
        20,
        "run must be a string, found a list",
    ),
    (
        "wrong type for continue-on-error",
        "jobs:\n  a:\n    continue-on-error: maybe\n    steps: [{ run: x }]\n",
        3,
        24,
        "continue-on-error must be true or false",
    ),
    (
        "job without steps key",
        "jobs:\n  a:\n    runs-on: { os: linux }\n",
        2,
        3,
        "job a has no steps",
    ),
    (
        "job with empty steps",
        "jobs:\n  a:\n    steps: []\n",
        3,
        12,
        "job a has no steps",
    ),
    (
        "step without run",
        "jobs:\n  a:\n    steps:\n      - name: x\n",
        4,
        9,
        "a step needs run",
    ),
    (
        "needs a missing job",
        "jobs:\n  build: { steps: [{ run: x }] }\n  lint: { steps: [{ run: x }] }\n  test:\n    needs: [lint, buld]\n    steps: [{ run: x }]\n",
        5,
        19,
        "needs names \"buld\", which is not a job; jobs are: build, lint, test",
    ),
    (
        "needs cycle",
        "jobs:\n  a:\n    needs: b\n    steps: [{ run: x }]\n  b:\n    needs: [a]\n    steps: [{ run: x }]\n",
        6,
        13,
        "needs form a cycle: a -> b -> a",
    ),
    (
        "needs itself",
        "jobs:\n  a:\n    needs: a\n    steps: [{ run: x }]\n",
        3,
        12,
        "needs form a cycle: a -> a",
    ),
    (
        "duplicate expanded names",
        "jobs:\n  t:\n    matrix: { v: [x, x] }\n    steps: [{ run: x }]\n",
        2,
        3,
        "job name \"t (x)\" is produced twice",
    ),
    (
        "bad duration",
        "jobs:\n  a:\n    timeout: 30 minutes\n    steps: [{ run: x }]\n",
        3,
        14,
        "timeout \"30 minutes\" is not a duration",
    ),
    (
        "duration without unit",
        "jobs:\n  a:\n    timeout: 30\n    steps: [{ run: x }]\n",
        3,
        14,
        "is not a duration",
    ),
    (
        "retry too large",
        "jobs:\n  a:\n    retry: 11\n    steps: [{ run: x }]\n",
        3,
        12,
        "retry is 11; the most is 10",
    ),
    (
        "working-directory escapes",
        "jobs:\n  a:\n    steps:\n      - run: x\n        working-directory: ../up\n",
        5,
        28,
        "working-directory \"../up\" must be a relative path inside the workspace",
    ),
    (
        "working-directory absolute",
        "jobs:\n  a:\n    steps:\n      - run: x\n        working-directory: /etc\n",
        5,
        28,
        "must be a relative path",
    ),
    (
        "bad label key",
        "jobs:\n  a:\n    runs-on: { OS: linux }\n    steps: [{ run: x }]\n",
        3,
        16,
        "label key \"OS\" must be 1-63 characters",
    ),
    (
        "bad label list entry",
        "jobs:\n  a:\n    runs-on: [ubuntu-latest]\n    steps: [{ run: x }]\n",
        3,
        15,
        "runs-on \"ubuntu-latest\" names a GitHub-hosted runner; Gantry runs jobs on your agents",
    ),
    (
        "bad condition syntax",
        "jobs:\n  a:\n    if: success() &&& failure()\n    steps: [{ run: x }]\n",
        3,
        21,
        "invalid if expression: unexpected character '&'",
    ),
    (
        "bad condition name",
        "jobs:\n  a:\n    if: \"github.ref == 'x'\"\n    steps: [{ run: x }]\n",
        3,
        9,
        "invalid if expression: `github.ref`: github.* is GitHub Actions' context; Gantry's are git.* (commit, ref, branch, tag, repo) and event.* (name, actor, pr_number, pr_base) (github.ref is git.ref)",
    ),
    (
        "condition on unknown matrix key",
        "jobs:\n  a:\n    matrix: { os: [linux] }\n    if: matrix.arch == 'x'\n    steps: [{ run: x }]\n",
        4,
        9,
        "unknown matrix key \"arch\"; matrix keys are: os",
    ),
    (
        "unknown matrix key in step",
        "jobs:\n  a:\n    matrix: { os: [linux] }\n    steps:\n      - run: echo ${{ matrix.rust }}\n",
        5,
        14,
        "unknown matrix key \"rust\"; matrix keys are: os",
    ),
    (
        "matrix reference without matrix",
        "jobs:\n  a:\n    runs-on: { os: \"${{ matrix.os }}\" }\n    steps: [{ run: x }]\n",
        3,
        20,
        "matrix.os is used but the job has no matrix",
    ),
    (
        "matrix too large",
        "jobs:\n  a:\n    matrix:\n      a: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]\n      b: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]\n    steps: [{ run: x }]\n",
        4,
        7,
        "the matrix expands to more than 256 jobs",
    ),
    (
        "matrix expands to nothing",
        "jobs:\n  a:\n    matrix: { os: [linux], exclude: [{ os: linux }] }\n    steps: [{ run: x }]\n",
        3,
        13,
        "the matrix expands to no jobs",
    ),
    (
        "matrix exclude names unknown key",
        "jobs:\n  a:\n    matrix: { os: [linux], exclude: [{ arch: x }] }\n    steps: [{ run: x }]\n",
        3,
        38,
        "matrix exclude names \"arch\"",
    ),
    (
        "matrix both places",
        "jobs:\n  a:\n    strategy: { matrix: { os: [a] } }\n    matrix: { os: [b] }\n    steps: [{ run: x }]\n",
        4,
        13,
        "either under strategy or directly",
    ),
    (
        "bad cron",
        "on:\n  schedule:\n    - cron: \"61 * * * *\"\njobs: { a: { steps: [{ run: x }] } }\n",
        3,
        13,
        "minute \"61\" is out of range",
    ),
    (
        "bad when",
        "jobs:\n  a:\n    when: later\n    steps: [{ run: x }]\n",
        3,
        11,
        "when must be manual",
    ),
    (
        "bad job key",
        "jobs:\n  \"a b\": { steps: [{ run: x }] }\n",
        2,
        3,
        "job key \"a b\" must be",
    ),
    (
        "bad env name",
        "env: { \"A-B\": x }\njobs: { a: { steps: [{ run: x }] } }\n",
        1,
        8,
        "environment variable name \"A-B\"",
    ),
    (
        "unterminated template",
        "jobs:\n  a:\n    steps: [{ run: \"echo ${{ secrets.X\" }]\n",
        3,
        20,
        "unterminated \"${{\"",
    ),
    (
        "two documents",
        "jobs: {}\n---\njobs: {}\n",
        2,
        1,
        "one YAML document",
    ),
    (
        "unknown trigger shorthand",
        "on: [push, pull_request]\njobs: { a: { steps: [{ run: x }] } }\n",
        1,
        12,
        "unknown trigger \"pull_request\"",
    ),
    (
        "artifact path escapes",
        "jobs:\n  a:\n    artifacts: { paths: [out, ../secret] }\n    steps: [{ run: x }]\n",
        3,
        31,
        "artifacts path \"../secret\" has a \"..\" component",
    ),
    (
        "artifact path absolute",
        "jobs:\n  a:\n    artifacts: { paths: /etc }\n    steps: [{ run: x }]\n",
        3,
        25,
        "artifacts path \"/etc\" is absolute",
    ),
    (
        "artifact without paths",
        "jobs:\n  a:\n    artifacts: { name: app }\n    steps: [{ run: x }]\n",
        3,
        16,
        "artifacts needs paths",
    ),
    (
        "artifact name with a slash",
        "jobs:\n  a:\n    artifacts: { name: a/b, paths: [out] }\n    steps: [{ run: x }]\n",
        3,
        24,
        "artifact name \"a/b\" contains a /",
    ),
    (
        "artifact name twice",
        "jobs:\n  a:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n",
        6,
        24,
        "artifact name \"app\" is declared twice (also at line 3)",
    ),
    (
        "matrix artifact without matrix in its name",
        "jobs:\n  t:\n    matrix: { os: [a, b] }\n    artifacts: { name: bin, paths: [out] }\n    steps: [{ run: x }]\n",
        4,
        24,
        "artifact name \"bin\" is declared twice",
    ),
    (
        "bad expire-in",
        "jobs:\n  a:\n    artifacts: { paths: [out], expire-in: 2 weeks }\n    steps: [{ run: x }]\n",
        3,
        43,
        "expire-in \"2 weeks\" is not a duration",
    ),
    (
        "expire-in too long",
        "jobs:\n  a:\n    artifacts: { paths: [out], expire-in: 400d }\n    steps: [{ run: x }]\n",
        3,
        43,
        "expire-in must be between 1s and 365d",
    ),
    (
        "unknown artifacts key",
        "jobs:\n  a:\n    artifacts: { paths: [out], expire: 7d }\n    steps: [{ run: x }]\n",
        3,
        32,
        "unknown key \"expire\" in artifacts; allowed keys are: name, paths, expire-in, when",
    ),
    (
        "download of an unknown artifact",
        "jobs:\n  a:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  b:\n    needs: a\n    download: [ap]\n    steps: [{ run: x }]\n",
        7,
        16,
        "job b downloads artifact \"ap\", which no job declares; artifacts are: app",
    ),
    (
        "download of an artifact the job does not wait for",
        "jobs:\n  a:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  b:\n    download: [app]\n    steps: [{ run: x }]\n",
        6,
        16,
        "job b downloads artifact \"app\", made by job a, which it does not wait for; add it to needs",
    ),
    (
        "download not a list",
        "jobs:\n  a:\n    download: app\n    steps: [{ run: x }]\n",
        3,
        15,
        "download must be a list of artifact names",
    ),
    (
        "cache without key",
        "jobs:\n  a:\n    cache: { paths: [target] }\n    steps: [{ run: x }]\n",
        3,
        12,
        "cache needs a key",
    ),
    (
        "cache key with a secret",
        "jobs:\n  a:\n    cache: { key: \"k-${{ secrets.T }}\", paths: [target] }\n    steps: [{ run: x }]\n",
        3,
        19,
        "cannot be used in a cache key",
    ),
    (
        "cache key with a malformed hashFiles",
        "jobs:\n  a:\n    cache: { key: \"k-${{ hashFiles(Cargo.lock) }}\", paths: [target] }\n    steps: [{ run: x }]\n",
        3,
        19,
        "hashFiles arguments must be quoted strings",
    ),
    (
        "cache path escapes",
        "jobs:\n  a:\n    cache: { key: k, paths: [\"../../.cargo\"] }\n    steps: [{ run: x }]\n",
        3,
        30,
        "cache path \"../../.cargo\" has a \"..\" component",
    ),
    (
        "deploy of an artifact nobody makes",
        "jobs:\n  d:\n    deploy: { environment: prod, artifact: app }\n",
        3,
        44,
        "job d downloads artifact \"app\", which no job declares",
    ),
    (
        "deploy without environment",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { artifact: app }\n",
        7,
        13,
        "deploy needs environment",
    ),
    (
        "deploy job with steps",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { environment: prod, artifact: app }\n    steps: [{ run: x }]\n",
        8,
        12,
        "a deploy job runs no steps",
    ),
    (
        "unknown strategy",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { environment: prod, artifact: app, strategy: yolo }\n",
        7,
        59,
        "unknown strategy \"yolo\"; use rolling, canary or blue-green",
    ),
    (
        "bad failure budget",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { environment: prod, artifact: app, rolling: { failure-budget: 150% } }\n",
        7,
        76,
        "deploy.rolling.failure-budget: \"150%\" is not a percentage",
    ),
    (
        "blue-green without ports",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { environment: prod, artifact: app, strategy: blue-green, blue-green: { switch: x } }\n",
        7,
        13,
        "needs ports: [BLUE, GREEN]",
    ),
    (
        "two health probes",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { environment: prod, artifact: app, health: { tcp: \"h:1\", command: x } }\n",
        7,
        57,
        "needs exactly one of http",
    ),
    (
        "bad app name",
        "jobs:\n  b:\n    artifacts: { name: app, paths: [out] }\n    steps: [{ run: x }]\n  d:\n    needs: b\n    deploy: { environment: prod, artifact: app, app: ../etc }\n",
        7,
        54,
        "app name \"../etc\" must be 1 to 64",
    ),
    (
        "environment without select",
        "environments:\n  prod: { approvals: 1 }\njobs: { a: { steps: [{ run: x }] } }\n",
        2,
        9,
        "environment prod needs select",
    ),
    (
        "bad environment name",
        "environments:\n  Prod: { select: { role: web } }\njobs: { a: { steps: [{ run: x }] } }\n",
        2,
        3,
        "environment name \"Prod\" must be",
    ),
    (
        "unknown on key",
        "on: { pull_request: {} }\njobs: { a: { steps: [{ run: x }] } }\n",
        1,
        7,
        "unknown key \"pull_request\" in on; allowed keys are: push, schedule, manual, inputs",
    ),
];

#[test]
fn artifacts_caches_and_downloads_are_read_with_their_defaults() {
    let p = ok("jobs:\n  build:\n    matrix: { os: [linux, mac] }\n    artifacts:\n      name: app-${{ matrix.os }}\n      paths: [out/, \"dist/**/*.tar\"]\n      expire-in: 7d\n    cache:\n      key: deps-${{ matrix.os }}-${{ hashFiles('Cargo.lock') }}\n      restore-keys: [\"deps-${{ matrix.os }}-\"]\n      paths: [target]\n    steps: [{ run: x }]\n  test:\n    needs: build\n    steps: [{ run: x }]\n  pick:\n    needs: test\n    download: [app-mac]\n    artifacts: { paths: [report.txt] }\n    steps: [{ run: x }]\n");
    let build = p.job("build (linux)").expect("build");
    let artifact = build.artifact.as_ref().expect("artifact");
    assert_eq!(artifact.name, "app-linux");
    assert_eq!(artifact.paths, ["out/", "dist/**/*.tar"]);
    assert_eq!(artifact.expire_in_secs, 7 * 86_400);
    let cache = build.caches.first().expect("cache");
    assert_eq!(cache.key, "deps-linux-${{ hashFiles('Cargo.lock') }}");
    assert_eq!(cache.restore_keys, ["deps-linux-"]);
    let test = p.job("test").expect("test");
    assert_eq!(
        test.download, None,
        "no download key: every artifact of its needs"
    );
    assert!(test.artifact.is_none() && test.caches.is_empty());
    let pick = p.job("pick").expect("pick");
    assert_eq!(pick.download.as_deref(), Some(&["app-mac".to_owned()][..]));
    let report = pick.artifact.as_ref().expect("artifact");
    assert_eq!(
        (report.name.as_str(), report.expire_in_secs),
        ("pick", crate::DEFAULT_EXPIRE_IN_SECS),
        "the job's name and 30 days unless given"
    );
}

#[test]
fn deploy_jobs_and_environments_are_read_with_their_defaults() {
    use crate::{DeployStrategy, HostAmount};
    use gantry_protocol::Probe;
    let p = ok("environments:\n  production:\n    select: \"role=web,site=paris\"\n    approvals: 2\n    wait: 5m\n    branches: [main]\njobs:\n  build:\n    steps: [{ run: make }]\n    artifacts: { name: web, paths: [out] }\n  ship:\n    needs: build\n    deploy:\n      environment: production\n      artifact: web\n      strategy: canary\n      canary: { steps: [{ percent: 10, pause: manual }, { percent: 50, pause: 30s }] }\n      hooks: { start: ./run.sh, timeout: 10s }\n      health: { http: \"http://127.0.0.1:${{ labels.port }}/health\", body: ok, min-healthy: 2s }\n  quick:\n    needs: build\n    deploy: { environment: staging, artifact: web, app: web-staging }\n");
    let env = &p.environments["production"];
    assert_eq!(env.select["role"], "web");
    assert_eq!(env.select["site"], "paris");
    assert_eq!((env.approvals, env.wait_ms), (2, 300_000));
    assert_eq!(env.branches, ["main"]);
    let ship = p
        .job("ship")
        .expect("ship")
        .deploy
        .as_ref()
        .expect("deploy");
    assert_eq!(
        (ship.app.as_str(), ship.keep),
        ("web", 5),
        "app defaults to the artifact"
    );
    assert_eq!(
        ship.strategy,
        DeployStrategy::Canary {
            steps: vec![(10, None), (50, Some(30_000))],
            failure_budget: HostAmount::Count(0),
        }
    );
    assert_eq!(ship.hooks.timeout_ms, 10_000);
    let health = ship.health.as_ref().expect("health");
    assert!(matches!(&health.probe, Probe::Http { status: 200, body: Some(b), .. } if b == "ok"));
    assert_eq!(health.min_healthy_ms, 2_000);
    let quick = p
        .job("quick")
        .expect("quick")
        .deploy
        .as_ref()
        .expect("deploy");
    assert!(matches!(
        quick.strategy,
        DeployStrategy::Rolling {
            batch: HostAmount::Percent(25),
            failure_budget: HostAmount::Count(0),
            pause_ms: 0
        }
    ));
    assert!(p.job("quick").expect("quick").steps.is_empty());
}

#[test]
fn every_bad_input_is_reported_at_its_node() {
    crate::feature_tests::refused(BAD);
}

#[test]
fn error_display_has_file_line_column() {
    let errors = parse(
        "gantry.yml",
        "jobs:\n  build: { steps: [{ run: x }] }\n  lint: { steps: [{ run: x }] }\n  test:\n    needs: buld\n    steps: [{ run: x }]\n",
    )
    .expect_err("missing need");
    assert_eq!(
        errors.to_string(),
        "gantry.yml:5:12: needs names \"buld\", which is not a job; jobs are: build, lint, test"
    );
}

#[test]
fn several_errors_are_collected_in_file_order() {
    let errors = parse(
        "gantry.yml",
        "jobs:\n  a:\n    retry: 99\n    timeout: soon\n    steps:\n      - run: x\n        working-directory: /abs\n",
    )
    .expect_err("three errors");
    let lines: Vec<usize> = errors.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, [3, 4, 7], "{errors}");
}

#[test]
fn oversized_file_is_refused() {
    let text = format!("# {}\njobs: {{}}\n", "x".repeat(crate::MAX_FILE_SIZE));
    let errors = parse("gantry.yml", &text).expect_err("too big");
    assert_eq!((errors.0[0].line, errors.0[0].column), (1, 1));
    assert!(
        errors.0[0].message.contains("bytes; the most is"),
        "{errors}"
    );
}

#[test]
fn hostile_inputs_do_not_panic() {
    let inputs = [
        "\u{0}",
        "jobs: *x",
        "a: &x [*x]",
        "jobs:\n  a:\n    steps: [{ run: \"${{\" }]\n",
        "jobs:\n  a:\n    if: \"((((\"\n    steps: [{ run: x }]\n",
        "jobs: { a: { matrix: { include: [[]] }, steps: [{ run: x }] } }",
        "jobs: { a: { needs: [[]], steps: [{ run: x }] } }",
        "jobs: { ? [a] : b }",
        "%YAML 1.2\n---\njobs: {}",
        "jobs:\n\t a: x",
        "jobs: { a: { timeout: 99999999999999999999h, steps: [{ run: x }] } }",
        "jobs: { a: { retry: -1, steps: [{ run: x }] } }",
        "jobs: { a: { steps: [{ run: x, working-directory: \"C:x\" }] } }",
        "on: { schedule: [{ cron: \"*/99999999999 * * * *\" }] }\njobs: { a: { steps: [{ run: x }] } }",
    ];
    for text in inputs {
        let _ = parse("gantry.yml", text);
    }
    let deep = "a: ".to_owned() + &"[".repeat(10_000);
    let errors = parse("gantry.yml", &deep).expect_err("deep");
    assert!(!errors.0.is_empty());
}

#[test]
fn every_prefix_and_mutation_of_the_full_example_is_handled() {
    // A cheap stand-in for fuzzing: truncations and single-character substitutions of a
    // valid file must parse or fail with positioned errors, never panic.
    let boundaries: Vec<usize> = FULL.char_indices().map(|(i, _)| i).collect();
    for &end in &boundaries {
        if let Err(errors) = parse("gantry.yml", &FULL[..end]) {
            assert!(
                errors.0.iter().all(|e| e.line >= 1 && e.column >= 1),
                "{errors}"
            );
        }
    }
    let replacements = [
        '[', ']', '{', '}', ':', '-', '"', '\'', '&', '*', '!', '|', '>', ' ', '\n', '#', '$', 'é',
    ];
    for (n, &at) in boundaries.iter().enumerate() {
        let replacement = replacements[n % replacements.len()];
        let next = FULL[at..].chars().next().map_or(at, |c| at + c.len_utf8());
        let text = format!("{}{}{}", &FULL[..at], replacement, &FULL[next..]);
        if let Err(errors) = parse("gantry.yml", &text) {
            assert!(!errors.0.is_empty());
        }
    }
}

#[test]
fn a_file_near_the_size_limit_parses() {
    let mut text = String::from("jobs:\n  a:\n    steps:\n");
    while text.len() < crate::MAX_FILE_SIZE - 64 {
        text.push_str("      - { run: x }\n");
    }
    let p = ok(&text);
    assert!(p.jobs[0].steps.len() > 40_000);
}
