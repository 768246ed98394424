//! Server-Sent Events streams (API.md section 4): subscription, recovery, the outbound queue
//! and the write loop.
//!
//! Owns one stream's per-channel state (recovering or live, last seq), its bounded outbound
//! queue and its cursor. Every event is written as `id: <cursor>\n` followed by the event's
//! shared SSE bytes; the cursor covers every channel of the stream, so a reconnect with
//! `Last-Event-ID` resumes each channel exactly where this client stopped.
//!
//! Bounds: `limits.outbound_queue_messages` and `limits.outbound_queue_bytes` per stream; when
//! either is exceeded `limits.slow_consumer` decides: `close` ends the stream (the client
//! reconnects and recovers from history), `drop_oldest` drops the oldest queued events and
//! sends `event: gap` naming their channels before the next events. Both are counted in
//! `relay_slow_consumer_drops_total`. Must never: let a stalled client grow memory past the
//! bounds, or write an event twice or out of order within a channel.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use crate::bus::event::Event;
use crate::bus::{Since, Sink, Subscribed};
use crate::config::{Config, SlowConsumerPolicy};
use crate::cursor::Cursor;
use crate::glob::GlobSet;
use crate::http::codec::RequestHead;
use crate::metrics::{ShardStats, Transport};
use crate::names;
use crate::query::query_pairs;
use crate::shard::{ConnCtl, Shard};

/// One write carries at most this many events or about this many bytes, so a long replay
/// goes out in slices instead of one buffer the size of the backlog.
const WRITE_BATCH_EVENTS: usize = 512;
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// A write buffer grown past this by a burst or a replay is let go once the queue is empty,
/// so a stream does not keep its largest write for life.
const KEPT_BUFFER_BYTES: usize = 16 * 1024;

/// A validated stream request.
#[derive(Debug)]
pub struct StreamRequest {
    pub channels: Vec<Arc<str>>,
    pub types: Option<GlobSet>,
    pub cursor: Option<Cursor>,
    /// The JWT's `exp` (Unix seconds): the stream ends then, and the client must reconnect
    /// with a fresh token.
    pub expires_at_s: Option<u64>,
}

/// Parses `?channel=A&channel=B&types=glob` and `Last-Event-ID` / `last_event_id`.
pub fn parse_request(config: &Config, head: &RequestHead) -> Result<StreamRequest, String> {
    let mut channels: Vec<Arc<str>> = Vec::new();
    let mut types = Vec::new();
    let mut last_event_id = head.header_str("last-event-id").map(str::to_string);
    for pair in query_pairs(head.query().unwrap_or("")) {
        let (key, value) = pair.map_err(|e| format!("query: {e}"))?;
        match key.as_str() {
            "channel" => {
                for name in value.split(',').filter(|n| !n.is_empty()) {
                    names::validate_channel(name).map_err(|e| e.to_string())?;
                    if !channels.iter().any(|c| &**c == name) {
                        channels.push(Arc::from(name));
                    }
                }
            }
            "types" => types.push(value),
            "last_event_id" => {
                if last_event_id.is_none() {
                    last_event_id = Some(value);
                }
            }
            // Browsers cannot set headers on EventSource; tokens arrive as a parameter.
            "token" => {}
            _ => {
                return Err(format!(
                    "unknown query parameter {key:?} (expected channel, types, last_event_id)"
                ))
            }
        }
    }
    if channels.is_empty() {
        return Err("at least one channel is required: ?channel=NAME".into());
    }
    let max = config.limits.max_channels_per_stream;
    if channels.len() > max {
        return Err(format!(
            "{} channels requested; a stream carries at most {max} (limits.max_channels_per_stream)",
            channels.len()
        ));
    }
    // The client echoes the cursor back in a header: its longest form must fit there.
    let cursor_max = channels
        .iter()
        .map(|c| c.len() + crate::cursor::EPOCH_MAX + 20 + 3)
        .sum::<usize>();
    let header_room = (config.limits.max_header_bytes / 2).min(crate::cursor::MAX_ENCODED_LEN);
    if cursor_max > header_room {
        return Err(format!(
            "these channels make a cursor of up to {cursor_max} bytes, more than the {header_room} a Last-Event-ID header may carry (half of limits.max_header_bytes); use fewer or shorter channels per stream"
        ));
    }
    let cursor = match last_event_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(crate::api::parse_cursor(text)?),
    };
    Ok(StreamRequest {
        channels,
        types: crate::api::parse_types(&types),
        cursor,
        expires_at_s: None,
    })
}

