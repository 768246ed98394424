//! Generator threads: one monoio runtime per thread, connections spread over threads.
//!
//! Owns `Shared` (what the control thread and every generator thread both see: the plan, the
//! phase being run, stop and flush requests, each thread's statistics block), `Ctx` (one
//! thread's own state, `Rc`/`RefCell`, never `Send`), starting the threads with io_uring and
//! falling back to epoll, the per-thread ticker that moves histograms where the control thread
//! can merge them, and the stop sequence: every live connection is shut down (so reads in
//! flight return instead of being cancelled), tasks get a bounded time to finish, and the
//! runtime is dropped. **Invariant:** a thread writes only its own `ThreadStats`; the control
//! thread only reads them (and the histogram mutex it takes a few times a second).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock::{now_ns, MAX_STEPS};
use crate::error::LoadgenError;
use crate::options::{Driver, Options, Scenario};
use crate::pacer::{Pacer, RingAlarm};
use crate::stats::{Hists, ThreadStats, C};
use crate::{net, publisher, subscriber};

/// io_uring submission queue entries per thread (completions are twice that).
const IO_URING_ENTRIES: u32 = 4096;
/// How often a thread moves its histograms to the shared copy unasked.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How often idle waits look at the shared state (phase changes, stop, admission).
pub const POLL: Duration = Duration::from_millis(1);
/// At stop, how long tasks get to notice and finish.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The publish step currently running. The control thread writes the fields, then bumps
/// `generation` (release); a publisher that sees a new generation (acquire) reads them once.
#[derive(Debug, Default)]
pub struct Phase {
    pub generation: AtomicU64,
    pub step: AtomicUsize,
    pub start_ns: AtomicU64,
    pub end_ns: AtomicU64,
    /// Events per second over all publishers; 0 = closed loop.
    pub rate: AtomicU64,
    /// Past this, publishers give up on the step's remaining events and replies.
    pub bound_ns: AtomicU64,
}

/// A snapshot of [`Phase`] as a publisher runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseSnapshot {
    pub generation: u64,
    pub step: usize,
    pub start_ns: u64,
    pub end_ns: u64,
    pub rate: u64,
    pub bound_ns: u64,
}

