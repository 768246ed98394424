//! Precise wake-ups for open-loop publishers.
//!
//! Owns the one helper thread that wakes publishers when their next event is due. The monoio
//! timer has millisecond resolution and rounds up, so a publisher sleeping on it sends up to
//! ~1 ms late, which would dominate the latency of a fast relay. Spinning instead does not
//! work either: monoio fires timers only when its run queue is empty, so a spinning task
//! starves every timer on its thread. The pacer thread sleeps on a condition variable with
//! nanosecond timeouts (timer slack lowered to 1 ns) and wakes the waiting tasks through
//! monoio's cross-thread wakers (the owning runtime is unparked via its eventfd).
//! **Bound:** one heap entry per waiting publisher and wait (waits are never cancelled; a
//! publisher caps each wait instead). Must never: hold its lock while waking a task.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock::now_ns;

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

    /// A future that completes once `now_ns() >= deadline_ns`.
    pub fn sleep_until(&self, deadline_ns: u64) -> SleepUntil<'_> {
        SleepUntil {
            pacer: self,
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

pub struct SleepUntil<'a> {
    pacer: &'a Pacer,
    deadline_ns: u64,
}

impl Future for SleepUntil<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if now_ns() >= self.deadline_ns || self.pacer.stop.load(Ordering::Relaxed) {
            return Poll::Ready(());
        }
        // Polled again before the deadline (woken by someone else): register again; the
        // stale entry only causes one extra poll.
        self.pacer.register(self.deadline_ns, cx.waker().clone());
        Poll::Pending
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
}
