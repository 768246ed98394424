//! The handshake floor (`relay-floor connect`): a minimal WebSocket server for relay-loadgen's
//! `connect` scenario, so that relay's handshake rate can be read against what this machine
//! and this generator allow with no relay in the way.
//!
//! Owns one thread (pinned where asked) with one level-triggered epoll set. It accepts, finds
//! the end of an upgrade request and relay-loadgen's key in it, answers `101` and a `welcome`
//! frame in one write, and ends each connection as relay does: on the client's close frame it
//! sends its own close frame and its FIN in one segment, and closes the socket at the client's
//! FIN (or reset). No HTTP parsing beyond that, no hashing, no task, no allocation per
//! connection past its slot and one read buffer.
//!
//! Must never: listen anywhere but a loopback address, answer a key other than
//! relay-loadgen's fixed one (it does no SHA-1, so anything else gets `400`), keep more than
//! [`REQUEST_BYTES_MAX`] of a request, or run past its duration.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::LoadgenError;
use crate::floor::{floor_err, pin, Epoll, ThreadClock};
use crate::net;
use crate::wsframe::{CLIENT_KEY, EXPECTED_ACCEPT};

/// The listener's token in the epoll set (connections use their slot index).
const LISTENER_TOKEN: u64 = u64::MAX;
/// An upgrade request longer than this is refused (relay-loadgen's is under 300 bytes).
pub const REQUEST_BYTES_MAX: usize = 4096;
/// Connections accepted per wake-up of the listener, so reads are not starved.
const ACCEPTS_PER_WAKE: usize = 64;
/// The longest wait for events, so the end of the run is seen without a timer.
const IDLE_WAIT_MS: i32 = 100;

/// What one handshake-floor run does.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectFloorOptions {
    pub listen: SocketAddr,
    pub duration_s: f64,
    pub sink_cpu: Option<usize>,
    /// Connections held at once (each is one fd).
    pub max_connections: usize,
}

impl ConnectFloorOptions {
    pub fn validate(&self) -> Result<(), LoadgenError> {
        if !self.listen.ip().is_loopback() {
            return Err(LoadgenError::Config(format!(
                "--listen {}: the floor serves loopback only (127.0.0.1 or ::1)",
                self.listen
            )));
        }
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return Err(LoadgenError::Config(format!(
                "--duration-s must be above 0, got {}",
                self.duration_s
            )));
        }
        Ok(())
    }
}

/// What the sink did, for the table and the JSON.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConnectFloorReport {
    pub listen: String,
    pub duration_s: f64,
    /// Seconds from the first accepted connection to the last closed one.
    pub busy_s: f64,
    pub accepted: u64,
    /// `101` and `welcome` written.
    pub handshakes: u64,
    /// Ended with a close frame each way and a FIN each way.
    pub closed_gracefully: u64,
    /// Ended by the client's reset or FIN before any close frame.
    pub closed_abruptly: u64,
    /// Requests refused (`400`: not relay-loadgen's key; `431`: too long).
    pub refused: u64,
    /// Accepts refused by `max_connections` or the fd limit.
    pub accept_errors: u64,
    /// The sink thread's CPU time per handshake, microseconds.
    pub cpu_us_per_handshake: f64,
    /// The sink thread's CPU time over `busy_s`, percent of one core.
    pub cpu_percent_busy: f64,
}

impl ConnectFloorReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_table(&self) -> String {
        let rate = if self.busy_s > 0.0 {
            self.handshakes as f64 / self.busy_s
        } else {
            0.0
        };
        format!(
            "relay-floor connect on {} for {:.0} s\n  \
             handshakes {}  ({rate:.0}/s over the {:.1} s with connections)\n  \
             closed     {} gracefully, {} abruptly; refused {}, accept errors {}\n  \
             sink CPU   {:.1} µs per handshake, {:.1}% of one core while busy\n",
            self.listen,
            self.duration_s,
            self.handshakes,
            self.busy_s,
            self.closed_gracefully,
            self.closed_abruptly,
            self.refused,
            self.accept_errors,
            self.cpu_us_per_handshake,
            self.cpu_percent_busy,
        )
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading the upgrade request.
    Request,
    /// Upgraded: waiting for the client's close frame.
    Open,
    /// Our close frame and FIN are sent: waiting for the client's FIN.
    Closing,
}

struct Conn {
    fd: OwnedFd,
    stage: Stage,
    request: Vec<u8>,
}

/// What to do with a request head read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// The head is not complete yet.
    Incomplete,
    /// relay-loadgen's upgrade: answer `101`.
    Upgrade,
    /// Complete but not an upgrade this floor answers.
    Refuse,
    /// Longer than [`REQUEST_BYTES_MAX`] without an end.
    TooLong,
}

