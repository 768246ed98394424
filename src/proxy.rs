//! Routing HTTP requests to subsystem instances (API.md section 6).
//!
//! Owns one shard's proxy state: its upstream client (keep-alive pools), its circuit breaker
//! per instance, its balancer per subsystem, and its rate limiters. A request whose path falls
//! under a registered route prefix goes to an instance the balancer picks among the routable
//! ones (ready, circuit not open), with `X-Request-ID`, `traceparent` and `X-Forwarded-For`
//! set; a connect failure or 5xx is retried once on another instance when that is safe.
//!
//! Must never: share state with another shard (circuits and balancers are per shard; only the
//! per-instance counters in the table are shared atomics), retry a non-idempotent request that
//! may have reached an upstream, or buffer a body over `limits.max_body_bytes`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::Bytes;

use crate::auth::{Auth, Principal};
use crate::config::{Config, LbPolicy};
use crate::http::client::{Client, ClientConfig, ClientError, Request};
use crate::http::codec::{Method, RequestHead};
use crate::http::Response;
use crate::ratelimit::{retry_after_secs, Division, Limit, RateLimiter, TrustedProxies};
use crate::registry::balance::{Balancer, Candidate, Policy};
use crate::registry::circuit::{Circuit, CircuitConfig, Permit};
use crate::registry::{prefix_matches, Lifecycle, RoutableInstance, SubsystemEntry};
use crate::shard::Shard;

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus those relay sets.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
];

/// Rate-limited clients are remembered up to this many keys per shard and limiter.
const RATE_LIMIT_KEYS: usize = 65_536;

/// One shard's proxy state.
pub struct ProxyState {
    shard: usize,
    client: Client,
    timeout: Duration,
    circuit_config: CircuitConfig,
    /// By instance key: the circuit and the reset epoch it last saw.
    circuits: RefCell<AHashMap<usize, (Circuit, u64)>>,
    balancers: RefCell<AHashMap<String, Balancer>>,
    publish_limit: RefCell<RateLimiter>,
    proxy_limit: RefCell<RateLimiter>,
    /// `[[rate_limit.routes]]`, each with its own buckets.
    route_limits: Vec<RouteLimit>,
    trusted: TrustedProxies,
    started: Instant,
}

/// A per-route or per-subsystem limit for proxied requests.
struct RouteLimit {
    prefix: Option<String>,
    subsystem: Option<String>,
    limiter: RefCell<RateLimiter>,
}

impl ProxyState {
    pub fn new(config: &Config, shard: usize, shards: usize) -> ProxyState {
        let c = &config.circuit;
        let r = &config.rate_limit;
        let timeout = Duration::from_millis(config.proxy.timeout_ms);
        ProxyState {
            shard,
            client: Client::new(ClientConfig {
                connect_timeout: Duration::from_millis(config.health.timeout_ms).min(timeout),
                request_timeout: timeout,
                max_response_body_bytes: config.limits.max_body_bytes,
                ..ClientConfig::default()
            }),
            timeout,
            circuit_config: CircuitConfig {
                consecutive_failures: c.consecutive_failures,
                cooldown: Duration::from_millis(c.cooldown_ms),
                half_open_probes: c.half_open_probes,
                cooldown_max: Duration::from_millis(c.cooldown_max_ms),
                failure_rate_percent: c.failure_rate_percent,
                rate_window: Duration::from_millis(c.rate_window_ms),
                rate_min_requests: c.rate_min_requests,
            },
            circuits: RefCell::new(AHashMap::new()),
            balancers: RefCell::new(AHashMap::new()),
            // Each shard grants the full per-client rate: a client's connections land on
            // several shards, so a strict split would refuse clients under their limit.
            publish_limit: RefCell::new(RateLimiter::new(
                Limit {
                    per_s: r.publish_per_s,
                    burst: r.publish_burst,
                },
                shards,
                Division::PerShard,
                RATE_LIMIT_KEYS,
            )),
            proxy_limit: RefCell::new(RateLimiter::new(
                Limit {
                    per_s: r.proxy_per_s,
                    burst: r.proxy_burst,
                },
                shards,
                Division::PerShard,
                RATE_LIMIT_KEYS,
            )),
            route_limits: r
                .routes
                .iter()
                .map(|route| RouteLimit {
                    prefix: route.prefix.clone(),
                    subsystem: route.subsystem.clone(),
                    limiter: RefCell::new(RateLimiter::new(
                        Limit {
                            per_s: route.per_s,
                            burst: route.burst,
                        },
                        shards,
                        Division::PerShard,
                        RATE_LIMIT_KEYS,
                    )),
                })
                .collect(),
            trusted: TrustedProxies::new(&r.trusted_proxies),
            started: Instant::now(),
        }
    }

