//! Precise wake-ups for open-loop publishers.
//!
//! The monoio timer has millisecond resolution and rounds up, so a publisher sleeping on it
//! sends up to ~1 ms late, which would dominate the latency of a fast relay. Spinning instead
//! does not work either: monoio fires timers only when its run queue is empty, so a spinning
//! task starves every timer on its thread. Two services wake a publisher at its due time
//! instead, with nanosecond precision:
//! - [`RingAlarm`], on an io_uring thread: one timerfd per generator thread, read through the
//!   thread's own ring. The kernel completes the read when the timer fires, so the thread
//!   wakes straight from its wait with nothing in between.
//! - [`Pacer`], on an epoll thread (monoio's epoll driver cannot wait on a timerfd): one helper
//!   thread per run that sleeps on a condition variable with nanosecond timeouts (timer slack
//!   lowered to 1 ns) and wakes the waiting tasks through monoio's cross-thread wakers (the
//!   owning runtime is unparked via its eventfd). Each wake-up costs two context switches more
//!   than the ring's: in the channels scenario the helper thread and its switches were a third
//!   of the generator's CPU.
//!
//! **Bound:** one heap entry per waiting publisher and wait (waits are never cancelled; a
//! publisher caps each wait instead). Must never: hold the pacer's lock while waking a task;
//! leave a waiter asleep after a stop.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock::{arm_timerfd_at, mono_ns, now_ns, TimerFd};

/// The longest the pacer sleeps without looking at its stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(50);

struct Entry {
    deadline_ns: u64,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        (self.deadline_ns, self.seq) == (other.deadline_ns, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    // Reversed: the heap's top is the earliest deadline.
    fn cmp(&self, other: &Entry) -> CmpOrdering {
        (other.deadline_ns, other.seq).cmp(&(self.deadline_ns, self.seq))
    }
}

/// The process's wake-up service (one per run).
#[derive(Default)]
pub struct Pacer {
    heap: Mutex<BinaryHeap<Entry>>,
    cv: Condvar,
    stop: AtomicBool,
    seq: AtomicU64,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer").finish_non_exhaustive()
    }
}

impl Pacer {
    /// Starts the pacer thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let pacer = self.clone();
        std::thread::Builder::new()
            .name("loadgen-pacer".into())
            .spawn(move || pacer.run())
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// A future that completes once `now_ns() >= deadline_ns` (or at once after a stop).
    pub fn sleep_until(&self, deadline_ns: u64) -> SleepUntil<'_, Pacer> {
        SleepUntil {
            service: self,
            deadline_ns,
        }
    }

    fn register(&self, deadline_ns: u64, waker: Waker) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let Ok(mut heap) = self.heap.lock() else {
            // A poisoned lock means the pacer thread panicked: wake at once rather than never.
            waker.wake();
            return;
        };
        let earliest = heap.peek().is_none_or(|top| deadline_ns < top.deadline_ns);
        heap.push(Entry {
            deadline_ns,
            seq,
            waker,
        });
        drop(heap);
        if earliest {
            self.cv.notify_one();
        }
    }

    fn run(&self) {
        // The default 50 µs timer slack would be most of the precision we are here for.
        // SAFETY: prctl(PR_SET_TIMERSLACK) affects only the calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let mut due: Vec<Waker> = Vec::new();
        let Ok(mut heap) = self.heap.lock() else {
            return;
        };
        while !self.stop.load(Ordering::Relaxed) {
            let now = now_ns();
            while heap.peek().is_some_and(|top| top.deadline_ns <= now) {
                if let Some(e) = heap.pop() {
                    due.push(e.waker);
                }
            }
            if !due.is_empty() {
                drop(heap);
                for w in due.drain(..) {
                    w.wake();
                }
                heap = match self.heap.lock() {
                    Ok(h) => h,
                    Err(_) => return,
                };
                continue;
            }
            let wait = heap
                .peek()
                .map_or(IDLE_WAIT, |top| Duration::from_nanos(top.deadline_ns - now))
                .min(IDLE_WAIT);
            heap = match self.cv.wait_timeout(heap, wait) {
                Ok((h, _)) => h,
                Err(_) => return,
            };
        }
        // Whoever still waits is woken, so nothing hangs on a stopped pacer.
        for e in heap.drain() {
            e.waker.wake();
        }
    }
}

