//! Hot-path byte scanning of what relay sends: event envelopes, WebSocket reply ops, SSE lines.
//!
//! Owns the per-event parse: an event's `channel`, `seq` and the scheduled timestamp the
//! generator put in `data` are found by substring search and digit parsing, never by a full
//! JSON parse, and nothing is allocated. Also reads back the tagged data the generator
//! publishes to servers that assign no sequence (NATS), which arrives as sent. Relay writes the envelope as
//! `{"id","channel","type","seq","epoch","ts","data",...}` (src/bus/event.rs); the scan looks for
//! each key rather than relying on that order, so a reordered envelope still parses.
//! Must never panic on any input: every index is checked.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// The start of every WebSocket event frame payload relay sends.
pub const WS_EVENT_PREFIX: &[u8] = b"{\"op\":\"event\",";
/// The key in front of the generator's timestamp: its `data` is `{"t":<ns>,"p":"..."}`.
pub const DATA_TS_KEY: &[u8] = b"\"data\":{\"t\":";

static CHANNEL_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"channel\":\""));
static SEQ_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"seq\":"));
static DATA_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(DATA_TS_KEY));

/// The three fields the generator needs from an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFields<'a> {
    pub channel: &'a [u8],
    pub seq: u64,
    /// The scheduled send time the publisher wrote into `data.t` (ns since the origin).
    pub sched_ns: u64,
}

/// Scans an envelope (or any JSON object text that contains one's fields). `None` when a field
/// is missing or malformed: the event is not one this generator published.
#[inline]
pub fn scan_event(json: &[u8]) -> Option<EventFields<'_>> {
    scan_in_relay_order(json).or_else(|| scan_in_any_order(json))
}

/// The fields read straight through in the order relay writes them, each key checked where it
/// must be: a few short quote searches instead of three substring searches per event, which were
/// the generator's largest user-space cost in the fan-out scenario. `None` when anything is
/// not where relay puts it; [`scan_in_any_order`] then decides.
#[inline]
fn scan_in_relay_order(json: &[u8]) -> Option<EventFields<'_>> {
    let mut cursor = Cursor { json, at: 0 };
    if json.starts_with(WS_EVENT_PREFIX) {
        cursor.at = WS_EVENT_PREFIX.len();
    } else {
        cursor.key(b"{")?;
    }
    // id, channel, type and epoch are names relay validates: no escapes, so the first quote
    // ends each of them.
    cursor.key(b"\"id\":\"")?;
    cursor.string()?;
    cursor.key(b",\"channel\":\"")?;
    let channel = cursor.string()?;
    cursor.key(b",\"type\":\"")?;
    cursor.string()?;
    cursor.key(b",\"seq\":")?;
    let seq = cursor.number()?;
    cursor.key(b",\"epoch\":\"")?;
    cursor.string()?;
    cursor.key(b",\"ts\":")?;
    cursor.skip_number()?;
    cursor.key(b",")?;
    cursor.key(DATA_TS_KEY)?;
    let sched_ns = cursor.number()?;
    Some(EventFields {
        channel,
        seq,
        sched_ns,
    })
}

/// A read position in a JSON text, for [`scan_in_relay_order`].
struct Cursor<'a> {
    json: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// Steps over `key` when the text continues with it.
    #[inline]
    fn key(&mut self, key: &[u8]) -> Option<()> {
        self.json.get(self.at..)?.starts_with(key).then(|| {
            self.at += key.len();
        })
    }

    /// The string's text up to its closing quote (no escapes expected), stepping past the quote.
    #[inline]
    fn string(&mut self) -> Option<&'a [u8]> {
        let rest = self.json.get(self.at..)?;
        let len = find_quote(rest)?;
        self.at += len + 1;
        Some(&rest[..len])
    }

    /// Steps over a number the generator does not need (relay's `ts`).
    #[inline]
    fn skip_number(&mut self) -> Option<()> {
        let rest = self.json.get(self.at..)?;
        let len = rest
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(rest.len());
        (len > 0).then(|| self.at += len)
    }

    #[inline]
    fn number(&mut self) -> Option<u64> {
        let (value, end) = parse_u64(self.json, self.at)?;
        self.at = end;
        Some(value)
    }
}

