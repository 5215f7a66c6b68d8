//! A positioned YAML tree built from saphyr-parser events.
//!
//! This module owns turning text into `Node`s that remember where they start (file,
//! line, column). It knows nothing about pipelines. It bounds its work: nesting depth,
//! total node count (aliases included, so "billion laughs" documents are refused) and one
//! document per file. It applies YAML merge keys (`<<: *base`, `<<: [*a, *b]`) as it
//! builds each mapping, so merged entries keep the positions of their definitions.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// Deepest nesting of sequences and mappings accepted; pipeline files need fewer than 10.
pub const MAX_DEPTH: usize = 64;
/// Most nodes (alias expansions counted) in one file; a 1 MiB file of `[a,a,...]` has
/// about 500k, real pipelines a few thousand.
pub const MAX_NODES: usize = 200_000;

/// A 1-based position in a source file; `file` indexes the loader's list of files read
/// (0 is the file being loaded, then included and called files in the order read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Pos {
    pub file: u16,
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// The start of a file.
    pub fn start(file: u16) -> Self {
        Self {
            file,
            line: 1,
            column: 1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
    /// Levels of nesting in this node (1 for a scalar), kept to bound alias expansion:
    /// every walk over a tree recurses, so no tree may be deeper than `MAX_DEPTH`.
    pub height: usize,
}

#[derive(Clone, Debug)]
pub enum Kind {
    /// A scalar; `plain` is false for quoted and block scalars, which are always strings.
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// Whether this is a plain `null`, `~` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true } if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A short name of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { .. } if self.is_null() => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }

    /// Sum of the lengths of every scalar below this node, to bound expansion work.
    pub fn text_size(&self) -> usize {
        match &self.kind {
            Kind::Scalar { value, .. } => value.len() + 1,
            Kind::Seq(items) => items.iter().map(Node::text_size).sum::<usize>() + 1,
            Kind::Map(entries) => {
                entries
                    .iter()
                    .map(|(k, v)| k.text_size() + v.text_size())
                    .sum::<usize>()
                    + 1
            }
        }
    }
}

/// A YAML syntax or structure error at a position.
#[derive(Debug)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

fn pos_of(span: Span, file: u16) -> Pos {
    Pos {
        file,
        line: span.start.line().max(1),
        column: span.start.col() + 1,
    }
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

/// Parses one YAML document into a tree, its positions in `file`. An empty document
/// yields `None`.
pub fn load(text: &str, file: u16) -> Result<Option<Node>, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let mut node_count = 0usize;

    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|err| YamlError {
            pos: Pos {
                file,
                line: err.marker().line().max(1),
                column: err.marker().col() + 1,
            },
            message: format!("invalid YAML: {}", err.info()),
        })?;
        let pos = pos_of(span, file);
        let finished: Option<(Node, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        pos,
                        message: "a pipeline file holds one YAML document; remove this second one"
                            .to_owned(),
                    });
                }
                None
            }
            Event::Alias(id) => {
                let Some(target) = anchors.get(&id) else {
                    return Err(YamlError {
                        pos,
                        message: "alias names an unknown anchor".to_owned(),
                    });
                };
                if stack.len() + target.height > MAX_DEPTH {
                    return Err(YamlError {
                        pos,
                        message: format!(
                            "nesting through aliases is deeper than {MAX_DEPTH} levels"
                        ),
                    });
                }
                node_count = node_count.saturating_add(count_nodes(target));
                let mut copy = target.clone();
                copy.pos = pos;
                Some((copy, 0))
            }
            Event::Scalar(value, style, anchor, _tag) => Some((
                Node {
                    pos,
                    kind: Kind::Scalar {
                        value: value.into_owned(),
                        plain: style == ScalarStyle::Plain,
                    },
                    height: 1,
                },
                anchor,
            )),
            Event::SequenceStart(anchor, _tag) => {
                push_frame(
                    &mut stack,
                    Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    },
                    pos,
                )?;
                None
            }
            Event::MappingStart(anchor, _tag) => {
                push_frame(
                    &mut stack,
                    Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        pending_key: None,
                    },
                    pos,
                )?;
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => Some((
                    Node {
                        pos,
                        height: 1 + items.iter().map(|n| n.height).max().unwrap_or(0),
                        kind: Kind::Seq(items),
                    },
                    anchor,
                )),
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => {
                    let entries = apply_merge_keys(entries)?;
                    Some((
                        Node {
                            pos,
                            height: 1 + entries
                                .iter()
                                .map(|(k, v)| k.height.max(v.height))
                                .max()
                                .unwrap_or(0),
                            kind: Kind::Map(entries),
                        },
                        anchor,
                    ))
                }
                None => None,
            },
        };
        let Some((node, anchor)) = finished else {
            continue;
        };
        node_count = node_count.saturating_add(1);
        if node_count > MAX_NODES {
            return Err(YamlError {
                pos,
                message: format!("the file has more than {MAX_NODES} YAML nodes"),
            });
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(root)
}

