//! Parsing human durations typed on the command line (`30s`, `500ms`, `2m`, `1h`).

use std::time::Duration;

/// Why a duration flag could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: expected a number with a unit, e.g. 500ms, 30s, 2m or 1h")]
    Invalid(String),
    #[error("duration {0:?} must be greater than zero")]
    Zero(String),
}

/// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let invalid = || DurationError::Invalid(text.to_owned());
    let value: u64 = number.parse().map_err(|_| invalid())?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(invalid)?),
        "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(invalid)?),
        _ => return Err(invalid()),
    };
    if duration.is_zero() {
        return Err(DurationError::Zero(text.to_owned()));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_read() {
        let cases = [
            ("30s", 30_000),
            ("500ms", 500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("7", 7_000),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
    }

    #[test]
    fn garbage_and_zero_are_refused_by_name() {
        for bad in ["", "s", "3 days", "1.5s", "-1s", "10x"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(matches!(err, DurationError::Invalid(_)), "{bad}: {err}");
        }
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero("0s".into())));
    }
}
