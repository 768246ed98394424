//! Subscribers (WebSocket and SSE) and the connect scenario's handshake loop.
//!
//! NATS-mode subscribers (`--target-kind nats`) are connected here too, then handed to the
//! `nats` module's own read loop; the upgrade, the end-of-connection accounting and the
//! sequence recording are shared.
//!
//! Owns one subscriber connection's life: connect (from its source address), upgrade or open
//! the stream, subscribe, then the read loop: one large buffer per connection, every complete
//! frame or line in it parsed per read (coalesced reads), events recorded by byte scanning with
//! no allocation. The protocol state (`WsSub`, `SseSub`) is pure, fed bytes by the loop, so it
//! is tested without sockets. Must never: cancel a read in flight on a live connection (under
//! io_uring the bytes it would have returned are lost); a connection ends by EOF, a close
//! frame, an error, or the thread shutting its socket down at stop.

use std::cell::Cell;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::clock::now_ns;
use crate::error::ConnError;
use crate::http::{self, ResponseHead};
use crate::options::{CloseMode, TargetKind, Transport};
use crate::scan::{self, EventFields, Op, SseLine};
use crate::stats::{bump, raise, Hists, SeqOutcome, SeqTracker, ThreadStats, C};
use crate::worker::{Ctx, Shared, POLL};
use crate::wsframe::{self, opcode, Masker};
use crate::{nats, net, payload};

/// relay's WebSocket endpoint.
pub const WS_PATH: &str = "/api/v1/relay/ws";
/// The largest frame or SSE line a subscriber accepts (relay's default frame limit is 64 KiB;
/// its events are far smaller).
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// An error body excerpt is read up to this many bytes.
const MAX_ERROR_BODY: usize = 4096;

/// Where a subscriber's observations go (the thread's statistics; a plain struct in tests).
pub trait Recorder {
    /// A first arrival of an event scheduled at `sched_ns`, read at `now_ns`.
    fn delivered(&mut self, sched_ns: u64, now_ns: u64);
    fn count(&mut self, c: C, n: u64);
    fn note(&mut self, message: String);
}

/// The production recorder: the thread's histograms and counters.
pub struct ThreadRecorder<'a> {
    pub shared: &'a Shared,
    pub stats: &'a ThreadStats,
    pub hists: &'a mut Hists,
}

impl Recorder for ThreadRecorder<'_> {
    #[inline]
    fn delivered(&mut self, sched_ns: u64, now_ns: u64) {
        let step = self.shared.step_of(sched_ns);
        self.hists
            .latency(step)
            .saturating_record(now_ns.saturating_sub(sched_ns));
        let sc = self.stats.step(step);
        bump(&sc.delivered, 1);
        raise(&sc.last_delivery_ns, now_ns);
    }

    #[inline]
    fn count(&mut self, c: C, n: u64) {
        self.stats.add(c, n);
    }

    fn note(&mut self, message: String) {
        self.stats.note(message);
    }
}

/// One subscribed channel of a connection.
#[derive(Debug, Clone)]
pub struct ChanSub {
    pub name: Box<[u8]>,
    pub seq: SeqTracker,
    pub subscribed: bool,
}

impl ChanSub {
    pub fn new(name: &[u8]) -> ChanSub {
        ChanSub {
            name: name.into(),
            seq: SeqTracker::new(0),
            subscribed: false,
        }
    }
}

#[inline]
fn on_event<R: Recorder>(chans: &mut [ChanSub], f: EventFields<'_>, now: u64, rec: &mut R) {
    // Most connections hold one channel: one comparison.
    let Some(chan) = chans.iter_mut().find(|c| *c.name == *f.channel) else {
        rec.count(C::Foreign, 1);
        return;
    };
    observe(&mut chan.seq, f.seq, f.sched_ns, now, rec);
}

/// Records one arrival of `seq` (scheduled at `sched_ns`) on a subscription's sequence: a
/// first arrival is a delivery, a second one a duplicate; gaps and late arrivals are counted.
#[inline]
pub fn observe<R: Recorder>(
    tracker: &mut SeqTracker,
    seq: u64,
    sched_ns: u64,
    now: u64,
    rec: &mut R,
) {
    match tracker.observe(seq) {
        SeqOutcome::InOrder => rec.delivered(sched_ns, now),
        SeqOutcome::Gap { skipped } => {
            rec.count(C::SeqGaps, skipped);
            rec.delivered(sched_ns, now);
        }
        SeqOutcome::OutOfOrder => {
            rec.count(C::OutOfOrder, 1);
            rec.delivered(sched_ns, now);
        }
        SeqOutcome::Duplicate => rec.count(C::Duplicated, 1),
    }
}

/// What a feed did with the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes fully handled; the caller drops them.
    pub consumed: usize,
    /// Size of the incomplete frame at the front of what is left, when its header said so.
    pub want: Option<usize>,
}

