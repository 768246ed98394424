//! NATS mode (`--target-kind nats`) end to end through the library API, against a small fake
//! nats-server in this process (CI machines have no nats-server): std threads, the WebSocket
//! upgrade, `INFO`, `PING`/`PONG`, and every `PUB` from the TCP port forwarded as `MSG` to the
//! WebSocket subscribers of its subject, several messages per frame and messages cut across
//! frames. It only listens on 127.0.0.1. The tests assert counts, never timings.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_loadgen::wsframe::{CLIENT_KEY, EXPECTED_ACCEPT};
use relay_loadgen::{Driver, LoadgenError, Options, Ramp, RatePlan, Scenario};

/// Payload bytes per WebSocket frame the fake sends: small, so messages are cut across frames
/// and several short ones share a frame.
const FRAME_MAX: usize = 333;
/// How long a fake server thread blocks in a read before it looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// Every CONNECT is answered `-ERR 'Authorization Violation'` and the connection closed.
    RefuseAuth,
}

/// A subscriber's outgoing side: NATS bytes waiting to be framed, and its socket.
struct Outbox {
    stream: TcpStream,
    pending: Vec<u8>,
    frames: u64,
}

impl Outbox {
    /// Sends what is pending in frames of at most `FRAME_MAX` bytes, binary and text
    /// alternately (nats-server sends binary; both must be accepted).
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for piece in pending.chunks(FRAME_MAX) {
            let op = if self.frames.is_multiple_of(2) {
                0x2
            } else {
                0x1
            };
            self.frames += 1;
            let _ = self.stream.write_all(&server_frame(op, piece));
        }
    }
}

struct Sub {
    subject: Vec<u8>,
    sid: Vec<u8>,
    out: Arc<Mutex<Outbox>>,
}

struct State {
    mode: Mode,
    stop: AtomicBool,
    subs: Mutex<Vec<Sub>>,
    /// PONGs the subscribers sent back to the fake's own PINGs.
    subscriber_pongs: AtomicU64,
    /// PUBs received from publishers.
    pubs: AtomicU64,
}

struct FakeNats {
    ws: SocketAddr,
    tcp: SocketAddr,
    state: Arc<State>,
}

impl FakeNats {
    fn start(mode: Mode) -> FakeNats {
        let state = Arc::new(State {
            mode,
            stop: AtomicBool::new(false),
            subs: Mutex::new(Vec::new()),
            subscriber_pongs: AtomicU64::new(0),
            pubs: AtomicU64::new(0),
        });
        let ws = accept_loop(state.clone(), ws_conn);
        let tcp = accept_loop(state.clone(), tcp_conn);
        FakeNats { ws, tcp, state }
    }

    fn options(&self, scenario: Scenario) -> Options {
        let mut o = Options::nats(scenario, self.ws, self.tcp);
        o.progress = false;
        o.threads = 2;
        o.duration_s = 1.0;
        o.drain_ms = 5000;
        o.subscribe_timeout_s = 30.0;
        o.deadline_s = Some(120.0);
        o
    }
}

impl Drop for FakeNats {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

/// Listens on 127.0.0.1 and runs `handle` on a thread per connection until the stop flag.
fn accept_loop(state: Arc<State>, handle: fn(Arc<State>, TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        while !state.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(POLL));
                    let state = state.clone();
                    std::thread::spawn(move || handle(state, stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL / 10),
                Err(_) => return,
            }
        }
    });
    addr
}

/// Reads more bytes into `buf`; false at EOF, on an error, or when the fake is stopping.
fn read_more(state: &State, stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if state.stop.load(Ordering::Relaxed) {
            return false;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return false,
        }
    }
}

const INFO: &[u8] = b"INFO {\"server_id\":\"FAKE\",\"version\":\"2.9.10\",\"proto\":1,\"headers\":true,\"max_payload\":1048576}\r\n";

