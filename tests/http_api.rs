//! Black-box tests of the HTTP API (API.md sections 1, 2, 8, 10), once per I/O driver.

mod common;

use std::time::Duration;

use common::ws::WsClient;
use common::*;

both_drivers!(
    liveness_readiness_health,
    metrics_endpoints,
    publish_single_and_batch,
    idempotent_publish,
    idempotency_is_per_channel_and_bounded_by_history,
    channels_listing,
    history_queries,
    history_keeps_data_bytes_with_line_breaks,
    history_stays_within_max_events_node_wide,
    connections_endpoint,
    unknown_path_and_wrong_method,
    head_request,
    head_on_stream_sends_no_body,
    keep_alive,
    pipelining,
    connection_close_is_honoured,
    chunked_publish,
    expect_continue,
    many_pipelined_requests,
    pipelined_publishes_across_shards,
    wrong_methods_elsewhere,
);

fn liveness_readiness_health(driver: &str) {
    let server = Server::start(driver, &[]);

    let r = server.get("/healthz");
    assert_eq!(r.status, 200, "GET /healthz should be 200: {r}");

    let r = server.get("/readyz");
    assert_eq!(r.status, 200, "GET /readyz should be 200 once started: {r}");
    assert_eq!(
        json(&r)["status"],
        "ready",
        "/readyz body should be {{\"status\":\"ready\"}}: {r}"
    );

    let r = server.get("/api/v1/relay/health");
    assert_eq!(r.status, 200, "GET /api/v1/relay/health should be 200: {r}");
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "health should be JSON: {r}"
    );
    let v = json(&r);
    assert_eq!(v["status"], "ok", "health status should be ok: {v}");
    assert_eq!(v["shards"], 2, "health should report 2 shards: {v}");
    assert!(
        v["uptime_s"].is_number(),
        "health needs a numeric uptime_s: {v}"
    );
    assert!(
        v["connections"].is_number(),
        "health needs a numeric connections: {v}"
    );
    assert!(
        v["subsystems"].is_object(),
        "health needs a subsystems object: {v}"
    );
}

fn metrics_endpoints(driver: &str) {
    let server = Server::start(driver, &[]);
    for path in ["/metrics", "/api/v1/relay/metrics"] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "GET {path} should be 200: {r}");
        let ct = r.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "GET {path}: content-type should start with `text/plain; version=0.0.4`, got {ct:?}"
        );
        let text = r.text();
        for needle in [
            "relay_events_published_total",
            "relay_event_route_duration_seconds_bucket",
            "relay_connections_active{transport=\"http\"}",
        ] {
            assert!(
                text.contains(needle),
                "GET {path} should contain {needle}; got:\n{text}"
            );
        }
        // The driver the shards really run on, and the connection limit beside the gauges.
        for line in [
            format!("relay_runtime_info{{driver=\"{driver}\"}} 1"),
            "relay_connections_max 100000".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "GET {path} should have the line {line}; got:\n{text}"
            );
        }
    }

    for i in 0..3 {
        publish(
            server.addr,
            &event_json("metrics.chan", "t", &i.to_string()),
        );
    }
    for path in ["/metrics", "/api/v1/relay/metrics"] {
        let r = server.get(path);
        let published =
            metric_sum(&r.text(), "relay_events_published_total").unwrap_or_else(|| {
                panic!(
                    "{path}: relay_events_published_total has no sample:\n{}",
                    r.text()
                )
            });
        assert!(
            published >= 3.0,
            "{path}: relay_events_published_total should be >= 3 after 3 publishes, got {published}"
        );
    }

    // Publish latency, by the transport the publisher used: 3 over HTTP, 1 over WebSocket.
    let mut ws = WsClient::open(server.addr);
    ws.welcome();
    ws.send_json(&serde_json::json!({
        "op": "publish", "channel": "metrics.chan", "type": "t", "data": 3,
    }));
    let reply = ws.next_json(READ_TIMEOUT, "published reply");
    assert_eq!(reply["op"], "published", "{reply}");
    let text = server.get("/metrics").text();
    for (transport, want) in [("http", 3.0), ("ws", 1.0)] {
        let name = format!("relay_publish_duration_seconds_count{{transport=\"{transport}\"}}");
        assert_eq!(metric_sum(&text, &name), Some(want), "{name} in:\n{text}");
        let inf = format!(
            "relay_publish_duration_seconds_bucket{{transport=\"{transport}\",le=\"+Inf\"}}"
        );
        assert_eq!(metric_sum(&text, &inf), Some(want), "{inf} in:\n{text}");
    }

    // Every shard's thread, as the kernel accounts for it: it has run (the requests above
    // were served), and its wait for a CPU and its preemptions are counted, from zero.
    let shards = metric_sum(&text, "relay_shards").expect("relay_shards") as usize;
    assert!(shards >= 1, "relay_shards in:\n{text}");
    for shard in 0..shards {
        let label = format!("{{shard=\"{shard}\"}}");
        let cpu = metric_sum(&text, &format!("relay_shard_cpu_seconds_total{label}"));
        assert!(
            cpu.is_some_and(|s| s > 0.0),
            "shard {shard} has run, so its CPU seconds are above 0: {cpu:?} in:\n{text}"
        );
        for name in [
            "relay_shard_runqueue_wait_seconds_total",
            "relay_shard_preemptions_total",
        ] {
            let value = metric_sum(&text, &format!("{name}{label}"));
            assert!(
                value.is_some_and(|v| v >= 0.0),
                "{name}{label} should be a count: {value:?} in:\n{text}"
            );
        }
    }
}

