//! Typed ids and timestamps, so an agent id is never passed where a token id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: expected {expected}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static str,
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $hex_len:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(String);

        impl $name {
            /// Prefix that makes the kind of id visible in logs and CLI output.
            pub const PREFIX: &'static str = $prefix;
            /// Number of lower-case hex digits after the prefix.
            pub const HEX_LEN: usize = $hex_len;

            /// Builds the id from random bytes (at least `HEX_LEN / 2` of them).
            pub fn from_random(bytes: &[u8]) -> Self {
                let mut s = String::with_capacity(Self::PREFIX.len() + Self::HEX_LEN);
                s.push_str(Self::PREFIX);
                for b in bytes.iter().take(Self::HEX_LEN / 2) {
                    const DIGITS: &[u8; 16] = b"0123456789abcdef";
                    s.push(char::from(DIGITS[usize::from(b >> 4)]));
                    s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
                }
                Self(s)
            }

            /// Parses and validates an id typed by a user or read from the wire.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                let ok = value
                    .strip_prefix(Self::PREFIX)
                    .is_some_and(|hex| {
                        hex.len() == Self::HEX_LEN
                            && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    });
                if ok {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(IdError {
                        kind: stringify!($name),
                        value: value.chars().take(80).collect(),
                        expected: concat!("\"", $prefix, "\" followed by ", stringify!($hex_len), " lower-case hex digits"),
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

hex_id!(
    /// An enrolled agent, e.g. `ag-3f9c0a12b7e4`. 48 random bits: a fleet of 100,000 agents
    /// has a collision chance near 1 in 56,000, and enrollment re-draws on collision anyway.
    AgentId,
    "ag-",
    12
);
hex_id!(
    /// A join token, e.g. `tk-5b01c2d3e4f5a6b7`. The id is public; the secret is not.
    TokenId,
    "tk-",
    16
);

/// Milliseconds since the Unix epoch. Wall-clock time as carried on the wire and in the
/// store; state machines receive it as a parameter and never read a clock themselves.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Reads the system clock. Call it only at the I/O edges.
    pub fn now() -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    #[must_use]
    pub fn plus_secs(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs.saturating_mul(1000)))
    }

    #[must_use]
    pub fn plus_millis(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// UTC `YYYY-MM-DDTHH:MM:SSZ`, computed with the civil-from-days algorithm so no
    /// time zone database is needed.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0 / 1000;
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn millis_since(self, earlier: Self) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(UnixMillis(0).to_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            UnixMillis(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            UnixMillis(1_798_761_599_999).to_rfc3339(),
            "2026-12-31T23:59:59Z"
        );
    }

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = AgentId::from_random(&[0xab; 6]);
        assert_eq!(id.as_str(), "ag-abababababab");
        assert_eq!(AgentId::parse(id.as_str()), Ok(id));
        for bad in [
            "",
            "ag-",
            "ag-ABABABABABAB",
            "tk-abababababab",
            "ag-abababababa",
            "ag-abababababab0",
        ] {
            let err = AgentId::parse(bad).expect_err(bad);
            assert!(
                err.to_string().contains("12 lower-case hex digits"),
                "{err}"
            );
        }
        assert!(TokenId::parse("tk-0123456789abcdef").is_ok());
    }
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), after Howard Hinnant's
/// `civil_from_days`. The one calendar computation of the workspace (timestamps here,
/// cron in the pipeline crate), so no date crate is needed.
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A pipeline run, numbered from 1 in the order runs were created: `42`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunId(pub u64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for RunId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Self)
            .ok_or_else(|| IdError {
                kind: "RunId",
                value: s.chars().take(80).collect(),
                expected: "a run number such as 42",
            })
    }
}

/// A job of a run: the run number and the job's index in the run's expanded job list,
/// written `42.3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId {
    pub run: RunId,
    pub index: u32,
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.run, self.index)
    }
}

impl std::str::FromStr for JobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError {
            kind: "JobId",
            value: s.chars().take(80).collect(),
            expected: "RUN.INDEX such as 42.3",
        };
        let (run, index) = s.split_once('.').ok_or_else(err)?;
        Ok(Self {
            run: run.parse().map_err(|_| err())?,
            index: index.parse().map_err(|_| err())?,
        })
    }
}

/// Which attempt of a job: 1 for the first run, incremented by every retry (user `retry`
/// or infrastructure re-run). Reports carry it, so a late report from an attempt that was
/// already given up on is recognised and ignored.
pub type Attempt = u32;

#[cfg(test)]
mod job_id_tests {
    use super::*;

    #[test]
    fn job_ids_read_and_write_as_run_dot_index() {
        let id: JobId = "42.3".parse().expect("parse");
        assert_eq!(
            id,
            JobId {
                run: RunId(42),
                index: 3
            }
        );
        assert_eq!(id.to_string(), "42.3");
        for bad in ["42", "0.1", "a.b", "42.", ".3", "42.3.1"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }
}
