//! Black-box tests of SSE streams (API.md sections 4 and 10), once per I/O driver.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;

both_drivers!(
    fan_out_is_complete_across_shards,
    recovery_across_two_channels,
    gap_when_history_no_longer_reaches,
    types_filter,
    keepalive_comment,
    retry_hint_at_start,
    bad_stream_requests,
    slow_consumer_is_closed,
    slow_consumer_drop_oldest_marks_a_gap,
    new_epoch_after_restart_is_a_gap,
    concurrent_publishers_keep_per_channel_order,
    sse_connections_are_counted,
    recovery_longer_than_the_outbound_queue,
    multiline_data_round_trips,
    duplicates_are_delivered_to_nobody,
    recovery_of_full_history_with_default_limits,
);

/// (channel, seq, data) of one event; fails the test if the event is not a well-formed envelope.
fn envelope(ev: &SseEvent) -> (String, u64, serde_json::Value) {
    let v = ev.json();
    let channel = v["channel"]
        .as_str()
        .unwrap_or_else(|| panic!("envelope without channel: {ev:?}"))
        .to_string();
    let seq = v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("envelope without seq: {ev:?}"));
    assert!(
        ev.id.as_deref().is_some_and(|id| !id.is_empty()),
        "every event carries an `id:` cursor: {ev:?}"
    );
    assert_eq!(
        ev.event.as_deref(),
        v["type"].as_str(),
        "`event:` should be the envelope's type: {ev:?}"
    );
    (channel, seq, v["data"].clone())
}

/// Asserts that nothing more arrives on `s` within a short grace period (no duplicates or extras).
fn assert_no_more(s: &mut SseStream, what: &str) {
    if let Some(ev) = s.next_event(Duration::from_millis(300)) {
        panic!("{what}: no further event expected, got {ev:?}");
    }
}

fn fan_out_is_complete_across_shards(driver: &str) {
    let server = Server::start(driver, &[]);
    let chans: Vec<String> = (0..5).map(|i| format!("t.c{i}")).collect();
    let query = format!(
        "/api/v1/relay/events/stream?{}",
        chans
            .iter()
            .map(|c| format!("channel={c}"))
            .collect::<Vec<_>>()
            .join("&")
    );
    let mut streams = sse_streams_on_both_shards(server.addr, &query, 2);
    let want: Vec<(&str, u64)> = chans.iter().map(|c| (c.as_str(), 4)).collect();
    wait_subscribers(server.addr, &want);

    let mut conns = conns_on_both_shards(server.addr);
    for batch in 0..20 {
        let items: Vec<String> = (0..10)
            .map(|k| {
                let i = batch * 10 + k;
                event_json(&chans[i % 5], "fan.out", &format!("{{\"i\":{i}}}"))
            })
            .collect();
        let r = conns[batch % 2].publish(&format!("[{}]", items.join(",")));
        assert_eq!(r.status, 202, "batch {batch} publish: {r}");
    }

    for (n, s) in streams.iter_mut().enumerate() {
        let what = format!("stream {n} (shard {:?})", s.shard);
        let events = s.take(200, &what);
        let mut per_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for ev in &events {
            let (channel, seq, data) = envelope(ev);
            assert!(
                seen.insert((channel.clone(), seq)),
                "{what}: duplicate event {channel}#{seq}"
            );
            // Event i went to channel i % 5 and is the (i / 5 + 1)-th there.
            let i = data["i"]
                .as_u64()
                .unwrap_or_else(|| panic!("{what}: unexpected data {data}"));
            assert_eq!(
                channel,
                chans[(i % 5) as usize],
                "{what}: event {i} on the wrong channel"
            );
            assert_eq!(
                seq,
                i / 5 + 1,
                "{what}: event {i} should have seq {} on {channel}",
                i / 5 + 1
            );
            per_channel.entry(channel).or_default().push(seq);
        }
        for c in &chans {
            let got = per_channel.get(c).cloned().unwrap_or_default();
            assert_eq!(
                got,
                (1..=40).collect::<Vec<u64>>(),
                "{what}: {c} should deliver seq 1..=40 in order"
            );
        }
        assert_no_more(s, &what);
    }
    // Every delivery was counted (4 streams x 200 events), with its route duration.
    let delivered = server.metric_sum("relay_events_delivered_total");
    assert!(
        delivered >= 800.0,
        "relay_events_delivered_total should be >= 800 after 4 x 200 deliveries, got {delivered}"
    );
    let observed = server.metric_sum("relay_event_route_duration_seconds_count");
    assert!(
        observed >= 800.0,
        "relay_event_route_duration_seconds_count should be >= 800, got {observed}"
    );
    let published = server.metric_sum("relay_events_published_total");
    assert_eq!(
        published, 200.0,
        "relay_events_published_total should be exactly 200"
    );
}

