//! Counting and measuring: per-thread counters, per-step histograms, sequence tracking.
//!
//! Owns the statistics each generator thread keeps and how the control thread reads them:
//! counters are single-writer atomics (each thread writes only its own block, with a plain
//! load + store, no read-modify-write), histograms are recorded thread-locally without any lock
//! and moved into a mutex-guarded copy a few times a second (or when the control thread asks),
//! where the control thread merges them. Also owns the per-subscription sequence tracker that
//! tells duplicates from out-of-order arrivals from gaps.
//! Must never: take a lock per event, or allocate per event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::clock::MAX_STEPS;

/// Latencies are recorded in ns, 3 significant digits, up to an hour (longer is clamped).
pub const HIST_MAX_NS: u64 = 3_600_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants known to be valid (1 <= low, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// Adds `n` to a counter only this thread writes.
#[inline]
pub fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Sets a counter only this thread writes to `max(old, v)`.
#[inline]
pub fn raise(a: &AtomicU64, v: u64) {
    if v > a.load(Ordering::Relaxed) {
        a.store(v, Ordering::Relaxed);
    }
}

#[inline]
pub fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Every scalar a thread counts. `C::COUNT` sizes the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum C {
    /// Subscriber connections open right now.
    SubsOpen,
    /// Subscriber connections whose every channel is subscribed (ever reached).
    Subscribed,
    /// Subscriber connections that failed to connect, upgrade or subscribe.
    SubFailed,
    /// Publisher connections open right now.
    PubsOpen,
    /// Publisher (re)connections that failed.
    PubConnectFailed,
    /// Publishers that finished the current step (sent all, or gave up at the step's bound).
    PubStepsDone,
    /// Events delivered with a seq at or below one already seen in the window.
    Duplicated,
    /// Events that arrived after a later seq of the same channel.
    OutOfOrder,
    /// Seq jumps forward (events skipped at the time of arrival).
    SeqGaps,
    /// `{"op":"gap"}` / `event: gap` notices from relay (drop-oldest slow-consumer policy).
    GapNotices,
    /// Subscribers the server closed (close frame or EOF) while the run was going on.
    Disconnected,
    /// Events that do not carry this run's data layout or channel.
    Foreign,
    /// Protocol faults (bad frames, bad heads) that closed a connection.
    ProtocolErrors,
    /// Publish requests (HTTP) or messages (WebSocket) answered with an error.
    PublishErrorReplies,
    /// Requests whose answer never came (connection lost).
    PublishNoReply,
    /// Events due in a step that its publisher could not send before the step's bound.
    Unsent,
    /// WebSocket handshakes completed (connect scenario) / failed.
    Handshakes,
    HandshakeFailures,
    // Close codes received by subscribers.
    Close1000,
    Close1001,
    Close1008,
    Close1011,
    Close1013,
    CloseOther,
    /// EOF without a close frame.
    CloseEof,
    // Publish error statuses (HTTP status, or the WebSocket error code's equivalent).
    S400,
    S401,
    S403,
    S413,
    S429,
    S503,
    SOther4xx,
    SOther5xx,
    SOther,
}

impl C {
    pub const COUNT: usize = C::SOther as usize + 1;
}

/// Per-step counters. Deliveries and acks belong to the step the event was scheduled in.
#[derive(Debug, Default)]
pub struct StepCounters {
    /// Events written to the relay.
    pub sent: AtomicU64,
    /// Events accepted (202 / `published`).
    pub published: AtomicU64,
    /// Events refused or without an answer.
    pub failed: AtomicU64,
    /// Sum over accepted events of the subscribers of their channel.
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
    /// Latest arrival / ack time (ns since the origin), for achieved rates.
    pub last_delivery_ns: AtomicU64,
    pub last_ack_ns: AtomicU64,
}

/// Histograms of one step.
#[derive(Debug, Default)]
pub struct StepHists {
    /// Scheduled send -> arrival (or, in the connect scenario, connect -> welcome).
    pub latency: Option<Histogram<u64>>,
    /// Oldest scheduled send of a request -> its acceptance.
    pub ack: Option<Histogram<u64>>,
}

/// The histograms of one thread, either the thread's own working copy or the merged copy.
#[derive(Debug)]
pub struct Hists {
    pub steps: Vec<StepHists>,
    /// Actual write time - scheduled time, per event: how late the generator itself was.
    pub send_lag: Histogram<u64>,
}

impl Default for Hists {
    fn default() -> Hists {
        Hists {
            steps: (0..MAX_STEPS).map(|_| StepHists::default()).collect(),
            send_lag: new_histogram(),
        }
    }
}

fn slot(h: &mut Option<Histogram<u64>>) -> &mut Histogram<u64> {
    h.get_or_insert_with(new_histogram)
}

impl Hists {
    #[inline]
    pub fn latency(&mut self, step: usize) -> &mut Histogram<u64> {
        slot(&mut self.steps[step.min(MAX_STEPS - 1)].latency)
    }

    #[inline]
    pub fn ack(&mut self, step: usize) -> &mut Histogram<u64> {
        slot(&mut self.steps[step.min(MAX_STEPS - 1)].ack)
    }

    /// Moves everything recorded here into `into` and resets this copy (keeping its memory).
    pub fn drain_into(&mut self, into: &mut Hists) {
        for (from, to) in self.steps.iter_mut().zip(into.steps.iter_mut()) {
            move_hist(&mut from.latency, &mut to.latency);
            move_hist(&mut from.ack, &mut to.ack);
        }
        if !self.send_lag.is_empty() {
            // Same bounds on both sides: addition cannot fail.
            let _ = into.send_lag.add(&self.send_lag);
            self.send_lag.reset();
        }
    }

    /// Adds `other` into this one (merging threads).
    pub fn merge(&mut self, other: &Hists) {
        for (to, from) in self.steps.iter_mut().zip(other.steps.iter()) {
            add_hist(&from.latency, &mut to.latency);
            add_hist(&from.ack, &mut to.ack);
        }
        let _ = self.send_lag.add(&other.send_lag);
    }
}

fn move_hist(from: &mut Option<Histogram<u64>>, to: &mut Option<Histogram<u64>>) {
    if let Some(h) = from {
        if !h.is_empty() {
            let _ = slot(to).add(&*h);
            h.reset();
        }
    }
}

fn add_hist(from: &Option<Histogram<u64>>, to: &mut Option<Histogram<u64>>) {
    if let Some(h) = from {
        if !h.is_empty() {
            let _ = slot(to).add(h);
        }
    }
}

/// Everything one generator thread shares with the control thread.
#[derive(Debug)]
pub struct ThreadStats {
    pub counters: [AtomicU64; C::COUNT],
    pub steps: Vec<StepCounters>,
    /// Histograms moved here by the thread's ticker; read by the control thread.
    pub hists: Mutex<Hists>,
    /// The last flush request this thread has answered.
    pub flushed: AtomicU64,
    /// The first few error messages, for the report.
    pub notes: Mutex<Vec<String>>,
}

/// At most this many error notes per thread (the counters have the totals).
pub const MAX_NOTES: usize = 8;

impl Default for ThreadStats {
    fn default() -> ThreadStats {
        ThreadStats {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            steps: (0..MAX_STEPS).map(|_| StepCounters::default()).collect(),
            hists: Mutex::new(Hists::default()),
            flushed: AtomicU64::new(0),
            notes: Mutex::new(Vec::new()),
        }
    }
}

impl ThreadStats {
    #[inline]
    pub fn add(&self, c: C, n: u64) {
        bump(&self.counters[c as usize], n);
    }

    /// Decrements a gauge only this thread writes.
    #[inline]
    pub fn sub(&self, c: C, n: u64) {
        let a = &self.counters[c as usize];
        a.store(
            a.load(Ordering::Relaxed).saturating_sub(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn get(&self, c: C) -> u64 {
        get(&self.counters[c as usize])
    }

    #[inline]
    pub fn step(&self, step: usize) -> &StepCounters {
        &self.steps[step.min(MAX_STEPS - 1)]
    }

    /// Keeps `message` if it is among the first few distinct ones.
    pub fn note(&self, message: String) {
        if let Ok(mut notes) = self.notes.lock() {
            if notes.len() < MAX_NOTES && !notes.contains(&message) {
                notes.push(message);
            }
        }
    }

    /// Counts a publish error by its HTTP status.
    pub fn status(&self, status: u16) {
        let c = match status {
            400 => C::S400,
            401 => C::S401,
            403 => C::S403,
            413 => C::S413,
            429 => C::S429,
            503 => C::S503,
            402..=499 => C::SOther4xx,
            500..=599 => C::SOther5xx,
            _ => C::SOther,
        };
        self.add(c, 1);
    }

    /// Counts a close code a subscriber received.
    pub fn close_code(&self, code: Option<u16>) {
        let c = match code {
            Some(1000) => C::Close1000,
            Some(1001) => C::Close1001,
            Some(1008) => C::Close1008,
            Some(1011) => C::Close1011,
            Some(1013) => C::Close1013,
            Some(_) => C::CloseOther,
            None => C::CloseEof,
        };
        self.add(c, 1);
    }
}

/// What one arrival means for its subscription's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    InOrder,
    /// Jumped forward over `skipped` seqs (they may still arrive, then as out of order).
    Gap {
        skipped: u64,
    },
    Duplicate,
    OutOfOrder,
}

/// The last seq of one subscription plus a 128-seq window of which earlier ones arrived, so a
/// late arrival can be told apart from a second copy without any allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqTracker {
    last: u64,
    /// Bit i set: seq `last - i` arrived (bit 0 is `last` itself).
    window: u128,
}

impl SeqTracker {
    /// Starts after `last` (the `seq` of the `subscribed` reply; 0 for a new channel).
    pub fn new(last: u64) -> SeqTracker {
        SeqTracker { last, window: 1 }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    #[inline]
    pub fn observe(&mut self, seq: u64) -> SeqOutcome {
        if seq > self.last {
            let jump = seq - self.last;
            self.window = if jump >= 128 {
                1
            } else {
                (self.window << jump) | 1
            };
            self.last = seq;
            if jump == 1 {
                SeqOutcome::InOrder
            } else {
                SeqOutcome::Gap { skipped: jump - 1 }
            }
        } else {
            let back = self.last - seq;
            if back >= 128 {
                // Too old to know; it is late either way.
                return SeqOutcome::OutOfOrder;
            }
            let bit = 1u128 << back;
            if self.window & bit != 0 {
                SeqOutcome::Duplicate
            } else {
                self.window |= bit;
                SeqOutcome::OutOfOrder
            }
        }
    }
}

/// Percentiles of a histogram in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: Option<&Histogram<u64>>) -> Percentiles {
        let Some(h) = h.filter(|h| !h.is_empty()) else {
            return Percentiles::default();
        };
        // Nanoseconds are whole numbers, so microseconds have at most three decimals.
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean().round() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_tells_every_case_apart() {
        let mut t = SeqTracker::new(0);
        assert_eq!(t.observe(1), SeqOutcome::InOrder);
        assert_eq!(t.observe(2), SeqOutcome::InOrder);
        assert_eq!(t.observe(2), SeqOutcome::Duplicate);
        assert_eq!(t.observe(5), SeqOutcome::Gap { skipped: 2 });
        assert_eq!(t.observe(3), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(3), SeqOutcome::Duplicate);
        assert_eq!(t.observe(4), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(1), SeqOutcome::Duplicate);
        assert_eq!(t.observe(6), SeqOutcome::InOrder);
        assert_eq!(t.last(), 6);
        // A jump beyond the window forgets the past; a very old seq is "late".
        assert_eq!(t.observe(1000), SeqOutcome::Gap { skipped: 993 });
        assert_eq!(t.observe(100), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(1000), SeqOutcome::Duplicate);
        assert_eq!(t.observe(999), SeqOutcome::OutOfOrder);
        // Starting from a subscribed reply's seq.
        let mut t = SeqTracker::new(41);
        assert_eq!(t.observe(42), SeqOutcome::InOrder);
        assert_eq!(t.observe(41), SeqOutcome::Duplicate);
    }

    #[test]
    fn histograms_move_and_merge() {
        let mut local = Hists::default();
        let mut shared = Hists::default();
        for v in 1..=1000u64 {
            local.latency(0).saturating_record(v * 1000);
        }
        local.latency(3).saturating_record(5);
        local.ack(1).saturating_record(7);
        local.send_lag.saturating_record(9);
        local.drain_into(&mut shared);
        assert!(local.steps[0].latency.as_ref().unwrap().is_empty());
        assert!(local.send_lag.is_empty());
        assert_eq!(shared.steps[0].latency.as_ref().unwrap().len(), 1000);
        local.latency(0).saturating_record(2_000_000);
        local.drain_into(&mut shared);
        assert_eq!(shared.steps[0].latency.as_ref().unwrap().len(), 1001);

        let mut total = Hists::default();
        total.merge(&shared);
        total.merge(&shared);
        let p = Percentiles::of(total.steps[0].latency.as_ref());
        assert_eq!(p.count, 2002);
        assert!((p.p50 - 500.0).abs() <= 2.0, "p50 {}", p.p50);
        assert!((p.p99 - 990.0).abs() <= 2.0, "p99 {}", p.p99);
        assert!((p.max - 2000.0).abs() <= 2.0, "max {}", p.max);
        assert_eq!(Percentiles::of(total.steps[2].latency.as_ref()).count, 0);
        assert_eq!(total.steps[3].latency.as_ref().unwrap().len(), 2);
        assert_eq!(total.send_lag.len(), 2);
        // Clamped, not lost.
        let mut h = new_histogram();
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn counters_are_single_writer_sums() {
        let t = ThreadStats::default();
        t.add(C::Handshakes, 3);
        t.add(C::Handshakes, 2);
        assert_eq!(t.get(C::Handshakes), 5);
        t.add(C::SubsOpen, 2);
        t.sub(C::SubsOpen, 5);
        assert_eq!(t.get(C::SubsOpen), 0);
        t.status(429);
        t.status(418);
        t.status(502);
        t.status(200);
        assert_eq!(
            (
                t.get(C::S429),
                t.get(C::SOther4xx),
                t.get(C::SOther5xx),
                t.get(C::SOther)
            ),
            (1, 1, 1, 1)
        );
        t.close_code(Some(1013));
        t.close_code(None);
        assert_eq!((t.get(C::Close1013), t.get(C::CloseEof)), (1, 1));
        raise(&t.step(2).last_ack_ns, 10);
        raise(&t.step(2).last_ack_ns, 5);
        assert_eq!(get(&t.step(2).last_ack_ns), 10);
        for i in 0..20 {
            t.note(format!("n{}", i % 10));
        }
        assert_eq!(t.notes.lock().unwrap().len(), MAX_NOTES);
    }
}
