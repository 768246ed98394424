//! Per-shard HTTP/1.1 client for health probes, webhook delivery and proxying.
//!
//! Owns:
//! * the TCP connections this shard opens to upstream instances, and their keep-alive pools
//!   (per upstream address, at most `max_idle_per_host` idle, each dropped once idle past
//!   `idle_timeout`, on [`Client::prune`] or when next looked at), and the counts of
//!   connections opened and of reusable ones a full pool closed ([`Client::take_counts`]);
//! * request serialisation ([`Request`] to bytes: request line, `Host`, the caller's headers,
//!   `Content-Length`);
//! * response parsing with limits: head bytes, header count, body bytes; `Content-Length`,
//!   `chunked` (through the server codec's [`BodyDecoder`]) and close-delimited bodies; no body
//!   for HEAD, 1xx, 204 and 304; interim 1xx responses are skipped;
//! * timeouts: `connect_timeout` for the TCP connect, and a deadline for the whole
//!   [`Client::send`] (connect, write, response head and body, and the one retry below).
//!
//! Must never:
//! * be shared across threads: it is `!Send` (monoio sockets are tied to the runtime that made
//!   them). One per shard, used from that shard's tasks through `&self`; no `RefCell` borrow is
//!   held across an `.await`, so concurrent `send`s on one shard are fine;
//! * hold unbounded connections or buffers: idle connections are capped per upstream; a
//!   response's head is bounded by `max_response_head_bytes` (plus one read), its decoded body
//!   by `max_response_body_bytes` (a `Content-Length` over it is refused before any body is
//!   read); connections in use are bounded by the callers' own concurrency (probe schedule,
//!   webhook queue, proxied requests);
//! * panic on an upstream's bytes: no `unwrap`, `expect` or unchecked indexing outside tests
//!   (enforced by the clippy lints below). A fault closes that connection only.
//!
//! Stale pooled connections: an upstream may close a keep-alive connection while it sits idle
//! here, and that is only discovered on use. So when a *reused* connection fails while the
//! request is written, or hits EOF or a reset before the first byte of the response arrives,
//! the request is retried once on a fresh connection (what browsers, Go's `net/http` and
//! hyper's pools do). Never after a response byte arrived, never on a timeout, never on a
//! fresh connection. Caveat, for non-idempotent requests: if the upstream read the request,
//! acted on it and then closed without answering, the retry delivers it a second time. An
//! upstream closing an idle connection does not act on a request arriving after it, so this
//! takes an upstream that fails mid-request; webhook delivery is at-least-once anyway.
//!
//! Deliberately out of scope: TLS (upstreams are plain HTTP inside the deployment; [`parse_url`]
//! refuses `https`), proxies, redirects, content codings (the body is returned as sent),
//! transfer codings other than a single `chunked`, request pipelining, `Expect: 100-continue`
//! (an interim 100 is skipped like any 1xx), and DNS at request time (resolve once with
//! [`parse_url`]).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::codec::{
    header_slots, usize_to_u64, BodyDecoder, BodyKind, HttpError, Limits, Parsed,
    INLINE_HEADER_SLOTS,
};

/// Bytes asked of the kernel per read while the response head or a chunked body arrives.
const READ_CHUNK: usize = 4096;

/// Interim (1xx) responses skipped before the final one; more is a misbehaving upstream.
const MAX_INTERIM_RESPONSES: usize = 8;

/// Limits and timeouts of one [`Client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Bound on the TCP connect (also cut short by the request's own deadline).
    pub connect_timeout: Duration,
    /// Bound on a whole [`Client::send`]: connect, write, and the complete response, including
    /// the one retry of a stale pooled connection.
    pub request_timeout: Duration,
    /// Idle keep-alive connections kept per upstream address; 0 disables pooling.
    pub max_idle_per_host: usize,
    /// An idle connection older than this is closed instead of reused. Keep it below the
    /// upstreams' own keep-alive timeout so they rarely close a connection we are about to use.
    pub idle_timeout: Duration,
    /// Maximum size of a response head, status line through the blank line. Also bounds a
    /// chunked body's trailers and its chunk extensions.
    pub max_response_head_bytes: usize,
    /// Maximum number of header fields in a response head.
    pub max_response_headers: usize,
    /// Maximum decoded response body.
    pub max_response_body_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_idle_per_host: 8,
            idle_timeout: Duration::from_secs(30),
            max_response_head_bytes: 16 * 1024,
            max_response_headers: 64,
            max_response_body_bytes: 1024 * 1024,
        }
    }
}

/// One request to send. Borrowed, so a caller proxying a request passes slices of it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// A method token, case-sensitive: `GET`, `POST`...
    pub method: &'a str,
    /// Origin-form target, e.g. `/hooks/relay?x=1`: visible ASCII only (percent-encode the
    /// rest), so nothing a caller forwards can split the request line.
    pub path_and_query: &'a str,
    /// Written in order after `Host`. `Host`, `Content-Length` and `Transfer-Encoding` are
    /// skipped (the client owns framing); `Connection: close` is honoured (the connection is not
    /// pooled). Names must be tokens and values free of control characters other than HTAB,
    /// else the request is refused with [`ClientError::InvalidRequest`].
    pub headers: &'a [(&'a str, &'a [u8])],
    /// Sent with a `Content-Length`; one is also sent for an empty POST, PUT or PATCH body.
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// A GET without headers.
    pub fn get(path_and_query: &'a str) -> Self {
        Request {
            method: "GET",
            path_and_query,
            headers: &[],
            body: b"",
        }
    }

    /// A POST of `body` with `headers`.
    pub fn post(
        path_and_query: &'a str,
        headers: &'a [(&'a str, &'a [u8])],
        body: &'a [u8],
    ) -> Self {
        Request {
            method: "POST",
            path_and_query,
            headers,
            body,
        }
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Names lower-cased, values as raw bytes, in the order received (framing headers
    /// included, as sent).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Decoded body (de-chunked); empty for HEAD, 1xx, 204 and 304.
    pub body: Bytes,
}

impl Response {
    /// First value of the named header, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Status 200..=299.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum ClientError {
    /// The TCP connect failed (refused, unreachable...).
    Connect(io::Error),
    /// The TCP connect did not complete within `connect_timeout` (or the request's deadline).
    ConnectTimeout,
    /// Connected, but the complete response did not arrive within the request's deadline.
    Timeout,
    /// A socket error after connecting.
    Io(io::Error),
    /// The upstream's response broke HTTP/1.1 framing; the message says how.
    Malformed(&'static str),
    /// A response part over its configured limit: `what` is `"response head"`,
    /// `"response header count"`, `"response body"` or `"response trailers"`.
    TooLarge { what: &'static str, max: usize },
    /// The upstream closed the connection before a complete response.
    Closed,
    /// The request itself cannot be written safely (a control character in a header value, a
    /// space in the target...). Nothing was sent.
    InvalidRequest(&'static str),
}

impl ClientError {
    /// True when the request surely did not reach the upstream, so retrying it elsewhere is
    /// safe even for a non-idempotent request. (An [`InvalidRequest`](Self::InvalidRequest) was
    /// not sent either, but retrying it cannot succeed, so it is false.)
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_) | ClientError::ConnectTimeout)
    }

    /// True for either timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout | ClientError::ConnectTimeout)
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connect failed: {e}"),
            ClientError::ConnectTimeout => f.write_str("connect timed out"),
            ClientError::Timeout => f.write_str("request timed out"),
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Malformed(what) => write!(f, "malformed response: {what}"),
            ClientError::TooLarge { what, max } => write!(f, "{what} exceeds the {max}-byte limit"),
            ClientError::Closed => {
                f.write_str("upstream closed the connection before a complete response")
            }
            ClientError::InvalidRequest(what) => write!(f, "invalid request: {what}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(e) | ClientError::Io(e) => Some(e),
            _ => None,
        }
    }
}

