//! From the positioned YAML tree to the typed `Pipeline`: key checks, types, matrix
//! expansion, `${{ matrix.x }}` substitution and the graph checks on `needs`.
//!
//! Every problem is recorded with the position of the node it concerns and loading goes
//! on where it can, so one run reports as many problems as practical.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gantry_protocol::{HealthCheck, Hooks, Probe};

use crate::condition::Condition;
use crate::cron::CronSchedule;
use crate::deploy::{
    app_name_problem, environment_name_problem, parse_amount, DeploySpec, DeployStrategy,
    EnvironmentSpec, HostAmount, DEFAULT_ACTIVATE_TIMEOUT_MS, DEFAULT_HOOK_TIMEOUT_MS,
    DEFAULT_KEEP, DEFAULT_STAGE_TIMEOUT_MS, MAX_KEEP,
};
use crate::model::{InputSpec, Job, Pipeline, PushFilter, Step, Triggers};
use crate::outputs::{
    artifact_name_problem, cache_key_problem, path_problem, ArtifactSpec, CacheSpec,
    DEFAULT_EXPIRE_IN_SECS, MAX_EXPIRE_IN_SECS, MAX_OUTPUT_PATHS,
};
use crate::yaml::{self, Kind, Node, Pos};
use crate::{Errors, ParseError};

/// Largest pipeline file accepted, in bytes.
pub const MAX_FILE_SIZE: usize = 1024 * 1024;
/// Most jobs one matrix may expand to, as in GitHub Actions.
pub const MAX_MATRIX_JOBS: usize = 256;
/// Most jobs a pipeline may have after matrix expansion.
pub const MAX_JOBS: usize = 512;
/// Most bytes of job text produced by matrix expansion, so that a large job times a large
/// matrix cannot cost hundreds of MiB.
const MAX_EXPANDED_TEXT: usize = 16 * 1024 * 1024;
/// Default and largest job timeouts.
const DEFAULT_TIMEOUT_MS: u64 = 60 * 60 * 1000;
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 60 * 60 * 1000;
const MAX_RETRY: u32 = 10;

const TOP_KEYS: &[&str] = &["name", "priority", "env", "on", "environments", "jobs"];
const ENVIRONMENT_KEYS: &[&str] = &["select", "approvals", "wait", "branches"];
const DEPLOY_KEYS: &[&str] = &[
    "environment",
    "artifact",
    "app",
    "version",
    "strategy",
    "rolling",
    "canary",
    "blue-green",
    "keep",
    "shared",
    "hooks",
    "health",
    "env",
    "timeouts",
];
const ROLLING_KEYS: &[&str] = &["batch", "failure-budget", "pause"];
const CANARY_KEYS: &[&str] = &["steps", "failure-budget"];
const CANARY_STEP_KEYS: &[&str] = &["percent", "pause"];
const BLUE_GREEN_KEYS: &[&str] = &["ports", "switch"];
const HOOK_KEYS: &[&str] = &[
    "stop",
    "start",
    "restart",
    "pre-start",
    "post-start",
    "timeout",
];
const HEALTH_KEYS: &[&str] = &[
    "http",
    "status",
    "body",
    "tcp",
    "command",
    "interval",
    "timeout",
    "retries",
    "min-healthy",
    "deadline",
];
const TIMEOUT_KEYS: &[&str] = &["stage", "activate"];
const ON_KEYS: &[&str] = &["push", "schedule", "manual", "inputs"];
const PUSH_KEYS: &[&str] = &["branches", "tags", "paths"];
const SCHEDULE_KEYS: &[&str] = &["cron"];
const MANUAL_KEYS: &[&str] = &["inputs"];
const INPUT_KEYS: &[&str] = &["default", "description"];
const JOB_KEYS: &[&str] = &[
    "runs-on",
    "steps",
    "needs",
    "strategy",
    "matrix",
    "timeout",
    "retry",
    "continue-on-error",
    "env",
    "image",
    "if",
    "when",
    "artifacts",
    "cache",
    "download",
    "deploy",
];
const ARTIFACT_KEYS: &[&str] = &["name", "paths", "expire-in"];
const CACHE_KEYS: &[&str] = &["key", "paths", "restore-keys"];
const STRATEGY_KEYS: &[&str] = &["matrix"];
const STEP_KEYS: &[&str] = &["run", "name", "working-directory", "env"];

struct Ctx {
    file: String,
    errors: Vec<ParseError>,
}

impl Ctx {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(ParseError {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }
}

/// The checked entries of a mapping, by key.
struct Fields<'a> {
    map: HashMap<&'a str, (&'a Node, &'a Node)>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.map.get(key).map(|(_, value)| *value)
    }
}

fn scalar(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Scalar { value, .. } => Some(value),
        _ => None,
    }
}

/// Checks that `node` is a mapping whose keys are distinct scalars from `allowed`.
fn fields<'a>(ctx: &mut Ctx, node: &'a Node, allowed: &[&str], what: &str) -> Option<Fields<'a>> {
    let Kind::Map(entries) = &node.kind else {
        if node.is_null() {
            return Some(Fields {
                map: HashMap::new(),
            });
        }
        ctx.error(
            node.pos,
            format!("{what} must be a mapping, found {}", node.type_name()),
        );
        return None;
    };
    let mut map = HashMap::new();
    for (key, value) in entries {
        let Some(name) = scalar(key) else {
            ctx.error(
                key.pos,
                format!("keys of {what} must be scalars, found {}", key.type_name()),
            );
            continue;
        };
        if !allowed.contains(&name) {
            ctx.error(
                key.pos,
                format!(
                    "unknown key \"{name}\" in {what}; allowed keys are: {}",
                    allowed.join(", ")
                ),
            );
            continue;
        }
        if map.insert(name, (key, value)).is_some() {
            ctx.error(key.pos, format!("duplicate key \"{name}\" in {what}"));
        }
    }
    Some(Fields { map })
}

/// Entries of a free-form mapping (env, jobs, inputs), refusing duplicate keys.
fn entries<'a>(ctx: &mut Ctx, node: &'a Node, what: &str) -> Vec<(String, &'a Node, &'a Node)> {
    let Kind::Map(items) = &node.kind else {
        if !node.is_null() {
            ctx.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.type_name()),
            );
        }
        return Vec::new();
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (key, value) in items {
        let Some(name) = scalar(key) else {
            ctx.error(
                key.pos,
                format!("keys of {what} must be scalars, found {}", key.type_name()),
            );
            continue;
        };
        if !seen.insert(name) {
            ctx.error(key.pos, format!("duplicate key \"{name}\" in {what}"));
            continue;
        }
        out.push((name.to_owned(), key, value));
    }
    out
}

fn string(ctx: &mut Ctx, node: &Node, what: &str) -> Option<String> {
    match &node.kind {
        Kind::Scalar { value, .. } if !node.is_null() => Some(value.clone()),
        _ => {
            ctx.error(
                node.pos,
                format!("{what} must be a string, found {}", node.type_name()),
            );
            None
        }
    }
}

/// A string or a list of strings.
fn string_list(ctx: &mut Ctx, node: &Node, what: &str) -> Vec<(String, Pos)> {
    match &node.kind {
        Kind::Seq(items) => items
            .iter()
            .filter_map(|item| {
                string(ctx, item, &format!("each entry of {what}")).map(|s| (s, item.pos))
            })
            .collect(),
        Kind::Scalar { .. } if !node.is_null() => string(ctx, node, what)
            .map(|s| vec![(s, node.pos)])
            .unwrap_or_default(),
        _ => {
            ctx.error(
                node.pos,
                format!(
                    "{what} must be a string or a list of strings, found {}",
                    node.type_name()
                ),
            );
            Vec::new()
        }
    }
}