/// A WebSocket subscriber's protocol state.
#[derive(Debug)]
pub struct WsSub {
    pub chans: Vec<ChanSub>,
    /// Subscribe replies still awaited.
    pending: usize,
    /// Control frames to send back (pongs, the close reply), masked.
    pub ctrl: Vec<u8>,
    masker: Masker,
    /// The server's close frame arrived (with its code, if any).
    pub closed: Option<Option<u16>>,
}

impl WsSub {
    pub fn new(chans: Vec<ChanSub>, seed: u64) -> WsSub {
        WsSub {
            pending: chans.len(),
            chans,
            ctrl: Vec::new(),
            masker: Masker::new(seed),
            closed: None,
        }
    }

    pub fn is_subscribed(&self) -> bool {
        self.pending == 0
    }

    /// The subscribe messages for every channel, masked.
    pub fn subscribe_frames(&mut self, out: &mut Vec<u8>) {
        let mut json = Vec::with_capacity(96);
        for c in &self.chans {
            json.clear();
            json.extend_from_slice(b"{\"op\":\"subscribe\",\"channel\":\"");
            json.extend_from_slice(&c.name);
            json.extend_from_slice(b"\"}");
            wsframe::write_client_frame(out, opcode::TEXT, &json, self.masker.next_key());
        }
    }

    /// Handles every complete frame at the start of `buf`.
    pub fn feed<R: Recorder>(
        &mut self,
        buf: &[u8],
        now: u64,
        rec: &mut R,
    ) -> Result<Fed, ConnError> {
        let mut at = 0;
        while self.closed.is_none() {
            let rest = &buf[at..];
            let Some(head) = wsframe::parse_head(rest, MAX_FRAME_BYTES)? else {
                return Ok(Fed {
                    consumed: at,
                    want: None,
                });
            };
            let total = head.total_len();
            if rest.len() < total {
                return Ok(Fed {
                    consumed: at,
                    want: Some(total),
                });
            }
            let payload = &rest[head.header_len..total];
            at += total;
            match head.opcode {
                opcode::TEXT if head.fin => self.text(payload, now, rec)?,
                opcode::TEXT | opcode::CONTINUATION => {
                    // relay sends every message as one frame.
                    return Err(ConnError::Handshake(
                        "fragmented messages are not expected from relay".into(),
                    ));
                }
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
                // Pongs and binary frames carry nothing for us.
                _ => {}
            }
        }
        Ok(Fed {
            consumed: at,
            want: None,
        })
    }

    #[inline]
    fn text<R: Recorder>(
        &mut self,
        payload: &[u8],
        now: u64,
        rec: &mut R,
    ) -> Result<(), ConnError> {
        match scan::ws_op(payload) {
            Op::Event => match scan::scan_event(payload) {
                Some(f) => on_event(&mut self.chans, f, now, rec),
                None => rec.count(C::Foreign, 1),
            },
            Op::Subscribed => {
                let channel = scan::field_str(payload, "channel").unwrap_or_default();
                let seq = scan::field_u64(payload, "seq").unwrap_or(0);
                if let Some(c) = self
                    .chans
                    .iter_mut()
                    .find(|c| !c.subscribed && *c.name == *channel)
                {
                    c.subscribed = true;
                    c.seq = SeqTracker::new(seq);
                    self.pending -= 1;
                    if self.pending == 0 {
                        rec.count(C::Subscribed, 1);
                    }
                }
            }
            Op::Error => {
                let message = scan::field_str(payload, "message").unwrap_or(payload);
                let message = http::excerpt(message);
                if self.pending > 0 {
                    return Err(ConnError::ErrorReply(message));
                }
                rec.note(format!("subscriber got an error reply: {message}"));
            }
            Op::Gap => rec.count(C::GapNotices, 1),
            _ => {}
        }
        Ok(())
    }
}

/// An SSE subscriber's parse state.
#[derive(Debug)]
pub struct SseSub {
    pub chans: Vec<ChanSub>,
    /// The block being read is `event: gap`.
    gap_block: bool,
}

impl SseSub {
    pub fn new(chans: Vec<ChanSub>) -> SseSub {
        SseSub {
            chans,
            gap_block: false,
        }
    }

    /// Handles every complete line at the start of `buf`.
    pub fn feed<R: Recorder>(
        &mut self,
        buf: &[u8],
        now: u64,
        rec: &mut R,
    ) -> Result<Fed, ConnError> {
        let mut at = 0;
        while let Some((line, used)) = scan::next_line(&buf[at..]) {
            at += used;
            match scan::sse_line(line) {
                SseLine::Field {
                    name: b"data",
                    value,
                } => {
                    if self.gap_block {
                        continue;
                    }
                    match scan::scan_event(value) {
                        Some(f) => on_event(&mut self.chans, f, now, rec),
                        None => rec.count(C::Foreign, 1),
                    }
                }
                SseLine::Field {
                    name: b"event",
                    value,
                } => {
                    self.gap_block = value == b"gap";
                    if self.gap_block {
                        rec.count(C::GapNotices, 1);
                    }
                }
                SseLine::Blank => self.gap_block = false,
                _ => {}
            }
        }
        if buf.len() - at > MAX_FRAME_BYTES {
            return Err(ConnError::Frame(wsframe::FrameError::TooLarge {
                size: (buf.len() - at) as u64,
                max: MAX_FRAME_BYTES,
            }));
        }
        Ok(Fed {
            consumed: at,
            want: None,
        })
    }
}