enum Phase {
    /// Waiting for the owner's answer; live events are held here meanwhile.
    Recovering(Vec<Arc<Event>>),
    Live,
}

struct ChannelState {
    name: Arc<str>,
    phase: Phase,
    /// The highest seq queued (or deliberately skipped) on this stream.
    last_seq: u64,
}

struct Outbound {
    channels: Vec<ChannelState>,
    /// With whether the event is live. Replays are bounded by history already and are never
    /// what makes a client "slow", so the bounds count live events only; replays also stay out
    /// of the route-latency histogram.
    queue: VecDeque<(Arc<Event>, bool)>,
    live_count: usize,
    live_bytes: usize,
    /// Channels whose events were dropped: announced with `event: gap` before the next write.
    gaps: Vec<Arc<str>>,
    /// The slow-consumer policy closed the stream.
    overflowed: bool,
}

/// One stream as the bus sees it.
pub struct SseSink {
    ctl: Rc<ConnCtl>,
    stats: Arc<ShardStats>,
    types: Option<GlobSet>,
    max_messages: usize,
    max_bytes: usize,
    policy: SlowConsumerPolicy,
    out: RefCell<Outbound>,
}

impl SseSink {
    fn new(
        ctl: Rc<ConnCtl>,
        stats: Arc<ShardStats>,
        channels: &[Arc<str>],
        types: Option<GlobSet>,
        config: &Config,
    ) -> SseSink {
        SseSink {
            ctl,
            stats,
            types,
            max_messages: config.limits.outbound_queue_messages.max(1),
            max_bytes: config.limits.outbound_queue_bytes.max(1),
            policy: config.limits.slow_consumer,
            out: RefCell::new(Outbound {
                channels: channels
                    .iter()
                    .map(|name| ChannelState {
                        name: name.clone(),
                        phase: Phase::Recovering(Vec::new()),
                        last_seq: 0,
                    })
                    .collect(),
                queue: VecDeque::new(),
                live_count: 0,
                live_bytes: 0,
                gaps: Vec::new(),
                overflowed: false,
            }),
        }
    }

    fn wanted(&self, event: &Event) -> bool {
        self.types
            .as_ref()
            .is_none_or(|types| types.matches(event.event_type()))
    }

    /// Queues one event under the bounds; the slow-consumer policy acts when they are hit.
    fn enqueue(&self, out: &mut Outbound, event: &Arc<Event>, live: bool) {
        let len = event.sse_len();
        while live
            && out.live_count > 0
            && (out.live_count >= self.max_messages || out.live_bytes + len > self.max_bytes)
        {
            self.stats.slow_consumer_drops.inc();
            match self.policy {
                SlowConsumerPolicy::Close => {
                    out.overflowed = true;
                    self.ctl.close();
                    return;
                }
                SlowConsumerPolicy::DropOldest => {
                    let Some((old, old_live)) = out.queue.pop_front() else {
                        break;
                    };
                    if old_live {
                        out.live_count -= 1;
                        out.live_bytes -= old.sse_len();
                    }
                    if !out.gaps.contains(&old.channel) {
                        out.gaps.push(old.channel.clone());
                    }
                }
            }
        }
        if live {
            out.live_count += 1;
            out.live_bytes += len;
        }
        out.queue.push_back((event.clone(), live));
        self.ctl.notify();
    }

