//! WebSocket (RFC 6455) server-side codec: pure functions and one reassembly state machine over
//! `&[u8]`, no I/O.
//!
//! Owns:
//! * handshake validation ([`accept_key`]) of an upgrade request the HTTP codec has already
//!   parsed, and the `101 Switching Protocols` response ([`write_101`]); a refusal is an
//!   [`UpgradeError`] that says which status and headers to answer with;
//! * client-frame parsing and message reassembly ([`FrameReader`]): masking, reserved bits and
//!   opcodes, control-frame rules, fragmentation order, frame and message size limits, UTF-8 of
//!   text messages and close reasons, each failure mapped to the close code to send
//!   ([`ProtocolError::close_code`]);
//! * server-frame encoding ([`push_header`], [`text_frame`], [`write_text`], [`write_ping`],
//!   [`write_pong`], [`write_close`]): unmasked, FIN set, never fragmented.
//!
//! Must never:
//! * perform I/O, block or keep time: the connection loop owns the socket, the read buffer, ping
//!   timers and the closing handshake, and calls in here with whatever bytes it has. Incomplete
//!   input is `Ok(Decoded::Partial)`, never an error;
//! * panic on anything a peer sends: no `unwrap`, `expect` or unchecked indexing outside tests
//!   (enforced by the clippy lints below);
//! * allocate on a peer's behalf beyond one message bounded by `max_message_bytes`: a frame's
//!   length is checked from its header before any of its payload is looked at, and a fragmented
//!   message is checked against the limit before each fragment is appended. The payload of an
//!   incomplete frame stays in the caller's read buffer (which therefore needs room for
//!   `max_frame_bytes` plus a 14-byte header), never copied here until the frame is whole.
//!
//! Deliberately out of scope: extensions (nothing is negotiated, so any RSV bit is an error),
//! subprotocol and `Origin` policy (the caller decides and passes headers to [`write_101`]), the
//! client role (masking outgoing frames) and fragmenting outgoing messages.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt;
use std::io::Cursor;

use bytes::Bytes;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::http::codec::{BodyKind, Method, RequestHead};

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The only protocol version relay speaks (RFC 6455 §4.1, the final RFC's version).
pub const WEBSOCKET_VERSION: &str = "13";

/// An upgrade request relay refuses. Each variant maps to the HTTP response to send
/// ([`status`](Self::status), [`code`](Self::code), [`message`](Self::message),
/// [`response_headers`](Self::response_headers)); the connection stays plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeError {
    /// Status 400. Not a WebSocket upgrade, or not one relay can honour; says what was wrong.
    NotWebSocket(&'static str),
    /// Status 400. `Sec-WebSocket-Key` missing, repeated, or not 16 bytes of base64.
    BadKey,
    /// Status 426. `Sec-WebSocket-Version` missing, repeated or not 13; the reply must carry
    /// `Sec-WebSocket-Version: 13` so the client can retry with a version relay speaks (§4.4).
    UnsupportedVersion,
    /// Status 405. The opening handshake must be a GET (§4.1).
    MethodNotGet,
}

impl UpgradeError {
    pub fn status(&self) -> u16 {
        match self {
            UpgradeError::NotWebSocket(_) | UpgradeError::BadKey => 400,
            UpgradeError::UnsupportedVersion => 426,
            UpgradeError::MethodNotGet => 405,
        }
    }

    /// Machine-readable code for the JSON error body, in the HTTP codec's style.
    pub fn code(&self) -> &'static str {
        match self {
            UpgradeError::NotWebSocket(_) | UpgradeError::BadKey => "bad_request",
            UpgradeError::UnsupportedVersion => "upgrade_required",
            UpgradeError::MethodNotGet => "method_not_allowed",
        }
    }

    /// Human-readable message, safe to send to the peer (it echoes nothing the peer sent).
    pub fn message(&self) -> String {
        match self {
            UpgradeError::NotWebSocket(what) => (*what).to_owned(),
            UpgradeError::BadKey => {
                "Sec-WebSocket-Key must be one header of 16 bytes in base64".to_owned()
            }
            UpgradeError::UnsupportedVersion => "only WebSocket version 13 is supported".to_owned(),
            UpgradeError::MethodNotGet => "a WebSocket upgrade must use GET".to_owned(),
        }
    }

    /// Headers the error response must carry besides the usual ones: the supported version on
    /// a 426 (RFC 6455 §4.4) and `Allow` on a 405 (RFC 9110 §15.5.6).
    pub fn response_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            UpgradeError::UnsupportedVersion => &[("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
            UpgradeError::MethodNotGet => &[("Allow", "GET")],
            UpgradeError::NotWebSocket(_) | UpgradeError::BadKey => &[],
        }
    }
}

impl fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for UpgradeError {}

/// Checks a client's upgrade request (RFC 6455 §4.2.1): GET, HTTP/1.1, no body,
/// `Upgrade: websocket` (case-insensitive token of a comma-separated list), `Connection`
/// containing the token `upgrade` (same), exactly one `Sec-WebSocket-Version: 13`, and exactly
/// one `Sec-WebSocket-Key` that is canonical base64 of 16 bytes. Returns the
/// `Sec-WebSocket-Accept` value for [`write_101`].
///
/// Checks run in that order, so a request wrong in several ways gets the first error. `Host`,
/// `Origin` and `Sec-WebSocket-Protocol` are the caller's policy and not looked at here.
pub fn accept_key(head: &RequestHead) -> Result<String, UpgradeError> {
    if head.method != Method::Get {
        return Err(UpgradeError::MethodNotGet);
    }
    if head.minor_version != 1 {
        return Err(UpgradeError::NotWebSocket(
            "a WebSocket upgrade requires HTTP/1.1",
        ));
    }
    // Bytes after the head are WebSocket frames once we answer 101; a request body in front
    // of them would be read as frames (or smuggle them), so refuse rather than guess.
    if !matches!(head.body, BodyKind::None | BodyKind::ContentLength(0)) {
        return Err(UpgradeError::NotWebSocket(
            "a WebSocket upgrade request must not have a body",
        ));
    }
    if !has_token(head.headers_all("upgrade"), b"websocket") {
        return Err(UpgradeError::NotWebSocket(
            "missing Upgrade: websocket header",
        ));
    }
    if !has_token(head.headers_all("connection"), b"upgrade") {
        return Err(UpgradeError::NotWebSocket(
            "missing Connection: upgrade header",
        ));
    }

    let mut versions = head.headers_all("sec-websocket-version");
    match (versions.next(), versions.next()) {
        (Some(v), None) if trim_ows(v) == WEBSOCKET_VERSION.as_bytes() => {}
        _ => return Err(UpgradeError::UnsupportedVersion),
    }

    // RFC 6455 §11.3.1: the key must not appear more than once in a request.
    let mut keys = head.headers_all("sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => trim_ows(k),
        _ => return Err(UpgradeError::BadKey),
    };
    if !is_valid_key(key) {
        return Err(UpgradeError::BadKey);
    }
    Ok(derive_accept_key(key))
}

