//! The authorization matrix: every row of the authorization table
//! (`gantry_protocol::authz::Request::ALL`: each session's hello, every admin request,
//! every stream, the agent messages that touch work, every HTTP route) performed for real
//! against the `gantry` binary as every principal: none, the agent holding the work,
//! another agent, viewer, operator and admin, each with the credential it has on the
//! request's channel (certificates on QUIC, login tokens on HTTP; without one, a caller
//! is `none` there). Each answer is checked against the table, each refusal must carry
//! the table's words, and each attempt must show up in the coordinator's own count of
//! decisions (`gantry_authz_decisions_total`) for that row and principal: a path that
//! stopped asking the table fails here even if it happened to answer the same.
//!
//! A new row fails to compile here until [`sample`] says how to perform it.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::time::Duration;

use gantry_certs::{ClientTls, JoinToken};
use gantry_protocol::authz::{Channel, Denied, Principal, Request as R};
use gantry_protocol::{
    limits, AdminErrorKind, AdminHello, AdminRequest, AdminResponse, AgentHello, AgentMessage,
    Attempt, ChunkFrame, ChunkPut, ChunkWants, CloseCode, CoordinatorMessage, DeployCommand,
    DeployOp, DeployResult, Digest, EnrollRequest, ExecEvent, ExecRequest, FollowEvent, Grant,
    HelloReply, HostFigures, HostReport, Intent, JobId, JobOutcome, JobResult, Labels, LogControl,
    ManifestFrame, PutReply, ResolveReply, ResolveRequest, RollbackRequest, RunId, SourceData,
    SourceStored, StreamOpen, SubmitRun, UnixMillis, UploadReply, UploadTarget, WebhookFormat,
};
use gantry_tests::peers::RawAgent;
use gantry_tests::raw::{self, RawClient};
use gantry_tests::{bin, wait_for, Agent, Coordinator, CoordinatorOptions, DEADLINE};
use gantry_transport::{FrameReader, FrameWriter, TransportError};

/// The order principals are tried in within a row: the holder last, since what it may
/// do (reject, accept, finish) changes the work for the others.
const PRINCIPALS: [Principal; 6] = [
    Principal::None,
    Principal::OtherAgent,
    Principal::Viewer,
    Principal::Operator,
    Principal::Admin,
    Principal::Agent,
];

const WEBHOOK_SECRET: &str = "authz-webhook-secret";

/// A pipeline that never runs (no agent has its label): the target of runs the matrix
/// cancels and retries.
const DUMMY: &str =
    "name: dummy\njobs:\n  idle:\n    runs-on: { nobody: here }\n    steps: [{ run: 'true' }]\n";

/// What the matrix acts on: the coordinator, its callers, and work held by one of them.
struct World {
    c: Coordinator,
    _real: Vec<Agent>,
    http: String,
    ca_der: Vec<u8>,
    admin_pem: String,
    /// Login tokens by role.
    logins: HashMap<Principal, String>,
    join_token: JoinToken,
    /// The raw agent holding the victim job, the deployment step and the exec.
    holder: RawAgent,
    holder_dir: Agent,
    /// Another enrolled raw agent, holding nothing.
    other: RawAgent,
    other_dir: Agent,
    /// An enrolled identity that is never connected, for the agent session's own row.
    spare: Agent,
    admin: RawClient,
    run: RunId,
    build: JobId,
    victim: JobId,
    attempt: Attempt,
    site: Digest,
    chunk: Digest,
    dummy: RunId,
    stage: DeployCommand,
    exec_id: u64,
    exec: (FrameWriter, FrameReader),
    upload: Option<(FrameWriter, FrameReader, u64)>,
    agent_sha256: String,
}

/// How a row is performed.
enum Sample {
    Session(Intent),
    Admin(AdminRequest),
    Stream(StreamOpen),
    Message(AgentMessage),
    Http,
}

/// One try: whether it was allowed, what the caller was told, and the decision the
/// coordinator must have counted for it.
#[derive(Debug)]
struct Try {
    allowed: bool,
    told: String,
    counted: (R, Principal),
    /// For a refusal: the table's words it must carry (none for a reset stream).
    marker: Option<String>,
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[test]
fn every_request_as_every_principal_is_allowed_or_refused_as_the_table_says() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut w = World::set_up().await;
        let mut rows: Vec<R> = R::ALL.to_vec();
        rows.sort_by_key(|r| phase(*r));
        let mut performed = 0;
        let mut table = Vec::new();
        for row in rows {
            let mut cells = Vec::new();
            for principal in PRINCIPALS {
                let tries = w.perform(row, principal).await;
                assert!(!tries.is_empty(), "{row} as {principal}: nothing was tried");
                let allowed = tries.iter().any(|t| t.allowed);
                assert_eq!(
                    allowed,
                    row.allows(principal),
                    "{row} as {principal}: the table says {}, the coordinator answered {tries:#?}",
                    row.who_may()
                );
                for t in &tries {
                    if let (false, Some(marker)) = (t.allowed, &t.marker) {
                        assert!(
                            t.told.contains(marker),
                            "{row} as {principal}: a refusal not from the table: {t:?}"
                        );
                    }
                }
                cells.push(if allowed { "allow" } else { "deny" });
                performed += 1;
            }
            table.push(format!("{:32} {}", row.name(), cells.join(" ")));
        }
        assert_eq!(performed, R::ALL.len() * PRINCIPALS.len());
        println!(
            "{:32} {}\n{}",
            "row",
            PRINCIPALS.map(Principal::as_str).join(" "),
            table.join("\n")
        );
    });
}

/// Rows that change the victim job run in the order the job's life allows.
fn phase(row: R) -> u8 {
    match row {
        R::AgentJobRejected => 0,
        R::AgentJobAccepted => 1,
        R::AgentJobFinished => 3,
        _ => 2,
    }
}