impl Phase {
    pub fn publish(&self, step: usize, start_ns: u64, end_ns: u64, rate: u64, bound_ns: u64) {
        self.step.store(step, Ordering::Relaxed);
        self.start_ns.store(start_ns, Ordering::Relaxed);
        self.end_ns.store(end_ns, Ordering::Relaxed);
        self.rate.store(rate, Ordering::Relaxed);
        self.bound_ns.store(bound_ns, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn snapshot(&self) -> PhaseSnapshot {
        let generation = self.generation.load(Ordering::Acquire);
        PhaseSnapshot {
            generation,
            step: self.step.load(Ordering::Relaxed),
            start_ns: self.start_ns.load(Ordering::Relaxed),
            end_ns: self.end_ns.load(Ordering::Relaxed),
            rate: self.rate.load(Ordering::Relaxed),
            bound_ns: self.bound_ns.load(Ordering::Relaxed),
        }
    }
}

/// What every thread of one run sees.
#[derive(Debug)]
pub struct Shared {
    pub opts: Options,
    /// `Host` header value.
    pub host: String,
    /// Channel names of this run (`lg.<run id>.<n>`): unique per run, so a channel's history
    /// holds only this run's events and seq starts at 1.
    pub channels: Vec<Box<[u8]>>,
    /// Subscriber connections on each channel (the expected deliveries of one event).
    pub subs_per_channel: Vec<u64>,
    pub thread_count: usize,
    pub source_ips: usize,
    /// Read buffer per subscriber connection.
    pub read_buf: usize,
    pub stats: Vec<ThreadStats>,
    pub stop: AtomicBool,
    /// Subscriber connections (global index) allowed to connect: raised step by step (idle).
    pub admit: AtomicUsize,
    /// Connect scenario: connectors with an index below this are active.
    pub concurrency: AtomicUsize,
    pub phase: Phase,
    /// The step currently running and when each step started (ns), to file deliveries under
    /// the step their event was scheduled in.
    pub current_step: AtomicUsize,
    pub step_starts: [AtomicU64; MAX_STEPS],
    pub flush_epoch: AtomicU64,
    /// Which driver each thread runs (0 unknown, 1 io_uring, 2 epoll).
    pub drivers: Vec<AtomicUsize>,
    /// Wakes publishers when their next event is due.
    pub pacer: Arc<Pacer>,
}

impl Shared {
    pub fn new(opts: &Options, run_id: &str) -> Shared {
        let thread_count = opts.thread_count();
        let channels: Vec<Box<[u8]>> = (0..opts.channels.max(1))
            .map(|i| format!("lg.{run_id}.{i}").into_bytes().into_boxed_slice())
            .collect();
        let mut subs_per_channel = vec![0u64; channels.len()];
        for i in 0..opts.subscriber_connections() {
            subs_per_channel[i % channels.len()] += 1;
        }
        let conns = opts.subscriber_connections().max(1);
        // A large buffer makes every read carry many frames; bound the total so thousands of
        // idle connections do not cost gigabytes.
        let read_buf = (256usize << 20) / conns;
        let read_buf = read_buf.clamp(4 << 10, 64 << 10);
        Shared {
            host: opts.target.to_string(),
            channels,
            subs_per_channel,
            thread_count,
            source_ips: opts.source_ip_count(),
            read_buf,
            stats: (0..thread_count).map(|_| ThreadStats::default()).collect(),
            stop: AtomicBool::new(false),
            admit: AtomicUsize::new(0),
            concurrency: AtomicUsize::new(0),
            phase: Phase::default(),
            current_step: AtomicUsize::new(0),
            step_starts: std::array::from_fn(|_| AtomicU64::new(0)),
            flush_epoch: AtomicU64::new(0),
            drivers: (0..thread_count).map(|_| AtomicUsize::new(0)).collect(),
            pacer: Arc::new(Pacer::default()),
            opts: opts.clone(),
        }
    }

    /// The step event scheduled at `sched_ns` belongs to.
    #[inline]
    pub fn step_of(&self, sched_ns: u64) -> usize {
        let mut s = self.current_step.load(Ordering::Relaxed).min(MAX_STEPS - 1);
        while s > 0 && sched_ns < self.step_starts[s].load(Ordering::Relaxed) {
            s -= 1;
        }
        s
    }

    /// Sum of a counter over threads.
    pub fn total(&self, c: C) -> u64 {
        self.stats.iter().map(|t| t.get(c)).sum()
    }

    /// Sum of a per-step counter over threads.
    pub fn step_total(
        &self,
        step: usize,
        f: impl Fn(&crate::stats::StepCounters) -> &AtomicU64,
    ) -> u64 {
        self.step_values(step, f).sum()
    }

    /// Max of a per-step counter over threads.
    pub fn step_max(
        &self,
        step: usize,
        f: impl Fn(&crate::stats::StepCounters) -> &AtomicU64,
    ) -> u64 {
        self.step_values(step, f).max().unwrap_or(0)
    }

    /// A per-step counter's value on each thread.
    fn step_values<'a>(
        &'a self,
        step: usize,
        f: impl Fn(&crate::stats::StepCounters) -> &AtomicU64 + 'a,
    ) -> impl Iterator<Item = u64> + 'a {
        self.stats
            .iter()
            .map(move |t| f(t.step(step)).load(Ordering::Relaxed))
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// One generator thread's own state.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub index: usize,
    /// Histograms recorded without a lock; the ticker moves them to `stats().hists`.
    pub hists: RefCell<Hists>,
    /// Live sockets (and whether they speak WebSocket), shut down at stop.
    fds: RefCell<HashMap<RawFd, bool>>,
    /// Tasks that must finish before the thread ends.
    live: Cell<usize>,
    pub stopping: Cell<bool>,
    /// The precise wake-up service of an io_uring thread (`None`: the shared pacer thread).
    alarm: Option<Rc<RingAlarm>>,
}

impl Ctx {
    #[inline]
    pub fn stats(&self) -> &ThreadStats {
        &self.shared.stats[self.index]
    }

