//! `if:` conditions: parsing, static folding and evaluation against run status.
//!
//! A condition mixes facts known when a run is planned (branch, event, inputs, matrix,
//! env, `git.*`, `event.*`) with facts known only as the run goes on (`success()` and
//! friends, and the outputs of steps and needs). `Condition::fold` replaces the first
//! kind by constants, leaving a [`StatusExpr`] (protocol's type: the scheduler evaluates
//! it for jobs, agents for steps).

use std::collections::BTreeMap;

pub use gantry_protocol::{CompareOp, ConditionValue, StatusExpr};
use serde::{Deserialize, Serialize};

use crate::refs::{parse_reference, unknown_context, EventField, GitField, Reference};

/// Longest `if:` expression accepted, in bytes.
pub const MAX_CONDITION_LEN: usize = 4096;
/// Deepest nesting of parentheses and `!` accepted.
const MAX_CONDITION_DEPTH: usize = 32;

/// A parsed `if:` expression.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Literal(bool),
    Success,
    Failure,
    Always,
    Cancelled,
    Not(Box<Condition>),
    And(Vec<Condition>),
    Or(Vec<Condition>),
    Compare {
        left: Operand,
        op: CompareOp,
        right: Operand,
    },
}

impl Default for Condition {
    /// A job runs when all its needs succeeded, as in GitHub Actions.
    fn default() -> Self {
        Condition::Success
    }
}

/// One side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operand {
    Str(String),
    Bool(bool),
    /// `branch`: the branch name (the same as `git.branch`).
    Branch,
    /// `event`: the event's name (the same as `event.name`).
    Event,
    Input(String),
    Matrix(String),
    Env(String),
    Git(GitField),
    EventField(EventField),
    /// `steps.ID.outputs.NAME` (step conditions only).
    StepOutput {
        step: String,
        name: String,
    },
    /// `needs.JOB.outputs.NAME`; `JOB` is the need's key.
    NeedsOutput {
        job: String,
        name: String,
    },
}

/// What is known about a run when it is planned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticContext {
    /// Branch name without `refs/heads/` (empty for tags and manual runs without one).
    pub branch: String,
    /// `push`, `pull_request`, `tag`, `schedule`, `manual` or `poll`.
    pub event: String,
    pub inputs: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// `git.commit`: the full commit id, empty for a run without a repository.
    #[serde(default)]
    pub commit: String,
    /// `git.ref`: the full ref (`refs/heads/main`, `refs/tags/v1`).
    #[serde(default)]
    pub git_ref: String,
    /// `git.tag`: the tag name for a tag push, else empty.
    #[serde(default)]
    pub tag: String,
    /// `git.repo`: the repository's name on the coordinator.
    #[serde(default)]
    pub repo: String,
    /// `event.actor`: who pushed, opened the pull request or started the run.
    #[serde(default)]
    pub actor: String,
    /// `event.pr_number`: the pull request's number, else empty.
    #[serde(default)]
    pub pr_number: String,
    /// `event.pr_base`: the pull request's base branch, else empty.
    #[serde(default)]
    pub pr_base: String,
}

impl StaticContext {
    /// The value of a run-wide reference (`inputs.*`, `git.*`, `event.*`); `None` for
    /// any other kind. An input not given is the empty string.
    pub fn value(&self, reference: &Reference) -> Option<String> {
        Some(match reference {
            Reference::Input(name) => self.inputs.get(name).cloned().unwrap_or_default(),
            Reference::Git(field) => self.git(*field).to_owned(),
            Reference::Event(field) => self.event_field(*field).to_owned(),
            _ => return None,
        })
    }

    /// Fills in every `${{ inputs.* }}`, `${{ git.* }}` and `${{ event.* }}` of `text`,
    /// leaving other references as written: what the coordinator does to a field when a
    /// run starts (an `environment:` chosen by an input, a concurrency group).
    pub fn expand(&self, text: &str) -> String {
        crate::refs::replace_references(text, |expr| {
            parse_reference(expr).ok().and_then(|r| self.value(&r))
        })
    }

