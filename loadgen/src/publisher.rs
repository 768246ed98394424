//! Publishers: open-loop HTTP (single or batch, keep-alive, pipelined) and WebSocket, and in
//! NATS mode `PUB` over nats-server's client port.
//!
//! Owns one publisher's life over the steps of a run: wait for a step, send each of its events
//! when due (every event that is due leaves at once when behind schedule, in batches where the
//! mode allows, at most `pipeline` requests in flight), read the replies in order in a second
//! task, and count what was accepted and how many deliveries that makes expected. Latency is
//! the subscribers' business; here only the send lag (written - scheduled) and the ack latency
//! are recorded. In NATS mode a "request" is up to `--batch` PUBs followed by a PING, and its
//! PONG is the reply (the `nats` module encodes and matches them); each PUB carries the
//! publisher's own per-channel sequence number, kept here across steps, since nats-server
//! numbers nothing. Must never: let a reply go unmatched, wait without a bound, or cancel a
//! read in flight on a live connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use crate::clock::{global_index, now_ns, owned_below, Schedule};
use crate::error::ConnError;
use crate::http;
use crate::nats;
use crate::net;
use crate::options::{PublishVia, TargetKind};
use crate::payload;
use crate::scan::{self, Op};
use crate::stats::{bump, raise, ThreadStats, C};
use crate::subscriber::{self, MAX_FRAME_BYTES};
use crate::worker::{Ctx, Notify, PhaseSnapshot, POLL};
use crate::wsframe::{self, opcode, Masker};

/// Reply buffer per publisher connection.
const READ_CHUNK: usize = 64 * 1024;
/// The longest a publisher waits for its next due time without looking at the stop flag.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How long a failed (re)connect waits before the next try.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// One request (HTTP) or message (WebSocket) awaiting its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    pub events: u64,
    /// Deliveries the events make expected once accepted.
    pub expected: u64,
    pub step: usize,
    /// The scheduled time of the request's first event.
    pub oldest_sched_ns: u64,
}

/// What the writer and the reader of one connection share.
#[derive(Default)]
struct Pipe {
    inflight: RefCell<VecDeque<Inflight>>,
    /// Reader -> writer: room in the pipeline, or the connection died.
    space: Notify,
    dead: Cell<bool>,
    /// A ping payload to answer (WebSocket; NATS: an empty one), picked up by the writer.
    pong: RefCell<Option<Vec<u8>>>,
}

struct Conn {
    write: OwnedWriteHalf<TcpStream>,
    pipe: Rc<Pipe>,
    fd: RawFd,
    masker: Masker,
    /// A NATS client connection (pongs are `PONG` lines, not WebSocket frames).
    nats: bool,
}

impl Conn {
    /// Appends the answer to a ping, if one is owed.
    fn push_pong(&mut self, out: &mut Vec<u8>) {
        let Some(payload) = self.pipe.pong.borrow_mut().take() else {
            return;
        };
        if self.nats {
            nats::write_pong(out);
        } else {
            wsframe::write_client_frame(out, opcode::PONG, &payload, self.masker.next_key());
        }
    }
}

/// Where replies are counted (the thread's statistics; a plain struct in tests).
pub trait AckSink {
    fn accepted(&mut self, req: &Inflight, now_ns: u64);
    fn refused(&mut self, req: &Inflight, status: u16, why: &[u8]);
}

struct ThreadAcks<'a> {
    ctx: &'a Ctx,
}

impl AckSink for ThreadAcks<'_> {
    fn accepted(&mut self, req: &Inflight, now: u64) {
        let stats = self.ctx.stats();
        let sc = stats.step(req.step);
        bump(&sc.published, req.events);
        bump(&sc.expected, req.expected);
        raise(&sc.last_ack_ns, now);
        self.ctx
            .hists
            .borrow_mut()
            .ack(req.step)
            .saturating_record_n(now.saturating_sub(req.oldest_sched_ns), req.events);
    }

    fn refused(&mut self, req: &Inflight, status: u16, why: &[u8]) {
        refuse(self.ctx.stats(), req, status, why);
    }
}