fn publish_single_and_batch(driver: &str) {
    let server = Server::start(driver, &[]);

    let r = server.post_json(
        "/api/v1/relay/events",
        &event_json("fresh.one", "t.x", r#"{"k":1}"#),
    );
    assert_eq!(r.status, 202, "single publish should be 202: {r}");
    let v = json(&r);
    let results = v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results array expected: {v}"));
    assert_eq!(results.len(), 1, "one result for one event: {v}");
    assert_eq!(
        results[0]["seq"], 1,
        "first event of a fresh channel has seq 1: {v}"
    );
    assert_eq!(
        results[0]["channel"], "fresh.one",
        "result names the channel: {v}"
    );
    assert_eq!(
        results[0]["duplicate"], false,
        "a new event is not a duplicate: {v}"
    );
    let id = results[0]["id"].as_str().unwrap_or("");
    assert!(
        id.len() == 36 && id.chars().filter(|&c| c == '-').count() == 4,
        "an id-less publish gets a UUID id, got {id:?}"
    );

    // A batch across three channels, interleaved: per-channel seqs 1, 2, ... in order. Sent
    // from a connection on each shard (the channels' owners are spread over both shards), the
    // second batch continuing the first's sequences.
    let chans = ["b.alpha", "b.beta", "b:gamma/x"];
    let mut items = Vec::new();
    for i in 0..12 {
        let c = chans[i % 3];
        items.push(event_json(c, "batch.ev", &format!("{{\"i\":{i}}}")));
    }
    let body = format!("[{}]", items.join(","));
    for (round, mut conn) in conns_on_both_shards(server.addr).into_iter().enumerate() {
        let r = conn.publish(&body);
        assert_eq!(
            r.status, 202,
            "batch publish (shard {round}) should be 202: {r}"
        );
        let v = json(&r);
        let results = v["results"]
            .as_array()
            .unwrap_or_else(|| panic!("results array expected: {v}"));
        assert_eq!(results.len(), 12, "one result per batch item: {v}");
        for (i, res) in results.iter().enumerate() {
            let c = chans[i % 3];
            let want_seq = (round * 4 + i / 3 + 1) as u64;
            assert_eq!(
                res["channel"], c,
                "result {i} should be for {c} (results keep batch order): {v}"
            );
            assert_eq!(
                res["seq"], want_seq,
                "batch from shard {round}: result {i} on {c} should have seq {want_seq}: {v}"
            );
            assert_eq!(res["duplicate"], false, "result {i}: {v}");
        }
    }

    // The next single publish on one of them continues the sequence.
    let v = publish(server.addr, &event_json("b.beta", "t", "null"));
    assert_eq!(
        v["results"][0]["seq"], 9,
        "b.beta had 8 events, the next gets seq 9: {v}"
    );
}

fn idempotent_publish(driver: &str) {
    let server = Server::start(driver, &[]);
    let ev = |id: &str, data: &str| {
        format!(r#"{{"channel":"idem.c","type":"t","id":"{id}","data":{data}}}"#)
    };

    publish(server.addr, &event_json("idem.c", "t", "0")); // seq 1, no id
    let v = publish(server.addr, &ev("order-42", "1")); // seq 2
    assert_eq!(v["results"][0]["seq"], 2, "{v}");
    assert_eq!(
        v["results"][0]["id"], "order-42",
        "a publisher-given id is kept: {v}"
    );
    assert_eq!(v["results"][0]["duplicate"], false, "{v}");

    let v = publish(server.addr, &ev("order-42", "\"again\""));
    assert_eq!(
        v["results"][0]["duplicate"], true,
        "the same id again should be a duplicate: {v}"
    );
    assert_eq!(
        v["results"][0]["seq"], 2,
        "a duplicate is answered with the original seq: {v}"
    );
    assert_eq!(v["results"][0]["id"], "order-42", "{v}");

    // Within one batch: the second of two equal ids is a duplicate of the first.
    let body = format!(
        "[{},{},{}]",
        ev("b-1", "10"),
        ev("b-1", "11"),
        ev("b-2", "12")
    );
    let v = publish(server.addr, &body);
    let r = &v["results"];
    assert_eq!(r[0]["seq"], 3, "first b-1 gets seq 3: {v}");
    assert_eq!(r[0]["duplicate"], false, "{v}");
    assert_eq!(
        r[1]["seq"], 3,
        "second b-1 in the same batch is answered with seq 3: {v}"
    );
    assert_eq!(
        r[1]["duplicate"], true,
        "second b-1 in the same batch is a duplicate: {v}"
    );
    assert_eq!(r[1]["id"], "b-1", "{v}");
    assert_eq!(
        r[2]["seq"], 4,
        "b-2 gets the next seq, 4 (the duplicate used none): {v}"
    );
    assert_eq!(r[2]["duplicate"], false, "{v}");

    // Duplicates are not in history.
    let h = server.get("/api/v1/relay/channels/idem.c/history");
    assert_eq!(h.status, 200, "{h}");
    let hv = json(&h);
    let seqs: Vec<u64> = hv["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4],
        "history holds each event once, duplicates not at all: {hv}"
    );
    let datas: Vec<String> = hv["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].to_string())
        .collect();
    assert_eq!(
        datas,
        vec!["0", "1", "10", "12"],
        "the originals' data is kept: {hv}"
    );
}

fn channels_listing(driver: &str) {
    let server = Server::start(driver, &[]);
    for i in 0..3 {
        publish(server.addr, &event_json("listed.chan", "t", &i.to_string()));
    }
    publish(server.addr, &event_json("other/chan", "t", "1"));
    let r = server.get("/api/v1/relay/channels");
    assert_eq!(r.status, 200, "GET /api/v1/relay/channels: {r}");
    let v = json(&r);
    let rows = v["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("channels array expected: {v}"));
    let row = rows
        .iter()
        .find(|row| row["channel"] == "listed.chan")
        .unwrap_or_else(|| panic!("listed.chan should be listed: {v}"));
    assert_eq!(row["seq"], 3, "listed.chan's last seq is 3: {v}");
    assert!(
        row["subscribers"].is_number(),
        "each channel shows a subscriber count: {v}"
    );
    let row = rows
        .iter()
        .find(|row| row["channel"] == "other/chan")
        .unwrap_or_else(|| panic!("other/chan should be listed: {v}"));
    assert_eq!(row["seq"], 1, "{v}");
    assert!(v["next"].is_null(), "one page holds them all: {v}");

    // Pages: the test server's two shards own these channels between them, and the pages
    // come out merged, in name order, `count` being every match.
    let names = ["page.a", "page.b", "page.c", "page.d", "page.e"];
    for name in names.iter().rev() {
        publish(server.addr, &event_json(name, "t", "1"));
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/relay/channels?prefix=page.&limit=2".to_string();
    for expected_next in [Some("page.b"), Some("page.d"), None] {
        let v = json(&server.get(&path));
        assert_eq!(v["count"], 5, "{path}: {v}");
        assert_eq!(v["next"].as_str(), expected_next, "{path}: {v}");
        let rows = v["channels"].as_array().cloned().unwrap_or_default();
        seen.extend(
            rows.iter()
                .map(|r| r["channel"].as_str().unwrap_or("?").to_string()),
        );
        if let Some(next) = expected_next {
            path = format!("/api/v1/relay/channels?prefix=page.&limit=2&after={next}");
        }
    }
    assert_eq!(seen, names, "every page in order, none twice");

    // Bad paging is refused with a reason, and the server keeps serving.
    for (query, says) in [
        ("limit=0", "limit must be an integer from 1 to 10000"),
        ("limit=10001", "limit must be an integer from 1 to 10000"),
        ("limit=ten", "limit must be an integer"),
        ("page=2", "unknown query parameter"),
    ] {
        let r = server.get(&format!("/api/v1/relay/channels?{query}"));
        assert_eq!(r.status, 400, "?{query}: {r}");
        assert!(r.text().contains(says), "?{query} should say {says:?}: {r}");
    }
    let long = "x".repeat(256);
    let r = server.get(&format!("/api/v1/relay/channels?after={long}"));
    assert_eq!(
        r.status, 400,
        "an `after` longer than any channel name: {r}"
    );
    assert_eq!(server.get("/api/v1/relay/channels?limit=1").status, 200);
}

fn history_queries(driver: &str) {
    let server = Server::start(driver, &[]);
    let chan = "hist/room.1";
    let enc = "hist%2Froom.1";
    // The first event carries data with odd spacing, to check it is kept byte for byte.
    publish(
        server.addr,
        &event_json(chan, "h.t", r#"{"a" : [1,  2], "s":"x"}"#),
    );
    for i in 2..=10 {
        publish(
            server.addr,
            &event_json(chan, "h.t", &format!("{{\"n\":{i}}}")),
        );
    }

    let r = server.get(&format!("/api/v1/relay/channels/{enc}/history"));
    assert_eq!(r.status, 200, "history of {chan} via %2F: {r}");
    assert!(
        r.text().contains(r#"{"a" : [1,  2], "s":"x"}"#),
        "event data must be kept byte for byte in history: {}",
        r.text()
    );
    let v = json(&r);
    assert_eq!(v["channel"], chan, "{v}");
    assert_eq!(v["seq"], 10, "history reports the last seq: {v}");
    assert!(
        v["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "history has an epoch: {v}"
    );
    let seqs = |v: &serde_json::Value| -> Vec<u64> {
        v["events"]
            .as_array()
            .unwrap_or_else(|| panic!("events array: {v}"))
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        seqs(&v),
        (1..=10).collect::<Vec<_>>(),
        "default order is ascending, all events: {v}"
    );
    let e0 = &v["events"][0];
    assert_eq!(e0["channel"], chan, "envelope has channel: {e0}");
    assert_eq!(e0["type"], "h.t", "envelope has type: {e0}");
    assert_eq!(e0["epoch"], v["epoch"], "envelope epoch matches: {e0}");
    assert!(
        e0["ts"].is_number() && e0["id"].is_string(),
        "envelope has ts and id: {e0}"
    );

    let r = server.get(&format!("/api/v1/relay/channels/{enc}/history?since=4"));
    assert_eq!(
        seqs(&json(&r)),
        (5..=10).collect::<Vec<_>>(),
        "since is exclusive: {r}"
    );
    let r = server.get(&format!(
        "/api/v1/relay/channels/{enc}/history?since=4&limit=3"
    ));
    assert_eq!(
        seqs(&json(&r)),
        vec![5, 6, 7],
        "limit takes the first N after since: {r}"
    );
    let r = server.get(&format!("/api/v1/relay/channels/{enc}/history?limit=2"));
    assert_eq!(seqs(&json(&r)), vec![1, 2], "limit without since: {r}");
    let r = server.get(&format!("/api/v1/relay/channels/{enc}/history?since=10"));
    assert_eq!(
        seqs(&json(&r)),
        Vec::<u64>::new(),
        "nothing after the last seq: {r}"
    );

    let r = server.get("/api/v1/relay/channels/no.such.channel/history");
    assert_json_error(&r, 404, "history of an unknown channel");

    for q in ["limit=0", "limit=5000", "since=abc"] {
        let r = server.get(&format!("/api/v1/relay/channels/{enc}/history?{q}"));
        assert_json_error(&r, 400, &format!("history ?{q}"));
    }
}

fn connections_endpoint(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut held = Conn::open(server.addr);
    let r = held.roundtrip("GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200, "{r}");
    let r = server.get("/api/v1/relay/connections");
    assert_eq!(r.status, 200, "GET /api/v1/relay/connections: {r}");
    let v = json(&r);
    let active = v["active"]
        .as_i64()
        .unwrap_or_else(|| panic!("numeric `active` expected: {v}"));
    let http = v["by_transport"]["http"]
        .as_i64()
        .unwrap_or_else(|| panic!("numeric `by_transport.http` expected: {v}"));
    assert!(
        active >= 2,
        "a held connection plus this request's: active should be >= 2: {v}"
    );
    assert!(
        http >= 2,
        "both are http connections: by_transport.http should be >= 2: {v}"
    );
}

fn unknown_path_and_wrong_method(driver: &str) {
    let server = Server::start(driver, &[]);
    let r = server.get("/no/such/path");
    assert_json_error(&r, 404, "GET /no/such/path");
    let r = server.get("/api/v1/relay/nope");
    assert_json_error(&r, 404, "GET /api/v1/relay/nope");

    let r = request(server.addr, "DELETE", "/api/v1/relay/events", &[], b"");
    assert_json_error(&r, 405, "DELETE /api/v1/relay/events");
    let allow = r
        .header("allow")
        .unwrap_or_else(|| panic!("405 needs an Allow header: {r}"));
    assert!(
        allow.contains("POST"),
        "Allow should list POST, got {allow:?}"
    );
}

fn head_request(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = Conn::open(server.addr);
    let get = c.roundtrip("GET", "/healthz", &[], b"");
    let head = c.roundtrip("HEAD", "/healthz", &[], b"");
    assert_eq!(head.status, 200, "HEAD /healthz: {head}");
    let len = head
        .header("content-length")
        .unwrap_or_else(|| panic!("HEAD /healthz should carry Content-Length: {head}"));
    assert_eq!(
        len,
        get.body.len().to_string(),
        "HEAD's Content-Length should be the GET body's length"
    );
    // No body bytes may follow: the next response on this connection must parse cleanly.
    let next = c.roundtrip("GET", "/readyz", &[], b"");
    assert_eq!(
        next.status, 200,
        "after HEAD, the next response should be /readyz's 200 (HEAD sent no body): {next}"
    );
    assert_eq!(json(&next)["status"], "ready", "{next}");
}

fn keep_alive(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = Conn::open(server.addr);
    let a = c.roundtrip("GET", "/healthz", &[], b"");
    assert_eq!(a.status, 200, "1st request on a keep-alive connection: {a}");
    let b = c.publish(&event_json("ka.chan", "t", "1"));
    assert_eq!(b.status, 202, "2nd request on a keep-alive connection: {b}");
    let d = c.roundtrip("GET", "/api/v1/relay/channels/ka.chan/history", &[], b"");
    assert_eq!(d.status, 200, "3rd request on a keep-alive connection: {d}");
    assert_eq!(json(&d)["seq"], 1, "{d}");
    assert_eq!(
        a.shard(),
        d.shard(),
        "one connection is served by one shard"
    );
}

fn pipelining(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = Conn::open(server.addr);
    let mut bytes = build_request(
        "POST",
        "/api/v1/relay/events",
        &[("Content-Type", "application/json")],
        event_json("pipe.c", "t", "\"first\"").as_bytes(),
    );
    bytes.extend(build_request(
        "POST",
        "/api/v1/relay/events",
        &[("Content-Type", "application/json")],
        event_json("pipe.c", "t", "\"second\"").as_bytes(),
    ));
    bytes.extend(build_request("GET", "/no-such-thing", &[], b""));
    c.send_raw(&bytes);
    let r1 = c.read_response().expect("1st pipelined response");
    let r2 = c.read_response().expect("2nd pipelined response");
    let r3 = c.read_response().expect("3rd pipelined response");
    assert_eq!(r1.status, 202, "1st pipelined: {r1}");
    assert_eq!(r2.status, 202, "2nd pipelined: {r2}");
    assert_eq!(
        json(&r1)["results"][0]["seq"],
        1,
        "responses in request order: the 1st is seq 1: {r1}"
    );
    assert_eq!(
        json(&r2)["results"][0]["seq"],
        2,
        "responses in request order: the 2nd is seq 2: {r2}"
    );
    assert_json_error(&r3, 404, "3rd pipelined request (unknown path)");
    // And the connection still works.
    let r4 = c.roundtrip("GET", "/api/v1/relay/channels/pipe.c/history", &[], b"");
    let v = json(&r4);
    assert_eq!(v["events"][0]["data"], "first", "{v}");
    assert_eq!(v["events"][1]["data"], "second", "{v}");
}

fn connection_close_is_honoured(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = Conn::open(server.addr);
    let r = c.roundtrip("GET", "/healthz", &[("Connection", "close")], b"");
    assert_eq!(r.status, 200, "{r}");
    assert!(
        r.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "the response to `Connection: close` should say `Connection: close`: {r}"
    );
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the server should close the connection after answering `Connection: close`"
    );
    assert!(
        c.leftover().is_empty(),
        "nothing may follow the response: {:?}",
        c.leftover()
    );

    // HTTP/1.0 without keep-alive closes too.
    let mut c = Conn::open(server.addr);
    c.send_raw(b"GET /healthz HTTP/1.0\r\n\r\n");
    let r = c.read_response().expect("HTTP/1.0 response");
    assert_eq!(r.status, 200, "{r}");
    assert!(
        c.closed_within(READ_TIMEOUT),
        "an HTTP/1.0 request without keep-alive should be closed after the response"
    );
}

fn chunked_publish(driver: &str) {
    let server = Server::start(driver, &[]);
    let body = event_json("chunked.c", "t", r#"{"text":"hello chunked world"}"#);
    let (a, b) = body.as_bytes().split_at(10);
    let mut raw = b"POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    raw.extend(format!("{:x}\r\n", a.len()).as_bytes());
    raw.extend(a);
    raw.extend(b"\r\n");
    raw.extend(format!("{:X};ext=1\r\n", b.len()).as_bytes());
    raw.extend(b);
    raw.extend(b"\r\n0\r\n\r\n");
    let mut c = Conn::open(server.addr);
    // Send in two parts so the body really arrives in pieces.
    let split = raw.len() - 20;
    c.send_raw(&raw[..split]);
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(&raw[split..]);
    let r = c.read_response().expect("response to a chunked publish");
    assert_eq!(r.status, 202, "chunked publish should be 202: {r}");
    assert_eq!(json(&r)["results"][0]["seq"], 1, "{r}");
    // Keep-alive continues after a chunked body.
    let h = c.roundtrip("GET", "/api/v1/relay/channels/chunked.c/history", &[], b"");
    assert_eq!(
        json(&h)["events"][0]["data"]["text"],
        "hello chunked world",
        "{h}"
    );
}

/// RFC 9110 9.3.2: a HEAD response carries no content, also on the SSE endpoint.
fn head_on_stream_sends_no_body(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = Conn::open(server.addr);
    c.send(
        "HEAD",
        "/api/v1/relay/events/stream?channel=head.c",
        &[],
        b"",
    );
    let r = c
        .read_response_for("HEAD")
        .expect("a response head to HEAD on the stream endpoint");
    assert!(
        r.status == 200 || r.status == 405,
        "HEAD /api/v1/relay/events/stream: expected 200 (headers only) or 405, got {r}"
    );
    let closes = r
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    if closes {
        let closed = c.closed_within(Duration::from_secs(3));
        assert!(
            c.leftover().is_empty(),
            "HEAD /api/v1/relay/events/stream must not send content, but the server sent {:?} after the head",
            String::from_utf8_lossy(c.leftover())
        );
        assert!(closed, "the response to HEAD said `Connection: close`, so the server should close the connection");
    } else {
        let next = c.roundtrip("GET", "/healthz", &[], b"");
        assert_eq!(next.status, 200, "after HEAD on the stream endpoint the next response should parse (no content sent): {next}");
    }
}

fn expect_continue(driver: &str) {
    let server = Server::start(driver, &[]);
    let body = event_json("expect.c", "t", "1");
    let mut c = Conn::open(server.addr);
    c.send_raw(
        format!(
            "POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // The interim response arrives before we send the body.
    let mut interim = [0u8; 25];
    std::io::Read::read_exact(&mut c.stream, &mut interim)
        .expect("`HTTP/1.1 100 Continue` before the body is sent");
    assert_eq!(
        &interim, b"HTTP/1.1 100 Continue\r\n\r\n",
        "interim response to Expect: 100-continue"
    );
    c.send_raw(body.as_bytes());
    let r = c
        .read_response()
        .expect("final response after 100 Continue");
    assert_eq!(r.status, 202, "publish after 100 Continue: {r}");
    assert_eq!(json(&r)["results"][0]["seq"], 1, "{r}");
}

fn many_pipelined_requests(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut c = Conn::open(server.addr);
    let mut bytes = Vec::new();
    for i in 0..100 {
        if i % 2 == 0 {
            bytes.extend(build_request(
                "POST",
                "/api/v1/relay/events",
                &[],
                event_json("pipe.many", "t", &i.to_string()).as_bytes(),
            ));
        } else {
            bytes.extend(build_request(
                "GET",
                "/api/v1/relay/channels/pipe.many/history?limit=1000",
                &[],
                b"",
            ));
        }
    }
    c.send_raw(&bytes);
    for i in 0..100 {
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("pipelined response {i} of 100: {e}"));
        let v = json(&r);
        if i % 2 == 0 {
            assert_eq!(r.status, 202, "pipelined publish {i}: {r}");
            assert_eq!(
                v["results"][0]["seq"],
                i / 2 + 1,
                "pipelined publish {i} answered in order: {r}"
            );
        } else {
            assert_eq!(r.status, 200, "pipelined history {i}: {r}");
            assert_eq!(
                v["seq"],
                i / 2 + 1,
                "pipelined history {i} sees every publish before it: {v}"
            );
        }
    }
}

/// Pipelined publishes to channels of both shards (the other shard's wait for it while the
/// connection reads on) are answered in request order, each channel's seqs in order, with a
/// `/healthz` and a refused publish among them in their places; the last, `Connection:
/// close`, is answered and then the connection ends. With `limits.max_publishes_in_flight` 2
/// the connection reads on only as the oldest are answered, which the client cannot tell.
fn pipelined_publishes_across_shards(driver: &str) {
    let channels = channels_of_both_shards();
    for in_flight in ["64", "2"] {
        let server = start_with_publishes_in_flight(driver, in_flight);
        let what = format!("max_publishes_in_flight {in_flight}");
        let [mut c, _] = conns_on_both_shards(server.addr);
        let mut bytes = Vec::new();
        for i in 0..40usize {
            let channel = &channels[i % 8];
            let close: &[(&str, &str)] = if i == 39 {
                &[("Connection", "close")]
            } else {
                &[]
            };
            bytes.extend(match i {
                17 => build_request("GET", "/healthz", &[], b""),
                23 => build_request("POST", "/api/v1/relay/events", &[], b"{\"channel\":"),
                _ => build_request(
                    "POST",
                    "/api/v1/relay/events",
                    close,
                    event_json(channel, "t", &i.to_string()).as_bytes(),
                ),
            });
        }
        c.send_raw(&bytes);
        let mut seqs = std::collections::HashMap::new();
        for i in 0..40usize {
            let r = c
                .read_response()
                .unwrap_or_else(|e| panic!("pipelined response {i} ({what}): {e}"));
            match i {
                17 => assert_eq!(r.text(), r#"{"status":"ok"}"#, "response {i} ({what}): {r}"),
                23 => {
                    assert_json_error(&r, 400, &format!("response {i}, a bad publish ({what})"));
                }
                _ => {
                    assert_eq!(r.status, 202, "pipelined publish {i} ({what}): {r}");
                    let result = &json(&r)["results"][0];
                    assert_eq!(
                        result["channel"],
                        channels[i % 8],
                        "response {i} in order ({what}): {r}"
                    );
                    let seq = seqs.entry(i % 8).or_insert(0u64);
                    *seq += 1;
                    assert_eq!(
                        result["seq"],
                        *seq,
                        "channel {}'s seqs in order ({what}): {r}",
                        i % 8
                    );
                }
            }
        }
        assert!(
            c.closed_within(READ_TIMEOUT),
            "Connection: close ends the connection ({what})"
        );
        let r = server.get("/healthz");
        assert_eq!(
            r.status, 200,
            "serving after the pipelined publishes ({what}): {r}"
        );
    }
}

fn wrong_methods_elsewhere(driver: &str) {
    let server = Server::start(driver, &[]);
    for (method, path) in [
        ("POST", "/healthz"),
        ("PUT", "/readyz"),
        ("POST", "/metrics"),
        ("DELETE", "/api/v1/relay/channels"),
        ("POST", "/api/v1/relay/events/stream?channel=a"),
        ("GET", "/api/v1/relay/events"),
    ] {
        let r = request(server.addr, method, path, &[], b"");
        assert_json_error(&r, 405, &format!("{method} {path}"));
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 needs an Allow header: {r}"));
        assert!(
            !allow.contains(method),
            "{method} {path}: Allow {allow:?} should not list {method}"
        );
    }
}

/// API.md 1: `data` is "kept byte-for-byte as the publisher sent it". JSON allows CR, LF and
/// CRLF as whitespace; the history API must return them unchanged.
/// `history.max_events` bounds what the whole node retains (each shard keeps its share), the
/// events nearest their expiry going first.
fn history_stays_within_max_events_node_wide(driver: &str) {
    let server = Server::start_with_config(driver, "[history]\nmax_events = 100\n");
    // 100 events on each of three channels, the oldest channel first.
    for chan in ["budget.a", "budget.b", "budget.c"] {
        for half in 0..2 {
            let batch: Vec<String> = (0..50)
                .map(|i| event_json(chan, "t", &(half * 50 + i).to_string()))
                .collect();
            let r = publish(server.addr, &format!("[{}]", batch.join(",")));
            assert_eq!(
                r["results"].as_array().map(Vec::len),
                Some(50),
                "{chan}: {r}"
            );
        }
    }
    let kept = server.metric_sum("relay_history_events");
    let dropped = server.metric_sum("relay_history_budget_drops_total");
    assert!(
        kept <= 100.0,
        "history.max_events = 100: the node retains at most 100 events, got {kept}"
    );
    assert_eq!(
        kept + dropped,
        300.0,
        "every event is either retained or counted in relay_history_budget_drops_total \
         (retained {kept}, dropped {dropped})"
    );
    // The newest channel's newest events are what is left on its shard.
    let r = server.get("/api/v1/relay/channels/budget.c/history?since=99");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        json(&r)["events"][0]["seq"],
        100,
        "budget.c keeps its newest: {r}"
    );
    // Publishing goes on as before.
    let r = publish(server.addr, &event_json("budget.a", "t", "1"));
    assert_eq!(r["results"][0]["duplicate"], false, "{r}");
}

fn history_keeps_data_bytes_with_line_breaks(driver: &str) {
    let server = Server::start(driver, &[]);
    for (chan, raw_data) in [
        ("lb.lf", "{\"a\":\n  1,\n \"b\": [2]}"),
        ("lb.crlf", "{\"a\":\r\n  1,\r\n \"b\": [2]}"),
        ("lb.cr", "{\"a\":\r  1,\r \"b\": [2]}"),
    ] {
        publish(
            server.addr,
            &format!("{{\"channel\":\"{chan}\",\"type\":\"t\",\"data\":{raw_data}}}"),
        );
        let h = server.get(&format!("/api/v1/relay/channels/{chan}/history"));
        assert_eq!(h.status, 200, "{h}");
        assert!(
            h.text().contains(&format!("\"data\":{raw_data}")),
            "{chan}: history should return data byte for byte, i.e. contain {:?}; got {:?}",
            raw_data,
            h.text()
        );
        assert_eq!(
            json(&h)["events"][0]["data"],
            serde_json::json!({"a": 1, "b": [2]}),
            "{chan}: {h}"
        );
    }
}

/// API.md 1: "A publisher-given `id` already in the channel's history is not published twice":
/// the same id on another channel is a new event, and so is an id no longer in history.
fn idempotency_is_per_channel_and_bounded_by_history(driver: &str) {
    let server = Server::start_with_config(driver, "[history]\nsize = 2\n");
    let ev =
        |chan: &str, id: &str| format!(r#"{{"channel":"{chan}","type":"t","id":"{id}","data":1}}"#);
    let v = publish(
        server.addr,
        &format!("[{},{}]", ev("per.a", "same-id"), ev("per.b", "same-id")),
    );
    for (i, chan) in ["per.a", "per.b"].iter().enumerate() {
        assert_eq!(v["results"][i]["channel"], *chan, "{v}");
        assert_eq!(v["results"][i]["seq"], 1, "{chan}: first event: {v}");
        assert_eq!(
            v["results"][i]["duplicate"], false,
            "the same id on another channel is not a duplicate: {v}"
        );
    }
    // Push `same-id` out of per.a's history (size 2), then send it again: a new event.
    publish(server.addr, &ev("per.a", "x-2"));
    publish(server.addr, &ev("per.a", "x-3"));
    let v = publish(server.addr, &ev("per.a", "same-id"));
    assert_eq!(
        v["results"][0]["duplicate"], false,
        "an id no longer in history is published again: {v}"
    );
    assert_eq!(v["results"][0]["seq"], 4, "{v}");
    // While x-3 is still in history it is a duplicate.
    let v = publish(server.addr, &ev("per.a", "x-3"));
    assert_eq!(
        v["results"][0]["duplicate"], true,
        "x-3 is still in history: {v}"
    );
    assert_eq!(v["results"][0]["seq"], 3, "{v}");
}
