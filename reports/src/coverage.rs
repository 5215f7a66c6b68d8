//! Line coverage from Cobertura XML (`<coverage line-rate= lines-covered= lines-valid=>`,
//! what coverage.py, gcovr, cargo-llvm-cov and istanbul's `cobertura` reporter write),
//! JaCoCo XML (the report's own `<counter type="LINE">`) or LCOV (`LF:`/`LH:` per source
//! file, or `DA:` lines where those are missing). XML is told from LCOV by its first
//! character.

use gantry_protocol::Coverage;

use crate::{check_size, cut, parse_xml, text, ReportError};

/// Reads a coverage file into a line rate.
pub fn read(data: &[u8]) -> Result<Coverage, ReportError> {
    check_size(data)?;
    let text = text(data);
    if text.trim_start().starts_with('<') {
        xml(&text)
    } else {
        lcov(&text)
    }
}

fn xml(text: &str) -> Result<Coverage, ReportError> {
    let doc = parse_xml(text)?;
    let root = doc.root_element();
    match root.tag_name().name() {
        "coverage" => {
            let number = |name| {
                root.attribute(name)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(covered), Some(valid)) = (number("lines-covered"), number("lines-valid")) {
                if valid > 0 {
                    return Ok(Coverage::from_lines(covered, valid));
                }
            }
            let rate = root
                .attribute("line-rate")
                .and_then(|r| r.trim().parse::<f64>().ok())
                .filter(|r| r.is_finite())
                .ok_or(ReportError::NoLineRate)?;
            // A rate of 0 to 1 in basis points; the cast is of a value clamped to 0..=10,000.
            #[allow(clippy::cast_sign_loss)]
            let basis_points = (rate.clamp(0.0, 1.0) * 10_000.0).round() as u32;
            Ok(Coverage {
                basis_points,
                lines_covered: number("lines-covered").unwrap_or(0),
                lines_valid: number("lines-valid").unwrap_or(0),
            })
        }
        "report" => {
            let counter = root
                .children()
                .filter(|n| n.is_element() && n.tag_name().name() == "counter")
                .find(|n| n.attribute("type") == Some("LINE"))
                .ok_or(ReportError::NoLineRate)?;
            let number = |name| {
                counter
                    .attribute(name)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let (Some(missed), Some(covered)) = (number("missed"), number("covered")) else {
                return Err(ReportError::NoLineRate);
            };
            Ok(Coverage::from_lines(
                covered,
                covered.saturating_add(missed),
            ))
        }
        other => Err(ReportError::NotCoverageXml(cut(other, 64))),
    }
}

fn lcov(text: &str) -> Result<Coverage, ReportError> {
    // Per source file: its LF/LH totals when given, else its DA lines counted.
    let (mut valid, mut covered) = (0u64, 0u64);
    let (mut lf, mut lh, mut da, mut da_hit) = (None::<u64>, None::<u64>, 0u64, 0u64);
    let mut seen = false;
    let mut end_record =
        |lf: &mut Option<u64>, lh: &mut Option<u64>, da: &mut u64, hit: &mut u64| {
            if let (Some(f), Some(h)) = (lf.take(), lh.take()) {
                valid = valid.saturating_add(f);
                covered = covered.saturating_add(h.min(f));
            } else {
                valid = valid.saturating_add(*da);
                covered = covered.saturating_add(*hit);
            }
            (*da, *hit) = (0, 0);
        };
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("LF:") {
            lf = v.trim().parse().ok();
            seen = true;
        } else if let Some(v) = line.strip_prefix("LH:") {
            lh = v.trim().parse().ok();
            seen = true;
        } else if let Some(v) = line.strip_prefix("DA:") {
            seen = true;
            da += 1;
            let hits = v.split(',').nth(1).map(str::trim);
            if hits.is_some_and(|h| h != "0" && h != "-") {
                da_hit += 1;
            }
        } else if line == "end_of_record" {
            end_record(&mut lf, &mut lh, &mut da, &mut da_hit);
        }
    }
    end_record(&mut lf, &mut lh, &mut da, &mut da_hit);
    if !seen {
        return Err(ReportError::NotLcov);
    }
    Ok(Coverage::from_lines(covered, valid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cobertura_prefers_line_counts_and_falls_back_to_the_rate() {
        let c = read(br#"<?xml version="1.0"?><coverage line-rate="0.5" lines-covered="13" lines-valid="16"><packages/></coverage>"#).expect("reads");
        assert_eq!(c.percent(), "81.25%");
        let c = read(br#"<coverage line-rate="0.8547"/>"#).expect("reads");
        assert_eq!(c.percent(), "85.47%");
        let e = read(b"<coverage/>").expect_err("no rate");
        assert!(matches!(e, ReportError::NoLineRate));
        let e = read(b"<html/>").expect_err("not coverage");
        assert!(e.to_string().contains("<html>"), "{e}");
    }

    #[test]
    fn jacoco_reads_the_reports_line_counter() {
        let xml = br#"<report name="x"><package name="p"><counter type="LINE" missed="100" covered="0"/></package><counter type="INSTRUCTION" missed="1" covered="1"/><counter type="LINE" missed="1" covered="3"/></report>"#;
        assert_eq!(read(xml).expect("reads").percent(), "75.00%");
    }

    #[test]
    fn lcov_sums_records_and_counts_da_lines_without_totals() {
        let lcov = "TN:\nSF:a.rs\nDA:1,1\nDA:2,0\nLF:2\nLH:1\nend_of_record\nSF:b.rs\nDA:1,5\nDA:2,0\nDA:3,1\nend_of_record\n";
        let c = read(lcov.as_bytes()).expect("reads");
        assert_eq!((c.lines_covered, c.lines_valid), (3, 5));
        assert_eq!(c.percent(), "60.00%");
        assert!(matches!(read(b"hello\n"), Err(ReportError::NotLcov)));
    }
}
