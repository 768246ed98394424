//! Routing HTTP requests to subsystem instances (API.md section 6).
//!
//! Owns one shard's proxy state: its upstream client (keep-alive pools), its circuit breaker
//! per instance, its balancer per subsystem, and its rate limiters. A request whose path falls
//! under a registered route prefix goes to an instance the balancer picks among the routable
//! ones (ready, circuit not open), with `X-Request-ID`, `traceparent` and `X-Forwarded-For`
//! set; a connect failure or 5xx is retried once on another instance when that is safe.
//!
//! Bodies: a request body up to [`BUFFERED_BODY_BYTES`] is read whole (so it can be resent on
//! a retry); a larger one streams to one instance as it arrives. The response comes back as a
//! [`ResponseStream`] that the connection (`http::conn`) passes on piece by piece.
//!
//! Must never: share state with another shard (circuits and balancers are per shard; only the
//! per-instance counters in the table are shared atomics), retry a non-idempotent request that
//! may have reached an upstream, retry a body that has already been streamed, or hold more
//! than [`BUFFERED_BODY_BYTES`] of a request body or one read of a response body.

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ahash::AHashMap;

use crate::auth::{Auth, Principal};
use crate::config::{Config, LbPolicy};
use crate::http::client::{Client, ClientConfig, ClientError, Request, ResponseStream};
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
                max_idle_per_host: config.proxy.pool_max_idle,
                idle_timeout: Duration::from_millis(config.proxy.pool_idle_timeout_ms),
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

    /// Takes a publish token for the client `key` names; `Err` is a ready 429.
    pub fn check_publish(&self, key: impl FnOnce() -> String) -> Result<(), Response> {
        let mut limit = self.publish_limit.borrow_mut();
        if limit.is_off() {
            // Neither a clock read nor the key's allocation per publish when nothing is limited.
            return Ok(());
        }
        limit.check(&key(), self.now_ns()).map_err(rate_limited)
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

/// A request body as the connection delivers it, piece by piece (see `http::conn`).
// Futures here stay on their shard's thread, so no `Send` bound is wanted.
#[allow(async_fn_in_trait)]
pub trait BodySource {
    /// The declared `Content-Length`, if any (`Some(0)` for no body).
    fn content_length(&self) -> Option<u64>;
    /// The next decoded piece; `Ok(None)` once the body is complete.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, BodyError>;
}

/// Why a request body could not be read; the connection answers (or closes) accordingly.
#[derive(Debug)]
pub enum BodyError {
    /// Malformed or over `limits.max_body_bytes`: the error response to send, then close.
    Refused(Response),
    /// The client went away or timed out: nothing to answer.
    Gone,
}

/// Bodies up to this size are read whole before forwarding, so an idempotent request can be
/// retried on another instance; larger ones are streamed and never retried once sent.
pub const BUFFERED_BODY_BYTES: usize = 64 * 1024;

/// What the connection writes back for a proxied request.
// One per request, moved once: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Answer<'c> {
    /// relay's own answer (429, 502, 503, 504...).
    Relay(Response),
    /// The upstream's head and a body still to be passed on.
    Upstream(Upstream<'c>),
}

/// An upstream response to pass on.
pub struct Upstream<'c> {
    pub response: ResponseStream<'c>,
    /// The headers to send: the upstream's minus hop-by-hop ones, plus `X-Request-ID` and
    /// `X-Relay-Instance`.
    pub headers: Vec<(String, String)>,
    /// `proxy.timeout_ms` after the request started: bounds the body too.
    pub deadline: Instant,
}

/// Whether `path` is under a registered route (relay's own paths are checked by the caller).
pub fn routes(shard: &Shard, path: &str) -> bool {
    shard.shared.table.load().route(path).is_some()
}

