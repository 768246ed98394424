//! `relay::http::codec::parse_head` / `parse_head_reusing` over arbitrary bytes: what a client
//! sends on a fresh connection (or after a pipelined request).
//!
//! Asserts, with the default `Limits` (and the unit test's tight ones, to reach the limits with
//! short inputs):
//! * `parse_head_reusing` into a spent head's buffers returns exactly what `parse_head` does;
//! * `Partial` only while the buffer is shorter than `max_header_bytes` (module docs: a longer
//!   buffer without a complete head is rejected);
//! * a `Complete` head: `head_len` <= input length and <= `max_header_bytes`, and the head ends
//!   in its blank line (`\n`); parsing just `input[..head_len]` gives the same head (only the
//!   first `head_len` bytes are used), and a shorter prefix of it is `Partial`, never an error
//!   (incomplete input is `Ok(Partial)`); `path()`/`query()` split `target()` at the first `?`;
//!   the target is an absolute path (or `*` for OPTIONS); HTTP/1.0 or 1.1; at most
//!   `max_headers` headers, names lower-cased; `Expect: 100-continue` and chunked framing only
//!   on HTTP/1.1;
//! * errors map to the documented statuses;
//! * `ws::codec::accept_key` on any complete head does not panic, and its key is 28 bytes of
//!   base64 (a SHA-1).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::http::codec::{
    parse_head, parse_head_reusing, BodyKind, HeadBuffers, HttpError, Limits, Method, Parsed,
    RequestHead,
};

const SPENT: &[u8] = b"POST /api/v1/relay/publish?x=1 HTTP/1.1\r\nHost: relay.example\r\n\
Content-Type: application/json\r\nContent-Length: 2\r\nX-A: 1\r\nX-B: 2\r\n\r\n";

fn spent_buffers() -> HeadBuffers {
    match parse_head(SPENT, &Limits::default()) {
        Ok(Parsed::Complete(head)) => head.into_buffers(),
        other => panic!("the spent head must parse: {other:?}"),
    }
}

fn check(data: &[u8], limits: &Limits) {
    let fresh = parse_head(data, limits);
    let reused = parse_head_reusing(data, limits, &mut spent_buffers());
    assert_eq!(fresh, reused, "parse_head_reusing differs from parse_head");

    match fresh {
        Ok(Parsed::Partial) => {
            assert!(
                data.len() < limits.max_header_bytes,
                "Partial past the head limit"
            );
        }
        Ok(Parsed::Complete(head)) => check_head(data, limits, &head),
        Err(e) => check_error(&e, limits),
    }
}

fn check_head(data: &[u8], limits: &Limits, head: &RequestHead) {
    let n = head.head_len;
    assert!(
        n > 0 && n <= data.len(),
        "head_len {n} of {} bytes",
        data.len()
    );
    assert!(n <= limits.max_header_bytes, "head_len {n} over the limit");
    assert_eq!(data[n - 1], b'\n', "the head must end in its blank line");

    // Only the first `head_len` bytes are used.
    match parse_head(&data[..n], limits) {
        Ok(Parsed::Complete(again)) => assert_eq!(&again, head, "head changes without its tail"),
        other => panic!("the head alone parses differently: {other:?}"),
    }
    // Every shorter prefix of a valid head is incomplete input: Partial, never an error. All of
    // them for short heads; for long ones the last 64 and a spread of the rest.
    let prefixes: Vec<usize> = if n <= 256 {
        (0..n).collect()
    } else {
        (0..n).step_by(n / 64 + 1).chain(n - 64..n).collect()
    };
    for k in prefixes {
        match parse_head(&data[..k], limits) {
            Ok(Parsed::Partial) => {}
            other => panic!("prefix of {k} of a {n}-byte valid head is not Partial: {other:?}"),
        }
    }

    let target = head.target();
    match head.query() {
        Some(q) => assert_eq!(format!("{}?{q}", head.path()), target),
        None => {
            assert_eq!(head.path(), target);
            assert!(!target.contains('?'));
        }
    }
    assert!(!head.path().contains('?'));
    assert!(
        target.starts_with('/') || (target == "*" && head.method == Method::Options),
        "target {target:?}"
    );
    assert!(head.minor_version <= 1);
    assert!(head.header_count() <= limits.max_headers);
    assert_eq!(head.headers().count(), head.header_count());
    for (name, value) in head.headers() {
        assert!(!name.is_empty(), "empty header name");
        assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "name {name:?} not lower-cased"
        );
        assert_eq!(head.header(name), head.headers_all(name).next());
        assert!(head.headers_all(name).any(|v| v == value));
    }
    if head.expect_continue {
        assert_eq!(head.minor_version, 1, "100-continue on HTTP/1.0");
    }
    match head.body {
        BodyKind::Chunked => assert_eq!(head.minor_version, 1, "chunked on HTTP/1.0"),
        BodyKind::ContentLength(_) | BodyKind::None => {}
    }
    assert_eq!(Method::from_token(head.method.as_str()), head.method);

    if let Ok(key) = relay::ws::codec::accept_key(head) {
        assert_eq!(key.len(), 28, "accept key {key:?}");
        assert!(key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='));
    }
}

fn check_error(e: &HttpError, limits: &Limits) {
    let status = e.status();
    assert!(
        matches!(status, 400 | 413 | 431 | 501 | 505),
        "status {status}"
    );
    assert!(!e.code().is_empty());
    assert!(!e.message().is_empty());
    match *e {
        HttpError::HeadersTooLarge { max, .. } => assert_eq!(max, limits.max_header_bytes),
        HttpError::TooManyHeaders { max } => assert_eq!(max, limits.max_headers),
        HttpError::BodyTooLarge { .. } => panic!("a head parse never judges the body size"),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &Limits::default());
    // The unit test's tight limits, so short inputs reach the head and header-count limits.
    check(
        data,
        &Limits {
            max_header_bytes: 48,
            max_headers: 3,
            max_body_bytes: 32,
        },
    );
});
