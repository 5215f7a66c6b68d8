//! Assembling a pipeline's jobs: included files, template jobs (`extends:`), calls of
//! reusable pipelines (`uses:`), matrix expansion with matrix values filled into every
//! text of the job, the graph of `needs`, and the check of every `${{ }}` reference.
//!
//! This module owns how jobs come to be, and the reference rules per field (see
//! [`rule`]). It reads files only through the caller's [`Resolver`], and each field's
//! own loading is in `load` and `runtime`.
//!
//! # Calling a pipeline
//!
//! A job `deploy-eu: { uses: ci/deploy.yml, with: { region: eu }, secrets: { TOKEN:
//! ${{ secrets.EU_TOKEN }} }, needs: build, if: branch == 'main' }` is replaced by the
//! jobs of `ci/deploy.yml`, each named `deploy-eu/JOB`:
//! - the called file declares `on.call` (and the secrets callers pass, `on.call.secrets`)
//!   and its inputs under `on.inputs`, typed; `with:` gives them, checked against their
//!   types, defaults fill the rest and a missing required input is an error;
//! - inside the called file, `${{ inputs.X }}` is the `with:` value (which may itself be
//!   a literal or refer to the caller's `inputs`, `git` or `event`), `${{ secrets.X }}`
//!   is the caller's secret passed as `X`, and `needs.JOB` names its own jobs;
//! - its jobs without `needs` wait for the caller's `needs`; a job that needs
//!   `deploy-eu` waits for every job of the called pipeline;
//! - the caller's `if:` (which may test branch, event, inputs and env, not the status
//!   functions) is added to the condition of every called job;
//! - the called file's `env:` is under each of its jobs' own `env:`, and its
//!   `environments:` join the pipeline's (a name defined twice must be defined alike);
//! - outputs of a called pipeline are not passed on to the caller's other jobs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use gantry_protocol::limits::MAX_OUTPUT_REFERENCES;

use crate::condition::{Condition, Operand};
use crate::deploy::{DeploySpec, EnvironmentSpec};
use crate::load::{
    entries, env_map, expand_matrix, fields, is_job_key, load_artifacts, load_caches,
    load_condition, load_environments, load_labels, load_step, load_triggers, parse_duration,
    scalar, string, string_list, unknown_matrix_key, Ctx, KeyedTexts, RawArtifacts, Text,
    DEFAULT_TIMEOUT_MS, INCLUDED_KEYS, JOB_KEYS, MAX_FILE_SIZE, MAX_JOBS, MAX_MATRIX_JOBS,
    MAX_RETRY, MAX_TIMEOUT_MS, STRATEGY_KEYS, TOP_KEYS,
};
use crate::model::{Concurrency, Job, JobEnvironment, Step};
use crate::outputs::CacheSpec;
use crate::refs::{
    parse_reference, references, replace_references, sole_reference, Allowed, Reference,
};
use crate::reuse::{
    get, merge, normalize_path, resolve_extends, without, Resolver, Templates, MAX_FILES,
    MAX_FILE_DEPTH, MAX_TOTAL_BYTES,
};
use crate::runtime;
use crate::yaml::{self, Kind, Node, Pos};

const USES_KEYS: &[&str] = &["uses", "with", "secrets", "needs", "if"];

/// The files a load reads besides the top one.
pub(crate) struct Sources<'r> {
    resolver: &'r dyn Resolver,
    /// Trees already read, by path; `None` when reading failed (reported once).
    read: HashMap<String, Option<Node>>,
    bytes: usize,
    /// Files an `include:` brought in already: each is included once per load.
    included: HashSet<String>,
}

impl<'r> Sources<'r> {
    pub(crate) fn new(resolver: &'r dyn Resolver, top_file: &str, top_bytes: usize) -> Self {
        Self {
            resolver,
            read: HashMap::new(),
            bytes: top_bytes,
            included: HashSet::from([top_file.to_owned()]),
        }
    }
}

/// Reads, parses and caches another file of the repository; errors at `at` (the
/// `include:` or `uses:` naming it) or in the file itself.
fn read_tree(ctx: &mut Ctx, src: &mut Sources<'_>, path: &str, at: Pos) -> Option<Node> {
    if let Some(tree) = src.read.get(path) {
        return tree.clone();
    }
    let tree = read_new_tree(ctx, src, path, at);
    src.read.insert(path.to_owned(), tree.clone());
    tree
}

fn read_new_tree(ctx: &mut Ctx, src: &mut Sources<'_>, path: &str, at: Pos) -> Option<Node> {
    if ctx.files.len() >= MAX_FILES {
        ctx.error(at, format!("the pipeline reads more than {MAX_FILES} files (includes and called pipelines together)"));
        return None;
    }
    let text = match src.resolver.read_file(path) {
        Ok(text) => text,
        Err(reason) => {
            ctx.error(at, format!("cannot read {path}: {reason}"));
            return None;
        }
    };
    if text.len() > MAX_FILE_SIZE {
        ctx.error(
            at,
            format!(
                "{path} is {} bytes; the most is {MAX_FILE_SIZE}",
                text.len()
            ),
        );
        return None;
    }
    src.bytes = src.bytes.saturating_add(text.len());
    if src.bytes > MAX_TOTAL_BYTES {
        ctx.error(
            at,
            format!("the pipeline's files hold more than {MAX_TOTAL_BYTES} bytes together"),
        );
        return None;
    }
    let index = u16::try_from(ctx.files.len()).ok()?;
    ctx.files.push(path.to_owned());
    match yaml::load(&text, index) {
        Ok(Some(tree)) if matches!(tree.kind, Kind::Map(_)) => Some(tree),
        Ok(Some(tree)) => {
            ctx.error(
                tree.pos,
                format!("{path} must be a mapping, found {}", tree.type_name()),
            );
            None
        }
        Ok(None) => {
            ctx.error(at, format!("{path} is empty"));
            None
        }
        Err(err) => {
            ctx.error(err.pos, err.message);
            None
        }
    }
}

/// `chain` with `next` at its end, for messages: `a.yml -> b.yml -> a.yml`.
fn chain_to(chain: &[String], next: &str) -> String {
    let mut names: Vec<&str> = chain.iter().map(String::as_str).collect();
    names.push(next);
    names.join(" -> ")
}

/// Checks a path that `include:` or `uses:` names against the chain of files that led
/// here; the normalized path if it may be read.
fn next_file(ctx: &mut Ctx, chain: &[String], path: &str, pos: Pos, verb: &str) -> Option<String> {
    let path = match normalize_path(path) {
        Ok(path) => path,
        Err(message) => {
            ctx.error(pos, message);
            return None;
        }
    };
    if chain.contains(&path) {
        ctx.error(
            pos,
            format!("{verb} form a cycle: {}", chain_to(chain, &path)),
        );
        return None;
    }
    if chain.len() >= MAX_FILE_DEPTH {
        ctx.error(
            pos,
            format!(
                "{verb} go deeper than {MAX_FILE_DEPTH} files: {}",
                chain_to(chain, &path)
            ),
        );
        return None;
    }
    Some(path)
}

