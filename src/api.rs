//! The HTTP API of API.md section 2 (the parts that exist so far): routing and handlers.
//!
//! Owns the mapping from method and path to a handler, request validation (names, JSON,
//! query parameters) and the JSON bodies of replies. Handlers reach the bus only through the
//! shard's service methods. Must never: panic on input, block, or answer an error without the
//! JSON error body.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::Principal;
use crate::bus::event::{ByteString, Draft, Drafts};
use crate::bus::{ChannelQuery, Published};
use crate::cursor::Cursor;
use crate::envelope;
use crate::glob::GlobSet;
use crate::http::codec::{Method, RequestHead};
use crate::http::Response;
use crate::metrics::{self, ErrorKind, ProcessInfo, ShardStats, Transport};
use crate::names;
use crate::query::{percent_decode, query_pairs};
use crate::shard::{
    unix_ms, BusError, ConnCtl, PublishOutcome, PublishOutcomes, PublishTicket, Shard,
};

/// What a request turns into.
pub enum Reply {
    Response(Response),
    /// The connection becomes an SSE stream.
    Stream(crate::sse::StreamRequest),
    /// The connection becomes a WebSocket.
    WebSocket(crate::ws::WsRequest),
    /// A publish on its way to other shards: the connection may go on to the requests behind
    /// it and writes this one's response, in its place, once [`Publishing::poll_response`] gives it.
    Publishing(Publishing),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Response(r)
    }
}

const PREFIX: &str = "/api/v1/relay";
const EVENTS_PATH: &str = "/api/v1/relay/events";

/// Routes one request.
pub async fn dispatch(
    shard: &Rc<Shard>,
    ctl: &Rc<ConnCtl>,
    head: &RequestHead,
    body: Bytes,
) -> Reply {
    counted(shard, route(shard, ctl, head, body).await)
}

/// A publish (`POST /api/v1/relay/events`), answered without a future: every publish over
/// HTTP comes here, and the connection then boxes no [`dispatch`] future for it. Any other
/// request gets its body back, for [`dispatch`].
pub fn dispatch_publish(
    shard: &Rc<Shard>,
    ctl: &ConnCtl,
    head: &RequestHead,
    body: Bytes,
) -> Result<Reply, Bytes> {
    if head.method != Method::Post || head.path() != EVENTS_PATH {
        return Err(body);
    }
    // As `route` does for every admin path.
    let reply = match api_key(shard, head) {
        Err(response) => response.into(),
        Ok(()) => publish(shard, ctl, head, body),
    };
    Ok(counted(shard, reply))
}

/// Counts an error answer in its metric.
fn counted(shard: &Shard, reply: Reply) -> Reply {
    if let Reply::Response(response) = &reply {
        match response.status {
            400 => shard.stats.error(ErrorKind::BadRequest),
            404 => shard.stats.error(ErrorKind::NotFound),
            405 => shard.stats.error(ErrorKind::MethodNotAllowed),
            413 => shard.stats.error(ErrorKind::BodyTooLarge),
            500 => shard.stats.error(ErrorKind::Internal),
            _ => {}
        }
    }
    reply
}

/// Whether `path` belongs to relay itself (its probes, metrics and `/api/v1/relay` on whole
/// segments) rather than to a subsystem route.
pub fn is_own_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
        || path
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