fn refuse(stats: &ThreadStats, req: &Inflight, status: u16, why: &[u8]) {
    bump(&stats.step(req.step).failed, req.events);
    stats.add(C::PublishErrorReplies, 1);
    stats.status(status);
    let why = http::excerpt(why);
    stats.note(if status == 0 {
        format!("publish refused: {why}")
    } else {
        format!("publish refused: HTTP {status}: {why}")
    });
}

/// Matches HTTP responses to `inflight` in order. Returns the bytes consumed and whether the
/// server announced it will close.
pub fn feed_http<S: AckSink>(
    buf: &[u8],
    inflight: &mut VecDeque<Inflight>,
    now: u64,
    sink: &mut S,
) -> Result<(usize, bool), ConnError> {
    let mut at = 0;
    loop {
        let Some(head) = http::parse_head(&buf[at..])? else {
            return Ok((at, false));
        };
        let body_len = head.content_length.unwrap_or(0);
        let total = head.head_len + body_len;
        if buf.len() - at < total {
            return Ok((at, false));
        }
        let body = &buf[at + head.head_len..at + total];
        at += total;
        let Some(req) = inflight.pop_front() else {
            return Err(ConnError::Handshake(format!(
                "HTTP {} with no request in flight",
                head.status
            )));
        };
        if head.status == 207 {
            // Partly accepted: the entries carrying `error` were refused by their owner shard.
            let refused =
                (memchr::memmem::find_iter(body, b"\"error\":").count() as u64).min(req.events);
            let accepted = req.events - refused;
            // Expected deliveries are spread evenly over the batch's events (exact when its
            // channels have equal subscriber counts, which every scenario sets up).
            let expected_accepted = req.expected * accepted / req.events.max(1);
            if accepted > 0 {
                let part = Inflight {
                    events: accepted,
                    expected: expected_accepted,
                    ..req
                };
                sink.accepted(&part, now);
            }
            if refused > 0 {
                let part = Inflight {
                    events: refused,
                    expected: req.expected - expected_accepted,
                    ..req
                };
                sink.refused(&part, head.status, body);
            }
        } else if (200..300).contains(&head.status) {
            sink.accepted(&req, now);
        } else {
            sink.refused(&req, head.status, body);
        }
        if head.close {
            return Ok((at, true));
        }
    }
}

/// Matches WebSocket replies (`published` / `error`) to `inflight` in order; answers pings.
pub fn feed_ws<S: AckSink>(
    buf: &[u8],
    inflight: &mut VecDeque<Inflight>,
    now: u64,
    sink: &mut S,
    pong: &mut Option<Vec<u8>>,
) -> Result<(usize, Option<Option<u16>>), ConnError> {
    let mut at = 0;
    loop {
        let Some(head) = wsframe::parse_head(&buf[at..], MAX_FRAME_BYTES)? else {
            return Ok((at, None));
        };
        let total = head.total_len();
        if buf.len() - at < total {
            return Ok((at, None));
        }
        let body = &buf[at + head.header_len..at + total];
        at += total;
        match head.opcode {
            opcode::TEXT => match scan::ws_op(body) {
                Op::Published => {
                    if let Some(req) = inflight.pop_front() {
                        sink.accepted(&req, now);
                    }
                }
                Op::Error => {
                    if let Some(req) = inflight.pop_front() {
                        let code = scan::field_str(body, "code").unwrap_or_default();
                        sink.refused(&req, ws_error_status(code), body);
                    }
                }
                _ => {}
            },
            opcode::PING => *pong = Some(body.to_vec()),
            opcode::CLOSE => return Ok((at, Some(wsframe::close_code(body)))),
            _ => {}
        }
    }
}

