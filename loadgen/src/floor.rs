//! The loopback floor (`relay-floor`): what this machine's kernel allows for a scenario's
//! shape with no relay in the way, so that relay's figures can be read against a ceiling.
//!
//! Owns one measurement inside one process: a *sink* thread that does only what any relay
//! has to do (read publishes, then write each channel's new events to every subscriber socket
//! of that channel, all the events a channel got since its last write in one write, with no
//! copy per subscriber) and a *driver* thread that publishes on an open-loop schedule and
//! reads the deliveries. Both use real loopback TCP sockets, and each can be pinned to its own
//! CPU. Messages are fixed-size binary records of the sizes relay's own messages have: no
//! HTTP, no WebSocket, no JSON, no allocation per event. Latency runs from each event's
//! scheduled send time to its arrival, as in relay-loadgen (no coordinated omission).
//!
//! Must never: connect anywhere but its own listener on 127.0.0.1, hold more than
//! `max_backlog_bytes` for a subscriber that cannot keep up (the rest is counted as dropped),
//! or run past its plan plus the drain bound of each step.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;

use crate::cli::set;
use crate::clock::{clock_ns, mono_ns, secs_to_ns, Ramp, Schedule, TimerFd};
use crate::error::LoadgenError;
use crate::floor_connect::ConnectFloorOptions;
use crate::net;
use crate::stats::{bump, get, new_histogram, Percentiles};

/// Bytes at the start of every message: the scheduled send time (ns, little endian), the
/// channel, and a marker that catches a framing mistake.
pub const HEADER_BYTES: usize = 16;
const MARKER: [u8; 4] = *b"flr1";
/// The timer's token in the driver's epoll set (subscribers use their index).
const TIMER_TOKEN: u64 = u64::MAX;
/// Driver epoll tokens from here up are publisher sockets (their acks), below are subscribers.
const PUBLISHER_TOKEN_BASE: u64 = 1 << 32;
/// How long the sink sleeps in one wait when it has nothing to do, so it sees the stop flag.
const SINK_IDLE_WAIT_MS: i32 = 10;
/// The sink's read buffer (one, for every publisher) and the driver's.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The scenario shapes of relay-loadgen the floor reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// 1 channel, 1,000 subscribers, a rising rate.
    Fanout,
    /// 100 subscribers on 10 channels, 10 publishers, 5,000 events/s.
    Latency,
    /// 5,000 subscribers on 5,000 channels, 4 publishers, 20,000 events/s.
    Channels,
}

/// What one floor run does.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorOptions {
    pub shape: Shape,
    pub subscribers: usize,
    pub channels: usize,
    pub publishers: usize,
    /// Events per second of each step, in order.
    pub rates: Vec<u64>,
    pub step_s: f64,
    /// Bytes the sink writes per delivered event (relay's WebSocket frame of an event with
    /// 100 bytes of `data` is about 250).
    pub frame_bytes: usize,
    /// Bytes the driver writes per publish.
    pub publish_bytes: usize,
    /// The sink writes a channel's events at most once per this many microseconds (0: as soon
    /// as it has read them), like relay's write pacing.
    pub hold_us: u64,
    /// Bytes the sink answers each publish with (0: no answer). relay answers every publish
    /// (HTTP `202` with its `results`, or a WebSocket `published`), about 150 bytes; the
    /// floor without it is the floor of fire-and-forget publishing.
    pub ack_bytes: usize,
    /// Cache lines of its own state the sink reads and writes per delivery, one after the
    /// other (each line's address is read from the line before), scattered over
    /// `subscribers × touch_lines` lines of memory (0: none). relay keeps per-event state that
    /// the floor does not (a connection's, a channel's, its runtime's); this prices it: how
    /// far does touching that many lines out of the caches move the floor?
    pub touch_lines: usize,
    pub sink_cpu: Option<usize>,
    pub driver_cpu: Option<usize>,
    /// Both threads poll without sleeping (each takes its whole core), so no wake-up from
    /// an idle CPU is in the path.
    pub spin: bool,
    /// The ramp stops after a step with a p99 above this, or with any event lost.
    pub stop_p99_ms: f64,
    /// After a step's last publish, how long to wait for its deliveries.
    pub drain_ms: u64,
    /// Bytes the sink keeps for one subscriber whose socket is full; past it, events are
    /// dropped and counted.
    pub max_backlog_bytes: usize,
}

impl FloorOptions {
    /// The shape's numbers, as relay-loadgen's scenario of the same name has them.
    pub fn new(shape: Shape) -> FloorOptions {
        let (subscribers, channels, publishers, rates, step_s) = match shape {
            Shape::Fanout => (1000, 1, 2, vec![250, 500, 1000, 2000, 3500], 5.0),
            Shape::Latency => (100, 10, 10, vec![5000], 10.0),
            Shape::Channels => (5000, 5000, 4, vec![20000], 10.0),
        };
        FloorOptions {
            shape,
            subscribers,
            channels,
            publishers,
            rates,
            step_s,
            frame_bytes: 250,
            publish_bytes: 200,
            hold_us: 0,
            ack_bytes: 0,
            touch_lines: 0,
            sink_cpu: None,
            driver_cpu: None,
            spin: false,
            stop_p99_ms: 100.0,
            drain_ms: 2000,
            max_backlog_bytes: 4 << 20,
        }
    }

