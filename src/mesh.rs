//! Cross-shard messaging: one bounded lock-free ring per ordered pair of shards.
//!
//! Owns the rings and each shard's wake-up slot. A ring slot carries a whole batch (`Vec<M>`),
//! so the per-message cost of crossing threads is amortised. A receiver is woken only when its
//! `notified` flag goes from false to true (the empty -> non-empty edge as seen by the receiver);
//! pushes onto an already-notified receiver cost one shared load and no wake-up syscall.
//!
//! Emptied batches go back: after the receiver has handled a batch, the empty `Vec` returns to
//! its sender through a small return ring of the same pair ([`Mesh::spare`]), so a steady flow
//! between two shards reuses the same few vectors instead of allocating on one thread and
//! freeing on the other (which, when the flow is one-sided, fills the receiver's allocator cache
//! and frees into the sender's arena under its lock). At most [`SPARES_PER_RING`] vectors of at
//! most [`SPARE_BYTES_MAX`] bytes wait per pair; any other is freed where it was emptied.
//!
//! Must never: block, allocate per message, or grow without bound. A full ring hands the batch
//! back to the caller (`Err(batch)`); what to do then (retry later, refuse upstream) is the
//! caller's policy, see [`Outbox`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

/// Emptied batch vectors kept per ordered pair for the sender to reuse. A steady flow has one
/// or two batches in flight per pair; eight covers a burst's tail without holding much.
pub const SPARES_PER_RING: usize = 8;
/// The largest vector (capacity times element size) worth keeping: the outbox starts a batch
/// at 16 messages (1.5 KiB of 96-byte `shard::Msg`), and one that grew past 4 KiB came from a
/// burst, where one allocation is shared by dozens of messages anyway.
pub const SPARE_BYTES_MAX: usize = 4096;

/// The rings between every ordered pair of shards, and one wake-up slot per receiving shard.
pub struct Mesh<M> {
    shards: usize,
    /// Index `from * shards + to`. The diagonal exists but is never used: a shard handles its
    /// own messages inline.
    rings: Box<[ArrayQueue<Vec<M>>]>,
    /// Index `from * shards + to`, as `rings`: empty vectors `to` has handled, for `from`.
    spares: Box<[ArrayQueue<Vec<M>>]>,
    inboxes: Box<[CachePadded<Inbox>]>,
}

struct Inbox {
    notified: AtomicBool,
    waker: AtomicWaker,
}

impl<M> Mesh<M> {
    /// `capacity` is in batches per ring.
    pub fn new(shards: usize, capacity: usize) -> Self {
        assert!(shards >= 1, "a mesh needs at least one shard");
        assert!(capacity >= 1, "a ring needs at least one slot");
        let rings = (0..shards * shards)
            .map(|_| ArrayQueue::new(capacity))
            .collect();
        let spares = (0..shards * shards)
            .map(|_| ArrayQueue::new(SPARES_PER_RING))
            .collect();
        let inboxes = (0..shards)
            .map(|_| {
                CachePadded::new(Inbox {
                    notified: AtomicBool::new(false),
                    waker: AtomicWaker::new(),
                })
            })
            .collect();
        Mesh {
            shards,
            rings,
            spares,
            inboxes,
        }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Pushes one batch from `from` to `to`, waking `to` on the notification edge.
    pub fn try_send(&self, from: usize, to: usize, batch: Vec<M>) -> Result<(), Vec<M>> {
        debug_assert!(from != to, "a shard never sends to itself");
        self.rings[self.pair(from, to)].push(batch)?;
        self.wake(to);
        Ok(())
    }

    /// Wakes shard `to` (also used by the process to announce a drain).
    pub fn wake(&self, to: usize) {
        let inbox = &self.inboxes[to];
        // Load first: when the receiver is already notified, skip the read-modify-write so
        // busy senders do not bounce the cache line.
        if !inbox.notified.load(Ordering::Acquire) && !inbox.notified.swap(true, Ordering::AcqRel) {
            inbox.waker.wake();
        }
    }

    /// Pops every batch waiting for shard `to`, in per-sender FIFO order, and hands each to
    /// `handle` as a draining iterator; messages it leaves are dropped. The emptied vector then
    /// goes back to its sender (see [`Mesh::spare`]) when it is small enough and a slot is free.
    pub fn drain(&self, to: usize, mut handle: impl FnMut(usize, std::vec::Drain<'_, M>)) -> usize {
        let mut batches = 0;
        for from in 0..self.shards {
            if from == to {
                continue;
            }
            let pair = self.pair(from, to);
            while let Some(mut batch) = self.rings[pair].pop() {
                batches += 1;
                handle(from, batch.drain(..));
                if batch.capacity() * std::mem::size_of::<M>() <= SPARE_BYTES_MAX {
                    // A full return ring frees the vector here: the sender allocates anew.
                    let _ = self.spares[pair].push(batch);
                }
            }
        }
        batches
    }

    /// An empty vector that shard `to` has emptied of a batch from `from`, for `from`'s next
    /// batch to `to`; `None` when none is waiting.
    pub fn spare(&self, from: usize, to: usize) -> Option<Vec<M>> {
        self.spares[self.pair(from, to)].pop()
    }

    /// The index of the ordered pair in `rings` and `spares`.
    fn pair(&self, from: usize, to: usize) -> usize {
        from * self.shards + to
    }

    /// Resolves when shard `to` has been notified since it last consumed a notification.
    pub fn notified(&self, to: usize) -> Notified<'_, M> {
        Notified { mesh: self, to }
    }
}

pub struct Notified<'a, M> {
    mesh: &'a Mesh<M>,
    to: usize,
}

