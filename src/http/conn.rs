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

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::codec::{self, BodyDecoder, HttpError, Limits, Parsed, RequestHead, ResponseHead};
use super::Response;
use crate::api::{self, Reply};
use crate::metrics::ErrorKind;
use crate::shard::{ConnCtl, Shard};

const READ_CHUNK: usize = 4096;

enum Read {
    Data,
    Eof,
    TimedOut,
    Closing,
    Failed,
}

/// Reads more bytes onto the end of `buf`, until `deadline`, or until the shard closes us.
/// Only an idle connection (nothing of a request read yet) may be interrupted by a drain: a
/// cancelled read takes its buffer with it, and a half-read request must be finished.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    ctl: &ConnCtl,
) -> Read {
    let interruptible = buf.is_empty();
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let len = buf.len();
    let owned = std::mem::take(buf);
    let wait = deadline.saturating_duration_since(Instant::now());
    monoio::select! {
        (result, slice) = stream.read(owned.slice_mut(len..)) => {
            *buf = slice.into_inner();
            match result {
                Ok(0) => Read::Eof,
                Ok(_) => Read::Data,
                Err(_) => Read::Failed,
            }
        }
        _ = monoio::time::sleep(wait) => Read::TimedOut,
        _ = ctl.closed(), if interruptible => Read::Closing,
    }
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let buf = std::mem::take(out);
    let (result, mut buf) = stream.write_all(buf).await;
    buf.clear();
    *out = buf;
    result.is_ok()
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
    let shard_header = shard.to_string();
    let mut extra: Vec<(&str, &str)> = Vec::with_capacity(response.headers.len() + 1);
    extra.push(("X-Relay-Shard", &shard_header));
    for (name, value) in &response.headers {
        extra.push((name, value));
    }
    let head = ResponseHead {
        status: response.status,
        // Proxied responses carry the upstream's Content-Type among their headers.
        content_type: (!response.content_type.is_empty()).then_some(response.content_type),
        keep_alive,
        extra_headers: &extra,
    };
    codec::write_response(out, &head, &response.body, head_only);
}

/// Serves one accepted connection until it closes.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, ctl: Rc<ConnCtl>) {
    let _ = stream.set_nodelay(true);
    let limits = limits(&shard);
    let config = shard.config();
    let request_timeout = Duration::from_secs(config.limits.request_timeout_s);
    let idle_timeout = Duration::from_secs(config.limits.idle_timeout_s);
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut output: Vec<u8> = Vec::new();
    // A new connection must send its first request within the request timeout.
    let mut request_started: Option<Instant> = Some(Instant::now());

    'conn: loop {
        let head = match codec::parse_head(&input, &limits) {
            Ok(Parsed::Complete(head)) => head,
            Ok(Parsed::Partial) => {
                if !flush(&mut stream, &mut output).await {
                    break 'conn;
                }
                if input.is_empty() && ctl.is_closing() {
                    break 'conn;
                }
                let deadline = match request_started {
                    Some(start) => start + request_timeout,
                    None => Instant::now() + idle_timeout,
                };
                match read_more(&mut stream, &mut input, deadline, &ctl).await {
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
                let response = Response::error(e.status(), e.code(), &e.message());
                write(&mut output, &response, false, false, shard.id);
                flush(&mut stream, &mut output).await;
                break 'conn;
            }
        };
        let start = request_started.unwrap_or_else(Instant::now);
        let body = match read_body(
            &mut stream,
            &mut input,
            &mut output,
            &head,
            &limits,
            start + request_timeout,
            &ctl,
        )
        .await
        {
            Ok(body) => body,
            Err(BodyFailure::Http(e)) => {
                shard.stats.error(http_error_kind(&e));
                let response = Response::error(e.status(), e.code(), &e.message());
                write(&mut output, &response, false, false, shard.id);
                flush(&mut stream, &mut output).await;
                break 'conn;
            }
            Err(BodyFailure::TimedOut) => {
                shard.stats.error(ErrorKind::RequestTimeout);
                let response = Response::error(
                    408,
                    "request_timeout",
                    "the request body did not arrive within the request timeout",
                );
                write(&mut output, &response, false, false, shard.id);
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
        match api::dispatch(&shard, &ctl, &head, body).await {
            Reply::Response(response) => {
                let keep_alive = head.keep_alive && !ctl.is_closing();
                write(&mut output, &response, keep_alive, head_only, shard.id);
                if !keep_alive {
                    flush(&mut stream, &mut output).await;
                    break 'conn;
                }
            }
            Reply::Stream(stream_request) => {
                if !flush(&mut stream, &mut output).await {
                    break 'conn;
                }
                crate::sse::serve(&shard, &ctl, stream, stream_request).await;
                shard.close_conn(&ctl);
                return;
            }
            Reply::WebSocket(request) => {
                if !flush(&mut stream, &mut output).await {
                    break 'conn;
                }
                let early = std::mem::take(&mut input);
                crate::ws::serve(&shard, &ctl, stream, request, early).await;
                shard.close_conn(&ctl);
                return;
            }
        }
    }
    shard.close_conn(&ctl);
}

enum BodyFailure {
    Http(HttpError),
    TimedOut,
    Gone,
}

/// Reads and decodes the body of `head`, consuming the head and body from `input`.
async fn read_body(
    stream: &mut TcpStream,
    input: &mut Vec<u8>,
    output: &mut Vec<u8>,
    head: &RequestHead,
    limits: &Limits,
    deadline: Instant,
    ctl: &ConnCtl,
) -> Result<Bytes, BodyFailure> {
    let mut decoder = BodyDecoder::new(&head.body, limits).map_err(BodyFailure::Http)?;
    let mut body = Vec::new();
    let mut at = head.head_len;
    let mut continue_sent = false;
    loop {
        let (used, done) = decoder
            .decode(input.get(at..).unwrap_or_default(), &mut body)
            .map_err(BodyFailure::Http)?;
        at += used;
        if done {
            input.drain(..at);
            return Ok(Bytes::from(body));
        }
        // Keep only the unconsumed part so the buffer stays bounded by one chunk.
        input.drain(..at);
        at = 0;
        if head.expect_continue && !continue_sent {
            continue_sent = true;
            output.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if !flush(stream, output).await {
            return Err(BodyFailure::Gone);
        }
        match read_more(stream, input, deadline, ctl).await {
            Read::Data => {}
            Read::TimedOut => return Err(BodyFailure::TimedOut),
            Read::Eof | Read::Failed | Read::Closing => return Err(BodyFailure::Gone),
        }
    }
}
