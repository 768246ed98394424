//! Black-box tests of the subsystem registry and the HTTP router (API.md sections 2, 5, 6 and
//! 10 "Health checks and circuits"): registration and its validation, static instances,
//! routing, header propagation, balancing, retries, 502/503/504, circuit breakers, health
//! checks, heartbeat TTLs, draining deregistration, rate limits and API keys. Subsystems are
//! fake upstreams (tests/common/upstream.rs) on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::upstream::{refused_url, Behaviour, Upstream};
use common::ws::WsClient;
use common::*;
use serde_json::{json, Value};

both_drivers!(
    register_and_list,
    static_instances_from_the_config_file,
    malformed_registrations_are_refused,
    requests_reach_the_right_upstream,
    relay_endpoints_are_never_proxied,
    relay_namespace_is_matched_on_whole_segments,
    request_headers_are_propagated,
    round_robin_splits_evenly_on_one_connection,
    weighted_balancing_follows_the_weights,
    least_outstanding_avoids_the_busy_instance,
    idempotent_requests_fail_over,
    post_is_retried_only_when_it_never_reached_an_upstream,
    bad_gateway_when_every_instance_refuses,
    gateway_timeout_when_the_upstream_hangs,
    circuit_opens_rejects_and_closes_after_the_cooldown,
    circuit_opens_on_a_failure_rate,
    circuit_reset_closes_at_once,
    upstream_metrics_are_exported,
    concurrent_requests_keep_their_upstream_connections,
    health_checks_take_instances_out_and_back,
    health_endpoint_degrades_without_a_healthy_instance,
    heartbeat_ttl_removes_silent_instances,
    deregistration_drains_in_flight_requests_first,
    rate_limits_answer_429,
    route_limits_and_trusted_proxies,
    api_keys_guard_the_registry_but_not_routes,
);

const SUBSYSTEMS: &str = "/api/v1/relay/subsystems";
/// Bound of every poll for an eventual state.
const EVENTUALLY: Duration = Duration::from_secs(10);
const SYSTEM_STREAM: &str = "/api/v1/relay/events/stream?channel=relay.system";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A registration body.
fn reg(name: &str, instance: &str, url: &str, routes: &[&str]) -> Value {
    json!({"name": name, "instance": instance, "url": url, "routes": routes})
}

/// `reg` plus the fields of `extra` (an object).
fn reg_with(name: &str, instance: &str, url: &str, routes: &[&str], extra: Value) -> Value {
    let mut v = reg(name, instance, url, routes);
    for (k, x) in extra.as_object().expect("extra fields are an object") {
        v[k] = x.clone();
    }
    v
}

fn register_raw(addr: std::net::SocketAddr, body: &[u8], auth: &[(&str, &str)]) -> HttpResponse {
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend_from_slice(auth);
    request(addr, "POST", SUBSYSTEMS, &headers, body)
}

/// Registers `body` and asserts 201; returns the reply.
fn register(addr: std::net::SocketAddr, body: &Value) -> Value {
    let r = register_raw(addr, body.to_string().as_bytes(), &[]);
    assert_eq!(r.status, 201, "register {body}: expected 201, got {r}");
    json(&r)
}

fn listing_with(addr: std::net::SocketAddr, auth: &[(&str, &str)]) -> Value {
    let r = request(addr, "GET", SUBSYSTEMS, auth, b"");
    assert_eq!(r.status, 200, "GET {SUBSYSTEMS}: {r}");
    json(&r)
}

fn listing(addr: std::net::SocketAddr) -> Value {
    listing_with(addr, &[])
}

fn subsystem<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["subsystems"]
        .as_array()
        .unwrap_or_else(|| panic!("listing without a subsystems array: {list}"))
        .iter()
        .find(|s| s["name"] == name)
}

fn instance<'a>(list: &'a Value, name: &str, id: &str) -> Option<&'a Value> {
    subsystem(list, name)?["instances"]
        .as_array()?
        .iter()
        .find(|i| i["instance"] == id)
}

/// Polls the listing (at most EVENTUALLY) until `pred` holds; returns that listing.
fn wait_listing(addr: std::net::SocketAddr, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let list = listing(addr);
        if pred(&list) {
            return list;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not reached within {EVENTUALLY:?}; last listing: {list}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Polls until instance `name/id` has `status` in the listing.
fn wait_status(addr: std::net::SocketAddr, name: &str, id: &str, status: &str) -> Value {
    wait_listing(
        addr,
        &format!("instance {name}/{id} status {status:?}"),
        |l| instance(l, name, id).is_some_and(|i| i["status"] == status),
    )
}

/// Which instance answered a proxied request (`X-Relay-Instance`), falling back to the fake
/// upstream's own `X-Upstream` header.
fn answered_by(r: &HttpResponse) -> String {
    r.header("x-relay-instance")
        .or(r.header("x-upstream"))
        .unwrap_or("?")
        .to_string()
}

fn retry_after(r: &HttpResponse, what: &str) -> u64 {
    let v = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: expected a Retry-After header, got {r}"));
    let n: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After {v:?} is not whole seconds: {r}"));
    assert!(
        n >= 1,
        "{what}: Retry-After should be at least 1 s, got {n}"
    );
    n
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits a W3C traceparent; fails the test unless it is `00-32hex-16hex-2hex`.
fn traceparent_parts(tp: &str, what: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert!(
        p.len() == 4
            && p[0] == "00"
            && is_hex(p[1], 32)
            && is_hex(p[2], 16)
            && is_hex(p[3], 2)
            && p[1] != "0".repeat(32)
            && p[2] != "0".repeat(16),
        "{what}: traceparent {tp:?} is not 00-<32 hex>-<16 hex>-<2 hex> with non-zero ids"
    );
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

/// Reads relay.system events from an SSE stream until one satisfies `pred` (at most
/// EVENTUALLY); returns its envelope.
fn sse_system_event(s: &mut SseStream, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + EVENTUALLY;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match s.next_event(left) {
            Some(ev) => {
                let v = ev.json();
                if pred(&v) {
                    return v;
                }
                seen.push(ev.data);
            }
            None => panic!(
                "{what}: no such relay.system event within {EVENTUALLY:?} (eof={}); saw: {seen:?}",
                s.eof
            ),
        }
    }
}

/// Like `sse_system_event`, over WebSocket.
fn ws_system_event(ws: &mut WsClient, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + EVENTUALLY;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws.try_next_json(left) {
            Ok(v) => {
                if v["op"] == "event" && pred(&v) {
                    return v;
                }
                seen.push(v.to_string());
            }
            Err(e) => panic!(
                "{what}: no such relay.system event within {EVENTUALLY:?} ({e}); saw: {seen:?}"
            ),
        }
    }
}

/// Whether envelope `v` is the registry change `ty` of `subsystem/instance`.
fn is_change(v: &Value, ty: &str, subsystem: &str, instance: &str) -> bool {
    v["channel"] == "relay.system"
        && v["type"] == ty
        && v["data"]["subsystem"] == subsystem
        && v["data"]["instance"] == instance
}

/// The parts of a listing that must not change when a registration is refused.
fn projection(list: &Value) -> Value {
    let subsystems: Vec<Value> = list["subsystems"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let instances: Vec<Value> = s["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    json!({
                        "instance": i["instance"], "url": i["url"], "status": i["status"],
                        "weight": i["weight"], "routes": i["routes"], "ttl_ms": i["ttl_ms"],
                        "source": i["source"], "subscriptions": i["subscriptions"],
                    })
                })
                .collect();
            json!({"name": s["name"], "lb": s["lb"], "routes": s["routes"], "instances": instances})
        })
        .collect();
    json!({"version": list["version"], "subsystems": subsystems})
}

