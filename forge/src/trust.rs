//! The untrusted-change rule: what a change may do, decided from where it comes from
//! and the repository's policy. Pure functions; the coordinator enforces the answer.
//!
//! # Threat model
//!
//! **Who is trusted.** Anyone who can push to a registered repository (its branches
//! and tags) is trusted with everything its pipelines do: the forge already lets them
//! change the code that runs in production. Anyone who can only open a pull request
//! from a fork is *not*: on a public forge that is anyone with an account; on an
//! internal one, anyone in another team.
//!
//! **What an untrusted change controls.** Everything in its commit: the code under
//! test, the build scripts, and the pipeline file itself, since the pipeline is read
//! from the commit being built. Restrictions written in the pipeline therefore protect
//! nothing; they are decided here, from the webhook event and the repository's policy,
//! which the change cannot touch.
//!
//! **What it must not reach**, and how each is kept from it:
//! - *Secrets* (deploy keys, registry passwords, the forge token): an untrusted run gets
//!   none; a pipeline naming one is refused or runs without it, as the policy says,
//!   and the run's log says which ([`check_needs`]).
//! - *Deployments and environments*: an untrusted run cannot deploy or use anything
//!   scoped to an environment (approvals, environment secrets, protected targets).
//! - *Trusted agents*: it runs only on agents carrying the policy's untrusted labels
//!   (default [`gantry_protocol::UNTRUSTED_WORK_LABEL`]`=true`, which agents started
//!   with `--untrusted-work` announce). That label is reserved: such an agent takes
//!   only untrusted runs' jobs, so the hosts for untrusted work hold nothing of trusted
//!   runs and can be wiped. Job isolation (a user per job, PID namespace, cgroups) is a
//!   second wall, not the first, and `--untrusted-work` requires it.
//! - *Shared caches*: it may not write where trusted runs read (a poisoned dependency
//!   cache would run in the next trusted build): caches live on the agents, and no
//!   trusted job runs on an agent for untrusted work.
//! - *The forge*: it never sees the repository's forge credentials (only the
//!   coordinator holds them; the mirror fetches the fork's head from the target
//!   repository's `refs/pull/N/head`). Its status is still reported on its commit.
//!
//! **Defaults.** Fork pull requests are refused until an admin opts the repository in
//! ([`ForkPolicy::RunUntrusted`]); a pipeline of an untrusted run that names a secret
//! or an environment is refused ([`PrivilegedReference::Refuse`]) unless the admin
//! chose to run it without them. A pull request whose head repository is unknown (a
//! deleted fork, a payload without it) counts as a fork.
//!
//! **Out of scope here.** Forged webhooks are stopped by signatures
//! ([`crate::webhook`]); a replayed genuine delivery can only re-run the same commit
//! (the shell may drop repeated delivery ids). Pull requests from branches of the same
//! repository are trusted, as their authors could push anyway. GitHub's "require
//! approval for first-time contributors" has no equivalent yet: an opted-in repository
//! runs every fork pull request, untrusted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{EventKind, ForgeEvent};

/// What to do with pull requests whose head is in another repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForkPolicy {
    /// Start nothing, and say why (the default).
    #[default]
    Refuse,
    /// Run them as untrusted work.
    RunUntrusted,
}

/// What to do when an untrusted run's pipeline names a secret or an environment, or
/// deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrivilegedReference {
    /// Refuse the run, naming what it asked for (the default).
    #[default]
    Refuse,
    /// Run without them: secrets are left out, deploy jobs and jobs in environments do
    /// not run; the run's log says what was withheld.
    Withhold,
}

/// A repository's policy for changes from outside, set by an admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustPolicy {
    pub fork_pull_requests: ForkPolicy,
    pub privileged_references: PrivilegedReference,
    /// Labels an agent must all carry to run untrusted work.
    pub untrusted_agent_labels: BTreeMap<String, String>,
}

/// The label agents for untrusted work carry by default.
pub const DEFAULT_UNTRUSTED_LABEL: (&str, &str) = (gantry_protocol::UNTRUSTED_WORK_LABEL, "true");

impl Default for TrustPolicy {
    fn default() -> Self {
        Self {
            fork_pull_requests: ForkPolicy::Refuse,
            privileged_references: PrivilegedReference::Refuse,
            untrusted_agent_labels: BTreeMap::from([(
                DEFAULT_UNTRUSTED_LABEL.0.to_owned(),
                DEFAULT_UNTRUSTED_LABEL.1.to_owned(),
            )]),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    Trusted,
    Untrusted,
}

/// What a run may do. Each flag is one privilege the coordinator checks where it
/// hands that privilege out.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Privileges {
    pub trust: Trust,
    pub secrets: bool,
    pub deploy: bool,
    /// Environment-scoped anything: approvals, environment secrets, protected targets.
    pub environments: bool,
    /// Writing caches trusted runs read.
    pub shared_cache_writes: bool,
    /// Labels an agent must carry, on top of what each job asks for.
    pub required_agent_labels: BTreeMap<String, String>,
}

impl Privileges {
    pub fn trusted() -> Self {
        Self {
            trust: Trust::Trusted,
            secrets: true,
            deploy: true,
            environments: true,
            shared_cache_writes: true,
            required_agent_labels: BTreeMap::new(),
        }
    }