/// The fields found wherever they are (another encoder's order).
fn scan_in_any_order(json: &[u8]) -> Option<EventFields<'_>> {
    let c = CHANNEL_KEY.find(json)? + CHANNEL_KEY.needle().len();
    let c_end = c + memchr::memchr(b'"', json.get(c..)?)?;
    let channel = &json[c..c_end];
    // `seq` and `data` follow the channel in relay's encoding; fall back to the whole text if
    // some other order was used.
    let seq_at = match SEQ_KEY.find(&json[c_end..]) {
        Some(i) => c_end + i,
        None => SEQ_KEY.find(json)?,
    } + SEQ_KEY.needle().len();
    let (seq, seq_end) = parse_u64(json, seq_at)?;
    let data_at = match DATA_KEY.find(&json[seq_end..]) {
        Some(i) => seq_end + i,
        None => DATA_KEY.find(json)?,
    } + DATA_KEY.needle().len();
    let (sched_ns, _) = parse_u64(json, data_at)?;
    Some(EventFields {
        channel,
        seq,
        sched_ns,
    })
}

/// What tagged data (`payload::write_tagged_data`) carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaggedData {
    pub sched_ns: u64,
    /// The publisher's own sequence number on the channel (from 1).
    pub seq: u64,
    /// The publisher's index.
    pub origin: u64,
}

/// Reads tagged data as the publisher wrote it (the fields in their order, at the start).
/// `None` for anything else: not data this generator published.
#[inline]
pub fn scan_tagged_data(data: &[u8]) -> Option<TaggedData> {
    use crate::payload::{ORIGIN_KEY, SEQ_KEY, TS_KEY};
    let after = |at: usize, key: &[u8]| data.get(at..)?.starts_with(key).then_some(at + key.len());
    let (sched_ns, at) = parse_u64(data, after(0, TS_KEY)?)?;
    let (seq, at) = parse_u64(data, after(at, SEQ_KEY)?)?;
    let (origin, _) = parse_u64(data, after(at, ORIGIN_KEY)?)?;
    Some(TaggedData {
        sched_ns,
        seq,
        origin,
    })
}