/// Judges a request head: complete (ends with an empty line) and carrying the generator's key.
pub fn judge_request(head: &[u8]) -> RequestVerdict {
    let Some(end) = find(head, b"\r\n\r\n") else {
        return if head.len() >= REQUEST_BYTES_MAX {
            RequestVerdict::TooLong
        } else {
            RequestVerdict::Incomplete
        };
    };
    let head = &head[..end];
    if head.starts_with(b"GET ") && find(head, CLIENT_KEY.as_bytes()).is_some() {
        RequestVerdict::Upgrade
    } else {
        RequestVerdict::Refuse
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `101` head and the `welcome` frame, written together as relay writes them.
pub fn upgrade_response() -> Vec<u8> {
    let welcome = br#"{"op":"welcome","conn":"floor","heartbeat_ms":25000}"#;
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {EXPECTED_ACCEPT}\r\n\r\n"
    )
    .into_bytes();
    out.push(0x81);
    out.push(welcome.len() as u8);
    out.extend_from_slice(welcome);
    out
}

/// A normal-closure close frame from the server (unmasked).
const CLOSE_FRAME: [u8; 4] = [0x88, 0x02, 0x03, 0xe8];
const REFUSED: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const TOO_LONG: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

fn send(fd: RawFd, bytes: &[u8], more: bool) -> bool {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: send(2) on an open fd from a valid slice.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), flags) };
    usize::try_from(n).is_ok_and(|n| n == bytes.len())
}

