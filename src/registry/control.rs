//! The control task: the one owner of the registry, running on shard 0.
//!
//! Owns registration, heartbeats, deregistration (drain, then removal), TTL expiry and active
//! health checks, and publishes every change two ways: a new immutable [`Table`] swapped into
//! `Shared::table` (what every shard routes by, read without a lock) and an event on the
//! `relay.system` channel (`subsystem.registered`, `.health`, `.draining`, `.removed`) so a
//! dashboard sees it live. Other shards reach it with `Msg::Control` over the mesh.
//!
//! Must never: run on any shard but 0, block the shard (probes are spawned tasks with a
//! timeout), or probe an instance more often than `health.interval_ms`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_channel::oneshot;

use super::{validate, Change, FieldError, Lifecycle, Registry, RegistryError, Table, Thresholds};
use crate::bus::event::{ByteString, Draft};
use crate::config::{Config, SubsystemConfig};
use crate::http::client::Request;
use crate::shard::Shard;

/// The channel registry changes are published on.
pub const SYSTEM_CHANNEL: &str = "relay.system";

/// What other shards ask of the control task.
pub enum Command {
    Register {
        spec: Box<SubsystemConfig>,
        reply: oneshot::Sender<Result<Change, FieldError>>,
    },
    Heartbeat {
        name: String,
        instance: String,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
    Deregister {
        name: String,
        instance: String,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
}

/// The registry and its health checks, owned by shard 0.
pub struct Control {
    registry: RefCell<Registry>,
    table: Arc<ArcSwap<Table>>,
    thresholds: Thresholds,
    interval: Duration,
    /// Bound of one probe; probes go through shard 0's proxy client (one client, one pool
    /// per instance, for proxying, health checks and webhooks).
    probe_timeout: Duration,
    /// When each instance (by stats key) is next due for a check.
    next_check: RefCell<AHashMap<usize, Instant>>,
    changes: RefCell<Vec<Change>>,
}

/// Builds the registry from `[[subsystems]]`; a bad static instance refuses the start.
pub fn initial_registry(config: &Config, shards: usize) -> Result<Registry, FieldError> {
    let mut registry = Registry::new(shards);
    let now = Instant::now();
    for (i, spec) in config.subsystems.iter().enumerate() {
        let endpoint = validate(spec).map_err(|e| FieldError {
            field: format!("subsystems[{i}].{}", e.field),
            message: e.message,
        })?;
        registry.register(spec.clone(), endpoint, true, now);
    }
    Ok(registry)
}

impl Control {
    pub fn new(config: &Config, registry: Registry, table: Arc<ArcSwap<Table>>) -> Control {
        let health = &config.health;
        let control = Control {
            registry: RefCell::new(registry),
            table,
            thresholds: Thresholds {
                healthy: health.healthy_threshold,
                unhealthy: health.unhealthy_threshold,
            },
            interval: Duration::from_millis(health.interval_ms),
            probe_timeout: Duration::from_millis(health.timeout_ms),
            next_check: RefCell::new(AHashMap::new()),
            changes: RefCell::new(Vec::new()),
        };
        control.publish_table();
        control
    }

    fn publish_table(&self) {
        self.table.store(self.registry.borrow().snapshot());
    }

    /// Applies one command; the reply goes back on its one-shot channel.
    pub fn execute(&self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Register { spec, reply } => {
                let result = validate(&spec).map(|endpoint| {
                    self.registry
                        .borrow_mut()
                        .register(*spec, endpoint, false, now)
                });
                if let Ok(change) = &result {
                    self.changed(change.clone());
                }
                let _ = reply.send(result);
            }
            Command::Heartbeat {
                name,
                instance,
                reply,
            } => {
                let result = self.registry.borrow_mut().heartbeat(&name, &instance, now);
                let _ = reply.send(result);
            }
            Command::Deregister {
                name,
                instance,
                reply,
            } => {
                let result = self.registry.borrow_mut().deregister(&name, &instance);
                let result = result.map(|change| self.changed(change));
                let _ = reply.send(result);
            }
        }
    }

    fn changed(&self, change: Change) {
        self.publish_table();
        self.changes.borrow_mut().push(change);
    }

    /// Expiry, drain completion, health checks and announcements, forever.
    pub async fn run(self: Rc<Self>, shard: Rc<Shard>) {
        loop {
            let now = Instant::now();
            let expired = self.registry.borrow_mut().expire(now);
            for change in expired {
                self.changed(change);
            }
            self.finish_drains();
            self.start_due_probes(&shard, now);
            self.announce(&shard);
            monoio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes draining instances whose in-flight requests have all finished.
    fn finish_drains(&self) {
        let drained: Vec<(String, String)> = self
            .registry
            .borrow()
            .instances()
            .filter(|i| i.lifecycle == Lifecycle::Draining)
            .filter(|i| i.stats.in_flight.load(Ordering::Acquire) <= 0)
            .map(|i| (i.spec.name.clone(), i.spec.instance.clone()))
            .collect();
        for (name, instance) in drained {
            let removed = self
                .registry
                .borrow_mut()
                .remove(&name, &instance, "deregistered");
            if let Some(change) = removed {
                self.changed(change);
            }
        }
    }

    fn start_due_probes(self: &Rc<Self>, shard: &Rc<Shard>, now: Instant) {
        let due: Vec<(String, String, std::net::SocketAddr, String, String, usize)> = {
            let registry = self.registry.borrow();
            let mut next = self.next_check.borrow_mut();
            registry
                .instances()
                .filter(|i| i.lifecycle != Lifecycle::Draining)
                .filter_map(|i| {
                    let key = Arc::as_ptr(&i.stats) as usize;
                    let at = next.entry(key).or_insert(now + self.interval);
                    if *at > now {
                        return None;
                    }
                    *at = now + self.interval;
                    Some((
                        i.spec.name.clone(),
                        i.spec.instance.clone(),
                        i.endpoint.addr,
                        i.endpoint.host.clone(),
                        i.spec.health_path.clone(),
                        key,
                    ))
                })
                .collect()
        };
        for (name, instance, addr, host, path, _) in due {
            let control = self.clone();
            let shard = shard.clone();
            monoio::spawn(async move {
                let request = Request {
                    method: "GET",
                    path_and_query: &path,
                    headers: &[("User-Agent", b"relay-health-check".as_slice())],
                    body: b"",
                };
                let ok = matches!(
                    shard
                        .proxy
                        .client()
                        .send_timeout(addr, &host, request, control.probe_timeout)
                        .await,
                    Ok(response) if (200..300).contains(&response.status)
                );
                control.record_probe(&name, &instance, ok);
                control.announce(&shard);
            });
        }
        // Forget the schedule of instances that left.
        let live: Vec<usize> = self
            .registry
            .borrow()
            .instances()
            .map(|i| Arc::as_ptr(&i.stats) as usize)
            .collect();
        self.next_check.borrow_mut().retain(|k, _| live.contains(k));
    }

    fn record_probe(&self, name: &str, instance: &str, ok: bool) {
        if let Some(i) = self.table.load().instance(name, instance) {
            let counter = if ok {
                &i.stats.health_checks_ok
            } else {
                &i.stats.health_checks_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let flip = self
            .registry
            .borrow_mut()
            .health_result(name, instance, ok, self.thresholds);
        if let Some(change) = flip {
            if let Change::Health { healthy, .. } = &change {
                if let Some(i) = self.table.load().instance(name, instance) {
                    i.stats.health_changes.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(
                    subsystem = name,
                    instance,
                    healthy,
                    "health check changed the instance's state"
                );
            }
            self.changed(change);
        }
    }

    /// Publishes pending changes as events on `relay.system`.
    fn announce(&self, shard: &Rc<Shard>) {
        let changes: Vec<Change> = self.changes.borrow_mut().drain(..).collect();
        if changes.is_empty() {
            return;
        }
        let drafts: Vec<Draft> = changes.iter().map(change_event).collect();
        let shard = shard.clone();
        monoio::spawn(async move {
            if let Err(e) = shard.publish(drafts).await {
                tracing::warn!(error = %e, "could not publish registry changes on {SYSTEM_CHANNEL}");
            }
        });
    }
}

/// The `relay.system` event describing a change.
pub fn change_event(change: &Change) -> Draft {
    let (event_type, data) = match change {
        Change::Registered {
            name,
            instance,
            replaced,
        } => (
            "subsystem.registered",
            serde_json::json!({"subsystem": name, "instance": instance, "replaced": replaced}),
        ),
        Change::Health {
            name,
            instance,
            healthy,
        } => (
            "subsystem.health",
            serde_json::json!({
                "subsystem": name, "instance": instance, "healthy": healthy,
                "status": if *healthy { "ready" } else { "unhealthy" },
            }),
        ),
        Change::Draining { name, instance } => (
            "subsystem.draining",
            serde_json::json!({"subsystem": name, "instance": instance}),
        ),
        Change::Removed {
            name,
            instance,
            reason,
        } => (
            "subsystem.removed",
            serde_json::json!({"subsystem": name, "instance": instance, "reason": reason}),
        ),
    };
    Draft {
        channel: ByteString::from_static(SYSTEM_CHANNEL),
        event_type: ByteString::from_static(event_type),
        id: None,
        data: Bytes::from(data.to_string()),
        source: Some("relay".into()),
        correlation_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_become_system_events() {
        let draft = change_event(&Change::Health {
            name: "sift".into(),
            instance: "sift-1".into(),
            healthy: false,
        });
        assert_eq!(&*draft.channel, SYSTEM_CHANNEL);
        assert_eq!(&*draft.event_type, "subsystem.health");
        let v: serde_json::Value = serde_json::from_slice(&draft.data).unwrap();
        assert_eq!(v["status"], "unhealthy");
        assert_eq!(v["instance"], "sift-1");
        crate::names::validate_channel(SYSTEM_CHANNEL).unwrap();
        crate::names::validate_type(&draft.event_type).unwrap();
    }

    #[test]
    fn static_instances_are_validated_with_their_index() {
        let mut config = Config {
            subsystems: vec![
                SubsystemConfig {
                    name: "sift".into(),
                    instance: "sift-1".into(),
                    url: "http://127.0.0.1:9001".into(),
                    ..SubsystemConfig::default()
                },
                SubsystemConfig {
                    name: "cast".into(),
                    instance: "c".into(),
                    url: "https://x".into(),
                    ..SubsystemConfig::default()
                },
            ],
            ..Config::default()
        };
        let e = initial_registry(&config, 2).unwrap_err();
        assert_eq!(e.field, "subsystems[1].url");
        config.subsystems.pop();
        assert_eq!(initial_registry(&config, 2).unwrap().instances().count(), 1);
    }
}