    pub fn untrusted(policy: &TrustPolicy) -> Self {
        Self {
            trust: Trust::Untrusted,
            secrets: false,
            deploy: false,
            environments: false,
            shared_cache_writes: false,
            required_agent_labels: policy.untrusted_agent_labels.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Run(Privileges),
    Refuse { reason: String },
}

/// Decides whether `event` may start work in a repository with `policy`, and with
/// which privileges.
pub fn decide(policy: &TrustPolicy, event: &ForgeEvent) -> Verdict {
    match &event.kind {
        EventKind::Push(_) | EventKind::RefDeleted { .. } => Verdict::Run(Privileges::trusted()),
        EventKind::PullRequest(pr) if !pr.from_fork => Verdict::Run(Privileges::trusted()),
        EventKind::PullRequest(pr) => match policy.fork_pull_requests {
            ForkPolicy::RunUntrusted => {
                if policy.untrusted_agent_labels.is_empty() {
                    return Verdict::Refuse {
                        reason: format!(
                            "pull request #{} comes from a fork and the repository names no agent labels for untrusted work; an admin must set some so it cannot run on trusted agents",
                            pr.number
                        ),
                    };
                }
                Verdict::Run(Privileges::untrusted(policy))
            }
            ForkPolicy::Refuse => Verdict::Refuse {
                reason: format!(
                    "pull request #{} comes from a fork{}; fork pull requests do not run in this repository until an admin allows them (they would then run untrusted: no secrets, no deployments, only on agents for untrusted work)",
                    pr.number,
                    pr.head_repository
                        .as_ref()
                        .map(|r| format!(" ({})", r.full_name))
                        .unwrap_or_default()
                ),
            },
        },
    }
}

/// What a run's pipeline asks for that untrusted runs may not have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// Secret names referenced anywhere in the pipeline.
    pub secrets: Vec<String>,
    /// Environments its jobs use.
    pub environments: Vec<String>,
    /// Whether it has deploy jobs.
    pub deploys: bool,
}

/// What will be withheld from a run, to say in its first log lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Withheld {
    pub secrets: Vec<String>,
    pub environments: Vec<String>,
    pub deploys: bool,
}

impl Withheld {
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.environments.is_empty() && !self.deploys
    }

    /// One line per kind withheld, for the run's log.
    pub fn explain(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.secrets.is_empty() {
            lines.push(format!(
                "untrusted run: secrets not provided: {}",
                self.secrets.join(", ")
            ));
        }
        if !self.environments.is_empty() {
            lines.push(format!(
                "untrusted run: jobs in environments do not run: {}",
                self.environments.join(", ")
            ));
        }
        if self.deploys {
            lines.push("untrusted run: deploy jobs do not run".to_owned());
        }
        lines
    }
}

/// Checks what a pipeline asks for against a run's privileges: `Ok` with what is
/// withheld (nothing for a trusted run), or the refusal, naming what was asked for.
pub fn check_needs(
    policy: &TrustPolicy,
    privileges: &Privileges,
    needs: &Needs,
) -> Result<Withheld, String> {
    let withheld = Withheld {
        secrets: if privileges.secrets {
            Vec::new()
        } else {
            needs.secrets.clone()
        },
        environments: if privileges.environments {
            Vec::new()
        } else {
            needs.environments.clone()
        },
        deploys: needs.deploys && !privileges.deploy,
    };
    if withheld.is_empty() || policy.privileged_references == PrivilegedReference::Withhold {
        return Ok(withheld);
    }
    let mut asked = Vec::new();
    if !withheld.secrets.is_empty() {
        asked.push(format!("secrets {}", withheld.secrets.join(", ")));
    }
    if !withheld.environments.is_empty() {
        asked.push(format!("environments {}", withheld.environments.join(", ")));
    }
    if withheld.deploys {
        asked.push("deployments".to_owned());
    }
    Err(format!(
        "this change is untrusted (a pull request from a fork) and its pipeline asks for {}; untrusted runs get none of these, so it does not run (an admin may choose to run such changes without them)",
        asked.join(" and ")
    ))
}

