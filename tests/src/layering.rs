//! The layering check: a crate's modules sit in declared layers, and imports only go down.
//!
//! A crate opts in with a `layers.toml` beside its `Cargo.toml`:
//!
//! ```toml
//! # Bottom first. A module is written as in code (`store`, `services::runs`); an entry
//! # names a file's module or a folder prefix (`store` holds `store::runs` too). The crate
//! # root (`lib.rs`) is `crate`, the binary's `main.rs` is `main`.
//! [[layers]]
//! name = "pure"
//! modules = ["crate", "backoff", "labels"]
//!
//! [[layers]]
//! name = "session"
//! modules = ["session", "main"]
//!
//! # Known upward imports still to fix; the goal is none.
//! [[exceptions]]
//! from = "labels"
//! to = "session"
//! owner = "someone"
//! reason = "why it is still there and what removes it"
//! ```
//!
//! [`check_crate`] reads every `.rs` file under `src/`, maps it to its module by its path
//! (`src/a/b.rs` and `src/a/b/mod.rs` are `a::b`), and collects what it takes from its
//! own crate: `use crate::...` (grouped trees included), `use super::...` and
//! `use self::...` resolved to absolute paths, paths through a child module
//! (`use child::X`, `child::f()`), and paths inline in code (`crate::a::f()`,
//! `$crate::...` in macros, `<crate_name>::...` in `main.rs`). Comments, doc comments
//! and string literals never count. An import names the file whose module is the longest
//! prefix of the path (`crate::a::B` is `a.rs`; an item of an inline module is in the
//! file that holds it).
//!
//! It fails on:
//! - an import from a higher layer (unless an exception names it);
//! - a cycle of imports between files of one layer (every file of the cycle is named);
//! - a file that maps to no declared layer, so a new module must be declared;
//! - a declared module, or an exception, that no longer matches anything.
//!
//! Test code (`#[cfg(test)]` items, and files declared with `#[cfg(test)] mod x;`) is
//! held to the same direction rule as the file it is in: a lower module whose tests need
//! a higher one cannot be tested on its own. Two things differ for test code: it may
//! import a test-only file from anywhere (shared fixtures sit where they like), and its
//! imports do not make cycles (a test may use a sibling's helpers; the product code's
//! graph is what must stay acyclic).
//!
//! The check is a small lexer and a use-tree parser, not a compiler: `#[path]`
//! attributes, `include!` and macro-generated paths are not followed, and a path into a
//! child module is only recognised where the child module exists as a file or an
//! inline `mod` of the same file. It needs nothing beyond `toml`, `serde` and `thiserror`,
//! all already built for the workspace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What can stop the check before it judges anything: an unreadable tree or a
/// malformed declaration. Violations of the layering are in [`Report::violations`].
#[derive(Debug, thiserror::Error)]
pub enum LayeringError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source} (the format is described at the top of tests/src/layering.rs)")]
    Toml {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {problem}")]
    Declaration { path: PathBuf, problem: String },
    #[error("{path}:{line}: {problem} (the layering check cannot read this file)")]
    Lex {
        path: PathBuf,
        line: usize,
        problem: &'static str,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayersFile {
    layers: Vec<LayerDecl>,
    #[serde(default)]
    exceptions: Vec<Exception>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerDecl {
    name: String,
    modules: Vec<String>,
}

/// One known upward import (or same-layer cycle edge) tolerated until its owner removes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exception {
    pub from: String,
    pub to: String,
    pub owner: String,
    #[serde(alias = "why")]
    pub reason: String,
}

/// The outcome of checking one crate.
#[derive(Debug)]
pub struct Report {
    /// The crate's folder, as given.
    pub crate_dir: PathBuf,
    /// Layer names bottom first, each with the number of files it holds.
    pub layers: Vec<(String, usize)>,
    /// `.rs` files read.
    pub files: usize,
    /// Imports between files of the crate that were checked.
    pub imports: usize,
    /// Exceptions still declared (the goal is none).
    pub exceptions: Vec<Exception>,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|(name, files)| format!("{name} ({files})"))
            .collect();
        writeln!(
            f,
            "{}: {} files, {} imports within the crate, layers bottom first: {}; {} exception(s) remain",
            self.crate_dir.display(),
            self.files,
            self.imports,
            layers.join(", "),
            self.exceptions.len()
        )?;
        for exception in &self.exceptions {
            writeln!(
                f,
                "  exception: {} -> {} (owner {}): {}",
                exception.from, exception.to, exception.owner, exception.reason
            )?;
        }
        for violation in &self.violations {
            writeln!(f, "  {violation}")?;
        }
        Ok(())
    }
}

/// One place where the code and the declared layers disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A file imports a module of a higher layer.
    Upward {
        file: PathBuf,
        line: usize,
        path: String,
        from_module: String,
        from_layer: String,
        to_module: String,
        to_layer: String,
    },
    /// Files of one layer import each other in a circle; `steps` walks it once.
    Cycle {
        layer: String,
        files: Vec<PathBuf>,
        steps: Vec<CycleStep>,
    },
    /// A file whose module no layer declares.
    Undeclared { file: PathBuf, module: String },
    /// A declared module that matches no file.
    Missing { layer: String, module: String },
    /// A module declared in two layers.
    Twice { module: String, layers: [String; 2] },
    /// An exception that no import needs any more.
    StaleException { from: String, to: String },
}

/// One import on a cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleStep {
    pub file: PathBuf,
    pub line: usize,
    pub from_module: String,
    pub to_module: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Upward {
                file,
                line,
                path,
                from_module,
                from_layer,
                to_module,
                to_layer,
            } => write!(
                f,
                "upward import at {}:{line}: `{from_module}` (layer `{from_layer}`) imports `{path}` from `{to_module}` (layer `{to_layer}`, higher); move the code down, or pass it in (a trait, a value), or add an exception with an owner and a reason",
                file.display()
            ),
            Violation::Cycle {
                layer,
                files,
                steps,
            } => {
                let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
                let steps: Vec<String> = steps
                    .iter()
                    .map(|s| {
                        format!(
                            "{}:{} (`{}`) imports `{}`",
                            s.file.display(),
                            s.line,
                            s.from_module,
                            s.to_module
                        )
                    })
                    .collect();
                write!(
                    f,
                    "import cycle in layer `{layer}` between {} files: {}; one way round: {}",
                    files.len(),
                    files.join(", "),
                    steps.join(" -> ")
                )
            }
            Violation::Undeclared { file, module } => write!(
                f,
                "{} (module `{module}`) is in no layer: declare `{module}` (or a folder holding it) in layers.toml",
                file.display()
            ),
            Violation::Missing { layer, module } => write!(
                f,
                "layer `{layer}` declares `{module}`, which matches no file under src/: remove it from layers.toml or fix its path"
            ),
            Violation::Twice { module, layers } => write!(
                f,
                "`{module}` is declared in two layers, `{}` and `{}`: keep one",
                layers[0], layers[1]
            ),
            Violation::StaleException { from, to } => write!(
                f,
                "exception `{from} -> {to}` matches no import any more: remove it from layers.toml"
            ),
        }
    }
}

