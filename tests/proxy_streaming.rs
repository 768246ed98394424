//! Black-box tests of proxied bodies (API.md section 6, issue 4 "Bodies stream through in both
//! directions"): large request and response bodies with `Content-Length` and chunked framing
//! pass through intact; a request body reaches the upstream before the client has finished
//! sending it; a response body reaches the client before the upstream has finished sending it;
//! `limits.max_body_bytes` bounds both directions; HEAD keeps the upstream's length. Each test
//! runs on both I/O drivers against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::upstream::{Behaviour, Upstream};
use common::*;
use serde_json::json;

both_drivers!(
    large_bodies_pass_through_both_ways,
    request_body_streams_before_it_is_complete,
    response_body_streams_before_it_is_complete,
    bodies_over_the_limit_are_refused,
    head_keeps_the_upstream_length,
);

/// Bound of every poll for an eventual state.
const EVENTUALLY: Duration = Duration::from_secs(10);

fn register(server: &Server, name: &str, url: &str, route: &str) {
    let body =
        json!({"name": name, "instance": format!("{name}-1"), "url": url, "routes": [route]});
    let r = server.post_json("/api/v1/relay/subsystems", &body.to_string());
    assert_eq!(r.status, 201, "register {name}: {r}");
}

/// `n` bytes of a repeating, position-dependent pattern, so a lost or reordered piece shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b'a' + ((i * 7 + i / 251) % 26) as u8)
        .collect()
}

fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn large_bodies_pass_through_both_ways(driver: &str) {
    let server = Server::start(driver, &[]);
    let echo = Upstream::start("echo", Behaviour::Normal);
    register(&server, "echo", &echo.url(), "/echo");
    let big = pattern(600 * 1024);
    let fixed = Upstream::start(
        "big",
        Behaviour::Fixed {
            status: 200,
            headers: vec![("Content-Type".into(), "application/octet-stream".into())],
            body: big.clone(),
        },
    );
    register(&server, "big", &fixed.url(), "/big");
    let mut conn = Conn::open(server.addr);

    // Content-Length request body, larger than what relay buffers for retries.
    let r = conn.roundtrip("POST", "/echo/cl", &[], &big);
    assert_eq!(r.status, 200, "POST of 600 KiB with Content-Length: {r}");
    let seen = echo.requests();
    let last = seen.last().expect("the upstream got the POST");
    assert_eq!(last.body.len(), big.len(), "upstream body length");
    assert!(last.body == big, "the upstream got the body byte for byte");
    assert_eq!(
        last.header("content-length"),
        Some("614400"),
        "a known length is passed on"
    );

    // Chunked request body: passed on chunked, since the length is unknown.
    let mut raw =
        b"POST /echo/chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(&chunked(&big, 10_000));
    conn.send_raw(&raw);
    let r = conn.read_response().expect("answer to the chunked POST");
    assert_eq!(r.status, 200, "chunked POST: {r}");
    let last = echo.requests().pop().expect("the chunked POST arrived");
    assert!(last.body == big, "the chunked body arrived byte for byte");
    assert_eq!(last.header("transfer-encoding"), Some("chunked"));

    // A small body on the same keep-alive connection still works.
    let r = conn.roundtrip("POST", "/echo/small", &[], b"{\"a\":1}");
    assert_eq!(r.status, 200, "small POST after the large ones: {r}");
    assert_eq!(
        echo.requests().pop().expect("small POST").body,
        b"{\"a\":1}"
    );

    // A large response body with its Content-Length.
    let r = conn.roundtrip("GET", "/big/file", &[], b"");
    assert_eq!(r.status, 200, "large GET: {}", r.status);
    assert_eq!(r.header("content-length"), Some("614400"));
    assert!(r.body == big, "the response body arrived byte for byte");
    let r = conn.roundtrip("GET", "/echo/after", &[], b"");
    assert_eq!(r.status, 200, "keep-alive after a large response: {r}");
}

