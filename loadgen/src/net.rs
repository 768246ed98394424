//! The operating system side: sockets, limits, and reading the relay's process.
//!
//! Owns: connecting a monoio `TcpStream` from a chosen 127.0.0.x source address (bound before
//! connect with `IP_BIND_ADDRESS_NO_PORT`, so the port is picked per destination and more than
//! one address's worth of ephemeral ports is usable), raising `RLIMIT_NOFILE`, finding the
//! process that listens on the target port (`/proc/net/tcp*` inode -> `/proc/*/fd`), reading
//! `VmRSS`, `getrusage`, and pinning a thread to a CPU. Every call is bounded; nothing here
//! panics on what the system returns.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use monoio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{ConnError, LoadgenError};

/// The `n`-th source address of a spread over `count` (127.0.0.1 ..= 127.0.0.count).
pub fn source_ip(n: usize, count: usize) -> Option<IpAddr> {
    if count <= 1 {
        return None;
    }
    let host = (n % count) as u8 + 1;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
}

// Whether the current runtime is the epoll ("legacy") one. Set per thread at start.
thread_local! {
    static LEGACY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub fn set_legacy_driver(legacy: bool) {
    LEGACY.with(|l| l.set(legacy));
}

fn legacy_driver() -> bool {
    LEGACY.with(|l| l.get())
}

/// Connects to `target` (from `source` when given) within `timeout`, with TCP_NODELAY set.
pub async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnError> {
    match monoio::time::timeout(timeout, connect_inner(target, source)).await {
        Ok(r) => r,
        Err(_) => Err(ConnError::Timeout("the TCP connection")),
    }
}

async fn connect_inner(target: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ConnError> {
    let Some(source) = source else {
        let stream = TcpStream::connect_addr(target)
            .await
            .map_err(ConnError::Connect)?;
        let _ = stream.set_nodelay(true);
        return Ok(stream);
    };
    let domain = Domain::for_address(target);
    let socket =
        Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(ConnError::Connect)?;
    set_bind_address_no_port(socket.as_raw_fd());
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| ConnError::Connect(io::Error::new(e.kind(), format!("bind {source}: {e}"))))?;
    socket.set_nonblocking(true).map_err(ConnError::Connect)?;
    let _ = socket.set_nodelay(true);
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(ConnError::Connect(e)),
    }
    let std_stream = unsafe {
        // SAFETY: `into_raw_fd` hands over sole ownership of a valid socket fd.
        std::net::TcpStream::from_raw_fd(socket.into_raw_fd())
    };
    let legacy = legacy_driver();
    let stream = TcpStream::from_std(std_stream).map_err(ConnError::Connect)?;
    stream.writable(false).await.map_err(ConnError::Connect)?;
    let fd = stream.as_raw_fd();
    if let Some(e) = socket_error(fd) {
        return Err(ConnError::Connect(e));
    }
    if !legacy {
        // io_uring drives blocking sockets itself (it polls internally), while a non-blocking
        // one would hand EAGAIN back to every read; the connect needed non-blocking mode only.
        set_blocking(fd);
    }
    Ok(stream)
}

/// Connects for a handshake-only connection (the connect scenario) with as few system calls
/// as the kernel allows; the caller bounds it with its own timeout. No TCP_NODELAY: such a
/// connection writes once per round trip (the upgrade request, then the close frame after the
/// server's reply), which Nagle never holds back.
///
/// From a chosen source address under io_uring: a non-blocking `socket`, `bind`, `connect`
/// (`EINPROGRESS`) and blocking mode again for io_uring, where [`connect`] also waits for
/// writability and reads `SO_ERROR` (and sets the mode with two `fcntl`s each way). The
/// outcome is not awaited: the first write waits for the connection (io_uring polls) and
/// reports a refused or failed one. Without a source address: monoio's io_uring connect.
pub async fn connect_quick(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnError> {
    let Some(source) = source else {
        return TcpStream::connect_addr(target)
            .await
            .map_err(ConnError::Connect);
    };
    if legacy_driver() {
        return connect_inner(target, Some(source)).await;
    }
    let socket = Socket::new_raw(
        Domain::for_address(target),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(ConnError::Connect)?;
    let fd = socket.as_raw_fd();
    set_bind_address_no_port(fd);
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| ConnError::Connect(io::Error::new(e.kind(), format!("bind {source}: {e}"))))?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(ConnError::Connect(e)),
    }
    // SAFETY: F_SETFL on a valid fd; of the flags it sets, a fresh socket has only O_NONBLOCK,
    // which this clears.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, 0);
    }
    let std_stream = unsafe {
        // SAFETY: `into_raw_fd` hands over sole ownership of a valid socket fd.
        std::net::TcpStream::from_raw_fd(socket.into_raw_fd())
    };
    TcpStream::from_std(std_stream).map_err(ConnError::Connect)
}