/// The labels an agent must carry to run a job that asks for `runs_on`: the job's own
/// and the run's required ones. A job asking for a value that contradicts a required
/// label (say `pool: fast` where untrusted work needs `pool: sandbox`) cannot run; the
/// error says so.
pub fn agent_labels_for_job(
    privileges: &Privileges,
    runs_on: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut labels = runs_on.clone();
    for (key, value) in &privileges.required_agent_labels {
        match labels.get(key) {
            Some(asked) if asked != value => {
                return Err(format!(
                    "the job asks for agents with {key}={asked}, but untrusted work runs only on agents with {key}={value}"
                ))
            }
            _ => {
                labels.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(labels)
}

/// Whether an agent with `agent_labels` may run work with `privileges`.
pub fn agent_may_run(privileges: &Privileges, agent_labels: &BTreeMap<String, String>) -> bool {
    privileges
        .required_agent_labels
        .iter()
        .all(|(k, v)| agent_labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{
        CommitId, Forge, GitRef, PullRequest, PullRequestAction, Push, RepoIdentity,
    };

    fn repo(name: &str) -> RepoIdentity {
        RepoIdentity {
            full_name: name.into(),
            id: None,
            clone_urls: Vec::new(),
            web_url: None,
        }
    }

    fn event(kind: EventKind) -> ForgeEvent {
        ForgeEvent {
            forge: Forge::Github,
            delivery: None,
            repository: repo("team/app"),
            actor: "someone".into(),
            kind,
        }
    }

    fn pull(from_fork: bool) -> ForgeEvent {
        event(EventKind::PullRequest(PullRequest {
            action: PullRequestAction::Opened,
            number: 7,
            title: "t".into(),
            author: Some("someone".into()),
            head_commit: CommitId::parse(&"a".repeat(40)).expect("sha"),
            head_ref: "feature".into(),
            base_ref: "main".into(),
            head_repository: Some(repo(if from_fork { "someone/app" } else { "team/app" })),
            from_fork,
            labels: Vec::new(),
        }))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pushes_and_same_repository_pull_requests_are_trusted() {
        let policy = TrustPolicy::default();
        let push = event(EventKind::Push(Push {
            git_ref: GitRef::Branch("main".into()),
            before: None,
            after: CommitId::parse(&"b".repeat(40)).expect("sha"),
            changed_paths: Vec::new(),
            paths_complete: false,
        }));
        assert_eq!(decide(&policy, &push), Verdict::Run(Privileges::trusted()));
        assert_eq!(
            decide(&policy, &pull(false)),
            Verdict::Run(Privileges::trusted())
        );
    }

    #[test]
    fn fork_pull_requests_are_refused_by_default_with_the_way_out() {
        let Verdict::Refuse { reason } = decide(&TrustPolicy::default(), &pull(true)) else {
            panic!("a fork pull request ran by default")
        };
        assert!(
            reason.contains("#7") && reason.contains("someone/app"),
            "{reason}"
        );
        assert!(reason.contains("admin"), "{reason}");
    }

    #[test]
    fn opted_in_fork_pull_requests_run_untrusted_on_untrusted_agents_only() {
        let policy = TrustPolicy {
            fork_pull_requests: ForkPolicy::RunUntrusted,
            ..TrustPolicy::default()
        };
        let Verdict::Run(p) = decide(&policy, &pull(true)) else {
            panic!("refused")
        };
        assert_eq!(p.trust, Trust::Untrusted);
        assert!(!p.secrets && !p.deploy && !p.environments && !p.shared_cache_writes);
        let (untrusted, yes) = DEFAULT_UNTRUSTED_LABEL;
        assert!(agent_may_run(
            &p,
            &labels(&[(untrusted, yes), ("os", "linux")])
        ));
        assert!(!agent_may_run(&p, &labels(&[("os", "linux")])));
        assert_eq!(
            agent_labels_for_job(&p, &labels(&[("os", "linux")])),
            Ok(labels(&[("os", "linux"), (untrusted, yes)]))
        );
        let e = agent_labels_for_job(&p, &labels(&[(untrusted, "false")])).expect_err("conflict");
        assert!(e.contains(&format!("{untrusted}=true")), "{e}");
        let no_labels = TrustPolicy {
            untrusted_agent_labels: BTreeMap::new(),
            ..policy
        };
        assert!(matches!(
            decide(&no_labels, &pull(true)),
            Verdict::Refuse { .. }
        ));
    }

    #[test]
    fn untrusted_runs_naming_secrets_are_refused_or_run_without_them_as_configured() {
        let needs = Needs {
            secrets: vec!["DEPLOY_KEY".into()],
            environments: vec!["production".into()],
            deploys: true,
        };
        let refuse = TrustPolicy {
            fork_pull_requests: ForkPolicy::RunUntrusted,
            ..TrustPolicy::default()
        };
        let untrusted = Privileges::untrusted(&refuse);
        let e = check_needs(&refuse, &untrusted, &needs).expect_err("refused");
        assert!(
            e.contains("DEPLOY_KEY") && e.contains("production") && e.contains("deployments"),
            "{e}"
        );
        let withhold = TrustPolicy {
            privileged_references: PrivilegedReference::Withhold,
            ..refuse.clone()
        };
        let left_out = check_needs(&withhold, &untrusted, &needs).expect("runs");
        assert_eq!(left_out.secrets, vec!["DEPLOY_KEY".to_owned()]);
        assert_eq!(left_out.explain().len(), 3);
        assert_eq!(
            check_needs(&refuse, &Privileges::trusted(), &needs),
            Ok(Withheld::default())
        );
        assert_eq!(
            check_needs(&refuse, &untrusted, &Needs::default()),
            Ok(Withheld::default())
        );
    }
}