struct IdleConn {
    stream: TcpStream,
    since: Instant,
}

/// What a [`Client`] did with connections since [`Client::take_counts`] last asked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// TCP connections opened (successfully connected).
    pub opened: u64,
    /// Reusable connections closed because their upstream's pool was full.
    pub pool_overflow: u64,
}

/// The shard's HTTP/1.1 client. See the module docs.
pub struct Client {
    config: ClientConfig,
    /// Idle connections per upstream, oldest first; reuse takes the newest, a full pool drops
    /// the oldest.
    idle: RefCell<HashMap<SocketAddr, VecDeque<IdleConn>>>,
    counts: Cell<ConnectionCounts>,
    /// One per shard: keep it `!Send` whatever the fields above become.
    _not_send: PhantomData<Rc<()>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("idle_connections", &self.idle_connections())
            .finish()
    }
}

/// How one attempt on one connection failed.
enum Failure {
    /// Nothing of a response arrived and the connection was found closed or reset: retry once
    /// if it came from the pool. Holds the error to report if it did not.
    Stale(ClientError),
    Fatal(ClientError),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Fatal(e)
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Self {
        Client {
            config,
            idle: RefCell::new(HashMap::new()),
            counts: Cell::new(ConnectionCounts::default()),
            _not_send: PhantomData,
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Sends one request to `addr` (resolve the upstream's URL once with [`parse_url`]) with
    /// `Host: {host}`, within `config.request_timeout`. See [`Client::send_timeout`].
    pub async fn send(
        &self,
        addr: SocketAddr,
        host: &str,
        request: Request<'_>,
    ) -> Result<Response, ClientError> {
        self.send_timeout(addr, host, request, self.config.request_timeout)
            .await
    }

    /// Sends one request and reads its response, all within `timeout` (a health probe's bound
    /// may differ from a proxied request's).
    ///
    /// Reuses the newest live idle connection to `addr`, else connects. Writes `Content-Length`
    /// for the body. Reads a `Content-Length`, chunked or close-delimited body; HEAD, 1xx, 204
    /// and 304 have none. The connection goes back to the pool when both sides allow
    /// keep-alive, the body was delimited by its framing and read completely, and nothing
    /// followed it. A reused connection found closed before any response byte is retried once
    /// on a fresh one (module docs).
    pub async fn send_timeout(
        &self,
        addr: SocketAddr,
        host: &str,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let deadline = deadline_after(Instant::now(), timeout);
        let mut response = self.send_streaming(addr, host, request, deadline).await?;
        let mut body: Vec<u8> = Vec::new();
        while let Some(piece) = response.next(deadline).await? {
            if body.is_empty() {
                body = piece;
            } else {
                body.extend_from_slice(&piece);
            }
        }
        Ok(Response {
            status: response.status,
            headers: std::mem::take(&mut response.headers),
            body: Bytes::from(body),
        })
    }

    /// Like [`Client::send_timeout`] up to the response head, which it returns with the body
    /// still to be read from the [`ResponseStream`], so a proxy can pass the body on as it
    /// arrives. `deadline` bounds everything, the body included. The stale-connection retry
    /// applies as in `send_timeout` (it happens before any response byte).
    pub async fn send_streaming(
        &self,
        addr: SocketAddr,
        host: &str,
        request: Request<'_>,
        deadline: Instant,
    ) -> Result<ResponseStream<'_>, ClientError> {
        let (wire, wants_close) = encode_request(host, &request, RequestFraming::Body)?;
        let wire = Bytes::from(wire);
        let head_only = request.method == "HEAD";

        if let Some(stream) = self.checkout(addr, Instant::now()) {
            match exchange_head(stream, wire.clone(), &self.config, head_only, deadline).await {
                Ok((head, input, stream)) => {
                    return Ok(ResponseStream::new(
                        self,
                        addr,
                        stream,
                        head,
                        input,
                        wants_close,
                    ))
                }
                // The upstream closed it while idle: once, on a fresh connection.
                Err(Failure::Stale(_)) => {}
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }

        let stream = self.connect(addr, deadline).await?;
        match exchange_head(stream, wire, &self.config, head_only, deadline).await {
            Ok((head, input, stream)) => Ok(ResponseStream::new(
                self,
                addr,
                stream,
                head,
                input,
                wants_close,
            )),
            Err(Failure::Stale(e) | Failure::Fatal(e)) => Err(e),
        }
    }

    /// Starts a request whose body is sent piece by piece ([`Upload::send`]): `Content-Length:
    /// n` when `length` is `Some(n)`, else `Transfer-Encoding: chunked`. `request.body` is
    /// ignored. Always on a fresh connection: once body bytes have left, a stale pooled
    /// connection could not be retried (the body is gone). The connection joins the pool after
    /// a complete response like any other.
    pub async fn upload(
        &self,
        addr: SocketAddr,
        host: &str,
        request: Request<'_>,
        length: Option<u64>,
        deadline: Instant,
    ) -> Result<Upload<'_>, ClientError> {
        let framing = match length {
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        };
        let (wire, wants_close) = encode_request(host, &request, framing)?;
        let mut stream = self.connect(addr, deadline).await?;
        write_before(&mut stream, wire, deadline)
            .await
            .map_err(Failure::into_error)?;
        Ok(Upload {
            client: self,
            addr,
            stream,
            wants_close,
            chunked: length.is_none(),
            head_only: request.method == "HEAD",
        })
    }

    /// Idle pooled connections, all upstreams together.
    pub fn idle_connections(&self) -> usize {
        self.idle.borrow().values().map(VecDeque::len).sum()
    }

    /// The counts since the last call, which starts them again from zero (the shard adds them
    /// to its metrics).
    pub fn take_counts(&self) -> ConnectionCounts {
        self.counts.take()
    }

    fn count(&self, f: impl FnOnce(&mut ConnectionCounts)) {
        let mut counts = self.counts.get();
        f(&mut counts);
        self.counts.set(counts);
    }

    /// Closes pooled connections idle for `idle_timeout` or longer at `now`. Call from a
    /// periodic tick (a few seconds apart is plenty); reuse also skips expired ones.
    pub fn prune(&self, now: Instant) {
        let idle_timeout = self.config.idle_timeout;
        self.idle.borrow_mut().retain(|_, conns| {
            conns.retain(|c| now.saturating_duration_since(c.since) < idle_timeout);
            !conns.is_empty()
        });
    }

    /// Closes every pooled connection (shard drain, or an upstream left the registry).
    pub fn clear_idle(&self) {
        self.idle.borrow_mut().clear();
    }

    /// Takes the newest idle connection to `addr` that has not expired; expired ones met on the
    /// way are closed.
    fn checkout(&self, addr: SocketAddr, now: Instant) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(&addr)?;
        let mut found = None;
        while let Some(conn) = conns.pop_back() {
            if now.saturating_duration_since(conn.since) < self.config.idle_timeout {
                found = Some(conn.stream);
                break;
            }
        }
        if conns.is_empty() {
            idle.remove(&addr);
        }
        found
    }

    fn finish(&self, addr: SocketAddr, reusable: Option<TcpStream>, wants_close: bool) {
        let (Some(stream), false) = (reusable, wants_close) else {
            return;
        };
        let max = self.config.max_idle_per_host;
        if max == 0 {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let conns = idle.entry(addr).or_default();
        if conns.len() >= max {
            // The oldest is the likeliest to be closed by the upstream soon.
            conns.pop_front();
            self.count(|c| c.pool_overflow += 1);
        }
        conns.push_back(IdleConn {
            stream,
            since: Instant::now(),
        });
    }

    async fn connect(&self, addr: SocketAddr, deadline: Instant) -> Result<TcpStream, ClientError> {
        let wait = self
            .config
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return Err(ClientError::ConnectTimeout);
        }
        match monoio::time::timeout(wait, TcpStream::connect_addr(addr)).await {
            Ok(Ok(stream)) => {
                // Requests leave in one write; waiting for an ACK before it only adds latency.
                let _ = stream.set_nodelay(true);
                self.count(|c| c.opened += 1);
                Ok(stream)
            }
            Ok(Err(e)) => Err(ClientError::Connect(e)),
            Err(_) => Err(ClientError::ConnectTimeout),
        }
    }
}

/// `now + d`, saturating far in the future instead of panicking on overflow.
fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn to_monoio(deadline: Instant) -> monoio::time::Instant {
    monoio::time::Instant::from_std(deadline)
}

/// Errors that mean the peer has closed or reset the connection.
fn is_closed_kind(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

enum ReadError {
    TimedOut,
    Io(io::Error),
}

impl From<ReadError> for ClientError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::TimedOut => ClientError::Timeout,
            ReadError::Io(e) => ClientError::Io(e),
        }
    }
}