    #[inline]
    pub fn opts(&self) -> &Options {
        &self.shared.opts
    }

    pub fn stopping(&self) -> bool {
        self.stopping.get() || self.shared.stopping()
    }

    /// Waits until `now_ns() >= deadline_ns`, precisely (see [`crate::pacer`]).
    pub async fn sleep_until(&self, deadline_ns: u64) {
        match &self.alarm {
            Some(alarm) if alarm.works() => alarm.sleep_until(deadline_ns).await,
            _ => self.shared.pacer.sleep_until(deadline_ns).await,
        }
    }

    pub fn register_fd(&self, fd: RawFd, websocket: bool) {
        self.fds.borrow_mut().insert(fd, websocket);
    }

    /// Must be called before the socket is closed (so a reused fd number is never shut).
    pub fn deregister_fd(&self, fd: RawFd) {
        self.fds.borrow_mut().remove(&fd);
    }

    /// Counts a task as live until the guard drops.
    pub fn task(self: &Rc<Self>) -> TaskGuard {
        self.live.set(self.live.get() + 1);
        TaskGuard(self.clone())
    }

    fn flush(&self) {
        let mut local = self.hists.borrow_mut();
        if let Ok(mut shared) = self.stats().hists.lock() {
            local.drain_into(&mut shared);
        }
    }
}

pub struct TaskGuard(Rc<Ctx>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.live.set(self.0.live.get().saturating_sub(1));
    }
}

/// A wake-up for one waiting task on the same thread; a notify with no waiter is kept.
#[derive(Default)]
pub struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn notified(&self) -> Notified<'_> {
        Notified(self)
    }
}

pub struct Notified<'a>(&'a Notify);

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.flag.replace(false) {
            return Poll::Ready(());
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The running threads.
pub struct Pool {
    pub shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    pacer: Option<JoinHandle<()>>,
}

impl Pool {
    /// Starts every thread and waits until each has a runtime.
    pub fn start(shared: Arc<Shared>) -> Result<Pool, LoadgenError> {
        let pacer = shared.pacer.start().map_err(LoadgenError::Thread)?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), LoadgenError>>();
        let mut handles = Vec::with_capacity(shared.thread_count);
        for index in 0..shared.thread_count {
            let shared2 = shared.clone();
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("loadgen-{index}"))
                .spawn(move || thread_main(shared2, index, ready))
                .map_err(LoadgenError::Thread);
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.stop.store(true, Ordering::Relaxed);
                    shared.pacer.stop();
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        let pool = Pool {
            shared,
            handles,
            pacer: Some(pacer),
        };
        for _ in 0..pool.handles.len() {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    pool.shared.stop.store(true, Ordering::Relaxed);
                    pool.shared.pacer.stop();
                    return Err(e);
                }
                Err(_) => break,
            }
        }
        Ok(pool)
    }

    /// Asks every thread for its histograms and waits (bounded) until each answered.
    pub fn flush(&self) {
        let epoch = self.shared.flush_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let done = self
                .shared
                .stats
                .iter()
                .zip(&self.handles)
                .all(|(s, h)| s.flushed.load(Ordering::Acquire) >= epoch || h.is_finished());
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The drivers the threads run, e.g. "io_uring" or "io_uring+epoll".
    pub fn driver_names(&self) -> String {
        let mut uring = false;
        let mut epoll = false;
        for d in &self.shared.drivers {
            match d.load(Ordering::Relaxed) {
                1 => uring = true,
                2 => epoll = true,
                _ => {}
            }
        }
        match (uring, epoll) {
            (true, true) => "io_uring+epoll".into(),
            (true, false) => "io_uring".into(),
            (false, true) => "epoll".into(),
            _ => "unknown".into(),
        }
    }

    /// Stops every thread and joins them, waiting at most `bound`.
    pub fn stop(self, bound: Duration) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + bound;
        for h in self.handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
            // A thread still running past the bound is left detached rather than blocking the
            // caller; it ends at its own stop grace.
        }
        // After the workers: a publisher still waiting is woken by the pacer's stop.
        self.shared.pacer.stop();
        if let Some(p) = self.pacer {
            let _ = p.join();
        }
    }
}

