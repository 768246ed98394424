//! A fake upstream HTTP/1.1 server for the registry and proxy tests.
//!
//! Listens on `127.0.0.1:0` in std threads (one acceptor, one thread per connection, keep-alive
//! supported), records every request (method, target, headers, body) and answers per a
//! [`Behaviour`]. Requests for the health path (`/health`) are answered apart, 200 or 500 as the
//! runtime switch says, and counted apart, so they never disturb the request log. Every thread
//! polls a stop flag, so dropping the [`Upstream`] stops and joins everything.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The health path every fake upstream serves (the registry's default `health_path`).
pub const HEALTH_PATH: &str = "/health";

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as on the request line.
    pub target: String,
    /// In arrival order, names lowercased, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How the upstream answers requests other than the health path.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// The current status (`Upstream::set_status`, initially 200) with a JSON body naming the
    /// upstream, method and target, and `X-Upstream: NAME`.
    Normal,
    /// Always this status, these extra headers and this body.
    Fixed {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The first `failures` requests get `status`, the rest are `Normal`.
    FailFirst { failures: usize, status: u16 },
    /// Requests with `method` get `status`, the others are `Normal`.
    FailMethod { method: &'static str, status: u16 },
    /// Reads the request and never answers (until the upstream is dropped).
    Hang,
    /// Closes every accepted connection at once, before reading anything (health checks too).
    Close,
    /// Answers `Normal` after this delay.
    Delay(Duration),
    /// Holds every request until `Upstream::open_gate`, then answers `Normal`.
    Gate,
    /// Answers 200 with a chunked body: `first` at once, then `second` once
    /// `Upstream::open_gate` is called, then the last chunk.
    StreamGated { first: Vec<u8>, second: Vec<u8> },
}

struct State {
    name: String,
    behaviour: Behaviour,
    stop: AtomicBool,
    status: AtomicU16,
    healthy: Arc<AtomicBool>,
    gate: AtomicBool,
    requests: Mutex<Vec<Recorded>>,
    answered: AtomicUsize,
    health_checks: AtomicUsize,
    connections: AtomicUsize,
    /// Every byte read from every connection (heads and bodies, health checks included).
    bytes_read: AtomicUsize,
}

/// A running fake upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Starts an upstream called `name` (reported in `X-Upstream` and the default body).
    pub fn start(name: &str, behaviour: Behaviour) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a fake upstream");
        let addr = listener.local_addr().expect("upstream local addr");
        listener
            .set_nonblocking(true)
            .expect("non-blocking upstream listener");
        let state = Arc::new(State {
            name: name.to_string(),
            behaviour,
            stop: AtomicBool::new(false),
            status: AtomicU16::new(200),
            healthy: Arc::new(AtomicBool::new(true)),
            gate: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            answered: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            bytes_read: AtomicUsize::new(0),
        });
        let st = state.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("upstream-{name}"))
            .spawn(move || accept_loop(listener, st))
            .expect("spawn the upstream acceptor");
        Upstream {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Every non-health request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many non-health requests arrived.
    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// How many non-health requests were answered (counted just before the response is
    /// written, so a client that got the answer always sees it counted).
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// How many health-path requests arrived.
    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Switches the health path between 200 (true) and 500 (false).
    pub fn set_healthy(&self, ok: bool) {
        self.state.healthy.store(ok, Ordering::SeqCst);
    }

    /// The health switch itself, for another thread.
    pub fn health_switch(&self) -> Arc<AtomicBool> {
        self.state.healthy.clone()
    }

    /// The status `Behaviour::Normal` answers with from now on.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Bytes read so far over all connections: shows a request body arriving before it is
    /// complete.
    pub fn bytes_read(&self) -> usize {
        self.state.bytes_read.load(Ordering::SeqCst)
    }

    /// Releases every request held by `Behaviour::Gate` (and lets later ones through).
    pub fn open_gate(&self) {
        self.state.gate.store(true, Ordering::SeqCst);
    }

    /// Waits (at most `bound`) until at least `n` non-health requests arrived.
    pub fn wait_requests(&self, n: usize, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while self.count() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// A URL on 127.0.0.1 whose port refuses connections (a listener bound then closed).
pub fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a throwaway listener");
    let addr = l.local_addr().expect("throwaway local addr");
    drop(l);
    format!("http://{addr}")
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                state.connections.fetch_add(1, Ordering::SeqCst);
                if matches!(state.behaviour, Behaviour::Close) {
                    drop(stream);
                    continue;
                }
                let st = state.clone();
                workers.push(std::thread::spawn(move || {
                    let _ = serve(stream, &st);
                }));
                workers.retain(|w| !w.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more bytes; `Ok(false)` on EOF or stop.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, state: &State) -> io::Result<bool> {
    let mut chunk = [0u8; 16384];
    loop {
        if state.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                state.bytes_read.fetch_add(n, Ordering::SeqCst);
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads one request off `buf`/`stream`; `None` on EOF or stop.
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    state: &State,
) -> io::Result<Option<Recorded>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 || !fill(stream, buf, state)? {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut rec = Recorded {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let chunked = rec
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(stream, buf, state)? {
                    return Ok(None);
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let end = loop {
                        if let Some(i) = find(buf, b"\r\n") {
                            break i;
                        }
                        if !fill(stream, buf, state)? {
                            return Ok(None);
                        }
                    };
                    buf.drain(..end + 2);
                    if end == 0 {
                        break;
                    }
                }
                break;
            }
            while buf.len() < size + 2 {
                if !fill(stream, buf, state)? {
                    return Ok(None);
                }
            }
            rec.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(len) = rec.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        while buf.len() < len {
            if !fill(stream, buf, state)? {
                return Ok(None);
            }
        }
        rec.body = buf.drain(..len).collect();
    }
    Ok(Some(rec))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        404 => "Not Found",
        418 => "I'm a teapot",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_response(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    stream.flush()
}

/// Sleeps up to `d` in small steps; false if the upstream was stopped meanwhile.
fn pause(d: Duration, state: &State) -> bool {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if state.stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(POLL.min(deadline - Instant::now()));
    }
    true
}

fn normal(state: &State, rec: &Recorded, status: u16) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let body = serde_json::json!({
        "upstream": state.name,
        "method": rec.method,
        "target": rec.target,
        "status": status,
    })
    .to_string()
    .into_bytes();
    (
        status,
        vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Upstream".to_string(), state.name.clone()),
        ],
        body,
    )
}

