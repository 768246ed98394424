//! NATS mode (`--target-kind nats`): the same scenarios against nats-server, for comparison.
//!
//! Owns the NATS client protocol as the generator speaks it: the client lines it writes
//! (`CONNECT`, `SUB`, `PUB`, `PING`, `PONG`), the parser of server lines (`INFO`, `MSG`, `HMSG`,
//! `PING`, `PONG`, `+OK`, `-ERR`), a subscriber's protocol state over nats-server's WebSocket
//! listener ([`NatsSub`]: WebSocket frames in, a NATS byte stream inside them, with messages
//! split across frames and reads or several in one frame), the publishers' reply matcher
//! ([`PubReplies`]: a publish request ends in a `PING`, its `PONG` is the ack), and a NATS
//! subscriber connection's task and read loop. The codec is pure and tested without sockets;
//! the connection code calls `subscriber` (upgrade, end-of-connection accounting, sequence
//! recording), `wsframe` and the thread's recorder, and the publishers stay in `publisher`.
//!
//! nats-server numbers nothing, so every payload is the generator's tagged data
//! (`payload::write_tagged_data`: scheduled time, the publisher's own sequence on the channel,
//! the publisher's index); a subscription keeps one sequence tracker per publisher, which
//! makes lost, duplicate and out-of-order counts exact (NATS orders messages per publisher
//! connection, not across publishers). Subjects are the run's channel names.
//! Must never: allocate per message, panic on anything the server sends, hold more than one
//! bounded protocol item across frames, or cancel a read in flight on a live connection.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::clock::now_ns;
use crate::error::ConnError;
use crate::http;
use crate::net;
use crate::publisher::{AckSink, Inflight};
use crate::scan;
use crate::stats::{SeqTracker, C};
use crate::subscriber::{self, Fed, Recorder, MAX_FRAME_BYTES};
use crate::worker::Ctx;
use crate::wsframe::{self, opcode, Masker};

/// The upgrade path: nats-server serves clients on every path but `/leafnode` and `/mqtt`.
pub const WS_PATH: &str = "/";
/// The longest server control line accepted (`INFO` is the long one).
pub const MAX_CONTROL_LINE: usize = 64 * 1024;
/// The largest message payload accepted (what this generator publishes is at most 60000).
pub const MAX_PAYLOAD: usize = MAX_FRAME_BYTES;
/// The subscription id of a subscriber's one subscription.
const SID: &[u8] = b"1";
/// Data frames are streamed through, never buffered whole, so their size needs no bound of
/// its own (nats-server puts everything pending for a connection in one frame).
const MAX_WS_FRAME: usize = usize::MAX / 2;

/// Appends `CONNECT` with no `+OK` acks (`verbose` off) and no echo, plus `auth_token` when
/// there is a token (validated free of JSON-special characters by `Options::validate`).
pub fn write_connect(out: &mut Vec<u8>, token: Option<&str>) {
    out.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\
          \"name\":\"relay-loadgen\",\"lang\":\"rust\",\"version\":\"",
    );
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b"\",\"protocol\":1");
    if let Some(token) = token {
        out.extend_from_slice(b",\"auth_token\":\"");
        out.extend_from_slice(token.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"}\r\n");
}

/// Appends `SUB <subject> <sid>`.
pub fn write_sub(out: &mut Vec<u8>, subject: &[u8], sid: &[u8]) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    out.extend_from_slice(sid);
    out.extend_from_slice(b"\r\n");
}

/// Appends `PUB <subject> <#bytes>` and the payload.
#[inline]
pub fn write_pub(out: &mut Vec<u8>, subject: &[u8], payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    crate::payload::push_u64(out, payload.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[inline]
pub fn write_ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PING\r\n");
}

#[inline]
pub fn write_pong(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PONG\r\n");
}

/// Whether a WebSocket payload starts with nats-server's `INFO` line (what it sends first).
pub fn is_info(payload: &[u8]) -> bool {
    payload
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"INFO ") || p.eq_ignore_ascii_case(b"INFO\t"))
}

