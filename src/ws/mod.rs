//! WebSocket connections (API.md section 3): after the upgrade, the JSON protocol over RFC 6455.
//!
//! Owns one connection's life: a reading side (frames in, ops handled in order) and a writing
//! side (one vectored write per batch of pending frames, a ping every heartbeat however busy
//! the line, the close handshake), its subscriptions with their recovery state, and its bounded
//! outbound queue.
//! Event frames are the shared bytes the owner shard encoded once; a connection adds nothing
//! per event but a pointer in its queue. A side runs on a task only while it has work; a quiet
//! side parks in the connection's `ConnCtl` (see [`crate::park`]), so an idle connection holds
//! its state and nothing else.
//!
//! Bounds: `limits.outbound_queue_messages` / `limits.outbound_queue_bytes` count live events
//! and replies; replayed events are bounded apart (`max_subscriptions_per_connection` × the
//! largest history, see [`WsConn::recovered`]); past them `limits.slow_consumer` closes with
//! 1013 or drops the oldest events and sends `{"op":"gap",...}`. `limits.max_frame_bytes`
//! bounds frames and messages (1009), `limits.max_subscriptions_per_connection` subscriptions.
//! Must never: write the same event twice or out of order within a channel, grow memory for a
//! client that does not read, or panic on a client's bytes.

pub mod codec;
pub mod protocol;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::buf::IoVecBuf;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
// `writev` comes from AsyncWriteRent; `write_vectored_all` is deliberately not used (see
// `FrameBatch::consume`).
use monoio::net::TcpStream;
use smallvec::SmallVec;

use crate::auth::Principal;
use crate::bus::event::Event;
use crate::bus::{Since, Sink, Subscribed};
use crate::clock::Stamp;
use crate::config::{Config, SlowConsumerPolicy};
use crate::metrics::{ws_close_slot, ShardStats, Transport};
use crate::park::{self, Resume};
use crate::shard::{ConnCtl, Shard};
use codec::{FrameReader, Message};

/// A validated upgrade, ready for the 101.
#[derive(Debug)]
pub struct WsRequest {
    pub accept: String,
    pub principal: Principal,
}

/// Close codes relay sends.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const POLICY: u16 = 1008;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// One write carries at most this many frames (under the kernel's IOV_MAX of 1024) or about
/// this many bytes.
const WRITE_BATCH_FRAMES: usize = 512;
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// How long a closing connection waits for its close frame to leave and the client to answer.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// The shard's receive buffer: one `recv` takes at most this much.
const READ_CHUNK: usize = 64 * 1024;
/// A writer quiet this long gives its buffers back (a busy one keeps them between writes) and
/// parks (see [`crate::park`]).
const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// A chatty reader (messages less than this apart) that heard nothing this long parks; any
/// other reader parks as soon as it has nothing to read.
const PARK_AFTER: Duration = Duration::from_secs(1);

enum Item {
    /// An event frame; `live` false for replays (no latency sample, not counted in the bound).
    Event(Arc<Event>, bool),
    /// A reply, an error, a presence push, a pong.
    Frame(Bytes),
}

enum Held {
    Event(Arc<Event>),
    Push(Bytes),
}

enum Phase {
    /// The owner's answer is on its way; what arrives meanwhile waits here, in order.
    Recovering(Vec<Held>),
    Live,
}

struct Subscription {
    phase: Phase,
    last_seq: u64,
}

/// A connection's subscriptions, sorted by channel: a connection has one or a few, so a
/// sorted vector sized to them (48 bytes each) beats a hash table (a one-entry table takes
/// 212), and a binary search over a few names beats hashing the name; at the bound
/// (`limits.max_subscriptions_per_connection`, 1,024 by default) a lookup is 10 comparisons.
/// The first is kept inline: a delivery to a connection with one subscription then reads no
/// buffer of its own (one cold line fewer), and an idle subscribed connection holds one
/// allocation fewer.
#[derive(Default)]
struct Subscriptions(SmallVec<[(Arc<str>, Subscription); 1]>);

impl Subscriptions {
    fn find(&self, channel: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(name, _)| (**name).cmp(channel))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn contains_key(&self, channel: &str) -> bool {
        self.find(channel).is_ok()
    }

    fn get(&self, channel: &str) -> Option<&Subscription> {
        self.find(channel).ok().map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, channel: &str) -> Option<&mut Subscription> {
        self.find(channel).ok().map(|i| &mut self.0[i].1)
    }

    /// Adds or replaces the subscription to `channel`.
    fn insert(&mut self, channel: Arc<str>, subscription: Subscription) {
        match self.find(&channel) {
            Ok(i) => self.0[i].1 = subscription,
            Err(i) => {
                if self.0.len() == self.0.capacity() {
                    // Doubling from one, not from four: most connections have one.
                    self.0.reserve_exact(self.0.capacity().max(1));
                }
                self.0.insert(i, (channel, subscription));
            }
        }
    }

    /// Removes the subscription to `channel`; its name when there was one.
    fn remove(&mut self, channel: &str) -> Option<Arc<str>> {
        let i = self.find(channel).ok()?;
        let (name, _) = self.0.remove(i);
        if self.0.is_empty() {
            self.0 = SmallVec::new();
        }
        Some(name)
    }

    /// Removes every subscription; their names.
    fn drain(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }
}

#[derive(Default)]
struct Outbound {
    queue: VecDeque<Item>,
    /// Live events and frames queued: what the slow-consumer bound counts.
    counted: usize,
    counted_bytes: usize,
    /// Replayed events queued: not in the bound above (catching up is not being slow), but
    /// bounded by [`max_replayed`].
    replayed: u32,
    subscriptions: Subscriptions,
    /// (channel, first dropped seq, last dropped seq) to announce with `{"op":"gap"}`.
    gaps: Vec<(Arc<str>, u64, u64)>,
    /// The close this connection ends with, once decided.
    close: Option<(u16, &'static str)>,
    /// Replies and pushes (`Item::Frame`) in `queue`: they are written at once, never held
    /// by write pacing (a publisher waiting for its `published` must not wait on pacing).
    frames_queued: u32,
}

/// [`WsConn::close_decided`]. Dropped (its write finished first), it takes its waker back out
/// of the connection: a waker left there would keep the finished writer task's memory (about
/// half a kilobyte) alive for as long as the connection stays idle.
struct CloseDecided<'a> {
    conn: &'a WsConn,
}

impl std::future::Future for CloseDecided<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.conn.out.borrow().close.is_some() {
            std::task::Poll::Ready(())
        } else {
            self.conn.close_waker.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        }
    }
}

impl Drop for CloseDecided<'_> {
    fn drop(&mut self) {
        self.conn.close_waker.set(None);
    }
}

/// One WebSocket connection as the bus and its two tasks see it.
pub struct WsConn {
    pub conn_id: Arc<str>,
    pub user: Arc<str>,
    ctl: Rc<ConnCtl>,
    /// The connection's socket. Both sides use it by number: the reader with `recv` and the
    /// shard's readiness set, the writer through a runtime stream it builds on it while its
    /// task runs (see [`WsConn::lend_stream`]). The writer closes it, last of all.
    socket: RawFd,
    /// Set if the socket was closed early (the runtime could not take it): nothing may use the
    /// number any more.
    socket_lost: Cell<bool>,
    stats: Arc<ShardStats>,
    /// `limits.outbound_queue_messages` and `limits.outbound_queue_bytes`, each a `u32` (past
    /// 4 GiB per connection a bound means nothing), as a connection keeps them for life.
    max_messages: u32,
    max_bytes: u32,
    policy: SlowConsumerPolicy,
    out: RefCell<Outbound>,
    reader_done: Cell<bool>,
    writer_done: Cell<bool>,
    /// The writer, while it waits on a write: woken when a close is decided, so a write to a
    /// client that stopped reading does not hold the connection open.
    close_waker: Cell<Option<std::task::Waker>>,
}

impl WsConn {
    pub fn new(
        ctl: Rc<ConnCtl>,
        stats: Arc<ShardStats>,
        user: Option<&str>,
        config: &Config,
        socket: RawFd,
    ) -> WsConn {
        let conn_id: Arc<str> = Arc::from(format!("{:x}", ctl.id));
        let user = user.map(Arc::from).unwrap_or_else(|| conn_id.clone());
        WsConn {
            conn_id,
            user,
            ctl,
            socket,
            socket_lost: Cell::new(false),
            stats,
            max_messages: u32::try_from(config.limits.outbound_queue_messages.max(1))
                .unwrap_or(u32::MAX),
            max_bytes: u32::try_from(config.limits.outbound_queue_bytes.max(1)).unwrap_or(u32::MAX),
            policy: config.limits.slow_consumer,
            out: RefCell::new(Outbound::default()),
            reader_done: Cell::new(false),
            writer_done: Cell::new(false),
            close_waker: Cell::new(None),
        }
    }

    /// The id this connection's sink has in the shard's local subscriptions.
    pub fn sink_id(&self) -> u64 {
        self.ctl.id
    }

