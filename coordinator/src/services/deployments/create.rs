//! Creating deployments: from a deploy job the scheduler offers the deploy runner, from
//! `gantry rollback`, and from `gantry agents upgrade`. Each is checked (its
//! environment, its artifact, its secrets) and asked of the gates before it is numbered
//! and stored, so a refused one costs no deployment and no epoch; a stored one starts
//! at the gates' first stage.

use std::collections::BTreeMap;

use gantry_deploy::gates::{Purpose, Request, Rules, Stage};
use gantry_deploy::{Amount, Limits, Strategy};
use gantry_pipeline::DeploySpec;
use gantry_protocol::{
    AppSpec, ArtifactView, Attempt, EnvRelease, Hooks, JobId, Labels, ReleaseSpec, RollbackRequest,
    RunId, UnixMillis,
};

use super::error::DeployError;
use super::manager::{AgentUpgrade, Manager};
use super::record::{DeploymentRecord, Kind, Status};
use super::spec::{app_spec, engine_strategy, hook_secret_names};
use super::targets::upgrades_environment;
use crate::base::labels::labels_text;
use crate::services::runner::deploy_runner;
use crate::store::{AuditEntry, EnvironmentRecord};

impl Manager {
    pub(super) fn dispatch(&mut self, now: UnixMillis, job: JobId, attempt: Attempt) {
        self.engine.event(gantry_scheduler::Event::JobAccepted {
            job,
            attempt,
            agent: deploy_runner(),
        });
        if self.active.values().any(|r| r.job == Some((job, attempt))) {
            return;
        }
        match self.create_for_job(now, job, attempt) {
            Ok((id, request)) => self.request(now, id, request),
            Err(e) => {
                tracing::info!(%job, attempt, "deploy job refused: {e}");
                self.job_log(job, attempt, &format!("\u{2716} {e}"));
                self.finish_job(now, job, attempt, false, now);
            }
        }
    }

    /// Builds and stores the deployment a deploy job asks for.
    pub(super) fn create_for_job(
        &mut self,
        now: UnixMillis,
        job: JobId,
        attempt: Attempt,
    ) -> Result<(u64, Request), DeployError> {
        let run = self
            .store
            .run(job.run)
            .map_err(DeployError::store(format!("reading run {}", job.run)))?
            .ok_or(DeployError::NoRun(job.run))?;
        let pipeline =
            gantry_pipeline::parse(&run.file_name, &run.text).map_err(DeployError::Pipeline)?;
        let spec = pipeline
            .jobs
            .get(job.index as usize)
            .ok_or(DeployError::NoJob(job))?;
        let deploy = spec
            .deploy
            .as_ref()
            .ok_or_else(|| DeployError::NotADeployJob(spec.name.clone()))?;
        let env = self.environment(&deploy.environment)?;
        let branch = run.git_ref.clone();
        let request = self.admit(&env, &run.created_by, Purpose::Release { branch })?;
        let artifact = self.artifact(job.run, &deploy.artifact)?;
        self.check_secrets(deploy, &env.name)?;
        let hex = artifact.manifest.to_string();
        let short = hex.trim_start_matches(gantry_protocol::DIGEST_PREFIX);
        let release = ReleaseSpec {
            id: format!("r{}-{}", job.run, &short[..8.min(short.len())]),
            version: deploy
                .version
                .clone()
                .unwrap_or_else(|| format!("{}.{}", job.run, job.index + 1)),
            manifest: artifact.manifest,
        };
        let (strategy, blue_green) = engine_strategy(&deploy.strategy);
        let app = app_spec(deploy, blue_green);
        let limits = Limits {
            stage_ms: deploy.stage_timeout_ms,
            activate_ms: deploy.activate_timeout_ms,
            verify_ms: deploy
                .health
                .as_ref()
                .map_or(60_000, |h| h.deadline_ms + h.timeout_ms + 10_000),
            rollback_ms: deploy.activate_timeout_ms,
            ..Limits::default()
        };
        let record = self.create(
            now,
            &env,
            &request,
            Kind::App,
            app,
            release,
            strategy,
            limits,
            Some((job, attempt)),
            &format!("run={} job={}", job.run, spec.name),
        )?;
        let id = record.id;
        self.job_log(
            job,
            attempt,
            &format!(
                "deployment {id} of {} ({}) to {}, epoch {}: `gantry deployments show {id}`",
                record.release.id, record.release.version, record.environment, record.epoch
            ),
        );
        Ok((id, request))
    }

