//! Delivery figures (`gantry stats`): deployment frequency, lead time for changes,
//! change failure rate and time to restore, per environment, from the stored deployment
//! history.
//!
//! Owns the definitions, in one pure function ([`compute`]) over [`Fact`]s, so they are
//! tested without a store:
//! - a *change* is a deployment of a new release (not a `gantry rollback`) that ended
//!   succeeded, rolled back or failed in the window;
//! - a change *failed* if it rolled back or failed, or if the next deployment to end in
//!   its environment was a `gantry rollback` (it was undone by hand);
//! - *lead time* runs from the run's creation (Gantry does not know commit times) to the
//!   deployment's success;
//! - *time to restore* runs from the first host failing after its switch to the
//!   deployment's end (an automatic rollback), or from a bad change's end to the end of
//!   the `gantry rollback` that undid it. A deployment that failed while staging changed
//!   nothing in production and needs no restore.

use std::collections::{BTreeMap, HashMap};

use gantry_protocol::{DeliveryStats, RunId, UnixMillis};

use crate::services::environments::{must_exist, EnvironmentError};
use crate::store::{DeploymentRecord, Store};

const DAY_MS: f64 = 86_400_000.0;

/// What the figures need of one ended deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub environment: String,
    pub rollback: bool,
    /// `succeeded`, `rolled-back`, `failed` or `cancelled`.
    pub state: String,
    pub started: bool,
    pub finished_at: UnixMillis,
    /// When the run that asked for it was created.
    pub run_created_at: Option<UnixMillis>,
    pub first_failure_at: Option<UnixMillis>,
}

impl Fact {
    /// The fact of an ended deployment; `None` while it runs.
    pub fn of(record: &DeploymentRecord, run_created_at: Option<UnixMillis>) -> Option<Self> {
        Some(Self {
            environment: record.environment.clone(),
            rollback: matches!(record.strategy, gantry_deploy::Strategy::Rollback { .. }),
            state: record.state_name(),
            started: record.started_at.is_some(),
            finished_at: record.finished_at?,
            run_created_at,
            first_failure_at: record.first_failure_at,
        })
    }
}

/// `gantry stats`: the figures of one environment, or of every one, over the last
/// `since_ms` before `now`, from the stored deployment history.
pub fn report(
    store: &Store,
    now: UnixMillis,
    since_ms: u64,
    environment: Option<String>,
) -> Result<Vec<DeliveryStats>, EnvironmentError> {
    let names: Vec<String> = match environment {
        Some(env) => {
            must_exist(store, &env)?;
            vec![env]
        }
        None => store.environments()?.into_iter().map(|e| e.name).collect(),
    };
    let mut run_created: HashMap<RunId, Option<UnixMillis>> = HashMap::new();
    let mut facts = Vec::new();
    for record in store.deployments(usize::MAX, false)? {
        let created = match record.job {
            Some((job, _)) => *run_created
                .entry(job.run)
                .or_insert_with(|| store.run(job.run).ok().flatten().map(|r| r.created_at)),
            None => None,
        };
        facts.extend(Fact::of(&record, created));
    }
    let since = UnixMillis(now.0.saturating_sub(since_ms));
    Ok(compute(&facts, &names, since, UnixMillis(now.0 + 1)))
}

/// The figures of each environment in `environments` over `[since, until)`.
pub fn compute(
    facts: &[Fact],
    environments: &[String],
    since: UnixMillis,
    until: UnixMillis,
) -> Vec<DeliveryStats> {
    let mut by_env: BTreeMap<&str, Vec<&Fact>> = environments
        .iter()
        .map(|e| (e.as_str(), Vec::new()))
        .collect();
    for f in facts {
        if let Some(list) = by_env.get_mut(f.environment.as_str()) {
            list.push(f);
        }
    }
    by_env
        .into_iter()
        .map(|(env, mut list)| {
            list.sort_by_key(|f| f.finished_at);
            environment_stats(env, &list, since, until)
        })
        .collect()
}