/// Reads at most `max` (at least 1) more bytes onto the end of `buf` before `deadline`.
/// `Ok(0)` is EOF. A spare capacity of at least `max` is used as is, so a caller that reserved
/// a known body length gets no extra allocation.
async fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<usize, ReadError> {
    let max = max.max(1);
    if buf.capacity() - buf.len() < max.min(READ_CHUNK / 4) {
        buf.reserve(READ_CHUNK);
    }
    let len = buf.len();
    let end = len + (buf.capacity() - len).min(max);
    let owned = std::mem::take(buf);
    // On a timeout the read (and the buffer it owns) is dropped with the connection.
    match monoio::time::timeout_at(to_monoio(deadline), stream.read(owned.slice_mut(len..end)))
        .await
    {
        Ok((result, slice)) => {
            *buf = slice.into_inner();
            result.map_err(ReadError::Io)
        }
        Err(_) => Err(ReadError::TimedOut),
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// HEAD, 1xx, 204, 304.
    Empty,
    Length(usize),
    Chunked,
    /// No length and no transfer coding: the body runs until the upstream closes.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the buffer taken by the head, including the final CRLFCRLF.
    head_len: usize,
    framing: Framing,
    /// The upstream allows another request on this connection (and the framing permits it).
    keep_alive: bool,
}

impl ResponseHead {
    /// 1xx other than 101: another head follows on the same connection.
    fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Parses a response head from the start of `buf`. `head_only`: the request was HEAD.
fn parse_response_head(
    buf: &[u8],
    config: &ClientConfig,
    head_only: bool,
) -> Result<Parsed<ResponseHead>, ClientError> {
    let max_head = config.max_response_head_bytes;
    // Parsing only a window makes the byte limit hold however much has been read.
    let window = buf.get(..max_head).unwrap_or(buf);

    let mut inline = [httparse::EMPTY_HEADER; INLINE_HEADER_SLOTS];
    let mut spilled = Vec::new();
    let slots = header_slots(
        &mut inline,
        &mut spilled,
        config.max_response_headers,
        httparse::EMPTY_HEADER,
    );
    let mut res = httparse::Response::new(slots);
    let head_len = match res.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_head {
                return Err(ClientError::TooLarge {
                    what: "response head",
                    max: max_head,
                });
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientError::TooLarge {
                what: "response header count",
                max: config.max_response_headers,
            })
        }
        Err(e) => return Err(ClientError::Malformed(httparse_reason(e))),
    };
    let (Some(minor_version), Some(status)) = (res.version, res.code) else {
        return Err(ClientError::Malformed("incomplete status line"));
    };
    if !(100..600).contains(&status) {
        return Err(ClientError::Malformed("invalid status code"));
    }
    if status == 101 {
        // Only a request asking for an upgrade may get one, and this client never asks.
        return Err(ClientError::Malformed("unexpected 101 Switching Protocols"));
    }

    let mut headers = Vec::with_capacity(res.headers.len());
    let mut content_length: Option<u64> = None;
    let mut bad_content_length = false;
    let mut transfer_encodings = 0usize;
    let mut chunked = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match parse_decimal(h.value) {
                Some(n) if content_length.is_none_or(|prev| prev == n) => content_length = Some(n),
                _ => bad_content_length = true,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings += 1;
            chunked = trim_ows(h.value).eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(trim_ows) {
                conn_close |= token.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.push((h.name.to_ascii_lowercase(), h.value.to_vec()));
    }
    let mut keep_alive = if minor_version == 1 {
        !conn_close
    } else {
        conn_keep_alive && !conn_close
    };

    // RFC 9112 §6.3, strictly: whatever two parties could read differently is refused.
    let bodiless = head_only || status < 200 || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if transfer_encodings > 0 {
        if content_length.is_some() || bad_content_length {
            return Err(ClientError::Malformed(
                "response has both content-length and transfer-encoding",
            ));
        }
        if minor_version == 0 {
            return Err(ClientError::Malformed(
                "transfer-encoding in an HTTP/1.0 response",
            ));
        }
        if transfer_encodings > 1 || !chunked {
            return Err(ClientError::Malformed(
                "unsupported transfer-encoding (only a single chunked)",
            ));
        }
        Framing::Chunked
    } else if bad_content_length {
        return Err(ClientError::Malformed("invalid content-length"));
    } else if let Some(n) = content_length {
        let max = config.max_response_body_bytes;
        match usize::try_from(n) {
            Ok(n) if n <= max => Framing::Length(n),
            _ => {
                return Err(ClientError::TooLarge {
                    what: "response body",
                    max,
                })
            }
        }
    } else {
        keep_alive = false;
        Framing::UntilClose
    };

    Ok(Parsed::Complete(ResponseHead {
        status,
        headers,
        head_len,
        framing,
        keep_alive,
    }))
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status code",
        httparse::Error::Token => "invalid status line",
        httparse::Error::Version => "invalid HTTP version",
        _ => "malformed response head",
    }
}

/// Writes `wire` before `deadline`. A write that failed never delivered a complete request.
async fn write_before(
    stream: &mut TcpStream,
    wire: impl monoio::buf::IoBuf + 'static,
    deadline: Instant,
) -> Result<(), Failure> {
    match monoio::time::timeout_at(to_monoio(deadline), stream.write_all(wire)).await {
        Err(_) => Err(Failure::Fatal(ClientError::Timeout)),
        Ok((Err(e), _)) if is_closed_kind(e.kind()) => Err(Failure::Stale(ClientError::Io(e))),
        Ok((Err(e), _)) => Err(Failure::Fatal(ClientError::Io(e))),
        Ok((Ok(_), _)) => Ok(()),
    }
}

/// Writes the request and reads the response head on `stream`. Returns the head, the bytes
/// read past it, and the stream.
async fn exchange_head(
    mut stream: TcpStream,
    wire: Bytes,
    config: &ClientConfig,
    head_only: bool,
    deadline: Instant,
) -> Result<(ResponseHead, Vec<u8>, TcpStream), Failure> {
    write_before(&mut stream, wire, deadline).await?;
    let (head, input) = read_head(&mut stream, config, head_only, deadline).await?;
    Ok((head, input, stream))
}