/// The file with its `include:`s merged under it (see `reuse` for the rule): included
/// files first, in order, each with its own includes, then the file itself on top. An
/// included file may define only [`INCLUDED_KEYS`].
pub(crate) fn apply_includes(
    ctx: &mut Ctx,
    src: &mut Sources<'_>,
    root: &Node,
    chain: &[String],
) -> Node {
    let Some((key, list)) = get(root, "include") else {
        return root.clone();
    };
    let paths = if let Kind::Map(_) = &list.kind {
        ctx.error(
            list.pos,
            format!(
                "include must be a path or a list of paths, found {}",
                list.type_name()
            ),
        );
        Vec::new()
    } else {
        string_list(ctx, list, "include")
    };
    let mut merged: Option<Node> = None;
    for (path, pos) in paths {
        let Some(path) = next_file(ctx, chain, &path, pos, "includes") else {
            continue;
        };
        if !src.included.insert(path.clone()) {
            continue;
        }
        let Some(tree) = read_tree(ctx, src, &path, pos) else {
            continue;
        };
        if let Kind::Map(entries) = &tree.kind {
            for (k, _) in entries {
                match scalar(k) {
                    Some(name) if INCLUDED_KEYS.contains(&name) => {}
                    Some(name) if TOP_KEYS.contains(&name) => ctx.error(
                        k.pos,
                        format!("an included file may define {}; {name} belongs in the file that includes it", INCLUDED_KEYS.join(", ")),
                    ),
                    _ => {} // reported with the merged file's keys
                }
            }
        }
        let mut inner_chain = chain.to_vec();
        inner_chain.push(path);
        let included = apply_includes(ctx, src, &tree, &inner_chain);
        let included = ["name", "priority", "on", "concurrency"]
            .iter()
            .fold(included, |node, key| without(&node, key));
        merged = Some(match merged {
            None => included,
            Some(so_far) => {
                if !ctx.charge(pos, so_far.text_size() + included.text_size()) {
                    return without(root, "include");
                }
                merge(&so_far, &included)
            }
        });
    }
    let own = without(root, "include");
    match merged {
        None => own,
        Some(base) => {
            if !ctx.charge(key.pos, base.text_size() + own.text_size()) {
                return own;
            }
            merge(&base, &own)
        }
    }
}

/// Jobs as read, before names and needs are settled.
#[derive(Default)]
struct JobSet {
    jobs: Vec<RawJob>,
    /// A job that calls a pipeline, by key: the keys of every job it stands for.
    groups: HashMap<String, Vec<String>>,
    /// Some job could not be read; the graph checks would only add noise.
    failed: bool,
}

/// Where jobs are read: the top file, or a pipeline a job calls.
struct Scope<'a> {
    /// `""` at the top; `caller/` in the pipeline the job `caller` calls.
    prefix: String,
    /// Files from the top one down to this one.
    chain: Vec<String>,
    call: Option<&'a Call>,
}

/// What a calling job binds in the pipeline it calls.
struct Call {
    caller: String,
    file: String,
    /// The caller's needs, for the called pipeline's first jobs.
    needs: Vec<(String, Pos)>,
    /// The caller's `if:`, added to every called job's condition.
    condition: Option<Condition>,
    /// Each input of the called pipeline: the text it stands for.
    inputs: BTreeMap<String, String>,
    /// Each secret the called pipeline declares: the caller's secret passed as it.
    secrets: BTreeMap<String, String>,
    /// The called file's `env:`, under each of its jobs' env.
    env: KeyedTexts,
}

/// One job as read, with every expansion of its matrix.
struct RawJob {
    /// `build`, or `caller/build` in a called pipeline.
    key: String,
    pos: Pos,
    /// Keys of jobs (or of calling jobs) it needs, as written, with the called prefix.
    needs: Vec<(String, Pos)>,
    is_matrix: bool,
    combos: Vec<Vec<(String, String)>>,
    fail_fast: bool,
    max_parallel: Option<u32>,
    called_by: Option<String>,
    expansions: Vec<Expansion>,
}

/// One expansion: its tree with matrix values filled in, and what was read from it.
struct Expansion {
    node: Node,
    body: Body,
}

/// A job's keys as read from one expansion.
struct Body {
    runs_on: BTreeMap<String, String>,
    steps: Vec<Step>,
    env: KeyedTexts,
    timeout_ms: u64,
    retry: u32,
    continue_on_error: bool,
    condition: Condition,
    manual: bool,
    image: Option<gantry_protocol::Image>,
    artifacts: Option<RawArtifacts>,
    caches: Vec<CacheSpec>,
    download: Option<Vec<(String, Pos)>>,
    deploy: Option<(DeploySpec, Pos)>,
    outputs: Vec<(String, Text)>,
    services: Vec<gantry_protocol::Service>,
    reports: Option<gantry_protocol::Reports>,
    environment: Option<JobEnvironment>,
    checkout: gantry_protocol::Checkout,
    concurrency: Option<Concurrency>,
}

/// Reads every job of the top file (and of the pipelines they call) and assembles them.
pub(crate) fn load_all(
    ctx: &mut Ctx,
    src: &mut Sources<'_>,
    node: &Node,
    environments: &mut BTreeMap<String, EnvironmentSpec>,
) -> Option<Vec<Job>> {
    let scope = Scope {
        prefix: String::new(),
        chain: vec![ctx.files[0].clone()],
        call: None,
    };
    let mut set = JobSet::default();
    load_jobs(ctx, src, node, &scope, &mut set, environments);
    let total: usize = set.jobs.iter().map(|j| j.expansions.len()).sum();
    if total > MAX_JOBS {
        ctx.error(
            node.pos,
            format!("the pipeline expands to {total} jobs; the most is {MAX_JOBS}"),
        );
        return None;
    }
    if set.failed || set.jobs.is_empty() {
        return None;
    }
    Some(assemble(ctx, &set))
}

fn load_jobs(
    ctx: &mut Ctx,
    src: &mut Sources<'_>,
    node: &Node,
    scope: &Scope<'_>,
    set: &mut JobSet,
    environments: &mut BTreeMap<String, EnvironmentSpec>,
) {
    let listed = entries(ctx, node, "jobs");
    if listed.is_empty() {
        ctx.error(node.pos, "jobs is empty; expected at least one job");
        set.failed = true;
        return;
    }
    if listed.len() > MAX_JOBS {
        ctx.error(
            node.pos,
            format!(
                "the pipeline has {} jobs; the most is {MAX_JOBS}",
                listed.len()
            ),
        );
        set.failed = true;
        return;
    }
    let mut template_nodes: HashMap<String, &Node> = HashMap::new();
    for (key, key_node, value) in &listed {
        if let Some(name) = key.strip_prefix('.') {
            if !is_job_key(name) {
                ctx.error(key_node.pos, format!("template name \"{key}\" must be \".\" then 1-100 letters, digits, - and _, starting with a letter or _"));
            }
            template_nodes.insert(key.clone(), value);
        }
    }
    let mut templates = Templates::new(template_nodes);
    let mut any_job = false;
    for (key, key_node, value) in &listed {
        if key.starts_with('.') {
            continue;
        }
        any_job = true;
        if !is_job_key(key) {
            ctx.error(
                key_node.pos,
                format!("job key \"{key}\" must be 1-100 letters, digits, - and _, starting with a letter or _"),
            );
            set.failed = true;
        }
        let mut chain = vec![key.clone()];
        let pos = key_node.pos;
        let resolved = resolve_extends(value, &mut templates, &mut chain, &mut |bytes| {
            ctx.charge(pos, bytes)
        });
        let mut job_node = match resolved {
            Ok(node) => node,
            Err((pos, message)) => {
                ctx.error(pos, message);
                set.failed = true;
                continue;
            }
        };
        let full_key = format!("{}{key}", scope.prefix);
        if let Some(call) = scope.call {
            job_node = bind_call(ctx, &job_node, call, &scope.prefix);
        }
        if get(&job_node, "uses").is_some() {
            load_call(ctx, src, &full_key, &job_node, scope, set, environments);
        } else {
            match load_job(ctx, &full_key, pos, &job_node, scope) {
                Some(raw) => set.jobs.push(raw),
                None => set.failed = true,
            }
        }
    }
    if !any_job {
        ctx.error(node.pos, "jobs has only templates (names starting with \".\"), which never run; add a job that extends them");
        set.failed = true;
    }
}

