//! The kernel's scheduler accounting for a shard's thread: time on a CPU, time runnable but
//! waiting for one, and how often the thread was preempted (Linux
//! `/proc/self/task/<tid>/schedstat` and `.../status`).
//!
//! Why: a shard that shares its core with other busy threads (another shard, a sidecar, a load
//! generator) waits in the run queue whenever it wakes while the core is taken, and that wait
//! is latency no metric of the shard's own work shows. The wait beside the CPU time says how
//! much of a shard's latency is the machine's contention.
//!
//! Read only when `/metrics` is scraped, never on the hot path. Parsing is pure and tested
//! alone; a kernel without these files (or a thread that has gone) gives `None`, and the
//! exposition leaves that shard's samples out.

use std::sync::atomic::{AtomicU64, Ordering};

/// One thread's totals since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSched {
    /// Nanoseconds on a CPU.
    pub cpu_ns: u64,
    /// Nanoseconds runnable but waiting in a run queue for a CPU.
    pub runqueue_wait_ns: u64,
    /// Times the kernel took the CPU from the thread while it could still run
    /// (`nonvoluntary_ctxt_switches`).
    pub preemptions: u64,
}

/// The calling thread's kernel id, for [`ThreadId::record_current`].
fn current_tid() -> u64 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u64::try_from(tid).unwrap_or(0)
}

/// A shard thread's kernel id, written once by the thread itself and read by whichever thread
/// serves a scrape. 0 means "not started yet".
#[derive(Debug, Default)]
pub struct ThreadId(AtomicU64);

impl ThreadId {
    /// An id not yet recorded.
    pub const fn new() -> Self {
        ThreadId(AtomicU64::new(0))
    }

    /// Records the calling thread as this shard's thread.
    pub fn record_current(&self) {
        self.0.store(current_tid(), Ordering::Relaxed);
    }

    /// The recorded id, if the thread has recorded one.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            tid => Some(tid),
        }
    }

    /// The thread's accounting now, when the thread has started and the kernel offers it.
    pub fn read(&self) -> Option<ThreadSched> {
        let tid = self.get()?;
        let schedstat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
        let (cpu_ns, runqueue_wait_ns) = parse_schedstat(&schedstat)?;
        Some(ThreadSched {
            cpu_ns,
            runqueue_wait_ns,
            preemptions: parse_preemptions(&status)?,
        })
    }
}

/// `schedstat` is "<ns on cpu> <ns waiting on a run queue> <timeslices>"; gives the first two.
/// Also the pacer's source of a shard's run delay (`crate::pacing`).
pub(crate) fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_ascii_whitespace();
    let cpu = fields.next()?.parse().ok()?;
    let wait = fields.next()?.parse().ok()?;
    Some((cpu, wait))
}

/// The `nonvoluntary_ctxt_switches:` line of a task's `status`.
fn parse_preemptions(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("nonvoluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_cpu_and_wait_and_refuses_garbage() {
        assert_eq!(
            parse_schedstat("146963318 4506742 343\n"),
            Some((146_963_318, 4_506_742))
        );
        assert_eq!(parse_schedstat("5 0 1"), Some((5, 0)));
        assert_eq!(parse_schedstat("12 x 3"), None);
        assert_eq!(parse_schedstat("-1 2 3"), None);
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn preemptions_come_from_the_nonvoluntary_line_only() {
        let status = "Name:\trelay-shard-0\nvoluntary_ctxt_switches:\t900\n\
                      nonvoluntary_ctxt_switches:\t17\n";
        assert_eq!(parse_preemptions(status), Some(17));
        assert_eq!(parse_preemptions("voluntary_ctxt_switches:\t900\n"), None);
        assert_eq!(
            parse_preemptions("nonvoluntary_ctxt_switches:\tmany\n"),
            None
        );
    }

    #[test]
    fn a_thread_reads_its_own_accounting_once_recorded() {
        let id = ThreadId::new();
        assert_eq!(id.read(), None, "nothing recorded, nothing read");
        id.record_current();
        let mut spin = 0u64;
        for i in 0..2_000_000u64 {
            spin = spin.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(spin);
        // The kernel brings a thread's CPU time up to date when it leaves the CPU (or at a
        // scheduler tick), so the thread leaves it once before reading.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let sched = id
            .read()
            .expect("Linux offers /proc/self/task/<tid>/schedstat");
        assert!(
            sched.cpu_ns > 0,
            "a thread that ran has CPU time: {sched:?}"
        );
    }
}
