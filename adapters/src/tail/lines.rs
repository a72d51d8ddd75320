//! Cutting a window of file bytes into line records: pure, no I/O.

use std::borrow::Cow;

use super::Encoding;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest piece, in raw bytes; at least 4 so any character fits.
    pub max_line: usize,
    pub max_lines: usize,
    pub max_bytes: usize,
}

impl Limits {
    /// How many bytes to read for one batch: enough to tell whether the first line is
    /// longer than `max_line`.
    pub(crate) fn window(&self) -> usize {
        self.max_bytes.max(self.max_line + 1)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Line<'a> {
    /// File offset of the line's first byte.
    pub start: u64,
    /// UTF-8 (or raw bytes in `utf-8` mode), without `\n` or a trailing `\r`;
    /// borrowed from the window unless transcoded.
    pub text: Cow<'a, [u8]>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Split<'a> {
    pub lines: Vec<Line<'a>>,
    /// Bytes of the window the lines cover; the batch's position is `base + consumed`.
    pub consumed: usize,
    /// How many of `lines` are pieces of an over-long line.
    pub pieces: usize,
}

/// Cuts `buf` (file bytes from offset `base`) into complete lines, within `lim`. A
/// trailing partial line stays unconsumed unless `flush_tail` (the file is rotated
/// away and `buf` reaches its end).
pub(crate) fn split<'a>(
    buf: &'a [u8],
    base: u64,
    flush_tail: bool,
    lim: &Limits,
    enc: Encoding,
) -> Split<'a> {
    let mut out = Split::default();
    let max_line = lim.max_line.max(4);
    while out.consumed < buf.len()
        && out.lines.len() < lim.max_lines.max(1)
        && (out.consumed < lim.max_bytes || out.lines.is_empty())
    {
        let start = out.consumed;
        let Some(rest) = buf.get(start..) else { break };
        let window = rest.get(..rest.len().min(max_line + 1)).unwrap_or(rest);
        let (line, used) = if let Some(nl) = memchr::memchr(b'\n', window) {
            (rest.get(..nl).unwrap_or_default(), nl + 1)
        } else if window.len() > max_line {
            let cut = cut_point(rest, max_line, enc);
            out.pieces += 1;
            // A piece keeps its bytes as they are: a `\r` there is not a line end.
            out.lines.push(Line {
                start: base + start as u64,
                text: decode(rest.get(..cut).unwrap_or_default(), enc),
            });
            out.consumed += cut;
            continue;
        } else if flush_tail {
            (rest, rest.len())
        } else {
            break;
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.lines.push(Line {
            start: base + start as u64,
            text: decode(line, enc),
        });
        out.consumed += used;
    }
    out
}

fn decode(raw: &[u8], enc: Encoding) -> Cow<'_, [u8]> {
    let text = match enc {
        Encoding::Utf8 => return Cow::Borrowed(raw),
        Encoding::Gbk => encoding_rs::GBK.decode_without_bom_handling(raw).0,
        Encoding::Gb18030 => encoding_rs::GB18030.decode_without_bom_handling(raw).0,
    };
    match text {
        Cow::Borrowed(t) => Cow::Borrowed(t.as_bytes()),
        Cow::Owned(t) => Cow::Owned(t.into_bytes()),
    }
}

