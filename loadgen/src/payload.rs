//! What the generator publishes: envelopes whose `data` carries the scheduled send time.
//!
//! Owns the byte layout of `data` (`{"t":<ns>,"p":"xxx…"}`, padded to `--event-bytes`), its
//! tagged form for servers that assign no sequence (NATS: `{"t":<ns>,"s":<seq>,"o":<publisher>,
//! "p":"xxx…"}`), the HTTP publish request (one envelope or a JSON array of them) and the
//! WebSocket publish message. Everything is appended to caller-owned buffers that are reused: nothing is
//! allocated per event. Must never: write a `data` the subscriber scan (`scan::scan_event`)
//! cannot read back.

/// The `type` of every generated event.
pub const EVENT_TYPE: &str = "lg";
/// The publish endpoint of API.md section 2.
pub const PUBLISH_PATH: &str = "/api/v1/relay/events";

/// The start of every `data`, in front of the scheduled time.
pub const TS_KEY: &[u8] = b"{\"t\":";
/// In tagged data, in front of the publisher's own per-channel sequence number.
pub const SEQ_KEY: &[u8] = b",\"s\":";
/// In tagged data, in front of the index of the publisher that numbered it.
pub const ORIGIN_KEY: &[u8] = b",\"o\":";
/// `,"p":"` + `"}`: the padding field and the closing brace.
const PAD_OVERHEAD: usize = 8;
/// `{"t":` + `,"p":""}`: the bytes of `data` besides the number and the padding.
const DATA_OVERHEAD: usize = TS_KEY.len() + PAD_OVERHEAD;
/// The bytes of tagged data besides its three numbers and the padding.
const TAGGED_OVERHEAD: usize = TS_KEY.len() + SEQ_KEY.len() + ORIGIN_KEY.len() + PAD_OVERHEAD;

static PAD: [u8; 65536] = [b'x'; 65536];

/// Appends `u64` in decimal.
#[inline]
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

