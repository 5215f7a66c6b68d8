//! `${{ ... }}` references: their grammar, which ones each field may use, and the
//! messages for the ones Gantry does not have.
//!
//! This module owns what a reference may name. It does not fill references in (the
//! coordinator does at dispatch, the agent for secrets and step outputs) and knows
//! nothing of YAML; `load` walks the tree and asks it about each text with the field's
//! [`Allowed`] set.
//!
//! The contexts (each mirrors an environment variable of the job where there is one):
//!
//! | reference | value | variable |
//! |---|---|---|
//! | `git.commit` | the commit built (full hex) | `GANTRY_COMMIT` |
//! | `git.ref` | the full ref (`refs/heads/main`, `refs/tags/v1`, `refs/pull/7/head`) | `GANTRY_REF` |
//! | `git.branch` | the branch name, empty for tags | `GANTRY_BRANCH` |
//! | `git.tag` | the tag name, empty for branches | `GANTRY_TAG` |
//! | `git.repo` | the repository's name on the coordinator | `GANTRY_REPO` |
//! | `event.name` | `push`, `pull_request`, `tag`, `schedule`, `manual`, `poll` | `GANTRY_EVENT` |
//! | `event.actor` | who pushed or started the run | `GANTRY_ACTOR` |
//! | `event.pr_number` | the pull request's number, empty otherwise | `GANTRY_PR_NUMBER` |
//! | `event.pr_base` | the pull request's base branch, empty otherwise | `GANTRY_PR_BASE` |
//! | `inputs.NAME` | a declared input | |
//! | `env.NAME` | a variable of the pipeline's or job's `env:` | |
//! | `matrix.NAME` | the expansion's value, filled in when the file is read | |
//! | `secrets.NAME` | a secret, filled in by the agent and masked in logs | |
//! | `steps.ID.outputs.NAME` | an output an earlier step of the job wrote | |
//! | `needs.JOB.outputs.NAME` | an output a job this one needs declared | |
//! | `hashFiles('glob', ...)` | a digest of workspace files (cache keys only) | |
//! | `labels.KEY`, `slot.port` | the host's label, the blue-green slot's port (deploy health checks only) | |

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::outputs::hash_files_patterns;

/// A field of `git.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GitField {
    Commit,
    Ref,
    Branch,
    Tag,
    Repo,
}

/// A field of `event.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventField {
    Name,
    Actor,
    PrNumber,
    PrBase,
}

const GIT_FIELDS: &[(&str, GitField)] = &[
    ("commit", GitField::Commit),
    ("ref", GitField::Ref),
    ("branch", GitField::Branch),
    ("tag", GitField::Tag),
    ("repo", GitField::Repo),
];
const EVENT_FIELDS: &[(&str, EventField)] = &[
    ("name", EventField::Name),
    ("actor", EventField::Actor),
    ("pr_number", EventField::PrNumber),
    ("pr_base", EventField::PrBase),
];

impl fmt::Display for GitField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = GIT_FIELDS
            .iter()
            .find(|(_, g)| g == self)
            .map_or("", |(n, _)| n);
        write!(f, "git.{name}")
    }
}

impl fmt::Display for EventField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = EVENT_FIELDS
            .iter()
            .find(|(_, e)| e == self)
            .map_or("", |(n, _)| n);
        write!(f, "event.{name}")
    }
}

/// One parsed `${{ ... }}` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Matrix(String),
    Secret(String),
    Input(String),
    Env(String),
    Git(GitField),
    Event(EventField),
    StepOutput { step: String, name: String },
    NeedsOutput { job: String, name: String },
    HashFiles,
    Label(String),
    SlotPort,
}