    pub fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |m: String| Err(LoadgenError::Config(m));
        if self.subscribers == 0 || self.channels == 0 || self.publishers == 0 {
            return bad("--subscribers, --channels and --publishers must be at least 1".into());
        }
        if self.channels > self.subscribers {
            return bad(format!(
                "--channels {} is more than --subscribers {}: a channel would have nobody",
                self.channels, self.subscribers
            ));
        }
        if self.frame_bytes < HEADER_BYTES || self.publish_bytes < HEADER_BYTES {
            return bad(format!(
                "--frame-bytes and --publish-bytes must be at least {HEADER_BYTES} (the header)"
            ));
        }
        if self.rates.is_empty() || self.rates.contains(&0) {
            return bad("every rate must be at least 1 event/s".into());
        }
        if self.ack_bytes > READ_BUFFER_BYTES {
            return bad(format!(
                "--ack-bytes must be at most {READ_BUFFER_BYTES}, got {}",
                self.ack_bytes
            ));
        }
        if self.touch_lines > MAX_TOUCH_LINES {
            return bad(format!(
                "--touch-lines must be at most {MAX_TOUCH_LINES}, got {}",
                self.touch_lines
            ));
        }
        if !(self.step_s.is_finite() && self.step_s > 0.0) {
            return bad(format!("--step-s must be above 0, got {}", self.step_s));
        }
        Ok(())
    }

    /// Subscribers of `channel`: subscriber `i` is on channel `i % channels`.
    pub fn subscribers_of(&self, channel: usize) -> u64 {
        let (s, c) = (self.subscribers, self.channels);
        (s / c + usize::from(channel < s % c)) as u64
    }

    /// Two sockets per connection, plus the listener, epolls, timer and std's own.
    fn fds_needed(&self) -> u64 {
        2 * (self.subscribers + self.publishers) as u64 + 64
    }
}

/// `relay-floor`: the command line.
#[derive(Debug, Parser)]
#[command(
    name = "relay-floor",
    version,
    about = "The loopback floor: a minimal sink and driver in one process, over loopback TCP, \
             with a relay-loadgen scenario's shape and no relay. Shows what this machine's \
             kernel allows, so that relay's figures can be read against it. Connects only to \
             its own listener on 127.0.0.1. `relay-floor connect` is instead a minimal \
             WebSocket handshake server (loopback only) for `relay-loadgen connect` to drive."
)]
pub struct FloorCli {
    /// The scenario shape (its defaults are relay-loadgen's for the same scenario), or
    /// `connect`: a minimal WebSocket server for `relay-loadgen connect` (no driver)
    #[arg(value_enum)]
    pub shape: FloorShape,
    /// connect: where to serve handshakes (loopback only) [default: 127.0.0.1:8004]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// connect: connections held at once [default: 19000]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Subscriber sockets (subscriber i on channel i % channels)
    #[arg(long)]
    pub subscribers: Option<usize>,
    #[arg(long)]
    pub channels: Option<usize>,
    /// Publisher sockets
    #[arg(long)]
    pub publishers: Option<usize>,
    /// One fixed rate, events/s
    #[arg(long, conflicts_with = "ramp")]
    pub rate: Option<u64>,
    /// Rate steps START:END:FACTOR [default fanout: 250,500,1000,2000,3500]
    #[arg(long, value_name = "START:END:FACTOR")]
    pub ramp: Option<Ramp>,
    /// Length of each step, seconds [default: 5 for fanout, else 10; connect: the whole run, 30]
    #[arg(long, value_name = "S", alias = "duration-s")]
    pub step_s: Option<f64>,
    /// Bytes written per delivered event [default: 250, relay's frame for 100-byte data]
    #[arg(long)]
    pub frame_bytes: Option<usize>,
    /// Bytes written per publish [default: 200]
    #[arg(long)]
    pub publish_bytes: Option<usize>,
    /// Write a channel's events at most once per this many microseconds; the sink's wait
    /// has millisecond resolution [default: 0]
    #[arg(long, value_name = "US")]
    pub hold_us: Option<u64>,
    /// Answer each publish with this many bytes, after its deliveries, as relay answers every
    /// publish (about 150 bytes) [default: 0, no answer]
    #[arg(long, value_name = "BYTES")]
    pub ack_bytes: Option<usize>,
    /// Read and write this many cache lines of the sink's own state per delivery, scattered
    /// over memory, each found from the one before: prices per-event state like relay's
    /// [default: 0]
    #[arg(long, value_name = "LINES")]
    pub touch_lines: Option<usize>,
    /// Pin the sink (the stand-in for relay) to this CPU
    #[arg(long)]
    pub sink_cpu: Option<usize>,
    /// Pin the driver (the stand-in for the generator) to this CPU
    #[arg(long)]
    pub driver_cpu: Option<usize>,
    /// Poll without sleeping on both sides (each thread takes its whole core)
    #[arg(long)]
    pub spin: bool,
    /// Stop the ramp after a step whose p99 is above this [default: 100]
    #[arg(long, value_name = "MS")]
    pub stop_p99_ms: Option<f64>,
    /// Wait for a step's deliveries after its last publish at most this long [default: 2000]
    #[arg(long, value_name = "MS")]
    pub drain_ms: Option<u64>,
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
}

/// What `relay-floor` is asked to run: a scenario shape, or the handshake server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FloorShape {
    /// 1 channel, 1,000 subscribers, a rising rate
    Fanout,
    /// 100 subscribers on 10 channels, 10 publishers, 5,000 events/s
    Latency,
    /// 5,000 subscribers on 5,000 channels, 4 publishers, 20,000 events/s
    Channels,
    /// A minimal WebSocket handshake server; drive it with `relay-loadgen connect`
    Connect,
}

/// One parsed `relay-floor` command.
#[derive(Debug, Clone)]
pub enum FloorPlan {
    Shape(FloorOptions),
    Connect(ConnectFloorOptions),
}

impl FloorCli {
    /// The plan, and whether to print JSON; an error names the flag.
    pub fn into_plan(self) -> Result<(FloorPlan, bool), LoadgenError> {
        let shape = match self.shape {
            FloorShape::Fanout => Shape::Fanout,
            FloorShape::Latency => Shape::Latency,
            FloorShape::Channels => Shape::Channels,
            FloorShape::Connect => {
                let json = self.json;
                return Ok((FloorPlan::Connect(self.into_connect_options()?), json));
            }
        };
        if self.listen.is_some() || self.max_connections.is_some() {
            return Err(LoadgenError::Config(
                "--listen and --max-connections are for `relay-floor connect` only".into(),
            ));
        }
        let (o, json) = self.into_options_for(shape)?;
        Ok((FloorPlan::Shape(o), json))
    }

