//! One published event and its wire forms, encoded once by the owner shard.
//!
//! Owns the envelope JSON (API.md section 1), the SSE block and the WebSocket text frame, all
//! in one buffer of the event: every subscriber on every shard writes the same bytes through
//! the same `Arc<Event>` the history ring keeps. Must never re-serialise `data`: it is spliced
//! in as the publisher sent it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::http::codec::json_escape_into;

/// An accepted, sequenced event.
///
/// Its wire forms are ranges of one buffer, owned here and shared through the `Arc<Event>`
/// (one allocation per event and no reference count of its own), and its id and type are
/// read back out of them rather than kept as strings of their own: publishing and evicting
/// are allocator-bound.
#[derive(Debug)]
pub struct Event {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    pub seq: u64,
    /// When the owner accepted it: the start of `relay_event_route_duration_seconds`.
    pub accepted_at: Instant,
    /// `[WebSocket frame][SSE block]`, see [`Event::encode`].
    wire: Vec<u8>,
    /// The frame is `wire[ws_start..sse_start]`, the SSE block `wire[sse_start..]`, the
    /// envelope `wire[envelope_start..envelope_end]` (inside the SSE block).
    ws_start: u32,
    sse_start: u32,
    envelope_start: u32,
    envelope_end: u32,
    /// The envelope when `data` held line breaks (which SSE rewrites), so it is not in `wire`.
    own_envelope: Option<Box<[u8]>>,
    /// The id is `envelope[ENVELOPE_ID_AT..][..id_len]`, the type `sse[SSE_TYPE_AT..][..type_len]`
    /// (both at most 128 bytes, validated).
    id_len: u8,
    type_len: u8,
}

/// What the publisher gave, validated; the owner adds seq, epoch, id and ts.
#[derive(Debug, Clone)]
pub struct Draft {
    pub channel: Arc<str>,
    pub event_type: Box<str>,
    pub id: Option<Box<str>>,
    /// Raw JSON as sent.
    pub data: Bytes,
    pub source: Option<Box<str>>,
    pub correlation_id: Option<Box<str>>,
}

const WS_EVENT_PREFIX: &[u8] = b"{\"op\":\"event\",";
const ENVELOPE_ID_AT: usize = b"{\"id\":\"".len();
const SSE_TYPE_AT: usize = b"event: ".len();
/// The longest server frame header (RFC 6455 5.2: 2 bytes plus a 64-bit length).
const WS_HEADER_MAX: usize = 10;

impl Event {
    /// Encodes every wire form of `draft` once, into one buffer:
    /// `[frame header][{"op":"event",][envelope after its brace][event: type\ndata: ][envelope][\n\n]`.
    /// The envelope is written once and copied once (the SSE copy); the frame header is written
    /// last, right-aligned in the room kept for it, once the payload length is known.
    pub fn encode(
        draft: &Draft,
        epoch: &Arc<str>,
        seq: u64,
        id: &str,
        ts_ms: u64,
        accepted_at: Instant,
    ) -> Event {
        debug_assert!(
            id.len() <= usize::from(u8::MAX) && draft.event_type.len() <= usize::from(u8::MAX)
        );
        let estimate = 2 * (160 + draft.data.len()) + WS_HEADER_MAX + draft.event_type.len() + 32;
        let mut buf = Vec::with_capacity(estimate);
        buf.resize(WS_HEADER_MAX, 0);
        buf.extend_from_slice(WS_EVENT_PREFIX);
        let body_start = buf.len();
        write_envelope_body(&mut buf, draft, epoch, seq, id, ts_ms);
        let ws_end = buf.len();
        assert!(
            ws_end < u32::MAX as usize / 2,
            "publish bodies are bounded by limits.max_body_bytes"
        );
        let mut header = Vec::with_capacity(WS_HEADER_MAX);
        push_ws_header(&mut header, 0x1, ws_end - WS_HEADER_MAX);
        let ws_start = WS_HEADER_MAX - header.len();
        buf[ws_start..WS_HEADER_MAX].copy_from_slice(&header);

        let sse_start = buf.len();
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(draft.event_type.as_bytes());
        buf.extend_from_slice(b"\ndata: ");
        let envelope_start = buf.len();
        let has_line_break = buf[body_start..ws_end]
            .iter()
            .any(|&b| b == b'\n' || b == b'\r');
        let own_envelope = if has_line_break {
            let mut envelope = Vec::with_capacity(ws_end - body_start + 1);
            envelope.push(b'{');
            envelope.extend_from_slice(&buf[body_start..ws_end]);
            write_sse_data(&mut buf, &envelope);
            Some(envelope.into_boxed_slice())
        } else {
            buf.push(b'{');
            buf.extend_from_within(body_start..ws_end);
            None
        };
        let envelope_end = buf.len();
        buf.extend_from_slice(b"\n\n");

        let offset = |at: usize| u32::try_from(at).unwrap_or(u32::MAX);
        Event {
            channel: draft.channel.clone(),
            epoch: epoch.clone(),
            seq,
            accepted_at,
            ws_start: offset(ws_start),
            sse_start: offset(sse_start),
            envelope_start: offset(envelope_start),
            envelope_end: offset(envelope_end),
            wire: buf,
            own_envelope,
            id_len: u8::try_from(id.len()).unwrap_or(u8::MAX),
            type_len: u8::try_from(draft.event_type.len()).unwrap_or(u8::MAX),
        }
    }

