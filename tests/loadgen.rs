//! Black-box tests of the bundled load generator against the real relay binary, once per I/O
//! driver (the generator runs the same driver as the relay, so both of its paths are used):
//! each scenario, small and short, through the `relay_loadgen` library API. They assert counts
//! and the report's shape, never timings.

mod common;

use std::time::Duration;

use relay_loadgen::report::Report;
use relay_loadgen::{
    CloseMode, Driver, LoadgenError, Options, PublishVia, Ramp, RatePlan, Scenario, Transport,
};

use common::*;

both_drivers!(
    latency_delivers_every_event_once_and_in_order,
    http_batches_are_counted_per_event,
    websocket_publishers,
    sse_subscribers,
    channels_spread_over_many_channels,
    fanout_ramp_reports_every_step,
    ingest_closed_loop_counts_accepted_events,
    connect_counts_handshakes,
    idle_reports_the_relays_rss,
    refused_subscribers_are_a_clear_error,
    congested_batches_are_refused_whole_or_reported_per_event,
);

/// Options for a small run against `server`, with the generator on the relay's driver.
fn small(scenario: Scenario, server: &Server) -> Options {
    let mut o = Options::with_target(scenario, server.addr);
    o.progress = false;
    o.threads = 2;
    o.driver = if server.driver == "epoll" {
        Driver::Epoll
    } else {
        Driver::IoUring
    };
    o.duration_s = 1.0;
    // Generous bounds for a debug relay on a busy machine; a drain ends as soon as
    // everything is in, so they cost nothing when all goes well.
    o.drain_ms = 5000;
    o.subscribe_timeout_s = 30.0;
    o
}

fn run(o: &Options) -> Report {
    relay_loadgen::run(o).unwrap_or_else(|e| panic!("{:?} run failed: {e}", o.scenario))
}

/// Every accepted event reached every subscriber of its channel exactly once, in order.
fn assert_clean_delivery(r: &Report, published: u64, expected: u64) {
    let ctx = r.to_table();
    assert_eq!(r.published, published, "published\n{ctx}");
    assert_eq!(r.sent, published, "sent\n{ctx}");
    assert_eq!(r.publish_failed, 0, "publish failures\n{ctx}");
    assert_eq!(r.unsent, 0, "unsent\n{ctx}");
    assert_eq!(r.expected, expected, "expected deliveries\n{ctx}");
    assert_eq!(r.delivered, expected, "delivered\n{ctx}");
    assert_eq!(r.lost, 0, "lost\n{ctx}");
    assert_eq!(r.duplicated, 0, "duplicated\n{ctx}");
    assert_eq!(r.out_of_order, 0, "out of order\n{ctx}");
    assert_eq!(r.seq_gaps, 0, "seq gaps\n{ctx}");
    assert_eq!(r.disconnected, 0, "disconnected\n{ctx}");
    assert_eq!(r.foreign, 0, "foreign events\n{ctx}");
    assert_eq!(r.protocol_errors, 0, "protocol errors\n{ctx}");
    assert_eq!(
        r.latency_us.count, expected,
        "one latency per delivery\n{ctx}"
    );
    assert_eq!(r.connections.subscribed, r.connections.subscribers as u64);
    assert_eq!(r.connections.subscribe_failed, 0);
}

fn latency_delivers_every_event_once_and_in_order(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Latency, &server);
    o.subscribers = 20;
    o.channels = 4;
    o.publishers = 2;
    o.rate = RatePlan::Fixed(400);
    let r = run(&o);
    // 400 events spread over 4 channels of 5 subscribers each.
    assert_clean_delivery(&r, 400, 400 * 5);
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.steps[0].rate, 400);
    assert_eq!(r.send_lag_us.count, 400);
    assert_eq!(r.ack_latency_us.count, 400);
    assert!(r.ramp.is_none());

    // The JSON report: exactly one object with the documented fields.
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("report JSON");
    assert!(v.is_object());
    assert_eq!(v["scenario"], "latency");
    assert_eq!(v["delivered"], 2000);
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][key].is_number(), "latency_us.{key}: {v}");
    }
    assert!(v["cpu"]["percent_of_one_core"].is_number());
    assert_eq!(v["config"]["subscribers"], 20);
    assert!(v["rates"]["delivered_per_s"].as_f64().unwrap_or(0.0) > 0.0);
}

fn http_batches_are_counted_per_event(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Latency, &server);
    o.subscribers = 6;
    o.channels = 3;
    o.publishers = 2;
    o.batch = 10;
    o.rate = RatePlan::Fixed(1000);
    let r = run(&o);
    assert_clean_delivery(&r, 1000, 1000 * 2);
}