fn thread_main(shared: Arc<Shared>, index: usize, ready: mpsc::Sender<Result<(), LoadgenError>>) {
    let pins = &shared.opts.pin_cpus;
    if !pins.is_empty() {
        let cpu = pins[index % pins.len()];
        if !net::pin_to_cpu(cpu) {
            shared.stats[index].note(format!("thread {index}: could not pin to CPU {cpu}"));
        }
    }
    use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
    // COOP_TASKRUN, as relay's shards do: a completion (a subscriber's read, mostly) waits for
    // this thread's next entry into the kernel instead of interrupting it. In the fan-out
    // scenario the interrupts took 12% of the generator's CPU. Kernels before 5.19 refuse the
    // flag and get the plain ring.
    let uring = || {
        let build = |ring| {
            RuntimeBuilder::<IoUringDriver>::new()
                .uring_builder(ring)
                .with_entries(IO_URING_ENTRIES)
                .enable_timer()
                .build()
        };
        let mut cooperative = io_uring::IoUring::builder();
        cooperative.setup_coop_taskrun();
        build(cooperative).or_else(|_| build(io_uring::IoUring::builder()))
    };
    let legacy = || {
        RuntimeBuilder::<LegacyDriver>::new()
            .with_entries(IO_URING_ENTRIES)
            .enable_timer()
            .build()
    };
    let fail = |source| {
        let _ = ready.send(Err(LoadgenError::Runtime {
            thread: index,
            source,
        }));
    };
    let driver = shared.opts.driver;
    let want_uring = matches!(driver, Driver::Auto | Driver::IoUring);
    if want_uring {
        match uring() {
            Ok(mut rt) => {
                shared.drivers[index].store(1, Ordering::Relaxed);
                net::set_legacy_driver(false);
                let _ = ready.send(Ok(()));
                drop(ready);
                rt.block_on(worker_main(shared, index));
                return;
            }
            Err(e) if driver == Driver::IoUring => return fail(e),
            Err(_) => {}
        }
    }
    match legacy() {
        Ok(mut rt) => {
            shared.drivers[index].store(2, Ordering::Relaxed);
            net::set_legacy_driver(true);
            let _ = ready.send(Ok(()));
            drop(ready);
            rt.block_on(worker_main(shared, index));
        }
        Err(e) => fail(e),
    }
}

