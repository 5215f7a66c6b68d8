//! Secret masking and chunking of job output, pure and synchronous.
//!
//! [`Masker`] replaces every occurrence of a secret value with `***` in a byte stream that
//! arrives in arbitrary pieces. It holds back the last `longest secret - 1` bytes of each
//! piece, so a secret split across two reads (or two log chunks) is still caught; the
//! held bytes are released by the next piece or by [`Masker::finish`].

/// What a secret is replaced with.
pub const MASK: &[u8] = b"***";

/// Masks secrets in a stream of bytes.
#[derive(Debug, Default)]
pub struct Masker {
    secrets: Vec<Vec<u8>>,
    longest: usize,
    held: Vec<u8>,
}

impl Masker {
    /// Secrets shorter than 3 bytes are not masked: masking every "a" would destroy the
    /// log while protecting nothing.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| s.len() >= 3)
            .map(|s| s.as_bytes().to_vec())
            .collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let longest = secrets.first().map_or(0, Vec::len);
        Self {
            secrets,
            longest,
            held: Vec::new(),
        }
    }

    /// Takes the next piece of output; returns what can be released now.
    pub fn push(&mut self, piece: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return piece.to_vec();
        }
        self.held.extend_from_slice(piece);
        let (out, keep_from) = self.scan(false);
        self.held.drain(..keep_from);
        out
    }

    /// Releases everything still held, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let (out, _) = self.scan(true);
        self.held.clear();
        out
    }

    /// Masks `held`; returns the releasable output and where the unreleased tail starts.
    /// Unless `all`, the longest tail that is the start of a secret is kept back (and
    /// nothing else, so ordinary output is never delayed).
    fn scan(&self, all: bool) -> (Vec<u8>, usize) {
        let buf = &self.held;
        let hold = if all {
            0
        } else {
            (1..self.longest.min(buf.len() + 1))
                .rev()
                .find(|&k| {
                    self.secrets
                        .iter()
                        .any(|s| s.len() > k && s.starts_with(&buf[buf.len() - k..]))
                })
                .unwrap_or(0)
        };
        let safe_end = buf.len() - hold;
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < safe_end {
            if let Some(s) = self.secrets.iter().find(|s| buf[i..].starts_with(s)) {
                out.extend_from_slice(MASK);
                i += s.len();
            } else {
                out.push(buf[i]);
                i += 1;
            }
        }
        // A secret that started before safe_end may extend past it: i is then beyond safe_end.
        (out, i.min(buf.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_in_pieces(secrets: &[&str], input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut m = Masker::new(secrets.iter().copied());
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts {
            out.extend(m.push(&input[last..c]));
            last = c;
        }
        out.extend(m.push(&input[last..]));
        out.extend(m.finish());
        out
    }

    #[test]
    fn secrets_are_masked_whole_and_overlapping_secrets_take_the_longest() {
        let out = mask_in_pieces(&["hunter2", "hunter22x"], b"pw=hunter22x and hunter2.", &[]);
        assert_eq!(out, b"pw=*** and ***.");
        assert_eq!(
            mask_in_pieces(&["ab"], b"ab", &[]),
            b"ab",
            "too short to mask"
        );
        assert_eq!(mask_in_pieces(&[], b"plain", &[2]), b"plain");
    }

    #[test]
    fn output_that_cannot_start_a_secret_is_not_held_back() {
        let mut m = Masker::new(["s3cr3t"]);
        assert_eq!(
            m.push(b"hello\n"),
            b"hello\n",
            "nothing held: no secret starts with a suffix of it"
        );
        assert_eq!(
            m.push(b"x s3c"),
            b"x ",
            "only the possible start of the secret waits"
        );
        assert_eq!(m.push(b"ond"), b"s3cond");
    }

    #[test]
    fn a_secret_split_across_pieces_is_still_masked() {
        let input = b"token: s3cr3t-value end";
        for cut in 0..=input.len() {
            let out = mask_in_pieces(&["s3cr3t-value"], input, &[cut]);
            assert_eq!(out, b"token: *** end", "cut at {cut}");
        }
    }

    /// Randomized chunk boundaries (a fixed-seed generator, so a failure replays).
    #[test]
    fn random_chunk_boundaries_never_leak_a_secret() {
        let secrets = ["correct-horse", "battery-staple", "xyz"];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..500 {
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..next(20) {
                match next(4) {
                    0..=2 if next(2) == 0 => {
                        let s = secrets[next(secrets.len())];
                        input.extend_from_slice(s.as_bytes());
                        expected.extend_from_slice(MASK);
                    }
                    _ => {
                        let filler: Vec<u8> = (0..next(12))
                            .map(|_| b"abcdefg -\n\xff"[next(11)])
                            .collect();
                        input.extend_from_slice(&filler);
                        expected.extend_from_slice(&filler);
                    }
                }
            }
            let mut cuts: Vec<usize> = (0..next(6)).map(|_| next(input.len() + 1)).collect();
            cuts.sort_unstable();
            let out = mask_in_pieces(&secrets, &input, &cuts);
            for s in secrets {
                assert!(
                    !out.windows(s.len()).any(|w| w == s.as_bytes()),
                    "secret {s} leaked with cuts {cuts:?}"
                );
            }
            // Masking only removes secrets: fillers cannot form a secret here, so the output is exact.
            assert_eq!(out, expected, "cuts {cuts:?}");
        }
    }
}
