//! `relay::query::{query_pairs, percent_decode, percent_decode_query_component}` on arbitrary
//! strings: a request's path segments and query string. Non-UTF-8 input is skipped (the codec
//! hands these a `&str` target).
//!
//! Asserts what the module and function docs promise:
//! * output is never longer than input, and is what a byte-at-a-time model of RFC 3986
//!   decoding gives (`%XX` with two hex digits, `+` as a space only in query components; a `%`
//!   without two hex digits is `BadEscape` at that `%`; bytes that are not UTF-8 are `NotUtf8`);
//! * text without `%` (and without `+`, for query components) passes through unchanged;
//! * `query_pairs` yields one item per non-empty `&`-separated segment, in order, splitting at
//!   the first `=` (a key without `=` has value ""), an error on one pair not stopping the
//!   rest, and a `BadEscape` offset pointing at a `%` of the whole query;
//! * escaping every byte of a decoded string as `%XX` decodes back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::query::{percent_decode, percent_decode_query_component, query_pairs, QueryError};

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Byte-at-a-time reference decoder.
fn model(s: &str, plus_is_space: bool) -> Result<String, QueryError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match (
                b.get(i + 1).and_then(|&x| hex(x)),
                b.get(i + 2).and_then(|&x| hex(x)),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 3;
                }
                _ => return Err(QueryError::BadEscape { at: i }),
            },
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            x => {
                out.push(x);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

fn check_decode(s: &str, plus_is_space: bool) {
    let got = if plus_is_space {
        percent_decode_query_component(s)
    } else {
        percent_decode(s)
    };
    assert_eq!(
        got,
        model(s, plus_is_space),
        "{s:?} plus_is_space={plus_is_space}"
    );
    match &got {
        Ok(out) => {
            assert!(out.len() <= s.len(), "output longer than input");
            if !s.contains('%') && !(plus_is_space && s.contains('+')) {
                assert_eq!(out, s, "text without escapes must pass through");
            }
            // Escaping every byte decodes back.
            let escaped: String = out.bytes().map(|b| format!("%{b:02X}")).collect();
            assert_eq!(percent_decode(&escaped).as_deref(), Ok(out.as_str()));
            assert_eq!(
                percent_decode_query_component(&escaped).as_deref(),
                Ok(out.as_str())
            );
        }
        Err(QueryError::BadEscape { at }) => assert_eq!(s.as_bytes().get(*at), Some(&b'%')),
        Err(QueryError::NotUtf8) => assert!(s.contains('%'), "only escapes can make non-UTF-8"),
    }
    if let Err(e) = &got {
        assert!(!e.to_string().is_empty());
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(s) = std::str::from_utf8(bytes) else {
        return;
    };
    check_decode(s, false);
    check_decode(s, true);
    if !s.contains('+') {
        assert_eq!(percent_decode(s), percent_decode_query_component(s));
    }

    // query_pairs against the documented splitting.
    let got: Vec<_> = query_pairs(s).collect();
    let mut expected = Vec::new();
    let mut offset = 0;
    for segment in s.split('&') {
        let start = offset;
        offset += segment.len() + 1;
        if segment.is_empty() {
            continue;
        }
        let (key, value, value_start) = match segment.split_once('=') {
            Some((k, v)) => (k, v, start + k.len() + 1),
            None => (segment, "", start + segment.len()),
        };
        let shift = |e: QueryError, by: usize| match e {
            QueryError::BadEscape { at } => QueryError::BadEscape { at: at + by },
            other => other,
        };
        expected.push(model(key, true).map_err(|e| shift(e, start)).and_then(|k| {
            model(value, true)
                .map(|v| (k, v))
                .map_err(|e| shift(e, value_start))
        }));
    }
    assert_eq!(got, expected, "query_pairs({s:?})");
    for item in &got {
        match item {
            Ok((k, v)) => assert!(k.len() + v.len() <= s.len()),
            Err(QueryError::BadEscape { at }) => assert_eq!(s.as_bytes().get(*at), Some(&b'%')),
            Err(QueryError::NotUtf8) => {}
        }
    }
});
