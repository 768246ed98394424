//! Black-box tests of request limits, malformed input and config refusal (API.md sections 2, 9,
//! 10), once per I/O driver. Every bad input must get its JSON error, and the server must keep
//! serving new connections afterwards.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

both_drivers!(
    headers_too_large,
    unterminated_header_block,
    body_limit_boundary,
    idle_keep_alive_is_not_a_slow_request,
    body_too_large_content_length,
    body_too_large_chunked,
    slowloris_gets_408,
    slow_body_gets_408,
    garbage_bytes,
    bad_chunk_size,
    invalid_publish_bodies,
    pipelined_answers_are_not_all_held,
    config_unknown_key_is_refused,
    print_config,
    bad_env_variable_is_refused,
    raises_its_open_file_limit,
    shards_are_pinned_unless_pin_shards_is_false,
);

const LIMITS_TOML: &str =
    "[limits]\nmax_header_bytes = 1024\nmax_body_bytes = 2048\nrequest_timeout_s = 1\n";

fn limited(driver: &str) -> Server {
    Server::start_with_config(driver, LIMITS_TOML)
}

/// A good request on a new connection still works (and a publish too).
fn assert_still_serving(server: &Server, after: &str) {
    let r = server.get("/healthz");
    assert_eq!(
        r.status,
        200,
        "after {after}: a new connection's GET /healthz should be 200: {r}\nstderr:\n{}",
        server.stderr()
    );
    let r = server.post_json("/api/v1/relay/events", &event_json("still.ok", "t", "1"));
    assert_eq!(
        r.status, 202,
        "after {after}: a new connection's publish should be 202: {r}"
    );
}

fn headers_too_large(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    let big = "x".repeat(2000);
    let _ = c.try_send_raw(
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    let r = c
        .read_response()
        .expect("a response to an oversized header block");
    let msg = assert_json_error(&r, 431, "a 2 KB header block over max_header_bytes = 1024");
    assert!(
        msg.contains("1024"),
        "the 431 message should name the limit: {msg:?}"
    );
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the connection should be closed after 431"
    );
    assert_still_serving(&server, "431");

    // Many small headers adding up over the limit count too.
    let mut c = Conn::open(server.addr);
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H-{i}: {}\r\n", "v".repeat(40)));
    }
    req.push_str("\r\n");
    let _ = c.try_send_raw(req.as_bytes());
    let r = c.read_response().expect("a response to many headers");
    assert_json_error(
        &r,
        431,
        "40 headers of ~50 bytes (over max_header_bytes = 1024)",
    );
    assert_still_serving(&server, "431 (many headers)");

    // Just under the limit is fine.
    let r = request(
        server.addr,
        "GET",
        "/healthz",
        &[("X-Ok", &"y".repeat(600))],
        b"",
    );
    assert_eq!(
        r.status, 200,
        "a 600-byte header is within max_header_bytes = 1024: {r}"
    );
}

fn unterminated_header_block(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    // 3 KB of one header line and no end: the limit must act without waiting for the end.
    let _ = c.try_send_raw(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}",
            "a".repeat(3000)
        )
        .as_bytes(),
    );
    let r = c
        .read_response()
        .expect("a response to an unterminated oversized header block");
    assert_json_error(
        &r,
        431,
        "an unterminated 3 KB header block (max_header_bytes = 1024)",
    );
    assert_still_serving(&server, "431 (unterminated)");
}

fn body_limit_boundary(driver: &str) {
    let server = limited(driver);
    let mut body = event_json("edge.c", "t", &format!("\"{}\"", "x".repeat(2000)));
    while body.len() < 2048 {
        body.push(' ');
    }
    assert_eq!(body.len(), 2048);
    let r = server.post_json("/api/v1/relay/events", &body);
    assert_eq!(
        r.status, 202,
        "a body of exactly max_body_bytes = 2048 is accepted: {r}"
    );
    body.push(' ');
    let r = server.post_json("/api/v1/relay/events", &body);
    assert_json_error(&r, 413, "a body of 2049 bytes (max_body_bytes = 2048)");
    assert_still_serving(&server, "413 (2049 bytes)");
}

