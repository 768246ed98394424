//! Starting and stopping the shards: listeners, threads, runtimes, the drain.
//!
//! Owns the process-wide [`Shared`] state and the shard threads. Each shard gets its own
//! SO_REUSEPORT listener on the same address (the kernel spreads connections across them), its
//! own core, and its own monoio runtime with the configured driver. Must never: touch a shard's
//! state from outside its thread; everything after start goes through [`Shared`] and the mesh.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, Driver};
use crate::http::Response;
use crate::shard::{Shard, Shared};

/// Errors that stop the relay from starting.
#[derive(Debug)]
pub enum StartError {
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    Runtime {
        shard: usize,
        driver: &'static str,
        source: std::io::Error,
    },
    Thread(std::io::Error),
    /// A `[[subsystems]]` entry is invalid (the field is named).
    Registry(crate::registry::FieldError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            StartError::Runtime {
                shard,
                driver,
                source,
            } => write!(
                f,
                "shard {shard}: cannot start the {driver} driver: {source}"
            ),
            StartError::Thread(e) => write!(f, "cannot start a shard thread: {e}"),
            StartError::Registry(e) => write!(f, "config: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running relay.
pub struct Running {
    pub shared: Arc<Shared>,
    pub local_addr: SocketAddr,
    pub driver: &'static str,
    threads: Vec<JoinHandle<()>>,
}

const LISTEN_BACKLOG: i32 = 4096;
const IO_URING_ENTRIES: u32 = 4096;

fn listener(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let bind_err = |source| StartError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.set_reuse_port(true).map_err(bind_err)?;
    // Accepted sockets inherit TCP_NODELAY from the listener, which saves a setsockopt per
    // connection (a test below holds the kernel to it).
    socket.set_nodelay(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    Ok(socket.into())
}

/// SO_REUSEPORT would let a second relay (or a stale one) silently share the port and split
/// its traffic. A probe bind without SO_REUSEPORT fails when anyone listens there already.
fn ensure_port_free(addr: SocketAddr) -> Result<(), StartError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let bind_err = |source| StartError::Bind { addr, source };
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_err)?;
    probe.set_reuse_address(true).map_err(bind_err)?;
    probe.bind(&addr.into()).map_err(bind_err)?;
    Ok(())
}

/// Binds every shard's listener, starts the shard threads, and returns once all serve.
/// The open-file limit after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, as servers holding many
/// connections do (the soft default is often 1024; every connection is a descriptor).
/// Lowering or raising the hard limit is the operator's call (systemd `LimitNOFILE=`,
/// `ulimit -Hn`), never relay's.
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(OpenFileLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Descriptors relay needs besides its connections (listeners, rings' eventfds, io_uring,
/// upstream pools, logs): what `limits.max_connections` is compared against, with room.
pub const OPEN_FILES_BESIDES_CONNECTIONS: u64 = 256;

pub fn start(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let shards = config.shard_count();
    ensure_port_free(config.listen)?;
    let mut listeners = Vec::with_capacity(shards);
    let first = listener(config.listen)?;
    // With port 0 the kernel picks a port; the other shards must join that same port.
    let local_addr = first.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    listeners.push(first);
    for _ in 1..shards {
        listeners.push(listener(local_addr)?);
    }
    let registry = crate::registry::control::initial_registry(&config, shards)
        .map_err(StartError::Registry)?;
    let shared = Arc::new(Shared::new(config.clone(), shards, registry));
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<&'static str, StartError>>();
    let mut threads = Vec::with_capacity(shards);
    for (id, std_listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let core = match config.pin_shards {
            true => cores.get(id % cores.len().max(1)).copied(),
            false => None,
        };
        let ready = ready_tx.clone();
        let driver = config.driver;
        let thread = std::thread::Builder::new()
            .name(format!("relay-shard-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                run_shard(id, shared, std_listener, driver, ready);
            })
            .map_err(StartError::Thread)?;
        threads.push(thread);
    }
    drop(ready_tx);
    let mut driver = "unknown";
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(d)) => driver = d,
            Ok(Err(e)) => {
                shared.draining.store(true, Ordering::Release);
                for i in 0..shards {
                    shared.mesh.wake(i);
                }
                return Err(e);
            }
            Err(_) => break,
        }
    }
    let _ = shared.driver.set(driver);
    Ok(Running {
        shared,
        local_addr,
        driver,
        threads,
    })
}

fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    driver: Driver,
    ready: mpsc::Sender<Result<&'static str, StartError>>,
) {
    use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
    shared.stats[id].thread.record_current();
    // COOP_TASKRUN: the completions of this shard's pending operations (accepts, reads, the
    // readiness set) are run when the shard next enters the kernel, which its loop does on every
    // round, instead of each interrupting the running shard with an inter-processor interrupt.
    // Kernels before 5.19 refuse the flag and get the plain ring.
    let uring = || {
        let build = |ring| {
            RuntimeBuilder::<IoUringDriver>::new()
                .uring_builder(ring)
                .with_entries(IO_URING_ENTRIES)
                .enable_timer()
                .build()
        };
        let mut cooperative = io_uring::IoUring::builder();
        cooperative.setup_coop_taskrun();
        build(cooperative).or_else(|_| build(io_uring::IoUring::builder()))
    };
    let legacy = || {
        RuntimeBuilder::<LegacyDriver>::new()
            .with_entries(IO_URING_ENTRIES)
            .enable_timer()
            .build()
    };
    let fail = |driver, source| {
        let _ = ready.send(Err(StartError::Runtime {
            shard: id,
            driver,
            source,
        }));
    };
    match driver {
        Driver::IoUring => match uring() {
            Ok(mut rt) => rt.block_on(shard_main(id, shared, listener, "io_uring", ready.clone())),
            Err(e) => fail("io_uring", e),
        },
        Driver::Epoll => match legacy() {
            Ok(mut rt) => rt.block_on(shard_main(id, shared, listener, "epoll", ready.clone())),
            Err(e) => fail("epoll", e),
        },
        Driver::Auto => match uring() {
            Ok(mut rt) => rt.block_on(shard_main(id, shared, listener, "io_uring", ready.clone())),
            Err(uring_error) => {
                tracing::warn!(shard = id, error = %uring_error, "io_uring unavailable; falling back to epoll");
                match legacy() {
                    Ok(mut rt) => {
                        rt.block_on(shard_main(id, shared, listener, "epoll", ready.clone()))
                    }
                    Err(e) => fail("epoll", e),
                }
            }
        },
    }
}

