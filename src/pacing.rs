//! Write pacing: under load, a subscriber connection that wrote a moment ago waits a little
//! before its next write, so that each write carries several events.
//!
//! Owns the shard's hold interval, adapted to how busy the shard's thread is, and the queue of
//! held writers with the task that releases them when they are due.
//!
//! Why: on loopback and on most virtual NICs a socket write costs a few microseconds of kernel
//! time whatever it carries (about 4.7 µs on the build machine), so a shard that writes every
//! event to every subscriber on its own runs out of CPU long before it runs out of bandwidth
//! (1,000 subscribers × 200 events/s is already a whole core of `writev`). Holding a busy
//! connection's next write for a few milliseconds turns N writes of one event into one write
//! of N events.
//!
//! Must never: hold anything while the shard is not busy (the interval is then zero and every
//! event is written as soon as it arrives), or hold a connection that has been quiet for longer
//! than the interval (a lone event goes out at once). A held writer is released by its due
//! time, or earlier by a close; holding never drops or reorders anything.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::config::DeliveryConfig;
use crate::metrics::ShardStats;
use crate::shard::ConnCtl;

/// How often the busy level is measured (at most; lazily, by the writers that ask).
const WINDOW: Duration = Duration::from_millis(50);
/// Busy windows in a row before the hold grows: a burst (one batch publish, one hypervisor
/// hiccup) is not load, and holding after it would only add latency.
const BUSY_WINDOWS_TO_GROW: u32 = 3;
/// The first non-zero hold, and the floor below which a shrinking hold becomes zero.
const MIN_HOLD: Duration = Duration::from_micros(500);
/// The release task's tick while writers are held (monoio's timer has 1 ms resolution).
const TICK: Duration = Duration::from_millis(1);

/// The adaptive hold interval: grows while the shard is busier than `busy_high`, shrinks while
/// it is below `busy_low`, and stays put in the narrow band between. The band is narrow on
/// purpose: a shard that is merely moderately loaded (a latency-sensitive workload at half a
/// core, with the odd busy window) must drop back to zero, not keep a hold it grew in a burst.
#[derive(Debug, Clone, Copy)]
pub struct HoldControl {
    max: Duration,
    busy_high: f64,
    busy_low: f64,
    hold: Duration,
    /// Busy windows in a row so far.
    busy_streak: u32,
}

impl HoldControl {
    pub fn new(config: &DeliveryConfig) -> HoldControl {
        let busy_high = f64::from(config.busy_percent) / 100.0;
        HoldControl {
            max: Duration::from_micros(config.max_hold_us),
            busy_high,
            busy_low: busy_high * 0.85,
            hold: Duration::ZERO,
            busy_streak: 0,
        }
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Takes one measurement: the fraction of the last window the shard's thread was running.
    pub fn observe(&mut self, busy: f64) {
        if self.max.is_zero() {
            return;
        }
        if busy > self.busy_high {
            self.busy_streak = self.busy_streak.saturating_add(1);
            if self.busy_streak >= BUSY_WINDOWS_TO_GROW {
                self.hold = (self.hold * 3 / 2).clamp(MIN_HOLD, self.max);
            }
            return;
        }
        self.busy_streak = 0;
        if busy < self.busy_low {
            self.hold /= 2;
            if self.hold < MIN_HOLD {
                self.hold = Duration::ZERO;
            }
        }
    }
}

struct Held {
    due: Instant,
    ctl: Rc<ConnCtl>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.due.cmp(&other.due)
    }
}

/// One shard's write pacing.
pub struct Pacer {
    control: Cell<HoldControl>,
    window_start: Cell<Instant>,
    window_cpu_ns: Cell<u64>,
    held: RefCell<BinaryHeap<Reverse<Held>>>,
    /// The release task, while it waits for a first held writer.
    waker: Cell<Option<Waker>>,
    stats: Arc<ShardStats>,
}

impl Pacer {
    pub fn new(config: &DeliveryConfig, stats: Arc<ShardStats>) -> Pacer {
        Pacer {
            control: Cell::new(HoldControl::new(config)),
            window_start: Cell::new(Instant::now()),
            window_cpu_ns: Cell::new(thread_cpu_ns()),
            held: RefCell::new(BinaryHeap::new()),
            waker: Cell::new(None),
            stats,
        }
    }

    /// When a connection that last wrote at `last_write` may write next: `None` means now.
    pub fn due(&self, last_write: Instant, now: Instant) -> Option<Instant> {
        self.measure(now);
        let hold = self.control.get().hold();
        if hold.is_zero() {
            return None;
        }
        let due = last_write + hold;
        (due > now).then_some(due)
    }