fn idle_keep_alive_is_not_a_slow_request(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    let r = c.roundtrip("GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200, "{r}");
    // Idle between requests for longer than request_timeout_s = 1 (idle_timeout_s is 60).
    std::thread::sleep(Duration::from_millis(1600));
    let r = c.roundtrip("GET", "/healthz", &[], b"");
    assert_eq!(
        r.status, 200,
        "an idle keep-alive connection is bounded by idle_timeout_s, not request_timeout_s: {r}"
    );
}

fn body_too_large_content_length(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    // Announce 4096 bytes and send part of them; the server can refuse from the head alone.
    let head = "POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n";
    let _ = c.try_send_raw(head.as_bytes());
    let r = c
        .read_response()
        .expect("a response to a Content-Length over max_body_bytes");
    let msg = assert_json_error(&r, 413, "Content-Length 4096 over max_body_bytes = 2048");
    assert!(
        msg.contains("2048"),
        "the 413 message should name the limit: {msg:?}"
    );
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the connection should be closed after 413"
    );
    assert_still_serving(&server, "413 (Content-Length)");

    // A body within the limit is accepted.
    let data = format!("\"{}\"", "d".repeat(1500));
    let r = server.post_json(
        "/api/v1/relay/events",
        &event_json("within.limit", "t", &data),
    );
    assert_eq!(
        r.status, 202,
        "a ~1.5 KB body is within max_body_bytes = 2048: {r}"
    );
}

fn body_too_large_chunked(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    let mut raw = b"POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    // 2000 + 100 bytes in two chunks: over 2048 in total, each under it.
    raw.extend(format!("{:x}\r\n", 2000).as_bytes());
    raw.extend(std::iter::repeat_n(b' ', 2000));
    raw.extend(b"\r\n");
    raw.extend(format!("{:x}\r\n", 100).as_bytes());
    raw.extend(std::iter::repeat_n(b' ', 100));
    raw.extend(b"\r\n");
    let _ = c.try_send_raw(&raw);
    let r = c
        .read_response()
        .expect("a response to a chunked body over max_body_bytes");
    assert_json_error(
        &r,
        413,
        "a 2100-byte chunked body over max_body_bytes = 2048",
    );
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the connection should be closed after 413"
    );
    assert_still_serving(&server, "413 (chunked)");

    // One chunk declaring more than the limit.
    let mut c = Conn::open(server.addr);
    let raw = b"POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n";
    let _ = c.try_send_raw(raw);
    let r = c
        .read_response()
        .expect("a response to a chunk size over max_body_bytes");
    assert_json_error(
        &r,
        413,
        "one chunk of 0x10000 bytes over max_body_bytes = 2048",
    );
    assert_still_serving(&server, "413 (one big chunk)");
}

