//! Per-shard metrics and the Prometheus text exposition for `/metrics`.
//!
//! # Ownership and memory ordering
//!
//! Every shard (one OS thread) owns exactly one [`ShardStats`], allocated once
//! and shared as `Arc<ShardStats>` so that whichever thread serves `/metrics`
//! can read every shard's values. **Only the owning shard ever writes its
//! stats; every other thread only loads them.**
//!
//! Because there is a single writer per value, counters and gauges are updated
//! with a plain `load(Relaxed)` followed by `store(Relaxed)` rather than a
//! read-modify-write (`fetch_add`):
//!
//! * No update can be lost: nobody else stores to the location, and the
//!   writer's own `Relaxed` load always returns its own latest store (per-location
//!   coherence), so `load + 1 -> store` is exact.
//! * It compiles to ordinary `mov`/`add`/`mov` (x86) or `ldr`/`add`/`str` (Arm):
//!   no `lock` prefix, no LL/SC loop, no fence, and no contention.
//! * Readers see a possibly slightly stale but never torn value (`AtomicU64`
//!   guarantees whole-value loads), and each value is monotonic for a counter.
//!
//! The flip side is a hard rule: calling a mutating method (`inc`, `add`,
//! `set`, `record_ns`, ...) on another shard's stats from a second thread is a
//! bug that silently loses updates. It is not UB (everything is atomic), just
//! wrong numbers.
//!
//! [`ShardStats`] is `#[repr(align(128))]`, so two shards' stats never share a
//! cache line (128 bytes also covers the adjacent-line prefetcher on x86 and
//! the 128-byte lines of Apple/some Arm cores). Inside an `Arc` the reference
//! counts sit in the padding *before* the 128-aligned payload, and they are
//! not touched on the hot path anyway.
//!
//! # Histograms
//!
//! [`Histogram`] keeps *non-cumulative* per-bucket counts plus `sum_ns` and
//! `count`; it is cumulated only when rendering. The bucket is found with a
//! branch-free scan (sum of 20 comparisons) over a const array of nanosecond
//! bounds. The writer stores `count`, then `sum_ns`, then the bucket with
//! `Release`; a snapshot loads the buckets with `Acquire`, then `sum_ns`, then
//! `count`. That guarantees `snapshot.count >= sum(snapshot.buckets)` even
//! while the owner is recording, so the rendered cumulative buckets are always
//! monotonic and `_bucket{le="+Inf"}` always equals `_count` (records still in
//! flight show up only in `+Inf`). On x86 `Release`/`Acquire` are still plain
//! `mov`s.
//!
//! All arithmetic wraps (`wrapping_add`), so nothing can panic in debug builds.
//!
//! # Exposition
//!
//! [`render_prometheus`] appends text format 0.0.4 ([`CONTENT_TYPE`]): each
//! family gets `# HELP` and `# TYPE` exactly once, followed by its samples.
//! Most families are summed over shards; the ring counters, per-shard active
//! connections and the heartbeat are emitted per shard with a `shard` label.
//! Integers are printed as integers; seconds derived from nanoseconds are
//! printed as exact plain decimals; floats never use exponent notation, and a
//! non-finite or negative uptime is rendered as `0`.

use std::fmt::{self, Write as _};
use std::sync::atomic::{
    AtomicI64, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::time::Duration;

use crate::schedstat::{ThreadId, ThreadSched};

/// `Content-Type` header value for the `/metrics` response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------
// Counter / Gauge
// ---------------------------------------------------------------------------

/// Monotonic counter with a single writer (the owning shard); see the module docs.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    /// Adds one. Owner shard only.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`. Owner shard only (single-writer `load` + `store`, no RMW).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Current value; any thread.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Gauge with a single writer (the owning shard); see the module docs.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// A gauge at zero.
    pub const fn new() -> Self {
        Gauge(AtomicI64::new(0))
    }

    /// Sets an absolute value. Owner shard only.
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    /// Adds `d` (may be negative). Owner shard only (single-writer `load` + `store`).
    #[inline]
    pub fn add(&self, d: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(d), Relaxed);
    }

    /// Current value; any thread.
    #[inline]
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

// ---------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------

/// Number of histogram buckets: 20 finite bounds plus `+Inf`.
pub const HISTOGRAM_BUCKETS: usize = 21;

/// Finite upper bounds (inclusive, Prometheus `le`) in nanoseconds.
pub const BUCKET_BOUNDS_NS: [u64; HISTOGRAM_BUCKETS - 1] = [
    5_000,          // 5e-6 s
    10_000,         // 1e-5
    25_000,         // 2.5e-5
    50_000,         // 5e-5
    100_000,        // 1e-4
    250_000,        // 2.5e-4
    500_000,        // 5e-4
    1_000_000,      // 1e-3
    2_500_000,      // 2.5e-3
    5_000_000,      // 5e-3
    10_000_000,     // 1e-2
    25_000_000,     // 2.5e-2
    50_000_000,     // 5e-2
    100_000_000,    // 0.1
    250_000_000,    // 0.25
    500_000_000,    // 0.5
    1_000_000_000,  // 1
    2_500_000_000,  // 2.5
    5_000_000_000,  // 5
    10_000_000_000, // 10
];

/// `le` label values, matching [`BUCKET_BOUNDS_NS`] then `+Inf`.
pub const BUCKET_LE: [&str; HISTOGRAM_BUCKETS] = [
    "0.000005", "0.00001", "0.000025", "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025",
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
];

/// Index of the bucket `ns` falls in: the first bound `>= ns`, or the `+Inf`
/// bucket. Branch-free: counts the bounds strictly below `ns`.
#[inline]
fn bucket_index(ns: u64) -> usize {
    let mut idx = 0;
    for &bound in BUCKET_BOUNDS_NS.iter() {
        idx += usize::from(ns > bound);
    }
    idx
}

/// Latency histogram with fixed bucket bounds in seconds (Prometheus `le`):
/// 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
/// 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, +Inf.
///
/// Single writer (the owning shard); snapshots from any thread.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BUCKETS],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; HISTOGRAM_BUCKETS],
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation of `ns` nanoseconds. Owner shard only.
    #[inline]
    pub fn record_ns(&self, ns: u64) {
        // Order matters (see module docs): count, sum, then bucket with Release.
        self.count
            .store(self.count.load(Relaxed).wrapping_add(1), Relaxed);
        self.sum_ns
            .store(self.sum_ns.load(Relaxed).wrapping_add(ns), Relaxed);
        let b = &self.buckets[bucket_index(ns)];
        b.store(b.load(Relaxed).wrapping_add(1), Release);
    }

    /// Records a [`Duration`] (saturating at `u64::MAX` ns). Owner shard only.
    #[inline]
    pub fn record(&self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Point-in-time copy; any thread. Guarantees `count >= sum(buckets)`.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0u64; HISTOGRAM_BUCKETS];
        for (dst, src) in buckets.iter_mut().zip(self.buckets.iter()) {
            *dst = src.load(Acquire);
        }
        let sum_ns = self.sum_ns.load(Relaxed);
        let count = self.count.load(Relaxed);
        HistogramSnapshot {
            buckets,
            count,
            sum_ns,
        }
    }
}

/// Copy of a [`Histogram`]'s state; `buckets` are NON-cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistogramSnapshot {
    /// Per-bucket counts, index `i` = observations in `(bound[i-1], bound[i]]`;
    /// the last entry is `(10 s, +Inf)`.
    pub buckets: [u64; HISTOGRAM_BUCKETS],
    /// Observations recorded; always `>= buckets.iter().sum()` for a snapshot.
    pub count: u64,
    /// Sum of all observations in nanoseconds (wrapping).
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Adds `other` into `self` (bucket-wise, count and sum).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.count = self.count.wrapping_add(other.count);
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

