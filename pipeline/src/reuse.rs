//! Reuse across files and jobs: the [`Resolver`] callers implement to hand over other
//! files of the repository, `include:`, template jobs with `extends:`, and the deep merge
//! both use. (YAML merge keys are applied by `yaml` as mappings are built.)
//!
//! This module owns the tree operations and their bounds; it reads no file itself and
//! knows nothing of what a job's keys mean. Calls of reusable pipelines (`uses:`) are in
//! `load`, which owns what a job is.
//!
//! # The merge rule (extends and include)
//!
//! `merge(base, over)`: where both are mappings, the result has base's keys in base's
//! order, then over's new keys in over's order, and a key in both gets
//! `merge(base's value, over's value)`. Anything else (a list, a scalar, a mapping over
//! a list) is replaced by over's value whole: lists are not concatenated, so a job that
//! extends a template with `steps:` replaces the template's steps. This is GitLab CI's
//! rule for `extends`.
//!
//! # Bounds
//!
//! - [`MAX_FILE_DEPTH`] files deep for include and `uses:` chains together, and
//!   [`MAX_FILES`] files read for one pipeline, [`MAX_TOTAL_BYTES`] of text in all;
//! - [`MAX_EXTENDS_DEPTH`] templates in one `extends` chain, and [`MAX_EXTENDS`] names
//!   in one `extends:` list;
//! - every copy a merge, a template or a matrix makes is charged to one budget
//!   (`MAX_EXPANDED_TEXT` in `load`, 16 MiB), so no file can make the loader build more.

use std::collections::HashMap;

use crate::yaml::{Kind, Node, Pos};

/// Deepest chain of files including or calling each other (the top file is 1).
pub const MAX_FILE_DEPTH: usize = 8;
/// Most distinct files read for one pipeline, the top file included.
pub const MAX_FILES: usize = 64;
/// Most bytes of text read for one pipeline, every file together: four top files at
/// their limit.
pub const MAX_TOTAL_BYTES: usize = 4 * 1024 * 1024;
/// Longest chain of templates extending templates.
pub const MAX_EXTENDS_DEPTH: usize = 8;
/// Most templates one `extends:` list names.
pub const MAX_EXTENDS: usize = 16;

/// Hands the loader the other files a pipeline includes or calls, by their path in the
/// same repository. The CLI reads them from the directory it validates in; the
/// coordinator from the commit the run builds. The loader has checked the path first:
/// relative to the repository's root, `/`-separated, no `..`, ending `.yml` or `.yaml`.
pub trait Resolver {
    /// The file's text, or a sentence saying why it cannot be had ("no such file in
    /// commit 1a2b3c"), which the loader puts in its error.
    fn read_file(&self, path: &str) -> Result<String, String>;
}

/// A resolver for a pipeline that stands alone: every include and call is refused.
pub struct NoFiles;

impl Resolver for NoFiles {
    fn read_file(&self, path: &str) -> Result<String, String> {
        Err(format!(
            "{path} cannot be read: this check was given the one file only; include: and uses: need the other files of the repository (load with a resolver)"
        ))
    }
}

/// A resolver over files in memory, for tests and for callers that fetched the files
/// already.
impl<S: std::hash::BuildHasher> Resolver for HashMap<String, String, S> {
    fn read_file(&self, path: &str) -> Result<String, String> {
        self.get(path)
            .cloned()
            .ok_or_else(|| format!("no file {path} in the repository"))
    }
}

/// Checks a path of `include:` or `uses:` and puts it in the form resolvers get:
/// relative to the repository's root (a leading `/` or `./` is dropped).
pub fn normalize_path(path: &str) -> Result<String, String> {
    let trimmed = path.trim();
    let relative = trimmed
        .strip_prefix('/')
        .or_else(|| trimmed.strip_prefix("./"))
        .unwrap_or(trimmed);
    let problem = if relative.is_empty() {
        Some("is empty")
    } else if relative.contains('\\') || relative.contains('\0') {
        Some("has a backslash or NUL; use / between directories")
    } else if relative.as_bytes().get(1) == Some(&b':') || relative.contains("://") {
        Some("is not a path in the repository (files from elsewhere cannot be included)")
    } else if relative
        .split('/')
        .any(|part| part == ".." || part.is_empty())
    {
        Some("must stay in the repository: no \"..\" and no empty parts")
    } else if !std::path::Path::new(relative)
        .extension()
        .is_some_and(|e| e == "yml" || e == "yaml")
    {
        Some("must name a .yml or .yaml file")
    } else if relative.len() > 1024 {
        Some("is longer than 1024 bytes")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!("path \"{path}\" {problem}")),
        None => Ok(relative.to_owned()),
    }
}

