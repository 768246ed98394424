//! Time and the open-loop schedule.
//!
//! Owns the process-wide time origin (publishers and subscribers live in one process, so a
//! timestamp taken by one thread is comparable with the clock of another), the schedule that
//! says when event `n` of a step is due, how a step's events are split between publishers, the
//! rate ramp, and the precise wait a publisher uses until its next event is due.
//! Must never: measure latency from anything but an event's scheduled time (that is what keeps
//! a slow server from hiding latency, "coordinated omission").

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// At most this many steps in one ramp: per-step counters are fixed arrays.
pub const MAX_STEPS: usize = 64;

const NS_PER_S: u128 = 1_000_000_000;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// The process-wide origin of every timestamp the generator writes or reads.
pub fn origin() -> Instant {
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since [`origin`]. Saturates after ~584 years.
#[inline]
pub fn now_ns() -> u64 {
    u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The monotonic clock, in ns (`CLOCK_MONOTONIC`: what `Instant` and a timerfd use).
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Any clock `clock_gettime` reads (a thread's CPU clock too), in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A one-shot timer on the monotonic clock, as an fd that epoll or io_uring waits on.
pub struct TimerFd(OwnedFd);

impl TimerFd {
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall; a non-negative result is a new fd we own.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(TimerFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires at `at_ns` on the monotonic clock (at once when that has passed).
    pub fn arm_at(&self, at_ns: u64) {
        arm_timerfd_at(self.0.as_raw_fd(), at_ns);
    }

    /// Reads the expiry count so the fd stops being readable.
    pub fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer; EAGAIN is fine.
        unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }

    pub fn into_owned_fd(self) -> OwnedFd {
        self.0
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Arms the timerfd `fd` to fire once at `at_ns` on the monotonic clock.
pub fn arm_timerfd_at(fd: RawFd, at_ns: u64) {
    let at = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
            // An all-zero value would disarm the timer instead.
            tv_nsec: (at_ns % 1_000_000_000).max(1) as libc::c_long,
        },
    };
    // SAFETY: `at` is valid and the old value is not asked for; on an fd that is not a
    // timerfd the call fails with EINVAL and changes nothing.
    unsafe { libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &at, std::ptr::null_mut()) };
}

/// The `Instant` of a timestamp from [`now_ns`].
pub fn instant_of(ns: u64) -> Instant {
    origin() + Duration::from_nanos(ns)
}

/// Seconds as nanoseconds (negative and NaN become 0).
pub fn secs_to_ns(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1e9) as u64
    } else {
        0
    }
}

/// When each event of one open-loop step is due. Event `n` (0-based, counted over all
/// publishers of the step) is due at `start_ns + floor(n * 1e9 / rate)`; the step holds the
/// events due before `start_ns + duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub start_ns: u64,
    /// Events per second; at least 1.
    pub rate: u64,
    /// Events in the step.
    pub total: u64,
}

impl Schedule {
    pub fn new(start_ns: u64, rate: u64, duration_ns: u64) -> Schedule {
        let rate = rate.max(1);
        // Events with floor(n * 1e9 / rate) < duration: n < duration * rate / 1e9, rounded up.
        let total = (duration_ns as u128 * rate as u128).div_ceil(NS_PER_S);
        Schedule {
            start_ns,
            rate,
            total: u64::try_from(total).unwrap_or(u64::MAX),
        }
    }

    /// When event `n` is due.
    #[inline]
    pub fn due_at(&self, n: u64) -> u64 {
        let offset = n as u128 * NS_PER_S / self.rate as u128;
        self.start_ns
            .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
    }

    /// How many events are due at `now_ns` (all `n` with `due_at(n) <= now_ns`), at most `total`.
    #[inline]
    pub fn due_count(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns {
            return 0;
        }
        // floor(n * 1e9 / rate) <= d  <=>  n * 1e9 < (d + 1) * rate.
        let d = (now_ns - self.start_ns) as u128 + 1;
        let count = (d * self.rate as u128).div_ceil(NS_PER_S);
        u64::try_from(count).unwrap_or(u64::MAX).min(self.total)
    }
}

/// Publisher `p` of `publishers` owns the events `n` with `n % publishers == p`.
/// Returns how many of those are below `count`.
#[inline]
pub fn owned_below(count: u64, p: u64, publishers: u64) -> u64 {
    let publishers = publishers.max(1);
    if count > p {
        (count - p - 1) / publishers + 1
    } else {
        0
    }
}

/// The global index of publisher `p`'s `k`-th event.
#[inline]
pub fn global_index(k: u64, p: u64, publishers: u64) -> u64 {
    k * publishers.max(1) + p
}

/// A geometric ramp `start, start*factor, ... , end`, as `START:END:FACTOR` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Ramp {
    pub start: u64,
    pub end: u64,
    pub factor: f64,
}