    /// The JWT's user; `None` for a connection without one (its own user).
    pub fn named_user(&self) -> Option<&Arc<str>> {
        (!Arc::ptr_eq(&self.user, &self.conn_id)).then_some(&self.user)
    }

    /// The socket, while it is open.
    fn socket(&self) -> Option<RawFd> {
        (!self.socket_lost.get()).then_some(self.socket)
    }

    /// The socket as a runtime stream, for the writer's task: one at a time, given back with
    /// `into_raw_fd` before the writer parks, or dropped (closing the socket) at its end. An
    /// idle connection so holds no stream at all, only the socket's number. Should the runtime
    /// refuse it (only the epoll driver registers sockets), the socket is closed, and marked so.
    fn lend_stream(&self) -> std::io::Result<TcpStream> {
        // SAFETY: the socket is open (only the writer closes it, at its end), and no other
        // stream owns it now: the writer lends it out once at a time.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(self.socket) };
        let lent = TcpStream::from_std(std_stream);
        if lent.is_err() {
            self.socket_lost.set(true);
        }
        lent
    }

    /// Asks the writer to send this close frame and end the connection (first request wins).
    pub fn close_with(&self, code: u16, reason: &'static str) {
        let mut out = self.out.borrow_mut();
        if out.close.is_none() {
            out.close = Some((code, reason));
        }
        drop(out);
        self.wake_for_close();
    }

    fn wake_for_close(&self) {
        self.ctl.notify();
        // The writer may be held by write pacing, which waits on the connection's waker.
        self.ctl.wake();
        if let Some(waker) = self.close_waker.take() {
            waker.wake();
        }
    }

    /// Resolves once a close is decided.
    fn close_decided(&self) -> CloseDecided<'_> {
        CloseDecided { conn: self }
    }

    fn closing(&self) -> bool {
        self.out.borrow().close.is_some()
    }

    /// Queues a reply or push frame. Frames count toward the bound like live events.
    pub fn send_frame(&self, frame: Bytes) {
        self.queue_frame(frame, VecDeque::push_back);
    }

    /// Queues a heartbeat ping ahead of everything queued: a control frame may go between any
    /// two messages (RFC 6455 5.4), and a ping should measure the client, not the queue.
    fn send_ping(&self, frame: Bytes) {
        self.queue_frame(frame, VecDeque::push_front);
    }

    fn queue_frame(&self, frame: Bytes, push: fn(&mut VecDeque<Item>, Item)) {
        let mut out = self.out.borrow_mut();
        if out.close.is_some() {
            return;
        }
        if self.make_room(&mut out, frame.len()) {
            out.counted += 1;
            out.counted_bytes += frame.len();
            out.frames_queued += 1;
            push(&mut out.queue, Item::Frame(frame));
            self.ctl.notify();
        }
    }

    /// Whether the writer has anything to send.
    fn has_pending(&self) -> bool {
        let out = self.out.borrow();
        !out.queue.is_empty() || !out.gaps.is_empty()
    }

    /// Whether events are queued.
    fn events_pending(&self) -> bool {
        let out = self.out.borrow();
        out.queue.len() > out.frames_queued as usize
    }

    /// Whether replies or pushes are queued (not only events).
    fn replies_pending(&self) -> bool {
        self.out.borrow().frames_queued > 0
    }

    /// Whether the writer has something to send and all of it may wait for write pacing.
    fn only_events_pending(&self) -> bool {
        let out = self.out.borrow();
        !out.queue.is_empty() && out.frames_queued == 0 && out.gaps.is_empty()
    }

    fn enqueue_event(&self, out: &mut Outbound, event: &Arc<Event>, live: bool) {
        if out.close.is_some() {
            return;
        }
        if live {
            if !self.make_room(out, event.ws_frame().len()) {
                return;
            }
            out.counted += 1;
            out.counted_bytes += event.ws_frame().len();
        } else {
            out.replayed += 1;
        }
        out.queue.push_back(Item::Event(event.clone(), live));
        self.ctl.notify();
    }

    /// Applies the slow-consumer policy until `len` more bytes fit; false when the
    /// connection is being closed instead.
    fn make_room(&self, out: &mut Outbound, len: usize) -> bool {
        self.make_room_while(out, |out| {
            out.counted > 0
                && (out.counted >= self.max_messages as usize
                    || out.counted_bytes + len > self.max_bytes as usize)
        })
    }

    /// Applies the slow-consumer policy until `n` more replayed events fit under `max`; false
    /// when the connection is being closed instead.
    fn make_room_for_replay(&self, out: &mut Outbound, n: usize, max: usize) -> bool {
        self.make_room_while(out, |out| out.replayed as usize + n > max)
    }

    /// Applies the slow-consumer policy while `over` holds: each step is counted and drops the
    /// oldest event (`drop_oldest`) or decides the close; false once closing.
    fn make_room_while(&self, out: &mut Outbound, over: impl Fn(&Outbound) -> bool) -> bool {
        while over(out) {
            self.stats.slow_consumer_drops.inc();
            if self.policy == SlowConsumerPolicy::Close || !self.drop_oldest_event(out) {
                out.close = Some((close::TRY_AGAIN_LATER, "slow consumer"));
                self.wake_for_close();
                return false;
            }
        }
        true
    }

    /// Drops the oldest queued event and records the gap; false when no event is queued.
    fn drop_oldest_event(&self, out: &mut Outbound) -> bool {
        let Some(pos) = out.queue.iter().position(|i| matches!(i, Item::Event(..))) else {
            return false;
        };
        let Some(Item::Event(event, live)) = out.queue.remove(pos) else {
            return false;
        };
        if live {
            out.counted -= 1;
            out.counted_bytes -= event.ws_frame().len();
        } else {
            out.replayed -= 1;
        }
        match out.gaps.iter_mut().find(|(c, _, _)| *c == event.channel) {
            Some(gap) => {
                gap.1 = gap.1.min(event.seq);
                gap.2 = gap.2.max(event.seq);
            }
            None => out.gaps.push((event.channel.clone(), event.seq, event.seq)),
        }
        true
    }

    pub fn subscription_count(&self) -> usize {
        self.out.borrow().subscriptions.len()
    }

    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.out.borrow().subscriptions.contains_key(channel)
    }

    /// Starts holding live events for `channel` until [`WsConn::recovered`].
    pub fn begin_subscription(&self, channel: &Arc<str>) {
        self.out.borrow_mut().subscriptions.insert(
            channel.clone(),
            Subscription {
                phase: Phase::Recovering(Vec::new()),
                last_seq: 0,
            },
        );
    }

    /// Forgets `channel`; its name when it was subscribed. What is already queued for it
    /// still goes out, before the `unsubscribed` reply.
    pub fn end_subscription(&self, channel: &str) -> Option<Arc<str>> {
        let mut out = self.out.borrow_mut();
        out.subscriptions.remove(channel)
    }

    /// Forgets every subscription; their names.
    pub fn end_all_subscriptions(&self) -> Vec<Arc<str>> {
        let mut out = self.out.borrow_mut();
        out.subscriptions.drain()
    }

    /// Queues the `subscribed` reply, then the replay, then what arrived meanwhile. The
    /// replay must fit with those still queued under `max_replayed` (see [`max_replayed`]).
    pub fn recovered(
        &self,
        channel: &Arc<str>,
        reply: Bytes,
        answer: &Subscribed,
        since: Option<&Since>,
        max_replayed: usize,
    ) {
        self.send_frame(reply);
        let mut out = self.out.borrow_mut();
        let out = &mut *out;
        let held = match out.subscriptions.get_mut(channel) {
            Some(sub) => match std::mem::replace(&mut sub.phase, Phase::Live) {
                Phase::Recovering(held) => held,
                Phase::Live => Vec::new(),
            },
            None => return,
        };
        let mut last = match since {
            Some(s) if answer.recovered => s.seq,
            _ => answer.seq,
        };
        // The replay is in seq order: what the client has not seen is its tail.
        let unseen = answer.replay.partition_point(|e| e.seq <= last);
        let replay = answer.replay.get(unseen..).unwrap_or_default();
        if !self.make_room_for_replay(out, replay.len(), max_replayed) {
            return;
        }
        for event in replay {
            self.enqueue_event(out, event, false);
        }
        if let Some(event) = replay.last() {
            last = event.seq;
        }
        last = last.max(answer.seq);
        for item in held {
            match item {
                Held::Event(event) if event.seq > last => {
                    last = event.seq;
                    self.enqueue_event(out, &event, true);
                }
                Held::Event(_) => {}
                Held::Push(frame) => {
                    if self.make_room(out, frame.len()) {
                        out.counted += 1;
                        out.counted_bytes += frame.len();
                        out.frames_queued += 1;
                        out.queue.push_back(Item::Frame(frame));
                    }
                }
            }
        }
        if let Some(sub) = out.subscriptions.get_mut(channel) {
            sub.last_seq = last;
        }
    }

    /// Takes the next slice of frames to write; gap announcements go first. Live events are
    /// marked so (see [`FrameBatch::record_delivered`]).
    fn take_batch(&self, batch: &mut FrameBatch) {
        let mut out = self.out.borrow_mut();
        let out = &mut *out;
        for (channel, from, to) in out.gaps.drain(..) {
            batch.push(Frame::Own(protocol::gap_frame(&channel, from, to)));
        }
        while batch.len() < WRITE_BATCH_FRAMES && batch.bytes < WRITE_BATCH_BYTES {
            let Some(item) = out.queue.pop_front() else {
                break;
            };
            match item {
                Item::Event(event, is_live) => {
                    if is_live {
                        out.counted -= 1;
                        out.counted_bytes -= event.ws_frame().len();
                    } else {
                        out.replayed -= 1;
                    }
                    batch.push(Frame::Event(event, is_live));
                }
                Item::Frame(frame) => {
                    out.counted -= 1;
                    out.counted_bytes -= frame.len();
                    out.frames_queued -= 1;
                    batch.push(Frame::Own(frame));
                }
            }
        }
    }
}