/// Counts answers per instance of `n` GETs of `path` on one keep-alive connection (one shard).
fn spread(conn: &mut Conn, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = conn.roundtrip("GET", &format!("{path}/{i}"), &[], b"");
        assert_eq!(r.status, 200, "GET {path}/{i}: expected 200, got {r}");
        *counts.entry(answered_by(&r)).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Registration and listing
// ---------------------------------------------------------------------------------------------

fn register_and_list(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("sift-up", Behaviour::Normal);

    let empty = listing(server.addr);
    assert_eq!(
        empty["subsystems"],
        json!([]),
        "a fresh relay without [[subsystems]] lists none: {empty}"
    );

    let body = reg_with(
        "sift",
        "sift-1",
        &up.url(),
        &["/api/v1/sift"],
        json!({"weight": 2, "health_path": "/health"}),
    );
    let r = register_raw(server.addr, body.to_string().as_bytes(), &[]);
    assert_eq!(r.status, 201, "POST {SUBSYSTEMS}: expected 201, got {r}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "the registration reply is JSON: {r}"
    );
    let reply = json(&r);
    assert_eq!(
        reply["instance"], "sift-1",
        "the reply names the instance: {reply}"
    );
    assert_eq!(
        reply["subsystem"], "sift",
        "the reply names the subsystem: {reply}"
    );

    let list = listing(server.addr);
    let s = subsystem(&list, "sift").unwrap_or_else(|| panic!("sift not listed: {list}"));
    assert_eq!(s["lb"], "round_robin", "default policy: {s}");
    assert_eq!(s["routes"], json!(["/api/v1/sift"]), "routes: {s}");
    let instances = s["instances"].as_array().expect("instances array");
    assert_eq!(instances.len(), 1, "one instance: {s}");
    let i = &instances[0];
    assert_eq!(i["instance"], "sift-1", "{i}");
    assert_eq!(i["url"], up.url(), "{i}");
    assert_eq!(i["status"], "ready", "a new instance is ready: {i}");
    assert_eq!(i["circuit"], "closed", "a new instance's circuit: {i}");
    assert_eq!(i["in_flight"], 0, "nothing in flight yet: {i}");
    assert_eq!(i["requests"], 0, "no requests yet: {i}");
    assert_eq!(i["weight"], 2, "{i}");
    assert_eq!(i["source"], "api", "registered through the API: {i}");

    // One subsystem by name.
    let r = server.get(&format!("{SUBSYSTEMS}/sift"));
    assert_eq!(r.status, 200, "GET {SUBSYSTEMS}/sift: {r}");
    let one = json(&r);
    assert_eq!(one["name"], "sift", "{one}");
    assert_eq!(one["instances"][0]["instance"], "sift-1", "{one}");
    assert_json_error(
        &server.get(&format!("{SUBSYSTEMS}/nope")),
        404,
        "GET an unknown subsystem",
    );

    // A proxied request shows up in the counters.
    let r = server.get("/api/v1/sift/x");
    assert_eq!(r.status, 200, "proxied GET: {r}");
    let list = listing(server.addr);
    let i = instance(&list, "sift", "sift-1").expect("sift-1 listed");
    assert_eq!(i["requests"], 1, "one proxied request counted: {i}");
    assert_eq!(i["in_flight"], 0, "nothing in flight after the answer: {i}");

    // A second instance joins; re-registering the first replaces it in place.
    register(
        server.addr,
        &reg("sift", "sift-2", &up.url(), &["/api/v1/sift"]),
    );
    let again = register(server.addr, &body);
    assert_eq!(
        again["replaced"], true,
        "re-registering an instance says replaced: {again}"
    );
    let list = listing(server.addr);
    let ids: Vec<&str> = subsystem(&list, "sift").expect("sift")["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["instance"].as_str())
        .collect();
    assert_eq!(ids, ["sift-1", "sift-2"], "two instances: {list}");
}

fn static_instances_from_the_config_file(driver: &str) {
    let up = Upstream::start("cfg-up", Behaviour::Normal);
    let toml = format!(
        "[[subsystems]]\nname = \"cfg\"\ninstance = \"cfg-1\"\nurl = \"{}\"\nroutes = [\"/cfg\"]\n",
        up.url()
    );
    let server = Server::start_with_config(driver, &toml);
    let list = listing(server.addr);
    let i = instance(&list, "cfg", "cfg-1")
        .unwrap_or_else(|| panic!("the [[subsystems]] instance is not listed: {list}"));
    assert_eq!(i["source"], "config", "a static instance says so: {i}");
    assert_eq!(i["status"], "ready", "{i}");
    assert_eq!(i["url"], up.url(), "{i}");

    let r = server.get("/cfg/hello?a=1");
    assert_eq!(r.status, 200, "GET under a static route: {r}");
    assert_eq!(answered_by(&r), "cfg-1", "{r}");
    let rec = up.requests();
    assert_eq!(rec.len(), 1, "the static upstream got the request");
    assert_eq!(rec[0].target, "/cfg/hello?a=1");

    // An API registration next to it says "api".
    register(server.addr, &reg("cfg", "cfg-2", &up.url(), &["/cfg"]));
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "cfg", "cfg-2").expect("cfg-2")["source"],
        "api",
        "{list}"
    );
    assert_eq!(
        instance(&list, "cfg", "cfg-1").expect("cfg-1")["source"],
        "config",
        "{list}"
    );
}

fn malformed_registrations_are_refused(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("sift-up", Behaviour::Normal);
    register(
        server.addr,
        &reg("sift", "sift-1", &up.url(), &["/api/v1/sift"]),
    );
    let before = projection(&listing(server.addr));
    let url = up.url();

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing name",
            json!({"instance": "bad-1", "url": url, "routes": ["/a"]}),
            "name",
        ),
        (
            "bad url scheme",
            reg("sift", "bad-1", "https://127.0.0.1:9", &["/a"]),
            "url",
        ),
        (
            "route without a leading '/'",
            reg("sift", "bad-1", &url, &["api/v1/sift"]),
            "routes[0]",
        ),
        (
            "unknown field",
            reg_with("sift", "bad-1", &url, &["/a"], json!({"bogus": 1})),
            "bogus",
        ),
        (
            "weight 0",
            reg_with("sift", "bad-1", &url, &["/a"], json!({"weight": 0})),
            "weight",
        ),
        (
            "ttl_ms 5",
            reg_with("sift", "bad-1", &url, &["/a"], json!({"ttl_ms": 5})),
            "ttl_ms",
        ),
        (
            "subscription path without '/'",
            reg_with(
                "sift",
                "bad-1",
                &url,
                &["/a"],
                json!({"subscriptions": [{"types": ["document.edit"], "path": "events"}]}),
            ),
            "subscriptions[0].path",
        ),
        (
            "route shadowing relay's own endpoints",
            reg("sift", "bad-1", &url, &["/api/v1/relay/x"]),
            "routes[0]",
        ),
    ];
    for (what, body, field) in cases {
        let r = register_raw(server.addr, body.to_string().as_bytes(), &[]);
        let message = assert_json_error(&r, 400, &format!("registration with {what} ({body})"));
        assert!(
            message.contains(field),
            "registration with {what}: the 400 should name the field {field:?}, got {message:?}"
        );
        let after = projection(&listing(server.addr));
        assert_eq!(
            after, before,
            "registration with {what} was refused but the registry changed"
        );
    }

    // Not JSON at all.
    let r = register_raw(server.addr, b"{not json", &[]);
    assert_json_error(&r, 400, "a registration that is not JSON");
    assert_eq!(
        projection(&listing(server.addr)),
        before,
        "a non-JSON registration changed the registry"
    );
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

