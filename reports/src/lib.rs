//! Test and coverage reports read into a summary of bounded size: JUnit XML
//! ([`junit`]), Cobertura or JaCoCo XML and LCOV ([`coverage`]).
//!
//! The coordinator reads the files a job's agent sends after the job
//! (`reports: { junit: [GLOBS], coverage: FILE }`); whatever they hold, reading them is
//! bounded and never panics:
//! - a file is at most [`MAX_REPORT_FILE_BYTES`] (the agent sends no larger one) and
//!   becomes a tree of at most [`MAX_XML_NODES`] nodes; a DTD is refused, so no entity
//!   is ever expanded;
//! - at most [`MAX_TEST_CASES`] test cases are counted over a job's files;
//! - at most [`MAX_KEPT_FAILURES`] failed tests are kept, each name cut to
//!   [`MAX_TEST_NAME_BYTES`] and output to [`MAX_FAILURE_OUTPUT_BYTES`];
//! - a file that cannot be read (malformed XML, not a JUnit file) becomes a note of the
//!   summary (at most [`MAX_REPORT_NOTES`]), and the other files still count.
//!
//! **Invariant:** pure: no I/O, no clock; bytes in, a [`TestReport`] out.

pub mod coverage;
pub mod junit;

use gantry_protocol::reports::{
    MAX_FAILURE_OUTPUT_BYTES, MAX_KEPT_FAILURES, MAX_NOTE_BYTES, MAX_REPORT_FILE_BYTES,
    MAX_REPORT_NOTES, MAX_TEST_CASES, MAX_TEST_NAME_BYTES,
};
use gantry_protocol::{Attempt, ReportKind, TestReport};

/// Nodes (elements, text, attributes count apart) one XML file may become. A JUnit file
/// of [`MAX_REPORT_FILE_BYTES`] with short test cases has about 100,000; the tree costs
/// about 50 bytes a node, so this bounds one file's tree to ~25 MB.
pub const MAX_XML_NODES: u32 = 500_000;

/// Why a report file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("is {bytes} bytes; the most read is {MAX_REPORT_FILE_BYTES}")]
    TooLarge { bytes: usize },
    #[error("is not well-formed XML: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("is not a JUnit report: its root element is <{0}>, not <testsuites> or <testsuite>")]
    NotJunit(String),
    #[error("is neither Cobertura nor JaCoCo XML: its root element is <{0}>, not <coverage> or <report>")]
    NotCoverageXml(String),
    #[error("has no line counts: Cobertura needs line-rate (or lines-covered and lines-valid), JaCoCo a LINE counter")]
    NoLineRate,
    #[error("is not LCOV: no LF/LH or DA lines")]
    NotLcov,
}

/// Reads a job's report files one at a time into one [`TestReport`].
#[derive(Debug)]
pub struct Reader {
    report: TestReport,
    cases_left: u64,
    notes_dropped: usize,
}

impl Reader {
    pub fn new(attempt: Attempt) -> Self {
        Self {
            report: TestReport {
                attempt,
                ..TestReport::default()
            },
            cases_left: MAX_TEST_CASES,
            notes_dropped: 0,
        }
    }

    /// Reads one file sent as `kind` from `path`; a problem becomes a note.
    pub fn file(&mut self, kind: ReportKind, path: &str, data: &[u8]) {
        let read = match kind {
            ReportKind::Junit => self.junit(path, data),
            ReportKind::Coverage => coverage::read(data).map(|c| self.report.coverage = Some(c)),
        };
        match read {
            Ok(()) => self.report.files += 1,
            Err(e) => self.note(&format!("{path} {e}")),
        }
    }

    fn junit(&mut self, path: &str, data: &[u8]) -> Result<(), ReportError> {
        if self.cases_left == 0 {
            self.note(&format!(
                "{path} not read: {MAX_TEST_CASES} test cases were counted already"
            ));
            return Ok(());
        }
        let read = junit::read(data, self.cases_left)?;
        self.cases_left -= read.cases();
        self.report.passed += read.passed;
        self.report.failed += read.failed;
        self.report.skipped += read.skipped;
        for mut failure in read.failures {
            if self.report.failures.len() >= MAX_KEPT_FAILURES {
                break;
            }
            failure.file = cut(path, MAX_TEST_NAME_BYTES);
            self.report.failures.push(failure);
        }
        if read.truncated {
            self.note(&format!(
                "{path}: counting stopped at {MAX_TEST_CASES} test cases in all"
            ));
        }
        Ok(())
    }