async fn route(shard: &Rc<Shard>, ctl: &ConnCtl, head: &RequestHead, body: Bytes) -> Reply {
    let path = head.path();
    let read = matches!(head.method, Method::Get | Method::Head);
    let allow = |methods: &str| -> Reply {
        Response::error(
            405,
            "method_not_allowed",
            &format!(
                "{} is not allowed on {path}; allowed: {methods}",
                head.method.as_str()
            ),
        )
        .with_header("Allow", methods)
        .into()
    };
    match path {
        "/healthz" => {
            return if read {
                healthz().into()
            } else {
                allow("GET, HEAD")
            }
        }
        "/readyz" => {
            return if read {
                readyz(shard).into()
            } else {
                allow("GET, HEAD")
            }
        }
        "/metrics" => {
            return if read {
                metrics(shard).into()
            } else {
                allow("GET, HEAD")
            }
        }
        _ => {}
    }
    // Relay's namespace is matched on whole segments, like routes: `/api/v1/relayx` is not it.
    let own = path
        .strip_prefix(PREFIX)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'));
    let Some(rest) = own else {
        // Not relay's own. Paths under a registered route never get here: the connection
        // hands them to the proxy before their body is read (`http::conn`).
        return not_found(path).into();
    };
    let admin = rest == "/events"
        || rest == "/connections"
        || rest.starts_with("/channels")
        || rest.starts_with("/subsystems");
    if admin {
        if let Err(response) = api_key(shard, head) {
            return response.into();
        }
    }
    match rest {
        "/ws" => websocket(shard, head),
        "/subsystems" => match head.method {
            Method::Get | Method::Head => crate::registry::api::list(shard, None).into(),
            Method::Post => crate::registry::api::register(shard, &body).await.into(),
            _ => allow("GET, HEAD, POST"),
        },
        _ if rest.starts_with("/subsystems/") => {
            // Boxed: deregistering waits on a monoio timer, whose 128-byte alignment would
            // otherwise pass to this future, which the connection boxes for every request.
            Box::pin(crate::registry::api::route(
                shard,
                head,
                &rest["/subsystems/".len()..],
            ))
            .await
            .into()
        }
        "/health" => {
            if read {
                health(shard).into()
            } else {
                allow("GET, HEAD")
            }
        }
        "/metrics" => {
            if read {
                metrics(shard).into()
            } else {
                allow("GET, HEAD")
            }
        }
        "/events" => match head.method {
            Method::Post => publish(shard, ctl, head, body),
            _ => allow("POST"),
        },
        "/events/stream" => match head.method {
            Method::Get => stream(shard, head),
            // The head a GET would get, without opening a stream.
            Method::Head => match crate::sse::parse_request(shard.config(), head) {
                Ok(_) => Response {
                    status: 200,
                    content_type: "text/event-stream",
                    body: Vec::new(),
                    headers: vec![("Cache-Control".into(), "no-cache".into())],
                }
                .into(),
                Err(message) => bad_request(&message).into(),
            },
            _ => allow("GET, HEAD"),
        },
        "/channels" => {
            if read {
                channels(shard, head.query()).await.into()
            } else {
                allow("GET, HEAD")
            }
        }
        "/connections" => {
            if read {
                connections(shard).into()
            } else {
                allow("GET, HEAD")
            }
        }
        _ if rest.starts_with("/channels/") && rest.ends_with("/presence") => {
            let raw = &rest["/channels/".len()..rest.len() - "/presence".len()];
            if read {
                presence(shard, raw).await.into()
            } else {
                allow("GET, HEAD")
            }
        }
        _ => match rest
            .strip_prefix("/channels/")
            .and_then(|r| r.strip_suffix("/history"))
        {
            Some(channel) if read => history(shard, channel, head.query()).await.into(),
            Some(_) => allow("GET, HEAD"),
            None => not_found(path).into(),
        },
    }
}

/// The JWT principal of a WebSocket/SSE request (`Authorization: Bearer` or `?token=`).
fn principal(shard: &Shard, head: &RequestHead) -> Result<Principal, Response> {
    let auth = &shard.shared.auth;
    if !auth.jwt_required() {
        return Ok(Principal::open());
    }
    let mut token_param = None;
    for (key, value) in query_pairs(head.query().unwrap_or("")).flatten() {
        if key == "token" {
            token_param = Some(value);
        }
    }
    let bearer = crate::auth::bearer(head.header_str("authorization"));
    auth.principal(bearer, token_param.as_deref(), unix_ms() / 1000)
        .map_err(|e| {
            shard.stats.auth_failures.inc();
            Response::error(e.status(), e.code(), &e.message())
                .with_header("WWW-Authenticate", "Bearer")
        })
}

/// The API key the publish and admin endpoints need when `auth.api_keys` is set.
fn api_key(shard: &Shard, head: &RequestHead) -> Result<(), Response> {
    shard
        .shared
        .auth
        .check_api_key(head.header_str("authorization"))
        .map_err(|e| {
            shard.stats.auth_failures.inc();
            Response::error(e.status(), e.code(), &e.message())
                .with_header("WWW-Authenticate", "Bearer")
        })
}

fn websocket(shard: &Rc<Shard>, head: &RequestHead) -> Reply {
    let accept = match crate::ws::codec::accept_key(head) {
        Ok(a) => a,
        Err(e) => {
            let mut response = Response::error(e.status(), e.code(), &e.message());
            for (name, value) in e.response_headers() {
                response = response.with_header(name, *value);
            }
            return response.into();
        }
    };
    match principal(shard, head) {
        Ok(principal) => Reply::WebSocket(crate::ws::WsRequest { accept, principal }),
        Err(response) => response.into(),
    }
}

fn not_found(path: &str) -> Response {
    Response::error(404, "not_found", &format!("no such endpoint: {path}"))
}

fn bad_request(message: &str) -> Response {
    Response::error(400, "bad_request", message)
}

fn bus_error(shard: &Shard, e: BusError) -> Response {
    match e {
        BusError::Congested { .. } => {
            shard.stats.error(ErrorKind::RingFull);
            Response::error(503, "overloaded", &e.to_string()).with_header("Retry-After", "1")
        }
        BusError::Unavailable => Response::error(503, "shutting_down", &e.to_string()),
    }
}

// ----- liveness, readiness, health, metrics -----