/// Parses the decimal digits at `at`; returns the value and the index after the last digit.
/// `None` without digits or on overflow.
///
/// Eight digits at a time while eight are there (three multiplications instead of eight
/// dependent ones): the scheduled time in every event has 14 or more digits, and parsing it
/// digit by digit was 10% of the generator's CPU in the fan-out scenario at 3.2 M events/s.
#[inline]
pub fn parse_u64(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let digits = bytes.get(at..)?;
    let mut value: u64 = 0;
    let mut n = 0;
    // Two words of eight are sixteen digits: always fits.
    while n < 16 {
        let Some(word) = digits.get(n..n + 8) else {
            break;
        };
        let word = u64::from_le_bytes(word.try_into().ok()?);
        if !eight_digits(word) {
            break;
        }
        value = value * 100_000_000 + eight_digits_value(word);
        n += 8;
    }
    for &b in &digits[n..] {
        if !b.is_ascii_digit() {
            break;
        }
        let digit = u64::from(b - b'0');
        // Nineteen digits always fit; only a twentieth can overflow.
        value = if n < 19 {
            value * 10 + digit
        } else {
            value.checked_mul(10)?.checked_add(digit)?
        };
        n += 1;
    }
    if n == 0 {
        None
    } else {
        Some((value, at + n))
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether all eight bytes of `word` (little-endian) are ASCII digits. A byte below `0`
/// sets its high bit in the subtraction, a byte above `9` in the addition; no borrow or carry
/// crosses into a higher byte unless a lower one already failed.
#[inline]
fn eight_digits(word: u64) -> bool {
    (word.wrapping_sub(ONES * b'0' as u64) | word.wrapping_add(ONES * 0x46)) & HIGHS == 0
}

/// The value of eight ASCII digits, the first in the lowest byte: pairs, then quads, then
/// the whole, each step one multiplication.
#[inline]
fn eight_digits_value(word: u64) -> u64 {
    let d = word - ONES * b'0' as u64;
    let pairs = (d * 10 + (d >> 8)) & 0x00ff_00ff_00ff_00ff;
    let quads = (pairs * 100 + (pairs >> 16)) & 0x0000_ffff_0000_ffff;
    (quads & 0xffff) * 10_000 + (quads >> 32)
}

/// The index of the first `"` in `bytes`, eight bytes at a time: the strings of an envelope
/// are short (a channel, a type, an epoch, a 36-byte id), where `memchr`'s vector set-up cost
/// more than the search (10% of the generator in the fan-out scenario).
#[inline]
pub fn find_quote(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(word.try_into().ok()?);
        let x = word ^ (ONES * b'"' as u64);
        // The lowest byte that is zero in `x` sets its high bit here; bytes above it may too.
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..].iter().position(|&b| b == b'"').map(|i| at + i)
}

/// The op of a WebSocket message relay sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Event,
    Welcome,
    Subscribed,
    Unsubscribed,
    Published,
    Error,
    Gap,
    Pong,
    Other,
}

/// Classifies a text message by its leading `{"op":"NAME"` (relay always writes `op` first).
#[inline]
pub fn ws_op(payload: &[u8]) -> Op {
    if payload.starts_with(WS_EVENT_PREFIX) {
        return Op::Event;
    }
    let Some(rest) = payload.strip_prefix(b"{\"op\":\"") else {
        return Op::Other;
    };
    let Some(end) = memchr::memchr(b'"', rest) else {
        return Op::Other;
    };
    match &rest[..end] {
        b"event" => Op::Event,
        b"welcome" => Op::Welcome,
        b"subscribed" => Op::Subscribed,
        b"unsubscribed" => Op::Unsubscribed,
        b"published" => Op::Published,
        b"error" => Op::Error,
        b"gap" => Op::Gap,
        b"pong" => Op::Pong,
        _ => Op::Other,
    }
}

/// The raw text of string field `"key":"..."` (first occurrence; no unescaping, fine for the
/// names relay validates and for messages shown to a human).
pub fn field_str<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let needle = quoted_key(key, true);
    let at = memchr::memmem::find(json, &needle)? + needle.len();
    let rest = json.get(at..)?;
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' => i += 2,
            b'"' => return Some(&rest[..i]),
            _ => i += 1,
        }
    }
    None
}

/// The value of number field `"key":123` (first occurrence).
pub fn field_u64(json: &[u8], key: &str) -> Option<u64> {
    let needle = quoted_key(key, false);
    let at = memchr::memmem::find(json, &needle)? + needle.len();
    parse_u64(json, at).map(|(v, _)| v)
}

fn quoted_key(key: &str, string_value: bool) -> Vec<u8> {
    let mut needle = Vec::with_capacity(key.len() + 4);
    needle.push(b'"');
    needle.extend_from_slice(key.as_bytes());
    needle.extend_from_slice(b"\":");
    if string_value {
        needle.push(b'"');
    }
    needle
}

/// One complete SSE line (without its terminator) and the bytes it took, or `None` when the
/// buffer holds no complete line yet. Lines end in LF, CRLF or a lone CR; a CR at the very end
/// of the buffer waits for the next byte to tell CRLF from CR.
#[inline]
pub fn next_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let i = memchr::memchr2(b'\n', b'\r', buf)?;
    if buf[i] == b'\n' {
        return Some((&buf[..i], i + 1));
    }
    match buf.get(i + 1) {
        Some(b'\n') => Some((&buf[..i], i + 2)),
        Some(_) => Some((&buf[..i], i + 1)),
        None => None,
    }
}