/// The HTTP status a WebSocket error code corresponds to (API.md sections 2 and 3).
pub fn ws_error_status(code: &[u8]) -> u16 {
    match code {
        b"bad_request" => 400,
        b"forbidden" => 403,
        b"too_large" => 413,
        b"rate_limited" => 429,
        b"limit_exceeded" => 429,
        b"internal" => 500,
        _ => 0,
    }
}

/// Publisher `p`: runs each step the control thread publishes until the run stops.
pub async fn run(ctx: Rc<Ctx>, p: usize) {
    let _live = ctx.task();
    let mut seen = 0u64;
    // NATS mode: this publisher's last sequence number on each channel, across steps.
    let mut seqs = match ctx.opts().target_kind {
        TargetKind::Relay => Vec::new(),
        TargetKind::Nats => vec![0u64; ctx.shared.channels.len()],
    };
    // Connected before the first step starts (the controller waits for every publisher), so
    // that opening many connections is not charged to the first events' schedule: with 2,000
    // publishers it delayed the first second's sends by up to 50 ms. A failure here is
    // counted; the step tries again.
    let mut conn = connect_counted(&ctx, p).await;
    loop {
        // Wait for the next step (or stop), answering pings meanwhile.
        let phase = loop {
            if ctx.stopping() {
                close(&ctx, conn.take());
                return;
            }
            let snap = ctx.shared.phase.snapshot();
            if snap.generation != seen {
                seen = snap.generation;
                break snap;
            }
            if let Some(c) = conn.as_mut() {
                if send_pong(c).await.is_err() {
                    drop_conn(&ctx, conn.take());
                }
            }
            monoio::time::sleep(POLL).await;
        };
        run_step(&ctx, p, &phase, &mut conn, &mut seqs).await;
        ctx.stats().add(C::PubStepsDone, 1);
    }
}

