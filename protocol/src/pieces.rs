//! A payload as the transport received it: pieces whose concatenation is the payload.
//! Receivers that keep the pieces instead of joining them (the coordinator's upload
//! path) read headers across them and hash or write the rest where it lies; these are
//! the few operations they share.

use std::ops::Range;

use bytes::Bytes;

/// The parts of `pieces` (joined) that `range` covers, in order: each piece with the
/// range of it that falls within `range`.
pub fn pieces_in(
    pieces: &[Bytes],
    range: Range<usize>,
) -> impl Iterator<Item = (&Bytes, Range<usize>)> {
    let mut start = 0;
    pieces.iter().filter_map(move |piece| {
        let (piece_start, piece_end) = (start, start + piece.len());
        start = piece_end;
        let (from, to) = (range.start.max(piece_start), range.end.min(piece_end));
        (from < to).then(|| (piece, from - piece_start..to - piece_start))
    })
}

/// Fills `out` with the bytes of `pieces` (joined) from `offset` on; false, with `out`
/// partly filled, when they end before `out` is full.
pub fn copy_from_pieces(pieces: &[Bytes], offset: usize, out: &mut [u8]) -> bool {
    let mut filled = 0;
    for (piece, range) in pieces_in(pieces, offset..offset.saturating_add(out.len())) {
        out[filled..filled + range.len()].copy_from_slice(&piece[range.clone()]);
        filled += range.len();
    }
    filled == out.len()
}

/// The pieces joined into one buffer (a copy).
pub fn join_pieces(pieces: &[Bytes]) -> Vec<u8> {
    let mut joined = Vec::with_capacity(pieces.iter().map(Bytes::len).sum());
    for piece in pieces {
        joined.extend_from_slice(piece);
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_copies_and_joins_cross_piece_edges() {
        let pieces: Vec<Bytes> = [&b"abc"[..], b"", b"defg", b"h"]
            .into_iter()
            .map(Bytes::copy_from_slice)
            .collect();
        let covered: Vec<&[u8]> = pieces_in(&pieces, 2..7).map(|(p, r)| &p[r]).collect();
        assert_eq!(covered, [&b"c"[..], b"defg"]);
        let mut out = [0u8; 4];
        assert!(copy_from_pieces(&pieces, 1, &mut out));
        assert_eq!(&out, b"bcde");
        assert!(
            !copy_from_pieces(&pieces, 6, &mut out),
            "only 2 bytes from offset 6"
        );
        assert_eq!(join_pieces(&pieces), b"abcdefgh");
    }
}