fn requests_reach_the_right_upstream(driver: &str) {
    let server = Server::start(driver, &[]);
    let sift = Upstream::start("sift-up", Behaviour::Normal);
    let deep = Upstream::start("deep-up", Behaviour::Normal);
    let tea = Upstream::start(
        "tea-up",
        Behaviour::Fixed {
            status: 418,
            headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("X-Custom".into(), "yes".into()),
            ],
            body: b"short and stout".to_vec(),
        },
    );
    register(
        server.addr,
        &reg("sift", "a", &sift.url(), &["/api/v1/sift"]),
    );
    register(
        server.addr,
        &reg("deep", "b", &deep.url(), &["/api/v1/sift/deep"]),
    );
    register(server.addr, &reg("tea", "c", &tea.url(), &["/teapot"]));

    // Full original path and query; prefix match on whole segments; longest prefix wins.
    let cases = [
        ("/api/v1/sift/items/7?x=1&y=a%20b", &sift, "a"),
        ("/api/v1/sift", &sift, "a"),
        ("/api/v1/sift?q=1", &sift, "a"),
        ("/api/v1/sift/deepx", &sift, "a"),
        ("/api/v1/sift/deep", &deep, "b"),
        ("/api/v1/sift/deep/1?z", &deep, "b"),
    ];
    for (target, up, id) in cases {
        let before = up.count();
        let r = server.get(target);
        assert_eq!(r.status, 200, "GET {target}: {r}");
        assert_eq!(
            answered_by(&r),
            id,
            "GET {target} should go to instance {id}"
        );
        let rec = up.requests();
        assert_eq!(rec.len(), before + 1, "GET {target}: one request upstream");
        let last = rec.last().unwrap();
        assert_eq!(last.method, "GET");
        assert_eq!(
            last.target, target,
            "the upstream sees the full original path and query"
        );
        assert_eq!(
            json(&r)["upstream"],
            up.name(),
            "the body is the upstream's: {r}"
        );
    }
    let total = sift.count() + deep.count();
    let r = server.get("/api/v1/siftx");
    assert_json_error(&r, 404, "GET /api/v1/siftx (not a whole-segment match)");
    assert_eq!(
        sift.count() + deep.count(),
        total,
        "/api/v1/siftx must not reach any upstream"
    );

    // A POST body passes through unchanged, with the request's own headers.
    let body = br#"{"hello":"world","n":[1,2,3]}"#;
    let r = request(
        server.addr,
        "POST",
        "/api/v1/sift/echo",
        &[("Content-Type", "application/json"), ("X-Custom-In", "abc")],
        body,
    );
    assert_eq!(r.status, 200, "proxied POST: {r}");
    let last = sift.requests().pop().unwrap();
    assert_eq!(last.method, "POST");
    assert_eq!(last.target, "/api/v1/sift/echo");
    assert_eq!(
        last.body, body,
        "the POST body reaches the upstream unchanged"
    );
    assert_eq!(last.header("content-type"), Some("application/json"));
    assert_eq!(last.header("x-custom-in"), Some("abc"));

    // A chunked request body arrives whole.
    let r = request(
        server.addr,
        "POST",
        "/api/v1/sift/chunked",
        &[("Transfer-Encoding", "chunked")],
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "proxied chunked POST: {r}");
    let last = sift.requests().pop().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&last.body),
        "hello world",
        "a chunked request body reaches the upstream de-chunked"
    );

    // The upstream's status, headers and body come back.
    let r = server.get("/teapot/pot");
    assert_eq!(r.status, 418, "the upstream's status comes back: {r}");
    assert_eq!(r.header("x-custom"), Some("yes"), "upstream header: {r}");
    assert_eq!(r.header("content-type"), Some("text/plain"), "{r}");
    assert_eq!(r.text(), "short and stout", "upstream body: {r}");
    assert!(
        r.header("x-request-id").is_some(),
        "a proxied response carries X-Request-ID: {r}"
    );
}

fn relay_endpoints_are_never_proxied(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("catch-all", Behaviour::Normal);
    register(
        server.addr,
        &reg(
            "all",
            "a",
            &up.url(),
            &["/", "/api", "/metrics", "/healthz"],
        ),
    );
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/relay/health",
        "/api/v1/relay/metrics",
        "/api/v1/relay/subsystems",
        "/api/v1/relay/channels",
        "/api/v1/relay/connections",
    ] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "GET {path} is relay's own: {r}");
        assert!(
            r.header("x-upstream").is_none() && r.header("x-relay-instance").is_none(),
            "GET {path} must be answered by relay, not proxied: {r}"
        );
    }
    let r = server.get("/api/v1/relay/nope");
    assert_json_error(&r, 404, "GET /api/v1/relay/nope");
    assert!(r.header("x-upstream").is_none(), "{r}");
    assert_eq!(
        up.count(),
        0,
        "no relay endpoint may reach the upstream: {:?}",
        up.requests()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );

    // Everything else does go to the catch-all.
    for path in ["/other", "/api/v2/x"] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "GET {path}: {r}");
        assert_eq!(answered_by(&r), "a", "GET {path} goes to the catch-all");
    }
    assert_eq!(up.count(), 2);

    for route in ["/api/v1/relay", "/api/v1/relay/events"] {
        let r = register_raw(
            server.addr,
            reg("shadow", "s", &up.url(), &[route])
                .to_string()
                .as_bytes(),
            &[],
        );
        assert_json_error(&r, 400, &format!("registering route {route}"));
    }
}

/// Relay's own namespace is `/api/v1/relay` and what is under it, matched on whole path
/// segments like routes are: `/api/v1/relayx` is not relay's, so a catch-all route gets it and
/// a route `/api/v1/relayx` shadows nothing.
fn relay_namespace_is_matched_on_whole_segments(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("catch-all", Behaviour::Normal);
    register(server.addr, &reg("all", "a", &up.url(), &["/"]));
    let r = server.get("/api/v1/relayx");
    assert_eq!(
        (r.status, answered_by(&r).as_str()),
        (200, "a"),
        "GET /api/v1/relayx is not a relay endpoint and should reach the catch-all route /, \
         got {r}"
    );
    let r = register_raw(
        server.addr,
        reg("rx", "a", &up.url(), &["/api/v1/relayx"])
            .to_string()
            .as_bytes(),
        &[],
    );
    assert_eq!(
        r.status, 201,
        "route /api/v1/relayx does not shadow relay's /api/v1/relay endpoints: {r}"
    );
}

fn request_headers_are_propagated(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("hdr-up", Behaviour::Normal);
    register(server.addr, &reg("hdr", "a", &up.url(), &["/hdr"]));

    // Given: kept / continued / appended.
    let given_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let given_tp = format!("00-{given_trace}-00f067aa0ba902b7-01");
    let r = request(
        server.addr,
        "GET",
        "/hdr/1",
        &[
            ("X-Request-ID", "my-req-123"),
            ("traceparent", &given_tp),
            ("X-Forwarded-For", "203.0.113.7"),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.header("x-request-id"),
        Some("my-req-123"),
        "the caller gets its X-Request-ID back: {r}"
    );
    let rec = up.requests().pop().unwrap();
    assert_eq!(
        rec.header_all("x-request-id"),
        ["my-req-123"],
        "the upstream sees the given X-Request-ID once"
    );
    let tps = rec.header_all("traceparent");
    assert_eq!(tps.len(), 1, "exactly one traceparent upstream: {tps:?}");
    let (trace, span, flags) = traceparent_parts(tps[0], "continued trace");
    assert_eq!(trace, given_trace, "the trace id is kept");
    assert_ne!(span, "00f067aa0ba902b7", "the span id is new");
    assert_eq!(flags, "01", "the flags are kept");
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"],
        "X-Forwarded-For is appended to"
    );

    // Absent: created.
    let r = server.get("/hdr/2");
    assert_eq!(r.status, 200, "{r}");
    let rec = up.requests().pop().unwrap();
    let ids = rec.header_all("x-request-id");
    assert_eq!(ids.len(), 1, "one X-Request-ID upstream: {ids:?}");
    assert!(is_uuid(ids[0]), "a created X-Request-ID is a UUID: {ids:?}");
    assert_eq!(
        r.header("x-request-id"),
        Some(ids[0]),
        "the caller gets the created X-Request-ID back: {r}"
    );
    let tps = rec.header_all("traceparent");
    assert_eq!(tps.len(), 1, "a traceparent is created: {tps:?}");
    let (trace2, _, _) = traceparent_parts(tps[0], "new trace");
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        ["127.0.0.1"],
        "X-Forwarded-For names the client"
    );

    let r3 = server.get("/hdr/3");
    let rec3 = up.requests().pop().unwrap();
    assert_ne!(
        rec3.header("x-request-id"),
        Some(ids[0]),
        "every request gets its own id"
    );
    assert_eq!(r3.header("x-request-id"), rec3.header("x-request-id"));
    let (trace3, _, _) = traceparent_parts(rec3.header("traceparent").unwrap_or(""), "third");
    assert_ne!(trace2, trace3, "new traces are distinct");
}