    fn git(&self, field: GitField) -> &str {
        match field {
            GitField::Commit => &self.commit,
            GitField::Ref => &self.git_ref,
            GitField::Branch => &self.branch,
            GitField::Tag => &self.tag,
            GitField::Repo => &self.repo,
        }
    }

    fn event_field(&self, field: EventField) -> &str {
        match field {
            EventField::Name => &self.event,
            EventField::Actor => &self.actor,
            EventField::PrNumber => &self.pr_number,
            EventField::PrBase => &self.pr_base,
        }
    }
}

impl Condition {
    /// Folds every static comparison (branch, event, inputs, env, matrix, git, event
    /// fields) into a constant. Unknown inputs, env and matrix names compare as the
    /// empty string. Comparisons with an output are left for run time.
    pub fn fold(&self, ctx: &StaticContext, matrix: &BTreeMap<String, String>) -> StatusExpr {
        match self {
            Condition::Literal(value) => StatusExpr::Const(*value),
            Condition::Success => StatusExpr::Success,
            Condition::Failure => StatusExpr::Failure,
            Condition::Always => StatusExpr::Always,
            Condition::Cancelled => StatusExpr::Cancelled,
            Condition::Not(inner) => match inner.fold(ctx, matrix) {
                StatusExpr::Const(value) => StatusExpr::Const(!value),
                other => StatusExpr::Not(Box::new(other)),
            },
            Condition::And(items) => {
                let mut kept = Vec::new();
                for item in items {
                    match item.fold(ctx, matrix) {
                        StatusExpr::Const(true) => {}
                        StatusExpr::Const(false) => return StatusExpr::Const(false),
                        other => kept.push(other),
                    }
                }
                match kept.len() {
                    0 => StatusExpr::Const(true),
                    1 => kept.pop().unwrap_or(StatusExpr::Const(true)),
                    _ => StatusExpr::And(kept),
                }
            }
            Condition::Or(items) => {
                let mut kept = Vec::new();
                for item in items {
                    match item.fold(ctx, matrix) {
                        StatusExpr::Const(false) => {}
                        StatusExpr::Const(true) => return StatusExpr::Const(true),
                        other => kept.push(other),
                    }
                }
                match kept.len() {
                    0 => StatusExpr::Const(false),
                    1 => kept.pop().unwrap_or(StatusExpr::Const(false)),
                    _ => StatusExpr::Or(kept),
                }
            }
            Condition::Compare { left, op, right } => {
                match (
                    operand_value(left, ctx, matrix),
                    operand_value(right, ctx, matrix),
                ) {
                    (ConditionValue::Text(a), ConditionValue::Text(b)) => {
                        StatusExpr::Const((a == b) == (*op == CompareOp::Eq))
                    }
                    (left, right) => StatusExpr::Compare {
                        left,
                        op: *op,
                        right,
                    },
                }
            }
        }
    }

    /// Every operand the condition compares, for checks against declarations.
    pub fn operands(&self) -> Vec<&Operand> {
        let mut out = Vec::new();
        self.collect_operands(&mut out);
        out
    }