async fn run_step(
    ctx: &Rc<Ctx>,
    p: usize,
    phase: &PhaseSnapshot,
    conn: &mut Option<Conn>,
    seqs: &mut [u64],
) {
    let opts = ctx.opts();
    let publishers = opts.publishers as u64;
    let p = p as u64;
    let closed_loop = phase.rate == 0;
    let schedule = Schedule::new(
        phase.start_ns,
        phase.rate.max(1),
        phase.end_ns.saturating_sub(phase.start_ns),
    );
    let my_total = if closed_loop {
        u64::MAX
    } else {
        owned_below(schedule.total, p, publishers)
    };
    let mut k = 0u64;
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut step = Step {
        schedule,
        closed_loop,
        my_total,
        p,
        publishers,
        index: phase.step,
        body: Vec::with_capacity(16 * 1024),
        json: Vec::with_capacity(512),
        seqs,
    };

    loop {
        if ctx.stopping() {
            return;
        }
        let now = now_ns();
        if now >= phase.bound_ns {
            break;
        }
        if closed_loop {
            if now >= phase.end_ns {
                break;
            }
        } else if k >= my_total {
            break;
        }
        if conn.as_ref().is_none_or(|c| c.pipe.dead.get()) {
            drop_conn(ctx, conn.take());
            *conn = connect_counted(ctx, p as usize).await;
            if conn.is_none() {
                monoio::time::sleep(RECONNECT_BACKOFF).await;
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let due = if closed_loop {
            u64::MAX
        } else {
            owned_below(schedule.due_count(now), p, publishers)
        };
        if k >= due {
            // Woken when the next event is due; capped so a stop is noticed.
            let next = schedule.due_at(global_index(k, p, publishers));
            let cap = now + MAX_WAIT.as_nanos() as u64;
            ctx.sleep_until(next.min(phase.bound_ns).min(cap)).await;
            continue;
        }
        let room = opts.pipeline.saturating_sub(c.pipe.inflight.borrow().len());
        if room == 0 {
            let _ = monoio::time::timeout(Duration::from_millis(50), c.pipe.space.notified()).await;
            continue;
        }
        // Everything due (up to the pipeline's room) leaves in one write.
        out.clear();
        let events_sent = step.compose(ctx, c, &mut k, due, room, &mut out);
        if events_sent == 0 {
            continue;
        }
        c.push_pong(&mut out);
        // A relay that stops reading must not hold the step past its bound. A write cut
        // short leaves the stream in an unknown state, so the connection is given up.
        let left = Duration::from_nanos(phase.bound_ns.saturating_sub(now_ns()).max(1_000_000));
        match monoio::time::timeout(left, c.write.write_all(out)).await {
            Ok((r, back)) => {
                out = back;
                if let Err(e) = r {
                    ctx.stats().note(format!("publisher {p}: write: {e}"));
                    c.pipe.dead.set(true);
                }
            }
            Err(_) => {
                ctx.stats().note(format!(
                    "publisher {p}: a write did not complete before the step's bound"
                ));
                out = Vec::with_capacity(64 * 1024);
                c.pipe.dead.set(true);
                drop_conn(ctx, conn.take());
            }
        }
    }
    if !closed_loop && k < my_total && !ctx.stopping() {
        // Past the step's bound (the relay could not take them in time): never sent.
        ctx.stats().add(C::Unsent, my_total - k);
    }
    // Replies of this step, until the bound.
    while let Some(c) = conn.as_ref() {
        if c.pipe.inflight.borrow().is_empty() || c.pipe.dead.get() || ctx.stopping() {
            break;
        }
        let left = phase.bound_ns.saturating_sub(now_ns());
        if left == 0 {
            break;
        }
        let wait = Duration::from_nanos(left).min(Duration::from_millis(50));
        let _ = monoio::time::timeout(wait, c.pipe.space.notified()).await;
    }
}

/// One publisher's view of the step it runs, and its reusable encoding buffers.
struct Step<'a> {
    schedule: Schedule,
    closed_loop: bool,
    /// This publisher's events in the step (`u64::MAX` closed loop).
    my_total: u64,
    p: u64,
    publishers: u64,
    index: usize,
    body: Vec<u8>,
    json: Vec<u8>,
    /// NATS mode: the publisher's last sequence number per channel (empty for relay).
    seqs: &'a mut [u64],
}

impl Step<'_> {
    /// Appends up to `room` requests carrying this publisher's events `k..due` to `out`,
    /// records them in flight and advances `k`. Returns the events written.
    fn compose(
        &mut self,
        ctx: &Ctx,
        c: &mut Conn,
        k: &mut u64,
        due: u64,
        room: usize,
        out: &mut Vec<u8>,
    ) -> u64 {
        let opts = ctx.opts();
        let shared = &ctx.shared;
        let channels = shared.channels.len() as u64;
        let nats = opts.target_kind == TargetKind::Nats;
        let batch = opts.batch > 1 && !nats;
        let write_ns = now_ns();
        let mut lags = ctx.hists.borrow_mut();
        let mut events_sent = 0u64;
        for _ in 0..room {
            let n_events = (opts.batch as u64).min(due - *k).min(self.my_total - *k);
            if n_events == 0 {
                break;
            }
            let mut req = Inflight {
                events: n_events,
                expected: 0,
                step: self.index,
                oldest_sched_ns: 0,
            };
            self.body.clear();
            if batch {
                self.body.push(b'[');
            }
            for e in 0..n_events {
                let n = global_index(*k + e, self.p, self.publishers);
                // Closed loop: an event is "scheduled" when it is written.
                let sched = if self.closed_loop {
                    write_ns
                } else {
                    self.schedule.due_at(n)
                };
                if e == 0 {
                    req.oldest_sched_ns = sched;
                } else if batch {
                    self.body.push(b',');
                }
                let ch = (n % channels) as usize;
                req.expected += shared.subs_per_channel[ch];
                if !self.closed_loop {
                    lags.send_lag
                        .saturating_record(write_ns.saturating_sub(sched));
                }
                match opts.publish_via {
                    _ if nats => {
                        // The publisher numbers its own events per channel (from 1).
                        let seq = match self.seqs.get_mut(ch) {
                            Some(s) => {
                                *s += 1;
                                *s
                            }
                            None => 0,
                        };
                        self.json.clear();
                        payload::write_tagged_data(
                            &mut self.json,
                            sched,
                            seq,
                            self.p,
                            opts.event_bytes,
                        );
                        nats::write_pub(out, &shared.channels[ch], &self.json);
                    }
                    PublishVia::Http => payload::write_envelope(
                        &mut self.body,
                        &shared.channels[ch],
                        sched,
                        opts.event_bytes,
                    ),
                    PublishVia::Ws => {
                        self.json.clear();
                        payload::write_ws_publish(
                            &mut self.json,
                            &shared.channels[ch],
                            sched,
                            opts.event_bytes,
                        );
                        wsframe::write_client_frame(
                            out,
                            opcode::TEXT,
                            &self.json,
                            c.masker.next_key(),
                        );
                    }
                }
            }
            if nats {
                // Its PONG is the request's reply.
                nats::write_ping(out);
            } else if opts.publish_via == PublishVia::Http {
                if batch {
                    self.body.push(b']');
                }
                payload::write_publish_head(
                    out,
                    &shared.host,
                    opts.api_key.as_deref(),
                    self.body.len(),
                );
                out.extend_from_slice(&self.body);
            }
            c.pipe.inflight.borrow_mut().push_back(req);
            bump(&ctx.stats().step(self.index).sent, n_events);
            *k += n_events;
            events_sent += n_events;
        }
        events_sent
    }
}

