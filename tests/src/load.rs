//! What the scale benchmark (`bench-scale`) and its simulated agents (`gantry-loadagent`)
//! share: the lines a load process prints on stdout, and a small in-process admin client.
//!
//! A load process speaks the real agent protocol to the coordinator; to the benchmark it
//! only prints one event per line, so the benchmark needs no second channel and a load
//! process needs nothing from it but its arguments (it exits when its stdin closes, so a
//! benchmark that dies cannot leave it behind).

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock nanoseconds since the epoch: comparable between processes on one machine.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One line of a load process's stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadEvent {
    /// Every agent of the process is enrolled; how long it took.
    Enrolled { agents: usize, millis: u64 },
    /// The process cannot go on (enrollment failed for good).
    Fatal(String),
    /// Sessions welcomed and live now, and welcomes since the process started.
    Live {
        live: usize,
        welcomes: u64,
        at_ns: u128,
    },
    /// A dispatch arrived at one of the process's agents.
    Dispatch {
        run: u64,
        index: u32,
        attempt: u32,
        at_ns: u128,
    },
    /// A result was acknowledged by the coordinator (it is durable).
    Acked { run: u64, index: u32, at_ns: u128 },
}

impl LoadEvent {
    /// The line, without its newline.
    pub fn line(&self) -> String {
        match self {
            Self::Enrolled { agents, millis } => format!("enrolled {agents} {millis}"),
            Self::Fatal(message) => format!("fatal {}", message.replace('\n', " ")),
            Self::Live {
                live,
                welcomes,
                at_ns,
            } => format!("live {live} {welcomes} {at_ns}"),
            Self::Dispatch {
                run,
                index,
                attempt,
                at_ns,
            } => format!("dispatch {run} {index} {attempt} {at_ns}"),
            Self::Acked { run, index, at_ns } => format!("acked {run} {index} {at_ns}"),
        }
    }

    /// Parses a line; `None` for anything else (a load process prints nothing else on
    /// stdout, but a garbled line must not stop the benchmark).
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split(' ');
        let kind = words.next()?;
        if kind == "fatal" {
            return Some(Self::Fatal(line.get(6..).unwrap_or_default().to_owned()));
        }
        let mut next = || words.next().and_then(|w| w.parse::<u128>().ok());
        Some(match kind {
            "enrolled" => Self::Enrolled {
                agents: usize::try_from(next()?).ok()?,
                millis: u64::try_from(next()?).ok()?,
            },
            "live" => Self::Live {
                live: usize::try_from(next()?).ok()?,
                welcomes: u64::try_from(next()?).ok()?,
                at_ns: next()?,
            },
            "dispatch" => Self::Dispatch {
                run: u64::try_from(next()?).ok()?,
                index: u32::try_from(next()?).ok()?,
                attempt: u32::try_from(next()?).ok()?,
                at_ns: next()?,
            },
            "acked" => Self::Acked {
                run: u64::try_from(next()?).ok()?,
                index: u32::try_from(next()?).ok()?,
                at_ns: next()?,
            },
            _ => return None,
        })
    }
}

/// A pipeline of `jobs` independent jobs that do nothing (`true`).
pub fn trivial_pipeline(jobs: usize) -> String {
    std::iter::once("jobs:\n".to_owned())
        .chain((0..jobs).map(|i| format!("  j{i}:\n    steps: [{{ run: 'true' }}]\n")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_survives_its_line() {
        let events = [
            LoadEvent::Enrolled {
                agents: 2500,
                millis: 41_200,
            },
            LoadEvent::Fatal("enrollment 3 failed: token used up".into()),
            LoadEvent::Live {
                live: 2499,
                welcomes: 5000,
                at_ns: 1_700_000_000_123_456_789,
            },
            LoadEvent::Dispatch {
                run: 12,
                index: 499,
                attempt: 1,
                at_ns: 1_700_000_000_000_000_001,
            },
            LoadEvent::Acked {
                run: 12,
                index: 3,
                at_ns: 1_700_000_000_000_000_002,
            },
        ];
        for event in events {
            assert_eq!(LoadEvent::parse(&event.line()), Some(event));
        }
        assert_eq!(LoadEvent::parse("live 3"), None);
        assert_eq!(LoadEvent::parse("hello world"), None);
    }
}