impl Sink for WsConn {
    fn offer(&self, event: &Arc<Event>) {
        let mut out = self.out.borrow_mut();
        let out = &mut *out;
        let Some(sub) = out.subscriptions.get_mut(&event.channel) else {
            return;
        };
        match &mut sub.phase {
            Phase::Recovering(held) => {
                if held.len() < self.max_messages as usize {
                    held.push(Held::Event(event.clone()));
                } else {
                    self.stats.slow_consumer_drops.inc();
                    out.close = Some((close::TRY_AGAIN_LATER, "slow consumer"));
                    self.wake_for_close();
                }
            }
            Phase::Live => {
                if event.seq <= sub.last_seq {
                    return;
                }
                sub.last_seq = event.seq;
                self.enqueue_event(out, event, true);
            }
        }
    }

    fn offer_many(&self, events: &[Arc<Event>]) {
        let Some(channel) = events.first().map(|e| &e.channel) else {
            return;
        };
        let mut guard = self.out.borrow_mut();
        let out = &mut *guard;
        let last = match out.subscriptions.get(channel) {
            Some(Subscription {
                phase: Phase::Live,
                last_seq,
            }) => *last_seq,
            Some(_) => {
                // Recovering: rare and short; the one-by-one path holds them in order.
                drop(guard);
                events.iter().for_each(|e| self.offer(e));
                return;
            }
            None => return,
        };
        let mut high = last;
        for event in events {
            if event.seq > high {
                high = event.seq;
                self.enqueue_event(out, event, true);
            }
        }
        if let Some(sub) = out.subscriptions.get_mut(channel) {
            sub.last_seq = high;
        }
    }

    fn push(&self, channel: &Arc<str>, frame: &Bytes) {
        let mut out = self.out.borrow_mut();
        match out.subscriptions.get_mut(channel).map(|s| &mut s.phase) {
            Some(Phase::Recovering(held)) => held.push(Held::Push(frame.clone())),
            Some(Phase::Live) => {
                drop(out);
                self.send_frame(frame.clone());
            }
            None => {}
        }
    }
}

/// One frame of a write: an event's own frame (the `Arc` moved out of the queue, so taking
/// an event for a write touches no reference count), live or a replay, or a reply, push or
/// control frame.
enum Frame {
    Event(Arc<Event>, bool),
    Own(Bytes),
}

impl Frame {
    fn bytes(&self) -> &[u8] {
        match self {
            Frame::Event(event, _) => event.ws_frame(),
            Frame::Own(bytes) => bytes,
        }
    }
}

/// Frames for one vectored write; owns the bytes the iovecs point at.
struct FrameBatch {
    frames: Vec<Frame>,
    iovecs: Vec<libc::iovec>,
    /// The first iovec not yet completely written.
    start: usize,
    bytes: usize,
    /// Bytes written so far.
    sent: usize,
}

impl FrameBatch {
    fn new() -> Self {
        FrameBatch {
            frames: Vec::new(),
            iovecs: Vec::new(),
            start: 0,
            bytes: 0,
            sent: 0,
        }
    }

    fn push(&mut self, frame: Frame) {
        self.bytes += frame.bytes().len();
        self.frames.push(frame);
    }

    fn len(&self) -> usize {
        self.frames.len()
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Points the iovecs at the frames; call after the last push, before the write.
    fn seal(&mut self) {
        self.iovecs.clear();
        self.iovecs.extend(self.frames.iter().map(|f| libc::iovec {
            iov_base: f.bytes().as_ptr() as *mut libc::c_void,
            iov_len: f.bytes().len(),
        }));
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.iovecs.clear();
        self.start = 0;
        self.bytes = 0;
        self.sent = 0;
    }

    /// Counts the live events of a written batch as delivered and records their latency (from
    /// their acceptance to `written_at`). Read from the frames themselves: the events were
    /// just read for the write, where a list of samples of its own was one more buffer, long
    /// cold, touched per write.
    fn record_delivered(&self, stats: &ShardStats, written_at: Instant) -> bool {
        let mut delivered = 0;
        for frame in &self.frames {
            if let Frame::Event(event, true) = frame {
                delivered += 1;
                let ns = written_at
                    .saturating_duration_since(event.accepted_at)
                    .as_nanos();
                stats
                    .route_duration
                    .record_ns(u64::try_from(ns).unwrap_or(u64::MAX));
            }
        }
        if delivered > 0 {
            stats.events_delivered.add(delivered);
        }
        delivered > 0
    }

    /// Whether every byte has been written.
    fn done(&self) -> bool {
        self.start >= self.iovecs.len()
    }

    /// Whether a frame is on the wire in part: nothing else may be framed until it is done.
    fn cut(&self) -> bool {
        self.sent > 0 && !self.done()
    }

    /// Writes what it can without waiting (one `sendmsg`, `MSG_DONTWAIT`); false when the
    /// socket failed.
    fn send_now(&mut self, fd: RawFd) -> bool {
        let iovecs = &self.iovecs[self.start.min(self.iovecs.len())..];
        // SAFETY: an all-zero `msghdr` is valid (no name, no control data).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = iovecs.as_ptr().cast_mut();
        message.msg_iovlen = iovecs.len() as _;
        loop {
            // SAFETY: the iovecs point into `frames`, alive for the call; `fd` is the
            // connection's socket, open while its write half lives.
            let n = unsafe { libc::sendmsg(fd, &message, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            match usize::try_from(n) {
                Ok(n) => {
                    self.consume(n);
                    return true;
                }
                Err(_) => match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return true,
                    _ => return false,
                },
            }
        }
    }

    /// Advances past `written` bytes after a (possibly short) write. monoio 0.2.4's own
    /// `write_vectored_all` gets this wrong (it never moves `iov_base`), so relay drives
    /// `writev` itself.
    fn consume(&mut self, mut written: usize) {
        self.sent += written;
        while written > 0 {
            let Some(iov) = self.iovecs.get_mut(self.start) else {
                return;
            };
            if written >= iov.iov_len {
                written -= iov.iov_len;
                self.start += 1;
            } else {
                iov.iov_base = (iov.iov_base as *mut u8).wrapping_add(written) as *mut libc::c_void;
                iov.iov_len -= written;
                written = 0;
            }
        }
    }
}

// SAFETY: the iovecs point into `frames`, which the batch owns and does not touch while the
// runtime holds it (the write takes the batch by value and gives it back when done).
unsafe impl IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs[self.start.min(self.iovecs.len())..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len().saturating_sub(self.start)
    }
}

/// Serves an upgraded connection until it closes, then unregisters it from the shard. Takes
/// everything by value, so the connection's task is this future alone (see `http::conn`).
/// `early` holds bytes the client sent behind the upgrade request (its first frames).
pub async fn serve(
    shard: Rc<Shard>,
    ctl: Rc<ConnCtl>,
    mut stream: TcpStream,
    request: WsRequest,
    early: Vec<u8>,
) {
    let (shard, ctl) = (&shard, &ctl);
    let config = shard.config();
    let mut head = Vec::with_capacity(256);
    codec::write_101(
        &mut head,
        &request.accept,
        &[("X-Relay-Shard", &shard.id.to_string())],
    );
    let conn = Rc::new(WsConn::new(
        ctl.clone(),
        shard.stats.clone(),
        request.principal.user.as_deref(),
        config,
        stream.as_raw_fd(),
    ));
    protocol::write_welcome(&mut head, &conn.conn_id, config.websocket.heartbeat_ms);
    let (result, _) = stream.write_all(head).await;
    if result.is_err() {
        shard.close_conn(ctl);
        return;
    }
    shard.set_transport(ctl, Transport::Ws);
    shard.user_joined(conn.named_user());

    let writer = Box::new(WriteSide {
        shard: shard.clone(),
        conn: conn.clone(),
        expires_at: Stamp::deadline_of(
            request
                .principal
                .expires_at_s
                .map(crate::auth::expiry_instant),
        ),
        last_write: Stamp::now(),
        next_ping: Stamp::deadline(
            Instant::now() + Duration::from_millis(config.websocket.heartbeat_ms),
        ),
        framing_intact: true,
        unsent: None,
    });
    monoio::spawn(write_side(writer, Some(stream)));
    let conn_socket = conn.socket;
    let session = protocol::Session::new(shard.clone(), conn, request.principal.grants);
    let max = config.limits.max_frame_bytes;
    let side = ReadSide {
        session,
        reader: FrameReader::new(codec::Limits {
            max_frame_bytes: max,
            max_message_bytes: max,
        }),
        input: early,
        last_message: Stamp::NONE,
        chatty: false,
        parked: false,
        in_readiness_set: shard
            .readiness()
            .is_some_and(|readiness| readiness.add(conn_socket, ctl.id).is_ok()),
    };
    // Each side lives on a task of its own while it has work, and parked in the connection's
    // `ConnCtl` (no task) while idle: this future is sized for the upgrade (the request, the
    // stream, the 101's write) and ends here.
    monoio::spawn(read_side(Box::new(side)));
}

/// What the reading side of a connection holds for its whole life.
struct ReadSide {
    /// Also holds the shard and the connection, for both sides of the session.
    session: protocol::Session,
    reader: FrameReader,
    /// Received bytes not yet parsed into whole messages; no buffer at all while idle.
    input: Vec<u8>,
    /// When the client last sent a whole message (the idle timeout counts from here, or from
    /// the connection's start).
    last_message: Stamp,
    /// Whether the last message came within `PARK_AFTER` of the one before: such a client
    /// keeps its reading task through short pauses; any other parks as soon as it is quiet.
    chatty: bool,
    /// Parked, so that it reads first when resumed.
    parked: bool,
    /// The socket is in the shard's readiness set (edge-triggered, for the connection's life):
    /// the set reports whatever arrives after a `recv` that drained it.
    in_readiness_set: bool,
}

impl ReadSide {
    fn shard(&self) -> &Rc<Shard> {
        self.session.shard()
    }

