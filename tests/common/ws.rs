//! A small raw WebSocket client for the black-box tests (RFC 6455, client side): the upgrade
//! request, masked frames with any opcode / FIN / RSV bits (or unmasked, for violation tests),
//! fragmentation, and reading the server's frames with a timeout. JSON helpers on top.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{connect, Conn, HttpResponse, READ_TIMEOUT};

pub const WS_PATH: &str = "/api/v1/relay/ws";

/// A WebSocket client on `path` with a 4 KB receive buffer (so that what it does not read
/// backs up into relay quickly), subscribed to `channel` and counted by the server.
pub fn slow_subscriber(addr: SocketAddr, path: &str, channel: &str) -> WsClient {
    let mut slow = WsClient::try_open_on(small_rcvbuf_stream(addr), path, &[])
        .unwrap_or_else(|r| panic!("slow client upgrade on {path}: {r}"));
    slow.welcome();
    slow.subscribe(channel);
    super::wait_subscribers(addr, &[(channel, 1)]);
    slow
}

/// A client socket with a tiny receive buffer (for slow-consumer and backlog tests).
pub fn small_rcvbuf_stream(addr: SocketAddr) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One frame from the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// `(code, reason)` of a close frame (1005 when it carries no code).
    pub fn close_code(&self) -> (u16, String) {
        if self.payload.len() >= 2 {
            (
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                String::from_utf8_lossy(&self.payload[2..]).into_owned(),
            )
        } else {
            (1005, String::new())
        }
    }
}

/// Why no frame came.
#[derive(Debug)]
pub enum WsReadError {
    Timeout,
    Eof,
    Reset(io::Error),
    /// The server sent something that is not a valid frame.
    Garbage(String),
}