fn healthz() -> Response {
    Response::json(200, br#"{"status":"ok"}"#.to_vec())
}

fn readyz(shard: &Shard) -> Response {
    let shared = &shard.shared;
    if shared.is_draining() {
        return Response::error(503, "not_ready", "the relay is draining");
    }
    let serving = shared.serving.load(Ordering::Acquire);
    if serving < shared.shards {
        return Response::error(
            503,
            "not_ready",
            &format!("{serving} of {} shards are serving", shared.shards),
        );
    }
    Response::json(200, br#"{"status":"ready"}"#.to_vec())
}

/// A shard whose maintenance tick (every 250 ms) is this late is stalled.
const STALL_DEGRADED_MS: u64 = 1_000;
const STALL_UNHEALTHY_MS: u64 = 5_000;

fn health(shard: &Shard) -> Response {
    let shared = &shard.shared;
    let now_ms = shared.now_ms();
    let mut worst_age = 0;
    let mut shards_json = String::from("[");
    for (i, stats) in shared.stats.iter().enumerate() {
        let beat = stats.loop_heartbeat_ms.load(Ordering::Relaxed);
        let age = now_ms.saturating_sub(beat);
        worst_age = worst_age.max(age);
        let active: i64 = stats.connections_active.iter().map(|g| g.get()).sum();
        if i > 0 {
            shards_json.push(',');
        }
        let _ = write!(
            shards_json,
            r#"{{"shard":{i},"heartbeat_age_ms":{age},"connections":{active}}}"#
        );
    }
    shards_json.push(']');
    let serving = shared.serving.load(Ordering::Acquire);
    // A subsystem is "ok" with every instance ready, "degraded" with some, "unhealthy" with none.
    let table = shared.table.load_full();
    let mut subsystems = String::from("{");
    let mut subsystem_down = false;
    for (i, sub) in table.subsystems.iter().enumerate() {
        let ready = sub
            .instances
            .iter()
            .filter(|x| x.lifecycle == crate::registry::Lifecycle::Ready)
            .count();
        let state = match ready {
            0 => "unhealthy",
            n if n < sub.instances.len() => "degraded",
            _ => "ok",
        };
        subsystem_down |= ready == 0;
        if i > 0 {
            subsystems.push(',');
        }
        let _ = write!(subsystems, r#""{}":"{state}""#, sub.name);
    }
    subsystems.push('}');
    let (status, code) = if serving < shared.shards || worst_age > STALL_UNHEALTHY_MS {
        ("unhealthy", 503)
    } else if shared.is_draining() || worst_age > STALL_DEGRADED_MS || subsystem_down {
        ("degraded", 200)
    } else {
        ("ok", 200)
    };
    let body = format!(
        r#"{{"status":"{status}","uptime_s":{},"shards":{},"connections":{},"draining":{},"driver":"{}","shard_status":{shards_json},"subsystems":{subsystems}}}"#,
        shared.uptime().as_secs(),
        shared.shards,
        shared.connections.load(Ordering::Relaxed),
        shared.is_draining(),
        shared.driver.get().copied().unwrap_or("unknown"),
    );
    Response::json(code, body.into_bytes())
}

fn metrics(shard: &Shard) -> Response {
    let shared = &shard.shared;
    let stats: Vec<&ShardStats> = shared.stats.iter().map(|s| s.as_ref()).collect();
    let info = ProcessInfo {
        uptime_s: shared.uptime().as_secs_f64(),
        shards: shared.shards,
        draining: shared.is_draining(),
        version: env!("CARGO_PKG_VERSION"),
        driver: shared.driver.get().copied().unwrap_or("unknown"),
        max_connections: shard.config().limits.max_connections as u64,
        shard_sched: stats.iter().map(|s| s.thread.read()).collect(),
    };
    let mut text = String::with_capacity(8192);
    metrics::render_prometheus(&mut text, &stats, &info);
    crate::registry::render_metrics(&mut text, &shared.table.load());
    Response {
        status: 200,
        content_type: metrics::CONTENT_TYPE,
        body: text.into_bytes(),
        headers: Vec::new(),
    }
}

fn connections(shard: &Shard) -> Response {
    let shared = &shard.shared;
    let mut totals = [0i64; Transport::COUNT];
    let mut opened = [0u64; Transport::COUNT];
    let mut refused = 0;
    let mut per_shard = String::from("[");
    for (i, stats) in shared.stats.iter().enumerate() {
        if i > 0 {
            per_shard.push(',');
        }
        let _ = write!(per_shard, r#"{{"shard":{i},"active":{{"#);
        for t in Transport::ALL {
            let active = stats.connections_active[t as usize].get();
            totals[t as usize] += active;
            opened[t as usize] += stats.connections_total[t as usize].get();
            let comma = if t as usize > 0 { "," } else { "" };
            let _ = write!(per_shard, r#"{comma}"{}":{active}"#, t.as_str());
        }
        let _ = write!(
            per_shard,
            r#"}},"subscriptions":{}}}"#,
            stats.subscriptions.get()
        );
        refused += stats.connections_refused.get();
    }
    per_shard.push(']');
    let by_transport = |values: &[i64]| {
        Transport::ALL
            .iter()
            .map(|t| format!(r#""{}":{}"#, t.as_str(), values[*t as usize]))
            .collect::<Vec<_>>()
            .join(",")
    };
    let opened_i: Vec<i64> = opened.iter().map(|&v| v as i64).collect();
    let sum = |f: &dyn Fn(&ShardStats) -> u64| shared.stats.iter().map(|s| f(s)).sum::<u64>();
    let users: i64 = shared.stats.iter().map(|s| s.users_connected.get()).sum();
    let closes = crate::metrics::WS_CLOSE_CODES
        .iter()
        .map(|c| c.to_string())
        .chain(std::iter::once("other".to_string()))
        .enumerate()
        .map(|(slot, code)| format!(r#""{code}":{}"#, sum(&|s| s.ws_closes[slot].get())))
        .collect::<Vec<_>>()
        .join(",");
    let body = format!(
        r#"{{"active":{},"by_transport":{{{}}},"opened_total":{{{}}},"refused_total":{refused},"refused_per_ip_total":{},"users_connected":{users},"slow_consumer_drops_total":{},"ws_closes_total":{{{closes}}},"max_connections":{},"max_connections_per_ip":{},"shards":{per_shard}}}"#,
        totals.iter().sum::<i64>(),
        by_transport(&totals),
        by_transport(&opened_i),
        sum(&|s| s.connections_refused_per_ip.get()),
        sum(&|s| s.slow_consumer_drops.get()),
        shard.config().limits.max_connections,
        shard.config().limits.max_connections_per_ip,
    );
    Response::json(200, body.into_bytes())
}

// ----- publish -----

/// One event as a publisher sends it: an envelope without `seq`, `epoch` or `ts`. Public for
/// the fuzz target that checks the fast path (`envelope`) against it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftIn<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    correlation_id: Option<Cow<'a, str>>,
}

/// Free-text envelope fields are bounded so one event cannot carry unbounded metadata.
const FREE_TEXT_MAX: usize = 256;

/// Parses a publish body (one envelope or an array of them) into drafts.
pub fn parse_drafts(body: &Bytes) -> Result<Drafts, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err("the body is empty; send an event object or an array of them".into());
    }
    if trimmed.starts_with('[') {
        // The plain form in one pass of our own (`envelope`), else one pass of serde_json for
        // the common, valid batch; only a bad one is parsed again, element by element, to name
        // the element that is wrong.
        if let Some(items) = envelope::scan_batch(text) {
            if let Ok(drafts) = items.into_iter().map(|f| make_draft(body, f)).collect() {
                return Ok(drafts);
            }
        } else if let Ok(items) = serde_json::from_str::<Vec<DraftIn>>(text) {
            if items.is_empty() {
                return Err("the batch is empty".into());
            }
            if let Ok(drafts) = items.iter().map(|d| make_draft(body, d.fields())).collect() {
                return Ok(drafts);
            }
        }
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, raw)| draft_from(body, raw.get()).map_err(|e| format!("event {i}: {e}")))
            .collect()
    } else {
        // serde_json reads the same fields wherever `scan_one` reads them, so a refusal of
        // its fields by `make_draft` is the answer either way.
        match envelope::scan_one(text) {
            Some(fields) => Ok(smallvec::smallvec![make_draft(body, fields)?]),
            None => Ok(smallvec::smallvec![draft_from(body, text)?]),
        }
    }
}

fn draft_from(body: &Bytes, text: &str) -> Result<Draft, String> {
    let input: DraftIn = serde_json::from_str(text).map_err(|e| e.to_string())?;
    make_draft(body, input.fields())
}

impl<'a> DraftIn<'a> {
    /// The fields as the fast path (`envelope`) reads them, so both readings make drafts, and
    /// are compared, as one type.
    pub fn fields(&'a self) -> envelope::Fields<'a> {
        envelope::Fields {
            channel: &self.channel,
            event_type: &self.event_type,
            id: self.id.as_deref(),
            data: self.data.get(),
            source: self.source.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
        }
    }
}

/// Validates one event's fields (HTTP and WebSocket publishes alike); `data` is raw JSON
/// borrowed from `body`, which becomes a zero-copy slice of it.
pub fn make_draft(body: &Bytes, fields: envelope::Fields) -> Result<Draft, String> {
    let envelope::Fields {
        channel,
        event_type,
        id,
        data,
        source,
        correlation_id,
    } = fields;
    names::validate_channel(channel).map_err(|e| e.to_string())?;
    names::validate_type(event_type).map_err(|e| e.to_string())?;
    if let Some(id) = id {
        names::validate_event_id(id).map_err(|e| e.to_string())?;
    }
    for (what, value) in [("source", source), ("correlation_id", correlation_id)] {
        if let Some(v) = value {
            if v.len() > FREE_TEXT_MAX {
                return Err(format!("{what} is longer than {FREE_TEXT_MAX} bytes"));
            }
        }
    }
    Ok(Draft {
        channel: text_of(body, channel),
        event_type: text_of(body, event_type),
        id: id.map(Into::into),
        data: slice_of(body, data),
        source: source.map(Into::into),
        correlation_id: correlation_id.map(Into::into),
    })
}

/// `part` borrowed from `body`'s bytes as zero-copy text; a copy if it is not (a JSON string
/// with escapes, which the parser unescaped into a buffer of its own).
fn text_of(body: &Bytes, part: &str) -> ByteString {
    ByteString::try_from(slice_of(body, part)).unwrap_or_else(|_| ByteString::from(part))
}

/// `part` borrowed from `body`'s bytes, as a zero-copy `Bytes`; a copy if it is not.
fn slice_of(body: &Bytes, part: &str) -> Bytes {
    let base = body.as_ptr() as usize;
    let start = part.as_ptr() as usize;
    match start.checked_sub(base) {
        Some(offset) if offset + part.len() <= body.len() => {
            body.slice(offset..offset + part.len())
        }
        _ => Bytes::copy_from_slice(part.as_bytes()),
    }
}

/// Starts a publish: answered at once when this shard owns every channel, otherwise a
/// [`Reply::Publishing`] to answer once the owners have.
fn publish(shard: &Rc<Shard>, ctl: &ConnCtl, head: &RequestHead, body: Bytes) -> Reply {
    let started = std::time::Instant::now();
    let key = || {
        shard
            .proxy
            .client_key(&shard.shared.auth, head, ctl.peer.ip())
    };
    if let Err(response) = shard.proxy.check_publish(key) {
        shard.stats.rate_limited.inc();
        return response.into();
    }
    let drafts = match parse_drafts(&body) {
        Ok(d) => d,
        Err(message) => return bad_request(&message).into(),
    };
    // Kept for the answer of a partly refused batch (the drafts move into the bus). One
    // shard never refuses part of a batch, and a single event is accepted or refused whole,
    // so neither keeps anything.
    let channels: Vec<ByteString> = if shard.shards() > 1 && drafts.len() > 1 {
        drafts.iter().map(|d| d.channel.clone()).collect()
    } else {
        Vec::new()
    };
    let ticket = match shard.publish_start(drafts, started) {
        Ok(ticket) => ticket,
        Err(e) => return bus_error(shard, e).into(),
    };
    match ticket.try_finish() {
        Ok(outcome) => publish_response(shard, outcome, &channels, started).into(),
        Err(ticket) => Reply::Publishing(Publishing {
            ticket,
            channels,
            started,
        }),
    }
}

/// A publish over HTTP whose owner shards have yet to answer.
pub struct Publishing {
    ticket: PublishTicket,
    channels: Vec<ByteString>,
    started: std::time::Instant,
}

impl Publishing {
    /// The response, once every owner has answered (see [`PublishTicket::poll_finish`]: the
    /// connection polls it in place, without a future of its own for the wait).
    pub fn poll_response(&mut self, cx: &mut Context<'_>, shard: &Shard) -> Poll<Response> {
        self.ticket
            .poll_finish(cx)
            .map(|outcome| publish_response(shard, outcome, &self.channels, self.started))
    }
}

fn publish_response(
    shard: &Shard,
    outcome: Result<PublishOutcomes, BusError>,
    channels: &[ByteString],
    started: std::time::Instant,
) -> Response {
    match outcome {
        Ok(outcomes) => {
            shard.stats.publish_duration[Transport::Http as usize].record(started.elapsed());
            if outcomes.iter().all(Result::is_ok) {
                return Response::json(202, publish_results(&outcomes, channels));
            }
            // Part of the batch was accepted before an owner shard refused the rest: 207, so a
            // client retries only the events whose entry carries `error`.
            shard.stats.error(ErrorKind::RingFull);
            Response::json(207, publish_results(&outcomes, channels))
                .with_header("Retry-After", "1")
        }
        Err(e) => bus_error(shard, e),
    }
}

/// The `results` of a batch, in its order. Refused entries (some events of a batch spread
/// over shards) carry `channel` and `error` instead of `seq`, `id` and `duplicate`.
fn publish_results(outcomes: &[PublishOutcome], channels: &[ByteString]) -> Vec<u8> {
    // Sized to the answer, so that it is written without growing.
    let size: usize = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(p) => 72 + p.channel.len() + p.id_bytes().len(),
            Err(_) => 192,
        })
        .sum();
    let mut out = Vec::with_capacity(16 + size);
    out.extend_from_slice(b"{\"results\":[");
    for (i, outcome) in outcomes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match outcome {
            Ok(p) => push_published(&mut out, p),
            Err(e) => {
                let channel = channels.get(i).map_or("", |c| c);
                let entry = serde_json::json!({
                    "channel": channel,
                    "error": {"code": "overloaded", "message": e.to_string()},
                });
                out.extend_from_slice(entry.to_string().as_bytes());
            }
        }
    }
    out.extend_from_slice(b"]}");
    out
}

fn push_published(out: &mut Vec<u8>, p: &Published) {
    out.extend_from_slice(b"{\"channel\":\"");
    out.extend_from_slice(p.channel.as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    crate::http::codec::push_u64(out, p.seq);
    out.extend_from_slice(b",\"id\":\"");
    // Channel names and ids are validated to JSON-safe characters, generated ids are UUIDs.
    out.extend_from_slice(p.id_bytes());
    out.extend_from_slice(if p.duplicate {
        b"\",\"duplicate\":true}"
    } else {
        b"\",\"duplicate\":false}"
    });
}

// ----- channels and history -----

pub const CHANNELS_LIMIT_DEFAULT: usize = 1000;
pub const CHANNELS_LIMIT_MAX: usize = 10_000;

/// `GET /api/v1/relay/channels[?prefix=P][&after=NAME][&limit=N]`: one page of the active
/// channels in name order, `count` of those matching the prefix, and `next` to ask for the
/// page after (null on the last). Paged, because a node may own a million channels: listing
/// them whole held every shard for over a second and answered 91 MB.
async fn channels(shard: &Rc<Shard>, query: Option<&str>) -> Response {
    let mut wanted = ChannelQuery {
        prefix: String::new(),
        after: None,
        limit: CHANNELS_LIMIT_DEFAULT,
    };
    for pair in query_pairs(query.unwrap_or("")) {
        let (key, value) = match pair {
            Ok(p) => p,
            Err(e) => return bad_request(&format!("query: {e}")),
        };
        match key.as_str() {
            "prefix" | "after" if value.len() > names::CHANNEL_MAX => {
                return bad_request(&format!(
                    "{key} is longer than a channel name may be ({} bytes)",
                    names::CHANNEL_MAX
                ))
            }
            "prefix" => wanted.prefix = value,
            "after" => wanted.after = Some(value),
            "limit" => match page_limit(&value, CHANNELS_LIMIT_MAX) {
                Ok(v) => wanted.limit = v,
                Err(response) => return response,
            },
            _ => return unknown_parameter(&key, "prefix, after, limit"),
        }
    }
    let limit = wanted.limit;
    // One row more than the page from each shard: if the merged rows pass the page, there is
    // a next page (the page's rows and the one after are each among their shard's first).
    wanted.limit += 1;
    let parts = match shard.channels(&wanted).await {
        Ok(p) => p,
        Err(e) => return bus_error(shard, e),
    };
    let count: usize = parts.iter().map(|p| p.matching).sum();
    let mut rows: Vec<_> = parts.into_iter().flat_map(|p| p.rows).collect();
    rows.sort_unstable_by(|a, b| a.channel.cmp(&b.channel));
    let more = rows.len() > limit;
    rows.truncate(limit);
    let mut out = Vec::with_capacity(64 + rows.len() * 96);
    out.extend_from_slice(b"{\"channels\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write_bytes(
            &mut out,
            format_args!(
                r#"{{"channel":"{}","epoch":"{}","seq":{},"subscribers":{},"history":{}}}"#,
                row.channel, row.epoch, row.seq, row.subscribers, row.history
            ),
        );
    }
    let _ = write_bytes(&mut out, format_args!(r#"],"count":{count},"next":"#));
    match rows.last().filter(|_| more) {
        Some(last) => {
            let _ = write_bytes(&mut out, format_args!(r#""{}"}}"#, last.channel));
        }
        None => out.extend_from_slice(b"null}"),
    }
    Response::json(200, out)
}

/// A page's `limit` parameter: 1 to `max`, else 400 saying so.
fn page_limit(value: &str, max: usize) -> Result<usize, Response> {
    match value.parse::<usize>() {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(bad_request(&format!(
            "limit must be an integer from 1 to {max}, not {value:?}"
        ))),
    }
}

fn unknown_parameter(key: &str, expected: &str) -> Response {
    bad_request(&format!(
        "unknown query parameter {key:?} (expected {expected})"
    ))
}

fn write_bytes(out: &mut Vec<u8>, args: std::fmt::Arguments) -> std::io::Result<()> {
    std::io::Write::write_fmt(out, args)
}

pub const HISTORY_LIMIT_DEFAULT: usize = 100;
pub const HISTORY_LIMIT_MAX: usize = 1000;

async fn history(shard: &Rc<Shard>, raw_channel: &str, query: Option<&str>) -> Response {
    let channel = match percent_decode(raw_channel) {
        Ok(c) => c,
        Err(e) => return bad_request(&format!("channel in path: {e}")),
    };
    if let Err(e) = names::validate_channel(&channel) {
        return bad_request(&e.to_string());
    }
    let mut since = 0u64;
    let mut limit = HISTORY_LIMIT_DEFAULT;
    for pair in query_pairs(query.unwrap_or("")) {
        let (key, value) = match pair {
            Ok(p) => p,
            Err(e) => return bad_request(&format!("query: {e}")),
        };
        match key.as_str() {
            "since" => match value.parse() {
                Ok(v) => since = v,
                Err(_) => {
                    return bad_request(&format!(
                        "since must be a non-negative integer, not {value:?}"
                    ))
                }
            },
            "limit" => match page_limit(&value, HISTORY_LIMIT_MAX) {
                Ok(v) => limit = v,
                Err(response) => return response,
            },
            _ => return unknown_parameter(&key, "since, limit"),
        }
    }
    let page = match shard
        .history(Arc::from(channel.as_str()), since, limit)
        .await
    {
        Ok(Some(page)) => page,
        Ok(None) => {
            return Response::error(
                404,
                "not_found",
                &format!("channel {channel} has no history (no events retained, no subscribers)"),
            )
        }
        Err(e) => return bus_error(shard, e),
    };
    let mut out = Vec::with_capacity(
        64 + page
            .events
            .iter()
            .map(|e| e.envelope_len() + 1)
            .sum::<usize>(),
    );
    let _ = write_bytes(
        &mut out,
        format_args!(
            r#"{{"channel":"{}","epoch":"{}","seq":{},"events":["#,
            channel, page.epoch, page.seq
        ),
    );
    for (i, event) in page.events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        event.write_envelope(&mut out);
    }
    out.extend_from_slice(b"]}");
    Response::json(200, out)
}

// ----- SSE -----

fn stream(shard: &Rc<Shard>, head: &RequestHead) -> Reply {
    let principal = match principal(shard, head) {
        Ok(p) => p,
        Err(response) => return response.into(),
    };
    let mut request = match crate::sse::parse_request(shard.config(), head) {
        Ok(request) => request,
        Err(message) => return bad_request(&message).into(),
    };
    if let Some(channel) = request
        .channels
        .iter()
        .find(|c| !principal.may_subscribe(c))
    {
        shard.stats.auth_failures.inc();
        return Response::error(
            403,
            "forbidden",
            &format!("your token does not allow subscribing to {channel}"),
        )
        .into();
    }
    request.expires_at_s = principal.expires_at_s;
    Reply::Stream(request)
}

async fn presence(shard: &Rc<Shard>, raw_channel: &str) -> Response {
    let channel = match percent_decode(raw_channel) {
        Ok(c) => c,
        Err(e) => return bad_request(&format!("channel in path: {e}")),
    };
    if let Err(e) = names::validate_channel(&channel) {
        return bad_request(&e.to_string());
    }
    match shard.presence(Arc::from(channel.as_str())).await {
        Ok(Some(members)) => {
            Response::json(200, crate::ws::protocol::presence_json(&channel, &members))
        }
        Ok(None) => Response::error(
            404,
            "not_found",
            &format!("presence is turned off for {channel} by a [[channels]] rule"),
        ),
        Err(e) => bus_error(shard, e),
    }
}

/// Re-exported for the SSE parser, which shares these.
pub fn parse_cursor(text: &str) -> Result<Cursor, String> {
    Cursor::decode(text).map_err(|e| format!("Last-Event-ID: {e}"))
}

pub fn parse_types(values: &[String]) -> Option<GlobSet> {
    let patterns: Vec<String> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    if patterns.is_empty() {
        None
    } else {
        Some(GlobSet::new(patterns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_fast_path_reads_only_what_serde_reads_the_same() {
        use envelope::generated::{tally, EnvelopeGen};
        let mut gen = EnvelopeGen::new(0x5eed_1234_abcd_0001);
        let (fast_hits, serde_only) = tally(&mut gen, 40_000, EnvelopeGen::envelope, |text| {
            let slow = serde_json::from_str::<DraftIn>(text);
            let fast = envelope::scan_one(text);
            if let (Some(fast), Ok(slow)) = (&fast, &slow) {
                assert_eq!(*fast, slow.fields(), "{text}");
            }
            (fast.is_some(), slow.map(drop).map_err(|e| e.to_string()))
        });
        // Both sides of the fence are exercised: many plain envelopes, and forms left to serde.
        assert!(fast_hits > 4_000, "fast path taken {fast_hits} times");
        assert!(serde_only > 1_000, "serde-only forms {serde_only}");

        let batch = |gen: &mut EnvelopeGen| {
            let items: Vec<String> = (0..1 + gen.below(3)).map(|_| gen.envelope()).collect();
            format!("[{}]", items.join(","))
        };
        let (batches_read, _) = tally(&mut gen, 5_000, batch, |text| {
            let slow = serde_json::from_str::<Vec<DraftIn>>(text);
            let fast = envelope::scan_batch(text);
            if let (Some(fast), Ok(slow)) = (&fast, &slow) {
                let slow: Vec<_> = slow.iter().map(DraftIn::fields).collect();
                assert_eq!(*fast, slow, "{text}");
            }
            (fast.is_some(), slow.map(drop).map_err(|e| e.to_string()))
        });
        assert!(
            batches_read > 300,
            "batches read on the fast path: {batches_read}"
        );
    }

    #[test]
    fn single_and_batch_drafts_keep_data_bytes() {
        let body = Bytes::from_static(br#"{"channel":"doc.1","type":"t","data":{"a" : [1, 2]}}"#);
        let drafts = parse_drafts(&body).unwrap();
        assert_eq!(drafts.len(), 1);
        assert!(
            !drafts.spilled(),
            "one draft is held inline, without a vector"
        );
        assert_eq!(&drafts[0].data[..], br#"{"a" : [1, 2]}"#);
        let body = Bytes::from_static(
            br#" [{"channel":"a","type":"t","data":1,"id":"x-1"},{"channel":"b","type":"u","data":"s","source":"sift"}]"#,
        );
        let drafts = parse_drafts(&body).unwrap();
        assert_eq!(drafts.len(), 2);
        assert_eq!(drafts[0].id.as_deref(), Some("x-1"));
        assert_eq!(&drafts[1].data[..], br#""s""#);
        assert_eq!(drafts[1].source.as_deref(), Some("sift"));
    }

    #[test]
    fn channel_and_type_are_the_bodys_bytes_unless_escaped() {
        let body = Bytes::from(br#"{"channel":"doc.1","type":"doc\u002eedit","data":1}"#.to_vec());
        let drafts = parse_drafts(&body).unwrap();
        let within = |text: &str| {
            let at = text.as_ptr() as usize;
            let base = body.as_ptr() as usize;
            at >= base && at + text.len() <= base + body.len()
        };
        assert_eq!(&*drafts[0].channel, "doc.1");
        assert!(within(&drafts[0].channel), "no copy of a plain name");
        // An escaped string was unescaped by the parser into its own buffer: copied.
        assert_eq!(&*drafts[0].event_type, "doc.edit");
        assert!(!within(&drafts[0].event_type));
    }

    #[test]
    fn bad_drafts_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"[]", "batch is empty"),
            (b"{", "EOF"),
            (br#"{"channel":"a b","type":"t","data":1}"#, "channel"),
            (br#"{"channel":"a","type":"t/x","data":1}"#, "type"),
            (br#"{"channel":"a","type":"t"}"#, "missing field `data`"),
            (
                br#"{"channel":"a","type":"t","data":1,"seq":3}"#,
                "unknown field `seq`",
            ),
            (
                br#"[{"channel":"a","type":"t","data":1},{"channel":"","type":"t","data":1}]"#,
                "event 1",
            ),
            (
                br#"{"channel":"a","type":"t","data":1,"id":"has space"}"#,
                "id",
            ),
            (b"\xff", "UTF-8"),
        ];
        for (body, needle) in cases {
            let err = parse_drafts(&Bytes::copy_from_slice(body)).unwrap_err();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn publish_results_are_json() {
        let results = vec![Ok(Published::duplicate(Arc::from("c"), 3, "i".into()))];
        let v: serde_json::Value = serde_json::from_slice(&publish_results(&results, &[])).unwrap();
        assert_eq!(v["results"][0]["seq"], 3);
        assert_eq!(v["results"][0]["duplicate"], true);
        assert_eq!(v["results"][0]["id"], "i");
    }

    #[test]
    fn a_partly_refused_batch_names_each_refused_channel() {
        let results = vec![
            Ok(Published::duplicate(Arc::from("a"), 3, "i".into())),
            Err(BusError::Congested { shard: 1 }),
        ];
        let channels = [ByteString::from("a"), ByteString::from("b")];
        let v: serde_json::Value =
            serde_json::from_slice(&publish_results(&results, &channels)).unwrap();
        assert_eq!(v["results"][0]["seq"], 3);
        assert_eq!(v["results"][1]["channel"], "b");
        assert_eq!(v["results"][1]["error"]["code"], "overloaded");
        assert!(v["results"][1].get("seq").is_none(), "{v}");
    }
}