    /// The key a client is limited by: the JWT `sub` when the bearer token is a valid JWT of
    /// ours, else the bearer token or API key itself, else the client address (taken from
    /// `X-Forwarded-For` only when the peer is a trusted proxy).
    pub fn client_key(&self, auth: &Auth, head: &RequestHead, peer: IpAddr) -> String {
        if let Some(token) = crate::auth::bearer(head.header_str("authorization")) {
            if auth.jwt_required() {
                if let Ok(Principal {
                    user: Some(sub), ..
                }) = auth.principal(Some(token), None, crate::shard::unix_ms() / 1000)
                {
                    return format!("sub:{sub}");
                }
            }
            return format!("bearer:{token}");
        }
        let ip = self
            .trusted
            .client_ip(peer, head.header_str("x-forwarded-for"));
        format!("ip:{ip}")
    }

    /// The limiter for a proxied request to `subsystem` at `path`: the longest matching
    /// `prefix` entry, else a `subsystem` entry, else `[rate_limit] proxy_per_s`.
    fn proxy_limiter(&self, path: &str, subsystem: &str) -> &RefCell<RateLimiter> {
        let by_prefix = self
            .route_limits
            .iter()
            .filter_map(|r| {
                let prefix = r.prefix.as_deref()?;
                prefix_matches(prefix, path).then_some((prefix.len(), &r.limiter))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, limiter)| limiter);
        by_prefix
            .or_else(|| {
                self.route_limits
                    .iter()
                    .find(|r| r.subsystem.as_deref() == Some(subsystem))
                    .map(|r| &r.limiter)
            })
            .unwrap_or(&self.proxy_limit)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes a publish token for `key`; `Err` is a ready 429.
    pub fn check_publish(&self, key: &str) -> Result<(), Response> {
        let now = self.now_ns();
        self.publish_limit
            .borrow_mut()
            .check(key, now)
            .map_err(rate_limited)
    }

    /// Takes a circuit permit for `instance` (webhooks use the proxy's circuits).
    pub fn acquire(&self, instance: &RoutableInstance, now: Instant) -> Result<Permit, Duration> {
        self.with_circuit(instance, |c| c.try_acquire(now))
    }

    /// Reports how a request under `permit` went.
    pub fn record(&self, instance: &RoutableInstance, permit: Permit, failed: bool) {
        let now = Instant::now();
        let shard = self.shard;
        self.with_circuit(instance, |circuit| {
            if failed {
                circuit.on_failure(permit, now);
            } else {
                circuit.on_success(permit, now);
            }
            if let Some(gauge) = instance.stats.circuit.get(shard) {
                gauge.store(circuit.state(now).as_gauge(), Ordering::Relaxed);
            }
        });
    }

    /// Runs `f` on the shard's circuit for `instance`, resetting it first if
    /// `POST .../circuit/reset` happened since this shard last looked.
    fn with_circuit<T>(&self, instance: &RoutableInstance, f: impl FnOnce(&mut Circuit) -> T) -> T {
        let epoch = instance.stats.reset_epoch.load(Ordering::Acquire);
        let mut circuits = self.circuits.borrow_mut();
        let (circuit, seen) = circuits
            .entry(instance.key())
            .or_insert_with(|| (Circuit::new(self.circuit_config.clone()), epoch));
        if *seen != epoch {
            circuit.reset();
            *seen = epoch;
        }
        f(circuit)
    }
}

fn rate_limited(retry_after: Duration) -> Response {
    Response::error(
        429,
        "rate_limited",
        "too many requests from this client; retry after the time in Retry-After",
    )
    .with_header("Retry-After", retry_after_secs(retry_after).to_string())
}

fn idempotent(method: &Method) -> bool {
    matches!(
        method,
        Method::Get | Method::Head | Method::Put | Method::Delete | Method::Options
    ) || matches!(method, Method::Other(m) if m == "TRACE")
}

fn policy(lb: LbPolicy) -> Policy {
    match lb {
        LbPolicy::RoundRobin => Policy::RoundRobin,
        LbPolicy::LeastOutstanding => Policy::LeastOutstanding,
        LbPolicy::Weighted => Policy::Weighted,
    }
}

/// A request id is kept when it is sane (1..=128 visible ASCII), else replaced.
fn request_id(head: &RequestHead) -> String {
    match head.header_str("x-request-id") {
        Some(id)
            if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_string()
        }
        _ => uuid::Uuid::new_v4().hyphenated().to_string(),
    }
}