/// A copy of `node` with `replace` applied to the text of every scalar value (keys
/// stay), except under keys for which `skip(depth, key)` holds.
fn map_scalars(
    node: &Node,
    depth: usize,
    skip: &dyn Fn(usize, &str) -> bool,
    replace: &mut dyn FnMut(&str, Pos) -> Option<String>,
) -> Node {
    let kind = match &node.kind {
        Kind::Scalar { value, plain } => match replace(value, node.pos) {
            // A filled-in value is text, whatever it looks like.
            Some(new) => Kind::Scalar {
                value: new,
                plain: *plain && !value.contains("${{"),
            },
            None => node.kind.clone(),
        },
        Kind::Seq(items) => Kind::Seq(
            items
                .iter()
                .map(|item| map_scalars(item, depth + 1, skip, replace))
                .collect(),
        ),
        Kind::Map(entries) => Kind::Map(
            entries
                .iter()
                .map(|(k, v)| {
                    let skipped = scalar(k).is_some_and(|key| skip(depth, key));
                    let value = if skipped {
                        v.clone()
                    } else {
                        map_scalars(v, depth + 1, skip, replace)
                    };
                    (k.clone(), value)
                })
                .collect(),
        ),
    };
    Node {
        pos: node.pos,
        kind,
        height: node.height,
    }
}

/// Binds a called pipeline's job to its caller: inputs, secrets and the names of its
/// own jobs in `needs.JOB.outputs` references. Conditions are bound by operand when
/// the job is loaded.
fn bind_call(ctx: &mut Ctx, node: &Node, call: &Call, prefix: &str) -> Node {
    if !ctx.charge(node.pos, node.text_size()) {
        return node.clone();
    }
    let mut errors: Vec<(Pos, String)> = Vec::new();
    let skip = |_: usize, key: &str| key == "if";
    let bound = map_scalars(node, 0, &skip, &mut |text, pos| {
        if !text.contains("${{") {
            return None;
        }
        Some(replace_references(text, |expr| {
            match parse_reference(expr) {
                Ok(Reference::Input(name)) => {
                    let value = call.inputs.get(&name).cloned();
                    if value.is_none() {
                        errors.push((pos, format!("inputs.{name} is not an input of {}; declare it under its on.inputs", call.file)));
                    }
                    value
                }
                Ok(Reference::Secret(name)) => {
                    let caller = call.secrets.get(&name);
                    if caller.is_none() {
                        errors.push((pos, format!("{} uses secrets.{name}, which its on.call.secrets does not declare; declare it there so callers pass it", call.file)));
                    }
                    caller.map(|caller| format!("${{{{ secrets.{caller} }}}}"))
                }
                Ok(Reference::NeedsOutput { job, name }) => {
                    Some(format!("${{{{ needs.{prefix}{job}.outputs.{name} }}}}"))
                }
                _ => None,
            }
        }))
    });
    for (pos, message) in errors {
        ctx.error(pos, message);
    }
    bound
}

/// The operand a `with:` value stands for in the called pipeline's conditions.
fn bound_operand(text: &str) -> Option<Operand> {
    if !text.contains("${{") {
        return Some(Operand::Str(text.to_owned()));
    }
    match sole_reference(text).map(parse_reference) {
        Some(Ok(Reference::Input(name))) => Some(Operand::Input(name)),
        Some(Ok(Reference::Git(field))) => Some(Operand::Git(field)),
        Some(Ok(Reference::Event(field))) => Some(Operand::EventField(field)),
        _ => None,
    }
}

/// A condition of a called job with its inputs and needs bound to the caller's.
fn bind_condition(
    ctx: &mut Ctx,
    condition: &Condition,
    call: &Call,
    prefix: &str,
    pos: Pos,
) -> Condition {
    for operand in condition.operands() {
        if let Operand::Input(name) = operand {
            match call.inputs.get(name) {
                None => ctx.error(pos, format!("inputs.{name} is not an input of {}; declare it under its on.inputs", call.file)),
                Some(text) if bound_operand(text).is_none() => ctx.error(
                    pos,
                    format!("input {name} is given \"{text}\", which an if: cannot compare; give it a value or one reference (inputs, git or event)"),
                ),
                Some(_) => {}
            }
        }
    }
    condition.map_operands(&|operand| match operand {
        Operand::Input(name) => call.inputs.get(name).and_then(|t| bound_operand(t)),
        Operand::NeedsOutput { job, name } => Some(Operand::NeedsOutput {
            job: format!("{prefix}{job}"),
            name: name.clone(),
        }),
        _ => None,
    })
}

