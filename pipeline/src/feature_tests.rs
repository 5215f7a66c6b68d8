//! Tests of the keys of issues 24 and 26: each feature read into the model, and each
//! refusal at its file, line and column. Fixtures are indented in the source and
//! dedented before parsing, so positions count from the dedented text.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use gantry_protocol::{
    ArtifactWhen, Checkout, CheckoutSpec, ConditionValue, HealthCommand, PortProtocol, PullPolicy,
    Shell, StatusExpr,
};

use crate::{load, parse, Condition, Errors, InputType, Pipeline, StaticContext};

/// Drops the indentation of the first line with text from every line, and a leading
/// newline.
fn dedent(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .map_or(0, |l| l.len() - l.trim_start().len());
    text.lines()
        .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn ok(text: &str) -> Pipeline {
    match parse("gantry.yml", &dedent(text)) {
        Ok(pipeline) => pipeline,
        Err(errors) => panic!("expected a valid pipeline, got:\n{errors}"),
    }
}

fn files(list: &[(&str, &str)]) -> HashMap<String, String> {
    list.iter()
        .map(|(path, text)| ((*path).to_owned(), dedent(text)))
        .collect()
}

fn ok_with(list: &[(&str, &str)], text: &str) -> Pipeline {
    match load("gantry.yml", &dedent(text), &files(list)) {
        Ok(pipeline) => pipeline,
        Err(errors) => panic!("expected a valid pipeline, got:\n{errors}"),
    }
}

fn errors_with(list: &[(&str, &str)], text: &str) -> Errors {
    match load("gantry.yml", &dedent(text), &files(list)) {
        Ok(_) => panic!("expected errors for:\n{}", dedent(text)),
        Err(errors) => errors,
    }
}

/// Asserts that `errors` holds `needle` at `file:line:column`.
fn has(errors: &Errors, file: &str, line: usize, column: usize, needle: &str) {
    assert!(
        errors.0.iter().any(|e| e.file == file
            && e.line == line
            && e.column == column
            && e.message.contains(needle)),
        "wanted {file}:{line}:{column} \"{needle}\", got:\n{errors}"
    );
}

/// A table of refusals: (name, fixture, line, column, message part), all in gantry.yml.
pub(crate) fn refused(cases: &[(&str, &str, usize, usize, &str)]) {
    let mut failures = Vec::new();
    for (name, text, line, column, needle) in cases {
        match parse("gantry.yml", &dedent(text)) {
            Ok(_) => failures.push(format!("{name}: parsed, expected an error")),
            Err(errors) => {
                let found = errors
                    .0
                    .iter()
                    .any(|e| e.line == *line && e.column == *column && e.message.contains(needle));
                if !found {
                    failures.push(format!(
                        "{name}: wanted {line}:{column} \"{needle}\", got:\n{errors}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn steps_take_id_if_continue_on_error_timeout_env_shell_and_directory() {
    let p = ok(r#"
        jobs:
          build:
            timeout: 30m
            matrix: { svc: [api, web] }
            steps:
              - id: ver
                run: echo "v=1" >> "$GANTRY_OUTPUT"
                shell: bash
              - run: make
                if: steps.ver.outputs.v != '' && success()
                continue-on-error: true
                timeout: 5m
                env: { V: "${{ steps.ver.outputs.v }}" }
                working-directory: services/${{ matrix.svc }}
                shell: "perl {0}"
              - run: echo done
                if: failure()
                shell: python
    "#);
    let job = p.job("build (api)").expect("job");
    let [first, second, third] = &job.steps[..] else {
        panic!("three steps")
    };
    assert_eq!(first.id.as_deref(), Some("ver"));
    assert_eq!(first.shell, Shell::Bash);
    assert_eq!(first.condition, Condition::Success);
    assert!(second.continue_on_error);
    assert_eq!(second.timeout_ms, Some(5 * 60_000));
    assert_eq!(second.shell, Shell::Command("perl {0}".into()));
    assert_eq!(second.working_directory.as_deref(), Some("services/api"));
    assert_eq!(second.env["V"], "${{ steps.ver.outputs.v }}");
    assert_eq!(third.shell, Shell::Python);
    assert_eq!(third.condition, Condition::Failure);
    // The agent gets the step condition with the output comparison left for it.
    let execution = job.execution(&StaticContext::default());
    assert_eq!(
        execution.steps[1].condition,
        StatusExpr::And(vec![
            StatusExpr::Compare {
                left: ConditionValue::StepOutput {
                    step: "ver".into(),
                    name: "v".into()
                },
                op: crate::CompareOp::Ne,
                right: ConditionValue::Text(String::new()),
            },
            StatusExpr::Success,
        ])
    );
    assert_eq!(execution.steps[2].shell, Shell::Python);
}

#[test]
fn step_options_are_refused_with_the_reason() {
    refused(&[
        (
            "bad step id",
            "jobs:\n  a:\n    steps: [{ id: 1st, run: x }]\n",
            3,
            19,
            "step id \"1st\" must be",
        ),
        (
            "duplicate step id",
            "jobs:\n  a:\n    steps:\n      - { id: s, run: x }\n      - { id: s, run: y }\n",
            5,
            15,
            "step id \"s\" is used twice in job a (also at line 4)",
        ),
        (
            "step timeout over the job's",
            "jobs:\n  a:\n    timeout: 10m\n    steps: [{ run: x, timeout: 1h }]\n",
            4,
            32,
            "longer than its job's (10 min)",
        ),
        (
            "unknown shell",
            "jobs:\n  a:\n    steps: [{ run: x, shell: zsh }]\n",
            3,
            30,
            "shell \"zsh\" must be sh, bash, python, pwsh, or a command with {0}",
        ),
        (
            "step output of a later step",
            "jobs:\n  a:\n    steps:\n      - run: echo ${{ steps.b.outputs.x }}\n      - { id: b, run: y }\n",
            4,
            14,
            "step b does not run before this",
        ),
        (
            "step output of no step",
            "jobs:\n  a:\n    steps:\n      - { id: b, run: y }\n      - run: x\n        if: steps.c.outputs.x == '1'\n",
            6,
            13,
            "no step of this job has id \"c\"; step ids are: b",
        ),
        (
            "a step uses an action",
            "jobs:\n  a:\n    steps:\n      - uses: actions/checkout@v4\n",
            4,
            9,
            "Gantry has no actions",
        ),
        (
            "secret in a step name",
            "jobs:\n  a:\n    steps: [{ name: \"${{ secrets.T }}\", run: x }]\n",
            3,
            21,
            "a step's name cannot use secrets.T (a secret would be shown where this field is)",
        ),
    ]);
}

#[test]
fn outputs_flow_from_steps_to_jobs_and_on_to_their_dependents() {
    let p = ok(r#"
        env: { REGION: eu }
        jobs:
          build:
            outputs:
              version: ${{ steps.v.outputs.value }}
              region: ${{ env.REGION }}
            steps: [{ id: v, run: echo value=1 >> $GANTRY_OUTPUT }]
          ship:
            needs: build
            if: needs.build.outputs.version != ''
            environment:
              name: staging
              url: https://staging/${{ needs.build.outputs.version }}
            env: { V: "${{ needs.build.outputs.version }}" }
            steps: [{ run: "echo ${{ needs.build.outputs.region }}" }]
    "#);
    let build = p.job("build").expect("build");
    assert_eq!(build.outputs["version"], "${{ steps.v.outputs.value }}");
    let ship = p.job("ship").expect("ship");
    let folded = ship
        .condition
        .fold(&StaticContext::default(), &BTreeMap::new());
    assert_eq!(
        folded,
        StatusExpr::Compare {
            left: ConditionValue::NeedsOutput {
                job: "build".into(),
                name: "version".into()
            },
            op: crate::CompareOp::Ne,
            right: ConditionValue::Text(String::new()),
        }
    );
    assert_eq!(
        ship.environment.as_ref().and_then(|e| e.url.as_deref()),
        Some("https://staging/${{ needs.build.outputs.version }}")
    );
}

#[test]
fn output_references_are_checked_against_needs_and_declarations() {
    refused(&[
        (
            "need not in needs",
            "jobs:\n  b: { outputs: { v: x }, steps: [{ run: x }] }\n  c:\n    steps: [{ run: \"${{ needs.b.outputs.v }}\" }]\n",
            4,
            20,
            "needs.b.outputs.v: b is not in this job's needs; add it to needs",
        ),
        (
            "output not declared",
            "jobs:\n  b: { outputs: { v: x }, steps: [{ run: x }] }\n  c:\n    needs: b\n    steps: [{ run: \"${{ needs.b.outputs.w }}\" }]\n",
            5,
            20,
            "job b declares no output w; its outputs are: v",
        ),
        (
            "output of a matrix job",
            "jobs:\n  b: { matrix: { x: [1, 2] }, outputs: { v: x }, steps: [{ run: x }] }\n  c:\n    needs: b\n    if: needs.b.outputs.v == '1'\n    steps: [{ run: x }]\n",
            5,
            9,
            "b is a matrix job",
        ),
        (
            "step outputs in a job's if",
            "jobs:\n  c:\n    if: steps.x.outputs.v == '1'\n    steps: [{ id: x, run: x }]\n",
            3,
            9,
            "exists only inside the job",
        ),
        (
            "secret in outputs",
            "jobs:\n  b:\n    outputs: { t: \"${{ secrets.T }}\" }\n    steps: [{ run: x }]\n",
            3,
            19,
            "the job's outputs cannot use secrets.T",
        ),
        (
            "bad output name",
            "jobs:\n  b:\n    outputs: { 9v: x }\n    steps: [{ run: x }]\n",
            3,
            16,
            "output name \"9v\" must be",
        ),
    ]);
    let many: String = (0..40).fold(String::new(), |mut acc, i| {
        let _ = write!(acc, "o{i}: x, ");
        acc
    });
    refused(&[(
        "too many outputs",
        &format!("jobs:\n  b:\n    outputs: {{ {many} }}\n    steps: [{{ run: x }}]\n"),
        3,
        14,
        "the job declares 40 outputs; the most is 32",
    )]);
    let refs: String = (0..65)
        .map(|_| "${{ needs.b.outputs.v }}")
        .collect::<Vec<_>>()
        .join(" ");
    refused(&[(
        "too many output references",
        &format!("jobs:\n  b: {{ outputs: {{ v: x }}, steps: [{{ run: x }}] }}\n  c:\n    needs: b\n    steps: [{{ run: \"{refs}\" }}]\n"),
        5,
        20,
        "reads more than 64 needs outputs",
    )]);
}

#[test]
fn services_are_read_with_ports_health_and_defaults() {
    let p = ok(r#"
        jobs:
          it:
            matrix: { pg: ["15", "16"] }
            services:
              db:
                image: postgres:${{ matrix.pg }}
                env: { POSTGRES_PASSWORD: "${{ secrets.DB }}" }
                ports: ["5432", "15433:5433/tcp", "53/udp"]
                command: postgres -c fsync=off
                health: { cmd: pg_isready, interval: 1s, retries: 5, start-period: 10s }
              cache: redis:7
              queue:
                image: { name: "registry.local:5000/mq:1", pull: always }
                health: { cmd: [mq, ping] }
            steps: [{ run: x }]
    "#);
    let job = p.job("it (16)").expect("job");
    assert!(job.needs_docker());
    let [db, cache, queue] = &job.services[..] else {
        panic!("three services")
    };
    assert_eq!(db.name, "db");
    assert_eq!(db.image.name, "postgres:16");
    assert_eq!(db.image.pull, PullPolicy::IfNotPresent);
    assert_eq!(db.ports.len(), 3);
    assert_eq!(db.ports[1].host, Some(15433));
    assert_eq!(db.ports[2].protocol, PortProtocol::Udp);
    assert_eq!(db.command, ["postgres", "-c", "fsync=off"]);
    let health = db.health.as_ref().expect("health");
    assert_eq!(health.cmd, HealthCommand::Shell("pg_isready".into()));
    assert_eq!(
        (health.interval_ms, health.retries, health.start_period_ms),
        (1_000, 5, 10_000)
    );
    assert_eq!(cache.image.name, "redis:7");
    assert_eq!(queue.image.pull, PullPolicy::Always);
    assert_eq!(
        queue.health.as_ref().map(|h| &h.cmd),
        Some(&HealthCommand::Exec(vec!["mq".into(), "ping".into()]))
    );
    let secrets: Vec<String> = crate::referenced_secrets(job).into_iter().collect();
    assert_eq!(secrets, ["DB"]);
}

#[test]
fn services_are_refused_with_the_reason() {
    refused(&[
        (
            "service name not a DNS label",
            "jobs:\n  a:\n    services: { My_DB: postgres }\n    steps: [{ run: x }]\n",
            3,
            17,
            "service name \"My_DB\" must be a DNS label",
        ),
        (
            "bad port",
            "jobs:\n  a:\n    services: { db: { image: pg, ports: [\"99999\"] } }\n    steps: [{ run: x }]\n",
            3,
            42,
            "port \"99999\" must be CONTAINER, HOST:CONTAINER",
        ),
        (
            "host port twice",
            "jobs:\n  a:\n    services:\n      a: { image: x, ports: [\"8080:80\"] }\n      b: { image: y, ports: [\"8080:81\"] }\n    steps: [{ run: x }]\n",
            5,
            30,
            "loopback port 8080 is published twice in the job (also at line 4)",
        ),
        (
            "service without image",
            "jobs:\n  a:\n    services: { db: { env: { A: b } } }\n    steps: [{ run: x }]\n",
            3,
            21,
            "service db needs image:",
        ),
        (
            "health without cmd",
            "jobs:\n  a:\n    services: { db: { image: pg, health: { retries: 3 } } }\n    steps: [{ run: x }]\n",
            3,
            42,
            "service db's health needs cmd:",
        ),
        (
            "bad health interval",
            "jobs:\n  a:\n    services: { db: { image: pg, health: { cmd: x, interval: 1ms } } }\n    steps: [{ run: x }]\n",
            3,
            62,
            "interval must be from 100 ms",
        ),
        (
            "services on a deploy job",
            "jobs:\n  b: { artifacts: { paths: [o] }, steps: [{ run: x }] }\n  d:\n    needs: b\n    services: { db: pg }\n    deploy: { environment: e, artifact: b }\n",
            5,
            15,
            "a deploy job runs no steps: the coordinator deploys, so services does not apply",
        ),
    ]);
    let many: String = (0..11).fold(String::new(), |mut acc, i| {
        let _ = write!(acc, "s{i}: x, ");
        acc
    });
    refused(&[(
        "too many services",
        &format!("jobs:\n  a:\n    services: {{ {many} }}\n    steps: [{{ run: x }}]\n"),
        3,
        15,
        "the job has 11 services; the most is 10",
    )]);
}

#[test]
fn images_take_a_pull_policy_and_credentials_only_from_secrets() {
    let p = ok(r#"
        jobs:
          a:
            image:
              name: registry.local:5000/team/build:1
              pull: never
              credentials: { username: ci, password: "${{ secrets.REGISTRY_TOKEN }}" }
            steps: [{ run: x }]
    "#);
    let image = p.jobs[0].image.as_ref().expect("image");
    assert_eq!(image.pull, PullPolicy::Never);
    let credentials = image.credentials.as_ref().expect("credentials");
    assert_eq!(credentials.password_secret, "REGISTRY_TOKEN");
    assert!(crate::referenced_secrets(&p.jobs[0]).contains("REGISTRY_TOKEN"));
    refused(&[
        (
            "password in the file",
            "jobs:\n  a:\n    image: { name: x, credentials: { username: u, password: hunter2 } }\n    steps: [{ run: x }]\n",
            3,
            61,
            "password must be ${{ secrets.NAME }} and nothing else",
        ),
        (
            "unknown pull policy",
            "jobs:\n  a:\n    image: { name: x, pull: sometimes }\n    steps: [{ run: x }]\n",
            3,
            29,
            "image.pull must be never, if-not-present or always",
        ),
        (
            "bad image name",
            "jobs:\n  a:\n    image: Node:20\n    steps: [{ run: x }]\n",
            3,
            12,
            "image \"Node:20\" has \"Node\"",
        ),
        (
            "credentials without password",
            "jobs:\n  a:\n    image: { name: x, credentials: { username: u } }\n    steps: [{ run: x }]\n",
            3,
            36,
            "needs username and password",
        ),
    ]);
}

#[test]
fn matrix_values_reach_every_text_field_and_strategy_options_are_read() {
    let p = ok(r#"
        environments:
          eu: { select: { region: eu } }
          us: { select: { region: us } }
        jobs:
          build:
            strategy:
              fail-fast: true
              max-parallel: 1
              matrix: { region: [eu, us] }
            runs-on: ["region=${{ matrix.region }}", linux]
            image: builder:${{ matrix.region }}
            checkout: { path: "src/${{ matrix.region }}" }
            env: { R: "${{ matrix.region }}" }
            services: { db: "db-${{ matrix.region }}:1" }
            environment: ${{ matrix.region }}
            concurrency: build-${{ matrix.region }}
            reports: { junit: ["out/${{ matrix.region }}/*.xml"] }
            artifacts: { name: "app-${{ matrix.region }}", paths: ["out/${{ matrix.region }}/"] }
            steps:
              - run: make ${{ matrix.region }}
                working-directory: ${{ matrix.region }}
          ship:
            needs: build
            matrix: { region: [eu, us] }
            deploy:
              environment: ${{ matrix.region }}
              artifact: app-${{ matrix.region }}
              app: app-${{ matrix.region }}
              version: v-${{ matrix.region }}
    "#);
    let us = p.job("build (us)").expect("us");
    assert!(us.fail_fast);
    assert_eq!(us.max_parallel, Some(1));
    assert_eq!(us.runs_on["region"], "us");
    assert_eq!(us.runs_on["os"], "linux");
    assert_eq!(
        us.image.as_ref().map(|i| i.name.as_str()),
        Some("builder:us")
    );
    assert_eq!(
        us.checkout,
        Checkout::Source(CheckoutSpec {
            path: Some("src/us".into()),
            ..CheckoutSpec::default()
        })
    );
    assert_eq!(us.env["R"], "us");
    assert_eq!(us.services[0].image.name, "db-us:1");
    assert_eq!(us.environment.as_ref().map(|e| e.name.as_str()), Some("us"));
    assert_eq!(
        us.concurrency.as_ref().map(|c| c.group.as_str()),
        Some("build-us")
    );
    assert_eq!(
        us.reports.as_ref().map(|r| r.junit.clone()),
        Some(vec!["out/us/*.xml".to_owned()])
    );
    let artifact = us.artifact.as_ref().expect("artifact");
    assert_eq!(
        (artifact.name.as_str(), artifact.paths[0].as_str()),
        ("app-us", "out/us/")
    );
    assert_eq!(us.steps[0].working_directory.as_deref(), Some("us"));
    let ship = p.job("ship (eu)").expect("ship");
    let deploy = ship.deploy.as_ref().expect("deploy");
    assert_eq!(
        (
            deploy.environment.as_str(),
            deploy.artifact.as_str(),
            deploy.app.as_str(),
            deploy.version.as_deref()
        ),
        ("eu", "app-eu", "app-eu", Some("v-eu"))
    );
    let plain = ok("jobs: { a: { steps: [{ run: x }] } }");
    assert!(
        !plain.jobs[0].fail_fast,
        "every expansion runs unless asked"
    );
}

#[test]
fn matrix_options_and_values_are_refused_with_the_reason() {
    refused(&[
        (
            "max-parallel zero",
            "jobs:\n  a:\n    strategy: { matrix: { x: [1] }, max-parallel: 0 }\n    steps: [{ run: x }]\n",
            3,
            51,
            "strategy.max-parallel must be a whole number from 1 to 256",
        ),
        (
            "fail-fast without a matrix",
            "jobs:\n  a:\n    strategy: { fail-fast: true }\n    steps: [{ run: x }]\n",
            3,
            28,
            "fail-fast and max-parallel apply to a matrix; the job has none",
        ),
        (
            "reference in a matrix value",
            "jobs:\n  a:\n    matrix: { x: [\"${{ inputs.v }}\"] }\n    steps: [{ run: x }]\n",
            3,
            19,
            "matrix values are fixed when the file is read",
        ),
        (
            "unknown matrix key in a service",
            "jobs:\n  a:\n    matrix: { x: [1] }\n    services: { db: \"pg:${{ matrix.y }}\" }\n    steps: [{ run: x }]\n",
            4,
            21,
            "unknown matrix key \"y\"; matrix keys are: x",
        ),
    ]);
}

#[test]
fn runs_on_takes_a_bare_label_a_list_or_a_mapping() {
    let p = ok(r#"
        jobs:
          a: { runs-on: linux, steps: [{ run: x }] }
          b: { runs-on: [self-hosted, Linux, arm64, gpu, "zone=eu"], steps: [{ run: x }] }
          c: { runs-on: { os: linux }, steps: [{ run: x }] }
          d: { runs-on: "os=macos", steps: [{ run: x }] }
    "#);
    let labels = |name: &str| {
        p.job(name)
            .expect("job")
            .runs_on
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(labels("a"), ["os=linux"]);
    assert_eq!(
        labels("b"),
        ["arch=aarch64", "gpu=true", "os=linux", "zone=eu"]
    );
    assert_eq!(labels("c"), ["os=linux"]);
    assert_eq!(labels("d"), ["os=macos"]);
    refused(&[(
        "a bare label that is not a label",
        "jobs:\n  a:\n    runs-on: [\"big box\"]\n    steps: [{ run: x }]\n",
        3,
        15,
        "label \"big box\" must be",
    )]);
}

#[test]
fn artifacts_say_when_and_reports_are_read() {
    let p = ok(r#"
        jobs:
          t:
            artifacts: { paths: [logs/], when: on-failure }
            reports: { junit: ["reports/**/*.xml", junit.xml], coverage: coverage/lcov.info }
            steps: [{ run: x }]
    "#);
    let job = &p.jobs[0];
    assert_eq!(
        job.artifact.as_ref().map(|a| a.when),
        Some(ArtifactWhen::OnFailure)
    );
    let reports = job.reports.as_ref().expect("reports");
    assert_eq!(reports.junit, ["reports/**/*.xml", "junit.xml"]);
    assert_eq!(reports.coverage.as_deref(), Some("coverage/lcov.info"));
    let execution = job.execution(&StaticContext::default());
    assert_eq!(execution.artifact_when, ArtifactWhen::OnFailure);
    assert!(!execution.is_plain());
    refused(&[
        (
            "unknown when",
            "jobs:\n  t:\n    artifacts: { paths: [a], when: never }\n    steps: [{ run: x }]\n",
            3,
            36,
            "artifacts.when must be on-success, on-failure or always",
        ),
        (
            "report outside the workspace",
            "jobs:\n  t:\n    reports: { junit: [../x.xml] }\n    steps: [{ run: x }]\n",
            3,
            24,
            "reports.junit path \"../x.xml\" has a \"..\" component",
        ),
        (
            "empty reports",
            "jobs:\n  t:\n    reports: {}\n    steps: [{ run: x }]\n",
            3,
            14,
            "reports needs junit: [GLOBS] or coverage: FILE",
        ),
    ]);
}

#[test]
fn any_job_may_use_an_environment_chosen_by_name_or_by_a_choice_input() {
    let p = ok(r#"
        on:
          inputs:
            target: { type: choice, options: [staging, production], default: staging }
        jobs:
          migrate:
            environment: { name: "${{ inputs.target }}", url: "https://${{ inputs.target }}.example.com" }
            steps: [{ run: kubectl apply -f k8s/ }]
          plain:
            environment: staging
            steps: [{ run: x }]
    "#);
    let migrate = p.job("migrate").expect("migrate");
    let environment = migrate.environment.as_ref().expect("environment");
    let ctx = StaticContext {
        inputs: BTreeMap::from([("target".to_owned(), "production".to_owned())]),
        ..StaticContext::default()
    };
    assert_eq!(ctx.expand(&environment.name), "production");
    assert_eq!(
        p.job("plain")
            .and_then(|j| j.environment.as_ref())
            .map(|e| e.name.as_str()),
        Some("staging")
    );
    refused(&[
        (
            "bad environment name",
            "jobs:\n  a:\n    environment: Prod\n    steps: [{ run: x }]\n",
            3,
            18,
            "environment name \"Prod\" must be 1 to 63",
        ),
        (
            "environment from a string input",
            "on: { inputs: { t: {} } }\njobs:\n  a:\n    environment: \"${{ inputs.t }}\"\n    steps: [{ run: x }]\n",
            4,
            18,
            "input \"t\" chooses an environment, so it must be type: choice",
        ),
        (
            "environment from options that are not names",
            "on: { inputs: { t: { type: choice, options: [ok, Not OK] } } }\njobs:\n  a:\n    environment: \"${{ inputs.t }}\"\n    steps: [{ run: x }]\n",
            4,
            18,
            "its options Not OK are not environment names",
        ),
        (
            "environment from anything else",
            "jobs:\n  a:\n    environment: \"env-${{ git.branch }}\"\n    steps: [{ run: x }]\n",
            3,
            18,
            "must be a name or exactly ${{ inputs.NAME }} of a choice input",
        ),
        (
            "deploy job with another environment",
            "jobs:\n  b: { artifacts: { paths: [o] }, steps: [{ run: x }] }\n  d:\n    needs: b\n    environment: staging\n    deploy: { environment: production, artifact: b }\n",
            5,
            18,
            "environment \"staging\" differs from deploy.environment \"production\"",
        ),
        (
            "url that is not a URL",
            "jobs:\n  a:\n    environment: { name: s, url: staging }\n    steps: [{ run: x }]\n",
            3,
            34,
            "environment.url must be an http:// or https:// URL",
        ),
    ]);
}

#[test]
fn a_deploy_environment_may_be_chosen_by_an_input() {
    let p = ok(r#"
        on: { inputs: { to: { type: choice, options: [staging, production] } } }
        jobs:
          b: { artifacts: { name: app, paths: [o] }, steps: [{ run: x }] }
          d:
            needs: b
            deploy: { environment: "${{ inputs.to }}", artifact: app }
    "#);
    let d = p.job("d").expect("d");
    assert_eq!(
        d.environment.as_ref().map(|e| e.name.as_str()),
        Some("${{ inputs.to }}")
    );
}

#[test]
fn caches_may_be_several_and_under_home_when_they_say_so() {
    let p = ok(r#"
        jobs:
          a:
            cache:
              - { key: "cargo-${{ hashFiles('Cargo.lock') }}", paths: ["~/.cargo/registry", target/], home: true }
              - { key: "npm-${{ git.branch }}", paths: [node_modules/] }
            steps: [{ run: x }]
    "#);
    let caches = &p.jobs[0].caches;
    assert_eq!(caches.len(), 2);
    assert!(caches[0].home && !caches[1].home);
    assert_eq!(caches[0].paths, ["~/.cargo/registry", "target/"]);
    let execution = p.jobs[0].execution(&StaticContext::default());
    assert_eq!(execution.caches.len(), 2);
    assert!(execution.caches[0].home);
    refused(&[
        (
            "home path without home",
            "jobs:\n  a:\n    cache: { key: k, paths: [\"~/.npm\"] }\n    steps: [{ run: x }]\n",
            3,
            30,
            "cache path \"~/.npm\" is under $HOME; add home: true",
        ),
        (
            "home path leaving home",
            "jobs:\n  a:\n    cache: { key: k, paths: [\"~/../etc\"], home: true }\n    steps: [{ run: x }]\n",
            3,
            30,
            "has a \"..\" component",
        ),
        (
            "two caches with one key",
            "jobs:\n  a:\n    cache: [{ key: k, paths: [a] }, { key: k, paths: [b] }]\n    steps: [{ run: x }]\n",
            3,
            44,
            "two caches of the job have the key \"k\"",
        ),
        (
            "home path in an artifact",
            "jobs:\n  a:\n    artifacts: { paths: [\"~/x\"] }\n    steps: [{ run: x }]\n",
            3,
            26,
            "artifacts are taken from the workspace",
        ),
    ]);
    let many: String = (0..9)
        .map(|i| format!("{{ key: k{i}, paths: [a] }}"))
        .collect::<Vec<_>>()
        .join(", ");
    refused(&[(
        "too many caches",
        &format!("jobs:\n  a:\n    cache: [{many}]\n    steps: [{{ run: x }}]\n"),
        3,
        12,
        "the job has 9 caches; the most is 8",
    )]);
}

#[test]
fn checkout_has_a_depth_submodules_and_a_path_or_is_off() {
    let p = ok(r"
        jobs:
          default: { steps: [{ run: x }] }
          off: { checkout: false, steps: [{ run: x }] }
          full: { checkout: { depth: full, submodules: true, path: src }, steps: [{ run: x }] }
          ten: { checkout: { depth: 10 }, steps: [{ run: x }] }
    ");
    let checkout = |name: &str| p.job(name).expect("job").checkout.clone();
    assert_eq!(
        checkout("default"),
        Checkout::Source(CheckoutSpec {
            depth: Some(1),
            submodules: false,
            path: None
        })
    );
    assert_eq!(checkout("off"), Checkout::Skip);
    assert_eq!(
        checkout("full"),
        Checkout::Source(CheckoutSpec {
            depth: None,
            submodules: true,
            path: Some("src".into())
        })
    );
    assert_eq!(
        checkout("ten"),
        Checkout::Source(CheckoutSpec {
            depth: Some(10),
            ..CheckoutSpec::default()
        })
    );
    refused(&[
        (
            "depth zero",
            "jobs:\n  a:\n    checkout: { depth: 0 }\n    steps: [{ run: x }]\n",
            3,
            24,
            "checkout.depth must be full or a number of commits from 1",
        ),
        (
            "path outside",
            "jobs:\n  a:\n    checkout: { path: /src }\n    steps: [{ run: x }]\n",
            3,
            23,
            "checkout.path \"/src\" is absolute",
        ),
        (
            "checkout neither on nor off",
            "jobs:\n  a:\n    checkout: shallow\n    steps: [{ run: x }]\n",
            3,
            15,
            "checkout (false, true or { depth, submodules, path }) must be true or false",
        ),
        (
            "negative depth",
            "jobs:\n  a:\n    checkout: { depth: -1 }\n    steps: [{ run: x }]\n",
            3,
            24,
            "checkout.depth must be full or a number of commits from 1",
        ),
        (
            "path leaving the workspace",
            "jobs:\n  a:\n    checkout: { path: ../x }\n    steps: [{ run: x }]\n",
            3,
            23,
            "checkout.path \"../x\" has a \"..\" component, which would leave the workspace",
        ),
        (
            "unknown key",
            "jobs:\n  a:\n    checkout: { shallow: true }\n    steps: [{ run: x }]\n",
            3,
            17,
            "shallow",
        ),
        (
            "submodules neither on nor off",
            "jobs:\n  a:\n    checkout: { submodules: maybe }\n    steps: [{ run: x }]\n",
            3,
            29,
            "checkout.submodules",
        ),
    ]);
}

#[test]
fn concurrency_groups_apply_to_pipelines_and_jobs() {
    let p = ok(r#"
        concurrency: { group: "ci-${{ git.branch }}", cancel-in-progress: true }
        jobs:
          deploy:
            concurrency: deploy-${{ event.name }}
            steps: [{ run: x }]
    "#);
    let pipeline = p.concurrency.as_ref().expect("pipeline concurrency");
    assert_eq!(pipeline.group, "ci-${{ git.branch }}");
    assert!(pipeline.cancel_in_progress);
    let job = p.jobs[0].concurrency.as_ref().expect("job concurrency");
    assert!(!job.cancel_in_progress);
    let ctx = StaticContext {
        branch: "main".into(),
        ..StaticContext::default()
    };
    assert_eq!(ctx.expand(&pipeline.group), "ci-main");
    refused(&[
        (
            "secret in a group",
            "concurrency: \"g-${{ secrets.T }}\"\njobs: { a: { steps: [{ run: x }] } }\n",
            1,
            14,
            "the pipeline's concurrency group cannot use secrets.T",
        ),
        (
            "group missing",
            "jobs:\n  a:\n    concurrency: { cancel-in-progress: true }\n    steps: [{ run: x }]\n",
            3,
            18,
            "concurrency needs group:",
        ),
        (
            "needs outputs in a group",
            "jobs:\n  b: { outputs: { v: x }, steps: [{ run: x }] }\n  a:\n    needs: b\n    concurrency: \"${{ needs.b.outputs.v }}\"\n    steps: [{ run: x }]\n",
            5,
            18,
            "a concurrency group cannot use needs.b.outputs.v",
        ),
    ]);
}

#[test]
fn git_and_event_references_are_known_and_others_are_refused_with_their_gantry_name() {
    let p = ok(r#"
        jobs:
          a:
            if: git.tag != '' || event.name == 'pull_request'
            env: { SHA: "${{ git.commit }}", PR: "${{ event.pr_number }}" }
            steps: [{ run: "echo ${{ git.ref }} ${{ git.repo }} ${{ event.actor }} ${{ event.pr_base }}" }]
    "#);
    let tag = StaticContext {
        tag: "v1".into(),
        ..StaticContext::default()
    };
    assert_eq!(
        p.jobs[0].condition.fold(&tag, &BTreeMap::new()),
        StatusExpr::Const(true)
    );
    refused(&[
        (
            "github.sha",
            "jobs:\n  a:\n    steps: [{ run: \"echo ${{ github.sha }}\" }]\n",
            3,
            20,
            "github.* is GitHub Actions' context; Gantry's are git.* (commit, ref, branch, tag, repo) and event.* (name, actor, pr_number, pr_base) (github.sha is git.commit)",
        ),
        (
            "undeclared input",
            "on: { inputs: { a: {} } }\njobs:\n  j:\n    env: { X: \"${{ inputs.b }}\" }\n    steps: [{ run: x }]\n",
            4,
            15,
            "inputs.b is not declared; declare it under on.inputs (declared inputs: a)",
        ),
        (
            "undeclared env",
            "jobs:\n  j:\n    steps: [{ run: \"${{ env.NOPE }}\" }]\n",
            3,
            20,
            "env.NOPE is not in the pipeline's or the job's env:",
        ),
        (
            "hashFiles outside a cache key",
            "jobs:\n  j:\n    steps: [{ run: \"${{ hashFiles('a') }}\" }]\n",
            3,
            20,
            "a step's run cannot use hashFiles(...) (hashFiles(...) is for cache keys)",
        ),
        (
            "an expression in a text",
            "jobs:\n  j:\n    steps: [{ run: \"${{ git.tag == 'x' }}\" }]\n",
            3,
            20,
            "comparisons and && || go in if:",
        ),
        (
            "unterminated reference",
            "jobs:\n  j:\n    steps: [{ run: \"${{ git.tag\" }]\n",
            3,
            20,
            "unterminated \"${{\"",
        ),
        (
            "input in runs-on",
            "on: { inputs: { os: {} } }\njobs:\n  j:\n    runs-on: \"os=${{ inputs.os }}\"\n    steps: [{ run: x }]\n",
            4,
            14,
            "runs-on cannot use inputs.os; it may use only matrix values",
        ),
        (
            "unknown event field in if",
            "jobs:\n  j:\n    if: event.kind == 'x'\n    steps: [{ run: x }]\n",
            3,
            9,
            "unknown event field \"kind\"",
        ),
        (
            "secret in if",
            "jobs:\n  j:\n    if: secrets.T == 'x'\n    steps: [{ run: x }]\n",
            3,
            9,
            "a condition must not depend on a secret's value",
        ),
        (
            "job env in a job's if",
            "jobs:\n  j:\n    env: { X: y }\n    if: env.X == 'y'\n    steps: [{ run: x }]\n",
            4,
            9,
            "a job's if: is decided before the job's own env exists",
        ),
    ]);
}

#[test]
fn typed_inputs_are_read_and_their_declarations_checked() {
    let p = ok(r#"
        on:
          inputs:
            env: { type: choice, options: [a, b], default: a, required: true, description: where }
            dry: { type: boolean, default: "true" }
            n: { type: number, default: "3" }
            s: {}
        jobs: { j: { steps: [{ run: x }] } }
    "#);
    let inputs = &p.triggers.inputs;
    assert_eq!(inputs["env"].kind, InputType::Choice);
    assert!(inputs["env"].required);
    assert_eq!(inputs["env"].options, ["a", "b"]);
    assert_eq!(inputs["env"].description.as_deref(), Some("where"));
    assert_eq!(inputs["dry"].kind, InputType::Boolean);
    assert_eq!(inputs["n"].default.as_deref(), Some("3"));
    assert_eq!(inputs["s"].kind, InputType::String);
    refused(&[
        (
            "choice without options",
            "on: { inputs: { e: { type: choice } } }\njobs: { j: { steps: [{ run: x }] } }\n",
            1,
            20,
            "input e is a choice and needs options",
        ),
        (
            "default not an option",
            "on: { inputs: { e: { type: choice, options: [a], default: b } } }\njobs: { j: { steps: [{ run: x }] } }\n",
            1,
            59,
            "input e: the default \"b\" is not one of its options: a",
        ),
        (
            "options on a string",
            "on: { inputs: { e: { options: [a] } } }\njobs: { j: { steps: [{ run: x }] } }\n",
            1,
            31,
            "input e: options are for type: choice",
        ),
        (
            "unknown type",
            "on: { inputs: { e: { type: list } } }\njobs: { j: { steps: [{ run: x }] } }\n",
            1,
            28,
            "input e: type must be string, choice, boolean or number",
        ),
        (
            "number default",
            "on: { inputs: { e: { type: number, default: ten } } }\njobs: { j: { steps: [{ run: x }] } }\n",
            1,
            45,
            "is not a number",
        ),
    ]);
}

#[test]
fn merge_keys_share_keys_between_jobs_and_errors_point_into_the_anchor() {
    let p = ok(r#"
        jobs:
          .defaults: &defaults
            runs-on: linux
            timeout: 10m
            env: { A: "1" }
          a:
            <<: *defaults
            steps: [{ run: x }]
          b:
            <<: [*defaults]
            timeout: 5m
            steps: [{ run: x }]
    "#);
    let (a, b) = (p.job("a").expect("a"), p.job("b").expect("b"));
    assert_eq!((a.timeout_ms, b.timeout_ms), (600_000, 300_000));
    assert_eq!(b.runs_on["os"], "linux");
    assert_eq!(b.env["A"], "1");
    // A bad value shared through an anchor is reported where it is written.
    let errors = parse(
        "gantry.yml",
        &dedent(
            r"
            jobs:
              .defaults: &defaults
                timeout: soon
              a:
                <<: *defaults
                steps: [{ run: x }]
            ",
        ),
    )
    .expect_err("bad timeout");
    has(
        &errors,
        "gantry.yml",
        3,
        14,
        "timeout \"soon\" is not a duration",
    );
}

#[test]
fn top_level_hidden_keys_hold_anchors_as_in_gitlab() {
    let p = ok(r#"
        .defaults: &defaults
          runs-on: linux
          env: { A: "1" }
        .more: { anything: [goes, here] }
        jobs:
          a:
            <<: *defaults
            steps: [{ run: x }]
    "#);
    assert_eq!(p.jobs.len(), 1);
    assert_eq!(p.job("a").expect("a").env["A"], "1");
    // A GitLab habit: a template at the top level, extended by a job. The error says
    // where templates live.
    refused(&[(
        "a template at the top level",
        ".base: { runs-on: linux }\njobs:\n  j: { extends: .base, steps: [{ run: x }] }\n",
        3,
        17,
        "a template is a job under jobs: whose name starts with \".\"; a top-level .key only holds YAML anchors",
    )]);
}

#[test]
fn merge_key_bombs_are_refused_at_the_node_limit() {
    // Each level merges the one below and adds ten aliases of it: billions of nodes if
    // expanded, refused by the node count (aliases and merged entries counted).
    let mut text = String::from(".l0: &l0 { a: x, b: x, c: x, d: x, e: x, f: x, g: x, h: x }\n");
    for level in 1..10 {
        let prev = level - 1;
        let aliases: Vec<String> = (0..10).map(|i| format!("k{i}: *l{prev}")).collect();
        writeln!(
            text,
            ".l{level}: &l{level} {{ <<: *l{prev}, {} }}",
            aliases.join(", ")
        )
        .expect("writing to a String cannot fail");
    }
    text.push_str("jobs: { a: { <<: *l9, steps: [{ run: x }] } }\n");
    let errors = parse("gantry.yml", &text).expect_err("too many nodes");
    assert!(
        errors.0.iter().any(|e| e.message.contains("YAML nodes")),
        "{errors}"
    );
}

#[test]
fn templates_are_extended_deeply_and_never_run() {
    let p = ok(r"
        jobs:
          .base:
            runs-on: linux
            env: { A: base, B: base }
            cache: { key: k, paths: [target/] }
          .rust:
            extends: .base
            image: rust:1.80
            env: { B: rust }
          test:
            extends: [.rust]
            env: { C: test }
            steps: [{ run: cargo test }]
          lint:
            extends: [.base, .rust]
            image: rust:1.81
            steps: [{ run: cargo clippy }]
    ");
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["test", "lint"], "templates do not run");
    let test = p.job("test").expect("test");
    assert_eq!(test.env["A"], "base");
    assert_eq!(test.env["B"], "rust");
    assert_eq!(test.env["C"], "test");
    assert_eq!(
        test.image.as_ref().map(|i| i.name.as_str()),
        Some("rust:1.80")
    );
    assert_eq!(test.caches.len(), 1);
    let lint = p.job("lint").expect("lint");
    assert_eq!(
        lint.image.as_ref().map(|i| i.name.as_str()),
        Some("rust:1.81")
    );
    refused(&[
        (
            "extends cycle",
            "jobs:\n  .a: { extends: .b }\n  .b: { extends: .a }\n  j: { extends: .a, steps: [{ run: x }] }\n",
            3,
            18,
            "extends form a cycle: .a -> .b -> .a",
        ),
        (
            "extends an unknown template",
            "jobs:\n  .a: {}\n  j: { extends: .b, steps: [{ run: x }] }\n",
            3,
            17,
            "extends names \".b\", which is not a template in this file; templates are: .a",
        ),
        (
            "extends a job",
            "jobs:\n  k: { steps: [{ run: x }] }\n  j: { extends: k, steps: [{ run: x }] }\n",
            3,
            17,
            "which is not a template",
        ),
        (
            "only templates",
            "jobs:\n  .a: { steps: [{ run: x }] }\n",
            2,
            3,
            "jobs has only templates",
        ),
        (
            "a template's mistake shows where it is written",
            "jobs:\n  .a: { retry: 99 }\n  j: { extends: .a, steps: [{ run: x }] }\n",
            2,
            16,
            "retry is 99; the most is 10",
        ),
    ]);
}

#[test]
fn includes_bring_jobs_and_settings_from_other_files_of_the_repository() {
    let shared = [
        (
            "ci/templates.yml",
            r#"
            env: { SHARED: "1" }
            jobs:
              .node: { image: node:20, runs-on: linux }
              lint: { extends: .node, steps: [{ run: npm run lint }] }
            "#,
        ),
        (
            "ci/more.yml",
            r"
            include: ci/templates.yml
            environments:
              staging: { select: { role: web } }
            ",
        ),
    ];
    let p = ok_with(
        &shared,
        r#"
        include: [ci/more.yml, /ci/templates.yml]
        env: { OWN: "2" }
        jobs:
          test:
            extends: .node
            needs: lint
            steps: [{ run: npm test }]
          lint:
            timeout: 5m
    "#,
    );
    assert_eq!(p.env["SHARED"], "1");
    assert_eq!(p.env["OWN"], "2");
    assert!(p.environments.contains_key("staging"));
    let lint = p.job("lint").expect("lint");
    assert_eq!(lint.timeout_ms, 300_000, "the including file wins");
    assert_eq!(lint.steps[0].run, "npm run lint");
    let test = p.job("test").expect("test");
    assert_eq!(
        test.image.as_ref().map(|i| i.name.as_str()),
        Some("node:20")
    );
}

#[test]
fn includes_are_refused_with_the_chain_and_the_included_file_s_positions() {
    let cyclic = [
        ("a.yml", "include: b.yml\njobs: {}\n"),
        ("b.yml", "include: a.yml\n"),
    ];
    let errors = errors_with(
        &cyclic,
        "include: a.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    );
    has(
        &errors,
        "b.yml",
        1,
        10,
        "includes form a cycle: gantry.yml -> a.yml -> b.yml -> a.yml",
    );
    let back = [("a.yml", "include: gantry.yml\n")];
    let errors = errors_with(
        &back,
        "include: a.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    );
    has(
        &errors,
        "a.yml",
        1,
        10,
        "includes form a cycle: gantry.yml -> a.yml -> gantry.yml",
    );
    let errors = errors_with(
        &[],
        "include: nope.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    );
    has(
        &errors,
        "gantry.yml",
        1,
        10,
        "cannot read nope.yml: no file nope.yml in the repository",
    );
    let errors = errors_with(
        &[],
        "include: ../up.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    );
    has(&errors, "gantry.yml", 1, 10, "must stay in the repository");
    let with_name = [(
        "t.yml",
        "name: other\njobs: { k: { retry: many, steps: [{ run: x }] } }\n",
    )];
    let errors = errors_with(
        &with_name,
        "include: t.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    );
    has(&errors, "t.yml", 1, 1, "an included file may define include, env, environments, jobs; name belongs in the file that includes it");
    has(&errors, "t.yml", 2, 21, "retry must be a whole number");
    // A standalone parse has no repository to read from.
    let errors = parse(
        "gantry.yml",
        "include: t.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    )
    .expect_err("no files");
    assert!(
        errors
            .to_string()
            .contains("gantry.yml:1:10: cannot read t.yml"),
        "{errors}"
    );
    // Includes nest at most eight files deep.
    let chain: Vec<(String, String)> = (0..12)
        .map(|i| (format!("f{i}.yml"), format!("include: f{}.yml\n", i + 1)))
        .collect();
    let list: Vec<(&str, &str)> = chain
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let errors = errors_with(
        &list,
        "include: f0.yml\njobs: { j: { steps: [{ run: x }] } }\n",
    );
    assert!(
        errors
            .to_string()
            .contains("includes go deeper than 8 files"),
        "{errors}"
    );
}

const CALLED: &str = r#"
    on:
      call: { secrets: [DEPLOY_TOKEN] }
      inputs:
        region: { type: choice, options: [eu, us], required: true }
        dry: { type: boolean, default: "false" }
    env: { REGION: "${{ inputs.region }}" }
    environments:
      eu: { select: { region: eu } }
    jobs:
      plan:
        outputs: { id: "${{ steps.p.outputs.id }}" }
        steps:
          - id: p
            run: plan --region ${{ inputs.region }} --token ${{ secrets.DEPLOY_TOKEN }}
      apply:
        needs: plan
        if: inputs.dry == 'false'
        environment: ${{ inputs.region }}
        steps: [{ run: "apply ${{ needs.plan.outputs.id }}" }]
"#;

#[test]
fn called_pipelines_run_under_the_caller_s_name_with_its_inputs_and_secrets() {
    let p = ok_with(
        &[("ci/deploy.yml", CALLED)],
        r#"
        on: { inputs: { where: { type: choice, options: [eu, us], default: eu } } }
        jobs:
          build: { steps: [{ run: make }] }
          deploy-eu:
            uses: ci/deploy.yml
            needs: build
            if: branch == 'main'
            with: { region: "${{ inputs.where }}" }
            secrets: { DEPLOY_TOKEN: "${{ secrets.EU_TOKEN }}" }
          notify:
            needs: deploy-eu
            steps: [{ run: echo done }]
    "#,
    );
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        ["build", "deploy-eu/plan", "deploy-eu/apply", "notify"]
    );
    let plan = p.job("deploy-eu/plan").expect("plan");
    assert_eq!(
        plan.needs,
        ["build"],
        "the first called jobs wait for the caller's needs"
    );
    assert_eq!(plan.called_by.as_deref(), Some("deploy-eu"));
    assert_eq!(
        plan.steps[0].run,
        "plan --region ${{ inputs.where }} --token ${{ secrets.EU_TOKEN }}"
    );
    assert_eq!(plan.env["REGION"], "${{ inputs.where }}");
    assert!(crate::referenced_secrets(plan).contains("EU_TOKEN"));
    let apply = p.job("deploy-eu/apply").expect("apply");
    assert_eq!(apply.needs, ["deploy-eu/plan"]);
    assert_eq!(
        apply.steps[0].run,
        "apply ${{ needs.deploy-eu/plan.outputs.id }}"
    );
    assert_eq!(
        apply.environment.as_ref().map(|e| e.name.as_str()),
        Some("${{ inputs.where }}")
    );
    // The caller's if is added to each called job; the called if binds its input.
    let main = StaticContext {
        branch: "main".into(),
        ..StaticContext::default()
    };
    assert_eq!(
        apply.condition.fold(&main, &BTreeMap::new()),
        StatusExpr::Const(true),
        "branch main and dry left at its default false"
    );
    let dev = StaticContext {
        branch: "dev".into(),
        ..StaticContext::default()
    };
    assert_eq!(
        plan.condition.fold(&dev, &BTreeMap::new()),
        StatusExpr::Const(false)
    );
    let notify = p.job("notify").expect("notify");
    assert_eq!(notify.needs, ["deploy-eu/plan", "deploy-eu/apply"]);
    assert!(p.environments.contains_key("eu"));
}

#[test]
fn calls_are_refused_with_the_reason() {
    let lib = [
        ("ci/deploy.yml", CALLED),
        ("ci/plain.yml", "jobs: { a: { steps: [{ run: x }] } }\n"),
    ];
    let caller = |body: &str| format!("jobs:\n  d:\n    uses: ci/deploy.yml\n{body}");
    let cases: &[(&str, String, &str, usize, usize, &str)] = &[
        (
            "missing required input",
            caller("    secrets: { DEPLOY_TOKEN: \"${{ secrets.T }}\" }\n"),
            "gantry.yml",
            3,
            11,
            "ci/deploy.yml requires input region; give it under with:",
        ),
        (
            "input of the wrong value",
            caller("    with: { region: mars }\n    secrets: { DEPLOY_TOKEN: \"${{ secrets.T }}\" }\n"),
            "gantry.yml",
            4,
            21,
            "with.region: \"mars\" is not one of its options: eu, us",
        ),
        (
            "unknown input",
            caller("    with: { region: eu, color: red }\n    secrets: { DEPLOY_TOKEN: \"${{ secrets.T }}\" }\n"),
            "gantry.yml",
            4,
            25,
            "ci/deploy.yml has no input color; its inputs are: dry, region",
        ),
        (
            "secret not passed",
            caller("    with: { region: eu }\n"),
            "gantry.yml",
            3,
            11,
            "ci/deploy.yml needs the secrets DEPLOY_TOKEN",
        ),
        (
            "secret passed as text",
            caller("    with: { region: eu }\n    secrets: { DEPLOY_TOKEN: abc }\n"),
            "gantry.yml",
            5,
            30,
            "secrets.DEPLOY_TOKEN must be ${{ secrets.NAME }}",
        ),
        (
            "status function in the caller's if",
            caller("    if: failure()\n    with: { region: eu }\n    secrets: { DEPLOY_TOKEN: \"${{ secrets.T }}\" }\n"),
            "gantry.yml",
            4,
            9,
            "may test branch, event, inputs and env, not success()",
        ),
        (
            "other keys on a calling job",
            caller("    steps: [{ run: x }]\n"),
            "gantry.yml",
            4,
            5,
            "unknown key \"steps\" in job d (it calls a pipeline with uses:); allowed keys are: uses, with, secrets, needs, if",
        ),
        (
            "a file that cannot be called",
            "jobs:\n  d: { uses: ci/plain.yml }\n".to_owned(),
            "gantry.yml",
            2,
            14,
            "ci/plain.yml cannot be called: it has no on.call",
        ),
        (
            "outputs of a called pipeline",
            caller("    with: { region: eu }\n    secrets: { DEPLOY_TOKEN: \"${{ secrets.T }}\" }\n  n:\n    needs: d\n    steps: [{ run: \"${{ needs.d.outputs.id }}\" }]\n"),
            "gantry.yml",
            8,
            20,
            "d calls a pipeline, whose outputs are not passed on",
        ),
    ];
    let mut failures = Vec::new();
    for (name, text, file, line, column, needle) in cases {
        match load("gantry.yml", text, &files(&lib)) {
            Ok(_) => failures.push(format!("{name}: loaded, expected an error")),
            Err(errors) => {
                if !errors.0.iter().any(|e| {
                    e.file == *file
                        && e.line == *line
                        && e.column == *column
                        && e.message.contains(needle)
                }) {
                    failures.push(format!(
                        "{name}: wanted {file}:{line}:{column} \"{needle}\", got:\n{errors}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    // A called file's own mistakes are reported in it, and calls may not loop.
    let looping = [
        ("a.yml", "on: { call: {} }\njobs: { x: { uses: b.yml } }\n"),
        ("b.yml", "on: { call: {} }\njobs: { y: { uses: a.yml }, z: { retry: lots, steps: [{ run: x }] } }\n"),
    ];
    let errors = errors_with(&looping, "jobs: { top: { uses: a.yml } }\n");
    has(
        &errors,
        "b.yml",
        2,
        20,
        "pipelines calling pipelines form a cycle: gantry.yml -> a.yml -> b.yml -> a.yml",
    );
    has(&errors, "b.yml", 2, 41, "retry must be a whole number");
}

#[test]
fn the_webapp_example_reads_as_its_comments_say() {
    let text = include_str!("../../examples/webapp.yml");
    let p = match parse("examples/webapp.yml", text) {
        Ok(p) => p,
        Err(errors) => panic!("{errors}"),
    };
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lint",
            "unit (18)",
            "unit (20)",
            "integration",
            "build",
            "deploy-staging",
            "smoke-staging",
            "deploy-production"
        ]
    );
    let integration = p.job("integration").expect("integration");
    let services: Vec<&str> = integration
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(services, ["postgres", "redis"]);
    assert!(integration.reports.is_some());
    let build = p.job("build").expect("build");
    assert_eq!(
        build.outputs["version"],
        "${{ steps.version.outputs.value }}"
    );
    let staging = p.job("deploy-staging").expect("staging");
    assert_eq!(
        staging.deploy.as_ref().and_then(|d| d.version.as_deref()),
        Some("${{ needs.build.outputs.version }}")
    );
    assert!(staging
        .environment
        .as_ref()
        .is_some_and(|e| e.url.is_some()));
    assert_eq!(p.environments["production"].approvals, 2);
    assert!(p.concurrency.as_ref().is_some_and(|c| c.cancel_in_progress));
    let unit = p.job("unit (18)").expect("unit");
    assert!(unit.fail_fast);
    assert_eq!(
        unit.image.as_ref().map(|i| i.name.as_str()),
        Some("node:18-bookworm")
    );
    assert!(unit.caches[0].home);
    assert_eq!(unit.runs_on["os"], "linux");
}

#[test]
fn copies_are_bounded_by_the_expansion_budget() {
    // A 200 KiB template under 100 jobs would copy 20 MiB: refused, not built.
    let big = "x".repeat(200 * 1024);
    let mut text = format!("jobs:\n  .big: {{ env: {{ A: \"{big}\" }} }}\n");
    for i in 0..100 {
        let _ = writeln!(text, "  j{i}: {{ extends: .big, steps: [{{ run: x }}] }}");
    }
    let errors = parse("gantry.yml", &text).expect_err("too big");
    assert!(
        errors
            .to_string()
            .contains("expands to more than 16777216 bytes of job text"),
        "{errors}"
    );
}