/// The protocol state one read loop drives.
pub(crate) enum Proto {
    Ws(WsSub),
    Sse(SseSub),
    Nats(crate::nats::NatsSub),
}

impl Proto {
    fn subscribed(&self) -> bool {
        match self {
            Proto::Ws(w) => w.is_subscribed(),
            Proto::Sse(_) => true,
            Proto::Nats(n) => n.is_subscribed(),
        }
    }

    fn feed(
        &mut self,
        buf: &[u8],
        now: u64,
        rec: &mut ThreadRecorder<'_>,
    ) -> Result<Fed, ConnError> {
        match self {
            Proto::Ws(ws) => ws.feed(buf, now, rec),
            Proto::Sse(sse) => sse.feed(buf, now, rec),
            Proto::Nats(nats) => nats.feed(buf, now, rec),
        }
    }

    /// The control bytes to send back and the server's close, for protocols that have them.
    fn ctrl_and_close(&mut self) -> Option<(&mut Vec<u8>, Option<Option<u16>>)> {
        match self {
            Proto::Ws(ws) => Some((&mut ws.ctrl, ws.closed)),
            Proto::Sse(_) => None,
            Proto::Nats(nats) => Some((&mut nats.ctrl, nats.closed)),
        }
    }
}

/// Connects the subscribers of `mine` (global indexes), `setup_concurrency` of these tasks per
/// thread sharing `cursor`; each established connection continues in its own task.
pub async fn connector(ctx: Rc<Ctx>, mine: Rc<[usize]>, cursor: Rc<Cell<usize>>) {
    let _live = ctx.task();
    loop {
        if ctx.stopping() {
            return;
        }
        let next = cursor.get();
        let Some(&i) = mine.get(next) else {
            return;
        };
        if i >= ctx.shared.admit.load(std::sync::atomic::Ordering::Relaxed) {
            monoio::time::sleep(POLL * 5).await;
            continue;
        }
        cursor.set(next + 1);
        let opened = match ctx.opts().target_kind {
            TargetKind::Relay => setup(&ctx, i).await.map(|(stream, buf, proto)| {
                monoio::spawn(subscriber(ctx.clone(), stream, buf, proto));
            }),
            TargetKind::Nats => nats::setup(&ctx, i).await.map(|(stream, buf, sub)| {
                monoio::spawn(nats::subscriber(ctx.clone(), stream, buf, sub));
            }),
        };
        if let Err(e) = opened {
            ctx.stats().add(C::SubFailed, 1);
            ctx.stats().note(format!("subscriber {i}: {e}"));
        }
    }
}

/// Opens subscriber `i` and sends its subscriptions.
async fn setup(ctx: &Rc<Ctx>, i: usize) -> Result<(TcpStream, Vec<u8>, Proto), ConnError> {
    let shared = &ctx.shared;
    let source = net::source_ip(i, shared.source_ips);
    let channel = &shared.channels[i % shared.channels.len()];
    let chans = vec![ChanSub::new(channel)];
    let timeout = Duration::from_millis(ctx.opts().connect_timeout_ms);
    match ctx.opts().transport {
        Transport::Ws => {
            let (mut stream, buf) = ws_handshake(ctx, source).await?;
            let mut ws = WsSub::new(chans, i as u64 ^ now_ns());
            let mut out = Vec::with_capacity(128);
            ws.subscribe_frames(&mut out);
            let (r, _) = monoio::time::timeout(timeout, stream.write_all(out))
                .await
                .map_err(|_| ConnError::Timeout("the subscribe write"))?;
            r.map_err(ConnError::Io)?;
            Ok((stream, buf, Proto::Ws(ws)))
        }
        Transport::Sse => {
            let work = async {
                let mut stream = net::connect(shared.opts.target, source, timeout).await?;
                let mut req = Vec::with_capacity(256);
                payload::write_sse_request(
                    &mut req,
                    &shared.host,
                    chans.iter().map(|c| &*c.name),
                    shared.opts.token.as_deref(),
                );
                let (r, _) = stream.write_all(req).await;
                r.map_err(ConnError::Io)?;
                let (head, mut buf) =
                    read_head(&mut stream, Vec::with_capacity(shared.read_buf)).await?;
                if head.status != 200 || !head.event_stream {
                    let body = read_error_body(&mut stream, &head, buf).await;
                    return Err(ConnError::Refused {
                        status: head.status,
                        body,
                    });
                }
                buf.drain(..head.head_len);
                Ok((stream, buf))
            };
            let (stream, buf) = monoio::time::timeout(timeout, work)
                .await
                .map_err(|_| ConnError::Timeout("the SSE stream to open"))??;
            // relay subscribes before it answers: the head means subscribed.
            ctx.stats().add(C::Subscribed, 1);
            Ok((stream, buf, Proto::Sse(SseSub::new(chans))))
        }
    }
}