/// One protocol item from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// The JSON after `INFO`.
    Info(&'a [u8]),
    Msg {
        subject: &'a [u8],
        sid: &'a [u8],
        payload: &'a [u8],
    },
    /// A message with headers: never one this generator published.
    HMsg {
        subject: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    /// The text of `-ERR '<text>'`, quotes removed.
    Err(&'a [u8]),
}

/// What [`parse_op`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A complete item and the bytes it took.
    Op(ServerOp<'a>, usize),
    /// Not complete yet; `Some(total)` once its control line says how long it is.
    Partial(Option<usize>),
}

/// Parses the protocol item at the start of `buf` (operation names in any case, fields
/// separated by spaces or tabs, lines ending in CRLF or LF). Errors on anything nats-server
/// does not send, on a control line above [`MAX_CONTROL_LINE`] and a payload above
/// [`MAX_PAYLOAD`].
#[inline]
pub fn parse_op(buf: &[u8]) -> Result<Parsed<'_>, ConnError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(protocol("a control line", buf));
        }
        return Ok(Parsed::Partial(None));
    };
    if nl > MAX_CONTROL_LINE {
        return Err(protocol("a control line", buf));
    }
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let body = nl + 1;
    let (name, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let op = if name.eq_ignore_ascii_case(b"MSG") || name.eq_ignore_ascii_case(b"HMSG") {
        let headers = name.len() == 4;
        let (f, n) = fields(args);
        // MSG subject sid [reply] size; HMSG subject sid [reply] header-size total-size.
        let sizes = if headers { 2 } else { 1 };
        if !(2 + sizes..=3 + sizes).contains(&n) {
            return Err(protocol("a MSG line", line));
        }
        let size = number(f[n - 1]).ok_or_else(|| protocol("a MSG size", line))?;
        if size > MAX_PAYLOAD {
            return Err(ConnError::Protocol(format!(
                "a message of {size} bytes is above the {MAX_PAYLOAD}-byte bound"
            )));
        }
        let total = body + size + 2;
        let Some(item) = buf.get(..total) else {
            return Ok(Parsed::Partial(Some(total)));
        };
        if !item.ends_with(b"\r\n") {
            return Err(protocol("a message not followed by CRLF", line));
        }
        let op = if headers {
            ServerOp::HMsg { subject: f[0] }
        } else {
            ServerOp::Msg {
                subject: f[0],
                sid: f[1],
                payload: &item[body..body + size],
            }
        };
        return Ok(Parsed::Op(op, total));
    } else if name.eq_ignore_ascii_case(b"PING") {
        ServerOp::Ping
    } else if name.eq_ignore_ascii_case(b"PONG") {
        ServerOp::Pong
    } else if name.eq_ignore_ascii_case(b"+OK") {
        ServerOp::Ok
    } else if name.eq_ignore_ascii_case(b"-ERR") {
        let text = args.trim_ascii();
        let text = text
            .strip_prefix(b"'")
            .and_then(|t| t.strip_suffix(b"'"))
            .unwrap_or(text);
        ServerOp::Err(text)
    } else if name.eq_ignore_ascii_case(b"INFO") {
        ServerOp::Info(args)
    } else {
        return Err(protocol("a line", line));
    };
    Ok(Parsed::Op(op, body))
}

fn protocol(what: &str, bytes: &[u8]) -> ConnError {
    ConnError::Protocol(format!(
        "not NATS: {what} nats-server would not send: {}",
        http::excerpt(bytes)
    ))
}

/// Up to 5 space- or tab-separated fields of `args` and their count (6 = more than 5).
#[inline]
fn fields(args: &[u8]) -> ([&[u8]; 5], usize) {
    let mut f: [&[u8]; 5] = [&[]; 5];
    let mut n = 0;
    for field in args
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|s| !s.is_empty())
    {
        match f.get_mut(n) {
            Some(slot) => *slot = field,
            None => return (f, 6),
        }
        n += 1;
    }
    (f, n)
}

/// A field that is a decimal number and nothing else.
#[inline]
fn number(field: &[u8]) -> Option<usize> {
    match scan::parse_u64(field, 0) {
        Some((v, end)) if end == field.len() => usize::try_from(v).ok(),
        _ => None,
    }
}

/// A NATS subscriber's protocol state over nats-server's WebSocket listener: one subject.
#[derive(Debug)]
pub struct NatsSub {
    pub subject: Box<[u8]>,
    /// One tracker per publisher (by index): its sequence on this subject.
    seqs: Vec<SeqTracker>,
    /// `INFO` arrived (it must come first).
    info: bool,
    /// The `PONG` to the setup `PING` arrived: `SUB` is in place.
    subscribed: bool,
    /// Payload bytes of the data frame being read that have not arrived yet.
    frame_rem: usize,
    /// The start of one protocol item split across frames or reads (bounded by
    /// [`MAX_CONTROL_LINE`] + [`MAX_PAYLOAD`]).
    carry: Vec<u8>,
    /// Frames to send back (pongs, the close reply), masked.
    pub ctrl: Vec<u8>,
    masker: Masker,
    /// The server's close frame arrived (with its code, if any).
    pub closed: Option<Option<u16>>,
}

impl NatsSub {
    /// A subscriber of `subject` that expects messages from `publishers` publishers.
    pub fn new(subject: &[u8], publishers: usize, seed: u64) -> NatsSub {
        NatsSub {
            subject: subject.into(),
            seqs: vec![SeqTracker::new(0); publishers],
            info: false,
            subscribed: false,
            frame_rem: 0,
            carry: Vec::new(),
            ctrl: Vec::new(),
            masker: Masker::new(seed),
            closed: None,
        }
    }

