//! The life of one TCP connection on a shard: read, parse, dispatch, write, repeat.
//!
//! Owns the connection's read and write buffers, its deadlines and keep-alive. Pipelined
//! requests are answered in order, and their responses leave together in one write when the
//! client sent them together. A request may turn the connection into an SSE stream, which then
//! owns the socket until it ends.
//!
//! Limits: the head is bounded by `limits.max_header_bytes` (431), the body by
//! `limits.max_body_bytes` (413); one request must arrive within `limits.request_timeout_s`
//! (408, then close); an idle keep-alive connection is closed after `limits.idle_timeout_s`.
//! A peer's fault closes that peer only. Must never: panic on peer input, or buffer more than
//! one request's head and body.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use smallvec::SmallVec;

use super::codec::{
    self, BodyDecoder, BodyFraming, BodyKind, HttpError, Limits, Parsed, RequestHead, ResponseHead,
};
use super::Response;
use crate::api::{self, Reply};
use crate::metrics::ErrorKind;
use crate::proxy::{self, Answer, BodyError, BodySource};
use crate::shard::{ConnCtl, Shard};

const READ_CHUNK: usize = 4096;
/// The most write buffer an HTTP connection keeps between responses: more than pipelined
/// single-event answers need (64 of them are about 16 KiB).
const KEPT_OUTPUT_BYTES: usize = 16 * 1024;
/// The most answers a connection holds before it writes them and handles the next request.
/// Without it, a client that pipelines requests and reads nothing had every answer to one read
/// of requests held at once: 4 KiB of history requests made 70 pages, 66 MB.
const PIPELINED_OUTPUT_BYTES: usize = KEPT_OUTPUT_BYTES;

enum Read {
    Data,
    Eof,
    TimedOut,
    Closing,
    Failed,
}

/// A connection's read deadline and the one timer that enforces it, moved for each read
/// rather than one timer made and dropped per read (moving it later is nearly free in monoio).
/// Boxed because monoio aligns its timers to 128 bytes: held inline, one would make every
/// future around it 128-aligned, and the body reader's is boxed for each request. glibc serves
/// such aligned allocations slowly (`posix_memalign` and a heap grown and trimmed by
/// `mprotect`), which cost 5% of a shard's core in the `channels` scenario.
struct ReadTimer {
    at: Instant,
    sleep: Pin<Box<monoio::time::Sleep>>,
}

impl ReadTimer {
    fn new(at: Instant) -> ReadTimer {
        ReadTimer {
            at,
            sleep: Box::pin(monoio::time::sleep_until(monoio::time::Instant::from_std(
                at,
            ))),
        }
    }

    /// Reads from now on give up at `at`.
    fn set(&mut self, at: Instant) {
        self.at = at;
    }

    /// Completes at the deadline.
    fn expired(&mut self) -> Pin<&mut monoio::time::Sleep> {
        let at = monoio::time::Instant::from_std(self.at);
        if self.sleep.deadline() != at {
            self.sleep.as_mut().reset(at);
        }
        self.sleep.as_mut()
    }
}

/// Reads more bytes onto the end of `buf`, until `timer`'s deadline, or until the shard closes
/// us. Only an idle connection (nothing of a request read yet) may be interrupted by a drain:
/// a cancelled read takes its buffer with it, and a half-read request must be finished.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    timer: &mut ReadTimer,
    ctl: &ConnCtl,
) -> Read {
    let interruptible = buf.is_empty();
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let len = buf.len();
    let owned = std::mem::take(buf);
    monoio::select! {
        (result, slice) = stream.read(owned.slice_mut(len..)) => {
            *buf = slice.into_inner();
            match result {
                Ok(0) => Read::Eof,
                Ok(_) => Read::Data,
                Err(_) => Read::Failed,
            }
        }
        _ = timer.expired() => Read::TimedOut,
        _ = ctl.closed(), if interruptible => Read::Closing,
    }
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let buf = std::mem::take(out);
    let (result, buf) = stream.write_all(buf).await;
    *out = recycle_output(buf);
    result.is_ok()
}

