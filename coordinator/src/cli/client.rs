//! The admin CLI's connection to the coordinator: mutual TLS with the admin certificate
//! from the context, a hello, then one request and its response at a time.

use std::time::Duration;

use anyhow::Context as _;
use gantry_certs::ClientTls;
use gantry_protocol::{limits, AdminHello, AdminRequest, AdminResponse, HelloReply, Intent};
use gantry_transport::{Dialer, FrameReader, FrameWriter};

use crate::cli::context::LoadedContext;

/// How long the CLI gives its close frame to go out before it exits.
const CLOSE_FLUSH: Duration = Duration::from_millis(15);

/// How long the CLI waits for the coordinator to answer the handshake or a request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(15);

/// How long the CLI waits for a request that fetches a repository (`repos add`, `run
/// --repo`): a first fetch of a large repository takes minutes.
pub const FETCH_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Errors the CLI maps to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Cannot reach or authenticate to the coordinator: exit code 3.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    /// The coordinator refused the request as invalid or naming nothing: exit code 2.
    #[error("{0}")]
    Rejected(String),
    /// The coordinator failed to do it: exit code 1.
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug)]
pub struct AdminClient {
    /// The protocol version the coordinator's welcome named.
    pub protocol_version: u16,
    dialer: Dialer,
    conn: gantry_transport::Connection,
    writer: FrameWriter,
    reader: FrameReader,
}

impl AdminClient {
    pub async fn connect(ctx: &LoadedContext) -> Result<Self, ClientError> {
        let unreachable = ClientError::Unreachable;
        let ca_der = gantry_certs::pem_to_der(&ctx.ca_pem)
            .context("the context's CA certificate")
            .map_err(unreachable)?;
        let tls = ClientTls::mutual(&ca_der, &ctx.credentials_pem, &ctx.credentials_pem)
            .context("the context's admin credentials")
            .map_err(unreachable)?;
        let addr = gantry_transport::resolve(&ctx.address).map_err(|e| unreachable(e.into()))?;
        let dialer = Dialer::new(tls, addr.is_ipv6()).map_err(|e| unreachable(e.into()))?;
        let conn = dialer
            .connect(&ctx.address, REQUEST_DEADLINE)
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", ctx.address))
            .map_err(unreachable)?;
        let (mut writer, mut reader) = conn
            .open_control()
            .await
            .map_err(|e| unreachable(e.into()))?;
        let hello = gantry_protocol::encode_hello(
            &Intent::Admin(AdminHello {
                client_version: env!("CARGO_PKG_VERSION").into(),
            }),
            limits::MAX_FRAME_BYTES,
        )
        .map_err(|e| unreachable(e.into()))?;
        writer
            .send_frame(&hello)
            .await
            .map_err(|e| unreachable(e.into()))?;
        match reader
            .recv_within::<HelloReply>(REQUEST_DEADLINE, "the coordinator's welcome")
            .await
        {
            Ok(Some(HelloReply::Welcome(welcome))) => Ok(Self {
                protocol_version: welcome.protocol_version,
                dialer,
                conn,
                writer,
                reader,
            }),
            Ok(Some(HelloReply::Refused(r))) => Err(unreachable(anyhow::anyhow!(
                "the coordinator refused this admin: {}",
                r.message
            ))),
            Ok(Some(HelloReply::Enrolled(_))) => Err(unreachable(anyhow::anyhow!(
                "unexpected enrollment reply to an admin hello"
            ))),
            Ok(None) => Err(unreachable(anyhow::anyhow!(
                "the coordinator closed the stream before welcoming us"
            ))),
            Err(e) => Err(unreachable(
                anyhow::Error::from(e).context("the coordinator refused the connection"),
            )),
        }
    }

    /// Sends one request and waits for its response. Error responses become [`ClientError`]s.
    pub async fn request(&mut self, req: &AdminRequest) -> Result<AdminResponse, ClientError> {
        self.request_within(req, REQUEST_DEADLINE).await
    }