fn environment_stats(
    env: &str,
    list: &[&Fact],
    since: UnixMillis,
    until: UnixMillis,
) -> DeliveryStats {
    let in_window = |f: &Fact| f.finished_at >= since && f.finished_at < until;
    let (mut changes, mut succeeded, mut failed_changes, mut rollbacks) = (0u32, 0u32, 0u32, 0u32);
    let mut lead_times = Vec::new();
    let mut restores = Vec::new();
    for (i, f) in list.iter().enumerate() {
        if f.rollback {
            if in_window(f) && f.state == "succeeded" {
                rollbacks += 1;
            }
            continue;
        }
        if f.state == "cancelled" || !f.started || !in_window(f) {
            continue;
        }
        changes += 1;
        // The next deployment of this environment to end, if it undid this one by hand.
        let undone_by = list[i + 1..]
            .iter()
            .find(|n| n.started)
            .filter(|n| n.rollback && n.state == "succeeded");
        match f.state.as_str() {
            "succeeded" => {
                succeeded += 1;
                if let Some(created) = f.run_created_at {
                    lead_times.push(f.finished_at.millis_since(created));
                }
                if let Some(rollback) = undone_by {
                    failed_changes += 1;
                    restores.push(rollback.finished_at.millis_since(f.finished_at));
                }
            }
            "rolled-back" => {
                failed_changes += 1;
                if let Some(failed_at) = f.first_failure_at {
                    restores.push(f.finished_at.millis_since(failed_at));
                }
            }
            _ => failed_changes += 1,
        }
    }
    let days = (until.millis_since(since) as f64 / DAY_MS).max(1.0 / 24.0);
    lead_times.sort_unstable();
    restores.sort_unstable();
    DeliveryStats {
        environment: env.to_owned(),
        since,
        until,
        changes,
        succeeded,
        failed_changes,
        rollbacks,
        deployments_per_day: f64::from(succeeded) / days,
        change_failure_rate: (changes > 0).then(|| f64::from(failed_changes) / f64::from(changes)),
        lead_time_median_ms: percentile(&lead_times, 50),
        lead_time_p90_ms: percentile(&lead_times, 90),
        time_to_restore_median_ms: percentile(&restores, 50),
        restores: u32::try_from(restores.len()).unwrap_or(u32::MAX),
    }
}

/// The `p`th percentile of sorted values (nearest rank).
fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn fact(state: &str, rollback: bool, finished_h: u64) -> Fact {
        Fact {
            environment: "prod".into(),
            rollback,
            state: state.into(),
            started: true,
            finished_at: UnixMillis(finished_h * H),
            run_created_at: Some(UnixMillis(finished_h * H - H / 2)),
            first_failure_at: None,
        }
    }

    #[test]
    fn the_four_keys_follow_their_definitions() {
        let mut rolled_back = fact("rolled-back", false, 30);
        rolled_back.first_failure_at = Some(UnixMillis(30 * H - 60_000));
        let facts = vec![
            fact("succeeded", false, 10),
            fact("succeeded", false, 20),
            rolled_back,
            // Staging failed: a failed change, but nothing to restore.
            fact("failed", false, 40),
            // Succeeded, then undone by hand 2 h later.
            fact("succeeded", false, 50),
            fact("succeeded", true, 52),
            // Cancelled before it started: not a change.
            Fact {
                started: false,
                ..fact("cancelled", false, 60)
            },
            // Outside the window.
            fact("succeeded", false, 500),
            // Another environment.
            Fact {
                environment: "staging".into(),
                ..fact("failed", false, 20)
            },
        ];
        let stats = compute(
            &facts,
            &["prod".to_owned(), "empty".to_owned()],
            UnixMillis(0),
            UnixMillis(100 * H),
        );
        assert_eq!(stats.len(), 2);
        let empty = &stats[0];
        assert_eq!((empty.environment.as_str(), empty.changes), ("empty", 0));
        assert_eq!(empty.change_failure_rate, None);
        let prod = &stats[1];
        assert_eq!(prod.changes, 5);
        assert_eq!(prod.succeeded, 3);
        assert_eq!(
            prod.failed_changes, 3,
            "rolled back, failed, undone by hand"
        );
        assert_eq!(prod.rollbacks, 1);
        assert_eq!(prod.change_failure_rate, Some(0.6));
        let per_day = 3.0 / (100.0 / 24.0);
        assert!((prod.deployments_per_day - per_day).abs() < 1e-9);
        assert_eq!(prod.lead_time_median_ms, Some(H / 2));
        assert_eq!(prod.restores, 2);
        // 1 minute (automatic) and 2 h (by hand): the median of two is the lower.
        assert_eq!(prod.time_to_restore_median_ms, Some(60_000));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 90), Some(7));
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50), Some(5));
        assert_eq!(percentile(&v, 90), Some(9));
    }
}