/// An unmasked server frame.
fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | op];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// The first complete masked client frame in `buf`: (opcode, unmasked payload, bytes used).
fn client_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    assert!(b1 & 0x80 != 0, "client frames must be masked");
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    let mut payload = buf.get(at + 4..at + 4 + len)?.to_vec();
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
    Some((b0 & 0x0f, payload, at + 4 + len))
}

/// One client protocol item at the start of `buf`: (line, payload of a PUB, bytes used).
fn client_item(buf: &[u8]) -> Option<(Vec<u8>, Vec<u8>, usize)> {
    let nl = buf.iter().position(|&b| b == b'\n')?;
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]).to_vec();
    if line.starts_with(b"PUB ") {
        let size: usize = std::str::from_utf8(line.rsplit(|&b| b == b' ').next()?)
            .ok()?
            .parse()
            .ok()?;
        let total = nl + 1 + size + 2;
        let payload = buf.get(nl + 1..nl + 1 + size)?.to_vec();
        assert_eq!(buf.get(total - 2..total)?, b"\r\n", "PUB payload then CRLF");
        return Some((line, payload, total));
    }
    Some((line, Vec::new(), nl + 1))
}

/// A WebSocket client: upgrade, INFO, then CONNECT / SUB / PING / PONG from the client.
fn ws_conn(state: Arc<State>, mut stream: TcpStream) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 8192 || !read_more(&state, &mut stream, &mut buf) {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("get / http/1.1\r\n"), "{head}");
    assert!(
        !head.contains("authorization:"),
        "NATS takes credentials in CONNECT"
    );
    if !head.contains(&format!(
        "sec-websocket-key: {}",
        CLIENT_KEY.to_ascii_lowercase()
    )) {
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    assert_eq!(buf.len(), head_end, "no data before the 101");
    buf.clear();
    let upgrade = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {EXPECTED_ACCEPT}\r\n\r\n"
    );
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let out = Arc::new(Mutex::new(Outbox {
        stream: writer,
        pending: Vec::new(),
        frames: 0,
    }));
    {
        let mut o = out.lock().unwrap();
        let _ = o.stream.write_all(upgrade.as_bytes());
        o.pending.extend_from_slice(INFO);
        o.flush();
    }
    let mut nats = Vec::new();
    let mut pinged = false;
    loop {
        while let Some((op, payload, used)) = client_frame(&buf) {
            buf.drain(..used);
            match op {
                0x0..=0x2 => nats.extend_from_slice(&payload),
                0x8 => {
                    let mut o = out.lock().unwrap();
                    let _ = o.stream.write_all(&server_frame(0x8, &payload));
                    return;
                }
                _ => {}
            }
        }
        while let Some((line, _, used)) = client_item(&nats) {
            nats.drain(..used);
            let mut o = out.lock().unwrap();
            if line.starts_with(b"CONNECT ") {
                let json: serde_json::Value =
                    serde_json::from_slice(&line[8..]).expect("CONNECT JSON");
                assert_eq!(json["verbose"], false);
                if state.mode == Mode::RefuseAuth {
                    o.pending
                        .extend_from_slice(b"-ERR 'Authorization Violation'\r\n");
                    o.flush();
                    let _ = o.stream.write_all(&server_frame(0x8, &[0x03, 0xf0]));
                    return;
                }
            } else if let Some(rest) = line.strip_prefix(b"SUB ") {
                let f: Vec<&[u8]> = rest.split(|&b| b == b' ').collect();
                state.subs.lock().unwrap().push(Sub {
                    subject: f[0].to_vec(),
                    sid: f[f.len() - 1].to_vec(),
                    out: out.clone(),
                });
            } else if line == b"PING" {
                o.pending.extend_from_slice(b"PONG\r\n");
                if !pinged {
                    // The server's own keepalive: the client must answer it.
                    o.pending.extend_from_slice(b"PING\r\n");
                    pinged = true;
                }
                o.flush();
            } else if line == b"PONG" {
                state.subscriber_pongs.fetch_add(1, Ordering::Relaxed);
            } else {
                panic!(
                    "unexpected client line {:?}",
                    String::from_utf8_lossy(&line)
                );
            }
        }
        if !read_more(&state, &mut stream, &mut buf) {
            return;
        }
    }
}

