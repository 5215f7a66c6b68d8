//! A pipeline file together with the files it includes or calls, as one text.
//!
//! A run keeps its pipeline as one text, which the coordinator parses again whenever it
//! needs the model (at dispatch, for artifact scopes, deployments, retries, after a
//! restart). A pipeline that includes other files cannot be parsed again from its top
//! file alone: the repository (or the local directory) it came from is not at hand, and
//! may have changed since. So the caller that can read the other files ([`bundle`]: the
//! CLI from its directory, the coordinator from the commit) stores the top file and
//! every other file the load read, verbatim, in one text; [`crate::parse`] recognises it
//! and loads it with those files only. Keeping the files verbatim (rather than writing
//! the merged tree back as YAML) keeps every position, so an error found later still
//! names the file, line and column the user wrote.
//!
//! # Format
//!
//! ```text
//! #gantry-bundle/1
//! PATH\nLENGTH\nTEXT\n        (the top file first, then each other file read)
//! ```
//!
//! `LENGTH` is TEXT's length in bytes, in decimal. The first line is a YAML comment, so
//! a bundle is never mistaken for a file that means something else; a file that starts
//! with it and is not a well-formed bundle is refused with a message saying so. Decoding
//! is one pass, bounded by [`MAX_FILES`] entries and the text's own length.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use crate::load::MAX_FILE_SIZE;
use crate::reuse::{Resolver, MAX_FILES, MAX_TOTAL_BYTES};
use crate::{Errors, Pipeline};

/// The first line of a bundle.
pub const BUNDLE_HEADER: &str = "#gantry-bundle/1\n";

/// Loads `text` (the file `file_name`, its path in the repository) reading other files
/// through `resolver`, and returns the outcome with the text to store and parse again
/// later: `text` itself when no other file was read, else a bundle of the top file and
/// every file read. The bundle is returned even when the load fails, so that parsing it
/// again reports the same problems at the same places (a file the resolver could not
/// read is then reported as missing from the bundle).
pub fn bundle(
    file_name: &str,
    text: &str,
    resolver: &dyn Resolver,
) -> (Result<Pipeline, Errors>, String) {
    let recording = Recording {
        inner: resolver,
        read: RefCell::new(BTreeMap::new()),
        bytes: RefCell::new(0),
    };
    let loaded = crate::load::load(file_name, text, &recording);
    let read = recording.read.into_inner();
    if read.is_empty() {
        return (loaded, text.to_owned());
    }
    let mut out = String::with_capacity(
        BUNDLE_HEADER.len() + text.len() + read.values().map(String::len).sum::<usize>() + 64,
    );
    out.push_str(BUNDLE_HEADER);
    push_entry(&mut out, file_name, text);
    for (path, body) in &read {
        push_entry(&mut out, path, body);
    }
    (loaded, out)
}

fn push_entry(out: &mut String, path: &str, text: &str) {
    out.push_str(path);
    out.push('\n');
    out.push_str(&text.len().to_string());
    out.push('\n');
    out.push_str(text);
    out.push('\n');
}

/// A resolver that remembers what it handed over (within the loader's own limits, so a
/// bundle is never larger than a load may read).
struct Recording<'r> {
    inner: &'r dyn Resolver,
    read: RefCell<BTreeMap<String, String>>,
    bytes: RefCell<usize>,
}

impl Resolver for Recording<'_> {
    fn read_file(&self, path: &str) -> Result<String, String> {
        let text = self.inner.read_file(path)?;
        let mut bytes = self.bytes.borrow_mut();
        let mut read = self.read.borrow_mut();
        if text.len() <= MAX_FILE_SIZE
            && *bytes + text.len() <= MAX_TOTAL_BYTES
            && read.len() < MAX_FILES
            && !read.contains_key(path)
        {
            *bytes += text.len();
            read.insert(path.to_owned(), text.clone());
        }
        Ok(text)
    }
}

/// Why a text that starts like a bundle is not one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("entry {entry} is cut short; the bundle ends in the middle of it")]
    Truncated { entry: usize },
    #[error("entry {entry} has no valid length line (a decimal byte count)")]
    BadLength { entry: usize },
    #[error("entry {entry}'s text does not end where its length says")]
    BadEnd { entry: usize },
    #[error("the bundle holds more than {MAX_FILES} files")]
    TooManyFiles,
    #[error("the bundle names {path} twice")]
    Duplicate { path: String },
    #[error("the bundle holds no file")]
    Empty,
}

/// A decoded bundle: the top file's path and text, and the other files by path.
pub(crate) struct Decoded<'t> {
    pub top: (&'t str, &'t str),
    pub others: HashMap<String, String>,
}