fn websocket_publishers(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Latency, &server);
    o.subscribers = 8;
    o.channels = 2;
    o.publishers = 2;
    o.publish_via = PublishVia::Ws;
    o.rate = RatePlan::Fixed(300);
    let r = run(&o);
    assert_clean_delivery(&r, 300, 300 * 4);
}

fn sse_subscribers(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Sse, &server);
    o.subscribers = 10;
    o.channels = 2;
    o.publishers = 2;
    o.rate = RatePlan::Fixed(300);
    let r = run(&o);
    assert_eq!(r.scenario, "sse");
    assert_clean_delivery(&r, 300, 300 * 5);
}

fn channels_spread_over_many_channels(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Channels, &server);
    o.channels = 200;
    o.subscribers = 200;
    o.publishers = 2;
    o.rate = RatePlan::Fixed(1000);
    let r = run(&o);
    // One subscriber per channel: one delivery per event.
    assert_clean_delivery(&r, 1000, 1000);
}

fn fanout_ramp_reports_every_step(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Fanout, &server);
    o.subscribers = 30;
    o.publishers = 2;
    o.rate = RatePlan::Ramp(Ramp {
        start: 100,
        end: 400,
        factor: 2.0,
    });
    o.step_s = 0.5;
    // The stop rule is about timing; keep it out of a count test.
    o.stop_p99_ms = 60_000.0;
    let r = run(&o);
    let rates: Vec<u64> = r.steps.iter().map(|s| s.rate).collect();
    assert_eq!(rates, vec![100, 200, 400]);
    for s in &r.steps {
        let events = s.rate / 2;
        assert_eq!(s.published, events, "step {}: {}", s.index, r.to_table());
        assert_eq!(s.expected, events * 30, "step {}", s.index);
        assert_eq!(
            s.delivered,
            s.expected,
            "step {}: {}",
            s.index,
            r.to_table()
        );
        assert_eq!(s.lost, 0);
        assert_eq!(s.latency_us.count, s.delivered);
    }
    assert_clean_delivery(&r, 350, 350 * 30);
    let ramp = r.ramp.as_ref().expect("a ramp summary");
    assert!(ramp.stopped_early.is_none(), "{:?}", ramp.stopped_early);
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("report JSON");
    assert_eq!(v["steps"].as_array().map(Vec::len), Some(3));
    assert!(v["ramp"].is_object());
}

fn ingest_closed_loop_counts_accepted_events(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Ingest, &server);
    o.publishers = 2;
    o.batch = 20;
    o.pipeline = 4;
    o.channels = 8;
    assert_eq!(o.rate, RatePlan::Unlimited);
    let r = run(&o);
    let ctx = r.to_table();
    assert!(r.published > 0, "{ctx}");
    assert_eq!(r.published, r.sent, "{ctx}");
    assert_eq!(r.publish_failed, 0, "{ctx}");
    assert_eq!(r.published % 20, 0, "whole batches of 20: {ctx}");
    assert_eq!(r.ack_latency_us.count, r.published);
    assert_eq!((r.expected, r.delivered), (0, 0));
    assert_eq!(r.connections.subscribers, 0);
    assert!(r.rates.published_per_s > 0.0);
}

fn connect_counts_handshakes(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Connect, &server);
    o.concurrency = 4;
    let r = run(&o);
    let c = r.connect.as_ref().expect("a connect report");
    assert!(c.handshakes > 0, "{}", r.to_table());
    assert_eq!(c.failures, 0, "{}", r.to_table());
    assert_eq!(c.latency_us.count, c.handshakes);
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.steps[0].delivered, c.handshakes);
    assert!(c.handshakes_per_s > 0.0);
    // Graceful: every connection ended with the client's close frame (1000).
    assert_closes(&server, "1000", c.handshakes);

    // Abortive: every connection ended by a RST, which relay counts as 1006 (no close frame).
    o.close = CloseMode::Reset;
    let r = run(&o);
    let c = r.connect.as_ref().expect("a connect report");
    assert!(c.handshakes > 0, "{}", r.to_table());
    assert_eq!(c.failures, 0, "{}", r.to_table());
    assert!(r.to_table().contains("close reset"), "{}", r.to_table());
    assert_closes(&server, "1006", c.handshakes);
    // The resets cost relay nothing but the connections: it still serves.
    assert_eq!(server.get("/healthz").status, 200);
}

/// Asserts relay counts at least `want` WebSocket closes with `code`, waiting (bounded) for
/// it: the last connections of a run may end on relay's side just after the generator returns.
fn assert_closes(server: &Server, code: &str, want: u64) {
    let name = format!("relay_ws_closes_total{{code=\"{code}\"}}");
    let got = wait_metric_at_least(server, &name, want as f64, Duration::from_secs(10));
    assert!(got >= want as f64, "{name} is {got}, want at least {want}");
}

