//! Five-field cron expressions (minute hour day-of-month month day-of-week), in UTC.
//!
//! This module owns parsing and "next fire time" arithmetic. It reads no clock: the
//! caller passes the time, so the scheduler stays a pure state machine.

use serde::{Deserialize, Serialize};

/// Why a cron expression is refused; each message names the field and what it allows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("cron expression \"{expression}\" has {found} fields; expected 5: minute hour day-of-month month day-of-week")]
    FieldCount { expression: String, found: usize },
    #[error("{field} step \"{part}\" must be between 1 and {max}")]
    Step {
        field: &'static str,
        part: String,
        max: u32,
    },
    #[error("{field} \"{part}\" is out of range; expected values from {min} to {max}")]
    OutOfRange {
        field: &'static str,
        part: String,
        min: u32,
        max: u32,
    },
    #[error("{field} \"{text}\" is not a number, range, list or step")]
    NotANumber { field: &'static str, text: String },
}

/// A parsed cron schedule. Each field is a bit set of the values it allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronSchedule {
    /// The expression as written.
    pub expression: String,
    /// Bit `m` set when minute `m` (0-59) matches.
    pub minutes: u64,
    /// Bit `h` set when hour `h` (0-23) matches.
    pub hours: u32,
    /// Bit `d` set when day of month `d` (1-31) matches.
    pub days_of_month: u32,
    /// Bit `m` set when month `m` (1-12) matches.
    pub months: u16,
    /// Bit `d` set when day of week `d` (0 = Sunday .. 6) matches.
    pub days_of_week: u8,
    /// Whether day-of-month was restricted (not `*`); with day-of-week also restricted,
    /// a day matches when either matches, as in Vixie cron.
    pub day_of_month_restricted: bool,
    /// Whether day-of-week was restricted (not `*`).
    pub day_of_week_restricted: bool,
}

/// Years searched ahead by `next_after` before giving up; `0 0 29 2 *` needs up to 8.
const SEARCH_YEARS: i64 = 10;

impl CronSchedule {
    /// Parses `minute hour day-of-month month day-of-week` with `*`, lists, ranges and
    /// steps. Day-of-week accepts 0-7 (0 and 7 are Sunday).
    pub fn parse(expression: &str) -> Result<CronSchedule, CronError> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(CronError::FieldCount {
                expression: expression.to_owned(),
                found: fields.len(),
            });
        }
        let (minutes, _) = parse_field(fields[0], 0, 59, "minute")?;
        let (hours, _) = parse_field(fields[1], 0, 23, "hour")?;
        let (days_of_month, any_day_of_month) = parse_field(fields[2], 1, 31, "day-of-month")?;
        let (months, _) = parse_field(fields[3], 1, 12, "month")?;
        let (mut days_of_week, any_weekday) = parse_field(fields[4], 0, 7, "day-of-week")?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        Ok(CronSchedule {
            expression: expression.to_owned(),
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week: days_of_week as u8,
            day_of_month_restricted: !any_day_of_month,
            day_of_week_restricted: !any_weekday,
        })
    }

    /// The first time strictly after `unix_secs` (UTC, whole minutes) at which the
    /// schedule fires, or `None` if it never fires in the next ten years (e.g. `0 0 30 2 *`).
    pub fn next_after(&self, unix_secs: u64) -> Option<u64> {
        let start_minute = i64::try_from(unix_secs / 60).ok()?.checked_add(1)?;
        let mut day = start_minute.div_euclid(1440);
        let mut minute_of_day = start_minute.rem_euclid(1440);
        let last_day = day.checked_add(SEARCH_YEARS * 366)?;
        while day <= last_day {
            let (_, month, day_of_month) = civil_from_days(day);
            let weekday = (day + 4).rem_euclid(7); // 1970-01-01 was a Thursday.
            if self.months & (1 << month) != 0 && self.day_matches(day_of_month, weekday) {
                while minute_of_day < 1440 {
                    let hour = minute_of_day / 60;
                    let minute = minute_of_day % 60;
                    if self.hours & (1 << hour) == 0 {
                        minute_of_day = (hour + 1) * 60;
                        continue;
                    }
                    if self.minutes & (1 << minute) != 0 {
                        let secs = day.checked_mul(86_400)?.checked_add(minute_of_day * 60)?;
                        return u64::try_from(secs).ok();
                    }
                    minute_of_day += 1;
                }
            }
            day += 1;
            minute_of_day = 0;
        }
        None
    }

    fn day_matches(&self, day_of_month: i64, weekday: i64) -> bool {
        let dom = self.days_of_month & (1 << day_of_month) != 0;
        let dow = self.days_of_week & (1 << weekday) != 0;
        match (self.day_of_month_restricted, self.day_of_week_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }
}

