//! The client side of RFC 6455 framing, pure functions over bytes (no I/O).
//!
//! Owns: the upgrade request, masked client frames (every client frame must be masked,
//! section 5.3), the server frame header parser with 7-, 16- and 64-bit lengths, and the close
//! payload. A header that is not complete yet is `Ok(None)`, not an error. Must never: accept a
//! masked server frame, a reserved bit, an unknown opcode or a frame above the caller's bound;
//! those are typed [`FrameError`]s so a bad peer closes only its own connection.

use std::fmt;

/// The key every generator connection sends. The nonce only guards against caches replaying an
/// upgrade (section 10.3), which is no concern for a load generator, and a fixed key lets the
/// accept value be checked without hashing per connection.
pub const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `base64(sha1(CLIENT_KEY + GUID))`, the worked example of RFC 6455 section 1.3.
pub const EXPECTED_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// One parsed server frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub opcode: u8,
    pub fin: bool,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHead {
    /// Header plus payload.
    #[inline]
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// A server frame the generator refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Servers must not mask (RFC 6455 section 5.1).
    Masked,
    /// RSV1-3 set without a negotiated extension.
    Reserved(u8),
    UnknownOpcode(u8),
    /// Control frames carry at most 125 bytes and are never fragmented (section 5.5).
    BadControl {
        opcode: u8,
        len: usize,
        fin: bool,
    },
    /// The payload is above what this connection accepts.
    TooLarge {
        size: u64,
        max: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Masked => write!(f, "the server sent a masked frame"),
            FrameError::Reserved(b) => write!(f, "reserved bits set in frame byte 0x{b:02x}"),
            FrameError::UnknownOpcode(op) => write!(f, "unknown opcode 0x{op:x}"),
            FrameError::BadControl { opcode, len, fin } => write!(
                f,
                "control frame 0x{opcode:x} of {len} bytes (fin={fin}) breaks RFC 6455 5.5"
            ),
            FrameError::TooLarge { size, max } => {
                write!(f, "frame of {size} bytes is above the {max}-byte bound")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses the header at the start of `buf`. `Ok(None)`: not all header bytes are here yet.
/// The payload may still be incomplete: compare `total_len()` with what is buffered.
#[inline]
pub fn parse_head(buf: &[u8], max_payload: usize) -> Result<Option<FrameHead>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved(b0));
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0f;
    let (header_len, len) = match b1 & 0x7f {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return Ok(None);
            };
            (4, u64::from(u16::from_be_bytes([ext[0], ext[1]])))
        }
        127 => {
            let Some(ext) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(ext);
            (10, u64::from_be_bytes(bytes))
        }
        n => (2, u64::from(n)),
    };
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if len > 125 || !fin {
                return Err(FrameError::BadControl {
                    opcode: op,
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                    fin,
                });
            }
        }
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge {
            size: len,
            max: max_payload,
        });
    }
    Ok(Some(FrameHead {
        opcode: op,
        fin,
        header_len,
        // Bounded by `max_payload` above, so it fits.
        payload_len: len as usize,
    }))
}

/// The status code of a close frame's payload (`None` when it carries none).
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// A cheap per-connection source of masking keys (xorshift32). Masks only have to differ from
/// frame to frame; they protect intermediaries, not secrets.
#[derive(Debug, Clone)]
pub struct Masker {
    state: u32,
}

