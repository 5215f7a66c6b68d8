//! A pipeline file's deployment inputs, turned into what the engine and the hosts get:
//! `deploy:` becomes the engine's strategy and the hosts' app spec, the secrets an app
//! names are found in its env and hooks, and `environments:` creates the environments
//! that do not exist yet. No decision about a running deployment here.

use gantry_deploy::{Amount, CanaryStep, Pause, Strategy};
use gantry_pipeline::{DeploySpec, DeployStrategy, HostAmount};
use gantry_protocol::{AppSpec, Hooks, Labels, UnixMillis};

use super::error::DeployError;
use crate::store::{AuditEntry, EnvironmentRecord, Store};

fn amount(a: HostAmount) -> Amount {
    match a {
        HostAmount::Count(n) => Amount::Count(n),
        HostAmount::Percent(p) => Amount::Percent(p),
    }
}

/// The engine's strategy for a pipeline's, and the blue-green slots if any.
pub(super) fn engine_strategy(
    strategy: &DeployStrategy,
) -> (Strategy, Option<gantry_protocol::BlueGreen>) {
    match strategy {
        DeployStrategy::Rolling {
            batch,
            failure_budget,
            pause_ms,
        } => (
            Strategy::Rolling {
                batch: amount(*batch),
                failure_budget: amount(*failure_budget),
                pause_ms: *pause_ms,
            },
            None,
        ),
        DeployStrategy::Canary {
            steps,
            failure_budget,
        } => (
            Strategy::Canary {
                steps: steps
                    .iter()
                    .map(|(percent, pause)| CanaryStep {
                        percent: *percent,
                        pause: pause.map_or(Pause::UntilPromoted, |ms| Pause::For { ms }),
                    })
                    .collect(),
                failure_budget: amount(*failure_budget),
            },
            None,
        ),
        DeployStrategy::BlueGreen {
            blue_port,
            green_port,
            switch,
        } => (
            Strategy::BlueGreen {
                failure_budget: Amount::Count(0),
            },
            Some(gantry_protocol::BlueGreen {
                blue_port: *blue_port,
                green_port: *green_port,
                switch: switch.clone(),
            }),
        ),
    }
}

pub(super) fn app_spec(
    deploy: &DeploySpec,
    blue_green: Option<gantry_protocol::BlueGreen>,
) -> AppSpec {
    AppSpec {
        name: deploy.app.clone(),
        hooks: deploy.hooks.clone(),
        health: deploy.health.clone(),
        keep: deploy.keep,
        shared: deploy.shared.clone(),
        env: deploy.env.clone(),
        secrets: Vec::new(),
        blue_green,
    }
}

/// Secrets an app names (`${{ secrets.NAME }}` in its env and hooks), as a pipeline's
/// `deploy:` gives them or as stored in a deployment.
pub(super) fn hook_secret_names(env: &Labels, hooks: &Hooks) -> Vec<String> {
    let h = hooks;
    let texts = env.values().chain(
        [&h.stop, &h.start, &h.restart, &h.pre_start, &h.post_start]
            .into_iter()
            .flatten(),
    );
    secret_names(texts)
}

fn secret_names<'a>(texts: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut names = Vec::new();
    for text in texts {
        gantry_protocol::template::expand(text, |expr| {
            if let Some(name) = expr.strip_prefix("secrets.") {
                let name = name.trim().to_owned();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            None
        });
    }
    names
}

/// Creates the environments a pipeline file defines that do not exist yet (an existing
/// one keeps its stored rules: a file cannot weaken an environment's protection).
pub fn create_file_environments(
    store: &Store,
    pipeline: &gantry_pipeline::Pipeline,
    actor: &str,
) -> Result<(), DeployError> {
    for (name, spec) in &pipeline.environments {
        if store
            .environment(name)
            .map_err(DeployError::store(format!("reading environment {name}")))?
            .is_some()
        {
            continue;
        }
        let now = UnixMillis::now();
        let record = EnvironmentRecord {
            name: name.clone(),
            select: spec.select.clone(),
            approvals: spec.approvals,
            wait_ms: spec.wait_ms,
            branches: spec.branches.clone(),
            epoch: 0,
            current: None,
            history: Vec::new(),
            created_by: actor.to_owned(),
            created_at: now,
        };
        let audit = AuditEntry {
            at: now,
            actor: actor.to_owned(),
            action: "environment.create".into(),
            detail: format!("name={name} from pipeline {}", pipeline.name),
        };
        // Created meanwhile by someone else: theirs stands.
        let _ = store
            .put_environment(record, false, &audit)
            .map_err(DeployError::store(format!("creating environment {name}")))?;
    }
    Ok(())
}