/// What a field may reference. Matrix values are filled in before these checks, so
/// they are allowed everywhere a file may use them and never appear here. (One flag per
/// context reads as the table in the module documentation; an enum set would hide it.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct Allowed {
    /// `inputs.*`, `git.*`, `event.*`: known when the run starts.
    pub run: bool,
    pub env: bool,
    pub secrets: bool,
    /// `needs.JOB.outputs.NAME`.
    pub needs: bool,
    /// `steps.ID.outputs.NAME`: `Some(n)` allows the steps before step `n` (0-based);
    /// `Some(usize::MAX)` allows every step of the job.
    pub steps_before: Option<usize>,
    pub hash_files: bool,
    /// `labels.*` and `slot.port`.
    pub host: bool,
    /// The field's name in messages: "runs-on", "a step's run".
    pub what: &'static str,
}

impl Allowed {
    /// Literal text only (matrix values aside).
    pub const fn none(what: &'static str) -> Self {
        Self {
            run: false,
            env: false,
            secrets: false,
            needs: false,
            steps_before: None,
            hash_files: false,
            host: false,
            what,
        }
    }

    /// What the coordinator fills in at dispatch: inputs, git, event, env, needs outputs.
    pub const fn dispatch(what: &'static str) -> Self {
        Self {
            run: true,
            env: true,
            needs: true,
            ..Self::none(what)
        }
    }

    /// Dispatch-time references plus secrets (filled in by the agent).
    pub const fn with_secrets(what: &'static str) -> Self {
        Self {
            secrets: true,
            ..Self::dispatch(what)
        }
    }

    fn names(&self) -> String {
        let mut names = Vec::new();
        if self.run {
            names.extend(["inputs.NAME", "git.*", "event.*"]);
        }
        if self.env {
            names.push("env.NAME");
        }
        if self.secrets {
            names.push("secrets.NAME");
        }
        if self.needs {
            names.push("needs.JOB.outputs.NAME");
        }
        if self.steps_before.is_some() {
            names.push("steps.ID.outputs.NAME");
        }
        if self.hash_files {
            names.push("hashFiles(...)");
        }
        if self.host {
            names.extend(["labels.KEY", "slot.port"]);
        }
        if names.is_empty() {
            "only matrix values".to_owned()
        } else {
            format!("matrix values and {}", names.join(", "))
        }
    }

    /// Why `reference` cannot be used in this field; `None` if it can. Checks against
    /// declarations (inputs, env, steps, needs) are the caller's.
    pub fn refuses(&self, reference: &Reference) -> Option<String> {
        let ok = match reference {
            Reference::Matrix(_) => true,
            Reference::Input(_) | Reference::Git(_) | Reference::Event(_) => self.run,
            Reference::Env(_) => self.env,
            Reference::Secret(_) => self.secrets,
            Reference::NeedsOutput { .. } => self.needs,
            Reference::StepOutput { .. } => self.steps_before.is_some(),
            Reference::HashFiles => self.hash_files,
            Reference::Label(_) | Reference::SlotPort => self.host,
        };
        if ok {
            return None;
        }
        let hint = match reference {
            Reference::Secret(_) => " (a secret would be shown where this field is)",
            Reference::HashFiles => " (hashFiles(...) is for cache keys)",
            Reference::Label(_) | Reference::SlotPort => {
                " (labels.* and slot.port are for deploy health checks)"
            }
            Reference::StepOutput { .. } => {
                " (step outputs exist only while the job runs: in later steps, the job's outputs and its environment url)"
            }
            _ => "",
        };
        Some(format!(
            "{} cannot use {}{hint}; it may use {}",
            self.what,
            describe(reference),
            self.names()
        ))
    }
}

fn describe(reference: &Reference) -> String {
    match reference {
        Reference::Matrix(n) => format!("matrix.{n}"),
        Reference::Secret(n) => format!("secrets.{n}"),
        Reference::Input(n) => format!("inputs.{n}"),
        Reference::Env(n) => format!("env.{n}"),
        Reference::Git(g) => g.to_string(),
        Reference::Event(e) => e.to_string(),
        Reference::StepOutput { step, name } => format!("steps.{step}.outputs.{name}"),
        Reference::NeedsOutput { job, name } => format!("needs.{job}.outputs.{name}"),
        Reference::HashFiles => "hashFiles(...)".to_owned(),
        Reference::Label(k) => format!("labels.{k}"),
        Reference::SlotPort => "slot.port".to_owned(),
    }
}