/// Forwards a request under a registered route. The body is read from `body` here: whole
/// when it is small (up to [`BUFFERED_BODY_BYTES`]), so an idempotent request may be retried,
/// else streamed to one instance as it arrives. `Err` is a body that could not be read.
pub async fn forward<'s>(
    shard: &'s Rc<Shard>,
    peer: std::net::SocketAddr,
    head: &RequestHead,
    body: &mut impl BodySource,
) -> Result<Answer<'s>, BodyError> {
    // Read first, so a small body is consumed even when the answer is relay's own (429, 502)
    // and the connection can stay open.
    let start = read_start(body).await?;
    let table = shard.shared.table.load_full();
    let Some(subsystem) = table.route(head.path()) else {
        return Ok(Answer::Relay(Response::error(
            404,
            "not_found",
            &format!("no route for {}", head.path()),
        )));
    };
    forward_to(shard, peer, head, start, body, subsystem).await
}

/// The headers relay adds to the request, the same for every instance tried.
struct Outgoing {
    request_id: String,
    trace: String,
    forwarded_for: String,
}

impl Outgoing {
    fn new(head: &RequestHead, peer: std::net::SocketAddr) -> Outgoing {
        Outgoing {
            request_id: request_id(head),
            trace: traceparent(head.header_str("traceparent")),
            forwarded_for: match head.header_str("x-forwarded-for") {
                Some(prior) => format!("{prior}, {}", peer.ip()),
                None => peer.ip().to_string(),
            },
        }
    }

    /// The request's end-to-end headers (borrowed from `head`) plus relay's own.
    fn headers<'a>(&'a self, head: &'a RequestHead) -> Vec<(&'a str, &'a [u8])> {
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
            .headers()
            .filter(|(name, _)| {
                !HOP_BY_HOP.contains(name)
                    && *name != "x-request-id"
                    && *name != "traceparent"
                    && *name != "x-forwarded-for"
                    && *name != "expect"
                    && !connection_tokens.iter().any(|t| t == name)
            })
            .collect();
        headers.push(("X-Request-ID", self.request_id.as_bytes()));
        headers.push(("traceparent", self.trace.as_bytes()));
        headers.push(("X-Forwarded-For", self.forwarded_for.as_bytes()));
        headers.push(("X-Forwarded-Proto", b"http"));
        if let Some(host) = head.header("host") {
            headers.push(("X-Forwarded-Host", host));
        }
        headers
    }
}

/// The request body, read before the first attempt.
enum Body {
    /// Complete; small enough to resend on a retry.
    Whole(Vec<u8>),
    /// The first pieces (over [`BUFFERED_BODY_BYTES`] in all); the rest still in the source.
    Streaming(Vec<u8>),
}

async fn read_start(body: &mut impl BodySource) -> Result<Body, BodyError> {
    let mut buffered: Vec<u8> = Vec::new();
    while let Some(piece) = body.next().await? {
        buffered.extend_from_slice(&piece);
        if buffered.len() > BUFFERED_BODY_BYTES {
            return Ok(Body::Streaming(buffered));
        }
    }
    Ok(Body::Whole(buffered))
}

#[allow(clippy::large_enum_variant)]
enum Outcome<'c> {
    Answer(ResponseStream<'c>),
    Failed(ClientError),
}