/// Writes the answers gathered so far, after the deliveries their publishes caused (see
/// [`Shard::local_deliveries_first`]).
async fn write_answers(shard: &Shard, stream: &mut TcpStream, output: &mut Vec<u8>) -> bool {
    if !output.is_empty() {
        shard.local_deliveries_first().await;
    }
    flush(stream, output).await
}

/// The written buffer, emptied for the next responses. A large answer (a history page, a
/// listing) must not stay with a keep-alive connection for life: the buffer is shrunk to
/// [`KEPT_OUTPUT_BYTES`], not dropped, so that pipelined answers grow it again in one step.
fn recycle_output(mut buf: Vec<u8>) -> Vec<u8> {
    buf.clear();
    buf.shrink_to(KEPT_OUTPUT_BYTES);
    buf
}

fn limits(shard: &Shard) -> Limits {
    let l = &shard.config().limits;
    Limits {
        max_header_bytes: l.max_header_bytes,
        max_headers: l.max_headers,
        max_body_bytes: l.max_body_bytes,
    }
}

fn http_error_kind(e: &HttpError) -> ErrorKind {
    match e {
        HttpError::HeadersTooLarge { .. } | HttpError::TooManyHeaders { .. } => {
            ErrorKind::HeadersTooLarge
        }
        HttpError::BodyTooLarge { .. } => ErrorKind::BodyTooLarge,
        _ => ErrorKind::BadRequest,
    }
}

/// Appends a response; `keep_alive` false adds `Connection: close`.
pub fn write(
    out: &mut Vec<u8>,
    response: &Response,
    keep_alive: bool,
    head_only: bool,
    shard: usize,
) {
    let extra: SmallVec<[(&str, &str); 8]> = response
        .headers
        .iter()
        .map(|(name, value)| (name.as_ref(), value.as_str()))
        .collect();
    let head = ResponseHead {
        status: response.status,
        // Proxied responses carry the upstream's Content-Type among their headers.
        content_type: (!response.content_type.is_empty()).then_some(response.content_type),
        relay_shard: Some(shard),
        keep_alive,
        extra_headers: &extra,
    };
    codec::write_response(out, &head, &response.body, head_only);
}