/// Expected (channel, seq) list check: per channel in order, nothing else, no duplicates.
fn assert_exactly(events: &[SseEvent], want: &[(&str, std::ops::RangeInclusive<u64>)], what: &str) {
    let mut per_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for ev in events {
        assert_ne!(
            ev.event.as_deref(),
            Some("gap"),
            "{what}: no gap expected, history covers it: {ev:?}"
        );
        let (channel, seq, _) = envelope(ev);
        per_channel.entry(channel).or_default().push(seq);
    }
    let want_map: BTreeMap<String, Vec<u64>> = want
        .iter()
        .map(|(c, r)| (c.to_string(), r.clone().collect()))
        .filter(|(_, v): &(String, Vec<u64>)| !v.is_empty())
        .collect();
    assert_eq!(per_channel, want_map, "{what}: per-channel seqs delivered");
}

fn recovery_across_two_channels(driver: &str) {
    let server = Server::start(driver, &[]);
    let path = "/api/v1/relay/events/stream?channel=rec.a&channel=rec.b";
    let mut s = SseStream::open(server.addr, path, None);
    wait_subscribers(server.addr, &[("rec.a", 1), ("rec.b", 1)]);

    // a1 b1 a2 b2 a3: receive only three of them, leaving two unread. Order across channels
    // is not promised (each channel has its own owner), only within a channel.
    for c in ["rec.a", "rec.b", "rec.a", "rec.b", "rec.a"] {
        publish(server.addr, &event_json(c, "r", "{}"));
    }
    let first = s.take(3, "initial live events");
    let (mut seen_a, mut seen_b) = (0, 0);
    for ev in &first {
        let (channel, seq, _) = envelope(ev);
        let seen = if channel == "rec.a" {
            &mut seen_a
        } else {
            &mut seen_b
        };
        assert_eq!(
            seq,
            *seen + 1,
            "initial live events: {channel} out of order: {first:?}"
        );
        *seen = seq;
    }
    let cursor = first[2].id.clone().expect("an id on every event");
    drop(s);

    // While away: a4..a7, b3..b5.
    for c in [
        "rec.b", "rec.a", "rec.a", "rec.b", "rec.a", "rec.b", "rec.a",
    ] {
        publish(server.addr, &event_json(c, "r", "{}"));
    }
    let mut s = SseStream::open(server.addr, path, Some(&cursor));
    // Missed: everything after the three received, up to a7 and b5.
    let n = (7 - seen_a + 5 - seen_b) as usize;
    let missed = s.take(n, "recovery with Last-Event-ID");
    assert_exactly(
        &missed,
        &[("rec.a", seen_a + 1..=7), ("rec.b", seen_b + 1..=5)],
        &format!("recovery with Last-Event-ID (having seen a..{seen_a}, b..{seen_b})"),
    );
    assert_no_more(&mut s, "after recovery with Last-Event-ID");

    // Then live events continue on both channels.
    wait_subscribers(server.addr, &[("rec.a", 1), ("rec.b", 1)]);
    publish(
        server.addr,
        &format!(
            "[{},{}]",
            event_json("rec.a", "r", "1"),
            event_json("rec.b", "r", "2")
        ),
    );
    let live = s.take(2, "live after recovery");
    assert_exactly(
        &live,
        &[("rec.a", 8..=8), ("rec.b", 6..=6)],
        "live after recovery",
    );
    assert_no_more(&mut s, "after live events");
    // The cursor of the last event received covers both channels.
    let cursor = s.last_id.clone().unwrap();
    drop(s);

    // Once more, with the cursor in `?last_event_id=`.
    publish(
        server.addr,
        &format!(
            "[{},{},{}]",
            event_json("rec.b", "r", "1"),
            event_json("rec.a", "r", "2"),
            event_json("rec.b", "r", "3")
        ),
    );
    let path_q = format!("{path}&last_event_id={}", percent_encode(&cursor));
    let mut s = SseStream::open(server.addr, &path_q, None);
    let missed = s.take(3, "recovery with ?last_event_id=");
    assert_exactly(
        &missed,
        &[("rec.a", 9..=9), ("rec.b", 7..=8)],
        "recovery with ?last_event_id=",
    );
    assert_no_more(&mut s, "after recovery with ?last_event_id=");
    wait_subscribers(server.addr, &[("rec.a", 1), ("rec.b", 1)]);
    publish(server.addr, &event_json("rec.a", "r", "9"));
    let live = s.take(1, "live after ?last_event_id= recovery");
    assert_exactly(
        &live,
        &[("rec.a", 10..=10)],
        "live after ?last_event_id= recovery",
    );
}

