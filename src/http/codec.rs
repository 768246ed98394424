//! HTTP/1.1 request codec: pure functions over `&[u8]`, no I/O.
//!
//! Owns:
//! * request head parsing ([`parse_head`]): request line, header fields, and the framing
//!   decisions derived from them (body kind, keep-alive, `Expect: 100-continue`);
//! * request body framing ([`BodyDecoder`]): `Content-Length` and `chunked`, incremental, so
//!   input may arrive in pieces as small as one byte;
//! * response serialisation ([`write_response`], [`write_error_json`]).
//!
//! Must never:
//! * perform I/O or block: the connection loop owns the socket and the read buffer, and calls
//!   in here with whatever bytes it has. Incomplete input is `Ok(Parsed::Partial)` or
//!   `Ok((consumed, false))`, never an error;
//! * allocate per header: a [`RequestHead`] holds its headers in one buffer, and httparse's
//!   header slots live on the stack unless `max_headers` exceeds [`INLINE_HEADER_SLOTS`];
//! * panic on anything a peer sends: no `unwrap`, `expect` or unchecked indexing outside tests
//!   (enforced by the clippy lints below).
//!
//! Limits (see [`Limits`]):
//! * the head must complete within `max_header_bytes`, counted from the start of the buffer;
//!   a longer buffer without a complete head is rejected even while still partial, so a peer
//!   cannot make the caller buffer an unbounded head;
//! * at most `max_headers` header fields;
//! * at most `max_body_bytes` of decoded body; a chunked body is rejected as soon as a chunk
//!   size line would take it over, before the data arrives;
//! * chunk extensions (ignored) and trailers (skipped) are each bounded by `max_header_bytes`,
//!   so framing overhead cannot keep a connection busy forever;
//! * chunk sizes have at most 16 hex digits, so they always fit a `u64`.
//!
//! Deliberately out of scope: absolute-form and authority-form request targets (relay is not a
//! proxy), percent-decoding (routing decides what `%2F` means), transfer codings other than a
//! single `chunked`, and obsolete line folding (httparse rejects it in requests).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt;
use std::mem::MaybeUninit;

/// httparse needs caller-provided header slots. This many live on the stack; only a
/// configuration with a larger `max_headers` pays for one heap allocation per parse call.
pub const INLINE_HEADER_SLOTS: usize = 64;

/// Bounds applied to every request. The defaults are a reasonable standalone configuration;
/// relay's config normally supplies its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of the request head, request line through the final CRLFCRLF. Also bounds
    /// chunked trailers and, separately, the chunk extensions of one body.
    pub max_header_bytes: usize,
    /// Maximum number of header fields in the head.
    pub max_headers: usize,
    /// Maximum decoded body size.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Result of parsing input that may not have fully arrived yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    Complete(T),
    /// More bytes are needed; call again with the same buffer once more have been appended.
    Partial,
}

/// Request method. Methods are case-sensitive (RFC 9110 §9.1), so `get` is `Other("get")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Other(String),
}

impl Method {
    /// Maps a method token as it appears on the request line.
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No `Content-Length` and no `Transfer-Encoding`: a request without these has no body
    /// (RFC 9112 §6.3), unlike a response which would run to connection close.
    None,
    ContentLength(u64),
    Chunked,
}

/// A parsed request head. Owns its data so the caller can drain the read buffer right away,
/// in two buffers whatever the number of headers: the request-target, and one with every
/// header's lower-cased name and value back to back (found through `fields`, inline for up to
/// [`INLINE_FIELDS`] headers). A publish is one request, so a connection hands the buffers of
/// one head to the next ([`HeadBuffers`]) rather than allocating them per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// Raw request-target as sent, e.g. `/api/v1/relay/channels/doc%2F1/history?since=3`.
    target: String,
    /// Length of the target's path: the bytes before the first `?`.
    path_len: usize,
    /// 0 or 1.
    pub minor_version: u8,
    /// Every header's name (lower-cased) then its value, back to back, in the order received.
    field_bytes: Vec<u8>,
    fields: smallvec::SmallVec<[FieldEnds; INLINE_FIELDS]>,
    /// Bytes of the buffer taken by the head, including the final CRLFCRLF; the body (or the
    /// next pipelined request) starts here.
    pub head_len: usize,
    pub body: BodyKind,
    /// HTTP/1.1: true unless `Connection: close`. HTTP/1.0: only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request. HTTP/1.0 requests never set it because a
    /// server must ignore that expectation from an HTTP/1.0 client (RFC 9110 §10.1.1).
    pub expect_continue: bool,
}

/// The two buffers of a spent [`RequestHead`], for [`parse_head_reusing`] to fill again.
#[derive(Debug, Default)]
pub struct HeadBuffers {
    target: String,
    field_bytes: Vec<u8>,
}

/// Headers whose positions a [`RequestHead`] keeps without an allocation of their own; a
/// publish from a typical client sends 4 to 10.
pub const INLINE_FIELDS: usize = 16;

/// Where one header ends in `field_bytes`: its name ends at `name`, its value at `value` (the
/// name starts where the previous header's value ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldEnds {
    name: u32,
    value: u32,
}

impl RequestHead {
    /// Builds a head from already-checked parts, as [`parse_head`] does: names are lower-cased
    /// here. `None` when the header text is larger than a head can be (4 GiB).
    fn from_parts<'a>(
        method: Method,
        target: &str,
        minor_version: u8,
        headers: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
        buffers: HeadBuffers,
    ) -> Option<RequestHead> {
        let total: usize = headers
            .clone()
            .map(|(name, value)| name.len() + value.len())
            .sum();
        u32::try_from(total).ok()?;
        let HeadBuffers {
            target: mut target_buf,
            mut field_bytes,
        } = buffers;
        target_buf.clear();
        target_buf.push_str(target);
        field_bytes.clear();
        field_bytes.reserve(total);
        let mut fields = smallvec::SmallVec::new();
        for (name, value) in headers {
            field_bytes.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
            let name_end = field_bytes.len() as u32;
            field_bytes.extend_from_slice(value);
            fields.push(FieldEnds {
                name: name_end,
                value: field_bytes.len() as u32,
            });
        }
        Some(RequestHead {
            method,
            target: target_buf,
            path_len: target.find('?').unwrap_or(target.len()),
            minor_version,
            field_bytes,
            fields,
            head_len: 0,
            body: BodyKind::None,
            keep_alive: true,
            expect_continue: false,
        })
    }

    /// A head as the codec would produce it, for tests of the layers above.
    #[cfg(test)]
    pub(crate) fn for_test(
        method: Method,
        minor_version: u8,
        target: &str,
        headers: &[(&str, &str)],
    ) -> RequestHead {
        let fields = headers.iter().map(|(n, v)| (*n, v.as_bytes()));
        match RequestHead::from_parts(
            method,
            target,
            minor_version,
            fields,
            HeadBuffers::default(),
        ) {
            Some(head) => head,
            None => unreachable!("test heads are small"),
        }
    }

    /// The head's buffers, for the next head of the connection to fill again.
    pub fn into_buffers(self) -> HeadBuffers {
        HeadBuffers {
            target: self.target,
            field_bytes: self.field_bytes,
        }
    }

    /// Raw request-target as sent, e.g. `/api/v1/relay/channels/doc%2F1/history?since=3`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Target before the first `?`, not percent-decoded.
    pub fn path(&self) -> &str {
        self.target.get(..self.path_len).unwrap_or(&self.target)
    }

    /// Target after the first `?`, raw. `None` when there is no `?` at all.
    pub fn query(&self) -> Option<&str> {
        self.target.get(self.path_len..)?.strip_prefix('?')
    }

    /// Every header as (lower-cased name, raw value), in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        // Names passed httparse's token check, so they are ASCII.
        self.raw_headers()
            .map(|(name, value)| (std::str::from_utf8(name).unwrap_or_default(), value))
    }

    /// Every header as (lower-cased name, raw value) bytes, walking `fields`.
    fn raw_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let bytes = &self.field_bytes;
        let mut start = 0usize;
        self.fields.iter().map(move |ends| {
            let (name_end, value_end) = (ends.name as usize, ends.value as usize);
            let name = bytes.get(start..name_end).unwrap_or_default();
            let value = bytes.get(name_end..value_end).unwrap_or_default();
            start = value_end;
            (name, value)
        })
    }

    /// How many header fields the request had.
    pub fn header_count(&self) -> usize {
        self.fields.len()
    }

    /// First value of the named header. Names are stored lower-cased; the comparison is
    /// case-insensitive anyway so a mixed-case literal at a call site cannot silently miss.
    pub fn header(&self, name_lowercase: &str) -> Option<&[u8]> {
        self.headers_all(name_lowercase).next()
    }

    /// First value of the named header, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of the named header, in order.
    pub fn headers_all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.raw_headers()
            .filter(move |(this, _)| this.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| value)
    }
}

