//! Shared harness for the black-box tests: start the `relay` binary, talk HTTP/1.1 and SSE to
//! it over plain `std::net::TcpStream`s. Every read has a timeout, so a hung server fails a test
//! instead of hanging it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default bound for one read from the server.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Both I/O drivers every test runs against.
pub const DRIVERS: [&str; 2] = ["io_uring", "epoll"];

/// Generates `mod NAME { #[test] fn io_uring(); #[test] fn epoll(); }` for each `fn NAME(driver: &str)`.
#[macro_export]
macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn io_uring() {
                    super::$name("io_uring")
                }
                #[test]
                fn epoll() {
                    super::$name("epoll")
                }
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Temp files
// ---------------------------------------------------------------------------------------------

static TEMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A private temp directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "relay-blackbox-{}-{}-{}",
            std::process::id(),
            n,
            nanos
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// Writes `name` with `contents` and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_relay")
}

/// A `Command` for the relay binary with a clean environment: no inherited `RELAY_*`.
pub fn relay_command() -> Command {
    let mut cmd = Command::new(relay_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RELAY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub driver: String,
    stderr: Arc<Mutex<String>>,
    _dir: Option<TempDir>,
}

impl Server {
    /// Starts `relay --listen 127.0.0.1:0 --shards 2 --driver DRIVER EXTRA...` and waits for
    /// its `relay listening on ADDR` line (at most 10 s).
    pub fn start(driver: &str, extra_args: &[&str]) -> Server {
        Self::spawn(driver, extra_args, None)
    }

    /// Like `start`, with `--config FILE` where FILE holds `toml`.
    pub fn start_with_config(driver: &str, toml: &str) -> Server {
        let dir = TempDir::new();
        let path = dir.write("relay.toml", toml);
        let path = path.to_str().expect("utf-8 temp path").to_string();
        Self::spawn(driver, &["--config", &path], Some(dir))
    }

    /// Like `start`, with the command adjusted first (its environment, its limits).
    pub fn start_adjusted(
        driver: &str,
        extra_args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Server {
        let mut cmd = relay_command();
        adjust(&mut cmd);
        Self::spawn_command(cmd, driver, extra_args, None)
    }

    fn spawn(driver: &str, extra_args: &[&str], dir: Option<TempDir>) -> Server {
        Self::spawn_command(relay_command(), driver, extra_args, dir)
    }

    fn spawn_command(
        mut cmd: Command,
        driver: &str,
        extra_args: &[&str],
        dir: Option<TempDir>,
    ) -> Server {
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--driver",
            driver,
        ])
        .args(extra_args)
        .env("RELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the relay binary");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let buffer = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let buf2 = buffer.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut line = Vec::new();
            let mut tx = Some(tx);
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = strip_ansi(&String::from_utf8_lossy(&line));
                if let Some(t) = &tx {
                    if let Some(pos) = text.find("relay listening on ") {
                        let rest = &text[pos + "relay listening on ".len()..];
                        let addr_text = rest.split_whitespace().next().unwrap_or("");
                        if let Ok(addr) = addr_text.parse::<SocketAddr>() {
                            let _ = t.send(addr);
                            tx = None;
                        }
                    }
                }
                buf2.lock().unwrap().push_str(&text);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "relay ({driver}) did not print `relay listening on ADDR` within 10 s; stderr:\n{}",
                    buffer.lock().unwrap()
                );
            }
        };
        Server {
            child,
            addr,
            driver: driver.to_string(),
            stderr: buffer,
            _dir: dir,
        }
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` to the process (our own child, by pid).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Sends SIGTERM and waits (at most 15 s) for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| {
            panic!(
                "relay did not exit within 15 s of SIGTERM; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// Waits up to `bound` for the process to exit.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Convenience wrappers.
    pub fn get(&self, path: &str) -> HttpResponse {
        request(self.addr, "GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &str) -> HttpResponse {
        request(
            self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// The sum of every sample of metric `name` (any labels) in `/metrics`.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let resp = self.get("/metrics");
        assert_eq!(resp.status, 200, "/metrics should answer 200");
        metric_sum(&resp.text(), name)
            .unwrap_or_else(|| panic!("metric {name} not found in /metrics:\n{}", resp.text()))
    }

    /// The server's resident memory (`VmRSS`), in KiB.
    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sum of the samples of `name` (exact metric name, optionally with `{labels}`).
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = if rest.starts_with('{') {
            match rest.find('}') {
                Some(i) => &rest[i + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue;
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lowercased names; a repeated header keeps its last value.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn shard(&self) -> Option<usize> {
        self.header("x-relay-shard")
            .and_then(|s| s.trim().parse().ok())
    }
}

impl std::fmt::Display for HttpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} {:?} body={}",
            self.status,
            self.headers,
            self.text()
        )
    }
}

/// Parses the body as JSON, failing the test with the body when it is not.
pub fn json(resp: &HttpResponse) -> serde_json::Value {
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {resp}"))
}

/// Asserts `resp` is an error with `status` and the JSON error body; returns the message.
pub fn assert_json_error(resp: &HttpResponse, status: u16, what: &str) -> String {
    assert_eq!(
        resp.status, status,
        "{what}: expected HTTP {status}, got {resp}"
    );
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: the error should be JSON (content-type application/json), got {resp}"
    );
    let v = json(resp);
    let code = v["error"]["code"].as_str();
    let message = v["error"]["message"].as_str();
    assert!(
        code.is_some_and(|c| !c.is_empty()) && message.is_some_and(|m| !m.is_empty()),
        "{what}: expected {{\"error\":{{\"code\",\"message\"}}}}, got {resp}"
    );
    message.unwrap().to_string()
}

/// Builds the bytes of a request. Adds `Host`, and `Content-Length` when `body` is not empty
/// or the method usually carries one, unless the caller gave Content-Length/Transfer-Encoding.
pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n").into_bytes();
    let mut has_len = false;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding") {
            has_len = true;
        }
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !has_len && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH")) {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// One request on a new connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut conn = Conn::open(addr);
    conn.send(method, path, headers, body);
    conn.read_response_for(method)
        .unwrap_or_else(|e| panic!("{method} {path}: no response: {e}"))
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.set_nodelay(true);
    s
}

/// A keep-alive connection: several requests, responses read one by one.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        Conn {
            stream: connect(addr),
            buf: Vec::new(),
        }
    }

    pub fn from_stream(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let bytes = build_request(method, path, headers, body);
        self.send_raw(&bytes);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to server");
    }

    /// Like `send_raw` but tolerates the server having closed already.
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads more bytes into the buffer; `Ok(0)` on EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    pub fn read_response(&mut self) -> io::Result<HttpResponse> {
        self.read_response_inner(false)
    }

    pub fn read_response_for(&mut self, method: &str) -> io::Result<HttpResponse> {
        self.read_response_inner(method == "HEAD")
    }

    /// Reads one response (skipping `100 Continue`). `head_only`: no body follows (HEAD).
    pub fn read_response_inner(&mut self, head_only: bool) -> io::Result<HttpResponse> {
        loop {
            let head_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                    break i + 4;
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "EOF before a complete response head (got {:?})",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ));
                }
            };
            let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or("");
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            if !version.starts_with("HTTP/1.") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                ));
            }
            let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                )
            })?;
            let mut headers = BTreeMap::new();
            for line in lines {
                if line.is_empty() {
                    continue;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            self.buf.drain(..head_end);
            if status == 100 {
                continue;
            }
            let mut resp = HttpResponse {
                status,
                headers,
                body: Vec::new(),
            };
            if head_only || status == 204 || status == 304 {
                return Ok(resp);
            }
            let chunked = resp
                .header("transfer-encoding")
                .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
            if chunked {
                resp.body = self.read_chunked()?;
            } else if let Some(len) = resp.header("content-length") {
                let len: usize = len.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?;
                while self.buf.len() < len {
                    if self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "EOF inside a body",
                        ));
                    }
                }
                resp.body = self.buf.drain(..len).collect();
            } else {
                // Close-delimited.
                while self.fill()? != 0 {}
                resp.body = std::mem::take(&mut self.buf);
            }
            return Ok(resp);
        }
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF in chunk size",
                    ));
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    let end = loop {
                        if let Some(i) = find(&self.buf, b"\r\n") {
                            break i;
                        }
                        if self.fill()? == 0 {
                            return Ok(body);
                        }
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in chunk"));
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    /// Request + response on this connection.
    pub fn roundtrip(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        self.send(method, path, headers, body);
        self.read_response_for(method).unwrap_or_else(|e| {
            panic!("{method} {path} on a keep-alive connection: no response: {e}")
        })
    }

    pub fn publish(&mut self, body: &str) -> HttpResponse {
        self.roundtrip(
            "POST",
            "/api/v1/relay/events",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// Whether the server closes this connection (EOF or reset) within `bound`, with nothing
    /// but possibly already-buffered bytes before it. Returns false on timeout.
    pub fn closed_within(&mut self, bound: Duration) -> bool {
        let closed = self.closed_within_inner(bound);
        let _ = self.stream.set_read_timeout(Some(READ_TIMEOUT));
        closed
    }

    fn closed_within_inner(&mut self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.stream.set_read_timeout(Some(deadline - now)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true, // reset
            }
        }
    }

    /// Bytes received but not consumed by a response.
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }
}

/// Opens connections until one is served by shard 0 and one by shard 1 (at most 200 tries).
/// Returns `[conn on shard 0, conn on shard 1]`, both keep-alive.
/// `pipe.0` to `pipe.7`: channels the test server's two shards share between them (checked),
/// so that publishes to them are sequenced some on the connection's shard, some on the other.
pub fn channels_of_both_shards() -> Vec<String> {
    let channels: Vec<String> = (0..8).map(|i| format!("pipe.{i}")).collect();
    let owners: std::collections::HashSet<usize> = channels
        .iter()
        .map(|c| relay::bus::shard_of(c, 2))
        .collect();
    assert_eq!(owners.len(), 2, "the test's channels belong to both shards");
    channels
}

/// A server whose connections may each have `in_flight` publishes waiting for other shards.
pub fn start_with_publishes_in_flight(driver: &str, in_flight: &str) -> Server {
    Server::start_adjusted(driver, &[], |cmd| {
        cmd.env("RELAY_LIMITS_MAX_PUBLISHES_IN_FLIGHT", in_flight);
    })
}

pub fn conns_on_both_shards(addr: SocketAddr) -> [Conn; 2] {
    let mut slots: [Option<Conn>; 2] = [None, None];
    for _ in 0..200 {
        let mut c = Conn::open(addr);
        let r = c.roundtrip("GET", "/healthz", &[], b"");
        assert_eq!(r.status, 200, "/healthz: {r}");
        let shard = r
            .shard()
            .unwrap_or_else(|| panic!("response without a valid X-Relay-Shard header: {r}"));
        assert!(shard < 2, "X-Relay-Shard {shard} out of range for 2 shards");
        if slots[shard].is_none() {
            slots[shard] = Some(c);
        }
        if slots.iter().all(Option::is_some) {
            let [a, b] = slots;
            return [a.unwrap(), b.unwrap()];
        }
    }
    panic!("200 connections did not reach both shards (SO_REUSEPORT spread)");
}

// ---------------------------------------------------------------------------------------------
// SSE client
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// `data` parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {self:?}"))
    }
}

/// One block of the stream up to a blank line.
#[derive(Debug, Clone, Default)]
struct Block {
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    any_field: bool,
}

pub struct SseStream {
    pub stream: TcpStream,
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    /// The shard that serves the stream (`X-Relay-Shard`).
    pub shard: Option<usize>,
    buf: Vec<u8>,
    block: Block,
    /// Every comment line seen so far (without the leading ':' and one optional space).
    pub comments: Vec<String>,
    /// Every `retry:` value seen so far, in order.
    pub retries: Vec<String>,
    /// The order of things seen: "retry", "comment", "event".
    pub seen: Vec<&'static str>,
    /// The stream reached EOF (or was reset).
    pub eof: bool,
    /// The `id:` last seen (SSE last-event-id semantics).
    pub last_id: Option<String>,
}

impl SseStream {
    /// GET `path_and_query` as an SSE stream; fails the test unless it answers 200
    /// `text/event-stream`.
    pub fn open(addr: SocketAddr, path_and_query: &str, last_event_id: Option<&str>) -> SseStream {
        match Self::try_open(addr, path_and_query, last_event_id) {
            Ok(s) => s,
            Err(resp) => {
                panic!("SSE GET {path_and_query}: expected 200 text/event-stream, got {resp}")
            }
        }
    }

    /// Opens the stream; a non-stream answer comes back as `Err(response)`.
    pub fn try_open(
        addr: SocketAddr,
        path_and_query: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseStream, HttpResponse> {
        Self::try_open_on(connect(addr), path_and_query, last_event_id)
    }

    pub fn try_open_on(
        stream: TcpStream,
        path_and_query: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseStream, HttpResponse> {
        let mut headers = vec![("Accept", "text/event-stream")];
        if let Some(id) = last_event_id {
            headers.push(("Last-Event-ID", id));
        }
        let mut conn = Conn::from_stream(stream);
        conn.send("GET", path_and_query, &headers, b"");
        // Read the head only.
        let head_end = loop {
            if let Some(i) = find(&conn.buf, b"\r\n\r\n") {
                break i + 4;
            }
            match conn.fill() {
                Ok(0) => panic!("SSE GET {path_and_query}: EOF before the response head"),
                Ok(_) => {}
                Err(e) => panic!("SSE GET {path_and_query}: no response head: {e}"),
            }
        };
        let head = String::from_utf8_lossy(&conn.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut hdrs = BTreeMap::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                hdrs.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let is_stream = status == 200
            && hdrs
                .get("content-type")
                .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if !is_stream {
            // Re-read as a normal response: put the head back.
            let mut c = conn;
            return Err(match c.read_response() {
                Ok(r) => r,
                Err(e) => panic!("SSE GET {path_and_query}: unreadable non-stream response: {e}"),
            });
        }
        let shard = hdrs
            .get("x-relay-shard")
            .and_then(|s| s.trim().parse().ok());
        let buf = conn.buf.split_off(head_end);
        Ok(SseStream {
            stream: conn.stream,
            status,
            headers: hdrs,
            shard,
            buf,
            block: Block::default(),
            comments: Vec::new(),
            retries: Vec::new(),
            seen: Vec::new(),
            eof: false,
            last_id: None,
        })
    }

    /// Processes one complete line from the buffer; returns a dispatched event if the line
    /// ended one.
    fn process_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let block = std::mem::take(&mut self.block);
            if !block.any_field {
                return None;
            }
            if let Some(id) = &block.id {
                self.last_id = Some(id.clone());
            }
            if block.data.is_empty() {
                return None;
            }
            self.seen.push("event");
            return Some(SseEvent {
                id: block.id,
                event: block.event,
                data: block.data.join("\n"),
            });
        }
        if let Some(comment) = line.strip_prefix(':') {
            let c = comment.strip_prefix(' ').unwrap_or(comment);
            self.comments.push(c.to_string());
            self.seen.push("comment");
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => {
                self.block.id = Some(value.to_string());
                self.block.any_field = true;
            }
            "event" => {
                self.block.event = Some(value.to_string());
                self.block.any_field = true;
            }
            "data" => {
                self.block.data.push(value.to_string());
                self.block.any_field = true;
            }
            "retry" => {
                self.retries.push(value.to_string());
                self.seen.push("retry");
            }
            _ => {}
        }
        None
    }

    /// Takes one line (without its terminator) off the buffer, if a whole one is there.
    fn take_line(&mut self) -> Option<String> {
        let i = self.buf.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
        let mut consumed = i + 1;
        if self.buf[i] == b'\r' {
            if i + 1 < self.buf.len() {
                if self.buf[i + 1] == b'\n' {
                    consumed += 1;
                }
            } else {
                // Need to know whether '\n' follows.
                return None;
            }
        }
        self.buf.drain(..consumed);
        Some(line)
    }

    /// Reads more bytes before `deadline`; false on timeout or EOF.
    fn fill_until(&mut self, deadline: Instant) -> bool {
        if self.eof {
            return false;
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.stream.set_read_timeout(Some(deadline - now)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return false;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if is_timeout(&e) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.eof = true;
                    return false;
                }
            }
        }
    }

    /// The next event with data (comments and `retry:` are recorded on the way), or `None` on
    /// timeout or EOF.
    pub fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(line) = self.take_line() {
                if let Some(ev) = self.process_line(&line) {
                    return Some(ev);
                }
            }
            if !self.fill_until(deadline) {
                // Drain any complete lines that arrived with the final bytes.
                while let Some(line) = self.take_line() {
                    if let Some(ev) = self.process_line(&line) {
                        return Some(ev);
                    }
                }
                return None;
            }
        }
    }

    /// Reads (and parses) until a comment line appears or `timeout` passes.
    pub fn wait_comment(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let before = self.comments.len();
        loop {
            while let Some(line) = self.take_line() {
                let _ = self.process_line(&line);
                if self.comments.len() > before {
                    return Some(self.comments[before].clone());
                }
            }
            if !self.fill_until(deadline) {
                return None;
            }
        }
    }

    /// Reads until `retry:` has been seen or `timeout` passes.
    pub fn wait_retry(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.retries.first() {
                return Some(r.clone());
            }
            while let Some(line) = self.take_line() {
                let _ = self.process_line(&line);
                if let Some(r) = self.retries.first() {
                    return Some(r.clone());
                }
            }
            if !self.fill_until(deadline) {
                return None;
            }
        }
    }

    /// Reads and discards until EOF; true if EOF came within `timeout`.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            if !self.fill_until(deadline) && !self.eof {
                return false;
            }
            self.buf.clear();
        }
        true
    }

    /// Receives exactly `n` events (fails the test if they do not arrive, each within
    /// READ_TIMEOUT of the previous one).
    pub fn take(&mut self, n: usize, what: &str) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_event(READ_TIMEOUT) {
                Some(ev) => out.push(ev),
                None => {
                    panic!(
                    "{what}: expected {n} events, the stream gave {} then {} (eof={}); got: {:?}",
                    out.len(),
                    if self.eof { "ended" } else { "went silent for 5 s" },
                    self.eof,
                    out.iter().map(|e: &SseEvent| e.data.clone()).collect::<Vec<_>>()
                )
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing helpers
// ---------------------------------------------------------------------------------------------

/// `{"channel":C,"type":T,"data":DATA}` (DATA is raw JSON).
pub fn event_json(channel: &str, event_type: &str, data: &str) -> String {
    format!(r#"{{"channel":"{channel}","type":"{event_type}","data":{data}}}"#)
}

/// Publishes `n` events of about 2 KB each to `channel` (in batches of 50, `n` a multiple of
/// 50), asserting each batch is accepted.
pub fn publish_2kb_events(addr: SocketAddr, channel: &str, n: u64) {
    let data = format!("\"{}\"", "x".repeat(2000));
    let mut conn = Conn::open(addr);
    for batch in 0..n / 50 {
        let items: Vec<String> = (0..50).map(|_| event_json(channel, "big", &data)).collect();
        let r = conn.publish(&format!("[{}]", items.join(",")));
        assert_eq!(r.status, 202, "{channel}: batch {batch} of {}: {r}", n / 50);
    }
}

/// Publishes `body` on a fresh connection and asserts 202; returns the parsed reply.
pub fn publish(addr: SocketAddr, body: &str) -> serde_json::Value {
    let r = request(
        addr,
        "POST",
        "/api/v1/relay/events",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "publish {body:.200}: expected 202, got {r}");
    json(&r)
}

/// Polls `/api/v1/relay/channels` (at most 10 s) until every `(channel, n)` shows exactly `n`
/// subscribers (an unlisted channel has 0), so that events published next reach the streams
/// opened just before, and streams closed before are gone.
pub fn wait_subscribers(addr: SocketAddr, want: &[(&str, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = request(addr, "GET", "/api/v1/relay/channels", &[], b"");
        assert_eq!(r.status, 200, "/api/v1/relay/channels: {r}");
        let v = json(&r);
        let rows = v["channels"].as_array().cloned().unwrap_or_default();
        let ok = want.iter().all(|(name, n)| {
            let have = rows
                .iter()
                .find(|row| row["channel"].as_str() == Some(name))
                .map(|row| row["subscribers"].as_u64().unwrap_or(u64::MAX))
                .unwrap_or(0);
            have == *n
        });
        if ok {
            return;
        }
        if Instant::now() >= deadline {
            panic!("subscribers never reached {want:?} within 10 s; /channels says {v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens SSE streams on `path_and_query` until `per_shard` are served by each of the two
/// shards (at most 200 connections). Each connection first asks `/healthz` to learn its shard,
/// then becomes a stream only if that shard still needs one, so no extra streams subscribe.
pub fn sse_streams_on_both_shards(
    addr: SocketAddr,
    path_and_query: &str,
    per_shard: usize,
) -> Vec<SseStream> {
    let mut out = Vec::new();
    let mut counts = [0usize; 2];
    for _ in 0..200 {
        let mut c = Conn::open(addr);
        let r = c.roundtrip("GET", "/healthz", &[], b"");
        let shard = r
            .shard()
            .unwrap_or_else(|| panic!("response without a valid X-Relay-Shard header: {r}"));
        assert!(shard < 2, "X-Relay-Shard {shard} out of range for 2 shards");
        if counts[shard] < per_shard {
            assert!(
                c.leftover().is_empty(),
                "stray bytes after /healthz: {:?}",
                c.leftover()
            );
            let s = SseStream::try_open_on(c.stream, path_and_query, None)
                .unwrap_or_else(|r| panic!("SSE GET {path_and_query}: expected a stream, got {r}"));
            assert_eq!(
                s.shard,
                Some(shard),
                "a stream opened on a keep-alive connection should be served by that connection's shard"
            );
            counts[shard] += 1;
            out.push(s);
        }
        if counts == [per_shard; 2] {
            return out;
        }
    }
    panic!("200 connections did not give {per_shard} streams on each shard (got {counts:?})");
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (tests/common/ws.rs) and metric polling
// ---------------------------------------------------------------------------------------------

pub mod upstream;
pub mod ws;

/// Polls `/metrics` (at most `bound`) until `name` (may include `{labels}`) sums to at least
/// `min`; returns the last value seen (which is below `min` on timeout; 0 when absent).
pub fn wait_metric_at_least(server: &Server, name: &str, min: f64, bound: Duration) -> f64 {
    let deadline = Instant::now() + bound;
    loop {
        let resp = server.get("/metrics");
        assert_eq!(resp.status, 200, "/metrics should answer 200: {resp}");
        let v = metric_sum(&resp.text(), name).unwrap_or(0.0);
        if v >= min || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