fn slowloris_gets_408(driver: &str) {
    let server = limited(driver);
    let c = Conn::open(server.addr);
    let mut writer = c.stream.try_clone().expect("clone socket");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // One header byte every 300 ms; never finishes the head (bounded: 40 bytes, 12 s).
    let drip = std::thread::spawn(move || {
        let bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa";
        for b in bytes.iter().take(40) {
            if stop2.load(Ordering::Relaxed) {
                return;
            }
            if std::io::Write::write_all(&mut writer, &[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut c = c;
    let result = c.read_response();
    stop.store(true, Ordering::Relaxed);
    let r = result.unwrap_or_else(|e| {
        panic!("a client dripping one header byte per 300 ms with request_timeout_s = 1 should get 408 within 5 s; got {e}")
    });
    assert_json_error(&r, 408, "slowloris (request_timeout_s = 1)");
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the server should close a timed-out connection after its 408"
    );
    drip.join().unwrap();
    assert_still_serving(&server, "408");
}

fn slow_body_gets_408(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    // A complete head announcing 100 bytes, then only 10 of them.
    c.send_raw(
        b"POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"channel\"",
    );
    let r = c.read_response().unwrap_or_else(|e| {
        panic!(
            "a body that stops arriving should get 408 (request_timeout_s = 1) within 5 s; got {e}"
        )
    });
    assert_json_error(&r, 408, "incomplete body (request_timeout_s = 1)");
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the connection should be closed after 408"
    );
    assert_still_serving(&server, "408 (body)");
}

fn garbage_bytes(driver: &str) {
    let server = limited(driver);
    for (what, bytes) in [
        (
            "binary garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n".to_vec(),
        ),
        (
            "a line that is not HTTP",
            b"HELLO THERE GENERAL KENOBI\r\n\r\n".to_vec(),
        ),
        (
            "a request line with a space-less target",
            b"GET\r\n\r\n".to_vec(),
        ),
    ] {
        let mut c = Conn::open(server.addr);
        let _ = c.try_send_raw(&bytes);
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("{what}: expected a 400 JSON response, got {e}"));
        assert_json_error(&r, 400, what);
        assert!(
            c.closed_within(READ_TIMEOUT),
            "{what}: the connection should be closed after 400"
        );
        assert_still_serving(&server, what);
    }
}

fn bad_chunk_size(driver: &str) {
    let server = limited(driver);
    let mut c = Conn::open(server.addr);
    let raw = b"POST /api/v1/relay/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let _ = c.try_send_raw(raw);
    let r = c.read_response().expect("a response to a bad chunk size");
    assert_json_error(&r, 400, "chunk size `zz`");
    assert!(
        c.closed_within(READ_TIMEOUT),
        "the connection should be closed after a framing error"
    );
    assert_still_serving(&server, "bad chunk size");
}

fn invalid_publish_bodies(driver: &str) {
    let server = limited(driver);
    let cases: &[(&str, &str, &[&str])] = &[
        ("invalid JSON", r#"{"channel":"a","type":"t","data":"#, &[]),
        ("not JSON at all", "hello", &[]),
        (
            "invalid channel name",
            r#"{"channel":"bad channel!","type":"t","data":1}"#,
            &["channel"],
        ),
        (
            "empty channel name",
            r#"{"channel":"","type":"t","data":1}"#,
            &["channel"],
        ),
        (
            "invalid type",
            r#"{"channel":"ok","type":"a/b","data":1}"#,
            &["type"],
        ),
        (
            "unknown field seq",
            r#"{"channel":"ok","type":"t","data":1,"seq":3}"#,
            &["seq"],
        ),
        ("missing data", r#"{"channel":"ok","type":"t"}"#, &["data"]),
        ("empty batch", "[]", &[]),
        ("empty body", "", &[]),
        (
            "invalid id",
            r#"{"channel":"ok","type":"t","data":1,"id":"has space"}"#,
            &["id"],
        ),
    ];
    for (what, body, needles) in cases {
        let r = server.post_json("/api/v1/relay/events", body);
        let msg = assert_json_error(&r, 400, &format!("publish with {what}"));
        for needle in *needles {
            assert!(
                msg.to_lowercase().contains(needle),
                "publish with {what}: the message should mention {needle:?}, got {msg:?}"
            );
        }
        assert_still_serving(&server, what);
    }
    // Nothing invalid was published.
    let r = server.get("/api/v1/relay/channels/ok/history");
    assert_json_error(&r, 404, "history of `ok` after only invalid publishes");
}

/// Runs the binary to completion (at most 10 s) and returns (success, stdout, stderr).
/// A client that pipelines requests for large answers and reads none of them makes the
/// connection hold one answer at a time, not every answer to what it sent.
fn pipelined_answers_are_not_all_held(driver: &str) {
    let server = Server::start(driver, &[]);
    // 60 events of 60 KB: a history page of them is a 3.6 MB answer.
    let data = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..4 {
        let items: Vec<String> = (0..15).map(|_| event_json("big.h", "t", &data)).collect();
        publish(server.addr, &format!("[{}]", items.join(",")));
    }
    let path = "/api/v1/relay/channels/big.h/history";
    let before_kb = server.rss_kb();
    // 40 requests in one write (2.5 KB, one read for relay): holding all their answers is
    // 144 MB.
    let mut conn = Conn::from_stream(common::ws::small_rcvbuf_stream(server.addr));
    let one = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    conn.send_raw(one.repeat(40).as_bytes());
    let mut most_kb = before_kb;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        most_kb = most_kb.max(server.rss_kb());
    }
    let grown_mb = (most_kb - before_kb) / 1024;
    assert!(
        grown_mb < 48,
        "relay grew by {grown_mb} MB while a client pipelined 40 requests for 3.6 MB answers \
         and read nothing: it should hold about one answer at a time"
    );
    socket2::SockRef::from(&conn.stream)
        .set_recv_buffer_size(4 << 20)
        .expect("SO_RCVBUF");
    for i in 0..40 {
        let r = conn
            .read_response()
            .unwrap_or_else(|e| panic!("answer {i} of 40: {e}"));
        assert_eq!(r.status, 200, "answer {i} of 40: {r}");
        let events = json(&r)["events"].as_array().map_or(0, Vec::len);
        assert_eq!(events, 60, "answer {i} of 40 has every event");
    }
    assert_still_serving(&server, "40 pipelined large answers");
}

fn run_to_exit(mut cmd: std::process::Command) -> (std::process::ExitStatus, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn relay");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay did not exit within 10 s (it should refuse to start / print and exit)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status,
        strip_ansi(&String::from_utf8_lossy(&out.stdout)),
        strip_ansi(&String::from_utf8_lossy(&out.stderr)),
    )
}

fn config_unknown_key_is_refused(driver: &str) {
    let dir = TempDir::new();
    let path = dir.write(
        "bad.toml",
        "# a config with a typo\n[limits]\nmax_body_bytes = 4096\nmax_bodyy_bytes = 10\n",
    );
    let path_s = path.to_str().unwrap().to_string();
    let mut cmd = relay_command();
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--driver",
        driver,
        "--config",
        &path_s,
    ]);
    let (status, _out, err) = run_to_exit(cmd);
    assert!(
        !status.success(),
        "a config with an unknown key must be refused (non-zero exit), got {status}; stderr: {err}"
    );
    assert!(
        err.contains(&path_s),
        "stderr should name the file {path_s}: {err}"
    );
    assert!(
        err.contains(&format!("{path_s}:4")) || err.contains("line 4"),
        "stderr should name line 4: {err}"
    );
    assert!(
        err.contains("max_bodyy_bytes"),
        "stderr should name the key max_bodyy_bytes: {err}"
    );

    // A bad value is refused the same way.
    let path = dir.write("bad2.toml", "[history]\nsize = \"lots\"\n");
    let path_s = path.to_str().unwrap().to_string();
    let mut cmd = relay_command();
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--driver",
        driver,
        "--config",
        &path_s,
    ]);
    let (status, _out, err) = run_to_exit(cmd);
    assert!(
        !status.success(),
        "a config with a bad value must be refused, got {status}; stderr: {err}"
    );
    assert!(
        err.contains(&path_s) && err.contains("size"),
        "stderr should name the file and key: {err}"
    );
}