fn gap_when_history_no_longer_reaches(driver: &str) {
    let server = Server::start_with_config(driver, "[history]\nsize = 3\n");
    let path = "/api/v1/relay/events/stream?channel=gap.c&channel=gap.ok";
    let mut s = SseStream::open(server.addr, path, None);
    wait_subscribers(server.addr, &[("gap.c", 1), ("gap.ok", 1)]);
    publish(server.addr, &event_json("gap.c", "g", "1"));
    publish(server.addr, &event_json("gap.ok", "g", "1"));
    let got = s.take(2, "events before leaving");
    let cursor = got[1].id.clone().unwrap();
    drop(s);
    wait_subscribers(server.addr, &[("gap.c", 0), ("gap.ok", 0)]);

    // 10 events on gap.c (history keeps 3), 1 on gap.ok (still in history).
    for i in 0..10 {
        publish(server.addr, &event_json("gap.c", "g", &i.to_string()));
    }
    publish(server.addr, &event_json("gap.ok", "g", "2"));

    let mut s = SseStream::open(server.addr, path, Some(&cursor));
    let first = s
        .next_event(READ_TIMEOUT)
        .expect("a reconnect past history should first get `event: gap`");
    assert_eq!(
        first.event.as_deref(),
        Some("gap"),
        "the first event should be `event: gap`, got {first:?}"
    );
    let v = first.json();
    assert_eq!(
        v,
        serde_json::json!({"channels": ["gap.c"]}),
        "gap data should name only gap.c: {first:?}"
    );

    // gap.ok's missed event is still replayed.
    let next = s.take(1, "gap.ok replay after the gap");
    assert_exactly(&next, &[("gap.ok", 2..=2)], "gap.ok replay after the gap");

    // Then the stream continues live for gap.c.
    wait_subscribers(server.addr, &[("gap.c", 1), ("gap.ok", 1)]);
    publish(server.addr, &event_json("gap.c", "g", "\"live\""));
    let live = s.take(1, "live gap.c event after the gap");
    assert_exactly(
        &live,
        &[("gap.c", 12..=12)],
        "live gap.c event after the gap (nothing replayed from the lost range)",
    );
    assert_no_more(&mut s, "after the live event");
}

