//! Reading the file a step writes its outputs to (`$GANTRY_OUTPUT`), pure.
//!
//! The format is GitHub Actions' `$GITHUB_OUTPUT`, so steps written for it work as they
//! are: one `NAME=VALUE` per line, or a multi-line value between `NAME<<DELIMITER` and a
//! line holding only `DELIMITER`. Blank lines are ignored; a name written twice keeps
//! its last value. Everything is bounded by `protocol::limits` (file size, names per
//! step, name, value and delimiter lengths); a line that is neither form, or a value
//! over its limit, is refused with its line number and how to write it instead.

use std::collections::BTreeMap;

use gantry_protocol::limits::{
    MAX_OUTPUT_DELIMITER_LEN, MAX_OUTPUT_FILE_BYTES, MAX_OUTPUT_VALUE_BYTES, MAX_STEP_OUTPUTS,
};

/// Why a `$GANTRY_OUTPUT` file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputFileError {
    #[error("$GANTRY_OUTPUT is {0} bytes; the most a step may write is {MAX_OUTPUT_FILE_BYTES} (put larger data in an artifact)")]
    TooLarge(u64),
    #[error("$GANTRY_OUTPUT is not UTF-8 text")]
    NotText,
    #[error("$GANTRY_OUTPUT line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("$GANTRY_OUTPUT holds more than {MAX_STEP_OUTPUTS} names")]
    TooMany,
}

/// Parses a step's output file: names to values.
pub fn parse_output_file(bytes: &[u8]) -> Result<BTreeMap<String, String>, OutputFileError> {
    if bytes.len() > MAX_OUTPUT_FILE_BYTES {
        return Err(OutputFileError::TooLarge(bytes.len() as u64));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| OutputFileError::NotText)?;
    let mut outputs = BTreeMap::new();
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut number = 0;
    let problem = |line: usize, problem: String| OutputFileError::Line { line, problem };
    while let Some(line) = lines.next() {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let equals = line.find('=');
        let heredoc = line.find("<<");
        let (name, value) = match (equals, heredoc) {
            (Some(eq), h) if h.is_none_or(|h| eq < h) => (&line[..eq], line[eq + 1..].to_owned()),
            (_, Some(h)) => {
                let (name, delimiter) = (&line[..h], &line[h + 2..]);
                if delimiter.is_empty() || delimiter.len() > MAX_OUTPUT_DELIMITER_LEN {
                    return Err(problem(
                        number,
                        format!("the delimiter after << must be 1 to {MAX_OUTPUT_DELIMITER_LEN} bytes, e.g. {name}<<EOF"),
                    ));
                }
                let start = number;
                let mut value: Vec<&str> = Vec::new();
                loop {
                    let Some(next) = lines.next() else {
                        return Err(problem(
                            start,
                            format!("`{name}<<{delimiter}` is never closed: end the value with a line holding only {delimiter}"),
                        ));
                    };
                    number += 1;
                    if next == delimiter {
                        break;
                    }
                    value.push(next);
                }
                (name, value.join("\n"))
            }
            _ => {
                return Err(problem(
                    number,
                    format!(
                        "expected NAME=VALUE or NAME<<DELIMITER, found `{}`",
                        shorten(line)
                    ),
                ))
            }
        };
        if !gantry_protocol::is_output_name(name) {
            return Err(problem(
                number,
                format!("output name `{}` must be 1 to 64 letters, digits, _ and -, starting with a letter or _", shorten(name)),
            ));
        }
        if value.len() > MAX_OUTPUT_VALUE_BYTES {
            return Err(problem(
                number,
                format!(
                    "the value of {name} is {} bytes; the most is {MAX_OUTPUT_VALUE_BYTES} (put larger data in an artifact)",
                    value.len()
                ),
            ));
        }
        outputs.insert(name.to_owned(), value);
        if outputs.len() > MAX_STEP_OUTPUTS {
            return Err(OutputFileError::TooMany);
        }
    }
    Ok(outputs)
}

/// At most 60 characters of `text`, for an error message.
fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, String)> {
        parse_output_file(text.as_bytes())
            .expect("parses")
            .into_iter()
            .collect()
    }

    #[test]
    fn both_forms_are_read_as_github_writes_them() {
        assert_eq!(
            parsed("version=1.2.3\r\n\nnotes<<EOF\nline one\nline=two\n\nEOF\nurl=http://x/?a=b\nversion=1.2.4\n"),
            vec![
                ("notes".to_owned(), "line one\nline=two\n".to_owned()),
                ("url".to_owned(), "http://x/?a=b".to_owned()),
                ("version".to_owned(), "1.2.4".to_owned()),
            ]
        );
        // `=` before `<<` is a plain value holding "<<".
        assert_eq!(parsed("a=b<<c"), vec![("a".to_owned(), "b<<c".to_owned())]);
        assert_eq!(
            parsed("empty=\n"),
            vec![("empty".to_owned(), String::new())]
        );
        assert!(parsed("").is_empty());
    }

    #[test]
    fn malformed_files_are_refused_with_the_line_and_the_fix() {
        let cases = [
            (
                "ok=1\njust text\n",
                "line 2: expected NAME=VALUE or NAME<<DELIMITER, found `just text`",
            ),
            ("v<<EOF\nnever closed\n", "line 1: `v<<EOF` is never closed"),
            ("v<<\nx\n", "line 1: the delimiter after << must be"),
            ("9lives=1", "line 1: output name `9lives` must be"),
            ("my var=1", "output name `my var`"),
        ];
        for (text, needle) in cases {
            let message = parse_output_file(text.as_bytes())
                .expect_err(text)
                .to_string();
            assert!(message.contains(needle), "{text:?}: {message}");
        }
        let long = format!("big={}", "x".repeat(MAX_OUTPUT_VALUE_BYTES + 1));
        assert!(parse_output_file(long.as_bytes())
            .expect_err("too long")
            .to_string()
            .contains("the value of big is 16385 bytes"));
        let many = "n=v\n".to_owned()
            + &(0..MAX_STEP_OUTPUTS)
                .map(|i| format!("n{i}=v"))
                .collect::<Vec<_>>()
                .join("\n");
        assert_eq!(
            parse_output_file(many.as_bytes()),
            Err(OutputFileError::TooMany)
        );
        assert_eq!(
            parse_output_file(&[b'a', b'=', 0xff]),
            Err(OutputFileError::NotText)
        );
        let huge = vec![b'\n'; MAX_OUTPUT_FILE_BYTES + 1];
        assert!(matches!(
            parse_output_file(&huge),
            Err(OutputFileError::TooLarge(_))
        ));
    }
}
