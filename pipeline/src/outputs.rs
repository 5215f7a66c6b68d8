//! What a job keeps and reuses: its `artifacts`, its `cache`, the artifacts it
//! `download`s, and the `hashFiles(...)` function cache keys use.
//!
//! These are the pure rules: which names and paths are acceptable and how a
//! `hashFiles(...)` call is read. Loading from YAML (with positions) is in `load`; hashing
//! the files is the agent's, since only it has the workspace.

pub use gantry_protocol::ArtifactWhen;
use serde::{Deserialize, Serialize};

/// Longest artifact name.
pub const MAX_ARTIFACT_NAME: usize = 128;
/// Longest cache key (after expansion on the agent), as in GitHub Actions.
pub const MAX_CACHE_KEY: usize = 512;
/// Most paths (or globs) one artifact, cache or report lists.
pub const MAX_OUTPUT_PATHS: usize = 64;
/// Most caches one job declares.
pub const MAX_CACHES: usize = 8;
/// Default artifact lifetime: 30 days.
pub const DEFAULT_EXPIRE_IN_SECS: u64 = 30 * 86_400;
/// Longest artifact lifetime: a year.
pub const MAX_EXPIRE_IN_SECS: u64 = 365 * 86_400;

/// A job's `artifacts:`: files it passes to later jobs and deployments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSpec {
    /// Unique in the pipeline; the job's name unless given.
    pub name: String,
    /// Workspace-relative paths or globs.
    pub paths: Vec<String>,
    pub expire_in_secs: u64,
    /// When it is uploaded (`when:`); on success by default.
    #[serde(default)]
    pub when: ArtifactWhen,
}

/// A job's `cache:`: files restored before the first step and saved after a success.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// May hold `${{ hashFiles(...) }}`, `${{ env.X }}`, `${{ inputs.x }}`, `git.*`
    /// and `event.*`.
    pub key: String,
    /// Prefixes tried in order when `key` has no exact match.
    pub restore_keys: Vec<String>,
    /// Workspace-relative paths, and with `home` also `~/...` paths under `$HOME`.
    pub paths: Vec<String>,
    /// `home: true`: paths starting with `~/` are under the job's `$HOME` (a package
    /// manager's download cache, `~/.cargo/registry`), which the agent keeps per job.
    #[serde(default)]
    pub home: bool,
}

/// Why an artifact or cache path is refused; `None` if it is fine. Paths are relative to
/// the workspace and may not leave it; `*`, `**` and `?` globs are allowed.
pub fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("is empty")
    } else if path.starts_with('/') || path.as_bytes().get(1) == Some(&b':') {
        Some("is absolute; paths are relative to the workspace")
    } else if path.contains('\\') {
        Some("contains a backslash; use / between components")
    } else if path.contains('\0') {
        Some("contains a NUL byte")
    } else if path.split('/').any(|part| part == "..") {
        Some("has a \"..\" component, which would leave the workspace")
    } else if path.len() > 4096 {
        Some("is longer than 4096 bytes")
    } else {
        None
    }
}

/// Why a cache path under `$HOME` (written `~/...`) is refused; `None` if it is fine.
pub fn home_path_problem(path: &str) -> Option<&'static str> {
    match path.strip_prefix("~/") {
        Some("") => Some("is all of $HOME; name a directory under it"),
        Some(rest) => path_problem(rest),
        None => Some("does not start with ~/"),
    }
}

/// Why an artifact name is refused; `None` if it is fine. Names appear in CLI arguments
/// and listings: printable, no `/`, at most [`MAX_ARTIFACT_NAME`] bytes.
pub fn artifact_name_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some("is empty")
    } else if name.len() > MAX_ARTIFACT_NAME {
        Some("is longer than 128 bytes")
    } else if name.contains('/') || name.chars().any(char::is_control) {
        Some("contains a / or a control character")
    } else if name.contains("${{") {
        Some("contains a ${{ }} reference that is not a matrix value")
    } else {
        None
    }
}