impl Masker {
    pub fn new(seed: u64) -> Masker {
        let mixed = (seed ^ (seed >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Masker {
            state: (mixed >> 32) as u32 | 1,
        }
    }

    #[inline]
    pub fn next_key(&mut self) -> [u8; 4] {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        x.to_ne_bytes()
    }
}

/// Appends one complete masked client frame (FIN set) carrying `payload`.
pub fn write_client_frame(out: &mut Vec<u8>, op: u8, payload: &[u8], key: [u8; 4]) {
    out.push(0x80 | (op & 0x0f));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key);
}

/// A masked close frame with `code`.
pub fn write_close(out: &mut Vec<u8>, code: u16, key: [u8; 4]) {
    write_client_frame(out, opcode::CLOSE, &code.to_be_bytes(), key);
}

/// XORs `buf` with the repeating `key` (its first byte at `buf[0]`).
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends the upgrade request for `path` (with `Authorization: Bearer token` when given).
pub fn write_upgrade_request(out: &mut Vec<u8>, host: &str, path: &str, token: Option<&str>) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    out.extend_from_slice(CLIENT_KEY.as_bytes());
    out.extend_from_slice(b"\r\n");
    crate::payload::write_bearer(out, token);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A server frame (unmasked) as relay sends it; also used by the subscriber's tests.
    pub(crate) fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | op];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= 65535 {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn header_lengths_7_16_and_64_bit() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'a'; len];
            let frame = server_frame(opcode::TEXT, &payload);
            let head = parse_head(&frame, 1 << 20).unwrap().unwrap();
            assert_eq!(head.payload_len, len);
            assert_eq!(head.total_len(), frame.len());
            let expect_header = if len < 126 {
                2
            } else if len <= 65535 {
                4
            } else {
                10
            };
            assert_eq!(head.header_len, expect_header, "len {len}");
            assert!(head.fin);
            assert_eq!(head.opcode, opcode::TEXT);
        }
    }

    #[test]
    fn partial_headers_are_not_errors() {
        let frame = server_frame(opcode::TEXT, &vec![b'x'; 70000]);
        for cut in 0..10 {
            assert_eq!(parse_head(&frame[..cut], 1 << 20), Ok(None), "cut {cut}");
        }
        assert!(parse_head(&frame[..10], 1 << 20).unwrap().is_some());
        let frame = server_frame(opcode::TEXT, &[b'x'; 300]);
        assert_eq!(parse_head(&frame[..3], 1 << 20), Ok(None));
        // Header complete, payload not: the head is returned and the caller waits.
        let head = parse_head(&frame[..50], 1 << 20).unwrap().unwrap();
        assert!(head.total_len() > 50);
    }

    #[test]
    fn refuses_what_a_server_must_not_send() {
        assert_eq!(parse_head(&[0x81, 0x85], 100), Err(FrameError::Masked));
        assert_eq!(
            parse_head(&[0xC1, 0x00], 100),
            Err(FrameError::Reserved(0xC1))
        );
        assert_eq!(
            parse_head(&[0x83, 0x00], 100),
            Err(FrameError::UnknownOpcode(3))
        );
        assert!(matches!(
            parse_head(&[0x09, 0x00], 100),
            Err(FrameError::BadControl { fin: false, .. })
        ));
        assert!(matches!(
            parse_head(&[0x89, 126, 0, 200], 1000),
            Err(FrameError::BadControl { len: 200, .. })
        ));
        assert_eq!(
            parse_head(&server_frame(opcode::TEXT, &[0; 200]), 100),
            Err(FrameError::TooLarge {
                size: 200,
                max: 100
            })
        );
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            parse_head(&huge, 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn client_frames_are_masked_and_round_trip() {
        let mut masker = Masker::new(42);
        for len in [0usize, 5, 125, 126, 1000, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let key = masker.next_key();
            let mut out = Vec::new();
            write_client_frame(&mut out, opcode::TEXT, &payload, key);
            assert_eq!(out[0], 0x81);
            assert_eq!(out[1] & 0x80, 0x80, "mask bit");
            let (header, len_field) = match out[1] & 0x7f {
                126 => (4, u16::from_be_bytes([out[2], out[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, n as usize),
            };
            assert_eq!(len_field, len);
            assert_eq!(&out[header..header + 4], &key);
            let mut body = out[header + 4..].to_vec();
            apply_mask(&mut body, key);
            assert_eq!(body, payload);
        }
        let a = masker.next_key();
        let b = masker.next_key();
        assert_ne!(a, b);
    }

    #[test]
    fn close_frames() {
        let mut out = Vec::new();
        write_close(&mut out, 1000, [1, 2, 3, 4]);
        assert_eq!(out.len(), 8);
        let mut payload = out[6..].to_vec();
        apply_mask(&mut payload, [1, 2, 3, 4]);
        assert_eq!(close_code(&payload), Some(1000));
        assert_eq!(close_code(&[]), None);
        assert_eq!(close_code(&[0x03, 0xF5, b'x']), Some(1013));
    }

    #[test]
    fn upgrade_request_shape() {
        let mut out = Vec::new();
        write_upgrade_request(
            &mut out,
            "127.0.0.1:8004",
            "/api/v1/relay/ws",
            Some("t.k.n"),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("GET /api/v1/relay/ws HTTP/1.1\r\nHost: 127.0.0.1:8004\r\n"));
        assert!(text.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        assert!(text.contains("Authorization: Bearer t.k.n\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