// ---------------------------------------------------------------------------
// Label enums
// ---------------------------------------------------------------------------

/// Connection transport; indexes `connections_active` / `connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Transport {
    Http = 0,
    Sse = 1,
    Ws = 2,
}

impl Transport {
    pub const COUNT: usize = 3;
    pub const ALL: [Transport; Transport::COUNT] = [Transport::Http, Transport::Sse, Transport::Ws];

    /// Prometheus label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// Error classes counted in `relay_errors_total{kind}`; indexes `ShardStats::errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    BadRequest = 0,
    NotFound = 1,
    MethodNotAllowed = 2,
    HeadersTooLarge = 3,
    BodyTooLarge = 4,
    RequestTimeout = 5,
    Io = 6,
    RingFull = 7,
    Internal = 8,
    /// An upstream's response body failed after its head was passed on.
    UpstreamBody = 9,
}

impl ErrorKind {
    pub const COUNT: usize = 10;
    pub const ALL: [ErrorKind; ErrorKind::COUNT] = [
        ErrorKind::BadRequest,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::HeadersTooLarge,
        ErrorKind::BodyTooLarge,
        ErrorKind::RequestTimeout,
        ErrorKind::Io,
        ErrorKind::RingFull,
        ErrorKind::Internal,
        ErrorKind::UpstreamBody,
    ];

    /// Prometheus label value (snake_case).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Io => "io",
            ErrorKind::RingFull => "ring_full",
            ErrorKind::Internal => "internal",
            ErrorKind::UpstreamBody => "upstream_body",
        }
    }
}

// ---------------------------------------------------------------------------
// ShardStats
// ---------------------------------------------------------------------------

/// One shard's statistics. Written only by the owning shard, read by anyone.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardStats {
    pub shard: usize,
    /// Events accepted and sequenced by this shard as owner.
    pub events_published: Counter,
    /// Idempotent publishes answered without publishing.
    pub events_duplicate: Counter,
    /// Event writes to a subscriber socket (one per subscriber per event).
    pub events_delivered: Counter,
    /// Publishes refused because a ring was full (503).
    pub publish_rejected_full: Counter,
    /// Publish accepted -> written to the subscriber's socket.
    pub route_duration: Histogram,
    /// A publish request parsed -> every event of it answered by its owner shard (what the
    /// publisher waits for, inside relay). Indexed by `Transport as usize`; SSE never publishes.
    pub publish_duration: [Histogram; Transport::COUNT],
    /// Indexed by `Transport as usize`.
    pub connections_active: [Gauge; Transport::COUNT],
    /// Indexed by `Transport as usize`.
    pub connections_total: [Counter; Transport::COUNT],
    /// Over max_connections / per-ip.
    pub connections_refused: Counter,
    /// Channels this shard owns (`relay_channels_active` sums these).
    pub channels_owned: Gauge,
    /// Events held in history rings owned here.
    pub history_events: Gauge,
    /// Local subscriptions (connection x channel) on this shard.
    pub subscriptions: Gauge,
    pub slow_consumer_drops: Counter,
    /// Events dropped from history before their time to keep within `history.max_events`.
    pub history_budget_drops: Counter,
    /// Indexed by `ErrorKind as usize`; prefer [`ShardStats::error`].
    pub errors: [Counter; ErrorKind::COUNT],
    pub http_requests: Counter,
    pub ring_batches_sent: Counter,
    pub ring_batches_received: Counter,
    pub ring_messages_sent: Counter,
    /// Pushes refused by a full ring (each retried or refused upstream).
    pub ring_full: Counter,
    /// Last time (ms since process start) this shard's maintenance tick ran; plain store.
    pub loop_heartbeat_ms: AtomicU64,
    /// The shard's OS thread, recorded by the thread itself, for the kernel's scheduler
    /// accounting at scrape time ([`ProcessInfo::shard_sched`]).
    pub thread: ThreadId,
    /// Distinct users with a WebSocket on this shard (a user on two shards counts twice).
    pub users_connected: Gauge,
    /// WebSocket sides parked without a task while idle, indexed by [`crate::park::Side`].
    pub ws_parked: [Gauge; 2],
    /// WebSocket closes, indexed like [`WS_CLOSE_CODES`] (last slot: any other code).
    pub ws_closes: [Counter; WS_CLOSE_CODES.len() + 1],
    /// WebSocket messages (complete text messages) received from clients.
    pub ws_messages_received: Counter,
    /// Requests refused for missing or bad credentials (401) or scope (403).
    pub auth_failures: Counter,
    /// Connections refused over `limits.max_connections_per_ip` (429).
    pub connections_refused_per_ip: Counter,
    /// Publishes and proxied requests refused by a rate limit (429).
    pub rate_limited: Counter,
    /// Webhook events delivered (2xx), dropped after their last attempt, dropped at a full queue.
    pub webhook_events_delivered: Counter,
    pub webhook_events_dropped_attempts: Counter,
    pub webhook_events_dropped_full: Counter,
    /// Webhook POSTs that failed (each is retried until `webhooks.max_attempts`).
    pub webhook_attempts_failed: Counter,
    /// Webhook events queued on this shard.
    pub webhook_queue_events: Gauge,
    /// TCP connections this shard's HTTP client opened to instances (proxy, health checks,
    /// webhooks), and reusable ones it closed because the instance's pool was full
    /// (`proxy.pool_max_idle`). Brought up to date by the maintenance tick.
    pub upstream_connections_opened: Counter,
    pub upstream_pool_overflow: Counter,
    /// Idle keep-alive connections in this shard's pools.
    pub upstream_idle_connections: Gauge,
    /// Subscriber writes held back by write pacing (`crate::pacing`) to carry more events.
    pub writes_held: Counter,
    /// The shard's current write-pacing hold, microseconds (0 while the shard is not busy).
    pub write_hold_us: Gauge,
}

/// Close codes counted by name in `relay_ws_closes_total{code}`.
pub const WS_CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1013];

/// The slot of `code` in [`ShardStats::ws_closes`].
pub fn ws_close_slot(code: u16) -> usize {
    WS_CLOSE_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(WS_CLOSE_CODES.len())
}

impl ShardStats {
    /// All-zero stats for shard `shard`.
    pub fn new(shard: usize) -> Self {
        ShardStats {
            shard,
            events_published: Counter::new(),
            events_duplicate: Counter::new(),
            events_delivered: Counter::new(),
            publish_rejected_full: Counter::new(),
            route_duration: Histogram::new(),
            publish_duration: [const { Histogram::new() }; Transport::COUNT],
            connections_active: [const { Gauge::new() }; Transport::COUNT],
            connections_total: [const { Counter::new() }; Transport::COUNT],
            connections_refused: Counter::new(),
            channels_owned: Gauge::new(),
            history_events: Gauge::new(),
            subscriptions: Gauge::new(),
            slow_consumer_drops: Counter::new(),
            history_budget_drops: Counter::new(),
            errors: [const { Counter::new() }; ErrorKind::COUNT],
            http_requests: Counter::new(),
            ring_batches_sent: Counter::new(),
            ring_batches_received: Counter::new(),
            ring_messages_sent: Counter::new(),
            ring_full: Counter::new(),
            loop_heartbeat_ms: AtomicU64::new(0),
            thread: ThreadId::new(),
            users_connected: Gauge::new(),
            ws_parked: [const { Gauge::new() }; 2],
            ws_closes: [const { Counter::new() }; WS_CLOSE_CODES.len() + 1],
            ws_messages_received: Counter::new(),
            writes_held: Counter::new(),
            write_hold_us: Gauge::new(),
            auth_failures: Counter::new(),
            connections_refused_per_ip: Counter::new(),
            rate_limited: Counter::new(),
            webhook_events_delivered: Counter::new(),
            webhook_events_dropped_attempts: Counter::new(),
            webhook_events_dropped_full: Counter::new(),
            webhook_attempts_failed: Counter::new(),
            webhook_queue_events: Gauge::new(),
            upstream_connections_opened: Counter::new(),
            upstream_pool_overflow: Counter::new(),
            upstream_idle_connections: Gauge::new(),
        }
    }