    /// Adds a note (a problem with a file), cut to [`MAX_NOTE_BYTES`]; past
    /// [`MAX_REPORT_NOTES`] notes, only counted.
    pub fn note(&mut self, note: &str) {
        if self.report.notes.len() + 1 >= MAX_REPORT_NOTES {
            self.notes_dropped += 1;
        } else {
            self.report.notes.push(cut(note, MAX_NOTE_BYTES));
        }
    }

    pub fn finish(mut self) -> TestReport {
        if self.notes_dropped > 0 {
            self.report
                .notes
                .push(format!("{} more notes not kept", self.notes_dropped));
        }
        self.report
    }
}

/// Reads one file alone (the fuzz target's entry).
pub fn read_one(kind: ReportKind, data: &[u8]) -> TestReport {
    let mut reader = Reader::new(1);
    reader.file(kind, "report", data);
    reader.finish()
}

/// `text` cut to at most `max` bytes at a character boundary, with a mark saying how
/// much was cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mark = format!("… ({} bytes cut)", text.len());
    let keep = max.saturating_sub(mark.len());
    let mut end = keep.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + mark.len());
    out.push_str(&text[..end]);
    out.push_str(&mark);
    out
}

/// Appends `piece` to a failure's output unless it is empty, keeping the output within
/// [`MAX_FAILURE_OUTPUT_BYTES`] (plus the cut mark).
pub(crate) fn push_output(output: &mut String, piece: &str) {
    let piece = piece.trim();
    if piece.is_empty() || output.len() >= MAX_FAILURE_OUTPUT_BYTES {
        return;
    }
    if !output.is_empty() {
        output.push('\n');
    }
    let room = MAX_FAILURE_OUTPUT_BYTES.saturating_sub(output.len());
    output.push_str(&cut(piece, room.max(32)));
}

/// Text of an XML file's bytes: UTF-8 (a byte-order mark dropped), invalid sequences
/// replaced rather than refused.
pub(crate) fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    String::from_utf8_lossy(data)
}

/// Parses XML within the bounds: no DTD, at most [`MAX_XML_NODES`] nodes.
pub(crate) fn parse_xml(text: &str) -> Result<roxmltree::Document<'_>, ReportError> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    Ok(roxmltree::Document::parse_with_options(text, options)?)
}

pub(crate) fn check_size(data: &[u8]) -> Result<(), ReportError> {
    if data.len() > MAX_REPORT_FILE_BYTES {
        return Err(ReportError::TooLarge { bytes: data.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_characters_whole_and_says_how_much_was_cut() {
        let text = "é".repeat(100);
        let short = cut(&text, 50);
        assert!(short.len() <= 50, "{short}");
        assert!(short.ends_with("(200 bytes cut)"), "{short}");
        assert_eq!(cut("short", 50), "short");
    }

    #[test]
    fn a_malformed_file_is_a_note_and_the_others_still_count() {
        let mut reader = Reader::new(2);
        reader.file(
            ReportKind::Junit,
            "bad.xml",
            b"<testsuite><testcase name='a'>",
        );
        reader.file(
            ReportKind::Junit,
            "good.xml",
            b"<testsuite><testcase name='a'/><testcase name='b'><skipped/></testcase></testsuite>",
        );
        let report = reader.finish();
        assert_eq!((report.passed, report.failed, report.skipped), (1, 0, 1));
        assert_eq!(report.files, 1);
        assert_eq!(report.attempt, 2);
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        assert!(
            report.notes[0].starts_with("bad.xml is not well-formed XML"),
            "{:?}",
            report.notes
        );
    }

    #[test]
    fn notes_are_bounded() {
        let mut reader = Reader::new(1);
        for i in 0..100 {
            reader.file(ReportKind::Junit, &format!("f{i}.xml"), b"nope");
        }
        let report = reader.finish();
        assert_eq!(report.notes.len(), MAX_REPORT_NOTES);
        assert!(report
            .notes
            .last()
            .is_some_and(|n| n.contains("more notes")));
    }
}
