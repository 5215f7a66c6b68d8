//! From the positioned YAML tree to the typed `Pipeline`: the file's top level, key
//! checks and types, triggers and inputs, environments, deployments, artifacts and
//! caches, runs-on, steps and matrices. Assembling jobs (templates, includes, calls,
//! matrix expansion, needs and the reference checks) is in `jobs`; the keys that say how
//! a job runs (image, services, checkout, reports, environment, concurrency, outputs) are
//! in `runtime`.
//!
//! Every problem is recorded with the position of the node it concerns and loading goes
//! on where it can, so one run reports as many problems as practical.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gantry_protocol::{HealthCheck, Hooks, Probe, Shell};

use crate::condition::Condition;
use crate::cron::CronSchedule;
use crate::deploy::{
    app_name_problem, environment_name_problem, parse_amount, DeploySpec, DeployStrategy,
    EnvironmentSpec, HostAmount, DEFAULT_ACTIVATE_TIMEOUT_MS, DEFAULT_HOOK_TIMEOUT_MS,
    DEFAULT_KEEP, DEFAULT_STAGE_TIMEOUT_MS, MAX_KEEP,
};
use crate::inputs::{InputSpec, InputType, MAX_INPUTS, MAX_INPUT_VALUE, MAX_OPTIONS};
use crate::model::{CallSpec, Pipeline, PushFilter, Step, Triggers};
use crate::outputs::{
    artifact_name_problem, cache_key_problem, home_path_problem, path_problem, ArtifactSpec,
    ArtifactWhen, CacheSpec, DEFAULT_EXPIRE_IN_SECS, MAX_CACHES, MAX_EXPIRE_IN_SECS,
    MAX_OUTPUT_PATHS,
};
use crate::refs::Allowed;
use crate::reuse::{NoFiles, Resolver};
use crate::yaml::{self, Kind, Node, Pos};
use crate::{bundle, jobs, runtime, Errors, ParseError};

/// Largest pipeline file accepted, in bytes.
pub const MAX_FILE_SIZE: usize = 1024 * 1024;
/// Most jobs one matrix may expand to, as in GitHub Actions.
pub const MAX_MATRIX_JOBS: usize = 256;
/// Most jobs a pipeline may have after matrix expansion.
pub const MAX_JOBS: usize = 512;
/// Most bytes of job text the loader builds by copying: matrix expansion, templates
/// (`extends`), includes and called pipelines together, so that a large job times a large
/// matrix, or a template under hundreds of jobs, cannot cost hundreds of MiB.
pub const MAX_EXPANDED_TEXT: usize = 16 * 1024 * 1024;
/// Default and largest job timeouts.
pub(crate) const DEFAULT_TIMEOUT_MS: u64 = 60 * 60 * 1000;
pub(crate) const MAX_TIMEOUT_MS: u64 = 7 * 24 * 60 * 60 * 1000;
pub(crate) const MAX_RETRY: u32 = 10;

pub(crate) const TOP_KEYS: &[&str] = &[
    "name",
    "priority",
    "env",
    "on",
    "environments",
    "jobs",
    "include",
    "concurrency",
];
/// What an included file may define; the including file owns the rest.
pub(crate) const INCLUDED_KEYS: &[&str] = &["include", "env", "environments", "jobs"];
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
const ON_KEYS: &[&str] = &["push", "schedule", "manual", "inputs", "call"];
const CALL_KEYS: &[&str] = &["secrets"];
const PUSH_KEYS: &[&str] = &["branches", "tags", "paths"];
const SCHEDULE_KEYS: &[&str] = &["cron"];
const MANUAL_KEYS: &[&str] = &["inputs"];
const INPUT_KEYS: &[&str] = &["default", "description", "type", "required", "options"];
pub(crate) const JOB_KEYS: &[&str] = &[
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
    "outputs",
    "services",
    "reports",
    "environment",
    "checkout",
    "concurrency",
    "extends",
    "uses",
];
const ARTIFACT_KEYS: &[&str] = &["name", "paths", "expire-in", "when"];
const CACHE_KEYS: &[&str] = &["key", "paths", "restore-keys", "home"];
pub(crate) const STRATEGY_KEYS: &[&str] = &["matrix", "fail-fast", "max-parallel"];
const STEP_KEYS: &[&str] = &[
    "run",
    "name",
    "working-directory",
    "env",
    "id",
    "if",
    "continue-on-error",
    "timeout",
    "shell",
];

