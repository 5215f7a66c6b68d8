//! `gantry-loadagent`: many simulated agents in one process, for `bench-scale`.
//!
//! Each simulated agent is a real agent as far as the coordinator can tell: it enrolls
//! with the join token (its own key, made here, and its own certificate), connects with
//! that certificate, says hello with the labels, capabilities and figures a real agent
//! reports, heartbeats at the interval the welcome names, accepts dispatches and reports
//! their results (kept and sent again until acknowledged, and listed in the next hello),
//! and after a lost connection reconnects on the real agent's backoff schedule
//! (`gantry_agent::base::backoff`, full jitter from 200 ms, capped at `--max-backoff`).
//! What it leaves out is only what happens on a real host: jobs run no process (they end
//! after `--job-ms`), there are no logs, artifacts, deployments or renewals.
//!
//! Unlike a real agent, many agents share one UDP socket (`--per-socket`, quinn's
//! endpoint demultiplexes by connection id), so 2,500 agents need 10 descriptors, not
//! 2,500.
//!
//! A real host does its TLS handshake with its own CPU; here thousands share the
//! machine's cores with the coordinator, and 2,500 handshakes started at once would each
//! take so long that they time out and start again, which measures this machine, not
//! the coordinator. So a process lets `--connect-concurrency` (32) of its agents
//! handshake at a time; the others wait their turn, and that wait counts in every
//! figure the benchmark prints.
//!
//! It prints one [`LoadEvent`] per line on stdout and exits when stdin closes, so the
//! benchmark that started it can never leave it behind.
//!
//! Usage: `gantry-loadagent --token TOKEN --agents N [--name PREFIX] [--per-socket 250]
//! [--enroll-concurrency 16] [--connect-concurrency 32] [--max-backoff-ms 30000]
//! [--job-ms 0] [--slots 1]`

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gantry_agent::base::backoff::{self, next_delay};
use gantry_certs::{ClientTls, JoinToken};
use gantry_protocol::{
    limits, AgentHello, AgentMessage, CoordinatorMessage, EnrollRequest, HelloReply, HostFigures,
    Intent, JobId, JobOutcome, JobResult, Labels, RunningJob, UnixMillis,
};
use gantry_tests::load::{now_ns, LoadEvent};
use gantry_transport::{Dialer, Dialled, FrameWriter, Profile};
use tokio::sync::{mpsc, Semaphore};

/// The real agent's handshake deadline (agent/src/session.rs).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Enrollment attempts per agent before the process gives up.
const ENROLL_ATTEMPTS: u32 = 8;

#[derive(Debug, Clone)]
struct Options {
    token: String,
    agents: usize,
    name: String,
    per_socket: usize,
    enroll_concurrency: usize,
    connect_concurrency: usize,
    max_backoff: Duration,
    job_time: Duration,
    slots: u32,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Self {
            token: String::new(),
            agents: 0,
            name: "load".into(),
            per_socket: 250,
            enroll_concurrency: 16,
            connect_concurrency: 32,
            max_backoff: Duration::from_secs(30),
            job_time: Duration::ZERO,
            slots: 1,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--token" => o.token = value()?,
                "--agents" => o.agents = value()?.parse()?,
                "--name" => o.name = value()?,
                "--per-socket" => o.per_socket = value()?.parse::<usize>()?.max(1),
                "--enroll-concurrency" => o.enroll_concurrency = value()?.parse::<usize>()?.max(1),
                "--connect-concurrency" => {
                    o.connect_concurrency = value()?.parse::<usize>()?.max(1);
                }
                "--max-backoff-ms" => o.max_backoff = Duration::from_millis(value()?.parse()?),
                "--job-ms" => o.job_time = Duration::from_millis(value()?.parse()?),
                "--slots" => o.slots = value()?.parse::<u32>()?.max(1),
                other => anyhow::bail!("unknown argument {other:?}"),
            }
        }
        anyhow::ensure!(!o.token.is_empty(), "--token is required");
        anyhow::ensure!(o.agents > 0, "--agents must be at least 1");
        Ok(o)
    }
}

/// One enrolled agent's identity: its certificate and key, never shared.
#[derive(Debug, Clone)]
struct Identity {
    hostname: String,
    /// Certificate and key, PEM, as `agent.pem` holds them.
    pem: String,
}

/// What the process's agents have in common.
#[derive(Debug)]
struct Shared {
    address: String,
    ca_der: Vec<u8>,
    options: Options,
    live: AtomicUsize,
    welcomes: AtomicU64,
    out: std_mpsc::Sender<LoadEvent>,
    started: Instant,
    /// Handshakes in progress in this process (see the module comment).
    connecting: Semaphore,
}

impl Shared {
    fn emit(&self, event: LoadEvent) {
        // The printer only stops when stdout is gone, and then so is the benchmark.
        let _ = self.out.send(event);
    }
}