// ---------------------------------------------------------------------------------------------
// Balancing
// ---------------------------------------------------------------------------------------------

fn round_robin_splits_evenly_on_one_connection(driver: &str) {
    let server = Server::start(driver, &[]);
    let a = Upstream::start("a", Behaviour::Normal);
    let b = Upstream::start("b", Behaviour::Normal);
    let lb = json!({"lb": "round_robin"});
    register(
        server.addr,
        &reg_with("rr", "a", &a.url(), &["/rr"], lb.clone()),
    );
    register(server.addr, &reg_with("rr", "b", &b.url(), &["/rr"], lb));
    let mut conn = Conn::open(server.addr);
    let counts = spread(&mut conn, "/rr", 100);
    assert_eq!(
        (counts.get("a"), counts.get("b")),
        (Some(&50), Some(&50)),
        "round robin on one connection (one shard's cursor) splits 100 requests 50/50: {counts:?}"
    );
    assert_eq!((a.count(), b.count()), (50, 50), "upstream counts");
}

fn weighted_balancing_follows_the_weights(driver: &str) {
    let server = Server::start(driver, &[]);
    let a = Upstream::start("a", Behaviour::Normal);
    let b = Upstream::start("b", Behaviour::Normal);
    register(
        server.addr,
        &reg_with(
            "w",
            "a",
            &a.url(),
            &["/w"],
            json!({"lb": "weighted", "weight": 3}),
        ),
    );
    register(
        server.addr,
        &reg_with(
            "w",
            "b",
            &b.url(),
            &["/w"],
            json!({"lb": "weighted", "weight": 1}),
        ),
    );
    let list = listing(server.addr);
    assert_eq!(
        subsystem(&list, "w").expect("w")["lb"],
        "weighted",
        "{list}"
    );
    let mut conn = Conn::open(server.addr);
    let counts = spread(&mut conn, "/w", 400);
    assert_eq!(
        (counts.get("a"), counts.get("b")),
        (Some(&300), Some(&100)),
        "weights 3:1 over 400 requests on one connection: {counts:?}"
    );
}