async fn shard_main(
    id: usize,
    shared: Arc<Shared>,
    std_listener: std::net::TcpListener,
    driver: &'static str,
    ready: mpsc::Sender<Result<&'static str, StartError>>,
) {
    let shard = Shard::new(id, shared.clone());
    let listener = match TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(source) => {
            let _ = ready.send(Err(StartError::Runtime {
                shard: id,
                driver,
                source,
            }));
            return;
        }
    };
    monoio::spawn(shard.clone().pump());
    monoio::spawn(shard.clone().flusher());
    monoio::spawn(shard.clone().maintenance());
    monoio::spawn(shard.clone().conn_timers());
    monoio::spawn(shard.clone().unparker());
    monoio::spawn(shard.clone().watch_readiness());
    monoio::spawn(shard.pacer.clone().run());
    monoio::spawn(shard.clone().deliverer());
    monoio::spawn(shard.webhooks.clone().run(shard.clone()));
    if let Some(control) = shard.control.clone() {
        monoio::spawn(control.run(shard.clone()));
    }
    shared.serving.fetch_add(1, Ordering::AcqRel);
    let _ = ready.send(Ok(driver));
    drop(ready);

    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match shard.open_conn(peer) {
                    Ok(ctl) => {
                        monoio::spawn(crate::http::conn::serve(shard.clone(), stream, ctl));
                    }
                    Err(why) => {
                        monoio::spawn(refuse(stream, why, shard.config().limits.clone()));
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning on the error.
                    tracing::warn!(shard = id, error = %e, "accept failed");
                    shard.stats.error(crate::metrics::ErrorKind::Io);
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shard.drain_started() => break,
        }
    }
    drop(listener);
    shared.serving.fetch_sub(1, Ordering::AcqRel);

    // Connections finish what they are doing; past the deadline they are cut.
    let deadline = Instant::now() + Duration::from_secs(shared.config.shutdown.deadline_s);
    while shard.conn_count() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    let cut = shard.conn_count();
    if cut > 0 {
        tracing::warn!(
            shard = id,
            connections = cut,
            "drain deadline passed; cutting connections"
        );
    }
    // Queued webhooks get the rest of the deadline.
    while shard.webhooks.pending() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if shard.webhooks.pending() > 0 {
        tracing::warn!(
            shard = id,
            events = shard.webhooks.pending(),
            "drain deadline passed with webhook events undelivered"
        );
    }
    shared.drained.fetch_add(1, Ordering::AcqRel);
    // Keep answering other shards (their requests to channels owned here) until all are done.
    while shared.drained.load(Ordering::Acquire) < shared.shards && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn refuse(
    mut stream: monoio::net::TcpStream,
    why: crate::shard::Refused,
    limits: crate::config::LimitsConfig,
) {
    use monoio::io::AsyncWriteRentExt;
    let response = match why {
        crate::shard::Refused::Full => Response::error(
            503,
            "too_many_connections",
            &format!(
                "the relay holds its maximum of {} connections (limits.max_connections)",
                limits.max_connections
            ),
        ),
        crate::shard::Refused::PerIp => Response::error(
            429,
            "too_many_connections_from_address",
            &format!(
                "your address holds its maximum of {} connections (limits.max_connections_per_ip)",
                limits.max_connections_per_ip
            ),
        ),
    }
    .with_header("Retry-After", "1");
    let mut out = Vec::new();
    crate::http::conn::write(&mut out, &response, false, false, 0);
    let _ = stream.write_all(out).await;
}

impl Running {
    /// Begins the drain: readiness turns 503, listeners close, connections finish.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        for shard in 0..self.shared.shards {
            self.shared.mesh.wake(shard);
        }
    }

    /// Waits for every shard thread to end (each bounds itself by the drain deadline).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        let limit = super::raise_open_file_limit().expect("getrlimit works");
        assert_eq!(limit.soft, limit.hard);
        let again = super::raise_open_file_limit().expect("idempotent");
        assert_eq!(again, limit);
    }

    #[test]
    fn accepted_sockets_inherit_no_delay_from_the_listener() {
        let listener = super::listener("127.0.0.1:0".parse().unwrap()).expect("a listener");
        listener.set_nonblocking(false).expect("blocking accept");
        let addr = listener.local_addr().expect("bound");
        let _client = std::net::TcpStream::connect(addr).expect("connects");
        let (accepted, _) = listener.accept().expect("accepts");
        assert!(
            accepted.nodelay().expect("getsockopt"),
            "serve() relies on this"
        );
    }
}