    fn conn(&self) -> &Rc<WsConn> {
        self.session.conn()
    }

    /// Whether the shard's readiness set reports this socket (it stops, should the set fail).
    fn watched(&self) -> bool {
        self.in_readiness_set && self.shard().readiness().is_some()
    }

    /// When the connection is closed as idle (`limits.idle_timeout_s`) unless it speaks.
    fn idle_at(&self) -> Instant {
        let idle = Duration::from_secs(self.shard().config().limits.idle_timeout_s);
        let since = self.last_message.instant();
        since.unwrap_or_else(|| self.conn().ctl.opened_at()) + idle
    }

    /// Notes a whole message from the client, read at `now`.
    fn heard(&mut self, now: Instant) {
        self.chatty = (self.last_message.instant())
            .is_some_and(|last| now.saturating_duration_since(last) < PARK_AFTER);
        self.last_message = Stamp::reading(now);
    }
}

impl Resume for ReadSide {
    fn resume(self: Box<Self>) {
        monoio::spawn(read_side(self));
    }
}

/// How the reading side stopped.
enum Stopped {
    /// The connection ends.
    Closed,
    /// Nothing to do for now: the side parks (see [`crate::park`]).
    Quiet,
}

async fn read_side(mut side: Box<ReadSide>) {
    // Resumed: readable, or its idle deadline came; either way read first.
    let mut receive_first = std::mem::replace(&mut side.parked, false);
    loop {
        match read_loop(&mut side, receive_first).await {
            Stopped::Closed => break,
            Stopped::Quiet => match park_reader(side) {
                Ok(()) => return,
                Err(back) => {
                    side = back;
                    receive_first = true;
                }
            },
        }
    }
    let ReadSide { mut session, .. } = *side;
    let (shard, conn) = (session.shard().clone(), session.conn().clone());
    conn.reader_done.set(true);
    // The writer is waiting for this, or must see the close it was not told of yet.
    conn.wake_for_close();
    conn.ctl.reader_wait_until(|| conn.writer_done.get()).await;

    session.unsubscribe_all();
    shard.user_left(conn.named_user().map(|u| &**u));
    let code = conn.out.borrow().close.map(|(c, _)| c).unwrap_or(1006);
    shard.stats.ws_closes[ws_close_slot(code)].inc();
    shard.close_conn(&conn.ctl);
}

/// Parks a quiet reading side in its `ConnCtl`; its socket's next readiness resumes it (see
/// [`ReadSide::watched`]). Gives it back to read again when the socket was reported readable
/// since the last `recv`, or, when the readiness set does not have the socket, to wait on its
/// task for a while.
fn park_reader(mut side: Box<ReadSide>) -> Result<(), Box<ReadSide>> {
    if !side.watched() {
        side.chatty = true;
        return Err(side);
    }
    let ctl = side.conn().ctl.clone();
    if ctl.is_readable() {
        return Err(side);
    }
    side.parked = true;
    let deadline = side.idle_at();
    side.shard().stats.ws_parked[park::Side::Reader as usize].add(1);
    let waker = park::waker(ctl.id, park::Side::Reader);
    ctl.park_reader(side, deadline, waker);
    Ok(())
}

thread_local! {
    /// The shard's one receive buffer: connections read into it and keep only what they
    /// have not parsed yet, so no connection holds a read buffer while it waits.
    static RECEIVE_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// How a reader's wait on its task ended.
enum Wait {
    Readable,
    TimedOut,
    Failed,
}

/// Waits on the reader's task until the socket is readable or `until`. Through the readiness
/// set; should the set not have the socket, through a runtime stream on a copy of the socket,
/// held for this wait only (the writer may hold the socket's own stream).
async fn wait_readable(side: &ReadSide, until: Instant) -> Wait {
    let ctl = &side.conn().ctl;
    if side.watched() {
        return match ctl.readable_or_timeout(until).await {
            true => Wait::Readable,
            false => Wait::TimedOut,
        };
    }
    let Some(socket) = side.conn().socket() else {
        return Wait::Failed;
    };
    // SAFETY: plain syscall on the open socket; the copy is owned by the stream below.
    let copy = unsafe { libc::dup(socket) };
    if copy < 0 {
        return Wait::Failed;
    }
    // SAFETY: `copy` is a fresh descriptor nothing else owns.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(copy) };
    let Ok(stream) = TcpStream::from_std(std_stream) else {
        return Wait::Failed;
    };
    monoio::select! {
        ready = stream.readable(false) => match ready {
            Ok(()) => Wait::Readable,
            Err(_) => Wait::Failed,
        },
        _ = ctl.readable_or_timeout(until) => Wait::TimedOut,
    }
}

/// What a [`receive`] found.
enum Received {
    /// Everything the socket had (possibly nothing: readiness reported early). The readiness
    /// set reports only what arrives after this (edge-triggered).
    Drained,
    /// A whole receive buffer: there may be more.
    More,
    /// The peer hung up, or the socket failed.
    Gone,
}

/// Reads what the socket has (without blocking) onto `input`, at most one receive buffer.
/// Forgets an earlier readiness report first: whatever arrives from now on is reported anew.
fn receive(conn: &WsConn, input: &mut Vec<u8>) -> Received {
    let Some(fd) = conn.socket() else {
        return Received::Gone;
    };
    conn.ctl.expect_readable();
    RECEIVE_BUFFER.with_borrow_mut(|buf| loop {
        // SAFETY: `buf` is valid for writes of its length, and `fd` is the connection's socket,
        // open until the writer's end, which waits for the reader's.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        match usize::try_from(n) {
            Ok(0) => return Received::Gone,
            Ok(n) => {
                input.extend_from_slice(buf.get(..n).unwrap_or_default());
                return match n < buf.len() {
                    true => Received::Drained,
                    false => Received::More,
                };
            }
            Err(_) => match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Received::Drained,
                _ => return Received::Gone,
            },
        }
    })
}

async fn read_loop(side: &mut ReadSide, mut receive_first: bool) -> Stopped {
    loop {
        let mut drained = true;
        if receive_first {
            match receive(side.session.conn(), &mut side.input) {
                Received::Drained => {}
                Received::More => drained = false,
                Received::Gone => {
                    // Gone without a close frame: 1006, and the writer must stop too.
                    side.conn().close_with(1006, "");
                    return Stopped::Closed;
                }
            }
        }
        receive_first = true;
        // One clock reading per read: when its messages arrived (their publishes' acceptance
        // time and `ts`), and "now" for the idle check below, which a late reading can only
        // delay, never bring forward.
        let now = Instant::now();
        // Everything complete in the buffer first.
        loop {
            match side.reader.read(&side.input) {
                Ok((used, decoded)) => {
                    side.input.drain(..used);
                    match decoded {
                        codec::Decoded::Partial => break,
                        codec::Decoded::Message(message) => {
                            side.heard(now);
                            if let Message::Text(text) = &message {
                                if side.session.publish_at_once(text, now) {
                                    continue;
                                }
                            }
                            let handled = handle_message(&mut side.session, message, now);
                            if !Box::pin(handled).await {
                                return Stopped::Closed;
                            }
                        }
                    }
                }
                Err(e) => {
                    side.conn().close_with(e.close_code(), e.reason());
                    return Stopped::Closed;
                }
            }
        }
        // Publishes started from this read have all been sent on together; their replies
        // go out before the connection waits for more.
        side.session.settle().await;
        if side.conn().closing() {
            return Stopped::Closed;
        }
        if !drained {
            continue;
        }
        if side.input.is_empty() && side.input.capacity() > 0 {
            side.input = Vec::new();
        }
        let idle_at = side.idle_at();
        if now >= idle_at {
            side.conn().close_with(close::NORMAL, "idle timeout");
            return Stopped::Closed;
        }
        if !side.chatty {
            return Stopped::Quiet;
        }
        // A chatty client: wait on readiness here for a while before parking. Waiting on
        // readiness rather than with a read in flight is what lets a quiet connection lend the
        // kernel no buffer.
        let park_at = now + PARK_AFTER;
        match wait_readable(side, idle_at.min(park_at)).await {
            Wait::Readable => {}
            Wait::TimedOut => side.chatty = false,
            Wait::Failed => {
                side.conn().close_with(1006, "");
                return Stopped::Closed;
            }
        }
    }
}