fn least_outstanding_avoids_the_busy_instance(driver: &str) {
    let server = Server::start(driver, &[]);
    let a = Upstream::start("a", Behaviour::Gate);
    let b = Upstream::start("b", Behaviour::Normal);
    let lb = json!({"lb": "least_outstanding"});
    register(
        server.addr,
        &reg_with("lo", "a", &a.url(), &["/lo"], lb.clone()),
    );
    register(server.addr, &reg_with("lo", "b", &b.url(), &["/lo"], lb));
    assert_eq!(
        subsystem(&listing(server.addr), "lo").expect("lo")["lb"],
        "least_outstanding"
    );

    // Send single requests (each on its own connection) until one is held at `a`.
    let mut held = None;
    for i in 0..20 {
        let addr = server.addr;
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = request(addr, "GET", &format!("/lo/probe{i}"), &[], b"");
            let _ = tx.send(());
            r
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if a.count() >= 1 {
                held = Some(t);
                break;
            }
            if rx.try_recv().is_ok() {
                let r = t.join().expect("request thread");
                assert_eq!(r.status, 200, "{r}");
                assert_eq!(answered_by(&r), "b", "only b can answer while a holds: {r}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "request {i} neither held nor answered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if held.is_some() {
            break;
        }
    }
    let held = held.expect("20 requests never reached instance a");
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "lo", "a").expect("a")["in_flight"],
        1,
        "the held request is in flight at a: {list}"
    );

    // With one request outstanding at `a`, every request goes to `b`.
    let mut conn = Conn::open(server.addr);
    let counts = spread(&mut conn, "/lo/busy", 20);
    assert_eq!(
        counts.get("b"),
        Some(&20),
        "least_outstanding sends everything to the idle instance while a is busy: {counts:?}"
    );
    assert_eq!(a.count(), 1, "a got nothing new while busy");

    a.open_gate();
    let r = held.join().expect("held request thread");
    assert_eq!(r.status, 200, "the held request completes: {r}");
    assert_eq!(answered_by(&r), "a", "{r}");

    // Both idle again: ties alternate.
    let counts = spread(&mut conn, "/lo/idle", 10);
    assert_eq!(
        (counts.get("a"), counts.get("b")),
        (Some(&5), Some(&5)),
        "with equal outstanding counts, requests alternate: {counts:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Failover, retries, 502/503/504
// ---------------------------------------------------------------------------------------------

fn idempotent_requests_fail_over(driver: &str) {
    let server = Server::start(driver, &[]);
    let bad = Upstream::start(
        "bad",
        Behaviour::FailMethod {
            method: "GET",
            status: 500,
        },
    );
    let good = Upstream::start("good", Behaviour::Normal);
    register(server.addr, &reg("fo", "a", &bad.url(), &["/fo"]));
    register(server.addr, &reg("fo", "b", &good.url(), &["/fo"]));
    let mut conn = Conn::open(server.addr);
    for i in 0..10 {
        let r = conn.roundtrip("GET", &format!("/fo/{i}"), &[], b"");
        assert_eq!(
            r.status, 200,
            "GET {i}: a 500 from one instance is retried on the other: {r}"
        );
        assert_eq!(answered_by(&r), "b", "GET {i}: {r}");
    }
    assert!(
        bad.count() >= 1,
        "round robin must have tried the failing instance at least once"
    );
    assert_eq!(good.count(), 10, "every GET ended at the good instance");

    // An instance that closes connections at once: GET is retried on the other.
    let closer = Upstream::start("closer", Behaviour::Close);
    let good2 = Upstream::start("good2", Behaviour::Normal);
    register(server.addr, &reg("cl", "a", &closer.url(), &["/cl"]));
    register(server.addr, &reg("cl", "b", &good2.url(), &["/cl"]));
    for i in 0..4 {
        let r = conn.roundtrip("GET", &format!("/cl/{i}"), &[], b"");
        assert_eq!(
            r.status, 200,
            "GET {i}: a closed connection is retried on the other instance: {r}"
        );
        assert_eq!(answered_by(&r), "b", "{r}");
    }
    assert!(closer.connections() >= 1, "the closing instance was tried");
}

fn post_is_retried_only_when_it_never_reached_an_upstream(driver: &str) {
    let server = Server::start(driver, &[]);
    let failing = Upstream::start("failing", Behaviour::Normal);
    failing.set_status(500);
    let good = Upstream::start("good", Behaviour::Normal);
    register(server.addr, &reg("p5", "a", &failing.url(), &["/p5"]));
    register(server.addr, &reg("p5", "b", &good.url(), &["/p5"]));
    let mut conn = Conn::open(server.addr);
    let mut fives = 0;
    for i in 0..4 {
        let body = format!(r#"{{"n":{i}}}"#);
        let r = conn.roundtrip(
            "POST",
            "/p5/op",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        match r.status {
            500 => {
                assert_eq!(answered_by(&r), "a", "the 500 comes from a: {r}");
                fives += 1;
            }
            200 => assert_eq!(answered_by(&r), "b", "{r}"),
            _ => panic!("POST {i}: expected the upstream's 500 or 200, got {r}"),
        }
    }
    assert!(
        fives >= 1,
        "round robin should have sent a POST to the failing instance"
    );
    assert_eq!(
        failing.count(),
        fives,
        "each POST that reached the failing instance was answered with its 500, not retried"
    );
    assert_eq!(
        failing.count() + good.count(),
        4,
        "a POST answered with 500 must not be retried on another instance"
    );

    // A refused connection never reached anyone: that POST is retried.
    let good2 = Upstream::start("good2", Behaviour::Normal);
    register(server.addr, &reg("pr", "a", &refused_url(), &["/pr"]));
    register(server.addr, &reg("pr", "b", &good2.url(), &["/pr"]));
    for i in 0..4 {
        let body = format!(r#"{{"n":{i}}}"#);
        let r = conn.roundtrip(
            "POST",
            "/pr/op",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(
            r.status, 200,
            "POST {i}: a refused connection is retried on the other instance: {r}"
        );
        assert_eq!(answered_by(&r), "b", "{r}");
    }
    let bodies: Vec<String> = good2
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#],
        "each POST reached the good instance once with its body"
    );
}

fn bad_gateway_when_every_instance_refuses(driver: &str) {
    let server = Server::start(driver, &[]);
    register(server.addr, &reg("gone", "a", &refused_url(), &["/gone"]));
    register(server.addr, &reg("gone", "b", &refused_url(), &["/gone"]));
    let mut conn = Conn::open(server.addr);
    for method in ["GET", "POST"] {
        let r = conn.roundtrip(method, "/gone/x", &[("X-Request-ID", "rid-502")], b"");
        assert_json_error(&r, 502, &format!("{method} when every instance refuses"));
        assert_eq!(
            json(&r)["error"]["code"],
            "bad_gateway",
            "{method}: code bad_gateway: {r}"
        );
        assert_eq!(
            r.header("x-request-id"),
            Some("rid-502"),
            "{method}: an error answer carries X-Request-ID too: {r}"
        );
    }
}

fn gateway_timeout_when_the_upstream_hangs(driver: &str) {
    let server = Server::start_with_config(driver, "[proxy]\ntimeout_ms = 300\n");
    let hang = Upstream::start("hang", Behaviour::Hang);
    register(server.addr, &reg("slow", "a", &hang.url(), &["/slow"]));
    let mut conn = Conn::open(server.addr);
    let r = conn.roundtrip("GET", "/slow/x", &[], b"");
    assert_json_error(
        &r,
        504,
        "GET to a hanging upstream with proxy.timeout_ms = 300",
    );
    assert_eq!(json(&r)["error"]["code"], "upstream_timeout", "{r}");
    assert!(
        r.header("x-request-id").is_some(),
        "504 carries X-Request-ID: {r}"
    );
    assert_eq!(hang.count(), 1, "the single instance got the request once");
    let r = conn.roundtrip("GET", "/healthz", &[], b"");
    assert_eq!(
        r.status, 200,
        "the client connection still works after a 504: {r}"
    );
    let list = listing(server.addr);
    let i = instance(&list, "slow", "a").expect("listed");
    assert_eq!(
        i["in_flight"], 0,
        "nothing in flight after the timeout: {i}"
    );
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------------------------

fn circuit_opens_rejects_and_closes_after_the_cooldown(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[circuit]\nconsecutive_failures = 3\ncooldown_ms = 500\n",
    );
    let up = Upstream::start("flaky", Behaviour::Normal);
    up.set_status(500);
    register(server.addr, &reg("cb", "a", &up.url(), &["/cb"]));
    // One keep-alive connection: one shard, one circuit.
    let mut conn = Conn::open(server.addr);
    for i in 1..=3 {
        let r = conn.roundtrip("GET", "/cb/x", &[], b"");
        assert_eq!(
            r.status, 500,
            "failing request {i} reaches the upstream: {r}"
        );
        assert_eq!(up.count(), i, "failing request {i} reached the upstream");
        let list = listing(server.addr);
        let circuit = &instance(&list, "cb", "a").expect("listed")["circuit"];
        let want = if i < 3 { "closed" } else { "open" };
        assert_eq!(
            circuit, want,
            "after {i} consecutive failures (threshold 3) the circuit is {want}: {list}"
        );
    }
    for i in 0..3 {
        let r = conn.roundtrip("GET", "/cb/x", &[], b"");
        assert_json_error(&r, 503, &format!("request {i} while the circuit is open"));
        assert_eq!(
            retry_after(&r, "503 while open"),
            1,
            "Retry-After is the rest of a 500 ms cooldown, rounded up: {r}"
        );
    }
    assert_eq!(
        up.count(),
        3,
        "an open circuit keeps requests from the upstream"
    );

    // After the cooldown a probe goes through; its success closes the circuit.
    up.set_status(200);
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let r = conn.roundtrip("GET", "/cb/x", &[], b"");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "only 503 until the probe: {r}");
        assert!(
            Instant::now() < deadline,
            "the circuit never let a probe through within {EVENTUALLY:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(up.count(), 4, "exactly one probe reached the upstream");
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "cb", "a").expect("listed")["circuit"],
        "closed",
        "a successful probe closes the circuit: {list}"
    );
    for _ in 0..3 {
        let r = conn.roundtrip("GET", "/cb/x", &[], b"");
        assert_eq!(r.status, 200, "closed again: {r}");
    }
    assert_eq!(up.count(), 7);
}

/// `[circuit] failure_rate_percent`: half of at least four requests failing opens the circuit,
/// although no two failures come in a row.
fn circuit_opens_on_a_failure_rate(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[circuit]\nconsecutive_failures = 0\nfailure_rate_percent = 50\n\
         rate_min_requests = 4\nrate_window_ms = 60000\ncooldown_ms = 60000\n",
    );
    let up = Upstream::start("rate", Behaviour::Normal);
    register(server.addr, &reg("cr", "a", &up.url(), &["/cr"]));
    let mut conn = Conn::open(server.addr);
    for (i, status) in [200u16, 500, 200, 500].into_iter().enumerate() {
        up.set_status(status);
        let r = conn.roundtrip("POST", "/cr/x", &[], b"{}");
        assert_eq!(r.status, status, "request {i} reaches the upstream: {r}");
        let list = listing(server.addr);
        let want = if i < 3 { "closed" } else { "open" };
        assert_eq!(
            instance(&list, "cr", "a").expect("listed")["circuit"],
            want,
            "after {} of {} requests failed (50% of at least 4 trips) the circuit is {want}: {list}",
            i.div_ceil(2),
            i + 1
        );
    }
    up.set_status(200);
    let r = conn.roundtrip("POST", "/cr/x", &[], b"{}");
    assert_json_error(
        &r,
        503,
        "request while the rate rule holds the circuit open",
    );
    assert_eq!(
        up.count(),
        4,
        "an open circuit keeps requests from the upstream"
    );
}

fn circuit_reset_closes_at_once(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[circuit]\nconsecutive_failures = 3\ncooldown_ms = 60000\n",
    );
    let up = Upstream::start("flaky", Behaviour::Normal);
    up.set_status(500);
    register(server.addr, &reg("cb", "a", &up.url(), &["/cb"]));
    let mut conn = Conn::open(server.addr);
    for _ in 0..3 {
        assert_eq!(conn.roundtrip("GET", "/cb/x", &[], b"").status, 500);
    }
    let r = conn.roundtrip("GET", "/cb/x", &[], b"");
    assert_json_error(&r, 503, "request while open");
    assert!(
        retry_after(&r, "503 while open") > 1,
        "a 60 s cooldown gives a longer Retry-After: {r}"
    );
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "cb", "a").expect("listed")["circuit"],
        "open",
        "{list}"
    );

    up.set_status(200);
    let r = request(
        server.addr,
        "POST",
        &format!("{SUBSYSTEMS}/cb/a/circuit/reset"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "circuit reset: {r}");
    let v = json(&r);
    assert_eq!(v["circuit"], "closed", "the reset answer says closed: {v}");
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "cb", "a").expect("listed")["circuit"],
        "closed",
        "the listing shows the reset circuit closed: {list}"
    );
    let r = conn.roundtrip("GET", "/cb/x", &[], b"");
    assert_eq!(
        r.status, 200,
        "right after the reset a request goes through (no cooldown wait): {r}"
    );
    assert_eq!(up.count(), 4);

    let r = request(
        server.addr,
        "POST",
        &format!("{SUBSYSTEMS}/cb/nope/circuit/reset"),
        &[],
        b"",
    );
    assert_json_error(&r, 404, "circuit reset of an unknown instance");
    let r = request(
        server.addr,
        "GET",
        &format!("{SUBSYSTEMS}/cb/a/circuit/reset"),
        &[],
        b"",
    );
    assert_json_error(&r, 405, "GET on circuit/reset");
}

