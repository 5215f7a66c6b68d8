//! `gantry demo`: one command that shows Gantry working on a fresh machine.
//!
//! It creates a temporary directory, initializes a coordinator there, starts it as a
//! child process, enrolls and starts three real `gantry-agent` processes (found next to
//! this binary, or at `GANTRY_AGENT_BIN`), waits until all of them are connected and have
//! reported their figures, prints them, creates a git repository holding the example
//! pipeline (`examples/ci.yml`, as `gantry.yml`) with one commit, adds it to the
//! coordinator (`gantry repos add`, a `file://` URL) and runs that commit on the agents
//! (`gantry run --repo`, approving its manual gate; without `git` it says so and runs the
//! file itself), shows the jobs and a log, then deploys the build's
//! artifact (a small HTTP service, `python3 -m http.server`) to the three agents as hosts,
//! each with its own deploy root and port, with a rolling strategy and HTTP health checks,
//! shows the deployment's history, asks every host what it serves with `gantry exec`,
//! and stops everything. Nothing is left running and the directory is removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use gantry_protocol::{
    AdminRequest, AdminResponse, AgentState, FollowEvent, JobId, Labels, StreamOpen, SubmitRun,
};

use crate::cli::client::{AdminClient, FETCH_DEADLINE};
use crate::cli::context::{AdminContext, LoadedContext};
use crate::cli::failure::Failure;
use crate::cli::{init, output};

/// How long the demo waits for the coordinator and agents at each step.
const STEP_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub agents: u32,
    /// Keep everything running until Ctrl-C, to try the admin CLI against it.
    #[arg(long)]
    pub keep_running: bool,
}