/// W3C trace context: keep the trace id and flags, new span id; or start a new trace.
pub fn traceparent(incoming: Option<&str>) -> String {
    let random = uuid::Uuid::new_v4();
    let span = hex(&random.as_bytes()[..8]);
    if let Some(value) = incoming {
        let parts: Vec<&str> = value.trim().split('-').collect();
        if let [version, trace, parent, flags] = parts[..] {
            let hex_of =
                |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
            if version == "00"
                && hex_of(trace, 32)
                && trace != "00000000000000000000000000000000"
                && hex_of(parent, 16)
                && hex_of(flags, 2)
            {
                return format!(
                    "00-{}-{span}-{}",
                    trace.to_ascii_lowercase(),
                    flags.to_ascii_lowercase()
                );
            }
        }
    }
    let trace = hex(uuid::Uuid::new_v4().as_bytes());
    format!("00-{trace}-{span}-01")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Routes `head` if its path is under a registered route; `None` lets the caller answer 404.
pub async fn forward(
    shard: &Rc<Shard>,
    peer: std::net::SocketAddr,
    head: &RequestHead,
    body: &Bytes,
) -> Option<Response> {
    let table = shard.shared.table.load_full();
    let subsystem = table.route(&head.path)?;
    Some(forward_to(shard, peer, head, body, subsystem).await)
}

enum Outcome {
    Answer(crate::http::client::Response),
    Failed(ClientError),
}

async fn forward_to(
    shard: &Rc<Shard>,
    peer: std::net::SocketAddr,
    head: &RequestHead,
    body: &Bytes,
    subsystem: &SubsystemEntry,
) -> Response {
    let proxy = &shard.proxy;
    let now_ns = proxy.now_ns();
    let key = proxy.client_key(&shard.shared.auth, head, peer.ip());
    let limiter = proxy.proxy_limiter(&head.path, &subsystem.name);
    if let Err(retry_after) = limiter.borrow_mut().check(&key, now_ns) {
        shard.stats.rate_limited.inc();
        return rate_limited(retry_after);
    }
    let request_id = request_id(head);
    let trace = traceparent(head.header_str("traceparent"));
    let forwarded_for = match head.header_str("x-forwarded-for") {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    // Headers named in `Connection` are hop-by-hop too.
    let connection_tokens: Vec<String> = head
        .header_str("connection")
        .map(|v| {
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut headers: Vec<(&str, &[u8])> = head
        .headers
        .iter()
        .filter(|(name, _)| {
            !HOP_BY_HOP.contains(&name.as_str())
                && name != "x-request-id"
                && name != "traceparent"
                && name != "x-forwarded-for"
                && !connection_tokens.iter().any(|t| t == name)
        })
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .collect();
    headers.push(("X-Request-ID", request_id.as_bytes()));
    headers.push(("traceparent", trace.as_bytes()));
    headers.push(("X-Forwarded-For", forwarded_for.as_bytes()));
    headers.push(("X-Forwarded-Proto", b"http"));
    if let Some(host) = head.header("host") {
        headers.push(("X-Forwarded-Host", host));
    }
    let may_retry = idempotent(&head.method);
    let mut tried: Option<usize> = None;
    let mut last_failure: Option<(ClientError, String)> = None;

    for attempt in 0..2 {
        let Some((index, permit)) = pick(shard, subsystem, tried) else {
            break;
        };
        let instance = &subsystem.instances[index];
        let stats = &instance.stats;
        stats.in_flight.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        let request = Request {
            method: head.method.as_str(),
            path_and_query: &head.target,
            headers: &headers,
            body,
        };
        let outcome = match proxy
            .client
            .send_timeout(
                instance.endpoint.addr,
                &instance.endpoint.host,
                request,
                proxy.timeout,
            )
            .await
        {
            Ok(response) => Outcome::Answer(response),
            Err(e) => Outcome::Failed(e),
        };
        stats.in_flight.fetch_sub(1, Ordering::AcqRel);
        let elapsed = started.elapsed();
        stats.latency_ns_total.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Some(h) = stats.latency.get(shard.id) {
            h.record(elapsed);
        }
        let now = Instant::now();
        let failed = match &outcome {
            Outcome::Answer(r) => r.status >= 500,
            Outcome::Failed(_) => true,
        };
        let class = match &outcome {
            Outcome::Answer(r) => match r.status {
                200..=299 => 0,
                300..=399 => 1,
                400..=499 => 2,
                _ => 3,
            },
            Outcome::Failed(e) if e.is_timeout() => 4,
            Outcome::Failed(_) => 5,
        };
        stats.responses[class].fetch_add(1, Ordering::Relaxed);
        let _ = now;
        proxy.record(instance, permit, failed);
        let safe_to_retry = match &outcome {
            Outcome::Failed(e) => may_retry || e.is_connect(),
            Outcome::Answer(_) => may_retry,
        };
        match outcome {
            Outcome::Answer(response) if !failed || attempt == 1 || !safe_to_retry => {
                return relay_response(response, &request_id, &instance.instance);
            }
            Outcome::Answer(response) => {
                // A 5xx we may retry: keep it in case no other instance can take the retry.
                last_failure = None;
                tried = Some(index);
                if pick_available(shard, subsystem, tried) {
                    continue;
                }
                return relay_response(response, &request_id, &instance.instance);
            }
            Outcome::Failed(e) => {
                last_failure = Some((e, instance.instance.clone()));
                tried = Some(index);
                if attempt == 0 && safe_to_retry {
                    continue;
                }
                break;
            }
        }
    }
    match last_failure {
        Some((e, instance)) if e.is_timeout() => Response::error(
            504,
            "upstream_timeout",
            &format!(
                "{} instance {instance} did not answer in time: {e}",
                subsystem.name
            ),
        ),
        Some((e, instance)) => Response::error(
            502,
            "bad_gateway",
            &format!("{} instance {instance} failed: {e}", subsystem.name),
        ),
        None => no_instance(shard, subsystem),
    }
    .with_header("X-Request-ID", request_id)
}

/// The answer when no instance can take the request: 502 when none is registered (or all
/// are draining), 503 with `Retry-After` when instances exist but none is healthy and closed.
fn no_instance(shard: &Shard, subsystem: &SubsystemEntry) -> Response {
    let live: Vec<&std::sync::Arc<RoutableInstance>> = subsystem
        .instances
        .iter()
        .filter(|i| i.lifecycle != Lifecycle::Draining)
        .collect();
    if live.is_empty() {
        return Response::error(
            502,
            "no_instance",
            &format!("no instance of {} is registered", subsystem.name),
        );
    }
    let now = Instant::now();
    let retry_after = live
        .iter()
        .filter_map(|i| shard.proxy.with_circuit(i, |c| c.retry_after(now)))
        .min()
        .unwrap_or(Duration::from_secs(1));
    Response::error(
        503,
        "no_healthy_instance",
        &format!(
            "no instance of {} is healthy with a closed circuit right now",
            subsystem.name
        ),
    )
    .with_header("Retry-After", retry_after_secs(retry_after).to_string())
}

fn candidates(shard: &Shard, subsystem: &SubsystemEntry, now: Instant) -> Vec<Candidate> {
    subsystem
        .instances
        .iter()
        .enumerate()
        .map(|(index, i)| Candidate {
            index,
            weight: i.weight,
            outstanding: u32::try_from(i.stats.in_flight.load(Ordering::Relaxed).max(0))
                .unwrap_or(u32::MAX),
            available: i.lifecycle == Lifecycle::Ready
                && shard
                    .proxy
                    .with_circuit(i, |c| c.retry_after(now).is_none()),
        })
        .collect()
}

fn pick_available(shard: &Shard, subsystem: &SubsystemEntry, exclude: Option<usize>) -> bool {
    candidates(shard, subsystem, Instant::now())
        .iter()
        .any(|c| c.available && Some(c.index) != exclude)
}

/// Picks an instance and takes a circuit permit for it.
fn pick(
    shard: &Shard,
    subsystem: &SubsystemEntry,
    exclude: Option<usize>,
) -> Option<(usize, Permit)> {
    let now = Instant::now();
    let mut candidates = candidates(shard, subsystem, now);
    let mut balancers = shard.proxy.balancers.borrow_mut();
    let balancer = balancers
        .entry(subsystem.name.clone())
        .or_insert_with(|| Balancer::new(policy(subsystem.lb)));
    // A half-open circuit may refuse (its probes are taken): try the others then.
    for _ in 0..candidates.len() {
        let index = balancer.pick(&candidates, exclude)?;
        let instance = subsystem.instances.get(index)?;
        match shard.proxy.with_circuit(instance, |c| c.try_acquire(now)) {
            Ok(permit) => return Some((index, permit)),
            Err(_) => {
                if let Some(c) = candidates.iter_mut().find(|c| c.index == index) {
                    c.available = false;
                }
            }
        }
    }
    None
}

/// The upstream's answer, minus hop-by-hop headers, with `X-Request-ID`.
fn relay_response(
    upstream: crate::http::client::Response,
    request_id: &str,
    instance: &str,
) -> Response {
    let mut response = Response {
        status: upstream.status,
        content_type: "",
        body: upstream.body.to_vec(),
        headers: Vec::with_capacity(upstream.headers.len() + 2),
    };
    for (name, value) in &upstream.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str())
            || lower == "x-request-id"
            || lower == "x-relay-shard"
        {
            continue;
        }
        response.headers.push((
            Cow::Owned(name.clone()),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    response
        .with_header("X-Request-ID", request_id)
        .with_header("X-Relay-Instance", instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_keeps_the_trace_and_makes_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = traceparent(Some(incoming));
        let parts: Vec<&str> = out.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(parts[2], "00f067aa0ba902b7");
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
        for bad in [
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let fresh = traceparent(Some(bad));
            let p: Vec<&str> = fresh.split('-').collect();
            assert_eq!(
                (p[0], p[1].len(), p[2].len(), p[3]),
                ("00", 32, 16, "01"),
                "{bad}"
            );
            assert_ne!(p[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        }
        let none = traceparent(None);
        assert_ne!(none, traceparent(None), "new traces are random");
    }

    #[test]
    fn idempotent_methods() {
        assert!(idempotent(&Method::Get));
        assert!(idempotent(&Method::Put));
        assert!(idempotent(&Method::Delete));
        assert!(!idempotent(&Method::Post));
        assert!(!idempotent(&Method::Patch));
    }
}
