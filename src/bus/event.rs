//! One published event and its wire forms, encoded once by the owner shard.
//!
//! Owns the envelope JSON (API.md section 1), the SSE block and the WebSocket text frame. Each
//! is a shared `Bytes`: every subscriber on every shard writes the same bytes, and the history
//! ring keeps the same `Arc<Event>`. Must never re-serialise `data`: it is spliced in as the
//! publisher sent it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::http::codec::json_escape_into;

/// An accepted, sequenced event.
#[derive(Debug)]
pub struct Event {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    pub seq: u64,
    pub id: Box<str>,
    pub event_type: Box<str>,
    /// When the owner accepted it: the start of `relay_event_route_duration_seconds`.
    pub accepted_at: Instant,
    /// `event: <type>\ndata: <envelope>\n\n`.
    pub sse: Bytes,
    /// The envelope JSON exactly as encoded: a sub-slice of `sse` unless `data` held line
    /// breaks (which SSE rewrites), then its own copy.
    envelope: Bytes,
    /// A complete server-to-client WebSocket text frame carrying `{"op":"event",...envelope}`.
    pub ws_frame: Bytes,
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

impl Event {
    /// Encodes every wire form of `draft` once.
    pub fn encode(
        draft: &Draft,
        epoch: &Arc<str>,
        seq: u64,
        id: Box<str>,
        ts_ms: u64,
        accepted_at: Instant,
    ) -> Event {
        let mut envelope = Vec::with_capacity(160 + draft.data.len());
        write_envelope(&mut envelope, draft, epoch, seq, &id, ts_ms);

        let mut sse = Vec::with_capacity(envelope.len() + draft.event_type.len() + 24);
        sse.extend_from_slice(b"event: ");
        sse.extend_from_slice(draft.event_type.as_bytes());
        sse.extend_from_slice(b"\ndata: ");
        let envelope_start = sse.len();
        let rewritten = write_sse_data(&mut sse, &envelope);
        let envelope_end = sse.len();
        sse.extend_from_slice(b"\n\n");

        let ws_frame = encode_ws_event_frame(&envelope);
        let sse = Bytes::from(sse);
        let envelope = if rewritten {
            Bytes::from(envelope)
        } else {
            sse.slice(envelope_start..envelope_end)
        };
        Event {
            channel: draft.channel.clone(),
            epoch: epoch.clone(),
            seq,
            id,
            event_type: draft.event_type.clone(),
            accepted_at,
            sse,
            envelope,
            ws_frame,
        }
    }

    /// The envelope JSON exactly as encoded, for the history API.
    pub fn envelope_json(&self) -> Bytes {
        self.envelope.clone()
    }

    /// Bytes this event holds (for history accounting).
    pub fn footprint(&self) -> usize {
        let shares_sse = self.sse.as_ptr_range().contains(&self.envelope.as_ptr());
        let own_envelope = if shares_sse { 0 } else { self.envelope.len() };
        self.sse.len() + self.ws_frame.len() + own_envelope + std::mem::size_of::<Event>()
    }
}

fn write_envelope(out: &mut Vec<u8>, draft: &Draft, epoch: &str, seq: u64, id: &str, ts_ms: u64) {
    // id, channel, type and epoch are validated to JSON-safe character sets: no escaping needed.
    out.extend_from_slice(b"{\"id\":\"");
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

/// `{"op":"event",` + the envelope without its opening brace, framed as one unmasked text frame.
fn encode_ws_event_frame(envelope: &[u8]) -> Bytes {
    const PREFIX: &[u8] = b"{\"op\":\"event\",";
    let body = envelope.get(1..).unwrap_or_default();
    let payload_len = PREFIX.len() + body.len();
    let mut frame = Vec::with_capacity(payload_len + 10);
    push_ws_header(&mut frame, 0x1, payload_len);
    frame.extend_from_slice(PREFIX);
    frame.extend_from_slice(body);
    Bytes::from(frame)
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
        Arc::new(Event::encode(
            &draft,
            &epoch,
            seq,
            id.into(),
            0,
            accepted_at,
        ))
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
            "e1".into(),
            99,
            Instant::now(),
        );
        let json = ev.envelope_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"id":"e1","channel":"doc.42","type":"document.edit","seq":17,"epoch":"k3x9","ts":99,"data":{"b": 1,  "a":[1.50]},"source":"si\"ft"}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["seq"], 17);
        assert!(ev
            .sse
            .starts_with(b"event: document.edit\ndata: {\"id\":\"e1\""));
        assert!(ev.sse.ends_with(b"}\n\n"));
    }

    #[test]
    fn line_breaks_in_data_become_sse_continuations_and_round_trip() {
        let epoch: Arc<str> = Arc::from("e");
        let ev = Event::encode(
            &draft("{\n  \"a\": 1\r\n}"),
            &epoch,
            1,
            "x".into(),
            1,
            Instant::now(),
        );
        let sse = std::str::from_utf8(&ev.sse).unwrap();
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
        let history = ev.envelope_json();
        let history = std::str::from_utf8(&history).unwrap();
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
        let ev = Event::encode(&draft("1"), &epoch, 1, "x".into(), 1, Instant::now());
        let payload = &ev.ws_frame[2..];
        assert_eq!(ev.ws_frame[1] as usize, payload.len());
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["op"], "event");
        assert_eq!(v["channel"], "doc.42");
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