    /// Wakes `ctl`'s task at `due` (or within the tick after it).
    pub fn hold(&self, ctl: &Rc<ConnCtl>, due: Instant) {
        self.stats.writes_held.inc();
        self.held.borrow_mut().push(Reverse(Held {
            due,
            ctl: ctl.clone(),
        }));
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Releases held writers when they are due; runs for the shard's life.
    pub async fn run(self: Rc<Self>) {
        loop {
            poll_fn(|cx| {
                if self.held.borrow().is_empty() {
                    self.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            monoio::time::sleep(TICK).await;
            self.release(Instant::now());
        }
    }

    fn release(&self, now: Instant) {
        let mut held = self.held.borrow_mut();
        while held.peek().is_some_and(|h| h.0.due <= now) {
            if let Some(Reverse(h)) = held.pop() {
                h.ctl.wake();
            }
        }
    }

    fn measure(&self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start.get());
        if elapsed < WINDOW {
            return;
        }
        let cpu = thread_cpu_ns();
        let used = cpu.saturating_sub(self.window_cpu_ns.get());
        let busy = used as f64 / elapsed.as_nanos().max(1) as f64;
        let mut control = self.control.get();
        control.observe(busy);
        self.control.set(control);
        self.stats
            .write_hold_us
            .set(i64::try_from(control.hold().as_micros()).unwrap_or(i64::MAX));
        self.window_start.set(now);
        self.window_cpu_ns.set(cpu);
    }
}

/// CPU time the calling thread has used, in nanoseconds (0 if the clock is unavailable).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(max_hold_us: u64, busy_percent: u32) -> HoldControl {
        HoldControl::new(&DeliveryConfig {
            max_hold_us,
            busy_percent,
        })
    }

    #[test]
    fn idle_shard_never_holds() {
        let mut c = control(8000, 90);
        for _ in 0..100 {
            c.observe(0.3);
            assert_eq!(c.hold(), Duration::ZERO);
        }
    }

    #[test]
    fn busy_shard_holds_up_to_the_maximum() {
        let mut c = control(8000, 90);
        c.observe(0.95);
        c.observe(0.95);
        assert_eq!(c.hold(), Duration::ZERO, "two busy windows are a burst");
        c.observe(0.95);
        assert_eq!(c.hold(), MIN_HOLD);
        let mut last = c.hold();
        for _ in 0..20 {
            c.observe(0.95);
            assert!(c.hold() >= last, "the hold only grows while busy");
            last = c.hold();
        }
        assert_eq!(c.hold(), Duration::from_micros(8000));
    }

    #[test]
    fn bursts_between_quiet_windows_never_start_a_hold() {
        let mut c = control(8000, 90);
        for _ in 0..50 {
            c.observe(1.0);
            c.observe(1.0);
            c.observe(0.5);
            assert_eq!(c.hold(), Duration::ZERO);
        }
    }

    #[test]
    fn between_the_thresholds_the_hold_stays() {
        let mut c = control(8000, 90);
        for _ in 0..6 {
            c.observe(0.95);
        }
        let held = c.hold();
        assert!(held > Duration::ZERO);
        c.observe(0.8);
        assert_eq!(c.hold(), held, "0.8 is between 0.765 and 0.9");
        c.observe(0.6);
        assert_eq!(c.hold(), held / 2, "a moderately loaded shard lets go");
    }

    #[test]
    fn quiet_shard_lets_go_of_the_hold() {
        let mut c = control(8000, 90);
        for _ in 0..20 {
            c.observe(1.0);
        }
        let mut steps = 0;
        while c.hold() > Duration::ZERO {
            c.observe(0.1);
            steps += 1;
            assert!(steps < 10, "the hold halves each quiet window");
        }
        assert_eq!(steps, 5, "8 ms -> 4 -> 2 -> 1 -> 0.5 -> 0");
    }

    #[test]
    fn zero_maximum_turns_pacing_off() {
        let mut c = control(0, 70);
        c.observe(1.0);
        assert_eq!(c.hold(), Duration::ZERO);
    }

    #[test]
    fn thread_cpu_clock_advances() {
        let before = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > before);
    }

    #[test]
    fn pacer_holds_only_recent_writers_of_a_busy_shard() {
        let stats = Arc::new(ShardStats::new(0));
        let pacer = Pacer::new(
            &DeliveryConfig {
                max_hold_us: 8000,
                busy_percent: 90,
            },
            stats,
        );
        let now = Instant::now();
        assert_eq!(pacer.due(now, now), None, "an idle shard holds nothing");
        let mut c = pacer.control.get();
        for _ in 0..10 {
            c.observe(1.0);
        }
        pacer.control.set(c);
        // A measurement only happens after a window, so it cannot undo the hold here.
        pacer.window_start.set(now);
        let hold = c.hold();
        assert_eq!(pacer.due(now, now), Some(now + hold), "just wrote: held");
        let long_ago = now.checked_sub(hold * 2).unwrap_or(now);
        if long_ago < now {
            assert_eq!(pacer.due(long_ago, now), None, "quiet writer: at once");
        }
    }

    #[test]
    fn release_wakes_only_the_due() {
        let stats = Arc::new(ShardStats::new(0));
        let pacer = Pacer::new(&DeliveryConfig::default(), stats.clone());
        let now = Instant::now();
        let a = Rc::new(ConnCtl::new(1, "127.0.0.1:1".parse().unwrap(), false));
        let b = Rc::new(ConnCtl::new(2, "127.0.0.1:2".parse().unwrap(), false));
        pacer.hold(&a, now);
        pacer.hold(&b, now + Duration::from_secs(60));
        pacer.release(now);
        assert_eq!(pacer.held.borrow().len(), 1, "b is not due");
        assert_eq!(stats.writes_held.get(), 2);
    }
}