fn request_body_streams_before_it_is_complete(driver: &str) {
    let server = Server::start(driver, &[]);
    let echo = Upstream::start("echo", Behaviour::Normal);
    register(&server, "echo", &echo.url(), "/echo");
    let body = pattern(512 * 1024);
    let (first, rest) = body.split_at(256 * 1024);

    let mut conn = Conn::open(server.addr);
    let head = format!(
        "PUT /echo/upload HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send_raw(head.as_bytes());
    conn.send_raw(first);
    let deadline = Instant::now() + EVENTUALLY;
    while echo.bytes_read() < first.len() {
        assert!(
            Instant::now() < deadline,
            "the upstream got only {} bytes of the first {} while the client holds back the rest: \
             the body is not streamed",
            echo.bytes_read(),
            first.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(echo.count(), 0, "the request is not complete yet");
    conn.send_raw(rest);
    let r = conn.read_response().expect("answer to the upload");
    assert_eq!(r.status, 200, "streamed upload: {r}");
    let got = echo.requests().pop().expect("the upload arrived");
    assert!(got.body == body, "the streamed body arrived byte for byte");
}

/// Reads from `stream` until `buf` contains `needle`; panics after `EVENTUALLY`.
fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8], what: &str) {
    let deadline = Instant::now() + EVENTUALLY;
    let mut chunk = [0u8; 8192];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        assert!(
            Instant::now() < deadline,
            "{what}: got {:?}",
            String::from_utf8_lossy(buf)
        );
        match stream.read(&mut chunk) {
            Ok(0) => panic!(
                "{what}: connection closed; got {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn response_body_streams_before_it_is_complete(driver: &str) {
    let server = Server::start(driver, &[]);
    let up = Upstream::start(
        "stream",
        Behaviour::StreamGated {
            first: b"first-part".to_vec(),
            second: b"second-part".to_vec(),
        },
    );
    register(&server, "stream", &up.url(), "/stream");
    let mut stream = connect(server.addr);
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    stream
        .write_all(b"GET /stream/x HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send the request");
    let mut buf = Vec::new();
    read_until(
        &mut stream,
        &mut buf,
        b"first-part",
        "the first piece while the upstream holds the rest",
    );
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("transfer-encoding: chunked"),
        "a body of unknown length is passed on chunked: {text}"
    );
    assert!(!text.contains("second-part"));
    up.open_gate();
    read_until(
        &mut stream,
        &mut buf,
        b"0\r\n\r\n",
        "the rest after the gate opened",
    );
    let text = String::from_utf8_lossy(&buf);
    let body_start = text.find("\r\n\r\n").expect("head end") + 4;
    let mut body = Vec::new();
    let mut rest = &buf[body_start..];
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).expect("ascii"), 16)
                .expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    assert_eq!(body, b"first-partsecond-part", "the de-chunked body");

    // The connection carries the next request.
    let mut conn = Conn::from_stream(stream);
    let r = conn.roundtrip("GET", "/stream/again", &[], b"");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body, b"first-partsecond-part");
}

fn bodies_over_the_limit_are_refused(driver: &str) {
    let server = Server::start_with_config(driver, "[limits]\nmax_body_bytes = 100000\n");
    let echo = Upstream::start("echo", Behaviour::Normal);
    register(&server, "echo", &echo.url(), "/echo");
    let fixed = Upstream::start(
        "big",
        Behaviour::Fixed {
            status: 200,
            headers: vec![],
            body: pattern(200_000),
        },
    );
    register(&server, "big", &fixed.url(), "/big");

    // A declared length over the limit: 413 before any byte is forwarded.
    let mut conn = Conn::open(server.addr);
    conn.send_raw(b"POST /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n");
    let r = conn.read_response().expect("413 answer");
    assert_json_error(&r, 413, "a declared body over max_body_bytes");
    assert!(conn.closed_within(EVENTUALLY), "closed after the 413");

    // A chunked body growing past the limit while it streams: 413, then closed.
    let mut conn = Conn::open(server.addr);
    let mut raw =
        b"POST /echo/y HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(&chunked(&pattern(200_000), 20_000));
    let _ = conn.try_send_raw(&raw);
    let r = conn
        .read_response()
        .expect("413 answer to the chunked body");
    assert_json_error(&r, 413, "a chunked body over max_body_bytes");
    assert!(conn.closed_within(EVENTUALLY), "closed after the 413");
    assert!(
        echo.requests().iter().all(|q| q.target != "/echo/y"),
        "the upstream never got a complete request out of it"
    );

    // A response over the limit: 502, not a truncated body.
    let r = request(server.addr, "GET", "/big/file", &[], b"");
    assert_json_error(&r, 502, "a response body over max_body_bytes");

    // Still serving.
    let r = request(server.addr, "POST", "/echo/ok", &[], b"{}");
    assert_eq!(r.status, 200, "{r}");
}

fn head_keeps_the_upstream_length(driver: &str) {
    let server = Server::start(driver, &[]);
    let fixed = Upstream::start(
        "doc",
        Behaviour::Fixed {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: pattern(5000),
        },
    );
    register(&server, "doc", &fixed.url(), "/doc");
    let mut conn = Conn::open(server.addr);
    conn.send("HEAD", "/doc/x", &[], b"");
    let r = conn.read_response_for("HEAD").expect("HEAD answer");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.header("content-length"),
        Some("5000"),
        "the length a GET would get"
    );
    assert!(r.body.is_empty());
    let r = conn.roundtrip("GET", "/doc/x", &[], b"");
    assert_eq!(r.body.len(), 5000, "the connection is in step after HEAD");
}