/// A NATS TCP client (the publishers): INFO, then CONNECT / PUB / PING.
fn tcp_conn(state: Arc<State>, mut stream: TcpStream) {
    if stream.write_all(INFO).is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        let mut touched: Vec<Arc<Mutex<Outbox>>> = Vec::new();
        while let Some((line, payload, used)) = client_item(&buf) {
            buf.drain(..used);
            if line.starts_with(b"CONNECT ") {
                if state.mode == Mode::RefuseAuth {
                    let _ = stream.write_all(b"-ERR 'Authorization Violation'\r\n");
                    return;
                }
            } else if let Some(rest) = line.strip_prefix(b"PUB ") {
                state.pubs.fetch_add(1, Ordering::Relaxed);
                let subject = rest.split(|&b| b == b' ').next().unwrap_or_default();
                for sub in state.subs.lock().unwrap().iter() {
                    if sub.subject != subject {
                        continue;
                    }
                    let mut o = sub.out.lock().unwrap();
                    o.pending.extend_from_slice(b"MSG ");
                    o.pending.extend_from_slice(subject);
                    o.pending.push(b' ');
                    o.pending.extend_from_slice(&sub.sid);
                    o.pending
                        .extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
                    o.pending.extend_from_slice(&payload);
                    o.pending.extend_from_slice(b"\r\n");
                    if !touched.iter().any(|t| Arc::ptr_eq(t, &sub.out)) {
                        touched.push(sub.out.clone());
                    }
                }
            } else if line == b"PING" {
                // Everything published before the PING has gone out before its PONG.
                for t in touched.drain(..) {
                    t.lock().unwrap().flush();
                }
                if stream.write_all(b"PONG\r\n").is_err() {
                    return;
                }
            } else if line != b"PONG" {
                panic!(
                    "unexpected publisher line {:?}",
                    String::from_utf8_lossy(&line)
                );
            }
        }
        for t in touched {
            t.lock().unwrap().flush();
        }
        if !read_more(&state, &mut stream, &mut buf) {
            return;
        }
    }
}

fn run(o: &Options) -> relay_loadgen::Report {
    relay_loadgen::run(o).unwrap_or_else(|e| panic!("{:?} run failed: {e}", o.scenario))
}