    /// The complete WebSocket text frame.
    pub fn ws_frame(&self) -> &[u8] {
        self.range(self.ws_start, self.sse_start)
    }

    /// `event: <type>\ndata: <envelope>\n\n`.
    pub fn sse(&self) -> &[u8] {
        self.range(self.sse_start, self.wire.len() as u32)
    }

    /// The envelope JSON exactly as encoded (the history API, webhooks).
    pub fn envelope(&self) -> &[u8] {
        match &self.own_envelope {
            Some(envelope) => envelope,
            None => self.range(self.envelope_start, self.envelope_end),
        }
    }

    fn range(&self, start: u32, end: u32) -> &[u8] {
        self.wire
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// The event's id (the publisher's, or the UUID the owner gave it).
    pub fn id(&self) -> &str {
        std::str::from_utf8(self.id_bytes()).unwrap_or_default()
    }

    /// [`Event::id`] without the UTF-8 check, for the history's index.
    pub fn id_bytes(&self) -> &[u8] {
        name_at(self.envelope(), ENVELOPE_ID_AT, self.id_len)
    }

    /// The event's type.
    pub fn event_type(&self) -> &str {
        std::str::from_utf8(name_at(self.sse(), SSE_TYPE_AT, self.type_len)).unwrap_or_default()
    }

    /// Bytes this event holds (for history accounting).
    pub fn footprint(&self) -> usize {
        let own_envelope = self.own_envelope.as_ref().map_or(0, |e| e.len());
        self.wire.capacity() + own_envelope + std::mem::size_of::<Event>()
    }
}

/// The validated (ASCII) name written at `at` in one of the event's own buffers.
fn name_at(bytes: &[u8], at: usize, len: u8) -> &[u8] {
    bytes.get(at..at + usize::from(len)).unwrap_or_default()
}

/// The envelope JSON without its opening brace (the WebSocket frame puts its `op` field there).
fn write_envelope_body(
    out: &mut Vec<u8>,
    draft: &Draft,
    epoch: &str,
    seq: u64,
    id: &str,
    ts_ms: u64,
) {
    // id, channel, type and epoch are validated to JSON-safe character sets: no escaping needed.
    out.extend_from_slice(b"\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"channel\":\"");
    out.extend_from_slice(draft.channel.as_bytes());
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(draft.event_type.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"epoch\":\"");
    out.extend_from_slice(epoch.as_bytes());
    out.extend_from_slice(b"\",\"ts\":");
    push_u64(out, ts_ms);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(&draft.data);
    if let Some(source) = &draft.source {
        out.extend_from_slice(b",\"source\":\"");
        json_escape_into(out, source);
        out.push(b'"');
    }
    if let Some(correlation_id) = &draft.correlation_id {
        out.extend_from_slice(b",\"correlation_id\":\"");
        json_escape_into(out, correlation_id);
        out.push(b'"');
    }
    out.push(b'}');
}

/// SSE forbids raw line breaks inside a field: each one continues as a new `data:` line, which
/// the client joins back with `\n`. JSON only has line breaks as whitespace, so the value the
/// client parses is unchanged. Returns whether any line break was rewritten.
fn write_sse_data(out: &mut Vec<u8>, json: &[u8]) -> bool {
    let mut rest = json;
    let mut rewritten = false;
    while let Some(pos) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(b"\ndata: ");
        let skip = if rest[pos] == b'\r' && rest.get(pos + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[pos + skip..];
        rewritten = true;
    }
    out.extend_from_slice(rest);
    rewritten
}

/// Server-to-client frame header (FIN set, never masked), RFC 6455 section 5.2.
pub fn push_ws_header(out: &mut Vec<u8>, opcode: u8, payload_len: usize) {
    out.push(0x80 | (opcode & 0x0f));
    if payload_len < 126 {
        out.push(payload_len as u8);
    } else if payload_len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
}

pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Builds events for unit tests across the crate (one place, so they cannot drift apart).
#[cfg(test)]
pub mod testing {
    use super::*;

    /// An event of `channel` with `seq`, type `event_type`, id `{channel}-{seq}`, data `1`.
    pub fn event(channel: &str, seq: u64, event_type: &str) -> Arc<Event> {
        let id = format!("{channel}-{seq}");
        event_with(channel, seq, event_type, &id, Instant::now())
    }