/// What a wake-up service offers [`SleepUntil`].
pub trait Wakeups {
    /// Once true, every sleep ends at once.
    fn stopped(&self) -> bool;
    /// Wakes `waker` once `now_ns() >= deadline_ns` (or at the stop).
    fn register(&self, deadline_ns: u64, waker: Waker);
}

impl Wakeups for Pacer {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn register(&self, deadline_ns: u64, waker: Waker) {
        Pacer::register(self, deadline_ns, waker);
    }
}

pub struct SleepUntil<'a, S: Wakeups> {
    service: &'a S,
    deadline_ns: u64,
}

impl<S: Wakeups> Future for SleepUntil<'_, S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if now_ns() >= self.deadline_ns || self.service.stopped() {
            return Poll::Ready(());
        }
        // Polled again before the deadline (woken by someone else): register again; the
        // stale entry only causes one extra poll.
        self.service.register(self.deadline_ns, cx.waker().clone());
        Poll::Pending
    }
}

/// One io_uring thread's wake-up service: a timerfd armed for the earliest waiter and read
/// through the thread's ring by [`RingAlarm::run`]. Everything here runs on that one thread.
pub struct RingAlarm {
    timer: monoio::fs::File,
    heap: RefCell<BinaryHeap<Entry>>,
    /// The deadline the timer is armed for (`now_ns` time); `u64::MAX` while disarmed.
    armed_ns: Cell<u64>,
    seq: Cell<u64>,
    /// `mono_ns() - now_ns()`: arms the timer (monotonic clock) for a `now_ns` deadline.
    mono_offset_ns: u64,
    stopped: Cell<bool>,
    /// The ring could not read the timer: waiters use the pacer thread instead.
    failed: Cell<bool>,
}

impl RingAlarm {
    /// Must be called on the io_uring runtime's thread that will run [`RingAlarm::run`].
    pub fn new() -> io::Result<RingAlarm> {
        let timer = TimerFd::new()?;
        let timer = monoio::fs::File::from_std(std::fs::File::from(timer.into_owned_fd()))?;
        let now = now_ns();
        Ok(RingAlarm {
            timer,
            heap: RefCell::new(BinaryHeap::new()),
            armed_ns: Cell::new(u64::MAX),
            seq: Cell::new(0),
            mono_offset_ns: mono_ns().saturating_sub(now),
            stopped: Cell::new(false),
            failed: Cell::new(false),
        })
    }

    /// A future that completes once `now_ns() >= deadline_ns` (or at once after a stop).
    pub fn sleep_until(&self, deadline_ns: u64) -> SleepUntil<'_, RingAlarm> {
        SleepUntil {
            service: self,
            deadline_ns,
        }
    }

    /// Wakes every waiter now and ends [`RingAlarm::run`].
    pub fn stop(&self) {
        self.stopped.set(true);
        self.arm(now_ns());
    }

    /// False once the ring failed to read the timer.
    pub fn works(&self) -> bool {
        !self.failed.get()
    }

    /// Waits on the timer and wakes whoever is due, until stopped. A failed read (the ring
    /// refused the fd) ends it: its waiters wake and [`RingAlarm::works`] turns false.
    pub async fn run(&self) {
        let mut count = vec![0u8; 8];
        while !self.stopped.get() {
            // u64::MAX is offset -1: "the current position", which is what a timerfd has.
            let (read, back) = self.timer.read_at(count, u64::MAX).await;
            count = back;
            if let Err(e) = read {
                if e.kind() != io::ErrorKind::WouldBlock {
                    self.failed.set(true);
                    self.stopped.set(true);
                }
            }
            self.armed_ns.set(u64::MAX);
            self.wake_due();
        }
        for e in self.heap.borrow_mut().drain() {
            e.waker.wake();
        }
    }

    fn wake_due(&self) {
        let now = now_ns();
        let mut due = Vec::new();
        {
            let mut heap = self.heap.borrow_mut();
            while heap.peek().is_some_and(|top| top.deadline_ns <= now) {
                if let Some(e) = heap.pop() {
                    due.push(e.waker);
                }
            }
            if let Some(top) = heap.peek() {
                let next = top.deadline_ns;
                drop(heap);
                self.arm(next);
            }
        }
        for w in due {
            w.wake();
        }
    }

    fn register(&self, deadline_ns: u64, waker: Waker) {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        self.heap.borrow_mut().push(Entry {
            deadline_ns,
            seq,
            waker,
        });
        if deadline_ns < self.armed_ns.get() {
            self.arm(deadline_ns);
        }
    }

    fn arm(&self, deadline_ns: u64) {
        self.armed_ns.set(deadline_ns);
        arm_timerfd_at(
            self.timer.as_raw_fd(),
            deadline_ns.saturating_add(self.mono_offset_ns),
        );
    }
}

