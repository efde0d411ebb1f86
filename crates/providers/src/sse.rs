//! An incremental parser for `text/event-stream` bodies.
//!
//! Upstream bytes arrive in arbitrary pieces (an event split across TCP reads,
//! several events in one read, `\r\n`, `\n` or `\r` line ends); the parser yields
//! each complete event as soon as its terminating blank line is seen, so
//! chunks are relayed as they arrive instead of after the whole stream.

use bytes::{Buf, Bytes, BytesMut};

/// The failure of a stream whose event outgrew [`MAX_EVENT_BYTES`].
pub fn too_large() -> crate::ProviderError {
    crate::ProviderError::Protocol(format!(
        "an event of the stream is larger than {} MiB",
        MAX_EVENT_BYTES >> 20
    ))
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when present (Anthropic names its events).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: Bytes,
}

/// The most an event may hold (its data, and a line not yet ended): past
/// it the stream is refused rather than buffered without bound.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    /// How far `buf` has been searched for a line end.
    scanned: usize,
    data: BytesMut,
    has_data: bool,
    event: Option<String>,
    /// The stream's first bytes have been checked for a byte order mark,
    /// which the SSE standard says to skip.
    past_bom: bool,
    /// The last line ended with a `\r` that was the last byte read: a `\n`
    /// first in the next read belongs to that line end.
    skip_lf: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if !self.past_bom {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            let n = self.buf.len().min(BOM.len());
            if self.buf[..n] != BOM[..n] {
                self.past_bom = true;
            } else if n == BOM.len() {
                self.buf.advance(n);
                self.past_bom = true;
            }
        }
    }

    /// Whether the event being read has outgrown [`MAX_EVENT_BYTES`]
    /// (checked by the reader after each push).
    pub fn overflowed(&self) -> bool {
        self.buf.len() + self.data.len() > MAX_EVENT_BYTES
    }

    /// The next complete event, if the bytes pushed so far hold one.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if self.skip_lf && !self.buf.is_empty() {
                self.skip_lf = false;
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
            }
            let Some(found) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scanned..]) else {
                // Searched: the next search starts where new bytes do, so a
                // long line read in many pieces is scanned once, not again
                // with every piece.
                self.scanned = self.buf.len();
                return None;
            };
            let pos = found + self.scanned;
            // A line ends with `\n`, `\r\n` or a `\r` alone (the standard's
            // three). A `\r` last in the buffer ends its line now (an event
            // is not held back until more bytes come); a `\n` that then
            // starts the next read is skipped.
            let end = match (self.buf[pos], self.buf.get(pos + 1)) {
                (b'\n', _) => pos + 1,
                (_, Some(b'\n')) => pos + 2,
                (_, Some(_)) => pos + 1,
                (_, None) => {
                    self.skip_lf = true;
                    pos + 1
                }
            };
            let mut line = self.buf.split_to(end);
            self.scanned = 0;
            line.truncate(pos);
            if let Some(ev) = self.line(&line) {
                return Some(ev);
            }
        }
    }

    /// Called at the end of the body: an event whose lines all ended is
    /// delivered though no blank line followed it (many servers end that
    /// way). An event whose last line did not end may have been cut in the
    /// middle (a body cut mid-event): it is dropped, unless that line is the
    /// whole of `data: [DONE]`, so that a client is never handed half a JSON
    /// object.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            // What is left holds no line end but perhaps a `\r` last: that
            // one ended its line.
            let ended = rest.strip_suffix(b"\r");
            let line = ended.unwrap_or(&rest);
            if ended.is_none() && !matches!(line, b"data: [DONE]" | b"data:[DONE]") {
                self.data.clear();
                self.has_data = false;
                self.event = None;
                return None;
            }
            if let Some(ev) = self.line(line) {
                return Some(ev);
            }
        }
        self.line(b"")
    }

    /// Bytes pushed but not yet part of a complete line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    fn line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            if !self.has_data {
                self.event = None;
                return None;
            }
            self.has_data = false;
            let data = self.data.split().freeze();
            return Some(SseEvent {
                event: self.event.take(),
                data,
            });
        }
        if line[0] == b':' {
            return None; // a comment, e.g. a keep-alive
        }
        let (field, mut value) = match memchr::memchr(b':', line) {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        if value.first() == Some(&b' ') {
            value.advance(1);
        }
        match field {
            b"data" => {
                if self.has_data {
                    self.data.extend_from_slice(b"\n");
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {} // id and retry mean nothing to a relay
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for piece in pieces {
            p.push(piece);
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        out.extend(p.finish());
        out
    }

    fn data(s: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    #[test]
    fn parses_events_split_at_every_possible_byte() {
        let body = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\nevent: ping\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let expected = vec![
            data("{\"a\":1}"),
            data("{\"b\":2}"),
            SseEvent {
                event: Some("ping".into()),
                data: Bytes::from_static(b"x\ny"),
            },
            data("[DONE]"),
        ];
        assert_eq!(parse_all(&[body]), expected);
        for cut in 1..body.len() {
            assert_eq!(
                parse_all(&[&body[..cut], &body[cut..]]),
                expected,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(parse_all(&bytes), expected);
    }

    #[test]
    fn an_event_is_yielded_as_soon_as_its_blank_line_arrives() {
        let mut p = SseParser::new();
        p.push(b"data: one\n");
        assert_eq!(p.next_event(), None);
        p.push(b"\ndata: tw");
        assert_eq!(p.next_event(), Some(data("one")));
        assert_eq!(p.next_event(), None);
        assert_eq!(p.pending(), 8);
    }

    #[test]
    fn a_carriage_return_alone_ends_a_line_even_split_from_what_follows() {
        let body: &[u8] = b"data: {\"a\":1}\r\r: ping\r\rdata: x\r\ndata: y\r\r\ndata: [DONE]\r\r";
        let whole = parse_all(&[body]);
        assert_eq!(whole, [data("{\"a\":1}"), data("x\ny"), data("[DONE]")]);
        for cut in 1..body.len() {
            assert_eq!(
                parse_all(&[&body[..cut], &body[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        // A lone `\r` last in the body ended its line.
        assert_eq!(parse_all(&[b"data: z\r"]), [data("z")]);
    }

    #[test]
    fn an_event_ended_by_a_carriage_return_is_yielded_before_more_bytes_come() {
        let mut p = SseParser::new();
        p.push(b"data: {\"a\":1}\r\r");
        assert_eq!(p.next_event(), Some(data("{\"a\":1}")));
        // The same with `\r\n` split after its `\r`: the `\n` is no blank line.
        p.push(b"data: b\r");
        assert_eq!(p.next_event(), None);
        p.push(b"\ndata: c\r\n\r");
        assert_eq!(p.next_event(), Some(data("b\nc")));
        p.push(b"\n");
        assert_eq!(p.next_event(), None);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn a_final_event_without_blank_line_is_delivered_at_finish() {
        assert_eq!(parse_all(&[b"data:nospace\n"]), vec![data("nospace")]);
        assert_eq!(
            parse_all(&[b"data: {\"a\":1}\r\ndata: [DONE]"]),
            vec![data("{\"a\":1}\n[DONE]")]
        );
        assert_eq!(parse_all(&[b"data: [DONE]"]), vec![data("[DONE]")]);
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped_even_in_pieces() {
        assert_eq!(parse_all(&[b"\xEF\xBB\xBFdata: a\n\n"]), vec![data("a")]);
        assert_eq!(
            parse_all(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]),
            vec![data("a")]
        );
        // Only at the start of the stream.
        assert_eq!(
            parse_all(&[b"data: a\n\ndata: \xEF\xBB\xBFb\n\n"]),
            vec![data("a"), data("\u{feff}b")]
        );
    }

    #[test]
    fn a_last_line_cut_before_its_end_is_dropped() {
        assert_eq!(
            parse_all(&[b"data: {\"a\":1}\n\ndata: {\"b\":"]),
            vec![data("{\"a\":1}")]
        );
        assert_eq!(parse_all(&[b"data: last"]), vec![]);
        // A JSON object may span data lines: none of a cut event is kept.
        assert_eq!(parse_all(&[b"event: x\ndata: {\ndata: \"b\""]), vec![]);
    }

    #[test]
    fn a_long_line_is_scanned_once_and_an_oversized_event_is_flagged() {
        let mut p = SseParser::new();
        p.push(b"data: ");
        for _ in 0..1000 {
            p.push(&[b'x'; 100]);
            assert!(p.next_event().is_none());
            assert_eq!(p.scanned, p.buf.len(), "searched up to the end");
        }
        p.push(b"\n\n");
        let ev = p.next_event().expect("the event");
        assert_eq!(ev.data.len(), 100_000);
        assert!(!p.overflowed());
        p.push(b"data: ");
        p.push(&vec![b'y'; MAX_EVENT_BYTES]);
        assert!(p.overflowed());
    }
}