    /// [`AdminClient::request`] for a request that may take longer (a repository's
    /// fetch), waiting up to `deadline`.
    pub async fn request_within(
        &mut self,
        req: &AdminRequest,
        deadline: Duration,
    ) -> Result<AdminResponse, ClientError> {
        self.writer
            .send(req)
            .await
            .map_err(|e| ClientError::Unreachable(e.into()))?;
        match self
            .reader
            .recv_within::<AdminResponse>(deadline, "the coordinator's response")
            .await
        {
            Ok(Some(AdminResponse::Error(e))) => match e.kind {
                gantry_protocol::AdminErrorKind::Internal => Err(ClientError::Failed(e.message)),
                _ => Err(ClientError::Rejected(e.message)),
            },
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(ClientError::Unreachable(anyhow::anyhow!(
                "the coordinator closed the stream"
            ))),
            Err(e) => Err(ClientError::Unreachable(e.into())),
        }
    }

    /// The connection, for bulk streams (artifact downloads).
    pub fn connection(&self) -> &gantry_transport::Connection {
        &self.conn
    }

    /// Opens a follow stream (logs or run progress) and returns its reader.
    pub async fn follow(
        &mut self,
        open: &gantry_protocol::StreamOpen,
    ) -> Result<FrameReader, ClientError> {
        let (mut writer, reader) = self
            .conn
            .open_stream()
            .await
            .map_err(|e| ClientError::Unreachable(e.into()))?;
        writer
            .send(open)
            .await
            .map_err(|e| ClientError::Unreachable(e.into()))?;
        writer.finish();
        Ok(reader)
    }

    /// Uploads a source tree archive; returns its id once the coordinator stored it.
    pub async fn upload_source(
        &mut self,
        archive: &std::path::Path,
    ) -> Result<String, ClientError> {
        use std::io::Read as _;
        let fail = |e: String| ClientError::Unreachable(anyhow::anyhow!(e));
        let mut file = std::fs::File::open(archive)
            .map_err(|e| ClientError::Failed(format!("cannot read the source archive: {e}")))?;
        let bytes = file
            .metadata()
            .map_err(|e| ClientError::Failed(e.to_string()))?
            .len();
        let (mut writer, mut reader) = self
            .conn
            .open_stream()
            .await
            .map_err(|e| fail(e.to_string()))?;
        writer
            .send(&gantry_protocol::StreamOpen::UploadSource { bytes })
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut buf = vec![0u8; 1024 * 1024];
        let mut write_error = None;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| ClientError::Failed(format!("cannot read the source archive: {e}")))?;
            if n == 0 {
                break;
            }
            if let Err(e) = writer
                .send(&gantry_protocol::SourceData(buf[..n].to_vec()))
                .await
            {
                // The coordinator refuses an upload (its disk under the watermark) by
                // answering and stopping the stream: a write racing that stop fails
                // first, so its answer is read before the write error is reported.
                write_error = Some(e.to_string());
                break;
            }
        }
        writer.finish();
        match (
            reader.recv::<gantry_protocol::SourceStored>().await,
            write_error,
        ) {
            (Ok(Some(gantry_protocol::SourceStored::Refused { message })), _) => {
                Err(ClientError::Rejected(message))
            }
            (_, Some(e)) => Err(fail(e)),
            (Ok(Some(gantry_protocol::SourceStored::Stored { source, .. })), None) => Ok(source),
            (Ok(None), None) => Err(fail(
                "the coordinator ended the upload without an answer".into(),
            )),
            (Err(e), None) => Err(fail(e.to_string())),
        }
    }

    /// Ends the session cleanly so the coordinator sees a normal close at once (not
    /// after its idle timeout).
    pub async fn close(mut self) {
        self.writer.finish();
        self.conn.close(
            gantry_protocol::CloseCode::Normal,
            "the admin command ended",
        );
        // Only the close frame has to leave: waiting for the connection to drain (three
        // probe timeouts, ~90 ms even on loopback) cost every CLI command that much.
        self.dialer.shutdown(CLOSE_FLUSH).await;
    }
}