/// Appends the complete `101 Switching Protocols` response: `Upgrade`, `Connection`,
/// `Sec-WebSocket-Accept`, then `extra_headers` in order (e.g. `Sec-WebSocket-Protocol`).
///
/// Extra headers this response owns (`Upgrade`, `Connection`, `Sec-WebSocket-Accept`) or that a
/// 101 must not carry (`Content-Length`, `Transfer-Encoding`, RFC 9110 §8.6, RFC 9112 §6.1) are
/// skipped. CR, LF and NUL in names and values become spaces so nothing can split the response.
pub fn write_101(out: &mut Vec<u8>, accept: &str, extra_headers: &[(&str, &str)]) {
    const OWNED: [&str; 5] = [
        "upgrade",
        "connection",
        "sec-websocket-accept",
        "content-length",
        "transfer-encoding",
    ];
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    crate::http::codec::push_header(out, "Sec-WebSocket-Accept", accept);
    for &(name, value) in extra_headers {
        if !OWNED.iter().any(|owned| name.eq_ignore_ascii_case(owned)) {
            crate::http::codec::push_header(out, name, value);
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// True if any of the values, each a comma-separated list, holds `token` (case-insensitive).
/// Several fields of one name form one list (RFC 9110 §5.3), and browsers send e.g.
/// `Connection: keep-alive, Upgrade`.
fn has_token<'a>(mut values: impl Iterator<Item = &'a [u8]>, token: &[u8]) -> bool {
    values.any(|v| {
        v.split(|&b| b == b',')
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token))
    })
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A key is 16 bytes in padded base64: 22 alphabet characters and `==`. The last character
/// carries 2 data bits and 4 padding bits, which canonical encoders (every real client) leave
/// zero; requiring that makes "decodes to exactly 16 bytes" hold for strict decoders too.
fn is_valid_key(key: &[u8]) -> bool {
    let Ok(key) = <&[u8; 24]>::try_from(key) else {
        return false;
    };
    let [data @ .., last, b'=', b'='] = key else {
        return false;
    };
    data.iter().all(|&c| base64_value(c).is_some())
        && base64_value(*last).is_some_and(|v| v & 0x0F == 0)
}

fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading client frames
// ---------------------------------------------------------------------------------------------

/// Bounds applied to every client frame and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of a single frame. Checked from the header alone, so it also bounds how
    /// much the caller's read buffer must hold.
    pub max_frame_bytes: usize,
    /// Largest payload of a whole (possibly fragmented) data message.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 1024 * 1024,
            max_message_bytes: 1024 * 1024,
        }
    }
}

/// A complete message from the client, unmasked and reassembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Valid UTF-8 (checked before it is returned).
    Text(Bytes),
    Binary(Bytes),
    /// At most 125 bytes; the caller answers with [`write_pong`] carrying the same payload.
    Ping(Bytes),
    /// At most 125 bytes.
    Pong(Bytes),
    /// `None` for an empty close payload (the peer gave no code, i.e. 1005). Otherwise a code
    /// valid on the wire and a UTF-8 reason of at most 123 bytes.
    Close(Option<(u16, String)>),
}

/// Result of [`FrameReader::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Message(Message),
    /// Every complete frame at the front of the buffer has been absorbed and no message is
    /// complete yet: call again once more bytes have been appended.
    Partial,
}

/// A client that broke the protocol. Every variant is fatal: send a close frame with
/// [`close_code`](Self::close_code) and [`reason`](Self::reason), then stop reading, since the
/// byte stream can no longer be trusted. The reader's state after an error is unspecified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A client frame without the mask bit (RFC 6455 §5.1).
    Unmasked,
    /// RSV1, RSV2 or RSV3 set without a negotiated extension (§5.2).
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF (§5.2).
    ReservedOpcode,
    /// A control frame without FIN (§5.5).
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload (§5.5).
    ControlTooLong,
    /// A continuation frame with no fragmented message in progress (§5.4).
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is still open (§5.4).
    ExpectedContinuation,
    /// The header announces more than `max_frame_bytes`.
    FrameTooLarge { size: u64, max: usize },
    /// The message so far plus this frame would exceed `max_message_bytes`.
    MessageTooLarge { size: usize, max: usize },
    /// A text message or close reason that is not UTF-8 (§8.1).
    InvalidUtf8,
    /// A close code that may not be sent on the wire (§7.4).
    InvalidCloseCode(u16),
    /// A close payload of exactly one byte (§5.5.1: a code is two bytes).
    InvalidClosePayload,
}

impl ProtocolError {
    /// The status code for our close frame (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 => 1007,
            ProtocolError::FrameTooLarge { .. } | ProtocolError::MessageTooLarge { .. } => 1009,
            ProtocolError::Unmasked
            | ProtocolError::ReservedBits
            | ProtocolError::ReservedOpcode
            | ProtocolError::FragmentedControl
            | ProtocolError::ControlTooLong
            | ProtocolError::UnexpectedContinuation
            | ProtocolError::ExpectedContinuation
            | ProtocolError::InvalidCloseCode(_)
            | ProtocolError::InvalidClosePayload => 1002,
        }
    }

    /// Short reason for our close frame; always fits its 123-byte limit.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtocolError::Unmasked => "client frames must be masked",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpcode => "reserved opcode",
            ProtocolError::FragmentedControl => "fragmented control frame",
            ProtocolError::ControlTooLong => "control frame payload over 125 bytes",
            ProtocolError::UnexpectedContinuation => "continuation frame without a message",
            ProtocolError::ExpectedContinuation => "new message before the last one finished",
            ProtocolError::FrameTooLarge { .. } => "frame too large",
            ProtocolError::MessageTooLarge { .. } => "message too large",
            ProtocolError::InvalidUtf8 => "invalid UTF-8",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::InvalidClosePayload => "invalid close payload",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::FrameTooLarge { size, max } => {
                write!(f, "frame of {size} bytes exceeds the {max}-byte limit")
            }
            ProtocolError::MessageTooLarge { size, max } => {
                write!(
                    f,
                    "message of at least {size} bytes exceeds the {max}-byte limit"
                )
            }
            ProtocolError::InvalidCloseCode(code) => write!(f, "invalid close code {code}"),
            other => f.write_str(other.reason()),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Which data message a run of fragments belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Binary,
}

/// What one frame at the front of the buffer amounted to.
enum Step {
    /// The frame is not complete yet.
    Incomplete,
    /// A non-final data fragment of this many bytes went into the reassembly buffer.
    Absorbed(usize),
    /// A frame of this many bytes completed a message.
    Complete(usize, Message),
}

/// Client-frame parser and message reassembler for one connection.
///
/// Usage: append socket bytes to a read buffer, call [`read`](Self::read) with it, drain the
/// consumed bytes, and repeat while it returns a message; on `Partial` wait for more bytes.
#[derive(Debug)]
pub struct FrameReader {
    /// The [`Limits`], each kept as a `u32` (the reader lives as long as its connection, and no
    /// frame or message may come near 4 GiB).
    max_frame_bytes: u32,
    max_message_bytes: u32,
    /// The fragmented data message in progress, if any.
    open: Option<Kind>,
    /// Unmasked payload of the fragments of `open` received so far.
    message: Vec<u8>,
    /// Length of the prefix of `message` known to be valid UTF-8 (text only). Whatever follows
    /// is at most 3 bytes: a character whose remaining bytes come in a later fragment.
    utf8_valid: usize,
}