fn boolean(ctx: &mut Ctx, node: &Node, what: &str) -> Option<bool> {
    match scalar(node) {
        Some("true" | "True" | "TRUE") => Some(true),
        Some("false" | "False" | "FALSE") => Some(false),
        _ => {
            ctx.error(node.pos, format!("{what} must be true or false"));
            None
        }
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 255
}

fn is_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
        })
}

fn is_job_key(key: &str) -> bool {
    (1..=100).contains(&key.len())
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// A templated string with the position of the node it came from.
#[derive(Clone)]
struct Text {
    value: String,
    pos: Pos,
}

type KeyedTexts = Vec<(String, Text)>;

fn env_map(ctx: &mut Ctx, node: &Node, what: &str) -> KeyedTexts {
    let mut out = Vec::new();
    for (name, key, value) in entries(ctx, node, what) {
        if !is_env_name(&name) {
            ctx.error(
                key.pos,
                format!("environment variable name \"{name}\" must be letters, digits and _, not starting with a digit"),
            );
            continue;
        }
        let text = if value.is_null() {
            Some(String::new())
        } else {
            string(ctx, value, &format!("the value of {name}"))
        };
        if let Some(text) = text {
            out.push((
                name,
                Text {
                    value: text,
                    pos: value.pos,
                },
            ));
        }
    }
    out
}

/// A duration that does not parse (or overflows 64-bit milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("\"{text}\" is not a duration; expected numbers with units ms, s, m, h or d, like 30m, 1h30m or 7d")]
pub struct DurationError {
    pub text: String,
}

/// Parses `30m`, `90s`, `1h30m`, `500ms`.
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    let bad = || DurationError {
        text: text.to_owned(),
    };
    let bytes = text.trim().as_bytes();
    if bytes.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i || i - start > 12 {
            return Err(bad());
        }
        let number: u64 = text.trim()[start..i].parse().map_err(|_| bad())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let scale = match &text.trim()[unit_start..i] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        total = number
            .checked_mul(scale)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

struct RawStep {
    name: Option<Text>,
    run: Text,
    working_directory: Option<String>,
    env: KeyedTexts,
}

struct RawJob {
    key: String,
    pos: Pos,
    needs: Vec<(String, Pos)>,
    /// Matrix combinations in order, each with its keys in matrix order; one empty
    /// combination for a plain job.
    combos: Vec<Vec<(String, String)>>,
    is_matrix: bool,
    runs_on: KeyedTexts,
    steps: Vec<RawStep>,
    env: KeyedTexts,
    timeout_ms: u64,
    retry: u32,
    continue_on_error: bool,
    condition: Condition,
    manual: bool,
    image: Option<Text>,
    artifacts: Option<RawArtifacts>,
    cache: Option<RawCache>,
    /// `download:` as written: `None` takes every artifact of the job's needs.
    download: Option<Vec<(String, Pos)>>,
    /// `deploy:`, with the position of its artifact name (checked against the needs).
    deploy: Option<(DeploySpec, Pos)>,
}

struct RawArtifacts {
    pos: Pos,
    name: Option<Text>,
    paths: Vec<String>,
    expire_in_secs: u64,
}

struct RawCache {
    key: Text,
    restore_keys: Vec<Text>,
    paths: Vec<String>,
}

/// Parses a pipeline file. See the crate documentation.
pub fn parse(file_name: &str, text: &str) -> Result<Pipeline, Errors> {
    let mut ctx = Ctx {
        file: file_name.to_owned(),
        errors: Vec::new(),
    };
    let start = Pos { line: 1, column: 1 };
    if text.len() > MAX_FILE_SIZE {
        ctx.error(
            start,
            format!(
                "the file is {} bytes; the most is {MAX_FILE_SIZE}",
                text.len()
            ),
        );
        return Err(Errors(ctx.errors));
    }
    let root = match yaml::load(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            ctx.error(
                start,
                "the file is empty; expected a mapping with a jobs key",
            );
            return Err(Errors(ctx.errors));
        }
        Err(err) => {
            ctx.error(err.pos, err.message);
            return Err(Errors(ctx.errors));
        }
    };
    let pipeline = load_pipeline(&mut ctx, file_name, &root);
    finish(ctx, pipeline)
}

fn finish(mut ctx: Ctx, pipeline: Option<Pipeline>) -> Result<Pipeline, Errors> {
    if ctx.errors.is_empty() {
        if let Some(pipeline) = pipeline {
            return Ok(pipeline);
        }
        ctx.error(Pos { line: 1, column: 1 }, "the pipeline is not valid");
    }
    ctx.errors.sort_by_key(|e| (e.line, e.column));
    ctx.errors.dedup();
    Err(Errors(ctx.errors))
}

fn default_name(file_name: &str) -> String {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    let stem = base
        .strip_suffix(".yml")
        .or_else(|| base.strip_suffix(".yaml"))
        .unwrap_or(base);
    stem.to_owned()
}

fn load_pipeline(ctx: &mut Ctx, file_name: &str, root: &Node) -> Option<Pipeline> {
    if !matches!(root.kind, Kind::Map(_)) {
        ctx.error(
            root.pos,
            format!(
                "a pipeline file must be a mapping with a jobs key, found {}",
                root.type_name()
            ),
        );
        return None;
    }
    let top = fields(ctx, root, TOP_KEYS, "the pipeline")?;
    let name = match top.get("name") {
        Some(node) => string(ctx, node, "name").unwrap_or_default(),
        None => default_name(file_name),
    };
    let priority = match top.get("priority") {
        Some(node) => {
            let parsed = scalar(node).and_then(|s| s.parse::<i32>().ok());
            if parsed.is_none() {
                ctx.error(
                    node.pos,
                    "priority must be an integer (higher dispatches first)",
                );
            }
            parsed.unwrap_or(0)
        }
        None => 0,
    };
    let env = top
        .get("env")
        .map(|node| env_map(ctx, node, "env"))
        .unwrap_or_default()
        .into_iter()
        .map(|(k, t)| (k, t.value))
        .collect();
    let triggers = top
        .get("on")
        .map(|node| load_triggers(ctx, node))
        .unwrap_or_default();
    let Some(jobs_node) = top.get("jobs") else {
        ctx.error(
            root.pos,
            "the pipeline has no jobs key; expected jobs: with at least one job",
        );
        return None;
    };
    let environments = top
        .get("environments")
        .map(|node| load_environments(ctx, node))
        .unwrap_or_default();
    let jobs = load_jobs(ctx, jobs_node)?;
    Some(Pipeline {
        name,
        priority,
        env,
        triggers,
        environments,
        jobs,
    })
}

