//! An admin's session: requests on the control stream, answered one at a time by the
//! admin router, and the streams an admin opens (follows, source uploads, `gantry
//! exec`, artifact downloads), each asked of the authorization table.

use std::sync::Arc;

use gantry_protocol::{limits, AdminRequest, CloseCode, StreamOpen};
use gantry_transport::{Connection, FrameReader, FrameWriter};

use crate::admin;
use crate::base::authz::{Principal, Request};
use crate::base::tasks::AbortOnDrop;
use crate::edges::quic::wire::{
    close_for, refuse_stream, stream_detail, stream_open, welcome, Numbers,
};
use crate::services::artifacts::Peer;
use crate::services::coordinator::Coordinator;
use crate::services::exec;

/// Runs an admin's session until it ends: one request and its response at a time
/// on the control stream, and the streams it opens.
pub async fn session(
    coord: Arc<Coordinator>,
    conn: Connection,
    mut writer: FrameWriter,
    mut reader: FrameReader,
    actor: String,
    principal: Principal,
    numbers: Numbers,
) {
    let welcome = welcome(actor.clone(), coord.settings.heartbeat_interval);
    writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
    if writer.send(&welcome).await.is_err() {
        return;
    }
    let _streams = AbortOnDrop(tokio::spawn(streams(
        coord.clone(),
        conn.clone(),
        actor.clone(),
        principal,
        numbers.connection,
    )));
    loop {
        match reader.recv::<AdminRequest>().await {
            Ok(Some(req)) => {
                let response = admin::answer(&coord, &actor, principal, req).await;
                if writer.send(&response).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                close_for(&conn, &e);
                return;
            }
        }
    }
}

/// Accepts the streams an admin opens besides the control stream (follows, uploads,
/// artifact downloads). The authorization table is asked for every one.
async fn streams(
    coord: Arc<Coordinator>,
    conn: Connection,
    actor: String,
    principal: Principal,
    connection: u64,
) {
    let peer = Peer::Admin(actor.clone());
    while let Ok((mut writer, mut reader)) = conn.accept_stream().await {
        let me = coord.clone();
        let peer = peer.clone();
        let actor = actor.clone();
        tokio::spawn(async move {
            let Some(open) = stream_open(&mut reader, &actor).await else {
                return;
            };
            let row = Request::of_stream(&open);
            if let Err(denied) = me
                .metrics
                .authz
                .check(row, principal, || stream_detail(row).into())
            {
                refuse_stream(&open, &denied, writer, reader).await;
                return;
            }
            // Follows and execs stream to the admin's own terminal, which may pause
            // (a pager); everything else is bulk and must be read.
            if !matches!(
                open,
                StreamOpen::FollowLogs { .. } | StreamOpen::FollowRun { .. } | StreamOpen::Exec(_)
            ) {
                writer.set_stall_deadline(Some(limits::STREAM_WRITE_STALL));
            }
            let result = match open {
                StreamOpen::FollowLogs {
                    job,
                    from_seq,
                    follow,
                } => {
                    me.runs
                        .follow_logs(job, from_seq, follow, &mut writer)
                        .await
                }
                StreamOpen::FollowRun { run } => me.runs.follow_run(run, &mut writer).await,
                StreamOpen::UploadSource { bytes } => {
                    let received =
                        match me.disk.check() {
                            Err(low) => Err(low.to_string()),
                            Ok(()) => me.sources.receive(&mut reader, bytes).await.map_err(|e| {
                                match e.io_error().and_then(|io| {
                                    me.disk.out_of_space("storing a source tree", io)
                                }) {
                                    Some(full) => full.to_string(),
                                    None => e.to_string(),
                                }
                            }),
                        };
                    let reply = match received {
                        Ok((source, bytes)) => {
                            me.metrics.source_bytes(bytes);
                            gantry_protocol::SourceStored::Stored { source, bytes }
                        }
                        Err(message) => gantry_protocol::SourceStored::Refused { message },
                    };
                    writer.send(&reply).await
                }
                StreamOpen::Exec(request) => {
                    let targets = me.agents.matching(&request.select);
                    let agents = me.agents.clone();
                    exec::run(
                        &me.execs,
                        &request,
                        targets,
                        move |agent, message| agents.send(agent, message),
                        &mut writer,
                    )
                    .await
                }
                open @ (StreamOpen::Resolve(_)
                | StreamOpen::GetManifest { .. }
                | StreamOpen::FetchChunks { .. }
                | StreamOpen::Upload { .. }
                | StreamOpen::PutChunks { .. }) => {
                    if let Err(e) = me
                        .artifacts
                        .serve(&peer, connection, open, writer, reader)
                        .await
                    {
                        tracing::info!(?peer, "artifact stream refused or broken: {e}");
                    }
                    return;
                }
                StreamOpen::Logs { .. }
                | StreamOpen::FetchSource { .. }
                | StreamOpen::Reports { .. }
                | StreamOpen::FetchAgentBinary { .. } => {
                    tracing::error!("the authorization table allows {row} for {principal}, but only agents can be served it");
                    writer.reset(CloseCode::Unauthorized);
                    return;
                }
            };
            if let Err(e) = result {
                tracing::debug!("follow stream ended: {e}");
            }
            writer.finish();
        });
    }
}
