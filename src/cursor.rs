//! The SSE stream cursor: where a stream stands on every one of its channels, sent as the `id:`
//! of each event and echoed back by a reconnecting client in `Last-Event-ID` (or
//! `?last_event_id=`).
//!
//! Owns: the cursor value, its text form, and the validation of a cursor a client sends back.
//! Must never: emit text holding CR, LF or anything outside the documented alphabet (it goes
//! into an SSE `id:` line verbatim), accept a cursor that breaks a rule below, allocate in
//! `set` when a known channel keeps its epoch, or panic on any client input.
//!
//! The text form is opaque to clients: they must only echo it back unchanged, and the relay may
//! change it. Today it is entries joined by `,`, each `<channel>~<epoch>~<seq>`, in the order
//! the channels were first set. That is unambiguous because a valid channel
//! (`[A-Za-z0-9._:@/-]`) and epoch (`[A-Za-z0-9]`) hold neither `~` nor `,`.
//!
//! Limits on decode: at most `MAX_ENTRIES` entries, at most `MAX_ENCODED_LEN` bytes after
//! trimming surrounding ASCII whitespace, channel 1..=255 bytes, epoch 1..=`EPOCH_MAX` bytes,
//! seq a decimal u64, no channel twice. The empty string is the empty cursor. `encode` does not
//! enforce the length limit (a stream of many long channel names can exceed it); a stream that
//! wants its ids to be accepted back must keep `encoded_len()` within `MAX_ENCODED_LEN`.

use crate::http::codec::push_u64;
use crate::names::{self, NameError};
use std::collections::HashSet;
use std::fmt;

/// Most channels one cursor may name when decoded.
pub const MAX_ENTRIES: usize = 1024;
/// Longest cursor text accepted by `decode`, in bytes (64 KiB).
pub const MAX_ENCODED_LEN: usize = 64 * 1024;
/// Longest epoch in bytes.
pub const EPOCH_MAX: usize = 16;

/// Per-channel position of one stream: `(channel, epoch, seq)` in first-set order.
///
/// Invariant: every stored channel passes `names::validate_channel`, every epoch is
/// 1..=`EPOCH_MAX` ASCII alphanumerics, and no channel appears twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    entries: Vec<(String, String, u64)>,
}

/// Why a client's cursor was refused. `index` is the 0-based entry position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorError {
    TooLong {
        len: usize,
        max: usize,
    },
    TooManyEntries {
        max: usize,
    },
    /// The entry is not exactly three `~`-separated fields.
    BadEntry {
        index: usize,
    },
    BadChannel {
        index: usize,
        reason: NameError,
    },
    BadEpoch {
        index: usize,
    },
    /// Empty, not all ASCII digits, or above `u64::MAX`.
    BadSeq {
        index: usize,
    },
    DuplicateChannel {
        index: usize,
    },
}

impl fmt::Display for CursorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CursorError::TooLong { len, max } => {
                write!(f, "cursor is {len} bytes; at most {max} allowed")
            }
            CursorError::TooManyEntries { max } => {
                write!(f, "cursor names more than {max} channels")
            }
            CursorError::BadEntry { index } => write!(
                f,
                "cursor entry {index} is not of the form <channel>~<epoch>~<seq>"
            ),
            CursorError::BadChannel { index, reason } => {
                write!(f, "cursor entry {index}: {reason}")
            }
            CursorError::BadEpoch { index } => write!(
                f,
                "cursor entry {index}: epoch must be 1..={EPOCH_MAX} bytes of [A-Za-z0-9]"
            ),
            CursorError::BadSeq { index } => write!(
                f,
                "cursor entry {index}: seq must be a decimal number at most {}",
                u64::MAX
            ),
            CursorError::DuplicateChannel { index } => {
                write!(f, "cursor entry {index} repeats an earlier channel")
            }
        }
    }
}

impl std::error::Error for CursorError {}