/// Parses one field into a bit set; the flag says whether it was a bare `*`.
fn parse_field(
    field: &str,
    min: u32,
    max: u32,
    what: &'static str,
) -> Result<(u64, bool), CronError> {
    let mut bits = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = parse_number(step, what)?;
                if step == 0 || step > max {
                    return Err(CronError::Step {
                        field: what,
                        part: part.to_owned(),
                        max,
                    });
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((low, high)) = range.split_once('-') {
            (parse_number(low, what)?, parse_number(high, what)?)
        } else {
            let value = parse_number(range, what)?;
            // `5/15` means from 5 to the end in steps of 15.
            if part.contains('/') {
                (value, max)
            } else {
                (value, value)
            }
        };
        if low < min || high > max || low > high {
            return Err(CronError::OutOfRange {
                field: what,
                part: part.to_owned(),
                min,
                max,
            });
        }
        let mut value = low;
        while value <= high {
            bits |= 1 << value;
            value += step;
        }
    }
    Ok((bits, field == "*"))
}

fn parse_number(text: &str, what: &'static str) -> Result<u32, CronError> {
    let not_a_number = || CronError::NotANumber {
        field: what,
        text: text.to_owned(),
    };
    // At most three digits, so the parse cannot overflow; it is checked all the same.
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_number());
    }
    text.parse().map_err(|_| not_a_number())
}

/// `gantry_protocol::civil_from_days` for the non-negative day numbers cron walks.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let (year, month, day) = gantry_protocol::civil_from_days(days.unsigned_abs());
    // Months (1-12) and days (1-31) are small; a year beyond i64 saturates.
    (
        i64::try_from(year).unwrap_or(i64::MAX),
        month.cast_signed(),
        day.cast_signed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-01-01T00:00:00Z, a Thursday.
    const JAN_1_2026: u64 = 1_767_225_600;

    fn next(expr: &str, from: u64) -> Option<u64> {
        CronSchedule::parse(expr)
            .expect("valid cron")
            .next_after(from)
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            civil_from_days(i64::try_from(JAN_1_2026 / 86_400).expect("fits")),
            (2026, 1, 1)
        );
    }

    #[test]
    fn next_after_known_dates() {
        let cases: &[(&str, u64, u64)] = &[
            // Daily at 03:00.
            ("0 3 * * *", JAN_1_2026, JAN_1_2026 + 3 * 3600),
            // Strictly after: at 03:00 exactly, the next is tomorrow.
            (
                "0 3 * * *",
                JAN_1_2026 + 3 * 3600,
                JAN_1_2026 + 86_400 + 3 * 3600,
            ),
            // Every 15 minutes.
            ("*/15 * * * *", JAN_1_2026 + 60, JAN_1_2026 + 15 * 60),
            // Mondays at 09:30: 2026-01-05.
            (
                "30 9 * * 1",
                JAN_1_2026,
                JAN_1_2026 + 4 * 86_400 + 9 * 3600 + 30 * 60,
            ),
            // Sunday as 7: 2026-01-04.
            ("0 0 * * 7", JAN_1_2026, JAN_1_2026 + 3 * 86_400),
            // First of March: 31 + 28 days later.
            ("0 0 1 3 *", JAN_1_2026, JAN_1_2026 + 59 * 86_400),
            // Ranges and lists: 10:00 on the 2nd.
            (
                "0 10,11 2-3 1 *",
                JAN_1_2026,
                JAN_1_2026 + 86_400 + 10 * 3600,
            ),
            // Day-of-month or day-of-week when both restricted: the 15th or a Friday (Jan 2).
            ("0 0 15 * 5", JAN_1_2026, JAN_1_2026 + 86_400),
            // Leap day: next is 2028-02-29.
            ("0 0 29 2 *", JAN_1_2026, 1_835_395_200),
        ];
        for (expr, from, want) in cases {
            assert_eq!(next(expr, *from), Some(*want), "{expr}");
        }
    }

    #[test]
    fn never_firing_schedule_is_none() {
        assert_eq!(next("0 0 30 2 *", JAN_1_2026), None);
    }

    #[test]
    fn bad_expressions() {
        for (expr, needle) in [
            ("* * * *", "has 4 fields"),
            ("60 * * * *", "minute \"60\" is out of range"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day-of-month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day-of-week"),
            ("*/0 * * * *", "step"),
            ("a * * * *", "is not a number"),
            ("5-1 * * * *", "out of range"),
        ] {
            let err = CronSchedule::parse(expr).expect_err(expr).to_string();
            assert!(err.contains(needle), "{expr}: {err}");
        }
    }
}
