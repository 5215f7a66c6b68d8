//! Submodules: where `.gitmodules` says each one lives, and a mirror of its own for each.
//!
//! A submodule's URL comes from the commit being built, so it is untrusted: it is
//! resolved against the superproject's URL (`../lib.git`), then checked like any
//! repository URL, and a local path or `file://` URL is refused unless the superproject
//! is itself local (otherwise a pushed `.gitmodules` could make the coordinator copy
//! another repository, or any directory, off its own disk into a workspace). It is
//! fetched with the superproject's credentials when it uses the same transport, as
//! git's own credential lookup would.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::GitError;
use crate::mirror::{Mirror, MirrorOptions};
use crate::oid::ObjectId;
use crate::remote::{resolve_relative, transport_of, Transport};
use crate::run::GitProgram;

/// Where submodule mirrors live: one bare repository per URL under `root`, named by a
/// digest of the URL (`<root>/<24 hex digits>.git`).
#[derive(Debug, Clone)]
pub struct Mirrors {
    pub root: PathBuf,
    pub git: GitProgram,
    pub options: MirrorOptions,
}

impl Mirrors {
    /// The mirror for a submodule declared with `url` by a commit of `superproject`.
    pub fn for_submodule(&self, superproject: &Mirror, url: &str) -> Result<Mirror, GitError> {
        let resolved = resolve_relative(superproject.remote().url(), url);
        let transport = transport_of(&resolved)?;
        if transport == Transport::Local && superproject.remote().transport() != Transport::Local {
            return Err(GitError::Config(format!(
                "its URL `{resolved}` is a local path, refused for a repository that is not itself local"
            )));
        }
        let remote = superproject.remote().with_url(&resolved)?;
        let name = blake3::hash(resolved.as_bytes()).to_hex();
        let dir = self.root.join(format!("{}.git", &name.as_str()[..24]));
        Mirror::open(self.git.clone(), dir, remote, self.options.clone())
    }
}

/// The submodules `.gitmodules` declares at `commit`: path -> URL (as written).
pub(crate) fn declared(
    mirror: &Mirror,
    commit: ObjectId,
) -> Result<HashMap<String, String>, GitError> {
    let Some(text) = mirror.read_file(commit, ".gitmodules", 1024 * 1024)? else {
        return Ok(HashMap::new());
    };
    // `git config --blob` would parse it too, but it also honours `include.path`;
    // the format is small enough to read here.
    Ok(parse_gitmodules(&String::from_utf8_lossy(&text)))
}

/// `[submodule "name"]` sections with `path =` and `url =` lines.
fn parse_gitmodules(text: &str) -> HashMap<String, String> {
    let mut sections: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']').trim();
            current = header
                .strip_prefix("submodule")
                .map(|rest| rest.trim().trim_matches('"').to_owned());
            continue;
        }
        let Some(name) = &current else { continue };
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_owned();
        let slot = sections.entry(name.clone()).or_default();
        match key.trim().to_ascii_lowercase().as_str() {
            "path" => slot.0 = Some(value.trim_end_matches('/').to_owned()),
            "url" => slot.1 = Some(value),
            _ => {}
        }
    }
    sections
        .into_values()
        .filter_map(|(path, url)| Some((path?, url?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitmodules_sections_are_read() {
        let text = "[submodule \"lib\"]\n\tpath = vendor/lib\n\turl = ../lib.git\n[core]\n\tx = y\n[submodule \"b\"]\n path = b/\n url = \"https://h/b\"\n[submodule \"nourl\"]\n path = n\n";
        let found = parse_gitmodules(text);
        assert_eq!(
            found.get("vendor/lib").map(String::as_str),
            Some("../lib.git")
        );
        assert_eq!(found.get("b").map(String::as_str), Some("https://h/b"));
        assert_eq!(found.len(), 2);
    }
}
