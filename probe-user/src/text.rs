//! Text that comes from pods (process names, cgroup names, query names) made safe to show:
//! bytes decoded without losing what is not UTF-8, and lines escaped before a terminal or a
//! reader sees them (tables, labels, Kubernetes Event notes), so that no pod can forge a line,
//! clear the screen, plant a link or reorder text. JSON output keeps every string exact but
//! escapes the same characters as `\u` sequences (`json_line`), where the plain encoder escapes
//! only C0.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Bytes as text: valid UTF-8 as is, every other byte as `\xNN`.
pub fn from_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A NUL-terminated (or full) byte array from the kernel, as `from_bytes` decodes it.
pub fn c_string(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    from_bytes(&bytes[..len])
}

/// A line safe for a terminal: control characters (C0, DEL, C1), the line and paragraph
/// separators and the bidirectional formatting characters escaped as `\xNN` or `\u{NNNN}`.
/// Borrowed when there is nothing to escape.
pub fn printable(s: &str) -> Cow<'_, str> {
    if plain_ascii(s) || !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !needs_escape(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// One value as a JSON line (with its newline): exact, and with no character a terminal would
/// obey (DEL, C1, the line and paragraph separators and the bidirectional controls escaped as
/// `\uNNNN`, besides JSON's own C0).
pub fn json_line(value: &impl serde::Serialize) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, TerminalSafe);
    value.serialize(&mut ser)?;
    out.push(b'\n');
    Ok(out)
}

/// serde_json's compact formatter, escaping what `printable` escapes inside strings.
struct TerminalSafe;

impl serde_json::ser::Formatter for TerminalSafe {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if plain_ascii(fragment) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if needs_escape(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                write!(writer, "\\u{:04x}", c as u32)?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Printable ASCII only (no byte a check by character would stop at): what nearly every
/// name is, decided a word at a time instead of a character at a time (the character loop
/// was 14% of the replay's time per event line).
fn plain_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Whether `printable` escapes `c`: what a terminal or a reader would obey rather than show.
pub(crate) fn needs_escape(c: char) -> bool {
    // is_control: exactly C0, DEL and C1 (NEL, U+0085, among them). U+2028 and U+2029 end a
    // line or a paragraph for Unicode-aware readers (and JavaScript strings) as \n does for a
    // terminal: with C0's CR, LF, VT, FF and C1's NEL they are every mandatory line break. The
    // others reorder what a terminal shows (U+202A..U+202E embeddings and overrides,
    // U+2066..U+2069 isolates, LRM/RLM/ALM).
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        assert!(matches!(printable("java worker-1"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\n\x1b[2J\x1b[31mFAKE"),
            "a\\x0a\\x1b[2J\\x1b[31mFAKE"
        );
        assert_eq!(printable("del\x7f c1\u{85}"), "del\\x7f c1\\x85");
        assert_eq!(printable("evil\u{202e}txt"), "evil\\u{202e}txt");
        assert_eq!(printable("ünïcode ok"), "ünïcode ok");
    }

    #[test]
    fn line_and_paragraph_separators_are_escaped() {
        assert_eq!(
            printable("one\u{2028}FAKE two\u{2029}FAKE nel\u{85} vt\x0b ff\x0c cr\r"),
            "one\\u{2028}FAKE two\\u{2029}FAKE nel\\x85 vt\\x0b ff\\x0c cr\\x0d"
        );
        let name = "ls\u{2028}ps\u{2029}";
        let line = json_line(&serde_json::json!({ "comm": name })).unwrap();
        let text = std::str::from_utf8(&line).unwrap();
        assert_eq!(text, "{\"comm\":\"ls\\u2028ps\\u2029\"}\n");
        let back: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back["comm"], name, "the string survives exactly");
    }

    #[test]
    fn json_lines_are_exact_and_terminal_safe() {
        let name = "del\x7f c1\u{9b}31m bidi\u{202e} nl\n ok é";
        let line = json_line(&serde_json::json!({ "comm": name })).unwrap();
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.ends_with('\n'));
        assert!(!text.trim_end().chars().any(char::is_control), "{text:?}");
        assert!(!text.contains('\u{202e}'), "{text:?}");
        let back: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back["comm"], name, "the string survives exactly");
    }

    #[test]
    fn invalid_utf8_keeps_its_bytes() {
        assert_eq!(from_bytes(b"java"), "java");
        assert_eq!(from_bytes(b"a\xffb\xc3"), "a\\xffb\\xc3");
        assert_eq!(from_bytes("é".as_bytes()), "é");
    }

    #[test]
    fn no_output_of_printable_holds_a_control_character() {
        // Every byte value, alone and in pairs (which covers each two-byte UTF-8 sequence).
        for a in 0u8..=255 {
            for b in [0u8, 0x1b, 0x85, 0xc2, 0xe2, b'x', 0xff] {
                let s = from_bytes(&[a, b]);
                assert!(!printable(&s).chars().any(needs_escape), "{a:#x} {b:#x}");
            }
        }
    }
}