/// Child processes that are stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
#[derive(Debug, Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn stop_all(&mut self) {
        for (_, child) in &mut self.0 {
            terminate(child.id());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, child) in &mut self.0 {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        eprintln!("{name} did not stop within 5 s; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[allow(unsafe_code)]
fn terminate(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory effects; a stale pid at worst fails with ESRCH.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GANTRY_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot locate the gantry binary")?;
    let beside = exe.with_file_name("gantry-agent");
    if beside.exists() {
        return Ok(beside);
    }
    bail!(
        "gantry-agent was not found next to {} : build both binaries with `cargo build --release --bins`, or set GANTRY_AGENT_BIN",
        exe.display()
    )
}

fn free_tcp_port() -> anyhow::Result<u16> {
    let sock = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot bind a TCP socket on 127.0.0.1")?;
    Ok(sock.local_addr()?.port())
}

/// Whether `program --version` runs (python3 for the deployment, git for the repository).
fn program_available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The HTTP servers the demo's deployment started on its hosts: stopped when dropped
/// (the agents' deploy hooks leave them running, as a service would be).
struct DemoServers(PathBuf);

impl Drop for DemoServers {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            let pid_file = entry.path().join("deploy/hello/shared/server.pid");
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            {
                terminate(pid);
            }
        }
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .context("cannot bind a UDP socket on 127.0.0.1")?;
    Ok(sock.local_addr()?.port())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    let f = std::fs::File::create(dir.join(format!("{name}.log")))
        .with_context(|| format!("cannot create {name}.log"))?;
    Ok(Stdio::from(f))
}

pub async fn run(args: DemoArgs) -> Result<ExitCode, Failure> {
    demo(&args).await.map_err(Failure::Work)?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let agent_bin = agent_binary()?;
    let gantry_bin = std::env::current_exe().context("cannot locate the gantry binary")?;
    let dir = tempfile::Builder::new()
        .prefix("gantry-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let root = dir.path();
    let port = free_udp_port()?;
    let address = format!("127.0.0.1:{port}");
    let context = root.join("admin").join("context.toml");
    println!("== Gantry demo in {}", root.display());

    init::run(&init::InitArgs {
        data_dir: root.join("coordinator"),
        listen: address.clone(),
        advertise: Some(address.clone()),
        admin_name: "demo".into(),
        agent_cert_ttl: "1d".into(),
        heartbeat_interval: "1s".into(),
        http_listen: None,
        http_tls: false,
        config: None,
        context: Some(context.clone()),
    })
    .map_err(|f| match f {
        Failure::Work(e) | Failure::Usage(e) | Failure::Unreachable(e) => e.context("gantry init"),
    })?;

    let mut children = Children::default();
    let server = Command::new(&gantry_bin)
        .args(["server", "--data-dir"])
        .arg(root.join("coordinator"))
        .stdout(log_file(root, "coordinator")?)
        .stderr(log_file(root, "coordinator.err")?)
        .spawn()
        .context("cannot start the coordinator")?;
    children.0.push(("coordinator".into(), server));
    println!("== coordinator started on {address} (QUIC, mutual TLS)");

    let ctx = AdminContext::load(&context)?;
    let mut admin = connect_with_retry(&ctx).await?;
    let AdminResponse::TokenCreated(token) = admin
        .request(&AdminRequest::CreateToken {
            ttl_secs: 600,
            uses: args.agents,
            labels: Labels::from([
                ("demo".to_owned(), "true".to_owned()),
                ("role".to_owned(), "web".to_owned()),
            ]),
        })
        .await?
    else {
        bail!("unexpected response to token create");
    };
    println!(
        "== join token {} created for {} agents",
        token.token_id, args.agents
    );

    let _servers = DemoServers(root.to_path_buf());
    for i in 1..=args.agents {
        let data = root.join(format!("agent-{i}"));
        let web_port = free_tcp_port()?;
        let status = Command::new(&agent_bin)
            .args([
                "enroll",
                "--token",
                &token.token,
                "--label",
                &format!("demo-agent={i}"),
                "--label",
                &format!("port={web_port}"),
                "--data-dir",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log_file(root, &format!("agent-{i}-enroll"))?)
            .status()
            .context("cannot run gantry-agent enroll")?;
        if !status.success() {
            bail!(
                "gantry-agent enroll failed ({status}); see {}",
                root.join(format!("agent-{i}-enroll.log")).display()
            );
        }
        let child = Command::new(&agent_bin)
            .args(["run", "--data-dir"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log_file(root, &format!("agent-{i}"))?)
            .spawn()
            .context("cannot start gantry-agent run")?;
        children.0.push((format!("agent-{i}"), child));
    }
    println!(
        "== {} agents enrolled (keys generated on each, CSRs signed) and started",
        args.agents
    );

    let deadline = Instant::now() + STEP_DEADLINE;
    let agents = loop {
        let AdminResponse::Agents(agents) = admin.request(&AdminRequest::ListAgents).await? else {
            bail!("unexpected response to agents list");
        };
        let ready = agents
            .iter()
            .filter(|a| {
                a.state == AgentState::Connected
                    && a.figures.as_ref().is_some_and(|f| f.cpu_count > 0)
            })
            .count();
        if ready == args.agents as usize {
            break agents;
        }
        if Instant::now() > deadline {
            bail!(
                "only {ready} of {} agents connected within {STEP_DEADLINE:?}; logs are in {}",
                args.agents,
                root.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("== all {} agents connected and reporting:\n", args.agents);
    print!(
        "{}",
        output::fleet::agents_table(&agents, gantry_protocol::UnixMillis::now())
    );
    let deploys = program_available("python3");
    if !deploys {
        println!("\n(python3 was not found: the demo's HTTP service needs it, so the deployment part is skipped)");
    }
    let repo = if program_available("git") {
        Some(demo_repository(root)?)
    } else {
        println!("\n(git was not found: the demo runs the example pipeline without a repository)");
        None
    };
    demo_pipeline(&mut admin, deploys, repo.as_ref()).await?;
    if deploys {
        demo_deployment(&mut admin).await?;
    }
    if let AdminResponse::Status(s) = admin.request(&AdminRequest::Status).await? {
        println!(
            "\ncoordinator: {} connected, {} enrolled, {} revoked",
            s.agents_connected, s.agents_total, s.agents_revoked
        );
    }
    admin.close().await;

    if args.keep_running {
        println!(
            "\nrunning; try: GANTRY_CONFIG={} gantry agents list    (Ctrl-C to stop)",
            context.display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    children.stop_all();
    println!(
        "\n== demo finished: coordinator and agents stopped, {} removed",
        root.display()
    );
    Ok(())
}

/// The example pipeline (`examples/ci.yml`), built into the binary so the demo runs from
/// any directory.
const EXAMPLE_PIPELINE: &str = include_str!("../../../examples/ci.yml");

/// The repository's name on the demo coordinator.
const DEMO_REPO: &str = "demo-app";

/// Who makes the demo repository's commit.
const DEMO_AUTHOR: (&str, &str) = ("Gantry Demo", "demo@gantry.invalid");

/// The demo's git repository: where it is, as a `file://` URL.
struct DemoRepo {
    url: String,
    /// The commit's subject line.
    subject: String,
}

/// Runs `git ARGS` in `dir` with the demo author and no user or system configuration
/// (so a signing or hook setting on this machine cannot change the commit); its stdout.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", DEMO_AUTHOR.0)
        .env("GIT_AUTHOR_EMAIL", DEMO_AUTHOR.1)
        .env("GIT_COMMITTER_NAME", DEMO_AUTHOR.0)
        .env("GIT_COMMITTER_EMAIL", DEMO_AUTHOR.1)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run git {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "git {} failed in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Creates the demo's git repository under `root`: the example pipeline as `gantry.yml`
/// and a README, committed on `main` by the demo author.
fn demo_repository(root: &Path) -> anyhow::Result<DemoRepo> {
    let dir = root.join("repo");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("gantry.yml"), EXAMPLE_PIPELINE)
        .context("cannot write the demo repository's gantry.yml")?;
    std::fs::write(
        dir.join("README.md"),
        "# demo-app\n\nThe `gantry demo` repository: its pipeline is `gantry.yml`.\n",
    )
    .context("cannot write the demo repository's README.md")?;
    git(&dir, &["init", "--quiet"])?;
    git(&dir, &["add", "gantry.yml", "README.md"])?;
    git(&dir, &["commit", "--quiet", "-m", "Add the demo pipeline"])?;
    let head = git(&dir, &["log", "-1", "--format=%H \"%s\""])?;
    println!(
        "\n== git repository {} created: commit {head} by {} <{}>",
        dir.display(),
        DEMO_AUTHOR.0,
        DEMO_AUTHOR.1
    );
    Ok(DemoRepo {
        url: format!("file://{}", dir.display()),
        subject: git(&dir, &["log", "-1", "--format=%s"])?,
    })
}

/// Starts the run: of the demo repository's commit on `main` (added to the coordinator
/// first), or of the example file itself when there is no repository.
async fn start_run(
    admin: &mut AdminClient,
    inputs: Labels,
    repo: Option<&DemoRepo>,
) -> anyhow::Result<gantry_protocol::RunView> {
    let response = if let Some(repo) = repo {
        admin
            .request_within(
                &AdminRequest::AddRepo(gantry_protocol::AddRepo::plain(DEMO_REPO, &repo.url)),
                FETCH_DEADLINE,
            )
            .await?;
        println!(
            "== added to the coordinator as repository {DEMO_REPO} (`gantry repos add {DEMO_REPO} --url {}`)",
            repo.url
        );
        admin
            .request_within(
                &AdminRequest::RunRepo(gantry_protocol::RunRepo {
                    repo: DEMO_REPO.into(),
                    git_ref: Some("main".into()),
                    inputs,
                }),
                FETCH_DEADLINE,
            )
            .await?
    } else {
        let submit = SubmitRun {
            file_name: "examples/ci.yml".into(),
            text: EXAMPLE_PIPELINE.into(),
            git_ref: "main".into(),
            commit: None,
            event: "manual".into(),
            inputs,
            source: None,
        };
        admin.request(&AdminRequest::SubmitRun(submit)).await?
    };
    let AdminResponse::Run(run) = response else {
        bail!("unexpected response to a run request");
    };
    Ok(run)
}

/// Runs the example pipeline on the demo agents (the repository's commit if there is
/// one), approves its manual gate, and shows the jobs and the build's log.
async fn demo_pipeline(
    admin: &mut AdminClient,
    deploy: bool,
    repo: Option<&DemoRepo>,
) -> anyhow::Result<()> {
    let inputs = Labels::from([(
        "deploy".to_owned(),
        if deploy { "yes" } else { "no" }.to_owned(),
    )]);
    let run = start_run(admin, inputs, repo).await?;
    let id = run.run;
    let commit = run
        .commit
        .as_deref()
        .map(|c| {
            let subject = repo
                .map(|r| format!(" \"{}\"", r.subject))
                .unwrap_or_default();
            format!(
                " of commit {}{subject} on {}",
                &c[..c.len().min(7)],
                run.git_ref
            )
        })
        .unwrap_or_default();
    println!(
        "\n== running pipeline {} (run {id}){commit}: {} jobs, pushed to the agents as they become ready\n",
        run.pipeline,
        run.jobs.len()
    );
    let mut shown: std::collections::HashMap<JobId, String> = std::collections::HashMap::new();
    let deadline = Instant::now() + STEP_DEADLINE * 2;
    let view = loop {
        let AdminResponse::Run(view) = admin.request(&AdminRequest::ShowRun { run: id }).await?
        else {
            bail!("unexpected response to pipelines show");
        };
        for job in &view.jobs {
            if shown.get(&job.job) != Some(&job.state) {
                let agent = job
                    .agent
                    .as_ref()
                    .map(|a| format!(" on {a}"))
                    .unwrap_or_default();
                println!(
                    "  {:<6} {:<20} {}{agent}",
                    job.job.to_string(),
                    job.name,
                    job.state
                );
                shown.insert(job.job, job.state.clone());
                if job.state == "awaiting-approval" {
                    println!(
                        "         (a manual gate: approving it, as `gantry approve {}` would)",
                        job.job
                    );
                    admin
                        .request(&AdminRequest::Approve { job: job.job })
                        .await?;
                }
            }
        }
        if view.finished_at.is_some() {
            break view;
        }
        if Instant::now() > deadline {
            bail!("run {id} did not finish within {:?}", STEP_DEADLINE * 2);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("\n== run {id} {}:\n", view.state);
    print!("{}", output::runs::jobs_table(&view.jobs));
    if let AdminResponse::Artifacts(artifacts) = admin
        .request(&AdminRequest::ListArtifacts { run: id })
        .await?
    {
        println!("\n== artifacts of run {id} (content-addressed, deduplicated chunks):\n");
        print!(
            "{}",
            output::runs::artifacts_table(&artifacts, gantry_protocol::UnixMillis::now())
        );
    }
    if let Some(release) = view.jobs.iter().find(|j| j.name == "release") {
        println!(
            "\n== log of {} ({}), which received the build's artifact:",
            release.name, release.job
        );
        let mut reader = admin
            .follow(&StreamOpen::FollowLogs {
                job: release.job,
                from_seq: 0,
                follow: false,
            })
            .await?;
        while let Ok(Some(event)) = reader.recv::<FollowEvent>().await {
            match event {
                FollowEvent::Log(chunk) => print!("{}", String::from_utf8_lossy(&chunk.data)),
                FollowEvent::End { .. } | FollowEvent::Error(_) => break,
                FollowEvent::Job(_) => {}
            }
        }
    }
    if view.state != "succeeded" {
        bail!("the demo pipeline ended {}", view.state);
    }
    Ok(())
}

async fn connect_with_retry(ctx: &LoadedContext) -> anyhow::Result<AdminClient> {
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        match AdminClient::connect(ctx).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("the coordinator did not come up: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Shows the deployment the pipeline made, checks every host serves the release, and
/// asks the hosts with `gantry exec`.
async fn demo_deployment(admin: &mut AdminClient) -> anyhow::Result<()> {
    let AdminResponse::Deployments(list) = admin
        .request(&AdminRequest::ListDeployments {
            environment: Some("demo".into()),
            limit: 10,
        })
        .await?
    else {
        bail!("unexpected response to deployments list");
    };
    let Some(latest) = list.first() else {
        bail!("the pipeline's deploy job made no deployment");
    };
    println!("\n== deployments to environment demo (`gantry deployments list`):\n");
    print!(
        "{}",
        crate::cli::output::deploy::deployments_table(&list, gantry_protocol::UnixMillis::now())
    );
    let AdminResponse::Deployment(view) = admin
        .request(&AdminRequest::ShowDeployment { id: latest.id })
        .await?
    else {
        bail!("unexpected response to deployments show");
    };
    println!(
        "\n== deployment {} (`gantry deployments show {}`): staged everywhere, then switched one host at a time, each checked over HTTP\n",
        view.id, view.id
    );
    print!(
        "{}",
        crate::cli::output::deploy::deployment_detail(&view, gantry_protocol::UnixMillis::now())
    );
    if view.state != "succeeded" {
        bail!("the demo deployment ended {}", view.state);
    }
    if let AdminResponse::Stats(stats) = admin
        .request(&AdminRequest::Stats {
            since_ms: 86_400_000,
            environment: Some("demo".into()),
        })
        .await?
    {
        println!("\n== delivery figures (`gantry stats`):\n");
        print!("{}", crate::cli::output::deploy::stats_table(&stats));
    }
    println!("\n== `gantry exec --select role=web -- cat hello/current/out/app.txt`:\n");
    let mut reader = admin
        .follow(&StreamOpen::Exec(gantry_protocol::ExecRequest {
            select: Labels::from([("role".to_owned(), "web".to_owned())]),
            parallel: 0,
            command: "cat hello/current/out/app.txt".into(),
            timeout_ms: 10_000,
        }))
        .await?;
    let mut names = std::collections::HashMap::new();
    let (mut done, mut expected) = (0, usize::MAX);
    while done < expected {
        match reader.recv::<gantry_protocol::ExecEvent>().await? {
            Some(gantry_protocol::ExecEvent::Targets(hosts)) => {
                expected = hosts.len();
                for h in hosts {
                    names.insert(h.agent, h.hostname);
                }
            }
            Some(gantry_protocol::ExecEvent::Output { agent, data }) => {
                for line in String::from_utf8_lossy(&data).lines() {
                    println!(
                        "  {} | {line}",
                        names.get(&agent).map_or("?", String::as_str)
                    );
                }
            }
            Some(gantry_protocol::ExecEvent::Done {
                agent,
                result,
                millis,
            }) => {
                done += 1;
                let host = names.get(&agent).map_or("?", String::as_str);
                match result {
                    Ok(code) => println!("  {host} exited {code} in {millis} ms"),
                    Err(e) => bail!("exec on {host} failed: {e}"),
                }
            }
            Some(gantry_protocol::ExecEvent::Refused { message }) => {
                bail!("exec refused: {message}")
            }
            None => bail!("the exec stream ended early"),
        }
    }
    Ok(())
}
