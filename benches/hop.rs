//! One cross-shard hop: a message from one shard to another through the mesh, answered the
//! same way, measured as a round trip (two hops) with two threads, one per core.
//!
//! With 2 shards half of the publishes cross to their channel's owner and half of the
//! deliveries cross back, so what one hop costs is part of every such event's latency. Two
//! cases:
//! * `asleep`: each side is a monoio runtime on io_uring (as relay's shards run) that waits for the mesh's notification and parks while it waits. A hop is the
//!   ring push, the wake-up of a parked runtime on the other core (an eventfd write, the thread
//!   scheduled again) and its poll: what a shard pays when it had nothing else to do.
//! * `spinning`: both sides poll the mesh in a loop and never park: the ring and the cache-line
//!   transfers alone, the floor under `asleep`.
//!
//! Time per iteration is one round trip. The `ring` bench measures the saturated throughput of
//! the same path instead.

use std::future::Future;
use std::hint::spin_loop;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use monoio::time::TimeDriver;
use monoio::{IoUringDriver, Runtime, RuntimeBuilder};
use relay::mesh::Mesh;

const ASKER: usize = 0;
const ANSWERER: usize = 1;

/// The cores of the process, read once, before any thread is pinned: a thread spawned by a
/// pinned one inherits its single core, and would see no other.
fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Pins the current thread to the `i`-th core of the process's, when there is one.
fn pin_to(i: usize) {
    if let Some(&core) = cores().get(i) {
        core_affinity::set_for_current(core);
    }
}

/// A runtime built like a shard's on io_uring, timers on.
fn runtime() -> Runtime<TimeDriver<IoUringDriver>> {
    RuntimeBuilder::<IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("an io_uring runtime (this bench needs io_uring)")
}

/// The answering shard: sends one message back for every one it receives, until `stop`.
fn answer_asleep(mesh: Arc<Mesh<u64>>, stop: Arc<AtomicBool>) {
    pin_to(ANSWERER);
    runtime().block_on(async move {
        while !stop.load(Ordering::Acquire) {
            mesh.notified(ANSWERER).await;
            let mut back = Vec::new();
            mesh.drain(ANSWERER, |_, batch| back.extend(batch));
            if !back.is_empty() {
                // A full ring cannot happen: one message is in flight at a time.
                let _ = mesh.try_send(ANSWERER, ASKER, back);
            }
        }
    });
}

fn answer_spinning(mesh: Arc<Mesh<u64>>, stop: Arc<AtomicBool>) {
    pin_to(ANSWERER);
    let mut cx = Context::from_waker(Waker::noop());
    while !stop.load(Ordering::Relaxed) {
        if pin!(mesh.notified(ANSWERER)).poll(&mut cx).is_ready() {
            let mut back = Vec::new();
            mesh.drain(ANSWERER, |_, batch| back.extend(batch));
            if !back.is_empty() {
                let _ = mesh.try_send(ANSWERER, ASKER, back);
            }
        }
        spin_loop();
    }
}

/// Runs `answer` on its own thread for the length of `body`, then stops it. The answerer
/// wakes once more to see `stop`: the asker sends it a last message.
fn with_answerer(answer: fn(Arc<Mesh<u64>>, Arc<AtomicBool>), body: impl FnOnce(&Arc<Mesh<u64>>)) {
    let mesh = Arc::new(Mesh::<u64>::new(2, 16));
    let stop = Arc::new(AtomicBool::new(false));
    let answerer = {
        let (mesh, stop) = (mesh.clone(), stop.clone());
        thread::spawn(move || answer(mesh, stop))
    };
    body(&mesh);
    stop.store(true, Ordering::Release);
    let _ = mesh.try_send(ASKER, ANSWERER, vec![0]);
    answerer.join().expect("the answering thread");
}

fn bench_hop(c: &mut Criterion) {
    // Read the cores while this thread may still run on all of them.
    cores();
    let mut group = c.benchmark_group("hop/round_trip");
    group.measurement_time(Duration::from_secs(5));

    with_answerer(answer_asleep, |mesh| {
        pin_to(ASKER);
        let mut asker = runtime();
        group.bench_function("asleep", |b| {
            b.iter_custom(|iters| {
                let mesh = mesh.clone();
                asker.block_on(async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        let _ = mesh.try_send(ASKER, ANSWERER, vec![i]);
                        let mut answered = false;
                        while !answered {
                            mesh.notified(ASKER).await;
                            answered = mesh.drain(ASKER, |_, _| {}) > 0;
                        }
                    }
                    start.elapsed()
                })
            })
        });
        drop(asker);
    });

    with_answerer(answer_spinning, |mesh| {
        pin_to(ASKER);
        let mut cx = Context::from_waker(Waker::noop());
        group.bench_function("spinning", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for i in 0..iters {
                    let _ = mesh.try_send(ASKER, ANSWERER, vec![i]);
                    loop {
                        if pin!(mesh.notified(ASKER)).poll(&mut cx).is_ready()
                            && mesh.drain(ASKER, |_, _| {}) > 0
                        {
                            break;
                        }
                        spin_loop();
                    }
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, bench_hop);
criterion_main!(benches);
