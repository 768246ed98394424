//! HTTP/1.1 response heads, pure functions over bytes (no I/O).
//!
//! Owns reading the few things the generator needs from a response head (status, body length,
//! whether the server will close, the WebSocket accept key, whether it is an event stream) with
//! httparse underneath. A head that is not complete yet is `Ok(None)`. Must never: accept a
//! head above [`MAX_HEAD_BYTES`] or a body length it cannot frame (no chunked responses from
//! relay's publish API, so they are refused rather than guessed at).

use std::fmt;

/// The largest response head accepted; relay's are a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head, up to and including the blank line.
    pub head_len: usize,
    /// `Content-Length`; `None` when absent (a 101 or an event stream).
    pub content_length: Option<usize>,
    /// `Connection: close`.
    pub close: bool,
    /// `Sec-WebSocket-Accept` equals the value for our fixed key.
    pub accept_ok: bool,
    /// `Content-Type: text/event-stream`.
    pub event_stream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    Malformed(String),
    TooLarge { size: usize, max: usize },
    Chunked,
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Malformed(why) => write!(f, "malformed HTTP response head: {why}"),
            HeadError::TooLarge { size, max } => {
                write!(f, "HTTP response head above {max} bytes ({size} buffered)")
            }
            HeadError::Chunked => write!(f, "chunked HTTP responses are not supported here"),
        }
    }
}

impl std::error::Error for HeadError {}

/// Parses the response head at the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge {
                    size: buf.len(),
                    max: MAX_HEAD_BYTES,
                });
            }
            return Ok(None);
        }
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let status = response
        .code
        .ok_or_else(|| HeadError::Malformed("no status".into()))?;
    let mut head = ResponseHead {
        status,
        head_len,
        content_length: None,
        close: false,
        accept_ok: false,
        event_stream: false,
    };
    for h in response.headers.iter() {
        let value = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(value)
                .map_err(|_| HeadError::Malformed("content-length is not text".into()))?;
            head.content_length = Some(
                text.trim()
                    .parse()
                    .map_err(|_| HeadError::Malformed(format!("content-length {text:?}")))?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::Chunked);
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.close |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
            head.accept_ok = value.trim_ascii() == crate::wsframe::EXPECTED_ACCEPT.as_bytes();
        } else if h.name.eq_ignore_ascii_case("content-type") {
            head.event_stream = value
                .trim_ascii()
                .to_ascii_lowercase()
                .starts_with(b"text/event-stream");
        }
    }
    Ok(Some(head))
}

/// A short, printable excerpt of a response body for error messages.
pub fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if body.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_reply() {
        let buf = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"results\"}XTRA";
        let head = parse_head(buf).unwrap().unwrap();
        assert_eq!(head.status, 202);
        assert_eq!(head.content_length, Some(12));
        assert!(!head.close);
        assert_eq!(&buf[head.head_len..head.head_len + 11], b"{\"results\"}");
        for cut in 0..head.head_len {
            assert_eq!(parse_head(&buf[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn upgrade_and_stream_heads() {
        let buf = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let head = parse_head(buf).unwrap().unwrap();
        assert_eq!(head.status, 101);
        assert!(head.accept_ok);
        assert_eq!(head.content_length, None);
        let buf = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\nretry: 2000\n\n";
        let head = parse_head(buf).unwrap().unwrap();
        assert!(head.event_stream);
        assert!(head.close);
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Chunked)
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_head(b"garbage\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 1));
        assert!(matches!(parse_head(&big), Err(HeadError::TooLarge { .. })));
        assert_eq!(excerpt(b"a\nb"), "a b");
        assert!(excerpt(&[b'z'; 400]).ends_with('…'));
    }
}
