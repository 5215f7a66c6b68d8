//! An admin client that keeps one connection open, for benchmarks that time requests
//! (or poll and submit) without the CLI's process start and handshake in every sample.
//! Every wait has a deadline.

use std::time::Duration;

use gantry_certs::ClientTls;
use gantry_protocol::{
    limits, AdminHello, AdminRequest, AdminResponse, FollowEvent, HelloReply, Intent, Labels,
    RunId, StreamOpen, SubmitRun,
};
use gantry_transport::{Connection, Dialer, FrameReader, FrameWriter};

use crate::Coordinator;

/// One admin connection with its control stream.
pub struct Admin {
    _dialer: Dialer,
    conn: Connection,
    writer: FrameWriter,
    reader: FrameReader,
}

impl Admin {
    /// Connects to `c` as its admin.
    pub async fn connect(c: &Coordinator) -> anyhow::Result<Self> {
        Self::connect_to(&c.address, &c.ca_pem(), &c.admin_pem()).await
    }

    /// Connects to `address` as the admin whose certificate and key are in `admin_pem`.
    pub async fn connect_to(address: &str, ca_pem: &str, admin_pem: &str) -> anyhow::Result<Self> {
        let ca = gantry_certs::pem_to_der(ca_pem)?;
        let dialer = Dialer::new(ClientTls::mutual(&ca, admin_pem, admin_pem)?, false)?;
        let conn = dialer.connect(address, Duration::from_secs(10)).await?;
        let (mut writer, mut reader) = conn.open_control().await?;
        writer
            .send_frame(&gantry_protocol::encode_hello(
                &Intent::Admin(AdminHello {
                    client_version: "bench".into(),
                }),
                limits::MAX_FRAME_BYTES,
            )?)
            .await?;
        anyhow::ensure!(
            matches!(
                reader
                    .recv_within::<HelloReply>(Duration::from_secs(10), "the welcome")
                    .await?,
                Some(HelloReply::Welcome(_))
            ),
            "the coordinator did not welcome the admin"
        );
        Ok(Self {
            _dialer: dialer,
            conn,
            writer,
            reader,
        })
    }

    /// One request and its answer, within 60 s.
    pub async fn request(&mut self, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
        self.writer.send(req).await?;
        match self
            .reader
            .recv_within::<AdminResponse>(Duration::from_secs(60), "the coordinator's answer")
            .await?
        {
            Some(AdminResponse::Error(e)) => anyhow::bail!("{}", e.message),
            Some(r) => Ok(r),
            None => anyhow::bail!("the coordinator closed the admin session"),
        }
    }

    /// Agents connected as the coordinator counts them.
    pub async fn agents_connected(&mut self) -> anyhow::Result<u64> {
        match self.request(&AdminRequest::Status).await? {
            AdminResponse::Status(s) => Ok(s.agents_connected),
            other => anyhow::bail!("unexpected answer to status: {other:?}"),
        }
    }

    /// Submits a pipeline (no source tree); returns the run once it is stored.
    pub async fn submit(&mut self, yaml: &str) -> anyhow::Result<RunId> {
        let submit = SubmitRun {
            file_name: "bench.yml".into(),
            text: yaml.into(),
            git_ref: "main".into(),
            commit: None,
            event: "manual".into(),
            inputs: Labels::new(),
            source: None,
        };
        match self.request(&AdminRequest::SubmitRun(submit)).await? {
            AdminResponse::Run(r) => Ok(r.run),
            other => anyhow::bail!("unexpected answer to a submission: {other:?}"),
        }
    }

    pub async fn follow(&self, open: &StreamOpen) -> anyhow::Result<FrameReader> {
        let (mut w, r) = self.conn.open_stream().await?;
        w.send(open).await?;
        w.finish();
        Ok(r)
    }

    /// Waits until `run` ends, within `deadline`; returns its final state.
    pub async fn wait_run(&self, run: RunId, deadline: Duration) -> anyhow::Result<String> {
        let mut r = self.follow(&StreamOpen::FollowRun { run }).await?;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match r.recv_within::<FollowEvent>(left, "the run to end").await? {
                Some(FollowEvent::End { state }) => return Ok(state),
                Some(FollowEvent::Error(e)) => anyhow::bail!("{}", e.message),
                Some(_) => {}
                None => anyhow::bail!("the run's follow stream ended before the run"),
            }
        }
    }
}
