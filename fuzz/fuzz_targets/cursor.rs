//! `relay::cursor::Cursor::decode` on arbitrary strings: what a reconnecting SSE client sends
//! back in `Last-Event-ID` (or `?last_event_id=`). Non-UTF-8 input is skipped (the header value
//! reaches `decode` as `&str`).
//!
//! Asserts, for a cursor that decodes (module header and the `round_trip` /
//! `id_never_contains_cr_or_lf` unit tests):
//! * `decode(c.encode())` gives `c` back, and encoding that again gives the same text;
//! * `encoded_len()` is the length of `encode()`, and `encode_into` appends the same bytes;
//! * the text holds only the documented alphabet (`[A-Za-z0-9._:@/-]`, `~`, `,`), never CR or
//!   LF, and is no longer than the input after trimming (seqs may lose leading zeros, nothing
//!   else changes);
//! * at most `MAX_ENTRIES` entries; every channel passes `names::validate_channel`, every epoch
//!   is 1..=`EPOCH_MAX` alphanumerics, and `get` finds each entry;
//! * the empty (or all-whitespace) string is the empty cursor.
//!
//! And for one that does not: the error displays, and a trimmed input over `MAX_ENCODED_LEN`
//! is `TooLong`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::cursor::{Cursor, CursorError, EPOCH_MAX, MAX_ENCODED_LEN, MAX_ENTRIES};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let trimmed = text.trim_ascii();
    let cursor = match Cursor::decode(text) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if trimmed.len() > MAX_ENCODED_LEN {
                assert!(matches!(e, CursorError::TooLong { .. }), "{e:?}");
            }
            return;
        }
    };
    assert!(trimmed.len() <= MAX_ENCODED_LEN);
    assert_eq!(cursor.is_empty(), trimmed.is_empty(), "{text:?}");
    assert!(cursor.len() <= MAX_ENTRIES);

    let encoded = cursor.encode();
    assert_eq!(cursor.encoded_len(), encoded.len());
    let mut appended = b"id: ".to_vec();
    cursor.encode_into(&mut appended);
    assert_eq!(&appended[4..], encoded.as_bytes());
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/-~,".contains(&b)),
        "{encoded:?} holds a byte outside the alphabet"
    );
    assert!(encoded.len() <= trimmed.len());

    let back = Cursor::decode(&encoded).expect("an encoded cursor decodes");
    assert_eq!(back, cursor, "round trip of {encoded:?}");
    assert_eq!(back.encode(), encoded);

    // Each entry, as the text form lists them.
    if !encoded.is_empty() {
        let entries: Vec<&str> = encoded.split(',').collect();
        assert_eq!(entries.len(), cursor.len());
        for entry in entries {
            let fields: Vec<&str> = entry.split('~').collect();
            let [channel, epoch, seq] = fields[..] else {
                panic!("entry {entry:?} is not three fields");
            };
            assert!(
                relay::names::validate_channel(channel).is_ok(),
                "{channel:?}"
            );
            assert!(
                (1..=EPOCH_MAX).contains(&epoch.len())
                    && epoch.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{epoch:?}"
            );
            let seq: u64 = seq.parse().expect("seq is decimal");
            assert_eq!(cursor.get(channel), Some((epoch, seq)));
        }
    }
});