/// The principal the coordinator sees behind `principal`'s credential on QUIC, for a
/// row that does (or does not) name work.
fn on_quic(principal: Principal, names_work: bool) -> Principal {
    match principal {
        Principal::None | Principal::Viewer | Principal::Operator => Principal::None,
        Principal::OtherAgent if !names_work => Principal::Agent,
        p => p,
    }
}

/// ... and on HTTP: login tokens only.
fn on_http(principal: Principal) -> Principal {
    match principal {
        Principal::Viewer | Principal::Operator | Principal::Admin => principal,
        _ => Principal::None,
    }
}

/// Every authorization decision the coordinator has counted, by (row, principal, allowed).
fn decisions(http: &str) -> HashMap<(String, String, bool), u64> {
    let (status, body) = http_request(http, "GET", "/metrics", &[], "", true);
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter_map(|l| l.strip_prefix("gantry_authz_decisions_total{"))
        .filter_map(|l| {
            let (labels, n) = l.split_once("} ")?;
            let mut v = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(_, v)| v.trim_matches('"').to_owned());
            let (row, principal, decision) = (v.next()?, v.next()?, v.next()?);
            Some(((row, principal, decision == "allowed"), n.parse().ok()?))
        })
        .collect()
}

/// Checks that `t`'s decision moved between two counts, and its opposite did not.
fn assert_counted(
    before: &HashMap<(String, String, bool), u64>,
    after: &HashMap<(String, String, bool), u64>,
    row: R,
    principal: Principal,
    t: &Try,
) {
    let key = |allowed: bool| {
        (
            t.counted.0.name().to_owned(),
            t.counted.1.as_str().to_owned(),
            allowed,
        )
    };
    let moved = |allowed: bool| {
        after.get(&key(allowed)).copied().unwrap_or(0)
            - before.get(&key(allowed)).copied().unwrap_or(0)
    };
    assert!(
        moved(t.allowed) >= 1,
        "{row} as {principal}: the coordinator did not count a decision for {:?} ({t:?}): the path did not ask the table",
        t.counted
    );
    assert_eq!(
        moved(!t.allowed),
        0,
        "{row} as {principal}: the opposite decision was counted for {:?}",
        t.counted
    );
}