/// A job calling a pipeline: reads the called file and its jobs under `key/`.
fn load_call(
    ctx: &mut Ctx,
    src: &mut Sources<'_>,
    key: &str,
    node: &Node,
    scope: &Scope<'_>,
    set: &mut JobSet,
    environments: &mut BTreeMap<String, EnvironmentSpec>,
) {
    let what = format!("job {key} (it calls a pipeline with uses:)");
    let Some(f) = fields(ctx, node, USES_KEYS, &what) else {
        set.failed = true;
        return;
    };
    let Some(uses) = f.get("uses") else {
        set.failed = true;
        return;
    };
    let Some(path) = string(ctx, uses, "uses") else {
        set.failed = true;
        return;
    };
    let Some(path) = next_file(
        ctx,
        &scope.chain,
        &path,
        uses.pos,
        "pipelines calling pipelines",
    ) else {
        set.failed = true;
        return;
    };
    let Some(tree) = read_tree(ctx, src, &path, uses.pos) else {
        set.failed = true;
        return;
    };
    // Each call copies the called file's tree: a file called by many jobs is paid for
    // each time.
    if !ctx.charge(uses.pos, tree.text_size()) {
        set.failed = true;
        return;
    }
    let mut chain = scope.chain.clone();
    chain.push(path.clone());
    let tree = apply_includes(ctx, src, &tree, &chain);
    let Some(top) = fields(ctx, &tree, TOP_KEYS, &format!("the called pipeline {path}")) else {
        set.failed = true;
        return;
    };
    let triggers = top
        .get("on")
        .map(|n| load_triggers(ctx, n))
        .unwrap_or_default();
    let Some(call_spec) = triggers.call.clone() else {
        ctx.error(uses.pos, format!("{path} cannot be called: it has no on.call; add on: {{ call: {{ secrets: [...] }} }} to it"));
        set.failed = true;
        return;
    };
    if let Some(n) = top.get("concurrency") {
        ctx.error(n.pos, "a called pipeline's own concurrency: would not apply; give its jobs concurrency: instead");
    }
    // with: each given input checked against its declaration, defaults for the rest.
    let mut inputs: BTreeMap<String, String> = BTreeMap::new();
    let mut given: Vec<(String, Text)> = Vec::new();
    if let Some(with) = f.get("with") {
        for (name, key_node, value) in entries(ctx, with, "with") {
            let Some(text) = string(ctx, value, &format!("with.{name}")) else {
                continue;
            };
            match triggers.inputs.get(&name) {
                None => ctx.error(
                    key_node.pos,
                    format!(
                        "{path} has no input {name}; its inputs are: {}",
                        names_or_none(triggers.inputs.keys())
                    ),
                ),
                Some(spec) => {
                    if !text.contains("${{") {
                        if let Some(problem) = spec.problem(&text) {
                            ctx.error(value.pos, format!("with.{name}: {problem}"));
                        }
                    }
                    given.push((
                        name,
                        Text {
                            value: text,
                            pos: value.pos,
                        },
                    ));
                }
            }
        }
    }
    for (_, text) in &given {
        check_text(
            ctx,
            text,
            Allowed {
                run: true,
                ..Allowed::none("a with: value")
            },
        );
    }
    for (name, spec) in &triggers.inputs {
        if let Some((_, text)) = given.iter().find(|(n, _)| n == name) {
            inputs.insert(name.clone(), text.value.clone());
        } else if let Some(default) = &spec.default {
            inputs.insert(name.clone(), default.clone());
        } else if spec.required {
            ctx.error(
                uses.pos,
                format!("{path} requires input {name}; give it under with:"),
            );
        } else {
            inputs.insert(name.clone(), String::new());
        }
    }
    // secrets: exactly the declared ones, each a secret of the caller.
    let mut secrets: BTreeMap<String, String> = BTreeMap::new();
    if let Some(passed) = f.get("secrets") {
        for (name, key_node, value) in entries(ctx, passed, "secrets") {
            if !call_spec.secrets.contains(&name) {
                ctx.error(key_node.pos, format!("{path} does not declare secret {name} under on.call.secrets; it declares: {}", names_or_none(call_spec.secrets.iter())));
                continue;
            }
            let text = string(ctx, value, &format!("secrets.{name}")).unwrap_or_default();
            match sole_reference(&text).map(parse_reference) {
                Some(Ok(Reference::Secret(caller))) => {
                    secrets.insert(name, caller);
                }
                _ => ctx.error(value.pos, format!("secrets.{name} must be ${{{{ secrets.NAME }}}}: only secrets are passed as secrets")),
            }
        }
    }
    let missing: Vec<&str> = call_spec
        .secrets
        .iter()
        .filter(|s| !secrets.contains_key(*s))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        ctx.error(uses.pos, format!("{path} needs the secrets {}; pass them under secrets:, like {}: ${{{{ secrets.NAME }}}}", missing.join(", "), missing[0]));
    }
    let needs: Vec<(String, Pos)> = f
        .get("needs")
        .map(|n| string_list(ctx, n, "needs"))
        .unwrap_or_default()
        .into_iter()
        .map(|(n, pos)| (format!("{}{n}", scope.prefix), pos))
        .collect();
    let condition = f.get("if").and_then(|n| {
        let condition = load_condition(ctx, n, &[Vec::new()])?;
        let condition = match scope.call {
            Some(outer) => bind_condition(ctx, &condition, outer, &scope.prefix, n.pos),
            None => condition,
        };
        if condition.uses_status() {
            ctx.error(n.pos, "the if: of a job that calls a pipeline is added to each of its jobs, so it may test branch, event, inputs and env, not success(), failure(), always() or cancelled()");
            return None;
        }
        check_condition(ctx, &condition, n.pos, None, None);
        Some(condition)
    });
    let env = top
        .get("env")
        .map(|n| {
            let call_for_env = Call {
                caller: key.to_owned(),
                file: path.clone(),
                needs: Vec::new(),
                condition: None,
                inputs: inputs.clone(),
                secrets: secrets.clone(),
                env: Vec::new(),
            };
            let bound = bind_call(ctx, n, &call_for_env, "");
            env_map(ctx, &bound, "env")
        })
        .unwrap_or_default();
    if let Some(n) = top.get("environments") {
        for (name, spec) in load_environments(ctx, n) {
            match environments.get(&name) {
                Some(existing) if *existing != spec => ctx.error(
                    n.pos,
                    format!("environment {name} is defined in {path} differently from the pipeline's; define it once"),
                ),
                Some(_) => {}
                None => {
                    environments.insert(name, spec);
                }
            }
        }
    }
    let Some(jobs_node) = top.get("jobs") else {
        ctx.error(tree.pos, format!("{path} has no jobs"));
        set.failed = true;
        return;
    };
    let call = Call {
        caller: key.to_owned(),
        file: path,
        needs,
        condition,
        inputs,
        secrets,
        env,
    };
    let inner_scope = Scope {
        prefix: format!("{key}/"),
        chain,
        call: Some(&call),
    };
    let mut inner = JobSet::default();
    load_jobs(ctx, src, jobs_node, &inner_scope, &mut inner, environments);
    let mut members: Vec<String> = inner.jobs.iter().map(|j| j.key.clone()).collect();
    members.dedup();
    set.groups.insert(key.to_owned(), members);
    set.groups.extend(inner.groups);
    set.jobs.extend(inner.jobs);
    set.failed |= inner.failed;
}

fn names_or_none<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}