    fn into_connect_options(self) -> Result<ConnectFloorOptions, LoadgenError> {
        let shape_only = [
            ("--subscribers", self.subscribers.is_some()),
            ("--channels", self.channels.is_some()),
            ("--publishers", self.publishers.is_some()),
            ("--rate", self.rate.is_some()),
            ("--ramp", self.ramp.is_some()),
            ("--frame-bytes", self.frame_bytes.is_some()),
            ("--publish-bytes", self.publish_bytes.is_some()),
            ("--hold-us", self.hold_us.is_some()),
            ("--ack-bytes", self.ack_bytes.is_some()),
            ("--touch-lines", self.touch_lines.is_some()),
            ("--driver-cpu", self.driver_cpu.is_some()),
            ("--spin", self.spin),
            ("--stop-p99-ms", self.stop_p99_ms.is_some()),
            ("--drain-ms", self.drain_ms.is_some()),
        ];
        if let Some((flag, _)) = shape_only.iter().find(|(_, given)| *given) {
            return Err(LoadgenError::Config(format!(
                "{flag} is not used by `relay-floor connect` (it has no driver:                  relay-loadgen connect is the driver)"
            )));
        }
        let o = ConnectFloorOptions {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8004))),
            duration_s: self.step_s.unwrap_or(30.0),
            sink_cpu: self.sink_cpu,
            max_connections: self.max_connections.unwrap_or(19_000),
        };
        o.validate()?;
        Ok(o)
    }

    fn into_options_for(self, shape: Shape) -> Result<(FloorOptions, bool), LoadgenError> {
        let mut o = FloorOptions::new(shape);
        set(&mut o.subscribers, self.subscribers);
        set(&mut o.channels, self.channels);
        set(&mut o.publishers, self.publishers);
        set(&mut o.frame_bytes, self.frame_bytes);
        set(&mut o.publish_bytes, self.publish_bytes);
        if let Some(rate) = self.rate {
            o.rates = vec![rate];
        }
        if let Some(ramp) = self.ramp {
            o.rates = ramp.steps().map_err(LoadgenError::Config)?;
        }
        set(&mut o.step_s, self.step_s);
        set(&mut o.hold_us, self.hold_us);
        set(&mut o.ack_bytes, self.ack_bytes);
        set(&mut o.touch_lines, self.touch_lines);
        o.sink_cpu = self.sink_cpu;
        o.driver_cpu = self.driver_cpu;
        o.spin = self.spin;
        set(&mut o.stop_p99_ms, self.stop_p99_ms);
        set(&mut o.drain_ms, self.drain_ms);
        o.validate()?;
        Ok((o, self.json))
    }
}

/// Writes the header of a message into the first [`HEADER_BYTES`] of `buf`.
pub fn write_header(buf: &mut [u8], due_ns: u64, channel: u32) {
    buf[..8].copy_from_slice(&due_ns.to_le_bytes());
    buf[8..12].copy_from_slice(&channel.to_le_bytes());
    buf[12..16].copy_from_slice(&MARKER);
}

/// The scheduled time and channel of a message; `None` when its marker is wrong.
pub fn read_header(msg: &[u8]) -> Option<(u64, u32)> {
    if msg.len() < HEADER_BYTES || msg[12..16] != MARKER {
        return None;
    }
    let due = u64::from_le_bytes(msg[..8].try_into().ok()?);
    let channel = u32::from_le_bytes(msg[8..12].try_into().ok()?);
    Some((due, channel))
}

/// Splits a byte stream into fixed-size messages, across reads that cut them anywhere.
#[derive(Debug)]
pub struct Splitter {
    size: usize,
    partial: Vec<u8>,
}

impl Splitter {
    pub fn new(size: usize) -> Splitter {
        Splitter {
            size,
            partial: Vec::new(),
        }
    }

    /// Calls `each` with every message `bytes` completes, in order; keeps the rest.
    pub fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            let take = (self.size - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < self.size {
                return;
            }
            each(&self.partial);
            self.partial.clear();
        }
        let mut chunks = bytes.chunks_exact(self.size);
        for msg in &mut chunks {
            each(msg);
        }
        self.partial.extend_from_slice(chunks.remainder());
    }
}

/// A CPU-time clock of a thread, readable from any thread of the process.
#[derive(Clone, Copy)]
pub(crate) struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    fn of(thread: libc::pthread_t) -> Option<ThreadClock> {
        let mut id: libc::clockid_t = 0;
        // SAFETY: the thread is alive (its JoinHandle is held); id is a valid out pointer.
        (unsafe { libc::pthread_getcpuclockid(thread, &mut id) } == 0).then_some(ThreadClock(id))
    }

    pub(crate) fn current() -> ThreadClock {
        ThreadClock(libc::CLOCK_THREAD_CPUTIME_ID)
    }

    pub(crate) fn ns(self) -> u64 {
        clock_ns(self.0)
    }
}

/// An epoll instance, level-triggered, with a `u64` token per fd.
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; ev is a valid event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ready tokens into `events`; an interrupted wait returns none.
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> io::Result<usize> {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: events is a valid buffer of `max` entries.
        let n =
            unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}

/// The sink's counters: only the sink writes them, the driver reads them between steps.
#[derive(Default)]
struct SinkCounters {
    writes: AtomicU64,
    deliveries_written: AtomicU64,
    dropped: AtomicU64,
}

struct SubscriberOut {
    stream: TcpStream,
    /// What the socket did not take; written before anything newer.
    backlog: Vec<u8>,
}

struct PublisherIn {
    stream: TcpStream,
    splitter: Splitter,
    open: bool,
    /// Ack bytes owed to this publisher, written after the deliveries of what was read.
    acks_owed: usize,
}

/// Pins the calling thread to `cpu` when one is asked for; a refusal ends the run, since
/// figures from an unpinned thread would be read as pinned ones.
pub(crate) fn pin(flag: &str, cpu: Option<usize>) -> Result<(), LoadgenError> {
    match cpu {
        Some(cpu) if !net::pin_to_cpu(cpu) => Err(LoadgenError::Config(format!(
            "{flag} {cpu}: the kernel refused to run the thread there (is that CPU online and \
             in this process's affinity mask?)"
        ))),
        _ => Ok(()),
    }
}

/// Role of a connection, in its first 8 bytes: role (0 subscriber, 1 publisher), channel.
fn hello(role: u32, channel: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&role.to_le_bytes());
    h[4..].copy_from_slice(&channel.to_le_bytes());
    h
}

