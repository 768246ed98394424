//! The cross-shard ring path: events moved from shard 0 to shard 1 through `Mesh::try_send`
//! and `Mesh::drain`, with two real threads, one per core, as relay runs them.
//!
//! Every event whose subscribers live on another shard than the channel's owner crosses a
//! ring, so this bounds relay's cross-core event rate. The project's target is at least
//! 10,000,000 events/s through one ring. Measured end to end: the clock starts before the
//! producer builds the first batch and stops when the consumer has drained the last event, so
//! batch allocation, the `Arc` clone on the producer, the wake-up flag protocol, and the drop
//! of every element and batch `Vec` on the consumer are all included.
//!
//! What is not included: the consumer here never parks (it spins, then yields, when the ring
//! is empty), so the cost of waking a parked shard is absent; this is the saturated regime,
//! which is the one where throughput is the question. Per-event handling on the receiving shard
//! (local delivery) is measured separately in `fanout`.
//!
//! Two element types are measured for each batch size (1, 16, 64, 256 events per batch):
//! * `arc_event`: a bare `Arc<Event>` (8 bytes per element);
//! * `msg_deliver`: `relay::shard::Msg::Deliver(Arc<Event>)`, the element type the server's
//!   mesh actually carries, which is larger and so moves more bytes per batch.
//!
//! Both allocate every batch on the producer (and free it on the consumer). A third group,
//! `msg_deliver_recycled`, builds each batch in a vector the consumer handed back
//! (`Mesh::spare`) when one is waiting, as the server's outbox does; only vectors of at most
//! `mesh::SPARE_BYTES_MAX` go back, so batches of 256 `Msg` are allocated in both.
//!
//! The ring holds 1024 batches (the `bus.ring_capacity` default). When it is full the producer
//! backs off (spins, then yields) and retries, standing in for the outbox keeping the batch for
//! a later flush. After each case, a line on stderr gives the batches sent and how often the
//! ring was full, to tell a consumer-bound run from a producer-bound one.
//!
//! The elements are clones of a pool of 4096 distinct, really encoded events, so reference
//! counts change on cache lines the other core also touches, as in production, without every
//! element hammering the same counter.

use std::future::Future;
use std::hint::spin_loop;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_utils::{Backoff, CachePadded};
use relay::bus::event::{Draft, Epoch, Event};
use relay::mesh::Mesh;
use relay::shard::Msg;

const PRODUCER: usize = 0;
const CONSUMER: usize = 1;
/// `bus.ring_capacity` default: batches per ring.
const RING_CAPACITY: usize = 1024;
const POOL: usize = 4096;
const BATCH_SIZES: [usize; 4] = [1, 16, 64, 256];

fn event_pool() -> Vec<Arc<Event>> {
    let epoch = Epoch::new("k3x9AbCd").expect("a valid epoch");
    let draft = Draft {
        channel: "doc.42".into(),
        event_type: "document.edit".into(),
        id: None,
        data: Bytes::from(format!(
            r#"{{"op":"insert","pos":1,"text":"{}"}}"#,
            "x".repeat(68)
        )),
        source: None,
        correlation_id: None,
    };
    let now = Instant::now();
    (0..POOL as u64)
        .map(|seq| {
            let id = format!("ev-{seq}");
            Arc::new(Event::encode(
                &draft,
                epoch,
                seq + 1,
                &id,
                1_742_000_000_000,
                now,
            ))
        })
        .collect()
}

/// The receiving shard: waits for the notification edge like `Shard::pump`, drains, drops
/// every element, and publishes how many it has received so far.
struct Consumer {
    stop: Arc<AtomicBool>,
    received: Arc<CachePadded<AtomicU64>>,
    thread: Option<JoinHandle<()>>,
}

impl Consumer {
    fn start<M: Send + 'static>(mesh: Arc<Mesh<M>>, core: Option<core_affinity::CoreId>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(CachePadded::new(AtomicU64::new(0)));
        let thread = {
            let (stop, received) = (stop.clone(), received.clone());
            thread::Builder::new()
                .name("ring-consumer".into())
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    let mut cx = Context::from_waker(Waker::noop());
                    let mut total = 0u64;
                    let mut idle = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        // Consume the edge first, then drain: a push landing mid-drain sets it
                        // again, exactly as in the shard's pump loop.
                        let ready = pin!(mesh.notified(CONSUMER)).poll(&mut cx).is_ready();
                        let batches = if ready {
                            mesh.drain(CONSUMER, |_, batch| total += batch.len() as u64)
                        } else {
                            0
                        };
                        if batches > 0 {
                            received.store(total, Ordering::Release);
                            idle = 0;
                        } else if idle < 128 {
                            idle += 1;
                            spin_loop();
                        } else {
                            thread::yield_now();
                        }
                    }
                })
                .expect("spawn the consumer thread")
        };
        Consumer {
            stop,
            received,
            thread: Some(thread),
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("consumer thread panicked");
        }
    }
}