fn load_triggers(ctx: &mut Ctx, node: &Node) -> Triggers {
    let mut triggers = Triggers::default();
    // Shorthand as in GitHub Actions: `on: push` or `on: [push, manual]`.
    if matches!(node.kind, Kind::Seq(_))
        || (matches!(node.kind, Kind::Scalar { .. }) && !node.is_null())
    {
        for (event, pos) in string_list(ctx, node, "on") {
            match event.as_str() {
                "push" => triggers.push = Some(PushFilter::default()),
                "manual" => {}
                _ => ctx.error(
                    pos,
                    format!("unknown trigger \"{event}\" in on; allowed are push and manual (schedule needs a cron mapping)"),
                ),
            }
        }
        return triggers;
    }
    let Some(on) = fields(ctx, node, ON_KEYS, "on") else {
        return triggers;
    };
    if let Some(push) = on.get("push") {
        if let Some(f) = fields(ctx, push, PUSH_KEYS, "on.push") {
            let mut list = |key: &str| {
                f.get(key)
                    .map(|n| string_list(ctx, n, &format!("on.push.{key}")))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect()
            };
            triggers.push = Some(PushFilter {
                branches: list("branches"),
                tags: list("tags"),
                paths: list("paths"),
            });
        }
    }
    if let Some(schedule) = on.get("schedule") {
        match &schedule.kind {
            Kind::Seq(items) => {
                for item in items {
                    let Some(f) = fields(ctx, item, SCHEDULE_KEYS, "each on.schedule entry") else {
                        continue;
                    };
                    let Some(cron_node) = f.get("cron") else {
                        ctx.error(item.pos, "a schedule entry needs cron: \"minute hour day-of-month month day-of-week\"");
                        continue;
                    };
                    let Some(expr) = string(ctx, cron_node, "cron") else {
                        continue;
                    };
                    match CronSchedule::parse(&expr) {
                        Ok(cron) => triggers.schedules.push(cron),
                        Err(error) => ctx.error(cron_node.pos, error.to_string()),
                    }
                }
            }
            _ => ctx.error(
                schedule.pos,
                format!(
                    "on.schedule must be a list of {{ cron: ... }}, found {}",
                    schedule.type_name()
                ),
            ),
        }
    }
    if let Some(manual) = on.get("manual") {
        if let Some(f) = fields(ctx, manual, MANUAL_KEYS, "on.manual") {
            if let Some(inputs) = f.get("inputs") {
                load_inputs(ctx, inputs, &mut triggers.inputs);
            }
        }
    }
    if let Some(inputs) = on.get("inputs") {
        load_inputs(ctx, inputs, &mut triggers.inputs);
    }
    triggers
}

fn load_inputs(ctx: &mut Ctx, node: &Node, out: &mut BTreeMap<String, InputSpec>) {
    for (name, key, value) in entries(ctx, node, "inputs") {
        if !is_job_key(&name) {
            ctx.error(
                key.pos,
                format!("input name \"{name}\" must be letters, digits, - and _"),
            );
            continue;
        }
        let Some(f) = fields(ctx, value, INPUT_KEYS, &format!("input {name}")) else {
            continue;
        };
        let default = f.get("default").and_then(|n| string(ctx, n, "default"));
        if out.insert(name.clone(), InputSpec { default }).is_some() {
            ctx.error(key.pos, format!("input \"{name}\" is declared twice"));
        }
    }
}

fn load_jobs(ctx: &mut Ctx, node: &Node) -> Option<Vec<Job>> {
    let job_entries = entries(ctx, node, "jobs");
    if job_entries.is_empty() {
        ctx.error(node.pos, "jobs is empty; expected at least one job");
        return None;
    }
    if job_entries.len() > MAX_JOBS {
        ctx.error(
            node.pos,
            format!(
                "the pipeline has {} jobs; the most is {MAX_JOBS}",
                job_entries.len()
            ),
        );
        return None;
    }
    let mut raw_jobs = Vec::new();
    let mut expanded_text = 0usize;
    for (key, key_node, value) in &job_entries {
        if !is_job_key(key) {
            ctx.error(
                key_node.pos,
                format!("job key \"{key}\" must be 1-100 letters, digits, - and _, starting with a letter or _"),
            );
        }
        if let Some(raw) = load_job(ctx, key, key_node.pos, value) {
            expanded_text =
                expanded_text.saturating_add(value.text_size().saturating_mul(raw.combos.len()));
            if expanded_text > MAX_EXPANDED_TEXT {
                ctx.error(
                    key_node.pos,
                    format!(
                        "matrix expansion produces more than {MAX_EXPANDED_TEXT} bytes of jobs"
                    ),
                );
                return None;
            }
            raw_jobs.push(raw);
        }
    }
    let total: usize = raw_jobs.iter().map(|j| j.combos.len()).sum();
    if total > MAX_JOBS {
        ctx.error(
            node.pos,
            format!("the pipeline expands to {total} jobs; the most is {MAX_JOBS}"),
        );
        return None;
    }
    if raw_jobs.len() != job_entries.len() {
        // Some jobs failed to load; graph checks would only add noise.
        return None;
    }
    check_cycles(ctx, &raw_jobs);
    Some(expand(ctx, &raw_jobs))
}

fn load_job(ctx: &mut Ctx, key: &str, pos: Pos, node: &Node) -> Option<RawJob> {
    let what = format!("job {key}");
    let f = fields(ctx, node, JOB_KEYS, &what)?;
    let needs = f
        .get("needs")
        .map(|n| string_list(ctx, n, "needs"))
        .unwrap_or_default();
    let matrix_node = match (f.get("strategy"), f.get("matrix")) {
        (Some(strategy), direct) => {
            if let Some(direct) = direct {
                ctx.error(
                    direct.pos,
                    "give the matrix either under strategy or directly under the job, not both",
                );
            }
            fields(ctx, strategy, STRATEGY_KEYS, "strategy").and_then(|s| s.get("matrix"))
        }
        (None, direct) => direct,
    };
    let (combos, is_matrix) = match matrix_node {
        Some(m) => (expand_matrix(ctx, m)?, true),
        None => (vec![Vec::new()], false),
    };
    let runs_on = f
        .get("runs-on")
        .map(|n| load_labels(ctx, n))
        .unwrap_or_default();
    let deploy = f.get("deploy").and_then(|n| load_deploy(ctx, n));
    let mut steps = Vec::new();
    match f.get("steps") {
        None if f.get("deploy").is_some() => {}
        Some(steps_node) if f.get("deploy").is_some() => ctx.error(
            steps_node.pos,
            "a deploy job runs no steps: the coordinator deploys; put commands for the hosts under deploy.hooks",
        ),
        None => ctx.error(
            pos,
            format!("job {key} has no steps; expected steps: [{{ run: ... }}]"),
        ),
        Some(steps_node) => match &steps_node.kind {
            Kind::Seq(items) if !items.is_empty() => {
                for item in items {
                    if let Some(step) = load_step(ctx, item) {
                        steps.push(step);
                    }
                }
            }
            Kind::Seq(_) => ctx.error(
                steps_node.pos,
                format!("job {key} has no steps; expected at least one {{ run: ... }}"),
            ),
            _ if steps_node.is_null() => ctx.error(
                steps_node.pos,
                format!("job {key} has no steps; expected at least one {{ run: ... }}"),
            ),
            _ => ctx.error(
                steps_node.pos,
                format!("steps must be a list, found {}", steps_node.type_name()),
            ),
        },
    }
    let env = f
        .get("env")
        .map(|n| env_map(ctx, n, "env"))
        .unwrap_or_default();
    let timeout_ms = match f.get("timeout") {
        None => DEFAULT_TIMEOUT_MS,
        Some(n) => match scalar(n).map(parse_duration) {
            Some(Ok(ms)) if ms > 0 && ms <= MAX_TIMEOUT_MS => ms,
            Some(Ok(_)) => {
                ctx.error(n.pos, "timeout must be more than 0 and at most 168h");
                DEFAULT_TIMEOUT_MS
            }
            Some(Err(message)) => {
                ctx.error(n.pos, format!("timeout {message}"));
                DEFAULT_TIMEOUT_MS
            }
            None => {
                ctx.error(
                    n.pos,
                    format!(
                        "timeout must be a duration like 30m, found {}",
                        n.type_name()
                    ),
                );
                DEFAULT_TIMEOUT_MS
            }
        },
    };
    let retry = match f.get("retry") {
        None => 0,
        Some(n) => match scalar(n).and_then(|s| s.parse::<u64>().ok()) {
            Some(r) if r <= u64::from(MAX_RETRY) => r as u32,
            Some(r) => {
                ctx.error(n.pos, format!("retry is {r}; the most is {MAX_RETRY}"));
                0
            }
            None => {
                ctx.error(
                    n.pos,
                    format!("retry must be a whole number from 0 to {MAX_RETRY}"),
                );
                0
            }
        },
    };
    let continue_on_error = f
        .get("continue-on-error")
        .and_then(|n| boolean(ctx, n, "continue-on-error"))
        .unwrap_or(false);
    let condition = match f.get("if") {
        None => Condition::default(),
        Some(n) => load_condition(ctx, n, &combos).unwrap_or_default(),
    };
    let manual = match f.get("when") {
        None => false,
        Some(n) => match scalar(n) {
            Some("manual") => true,
            Some("auto") => false,
            _ => {
                ctx.error(n.pos, "when must be manual (wait for approval) or auto");
                false
            }
        },
    };
    let image = f
        .get("image")
        .and_then(|n| string(ctx, n, "image").map(|value| Text { value, pos: n.pos }));
    let artifacts = f.get("artifacts").and_then(|n| load_artifacts(ctx, n));
    let cache = f.get("cache").and_then(|n| load_cache(ctx, n));
    let download = f.get("download").map(|n| {
        if matches!(n.kind, Kind::Seq(_)) {
            string_list(ctx, n, "download")
        } else {
            ctx.error(
                n.pos,
                "download must be a list of artifact names, e.g. download: [app] (or [] for none)",
            );
            Vec::new()
        }
    });
    Some(RawJob {
        key: key.to_owned(),
        pos,
        needs,
        combos,
        is_matrix,
        runs_on,
        steps,
        env,
        timeout_ms,
        retry,
        continue_on_error,
        condition,
        manual,
        image,
        artifacts,
        cache,
        download,
        deploy,
    })
}

