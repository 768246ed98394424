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
//! "Busy" is the share of the time the shard's thread had work: running, or ready to run and
//! waiting for a CPU (the scheduler's run delay, from `/proc/thread-self/schedstat`). CPU time
//! alone is not enough: a shard sharing its core with another busy thread (a second shard, a
//! load generator, a sidecar) gets half the core however much work it has, and measured by CPU
//! time it would never look busy, so it would write every event on its own exactly when it can
//! least afford to.
//!
//! Must never: hold anything while the shard is not busy (the interval is then zero and every
//! event is written as soon as it arrives), or hold a connection that has been quiet for longer
//! than the interval (a lone event goes out at once). A held writer is released by its due
//! time, or earlier by a close; holding never drops or reorders anything.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::future::poll_fn;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::config::DeliveryConfig;
use crate::metrics::ShardStats;
use crate::shard::ConnCtl;

/// How often the demand level is measured (at most; lazily, by the writers that ask).
const WINDOW: Duration = Duration::from_millis(50);
/// Busy windows in a row before the hold grows: a burst (one batch publish, one hypervisor
/// hiccup) is not load, and holding after it would only add latency.
const BUSY_WINDOWS_TO_GROW: u32 = 3;
/// Quiet windows in a row before the hold shrinks: a hold lowers the demand that grew it, and
/// letting go at the first quiet window makes a saturated shard swing between holding and
/// writing every event (measured: 2 shards sharing their cores with the load generator).
const QUIET_WINDOWS_TO_SHRINK: u32 = 3;
/// The first non-zero hold, and the floor below which a shrinking hold becomes zero.
const MIN_HOLD: Duration = Duration::from_micros(500);
/// The release task's tick while writers are held (monoio's timer has 1 ms resolution).
const TICK: Duration = Duration::from_millis(1);

