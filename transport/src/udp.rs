//! The UDP socket under every endpoint: quinn's own, with GSO batches cut to what one
//! send may carry.
//!
//! quinn hands the socket up to ten packets of the path's MTU in one `Transmit` (UDP
//! GSO: one `sendmsg`, one trip through the kernel for all of them), but Linux refuses a
//! send of more than [`LARGEST_UDP_SEND`] bytes with `EMSGSIZE`, and quinn-udp drops a
//! refused send without a word. On paths whose MTU is larger than a tenth of that (a
//! 9,000-byte jumbo frame; loopback's 64 KiB) whole batches would vanish; quinn takes
//! such losses for a black hole and falls back to 1,200-byte packets. Cutting each batch
//! into sends of as many packets as fit lets path MTU discovery use the whole MTU the
//! path has: on loopback, one 65,000-byte packet per send instead of ten of 6,550, which
//! is a tenth of the per-packet work (crypto calls, ACKs, the kernel's per-datagram
//! path) on both ends.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use gantry_protocol::limits::LARGEST_UDP_SEND;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Wraps the runtime's socket for `socket`.
pub(crate) fn bounded_sends(
    runtime: &Arc<dyn quinn::Runtime>,
    socket: std::net::UdpSocket,
) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    Ok(Arc::new(BoundedSends(runtime.wrap_udp_socket(socket)?)))
}

/// quinn's socket, sending each GSO batch in pieces of at most [`LARGEST_UDP_SEND`]
/// bytes.
struct BoundedSends(Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for BoundedSends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoundedSends").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for BoundedSends {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    /// Sends `transmit` whole when it fits one send; otherwise in pieces of whole
    /// packets. The first piece's outcome is the transmit's (a `WouldBlock` makes quinn
    /// wait and try the whole transmit again). Once one piece has gone, a later piece
    /// the kernel refuses is left to QUIC's loss recovery, as quinn-udp treats any
    /// packet the kernel drops, rather than sending the first piece twice.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let mut pieces = send_pieces(transmit.contents.len(), transmit.segment_size);
        let Some(first) = pieces.next() else {
            return self.0.try_send(transmit);
        };
        self.0.try_send(&piece_of(transmit, first))?;
        for piece in pieces {
            if let Err(e) = self.0.try_send(&piece_of(transmit, piece)) {
                tracing::trace!("a piece of a GSO batch was not sent ({e}); QUIC resends it");
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    /// Must be the socket's own answer: quinn runs path MTU discovery only on sockets
    /// that never fragment.
    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// The byte ranges (each whole packets, each at most [`LARGEST_UDP_SEND`] bytes) a
/// transmit of `len` bytes in packets of `segment` bytes goes out in; empty when it
/// fits one send as it is.
fn send_pieces(len: usize, segment: Option<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = match segment {
        Some(segment) if segment > 0 && len > LARGEST_UDP_SEND => {
            (LARGEST_UDP_SEND / segment).max(1) * segment
        }
        _ => len.max(1),
    };
    let split = step < len;
    (0..len)
        .step_by(step)
        .filter(move |_| split)
        .map(move |start| start..(start + step).min(len))
}

/// One piece of a transmit: a GSO batch of its own when it holds more than one packet.
fn piece_of<'a>(transmit: &Transmit<'a>, range: std::ops::Range<usize>) -> Transmit<'a> {
    let contents = &transmit.contents[range];
    Transmit {
        destination: transmit.destination,
        ecn: transmit.ecn,
        contents,
        segment_size: transmit
            .segment_size
            .filter(|&segment| contents.len() > segment),
        src_ip: transmit.src_ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(len: usize, segment: Option<usize>) -> Vec<std::ops::Range<usize>> {
        send_pieces(len, segment).collect()
    }

    #[test]
    fn a_batch_that_fits_one_send_is_sent_as_it_is() {
        assert!(pieces(10 * 6_550, Some(6_550)).is_empty());
        assert!(pieces(1_200, None).is_empty());
        assert!(pieces(0, Some(1_200)).is_empty());
        assert!(pieces(LARGEST_UDP_SEND, Some(LARGEST_UDP_SEND)).is_empty());
    }

    #[test]
    fn a_larger_batch_goes_in_whole_packets_each_within_one_send() {
        // Ten 65,000-byte packets (loopback's MTU): one per send.
        let ranges = pieces(10 * 65_000, Some(65_000));
        assert_eq!(ranges.len(), 10);
        assert!(ranges.iter().all(|r| r.len() == 65_000));
        // Ten 8,972-byte packets (a 9,000-byte jumbo frame), the last one short: seven
        // then three, every byte once and in order.
        let len = 9 * 8_972 + 100;
        let ranges = pieces(len, Some(8_972));
        assert_eq!(ranges, vec![0..7 * 8_972, 7 * 8_972..len]);
        for r in &ranges {
            assert!(r.len() <= LARGEST_UDP_SEND);
            assert_eq!(r.start % 8_972, 0, "pieces start at packet boundaries");
        }
    }

    #[test]
    fn a_piece_of_one_packet_is_not_a_gso_batch() {
        let data = vec![0u8; 3 * 8_972];
        let transmit = Transmit {
            destination: "127.0.0.1:9".parse().expect("addr"),
            ecn: None,
            contents: &data,
            segment_size: Some(8_972),
            src_ip: None,
        };
        let two = piece_of(&transmit, 0..2 * 8_972);
        assert_eq!(two.contents.len(), 2 * 8_972);
        assert_eq!(two.segment_size, Some(8_972));
        assert_eq!(piece_of(&transmit, 2 * 8_972..3 * 8_972).segment_size, None);
    }
}