/// A name part of a reference: an input, env, secret, step id, output or label key.
fn is_name(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 255
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// A job key in a reference: as in the file, or `caller/job` for a job of a called
/// pipeline (written so by the loader, never by hand).
fn is_job_ref(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 400
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/'))
}

/// Parses the inside of `${{ ... }}` (trimmed). The error says what is wrong and what
/// to write instead.
pub fn parse_reference(expr: &str) -> Result<Reference, String> {
    let expr = expr.trim();
    if let Some(result) = hash_files_patterns(expr) {
        return result.map(|_| Reference::HashFiles);
    }
    if expr == "slot.port" {
        return Ok(Reference::SlotPort);
    }
    if let Some(call) = function_name(expr) {
        return Err(format!(
            "{call}(...) is not a Gantry function; inside ${{{{ }}}} a text field takes one reference (like inputs.NAME), and only cache keys call hashFiles(...); conditions go in if:"
        ));
    }
    if expr.contains(|c: char| c.is_whitespace() || "=!&|()'\"<>".contains(c)) {
        return Err(format!(
            "`{expr}` is an expression; inside ${{{{ }}}} a text field takes one reference (like inputs.NAME); comparisons and && || go in if:"
        ));
    }
    let parts: Vec<&str> = expr.split('.').collect();
    let simple = |make: fn(String) -> Reference| -> Result<Reference, String> {
        match parts.as_slice() {
            [_, name] if is_name(name) => Ok(make((*name).to_owned())),
            _ => Err(format!(
                "`{expr}` is not a reference; write {}.NAME with letters, digits, _ and -",
                parts[0]
            )),
        }
    };
    match parts[0] {
        "matrix" => simple(Reference::Matrix),
        "secrets" => simple(Reference::Secret),
        "inputs" => simple(Reference::Input),
        "env" => simple(Reference::Env),
        "labels" => simple(Reference::Label),
        "git" => match parts.as_slice() {
            [_, field] => GIT_FIELDS
                .iter()
                .find(|(n, _)| n == field)
                .map(|(_, g)| Reference::Git(*g))
                .ok_or_else(|| {
                    format!("unknown git field \"{field}\"; git has commit, ref, branch, tag and repo")
                }),
            _ => Err(format!("`{expr}` is not a reference; git has commit, ref, branch, tag and repo")),
        },
        "event" => match parts.as_slice() {
            [_, field] => EVENT_FIELDS
                .iter()
                .find(|(n, _)| n == field)
                .map(|(_, e)| Reference::Event(*e))
                .ok_or_else(|| {
                    format!("unknown event field \"{field}\"; event has name, actor, pr_number and pr_base")
                }),
            _ => Err(format!("`{expr}` is not a reference; event has name, actor, pr_number and pr_base")),
        },
        "steps" => match parts.as_slice() {
            [_, step, "outputs", name] if is_name(step) && is_name(name) => {
                Ok(Reference::StepOutput {
                    step: (*step).to_owned(),
                    name: (*name).to_owned(),
                })
            }
            [_, _, "outcome" | "conclusion"] => Err(format!(
                "`{expr}` is not available; a step's result is read with success() and failure() in a later step's if:, or write an output"
            )),
            _ => Err(format!(
                "`{expr}` is not a reference; write steps.ID.outputs.NAME (ID is a step's id:)"
            )),
        },
        "needs" => match parts.as_slice() {
            [_, job, "outputs", name] if is_job_ref(job) && is_name(name) => {
                Ok(Reference::NeedsOutput {
                    job: (*job).to_owned(),
                    name: (*name).to_owned(),
                })
            }
            [_, _, "result"] => Err(format!(
                "`{expr}` is not available; test a need's result with success(), failure() or always() in if:"
            )),
            _ => Err(format!(
                "`{expr}` is not a reference; write needs.JOB.outputs.NAME (JOB in needs:, NAME in its outputs:)"
            )),
        },
        _ => Err(unknown_context(expr, parts[0], parts.get(1).copied())),
    }
}

/// `name(` at the start of an expression: a function call.
fn function_name(expr: &str) -> Option<&str> {
    let open = expr.find('(')?;
    let name = expr[..open].trim();
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some(name)
}

/// The message for a context Gantry does not have, with its Gantry form where one
/// exists (GitHub Actions and GitLab CI names, which people bring with them).
pub fn unknown_context(expr: &str, root: &str, field: Option<&str>) -> String {
    let github = |field: Option<&str>| -> &'static str {
        match field {
            Some("sha") => " (github.sha is git.commit)",
            Some("ref") => " (github.ref is git.ref)",
            Some("ref_name" | "head_ref") => " (github.ref_name is git.branch or git.tag)",
            Some("base_ref") => " (github.base_ref is event.pr_base)",
            Some("repository") => " (github.repository is git.repo)",
            Some("event_name") => " (github.event_name is event.name)",
            Some("actor" | "triggering_actor") => " (github.actor is event.actor)",
            Some("run_id" | "run_number") => " (the run's id is the variable $GANTRY_RUN_ID)",
            Some("workspace") => " (the workspace is the variable $GANTRY_WORKSPACE)",
            Some("event") => " (of the event, Gantry has event.name, event.actor, event.pr_number and event.pr_base)",
            _ => "",
        }
    };
    match root {
        "github" => format!(
            "`{expr}`: github.* is GitHub Actions' context; Gantry's are git.* (commit, ref, branch, tag, repo) and event.* (name, actor, pr_number, pr_base){}",
            github(field)
        ),
        "gitea" | "forgejo" => format!(
            "`{expr}`: {root}.* is Gitea Actions' context; Gantry's are git.* (commit, ref, branch, tag, repo) and event.* (name, actor, pr_number, pr_base){}",
            github(field)
        ),
        "vars" => format!("`{expr}`: Gantry has no vars.*; use env.NAME (the pipeline's env:) or inputs.NAME"),
        "runner" => format!("`{expr}`: Gantry has no runner.*; the host's facts are its labels (runs-on) and the job's variables ($GANTRY_WORKSPACE, $HOME)"),
        "job" | "jobs" | "strategy" => format!("`{expr}`: Gantry has no {root}.*; jobs pass values on with outputs: and needs.JOB.outputs.NAME"),
        "step" => format!("`{expr}`: write steps.ID.outputs.NAME"),
        "need" => format!("`{expr}`: write needs.JOB.outputs.NAME"),
        "input" => format!("`{expr}`: write inputs.NAME"),
        "secret" => format!("`{expr}`: write secrets.NAME"),
        _ if root.starts_with("CI_") || root.starts_with("GITLAB_") => format!(
            "`{expr}` looks like a GitLab CI variable; in a step's run read the variable itself ($GANTRY_COMMIT, $GANTRY_BRANCH, ...), in a field use git.* and event.*"
        ),
        _ => format!(
            "unknown reference `{expr}`; references are inputs.NAME, env.NAME, matrix.NAME, secrets.NAME, git.*, event.*, steps.ID.outputs.NAME and needs.JOB.outputs.NAME"
        ),
    }
}

