//! The JSON log line format, as a `tracing` layer of its own.
//!
//! The lines have the shape of `tracing-subscriber`'s JSON formatter with
//! flattened events (`timestamp`, `level`, the event's fields, `target`,
//! then `span`, the innermost span's fields and name, and `spans`, every
//! open span from the root), so tools reading them see no change. What
//! differs is the cost on the request path: a span's fields are written as
//! JSON once, when the span opens, and an event copies that text into its
//! line; `tracing-subscriber`'s formatter stores span fields as a JSON string
//! and parses it back for every line it writes, which made logging about a
//! tenth of the gateway's CPU per request (docs/BENCHMARKS.md).

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::logwriter::LogSink;

/// Writes one JSON line per event to a [`LogSink`].
pub struct JsonLayer {
    sink: LogSink,
}

impl JsonLayer {
    pub fn new(sink: LogSink) -> Self {
        Self { sink }
    }
}

/// A span's fields as JSON object members, `"k":v,` each (trailing comma),
/// written when it opened; the name is added when a line is written.
struct SpanFields(String);

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = String::with_capacity(96);
        attrs.record(&mut Members::span(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        match ext.get_mut::<SpanFields>() {
            // A field recorded later is appended; a reader keeps the last value.
            Some(f) => values.record(&mut Members::span(&mut f.0)),
            None => {
                let mut fields = String::new();
                values.record(&mut Members::span(&mut fields));
                ext.insert(SpanFields(fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        LINE.with(|line| {
            // A re-entrant event (logged while formatting one) gets its own buffer.
            let mut own;
            let mut guard = line.try_borrow_mut();
            let buf: &mut String = match guard.as_deref_mut() {
                Ok(b) => b,
                Err(_) => {
                    own = String::new();
                    &mut own
                }
            };
            buf.clear();
            let meta = event.metadata();
            buf.push_str("{\"timestamp\":\"");
            rfc3339_micros(buf, SystemTime::now());
            buf.push_str("\",\"level\":\"");
            buf.push_str(meta.level().as_str());
            buf.push_str("\",");
            event.record(&mut Members {
                buf,
                own_keys: EVENT_KEYS,
                fields: Some(meta.fields()),
            });
            buf.push_str("\"target\":");
            push_json_str(buf, meta.target());
            if let Some(leaf) = ctx.event_scope(event).and_then(|mut s| s.next()) {
                buf.push_str(",\"span\":");
                span_object(buf, &leaf);
                buf.push_str(",\"spans\":[");
                for span in ctx
                    .event_scope(event)
                    .into_iter()
                    .flat_map(|s| s.from_root())
                {
                    span_object(buf, &span);
                    buf.push(',');
                }
                buf.pop(); // the last comma
                buf.push(']');
            }
            buf.push_str("}\n");
            let _ = self.sink.clone().write_all(buf.as_bytes());
        });
    }
}

/// `{<fields>"name":"<span name>"}`.
fn span_object<S: for<'a> LookupSpan<'a>>(
    buf: &mut String,
    span: &tracing_subscriber::registry::SpanRef<'_, S>,
) {
    buf.push('{');
    if let Some(f) = span.extensions().get::<SpanFields>() {
        buf.push_str(&f.0);
    }
    buf.push_str("\"name\":");
    push_json_str(buf, span.name());
    buf.push('}');
}

/// The keys a line writes itself besides its event's fields.
const EVENT_KEYS: &[&str] = &["timestamp", "level", "target", "span", "spans"];
/// The key a span object writes itself besides the span's fields.
const SPAN_KEYS: &[&str] = &["name"];
/// Put before the name of a field that would repeat a key of the object it
/// is written in: a JSON object with a repeated key is read differently by
/// different tools (most keep the last; the line's own key would be lost).
const CLASH_PREFIX: &str = "field.";

/// Writes each field as `"name":value,`.
struct Members<'a> {
    buf: &'a mut String,
    /// Keys the object writes itself; a field with one of these names is
    /// written as `field.<name>`.
    own_keys: &'static [&'static str],
    /// The event's fields, to find a name already written: a field named
    /// `message` besides the event's message (its first field).
    fields: Option<&'a tracing::field::FieldSet>,
}

impl<'a> Members<'a> {
    fn span(buf: &'a mut String) -> Self {
        Self {
            buf,
            own_keys: SPAN_KEYS,
            fields: None,
        }
    }

    fn key(&mut self, field: &Field) {
        let name = field.name();
        let repeated = self.fields.is_some_and(|set| {
            set.iter()
                .take(field.index())
                .any(|earlier| earlier.name() == name)
        });
        if repeated || self.own_keys.contains(&name) {
            self.buf.push('"');
            self.buf.push_str(CLASH_PREFIX);
            escape_into(self.buf, name);
            self.buf.push_str("\":");
        } else {
            push_json_str(self.buf, name);
            self.buf.push(':');
        }
    }
}

impl Visit for Members<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.buf, "{value}");
        } else {
            self.buf.push_str("null");
        }
        self.buf.push(',');
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
        self.buf.push(',');
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
        self.buf.push(',');
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.buf.push_str(if value { "true" } else { "false" });
        self.buf.push(',');
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.buf, value);
        self.buf.push(',');
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        self.buf.push('"');
        let _ = write!(Escaped(self.buf), "{value:?}");
        self.buf.push_str("\",");
    }
}

/// A `fmt::Write` that JSON-escapes what goes through it.
struct Escaped<'a>(&'a mut String);

impl std::fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