fn serve(mut stream: TcpStream, state: &State) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Some(rec) = read_request(&mut stream, &mut buf, state)? else {
            return Ok(());
        };
        let close = rec
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let path = rec.target.split('?').next().unwrap_or("");
        if path == HEALTH_PATH {
            state.health_checks.fetch_add(1, Ordering::SeqCst);
            let ok = state.healthy.load(Ordering::SeqCst);
            let (status, body): (u16, &[u8]) = if ok {
                (200, br#"{"status":"ok"}"#)
            } else {
                (500, br#"{"status":"failing"}"#)
            };
            let headers = [("Content-Type".to_string(), "application/json".to_string())];
            write_response(&mut stream, status, &headers, body)?;
        } else {
            let index = {
                let mut log = state.requests.lock().unwrap();
                log.push(rec.clone());
                log.len() - 1
            };
            let current = state.status.load(Ordering::SeqCst);
            let (status, headers, body) = match &state.behaviour {
                Behaviour::Normal | Behaviour::Close => normal(state, &rec, current),
                Behaviour::Fixed {
                    status,
                    headers,
                    body,
                } => (*status, headers.clone(), body.clone()),
                Behaviour::FailFirst { failures, status } if index < *failures => {
                    normal(state, &rec, *status)
                }
                Behaviour::FailFirst { .. } => normal(state, &rec, current),
                Behaviour::FailMethod { method, status } if rec.method == *method => {
                    normal(state, &rec, *status)
                }
                Behaviour::FailMethod { .. } => normal(state, &rec, current),
                Behaviour::Hang => {
                    while !state.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(POLL);
                    }
                    return Ok(());
                }
                Behaviour::Delay(d) => {
                    if !pause(*d, state) {
                        return Ok(());
                    }
                    normal(state, &rec, current)
                }
                Behaviour::StreamGated { first, second } => {
                    state.answered.fetch_add(1, Ordering::SeqCst);
                    let chunk = |data: &[u8]| {
                        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
                        c.extend_from_slice(data);
                        c.extend_from_slice(b"\r\n");
                        c
                    };
                    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                                    Transfer-Encoding: chunked\r\n\r\n"
                        .to_vec();
                    out.extend_from_slice(&chunk(first));
                    stream.write_all(&out)?;
                    while !state.gate.load(Ordering::SeqCst) {
                        if state.stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let mut rest = chunk(second);
                    rest.extend_from_slice(b"0\r\n\r\n");
                    stream.write_all(&rest)?;
                    if close {
                        return Ok(());
                    }
                    continue;
                }
                Behaviour::Gate => {
                    while !state.gate.load(Ordering::SeqCst) {
                        if state.stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    normal(state, &rec, current)
                }
            };
            // Counted before the bytes go out, so whoever sees the answer also sees the count.
            state.answered.fetch_add(1, Ordering::SeqCst);
            write_response(&mut stream, status, &headers, &body)?;
        }
        if close {
            return Ok(());
        }
    }
}
