//! Black-box tests of authentication (API.md sections 7 and 10, "Auth scope"), once per I/O
//! driver: HS256 JWTs for WebSocket and SSE (`?token=` or `Authorization: Bearer`, `channels`
//! and `publish` claims, expiry), API keys for the publish and admin endpoints, the endpoints
//! that stay open, and open mode.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use common::ws::*;
use common::*;

both_drivers!(
    ws_and_sse_need_a_token,
    bad_tokens_are_401,
    token_in_query_or_bearer_header,
    channels_claim_limits_subscribing,
    publish_claim_limits_publishing,
    token_expiry_closes_with_1008,
    token_expiry_ends_a_backlogged_connection,
    token_expiry_ends_an_sse_stream,
    token_expiry_ends_a_backlogged_sse_stream,
    api_keys_guard_publish_and_admin,
    open_endpoints_stay_open,
    jwt_and_api_keys_are_separate,
    open_mode_needs_no_credentials,
    users_connected_counts_users_and_anonymous_connections,
);

const SECRET: &str = "test-secret";
const JWT_ONLY: &str = "[auth]\njwt_secret = \"test-secret\"\n";
const KEYS_ONLY: &str = "[auth]\napi_keys = [\"k1\"]\n";
const BOTH: &str = "[auth]\njwt_secret = \"test-secret\"\napi_keys = [\"k1\"]\n";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn sign_with(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a test token")
}

/// A valid token for `sub` (an hour left) with `extra` claims merged in.
fn token(sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": now_s() + 3600});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    sign_with(SECRET, &claims)
}

fn ws_path(token: &str) -> String {
    format!("{WS_PATH}?token={token}")
}

fn sse_path(channels: &[&str], token: Option<&str>) -> String {
    let mut q: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    if let Some(t) = token {
        q.push(format!("token={t}"));
    }
    format!("/api/v1/relay/events/stream?{}", q.join("&"))
}

/// A WebSocket upgrade that must be refused with `status` and a JSON error, before any upgrade.
fn ws_refused(server: &Server, path: &str, headers: &[(&str, &str)], status: u16, what: &str) {
    match WsClient::try_open(server.addr, path, headers) {
        Ok(_) => panic!("{what}: expected HTTP {status} before any upgrade, got 101"),
        Err(r) => {
            assert_json_error(&r, status, what);
        }
    }
}

/// An SSE request that must be refused with `status` and a JSON error.
fn sse_refused(server: &Server, path: &str, headers: &[(&str, &str)], status: u16, what: &str) {
    let mut c = Conn::open(server.addr);
    let mut h = vec![("Accept", "text/event-stream")];
    h.extend_from_slice(headers);
    let r = c.roundtrip("GET", path, &h, b"");
    assert_json_error(&r, status, what);
}

