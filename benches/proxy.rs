//! Proxy overhead: one keep-alive GET answered by a small upstream, sent directly to the
//! upstream and through relay's router, from the same blocking client. The difference of the
//! two is what routing adds per request (parse, route lookup, rate-limit and circuit checks,
//! balancer pick, header rewrite, the pooled upstream connection, and passing the answer on).
//!
//! The upstream is a minimal keep-alive HTTP/1.1 server on a std thread answering every
//! request with a fixed 64-byte JSON body; relay runs in-process with one shard (`driver =
//! auto`) routing `/bench` to it. Everything is on 127.0.0.1, so the figures are latency per
//! request on one connection, not throughput.
//!
//! Run: `cargo bench --bench proxy`. Figures are in docs/performance.md.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use relay::config::{Config, SubsystemConfig};

const BODY: &[u8] = br#"{"ok":true,"service":"bench-upstream","padding":"xxxxxxxxxxxxxx"}"#;

/// Serves keep-alive connections forever: each request (no body) gets the fixed answer.
fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the bench upstream");
    let addr = listener.local_addr().expect("upstream addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes();
    response.extend_from_slice(BODY);
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    loop {
        match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        // Answer every complete head in the buffer (pipelining-safe, no bodies expected).
        while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            if stream.write_all(&response).is_err() {
                return;
            }
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            return;
        }
    }
}

/// One keep-alive client connection that sends a GET and reads one Content-Length response.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr, path: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        Client {
            stream,
            request: format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes(),
            buf: vec![0u8; 16 * 1024],
        }
    }

    fn roundtrip(&mut self) {
        self.stream.write_all(&self.request).expect("send");
        let mut filled = 0;
        loop {
            let n = self.stream.read(&mut self.buf[filled..]).expect("read");
            assert!(n > 0, "closed");
            filled += n;
            let head = &self.buf[..filled];
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                assert!(text.starts_with("http/1.1 200"), "{text}");
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if filled >= end + 4 + len {
                    assert_eq!(filled, end + 4 + len, "one response at a time");
                    return;
                }
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let upstream = start_upstream();
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        shards: 1,
        log: "warn".to_string(),
        subsystems: vec![SubsystemConfig {
            name: "bench".to_string(),
            instance: "bench-1".to_string(),
            url: format!("http://{upstream}"),
            routes: vec!["/bench".to_string()],
            ..SubsystemConfig::default()
        }],
        ..Config::default()
    };
    let running = relay::server::start(config).expect("start relay");
    let relay_addr = running.local_addr;

    let mut group = c.benchmark_group("proxy_get_64B");
    let mut direct = Client::new(upstream, "/bench/item");
    group.bench_function("direct_to_upstream", |b| b.iter(|| direct.roundtrip()));
    let mut routed = Client::new(relay_addr, "/bench/item");
    group.bench_function("through_relay", |b| b.iter(|| routed.roundtrip()));
    group.finish();

    running.drain();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