impl<M> Future for Notified<'_, M> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inbox = &self.mesh.inboxes[self.to];
        // Consuming the flag before the caller drains means a push that lands during the drain
        // sets it again and is never missed.
        if inbox.notified.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        inbox.waker.register(cx.waker());
        if inbox.notified.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A shard's outgoing side: messages for each other shard are gathered into batches during one
/// scheduling round and pushed by a flusher task that runs after the tasks that produced them.
///
/// Bounded: at most `pending_limit` messages wait per destination when its ring is full;
/// [`Outbox::congested`] tells admission control to refuse new work before that.
pub struct Outbox<M> {
    me: usize,
    mesh: Arc<Mesh<M>>,
    max_batch: usize,
    pending_limit: usize,
    queues: RefCell<Vec<VecDeque<Vec<M>>>>,
    queued: RefCell<Vec<usize>>,
    flush_wanted: Cell<bool>,
    flusher: Cell<Option<Waker>>,
}

/// What one flush did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    pub batches: u64,
    pub messages: u64,
    pub ring_full: u64,
    /// Messages still waiting because a ring was full.
    pub left: usize,
}

impl<M> Outbox<M> {
    pub fn new(me: usize, mesh: Arc<Mesh<M>>, max_batch: usize, pending_limit: usize) -> Self {
        let shards = mesh.shards();
        Outbox {
            me,
            mesh,
            max_batch: max_batch.max(1),
            pending_limit: pending_limit.max(1),
            queues: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            queued: RefCell::new(vec![0; shards]),
            flush_wanted: Cell::new(false),
            flusher: Cell::new(None),
        }
    }

    pub fn mesh(&self) -> &Arc<Mesh<M>> {
        &self.mesh
    }

    /// True when `to` already has as many messages waiting as the outbox may hold.
    pub fn congested(&self, to: usize) -> bool {
        self.queued.borrow()[to] >= self.pending_limit
    }

    /// The first congested destination, if any (an owner then refuses new publishes, because
    /// each publish may fan out to every shard). Nothing is ever queued for this shard itself.
    pub fn first_congested(&self) -> Option<usize> {
        self.queued
            .borrow()
            .iter()
            .position(|&n| n >= self.pending_limit)
    }

    /// Queues `msg` for shard `to`. Callers check [`Outbox::congested`] first where refusing
    /// is possible; deliveries of already-accepted events are queued regardless, which the
    /// admission check bounds to `pending_limit + shards` per destination.
    pub fn send(&self, to: usize, msg: M) {
        debug_assert!(to != self.me);
        {
            let mut queues = self.queues.borrow_mut();
            let queue = &mut queues[to];
            match queue.back_mut() {
                Some(batch) if batch.len() < self.max_batch => batch.push(msg),
                _ => {
                    let mut batch = self
                        .mesh
                        .spare(self.me, to)
                        .unwrap_or_else(|| Vec::with_capacity(self.max_batch.min(16)));
                    batch.push(msg);
                    queue.push_back(batch);
                }
            }
        }
        self.queued.borrow_mut()[to] += 1;
        if !self.flush_wanted.replace(true) {
            if let Some(waker) = self.flusher.take() {
                waker.wake();
            }
        }
    }

