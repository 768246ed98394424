//! The shard's parking lot: wakers that name a connection side instead of a task.
//!
//! An idle WebSocket side (nothing to write, nothing read for a while) ends its task and
//! leaves its state in its [`crate::shard::ConnCtl`]. Whatever would have woken the task (a
//! frame queued, a close, a timer, the socket turning readable) wakes a [`waker`] instead: a
//! plain integer, the connection id and the side, that the shard's [`crate::shard::Shard::unparker`]
//! takes from this thread's woken list and resumes by spawning the side's task again. So an idle
//! connection holds no task at all, only its state.
//!
//! A reader waits in the shard's [`Readiness`] set, parked or on its task: one epoll instance
//! in which each WebSocket's socket is registered once, edge-triggered, so that waiting costs
//! the process nothing and no syscall (the kernel keeps the entry); the set's task turns each
//! ready socket into a wake of its reader.
//!
//! Owns only the woken list of this thread and the shard's readiness set. Must never: hold a
//! connection's state (that is the `ConnCtl`'s), or allocate per wake-up once the list has
//! grown to the shard's busiest round.
//! Bound: the list holds at most two entries per connection of the shard between two rounds of
//! the unparker (a side that is woken again before it ran adds a duplicate, which the unparker
//! skips: a side is taken out of its slot once).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};

/// Which side of a connection a waker resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Writer = 0,
    Reader = 1,
}

/// A side parked while idle: resuming it spawns its task again.
pub trait Resume {
    fn resume(self: Box<Self>);
}

struct Woken {
    /// Tagged ids (`id << 1 | side`) woken since the unparker last ran.
    tagged: RefCell<Vec<u64>>,
    unparker: Cell<Option<Waker>>,
}

thread_local! {
    static WOKEN: Woken = const {
        Woken {
            tagged: RefCell::new(Vec::new()),
            unparker: Cell::new(None),
        }
    };
}

/// A waker that resumes side `side` of connection `id` on this thread's shard.
pub fn waker(id: u64, side: Side) -> Waker {
    let tagged = (id << 1) | side as u64;
    // SAFETY: the data is an integer, never dereferenced; every vtable function is safe to
    // call from any thread (waking from another thread would only name an id that thread's
    // shard does not have, which its unparker skips).
    unsafe { Waker::from_raw(raw(tagged as usize as *const ())) }
}

fn raw(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, forget);

unsafe fn clone(data: *const ()) -> RawWaker {
    raw(data)
}

unsafe fn wake(data: *const ()) {
    let tagged = data as usize as u64;
    // At thread exit the list is gone, and so is everything a wake could resume.
    let _ = WOKEN.try_with(|woken| {
        woken.tagged.borrow_mut().push(tagged);
        if let Some(unparker) = woken.unparker.take() {
            unparker.wake();
        }
    });
}

unsafe fn forget(_: *const ()) {}

/// Resolves with the sides woken since the last call, moved into `into` (cleared first).
/// One caller per thread: the shard's unparker.
pub fn woken(into: &mut Vec<(u64, Side)>) -> impl Future<Output = ()> + '_ {
    poll_fn(move |cx| {
        WOKEN.with(|woken| {
            let mut tagged = woken.tagged.borrow_mut();
            if tagged.is_empty() {
                woken.unparker.set(Some(cx.waker().clone()));
                return Poll::Pending;
            }
            into.clear();
            into.extend(tagged.drain(..).map(|t| {
                let side = if t & 1 == 1 {
                    Side::Reader
                } else {
                    Side::Writer
                };
                (t >> 1, side)
            }));
            Poll::Ready(())
        })
    })
}

/// Ready sockets taken from the epoll set per `epoll_wait`.
const READY_BATCH: usize = 256;

/// The shard's readiness set for WebSocket readers: an epoll instance; each connection's
/// socket is in it, edge-triggered, with its connection id.
pub struct Readiness {
    epoll: OwnedFd,
}

impl Readiness {
    pub fn new() -> std::io::Result<Readiness> {
        // SAFETY: plain syscall; the descriptor it returns is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Readiness {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// From now on wakes the reader of connection `id` (see [`waker`]) whenever `socket`
    /// turns readable or hangs up. Edge-triggered: reported is what arrives after a read that
    /// drained the socket (and, at once, what is there when added); the entry lives as long as
    /// the socket (closing it takes it out of the set).
    pub fn add(&self, socket: RawFd, id: u64) -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: id,
        };
        // SAFETY: valid descriptors and a valid event; the kernel copies it.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket,
                &mut event,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Turns ready sockets into wakes of their readers, for the shard's life. The epoll
    /// descriptor itself is awaited through the runtime (io_uring poll, or epoll), wrapped as a
    /// stream only to be polled for readability.
    pub async fn run(&self) -> std::io::Result<()> {
        // SAFETY: `dup` of a descriptor we own; the copy is owned by the stream below.
        let copy = unsafe { libc::dup(self.epoll.as_raw_fd()) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `copy` is a fresh descriptor nothing else owns.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(copy) };
        let waitable = monoio::net::TcpStream::from_std(std_stream)?;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; READY_BATCH];
        loop {
            waitable.readable(false).await?;
            // Until the set is empty: the runtime may report readiness by its edges only.
            loop {
                // SAFETY: `events` is valid for READY_BATCH entries; timeout 0 never blocks.
                let n = unsafe {
                    libc::epoll_wait(
                        self.epoll.as_raw_fd(),
                        events.as_mut_ptr(),
                        READY_BATCH as libc::c_int,
                        0,
                    )
                };
                let Ok(n) = usize::try_from(n) else {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(std::io::Error::last_os_error());
                };
                for event in events.iter().take(n) {
                    let id = event.u64;
                    waker(id, Side::Reader).wake();
                }
                if n < READY_BATCH {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::Context;

    #[test]
    fn a_waker_names_its_connection_and_side_once_per_wake() {
        let mut into = Vec::new();
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        assert!(pin!(woken(&mut into)).poll(&mut cx).is_pending());

        let writer = waker(0x1234, Side::Writer);
        let reader = waker(0x1234, Side::Reader);
        writer.wake_by_ref();
        let cloned = reader.clone();
        drop(reader);
        cloned.wake();
        let other = waker(u64::MAX >> 1, Side::Reader);
        other.wake();
        assert!(pin!(woken(&mut into)).poll(&mut cx).is_ready());
        assert_eq!(
            into,
            vec![
                (0x1234, Side::Writer),
                (0x1234, Side::Reader),
                (u64::MAX >> 1, Side::Reader)
            ]
        );
        // Taken: nothing is woken twice.
        assert!(pin!(woken(&mut into)).poll(&mut cx).is_pending());
        drop(writer);
    }
}