/// Handles one complete message, read at `arrived`; false when the connection must end.
async fn handle_message(
    session: &mut protocol::Session,
    message: Message,
    arrived: Instant,
) -> bool {
    if let Message::Text(text) = message {
        session.shard().stats.ws_messages_received.inc();
        session.handle(text, arrived).await;
        return true;
    }
    // A close in particular must not overtake the replies to publishes sent before it.
    session.settle().await;
    let conn = session.conn();
    match message {
        // Handled above, where the session may be borrowed mutably.
        Message::Text(_) => true,
        Message::Binary(_) => {
            conn.close_with(close::UNSUPPORTED, "binary frames are not supported");
            false
        }
        Message::Ping(payload) => {
            let mut frame = Vec::with_capacity(payload.len() + 2);
            codec::write_pong(&mut frame, &payload);
            conn.send_frame(Bytes::from(frame));
            true
        }
        Message::Pong(_) => true,
        Message::Close(received) => {
            // Echo the client's code (RFC 6455 5.5.1); no code means a normal close.
            let code = received.map(|(code, _)| code).unwrap_or(close::NORMAL);
            let code = if matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                code
            } else {
                close::NORMAL
            };
            conn.close_with(code, "");
            false
        }
    }
}

/// What the writing side of a connection holds for its whole life (parked or not: its times
/// are 8-byte stamps).
struct WriteSide {
    shard: Rc<Shard>,
    conn: Rc<WsConn>,
    /// When the client's token expires (`NONE`: it does not), counted on the monotonic clock
    /// from the upgrade, so that no write has to read the wall clock to check it.
    expires_at: Stamp,
    /// When the last write finished: pacing and releasing buffers count from here.
    last_write: Stamp,
    /// When the next heartbeat ping is due. Pings go out every `websocket.heartbeat_ms` however
    /// busy the connection is: a client that only listens speaks only to answer them, and
    /// without them it would be closed as idle (`limits.idle_timeout_s`) while receiving.
    next_ping: Stamp,
    /// False once a write was cut mid-frame: nothing more can be framed after it.
    framing_intact: bool,
    /// What a write done at once (see [`WriteSide::write_at_once`]) left for the task: replies
    /// and pushes only, so no latency samples.
    unsent: Option<Box<FrameBatch>>,
}

impl Resume for WriteSide {
    fn resume(mut self: Box<Self>) {
        if self.write_at_once() {
            let ctl = self.conn.ctl.clone();
            if ctl.may_park_writer() {
                ctl.set_timer(Some(self.wake_at(false)));
                self.shard.stats.ws_parked[park::Side::Writer as usize].add(1);
                ctl.park_writer(self);
                return;
            }
        }
        monoio::spawn(write_side(self, None));
    }
}

impl WriteSide {
    fn last_write(&self) -> Instant {
        self.last_write.instant().unwrap_or_else(Instant::now)
    }

    /// When a quiet writer must run again: a heartbeat ping, the token's expiry, and while
    /// `streaming`, the release of its buffers.
    fn wake_at(&self, streaming: bool) -> Instant {
        let mut wake_at = self.next_ping.instant().unwrap_or_else(Instant::now);
        if streaming {
            wake_at = wake_at.min(self.last_write() + RELEASE_AFTER);
        }
        if let Some(expires_at) = self.expires_at.instant() {
            wake_at = wake_at.min(expires_at);
        }
        wake_at
    }

    /// Whether a heartbeat ping is due or the token has expired (the task acts on both).
    fn ping_or_expiry_due(&self, now: Instant) -> bool {
        let now = Stamp::reading(now);
        self.next_ping.passed_by(now) || self.expires_at.passed_by(now)
    }

    /// Queues a heartbeat ping when one is due by `now`; true when it did.
    fn ping_if_due(&mut self, now: Instant) -> bool {
        if !self.next_ping.passed_by(Stamp::reading(now)) {
            return false;
        }
        let mut ping = Vec::with_capacity(2);
        codec::write_ping(&mut ping, b"");
        self.conn.send_ping(Bytes::from(ping));
        let heartbeat = Duration::from_millis(self.shard.config().websocket.heartbeat_ms);
        self.next_ping = Stamp::deadline(now + heartbeat);
        true
    }

    /// A parked writer is mostly woken for a reply or a push that its idle socket takes at
    /// once: writes it here, with one non-blocking `sendmsg`, so that it needs no task (whose
    /// allocation would cost more than the write; a burst of subscribes would otherwise hold a
    /// task per connection at once). True when it did and nothing else is left to do; false
    /// leaves the rest to the task: a full socket, a close, a ping, and events, which tasks
    /// write through the ring, batched and paced, for a fraction of a `sendmsg` each (measured:
    /// fan-out of 1.6 M deliveries/s written here saturated the core, through tasks it took 89%).
    fn write_at_once(&mut self) -> bool {
        let conn = &self.conn;
        let now = Instant::now();
        if conn.closing()
            || conn.ctl.is_closing()
            || !self.framing_intact
            || self.unsent.is_some()
            || self.ping_or_expiry_due(now)
            || conn.events_pending()
        {
            return false;
        }
        conn.ctl.clear_notified();
        let mut batch = FrameBatch::new();
        // No events are queued, so there are no latency samples to record.
        conn.take_batch(&mut batch);
        if batch.is_empty() {
            return true;
        }
        batch.seal();
        if !batch.send_now(conn.socket) {
            conn.close_with(1006, "");
            return false;
        }
        if !batch.done() {
            self.unsent = Some(Box::new(batch));
            return false;
        }
        self.last_write = Stamp::now();
        conn.out.borrow_mut().queue.shrink_to(0);
        !conn.has_pending()
    }
}

/// Runs the writing side until it parks or the connection ends. `stream` is the socket's
/// runtime stream when the upgrade hands it over; a resumed writer borrows it anew.
async fn write_side(mut side: Box<WriteSide>, stream: Option<TcpStream>) {
    let conn = side.conn.clone();
    conn.ctl.set_timer(None);
    let lent = stream.map_or_else(|| conn.lend_stream(), Ok);
    let mut stream = match lent {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(
                conn = conn.ctl.id,
                "the runtime refused the socket ({e}); closed"
            );
            conn.close_with(1006, "");
            conn.writer_done.set(true);
            conn.ctl.wake_reader();
            return;
        }
    };
    if let Stopped::Quiet = write_loop(&mut side, &mut stream).await {
        // Every write has completed (only a close cancels one), so nothing else holds the
        // stream and the socket goes back to being a number.
        let _ = stream.into_raw_fd();
        side.shard.stats.ws_parked[park::Side::Writer as usize].add(1);
        conn.ctl.clone().park_writer(side);
        return;
    }
    drop(side);
    // The close frame, held back by `send_close`, leaves with this FIN. Let the client answer
    // the close (or hang up) briefly, then end both directions.
    // SAFETY: the socket is open: `stream` owns it.
    unsafe {
        libc::shutdown(conn.socket, libc::SHUT_WR);
    }
    // The reader wakes this wait when it is done; the shard's connection timer ends it.
    let deadline = Instant::now() + CLOSE_LINGER;
    conn.ctl.set_timer(Some(deadline));
    conn.ctl
        .wait_until(|| conn.reader_done.get() || Instant::now() >= deadline)
        .await;
    conn.ctl.set_timer(None);
    if !conn.reader_done.get() {
        // The client neither answered nor hung up: end the reading side too, which then
        // finds the socket hung up.
        // SAFETY: as above.
        unsafe {
            libc::shutdown(conn.socket, libc::SHUT_RDWR);
        }
        conn.ctl.wait_until(|| conn.reader_done.get()).await;
    }
    // The reader is done with the socket: close it.
    drop(stream);
    conn.writer_done.set(true);
    conn.ctl.wake_reader();
}