fn set_bind_address_no_port(fd: RawFd) {
    set_option(
        fd,
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        &1 as &libc::c_int,
    );
}

/// Makes the socket's close abortive: the kernel drops what is unsent and sends a RST instead
/// of a FIN, and neither side keeps a TIME_WAIT.
pub fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}

/// Best effort `setsockopt`: both options set here are refused only on a bad fd, which the
/// next operation on it reports anyway.
fn set_option<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: setsockopt with the fd the caller owns and a value of `T`'s exact size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        );
    }
}

fn socket_error(fd: RawFd) -> Option<io::Error> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_ERROR) into a c_int with its length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Some(io::Error::last_os_error());
    }
    (err != 0).then(|| io::Error::from_raw_os_error(err))
}

fn set_blocking(fd: RawFd) {
    // SAFETY: fcntl on a valid fd; only O_NONBLOCK is cleared.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// Best effort: sends `bytes` without blocking (used for the close frame at the end).
pub fn send_nonblocking(fd: RawFd, bytes: &[u8]) {
    // SAFETY: send(2) on a fd the caller owns, from a valid slice.
    unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// Shuts a socket down both ways, which makes a pending read return 0 (how a generator thread
/// ends its connections' read loops without cancelling reads in flight).
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown(2) on a fd the caller owns.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// A blocking connect with a timeout, to tell "nothing listening" apart before anything else.
/// `server` and `flag` name what should be there and the flag that sets the address.
pub fn preflight(
    target: SocketAddr,
    timeout: Duration,
    server: &'static str,
    flag: &'static str,
) -> Result<(), LoadgenError> {
    std::net::TcpStream::connect_timeout(&target, timeout)
        .map(drop)
        .map_err(|source| LoadgenError::TargetUnreachable {
            target,
            source,
            server,
            flag,
        })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; errors when `needed` is above it.
/// Returns the soft limit in force afterwards.
pub fn raise_fd_limit(needed: u64) -> Result<u64, LoadgenError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        // Without the numbers, try anyway; connects will report EMFILE clearly if it fails.
        return Ok(needed);
    }
    let hard = lim.rlim_max;
    if needed > hard {
        return Err(LoadgenError::FdLimit { needed, hard });
    }
    if lim.rlim_cur < hard {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit with a valid struct; raising soft up to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(hard);
        }
    }
    Ok(lim.rlim_cur)
}

/// User + system CPU time of this process, in seconds.
pub fn cpu_seconds() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value to be overwritten by getrusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage into a valid struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// Pins the calling thread to `cpu`. Returns false when the kernel refuses.
pub fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, LoadgenError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        LoadgenError::ServerProcess(format!(
            "cannot read {path}: {e} (is pid {pid} the server?)"
        ))
    })?;
    parse_vm_rss(&text).ok_or_else(|| {
        LoadgenError::ServerProcess(format!("{path} has no VmRSS line (a kernel thread?)"))
    })
}

/// The `VmRSS:` value (KiB) of a `/proc/PID/status` text.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `VmRSS` of this process, KiB (0 when unreadable).
pub fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| parse_vm_rss(&t))
        .unwrap_or(0)
}