/// The stand-in for relay: accepts every connection, then reads publishes and writes each
/// channel's new events to its subscribers until told to stop.
fn sink(
    listener: TcpListener,
    o: &FloorOptions,
    stop: &AtomicBool,
    counters: &SinkCounters,
    ready: mpsc::Sender<Result<(), LoadgenError>>,
) {
    if let Err(e) = pin("--sink-cpu", o.sink_cpu) {
        let _ = ready.send(Err(e));
        return;
    }
    let mut subs_of: Vec<Vec<usize>> = vec![Vec::new(); o.channels];
    let mut subs = Vec::with_capacity(o.subscribers);
    let mut pubs = Vec::with_capacity(o.publishers);
    let epoll = match accept_all(&listener, o, &mut subs_of, &mut subs, &mut pubs) {
        Ok(epoll) => {
            let _ = ready.send(Ok(()));
            epoll
        }
        Err(source) => {
            let _ = ready.send(Err(LoadgenError::Floor {
                what: "accept",
                source,
            }));
            return;
        }
    };
    let frame_pad = o.frame_bytes - HEADER_BYTES;
    let hold_ns = o.hold_us * 1000;
    let mut state = ScatteredState::new(o.subscribers, o.touch_lines);
    let mut by_channel: Vec<Vec<u8>> = vec![Vec::new(); o.channels];
    let mut dirty: Vec<usize> = Vec::new();
    let mut backlogged: Vec<usize> = Vec::new();
    let mut first_pending_ns = 0u64;
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let acks = vec![0u8; READ_BUFFER_BYTES];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let timeout_ms = if o.spin {
            0
        } else if !backlogged.is_empty() {
            1
        } else if !dirty.is_empty() {
            let due = first_pending_ns + hold_ns;
            due.saturating_sub(mono_ns()).div_ceil(1_000_000) as i32
        } else {
            SINK_IDLE_WAIT_MS
        };
        let Ok(n) = epoll.wait(&mut events, timeout_ms) else {
            return;
        };
        for ev in &events[..n] {
            let Some(p) = pubs.get_mut(ev.u64 as usize) else {
                continue;
            };
            let mut read = 0;
            read_publisher(p, &mut buf, |msg| {
                read += 1;
                let Some((_, channel)) = read_header(msg) else {
                    return;
                };
                let ch = channel as usize % o.channels;
                let out = &mut by_channel[ch];
                if out.is_empty() {
                    if dirty.is_empty() {
                        first_pending_ns = mono_ns();
                    }
                    dirty.push(ch);
                }
                out.extend_from_slice(&msg[..HEADER_BYTES]);
                out.resize(out.len() + frame_pad, 0);
            });
            p.acks_owed += read * o.ack_bytes;
        }
        if !dirty.is_empty() && (hold_ns == 0 || mono_ns() >= first_pending_ns + hold_ns) {
            for ch in dirty.drain(..) {
                let bytes = &by_channel[ch];
                for &s in &subs_of[ch] {
                    state.touch(s);
                    deliver(&mut subs[s], s, bytes, o, counters, &mut backlogged);
                }
                by_channel[ch].clear();
            }
        }
        backlogged.retain(|&s| !flush_backlog(&mut subs[s], o, counters));
        for p in pubs.iter_mut().filter(|p| p.acks_owed > 0 && p.open) {
            write_acks(p, &acks);
        }
        let publishers_gone = pubs.iter().all(|p| !p.open);
        if stop.load(Ordering::Relaxed) || (publishers_gone && dirty.is_empty()) {
            return;
        }
    }
}

/// Most lines `--touch-lines` may ask for per delivery (with 5,000 subscribers, 312 MiB).
const MAX_TOUCH_LINES: usize = 1024;

/// One cache line of [`ScatteredState`].
#[repr(align(64))]
#[derive(Clone, Copy)]
struct StateLine {
    /// The subscriber's next line, or `usize::MAX` after its last.
    next: usize,
    touched: u64,
}

/// Per-subscriber state spread over memory the way a server's is (its connection, its
/// channel, its runtime's entries are separate allocations): subscriber `s` owns `per` lines
/// chained in a shuffled order over the whole area, so touching them is `per` dependent
/// loads, each likely out of the caches once the area is larger than they are.
struct ScatteredState {
    lines: Vec<StateLine>,
    first: Vec<usize>,
}

impl ScatteredState {
    fn new(subscribers: usize, per: usize) -> ScatteredState {
        let total = subscribers * per;
        let mut order: Vec<usize> = (0..total).collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in (1..total).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut lines = vec![
            StateLine {
                next: usize::MAX,
                touched: 0
            };
            total
        ];
        let mut first = vec![usize::MAX; subscribers];
        for (s, chain) in order.chunks(per.max(1)).enumerate() {
            first[s] = chain[0];
            for pair in chain.windows(2) {
                lines[pair[0]].next = pair[1];
            }
        }
        ScatteredState { lines, first }
    }

    /// Reads and writes every line of subscriber `s`; returns how many.
    fn touch(&mut self, s: usize) -> usize {
        let mut at = self.first.get(s).copied().unwrap_or(usize::MAX);
        let mut touched = 0;
        while let Some(line) = self.lines.get_mut(at) {
            line.touched += 1;
            at = line.next;
            touched += 1;
        }
        touched
    }
}

fn accept_all(
    listener: &TcpListener,
    o: &FloorOptions,
    subs_of: &mut [Vec<usize>],
    subs: &mut Vec<SubscriberOut>,
    pubs: &mut Vec<PublisherIn>,
) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    while subs.len() < o.subscribers || pubs.len() < o.publishers {
        let (mut stream, _) = listener.accept()?;
        let mut h = [0u8; 8];
        stream.read_exact(&mut h)?;
        let role = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let channel = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize % o.channels;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        if role == 0 {
            subs_of[channel].push(subs.len());
            subs.push(SubscriberOut {
                stream,
                backlog: Vec::new(),
            });
        } else {
            epoll.add(stream.as_raw_fd(), pubs.len() as u64)?;
            pubs.push(PublisherIn {
                stream,
                splitter: Splitter::new(o.publish_bytes),
                open: true,
                acks_owed: 0,
            });
        }
    }
    Ok(epoll)
}

