//! One published event and its wire forms, encoded once by the owner shard.
//!
//! Owns the envelope JSON (API.md section 1), the WebSocket text frame and the SSE block. The
//! frame is the one buffer of the event: every WebSocket subscriber on every shard writes the
//! same bytes through the same `Arc<Event>` the history ring keeps, and the envelope is that
//! frame's payload after its `op` field, so SSE, webhooks and the history API copy it from
//! there into their own output. Must never re-serialise `data`: it is spliced in as the
//! publisher sent it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
pub use bytestring::ByteString;

use crate::http::codec::{json_escape_into, push_u64};

/// An accepted, sequenced event.
///
/// Its wire forms are read out of one buffer, owned here and shared through the `Arc<Event>`
/// (one allocation per event and no reference count of its own), and its id and type are
/// read back out of it rather than kept as strings of their own: publishing and evicting
/// are allocator- and cache-bound, so the event is kept small (one copy of the envelope).
#[derive(Debug)]
pub struct Event {
    pub channel: Arc<str>,
    pub epoch: Epoch,
    pub seq: u64,
    /// When the owner accepted it: the start of `relay_event_route_duration_seconds`.
    pub accepted_at: Instant,
    /// `[room][frame header][{"op":"event",][envelope after its brace]`, see [`Event::encode`].
    wire: Vec<u8>,
    /// The frame is `wire[ws_start..]`, the envelope `{` and then `wire[body_start..]`.
    ws_start: u32,
    body_start: u32,
    /// The SSE block when `data` held line breaks (which SSE rewrites); otherwise it is put
    /// together from the type and the envelope as it is written.
    own_sse: Option<Box<[u8]>>,
    /// The id is `body[BODY_ID_AT..][..id_len]`, the type follows the channel (all at most 255
    /// bytes, validated).
    id_len: u8,
    channel_len: u8,
    type_len: u8,
}

/// What the publisher gave, validated; the owner adds seq, epoch, id and ts.
#[derive(Debug, Clone)]
pub struct Draft {
    /// The channel and type, usually slices of the request body (no allocation of their own):
    /// the owner reads them, and the event keeps the channel's own name.
    pub channel: ByteString,
    pub event_type: ByteString,
    pub id: Option<Box<str>>,
    /// Raw JSON as sent.
    pub data: Bytes,
    pub source: Option<Box<str>>,
    pub correlation_id: Option<Box<str>>,
}

/// The drafts of one publish, in order. Most publishes carry one event: it is held inline, so
/// a single-event publish allocates no vector for it (one sent to another shard still goes in
/// a `Vec`, the mesh's message).
pub type Drafts = smallvec::SmallVec<[Draft; 1]>;

const WS_EVENT_PREFIX: &[u8] = b"{\"op\":\"event\",";
/// Where the id starts in the envelope body (the envelope after its opening brace).
const BODY_ID_AT: usize = b"\"id\":\"".len();
const BODY_CHANNEL_AFTER_ID: usize = b"\",\"channel\":\"".len();
const BODY_TYPE_AFTER_CHANNEL: usize = b"\",\"type\":\"".len();
const SSE_EVENT: &[u8] = b"event: ";
const SSE_DATA: &[u8] = b"\ndata: ";
const SSE_END: &[u8] = b"\n\n";
/// The longest server frame header (RFC 6455 5.2: 2 bytes plus a 64-bit length).
const WS_HEADER_MAX: usize = 10;

/// What the owner adds to a draft: its place in the channel.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// The owner's name for the channel, shared by all its events.
    pub channel: &'a Arc<str>,
    pub epoch: Epoch,
    pub seq: u64,
    /// Checked text (a publisher's id, or one the owner generated), kept as bytes: encoding
    /// only copies it, so it is not checked as UTF-8 again.
    pub id: &'a [u8],
    pub ts_ms: u64,
    pub accepted_at: Instant,
}

/// A channel's epoch: a few characters of `[0-9A-Za-z]`, kept inline (by the channel and by
/// each of its events) where a shared string would cost every publish a trip to a separate,
/// long-cold allocation to read it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch {
    bytes: [u8; Epoch::MAX_LEN],
    len: u8,
}

impl Epoch {
    pub const MAX_LEN: usize = 15;