    fn collect_operands<'a>(&'a self, out: &mut Vec<&'a Operand>) {
        match self {
            Condition::Not(inner) => inner.collect_operands(out),
            Condition::And(items) | Condition::Or(items) => {
                for item in items {
                    item.collect_operands(out);
                }
            }
            Condition::Compare { left, right, .. } => out.extend([left, right]),
            _ => {}
        }
    }

    /// Every `matrix.NAME` the condition compares, to check them against the matrix.
    pub fn matrix_names(&self) -> Vec<&str> {
        self.operands()
            .into_iter()
            .filter_map(|o| match o {
                Operand::Matrix(name) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The condition with each operand `map` returns a replacement for replaced (a
    /// called pipeline's inputs bound to the caller's values, its needs put under the
    /// caller's name).
    #[must_use]
    pub fn map_operands(&self, map: &dyn Fn(&Operand) -> Option<Operand>) -> Condition {
        match self {
            Condition::Not(inner) => Condition::Not(Box::new(inner.map_operands(map))),
            Condition::And(items) => {
                Condition::And(items.iter().map(|i| i.map_operands(map)).collect())
            }
            Condition::Or(items) => {
                Condition::Or(items.iter().map(|i| i.map_operands(map)).collect())
            }
            Condition::Compare { left, op, right } => Condition::Compare {
                left: map(left).unwrap_or_else(|| left.clone()),
                op: *op,
                right: map(right).unwrap_or_else(|| right.clone()),
            },
            other => other.clone(),
        }
    }

    /// Whether the condition uses a status function (`success()` and friends).
    pub fn uses_status(&self) -> bool {
        match self {
            Condition::Success | Condition::Failure | Condition::Always | Condition::Cancelled => {
                true
            }
            Condition::Literal(_) | Condition::Compare { .. } => false,
            Condition::Not(inner) => inner.uses_status(),
            Condition::And(items) | Condition::Or(items) => items.iter().any(Self::uses_status),
        }
    }

    /// Parses an expression. A whole-expression `${{ ... }}` wrapper is allowed. The
    /// error carries the 0-based character offset of the problem.
    pub fn parse(text: &str) -> Result<Condition, (usize, String)> {
        if text.len() > MAX_CONDITION_LEN {
            return Err((
                0,
                format!("condition is longer than {MAX_CONDITION_LEN} bytes"),
            ));
        }
        let trimmed = text.trim();
        let (inner, lead) = match trimmed
            .strip_prefix("${{")
            .and_then(|rest| rest.strip_suffix("}}"))
        {
            Some(inner) => (inner, text.len() - text.trim_start().len() + 3),
            None => (text, 0),
        };
        let lead_chars = text[..lead].chars().count();
        let tokens = lex(inner).map_err(|(at, msg)| (at + lead_chars, msg))?;
        let mut parser = CondParser {
            tokens,
            next: 0,
            end: inner.chars().count(),
        };
        let condition = parser
            .parse_or(0)
            .map_err(|(at, msg)| (at + lead_chars, msg))?;
        if let Some((at, token)) = parser.tokens.get(parser.next) {
            return Err((at + lead_chars, format!("unexpected {}", token.describe())));
        }
        Ok(condition)
    }
}

fn operand_value(
    operand: &Operand,
    ctx: &StaticContext,
    matrix: &BTreeMap<String, String>,
) -> ConditionValue {
    let lookup =
        |map: &BTreeMap<String, String>, name: &str| map.get(name).cloned().unwrap_or_default();
    ConditionValue::Text(match operand {
        Operand::Str(value) => value.clone(),
        Operand::Bool(value) => value.to_string(),
        Operand::Branch => ctx.branch.clone(),
        Operand::Event => ctx.event.clone(),
        Operand::Input(name) => lookup(&ctx.inputs, name),
        Operand::Matrix(name) => lookup(matrix, name),
        Operand::Env(name) => lookup(&ctx.env, name),
        Operand::Git(field) => ctx.git(*field).to_owned(),
        Operand::EventField(field) => ctx.event_field(*field).to_owned(),
        Operand::StepOutput { step, name } => {
            return ConditionValue::StepOutput {
                step: step.clone(),
                name: name.clone(),
            }
        }
        Operand::NeedsOutput { job, name } => {
            return ConditionValue::NeedsOutput {
                job: job.clone(),
                name: name.clone(),
            }
        }
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    LParen,
    RParen,
    Not,
    And,
    Or,
    Eq,
    Ne,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(name) => format!("\"{name}\""),
            Tok::Str(value) => format!("string '{value}'"),
            Tok::LParen => "\"(\"".to_owned(),
            Tok::RParen => "\")\"".to_owned(),
            Tok::Not => "\"!\"".to_owned(),
            Tok::And => "\"&&\"".to_owned(),
            Tok::Or => "\"||\"".to_owned(),
            Tok::Eq => "\"==\"".to_owned(),
            Tok::Ne => "\"!=\"".to_owned(),
        }
    }
}

fn lex(text: &str) -> Result<Vec<(usize, Tok)>, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let pair = |second: char| chars.get(i + 1) == Some(&second);
        let token = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '!' if pair('=') => {
                i += 1;
                Tok::Ne
            }
            '!' => Tok::Not,
            '=' if pair('=') => {
                i += 1;
                Tok::Eq
            }
            '&' if pair('&') => {
                i += 1;
                Tok::And
            }
            '|' if pair('|') => {
                i += 1;
                Tok::Or
            }
            '\'' => {
                // `''` inside a literal is an escaped quote, as in GitHub expressions.
                let mut value = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err((start, "unterminated string literal".to_owned())),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            value.push('\'');
                            i += 2;
                        }
                        Some('\'') => break,
                        Some(other) => {
                            value.push(*other);
                            i += 1;
                        }
                    }
                }
                Tok::Str(value)
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let mut name = String::new();
                while let Some(&c) = chars.get(i) {
                    if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/') {
                        name.push(c);
                        i += 1;
                    } else {
                        break;
                    }
                }
                tokens.push((start, Tok::Ident(name)));
                continue;
            }
            other => {
                return Err((
                    start,
                    format!("unexpected character '{other}'; expected a name, a 'string', (, ), !, &&, ||, == or !="),
                ))
            }
        };
        i += 1;
        tokens.push((start, token));
    }
    Ok(tokens)
}