/// A duration option in milliseconds, or the default when absent.
fn duration_field(ctx: &mut Ctx, f: &Fields<'_>, key: &str, what: &str, default: u64) -> u64 {
    let Some(n) = f.get(key) else {
        return default;
    };
    match scalar(n).map(parse_duration) {
        Some(Ok(ms)) => ms,
        Some(Err(message)) => {
            ctx.error(n.pos, format!("{what}.{key} {message}"));
            default
        }
        None => {
            ctx.error(n.pos, format!("{what}.{key} must be a duration like 30s"));
            default
        }
    }
}

/// A whole number option, or the default when absent.
fn number_field(
    ctx: &mut Ctx,
    f: &Fields<'_>,
    key: &str,
    what: &str,
    default: u64,
    max: u64,
) -> u64 {
    let Some(n) = f.get(key) else {
        return default;
    };
    match scalar(n).and_then(|s| s.parse::<u64>().ok()) {
        Some(v) if v <= max => v,
        _ => {
            ctx.error(
                n.pos,
                format!("{what}.{key} must be a whole number from 0 to {max}"),
            );
            default
        }
    }
}

fn amount_field(
    ctx: &mut Ctx,
    f: &Fields<'_>,
    key: &str,
    what: &str,
    default: HostAmount,
) -> HostAmount {
    let Some(n) = f.get(key) else {
        return default;
    };
    match scalar(n).map(parse_amount) {
        Some(Ok(a)) => a,
        Some(Err(message)) => {
            ctx.error(n.pos, format!("{what}.{key}: {message}"));
            default
        }
        None => {
            ctx.error(
                n.pos,
                format!("{what}.{key} must be a number of hosts or a percentage like 25%"),
            );
            default
        }
    }
}

fn load_environments(ctx: &mut Ctx, node: &Node) -> BTreeMap<String, EnvironmentSpec> {
    let mut out = BTreeMap::new();
    for (name, key, value) in entries(ctx, node, "environments") {
        if let Some(problem) = environment_name_problem(&name) {
            ctx.error(key.pos, format!("environment name \"{name}\" {problem}"));
            continue;
        }
        let what = format!("environment {name}");
        let Some(f) = fields(ctx, value, ENVIRONMENT_KEYS, &what) else {
            continue;
        };
        let select = f
            .get("select")
            .map(|n| {
                if let Kind::Scalar { value, .. } = &n.kind {
                    // "role=web,site=paris", as on the command line.
                    let mut labels = BTreeMap::new();
                    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        match pair.split_once('=') {
                            Some((k, v)) if is_label_key(k) => {
                                labels.insert(k.to_owned(), v.to_owned());
                            }
                            _ => ctx.error(
                                n.pos,
                                format!(
                                    "select entry \"{pair}\" must be key=value with a label key"
                                ),
                            ),
                        }
                    }
                    labels
                } else {
                    load_labels(ctx, n)
                        .into_iter()
                        .map(|(k, t)| (k, t.value))
                        .collect()
                }
            })
            .unwrap_or_default();
        if select.is_empty() {
            ctx.error(
                value.pos,
                format!(
                    "{what} needs select: the labels its hosts carry, e.g. select: {{ role: web }}"
                ),
            );
        }
        let approvals = number_field(ctx, &f, "approvals", &what, 0, 10) as u32;
        let wait_ms = duration_field(ctx, &f, "wait", &what, 0);
        let branches = f
            .get("branches")
            .map(|n| {
                string_list(ctx, n, "branches")
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            name,
            EnvironmentSpec {
                select,
                approvals,
                wait_ms,
                branches,
            },
        );
    }
    out
}

