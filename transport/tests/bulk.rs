//! A bulk transfer over loopback through two real endpoints: the path must keep the MTU
//! discovery reached and declare no black hole. Loopback's MTU is 64 KiB, so discovery
//! climbs to `limits::MAX_UDP_PAYLOAD`; quinn puts up to ten packets in one send, which
//! past 6,550 bytes a packet Linux refuses, and unless the transport cuts such batches
//! into several sends (`gantry-transport`'s socket), whole batches vanish, quinn
//! declares a black hole and the transfer runs on at 1,200-byte packets.

use std::time::{Duration, SystemTime};

use gantry_certs::{CertAuthority, ClientTls, RevocationSet, ServerTls};
use gantry_protocol::{limits, CloseCode};
use gantry_transport::{Dialer, Listener, Profile};

/// 7.5 MiB in 192 KiB frames: enough for the congestion window to open past ten packets
/// a send, as an artifact transfer does (with the 8,972-byte ceiling this size failed
/// three runs in three), and small enough that a busy machine's receiver cannot fall
/// far behind.
const FRAMES: usize = 40;
const FRAME_PAYLOAD: usize = 192 * 1024;
const DEADLINE: Duration = Duration::from_secs(60);

/// A coordinator's listener (bulk limits, as `gantry server` binds it) on a loopback port,
/// with the CA that issued its certificate and the address to dial.
fn coordinator_listener(ca_name: &str) -> (CertAuthority, Listener, String) {
    let now = SystemTime::now();
    let ca = CertAuthority::create(ca_name, now).expect("CA");
    let (cert, key) = ca.issue_coordinator(&[], now).expect("coordinator cert");
    let tls = ServerTls::config(ca.cert_der(), &cert.pem, &key, RevocationSet::default())
        .expect("server tls");
    let listener = Listener::bind(
        "127.0.0.1:0".parse().expect("addr"),
        tls,
        &gantry_certs::random_bytes::<32>(),
    )
    .expect("bind");
    let address = listener.local_addr().expect("local addr").to_string();
    (ca, listener, address)
}

#[tokio::test]
async fn a_bulk_transfer_on_loopback_keeps_the_discovered_mtu_and_finds_no_black_hole() {
    let (ca, listener, address) = coordinator_listener("bulk test CA");

    // The receiver counts payload bytes until the sender finishes its stream, answers
    // with the count, and holds the connection until the sender closes it.
    let receiving_side = tokio::spawn(async move {
        let incoming = listener.accept().await.expect("an incoming connection");
        let conn = incoming.handshake(DEADLINE).await.expect("handshake");
        let (mut writer, mut reader) = conn.accept_stream().await.expect("stream");
        let mut received = 0u64;
        while let Some(payload) = reader.recv_payload().await.expect("frame") {
            received += payload.len() as u64;
        }
        writer.send(&received).await.expect("answer");
        writer.finish();
        let _ = tokio::time::timeout(DEADLINE, conn.closed()).await;
        received
    });

    let dialer =
        Dialer::new(ClientTls::pinned(&ca.fingerprint()).expect("tls"), false).expect("dialer");
    let conn = dialer.connect(&address, DEADLINE).await.expect("connect");
    let (mut writer, mut reader) = conn.open_stream().await.expect("open stream");
    let frame =
        gantry_protocol::frame::frame_raw(&vec![0xA5; FRAME_PAYLOAD], limits::MAX_FRAME_BYTES)
            .expect("frame");
    let sending = async {
        for _ in 0..FRAMES {
            writer.send_frame(&frame).await.expect("send");
        }
        writer.finish();
        reader
            .recv::<u64>()
            .await
            .expect("answer")
            .expect("an answer")
    };
    let acknowledged = tokio::time::timeout(DEADLINE, sending)
        .await
        .expect("the transfer finished within its deadline");
    let figures = conn.path_figures();
    conn.close(CloseCode::Normal, "done");
    let received = receiving_side.await.expect("the receiving side");

    assert_eq!(received, (FRAMES * FRAME_PAYLOAD) as u64);
    assert_eq!(acknowledged, received);
    assert_eq!(
        figures.black_holes, 0,
        "quinn declared a black hole on loopback: {figures:?}"
    );
    // Discovery's binary search stops once its next step would be under 20 bytes, so
    // it ends just short of the ceiling; a fallback (1,200 bytes) or a ceiling cut to
    // ten packets per send (6,550) is far below this.
    let reached = u32::from(limits::MAX_UDP_PAYLOAD) * 99 / 100;
    assert!(
        u32::from(figures.mtu) >= reached,
        "the path did not keep an MTU near the ceiling of {}: {figures:?}",
        limits::MAX_UDP_PAYLOAD
    );
}

/// An agent's session (`Profile::Control`) against the coordinator's listener, whose
/// own limits are bulk: both sides' path MTU stays at 1,452 bytes or less, because the
/// client announces that as the largest datagram it accepts and discovers no further
/// itself. At 65,000 bytes every idle session held a 64 KiB send buffer of the
/// coordinator and each reconnect cost ~12 probes of up to 65,000 bytes each way
/// (docs/decisions/0086-fleet-scale-transport.md).
#[tokio::test]
async fn a_control_connection_keeps_small_packets_both_ways_against_a_bulk_listener() {
    let (ca, listener, address) = coordinator_listener("control test CA");
    // Each side sends 2 MiB and reads what the other sent, then reports its own path.
    let exchange = |conn: gantry_transport::Connection, opens: bool| async move {
        let (mut writer, mut reader) = if opens {
            conn.open_stream().await.expect("open stream")
        } else {
            conn.accept_stream().await.expect("accept stream")
        };
        let frame =
            gantry_protocol::frame::frame_raw(&vec![0x5A; 64 * 1024], limits::MAX_FRAME_BYTES)
                .expect("frame");
        let send = async {
            for _ in 0..32 {
                writer.send_frame(&frame).await.expect("send");
            }
            writer.finish();
        };
        let receive = async {
            let mut received = 0usize;
            while let Some(payload) = reader.recv_payload().await.expect("frame") {
                received += payload.len();
            }
            received
        };
        let ((), received) = tokio::join!(send, receive);
        // Discovery runs once the handshake is confirmed; give it time to climb if it
        // were allowed to.
        tokio::time::sleep(Duration::from_millis(500)).await;
        (received, conn.path_figures(), conn)
    };
    let server = tokio::spawn(async move {
        let incoming = listener.accept().await.expect("an incoming connection");
        let conn = incoming.handshake(DEADLINE).await.expect("handshake");
        let (received, figures, conn) = exchange(conn, false).await;
        let _ = tokio::time::timeout(DEADLINE, conn.closed()).await;
        (received, figures)
    });
    let dialer = Dialer::with_profile(
        ClientTls::pinned(&ca.fingerprint()).expect("tls"),
        false,
        Profile::Control,
    )
    .expect("dialer");
    let conn = dialer.connect(&address, DEADLINE).await.expect("connect");
    let (received, client, conn) = tokio::time::timeout(DEADLINE, exchange(conn, true))
        .await
        .expect("the exchange finished within its deadline");
    conn.close(CloseCode::Normal, "done");
    let (server_received, server) = server.await.expect("the listener's side");
    assert_eq!(
        (received, server_received),
        (32 * 64 * 1024, 32 * 64 * 1024)
    );
    for (side, figures) in [("agent", client), ("coordinator", server)] {
        assert!(
            figures.mtu <= limits::CONTROL_UDP_PAYLOAD,
            "the {side}'s packets grew past {} bytes on a control connection: {figures:?}",
            limits::CONTROL_UDP_PAYLOAD
        );
    }
}