    /// Counts one error of `kind`. Owner shard only.
    #[inline]
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }
}

// ---------------------------------------------------------------------------
// Exposition
// ---------------------------------------------------------------------------

/// Process-wide values rendered alongside the shard stats.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub uptime_s: f64,
    pub shards: usize,
    pub draining: bool,
    pub version: &'static str,
    /// The I/O driver the shards run on: `io_uring`, or `epoll` after a fallback.
    pub driver: &'static str,
    /// `limits.max_connections`, so a dashboard or an alert can see how close the node is.
    pub max_connections: u64,
    /// Each shard's scheduler accounting, indexed by shard (`None`: not offered by the kernel);
    /// read by the caller so that rendering does no I/O.
    pub shard_sched: Vec<Option<ThreadSched>>,
}

/// Exact plain-decimal seconds from nanoseconds, e.g. `1500` -> `0.0000015`.
struct NsAsSeconds(u64);

impl fmt::Display for NsAsSeconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1_000_000_000;
        let frac = self.0 % 1_000_000_000;
        if frac == 0 {
            return write!(f, "{secs}");
        }
        let mut digits = format!("{frac:09}");
        while digits.ends_with('0') {
            digits.pop();
        }
        write!(f, "{secs}.{digits}")
    }
}

/// Prometheus-valid float: plain decimal (Rust's `Display` never uses an
/// exponent), `+Inf`/`-Inf`/`NaN` spelled the Prometheus way.
struct PromFloat(f64);

impl fmt::Display for PromFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v == f64::INFINITY {
            f.write_str("+Inf")
        } else if v == f64::NEG_INFINITY {
            f.write_str("-Inf")
        } else {
            write!(f, "{v}")
        }
    }
}

/// Escapes a label value (`\`, `"`, newline).
fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // fmt::Write for String is infallible.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample; `labels` is either empty or a complete `{k="v",...}`.
fn sample(out: &mut String, name: &str, labels: &str, value: impl fmt::Display) {
    let _ = writeln!(out, "{name}{labels} {value}");
}

/// The `_bucket` (cumulative), `_sum` and `_count` samples of histogram `name`; `labels` is
/// empty or `k="v",...` without braces, and goes before `le`.
pub fn histogram_samples(out: &mut String, name: &str, labels: &str, hist: &HistogramSnapshot) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0u64;
    for (le, n) in BUCKET_LE
        .iter()
        .zip(hist.buckets.iter())
        .take(HISTOGRAM_BUCKETS - 1)
    {
        cumulative = cumulative.wrapping_add(*n);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    // Snapshots guarantee count >= sum(buckets); take the max anyway so a
    // hand-built snapshot still renders monotonic buckets and +Inf == _count.
    let total = hist
        .count
        .max(cumulative.wrapping_add(hist.buckets[HISTOGRAM_BUCKETS - 1]));
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
    let braced = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braced} {}", NsAsSeconds(hist.sum_ns));
    let _ = writeln!(out, "{name}_count{braced} {total}");
}

fn sum_counter(shards: &[&ShardStats], f: impl Fn(&ShardStats) -> &Counter) -> u64 {
    shards
        .iter()
        .fold(0u64, |acc, s| acc.wrapping_add(f(s).get()))
}

fn sum_gauge(shards: &[&ShardStats], f: impl Fn(&ShardStats) -> &Gauge) -> i64 {
    shards
        .iter()
        .fold(0i64, |acc, s| acc.wrapping_add(f(s).get()))
}

/// A family with a single unlabelled counter summed over shards.
fn summed_counter(
    out: &mut String,
    shards: &[&ShardStats],
    name: &str,
    help: &str,
    f: impl Fn(&ShardStats) -> &Counter,
) {
    family(out, name, "counter", help);
    sample(out, name, "", sum_counter(shards, f));
}

/// A family with a single unlabelled gauge summed over shards.
fn summed_gauge(
    out: &mut String,
    shards: &[&ShardStats],
    name: &str,
    help: &str,
    f: impl Fn(&ShardStats) -> &Gauge,
) {
    family(out, name, "gauge", help);
    sample(out, name, "", sum_gauge(shards, f));
}

/// A counter family with one sample per shard, labelled `shard`.
fn per_shard_counter(
    out: &mut String,
    shards: &[&ShardStats],
    name: &str,
    help: &str,
    f: impl Fn(&ShardStats) -> &Counter,
) {
    family(out, name, "counter", help);
    for s in shards {
        sample(out, name, &format!("{{shard=\"{}\"}}", s.shard), f(s).get());
    }
}

fn per_shard_gauge<V: fmt::Display>(
    out: &mut String,
    shards: &[&ShardStats],
    name: &str,
    help: &str,
    f: impl Fn(&ShardStats) -> V,
) {
    family(out, name, "gauge", help);
    for s in shards {
        sample(out, name, &format!("{{shard=\"{}\"}}", s.shard), f(s));
    }
}

/// A per-shard counter from the scheduler accounting in `info`; shards without one are left out.
fn per_shard_sched<V: fmt::Display>(
    out: &mut String,
    shards: &[&ShardStats],
    info: &ProcessInfo,
    name: &str,
    help: &str,
    f: impl Fn(&ThreadSched) -> V,
) {
    family(out, name, "counter", help);
    for s in shards {
        if let Some(Some(sched)) = info.shard_sched.get(s.shard) {
            sample(out, name, &format!("{{shard=\"{}\"}}", s.shard), f(sched));
        }
    }
}