/// Applies the merge keys of one mapping: each `<<` entry (a plain key) gives a mapping,
/// or a list of mappings, whose entries are added unless the mapping already has their
/// key. Explicit entries win, then earlier sources over later ones (the YAML merge-key
/// rule); a merged entry keeps the position where it was written. Each entry moves at
/// most once per mapping, so the work is linear in the mapping's size.
fn apply_merge_keys(entries: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, YamlError> {
    let is_merge =
        |key: &Node| matches!(&key.kind, Kind::Scalar { value, plain: true } if value == "<<");
    if !entries.iter().any(|(k, _)| is_merge(k)) {
        return Ok(entries);
    }
    let mut own = Vec::with_capacity(entries.len());
    let mut sources = Vec::new();
    for (key, value) in entries {
        if is_merge(&key) {
            match value.kind {
                Kind::Map(_) => sources.push(value),
                Kind::Seq(items) => {
                    for item in items {
                        if !matches!(item.kind, Kind::Map(_)) {
                            return Err(YamlError {
                                pos: item.pos,
                                message: format!("each entry of a merge key (<<) must be a mapping, like *defaults; found {}", item.type_name()),
                            });
                        }
                        sources.push(item);
                    }
                }
                Kind::Scalar { .. } => {
                    return Err(YamlError {
                        pos: value.pos,
                        message: format!("a merge key (<<) takes a mapping or a list of mappings, like <<: *defaults; found {}", value.type_name()),
                    })
                }
            }
        } else {
            own.push((key, value));
        }
    }
    let key_text = |key: &Node| match &key.kind {
        Kind::Scalar { value, .. } => Some(value.clone()),
        _ => None,
    };
    let mut present: std::collections::HashSet<String> =
        own.iter().filter_map(|(k, _)| key_text(k)).collect();
    for source in sources {
        if let Kind::Map(merged) = source.kind {
            for (key, value) in merged {
                let fresh = key_text(&key).is_none_or(|text| present.insert(text));
                if fresh {
                    own.push((key, value));
                }
            }
        }
    }
    Ok(own)
}

fn push_frame(stack: &mut Vec<Frame>, frame: Frame, pos: Pos) -> Result<(), YamlError> {
    if stack.len() >= MAX_DEPTH {
        return Err(YamlError {
            pos,
            message: format!("nesting is deeper than {MAX_DEPTH} levels"),
        });
    }
    stack.push(frame);
    Ok(())
}

fn count_nodes(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count_nodes(k) + count_nodes(v))
                .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn positions_are_one_based() {
        let root = load("a:\n  b: [1, x]\n", 0)
            .expect("valid")
            .expect("non-empty");
        let Kind::Map(entries) = &root.kind else {
            panic!("mapping expected")
        };
        assert_eq!(entries[0].0.pos, Pos::start(0));
        let Kind::Map(inner) = &entries[0].1.kind else {
            panic!("mapping expected")
        };
        assert_eq!(
            inner[0].0.pos,
            Pos {
                file: 0,
                line: 2,
                column: 3
            }
        );
        let Kind::Seq(items) = &inner[0].1.kind else {
            panic!("list expected")
        };
        assert_eq!(
            items[1].pos,
            Pos {
                file: 0,
                line: 2,
                column: 10
            }
        );
    }

    #[test]
    fn depth_is_bounded() {
        let text = "[".repeat(200);
        let err = load(&text, 0).expect_err("too deep");
        assert!(err.message.contains("nesting"), "{}", err.message);
    }

    #[test]
    fn alias_depth_is_bounded() {
        let mut text = String::new();
        let nest = "[".repeat(40);
        let close = "]".repeat(40);
        writeln!(text, "a0: &a0 {nest}x{close}").expect("writing to a String cannot fail");
        for level in 1..10 {
            let prev = level - 1;
            writeln!(text, "a{level}: &a{level} {nest}*a{prev}{close}")
                .expect("writing to a String cannot fail");
        }
        let err = load(&text, 0).expect_err("too deep through aliases");
        assert!(err.message.contains("through aliases"), "{}", err.message);
    }

    #[test]
    fn alias_bombs_are_bounded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let prev = level - 1;
            writeln!(
                text,
                "a{level}: &a{level} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]"
            )
            .expect("writing to a String cannot fail");
        }
        let err = load(&text, 0).expect_err("too many nodes");
        assert!(err.message.contains("nodes"), "{}", err.message);
    }

    fn map_of(node: &Node) -> Vec<(String, String, Pos)> {
        let Kind::Map(entries) = &node.kind else {
            panic!("mapping expected")
        };
        entries
            .iter()
            .map(|(k, v)| {
                let text = |n: &Node| match &n.kind {
                    Kind::Scalar { value, .. } => value.clone(),
                    _ => "?".to_owned(),
                };
                (text(k), text(v), v.pos)
            })
            .collect()
    }

    #[test]
    fn merge_keys_add_missing_entries_with_their_positions() {
        let text = "base: &base { a: 1, b: 2 }\nmore: &more { b: 3, c: 4 }\none:\n  <<: *base\n  a: 9\nlist:\n  <<: [*more, *base]\n";
        let root = load(text, 0).expect("valid").expect("non-empty");
        let Kind::Map(top) = &root.kind else {
            panic!("mapping expected")
        };
        let one = map_of(&top[2].1);
        let names: Vec<(&str, &str)> = one
            .iter()
            .map(|(k, v, _)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(names, [("a", "9"), ("b", "2")]);
        // b's value keeps the position where it was written, in the anchor.
        assert_eq!((one[1].2.line, one[1].2.column), (1, 24));
        let list = map_of(&top[3].1);
        let names: Vec<(&str, &str)> = list
            .iter()
            .map(|(k, v, _)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(names, [("b", "3"), ("c", "4"), ("a", "1")]);
    }

    #[test]
    fn merge_keys_of_the_wrong_type_are_refused_at_their_node() {
        for (text, line, column) in [("a:\n  <<: 3\n", 2, 7), ("a:\n  <<: [x]\n", 2, 8)] {
            let err = load(text, 0).expect_err(text);
            assert!(err.message.contains("merge key"), "{}", err.message);
            assert_eq!((err.pos.line, err.pos.column), (line, column), "{text}");
        }
        // A quoted "<<" is an ordinary key.
        let root = load("a: { \"<<\": 3 }\n", 0)
            .expect("valid")
            .expect("non-empty");
        let Kind::Map(top) = &root.kind else {
            panic!("mapping expected")
        };
        assert_eq!(map_of(&top[0].1)[0].0, "<<");
    }
}