fn load_deploy(ctx: &mut Ctx, node: &Node) -> Option<(DeploySpec, Pos)> {
    let what = "deploy";
    let f = fields(ctx, node, DEPLOY_KEYS, what)?;
    let required = |ctx: &mut Ctx, key: &str, example: &str| -> Option<(String, Pos)> {
        if let Some(n) = f.get(key) {
            string(ctx, n, &format!("deploy.{key}")).map(|s| (s, n.pos))
        } else {
            ctx.error(
                node.pos,
                format!("deploy needs {key}, e.g. {key}: {example}"),
            );
            None
        }
    };
    let environment = required(ctx, "environment", "production");
    let artifact = required(ctx, "artifact", "app");
    if let Some((name, pos)) = &environment {
        if let Some(problem) = environment_name_problem(name) {
            ctx.error(*pos, format!("environment name \"{name}\" {problem}"));
        }
    }
    let app = match f.get("app") {
        Some(n) => string(ctx, n, "deploy.app").map(|s| (s, n.pos)),
        None => artifact.clone(),
    };
    if let Some((name, pos)) = &app {
        if let Some(problem) = app_name_problem(name) {
            ctx.error(*pos, format!("app name \"{name}\" {problem}"));
        }
    }
    let version = f
        .get("version")
        .and_then(|n| string(ctx, n, "deploy.version"));
    let strategy_name = f
        .get("strategy")
        .and_then(|n| string(ctx, n, "deploy.strategy").map(|s| (s, n.pos)))
        .unwrap_or_else(|| ("rolling".into(), node.pos));
    let strategy = match strategy_name.0.as_str() {
        "rolling" => {
            let r = f
                .get("rolling")
                .and_then(|n| fields(ctx, n, ROLLING_KEYS, "deploy.rolling"));
            let (batch, failure_budget, pause_ms) = match &r {
                Some(r) => (
                    amount_field(ctx, r, "batch", "deploy.rolling", HostAmount::Percent(25)),
                    amount_field(
                        ctx,
                        r,
                        "failure-budget",
                        "deploy.rolling",
                        HostAmount::Count(0),
                    ),
                    duration_field(ctx, r, "pause", "deploy.rolling", 0),
                ),
                None => (HostAmount::Percent(25), HostAmount::Count(0), 0),
            };
            Some(DeployStrategy::Rolling {
                batch,
                failure_budget,
                pause_ms,
            })
        }
        "canary" => {
            let c = f
                .get("canary")
                .and_then(|n| fields(ctx, n, CANARY_KEYS, "deploy.canary"));
            let mut steps = Vec::new();
            let mut failure_budget = HostAmount::Count(0);
            if let Some(c) = &c {
                failure_budget = amount_field(
                    ctx,
                    c,
                    "failure-budget",
                    "deploy.canary",
                    HostAmount::Count(0),
                );
                if let Some(Kind::Seq(items)) = c.get("steps").map(|n| &n.kind) {
                    for item in items {
                        let Some(sf) = fields(ctx, item, CANARY_STEP_KEYS, "a canary step") else {
                            continue;
                        };
                        let percent =
                            number_field(ctx, &sf, "percent", "canary step", 0, 100) as u8;
                        let pause = match sf.get("pause") {
                            Some(n) if scalar(n) == Some("manual") => None,
                            Some(_) => Some(duration_field(ctx, &sf, "pause", "canary step", 0)),
                            None => Some(0),
                        };
                        if percent == 0 {
                            ctx.error(item.pos, "a canary step needs percent: 1 to 100");
                        }
                        steps.push((percent, pause));
                    }
                }
            }
            if steps.is_empty() {
                ctx.error(
                    strategy_name.1,
                    "a canary deployment needs canary.steps, e.g. [{ percent: 10, pause: manual }, { percent: 100 }]",
                );
            }
            Some(DeployStrategy::Canary {
                steps,
                failure_budget,
            })
        }
        "blue-green" => {
            let Some(b) = f
                .get("blue-green")
                .and_then(|n| fields(ctx, n, BLUE_GREEN_KEYS, "deploy.blue-green"))
            else {
                ctx.error(
                    strategy_name.1,
                    "a blue-green deployment needs blue-green: { ports: [8081, 8082], switch: COMMAND }",
                );
                return None;
            };
            let ports: Vec<u16> = b
                .get("ports")
                .map(|n| string_list(ctx, n, "deploy.blue-green.ports"))
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(p, _)| p.parse().ok())
                .collect();
            let switch = b
                .get("switch")
                .and_then(|n| string(ctx, n, "deploy.blue-green.switch"));
            match (ports.as_slice(), switch) {
                (&[blue, green], Some(switch)) if blue != green && blue > 0 && green > 0 => {
                    Some(DeployStrategy::BlueGreen {
                        blue_port: blue,
                        green_port: green,
                        switch,
                    })
                }
                _ => {
                    ctx.error(
                        node.pos,
                        "deploy.blue-green needs ports: [BLUE, GREEN] (two different ports) and switch: COMMAND",
                    );
                    None
                }
            }
        }
        other => {
            ctx.error(
                strategy_name.1,
                format!("unknown strategy \"{other}\"; use rolling, canary or blue-green"),
            );
            None
        }
    };
    let keep = match f.get("keep") {
        Some(n) => match scalar(n).and_then(|s| s.parse::<u32>().ok()) {
            Some(k) if (1..=MAX_KEEP).contains(&k) => k,
            _ => {
                ctx.error(n.pos, format!("deploy.keep must be from 1 to {MAX_KEEP}"));
                DEFAULT_KEEP
            }
        },
        None => DEFAULT_KEEP,
    };
    let shared = f
        .get("shared")
        .map(|n| string_list(ctx, n, "deploy.shared"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(p, pos)| match path_problem(&p) {
            Some(problem) => {
                ctx.error(pos, format!("shared path \"{p}\" {problem}"));
                None
            }
            None => Some(p),
        })
        .collect();
    let hooks = match f
        .get("hooks")
        .and_then(|n| fields(ctx, n, HOOK_KEYS, "deploy.hooks"))
    {
        Some(h) => {
            let mut text = |key: &str| {
                h.get(key)
                    .and_then(|n| string(ctx, n, &format!("deploy.hooks.{key}")))
            };
            Hooks {
                stop: text("stop"),
                start: text("start"),
                restart: text("restart"),
                pre_start: text("pre-start"),
                post_start: text("post-start"),
                timeout_ms: duration_field(
                    ctx,
                    &h,
                    "timeout",
                    "deploy.hooks",
                    DEFAULT_HOOK_TIMEOUT_MS,
                ),
            }
        }
        None => Hooks {
            timeout_ms: DEFAULT_HOOK_TIMEOUT_MS,
            ..Hooks::default()
        },
    };
    let health = f.get("health").and_then(|n| {
        let h = fields(ctx, n, HEALTH_KEYS, "deploy.health")?;
        let text = |ctx: &mut Ctx, key: &str| {
            h.get(key)
                .and_then(|v| string(ctx, v, &format!("deploy.health.{key}")))
        };
        let (http, tcp, command, body) = (
            text(ctx, "http"),
            text(ctx, "tcp"),
            text(ctx, "command"),
            text(ctx, "body"),
        );
        let probe = match (http, tcp, command) {
            (Some(url), None, None) => {
                if !url.starts_with("http://") {
                    ctx.error(n.pos, format!("health.http \"{url}\" must be an http:// URL (probes run on the host, usually against localhost)"));
                }
                let status = number_field(ctx, &h, "status", "deploy.health", 200, 599) as u16;
                Probe::Http { url, status, body }
            }
            (None, Some(address), None) => Probe::Tcp { address },
            (None, None, Some(run)) => Probe::Command { run },
            _ => {
                ctx.error(n.pos, "deploy.health needs exactly one of http: URL, tcp: HOST:PORT or command: COMMAND");
                return None;
            }
        };
        Some(HealthCheck {
            probe,
            interval_ms: duration_field(ctx, &h, "interval", "deploy.health", 1_000).max(10),
            timeout_ms: duration_field(ctx, &h, "timeout", "deploy.health", 2_000).max(10),
            retries: number_field(ctx, &h, "retries", "deploy.health", 3, 100) as u32,
            min_healthy_ms: duration_field(ctx, &h, "min-healthy", "deploy.health", 0),
            deadline_ms: duration_field(ctx, &h, "deadline", "deploy.health", 60_000).max(100),
        })
    });
    let env = f
        .get("env")
        .map(|n| env_map(ctx, n, "deploy.env"))
        .unwrap_or_default()
        .into_iter()
        .map(|(k, t)| (k, t.value))
        .collect();
    let (stage_timeout_ms, activate_timeout_ms) = match f
        .get("timeouts")
        .and_then(|n| fields(ctx, n, TIMEOUT_KEYS, "deploy.timeouts"))
    {
        Some(t) => (
            duration_field(
                ctx,
                &t,
                "stage",
                "deploy.timeouts",
                DEFAULT_STAGE_TIMEOUT_MS,
            ),
            duration_field(
                ctx,
                &t,
                "activate",
                "deploy.timeouts",
                DEFAULT_ACTIVATE_TIMEOUT_MS,
            ),
        ),
        None => (DEFAULT_STAGE_TIMEOUT_MS, DEFAULT_ACTIVATE_TIMEOUT_MS),
    };
    let ((environment, _), (artifact, artifact_pos), (app, _)) = (environment?, artifact?, app?);
    Some((
        DeploySpec {
            environment,
            artifact,
            app,
            version,
            strategy: strategy?,
            keep,
            shared,
            hooks,
            health,
            env,
            stage_timeout_ms,
            activate_timeout_ms,
        },
        artifact_pos,
    ))
}