/// Serves one accepted connection until it closes.
///
/// Memory: this future lives as long as the connection, and an async fn's future is as large
/// as the largest state it may hold across an await. Every path that holds much (dispatch,
/// proxying, the SSE and WebSocket sessions) is therefore boxed, so a connection at rest costs
/// only what it is doing: an idle WebSocket holds its session's small future, not the largest
/// request handler's.
///
/// The socket already has TCP_NODELAY: accepted sockets inherit it from the listener.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, ctl: Rc<ConnCtl>) {
    let limits = limits(&shard);
    let config = shard.config();
    let request_timeout = Duration::from_secs(config.limits.request_timeout_s);
    let idle_timeout = Duration::from_secs(config.limits.idle_timeout_s);
    // `BytesMut`: a publish's body is split off it as `Bytes` without a copy, and a consumed
    // head is skipped without moving what follows.
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output: Vec<u8> = Vec::new();
    // A new connection must send its first request within the request timeout.
    let mut request_started: Option<Instant> = Some(Instant::now());
    let mut timer = ReadTimer::new(Instant::now() + request_timeout);
    // Pipelined publishes whose channels other shards own, waiting for their answers; every
    // response written after them waits for them (see `answer_publishes`).
    let mut publishing: VecDeque<Pending> = VecDeque::new();
    // The buffers of the last request's head, for the next one: no allocation per request.
    let mut head_buffers = codec::HeadBuffers::default();

    'conn: loop {
        // Everything in `output` precedes the publishes still waiting: it may go out first.
        if output.len() >= PIPELINED_OUTPUT_BYTES
            && !write_answers(&shard, &mut stream, &mut output).await
        {
            break 'conn;
        }
        let head = match codec::parse_head_reusing(&input, &limits, &mut head_buffers) {
            Ok(Parsed::Complete(head)) => head,
            Ok(Parsed::Partial) => {
                if !answer_publishes(&shard, &mut publishing, &mut output).await {
                    flush(&mut stream, &mut output).await;
                    break 'conn;
                }
                if !write_answers(&shard, &mut stream, &mut output).await {
                    break 'conn;
                }
                if input.is_empty() && ctl.is_closing() {
                    break 'conn;
                }
                timer.set(match request_started {
                    Some(start) => start + request_timeout,
                    None => Instant::now() + idle_timeout,
                });
                match read_more(&mut stream, &mut input, &mut timer, &ctl).await {
                    Read::Data => {
                        request_started.get_or_insert_with(Instant::now);
                        continue;
                    }
                    Read::TimedOut if request_started.is_some() => {
                        shard.stats.error(ErrorKind::RequestTimeout);
                        let response = Response::error(
                            408,
                            "request_timeout",
                            &format!(
                                "the request was not complete within {}s",
                                request_timeout.as_secs()
                            ),
                        );
                        write(&mut output, &response, false, false, shard.id);
                        flush(&mut stream, &mut output).await;
                        break 'conn;
                    }
                    _ => break 'conn,
                }
            }
            Err(e) => {
                shard.stats.error(http_error_kind(&e));
                answer_publishes(&shard, &mut publishing, &mut output).await;
                let response = Response::error(e.status(), e.code(), &e.message());
                write(&mut output, &response, false, false, shard.id);
                flush(&mut stream, &mut output).await;
                break 'conn;
            }
        };
        let start = request_started.unwrap_or_else(Instant::now);
        // The body must arrive within the request's time, counted from its first byte.
        timer.set(start + request_timeout);
        // Only a request complete in the buffer may overtake the publishes before it: one
        // that waits for its body (and may be answered `100 Continue`) or is proxied writes to
        // the client before its own response.
        let proxied = !api::is_own_path(head.path()) && proxy::routes(&shard, head.path());
        if (proxied || !body_is_buffered(&head, &input))
            && !answer_publishes(&shard, &mut publishing, &mut output).await
        {
            flush(&mut stream, &mut output).await;
            break 'conn;
        }
        if proxied {
            shard.stats.http_requests.inc();
            // Boxed, like every long path below: a connection's future is only as large as
            // the state it holds at rest (see `serve`).
            let keep_alive = Box::pin(serve_proxied(
                &shard,
                &ctl,
                &mut stream,
                &mut input,
                &mut output,
                &head,
                &limits,
                &mut timer,
            ))
            .await;
            head_buffers = head.into_buffers();
            if !keep_alive {
                break 'conn;
            }
            request_started = (!input.is_empty()).then(Instant::now);
            continue 'conn;
        }
        let body = match BodyReader::new(
            &mut stream,
            &mut input,
            &mut output,
            &head,
            &limits,
            &mut timer,
            &ctl,
        ) {
            Ok(mut reader) => match reader.buffered_body() {
                Some(body) => Ok(body),
                None => Box::pin(reader.read_all()).await,
            },
            Err(e) => Err(BodyFailure::Http(e)),
        };
        let body = match body {
            Ok(body) => body,
            Err(BodyFailure::Http(e)) => {
                shard.stats.error(http_error_kind(&e));
                write(
                    &mut output,
                    &body_error_response(&e),
                    false,
                    false,
                    shard.id,
                );
                flush(&mut stream, &mut output).await;
                break 'conn;
            }
            Err(BodyFailure::TimedOut) => {
                shard.stats.error(ErrorKind::RequestTimeout);
                write(
                    &mut output,
                    &body_timeout_response(),
                    false,
                    false,
                    shard.id,
                );
                flush(&mut stream, &mut output).await;
                break 'conn;
            }
            Err(BodyFailure::Gone) => break 'conn,
        };
        request_started = if input.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        shard.stats.http_requests.inc();

        let head_only = head.method == codec::Method::Head;
        let reply = match api::dispatch_publish(&shard, &ctl, &head, body) {
            Ok(reply) => reply,
            Err(body) => Box::pin(api::dispatch(&shard, &ctl, &head, body)).await,
        };
        let keep_alive = head.keep_alive && !ctl.is_closing();
        head_buffers = head.into_buffers();
        let reply = match reply {
            Reply::Publishing(answer) => {
                publishing.push_back(Pending { answer, keep_alive });
                let max = shard.config().limits.max_publishes_in_flight;
                if (!keep_alive || publishing.len() >= max)
                    && !answer_publishes(&shard, &mut publishing, &mut output).await
                {
                    flush(&mut stream, &mut output).await;
                    break 'conn;
                }
                continue 'conn;
            }
            other => other,
        };
        // Every other response (and every change of protocol) comes after the publishes.
        if !answer_publishes(&shard, &mut publishing, &mut output).await {
            flush(&mut stream, &mut output).await;
            break 'conn;
        }
        match reply {
            Reply::Response(response) => {
                write(&mut output, &response, keep_alive, head_only, shard.id);
                if !keep_alive {
                    flush(&mut stream, &mut output).await;
                    break 'conn;
                }
            }
            // Queued above; never reaches here.
            Reply::Publishing(_) => {}
            Reply::Stream(stream_request) => {
                if !flush(&mut stream, &mut output).await {
                    break 'conn;
                }
                // As a WebSocket session does, the stream gets a task of its own and this one
                // ends: its future and buffers, sized for every HTTP path, would sit idle for
                // the stream's whole life (5.9 KB of an idle stream's 10.3 KB).
                monoio::spawn(crate::sse::serve(shard, ctl, stream, stream_request));
                return;
            }
            Reply::WebSocket(request) => {
                if !flush(&mut stream, &mut output).await {
                    break 'conn;
                }
                // The session gets a task of its own and this one ends: its future is sized
                // for every HTTP path and would sit idle for the WebSocket's whole life.
                let early = Vec::from(std::mem::take(&mut input));
                monoio::spawn(crate::ws::serve(shard, ctl, stream, request, early));
                return;
            }
        }
    }
    shard.close_conn(&ctl);
}