/// Reads a `hashFiles('a', "b/**")` expression (the inside of `${{ }}`): `None` if it is
/// not a call to hashFiles, else its patterns or why the call is malformed.
pub fn hash_files_patterns(expr: &str) -> Option<Result<Vec<String>, String>> {
    let args = expr.trim().strip_prefix("hashFiles")?.trim_start();
    let Some(args) = args
        .strip_prefix('(')
        .and_then(|a| a.trim_end().strip_suffix(')'))
    else {
        return Some(Err(format!(
            "`{expr}` is not a call; write hashFiles('path/or/glob', ...)"
        )));
    };
    let mut patterns = Vec::new();
    let mut rest = args.trim();
    while !rest.is_empty() {
        let Some(quote @ ('\'' | '"')) = rest.chars().next() else {
            return Some(Err(format!(
                "hashFiles arguments must be quoted strings, found `{rest}`"
            )));
        };
        let Some(end) = rest[1..].find(quote) else {
            return Some(Err(format!("unterminated string in `{expr}`")));
        };
        let pattern = &rest[1..=end];
        if let Some(problem) = path_problem(pattern) {
            return Some(Err(format!("hashFiles pattern \"{pattern}\" {problem}")));
        }
        patterns.push(pattern.to_owned());
        rest = rest[end + 2..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
            if rest.is_empty() {
                return Some(Err(format!("trailing comma in `{expr}`")));
            }
        } else if !rest.is_empty() {
            return Some(Err(format!(
                "expected , between hashFiles arguments, found `{rest}`"
            )));
        }
    }
    if patterns.is_empty() {
        return Some(Err(
            "hashFiles needs at least one path or glob, e.g. hashFiles('Cargo.lock')".into(),
        ));
    }
    Some(Ok(patterns))
}

/// Checks the `${{ }}` references of a cache key or restore key: only `hashFiles(...)`,
/// `env.X` and `inputs.x` can be filled in (a secret would be shown in listings).
pub fn cache_key_problem(key: &str) -> Option<String> {
    if key.trim().is_empty() {
        return Some("a cache key must not be empty".into());
    }
    let mut rest = key;
    while let Some(start) = rest.find("${{") {
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else {
            return Some("unterminated \"${{\"; expected \"}}\"".into());
        };
        let expr = after[..end].trim();
        match hash_files_patterns(expr) {
            Some(Err(problem)) => return Some(problem),
            Some(Ok(_)) => {}
            None if ["env.", "inputs.", "git.", "event."]
                .iter()
                .any(|p| expr.starts_with(p)) => {}
            None => {
                return Some(format!(
                    "`${{{{ {expr} }}}}` cannot be used in a cache key; use hashFiles(...), env.NAME, inputs.NAME, git.*, event.* or matrix.NAME"
                ))
            }
        }
        rest = &after[end + 2..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_files_calls_are_read_or_refused_with_the_reason() {
        assert_eq!(hash_files_patterns("env.X"), None);
        assert_eq!(
            hash_files_patterns("hashFiles('Cargo.lock')"),
            Some(Ok(vec!["Cargo.lock".to_owned()]))
        );
        assert_eq!(
            hash_files_patterns(" hashFiles( 'a/**/*.lock' , \"b\" ) "),
            Some(Ok(vec!["a/**/*.lock".to_owned(), "b".to_owned()]))
        );
        for (bad, needle) in [
            ("hashFiles", "is not a call"),
            ("hashFiles()", "at least one"),
            ("hashFiles(a)", "must be quoted"),
            ("hashFiles('a'", "is not a call"),
            ("hashFiles('a' 'b')", "expected ,"),
            ("hashFiles('a',)", "trailing comma"),
            ("hashFiles('../x')", "\"..\""),
            ("hashFiles('/etc/passwd')", "absolute"),
            ("hashFiles('a)", "unterminated"),
        ] {
            match hash_files_patterns(bad) {
                Some(Err(message)) => assert!(message.contains(needle), "{bad}: {message}"),
                other => panic!("{bad}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn cache_keys_refuse_secrets_and_unknown_references() {
        assert_eq!(
            cache_key_problem("deps-${{ hashFiles('a') }}-${{ env.OS }}"),
            None
        );
        assert!(cache_key_problem("k-${{ secrets.TOKEN }}")
            .is_some_and(|m| m.contains("cannot be used in a cache key")));
        assert!(cache_key_problem("  ").is_some());
        assert!(cache_key_problem("k-${{ env.X").is_some_and(|m| m.contains("unterminated")));
    }

    #[test]
    fn paths_and_names_that_leave_or_confuse_are_refused() {
        for good in ["out", "out/app.bin", "target/**/*.rlib", "a b/c"] {
            assert_eq!(path_problem(good), None, "{good}");
        }
        for bad in ["", "/etc", "C:/x", "a/../../b", "..", "a\\b", "a\0"] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(artifact_name_problem("test (1, debug)"), None);
        for bad in ["", " ", "a/b", "x\n", &"n".repeat(129), "a-${{ env.X }}"] {
            assert!(artifact_name_problem(bad).is_some(), "{bad:?}");
        }
    }
}