async fn forward_to<'s>(
    shard: &'s Rc<Shard>,
    peer: std::net::SocketAddr,
    head: &RequestHead,
    start: Body,
    source: &mut impl BodySource,
    subsystem: &SubsystemEntry,
) -> Result<Answer<'s>, BodyError> {
    let proxy = &shard.proxy;
    let now_ns = proxy.now_ns();
    let key = proxy.client_key(&shard.shared.auth, head, peer.ip());
    let limiter = proxy.proxy_limiter(head.path(), &subsystem.name);
    if let Err(retry_after) = limiter.borrow_mut().check(&key, now_ns) {
        shard.stats.rate_limited.inc();
        return Ok(Answer::Relay(rate_limited(retry_after)));
    }
    let outgoing = Outgoing::new(head, peer);
    let headers = outgoing.headers(head);
    let request_id = &outgoing.request_id;
    // The deadline covers the request body, the response head and the response body.
    let deadline = Instant::now() + proxy.timeout;
    let mut body = Some(start);
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
        let (addr, host) = (instance.endpoint.addr, instance.endpoint.host.as_str());
        let sent = match body.take() {
            Some(Body::Whole(bytes)) => {
                let request = outgoing_request(head, &headers, &bytes);
                let sent = proxy
                    .client
                    .send_streaming(addr, host, request, deadline)
                    .await;
                body = Some(Body::Whole(bytes));
                sent
            }
            Some(Body::Streaming(first)) => {
                let request = outgoing_request(head, &headers, b"");
                let streamed =
                    stream_body(proxy, addr, host, request, first, source, deadline).await;
                match streamed {
                    Ok(response) => Ok(response),
                    // The first pieces never left: another instance may take them.
                    Err(StreamFailure::Connect(e, first)) => {
                        body = Some(Body::Streaming(first));
                        Err(e)
                    }
                    Err(StreamFailure::Upstream(e)) => Err(e),
                    Err(StreamFailure::Client(e)) => {
                        stats.in_flight.fetch_sub(1, Ordering::AcqRel);
                        proxy.with_circuit(instance, |c| c.on_cancel(permit));
                        return Err(e);
                    }
                }
            }
            None => Err(ClientError::InvalidRequest(
                "the request body was already sent",
            )),
        };
        let outcome = match sent {
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
        proxy.record(instance, permit, failed);
        // A body that went out (streamed) cannot be sent again.
        let resendable = body.is_some();
        let safe_to_retry = resendable
            && match &outcome {
                Outcome::Failed(e) => may_retry || e.is_connect(),
                Outcome::Answer(_) => may_retry,
            };
        match outcome {
            Outcome::Answer(response) => {
                // A 5xx we may retry goes to another instance when there is one; otherwise
                // (or when it is final) this answer is passed on.
                if failed && attempt == 0 && safe_to_retry {
                    tried = Some(index);
                    if pick_available(shard, subsystem, tried) {
                        last_failure = None;
                        continue;
                    }
                }
                return Ok(Answer::Upstream(upstream_answer(
                    response,
                    request_id,
                    &instance.instance,
                    deadline,
                )));
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
    let response = match last_failure {
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
    };
    Ok(Answer::Relay(
        response.with_header("X-Request-ID", request_id.clone()),
    ))
}

fn outgoing_request<'a>(
    head: &'a RequestHead,
    headers: &'a [(&'a str, &'a [u8])],
    body: &'a [u8],
) -> Request<'a> {
    Request {
        method: head.method.as_str(),
        path_and_query: head.target(),
        headers,
        body,
    }
}

/// How streaming a request body to an instance failed.
enum StreamFailure {
    /// No connection was made: the first pieces are handed back for another instance.
    Connect(ClientError, Vec<u8>),
    /// The upstream failed once body bytes had left.
    Upstream(ClientError),
    /// The client's body failed: nothing is answered upstream.
    Client(BodyError),
}

/// Sends a large body to one instance as it arrives from the client: `Content-Length` when the
/// client gave one, else chunked.
async fn stream_body<'c>(
    proxy: &'c ProxyState,
    addr: std::net::SocketAddr,
    host: &str,
    request: Request<'_>,
    first: Vec<u8>,
    source: &mut impl BodySource,
    deadline: Instant,
) -> Result<ResponseStream<'c>, StreamFailure> {
    let mut upload = match proxy
        .client
        .upload(addr, host, request, source.content_length(), deadline)
        .await
    {
        Ok(upload) => upload,
        Err(e) => return Err(StreamFailure::Connect(e, first)),
    };
    upload
        .send(first, deadline)
        .await
        .map_err(StreamFailure::Upstream)?;
    loop {
        match source.next().await {
            Ok(Some(piece)) => upload
                .send(piece, deadline)
                .await
                .map_err(StreamFailure::Upstream)?,
            Ok(None) => break,
            Err(e) => return Err(StreamFailure::Client(e)),
        }
    }
    upload
        .finish(deadline)
        .await
        .map_err(StreamFailure::Upstream)
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