/// What loading one pipeline has found and spent so far.
pub(crate) struct Ctx {
    /// Every file read, by the index that positions carry: the top file first.
    pub(crate) files: Vec<String>,
    errors: Vec<(Pos, String)>,
    /// Bytes of copied job text still allowed ([`MAX_EXPANDED_TEXT`] at the start).
    budget: usize,
    budget_refused: bool,
    /// The run's declared inputs and the pipeline's env names, for reference checks.
    pub(crate) inputs: BTreeMap<String, InputSpec>,
    pub(crate) pipeline_env: BTreeSet<String>,
}

impl Ctx {
    fn new(file_name: &str) -> Self {
        Self {
            files: vec![file_name.to_owned()],
            errors: Vec::new(),
            budget: MAX_EXPANDED_TEXT,
            budget_refused: false,
            inputs: BTreeMap::new(),
            pipeline_env: BTreeSet::new(),
        }
    }

    pub(crate) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push((pos, message.into()));
    }

    /// Takes `bytes` from the copy budget before a copy is made; false, with one error
    /// at `pos` for the whole load, once it is spent.
    pub(crate) fn charge(&mut self, pos: Pos, bytes: usize) -> bool {
        if let Some(left) = self.budget.checked_sub(bytes) {
            self.budget = left;
            return true;
        }
        if !self.budget_refused {
            self.budget_refused = true;
            self.error(
                pos,
                format!("the pipeline expands to more than {MAX_EXPANDED_TEXT} bytes of job text (matrices, templates, includes and called pipelines together); make the matrix or the shared parts smaller"),
            );
        }
        false
    }
}

/// The checked entries of a mapping, by key.
pub(crate) struct Fields<'a> {
    map: HashMap<&'a str, (&'a Node, &'a Node)>,
}

impl<'a> Fields<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Node> {
        self.map.get(key).map(|(_, value)| *value)
    }
}

pub(crate) fn scalar(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Scalar { value, .. } => Some(value),
        _ => None,
    }
}

/// Checks that `node` is a mapping whose keys are distinct scalars from `allowed`.
pub(crate) fn fields<'a>(
    ctx: &mut Ctx,
    node: &'a Node,
    allowed: &[&str],
    what: &str,
) -> Option<Fields<'a>> {
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
pub(crate) fn entries<'a>(
    ctx: &mut Ctx,
    node: &'a Node,
    what: &str,
) -> Vec<(String, &'a Node, &'a Node)> {
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

pub(crate) fn string(ctx: &mut Ctx, node: &Node, what: &str) -> Option<String> {
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
pub(crate) fn string_list(ctx: &mut Ctx, node: &Node, what: &str) -> Vec<(String, Pos)> {
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

pub(crate) fn boolean(ctx: &mut Ctx, node: &Node, what: &str) -> Option<bool> {
    match scalar(node) {
        Some("true" | "True" | "TRUE") => Some(true),
        Some("false" | "False" | "FALSE") => Some(false),
        _ => {
            ctx.error(node.pos, format!("{what} must be true or false"));
            None
        }
    }
}

pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 255
}

pub(crate) fn is_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
        })
}

pub(crate) fn is_job_key(key: &str) -> bool {
    is_identifier(key, 100)
}