/// `merge(base, over)` as the module documentation defines it. Nodes are cloned; the
/// caller charges `base.text_size() + over.text_size()` to its budget first.
pub fn merge(base: &Node, over: &Node) -> Node {
    let (Kind::Map(base_entries), Kind::Map(over_entries)) = (&base.kind, &over.kind) else {
        return over.clone();
    };
    let text = |key: &Node| match &key.kind {
        Kind::Scalar { value, .. } => Some(value.clone()),
        _ => None,
    };
    let mut entries: Vec<(Node, Node)> = base_entries.clone();
    let index: HashMap<String, usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, (k, _))| text(k).map(|t| (t, i)))
        .collect();
    for (key, value) in over_entries {
        match text(key).and_then(|t| index.get(&t).copied()) {
            Some(i) => {
                let merged = merge(&entries[i].1, value);
                entries[i] = (key.clone(), merged);
            }
            None => entries.push((key.clone(), value.clone())),
        }
    }
    let height = 1 + entries
        .iter()
        .map(|(k, v)| k.height.max(v.height))
        .max()
        .unwrap_or(0);
    Node {
        pos: over.pos,
        kind: Kind::Map(entries),
        height,
    }
}

/// The value of `key` in a mapping node, with the key node.
pub fn get<'a>(node: &'a Node, key: &str) -> Option<(&'a Node, &'a Node)> {
    let Kind::Map(entries) = &node.kind else {
        return None;
    };
    entries.iter().find_map(|(k, v)| match &k.kind {
        Kind::Scalar { value, .. } if value == key => Some((k, v)),
        _ => None,
    })
}

/// The mapping without `key`.
pub fn without(node: &Node, key: &str) -> Node {
    let Kind::Map(entries) = &node.kind else {
        return node.clone();
    };
    let entries = entries
        .iter()
        .filter(|(k, _)| !matches!(&k.kind, Kind::Scalar { value, .. } if value == key))
        .cloned()
        .collect();
    Node {
        pos: node.pos,
        kind: Kind::Map(entries),
        height: node.height,
    }
}

/// What resolving one job's `extends` found wrong: a message at a position.
pub type ReuseError = (Pos, String);

/// A file's template jobs, and those already resolved: each template is resolved once
/// per file, however many jobs and templates extend it, so the work stays linear in the
/// number of templates (a 16-wide, 7-deep `extends` tree is 7 resolutions, not 16^7).
pub struct Templates<'a> {
    nodes: HashMap<String, &'a Node>,
    resolved: HashMap<String, Node>,
}

impl<'a> Templates<'a> {
    pub fn new(nodes: HashMap<String, &'a Node>) -> Self {
        Self {
            nodes,
            resolved: HashMap::new(),
        }
    }
}