/// A pipelined publish waiting for other shards, and whether its connection carries on.
struct Pending {
    answer: api::Publishing,
    keep_alive: bool,
}

/// Writes the responses of the publishes still waiting for other shards, in request order.
/// False when one of them ends the connection (`Connection: close`); nothing follows it.
async fn answer_publishes(
    shard: &Shard,
    pending: &mut VecDeque<Pending>,
    output: &mut Vec<u8>,
) -> bool {
    // Polled in place rather than awaited as a future of its own: the wait adds only these
    // references to the connection's future, which therefore needs no box for it.
    while let Some(front) = pending.front_mut() {
        let response = poll_fn(|cx| front.answer.poll_response(cx, shard)).await;
        let keep_alive = front.keep_alive;
        pending.pop_front();
        write(output, &response, keep_alive, false, shard.id);
        if !keep_alive {
            return false;
        }
    }
    true
}

/// Whether the request's whole body (if any) is in `input` after its head.
fn body_is_buffered(head: &RequestHead, input: &[u8]) -> bool {
    match head.body {
        BodyKind::None => true,
        BodyKind::ContentLength(n) => {
            usize::try_from(n).is_ok_and(|n| input.len().saturating_sub(head.head_len) >= n)
        }
        BodyKind::Chunked => false,
    }
}

