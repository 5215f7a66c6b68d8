//! The deploy runner: the virtual agent deploy jobs run on. The scheduler offers a job
//! with `deploy:` to it like to any agent (the job asks for the reserved label only the
//! runner carries), and the deployment manager (`services::deployments`) accepts it, runs
//! the deployment and reports the job's result. Nothing else about it is special.

use gantry_protocol::AgentId;

/// The label only the deploy runner carries; deploy jobs ask for it. Labels under
/// `gantry.reserved/` take only jobs that ask for them (see the scheduler).
pub const DEPLOY_RUNNER_LABEL: &str = "gantry.reserved/deploy";

/// The virtual agent that runs deploy jobs: `ag-000000000000`, an id enrollment never
/// draws (it draws 48 random bits; all-zero is refused there).
pub fn deploy_runner() -> AgentId {
    AgentId::from_random(&[0; 6])
}
