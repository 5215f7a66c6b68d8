//! Making a job's log safe to write to a person's terminal: a job's output is untrusted,
//! and a terminal obeys control sequences (OSC 52 writes the clipboard, OSC 0/2 the
//! window title, CSI moves the cursor and erases what is on screen, DCS and friends
//! reach terminal-specific features).
//!
//! [`Neutraliser`] lets colours through (SGR, `ESC [ params m`) and newline, tab and
//! carriage return (progress bars); every other C0 control, DEL, every other escape
//! sequence, and the UTF-8 encoded C1 controls (U+0080..U+009F, which some terminals
//! take as 8-bit CSI/OSC) are shown as text instead: `\x1b]52;c;...\x07`. It works on a
//! stream in arbitrary pieces, holding at most [`MAX_HELD`] bytes of an unfinished
//! sequence between them. `gantry logs --raw` bypasses it.

/// Longest escape sequence held while it is still undecided whether it is a colour:
/// real SGR sequences are a few dozen bytes; anything longer is shown escaped.
pub const MAX_HELD: usize = 64;

/// Neutralises control sequences other than colours in a stream of bytes.
#[derive(Debug, Default)]
pub struct Neutraliser {
    /// An unfinished `ESC`, `ESC [ ...` or trailing `0xC2` from the previous piece.
    held: Vec<u8>,
}

impl Neutraliser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next piece; returns what can be written now.
    pub fn push(&mut self, piece: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(piece.len() + self.held.len());
        for &b in piece {
            self.byte(b, &mut out);
        }
        out
    }

    /// Releases whatever is still held (an unfinished sequence, shown escaped).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        escape_all(&std::mem::take(&mut self.held), &mut out);
        out
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.held.is_empty() {
            match b {
                0x1b | 0xc2 => self.held.push(b),
                b'\n' | b'\t' | b'\r' => out.push(b),
                0x00..=0x1f | 0x7f => escape_byte(b, out),
                _ => out.push(b),
            }
            return;
        }
        if self.held == [0xc2] {
            self.held.clear();
            if (0x80..=0x9f).contains(&b) {
                // A C1 control in UTF-8.
                escape_byte(0xc2, out);
                escape_byte(b, out);
            } else {
                out.push(0xc2);
                self.byte(b, out);
            }
            return;
        }
        // held starts with ESC.
        if self.held.len() == 1 {
            if b == b'[' {
                self.held.push(b);
            } else {
                // Any other escape (OSC `ESC ]`, DCS `ESC P`, charset, reset...).
                self.release_escaped(out);
                self.byte(b, out);
            }
            return;
        }
        // held is `ESC [ ...`: parameters, then a final byte decides.
        match b {
            b'0'..=b'9' | b';' | b':' if self.held.len() < MAX_HELD => self.held.push(b),
            b'm' => {
                out.extend_from_slice(&self.held);
                out.push(b);
                self.held.clear();
            }
            _ => {
                // Another CSI (cursor, erase, private modes), or not a CSI at all.
                self.release_escaped(out);
                self.byte(b, out);
            }
        }
    }

    fn release_escaped(&mut self, out: &mut Vec<u8>) {
        escape_all(&std::mem::take(&mut self.held), out);
    }
}

/// Writes `bytes` with every control shown as `\xNN` (ESC included).
fn escape_all(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        match b {
            0x00..=0x1f | 0x7f | 0xc2 => escape_byte(b, out),
            _ => out.push(b),
        }
    }
}

fn escape_byte(b: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 15)],
    ]);
}

/// Neutralises a whole text at once.
pub fn neutralise(bytes: &[u8]) -> Vec<u8> {
    let mut n = Neutraliser::new();
    let mut out = n.push(bytes);
    out.extend(n.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// `raw`, neutralised, reads `shown`.
    fn assert_shown(raw: &[u8], shown: &str) {
        assert_eq!(show(&neutralise(raw)), shown, "{raw:?}");
    }

    #[test]
    fn colours_newlines_tabs_and_carriage_returns_pass() {
        let text = b"\x1b[1;31merror\x1b[0m: x\tgot\r\n\x1b[m\x1b[38;5;208mo\x1b[38:2:1:2:3m";
        assert_eq!(neutralise(text), text.to_vec());
        assert_eq!(
            neutralise("caf\u{e9} \u{2716}".as_bytes()),
            "caf\u{e9} \u{2716}".as_bytes()
        );
    }

    #[test]
    fn osc_clipboard_and_title_are_shown_escaped() {
        assert_shown(b"a\x1b]52;c;ZXZpbA==\x07b", "a\\x1b]52;c;ZXZpbA==\\x07b");
        assert_shown(b"\x1b]0;owned\x1b\\", "\\x1b]0;owned\\x1b\\");
    }

    #[test]
    fn csi_other_than_colours_is_shown_escaped() {
        for (raw, shown) in [
            (&b"\x1b[2J"[..], "\\x1b[2J"),
            (b"\x1b[1;1H", "\\x1b[1;1H"),
            (b"\x1b[?1049h", "\\x1b[?1049h"),
            (b"\x1b[6n", "\\x1b[6n"),
            (b"\x1b[31;1 m", "\\x1b[31;1 m"),
            (b"\x1bc", "\\x1bc"),
            (b"\x1bP1$r\x1b\\", "\\x1bP1$r\\x1b\\"),
        ] {
            assert_shown(raw, shown);
        }
    }

    #[test]
    fn other_c0_controls_del_and_c1_are_shown_escaped() {
        assert_shown(b"a\x07b\x08c\x00d\x7f", "a\\x07b\\x08c\\x00d\\x7f");
        // U+009B (8-bit CSI) and U+009D (8-bit OSC) in UTF-8.
        assert_shown(b"\xc2\x9b2J \xc2\x9d0;t", "\\xc2\\x9b2J \\xc2\\x9d0;t");
        // Other characters starting with 0xC2 are text.
        assert_eq!(
            neutralise("\u{a9}\u{bf}".as_bytes()),
            "\u{a9}\u{bf}".as_bytes()
        );
    }

    #[test]
    fn sequences_split_across_pieces_are_decided_the_same() {
        let inputs: [&[u8]; 4] = [
            b"x\x1b[1;32mok\x1b[0m y",
            b"x\x1b]52;c;aGk=\x07 y",
            b"x\xc2\x9b2J \xc2\xa9 y",
            b"x\x1b[12;3H y",
        ];
        for input in inputs {
            let whole = neutralise(input);
            for cut in 0..=input.len() {
                let mut n = Neutraliser::new();
                let mut out = n.push(&input[..cut]);
                out.extend(n.push(&input[cut..]));
                out.extend(n.finish());
                assert_eq!(show(&out), show(&whole), "cut at {cut} of {input:?}");
            }
        }
    }

    #[test]
    fn an_endless_sequence_is_not_held_forever() {
        let mut n = Neutraliser::new();
        let mut input = b"\x1b[".to_vec();
        input.extend(std::iter::repeat_n(b'1', 10_000));
        let out = n.push(&input);
        assert!(out.len() >= 10_000 - MAX_HELD, "released, not held");
        assert!(show(&out).starts_with("\\x1b["), "{}", show(&out[..20]));
        assert_eq!(n.finish().len(), 0);
        // An unfinished escape at the end is released escaped.
        let mut n = Neutraliser::new();
        assert_eq!(n.push(b"ab\x1b[3"), b"ab");
        assert_eq!(show(&n.finish()), "\\x1b[3");
    }
}