/// Every `${{ ... }}` in `text`: the byte offset of its `${{` and its trimmed inside,
/// or the offset of an unterminated one.
pub fn references(text: &str) -> Vec<Result<(usize, &str), usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("${{") {
        let start = from + found;
        let inner_start = start + 3;
        let Some(len) = text[inner_start..].find("}}") else {
            out.push(Err(start));
            break;
        };
        out.push(Ok((start, text[inner_start..inner_start + len].trim())));
        from = inner_start + len + 2;
    }
    out
}

/// Replaces each `${{ ... }}` for which `replace` returns a value (given the trimmed
/// inside), keeping every other one as written: protocol's expansion, the one both
/// sides of the wire use.
pub use gantry_protocol::template::expand as replace_references;

/// Whether `text` is exactly one reference and nothing else (spaces around it aside).
pub fn sole_reference(text: &str) -> Option<&str> {
    let trimmed = text.trim();
    let inner = trimmed.strip_prefix("${{")?.strip_suffix("}}")?;
    (!inner.contains("${{") && !inner.contains("}}")).then(|| inner.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_into_their_contexts() {
        let cases = [
            ("inputs.target", Reference::Input("target".into())),
            ("git.commit", Reference::Git(GitField::Commit)),
            ("event.pr_number", Reference::Event(EventField::PrNumber)),
            (
                "steps.ver.outputs.value",
                Reference::StepOutput {
                    step: "ver".into(),
                    name: "value".into(),
                },
            ),
            (
                "needs.app/build.outputs.v",
                Reference::NeedsOutput {
                    job: "app/build".into(),
                    name: "v".into(),
                },
            ),
            ("hashFiles('Cargo.lock')", Reference::HashFiles),
            ("labels.port", Reference::Label("port".into())),
            ("slot.port", Reference::SlotPort),
            (" secrets.TOKEN ", Reference::Secret("TOKEN".into())),
        ];
        for (text, want) in cases {
            assert_eq!(parse_reference(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn unknown_references_say_what_gantry_calls_them() {
        let cases = [
            ("github.sha", "github.sha is git.commit"),
            ("github.ref_name", "git.branch or git.tag"),
            ("github.event.pull_request.number", "event.pr_number"),
            ("git.sha", "git has commit, ref, branch, tag and repo"),
            ("event.kind", "event has name, actor"),
            ("vars.REGION", "use env.NAME"),
            ("CI_COMMIT_SHA", "GitLab CI variable"),
            ("format('{0}', x)", "not a Gantry function"),
            ("inputs.a == 'b'", "comparisons and && || go in if:"),
            ("steps.x.outcome", "success() and failure()"),
            ("steps.x", "steps.ID.outputs.NAME"),
            ("needs.a.result", "success(), failure() or always()"),
            ("needs.a.outputs", "needs.JOB.outputs.NAME"),
            ("inputs.", "inputs.NAME"),
            ("inputs.a.b", "inputs.NAME"),
            ("nothing", "unknown reference"),
            ("hashFiles()", "at least one"),
        ];
        for (text, needle) in cases {
            match parse_reference(text) {
                Err(message) => assert!(message.contains(needle), "{text}: {message}"),
                Ok(r) => panic!("{text}: parsed as {r:?}"),
            }
        }
    }

    #[test]
    fn fields_refuse_what_they_cannot_fill_in() {
        let runs_on = Allowed::none("runs-on");
        let message = runs_on
            .refuses(&Reference::Input("x".into()))
            .expect("refused");
        assert_eq!(
            message,
            "runs-on cannot use inputs.x; it may use only matrix values"
        );
        let name = Allowed::dispatch("a step's name");
        assert!(name
            .refuses(&Reference::Secret("T".into()))
            .is_some_and(|m| m.contains("a secret would be shown")));
        assert_eq!(name.refuses(&Reference::Git(GitField::Tag)), None);
        let run = Allowed {
            steps_before: Some(1),
            ..Allowed::with_secrets("a step's run")
        };
        assert_eq!(run.refuses(&Reference::Secret("T".into())), None);
        assert!(run.refuses(&Reference::HashFiles).is_some());
    }

    #[test]
    fn texts_yield_their_references_in_order() {
        assert_eq!(
            references("a ${{ inputs.x }} b ${{git.tag}} ${{ open"),
            vec![Ok((2, "inputs.x")), Ok((20, "git.tag")), Err(33)]
        );
        assert_eq!(
            replace_references("v${{ inputs.x }}-${{ env.Y }}", |e| (e == "inputs.x")
                .then(|| "1".to_owned())),
            "v1-${{ env.Y }}"
        );
        assert_eq!(sole_reference(" ${{ secrets.A }} "), Some("secrets.A"));
        assert_eq!(sole_reference("x${{ secrets.A }}"), None);
    }
}
