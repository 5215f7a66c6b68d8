//! JUnit XML: `<testsuites>` or a single `<testsuite>` (suites may nest), each
//! `<testcase>` passed, failed (a `<failure>` or `<error>` child) or skipped (a
//! `<skipped>` child). A failed test keeps its name (`classname.name`) and its output:
//! the failure's `message`, its text, then the test's `<system-out>` and `<system-err>`.
//!
//! The counts are those of the test cases found, not the suites' `tests=`/`failures=`
//! attributes, which tools fill in differently (or not at all).

use gantry_protocol::reports::{MAX_KEPT_FAILURES, MAX_TEST_NAME_BYTES};
use gantry_protocol::TestFailure;
use roxmltree::Node;

use crate::{check_size, cut, parse_xml, push_output, text, ReportError};

/// What one JUnit file says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Junit {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// The first [`MAX_KEPT_FAILURES`] failed tests (their `file` left empty).
    pub failures: Vec<TestFailure>,
    /// Counting stopped at the budget.
    pub truncated: bool,
}

impl Junit {
    pub fn cases(&self) -> u64 {
        self.passed + self.failed + self.skipped
    }
}

/// Reads a JUnit file, counting at most `budget` test cases.
pub fn read(data: &[u8], budget: u64) -> Result<Junit, ReportError> {
    check_size(data)?;
    let text = text(data);
    let doc = parse_xml(&text)?;
    let root = doc.root_element();
    let name = root.tag_name().name();
    if name != "testsuites" && name != "testsuite" {
        return Err(ReportError::NotJunit(cut(name, 64)));
    }
    let mut out = Junit::default();
    for case in root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "testcase")
    {
        if out.cases() >= budget {
            out.truncated = true;
            break;
        }
        let mut failure = None;
        let mut skipped = false;
        for child in case.children().filter(Node::is_element) {
            match child.tag_name().name() {
                "failure" | "error" if failure.is_none() => failure = Some(child),
                "skipped" => skipped = true,
                _ => {}
            }
        }
        match failure {
            Some(f) => {
                out.failed += 1;
                if out.failures.len() < MAX_KEPT_FAILURES {
                    out.failures.push(failed(case, f));
                }
            }
            None if skipped => out.skipped += 1,
            None => out.passed += 1,
        }
    }
    Ok(out)
}

/// A failed test's name and output.
fn failed(case: Node, failure: Node) -> TestFailure {
    let name = case.attribute("name").unwrap_or("(unnamed)");
    let name = match case.attribute("classname").filter(|c| !c.is_empty()) {
        Some(class) => format!("{class}.{name}"),
        None => name.to_owned(),
    };
    let mut output = String::new();
    if let Some(message) = failure.attribute("message") {
        push_output(&mut output, message);
    }
    push_output(&mut output, &element_text(failure));
    for child in case.children().filter(Node::is_element) {
        if matches!(child.tag_name().name(), "system-out" | "system-err") {
            push_output(&mut output, &element_text(child));
        }
    }
    TestFailure {
        name: cut(&name, MAX_TEST_NAME_BYTES),
        file: String::new(),
        error: failure.tag_name().name() == "error",
        output,
    }
}

/// The text (and CDATA) directly inside an element.
fn element_text(node: Node) -> String {
    node.children()
        .filter(Node::is_text)
        .filter_map(|t| t.text())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_protocol::reports::MAX_FAILURE_OUTPUT_BYTES;

    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">
  <testcase classname="tests.test_math" name="test_add" time="0.001"/>
  <testcase classname="tests.test_math" name="test_div" time="0.002">
    <failure message="ZeroDivisionError: division by zero">def test_div():
&gt;       1 / 0
E       ZeroDivisionError</failure>
    <system-out>computing</system-out>
  </testcase>
  <testcase classname="tests.test_math" name="test_skip"><skipped message="later"/></testcase>
  <testsuite name="nested"><testcase name="inner"><error><![CDATA[boom <here>]]></error></testcase></testsuite>
</testsuite></testsuites>"#;

    #[test]
    fn counts_and_failures_of_a_pytest_file() {
        let read = read(PYTEST.as_bytes(), 100).expect("reads");
        assert_eq!((read.passed, read.failed, read.skipped), (1, 2, 1));
        assert!(!read.truncated);
        let div = &read.failures[0];
        assert_eq!(div.name, "tests.test_math.test_div");
        assert!(!div.error);
        assert_eq!(
            div.output,
            "ZeroDivisionError: division by zero\ndef test_div():\n>       1 / 0\nE       ZeroDivisionError\ncomputing"
        );
        let inner = &read.failures[1];
        assert_eq!(inner.name, "inner");
        assert!(inner.error);
        assert_eq!(inner.output, "boom <here>");
    }

    #[test]
    fn the_budget_stops_counting() {
        let read = read(PYTEST.as_bytes(), 2).expect("reads");
        assert_eq!(read.cases(), 2);
        assert!(read.truncated);
    }

    #[test]
    fn output_and_failures_kept_are_bounded() {
        let long = "x".repeat(10_000);
        let mut xml = String::from("<testsuite>");
        for i in 0..(MAX_KEPT_FAILURES + 10) {
            let case = format!(
                "<testcase name='t{i}'><failure message='{long}'>{long}</failure><system-out>{long}</system-out></testcase>"
            );
            xml.push_str(&case);
        }
        xml.push_str("</testsuite>");
        let read = read(xml.as_bytes(), 1_000).expect("reads");
        assert_eq!(read.failed, (MAX_KEPT_FAILURES + 10) as u64);
        assert_eq!(read.failures.len(), MAX_KEPT_FAILURES);
        for f in &read.failures {
            assert!(
                f.output.len() <= MAX_FAILURE_OUTPUT_BYTES + 64,
                "{}",
                f.output.len()
            );
            assert!(f.output.contains("bytes cut"));
        }
    }

    #[test]
    fn what_is_not_junit_is_refused_with_the_reason() {
        let e = read(b"<html><body/></html>", 10).expect_err("not junit");
        assert_eq!(
            e.to_string(),
            "is not a JUnit report: its root element is <html>, not <testsuites> or <testsuite>"
        );
        let e = read(b"<testsuite><testcase>", 10).expect_err("malformed");
        assert!(e.to_string().starts_with("is not well-formed XML"), "{e}");
        let bomb = br#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><testsuite>&lol;</testsuite>"#;
        let e = read(bomb, 10).expect_err("a DTD is refused");
        assert!(e.to_string().contains("DTD"), "{e}");
        assert!(read(&vec![b' '; 4 * 1024 * 1024], 10).is_err());
    }
}
