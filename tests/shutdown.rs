//! Black-box tests of draining on SIGTERM / SIGINT (API.md section 9), and of SIGHUP being
//! ignored, once per I/O driver.

mod common;

use std::time::Duration;

use common::ws::WsClient;
use common::*;

both_drivers!(
    sigterm_ends_streams_and_exits_zero,
    sigint_drains_too,
    sigterm_when_idle,
    readiness_is_503_while_draining,
    sighup_is_ignored_and_said_so,
    silent_websocket_clients_do_not_hold_the_drain_in_turn,
);

const DRAIN_BOUND: Duration = Duration::from_secs(15);

fn drain_with(driver: &str, signal: libc::c_int, name: &str) {
    let mut server = Server::start(driver, &[]);
    let path = "/api/v1/relay/events/stream?channel=sd.a&channel=sd.b";
    let mut streams = sse_streams_on_both_shards(server.addr, path, 1);
    wait_subscribers(server.addr, &[("sd.a", 2), ("sd.b", 2)]);
    publish(
        server.addr,
        &format!(
            "[{},{}]",
            event_json("sd.a", "t", "1"),
            event_json("sd.b", "t", "2")
        ),
    );
    for (i, s) in streams.iter_mut().enumerate() {
        s.take(2, &format!("stream {i} before {name}"));
    }
    // An idle keep-alive HTTP connection too.
    let mut idle = Conn::open(server.addr);
    let r = idle.roundtrip("GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200, "{r}");

    server.signal(signal);
    for (i, s) in streams.iter_mut().enumerate() {
        assert!(
            s.wait_eof(DRAIN_BOUND),
            "{name}: SSE stream {i} (shard {:?}) should reach EOF when the relay drains; stderr:\n{}",
            s.shard,
            server.stderr()
        );
    }
    let status = server.wait_exit(DRAIN_BOUND).unwrap_or_else(|| {
        panic!(
            "{name}: the relay should exit within 15 s; stderr:\n{}",
            server.stderr()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "{name}: a drain should exit with status 0, got {status}; stderr:\n{}",
        server.stderr()
    );
    assert!(
        idle.closed_within(READ_TIMEOUT),
        "{name}: an idle keep-alive connection should be closed by the drain"
    );
    assert!(
        std::net::TcpStream::connect_timeout(&server.addr, Duration::from_secs(2)).is_err(),
        "{name}: after exit nothing should accept on {}",
        server.addr
    );
}

fn sigterm_ends_streams_and_exits_zero(driver: &str) {
    drain_with(driver, libc::SIGTERM, "SIGTERM");
}

fn sigint_drains_too(driver: &str) {
    drain_with(driver, libc::SIGINT, "SIGINT");
}

fn sigterm_when_idle(driver: &str) {
    let mut server = Server::start(driver, &[]);
    let r = server.get("/readyz");
    assert_eq!(r.status, 200, "{r}");
    let status = server.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM on an idle relay should exit 0, got {status}; stderr:\n{}",
        server.stderr()
    );
}

/// A request already half-read when the drain starts is finished, and it sees the drain:
/// `/readyz` answers 503 (API.md 2: "503 while starting or draining").
fn readiness_is_503_while_draining(driver: &str) {
    let mut server = Server::start(driver, &[]);
    let mut stream = SseStream::open(
        server.addr,
        "/api/v1/relay/events/stream?channel=drain.c",
        None,
    );
    wait_subscribers(server.addr, &[("drain.c", 1)]);
    let mut ready = Conn::open(server.addr);
    ready.send_raw(b"GET /readyz HTTP/1.1\r\nHost: x\r\n");
    let mut health = Conn::open(server.addr);
    health.send_raw(b"GET /api/v1/relay/health HTTP/1.1\r\nHost: x\r\n");
    // Both heads are partial: make sure the server has read those bytes before the signal.
    let r = server.get("/healthz");
    assert_eq!(r.status, 200, "{r}");
    std::thread::sleep(Duration::from_millis(100));

    server.signal(libc::SIGTERM);
    // The stream ending shows the drain has begun.
    assert!(
        stream.wait_eof(DRAIN_BOUND),
        "SIGTERM: the SSE stream should end; stderr:\n{}",
        server.stderr()
    );

    ready.send_raw(b"\r\n");
    let r = ready
        .read_response()
        .unwrap_or_else(|e| panic!("a half-read /readyz request should still be answered during the drain: {e}; stderr:\n{}", server.stderr()));
    assert_json_error(&r, 503, "/readyz while draining");

    health.send_raw(b"\r\n");
    let r = health
        .read_response()
        .unwrap_or_else(|e| panic!("a half-read /api/v1/relay/health request should still be answered during the drain: {e}"));
    let v = json(&r);
    assert_ne!(
        v["status"], "ok",
        "health while draining should not be ok: {v}"
    );

    let status = server.wait_exit(DRAIN_BOUND).expect("exit within 15 s");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after the drain: {status}"
    );
}

/// SIGHUP's default would end the process without a drain; relay has no reload, so it says
/// so and keeps serving, and a later SIGTERM still drains and exits 0.
fn sighup_is_ignored_and_said_so(driver: &str) {
    let mut server = Server::start(driver, &[]);
    server.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server
        .stderr()
        .contains("SIGHUP: relay does not reload its config; ignored")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a SIGHUP should be logged as ignored; stderr:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.wait_exit(Duration::from_millis(300)),
        None,
        "SIGHUP must not end the relay"
    );
    let r = server.get("/readyz");
    assert_eq!(r.status, 200, "still ready after SIGHUP: {r}");
    let status = server.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after SIGHUP drains and exits 0"
    );
}

/// WebSocket clients that never answer the going-away close each cost the drain one close
/// linger (1 s), all at once, not one after the other: an earlier writer waited for its reader
/// by spinning on its shard's thread for the whole linger, so 40 such clients held a drain for
/// about 20 s per shard.
fn silent_websocket_clients_do_not_hold_the_drain_in_turn(driver: &str) {
    let mut server = Server::start_with_config(driver, "[shutdown]\nclose_spread_ms = 0\n");
    let mut clients: Vec<WsClient> = (0..40)
        .map(|_| {
            let mut client = WsClient::open(server.addr);
            client.welcome();
            client
        })
        .collect();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "a drain with 40 silent WebSocket clients should end within 10 s (about one 1 s \
             linger); stderr:\n{}",
                server.stderr()
            )
        });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    for (i, client) in clients.iter_mut().enumerate() {
        let (code, _) = client.expect_close(READ_TIMEOUT, &format!("silent client {i}"));
        assert_eq!(code, 1001, "silent client {i} should get going-away");
    }
}
