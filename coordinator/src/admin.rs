//! The admin router: every admin request, from the CLI (over QUIC) and from the
//! dashboard (over HTTP), is answered here, one line per request kind, by the service
//! that owns it.
//!
//! The authorization table is asked first, with the caller's principal (an admin
//! certificate, or a dashboard login's role). Each request is then handled with a
//! context ([`Acting`]): who acts, the time the request is answered at, and the one way
//! to write an audit entry, which every change commits with the change itself. A
//! service's typed error becomes the `AdminError` the CLI maps to an exit code.
//!
//! It must not hold state or decide anything itself: what a request does is its
//! service's.

use gantry_protocol::{AdminRequest, AdminResponse, UnixMillis};

use crate::base::audit::{self, Acting};
use crate::base::authz::{forbidden, Principal, Request};
use crate::base::error::{admin_error, AdminFailure};
use crate::services::coordinator::Coordinator;
use crate::services::deployments::AdminOp;
use crate::services::environments::{self, Rules};
use crate::services::runs::Runs;
use crate::services::stats;

/// Answers one admin request as `actor` (an identity URI or a dashboard user), once the
/// authorization table allows it for `principal`. Every change is durable (with its
/// audit entry) before the response is built.
pub async fn answer(
    c: &Coordinator,
    actor: &str,
    principal: Principal,
    req: AdminRequest,
) -> AdminResponse {
    match c
        .metrics
        .authz
        .check(Request::of_admin(&req), principal, String::new)
    {
        Ok(()) => route(c, &Acting::new(actor, UnixMillis::now()), req).await,
        Err(denied) => AdminResponse::Error(forbidden(&denied)),
    }
}

