//! Errors: one enum for the run ([`LoadgenError`]) and one for a single connection
//! ([`ConnError`]).
//!
//! Owns the words a user sees when something is wrong. A `LoadgenError` stops the run; a
//! `ConnError` ends one connection and is counted (the first few are kept as report notes).
//! Each variant carries the numbers and the address involved, and says what to do when there
//! is something to do.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::http::HeadError;
use crate::wsframe::FrameError;

#[derive(Debug)]
pub enum LoadgenError {
    /// Options that cannot work together; names the flag.
    Config(String),
    /// Nothing answered at the target (or, in NATS mode, at the publish address).
    TargetUnreachable {
        target: SocketAddr,
        source: io::Error,
        /// What was expected there, e.g. "the relay".
        server: &'static str,
        /// The flag that sets the address.
        flag: &'static str,
    },
    /// The run needs more file descriptors than the hard limit allows.
    FdLimit {
        needed: u64,
        hard: u64,
    },
    /// A generator thread could not start its runtime (neither io_uring nor epoll).
    Runtime {
        thread: usize,
        source: io::Error,
    },
    Thread(io::Error),
    /// Some subscribers could not connect or subscribe.
    Setup {
        failed: u64,
        total: u64,
        first: String,
    },
    /// Not every subscriber was subscribed within the bound.
    SubscribeTimeout {
        subscribed: u64,
        total: u64,
        timeout_s: f64,
    },
    /// The relay's process could not be found or read (idle scenario).
    ServerProcess(String),
    /// The loopback floor (`relay-floor`) could not set up or run its own sockets.
    Floor {
        what: &'static str,
        source: io::Error,
    },
    /// The whole run went past its hard deadline.
    Deadline {
        deadline_s: f64,
        phase: String,
    },
}

impl fmt::Display for LoadgenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadgenError::Config(m) => write!(f, "invalid options: {m}"),
            LoadgenError::TargetUnreachable {
                target,
                source,
                server,
                flag,
            } => write!(
                f,
                "cannot reach {server} at {target}: {source}; is it running and listening there? \
                 (start it, or pass {flag} HOST:PORT)"
            ),
            LoadgenError::FdLimit { needed, hard } => write!(
                f,
                "this run needs about {needed} file descriptors but the hard RLIMIT_NOFILE is \
                 {hard}; raise it (as root: `ulimit -Hn {needed}` in the shell that starts the \
                 generator, LimitNOFILE={needed} for a systemd unit, `--ulimit nofile={needed}` \
                 for a container) or ask for fewer connections"
            ),
            LoadgenError::Runtime { thread, source } => write!(
                f,
                "generator thread {thread} could not build an I/O runtime (io_uring nor epoll): {source}"
            ),
            LoadgenError::Thread(e) => write!(f, "cannot start a generator thread: {e}"),
            LoadgenError::Setup {
                failed,
                total,
                first,
            } => write!(
                f,
                "{failed} of {total} subscriber connections failed to connect or subscribe; \
                 first failure: {first}"
            ),
            LoadgenError::SubscribeTimeout {
                subscribed,
                total,
                timeout_s,
            } => write!(
                f,
                "only {subscribed} of {total} subscribers were subscribed after {timeout_s} s \
                 (--subscribe-timeout-s)"
            ),
            LoadgenError::ServerProcess(m) => write!(f, "{m}"),
            LoadgenError::Floor { what, source } => {
                write!(f, "the loopback floor could not {what}: {source}")
            }
            LoadgenError::Deadline { deadline_s, phase } => write!(
                f,
                "the run passed its hard deadline of {deadline_s:.0} s during {phase} \
                 (--deadline-s)"
            ),
        }
    }
}

impl std::error::Error for LoadgenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadgenError::TargetUnreachable { source, .. }
            | LoadgenError::Runtime { source, .. }
            | LoadgenError::Floor { source, .. } => Some(source),
            LoadgenError::Thread(e) => Some(e),
            _ => None,
        }
    }
}

/// Why one connection ended or could not be set up.
#[derive(Debug)]
pub enum ConnError {
    Connect(io::Error),
    Timeout(&'static str),
    /// The server answered the upgrade / stream / publish with an error status.
    Refused {
        status: u16,
        body: String,
    },
    /// A 101 without the right accept key, or a stream without `text/event-stream`.
    Handshake(String),
    Head(HeadError),
    Frame(FrameError),
    /// The server closed (close frame with its code, or EOF).
    Closed(Option<u16>),
    /// Bytes that break the server's protocol (e.g. a NATS line that is not one).
    Protocol(String),
    /// A `{"op":"error"}` reply.
    ErrorReply(String),
    Io(io::Error),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Connect(e) => write!(f, "connect: {e}"),
            ConnError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            ConnError::Refused { status, body } => write!(f, "HTTP {status}: {body}"),
            ConnError::Handshake(m) => write!(f, "handshake: {m}"),
            ConnError::Head(e) => write!(f, "{e}"),
            ConnError::Frame(e) => write!(f, "bad frame: {e}"),
            ConnError::Closed(Some(code)) => write!(f, "closed by the server with code {code}"),
            ConnError::Closed(None) => write!(f, "the server closed the connection"),
            ConnError::Protocol(m) => write!(f, "protocol: {m}"),
            ConnError::ErrorReply(m) => write!(f, "error reply: {m}"),
            ConnError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConnError {}

impl From<HeadError> for ConnError {
    fn from(e: HeadError) -> ConnError {
        ConnError::Head(e)
    }
}

impl From<FrameError> for ConnError {
    fn from(e: FrameError) -> ConnError {
        ConnError::Frame(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = LoadgenError::TargetUnreachable {
            target: "127.0.0.1:9".parse().unwrap(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
            server: "the relay",
            flag: "--target",
        };
        let m = e.to_string();
        assert!(m.contains("127.0.0.1:9") && m.contains("--target"), "{m}");
        let m = LoadgenError::FdLimit {
            needed: 30000,
            hard: 20000,
        }
        .to_string();
        assert!(
            m.contains("30000") && m.contains("20000") && m.contains("LimitNOFILE"),
            "{m}"
        );
        assert_eq!(
            ConnError::Closed(Some(1013)).to_string(),
            "closed by the server with code 1013"
        );
    }
}