/// Proxies one request (its body streamed through when large) and passes the upstream's
/// answer on as it arrives. Returns whether the connection may carry another request.
#[allow(clippy::too_many_arguments)]
async fn serve_proxied(
    shard: &Rc<Shard>,
    ctl: &Rc<ConnCtl>,
    stream: &mut TcpStream,
    input: &mut BytesMut,
    output: &mut Vec<u8>,
    head: &RequestHead,
    limits: &Limits,
    timer: &mut ReadTimer,
) -> bool {
    let mut reader = match BodyReader::new(stream, input, output, head, limits, timer, ctl) {
        Ok(reader) => reader,
        Err(e) => {
            shard.stats.error(http_error_kind(&e));
            write(output, &body_error_response(&e), false, false, shard.id);
            flush(stream, output).await;
            return false;
        }
    };
    let answer = proxy::forward(shard, ctl.peer, head, &mut reader).await;
    // An answer given before the whole body was read leaves the rest unread: close after it.
    let body_read = reader.done;
    let answer = match answer {
        Ok(answer) => answer,
        Err(BodyError::Refused(response)) => {
            shard.stats.error(match response.status {
                408 => ErrorKind::RequestTimeout,
                413 => ErrorKind::BodyTooLarge,
                _ => ErrorKind::BadRequest,
            });
            write(output, &response, false, false, shard.id);
            flush(stream, output).await;
            return false;
        }
        Err(BodyError::Gone) => return false,
    };
    let keep_alive = head.keep_alive && body_read && !ctl.is_closing();
    let head_only = head.method == codec::Method::Head;
    match answer {
        Answer::Relay(response) => {
            write(output, &response, keep_alive, head_only, shard.id);
            flush(stream, output).await && keep_alive
        }
        Answer::Upstream(upstream) => {
            pass_on(shard, stream, output, head, upstream, keep_alive).await
        }
    }
}

/// Writes the upstream's head, then its body as it arrives: with its `Content-Length` when it
/// declared one, else chunked (close-delimited for an HTTP/1.0 client). An upstream failing
/// mid-body closes the client's connection, the only way left to say the body is cut short.
async fn pass_on(
    shard: &Shard,
    stream: &mut TcpStream,
    output: &mut Vec<u8>,
    head: &RequestHead,
    upstream: proxy::Upstream<'_>,
    keep_alive: bool,
) -> bool {
    let proxy::Upstream {
        mut response,
        headers,
        deadline,
    } = upstream;
    let status = response.status;
    let head_only = head.method == codec::Method::Head;
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if head_only || bodiless {
        // A HEAD answer keeps the length a GET would get.
        let declared = response
            .headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        match declared {
            Some(n) if head_only && !bodiless => BodyFraming::Length(n),
            _ => BodyFraming::None,
        }
    } else {
        match response.content_length() {
            Some(n) => BodyFraming::Length(codec::usize_to_u64(n)),
            None if head.minor_version >= 1 => BodyFraming::Chunked,
            None => BodyFraming::None,
        }
    };
    // Without a length or chunks, only the close can end the body.
    let keep_alive = keep_alive && !(framing == BodyFraming::None && !head_only && !bodiless);
    let extra: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let response_head = ResponseHead {
        status,
        content_type: None,
        relay_shard: Some(shard.id),
        keep_alive,
        extra_headers: &extra,
    };
    codec::write_response_head(output, &response_head, framing);
    let chunked = framing == BodyFraming::Chunked;
    loop {
        // Send what is ready before waiting on the upstream, so the client sees the head
        // (and each piece) as soon as it exists, without a write per piece otherwise.
        if !response.has_buffered() && !flush(stream, output).await {
            return false;
        }
        match response.next(deadline).await {
            Ok(Some(piece)) => {
                if head_only || bodiless {
                    continue;
                }
                if chunked {
                    codec::push_chunk(output, &piece);
                } else {
                    output.extend_from_slice(&piece);
                }
                if output.len() >= PASS_ON_FLUSH_BYTES && !flush(stream, output).await {
                    return false;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "upstream body failed; closing the client connection");
                shard.stats.error(ErrorKind::UpstreamBody);
                flush(stream, output).await;
                return false;
            }
        }
    }
    if chunked {
        codec::push_chunk(output, b"");
    }
    if !keep_alive {
        flush(stream, output).await;
    }
    keep_alive
}

