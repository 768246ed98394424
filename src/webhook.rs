//! Webhooks (API.md section 5): events delivered to subsystems' subscriptions, at least once.
//!
//! Owns one shard's delivery queues: one per (subsystem, path) subscription, holding the
//! events this shard sequenced as their channels' owner (so every event is queued exactly once
//! in the process, and no delivery state crosses shards). A delivery task POSTs batches as a
//! JSON array of envelopes to one healthy instance, with an `Idempotency-Key` (and each
//! envelope's `id`) for receivers to dedupe; a failed batch is retried with exponential
//! backoff and jitter, on another instance when there is one, honouring circuits.
//!
//! Bounds: `webhooks.queue_size` events per queue (new events past it are dropped and
//! counted), `webhooks.max_attempts` per batch (then dropped, counted and logged). Must never:
//! drop a batch silently, deliver a batch before an earlier one of the same queue, or block
//! the shard while an upstream is slow.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ahash::AHashMap;

use crate::bus::event::Event;
use crate::config::WebhooksConfig;
use crate::http::client::Request;
use crate::registry::{Lifecycle, Table};
use crate::shard::Shard;

#[derive(Default)]
struct Queue {
    events: VecDeque<Arc<Event>>,
    delivering: bool,
    attempts: u32,
    not_before: Option<Instant>,
    /// The instance the last attempt failed on: the retry prefers another.
    last_failed: Option<String>,
}

/// One shard's webhook queues.
pub struct Webhooks {
    config: WebhooksConfig,
    queues: RefCell<AHashMap<(String, String), Queue>>,
    waker: Cell<Option<Waker>>,
    /// Something changed (an event queued, a delivery ended) since the task last looked.
    notified: Cell<bool>,
    queued: Cell<usize>,
}

impl Webhooks {
    pub fn new(config: WebhooksConfig) -> Webhooks {
        Webhooks {
            config,
            queues: RefCell::new(AHashMap::new()),
            waker: Cell::new(None),
            notified: Cell::new(false),
            queued: Cell::new(0),
        }
    }

    /// Events waiting on this shard (for the drain and the gauge).
    pub fn pending(&self) -> usize {
        self.queued.get()
    }

    /// Queues `event` for every subscription it matches; returns how many were full.
    pub fn offer(&self, table: &Table, event: &Arc<Event>) -> usize {
        let mut full = 0;
        let mut matched = false;
        for route in table.webhooks.iter().filter(|r| r.matches(event)) {
            let Some(subsystem) = table.subsystems.get(route.subsystem) else {
                continue;
            };
            let mut queues = self.queues.borrow_mut();
            let queue = queues
                .entry((subsystem.name.clone(), route.path.clone()))
                .or_default();
            if queue.events.len() >= self.config.queue_size {
                full += 1;
                continue;
            }
            queue.events.push_back(event.clone());
            self.queued.set(self.queued.get() + 1);
            matched = true;
        }
        if matched {
            self.notify();
        }
        full
    }

    fn notify(&self) {
        self.notified.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn backoff(&self, attempts: u32, salt: u64) -> Duration {
        let initial = self.config.backoff_initial_ms.max(1);
        let exp = initial.saturating_mul(1u64 << attempts.saturating_sub(1).min(30));
        let capped = exp.min(self.config.backoff_max_ms.max(initial));
        // Full jitter over the upper half keeps retries from many shards apart.
        let jitter = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) % (capped / 2 + 1);
        Duration::from_millis(capped / 2 + jitter)
    }

    /// Starts deliveries that are due; returns when the next one is due (if any).
    fn start_due(self: &Rc<Self>, shard: &Rc<Shard>, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        {
            let mut queues = self.queues.borrow_mut();
            queues.retain(|_, q| !q.events.is_empty() || q.delivering);
            for (key, queue) in queues.iter_mut() {
                if queue.delivering || queue.events.is_empty() {
                    continue;
                }
                match queue.not_before {
                    Some(at) if at > now => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    _ => {
                        queue.delivering = true;
                        due.push(key.clone());
                    }
                }
            }
        }
        for key in due {
            monoio::spawn(self.clone().deliver(shard.clone(), key));
        }
        next
    }

    /// Delivers the front batch of one queue once.
    async fn deliver(self: Rc<Self>, shard: Rc<Shard>, key: (String, String)) {
        let (batch, attempt, avoid) = {
            let queues = self.queues.borrow();
            let Some(queue) = queues.get(&key) else {
                return;
            };
            let n = queue.events.len().min(self.config.batch_max.max(1));
            let batch: Vec<Arc<Event>> = queue.events.iter().take(n).cloned().collect();
            (batch, queue.attempts + 1, queue.last_failed.clone())
        };
        let outcome = self
            .post(&shard, &key, &batch, attempt, avoid.as_deref())
            .await;
        let stats = &shard.stats;
        let mut queues = self.queues.borrow_mut();
        let Some(queue) = queues.get_mut(&key) else {
            return;
        };
        queue.delivering = false;
        match outcome {
            Ok(()) => {
                queue.events.drain(..batch.len());
                self.queued
                    .set(self.queued.get().saturating_sub(batch.len()));
                queue.attempts = 0;
                queue.not_before = None;
                queue.last_failed = None;
                stats.webhook_events_delivered.add(batch.len() as u64);
            }
            Err(failed_on) => {
                stats.webhook_attempts_failed.inc();
                queue.attempts = attempt;
                queue.last_failed = failed_on;
                if attempt >= self.config.max_attempts {
                    tracing::warn!(
                        subsystem = key.0,
                        path = key.1,
                        events = batch.len(),
                        attempts = attempt,
                        "webhook batch dropped after its last attempt"
                    );
                    queue.events.drain(..batch.len());
                    self.queued
                        .set(self.queued.get().saturating_sub(batch.len()));
                    queue.attempts = 0;
                    queue.not_before = None;
                    stats
                        .webhook_events_dropped_attempts
                        .add(batch.len() as u64);
                } else {
                    let salt = batch.first().map_or(0, |e| e.seq) ^ u64::from(attempt);
                    queue.not_before = Some(Instant::now() + self.backoff(attempt, salt));
                }
            }
        }
        drop(queues);
        self.notify();
    }