struct CondParser {
    tokens: Vec<(usize, Tok)>,
    next: usize,
    end: usize,
}

type CondResult<T> = Result<T, (usize, String)>;

impl CondParser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.next).map(|(_, tok)| tok)
    }

    fn here(&self) -> usize {
        self.tokens.get(self.next).map_or(self.end, |(at, _)| *at)
    }

    fn parse_or(&mut self, depth: usize) -> CondResult<Condition> {
        let mut items = vec![self.parse_and(depth)?];
        while self.peek() == Some(&Tok::Or) {
            self.next += 1;
            items.push(self.parse_and(depth)?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Condition::Or(items)
        })
    }

    fn parse_and(&mut self, depth: usize) -> CondResult<Condition> {
        let mut items = vec![self.parse_unary(depth)?];
        while self.peek() == Some(&Tok::And) {
            self.next += 1;
            items.push(self.parse_unary(depth)?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Condition::And(items)
        })
    }

    fn parse_unary(&mut self, depth: usize) -> CondResult<Condition> {
        if depth > MAX_CONDITION_DEPTH {
            return Err((
                self.here(),
                format!("condition nests deeper than {MAX_CONDITION_DEPTH} levels"),
            ));
        }
        match self.peek() {
            Some(Tok::Not) => {
                self.next += 1;
                Ok(Condition::Not(Box::new(self.parse_unary(depth + 1)?)))
            }
            Some(Tok::LParen) => {
                self.next += 1;
                let inner = self.parse_or(depth + 1)?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err((self.here(), "expected \")\"".to_owned()));
                }
                self.next += 1;
                Ok(inner)
            }
            _ => self.parse_comparison(),
        }
    }

    fn parse_comparison(&mut self) -> CondResult<Condition> {
        let at = self.here();
        let left = self.parse_primary()?;
        let op = match self.peek() {
            Some(Tok::Eq) => CompareOp::Eq,
            Some(Tok::Ne) => CompareOp::Ne,
            _ => {
                return match left {
                    Primary::Status(condition) => Ok(condition),
                    Primary::Operand(Operand::Bool(value)) => Ok(Condition::Literal(value)),
                    Primary::Operand(_) => Err((
                        at,
                        "a value alone is not a condition; compare it with == or !=".to_owned(),
                    )),
                }
            }
        };
        self.next += 1;
        let right_at = self.here();
        let right = self.parse_primary()?;
        match (left, right) {
            (Primary::Operand(left), Primary::Operand(right)) => {
                Ok(Condition::Compare { left, op, right })
            }
            (Primary::Status(_), _) => Err((at, "status functions cannot be compared".to_owned())),
            (_, Primary::Status(_)) => {
                Err((right_at, "status functions cannot be compared".to_owned()))
            }
        }
    }

    fn parse_primary(&mut self) -> CondResult<Primary> {
        let at = self.here();
        let Some((_, token)) = self.tokens.get(self.next).cloned() else {
            return Err((
                at,
                "expected a value or a status function, found the end".to_owned(),
            ));
        };
        self.next += 1;
        match token {
            Tok::Str(value) => Ok(Primary::Operand(Operand::Str(value))),
            Tok::Ident(name) => {
                if self.peek() == Some(&Tok::LParen) {
                    self.next += 1;
                    if self.peek() != Some(&Tok::RParen) {
                        return Err((self.here(), format!("expected \")\" after \"{name}(\"")));
                    }
                    self.next += 1;
                    return match name.as_str() {
                        "success" => Ok(Primary::Status(Condition::Success)),
                        "failure" => Ok(Primary::Status(Condition::Failure)),
                        "always" => Ok(Primary::Status(Condition::Always)),
                        "cancelled" => Ok(Primary::Status(Condition::Cancelled)),
                        _ => Err((
                            at,
                            format!("unknown function \"{name}()\"; expected success(), failure(), always() or cancelled()"),
                        )),
                    };
                }
                let operand = match name.as_str() {
                    "true" => Operand::Bool(true),
                    "false" => Operand::Bool(false),
                    "branch" => Operand::Branch,
                    "event" => Operand::Event,
                    _ => operand_of(&name).map_err(|message| (at, message))?,
                };
                Ok(Primary::Operand(operand))
            }
            other => Err((
                at,
                format!(
                    "unexpected {}; expected a value or a status function",
                    other.describe()
                ),
            )),
        }
    }
}