fn main() -> std::process::ExitCode {
    // The benchmark holds our stdin: when it goes away (finished, failed or killed) so
    // do we, on every path.
    std::thread::spawn(|| {
        let mut buf = [0u8; 256];
        loop {
            match std::io::stdin().read(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
    let (out, lines) = std_mpsc::channel::<LoadEvent>();
    let printer = std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::new(stdout.lock());
        while let Ok(event) = lines.recv() {
            let _ = writeln!(w, "{}", event.line());
            while let Ok(more) = lines.try_recv() {
                let _ = writeln!(w, "{}", more.line());
            }
            if w.flush().is_err() {
                std::process::exit(0);
            }
        }
    });
    let result = Options::parse().and_then(|options| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(run(options, out.clone()))
    });
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = out.send(LoadEvent::Fatal(format!("{e:#}")));
            1
        }
    };
    drop(out);
    let _ = printer.join();
    std::process::ExitCode::from(code)
}

async fn run(options: Options, out: std_mpsc::Sender<LoadEvent>) -> anyhow::Result<()> {
    let token = JoinToken::parse(&options.token)?;
    let started = Instant::now();
    let (ca_pem, identities) = enroll_all(&token, &options).await?;
    let _ = out.send(LoadEvent::Enrolled {
        agents: identities.len(),
        millis: started.elapsed().as_millis() as u64,
    });
    let ca_der = gantry_certs::pem_to_der(&ca_pem)?;
    let shared = Arc::new(Shared {
        address: token.coordinator_address.clone(),
        ca_der,
        options: options.clone(),
        live: AtomicUsize::new(0),
        welcomes: AtomicU64::new(0),
        out,
        started: Instant::now(),
        connecting: Semaphore::new(options.connect_concurrency),
    });
    // Sockets shared by `per_socket` agents each; the TLS identity is chosen per
    // connection, so the dialer's own configuration is never used to connect.
    let mut dialers = Vec::new();
    for chunk in identities.chunks(options.per_socket) {
        let default = ClientTls::mutual(&shared.ca_der, &chunk[0].pem, &chunk[0].pem)?;
        // An agent's session, with the real agent's limits (agent/src/session.rs).
        dialers.push(Arc::new(Dialer::with_profile(
            default,
            false,
            Profile::Control,
        )?));
    }
    for (i, identity) in identities.into_iter().enumerate() {
        let dialer = dialers[i / options.per_socket].clone();
        tokio::spawn(agent(identity, dialer, shared.clone()));
    }
    // Report the live count whenever it changes (at most every 50 ms).
    let mut last = (usize::MAX, u64::MAX);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let now = (
            shared.live.load(Ordering::Relaxed),
            shared.welcomes.load(Ordering::Relaxed),
        );
        if now != last {
            last = now;
            shared.emit(LoadEvent::Live {
                live: now.0,
                welcomes: now.1,
                at_ns: now_ns(),
            });
        }
    }
}