/// Output gathered while passing a body on is written once it reaches this size.
const PASS_ON_FLUSH_BYTES: usize = 64 * 1024;

enum BodyFailure {
    Http(HttpError),
    TimedOut,
    Gone,
}

/// The body of one request, read from the client and decoded piece by piece.
struct BodyReader<'a> {
    stream: &'a mut TcpStream,
    /// Holds the head and body bytes read so far; consumed as they are decoded.
    input: &'a mut BytesMut,
    output: &'a mut Vec<u8>,
    decoder: BodyDecoder,
    content_length: Option<u64>,
    expect_continue: bool,
    timer: &'a mut ReadTimer,
    ctl: &'a ConnCtl,
    done: bool,
}

impl<'a> BodyReader<'a> {
    /// Consumes the head from `input`; the body follows it.
    fn new(
        stream: &'a mut TcpStream,
        input: &'a mut BytesMut,
        output: &'a mut Vec<u8>,
        head: &RequestHead,
        limits: &Limits,
        timer: &'a mut ReadTimer,
        ctl: &'a ConnCtl,
    ) -> Result<Self, HttpError> {
        let decoder = BodyDecoder::new(&head.body, limits)?;
        input.advance(head.head_len.min(input.len()));
        let content_length = match head.body {
            BodyKind::None => Some(0),
            BodyKind::ContentLength(n) => Some(n),
            BodyKind::Chunked => None,
        };
        Ok(BodyReader {
            stream,
            input,
            output,
            decoder,
            content_length,
            expect_continue: head.expect_continue,
            timer,
            ctl,
            done: false,
        })
    }

    /// The next decoded piece of the body, `None` once it is complete.
    async fn next_piece(&mut self) -> Result<Option<Vec<u8>>, BodyFailure> {
        if self.done {
            return Ok(None);
        }
        loop {
            let mut piece = Vec::new();
            let (used, done) = self
                .decoder
                .decode(self.input, &mut piece)
                .map_err(BodyFailure::Http)?;
            // Keep only the unconsumed part so the buffer stays bounded by one read.
            self.input.advance(used.min(self.input.len()));
            self.done = done;
            if !piece.is_empty() || done {
                return Ok((!piece.is_empty()).then_some(piece));
            }
            if std::mem::take(&mut self.expect_continue) {
                self.output
                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            if !flush(self.stream, self.output).await {
                return Err(BodyFailure::Gone);
            }
            match read_more(self.stream, self.input, self.timer, self.ctl).await {
                Read::Data => {}
                Read::TimedOut => return Err(BodyFailure::TimedOut),
                Read::Eof | Read::Failed | Read::Closing => return Err(BodyFailure::Gone),
            }
        }
    }

    /// The whole body, when every byte of it is read already (a small publish arrives with its
    /// head): no future to box for it, as [`BodyReader::read_all`] needs. `None` otherwise.
    fn buffered_body(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        // The body's own bytes in the read buffer, shared rather than copied: the drafts of a
        // publish are slices of it. The buffer gets its memory back once they are dropped.
        let length = self.decoder.take_whole(self.input.len())?;
        self.done = true;
        Some(self.input.split_to(length).freeze())
    }

    /// The whole body.
    async fn read_all(mut self) -> Result<Bytes, BodyFailure> {
        let mut body: Vec<u8> = Vec::new();
        while let Some(piece) = self.next_piece().await? {
            if body.is_empty() {
                body = piece;
            } else {
                body.extend_from_slice(&piece);
            }
        }
        Ok(Bytes::from(body))
    }
}

impl BodySource for BodyReader<'_> {
    fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    async fn next(&mut self) -> Result<Option<Vec<u8>>, BodyError> {
        self.next_piece().await.map_err(|failure| match failure {
            BodyFailure::Http(e) => BodyError::Refused(body_error_response(&e)),
            BodyFailure::TimedOut => BodyError::Refused(body_timeout_response()),
            BodyFailure::Gone => BodyError::Gone,
        })
    }
}