fn types_filter(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=ty.c&types=doc.*",
        None,
    );
    let mut all = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=ty.c",
        None,
    );
    wait_subscribers(server.addr, &[("ty.c", 2)]);
    let types = [
        "doc.edit",
        "user.join",
        "doc.delete",
        "docx",
        "doc",
        "xdoc.edit",
        "doc.end",
    ];
    let body: Vec<String> = types.iter().map(|t| event_json("ty.c", t, "{}")).collect();
    publish(server.addr, &format!("[{}]", body.join(",")));

    let got: Vec<String> = s
        .take(3, "types=doc.*")
        .iter()
        .map(|e| e.event.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        got,
        vec!["doc.edit", "doc.delete", "doc.end"],
        "types=doc.* should deliver only matching types"
    );
    assert_no_more(&mut s, "types=doc.*");

    let got: Vec<String> = all
        .take(7, "no filter")
        .iter()
        .map(|e| e.event.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        got,
        types.to_vec(),
        "a stream without `types` gets every type"
    );

    // Several patterns: comma-separated and repeated.
    let mut multi = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=ty.d&types=user.*,docx&types=doc",
        None,
    );
    wait_subscribers(server.addr, &[("ty.d", 1)]);
    let body: Vec<String> = types.iter().map(|t| event_json("ty.d", t, "{}")).collect();
    publish(server.addr, &format!("[{}]", body.join(",")));
    let got: Vec<String> = multi
        .take(3, "types=user.*,docx&types=doc")
        .iter()
        .map(|e| e.event.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        got,
        vec!["user.join", "docx", "doc"],
        "types=user.*,docx&types=doc should deliver the union of the patterns"
    );
    assert_no_more(&mut multi, "types=user.*,docx&types=doc");
}

fn keepalive_comment(driver: &str) {
    let server = Server::start_with_config(driver, "[sse]\nkeepalive_s = 1\n");
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=ka.c",
        None,
    );
    let comment = s
        .wait_comment(READ_TIMEOUT)
        .expect("with keepalive_s = 1 a `: keepalive` comment should arrive on an idle stream");
    assert!(
        comment.contains("keepalive"),
        "the comment should be `: keepalive`, got {comment:?}"
    );
    // The stream is still alive afterwards.
    wait_subscribers(server.addr, &[("ka.c", 1)]);
    publish(server.addr, &event_json("ka.c", "t", "1"));
    let ev = s.take(1, "event after keepalive");
    assert_exactly(&ev, &[("ka.c", 1..=1)], "event after keepalive");
}

fn retry_hint_at_start(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=rt.c",
        None,
    );
    assert!(
        s.headers
            .get("cache-control")
            .is_some_and(|v| v.contains("no-cache")),
        "an SSE response should carry Cache-Control: no-cache: {:?}",
        s.headers
    );
    let retry = s
        .wait_retry(READ_TIMEOUT)
        .expect("a `retry:` line at the start of the stream");
    assert_eq!(retry, "2000", "the default retry hint is retry_ms = 2000");
    wait_subscribers(server.addr, &[("rt.c", 1)]);
    publish(server.addr, &event_json("rt.c", "t", "1"));
    s.take(1, "event after retry");
    assert_eq!(
        s.seen.first(),
        Some(&"retry"),
        "`retry:` should come before anything else, saw {:?}",
        s.seen
    );

    let server = Server::start_with_config(driver, "[sse]\nretry_ms = 750\n");
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=rt.c",
        None,
    );
    assert_eq!(
        s.wait_retry(READ_TIMEOUT).as_deref(),
        Some("750"),
        "retry follows sse.retry_ms"
    );
}

fn bad_stream_requests(driver: &str) {
    let server = Server::start(driver, &[]);
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("no channel", "/api/v1/relay/events/stream", None),
        (
            "empty channel",
            "/api/v1/relay/events/stream?channel=",
            None,
        ),
        (
            "bad channel name",
            "/api/v1/relay/events/stream?channel=bad%20name",
            None,
        ),
        (
            "bad channel chars",
            "/api/v1/relay/events/stream?channel=a%24b",
            None,
        ),
        (
            "garbage Last-Event-ID",
            "/api/v1/relay/events/stream?channel=ok.c",
            Some("!!garbage!!"),
        ),
        (
            "garbage ?last_event_id=",
            "/api/v1/relay/events/stream?channel=ok.c&last_event_id=%E2%98%83x~",
            None,
        ),
    ];
    for (what, path, lei) in cases {
        match SseStream::try_open(server.addr, path, *lei) {
            Ok(_) => panic!("{what}: expected 400, got a stream"),
            Err(r) => {
                let msg = assert_json_error(&r, 400, what);
                if what.contains("channel") {
                    assert!(
                        msg.contains("channel"),
                        "{what}: the message should mention the channel: {msg:?}"
                    );
                }
            }
        }
    }
    // The server still serves good streams.
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=ok.c",
        None,
    );
    wait_subscribers(server.addr, &[("ok.c", 1)]);
    publish(server.addr, &event_json("ok.c", "t", "1"));
    s.take(1, "good stream after bad ones");
}