/// One subscriber connection until it ends.
async fn subscriber(ctx: Rc<Ctx>, stream: TcpStream, buf: Vec<u8>, proto: Proto) {
    let _live = ctx.task();
    let fd = stream.as_raw_fd();
    let websocket = matches!(proto, Proto::Ws(_));
    ctx.register_fd(fd, websocket);
    ctx.stats().add(C::SubsOpen, 1);
    let (result, subscribed) = read_loop(&ctx, stream, buf, proto).await;
    ctx.stats().sub(C::SubsOpen, 1);
    ctx.deregister_fd(fd);
    record_end(&ctx, result, subscribed);
}

/// Counts why a subscriber connection ended (nothing when the run is stopping or it ended
/// cleanly): its close code or protocol fault, and a disconnect or a failed setup.
pub fn record_end(ctx: &Ctx, result: Result<(), ConnError>, subscribed: bool) {
    if ctx.stopping() {
        return;
    }
    let stats = ctx.stats();
    let error = match result {
        Ok(()) => return,
        Err(e) => e,
    };
    match &error {
        ConnError::Closed(code) => stats.close_code(*code),
        ConnError::Frame(_)
        | ConnError::Head(_)
        | ConnError::Handshake(_)
        | ConnError::Protocol(_) => stats.add(C::ProtocolErrors, 1),
        _ => {}
    }
    if subscribed {
        stats.add(C::Disconnected, 1);
        stats.note(format!("subscriber disconnected: {error}"));
    } else {
        stats.add(C::SubFailed, 1);
        stats.note(format!(
            "subscriber failed before it was subscribed: {error}"
        ));
    }
}

/// Reads and handles until the connection ends; returns why, and whether it was subscribed.
/// One large buffer, everything complete in it handled per read (coalesced reads).
pub(crate) async fn read_loop(
    ctx: &Rc<Ctx>,
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    mut proto: Proto,
) -> (Result<(), ConnError>, bool) {
    let chunk = ctx.shared.read_buf;
    if buf.capacity() < chunk {
        buf.reserve(chunk - buf.len());
    }
    let mut ctrl_out: Vec<u8> = Vec::new();
    loop {
        let now = now_ns();
        let fed = {
            let mut hists = ctx.hists.borrow_mut();
            let mut rec = ThreadRecorder {
                shared: &ctx.shared,
                stats: ctx.stats(),
                hists: &mut hists,
            };
            proto.feed(&buf, now, &mut rec)
        };
        let fed = match fed {
            Ok(f) => f,
            Err(e) => return (Err(e), proto.subscribed()),
        };
        discard_consumed(&mut buf, fed.consumed);
        if let Some((ctrl, closed)) = proto.ctrl_and_close() {
            if let Err(e) = flush_ctrl(&mut stream, ctrl, &mut ctrl_out).await {
                return (Err(e), proto.subscribed());
            }
            if let Some(code) = closed {
                return (Err(ConnError::Closed(code)), proto.subscribed());
            }
        }
        if ctx.stopping() {
            return (Ok(()), proto.subscribed());
        }
        let ended;
        (buf, ended) = read_onto(&mut stream, buf, fed.want, chunk).await;
        if let Some(e) = ended {
            let result = if ctx.stopping() { Ok(()) } else { Err(e) };
            return (result, proto.subscribed());
        }
    }
}

/// Drops the bytes the parser is done with from the front of a subscriber's buffer.
pub(crate) fn discard_consumed(buf: &mut Vec<u8>, consumed: usize) {
    if consumed == buf.len() {
        buf.clear();
    } else if consumed > 0 {
        buf.drain(..consumed);
    }
}

/// Writes the control bytes a protocol queued (pongs, close replies), if any; `spare` is the
/// buffer they swap with, so nothing is allocated per write.
pub(crate) async fn flush_ctrl(
    stream: &mut TcpStream,
    ctrl: &mut Vec<u8>,
    spare: &mut Vec<u8>,
) -> Result<(), ConnError> {
    if ctrl.is_empty() {
        return Ok(());
    }
    std::mem::swap(ctrl, spare);
    let (r, back) = stream.write_all(std::mem::take(spare)).await;
    *spare = back;
    spare.clear();
    r.map(|_| ()).map_err(ConnError::Io)
}