/// Writes what is queued until the connection closes, or until it is quiet and parks.
async fn write_loop(side: &mut WriteSide, stream: &mut TcpStream) -> Stopped {
    let (shard, conn) = (side.shard.clone(), side.conn.clone());
    let config = shard.config();
    let spread_ms = config.shutdown.close_spread_ms;
    let mut batch = side
        .unsent
        .take()
        .map_or_else(FrameBatch::new, |unsent| *unsent);
    // Whether the writer has written live events since it last gave its buffers back.
    let mut wrote_live = false;
    loop {
        if conn.closing() {
            let close = conn.out.borrow().close;
            if let (Some((code, reason)), true) = (close, side.framing_intact && !batch.cut()) {
                // What was queued before the close goes first (RFC 6455 7.1.2 lets an endpoint
                // finish sending): above all the replies to what a client sent before its own
                // close. Not to a client too slow to read its queue.
                let flushed = code == close::TRY_AGAIN_LATER
                    || (batch.is_empty() && !conn.has_pending())
                    || Box::pin(flush_before_close(stream, &conn, batch)).await;
                if flushed {
                    Box::pin(send_close(stream, code, reason)).await;
                }
            }
            return Stopped::Closed;
        }
        // Closing (a drain): everything goes out at once, as it would without pacing.
        if batch.is_empty() && conn.only_events_pending() && !conn.ctl.is_closing() {
            let now = Instant::now();
            if let Some(due) = shard.pacer.due(side.last_write(), now) {
                // Wrote a moment ago on a busy shard: let more events join the next write.
                shard.pacer.hold(&conn.ctl, due);
                let ctl = &conn.ctl;
                ctl.wait_until(|| conn.closing() || ctl.is_closing() || Instant::now() >= due)
                    .await;
                continue;
            }
        }
        if batch.is_empty() {
            // A publisher's `published` goes after the deliveries of what it published (see
            // `Shard::local_deliveries_first`). Only a writer with replies waits: one that
            // waited whenever a publish was under way would take its next event right after
            // the deliverer, past write pacing, and fan-out fell behind at half its rate.
            if conn.replies_pending() {
                shard.local_deliveries_first().await;
            }
            conn.take_batch(&mut batch);
            batch.seal();
        }
        if !batch.is_empty() {
            let outcome;
            // Boxed: inline, the write's state would add ~380 bytes to every connection's
            // writer future for good; one allocation per `writev` (which carries every pending
            // frame) costs well under 1% of the syscall.
            (outcome, batch) = Box::pin(write_all(stream, batch, &conn)).await;
            match outcome {
                Written::All => {}
                Written::Failed => {
                    conn.close_with(1006, "");
                    return Stopped::Closed;
                }
                Written::Abandoned => {
                    // Part of a frame may be on the wire: nothing more can be framed after it.
                    side.framing_intact = false;
                    batch.clear();
                    continue;
                }
            }
            let written_at = Instant::now();
            side.last_write = Stamp::reading(written_at);
            wrote_live |= batch.record_delivered(&shard.stats, written_at);
            batch.clear();
            // A writer that always has more to write never reaches the quiet checks below:
            // its pings and its token's expiry are checked here, on the write's own reading.
            if side.expires_at.passed_by(side.last_write) {
                conn.close_with(close::POLICY, "token expired");
            } else {
                side.ping_if_due(written_at);
            }
            continue;
        }
        if conn.ctl.is_closing() {
            // Draining: spread the going-away closes so clients do not all reconnect at once.
            // A multiplicative hash of the connection id spreads closes evenly over the window.
            let delay = match spread_ms {
                0 => 0,
                spread => conn.ctl.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) % spread,
            };
            // Boxed: a timer held inline would make every connection's future 640 bytes
            // larger for a wait that happens once, at shutdown.
            Box::pin(monoio::time::sleep(Duration::from_millis(delay))).await;
            conn.close_with(close::GOING_AWAY, "server shutting down");
            continue;
        }
        let now = Instant::now();
        if side.expires_at.passed_by(Stamp::reading(now)) {
            conn.close_with(close::POLICY, "token expired");
            continue;
        }
        // Nothing to write. A writer that wrote live events lately keeps its buffers for
        // `RELEASE_AFTER` (the next event is likely near); one that wrote only replies, or has
        // been quiet that long, gives them back and parks: an idle connection holds no write
        // buffers and no task.
        let streaming =
            wrote_live && now.saturating_duration_since(side.last_write()) < RELEASE_AFTER;
        if !streaming {
            batch = FrameBatch::new();
            wrote_live = false;
            conn.out.borrow_mut().queue.shrink_to(0);
        }
        if side.ping_if_due(now) {
            continue;
        }
        // Woken by a frame to write, a close, or the shard's connection timer (no timer of
        // our own: see `ConnCtl::set_timer`).
        conn.ctl.set_timer(Some(side.wake_at(streaming)));
        if !streaming && conn.ctl.may_park_writer() {
            // The timer stays set and resumes the parked side.
            return Stopped::Quiet;
        }
        conn.ctl.wait().await;
        conn.ctl.set_timer(None);
    }
}

enum Written {
    All,
    Failed,
    /// A close was decided while the client was not taking the bytes.
    Abandoned,
}