/// API.md section 8: `relay_upstream_requests_total{subsystem,code}` and
/// `relay_circuit_state{subsystem,instance}` (0 closed, 1 half-open, 2 open).
fn upstream_metrics_are_exported(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[circuit]\nconsecutive_failures = 3\ncooldown_ms = 60000\n",
    );
    let up = Upstream::start("m", Behaviour::Normal);
    register(server.addr, &reg("msys", "a", &up.url(), &["/m"]));
    let mut conn = Conn::open(server.addr);
    assert_eq!(conn.roundtrip("GET", "/m/ok", &[], b"").status, 200);
    up.set_status(500);
    for _ in 0..3 {
        assert_eq!(conn.roundtrip("GET", "/m/fail", &[], b"").status, 500);
    }
    let text = server.get("/metrics").text();
    let relevant: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("relay_upstream") || l.starts_with("relay_circuit"))
        .collect();
    // `code` may be the status or its class (API.md names the label, not its values).
    let sum_codes = |codes: &[&str]| -> Option<f64> {
        let mut found = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("relay_upstream_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let ours = labels.split(',').any(|l| l == "subsystem=\"msys\"");
            let code = labels
                .split(',')
                .find_map(|l| l.strip_prefix("code=\""))
                .map(|c| c.trim_end_matches('"'));
            if ours && code.is_some_and(|c| codes.contains(&c)) {
                *found.get_or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(f64::NAN);
            }
        }
        found
    };
    assert_eq!(
        sum_codes(&["200", "2xx"]),
        Some(1.0),
        "relay_upstream_requests_total{{subsystem=\"msys\",code=\"200\"|\"2xx\"}} should be 1; \
         relay_upstream*/relay_circuit* lines in /metrics: {relevant:?}"
    );
    assert_eq!(
        sum_codes(&["500", "5xx"]),
        Some(3.0),
        "relay_upstream_requests_total{{subsystem=\"msys\",code=\"500\"|\"5xx\"}} should be 3; \
         relay_upstream*/relay_circuit* lines in /metrics: {relevant:?}"
    );
    let state = text
        .lines()
        .find(|l| {
            l.starts_with("relay_circuit_state{")
                && l.contains("subsystem=\"msys\"")
                && l.contains("instance=\"a\"")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(
        state,
        Some(2.0),
        "relay_circuit_state{{subsystem=\"msys\",instance=\"a\"}} should be 2 (open); \
         relay_upstream*/relay_circuit* lines in /metrics: {relevant:?}"
    );
}

/// `clients` connections each send `rounds` GETs to `path`, every round started together (so
/// the requests of a round are in flight at once against a slow instance); each must get 200.
fn concurrent_rounds(addr: std::net::SocketAddr, path: &str, clients: usize, rounds: usize) {
    let start = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let start = start.clone();
            let path = format!("{path}/{i}");
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for round in 0..rounds {
                    start.wait();
                    let r = conn.roundtrip("GET", &path, &[], b"");
                    assert_eq!(r.status, 200, "client {i}, round {round}: {r}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread panicked");
    }
}

fn concurrent_requests_keep_their_upstream_connections(driver: &str) {
    // 32 requests at a time, four times over: the connections of the first round serve the
    // rest. A pool smaller than the concurrency (8 per shard before `proxy.pool_max_idle`)
    // closed half of them after every round and opened them again on the next.
    const CLIENTS: usize = 32;
    let server = Server::start(driver, &[]);
    let up = Upstream::start("pool", Behaviour::Delay(Duration::from_millis(100)));
    register(server.addr, &reg("pool", "a", &up.url(), &["/pool"]));
    concurrent_rounds(server.addr, "/pool", CLIENTS, 4);
    assert_eq!(up.count(), CLIENTS * 4);
    let accepted = up.connections();
    assert!(
        (CLIENTS..=CLIENTS + 4).contains(&accepted),
        "{accepted} connections reached the instance for 4 rounds of {CLIENTS} concurrent \
         requests; the first round's should serve them all (a few more for health checks)"
    );
    // The shards bring the client's counts into their metrics on the maintenance tick.
    let opened = wait_metric_at_least(
        &server,
        "relay_upstream_connections_opened_total",
        accepted as f64,
        EVENTUALLY,
    );
    assert_eq!(
        opened, accepted as f64,
        "relay_upstream_connections_opened_total"
    );
    assert_eq!(server.metric_sum("relay_upstream_pool_overflow_total"), 0.0);
    let idle = wait_metric_at_least(
        &server,
        "relay_upstream_idle_connections",
        CLIENTS as f64,
        EVENTUALLY,
    );
    assert!(
        idle >= CLIENTS as f64,
        "relay_upstream_idle_connections {idle}: the connections wait in the pools"
    );

    // With a pool of 2 per shard, each round closes what the pools cannot keep, and counts it.
    let small = Server::start_with_config(driver, "[proxy]\npool_max_idle = 2\n");
    let up = Upstream::start("small", Behaviour::Delay(Duration::from_millis(100)));
    register(small.addr, &reg("small", "a", &up.url(), &["/small"]));
    concurrent_rounds(small.addr, "/small", CLIENTS, 2);
    let accepted = up.connections();
    assert!(
        accepted >= CLIENTS + CLIENTS / 2,
        "{accepted} connections: the second round must have opened most of its own again"
    );
    let overflow = wait_metric_at_least(
        &small,
        "relay_upstream_pool_overflow_total",
        1.0,
        EVENTUALLY,
    );
    assert!(
        overflow >= (CLIENTS - 4) as f64,
        "relay_upstream_pool_overflow_total {overflow}: each round closes all but 2 per shard"
    );
    assert!(small.metric_sum("relay_upstream_idle_connections") <= 4.0);
    // The server keeps serving after all that churn.
    let mut conn = Conn::open(small.addr);
    assert_eq!(conn.roundtrip("GET", "/small/after", &[], b"").status, 200);
}

// ---------------------------------------------------------------------------------------------
// Health checks
// ---------------------------------------------------------------------------------------------

const FAST_HEALTH: &str = "[health]\ninterval_ms = 100\ntimeout_ms = 50\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

fn health_checks_take_instances_out_and_back(driver: &str) {
    let server = Server::start_with_config(driver, FAST_HEALTH);
    let a = Upstream::start("a", Behaviour::Normal);
    let b = Upstream::start("b", Behaviour::Normal);
    let mut events = SseStream::open(server.addr, SYSTEM_STREAM, None);
    wait_subscribers(server.addr, &[("relay.system", 1)]);
    register(server.addr, &reg("hc", "a", &a.url(), &["/hc"]));
    register(server.addr, &reg("hc", "b", &b.url(), &["/hc"]));
    sse_system_event(&mut events, "subsystem.registered for hc/a", |v| {
        is_change(v, "subsystem.registered", "hc", "a")
    });

    // Health fails: unhealthy, and out of the rotation.
    a.set_healthy(false);
    let list = wait_status(server.addr, "hc", "a", "unhealthy");
    let i = instance(&list, "hc", "a").expect("a");
    assert_eq!(i["healthy"], false, "{i}");
    assert!(a.health_checks() >= 2, "a was probed");
    let v = sse_system_event(&mut events, "subsystem.health (a unhealthy)", |v| {
        is_change(v, "subsystem.health", "hc", "a")
    });
    assert_eq!(v["data"]["healthy"], false, "first health flip of a: {v}");
    assert_eq!(v["data"]["status"], "unhealthy", "{v}");

    let before = a.count();
    let mut conn = Conn::open(server.addr);
    let counts = spread(&mut conn, "/hc/out", 10);
    assert_eq!(
        counts.get("b"),
        Some(&10),
        "an unhealthy instance gets no requests: {counts:?}"
    );
    assert_eq!(a.count(), before, "a got nothing while unhealthy");

    // Health passes again: ready, and back in the rotation.
    a.set_healthy(true);
    wait_status(server.addr, "hc", "a", "ready");
    let v = sse_system_event(&mut events, "subsystem.health (a ready)", |v| {
        is_change(v, "subsystem.health", "hc", "a")
    });
    assert_eq!(v["data"]["healthy"], true, "second health flip of a: {v}");
    assert_eq!(v["data"]["status"], "ready", "{v}");
    let counts = spread(&mut conn, "/hc/back", 10);
    assert_eq!(
        (counts.get("a"), counts.get("b")),
        (Some(&5), Some(&5)),
        "a healthy again shares the round robin: {counts:?}"
    );

    // None healthy: 503 with Retry-After.
    a.set_healthy(false);
    b.set_healthy(false);
    wait_listing(server.addr, "both hc instances unhealthy", |l| {
        instance(l, "hc", "a").is_some_and(|i| i["status"] == "unhealthy")
            && instance(l, "hc", "b").is_some_and(|i| i["status"] == "unhealthy")
    });
    let r = conn.roundtrip("GET", "/hc/none", &[], b"");
    assert_json_error(&r, 503, "GET when no instance is healthy");
    retry_after(&r, "503 when no instance is healthy");

    // Every flip is counted: a went down, up and down (3), b down once (1).
    let list = listing(server.addr);
    let changes = |id: &str| {
        instance(&list, "hc", id).expect("listed")["health_checks"]["status_changes"].clone()
    };
    assert_eq!((changes("a"), changes("b")), (3.into(), 1.into()), "{list}");
    let metrics = server.get("/metrics").text();
    for (id, want) in [("a", 3), ("b", 1)] {
        let line = format!(
            "relay_health_status_changes_total{{subsystem=\"hc\",instance=\"{id}\"}} {want}"
        );
        assert!(
            metrics.lines().any(|l| l == line),
            "want `{line}` in /metrics"
        );
        // The lifecycle state set: 1 on unhealthy, 0 on the others.
        for (state, value) in [("ready", 0), ("unhealthy", 1), ("draining", 0)] {
            let line = format!(
                "relay_subsystem_instance_state{{subsystem=\"hc\",instance=\"{id}\",state=\"{state}\"}} {value}"
            );
            assert!(
                metrics.lines().any(|l| l == line),
                "want `{line}` in /metrics"
            );
        }
    }
}

fn health_endpoint_degrades_without_a_healthy_instance(driver: &str) {
    let server = Server::start_with_config(driver, FAST_HEALTH);
    let a = Upstream::start("a", Behaviour::Normal);
    register(server.addr, &reg("hd", "a", &a.url(), &["/hd"]));
    let r = server.get("/api/v1/relay/health");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(json(&r)["status"], "ok", "all healthy: {r}");

    a.set_healthy(false);
    wait_status(server.addr, "hd", "a", "unhealthy");
    let r = server.get("/api/v1/relay/health");
    let v = json(&r);
    assert_eq!(
        v["status"], "degraded",
        "GET /api/v1/relay/health should say degraded while subsystem hd has no healthy \
         instance, got {r}"
    );
    assert!(
        v["subsystems"]["hd"].is_string(),
        "the health answer's subsystems map should name hd with its status, got {v}"
    );
    assert_ne!(v["subsystems"]["hd"], "ok", "{v}");
}

// ---------------------------------------------------------------------------------------------
// Heartbeats, TTL, deregistration
// ---------------------------------------------------------------------------------------------

fn heartbeat(addr: std::net::SocketAddr, name: &str, id: &str) -> HttpResponse {
    request(
        addr,
        "PUT",
        &format!("{SUBSYSTEMS}/{name}/{id}/heartbeat"),
        &[],
        b"",
    )
}

fn heartbeat_ttl_removes_silent_instances(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("ttl", Behaviour::Normal);
    let mut ws = WsClient::open(server.addr);
    ws.subscribe("relay.system");
    register(
        server.addr,
        &reg_with("tt", "a", &up.url(), &["/tt"], json!({"ttl_ms": 1000})),
    );
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "tt", "a").expect("listed")["ttl_ms"],
        1000,
        "{list}"
    );

    // Heartbeats keep it for longer than the TTL.
    for i in 0..15 {
        let r = heartbeat(server.addr, "tt", "a");
        assert_eq!(
            r.status, 204,
            "heartbeat {i} (every 100 ms, TTL 1000 ms): {r}"
        );
        assert!(r.body.is_empty(), "204 has no body: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        instance(&listing(server.addr), "tt", "a").is_some(),
        "an instance that heartbeats stays registered past its TTL"
    );

    // Silence: removed, with a subsystem.removed event.
    wait_listing(server.addr, "tt/a removed after its TTL", |l| {
        subsystem(l, "tt").is_none()
    });
    let v = ws_system_event(&mut ws, "subsystem.removed for tt/a", |v| {
        is_change(v, "subsystem.removed", "tt", "a")
    });
    assert!(
        v["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ttl")),
        "the removal says the TTL expired: {v}"
    );
    let r = server.get("/tt/x");
    assert_json_error(&r, 404, "the route of an expired instance is gone");

    assert_json_error(
        &heartbeat(server.addr, "tt", "a"),
        404,
        "heartbeat of an expired instance",
    );
    assert_json_error(
        &heartbeat(server.addr, "nope", "x"),
        404,
        "heartbeat of an unknown instance",
    );
}