/// Status and content type of an SSE GET with `headers` (the stream, if any, is dropped).
fn sse_status(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = connect(server.addr);
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = std::io::Read::read(&mut s, &mut chunk)
            .unwrap_or_else(|e| panic!("SSE GET {path}: no response head: {e}"));
        assert!(n > 0, "SSE GET {path}: EOF before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let ct = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ct)
}

fn assert_stream(server: &Server, path: &str, headers: &[(&str, &str)], what: &str) {
    let (status, ct) = sse_status(server, path, headers);
    assert!(
        status == 200 && ct.starts_with("text/event-stream"),
        "{what}: expected 200 text/event-stream, got {status} {ct:?}"
    );
}

fn post_events(server: &Server, auth: Option<&str>, body: &str) -> HttpResponse {
    let mut h = vec![("Content-Type", "application/json")];
    let value;
    if let Some(a) = auth {
        value = a.to_string();
        h.push(("Authorization", &value));
    }
    request(
        server.addr,
        "POST",
        "/api/v1/relay/events",
        &h,
        body.as_bytes(),
    )
}

fn get_with(server: &Server, path: &str, auth: Option<&str>) -> HttpResponse {
    match auth {
        Some(a) => request(server.addr, "GET", path, &[("Authorization", a)], b""),
        None => request(server.addr, "GET", path, &[], b""),
    }
}

// ---------------------------------------------------------------------------------------------
// JWT for WebSocket and SSE
// ---------------------------------------------------------------------------------------------

fn ws_and_sse_need_a_token(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    ws_refused(&server, WS_PATH, &[], 401, "WebSocket without a token");
    sse_refused(
        &server,
        &sse_path(&["doc.1"], None),
        &[],
        401,
        "SSE without a token",
    );
    ws_refused(
        &server,
        &ws_path(""),
        &[],
        401,
        "WebSocket with an empty ?token=",
    );
    ws_refused(
        &server,
        WS_PATH,
        &[("Authorization", "Basic dXNlcjpwYXNz")],
        401,
        "WebSocket with Basic credentials instead of a bearer token",
    );
    // No key is needed to publish when only jwt_secret is set.
    let r = post_events(&server, None, &event_json("doc.1", "t", "1"));
    assert_eq!(
        r.status, 202,
        "with only auth.jwt_secret set, publishing over HTTP needs no key: {r}"
    );
}

fn bad_tokens_are_401(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    let now = now_s();
    let cases = [
        (
            sign_with("another-secret", &json!({"sub":"alice","exp":now + 3600})),
            "a token signed with another secret",
        ),
        (
            sign_with(SECRET, &json!({"sub":"alice","exp":now - 60})),
            "an expired token",
        ),
        (
            sign_with(SECRET, &json!({"exp":now + 3600})),
            "a token without sub",
        ),
        (
            sign_with(SECRET, &json!({"sub":"alice"})),
            "a token without exp",
        ),
        ("not.a.jwt".to_string(), "a malformed token"),
        (
            encode(
                &Header::new(Algorithm::HS512),
                &json!({"sub":"alice","exp":now + 3600}),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap(),
            "an HS512 token",
        ),
    ];
    for (t, what) in &cases {
        ws_refused(
            &server,
            &ws_path(t),
            &[],
            401,
            &format!("WebSocket with {what} in ?token="),
        );
        let bearer = format!("Bearer {t}");
        ws_refused(
            &server,
            WS_PATH,
            &[("Authorization", &bearer)],
            401,
            &format!("WebSocket with {what} as bearer"),
        );
        sse_refused(
            &server,
            &sse_path(&["doc.1"], Some(t)),
            &[],
            401,
            &format!("SSE with {what} in ?token="),
        );
        sse_refused(
            &server,
            &sse_path(&["doc.1"], None),
            &[("Authorization", &bearer)],
            401,
            &format!("SSE with {what} as bearer"),
        );
    }
    // The server is fine afterwards.
    let t = token("alice", json!({}));
    let mut c = WsClient::open_with(server.addr, &ws_path(&t), &[]);
    c.assert_alive("a valid token after the bad ones");
}

fn token_in_query_or_bearer_header(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    let t = token("alice", json!({}));
    let bearer = format!("Bearer {t}");

    let mut q = WsClient::open_with(server.addr, &ws_path(&t), &[]);
    let mut h = WsClient::open_with(server.addr, WS_PATH, &[("Authorization", &bearer)]);
    q.subscribe("any.1");
    h.subscribe("any.1");
    // The token's sub is the user presence lists.
    let p = q.call(json!({"op":"presence","channel":"any.1"}));
    let users: Vec<&str> = p["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members list: {p}"))
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert_eq!(
        users,
        vec!["alice", "alice"],
        "with a JWT the presence user is the token's sub: {p}"
    );

    assert_stream(
        &server,
        &sse_path(&["any.1"], Some(&t)),
        &[],
        "SSE with ?token=",
    );
    assert_stream(
        &server,
        &sse_path(&["any.1"], None),
        &[("Authorization", &bearer)],
        "SSE with Authorization: Bearer",
    );
    // Events flow to an authenticated SSE stream too.
    let mut s = SseStream::open(server.addr, &sse_path(&["any.2"], Some(&t)), None);
    wait_subscribers(server.addr, &[("any.2", 1)]);
    publish(server.addr, &event_json("any.2", "t", "1"));
    s.take(1, "an authenticated SSE stream");
}

fn channels_claim_limits_subscribing(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    let t = token("bob", json!({"channels": ["doc.*"]}));
    let mut c = WsClient::open_with(server.addr, &ws_path(&t), &[]);
    c.subscribe("doc.1");
    c.subscribe("doc.a.b");
    let v = c.call(json!({"op":"subscribe","channel":"chat.1","ref":"no"}));
    assert_eq!(
        v["op"], "error",
        "subscribe outside the channels claim: {v}"
    );
    assert_eq!(
        v["code"], "forbidden",
        "subscribe outside the channels claim: {v}"
    );
    assert_eq!(v["ref"], "no", "the error echoes the ref: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "the error says why: {v}"
    );
    c.assert_alive("after a forbidden subscribe");
    // The allowed subscription works.
    publish(server.addr, &event_json("doc.1", "t", "1"));
    publish(server.addr, &event_json("chat.1", "t", "1"));
    let (seq, _) = c.next_event("doc.1", "an event of the allowed channel");
    assert_eq!(seq, 1);

    assert_stream(
        &server,
        &sse_path(&["doc.1"], Some(&t)),
        &[],
        "SSE on doc.1 with channels [doc.*]",
    );
    sse_refused(
        &server,
        &sse_path(&["chat.1"], Some(&t)),
        &[],
        403,
        "SSE on chat.1 with channels [doc.*]",
    );
    sse_refused(
        &server,
        &sse_path(&["doc.1", "chat.1"], Some(&t)),
        &[],
        403,
        "SSE on doc.1 and chat.1 with channels [doc.*]",
    );
    // An empty channels claim allows nothing; an absent one allows everything.
    let none = token("carol", json!({"channels": []}));
    let mut c = WsClient::open_with(server.addr, &ws_path(&none), &[]);
    let v = c.call(json!({"op":"subscribe","channel":"doc.1"}));
    assert_eq!(v["code"], "forbidden", "channels [] allows no channel: {v}");
    let all = token("dave", json!({}));
    let mut c = WsClient::open_with(server.addr, &ws_path(&all), &[]);
    c.subscribe("chat.1");
    c.subscribe("doc.1");
}

fn publish_claim_limits_publishing(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    let reader = token("reader", json!({}));
    let mut c = WsClient::open_with(server.addr, &ws_path(&reader), &[]);
    c.subscribe("doc.1");
    let v = c.call(json!({"op":"publish","channel":"doc.1","type":"t","data":1,"ref":5}));
    assert_eq!(
        (v["op"].clone(), v["code"].clone(), v["ref"].clone()),
        (json!("error"), json!("forbidden"), json!(5)),
        "without a publish claim a WebSocket publish is forbidden: {v}"
    );

    let writer = token("writer", json!({"publish": ["doc.*"]}));
    let mut w = WsClient::open_with(server.addr, &ws_path(&writer), &[]);
    let v = w.call(
        json!({"op":"publish","channel":"doc.1","type":"t","data":{"by":"writer"},"ref":"w"}),
    );
    assert_eq!(v["op"], "published", "publish [doc.*] allows doc.1: {v}");
    assert_eq!(v["seq"], 1, "{v}");
    let v = w.call(json!({"op":"publish","channel":"chat.1","type":"t","data":1,"ref":"x"}));
    assert_eq!(
        (v["op"].clone(), v["code"].clone()),
        (json!("error"), json!("forbidden")),
        "publish [doc.*] does not allow chat.1: {v}"
    );
    // The allowed publish reached the subscriber; the forbidden one reached nobody.
    let (seq, ev) = c.next_event("doc.1", "the writer's event");
    assert_eq!(seq, 1);
    assert_eq!(ev["data"], json!({"by":"writer"}), "{ev}");
    let r = request(
        server.addr,
        "GET",
        "/api/v1/relay/channels/chat.1/history",
        &[],
        b"",
    );
    if r.status == 200 {
        assert_eq!(
            json(&r)["events"],
            json!([]),
            "a forbidden publish stores nothing: {r}"
        );
    }
}

/// A new connection with a fresh token is served: the server survived what came before.
fn assert_fresh_token_works(server: &Server, after: &str) {
    let t = token("eve", json!({}));
    let mut c = WsClient::open_with(server.addr, &ws_path(&t), &[]);
    c.assert_alive(&format!("a fresh token {after}"));
}

/// A token for "eve" with 2 to 3 seconds left (`exp` is whole seconds, rounded up).
fn token_expiring_in_2_to_3_s() -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let exp = (now_ms + 2000).div_ceil(1000);
    sign_with(SECRET, &json!({"sub":"eve","exp":exp}))
}