    pub(super) fn environment(&self, name: &str) -> Result<EnvironmentRecord, DeployError> {
        self.store
            .environment(name)
            .map_err(DeployError::store(format!("reading environment {name}")))?
            .ok_or_else(|| DeployError::NoEnvironment(name.to_owned()))
    }

    /// The artifact `name` of run `run`: what a deploy job of that run releases.
    fn artifact(&self, run: RunId, name: &str) -> Result<ArtifactView, DeployError> {
        self.store
            .artifacts_of(run)
            .map_err(DeployError::store(format!(
                "reading the artifacts of run {run}"
            )))?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| DeployError::NoArtifact {
                run,
                artifact: name.to_owned(),
            })
    }

    /// The deployment that installed `release`: a rollback to it deploys its app again.
    fn source_of(&self, release: &EnvRelease) -> Result<DeploymentRecord, DeployError> {
        let deployment = release.deployment;
        self.store
            .deployment(deployment)
            .map_err(DeployError::store(format!(
                "reading deployment {deployment}"
            )))?
            .ok_or_else(|| DeployError::SourceGone {
                deployment,
                release: release.release.id.clone(),
            })
    }

    /// Every secret the deployment names exists and may go to this environment.
    pub(super) fn check_secrets(
        &self,
        deploy: &DeploySpec,
        environment: &str,
    ) -> Result<(), DeployError> {
        let names = hook_secret_names(&deploy.env, &deploy.hooks);
        if names.is_empty() {
            return Ok(());
        }
        let scopes = self
            .store
            .secret_scopes()
            .map_err(DeployError::store("reading the secrets' scopes"))?;
        let stored: Vec<String> = self
            .store
            .secrets()
            .map_err(DeployError::store("listing the secrets"))?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for name in &names {
            if !stored.contains(name) {
                return Err(DeployError::NoSecret {
                    name: name.clone(),
                    environment: environment.to_owned(),
                });
            }
            if let Some(scope) = scopes.get(name).filter(|s| *s != environment) {
                return Err(DeployError::SecretScope {
                    name: name.clone(),
                    scope: scope.clone(),
                    environment: environment.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The request for a deployment to `env` under its current rules, if the gates would
    /// take it. Asked before the deployment is numbered and stored, so a refused one (a
    /// branch the environment does not allow, a rollback while another runs, a second
    /// fleet upgrade) costs no deployment and no epoch.
    pub(super) fn admit(
        &self,
        env: &EnvironmentRecord,
        author: &str,
        purpose: Purpose,
    ) -> Result<Request, DeployError> {
        let request = Request {
            environment: env.name.clone(),
            author: author.to_owned(),
            rules: Rules {
                approvals: env.approvals,
                wait_ms: env.wait_ms,
                branches: env.branches.clone(),
            },
            purpose,
        };
        self.gates.admit(&request)?;
        Ok(request)
    }

    /// Stores a new deployment, its gates at their first stage: what
    /// [`GateEvent::Requested`] would make of it, so a crash before the request is fed
    /// resumes it there.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        &mut self,
        now: UnixMillis,
        env: &EnvironmentRecord,
        request: &Request,
        kind: Kind,
        app: AppSpec,
        release: ReleaseSpec,
        strategy: Strategy,
        limits: Limits,
        job: Option<(JobId, Attempt)>,
        detail: &str,
    ) -> Result<DeploymentRecord, DeployError> {
        let created_by = request.author.as_str();
        let approvals_needed = request.approvals_needed();
        let wait_ms = request.wait_ms();
        let status = match request.first_stage(now) {
            Stage::AwaitingApproval => Status::AwaitingApproval,
            Stage::Waiting { until } => Status::Waiting { until },
            Stage::Queued | Stage::Running => Status::Queued,
        };
        let audit = AuditEntry {
            at: now,
            actor: created_by.to_owned(),
            action: "deployment.create".into(),
            detail: format!("environment={} release={} {detail}", env.name, release.id),
        };
        let fenced = matches!(kind, Kind::App).then_some(env.name.as_str());
        let record = self
            .store
            .create_deployment(
                fenced,
                |id, epoch| DeploymentRecord {
                    id,
                    environment: env.name.clone(),
                    epoch,
                    app,
                    release,
                    strategy,
                    limits,
                    created_by: created_by.to_owned(),
                    created_at: now,
                    started_at: None,
                    finished_at: None,
                    job,
                    approvals: Vec::new(),
                    approvals_needed,
                    wait_ms,
                    status,
                    engine: None,
                    hosts: BTreeMap::new(),
                    next_seq: 1,
                    log: Vec::new(),
                    log_dropped: 0,
                    first_failure_at: None,
                    kind,
                },
                &audit,
            )
            .map_err(DeployError::Save)?;
        self.active.insert(record.id, record.clone());
        Ok(record)
    }

    /// `gantry rollback`: a deployment of a release the hosts still hold, with no
    /// staging and no analysis.
    pub(super) fn rollback(
        &mut self,
        now: UnixMillis,
        actor: &str,
        req: &RollbackRequest,
    ) -> Result<u64, DeployError> {
        let env = self.environment(&req.environment)?;
        let request = self.admit(&env, actor, Purpose::Rollback)?;
        let current = env
            .current
            .as_ref()
            .ok_or_else(|| DeployError::NothingDeployed(env.name.clone()))?;
        let target = match &req.to {
            Some(to) => env
                .history
                .iter()
                .find(|r| r.release.id == *to || r.release.version == *to)
                .ok_or_else(|| DeployError::UnknownRelease {
                    environment: env.name.clone(),
                    release: to.clone(),
                    known: env.history.iter().map(|r| r.release.id.clone()).collect(),
                })?,
            None => env
                .history
                .iter()
                .find(|r| r.release.id != current.release.id)
                .ok_or_else(|| DeployError::NoEarlierRelease {
                    environment: env.name.clone(),
                    current: current.release.id.clone(),
                })?,
        }
        .clone();
        let source = self.source_of(&target)?;
        let record = self.create(
            now,
            &env,
            &request,
            Kind::App,
            source.app.clone(),
            target.release.clone(),
            Strategy::Rollback {
                parallelism: req.parallelism,
            },
            source.limits,
            None,
            &format!("rollback from={}", current.release.id),
        )?;
        let what = format!(
            "rollback of {} from {} to {} requested by {actor}",
            env.name, current.release.id, target.release.id
        );
        Ok(self.start_requested(now, record.id, request, what))
    }

    /// `gantry agents upgrade`: the agent binary to the matching agents, in waves of
    /// `batch`, each restarting once its jobs end; past the failure budget, the
    /// restarted ones go back to the binary they ran.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn upgrade(
        &mut self,
        now: UnixMillis,
        actor: &str,
        upgrade: &AgentUpgrade,
    ) -> Result<u64, DeployError> {
        let &AgentUpgrade {
            ref select,
            batch,
            failure_budget,
            timeout_ms,
            ref binary,
        } = upgrade;
        let env = upgrades_environment(select.clone());
        let request = self.admit(&env, actor, Purpose::AgentUpgrade)?;
        let short = &binary.sha256[..binary.sha256.len().min(12)];
        let record = self.create(
            now,
            &env,
            &request,
            Kind::AgentUpgrade {
                select: select.clone(),
                binary: binary.clone(),
            },
            AppSpec {
                name: "gantry-agent".into(),
                hooks: Hooks::default(),
                health: None,
                keep: 2,
                shared: Vec::new(),
                env: Labels::new(),
                secrets: Vec::new(),
                blue_green: None,
            },
            ReleaseSpec {
                id: format!("agent-{short}"),
                version: binary.version.clone(),
                manifest: gantry_protocol::Digest::of(binary.sha256.as_bytes()),
            },
            Strategy::Rolling {
                batch: Amount::Count(batch.max(1)),
                failure_budget: Amount::Count(failure_budget),
                pause_ms: 0,
            },
            Limits {
                stage_ms: 5 * 60_000,
                activate_ms: timeout_ms,
                verify_ms: 60_000,
                rollback_ms: timeout_ms,
                ..Limits::default()
            },
            None,
            &format!("agent upgrade select={select:?} sha256={}", binary.sha256),
        )?;
        let what = format!(
            "agent upgrade to {} ({short}) of the agents matching {}, {} at a time",
            binary.version,
            labels_text(select),
            batch.max(1)
        );
        Ok(self.start_requested(now, record.id, request, what))
    }

    /// A deployment an operator asked for, just stored: logs `what` on it, then feeds its
    /// request to the gates. Gives its id.
    fn start_requested(&mut self, now: UnixMillis, id: u64, request: Request, what: String) -> u64 {
        self.log(id, now, None, what);
        self.request(now, id, request);
        id
    }
}