fn deregistration_drains_in_flight_requests_first(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start("held", Behaviour::Gate);
    let mut events = SseStream::open(server.addr, SYSTEM_STREAM, None);
    wait_subscribers(server.addr, &[("relay.system", 1)]);
    register(server.addr, &reg("dr", "a", &up.url(), &["/dr"]));

    let addr = server.addr;
    let in_flight = std::thread::spawn(move || request(addr, "GET", "/dr/op", &[], b""));
    assert!(
        up.wait_requests(1, Duration::from_secs(5)),
        "the request never reached the upstream"
    );
    let list = listing(server.addr);
    assert_eq!(
        instance(&list, "dr", "a").expect("listed")["in_flight"],
        1,
        "{list}"
    );

    let (tx, rx) = mpsc::channel();
    let deleter = std::thread::spawn(move || {
        let r = request(addr, "DELETE", &format!("{SUBSYSTEMS}/dr/a"), &[], b"");
        let _ = tx.send(());
        r
    });
    wait_status(server.addr, "dr", "a", "draining");
    sse_system_event(&mut events, "subsystem.draining for dr/a", |v| {
        is_change(v, "subsystem.draining", "dr", "a")
    });
    // No new request goes to a draining instance.
    let r = server.get("/dr/new");
    assert_json_error(&r, 502, "GET while the only instance drains");
    assert_eq!(up.count(), 1, "a draining instance takes no new requests");
    assert!(
        rx.try_recv().is_err(),
        "DELETE answered while a request was still in flight at the instance"
    );

    up.open_gate();
    let r = in_flight.join().expect("in-flight thread");
    assert_eq!(r.status, 200, "the in-flight request completes: {r}");
    let d = deleter.join().expect("delete thread");
    assert_eq!(d.status, 204, "DELETE answers 204 once drained: {d}");
    assert_eq!(
        up.answered(),
        1,
        "DELETE returned only after the in-flight request had been answered"
    );
    let list = listing(server.addr);
    assert!(
        subsystem(&list, "dr").is_none(),
        "the drained instance is gone: {list}"
    );
    let v = sse_system_event(&mut events, "subsystem.removed for dr/a", |v| {
        is_change(v, "subsystem.removed", "dr", "a")
    });
    assert!(v["data"]["reason"].is_string(), "{v}");

    let r = request(
        server.addr,
        "DELETE",
        &format!("{SUBSYSTEMS}/dr/a"),
        &[],
        b"",
    );
    assert_json_error(&r, 404, "DELETE of an instance already gone");
}

// ---------------------------------------------------------------------------------------------
// Rate limits and API keys
// ---------------------------------------------------------------------------------------------