fn token_expiry_closes_with_1008(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    let t = token_expiring_in_2_to_3_s();
    let mut c = WsClient::try_open(server.addr, &ws_path(&t), &[])
        .unwrap_or_else(|r| panic!("a token valid for 2 more seconds should be accepted, got {r}"));
    c.welcome();
    let (code, reason) = c.expect_close(
        Duration::from_secs(10),
        "a connection whose token expires 2 s after connecting",
    );
    assert_eq!(
        code, 1008,
        "token expiry closes with 1008 policy violation, got {code} {reason:?}"
    );
    assert_fresh_token_works(&server, "after the expiry");
}

/// JWT on, and room for 16 MB queued for one client: its backlog is not a slow consumer.
fn server_for_a_backlog(driver: &str) -> Server {
    Server::start_with_config(
        driver,
        &format!(
            "{JWT_ONLY}[limits]\noutbound_queue_messages = 100000\n\
             outbound_queue_bytes = 67108864\n"
        ),
    )
}

/// A connection whose writer always has more queued (a client far behind) never goes quiet:
/// its token's expiry is checked between its writes, not only once it has caught up.
fn token_expiry_ends_a_backlogged_connection(driver: &str) {
    let server = server_for_a_backlog(driver);
    let t = token_expiring_in_2_to_3_s();
    let mut c = slow_subscriber(server.addr, &ws_path(&t), "late.c");
    // 8000 events of 2 KB (16 MB) while the client does not read: a backlog several times what
    // the kernel buffers between relay and the client hold (up to 4 MB here).
    publish_2kb_events(server.addr, "late.c", 8000);
    // Read an event a millisecond (8 s or more for all of them): the token expires 2-3 s after
    // it was made, with more than half of the backlog still queued in relay.
    let mut events = 0u64;
    let ended = loop {
        match c.next_frame(Duration::from_secs(10)) {
            Ok(f) if f.opcode == OP_TEXT => {
                events += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(f) if f.opcode == OP_CLOSE => break Some(f.close_code()),
            Ok(f) => panic!("reading the backlog: unexpected frame {f:?} after {events} events"),
            Err(WsReadError::Timeout) => {
                panic!("reading the backlog: nothing for 10 s after {events} events")
            }
            // The queue did not drain within the close's linger: cut without a close frame.
            Err(_) => break None,
        }
    };
    assert!(
        events < 8000,
        "the token expired 2-3 s into an 8 s backlog: the connection should end before the \
         backlog does, but all 8000 events came first (then {ended:?})"
    );
    if let Some((code, reason)) = ended {
        assert_eq!(
            code, 1008,
            "token expiry closes with 1008, got {code} {reason:?}"
        );
    }
    assert_fresh_token_works(&server, "after a backlogged connection's token expired");
}

fn token_expiry_ends_an_sse_stream(driver: &str) {
    let server = Server::start_with_config(driver, JWT_ONLY);
    let t = token_expiring_in_2_to_3_s();
    let mut s = SseStream::open(server.addr, &sse_path(&["late.q"], Some(&t)), None);
    let got = s.next_event(Duration::from_secs(10));
    assert!(
        got.is_none() && s.eof,
        "a quiet stream whose token expires 2-3 s after opening should end by then; got {got:?}, \
         ended: {}",
        s.eof
    );
    assert_fresh_token_works(&server, "after an SSE stream's token expired");
}

/// The SSE twin of `token_expiry_ends_a_backlogged_connection`: a stream whose writer always
/// has more queued ends at its token's expiry, not once it has caught up.
fn token_expiry_ends_a_backlogged_sse_stream(driver: &str) {
    let server = server_for_a_backlog(driver);
    let t = token_expiring_in_2_to_3_s();
    let path = sse_path(&["late.s"], Some(&t));
    let mut s = SseStream::try_open_on(small_rcvbuf_stream(server.addr), &path, None)
        .unwrap_or_else(|r| panic!("SSE with a token valid for 2 more seconds: {r}"));
    wait_subscribers(server.addr, &[("late.s", 1)]);
    // 8000 events of 2 KB (16 MB) while the client does not read, then an event a millisecond
    // (8 s or more for all of them): the token expires with most of the backlog still queued.
    publish_2kb_events(server.addr, "late.s", 8000);
    let mut events = 0u64;
    while s.next_event(Duration::from_secs(10)).is_some() {
        events += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        s.eof,
        "reading the backlog: nothing for 10 s after {events} events"
    );
    assert!(
        events < 8000,
        "the token expired 2-3 s into an 8 s backlog: the stream should end before the \
         backlog does, but all 8000 events came first"
    );
    assert_fresh_token_works(&server, "after a backlogged SSE stream's token expired");
}

// ---------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------

fn api_keys_guard_publish_and_admin(driver: &str) {
    let server = Server::start_with_config(driver, KEYS_ONLY);
    let body = event_json("doc.1", "t", "1");
    let r = post_events(&server, None, &body);
    assert_json_error(&r, 401, "POST /events without a key");
    let r = post_events(&server, Some("Bearer k2"), &body);
    assert_json_error(&r, 401, "POST /events with a wrong key");
    let r = post_events(&server, Some("Bearer k11"), &body);
    assert_json_error(
        &r,
        401,
        "POST /events with a key that merely starts with k1",
    );
    let r = post_events(&server, Some("Basic k1"), &body);
    assert_json_error(&r, 401, "POST /events with the key under another scheme");
    let r = post_events(&server, Some("Bearer k1"), &body);
    assert_eq!(r.status, 202, "POST /events with the right key: {r}");

    for path in [
        "/api/v1/relay/channels",
        "/api/v1/relay/connections",
        "/api/v1/relay/channels/doc.1/history",
        "/api/v1/relay/channels/doc.1/presence",
    ] {
        let r = get_with(&server, path, None);
        assert_json_error(&r, 401, &format!("GET {path} without a key"));
        let r = get_with(&server, path, Some("Bearer nope"));
        assert_json_error(&r, 401, &format!("GET {path} with a wrong key"));
        let r = get_with(&server, path, Some("Bearer k1"));
        assert_eq!(r.status, 200, "GET {path} with the right key: {r}");
    }
    // WebSocket and SSE use the JWT, which is not configured: open.
    let mut c = WsClient::open(server.addr);
    c.subscribe("doc.2");
    let v = c.call(json!({"op":"publish","channel":"doc.2","type":"t","data":1}));
    assert_eq!(
        v["op"], "published",
        "without a jwt_secret the WebSocket is open, publish included: {v}"
    );
    assert_stream(
        &server,
        &sse_path(&["doc.2"], None),
        &[],
        "SSE with only api_keys set",
    );
}

fn open_endpoints_stay_open(driver: &str) {
    let server = Server::start_with_config(driver, BOTH);
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/relay/health",
        "/api/v1/relay/metrics",
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = get_with(&server, path, None);
            assert_ne!(r.status, 401, "GET {path} must not need credentials: {r}");
            assert_ne!(r.status, 403, "GET {path} must not need credentials: {r}");
            if r.status == 200 {
                break;
            }
            // /readyz may be 503 for a moment while shards start.
            assert!(
                std::time::Instant::now() < deadline,
                "GET {path} without credentials: expected 200, got {r}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn jwt_and_api_keys_are_separate(driver: &str) {
    let server = Server::start_with_config(driver, BOTH);
    let t = token("alice", json!({"publish":["doc.*"]}));
    // An API key is not a JWT: no WebSocket with it.
    ws_refused(
        &server,
        WS_PATH,
        &[("Authorization", "Bearer k1")],
        401,
        "WebSocket with an API key instead of a JWT",
    );
    // A JWT is not an API key: no HTTP publish with it.
    let r = post_events(
        &server,
        Some(&format!("Bearer {t}")),
        &event_json("doc.1", "t", "1"),
    );
    assert_json_error(&r, 401, "POST /events with a JWT instead of an API key");
    let r = post_events(&server, Some("Bearer k1"), &event_json("doc.1", "t", "1"));
    assert_eq!(r.status, 202, "POST /events with the API key: {r}");
    let mut c = WsClient::open_with(server.addr, &ws_path(&t), &[]);
    c.subscribe("doc.1");
    let v = c.call(json!({"op":"publish","channel":"doc.1","type":"t","data":2}));
    assert_eq!(
        v["op"], "published",
        "a WebSocket publish needs the JWT's publish claim, not an API key: {v}"
    );
    assert_eq!(v["seq"], 2, "{v}");
    assert!(
        !server
            .stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.to_ascii_lowercase().contains("auth is off")),
        "with both jwt_secret and api_keys set the relay does not warn that auth is off:\n{}",
        server.stderr()
    );
}

fn open_mode_needs_no_credentials(driver: &str) {
    let server = Server::start(driver, &[]);
    assert!(
        server
            .stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.to_ascii_lowercase().contains("auth")),
        "with neither jwt_secret nor api_keys the relay says loudly (a WARN line about auth) \
         that it runs open; stderr:\n{}",
        server.stderr()
    );
    let mut c = WsClient::open(server.addr);
    let me = c.conn_id();
    c.subscribe("open.1");
    let v = c.call(json!({"op":"publish","channel":"open.1","type":"t","data":1}));
    assert_eq!(
        v["op"], "published",
        "open mode: WebSocket publish works: {v}"
    );
    c.next_event("open.1", "open mode: the published event");
    let p = c.call(json!({"op":"presence","channel":"open.1"}));
    assert_eq!(
        p["members"][0]["user"], me,
        "without a JWT the connection is its own user: {p}"
    );
    // A token is ignored when no secret is configured, even a bad one.
    let mut c2 = WsClient::open_with(server.addr, &ws_path("garbage"), &[]);
    c2.assert_alive("open mode with an ignored ?token=");
    assert_stream(&server, &sse_path(&["open.1"], None), &[], "open mode SSE");
    let r = post_events(&server, None, &event_json("open.1", "t", "2"));
    assert_eq!(r.status, 202, "open mode: POST /events needs no key: {r}");
    for path in ["/api/v1/relay/channels", "/api/v1/relay/connections"] {
        let r = get_with(&server, path, None);
        assert_eq!(r.status, 200, "open mode: GET {path} needs no key: {r}");
    }
}