/// A request the codec refuses. Every variant maps to the response the caller should send
/// before closing the connection: after any of these the byte stream cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Status 431. `size` is the head size when the blank line was seen, otherwise the bytes
    /// received so far (a lower bound). Chunked trailers over the limit report this too.
    HeadersTooLarge { size: usize, max: usize },
    /// Status 431.
    TooManyHeaders { max: usize },
    /// Status 413. For chunked bodies `size` is the total announced so far, not the final size.
    BodyTooLarge { size: u64, max: usize },
    /// Status 400. The message says what was wrong.
    Malformed(&'static str),
    /// Status 505.
    UnsupportedVersion,
    /// Status 501. Anything but a single, final `chunked` coding.
    UnsupportedTransferEncoding,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadersTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::Malformed(_) => 400,
            HttpError::UnsupportedVersion => 505,
            HttpError::UnsupportedTransferEncoding => 501,
        }
    }

    /// Machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::HeadersTooLarge { .. } | HttpError::TooManyHeaders { .. } => {
                "request_header_fields_too_large"
            }
            HttpError::BodyTooLarge { .. } => "payload_too_large",
            HttpError::Malformed(_) => "bad_request",
            HttpError::UnsupportedVersion => "http_version_not_supported",
            HttpError::UnsupportedTransferEncoding => "not_implemented",
        }
    }

    /// Human-readable message, safe to send to the peer (it only echoes numbers).
    pub fn message(&self) -> String {
        match self {
            HttpError::HeadersTooLarge { size, max } => {
                format!("header section of at least {size} bytes exceeds the {max}-byte limit")
            }
            HttpError::TooManyHeaders { max } => {
                format!("request has more than {max} header fields")
            }
            HttpError::BodyTooLarge { size, max } => {
                format!("request body of at least {size} bytes exceeds the {max}-byte limit")
            }
            HttpError::Malformed(what) => (*what).to_owned(),
            HttpError::UnsupportedVersion => "only HTTP/1.0 and HTTP/1.1 are supported".to_owned(),
            HttpError::UnsupportedTransferEncoding => {
                "only a single chunked transfer-encoding is supported".to_owned()
            }
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for HttpError {}

/// `max` header slots for httparse: on the stack when they fit `inline`, else in `spilled`
/// (configured limits above [`INLINE_HEADER_SLOTS`]), filled with `empty`. Used by the request
/// parser (uninitialised slots, so no 2 KiB of stack is cleared per request) and the response
/// parser (whose httparse API takes initialised ones).
pub(crate) fn header_slots<'a, T: Copy>(
    inline: &'a mut [T; INLINE_HEADER_SLOTS],
    spilled: &'a mut Vec<T>,
    max: usize,
    empty: T,
) -> &'a mut [T] {
    match inline.get_mut(..max) {
        Some(slots) => slots,
        None => {
            spilled.resize(max, empty);
            spilled
        }
    }
}

/// Parses a request head from the start of `buf`.
///
/// `buf` may hold more than the head (body bytes, pipelined requests); only the first
/// `head_len` bytes are used. Call again with the same, longer buffer after `Partial`.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Parsed<RequestHead>, HttpError> {
    parse_head_reusing(buf, limits, &mut HeadBuffers::default())
}

/// [`parse_head`] into the buffers of a spent head ([`RequestHead::into_buffers`]), taken
/// only when a head is complete.
pub fn parse_head_reusing(
    buf: &[u8],
    limits: &Limits,
    buffers: &mut HeadBuffers,
) -> Result<Parsed<RequestHead>, HttpError> {
    // Parsing only a window of the buffer is what makes the byte limit hold no matter how much
    // the caller has already read: a head that does not end inside it can never be accepted.
    let window = buf.get(..limits.max_header_bytes).unwrap_or(buf);

    let mut inline = [const { MaybeUninit::uninit() }; INLINE_HEADER_SLOTS];
    let mut spilled = Vec::new();
    let slots = header_slots(
        &mut inline,
        &mut spilled,
        limits.max_headers,
        MaybeUninit::uninit(),
    );
    let mut req = httparse::Request::new(&mut []);

    let head_len = match req.parse_with_uninit_headers(window, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // `>=` rather than `>`: with the window covering the whole limit, completing the
            // head would take at least one byte more than allowed.
            if buf.len() >= limits.max_header_bytes {
                return Err(HttpError::HeadersTooLarge {
                    size: observed_head_size(buf),
                    max: limits.max_header_bytes,
                });
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders {
                max: limits.max_headers,
            })
        }
        Err(httparse::Error::Version) => return Err(version_error(window)),
        Err(e) => return Err(HttpError::Malformed(httparse_reason(e))),
    };

    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    if minor_version > 1 {
        return Err(HttpError::UnsupportedVersion);
    }
    let method = Method::from_token(method);
    if !(target.starts_with('/') || (target == "*" && method == Method::Options)) {
        return Err(HttpError::Malformed(
            "request target must be an absolute path",
        ));
    }
    let mut content_length: Option<u64> = None;
    let mut transfer_encodings = 0usize;
    let mut chunked = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;

    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(h.value)?;
            // Identical duplicates are tolerated (RFC 9112 §6.3 item 5); differing ones are
            // the classic request smuggling vector.
            if content_length.is_some_and(|prev| prev != n) {
                return Err(HttpError::Malformed("conflicting content-length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
            chunked = trim_ows(h.value).eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(trim_ows) {
                conn_close |= token.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue |= trim_ows(h.value).eq_ignore_ascii_case(b"100-continue");
        }
    }

    let body = if transfer_encodings > 0 {
        if content_length.is_some() {
            // A front end and relay could disagree on which header wins (RFC 9112 §6.1), so
            // refuse rather than pick one.
            return Err(HttpError::Malformed(
                "request has both content-length and transfer-encoding",
            ));
        }
        if minor_version == 0 {
            // HTTP/1.0 has no transfer codings; RFC 9112 §6.1 says treat the framing as faulty.
            return Err(HttpError::Malformed(
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        // Several Transfer-Encoding fields form one list, so two fields can never be exactly
        // one `chunked`.
        if transfer_encodings > 1 || !chunked {
            return Err(HttpError::UnsupportedTransferEncoding);
        }
        BodyKind::Chunked
    } else {
        match content_length {
            Some(n) => BodyKind::ContentLength(n),
            None => BodyKind::None,
        }
    };

    let keep_alive = if minor_version == 1 {
        !conn_close
    } else {
        conn_keep_alive && !conn_close
    };

    let fields = req.headers.iter().map(|h| (h.name, h.value));
    // The head fits `max_header_bytes`, so its fields always fit the u32 positions.
    let buffers = std::mem::take(buffers);
    let mut head = RequestHead::from_parts(method, target, minor_version, fields, buffers).ok_or(
        HttpError::HeadersTooLarge {
            size: head_len,
            max: limits.max_header_bytes,
        },
    )?;
    head.head_len = head_len;
    head.body = body;
    head.keep_alive = keep_alive;
    head.expect_continue = expect_continue && minor_version == 1;
    Ok(Parsed::Complete(head))
}

/// Best estimate of the head size for a `HeadersTooLarge` report: up to the blank line if one
/// is in the buffer (beyond the window), else everything received.
fn observed_head_size(buf: &[u8]) -> usize {
    buf.iter()
        .enumerate()
        .find_map(|(i, &b)| {
            if b != b'\n' {
                return None;
            }
            let rest = buf.get(i + 1..)?;
            if rest.starts_with(b"\n") {
                Some(i + 2)
            } else if rest.starts_with(b"\r\n") {
                Some(i + 3)
            } else {
                None
            }
        })
        .unwrap_or(buf.len())
}

/// httparse reports `HTTP/2.0` and `HTTP/1.2` with the same error as `FOO/1.1`; only the
/// former deserve a 505, the rest is garbage.
fn version_error(window: &[u8]) -> HttpError {
    let line_end = window
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(window.len());
    let line = window.get(..line_end).unwrap_or(window);
    let version = line.splitn(3, |&b| b == b' ').nth(2).unwrap_or_default();
    let looks_like_http = match version.strip_prefix(b"HTTP/") {
        // The line may be cut short by a partial read, hence the shorter prefixes.
        Some([major]) | Some([major, b'.']) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    };
    if looks_like_http {
        HttpError::UnsupportedVersion
    } else {
        HttpError::Malformed("invalid HTTP version")
    }
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid request line",
        httparse::Error::Version => "invalid HTTP version",
        // Status and TooManyHeaders do not reach here for requests; keep a sane message anyway.
        _ => "malformed request head",
    }
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    const BAD: HttpError = HttpError::Malformed("invalid content-length");
    let digits = trim_ows(value);
    if digits.is_empty() {
        return Err(BAD);
    }
    // Hand-rolled because `str::parse::<u64>` accepts a leading `+`, which RFC 9110 does not.
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return Err(BAD);
        }
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(b - b'0')))
            .ok_or(BAD)
    })
}