/// Decodes a text that starts with [`BUNDLE_HEADER`]; `None` if it does not.
pub(crate) fn decode(text: &str) -> Option<Result<Decoded<'_>, BundleError>> {
    let mut rest = text.strip_prefix(BUNDLE_HEADER)?;
    let mut entries: Vec<(&str, &str)> = Vec::new();
    while !rest.is_empty() {
        let entry = entries.len() + 1;
        if entries.len() >= MAX_FILES {
            return Some(Err(BundleError::TooManyFiles));
        }
        let Some((path, after)) = rest.split_once('\n') else {
            return Some(Err(BundleError::Truncated { entry }));
        };
        let Some((length, after)) = after.split_once('\n') else {
            return Some(Err(BundleError::Truncated { entry }));
        };
        let Some(length) = length
            .parse::<usize>()
            .ok()
            .filter(|_| length.bytes().all(|b| b.is_ascii_digit()))
        else {
            return Some(Err(BundleError::BadLength { entry }));
        };
        let (Some(body), Some(after)) = (after.get(..length), after.get(length..)) else {
            return Some(Err(BundleError::Truncated { entry }));
        };
        let Some(after) = after.strip_prefix('\n') else {
            return Some(Err(BundleError::BadEnd { entry }));
        };
        if entries.iter().any(|(p, _)| *p == path) {
            return Some(Err(BundleError::Duplicate {
                path: path.to_owned(),
            }));
        }
        entries.push((path, body));
        rest = after;
    }
    let mut entries = entries.into_iter();
    let Some(top) = entries.next() else {
        return Some(Err(BundleError::Empty));
    };
    Some(Ok(Decoded {
        top,
        others: entries.map(|(p, t)| (p.to_owned(), t.to_owned())).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> HashMap<String, String> {
        list.iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect()
    }

    #[test]
    fn a_file_that_reads_no_other_is_kept_as_it_is() {
        let text = "jobs: { a: { steps: [{ run: x }] } }\n";
        let (loaded, stored) = bundle("gantry.yml", text, &files(&[]));
        assert!(loaded.is_ok());
        assert_eq!(stored, text);
    }

    #[test]
    fn a_bundle_parses_again_alone_to_the_same_pipeline() {
        let repo = files(&[
            (
                "ci/base.yml",
                "include: ci/more.yml\njobs:\n  .base: { runs-on: linux, env: { A: \"1\" } }\n",
            ),
            (
                "ci/more.yml",
                "jobs: { lint: { steps: [{ run: lint }] } }\n",
            ),
            ("unused.yml", "jobs: {}\n"),
        ]);
        let top = "include: ci/base.yml\njobs:\n  test: { extends: .base, steps: [{ run: \"echo $A\" }] }\n";
        let (loaded, stored) = bundle("gantry.yml", top, &repo);
        let first = loaded.expect("valid");
        assert!(stored.starts_with(BUNDLE_HEADER), "{stored}");
        assert!(!stored.contains("unused.yml"), "{stored}");
        let again = crate::parse("gantry.yml", &stored).expect("the bundle parses alone");
        assert_eq!(format!("{first:?}"), format!("{again:?}"));
        assert_eq!(
            again
                .jobs
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>(),
            ["lint", "test"]
        );
    }

    #[test]
    fn an_error_in_an_included_file_is_found_again_at_its_place() {
        let repo = files(&[("ci/base.yml", "jobs:\n  lint: { stepz: [] }\n")]);
        let top = "include: ci/base.yml\njobs: { a: { steps: [{ run: x }] } }\n";
        let (loaded, stored) = bundle("gantry.yml", top, &repo);
        let first = loaded.expect_err("invalid");
        let again = crate::parse("gantry.yml", &stored).expect_err("still invalid");
        assert_eq!(first, again);
        assert!(
            first.0.iter().any(
                |e| (e.file.as_str(), e.line, e.column) == ("ci/base.yml", 2, 11)
                    && e.message.contains("unknown key \"stepz\"")
            ),
            "{first}"
        );
    }

    #[test]
    fn damaged_bundles_are_refused_not_misread() {
        let good = format!("{BUNDLE_HEADER}a.yml\n3\nx: \n");
        assert!(decode(&good).expect("a bundle").is_ok());
        for (text, error) in [
            (
                format!("{BUNDLE_HEADER}a.yml\n30\nx: \n"),
                BundleError::Truncated { entry: 1 },
            ),
            (
                format!("{BUNDLE_HEADER}a.yml\n-3\nx: \n"),
                BundleError::BadLength { entry: 1 },
            ),
            (
                format!("{BUNDLE_HEADER}a.yml\n+3\nx: \n"),
                BundleError::BadLength { entry: 1 },
            ),
            (
                format!("{BUNDLE_HEADER}a.yml\n2\nx: \n"),
                BundleError::BadEnd { entry: 1 },
            ),
            (
                format!("{BUNDLE_HEADER}a.yml\n3\nx: \na.yml\n0\n\n"),
                BundleError::Duplicate {
                    path: "a.yml".into(),
                },
            ),
            (BUNDLE_HEADER.to_owned(), BundleError::Empty),
            (
                format!("{BUNDLE_HEADER}a.yml"),
                BundleError::Truncated { entry: 1 },
            ),
            // A length that cuts a character in two.
            (
                format!("{BUNDLE_HEADER}a.yml\n1\né\n"),
                BundleError::Truncated { entry: 1 },
            ),
        ] {
            assert_eq!(
                decode(&text).expect("a bundle").err(),
                Some(error),
                "{text}"
            );
        }
        let mut many = BUNDLE_HEADER.to_owned();
        for i in 0..=MAX_FILES {
            push_entry(&mut many, &format!("f{i}.yml"), "");
        }
        assert_eq!(
            decode(&many).expect("a bundle").err(),
            Some(BundleError::TooManyFiles)
        );
        let errors =
            crate::parse("gantry.yml", &format!("{BUNDLE_HEADER}a.yml\n9\n")).expect_err("refused");
        assert!(
            errors.0[0].message.contains("damaged"),
            "{}",
            errors.0[0].message
        );
    }
}