async fn send_pong(c: &mut Conn) -> Result<(), ()> {
    let mut frame = Vec::new();
    c.push_pong(&mut frame);
    if frame.is_empty() {
        return Ok(());
    }
    let (r, _) = c.write.write_all(frame).await;
    r.map(drop).map_err(drop)
}

/// [`connect`], with a failure counted and noted.
async fn connect_counted(ctx: &Rc<Ctx>, p: usize) -> Option<Conn> {
    match connect(ctx, p).await {
        Ok(c) => Some(c),
        Err(e) => {
            ctx.stats().add(C::PubConnectFailed, 1);
            ctx.stats().note(format!("publisher {p}: {e}"));
            None
        }
    }
}

/// Opens a publisher connection and starts its reply reader.
async fn connect(ctx: &Rc<Ctx>, p: usize) -> Result<Conn, ConnError> {
    let shared = &ctx.shared;
    let opts = ctx.opts();
    // Publishers take source addresses after the subscribers'.
    let source = net::source_ip(opts.subscriber_connections() + p, shared.source_ips);
    let timeout = Duration::from_millis(opts.connect_timeout_ms);
    let nats = opts.target_kind == TargetKind::Nats;
    let (stream, early) = match opts.publish_via {
        _ if nats => (nats::connect_publisher(ctx, source).await?, Vec::new()),
        PublishVia::Http => (
            net::connect(opts.target, source, timeout).await?,
            Vec::new(),
        ),
        PublishVia::Ws => subscriber::ws_handshake(ctx, source).await?,
    };
    let fd = stream.as_raw_fd();
    let websocket = !nats && opts.publish_via == PublishVia::Ws;
    ctx.register_fd(fd, websocket);
    ctx.stats().add(C::PubsOpen, 1);
    let (read, write) = stream.into_split();
    let pipe = Rc::new(Pipe::default());
    monoio::spawn(reader(ctx.clone(), read, pipe.clone(), early));
    Ok(Conn {
        write,
        pipe,
        fd,
        masker: Masker::new(now_ns() ^ p as u64),
        nats,
    })
}