impl Wakeups for RingAlarm {
    fn stopped(&self) -> bool {
        self.stopped.get()
    }

    fn register(&self, deadline_ns: u64, waker: Waker) {
        RingAlarm::register(self, deadline_ns, waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_each_waiter_at_its_deadline_in_order() {
        let pacer = Arc::new(Pacer::default());
        let thread = pacer.start().unwrap();
        let counts: Vec<Arc<Count>> = (0..3)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let now = now_ns();
        // Registered out of order.
        for (i, delay_ms) in [(2usize, 30u64), (0, 10), (1, 20)] {
            pacer.register(now + delay_ms * 1_000_000, Waker::from(counts[i].clone()));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while counts.iter().any(|c| c.0.load(Ordering::SeqCst) == 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        for c in &counts {
            assert_eq!(c.0.load(Ordering::SeqCst), 1);
        }
        assert!(now_ns() >= now + 30_000_000);
        // Stopping wakes whoever still waits.
        let late = Arc::new(Count(AtomicUsize::new(0)));
        pacer.register(now_ns() + 60_000_000_000, Waker::from(late.clone()));
        pacer.stop();
        thread.join().unwrap();
        assert_eq!(late.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn entries_order_by_deadline_then_arrival() {
        let w = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut heap = BinaryHeap::new();
        for (d, s) in [(5u64, 0u64), (1, 1), (5, 2), (3, 3)] {
            heap.push(Entry {
                deadline_ns: d,
                seq: s,
                waker: w.clone(),
            });
        }
        let order: Vec<(u64, u64)> =
            std::iter::from_fn(|| heap.pop().map(|e| (e.deadline_ns, e.seq))).collect();
        assert_eq!(order, vec![(1, 1), (3, 3), (5, 0), (5, 2)]);
    }

    /// Runs `f` on an io_uring runtime, as a generator thread does.
    fn on_ring<F: Future<Output = ()>>(f: impl FnOnce() -> F) {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("an io_uring runtime (the build machines have io_uring)");
        rt.block_on(f());
    }

    #[test]
    fn ring_alarm_wakes_each_sleeper_at_its_deadline_in_order_and_stop_wakes_the_rest() {
        on_ring(|| async {
            let alarm = std::rc::Rc::new(RingAlarm::new().expect("a timerfd"));
            let runner = monoio::spawn({
                let alarm = alarm.clone();
                async move { alarm.run().await }
            });
            let woke: std::rc::Rc<RefCell<Vec<(usize, u64)>>> = Default::default();
            let start = now_ns();
            let mut sleepers = Vec::new();
            // Registered out of order; each one's wait re-arms the timer only when earlier.
            for (i, delay_ms) in [(2usize, 30u64), (0, 10), (1, 20)] {
                let (alarm, woke) = (alarm.clone(), woke.clone());
                sleepers.push(monoio::spawn(async move {
                    let deadline = start + delay_ms * 1_000_000;
                    alarm.sleep_until(deadline).await;
                    woke.borrow_mut().push((i, now_ns()));
                    assert!(now_ns() >= deadline, "sleeper {i} woke before its deadline");
                }));
            }
            // Bounded, so a timer that never fires fails the test instead of hanging it.
            let bound = Duration::from_secs(5);
            for s in sleepers {
                monoio::time::timeout(bound, s)
                    .await
                    .expect("every sleeper woken");
            }
            let order: Vec<usize> = woke.borrow().iter().map(|w| w.0).collect();
            assert_eq!(order, vec![0, 1, 2]);
            assert!(alarm.works());
            // A sleeper an hour out is woken by the stop, and the alarm's task ends.
            let late = monoio::spawn({
                let alarm = alarm.clone();
                async move { alarm.sleep_until(now_ns() + 3_600_000_000_000).await }
            });
            monoio::time::sleep(Duration::from_millis(5)).await;
            alarm.stop();
            monoio::time::timeout(bound, late)
                .await
                .expect("the stop wakes a sleeper");
            monoio::time::timeout(bound, runner)
                .await
                .expect("the stop ends the alarm's task");
        });
    }
}