/// Reads what a publisher has sent, calling `each` with every whole message.
fn read_publisher(p: &mut PublisherIn, buf: &mut [u8], mut each: impl FnMut(&[u8])) {
    loop {
        match p.stream.read(buf) {
            Ok(0) => {
                p.open = false;
                return;
            }
            Ok(n) => p.splitter.feed(&buf[..n], &mut each),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                p.open = false;
                return;
            }
        }
    }
}

/// Writes a channel's new events to one subscriber, or queues them behind its backlog.
fn deliver(
    sub: &mut SubscriberOut,
    index: usize,
    bytes: &[u8],
    o: &FloorOptions,
    counters: &SinkCounters,
    backlogged: &mut Vec<usize>,
) {
    let events = (bytes.len() / o.frame_bytes) as u64;
    if !sub.backlog.is_empty() {
        if sub.backlog.len() + bytes.len() > o.max_backlog_bytes {
            bump(&counters.dropped, events);
        } else {
            sub.backlog.extend_from_slice(bytes);
            bump(&counters.deliveries_written, events);
        }
        return;
    }
    bump(&counters.writes, 1);
    bump(&counters.deliveries_written, events);
    let written = match sub.stream.write(bytes) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        Err(_) => {
            bump(&counters.dropped, events);
            return;
        }
    };
    if written < bytes.len() {
        sub.backlog.extend_from_slice(&bytes[written..]);
        backlogged.push(index);
    }
}

/// Writes the acks a publisher is owed, as far as its socket takes them (the rest stays owed).
fn write_acks(p: &mut PublisherIn, zeros: &[u8]) {
    while p.acks_owed > 0 {
        match p.stream.write(&zeros[..p.acks_owed.min(zeros.len())]) {
            Ok(n) => p.acks_owed -= n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => {
                p.open = false;
                return;
            }
        }
    }
}

/// Writes what a subscriber's backlog holds; whether it is empty now.
fn flush_backlog(sub: &mut SubscriberOut, o: &FloorOptions, counters: &SinkCounters) -> bool {
    bump(&counters.writes, 1);
    match sub.stream.write(&sub.backlog) {
        Ok(n) => {
            sub.backlog.drain(..n);
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(_) => {
            bump(
                &counters.dropped,
                sub.backlog.len().div_ceil(o.frame_bytes) as u64,
            );
            sub.backlog.clear();
        }
    }
    sub.backlog.is_empty()
}

/// One step's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorStep {
    pub rate: u64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Messages whose marker was wrong (a framing bug; always 0).
    pub corrupt: u64,
    /// Publishes the sink answered (with `--ack-bytes`; else 0).
    pub acked: u64,
    pub deliveries_per_s: f64,
    /// Latency from the scheduled send time, microseconds.
    pub latency_us: Percentiles,
    /// The sink's CPU over the step, % of one core.
    pub sink_cpu_pct: f64,
    pub driver_cpu_pct: f64,
    pub sink_writes_per_s: f64,
    /// Deliveries the sink dropped for a subscriber whose backlog was full.
    pub sink_dropped: u64,
    /// Events each of the sink's writes carried, on average.
    pub events_per_write: f64,
}

/// A whole floor run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorReport {
    pub options: FloorOptions,
    pub steps: Vec<FloorStep>,
    /// The step with the most deliveries/s at p99 <= 10 ms and nothing lost.
    pub best_p99_10ms: Option<FloorStep>,
    /// The same at p99 <= 100 ms.
    pub best_p99_100ms: Option<FloorStep>,
    pub stopped: Option<String>,
}

impl FloorReport {
    fn best(steps: &[FloorStep], p99_us: f64) -> Option<FloorStep> {
        steps
            .iter()
            .filter(|s| s.lost == 0 && s.latency_us.p99 <= p99_us)
            .max_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s))
            .cloned()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_table(&self) -> String {
        let o = &self.options;
        let cpu = |c: Option<usize>| c.map_or("unpinned".to_string(), |c| format!("CPU {c}"));
        let mut t = format!(
            "relay-floor {:?}: {} subscribers on {} channels, {} publishers, frame {} B, \
             publish {} B, ack {} B, hold {} µs, touch {} lines; sink {}, driver {}\n",
            o.shape,
            o.subscribers,
            o.channels,
            o.publishers,
            o.frame_bytes,
            o.publish_bytes,
            o.ack_bytes,
            o.hold_us,
            o.touch_lines,
            cpu(o.sink_cpu),
            cpu(o.driver_cpu),
        );
        t.push_str(
            "  events/s  deliveries/s      p50 µs      p99 µs    p99.9 µs      max µs   lost  \
             sink CPU  writes/s  events/write  driver CPU\n",
        );
        for s in &self.steps {
            let l = &s.latency_us;
            t.push_str(&format!(
                "{:>10} {:>13.0} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>6} {:>8.1}% {:>9.0} {:>13.1} {:>10.1}%\n",
                s.rate,
                s.deliveries_per_s,
                l.p50,
                l.p99,
                l.p999,
                l.max,
                s.lost,
                s.sink_cpu_pct,
                s.sink_writes_per_s,
                s.events_per_write,
                s.driver_cpu_pct,
            ));
        }
        for (label, best) in [
            ("p99 <= 10 ms", &self.best_p99_10ms),
            ("p99 <= 100 ms", &self.best_p99_100ms),
        ] {
            match best {
                Some(s) => t.push_str(&format!(
                    "best at {label}: {:.0} deliveries/s ({} events/s, p99 {:.1} µs)\n",
                    s.deliveries_per_s, s.rate, s.latency_us.p99
                )),
                None => t.push_str(&format!("best at {label}: no step\n")),
            }
        }
        if let Some(why) = &self.stopped {
            t.push_str(&format!("stopped: {why}\n"));
        }
        t
    }
}

/// Names what the floor could not do with its own sockets.
pub(crate) fn floor_err(what: &'static str) -> impl Fn(io::Error) -> LoadgenError {
    move |source| LoadgenError::Floor { what, source }
}