    pub fn is_subscribed(&self) -> bool {
        self.subscribed
    }

    /// `CONNECT`, `SUB` and `PING` in one masked frame: the answering `PONG` means the
    /// subscription is in place (nats-server handles a connection's lines in order).
    pub fn subscribe_frame(&mut self, out: &mut Vec<u8>, token: Option<&str>) {
        let mut text = Vec::with_capacity(256);
        write_connect(&mut text, token);
        write_sub(&mut text, &self.subject, SID);
        write_ping(&mut text);
        wsframe::write_client_frame(out, opcode::TEXT, &text, self.masker.next_key());
    }

    /// Handles everything complete at the start of `buf`: control frames whole, data frames
    /// as far as they have arrived (their payload is a byte stream).
    pub fn feed<R: Recorder>(
        &mut self,
        buf: &[u8],
        now: u64,
        rec: &mut R,
    ) -> Result<Fed, ConnError> {
        let mut at = 0;
        while self.closed.is_none() {
            let rest = buf.get(at..).unwrap_or_default();
            if self.frame_rem > 0 {
                let n = self.frame_rem.min(rest.len());
                if n == 0 {
                    break;
                }
                self.frame_rem -= n;
                at += n;
                self.stream(&rest[..n], now, rec)?;
                continue;
            }
            let Some(head) = wsframe::parse_head(rest, MAX_WS_FRAME)? else {
                break;
            };
            match head.opcode {
                opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => {
                    at += head.header_len;
                    self.frame_rem = head.payload_len;
                }
                op => {
                    let total = head.total_len();
                    let Some(payload) = rest.get(head.header_len..total) else {
                        return Ok(Fed {
                            consumed: at,
                            want: Some(total),
                        });
                    };
                    at += total;
                    match op {
                        opcode::PING => {
                            let key = self.masker.next_key();
                            wsframe::write_client_frame(&mut self.ctrl, opcode::PONG, payload, key);
                        }
                        opcode::CLOSE => {
                            let code = wsframe::close_code(payload);
                            let key = self.masker.next_key();
                            wsframe::write_close(&mut self.ctrl, code.unwrap_or(1000), key);
                            self.closed = Some(code);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(Fed {
            consumed: at,
            want: None,
        })
    }

    /// Handles one piece of the NATS byte stream; what it leaves incomplete is carried.
    fn stream<R: Recorder>(
        &mut self,
        mut data: &[u8],
        now: u64,
        rec: &mut R,
    ) -> Result<(), ConnError> {
        if !self.info && self.carry.is_empty() && data.len() >= 5 && !is_info(data) {
            return Err(ConnError::Protocol(format!(
                "nats-server starts with INFO, this server sent {:?}; is --target nats-server's \
                 WebSocket listener?",
                http::excerpt(data.get(..40).unwrap_or(data))
            )));
        }
        if !self.carry.is_empty() {
            let mut carry = std::mem::take(&mut self.carry);
            let done = self.complete(&mut carry, &mut data, now, rec);
            self.carry = carry;
            if !done? {
                return Ok(());
            }
        }
        let mut at = 0;
        while let Some(rest) = data.get(at..).filter(|r| !r.is_empty()) {
            match parse_op(rest)? {
                Parsed::Op(op, used) => {
                    at += used;
                    self.handle(op, now, rec)?;
                }
                Parsed::Partial(_) => {
                    self.carry.extend_from_slice(rest);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Completes the item at the start of `carry` from the front of `data` and handles it.
    /// Returns false when `data` ran out first.
    fn complete<R: Recorder>(
        &mut self,
        carry: &mut Vec<u8>,
        data: &mut &[u8],
        now: u64,
        rec: &mut R,
    ) -> Result<bool, ConnError> {
        loop {
            match parse_op(carry)? {
                Parsed::Op(op, used) => {
                    self.handle(op, now, rec)?;
                    // Only as much was taken as the one item needed.
                    carry.drain(..used.min(carry.len()));
                    if carry.is_empty() {
                        return Ok(true);
                    }
                }
                Parsed::Partial(need) => {
                    if data.is_empty() {
                        return Ok(false);
                    }
                    let take = match need {
                        Some(total) => total.saturating_sub(carry.len()),
                        None => memchr::memchr(b'\n', data).map_or(data.len(), |i| i + 1),
                    };
                    let (head, tail) = data.split_at(take.clamp(1, data.len()));
                    carry.extend_from_slice(head);
                    *data = tail;
                }
            }
        }
    }

    #[inline]
    fn handle<R: Recorder>(
        &mut self,
        op: ServerOp<'_>,
        now: u64,
        rec: &mut R,
    ) -> Result<(), ConnError> {
        if !self.info && !matches!(op, ServerOp::Info(_)) {
            return Err(ConnError::Protocol(
                "nats-server starts with INFO, this server did not; is --target nats-server's \
                 WebSocket listener?"
                    .into(),
            ));
        }
        match op {
            ServerOp::Msg {
                subject, payload, ..
            } => {
                if *subject != *self.subject {
                    rec.count(C::Foreign, 1);
                    return Ok(());
                }
                let data = scan::scan_tagged_data(payload);
                let tracker = data.and_then(|d| {
                    let origin = usize::try_from(d.origin).ok()?;
                    Some((self.seqs.get_mut(origin)?, d))
                });
                match tracker {
                    Some((t, d)) => subscriber::observe(t, d.seq, d.sched_ns, now, rec),
                    None => rec.count(C::Foreign, 1),
                }
            }
            ServerOp::HMsg { .. } => rec.count(C::Foreign, 1),
            ServerOp::Ping => {
                let key = self.masker.next_key();
                wsframe::write_client_frame(&mut self.ctrl, opcode::TEXT, b"PONG\r\n", key);
            }
            ServerOp::Pong => {
                if !self.subscribed {
                    self.subscribed = true;
                    rec.count(C::Subscribed, 1);
                }
            }
            ServerOp::Info(_) => self.info = true,
            ServerOp::Ok => {}
            ServerOp::Err(text) => {
                let text = http::excerpt(text);
                if !self.subscribed {
                    return Err(ConnError::ErrorReply(format!("nats-server: -ERR {text}")));
                }
                rec.note(format!("subscriber got -ERR from nats-server: {text}"));
            }
        }
        Ok(())
    }
}

/// A NATS publisher connection's reply state: every publish request ends in a `PING`, so the
/// `PONG`s answer the requests in order; a `-ERR` refuses the request it interrupts.
#[derive(Debug, Default)]
pub struct PubReplies {
    /// The front request was already refused by a `-ERR`; its `PONG` is still to come.
    front_refused: bool,
}

impl PubReplies {
    pub fn new() -> PubReplies {
        PubReplies::default()
    }

    /// Matches the replies at the start of `buf` to `inflight`; a server `PING` leaves an
    /// (empty) pong to send in `pong`. Returns the bytes consumed, and never announces a close
    /// (nats-server just closes).
    pub fn feed<S: AckSink>(
        &mut self,
        buf: &[u8],
        inflight: &mut VecDeque<Inflight>,
        now: u64,
        sink: &mut S,
        pong: &mut Option<Vec<u8>>,
    ) -> Result<(usize, bool), ConnError> {
        let mut at = 0;
        while let Some(rest) = buf.get(at..).filter(|r| !r.is_empty()) {
            let (op, used) = match parse_op(rest)? {
                Parsed::Op(op, used) => (op, used),
                Parsed::Partial(_) => break,
            };
            at += used;
            match op {
                ServerOp::Pong => {
                    if std::mem::take(&mut self.front_refused) {
                        continue;
                    }
                    let Some(req) = inflight.pop_front() else {
                        return Err(ConnError::Protocol("a PONG with no PING in flight".into()));
                    };
                    sink.accepted(&req, now);
                }
                ServerOp::Ping => *pong = Some(Vec::new()),
                ServerOp::Err(text) => {
                    // Everything before the next PONG belongs to the front request.
                    if self.front_refused {
                        continue;
                    }
                    let Some(req) = inflight.pop_front() else {
                        return Err(ConnError::ErrorReply(format!(
                            "nats-server: -ERR {}",
                            http::excerpt(text)
                        )));
                    };
                    let mut why = b"nats-server: -ERR ".to_vec();
                    why.extend_from_slice(text);
                    sink.refused(&req, 0, &why);
                    self.front_refused = true;
                }
                ServerOp::Info(_) | ServerOp::Ok | ServerOp::Msg { .. } | ServerOp::HMsg { .. } => {
                }
            }
        }
        Ok((at, false))
    }
}

/// Connects a NATS publisher to nats-server's client port and sends its `CONNECT`.
pub async fn connect_publisher(
    ctx: &Rc<Ctx>,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnError> {
    let opts = ctx.opts();
    let timeout = Duration::from_millis(opts.connect_timeout_ms);
    let mut stream = net::connect(opts.nats_publish_target(), source, timeout).await?;
    let mut hello = Vec::with_capacity(256);
    write_connect(&mut hello, opts.token.as_deref());
    let (r, _) = monoio::time::timeout(timeout, stream.write_all(hello))
        .await
        .map_err(|_| ConnError::Timeout("the NATS CONNECT write"))?;
    r.map_err(ConnError::Io)?;
    Ok(stream)
}

/// Opens NATS subscriber `i` (global index): the upgrade on nats-server's WebSocket listener,
/// then `CONNECT`, `SUB` of its channel and `PING`.
pub async fn setup(ctx: &Rc<Ctx>, i: usize) -> Result<(TcpStream, Vec<u8>, NatsSub), ConnError> {
    let shared = &ctx.shared;
    let opts = ctx.opts();
    let source = net::source_ip(i, shared.source_ips);
    let channel = &shared.channels[i % shared.channels.len()];
    let publishers = if opts.scenario.publishes() {
        opts.publishers
    } else {
        0
    };
    let timeout = Duration::from_millis(opts.connect_timeout_ms);
    let (mut stream, buf) = subscriber::ws_handshake(ctx, source).await?;
    let mut sub = NatsSub::new(channel, publishers, i as u64 ^ now_ns());
    let mut out = Vec::with_capacity(256);
    sub.subscribe_frame(&mut out, opts.token.as_deref());
    let (r, _) = monoio::time::timeout(timeout, stream.write_all(out))
        .await
        .map_err(|_| ConnError::Timeout("the NATS subscribe write"))?;
    r.map_err(ConnError::Io)?;
    Ok((stream, buf, sub))
}

/// One NATS subscriber connection until it ends.
pub async fn subscriber(ctx: Rc<Ctx>, stream: TcpStream, buf: Vec<u8>, sub: NatsSub) {
    let _live = ctx.task();
    let fd = stream.as_raw_fd();
    ctx.register_fd(fd, true);
    ctx.stats().add(C::SubsOpen, 1);
    let (result, subscribed) =
        subscriber::read_loop(&ctx, stream, buf, subscriber::Proto::Nats(sub)).await;
    ctx.stats().sub(C::SubsOpen, 1);
    ctx.deregister_fd(fd);
    subscriber::record_end(&ctx, result, subscribed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload;
    use crate::publisher::tests::{req, Acks};
    use crate::subscriber::tests::Rec;
    use crate::wsframe::tests::server_frame;

    const INFO: &[u8] =
        b"INFO {\"server_id\":\"NX\",\"version\":\"2.9.10\",\"max_payload\":1048576}\r\n";

    /// A `MSG` as nats-server forwards what a NATS-mode publisher sent.
    fn msg(subject: &str, seq: u64, origin: u64, t: u64, size: usize) -> Vec<u8> {
        let mut data = Vec::new();
        payload::write_tagged_data(&mut data, t, seq, origin, size);
        let mut out = format!("MSG {subject} 1 {}\r\n", data.len()).into_bytes();
        out.extend(data);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// `stream` in WebSocket frames of at most `max` payload bytes: alternately binary and
    /// text messages, or (`fragmented`) one message of a first frame and continuations.
    fn frames(stream: &[u8], max: usize, fragmented: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let pieces: Vec<&[u8]> = stream.chunks(max).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let mut f = match (fragmented, i) {
                (true, 0) => server_frame(opcode::BINARY, piece),
                (true, _) => server_frame(opcode::CONTINUATION, piece),
                (false, i) if i % 2 == 0 => server_frame(opcode::BINARY, piece),
                (false, _) => server_frame(opcode::TEXT, piece),
            };
            if fragmented && i + 1 < pieces.len() {
                f[0] &= 0x7f; // not the final frame
            }
            out.extend(f);
        }
        out
    }

    /// Feeds `wire` to `sub` in reads of `cut` bytes, as the read loop does.
    fn feed_in_pieces(sub: &mut NatsSub, wire: &[u8], cut: usize, rec: &mut Rec) {
        let mut buf = Vec::new();
        for piece in wire.chunks(cut) {
            buf.extend_from_slice(piece);
            let fed = sub.feed(&buf, 1_000_000, rec).unwrap();
            buf.drain(..fed.consumed);
        }
        assert!(buf.is_empty(), "{} bytes left", buf.len());
        assert!(sub.carry.is_empty(), "{} bytes carried", sub.carry.len());
    }

    /// The payloads of the masked client frames in `out`.
    fn client_payloads(mut out: &[u8]) -> Vec<Vec<u8>> {
        let mut payloads = Vec::new();
        while !out.is_empty() {
            let len = (out[1] & 0x7f) as usize;
            assert!(len < 126, "short frames only here");
            let key: [u8; 4] = out[2..6].try_into().unwrap();
            let mut p = out[6..6 + len].to_vec();
            wsframe::apply_mask(&mut p, key);
            payloads.push(p);
            out = &out[6 + len..];
        }
        payloads
    }

    #[test]
    fn messages_split_across_frames_and_reads_are_all_counted() {
        let mut stream = INFO.to_vec();
        stream.extend_from_slice(b"PONG\r\n");
        for seq in 1..=5 {
            stream.extend(msg("lg.r.0", seq, 0, 100 + seq, 100));
        }
        stream.extend(msg("lg.r.0", 1, 1, 200, 100)); // the other publisher's first
        stream.extend(msg("lg.r.0", 5, 0, 105, 100)); // duplicate
        stream.extend(msg("lg.r.0", 8, 0, 108, 3000)); // gap of 2
        stream.extend(msg("lg.r.0", 7, 0, 107, 20)); // late
        stream.extend(msg("other", 1, 0, 1, 50)); // not our subject
        stream.extend(msg("lg.r.0", 1, 9, 1, 50)); // no such publisher
        stream.extend_from_slice(b"HMSG lg.r.0 1 12 17\r\nNATS/1.0\r\n\r\nhello\r\n");
        stream.extend_from_slice(b"PING\r\n+OK\r\n");
        stream.extend(msg("lg.r.0", 6, 0, 106, 100)); // late, after the ping
        for fragmented in [false, true] {
            for max in [1usize, 3, 7, 50, 1000, 1 << 20] {
                let wire = frames(&stream, max, fragmented);
                for cut in [1usize, 2, 5, 64, 4096, 1 << 20] {
                    let mut sub = NatsSub::new(b"lg.r.0", 2, 1);
                    let mut rec = Rec::default();
                    feed_in_pieces(&mut sub, &wire, cut, &mut rec);
                    let case = format!("max {max} cut {cut} fragmented {fragmented}");
                    assert!(sub.is_subscribed(), "{case}");
                    assert_eq!(rec.total(C::Subscribed), 1, "{case}");
                    assert_eq!(rec.delivered.len(), 9, "{case}");
                    assert_eq!(rec.delivered[0], (101, 1_000_000), "{case}");
                    assert_eq!(rec.delivered[5], (200, 1_000_000), "{case}");
                    assert_eq!(rec.total(C::Duplicated), 1, "{case}");
                    assert_eq!(rec.total(C::SeqGaps), 2, "{case}");
                    assert_eq!(rec.total(C::OutOfOrder), 2, "{case}");
                    assert_eq!(rec.total(C::Foreign), 3, "{case}");
                    // The NATS PING was answered with a masked PONG line.
                    assert_eq!(client_payloads(&sub.ctrl), vec![b"PONG\r\n".to_vec()]);
                    assert!(sub.closed.is_none());
                }
            }
        }
    }

    #[test]
    fn several_messages_in_one_frame_take_one_feed() {
        let mut stream = INFO.to_vec();
        stream.extend_from_slice(b"PONG\r\n");
        for seq in 1..=100 {
            stream.extend(msg("s", seq, 0, seq, 100));
        }
        let wire = server_frame(opcode::BINARY, &stream);
        let mut sub = NatsSub::new(b"s", 1, 1);
        let mut rec = Rec::default();
        let fed = sub.feed(&wire, 7, &mut rec).unwrap();
        assert_eq!(fed.consumed, wire.len());
        assert_eq!(rec.delivered.len(), 100);
        assert_eq!(rec.total(C::SeqGaps) + rec.total(C::Foreign), 0);
        assert!(sub.ctrl.is_empty());
    }

    #[test]
    fn err_replies_before_and_after_subscribing() {
        let mut stream = INFO.to_vec();
        stream.extend_from_slice(b"-ERR 'Authorization Violation'\r\n");
        let mut sub = NatsSub::new(b"s", 1, 1);
        let e = sub
            .feed(
                &server_frame(opcode::BINARY, &stream),
                0,
                &mut Rec::default(),
            )
            .unwrap_err();
        assert!(matches!(e, ConnError::ErrorReply(_)), "{e:?}");
        assert!(e.to_string().contains("Authorization Violation"), "{e}");

        let mut stream = INFO.to_vec();
        stream.extend_from_slice(b"PONG\r\n-ERR 'Permissions Violation for Subscription'\r\n");
        stream.extend(msg("s", 1, 0, 5, 30));
        let mut sub = NatsSub::new(b"s", 1, 1);
        let mut rec = Rec::default();
        sub.feed(&server_frame(opcode::TEXT, &stream), 0, &mut rec)
            .unwrap();
        assert_eq!(rec.delivered.len(), 1);
        assert_eq!(rec.notes.len(), 1);
        assert!(
            rec.notes[0].contains("Permissions Violation"),
            "{:?}",
            rec.notes
        );
    }

    #[test]
    fn websocket_ping_and_close() {
        let mut wire = server_frame(opcode::BINARY, INFO);
        wire.extend(server_frame(opcode::PING, b"hb"));
        wire.extend(server_frame(opcode::BINARY, b"PONG\r\n"));
        let mut close = 1008u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"Slow Consumer");
        wire.extend(server_frame(opcode::CLOSE, &close));
        wire.extend(server_frame(opcode::BINARY, b"PING\r\n")); // after the close: ignored
        let mut sub = NatsSub::new(b"s", 1, 1);
        let mut rec = Rec::default();
        let fed = sub.feed(&wire, 0, &mut rec).unwrap();
        assert!(fed.consumed < wire.len());
        assert!(sub.is_subscribed());
        assert_eq!(sub.closed, Some(Some(1008)));
        assert_eq!(sub.ctrl[0], 0x80 | opcode::PONG);
        let at = 2 + 4 + 2;
        assert_eq!(sub.ctrl[at], 0x80 | opcode::CLOSE);
        // An incomplete control frame waits for its whole length.
        let ping = server_frame(opcode::PING, b"abc");
        let mut sub = NatsSub::new(b"s", 1, 1);
        let fed = sub.feed(&ping[..3], 0, &mut Rec::default()).unwrap();
        assert_eq!(
            fed,
            Fed {
                consumed: 0,
                want: Some(ping.len())
            }
        );
    }

    #[test]
    fn what_is_not_nats_is_a_protocol_error() {
        let not_nats = |stream: &[u8]| {
            let mut sub = NatsSub::new(b"s", 1, 1);
            sub.feed(&server_frame(opcode::TEXT, stream), 0, &mut Rec::default())
                .unwrap_err()
        };
        // relay's welcome: it is not an INFO line.
        let e = not_nats(br#"{"op":"welcome","conn":"c1","heartbeat_ms":25000}"#);
        assert!(e.to_string().contains("INFO"), "{e}");
        let mut after_info = INFO.to_vec();
        after_info.extend_from_slice(b"HELLO there\r\n");
        assert!(matches!(not_nats(&after_info), ConnError::Protocol(_)));
        for bad in [
            &b"MSG s 1 x\r\n"[..],
            b"MSG s\r\n",
            b"MSG a b c d e f\r\n",
            b"MSG s 1 3\r\nabcXY",
            b"MSG s 1 99999999999\r\n",
        ] {
            let mut stream = INFO.to_vec();
            stream.extend_from_slice(bad);
            assert!(
                matches!(not_nats(&stream), ConnError::Protocol(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = INFO.to_vec();
        long.extend(vec![b'x'; MAX_CONTROL_LINE + 10]);
        assert!(matches!(not_nats(&long), ConnError::Protocol(_)));
        // Bounded across frames too.
        let mut sub = NatsSub::new(b"s", 1, 1);
        let mut wire = server_frame(opcode::BINARY, INFO);
        for _ in 0..20 {
            wire.extend(server_frame(opcode::BINARY, &[b'y'; 4096]));
        }
        assert!(sub.feed(&wire, 0, &mut Rec::default()).is_err());
    }

    #[test]
    fn parse_op_reads_every_server_line() {
        fn op(b: &[u8]) -> (ServerOp<'_>, usize) {
            match parse_op(b).unwrap() {
                Parsed::Op(op, used) => (op, used),
                p => panic!("{p:?}"),
            }
        }
        assert_eq!(
            op(INFO),
            (ServerOp::Info(&INFO[5..INFO.len() - 2]), INFO.len())
        );
        assert_eq!(op(b"PING\r\nPONG\r\n"), (ServerOp::Ping, 6));
        assert_eq!(op(b"pong\r\n"), (ServerOp::Pong, 6));
        assert_eq!(op(b"+OK\n"), (ServerOp::Ok, 4));
        assert_eq!(
            op(b"-ERR 'Unknown Protocol Operation'\r\n").0,
            ServerOp::Err(b"Unknown Protocol Operation")
        );
        let m = b"MSG a.b\t7  reply.x 3\r\nxyz\r\nPING\r\n";
        assert_eq!(
            op(m),
            (
                ServerOp::Msg {
                    subject: b"a.b",
                    sid: b"7",
                    payload: b"xyz"
                },
                m.len() - 6
            )
        );
        assert_eq!(op(b"msg a 1 0\r\n\r\n").1, 13);
        assert_eq!(
            op(b"HMSG a 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n").0,
            ServerOp::HMsg { subject: b"a" }
        );
        assert_eq!(parse_op(b"").unwrap(), Parsed::Partial(None));
        assert_eq!(parse_op(b"MS").unwrap(), Parsed::Partial(None));
        assert_eq!(parse_op(b"PING\r").unwrap(), Parsed::Partial(None));
        assert_eq!(
            parse_op(b"MSG a 1 10\r\nabc").unwrap(),
            Parsed::Partial(Some(12 + 10 + 2))
        );
        assert!(is_info(b"INFO {}") && is_info(b"info\t{}") && !is_info(b"INF"));
    }

    #[test]
    fn subscribe_frame_and_client_lines() {
        let mut sub = NatsSub::new(b"lg.x.3", 1, 5);
        let mut out = Vec::new();
        sub.subscribe_frame(&mut out, Some("s3cr3t"));
        let text = String::from_utf8(client_payloads_long(&out)).unwrap();
        let (connect, rest) = text.split_once("\r\n").unwrap();
        assert_eq!(rest, "SUB lg.x.3 1\r\nPING\r\n");
        let json: serde_json::Value =
            serde_json::from_str(connect.strip_prefix("CONNECT ").unwrap()).unwrap();
        assert_eq!(json["verbose"], false);
        assert_eq!(json["pedantic"], false);
        assert_eq!(json["echo"], false);
        assert_eq!(json["auth_token"], "s3cr3t");
        let mut plain = Vec::new();
        write_connect(&mut plain, None);
        assert!(!String::from_utf8(plain).unwrap().contains("auth_token"));
        let mut lines = Vec::new();
        write_ping(&mut lines);
        write_pong(&mut lines);
        assert_eq!(lines, b"PING\r\nPONG\r\n");
    }

    /// The payload of one masked client frame of any length.
    fn client_payloads_long(out: &[u8]) -> Vec<u8> {
        let (header, len) = match out[1] & 0x7f {
            126 => (4, u16::from_be_bytes([out[2], out[3]]) as usize),
            127 => panic!("too long for a test"),
            n => (2, n as usize),
        };
        let key: [u8; 4] = out[header..header + 4].try_into().unwrap();
        let mut p = out[header + 4..header + 4 + len].to_vec();
        wsframe::apply_mask(&mut p, key);
        p
    }

    #[test]
    fn what_the_publisher_writes_the_subscriber_reads_back() {
        let mut data = Vec::new();
        payload::write_tagged_data(&mut data, 987_654_321, 42, 3, 100);
        let mut out = Vec::new();
        write_pub(&mut out, b"lg.r.1", &data);
        write_pub(&mut out, b"lg.r.1", b"");
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("PUB lg.r.1 100\r\n{\"t\":987654321,\"s\":42,\"o\":3,"));
        assert!(text.ends_with("\"}\r\nPUB lg.r.1 0\r\n\r\n"));
        // nats-server forwards the payload byte for byte: PUB <subject> <n> -> MSG <subject>
        // <sid> <n>.
        let forwarded = text.replace("PUB lg.r.1 ", "MSG lg.r.1 1 ");
        let mut stream = INFO.to_vec();
        stream.extend_from_slice(b"PONG\r\n");
        stream.extend_from_slice(forwarded.as_bytes());
        let mut sub = NatsSub::new(b"lg.r.1", 4, 1);
        *sub.seqs.get_mut(3).unwrap() = SeqTracker::new(41);
        let mut rec = Rec::default();
        sub.feed(
            &server_frame(opcode::BINARY, &stream),
            1_000_000_000,
            &mut rec,
        )
        .unwrap();
        assert_eq!(rec.delivered, vec![(987_654_321, 1_000_000_000)]);
        assert_eq!(rec.total(C::Foreign), 1, "the empty payload is not ours");
        assert_eq!(rec.total(C::SeqGaps), 0);
    }

    #[test]
    fn publisher_pongs_ack_requests_in_order() {
        let mut stream = INFO.to_vec();
        stream.extend_from_slice(b"PONG\r\nPING\r\n");
        stream.extend_from_slice(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n");
        stream.extend_from_slice(b"-ERR 'Permissions Violation for Publish to \"y\"'\r\n");
        stream.extend_from_slice(b"PONG\r\nPONG\r\n");
        for cut in [1usize, 2, 9, 4096] {
            let mut inflight: VecDeque<Inflight> = [req(1), req(2), req(3), req(4)].into();
            let mut acks = Acks::default();
            let mut replies = PubReplies::new();
            let mut pong = None;
            let mut buf = Vec::new();
            for piece in stream.chunks(cut) {
                buf.extend_from_slice(piece);
                let (used, closing) = replies
                    .feed(&buf, &mut inflight, 9, &mut acks, &mut pong)
                    .unwrap();
                assert!(!closing);
                buf.drain(..used);
            }
            assert!(buf.is_empty(), "cut {cut}");
            assert_eq!(acks.accepted.len(), 2, "cut {cut}");
            assert_eq!(acks.accepted[0].0.events, 1);
            assert_eq!(acks.accepted[1].0.events, 3);
            assert_eq!(acks.refused.len(), 1, "one refusal per request");
            assert_eq!(acks.refused[0].0.events, 2);
            assert!(acks.refused[0].2.contains("Permissions Violation"));
            assert_eq!(pong, Some(Vec::new()), "the server's PING is owed a PONG");
            assert_eq!(inflight.len(), 1);
        }
        // A PONG nobody asked for, and an error before any request, are errors.
        let mut none = VecDeque::new();
        let mut replies = PubReplies::new();
        assert!(replies
            .feed(b"PONG\r\n", &mut none, 0, &mut Acks::default(), &mut None)
            .is_err());
        let e = replies
            .feed(
                b"-ERR 'Authorization Violation'\r\n",
                &mut none,
                0,
                &mut Acks::default(),
                &mut None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("Authorization Violation"), "{e}");
    }
}