fn body_error_response(e: &HttpError) -> Response {
    Response::error(e.status(), e.code(), &e.message())
}

fn body_timeout_response() -> Response {
    Response::error(
        408,
        "request_timeout",
        "the request body did not arrive within the request timeout",
    )
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::{Bytes, BytesMut};
    use monoio::net::TcpStream;

    use super::{read_more, recycle_output, write, BodyReader, ReadTimer, KEPT_OUTPUT_BYTES};
    use crate::config::Config;
    use crate::http::codec::{parse_head, Method, Parsed, RequestHead};
    use crate::http::Response;
    use crate::shard::{ConnCtl, Shard, Shared};

    #[test]
    fn a_large_answer_leaves_no_large_buffer_behind() {
        let big = recycle_output(vec![b'x'; 330_000]);
        assert!(big.is_empty());
        assert!(big.capacity() <= KEPT_OUTPUT_BYTES, "{}", big.capacity());
        // Pipelined answers keep what they grew: no allocation per response.
        let mut small = Vec::with_capacity(8192);
        small.extend_from_slice(&[b'x'; 6000]);
        let small = recycle_output(small);
        assert_eq!((small.len(), small.capacity()), (0, 8192));
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    /// A shard and one connected socket, as `serve` has them (the listener keeps it open).
    async fn test_conn() -> (Rc<Shard>, TcpStream, Rc<ConnCtl>, monoio::net::TcpListener) {
        let config = Arc::new(Config::default());
        let registry = crate::registry::control::initial_registry(&config, 1).unwrap();
        let shard = Shard::new(0, Arc::new(Shared::new(config, 1, registry)));
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect_addr(addr).await.unwrap();
        (
            shard,
            stream,
            Rc::new(ConnCtl::new(1, addr, false)),
            listener,
        )
    }

    /// What `serve` keeps per connection for reading requests and their bodies.
    struct ReadState {
        input: BytesMut,
        output: Vec<u8>,
        timer: ReadTimer,
        limits: super::Limits,
    }

    impl ReadState {
        fn new(shard: &Shard) -> Self {
            ReadState {
                input: BytesMut::new(),
                output: Vec::new(),
                timer: ReadTimer::new(Instant::now()),
                limits: super::limits(shard),
            }
        }

        fn body_reader<'a>(
            &'a mut self,
            stream: &'a mut TcpStream,
            head: &RequestHead,
            ctl: &'a ConnCtl,
        ) -> BodyReader<'a> {
            BodyReader::new(
                stream,
                &mut self.input,
                &mut self.output,
                head,
                &self.limits,
                &mut self.timer,
                ctl,
            )
            .unwrap()
        }
    }

    #[test]
    fn a_body_already_read_is_taken_without_waiting() {
        runtime().block_on(async {
            let (shard, mut stream, ctl, _listener) = test_conn().await;
            let mut state = ReadState::new(&shard);
            let mut take = |request: &[u8]| {
                state.input.clear();
                state.input.extend_from_slice(request);
                let head = match parse_head(&state.input, &state.limits) {
                    Ok(Parsed::Complete(head)) => head,
                    other => panic!("{other:?}"),
                };
                let mut reader = state.body_reader(&mut stream, &head, &ctl);
                let body = reader.buffered_body().map(Some);
                (body, state.input.to_vec())
            };
            // The whole body, and the next request left in the buffer.
            let (body, rest) = take(b"POST /e HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /");
            assert_eq!(body, Some(Some(Bytes::from_static(b"abc"))));
            assert_eq!(rest, b"GET /");
            // No body at all.
            let (body, rest) = take(b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(body, Some(Some(Bytes::new())));
            assert!(rest.is_empty());
            // Part of the body, or a chunked one: left for `read_all`, nothing taken.
            let (body, rest) = take(b"POST /e HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc");
            assert_eq!((body, rest.as_slice()), (None, &b"abc"[..]));
            let chunked =
                b"POST /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
            let (body, rest) = take(chunked);
            assert_eq!((body, rest.len()), (None, 13));
        });
    }

    /// The futures made for every request are boxed (see `serve`). Over-aligned, each box is
    /// a `posix_memalign`, which glibc serves slowly: a monoio timer (128-byte aligned) held
    /// inline by any of them once cost 5% of a shard's core. This keeps them plain.
    #[test]
    fn per_request_futures_are_not_over_aligned() {
        runtime().block_on(async {
            let (shard, mut stream, ctl, _listener) = test_conn().await;
            let head = RequestHead::for_test(Method::Post, 1, "/api/v1/relay/events", &[]);
            let plain = std::mem::align_of::<u128>();

            let dispatch = crate::api::dispatch(&shard, &ctl, &head, Bytes::new());
            assert!(std::mem::align_of_val(&dispatch) <= plain);
            drop(dispatch);

            let mut state = ReadState::new(&shard);
            let read = read_more(&mut stream, &mut state.input, &mut state.timer, &ctl);
            assert!(std::mem::align_of_val(&read) <= plain);
            drop(read);
            let reader = state.body_reader(&mut stream, &head, &ctl);
            assert!(std::mem::align_of_val(&reader.read_all()) <= plain);
        });
    }

    #[test]
    fn every_response_names_its_shard() {
        for (shard, text) in [(0, "0"), (7, "7"), (4096, "4096")] {
            let mut out = Vec::new();
            write(
                &mut out,
                &Response::json(202, b"{}".to_vec()),
                true,
                false,
                shard,
            );
            let head = String::from_utf8(out).expect("a response head is text");
            assert!(
                head.contains(&format!("\r\nX-Relay-Shard: {text}\r\n")),
                "shard {shard}: {head}"
            );
        }
    }

    #[test]
    fn publishes_are_answered_without_a_dispatch_future() {
        runtime().block_on(async {
            let (shard, _stream, ctl, _listener) = test_conn().await;
            let body = || Bytes::from_static(br#"{"channel":"c","type":"t","data":1}"#);
            let events = "/api/v1/relay/events";
            // A publish: answered here, 202.
            let head = RequestHead::for_test(Method::Post, 1, events, &[]);
            match crate::api::dispatch_publish(&shard, &ctl, &head, body()) {
                Ok(crate::api::Reply::Response(r)) => assert_eq!(r.status, 202),
                Ok(_) => panic!("a publish on one shard is answered at once"),
                Err(_) => panic!("a publish is answered here"),
            }
            // A bad one: refused here too.
            let bad = Bytes::from_static(b"{");
            match crate::api::dispatch_publish(&shard, &ctl, &head, bad) {
                Ok(crate::api::Reply::Response(r)) => assert_eq!(r.status, 400),
                _ => panic!("a bad publish is refused here"),
            }
            // Anything else gets its body back for the router.
            for (method, target) in [
                (Method::Get, events),
                (Method::Post, "/api/v1/relay/events/"),
                (Method::Post, "/api/v1/relay/subsystems"),
            ] {
                let head = RequestHead::for_test(method, 1, target, &[]);
                let given = body();
                match crate::api::dispatch_publish(&shard, &ctl, &head, given.clone()) {
                    Err(back) => assert_eq!(back, given),
                    Ok(_) => panic!("{target} is not a publish"),
                }
            }
        });
    }
}
