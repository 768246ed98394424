//! `relay::http::codec::BodyDecoder`, chunked and `Content-Length`, over arbitrary bytes fed
//! in arbitrary pieces (a request body as it arrives, with whatever is pipelined after it).
//!
//! Input: byte 0 chooses the pieces (see `common::pieces`); of its upper bits, bit 0 picks
//! chunked or `Content-Length` and bit 1 the default or the unit test's tight `Limits`. A
//! `Content-Length` body takes its length from the next two payload bytes (big-endian), or
//! with bit 2 set a length over `max_body_bytes`.
//!
//! Asserts what the doc comments promise:
//! * `new` refuses a `Content-Length` over `max_body_bytes` (`BodyTooLarge`) and takes the rest;
//! * "input can be fed in arbitrary pieces": fed piece by piece, the decoder ends exactly as fed
//!   the whole input at once: same decoded bytes, same `done`, same error, and (without an
//!   error) the same bytes consumed;
//! * "it never consumes past the end of the body": `consumed` <= the input offered, and a
//!   `Content-Length` body consumes exactly its length and decodes to exactly those bytes;
//! * an unfinished decoder takes every byte offered (what `decode_bytewise` in the unit tests
//!   asserts), so the caller never has to keep bytes for it;
//! * `is_done()` agrees with `done`; once done, it stays done and takes nothing more;
//! * after an error the decoder is unusable (further calls fail);
//! * at most `max_body_bytes` decoded, and never more than consumed;
//! * `take_whole`: `Some(length)` exactly when the whole `Content-Length` body is at hand (and
//!   the decoder is then done), `None` for a chunked body.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use relay::http::codec::{BodyDecoder, BodyKind, HttpError, Limits};

const TIGHT: Limits = Limits {
    max_header_bytes: 48,
    max_headers: 3,
    max_body_bytes: 32,
};

/// What feeding a decoder ended with.
#[derive(Debug, PartialEq)]
struct Outcome {
    decoded: Vec<u8>,
    /// Bytes consumed in all; `None` after an error, which does not say how many bytes of
    /// the failing call went before the bad one (the stream is dead by then anyway).
    consumed: Option<usize>,
    done: bool,
    error: Option<HttpError>,
}

/// Feeds `pieces` as a connection would: every piece offered once, and whatever the decoder
/// consumed removed; stops at done or at an error.
fn feed(kind: &BodyKind, limits: &Limits, pieces: &[&[u8]]) -> Outcome {
    let mut dec = BodyDecoder::new(kind, limits).expect("the length was checked by the caller");
    let mut decoded = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        let before = decoded.len();
        match dec.decode(piece, &mut decoded) {
            Ok((n, done)) => {
                assert!(
                    n <= piece.len(),
                    "consumed {n} of a {}-byte piece",
                    piece.len()
                );
                assert!(decoded.len() - before <= n, "decoded more than consumed");
                assert_eq!(dec.is_done(), done);
                consumed += n;
                if done {
                    // Done stays done and takes nothing more (the rest is the next request's).
                    let mut more = Vec::new();
                    assert_eq!(dec.decode(b"0\r\n\r\nxyz", &mut more), Ok((0, true)));
                    assert!(more.is_empty());
                    return Outcome {
                        decoded,
                        consumed: Some(consumed),
                        done,
                        error: None,
                    };
                }
                assert_eq!(
                    n,
                    piece.len(),
                    "an unfinished decoder must take every byte offered"
                );
            }
            Err(e) => {
                assert!(!dec.is_done());
                // Unusable after an error.
                assert!(dec.decode(b"0\r\n\r\n", &mut Vec::new()).is_err());
                return Outcome {
                    decoded,
                    consumed: None,
                    done: false,
                    error: Some(e),
                };
            }
        }
    }
    Outcome {
        decoded,
        consumed: Some(consumed),
        done: false,
        error: None,
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((flags, payload, pieces)) = common::pieces(input) else {
        return;
    };
    let chunked = flags & 1 != 0;
    let limits = if flags & 2 != 0 {
        TIGHT
    } else {
        Limits::default()
    };
    let max_body = limits.max_body_bytes as u64;

    let kind = if chunked {
        BodyKind::Chunked
    } else {
        let [hi, lo] = match payload {
            [hi, lo, ..] => [*hi, *lo],
            _ => return,
        };
        let n = u64::from(u16::from_be_bytes([hi, lo]));
        let length = if flags & 4 != 0 {
            max_body + 1 + n
        } else {
            n % (max_body + 1)
        };
        BodyKind::ContentLength(length)
    };

    match BodyDecoder::new(&kind, &limits) {
        Err(HttpError::BodyTooLarge { size, max }) => {
            assert_eq!(kind, BodyKind::ContentLength(size));
            assert!(size > max_body && max == limits.max_body_bytes);
            return;
        }
        Err(e) => panic!("new refused {kind:?} with {e:?}"),
        Ok(_) => {
            if let BodyKind::ContentLength(n) = kind {
                assert!(n <= max_body, "a length over the limit was taken");
            }
        }
    }

    let whole = feed(&kind, &limits, &[payload]);
    let split = feed(&kind, &limits, &pieces);
    assert_eq!(
        split,
        whole,
        "pieces {:?}",
        pieces.iter().map(|p| p.len()).collect::<Vec<_>>()
    );

    if let Some(consumed) = whole.consumed {
        assert!(consumed <= payload.len());
        assert!(whole.decoded.len() <= consumed);
    }
    assert!(
        whole.decoded.len() as u64 <= max_body,
        "decoded past max_body_bytes"
    );
    if let Some(e) = &whole.error {
        assert!(matches!(e.status(), 400 | 413 | 431), "{e:?}");
    }

    match kind {
        BodyKind::ContentLength(n) => {
            let n = usize::try_from(n).expect("at most max_body_bytes");
            assert_eq!(
                whole.error, None,
                "a Content-Length body cannot be malformed"
            );
            if payload.len() >= n {
                assert!(whole.done);
                assert_eq!(
                    whole.consumed,
                    Some(n),
                    "a Content-Length body consumed past its end"
                );
                assert_eq!(whole.decoded, &payload[..n]);
            } else {
                assert!(!whole.done);
                assert_eq!(whole.decoded, payload);
            }
            for available in [payload.len(), n, n.saturating_sub(1)] {
                let mut dec = BodyDecoder::new(&kind, &limits).expect("checked above");
                match dec.take_whole(available) {
                    Some(got) => {
                        assert!(n <= available);
                        assert_eq!(got, n);
                        assert!(dec.is_done());
                    }
                    None => {
                        assert!(n > available);
                        assert!(!dec.is_done());
                    }
                }
            }
        }
        BodyKind::Chunked => {
            let mut dec = BodyDecoder::new(&kind, &limits).expect("chunked is always taken");
            assert_eq!(dec.take_whole(payload.len()), None);
            if whole.done {
                // The body ends in its final CRLF.
                let consumed = whole.consumed.expect("done without an error");
                assert!(payload[..consumed].ends_with(b"\r\n"));
            }
        }
        BodyKind::None => unreachable!(),
    }
});