/// Resolves the `extends:` of a job (or template) against the file's templates (each
/// name to its node, `extends` included): the templates in order, each resolved
/// first, then the job on top, without the `extends` key. `chain` holds the names being
/// resolved, for the cycle message. `charge` is called with the size of every copy
/// before it is made and says whether the budget allows it.
pub fn resolve_extends(
    node: &Node,
    templates: &mut Templates<'_>,
    chain: &mut Vec<String>,
    charge: &mut dyn FnMut(usize) -> bool,
) -> Result<Node, ReuseError> {
    let Some((key, list)) = get(node, "extends") else {
        if !charge(node.text_size()) {
            return Err((
                node.pos,
                "templates expand past the loader's budget".to_owned(),
            ));
        }
        return Ok(node.clone());
    };
    let names: Vec<(String, Pos)> = match &list.kind {
        Kind::Scalar { value, .. } if !list.is_null() => vec![(value.clone(), list.pos)],
        Kind::Seq(items) => {
            let mut names = Vec::new();
            for item in items {
                match &item.kind {
                    Kind::Scalar { value, .. } if !item.is_null() => {
                        names.push((value.clone(), item.pos));
                    }
                    _ => {
                        return Err((
                            item.pos,
                            format!(
                                "each entry of extends must be a template's name, found {}",
                                item.type_name()
                            ),
                        ))
                    }
                }
            }
            names
        }
        _ => {
            return Err((
                list.pos,
                format!(
                    "extends must be a template's name or a list of them, like extends: .base; found {}",
                    list.type_name()
                ),
            ))
        }
    };
    if names.is_empty() {
        return Err((
            list.pos,
            "extends is empty; name at least one template".to_owned(),
        ));
    }
    if names.len() > MAX_EXTENDS {
        return Err((
            list.pos,
            format!(
                "extends names {} templates; the most is {MAX_EXTENDS}",
                names.len()
            ),
        ));
    }
    if chain.len() >= MAX_EXTENDS_DEPTH {
        return Err((
            key.pos,
            format!(
                "templates extend each other more than {MAX_EXTENDS_DEPTH} deep: {}",
                chain.join(" -> ")
            ),
        ));
    }
    let mut merged: Option<Node> = None;
    for (template, pos) in names {
        if !template.starts_with('.') {
            return Err((
                pos,
                format!("extends names \"{template}\", which is not a template; templates are jobs whose name starts with \".\" (to share a job's keys, move them to a .template both extend)"),
            ));
        }
        if let Some(at) = chain.iter().position(|n| *n == template) {
            let mut cycle: Vec<&str> = chain[at..].iter().map(String::as_str).collect();
            cycle.push(&template);
            return Err((pos, format!("extends form a cycle: {}", cycle.join(" -> "))));
        }
        let resolved = if let Some(done) = templates.resolved.get(&template) {
            if !charge(done.text_size()) {
                return Err((pos, "templates expand past the loader's budget".to_owned()));
            }
            done.clone()
        } else {
            let Some(&base) = templates.nodes.get(&template) else {
                let mut known: Vec<&str> = templates.nodes.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err((
                pos,
                format!(
                    "extends names \"{template}\", which is not a template in this file; templates are: {} (a template is a job under jobs: whose name starts with \".\"; a top-level .key only holds YAML anchors)",
                    if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
                ),
            ));
            };
            chain.push(template.clone());
            let resolved = resolve_extends(base, templates, chain, charge)?;
            chain.pop();
            templates
                .resolved
                .insert(template.clone(), resolved.clone());
            resolved
        };
        merged = Some(match merged {
            None => resolved,
            Some(so_far) => {
                if !charge(so_far.text_size() + resolved.text_size()) {
                    return Err((pos, "templates expand past the loader's budget".to_owned()));
                }
                merge(&so_far, &resolved)
            }
        });
    }
    let own = without(node, "extends");
    let base = merged.unwrap_or_else(|| own.clone());
    if !charge(base.text_size() + own.text_size()) {
        return Err((
            key.pos,
            "templates expand past the loader's budget".to_owned(),
        ));
    }
    Ok(merge(&base, &own))
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::yaml;

    fn tree(text: &str) -> Node {
        yaml::load(text, 0).expect("valid").expect("non-empty")
    }

    fn show(node: &Node) -> String {
        match &node.kind {
            Kind::Scalar { value, .. } => value.clone(),
            Kind::Seq(items) => format!(
                "[{}]",
                items.iter().map(show).collect::<Vec<_>>().join(", ")
            ),
            Kind::Map(entries) => format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|(k, v)| format!("{}: {}", show(k), show(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    #[test]
    fn merge_goes_deep_in_mappings_and_replaces_the_rest() {
        let base = tree("{ a: 1, env: { X: 1, Y: 2 }, steps: [s1, s2], image: { name: x } }");
        let over = tree("{ env: { Y: 3, Z: 4 }, steps: [s3], b: 2, image: y }");
        assert_eq!(
            show(&merge(&base, &over)),
            "{a: 1, env: {X: 1, Y: 3, Z: 4}, steps: [s3], image: y, b: 2}"
        );
    }

    fn templates(root: &Node) -> Templates<'_> {
        let Kind::Map(entries) = &root.kind else {
            panic!("mapping expected")
        };
        Templates::new(
            entries
                .iter()
                .filter_map(|(k, v)| match &k.kind {
                    Kind::Scalar { value, .. } if value.starts_with('.') => {
                        Some((value.clone(), v))
                    }
                    _ => None,
                })
                .collect(),
        )
    }

    fn extend(text: &str, job: &str) -> Result<String, ReuseError> {
        let root = tree(text);
        let mut templates = templates(&root);
        let (_, node) = get(&root, job).expect("job");
        let mut chain = vec![job.to_owned()];
        resolve_extends(node, &mut templates, &mut chain, &mut |_| true).map(|n| show(&n))
    }

    #[test]
    fn extends_applies_templates_in_order_then_the_job() {
        let text = ".a: { env: { A: 1, X: a }, image: a }\n.b: { extends: .a, env: { X: b } }\n.c: { timeout: 5m, env: { X: c } }\nj: { extends: [.b, .c], env: { J: 1 } }\n";
        assert_eq!(
            extend(text, "j"),
            Ok("{env: {A: 1, X: c, J: 1}, image: a, timeout: 5m}".to_owned())
        );
    }

    #[test]
    fn extends_refuses_cycles_with_the_chain_and_unknown_names() {
        let text = ".a: { extends: .b }\n.b: { extends: .a }\nj: { extends: .a }\n";
        let (pos, message) = extend(text, "j").expect_err("cycle");
        assert_eq!(message, "extends form a cycle: .a -> .b -> .a");
        assert_eq!((pos.line, pos.column), (2, 16));
        let (_, message) = extend(".a: {}\nj: { extends: .nope }\n", "j").expect_err("unknown");
        assert!(
            message.contains("not a template in this file; templates are: .a"),
            "{message}"
        );
        let (_, message) = extend("k: {}\nj: { extends: k }\n", "j").expect_err("not a template");
        assert!(message.contains("which is not a template"), "{message}");
        let (_, message) = extend("j: { extends: [] }\n", "j").expect_err("empty");
        assert!(message.contains("extends is empty"), "{message}");
    }

    #[test]
    fn long_template_chains_are_refused() {
        let mut text = String::from(".t0: { a: 1 }\n");
        for i in 1..20 {
            writeln!(text, ".t{i}: {{ extends: .t{} }}", i - 1)
                .expect("writing to a String cannot fail");
        }
        text.push_str("j: { extends: .t19 }\n");
        let (_, message) = extend(&text, "j").expect_err("too deep");
        assert!(message.contains("more than 8 deep"), "{message}");
    }

    #[test]
    fn wide_and_deep_template_trees_resolve_each_template_once() {
        // Seven levels of templates, each extending the one below sixteen times: without
        // resolving each template once, this is 16^7 (268 million) resolutions.
        let mut text = String::from(".t0: { a: 1 }\n");
        for i in 1..7 {
            let list = vec![format!(".t{}", i - 1); 16].join(", ");
            writeln!(text, ".t{i}: {{ extends: [{list}] }}")
                .expect("writing to a String cannot fail");
        }
        text.push_str("j: { extends: .t6 }\n");
        let root = tree(&text);
        let mut templates = templates(&root);
        let (_, node) = get(&root, "j").expect("job");
        let mut merges = 0usize;
        let resolved =
            resolve_extends(node, &mut templates, &mut vec!["j".to_owned()], &mut |_| {
                merges += 1;
                true
            })
            .expect("resolves");
        assert_eq!(show(&resolved), "{a: 1}");
        assert!(merges < 1_000, "{merges} copies");
    }

    #[test]
    fn include_paths_stay_in_the_repository() {
        assert_eq!(normalize_path("/ci/a.yml"), Ok("ci/a.yml".to_owned()));
        assert_eq!(normalize_path("./a.yaml"), Ok("a.yaml".to_owned()));
        for bad in [
            "",
            "../a.yml",
            "a/../../b.yml",
            "a//b.yml",
            "a.txt",
            "C:/a.yml",
            "https://x/a.yml",
            "a\\b.yml",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }
}