fn print_config(driver: &str) {
    let mut cmd = relay_command();
    cmd.args(["--print-config", "--driver", driver, "--shards", "3"]);
    let (status, out, err) = run_to_exit(cmd);
    assert!(
        status.success(),
        "--print-config should exit 0, got {status}; stderr: {err}"
    );
    assert!(
        out.contains("listen = "),
        "--print-config should print TOML with `listen = `: {out}"
    );
    assert!(
        out.contains("shards = 3"),
        "--print-config should show the effective shards = 3: {out}"
    );
    assert!(
        out.contains(&format!("driver = \"{driver}\"")),
        "--print-config should show driver = {driver:?}: {out}"
    );
    let parsed: toml::Table = toml::from_str(&out)
        .unwrap_or_else(|e| panic!("--print-config output should parse as TOML ({e}): {out}"));
    assert!(
        parsed.contains_key("listen"),
        "--print-config TOML should have a listen key: {out}"
    );
}

fn bad_env_variable_is_refused(driver: &str) {
    let mut cmd = relay_command();
    cmd.args(["--listen", "127.0.0.1:0", "--driver", driver])
        .env("RELAY_SHARDS", "abc");
    let (status, _out, err) = run_to_exit(cmd);
    assert!(
        !status.success(),
        "RELAY_SHARDS=abc must be refused (non-zero exit), got {status}; stderr: {err}"
    );
    assert!(
        err.contains("RELAY_SHARDS"),
        "stderr should name RELAY_SHARDS: {err}"
    );
}