/// One SSE line, split into field and value (the single space after the colon dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseLine<'a> {
    /// The empty line that dispatches a block.
    Blank,
    Comment(&'a [u8]),
    Field {
        name: &'a [u8],
        value: &'a [u8],
    },
}

#[inline]
pub fn sse_line(line: &[u8]) -> SseLine<'_> {
    if line.is_empty() {
        return SseLine::Blank;
    }
    if line[0] == b':' {
        return SseLine::Comment(&line[1..]);
    }
    match memchr::memchr(b':', line) {
        Some(i) => {
            let value = &line[i + 1..];
            let value = value.strip_prefix(b" ").unwrap_or(value);
            SseLine::Field {
                name: &line[..i],
                value,
            }
        }
        None => SseLine::Field {
            name: line,
            value: b"",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY_EVENT: &[u8] = br#"{"op":"event","id":"0193f1d2-7a6b-7c3d-8e9f-0123456789ab","channel":"lg.abc.7","type":"lg","seq":17,"epoch":"k3x9","ts":1763812345123,"data":{"t":123456789012,"p":"xxxxxxxx"}}"#;

    #[test]
    fn scans_relay_ws_event() {
        assert_eq!(ws_op(RELAY_EVENT), Op::Event);
        let f = scan_event(RELAY_EVENT).unwrap();
        assert_eq!(f.channel, b"lg.abc.7");
        assert_eq!(f.seq, 17);
        assert_eq!(f.sched_ns, 123_456_789_012);
    }

    #[test]
    fn both_scans_agree_on_relay_events_and_only_relay_order_takes_the_fast_path() {
        let sse = [b"{", &RELAY_EVENT[WS_EVENT_PREFIX.len()..]].concat();
        for json in [RELAY_EVENT, &sse[..]] {
            let fast = scan_in_relay_order(json).expect("relay's order");
            assert_eq!(Some(fast), scan_in_any_order(json));
        }
        let with_extras = br#"{"id":"u","channel":"c","type":"t","seq":4,"epoch":"e","ts":1,"data":{"t":9},"source":"s"}"#;
        assert_eq!(scan_in_relay_order(with_extras).map(|f| f.seq), Some(4));
        let reordered =
            br#"{"id":"u","seq":4,"channel":"c","type":"t","epoch":"e","ts":1,"data":{"t":9}}"#;
        assert_eq!(scan_in_relay_order(reordered), None);
        assert_eq!(
            scan_event(reordered).map(|f| (f.channel, f.seq)),
            Some((&b"c"[..], 4))
        );
    }

    #[test]
    fn scan_survives_reordered_fields() {
        let json = br#"{"data":{"t":5,"p":""},"seq":9,"channel":"c"}"#;
        let f = scan_event(json).unwrap();
        assert_eq!((f.channel, f.seq, f.sched_ns), (&b"c"[..], 9, 5));
    }

    #[test]
    fn scan_rejects_foreign_and_broken_events() {
        // Somebody else's data.
        assert!(scan_event(br#"{"channel":"c","seq":1,"data":{"x":1}}"#).is_none());
        assert!(scan_event(br#"{"channel":"c","seq":1,"data":7}"#).is_none());
        // Truncated anywhere: never a panic, never a wrong answer.
        for cut in 0..RELAY_EVENT.len() {
            let part = &RELAY_EVENT[..cut];
            if let Some(f) = scan_event(part) {
                assert_eq!(f.channel, b"lg.abc.7");
                assert_eq!(f.seq, 17);
                assert!(123_456_789_012u64
                    .to_string()
                    .starts_with(&f.sched_ns.to_string()));
            }
        }
        assert!(scan_event(b"").is_none());
        assert!(scan_event(br#""channel":"unterminated"#).is_none());
        assert!(scan_event(br#"{"channel":"c","seq":-1,"data":{"t":1}}"#).is_none());
    }

    #[test]
    fn tagged_data_scan_rejects_anything_else() {
        let good = br#"{"t":5,"s":2,"o":1,"p":"xx"}"#;
        assert_eq!(
            scan_tagged_data(good),
            Some(TaggedData {
                sched_ns: 5,
                seq: 2,
                origin: 1
            })
        );
        for cut in 0..good.len() {
            if let Some(f) = scan_tagged_data(&good[..cut]) {
                assert_eq!((f.sched_ns, f.seq, f.origin), (5, 2, 1));
            }
        }
        assert!(scan_tagged_data(br#"{"t":5,"p":"xx"}"#).is_none());
        assert!(scan_tagged_data(br#"{"s":2,"t":5,"o":1}"#).is_none());
        assert!(scan_tagged_data(br#"{"t":5,"s":-2,"o":1}"#).is_none());
        assert!(scan_tagged_data(b"").is_none());
    }

    #[test]
    fn quote_search_matches_a_plain_search() {
        for len in 0..40 {
            let mut text = vec![b'a'; len];
            assert_eq!(find_quote(&text), None);
            for at in 0..len {
                text[at] = b'"';
                for later in at..len {
                    let mut t = text.clone();
                    t[later] = b'"';
                    assert_eq!(find_quote(&t), Some(at), "{len} {at} {later}");
                }
                // Bytes one away from a quote in value do not match.
                text[at] = b'"' ^ 1;
                assert_eq!(find_quote(&text), None);
                text[at] = 0xa2;
                assert_eq!(find_quote(&text), None);
                text[at] = b'a';
            }
        }
    }

    #[test]
    fn digits() {
        assert_eq!(parse_u64(b"123,", 0), Some((123, 3)));
        assert_eq!(parse_u64(b"x9", 1), Some((9, 2)));
        assert_eq!(parse_u64(b"x", 1), None);
        assert_eq!(parse_u64(b"abc", 0), None);
        assert_eq!(parse_u64(b"abc", 10), None);
        assert_eq!(parse_u64(b"18446744073709551615", 0), Some((u64::MAX, 20)));
        assert_eq!(parse_u64(b"18446744073709551616", 0), None, "overflow");
        assert_eq!(parse_u64(b"99999999999999999999", 0), None, "overflow");
        assert_eq!(
            parse_u64(b"123456789012345,", 0),
            Some((123456789012345, 15))
        );
        assert_eq!(parse_u64(b"12345678", 0), Some((12345678, 8)));
        assert_eq!(parse_u64(b"1234567/9", 0), Some((1234567, 7)));
        assert_eq!(parse_u64(b"1234567:9", 0), Some((1234567, 7)));
        assert_eq!(parse_u64(b"00000000000000000042}", 0), Some((42, 20)));
        // Every length, every position of a non-digit, every digit in every place, against
        // the standard library.
        for len in 1..=20 {
            for digit in b'0'..=b'9' {
                for place in 0..len {
                    let mut text: Vec<u8> = (0..len).map(|i| b'1' + (i % 9) as u8).collect();
                    text[place] = digit;
                    let want = std::str::from_utf8(&text).unwrap().parse::<u64>().ok();
                    for stop in [b',', b'}', b'/', b':', b' ', 0x80, 0xff] {
                        let mut t = text.clone();
                        t.push(stop);
                        t.extend_from_slice(b"12345678");
                        assert_eq!(parse_u64(&t, 0).map(|(v, _)| v), want, "{t:?}");
                        if let Some((_, end)) = parse_u64(&t, 0) {
                            assert_eq!(end, len);
                        }
                    }
                }
            }
        }
        for b in 0..=255u8 {
            let mut word = *b"12345678";
            word[3] = b;
            assert_eq!(
                eight_digits(u64::from_le_bytes(word)),
                b.is_ascii_digit(),
                "byte {b}"
            );
        }
    }

    #[test]
    fn reply_ops_and_fields() {
        let sub = br#"{"op":"subscribed","ref":3,"channel":"lg.a.1","epoch":"e","seq":42,"recovered":false}"#;
        assert_eq!(ws_op(sub), Op::Subscribed);
        assert_eq!(field_str(sub, "channel"), Some(&b"lg.a.1"[..]));
        assert_eq!(field_u64(sub, "seq"), Some(42));
        assert_eq!(field_u64(sub, "nope"), None);
        let err = br#"{"op":"error","code":"rate_limited","message":"say \"slow\" down"}"#;
        assert_eq!(ws_op(err), Op::Error);
        assert_eq!(field_str(err, "code"), Some(&b"rate_limited"[..]));
        assert_eq!(
            field_str(err, "message"),
            Some(&br#"say \"slow\" down"#[..])
        );
        assert_eq!(ws_op(br#"{"op":"welcome","conn":"x"}"#), Op::Welcome);
        assert_eq!(ws_op(br#"{"op":"published","seq":1}"#), Op::Published);
        assert_eq!(ws_op(br#"{"op":"gap","channel":"c"}"#), Op::Gap);
        assert_eq!(ws_op(br#"{"op":"pong"}"#), Op::Pong);
        assert_eq!(ws_op(br#"{"op":"presence.join"}"#), Op::Other);
        assert_eq!(ws_op(b"not json"), Op::Other);
        assert_eq!(ws_op(br#"{"op":"unterminated"#), Op::Other);
        assert_eq!(field_str(br#"{"a":"x\"#, "a"), None);
    }

    #[test]
    fn sse_lines_with_every_terminator_and_partials() {
        let buf = b"id: 1\nevent: lg\r\ndata: {}\r\n\n: keepalive\rretry: 2000\n";
        let mut rest = &buf[..];
        let mut lines = Vec::new();
        while let Some((line, used)) = next_line(rest) {
            lines.push(sse_line(line));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            lines,
            vec![
                SseLine::Field {
                    name: b"id",
                    value: b"1"
                },
                SseLine::Field {
                    name: b"event",
                    value: b"lg"
                },
                SseLine::Field {
                    name: b"data",
                    value: b"{}"
                },
                SseLine::Blank,
                SseLine::Comment(b" keepalive"),
                SseLine::Field {
                    name: b"retry",
                    value: b"2000"
                },
            ]
        );
        // No terminator yet, and a CR that might be the first half of CRLF.
        assert_eq!(next_line(b"data: {\"a"), None);
        assert_eq!(next_line(b"data: x\r"), None);
        assert_eq!(next_line(b"data: x\rd"), Some((&b"data: x"[..], 8)));
        assert_eq!(
            sse_line(b"data:no-space"),
            SseLine::Field {
                name: b"data",
                value: b"no-space"
            }
        );
        assert_eq!(
            sse_line(b"lonely"),
            SseLine::Field {
                name: b"lonely",
                value: b""
            }
        );
    }

    #[test]
    fn scans_relay_sse_data_line() {
        let block = b"id: abc\nevent: lg\ndata: {\"id\":\"u\",\"channel\":\"lg.x.0\",\"type\":\"lg\",\"seq\":3,\"epoch\":\"e\",\"ts\":1,\"data\":{\"t\":77,\"p\":\"\"}}\n\n";
        let mut rest = &block[..];
        let mut found = None;
        while let Some((line, used)) = next_line(rest) {
            if let SseLine::Field {
                name: b"data",
                value,
            } = sse_line(line)
            {
                found = scan_event(value).map(|f| (f.channel.to_vec(), f.seq, f.sched_ns));
            }
            rest = &rest[used..];
        }
        assert_eq!(found, Some((b"lg.x.0".to_vec(), 3, 77)));
    }
}