/// One job (not a call): its matrix, then each expansion read from its own tree.
fn load_job(ctx: &mut Ctx, key: &str, pos: Pos, node: &Node, scope: &Scope<'_>) -> Option<RawJob> {
    if !matches!(node.kind, Kind::Map(_)) {
        // Reported with its type by `fields`.
        fields(ctx, node, JOB_KEYS, &format!("job {key}"));
        return None;
    }
    let strategy = get(node, "strategy").map(|(_, n)| n);
    let direct = get(node, "matrix").map(|(_, n)| n);
    let strategy_fields = strategy.and_then(|s| fields(ctx, s, STRATEGY_KEYS, "strategy"));
    let matrix_node = match (&strategy_fields, direct) {
        (Some(s), direct) => {
            if let Some(direct) = direct {
                ctx.error(
                    direct.pos,
                    "give the matrix either under strategy or directly under the job, not both",
                );
            }
            s.get("matrix")
        }
        (None, direct) => direct,
    };
    let (combos, is_matrix) = match matrix_node {
        Some(m) => (expand_matrix(ctx, m)?, true),
        None => (vec![Vec::new()], false),
    };
    let fail_fast = strategy_fields
        .as_ref()
        .and_then(|s| s.get("fail-fast"))
        .and_then(|n| crate::load::boolean(ctx, n, "strategy.fail-fast"))
        .unwrap_or(false);
    let max_parallel = strategy_fields
        .as_ref()
        .and_then(|s| s.get("max-parallel"))
        .and_then(|n| match scalar(n).and_then(|s| s.parse::<u32>().ok()) {
            Some(m) if m >= 1 && m as usize <= MAX_MATRIX_JOBS => Some(m),
            _ => {
                ctx.error(
                    n.pos,
                    format!(
                        "strategy.max-parallel must be a whole number from 1 to {MAX_MATRIX_JOBS}"
                    ),
                );
                None
            }
        });
    if let (Some(s), false) = (&strategy_fields, is_matrix) {
        if let Some(n) = s.get("fail-fast").or_else(|| s.get("max-parallel")) {
            ctx.error(
                n.pos,
                "fail-fast and max-parallel apply to a matrix; the job has none",
            );
        }
    }
    let mut needs: Vec<(String, Pos)> = get(node, "needs")
        .map(|(_, n)| string_list(ctx, n, "needs"))
        .unwrap_or_default()
        .into_iter()
        .map(|(n, pos)| (format!("{}{n}", scope.prefix), pos))
        .collect();
    if let Some(call) = scope.call {
        if needs.is_empty() {
            needs.clone_from(&call.needs);
        }
    }
    if !ctx.charge(pos, node.text_size().saturating_mul(combos.len())) {
        return None;
    }
    let mut expansions = Vec::with_capacity(combos.len());
    for combo in &combos {
        let expanded = fill_matrix(ctx, node, combo, &combos);
        let Some(mut body) = load_body(ctx, key, pos, &expanded, &combos) else {
            continue;
        };
        if let Some(call) = scope.call {
            let if_pos = get(&expanded, "if").map_or(pos, |(_, n)| n.pos);
            let own = bind_condition(ctx, &body.condition, call, &scope.prefix, if_pos);
            body.condition = match &call.condition {
                Some(caller) => Condition::And(vec![caller.clone(), own]),
                None => own,
            };
            let step_nodes = steps_of(&expanded);
            for (i, step) in body.steps.iter_mut().enumerate() {
                let if_pos = step_nodes
                    .get(i)
                    .and_then(|n| get(n, "if"))
                    .map_or(pos, |(_, n)| n.pos);
                step.condition = bind_condition(ctx, &step.condition, call, &scope.prefix, if_pos);
            }
            let mut env = call.env.clone();
            for (name, text) in std::mem::take(&mut body.env) {
                env.retain(|(n, _)| *n != name);
                env.push((name, text));
            }
            body.env = env;
        }
        expansions.push(Expansion {
            node: expanded,
            body,
        });
    }
    if expansions.len() != combos.len() {
        return None;
    }
    Some(RawJob {
        key: key.to_owned(),
        pos,
        needs,
        is_matrix,
        combos,
        fail_fast,
        max_parallel,
        called_by: scope.call.map(|c| c.caller.clone()),
        expansions,
    })
}

/// The step nodes of a job's tree.
fn steps_of(node: &Node) -> Vec<&Node> {
    match get(node, "steps").map(|(_, n)| &n.kind) {
        Some(Kind::Seq(items)) => items.iter().collect(),
        _ => Vec::new(),
    }
}

/// The job's tree with `${{ matrix.NAME }}` filled in everywhere but in conditions
/// (which compare `matrix.NAME` themselves) and the keys that define the job's place
/// (`needs`, `strategy`, `matrix`).
fn fill_matrix(
    ctx: &mut Ctx,
    node: &Node,
    combo: &[(String, String)],
    combos: &[Vec<(String, String)>],
) -> Node {
    let mut errors: Vec<(Pos, String)> = Vec::new();
    let skip = |depth: usize, key: &str| {
        key == "if" || (depth == 0 && matches!(key, "needs" | "strategy" | "matrix"))
    };
    let filled = map_scalars(node, 0, &skip, &mut |text, pos| {
        if !text.contains("${{") {
            return None;
        }
        Some(replace_references(text, |expr| {
            let name = expr.strip_prefix("matrix.")?;
            let value = combo
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone());
            if value.is_none() {
                errors.push((pos, unknown_matrix_key(name, combos)));
            }
            value
        }))
    });
    for (pos, message) in errors {
        ctx.error(pos, message);
    }
    filled
}

fn duration_or(ctx: &mut Ctx, node: Option<&Node>, default: u64) -> u64 {
    let Some(n) = node else {
        return default;
    };
    match scalar(n).map(parse_duration) {
        Some(Ok(ms)) if ms > 0 && ms <= MAX_TIMEOUT_MS => ms,
        Some(Ok(_)) => {
            ctx.error(n.pos, "timeout must be more than 0 and at most 168h");
            default
        }
        Some(Err(message)) => {
            ctx.error(n.pos, format!("timeout {message}"));
            default
        }
        None => {
            ctx.error(
                n.pos,
                format!(
                    "timeout must be a duration like 30m, found {}",
                    n.type_name()
                ),
            );
            default
        }
    }
}

