//! Test and coverage reports (`reports: { junit: [GLOBS], coverage: FILE }`): the files
//! an agent sends after a job on a `StreamOpen::Reports` stream, and the summary the
//! coordinator reads from them, stores beside the job and shows.
//!
//! The agent only selects and sends files (each at most [`MAX_REPORT_FILE_BYTES`], at
//! most [`MAX_REPORT_FILES`]); the coordinator parses them (`gantry-reports`), bounded
//! by the limits below, and keeps a summary of bounded size whatever the files hold.

use serde::{Deserialize, Serialize};

use crate::Attempt;

/// Largest report file an agent sends: one frame holds it (frames are at most 4 MiB). A
/// larger file is not sent; the summary says so.
pub const MAX_REPORT_FILE_BYTES: usize = 3 * 1024 * 1024;
/// Report files one job sends (every JUnit glob's matches and the coverage file).
pub const MAX_REPORT_FILES: usize = 64;
/// Test cases counted over all of a job's JUnit files; past this the rest of the files
/// are not read and the summary says so.
pub const MAX_TEST_CASES: u64 = 200_000;
/// Failed tests kept with their name and output; the rest are counted only.
pub const MAX_KEPT_FAILURES: usize = 50;
/// Bytes of a failed test's output (its message, then its text, then its captured
/// stdout and stderr) kept; the rest is cut with a mark.
pub const MAX_FAILURE_OUTPUT_BYTES: usize = 4 * 1024;
/// Bytes of a test's name (`classname.name`) kept.
pub const MAX_TEST_NAME_BYTES: usize = 512;
/// Notes kept (problems with files: malformed, too large, matched nothing).
pub const MAX_REPORT_NOTES: usize = 16;
/// Bytes of one note.
pub const MAX_NOTE_BYTES: usize = 512;

/// Which parser a report file goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportKind {
    /// A JUnit XML file (`<testsuites>` or `<testsuite>`).
    Junit,
    /// A coverage file: Cobertura XML or LCOV, told apart by its content.
    Coverage,
}

/// Agent to coordinator on a `StreamOpen::Reports` stream, after the open: files and
/// notes in any order, then `End`. The coordinator answers one [`ReportsStored`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportUpload {
    /// A report file: its workspace-relative path and its bytes (at most
    /// [`MAX_REPORT_FILE_BYTES`]).
    File {
        kind: ReportKind,
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Something the agent could not send (a glob matched nothing, a file too large).
    Note(String),
    /// Every file was sent.
    End,
}

/// Coordinator to agent: the reports were read and the summary stored (durably), or
/// why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportsStored {
    Stored(TestReport),
    Refused { message: String },
}

/// What a job's reports say, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TestReport {
    /// The attempt whose files these are.
    pub attempt: Attempt,
    /// Report files read (JUnit and coverage).
    pub files: u32,
    pub passed: u64,
    /// Test cases with a `<failure>` or an `<error>`.
    pub failed: u64,
    pub skipped: u64,
    /// The first [`MAX_KEPT_FAILURES`] failed tests, in file order.
    pub failures: Vec<TestFailure>,
    /// Line coverage, when a coverage file was read.
    pub coverage: Option<Coverage>,
    /// Problems met reading the files (malformed XML, a file too large, limits reached).
    pub notes: Vec<String>,
}

impl TestReport {
    /// Test cases counted.
    pub fn total(&self) -> u64 {
        self.passed + self.failed + self.skipped
    }

    /// One line: "3 passed, 1 failed, 0 skipped; coverage 81.25%".
    pub fn summary(&self) -> String {
        let mut line = if self.total() > 0 || self.coverage.is_none() {
            format!(
                "{} passed, {} failed, {} skipped",
                self.passed, self.failed, self.skipped
            )
        } else {
            String::new()
        };
        if let Some(c) = &self.coverage {
            if !line.is_empty() {
                line.push_str("; ");
            }
            line.push_str("coverage ");
            line.push_str(&c.percent());
        }
        line
    }
}

/// One failed test.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TestFailure {
    /// `classname.name` (or `name` alone), at most [`MAX_TEST_NAME_BYTES`].
    pub name: String,
    /// The report file it came from.
    pub file: String,
    /// `<error>` rather than `<failure>`.
    pub error: bool,
    /// The failure's message, text and the test's captured output, at most
    /// [`MAX_FAILURE_OUTPUT_BYTES`].
    pub output: String,
}

/// Line coverage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Coverage {
    /// The line rate in hundredths of a percent (0 to 10,000).
    pub basis_points: u32,
    /// Lines covered and lines counted, when the file says (LCOV always does).
    pub lines_covered: u64,
    pub lines_valid: u64,
}

impl Coverage {
    /// From lines covered of lines counted (no lines: 0%).
    pub fn from_lines(covered: u64, valid: u64) -> Self {
        let covered = covered.min(valid);
        let basis_points = if valid == 0 {
            0
        } else {
            u32::try_from(u128::from(covered) * 10_000 / u128::from(valid)).unwrap_or(10_000)
        };
        Self {
            basis_points,
            lines_covered: covered,
            lines_valid: valid,
        }
    }

    /// "81.25%".
    pub fn percent(&self) -> String {
        format!(
            "{}.{:02}%",
            self.basis_points / 100,
            self.basis_points % 100
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_is_shown_in_hundredths_of_a_percent() {
        assert_eq!(Coverage::from_lines(13, 16).percent(), "81.25%");
        assert_eq!(Coverage::from_lines(0, 0).percent(), "0.00%");
        assert_eq!(Coverage::from_lines(5, 3).percent(), "100.00%");
        let report = TestReport {
            passed: 3,
            failed: 1,
            coverage: Some(Coverage::from_lines(1, 3)),
            ..TestReport::default()
        };
        assert_eq!(
            report.summary(),
            "3 passed, 1 failed, 0 skipped; coverage 33.33%"
        );
    }
}