    /// The same with a chosen id and acceptance time (history TTL, idempotency tests).
    pub fn event_with(
        channel: &str,
        seq: u64,
        event_type: &str,
        id: &str,
        accepted_at: Instant,
    ) -> Arc<Event> {
        let draft = Draft {
            channel: Arc::from(channel),
            event_type: event_type.into(),
            id: None,
            data: Bytes::from_static(b"1"),
            source: None,
            correlation_id: None,
        };
        let epoch: Arc<str> = Arc::from("e");
        Arc::new(Event::encode(&draft, &epoch, seq, id, 0, accepted_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(data: &str) -> Draft {
        Draft {
            channel: Arc::from("doc.42"),
            event_type: "document.edit".into(),
            id: None,
            data: Bytes::copy_from_slice(data.as_bytes()),
            source: Some("si\"ft".into()),
            correlation_id: None,
        }
    }

    #[test]
    fn envelope_keeps_data_byte_for_byte_and_escapes_free_text() {
        let epoch: Arc<str> = Arc::from("k3x9");
        let ev = Event::encode(
            &draft(r#"{"b": 1,  "a":[1.50]}"#),
            &epoch,
            17,
            "e1",
            99,
            Instant::now(),
        );
        let json = ev.envelope();
        assert_eq!(
            std::str::from_utf8(json).unwrap(),
            r#"{"id":"e1","channel":"doc.42","type":"document.edit","seq":17,"epoch":"k3x9","ts":99,"data":{"b": 1,  "a":[1.50]},"source":"si\"ft"}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(parsed["seq"], 17);
        assert!(ev
            .sse()
            .starts_with(b"event: document.edit\ndata: {\"id\":\"e1\""));
        assert!(ev.sse().ends_with(b"}\n\n"));
    }

    #[test]
    fn line_breaks_in_data_become_sse_continuations_and_round_trip() {
        let epoch: Arc<str> = Arc::from("e");
        let ev = Event::encode(
            &draft("{\n  \"a\": 1\r\n}"),
            &epoch,
            1,
            "x",
            1,
            Instant::now(),
        );
        let sse = std::str::from_utf8(ev.sse()).unwrap();
        for line in sse.trim_end().lines() {
            assert!(
                line.starts_with("event: ") || line.starts_with("data: "),
                "{line:?}"
            );
        }
        // The client joins data lines with \n; the JSON value survives.
        let joined: Vec<&str> = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let v: serde_json::Value = serde_json::from_str(&joined.join("\n")).unwrap();
        assert_eq!(v["data"]["a"], 1);
        let history = ev.envelope();
        let history = std::str::from_utf8(history).unwrap();
        assert!(
            history.contains("\"data\":{\n  \"a\": 1\r\n}"),
            "byte for byte: {history:?}"
        );
    }

    #[test]
    fn ws_frame_header_lengths() {
        for (len, header) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let mut out = Vec::new();
            push_ws_header(&mut out, 1, len);
            assert_eq!(out.len(), header, "len {len}");
            assert_eq!(out[0], 0x81);
        }
        let epoch: Arc<str> = Arc::from("e");
        let ev = Event::encode(&draft("1"), &epoch, 1, "x", 1, Instant::now());
        let payload = &ev.ws_frame()[2..];
        assert_eq!(ev.ws_frame()[1] as usize, payload.len());
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["op"], "event");
        assert_eq!(v["channel"], "doc.42");
    }

    #[test]
    fn one_buffer_holds_every_form_and_the_header_fits_any_length() {
        let epoch: Arc<str> = Arc::from("e");
        // Payloads whose frames need the 2-, 4- and 10-byte headers.
        for (data_len, header) in [(1usize, 2usize), (300, 4), (70_000, 10)] {
            let data = format!("\"{}\"", "a".repeat(data_len.saturating_sub(2)));
            let ev = Event::encode(&draft(&data), &epoch, 3, "id-3", 5, Instant::now());
            assert_eq!((ev.id(), ev.event_type()), ("id-3", "document.edit"));
            let frame = ev.ws_frame();
            let payload = &frame[header..];
            let mut expected = Vec::new();
            push_ws_header(&mut expected, 1, payload.len());
            assert_eq!(&frame[..header], &expected[..], "data {data_len}");
            let envelope = ev.envelope();
            assert_eq!(&payload[..WS_EVENT_PREFIX.len()], WS_EVENT_PREFIX);
            assert_eq!(&payload[WS_EVENT_PREFIX.len()..], &envelope[1..]);
            let v: serde_json::Value = serde_json::from_slice(envelope).unwrap();
            assert_eq!(
                (v["id"].as_str(), v["seq"].as_u64()),
                (Some("id-3"), Some(3))
            );
            assert_eq!(
                ev.sse(),
                [b"event: document.edit\ndata: ", envelope, b"\n\n"].concat()
            );
        }
        // A rewritten envelope keeps its own copy, and the id and type still read back.
        let ev = Event::encode(&draft("{\n}"), &epoch, 1, "x", 1, Instant::now());
        assert_eq!((ev.id(), ev.event_type()), ("x", "document.edit"));
    }

    #[test]
    fn u64_formatting() {
        for v in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
        }
    }
}