fn drop_conn(ctx: &Ctx, conn: Option<Conn>) {
    if let Some(c) = conn {
        ctx.deregister_fd(c.fd);
        ctx.stats().sub(C::PubsOpen, 1);
        // The reader may still hold the socket: wake it so it ends too.
        net::shutdown(c.fd);
    }
}

fn close(ctx: &Ctx, conn: Option<Conn>) {
    drop_conn(ctx, conn);
}

/// Reads replies in order until the connection ends; what is left in flight then is counted as
/// unanswered.
async fn reader(ctx: Rc<Ctx>, mut read: OwnedReadHalf<TcpStream>, pipe: Rc<Pipe>, early: Vec<u8>) {
    let _live = ctx.task();
    let via = ctx.opts().publish_via;
    // NATS mode: the PONGs are matched by the `nats` module, which keeps a little state.
    let mut nats_replies = (ctx.opts().target_kind == TargetKind::Nats).then(nats::PubReplies::new);
    let mut buf = early;
    if buf.capacity() < READ_CHUNK {
        buf.reserve(READ_CHUNK - buf.len());
    }
    loop {
        let now = now_ns();
        let outcome = {
            let mut inflight = pipe.inflight.borrow_mut();
            let mut sink = ThreadAcks { ctx: &ctx };
            match (&mut nats_replies, via) {
                (Some(replies), _) => {
                    let mut pong = pipe.pong.borrow_mut();
                    replies.feed(&buf, &mut inflight, now, &mut sink, &mut pong)
                }
                (None, PublishVia::Http) => feed_http(&buf, &mut inflight, now, &mut sink),
                (None, PublishVia::Ws) => {
                    let mut pong = pipe.pong.borrow_mut();
                    feed_ws(&buf, &mut inflight, now, &mut sink, &mut pong)
                        .map(|(n, closed)| (n, closed.is_some()))
                }
            }
        };
        let (used, closing) = match outcome {
            Ok(o) => o,
            Err(e) => {
                ctx.stats().add(C::ProtocolErrors, 1);
                ctx.stats().note(format!("publisher: {e}"));
                break;
            }
        };
        if used > 0 {
            buf.drain(..used);
            pipe.space.notify();
        }
        if closing || ctx.stopping() {
            break;
        }
        let want = buf.len() + READ_CHUNK / 4;
        if buf.capacity() < want {
            buf.reserve(want - buf.len());
        }
        let len = buf.len();
        let (r, slice) = read.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        match r {
            Ok(n) if n > 0 => {}
            Ok(_) => break,
            Err(e) => {
                if !ctx.stopping() {
                    ctx.stats().note(format!("publisher: read: {e}"));
                }
                break;
            }
        }
    }
    pipe.dead.set(true);
    let stats = ctx.stats();
    for req in pipe.inflight.borrow_mut().drain(..) {
        bump(&stats.step(req.step).failed, req.events);
        stats.add(C::PublishNoReply, 1);
    }
    pipe.space.notify();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ack sink that keeps everything; also used by the `nats` module's tests.
    #[derive(Default)]
    pub(crate) struct Acks {
        pub(crate) accepted: Vec<(Inflight, u64)>,
        pub(crate) refused: Vec<(Inflight, u16, String)>,
    }

    impl AckSink for Acks {
        fn accepted(&mut self, req: &Inflight, now: u64) {
            self.accepted.push((*req, now));
        }
        fn refused(&mut self, req: &Inflight, status: u16, why: &[u8]) {
            self.refused
                .push((*req, status, String::from_utf8_lossy(why).into_owned()));
        }
    }

    pub(crate) fn req(events: u64) -> Inflight {
        Inflight {
            events,
            expected: events * 3,
            step: 0,
            oldest_sched_ns: 1,
        }
    }

    #[test]
    fn a_partly_refused_batch_counts_both_parts() {
        let body = br#"{"results":[{"channel":"a","seq":1,"id":"x","duplicate":false},{"channel":"b","error":{"code":"overloaded","message":"m"}}]}"#;
        let mut stream = format!(
            "HTTP/1.1 207 Multi-Status\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        let mut inflight: VecDeque<Inflight> = [req(2)].into();
        let mut acks = Acks::default();
        let (used, _) = feed_http(&stream, &mut inflight, 7, &mut acks).unwrap();
        assert_eq!(used, stream.len());
        assert_eq!(acks.accepted.len(), 1);
        assert_eq!(
            (acks.accepted[0].0.events, acks.accepted[0].0.expected),
            (1, 3)
        );
        assert_eq!(acks.refused.len(), 1);
        assert_eq!((acks.refused[0].0.events, acks.refused[0].1), (1, 207));
    }

    #[test]
    fn http_replies_match_requests_in_order_across_reads() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"results\":[]");
        stream.extend_from_slice(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 7\r\n\r\n{\"e\":1}");
        stream.extend_from_slice(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
        stream.extend_from_slice(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        );
        for cut in [1usize, 3, 50, 4096] {
            let mut inflight: VecDeque<Inflight> = [req(1), req(2), req(3), req(4), req(5)].into();
            let mut acks = Acks::default();
            let mut buf = Vec::new();
            let mut closing = false;
            for piece in stream.chunks(cut) {
                buf.extend_from_slice(piece);
                let (used, close) = feed_http(&buf, &mut inflight, 7, &mut acks).unwrap();
                buf.drain(..used);
                closing |= close;
            }
            assert!(closing, "cut {cut}");
            assert_eq!(acks.accepted.len(), 2);
            assert_eq!(acks.accepted[1].0.events, 3);
            assert_eq!(acks.refused.len(), 2);
            assert_eq!(acks.refused[0].1, 429);
            assert_eq!(acks.refused[0].2, "{\"e\":1}");
            assert_eq!(acks.refused[1].1, 503);
            assert_eq!(inflight.len(), 1, "one request never answered");
        }
        // A reply nobody asked for is a protocol error, not a panic.
        let mut none = VecDeque::new();
        assert!(feed_http(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
            &mut none,
            0,
            &mut Acks::default()
        )
        .is_err());
    }

    #[test]
    fn ws_replies_and_pings() {
        let frame = |json: &[u8], op: u8| {
            let mut f = vec![0x80 | op, json.len() as u8];
            f.extend_from_slice(json);
            f
        };
        let mut stream = frame(
            br#"{"op":"welcome","conn":"c","heartbeat_ms":1}"#,
            opcode::TEXT,
        );
        stream.extend(frame(
            br#"{"op":"published","channel":"c","seq":1,"id":"x","duplicate":false}"#,
            opcode::TEXT,
        ));
        stream.extend(frame(b"p", opcode::PING));
        stream.extend(frame(
            br#"{"op":"error","code":"rate_limited","message":"slow down"}"#,
            opcode::TEXT,
        ));
        stream.extend(frame(&1001u16.to_be_bytes(), opcode::CLOSE));
        let mut inflight: VecDeque<Inflight> = [req(1), req(1), req(1)].into();
        let mut acks = Acks::default();
        let mut pong = None;
        let (used, closed) = feed_ws(&stream, &mut inflight, 3, &mut acks, &mut pong).unwrap();
        assert_eq!(used, stream.len());
        assert_eq!(closed, Some(Some(1001)));
        assert_eq!(acks.accepted.len(), 1);
        assert_eq!(acks.refused[0].1, 429);
        assert_eq!(pong.as_deref(), Some(&b"p"[..]));
        assert_eq!(inflight.len(), 1);
        assert_eq!(ws_error_status(b"forbidden"), 403);
        assert_eq!(ws_error_status(b"whatever"), 0);
    }
}
