//! Deployments in a pipeline file: the `environments:` section and a job's `deploy:`.
//!
//! The model only; loading with positions is in `load`. Names here become directory
//! names on hosts and CLI arguments, so their rules are strict. Hooks and health checks
//! are protocol's types ([`Hooks`], [`HealthCheck`]): the file says what hosts get, and
//! the coordinator passes them on as read.

use std::collections::BTreeMap;

use gantry_protocol::{HealthCheck, Hooks};
use serde::{Deserialize, Serialize};

/// An environment defined in a pipeline file. One that already exists on the
/// coordinator keeps its stored rules: a pipeline cannot weaken an environment's
/// protection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentSpec {
    /// Labels a host must carry to be a target.
    pub select: BTreeMap<String, String>,
    /// Distinct approvers a deployment needs (never the person who started it).
    pub approvals: u32,
    /// How long a deployment waits after approval before it starts.
    pub wait_ms: u64,
    /// Globs of the branches that may deploy here; empty allows any.
    pub branches: Vec<String>,
}

/// A number of hosts, absolute or as a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostAmount {
    Count(u32),
    Percent(u8),
}

/// How a deploy job switches hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployStrategy {
    Rolling {
        batch: HostAmount,
        failure_budget: HostAmount,
        pause_ms: u64,
    },
    Canary {
        /// Percent of hosts, and the pause after it (`None`: until promoted).
        steps: Vec<(u8, Option<u64>)>,
        failure_budget: HostAmount,
    },
    BlueGreen {
        blue_port: u16,
        green_port: u16,
        /// The command that moves traffic to `$GANTRY_SLOT`.
        switch: String,
    },
}

/// A job's `deploy:`: the coordinator deploys an artifact of the run to an
/// environment's hosts; the job ends as the deployment does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub environment: String,
    /// An artifact of a job this one needs.
    pub artifact: String,
    /// Directory under each host's deploy root; the artifact's name by default.
    pub app: String,
    /// What people call the release; `<run>.<job>` by default.
    pub version: Option<String>,
    pub strategy: DeployStrategy,
    pub keep: u32,
    pub shared: Vec<String>,
    /// The hooks and health check as hosts get them: protocol's types, read from the
    /// file directly.
    pub hooks: Hooks,
    pub health: Option<HealthCheck>,
    /// Environment of hooks and command probes; may use `${{ secrets.NAME }}` of
    /// secrets scoped to this environment (or to none).
    pub env: BTreeMap<String, String>,
    pub stage_timeout_ms: u64,
    pub activate_timeout_ms: u64,
}

pub const DEFAULT_KEEP: u32 = 5;
pub const MAX_KEEP: u32 = 50;
pub const DEFAULT_HOOK_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_STAGE_TIMEOUT_MS: u64 = 10 * 60_000;
pub const DEFAULT_ACTIVATE_TIMEOUT_MS: u64 = 5 * 60_000;

/// Why an environment name is refused; `None` if fine: 1 to 63 of `a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn environment_name_problem(name: &str) -> Option<&'static str> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    (!ok).then_some("must be 1 to 63 of a-z 0-9 . _ -, starting with a letter or digit")
}

/// Why an app name is refused (it is a directory on every host); `None` if fine.
pub fn app_name_problem(name: &str) -> Option<&'static str> {
    let ok = (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    (!ok).then_some("must be 1 to 64 of A-Z a-z 0-9 . _ - (it names a directory on each host)")
}

/// A number of hosts that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("\"{0}\" is not a percentage from 0% to 100%")]
    Percent(String),
    #[error("\"{0}\" is not a number of hosts or a percentage like 25%")]
    Count(String),
}

/// Parses `25%` or `3` as a number of hosts.
pub fn parse_amount(text: &str) -> Result<HostAmount, AmountError> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        match p.trim().parse::<u8>() {
            Ok(p) if p <= 100 => Ok(HostAmount::Percent(p)),
            _ => Err(AmountError::Percent(text.to_owned())),
        }
    } else {
        t.parse::<u32>()
            .map(HostAmount::Count)
            .map_err(|_| AmountError::Count(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_amounts() {
        assert_eq!(environment_name_problem("production"), None);
        assert_eq!(environment_name_problem("eu-west.1"), None);
        for bad in ["", "Prod", "-x", "a b", &"x".repeat(64)] {
            assert!(environment_name_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(app_name_problem("web-api_2.0"), None);
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(app_name_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(parse_amount("25%"), Ok(HostAmount::Percent(25)));
        assert_eq!(parse_amount("3"), Ok(HostAmount::Count(3)));
        for bad in ["101%", "-1", "x", "1.5"] {
            assert!(parse_amount(bad).is_err(), "{bad}");
        }
    }
}