fn push_json_str(buf: &mut String, s: &str) {
    buf.push('"');
    escape_into(buf, s);
    buf.push('"');
}

/// JSON string escaping (RFC 8259): quotes, backslashes and control characters.
fn escape_into(buf: &mut String, s: &str) {
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        buf.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(buf, "\\u{b:04x}");
        } else {
            buf.push_str(esc);
        }
        start = i + 1;
    }
    buf.push_str(&s[start..]);
}

/// `2026-12-01T23:38:05.123456Z`.
fn rfc3339_micros(buf: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let _ = write!(
        buf,
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::Value;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(f: impl FnOnce()) -> Vec<Value> {
        let out = Capture::default();
        let (sink, guard) = crate::logwriter::spawn(out.clone());
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(sink));
        tracing::subscriber::with_default(subscriber, f);
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn a_line_has_the_event_fields_its_span_and_every_open_span() {
        let lines = lines_of(|| {
            let outer = tracing::info_span!("request", trace_id = "abc", route = "/v1/x");
            let _o = outer.enter();
            let inner = tracing::info_span!("attempt", n = 2_u64);
            let _i = inner.enter();
            tracing::warn!(status = 502_u64, ok = false, latency_ms = 1.5, error = %"bad \"x\"\n", "request failed");
        });
        assert_eq!(lines.len(), 1);
        let v = &lines[0];
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "request failed");
        assert_eq!(v["status"], 502);
        assert_eq!(v["ok"], false);
        assert_eq!(v["latency_ms"], 1.5);
        assert_eq!(v["error"], "bad \"x\"\n");
        assert_eq!(v["target"], module_path!());
        assert_eq!(v["span"]["name"], "attempt");
        assert_eq!(v["span"]["n"], 2);
        assert_eq!(v["spans"][0]["name"], "request");
        assert_eq!(v["spans"][0]["trace_id"], "abc");
        assert_eq!(v["spans"][1]["name"], "attempt");
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z'));
    }

    #[test]
    fn an_explicit_parent_is_the_span_of_the_line_and_late_fields_are_kept() {
        let lines = lines_of(|| {
            let span =
                tracing::info_span!("request", trace_id = "t1", model = tracing::field::Empty);
            span.record("model", "gpt");
            tracing::info!(parent: &span, "done");
            tracing::info!("outside");
        });
        assert_eq!(lines[0]["span"]["trace_id"], "t1");
        assert_eq!(lines[0]["span"]["model"], "gpt");
        assert!(lines[1].get("span").is_none());
        assert!(lines[1].get("spans").is_none());
    }

    /// Any JSON value, refused if an object in it repeats a key
    /// (`serde_json::Value` silently keeps the last of a repeated key).
    struct NoRepeatedKey;

    impl<'de> serde::Deserialize<'de> for NoRepeatedKey {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(NoRepeatedKey)
        }
    }

    impl<'de> serde::de::Visitor<'de> for NoRepeatedKey {
        type Value = NoRepeatedKey;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self, A::Error> {
            let mut keys = std::collections::HashSet::new();
            while let Some((k, NoRepeatedKey)) = m.next_entry::<String, NoRepeatedKey>()? {
                if !keys.insert(k.clone()) {
                    return Err(serde::de::Error::custom(format!("repeated key {k}")));
                }
            }
            Ok(self)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Self, A::Error> {
            while s.next_element::<NoRepeatedKey>()?.is_some() {}
            Ok(self)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self, E> {
            Ok(self)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
            Ok(self)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
            Ok(self)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
            Ok(self)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
            Ok(self)
        }
        fn visit_unit<E>(self) -> Result<Self, E> {
            Ok(self)
        }
    }

    #[test]
    fn a_field_named_like_a_key_of_the_line_is_prefixed_not_repeated() {
        let out = Capture::default();
        let (sink, guard) = crate::logwriter::spawn(out.clone());
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(sink));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", name = "a span field");
            let _s = span.enter();
            tracing::warn!(
                message = "m-1",
                target = "t-1",
                level = 3_u64,
                timestamp = "then",
                span = "s",
                spans = "ss",
                kept = true,
                "the message"
            );
        });
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line = text.lines().next().unwrap();

        if let Err(e) = serde_json::from_str::<NoRepeatedKey>(line) {
            panic!("{e}: {line}");
        }
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["message"], "the message");
        assert_eq!(v["field.message"], "m-1");
        assert_eq!(v["target"], module_path!());
        assert_eq!(v["field.target"], "t-1");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["field.level"], 3);
        assert_eq!(v["field.timestamp"], "then");
        assert_eq!(v["field.span"], "s");
        assert_eq!(v["field.spans"], "ss");
        assert_eq!(v["kept"], true);
        assert_eq!(v["span"]["name"], "request");
        assert_eq!(v["span"]["field.name"], "a span field");
    }

    #[test]
    fn control_characters_and_non_ascii_survive_the_round_trip() {
        let text = "tab\there \u{1} é 日本 \\ \"q\"";
        let lines = lines_of(|| tracing::info!(text, "m"));
        assert_eq!(lines[0]["text"], text);
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        let mut s = String::new();
        rfc3339_micros(
            &mut s,
            UNIX_EPOCH + Duration::from_micros(1_764_632_285_123_456),
        );
        assert_eq!(s, "2025-12-01T23:38:05.123456Z");
        s.clear();
        rfc3339_micros(&mut s, UNIX_EPOCH + Duration::from_secs(951_782_400)); // leap day
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
        s.clear();
        rfc3339_micros(&mut s, UNIX_EPOCH);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
    }
}