    /// One POST; `Err` names the instance it failed on (None when none could be tried).
    async fn post(
        &self,
        shard: &Rc<Shard>,
        key: &(String, String),
        batch: &[Arc<Event>],
        attempt: u32,
        avoid: Option<&str>,
    ) -> Result<(), Option<String>> {
        let table = shard.shared.table.load_full();
        let Some(subsystem) = table.subsystem(&key.0) else {
            return Err(None);
        };
        let mut ready: Vec<_> = subsystem
            .instances
            .iter()
            .filter(|i| i.lifecycle == Lifecycle::Ready)
            .collect();
        // Another instance than the one that just failed, when there is one.
        if ready.len() > 1 {
            ready.retain(|i| Some(i.instance.as_str()) != avoid);
        }
        let now = Instant::now();
        let mut chosen = None;
        let start = batch.first().map_or(0, |e| e.seq as usize);
        for offset in 0..ready.len() {
            let instance = ready[(start + offset) % ready.len()];
            if let Ok(permit) = shard.proxy.acquire(instance, now) {
                chosen = Some((instance, permit));
                break;
            }
        }
        let Some((instance, permit)) = chosen else {
            return Err(None);
        };
        let mut body =
            Vec::with_capacity(2 + batch.iter().map(|e| e.envelope_len() + 1).sum::<usize>());
        body.push(b'[');
        for (i, event) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            event.write_envelope(&mut body);
        }
        body.push(b']');
        let idempotency_key = idempotency_key(batch);
        let attempt_text = attempt.to_string();
        let count = batch.len().to_string();
        let headers: [(&str, &[u8]); 5] = [
            ("Content-Type", b"application/json"),
            ("Idempotency-Key", idempotency_key.as_bytes()),
            ("X-Relay-Delivery-Attempt", attempt_text.as_bytes()),
            ("X-Relay-Event-Count", count.as_bytes()),
            ("User-Agent", b"relay-webhooks"),
        ];
        let request = Request {
            method: "POST",
            path_and_query: &key.1,
            headers: &headers,
            body: &body,
        };
        instance.stats.in_flight.fetch_add(1, Ordering::AcqRel);
        let result = shard
            .proxy
            .client()
            .send_timeout(
                instance.endpoint.addr,
                &instance.endpoint.host,
                request,
                Duration::from_millis(self.config.timeout_ms),
            )
            .await;
        instance.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
        let ok = matches!(&result, Ok(r) if r.is_success());
        shard.proxy.record(
            instance,
            permit,
            !ok && !matches!(&result, Ok(r) if r.status < 500),
        );
        if ok {
            instance
                .stats
                .webhooks_delivered
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            Ok(())
        } else {
            instance
                .stats
                .webhooks_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                subsystem = key.0,
                instance = instance.instance,
                "webhook attempt failed"
            );
            Err(Some(instance.instance.clone()))
        }
    }

    /// Runs deliveries for this shard until the process ends.
    pub async fn run(self: Rc<Self>, shard: Rc<Shard>) {
        loop {
            let next = self.start_due(&shard, Instant::now());
            shard.stats.webhook_queue_events.set(self.pending() as i64);
            let wait = next
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1));
            let woken = std::future::poll_fn(|cx| {
                if self.notified.replace(false) {
                    Poll::Ready(())
                } else {
                    self.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            });
            monoio::select! {
                _ = woken => {}
                _ = monoio::time::sleep(wait) => {}
            }
        }
    }
}

/// The same batch always gets the same key, so a receiver can drop a redelivery.
fn idempotency_key(batch: &[Arc<Event>]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for event in batch {
        for &b in event.id().as_bytes().iter().chain(b"\n") {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}-{}", batch.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, id: &str) -> Arc<Event> {
        crate::bus::event::testing::event_with("doc.1", seq, "document.edit", id, Instant::now())
    }

    #[test]
    fn idempotency_keys_are_stable_and_distinct() {
        let a = vec![event(1, "a"), event(2, "b")];
        let b = vec![event(1, "a"), event(2, "c")];
        assert_eq!(idempotency_key(&a), idempotency_key(&a.clone()));
        assert_ne!(idempotency_key(&a), idempotency_key(&b));
        assert!(idempotency_key(&a).ends_with("-2"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let w = Webhooks::new(WebhooksConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            ..WebhooksConfig::default()
        });
        for salt in 0..50 {
            let first = w.backoff(1, salt);
            assert!(
                (50..=100).contains(&(first.as_millis() as u64)),
                "{first:?}"
            );
            let third = w.backoff(3, salt);
            assert!(
                (200..=400).contains(&(third.as_millis() as u64)),
                "{third:?}"
            );
            let late = w.backoff(20, salt);
            assert!(
                (500..=1000).contains(&(late.as_millis() as u64)),
                "{late:?}"
            );
        }
    }
}