impl FrameReader {
    pub fn new(limits: Limits) -> Self {
        let as_u32 = |max: usize| u32::try_from(max).unwrap_or(u32::MAX);
        FrameReader {
            max_frame_bytes: as_u32(limits.max_frame_bytes),
            max_message_bytes: as_u32(limits.max_message_bytes),
            open: None,
            message: Vec::new(),
            utf8_valid: 0,
        }
    }

    /// Parses at most one complete message from the front of `buf`, returning how many bytes it
    /// consumed (the caller drains them).
    ///
    /// Control frames interleaved in a fragmented message are returned as soon as they are
    /// complete; the partial data message stays in the reader. `Partial` consumes 0 bytes
    /// unless whole data fragments were absorbed into the reassembly buffer, in which case it
    /// consumes exactly those frames. Complete fragments are absorbed in one call rather than
    /// one per call, so `Partial` always means "nothing more to do until more bytes arrive".
    pub fn read(&mut self, buf: &[u8]) -> Result<(usize, Decoded), ProtocolError> {
        let mut consumed = 0usize;
        loop {
            let rest = buf.get(consumed..).unwrap_or_default();
            match self.read_frame(rest)? {
                Step::Incomplete => return Ok((consumed, Decoded::Partial)),
                Step::Absorbed(n) => consumed += n,
                Step::Complete(n, message) => return Ok((consumed + n, Decoded::Message(message))),
            }
        }
    }

    /// Handles the one frame at the front of `buf`.
    fn read_frame(&mut self, buf: &[u8]) -> Result<Step, ProtocolError> {
        // Check what the first two bytes already tell before waiting for the rest of the
        // header: a peer sending garbage is cut off at once rather than after 14 bytes.
        let Some(&first) = buf.first() else {
            return Ok(Step::Incomplete);
        };
        // Masked to 4 bits: tungstenite's `From<u8>` panics only above 15.
        let opcode = OpCode::from(first & 0x0F);
        self.check_first_byte(first, opcode)?;
        let Some(&second) = buf.get(1) else {
            return Ok(Step::Incomplete);
        };
        check_second_byte(second, opcode)?;

        let mut cursor = Cursor::new(buf);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(Step::Incomplete),
            // An in-memory cursor cannot fail to read, so tungstenite's only error left is a
            // reserved opcode, which `check_first_byte` has already refused.
            Err(_) => return Err(ProtocolError::ReservedOpcode),
        };
        let Some(mask) = header.mask else {
            return Err(ProtocolError::Unmasked);
        };

        // Size checks use the announced length only, before any payload is touched.
        let frame_too_large = ProtocolError::FrameTooLarge {
            size: len,
            max: self.max_frame_bytes as usize,
        };
        let len = match usize::try_from(len) {
            Ok(n) if n <= self.max_frame_bytes as usize => n,
            _ => return Err(frame_too_large),
        };
        if let OpCode::Data(_) = opcode {
            let size = self.message.len().saturating_add(len);
            if size > self.max_message_bytes as usize {
                return Err(ProtocolError::MessageTooLarge {
                    size,
                    max: self.max_message_bytes as usize,
                });
            }
        }

        // The header is at most 14 bytes, so neither conversion nor sum can really fail; the
        // fallbacks only keep this panic-free.
        let header_len = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
        let Some(frame_len) = header_len.checked_add(len) else {
            return Err(frame_too_large);
        };
        let Some(payload) = buf.get(header_len..frame_len) else {
            return Ok(Step::Incomplete);
        };

