//! An admin client that keeps one connection open, for benchmarks that time requests
//! without the CLI's process start and handshake in every sample.

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
    pub async fn connect(c: &Coordinator) -> anyhow::Result<Self> {
        let ca = gantry_certs::pem_to_der(&c.ca_pem())?;
        let creds = c.admin_pem();
        let dialer = Dialer::new(ClientTls::mutual(&ca, &creds, &creds)?, false)?;
        let conn = dialer.connect(&c.address, Duration::from_secs(10)).await?;
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
                reader.recv::<HelloReply>().await?,
                Some(HelloReply::Welcome(_))
            ),
            "not welcomed"
        );
        Ok(Self {
            _dialer: dialer,
            conn,
            writer,
            reader,
        })
    }

    pub async fn request(&mut self, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
        self.writer.send(req).await?;
        match self.reader.recv::<AdminResponse>().await? {
            Some(AdminResponse::Error(e)) => anyhow::bail!("{}", e.message),
            Some(r) => Ok(r),
            None => anyhow::bail!("closed"),
        }
    }

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
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }

    pub async fn follow(&self, open: &StreamOpen) -> anyhow::Result<FrameReader> {
        let (mut w, r) = self.conn.open_stream().await?;
        w.send(open).await?;
        w.finish();
        Ok(r)
    }

    /// Waits until the run ends; returns its final state.
    pub async fn wait_run(&self, run: RunId) -> anyhow::Result<String> {
        let mut r = self.follow(&StreamOpen::FollowRun { run }).await?;
        loop {
            match r.recv::<FollowEvent>().await? {
                Some(FollowEvent::End { state }) => return Ok(state),
                Some(FollowEvent::Error(e)) => anyhow::bail!("{}", e.message),
                Some(_) => {}
                None => anyhow::bail!("follow ended"),
            }
        }
    }
}