/// Reads one expansion of a job.
fn load_body(
    ctx: &mut Ctx,
    key: &str,
    pos: Pos,
    node: &Node,
    combos: &[Vec<(String, String)>],
) -> Option<Body> {
    let what = format!("job {key}");
    let f = fields(ctx, node, JOB_KEYS, &what)?;
    let runs_on = f
        .get("runs-on")
        .map(|n| load_labels(ctx, n))
        .unwrap_or_default()
        .into_iter()
        .map(|(k, t)| (k, t.value))
        .collect();
    let deploy = f
        .get("deploy")
        .and_then(|n| crate::load::load_deploy(ctx, n));
    let is_deploy = f.get("deploy").is_some();
    if is_deploy {
        for key in ["services", "image", "checkout", "reports", "outputs"] {
            if let Some(n) = f.get(key) {
                ctx.error(n.pos, format!("a deploy job runs no steps: the coordinator deploys, so {key} does not apply"));
            }
        }
    }
    let timeout_ms = duration_or(ctx, f.get("timeout"), DEFAULT_TIMEOUT_MS);
    let mut steps = Vec::new();
    match f.get("steps") {
        None if is_deploy => {}
        Some(steps_node) if is_deploy => ctx.error(
            steps_node.pos,
            "a deploy job runs no steps: the coordinator deploys; put commands for the hosts under deploy.hooks",
        ),
        None => ctx.error(
            pos,
            format!("job {key} has no steps; expected steps: [{{ run: ... }}]"),
        ),
        Some(steps_node) => match &steps_node.kind {
            Kind::Seq(items) if !items.is_empty() => {
                let mut ids: HashMap<String, Pos> = HashMap::new();
                for item in items {
                    if let Some(step) = load_step(ctx, item, combos, timeout_ms) {
                        if let Some(id) = &step.id {
                            let id_pos = get(item, "id").map_or(item.pos, |(_, n)| n.pos);
                            if let Some(first) = ids.insert(id.clone(), id_pos) {
                                ctx.error(id_pos, format!("step id \"{id}\" is used twice in job {key} (also at line {}); ids name one step", first.line));
                            }
                        }
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
    let retry = match f.get("retry") {
        None => 0,
        Some(n) => match scalar(n).and_then(|s| s.parse::<u64>().ok()) {
            Some(r) if r <= u64::from(MAX_RETRY) => u32::try_from(r).unwrap_or(MAX_RETRY),
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
        .and_then(|n| crate::load::boolean(ctx, n, "continue-on-error"))
        .unwrap_or(false);
    let condition = match f.get("if") {
        None => Condition::default(),
        Some(n) => load_condition(ctx, n, combos).unwrap_or_default(),
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
        .and_then(|n| runtime::load_image(ctx, n, "image"));
    let artifacts = f.get("artifacts").and_then(|n| load_artifacts(ctx, n));
    let caches = f
        .get("cache")
        .map(|n| load_caches(ctx, n))
        .unwrap_or_default();
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
    let outputs = f
        .get("outputs")
        .map(|n| runtime::load_outputs(ctx, n))
        .unwrap_or_default();
    let services = f
        .get("services")
        .map(|n| runtime::load_services(ctx, n))
        .unwrap_or_default();
    let reports = f.get("reports").and_then(|n| runtime::load_reports(ctx, n));
    let checkout = f
        .get("checkout")
        .and_then(|n| runtime::load_checkout(ctx, n))
        .unwrap_or_default();
    let concurrency = f
        .get("concurrency")
        .and_then(|n| runtime::load_concurrency(ctx, n))
        .map(|(c, _)| c);
    let mut environment = f
        .get("environment")
        .and_then(|n| runtime::load_environment(ctx, n));
    if let Some((deploy, _)) = &deploy {
        match &environment {
            Some(own) if own.name != deploy.environment => {
                let at = f.get("environment").map_or(pos, |n| n.pos);
                ctx.error(at, format!("environment \"{}\" differs from deploy.environment \"{}\"; a deploy job has one environment (give the url here and the name under deploy, or the same name in both)", own.name, deploy.environment));
            }
            _ => {
                environment = Some(JobEnvironment {
                    name: deploy.environment.clone(),
                    url: environment.and_then(|e| e.url),
                });
            }
        }
    }
    Some(Body {
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
        caches,
        download,
        deploy,
        outputs,
        services,
        reports,
        environment,
        checkout,
        concurrency,
    })
}

fn job_name(key: &str, combo: &[(String, String)], is_matrix: bool) -> String {
    if !is_matrix {
        return key.to_owned();
    }
    let values: Vec<&str> = combo.iter().map(|(_, v)| v.as_str()).collect();
    format!("{key} ({})", values.join(", "))
}

/// What the reference checks of one job know about the others.
struct Graph<'a> {
    /// Each job's key: whether it is a matrix, and its output names.
    outputs: HashMap<&'a str, (bool, BTreeSet<&'a str>)>,
    groups: &'a HashMap<String, Vec<String>>,
}

/// What the reference checks know about the job whose texts they check.
struct JobFacts<'a> {
    env: BTreeSet<&'a str>,
    /// Step ids in order (`None` for a step without one).
    steps: Vec<Option<&'a str>>,
    /// The job's needs as written (keys of jobs or of calling jobs).
    needs: BTreeSet<&'a str>,
    graph: &'a Graph<'a>,
    /// `needs` output references counted so far, against [`MAX_OUTPUT_REFERENCES`].
    output_references: usize,
}

/// Settles names and needs, checks the graph and every reference, and builds the jobs.
fn assemble(ctx: &mut Ctx, set: &JobSet) -> Vec<Job> {
    let index: HashMap<&str, usize> = set
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.key.as_str(), i))
        .collect();
    let names_by_key: HashMap<&str, Vec<String>> = set
        .jobs
        .iter()
        .map(|raw| {
            (
                raw.key.as_str(),
                raw.combos
                    .iter()
                    .map(|c| job_name(&raw.key, c, raw.is_matrix))
                    .collect(),
            )
        })
        .collect();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for raw in &set.jobs {
        for name in &names_by_key[raw.key.as_str()] {
            if seen.insert(name.clone(), raw.pos).is_some() {
                ctx.error(
                    raw.pos,
                    format!("job name \"{name}\" is produced twice; job names must be unique"),
                );
            }
        }
    }
    // Needs as job indices: a calling job stands for every job of its pipeline.
    let mut edges: Vec<Vec<(usize, Pos)>> = Vec::with_capacity(set.jobs.len());
    for raw in &set.jobs {
        let mut targets = Vec::new();
        for (need, pos) in &raw.needs {
            if let Some(&i) = index.get(need.as_str()) {
                targets.push((i, *pos));
            } else if let Some(members) = set.groups.get(need) {
                targets.extend(
                    members
                        .iter()
                        .filter_map(|m| index.get(m.as_str()).map(|&i| (i, *pos))),
                );
            } else {
                let prefix = raw.key.rsplit_once('/').map_or("", |(p, _)| p);
                let visible: Vec<&str> = set
                    .jobs
                    .iter()
                    .map(|j| j.key.as_str())
                    .chain(set.groups.keys().map(String::as_str))
                    .filter_map(|k| {
                        let local = if prefix.is_empty() {
                            Some(k)
                        } else {
                            k.strip_prefix(prefix).and_then(|r| r.strip_prefix('/'))
                        };
                        local.filter(|l| !l.contains('/'))
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let shown = need.rsplit_once('/').map_or(need.as_str(), |(_, n)| n);
                ctx.error(
                    *pos,
                    format!(
                        "needs names \"{shown}\", which is not a job; jobs are: {}",
                        visible.join(", ")
                    ),
                );
            }
        }
        edges.push(targets);
    }
    check_cycles(ctx, set, &edges);
    let graph = Graph {
        outputs: set
            .jobs
            .iter()
            .map(|raw| {
                let names = raw
                    .expansions
                    .first()
                    .map(|e| e.body.outputs.iter().map(|(n, _)| n.as_str()).collect())
                    .unwrap_or_default();
                (raw.key.as_str(), (raw.is_matrix, names))
            })
            .collect(),
        groups: &set.groups,
    };
    let mut jobs = Vec::new();
    let mut origins: Vec<&Body> = Vec::new();
    let mut artifact_names: HashMap<String, Pos> = HashMap::new();
    for (raw, targets) in set.jobs.iter().zip(&edges) {
        let mut needs: Vec<String> = Vec::new();
        for (target, _) in targets {
            for name in &names_by_key[set.jobs[*target].key.as_str()] {
                if !needs.contains(name) {
                    needs.push(name.clone());
                }
            }
        }
        for (combo, expansion) in raw.combos.iter().zip(&raw.expansions) {
            let body = &expansion.body;
            let name = job_name(&raw.key, combo, raw.is_matrix);
            let mut facts = JobFacts {
                env: body.env.iter().map(|(k, _)| k.as_str()).collect(),
                steps: body.steps.iter().map(|s| s.id.as_deref()).collect(),
                needs: raw.needs.iter().map(|(n, _)| n.as_str()).collect(),
                graph: &graph,
                output_references: 0,
            };
            check_job(ctx, expansion, &mut facts);
            let artifact = body.artifacts.as_ref().and_then(|a| {
                match a.spec(&name.replace('/', ".")) {
                    Err((pos, message)) => {
                        ctx.error(pos, message);
                        None
                    }
                    Ok((spec, pos)) => {
                        if let Some(first) = artifact_names.insert(spec.name.clone(), pos) {
                            ctx.error(
                                pos,
                                format!(
                                    "artifact name \"{}\" is declared twice (also at line {}); artifact names must be unique in a pipeline (a matrix job can add ${{{{ matrix.NAME }}}} to its name)",
                                    spec.name, first.line
                                ),
                            );
                        }
                        Some(spec)
                    }
                }
            });
            jobs.push(Job {
                name,
                key: raw.key.clone(),
                needs: needs.clone(),
                runs_on: body.runs_on.clone(),
                steps: body.steps.clone(),
                env: body
                    .env
                    .iter()
                    .map(|(k, t)| (k.clone(), t.value.clone()))
                    .collect(),
                timeout_ms: body.timeout_ms,
                retry: body.retry,
                continue_on_error: body.continue_on_error,
                condition: body.condition.clone(),
                manual: body.manual,
                image: body.image.clone(),
                matrix: combo.iter().cloned().collect(),
                artifact,
                caches: body.caches.clone(),
                download: body
                    .download
                    .as_ref()
                    .map(|list| list.iter().map(|(n, _)| n.clone()).collect()),
                deploy: body.deploy.as_ref().map(|(d, _)| d.clone()),
                outputs: body
                    .outputs
                    .iter()
                    .map(|(k, t)| (k.clone(), t.value.clone()))
                    .collect(),
                services: body.services.clone(),
                reports: body.reports.clone(),
                environment: body.environment.clone(),
                checkout: body.checkout.clone(),
                concurrency: body.concurrency.clone(),
                fail_fast: raw.fail_fast,
                max_parallel: raw.max_parallel,
                called_by: raw.called_by.clone(),
            });
            origins.push(body);
        }
    }
    check_downloads(ctx, &jobs, &origins);
    jobs
}

/// Reports every cycle in `needs`, named like `a -> b -> a`, at the need that closes it.
fn check_cycles(ctx: &mut Ctx, set: &JobSet, edges: &[Vec<(usize, Pos)>]) {
    let jobs = &set.jobs;
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

/// Every name in a job's `download` must be the artifact of a job it waits for (directly
/// or through other needs), or it could not exist when the job starts.
fn check_downloads(ctx: &mut Ctx, jobs: &[Job], origins: &[&Body]) {
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
    for (job, body) in jobs.iter().zip(origins) {
        let mut wanted: Vec<(String, Pos)> = body.download.clone().unwrap_or_default();
        if let Some((deploy, pos)) = &body.deploy {
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
                Some(maker) if index.get(maker).is_some_and(|i| upstream.contains(i)) => {}
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

/// Which references the text at `path` (keys and list indices below the job) may use;
/// `None` for what is not a reference-bearing text (conditions, needs, the matrix),
/// checked elsewhere or not at all.
fn rule(path: &[String]) -> Option<Allowed> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    let run_env_needs = |what| Allowed {
        run: true,
        env: true,
        needs: true,
        ..Allowed::none(what)
    };
    let image = |rest: &[&str], what| match rest {
        [] | ["name"] => Some(run_env_needs(what)),
        ["credentials", "username"] => Some(Allowed {
            run: true,
            secrets: true,
            ..Allowed::none("a registry username")
        }),
        ["credentials", "password"] => Some(Allowed {
            secrets: true,
            ..Allowed::none("a registry password")
        }),
        _ => Some(Allowed::none("this image key")),
    };
    let step = |i: &str| i.parse::<usize>().ok();
    Some(match p.as_slice() {
        ["if" | "needs" | "strategy" | "matrix" | "uses" | "extends", ..] | ["steps", _, "if"] => {
            return None
        }
        ["env", ..] => Allowed::with_secrets("the job's env"),
        ["steps", i, "run"] => Allowed {
            steps_before: step(i),
            ..Allowed::with_secrets("a step's run")
        },
        ["steps", i, "env", ..] => Allowed {
            steps_before: step(i),
            ..Allowed::with_secrets("a step's env")
        },
        ["steps", i, "name"] => Allowed {
            steps_before: step(i),
            ..Allowed::dispatch("a step's name")
        },
        ["steps", _, "working-directory"] => Allowed::none("working-directory"),
        ["steps", ..] => Allowed::none("this step key"),
        ["outputs", ..] => Allowed {
            steps_before: Some(usize::MAX),
            ..Allowed::dispatch("the job's outputs")
        },
        ["image", rest @ ..] => return image(rest, "an image"),
        ["services", _] => run_env_needs("a service's image"),
        ["services", _, "image", rest @ ..] => return image(rest, "a service's image"),
        ["services", _, "env" | "command", ..] | ["services", _, "health", "cmd", ..] => {
            Allowed::with_secrets("a service's env and commands")
        }
        ["services", ..] => Allowed::none("this service key"),
        ["cache", "key" | "restore-keys", ..] | ["cache", _, "key" | "restore-keys", ..] => {
            Allowed {
                run: true,
                env: true,
                hash_files: true,
                ..Allowed::none("a cache key")
            }
        }
        ["cache", ..] => Allowed::none("a cache's paths"),
        ["deploy", "environment"] => Allowed {
            run: true,
            ..Allowed::none("deploy.environment")
        },
        ["deploy", "version"] => run_env_needs("deploy.version"),
        ["deploy", "hooks" | "env", ..] | ["deploy", "blue-green", "switch"] => {
            Allowed::with_secrets("a deploy hook or env")
        }
        ["deploy", "health", ..] => Allowed {
            host: true,
            ..run_env_needs("a deploy health check")
        },
        ["deploy", ..] => Allowed::none("this deploy key"),
        ["environment"] | ["environment", "name"] => Allowed {
            run: true,
            ..Allowed::none("environment")
        },
        ["environment", "url"] => Allowed {
            steps_before: Some(usize::MAX),
            ..run_env_needs("environment.url")
        },
        ["concurrency"] | ["concurrency", "group"] => Allowed {
            run: true,
            env: true,
            ..Allowed::none("a concurrency group")
        },
        ["runs-on", ..] => Allowed::none("runs-on"),
        ["artifacts", ..] => Allowed::none("artifacts"),
        ["reports", ..] => Allowed::none("reports"),
        ["checkout", ..] => Allowed::none("checkout"),
        ["download", ..] => Allowed::none("download"),
        _ => Allowed::none("this key"),
    })
}

/// Checks every reference of one expansion of a job, and its conditions.
fn check_job(ctx: &mut Ctx, expansion: &Expansion, facts: &mut JobFacts<'_>) {
    let mut path = Vec::new();
    walk(ctx, &expansion.node, &mut path, facts);
    if let Some((_, n)) = get(&expansion.node, "if") {
        check_condition(ctx, &expansion.body.condition, n.pos, Some(facts), None);
    }
    for (i, (step, node)) in expansion
        .body
        .steps
        .iter()
        .zip(steps_of(&expansion.node))
        .enumerate()
    {
        if let Some((_, n)) = get(node, "if") {
            check_condition(ctx, &step.condition, n.pos, Some(facts), Some(i));
        }
    }
}

fn walk(ctx: &mut Ctx, node: &Node, path: &mut Vec<String>, facts: &mut JobFacts<'_>) {
    match &node.kind {
        Kind::Scalar { value, .. } => {
            if let Some(allowed) = rule(path) {
                check_refs(ctx, value, node.pos, allowed, Some(facts));
            }
        }
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                walk(ctx, item, path, facts);
                path.pop();
            }
        }
        Kind::Map(entries) => {
            for (key, value) in entries {
                let Some(key) = scalar(key) else { continue };
                path.push(key.to_owned());
                walk(ctx, value, path, facts);
                path.pop();
            }
        }
    }
}

/// Checks the references of a text outside jobs (the pipeline's env, its concurrency,
/// a `with:` value).
pub(crate) fn check_text(ctx: &mut Ctx, text: &Text, allowed: Allowed) {
    check_refs(ctx, &text.value, text.pos, allowed, None);
}

fn check_refs(
    ctx: &mut Ctx,
    text: &str,
    pos: Pos,
    allowed: Allowed,
    mut facts: Option<&mut JobFacts<'_>>,
) {
    for found in references(text) {
        let Ok((_, expr)) = found else {
            ctx.error(pos, "unterminated \"${{\"; expected \"}}\"");
            continue;
        };
        let reference = match parse_reference(expr) {
            Ok(reference) => reference,
            Err(message) => {
                ctx.error(pos, message);
                continue;
            }
        };
        if let Some(message) = allowed.refuses(&reference) {
            ctx.error(pos, message);
            continue;
        }
        let step_limit = allowed.steps_before;
        if let Some(message) = declared(ctx, &reference, facts.as_deref_mut(), step_limit) {
            ctx.error(pos, message);
        }
    }
}

/// Whether what a reference names is declared where it is used; the problem if not.
fn declared(
    ctx: &Ctx,
    reference: &Reference,
    facts: Option<&mut JobFacts<'_>>,
    steps_before: Option<usize>,
) -> Option<String> {
    match reference {
        Reference::Input(name) if !ctx.inputs.contains_key(name) => Some(format!(
            "inputs.{name} is not declared; declare it under on.inputs (declared inputs: {})",
            names_or_none(ctx.inputs.keys())
        )),
        Reference::Env(name) => {
            let known = ctx.pipeline_env.contains(name)
                || facts
                    .as_ref()
                    .is_some_and(|f| f.env.contains(name.as_str()));
            (!known).then(|| format!("env.{name} is not in the pipeline's or the job's env:; declare it there (a step's own env and the agent's environment are read as ${name} in run)"))
        }
        Reference::StepOutput { step, .. } => {
            let facts = facts?;
            let limit = steps_before.unwrap_or(0).min(facts.steps.len());
            if facts.steps[..limit].contains(&Some(step.as_str())) {
                None
            } else if facts.steps.contains(&Some(step.as_str())) {
                Some(format!("step {step} does not run before this; a step reads the outputs of the steps before it"))
            } else {
                let ids: Vec<&str> = facts.steps.iter().flatten().copied().collect();
                Some(format!(
                    "no step of this job has id \"{step}\"; step ids are: {}",
                    if ids.is_empty() {
                        "(none: give the step an id:)".to_owned()
                    } else {
                        ids.join(", ")
                    }
                ))
            }
        }
        Reference::NeedsOutput { job, name } => {
            let facts = facts?;
            needs_output_problem(facts, job, name)
        }
        _ => None,
    }
}

fn needs_output_problem(facts: &mut JobFacts<'_>, job: &str, name: &str) -> Option<String> {
    let shown = job.rsplit_once('/').map_or(job, |(_, j)| j);
    if !facts.needs.contains(job) {
        return Some(format!(
            "needs.{shown}.outputs.{name}: {shown} is not in this job's needs; add it to needs"
        ));
    }
    if facts.graph.groups.contains_key(job) {
        return Some(format!("needs.{shown}.outputs.{name}: {shown} calls a pipeline, whose outputs are not passed on; read them in the called pipeline's jobs"));
    }
    let Some((is_matrix, outputs)) = facts.graph.outputs.get(job) else {
        return Some(format!(
            "needs.{shown}.outputs.{name}: {shown} is not a job"
        ));
    };
    if *is_matrix {
        return Some(format!("needs.{shown}.outputs.{name}: {shown} is a matrix job, whose expansions' outputs would overwrite each other; pass the value from a job that needs the matrix"));
    }
    if !outputs.contains(name) {
        let declared: Vec<&str> = outputs.iter().copied().collect();
        return Some(format!(
            "job {shown} declares no output {name}; its outputs are: {}",
            if declared.is_empty() {
                "(none: declare outputs: in it)".to_owned()
            } else {
                declared.join(", ")
            }
        ));
    }
    facts.output_references += 1;
    (facts.output_references == MAX_OUTPUT_REFERENCES + 1).then(|| {
        format!("the job reads more than {MAX_OUTPUT_REFERENCES} needs outputs; pass larger data as an artifact")
    })
}

/// Checks the operands of a condition: inputs declared, env names known, outputs of
/// steps before `step` (step conditions) and of direct needs.
fn check_condition(
    ctx: &mut Ctx,
    condition: &Condition,
    pos: Pos,
    mut facts: Option<&mut JobFacts<'_>>,
    step: Option<usize>,
) {
    for operand in condition.operands() {
        let problem = match operand {
            Operand::Input(name) => declared(ctx, &Reference::Input(name.clone()), None, None),
            Operand::Env(name) => {
                let in_pipeline = ctx.pipeline_env.contains(name);
                let in_job = step.is_some()
                    && facts.as_ref().is_some_and(|f| f.env.contains(name.as_str()));
                (!in_pipeline && !in_job).then(|| {
                    if step.is_some() {
                        format!("env.{name} is not in the pipeline's or the job's env:")
                    } else {
                        format!("env.{name} is not in the pipeline's env: (a job's if: is decided before the job's own env exists)")
                    }
                })
            }
            Operand::StepOutput { step: id, name } => match (step, facts.as_deref_mut()) {
                (Some(i), Some(f)) => declared(
                    ctx,
                    &Reference::StepOutput { step: id.clone(), name: name.clone() },
                    Some(f),
                    Some(i),
                ),
                _ => Some(format!("steps.{id}.outputs.{name} exists only inside the job; a job's if: can read needs.JOB.outputs.NAME")),
            },
            Operand::NeedsOutput { job, name } => match facts.as_deref_mut() {
                Some(f) => needs_output_problem(f, job, name),
                None => Some("needs outputs are not known here".to_owned()),
            },
            _ => None,
        };
        if let Some(problem) = problem {
            ctx.error(pos, problem);
        }
    }
}