/// The sending shard (the bench thread) with everything one case needs.
struct Case<'a, M> {
    mesh: Arc<Mesh<M>>,
    consumer: Consumer,
    pool: &'a [Arc<Event>],
    wrap: fn(Arc<Event>) -> M,
    /// Elements sent so far, across criterion's calls.
    sent: u64,
    /// Next pool index to clone.
    next: usize,
    /// Sends refused because the ring was full (reported after each case).
    full: u64,
    /// Build each batch in a vector the consumer handed back, when one is waiting.
    recycle: bool,
    /// Batches built in a handed-back vector (reported after each case).
    reused: u64,
}

impl<M> Case<'_, M> {
    /// Moves `iters` batches of `batch` elements from shard 0 to shard 1 and returns the time
    /// until the consumer has seen the last one.
    fn transfer(&mut self, batch: usize, iters: u64) -> Duration {
        let target = self.sent + iters * batch as u64;
        let start = Instant::now();
        for _ in 0..iters {
            let spare = if self.recycle {
                self.mesh.spare(PRODUCER, CONSUMER)
            } else {
                None
            };
            let mut msgs = match spare {
                Some(spare) => {
                    self.reused += 1;
                    spare
                }
                None => Vec::with_capacity(batch),
            };
            for _ in 0..batch {
                msgs.push((self.wrap)(self.pool[self.next].clone()));
                self.next = (self.next + 1) % POOL;
            }
            // A full ring hands the batch back; the real outbox keeps it and retries on a later
            // flush. Backing off (spin, then yield) stands in for that delay and keeps the
            // producer from hammering the ring's indices while the consumer works on it.
            let backoff = Backoff::new();
            while let Err(back) = self.mesh.try_send(PRODUCER, CONSUMER, msgs) {
                msgs = back;
                self.full += 1;
                backoff.snooze();
            }
        }
        while self.consumer.received.load(Ordering::Acquire) < target {
            spin_loop();
        }
        let elapsed = start.elapsed();
        self.sent = target;
        elapsed
    }
}

fn bench_kind<M: Send + 'static>(
    c: &mut Criterion,
    name: &str,
    pool: &[Arc<Event>],
    wrap: fn(Arc<Event>) -> M,
    recycle: bool,
    cores: &[core_affinity::CoreId],
) {
    let mut group = c.benchmark_group(format!("ring/{name}"));
    for batch in BATCH_SIZES {
        // A fresh mesh and consumer per case, so no case inherits another's queue state.
        let mesh = Arc::new(Mesh::<M>::new(2, RING_CAPACITY));
        let mut case = Case {
            consumer: Consumer::start(mesh.clone(), cores.get(CONSUMER).copied()),
            mesh,
            pool,
            wrap,
            sent: 0,
            next: 0,
            full: 0,
            recycle,
            reused: 0,
        };
        // One criterion iteration is one batch; Elements(batch) makes criterion report events/s.
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter_custom(|iters| case.transfer(batch, iters))
        });
        let Case {
            mesh,
            consumer,
            sent,
            full,
            reused,
            ..
        } = case;
        drop(consumer);
        // Whether the producer outran the consumer: the ring was then mostly full. A case a
        // criterion filter skipped sent nothing and says nothing.
        let batches = sent / batch as u64;
        if batches > 0 {
            eprintln!(
                "ring/{name}/{batch}: {batches} batches sent, ring full on {full} attempts ({:.1} per batch), {reused} built in a returned vector",
                full as f64 / batches as f64
            );
        }
        assert_eq!(
            mesh.drain(CONSUMER, |_, _| {}),
            0,
            "every batch was drained"
        );
    }
    group.finish();
}

fn bench_ring(c: &mut Criterion) {
    let pool = event_pool();
    // Pin like the server does: shard i on core i. The bench thread is the producer (shard 0).
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if cores.len() >= 2 {
        core_affinity::set_for_current(cores[PRODUCER]);
    } else {
        eprintln!("ring: fewer than 2 cores visible; threads are not pinned");
    }
    let cores = if cores.len() >= 2 { cores } else { Vec::new() };

    eprintln!(
        "ring: element sizes: Arc<Event> {} bytes, Msg {} bytes",
        std::mem::size_of::<Arc<Event>>(),
        std::mem::size_of::<Msg>()
    );
    bench_kind(c, "arc_event", &pool, |e| e, false, &cores);
    bench_kind(c, "msg_deliver", &pool, Msg::Deliver, false, &cores);
    bench_kind(c, "msg_deliver_recycled", &pool, Msg::Deliver, true, &cores);
}

criterion_group!(benches, bench_ring);
criterion_main!(benches);