/// Runs the floor: the sink on its thread, the driver on this one (which stays pinned to
/// `driver_cpu` afterwards when one is given).
pub fn run_floor(o: &FloorOptions) -> Result<FloorReport, LoadgenError> {
    o.validate()?;
    net::raise_fd_limit(o.fds_needed())?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(floor_err("listen on 127.0.0.1"))?;
    let addr = listener
        .local_addr()
        .map_err(floor_err("listen on 127.0.0.1"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(SinkCounters::default());
    let (ready_tx, ready_rx) = mpsc::channel();
    let sink_thread = {
        let (o, stop, counters) = (o.clone(), stop.clone(), counters.clone());
        std::thread::Builder::new()
            .name("floor-sink".into())
            .spawn(move || sink(listener, &o, &stop, &counters, ready_tx))
            .map_err(LoadgenError::Thread)?
    };
    let sink_clock = {
        use std::os::unix::thread::JoinHandleExt;
        ThreadClock::of(sink_thread.as_pthread_t())
    };
    let result = drive(addr, o, &counters, sink_clock, &ready_rx);
    stop.store(true, Ordering::Relaxed);
    let _ = sink_thread.join();
    result
}

struct Driver {
    subscribers: Vec<(TcpStream, Splitter)>,
    publishers: Vec<(TcpStream, Vec<u8>)>,
    epoll: Epoll,
    timer: TimerFd,
}

fn connect(addr: SocketAddr, role: u32, channel: u32) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&hello(role, channel))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn drive(
    addr: SocketAddr,
    o: &FloorOptions,
    counters: &SinkCounters,
    sink_clock: Option<ThreadClock>,
    ready: &mpsc::Receiver<Result<(), LoadgenError>>,
) -> Result<FloorReport, LoadgenError> {
    pin("--driver-cpu", o.driver_cpu)?;
    let mut d = Driver {
        subscribers: Vec::with_capacity(o.subscribers),
        publishers: Vec::with_capacity(o.publishers),
        epoll: Epoll::new().map_err(floor_err("create an epoll"))?,
        timer: TimerFd::new().map_err(floor_err("create a timer"))?,
    };
    for i in 0..o.subscribers {
        let s =
            connect(addr, 0, (i % o.channels) as u32).map_err(|e| sink_error_first(ready, e))?;
        d.subscribers.push((s, Splitter::new(o.frame_bytes)));
    }
    for p in 0..o.publishers {
        let s = connect(addr, 1, p as u32).map_err(|e| sink_error_first(ready, e))?;
        d.publishers.push((s, Vec::new()));
    }
    match ready.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(LoadgenError::Floor {
                what: "accept",
                source: io::Error::new(ErrorKind::TimedOut, "the sink did not get ready"),
            })
        }
    }
    for (i, (s, _)) in d.subscribers.iter().enumerate() {
        s.set_nonblocking(true)
            .map_err(floor_err("set up a socket"))?;
        d.epoll
            .add(s.as_raw_fd(), i as u64)
            .map_err(floor_err("watch a socket"))?;
    }
    for (p, (s, _)) in d.publishers.iter().enumerate() {
        s.set_nonblocking(true)
            .map_err(floor_err("set up a socket"))?;
        if o.ack_bytes > 0 {
            d.epoll
                .add(s.as_raw_fd(), PUBLISHER_TOKEN_BASE + p as u64)
                .map_err(floor_err("watch a socket"))?;
        }
    }
    d.epoll
        .add(d.timer.as_raw_fd(), TIMER_TOKEN)
        .map_err(floor_err("watch the timer"))?;
    let mut steps = Vec::new();
    let mut stopped = None;
    for &rate in &o.rates {
        let step =
            run_step(&mut d, o, rate, counters, sink_clock).map_err(floor_err("run a step"))?;
        let over = step.latency_us.p99 > o.stop_p99_ms * 1000.0;
        let lost = step.lost;
        steps.push(step);
        if over || lost > 0 {
            stopped = Some(format!(
                "the step at {rate} events/s had p99 above {} ms or lost events",
                o.stop_p99_ms
            ));
            break;
        }
    }
    Ok(FloorReport {
        options: o.clone(),
        best_p99_10ms: FloorReport::best(&steps, 10_000.0),
        best_p99_100ms: FloorReport::best(&steps, 100_000.0),
        steps,
        stopped,
    })
}

/// A failed connect, explained by the sink's own error when it stopped first (it closes the
/// listener when it does, so the connect is refused).
fn sink_error_first(
    ready: &mpsc::Receiver<Result<(), LoadgenError>>,
    source: io::Error,
) -> LoadgenError {
    match ready.recv_timeout(Duration::from_millis(100)) {
        Ok(Err(e)) => e,
        _ => floor_err("connect")(source),
    }
}