        match opcode {
            OpCode::Control(control) => {
                let message = read_control(control, payload, mask)?;
                Ok(Step::Complete(frame_len, message))
            }
            OpCode::Data(data) => Ok(
                match self.read_data(data, header.is_final, payload, mask)? {
                    Some(message) => Step::Complete(frame_len, message),
                    None => Step::Absorbed(frame_len),
                },
            ),
        }
    }

    /// RSV bits, opcode, FIN of control frames and fragmentation order: all in byte one.
    fn check_first_byte(&self, first: u8, opcode: OpCode) -> Result<(), ProtocolError> {
        let fin = first & 0x80 != 0;
        if first & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        match opcode {
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                Err(ProtocolError::ReservedOpcode)
            }
            OpCode::Control(_) if !fin => Err(ProtocolError::FragmentedControl),
            OpCode::Data(Data::Continue) if self.open.is_none() => {
                Err(ProtocolError::UnexpectedContinuation)
            }
            OpCode::Data(Data::Text | Data::Binary) if self.open.is_some() => {
                Err(ProtocolError::ExpectedContinuation)
            }
            _ => Ok(()),
        }
    }

    /// A data frame: a whole message on its own, or a fragment to reassemble.
    fn read_data(
        &mut self,
        data: Data,
        fin: bool,
        payload: &[u8],
        mask: [u8; 4],
    ) -> Result<Option<Message>, ProtocolError> {
        let kind = match data {
            Data::Text => Kind::Text,
            Data::Binary => Kind::Binary,
            // `check_first_byte` guarantees a message is open here.
            Data::Continue => self.open.ok_or(ProtocolError::UnexpectedContinuation)?,
            Data::Reserved(_) => return Err(ProtocolError::ReservedOpcode),
        };
        let starts_message = data != Data::Continue;

        if starts_message && fin {
            // Unfragmented, the common case: skip the reassembly buffer entirely.
            let mut bytes = Vec::with_capacity(payload.len());
            unmask_into(&mut bytes, payload, mask);
            if kind == Kind::Text && std::str::from_utf8(&bytes).is_err() {
                return Err(ProtocolError::InvalidUtf8);
            }
            return Ok(Some(message_of(kind, bytes)));
        }
        if starts_message {
            self.open = Some(kind);
            self.message.clear();
            self.utf8_valid = 0;
        }

        self.append(payload, mask);
        if kind == Kind::Text {
            self.check_text_so_far(fin)?;
        }
        if !fin {
            return Ok(None);
        }
        self.open = None;
        self.utf8_valid = 0;
        // Text was validated fragment by fragment, the last one included.
        Ok(Some(message_of(kind, std::mem::take(&mut self.message))))
    }

    /// Appends an unmasked fragment. Capacity grows by doubling for amortised O(n) copying,
    /// but never past `max_message_bytes` (already checked to hold the result), so a peer
    /// cannot make the buffer's allocation overshoot the limit.
    fn append(&mut self, payload: &[u8], mask: [u8; 4]) {
        let needed = self.message.len().saturating_add(payload.len());
        if needed > self.message.capacity() {
            let target = self
                .message
                .capacity()
                .saturating_mul(2)
                .max(needed)
                .min((self.max_message_bytes as usize).max(needed));
            self.message
                .reserve_exact(target.saturating_sub(self.message.len()));
        }
        unmask_into(&mut self.message, payload, mask);
    }

    /// Validates the text received since the last fragment. A character split across
    /// fragments is left for the next call, unless this was the final fragment; anything else
    /// invalid fails at once rather than after the whole message has been buffered.
    fn check_text_so_far(&mut self, complete: bool) -> Result<(), ProtocolError> {
        let unchecked = self.message.get(self.utf8_valid..).unwrap_or_default();
        match std::str::from_utf8(unchecked) {
            Ok(_) => self.utf8_valid = self.message.len(),
            // `error_len() == None`: the input ends inside a character that may still be
            // completed by the next fragment.
            Err(e) if e.error_len().is_none() && !complete => self.utf8_valid += e.valid_up_to(),
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Mask bit and control-frame length: all in byte two.
fn check_second_byte(second: u8, opcode: OpCode) -> Result<(), ProtocolError> {
    if second & 0x80 == 0 {
        return Err(ProtocolError::Unmasked);
    }
    // 126 and 127 announce extended lengths, which are over 125 by construction.
    if matches!(opcode, OpCode::Control(_)) && second & 0x7F > 125 {
        return Err(ProtocolError::ControlTooLong);
    }
    Ok(())
}

fn message_of(kind: Kind, bytes: Vec<u8>) -> Message {
    match kind {
        Kind::Text => Message::Text(Bytes::from(bytes)),
        Kind::Binary => Message::Binary(Bytes::from(bytes)),
    }
}

/// A complete control frame (at most 125 bytes, checked from the header).
fn read_control(control: Control, payload: &[u8], mask: [u8; 4]) -> Result<Message, ProtocolError> {
    let mut bytes = Vec::with_capacity(payload.len());
    unmask_into(&mut bytes, payload, mask);
    match control {
        Control::Ping => Ok(Message::Ping(Bytes::from(bytes))),
        Control::Pong => Ok(Message::Pong(Bytes::from(bytes))),
        Control::Close => parse_close(&bytes),
        Control::Reserved(_) => Err(ProtocolError::ReservedOpcode),
    }
}

/// Close payload: empty, or a two-byte code followed by a UTF-8 reason (RFC 6455 §5.5.1).
fn parse_close(payload: &[u8]) -> Result<Message, ProtocolError> {
    match payload {
        [] => Ok(Message::Close(None)),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Message::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// Codes a peer may put on the wire (RFC 6455 §7.4 and the IANA registry, as Autobahn checks
/// them): the defined ones except 1004 (reserved), 1005, 1006 and 1015 (local-only), and the
/// library/application range 3000-4999. Everything else is unassigned or reserved.
fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Appends `src` XOR-ed with the repeating 4-byte `mask` (RFC 6455 §5.3).
fn unmask_into(dst: &mut Vec<u8>, src: &[u8], mask: [u8; 4]) {
    let start = dst.len();
    dst.extend_from_slice(src);
    if let Some(tail) = dst.get_mut(start..) {
        unmask(tail, mask);
    }
}

/// Unmasks in place 8 bytes at a time (tungstenite does not export its `apply_mask`). Each
/// 8-byte word holds the mask twice, so native byte order on both sides keeps bytes aligned
/// with their mask byte whatever the platform's endianness.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = data.chunks_exact_mut(8);
    for word in &mut words {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*word) {
            word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
        }
    }
    // The words covered a multiple of 4 bytes, so the remainder starts at mask byte 0.
    for (byte, m) in words.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
}

// ---------------------------------------------------------------------------------------------
// Writing server frames
// ---------------------------------------------------------------------------------------------

pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Appends a server frame header: FIN set, no RSV bits, unmasked (servers must not mask,
/// §5.1), with the shortest length encoding (§5.2). Only the low 4 bits of `opcode` are used.
pub fn push_header(out: &mut Vec<u8>, opcode: u8, payload_len: usize) {
    out.push(0x80 | (opcode & 0x0F));
    match (u8::try_from(payload_len), u16::try_from(payload_len)) {
        (Ok(n), _) if n < 126 => out.push(n),
        (_, Ok(n)) => {
            out.push(126);
            out.extend_from_slice(&n.to_be_bytes());
        }
        _ => {
            out.push(127);
            // usize is at most 64 bits on every platform Rust supports.
            let n = u64::try_from(payload_len).unwrap_or(u64::MAX);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// One complete text frame, ready to share between many subscribers' write queues.
/// `payload` must be UTF-8; it is not re-checked here.
pub fn text_frame(payload: &[u8]) -> Bytes {
    // Exactly the frame's size: `Bytes` takes a vector whose length is its capacity as it is,
    // and any other with one more allocation for a shared header.
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_text(&mut out, payload);
    debug_assert_eq!(out.len(), out.capacity());
    Bytes::from(out)
}

/// The length of a server frame's header (no mask) for `payload_len` bytes of payload.
fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Appends a text frame. `payload` must be UTF-8; it is not re-checked here.
pub fn write_text(out: &mut Vec<u8>, payload: &[u8]) {
    push_header(out, OPCODE_TEXT, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a pong. Control payloads are capped at 125 bytes, so a longer `payload` is cut
/// there rather than emitting a frame the client must reject; an echoed ping always fits.
pub fn write_pong(out: &mut Vec<u8>, payload: &[u8]) {
    write_control(out, OPCODE_PONG, payload);
}

/// Appends a ping; `payload` beyond 125 bytes is cut, as for [`write_pong`].
pub fn write_ping(out: &mut Vec<u8>, payload: &[u8]) {
    write_control(out, OPCODE_PING, payload);
}

fn write_control(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let payload = payload.get(..MAX_CONTROL_PAYLOAD).unwrap_or(payload);
    push_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and `reason`. The reason is cut to fit the 123 bytes left
/// after the code, on a char boundary so it stays UTF-8. The caller picks a code valid on the
/// wire (never 1005, 1006 or 1015).
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    // Terminates: 0 is always a char boundary.
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = reason.get(..end).unwrap_or_default();
    push_header(out, OPCODE_CLOSE, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    // ---- handshake -----------------------------------------------------------------------

    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    /// RFC 6455 §1.3's value (also SHA-1 + base64 computed independently of tungstenite).
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// A request head as the HTTP codec would produce it (names lower-cased).
    fn head_with(method: Method, minor_version: u8, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead::for_test(method, minor_version, "/api/v1/relay/ws", headers)
    }

    fn valid_headers() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Host", "relay.example"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Version", "13"),
        ]
    }

    /// The valid request with header `name` replaced by `value`, or removed for `None`.
    fn with_header(name: &str, value: Option<&'static str>) -> RequestHead {
        let mut headers: Vec<_> = valid_headers()
            .into_iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(name))
            .collect();
        if let Some(v) = value {
            headers.push((
                Box::leak(name.to_owned().into_boxed_str()) as &'static str,
                v,
            ));
        }
        head_with(Method::Get, 1, &headers)
    }

    #[test]
    fn rfc_example_key() {
        let head = head_with(Method::Get, 1, &valid_headers());
        assert_eq!(accept_key(&head).unwrap(), RFC_ACCEPT);
    }

    #[test]
    fn upgrade_header_required_and_case_insensitive() {
        let missing = accept_key(&with_header("upgrade", None)).unwrap_err();
        assert!(matches!(missing, UpgradeError::NotWebSocket(_)));
        assert_eq!(missing.status(), 400);
        assert_eq!(missing.code(), "bad_request");
        assert!(missing.message().contains("Upgrade"));

        let odd = accept_key(&with_header("upgrade", Some("h2c"))).unwrap_err();
        assert!(matches!(odd, UpgradeError::NotWebSocket(_)));
        let near = accept_key(&with_header("upgrade", Some("websocket2"))).unwrap_err();
        assert!(matches!(near, UpgradeError::NotWebSocket(_)));

        assert_eq!(
            accept_key(&with_header("upgrade", Some("WebSocket"))).unwrap(),
            RFC_ACCEPT
        );
        assert_eq!(
            accept_key(&with_header("upgrade", Some("h2c, websocket"))).unwrap(),
            RFC_ACCEPT
        );
    }

    #[test]
    fn connection_header_token_list() {
        let keep_alive = accept_key(&with_header("connection", Some("keep-alive"))).unwrap_err();
        assert!(matches!(keep_alive, UpgradeError::NotWebSocket(_)));
        assert!(keep_alive.message().contains("Connection"));
        let missing = accept_key(&with_header("connection", None)).unwrap_err();
        assert!(matches!(missing, UpgradeError::NotWebSocket(_)));
        // A substring is not a token.
        let sub = accept_key(&with_header("connection", Some("upgrade-insecure"))).unwrap_err();
        assert!(matches!(sub, UpgradeError::NotWebSocket(_)));

        // Firefox sends the list form.
        for value in ["keep-alive, Upgrade", "keep-alive,upgrade", " UPGRADE "] {
            assert_eq!(
                accept_key(&with_header("connection", Some(value))).unwrap(),
                RFC_ACCEPT,
                "{value}"
            );
        }

        // Two Connection fields form one list.
        let mut headers = valid_headers();
        headers.retain(|(n, _)| *n != "Connection");
        headers.push(("Connection", "keep-alive"));
        headers.push(("Connection", "Upgrade"));
        assert_eq!(
            accept_key(&head_with(Method::Get, 1, &headers)).unwrap(),
            RFC_ACCEPT
        );
    }

    #[test]
    fn version_other_than_13_is_426() {
        for value in [Some("8"), Some("12"), Some("13, 8"), None] {
            let err = accept_key(&with_header("sec-websocket-version", value)).unwrap_err();
            assert_eq!(err, UpgradeError::UnsupportedVersion, "{value:?}");
            assert_eq!(err.status(), 426);
            assert_eq!(err.code(), "upgrade_required");
            assert_eq!(
                err.response_headers(),
                &[("Sec-WebSocket-Version", "13")][..]
            );
        }
        let mut headers = valid_headers();
        headers.push(("Sec-WebSocket-Version", "13"));
        assert_eq!(
            accept_key(&head_with(Method::Get, 1, &headers)),
            Err(UpgradeError::UnsupportedVersion)
        );
    }

    #[test]
    fn bad_keys() {
        let bad = [
            None,
            Some(""),
            Some("dGhlIHNhbXBsZSBub25jZQ"),           // unpadded
            Some("dGhlIHNhbXBsZSBub25jZQ="),          // 23 chars
            Some("dGhlIHNhbXBsZSBub25jZQ==="),        // 25 chars
            Some("dGhlIHNhbXBsZSBub25jZ!=="),         // not base64
            Some("dGhlIHNhbXBsZSBub25jZR=="),         // non-zero padding bits
            Some("dGhlIHNhbXBsZSBub25jZQ=A"),         // padding in the wrong place
            Some("dGhlIHNhbXBsZSBub25jZSBtb3JlIQ=="), // decodes to 23 bytes
            Some("dGhlIHNhbXBsZSBub25jZQ=\n"),
        ];
        for value in bad {
            let err = accept_key(&with_header("sec-websocket-key", value)).unwrap_err();
            assert_eq!(err, UpgradeError::BadKey, "{value:?}");
            assert_eq!(err.status(), 400);
        }
        let mut headers = valid_headers();
        headers.push(("Sec-WebSocket-Key", RFC_KEY));
        assert_eq!(
            accept_key(&head_with(Method::Get, 1, &headers)),
            Err(UpgradeError::BadKey)
        );
        // Every base64 character is accepted, including '+' and '/'.
        assert!(accept_key(&with_header(
            "sec-websocket-key",
            Some("+/+/AAAAAAAAAAAAAAAAAA==")
        ))
        .is_ok());
    }

    #[test]
    fn method_and_version_and_body() {
        let post = accept_key(&head_with(Method::Post, 1, &valid_headers())).unwrap_err();
        assert_eq!(post, UpgradeError::MethodNotGet);
        assert_eq!(post.status(), 405);
        assert_eq!(post.code(), "method_not_allowed");
        assert_eq!(post.response_headers(), &[("Allow", "GET")][..]);
        let lower = head_with(Method::Other("get".to_owned()), 1, &valid_headers());
        assert_eq!(accept_key(&lower), Err(UpgradeError::MethodNotGet));

        let http10 = accept_key(&head_with(Method::Get, 0, &valid_headers())).unwrap_err();
        assert!(matches!(http10, UpgradeError::NotWebSocket(_)));
        assert_eq!(http10.status(), 400);

        let mut with_body = head_with(Method::Get, 1, &valid_headers());
        with_body.body = BodyKind::ContentLength(5);
        assert!(matches!(
            accept_key(&with_body),
            Err(UpgradeError::NotWebSocket(_))
        ));
        with_body.body = BodyKind::Chunked;
        assert!(matches!(
            accept_key(&with_body),
            Err(UpgradeError::NotWebSocket(_))
        ));
        with_body.body = BodyKind::ContentLength(0);
        assert_eq!(accept_key(&with_body).unwrap(), RFC_ACCEPT);
    }

    #[test]
    fn write_101_exact_bytes() {
        let mut out = Vec::new();
        write_101(&mut out, RFC_ACCEPT, &[]);
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );

        let mut out = Vec::new();
        write_101(
            &mut out,
            RFC_ACCEPT,
            &[
                ("Sec-WebSocket-Protocol", "relay.v1"),
                ("Content-Length", "0"),
                ("connection", "close"),
                ("X-Evil", "a\r\nSet-Cookie: x"),
            ],
        );
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              Sec-WebSocket-Protocol: relay.v1\r\n\
              X-Evil: a  Set-Cookie: x\r\n\r\n"
        );
    }

    // ---- reading client frames -----------------------------------------------------------

    /// The RFC 6455 §5.7 mask, used for every test frame.
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn limits() -> Limits {
        Limits {
            max_frame_bytes: 1000,
            max_message_bytes: 2000,
        }
    }

    /// Header of a masked client frame; `first` is FIN/RSV/opcode.
    fn client_header(first: u8, len: u64) -> Vec<u8> {
        let mut out = vec![first];
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        out.extend_from_slice(&MASK);
        out
    }

    /// A complete masked client frame. Masks byte by byte, independently of `unmask`.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = client_header(first, payload.len() as u64);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    const FIN: u8 = 0x80;
    /// A final continuation frame: FIN with opcode 0.
    const FIN_CONT: u8 = FIN;

    fn reader() -> FrameReader {
        FrameReader::new(limits())
    }

    fn read_message(r: &mut FrameReader, buf: &[u8]) -> (usize, Message) {
        match r.read(buf) {
            Ok((n, Decoded::Message(m))) => (n, m),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn read_err(r: &mut FrameReader, buf: &[u8]) -> ProtocolError {
        match r.read(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn text(s: &str) -> Message {
        Message::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message containing "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut r = reader();
        assert_eq!(read_message(&mut r, &frame), (11, text("Hello")));
        assert_eq!(client_frame(FIN | 0x1, b"Hello"), frame);
    }

    #[test]
    fn empty_buffer_is_partial() {
        assert_eq!(reader().read(&[]), Ok((0, Decoded::Partial)));
    }

    #[test]
    fn one_byte_at_a_time() {
        let payload = "one byte at a time, long enough for the 8-byte unmask path: é€😀";
        let frame = client_frame(FIN | 0x1, payload.as_bytes());
        let mut r = reader();
        for end in 0..frame.len() {
            assert_eq!(
                r.read(&frame[..end]),
                Ok((0, Decoded::Partial)),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(read_message(&mut r, &frame), (frame.len(), text(payload)));
    }

    #[test]
    fn consumes_only_the_first_of_two_messages() {
        let mut buf = client_frame(FIN | 0x1, b"first");
        let first_len = buf.len();
        buf.extend(client_frame(FIN | 0x1, b"second"));
        buf.extend(&client_header(FIN | 0x1, 3)[..3]); // a third, incomplete
        let mut r = reader();
        let (n, m) = read_message(&mut r, &buf);
        assert_eq!((n, m), (first_len, text("first")));
        let rest = &buf[n..];
        let (n2, m2) = read_message(&mut r, rest);
        assert_eq!(m2, text("second"));
        assert_eq!(r.read(&rest[n2..]), Ok((0, Decoded::Partial)));
    }

    #[test]
    fn fragmented_text_with_ping_in_the_middle() {
        let f1 = client_frame(0x1, b"Hel");
        let f2 = client_frame(0x0, b"lo, ");
        let ping = client_frame(FIN | 0x9, b"are you there");
        let f3 = client_frame(FIN_CONT, b"world");
        let mut buf = [f1.clone(), f2.clone(), ping.clone(), f3.clone()].concat();

        let mut r = reader();
        let (n, m) = read_message(&mut r, &buf);
        assert_eq!(m, Message::Ping(Bytes::from_static(b"are you there")));
        assert_eq!(n, f1.len() + f2.len() + ping.len());
        buf.drain(..n);
        assert_eq!(read_message(&mut r, &buf), (f3.len(), text("Hello, world")));

        // The same, fed frame by frame: each fragment is absorbed and consumed on its own.
        let mut r = reader();
        assert_eq!(r.read(&f1), Ok((f1.len(), Decoded::Partial)));
        assert_eq!(r.read(&f2[..f2.len() - 1]), Ok((0, Decoded::Partial)));
        assert_eq!(r.read(&f2), Ok((f2.len(), Decoded::Partial)));
        assert!(matches!(read_message(&mut r, &ping).1, Message::Ping(_)));
        assert_eq!(read_message(&mut r, &f3).1, text("Hello, world"));

        // The reader is ready for a new message afterwards.
        assert_eq!(
            read_message(&mut r, &client_frame(FIN | 0x1, b"next")).1,
            text("next")
        );
    }

    #[test]
    fn binary_messages() {
        let mut r = reader();
        let payload: Vec<u8> = (0..=255).collect();
        let (_, m) = read_message(&mut r, &client_frame(FIN | 0x2, &payload));
        assert_eq!(m, Message::Binary(Bytes::from(payload.clone())));

        // Fragmented binary is not UTF-8-checked.
        let buf = [
            client_frame(0x2, &[0xff, 0xfe]),
            client_frame(FIN_CONT, &[0xc3]),
        ]
        .concat();
        assert_eq!(
            read_message(&mut r, &buf).1,
            Message::Binary(Bytes::from_static(&[0xff, 0xfe, 0xc3]))
        );
    }

    #[test]
    fn empty_messages_and_fragments() {
        let mut r = reader();
        assert_eq!(
            read_message(&mut r, &client_frame(FIN | 0x1, b"")).1,
            text("")
        );
        let buf = [
            client_frame(0x1, b""),
            client_frame(0x0, b""),
            client_frame(FIN_CONT, b""),
        ]
        .concat();
        assert_eq!(read_message(&mut r, &buf), (buf.len(), text("")));
        assert_eq!(
            read_message(&mut r, &client_frame(FIN | 0xA, b"")).1,
            Message::Pong(Bytes::new())
        );
    }

    #[test]
    fn unmasked_frames_are_refused() {
        let mut r = reader();
        // Detected from the second byte, before the rest of the frame arrives.
        let err = read_err(&mut r, &[0x81, 0x05]);
        assert_eq!(err, ProtocolError::Unmasked);
        assert_eq!(err.close_code(), 1002);
        assert_eq!(read_err(&mut r, b"\x81\x05Hello"), ProtocolError::Unmasked);
        assert_eq!(read_err(&mut r, &[0x89, 0x00]), ProtocolError::Unmasked);
    }

    #[test]
    fn reserved_bits_are_refused() {
        for rsv in [0x40, 0x20, 0x10, 0x70] {
            let mut r = reader();
            let err = read_err(&mut r, &client_frame(FIN | rsv | 0x1, b"x"));
            assert_eq!(err, ProtocolError::ReservedBits);
            assert_eq!(err.close_code(), 1002);
            // Known from the first byte alone.
            assert_eq!(
                read_err(&mut r, &[FIN | rsv | 0x1]),
                ProtocolError::ReservedBits
            );
        }
    }

    #[test]
    fn reserved_opcodes_are_refused() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            let err = read_err(&mut reader(), &client_frame(FIN | op, b""));
            assert_eq!(err, ProtocolError::ReservedOpcode, "opcode {op:#x}");
            assert_eq!(err.close_code(), 1002);
            assert_eq!(
                read_err(&mut reader(), &[FIN | op]),
                ProtocolError::ReservedOpcode
            );
        }
    }

    #[test]
    fn control_frame_rules() {
        let long = [b'p'; 126];
        for op in [0x8, 0x9, 0xA] {
            let err = read_err(&mut reader(), &client_frame(FIN | op, &long));
            assert_eq!(err, ProtocolError::ControlTooLong, "opcode {op:#x}");
            assert_eq!(err.close_code(), 1002);
            // From the first two bytes: 126 announces an extended length.
            assert_eq!(
                read_err(&mut reader(), &[FIN | op, 0x80 | 126]),
                ProtocolError::ControlTooLong
            );

            let err = read_err(&mut reader(), &client_frame(op, b"x"));
            assert_eq!(err, ProtocolError::FragmentedControl, "opcode {op:#x}");
            assert_eq!(err.close_code(), 1002);
        }
        // Exactly 125 is fine.
        let (_, m) = read_message(&mut reader(), &client_frame(FIN | 0x9, &[b'p'; 125]));
        assert_eq!(m, Message::Ping(Bytes::copy_from_slice(&[b'p'; 125])));
    }

    #[test]
    fn fragmentation_order() {
        let err = read_err(&mut reader(), &client_frame(FIN_CONT, b"orphan"));
        assert_eq!(err, ProtocolError::UnexpectedContinuation);
        assert_eq!(err.close_code(), 1002);
        let err = read_err(&mut reader(), &client_frame(0x0, b"orphan"));
        assert_eq!(err, ProtocolError::UnexpectedContinuation);

        for second in [0x1, FIN | 0x1, 0x2, FIN | 0x2] {
            let mut r = reader();
            let buf = [client_frame(0x1, b"open"), client_frame(second, b"new")].concat();
            let err = read_err(&mut r, &buf);
            assert_eq!(err, ProtocolError::ExpectedContinuation, "{second:#x}");
            assert_eq!(err.close_code(), 1002);
        }

        // A message finished with FIN is closed: a continuation after it is an orphan.
        let mut r = reader();
        read_message(&mut r, &client_frame(FIN | 0x1, b"done"));
        assert_eq!(
            read_err(&mut r, &client_frame(FIN_CONT, b"more")),
            ProtocolError::UnexpectedContinuation
        );
    }

    #[test]
    fn frame_over_limit_from_header_alone() {
        let header = client_header(FIN | 0x2, 1001);
        assert_eq!(header.len(), 8);
        let err = read_err(&mut reader(), &header);
        assert_eq!(
            err,
            ProtocolError::FrameTooLarge {
                size: 1001,
                max: 1000
            }
        );
        assert_eq!(err.close_code(), 1009);
        // Before the mask arrives the length is not known yet: still partial.
        assert_eq!(reader().read(&header[..4]), Ok((0, Decoded::Partial)));

        // Exactly at the limit is fine.
        let payload = vec![7u8; 1000];
        let (_, m) = read_message(&mut reader(), &client_frame(FIN | 0x2, &payload));
        assert_eq!(m, Message::Binary(Bytes::from(payload)));
    }

    #[test]
    fn sixty_four_bit_lengths() {
        let mut r = FrameReader::new(Limits {
            max_frame_bytes: 100_000,
            max_message_bytes: 100_000,
        });
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let frame = client_frame(FIN | 0x2, &payload);
        assert_eq!(&frame[1..10], &[0x80 | 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(r.read(&frame[..frame.len() - 1]), Ok((0, Decoded::Partial)));
        assert_eq!(
            read_message(&mut r, &frame),
            (frame.len(), Message::Binary(Bytes::from(payload)))
        );

        // Huge announced lengths, including ones that overflow usize arithmetic.
        for len in [1u64 << 40, u64::MAX, (1 << 63) + 5] {
            let header = client_header(FIN | 0x2, len);
            assert_eq!(header.len(), 14);
            assert_eq!(
                read_err(&mut r, &header),
                ProtocolError::FrameTooLarge {
                    size: len,
                    max: 100_000
                }
            );
        }

        // 16-bit form.
        let payload = vec![b'a'; 300];
        let frame = client_frame(FIN | 0x1, &payload);
        assert_eq!(&frame[1..4], &[0x80 | 126, 0x01, 0x2c]);
        assert_eq!(
            read_message(&mut reader(), &frame).1,
            text(&"a".repeat(300))
        );
    }

    #[test]
    fn message_over_limit_across_fragments() {
        let mut r = FrameReader::new(Limits {
            max_frame_bytes: 100,
            max_message_bytes: 10,
        });
        assert_eq!(
            r.read(&client_frame(0x1, b"123456")),
            Ok((12, Decoded::Partial))
        );
        // The second fragment's header alone is enough to refuse it.
        let err = read_err(&mut r, &client_header(0x0, 6));
        assert_eq!(err, ProtocolError::MessageTooLarge { size: 12, max: 10 });
        assert_eq!(err.close_code(), 1009);

        // Exactly the limit across fragments is fine.
        let mut r = FrameReader::new(Limits {
            max_frame_bytes: 100,
            max_message_bytes: 10,
        });
        let buf = [
            client_frame(0x1, b"12345"),
            client_frame(FIN_CONT, b"67890"),
        ]
        .concat();
        assert_eq!(read_message(&mut r, &buf).1, text("1234567890"));
        assert!(
            r.message.capacity() <= 10,
            "capacity {}",
            r.message.capacity()
        );

        // A single frame within the frame limit but over the message limit.
        let err = read_err(&mut r, &client_header(FIN | 0x1, 11));
        assert_eq!(err, ProtocolError::MessageTooLarge { size: 11, max: 10 });
    }

    #[test]
    fn reassembly_capacity_stays_within_the_message_limit() {
        let mut r = FrameReader::new(Limits {
            max_frame_bytes: 1000,
            max_message_bytes: 1000,
        });
        let mut buf = Vec::new();
        for _ in 0..9 {
            buf.extend(client_frame(
                if buf.is_empty() { 0x2 } else { 0x0 },
                &[1; 111],
            ));
        }
        assert_eq!(r.read(&buf), Ok((buf.len(), Decoded::Partial)));
        assert_eq!(r.message.len(), 999);
        assert!(
            r.message.capacity() <= 1000,
            "capacity {}",
            r.message.capacity()
        );
        let (_, m) = read_message(&mut r, &client_frame(FIN_CONT, &[2]));
        match m {
            Message::Binary(b) => assert_eq!(b.len(), 1000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_utf8_is_1007() {
        let err = read_err(&mut reader(), &client_frame(FIN | 0x1, b"ok \xff"));
        assert_eq!(err, ProtocolError::InvalidUtf8);
        assert_eq!(err.close_code(), 1007);

        // Truncated character at the very end of a single frame.
        assert_eq!(
            read_err(&mut reader(), &client_frame(FIN | 0x1, b"\xe2\x82")),
            ProtocolError::InvalidUtf8
        );

        // Fails fast on the first fragment, before the message completes.
        let err = read_err(&mut reader(), &client_frame(0x1, b"\xc0\xafabc"));
        assert_eq!(err, ProtocolError::InvalidUtf8);

        // Truncated character in the final fragment.
        let buf = [
            client_frame(0x1, b"abc"),
            client_frame(FIN_CONT, b"\xf0\x9f\x98"),
        ]
        .concat();
        assert_eq!(read_err(&mut reader(), &buf), ProtocolError::InvalidUtf8);

        // A lead byte whose continuation turns out wrong in the next fragment.
        let buf = [client_frame(0x1, b"\xc3"), client_frame(FIN_CONT, b"A")].concat();
        assert_eq!(read_err(&mut reader(), &buf), ProtocolError::InvalidUtf8);

        // Surrogates encoded in UTF-8 are invalid.
        assert_eq!(
            read_err(&mut reader(), &client_frame(FIN | 0x1, b"\xed\xa0\x80")),
            ProtocolError::InvalidUtf8
        );
    }

    #[test]
    fn multibyte_chars_split_across_fragments() {
        let s = "é€😀";
        let bytes = s.as_bytes();
        // Every way of cutting the 9 bytes into three non-empty fragments.
        for a in 1..bytes.len() - 1 {
            for b in a + 1..bytes.len() {
                let buf = [
                    client_frame(0x1, &bytes[..a]),
                    client_frame(0x0, &bytes[a..b]),
                    client_frame(FIN_CONT, &bytes[b..]),
                ]
                .concat();
                let mut r = reader();
                assert_eq!(read_message(&mut r, &buf).1, text(s), "cut at {a}, {b}");
            }
        }
        // And one byte per fragment, fed one frame per call.
        let mut r = reader();
        for (i, byte) in bytes.iter().enumerate() {
            let last = i + 1 == bytes.len();
            let first = match (i, last) {
                (0, _) => 0x1,
                (_, true) => FIN,
                _ => 0x0,
            };
            let frame = client_frame(first, &[*byte]);
            let got = r.read(&frame).unwrap();
            if last {
                assert_eq!(got, (frame.len(), Decoded::Message(text(s))));
            } else {
                assert_eq!(got, (frame.len(), Decoded::Partial));
            }
        }
    }

    #[test]
    fn close_frames() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ✓".as_bytes());
        let (_, m) = read_message(&mut reader(), &client_frame(FIN | 0x8, &payload));
        assert_eq!(m, Message::Close(Some((1000, "bye ✓".to_owned()))));

        let (_, m) = read_message(&mut reader(), &client_frame(FIN | 0x8, b""));
        assert_eq!(m, Message::Close(None));

        let (_, m) = read_message(
            &mut reader(),
            &client_frame(FIN | 0x8, &4000u16.to_be_bytes()),
        );
        assert_eq!(m, Message::Close(Some((4000, String::new()))));

        // A close may arrive in the middle of a fragmented message.
        let buf = [
            client_frame(0x1, b"half"),
            client_frame(FIN | 0x8, &1001u16.to_be_bytes()),
        ]
        .concat();
        let (n, m) = read_message(&mut reader(), &buf);
        assert_eq!(
            (n, m),
            (buf.len(), Message::Close(Some((1001, String::new()))))
        );
    }

    #[test]
    fn close_codes() {
        let valid = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ];
        for code in valid {
            let (_, m) = read_message(
                &mut reader(),
                &client_frame(FIN | 0x8, &u16::to_be_bytes(code)),
            );
            assert_eq!(m, Message::Close(Some((code, String::new()))), "{code}");
        }
        let invalid = [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in invalid {
            let err = read_err(
                &mut reader(),
                &client_frame(FIN | 0x8, &u16::to_be_bytes(code)),
            );
            assert_eq!(err, ProtocolError::InvalidCloseCode(code));
            assert_eq!(err.close_code(), 1002, "{code}");
        }
    }

    #[test]
    fn bad_close_payloads() {
        let err = read_err(&mut reader(), &client_frame(FIN | 0x8, &[0x03]));
        assert_eq!(err, ProtocolError::InvalidClosePayload);
        assert_eq!(err.close_code(), 1002);

        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80");
        let err = read_err(&mut reader(), &client_frame(FIN | 0x8, &payload));
        assert_eq!(err, ProtocolError::InvalidUtf8);
        assert_eq!(err.close_code(), 1007);
    }

    #[test]
    fn error_reasons_fit_a_close_frame() {
        let all = [
            ProtocolError::Unmasked,
            ProtocolError::ReservedBits,
            ProtocolError::ReservedOpcode,
            ProtocolError::FragmentedControl,
            ProtocolError::ControlTooLong,
            ProtocolError::UnexpectedContinuation,
            ProtocolError::ExpectedContinuation,
            ProtocolError::FrameTooLarge { size: 2, max: 1 },
            ProtocolError::MessageTooLarge { size: 2, max: 1 },
            ProtocolError::InvalidUtf8,
            ProtocolError::InvalidCloseCode(5),
            ProtocolError::InvalidClosePayload,
        ];
        for e in &all {
            assert!(!e.reason().is_empty() && e.reason().len() <= 123, "{e:?}");
            assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(
            ProtocolError::FrameTooLarge { size: 2, max: 1 }.to_string(),
            "frame of 2 bytes exceeds the 1-byte limit"
        );
    }

    #[test]
    fn unmask_matches_bytewise_xor_at_every_length() {
        let mask = [0x6d, 0xb6, 0xb2, 0x80];
        for len in 0..40 {
            let src: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let expected: Vec<u8> = src
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            let mut dst = vec![0xAA];
            unmask_into(&mut dst, &src, mask);
            assert_eq!(dst[0], 0xAA);
            assert_eq!(&dst[1..], &expected[..], "length {len}");
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // A small xorshift generator: deterministic, so a failure reproduces.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5_000 {
            let len = (next() % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias towards well-formed beginnings so deeper paths get exercised too.
            if let Some(b) = buf.get_mut(1) {
                *b |= 0x80;
            }
            if let Some(b) = buf.first_mut() {
                *b &= 0x8F;
            }
            let mut r = FrameReader::new(Limits {
                max_frame_bytes: 16,
                max_message_bytes: 24,
            });
            let mut rest: &[u8] = &buf;
            while let Ok((n, decoded)) = r.read(rest) {
                assert!(n <= rest.len());
                rest = &rest[n..];
                if n == 0 && decoded == Decoded::Partial {
                    break;
                }
                if let Decoded::Message(Message::Text(t)) = decoded {
                    assert!(std::str::from_utf8(&t).is_ok());
                }
            }
        }
    }

    // ---- writing server frames -----------------------------------------------------------

    fn header(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        push_header(&mut out, OPCODE_TEXT, len);
        out
    }

    #[test]
    fn server_header_lengths() {
        assert_eq!(header(0), [0x81, 0]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0, 126]);
        assert_eq!(header(65535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header(65536), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        let mut out = Vec::new();
        push_header(&mut out, OPCODE_BINARY, 200);
        assert_eq!(out, [0x82, 126, 0, 200]);
        // Opcode bits above the low nibble cannot leak into FIN/RSV.
        let mut out = Vec::new();
        push_header(&mut out, 0xF9, 0);
        assert_eq!(out, [0x89, 0]);
    }

    #[test]
    fn server_frames() {
        let frame = text_frame(b"Hello");
        assert_eq!(&frame[..], b"\x81\x05Hello");
        let mut out = b"prefix".to_vec();
        write_text(&mut out, b"Hello");
        assert_eq!(out, b"prefix\x81\x05Hello");

        let mut out = Vec::new();
        write_ping(&mut out, b"p");
        write_pong(&mut out, b"q");
        assert_eq!(out, b"\x89\x01p\x8a\x01q");

        let mut out = Vec::new();
        write_pong(&mut out, &[b'x'; 200]);
        assert_eq!(&out[..2], [0x8a, 125]);
        assert_eq!(out.len(), 127);

        let big = vec![b'z'; 70_000];
        let frame = text_frame(&big);
        assert_eq!(&frame[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(frame.len(), 70_010);
    }

    #[test]
    fn a_text_frame_is_built_at_its_exact_size() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let mut header = Vec::new();
            push_header(&mut header, OPCODE_TEXT, len);
            assert_eq!(header_len(len), header.len(), "{len}");
            let frame = text_frame(&vec![b'a'; len]);
            assert_eq!(frame.len(), header.len() + len, "{len}");
            assert_eq!(&frame[..header.len()], &header[..], "{len}");
        }
    }

    #[test]
    fn close_frame_reason_is_cut_on_a_char_boundary() {
        let mut out = Vec::new();
        write_close(&mut out, 1000, "bye");
        assert_eq!(out, b"\x88\x05\x03\xe8bye");

        let mut out = Vec::new();
        write_close(&mut out, 1001, "");
        assert_eq!(out, b"\x88\x02\x03\xe9");

        // 62 two-byte chars = 124 bytes: the cut at 123 would split one, so 122 remain.
        let reason = "é".repeat(62);
        let mut out = Vec::new();
        write_close(&mut out, 1009, &reason);
        assert_eq!(out[1] as usize, out.len() - 2);
        assert_eq!(out.len() - 4, 122);
        assert!(std::str::from_utf8(&out[4..]).is_ok());

        let reason = "a".repeat(200);
        let mut out = Vec::new();
        write_close(&mut out, 1009, &reason);
        assert_eq!(out[1], 125);
        assert_eq!(out.len(), 127);

        // What we write, the reader (given a mask) reads back.
        let mut out = Vec::new();
        write_close(&mut out, 1011, "übel");
        let masked = client_frame(out[0], &out[2..]);
        assert_eq!(
            read_message(&mut reader(), &masked).1,
            Message::Close(Some((1011, "übel".to_owned())))
        );
    }
}