/// Reads more onto the end of a subscriber's buffer, with room for a whole announced frame
/// (`want`) and never less than a quarter chunk. The error says how the connection ended.
pub(crate) async fn read_onto(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    want: Option<usize>,
    chunk: usize,
) -> (Vec<u8>, Option<ConnError>) {
    let want = want.unwrap_or(0).max(buf.len() + chunk / 4);
    if buf.capacity() < want {
        buf.reserve(want - buf.len());
    }
    let len = buf.len();
    let (r, slice) = stream.read(buf.slice_mut(len..)).await;
    let ended = match r {
        Ok(0) => Some(ConnError::Closed(None)),
        Ok(_) => None,
        Err(e) => Some(ConnError::Io(e)),
    };
    (slice.into_inner(), ended)
}

/// Reads until a whole response head is buffered.
/// Reads more bytes onto the end of `buf` during a handshake; EOF is `Closed`.
async fn read_more(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<Vec<u8>, ConnError> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    let len = buf.len();
    let (r, slice) = stream.read(buf.slice_mut(len..)).await;
    match r {
        Ok(0) => Err(ConnError::Closed(None)),
        Ok(_) => Ok(slice.into_inner()),
        Err(e) => Err(ConnError::Io(e)),
    }
}

pub async fn read_head(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
) -> Result<(ResponseHead, Vec<u8>), ConnError> {
    loop {
        if let Some(head) = http::parse_head(&buf)? {
            return Ok((head, buf));
        }
        buf = read_more(stream, buf).await?;
    }
}

/// Reads an error response's body (bounded) and returns an excerpt; best effort.
pub async fn read_error_body(
    stream: &mut TcpStream,
    head: &ResponseHead,
    mut buf: Vec<u8>,
) -> String {
    let want = head.head_len + head.content_length.unwrap_or(0).min(MAX_ERROR_BODY);
    while buf.len() < want {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let len = buf.len();
        let (r, slice) = stream.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        if !matches!(r, Ok(n) if n > 0) {
            break;
        }
    }
    let end = want.min(buf.len());
    http::excerpt(buf.get(head.head_len..end).unwrap_or_default())
}

/// Connects and upgrades to WebSocket within the connect timeout; returns the stream and the
/// bytes that came after the 101 head (the `welcome` frame, usually).
pub async fn ws_handshake(
    ctx: &Rc<Ctx>,
    source: Option<IpAddr>,
) -> Result<(TcpStream, Vec<u8>), ConnError> {
    let shared = &ctx.shared;
    let timeout = Duration::from_millis(shared.opts.connect_timeout_ms);
    let work = async {
        let stream = net::connect(shared.opts.target, source, timeout).await?;
        // Small: the read loop grows it to the connection's chunk.
        let mut buf = Vec::with_capacity(HANDSHAKE_BUF);
        let stream = upgrade(stream, &Rc::new(upgrade_request(shared)), &mut buf).await?;
        Ok((stream, buf))
    };
    monoio::time::timeout(timeout, work)
        .await
        .map_err(|_| ConnError::Timeout("the WebSocket upgrade"))?
}

/// Best-effort close frame on a raw socket (at stop), masked as a client frame must be.
pub fn goodbye(fd: std::os::fd::RawFd) {
    let mut frame = Vec::with_capacity(8);
    wsframe::write_close(&mut frame, 1000, [0x5a, 0x17, 0xc3, 0x9e]);
    net::send_nonblocking(fd, &frame);
}