/// Enrolls `options.agents` agents, `enroll_concurrency` at a time, each with a key of
/// its own; returns the CA certificate and the identities.
async fn enroll_all(
    token: &JoinToken,
    options: &Options,
) -> anyhow::Result<(String, Vec<Identity>)> {
    let pinned = ClientTls::pinned(&token.ca_fingerprint)?;
    let dialer = Arc::new(Dialer::with_profile(pinned, false, Profile::Control)?);
    let limit = Arc::new(Semaphore::new(options.enroll_concurrency));
    let mut tasks = Vec::new();
    for i in 0..options.agents {
        let (dialer, limit, token) = (dialer.clone(), limit.clone(), token.clone());
        let hostname = format!("{}-{i}", options.name);
        tasks.push(tokio::spawn(async move {
            let _slot = limit.acquire_owned().await?;
            let mut attempt = 0;
            loop {
                match enroll_one(&dialer, &token, &hostname).await {
                    Ok(enrolled) => return Ok::<_, anyhow::Error>(enrolled),
                    Err(e) if attempt + 1 >= ENROLL_ATTEMPTS => {
                        return Err(e.context(format!("enrolling {hostname}")));
                    }
                    Err(_) => {
                        let delay = next_delay(
                            attempt,
                            backoff::BASE_DELAY,
                            Duration::from_secs(5),
                            fastrand::f64(),
                        );
                        attempt += 1;
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }));
    }
    let mut ca = String::new();
    let mut identities = Vec::with_capacity(options.agents);
    for task in tasks {
        let (ca_pem, identity) = task.await??;
        ca = ca_pem;
        identities.push(identity);
    }
    dialer.shutdown(Duration::from_secs(1)).await;
    Ok((ca, identities))
}

async fn enroll_one(
    dialer: &Dialer,
    token: &JoinToken,
    hostname: &str,
) -> anyhow::Result<(String, Identity)> {
    let key = gantry_certs::generate_key_and_csr()?;
    let conn = dialer
        .connect(&token.coordinator_address, CONNECT_DEADLINE)
        .await?;
    let (mut w, mut r) = conn.open_control().await?;
    let intent = Intent::Enroll(EnrollRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        csr_der: key.csr_der,
        hostname: hostname.to_owned(),
        labels: Labels::new(),
    });
    w.send_frame(&gantry_protocol::encode_hello(
        &intent,
        limits::MAX_FRAME_BYTES,
    )?)
    .await?;
    let reply = r
        .recv_within::<HelloReply>(Duration::from_secs(30), "the enrollment reply")
        .await?;
    conn.close(gantry_protocol::CloseCode::Normal, "enrolled");
    match reply {
        Some(HelloReply::Enrolled(e)) => Ok((
            e.ca_certificate_pem,
            Identity {
                hostname: hostname.to_owned(),
                pem: format!("{}{}", e.certificate_pem, key.key_pem),
            },
        )),
        other => anyhow::bail!("enrollment refused: {other:?}"),
    }
}

/// A job attempt the agent holds.
#[derive(Debug)]
struct Held {
    job: JobId,
    attempt: u32,
    started_at: UnixMillis,
    ends_at: tokio::time::Instant,
}

/// What one agent keeps across its connections, as the real agent's `JobManager` does.
#[derive(Debug, Default)]
struct Jobs {
    running: Vec<Held>,
    /// Results sent but not acknowledged: sent again on the next connection.
    unacked: Vec<JobResult>,
}

impl Jobs {
    fn in_hello(&self) -> Vec<RunningJob> {
        self.running
            .iter()
            .map(|h| RunningJob {
                job: h.job,
                attempt: h.attempt,
            })
            .chain(self.unacked.iter().map(|r| RunningJob {
                job: r.job,
                attempt: r.attempt,
            }))
            .collect()
    }
}

/// One simulated agent, forever: a session, then the real agent's backoff, again.
async fn agent(identity: Identity, dialer: Arc<Dialer>, shared: Arc<Shared>) {
    let mut jobs = Jobs::default();
    let mut attempt: u32 = 0;
    loop {
        if let Some(welcomed) = session(&identity, &dialer, &shared, &mut jobs).await {
            if welcomed.elapsed() > backoff::HEALTHY_SESSION {
                attempt = 0;
            }
        }
        let delay = next_delay(
            attempt,
            backoff::BASE_DELAY,
            shared.options.max_backoff,
            fastrand::f64(),
        );
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

fn figures(shared: &Shared) -> HostFigures {
    HostFigures {
        cpu_count: 4,
        cpu_percent: 3.5,
        memory_total_bytes: 8 << 30,
        memory_used_bytes: 2 << 30,
        disk_total_bytes: 100 << 30,
        disk_free_bytes: 60 << 30,
        load_average: [0.12, 0.2, 0.31],
        uptime_secs: 86_400 + shared.started.elapsed().as_secs(),
    }
}

/// One connection; returns when it was welcomed, if it was.
async fn session(
    identity: &Identity,
    dialer: &Dialer,
    shared: &Shared,
    jobs: &mut Jobs,
) -> Option<Instant> {
    let turn = shared.connecting.acquire().await.ok()?;
    // A fresh TLS configuration per connection, as the real agent makes one per session.
    let tls = ClientTls::mutual(&shared.ca_der, &identity.pem, &identity.pem).ok()?;
    let conn = dialer
        .connect_with(tls, Dialled::Coordinator, &shared.address, CONNECT_DEADLINE)
        .await
        .ok()?;
    let (mut writer, mut reader) = conn.open_control().await.ok()?;
    let hello = Intent::Agent(AgentHello {
        agent_version: format!("{} (loadagent)", env!("CARGO_PKG_VERSION")),
        hostname: identity.hostname.clone(),
        labels: gantry_agent::base::labels::automatic(&identity.hostname),
        capabilities: vec!["shell".into()],
        slots: shared.options.slots,
        figures: figures(shared),
        running: jobs.in_hello(),
        peer_port: None,
    });
    let frame = gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES).ok()?;
    writer.send_frame(&frame).await.ok()?;
    let Ok(Some(HelloReply::Welcome(welcome))) = reader
        .recv_within::<HelloReply>(limits::HANDSHAKE_DEADLINE, "the welcome")
        .await
    else {
        return None;
    };
    drop(turn);
    let welcomed = Instant::now();
    shared.live.fetch_add(1, Ordering::Relaxed);
    shared.welcomes.fetch_add(1, Ordering::Relaxed);
    let interval = match welcome.heartbeat_interval_ms {
        0 => limits::DEFAULT_HEARTBEAT_INTERVAL,
        ms => Duration::from_millis(ms),
    };
    let (tx, mut inbound) = mpsc::channel(8);
    // Frame reads are not cancel-safe, so they run in their own task (as in the agent).
    let reader_task = tokio::spawn(async move {
        loop {
            let msg = reader.recv::<CoordinatorMessage>().await;
            let last = !matches!(msg, Ok(Some(_)));
            if tx.send(msg).await.is_err() || last {
                return;
            }
        }
    });
    let _ = live(shared, &mut writer, &mut inbound, interval, jobs).await;
    reader_task.abort();
    shared.live.fetch_sub(1, Ordering::Relaxed);
    drop(conn);
    Some(welcomed)
}

type Inbound = mpsc::Receiver<Result<Option<CoordinatorMessage>, gantry_transport::TransportError>>;

/// The welcomed session: heartbeats, dispatches, results. Returns when it breaks.
async fn live(
    shared: &Shared,
    writer: &mut FrameWriter,
    inbound: &mut Inbound,
    interval: Duration,
    jobs: &mut Jobs,
) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for result in jobs.unacked.clone() {
        writer.send(&AgentMessage::JobFinished(result)).await?;
    }
    loop {
        let next_end = jobs.running.iter().map(|h| h.ends_at).min();
        tokio::select! {
            _ = ticks.tick() => {
                writer.send(&AgentMessage::Heartbeat(figures(shared))).await?;
            }
            () = sleep_until(next_end) => {
                let now = tokio::time::Instant::now();
                let (done, still): (Vec<Held>, Vec<Held>) =
                    jobs.running.drain(..).partition(|h| h.ends_at <= now);
                jobs.running = still;
                for held in done {
                    let result = JobResult {
                        job: held.job,
                        attempt: held.attempt,
                        outcome: JobOutcome::Succeeded,
                        log_chunks: 0,
                        started_at: held.started_at,
                        finished_at: UnixMillis::now(),
                    };
                    jobs.unacked.push(result.clone());
                    writer.send(&AgentMessage::JobFinished(result)).await?;
                }
            }
            message = inbound.recv() => {
                let Some(Ok(Some(message))) = message else {
                    anyhow::bail!("the control stream ended");
                };
                if let Some(reply) = handle(shared, message, jobs) {
                    writer.send(&reply).await?;
                }
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn handle(shared: &Shared, message: CoordinatorMessage, jobs: &mut Jobs) -> Option<AgentMessage> {
    match message {
        // A simulated job only holds a slot: what it would run does not matter.
        CoordinatorMessage::Dispatch(assignment)
        | CoordinatorMessage::DispatchJob { assignment, .. } => {
            let (job, attempt) = (assignment.job, assignment.attempt);
            shared.emit(LoadEvent::Dispatch {
                run: job.run.0,
                index: job.index,
                attempt,
                at_ns: now_ns(),
            });
            if jobs.running.len() >= shared.options.slots as usize {
                return Some(AgentMessage::JobRejected {
                    job,
                    attempt,
                    reason: "no free slot".into(),
                });
            }
            jobs.running.push(Held {
                job,
                attempt,
                started_at: UnixMillis::now(),
                ends_at: tokio::time::Instant::now() + shared.options.job_time,
            });
            Some(AgentMessage::JobAccepted { job, attempt })
        }
        CoordinatorMessage::Cancel { job, attempt } => {
            let before = jobs.running.len();
            jobs.running
                .retain(|h| !(h.job == job && h.attempt == attempt));
            (jobs.running.len() < before).then(|| {
                let result = JobResult {
                    job,
                    attempt,
                    outcome: JobOutcome::Cancelled,
                    log_chunks: 0,
                    started_at: UnixMillis::now(),
                    finished_at: UnixMillis::now(),
                };
                jobs.unacked.push(result.clone());
                AgentMessage::JobFinished(result)
            })
        }
        CoordinatorMessage::JobFinishedAck { job, attempt } => {
            jobs.unacked
                .retain(|r| !(r.job == job && r.attempt == attempt));
            shared.emit(LoadEvent::Acked {
                run: job.run.0,
                index: job.index,
                at_ns: now_ns(),
            });
            None
        }
        // A simulated agent sends only messages about work it holds; a refusal would be
        // a harness bug worth seeing.
        CoordinatorMessage::Refused { message } => {
            eprintln!("gantry-loadagent: the coordinator refused a message: {message}");
            None
        }
        // Renewals, deployments and ad-hoc commands are not simulated.
        CoordinatorMessage::CertificateRenewed { .. }
        | CoordinatorMessage::RenewalRefused { .. }
        | CoordinatorMessage::Deploy(_)
        | CoordinatorMessage::Exec(_) => None,
    }
}