/// Reads into `buf`'s spare capacity: `Ok(0)` at EOF.
fn recv_into(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv(2) writes at most `spare.len()` bytes into the spare capacity.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Reads into `buf`: `Ok(0)` at EOF.
fn recv_slice(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Serves handshakes on `o.listen` for `o.duration_s`; prints to stderr when it is ready.
pub fn run_connect_floor(o: &ConnectFloorOptions) -> Result<ConnectFloorReport, LoadgenError> {
    o.validate()?;
    net::raise_fd_limit(o.max_connections as u64 + 64)?;
    pin("--sink-cpu", o.sink_cpu)?;
    let listener = TcpListener::bind(o.listen).map_err(floor_err("listen on --listen"))?;
    listener
        .set_nonblocking(true)
        .map_err(floor_err("listen on --listen"))?;
    let epoll = Epoll::new().map_err(floor_err("create an epoll set"))?;
    epoll
        .add(listener.as_raw_fd(), LISTENER_TOKEN)
        .map_err(floor_err("watch the listener"))?;
    eprintln!(
        "relay-floor connect: serving WebSocket handshakes on {} for {} s \
         (point `relay-loadgen connect --target {}` at it)",
        o.listen, o.duration_s, o.listen
    );
    let mut sink = HandshakeSink::new(o, upgrade_response());
    let end = Instant::now() + Duration::from_secs_f64(o.duration_s);
    let clock = ThreadClock::current();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while Instant::now() < end {
        let n = epoll
            .wait(&mut events, IDLE_WAIT_MS)
            .map_err(floor_err("wait on the epoll set"))?;
        for ev in &events[..n] {
            if ev.u64 == LISTENER_TOKEN {
                sink.accept(&listener, &epoll, clock);
            } else {
                sink.readable(ev.u64 as usize, clock);
            }
        }
    }
    Ok(sink.report(o))
}

struct HandshakeSink {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    response: Vec<u8>,
    max_connections: usize,
    first_accept: Option<Instant>,
    last_close: Option<Instant>,
    cpu_at_first_accept_ns: u64,
    cpu_at_last_close_ns: u64,
    r: ConnectFloorReport,
}

impl HandshakeSink {
    fn new(o: &ConnectFloorOptions, response: Vec<u8>) -> HandshakeSink {
        HandshakeSink {
            conns: Vec::new(),
            free: Vec::new(),
            response,
            max_connections: o.max_connections,
            first_accept: None,
            last_close: None,
            cpu_at_first_accept_ns: 0,
            cpu_at_last_close_ns: 0,
            r: ConnectFloorReport::default(),
        }
    }

    fn accept(&mut self, listener: &TcpListener, epoll: &Epoll, clock: ThreadClock) {
        for _ in 0..ACCEPTS_PER_WAKE {
            let open = self.conns.len() - self.free.len();
            // SAFETY: accept4(2) on the listening fd; null address pointers are allowed.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
                    self.r.accept_errors += 1;
                }
                return;
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if open >= self.max_connections {
                self.r.accept_errors += 1;
                continue;
            }
            if self.first_accept.is_none() {
                self.first_accept = Some(Instant::now());
                self.cpu_at_first_accept_ns = clock.ns();
            }
            self.r.accepted += 1;
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if epoll.add(fd.as_raw_fd(), slot as u64).is_err() {
                self.r.accept_errors += 1;
                self.free.push(slot);
                continue;
            }
            self.conns[slot] = Some(Conn {
                fd,
                stage: Stage::Request,
                request: Vec::new(),
            });
        }
    }

    fn readable(&mut self, slot: usize, clock: ThreadClock) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        let fd = conn.fd.as_raw_fd();
        let done = match conn.stage {
            Stage::Request => {
                if conn.request.capacity() == 0 {
                    conn.request.reserve_exact(REQUEST_BYTES_MAX);
                }
                match recv_into(fd, &mut conn.request) {
                    Ok(0) | Err(_) => Some(false),
                    Ok(_) => match judge_request(&conn.request) {
                        RequestVerdict::Incomplete => None,
                        RequestVerdict::Upgrade => {
                            if send(fd, &self.response, false) {
                                self.r.handshakes += 1;
                                conn.stage = Stage::Open;
                                conn.request = Vec::new();
                                None
                            } else {
                                Some(false)
                            }
                        }
                        RequestVerdict::Refuse => {
                            send(fd, REFUSED, false);
                            self.r.refused += 1;
                            Some(false)
                        }
                        RequestVerdict::TooLong => {
                            send(fd, TOO_LONG, false);
                            self.r.refused += 1;
                            Some(false)
                        }
                    },
                }
            }
            Stage::Open | Stage::Closing => {
                let mut frame = [0u8; 256];
                match recv_slice(fd, &mut frame) {
                    Ok(0) | Err(_) => Some(conn.stage == Stage::Closing),
                    Ok(_) if conn.stage == Stage::Closing => None,
                    Ok(_) => {
                        // A client frame: relay-loadgen sends only its close frame here.
                        if frame[0] & 0x0f == 0x8 {
                            send(fd, &CLOSE_FRAME, true);
                            // SAFETY: shutdown(2) on an open fd.
                            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                            conn.stage = Stage::Closing;
                        }
                        None
                    }
                }
            }
        };
        if let Some(graceful) = done {
            if graceful {
                self.r.closed_gracefully += 1;
            } else {
                self.r.closed_abruptly += 1;
            }
            self.conns[slot] = None;
            self.free.push(slot);
            self.last_close = Some(Instant::now());
            self.cpu_at_last_close_ns = clock.ns();
        }
    }

    fn report(mut self, o: &ConnectFloorOptions) -> ConnectFloorReport {
        self.r.listen = o.listen.to_string();
        self.r.duration_s = o.duration_s;
        if let (Some(first), Some(last)) = (self.first_accept, self.last_close) {
            self.r.busy_s = last.saturating_duration_since(first).as_secs_f64();
            let cpu_ns = self
                .cpu_at_last_close_ns
                .saturating_sub(self.cpu_at_first_accept_ns) as f64;
            if self.r.handshakes > 0 {
                self.r.cpu_us_per_handshake = cpu_ns / 1e3 / self.r.handshakes as f64;
            }
            if self.r.busy_s > 0.0 {
                self.r.cpu_percent_busy = cpu_ns / 1e9 / self.r.busy_s * 100.0;
            }
        }
        self.r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_judged_once_its_head_is_complete() {
        let mut req = Vec::new();
        crate::wsframe::write_upgrade_request(&mut req, "127.0.0.1:8004", "/api/v1/relay/ws", None);
        for cut in 0..req.len() {
            assert_eq!(
                judge_request(&req[..cut]),
                RequestVerdict::Incomplete,
                "{cut}"
            );
        }
        assert_eq!(judge_request(&req), RequestVerdict::Upgrade);
    }

    #[test]
    fn other_requests_are_refused() {
        let other_key = b"GET / HTTP/1.1\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n";
        assert_eq!(judge_request(other_key), RequestVerdict::Refuse);
        let post = format!("POST / HTTP/1.1\r\nSec-WebSocket-Key: {CLIENT_KEY}\r\n\r\n");
        assert_eq!(judge_request(post.as_bytes()), RequestVerdict::Refuse);
        let endless = vec![b'a'; REQUEST_BYTES_MAX];
        assert_eq!(judge_request(&endless), RequestVerdict::TooLong);
    }

    #[test]
    fn the_response_is_a_101_the_generator_accepts_then_a_welcome_frame() {
        let out = upgrade_response();
        let end = find(&out, b"\r\n\r\n").expect("a head") + 4;
        let head = std::str::from_utf8(&out[..end]).expect("ascii");
        assert!(head.starts_with("HTTP/1.1 101 "));
        assert!(head.contains(&format!("Sec-WebSocket-Accept: {EXPECTED_ACCEPT}\r\n")));
        let frame = crate::wsframe::parse_head(&out[end..], 1 << 16)
            .expect("a valid frame")
            .expect("a whole header");
        assert_eq!(frame.opcode, crate::wsframe::opcode::TEXT);
        assert_eq!(end + frame.total_len(), out.len());
        let payload = &out[end + frame.header_len..];
        assert_eq!(crate::scan::ws_op(payload), crate::scan::Op::Welcome);
    }

    #[test]
    fn only_loopback_is_served() {
        let o = |listen: &str| ConnectFloorOptions {
            listen: listen.parse().expect("an address"),
            duration_s: 1.0,
            sink_cpu: None,
            max_connections: 10,
        };
        assert!(o("127.0.0.1:0").validate().is_ok());
        assert!(o("0.0.0.0:0").validate().is_err());
        let mut zero = o("127.0.0.1:0");
        zero.duration_s = 0.0;
        assert!(zero.validate().is_err());
    }
}
