//! HTTP/1.1 request codec: `parse_head` on three representative heads and the chunked
//! `BodyDecoder` on a 16 KiB body fed in 1 KiB pieces.
//!
//! Every request relay serves (publishes, health checks, SSE and WebSocket upgrades) goes
//! through `parse_head` first, and chunked publish bodies through `BodyDecoder`, on the shard
//! thread that also delivers events. Their cost per byte bounds how much of a core the request
//! path takes before any routing or bus work happens. Throughput is reported in input bytes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay::http::codec::{parse_head, BodyDecoder, BodyKind, Limits, Parsed};

/// The smallest request relay sees: a load balancer health probe.
const SMALL_GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n";

/// A publish as an HTTP client library typically sends it: 8 header fields.
const PUBLISH_POST: &[u8] = b"POST /api/v1/relay/events HTTP/1.1\r\n\
Host: relay.internal:8080\r\n\
User-Agent: sift-publisher/2.3.1 (rust; reqwest 0.12)\r\n\
Accept: application/json\r\n\
Content-Type: application/json\r\n\
Content-Length: 187\r\n\
Authorization: Bearer rk_live_7f3c9a2e4b1d48c6a0e5f9b2d7c1e3a8\r\n\
X-Request-Id: 0190f5a2-7c3e-7b4d-9a1f-2e6c8d4b0a17\r\n\
Connection: keep-alive\r\n\
\r\n";

/// A browser-style request behind a couple of proxies: 30 header fields.
fn many_headers_get() -> Vec<u8> {
    let mut req =
        b"GET /api/v1/relay/events/stream?channels=doc.42,doc.43&types=document.* HTTP/1.1\r\n\
Host: relay.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/event-stream\r\n\
Accept-Language: en-GB,en;q=0.7,de;q=0.3\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Cache-Control: no-cache\r\n\
Pragma: no-cache\r\n\
Connection: keep-alive\r\n\
Referer: https://app.example.com/documents/42\r\n\
Origin: https://app.example.com\r\n\
Cookie: session=7f3c9a2e4b1d48c6a0e5f9b2d7c1e3a8; theme=dark; consent=1\r\n\
Authorization: Bearer rk_live_7f3c9a2e4b1d48c6a0e5f9b2d7c1e3a8\r\n\
Last-Event-ID: k3x9AbCd:1742\r\n\
Sec-Fetch-Dest: empty\r\n\
Sec-Fetch-Mode: cors\r\n\
Sec-Fetch-Site: same-site\r\n\
DNT: 1\r\n\
X-Forwarded-For: 203.0.113.7, 10.0.3.14\r\n\
X-Forwarded-Proto: https\r\n\
X-Forwarded-Host: relay.example.com\r\n\
X-Real-IP: 203.0.113.7\r\n\
X-Request-Id: 0190f5a2-7c3e-7b4d-9a1f-2e6c8d4b0a17\r\n\
Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
Tracestate: vendor=t61rcWkgMzE\r\n"
            .to_vec();
    // 24 header fields so far; pad to 30 with distinct application headers.
    for i in 0..6 {
        req.extend_from_slice(format!("X-App-Hint-{i}: value-{i}-abcdefgh\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// `body` as a chunked transfer coding with `chunk` bytes per chunk, then the last-chunk.
fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 8 + 8);
    for piece in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn bench_parse_head(c: &mut Criterion) {
    let limits = Limits::default();
    let many = many_headers_get();
    let cases: [(&str, &[u8], usize); 3] = [
        ("small_get", SMALL_GET, 1),
        ("publish_post_8_headers", PUBLISH_POST, 8),
        ("get_30_headers", &many, 30),
    ];

    let mut group = c.benchmark_group("parse_head");
    for (name, req, headers) in cases {
        // Guard against benchmarking an error path by accident.
        match parse_head(req, &limits) {
            Ok(Parsed::Complete(head)) => {
                assert_eq!(head.head_len, req.len(), "{name}");
                assert_eq!(head.header_count(), headers, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        group.throughput(Throughput::Bytes(req.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), req, |b, req| {
            b.iter(|| parse_head(black_box(req), &limits))
        });
    }
    group.finish();
}

fn bench_chunked_body(c: &mut Criterion) {
    const BODY: usize = 16 * 1024;
    const CHUNK: usize = 1024;
    let limits = Limits::default();
    // Printable JSON-ish bytes rather than zeros, like a real batch publish.
    let body: Vec<u8> = (0..BODY).map(|i| b"{\"k\":[1,2,3]} "[i % 14]).collect();
    let wire = chunked(&body, CHUNK);

    // Sanity: decodes to exactly the body and consumes every byte.
    let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits).expect("chunked is accepted");
    let mut out = Vec::new();
    assert_eq!(dec.decode(&wire, &mut out), Ok((wire.len(), true)));
    assert_eq!(out, body);

    let mut group = c.benchmark_group("body_decoder");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    // The whole encoded body in one call, as when the read buffer already holds it all.
    group.bench_function("chunked_16KiB_1KiB_chunks", |b| {
        let mut out = Vec::with_capacity(BODY);
        b.iter(|| {
            out.clear();
            let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits).expect("accepted");
            let r = dec.decode(black_box(&wire), &mut out);
            black_box(&out);
            r
        })
    });
    // The same bytes arriving in 1 KiB reads, so chunk framing straddles read boundaries.
    group.bench_function("chunked_16KiB_1KiB_chunks_fed_1KiB_reads", |b| {
        let mut out = Vec::with_capacity(BODY);
        b.iter(|| {
            out.clear();
            let mut dec = BodyDecoder::new(&BodyKind::Chunked, &limits).expect("accepted");
            let mut done = false;
            for read in black_box(&wire).chunks(CHUNK) {
                let (used, fin) = dec.decode(read, &mut out).expect("valid body");
                debug_assert_eq!(used, read.len());
                done = fin;
            }
            assert!(done);
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_parse_head, bench_chunked_body);
criterion_main!(benches);