    /// Takes the next slice of the queue to write, bounded so one write stays bounded too.
    fn take_batch(&self, out: &mut Outbound, batch: &mut Vec<(Arc<Event>, bool)>) {
        let mut bytes = 0;
        while batch.len() < WRITE_BATCH_EVENTS && bytes < WRITE_BATCH_BYTES {
            let Some((event, live)) = out.queue.pop_front() else {
                break;
            };
            bytes += event.sse_len();
            if live {
                out.live_count -= 1;
                out.live_bytes -= event.sse_len();
            }
            batch.push((event, live));
        }
    }

    /// Lets go of the queue's memory while it is empty (a quiet stream holds no buffer).
    fn release_idle_memory(&self) {
        let mut out = self.out.borrow_mut();
        if out.queue.is_empty() {
            out.queue = VecDeque::new();
        }
        if out.gaps.is_empty() {
            out.gaps = Vec::new();
        }
    }

    /// Applies the owner's answer for one channel: replay, then what arrived meanwhile.
    fn recovered(&self, channel: &Arc<str>, answer: &Subscribed, asked: Option<&Since>) {
        let mut out = self.out.borrow_mut();
        if out.overflowed {
            return;
        }
        let out = &mut *out;
        let Some(index) = out.channels.iter().position(|c| c.name == *channel) else {
            return;
        };
        if asked.is_some() && !answer.recovered {
            out.gaps.push(channel.clone());
            self.ctl.notify();
        }
        let held = match std::mem::replace(&mut out.channels[index].phase, Phase::Live) {
            Phase::Recovering(held) => held,
            Phase::Live => Vec::new(),
        };
        let mut last = match asked {
            Some(since) if answer.recovered => since.seq,
            _ => answer.seq,
        };
        let replayed = answer.replay.iter().map(|e| (e, false));
        for (event, live) in replayed.chain(held.iter().map(|e| (e, true))) {
            if event.seq > last {
                last = event.seq;
                if self.wanted(event) {
                    self.enqueue(out, event, live);
                }
            }
        }
        out.channels[index].last_seq = last.max(answer.seq);
    }
}

impl Sink for SseSink {
    fn offer(&self, event: &Arc<Event>) {
        let mut out = self.out.borrow_mut();
        if out.overflowed {
            return;
        }
        let out = &mut *out;
        let Some(state) = out.channels.iter_mut().find(|c| c.name == event.channel) else {
            return;
        };
        match &mut state.phase {
            Phase::Recovering(held) => {
                if held.len() < self.max_messages {
                    held.push(event.clone());
                } else {
                    // Held events are bounded like the queue; past that the stream is too slow.
                    self.stats.slow_consumer_drops.inc();
                    out.overflowed = true;
                    self.ctl.close();
                }
            }
            Phase::Live => {
                if event.seq <= state.last_seq {
                    return;
                }
                state.last_seq = event.seq;
                if self.wanted(event) {
                    self.enqueue(out, event, true);
                }
            }
        }
    }
}

/// Serves the stream until the client leaves, the shard drains, or the policy closes it, then
/// closes the connection. The stream's own task: the HTTP connection's task has ended.
pub async fn serve(shard: Rc<Shard>, ctl: Rc<ConnCtl>, stream: TcpStream, request: StreamRequest) {
    let expires_at = request.expires_at_s.map(crate::auth::expiry_instant);
    // Boxed: the subscriptions and the answer's head are awaited once, and the future of a
    // stream, which spends its life waiting, need not be sized for them.
    let mut opened = Box::pin(open(&shard, &ctl, stream, request)).await;
    if opened.answered {
        write_loop(
            &shard,
            &ctl,
            &opened.sink,
            &mut opened.write_half,
            &mut opened.cursor,
            expires_at,
        )
        .await;
    }
    // Every channel asked for: one that failed mid-subscribe registered its local sink already.
    for channel in &opened.channels {
        shard.unsubscribe(channel, ctl.id, None);
    }
    // Wakes the reader (its read returns) so the socket closes once both halves are gone.
    // SAFETY: `fd` is the live socket owned by `write_half`, still in scope here.
    unsafe {
        libc::shutdown(opened.fd, libc::SHUT_RDWR);
    }
    shard.close_conn(&ctl);
}