async fn worker_main(shared: Arc<Shared>, index: usize) {
    // Where the timerfd cannot be read (epoll, or a ring that refuses it) publishers fall
    // back to the pacer thread.
    let alarm = (shared.drivers[index].load(Ordering::Relaxed) == 1)
        .then(RingAlarm::new)
        .and_then(Result::ok)
        .map(Rc::new);
    if let Some(alarm) = alarm.clone() {
        monoio::spawn(async move { alarm.run().await });
    }
    let ctx = Rc::new(Ctx {
        shared: shared.clone(),
        index,
        hists: RefCell::new(Hists::default()),
        fds: RefCell::new(HashMap::new()),
        live: Cell::new(0),
        stopping: Cell::new(false),
        alarm,
    });
    let threads = shared.thread_count;
    let opts = &shared.opts;

    // Subscribers: global index i runs on thread i % threads.
    let mine: Rc<[usize]> = (index..opts.subscriber_connections())
        .step_by(threads)
        .collect();
    if !mine.is_empty() {
        let cursor = Rc::new(Cell::new(0usize));
        for _ in 0..opts.setup_concurrency.min(mine.len()) {
            monoio::spawn(subscriber::connector(
                ctx.clone(),
                mine.clone(),
                cursor.clone(),
            ));
        }
    }
    if opts.scenario.publishes() {
        for p in (index..opts.publishers).step_by(threads) {
            monoio::spawn(publisher::run(ctx.clone(), p));
        }
    }
    if opts.scenario == Scenario::Connect {
        let most = opts.concurrency_steps().into_iter().max().unwrap_or(0);
        for j in (index..most).step_by(threads) {
            monoio::spawn(subscriber::handshake_loop(ctx.clone(), j));
        }
    }

    // The ticker: histograms to the shared copy, on request or every FLUSH_EVERY.
    let mut answered = 0u64;
    let mut last_flush = Instant::now();
    while !shared.stopping() {
        monoio::time::sleep(Duration::from_millis(5)).await;
        let epoch = shared.flush_epoch.load(Ordering::Acquire);
        if epoch != answered || last_flush.elapsed() >= FLUSH_EVERY {
            ctx.flush();
            last_flush = Instant::now();
            answered = epoch;
            ctx.stats().flushed.store(epoch, Ordering::Release);
        }
    }

    // Stop: tell every connection, then give tasks a bounded time to end.
    ctx.stopping.set(true);
    if let Some(alarm) = &ctx.alarm {
        alarm.stop();
    }
    let fds: Vec<(RawFd, bool)> = ctx.fds.borrow().iter().map(|(f, w)| (*f, *w)).collect();
    for (fd, websocket) in fds {
        if websocket {
            subscriber::goodbye(fd);
        }
        net::shutdown(fd);
    }
    let deadline = now_ns() + STOP_GRACE.as_nanos() as u64;
    while ctx.live.get() > 0 && now_ns() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    ctx.flush();
    ctx.stats().flushed.store(
        shared.flush_epoch.load(Ordering::Acquire),
        Ordering::Release,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_spreads_subscribers_over_channels() {
        let mut o = Options::new(Scenario::Latency);
        o.subscribers = 25;
        o.channels = 10;
        o.threads = 3;
        let s = Shared::new(&o, "t");
        assert_eq!(s.channels.len(), 10);
        assert_eq!(&*s.channels[3], b"lg.t.3");
        assert_eq!(s.subs_per_channel.iter().sum::<u64>(), 25);
        assert_eq!(s.subs_per_channel[0], 3);
        assert_eq!(s.subs_per_channel[9], 2);
        assert_eq!(s.stats.len(), 3);
        assert!(s.read_buf >= 4096 && s.read_buf <= 65536);
    }

    #[test]
    fn deliveries_are_filed_under_their_step() {
        let o = Options::new(Scenario::Fanout);
        let s = Shared::new(&o, "t");
        assert_eq!(s.step_of(5), 0);
        s.step_starts[1].store(1000, Ordering::Relaxed);
        s.step_starts[2].store(2000, Ordering::Relaxed);
        s.current_step.store(2, Ordering::Relaxed);
        assert_eq!(s.step_of(2500), 2);
        assert_eq!(s.step_of(1999), 1);
        assert_eq!(s.step_of(10), 0);
    }

    #[test]
    fn phase_snapshot_sees_published_fields() {
        let p = Phase::default();
        p.publish(3, 10, 20, 500, 30);
        let s = p.snapshot();
        assert_eq!(
            s,
            PhaseSnapshot {
                generation: 1,
                step: 3,
                start_ns: 10,
                end_ns: 20,
                rate: 500,
                bound_ns: 30
            }
        );
    }
}