/// Strips optional whitespace (SP / HTAB) around a field value or list element.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Chunk sizes above this many hex digits would overflow a `u64`.
const MAX_CHUNK_SIZE_DIGITS: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    /// Content-Length body with this many bytes still to come.
    Length {
        remaining: u64,
    },
    /// Reading the hex digits of a chunk size.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size digits, before `;` or CR.
    SizeWs {
        size: u64,
    },
    /// Inside chunk extensions, which are ignored.
    Ext {
        size: u64,
    },
    /// CR of the chunk size line seen.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    Trailer,
    TrailerLf,
    /// CR of the final empty line seen.
    EndLf,
    Done,
    /// A previous call failed; the stream position is unknown, so refuse to go on.
    Failed,
}

/// Incremental request body decoder. State survives between calls, so input can be fed in
/// arbitrary pieces; it never consumes past the end of the body, leaving pipelined bytes to
/// the caller.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: DecodeState,
    max_body: usize,
    /// Sum of chunk sizes accepted so far, checked against `max_body` before data arrives.
    announced: u64,
    max_overhead: usize,
    ext_bytes: usize,
    trailer_bytes: usize,
}

impl BodyDecoder {
    /// A `Content-Length` over `max_body_bytes` is rejected here, before any body is read, so
    /// the caller can answer 413 without draining it.
    pub fn new(kind: &BodyKind, limits: &Limits) -> Result<Self, HttpError> {
        let state = match *kind {
            BodyKind::None => DecodeState::Done,
            BodyKind::ContentLength(n) => {
                if n > usize_to_u64(limits.max_body_bytes) {
                    return Err(HttpError::BodyTooLarge {
                        size: n,
                        max: limits.max_body_bytes,
                    });
                }
                DecodeState::Length { remaining: n }
            }
            BodyKind::Chunked => DecodeState::Size { size: 0, digits: 0 },
        };
        Ok(BodyDecoder {
            state,
            max_body: limits.max_body_bytes,
            announced: 0,
            max_overhead: limits.max_header_bytes,
            ext_bytes: 0,
            trailer_bytes: 0,
        })
    }

    /// For a `Content-Length` body whose remaining bytes are all among the `available` at
    /// hand: how many remain, the decoder then done. The caller takes those bytes as they
    /// are, without a copy. `None` for anything else (chunked, or not all of it here).
    pub fn take_whole(&mut self, available: usize) -> Option<usize> {
        match self.state {
            DecodeState::Length { remaining } => {
                let length = usize::try_from(remaining)
                    .ok()
                    .filter(|&n| n <= available)?;
                self.state = DecodeState::Done;
                Some(length)
            }
            DecodeState::Done => Some(0),
            _ => None,
        }
    }