/// The operand a dotted name stands for, or why it cannot be compared.
fn operand_of(name: &str) -> Result<Operand, String> {
    if !name.contains('.') {
        return Err(format!("unknown name \"{name}\"; expected {NAMES}"));
    }
    let reference = parse_reference(name).map_err(|message| {
        let root = name.split('.').next().unwrap_or(name);
        if matches!(
            root,
            "inputs" | "matrix" | "env" | "git" | "event" | "steps" | "needs"
        ) {
            message
        } else if matches!(
            root,
            "github" | "gitea" | "forgejo" | "vars" | "runner" | "job" | "jobs" | "strategy"
        ) {
            unknown_context(name, root, name.split('.').nth(1))
        } else {
            format!("unknown name \"{name}\"; expected {NAMES}")
        }
    })?;
    Ok(match reference {
        Reference::Input(n) => Operand::Input(n),
        Reference::Matrix(n) => Operand::Matrix(n),
        Reference::Env(n) => Operand::Env(n),
        Reference::Git(field) => Operand::Git(field),
        Reference::Event(field) => Operand::EventField(field),
        Reference::StepOutput { step, name } => Operand::StepOutput { step, name },
        Reference::NeedsOutput { job, name } => Operand::NeedsOutput { job, name },
        Reference::Secret(_) => {
            return Err(format!(
                "\"{name}\" cannot be compared: a condition must not depend on a secret's value"
            ))
        }
        Reference::HashFiles | Reference::Label(_) | Reference::SlotPort => {
            return Err(format!("unknown name \"{name}\"; expected {NAMES}"))
        }
    })
}

const NAMES: &str = "branch, event, inputs.NAME, matrix.NAME, env.NAME, git.*, event.*, steps.ID.outputs.NAME, needs.JOB.outputs.NAME, true or false";