/// One line per request kind: the request, the service call, the response.
#[rustfmt::skip]
async fn route(c: &Coordinator, cx: &Acting<'_>, req: AdminRequest) -> AdminResponse {
    use AdminRequest as R;
    use AdminResponse as A;
    let store = &*c.store;
    match req {
        R::CreateToken { ttl_secs, uses, labels } => reply(c.access.create_join_token(cx, ttl_secs, uses, &labels), A::TokenCreated),
        R::ListAgents => reply(c.agents.list(), A::Agents),
        R::ShowAgent { agent_id } => reply(c.agents.show(&agent_id), A::Agent),
        R::RevokeAgent { agent_id } => reply(c.agents.revoke(cx, &agent_id), A::Agent),
        R::LabelAgent { agent_id, set, remove } => reply(c.agents.label(cx, &agent_id, &set, &remove), A::Agent),
        R::Status => reply(c.agents.status(cx.now, &c.settings.listen, c.started_at), A::Status),
        R::Audit { limit } => reply(audit::tail(store, limit), A::Audit),
        R::Validate { file_name, text } => reply(Runs::validate(&file_name, &text), |jobs| A::Validated { jobs }),
        R::SubmitRun(submit) => reply(c.runs.submit(cx, &submit), A::Run),
        R::ListRuns { limit } => reply(c.runs.list(limit), A::Runs),
        R::ShowRun { run } => reply(c.runs.show(run), A::Run),
        R::CancelRun { run } => reply(c.runs.cancel(cx, run), done),
        R::RetryRun { run } => reply(c.runs.retry(cx, run), A::Run),
        R::ListJobs { run, limit } => reply(c.runs.jobs(run, limit), A::Jobs),
        R::ShowJob { job } => reply(c.runs.job(job), A::Job),
        R::ShowJobOutputs { job } => reply(c.runs.job_outputs(job), A::JobOutputs),
        R::ShowJobReport { job } => reply(c.runs.job_report(job), A::JobReport),
        R::Approve { job } => reply(c.runs.approve(cx, job), done),
        R::AddTrigger { file_name, text } => reply(c.triggers.add(cx, file_name, text), |t| A::Triggers(vec![t])),
        R::ListTriggers => reply(c.triggers.list(), A::Triggers),
        R::RemoveTrigger { name } => reply(c.triggers.remove(cx, &name), done),
        R::SetSecret { name, value, environment } => reply(c.secrets.set(cx, &name, &value, environment.as_deref()), done),
        R::ListSecrets => reply(c.secrets.names(), A::Secrets),
        R::RemoveSecret { name } => reply(c.secrets.remove(cx, &name), done),
        R::ListArtifacts { run } => reply(c.artifacts.list(run), A::Artifacts),
        R::ListCaches => reply(c.artifacts.caches(), A::Caches),
        R::RemoveCache { key, pipeline, branch } => reply(c.artifacts.remove_caches(cx, key, pipeline, branch), A::Caches),
        R::Gc { dry_run, grace_secs } => reply(c.artifacts.gc(cx.actor, dry_run, grace_secs).await, A::Gc),
        R::PutEnvironment { name, select, approvals, wait_ms, branches, replace } => reply(environments::put(store, cx, name, Rules { select, approvals, wait_ms, branches }, replace), A::Environment),
        R::ListEnvironments => reply(environments::list(store), A::Environments),
        R::ShowEnvironment { name } => reply(environments::show(store, &name), A::Environment),
        R::ListDeployments { environment, limit } => reply(environments::deployments(store, environment.as_deref(), limit), A::Deployments),
        R::ShowDeployment { id } => reply(environments::deployment(store, id), A::Deployment),
        R::ApproveDeployment { id } => c.deployments.admin(cx.actor, AdminOp::Approve(id)).await,
        R::PromoteDeployment { id } => c.deployments.admin(cx.actor, AdminOp::Promote(id)).await,
        R::AbortDeployment { id } => c.deployments.admin(cx.actor, AdminOp::Abort(id)).await,
        R::Rollback(request) => c.deployments.admin(cx.actor, AdminOp::Rollback(request)).await,
        R::UpgradeAgents { select, batch, failure_budget, timeout_ms } => c.upgrades.start(cx.actor, &select, batch, failure_budget, timeout_ms).await,
        R::Stats { since_ms, environment } => reply(stats::report(store, cx.now, since_ms, environment), A::Stats),
        R::IssueAdmin { name, csr_der } => reply(c.access.issue_admin(cx, &name, &csr_der), |(certificate_pem, ca_certificate_pem)| A::AdminIssued { certificate_pem, ca_certificate_pem }),
        R::CreateLoginToken { name, role, ttl_secs } => reply(c.access.create_login_token(cx, name, role, ttl_secs), A::LoginTokenCreated),
        R::ListLoginTokens => reply(c.access.login_tokens(), A::LoginTokens),
        R::RevokeLoginToken { id } => reply(c.access.revoke_login_token(cx, &id), |t| A::LoginTokens(vec![t])),
        R::AddWebhook { url, format, events, ca_pem } => reply(c.webhooks.add(cx, &url, format, &events, ca_pem.as_deref()), A::WebhookAdded),
        R::ListWebhooks => reply(c.webhooks.list(), A::Webhooks),
        R::RemoveWebhook { id } => reply(c.webhooks.remove(cx, id), done),
        R::AddRepo(add) => reply(c.repos.add(cx, add).await, A::Repo),
        R::ListRepos => reply(c.repos.list(), A::Repos),
        R::ShowRepo { name } => reply(c.repos.show(&name), A::Repo),
        R::RemoveRepo { name } => reply(c.repos.remove(cx, &name), done),
        R::RunRepo(run) => reply(c.repos.run(cx, run).await, A::Run),
    }
}

/// A service's answer as a response: `wrap` for a value, the error's `AdminError`
/// otherwise.
fn reply<T, E: AdminFailure>(
    result: Result<T, E>,
    wrap: impl FnOnce(T) -> AdminResponse,
) -> AdminResponse {
    result.map_or_else(|e| AdminResponse::Error(admin_error(&e)), wrap)
}

/// What to tell the admin when a change needs no more than a sentence.
fn done(message: String) -> AdminResponse {
    AdminResponse::Done { message }
}
