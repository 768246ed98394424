//! `relay::ws::codec::FrameReader` (client-frame parser and message reassembler) over
//! arbitrary bytes fed in arbitrary pieces, as the connection loop does: append what arrived to
//! the read buffer, call `read`, drain what it consumed, repeat while it returns a message.
//!
//! Input: byte 0 chooses the pieces (see `common::pieces`); of its upper bits, bit 0 picks the
//! default `Limits` or the unit test's tight ones (16-byte frames, 24-byte messages).
//!
//! Asserts:
//! * `consumed` <= the buffer offered;
//! * `Partial` means "nothing more to do until more bytes arrive": calling again on what is
//!   left returns `(0, Partial)`;
//! * fed in pieces, the reader returns the same messages and the same error as fed everything
//!   at once, and (without an error) consumes the same bytes;
//! * messages keep the documented shapes: text is UTF-8; ping and pong payloads at most 125
//!   bytes; a close has no payload or a wire-valid code (1000-1003, 1007-1014, 3000-4999) and a
//!   UTF-8 reason of at most 123 bytes; text and binary at most `max_message_bytes`;
//! * errors map to close codes 1002, 1007 or 1009 with a reason of at most 123 bytes.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use relay::ws::codec::{Decoded, FrameReader, Limits, Message, ProtocolError};

#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Message>,
    error: Option<ProtocolError>,
    /// Bytes consumed in all, when the stream did not fail (an error does not say how many
    /// bytes of whole fragments before the bad frame its call had absorbed, and after it the
    /// stream is dead anyway).
    consumed: Option<usize>,
}

fn feed(limits: Limits, pieces: &[&[u8]]) -> Outcome {
    let mut reader = FrameReader::new(limits);
    let mut buf: Vec<u8> = Vec::new();
    let mut messages = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match reader.read(&buf) {
                Ok((n, decoded)) => {
                    assert!(n <= buf.len(), "consumed {n} of {}", buf.len());
                    buf.drain(..n);
                    consumed += n;
                    match decoded {
                        Decoded::Message(m) => {
                            check_message(&m, &limits);
                            messages.push(m);
                        }
                        Decoded::Partial => {
                            // Nothing more to do until more bytes arrive.
                            match reader.read(&buf) {
                                Ok((0, Decoded::Partial)) => {}
                                other => panic!("read after Partial gave {other:?}"),
                            }
                            break;
                        }
                    }
                }
                Err(e) => {
                    check_error(&e);
                    return Outcome {
                        messages,
                        error: Some(e),
                        consumed: None,
                    };
                }
            }
        }
    }
    Outcome {
        messages,
        error: None,
        consumed: Some(consumed),
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn check_message(m: &Message, limits: &Limits) {
    match m {
        Message::Text(t) => {
            assert!(std::str::from_utf8(t).is_ok(), "text message not UTF-8");
            assert!(t.len() <= limits.max_message_bytes);
        }
        Message::Binary(b) => assert!(b.len() <= limits.max_message_bytes),
        Message::Ping(p) | Message::Pong(p) => {
            assert!(p.len() <= 125, "control payload {}", p.len())
        }
        Message::Close(None) => {}
        Message::Close(Some((code, reason))) => {
            assert!(valid_close_code(*code), "close code {code}");
            assert!(
                reason.len() <= 123,
                "close reason of {} bytes",
                reason.len()
            );
        }
    }
}

fn check_error(e: &ProtocolError) {
    assert!(matches!(e.close_code(), 1002 | 1007 | 1009), "{e:?}");
    assert!(!e.reason().is_empty() && e.reason().len() <= 123);
    assert!(!e.to_string().is_empty());
}

fuzz_target!(|input: &[u8]| {
    let Some((flags, payload, pieces)) = common::pieces(input) else {
        return;
    };
    let limits = if flags & 1 != 0 {
        Limits {
            max_frame_bytes: 16,
            max_message_bytes: 24,
        }
    } else {
        Limits::default()
    };
    let whole = feed(limits, &[payload]);
    let split = feed(limits, &pieces);
    assert_eq!(
        split,
        whole,
        "pieces {:?}",
        pieces.iter().map(|p| p.len()).collect::<Vec<_>>()
    );
});