/// 1 to `max_len` letters, digits, `_` and `-`, starting with a letter or `_`.
pub(crate) fn is_identifier(name: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// A templated string with the position of the node it came from.
#[derive(Clone)]
pub(crate) struct Text {
    pub(crate) value: String,
    pub(crate) pos: Pos,
}

pub(crate) type KeyedTexts = Vec<(String, Text)>;

pub(crate) fn env_map(ctx: &mut Ctx, node: &Node, what: &str) -> KeyedTexts {
    let listed = entries(ctx, node, what);
    keyed_texts(
        ctx,
        listed,
        |name| {
            (!is_env_name(name)).then(|| format!("environment variable name \"{name}\" must be letters, digits and _, not starting with a digit"))
        },
        |ctx, name, value| {
            if value.is_null() {
                Some(String::new())
            } else {
                string(ctx, value, &format!("the value of {name}"))
            }
        },
    )
}

/// The texts of map entries whose names pass: `name_problem` says what is wrong with a
/// name (an error at its key, the entry dropped), `text` reads a value (`None`: dropped,
/// its error given).
pub(crate) fn keyed_texts(
    ctx: &mut Ctx,
    listed: Vec<(String, &Node, &Node)>,
    name_problem: impl Fn(&str) -> Option<String>,
    text: impl Fn(&mut Ctx, &str, &Node) -> Option<String>,
) -> KeyedTexts {
    let mut out = Vec::new();
    for (name, key, value) in listed {
        if let Some(problem) = name_problem(&name) {
            ctx.error(key.pos, problem);
            continue;
        }
        if let Some(text) = text(ctx, &name, value) {
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

/// Parses a pipeline that stands alone; `include:` and `uses:` are refused (see
/// [`load`]).
/// A bundle ([`crate::bundle`]) is loaded with the files it carries, and only those.
pub fn parse(file_name: &str, text: &str) -> Result<Pipeline, Errors> {
    match bundle::decode(text) {
        None => load(file_name, text, &NoFiles),
        Some(Ok(decoded)) => load(decoded.top.0, decoded.top.1, &decoded.others),
        Some(Err(problem)) => Err(Errors(vec![ParseError {
            file: file_name.to_owned(),
            line: 1,
            column: 1,
            message: format!(
                "the file starts with {:?}, the first line of a pipeline bundle, but the bundle is damaged: {problem}; a pipeline file written by hand must not start with that line",
                bundle::BUNDLE_HEADER.trim_end()
            ),
        }])),
    }
}

/// Parses a pipeline whose included and called files `resolver` hands over. See the
/// crate documentation. `file_name` is the file's path in its repository.
pub fn load(file_name: &str, text: &str, resolver: &dyn Resolver) -> Result<Pipeline, Errors> {
    let mut ctx = Ctx::new(file_name);
    let start = Pos::start(0);
    if text.len() > MAX_FILE_SIZE {
        ctx.error(
            start,
            format!(
                "the file is {} bytes; the most is {MAX_FILE_SIZE}",
                text.len()
            ),
        );
        return finish(ctx, None);
    }
    let root = match yaml::load(text, 0) {
        Ok(Some(root)) => root,
        Ok(None) => {
            ctx.error(
                start,
                "the file is empty; expected a mapping with a jobs key",
            );
            return finish(ctx, None);
        }
        Err(err) => {
            ctx.error(err.pos, err.message);
            return finish(ctx, None);
        }
    };
    let mut sources = jobs::Sources::new(resolver, file_name, text.len());
    let pipeline = load_pipeline(&mut ctx, &mut sources, file_name, &root);
    finish(ctx, pipeline)
}

fn finish(mut ctx: Ctx, pipeline: Option<Pipeline>) -> Result<Pipeline, Errors> {
    if ctx.errors.is_empty() {
        if let Some(pipeline) = pipeline {
            return Ok(pipeline);
        }
        ctx.error(Pos::start(0), "the pipeline is not valid");
    }
    ctx.errors.sort();
    ctx.errors.dedup();
    let files = ctx.files;
    Err(Errors(
        ctx.errors
            .into_iter()
            .map(|(pos, message)| ParseError {
                file: files
                    .get(usize::from(pos.file))
                    .cloned()
                    .unwrap_or_default(),
                line: pos.line,
                column: pos.column,
                message,
            })
            .collect(),
    ))
}

fn default_name(file_name: &str) -> String {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    let stem = base
        .strip_suffix(".yml")
        .or_else(|| base.strip_suffix(".yaml"))
        .unwrap_or(base);
    stem.to_owned()
}

/// The top level without its hidden keys (those starting with `.`): as in GitLab CI,
/// they hold YAML anchors for merge keys (`.defaults: &defaults`) and mean nothing else.
fn without_hidden(root: Node) -> Node {
    let Node { pos, kind, height } = root;
    let kind = match kind {
        Kind::Map(entries) => Kind::Map(
            entries
                .into_iter()
                .filter(|(k, _)| !scalar(k).is_some_and(|name| name.starts_with('.')))
                .collect(),
        ),
        other => other,
    };
    Node { pos, kind, height }
}

fn load_pipeline(
    ctx: &mut Ctx,
    src: &mut jobs::Sources<'_>,
    file_name: &str,
    root: &Node,
) -> Option<Pipeline> {
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
    let root = jobs::apply_includes(ctx, src, root, &[file_name.to_owned()]);
    let root = without_hidden(root);
    let top = fields(ctx, &root, TOP_KEYS, "the pipeline")?;
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
    let triggers = top
        .get("on")
        .map(|node| load_triggers(ctx, node))
        .unwrap_or_default();
    ctx.inputs.clone_from(&triggers.inputs);
    let env_texts = top
        .get("env")
        .map(|node| env_map(ctx, node, "env"))
        .unwrap_or_default();
    ctx.pipeline_env = env_texts.iter().map(|(k, _)| k.clone()).collect();
    for (_, text) in &env_texts {
        jobs::check_text(
            ctx,
            text,
            Allowed {
                needs: false,
                ..Allowed::with_secrets("the pipeline's env")
            },
        );
    }
    let env = env_texts.into_iter().map(|(k, t)| (k, t.value)).collect();
    let Some(jobs_node) = top.get("jobs") else {
        ctx.error(
            root.pos,
            "the pipeline has no jobs key; expected jobs: with at least one job",
        );
        return None;
    };
    let mut environments = top
        .get("environments")
        .map(|node| load_environments(ctx, node))
        .unwrap_or_default();
    let concurrency = top.get("concurrency").and_then(|node| {
        let (concurrency, pos) = runtime::load_concurrency(ctx, node)?;
        let group = Text {
            value: concurrency.group.clone(),
            pos,
        };
        jobs::check_text(
            ctx,
            &group,
            Allowed {
                run: true,
                env: true,
                ..Allowed::none("the pipeline's concurrency group")
            },
        );
        Some(concurrency)
    });
    let jobs = jobs::load_all(ctx, src, jobs_node, &mut environments)?;
    Some(Pipeline {
        name,
        priority,
        env,
        triggers,
        environments,
        jobs,
        concurrency,
    })
}

pub(crate) fn load_triggers(ctx: &mut Ctx, node: &Node) -> Triggers {
    let mut triggers = Triggers::default();
    // Shorthand as in GitHub Actions: `on: push` or `on: [push, manual]`.
    if matches!(node.kind, Kind::Seq(_))
        || (matches!(node.kind, Kind::Scalar { .. }) && !node.is_null())
    {
        for (event, pos) in string_list(ctx, node, "on") {
            match event.as_str() {
                "push" => triggers.push = Some(PushFilter::default()),
                "manual" => {}
                "call" => triggers.call = Some(CallSpec::default()),
                _ => ctx.error(
                    pos,
                    format!("unknown trigger \"{event}\" in on; allowed are push, manual and call (schedule needs a cron mapping)"),
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
    if let Some(call) = on.get("call") {
        if let Some(f) = fields(ctx, call, CALL_KEYS, "on.call") {
            let mut spec = CallSpec::default();
            for (name, pos) in f
                .get("secrets")
                .map(|n| string_list(ctx, n, "on.call.secrets"))
                .unwrap_or_default()
            {
                if !is_env_name(&name) {
                    ctx.error(pos, format!("secret name \"{name}\" must be letters, digits and _, not starting with a digit"));
                } else if spec.secrets.contains(&name) {
                    ctx.error(pos, format!("secret \"{name}\" is listed twice"));
                } else {
                    spec.secrets.push(name);
                }
            }
            triggers.call = Some(spec);
        }
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
        if out.len() >= MAX_INPUTS {
            ctx.error(
                key.pos,
                format!("a pipeline declares at most {MAX_INPUTS} inputs"),
            );
            return;
        }
        let what = format!("input {name}");
        let Some(f) = fields(ctx, value, INPUT_KEYS, &what) else {
            continue;
        };
        let kind = match f.get("type").map(|n| (scalar(n), n.pos)) {
            None | Some((Some("string"), _)) => InputType::String,
            Some((Some("choice"), _)) => InputType::Choice,
            Some((Some("boolean"), _)) => InputType::Boolean,
            Some((Some("number"), _)) => InputType::Number,
            Some((_, pos)) => {
                ctx.error(
                    pos,
                    format!("{what}: type must be string, choice, boolean or number"),
                );
                continue;
            }
        };
        let required = f
            .get("required")
            .and_then(|n| boolean(ctx, n, &format!("{what}: required")))
            .unwrap_or(false);
        let description = f
            .get("description")
            .and_then(|n| string(ctx, n, &format!("{what}: description")));
        let mut options: Vec<String> = Vec::new();
        if let Some(n) = f.get("options") {
            if kind != InputType::Choice {
                ctx.error(n.pos, format!("{what}: options are for type: choice"));
            }
            let listed = string_list(ctx, n, &format!("{what}: options"));
            if listed.len() > MAX_OPTIONS {
                ctx.error(
                    n.pos,
                    format!(
                        "{what} has {} options; the most is {MAX_OPTIONS}",
                        listed.len()
                    ),
                );
            }
            for (option, pos) in listed.into_iter().take(MAX_OPTIONS) {
                if option.len() > MAX_INPUT_VALUE {
                    ctx.error(
                        pos,
                        format!("{what}: an option is longer than {MAX_INPUT_VALUE} bytes"),
                    );
                } else if options.contains(&option) {
                    ctx.error(pos, format!("{what}: option \"{option}\" is listed twice"));
                } else {
                    options.push(option);
                }
            }
        }
        if kind == InputType::Choice && options.is_empty() {
            ctx.error(
                value.pos,
                format!("{what} is a choice and needs options: [A, B, ...]"),
            );
        }
        let mut spec = InputSpec {
            default: None,
            kind,
            required,
            options,
            description,
        };
        if let Some(n) = f.get("default") {
            if let Some(default) = string(ctx, n, &format!("{what}: default")) {
                match spec.problem(&default) {
                    Some(problem) => ctx.error(n.pos, format!("{what}: the default {problem}")),
                    None => spec.default = Some(default),
                }
            }
        }
        if out.insert(name.clone(), spec).is_some() {
            ctx.error(key.pos, format!("input \"{name}\" is declared twice"));
        }
    }
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

pub(crate) fn load_environments(ctx: &mut Ctx, node: &Node) -> BTreeMap<String, EnvironmentSpec> {
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

pub(crate) fn load_deploy(ctx: &mut Ctx, node: &Node) -> Option<(DeploySpec, Pos)> {
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
        runtime::check_environment_name(ctx, name, *pos);
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

/// A job's `artifacts:` as read; its name is settled when the job is named.
pub(crate) struct RawArtifacts {
    pub(crate) pos: Pos,
    pub(crate) name: Option<Text>,
    pub(crate) paths: Vec<String>,
    pub(crate) expire_in_secs: u64,
    pub(crate) when: ArtifactWhen,
}

impl RawArtifacts {
    /// The artifact of the job named `job_name`, or why its name cannot be used.
    pub(crate) fn spec(&self, job_name: &str) -> Result<(ArtifactSpec, Pos), (Pos, String)> {
        let (name, pos) = match &self.name {
            Some(text) => (text.value.clone(), text.pos),
            None => (job_name.to_owned(), self.pos),
        };
        if let Some(problem) = artifact_name_problem(&name) {
            return Err((pos, format!("artifact name \"{name}\" {problem}")));
        }
        Ok((
            ArtifactSpec {
                name,
                paths: self.paths.clone(),
                expire_in_secs: self.expire_in_secs,
                when: self.when,
            },
            pos,
        ))
    }
}

pub(crate) fn load_artifacts(ctx: &mut Ctx, node: &Node) -> Option<RawArtifacts> {
    let f = fields(ctx, node, ARTIFACT_KEYS, "artifacts")?;
    let name = f
        .get("name")
        .and_then(|n| string(ctx, n, "artifacts.name").map(|value| Text { value, pos: n.pos }));
    let paths = load_paths(ctx, node, f.get("paths"), "artifacts", None);
    let when = match f.get("when").map(|n| (scalar(n), n.pos)) {
        None | Some((Some("on-success"), _)) => ArtifactWhen::OnSuccess,
        Some((Some("on-failure"), _)) => ArtifactWhen::OnFailure,
        Some((Some("always"), _)) => ArtifactWhen::Always,
        Some((_, pos)) => {
            ctx.error(
                pos,
                "artifacts.when must be on-success, on-failure or always",
            );
            ArtifactWhen::OnSuccess
        }
    };
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
        when,
    })
}

/// A job's `cache:`: one mapping or a list of them, each with a distinct key. The key
/// texts hold their matrix values already.
pub(crate) fn load_caches(ctx: &mut Ctx, node: &Node) -> Vec<CacheSpec> {
    let items: Vec<&Node> = match &node.kind {
        Kind::Seq(items) => items.iter().collect(),
        _ => vec![node],
    };
    if items.len() > MAX_CACHES {
        ctx.error(
            node.pos,
            format!(
                "the job has {} caches; the most is {MAX_CACHES}",
                items.len()
            ),
        );
        return Vec::new();
    }
    let mut caches: Vec<CacheSpec> = Vec::new();
    for item in items {
        let Some((cache, key_pos)) = load_cache(ctx, item) else {
            continue;
        };
        if caches.iter().any(|c| c.key == cache.key) {
            ctx.error(
                key_pos,
                format!(
                    "two caches of the job have the key \"{}\"; each cache needs its own key",
                    cache.key
                ),
            );
            continue;
        }
        caches.push(cache);
    }
    caches
}

fn load_cache(ctx: &mut Ctx, node: &Node) -> Option<(CacheSpec, Pos)> {
    let f = fields(ctx, node, CACHE_KEYS, "cache")?;
    let home = f
        .get("home")
        .and_then(|n| boolean(ctx, n, "cache.home"))
        .unwrap_or(false);
    let key = if let Some(n) = f.get("key") {
        string(ctx, n, "cache.key").map(|value| Text { value, pos: n.pos })
    } else {
        ctx.error(
            node.pos,
            "cache needs a key, e.g. key: deps-${{ hashFiles('Cargo.lock') }}",
        );
        None
    };
    let restore_keys: Vec<Text> = f
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
    let paths = load_paths(ctx, node, f.get("paths"), "cache", Some(home));
    let key = key?;
    let mut ok = true;
    for text in std::iter::once(&key).chain(&restore_keys) {
        if let Some(problem) = cache_key_problem(&text.value) {
            ctx.error(text.pos, problem);
            ok = false;
        }
    }
    let pos = key.pos;
    let paths = paths?;
    ok.then(|| {
        (
            CacheSpec {
                key: key.value,
                restore_keys: restore_keys.into_iter().map(|t| t.value).collect(),
                paths,
                home,
            },
            pos,
        )
    })
}

/// The `paths:` of an artifact or cache: at least one, each relative and inside the
/// workspace; for a cache, `home` says whether `~/...` paths (under `$HOME`) may be
/// listed too (`None` for artifacts, whose files are always the workspace's).
fn load_paths(
    ctx: &mut Ctx,
    parent: &Node,
    node: Option<&Node>,
    what: &str,
    home: Option<bool>,
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
        let problem = match (path.starts_with("~/") || path == "~", home) {
            (true, Some(true)) => home_path_problem(path),
            (true, Some(false)) => {
                Some("is under $HOME; add home: true to the cache to keep paths there")
            }
            (true, None) => Some("is under $HOME; artifacts are taken from the workspace (copy the files there first)"),
            (false, _) => path_problem(path),
        };
        if let Some(problem) = problem {
            ctx.error(*pos, format!("{what} path \"{path}\" {problem}"));
            ok = false;
        }
    }
    ok.then(|| paths.into_iter().map(|(p, _)| p).collect())
}

pub(crate) fn load_condition(
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
                Pos { column, ..node.pos },
                format!("invalid if expression: {message}"),
            );
            None
        }
    }
}

pub(crate) fn unknown_matrix_key(name: &str, combos: &[Vec<(String, String)>]) -> String {
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

/// Operating systems and architectures, as agents report them in their `os` and `arch`
/// labels (Rust's `std::env::consts`), and the names other CI systems use for them.
const OS_NAMES: &[&str] = &[
    "linux",
    "macos",
    "windows",
    "freebsd",
    "netbsd",
    "openbsd",
    "dragonfly",
    "solaris",
    "illumos",
    "android",
    "ios",
];
const ARCH_NAMES: &[(&str, &str)] = &[
    ("x86_64", "x86_64"),
    ("x64", "x86_64"),
    ("amd64", "x86_64"),
    ("aarch64", "aarch64"),
    ("arm64", "aarch64"),
    ("x86", "x86"),
    ("arm", "arm"),
    ("riscv64", "riscv64"),
    ("s390x", "s390x"),
    ("powerpc64", "powerpc64"),
    ("loongarch64", "loongarch64"),
];

/// What a bare `runs-on` label asks of an agent: an OS name is its `os` label, an
/// architecture its `arch` label, `self-hosted` nothing (every agent is), anything else a
/// label of that key with the value `true` (`gantry-agent --label gpu=true`).
fn bare_label(label: &str) -> Result<Option<(String, String)>, String> {
    let lower = label.to_ascii_lowercase();
    if lower == "self-hosted" {
        return Ok(None);
    }
    if OS_NAMES.contains(&lower.as_str()) {
        return Ok(Some(("os".to_owned(), lower)));
    }
    if let Some((_, arch)) = ARCH_NAMES.iter().find(|(name, _)| *name == lower) {
        return Ok(Some(("arch".to_owned(), (*arch).to_owned())));
    }
    let hosted = ["ubuntu-", "windows-", "macos-"]
        .iter()
        .any(|p| lower.starts_with(p))
        || lower == "ubuntu";
    if hosted {
        return Err(format!(
            "runs-on \"{label}\" names a GitHub-hosted runner; Gantry runs jobs on your agents: use labels they carry, like linux or {{ os: linux, arch: x86_64 }}"
        ));
    }
    if is_label_key(label) {
        Ok(Some((label.to_owned(), "true".to_owned())))
    } else {
        Err(format!("label \"{label}\" must be 1-63 characters of a-z, 0-9, ., _, / and -, starting with a letter or digit (or key=value)"))
    }
}

/// `runs-on`: a mapping of labels, one label, or a list of labels, where a label is
/// `key=value` or a bare label (see [`bare_label`]). Matrix values are already filled in.
pub(crate) fn load_labels(ctx: &mut Ctx, node: &Node) -> KeyedTexts {
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
    let mut entry = |ctx: &mut Ctx, item: &Node| {
        let Some(text) = string(ctx, item, "each runs-on entry") else {
            return;
        };
        match text.split_once('=') {
            Some((key, value)) => push(
                ctx,
                key.to_owned(),
                Text {
                    value: value.to_owned(),
                    pos: item.pos,
                },
                item.pos,
            ),
            None => match bare_label(&text) {
                Ok(Some((key, value))) => push(
                    ctx,
                    key,
                    Text {
                        value,
                        pos: item.pos,
                    },
                    item.pos,
                ),
                Ok(None) => {}
                Err(message) => ctx.error(item.pos, message),
            },
        }
    };
    match &node.kind {
        Kind::Map(_) => {
            for (key, key_node, value) in entries(ctx, node, "runs-on") {
                if let Some(text) = string(ctx, value, &format!("label {key}")) {
                    push(
                        ctx,
                        key,
                        Text {
                            value: text,
                            pos: value.pos,
                        },
                        key_node.pos,
                    );
                }
            }
        }
        Kind::Seq(items) => {
            for item in items {
                entry(ctx, item);
            }
        }
        Kind::Scalar { .. } if !node.is_null() => entry(ctx, node),
        Kind::Scalar { .. } => ctx.error(
            node.pos,
            "runs-on is empty; give a label like linux, a list of labels, or a mapping like { os: linux }",
        ),
    }
    out
}

/// A step's `shell:`.
fn load_shell(ctx: &mut Ctx, node: &Node) -> Option<Shell> {
    let text = string(ctx, node, "shell")?;
    Some(match text.as_str() {
        "sh" => Shell::Sh,
        "bash" => Shell::Bash,
        "python" => Shell::Python,
        "pwsh" => Shell::Pwsh,
        custom
            if custom.matches("{0}").count() == 1
                && custom.len() <= 256
                && !custom.trim_start().starts_with("{0}") =>
        {
            Shell::Command(custom.trim().to_owned())
        }
        _ => {
            ctx.error(
                node.pos,
                format!("shell \"{text}\" must be sh, bash, python, pwsh, or a command with {{0}} where the script's file goes, like \"perl {{0}}\""),
            );
            return None;
        }
    })
}

/// A step's `id`: letters, digits, `_` and `-`, at most 64, starting with a letter or `_`.
pub(crate) fn is_step_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// One step. `combos` checks the matrix names of its `if`; `job_timeout_ms` bounds its
/// `timeout`.
pub(crate) fn load_step(
    ctx: &mut Ctx,
    node: &Node,
    combos: &[Vec<(String, String)>],
    job_timeout_ms: u64,
) -> Option<Step> {
    if let Some((key, _)) = crate::reuse::get(node, "uses") {
        ctx.error(
            key.pos,
            "a step runs shell commands (run:); Gantry has no actions: the source is checked out before the first step (see checkout:), and caches, artifacts and services are keys of the job",
        );
    }
    let f = fields(ctx, node, STEP_KEYS, "a step")?;
    let Some(run_node) = f.get("run") else {
        ctx.error(
            node.pos,
            "a step needs run: with the shell lines to execute",
        );
        return None;
    };
    let run = string(ctx, run_node, "run");
    let name = f.get("name").and_then(|n| string(ctx, n, "name"));
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
        .unwrap_or_default()
        .into_iter()
        .map(|(k, t)| (k, t.value))
        .collect();
    let id = f.get("id").and_then(|n| {
        let id = string(ctx, n, "id")?;
        if is_step_id(&id) {
            Some(id)
        } else {
            ctx.error(n.pos, format!("step id \"{id}\" must be 1 to 64 letters, digits, _ and -, starting with a letter or _"));
            None
        }
    });
    let condition = match f.get("if") {
        None => Condition::default(),
        Some(n) => load_condition(ctx, n, combos).unwrap_or_default(),
    };
    let continue_on_error = f
        .get("continue-on-error")
        .and_then(|n| boolean(ctx, n, "continue-on-error"))
        .unwrap_or(false);
    let timeout_ms = f.get("timeout").and_then(|n| match scalar(n).map(parse_duration) {
        Some(Ok(ms)) if ms > 0 && ms <= job_timeout_ms => Some(ms),
        Some(Ok(0)) => {
            ctx.error(n.pos, "a step's timeout must be more than 0");
            None
        }
        Some(Ok(_)) => {
            ctx.error(n.pos, format!("a step's timeout is longer than its job's ({} min), so it would never fire; raise the job's timeout", job_timeout_ms / 60_000));
            None
        }
        Some(Err(message)) => {
            ctx.error(n.pos, format!("timeout {message}"));
            None
        }
        None => {
            ctx.error(n.pos, format!("timeout must be a duration like 10m, found {}", n.type_name()));
            None
        }
    });
    let shell = f
        .get("shell")
        .and_then(|n| load_shell(ctx, n))
        .unwrap_or_default();
    Some(Step {
        id,
        name,
        run: run?,
        working_directory,
        env,
        condition,
        continue_on_error,
        timeout_ms,
        shell,
    })
}

/// Expands a matrix mapping into its combinations, in order.
pub(crate) fn expand_matrix(ctx: &mut Ctx, node: &Node) -> Option<Vec<Vec<(String, String)>>> {
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
                        if let Some(s) = matrix_value(ctx, v, &format!("matrix value {name}")) {
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
                    .filter_map(|item| {
                        matrix_value(ctx, item, &format!("each value of matrix {key}"))
                    })
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

/// A matrix value: text fixed when the file is read, so no `${{ }}` in it (a value an
/// input chooses belongs in the job's text, not in the matrix).
fn matrix_value(ctx: &mut Ctx, node: &Node, what: &str) -> Option<String> {
    let value = string(ctx, node, what)?;
    if value.contains("${{") {
        ctx.error(
            node.pos,
            format!("{what} holds ${{{{ }}}}; matrix values are fixed when the file is read (use the reference in the job's text instead)"),
        );
        return None;
    }
    Some(value)
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
