//! The pieces every table is made of: aligned columns, UTC timestamps, and sizes and
//! durations as people read them.

use std::fmt::Write as _;

use gantry_protocol::UnixMillis;

pub use crate::base::text::{human_bytes, human_duration};

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The rows of a table for [`table`]: `headers`, then one row per item, its cells made
/// by `row`.
pub fn rows_of<T>(
    headers: &[&str],
    items: impl IntoIterator<Item = T>,
    row: impl FnMut(T) -> Vec<String>,
) -> Vec<Vec<String>> {
    let mut rows = vec![headers.iter().map(|h| (*h).to_owned()).collect()];
    rows.extend(items.into_iter().map(row));
    rows
}

/// UTC timestamp `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(t: UnixMillis) -> String {
    t.to_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(UnixMillis(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UnixMillis(1_795_000_000_000)),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0GiB");
        assert_eq!(human_duration(1500), "1s");
        assert_eq!(human_duration(90_000), "1m30s");
        let t = table(&[
            vec!["A".into(), "B".into()],
            vec!["long".into(), "x".into()],
        ]);
        assert_eq!(t, "A     B\nlong  x\n");
    }
}