/// Waits until `relay_users_connected` reads `want`.
fn wait_users(server: &Server, want: f64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let users = server.metric_sum("relay_users_connected");
        if users == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: relay_users_connected should be {want}, is {users}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn users_connected_counts_users_and_anonymous_connections(driver: &str) {
    // All on shard 0: a user with connections on two shards counts once per shard.
    let server = Server::start_with_config(driver, JWT_ONLY);
    let alice = ws_path(&token("alice", json!({})));
    let a1 = WsClient::open_on_shard(server.addr, 0, &alice, &[]);
    let a2 = WsClient::open_on_shard(server.addr, 0, &alice, &[]);
    let bob = WsClient::open_on_shard(server.addr, 0, &ws_path(&token("bob", json!({}))), &[]);
    wait_users(&server, 2.0, "alice twice and bob");
    drop(bob);
    wait_users(&server, 1.0, "alice twice, bob gone");
    drop(a1);
    wait_users(&server, 1.0, "alice once");
    drop(a2);
    wait_users(&server, 0.0, "nobody");

    // Without a JWT every connection is its own user.
    let open = Server::start(driver, &[]);
    let c1 = WsClient::open_on_shard(open.addr, 0, WS_PATH, &[]);
    let _c2 = WsClient::open_on_shard(open.addr, 0, WS_PATH, &[]);
    wait_users(&open, 2.0, "two connections without a JWT");
    drop(c1);
    wait_users(&open, 1.0, "one left");
}