/// The adaptive hold interval: grows while the shard is busier than `busy_high`, shrinks while
/// it is below `busy_low` (each after three windows in a row), and stays put in the narrow
/// band between. The band is narrow on purpose: a shard that is merely moderately loaded (a
/// latency-sensitive workload at half a core, with the odd busy window) must drop back to
/// zero, not keep a hold it grew in a burst.
#[derive(Debug, Clone, Copy)]
pub struct HoldControl {
    max: Duration,
    busy_high: f64,
    busy_low: f64,
    hold: Duration,
    /// Busy windows in a row so far.
    busy_streak: u32,
    /// Quiet windows in a row so far.
    quiet_streak: u32,
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
            quiet_streak: 0,
        }
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Takes one measurement: the fraction of the last window the shard's thread had work
    /// (running, or ready and waiting for a CPU).
    pub fn observe(&mut self, busy: f64) {
        if self.max.is_zero() {
            return;
        }
        if busy >= self.busy_low {
            self.quiet_streak = 0;
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
            self.quiet_streak = self.quiet_streak.saturating_add(1);
            if self.quiet_streak < QUIET_WINDOWS_TO_SHRINK {
                return;
            }
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
    demand: DemandClock,
    window_demand_ns: Cell<u64>,
    held: RefCell<BinaryHeap<Reverse<Held>>>,
    /// The release task, while it waits for a first held writer.
    waker: Cell<Option<Waker>>,
    stats: Arc<ShardStats>,
}

impl Pacer {
    pub fn new(config: &DeliveryConfig, stats: Arc<ShardStats>) -> Pacer {
        let demand = DemandClock::for_this_thread();
        Pacer {
            control: Cell::new(HoldControl::new(config)),
            window_start: Cell::new(Instant::now()),
            window_demand_ns: Cell::new(demand.now_ns()),
            demand,
            held: RefCell::new(BinaryHeap::new()),
            waker: Cell::new(None),
            stats,
        }
    }

    /// The current hold interval; zero while the shard is not busy.
    pub fn hold_interval(&self) -> Duration {
        self.control.get().hold()
    }

    /// Whether some writer is held now.
    pub fn holding(&self) -> bool {
        !self.held.borrow().is_empty()
    }

    /// Sets the hold interval as if the shard had grown it to `hold`.
    #[cfg(test)]
    pub fn set_hold(&self, hold: Duration) {
        let mut control = self.control.get();
        control.hold = hold;
        self.control.set(control);
    }

    /// When a connection that last wrote at `last_write` may write next: `None` means now.
    pub fn due(&self, last_write: Instant, now: Instant) -> Option<Instant> {
        self.measure(now);
        let hold = self.hold_interval();
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
        let demand = self.demand.now_ns();
        let used = demand.saturating_sub(self.window_demand_ns.get());
        let busy = used as f64 / elapsed.as_nanos().max(1) as f64;
        let mut control = self.control.get();
        control.observe(busy);
        self.control.set(control);
        self.stats
            .write_hold_us
            .set(i64::try_from(control.hold().as_micros()).unwrap_or(i64::MAX));
        self.window_start.set(now);
        self.window_demand_ns.set(demand);
    }
}

/// The time one thread has had work: its CPU time plus its run delay (ready to run, waiting
/// for a CPU). Must be created and read on the thread it measures. Where the kernel does not
/// expose the run delay it counts CPU time alone.
struct DemandClock {
    schedstat: Option<File>,
}

impl DemandClock {
    fn for_this_thread() -> DemandClock {
        let schedstat = File::open("/proc/thread-self/schedstat")
            .ok()
            .filter(|f| read_run_delay_ns(f).is_some());
        DemandClock { schedstat }
    }

    /// CPU time comes from the thread's CPU clock, exact at the call; schedstat's run time is
    /// brought up to date only at scheduler ticks. The run delay is exact: it only grows while
    /// the thread is off the CPU, and the caller is on it.
    fn now_ns(&self) -> u64 {
        let run_delay = self.schedstat.as_ref().and_then(read_run_delay_ns);
        thread_cpu_ns().saturating_add(run_delay.unwrap_or(0))
    }
}

fn read_run_delay_ns(file: &File) -> Option<u64> {
    let mut buf = [0u8; 96];
    let n = file.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(buf.get(..n)?).ok()?;
    crate::schedstat::parse_schedstat(text).map(|(_cpu, run_delay)| run_delay)
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

    /// A control (8 ms, 90%) after `windows` fully busy windows.
    fn holding_after(windows: usize) -> HoldControl {
        let mut c = control(8000, 90);
        for _ in 0..windows {
            c.observe(1.0);
        }
        c
    }

    #[test]
    fn between_the_thresholds_the_hold_stays() {
        let mut c = holding_after(6);
        let held = c.hold();
        assert!(held > Duration::ZERO);
        for _ in 0..10 {
            c.observe(0.8);
            assert_eq!(c.hold(), held, "0.8 is between 0.765 and 0.9");
        }
        c.observe(0.6);
        c.observe(0.6);
        assert_eq!(
            c.hold(),
            held,
            "two quiet windows may be the hold's own effect"
        );
        c.observe(0.6);
        assert_eq!(c.hold(), held / 2, "a moderately loaded shard lets go");
    }

    #[test]
    fn quiet_windows_must_come_in_a_row() {
        let mut c = holding_after(20);
        let held = c.hold();
        for _ in 0..20 {
            c.observe(0.1);
            c.observe(0.1);
            c.observe(0.8);
        }
        assert_eq!(
            c.hold(),
            held,
            "a window in the band breaks the quiet streak"
        );
    }

    #[test]
    fn quiet_shard_lets_go_of_the_hold() {
        let mut c = holding_after(20);
        let mut steps = 0;
        while c.hold() > Duration::ZERO {
            c.observe(0.1);
            steps += 1;
            assert!(
                steps <= 7,
                "after three quiet windows the hold halves each window"
            );
        }
        assert_eq!(
            steps, 7,
            "two windows of patience, then 8 ms -> 4 -> 2 -> 1 -> 0.5 -> 0"
        );
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
    fn demand_clock_counts_work_and_not_sleep() {
        let clock = DemandClock::for_this_thread();
        let before = clock.now_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(clock.now_ns() > before);
        let asleep = clock.now_ns();
        std::thread::sleep(Duration::from_millis(100));
        let slept_ns = clock.now_ns() - asleep;
        assert!(
            slept_ns < 60_000_000,
            "sleeping is not demand: {slept_ns} ns"
        );
    }

    /// Pins the calling thread to one CPU; false where that is not allowed.
    fn pin_to_first_allowed_cpu() -> bool {
        // SAFETY: both calls get a valid cpu_set_t of the size they are told.
        unsafe {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
                return false;
            }
            let Some(cpu) = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &allowed))
            else {
                return false;
            };
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            libc::sched_setaffinity(0, size, &one) == 0
        }
    }

    #[test]
    fn a_thread_sharing_its_cpu_has_more_demand_than_cpu_time() {
        let spin = |measure: bool| {
            move || {
                if !pin_to_first_allowed_cpu() {
                    return None;
                }
                let clock = DemandClock::for_this_thread();
                clock.schedstat.as_ref()?;
                let (demand, cpu) = (clock.now_ns(), thread_cpu_ns());
                let start = Instant::now();
                let mut x = 0u64;
                while start.elapsed() < Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                measure.then(|| (clock.now_ns() - demand, thread_cpu_ns() - cpu))
            }
        };
        let rival = std::thread::spawn(spin(false));
        let measured = std::thread::spawn(spin(true)).join().expect("spinner");
        let _ = rival.join();
        if let Some((demand_ns, cpu_ns)) = measured {
            // Two spinners on one CPU each run about half the time and wait the other half.
            assert!(
                demand_ns >= cpu_ns + 50_000_000,
                "demand {demand_ns} ns, cpu {cpu_ns} ns: the wait for the CPU is not counted"
            );
        }
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