fn slow_consumer_is_closed(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 16\nslow_consumer = \"close\"\n",
    );
    // A client socket with a tiny receive buffer, and we never read it.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&server.addr.into(), Duration::from_secs(5))
        .expect("connect");
    let stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut slow =
        SseStream::try_open_on(stream, "/api/v1/relay/events/stream?channel=slow.c", None)
            .unwrap_or_else(|r| panic!("slow stream: {r}"));
    wait_subscribers(server.addr, &[("slow.c", 1)]);

    let data = format!("\"{}\"", "x".repeat(2000));
    let mut conn = Conn::open(server.addr);
    let mut published = 0;
    let mut drops = 0.0;
    while published < 3000 {
        let batch: Vec<String> = (0..50)
            .map(|_| event_json("slow.c", "big", &data))
            .collect();
        let r = conn.publish(&format!("[{}]", batch.join(",")));
        assert_eq!(
            r.status, 202,
            "publishing to a channel with a stalled subscriber should still work: {r}"
        );
        published += 50;
        drops = server.metric_sum("relay_slow_consumer_drops_total");
        if drops > 0.0 {
            break;
        }
    }
    assert!(
        drops > 0.0,
        "after {published} events of 2 KB to a never-read stream with outbound_queue_messages = 16, \
         relay_slow_consumer_drops_total should be > 0 (got {drops})"
    );
    let r = server.get("/healthz");
    assert_eq!(
        r.status, 200,
        "the server should still answer /healthz: {r}"
    );
    // With slow_consumer = "close", the stream ends once we read what was already sent.
    assert!(
        slow.wait_eof(Duration::from_secs(10)),
        "with slow_consumer = \"close\" the overflowing stream should be closed"
    );
    wait_subscribers(server.addr, &[("slow.c", 0)]);
    // The other side of the channel still works: a new stream gets new events.
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=slow.c",
        None,
    );
    wait_subscribers(server.addr, &[("slow.c", 1)]);
    let r = conn.publish(&event_json("slow.c", "small", "1"));
    assert_eq!(r.status, 202, "{r}");
    let ev = s.take(1, "a fresh stream after the slow one was closed");
    assert_eq!(ev[0].event.as_deref(), Some("small"), "{ev:?}");
}

fn slow_consumer_drop_oldest_marks_a_gap(driver: &str) {
    let server = Server::start_with_config(
        driver,
        "[limits]\noutbound_queue_messages = 16\nslow_consumer = \"drop_oldest\"\n",
    );
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&server.addr.into(), Duration::from_secs(5))
        .expect("connect");
    let stream: std::net::TcpStream = sock.into();
    let mut slow =
        SseStream::try_open_on(stream, "/api/v1/relay/events/stream?channel=drop.c", None)
            .unwrap_or_else(|r| panic!("slow stream: {r}"));
    wait_subscribers(server.addr, &[("drop.c", 1)]);

    let data = format!("\"{}\"", "x".repeat(2000));
    let mut conn = Conn::open(server.addr);
    let mut published = 0u64;
    let mut drops = 0.0;
    while published < 3000 {
        let batch: Vec<String> = (0..50)
            .map(|_| event_json("drop.c", "big", &data))
            .collect();
        let r = conn.publish(&format!("[{}]", batch.join(",")));
        assert_eq!(r.status, 202, "{r}");
        published += 50;
        drops = server.metric_sum("relay_slow_consumer_drops_total");
        if drops > 0.0 {
            break;
        }
    }
    assert!(
        drops > 0.0,
        "drop_oldest: after {published} events, relay_slow_consumer_drops_total should be > 0"
    );
    let r = conn.publish(&event_json("drop.c", "marker", "\"end\""));
    assert_eq!(r.status, 202, "{r}");
    let last = published + 1;

    // Now read: seqs strictly increasing, at least one `event: gap` naming drop.c, and the
    // stream stays open up to the newest event.
    let mut prev = 0;
    let mut gaps = 0;
    loop {
        let ev = slow.next_event(READ_TIMEOUT).unwrap_or_else(|| {
            panic!("drop_oldest: the stream should stay open and deliver up to seq {last}; stopped after seq {prev} (eof={})", slow.eof)
        });
        if ev.event.as_deref() == Some("gap") {
            assert_eq!(
                ev.json(),
                serde_json::json!({"channels": ["drop.c"]}),
                "gap names the channel: {ev:?}"
            );
            gaps += 1;
            continue;
        }
        let (channel, seq, _) = envelope(&ev);
        assert_eq!(channel, "drop.c");
        assert!(
            seq > prev,
            "drop_oldest: seqs must stay in order without duplicates: {seq} after {prev}"
        );
        prev = seq;
        if seq == last {
            assert_eq!(ev.event.as_deref(), Some("marker"), "{ev:?}");
            break;
        }
    }
    assert!(
        gaps > 0,
        "drop_oldest: dropping events must be announced with `event: gap`"
    );
}

