//! The registry's HTTP endpoints (API.md section 2): list, register, heartbeat, deregister,
//! circuit reset.
//!
//! Owns request validation and the JSON of the listing. Reads come from the routing table
//! snapshot (any shard answers without asking anyone); changes go to the control task on
//! shard 0. Must never: change registry state itself.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use serde_json::json;

use super::control::Command;
use super::{Change, RoutableInstance, Table, RESPONSE_CLASSES};
use crate::config::{LbPolicy, SubsystemConfig};
use crate::http::codec::{Method, RequestHead};
use crate::http::Response;
use crate::shard::Shard;

fn lb_name(lb: LbPolicy) -> &'static str {
    match lb {
        LbPolicy::RoundRobin => "round_robin",
        LbPolicy::LeastOutstanding => "least_outstanding",
        LbPolicy::Weighted => "weighted",
    }
}

fn circuit_name(gauge: u8) -> &'static str {
    match gauge {
        0 => "closed",
        1 => "half_open",
        _ => "open",
    }
}

fn instance_json(i: &RoutableInstance, now: Instant) -> serde_json::Value {
    let stats = &i.stats;
    let responses: serde_json::Map<String, serde_json::Value> = RESPONSE_CLASSES
        .iter()
        .zip(stats.responses.iter())
        .map(|(class, n)| (class.to_string(), json!(n.load(Ordering::Relaxed))))
        .collect();
    json!({
        "instance": i.instance,
        "url": i.spec.url,
        "status": i.lifecycle.as_str(),
        "healthy": i.lifecycle != super::Lifecycle::Unhealthy,
        "circuit": circuit_name(stats.circuit_state()),
        "in_flight": stats.in_flight.load(Ordering::Relaxed).max(0),
        "requests": stats.requests(),
        "responses": responses,
        "latency_avg_ms": (stats.latency_avg_ms() * 1000.0).round() / 1000.0,
        "weight": i.weight,
        "health_path": i.spec.health_path,
        "routes": i.spec.routes,
        "subscriptions": i.spec.subscriptions.iter().map(|s| json!({
            "types": s.types, "channels": s.channels, "path": s.path,
        })).collect::<Vec<_>>(),
        "ttl_ms": i.spec.ttl_ms,
        "source": if i.from_config { "config" } else { "api" },
        "registered_s_ago": now.saturating_duration_since(i.registered_at).as_secs(),
        "heartbeat_ms_ago": u64::try_from(now.saturating_duration_since(i.last_heartbeat).as_millis()).unwrap_or(u64::MAX),
        "health_checks": {
            "ok": stats.health_checks_ok.load(Ordering::Relaxed),
            "failed": stats.health_checks_failed.load(Ordering::Relaxed),
            "status_changes": stats.health_changes.load(Ordering::Relaxed),
        },
        "webhooks": {
            "delivered": stats.webhooks_delivered.load(Ordering::Relaxed),
            "failed": stats.webhooks_failed.load(Ordering::Relaxed),
        },
    })
}

