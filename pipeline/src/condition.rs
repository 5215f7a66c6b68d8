//! `if:` conditions: parsing, static folding and evaluation against run status.
//!
//! A condition mixes facts known when a run is planned (branch, event, inputs, matrix,
//! env) with facts known only when the job's needs finish (`success()` and friends).
//! `Condition::fold` replaces the first kind by constants, leaving a `StatusExpr` the
//! scheduler evaluates without any context.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    Branch,
    Event,
    Input(String),
    Matrix(String),
    Env(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Eq,
    Ne,
}

/// What is known about a run when it is planned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticContext {
    /// Branch name without `refs/heads/` (empty for tags and manual runs without one).
    pub branch: String,
    /// `push`, `schedule` or `manual`.
    pub event: String,
    pub inputs: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

/// A condition with every static comparison folded to a constant: what the scheduler
/// evaluates. (One definition for both crates: the pipeline crate produces it, the
/// scheduler consumes it.)
///
/// The facts it is evaluated against, for a job whose ancestors (transitive needs) are
/// all terminal:
/// - `all_ancestors_succeeded`: every ancestor is `Succeeded`, or `Failed` with
///   `continue_on_error`. A `Skipped` or `Cancelled` ancestor makes this false, so a
///   default `success()` job below a skipped job is skipped too (as in GitHub Actions).
/// - `any_ancestor_failed`: some ancestor is `Failed` without `continue_on_error`.
///   Skipped and cancelled ancestors are not failures.
/// - `run_cancelled`: the run received `CancelRun`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StatusExpr {
    /// A comparison the pipeline crate already folded.
    Const(bool),
    /// `success()`: all ancestors succeeded and the run is not cancelled. The default
    /// condition of a job without `if:`.
    #[default]
    Success,
    /// `failure()`: some ancestor failed.
    Failure,
    /// `always()`: true, even in a cancelled run.
    Always,
    /// `cancelled()`: the run was cancelled.
    Cancelled,
    Not(Box<StatusExpr>),
    And(Vec<StatusExpr>),
    Or(Vec<StatusExpr>),
}

impl StatusExpr {
    /// Evaluates the condition. An empty `And` is true and an empty `Or` is false.
    pub fn eval(
        &self,
        all_ancestors_succeeded: bool,
        any_ancestor_failed: bool,
        run_cancelled: bool,
    ) -> bool {
        let eval = |e: &Self| e.eval(all_ancestors_succeeded, any_ancestor_failed, run_cancelled);
        match self {
            Self::Const(value) => *value,
            Self::Success => all_ancestors_succeeded && !run_cancelled,
            Self::Failure => any_ancestor_failed,
            Self::Always => true,
            Self::Cancelled => run_cancelled,
            Self::Not(inner) => !eval(inner),
            Self::And(all) => all.iter().all(eval),
            Self::Or(any) => any.iter().any(eval),
        }
    }

    /// Whether `always()` or `cancelled()` appears anywhere in the expression. A pending
    /// job whose condition mentions either survives `CancelRun` and is evaluated (with
    /// `run_cancelled = true`) once its ancestors finish; every other pending job is
    /// cancelled at once.
    pub fn mentions_cancellation(&self) -> bool {
        match self {
            Self::Always | Self::Cancelled => true,
            Self::Const(_) | Self::Success | Self::Failure => false,
            Self::Not(inner) => inner.mentions_cancellation(),
            Self::And(list) | Self::Or(list) => list.iter().any(Self::mentions_cancellation),
        }
    }
}

impl Condition {
    /// Folds branch, event, inputs, env and matrix comparisons into constants. Unknown
    /// inputs, env and matrix names compare as the empty string.
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
                let equal = operand_value(left, ctx, matrix) == operand_value(right, ctx, matrix);
                StatusExpr::Const(equal == (*op == CompareOp::Eq))
            }
        }
    }

    /// Every `matrix.NAME` the condition compares, to check them against the matrix.
    pub fn matrix_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.collect_matrix_names(&mut names);
        names
    }

    fn collect_matrix_names<'a>(&'a self, names: &mut Vec<&'a str>) {
        match self {
            Condition::Not(inner) => inner.collect_matrix_names(names),
            Condition::And(items) | Condition::Or(items) => {
                for item in items {
                    item.collect_matrix_names(names);
                }
            }
            Condition::Compare { left, right, .. } => {
                for operand in [left, right] {
                    if let Operand::Matrix(name) = operand {
                        names.push(name);
                    }
                }
            }
            _ => {}
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
) -> String {
    let lookup =
        |map: &BTreeMap<String, String>, name: &str| map.get(name).cloned().unwrap_or_default();
    match operand {
        Operand::Str(value) => value.clone(),
        Operand::Bool(value) => value.to_string(),
        Operand::Branch => ctx.branch.clone(),
        Operand::Event => ctx.event.clone(),
        Operand::Input(name) => lookup(&ctx.inputs, name),
        Operand::Matrix(name) => lookup(matrix, name),
        Operand::Env(name) => lookup(&ctx.env, name),
    }
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
                    if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
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
                    _ => {
                        let (scope, rest) = name.split_once('.').unwrap_or((name.as_str(), ""));
                        if rest.is_empty() || rest.contains('.') {
                            return Err((at, unknown_name(&name)));
                        }
                        match scope {
                            "inputs" => Operand::Input(rest.to_owned()),
                            "matrix" => Operand::Matrix(rest.to_owned()),
                            "env" => Operand::Env(rest.to_owned()),
                            _ => return Err((at, unknown_name(&name))),
                        }
                    }
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

fn unknown_name(name: &str) -> String {
    format!("unknown name \"{name}\"; expected branch, event, inputs.NAME, matrix.NAME, env.NAME, true or false")
}

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