    /// `None` unless `text` is 1..=[`Epoch::MAX_LEN`] characters of `[0-9A-Za-z]` (written
    /// into JSON and SSE ids unescaped).
    pub fn new(text: &str) -> Option<Epoch> {
        let valid = (1..=Epoch::MAX_LEN).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric());
        if !valid {
            return None;
        }
        let mut bytes = [0u8; Epoch::MAX_LEN];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Some(Epoch {
            bytes,
            len: text.len() as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // ASCII by construction, so this never falls back.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The characters as bytes, which is all that encoding an event needs of them.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

impl std::ops::Deref for Epoch {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Event {
    /// Encodes every wire form of `draft` once (see [`Event::write`]).
    pub fn encode(
        draft: &Draft,
        epoch: Epoch,
        seq: u64,
        id: &str,
        ts_ms: u64,
        accepted_at: Instant,
    ) -> Event {
        // Outside the bus (tests, benches), the event names its channel with a copy of the
        // draft's; an owner gives it the channel's own name instead.
        let channel: Arc<str> = Arc::from(&*draft.channel);
        let stamp = Stamp {
            channel: &channel,
            epoch,
            seq,
            id: id.as_bytes(),
            ts_ms,
            accepted_at,
        };
        Event::fresh(draft, &stamp)
    }

    /// [`Event::encode`] into the memory of `spare`, an event that just left history, when
    /// nothing else holds it (no subscriber queue still does, almost always): no allocation,
    /// no reference count touched, and memory the history ring prefetched rather than the
    /// allocator's coldest. Otherwise into a new event.
    pub fn encode_reusing(spare: Option<Arc<Event>>, draft: &Draft, stamp: &Stamp) -> Arc<Event> {
        if let Some(mut spare) = spare {
            if let Some(old) = Arc::get_mut(&mut spare) {
                old.write(draft, stamp);
                return spare;
            }
        }
        Arc::new(Event::fresh(draft, stamp))
    }

    /// A new event of `draft` with `stamp`, in allocations of its own.
    fn fresh(draft: &Draft, stamp: &Stamp) -> Event {
        let mut event = Event {
            channel: stamp.channel.clone(),
            epoch: stamp.epoch,
            seq: stamp.seq,
            accepted_at: stamp.accepted_at,
            wire: Vec::new(),
            ws_start: 0,
            body_start: 0,
            own_sse: None,
            id_len: 0,
            channel_len: 0,
            type_len: 0,
        };
        event.write(draft, stamp);
        event
    }

    /// Makes this event `draft` stamped with `stamp`, in one buffer:
    /// `[room][frame header][{"op":"event",][envelope after its brace]`.
    /// The frame header is written last, right-aligned in the room kept for it, once the
    /// payload length is known. The buffer is reused unless it is far larger than needed.
    fn write(&mut self, draft: &Draft, stamp: &Stamp) {
        let id = stamp.id;
        debug_assert!(
            id.len() <= usize::from(u8::MAX)
                && draft.channel.len() <= usize::from(u8::MAX)
                && draft.event_type.len() <= usize::from(u8::MAX)
        );
        if !Arc::ptr_eq(&self.channel, stamp.channel) {
            self.channel = stamp.channel.clone();
        }
        self.epoch = stamp.epoch;
        self.seq = stamp.seq;
        self.accepted_at = stamp.accepted_at;
        let estimate = WS_HEADER_MAX
            + WS_EVENT_PREFIX.len()
            + 128
            + id.len()
            + stamp.epoch.as_bytes().len()
            + draft.channel.len()
            + draft.event_type.len()
            + draft.data.len()
            + draft.source.as_ref().map_or(0, |s| 20 + 2 * s.len())
            + draft
                .correlation_id
                .as_ref()
                .map_or(0, |c| 20 + 2 * c.len());
        let buf = &mut self.wire;
        if buf.capacity() > 2 * estimate + 1024 {
            *buf = Vec::new();
        }
        buf.clear();
        buf.reserve(estimate);
        buf.resize(WS_HEADER_MAX, 0);
        buf.extend_from_slice(WS_EVENT_PREFIX);
        let body_start = buf.len();
        write_envelope_body(
            buf,
            draft,
            stamp.epoch.as_bytes(),
            stamp.seq,
            id,
            stamp.ts_ms,
        );
        assert!(
            buf.len() < u32::MAX as usize / 2,
            "publish bodies are bounded by limits.max_body_bytes"
        );
        let (header, header_len) = ws_header(0x1, buf.len() - WS_HEADER_MAX);
        let ws_start = WS_HEADER_MAX - header_len;
        buf[ws_start..WS_HEADER_MAX].copy_from_slice(&header[..header_len]);

        self.own_sse = memchr::memchr2(b'\n', b'\r', &buf[body_start..]).map(|_| {
            let body = &buf[body_start..];
            let mut sse = Vec::with_capacity(body.len() + draft.event_type.len() + 64);
            sse.extend_from_slice(SSE_EVENT);
            sse.extend_from_slice(draft.event_type.as_bytes());
            sse.extend_from_slice(SSE_DATA);
            sse.push(b'{');
            write_sse_data(&mut sse, body);
            sse.extend_from_slice(SSE_END);
            sse.into_boxed_slice()
        });
        let offset = |at: usize| u32::try_from(at).unwrap_or(u32::MAX);
        let len_u8 = |s: &[u8]| u8::try_from(s.len()).unwrap_or(u8::MAX);
        self.ws_start = offset(ws_start);
        self.body_start = offset(body_start);
        self.id_len = len_u8(id);
        self.channel_len = len_u8(draft.channel.as_bytes());
        self.type_len = len_u8(draft.event_type.as_bytes());
    }

    /// Asks the CPU to fetch the event's bytes into its cache ahead of a write over them.
    pub fn prefetch_buffer(&self) {
        prefetch(self.wire.as_ptr(), self.wire.len());
    }

    /// The complete WebSocket text frame.
    pub fn ws_frame(&self) -> &[u8] {
        self.wire.get(self.ws_start as usize..).unwrap_or_default()
    }

    /// The envelope after its opening brace.
    fn envelope_body(&self) -> &[u8] {
        self.wire
            .get(self.body_start as usize..)
            .unwrap_or_default()
    }

    /// Appends the envelope JSON exactly as encoded (the history API, webhooks).
    pub fn write_envelope(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        out.extend_from_slice(self.envelope_body());
    }

    pub fn envelope_len(&self) -> usize {
        1 + self.envelope_body().len()
    }

    /// Appends `event: <type>\ndata: <envelope>\n\n`.
    pub fn write_sse(&self, out: &mut Vec<u8>) {
        match &self.own_sse {
            Some(sse) => out.extend_from_slice(sse),
            None => {
                out.extend_from_slice(SSE_EVENT);
                out.extend_from_slice(self.event_type_bytes());
                out.extend_from_slice(SSE_DATA);
                self.write_envelope(out);
                out.extend_from_slice(SSE_END);
            }
        }
    }

    /// The length of what [`Event::write_sse`] appends.
    pub fn sse_len(&self) -> usize {
        match &self.own_sse {
            Some(sse) => sse.len(),
            None => {
                SSE_EVENT.len()
                    + usize::from(self.type_len)
                    + SSE_DATA.len()
                    + self.envelope_len()
                    + SSE_END.len()
            }
        }
    }

    /// The event's id (the publisher's, or the UUID the owner gave it).
    pub fn id(&self) -> &str {
        std::str::from_utf8(self.id_bytes()).unwrap_or_default()
    }

    /// [`Event::id`] without the UTF-8 check, for the history's index and a publish's answer.
    pub fn id_bytes(&self) -> &[u8] {
        name_at(self.envelope_body(), BODY_ID_AT, self.id_len)
    }

    /// The event's type.
    pub fn event_type(&self) -> &str {
        std::str::from_utf8(self.event_type_bytes()).unwrap_or_default()
    }

    fn event_type_bytes(&self) -> &[u8] {
        let at = BODY_ID_AT
            + usize::from(self.id_len)
            + BODY_CHANNEL_AFTER_ID
            + usize::from(self.channel_len)
            + BODY_TYPE_AFTER_CHANNEL;
        name_at(self.envelope_body(), at, self.type_len)
    }

    /// Bytes this event holds (for history accounting).
    pub fn footprint(&self) -> usize {
        let own_sse = self.own_sse.as_ref().map_or(0, |e| e.len());
        self.wire.capacity() + own_sse + std::mem::size_of::<Event>()
    }
}

/// Asks the CPU to fetch `len` bytes from `start` into its cache (a hint: nothing is read,
/// and an address that is not mapped is ignored by the CPU).
pub fn prefetch(start: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let mut at = 0;
        while at < len {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch neither reads nor
            // faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(at).cast()) };
            at += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

/// The validated (ASCII) name written at `at` in one of the event's own buffers.
fn name_at(bytes: &[u8], at: usize, len: u8) -> &[u8] {
    bytes.get(at..at + usize::from(len)).unwrap_or_default()
}

/// The envelope JSON without its opening brace (the WebSocket frame puts its `op` field there).
fn write_envelope_body(
    out: &mut Vec<u8>,
    draft: &Draft,
    epoch: &[u8],
    seq: u64,
    id: &[u8],
    ts_ms: u64,
) {
    // id, channel, type and epoch are validated to JSON-safe character sets: no escaping needed.
    out.extend_from_slice(b"\"id\":\"");
    out.extend_from_slice(id);
    out.extend_from_slice(b"\",\"channel\":\"");
    out.extend_from_slice(draft.channel.as_bytes());
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(draft.event_type.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b",\"epoch\":\"");
    out.extend_from_slice(epoch);
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
/// client parses is unchanged.
fn write_sse_data(out: &mut Vec<u8>, json: &[u8]) {
    let mut rest = json;
    while let Some(pos) = memchr::memchr2(b'\n', b'\r', rest) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(SSE_DATA);
        let skip = if rest[pos] == b'\r' && rest.get(pos + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[pos + skip..];
    }
    out.extend_from_slice(rest);
}

/// Server-to-client frame header (FIN set, never masked), RFC 6455 section 5.2.
pub fn push_ws_header(out: &mut Vec<u8>, opcode: u8, payload_len: usize) {
    let (header, len) = ws_header(opcode, payload_len);
    out.extend_from_slice(&header[..len]);
}

/// [`push_ws_header`]'s bytes and how many of them there are.
fn ws_header(opcode: u8, payload_len: usize) -> ([u8; WS_HEADER_MAX], usize) {
    let mut header = [0u8; WS_HEADER_MAX];
    header[0] = 0x80 | (opcode & 0x0f);
    if payload_len < 126 {
        header[1] = payload_len as u8;
        (header, 2)
    } else if payload_len <= u16::MAX as usize {
        header[1] = 126;
        header[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        (header, 4)
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        (header, 10)
    }
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
            channel: channel.into(),
            event_type: event_type.into(),
            id: None,
            data: Bytes::from_static(b"1"),
            source: None,
            correlation_id: None,
        };
        let epoch = Epoch::new("e").expect("a valid epoch");
        Arc::new(Event::encode(&draft, epoch, seq, id, 0, accepted_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_short_alphanumeric_and_kept_inline() {
        let epoch = Epoch::new("k3x9AbCd").expect("a valid epoch");
        assert_eq!(epoch.as_str(), "k3x9AbCd");
        assert_eq!(&*epoch, "k3x9AbCd");
        assert_eq!(epoch.to_string(), "k3x9AbCd");
        assert_eq!(format!("{epoch:?}"), "\"k3x9AbCd\"");
        assert_eq!(Epoch::new("k3x9AbCd"), Some(epoch));
        assert_ne!(Epoch::new("k3x9AbCe"), Some(epoch));
        assert!(Epoch::new(&"a".repeat(Epoch::MAX_LEN)).is_some());
        for refused in [
            "",
            "a-b",
            "é",
            "with space",
            &"a".repeat(Epoch::MAX_LEN + 1),
        ] {
            assert_eq!(Epoch::new(refused), None, "{refused:?}");
        }
        assert!(std::mem::size_of::<Epoch>() <= 16);
    }

    fn envelope(ev: &Event) -> Vec<u8> {
        let mut out = Vec::new();
        ev.write_envelope(&mut out);
        out
    }

    fn sse(ev: &Event) -> Vec<u8> {
        let mut out = Vec::new();
        ev.write_sse(&mut out);
        out
    }

    fn draft(data: &str) -> Draft {
        Draft {
            channel: "doc.42".into(),
            event_type: "document.edit".into(),
            id: None,
            data: Bytes::copy_from_slice(data.as_bytes()),
            source: Some("si\"ft".into()),
            correlation_id: None,
        }
    }

    #[test]
    fn envelope_keeps_data_byte_for_byte_and_escapes_free_text() {
        let epoch = Epoch::new("k3x9").expect("a valid epoch");
        let ev = Event::encode(
            &draft(r#"{"b": 1,  "a":[1.50]}"#),
            epoch,
            17,
            "e1",
            99,
            Instant::now(),
        );
        let json = envelope(&ev);
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"id":"e1","channel":"doc.42","type":"document.edit","seq":17,"epoch":"k3x9","ts":99,"data":{"b": 1,  "a":[1.50]},"source":"si\"ft"}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["seq"], 17);
        assert!(sse(&ev).starts_with(b"event: document.edit\ndata: {\"id\":\"e1\""));
        assert!(sse(&ev).ends_with(b"}\n\n"));
    }

    #[test]
    fn line_breaks_in_data_become_sse_continuations_and_round_trip() {
        let epoch = Epoch::new("e").expect("a valid epoch");
        let ev = Event::encode(
            &draft("{\n  \"a\": 1\r\n}"),
            epoch,
            1,
            "x",
            1,
            Instant::now(),
        );
        let block = sse(&ev);
        assert_eq!(block.len(), ev.sse_len());
        let sse = std::str::from_utf8(&block).unwrap();
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
        let history = envelope(&ev);
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
        let epoch = Epoch::new("e").expect("a valid epoch");
        let ev = Event::encode(&draft("1"), epoch, 1, "x", 1, Instant::now());
        let payload = &ev.ws_frame()[2..];
        assert_eq!(ev.ws_frame()[1] as usize, payload.len());
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["op"], "event");
        assert_eq!(v["channel"], "doc.42");
    }

    #[test]
    fn one_buffer_holds_every_form_and_the_header_fits_any_length() {
        let epoch = Epoch::new("e").expect("a valid epoch");
        // Payloads whose frames need the 2-, 4- and 10-byte headers.
        for (data_len, header) in [(1usize, 2usize), (300, 4), (70_000, 10)] {
            let data = format!("\"{}\"", "a".repeat(data_len.saturating_sub(2)));
            let ev = Event::encode(&draft(&data), epoch, 3, "id-3", 5, Instant::now());
            assert_eq!((ev.id(), ev.event_type()), ("id-3", "document.edit"));
            let frame = ev.ws_frame();
            let payload = &frame[header..];
            let mut expected = Vec::new();
            push_ws_header(&mut expected, 1, payload.len());
            assert_eq!(&frame[..header], &expected[..], "data {data_len}");
            let envelope = envelope(&ev);
            assert_eq!(envelope.len(), ev.envelope_len());
            assert_eq!(&payload[..WS_EVENT_PREFIX.len()], WS_EVENT_PREFIX);
            assert_eq!(&payload[WS_EVENT_PREFIX.len()..], &envelope[1..]);
            let v: serde_json::Value = serde_json::from_slice(&envelope).unwrap();
            assert_eq!(
                (v["id"].as_str(), v["seq"].as_u64()),
                (Some("id-3"), Some(3))
            );
            assert_eq!(
                sse(&ev),
                [&b"event: document.edit\ndata: "[..], &envelope, b"\n\n"].concat()
            );
            assert_eq!(ev.sse_len(), sse(&ev).len());
        }
        // A rewritten SSE block is kept apart, and the id and type still read back.
        let ev = Event::encode(&draft("{\n}"), epoch, 1, "x", 1, Instant::now());
        assert_eq!((ev.id(), ev.event_type()), ("x", "document.edit"));
        assert!(ev.own_sse.is_some());
    }

    fn stamp<'a>(epoch: Epoch, seq: u64, id: &'a str, at: Instant) -> Stamp<'a> {
        static CHANNEL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        Stamp {
            channel: CHANNEL.get_or_init(|| Arc::from("doc.42")),
            epoch,
            seq,
            id: id.as_bytes(),
            ts_ms: seq,
            accepted_at: at,
        }
    }

    #[test]
    fn an_event_leaving_history_lends_its_memory_to_the_next_unless_still_held() {
        let epoch = Epoch::new("e").expect("a valid epoch");
        let at = Instant::now();
        let old = Event::encode_reusing(None, &draft("1"), &stamp(epoch, 1, "a", at));
        let (old_event, old_wire) = (Arc::as_ptr(&old), old.wire.as_ptr());
        let names_held = Arc::strong_count(&old.channel);
        // No larger than the event before it: both allocations are reused as they are, and
        // the channel's name is not let go of and taken again.
        let next = Event::encode_reusing(Some(old), &draft("2"), &stamp(epoch, 2, "b", at));
        assert_eq!(
            (Arc::as_ptr(&next), next.wire.as_ptr()),
            (old_event, old_wire)
        );
        assert_eq!(Arc::strong_count(&next.channel), names_held);
        let fresh = Event::encode(&draft("2"), epoch, 2, "b", 2, at);
        assert_eq!(
            next.ws_frame(),
            fresh.ws_frame(),
            "the same bytes as a new event"
        );
        assert_eq!((next.id(), next.seq), ("b", 2));

        // A subscriber queue still holding it: the old event is left alone.
        let held = next.clone();
        let third = Event::encode_reusing(Some(next), &draft("3"), &stamp(epoch, 3, "c", at));
        assert_ne!(Arc::as_ptr(&third), Arc::as_ptr(&held));
        assert_eq!((held.id(), third.id()), ("b", "c"));

        // A buffer far larger than the next event needs is not kept.
        let big = format!("\"{}\"", "x".repeat(100_000));
        let large = Arc::new(Event::encode(&draft(&big), epoch, 4, "d", 4, at));
        let small = Event::encode_reusing(Some(large), &draft("5"), &stamp(epoch, 5, "e", at));
        assert!(small.footprint() < 4096, "{} bytes kept", small.footprint());
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