enum Primary {
    Status(Condition),
    Operand(Operand),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> StaticContext {
        StaticContext {
            branch: "main".to_owned(),
            event: "push".to_owned(),
            inputs: BTreeMap::from([("target".to_owned(), "arm".to_owned())]),
            env: BTreeMap::from([("MODE".to_owned(), "fast".to_owned())]),
            commit: "abc123".to_owned(),
            git_ref: "refs/heads/main".to_owned(),
            actor: "ana".to_owned(),
            ..StaticContext::default()
        }
    }

    fn fold(text: &str) -> StatusExpr {
        let matrix = BTreeMap::from([("os".to_owned(), "linux".to_owned())]);
        Condition::parse(text).expect(text).fold(&ctx(), &matrix)
    }

    #[test]
    fn folding_table() {
        use StatusExpr::{And, Const, Failure, Not, Or, Success};
        let cases = [
            ("success()", Success),
            ("${{ success() }}", Success),
            ("branch == 'main'", Const(true)),
            ("branch != 'main'", Const(false)),
            ("event == 'push' && inputs.target == 'arm'", Const(true)),
            ("matrix.os == 'mac'", Const(false)),
            ("env.MODE == 'fast'", Const(true)),
            ("inputs.missing == ''", Const(true)),
            ("true", Const(true)),
            ("!false", Const(true)),
            ("success() && branch == 'main'", Success),
            ("success() && branch == 'dev'", Const(false)),
            ("failure() || branch == 'main'", Const(true)),
            ("failure() || branch == 'dev'", Failure),
            ("!success()", Not(Box::new(Success))),
            (
                "success() && (failure() || !cancelled())",
                And(vec![
                    Success,
                    Or(vec![Failure, Not(Box::new(StatusExpr::Cancelled))]),
                ]),
            ),
            ("'it''s' == 'it''s'", Const(true)),
            ("true == 'true'", Const(true)),
        ];
        for (text, want) in cases {
            assert_eq!(fold(text), want, "{text}");
        }
    }

    #[test]
    fn eval_truth_table() {
        // (all_needs_succeeded, any_need_failed, run_cancelled)
        let states = [
            (true, false, false),
            (false, true, false),
            (true, false, true),
            (false, true, true),
        ];
        let table: [(&str, [bool; 4]); 7] = [
            ("success()", [true, false, false, false]),
            ("failure()", [false, true, false, true]),
            ("always()", [true, true, true, true]),
            ("cancelled()", [false, false, true, true]),
            ("!cancelled()", [true, true, false, false]),
            ("success() || failure()", [true, true, false, true]),
            ("always() && branch == 'dev'", [false, false, false, false]),
        ];
        for (text, wants) in table {
            let expr = fold(text);
            for ((ok, failed, cancelled), want) in states.iter().zip(wants) {
                assert_eq!(
                    expr.eval(*ok, *failed, *cancelled),
                    want,
                    "{text} at {ok} {failed} {cancelled}"
                );
            }
        }
    }

    #[test]
    fn syntax_errors_have_offsets() {
        let cases = [
            ("success(", 8, "expected \")\""),
            ("branch = 'main'", 7, "unexpected character '='"),
            ("branch == 'main", 10, "unterminated string"),
            ("branch", 0, "a value alone is not a condition"),
            ("foo == 'x'", 0, "unknown name \"foo\""),
            ("done()", 0, "unknown function"),
            ("success() &&", 12, "found the end"),
            ("(success()", 10, "expected \")\""),
            ("success() success()", 10, "unexpected"),
            ("success() == 'x'", 0, "cannot be compared"),
        ];
        for (text, at, needle) in cases {
            let (offset, message) = Condition::parse(text).expect_err(text);
            assert_eq!(offset, at, "{text}: {message}");
            assert!(message.contains(needle), "{text}: {message}");
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = "(".repeat(100) + "true" + &")".repeat(100);
        let (_, message) = Condition::parse(&text).expect_err("too deep");
        assert!(message.contains("deeper"), "{message}");
        let text = "!".repeat(1000) + "true";
        assert!(Condition::parse(&text).is_err());
    }
}
