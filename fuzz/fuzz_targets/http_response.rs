//! The HTTP client's response parsing (src/http/client.rs) over arbitrary bytes from an
//! upstream: status line and headers, framing, interim 1xx responses, and the body
//! (`Content-Length`, chunked, close-delimited).
//!
//! The pure function the unit test `arbitrary_response_bytes_never_panic` calls,
//! `parse_response_head`, is private to the crate, and so is everything else on the response
//! path short of `Client::send`. So this target goes through the public API the way an
//! upstream does: a loopback listener on 127.0.0.1 (a thread of this process) answers each
//! request with the input's bytes and closes; one `Client` per input sends a request to it on a
//! monoio runtime (epoll driver) kept across inputs. Slower than a pure function (one TCP
//! connection per input) and the socket reads make coverage a little noisy, but every byte of
//! the response goes through the same code a real upstream's does.
//!
//! Input: byte 0 picks the request (bit 0: HEAD instead of GET) and the limits (bit 1: the unit
//! test's tight head limits and a 32-byte body limit); the rest is the upstream's answer.
//!
//! Asserts, for a response `send` returns (errors are fine, panics are not):
//! * the status is final, 200..=599 (interim 1xx are skipped, 101 is refused);
//! * header names are lower-cased;
//! * no body for HEAD, 204 and 304; a body within `max_response_body_bytes`, never longer than
//!   the bytes the upstream sent; with a `Content-Length` (and a body allowed), exactly that many
//!   bytes.
#![no_main]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use monoio::time::TimeDriver;
use monoio::{LegacyDriver, Runtime, RuntimeBuilder};
use relay::http::client::{Client, ClientConfig, Request};

/// The loopback upstream: hand it the bytes of the next answer, then connect.
struct Upstream {
    addr: SocketAddr,
    answers: mpsc::SyncSender<Vec<u8>>,
}

fn upstream() -> &'static std::sync::Mutex<Upstream> {
    static UPSTREAM: OnceLock<std::sync::Mutex<Upstream>> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        // A write to a socket the client already closed must be an error, not the end of the
        // process.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let (answers, next) = mpsc::sync_channel::<Vec<u8>>(1);
        std::thread::spawn(move || {
            // One connection per input, in order: the client is sequential and never pools.
            while let Ok(answer) = next.recv() {
                let Ok((mut stream, _)) = listener.accept() else {
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                // The request head (a GET or HEAD without a body) ends in a blank line.
                let mut seen = Vec::new();
                let mut chunk = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(&answer);
                let _ = stream.shutdown(Shutdown::Write);
                // Wait for the client to be done with the connection so the close is clean.
                while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
            }
        });
        std::sync::Mutex::new(Upstream { addr, answers })
    })
}

thread_local! {
    static RUNTIME: RefCell<Runtime<TimeDriver<LegacyDriver>>> = RefCell::new(
        RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("build a monoio runtime"),
    );
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, answer)) = input.split_first() else {
        return;
    };
    let head_only = flags & 1 != 0;
    let base = ClientConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        // Never pooled: each input gets its own connection, and the upstream closes it anyway.
        max_idle_per_host: 0,
        ..ClientConfig::default()
    };
    let config = if flags & 2 != 0 {
        ClientConfig {
            max_response_head_bytes: 64,
            max_response_headers: 3,
            max_response_body_bytes: 32,
            ..base
        }
    } else {
        base
    };

    let upstream = upstream().lock().expect("upstream lock");
    upstream
        .answers
        .send(answer.to_vec())
        .expect("upstream thread alive");
    let addr = upstream.addr;

    let result = RUNTIME.with(|rt| {
        rt.borrow_mut().block_on(async {
            let client = Client::new(config);
            let request = Request {
                method: if head_only { "HEAD" } else { "GET" },
                ..Request::get("/fuzz")
            };
            client.send(addr, "upstream.fuzz", request).await
        })
    });
    drop(upstream);

    let Ok(response) = result else {
        return;
    };
    assert!(
        (200..600).contains(&response.status),
        "status {} returned as final",
        response.status
    );
    for (name, _) in &response.headers {
        assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "name {name:?} not lower-cased"
        );
    }
    let body = &response.body;
    if head_only || response.status == 204 || response.status == 304 {
        assert!(body.is_empty(), "a body on a HEAD, 204 or 304 response");
        return;
    }
    assert!(
        body.len() <= config.max_response_body_bytes,
        "body over the limit"
    );
    assert!(
        body.len() <= answer.len(),
        "body longer than what the upstream sent"
    );
    let chunked = response.header("transfer-encoding").is_some();
    if let (Some(length), false) = (response.header("content-length"), chunked) {
        let length: usize = std::str::from_utf8(length)
            .expect("an accepted Content-Length is ASCII")
            .trim_matches(|c| c == ' ' || c == '\t')
            .parse()
            .expect("an accepted Content-Length is a number");
        assert_eq!(
            body.len(),
            length,
            "body of {} bytes for Content-Length {length}",
            body.len()
        );
    }
});