fn subsystems_json(table: &Table, only: Option<&str>) -> Vec<serde_json::Value> {
    let now = Instant::now();
    table
        .subsystems
        .iter()
        .filter(|s| only.is_none_or(|name| s.name == name))
        .map(|s| {
            let mut routes: Vec<&String> =
                s.instances.iter().flat_map(|i| &i.spec.routes).collect();
            routes.sort();
            routes.dedup();
            json!({
                "name": s.name,
                "lb": lb_name(s.lb),
                "routes": routes,
                "instances": s.instances.iter().map(|i| instance_json(i, now)).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `GET /api/v1/relay/subsystems[/{name}]`.
pub fn list(shard: &Shard, only: Option<&str>) -> Response {
    let table = shard.shared.table.load_full();
    let subsystems = subsystems_json(&table, only);
    if let (Some(name), true) = (only, subsystems.is_empty()) {
        return Response::error(
            404,
            "not_found",
            &format!("no subsystem {name} is registered"),
        );
    }
    let body = match only {
        Some(_) => subsystems.into_iter().next().unwrap_or_default(),
        None => json!({"subsystems": subsystems, "version": table.version}),
    };
    Response::json(200, body.to_string().into_bytes())
}

/// `POST /api/v1/relay/subsystems`.
pub async fn register(shard: &Shard, body: &[u8]) -> Response {
    let spec: SubsystemConfig = match serde_json::from_slice(body) {
        Ok(s) => s,
        Err(e) => {
            return Response::error(400, "bad_request", &format!("invalid registration: {e}"))
        }
    };
    let (reply, answer) = oneshot::channel();
    let name = spec.name.clone();
    let instance = spec.instance.clone();
    shard.control(Command::Register {
        spec: Box::new(spec),
        reply,
    });
    match answer.await {
        Ok(Ok(Change::Registered { replaced, .. })) => {
            let table = shard.shared.table.load_full();
            let body = table
                .instance(&name, &instance)
                .map(|i| {
                    let mut v = instance_json(i, Instant::now());
                    v["subsystem"] = json!(name);
                    v["replaced"] = json!(replaced);
                    v
                })
                .unwrap_or_else(|| json!({"subsystem": name, "instance": instance}));
            Response::json(201, body.to_string().into_bytes())
        }
        Ok(Ok(_)) => Response::error(500, "internal", "unexpected registry answer"),
        Ok(Err(e)) => Response::error(400, "bad_request", &e.to_string()),
        Err(_) => Response::error(503, "shutting_down", "the relay is shutting down"),
    }
}

/// Everything under `/api/v1/relay/subsystems/`.
pub async fn route(shard: &Rc<Shard>, head: &RequestHead, rest: &str) -> Response {
    let parts: Vec<&str> = rest.split('/').collect();
    let method = &head.method;
    let allow = |methods: &str| {
        Response::error(
            405,
            "method_not_allowed",
            &format!(
                "{} is not allowed here; allowed: {methods}",
                method.as_str()
            ),
        )
        .with_header("Allow", methods.to_string())
    };
    match parts[..] {
        [name] => match method {
            Method::Get | Method::Head => list(shard, Some(name)),
            _ => allow("GET, HEAD"),
        },
        [name, instance] => match method {
            Method::Delete => deregister(shard, name, instance).await,
            _ => allow("DELETE"),
        },
        [name, instance, "heartbeat"] => match method {
            Method::Put | Method::Post => heartbeat(shard, name, instance).await,
            _ => allow("PUT"),
        },
        [name, instance, "circuit", "reset"] => match method {
            Method::Post => reset_circuit(shard, name, instance),
            _ => allow("POST"),
        },
        _ => Response::error(
            404,
            "not_found",
            &format!("no such endpoint: {}", head.path()),
        ),
    }
}

async fn heartbeat(shard: &Shard, name: &str, instance: &str) -> Response {
    let (reply, answer) = oneshot::channel();
    shard.control(Command::Heartbeat {
        name: name.into(),
        instance: instance.into(),
        reply,
    });
    match answer.await {
        Ok(Ok(())) => Response {
            status: 204,
            content_type: "",
            body: Vec::new(),
            headers: Vec::new(),
        },
        Ok(Err(e)) => Response::error(404, "not_found", &e.to_string()),
        Err(_) => Response::error(503, "shutting_down", "the relay is shutting down"),
    }
}

/// Starts the drain and answers once the instance's in-flight requests have finished and it
/// is gone (bounded by `proxy.timeout_ms` plus a second).
async fn deregister(shard: &Shard, name: &str, instance: &str) -> Response {
    let (reply, answer) = oneshot::channel();
    shard.control(Command::Deregister {
        name: name.into(),
        instance: instance.into(),
        reply,
    });
    match answer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Response::error(404, "not_found", &e.to_string()),
        Err(_) => return Response::error(503, "shutting_down", "the relay is shutting down"),
    }
    let deadline = Instant::now()
        + Duration::from_millis(shard.config().proxy.timeout_ms)
        + Duration::from_secs(1);
    while shard.shared.table.load().instance(name, instance).is_some() && Instant::now() < deadline
    {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    Response {
        status: 204,
        content_type: "",
        body: Vec::new(),
        headers: Vec::new(),
    }
}

fn reset_circuit(shard: &Shard, name: &str, instance: &str) -> Response {
    let table = shard.shared.table.load_full();
    let Some(i) = table.instance(name, instance) else {
        return Response::error(
            404,
            "not_found",
            &format!("no instance {instance} of subsystem {name} is registered"),
        );
    };
    // Every shard resets its own circuit when it next sees the new epoch.
    i.stats.reset_epoch.fetch_add(1, Ordering::AcqRel);
    for gauge in i.stats.circuit.iter() {
        gauge.store(0, Ordering::Relaxed);
    }
    let body = json!({"subsystem": name, "instance": instance, "circuit": "closed"});
    Response::json(200, body.to_string().into_bytes())
}
