//! Owner-side publish plus local delivery: one event published on a channel that has 1,000
//! subscribers on the owner's own shard, from `Owned::publish` (sequencing, id generation,
//! encoding, history) through `LocalSubs::deliver` into every subscriber's outbound queue.
//!
//! This is the hot path of a popular channel: one publish turns into one queue push per
//! subscriber, all on a single core. Throughput is reported per delivery (1,000 per publish),
//! so the per-subscriber cost is read off directly. A second case delivers an already encoded
//! event only, separating the fan-out loop from the fixed per-publish cost.
//!
//! Each sink is a stand-in for an SSE or WebSocket connection: a bounded `VecDeque` of
//! `Arc<Event>` that drops its oldest entry when full (capacity 64, so after the first 64
//! publishes every delivery also releases an old event, as a queue under steady load does).
//! Writing to sockets is not included.
//!
//! A second group publishes to 5,000 channels with one subscriber each, the `channels`
//! scenario's shape, against one channel published over and over: the difference is the cost of
//! reaching channel state that is no longer in the core's caches.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use relay::bus::event::{Draft, Epoch, Event};
use relay::bus::{ChannelSettings, LocalSubs, Owned, Sink};

#[path = "common/shuffle.rs"]
mod shuffle;

const SUBSCRIBERS: usize = 1000;
const QUEUE_CAPACITY: usize = 64;
/// The shard this benchmark plays; owner and subscribers are both here.
const ME: usize = 0;

/// A subscriber's outbound queue, bounded like the real ones.
struct QueueSink {
    queue: RefCell<VecDeque<Arc<Event>>>,
}

impl QueueSink {
    fn new() -> Self {
        QueueSink {
            queue: RefCell::new(VecDeque::with_capacity(QUEUE_CAPACITY)),
        }
    }
}

impl Sink for QueueSink {
    fn offer(&self, event: &Arc<Event>) {
        let mut queue = self.queue.borrow_mut();
        if queue.len() == QUEUE_CAPACITY {
            queue.pop_front();
        }
        queue.push_back(event.clone());
    }
}

fn draft() -> Draft {
    Draft {
        channel: "doc.42".into(),
        event_type: "document.edit".into(),
        // No publisher id: the owner generates a v7 UUID, and no duplicate check short-circuits.
        id: None,
        data: Bytes::from(format!(
            r#"{{"op":"insert","pos":1,"text":"{}"}}"#,
            "x".repeat(68)
        )),
        source: Some("editor-svc".into()),
        correlation_id: None,
    }
}

fn subscribers(channel: &Arc<str>) -> (LocalSubs, Vec<Rc<QueueSink>>) {
    let mut local = LocalSubs::default();
    let sinks: Vec<Rc<QueueSink>> = (0..SUBSCRIBERS)
        .map(|_| Rc::new(QueueSink::new()))
        .collect();
    for (id, sink) in sinks.iter().enumerate() {
        local.add(channel, id as u64, sink.clone());
    }
    (local, sinks)
}

