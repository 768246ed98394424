//! Black-box tests of the WebSocket endpoint (API.md sections 3 and 10), once per I/O driver:
//! the JSON protocol and its replies, recovery, fan-out across shards, presence, RFC 6455
//! protocol violations, bad upgrades, keepalive and idle timeout, the slow-consumer policies,
//! connection limits and the 1001 close on drain.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::ws::*;
use common::*;

both_drivers!(
    welcome_on_open,
    ops_and_their_replies,
    unsubscribe_stops_events,
    ref_is_echoed_exactly_on_replies_and_errors,
    errors_keep_the_connection_usable,
    subscription_limit,
    recovery_is_exact,
    recovery_when_history_no_longer_reaches,
    recovery_with_a_wrong_epoch,
    fan_out_to_twenty_subscribers_on_both_shards,
    presence_across_shards,
    join_leave_pushes,
    unmasked_frame_closes_1002,
    rsv_bit_closes_1002,
    reserved_opcode_closes_1002,
    continuation_without_a_message_closes_1002,
    invalid_utf8_closes_1007,
    frame_over_the_limit_closes_1009,
    fragmented_message_over_the_limit_closes_1009,
    frame_at_the_limit_is_accepted,
    messages_past_one_receive_buffer_are_all_read,
    pipelined_publishes_are_answered_in_order,
    binary_frame_closes_1003,
    fragmented_text_is_one_message,
    ping_frame_gets_a_pong_with_the_same_payload,
    client_close_is_echoed,
    bad_upgrades,
    server_pings_a_quiet_connection,
    a_listener_on_a_busy_channel_is_pinged_and_kept,
    a_backlogged_writer_pings_between_its_writes,
    idle_connection_is_closed,
    idle_sides_park_and_wake,
    slow_consumer_is_closed_with_1013,
    slow_consumer_drop_oldest_sends_gap,
    resubscribing_without_reading_is_a_slow_consumer,
    stalled_reader_catches_up_intact,
    per_ip_connection_limit,
    max_connections_limit,
    sigterm_sends_1001_and_exits_zero,
);

const BOUND: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Asserts an error reply: op, code, optional ref (exactly; `None` = no `ref` key), message.
fn assert_error(v: &Value, code: &str, reference: Option<Value>, what: &str) {
    assert_eq!(v["op"], "error", "{what}: expected an error reply, got {v}");
    assert_eq!(
        v["code"], code,
        "{what}: expected error code {code:?}, got {v}"
    );
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: an error says what was wrong (non-empty message): {v}"
    );
    match reference {
        Some(r) => assert_eq!(v["ref"], r, "{what}: the error should echo ref {r}: {v}"),
        None => assert!(
            v.get("ref").is_none(),
            "{what}: the error should carry no ref: {v}"
        ),
    }
}

/// Nothing more arrives within a short grace period (no duplicates, no extras).
fn assert_quiet(c: &mut WsClient, what: &str) {
    if let Ok(v) = c.try_next_json(GRACE) {
        panic!("{what}: no further message expected, got {v}");
    }
}

/// Publishes `n` events on `channel` over HTTP (batches of up to 50), data `{"i":first+k}`.
fn publish_range(server: &Server, channel: &str, first: u64, n: u64) {
    let mut conn = Conn::open(server.addr);
    let mut i = first;
    while i < first + n {
        let end = (i + 50).min(first + n);
        let items: Vec<String> = (i..end)
            .map(|k| event_json(channel, "t.ev", &format!("{{\"i\":{k}}}")))
            .collect();
        let r = conn.publish(&format!("[{}]", items.join(",")));
        assert_eq!(r.status, 202, "publish to {channel}: {r}");
        i = end;
    }
}

/// Reads `n` events of `channel` and asserts their seqs are `first_seq..first_seq+n`, in order.
fn expect_seqs(c: &mut WsClient, channel: &str, first_seq: u64, n: u64, what: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for k in 0..n {
        let want = first_seq + k;
        let (seq, ev) = c.next_event(channel, &format!("{what}: event seq {want}"));
        assert_eq!(
            seq, want,
            "{what}: events must come in order without loss: {ev}"
        );
        out.push(ev);
    }
    out
}

/// Members of `channel` as the HTTP presence endpoint lists them: (user, conn) pairs.
fn http_members(server: &Server, channel: &str) -> BTreeSet<(String, String)> {
    let r = server.get(&format!(
        "/api/v1/relay/channels/{}/presence",
        percent_encode(channel)
    ));
    assert_eq!(r.status, 200, "GET presence of {channel}: {r}");
    let v = json(&r);
    assert_eq!(v["channel"], channel, "presence names the channel: {v}");
    members_of(&v, "HTTP presence")
}