/// Sends `n`-th requests with `send` until a 429; asserts the first two pass with `ok` and the
/// third quick one is refused (unless the bucket had time to refill). Returns the 429.
fn until_limited(what: &str, ok: u16, mut send: impl FnMut() -> HttpResponse) -> HttpResponse {
    let t0 = Instant::now();
    for i in 0..2 {
        let r = send();
        assert_eq!(
            r.status, ok,
            "{what}: request {i} is within the burst of 2: {r}"
        );
    }
    let third_sent = t0.elapsed();
    let r = send();
    if r.status == 429 {
        return r;
    }
    assert!(
        third_sent >= Duration::from_millis(450),
        "{what}: the 3rd quick request (sent {third_sent:?} after the 1st; rate 2/s, burst 2) \
         should get 429, got {r}"
    );
    for _ in 0..10 {
        let r = send();
        if r.status == 429 {
            return r;
        }
    }
    panic!("{what}: never rate limited");
}

fn rate_limits_answer_429(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[rate_limit]\nproxy_per_s = 2\nproxy_burst = 2\npublish_per_s = 2\npublish_burst = 2\n",
    );
    let up = Upstream::start("rl", Behaviour::Normal);
    register(server.addr, &reg("rl", "a", &up.url(), &["/rl"]));

    let mut conn = Conn::open(server.addr);
    let r = until_limited("proxy", 200, || conn.roundtrip("GET", "/rl/x", &[], b""));
    assert_json_error(&r, 429, "proxied request over the limit");
    assert_eq!(json(&r)["error"]["code"], "rate_limited", "{r}");
    retry_after(&r, "proxy 429");
    let limited = up.count();
    assert!(limited >= 2, "the first two reached the upstream");
    let r = conn.roundtrip("GET", "/rl/x", &[("Authorization", "Bearer other")], b"");
    assert_eq!(
        r.status, 200,
        "a different client key (Bearer other) has its own bucket: {r}"
    );
    assert_eq!(up.count(), limited + 1);

    let mut pconn = Conn::open(server.addr);
    let ev = event_json("rl.chan", "rl.test", "{}");
    let r = until_limited("publish", 202, || pconn.publish(&ev));
    assert_json_error(&r, 429, "publish over the limit");
    retry_after(&r, "publish 429");
    let r = pconn.roundtrip(
        "POST",
        "/api/v1/relay/events",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer other"),
        ],
        ev.as_bytes(),
    );
    assert_eq!(r.status, 202, "another publisher key is not limited: {r}");

    let n = server.metric_sum("relay_rate_limited_total");
    assert!(
        n >= 2.0,
        "relay_rate_limited_total counts both 429s, got {n}"
    );
}

/// `[[rate_limit.routes]]` entries limit their own prefix or subsystem, and
/// `X-Forwarded-For` names the client only when the peer is a trusted proxy.
fn route_limits_and_trusted_proxies(driver: &str) {
    let config = |trusted: &str| {
        format!(
            "[rate_limit]\ntrusted_proxies = [\"{trusted}\"]\n\
             [[rate_limit.routes]]\nprefix = \"/rl/slow\"\nper_s = 2\nburst = 2\n\
             [[rate_limit.routes]]\nsubsystem = \"capped\"\nper_s = 2\nburst = 2\n"
        )
    };
    let server = Server::start_with_config(driver, &config("127.0.0.0/8"));
    let up = Upstream::start("rl", Behaviour::Normal);
    register(server.addr, &reg("rl", "a", &up.url(), &["/rl"]));
    register(server.addr, &reg("capped", "a", &up.url(), &["/capped"]));
    let mut conn = Conn::open(server.addr);

    for i in 0..6 {
        let r = conn.roundtrip("GET", "/rl/fast", &[], b"");
        assert_eq!(
            r.status, 200,
            "no limit outside the entries (request {i}): {r}"
        );
    }
    let r = until_limited("route prefix", 200, || {
        conn.roundtrip("GET", "/rl/slow/x", &[], b"")
    });
    assert_json_error(&r, 429, "over the /rl/slow limit");
    let r = conn.roundtrip("GET", "/rl/fast", &[], b"");
    assert_eq!(r.status, 200, "/rl/fast has its own (absent) limit: {r}");
    let r = until_limited("subsystem", 200, || {
        conn.roundtrip("GET", "/capped/x", &[], b"")
    });
    assert_json_error(&r, 429, "over the capped subsystem's limit");

    // Behind the trusted gateway (127.0.0.1), each forwarded client has its own bucket.
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    let r = conn.roundtrip("GET", "/rl/slow/x", &xff("203.0.113.7"), b"");
    assert_eq!(r.status, 200, "a forwarded client has its own bucket: {r}");
    let r = until_limited("forwarded client", 200, || {
        conn.roundtrip("GET", "/rl/slow/x", &xff("203.0.113.8"), b"")
    });
    assert_json_error(&r, 429, "a forwarded client over the limit");
    let forwarded = up
        .requests()
        .into_iter()
        .rev()
        .find(|q| q.target.starts_with("/rl/slow"))
        .expect("a forwarded request");
    assert_eq!(
        forwarded.header("x-forwarded-for"),
        Some("203.0.113.8, 127.0.0.1"),
        "the chain is appended to, not replaced"
    );

    // An untrusted peer cannot pick its key by writing the header.
    let server = Server::start_with_config(driver, &config("10.0.0.0/8"));
    register(server.addr, &reg("rl", "a", &up.url(), &["/rl"]));
    let mut conn = Conn::open(server.addr);
    let mut n = 0;
    let r = until_limited("untrusted peer", 200, || {
        n += 1;
        let ip = format!("198.51.100.{n}");
        conn.roundtrip(
            "GET",
            "/rl/slow/x",
            &[("X-Forwarded-For", ip.as_str())],
            b"",
        )
    });
    assert_json_error(&r, 429, "X-Forwarded-For from an untrusted peer is ignored");
}

fn api_keys_guard_the_registry_but_not_routes(driver: &str) {
    let server = Server::start_with_config(driver, "[auth]\napi_keys = [\"k1\"]\n");
    let up = Upstream::start("auth", Behaviour::Normal);
    let key = [("Authorization", "Bearer k1")];
    let body = reg("au", "a", &up.url(), &["/au"]);

    for (what, auth) in [
        ("no credentials", &[][..]),
        ("a wrong key", &[("Authorization", "Bearer nope")][..]),
    ] {
        let r = request(server.addr, "GET", SUBSYSTEMS, auth, b"");
        assert_json_error(&r, 401, &format!("GET {SUBSYSTEMS} with {what}"));
        let r = register_raw(server.addr, body.to_string().as_bytes(), auth);
        assert_json_error(&r, 401, &format!("POST {SUBSYSTEMS} with {what}"));
    }
    assert_eq!(
        listing_with(server.addr, &key)["subsystems"],
        json!([]),
        "refused registrations registered nothing"
    );
    let r = register_raw(server.addr, body.to_string().as_bytes(), &key);
    assert_eq!(r.status, 201, "registration with the key: {r}");

    let guarded = [
        ("GET", format!("{SUBSYSTEMS}/au")),
        ("PUT", format!("{SUBSYSTEMS}/au/a/heartbeat")),
        ("POST", format!("{SUBSYSTEMS}/au/a/circuit/reset")),
        ("DELETE", format!("{SUBSYSTEMS}/au/a")),
    ];
    for (method, path) in &guarded {
        let r = request(server.addr, method, path, &[], b"");
        assert_json_error(&r, 401, &format!("{method} {path} without the key"));
    }
    assert!(
        instance(&listing_with(server.addr, &key), "au", "a").is_some(),
        "an unauthenticated DELETE removed nothing"
    );
    let r = request(server.addr, "GET", &format!("{SUBSYSTEMS}/au"), &key, b"");
    assert_eq!(r.status, 200, "GET one subsystem with the key: {r}");
    let r = request(
        server.addr,
        "PUT",
        &format!("{SUBSYSTEMS}/au/a/heartbeat"),
        &key,
        b"",
    );
    assert_eq!(r.status, 204, "heartbeat with the key: {r}");

    // Proxied routes need no key; relay's open endpoints stay open.
    let r = server.get("/au/x");
    assert_eq!(r.status, 200, "a proxied route needs no API key: {r}");
    assert_eq!(up.count(), 1);
    let r = server.get("/api/v1/relay/health");
    assert_eq!(r.status, 200, "health is open: {r}");
}