/// Where to cut an over-long line: at most `max` bytes, on a character boundary when
/// the bytes are valid in `enc` (so no character is torn in two replacement marks).
/// Always at least 1, so a split makes progress.
fn cut_point(rest: &[u8], max: usize, enc: Encoding) -> usize {
    let is_cont = |i: usize| rest.get(i).is_some_and(|b| b & 0xC0 == 0x80);
    match enc {
        Encoding::Utf8 => {
            // Back off to the lead byte of the character that straddles `max`; a
            // sequence longer than 4 bytes is invalid anyway and cut as is.
            let mut cut = max;
            while cut > 0 && max - cut < 3 && is_cont(cut) {
                cut -= 1;
            }
            if cut == 0 || is_cont(cut) {
                max
            } else {
                cut
            }
        }
        Encoding::Gbk | Encoding::Gb18030 => {
            // GB18030 can only be walked forwards: single bytes below 0x80, four-byte
            // sequences when the second byte is a digit, two-byte ones otherwise.
            let mut i = 0;
            while i < max {
                let len = match rest.get(i) {
                    Some(0x81..=0xFE) => match rest.get(i + 1) {
                        Some(0x30..=0x39) => 4,
                        _ => 2,
                    },
                    _ => 1,
                };
                if i + len > max {
                    break;
                }
                i += len;
            }
            if i == 0 {
                max
            } else {
                i
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(max_line: usize) -> Limits {
        Limits {
            max_line,
            max_lines: 100,
            max_bytes: 1 << 20,
        }
    }

    fn texts(s: &Split) -> Vec<String> {
        s.lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.text).into_owned())
            .collect()
    }

    #[test]
    fn complete_lines_only_unless_flushed() {
        let buf = b"one\r\ntwo\n\nthree";
        let s = split(buf, 100, false, &lim(64), Encoding::Utf8);
        assert_eq!(texts(&s), ["one", "two", ""]);
        assert_eq!(
            s.lines.iter().map(|l| l.start).collect::<Vec<_>>(),
            [100, 105, 109]
        );
        assert_eq!(s.consumed, 10);
        let s = split(buf, 100, true, &lim(64), Encoding::Utf8);
        assert_eq!(texts(&s), ["one", "two", "", "three"]);
        assert_eq!(s.consumed, buf.len());
    }

    #[test]
    fn batch_limits() {
        let buf = b"a\nb\nc\nd\n";
        let l = Limits {
            max_line: 64,
            max_lines: 3,
            max_bytes: 1 << 20,
        };
        assert_eq!(split(buf, 0, false, &l, Encoding::Utf8).consumed, 6);
        let l = Limits {
            max_line: 64,
            max_lines: 100,
            max_bytes: 3,
        };
        let s = split(buf, 0, false, &l, Encoding::Utf8);
        assert_eq!(
            (texts(&s), s.consumed),
            (vec!["a".to_string(), "b".to_string()], 4)
        );
    }

    #[test]
    fn long_lines_are_split_not_dropped() {
        let buf = b"abcdefghijklmnopqrstuvwxy\nok\n";
        let s = split(buf, 0, false, &lim(10), Encoding::Utf8);
        assert_eq!(texts(&s), ["abcdefghij", "klmnopqrst", "uvwxy", "ok"]);
        assert_eq!(s.pieces, 2);
        assert_eq!(
            s.lines.iter().map(|l| l.start).collect::<Vec<_>>(),
            [0, 10, 20, 26]
        );
        // Exactly max_line bytes is not split; one more is.
        assert_eq!(
            texts(&split(b"abcd\n", 0, false, &lim(4), Encoding::Utf8)),
            ["abcd"]
        );
        let s = split(b"abcde", 0, false, &lim(4), Encoding::Utf8);
        assert_eq!((texts(&s), s.consumed), (vec!["abcd".to_string()], 4));
    }

    #[test]
    fn splits_respect_character_boundaries() {
        let text = "沈阳市民政局\n";
        let s = split(text.as_bytes(), 0, false, &lim(10), Encoding::Utf8);
        assert_eq!(texts(&s), ["沈阳市", "民政局"]);
        let (gbk, _, _) = encoding_rs::GBK.encode(text);
        let s = split(&gbk, 0, false, &lim(5), Encoding::Gbk);
        assert_eq!(texts(&s), ["沈阳", "市民", "政局"]);
        // A four-byte GB18030 sequence (U+10000) is kept whole.
        let (gb, _, _) = encoding_rs::GB18030.encode("a\u{10000}b\n");
        let s = split(&gb, 0, false, &lim(4), Encoding::Gb18030);
        assert_eq!(texts(&s), ["a", "\u{10000}", "b"]);
    }

    #[test]
    fn invalid_utf8_passes_through_and_gbk_is_transcoded() {
        let s = split(b"\xff\xfe ok\n", 0, false, &lim(64), Encoding::Utf8);
        assert_eq!(&*s.lines[0].text, b"\xff\xfe ok");
        let (gbk, _, _) = encoding_rs::GBK.encode("沈阳市民政局\r\n");
        let s = split(&gbk, 0, false, &lim(64), Encoding::Gbk);
        assert_eq!(texts(&s), ["沈阳市民政局"]);
    }
}