/// Writes the whole batch with `writev`, resuming after short writes, unless a close is
/// decided meanwhile (then the write is cancelled; the runtime keeps the batch alive until the
/// kernel lets go of it).
async fn write_all(
    stream: &mut TcpStream,
    mut batch: FrameBatch,
    conn: &WsConn,
) -> (Written, FrameBatch) {
    while !batch.done() {
        monoio::select! {
            (result, returned) = stream.writev(batch) => {
                batch = returned;
                match result {
                    Ok(0) => return (Written::Failed, batch),
                    Ok(n) => batch.consume(n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return (Written::Failed, batch),
                }
            }
            _ = conn.close_decided() => return (Written::Abandoned, FrameBatch::new()),
        }
    }
    (Written::All, batch)
}

/// Writes `batch` and everything still queued, for at most `CLOSE_LINGER` (nothing more is
/// queued once a close is decided). False when that failed or ran out of time: a frame may be
/// cut on the wire, and no close frame can follow it.
async fn flush_before_close(stream: &mut TcpStream, conn: &WsConn, mut batch: FrameBatch) -> bool {
    let deadline = Instant::now() + CLOSE_LINGER;
    // Latency samples of the events in it are not recorded: the connection is ending.
    loop {
        if batch.is_empty() {
            conn.take_batch(&mut batch);
            batch.seal();
            if batch.is_empty() {
                return true;
            }
        }
        while !batch.done() {
            let left = deadline.saturating_duration_since(Instant::now());
            match monoio::time::timeout(left, stream.writev(batch)).await {
                Ok((Ok(n), returned)) if n > 0 => {
                    batch = returned;
                    batch.consume(n);
                }
                Ok((Err(e), returned)) if e.kind() == std::io::ErrorKind::Interrupted => {
                    batch = returned;
                }
                _ => return false,
            }
        }
        batch.clear();
    }
}

/// Sends the close frame. The caller shuts the socket's sending side down as soon as this
/// returns, and relies on it: the frame is queued with `MSG_MORE`, so the kernel holds it
/// until that FIN and sends both in one segment. On loopback every segment costs both ends a
/// pass through TCP (a close handshake is five of them; this makes it four).
async fn send_close(stream: &mut TcpStream, code: u16, reason: &str) {
    if code == 1006 {
        return;
    }
    let mut frame = Vec::with_capacity(4 + reason.len());
    codec::write_close(&mut frame, code, reason);
    // SAFETY: `stream` owns the open socket and `frame` outlives the call.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    // An error or a full socket buffer (a client that stopped reading) leaves the frame, or
    // its rest, to a write that waits, briefly: do not wait for such a client forever.
    let sent = usize::try_from(sent).unwrap_or(0);
    if sent < frame.len() {
        frame.drain(..sent);
        let _ = monoio::time::timeout(CLOSE_LINGER, stream.write_all(frame)).await;
    }
}

/// The replayed events a connection may have queued: full histories for the most
/// subscriptions it may hold (and no more than the node retains). Only a client that
/// re-subscribes with `since` and reads nothing gets past it.
pub fn max_replayed(config: &Config) -> usize {
    let largest_history = config
        .channels
        .iter()
        .filter_map(|rule| rule.history_size)
        .fold(config.history.size, usize::max);
    config
        .limits
        .max_subscriptions_per_connection
        .max(1)
        .saturating_mul(largest_history)
        .min(config.history.max_events)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, seq: u64) -> Arc<Event> {
        crate::bus::event::testing::event(channel, seq, "t")
    }

    fn conn(config: &Config) -> WsConn {
        let ctl = Rc::new(ConnCtl::new(0x2a, "127.0.0.1:1".parse().unwrap(), false));
        WsConn::new(ctl, Arc::new(ShardStats::new(0)), None, config, -1)
    }

    /// What the writer would send, as (kind, channel or op, seq).
    fn drain(conn: &WsConn) -> Vec<String> {
        let mut batch = FrameBatch::new();
        conn.take_batch(&mut batch);
        batch
            .frames
            .iter()
            .map(|f| {
                let v: serde_json::Value =
                    serde_json::from_slice(&f.bytes()[2..]).unwrap_or_default();
                match v["op"].as_str() {
                    Some("event") => {
                        format!("event {} {}", v["channel"].as_str().unwrap_or(""), v["seq"])
                    }
                    Some("gap") => format!(
                        "gap {} {}-{}",
                        v["channel"].as_str().unwrap_or(""),
                        v["from_seq"],
                        v["to_seq"]
                    ),
                    Some(op) => op.to_string(),
                    None => "?".into(),
                }
            })
            .collect()
    }

    fn answer(seq: u64, recovered: bool, replay: Vec<Arc<Event>>) -> Subscribed {
        Subscribed {
            epoch: crate::bus::event::Epoch::new("e").expect("a valid epoch"),
            seq,
            recovered,
            replay,
        }
    }

    /// Subscribes `c` to channel `a` from seq 0, recovering events 1..=`events` after `reply`.
    fn subscribe_with_replay(c: &WsConn, reply: Bytes, events: u64) {
        subscribe_with_replay_under(c, reply, events, usize::MAX);
    }

    fn subscribe_with_replay_under(c: &WsConn, reply: Bytes, events: u64, max_replayed: usize) {
        let a: Arc<str> = Arc::from("a");
        c.begin_subscription(&a);
        let replay: Vec<Arc<Event>> = (1..=events).map(|s| event("a", s)).collect();
        let since = Since {
            epoch: "e".into(),
            seq: 0,
        };
        c.recovered(
            &a,
            reply,
            &answer(events, true, replay),
            Some(&since),
            max_replayed,
        );
    }

    /// Subscribes `c` to `channel` without `since` (nothing to replay), after `reply`.
    fn subscribe_live(c: &WsConn, channel: &str, reply: Bytes) -> Arc<str> {
        let channel: Arc<str> = Arc::from(channel);
        c.begin_subscription(&channel);
        let answer = answer(0, false, Vec::new());
        c.recovered(&channel, reply, &answer, None, usize::MAX);
        channel
    }

    fn reply(op: &str) -> Bytes {
        protocol::Reply::new(op, None).finish().unwrap_or_default()
    }

    #[test]
    fn the_reply_comes_first_then_replay_then_what_arrived_meanwhile() {
        let c = conn(&Config::default());
        let a: Arc<str> = Arc::from("a");
        c.begin_subscription(&a);
        c.offer(&event("a", 3));
        c.push(&a, &reply("presence.join"));
        c.offer(&event("a", 4));
        let since = Since {
            epoch: "e".into(),
            seq: 1,
        };
        c.recovered(
            &a,
            reply("subscribed"),
            &answer(3, true, vec![event("a", 2), event("a", 3)]),
            Some(&since),
            usize::MAX,
        );
        c.offer(&event("a", 4));
        c.offer(&event("a", 5));
        assert_eq!(
            drain(&c),
            [
                "subscribed",
                "event a 2",
                "event a 3",
                "presence.join",
                "event a 4",
                "event a 5"
            ]
        );
        assert_eq!(
            c.out.borrow().counted,
            0,
            "the bound's count returns to zero"
        );
    }

    #[test]
    fn a_run_of_events_is_taken_in_order_once_and_only_events_may_wait() {
        let c = conn(&Config::default());
        let a: Arc<str> = Arc::from("a");
        c.begin_subscription(&a);
        // Recovering: the run is held like single offers, in order.
        c.offer_many(&[event("a", 2), event("a", 3)]);
        c.recovered(
            &a,
            reply("subscribed"),
            &answer(2, false, Vec::new()),
            None,
            usize::MAX,
        );
        assert!(
            !c.only_events_pending(),
            "a reply is queued: it goes at once"
        );
        assert_eq!(drain(&c), ["subscribed", "event a 3"]);
        // Live: what was already delivered (seq <= 3) is skipped, the rest kept in order.
        c.offer_many(&[event("a", 3), event("a", 4), event("a", 5)]);
        assert!(c.only_events_pending(), "events alone may wait for pacing");
        c.offer(&event("a", 5));
        c.offer_many(&[event("a", 6)]);
        assert_eq!(drain(&c), ["event a 4", "event a 5", "event a 6"]);
        assert!(!c.only_events_pending(), "nothing queued");
        c.send_frame(reply("pong"));
        assert!(!c.only_events_pending());
        assert_eq!(drain(&c), ["pong"]);
        assert_eq!(c.out.borrow().frames_queued, 0);
    }

    #[monoio::test(enable_timer = true)]
    async fn a_plain_publish_is_answered_at_once_and_anything_else_is_left_to_handle() {
        let config = Arc::new(Config::default());
        let registry = crate::registry::control::initial_registry(&config, 1).unwrap();
        let shard = Shard::new(
            0,
            Arc::new(crate::shard::Shared::new(config.clone(), 1, registry)),
        );
        let c = Rc::new(conn(&config));
        let grants = crate::auth::Principal::open().grants;
        let mut session = protocol::Session::new(shard.clone(), c.clone(), grants);
        let now = Instant::now();
        let text = |s: &str| Bytes::copy_from_slice(s.as_bytes());

        let publish = r#"{"op":"publish","ref":7,"channel":"a","type":"t","data":{"n":1}}"#;
        assert!(session.publish_at_once(&text(publish), now));
        assert_eq!(drain(&c), ["published"]);
        assert_eq!(shard.stats.ws_messages_received.get(), 1);

        // Refused (no channel): answered at once too, with the error.
        let refused = r#"{"op":"publish","channel":"","type":"t","data":1}"#;
        assert!(session.publish_at_once(&text(refused), now));
        assert_eq!(drain(&c), ["error"]);

        for other in [
            r#"{"op":"subscribe","channel":"a"}"#,
            r#"{"op":"publish","channel":"a\u0062","type":"t","data":1}"#,
            "not json",
        ] {
            assert!(!session.publish_at_once(&text(other), now), "{other}");
        }
        assert!(drain(&c).is_empty(), "nothing done for what goes to handle");
        assert_eq!(shard.stats.ws_messages_received.get(), 2);
    }

    #[test]
    fn events_of_other_channels_and_after_unsubscribe_are_ignored() {
        let c = conn(&Config::default());
        subscribe_live(&c, "a", reply("subscribed"));
        c.offer(&event("b", 1));
        c.offer(&event("a", 1));
        assert!(c.end_subscription("a").is_some());
        c.offer(&event("a", 2));
        assert_eq!(drain(&c), ["subscribed", "event a 1"]);
    }

    #[test]
    fn drop_oldest_drops_events_not_replies_and_reports_the_range() {
        let mut config = Config::default();
        config.limits.outbound_queue_messages = 4;
        config.limits.slow_consumer = SlowConsumerPolicy::DropOldest;
        let c = conn(&config);
        subscribe_live(&c, "a", reply("subscribed"));
        for seq in 1..=8 {
            c.offer(&event("a", seq));
        }
        assert_eq!(
            drain(&c),
            [
                "gap a 1-5",
                "subscribed",
                "event a 6",
                "event a 7",
                "event a 8"
            ]
        );
        assert_eq!(c.stats.slow_consumer_drops.get(), 5);
        assert!(c.out.borrow().close.is_none());
    }

    #[test]
    fn close_policy_closes_with_1013_and_stops_queueing() {
        let mut config = Config::default();
        config.limits.outbound_queue_messages = 3;
        let c = conn(&config);
        subscribe_live(&c, "a", reply("subscribed"));
        for seq in 1..=10 {
            c.offer(&event("a", seq));
        }
        assert_eq!(
            c.out.borrow().close,
            Some((close::TRY_AGAIN_LATER, "slow consumer"))
        );
        assert_eq!(c.out.borrow().queue.len(), 3);
        c.send_frame(reply("pong"));
        assert_eq!(
            c.out.borrow().queue.len(),
            3,
            "nothing more is queued once closing"
        );
    }

    /// Subscribes `c` to `a` with a replay of 1..=`events` and unsubscribes, `rounds` times.
    fn resubscribe(c: &WsConn, config: &Config, events: u64, rounds: usize) {
        for _ in 0..rounds {
            subscribe_with_replay_under(c, reply("subscribed"), events, max_replayed(config));
            c.end_subscription("a");
        }
    }

    #[test]
    fn replays_are_bounded_apart_from_the_queue() {
        let mut config = Config::default();
        config.limits.max_subscriptions_per_connection = 2;
        config.history.size = 50;
        assert_eq!(max_replayed(&config), 100);
        let c = conn(&config);
        resubscribe(&c, &config, 50, 2);
        assert_eq!(c.out.borrow().replayed, 100);
        assert!(c.out.borrow().close.is_none(), "two full replays fit");
        drain(&c);
        assert_eq!(
            c.out.borrow().replayed,
            0,
            "written replays leave the count"
        );
        resubscribe(&c, &config, 50, 3);
        assert_eq!(
            c.out.borrow().close,
            Some((close::TRY_AGAIN_LATER, "slow consumer")),
            "replays past the bound are a slow consumer"
        );
        assert!(c.out.borrow().replayed <= 100);
    }

    #[test]
    fn drop_oldest_makes_room_for_a_replay_with_a_gap() {
        let mut config = Config::default();
        config.limits.max_subscriptions_per_connection = 1;
        config.history.size = 50;
        config.limits.slow_consumer = SlowConsumerPolicy::DropOldest;
        let c = conn(&config);
        resubscribe(&c, &config, 50, 2);
        let out = c.out.borrow();
        assert!(out.close.is_none());
        assert_eq!(
            out.replayed, 50,
            "the first replay made room for the second"
        );
        assert_eq!(out.gaps.len(), 1, "{:?}", out.gaps);
        assert_eq!((out.gaps[0].1, out.gaps[0].2), (1, 50));
    }

    #[test]
    fn the_replay_bound_follows_the_largest_history_and_the_node_budget() {
        let mut config = Config::default();
        assert_eq!(max_replayed(&config), 1024 * 1000);
        config.channels.push(crate::config::ChannelRule {
            pattern: "big.*".into(),
            history_size: Some(4000),
            ..Default::default()
        });
        assert_eq!(max_replayed(&config), 1024 * 4000);
        config.history.max_events = 10_000;
        assert_eq!(max_replayed(&config), 10_000);
    }

    #[test]
    fn a_long_replay_is_not_a_slow_consumer() {
        let mut config = Config::default();
        config.limits.outbound_queue_messages = 4;
        let c = conn(&config);
        subscribe_with_replay(&c, reply("subscribed"), 50);
        assert!(c.out.borrow().close.is_none());
        assert_eq!(c.out.borrow().queue.len(), 51);
    }

    #[test]
    fn the_byte_bound_holds() {
        let mut config = Config::default();
        config.limits.slow_consumer = SlowConsumerPolicy::DropOldest;
        let one = event("a", 1).ws_frame().len();
        config.limits.outbound_queue_bytes = one * 3;
        let c = conn(&config);
        subscribe_live(&c, "a", Bytes::new());
        for seq in 1..=20 {
            c.offer(&event("a", seq));
        }
        assert!(c.out.borrow().counted_bytes <= one * 3);
    }

    #[test]
    fn short_writes_resume_exactly_where_they_stopped() {
        let mut batch = FrameBatch::new();
        for part in [&b"abc"[..], b"defgh", b"ij"] {
            batch.push(Frame::Own(Bytes::copy_from_slice(part)));
        }
        batch.seal();
        let remaining = |b: &FrameBatch| -> Vec<u8> {
            let iovs =
                unsafe { std::slice::from_raw_parts(b.read_iovec_ptr(), b.read_iovec_len()) };
            iovs.iter()
                .flat_map(|v| unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                })
                .copied()
                .collect()
        };
        batch.consume(2);
        assert_eq!(remaining(&batch), b"cdefghij");
        batch.consume(3);
        assert_eq!(remaining(&batch), b"fghij");
        assert_eq!(batch.read_iovec_len(), 2);
        batch.consume(5);
        assert!(batch.done());
        assert_eq!(batch.read_iovec_len(), 0);
    }

    #[test]
    fn a_write_that_finished_first_leaves_no_waker_behind() {
        use std::future::Future;
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let c = conn(&Config::default());
        let task = Arc::new(Noop);
        let waker = std::task::Waker::from(task.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut wait = Box::pin(c.close_decided());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            Arc::strong_count(&task),
            3,
            "the connection holds the task's waker"
        );
        // The write won the select: the wait is dropped, and with it the connection's waker
        // (else the finished task's memory stays alive as long as the connection).
        drop(wait);
        assert_eq!(Arc::strong_count(&task), 2);
        // A decided close still resolves it.
        c.close_with(1000, "");
        assert!(Box::pin(c.close_decided())
            .as_mut()
            .poll(&mut cx)
            .is_ready());
    }

    #[test]
    fn a_written_batch_records_its_live_events_only() {
        let c = conn(&Config::default());
        subscribe_with_replay(&c, reply("subscribed"), 2);
        c.offer(&event("a", 3));
        c.offer_many(&[event("a", 4), event("a", 5)]);
        let mut batch = FrameBatch::new();
        c.take_batch(&mut batch);
        assert_eq!(
            batch.len(),
            6,
            "the reply, two replays and three live events"
        );
        let stats = ShardStats::new(0);
        assert!(batch.record_delivered(&stats, Instant::now()));
        assert_eq!(stats.events_delivered.get(), 3);
        assert_eq!(stats.route_duration.snapshot().count, 3);
    }

    #[test]
    fn writes_go_out_in_bounded_batches() {
        let c = conn(&Config::default());
        subscribe_with_replay(&c, Bytes::new(), 1500);
        let mut batch = FrameBatch::new();
        c.take_batch(&mut batch);
        assert_eq!(batch.len(), WRITE_BATCH_FRAMES);
        batch.seal();
        assert_eq!(batch.read_iovec_len(), WRITE_BATCH_FRAMES);
        let stats = ShardStats::new(0);
        assert!(
            !batch.record_delivered(&stats, Instant::now()),
            "replays are not latency samples"
        );
        assert_eq!(stats.events_delivered.get(), 0);
    }

    #[test]
    fn receive_says_when_the_socket_may_hold_more_and_forgets_readiness_reports() {
        use std::io::Write;
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let config = Config::default();
        let ctl = Rc::new(ConnCtl::new(7, "127.0.0.1:1".parse().unwrap(), false));
        let stats = Arc::new(ShardStats::new(0));
        let conn = WsConn::new(ctl, stats, None, &config, ours.as_raw_fd());
        theirs
            .write_all(&vec![7u8; READ_CHUNK + 100])
            .expect("write");
        let mut input = Vec::new();
        conn.ctl.mark_readable();
        // A full buffer: the socket may hold more, which an edge-triggered set will not report.
        assert!(matches!(receive(&conn, &mut input), Received::More));
        assert_eq!(input.len(), READ_CHUNK);
        assert!(
            !conn.ctl.is_readable(),
            "a receive forgets the report it acts on"
        );
        assert!(matches!(receive(&conn, &mut input), Received::Drained));
        assert_eq!(input.len(), READ_CHUNK + 100);
        // Nothing there (readiness reported early) is drained, not an end.
        assert!(matches!(receive(&conn, &mut input), Received::Drained));
        drop(theirs);
        assert!(matches!(receive(&conn, &mut input), Received::Gone));
        conn.socket_lost.set(true);
        assert!(matches!(receive(&conn, &mut input), Received::Gone));
        assert_eq!(input.len(), READ_CHUNK + 100);
    }

    #[test]
    fn send_now_resumes_a_cut_batch_where_it_stopped() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let small: libc::c_int = 4096;
        // SAFETY: a valid socket and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let frames: Vec<Vec<u8>> = (0..64u8).map(|k| vec![k; 3000]).collect();
        let mut batch = FrameBatch::new();
        for frame in &frames {
            batch.push(Frame::Own(Bytes::from(frame.clone())));
        }
        batch.seal();
        assert!(batch.send_now(ours.as_raw_fd()));
        assert!(
            batch.cut() && !batch.done(),
            "192 KB do not fit a 4 KB send buffer: the batch is cut, sent {}",
            batch.sent
        );
        let expected: Vec<u8> = frames.concat();
        let mut received = vec![0; expected.len()];
        let mut at = 0;
        let mut rounds = 0;
        while at < expected.len() {
            let n = theirs.read(&mut received[at..]).expect("read");
            at += n;
            assert!(batch.send_now(ours.as_raw_fd()));
            rounds += 1;
            assert!(rounds < 100_000, "no progress");
        }
        assert!(batch.done() && !batch.cut());
        assert_eq!(batch.sent, expected.len());
        assert!(received == expected, "every byte once, in order");
    }

    #[test]
    fn subscriptions_stay_sorted_and_sized_to_what_they_hold() {
        let live = |seq| Subscription {
            phase: Phase::Live,
            last_seq: seq,
        };
        let mut subs = Subscriptions::default();
        subs.insert(Arc::from("b"), live(1));
        assert!(!subs.0.spilled(), "one subscription, inline");
        for (name, seq) in [("d", 2), ("a", 3), ("c", 4), ("b", 5)] {
            subs.insert(Arc::from(name), live(seq));
        }
        let names: Vec<&str> = subs.0.iter().map(|(n, _)| &**n).collect();
        assert_eq!(
            names,
            ["a", "b", "c", "d"],
            "sorted, and `b` replaced, not doubled"
        );
        assert_eq!(subs.len(), 4);
        assert_eq!(subs.get("b").map(|s| s.last_seq), Some(5));
        assert!(subs.contains_key("c") && !subs.contains_key("e"));
        if let Some(sub) = subs.get_mut("a") {
            sub.last_seq = 9;
        }
        assert_eq!(subs.get("a").map(|s| s.last_seq), Some(9));
        assert_eq!(subs.remove("c").as_deref(), Some("c"));
        assert_eq!(subs.remove("c"), None);
        assert_eq!(subs.drain().len(), 3);
        assert_eq!(
            (subs.len(), subs.0.spilled()),
            (0, false),
            "no buffer held once empty"
        );
        subs.insert(Arc::from("x"), live(1));
        subs.insert(Arc::from("y"), live(1));
        assert!(subs.0.spilled(), "two subscriptions, a buffer of their own");
        assert_eq!(subs.remove("x").as_deref(), Some("x"));
        assert_eq!(subs.remove("y").as_deref(), Some("y"));
        assert!(!subs.0.spilled(), "given back once empty");
    }
}