/// Reads one final response head (skipping interim ones) from `stream`. Returns it and the
/// bytes read past it (the start of the body).
async fn read_head(
    stream: &mut TcpStream,
    config: &ClientConfig,
    head_only: bool,
    deadline: Instant,
) -> Result<(ResponseHead, Vec<u8>), Failure> {
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut interim = 0usize;
    let head = loop {
        match parse_response_head(&input, config, head_only)? {
            Parsed::Complete(head) if head.is_interim() => {
                interim += 1;
                if interim > MAX_INTERIM_RESPONSES {
                    return Err(ClientError::Malformed("too many interim (1xx) responses").into());
                }
                input.drain(..head.head_len.min(input.len()));
            }
            Parsed::Complete(head) => break head,
            Parsed::Partial => {
                // Only a connection that gave us nothing at all may be the pool's stale one.
                let nothing_yet = input.is_empty() && interim == 0;
                match read_some(stream, &mut input, usize::MAX, deadline).await {
                    Ok(0) if nothing_yet => return Err(Failure::Stale(ClientError::Closed)),
                    Ok(0) => return Err(ClientError::Closed.into()),
                    Ok(_) => {}
                    Err(ReadError::Io(e)) if nothing_yet && is_closed_kind(e.kind()) => {
                        return Err(Failure::Stale(ClientError::Io(e)))
                    }
                    Err(e) => return Err(ClientError::from(e).into()),
                }
            }
        }
    };
    input.drain(..head.head_len.min(input.len()));
    Ok((head, input))
}

/// Bytes asked of the kernel per read of a streamed body.
const BODY_READ_CHUNK: usize = 64 * 1024;

/// A request body being sent piece by piece ([`Client::upload`]).
pub struct Upload<'c> {
    client: &'c Client,
    addr: SocketAddr,
    stream: TcpStream,
    wants_close: bool,
    chunked: bool,
    head_only: bool,
}

impl<'c> Upload<'c> {
    /// Sends the next piece of the body (chunk-framed when the length was not given). An empty
    /// piece sends nothing.
    pub async fn send(&mut self, piece: Vec<u8>, deadline: Instant) -> Result<(), ClientError> {
        if piece.is_empty() {
            return Ok(());
        }
        let wire = if self.chunked {
            let mut framed = Vec::with_capacity(piece.len() + 20);
            framed.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            framed.extend_from_slice(&piece);
            framed.extend_from_slice(b"\r\n");
            framed
        } else {
            piece
        };
        write_before(&mut self.stream, wire, deadline)
            .await
            .map_err(Failure::into_error)
    }

    /// Ends the body (the last chunk, when chunked) and reads the response head.
    pub async fn finish(mut self, deadline: Instant) -> Result<ResponseStream<'c>, ClientError> {
        if self.chunked {
            write_before(&mut self.stream, b"0\r\n\r\n".as_slice(), deadline)
                .await
                .map_err(Failure::into_error)?;
        }
        let (head, input) = read_head(
            &mut self.stream,
            &self.client.config,
            self.head_only,
            deadline,
        )
        .await
        .map_err(Failure::into_error)?;
        Ok(ResponseStream::new(
            self.client,
            self.addr,
            self.stream,
            head,
            input,
            self.wants_close,
        ))
    }
}

impl Failure {
    fn into_error(self) -> ClientError {
        match self {
            Failure::Stale(e) | Failure::Fatal(e) => e,
        }
    }
}

/// A response whose head has arrived; its body is read piece by piece with
/// [`ResponseStream::next`]. Once the body is complete the connection goes back to the pool
/// when both sides allow keep-alive and nothing followed the body; dropped earlier, it is
/// closed.
pub struct ResponseStream<'c> {
    client: &'c Client,
    addr: SocketAddr,
    stream: Option<TcpStream>,
    pub status: u16,
    /// Names lower-cased, values as raw bytes, in the order received (framing included).
    pub headers: Vec<(String, Vec<u8>)>,
    framing: Framing,
    /// Decodes `Content-Length` and chunked bodies, enforcing `max_response_body_bytes`.
    decoder: Option<BodyDecoder>,
    /// Bytes read but not yet decoded.
    input: Vec<u8>,
    /// Bytes of a close-delimited body passed on so far.
    received: usize,
    keep_alive: bool,
    wants_close: bool,
    done: bool,
}

impl<'c> ResponseStream<'c> {
    fn new(
        client: &'c Client,
        addr: SocketAddr,
        stream: TcpStream,
        head: ResponseHead,
        input: Vec<u8>,
        wants_close: bool,
    ) -> Self {
        let config = &client.config;
        let limits = Limits {
            max_header_bytes: config.max_response_head_bytes,
            max_headers: config.max_response_headers,
            max_body_bytes: config.max_response_body_bytes,
        };
        let kind = match head.framing {
            Framing::Length(n) => Some(BodyKind::ContentLength(usize_to_u64(n))),
            Framing::Chunked => Some(BodyKind::Chunked),
            Framing::Empty | Framing::UntilClose => None,
        };
        // The length was checked against the limit when the head was parsed.
        let decoder = kind.and_then(|k| BodyDecoder::new(&k, &limits).ok());
        ResponseStream {
            client,
            addr,
            stream: Some(stream),
            status: head.status,
            headers: head.headers,
            framing: head.framing,
            decoder,
            input,
            received: 0,
            keep_alive: head.keep_alive,
            wants_close,
            done: false,
        }
    }

    /// The body's length when the upstream declared one (`Some(0)` when there is no body);
    /// `None` for chunked and close-delimited bodies.
    pub fn content_length(&self) -> Option<usize> {
        match self.framing {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::UntilClose => None,
        }
    }

    /// Whether [`ResponseStream::next`] can answer without waiting on the upstream.
    pub fn has_buffered(&self) -> bool {
        self.done || self.framing == Framing::Empty || !self.input.is_empty()
    }