/// The upstream's head to pass on: minus hop-by-hop headers, with `X-Request-ID` and
/// `X-Relay-Instance`.
fn upstream_answer<'c>(
    response: ResponseStream<'c>,
    request_id: &str,
    instance: &str,
    deadline: Instant,
) -> Upstream<'c> {
    let mut headers: Vec<(String, String)> = Vec::with_capacity(response.headers.len() + 2);
    for (name, value) in &response.headers {
        if HOP_BY_HOP.contains(&name.as_str()) || name == "x-request-id" || name == "x-relay-shard"
        {
            continue;
        }
        headers.push((name.clone(), String::from_utf8_lossy(value).into_owned()));
    }
    headers.push(("X-Request-ID".into(), request_id.to_string()));
    headers.push(("X-Relay-Instance".into(), instance.to_string()));
    Upstream {
        response,
        headers,
        deadline,
    }
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

    fn head(raw: &str) -> RequestHead {
        let limits = crate::http::codec::Limits {
            max_header_bytes: 8192,
            max_headers: 64,
            max_body_bytes: 1024,
        };
        match crate::http::codec::parse_head(raw.as_bytes(), &limits) {
            Ok(crate::http::codec::Parsed::Complete(head)) => head,
            _ => panic!("test head parses: {raw:?}"),
        }
    }

    #[test]
    fn client_keys() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let secret = "proxy-test-secret";
        let config = Config {
            rate_limit: crate::config::RateLimitConfig {
                trusted_proxies: vec!["10.0.0.0/8".to_string()],
                ..Default::default()
            },
            ..Config::default()
        };
        let proxy = ProxyState::new(&config, 0, 1);
        let jwt = Auth::new(Some(secret), None);
        let open = Auth::new(None, None);
        let peer: IpAddr = "10.1.1.1".parse().expect("ip");
        let far = u64::MAX / 2;
        let token = encode(
            &Header::default(),
            &serde_json::json!({"sub": "alice", "exp": far}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("token");
        let with_token = head(&format!(
            "GET /x HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        ));
        assert_eq!(proxy.client_key(&jwt, &with_token, peer), "sub:alice");
        // Without a JWT secret the token is an opaque bearer key.
        assert_eq!(
            proxy.client_key(&open, &with_token, peer),
            format!("bearer:{token}")
        );
        let api_key = head("GET /x HTTP/1.1\r\nAuthorization: Bearer k1\r\n\r\n");
        assert_eq!(proxy.client_key(&jwt, &api_key, peer), "bearer:k1");
        let forwarded = head("GET /x HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n");
        assert_eq!(proxy.client_key(&open, &forwarded, peer), "ip:203.0.113.9");
        let untrusted: IpAddr = "192.0.2.1".parse().expect("ip");
        assert_eq!(
            proxy.client_key(&open, &forwarded, untrusted),
            "ip:192.0.2.1"
        );
    }

    #[test]
    fn route_limits_pick_the_longest_prefix_then_the_subsystem() {
        let route = |prefix: Option<&str>, subsystem: Option<&str>, per_s| {
            crate::config::RouteLimitConfig {
                prefix: prefix.map(str::to_string),
                subsystem: subsystem.map(str::to_string),
                per_s,
                burst: 1,
            }
        };
        let config = Config {
            rate_limit: crate::config::RateLimitConfig {
                routes: vec![
                    route(Some("/a"), None, 1),
                    route(Some("/a/b"), None, 1),
                    route(None, Some("s"), 1),
                ],
                ..Default::default()
            },
            ..Config::default()
        };
        let proxy = ProxyState::new(&config, 0, 1);
        let which = |path: &str, subsystem: &str| {
            let chosen = proxy.proxy_limiter(path, subsystem);
            if std::ptr::eq(chosen, &proxy.proxy_limit) {
                return "global".to_string();
            }
            let i = proxy
                .route_limits
                .iter()
                .position(|r| std::ptr::eq(&r.limiter, chosen))
                .expect("one of the entries");
            format!("entry {i}")
        };
        assert_eq!(which("/a/b/c", "s"), "entry 1");
        assert_eq!(which("/a/bc", "s"), "entry 0");
        assert_eq!(which("/z", "s"), "entry 2");
        assert_eq!(which("/z", "t"), "global");
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
