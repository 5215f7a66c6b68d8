//! Secret masking and chunking of job output, pure and synchronous.
//!
//! [`Masker`] replaces every occurrence of a secret value with `***` in a byte stream that
//! arrives in arbitrary pieces. It holds back the last `longest secret - 1` bytes of each
//! piece, so a secret split across two reads (or two log chunks) is still caught; the
//! held bytes are released by the next piece or by [`Masker::finish`].
//!
//! A secret is also masked in the forms a job commonly prints it in without meaning to
//! (the forms GitHub's runner masks, and a few more): base64 (standard and URL-safe
//! alphabets) at each of the three alignments it can have inside a longer encoded
//! text, JSON string escaping (plain and ASCII-only), and URL encoding (upper and lower
//! case hex, and form encoding's `+` for a space). See [`encoded_forms`].

use base64::Engine as _;

/// What a secret is replaced with.
pub const MASK: &[u8] = b"***";

/// Masks secrets in a stream of bytes.
#[derive(Debug)]
pub struct Masker {
    /// Every secret and every encoded form of one, longest first.
    secrets: Vec<Vec<u8>>,
    longest: usize,
    /// Bytes some secret (or form) starts with: the scan skips the others at once, so
    /// ordinary output costs one table lookup per byte however many forms there are.
    starts: Box<[bool; 256]>,
    held: Vec<u8>,
}

impl Default for Masker {
    fn default() -> Self {
        Self::new([])
    }
}