fn decimal_len(v: u64) -> usize {
    v.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// Appends `data`: `{"t":<sched_ns>,"p":"<padding>"}`, exactly `event_bytes` long when that
/// is possible (at least the 14 + digits of the bare form; shorter requests get the bare form).
#[inline]
pub fn write_data(out: &mut Vec<u8>, sched_ns: u64, event_bytes: usize) {
    let pad = event_bytes.saturating_sub(DATA_OVERHEAD + decimal_len(sched_ns));
    out.extend_from_slice(TS_KEY);
    push_u64(out, sched_ns);
    push_padding(out, pad);
}

/// Appends tagged data, `{"t":<sched_ns>,"s":<seq>,"o":<origin>,"p":"<padding>"}`, exactly
/// `event_bytes` long when possible (the bare form when that is shorter). For servers that do
/// not number events themselves: `seq` counts publisher `origin`'s events on one channel, from
/// 1, so a subscriber tracks each publisher's sequence on its channel.
#[inline]
pub fn write_tagged_data(
    out: &mut Vec<u8>,
    sched_ns: u64,
    seq: u64,
    origin: u64,
    event_bytes: usize,
) {
    let numbers = decimal_len(sched_ns) + decimal_len(seq) + decimal_len(origin);
    let pad = event_bytes.saturating_sub(TAGGED_OVERHEAD + numbers);
    out.extend_from_slice(TS_KEY);
    push_u64(out, sched_ns);
    out.extend_from_slice(SEQ_KEY);
    push_u64(out, seq);
    out.extend_from_slice(ORIGIN_KEY);
    push_u64(out, origin);
    push_padding(out, pad);
}

/// Appends `,"p":"<pad bytes of x>"}` (the padding capped at 64 KiB).
#[inline]
fn push_padding(out: &mut Vec<u8>, pad: usize) {
    out.extend_from_slice(b",\"p\":\"");
    out.extend_from_slice(&PAD[..pad.min(PAD.len())]);
    out.extend_from_slice(b"\"}");
}

/// Appends one publish envelope (API.md section 1, without seq): channel, type, data.
#[inline]
pub fn write_envelope(out: &mut Vec<u8>, channel: &[u8], sched_ns: u64, event_bytes: usize) {
    out.push(b'{');
    write_event_fields(out, channel, sched_ns, event_bytes);
}

/// Appends the WebSocket publish op's JSON (to be framed by the caller).
#[inline]
pub fn write_ws_publish(out: &mut Vec<u8>, channel: &[u8], sched_ns: u64, event_bytes: usize) {
    out.extend_from_slice(b"{\"op\":\"publish\",");
    write_event_fields(out, channel, sched_ns, event_bytes);
}

/// The fields after an object's `{`: channel, type, data, and the closing `}`.
#[inline]
fn write_event_fields(out: &mut Vec<u8>, channel: &[u8], sched_ns: u64, event_bytes: usize) {
    out.extend_from_slice(b"\"channel\":\"");
    out.extend_from_slice(channel);
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(EVENT_TYPE.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    write_data(out, sched_ns, event_bytes);
    out.push(b'}');
}

/// Appends `Authorization: Bearer <credential>` when there is one.
pub fn write_bearer(out: &mut Vec<u8>, credential: Option<&str>) {
    if let Some(credential) = credential {
        out.extend_from_slice(b"Authorization: Bearer ");
        out.extend_from_slice(credential.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends the head of `POST /api/v1/relay/events` for a body of `body_len` bytes.
pub fn write_publish_head(out: &mut Vec<u8>, host: &str, api_key: Option<&str>, body_len: usize) {
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(PUBLISH_PATH.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: application/json\r\n");
    write_bearer(out, api_key);
    out.extend_from_slice(b"Content-Length: ");
    push_u64(out, body_len as u64);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends `GET /api/v1/relay/events/stream?channel=A&channel=B` (channel names are of
/// `[A-Za-z0-9._:@/-]`, none of which needs percent-encoding in a query).
pub fn write_sse_request<'a>(
    out: &mut Vec<u8>,
    host: &str,
    channels: impl IntoIterator<Item = &'a [u8]>,
    token: Option<&str>,
) {
    out.extend_from_slice(b"GET /api/v1/relay/events/stream");
    for (i, channel) in channels.into_iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"?channel=" } else { b"&channel=" });
        out.extend_from_slice(channel);
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nAccept: text/event-stream\r\n");
    write_bearer(out, token);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan;

    #[test]
    fn data_is_json_of_the_requested_size() {
        for (ts, size) in [
            (0u64, 100usize),
            (123_456_789, 100),
            (u64::MAX, 100),
            (7, 1000),
        ] {
            let mut out = Vec::new();
            write_data(&mut out, ts, size);
            assert_eq!(out.len(), size, "ts {ts}");
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["t"].as_u64(), Some(ts));
        }
        // Too small to pad: the bare form.
        let mut out = Vec::new();
        write_data(&mut out, 12345, 3);
        assert_eq!(out, br#"{"t":12345,"p":""}"#);
    }

    #[test]
    fn envelope_round_trips_through_the_scan() {
        let mut out = Vec::new();
        write_envelope(&mut out, b"lg.r.3", 987_654_321, 100);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["channel"], "lg.r.3");
        assert_eq!(v["type"], EVENT_TYPE);
        // What relay will send: our data spliced, byte for byte, into its envelope.
        let text = String::from_utf8(out.clone()).unwrap();
        let at = text.find("\"data\":").unwrap() + 7;
        let data = &text[at..text.len() - 1];
        let relay = format!(
            r#"{{"op":"event","id":"x","channel":"lg.r.3","type":"lg","seq":4,"epoch":"e","ts":1,"data":{data}}}"#
        );
        let f = scan::scan_event(relay.as_bytes()).unwrap();
        assert_eq!(f.sched_ns, 987_654_321);
        assert_eq!(f.seq, 4);
    }

    #[test]
    fn ws_publish_and_requests() {
        let mut out = Vec::new();
        write_ws_publish(&mut out, b"c", 5, 50);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["op"], "publish");
        assert_eq!(v["data"]["t"], 5);

        let mut head = Vec::new();
        write_publish_head(&mut head, "h:1", Some("k1"), 42);
        let text = String::from_utf8(head).unwrap();
        assert!(text.starts_with("POST /api/v1/relay/events HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(text.contains("Authorization: Bearer k1\r\n"));
        assert!(text.ends_with("Content-Length: 42\r\n\r\n"));

        let mut sse = Vec::new();
        write_sse_request(&mut sse, "h", [&b"a"[..], &b"b.c"[..]], None);
        let text = String::from_utf8(sse).unwrap();
        assert!(
            text.starts_with("GET /api/v1/relay/events/stream?channel=a&channel=b.c HTTP/1.1\r\n")
        );
    }

    #[test]
    fn tagged_data_is_json_of_the_requested_size_and_scans_back() {
        for (ts, seq, origin, size) in [
            (0u64, 1u64, 0u64, 100usize),
            (123_456_789, 42, 7, 100),
            (u64::MAX, u64::MAX, 9999, 200),
            (5, 3, 1, 1000),
        ] {
            let mut out = Vec::new();
            write_tagged_data(&mut out, ts, seq, origin, size);
            assert_eq!(out.len(), size, "ts {ts}");
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["t"].as_u64(), Some(ts));
            assert_eq!(v["s"].as_u64(), Some(seq));
            assert_eq!(v["o"].as_u64(), Some(origin));
            let f = scan::scan_tagged_data(&out).unwrap();
            assert_eq!((f.sched_ns, f.seq, f.origin), (ts, seq, origin));
        }
        let mut out = Vec::new();
        write_tagged_data(&mut out, 12, 3, 4, 0);
        assert_eq!(out, br#"{"t":12,"s":3,"o":4,"p":""}"#);
    }

    #[test]
    fn decimal() {
        for v in [0u64, 9, 10, 99, 100, 12345, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
            assert_eq!(decimal_len(v), v.to_string().len());
        }
    }
}