impl Ramp {
    /// The values of each step: multiplied by `factor` (at least +1) while below `end`, and
    /// `end` itself last.
    pub fn steps(&self) -> Result<Vec<u64>, String> {
        if self.start == 0 || self.end < self.start {
            return Err(format!(
                "ramp {}:{}:{} needs 0 < START <= END",
                self.start, self.end, self.factor
            ));
        }
        if !(self.factor.is_finite() && self.factor > 1.0) {
            return Err(format!(
                "ramp factor must be a number above 1, got {}",
                self.factor
            ));
        }
        let mut steps = Vec::new();
        let mut v = self.start;
        while v < self.end {
            steps.push(v);
            if steps.len() > MAX_STEPS {
                break;
            }
            let next = (v as f64 * self.factor).round();
            v = if next >= self.end as f64 {
                self.end
            } else {
                (next as u64).max(v + 1)
            };
        }
        steps.push(self.end);
        if steps.len() > MAX_STEPS {
            return Err(format!(
                "ramp {}:{}:{} has more than {MAX_STEPS} steps; use a larger factor",
                self.start, self.end, self.factor
            ));
        }
        Ok(steps)
    }
}

impl std::str::FromStr for Ramp {
    type Err = String;

    fn from_str(s: &str) -> Result<Ramp, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [start, end, factor] = parts[..] else {
            return Err(format!("expected START:END:FACTOR, got {s:?}"));
        };
        let start = start
            .trim()
            .parse()
            .map_err(|_| format!("ramp START {start:?} is not a whole number"))?;
        let end = end
            .trim()
            .parse()
            .map_err(|_| format!("ramp END {end:?} is not a whole number"))?;
        let factor = factor
            .trim()
            .parse()
            .map_err(|_| format!("ramp FACTOR {factor:?} is not a number"))?;
        let ramp = Ramp { start, end, factor };
        ramp.steps()?;
        Ok(ramp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_counts_agree_with_due_times() {
        for rate in [1u64, 3, 7, 1000, 5000, 1_000_003] {
            let s = Schedule::new(1_000, rate, 2_000_000_000);
            assert_eq!(s.total, rate * 2, "rate {rate}");
            for probe in [
                0u64,
                1,
                999,
                1_000,
                1_001,
                123_456_789,
                1_999_999_999,
                u64::MAX / 2,
            ] {
                let now = 1_000u64.saturating_add(probe);
                let c = s.due_count(now);
                if c > 0 {
                    assert!(
                        s.due_at(c - 1) <= now,
                        "rate {rate} now {now}: last due is late"
                    );
                }
                if c < s.total {
                    assert!(
                        s.due_at(c) > now,
                        "rate {rate} now {now}: next is already due"
                    );
                }
            }
        }
    }

    #[test]
    fn schedule_before_start_and_first_event() {
        let s = Schedule::new(500, 10, 1_000_000_000);
        assert_eq!(s.due_count(0), 0);
        assert_eq!(s.due_count(499), 0);
        // Event 0 is due exactly at the start.
        assert_eq!(s.due_count(500), 1);
        assert_eq!(s.due_at(0), 500);
        assert_eq!(s.due_at(1), 500 + 100_000_000);
        assert_eq!(s.due_count(500 + 100_000_000), 2);
        assert_eq!(s.due_count(u64::MAX), 10);
    }

    #[test]
    fn fractional_durations_round_up_to_whole_events() {
        // 3 events/s for 0.5 s: events at 0, 333 ms -> 2 events.
        assert_eq!(Schedule::new(0, 3, 500_000_000).total, 2);
        assert_eq!(Schedule::new(0, 1, 1).total, 1);
        assert_eq!(Schedule::new(0, 5, 0).total, 0);
    }

    #[test]
    fn publishers_partition_the_events() {
        for publishers in 1..6u64 {
            for count in 0..40u64 {
                let sum: u64 = (0..publishers)
                    .map(|p| owned_below(count, p, publishers))
                    .sum();
                assert_eq!(sum, count, "{publishers} publishers, count {count}");
                for p in 0..publishers {
                    let k = owned_below(count, p, publishers);
                    if k > 0 {
                        assert!(global_index(k - 1, p, publishers) < count);
                    }
                    assert!(global_index(k, p, publishers) >= count);
                }
            }
        }
    }

    #[test]
    fn ramp_steps() {
        let r: Ramp = "1000:8000:2".parse().unwrap();
        assert_eq!(r.steps().unwrap(), vec![1000, 2000, 4000, 8000]);
        let r: Ramp = "1000:5000:2".parse().unwrap();
        assert_eq!(r.steps().unwrap(), vec![1000, 2000, 4000, 5000]);
        let r: Ramp = "1:3:1.1".parse().unwrap();
        assert_eq!(r.steps().unwrap(), vec![1, 2, 3]);
        let r: Ramp = "7:7:2".parse().unwrap();
        assert_eq!(r.steps().unwrap(), vec![7]);
        assert!("1000:10:2".parse::<Ramp>().is_err());
        assert!("0:10:2".parse::<Ramp>().is_err());
        assert!("1:10:1".parse::<Ramp>().is_err());
        assert!("1:10".parse::<Ramp>().is_err());
        assert!("a:10:2".parse::<Ramp>().is_err());
        assert!(
            "1:1000000000:1.01".parse::<Ramp>().is_err(),
            "too many steps"
        );
    }

    #[test]
    fn clock_is_monotonic_and_round_trips() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        let i = instant_of(b);
        assert!(i >= origin());
        assert_eq!(secs_to_ns(1.5), 1_500_000_000);
        assert_eq!(secs_to_ns(-1.0), 0);
        assert_eq!(secs_to_ns(f64::NAN), 0);
    }
}