/// Builds one client frame. `rsv` is the 3 RSV bits (0..=7); `mask` None sends it unmasked.
pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push((if fin { 0x80 } else { 0 }) | ((rsv & 7) << 4) | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

static MASK_COUNTER: AtomicU32 = AtomicU32::new(0x1234_5678);

/// A mask key that changes from frame to frame (and is never all zero).
pub fn next_mask() -> [u8; 4] {
    let n = MASK_COUNTER
        .fetch_add(0x9e37_79b9, Ordering::Relaxed)
        .wrapping_mul(2_654_435_761)
        | 0x0101_0101;
    n.to_be_bytes()
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The ops the server pushes on its own (not replies to a request).
pub fn is_push(v: &serde_json::Value) -> bool {
    matches!(
        v["op"].as_str(),
        Some("event" | "presence.join" | "presence.leave" | "gap")
    )
}

/// An open WebSocket connection.
pub struct WsClient {
    pub stream: TcpStream,
    /// The 101's headers (lowercased names).
    pub headers: BTreeMap<String, String>,
    /// `X-Relay-Shard` of the 101.
    pub shard: Option<usize>,
    /// Bytes read but not yet parsed into frames.
    buf: Vec<u8>,
    /// The welcome message, if it has been read (see `welcome`).
    welcome: Option<serde_json::Value>,
    /// Messages read while looking for a reply (`call`), handed out first by `next_json`.
    stash: VecDeque<serde_json::Value>,
    /// Every control frame seen while reading JSON (pings, pongs), in order.
    pub control_seen: Vec<Frame>,
    pub eof: bool,
}

/// The upgrade request, with `extra` headers after the standard ones.
pub fn upgrade_request(path_and_query: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// The accept value for the fixed key of `upgrade_request` (RFC 6455 section 1.3 example).
pub const EXPECTED_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

impl WsClient {
    /// Upgrades on a new connection to `path_and_query`; a non-101 answer is `Err(response)`.
    pub fn try_open(
        addr: SocketAddr,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> Result<WsClient, HttpResponse> {
        Self::try_open_on(connect(addr), path_and_query, extra)
    }

    /// Upgrades `stream` (fresh, or a keep-alive connection with nothing pending).
    pub fn try_open_on(
        mut stream: TcpStream,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> Result<WsClient, HttpResponse> {
        stream
            .write_all(&upgrade_request(path_and_query, extra))
            .unwrap_or_else(|e| panic!("WS upgrade {path_and_query}: write failed: {e}"));
        Self::read_upgrade_answer(stream, path_and_query)
    }

    /// Reads the answer to an upgrade request already sent on `stream`.
    pub fn read_upgrade_answer(
        mut stream: TcpStream,
        what: &str,
    ) -> Result<WsClient, HttpResponse> {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "WS upgrade {what}: EOF before the response head (got {:?})",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "WS upgrade {what}: no response head: {e} (got {:?})",
                    String::from_utf8_lossy(&buf)
                ),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("WS upgrade {what}: bad status line {status_line:?}"));
        let mut headers = BTreeMap::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        if status != 101 {
            // Let the HTTP client parse the whole response (head put back in front).
            let mut conn = Conn::from_stream(stream);
            let resp = conn
                .read_response_with_prefix(buf)
                .unwrap_or_else(|e| panic!("WS upgrade {what}: unreadable {status} response: {e}"));
            return Err(resp);
        }
        let shard = headers
            .get("x-relay-shard")
            .and_then(|s| s.trim().parse().ok());
        let rest = buf.split_off(head_end);
        Ok(WsClient {
            stream,
            headers,
            shard,
            buf: rest,
            welcome: None,
            stash: VecDeque::new(),
            control_seen: Vec::new(),
            eof: false,
        })
    }

    /// Upgrades or fails the test; reads the welcome message.
    pub fn open(addr: SocketAddr) -> WsClient {
        Self::open_with(addr, WS_PATH, &[])
    }

    /// Upgrades `path_and_query` with `extra` headers or fails the test; reads the welcome.
    pub fn open_with(addr: SocketAddr, path_and_query: &str, extra: &[(&str, &str)]) -> WsClient {
        let mut c = Self::try_open(addr, path_and_query, extra).unwrap_or_else(|r| {
            panic!("WS upgrade {path_and_query}: expected 101 Switching Protocols, got {r}")
        });
        c.welcome();
        c
    }

    /// Opens WebSocket connections until one is served by `shard` (at most 200 tries). Each try
    /// first asks `/healthz` on a keep-alive connection to learn its shard and upgrades only
    /// that connection, so no stray WebSocket connections are made.
    pub fn open_on_shard(
        addr: SocketAddr,
        shard: usize,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> WsClient {
        for _ in 0..200 {
            let mut c = Conn::open(addr);
            let r = c.roundtrip("GET", "/healthz", &[], b"");
            assert_eq!(r.status, 200, "/healthz: {r}");
            let got = r
                .shard()
                .unwrap_or_else(|| panic!("response without a valid X-Relay-Shard header: {r}"));
            if got != shard {
                continue;
            }
            assert!(c.leftover().is_empty(), "stray bytes after /healthz");
            let mut ws = Self::try_open_on(c.stream, path_and_query, extra)
                .unwrap_or_else(|r| panic!("WS upgrade {path_and_query}: expected 101, got {r}"));
            assert_eq!(
                ws.shard,
                Some(shard),
                "a WebSocket upgraded on a keep-alive connection should be served by that \
                 connection's shard (101 X-Relay-Shard)"
            );
            ws.welcome();
            return ws;
        }
        panic!("200 connections did not reach shard {shard} (SO_REUSEPORT spread)");
    }

    /// `per_shard` WebSocket clients on each of the two shards, in the order shard 0, shard 1,
    /// shard 0, ...
    pub fn open_on_both_shards(addr: SocketAddr, per_shard: usize) -> Vec<WsClient> {
        let mut out = Vec::new();
        for _ in 0..per_shard {
            for shard in 0..2 {
                out.push(Self::open_on_shard(addr, shard, WS_PATH, &[]));
            }
        }
        out
    }

    /// The welcome message (read on first call, or the one already read).
    pub fn welcome(&mut self) -> serde_json::Value {
        if let Some(w) = &self.welcome {
            return w.clone();
        }
        let v = self
            .try_next_json(READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("expected a welcome message on open: {e}"));
        assert_eq!(
            v["op"], "welcome",
            "the first message after the upgrade should be the welcome, got {v}"
        );
        self.welcome = Some(v.clone());
        v
    }

    /// The connection id from the welcome.
    pub fn conn_id(&mut self) -> String {
        let w = self.welcome();
        w["conn"]
            .as_str()
            .unwrap_or_else(|| panic!("welcome without a string conn: {w}"))
            .to_string()
    }

    // ----- writing -----

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write to the WebSocket failed: {e}"));
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// A masked frame.
    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = encode_frame(fin, 0, opcode, payload, Some(next_mask()));
        self.send_raw(&f);
    }

    pub fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes());
    }

    pub fn send_json(&mut self, v: &serde_json::Value) {
        self.send_text(&v.to_string());
    }

    /// Sends a close frame with `code` (and no reason).
    pub fn send_close(&mut self, code: u16) {
        self.send_frame(true, OP_CLOSE, &code.to_be_bytes());
    }

    // ----- reading -----

    /// Parses one complete frame off the buffer, if there is one.
    fn take_frame(&mut self) -> Result<Option<Frame>, WsReadError> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let rsv = (b[0] >> 4) & 7;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let len7 = (b[1] & 0x7f) as usize;
        let mut pos = 2;
        let len = match len7 {
            126 => {
                if b.len() < 4 {
                    return Ok(None);
                }
                pos = 4;
                u16::from_be_bytes([b[2], b[3]]) as usize
            }
            127 => {
                if b.len() < 10 {
                    return Ok(None);
                }
                pos = 10;
                let n = u64::from_be_bytes(b[2..10].try_into().unwrap());
                if n > (1 << 30) {
                    return Err(WsReadError::Garbage(format!(
                        "frame length {n} from the server"
                    )));
                }
                n as usize
            }
            n => n,
        };
        let mask = if masked {
            if b.len() < pos + 4 {
                return Ok(None);
            }
            let m = [b[pos], b[pos + 1], b[pos + 2], b[pos + 3]];
            pos += 4;
            Some(m)
        } else {
            None
        };
        if b.len() < pos + len {
            return Ok(None);
        }
        let mut payload = b[pos..pos + len].to_vec();
        if let Some(m) = mask {
            for (i, x) in payload.iter_mut().enumerate() {
                *x ^= m[i % 4];
            }
        }
        self.buf.drain(..pos + len);
        Ok(Some(Frame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
        }))
    }

    /// The next frame from the server (any opcode), waiting at most `timeout`.
    pub fn next_frame(&mut self, timeout: Duration) -> Result<Frame, WsReadError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(f);
            }
            if self.eof {
                return Err(WsReadError::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WsReadError::Timeout);
            }
            self.stream.set_read_timeout(Some(deadline - now)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => return Err(WsReadError::Timeout),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.eof = true;
                    // Whatever complete frames are buffered still count.
                    if let Some(f) = self.take_frame()? {
                        return Ok(f);
                    }
                    return Err(WsReadError::Reset(e));
                }
            }
        }
    }

    /// The next text message as raw text (stash first), skipping control frames other than
    /// close (recorded in `control_seen`). A close frame is an error naming its code.
    pub fn try_next_text(&mut self, timeout: Duration) -> Result<String, String> {
        if let Some(v) = self.stash.pop_front() {
            return Ok(v.to_string());
        }
        let deadline = Instant::now() + timeout;
        let mut message: Option<Vec<u8>> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = match self.next_frame(left) {
                Ok(f) => f,
                Err(WsReadError::Timeout) => {
                    return Err(format!("no message within {timeout:?}"));
                }
                Err(e) => return Err(format!("the connection ended ({e:?})")),
            };
            match f.opcode {
                OP_PING | OP_PONG => self.control_seen.push(f),
                OP_CLOSE => {
                    let (code, reason) = f.close_code();
                    return Err(format!("got a close frame {code} {reason:?}"));
                }
                OP_TEXT if message.is_none() => {
                    if f.fin {
                        return String::from_utf8(f.payload)
                            .map_err(|e| format!("server text frame is not UTF-8: {e}"));
                    }
                    message = Some(f.payload);
                }
                OP_CONT if message.is_some() => {
                    message.as_mut().unwrap().extend_from_slice(&f.payload);
                    if f.fin {
                        return String::from_utf8(message.take().unwrap())
                            .map_err(|e| format!("server text message is not UTF-8: {e}"));
                    }
                }
                other => return Err(format!("unexpected frame opcode {other:#x}: {f:?}")),
            }
        }
    }

    /// The next JSON message (stash first), skipping pings and pongs.
    pub fn try_next_json(&mut self, timeout: Duration) -> Result<serde_json::Value, String> {
        if let Some(v) = self.stash.pop_front() {
            return Ok(v);
        }
        let text = self.try_next_text(timeout)?;
        serde_json::from_str(&text).map_err(|e| format!("server message is not JSON ({e}): {text}"))
    }

    /// The next JSON message, or fails the test saying `what` was expected.
    pub fn next_json(&mut self, timeout: Duration, what: &str) -> serde_json::Value {
        self.try_next_json(timeout)
            .unwrap_or_else(|e| panic!("{what}: expected a message, but {e}"))
    }

    /// Sends `req` and returns the first message that is not a push (event, presence,
    /// gap); pushes read meanwhile are kept, in order, for `next_json`.
    pub fn call(&mut self, req: serde_json::Value) -> serde_json::Value {
        self.send_json(&req);
        self.reply(&format!("reply to {req}"))
    }

    /// The next message that is not a push; pushes are stashed.
    pub fn reply(&mut self, what: &str) -> serde_json::Value {
        let mut skipped = Vec::new();
        loop {
            let v = match self.stash.iter().position(|v| !is_push(v)) {
                Some(i) => self.stash.remove(i).unwrap(),
                None => {
                    let text = self
                        .try_next_text(READ_TIMEOUT)
                        .unwrap_or_else(|e| panic!("{what}: expected a reply, but {e}"));
                    serde_json::from_str(&text).unwrap_or_else(|e| {
                        panic!("{what}: server message is not JSON ({e}): {text}")
                    })
                }
            };
            if is_push(&v) {
                skipped.push(v);
                continue;
            }
            // Keep the pushes in arrival order, ahead of anything stashed later.
            for (i, p) in skipped.into_iter().enumerate() {
                self.stash.insert(i, p);
            }
            return v;
        }
    }

    /// Reads until a close frame and returns `(code, reason)`; fails on EOF without one or
    /// on timeout. Text messages on the way are ignored.
    pub fn expect_close(&mut self, timeout: Duration, what: &str) -> (u16, String) {
        match self.close_or_eof(timeout) {
            Some(Some(c)) => c,
            Some(None) => {
                panic!("{what}: expected a close frame, the connection ended without one")
            }
            None => panic!("{what}: expected a close frame within {timeout:?}, got nothing"),
        }
    }

    /// Reads until a close frame (`Some(Some(code, reason))`), EOF or reset (`Some(None)`), or
    /// the timeout (`None`).
    pub fn close_or_eof(&mut self, timeout: Duration) -> Option<Option<(u16, String)>> {
        self.stash.clear();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Ok(f) if f.opcode == OP_CLOSE => return Some(Some(f.close_code())),
                Ok(_) => {}
                Err(WsReadError::Timeout) => return None,
                Err(_) => return Some(None),
            }
        }
    }

    /// After a close frame: whether the server then ends the TCP connection within `bound`.
    pub fn eof_within(&mut self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left) {
                Ok(_) => {}
                Err(WsReadError::Timeout) => return false,
                Err(_) => return true,
            }
        }
    }

    /// Asserts the connection still answers: `{"op":"ping","ref":...}` -> pong.
    pub fn assert_alive(&mut self, what: &str) {
        let r = self.call(serde_json::json!({"op":"ping","ref":"alive?"}));
        assert_eq!(
            r,
            serde_json::json!({"op":"pong","ref":"alive?"}),
            "{what}: the connection should still answer a ping op with a pong"
        );
    }

    /// Subscribes (optionally with `since`) and returns the `subscribed` reply, asserting it.
    pub fn subscribe(&mut self, channel: &str) -> serde_json::Value {
        let r = self.call(serde_json::json!({"op":"subscribe","channel":channel}));
        assert_eq!(
            r["op"], "subscribed",
            "subscribe {channel}: expected a subscribed reply, got {r}"
        );
        assert_eq!(r["channel"], channel, "subscribed names the channel: {r}");
        r
    }

    /// The next message that must be an event of `channel`; returns (seq, envelope).
    pub fn next_event(&mut self, channel: &str, what: &str) -> (u64, serde_json::Value) {
        let v = self.next_json(READ_TIMEOUT, what);
        assert_eq!(v["op"], "event", "{what}: expected an event, got {v}");
        assert_eq!(
            v["channel"], channel,
            "{what}: event of the wrong channel: {v}"
        );
        let seq = v["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: event without a numeric seq: {v}"));
        (seq, v)
    }
}

impl Conn {
    /// Parses a response whose first bytes (`prefix`) were already read off this stream.
    pub fn read_response_with_prefix(&mut self, prefix: Vec<u8>) -> io::Result<HttpResponse> {
        let mut rest = std::mem::take(&mut self.buf);
        self.buf = prefix;
        self.buf.append(&mut rest);
        self.read_response()
    }
}