    /// True once the whole body (including any chunked trailer) has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == DecodeState::Done
    }

    /// Consume as much of `input` as possible, appending decoded bytes to `out`.
    /// Returns (bytes consumed, done). When done, bytes past `consumed` belong to the next
    /// request. After an error the decoder is unusable and the connection should be closed.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), HttpError> {
        let mut rest = input;
        loop {
            match self.state {
                DecodeState::Done => return Ok((input.len() - rest.len(), true)),
                DecodeState::Failed => {
                    return Err(HttpError::Malformed("body decoder used after an error"))
                }
                DecodeState::Length { remaining: 0 } => self.state = DecodeState::Done,
                DecodeState::Data { remaining: 0 } => self.state = DecodeState::DataCr,
                DecodeState::Length { remaining } | DecodeState::Data { remaining } => {
                    if rest.is_empty() {
                        return Ok((input.len(), false));
                    }
                    let take = usize::try_from(remaining).map_or(rest.len(), |r| r.min(rest.len()));
                    let (data, tail) = rest.split_at(take);
                    out.extend_from_slice(data);
                    rest = tail;
                    let remaining = remaining - usize_to_u64(take);
                    self.state = match self.state {
                        DecodeState::Length { .. } => DecodeState::Length { remaining },
                        _ => DecodeState::Data { remaining },
                    };
                }
                state => {
                    let Some((&b, tail)) = rest.split_first() else {
                        return Ok((input.len(), false));
                    };
                    rest = tail;
                    match self.step(state, b) {
                        Ok(next) => self.state = next,
                        Err(e) => {
                            self.state = DecodeState::Failed;
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// One byte of chunked framing. Line endings must be CRLF: accepting a bare LF here while a
    /// front end does not (or vice versa) is a known smuggling vector.
    fn step(&mut self, state: DecodeState, b: u8) -> Result<DecodeState, HttpError> {
        use DecodeState as S;
        Ok(match state {
            S::Size { size, digits } => {
                if let Some(v) = hex_value(b) {
                    if digits >= MAX_CHUNK_SIZE_DIGITS {
                        return Err(HttpError::Malformed("chunk size too long"));
                    }
                    S::Size {
                        size: (size << 4) | u64::from(v),
                        digits: digits + 1,
                    }
                } else if digits == 0 {
                    return Err(HttpError::Malformed("invalid chunk size"));
                } else {
                    match b {
                        b'\r' => S::SizeLf { size },
                        b';' => self.ext_byte(S::Ext { size })?,
                        b' ' | b'\t' => self.ext_byte(S::SizeWs { size })?,
                        _ => return Err(HttpError::Malformed("invalid chunk size")),
                    }
                }
            }
            S::SizeWs { size } => match b {
                b'\r' => S::SizeLf { size },
                b';' => self.ext_byte(S::Ext { size })?,
                b' ' | b'\t' => self.ext_byte(S::SizeWs { size })?,
                _ => return Err(HttpError::Malformed("invalid chunk size")),
            },
            S::Ext { size } => match b {
                b'\r' => S::SizeLf { size },
                b'\t' => self.ext_byte(S::Ext { size })?,
                0..=0x1f | 0x7f => {
                    return Err(HttpError::Malformed("invalid byte in chunk extension"))
                }
                _ => self.ext_byte(S::Ext { size })?,
            },
            S::SizeLf { size } => {
                if b != b'\n' {
                    return Err(HttpError::Malformed("chunk size line must end with CRLF"));
                }
                if size == 0 {
                    S::TrailerStart
                } else {
                    let total = self.announced.saturating_add(size);
                    if total > usize_to_u64(self.max_body) {
                        return Err(HttpError::BodyTooLarge {
                            size: total,
                            max: self.max_body,
                        });
                    }
                    self.announced = total;
                    S::Data { remaining: size }
                }
            }
            S::DataCr => match b {
                b'\r' => S::DataLf,
                _ => return Err(HttpError::Malformed("missing CRLF after chunk data")),
            },
            S::DataLf => match b {
                b'\n' => S::Size { size: 0, digits: 0 },
                _ => return Err(HttpError::Malformed("missing CRLF after chunk data")),
            },
            S::TrailerStart | S::Trailer => match b {
                b'\r' if state == S::TrailerStart => S::EndLf,
                b'\r' => S::TrailerLf,
                b'\t' => self.trailer_byte()?,
                0..=0x1f | 0x7f => return Err(HttpError::Malformed("invalid byte in trailer")),
                _ => self.trailer_byte()?,
            },
            S::TrailerLf => match b {
                b'\n' => S::TrailerStart,
                _ => return Err(HttpError::Malformed("trailer line must end with CRLF")),
            },
            S::EndLf => match b {
                b'\n' => S::Done,
                _ => return Err(HttpError::Malformed("chunked body must end with CRLF")),
            },
            // Handled by `decode` without consuming a byte; listed so the match stays total.
            S::Length { .. } | S::Data { .. } | S::Done | S::Failed => state,
        })
    }

    fn ext_byte(&mut self, next: DecodeState) -> Result<DecodeState, HttpError> {
        self.ext_bytes += 1;
        if self.ext_bytes > self.max_overhead {
            return Err(HttpError::Malformed("chunk extensions too long"));
        }
        Ok(next)
    }

    fn trailer_byte(&mut self) -> Result<DecodeState, HttpError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > self.max_overhead {
            return Err(HttpError::HeadersTooLarge {
                size: self.trailer_bytes,
                max: self.max_overhead,
            });
        }
        Ok(DecodeState::Trailer)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

pub(crate) fn usize_to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Reason phrase for a status code; "Unknown" for codes relay does not send.
pub fn status_reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// What [`write_response`] needs besides the body.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'a> {
    pub status: u16,
    /// relay's own media types only (written as they are); an upstream's travels among
    /// `extra_headers`.
    pub content_type: Option<&'static str>,
    /// `X-Relay-Shard`: the shard that served the request, written after `Content-Type`.
    pub relay_shard: Option<usize>,
    pub keep_alive: bool,
    /// Written in order after `X-Relay-Shard`. `Content-Length` and `Transfer-Encoding` are
    /// skipped because framing belongs to `write_response`; `Connection` is skipped when
    /// `keep_alive` is false. An HTTP/1.0 keep-alive response should pass
    /// `("Connection", "keep-alive")` here.
    pub extra_headers: &'a [(&'a str, &'a str)],
}

/// Appends a complete response (head + body) to `out`.
///
/// Always writes `Content-Length`, including for HEAD (`head_only`), where the body is
/// omitted but the length is that of the body a GET would get. The exceptions are 1xx and 204,
/// which must not carry `Content-Length` or a body (RFC 9110 §8.6, §15.3.5), so neither is
/// written for them. `Connection: close` is added when `!keep_alive`.
pub fn write_response(out: &mut Vec<u8>, head: &ResponseHead<'_>, body: &[u8], head_only: bool) {
    let bodiless = (100..200).contains(&head.status) || head.status == 204;
    let framing = if bodiless {
        BodyFraming::None
    } else {
        BodyFraming::Length(usize_to_u64(body.len()))
    };
    write_response_head(out, head, framing);
    if !head_only && !bodiless {
        out.extend_from_slice(body);
    }
}

/// How a response body is delimited, for [`write_response_head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: the caller writes chunks ([`push_chunk`]) and the last one.
    Chunked,
    /// Neither header (1xx, 204, or a body the connection's close delimits).
    None,
}

/// Appends a response head with the given body framing; the caller writes the body. Used for
/// bodies passed on as they arrive (proxying).
pub fn write_response_head(out: &mut Vec<u8>, head: &ResponseHead<'_>, framing: BodyFraming) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(status_reason(head.status).as_bytes());
    out.extend_from_slice(b"\r\n");

    if let Some(ct) = head.content_type {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(ct.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(shard) = head.relay_shard {
        out.extend_from_slice(b"X-Relay-Shard: ");
        push_u64(out, usize_to_u64(shard));
        out.extend_from_slice(b"\r\n");
    }
    for &(name, value) in head.extra_headers {
        let owned_by_us = name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || (!head.keep_alive && name.eq_ignore_ascii_case("connection"));
        if !owned_by_us {
            push_header(out, name, value);
        }
    }
    match framing {
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyFraming::None => {}
    }
    if !head.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk of a chunked body; an empty `data` writes the last chunk (`0\r\n\r\n`).
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    // For the last chunk this `\r\n` ends the (empty) trailer section.
    out.extend_from_slice(b"\r\n");
}

/// Writes `name: value\r\n`. CR, LF and NUL are replaced by spaces: header values sometimes
/// echo request data, and a stray line break would let it inject headers or split the response.
/// A byte-by-byte copy is the cheapest way for the short names and values of a response head
/// (a census measured a skip-ahead test first, `memchr3` or eight bytes a step, as slower).
pub(crate) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    let clean = |&b: &u8| match b {
        b'\r' | b'\n' | 0 => b' ',
        b => b,
    };
    out.extend(name.as_bytes().iter().map(clean));
    out.extend_from_slice(b": ");
    out.extend(value.as_bytes().iter().map(clean));
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal (two digits a step, through `itoa`, without `fmt` machinery). The
/// one decimal writer of the crate: response heads, event envelopes, replies, cursors.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `{"error":{"code":"...","message":"..."}}`.
pub fn write_error_json(out: &mut Vec<u8>, code: &str, message: &str) {
    out.extend_from_slice(br#"{"error":{"code":""#);
    json_escape_into(out, code);
    out.extend_from_slice(br#"","message":""#);
    json_escape_into(out, message);
    out.extend_from_slice(br#""}}"#);
}

/// Appends `s` escaped for use inside a JSON string (without the surrounding quotes).
/// Output matches serde_json: short escapes where JSON has them, `\u00xx` for other control
/// characters, everything else (including non-ASCII) verbatim.
pub fn json_escape_into(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    // Runs that need no escape are found eight bytes a step and copied whole.
    while let Some(i) = crate::envelope::first_string_stop(bytes, plain_from) {
        let Some(&b) = bytes.get(i) else { break };
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => b"",
        };
        // Copy the unescaped run in one go rather than byte by byte.
        out.extend_from_slice(bytes.get(plain_from..i).unwrap_or_default());
        plain_from = i + 1;
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.extend(
                [b >> 4, b & 0x0f]
                    .iter()
                    .filter_map(|&nibble| HEX.get(usize::from(nibble))),
            );
        } else {
            out.extend_from_slice(short);
        }
    }
    out.extend_from_slice(bytes.get(plain_from..).unwrap_or_default());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 1024,
            max_headers: 8,
            max_body_bytes: 64,
        }
    }

    fn head(buf: &[u8]) -> RequestHead {
        match parse_head(buf, &limits()) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    fn head_err(buf: &[u8]) -> HttpError {
        match parse_head(buf, &limits()) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Decodes `input` in one call, asserting the body finishes.
    fn decode_all(kind: BodyKind, input: &[u8]) -> Result<(Vec<u8>, usize), HttpError> {
        let mut dec = BodyDecoder::new(&kind, &limits())?;
        let mut out = Vec::new();
        let (used, done) = dec.decode(input, &mut out)?;
        assert!(done, "body should be complete");
        Ok((out, used))
    }

    /// Decodes `input` one byte per call, as a slow peer would deliver it.
    fn decode_bytewise(kind: BodyKind, input: &[u8]) -> Result<(Vec<u8>, usize), HttpError> {
        let mut dec = BodyDecoder::new(&kind, &limits())?;
        let mut out = Vec::new();
        let mut used = 0;
        for byte in input.chunks(1) {
            let (n, done) = dec.decode(byte, &mut out)?;
            used += n;
            if done {
                return Ok((out, used));
            }
            assert_eq!(n, 1, "an unfinished decoder must take every byte offered");
        }
        panic!("body never completed; decoded so far {out:?}");
    }

    const GET: &[u8] = b"GET /api/v1/relay/channels/doc%2F1/history?since=3 HTTP/1.1\r\n\
        Host: relay.example\r\n\
        User-Agent: test/1.0\r\n\
        Accept: application/json\r\n\
        X-Trace: a\r\n\
        x-trace: b\r\n\r\n";

    #[test]
    fn full_get() {
        let h = head(GET);
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.method.as_str(), "GET");
        assert_eq!(h.target(), "/api/v1/relay/channels/doc%2F1/history?since=3");
        assert_eq!(h.path(), "/api/v1/relay/channels/doc%2F1/history");
        assert_eq!(h.query(), Some("since=3"));
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.head_len, GET.len());
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert_eq!(h.header_count(), 5);
        assert_eq!(h.headers().next(), Some(("host", &b"relay.example"[..])));
        assert_eq!(h.header("user-agent"), Some(&b"test/1.0"[..]));
        assert_eq!(h.header("Accept"), Some(&b"application/json"[..]));
        assert_eq!(h.header_str("host"), Some("relay.example"));
        assert_eq!(h.header("missing"), None);
        let traces: Vec<&[u8]> = h.headers_all("x-trace").collect();
        assert_eq!(traces, vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(h.header("x-trace"), Some(&b"a"[..]));
    }

    #[test]
    fn query_edge_cases() {
        let h = head(b"GET /a? HTTP/1.1\r\n\r\n");
        assert_eq!((h.path(), h.query()), ("/a", Some("")));
        let h = head(b"GET /a?b=1?c HTTP/1.1\r\n\r\n");
        assert_eq!((h.path(), h.query()), ("/a", Some("b=1?c")));
        let h = head(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!((h.path(), h.query()), ("/", None));
    }

    #[test]
    fn methods() {
        for (tok, m) in [
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("PATCH", Method::Patch),
            ("PURGE", Method::Other("PURGE".into())),
            ("get", Method::Other("get".into())),
        ] {
            let h = head(format!("{tok} / HTTP/1.1\r\n\r\n").as_bytes());
            assert_eq!(h.method, m);
            assert_eq!(h.method.as_str(), tok);
        }
    }

    #[test]
    fn post_with_content_length_body() {
        let req = b"POST /publish HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello worldGET";
        let h = head(req);
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.body, BodyKind::ContentLength(11));
        let rest = &req[h.head_len..];
        let (body, used) = decode_all(h.body, rest).unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(used, 11, "must not consume the next request's bytes");

        // Same body arriving one byte at a time.
        let (body, used) = decode_bytewise(h.body, rest).unwrap();
        assert_eq!((body.as_slice(), used), (&b"hello world"[..], 11));
    }

    #[test]
    fn a_spent_heads_buffers_carry_the_next_head() {
        let first =
            b"POST /api/v1/relay/events?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
        let second = b"GET /healthz HTTP/1.1\r\nX-Long-Header-Name: v\r\n\r\n";
        let complete = |buf: &[u8], buffers: &mut HeadBuffers| match parse_head_reusing(
            buf,
            &limits(),
            buffers,
        )
        .unwrap()
        {
            Parsed::Complete(head) => head,
            Parsed::Partial => panic!("complete"),
        };
        let mut buffers = HeadBuffers::default();
        let head = complete(first, &mut buffers);
        let target_at = head.target().as_ptr();
        let mut buffers = head.into_buffers();
        // A partial head leaves the buffers where they are.
        assert!(matches!(
            parse_head_reusing(b"GET / HT", &limits(), &mut buffers),
            Ok(Parsed::Partial)
        ));
        let head = complete(second, &mut buffers);
        assert_eq!(
            head.target().as_ptr(),
            target_at,
            "the same buffer, filled again"
        );
        // Exactly what a fresh parse gives: nothing of the first head is left.
        match parse_head(second, &limits()).unwrap() {
            Parsed::Complete(fresh) => assert_eq!(head, fresh),
            Parsed::Partial => panic!("complete"),
        }
    }

    #[test]
    fn content_length_body_in_pieces() {
        let mut dec = BodyDecoder::new(&BodyKind::ContentLength(5), &limits()).unwrap();
        let mut out = Vec::new();
        assert_eq!(dec.decode(b"", &mut out).unwrap(), (0, false));
        assert_eq!(dec.decode(b"ab", &mut out).unwrap(), (2, false));
        assert!(!dec.is_done());
        assert_eq!(dec.decode(b"cdeXYZ", &mut out).unwrap(), (3, true));
        assert!(dec.is_done());
        assert_eq!(dec.decode(b"more", &mut out).unwrap(), (0, true));
        assert_eq!(out, b"abcde");
    }

    #[test]
    fn a_whole_length_body_is_taken_without_decoding() {
        let mut dec = BodyDecoder::new(&BodyKind::ContentLength(5), &limits()).unwrap();
        assert_eq!(dec.take_whole(4), None, "not all of it here");
        assert!(!dec.is_done());
        assert_eq!(dec.take_whole(9), Some(5));
        assert!(dec.is_done());
        for kind in [BodyKind::None, BodyKind::ContentLength(0)] {
            let mut dec = BodyDecoder::new(&kind, &limits()).unwrap();
            assert_eq!(dec.take_whole(0), Some(0));
        }
        let mut chunked = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
        assert_eq!(chunked.take_whole(100), None, "chunked bodies are decoded");
        // After part of it was decoded: the rest.
        let mut dec = BodyDecoder::new(&BodyKind::ContentLength(5), &limits()).unwrap();
        dec.decode(b"ab", &mut Vec::new()).unwrap();
        assert_eq!(dec.take_whole(3), Some(3));
    }

    #[test]
    fn empty_bodies_finish_without_input() {
        for kind in [BodyKind::None, BodyKind::ContentLength(0)] {
            let mut dec = BodyDecoder::new(&kind, &limits()).unwrap();
            let mut out = Vec::new();
            assert_eq!(dec.decode(b"GET / HTTP/1.1", &mut out).unwrap(), (0, true));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn pipelined_requests() {
        let buf = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        let first = head(buf);
        assert_eq!(first.path(), "/a");
        let (body, used) = decode_all(first.body, &buf[first.head_len..]).unwrap();
        assert_eq!(body, b"abc");
        let second_start = first.head_len + used;
        let second = head(&buf[second_start..]);
        assert_eq!(second.method, Method::Get);
        assert_eq!(second.path(), "/b");
        assert_eq!(second.query(), Some("x=1"));
        assert_eq!(second_start + second.head_len, buf.len());

        // Two bodiless requests back to back: head_len alone finds the second.
        let buf = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n";
        let first = head(buf);
        assert_eq!(first.head_len, 19);
        assert_eq!(head(&buf[first.head_len..]).path(), "/2");
    }

    #[test]
    fn byte_by_byte_head() {
        let whole = head(GET);
        for end in 0..GET.len() {
            assert_eq!(
                parse_head(&GET[..end], &limits()).unwrap(),
                Parsed::Partial,
                "prefix of {end} bytes"
            );
        }
        assert_eq!(
            parse_head(GET, &limits()).unwrap(),
            Parsed::Complete(whole.clone())
        );
        // Extra bytes after the head change nothing.
        let mut longer = GET.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(head(&longer), whole);
    }

    #[test]
    fn head_bytes_limit_complete() {
        let lim = Limits {
            max_header_bytes: 64,
            ..limits()
        };
        let req = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(60));
        let err = parse_head(req.as_bytes(), &lim).unwrap_err();
        assert_eq!(
            err,
            HttpError::HeadersTooLarge {
                size: req.len(),
                max: 64
            }
        );
        assert_eq!(err.status(), 431);

        // Exactly at the limit is fine.
        let pad = 64 - "GET / HTTP/1.1\r\nX-Pad: \r\n\r\n".len();
        let req = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(pad));
        assert_eq!(req.len(), 64);
        match parse_head(req.as_bytes(), &lim).unwrap() {
            Parsed::Complete(h) => assert_eq!(h.head_len, 64),
            Parsed::Partial => panic!("head of exactly the limit must parse"),
        }
    }

    #[test]
    fn head_bytes_limit_partial() {
        let lim = Limits {
            max_header_bytes: 64,
            ..limits()
        };
        let mut req = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        while req.len() < 63 {
            req.push(b'a');
        }
        assert_eq!(parse_head(&req, &lim).unwrap(), Parsed::Partial);
        req.push(b'a');
        assert_eq!(
            parse_head(&req, &lim).unwrap_err(),
            HttpError::HeadersTooLarge { size: 64, max: 64 }
        );
        req.extend_from_slice(&[b'a'; 100]);
        assert_eq!(
            parse_head(&req, &lim).unwrap_err(),
            HttpError::HeadersTooLarge { size: 164, max: 64 }
        );
    }

    #[test]
    fn too_many_headers() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..8 {
            req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        let mut ok = req.clone();
        ok.extend_from_slice(b"\r\n");
        assert_eq!(head(&ok).header_count(), 8);

        // Reported as soon as the ninth appears, even before the head is complete.
        req.extend_from_slice(b"X-H8: v\r\n");
        let err = head_err(&req);
        assert_eq!(err, HttpError::TooManyHeaders { max: 8 });
        assert_eq!(
            (err.status(), err.code()),
            (431, "request_header_fields_too_large")
        );
    }

    #[test]
    fn header_slots_beyond_inline_capacity() {
        let lim = Limits {
            max_headers: INLINE_HEADER_SLOTS + 10,
            max_header_bytes: 8192,
            ..limits()
        };
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..INLINE_HEADER_SLOTS + 10 {
            req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        let mut ok = req.clone();
        ok.extend_from_slice(b"\r\n");
        match parse_head(&ok, &lim).unwrap() {
            Parsed::Complete(h) => assert_eq!(h.header_count(), INLINE_HEADER_SLOTS + 10),
            Parsed::Partial => panic!("expected complete"),
        }
        req.extend_from_slice(b"X-Last: v\r\n\r\n");
        assert_eq!(
            parse_head(&req, &lim).unwrap_err(),
            HttpError::TooManyHeaders {
                max: INLINE_HEADER_SLOTS + 10
            }
        );
    }

    #[test]
    fn content_length_over_max() {
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n");
        let err = BodyDecoder::new(&h.body, &limits()).unwrap_err();
        assert_eq!(err, HttpError::BodyTooLarge { size: 65, max: 64 });
        assert_eq!((err.status(), err.code()), (413, "payload_too_large"));
        assert!(BodyDecoder::new(&BodyKind::ContentLength(64), &limits()).is_ok());
    }

    #[test]
    fn content_length_must_be_digits() {
        for bad in [
            "",
            "abc",
            "+5",
            "-1",
            "5 5",
            "0x10",
            "5,5",
            "99999999999999999999999",
        ] {
            let req = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                head_err(req.as_bytes()),
                HttpError::Malformed("invalid content-length"),
                "value {bad:?}"
            );
        }
        let h = head(b"POST / HTTP/1.1\r\nContent-Length:  007 \r\n\r\n");
        assert_eq!(h.body, BodyKind::ContentLength(7));
    }

    #[test]
    fn chunked_normal() {
        let req = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\nNEXT";
        let h = head(req);
        assert_eq!(h.body, BodyKind::Chunked);
        let rest = &req[h.head_len..];
        let (body, used) = decode_all(h.body, rest).unwrap();
        assert_eq!(body, b"hello, world");
        assert_eq!(&rest[used..], b"NEXT");
    }

    #[test]
    fn chunked_upper_and_lower_hex() {
        let body = "x".repeat(0x1a);
        for size in ["1a", "1A", "001a"] {
            let input = format!("{size}\r\n{body}\r\n0\r\n\r\n");
            let (out, used) = decode_all(BodyKind::Chunked, input.as_bytes()).unwrap();
            assert_eq!(out, body.as_bytes());
            assert_eq!(used, input.len());
        }
    }

    #[test]
    fn chunked_with_extensions() {
        let input = b"5;name=value\r\nhello\r\n3 ; a=\"q;x\" ;b\r\nabc\r\n0;last\r\n\r\n";
        let (out, used) = decode_all(BodyKind::Chunked, input).unwrap();
        assert_eq!(out, b"helloabc");
        assert_eq!(used, input.len());
    }

    #[test]
    fn chunked_with_trailers() {
        let input = b"4\r\nwiki\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\nGET";
        let (out, used) = decode_all(BodyKind::Chunked, input).unwrap();
        assert_eq!(out, b"wiki");
        assert_eq!(used, input.len() - 3);
    }

    #[test]
    fn chunked_one_byte_at_a_time() {
        let input = b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let (out, used) = decode_bytewise(BodyKind::Chunked, input).unwrap();
        assert_eq!(out, b"hello!");
        assert_eq!(used, input.len() - 4);
        let (whole, whole_used) = decode_all(BodyKind::Chunked, input).unwrap();
        assert_eq!((whole, whole_used), (out, used));
    }

    #[test]
    fn chunked_bad_hex() {
        for input in [
            &b"g\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b";x\r\n",
            b"5x\r\nhello\r\n",
        ] {
            let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
            let err = dec.decode(input, &mut Vec::new()).unwrap_err();
            assert_eq!(err, HttpError::Malformed("invalid chunk size"), "{input:?}");
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn chunked_requires_crlf() {
        let cases: [(&[u8], &str); 5] = [
            (b"5\r\nhelloX\r\n0\r\n\r\n", "missing CRLF after chunk data"),
            (b"5\r\nhello\rX0\r\n\r\n", "missing CRLF after chunk data"),
            (b"5\r\nhello\n0\r\n\r\n", "missing CRLF after chunk data"),
            (b"5\nhello\r\n", "invalid chunk size"),
            (b"5\r\rhello", "chunk size line must end with CRLF"),
        ];
        for (input, msg) in cases {
            let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
            assert_eq!(
                dec.decode(input, &mut Vec::new()).unwrap_err(),
                HttpError::Malformed(msg),
                "{input:?}"
            );
        }
        let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
        assert_eq!(
            dec.decode(b"0\r\n\n", &mut Vec::new()).unwrap_err(),
            HttpError::Malformed("invalid byte in trailer")
        );
    }

    #[test]
    fn chunked_size_overflow() {
        let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
        assert_eq!(
            dec.decode(b"1FFFFFFFFFFFFFFFF\r\n", &mut Vec::new())
                .unwrap_err(),
            HttpError::Malformed("chunk size too long")
        );
        // A poisoned decoder refuses further input rather than resuming mid-stream.
        assert!(dec.decode(b"0\r\n\r\n", &mut Vec::new()).is_err());

        // Sixteen digits fit a u64 but are still far over the body limit.
        let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
        assert_eq!(
            dec.decode(b"FFFFFFFFFFFFFFFF\r\n", &mut Vec::new())
                .unwrap_err(),
            HttpError::BodyTooLarge {
                size: u64::MAX,
                max: 64
            }
        );
    }

    #[test]
    fn chunked_total_over_max() {
        // 40 + 24 = 64 fits exactly.
        let ok = format!(
            "28\r\n{}\r\n18\r\n{}\r\n0\r\n\r\n",
            "a".repeat(40),
            "b".repeat(24)
        );
        assert_eq!(
            decode_all(BodyKind::Chunked, ok.as_bytes())
                .unwrap()
                .0
                .len(),
            64
        );

        // 40 + 25 does not; rejected at the size line, before the data is sent.
        let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits()).unwrap();
        let mut out = Vec::new();
        let first = format!("28\r\n{}\r\n", "a".repeat(40));
        assert_eq!(
            dec.decode(first.as_bytes(), &mut out).unwrap(),
            (first.len(), false)
        );
        let err = dec.decode(b"19\r\n", &mut out).unwrap_err();
        assert_eq!(err, HttpError::BodyTooLarge { size: 65, max: 64 });
        assert_eq!(out.len(), 40);
    }

    #[test]
    fn chunked_extension_and_trailer_bounds() {
        let lim = Limits {
            max_header_bytes: 16,
            ..limits()
        };
        let mut dec = BodyDecoder::new(&BodyKind::Chunked, &lim).unwrap();
        let input = format!("1;{}\r\n", "e".repeat(20));
        assert_eq!(
            dec.decode(input.as_bytes(), &mut Vec::new()).unwrap_err(),
            HttpError::Malformed("chunk extensions too long")
        );

        let mut dec = BodyDecoder::new(&BodyKind::Chunked, &lim).unwrap();
        let input = format!("0\r\nX-Long: {}\r\n\r\n", "t".repeat(20));
        assert_eq!(
            dec.decode(input.as_bytes(), &mut Vec::new()).unwrap_err(),
            HttpError::HeadersTooLarge { size: 17, max: 16 }
        );
    }

    #[test]
    fn smuggling_cl_and_te() {
        for req in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(
                head_err(req),
                HttpError::Malformed("request has both content-length and transfer-encoding")
            );
        }
    }

    #[test]
    fn smuggling_conflicting_content_lengths() {
        let err = head_err(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert_eq!(
            err,
            HttpError::Malformed("conflicting content-length headers")
        );
        assert_eq!(err.code(), "bad_request");
        let h = head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(h.body, BodyKind::ContentLength(5));
    }

    #[test]
    fn transfer_encoding_other_than_chunked() {
        for te in [
            "gzip",
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "chunked;x",
            "",
        ] {
            let req = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n");
            let err = head_err(req.as_bytes());
            assert_eq!(err, HttpError::UnsupportedTransferEncoding, "{te:?}");
            assert_eq!((err.status(), err.code()), (501, "not_implemented"));
        }
        // Split over two fields it is still a list, so not a single `chunked`.
        assert_eq!(
            head_err(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HttpError::UnsupportedTransferEncoding
        );
        let h = head(b"POST / HTTP/1.1\r\ntransfer-encoding:   ChUnKeD  \r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
        assert_eq!(
            head_err(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HttpError::Malformed("transfer-encoding in an HTTP/1.0 request")
        );
    }

    #[test]
    fn keep_alive_rules() {
        let cases: [(&[u8], bool); 8] = [
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                b"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n", false),
        ];
        for (req, keep_alive) in cases {
            assert_eq!(
                head(req).keep_alive,
                keep_alive,
                "{}",
                String::from_utf8_lossy(req)
            );
        }
        assert_eq!(head(b"GET / HTTP/1.0\r\n\r\n").minor_version, 0);
    }

    #[test]
    fn expect_continue() {
        let h = head(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        assert!(!head(b"POST / HTTP/1.1\r\nExpect: something\r\n\r\n").expect_continue);
        // HTTP/1.0 clients do not understand 100 Continue.
        assert!(!head(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn request_target_forms() {
        let h = head(b"OPTIONS * HTTP/1.1\r\n\r\n");
        assert_eq!(
            (&h.method, h.target(), h.path()),
            (&Method::Options, "*", "*")
        );
        for req in [
            &b"GET * HTTP/1.1\r\n\r\n"[..],
            b"GET http://relay.example/ HTTP/1.1\r\n\r\n",
            b"CONNECT relay.example:443 HTTP/1.1\r\n\r\n",
            b"GET api HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                head_err(req),
                HttpError::Malformed("request target must be an absolute path")
            );
        }
    }

    #[test]
    fn versions() {
        for req in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET / HTTP/3\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/2",
        ] {
            let err = head_err(req);
            assert_eq!(err, HttpError::UnsupportedVersion, "{req:?}");
            assert_eq!(
                (err.status(), err.code()),
                (505, "http_version_not_supported")
            );
        }
        assert_eq!(
            head_err(b"GET / FTP/1.1\r\n\r\n"),
            HttpError::Malformed("invalid HTTP version")
        );
        assert_eq!(
            head_err(b"GET / HTTP/1.x\r\n\r\n"),
            HttpError::Malformed("invalid HTTP version")
        );
    }

    #[test]
    fn garbage_is_malformed() {
        for junk in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET / HTTP/1.1\rX\n\r\n",
            b"\x00\x00\x00\x00",
        ] {
            let err = head_err(junk);
            assert!(
                matches!(err, HttpError::Malformed(_)),
                "{junk:?} gave {err:?}"
            );
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn empty_and_blank_prefix() {
        assert_eq!(parse_head(b"", &limits()).unwrap(), Parsed::Partial);
        // A stray CRLF between pipelined requests is tolerated (RFC 9112 §2.2).
        let h = head(b"\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(h.head_len, 20);
    }

    #[test]
    fn error_mapping() {
        let cases = [
            (
                HttpError::HeadersTooLarge { size: 9, max: 8 },
                431,
                "request_header_fields_too_large",
            ),
            (
                HttpError::TooManyHeaders { max: 64 },
                431,
                "request_header_fields_too_large",
            ),
            (
                HttpError::BodyTooLarge { size: 9, max: 8 },
                413,
                "payload_too_large",
            ),
            (HttpError::Malformed("x"), 400, "bad_request"),
            (
                HttpError::UnsupportedVersion,
                505,
                "http_version_not_supported",
            ),
            (
                HttpError::UnsupportedTransferEncoding,
                501,
                "not_implemented",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
            assert_eq!(err.to_string(), err.message());
            assert!(!err.message().is_empty());
        }
        assert_eq!(
            HttpError::BodyTooLarge { size: 100, max: 64 }.message(),
            "request body of at least 100 bytes exceeds the 64-byte limit"
        );
        assert_eq!(
            HttpError::Malformed("invalid chunk size").message(),
            "invalid chunk size"
        );
        let boxed: Box<dyn std::error::Error> = Box::new(HttpError::UnsupportedVersion);
        assert_eq!(
            boxed.to_string(),
            "only HTTP/1.0 and HTTP/1.1 are supported"
        );
    }

    #[test]
    fn status_reasons() {
        assert_eq!(status_reason(200), "OK");
        assert_eq!(status_reason(204), "No Content");
        assert_eq!(status_reason(404), "Not Found");
        assert_eq!(status_reason(429), "Too Many Requests");
        assert_eq!(status_reason(431), "Request Header Fields Too Large");
        assert_eq!(status_reason(503), "Service Unavailable");
        assert_eq!(status_reason(505), "HTTP Version Not Supported");
        assert_eq!(status_reason(418), "Unknown");
        for e in [HttpError::Malformed("x"), HttpError::UnsupportedVersion] {
            assert_ne!(status_reason(e.status()), "Unknown");
        }
    }

    #[test]
    fn write_response_exact() {
        let mut out = b"previous".to_vec();
        write_response(
            &mut out,
            &ResponseHead {
                status: 201,
                content_type: Some("application/json"),
                relay_shard: Some(12),
                keep_alive: false,
                extra_headers: &[("Location", "/x/1"), ("Cache-Control", "no-store")],
            },
            b"{\"id\":1}",
            false,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "previousHTTP/1.1 201 Created\r\n\
             Content-Type: application/json\r\n\
             X-Relay-Shard: 12\r\n\
             Location: /x/1\r\n\
             Cache-Control: no-store\r\n\
             Content-Length: 8\r\n\
             Connection: close\r\n\
             \r\n\
             {\"id\":1}"
        );
    }

    #[test]
    fn write_response_head_only_and_keep_alive() {
        let head = ResponseHead {
            status: 200,
            content_type: None,
            relay_shard: None,
            keep_alive: true,
            extra_headers: &[],
        };
        let mut out = Vec::new();
        write_response(&mut out, &head, &[b'z'; 1234], true);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");

        let mut out = Vec::new();
        write_response(&mut out, &head, b"", false);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn write_response_owns_framing() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            &ResponseHead {
                status: 400,
                content_type: None,
                relay_shard: None,
                keep_alive: false,
                extra_headers: &[
                    ("Content-Length", "999"),
                    ("transfer-encoding", "chunked"),
                    ("Connection", "keep-alive"),
                    ("X-Echo", "a\r\nSet-Cookie: evil=1"),
                ],
            },
            b"no",
            false,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nX-Echo: a  Set-Cookie: evil=1\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\nno"
        );

        // 204 and 1xx never carry a length or a body.
        let mut out = Vec::new();
        let head = ResponseHead {
            status: 204,
            content_type: None,
            relay_shard: None,
            keep_alive: true,
            extra_headers: &[],
        };
        write_response(&mut out, &head, b"ignored", false);
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn header_text_is_copied_as_it_is_except_line_breaks_and_nul() {
        let cases: [(&str, &str); 5] = [
            ("application/json", "application/json"),
            ("", ""),
            ("quote \" back\\slash\ttab é", "quote \" back\\slash\ttab é"),
            ("a\r\nSet-Cookie: x\0y", "a  Set-Cookie: x y"),
            ("0123456789abcdef\n", "0123456789abcdef "),
        ];
        for (value, written) in cases {
            let mut out = Vec::new();
            push_header(&mut out, "X-Test", value);
            assert_eq!(
                out,
                format!("X-Test: {written}\r\n").as_bytes(),
                "{value:?}"
            );
        }
    }

    #[test]
    fn decimal_formatting() {
        for n in [0u64, 7, 10, 99, 100, 65535, u64::MAX] {
            let mut out = b"x".to_vec();
            push_u64(&mut out, n);
            assert_eq!(out, format!("x{n}").as_bytes());
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // Deterministic xorshift so a failure reproduces; the alphabet is biased towards bytes
        // that steer the parsers into their interesting states.
        const ALPHABET: &[u8] =
            b"GET /?HTTP1.0\r\n\r\n:; \tchunkedContent-Length0123456789abcdefF\x00\xff";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tight = Limits {
            max_header_bytes: 48,
            max_headers: 3,
            max_body_bytes: 32,
        };
        for _ in 0..5000 {
            let len = (next() % 96) as usize;
            let mut buf: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            if next() % 2 == 0 {
                buf.splice(0..0, b"POST / HTTP/1.1\r\n".iter().copied());
            }
            for lim in [limits(), tight] {
                if let Ok(Parsed::Complete(h)) = parse_head(&buf, &lim) {
                    assert!(h.head_len <= buf.len().min(lim.max_header_bytes));
                }
            }
            for kind in [BodyKind::Chunked, BodyKind::ContentLength(7)] {
                let mut dec = BodyDecoder::new(&kind, &tight).unwrap();
                let mut out = Vec::new();
                let mut rest = &buf[..];
                while let Ok((n, done)) = dec.decode(rest, &mut out) {
                    assert!(n <= rest.len());
                    rest = &rest[n..];
                    if done || n == 0 {
                        break;
                    }
                }
                assert!(out.len() <= tight.max_body_bytes);
            }
        }
    }

    #[test]
    fn json_escaping() {
        let mut out = Vec::new();
        json_escape_into(
            &mut out,
            "say \"hi\"\\path\nline\r\ttab\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f} é ✓ </script>",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"say \"hi\"\\path\nline\r\ttab\u0000\u0001\b\f\u001f"#.to_owned()
                + "\u{7f} é ✓ </script>"
        );

        let mut out = Vec::new();
        json_escape_into(&mut out, "plain");
        assert_eq!(out, b"plain");
    }

    #[test]
    fn json_escaping_agrees_with_serde_at_every_length_and_position() {
        // Each special character at each position of strings of 0 to 24 characters, so the
        // eight-byte steps and the tail both meet it; serde_json's escaping is the reference.
        let specials = ['"', '\\', '\n', '\u{1}', '\u{1f}', '\u{7f}', 'é', '✓'];
        for len in 0..25 {
            for at in 0..len.max(1) {
                for special in specials {
                    let text: String = (0..len)
                        .map(|i| {
                            if i == at {
                                special
                            } else {
                                (b'a' + (i % 26) as u8) as char
                            }
                        })
                        .collect();
                    let mut out = Vec::new();
                    json_escape_into(&mut out, &text);
                    let quoted = serde_json::to_string(&text).unwrap();
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        quoted[1..quoted.len() - 1],
                        "{text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn error_json() {
        let mut out = Vec::new();
        write_error_json(&mut out, "bad_request", "expected \"data\"\n\u{2}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"error":{"code":"bad_request","message":"expected \"data\"\n\u0002"}}"#
        );

        let err = HttpError::TooManyHeaders { max: 64 };
        let mut out = Vec::new();
        write_error_json(&mut out, err.code(), &err.message());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"error":{"code":"request_header_fields_too_large","message":"request has more than 64 header fields"}}"#
        );
    }
}