/// relay raises its soft open-file limit to the hard one by itself, and says at start when
/// even that is below what `limits.max_connections` needs.
fn raises_its_open_file_limit(driver: &str) {
    use std::os::unix::process::CommandExt;
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    let hard = ours.rlim_max;
    let too_many = (hard + 1).to_string();
    let server = Server::start_adjusted(driver, &[], |cmd| {
        cmd.env("RELAY_LIMITS_MAX_CONNECTIONS", &too_many);
        // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                limit.rlim_cur = limit.rlim_cur.min(256);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                Ok(())
            });
        }
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id()))
        .expect("read /proc/PID/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-files line");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, [hard.to_string(), hard.to_string()], "{line}");
    let stderr = server.stderr();
    assert!(
        stderr.contains("RLIMIT_NOFILE")
            && stderr.contains(&format!("max_connections = {too_many}")),
        "a warning naming the limit and the setting: {stderr}"
    );
    // And it serves.
    assert_eq!(server.get("/healthz").status, 200);
}

/// The CPUs a thread may run on (`Cpus_allowed_list` of its `/proc/.../status`).
fn cpus_allowed(status_path: &str) -> String {
    let status =
        std::fs::read_to_string(status_path).unwrap_or_else(|e| panic!("read {status_path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {status_path}"))
}

/// (name, allowed CPUs) of each `relay-shard-N` thread of the server.
fn shard_threads(server: &Server) -> Vec<(String, String)> {
    let task_dir = format!("/proc/{}/task", server.child.id());
    let mut shards: Vec<(String, String)> = std::fs::read_dir(&task_dir)
        .unwrap_or_else(|e| panic!("read {task_dir}: {e}"))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let name = name.trim().to_string();
            name.starts_with("relay-shard-").then(|| {
                let status = path.join("status");
                (name, cpus_allowed(status.to_str().expect("utf-8 path")))
            })
        })
        .collect();
    shards.sort();
    shards
}

/// By default each shard runs on one CPU of its own (of those the process may use); with
/// `RELAY_PIN_SHARDS=false` (`pin_shards = false`) every shard may run on all of them. Both
/// serve.
fn shards_are_pinned_unless_pin_shards_is_false(driver: &str) {
    let process_cpus = cpus_allowed("/proc/self/status");
    let one_cpu = !process_cpus.contains(['-', ',']);

    let pinned = Server::start(driver, &[]);
    let shards = shard_threads(&pinned);
    assert_eq!(shards.len(), 2, "two shard threads: {shards:?}");
    if one_cpu {
        assert!(
            shards.iter().all(|(_, cpus)| *cpus == process_cpus),
            "{shards:?}"
        );
    } else {
        assert!(
            shards.iter().all(|(_, cpus)| !cpus.contains(['-', ','])),
            "each shard on one CPU, the process on {process_cpus}: {shards:?}"
        );
        assert_ne!(
            shards[0].1, shards[1].1,
            "two CPUs for two shards: {shards:?}"
        );
    }
    assert_eq!(pinned.get("/healthz").status, 200);

    let unpinned = Server::start_adjusted(driver, &[], |cmd| {
        cmd.env("RELAY_PIN_SHARDS", "false");
    });
    let shards = shard_threads(&unpinned);
    assert_eq!(shards.len(), 2, "two shard threads: {shards:?}");
    assert!(
        shards.iter().all(|(_, cpus)| *cpus == process_cpus),
        "each shard on every CPU of the process ({process_cpus}): {shards:?}"
    );
    assert_eq!(unpinned.get("/healthz").status, 200);
}