    /// The next piece of the decoded body, at most about one read's worth; `None` once the body
    /// is complete.
    pub async fn next(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let max_body = self.client.config.max_response_body_bytes;
        loop {
            if let Some(decoder) = &mut self.decoder {
                let mut out = Vec::new();
                let (used, done) = decoder
                    .decode(&self.input, &mut out)
                    .map_err(|e| chunked_error(e, &self.client.config))?;
                self.input.drain(..used.min(self.input.len()));
                if done {
                    self.complete(self.input.is_empty());
                }
                if !out.is_empty() {
                    return Ok(Some(out));
                }
                if done {
                    return Ok(None);
                }
            } else if self.framing == Framing::Empty {
                self.complete(self.input.is_empty());
                return Ok(None);
            } else if !self.input.is_empty() {
                // Close-delimited: whatever arrived is the body.
                self.received = self.received.saturating_add(self.input.len());
                if self.received > max_body {
                    return Err(ClientError::TooLarge {
                        what: "response body",
                        max: max_body,
                    });
                }
                return Ok(Some(std::mem::take(&mut self.input)));
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            if self.input.capacity() - self.input.len() < BODY_READ_CHUNK / 4 {
                self.input.reserve(BODY_READ_CHUNK);
            }
            match read_some(stream, &mut self.input, BODY_READ_CHUNK, deadline).await {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.complete(false);
                    return Ok(None);
                }
                Ok(0) => return Err(ClientError::Closed),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The body is complete: pool the connection when it may carry another request.
    fn complete(&mut self, nothing_trailing: bool) {
        self.done = true;
        let stream = self.stream.take();
        let reusable = self.keep_alive && nothing_trailing;
        self.client
            .finish(self.addr, stream.filter(|_| reusable), self.wants_close);
    }
}

fn chunked_error(e: HttpError, config: &ClientConfig) -> ClientError {
    match e {
        HttpError::BodyTooLarge { .. } => ClientError::TooLarge {
            what: "response body",
            max: config.max_response_body_bytes,
        },
        HttpError::HeadersTooLarge { .. } => ClientError::TooLarge {
            what: "response trailers",
            max: config.max_response_head_bytes,
        },
        HttpError::Malformed(what) => ClientError::Malformed(what),
        _ => ClientError::Malformed("invalid chunked body"),
    }
}

/// How a request's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// `request.body` follows the head with its `Content-Length`.
    Body,
    /// The head announces `Content-Length: n`; the caller sends the body.
    Length(u64),
    /// The head announces `Transfer-Encoding: chunked`; the caller sends the chunks.
    Chunked,
}

/// Serialises `request`; also says whether the caller asked for `Connection: close`.
fn encode_request(
    host: &str,
    request: &Request<'_>,
    framing: RequestFraming,
) -> Result<(Vec<u8>, bool), ClientError> {
    let method = request.method;
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(ClientError::InvalidRequest("method must be a token"));
    }
    let target = request.path_and_query;
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest(
            "request target must be non-empty visible ASCII",
        ));
    }
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest(
            "host must be non-empty visible ASCII",
        ));
    }

    let headers_len: usize = request
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(
        64 + method.len() + target.len() + host.len() + headers_len + request.body.len(),
    );
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");

    let mut wants_close = false;
    for &(name, value) in request.headers {
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(ClientError::InvalidRequest("header name must be a token"));
        }
        if !value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        {
            return Err(ClientError::InvalidRequest(
                "header value has a control character",
            ));
        }
        if ["host", "content-length", "transfer-encoding"]
            .iter()
            .any(|owned| name.eq_ignore_ascii_case(owned))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("connection") {
            wants_close |= value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(b"close"));
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Body => {
            if !request.body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
                out.extend_from_slice(b"Content-Length: ");
                out.extend_from_slice(request.body.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(request.body);
        }
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n"),
    }
    Ok((out, wants_close))
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A `Content-Length` value: digits only (no sign), no overflow.
fn parse_decimal(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
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

/// Splits an upstream base URL into the address to connect to, the `Host` header value, and the
/// base path (no trailing `/`; empty for the root), e.g. `http://localhost:9001/prefix` into
/// (`127.0.0.1:9001`, `localhost:9001`, `/prefix`).
///
/// Only `http://` is accepted. The host is resolved here, once, with the system resolver (this
/// may block: call it from the control plane, not a shard's hot path). When a name resolves to
/// several addresses the first IPv4 one is taken, else the first: `localhost` commonly lists
/// `::1` first while local services listen on 127.0.0.1. Userinfo, a query or a fragment is
/// refused; the port defaults to 80.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{url:?}: expected an http:// URL"));
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "{url:?}: https is not supported; upstreams are reached over plain http:// (terminate TLS in front of them)"
        ));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "{url:?}: unsupported scheme {scheme:?}, expected http://"
        ));
    }
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if path.contains(['?', '#']) {
        return Err(format!("{url:?}: a base URL takes no query or fragment"));
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{url:?}: the path must be visible ASCII (percent-encode the rest)"
        ));
    }
    if authority.contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not supported"));
    }
    if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{url:?}: missing or invalid host"));
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`; `host` below is without the brackets.
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((v6, "")) => (v6, None),
            Some((v6, tail)) => match tail.strip_prefix(':') {
                Some(port) => (v6, Some(port)),
                None => return Err(format!("{url:?}: invalid host")),
            },
            None => return Err(format!("{url:?}: unclosed [ in the host")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: missing host"));
    }
    let port = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("{url:?}: invalid port {p:?}")),
        },
    };
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: cannot resolve {host:?}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{url:?}: {host:?} resolved to no address"))?;
    let base = path.trim_end_matches('/').to_owned();
    Ok((addr, authority.to_owned(), base))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Barrier, Mutex};
    use std::thread;

    // ---- a scripted upstream on std threads: one thread accepting, one per connection ----

    /// What the upstream does with one request.
    enum Reply {
        /// Write these bytes and wait for the next request.
        Send(Vec<u8>),
        /// Write these bytes, then close.
        SendClose(Vec<u8>),
        /// Write these pieces with a pause between each, then wait for the next request.
        Pieces(Vec<Vec<u8>>),
        /// Close without answering.
        Close,
        /// Never answer; wait for the client to hang up.
        Hang,
    }

    /// A request as the upstream received it.
    #[derive(Debug, Clone)]
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    type Script = dyn Fn(usize, usize, &Seen) -> Reply + Send + Sync;

    struct Upstream {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Seen>>>,
        closed: Mutex<mpsc::Receiver<usize>>,
        stop: Arc<AtomicBool>,
    }

    impl Upstream {
        /// `script(connection index, request index on that connection, request)`.
        fn start(script: impl Fn(usize, usize, &Seen) -> Reply + Send + Sync + 'static) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (closed_tx, closed_rx) = mpsc::channel();
            let script: Arc<Script> = Arc::new(script);
            {
                let (accepted, seen, stop) = (accepted.clone(), seen.clone(), stop.clone());
                thread::spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(stream) = stream else { continue };
                        let conn = accepted.fetch_add(1, Ordering::SeqCst);
                        let (script, seen, closed) =
                            (script.clone(), seen.clone(), closed_tx.clone());
                        thread::spawn(move || {
                            serve_conn(stream, conn, &*script, &seen);
                            let _ = closed.send(conn);
                        });
                    }
                });
            }
            Upstream {
                addr,
                accepted,
                seen,
                closed: Mutex::new(closed_rx),
                stop,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        /// Blocks until the upstream has closed its side of some connection; returns which.
        fn wait_closed(&self) -> usize {
            self.closed
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10))
                .expect("upstream closed no connection")
        }
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so it sees `stop`.
            let _ = std::net::TcpStream::connect(self.addr);
        }
    }

    fn serve_conn(
        mut stream: std::net::TcpStream,
        conn: usize,
        script: &Script,
        seen: &Mutex<Vec<Seen>>,
    ) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
        let mut buf = Vec::new();
        for index in 0.. {
            let Some(request) = read_request(&mut stream, &mut buf) else {
                return;
            };
            seen.lock().unwrap().push(request.clone());
            match script(conn, index, &request) {
                Reply::Send(bytes) => {
                    let _ = stream.write_all(&bytes);
                }
                Reply::SendClose(bytes) => {
                    let _ = stream.write_all(&bytes);
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                Reply::Pieces(pieces) => {
                    for piece in pieces {
                        let _ = stream.write_all(&piece);
                        let _ = stream.flush();
                        thread::sleep(Duration::from_millis(15));
                    }
                }
                Reply::Close => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                Reply::Hang => {
                    let mut sink = [0u8; 256];
                    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    }

    /// Reads one request (head and `Content-Length` body); None at EOF or on garbage.
    fn read_request(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(head_len) = req.parse(buf).ok()? {
                let length = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .unwrap()
                            .parse::<usize>()
                            .unwrap()
                    })
                    .unwrap_or(0);
                while buf.len() < head_len + length {
                    let n = stream.read(&mut chunk).ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
                let body = buf[head_len..head_len + length].to_vec();
                buf.drain(..head_len + length);
                return Some(Seen { head, body });
            }
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn config() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        }
    }

    async fn get(client: &Client, up: &Upstream, path: &str) -> Result<Response, ClientError> {
        client
            .send(up.addr, "upstream.test", Request::get(path))
            .await
    }

    // ---- scenarios, some run under both drivers ----

    async fn content_length_and_request_bytes() {
        let up = Upstream::start(|_, _, _| Reply::Send(ok("hello")));
        let client = Client::new(config());
        let headers: &[(&str, &[u8])] = &[
            ("X-Relay-Event", b"order.created"),
            ("content-length", b"999"),
            ("Host", b"evil.test"),
            ("Transfer-Encoding", b"chunked"),
        ];
        let response = client
            .send(
                up.addr,
                "hooks.test:8080",
                Request::post("/hooks/relay?x=1", headers, b"{\"a\":1}"),
            )
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert!(response.is_success());
        assert_eq!(&response.body[..], b"hello");
        assert_eq!(response.header("CONTENT-TYPE"), Some(&b"text/plain"[..]));
        assert_eq!(response.headers[0].0, "content-type");
        let seen = up.seen();
        assert_eq!(
            seen[0].head,
            "POST /hooks/relay?x=1 HTTP/1.1\r\nHost: hooks.test:8080\r\n\
             X-Relay-Event: order.created\r\nContent-Length: 7\r\n\r\n"
        );
        assert_eq!(seen[0].body, b"{\"a\":1}");
    }

    async fn chunked_body_in_pieces() {
        let up = Upstream::start(|_, _, _| {
            Reply::Pieces(vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                b"5\r\nhel".to_vec(),
                b"lo\r\n7;ext=1\r\n, world\r\n".to_vec(),
                b"0\r\nX-Trailer: t\r\n".to_vec(),
                b"\r\n".to_vec(),
            ])
        });
        let client = Client::new(config());
        let response = get(&client, &up, "/").await.unwrap();
        assert_eq!(&response.body[..], b"hello, world");
        assert_eq!(client.idle_connections(), 1);
        let again = get(&client, &up, "/").await.unwrap();
        assert_eq!(&again.body[..], b"hello, world");
        assert_eq!(up.accepted(), 1);
    }

    async fn keep_alive_reuse() {
        let up = Upstream::start(|_, i, _| Reply::Send(ok(&format!("n{i}"))));
        let client = Client::new(config());
        for i in 0..3 {
            let response = get(&client, &up, "/health").await.unwrap();
            assert_eq!(response.body, format!("n{i}").as_bytes());
            assert_eq!(client.idle_connections(), 1);
        }
        assert_eq!(up.accepted(), 1);
    }

    async fn stale_pooled_connection_is_retried_once() {
        // Connection 0 answers with keep-alive, then the upstream closes it while it is idle.
        let up = Upstream::start(|conn, _, _| {
            if conn == 0 {
                Reply::SendClose(ok("first"))
            } else {
                Reply::Send(ok("fresh"))
            }
        });
        let client = Client::new(config());
        assert_eq!(&get(&client, &up, "/").await.unwrap().body[..], b"first");
        assert_eq!(client.idle_connections(), 1);
        assert_eq!(up.wait_closed(), 0);
        let response = client
            .send(up.addr, "upstream.test", Request::post("/p", &[], b"x"))
            .await
            .unwrap();
        assert_eq!(&response.body[..], b"fresh");
        assert_eq!(up.accepted(), 2);
        assert_eq!(client.idle_connections(), 1);
    }

    async fn request_timeout() {
        let up = Upstream::start(|_, _, _| Reply::Hang);
        let client = Client::new(ClientConfig {
            request_timeout: Duration::from_millis(200),
            ..config()
        });
        let err = get(&client, &up, "/slow").await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
        assert!(err.is_timeout() && !err.is_connect());
        assert_eq!(client.idle_connections(), 0);
        // The per-call bound works the same way.
        let err = client
            .send_timeout(up.addr, "h", Request::get("/"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
    }

    #[monoio::test(enable_timer = true)]
    async fn fusion_content_length_and_request_bytes() {
        content_length_and_request_bytes().await;
    }

    #[monoio::test(driver = "legacy", enable_timer = true)]
    async fn legacy_content_length_and_request_bytes() {
        content_length_and_request_bytes().await;
    }

    #[monoio::test(enable_timer = true)]
    async fn fusion_chunked_body_in_pieces() {
        chunked_body_in_pieces().await;
    }

    #[monoio::test(driver = "legacy", enable_timer = true)]
    async fn legacy_chunked_body_in_pieces() {
        chunked_body_in_pieces().await;
    }

    #[monoio::test(enable_timer = true)]
    async fn fusion_keep_alive_reuse() {
        keep_alive_reuse().await;
    }

    #[monoio::test(driver = "legacy", enable_timer = true)]
    async fn legacy_keep_alive_reuse() {
        keep_alive_reuse().await;
    }

    #[monoio::test(enable_timer = true)]
    async fn fusion_stale_pooled_connection_is_retried_once() {
        stale_pooled_connection_is_retried_once().await;
    }

    #[monoio::test(driver = "legacy", enable_timer = true)]
    async fn legacy_stale_pooled_connection_is_retried_once() {
        stale_pooled_connection_is_retried_once().await;
    }

    #[monoio::test(enable_timer = true)]
    async fn fusion_request_timeout() {
        request_timeout().await;
    }

    #[monoio::test(driver = "legacy", enable_timer = true)]
    async fn legacy_request_timeout() {
        request_timeout().await;
    }

    // ---- the rest on the default (fusion) driver ----

    #[monoio::test(enable_timer = true)]
    async fn close_delimited_body() {
        let up = Upstream::start(|_, _, _| {
            Reply::SendClose(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec(),
            )
        });
        let client = Client::new(config());
        let response = get(&client, &up, "/").await.unwrap();
        assert_eq!(&response.body[..], b"until the end");
        assert_eq!(client.idle_connections(), 0);
    }

    #[monoio::test(enable_timer = true)]
    async fn no_retry_once_a_response_byte_arrived() {
        let up = Upstream::start(|_, i, _| {
            if i == 0 {
                Reply::Send(ok("one"))
            } else {
                Reply::SendClose(b"HTTP/1.1 200 OK\r\nContent-Le".to_vec())
            }
        });
        let client = Client::new(config());
        get(&client, &up, "/").await.unwrap();
        let err = get(&client, &up, "/").await.unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err:?}");
        assert_eq!(up.accepted(), 1);
        assert_eq!(client.idle_connections(), 0);
    }

    #[monoio::test(enable_timer = true)]
    async fn retry_happens_only_once_and_only_from_the_pool() {
        // Connection 0 goes stale; the fresh connection 1 closes without answering too.
        let up = Upstream::start(|conn, _, _| match conn {
            0 => Reply::SendClose(ok("first")),
            _ => Reply::Close,
        });
        let client = Client::new(config());
        get(&client, &up, "/").await.unwrap();
        up.wait_closed();
        let err = get(&client, &up, "/").await.unwrap_err();
        assert!(
            matches!(err, ClientError::Closed | ClientError::Io(_)),
            "{err:?}"
        );
        assert!(!err.is_connect());
        assert_eq!(up.accepted(), 2);
        // A fresh connection closing before answering is not retried either.
        let err = get(&client, &up, "/").await.unwrap_err();
        assert!(
            matches!(err, ClientError::Closed | ClientError::Io(_)),
            "{err:?}"
        );
        assert_eq!(up.accepted(), 3);
    }

    #[monoio::test(enable_timer = true)]
    async fn connect_refused() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let client = Client::new(config());
        let err = client
            .send(addr, "gone.test", Request::get("/"))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
        assert!(err.is_connect());
        assert!(err.to_string().starts_with("connect failed"));
    }

    #[monoio::test(enable_timer = true)]
    async fn exhausted_deadline_is_a_connect_timeout() {
        // Nothing can be sent once the deadline has passed, so it counts as not connected.
        let up = Upstream::start(|_, _, _| Reply::Send(ok("x")));
        let client = Client::new(config());
        let err = client
            .send_timeout(up.addr, "h", Request::get("/"), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::ConnectTimeout), "{err:?}");
        assert!(err.is_connect() && err.is_timeout());
        assert_eq!(up.accepted(), 0);
    }

    #[monoio::test(enable_timer = true)]
    async fn oversized_head() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(20_000)
        );
        let up = Upstream::start(move |_, _, _| Reply::Send(big.clone().into_bytes()));
        let client = Client::new(config());
        let err = get(&client, &up, "/").await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::TooLarge {
                    what: "response head",
                    max: 16384
                }
            ),
            "{err:?}"
        );

        let many: String = (0..10).map(|i| format!("X-{i}: v\r\n")).collect();
        let up = Upstream::start(move |_, _, _| {
            Reply::Send(format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n").into_bytes())
        });
        let client = Client::new(ClientConfig {
            max_response_headers: 4,
            ..config()
        });
        let err = get(&client, &up, "/").await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::TooLarge {
                    what: "response header count",
                    max: 4
                }
            ),
            "{err:?}"
        );
    }

    #[monoio::test(enable_timer = true)]
    async fn oversized_bodies() {
        let small = ClientConfig {
            max_response_body_bytes: 1000,
            ..config()
        };
        let cases: [Vec<u8>; 3] = [
            // Refused from the head, before any body arrives.
            b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n".to_vec(),
            // Refused at the chunk size line.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n".to_vec(),
            [&b"HTTP/1.1 200 OK\r\n\r\n"[..], &[b'z'; 1500][..]].concat(),
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            let up = Upstream::start(move |_, _, _| {
                if i == 1 {
                    // 0x200 + 0x200 > 1000 only once the second chunk is announced.
                    let mut b = bytes.clone();
                    b.extend_from_slice(&[b'y'; 0x200]);
                    b.extend_from_slice(b"\r\n200\r\n");
                    Reply::Send(b)
                } else {
                    Reply::SendClose(bytes.clone())
                }
            });
            let client = Client::new(small);
            let err = get(&client, &up, "/").await.unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::TooLarge {
                        what: "response body",
                        max: 1000
                    }
                ),
                "case {i}: {err:?}"
            );
            assert_eq!(client.idle_connections(), 0);
        }
    }

    #[monoio::test(enable_timer = true)]
    async fn malformed_responses() {
        let cases: [(&[u8], &str); 5] = [
            (b"HTTP/1.1 abc OK\r\n\r\n", "invalid status code"),
            (b"SSH-2.0-OpenSSH_9.6\r\n", "invalid HTTP version"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "invalid content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "response has both content-length and transfer-encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
        ];
        for (bytes, why) in cases {
            let up = Upstream::start(move |_, _, _| Reply::Send(bytes.to_vec()));
            let client = Client::new(config());
            let err = get(&client, &up, "/").await.unwrap_err();
            assert!(
                matches!(err, ClientError::Malformed(w) if w == why),
                "{:?}: {err:?}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(client.idle_connections(), 0);
        }
    }

    #[monoio::test(enable_timer = true)]
    async fn head_has_no_body() {
        let up = Upstream::start(|_, i, _| {
            if i == 0 {
                Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec())
            } else {
                Reply::Send(ok("after"))
            }
        });
        let client = Client::new(config());
        let request = Request {
            method: "HEAD",
            ..Request::get("/")
        };
        let response = client.send(up.addr, "h", request).await.unwrap();
        assert_eq!((response.status, response.body.len()), (200, 0));
        assert_eq!(response.header("content-length"), Some(&b"5"[..]));
        // The connection was reusable: nothing was waited for after the head.
        assert_eq!(&get(&client, &up, "/").await.unwrap().body[..], b"after");
        assert_eq!(up.accepted(), 1);
    }

    #[monoio::test(enable_timer = true)]
    async fn no_content_and_not_modified_have_no_body() {
        let up = Upstream::start(|_, i, _| match i {
            0 => Reply::Send(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
            1 => Reply::Send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec()),
            _ => Reply::Send(ok("after")),
        });
        let client = Client::new(config());
        let response = get(&client, &up, "/").await.unwrap();
        assert_eq!((response.status, response.body.len()), (204, 0));
        let response = get(&client, &up, "/").await.unwrap();
        assert_eq!((response.status, response.body.len()), (304, 0));
        assert_eq!(&get(&client, &up, "/").await.unwrap().body[..], b"after");
        assert_eq!(up.accepted(), 1);
    }

    #[monoio::test(enable_timer = true)]
    async fn interim_responses_are_skipped() {
        let up = Upstream::start(|_, _, _| {
            Reply::Send(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
                  HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
                    .to_vec(),
            )
        });
        let client = Client::new(config());
        let response = get(&client, &up, "/").await.unwrap();
        assert_eq!((response.status, &response.body[..]), (201, &b"ok"[..]));
        assert_eq!(client.idle_connections(), 1);
    }

    #[monoio::test(enable_timer = true)]
    async fn connections_not_kept_when_either_side_says_so() {
        let up = Upstream::start(|conn, _, _| match conn {
            0 => Reply::Send(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na".to_vec(),
            ),
            _ => Reply::Send(ok("b")),
        });
        let client = Client::new(config());
        assert_eq!(&get(&client, &up, "/").await.unwrap().body[..], b"a");
        assert_eq!(client.idle_connections(), 0);

        // The caller's `Connection: close`.
        let headers: &[(&str, &[u8])] = &[("Connection", b"close")];
        let request = Request {
            headers,
            ..Request::get("/")
        };
        let response = client.send(up.addr, "h", request).await.unwrap();
        assert_eq!(&response.body[..], b"b");
        assert_eq!(client.idle_connections(), 0);

        // HTTP/1.0 without keep-alive, and bytes after the body.
        for bytes in [
            &b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nc"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ncEXTRA",
        ] {
            let up = Upstream::start(move |_, _, _| Reply::Send(bytes.to_vec()));
            assert_eq!(&get(&client, &up, "/").await.unwrap().body[..], b"c");
            assert_eq!(client.idle_connections(), 0);
        }

        // HTTP/1.0 with keep-alive is pooled.
        let up = Upstream::start(|_, _, _| {
            Reply::Send(
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nd".to_vec(),
            )
        });
        assert_eq!(&get(&client, &up, "/").await.unwrap().body[..], b"d");
        assert_eq!(client.idle_connections(), 1);
    }

    #[monoio::test(enable_timer = true)]
    async fn pool_is_capped_per_host_and_pruned() {
        // Three requests in flight at once need three connections; only two stay idle.
        let barrier = Arc::new(Barrier::new(3));
        let up = Upstream::start(move |conn, i, _| {
            if conn < 3 && i == 0 {
                barrier.wait();
            }
            Reply::Send(ok("x"))
        });
        let client = Rc::new(Client::new(ClientConfig {
            max_idle_per_host: 2,
            idle_timeout: Duration::from_secs(30),
            ..config()
        }));
        let addr = up.addr;
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let client = client.clone();
                monoio::spawn(async move { client.send(addr, "h", Request::get("/")).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().status, 200);
        }
        assert_eq!(up.accepted(), 3);
        assert_eq!(client.idle_connections(), 2);
        // The third connection back found the pool full: one closed, counted.
        assert_eq!(
            client.take_counts(),
            ConnectionCounts {
                opened: 3,
                pool_overflow: 1
            }
        );
        assert_eq!(client.take_counts(), ConnectionCounts::default());
        // Reuse opens nothing: the two idle connections serve two requests in turn.
        get(&client, &up, "/").await.unwrap();
        get(&client, &up, "/").await.unwrap();
        assert_eq!((up.accepted(), client.take_counts().opened), (3, 0));

        client.prune(Instant::now());
        assert_eq!(client.idle_connections(), 2);
        client.prune(Instant::now() + Duration::from_secs(31));
        assert_eq!(client.idle_connections(), 0);

        // An expired connection is not reused even before a prune.
        let client = Client::new(ClientConfig {
            idle_timeout: Duration::ZERO,
            ..config()
        });
        get(&client, &up, "/").await.unwrap();
        get(&client, &up, "/").await.unwrap();
        assert_eq!(up.accepted(), 5);

        // max_idle_per_host 0 disables pooling; clear_idle drops everything.
        let client = Client::new(ClientConfig {
            max_idle_per_host: 0,
            ..config()
        });
        get(&client, &up, "/").await.unwrap();
        assert_eq!(client.idle_connections(), 0);
        let client = Client::new(config());
        get(&client, &up, "/").await.unwrap();
        assert_eq!(client.idle_connections(), 1);
        client.clear_idle();
        assert_eq!(client.idle_connections(), 0);
    }

    #[monoio::test(enable_timer = true)]
    async fn invalid_requests_are_refused_before_sending() {
        let up = Upstream::start(|_, _, _| Reply::Send(ok("x")));
        let client = Client::new(config());
        let bad_value: &[(&str, &[u8])] = &[("X-A", b"a\r\nX-Injected: 1")];
        let bad_name: &[(&str, &[u8])] = &[("X A", b"v")];
        let cases = [
            (
                "h",
                Request {
                    headers: bad_value,
                    ..Request::get("/")
                },
            ),
            (
                "h",
                Request {
                    headers: bad_name,
                    ..Request::get("/")
                },
            ),
            ("h", Request::get("/a b")),
            ("h", Request::get("")),
            ("h\r\nX: y", Request::get("/")),
            (
                "h",
                Request {
                    method: "GE T",
                    ..Request::get("/")
                },
            ),
        ];
        for (host, request) in cases {
            let err = client.send(up.addr, host, request).await.unwrap_err();
            assert!(matches!(err, ClientError::InvalidRequest(_)), "{err:?}");
            assert!(!err.is_connect());
        }
        assert_eq!(up.accepted(), 0);
    }

    // ---- pure parts ----

    #[test]
    fn request_encoding() {
        let (wire, close) =
            encode_request("h:1", &Request::get("/x?y=1"), RequestFraming::Body).unwrap();
        assert_eq!(wire, b"GET /x?y=1 HTTP/1.1\r\nHost: h:1\r\n\r\n");
        assert!(!close);
        let put = Request {
            method: "PUT",
            ..Request::get("/k")
        };
        let (wire, _) = encode_request("h", &put, RequestFraming::Body).unwrap();
        assert_eq!(
            wire,
            b"PUT /k HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
        );
        let headers: &[(&str, &[u8])] =
            &[("Connection", b"keep-alive, Close"), ("X-T", b"a\tb\xff")];
        let (wire, close) = encode_request(
            "h",
            &Request {
                headers,
                body: b"abc",
                ..Request::get("/")
            },
            RequestFraming::Body,
        )
        .unwrap();
        assert!(close);
        assert_eq!(
            wire,
            &b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Close\r\nX-T: a\tb\xff\r\nContent-Length: 3\r\n\r\nabc"[..]
        );
        let (wire, _) = encode_request(
            "h",
            &Request::post("/u", &[], b"ignored"),
            RequestFraming::Chunked,
        )
        .unwrap();
        assert_eq!(
            wire,
            b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let (wire, _) = encode_request(
            "h",
            &Request::post("/u", &[], b""),
            RequestFraming::Length(7),
        )
        .unwrap();
        assert_eq!(
            wire,
            b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\n"
        );
    }

    fn parse(bytes: &[u8], head_only: bool) -> Result<Parsed<ResponseHead>, ClientError> {
        parse_response_head(bytes, &config(), head_only)
    }

    fn framing(bytes: &[u8]) -> (Framing, bool) {
        match parse(bytes, false).unwrap() {
            Parsed::Complete(h) => (h.framing, h.keep_alive),
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn response_head_framing() {
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            (Framing::Length(12), true)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n"),
            (Framing::Length(3), true)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked \r\nConnection: close\r\n\r\n"),
            (Framing::Chunked, false)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        match parse(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", true).unwrap() {
            Parsed::Complete(h) => assert_eq!(h.framing, Framing::Empty),
            Parsed::Partial => panic!("partial"),
        }
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Len", false).unwrap(),
            Parsed::Partial
        );
        assert_eq!(parse(b"", false).unwrap(), Parsed::Partial);
    }

    #[test]
    fn response_head_refusals() {
        let cases: [(&[u8], &str); 9] = [
            (b"HTTP/1.1 099 Low\r\n\r\n", "invalid status code"),
            (b"HTTP/1.1 600 High\r\n\r\n", "invalid status code"),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101 Switching Protocols"),
            (b"HTTP/2 200 OK\r\n\r\n", "invalid HTTP version"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", "invalid content-length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n", "invalid content-length"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer-encoding (only a single chunked)"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "unsupported transfer-encoding (only a single chunked)",
            ),
            (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer-encoding in an HTTP/1.0 response"),
        ];
        for (bytes, why) in cases {
            let err = parse(bytes, false).unwrap_err();
            assert!(
                matches!(err, ClientError::Malformed(w) if w == why),
                "{:?}: {err:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let tight = ClientConfig {
            max_response_head_bytes: 32,
            ..config()
        };
        let partial = b"HTTP/1.1 200 OK\r\nX-Pad: 01234567";
        assert_eq!(partial.len(), 32);
        assert_eq!(
            parse_response_head(&partial[..31], &tight, false).unwrap(),
            Parsed::Partial
        );
        let err = parse_response_head(partial, &tight, false).unwrap_err();
        assert!(matches!(
            err,
            ClientError::TooLarge {
                what: "response head",
                max: 32
            }
        ));
        // A complete head past the window is refused too, whatever was read.
        let long = b"HTTP/1.1 200 OK\r\nX-Pad: 0123456789abcdef\r\n\r\n";
        assert!(matches!(
            parse_response_head(long, &tight, false).unwrap_err(),
            ClientError::TooLarge { .. }
        ));
    }

    #[test]
    fn arbitrary_response_bytes_never_panic() {
        const ALPHABET: &[u8] = b"HTTP/1.0 204\r\n\r\n:; \tchunkedContent-LengthTransfer-Encoding0123456789abcdef\x00\xff";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tight = ClientConfig {
            max_response_head_bytes: 64,
            max_response_headers: 3,
            ..config()
        };
        for _ in 0..5000 {
            let len = (next() % 120) as usize;
            let mut buf: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            if next() % 2 == 0 {
                buf.splice(0..0, b"HTTP/1.1 200 OK\r\n".iter().copied());
            }
            for cfg in [config(), tight] {
                if let Ok(Parsed::Complete(h)) = parse_response_head(&buf, &cfg, next() % 2 == 0) {
                    assert!(h.head_len <= buf.len().min(cfg.max_response_head_bytes));
                }
            }
        }
    }

    #[test]
    fn urls() {
        let (addr, host, base) = parse_url("http://127.0.0.1:9001").unwrap();
        assert_eq!(
            (addr, host.as_str(), base.as_str()),
            ("127.0.0.1:9001".parse().unwrap(), "127.0.0.1:9001", "")
        );
        let (addr, host, base) = parse_url("HTTP://localhost:9001/prefix/").unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!(addr.port(), 9001);
        assert_eq!(
            (host.as_str(), base.as_str()),
            ("localhost:9001", "/prefix")
        );
        let (addr, host, base) = parse_url("http://127.0.0.1/a/b").unwrap();
        assert_eq!(
            (addr.port(), host.as_str(), base.as_str()),
            (80, "127.0.0.1", "/a/b")
        );
        let (addr, host, _) = parse_url("http://[::1]:8080/").unwrap();
        assert_eq!(
            (addr, host.as_str()),
            ("[::1]:8080".parse().unwrap(), "[::1]:8080")
        );

        let err = parse_url("https://127.0.0.1:9001").unwrap_err();
        assert!(err.contains("https is not supported"), "{err}");
        for bad in [
            "127.0.0.1:9001",
            "ftp://127.0.0.1",
            "http://",
            "http://:80",
            "http://127.0.0.1:0",
            "http://127.0.0.1:+80",
            "http://127.0.0.1:99999",
            "http://user:pw@127.0.0.1",
            "http://127.0.0.1/?q=1",
            "http://127.0.0.1/#f",
            "http://[::1",
            "http://[::1]x",
            "http://127.0.0.1/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_display_and_classify() {
        let e = ClientError::TooLarge {
            what: "response body",
            max: 10,
        };
        assert_eq!(e.to_string(), "response body exceeds the 10-byte limit");
        assert!(!ClientError::Timeout.is_connect());
        assert!(!ClientError::Closed.is_connect());
        assert!(!ClientError::Malformed("x").is_connect());
        let io = ClientError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(std::error::Error::source(&io).is_some());
        assert!(!io.is_connect());
    }
}