fn valid_epoch(epoch: &str) -> bool {
    (1..=EPOCH_MAX).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Strict decimal: `str::parse::<u64>` would also take a leading `+`, which the encoder never
/// writes and which would make two texts mean one cursor.
fn parse_seq(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

impl Cursor {
    /// The empty cursor; it encodes to "".
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the position of `channel`: updates it in place if present, appends it otherwise.
    ///
    /// `channel` must be a valid channel name and `epoch` a valid epoch; the server has already
    /// checked both, so breaking this is a bug in the caller. Debug builds panic on it; release
    /// builds leave the cursor unchanged rather than ever put a bad byte on an `id:` line.
    /// Checks run only when a channel is new or its epoch changes, so the per-event path pays
    /// nothing for them.
    pub fn set(&mut self, channel: &str, epoch: &str, seq: u64) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.0 == channel) {
            if entry.1 != epoch {
                if !valid_epoch(epoch) {
                    debug_assert!(false, "invalid epoch {epoch:?} for channel {channel:?}");
                    return;
                }
                // Reuses the old buffer: epochs are short, so this almost never reallocates.
                entry.1.clear();
                entry.1.push_str(epoch);
            }
            entry.2 = seq;
            return;
        }
        if names::validate_channel(channel).is_err() || !valid_epoch(epoch) {
            debug_assert!(false, "invalid cursor entry {channel:?} {epoch:?}");
            return;
        }
        self.entries
            .push((channel.to_owned(), epoch.to_owned(), seq));
    }

    /// The `(epoch, seq)` recorded for `channel`.
    pub fn get(&self, channel: &str) -> Option<(&str, u64)> {
        self.entries
            .iter()
            .find(|e| e.0 == channel)
            .map(|e| (e.1.as_str(), e.2))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Exact length of the text form in bytes, so a caller can size a buffer or check the
    /// result against `MAX_ENCODED_LEN` before relying on clients being able to echo it.
    pub fn encoded_len(&self) -> usize {
        let separators = self.entries.len().saturating_sub(1);
        self.entries
            .iter()
            .map(|(channel, epoch, seq)| channel.len() + 1 + epoch.len() + 1 + decimal_len(*seq))
            .sum::<usize>()
            + separators
    }

    /// Appends the text form to `out`. Allocates only if `out` has to grow, so a connection can
    /// reuse one buffer for every event it sends.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        for (i, (channel, epoch, seq)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(channel.as_bytes());
            out.push(b'~');
            out.extend_from_slice(epoch.as_bytes());
            out.push(b'~');
            push_u64(out, *seq);
        }
    }

    /// The text form as a new `String`.
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        // Only `&str` pieces and ASCII are written, so this is always UTF-8; the lossy branch
        // exists to stay panic-free, not because it can be reached.
        match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Parses a cursor a client sent back, enforcing every rule in the module header.
    pub fn decode(s: &str) -> Result<Cursor, CursorError> {
        // HTTP allows optional whitespace around header values; only ASCII is ever legitimate.
        let s = s.trim_ascii();
        if s.len() > MAX_ENCODED_LEN {
            return Err(CursorError::TooLong {
                len: s.len(),
                max: MAX_ENCODED_LEN,
            });
        }
        let mut cursor = Cursor::new();
        if s.is_empty() {
            return Ok(cursor);
        }
        // Hashing keeps duplicate detection linear for a 1024-entry cursor; std's keyed hasher
        // means a client cannot pick names that collide on purpose.
        let mut seen: HashSet<&str> = HashSet::new();
        for (index, entry) in s.split(',').enumerate() {
            if index >= MAX_ENTRIES {
                return Err(CursorError::TooManyEntries { max: MAX_ENTRIES });
            }
            let mut fields = entry.split('~');
            let (Some(channel), Some(epoch), Some(seq), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(CursorError::BadEntry { index });
            };
            names::validate_channel(channel)
                .map_err(|reason| CursorError::BadChannel { index, reason })?;
            if !valid_epoch(epoch) {
                return Err(CursorError::BadEpoch { index });
            }
            let seq = parse_seq(seq).ok_or(CursorError::BadSeq { index })?;
            if !seen.insert(channel) {
                return Err(CursorError::DuplicateChannel { index });
            }
            cursor
                .entries
                .push((channel.to_owned(), epoch.to_owned(), seq));
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Cursor {
        let mut c = Cursor::new();
        c.set("doc.42", "k3x9", 17);
        c.set("user:alice@ex.com/inbox", "Z0", 0);
        c.set("chat-1_a", "abcdefghijklmnop", u64::MAX);
        c
    }

    #[test]
    fn empty_cursor() {
        let c = Cursor::new();
        assert!(c.is_empty());
        assert_eq!(c.len(), 0);
        assert_eq!(c.encode(), "");
        assert_eq!(c.encoded_len(), 0);
        assert_eq!(Cursor::decode(""), Ok(Cursor::new()));
        assert_eq!(Cursor::decode(" \t "), Ok(Cursor::new()));
    }

    #[test]
    fn encode_form_and_order() {
        let c = sample();
        assert_eq!(
            c.encode(),
            "doc.42~k3x9~17,user:alice@ex.com/inbox~Z0~0,chat-1_a~abcdefghijklmnop~18446744073709551615"
        );
        assert_eq!(c.encoded_len(), c.encode().len());
    }

    #[test]
    fn encode_into_appends_and_matches_encode() {
        let c = sample();
        let mut out = b"id: ".to_vec();
        c.encode_into(&mut out);
        assert_eq!(out, format!("id: {}", c.encode()).into_bytes());
    }

    #[test]
    fn encode_into_does_not_grow_a_big_enough_buffer() {
        let c = sample();
        let mut out = Vec::with_capacity(c.encoded_len());
        let ptr = out.as_ptr();
        let cap = out.capacity();
        c.encode_into(&mut out);
        assert_eq!(out.len(), c.encoded_len());
        assert_eq!(out.capacity(), cap);
        assert_eq!(out.as_ptr(), ptr);
    }

    #[test]
    fn decimal_edges() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12345,
            u64::MAX / 10,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
            assert_eq!(decimal_len(n), n.to_string().len());
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let back = Cursor::decode(&c.encode()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.encode(), c.encode());
        assert_eq!(back.get("doc.42"), Some(("k3x9", 17)));
        assert_eq!(back.get("chat-1_a"), Some(("abcdefghijklmnop", u64::MAX)));
    }

    #[test]
    fn round_trip_at_the_limits() {
        // 1024 entries whose text is exactly 64 KiB: both limits reached, neither exceeded.
        // Each entry is "<name>~e~1"; the name is a unique 5-digit prefix plus padding.
        let mut c = Cursor::new();
        let mut remaining = MAX_ENCODED_LEN - (MAX_ENTRIES - 1);
        for i in 0..MAX_ENTRIES {
            let entry_len = remaining / (MAX_ENTRIES - i);
            let name = format!("{i:05}{}", "x".repeat(entry_len - "~e~1".len() - 5));
            c.set(&name, "e", 1);
            remaining -= entry_len;
        }
        let text = c.encode();
        assert_eq!(text.len(), MAX_ENCODED_LEN);
        assert_eq!(c.encoded_len(), MAX_ENCODED_LEN);
        assert_eq!(Cursor::decode(&text), Ok(c));
        let too_long = format!("{text}x");
        assert_eq!(
            Cursor::decode(&too_long),
            Err(CursorError::TooLong {
                len: MAX_ENCODED_LEN + 1,
                max: MAX_ENCODED_LEN
            })
        );
    }

    #[test]
    fn set_updates_in_place_keeping_order() {
        let mut c = sample();
        c.set("doc.42", "k3x9", 18);
        c.set("user:alice@ex.com/inbox", "new1", 1);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("doc.42"), Some(("k3x9", 18)));
        assert_eq!(c.get("user:alice@ex.com/inbox"), Some(("new1", 1)));
        assert!(c
            .encode()
            .starts_with("doc.42~k3x9~18,user:alice@ex.com/inbox~new1~1,chat-1_a~"));
        assert_eq!(c.get("missing"), None);
        // Seq may go down: after an epoch change a channel starts over.
        c.set("doc.42", "k3x9", 3);
        assert_eq!(c.get("doc.42"), Some(("k3x9", 3)));
    }

    /// Pointer equality alone could pass by luck (the allocator may hand a freed block straight
    /// back), so the buffers are first given a capacity no fresh copy would have.
    fn mark_buffers(c: &mut Cursor) -> Vec<(*const u8, usize, *const u8, usize)> {
        for e in &mut c.entries {
            e.0.reserve(1000);
            e.1.reserve(1000);
        }
        buffers(c)
    }

    fn buffers(c: &Cursor) -> Vec<(*const u8, usize, *const u8, usize)> {
        c.entries
            .iter()
            .map(|e| (e.0.as_ptr(), e.0.capacity(), e.1.as_ptr(), e.1.capacity()))
            .collect()
    }

    #[test]
    fn set_with_same_epoch_reuses_the_strings() {
        let mut c = sample();
        let before = mark_buffers(&mut c);
        let cap = c.entries.capacity();
        for seq in 0..100 {
            c.set("doc.42", "k3x9", seq);
            c.set("chat-1_a", "abcdefghijklmnop", seq);
        }
        assert_eq!(buffers(&c), before);
        assert_eq!(c.entries.capacity(), cap);
        assert_eq!(c.get("doc.42"), Some(("k3x9", 99)));
    }

    #[test]
    fn set_with_new_epoch_reuses_the_epoch_buffer() {
        let mut c = sample();
        let before = mark_buffers(&mut c);
        c.set("doc.42", "zz", 1);
        c.set("chat-1_a", "Q", 2);
        assert_eq!(buffers(&c), before);
        assert_eq!(c.get("doc.42"), Some(("zz", 1)));
        assert_eq!(c.get("chat-1_a"), Some(("Q", 2)));
        assert_eq!(
            c.encode(),
            "doc.42~zz~1,user:alice@ex.com/inbox~Z0~0,chat-1_a~Q~2"
        );
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "invalid cursor entry")]
    fn set_with_newline_in_channel_is_a_caller_bug() {
        Cursor::new().set("doc\n1", "e", 1);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "invalid epoch")]
    fn set_with_bad_new_epoch_is_a_caller_bug() {
        let mut c = sample();
        c.set("doc.42", "bad~epoch", 1);
    }

    #[cfg(not(debug_assertions))]
    #[test]
    fn set_with_bad_input_leaves_cursor_unchanged_in_release() {
        let mut c = sample();
        c.set("doc\n1", "e", 1);
        c.set("doc.42", "bad\r", 99);
        assert_eq!(c, sample());
    }

    #[test]
    fn decode_trims_surrounding_whitespace_only() {
        let c = Cursor::decode(" \t doc.1~e~5,doc.2~f~6\r\n").unwrap();
        assert_eq!(c.get("doc.1"), Some(("e", 5)));
        assert_eq!(c.get("doc.2"), Some(("f", 6)));
        assert!(matches!(
            Cursor::decode("doc.1~e~5, doc.2~f~6"),
            Err(CursorError::BadChannel { index: 1, .. })
        ));
        assert_eq!(
            Cursor::decode("doc.1~e~5 "),
            Ok(Cursor::decode("doc.1~e~5").unwrap())
        );
        assert_eq!(
            Cursor::decode("doc.1~e~ 5"),
            Err(CursorError::BadSeq { index: 0 })
        );
    }

    #[test]
    fn decode_rejects_malformed_entries() {
        for (s, index) in [
            ("doc.1", 0),
            ("doc.1~e", 0),
            ("doc.1~e~1~2", 0),
            ("a~e~1,b~e", 1),
            ("a~e~1,", 1),
            (",a~e~1", 0),
            ("a~e~1,,b~e~2", 1),
        ] {
            let got = Cursor::decode(s);
            assert!(
                matches!(got, Err(CursorError::BadEntry { index: i }) if i == index),
                "{s:?} -> {got:?}"
            );
        }
    }

    #[test]
    fn decode_rejects_bad_channels() {
        assert_eq!(
            Cursor::decode("~e~1"),
            Err(CursorError::BadChannel {
                index: 0,
                reason: NameError::Empty { what: "channel" }
            })
        );
        assert_eq!(
            Cursor::decode("a~e~1,d o~e~1"),
            Err(CursorError::BadChannel {
                index: 1,
                reason: NameError::BadChar {
                    what: "channel",
                    ch: ' ',
                    at: 1
                }
            })
        );
        let long = format!("{}~e~1", "a".repeat(256));
        assert_eq!(
            Cursor::decode(&long),
            Err(CursorError::BadChannel {
                index: 0,
                reason: NameError::TooLong {
                    what: "channel",
                    len: 256,
                    max: 255
                }
            })
        );
        assert!(Cursor::decode(&format!("{}~e~1", "a".repeat(255))).is_ok());
        assert!(matches!(
            Cursor::decode("dé~e~1"),
            Err(CursorError::BadChannel { index: 0, .. })
        ));
    }

    #[test]
    fn decode_rejects_bad_epochs() {
        for s in [
            "a~~1",
            "a~ab.c~1",
            "a~ab-c~1",
            "a~é~1",
            "a~abcdefghijklmnopq~1",
        ] {
            assert_eq!(
                Cursor::decode(s),
                Err(CursorError::BadEpoch { index: 0 }),
                "{s:?}"
            );
        }
        assert!(Cursor::decode("a~abcdefghijklmnop~1").is_ok());
        assert!(Cursor::decode("a~AZaz09~1").is_ok());
    }

    #[test]
    fn decode_rejects_bad_seqs() {
        for s in [
            "a~e~",
            "a~e~+1",
            "a~e~-1",
            "a~e~1a",
            "a~e~0x10",
            "a~e~1.0",
            "a~e~18446744073709551616",
            "a~e~99999999999999999999",
            "a~e~١",
        ] {
            assert_eq!(
                Cursor::decode(s),
                Err(CursorError::BadSeq { index: 0 }),
                "{s:?}"
            );
        }
        assert_eq!(
            Cursor::decode("a~e~18446744073709551615").unwrap().get("a"),
            Some(("e", u64::MAX))
        );
        assert_eq!(Cursor::decode("a~e~0").unwrap().get("a"), Some(("e", 0)));
        // Leading zeros are still decimal; only the canonical form is ever produced.
        assert_eq!(Cursor::decode("a~e~007").unwrap().get("a"), Some(("e", 7)));
    }

    #[test]
    fn decode_rejects_duplicate_channels() {
        assert_eq!(
            Cursor::decode("a~e~1,b~e~1,a~f~2"),
            Err(CursorError::DuplicateChannel { index: 2 })
        );
        assert_eq!(
            Cursor::decode("a~e~1,a~e~1"),
            Err(CursorError::DuplicateChannel { index: 1 })
        );
        // Channel names are case-sensitive.
        assert!(Cursor::decode("a~e~1,A~e~1").is_ok());
    }

    #[test]
    fn decode_entry_count_limit() {
        let entries: Vec<String> = (0..MAX_ENTRIES).map(|i| format!("c{i}~e~1")).collect();
        let at_limit = entries.join(",");
        assert_eq!(Cursor::decode(&at_limit).map(|c| c.len()), Ok(MAX_ENTRIES));
        let over = format!("{at_limit},x~e~1");
        assert_eq!(
            Cursor::decode(&over),
            Err(CursorError::TooManyEntries { max: MAX_ENTRIES })
        );
    }

    #[test]
    fn length_limit_is_checked_before_parsing() {
        // Garbage that is too long must fail on length, not on its first bad entry.
        let s = "~".repeat(MAX_ENCODED_LEN + 1);
        assert_eq!(
            Cursor::decode(&s),
            Err(CursorError::TooLong {
                len: MAX_ENCODED_LEN + 1,
                max: MAX_ENCODED_LEN
            })
        );
    }

    #[test]
    fn id_never_contains_cr_or_lf() {
        // Whatever a client sends back, a decoded cursor re-encodes to a single safe line.
        for s in [
            "a~e~1\r\nevent: evil",
            "a\n~e~1",
            "a~e\r~1",
            "a~e~1\n,b~e~2",
            "a~e~1,\rb~e~2",
        ] {
            assert!(Cursor::decode(s).is_err(), "{s:?}");
        }
        // Trimmed edges are dropped, never carried into the id.
        let c = Cursor::decode("\r\na~e~1\r\n").unwrap();
        let text = c.encode();
        assert_eq!(text, "a~e~1");
        // Every byte of any encoded cursor is from the documented alphabet.
        let c = sample();
        let mut out = Vec::new();
        c.encode_into(&mut out);
        assert!(!out.is_empty());
        assert!(out
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"._:@/-~,".contains(&b)));
        assert!(!out.contains(&b'\r') && !out.contains(&b'\n'));
    }

    #[test]
    fn separators_cannot_appear_in_names() {
        // The text form is only unambiguous while channels never hold `~` or `,`.
        assert!(names::validate_channel("a~b").is_err());
        assert!(names::validate_channel("a,b").is_err());
        assert!(!valid_epoch("a~b") && !valid_epoch("a,b"));
    }

    #[test]
    fn errors_display_with_numbers() {
        assert_eq!(
            CursorError::TooLong {
                len: 70000,
                max: 65536
            }
            .to_string(),
            "cursor is 70000 bytes; at most 65536 allowed"
        );
        assert_eq!(
            CursorError::BadEpoch { index: 2 }.to_string(),
            "cursor entry 2: epoch must be 1..=16 bytes of [A-Za-z0-9]"
        );
        assert_eq!(
            CursorError::BadSeq { index: 0 }.to_string(),
            "cursor entry 0: seq must be a decimal number at most 18446744073709551615"
        );
        let e = Cursor::decode("a b~e~1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cursor entry 0: channel must be 1..=255 bytes of [A-Za-z0-9._:@/-]; found ' ' at byte 1"
        );
        assert_eq!(
            CursorError::DuplicateChannel { index: 3 }.to_string(),
            "cursor entry 3 repeats an earlier channel"
        );
        assert_eq!(
            CursorError::TooManyEntries { max: 1024 }.to_string(),
            "cursor names more than 1024 channels"
        );
        assert_eq!(
            CursorError::BadEntry { index: 1 }.to_string(),
            "cursor entry 1 is not of the form <channel>~<epoch>~<seq>"
        );
    }
}