/// A stream once subscribed and answered.
struct Opened {
    sink: Rc<SseSink>,
    cursor: Cursor,
    /// The channels asked for, to unsubscribe at the end.
    channels: Vec<Arc<str>>,
    write_half: monoio::net::tcp::TcpOwnedWriteHalf,
    fd: std::os::fd::RawFd,
    /// Every channel subscribed and the 200 written: events may follow.
    answered: bool,
}

/// Subscribes to every channel, then answers 200 (or 503 when the shard is shutting down),
/// and starts the reader that notices the client leaving.
async fn open(
    shard: &Rc<Shard>,
    ctl: &Rc<ConnCtl>,
    stream: TcpStream,
    request: StreamRequest,
) -> Opened {
    shard.set_transport(ctl, Transport::Sse);
    let config = shard.config();
    let sink = Rc::new(SseSink::new(
        ctl.clone(),
        shard.stats.clone(),
        &request.channels,
        request.types,
        config,
    ));

    // Subscribe before answering: once the client sees 200, nothing published is missed.
    let mut cursor = Cursor::new();
    let mut failed = false;
    for channel in &request.channels {
        let since = request
            .cursor
            .as_ref()
            .and_then(|c| c.get(channel))
            .map(|(epoch, seq)| Since {
                epoch: epoch.to_string(),
                seq,
            });
        match shard
            .subscribe(channel, ctl.id, sink.clone(), since.clone(), None)
            .await
        {
            Ok(answer) => {
                let position = match &since {
                    Some(s) if answer.recovered => s.seq,
                    _ => answer.seq,
                };
                cursor.set(channel, &answer.epoch, position);
                sink.recovered(channel, &answer, since.as_ref());
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }

    let fd = stream.as_raw_fd();
    let (read_half, mut write_half) = stream.into_split();
    let mut head = Vec::with_capacity(512);
    if failed {
        let response = crate::http::Response::error(
            503,
            "shutting_down",
            "the relay is shutting down; reconnect shortly",
        )
        .with_header("Retry-After", "1");
        crate::http::conn::write(&mut head, &response, false, false, shard.id);
        let _ = write_half.write_all(head).await;
    } else {
        head.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: close\r\n",
        );
        head.extend_from_slice(format!("X-Relay-Shard: {}\r\n\r\n", shard.id).as_bytes());
        head.extend_from_slice(format!("retry: {}\n\n", config.sse.retry_ms).as_bytes());
        let (result, _) = write_half.write_all(head).await;
        failed = result.is_err();
    }

    // A reader notices the client leaving; our writes alone would only notice on the next event.
    let reader_ctl = ctl.clone();
    monoio::spawn(async move {
        let mut read_half = read_half;
        let mut scratch = Vec::with_capacity(64);
        loop {
            let (result, returned) = read_half.read(scratch).await;
            scratch = returned;
            scratch.clear();
            match result {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        reader_ctl.close();
    });

    Opened {
        sink,
        cursor,
        channels: request.channels,
        write_half,
        fd,
        answered: !failed,
    }
}

async fn write_loop(
    shard: &Rc<Shard>,
    ctl: &Rc<ConnCtl>,
    sink: &Rc<SseSink>,
    write_half: &mut monoio::net::tcp::TcpOwnedWriteHalf,
    cursor: &mut Cursor,
    expires_at: Option<Instant>,
) {
    // Allocated by the first event: a stream that never gets one holds no write buffer.
    let mut buf: Vec<u8> = Vec::new();
    let keepalive = Duration::from_secs(shard.config().sse.keepalive_s.max(1));
    let mut last_write = Instant::now();
    let mut batch: Vec<(Arc<Event>, bool)> = Vec::new();
    loop {
        let only_events = {
            let out = sink.out.borrow();
            !out.queue.is_empty() && out.gaps.is_empty() && !out.overflowed
        };
        // Closing (a drain): everything goes out at once, as it would without pacing.
        if only_events && !ctl.is_closing() {
            if let Some(due) = shard.pacer.due(last_write, Instant::now()) {
                // Wrote a moment ago on a busy shard: let more events join the next write.
                shard.pacer.hold(ctl, due);
                ctl.wait_until(|| ctl.is_closing() || Instant::now() >= due)
                    .await;
                continue;
            }
        }
        buf.clear();
        {
            let mut out = sink.out.borrow_mut();
            if out.overflowed {
                return;
            }
            if !out.gaps.is_empty() {
                buf.extend_from_slice(b"id: ");
                cursor.encode_into(&mut buf);
                buf.extend_from_slice(b"\nevent: gap\ndata: {\"channels\":[");
                for (i, channel) in out.gaps.drain(..).enumerate() {
                    if i > 0 {
                        buf.push(b',');
                    }
                    buf.push(b'"');
                    buf.extend_from_slice(channel.as_bytes());
                    buf.push(b'"');
                }
                buf.extend_from_slice(b"]}\n\n");
            }
            sink.take_batch(&mut out, &mut batch);
        }
        for (event, _) in &batch {
            cursor.set(&event.channel, &event.epoch, event.seq);
            buf.extend_from_slice(b"id: ");
            cursor.encode_into(&mut buf);
            buf.push(b'\n');
            event.write_sse(&mut buf);
        }
        if buf.is_empty() && last_write.elapsed() >= keepalive {
            // Quiet for a whole keepalive: from here until its next event the stream holds
            // no buffer of its own.
            buf = Vec::new();
            batch = Vec::new();
            sink.release_idle_memory();
            if write_unless_overflowed(write_half, ctl, sink, KEEPALIVE)
                .await
                .is_none()
            {
                return;
            }
            last_write = Instant::now();
            continue;
        }
        if !buf.is_empty() {
            match write_unless_overflowed(write_half, ctl, sink, buf).await {
                Some(returned) => buf = returned,
                None => return,
            }
            last_write = Instant::now();
            if !batch.is_empty() {
                let now = Instant::now();
                let stats = &shard.stats;
                stats.events_delivered.add(batch.len() as u64);
                for (event, _) in batch.iter().filter(|(_, live)| *live) {
                    let ns = now.saturating_duration_since(event.accepted_at).as_nanos();
                    stats
                        .route_duration
                        .record_ns(u64::try_from(ns).unwrap_or(u64::MAX));
                }
                batch.clear();
            }
            // A stream that always has more to write never reaches the quiet wait below: its
            // token's expiry is checked after every write as well.
            if expires_at.is_some_and(|at| last_write >= at) {
                return;
            }
            continue;
        }
        if ctl.is_closing() {
            return;
        }
        if buf.capacity() > KEPT_BUFFER_BYTES {
            buf = Vec::new();
        }
        let mut wake_at = last_write + keepalive;
        if let Some(expires_at) = expires_at {
            if Instant::now() >= expires_at {
                return;
            }
            wake_at = wake_at.min(expires_at);
        }
        // The shard's connection timers wake it: a monoio sleep would add 640 bytes to every
        // stream's future, and they tick often enough (250 ms apart at most) for a keepalive.
        ctl.set_timer(Some(wake_at));
        ctl.wait().await;
        ctl.set_timer(None);
        if ctl.is_closing() && sink.out.borrow().queue.is_empty() {
            return;
        }
    }
}

const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Writes `data` unless the slow-consumer policy closes the stream first: a client that stopped
/// reading must not hold the stream open once the policy gave up on it. (A drain lets the
/// write finish; the drain deadline bounds it.) `None` when the stream must end. Boxed, so
/// that the future of every stream, mostly waiting, is not sized for a write.
async fn write_unless_overflowed<B: monoio::buf::IoBuf + 'static>(
    write_half: &mut monoio::net::tcp::TcpOwnedWriteHalf,
    ctl: &ConnCtl,
    sink: &SseSink,
    data: B,
) -> Option<B> {
    Box::pin(async {
        monoio::select! {
            (result, returned) = write_half.write_all(data) => result.ok().map(|_| returned),
            _ = ctl.wait_until(|| sink.out.borrow().overflowed) => None,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, seq: u64, event_type: &str) -> Arc<Event> {
        crate::bus::event::testing::event(channel, seq, event_type)
    }

    fn sink(channels: &[&str], config: &Config, types: Option<GlobSet>) -> SseSink {
        let channels: Vec<Arc<str>> = channels.iter().map(|c| Arc::from(*c)).collect();
        let ctl = Rc::new(ConnCtl::new(1, "127.0.0.1:1".parse().unwrap(), false));
        SseSink::new(ctl, Arc::new(ShardStats::new(0)), &channels, types, config)
    }

    fn queued(sink: &SseSink) -> Vec<(String, u64)> {
        sink.out
            .borrow()
            .queue
            .iter()
            .map(|(e, _)| (e.channel.to_string(), e.seq))
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

    #[test]
    fn replay_comes_before_events_that_arrived_meanwhile_without_duplicates() {
        let sink = sink(&["a"], &Config::default(), None);
        // Live events arrive while the owner's answer is on its way, one already in the replay.
        sink.offer(&event("a", 3, "t"));
        sink.offer(&event("a", 4, "t"));
        let since = Since {
            epoch: "e".into(),
            seq: 1,
        };
        sink.recovered(
            &Arc::from("a"),
            &answer(3, true, vec![event("a", 2, "t"), event("a", 3, "t")]),
            Some(&since),
        );
        sink.offer(&event("a", 4, "t"));
        sink.offer(&event("a", 5, "t"));
        let seqs: Vec<u64> = queued(&sink).into_iter().map(|(_, s)| s).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        assert!(sink.out.borrow().gaps.is_empty());
    }

    #[test]
    fn without_since_nothing_old_is_sent() {
        let sink = sink(&["a"], &Config::default(), None);
        sink.offer(&event("a", 7, "t"));
        sink.recovered(&Arc::from("a"), &answer(7, false, Vec::new()), None);
        sink.offer(&event("a", 8, "t"));
        assert_eq!(queued(&sink), vec![("a".to_string(), 8)]);
    }

    #[test]
    fn an_unrecoverable_since_announces_a_gap_then_goes_live() {
        let sink = sink(&["a", "b"], &Config::default(), None);
        let since = Since {
            epoch: "old".into(),
            seq: 1,
        };
        sink.recovered(&Arc::from("a"), &answer(9, false, Vec::new()), Some(&since));
        sink.recovered(&Arc::from("b"), &answer(0, false, Vec::new()), None);
        assert_eq!(sink.out.borrow().gaps, vec![Arc::<str>::from("a")]);
        sink.offer(&event("a", 10, "t"));
        sink.offer(&event("b", 1, "t"));
        assert_eq!(
            queued(&sink),
            vec![("a".to_string(), 10), ("b".to_string(), 1)]
        );
    }

    #[test]
    fn type_filter_skips_but_still_advances() {
        let types = Some(GlobSet::new(["doc.*"]));
        let sink = sink(&["a"], &Config::default(), types);
        sink.recovered(&Arc::from("a"), &answer(0, false, Vec::new()), None);
        sink.offer(&event("a", 1, "other"));
        sink.offer(&event("a", 2, "doc.edit"));
        sink.offer(&event("a", 1, "other"));
        assert_eq!(queued(&sink), vec![("a".to_string(), 2)]);
    }

    #[test]
    fn drop_oldest_keeps_the_bound_and_marks_a_gap() {
        let mut config = Config::default();
        config.limits.outbound_queue_messages = 3;
        config.limits.slow_consumer = SlowConsumerPolicy::DropOldest;
        let sink = sink(&["a"], &config, None);
        sink.recovered(&Arc::from("a"), &answer(0, false, Vec::new()), None);
        for seq in 1..=10 {
            sink.offer(&event("a", seq, "t"));
        }
        let seqs: Vec<u64> = queued(&sink).into_iter().map(|(_, s)| s).collect();
        assert_eq!(seqs, vec![8, 9, 10]);
        assert_eq!(sink.out.borrow().gaps, vec![Arc::<str>::from("a")]);
        assert_eq!(sink.stats.slow_consumer_drops.get(), 7);
        assert!(!sink.ctl.is_closing());
    }

    #[test]
    fn close_policy_closes_at_the_bound_and_stops_queueing() {
        let mut config = Config::default();
        config.limits.outbound_queue_messages = 3;
        let sink = sink(&["a"], &config, None);
        sink.recovered(&Arc::from("a"), &answer(0, false, Vec::new()), None);
        for seq in 1..=10 {
            sink.offer(&event("a", seq, "t"));
        }
        assert!(sink.ctl.is_closing());
        assert!(sink.out.borrow().overflowed);
        assert_eq!(queued(&sink).len(), 3);
        assert_eq!(sink.stats.slow_consumer_drops.get(), 1);
    }

    #[test]
    fn the_byte_bound_holds_too() {
        let mut config = Config::default();
        config.limits.slow_consumer = SlowConsumerPolicy::DropOldest;
        let one = event("a", 1, "t").sse_len();
        config.limits.outbound_queue_bytes = one * 2 + 1;
        let sink = sink(&["a"], &config, None);
        sink.recovered(&Arc::from("a"), &answer(0, false, Vec::new()), None);
        for seq in 1..=5 {
            sink.offer(&event("a", seq, "t"));
        }
        assert_eq!(queued(&sink).len(), 2);
        assert!(sink.out.borrow().live_bytes <= one * 2 + 1);
    }

    fn head(target: &str, last_event_id: Option<&str>) -> RequestHead {
        let mut raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n");
        if let Some(id) = last_event_id {
            raw.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        raw.push_str("\r\n");
        match crate::http::codec::parse_head(raw.as_bytes(), &Default::default()) {
            Ok(crate::http::codec::Parsed::Complete(h)) => h,
            other => panic!("test request did not parse: {other:?}"),
        }
    }

    #[test]
    fn stream_requests_are_validated() {
        let config = Config::default();
        let ok = parse_request(
            &config,
            &head("/s?channel=a&channel=b,c&channel=a&types=doc.*", None),
        )
        .unwrap();
        assert_eq!(ok.channels.len(), 3);
        assert!(ok.types.is_some());
        let with_cursor = parse_request(&config, &head("/s?channel=a", Some("a~e~3"))).unwrap();
        assert_eq!(with_cursor.cursor.unwrap().get("a"), Some(("e", 3)));
        let by_param =
            parse_request(&config, &head("/s?channel=a&last_event_id=a~e~4", None)).unwrap();
        assert_eq!(by_param.cursor.unwrap().get("a"), Some(("e", 4)));
        for (target, needle) in [
            ("/s", "at least one channel"),
            ("/s?channel=a%20b", "channel"),
            ("/s?channel=a&nope=1", "unknown query parameter"),
            ("/s?channel=a&last_event_id=%%%", "query"),
        ] {
            let err = parse_request(&config, &head(target, None)).unwrap_err();
            assert!(err.contains(needle), "{target}: {err}");
        }
        let err = parse_request(&config, &head("/s?channel=a", Some("garbage"))).unwrap_err();
        assert!(err.contains("Last-Event-ID"), "{err}");
    }
}