/// One HTTP/1.1 request on a fresh connection: the status, and the body when `body_too`
/// or the request was refused (an allowed stream or binary download is not read).
fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
    body_too: bool,
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP side");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.extend([*k, ": ", v.as_str(), "\r\n"]);
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut piece = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut piece).expect("read the response head");
        assert!(n > 0, "{method} {path}: closed before a response head");
        got.extend_from_slice(&piece[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut rest = got[head_end + 4..].to_vec();
    if body_too || matches!(status, 401 | 403) {
        let _ = stream.take(8 << 20).read_to_end(&mut rest);
    }
    (status, String::from_utf8_lossy(&rest).into_owned())
}

impl World {
    async fn set_up() -> Self {
        let c = blocking(|| {
            Coordinator::start_with(&CoordinatorOptions {
                http: true,
                ..CoordinatorOptions::default()
            })
        });
        let http = c.http_address.clone().expect("http side");
        let ca_der = gantry_certs::pem_to_der(&c.ca_pem()).expect("ca der");
        let admin_pem = c.admin_pem();
        let (logins, join_token, holder_dir, other_dir, spare, source) = blocking(|| {
            let mut logins = HashMap::new();
            for (principal, role) in [
                (Principal::Viewer, "viewer"),
                (Principal::Operator, "operator"),
                (Principal::Admin, "admin"),
            ] {
                let token = c
                    .gantry(&[
                        "admin", "token", "--role", role, "--name", role, "--ttl", "1h",
                    ])
                    .expect_code(0)
                    .stdout
                    .trim()
                    .to_owned();
                logins.insert(principal, token);
            }
            let token = c.token(&["--uses", "3"]);
            let identities: Vec<Agent> = (0..3).map(|_| Agent::enroll(&token, &[])).collect();
            let join = JoinToken::parse(&c.token(&["--uses", "10"])).expect("join token");
            c.gantry(&["env", "create", "authz", "--select", "raw=holder"])
                .expect_code(0);
            let source = tempfile::tempdir().expect("source dir");
            std::fs::write(source.path().join("README"), "the victim's source\n").expect("write");
            let mut identities = identities.into_iter();
            let (h, o, s) = (
                identities.next().expect("h"),
                identities.next().expect("o"),
                identities.next().expect("s"),
            );
            (logins, join, h, o, s, source)
        });
        let real = blocking(|| c.agents_running(1, &["--label", "role=real"]));
        let admin = admin_client(&c.address, &ca_der, &admin_pem).await;
        let mut holder = RawAgent::connect_with_labels(
            &c.address,
            holder_dir.dir.path(),
            Labels::from([("raw".to_owned(), "holder".to_owned())]),
        )
        .await;
        let other = RawAgent::connect_with_labels(
            &c.address,
            other_dir.dir.path(),
            Labels::from([("raw".to_owned(), "other".to_owned())]),
        )
        .await;
        let mut w_admin = admin;
        ask(
            &mut w_admin,
            &AdminRequest::SetSecret {
                name: "GANTRY_WEBHOOK_SECRET".into(),
                value: WEBHOOK_SECRET.into(),
                environment: None,
            },
        )
        .await;
        let dummy = match ask(&mut w_admin, &AdminRequest::SubmitRun(dummy_run())).await {
            AdminResponse::Run(r) => r.run,
            other => panic!("dummy run: {other:?}"),
        };

        // A deployment to the holder, held at its staging step.
        blocking(|| c.run_pipeline(&deploy_pipeline(), &[]));
        let stage = holder
            .expect("the staging step", Duration::from_secs(60), |m| match m {
                CoordinatorMessage::Deploy(d) if matches!(d.op, DeployOp::Stage { .. }) => {
                    Some((**d).clone())
                }
                _ => None,
            })
            .await;

        // An exec on the holder, left running.
        let (mut exec_w, mut exec_r) = w_admin.conn.open_stream().await.expect("exec stream");
        exec_w
            .send(&StreamOpen::Exec(ExecRequest {
                select: Labels::from([("raw".to_owned(), "holder".to_owned())]),
                parallel: 0,
                command: "true".into(),
                timeout_ms: 600_000,
            }))
            .await
            .expect("send exec");
        let targets = exec_r.recv::<ExecEvent>().await.expect("exec targets");
        assert!(
            matches!(targets, Some(ExecEvent::Targets(_))),
            "{targets:?}"
        );
        let exec_id = holder
            .expect("the exec", DEADLINE, |m| match m {
                CoordinatorMessage::Exec(e) => Some(e.id),
                _ => None,
            })
            .await;

        let agent_sha256 = blocking(|| sha256_file(&bin("gantry-agent")));

        // Last: the victim, whose offer runs out 10 s after it is made.
        let source_arg = source.path().to_str().expect("utf8").to_owned();
        let run = RunId(blocking(|| {
            c.run_pipeline(&victim_pipeline(), &["--source", &source_arg])
        }));
        let offered = holder
            .expect("the victim's dispatch", Duration::from_secs(60), |m| {
                m.assignment()
                    .filter(|a| a.job.run == run)
                    .map(|a| (a.job, a.attempt))
            })
            .await;
        let site: Digest = blocking(|| {
            c.gantry(&["artifacts", "list", &run.0.to_string(), "--json"])
                .expect_code(0)
                .json()[0]["manifest"]
                .as_str()
                .expect("manifest")
                .parse()
                .expect("digest")
        });
        drop(source);
        // The real agent built the artifacts; it stays connected, idle, and takes no
        // part in the matrix (no row names its work).
        Self {
            _real: real,
            c,
            http,
            ca_der,
            admin_pem,
            logins,
            join_token,
            holder,
            holder_dir,
            other,
            other_dir,
            spare,
            admin: w_admin,
            run,
            build: JobId { run, index: 0 },
            victim: offered.0,
            attempt: offered.1,
            site,
            chunk: Digest::of(b"ok\n"),
            dummy,
            stage,
            exec_id,
            exec: (exec_w, exec_r),
            upload: None,
            agent_sha256,
        }
    }

    /// Performs `row` as `principal` on every channel that carries it.
    async fn perform(&mut self, row: R, principal: Principal) -> Vec<Try> {
        let mut tries = Vec::new();
        let sample = sample(self, row);
        match &sample {
            Sample::Admin(req) => assert_eq!(R::of_admin(req), row, "sample of {row}"),
            Sample::Stream(open) => assert_eq!(R::of_stream(open), row, "sample of {row}"),
            Sample::Message(m) => assert_eq!(R::of_agent_message(m), Some(row), "sample of {row}"),
            Sample::Session(_) | Sample::Http => {}
        }
        if row.channel() != Channel::Http {
            let before = blocking(|| decisions(&self.http));
            let t = match sample {
                Sample::Session(intent) => self.session_row(row, principal, intent).await,
                Sample::Admin(req) => self.admin_row(row, principal, req).await,
                Sample::Stream(open) => self.stream_row(row, principal, open).await,
                Sample::Message(message) => self.message_row(row, principal, message).await,
                Sample::Http => unreachable!("{row} travels on QUIC"),
            };
            let after = blocking(|| decisions(&self.http));
            assert_counted(&before, &after, row, principal, &t);
            tries.push(t);
        }
        if let Some((method, template)) = row.http_route() {
            let before = blocking(|| decisions(&self.http));
            let t = blocking(|| self.http_row(row, principal, method, template));
            let after = blocking(|| decisions(&self.http));
            assert_counted(&before, &after, row, principal, &t);
            tries.push(t);
        }
        tries
    }

    fn tls(&self, principal: Principal, spare: bool) -> rustls::ClientConfig {
        let identity = |dir: &std::path::Path| {
            std::fs::read_to_string(dir.join("tls/agent.pem")).expect("agent pem")
        };
        match principal {
            Principal::None | Principal::Viewer | Principal::Operator => {
                ClientTls::anonymous(&self.ca_der).expect("tls")
            }
            Principal::Agent | Principal::OtherAgent => {
                let pem = if spare {
                    identity(self.spare.dir.path())
                } else if principal == Principal::Agent {
                    identity(self.holder_dir.dir.path())
                } else {
                    identity(self.other_dir.dir.path())
                };
                ClientTls::mutual(&self.ca_der, &pem, &pem).expect("tls")
            }
            Principal::Admin => {
                ClientTls::mutual(&self.ca_der, &self.admin_pem, &self.admin_pem).expect("tls")
            }
        }
    }

    /// A fresh connection saying `intent`: the client if welcomed, else what it was told.
    async fn hello(
        &self,
        principal: Principal,
        spare: bool,
        intent: &Intent,
    ) -> Result<RawClient, String> {
        let mut client = raw::connect(&self.c.address, self.tls(principal, spare))
            .await
            .map_err(|e| e.to_string())?;
        client
            .writer
            .send_frame(
                &gantry_protocol::encode_hello(intent, limits::MAX_FRAME_BYTES).expect("hello"),
            )
            .await
            .map_err(|e| e.to_string())?;
        match client.reader.recv::<HelloReply>().await {
            Ok(Some(HelloReply::Welcome(_) | HelloReply::Enrolled(_))) => Ok(client),
            Ok(Some(HelloReply::Refused(r))) => {
                client.conn.close(CloseCode::Normal, "refused");
                Err(r.message)
            }
            other => Err(format!("no hello reply: {other:?}")),
        }
    }

    async fn session_row(&self, row: R, principal: Principal, intent: Intent) -> Try {
        let told = self.hello(principal, true, &intent).await;
        if let Ok(client) = &told {
            client.conn.close(CloseCode::Normal, "done");
        }
        Try {
            allowed: told.is_ok(),
            told: told.err().unwrap_or_default(),
            counted: (row, on_quic(principal, false)),
            marker: Some(Denied::marker(row)),
        }
    }

    /// A try refused at the hello of the session `session` (or, if welcomed, `then`).
    async fn through_session(
        &self,
        principal: Principal,
        session: R,
        names_work: bool,
    ) -> Result<RawClient, Try> {
        let intent = if session == R::SessionAdmin {
            Intent::Admin(AdminHello {
                client_version: "authz".into(),
            })
        } else {
            agent_hello()
        };
        self.hello(principal, false, &intent)
            .await
            .map_err(|told| Try {
                allowed: false,
                told,
                counted: (
                    session,
                    on_quic(principal, names_work && session != R::SessionAdmin),
                ),
                marker: Some(Denied::marker(session)),
            })
            .inspect(|_| {
                assert!(
                    session.allows(on_quic(principal, false)),
                    "{principal} was welcomed to {session} against the table"
                );
            })
    }

    async fn admin_row(&mut self, row: R, principal: Principal, req: AdminRequest) -> Try {
        let seen = on_quic(principal, false);
        let response = if principal == Principal::Admin {
            ask(&mut self.admin, &req).await
        } else {
            let mut client = match self
                .through_session(principal, R::SessionAdmin, false)
                .await
            {
                Ok(c) => c,
                Err(t) => return t,
            };
            client.writer.send(&req).await.expect("send");
            client
                .reader
                .recv::<AdminResponse>()
                .await
                .expect("response")
                .expect("some response")
        };
        let (allowed, told) = match &response {
            AdminResponse::Error(e) if e.kind == AdminErrorKind::Forbidden => {
                (false, e.message.clone())
            }
            other => (true, format!("{other:?}")),
        };
        Try {
            allowed,
            told,
            counted: (row, seen),
            marker: Some(Denied::marker(row)),
        }
    }

    async fn stream_row(&mut self, row: R, principal: Principal, open: StreamOpen) -> Try {
        let session = if row.allows(Principal::Agent) || row.allows(Principal::OtherAgent) {
            R::SessionAgent
        } else {
            R::SessionAdmin
        };
        let fresh;
        let conn = match principal {
            Principal::Agent => &self.holder.conn,
            Principal::OtherAgent => &self.other.conn,
            Principal::Admin => &self.admin.conn,
            _ => match self
                .through_session(principal, session, row.names_work())
                .await
            {
                Ok(c) => {
                    fresh = c;
                    &fresh.conn
                }
                Err(t) => return t,
            },
        };
        let (mut writer, mut reader) = conn.open_stream().await.expect("open stream");
        writer
            .send(&open)
            .await
            .expect("send the stream's first frame");
        let told = |r: Result<String, TransportError>| r.unwrap_or_else(|e| e.to_string());
        let (allowed, told, marker) = match &open {
            StreamOpen::Logs { .. }
            | StreamOpen::FetchSource { .. }
            | StreamOpen::FetchAgentBinary { .. } => {
                // Refused by resetting the stream: no words, a code.
                let first = if matches!(open, StreamOpen::Logs { .. }) {
                    reader.recv::<LogControl>().await.map(|f| format!("{f:?}"))
                } else {
                    reader
                        .recv::<SourceData>()
                        .await
                        .map(|f| format!("{:?}", f.map(|d| d.0.len())))
                };
                match first {
                    Ok(f) if f.starts_with("Some") => (true, f, None),
                    Err(e) if e.stream_code() == Some(CloseCode::Unauthorized) => {
                        (false, e.to_string(), None)
                    }
                    other => panic!("{row} as {principal}: neither served nor refused: {other:?}"),
                }
            }
            StreamOpen::FollowLogs { .. } | StreamOpen::FollowRun { .. } => {
                match reader.recv::<FollowEvent>().await {
                    Ok(Some(FollowEvent::Error(e))) if e.kind == AdminErrorKind::Forbidden => {
                        (false, e.message, Some(Denied::marker(row)))
                    }
                    Ok(Some(event)) => (true, format!("{event:?}"), None),
                    other => panic!("{row} as {principal}: {other:?}"),
                }
            }
            StreamOpen::UploadSource { bytes } => {
                let _ = writer.send(&SourceData(vec![b'x'; *bytes as usize])).await;
                writer.finish();
                match reader.recv::<SourceStored>().await {
                    Ok(Some(SourceStored::Stored { source, .. })) => (true, source, None),
                    Ok(Some(SourceStored::Refused { message })) => {
                        (false, message, Some(Denied::marker(row)))
                    }
                    other => panic!("{row} as {principal}: {other:?}"),
                }
            }
            StreamOpen::Resolve(_) => match reader.recv::<ResolveReply>().await {
                Ok(Some(ResolveReply::Refused { message })) => {
                    (false, message, Some(Denied::marker(row)))
                }
                other => (true, told(other.map(|r| format!("{r:?}"))), None),
            },
            StreamOpen::GetManifest { .. } => match reader.recv::<ManifestFrame>().await {
                Ok(Some(ManifestFrame::Refused { message })) => {
                    (false, message, Some(Denied::marker(row)))
                }
                Ok(Some(ManifestFrame::Start { bytes })) => (true, format!("{bytes} bytes"), None),
                other => panic!("{row} as {principal}: {other:?}"),
            },
            StreamOpen::FetchChunks { .. } => {
                let _ = writer.send(&ChunkWants(vec![self.chunk])).await;
                writer.finish();
                match reader.recv::<ChunkFrame>().await {
                    Ok(Some(ChunkFrame::Refused { message })) => {
                        (false, message, Some(Denied::marker(row)))
                    }
                    Ok(Some(
                        frame @ (ChunkFrame::Data { .. } | ChunkFrame::Unavailable { .. }),
                    )) => (true, format!("{:?}", std::mem::discriminant(&frame)), None),
                    other => panic!("{row} as {principal}: {other:?}"),
                }
            }
            StreamOpen::Upload { .. } => match reader.recv::<UploadReply>().await {
                Ok(Some(UploadReply::Refused { message })) => {
                    (false, message, Some(Denied::marker(row)))
                }
                Ok(Some(UploadReply::Opened { session })) => {
                    if principal == Principal::Agent {
                        // Kept open for the put stream's row.
                        self.upload = Some((writer, reader, session));
                        return Try {
                            allowed: true,
                            told: format!("session {session}"),
                            counted: (row, on_quic(principal, row.names_work())),
                            marker: None,
                        };
                    }
                    (true, format!("session {session}"), None)
                }
                other => panic!("{row} as {principal}: {other:?}"),
            },
            StreamOpen::PutChunks { .. } => {
                let data = b"authz chunk\n";
                let _ = writer
                    .send(&ChunkPut {
                        digest: Digest::of(data),
                        size: data.len() as u32,
                        data: gantry_cas::compress(data),
                    })
                    .await;
                writer.finish();
                match reader.recv::<PutReply>().await {
                    Ok(Some(PutReply::Refused { message })) => {
                        (false, message, Some(Denied::marker(row)))
                    }
                    Ok(Some(PutReply::Stored { chunks, .. })) => {
                        (true, format!("{chunks} stored"), None)
                    }
                    other => panic!("{row} as {principal}: {other:?}"),
                }
            }
            StreamOpen::Reports { .. } => {
                let _ = writer.send(&gantry_protocol::ReportUpload::End).await;
                writer.finish();
                match reader.recv::<gantry_protocol::ReportsStored>().await {
                    Ok(Some(gantry_protocol::ReportsStored::Refused { message })) => {
                        (false, message, Some(Denied::marker(row)))
                    }
                    Ok(Some(gantry_protocol::ReportsStored::Stored(r))) => {
                        (true, r.summary(), None)
                    }
                    other => panic!("{row} as {principal}: {other:?}"),
                }
            }
            StreamOpen::Exec(_) => match reader.recv::<ExecEvent>().await {
                Ok(Some(ExecEvent::Refused { message })) => {
                    (false, message, Some(Denied::marker(row)))
                }
                Ok(Some(ExecEvent::Targets(t))) => (true, format!("{} targets", t.len()), None),
                other => panic!("{row} as {principal}: {other:?}"),
            },
        };
        Try {
            allowed,
            told,
            counted: (row, on_quic(principal, row.names_work())),
            marker,
        }
    }

    async fn message_row(&mut self, row: R, principal: Principal, message: AgentMessage) -> Try {
        let sender = match principal {
            Principal::Agent => &mut self.holder,
            Principal::OtherAgent => &mut self.other,
            _ => {
                return match self.through_session(principal, R::SessionAgent, true).await {
                    Err(t) => t,
                    Ok(_) => panic!("{principal} was welcomed to an agent session"),
                }
            }
        };
        let before = blocking(|| decisions(&self.http));
        sender.send(message);
        // The decision is counted before anything is done or answered: wait for it.
        let key = |allowed: bool| {
            (
                row.name().to_owned(),
                principal.as_str().to_owned(),
                allowed,
            )
        };
        let http = self.http.clone();
        let allowed = blocking(|| {
            wait_for(
                &format!("a decision on {row} as {principal}"),
                DEADLINE,
                || {
                    let now = decisions(&http);
                    let moved = |a: bool| {
                        now.get(&key(a)).copied().unwrap_or(0)
                            > before.get(&key(a)).copied().unwrap_or(0)
                    };
                    match (moved(true), moved(false)) {
                        (true, false) => Some(true),
                        (false, true) => Some(false),
                        (false, false) => None,
                        (true, true) => panic!("{row} as {principal}: both decisions counted"),
                    }
                },
            )
        });
        let told = if allowed {
            self.effect_of(row).await
        } else {
            let sender = if principal == Principal::Agent {
                &mut self.holder
            } else {
                &mut self.other
            };
            sender
                .expect("the refusal", DEADLINE, |m| match m {
                    CoordinatorMessage::Refused { message } => Some(message.clone()),
                    _ => None,
                })
                .await
        };
        Try {
            allowed,
            told,
            counted: (row, principal),
            marker: Some(Denied::marker(row)),
        }
    }

    /// Waits for what an allowed agent message does.
    async fn effect_of(&mut self, row: R) -> String {
        let (victim, attempt) = (self.victim, self.attempt);
        match row {
            R::AgentJobRejected => {
                let next = self
                    .holder
                    .expect("the next offer", DEADLINE, |m| {
                        m.assignment()
                            .filter(|a| a.job == victim && a.attempt > attempt)
                            .map(|a| a.attempt)
                    })
                    .await;
                self.attempt = next;
                format!("offered again as attempt {next}")
            }
            R::AgentJobAccepted => {
                let c = &self.c;
                blocking(|| c.wait_job_state(&victim.to_string(), "running", DEADLINE));
                "running".into()
            }
            R::AgentJobFinished => {
                self.holder
                    .expect("the result's acknowledgement", DEADLINE, |m| match m {
                        CoordinatorMessage::JobFinishedAck { job, attempt: a }
                            if *job == victim && *a == attempt =>
                        {
                            Some(())
                        }
                        _ => None,
                    })
                    .await;
                "acknowledged".into()
            }
            R::AgentDeployResult => {
                let seq = self.stage.seq;
                self.holder
                    .expect("the deployment's next step", DEADLINE, |m| match m {
                        CoordinatorMessage::Deploy(d) if d.seq > seq => Some(format!("{:?}", d.op)),
                        _ => None,
                    })
                    .await
            }
            R::AgentExecOutput | R::AgentExecDone => loop {
                match self.exec.1.recv::<ExecEvent>().await {
                    Ok(Some(ExecEvent::Output { data, .. })) if row == R::AgentExecOutput => {
                        break String::from_utf8_lossy(&data).into_owned();
                    }
                    Ok(Some(ExecEvent::Done { result, .. })) if row == R::AgentExecDone => {
                        break format!("{result:?}");
                    }
                    Ok(Some(_)) => {}
                    other => panic!("the exec stream ended: {other:?}"),
                }
            },
            other => panic!("{other} is no agent message"),
        }
    }

    fn http_row(&self, row: R, principal: Principal, method: &str, template: &str) -> Try {
        let run = match row {
            R::AdminRetryRun | R::AdminCancelRun => self.dummy,
            _ => self.run,
        };
        let path = template
            .replace("{run}", &run.0.to_string())
            .replace("{job}", &self.build.to_string());
        let mut headers: Vec<(&str, String)> = Vec::new();
        if let Some(token) = self.logins.get(&principal) {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
        let mut body = String::new();
        match row {
            R::HttpLogin => {
                headers.clear();
                headers.push(("X-Gantry-CSRF", "1".into()));
                let token = self.logins.get(&principal).cloned().unwrap_or_default();
                body = format!("{{\"token\":\"{token}\"}}");
            }
            R::HttpPushHook => {
                body = "{\"zen\":\"authz\"}".into();
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
                headers.push(("X-GitHub-Event", "ping".into()));
                headers.push((
                    "X-Hub-Signature-256",
                    format!(
                        "sha256={}",
                        gantry_certs::hex(ring::hmac::sign(&key, body.as_bytes()).as_ref())
                    ),
                ));
            }
            _ => {}
        }
        let (status, told) = http_request(&self.http, method, &path, &headers, &body, false);
        assert!(
            status != 0 && status != 500,
            "{method} {path} as {principal}: {status} {told}"
        );
        Try {
            allowed: !matches!(status, 401 | 403),
            told: format!("{status} {told}"),
            counted: (row, on_http(principal)),
            marker: Some(Denied::marker(row)),
        }
    }
}

/// How each row is performed. No wildcard: a new row must say.
fn sample(w: &World, row: R) -> Sample {
    let admin = Sample::Admin;
    let labels = |k: &str, v: &str| Labels::from([(k.to_owned(), v.to_owned())]);
    let job_grant = Grant::Job {
        job: w.victim,
        attempt: w.attempt,
    };
    let deploy_grant = Grant::Deploy {
        deployment: w.stage.deployment,
        epoch: w.stage.epoch,
    };
    let release = match &w.stage.op {
        DeployOp::Stage { release, .. } => release.clone(),
        other => panic!("not a staging step: {other:?}"),
    };
    let nobody = gantry_protocol::AgentId::parse("ag-ffffffffffff").expect("agent id");
    match row {
        R::SessionEnroll => {
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::new(Vec::<String>::new())
                .expect("params")
                .serialize_request(&key)
                .expect("csr");
            Sample::Session(Intent::Enroll(EnrollRequest {
                token_id: w.join_token.id.clone(),
                token_secret: w.join_token.secret.clone(),
                csr_der: csr.der().to_vec(),
                hostname: "authz".into(),
                labels: Labels::new(),
            }))
        }
        R::SessionAgent => Sample::Session(agent_hello()),
        R::SessionAdmin => Sample::Session(Intent::Admin(AdminHello {
            client_version: "authz".into(),
        })),
        R::AdminCreateToken => admin(AdminRequest::CreateToken {
            ttl_secs: 3600,
            uses: 1,
            labels: Labels::new(),
        }),
        R::AdminListAgents => admin(AdminRequest::ListAgents),
        R::AdminShowAgent => admin(AdminRequest::ShowAgent {
            agent_id: gantry_protocol::AgentId::parse(&w.holder_dir.id).expect("id"),
        }),
        R::AdminRevokeAgent => admin(AdminRequest::RevokeAgent { agent_id: nobody }),
        R::AdminLabelAgent => admin(AdminRequest::LabelAgent {
            agent_id: nobody,
            set: Labels::new(),
            remove: vec![],
        }),
        R::AdminStatus => admin(AdminRequest::Status),
        R::AdminAudit => admin(AdminRequest::Audit { limit: 5 }),
        R::AdminValidate => admin(AdminRequest::Validate {
            file_name: "dummy.yml".into(),
            text: DUMMY.into(),
        }),
        R::AdminSubmitRun => admin(AdminRequest::SubmitRun(dummy_run())),
        R::AdminListRuns => admin(AdminRequest::ListRuns { limit: 5 }),
        R::AdminShowRun => admin(AdminRequest::ShowRun { run: w.run }),
        R::AdminCancelRun => admin(AdminRequest::CancelRun { run: w.dummy }),
        R::AdminRetryRun => admin(AdminRequest::RetryRun { run: w.dummy }),
        R::AdminListJobs => admin(AdminRequest::ListJobs {
            run: Some(w.run),
            limit: 5,
        }),
        R::AdminShowJob => admin(AdminRequest::ShowJob { job: w.build }),
        R::AdminApprove => admin(AdminRequest::Approve { job: w.build }),
        R::AdminAddTrigger => admin(AdminRequest::AddTrigger {
            file_name: "trigger.yml".into(),
            text: "name: authz-trigger\non:\n  push: { branches: [main] }\njobs:\n  a:\n    runs-on: { nobody: here }\n    steps: [{ run: 'true' }]\n".into(),
        }),
        R::AdminListTriggers => admin(AdminRequest::ListTriggers),
        R::AdminRemoveTrigger => admin(AdminRequest::RemoveTrigger {
            name: "authz-trigger".into(),
        }),
        R::AdminSetSecret => admin(AdminRequest::SetSecret {
            name: "AUTHZ_SECRET".into(),
            value: "s".into(),
            environment: None,
        }),
        R::AdminListSecrets => admin(AdminRequest::ListSecrets),
        R::AdminRemoveSecret => admin(AdminRequest::RemoveSecret {
            name: "AUTHZ_SECRET".into(),
        }),
        R::AdminListArtifacts => admin(AdminRequest::ListArtifacts { run: w.run }),
        R::AdminListCaches => admin(AdminRequest::ListCaches),
        R::AdminRemoveCache => admin(AdminRequest::RemoveCache {
            key: "no-such-cache".into(),
            pipeline: None,
            branch: None,
        }),
        R::AdminPutEnvironment => admin(AdminRequest::PutEnvironment {
            name: "authz-extra".into(),
            select: labels("nobody", "here"),
            approvals: 0,
            wait_ms: 0,
            branches: vec![],
            replace: false,
        }),
        R::AdminListEnvironments => admin(AdminRequest::ListEnvironments),
        R::AdminShowEnvironment => admin(AdminRequest::ShowEnvironment {
            name: "authz".into(),
        }),
        R::AdminListDeployments => admin(AdminRequest::ListDeployments {
            environment: None,
            limit: 5,
        }),
        R::AdminShowDeployment => admin(AdminRequest::ShowDeployment {
            id: w.stage.deployment,
        }),
        R::AdminApproveDeployment => admin(AdminRequest::ApproveDeployment { id: 999_999 }),
        R::AdminPromoteDeployment => admin(AdminRequest::PromoteDeployment { id: 999_999 }),
        R::AdminAbortDeployment => admin(AdminRequest::AbortDeployment { id: 999_999 }),
        R::AdminRollback => admin(AdminRequest::Rollback(RollbackRequest {
            environment: "authz-extra".into(),
            to: None,
            parallelism: 1,
        })),
        R::AdminUpgradeAgents => admin(AdminRequest::UpgradeAgents {
            select: labels("nobody", "here"),
            batch: 1,
            failure_budget: 0,
            timeout_ms: 60_000,
        }),
        R::AdminStats => admin(AdminRequest::Stats {
            since_ms: 86_400_000,
            environment: None,
        }),
        R::AdminIssueAdmin => {
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::new(Vec::<String>::new())
                .expect("params")
                .serialize_request(&key)
                .expect("csr");
            admin(AdminRequest::IssueAdmin {
                name: "authz-second".into(),
                csr_der: csr.der().to_vec(),
            })
        }
        R::AdminGc => admin(AdminRequest::Gc {
            dry_run: true,
            grace_secs: None,
        }),
        R::AdminCreateLoginToken => admin(AdminRequest::CreateLoginToken {
            name: "authz-extra".into(),
            role: gantry_protocol::Role::Viewer,
            ttl_secs: 3600,
        }),
        R::AdminListLoginTokens => admin(AdminRequest::ListLoginTokens),
        R::AdminRevokeLoginToken => admin(AdminRequest::RevokeLoginToken {
            id: "lt-0000000000000000".into(),
        }),
        R::AdminAddWebhook => admin(AdminRequest::AddWebhook {
            url: "http://127.0.0.1:9/authz".into(),
            format: WebhookFormat::Json,
            events: vec!["run.finished".into()],
            ca_pem: None,
        }),
        R::AdminListWebhooks => admin(AdminRequest::ListWebhooks),
        R::AdminRemoveWebhook => admin(AdminRequest::RemoveWebhook { id: 999_999 }),
        R::AdminAddRepo => admin(AdminRequest::AddRepo(gantry_protocol::AddRepo::plain(
            "authz-repo",
            "file:///nonexistent/authz",
        ))),
        R::AdminListRepos => admin(AdminRequest::ListRepos),
        R::AdminShowRepo => admin(AdminRequest::ShowRepo {
            name: "authz-repo".into(),
        }),
        R::AdminRemoveRepo => admin(AdminRequest::RemoveRepo {
            name: "authz-repo".into(),
        }),
        R::AdminRunRepo => admin(AdminRequest::RunRepo(gantry_protocol::RunRepo {
            repo: "authz-repo".into(),
            git_ref: None,
            inputs: gantry_protocol::Labels::new(),
        })),

        R::StreamLogs => Sample::Stream(StreamOpen::Logs {
            job: w.victim,
            attempt: w.attempt,
        }),
        R::StreamFollowLogs => Sample::Stream(StreamOpen::FollowLogs {
            job: w.build,
            from_seq: 0,
            follow: false,
        }),
        R::StreamFollowRun => Sample::Stream(StreamOpen::FollowRun { run: w.run }),
        R::StreamUploadSource => Sample::Stream(StreamOpen::UploadSource { bytes: 16 }),
        R::StreamFetchSource => Sample::Stream(StreamOpen::FetchSource {
            job: w.victim,
            attempt: w.attempt,
        }),
        R::StreamReports => Sample::Stream(StreamOpen::Reports {
            job: w.victim,
            attempt: w.attempt,
        }),
        R::StreamResolveJobArtifacts => Sample::Stream(StreamOpen::Resolve(
            ResolveRequest::JobArtifacts {
                job: w.victim,
                attempt: w.attempt,
            },
        )),
        R::StreamResolveCache => Sample::Stream(StreamOpen::Resolve(ResolveRequest::Cache {
            job: w.victim,
            attempt: w.attempt,
            key: "authz-cache".into(),
            restore_keys: vec![],
        })),
        R::StreamResolveArtifact => Sample::Stream(StreamOpen::Resolve(ResolveRequest::Artifact {
            run: w.run,
            name: "site".into(),
        })),
        R::StreamGetManifestJob => Sample::Stream(StreamOpen::GetManifest {
            grant: job_grant,
            manifest: w.site,
        }),
        R::StreamGetManifestDeploy => Sample::Stream(StreamOpen::GetManifest {
            grant: deploy_grant,
            manifest: release.manifest,
        }),
        R::StreamGetManifestAdmin => Sample::Stream(StreamOpen::GetManifest {
            grant: Grant::Admin,
            manifest: w.site,
        }),
        R::StreamFetchChunksJob => Sample::Stream(StreamOpen::FetchChunks {
            grant: job_grant,
            manifest: w.site,
        }),
        R::StreamFetchChunksDeploy => Sample::Stream(StreamOpen::FetchChunks {
            grant: deploy_grant,
            manifest: release.manifest,
        }),
        R::StreamFetchChunksAdmin => Sample::Stream(StreamOpen::FetchChunks {
            grant: Grant::Admin,
            manifest: w.site,
        }),
        R::StreamUploadJob | R::StreamUploadDeploy | R::StreamUploadAdmin => {
            let grant = match row {
                R::StreamUploadJob => job_grant,
                R::StreamUploadDeploy => deploy_grant,
                _ => Grant::Admin,
            };
            Sample::Stream(StreamOpen::Upload {
                grant,
                target: UploadTarget::Artifact {
                    name: "app".into(),
                    expire_in_secs: 0,
                },
            })
        }
        R::StreamPutChunks => Sample::Stream(StreamOpen::PutChunks {
            session: w.upload.as_ref().map_or(0, |u| u.2),
        }),
        R::StreamExec => Sample::Stream(StreamOpen::Exec(ExecRequest {
            select: labels("raw", "holder"),
            parallel: 0,
            command: "true".into(),
            timeout_ms: 60_000,
        })),
        R::StreamFetchAgentBinary => Sample::Stream(StreamOpen::FetchAgentBinary {
            sha256: w.agent_sha256.clone(),
        }),

        R::AgentJobAccepted => Sample::Message(AgentMessage::JobAccepted {
            job: w.victim,
            attempt: w.attempt,
        }),
        R::AgentJobRejected => Sample::Message(AgentMessage::JobRejected {
            job: w.victim,
            attempt: w.attempt,
            reason: "the authorization matrix".into(),
        }),
        R::AgentJobFinished => Sample::Message(AgentMessage::JobFinished(JobResult {
            job: w.victim,
            attempt: w.attempt,
            outcome: JobOutcome::Succeeded,
            log_chunks: 0,
            started_at: UnixMillis::now(),
            finished_at: UnixMillis::now(),
        })),
        R::AgentDeployResult => Sample::Message(AgentMessage::DeployResult(DeployResult {
            deployment: w.stage.deployment,
            seq: w.stage.seq,
            outcome: Ok(HostReport {
                current: None,
                releases: vec![release.id.clone()],
            }),
            log: vec![],
        })),
        R::AgentExecOutput => Sample::Message(AgentMessage::ExecOutput {
            id: w.exec_id,
            data: b"authz output\n".to_vec(),
        }),
        R::AgentExecDone => Sample::Message(AgentMessage::ExecDone {
            id: w.exec_id,
            result: Ok(0),
        }),

        R::HttpPage
        | R::HttpAsset
        | R::HttpLogin
        | R::HttpLogout
        | R::HttpMe
        | R::HttpDeployments
        | R::HttpRunEvents
        | R::HttpJobLog
        | R::HttpHealthz
        | R::HttpReadyz
        | R::HttpMetrics
        | R::HttpPushHook
        | R::HttpRepoHook
        | R::HttpInstallScript
        | R::HttpCaPem
        | R::HttpAgentBinary
        | R::HttpAgentUnit
        | R::HttpAgentEnv => Sample::Http,
    }
}

fn agent_hello() -> Intent {
    Intent::Agent(AgentHello {
        agent_version: "authz".into(),
        hostname: "authz".into(),
        labels: Labels::new(),
        capabilities: vec![],
        slots: 1,
        figures: HostFigures::default(),
        running: vec![],
        peer_port: None,
    })
}

fn dummy_run() -> SubmitRun {
    SubmitRun {
        file_name: "dummy.yml".into(),
        text: DUMMY.into(),
        git_ref: "main".into(),
        commit: None,
        event: "manual".into(),
        inputs: Labels::new(),
        source: None,
    }
}

/// Builds `out/status` on the real agent, then the victim on the holder: it receives the
/// artifact, restores a cache and declares an artifact of its own.
fn victim_pipeline() -> String {
    "name: victim
jobs:
  build:
    runs-on: { role: real }
    steps: [{ run: 'mkdir -p out && echo ok > out/status' }]
    artifacts: { name: site, paths: [out/] }
  victim:
    needs: build
    runs-on: { raw: holder }
    steps: [{ run: 'true' }]
    cache: { key: authz-cache, paths: [cache] }
    artifacts: { name: app, paths: [out] }
"
    .into()
}

/// The same artifact, deployed to the `authz` environment (the holder alone).
fn deploy_pipeline() -> String {
    "name: ship
jobs:
  build:
    runs-on: { role: real }
    steps: [{ run: 'mkdir -p out && echo ok > out/status' }]
    artifacts: { name: site, paths: [out/] }
  ship:
    needs: build
    deploy:
      environment: authz
      artifact: site
      app: web
      strategy: rolling
      rolling: { batch: 1, failure-budget: 0 }
      timeouts: { stage: 600s, activate: 600s }
"
    .into()
}

async fn admin_client(address: &str, ca_der: &[u8], admin_pem: &str) -> RawClient {
    let mut client = raw::connect(
        address,
        ClientTls::mutual(ca_der, admin_pem, admin_pem).expect("tls"),
    )
    .await
    .expect("connect");
    let hello = Intent::Admin(AdminHello {
        client_version: "authz".into(),
    });
    client
        .writer
        .send_frame(&gantry_protocol::encode_hello(&hello, limits::MAX_FRAME_BYTES).expect("hello"))
        .await
        .expect("send hello");
    let reply = client.reader.recv::<HelloReply>().await.expect("reply");
    assert!(matches!(reply, Some(HelloReply::Welcome(_))), "{reply:?}");
    client
}

async fn ask(admin: &mut RawClient, req: &AdminRequest) -> AdminResponse {
    admin.writer.send(req).await.expect("send request");
    admin
        .reader
        .recv::<AdminResponse>()
        .await
        .expect("response")
        .expect("some response")
}

fn sha256_file(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).expect("read the agent binary");
    gantry_certs::hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}