fn new_epoch_after_restart_is_a_gap(driver: &str) {
    let path = "/api/v1/relay/events/stream?channel=life.c";
    let cursor = {
        let server = Server::start(driver, &[]);
        let mut s = SseStream::open(server.addr, path, None);
        wait_subscribers(server.addr, &[("life.c", 1)]);
        publish(server.addr, &event_json("life.c", "t", "1"));
        publish(server.addr, &event_json("life.c", "t", "2"));
        s.take(2, "first life");
        s.last_id.clone().unwrap()
    };
    // A new process: the channel's history is lost, so its epoch is new.
    let server = Server::start(driver, &[]);
    for i in 0..3 {
        publish(server.addr, &event_json("life.c", "t", &i.to_string()));
    }
    let mut s = SseStream::open(server.addr, path, Some(&cursor));
    let first = s
        .next_event(READ_TIMEOUT)
        .expect("a cursor from an old epoch should get `event: gap`");
    assert_eq!(
        first.event.as_deref(),
        Some("gap"),
        "seq 2 of the old life is not seq 2 of the new one: expected `event: gap`, got {first:?}"
    );
    assert_eq!(
        first.json(),
        serde_json::json!({"channels": ["life.c"]}),
        "{first:?}"
    );
    assert_no_more(
        &mut s,
        "after a gap for a new epoch (nothing of the new life is replayed)",
    );
}