fn members_of(v: &Value, what: &str) -> BTreeSet<(String, String)> {
    let list = v["members"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: members should be a list: {v}"));
    list.iter()
        .map(|m| {
            assert!(
                m["since"].is_u64(),
                "{what}: each member has a numeric since: {v}"
            );
            (
                m["user"].as_str().unwrap_or_default().to_string(),
                m["conn"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Reads messages until one matches `pred`; returns everything read, the match last.
fn read_until(c: &mut WsClient, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    for _ in 0..100_000 {
        let v = c.try_next_json(READ_TIMEOUT).unwrap_or_else(|e| {
            panic!("{what}: the awaited message did not come ({e}); before it: {seen:?}")
        });
        let done = pred(&v);
        seen.push(v);
        if done {
            return seen;
        }
    }
    panic!("{what}: 100000 messages without the awaited one");
}

/// A fresh connection still gets a pong: the server survived what came before.
fn assert_serving(server: &Server, after: &str) {
    let mut c = WsClient::open(server.addr);
    c.assert_alive(&format!("a new connection after {after}"));
    let r = server.get("/healthz");
    assert_eq!(r.status, 200, "/healthz after {after}: {r}");
}

/// Sends `bytes` on a fresh connection and expects a close frame with `code`, then EOF.
fn violation(server: &Server, what: &str, bytes: &[u8], code: u16) {
    let mut c = WsClient::open(server.addr);
    c.assert_alive(&format!("{what}: before the violation"));
    // The server may close before it has read everything; a failed write is fine.
    let _ = c.try_send_raw(bytes);
    let (got, reason) = c.expect_close(READ_TIMEOUT, what);
    assert_eq!(
        got, code,
        "{what}: expected close code {code}, got {got} ({reason:?})"
    );
    assert!(
        c.eof_within(BOUND),
        "{what}: after its close frame the server should end the TCP connection"
    );
    assert_serving(server, what);
}

fn masked(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(fin, rsv, opcode, payload, Some(next_mask()))
}

/// At most 200 characters of `v`, for failure messages.
fn short(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

/// The non-zero `relay_ws_closes_total{code}` samples, for failure messages (waits up to 3 s
/// for a closing connection to be counted).
fn closes_by_code(server: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = server.get("/metrics").text();
        let nonzero: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("relay_ws_closes_total{") && !l.ends_with(" 0"))
            .collect();
        if !nonzero.is_empty() || Instant::now() >= deadline {
            return format!("[{}]", nonzero.join(", "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Publishes 2 KB events on `channel` in batches of 50 until `relay_slow_consumer_drops_total`
/// is above 0 (at most `cap` events); returns how many were published.
fn publish_until_drops(server: &Server, channel: &str, cap: u64) -> u64 {
    let data = format!("\"{}\"", "x".repeat(2000));
    let mut conn = Conn::open(server.addr);
    let mut published = 0;
    while published < cap {
        let batch: Vec<String> = (0..50).map(|_| event_json(channel, "big", &data)).collect();
        let r = conn.publish(&format!("[{}]", batch.join(",")));
        assert_eq!(
            r.status, 202,
            "publishing to a channel with a stalled WebSocket subscriber should still work: {r}"
        );
        published += 50;
        if server.metric_sum("relay_slow_consumer_drops_total") > 0.0 {
            break;
        }
    }
    published
}

// ---------------------------------------------------------------------------------------------
// The JSON protocol
// ---------------------------------------------------------------------------------------------

fn welcome_on_open(driver: &str) {
    let server = Server::start_with_config(driver, "[websocket]\nheartbeat_ms = 7000\n");
    let mut c = WsClient::try_open(server.addr, WS_PATH, &[])
        .unwrap_or_else(|r| panic!("expected 101 Switching Protocols, got {r}"));
    assert_eq!(
        c.headers.get("sec-websocket-accept").map(String::as_str),
        Some(EXPECTED_ACCEPT),
        "the 101 carries the RFC 6455 accept key: {:?}",
        c.headers
    );
    assert!(
        c.headers
            .get("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "the 101 carries Upgrade: websocket: {:?}",
        c.headers
    );
    assert!(
        matches!(c.shard, Some(0 | 1)),
        "the 101 carries X-Relay-Shard 0 or 1 (2 shards): {:?}",
        c.headers
    );
    let w = c.welcome();
    assert_eq!(w["op"], "welcome", "{w}");
    let conn = w["conn"].as_str().unwrap_or_default().to_string();
    assert!(!conn.is_empty(), "welcome.conn is a non-empty string: {w}");
    assert_eq!(
        w["heartbeat_ms"], 7000,
        "welcome.heartbeat_ms is [websocket] heartbeat_ms: {w}"
    );
    let mut other = WsClient::open(server.addr);
    assert_ne!(
        other.conn_id(),
        conn,
        "two connections have different conn ids"
    );
    c.assert_alive("after the welcome");
}

fn ops_and_their_replies(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut a = WsClient::open(server.addr);
    let me = a.conn_id();

    // subscribe
    let sub = a.call(json!({"op":"subscribe","channel":"ops.a","ref":"s-1"}));
    assert_eq!(sub["op"], "subscribed", "{sub}");
    assert_eq!(sub["ref"], "s-1", "subscribed echoes the ref: {sub}");
    assert_eq!(sub["channel"], "ops.a", "{sub}");
    let epoch = sub["epoch"].as_str().unwrap_or_default().to_string();
    assert!(!epoch.is_empty(), "subscribed carries an epoch: {sub}");
    assert_eq!(sub["seq"], 0, "a channel without events has seq 0: {sub}");
    assert_eq!(
        sub["recovered"], false,
        "a subscribe without since is not a recovery: {sub}"
    );

    // publish -> published, and the event to the subscriber
    let p = a.call(
        json!({"op":"publish","channel":"ops.a","type":"note.added","data":{"k":[1,2]},"ref":7}),
    );
    assert_eq!(p["op"], "published", "{p}");
    assert_eq!(p["ref"], 7, "published echoes the ref: {p}");
    assert_eq!(p["channel"], "ops.a", "{p}");
    assert_eq!(p["seq"], 1, "the first event of a channel has seq 1: {p}");
    assert_eq!(p["duplicate"], false, "{p}");
    let id = p["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "published carries the event id: {p}");
    let (seq, ev) = a.next_event("ops.a", "the published event");
    assert_eq!(seq, 1);
    assert_eq!(ev["type"], "note.added", "{ev}");
    assert_eq!(ev["data"], json!({"k":[1,2]}), "{ev}");
    assert_eq!(
        ev["id"],
        id.as_str(),
        "the event has the id published said: {ev}"
    );
    assert_eq!(
        ev["epoch"],
        epoch.as_str(),
        "the event has the channel's epoch: {ev}"
    );

    // idempotent publish with a publisher id
    let p1 = a.call(
        json!({"op":"publish","channel":"ops.a","type":"t","data":"first","id":"evt-1","ref":"i1"}),
    );
    assert_eq!(
        (
            p1["op"].clone(),
            p1["seq"].clone(),
            p1["id"].clone(),
            p1["duplicate"].clone()
        ),
        (json!("published"), json!(2), json!("evt-1"), json!(false)),
        "first publish of id evt-1: {p1}"
    );
    let p2 = a.call(json!({"op":"publish","channel":"ops.a","type":"t","data":"second","id":"evt-1","ref":"i2"}));
    assert_eq!(
        (
            p2["op"].clone(),
            p2["ref"].clone(),
            p2["seq"].clone(),
            p2["id"].clone(),
            p2["duplicate"].clone()
        ),
        (
            json!("published"),
            json!("i2"),
            json!(2),
            json!("evt-1"),
            json!(true)
        ),
        "a second publish of id evt-1 is a duplicate with the original's seq and id: {p2}"
    );
    let (seq, ev) = a.next_event("ops.a", "the first evt-1");
    assert_eq!(seq, 2, "{ev}");
    assert_eq!(ev["data"], "first", "{ev}");
    publish(server.addr, &event_json("ops.a", "t", "\"marker\""));
    let (seq, ev) = a.next_event("ops.a", "the marker after the duplicate");
    assert_eq!(
        (seq, ev["data"].clone()),
        (3, json!("marker")),
        "the duplicate is delivered to nobody; next comes the marker: {ev}"
    );

    // presence
    let pr = a.call(json!({"op":"presence","channel":"ops.a","ref":"p"}));
    assert_eq!(pr["op"], "presence", "{pr}");
    assert_eq!(pr["ref"], "p", "{pr}");
    assert_eq!(pr["channel"], "ops.a", "{pr}");
    assert_eq!(
        members_of(&pr, "presence op"),
        BTreeSet::from([(me.clone(), me.clone())]),
        "the only member is this connection, its own user without a JWT: {pr}"
    );

    // ping
    let pong = a.call(json!({"op":"ping","ref":"x"}));
    assert_eq!(pong, json!({"op":"pong","ref":"x"}), "ping -> pong");
    let pong = a.call(json!({"op":"ping"}));
    assert_eq!(
        pong,
        json!({"op":"pong"}),
        "ping without ref -> pong without ref"
    );

    // unsubscribe
    let u = a.call(json!({"op":"unsubscribe","channel":"ops.a","ref":9}));
    assert_eq!(
        u,
        json!({"op":"unsubscribed","ref":9,"channel":"ops.a"}),
        "unsubscribe reply"
    );
    assert_quiet(&mut a, "after the unsubscribe");
}

fn unsubscribe_stops_events(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut clients = WsClient::open_on_both_shards(server.addr, 1);
    let (mut a, mut b) = {
        let b = clients.pop().unwrap();
        (clients.pop().unwrap(), b)
    };
    a.subscribe("uns.c");
    b.subscribe("uns.c");
    wait_subscribers(server.addr, &[("uns.c", 2)]);
    publish_range(&server, "uns.c", 0, 3);
    expect_seqs(&mut a, "uns.c", 1, 3, "a before unsubscribing");
    expect_seqs(&mut b, "uns.c", 1, 3, "b");

    let u = a.call(json!({"op":"unsubscribe","channel":"uns.c"}));
    assert_eq!(u, json!({"op":"unsubscribed","channel":"uns.c"}), "{u}");
    wait_subscribers(server.addr, &[("uns.c", 1)]);
    publish_range(&server, "uns.c", 3, 5);
    expect_seqs(&mut b, "uns.c", 4, 5, "b, still subscribed");
    a.assert_alive("a after unsubscribing");
    assert_quiet(
        &mut a,
        "a unsubscribed from uns.c gets no more of its events",
    );

    // Subscribing again: live events only, from the next one.
    let again = a.subscribe("uns.c");
    assert_eq!(again["seq"], 8, "subscribed.seq is the last seq: {again}");
    publish_range(&server, "uns.c", 8, 1);
    expect_seqs(&mut a, "uns.c", 9, 1, "a subscribed again");
    assert_quiet(&mut a, "a subscribed again: nothing replayed");
}

fn ref_is_echoed_exactly_on_replies_and_errors(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = WsClient::open(server.addr);
    // String and number refs on replies and errors, compared as raw text.
    let cases: &[(&str, &str, &str)] = &[
        (r#"{"op":"ping","ref":"abc"}"#, r#""ref":"abc""#, "pong"),
        (r#"{"op":"ping","ref":42}"#, r#""ref":42"#, "pong"),
        (r#"{"op":"ping","ref":-1.50e3}"#, r#""ref":-1.50e3"#, "pong"),
        (
            r#"{"op":"ping","ref":"a\u0041\"q"}"#,
            r#""ref":"a\u0041\"q""#,
            "pong",
        ),
        (
            r#"{"ref":"u-1","op":"frobnicate"}"#,
            r#""ref":"u-1""#,
            "error",
        ),
        (r#"{"op":"frobnicate","ref":12}"#, r#""ref":12"#, "error"),
        (
            r#"{"op":"subscribe","ref":"no-chan"}"#,
            r#""ref":"no-chan""#,
            "error",
        ),
        (
            r#"{"op":"subscribe","channel":"x y","ref":3}"#,
            r#""ref":3"#,
            "error",
        ),
        (
            r#"{"op":"subscribe","channel":"ref.c","ref":"sub"}"#,
            r#""ref":"sub""#,
            "subscribed",
        ),
        (
            r#"{"op":"presence","channel":"ref.c","ref":0}"#,
            r#""ref":0"#,
            "presence",
        ),
        (
            r#"{"op":"publish","channel":"ref.c","type":"t","data":1,"ref":"pub"}"#,
            r#""ref":"pub""#,
            "published",
        ),
        (
            r#"{"op":"unsubscribe","channel":"ref.c","ref":1e2}"#,
            r#""ref":1e2"#,
            "unsubscribed",
        ),
        // An unknown field: not a valid request, but its ref still comes back.
        (
            r#"{"op":"ping","ref":"odd","bogus":true}"#,
            r#""ref":"odd""#,
            "error",
        ),
    ];
    for (request, want_ref, want_op) in cases {
        c.send_text(request);
        let text = loop {
            let t = c
                .try_next_text(READ_TIMEOUT)
                .unwrap_or_else(|e| panic!("{request}: expected a reply, but {e}"));
            let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t}: {e}"));
            if !is_push(&v) {
                break t;
            }
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["op"], *want_op, "{request}: reply op, got {text}");
        assert!(
            text.contains(want_ref),
            "{request}: the reply should echo the ref exactly as sent ({want_ref}), got {text}"
        );
    }
}

fn errors_keep_the_connection_usable(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = WsClient::open(server.addr);

    c.send_text("this is not json {");
    let v = c.next_json(READ_TIMEOUT, "error for a non-JSON text frame");
    assert_error(&v, "bad_request", None, "non-JSON text");
    c.assert_alive("after a non-JSON frame");

    c.send_text("");
    let v = c.next_json(READ_TIMEOUT, "error for an empty text frame");
    assert_error(&v, "bad_request", None, "empty text frame");
    c.assert_alive("after an empty frame");

    let v = c.call(json!({"op":"jump","ref":"u"}));
    assert_error(&v, "unknown_op", Some(json!("u")), "unknown op");

    let v = c.call(json!({"channel":"e.c","ref":"no-op"}));
    assert_eq!(v["op"], "error", "a message without op is an error: {v}");
    assert_eq!(
        v["code"], "bad_request",
        "a message without op is a bad request: {v}"
    );

    let v = c.call(json!({"op":"subscribe","ref":"nc"}));
    assert_error(
        &v,
        "bad_request",
        Some(json!("nc")),
        "subscribe without channel",
    );

    for (bad, why) in [
        ("has space", "a space"),
        ("", "empty"),
        ("a#b", "a '#'"),
        (&"c".repeat(256) as &str, "256 bytes"),
    ] {
        let v = c.call(json!({"op":"subscribe","channel":bad,"ref":"bad"}));
        assert_error(
            &v,
            "bad_request",
            Some(json!("bad")),
            &format!("subscribe to a channel name with {why}"),
        );
    }
    let ok = c.call(json!({"op":"subscribe","channel":"c".repeat(255),"ref":"max"}));
    assert_eq!(
        ok["op"], "subscribed",
        "a 255-byte channel name is valid: {ok}"
    );

    c.subscribe("e.c");
    let v = c.call(json!({"op":"subscribe","channel":"e.c","ref":"twice"}));
    assert_error(
        &v,
        "bad_request",
        Some(json!("twice")),
        "already subscribed",
    );

    let v = c.call(json!({"op":"unsubscribe","channel":"other.c","ref":"never"}));
    assert_error(
        &v,
        "bad_request",
        Some(json!("never")),
        "unsubscribe not subscribed",
    );

    let v = c.call(json!({"op":"publish","channel":"e.c","data":1,"ref":"nt"}));
    assert_error(&v, "bad_request", Some(json!("nt")), "publish without type");
    let v = c.call(json!({"op":"publish","channel":"e.c","type":"t","ref":"nd"}));
    assert_error(&v, "bad_request", Some(json!("nd")), "publish without data");
    let v = c.call(json!({"op":"publish","channel":"e.c","type":"bad type","data":1,"ref":"bt"}));
    assert_error(
        &v,
        "bad_request",
        Some(json!("bt")),
        "publish with a bad type",
    );

    // Still subscribed and working after all of that.
    publish(server.addr, &event_json("e.c", "t", "1"));
    let (seq, _) = c.next_event("e.c", "an event after the errors");
    assert_eq!(seq, 1);
    c.assert_alive("after every error");
}

fn subscription_limit(driver: &str) {
    let server =
        Server::start_with_config(driver, "[limits]\nmax_subscriptions_per_connection = 2\n");
    let mut c = WsClient::open(server.addr);
    c.subscribe("lim.a");
    c.subscribe("lim.b");
    let v = c.call(json!({"op":"subscribe","channel":"lim.c","ref":"third"}));
    assert_error(
        &v,
        "limit_exceeded",
        Some(json!("third")),
        "a third subscription with max_subscriptions_per_connection = 2",
    );
    let u = c.call(json!({"op":"unsubscribe","channel":"lim.a"}));
    assert_eq!(u["op"], "unsubscribed", "{u}");
    c.subscribe("lim.c");
    // A second connection has its own allowance.
    let mut d = WsClient::open(server.addr);
    d.subscribe("lim.a");
    d.subscribe("lim.b");
    publish(server.addr, &event_json("lim.c", "t", "1"));
    let (seq, _) = c.next_event("lim.c", "the subscription made after freeing a slot");
    assert_eq!(seq, 1);
}

// ---------------------------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------------------------

fn recovery_is_exact(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut a = WsClient::open(server.addr);
    let sub = a.subscribe("rec.c");
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    publish_range(&server, "rec.c", 0, 5);
    let got = expect_seqs(&mut a, "rec.c", 1, 5, "live before the disconnect");
    for ev in &got {
        assert_eq!(ev["epoch"], epoch.as_str(), "{ev}");
    }
    a.send_close(1000);
    a.expect_close(READ_TIMEOUT, "closing the first connection");
    drop(a);

    // Seven events while away.
    publish_range(&server, "rec.c", 5, 7);

    let mut b = WsClient::open(server.addr);
    let r = b.call(
        json!({"op":"subscribe","channel":"rec.c","since":{"epoch":epoch,"seq":5},"ref":"r"}),
    );
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(r["ref"], "r", "{r}");
    assert_eq!(
        r["recovered"], true,
        "history covers seq 6..=12: recovered: {r}"
    );
    assert_eq!(r["seq"], 12, "subscribed.seq is the last assigned seq: {r}");
    assert_eq!(r["epoch"], epoch.as_str(), "same epoch: {r}");
    let missed = expect_seqs(&mut b, "rec.c", 6, 7, "the missed events after since");
    for (k, ev) in missed.iter().enumerate() {
        assert_eq!(ev["data"], json!({"i": 5 + k}), "replayed data kept: {ev}");
    }
    // Then live.
    publish_range(&server, "rec.c", 12, 1);
    expect_seqs(&mut b, "rec.c", 13, 1, "live after the replay");
    assert_quiet(&mut b, "after recovery and one live event");

    // since == the last seq: recovered, nothing to replay.
    let mut c = WsClient::open(server.addr);
    let r = c.call(json!({"op":"subscribe","channel":"rec.c","since":{"epoch":epoch,"seq":13}}));
    assert_eq!(
        (r["recovered"].clone(), r["seq"].clone()),
        (json!(true), json!(13)),
        "since at the head: recovered with nothing missed: {r}"
    );
    publish_range(&server, "rec.c", 13, 1);
    expect_seqs(
        &mut c,
        "rec.c",
        14,
        1,
        "since at the head: the next live event only",
    );
    expect_seqs(&mut b, "rec.c", 14, 1, "b live");

    // since seq 0 of this epoch: everything in history.
    let mut d = WsClient::open(server.addr);
    let r = d.call(json!({"op":"subscribe","channel":"rec.c","since":{"epoch":epoch,"seq":0}}));
    assert_eq!(r["recovered"], true, "since 0 with all history kept: {r}");
    expect_seqs(&mut d, "rec.c", 1, 14, "since 0 replays seq 1..=14");
    assert_quiet(&mut d, "since 0: exactly the history");
}

fn recovery_when_history_no_longer_reaches(driver: &str) {
    let server = Server::start_with_config(driver, "[history]\nsize = 3\n");
    let mut a = WsClient::open(server.addr);
    let epoch = a.subscribe("old.c")["epoch"].as_str().unwrap().to_string();
    publish_range(&server, "old.c", 0, 2);
    expect_seqs(&mut a, "old.c", 1, 2, "before the disconnect");
    drop(a);
    publish_range(&server, "old.c", 2, 10); // seq 3..=12; history keeps 10..=12

    let mut b = WsClient::open(server.addr);
    let r = b.call(json!({"op":"subscribe","channel":"old.c","since":{"epoch":epoch,"seq":2}}));
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(
        r["recovered"], false,
        "history (size 3) no longer reaches back to seq 3: recovered false: {r}"
    );
    assert_eq!(r["seq"], 12, "{r}");
    publish_range(&server, "old.c", 12, 1);
    expect_seqs(
        &mut b,
        "old.c",
        13,
        1,
        "recovered:false replays nothing; the next message is the live seq 13",
    );

    // History (size 3) now keeps 11..=13. One short of the window: since 9 needs seq 10.
    let mut c = WsClient::open(server.addr);
    let r = c.call(json!({"op":"subscribe","channel":"old.c","since":{"epoch":epoch,"seq":9}}));
    assert_eq!(r["recovered"], false, "since 9 needs seq 10, gone: {r}");
    // Exactly the window: since 10 needs 11..=13, all kept.
    let mut d = WsClient::open(server.addr);
    let r = d.call(json!({"op":"subscribe","channel":"old.c","since":{"epoch":epoch,"seq":10}}));
    assert_eq!(
        r["recovered"], true,
        "since 10 needs 11..=13, all kept: {r}"
    );
    expect_seqs(&mut d, "old.c", 11, 3, "replay of the whole window");
    publish_range(&server, "old.c", 13, 1);
    expect_seqs(&mut c, "old.c", 14, 1, "c: live only");
    expect_seqs(&mut d, "old.c", 14, 1, "d: live after the replay");
    assert_quiet(&mut c, "c");
    assert_quiet(&mut d, "d");
}

fn recovery_with_a_wrong_epoch(driver: &str) {
    let server = Server::start(driver, &[]);
    publish_range(&server, "ep.c", 0, 4);
    let mut c = WsClient::open(server.addr);
    let r = c
        .call(json!({"op":"subscribe","channel":"ep.c","since":{"epoch":"not-the-epoch","seq":1}}));
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(
        r["recovered"], false,
        "a since from another epoch cannot be recovered: {r}"
    );
    assert_eq!(r["seq"], 4, "{r}");
    assert!(
        r["epoch"].as_str().is_some_and(|e| e != "not-the-epoch"),
        "the reply names the current epoch: {r}"
    );
    publish_range(&server, "ep.c", 4, 1);
    expect_seqs(
        &mut c,
        "ep.c",
        5,
        1,
        "wrong epoch: no replay, live seq 5 next",
    );
    assert_quiet(&mut c, "wrong epoch");
}

// ---------------------------------------------------------------------------------------------
// Fan-out and presence
// ---------------------------------------------------------------------------------------------

fn fan_out_to_twenty_subscribers_on_both_shards(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut clients = WsClient::open_on_both_shards(server.addr, 10);
    let shards: HashSet<_> = clients.iter().map(|c| c.shard).collect();
    assert!(
        shards.contains(&Some(0)) && shards.contains(&Some(1)),
        "subscribers on both shards: {shards:?}"
    );
    for c in clients.iter_mut() {
        c.subscribe("fan.ws");
    }
    wait_subscribers(server.addr, &[("fan.ws", 20)]);

    let mut conns = conns_on_both_shards(server.addr);
    for batch in 0..10u64 {
        let items: Vec<String> = (0..50)
            .map(|k| {
                event_json(
                    "fan.ws",
                    "fan.out",
                    &format!("{{\"i\":{}}}", batch * 50 + k),
                )
            })
            .collect();
        let r = conns[(batch % 2) as usize].publish(&format!("[{}]", items.join(",")));
        assert_eq!(r.status, 202, "batch {batch}: {r}");
    }
    for (n, c) in clients.iter_mut().enumerate() {
        let what = format!("subscriber {n} (shard {:?})", c.shard);
        let events = expect_seqs(c, "fan.ws", 1, 500, &what);
        for (k, ev) in events.iter().enumerate() {
            assert_eq!(ev["data"], json!({"i": k}), "{what}: data of seq {}", k + 1);
        }
        assert_quiet(c, &format!("{what}: exactly 500 events, no duplicates"));
    }
}

fn presence_across_shards(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut a = WsClient::open_on_shard(server.addr, 0, WS_PATH, &[]);
    let mut b = WsClient::open_on_shard(server.addr, 1, WS_PATH, &[]);
    let (ida, idb) = (a.conn_id(), b.conn_id());
    a.subscribe("pres.c");
    b.subscribe("pres.c");
    let both = BTreeSet::from([(ida.clone(), ida.clone()), (idb.clone(), idb.clone())]);

    let v = a.call(json!({"op":"presence","channel":"pres.c"}));
    assert_eq!(v["op"], "presence", "{v}");
    assert_eq!(
        members_of(&v, "presence op on shard 0"),
        both,
        "presence via the WS op lists both connections (shards 0 and 1): {v}"
    );
    let v = b.call(json!({"op":"presence","channel":"pres.c"}));
    assert_eq!(
        members_of(&v, "presence op on shard 1"),
        both,
        "presence asked on the other shard lists both too: {v}"
    );
    assert_eq!(
        http_members(&server, "pres.c"),
        both,
        "GET .../presence lists both"
    );

    // Abrupt disconnect: no close frame, just the TCP socket gone.
    let _ = b.stream.shutdown(std::net::Shutdown::Both);
    drop(b);
    let deadline = Instant::now() + BOUND;
    loop {
        let now = http_members(&server, "pres.c");
        if now == BTreeSet::from([(ida.clone(), ida.clone())]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after an abrupt disconnect the member should disappear within 10 s; presence still {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = a.call(json!({"op":"presence","channel":"pres.c"}));
    assert_eq!(
        members_of(&v, "presence op after the disconnect"),
        BTreeSet::from([(ida.clone(), ida.clone())]),
        "{v}"
    );
    // Presence is off-by-default pushes: nothing about b arrived at a.
    publish(server.addr, &event_json("pres.c", "t", "\"marker\""));
    let seen = read_until(&mut a, "the marker on pres.c", |v| v["op"] == "event");
    assert_eq!(
        seen.len(),
        1,
        "no presence pushes on a channel without join_leave: {seen:?}"
    );
    // A channel nobody is in has no members.
    assert!(http_members(&server, "nobody.here").is_empty());
}

fn join_leave_pushes(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[[channels]]\npattern = \"room.*\"\njoin_leave = true\n",
    );
    let mut a = WsClient::open_on_shard(server.addr, 0, WS_PATH, &[]);
    let mut b = WsClient::open_on_shard(server.addr, 1, WS_PATH, &[]);
    let (ida, idb) = (a.conn_id(), b.conn_id());
    let is_about = |v: &Value, op: &str, conn: &str| v["op"] == op && v["conn"] == conn;

    a.subscribe("room.1");
    b.subscribe("room.1");
    let seen = read_until(&mut a, "presence.join of b at a", |v| {
        is_about(v, "presence.join", &idb)
    });
    let join = seen.last().unwrap();
    assert_eq!(
        *join,
        json!({"op":"presence.join","channel":"room.1","user":idb,"conn":idb}),
        "the join push names channel, user and conn (no seq, not an event)"
    );
    for v in &seen[..seen.len() - 1] {
        assert!(
            is_about(v, "presence.join", &ida),
            "before b's join, a may only see its own join: {v}"
        );
    }

    // Leave by unsubscribe.
    let u = b.call(json!({"op":"unsubscribe","channel":"room.1"}));
    assert_eq!(u["op"], "unsubscribed", "{u}");
    let seen = read_until(&mut a, "presence.leave of b (unsubscribe)", |v| {
        is_about(v, "presence.leave", &idb)
    });
    assert_eq!(
        *seen.last().unwrap(),
        json!({"op":"presence.leave","channel":"room.1","user":idb,"conn":idb}),
        "the leave push"
    );

    // Join again, then an abrupt disconnect: a leave too.
    b.subscribe("room.1");
    read_until(&mut a, "presence.join of b again", |v| {
        is_about(v, "presence.join", &idb)
    });
    b.subscribe("quiet.1");
    a.subscribe("quiet.1");
    let _ = b.stream.shutdown(std::net::Shutdown::Both);
    drop(b);
    let seen = read_until(&mut a, "presence.leave of b (disconnect)", |v| {
        is_about(v, "presence.leave", &idb)
    });
    assert_eq!(seen.last().unwrap()["channel"], "room.1", "{seen:?}");

    // No pushes on quiet.1 (no join_leave for it), and presence pushes are not events:
    // nothing in history, nothing to SSE.
    publish(server.addr, &event_json("quiet.1", "t", "\"marker\""));
    let seen = read_until(&mut a, "the marker on quiet.1", |v| {
        v["op"] == "event" && v["channel"] == "quiet.1"
    });
    for v in &seen {
        assert!(
            v["channel"] != "quiet.1" || v["op"] == "event",
            "no presence pushes for a channel without join_leave: {v}"
        );
    }
    let r = server.get("/api/v1/relay/channels/room.1/history");
    if r.status == 200 {
        let h = json(&r);
        assert_eq!(
            h["events"],
            json!([]),
            "presence pushes are not in history: {h}"
        );
        assert_eq!(h["seq"], 0, "presence pushes take no seq: {h}");
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 6455 framing
// ---------------------------------------------------------------------------------------------

const FRAME_LIMIT: &str = "[limits]\nmax_frame_bytes = 1024\n";
const PING_OP: &[u8] = br#"{"op":"ping","ref":"p"}"#;

fn unmasked_frame_closes_1002(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    let frame = encode_frame(true, 0, OP_TEXT, PING_OP, None);
    violation(&server, "an unmasked client frame", &frame, 1002);
}

fn rsv_bit_closes_1002(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    for rsv in [4u8, 2, 1] {
        let frame = masked(true, rsv, OP_TEXT, PING_OP);
        violation(&server, &format!("RSV bits {rsv:03b} set"), &frame, 1002);
    }
}

fn reserved_opcode_closes_1002(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    violation(
        &server,
        "reserved data opcode 0x3",
        &masked(true, 0, 0x3, b"x"),
        1002,
    );
    violation(
        &server,
        "reserved control opcode 0xB",
        &masked(true, 0, 0xB, b""),
        1002,
    );
}

fn continuation_without_a_message_closes_1002(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    violation(
        &server,
        "a continuation frame with no message open",
        &masked(true, 0, OP_CONT, PING_OP),
        1002,
    );
    let mut bytes = masked(false, 0, OP_TEXT, b"{\"op\":");
    bytes.extend(masked(true, 0, OP_TEXT, PING_OP));
    violation(
        &server,
        "a new text frame while a fragmented message is open",
        &bytes,
        1002,
    );
    violation(
        &server,
        "a fragmented control frame (ping without FIN)",
        &masked(false, 0, OP_PING, b"x"),
        1002,
    );
}

fn invalid_utf8_closes_1007(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    violation(
        &server,
        "a text frame with invalid UTF-8",
        &masked(true, 0, OP_TEXT, b"{\"op\":\"ping\",\"ref\":\"\xff\xfe\"}"),
        1007,
    );
    let mut bytes = masked(false, 0, OP_TEXT, b"{\"op\":\"ping\",");
    bytes.extend(masked(true, 0, OP_CONT, b"\"ref\":\"\xc3\x28\"}"));
    violation(
        &server,
        "a fragmented text with invalid UTF-8",
        &bytes,
        1007,
    );
}

fn frame_over_the_limit_closes_1009(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    let mut text = br#"{"op":"ping","ref":""#.to_vec();
    text.extend(std::iter::repeat_n(b'x', 1100));
    text.extend_from_slice(br#""}"#);
    violation(
        &server,
        "a 1100+ byte text frame with max_frame_bytes = 1024",
        &masked(true, 0, OP_TEXT, &text),
        1009,
    );
}

fn fragmented_message_over_the_limit_closes_1009(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    let mut bytes = masked(false, 0, OP_TEXT, br#"{"op":"ping","ref":""#);
    bytes.extend(masked(false, 0, OP_CONT, &[b'x'; 600]));
    bytes.extend(masked(false, 0, OP_CONT, &[b'y'; 600]));
    bytes.extend(masked(true, 0, OP_CONT, br#"z"}"#));
    violation(
        &server,
        "a message of 4 fragments (each under 1024) totalling over 1024 bytes",
        &bytes,
        1009,
    );
}

/// The server reads a socket in 64 KiB receives and hears of new bytes only when they arrive
/// (its readiness set is edge-triggered): what one write puts past the first receive must be
/// read without anything more arriving.
fn messages_past_one_receive_buffer_are_all_read(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = WsClient::open(server.addr);
    c.welcome();
    // One message at the default limit (65,536 bytes): its frame is 14 bytes longer than one
    // receive, and nothing else follows it.
    let head = r#"{"op":"ping","ref":""#;
    let long = "y".repeat(65_536 - head.len() - 2);
    assert_eq!(json!({"op":"ping","ref":long}).to_string().len(), 65_536);
    pings_in_one_write(&mut c, &[json!(long)], "a 65,536-byte message");
    // 240 KB in one write, then silence.
    let refs: Vec<Value> = (0..4)
        .map(|i| json!(format!("{i}{}", "x".repeat(60_000))))
        .collect();
    pings_in_one_write(&mut c, &refs, "a 240 KB burst");
    // And many small messages in one write.
    let refs: Vec<Value> = (0..300).map(|i| json!(i)).collect();
    pings_in_one_write(&mut c, &refs, "300 messages in one write");
    c.assert_alive("after the bursts");
}

/// Publishes sent in one write without waiting, to channels of both shards (the other shard's
/// are on their way together), are answered in the order sent, each channel's seqs in order;
/// a ping and a refused publish among them keep their places, and the close that ends the
/// write is echoed only after every reply. With `limits.max_publishes_in_flight` 2 the
/// connection reads on only as the oldest are answered, which the client cannot tell.
fn pipelined_publishes_are_answered_in_order(driver: &str) {
    let channels = channels_of_both_shards();
    for in_flight in ["64", "2"] {
        let server = start_with_publishes_in_flight(driver, in_flight);
        let what = format!("max_publishes_in_flight {in_flight}");
        let mut c = WsClient::open_on_shard(server.addr, 0, WS_PATH, &[]);
        let mut burst = Vec::new();
        for i in 0..40u64 {
            let channel = &channels[(i % 8) as usize];
            let request = match i {
                17 => json!({"op":"ping","ref":i}),
                23 => json!({"op":"publish","channel":channel,"type":"t","ref":i}),
                _ => json!({"op":"publish","channel":channel,"type":"t","data":i,"ref":i}),
            };
            let text = request.to_string();
            burst.extend(encode_frame(
                true,
                0,
                OP_TEXT,
                text.as_bytes(),
                Some(next_mask()),
            ));
        }
        burst.extend(encode_frame(
            true,
            0,
            OP_CLOSE,
            &1000u16.to_be_bytes(),
            Some(next_mask()),
        ));
        c.send_raw(&burst);
        let mut seqs = std::collections::HashMap::new();
        for i in 0..40u64 {
            let v = c.reply(&format!("reply {i} ({what})"));
            assert_eq!(
                v["ref"], i,
                "reply {i} comes in the order sent ({what}): {v}"
            );
            match i {
                17 => assert_eq!(v["op"], "pong", "{v}"),
                23 => assert_error(&v, "bad_request", Some(json!(i)), "publish without data"),
                _ => {
                    assert_eq!(v["op"], "published", "{what}: {v}");
                    let seq = seqs.entry(i % 8).or_insert(0u64);
                    *seq += 1;
                    assert_eq!(
                        v["seq"],
                        *seq,
                        "channel {}'s seqs in order ({what}): {v}",
                        i % 8
                    );
                }
            }
        }
        let (code, _) = c.expect_close(
            READ_TIMEOUT,
            &format!("the close echo after the replies ({what})"),
        );
        assert_eq!(code, 1000);
        assert_serving(&server, &format!("pipelined publishes ({what})"));
    }
}

/// Sends a ping op per ref in one write, then expects the pongs in order.
fn pings_in_one_write(c: &mut WsClient, refs: &[Value], what: &str) {
    let mut burst = Vec::new();
    for r in refs {
        let text = json!({"op":"ping","ref":r}).to_string();
        let mask = Some([1, 2, 3, 4]);
        burst.extend(encode_frame(true, 0, OP_TEXT, text.as_bytes(), mask));
    }
    c.send_raw(&burst);
    for (i, r) in refs.iter().enumerate() {
        let v = c.next_json(READ_TIMEOUT, &format!("pong {i} of {what}"));
        assert_eq!(v, json!({"op":"pong","ref":r}), "pong {i} of {what}");
    }
}

fn frame_at_the_limit_is_accepted(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    let mut c = WsClient::open(server.addr);
    // {"op":"ping","ref":"xxx..."} padded to exactly 1024 bytes.
    let head = br#"{"op":"ping","ref":""#;
    let pad = 1024 - head.len() - 2;
    let r = "x".repeat(pad);
    let text = format!(r#"{{"op":"ping","ref":"{r}"}}"#);
    assert_eq!(text.len(), 1024);
    c.send_text(&text);
    let v = c.next_json(
        READ_TIMEOUT,
        "a 1024-byte frame with max_frame_bytes = 1024",
    );
    assert_eq!(
        v,
        json!({"op":"pong","ref":r}),
        "a frame at the limit is accepted"
    );
    // A message reassembled to exactly the limit is accepted too.
    let bytes = text.as_bytes();
    c.send_frame(false, OP_TEXT, &bytes[..500]);
    c.send_frame(true, OP_CONT, &bytes[500..]);
    let v = c.next_json(READ_TIMEOUT, "a 1024-byte message in 2 fragments");
    assert_eq!(
        v,
        json!({"op":"pong","ref":r}),
        "a message at the limit is accepted"
    );
}

fn binary_frame_closes_1003(driver: &str) {
    let server = Server::start_with_config(driver, FRAME_LIMIT);
    violation(
        &server,
        "a binary frame",
        &masked(true, 0, OP_BINARY, PING_OP),
        1003,
    );
}

fn fragmented_text_is_one_message(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = WsClient::open(server.addr);
    let msg = br#"{"op":"ping","ref":"frag"}"#;
    c.send_frame(false, OP_TEXT, &msg[..8]);
    c.send_frame(false, OP_CONT, &msg[8..17]);
    c.send_frame(true, OP_CONT, &msg[17..]);
    let v = c.next_json(READ_TIMEOUT, "a ping op in 3 fragments");
    assert_eq!(
        v,
        json!({"op":"pong","ref":"frag"}),
        "3 fragments make one message"
    );

    // A control frame between fragments is answered, and the message still completes.
    let msg = br#"{"op":"ping","ref":"frag2"}"#;
    c.send_frame(false, OP_TEXT, &msg[..5]);
    c.send_frame(true, OP_PING, b"mid");
    c.send_frame(false, OP_CONT, &msg[5..12]);
    c.send_frame(true, OP_CONT, &msg[12..]);
    let pong = loop {
        let f = c.next_frame(READ_TIMEOUT).unwrap_or_else(|e| {
            panic!("expected a pong frame for the ping between fragments: {e:?}")
        });
        if f.opcode == OP_PONG {
            break f;
        }
        assert_ne!(
            f.opcode, OP_CLOSE,
            "a ping between fragments is legal: {f:?}"
        );
    };
    assert_eq!(pong.payload, b"mid", "the pong carries the ping's payload");
    let v = c.next_json(READ_TIMEOUT, "the fragmented ping op around a ping frame");
    assert_eq!(v, json!({"op":"pong","ref":"frag2"}));

    // A character split across fragments is fine.
    let msg = "{\"op\":\"ping\",\"ref\":\"é€\"}".as_bytes();
    let split = msg.iter().position(|&b| b == 0xc3).unwrap() + 1;
    c.send_frame(false, OP_TEXT, &msg[..split]);
    c.send_frame(true, OP_CONT, &msg[split..]);
    let v = c.next_json(READ_TIMEOUT, "a UTF-8 character split across fragments");
    assert_eq!(v, json!({"op":"pong","ref":"é€"}));
}

fn ping_frame_gets_a_pong_with_the_same_payload(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = WsClient::open(server.addr);
    for payload in [
        &b"hello"[..],
        b"",
        &[0u8, 255, 1, 2, 3][..],
        &[b'p'; 125][..],
    ] {
        c.send_frame(true, OP_PING, payload);
        let f = loop {
            let f = c.next_frame(READ_TIMEOUT).unwrap_or_else(|e| {
                panic!(
                    "ping frame with {} bytes: expected a pong: {e:?}",
                    payload.len()
                )
            });
            if f.opcode != OP_PING {
                break f;
            }
        };
        assert_eq!(
            f.opcode, OP_PONG,
            "a ping frame is answered by a pong frame: {f:?}"
        );
        assert!(
            f.fin && !f.masked && f.rsv == 0,
            "a well-formed server frame: {f:?}"
        );
        assert_eq!(f.payload, payload, "the pong echoes the ping's payload");
    }
    // An unsolicited pong is ignored.
    c.send_frame(true, OP_PONG, b"whatever");
    c.assert_alive("after an unsolicited pong");
}

fn client_close_is_echoed(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = WsClient::open(server.addr);
    c.subscribe("bye.c");
    c.send_close(1000);
    let (code, _) = c.expect_close(READ_TIMEOUT, "the echo of a client close 1000");
    assert_eq!(code, 1000, "the server echoes the client's close code");
    assert!(
        c.eof_within(BOUND),
        "after the close handshake the server ends the TCP connection"
    );
    wait_subscribers(server.addr, &[("bye.c", 0)]);
    // A close with another valid code, and one without a payload.
    let mut c = WsClient::open(server.addr);
    c.send_close(4000);
    let (code, _) = c.expect_close(READ_TIMEOUT, "the echo of a client close 4000");
    assert_eq!(code, 4000, "the server echoes an application close code");
    let mut c = WsClient::open(server.addr);
    c.send_frame(true, OP_CLOSE, b"");
    let (code, _) = c.expect_close(READ_TIMEOUT, "the answer to an empty close");
    assert_eq!(code, 1000, "an empty close is answered with 1000");
    let closes = wait_metric_at_least(&server, "relay_ws_closes_total{code=\"1000\"}", 2.0, BOUND);
    assert!(
        closes >= 2.0,
        "relay_ws_closes_total{{code=\"1000\"}} counts the normal closes (got {closes})"
    );
}

// ---------------------------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------------------------

fn bad_upgrades(driver: &str) {
    let server = Server::start(driver, &[]);
    let raw = |req: &str| -> HttpResponse {
        let mut c = Conn::open(server.addr);
        c.send_raw(req.as_bytes());
        c.read_response()
            .unwrap_or_else(|e| panic!("{req:?}: expected an HTTP response: {e}"))
    };
    let base = |extra: &str, skip: &str, method: &str| -> String {
        let mut s = format!("{method} /api/v1/relay/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for h in [
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ] {
            if skip.is_empty() || !h.starts_with(skip) {
                s.push_str(h);
                s.push_str("\r\n");
            }
        }
        s.push_str(extra);
        s.push_str("\r\n");
        s
    };

    let r = raw(&base("", "Sec-WebSocket-Key", "GET"));
    assert_json_error(&r, 400, "upgrade without Sec-WebSocket-Key");

    let r = raw(&base("", "Sec-WebSocket-Key", "GET")
        .replace("\r\n\r\n", "\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n"));
    assert_json_error(&r, 400, "upgrade with a key that is not 16 bytes of base64");

    let r = raw(&base("", "Sec-WebSocket-Version", "GET")
        .replace("\r\n\r\n", "\r\nSec-WebSocket-Version: 8\r\n\r\n"));
    assert_json_error(&r, 426, "upgrade with Sec-WebSocket-Version: 8");
    assert_eq!(
        r.header("sec-websocket-version"),
        Some("13"),
        "426 names the supported version: {r}"
    );

    let r = raw(&base("Content-Length: 0\r\n", "", "POST"));
    assert!(
        r.status == 405 || r.status == 400,
        "POST upgrade: expected 405 or 400, got {r}"
    );
    assert_json_error(&r, r.status, "POST upgrade");

    let r = raw(&base("", "Upgrade", "GET"));
    assert_json_error(&r, 400, "a GET of the ws path without Upgrade: websocket");

    let r = raw(&base("", "Connection", "GET"));
    assert_json_error(&r, 400, "upgrade without Connection: Upgrade");

    // Mixed-case tokens and a Connection list are fine.
    let req = "GET /api/v1/relay/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: WebSocket\r\n\
               Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
               Sec-WebSocket-Version: 13\r\n\r\n";
    let mut s = connect(server.addr);
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let mut c = WsClient::read_upgrade_answer(s, "mixed-case upgrade").unwrap_or_else(|r| {
        panic!("Upgrade: WebSocket / Connection: keep-alive, Upgrade: expected 101, got {r}")
    });
    c.welcome();
    c.assert_alive("the mixed-case upgrade");
    assert_serving(&server, "bad upgrades");
}

// ---------------------------------------------------------------------------------------------
// Keepalive and idle timeout
// ---------------------------------------------------------------------------------------------

fn server_pings_a_quiet_connection(driver: &str) {
    let server = Server::start_with_config(driver, "[websocket]\nheartbeat_ms = 200\n");
    let mut c = WsClient::open(server.addr);
    assert_eq!(c.welcome()["heartbeat_ms"], 200, "{}", c.welcome());
    for n in 1..=2 {
        let f = c.next_frame(READ_TIMEOUT).unwrap_or_else(|e| {
            panic!("heartbeat_ms = 200: expected ping frame {n} on a quiet connection within 5 s: {e:?}")
        });
        assert_eq!(f.opcode, OP_PING, "a quiet connection gets pings: {f:?}");
        assert!(f.fin && !f.masked, "a well-formed ping: {f:?}");
        c.send_frame(true, OP_PONG, &f.payload);
    }
    c.assert_alive("after answering pings");
}

/// Reads frames until `until`, answering pings with pongs (what any WebSocket client does, and
/// all this client ever sends); returns (events, pings). A close or EOF fails the test.
fn listen_answering_pings(c: &mut WsClient, until: Instant, what: &str) -> (u64, u64) {
    let (mut events, mut pings) = (0, 0);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (events, pings);
        }
        match c.next_frame(left) {
            Ok(f) if f.opcode == OP_PING => {
                pings += 1;
                c.send_frame(true, OP_PONG, &f.payload);
            }
            Ok(f) if f.opcode == OP_TEXT => {
                let v: Value = serde_json::from_slice(&f.payload)
                    .unwrap_or_else(|e| panic!("{what}: a text frame that is not JSON: {e}"));
                assert_eq!(v["op"], "event", "{what}: only events expected: {v}");
                events += 1;
            }
            Ok(f) if f.opcode == OP_CLOSE => {
                panic!(
                    "{what}: closed after {events} events and {pings} pings: {:?}",
                    f.close_code()
                )
            }
            Ok(f) => panic!("{what}: unexpected frame {f:?}"),
            Err(WsReadError::Timeout) => return (events, pings),
            Err(e) => panic!("{what}: the connection ended after {events} events: {e:?}"),
        }
    }
}

/// A client that only listens speaks only to answer pings, so pings must go out however often
/// events do: without them it would be closed as idle while receiving.
fn a_listener_on_a_busy_channel_is_pinged_and_kept(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\nidle_timeout_s = 1\n[websocket]\nheartbeat_ms = 200\n",
    );
    let mut c = WsClient::open(server.addr);
    c.subscribe("busy.c");
    wait_subscribers(server.addr, &[("busy.c", 1)]);
    let addr = server.addr;
    // An event every 50 ms for 2.5 s: the writer is never quiet for a heartbeat.
    let publisher = std::thread::spawn(move || {
        let mut conn = Conn::open(addr);
        for i in 0..50 {
            let r = conn.publish(&event_json("busy.c", "tick", &i.to_string()));
            assert_eq!(r.status, 202, "publish {i}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let what = "a subscriber that only answers pings, events every 50 ms, heartbeat_ms = 200, \
                idle_timeout_s = 1";
    let (events, pings) =
        listen_answering_pings(&mut c, Instant::now() + Duration::from_millis(3000), what);
    publisher.join().expect("publisher thread");
    assert_eq!(events, 50, "{what}: every event arrives");
    assert!(
        pings >= 5,
        "{what}: about one ping per 200 ms over 3 s, got {pings}"
    );
    c.assert_alive("the listener, kept open by its pongs through 3 s of events");
    assert_serving(&server, "after a busy listener");
}

/// A writer that finishes each write with more queued (a client catching up) never goes quiet:
/// its pings go out between its writes.
fn a_backlogged_writer_pings_between_its_writes(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 100000\noutbound_queue_bytes = 67108864\n\
         [websocket]\nheartbeat_ms = 100\n",
    );
    let mut slow = slow_subscriber(server.addr, WS_PATH, "backlog.c");
    // 3000 events of 2 KB while the client does not read: a backlog the kernel buffers cannot
    // hold, so the writer has more queued after every write until the client has caught up.
    publish_2kb_events(server.addr, "backlog.c", 3000);
    // Catch up at about 10 events a millisecond (at least 300 ms in all), answering pings.
    let (mut events, mut pings_during) = (0u64, 0u64);
    while events < 3000 {
        let f = slow.next_frame(READ_TIMEOUT).unwrap_or_else(|e| {
            panic!("catching up: after {events} of 3000 events the stream stopped: {e:?}")
        });
        match f.opcode {
            OP_PING => {
                pings_during += u64::from(events > 0);
                slow.send_frame(true, OP_PONG, &f.payload);
            }
            OP_TEXT => {
                events += 1;
                if events % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            _ => panic!("catching up: unexpected frame {f:?} after {events} events"),
        }
    }
    assert!(
        pings_during >= 1,
        "heartbeat_ms = 100: a writer 300 ms or more behind its client pings between its writes, \
         got no ping between the first and the last of 3000 events"
    );
    slow.assert_alive("the client after catching up");
}

fn idle_connection_is_closed(driver: &str) {
    let server = Server::start_with_config(driver, "[limits]\nidle_timeout_s = 1\n");
    let mut silent = WsClient::open(server.addr);
    let mut talker = WsClient::open(server.addr);
    // The talker sends a ping op every 250 ms for 2.5 s: never idle, never closed.
    for _ in 0..10 {
        talker.assert_alive("a client that talks every 250 ms with idle_timeout_s = 1");
        std::thread::sleep(Duration::from_millis(250));
    }
    match silent.close_or_eof(READ_TIMEOUT) {
        Some(_) => {}
        None => panic!(
            "idle_timeout_s = 1: a client that sends nothing should be closed (close frame or EOF)"
        ),
    }
    talker.assert_alive("the talker, after the silent client was closed");
}

/// Waits until both sides of `n` WebSocket connections are parked (no task while idle).
fn wait_parked(server: &Server, n: f64, what: &str) {
    let parked =
        |side: &str| server.metric_sum(&format!("relay_ws_sides_parked{{side=\"{side}\"}}"));
    let deadline = Instant::now() + BOUND;
    loop {
        let (readers, writers) = (parked("reader"), parked("writer"));
        if readers == n && writers == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {n} parked readers and writers within {BOUND:?}, got {readers} and {writers}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn idle_sides_park_and_wake(driver: &str) {
    let mut server = Server::start_with_config(driver, "[shutdown]\nclose_spread_ms = 0\n");
    let mut a = WsClient::open(server.addr);
    let mut b = WsClient::open(server.addr);
    a.subscribe("park.c");
    b.subscribe("park.c");
    wait_parked(&server, 2.0, "two subscribers quiet for a second");

    // An event resumes both writers.
    let r = publish(
        server.addr,
        r#"{"channel":"park.c","type":"t","data":{"n":1}}"#,
    );
    assert_eq!(r["results"][0]["seq"], 1, "publish: {r}");
    for c in [&mut a, &mut b] {
        let (seq, event) = c.next_event("park.c", "a parked subscriber, after a publish");
        assert_eq!(seq, 1, "{event}");
    }
    // A request resumes the reader (and the writer, for the reply).
    a.assert_alive("a parked connection, sent a ping op");
    b.send_frame(true, OP_PING, b"parked?");
    let pong = b
        .next_frame(READ_TIMEOUT)
        .unwrap_or_else(|e| panic!("a parked connection should answer a ping frame: {e:?}"));
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"parked?"[..]),
        "{pong:?}"
    );
    wait_parked(&server, 2.0, "the same subscribers, quiet again");

    // A drain resumes parked writers to send 1001; the readers end on the client's answer.
    server.signal(libc::SIGTERM);
    for c in [&mut a, &mut b] {
        let (code, _) = c.expect_close(BOUND, "a parked subscriber on SIGTERM");
        assert_eq!(code, 1001, "a drain closes parked connections with 1001");
        let _ = c.try_send_raw(&masked(true, 0, OP_CLOSE, &1001u16.to_be_bytes()));
    }
    let status = server.wait_exit(BOUND).unwrap_or_else(|| {
        panic!(
            "the relay should exit after closing parked connections; stderr:\n{}",
            server.stderr()
        )
    });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
}

// ---------------------------------------------------------------------------------------------
// Slow consumers
// ---------------------------------------------------------------------------------------------

fn slow_consumer_is_closed_with_1013(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 32\nslow_consumer = \"close\"\n",
    );
    let mut slow = slow_subscriber(server.addr, WS_PATH, "slow.ws");
    // And a healthy subscriber on the same channel.
    let mut healthy = WsClient::open(server.addr);
    healthy.subscribe("slow.ws");
    wait_subscribers(server.addr, &[("slow.ws", 2)]);

    // Never read `slow` while publishing. Batches of 10 (under the queue bound of 32), and
    // the healthy subscriber reads each batch before the next, so it is never over the bound.
    let mut published = 0;
    let data = format!("\"{}\"", "x".repeat(2000));
    let mut conn = Conn::open(server.addr);
    let mut drops = 0.0;
    while published < 5000 {
        let batch: Vec<String> = (0..10)
            .map(|_| event_json("slow.ws", "big", &data))
            .collect();
        let r = conn.publish(&format!("[{}]", batch.join(",")));
        assert_eq!(r.status, 202, "publishing with a stalled subscriber: {r}");
        published += 10;
        // The healthy one keeps up.
        expect_seqs(
            &mut healthy,
            "slow.ws",
            published - 9,
            10,
            "the healthy subscriber",
        );
        drops = server.metric_sum("relay_slow_consumer_drops_total");
        if drops > 0.0 {
            break;
        }
    }
    assert!(
        drops > 0.0,
        "after {published} events of 2 KB to a never-read WebSocket with outbound_queue_messages = 32, \
         relay_slow_consumer_drops_total should be > 0 (got {drops}); relay_ws_closes_total: {}",
        closes_by_code(&server)
    );
    let r = server.get("/healthz");
    assert_eq!(r.status, 200, "the server still answers /healthz: {r}");
    let closes = wait_metric_at_least(
        &server,
        "relay_ws_closes_total{code=\"1013\"}",
        1.0,
        Duration::from_secs(15),
    );
    assert!(
        closes >= 1.0,
        "slow_consumer = \"close\": a WebSocket client that never reads should be closed with 1013 \
         (relay_ws_closes_total{{code=\"1013\"}} >= 1 within 15 s), got {closes}; \
         relay_slow_consumer_drops_total = {drops}"
    );
    wait_subscribers(server.addr, &[("slow.ws", 1)]);
    // What the slow client finds when it reads at last: whatever fit, then close 1013 or EOF.
    match slow.close_or_eof(Duration::from_secs(15)) {
        Some(Some((code, _))) => assert_eq!(code, 1013, "the slow consumer's close code"),
        Some(None) => {}
        None => panic!("the slow consumer's connection should end (1013 or EOF)"),
    }
    // The healthy one is unaffected.
    let r = conn.publish(&event_json("slow.ws", "small", "1"));
    assert_eq!(r.status, 202, "{r}");
    expect_seqs(
        &mut healthy,
        "slow.ws",
        published + 1,
        1,
        "the healthy subscriber afterwards",
    );
}

/// A client that subscribes with `since` and unsubscribes over and over, reading nothing, is a
/// slow consumer once its queued replays pass full histories for the subscriptions it may
/// hold: a replay is not counted in the queue's bound, so nothing else would stop it.
fn resubscribing_without_reading_is_a_slow_consumer(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 100000\nmax_subscriptions_per_connection = 4\n",
    );
    // A full history (1000 events, the default size): each replay is 1000 frames, and four
    // of them are what a connection may have queued.
    for _ in 0..20 {
        let items: Vec<String> = (0..50)
            .map(|i| event_json("resub.r", "t", &i.to_string()))
            .collect();
        publish(server.addr, &format!("[{}]", items.join(",")));
    }
    let history = json(&server.get("/api/v1/relay/channels/resub.r/history?limit=1"));
    let epoch = history["epoch"].clone();
    let mut c = WsClient::try_open_on(small_rcvbuf_stream(server.addr), WS_PATH, &[])
        .unwrap_or_else(|r| panic!("upgrade: {r}"));
    c.welcome();
    let subscribe = json!({"op":"subscribe","channel":"resub.r","since":{"epoch":epoch,"seq":0}});
    let unsubscribe = json!({"op":"unsubscribe","channel":"resub.r"});
    let mut rounds = Vec::new();
    for _ in 0..2000 {
        for op in [&subscribe, &unsubscribe] {
            let text = op.to_string();
            rounds.extend(encode_frame(
                true,
                0,
                OP_TEXT,
                text.as_bytes(),
                Some(next_mask()),
            ));
        }
    }
    // Relay may close while this is still being sent.
    let _ = c.try_send_raw(&rounds);
    let drops = wait_metric_at_least(&server, "relay_slow_consumer_drops_total", 1.0, BOUND);
    assert!(
        drops >= 1.0,
        "2000 replays queued for a client that reads nothing: a slow consumer"
    );
    // The close frame goes ahead of what is queued; relay may also reset the connection,
    // closing it with the rest of the rounds unread.
    match c.close_or_eof(BOUND) {
        Some(Some((code, reason))) => {
            assert_eq!(code, 1013, "closed as a slow consumer: {code} {reason:?}")
        }
        Some(None) => {}
        None => panic!("the slow consumer's connection should end"),
    }
    let read = server.metric_sum("relay_ws_messages_received_total");
    assert!(
        read < 4000.0,
        "four replays fit (4 subscriptions x 1000 events) and the fifth closes: relay should \
         not go on to read all 4000 messages (read {read})"
    );
    let mut fresh = WsClient::open(server.addr);
    fresh.welcome();
    fresh.assert_alive("a new connection after the slow consumer was closed");
}

fn slow_consumer_drop_oldest_sends_gap(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 32\nslow_consumer = \"drop_oldest\"\n",
    );
    let mut slow = slow_subscriber(server.addr, WS_PATH, "drop.ws");

    let published = publish_until_drops(&server, "drop.ws", 5000);
    let drops = server.metric_sum("relay_slow_consumer_drops_total");
    assert!(
        drops > 0.0,
        "drop_oldest: after {published} events, relay_slow_consumer_drops_total should be > 0"
    );
    publish(server.addr, &event_json("drop.ws", "marker", "\"end\""));
    let last = published + 1;

    // Read everything now: every seq 1..=last is either delivered once, in order, or inside
    // exactly one announced gap.
    let mut delivered: Vec<u64> = Vec::new();
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    loop {
        let v = slow.try_next_json(READ_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "drop_oldest: the connection should stay open and deliver up to seq {last}; \
                 after seq {:?} and gaps {gaps:?}: {e}",
                delivered.last()
            )
        });
        match v["op"].as_str() {
            Some("gap") => {
                assert_eq!(v["channel"], "drop.ws", "gap names the channel: {v}");
                let (from, to) = (v["from_seq"].as_u64(), v["to_seq"].as_u64());
                let (Some(from), Some(to)) = (from, to) else {
                    panic!("gap carries numeric from_seq and to_seq: {v}");
                };
                assert!(from <= to, "gap from_seq <= to_seq: {v}");
                gaps.push((from, to));
            }
            Some("event") => {
                let seq = v["seq"].as_u64().unwrap();
                if let Some(&prev) = delivered.last() {
                    assert!(
                        seq > prev,
                        "drop_oldest: seqs in order, no duplicates: {seq} after {prev}"
                    );
                }
                delivered.push(seq);
                if seq == last {
                    assert_eq!(v["type"], "marker", "{v}");
                    break;
                }
            }
            _ => panic!("drop_oldest: unexpected message {v}"),
        }
    }
    assert!(
        !gaps.is_empty(),
        "drop_oldest: dropping events is announced with a gap op"
    );
    let delivered_set: HashSet<u64> = delivered.iter().copied().collect();
    for seq in 1..=last {
        let in_gaps = gaps
            .iter()
            .filter(|(f, t)| (*f..=*t).contains(&seq))
            .count();
        let got = delivered_set.contains(&seq);
        assert!(
            (got && in_gaps == 0) || (!got && in_gaps == 1),
            "drop_oldest: seq {seq} should be delivered or inside exactly one gap, not both or \
             neither (delivered: {got}, in {in_gaps} gaps; gaps {gaps:?})"
        );
    }
    slow.assert_alive("the drop_oldest client after catching up");
}

/// A client that stops reading for a while (its socket buffers fill, so the server's writes are
/// partial) and then reads everything gets every event intact, in order: with bounds large
/// enough, no slow-consumer policy applies and nothing may be lost or corrupted.
fn stalled_reader_catches_up_intact(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 100000\noutbound_queue_bytes = 67108864\n",
    );
    let mut slow = slow_subscriber(server.addr, WS_PATH, "stall.ws");

    // 3000 events of 2 KB (6 MB): more than the kernel buffers between us and the server hold.
    let data = "x".repeat(2000);
    let mut conn = Conn::open(server.addr);
    for batch in 0..60u64 {
        let items: Vec<String> = (0..50)
            .map(|k| {
                event_json(
                    "stall.ws",
                    "big",
                    &format!("{{\"i\":{},\"pad\":\"{data}\"}}", batch * 50 + k),
                )
            })
            .collect();
        let r = conn.publish(&format!("[{}]", items.join(",")));
        assert_eq!(r.status, 202, "batch {batch}: {r}");
    }
    assert_eq!(
        server.metric_sum("relay_slow_consumer_drops_total"),
        0.0,
        "the bounds (100000 messages, 64 MB) were never reached: no slow-consumer drops"
    );
    for k in 0..3000u64 {
        let v = slow.try_next_json(READ_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "a reader that stalled and then catches up should get all 3000 events intact; \
                 event {} (seq {}) did not come: {e}; relay_ws_closes_total: {}",
                k,
                k + 1,
                closes_by_code(&server)
            )
        });
        assert_eq!(v["op"], "event", "message {k}: {}", short(&v));
        assert_eq!(
            v["seq"],
            k + 1,
            "events in order without loss: {}",
            short(&v)
        );
        assert_eq!(v["data"]["i"], k, "event data intact: {}", short(&v));
        assert_eq!(
            v["data"]["pad"].as_str().map(str::len),
            Some(2000),
            "event data intact (2000-byte pad)"
        );
    }
    slow.assert_alive("the stalled reader after catching up");
}

// ---------------------------------------------------------------------------------------------
// Connection limits
// ---------------------------------------------------------------------------------------------

/// Connects and returns either an upgraded client or the refusal the server sent. The server
/// refuses at accept, before reading; so wait briefly for an unprompted answer first, and only
/// then send the upgrade.
fn ws_or_refusal(server: &Server) -> Result<WsClient, HttpResponse> {
    let s = connect(server.addr);
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut probe = [0u8; 1];
    let unprompted = matches!(s.peek(&mut probe), Ok(n) if n > 0);
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    if unprompted {
        let mut c = Conn::from_stream(s);
        return Err(c
            .read_response()
            .unwrap_or_else(|e| panic!("unreadable refusal: {e}")));
    }
    let mut c = WsClient::try_open_on(s, WS_PATH, &[])?;
    c.welcome();
    Ok(c)
}

fn per_ip_connection_limit(driver: &str) {
    let server = Server::start_with_config(driver, "[limits]\nmax_connections_per_ip = 2\n");
    let mut held: Vec<WsClient> = Vec::new();
    let mut refusal = None;
    for _ in 0..30 {
        match ws_or_refusal(&server) {
            Ok(c) => held.push(c),
            Err(r) => {
                refusal = Some(r);
                break;
            }
        }
        assert!(
            held.len() <= 2,
            "max_connections_per_ip = 2 over 2 shards allows 1 per shard, yet {} were accepted \
             (shards {:?})",
            held.len(),
            held.iter().map(|c| c.shard).collect::<Vec<_>>()
        );
    }
    let r = refusal.unwrap_or_else(|| {
        panic!("30 connections from one address with max_connections_per_ip = 2: none was refused")
    });
    assert_json_error(&r, 429, "a connection over max_connections_per_ip");
    assert!(
        r.header("retry-after").is_some(),
        "429 carries Retry-After: {r}"
    );
    let shards: HashSet<_> = held.iter().map(|c| c.shard).collect();
    assert_eq!(
        shards.len(),
        held.len(),
        "one connection per shard at most: {shards:?}"
    );
    for c in held.iter_mut() {
        c.assert_alive("a connection within the per-IP limit");
    }
    // Released slots can be used again.
    for mut c in held.drain(..) {
        c.send_close(1000);
        let _ = c.close_or_eof(READ_TIMEOUT);
    }
    let deadline = Instant::now() + BOUND;
    loop {
        match ws_or_refusal(&server) {
            Ok(mut c) => {
                c.assert_alive("a connection after the others closed");
                break;
            }
            Err(r) => assert!(
                Instant::now() < deadline,
                "after closing every connection a new one should be accepted again, got {r}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn max_connections_limit(driver: &str) {
    let server = Server::start_with_config(driver, "[limits]\nmax_connections = 3\n");
    let mut held: Vec<WsClient> = Vec::new();
    let mut refusal = None;
    for _ in 0..10 {
        match ws_or_refusal(&server) {
            Ok(c) => held.push(c),
            Err(r) => {
                refusal = Some(r);
                break;
            }
        }
    }
    let r = refusal
        .unwrap_or_else(|| panic!("10 connections with max_connections = 3: none was refused"));
    assert_json_error(&r, 503, "a connection over max_connections");
    assert_eq!(
        held.len(),
        3,
        "max_connections = 3 accepts exactly 3 connections before refusing"
    );
    for c in held.iter_mut() {
        c.assert_alive("a connection within max_connections");
    }
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

fn sigterm_sends_1001_and_exits_zero(driver: &str) {
    let mut server = Server::start_with_config(driver, "[shutdown]\nclose_spread_ms = 200\n");
    let mut clients = WsClient::open_on_both_shards(server.addr, 2);
    for c in clients.iter_mut() {
        c.subscribe("drain.c");
    }
    wait_subscribers(server.addr, &[("drain.c", 4)]);
    server.signal(libc::SIGTERM);
    for (i, c) in clients.iter_mut().enumerate() {
        let (code, reason) = c.expect_close(
            Duration::from_secs(15),
            &format!("client {i} (shard {:?}) on SIGTERM", c.shard),
        );
        assert_eq!(
            code, 1001,
            "client {i}: a drain closes WebSockets with 1001 going away, got {code} {reason:?}"
        );
        let _ = c.try_send_raw(&masked(true, 0, OP_CLOSE, &1001u16.to_be_bytes()));
    }
    let status = server
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "the relay should exit within 15 s of SIGTERM; stderr:\n{}",
                server.stderr()
            )
        });
    assert_eq!(
        status.code(),
        Some(0),
        "a drain exits 0, got {status}; stderr:\n{}",
        server.stderr()
    );
}