/// The crates under `workspace` (one folder deep) that declare a `layers.toml`, sorted.
pub fn crates_with_layers(workspace: &Path) -> Result<Vec<PathBuf>, LayeringError> {
    let read = |source| LayeringError::Read {
        path: workspace.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(workspace).map_err(read)? {
        let dir = entry.map_err(read)?.path();
        if dir.join("layers.toml").is_file() && dir.join("src").is_dir() {
            found.push(dir);
        }
    }
    found.sort();
    Ok(found)
}

/// Checks the crate in `crate_dir` (holding `layers.toml`, `src/` and usually
/// `Cargo.toml`) against its declared layers.
pub fn check_crate(crate_dir: &Path) -> Result<Report, LayeringError> {
    let layers_path = crate_dir.join("layers.toml");
    let text = read_to_string(&layers_path)?;
    let declared: LayersFile = toml::from_str(&text).map_err(|e| LayeringError::Toml {
        path: layers_path.clone(),
        source: Box::new(e),
    })?;
    let declaration = |problem: String| LayeringError::Declaration {
        path: layers_path.clone(),
        problem,
    };
    if declared.layers.is_empty() {
        return Err(declaration("no `[[layers]]` declared".into()));
    }
    let mut names = BTreeSet::new();
    for layer in &declared.layers {
        if !names.insert(layer.name.as_str()) {
            return Err(declaration(format!(
                "layer `{}` is declared twice",
                layer.name
            )));
        }
        for module in &layer.modules {
            if !is_module_path(module) {
                return Err(declaration(format!(
                    "layer `{}`: `{module}` is not a module path (write it as in code: `store`, `services::runs`, `crate`, `main`)",
                    layer.name
                )));
            }
        }
    }
    for exception in &declared.exceptions {
        if !is_module_path(&exception.from) || !is_module_path(&exception.to) {
            return Err(declaration(format!(
                "exception `{} -> {}`: both ends must be module paths",
                exception.from, exception.to
            )));
        }
    }

    let crate_name = crate_name(crate_dir)?;
    let src = crate_dir.join("src");
    let mut paths = Vec::new();
    walk_rs(&src, &mut paths)?;
    paths.sort();

    let mut files = Vec::new();
    for path in &paths {
        let relative = path.strip_prefix(&src).unwrap_or(path);
        let (id, module_path) = module_of(relative);
        let text = read_to_string(path)?;
        let tokens = lex(&text).map_err(|(line, problem)| LayeringError::Lex {
            path: path.clone(),
            line,
            problem,
        })?;
        let scan = scan(&tokens, &module_path);
        files.push(SourceFile {
            shown: crate_dir
                .file_name()
                .map_or_else(|| relative.to_path_buf(), |c| Path::new(c).join("src"))
                .join(relative),
            id,
            module_path,
            scan,
        });
    }

    Ok(judge(crate_dir, &declared, crate_name.as_deref(), &files))
}

fn read_to_string(path: &Path) -> Result<String, LayeringError> {
    std::fs::read_to_string(path).map_err(|source| LayeringError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn is_module_path(s: &str) -> bool {
    !s.is_empty()
        && s.split("::")
            .all(|seg| !seg.is_empty() && seg.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// The library's name as code outside it writes it (`gantry-agent` is `gantry_agent`).
fn crate_name(crate_dir: &Path) -> Result<Option<String>, LayeringError> {
    let manifest = crate_dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Ok(None);
    }
    let text = read_to_string(&manifest)?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| LayeringError::Toml {
        path: manifest.clone(),
        source: Box::new(e),
    })?;
    let lib_name = value
        .get("lib")
        .and_then(|lib| lib.get("name"))
        .and_then(toml::Value::as_str);
    let package_name = value
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(toml::Value::as_str);
    Ok(lib_name.or(package_name).map(|n| n.replace('-', "_")))
}

fn walk_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LayeringError> {
    let read = |source| LayeringError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        let path = entry.path();
        let kind = entry.file_type().map_err(read)?;
        if kind.is_dir() {
            walk_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// A file's name in `layers.toml` and its module path in code. Crate roots (`lib.rs`,
/// `main.rs`, `bin/*.rs`) have the empty path: `crate::x` in them means `x`.
fn module_of(relative: &Path) -> (String, Vec<String>) {
    let mut segments: Vec<String> = relative
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = segments.last_mut() {
        if let Some(stem) = last.strip_suffix(".rs") {
            *last = stem.to_owned();
        }
    }
    match segments.as_slice() {
        [only] if only == "lib" => return ("crate".into(), Vec::new()),
        [only] if only == "main" => return ("main".into(), Vec::new()),
        [first, _] if first == "bin" => return (segments.join("::"), Vec::new()),
        _ => {}
    }
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    (segments.join("::"), segments)
}

struct SourceFile {
    /// Shown in messages: `<crate folder>/src/<relative path>`.
    shown: PathBuf,
    /// The name `layers.toml` uses.
    id: String,
    module_path: Vec<String>,
    scan: Scan,
}

// ---------------------------------------------------------------------------------------
// Lexing: identifiers, `::` and single punctuation; comments and literals are dropped
// (a placeholder stands for a literal so that no path is glued across it).

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
    Literal,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

impl Token {
    fn literal(line: usize) -> Self {
        Token {
            tok: Tok::Literal,
            line,
        }
    }
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Splits Rust source into tokens. Errors carry a line and what was left open.
#[allow(clippy::too_many_lines)]
fn lex(src: &str) -> Result<Vec<Token>, (usize, &'static str)> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied();
    while let Some(c) = at(i) {
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == Some('/') {
            while at(i).is_some_and(|c| c != '\n') {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == Some('*') {
            let start = line;
            let mut depth = 0usize;
            loop {
                match (at(i), at(i + 1)) {
                    (Some('/'), Some('*')) => {
                        depth += 1;
                        i += 2;
                    }
                    (Some('*'), Some('/')) => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    }
                    (Some(c), _) => {
                        if c == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    (None, _) => return Err((start, "unterminated block comment")),
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1, &mut line)?;
            tokens.push(Token::literal(line));
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime / label ('a, 'static).
            if at(i + 1) == Some('\\') {
                // Past the quote, the backslash and the escaped character.
                i += 3;
                while at(i).is_some_and(|c| c != '\'') {
                    i += 1;
                }
                if at(i).is_none() {
                    return Err((line, "unterminated character literal"));
                }
                i += 1;
                tokens.push(Token::literal(line));
            } else if at(i + 2) == Some('\'') {
                if at(i + 1) == Some('\n') {
                    line += 1;
                }
                i += 3;
                tokens.push(Token::literal(line));
            } else {
                i += 1;
                while at(i).is_some_and(is_ident_continue) {
                    i += 1;
                }
                tokens.push(Token::literal(line));
            }
        } else if is_ident_start(c) {
            let start = i;
            while at(i).is_some_and(is_ident_continue) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = at(i);
            let raw_string_follows =
                next == Some('"') || (next == Some('#') && matches!(at(i + 1), Some('"' | '#')));
            match word.as_str() {
                "r" | "br" | "cr" if raw_string_follows => {
                    i = skip_raw_string(&chars, i, &mut line)?;
                    tokens.push(Token::literal(line));
                }
                "b" | "c" if next == Some('"') => {
                    i = skip_string(&chars, i + 1, &mut line)?;
                    tokens.push(Token::literal(line));
                }
                "b" if next == Some('\'') => {
                    i += 1;
                    if at(i) == Some('\\') {
                        i += 2;
                    } else {
                        i += 1;
                    }
                    while at(i).is_some_and(|c| c != '\'') {
                        i += 1;
                    }
                    if at(i).is_none() {
                        return Err((line, "unterminated byte literal"));
                    }
                    i += 1;
                    tokens.push(Token::literal(line));
                }
                "r" if next == Some('#') && at(i + 1).is_some_and(is_ident_start) => {
                    // A raw identifier: r#type is the identifier `type`.
                    let start = i + 1;
                    i += 1;
                    while at(i).is_some_and(is_ident_continue) {
                        i += 1;
                    }
                    tokens.push(Token {
                        tok: Tok::Ident(chars[start..i].iter().collect()),
                        line,
                    });
                }
                _ => tokens.push(Token {
                    tok: Tok::Ident(word),
                    line,
                }),
            }
        } else if c.is_ascii_digit() {
            while let Some(c) = at(i) {
                let fraction = c == '.'
                    && at(i + 1).is_some_and(|d| d.is_ascii_digit())
                    && !matches!(
                        tokens.last(),
                        Some(Token {
                            tok: Tok::Punct('.'),
                            ..
                        })
                    );
                if is_ident_continue(c) || fraction {
                    i += 1;
                } else {
                    break;
                }
            }
            tokens.push(Token::literal(line));
        } else if c == ':' && at(i + 1) == Some(':') {
            i += 2;
            tokens.push(Token {
                tok: Tok::PathSep,
                line,
            });
        } else {
            i += 1;
            tokens.push(Token {
                tok: Tok::Punct(c),
                line,
            });
        }
    }
    Ok(tokens)
}

/// Skips a string body starting after its opening quote; returns the index after the
/// closing quote.
fn skip_string(
    chars: &[char],
    mut i: usize,
    line: &mut usize,
) -> Result<usize, (usize, &'static str)> {
    let start = *line;
    loop {
        match chars.get(i) {
            Some('\\') => {
                if chars.get(i + 1) == Some(&'\n') {
                    *line += 1;
                }
                i += 2;
            }
            Some('"') => return Ok(i + 1),
            Some('\n') => {
                *line += 1;
                i += 1;
            }
            Some(_) => i += 1,
            None => return Err((start, "unterminated string literal")),
        }
    }
}

/// Skips a raw string from just after its prefix (`r`, `br`, `cr`): hashes, quote, body,
/// quote, the same number of hashes.
fn skip_raw_string(
    chars: &[char],
    mut i: usize,
    line: &mut usize,
) -> Result<usize, (usize, &'static str)> {
    let start = *line;
    let mut hashes = 0;
    while chars.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if chars.get(i) != Some(&'"') {
        return Err((start, "malformed raw string literal"));
    }
    i += 1;
    loop {
        match chars.get(i) {
            Some('"') if (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) => {
                return Ok(i + 1 + hashes);
            }
            Some('\n') => {
                *line += 1;
                i += 1;
            }
            Some(_) => i += 1,
            None => return Err((start, "unterminated raw string literal")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scanning: the paths a file names, with the module they are written in and whether
// they are test code; the `mod` items it declares.

/// A path as written, before it is resolved against the crate's files.
#[derive(Debug, Clone)]
struct RawPath {
    line: usize,
    /// The module the path is written in (the file's path plus inline modules).
    scope: Vec<String>,
    segments: Vec<String>,
    test: bool,
}

/// One path of a `use` tree, and the name it binds (none for a glob or `as _`).
struct UseLeaf {
    line: usize,
    segments: Vec<String>,
    binding: Option<String>,
}

/// A name a `use` binds in a module (`use services::deployments;` in `lib.rs` makes
/// `crate::deployments` a path to `services::deployments`).
#[derive(Debug, Clone)]
struct Alias {
    scope: Vec<String>,
    name: String,
    segments: Vec<String>,
}

#[derive(Debug, Default)]
struct Scan {
    paths: Vec<RawPath>,
    /// Names bound by `use` items.
    aliases: Vec<Alias>,
    /// Inline modules (`mod x { }`) by their full module path.
    inline_modules: BTreeSet<Vec<String>>,
    /// Child modules declared with `mod x;` under `#[cfg(test)]`, by full module path.
    test_only_children: BTreeSet<Vec<String>>,
    /// `#![cfg(test)]` at the top of the file.
    whole_file_test: bool,
}

struct Scope {
    module: Option<String>,
    test: bool,
}

struct Scanner<'t> {
    tokens: &'t [Token],
    at: usize,
    file_module: Vec<String>,
    scopes: Vec<Scope>,
    pending_test: bool,
    scan: Scan,
}

fn scan(tokens: &[Token], file_module: &[String]) -> Scan {
    let mut scanner = Scanner {
        tokens,
        at: 0,
        file_module: file_module.to_vec(),
        scopes: Vec::new(),
        pending_test: false,
        scan: Scan::default(),
    };
    scanner.run();
    scanner.scan
}

impl Scanner<'_> {
    fn tok(&self, i: usize) -> Option<&Tok> {
        self.tokens.get(i).map(|t| &t.tok)
    }

    fn ident(&self, i: usize) -> Option<&str> {
        match self.tok(i) {
            Some(Tok::Ident(s)) => Some(s),
            _ => None,
        }
    }

    fn line(&self, i: usize) -> usize {
        self.tokens.get(i).map_or(0, |t| t.line)
    }

    fn module(&self) -> Vec<String> {
        let mut path = self.file_module.clone();
        path.extend(self.scopes.iter().filter_map(|s| s.module.clone()));
        path
    }

    fn in_test(&self) -> bool {
        self.pending_test || self.scan.whole_file_test || self.scopes.iter().any(|s| s.test)
    }

    fn run(&mut self) {
        let tokens = self.tokens;
        while self.at < tokens.len() {
            let i = self.at;
            match tokens.get(i).map(|t| &t.tok) {
                Some(Tok::Punct('#')) => self.attribute(),
                Some(Tok::Punct('{')) => {
                    self.scopes.push(Scope {
                        module: None,
                        test: self.pending_test,
                    });
                    self.pending_test = false;
                    self.at += 1;
                }
                Some(Tok::Punct('}')) => {
                    self.scopes.pop();
                    self.pending_test = false;
                    self.at += 1;
                }
                Some(Tok::Punct(';')) => {
                    self.pending_test = false;
                    self.at += 1;
                }
                Some(Tok::Ident(word)) if word == "mod" && self.ident(i + 1).is_some() => {
                    self.module_item();
                }
                Some(Tok::Ident(word))
                    if word == "use" && self.tok(i.wrapping_sub(1)) != Some(&Tok::PathSep) =>
                {
                    self.use_item();
                }
                Some(Tok::Ident(_)) if self.tok(i + 1) == Some(&Tok::PathSep) => {
                    self.inline_path();
                }
                _ => self.at += 1,
            }
        }
    }

    /// `#[...]` or `#![...]`: notes `cfg(test)`, skips the rest.
    fn attribute(&mut self) {
        let mut i = self.at + 1;
        let inner = self.tok(i) == Some(&Tok::Punct('!'));
        if inner {
            i += 1;
        }
        if self.tok(i) != Some(&Tok::Punct('[')) {
            self.at += 1;
            return;
        }
        let start = i + 1;
        let mut depth = 0usize;
        while let Some(tok) = self.tok(i) {
            match tok {
                Tok::Punct('[') => depth += 1,
                Tok::Punct(']') => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        let body = &self.tokens[start..i.min(self.tokens.len())];
        let is_cfg = matches!(body.first(), Some(Token { tok: Tok::Ident(w), .. }) if w == "cfg");
        let names_test = body.iter().any(|t| t.tok == Tok::Ident("test".into()));
        let negated = body.iter().any(|t| t.tok == Tok::Ident("not".into()));
        if is_cfg && names_test && !negated {
            if !inner {
                self.pending_test = true;
            } else if let Some(scope) = self.scopes.last_mut() {
                scope.test = true;
            } else {
                self.scan.whole_file_test = true;
            }
        }
        self.at = i + 1;
    }

    /// `mod name;` or `mod name { ... }`.
    fn module_item(&mut self) {
        let name = self.ident(self.at + 1).unwrap_or_default().to_owned();
        let mut path = self.module();
        path.push(name.clone());
        match self.tok(self.at + 2) {
            Some(Tok::Punct(';')) => {
                if self.in_test() {
                    self.scan.test_only_children.insert(path);
                }
                self.pending_test = false;
                self.at += 3;
            }
            Some(Tok::Punct('{')) => {
                self.scan.inline_modules.insert(path);
                let test = self.in_test();
                self.scopes.push(Scope {
                    module: Some(name),
                    test,
                });
                self.pending_test = false;
                self.at += 3;
            }
            _ => self.at += 1,
        }
    }

    /// `use tree;`: every leaf of the tree becomes a path.
    fn use_item(&mut self) {
        self.at += 1;
        if self.tok(self.at) == Some(&Tok::PathSep) {
            // `use ::name` is always another crate.
            while self.at < self.tokens.len() && self.tok(self.at) != Some(&Tok::Punct(';')) {
                self.at += 1;
            }
            return;
        }
        let mut leaves = Vec::new();
        self.use_tree(&mut Vec::new(), &mut leaves);
        let scope = self.module();
        let test = self.in_test();
        for UseLeaf {
            line,
            segments,
            binding,
        } in leaves
        {
            if let Some(name) = binding {
                self.scan.aliases.push(Alias {
                    scope: scope.clone(),
                    name,
                    segments: segments.clone(),
                });
            }
            self.scan.paths.push(RawPath {
                line,
                scope: scope.clone(),
                segments,
                test,
            });
        }
        // Leave the `;` to `run`, which ends a pending attribute there.
    }

    /// Parses one use tree at `self.at` under `prefix`, pushing one leaf per path.
    fn use_tree(&mut self, prefix: &mut Vec<String>, leaves: &mut Vec<UseLeaf>) {
        let depth = prefix.len();
        let mut line = self.line(self.at);
        loop {
            match self.tok(self.at).cloned() {
                Some(Tok::Ident(word)) => {
                    line = self.line(self.at);
                    self.at += 1;
                    if word == "self" && !prefix.is_empty() {
                        // `a::{self}` names `a` itself.
                    } else {
                        prefix.push(word);
                    }
                    if self.tok(self.at) == Some(&Tok::PathSep) {
                        self.at += 1;
                        continue;
                    }
                    let mut binding = prefix.last().cloned();
                    if self.ident(self.at) == Some("as") {
                        binding = self
                            .ident(self.at + 1)
                            .filter(|name| *name != "_")
                            .map(str::to_owned);
                        self.at += 2;
                    }
                    leaves.push(UseLeaf {
                        line,
                        segments: prefix.clone(),
                        binding,
                    });
                    break;
                }
                Some(Tok::Punct('*')) => {
                    self.at += 1;
                    leaves.push(UseLeaf {
                        line,
                        segments: prefix.clone(),
                        binding: None,
                    });
                    break;
                }
                Some(Tok::Punct('{')) => {
                    self.at += 1;
                    loop {
                        match self.tok(self.at) {
                            Some(Tok::Punct('}')) => {
                                self.at += 1;
                                break;
                            }
                            Some(Tok::Punct(',')) => self.at += 1,
                            Some(Tok::Punct(';')) | None => break,
                            Some(_) => {
                                let before = self.at;
                                self.use_tree(prefix, leaves);
                                if self.at == before {
                                    self.at += 1;
                                }
                            }
                        }
                    }
                    break;
                }
                _ => break,
            }
        }
        prefix.truncate(depth);
    }

    /// `a::b::c` in code, starting at an identifier followed by `::`.
    fn inline_path(&mut self) {
        let start = self.at;
        let previous = self.tok(start.wrapping_sub(1));
        // The middle of a longer path (`x::crate` cannot happen; `Foo::bar::baz` is read
        // from `Foo`), a field or method (`.x::<T>`), or `pub(in crate::a)`: not a path
        // that starts here.
        let mid_path = matches!(previous, Some(Tok::PathSep | Tok::Punct('.')));
        let visibility = self.ident(start.wrapping_sub(1)) == Some("in")
            && self.tok(start.wrapping_sub(2)) == Some(&Tok::Punct('('));
        let mut segments = Vec::new();
        let mut i = start;
        while let Some(word) = self.ident(i) {
            segments.push(word.to_owned());
            if self.tok(i + 1) == Some(&Tok::PathSep) && self.ident(i + 2).is_some() {
                i += 2;
            } else {
                break;
            }
        }
        self.at = i + 1;
        if mid_path || visibility {
            return;
        }
        let line = self.line(start);
        let scope = self.module();
        let test = self.in_test();
        self.scan.paths.push(RawPath {
            line,
            scope,
            segments,
            test,
        });
    }
}

// ---------------------------------------------------------------------------------------
// Judging: resolve paths to files, files to layers, then the rules.

/// One import between two files of the crate.
#[derive(Debug, Clone)]
struct Import {
    from: usize,
    to: usize,
    line: usize,
    path: String,
    test: bool,
}

#[allow(clippy::too_many_lines)]
fn judge(
    crate_dir: &Path,
    declared: &LayersFile,
    crate_name: Option<&str>,
    files: &[SourceFile],
) -> Report {
    let mut violations = Vec::new();

    // Known module paths: every file's, and every inline module's.
    let mut file_of_path: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for (index, file) in files.iter().enumerate() {
        // Of several crate roots, `crate::` means the library's.
        let keep_existing = file.module_path.is_empty()
            && file_of_path
                .get(&file.module_path)
                .is_some_and(|&other| files[other].id == "crate");
        if !keep_existing {
            file_of_path.insert(file.module_path.clone(), index);
        }
    }
    let mut known: BTreeSet<Vec<String>> = file_of_path.keys().cloned().collect();
    for file in files {
        known.extend(file.scan.inline_modules.iter().cloned());
    }

    // Names bound by `use` in one module and used through it from another
    // (`crate::deployments::X` where lib.rs has `use services::deployments;`) stand for
    // what they name.
    let mut alias_of: BTreeMap<Vec<String>, (usize, Vec<String>)> = BTreeMap::new();
    for (index, file) in files.iter().enumerate() {
        for alias in &file.scan.aliases {
            let mut key = alias.scope.clone();
            key.push(alias.name.clone());
            if known.contains(&key) {
                continue;
            }
            let written = RawPath {
                line: 0,
                scope: alias.scope.clone(),
                segments: alias.segments.clone(),
                test: false,
            };
            if let Some(target) = resolve(&written, crate_name, &known) {
                alias_of.insert(key, (index, target));
            }
        }
    }

    // Test-only files: declared by `#[cfg(test)] mod x;`, or `#![cfg(test)]` inside.
    let test_only_paths: BTreeSet<&Vec<String>> = files
        .iter()
        .flat_map(|f| f.scan.test_only_children.iter())
        .collect();
    let test_only: Vec<bool> = files
        .iter()
        .map(|f| {
            f.scan.whole_file_test
                || (!f.module_path.is_empty()
                    && (1..=f.module_path.len())
                        .any(|n| test_only_paths.contains(&f.module_path[..n].to_vec())))
        })
        .collect();

    // Files to layers: the longest declared entry that names the file or a folder above it.
    let mut entry_layer: BTreeMap<&str, usize> = BTreeMap::new();
    for (layer_index, layer) in declared.layers.iter().enumerate() {
        for module in &layer.modules {
            if let Some(&other) = entry_layer.get(module.as_str()) {
                violations.push(Violation::Twice {
                    module: module.clone(),
                    layers: [declared.layers[other].name.clone(), layer.name.clone()],
                });
            } else {
                entry_layer.insert(module, layer_index);
            }
        }
    }
    let mut used_entries = BTreeSet::new();
    let mut layer_of = Vec::with_capacity(files.len());
    for file in files {
        let entry = entry_layer
            .keys()
            .filter(|entry| module_matches(entry, &file.id))
            .max_by_key(|entry| entry.len());
        if let Some(entry) = entry {
            used_entries.insert(*entry);
            layer_of.push(Some(entry_layer[entry]));
        } else {
            violations.push(Violation::Undeclared {
                file: file.shown.clone(),
                module: file.id.clone(),
            });
            layer_of.push(None);
        }
    }
    for layer in &declared.layers {
        for module in &layer.modules {
            if !used_entries.contains(module.as_str()) {
                violations.push(Violation::Missing {
                    layer: layer.name.clone(),
                    module: module.clone(),
                });
            }
        }
    }

    // Paths to imports between files.
    let mut imports = Vec::new();
    for (from, file) in files.iter().enumerate() {
        for raw in &file.scan.paths {
            let Some(absolute) = resolve(raw, crate_name, &known) else {
                continue;
            };
            let absolute = follow_aliases(absolute, from, &alias_of);
            let Some(to) = (0..=absolute.len())
                .rev()
                .find_map(|n| file_of_path.get(&absolute[..n]).copied())
            else {
                continue;
            };
            if to == from {
                continue;
            }
            imports.push(Import {
                from,
                to,
                line: raw.line,
                path: raw.segments.join("::"),
                test: raw.test || test_only[from],
            });
        }
    }

    let excepted = |import: &Import| {
        declared.exceptions.iter().position(|e| {
            module_matches(&e.from, &files[import.from].id)
                && module_matches(&e.to, &files[import.to].id)
        })
    };
    let mut used_exceptions = BTreeSet::new();

    // Upward imports.
    for import in &imports {
        let (Some(from_layer), Some(to_layer)) = (layer_of[import.from], layer_of[import.to])
        else {
            continue;
        };
        if to_layer <= from_layer || (import.test && test_only[import.to]) {
            continue;
        }
        if let Some(e) = excepted(import) {
            used_exceptions.insert(e);
            continue;
        }
        violations.push(Violation::Upward {
            file: files[import.from].shown.clone(),
            line: import.line,
            path: import.path.clone(),
            from_module: files[import.from].id.clone(),
            from_layer: declared.layers[from_layer].name.clone(),
            to_module: files[import.to].id.clone(),
            to_layer: declared.layers[to_layer].name.clone(),
        });
    }

    // Cycles among the product imports of one layer.
    let mut edges: BTreeMap<usize, BTreeMap<usize, &Import>> = BTreeMap::new();
    for import in &imports {
        let same_layer =
            layer_of[import.from].is_some() && layer_of[import.from] == layer_of[import.to];
        if import.test || !same_layer {
            continue;
        }
        if let Some(e) = excepted(import) {
            used_exceptions.insert(e);
            continue;
        }
        edges
            .entry(import.from)
            .or_default()
            .entry(import.to)
            .or_insert(import);
    }
    for component in strongly_connected(files.len(), &edges) {
        if component.len() < 2 {
            continue;
        }
        let layer =
            layer_of[component[0]].map_or_else(String::new, |l| declared.layers[l].name.clone());
        let steps = one_cycle(&component, &edges)
            .into_iter()
            .map(|import| CycleStep {
                file: files[import.from].shown.clone(),
                line: import.line,
                from_module: files[import.from].id.clone(),
                to_module: files[import.to].id.clone(),
            })
            .collect();
        violations.push(Violation::Cycle {
            layer,
            files: component.iter().map(|&f| files[f].shown.clone()).collect(),
            steps,
        });
    }

    for (index, exception) in declared.exceptions.iter().enumerate() {
        if !used_exceptions.contains(&index) {
            violations.push(Violation::StaleException {
                from: exception.from.clone(),
                to: exception.to.clone(),
            });
        }
    }

    let layers = declared
        .layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let count = layer_of.iter().filter(|l| **l == Some(index)).count();
            (layer.name.clone(), count)
        })
        .collect();
    Report {
        crate_dir: crate_dir.to_path_buf(),
        layers,
        files: files.len(),
        imports: imports.len(),
        exceptions: declared.exceptions.clone(),
        violations,
    }
}

/// Replaces a prefix of `path` that is a name another file's `use` binds by what it
/// names, as often as that applies (at most 8 times: `use` chains are short, and a
/// cycle of them must not hang the check). A file's own bindings are not followed: the
/// `use` that binds them is the import.
fn follow_aliases(
    mut path: Vec<String>,
    from: usize,
    alias_of: &BTreeMap<Vec<String>, (usize, Vec<String>)>,
) -> Vec<String> {
    for _ in 0..8 {
        let found = (1..=path.len()).rev().find_map(|n| {
            alias_of
                .get(&path[..n])
                .filter(|(file, _)| *file != from)
                .map(|(_, target)| (n, target))
        });
        let Some((n, target)) = found else {
            break;
        };
        let mut next = target.clone();
        next.extend_from_slice(&path[n..]);
        path = next;
    }
    path
}

/// Whether declared `entry` names module `id` or a folder above it.
fn module_matches(entry: &str, id: &str) -> bool {
    id == entry
        || ((entry != "crate" && entry != "main")
            && id
                .strip_prefix(entry)
                .is_some_and(|rest| rest.starts_with("::")))
}

/// The absolute module path a written path names, if it names something in this crate.
fn resolve(
    raw: &RawPath,
    crate_name: Option<&str>,
    known: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = raw.segments.first()?.as_str();
    let rest = || raw.segments[1..].to_vec();
    if first == "crate" || Some(first) == crate_name {
        return Some(rest());
    }
    if first == "self" {
        let mut path = raw.scope.clone();
        path.extend(rest());
        return Some(path);
    }
    if first == "super" {
        let mut base = raw.scope.clone();
        let mut segments = raw.segments.iter().peekable();
        while segments.next_if(|s| *s == "super").is_some() {
            base.pop()?;
        }
        base.extend(segments.cloned());
        return Some(base);
    }
    // `child::x`: a path through a module declared in the current one (else the name is
    // another crate's, or an item's).
    let mut child = raw.scope.clone();
    child.push(first.to_owned());
    if known.contains(&child) {
        child.extend(rest());
        return Some(child);
    }
    None
}

/// Tarjan's strongly connected components, iteratively (no recursion on deep graphs).
fn strongly_connected(
    nodes: usize,
    edges: &BTreeMap<usize, BTreeMap<usize, &Import>>,
) -> Vec<Vec<usize>> {
    let successors = |n: usize| -> Vec<usize> {
        edges
            .get(&n)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    };
    let mut index = vec![usize::MAX; nodes];
    let mut low = vec![0; nodes];
    let mut on_stack = vec![false; nodes];
    let mut stack = Vec::new();
    let mut next_index = 0;
    let mut components = Vec::new();
    for root in 0..nodes {
        if index[root] != usize::MAX {
            continue;
        }
        // (node, its successors, how many of them were visited)
        let mut work: Vec<(usize, Vec<usize>, usize)> = vec![(root, successors(root), 0)];
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some((node, succ, visited)) = work.last_mut() {
            let node = *node;
            if let Some(&next) = succ.get(*visited) {
                *visited += 1;
                if index[next] == usize::MAX {
                    index[next] = next_index;
                    low[next] = next_index;
                    next_index += 1;
                    stack.push(next);
                    on_stack[next] = true;
                    work.push((next, successors(next), 0));
                } else if on_stack[next] {
                    low[node] = low[node].min(index[next]);
                }
                continue;
            }
            work.pop();
            if let Some((parent, _, _)) = work.last() {
                low[*parent] = low[*parent].min(low[node]);
            }
            if low[node] == index[node] {
                let mut component = Vec::new();
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                component.sort_unstable();
                components.push(component);
            }
        }
    }
    components.sort();
    components
}

/// The imports of one shortest way round a strongly connected component, from its
/// first file back to it.
fn one_cycle<'i>(
    component: &[usize],
    edges: &BTreeMap<usize, BTreeMap<usize, &'i Import>>,
) -> Vec<&'i Import> {
    let members: BTreeSet<usize> = component.iter().copied().collect();
    let start = component[0];
    let mut came_from: BTreeMap<usize, &Import> = BTreeMap::new();
    let mut frontier = vec![start];
    let mut closing = None;
    'search: while !frontier.is_empty() {
        let mut next_frontier = Vec::new();
        for node in frontier {
            for (&next, &import) in edges.get(&node).into_iter().flatten() {
                if !members.contains(&next) {
                    continue;
                }
                if next == start {
                    closing = Some(import);
                    break 'search;
                }
                if let std::collections::btree_map::Entry::Vacant(slot) = came_from.entry(next) {
                    slot.insert(import);
                    next_frontier.push(next);
                }
            }
        }
        frontier = next_frontier;
    }
    let mut steps = Vec::new();
    let mut current = closing;
    while let Some(import) = current {
        steps.push(import);
        current = if import.from == start {
            None
        } else {
            came_from.get(&import.from).copied()
        };
    }
    steps.reverse();
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crate in a temporary folder: `layers.toml`, then `(path under src, text)` files.
    fn fixture(layers: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("layers.toml"), layers).expect("layers.toml");
        std::fs::write(
            dir.path().join("Cargo.toml"),
            "[package]\nname = \"fixture-crate\"\n",
        )
        .expect("Cargo.toml");
        for (path, text) in files {
            let path = dir.path().join("src").join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    const TWO_LAYERS: &str = r#"
        [[layers]]
        name = "bottom"
        modules = ["crate", "low"]
        [[layers]]
        name = "top"
        modules = ["high", "main"]
    "#;

    fn check(layers: &str, files: &[(&str, &str)]) -> Report {
        let dir = fixture(layers, files);
        check_crate(dir.path()).expect("check runs")
    }

    fn upward(report: &Report) -> Vec<(usize, String)> {
        report
            .violations
            .iter()
            .filter_map(|v| match v {
                Violation::Upward { line, path, .. } => Some((*line, path.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_clean_crate_passes() {
        let report = check(
            TWO_LAYERS,
            &[
                ("lib.rs", "pub mod low;\npub mod high;\n"),
                ("low.rs", "pub fn f() {}\n"),
                ("high.rs", "use crate::low::f;\npub fn g() { f() }\n"),
                ("main.rs", "fn main() { fixture_crate::high::g() }\n"),
            ],
        );
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.imports, 2, "{report}");
        assert_eq!(
            report.layers,
            vec![("bottom".to_owned(), 2), ("top".to_owned(), 2)]
        );
    }

    #[test]
    fn a_planted_upward_import_fails_naming_both_ends() {
        let report = check(
            TWO_LAYERS,
            &[
                ("lib.rs", "pub mod low;\npub mod high;\n"),
                ("low.rs", "pub fn f() {}\n\nuse crate::high::g;\n"),
                ("high.rs", "pub fn g() {}\n"),
                ("main.rs", "fn main() {}\n"),
            ],
        );
        assert_eq!(report.violations.len(), 1, "{report}");
        let message = report.violations[0].to_string();
        for part in [
            "upward import at",
            "src/low.rs:3",
            "`low` (layer `bottom`)",
            "`crate::high::g` from `high` (layer `top`, higher)",
        ] {
            assert!(message.contains(part), "{part:?} not in {message}");
        }
    }

    #[test]
    fn grouped_super_self_and_inline_imports_are_all_seen() {
        let report = check(
            r#"
            [[layers]]
            name = "bottom"
            modules = ["crate", "a"]
            [[layers]]
            name = "top"
            modules = ["b", "c", "d", "e", "f"]
            "#,
            &[
                    (
                    "lib.rs",
                    "pub mod a; pub mod b; pub mod c; pub mod d; pub mod e; pub mod f;\nfn root() { f::go() }\n",
                ),
                (
                    "a/mod.rs",
                    concat!(
                        "pub mod inner;\n",
                        "use crate::{x, b::{self, y as z}};\n",
                        "fn one() { crate::c::run(); }\n",
                        "macro_rules! m { () => { $crate::d::X } }\n",
                        "fn two() { self::inner::g(); }\n",
                    ),
                ),
                ("a/inner.rs", "use super::super::e::Thing;\n"),
                ("b.rs", ""),
                ("c.rs", ""),
                ("d.rs", ""),
                ("e.rs", ""),
                ("f.rs", "use super::a::inner;\n"),
            ],
        );
        assert_eq!(
            upward(&report),
            vec![
                (1, "super::super::e::Thing".to_owned()),
                (2, "crate::b".to_owned()),
                (2, "crate::b::y".to_owned()),
                (3, "crate::c::run".to_owned()),
                (4, "crate::d::X".to_owned()),
                (2, "f::go".to_owned()),
            ],
            "{report}"
        );
        assert_eq!(report.violations.len(), 6, "{report}");
    }

    #[test]
    fn a_path_through_a_name_another_module_binds_reaches_what_it_names() {
        let report = check(
            TWO_LAYERS,
            &[
                (
                    "lib.rs",
                    "pub mod low;\nmod high;\nuse high::deep as shortcut;\npub use self::high::Top;\n",
                ),
                ("high/mod.rs", "pub mod deep;\npub struct Top;\n"),
                ("high/deep.rs", "pub fn f() {}\n"),
                (
                    "low.rs",
                    "use crate::shortcut::f;\nfn g() { let _ = crate::Top; }\n",
                ),
                ("main.rs", ""),
            ],
        );
        let found: Vec<(usize, String)> = report
            .violations
            .iter()
            .filter_map(|v| match v {
                Violation::Upward {
                    line, to_module, ..
                } => Some((*line, to_module.clone())),
                _ => None,
            })
            .collect();
        // lib.rs's own `use` items (lines 3 and 4) are upward imports of the bottom layer
        // too; low.rs's paths through them reach the modules they name.
        assert_eq!(
            found,
            [
                (3, "high::deep".to_owned()),
                (4, "high".to_owned()),
                (1, "high::deep".to_owned()),
                (2, "high".to_owned())
            ],
            "{report}"
        );
    }

    #[test]
    fn comments_strings_and_other_crates_do_not_count() {
        let report = check(
            TWO_LAYERS,
            &[
                ("lib.rs", "pub mod low;\npub mod high;\n"),
                (
                    "low.rs",
                    concat!(
                        "//! See [`crate::high`].\n",
                        "// use crate::high::g;\n",
                        "/* use crate::high::g; /* nested */ crate::high::g() */\n",
                        "const A: &str = \"use crate::high::g;\";\n",
                        "const B: &str = r#\"crate::high::g()\"#;\n",
                        "const C: char = '\"'; const D: &[u8] = b\"crate::high\";\n",
                        "fn f<'a>(x: &'a str) -> &'a str { x }\n",
                        "use std::collections::BTreeMap; use high_level::x;\n",
                        "pub(in crate::low) fn g() { let high = 1; let _ = high; }\n",
                    ),
                ),
                ("high.rs", "pub fn g() {}\n"),
                ("main.rs", "fn main() {}\n"),
            ],
        );
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.imports, 0, "{report}");
    }

    #[test]
    fn a_planted_cycle_names_every_file_of_it() {
        let report = check(
            r#"
            [[layers]]
            name = "only"
            modules = ["crate", "a", "b", "c"]
            "#,
            &[
                ("lib.rs", "pub mod a; pub mod b; pub mod c;\n"),
                ("a.rs", "use crate::b::B;\n"),
                ("b.rs", "pub struct B;\nuse crate::c::C;\n"),
                ("c.rs", "pub struct C;\nfn f() { crate::a::g() }\n"),
            ],
        );
        assert_eq!(report.violations.len(), 1, "{report}");
        let Violation::Cycle {
            layer,
            files,
            steps,
        } = &report.violations[0]
        else {
            panic!("not a cycle: {report}");
        };
        assert_eq!(layer, "only");
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                f.file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["a.rs", "b.rs", "c.rs"]);
        let walk: Vec<(String, usize)> = steps
            .iter()
            .map(|s| (s.from_module.clone(), s.line))
            .collect();
        assert_eq!(
            walk,
            [("a".into(), 1), ("b".into(), 2), ("c".into(), 2)],
            "{report}"
        );
        assert!(report.violations[0]
            .to_string()
            .contains("import cycle in layer `only` between 3 files"));
    }

    #[test]
    fn an_undeclared_file_and_a_vanished_module_fail() {
        let report = check(
            TWO_LAYERS,
            &[
                ("lib.rs", "pub mod low;\npub mod new_thing;\n"),
                ("low.rs", ""),
                ("new_thing/mod.rs", ""),
                ("main.rs", ""),
            ],
        );
        let messages: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{report}");
        assert!(
            messages[0].contains("src/new_thing/mod.rs (module `new_thing`) is in no layer"),
            "{report}"
        );
        assert!(
            messages[1].contains("layer `top` declares `high`, which matches no file"),
            "{report}"
        );
    }

    #[test]
    fn a_folder_entry_holds_its_files_and_the_longest_entry_wins() {
        let report = check(
            r#"
            [[layers]]
            name = "bottom"
            modules = ["crate", "runners::step"]
            [[layers]]
            name = "top"
            modules = ["runners"]
            "#,
            &[
                ("lib.rs", "pub mod runners;\n"),
                ("runners/mod.rs", "pub mod step; pub mod shell;\n"),
                ("runners/step.rs", "use super::shell::Shell;\n"),
                (
                    "runners/shell.rs",
                    "pub struct Shell; use super::step::Step;\n",
                ),
            ],
        );
        assert_eq!(
            upward(&report),
            vec![(1, "super::shell::Shell".to_owned())],
            "{report}"
        );
        assert_eq!(report.layers[1], ("top".to_owned(), 2));
    }

    #[test]
    fn test_code_keeps_the_direction_but_may_use_test_only_helpers() {
        let report = check(
            r#"
            [[layers]]
            name = "bottom"
            modules = ["crate", "low", "peer"]
            [[layers]]
            name = "top"
            modules = ["high", "fixtures"]
            "#,
            &[
                (
                    "lib.rs",
                    "pub mod low; pub mod peer; pub mod high;\n#[cfg(test)]\nmod fixtures;\n",
                ),
                (
                    "low.rs",
                    concat!(
                        "pub fn f() {}\n",
                        "#[cfg(test)]\n",
                        "mod tests {\n",
                        "    use super::*;\n",
                        "    use crate::fixtures::build;\n",
                        "    use crate::peer::helper;\n",
                        "    #[test] fn t() { crate::high::g(); }\n",
                        "}\n",
                    ),
                ),
                ("peer.rs", "pub fn helper() { crate::low::f() }\n"),
                ("high.rs", "pub fn g() {}\n"),
                ("fixtures.rs", "pub fn build() { crate::high::g() }\n"),
            ],
        );
        // The test's import of `high` is upward; `fixtures` is test-only and allowed;
        // low's test -> peer -> low is not a cycle of product code.
        assert_eq!(
            upward(&report),
            vec![(7, "crate::high::g".to_owned())],
            "{report}"
        );
        assert_eq!(report.violations.len(), 1, "{report}");
    }

    #[test]
    fn exceptions_allow_their_import_and_go_stale_when_unused() {
        let layers = format!(
            "{TWO_LAYERS}\n{}",
            r#"
            [[exceptions]]
            from = "low"
            to = "high"
            owner = "someone"
            reason = "being moved"
            "#
        );
        let files = [
            ("lib.rs", "pub mod low;\npub mod high;\n"),
            ("low.rs", "use crate::high::g;\n"),
            ("high.rs", "pub fn g() {}\n"),
            ("main.rs", ""),
        ];
        let report = check(&layers, &files);
        assert!(report.is_clean(), "{report}");
        assert!(
            report.to_string().contains("1 exception(s) remain"),
            "{report}"
        );

        let fixed = [files[0], ("low.rs", ""), files[2], files[3]];
        let report = check(&layers, &fixed);
        assert_eq!(
            report.violations,
            vec![Violation::StaleException {
                from: "low".into(),
                to: "high".into()
            }]
        );
    }

    #[test]
    fn a_malformed_declaration_is_an_error_naming_the_file() {
        let dir = fixture(
            "[[layers]]\nname = \"x\"\nmodules = [\"a b\"]\n",
            &[("lib.rs", "")],
        );
        let err = check_crate(dir.path()).expect_err("bad module path");
        assert!(
            err.to_string()
                .contains("layers.toml: layer `x`: `a b` is not a module path"),
            "{err}"
        );

        let dir = fixture("[[layer]]\nname = \"x\"\n", &[("lib.rs", "")]);
        let err = check_crate(dir.path()).expect_err("unknown key");
        assert!(err.to_string().contains("layers.toml"), "{err}");
    }

    #[test]
    fn the_lexer_keeps_lines_and_skips_literals() {
        let tokens =
            lex("a /* x\ny */ \"s\ns\" 'c' '\\n' r##\"q\"#\"## b'x' 1.5 x.0.1\nz").expect("lexes");
        let idents: Vec<(String, usize)> = tokens
            .iter()
            .filter_map(|t| match &t.tok {
                Tok::Ident(s) => Some((s.clone(), t.line)),
                _ => None,
            })
            .collect();
        assert_eq!(idents, [("a".into(), 1), ("x".into(), 3), ("z".into(), 4)]);
        assert_eq!(
            lex("\"open").expect_err("left open"),
            (1, "unterminated string literal")
        );
    }
}