fn concurrent_publishers_keep_per_channel_order(driver: &str) {
    let server = Server::start(driver, &[]);
    let chans = ["cc.0", "cc.1", "cc.2"];
    let query = "/api/v1/relay/events/stream?channel=cc.0,cc.1,cc.2";
    let mut streams = sse_streams_on_both_shards(server.addr, query, 1);
    wait_subscribers(server.addr, &[("cc.0", 2), ("cc.1", 2), ("cc.2", 2)]);

    // Two publishers at once, one per shard, 300 events each over the same three channels.
    let [c0, c1] = conns_on_both_shards(server.addr);
    let workers: Vec<_> = [c0, c1]
        .into_iter()
        .enumerate()
        .map(|(w, mut conn)| {
            std::thread::spawn(move || {
                for batch in 0..30 {
                    let items: Vec<String> = (0..10)
                        .map(|k| {
                            event_json(
                                chans[k % 3],
                                "cc",
                                &format!("{{\"w\":{w},\"n\":{}}}", batch * 10 + k),
                            )
                        })
                        .collect();
                    let r = conn.publish(&format!("[{}]", items.join(",")));
                    assert_eq!(r.status, 202, "publisher {w} batch {batch}: {r}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("publisher thread");
    }
    // 600 events in all.
    for (n, s) in streams.iter_mut().enumerate() {
        let what = format!("stream {n} (shard {:?})", s.shard);
        let events = s.take(600, &what);
        let mut per_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        // Each publisher's events on a channel keep their relative order too.
        let mut last_n: BTreeMap<(String, u64), i64> = BTreeMap::new();
        for ev in &events {
            let (channel, seq, data) = envelope(ev);
            let key = (channel.clone(), data["w"].as_u64().unwrap());
            let n_ = data["n"].as_i64().unwrap();
            let prev = last_n.insert(key.clone(), n_).unwrap_or(-1);
            assert!(
                n_ > prev,
                "{what}: publisher {} on {channel}: event {n_} after {prev}",
                key.1
            );
            per_channel.entry(channel).or_default().push(seq);
        }
        // Per batch of 10: k % 3 puts 4 on cc.0, 3 on cc.1 and cc.2; 60 batches in all.
        for (c, total) in chans.iter().zip([240u64, 180, 180]) {
            assert_eq!(
                per_channel.get(*c).cloned().unwrap_or_default(),
                (1..=total).collect::<Vec<u64>>(),
                "{what}: {c} should deliver seq 1..={total} in order, once each"
            );
        }
        assert_no_more(s, &what);
    }
}

/// Polls `/api/v1/relay/connections` (at most 10 s) until `by_transport.sse == n`.
fn wait_sse_connections(server: &Server, n: i64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = json(&server.get("/api/v1/relay/connections"));
        if v["by_transport"]["sse"].as_i64() == Some(n) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "by_transport.sse never became {n}: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sse_connections_are_counted(driver: &str) {
    let server = Server::start(driver, &[]);
    let streams = sse_streams_on_both_shards(
        server.addr,
        "/api/v1/relay/events/stream?channel=count.c",
        1,
    );
    wait_sse_connections(&server, 2);
    let metrics = server.get("/metrics").text();
    assert_eq!(
        metric_sum(&metrics, "relay_connections_active{transport=\"sse\"}"),
        Some(2.0),
        "relay_connections_active{{transport=\"sse\"}} should count the 2 open streams:\n{metrics}"
    );
    drop(streams);
    // Closed streams are no longer counted, nor subscribed.
    wait_sse_connections(&server, 0);
    wait_subscribers(server.addr, &[("count.c", 0)]);
}

/// A reconnecting client that reads promptly is not a slow consumer: replaying more missed
/// events than `outbound_queue_messages` must still deliver all of them (they are in history).
fn recovery_longer_than_the_outbound_queue(driver: &str) {
    let server = Server::start_with_config(driver, "[limits]\noutbound_queue_messages = 16\n");
    let path = "/api/v1/relay/events/stream?channel=replay.c";
    let mut s = SseStream::open(server.addr, path, None);
    wait_subscribers(server.addr, &[("replay.c", 1)]);
    publish(server.addr, &event_json("replay.c", "t", "0"));
    s.take(1, "first event");
    let cursor = s.last_id.clone().unwrap();
    drop(s);

    // 40 events while away: all within history (default size 1000), more than the queue.
    for batch in 0..4 {
        let items: Vec<String> = (0..10)
            .map(|k| event_json("replay.c", "t", &(batch * 10 + k + 1).to_string()))
            .collect();
        publish(server.addr, &format!("[{}]", items.join(",")));
    }
    let mut s = SseStream::open(server.addr, path, Some(&cursor));
    let mut got = Vec::new();
    while got.len() < 40 {
        match s.next_event(READ_TIMEOUT) {
            Some(ev) => got.push(envelope(&ev).1),
            None => panic!(
                "reconnecting with Last-Event-ID after missing 40 events (history size 1000, \
                 outbound_queue_messages = 16) should replay seq 2..=41; the stream {} after {} events: {got:?}",
                if s.eof { "was closed by the server" } else { "went silent" },
                got.len()
            ),
        }
    }
    assert_eq!(
        got,
        (2..=41).collect::<Vec<u64>>(),
        "replay in order, no duplicates"
    );
}

/// `data` with raw line breaks (LF, CRLF, CR) between JSON tokens: the SSE framing must still
/// deliver it as one event whose data parses back to the same value.
fn multiline_data_round_trips(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=ml.c",
        None,
    );
    wait_subscribers(server.addr, &[("ml.c", 1)]);
    let raw_data = "{\"a\":\n  1,\r\n \"b\": [\"x\\ny\",\r 2]}";
    publish(
        server.addr,
        &format!("{{\"channel\":\"ml.c\",\"type\":\"t\",\"data\":{raw_data}}}"),
    );
    publish(server.addr, &event_json("ml.c", "after", "1"));
    let evs = s.take(2, "multi-line data");
    let v = evs[0].json();
    assert_eq!(
        v["data"],
        serde_json::json!({"a": 1, "b": ["x\ny", 2]}),
        "data should round-trip: {:?}",
        evs[0]
    );
    assert_eq!(v["seq"], 1);
    assert_eq!(
        evs[1].event.as_deref(),
        Some("after"),
        "the next event stays separate: {:?}",
        evs[1]
    );
}

/// API.md 10: a duplicate publish "is delivered to nobody".
fn duplicates_are_delivered_to_nobody(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut s = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=dup.c",
        None,
    );
    wait_subscribers(server.addr, &[("dup.c", 1)]);
    let ev = |id: &str, data: &str| {
        format!(r#"{{"channel":"dup.c","type":"t","id":"{id}","data":{data}}}"#)
    };
    publish(server.addr, &ev("d-1", "1"));
    let v = publish(
        server.addr,
        &format!("[{},{},{}]", ev("d-1", "2"), ev("d-2", "3"), ev("d-2", "4")),
    );
    assert_eq!(v["results"][0]["duplicate"], true, "{v}");
    assert_eq!(v["results"][2]["duplicate"], true, "{v}");
    publish(server.addr, &ev("d-3", "5"));
    let got: Vec<(u64, serde_json::Value)> = s
        .take(3, "originals only")
        .iter()
        .map(|e| {
            let (_, seq, data) = envelope(e);
            (seq, data)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, serde_json::json!(1)),
            (2, serde_json::json!(3)),
            (3, serde_json::json!(5))
        ],
        "only the originals are delivered"
    );
    assert_no_more(&mut s, "after the originals");
}

/// The same with the default configuration: a stream on 5 channels misses 1000 events on each
/// (history size is 1000 per channel, so all are still there) and reconnects. The replay is
/// 5000 events, more than the default outbound_queue_messages = 4096, but the client reads
/// as fast as it can and must get all of them.
fn recovery_of_full_history_with_default_limits(driver: &str) {
    let server = Server::start(driver, &[]);
    let chans: Vec<String> = (0..5).map(|i| format!("full.c{i}")).collect();
    let path = format!("/api/v1/relay/events/stream?channel={}", chans.join(","));
    let mut s = SseStream::open(server.addr, &path, None);
    let want: Vec<(&str, u64)> = chans.iter().map(|c| (c.as_str(), 1)).collect();
    wait_subscribers(server.addr, &want);
    publish(server.addr, &event_json(&chans[0], "t", "0"));
    s.take(1, "first event");
    let cursor = s.last_id.clone().unwrap();
    drop(s);
    let zero: Vec<(&str, u64)> = chans.iter().map(|c| (c.as_str(), 0)).collect();
    wait_subscribers(server.addr, &zero);

    let mut conn = Conn::open(server.addr);
    for c in &chans {
        for _ in 0..2 {
            let items: Vec<String> = (0..500)
                .map(|i| event_json(c, "t", &i.to_string()))
                .collect();
            let r = conn.publish(&format!("[{}]", items.join(",")));
            assert_eq!(r.status, 202, "{r}");
        }
    }
    // full.c0 now has seq 1..=1001 (history 2..=1001), the others 1..=1000: 5000 missed events.
    let mut s = SseStream::open(server.addr, &path, Some(&cursor));
    let mut per_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut count = 0;
    while count < 5000 {
        let Some(ev) = s.next_event(READ_TIMEOUT) else {
            panic!(
                "default limits: reconnecting after missing 5000 events still in history should replay all of them; \
                 the stream {} after {count} events",
                if s.eof { "was closed by the server" } else { "went silent" }
            );
        };
        assert_ne!(
            ev.event.as_deref(),
            Some("gap"),
            "no gap: every missed event is in history: {ev:?}"
        );
        let (channel, seq, _) = envelope(&ev);
        per_channel.entry(channel).or_default().push(seq);
        count += 1;
    }
    for (i, c) in chans.iter().enumerate() {
        let want: Vec<u64> = if i == 0 {
            (2..=1001).collect()
        } else {
            (1..=1000).collect()
        };
        assert_eq!(
            per_channel.get(c).cloned().unwrap_or_default(),
            want,
            "{c}: replayed seqs"
        );
    }
}