fn load_artifacts(ctx: &mut Ctx, node: &Node) -> Option<RawArtifacts> {
    let f = fields(ctx, node, ARTIFACT_KEYS, "artifacts")?;
    let name = f
        .get("name")
        .and_then(|n| string(ctx, n, "artifacts.name").map(|value| Text { value, pos: n.pos }));
    let paths = load_paths(ctx, node, f.get("paths"), "artifacts");
    let expire_in_secs = match f.get("expire-in") {
        None => DEFAULT_EXPIRE_IN_SECS,
        Some(n) => match scalar(n).map(parse_duration) {
            Some(Ok(ms)) if ms >= 1000 && ms / 1000 <= MAX_EXPIRE_IN_SECS => ms / 1000,
            Some(Ok(_)) => {
                ctx.error(n.pos, "expire-in must be between 1s and 365d");
                return None;
            }
            Some(Err(message)) => {
                ctx.error(n.pos, format!("expire-in {message}"));
                return None;
            }
            None => {
                ctx.error(
                    n.pos,
                    format!(
                        "expire-in must be a duration like 7d, found {}",
                        n.type_name()
                    ),
                );
                return None;
            }
        },
    };
    Some(RawArtifacts {
        pos: node.pos,
        name,
        paths: paths?,
        expire_in_secs,
    })
}