    /// Pushes every queued batch it can. Batches behind a full ring stay queued, in order.
    pub fn flush(&self) -> FlushReport {
        self.flush_wanted.set(false);
        let mut report = FlushReport::default();
        let mut queues = self.queues.borrow_mut();
        let mut queued = self.queued.borrow_mut();
        for (to, queue) in queues.iter_mut().enumerate() {
            while let Some(batch) = queue.pop_front() {
                let len = batch.len();
                match self.mesh.try_send(self.me, to, batch) {
                    Ok(()) => {
                        report.batches += 1;
                        report.messages += len as u64;
                        queued[to] -= len;
                    }
                    Err(batch) => {
                        report.ring_full += 1;
                        queue.push_front(batch);
                        break;
                    }
                }
            }
            report.left += queued[to];
        }
        report
    }

    /// Resolves when something was sent since the last flush.
    pub fn wanted(&self) -> FlushWanted<'_, M> {
        FlushWanted { outbox: self }
    }
}

pub struct FlushWanted<'a, M> {
    outbox: &'a Outbox<M>,
}

impl<M> Future for FlushWanted<'_, M> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.outbox.flush_wanted.get() {
            return Poll::Ready(());
        }
        self.outbox.flusher.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn batches_arrive_in_order_per_sender() {
        let mesh = Mesh::new(3, 8);
        mesh.try_send(0, 2, vec![1, 2]).unwrap();
        mesh.try_send(1, 2, vec![10]).unwrap();
        mesh.try_send(0, 2, vec![3]).unwrap();
        let mut got = Vec::new();
        let n = mesh.drain(2, |from, batch| got.push((from, batch.collect::<Vec<_>>())));
        assert_eq!(n, 3);
        assert_eq!(got, vec![(0, vec![1, 2]), (0, vec![3]), (1, vec![10])]);
        assert_eq!(mesh.drain(2, |_, _| panic!("nothing left")), 0);
    }

    #[test]
    fn full_ring_hands_the_batch_back() {
        let mesh = Mesh::new(2, 2);
        mesh.try_send(0, 1, vec![1]).unwrap();
        mesh.try_send(0, 1, vec![2]).unwrap();
        assert_eq!(mesh.try_send(0, 1, vec![3]), Err(vec![3]));
        // The other direction is a separate ring.
        mesh.try_send(1, 0, vec![4]).unwrap();
    }

    #[test]
    fn emptied_batches_return_to_their_sender() {
        let mesh = Mesh::new(3, 8);
        let batch = Vec::with_capacity(4);
        let sent_at = batch.as_ptr();
        let mut batch = batch;
        batch.extend([1u32, 2, 3]);
        mesh.try_send(0, 2, batch).unwrap();
        assert!(
            mesh.spare(0, 2).is_none(),
            "nothing is back before the drain"
        );
        // A handler that stops early: the rest of the batch is dropped, the vector comes back.
        let mut seen = Vec::new();
        mesh.drain(2, |_, mut batch| seen.extend(batch.next()));
        assert_eq!(seen, vec![1]);
        let spare = mesh
            .spare(0, 2)
            .expect("the emptied vector is back for shard 0");
        assert_eq!(
            (spare.len(), spare.capacity(), spare.as_ptr()),
            (0, 4, sent_at)
        );
        assert!(mesh.spare(0, 2).is_none(), "one vector, returned once");
        assert!(
            mesh.spare(1, 2).is_none() && mesh.spare(2, 0).is_none(),
            "only to the pair it came from"
        );
    }

    #[test]
    fn spares_are_bounded_in_count_and_size() {
        let mesh = Mesh::<u64>::new(2, SPARES_PER_RING + 4);
        let too_big = SPARE_BYTES_MAX / std::mem::size_of::<u64>() + 1;
        mesh.try_send(0, 1, Vec::with_capacity(too_big)).unwrap();
        for _ in 0..SPARES_PER_RING + 2 {
            mesh.try_send(0, 1, Vec::with_capacity(8)).unwrap();
        }
        assert_eq!(mesh.drain(1, |_, _| {}), SPARES_PER_RING + 3);
        let mut kept = Vec::new();
        while let Some(spare) = mesh.spare(0, 1) {
            kept.push(spare.capacity());
        }
        assert_eq!(
            kept,
            vec![8; SPARES_PER_RING],
            "the large one and the surplus are freed"
        );
    }

    #[test]
    fn dropped_messages_of_a_partly_handled_batch_are_released() {
        let mesh = Mesh::new(2, 2);
        let counted = std::rc::Rc::new(());
        // `Rc` is not `Send`, but this mesh never leaves the thread.
        mesh.try_send(0, 1, vec![counted.clone(), counted.clone()])
            .unwrap();
        assert_eq!(std::rc::Rc::strong_count(&counted), 3);
        mesh.drain(1, |_, _| {});
        assert_eq!(std::rc::Rc::strong_count(&counted), 1);
    }

    #[test]
    fn outbox_reuses_the_vector_its_receiver_emptied() {
        let mesh = Arc::new(Mesh::new(2, 4));
        let outbox = Outbox::new(0, mesh.clone(), 64, 64);
        let mut seen_at = Vec::new();
        // Allocations of the batch's size held between rounds: were the emptied vector freed,
        // the allocator would hand its memory to one of these, and the next batch would move.
        let mut held: Vec<Vec<u32>> = Vec::new();
        for round in 0..3u32 {
            outbox.send(1, round);
            outbox.flush();
            mesh.drain(1, |_, batch| seen_at.push(batch.as_slice().as_ptr()));
            held.push(Vec::with_capacity(16));
        }
        assert_eq!(seen_at.len(), 3);
        assert!(
            seen_at.iter().all(|&at| at == seen_at[0]),
            "one vector makes every trip"
        );
    }

    #[test]
    fn notification_is_an_edge_consumed_once() {
        let mesh = Mesh::<u8>::new(2, 4);
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut fut = Box::pin(mesh.notified(1));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        mesh.try_send(0, 1, vec![1]).unwrap();
        mesh.try_send(0, 1, vec![2]).unwrap();
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        let mut again = Box::pin(mesh.notified(1));
        assert!(
            again.as_mut().poll(&mut cx).is_pending(),
            "one edge, one wake-up"
        );
    }

    #[test]
    fn outbox_batches_and_keeps_what_a_full_ring_refuses() {
        let mesh = Arc::new(Mesh::new(2, 1));
        let outbox = Outbox::new(0, mesh.clone(), 2, 4);
        for i in 0..5 {
            outbox.send(1, i);
        }
        assert!(outbox.congested(1));
        assert_eq!(outbox.first_congested(), Some(1));
        let report = outbox.flush();
        assert_eq!(report.batches, 1);
        assert_eq!(report.messages, 2);
        assert_eq!(report.ring_full, 1);
        assert_eq!(report.left, 3);
        let mut got = Vec::new();
        mesh.drain(1, |_, b| got.extend(b));
        let report = outbox.flush();
        assert_eq!(report.left, 1);
        mesh.drain(1, |_, b| got.extend(b));
        outbox.flush();
        mesh.drain(1, |_, b| got.extend(b));
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!(!outbox.congested(1));
        assert_eq!(outbox.first_congested(), None);
    }

    #[test]
    fn cross_thread_traffic_is_complete_and_ordered() {
        let mesh = Arc::new(Mesh::new(2, 16));
        let sender = {
            let mesh = mesh.clone();
            thread::spawn(move || {
                let mut next = 0u32;
                while next < 100_000 {
                    let batch: Vec<u32> = (next..next + 100).collect();
                    let mut batch = batch;
                    loop {
                        match mesh.try_send(0, 1, batch) {
                            Ok(()) => break,
                            Err(back) => {
                                batch = back;
                                thread::yield_now();
                            }
                        }
                    }
                    next += 100;
                }
            })
        };
        let mut expected = 0u32;
        while expected < 100_000 {
            mesh.drain(1, |_, batch| {
                for v in batch {
                    assert_eq!(v, expected);
                    expected += 1;
                }
            });
        }
        sender.join().unwrap();
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }
}