/// The connect scenario: connector `j` repeats connect, upgrade, read `welcome`, close (as
/// `--close` says), while `j` is below the current concurrency.
///
/// Everything that does not change between handshakes is made once per connector: the upgrade
/// request (the same bytes every time, shared with the write), the read buffer (taken back
/// after each handshake) and the masker of the close frames.
pub async fn handshake_loop(ctx: Rc<Ctx>, j: usize) {
    let _live = ctx.task();
    let shared = ctx.shared.clone();
    let timeout = Duration::from_millis(shared.opts.connect_timeout_ms);
    let nats = shared.opts.target_kind == TargetKind::Nats;
    let request = Rc::new(upgrade_request(&shared));
    let mut masker = Masker::new(now_ns() ^ (j as u64).rotate_left(32));
    let mut buf = Vec::new();
    let mut frame = Vec::with_capacity(8);
    let mut attempt = 0usize;
    loop {
        if ctx.stopping() {
            return;
        }
        if j >= shared
            .concurrency
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            monoio::time::sleep(POLL * 5).await;
            continue;
        }
        let step = shared
            .current_step
            .load(std::sync::atomic::Ordering::Relaxed);
        let source = net::source_ip(j.wrapping_add(attempt), shared.source_ips);
        attempt = attempt.wrapping_add(1);
        if buf.capacity() < HANDSHAKE_BUF {
            // The first handshake, or the buffer went with a read a timeout cancelled.
            buf = Vec::with_capacity(HANDSHAKE_BUF);
        }
        let t0 = now_ns();
        let result = async {
            let connected = async {
                let stream = net::connect_quick(shared.opts.target, source).await?;
                upgrade(stream, &request, &mut buf).await
            };
            let stream = monoio::time::timeout(timeout, connected)
                .await
                .map_err(|_| ConnError::Timeout("the WebSocket upgrade"))??;
            monoio::time::timeout(timeout, wait_welcome(stream, &mut buf, nats))
                .await
                .map_err(|_| ConnError::Timeout("the welcome message"))?
        }
        .await;
        let stats = ctx.stats();
        match result {
            Ok(stream) => {
                let t1 = now_ns();
                ctx.hists
                    .borrow_mut()
                    .latency(step)
                    .saturating_record(t1.saturating_sub(t0));
                bump(&stats.step(step).delivered, 1);
                raise(&stats.step(step).last_delivery_ns, t1);
                stats.add(C::Handshakes, 1);
                match shared.opts.close {
                    CloseMode::Graceful => {
                        close_gracefully(stream, &mut buf, &mut frame, masker.next_key()).await
                    }
                    CloseMode::Reset => {
                        net::set_linger_zero(stream.as_raw_fd());
                        drop(stream);
                    }
                }
            }
            Err(e) => {
                stats.add(C::HandshakeFailures, 1);
                bump(&stats.step(step).failed, 1);
                stats.note(format!("handshake: {e}"));
                // A refusing server must not turn this into a busy loop.
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Read buffer of a handshake-only connection: a 101 head and a `welcome` frame, or an error
/// response's head and the start of its body.
const HANDSHAKE_BUF: usize = 4096;

/// The upgrade request of this run (path and credentials by target kind).
fn upgrade_request(shared: &Shared) -> Vec<u8> {
    let mut req = Vec::with_capacity(256);
    // nats-server takes its credentials in CONNECT, not in the upgrade.
    let (path, token) = match shared.opts.target_kind {
        TargetKind::Relay => (WS_PATH, shared.opts.token.as_deref()),
        TargetKind::Nats => (nats::WS_PATH, None),
    };
    wsframe::write_upgrade_request(&mut req, &shared.host, path, token);
    req
}

/// Upgrades a connected stream (the caller bounds it); on success `buf` holds what followed
/// the 101 head. `buf` keeps its capacity and is handed back on every path except a cancelled
/// read.
async fn upgrade(
    mut stream: TcpStream,
    request: &Rc<Vec<u8>>,
    buf: &mut Vec<u8>,
) -> Result<TcpStream, ConnError> {
    let (r, _) = stream.write_all(request.clone()).await;
    r.map_err(ConnError::Io)?;
    buf.clear();
    let (head, mut got) = read_head(&mut stream, std::mem::take(buf)).await?;
    if head.status != 101 {
        let body = read_error_body(&mut stream, &head, got).await;
        return Err(ConnError::Refused {
            status: head.status,
            body,
        });
    }
    if !head.accept_ok {
        *buf = got;
        return Err(ConnError::Handshake(
            "101 without the right Sec-WebSocket-Accept".into(),
        ));
    }
    got.drain(..head.head_len);
    *buf = got;
    Ok(stream)
}

/// Reads frames until the `welcome` message (nats-server: its `INFO` line).
async fn wait_welcome(
    mut stream: TcpStream,
    buf: &mut Vec<u8>,
    nats: bool,
) -> Result<TcpStream, ConnError> {
    loop {
        let mut at = 0;
        while let Some(head) = wsframe::parse_head(&buf[at..], MAX_FRAME_BYTES)? {
            if buf.len() - at < head.total_len() {
                break;
            }
            let payload = &buf[at + head.header_len..at + head.total_len()];
            match head.opcode {
                opcode::TEXT if !nats && scan::ws_op(payload) == Op::Welcome => return Ok(stream),
                opcode::TEXT | opcode::BINARY if nats && nats::is_info(payload) => {
                    return Ok(stream)
                }
                opcode::CLOSE => return Err(ConnError::Closed(wsframe::close_code(payload))),
                _ => {}
            }
            at += head.total_len();
        }
        buf.drain(..at);
        *buf = read_more(&mut stream, std::mem::take(buf)).await?;
    }
}

/// Sends a close frame and waits (at most a second) for the server's close or EOF, so the
/// server closes the TCP connection first and the TIME_WAIT stays on its side.
async fn close_gracefully(
    mut stream: TcpStream,
    buf: &mut Vec<u8>,
    frame: &mut Vec<u8>,
    key: [u8; 4],
) {
    frame.clear();
    wsframe::write_close(frame, 1000, key);
    let (r, back) = stream.write_all(std::mem::take(frame)).await;
    *frame = back;
    if r.is_err() {
        return;
    }
    let wait = async {
        loop {
            buf.clear();
            let (r, back) = stream.read(std::mem::take(buf)).await;
            *buf = back;
            match r {
                Ok(0) | Err(_) => return,
                // The close reply is the last frame relay sends; EOF follows.
                Ok(_) => {}
            }
        }
    };
    let _ = monoio::time::timeout(Duration::from_secs(1), wait).await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wsframe::tests::server_frame;

    /// A recorder that keeps everything; also used by the `nats` module's tests.
    #[derive(Default)]
    pub(crate) struct Rec {
        pub(crate) delivered: Vec<(u64, u64)>,
        pub(crate) counts: Vec<(C, u64)>,
        pub(crate) notes: Vec<String>,
    }

    impl Recorder for Rec {
        fn delivered(&mut self, sched_ns: u64, now_ns: u64) {
            self.delivered.push((sched_ns, now_ns));
        }
        fn count(&mut self, c: C, n: u64) {
            self.counts.push((c, n));
        }
        fn note(&mut self, message: String) {
            self.notes.push(message);
        }
    }

    impl Rec {
        pub(crate) fn total(&self, c: C) -> u64 {
            self.counts
                .iter()
                .filter(|(k, _)| *k == c)
                .map(|(_, n)| n)
                .sum()
        }
    }

    fn event(channel: &str, seq: u64, t: u64, pad: usize) -> Vec<u8> {
        let p = "x".repeat(pad);
        let json = format!(
            r#"{{"op":"event","id":"0193f1d2-7a6b-7c3d-8e9f-0123456789ab","channel":"{channel}","type":"lg","seq":{seq},"epoch":"e","ts":1,"data":{{"t":{t},"p":"{p}"}}}}"#
        );
        server_frame(opcode::TEXT, json.as_bytes())
    }

    /// Feeds `stream` to `ws` in pieces of `cut` bytes, as reads would deliver it.
    fn feed_in_pieces(ws: &mut WsSub, stream: &[u8], cut: usize, rec: &mut Rec) {
        let mut buf = Vec::new();
        for piece in stream.chunks(cut) {
            buf.extend_from_slice(piece);
            let fed = ws.feed(&buf, 1_000_000, rec).unwrap();
            if let Some(want) = fed.want {
                assert!(want > buf.len() - fed.consumed);
            }
            buf.drain(..fed.consumed);
        }
        assert!(buf.is_empty(), "{} bytes left", buf.len());
    }

    #[test]
    fn ws_subscriber_counts_across_any_read_boundaries() {
        let mut stream = Vec::new();
        stream.extend(server_frame(
            opcode::TEXT,
            br#"{"op":"welcome","conn":"c1","heartbeat_ms":25000}"#,
        ));
        stream.extend(server_frame(
            opcode::TEXT,
            br#"{"op":"subscribed","channel":"lg.r.0","epoch":"e","seq":0,"recovered":false}"#,
        ));
        for seq in 1..=5 {
            stream.extend(event("lg.r.0", seq, 100 + seq, 10));
        }
        stream.extend(event("lg.r.0", 5, 105, 10)); // duplicate
        stream.extend(event("lg.r.0", 8, 108, 200)); // gap of 2, 16-bit length
        stream.extend(event("lg.r.0", 7, 107, 70_000)); // late, 64-bit length
        stream.extend(event("other", 1, 1, 0)); // not ours
        stream.extend(server_frame(
            opcode::TEXT,
            br#"{"op":"gap","channel":"lg.r.0"}"#,
        ));
        stream.extend(server_frame(opcode::PING, b"hb"));
        for cut in [1usize, 2, 3, 7, 64, 1000, 1 << 20] {
            let mut ws = WsSub::new(vec![ChanSub::new(b"lg.r.0")], 1);
            let mut rec = Rec::default();
            feed_in_pieces(&mut ws, &stream, cut, &mut rec);
            assert!(ws.is_subscribed(), "cut {cut}");
            assert_eq!(rec.total(C::Subscribed), 1);
            assert_eq!(rec.delivered.len(), 7, "cut {cut}");
            assert_eq!(rec.delivered[0], (101, 1_000_000));
            assert_eq!(rec.total(C::Duplicated), 1);
            assert_eq!(rec.total(C::SeqGaps), 2);
            assert_eq!(rec.total(C::OutOfOrder), 1);
            assert_eq!(rec.total(C::Foreign), 1);
            assert_eq!(rec.total(C::GapNotices), 1);
            // The ping was answered with a masked pong carrying its payload.
            assert_eq!(ws.ctrl[0], 0x80 | opcode::PONG);
            assert_eq!(ws.ctrl[1], 0x80 | 2);
            let mut body = ws.ctrl[6..8].to_vec();
            wsframe::apply_mask(&mut body, ws.ctrl[2..6].try_into().unwrap());
            assert_eq!(body, b"hb");
        }
    }

    #[test]
    fn ws_subscriber_starts_after_the_subscribed_seq_and_sees_close() {
        let mut ws = WsSub::new(vec![ChanSub::new(b"a"), ChanSub::new(b"b")], 9);
        let mut out = Vec::new();
        ws.subscribe_frames(&mut out);
        assert_eq!(out[0], 0x81);
        let mut rec = Rec::default();
        let mut stream = server_frame(
            opcode::TEXT,
            br#"{"op":"subscribed","channel":"b","epoch":"e","seq":41,"recovered":false}"#,
        );
        stream.extend(event("b", 42, 1, 0));
        ws.feed(&stream, 5, &mut rec).unwrap();
        assert!(!ws.is_subscribed(), "one of two");
        assert_eq!(rec.total(C::Subscribed), 0);
        assert_eq!(rec.delivered.len(), 1);
        assert_eq!(rec.total(C::SeqGaps), 0);
        let mut stream = server_frame(
            opcode::TEXT,
            br#"{"op":"subscribed","channel":"a","epoch":"e","seq":0,"recovered":false}"#,
        );
        stream.extend(server_frame(opcode::CLOSE, &1013u16.to_be_bytes()));
        stream.extend(event("a", 1, 1, 0)); // after the close: ignored
        let fed = ws.feed(&stream, 5, &mut rec).unwrap();
        assert!(ws.is_subscribed());
        assert_eq!(rec.total(C::Subscribed), 1);
        assert_eq!(ws.closed, Some(Some(1013)));
        assert!(fed.consumed < stream.len());
        assert_eq!(rec.delivered.len(), 1);
        // The close was answered.
        assert_eq!(ws.ctrl[0], 0x80 | opcode::CLOSE);
    }

    #[test]
    fn ws_subscribe_refusal_and_bad_frames_are_errors() {
        let mut ws = WsSub::new(vec![ChanSub::new(b"a")], 1);
        let refused = server_frame(
            opcode::TEXT,
            br#"{"op":"error","code":"forbidden","message":"your token does not allow a"}"#,
        );
        let e = ws.feed(&refused, 0, &mut Rec::default()).unwrap_err();
        assert!(e.to_string().contains("does not allow"), "{e}");
        let mut ws = WsSub::new(vec![ChanSub::new(b"a")], 1);
        let masked = [0x81u8, 0x81, 1, 2, 3, 4, 5];
        assert!(matches!(
            ws.feed(&masked, 0, &mut Rec::default()),
            Err(ConnError::Frame(_))
        ));
        let fragment = [0x01u8, 0x01, b'x'];
        assert!(ws.feed(&fragment, 0, &mut Rec::default()).is_err());
    }

    #[test]
    fn sse_subscriber_parses_blocks_across_reads() {
        let mut text = b"retry: 2000\n\n: keepalive\n\n".to_vec();
        for seq in 1..=3u64 {
            text.extend_from_slice(
                format!(
                    "id: cur{seq}\nevent: lg\ndata: {{\"id\":\"u\",\"channel\":\"lg.s.1\",\"type\":\"lg\",\"seq\":{seq},\"epoch\":\"e\",\"ts\":1,\"data\":{{\"t\":{},\"p\":\"xx\"}}}}\n\n",
                    seq * 10
                )
                .as_bytes(),
            );
        }
        text.extend_from_slice(b"id: cur3\nevent: gap\ndata: {\"channels\":[\"lg.s.1\"]}\n\n");
        text.extend_from_slice(
            b"id: c\r\nevent: lg\r\ndata: {\"channel\":\"lg.s.1\",\"seq\":3,\"data\":{\"t\":1}}\r\n\r\n",
        );
        for cut in [1usize, 5, 17, 4096] {
            let mut sse = SseSub::new(vec![ChanSub::new(b"lg.s.1")]);
            let mut rec = Rec::default();
            let mut buf = Vec::new();
            for piece in text.chunks(cut) {
                buf.extend_from_slice(piece);
                let fed = sse.feed(&buf, 99, &mut rec).unwrap();
                buf.drain(..fed.consumed);
            }
            assert!(buf.is_empty());
            assert_eq!(
                rec.delivered,
                vec![(10, 99), (20, 99), (30, 99)],
                "cut {cut}"
            );
            assert_eq!(rec.total(C::GapNotices), 1);
            assert_eq!(
                rec.total(C::Foreign),
                0,
                "the gap block's data is not an event"
            );
            assert_eq!(rec.total(C::Duplicated), 1, "CRLF block re-sent seq 3");
        }
    }

    #[test]
    fn sse_line_without_end_is_bounded() {
        let mut sse = SseSub::new(vec![ChanSub::new(b"a")]);
        let long = vec![b'x'; MAX_FRAME_BYTES + 1];
        assert!(sse.feed(&long, 0, &mut Rec::default()).is_err());
    }
}
