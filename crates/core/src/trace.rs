//! W3C trace context: the id that follows a request through logs, usage rows
//! and (later) events. An incoming `traceparent` is continued; otherwise a new
//! trace is started.

use std::fmt;

use rand::RngCore;

/// One request's place in a distributed trace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    /// The span id this server uses for its own work.
    span_id: [u8; 8],
    sampled: bool,
}

impl TraceContext {
    /// Starts a new trace. The id begins with the time in unix milliseconds
    /// (6 bytes, as in a UUIDv7; AWS X-Ray ids likewise start with the time)
    /// and ends with 10 random bytes: ids made here sort by time, so the
    /// trace index of the event table grows at its end instead of at random
    /// pages, and the right-most bytes stay random as W3C Trace Context asks.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        trace_id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        rng.fill_bytes(&mut trace_id[6..]);
        loop {
            rng.fill_bytes(&mut span_id);
            if span_id != [0; 8] {
                break;
            }
        }
        Self {
            trace_id,
            span_id,
            sampled: true,
        }
    }

    /// Continues the trace of a valid `traceparent` header (version 00 or a
    /// later version read as 00, as the spec asks); `None` when invalid.
    pub fn from_traceparent(header: &str) -> Option<Self> {
        let parts: Vec<&str> = header.trim().split('-').collect();
        if parts.len() < 4 {
            return None;
        }
        let (version, trace, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.len() != 4) {
            return None;
        }
        let trace_id: [u8; 16] = decode_hex(trace)?;
        let parent_id: [u8; 8] = decode_hex(parent)?;
        let flags: [u8; 1] = decode_hex(flags)?;
        let _ = decode_hex::<1>(version)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        let mut ctx = Self::new_root();
        ctx.trace_id = trace_id;
        ctx.sampled = flags[0] & 1 == 1;
        Some(ctx)
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> String {
        encode_hex(&self.trace_id)
    }

    /// The `traceparent` value naming this server's span.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            encode_hex(&self.trace_id),
            encode_hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = hex_val(chunk[0])?;
        let lo = hex_val(chunk[1])?;
        out[i] = hi << 4 | lo;
    }
    Some(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // the spec allows lowercase only
    }
}

/// Lower-case hex, as trace ids are written (also used for other ids).
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_traceparent_with_a_new_span() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::from_traceparent(h).unwrap();
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = ctx.traceparent();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(&out[36..52], "00f067aa0ba902b7");
    }

    #[test]
    fn rejects_malformed_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::from_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn new_roots_start_with_the_time() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = TraceContext::new_root().trace_id();
        let ms = u64::from_str_radix(&id[..12], 16).unwrap();
        assert!(ms.abs_diff(now) <= 2_000, "{id} vs {now}");
    }

    #[test]
    fn new_roots_are_distinct_and_well_formed() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(TraceContext::from_traceparent(&a.traceparent()).is_some());
    }
}