impl Masker {
    /// Secrets shorter than [`MIN_SECRET`] bytes are not masked: masking every "a" would
    /// destroy the log while protecting nothing.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET)
            .flat_map(|s| {
                let mut forms = encoded_forms(s.as_bytes());
                forms.push(s.as_bytes().to_vec());
                forms
            })
            .filter(|s| s.len() >= MIN_SECRET)
            .collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let longest = secrets.first().map_or(0, Vec::len);
        let mut starts = Box::new([false; 256]);
        for s in &secrets {
            starts[usize::from(s[0])] = true;
        }
        Self {
            secrets,
            longest,
            starts,
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

    /// Masks one whole text (an output value), leaving nothing held.
    pub fn mask_text(&mut self, text: &str) -> String {
        let mut out = self.push(text.as_bytes());
        out.extend(self.finish());
        String::from_utf8_lossy(&out).into_owned()
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
            if !self.starts[usize::from(buf[i])] {
                out.push(buf[i]);
                i += 1;
                continue;
            }
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

/// Shortest secret (or encoded form of one) that is masked: masking every "ab" would
/// destroy the log while protecting nothing.
const MIN_SECRET: usize = 3;
/// Shortest base64 form that is masked: 4 characters carry 24 bits, as much as the
/// shortest secret masked; 3 would mask every 3-letter word of some secret.
const MIN_BASE64_FORM: usize = 4;

/// The forms `secret` takes when a job encodes it, other than itself (some may equal it
/// or each other; the caller deduplicates):
/// - base64, standard and URL-safe alphabets, at each alignment: inside a longer
///   encoded text the secret starts 0, 1 or 2 bytes into a 3-byte group, and only the
///   characters whose 6 bits all come from the secret are fixed; those are the form.
///   Alone (`echo -n $SECRET | base64`) its encoding starts with the alignment-0 form;
/// - JSON string contents: `"` `\` and controls escaped, and an ASCII-only variant
///   (`\u00e9`, as Python's `json.dumps` writes);
/// - URL encoding: everything but `A-Za-z0-9-._~` as `%XX` in upper and in lower case,
///   and form encoding (a space as `+`).
pub fn encoded_forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = Vec::new();
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
    ] {
        for align in 0..3 {
            let form = base64_fixed_part(engine, secret, align);
            if form.len() >= MIN_BASE64_FORM {
                forms.push(form);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(json_escaped(text, false));
        forms.push(json_escaped(text, true));
    }
    forms.push(url_encoded(secret, b"0123456789ABCDEF", false));
    forms.push(url_encoded(secret, b"0123456789abcdef", false));
    forms.push(url_encoded(secret, b"0123456789ABCDEF", true));
    forms
}

/// The base64 characters fixed by `secret` alone when it starts `align` bytes into a
/// 3-byte group: character `i` holds bits `6i..6i+6` of the group-aligned bytes, and the
/// secret bits `8*align..8*(align+len)`.
fn base64_fixed_part(
    engine: &base64::engine::GeneralPurpose,
    secret: &[u8],
    align: usize,
) -> Vec<u8> {
    let mut bytes = vec![0u8; align];
    bytes.extend_from_slice(secret);
    let encoded = engine.encode(&bytes).into_bytes();
    let first = (8 * align).div_ceil(6);
    let end = (8 * (align + secret.len())) / 6;
    encoded
        .get(first..end.min(encoded.len()))
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

fn json_escaped(text: &str, ascii_only: bool) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || (ascii_only && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.into_bytes()
}

fn url_encoded(secret: &[u8], hex: &[u8; 16], form: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(secret.len());
    for &b in secret {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b),
            b' ' if form => out.push(b'+'),
            b => out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]),
        }
    }
    out
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

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// `echo -n $SECRET | base64`, and the secret inside a longer encoded text at each
    /// of the three alignments: none of the characters fixed by the secret survives.
    #[test]
    fn base64_forms_are_masked_at_every_alignment() {
        let secret = "s3cr3t-t0ken-value";
        let alone = b64(secret.as_bytes());
        let out = mask_in_pieces(&[secret], format!("{alone}\n").as_bytes(), &[]);
        assert!(
            !String::from_utf8_lossy(&out).contains(&alone[..20]),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(out.starts_with(b"***"), "{}", String::from_utf8_lossy(&out));
        for align in 0..3 {
            for after in 0..3 {
                let mut plain = b"user:".to_vec();
                // 3 + align bytes before the secret: it starts `align` into a group.
                plain.truncate(3 + align);
                plain.extend_from_slice(secret.as_bytes());
                plain.extend_from_slice(&b"xyz"[..after]);
                let encoded = b64(&plain);
                let fixed = base64_fixed_part(
                    &base64::engine::general_purpose::STANDARD,
                    secret.as_bytes(),
                    align,
                );
                assert!(encoded.contains(std::str::from_utf8(&fixed).expect("ascii")));
                let out = mask_in_pieces(&[secret], format!("auth {encoded} end").as_bytes(), &[]);
                let out = String::from_utf8_lossy(&out);
                assert!(out.contains("***"), "align {align}: {out}");
                assert!(
                    !out.contains(std::str::from_utf8(&fixed).expect("ascii")),
                    "align {align}: {out}"
                );
            }
        }
        // URL-safe base64 (JWTs): a secret whose encoding has `+` or `/`.
        let odd = "\u{fb}\u{ff}secret\u{fe}";
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(odd.as_bytes());
        let out = mask_in_pieces(&[odd], url.as_bytes(), &[]);
        assert!(out.starts_with(b"***"), "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn json_escaped_forms_are_masked() {
        let secret = "pa\"ss\\wo\nrd-\u{e9}t\u{1}";
        let plain = "pa\\\"ss\\\\wo\\nrd-\u{e9}t\\u0001";
        let ascii = "pa\\\"ss\\\\wo\\nrd-\\u00e9t\\u0001";
        for form in [plain, ascii] {
            let out = mask_in_pieces(
                &[secret],
                format!("{{\"token\":\"{form}\"}}").as_bytes(),
                &[],
            );
            assert_eq!(out, b"{\"token\":\"***\"}", "{form}");
        }
    }

    #[test]
    fn url_encoded_forms_are_masked() {
        let secret = "p@ss w/rd&x";
        for form in [
            "p%40ss%20w%2Frd%26x",
            "p%40ss%20w%2frd%26x",
            "p%40ss+w%2Frd%26x",
        ] {
            let out = mask_in_pieces(&[secret], format!("GET /?t={form}&a=1").as_bytes(), &[]);
            assert_eq!(out, b"GET /?t=***&a=1", "{form}");
        }
    }

    /// Each encoded form split at every byte across two pieces (two log chunks).
    #[test]
    fn encoded_forms_split_across_pieces_are_still_masked() {
        let secret = "p@ss w/rd\"s3cr3t";
        for form in encoded_forms(secret.as_bytes()) {
            let mut input = b"<".to_vec();
            input.extend_from_slice(&form);
            input.extend_from_slice(b">");
            for cut in 0..=input.len() {
                let out = mask_in_pieces(&[secret], &input, &[cut]);
                assert_eq!(
                    out,
                    b"<***>",
                    "form {} cut at {cut}",
                    String::from_utf8_lossy(&form)
                );
            }
        }
    }

    #[test]
    fn short_secrets_get_no_short_encoded_forms() {
        // "abc" alone is masked; its base64 "YWJj" too; but no 3-character fragment.
        assert_eq!(mask_in_pieces(&["abc"], b"abc YWJj", &[]), b"*** ***");
        assert!(encoded_forms(b"abc")
            .iter()
            .all(|f| f.len() >= MIN_BASE64_FORM || f == b"abc"));
        assert_eq!(mask_in_pieces(&["abc"], b"WJj Jj", &[]), b"WJj Jj");
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
