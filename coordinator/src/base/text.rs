//! Sizes and durations as people read them (`3.0GiB`, `1m30s`): the CLI's tables and
//! the notifications' facts print the same figures the same way.

/// Bytes in binary units, one decimal: `512B`, `3.0GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// Milliseconds in the two largest units that matter: `250ms`, `1m30s`, `2d3h`.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 if ms < 1000 => format!("{ms}ms"),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_say_them() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0GiB");
        assert_eq!(human_duration(250), "250ms");
        assert_eq!(human_duration(1500), "1s");
        assert_eq!(human_duration(90_000), "1m30s");
    }
}