/// Renders Prometheus text exposition format 0.0.4 for all shards,
/// appending to `out` (which is not cleared).
pub fn render_prometheus(out: &mut String, shards: &[&ShardStats], info: &ProcessInfo) {
    out.reserve(6 * 1024 + shards.len() * 512);

    // --- events ---
    summed_counter(
        out,
        shards,
        "relay_events_published_total",
        "Events accepted and sequenced by their owning shard.",
        |s| &s.events_published,
    );
    summed_counter(
        out,
        shards,
        "relay_events_duplicate_total",
        "Idempotent publishes answered without publishing again.",
        |s| &s.events_duplicate,
    );
    summed_counter(
        out,
        shards,
        "relay_events_delivered_total",
        "Event writes to subscriber sockets (one per subscriber per event).",
        |s| &s.events_delivered,
    );
    family(
        out,
        "relay_publish_rejected_total",
        "counter",
        "Publishes refused, by reason.",
    );
    sample(
        out,
        "relay_publish_rejected_total",
        "{reason=\"ring_full\"}",
        sum_counter(shards, |s| &s.publish_rejected_full),
    );

    // --- latency histograms ---
    let merged = |get: &dyn Fn(&ShardStats) -> &Histogram| {
        let mut hist = HistogramSnapshot::default();
        for s in shards {
            hist.merge(&get(s).snapshot());
        }
        hist
    };
    let name = "relay_event_route_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "Time from publish accepted to the event written to a subscriber socket.",
    );
    histogram_samples(out, name, "", &merged(&|s| &s.route_duration));
    let name = "relay_publish_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "Time from a publish request parsed to its reply: every event of it sequenced by its owner shard.",
    );
    for transport in [Transport::Http, Transport::Ws] {
        let hist = merged(&|s| &s.publish_duration[transport as usize]);
        let labels = format!("transport=\"{}\"", transport.as_str());
        histogram_samples(out, name, &labels, &hist);
    }

    // --- connections ---
    family(
        out,
        "relay_connections_active",
        "gauge",
        "Open connections, by transport.",
    );
    for t in Transport::ALL {
        sample(
            out,
            "relay_connections_active",
            &format!("{{transport=\"{}\"}}", t.as_str()),
            sum_gauge(shards, |s| &s.connections_active[t as usize]),
        );
    }
    family(
        out,
        "relay_connections_total",
        "counter",
        "Connections accepted, by transport.",
    );
    for t in Transport::ALL {
        sample(
            out,
            "relay_connections_total",
            &format!("{{transport=\"{}\"}}", t.as_str()),
            sum_counter(shards, |s| &s.connections_total[t as usize]),
        );
    }
    summed_counter(
        out,
        shards,
        "relay_connections_refused_total",
        "Connections refused over limits.max_connections (per-IP refusals: relay_connections_refused_per_ip_total).",
        |s| &s.connections_refused,
    );

    summed_counter(
        out,
        shards,
        "relay_connections_refused_per_ip_total",
        "Connections refused over limits.max_connections_per_ip.",
        |s| &s.connections_refused_per_ip,
    );
    summed_gauge(
        out,
        shards,
        "relay_users_connected",
        "Distinct users with a WebSocket, summed over shards.",
        |s| &s.users_connected,
    );
    family(
        out,
        "relay_ws_sides_parked",
        "gauge",
        "WebSocket connection sides (reader, writer) parked without a task while idle.",
    );
    for (side, name) in [
        (crate::park::Side::Reader, "reader"),
        (crate::park::Side::Writer, "writer"),
    ] {
        sample(
            out,
            "relay_ws_sides_parked",
            &format!("{{side=\"{name}\"}}"),
            sum_gauge(shards, |s| &s.ws_parked[side as usize]),
        );
    }
    family(
        out,
        "relay_ws_closes_total",
        "counter",
        "WebSocket connections closed, by close code.",
    );
    for (slot, code) in WS_CLOSE_CODES
        .iter()
        .map(|c| c.to_string())
        .chain(std::iter::once("other".to_string()))
        .enumerate()
    {
        sample(
            out,
            "relay_ws_closes_total",
            &format!("{{code=\"{code}\"}}"),
            sum_counter(shards, |s| &s.ws_closes[slot]),
        );
    }
    summed_counter(
        out,
        shards,
        "relay_ws_messages_received_total",
        "WebSocket messages received from clients.",
        |s| &s.ws_messages_received,
    );
    family(
        out,
        "relay_webhook_events_total",
        "counter",
        "Webhook events by outcome.",
    );
    for (result, get) in [
        (
            "delivered",
            (|s: &ShardStats| &s.webhook_events_delivered) as fn(&ShardStats) -> &Counter,
        ),
        ("dropped_attempts", |s: &ShardStats| {
            &s.webhook_events_dropped_attempts
        }),
        ("dropped_queue_full", |s: &ShardStats| {
            &s.webhook_events_dropped_full
        }),
    ] {
        sample(
            out,
            "relay_webhook_events_total",
            &format!("{{result=\"{result}\"}}"),
            sum_counter(shards, get),
        );
    }
    summed_counter(
        out,
        shards,
        "relay_webhook_attempts_failed_total",
        "Webhook POSTs that failed and were retried or dropped.",
        |s| &s.webhook_attempts_failed,
    );
    summed_gauge(
        out,
        shards,
        "relay_webhook_queue_events",
        "Webhook events waiting for delivery.",
        |s| &s.webhook_queue_events,
    );
    summed_counter(
        out,
        shards,
        "relay_upstream_connections_opened_total",
        "TCP connections opened to subsystem instances (proxy, health checks, webhooks).",
        |s| &s.upstream_connections_opened,
    );
    summed_counter(
        out,
        shards,
        "relay_upstream_pool_overflow_total",
        "Reusable upstream connections closed because the instance's idle pool was full (proxy.pool_max_idle).",
        |s| &s.upstream_pool_overflow,
    );
    summed_gauge(
        out,
        shards,
        "relay_upstream_idle_connections",
        "Idle keep-alive connections to subsystem instances.",
        |s| &s.upstream_idle_connections,
    );
    summed_counter(
        out,
        shards,
        "relay_rate_limited_total",
        "Publishes and proxied requests refused by a rate limit (429).",
        |s| &s.rate_limited,
    );
    summed_counter(
        out,
        shards,
        "relay_auth_failures_total",
        "Requests refused for missing or bad credentials, or out of scope.",
        |s| &s.auth_failures,
    );

    // --- channels / history / subscriptions ---
    summed_gauge(
        out,
        shards,
        "relay_channels_active",
        "Channels currently owned by a shard.",
        |s| &s.channels_owned,
    );
    summed_gauge(
        out,
        shards,
        "relay_history_events",
        "Events held in channel history rings.",
        |s| &s.history_events,
    );
    summed_gauge(
        out,
        shards,
        "relay_subscriptions",
        "Active subscriptions (connection x channel).",
        |s| &s.subscriptions,
    );

    // --- drops / errors / requests ---
    summed_counter(
        out,
        shards,
        "relay_slow_consumer_drops_total",
        "Subscribers dropped for not keeping up.",
        |s| &s.slow_consumer_drops,
    );
    summed_counter(
        out,
        shards,
        "relay_history_budget_drops_total",
        "Events dropped from history before their time to keep within history.max_events.",
        |s| &s.history_budget_drops,
    );
    family(out, "relay_errors_total", "counter", "Errors, by kind.");
    for k in ErrorKind::ALL {
        sample(
            out,
            "relay_errors_total",
            &format!("{{kind=\"{}\"}}", k.as_str()),
            sum_counter(shards, |s| &s.errors[k as usize]),
        );
    }
    summed_counter(
        out,
        shards,
        "relay_http_requests_total",
        "HTTP requests parsed.",
        |s| &s.http_requests,
    );

    // --- cross-shard rings, per shard ---
    per_shard_counter(
        out,
        shards,
        "relay_ring_batches_sent_total",
        "Batches pushed to other shards' rings.",
        |s| &s.ring_batches_sent,
    );
    per_shard_counter(
        out,
        shards,
        "relay_ring_batches_received_total",
        "Batches popped from this shard's inbound rings.",
        |s| &s.ring_batches_received,
    );
    per_shard_counter(
        out,
        shards,
        "relay_ring_messages_sent_total",
        "Messages pushed to other shards' rings.",
        |s| &s.ring_messages_sent,
    );
    per_shard_counter(
        out,
        shards,
        "relay_ring_full_total",
        "Pushes refused by a full ring.",
        |s| &s.ring_full,
    );

    per_shard_counter(
        out,
        shards,
        "relay_delivery_holds_total",
        "Subscriber writes held back by write pacing so that they carry more events.",
        |s| &s.writes_held,
    );

    // --- per-shard gauges ---
    per_shard_gauge(
        out,
        shards,
        "relay_delivery_hold_us",
        "The shard's current write-pacing hold in microseconds (0 while it is not busy).",
        |s| s.write_hold_us.get(),
    );
    per_shard_gauge(
        out,
        shards,
        "relay_shard_connections_active",
        "Open connections on each shard (all transports).",
        |s| {
            s.connections_active
                .iter()
                .fold(0i64, |acc, g| acc.wrapping_add(g.get()))
        },
    );
    per_shard_gauge(
        out,
        shards,
        "relay_shard_heartbeat_ms",
        "Milliseconds since process start at which the shard's maintenance tick last ran.",
        |s| s.loop_heartbeat_ms.load(Relaxed),
    );
    per_shard_sched(
        out,
        shards,
        info,
        "relay_shard_cpu_seconds_total",
        "Seconds the shard's thread has run on a CPU (the kernel's accounting).",
        |t| NsAsSeconds(t.cpu_ns),
    );
    per_shard_sched(
        out,
        shards,
        info,
        "relay_shard_runqueue_wait_seconds_total",
        "Seconds the shard's thread was ready to run but waited for a CPU another thread held.",
        |t| NsAsSeconds(t.runqueue_wait_ns),
    );
    per_shard_sched(
        out,
        shards,
        info,
        "relay_shard_preemptions_total",
        "Times the kernel took the CPU from the shard's thread while it could still run.",
        |t| t.preemptions,
    );

    // --- process ---
    let uptime = if info.uptime_s.is_finite() && info.uptime_s > 0.0 {
        info.uptime_s
    } else {
        0.0
    };
    family(
        out,
        "relay_uptime_seconds",
        "gauge",
        "Seconds since the process started.",
    );
    sample(out, "relay_uptime_seconds", "", PromFloat(uptime));
    family(
        out,
        "relay_shards",
        "gauge",
        "Number of shards (event-loop threads).",
    );
    sample(out, "relay_shards", "", info.shards);
    family(
        out,
        "relay_draining",
        "gauge",
        "1 while the process is draining for shutdown, else 0.",
    );
    sample(out, "relay_draining", "", u8::from(info.draining));
    family(
        out,
        "relay_connections_max",
        "gauge",
        "limits.max_connections: connections past it are refused with 503.",
    );
    sample(out, "relay_connections_max", "", info.max_connections);
    family(
        out,
        "relay_runtime_info",
        "gauge",
        "The shards' I/O driver (io_uring, or epoll where io_uring is refused); always 1.",
    );
    sample(
        out,
        "relay_runtime_info",
        &format!("{{driver=\"{}\"}}", escape_label_value(info.driver)),
        1,
    );
    family(
        out,
        "relay_build_info",
        "gauge",
        "Build information; the value is always 1.",
    );
    sample(
        out,
        "relay_build_info",
        &format!("{{version=\"{}\"}}", escape_label_value(info.version)),
        1,
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn render(shards: &[&ShardStats], info: &ProcessInfo) -> String {
        let mut out = String::new();
        render_prometheus(&mut out, shards, info);
        out
    }

    fn info() -> ProcessInfo {
        ProcessInfo {
            uptime_s: 12.5,
            shards: 2,
            draining: false,
            version: "0.1.0",
            driver: "io_uring",
            max_connections: 100_000,
            shard_sched: vec![
                Some(ThreadSched {
                    cpu_ns: 1_500_000_000,
                    runqueue_wait_ns: 250_000,
                    preemptions: 7,
                }),
                None,
            ],
        }
    }

    // ---- counter / gauge ----

    #[test]
    fn counter_semantics() {
        let c = Counter::new();
        assert_eq!(c.get(), 0);
        c.inc();
        c.inc();
        c.add(40);
        assert_eq!(c.get(), 42);
        c.add(0);
        assert_eq!(c.get(), 42);
        let d = Counter::default();
        d.add(u64::MAX);
        d.inc(); // wraps, never panics
        assert_eq!(d.get(), 0);
    }

    #[test]
    fn gauge_semantics() {
        let g = Gauge::new();
        assert_eq!(g.get(), 0);
        g.add(5);
        g.add(-7);
        assert_eq!(g.get(), -2);
        g.set(100);
        assert_eq!(g.get(), 100);
        g.add(-100);
        assert_eq!(g.get(), 0);
        assert_eq!(Gauge::default().get(), 0);
    }

    #[test]
    fn single_writer_visible_to_reader_thread() {
        let stats = Arc::new(ShardStats::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let stats = Arc::clone(&stats);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut last = 0;
                while !done.load(Acquire) {
                    let v = stats.events_published.get();
                    assert!(v >= last, "counter went backwards: {v} < {last}");
                    last = v;
                }
            })
        };
        for _ in 0..100_000 {
            stats.events_published.inc();
        }
        done.store(true, Release);
        reader.join().unwrap();
        assert_eq!(stats.events_published.get(), 100_000);
    }

    // ---- histogram ----

    #[test]
    fn bucket_index_on_bounds() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(1), 0);
        for (i, &b) in BUCKET_BOUNDS_NS.iter().enumerate() {
            // le is <=: exactly on a bound goes in that bucket.
            assert_eq!(bucket_index(b), i, "exactly {b}");
            assert_eq!(bucket_index(b - 1), i, "just below {b}");
            assert_eq!(bucket_index(b + 1), i + 1, "just above {b}");
        }
        assert_eq!(bucket_index(10_000_000_001), HISTOGRAM_BUCKETS - 1);
        assert_eq!(bucket_index(u64::MAX), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn bucket_index_matches_reference_search() {
        let mut v: u64 = 1;
        while v < 100_000_000_000 {
            for x in [v - 1, v, v + 1, v * 3 / 2] {
                let expected = BUCKET_BOUNDS_NS.partition_point(|&b| b < x);
                assert_eq!(bucket_index(x), expected, "{x}");
            }
            v = v * 5 / 4 + 1;
        }
    }

    #[test]
    fn bounds_and_le_labels_agree() {
        assert!(BUCKET_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(BUCKET_LE[HISTOGRAM_BUCKETS - 1], "+Inf");
        for (le, &ns) in BUCKET_LE.iter().zip(BUCKET_BOUNDS_NS.iter()) {
            let secs: f64 = le.parse().unwrap();
            assert_eq!((secs * 1e9).round() as u64, ns, "le={le}");
            assert!(!le.contains('e'), "no exponent in {le}");
            assert_eq!(*le, NsAsSeconds(ns).to_string());
        }
    }

    #[test]
    fn histogram_records_sum_count_and_inf() {
        let h = Histogram::new();
        h.record_ns(5_000); // bucket 0 (on the bound)
        h.record_ns(5_001); // bucket 1
        h.record_ns(1_000_000_000); // le=1 -> index 16
        h.record_ns(10_000_000_000); // le=10 -> index 19
        h.record_ns(10_000_000_001); // +Inf
        h.record_ns(u64::MAX / 2); // +Inf
        h.record(Duration::from_micros(3)); // bucket 0
        let s = h.snapshot();
        let mut expected = [0u64; HISTOGRAM_BUCKETS];
        expected[0] = 2;
        expected[1] = 1;
        expected[16] = 1;
        expected[19] = 1;
        expected[20] = 2;
        assert_eq!(s.buckets, expected);
        assert_eq!(s.count, 7);
        assert_eq!(
            s.sum_ns,
            5_000 + 5_001 + 1_000_000_000 + 10_000_000_000 + 10_000_000_001 + u64::MAX / 2 + 3_000
        );
        assert_eq!(
            Histogram::default().snapshot(),
            HistogramSnapshot::default()
        );
    }

    #[test]
    fn histogram_duration_saturates() {
        let h = Histogram::new();
        h.record(Duration::from_secs(u64::MAX));
        let s = h.snapshot();
        assert_eq!(s.buckets[HISTOGRAM_BUCKETS - 1], 1);
        assert_eq!(s.sum_ns, u64::MAX);
    }

    #[test]
    fn snapshot_merge() {
        let a = Histogram::new();
        let b = Histogram::new();
        a.record_ns(1);
        a.record_ns(60_000); // le=0.0001 -> index 4
        b.record_ns(2);
        b.record_ns(20_000_000_000);
        let mut m = a.snapshot();
        m.merge(&b.snapshot());
        assert_eq!(m.count, 4);
        assert_eq!(m.sum_ns, 1 + 60_000 + 2 + 20_000_000_000);
        assert_eq!(m.buckets[0], 2);
        assert_eq!(m.buckets[4], 1);
        assert_eq!(m.buckets[20], 1);
        assert_eq!(m.buckets.iter().sum::<u64>(), 4);
        // Merging an empty snapshot is the identity.
        let before = m;
        m.merge(&HistogramSnapshot::default());
        assert_eq!(m, before);
    }

    #[test]
    fn concurrent_snapshot_count_covers_buckets() {
        let stats = Arc::new(ShardStats::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let stats = Arc::clone(&stats);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !done.load(Acquire) || checks == 0 {
                    let s = stats.route_duration.snapshot();
                    let in_buckets: u64 = s.buckets.iter().sum();
                    assert!(s.count >= in_buckets, "{} < {in_buckets}", s.count);
                    let mut out = String::new();
                    render_prometheus(&mut out, &[&stats], &info());
                    check_exposition(&out);
                    checks += 1;
                }
            })
        };
        for i in 0..200_000u64 {
            stats.route_duration.record_ns((i * 7_919) % 3_000_000);
        }
        done.store(true, Release);
        reader.join().unwrap();
        let s = stats.route_duration.snapshot();
        assert_eq!(s.count, 200_000);
        assert_eq!(s.buckets.iter().sum::<u64>(), 200_000);
    }

    // ---- enums / layout ----

    #[test]
    fn label_values() {
        let t: Vec<_> = Transport::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(t, ["http", "sse", "ws"]);
        for (i, t) in Transport::ALL.iter().enumerate() {
            assert_eq!(*t as usize, i);
        }
        let k: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            k,
            [
                "bad_request",
                "not_found",
                "method_not_allowed",
                "headers_too_large",
                "body_too_large",
                "request_timeout",
                "io",
                "ring_full",
                "internal",
                "upstream_body"
            ]
        );
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn shard_stats_layout_and_error() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ShardStats>();
        assert_eq!(std::mem::align_of::<ShardStats>(), 128);
        assert_eq!(std::mem::size_of::<ShardStats>() % 128, 0);
        let a = Arc::new(ShardStats::new(0));
        let b = Arc::new(ShardStats::new(1));
        for p in [Arc::as_ptr(&a) as usize, Arc::as_ptr(&b) as usize] {
            assert_eq!(p % 128, 0);
        }
        assert_eq!(b.shard, 1);
        a.error(ErrorKind::RingFull);
        a.error(ErrorKind::RingFull);
        a.error(ErrorKind::BadRequest);
        assert_eq!(a.errors[ErrorKind::RingFull as usize].get(), 2);
        assert_eq!(a.errors[ErrorKind::BadRequest as usize].get(), 1);
        assert_eq!(a.errors.iter().map(Counter::get).sum::<u64>(), 3);
    }

    // ---- formatting helpers ----

    #[test]
    fn ns_as_seconds_is_exact_plain_decimal() {
        let cases = [
            (0, "0"),
            (1, "0.000000001"),
            (1_500, "0.0000015"),
            (5_000, "0.000005"),
            (1_000_000_000, "1"),
            (2_500_000_000, "2.5"),
            (61_000_000_123, "61.000000123"),
            (u64::MAX, "18446744073.709551615"),
        ];
        for (ns, s) in cases {
            assert_eq!(NsAsSeconds(ns).to_string(), s);
        }
    }

    #[test]
    fn prom_float_and_escaping() {
        assert_eq!(PromFloat(12.5).to_string(), "12.5");
        assert_eq!(PromFloat(3.0).to_string(), "3");
        assert_eq!(PromFloat(1e-7).to_string(), "0.0000001");
        assert_eq!(PromFloat(1e21).to_string(), "1000000000000000000000");
        assert_eq!(PromFloat(f64::NAN).to_string(), "NaN");
        assert_eq!(PromFloat(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(PromFloat(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn bad_uptime_renders_zero_and_version_is_escaped() {
        for bad in [f64::NAN, f64::INFINITY, -3.0] {
            let out = render(
                &[],
                &ProcessInfo {
                    uptime_s: bad,
                    shards: 0,
                    draining: true,
                    version: "1.0\"x",
                    driver: "epoll",
                    max_connections: 0,
                    shard_sched: Vec::new(),
                },
            );
            let lines: Vec<&str> = out.lines().collect();
            assert!(lines.contains(&"relay_uptime_seconds 0"), "{bad}");
            assert!(lines.contains(&"relay_draining 1"));
            assert!(lines.contains(&"relay_runtime_info{driver=\"epoll\"} 1"));
            assert!(lines.contains(&"relay_build_info{version=\"1.0\\\"x\"} 1"));
            check_exposition(&out);
        }
    }

    // ---- rendering ----

    fn two_shards() -> (ShardStats, ShardStats) {
        let a = ShardStats::new(0);
        let b = ShardStats::new(1);
        a.events_published.add(10);
        b.events_published.add(5);
        a.events_duplicate.inc();
        b.events_delivered.add(7);
        a.events_delivered.add(3);
        b.publish_rejected_full.add(2);

        a.route_duration.record_ns(4_000); // le=0.000005
        a.route_duration.record_ns(10_000); // le=0.00001 (on the bound)
        b.route_duration.record_ns(1_000_000); // le=0.001
        b.route_duration.record_ns(20_000_000_000); // +Inf
        a.publish_duration[Transport::Http as usize].record_ns(3_000);
        b.publish_duration[Transport::Ws as usize].record_ns(20_000);

        a.connections_active[Transport::Http as usize].set(2);
        a.connections_active[Transport::Sse as usize].add(3);
        b.connections_active[Transport::Sse as usize].add(1);
        b.connections_active[Transport::Ws as usize].add(4);
        b.connections_active[Transport::Ws as usize].add(-1);
        a.connections_total[Transport::Http as usize].add(9);
        b.connections_total[Transport::Ws as usize].add(6);
        b.connections_refused.inc();
        a.upstream_connections_opened.add(3);
        b.upstream_connections_opened.add(4);
        b.upstream_pool_overflow.add(2);
        a.upstream_idle_connections.set(1);
        b.upstream_idle_connections.set(2);

        a.channels_owned.set(4);
        b.channels_owned.set(6);
        a.history_events.set(100);
        b.history_events.set(23);
        a.subscriptions.set(8);
        b.subscriptions.set(1);
        a.slow_consumer_drops.inc();
        a.error(ErrorKind::NotFound);
        b.error(ErrorKind::NotFound);
        b.error(ErrorKind::Io);
        a.http_requests.add(40);
        b.http_requests.add(2);

        a.ring_batches_sent.add(11);
        b.ring_batches_sent.add(12);
        a.ring_batches_received.add(13);
        b.ring_batches_received.add(14);
        a.ring_messages_sent.add(21);
        b.ring_messages_sent.add(22);
        b.ring_full.add(3);
        a.ws_parked[crate::park::Side::Reader as usize].add(5);
        b.ws_parked[crate::park::Side::Reader as usize].add(2);
        b.ws_parked[crate::park::Side::Writer as usize].add(4);
        a.loop_heartbeat_ms.store(1_000, Relaxed);
        b.loop_heartbeat_ms.store(1_250, Relaxed);
        (a, b)
    }

    #[test]
    fn render_two_shards_exact_lines() {
        let (a, b) = two_shards();
        let out = render(&[&a, &b], &info());
        let lines: HashSet<&str> = out.lines().collect();
        let expected = [
            "# HELP relay_events_published_total Events accepted and sequenced by their owning shard.",
            "# TYPE relay_events_published_total counter",
            "relay_events_published_total 15",
            "relay_events_duplicate_total 1",
            "relay_events_delivered_total 10",
            "# TYPE relay_publish_rejected_total counter",
            "relay_publish_rejected_total{reason=\"ring_full\"} 2",
            "# TYPE relay_event_route_duration_seconds histogram",
            "relay_event_route_duration_seconds_bucket{le=\"0.000005\"} 1",
            "relay_event_route_duration_seconds_bucket{le=\"0.00001\"} 2",
            "relay_event_route_duration_seconds_bucket{le=\"0.000025\"} 2",
            "relay_event_route_duration_seconds_bucket{le=\"0.0005\"} 2",
            "relay_event_route_duration_seconds_bucket{le=\"0.001\"} 3",
            "relay_event_route_duration_seconds_bucket{le=\"10\"} 3",
            "relay_event_route_duration_seconds_bucket{le=\"+Inf\"} 4",
            "relay_event_route_duration_seconds_sum 20.001014",
            "relay_event_route_duration_seconds_count 4",
            "# TYPE relay_connections_active gauge",
            "relay_connections_active{transport=\"http\"} 2",
            "relay_connections_active{transport=\"sse\"} 4",
            "relay_connections_active{transport=\"ws\"} 3",
            "# TYPE relay_connections_total counter",
            "relay_connections_total{transport=\"http\"} 9",
            "relay_connections_total{transport=\"sse\"} 0",
            "relay_connections_total{transport=\"ws\"} 6",
            "relay_connections_refused_total 1",
            "# TYPE relay_upstream_connections_opened_total counter",
            "relay_upstream_connections_opened_total 7",
            "relay_upstream_pool_overflow_total 2",
            "# TYPE relay_upstream_idle_connections gauge",
            "relay_upstream_idle_connections 3",
            "# TYPE relay_channels_active gauge",
            "relay_channels_active 10",
            "relay_history_events 123",
            "relay_subscriptions 9",
            "relay_slow_consumer_drops_total 1",
            "relay_history_budget_drops_total 0",
            "relay_errors_total{kind=\"bad_request\"} 0",
            "relay_errors_total{kind=\"not_found\"} 2",
            "relay_errors_total{kind=\"method_not_allowed\"} 0",
            "relay_errors_total{kind=\"headers_too_large\"} 0",
            "relay_errors_total{kind=\"body_too_large\"} 0",
            "relay_errors_total{kind=\"request_timeout\"} 0",
            "relay_errors_total{kind=\"io\"} 1",
            "relay_errors_total{kind=\"ring_full\"} 0",
            "relay_errors_total{kind=\"internal\"} 0",
            "relay_http_requests_total 42",
            "relay_ws_sides_parked{side=\"reader\"} 7",
            "relay_ws_sides_parked{side=\"writer\"} 4",
            "relay_ring_batches_sent_total{shard=\"0\"} 11",
            "relay_ring_batches_sent_total{shard=\"1\"} 12",
            "relay_ring_batches_received_total{shard=\"0\"} 13",
            "relay_ring_batches_received_total{shard=\"1\"} 14",
            "relay_ring_messages_sent_total{shard=\"0\"} 21",
            "relay_ring_messages_sent_total{shard=\"1\"} 22",
            "relay_ring_full_total{shard=\"0\"} 0",
            "relay_ring_full_total{shard=\"1\"} 3",
            "relay_delivery_holds_total{shard=\"1\"} 0",
            "# TYPE relay_delivery_hold_us gauge",
            "relay_delivery_hold_us{shard=\"0\"} 0",
            "# TYPE relay_shard_connections_active gauge",
            "relay_shard_connections_active{shard=\"0\"} 5",
            "relay_shard_connections_active{shard=\"1\"} 4",
            "# TYPE relay_shard_heartbeat_ms gauge",
            "relay_shard_heartbeat_ms{shard=\"0\"} 1000",
            "relay_shard_heartbeat_ms{shard=\"1\"} 1250",
            "# TYPE relay_shard_cpu_seconds_total counter",
            "relay_shard_cpu_seconds_total{shard=\"0\"} 1.5",
            "# TYPE relay_shard_runqueue_wait_seconds_total counter",
            "relay_shard_runqueue_wait_seconds_total{shard=\"0\"} 0.00025",
            "# TYPE relay_shard_preemptions_total counter",
            "relay_shard_preemptions_total{shard=\"0\"} 7",
            "relay_uptime_seconds 12.5",
            "relay_shards 2",
            "relay_draining 0",
            "relay_connections_max 100000",
            "# TYPE relay_publish_duration_seconds histogram",
            "relay_publish_duration_seconds_bucket{transport=\"http\",le=\"0.000005\"} 1",
            "relay_publish_duration_seconds_bucket{transport=\"ws\",le=\"0.00001\"} 0",
            "relay_publish_duration_seconds_bucket{transport=\"ws\",le=\"0.000025\"} 1",
            "relay_publish_duration_seconds_sum{transport=\"http\"} 0.000003",
            "relay_publish_duration_seconds_count{transport=\"ws\"} 1",
            "relay_runtime_info{driver=\"io_uring\"} 1",
            "relay_build_info{version=\"0.1.0\"} 1",
        ];
        for e in expected {
            assert!(lines.contains(e), "missing line {e:?} in:\n{out}");
        }
        // 10 error kinds, 21 buckets, 3 transports x 2 families, 2 shards x 6 per-shard families.
        assert_eq!(
            out.lines()
                .filter(|l| l.starts_with("relay_errors_total{"))
                .count(),
            10
        );
        assert_eq!(
            out.lines()
                .filter(|l| l.starts_with("relay_event_route_duration_seconds_bucket{"))
                .count(),
            21
        );
        assert!(out.ends_with('\n'));
        assert!(!out.contains("\n\n"));
        // HELP/TYPE once per family (the parser also checks this).
        for fam in [
            "relay_events_published_total",
            "relay_event_route_duration_seconds",
        ] {
            assert_eq!(out.matches(&format!("# TYPE {fam} ")).count(), 1);
            assert_eq!(out.matches(&format!("# HELP {fam} ")).count(), 1);
        }
        // A shard the kernel gave no accounting for has no scheduler samples.
        assert!(!out.contains("relay_shard_cpu_seconds_total{shard=\"1\"}"));
        assert!(!out.contains("relay_shard_preemptions_total{shard=\"1\"}"));
        let families = check_exposition(&out);
        assert_eq!(families, 46);
    }

    #[test]
    fn render_appends_and_handles_no_shards() {
        let mut out = String::from("prefix\n");
        render_prometheus(&mut out, &[], &info());
        assert!(out.starts_with("prefix\n# HELP "));
        let body = &out["prefix\n".len()..];
        let lines: Vec<&str> = body.lines().collect();
        assert!(lines.contains(&"relay_events_published_total 0"));
        assert!(lines.contains(&"relay_event_route_duration_seconds_bucket{le=\"+Inf\"} 0"));
        assert!(lines.contains(&"relay_event_route_duration_seconds_sum 0"));
        assert!(!body.contains("shard=\""));
        check_exposition(body);
    }

    // ---- tiny exposition parser ----

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_value(v: &str) -> f64 {
        match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => {
                assert!(
                    v.chars()
                        .all(|c| c.is_ascii_digit() || c == '.' || c == '-'),
                    "not a plain decimal: {v:?}"
                );
                v.parse().unwrap_or_else(|_| panic!("bad float {v:?}"))
            }
        }
    }

    /// Parses `{k="v",...}` and returns the pairs (values unescaped).
    fn parse_labels(s: &str) -> Vec<(String, String)> {
        let inner = s
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or_else(|| panic!("bad label set {s:?}"));
        let mut pairs = Vec::new();
        let mut rest = inner;
        while !rest.is_empty() {
            let eq = rest
                .find("=\"")
                .unwrap_or_else(|| panic!("bad label in {s:?}"));
            let key = &rest[..eq];
            assert!(is_name(key), "bad label name {key:?}");
            let mut val = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break eq + 2 + i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => val.push(c),
                        other => panic!("bad escape {other:?} in {s:?}"),
                    },
                    Some((_, c)) => val.push(c),
                    None => panic!("unterminated label value in {s:?}"),
                }
            };
            pairs.push((key.to_string(), val));
            rest = &rest[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
                assert!(!rest.is_empty(), "trailing comma in {s:?}");
            } else {
                assert!(rest.is_empty(), "junk after label in {s:?}");
            }
        }
        pairs
    }

    /// Validates text format 0.0.4 as we emit it and returns the number of
    /// families: every non-comment line is `name{labels} value` with a
    /// parseable float; HELP and TYPE appear once per family, TYPE before
    /// its samples; families are contiguous; histograms are cumulative with
    /// `+Inf == _count`.
    fn check_exposition(text: &str) -> usize {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut last_bucket: HashMap<String, f64> = HashMap::new();
        let mut inf_bucket: HashMap<String, f64> = HashMap::new();
        let mut counts: HashMap<String, f64> = HashMap::new();
        let mut sample_families: HashSet<String> = HashSet::new();

        let mut switch_to = |fam: &str, current: &mut Option<String>| {
            if current.as_deref() != Some(fam) {
                if let Some(prev) = current.take() {
                    finished.insert(prev);
                }
                assert!(!finished.contains(fam), "family {fam} is not contiguous");
                *current = Some(fam.to_string());
            }
        };

        for line in text.lines() {
            assert!(!line.is_empty(), "empty line");
            if let Some(rest) = line.strip_prefix("# ") {
                let (kw, rest) = rest.split_once(' ').expect("comment keyword");
                let (name, arg) = rest.split_once(' ').expect("comment name and text");
                assert!(is_name(name), "bad family name {name:?}");
                switch_to(name, &mut current);
                match kw {
                    "HELP" => {
                        assert!(helps.insert(name.to_string()), "HELP twice for {name}");
                        assert!(!types.contains_key(name), "HELP after TYPE for {name}");
                        assert!(!arg.is_empty());
                    }
                    "TYPE" => {
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                            "bad type {arg}"
                        );
                        assert!(
                            types.insert(name.to_string(), arg.to_string()).is_none(),
                            "TYPE twice for {name}"
                        );
                    }
                    _ => panic!("unexpected comment {line:?}"),
                }
                continue;
            }
            assert!(!line.starts_with('#'), "bad comment {line:?}");

            let (series, value) = line.rsplit_once(' ').expect("sample needs a value");
            let value = parse_value(value);
            let (name, labels) = match series.find('{') {
                Some(i) => (&series[..i], parse_labels(&series[i..])),
                None => (series, Vec::new()),
            };
            assert!(is_name(name), "bad metric name {name:?}");
            assert!(!series.contains(' '), "space in series {series:?}");

            // Resolve the family and check TYPE came first.
            let fam = if types.contains_key(name) {
                name.to_string()
            } else {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| name.strip_suffix(suf))
                    .unwrap_or_else(|| panic!("sample {name} before its TYPE"));
                assert_eq!(
                    types.get(base).map(String::as_str),
                    Some("histogram"),
                    "sample {name} before its TYPE"
                );
                base.to_string()
            };
            switch_to(&fam, &mut current);
            sample_families.insert(fam.clone());
            if types[&fam] == "counter" {
                assert!(name.ends_with("_total"), "counter {name} without _total");
                assert!(value >= 0.0, "negative counter {line}");
            }

            if types[&fam] == "histogram" {
                // One histogram per label set (`le` aside) within the family.
                let others: Vec<String> = labels
                    .iter()
                    .filter(|(k, _)| k != "le")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let series_key = format!("{fam}{{{}}}", others.join(","));
                if name.ends_with("_bucket") {
                    let le = labels
                        .iter()
                        .find(|(k, _)| k == "le")
                        .map(|(_, v)| v.as_str())
                        .expect("bucket without le");
                    let prev = last_bucket.insert(series_key.clone(), value).unwrap_or(0.0);
                    assert!(value >= prev, "buckets not cumulative at {line}");
                    if le == "+Inf" {
                        inf_bucket.insert(series_key, value);
                    } else {
                        parse_value(le);
                    }
                } else if name.ends_with("_count") {
                    counts.insert(series_key, value);
                }
            }
        }
        assert_eq!(inf_bucket, counts, "+Inf != _count (or one is missing)");
        for (fam, ty) in &types {
            assert!(helps.contains(fam), "TYPE without HELP for {fam}");
            if ty == "histogram" {
                assert!(
                    inf_bucket
                        .keys()
                        .any(|k| k.starts_with(&format!("{fam}{{"))),
                    "histogram {fam} without a +Inf bucket"
                );
            }
        }
        assert_eq!(helps.len(), types.len());
        for fam in &sample_families {
            assert!(types.contains_key(fam));
        }
        types.len()
    }

    #[test]
    fn parser_rejects_bad_input() {
        let bad = [
            "relay_x 1\n",                                                             // no TYPE
            "# HELP a h\n# TYPE a gauge\na 1\n# HELP b h\n# TYPE b gauge\nb 1\na 2\n", // not contiguous
            "# HELP a h\n# TYPE a gauge\na{x=\"1} 1\n",                                // bad labels
            "# HELP a h\n# TYPE a gauge\na 1e5\n",                                     // exponent
            "# HELP a h\n# TYPE a gauge\na 1\n# TYPE a gauge\n",                       // TYPE twice
        ];
        for text in bad {
            let r = std::panic::catch_unwind(|| check_exposition(text));
            assert!(r.is_err(), "parser accepted {text:?}");
        }
        assert_eq!(
            check_exposition("# HELP a h\n# TYPE a gauge\na{x=\"\\\"\"} -1.5\n"),
            1
        );
    }
}