/// The socket inodes listening on `target`'s port (on its address or on the wildcard) in a
/// `/proc/net/tcp` or `tcp6` text.
pub fn listening_inodes(proc_net_tcp: &str, target: SocketAddr) -> Vec<u64> {
    let mut out = Vec::new();
    for line in proc_net_tcp.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        if cols.len() < 10 || cols[3] != "0A" {
            continue;
        }
        let Some((addr_hex, port_hex)) = cols[1].split_once(':') else {
            continue;
        };
        if u16::from_str_radix(port_hex, 16).ok() != Some(target.port()) {
            continue;
        }
        let addr_matches = match (parse_proc_addr(addr_hex), target.ip()) {
            (Some(a), t) => a == t || a.is_unspecified() || t.is_unspecified(),
            (None, _) => false,
        };
        if !addr_matches {
            continue;
        }
        if let Ok(inode) = cols[9].parse::<u64>() {
            if inode != 0 {
                out.push(inode);
            }
        }
    }
    out
}

/// `/proc/net/tcp*` addresses: the IPv4 address as one little-endian hex word, IPv6 as four.
fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => {
            let v = u32::from_str_radix(hex, 16).ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(v.swap_bytes())))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
}

/// Finds the pid whose fds include a socket listening on `target`.
pub fn find_listener_pid(target: SocketAddr) -> Result<u32, LoadgenError> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, target));
        }
    }
    if inodes.is_empty() {
        return Err(LoadgenError::ServerProcess(format!(
            "no socket listens on {target} in this network namespace (/proc/net/tcp); pass \
             --server-pid PID"
        )));
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Err(LoadgenError::ServerProcess(
            "cannot list /proc; pass --server-pid PID".into(),
        ));
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if owns_any(&entry.path().join("fd"), &wanted) {
            pids.push(pid);
        }
    }
    match pids[..] {
        [pid] => Ok(pid),
        [] => Err(LoadgenError::ServerProcess(format!(
            "a socket listens on {target} but no process visible to this user owns it (another \
             user's process, or another PID namespace); pass --server-pid PID"
        ))),
        _ => Err(LoadgenError::ServerProcess(format!(
            "several processes own listening sockets on {target} ({pids:?}); pass --server-pid PID"
        ))),
    }
}

fn owns_any(fd_dir: &Path, wanted: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(fd_dir) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|l| l.to_str().map(|s| wanted.iter().any(|w| w == s)))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F44 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F44 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1F45 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4444 1 0000000000000000 100 0 0 10 0
   3: 0200007F:1F44 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4545 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn finds_listening_inodes_by_port_and_address() {
        let t: SocketAddr = "127.0.0.1:8004".parse().unwrap();
        assert_eq!(listening_inodes(TCP, t), vec![4242]);
        // The wildcard listener on 8005 serves any address.
        let t: SocketAddr = "127.0.0.9:8005".parse().unwrap();
        assert_eq!(listening_inodes(TCP, t), vec![4444]);
        let t: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(listening_inodes(TCP, t).is_empty());
        assert!(listening_inodes("garbage\nmore garbage", t).is_empty());
    }

    #[test]
    fn proc_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(parse_proc_addr("xyz"), None);
    }

    #[test]
    fn rss_and_rusage_of_this_process() {
        assert!(parse_vm_rss("Name:\tx\nVmRSS:\t  1234 kB\n") == Some(1234));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(own_rss_kib() > 0);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(rss_kib(u32::MAX).is_err());
        let (user, system) = cpu_seconds();
        assert!(user >= 0.0 && system >= 0.0);
    }

    #[test]
    fn finds_its_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(find_listener_pid(addr).unwrap(), std::process::id());
        drop(listener);
        let e = find_listener_pid(addr).unwrap_err().to_string();
        assert!(e.contains("--server-pid"), "{e}");
    }

    #[test]
    fn source_addresses_and_limits() {
        assert_eq!(source_ip(5, 1), None);
        assert_eq!(source_ip(0, 3), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(source_ip(4, 3), Some("127.0.0.2".parse().unwrap()));
        assert!(raise_fd_limit(16).unwrap() >= 16);
        if let Err(e) = raise_fd_limit(u64::MAX) {
            assert!(matches!(e, LoadgenError::FdLimit { .. }));
        }
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = unused.local_addr().unwrap();
        drop(unused);
        assert!(matches!(
            preflight(addr, Duration::from_secs(1), "the relay", "--target"),
            Err(LoadgenError::TargetUnreachable { .. })
        ));
    }
}