fn load_cache(ctx: &mut Ctx, node: &Node) -> Option<RawCache> {
    let f = fields(ctx, node, CACHE_KEYS, "cache")?;
    let key = if let Some(n) = f.get("key") {
        string(ctx, n, "cache.key").map(|value| Text { value, pos: n.pos })
    } else {
        ctx.error(
            node.pos,
            "cache needs a key, e.g. key: deps-${{ hashFiles('Cargo.lock') }}",
        );
        None
    };
    let restore_keys = f
        .get("restore-keys")
        .map(|n| {
            let items = match &n.kind {
                Kind::Seq(items) => items.iter().collect(),
                _ => vec![n],
            };
            items
                .into_iter()
                .filter_map(|item| {
                    string(ctx, item, "each restore key").map(|value| Text {
                        value,
                        pos: item.pos,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let paths = load_paths(ctx, node, f.get("paths"), "cache");
    Some(RawCache {
        key: key?,
        restore_keys,
        paths: paths?,
    })
}

/// The `paths:` of an artifact or cache: at least one, each relative and inside the
/// workspace.
fn load_paths(
    ctx: &mut Ctx,
    parent: &Node,
    node: Option<&Node>,
    what: &str,
) -> Option<Vec<String>> {
    let Some(node) = node else {
        ctx.error(
            parent.pos,
            format!("{what} needs paths: the files or directories to keep, e.g. paths: [out/]"),
        );
        return None;
    };
    let paths = string_list(ctx, node, &format!("{what}.paths"));
    if paths.is_empty() {
        ctx.error(
            node.pos,
            format!("{what}.paths is empty; list at least one path"),
        );
        return None;
    }
    if paths.len() > MAX_OUTPUT_PATHS {
        ctx.error(
            node.pos,
            format!(
                "{what}.paths lists {} paths; the most is {MAX_OUTPUT_PATHS}",
                paths.len()
            ),
        );
        return None;
    }
    let mut ok = true;
    for (path, pos) in &paths {
        if let Some(problem) = path_problem(path) {
            ctx.error(*pos, format!("{what} path \"{path}\" {problem}"));
            ok = false;
        }
    }
    ok.then(|| paths.into_iter().map(|(p, _)| p).collect())
}

fn load_condition(
    ctx: &mut Ctx,
    node: &Node,
    combos: &[Vec<(String, String)>],
) -> Option<Condition> {
    let Kind::Scalar { value, plain } = &node.kind else {
        ctx.error(
            node.pos,
            format!(
                "if must be an expression string, found {}",
                node.type_name()
            ),
        );
        return None;
    };
    match Condition::parse(value) {
        Ok(condition) => {
            for name in condition.matrix_names() {
                if !combos.iter().any(|c| c.iter().any(|(k, _)| k == name)) {
                    ctx.error(node.pos, unknown_matrix_key(name, combos));
                }
            }
            Some(condition)
        }
        Err((offset, message)) => {
            // The offset maps onto the line only for a plain scalar on one line.
            let column = if *plain && !value.contains('\n') {
                node.pos.column + offset
            } else {
                node.pos.column
            };
            ctx.error(
                Pos {
                    line: node.pos.line,
                    column,
                },
                format!("invalid if expression: {message}"),
            );
            None
        }
    }
}

fn unknown_matrix_key(name: &str, combos: &[Vec<(String, String)>]) -> String {
    let keys: BTreeSet<&str> = combos.iter().flatten().map(|(k, _)| k.as_str()).collect();
    if keys.is_empty() {
        format!("matrix.{name} is used but the job has no matrix")
    } else {
        format!(
            "unknown matrix key \"{name}\"; matrix keys are: {}",
            keys.into_iter().collect::<Vec<_>>().join(", ")
        )
    }
}

fn load_labels(ctx: &mut Ctx, node: &Node) -> KeyedTexts {
    let mut out: KeyedTexts = Vec::new();
    let mut push = |ctx: &mut Ctx, key: String, value: Text, pos: Pos| {
        if !is_label_key(&key) {
            ctx.error(
                pos,
                format!("label key \"{key}\" must be 1-63 characters of a-z, 0-9, ., _, / and -, starting with a letter or digit"),
            );
        } else if out.iter().any(|(k, _)| *k == key) {
            ctx.error(pos, format!("label \"{key}\" is given twice"));
        } else {
            out.push((key, value));
        }
    };
    match &node.kind {
        Kind::Map(_) => {
            for (key, key_node, value) in entries(ctx, node, "runs-on") {
                if let Some(text) = string(ctx, value, &format!("label {key}")) {
                    push(ctx, key, Text { value: text, pos: value.pos }, key_node.pos);
                }
            }
        }
        Kind::Seq(items) => {
            for item in items {
                let Some(text) = string(ctx, item, "each runs-on entry") else {
                    continue;
                };
                match text.split_once('=') {
                    Some((key, value)) => push(
                        ctx,
                        key.to_owned(),
                        Text { value: value.to_owned(), pos: item.pos },
                        item.pos,
                    ),
                    None => ctx.error(item.pos, format!("runs-on entry \"{text}\" must be \"key=value\"")),
                }
            }
        }
        Kind::Scalar { .. } => ctx.error(
            node.pos,
            format!("runs-on must be a mapping of labels like {{ os: linux }} or a list of \"key=value\", found {}", node.type_name()),
        ),
    }
    out
}

fn load_step(ctx: &mut Ctx, node: &Node) -> Option<RawStep> {
    let f = fields(ctx, node, STEP_KEYS, "a step")?;
    let Some(run_node) = f.get("run") else {
        ctx.error(
            node.pos,
            "a step needs run: with the shell lines to execute",
        );
        return None;
    };
    let run = string(ctx, run_node, "run").map(|value| Text {
        value,
        pos: run_node.pos,
    });
    let name = f
        .get("name")
        .and_then(|n| string(ctx, n, "name").map(|value| Text { value, pos: n.pos }));
    let working_directory = f.get("working-directory").and_then(|n| {
        let dir = string(ctx, n, "working-directory")?;
        let escapes = dir.is_empty()
            || dir.starts_with('/')
            || dir.contains('\\')
            || dir.contains('\0')
            || dir.as_bytes().get(1) == Some(&b':')
            || dir.split('/').any(|part| part == "..");
        if escapes {
            ctx.error(
                n.pos,
                format!("working-directory \"{dir}\" must be a relative path inside the workspace (not absolute, no \"..\")"),
            );
            return None;
        }
        Some(dir)
    });
    let env = f
        .get("env")
        .map(|n| env_map(ctx, n, "env"))
        .unwrap_or_default();
    Some(RawStep {
        name,
        run: run?,
        working_directory,
        env,
    })
}

/// Expands a matrix mapping into its combinations, in order.
fn expand_matrix(ctx: &mut Ctx, node: &Node) -> Option<Vec<Vec<(String, String)>>> {
    let mut axes: Vec<(String, Vec<String>)> = Vec::new();
    let mut includes: Vec<(Vec<(String, String)>, Pos)> = Vec::new();
    let mut excludes: Vec<(Vec<(String, String)>, Pos)> = Vec::new();
    let errors_before = ctx.errors.len();
    for (key, key_node, value) in entries(ctx, node, "matrix") {
        match key.as_str() {
            "include" | "exclude" => {
                let Kind::Seq(items) = &value.kind else {
                    ctx.error(
                        value.pos,
                        format!(
                            "matrix {key} must be a list of mappings, found {}",
                            value.type_name()
                        ),
                    );
                    continue;
                };
                for item in items {
                    let mut combo = Vec::new();
                    for (name, _, v) in entries(ctx, item, &format!("each matrix {key} entry")) {
                        if let Some(s) = string(ctx, v, &format!("matrix value {name}")) {
                            combo.push((name, s));
                        }
                    }
                    if key == "include" {
                        includes.push((combo, item.pos));
                    } else {
                        excludes.push((combo, item.pos));
                    }
                }
            }
            _ => {
                if !is_job_key(&key) {
                    ctx.error(
                        key_node.pos,
                        format!("matrix key \"{key}\" must be letters, digits, - and _"),
                    );
                    continue;
                }
                let Kind::Seq(items) = &value.kind else {
                    ctx.error(
                        value.pos,
                        format!(
                            "matrix {key} must be a list of values, found {}",
                            value.type_name()
                        ),
                    );
                    continue;
                };
                if items.is_empty() {
                    ctx.error(
                        value.pos,
                        format!("matrix {key} is empty; expected at least one value"),
                    );
                    continue;
                }
                let values = items
                    .iter()
                    .filter_map(|item| string(ctx, item, &format!("each value of matrix {key}")))
                    .collect();
                axes.push((key, values));
            }
        }
    }
    if ctx.errors.len() > errors_before {
        return None;
    }
    let product = axes
        .iter()
        .try_fold(1usize, |acc, (_, values)| acc.checked_mul(values.len()))
        .filter(|n| n.saturating_add(includes.len()) <= MAX_MATRIX_JOBS);
    if product.is_none() {
        ctx.error(
            node.pos,
            format!("the matrix expands to more than {MAX_MATRIX_JOBS} jobs"),
        );
        return None;
    }
    let mut combos: Vec<Vec<(String, String)>> = if axes.is_empty() {
        Vec::new()
    } else {
        vec![Vec::new()]
    };
    for (key, values) in &axes {
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                values.iter().map(move |value| {
                    let mut next = combo.clone();
                    next.push((key.clone(), value.clone()));
                    next
                })
            })
            .collect();
    }
    for (exclude, pos) in &excludes {
        if let Some((name, _)) = exclude
            .iter()
            .find(|(k, _)| !axes.iter().any(|(a, _)| a == k))
        {
            ctx.error(
                *pos,
                format!("matrix exclude names \"{name}\", which is not a matrix key"),
            );
            return None;
        }
        combos.retain(|combo| !exclude.iter().all(|kv| combo.contains(kv)));
    }
    // As in GitHub Actions: an include entry extends every combination whose original
    // values it agrees with, and becomes a combination of its own if it agrees with none.
    let original_len = combos.len();
    for (include, _) in &includes {
        let mut merged = false;
        for combo in combos.iter_mut().take(original_len) {
            let agrees = include.iter().all(|(k, v)| {
                !axes.iter().any(|(a, _)| a == k) || combo.iter().any(|(ck, cv)| ck == k && cv == v)
            });
            if agrees {
                merged = true;
                for (k, v) in include {
                    match combo.iter_mut().find(|(ck, _)| ck == k) {
                        Some(slot) => slot.1.clone_from(v),
                        None => combo.push((k.clone(), v.clone())),
                    }
                }
            }
        }
        if !merged {
            combos.push(include.clone());
        }
    }
    if combos.is_empty() {
        ctx.error(node.pos, "the matrix expands to no jobs");
        return None;
    }
    Some(combos)
}

/// Reports every cycle in `needs`, named like `a -> b -> a`, at the need that closes it.
fn check_cycles(ctx: &mut Ctx, jobs: &[RawJob]) {
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.key.as_str(), i))
        .collect();
    let edges: Vec<Vec<(usize, Pos)>> = jobs
        .iter()
        .map(|job| {
            job.needs
                .iter()
                .filter_map(|(name, pos)| index.get(name.as_str()).map(|&i| (i, *pos)))
                .collect()
        })
        .collect();
    // 0 unvisited, 1 on the current path, 2 done.
    let mut state = vec![0u8; jobs.len()];
    for root in 0..jobs.len() {
        if state[root] != 0 {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = 1;
        while let Some(&mut (node, ref mut next_edge)) = path.last_mut() {
            if let Some(&(target, pos)) = edges[node].get(*next_edge) {
                *next_edge += 1;
                match state[target] {
                    0 => {
                        state[target] = 1;
                        path.push((target, 0));
                    }
                    1 => {
                        let from = path.iter().position(|(n, _)| *n == target).unwrap_or(0);
                        let mut names: Vec<&str> = path[from..]
                            .iter()
                            .map(|(n, _)| jobs[*n].key.as_str())
                            .collect();
                        names.push(&jobs[target].key);
                        ctx.error(pos, format!("needs form a cycle: {}", names.join(" -> ")));
                    }
                    _ => {}
                }
            } else {
                state[node] = 2;
                path.pop();
            }
        }
    }
}

fn job_name(key: &str, combo: &[(String, String)], is_matrix: bool) -> String {
    if !is_matrix {
        return key.to_owned();
    }
    let values: Vec<&str> = combo.iter().map(|(_, v)| v.as_str()).collect();
    format!("{key} ({})", values.join(", "))
}

/// Replaces `${{ matrix.x }}` and leaves every other `${{ ... }}` for dispatch time.
fn substitute(
    ctx: &mut Ctx,
    text: &Text,
    combo: &[(String, String)],
    combos: &[Vec<(String, String)>],
) -> String {
    let mut out = String::with_capacity(text.value.len());
    let mut rest = text.value.as_str();
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else {
            ctx.error(text.pos, "unterminated \"${{\"; expected \"}}\"");
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = after[..end].trim();
        if let Some(name) = inner.strip_prefix("matrix.") {
            match combo.iter().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => ctx.error(text.pos, unknown_matrix_key(name, combos)),
            }
        } else {
            out.push_str(&rest[start..start + 3 + end + 2]);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn expand(ctx: &mut Ctx, raw_jobs: &[RawJob]) -> Vec<Job> {
    let mut names_by_key: HashMap<&str, Vec<String>> = HashMap::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for raw in raw_jobs {
        let names: Vec<String> = raw
            .combos
            .iter()
            .map(|c| job_name(&raw.key, c, raw.is_matrix))
            .collect();
        for name in &names {
            if seen.insert(name.clone(), raw.pos).is_some() {
                ctx.error(
                    raw.pos,
                    format!("job name \"{name}\" is produced twice; job names must be unique"),
                );
            }
        }
        names_by_key.insert(&raw.key, names);
    }
    let job_keys: Vec<&str> = raw_jobs.iter().map(|j| j.key.as_str()).collect();
    let mut jobs = Vec::new();
    // The raw job each expanded job came from, for positions in later checks.
    let mut origins: Vec<&RawJob> = Vec::new();
    let mut artifact_names: HashMap<String, Pos> = HashMap::new();
    for raw in raw_jobs {
        let mut needs: Vec<String> = Vec::new();
        for (need, pos) in &raw.needs {
            match names_by_key.get(need.as_str()) {
                Some(names) => {
                    for name in names {
                        if !needs.contains(name) {
                            needs.push(name.clone());
                        }
                    }
                }
                None => ctx.error(
                    *pos,
                    format!(
                        "needs names \"{need}\", which is not a job; jobs are: {}",
                        job_keys.join(", ")
                    ),
                ),
            }
        }
        for combo in &raw.combos {
            let sub = |ctx: &mut Ctx, text: &Text| substitute(ctx, text, combo, &raw.combos);
            let map = |ctx: &mut Ctx, items: &KeyedTexts| -> BTreeMap<String, String> {
                items
                    .iter()
                    .map(|(k, t)| (k.clone(), sub(ctx, t)))
                    .collect()
            };
            let runs_on = map(ctx, &raw.runs_on);
            let env = map(ctx, &raw.env);
            let steps = raw
                .steps
                .iter()
                .map(|step| Step {
                    name: step
                        .name
                        .as_ref()
                        .map(|t| substitute(ctx, t, combo, &raw.combos)),
                    run: substitute(ctx, &step.run, combo, &raw.combos),
                    working_directory: step.working_directory.clone(),
                    env: step
                        .env
                        .iter()
                        .map(|(k, t)| (k.clone(), substitute(ctx, t, combo, &raw.combos)))
                        .collect(),
                })
                .collect();
            let image = raw
                .image
                .as_ref()
                .map(|t| substitute(ctx, t, combo, &raw.combos));
            let name = job_name(&raw.key, combo, raw.is_matrix);
            let artifact = raw.artifacts.as_ref().and_then(|a| {
                let (artifact_name, pos) = match &a.name {
                    Some(text) => (sub(ctx, text), text.pos),
                    None => (name.clone(), a.pos),
                };
                if let Some(problem) = artifact_name_problem(&artifact_name) {
                    ctx.error(pos, format!("artifact name \"{artifact_name}\" {problem}"));
                    return None;
                }
                if let Some(first) = artifact_names.insert(artifact_name.clone(), pos) {
                    ctx.error(
                        pos,
                        format!(
                            "artifact name \"{artifact_name}\" is declared twice (also at line {}); artifact names must be unique in a pipeline (a matrix job can add ${{{{ matrix.NAME }}}} to its name)",
                            first.line
                        ),
                    );
                }
                Some(ArtifactSpec {
                    name: artifact_name,
                    paths: a.paths.clone(),
                    expire_in_secs: a.expire_in_secs,
                })
            });
            let cache = raw.cache.as_ref().and_then(|c| {
                let key = sub(ctx, &c.key);
                let restore_keys: Vec<String> =
                    c.restore_keys.iter().map(|t| sub(ctx, t)).collect();
                let mut ok = true;
                for (text, value) in
                    std::iter::once((&c.key, &key)).chain(c.restore_keys.iter().zip(&restore_keys))
                {
                    if let Some(problem) = cache_key_problem(value) {
                        ctx.error(text.pos, problem);
                        ok = false;
                    }
                }
                ok.then(|| CacheSpec {
                    key,
                    restore_keys,
                    paths: c.paths.clone(),
                })
            });
            let download = raw
                .download
                .as_ref()
                .map(|list| list.iter().map(|(n, _)| n.clone()).collect());
            jobs.push(Job {
                name: job_name(&raw.key, combo, raw.is_matrix),
                key: raw.key.clone(),
                needs: needs.clone(),
                runs_on,
                steps,
                env,
                timeout_ms: raw.timeout_ms,
                retry: raw.retry,
                continue_on_error: raw.continue_on_error,
                condition: raw.condition.clone(),
                manual: raw.manual,
                image,
                matrix: combo.iter().cloned().collect(),
                artifact,
                cache,
                download,
                deploy: raw.deploy.as_ref().map(|(d, _)| d.clone()),
            });
            origins.push(raw);
        }
    }
    check_downloads(ctx, &jobs, &origins);
    jobs
}

/// Every name in a job's `download` must be the artifact of a job it waits for (directly
/// or through other needs), or it could not exist when the job starts.
fn check_downloads(ctx: &mut Ctx, jobs: &[Job], origins: &[&RawJob]) {
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let producer: HashMap<&str, &str> = jobs
        .iter()
        .filter_map(|j| {
            j.artifact
                .as_ref()
                .map(|a| (a.name.as_str(), j.name.as_str()))
        })
        .collect();
    for (job, raw) in jobs.iter().zip(origins) {
        let mut wanted: Vec<(String, Pos)> = raw.download.clone().unwrap_or_default();
        if let Some((deploy, pos)) = &raw.deploy {
            wanted.push((deploy.artifact.clone(), *pos));
        }
        if wanted.is_empty() {
            continue;
        }
        let mut upstream: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<usize> = job
            .needs
            .iter()
            .filter_map(|n| index.get(n.as_str()).copied())
            .collect();
        while let Some(i) = stack.pop() {
            if upstream.insert(i) {
                stack.extend(
                    jobs[i]
                        .needs
                        .iter()
                        .filter_map(|n| index.get(n.as_str()).copied()),
                );
            }
        }
        for (name, pos) in &wanted {
            match producer.get(name.as_str()) {
                Some(maker) if upstream.contains(&index[maker]) => {}
                Some(maker) => ctx.error(
                    *pos,
                    format!(
                        "job {} downloads artifact \"{name}\", made by job {maker}, which it does not wait for; add it to needs",
                        job.name
                    ),
                ),
                None => {
                    let mut known: Vec<&str> = producer.keys().copied().collect();
                    known.sort_unstable();
                    ctx.error(
                        *pos,
                        format!(
                            "job {} downloads artifact \"{name}\", which no job declares; artifacts are: {}",
                            job.name,
                            if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Ok(1_800_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("90s"), Ok(90_000));
        assert_eq!(parse_duration("250ms"), Ok(250));
        assert_eq!(parse_duration("7d"), Ok(7 * 86_400_000));
        for bad in ["", "30", "m", "30x", "1.5h", "99999999999999h", "-1m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