/// Reads whatever `stream` has (acks nobody looks into); how many bytes that was.
fn read_and_discard(stream: &mut TcpStream, scratch: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        match stream.read(scratch) {
            Ok(0) => return Ok(total),
            Ok(got) => total += got as u64,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(total),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends what each publisher has pending, as far as its socket takes it.
fn flush_publishers(publishers: &mut [(TcpStream, Vec<u8>)]) -> io::Result<bool> {
    let mut all_sent = true;
    for (s, pending) in publishers.iter_mut().filter(|(_, p)| !p.is_empty()) {
        match s.write(pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        all_sent &= pending.is_empty();
    }
    Ok(all_sent)
}

fn run_step(
    d: &mut Driver,
    o: &FloorOptions,
    rate: u64,
    counters: &SinkCounters,
    sink_clock: Option<ThreadClock>,
) -> io::Result<FloorStep> {
    let expected_per_channel: Vec<u64> = (0..o.channels).map(|c| o.subscribers_of(c)).collect();
    let mut hist: Histogram<u64> = new_histogram();
    let mut scratch = vec![0u8; READ_BUFFER_BYTES];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut msg = vec![0u8; o.publish_bytes];
    let (mut published, mut expected, mut delivered, mut corrupt) = (0u64, 0u64, 0u64, 0u64);
    let mut ack_bytes_read = 0u64;
    let acks_done = |ack_bytes_read: u64, published: u64| {
        o.ack_bytes == 0 || ack_bytes_read >= published * o.ack_bytes as u64
    };
    let (writes0, written0, dropped0) = (
        get(&counters.writes),
        get(&counters.deliveries_written),
        get(&counters.dropped),
    );
    let sink_cpu0 = sink_clock.map_or(0, ThreadClock::ns);
    let driver_cpu0 = ThreadClock::current().ns();
    // Start a millisecond out, so the first events are not already late.
    let start_ns = mono_ns() + 1_000_000;
    let schedule = Schedule::new(start_ns, rate, secs_to_ns(o.step_s));
    let (total, due) = (schedule.total, |k: u64| schedule.due_at(k));
    let mut drain_until_ns = None;
    let mut last_arrival_ns = start_ns;
    // The time the timer is armed for (a syscall saved on every wake-up by a read).
    let mut armed_ns = None;
    loop {
        let now = mono_ns();
        while published < total && due(published) <= now {
            let ch = (published % o.channels as u64) as usize;
            write_header(&mut msg, due(published), ch as u32);
            let p = (published % o.publishers as u64) as usize;
            d.publishers[p].1.extend_from_slice(&msg);
            expected += expected_per_channel[ch];
            published += 1;
        }
        let all_sent = flush_publishers(&mut d.publishers)?;
        let timeout_ms = if published < total {
            if o.spin {
                0
            } else {
                let next = due(published);
                if armed_ns != Some(next) {
                    d.timer.arm_at(next);
                    armed_ns = Some(next);
                }
                // A publisher whose socket was full is retried a millisecond later.
                if all_sent {
                    -1
                } else {
                    1
                }
            }
        } else {
            let until = *drain_until_ns.get_or_insert(now + o.drain_ms * 1_000_000);
            if (delivered >= expected && all_sent && acks_done(ack_bytes_read, published))
                || now >= until
            {
                break;
            }
            until.saturating_sub(now).div_ceil(1_000_000).min(10) as i32
        };
        let n = d.epoll.wait(&mut events, timeout_ms)?;
        for ev in &events[..n] {
            if ev.u64 == TIMER_TOKEN {
                d.timer.clear();
                armed_ns = None;
                continue;
            }
            if ev.u64 >= PUBLISHER_TOKEN_BASE {
                let p = (ev.u64 - PUBLISHER_TOKEN_BASE) as usize;
                if let Some((stream, _)) = d.publishers.get_mut(p) {
                    ack_bytes_read += read_and_discard(stream, &mut scratch)?;
                }
                continue;
            }
            let Some((stream, splitter)) = d.subscribers.get_mut(ev.u64 as usize) else {
                continue;
            };
            loop {
                let got = match stream.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(got) => got,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let arrived = mono_ns();
                last_arrival_ns = arrived;
                splitter.feed(&scratch[..got], |frame| match read_header(frame) {
                    Some((due_ns, _)) => {
                        hist.saturating_record(arrived.saturating_sub(due_ns).max(1));
                        delivered += 1;
                    }
                    None => corrupt += 1,
                });
            }
        }
    }
    let end_ns = mono_ns();
    let wall_s = (end_ns - start_ns) as f64 / 1e9;
    let pct = |ns: u64| ns as f64 / 1e9 / wall_s * 100.0;
    let writes = get(&counters.writes) - writes0;
    let written = get(&counters.deliveries_written) - written0;
    let dropped = get(&counters.dropped) - dropped0;
    let active_s = ((last_arrival_ns.max(start_ns) - start_ns) as f64 / 1e9).max(o.step_s);
    Ok(FloorStep {
        rate,
        published,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        corrupt,
        acked: if o.ack_bytes == 0 {
            0
        } else {
            ack_bytes_read / o.ack_bytes as u64
        },
        deliveries_per_s: delivered as f64 / active_s,
        latency_us: Percentiles::of(Some(&hist)),
        sink_cpu_pct: sink_clock.map_or(0.0, |c| pct(c.ns() - sink_cpu0)),
        driver_cpu_pct: pct(ThreadClock::current().ns() - driver_cpu0),
        sink_writes_per_s: writes as f64 / wall_s,
        sink_dropped: dropped,
        events_per_write: if writes == 0 {
            0.0
        } else {
            written as f64 / writes as f64
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_state_gives_each_subscriber_its_own_lines_once() {
        let mut state = ScatteredState::new(50, 7);
        for s in 0..50 {
            assert_eq!(state.touch(s), 7);
        }
        // Every line belongs to exactly one subscriber: each was touched once.
        assert!(state.lines.iter().all(|l| l.touched == 1));
        // Not laid out in order: a subscriber's lines are spread over the whole area.
        let mut at = state.first[0];
        let mut spread = Vec::new();
        while at != usize::MAX {
            spread.push(at);
            at = state.lines[at].next;
        }
        assert_ne!(spread, (spread[0]..spread[0] + 7).collect::<Vec<_>>());
        assert_eq!(state.touch(50), 0, "no such subscriber: nothing touched");
        let mut none = ScatteredState::new(50, 0);
        assert_eq!(none.touch(3), 0);
    }

    #[test]
    fn header_round_trips_and_a_wrong_marker_is_refused() {
        let mut msg = vec![0u8; 40];
        write_header(&mut msg, 123_456_789_012, 4242);
        assert_eq!(read_header(&msg), Some((123_456_789_012, 4242)));
        msg[13] ^= 1;
        assert_eq!(read_header(&msg), None);
        assert_eq!(read_header(&msg[..HEADER_BYTES - 1]), None);
    }

    #[test]
    fn splitter_finds_every_message_however_the_stream_is_cut() {
        let size = 24;
        let mut stream = Vec::new();
        for k in 0..50u64 {
            let mut msg = vec![0u8; size];
            write_header(&mut msg, k, (k % 7) as u32);
            stream.extend_from_slice(&msg);
        }
        for cut in [1, 5, 23, 24, 25, 47, 48, 100, stream.len()] {
            let mut s = Splitter::new(size);
            let mut seen = Vec::new();
            for piece in stream.chunks(cut) {
                s.feed(piece, |m| seen.push(read_header(m)));
            }
            let want: Vec<_> = (0..50u64).map(|k| Some((k, (k % 7) as u32))).collect();
            assert_eq!(seen, want, "cut every {cut} bytes");
            assert!(s.partial.is_empty());
        }
    }

    #[test]
    fn subscribers_spread_round_robin_over_channels() {
        let mut o = FloorOptions::new(Shape::Latency);
        o.subscribers = 103;
        o.channels = 10;
        let per: Vec<u64> = (0..10).map(|c| o.subscribers_of(c)).collect();
        assert_eq!(per, [11, 11, 11, 10, 10, 10, 10, 10, 10, 10]);
        assert_eq!(per.iter().sum::<u64>(), 103);
    }

    #[test]
    fn presets_are_valid_and_bad_numbers_are_refused_by_name() {
        for shape in [Shape::Fanout, Shape::Latency, Shape::Channels] {
            FloorOptions::new(shape).validate().unwrap();
        }
        let refused = |f: fn(&mut FloorOptions)| {
            let mut o = FloorOptions::new(Shape::Latency);
            f(&mut o);
            o.validate().unwrap_err().to_string()
        };
        assert!(refused(|o| o.frame_bytes = 8).contains("--frame-bytes"));
        assert!(refused(|o| o.channels = 1000).contains("--channels 1000"));
        assert!(refused(|o| o.rates = vec![0]).contains("rate"));
        assert!(refused(|o| o.step_s = f64::NAN).contains("--step-s"));
        assert!(refused(|o| o.publishers = 0).contains("--publishers"));
        assert!(refused(|o| o.ack_bytes = 1 << 20).contains("--ack-bytes"));
        assert!(refused(|o| o.touch_lines = MAX_TOUCH_LINES + 1).contains("--touch-lines"));
    }

    fn shape_plan((plan, json): (FloorPlan, bool)) -> (FloorOptions, bool) {
        match plan {
            FloorPlan::Shape(o) => (o, json),
            FloorPlan::Connect(c) => panic!("a shape was asked for, got {c:?}"),
        }
    }

    #[test]
    fn connect_takes_its_own_flags_and_refuses_the_shapes() {
        let plan = |args: &[&str]| {
            FloorCli::try_parse_from(std::iter::once("relay-floor").chain(args.iter().copied()))
                .map_err(|e| e.to_string())
                .and_then(|cli| cli.into_plan().map_err(|e| e.to_string()))
        };
        let Ok((FloorPlan::Connect(c), true)) = plan(&[
            "connect",
            "--listen",
            "127.0.0.1:8014",
            "--duration-s",
            "12",
            "--sink-cpu",
            "0",
            "--json",
        ]) else {
            panic!("a connect plan");
        };
        assert_eq!(c.listen, "127.0.0.1:8014".parse().unwrap());
        assert_eq!(
            (c.duration_s, c.sink_cpu, c.max_connections),
            (12.0, Some(0), 19_000)
        );
        let Ok((FloorPlan::Connect(c), false)) = plan(&["connect"]) else {
            panic!("a connect plan");
        };
        assert_eq!((c.listen.port(), c.duration_s), (8004, 30.0));
        let e = plan(&["connect", "--subscribers", "5"]).unwrap_err();
        assert!(e.contains("--subscribers is not used"), "{e}");
        let e = plan(&["connect", "--listen", "10.1.2.3:80"]).unwrap_err();
        assert!(e.contains("loopback only"), "{e}");
        let e = plan(&["fanout", "--listen", "127.0.0.1:1"]).unwrap_err();
        assert!(e.contains("relay-floor connect` only"), "{e}");
    }

    #[test]
    fn cli_overrides_the_shape_and_refuses_bad_ramps() {
        let parse = |args: &[&str]| {
            FloorCli::try_parse_from(std::iter::once("relay-floor").chain(args.iter().copied()))
        };
        let (o, json) = parse(&[
            "fanout",
            "--ramp",
            "100:400:2",
            "--hold-us",
            "500",
            "--ack-bytes",
            "200",
            "--json",
        ])
        .unwrap()
        .into_plan()
        .map(shape_plan)
        .unwrap();
        assert_eq!(o.rates, [100, 200, 400]);
        assert_eq!((o.hold_us, o.subscribers, json), (500, 1000, true));
        assert_eq!(o.ack_bytes, 200);
        let (o, _) = parse(&["channels", "--rate", "7", "--duration-s", "0.5"])
            .unwrap()
            .into_plan()
            .map(shape_plan)
            .unwrap();
        assert_eq!((o.rates.as_slice(), o.step_s), (&[7][..], 0.5));
        let e = parse(&["fanout", "--ramp", "0:10:2"]).unwrap_err();
        assert!(e.to_string().contains("START"), "{e}");
        assert!(parse(&["fanout", "--rate", "5", "--ramp", "1:2:2"]).is_err());
        assert!(parse(&["nosuch"]).is_err());
    }

    /// A small whole run: every publish reaches every subscriber of its channel, in order
    /// of the counts (no timing is asserted).
    #[test]
    fn a_small_run_delivers_every_event_to_every_subscriber() {
        let mut o = FloorOptions::new(Shape::Latency);
        o.subscribers = 20;
        o.channels = 3;
        o.publishers = 2;
        o.rates = vec![300, 600];
        o.step_s = 0.3;
        o.stop_p99_ms = 1e9;
        for (hold_us, ack_bytes) in [(0, 0), (2000, 0), (0, 150)] {
            o.hold_us = hold_us;
            o.ack_bytes = ack_bytes;
            let r = run_floor(&o).unwrap();
            assert_eq!(r.steps.len(), 2, "{}", r.to_table());
            for s in &r.steps {
                assert_eq!(s.published, (s.rate as f64 * 0.3).round() as u64);
                // 20 subscribers over 3 channels: 7, 7, 6, published round robin.
                let want: u64 = (0..s.published).map(|k| [7, 7, 6][k as usize % 3]).sum();
                assert_eq!(s.expected, want);
                assert_eq!((s.delivered, s.lost, s.corrupt), (want, 0, 0));
                assert_eq!(s.latency_us.count, want);
                assert!(s.events_per_write >= 1.0);
                // With acks on, every publish was answered; without, nothing was.
                let acked = if ack_bytes == 0 { 0 } else { s.published };
                assert_eq!(s.acked, acked);
            }
            let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            assert_eq!(json["options"]["hold_us"], hold_us);
            assert_eq!(json["options"]["ack_bytes"], ack_bytes);
            assert!(r.to_table().contains(&format!("ack {ack_bytes} B")));
            assert!(r.to_table().contains("best at p99 <= 100 ms"));
        }
    }
}