/// Every published event reached every subscriber of its subject exactly once, in order.
fn assert_clean(r: &relay_loadgen::Report, published: u64, expected: u64) {
    let ctx = r.to_table();
    assert_eq!(r.target_kind, "nats", "{ctx}");
    assert_eq!(r.sent, published, "sent\n{ctx}");
    assert_eq!(r.published, published, "published (PONG-acked)\n{ctx}");
    assert_eq!(r.publish_failed, 0, "{ctx}");
    assert_eq!(r.unsent, 0, "{ctx}");
    assert_eq!(r.expected, expected, "{ctx}");
    assert_eq!(r.delivered, expected, "{ctx}");
    assert_eq!(r.lost, 0, "{ctx}");
    assert_eq!(r.duplicated, 0, "{ctx}");
    assert_eq!(r.out_of_order, 0, "{ctx}");
    assert_eq!(r.seq_gaps, 0, "{ctx}");
    assert_eq!(r.foreign, 0, "{ctx}");
    assert_eq!(r.protocol_errors, 0, "{ctx}");
    assert_eq!(r.disconnected, 0, "{ctx}");
    assert_eq!(r.latency_us.count, expected, "{ctx}");
    assert_eq!(r.connections.subscribed, r.connections.subscribers as u64);
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let bound = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < bound, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn latency_through_fake_nats_delivers_every_event_once() {
    let fake = FakeNats::start(Mode::Normal);
    for driver in [Driver::Auto, Driver::Epoll] {
        let mut o = fake.options(Scenario::Latency);
        o.driver = driver;
        o.subscribers = 12;
        o.channels = 3;
        o.publishers = 2;
        o.rate = RatePlan::Fixed(300);
        let pongs_before = fake.state.subscriber_pongs.load(Ordering::Relaxed);
        let r = run(&o);
        // 300 events over 3 subjects of 4 subscribers each.
        assert_clean(&r, 300, 300 * 4);
        assert_eq!(r.ack_latency_us.count, 300);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("report JSON");
        assert_eq!(v["target_kind"], "nats");
        assert_eq!(v["publish_target"], fake.tcp.to_string());
        assert_eq!(v["config"]["target_kind"], "nats");
        assert!(r.to_table().contains("nats-server at"), "{}", r.to_table());
        // Each subscriber answered the server's own PING.
        eventually("every subscriber answered the server's PING", || {
            fake.state.subscriber_pongs.load(Ordering::Relaxed) >= pongs_before + 12
        });
    }
}

#[test]
fn fanout_ramp_with_batched_pubs_through_fake_nats() {
    let fake = FakeNats::start(Mode::Normal);
    let mut o = fake.options(Scenario::Fanout);
    o.subscribers = 30;
    o.publishers = 2;
    o.batch = 4;
    o.event_bytes = 400;
    o.rate = RatePlan::Ramp(Ramp {
        start: 100,
        end: 200,
        factor: 2.0,
    });
    o.step_s = 0.5;
    let r = run(&o);
    // 50 + 100 events, each to all 30 subscribers of the one subject.
    assert_clean(&r, 150, 150 * 30);
    assert_eq!(r.steps.len(), 2);
    for s in &r.steps {
        assert_eq!(s.delivered, s.expected, "step {}", s.index);
        assert_eq!(s.lost, 0);
    }
    assert!(r
        .ramp
        .as_ref()
        .is_some_and(|ramp| ramp.stopped_early.is_none()));
    assert_eq!(fake.state.pubs.load(Ordering::Relaxed), 150);
}

#[test]
fn idle_and_connect_through_fake_nats() {
    let fake = FakeNats::start(Mode::Normal);
    let mut o = fake.options(Scenario::Idle);
    o.idle_steps = vec![10, 20];
    o.channels = 3;
    o.settle_s = 0.1;
    let r = run(&o);
    let idle = r.idle.as_ref().expect("idle report");
    // The fake listens in this process: the pid is found the same way as relay's.
    assert_eq!(idle.server_pid, std::process::id());
    assert_eq!(idle.steps.len(), 2);
    assert_eq!(idle.steps[1].subscribed, 20);
    assert_eq!(r.connections.subscribe_failed, 0);
    assert_eq!(r.disconnected, 0);

    let mut o = fake.options(Scenario::Connect);
    o.concurrency = 2;
    o.duration_s = 0.5;
    let r = run(&o);
    let c = r.connect.as_ref().expect("connect report");
    assert!(c.handshakes > 0);
    assert_eq!(c.failures, 0, "{:?}", r.notes);
}

#[test]
fn authorization_violation_is_a_clear_error() {
    let fake = FakeNats::start(Mode::RefuseAuth);
    let mut o = fake.options(Scenario::Latency);
    o.subscribers = 3;
    o.channels = 1;
    o.publishers = 1;
    match relay_loadgen::run(&o) {
        Err(e @ LoadgenError::Setup { .. }) => {
            let m = e.to_string();
            assert!(m.contains("Authorization Violation"), "{m}");
        }
        other => panic!("expected a Setup error, got {other:?}"),
    }
}

#[test]
fn nothing_at_the_publish_port_is_a_clear_error() {
    let fake = FakeNats::start(Mode::Normal);
    let unused = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = unused.local_addr().expect("addr");
    drop(unused);
    let mut o = fake.options(Scenario::Latency);
    o.nats_publish_addr = Some(addr);
    match relay_loadgen::run(&o) {
        Err(e @ LoadgenError::TargetUnreachable { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("--nats-publish-addr") && m.contains(&addr.to_string()),
                "{m}"
            );
        }
        other => panic!("expected TargetUnreachable, got {other:?}"),
    }
}