fn idle_reports_the_relays_rss(driver: &str) {
    let server = Server::start(driver, &[]);
    let mut o = small(Scenario::Idle, &server);
    o.idle_steps = vec![100, 200];
    o.channels = 10;
    o.settle_s = 0.2;
    // The relay's pid is found from its listening socket.
    assert_eq!(o.server_pid, None);
    let r = run(&o);
    let idle = r.idle.as_ref().expect("an idle report");
    assert_eq!(idle.server_pid, server.child.id());
    assert!(idle.server_rss_before_kib > 0);
    assert_eq!(idle.steps.len(), 2);
    for (step, want) in idle.steps.iter().zip([100usize, 200]) {
        assert_eq!(step.connections, want);
        assert_eq!(step.subscribed, want as u64);
        assert!(step.server_rss_kib > 0);
        // A sane figure: a connection costs the relay well under a mebibyte.
        assert!(
            step.rss_per_conn_bytes.abs() < 1_048_576.0,
            "{} bytes per connection",
            step.rss_per_conn_bytes
        );
    }
    assert_eq!(r.disconnected, 0);

    // The same with SSE streams.
    let mut sse = o.clone();
    sse.transport = Transport::Sse;
    sse.idle_steps = vec![100];
    let r = run(&sse);
    let idle = r.idle.as_ref().expect("an idle report for SSE streams");
    assert_eq!(idle.steps.len(), 1);
    assert_eq!(idle.steps[0].subscribed, 100);
    assert!(idle.steps[0].rss_per_conn_bytes.abs() < 1_048_576.0);
    assert_eq!(r.disconnected, 0);

    // An explicit pid that is not a process is a clear error, not a panic.
    o.server_pid = Some(u32::MAX);
    match relay_loadgen::run(&o) {
        Err(LoadgenError::ServerProcess(m)) => assert!(m.contains("/proc/"), "{m}"),
        other => panic!("expected a ServerProcess error, got {other:?}"),
    }
}

fn refused_subscribers_are_a_clear_error(driver: &str) {
    // With a JWT secret, a subscriber without a token is refused with 401 before the upgrade.
    let server = Server::start_with_config(driver, "[auth]\njwt_secret = \"loadgen-test\"\n");
    let mut o = small(Scenario::Latency, &server);
    o.subscribers = 4;
    o.channels = 1;
    o.publishers = 1;
    match relay_loadgen::run(&o) {
        Err(e @ LoadgenError::Setup { .. }) => {
            let m = e.to_string();
            assert!(m.contains("401"), "{m}");
        }
        other => panic!("expected a Setup error, got {other:?}"),
    }
}

#[test]
fn nothing_listening_is_a_clear_error() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = unused.local_addr().expect("addr");
    drop(unused);
    for scenario in [Scenario::Latency, Scenario::Connect, Scenario::Idle] {
        let mut o = Options::with_target(scenario, addr);
        o.progress = false;
        match relay_loadgen::run(&o) {
            Err(e @ LoadgenError::TargetUnreachable { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains(&addr.to_string()) && m.contains("--target"),
                    "{m}"
                );
            }
            other => panic!("{scenario:?}: expected TargetUnreachable, got {other:?}"),
        }
    }
}

/// Under ring congestion (tiny rings between the two shards), a batch spanning both owners is
/// refused whole (503) or, when an owner refused its part after the other part was accepted,
/// answered 207 with an `error` per refused event. Either way every delivered event is one the
/// publisher was told was accepted: no "unconfirmed" deliveries that a retry would duplicate.
fn congested_batches_are_refused_whole_or_reported_per_event(driver: &str) {
    let server = Server::start_with_config(driver, "[bus]\nring_capacity = 2\nmax_batch = 1\n");
    let mut o = small(Scenario::Latency, &server);
    o.subscribers = 32;
    o.channels = 32;
    o.publishers = 4;
    o.batch = 50;
    o.pipeline = 16;
    o.rate = RatePlan::Unlimited;
    let r = run(&o);
    let ctx = r.to_table();
    assert!(
        r.publish_failed > 0,
        "the tiny rings refused something\n{ctx}"
    );
    assert!(r.published > 0, "and accepted something\n{ctx}");
    assert_eq!(
        r.unconfirmed_deliveries, 0,
        "deliveries of refused events\n{ctx}"
    );
    assert_eq!(
        r.delivered, r.expected,
        "every accepted event was delivered\n{ctx}"
    );
    assert_eq!((r.duplicated, r.out_of_order), (0, 0), "{ctx}");
}