fn bench_fanout(c: &mut Criterion) {
    let draft = draft();
    let channel: Arc<str> = Arc::from(&*draft.channel);

    let mut group = c.benchmark_group("fanout_1000_local");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));

    {
        // Production history defaults: 1000 events, one hour.
        let mut owned = Owned::new(
            Box::new(|_| ChannelSettings {
                history_size: 1000,
                history_ttl: Duration::from_secs(3600),
                presence: true,
                join_leave: false,
            }),
            42,
        );
        // One subscription registration for this shard; the owner tracks interest per shard.
        owned.subscribe(&channel, ME, None);
        let (local, sinks) = subscribers(&channel);

        let mut delivered = 0usize;
        let before = owned.publish(&draft, 0, Instant::now(), |shard, ev| {
            assert_eq!(shard, ME);
            delivered += local.deliver(ev);
        });
        assert_eq!((before.seq, delivered), (1, SUBSCRIBERS));

        group.bench_function("publish_and_deliver", |b| {
            b.iter(|| {
                let now = Instant::now();
                let mut delivered = 0usize;
                let published =
                    owned.publish(black_box(&draft), 1_742_000_000_000, now, |_, ev| {
                        delivered += local.deliver(ev);
                    });
                debug_assert_eq!(delivered, SUBSCRIBERS);
                (published, delivered)
            })
        });
        // Every subscriber got every publish (the queues are full unless a filter skipped
        // the measurement).
        let first = sinks[0].queue.borrow().len();
        assert!((1..=QUEUE_CAPACITY).contains(&first));
        assert!(sinks.iter().all(|s| s.queue.borrow().len() == first));
    }

    {
        // Delivery only: cycle through pre-encoded events, so queues hold distinct events.
        let (local, _sinks) = subscribers(&channel);
        let epoch = Epoch::new("k3x9AbCd").expect("a valid epoch");
        let now = Instant::now();
        let events: Vec<Arc<Event>> = (0..256u64)
            .map(|seq| {
                let id = format!("ev-{seq}");
                Arc::new(Event::encode(&draft, epoch, seq + 1, &id, 0, now))
            })
            .collect();
        let mut next = 0usize;
        group.bench_function("deliver_only", |b| {
            b.iter(|| {
                let event = &events[next % events.len()];
                next += 1;
                local.deliver(black_box(event))
            })
        });
    }
    group.finish();
}

/// Channels in the many-channels case: the `channels` scenario's 5,000.
const MANY_CHANNELS: usize = 5000;
/// Per-channel history in the many-channels case: small enough that every ring is full and
/// evicting after the first passes (as in a steady state), and that 5,000 rings stay in memory.
const MANY_HISTORY: usize = 64;

/// Publishes one event to each of 5,000 channels in turn, each with one local subscriber: the
/// `channels` scenario's bus work without its sockets. Against one channel published over and
/// over (everything it touches stays in the core's caches), the difference is what reaching
/// 5,000 channels' state in memory costs: the state of the next channel was last touched 5,000
/// publishes ago, far outside the caches this machine gives one core.
fn bench_many_channels(c: &mut Criterion) {
    let settings = |_: &str| ChannelSettings {
        history_size: MANY_HISTORY,
        history_ttl: Duration::from_secs(3600),
        presence: true,
        join_leave: false,
    };
    let drafts: Vec<Draft> = (0..MANY_CHANNELS)
        .map(|i| Draft {
            channel: format!("ch.{i}").into(),
            ..draft()
        })
        .collect();
    // Consecutive publishes do not walk memory in allocation order.
    let order = shuffle::shuffled(MANY_CHANNELS);

    let mut group = c.benchmark_group("many_channels_5000");
    group.throughput(Throughput::Elements(1));
    for (name, spread) in [("same_channel", false), ("next_of_5000", true)] {
        let mut owned = Owned::new(Box::new(settings), 42);
        let mut local = LocalSubs::default();
        let mut sinks = Vec::with_capacity(MANY_CHANNELS);
        for (id, draft) in drafts.iter().enumerate() {
            let channel: Arc<str> = Arc::from(&*draft.channel);
            owned.subscribe(&channel, ME, None);
            let sink = Rc::new(QueueSink::new());
            local.add(&channel, id as u64, sink.clone());
            sinks.push(sink);
        }
        // Fill every ring, so that each measured publish also evicts, as it does in a
        // steady state.
        for _ in 0..MANY_HISTORY {
            for &i in &order {
                owned.publish(&drafts[i], 0, Instant::now(), |_, ev| {
                    local.deliver(ev);
                });
            }
        }
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                let draft = if spread {
                    next = (next + 1) % MANY_CHANNELS;
                    &drafts[order[next]]
                } else {
                    &drafts[order[0]]
                };
                let mut delivered = 0usize;
                let published = owned.publish(
                    black_box(draft),
                    1_742_000_000_000,
                    Instant::now(),
                    |_, ev| {
                        delivered += local.deliver(ev);
                    },
                );
                debug_assert_eq!(delivered, 1);
                (published, delivered)
            })
        });
        assert!(sinks
            .iter()
            .all(|s| s.queue.borrow().len() <= QUEUE_CAPACITY));
    }
    group.finish();
}

criterion_group!(benches, bench_fanout, bench_many_channels);
criterion_main!(benches);
