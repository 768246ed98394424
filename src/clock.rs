//! The process's monotonic clock as 8-byte stamps, for what a connection keeps for its whole
//! life (its deadlines, when it last wrote or was heard): an `Instant` or an `Option<Instant>`
//! takes 16 bytes, which counts at a million idle connections.
//!
//! Also the wall clock as a shard reads it per event: [`WallClock`] turns a monotonic reading
//! the caller already has into Unix milliseconds, so that stamping an event's `ts` costs no
//! second clock read.
//!
//! Owns only the clock's epoch (its first reading) and each shard's wall-clock offset. Must
//! never: turn a deadline earlier (a deadline rounds up to the next microsecond, a reading of
//! "now" rounds down, so a timer that compares the two never fires before its `Instant`).

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// A point on the monotonic clock, in microseconds since the epoch plus one; `Stamp::NONE`
/// (zero) stands for "no time".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

impl Stamp {
    pub const NONE: Stamp = Stamp(0);

    /// `at` as a deadline: rounded up, so that it never comes early.
    pub fn deadline(at: Instant) -> Stamp {
        Stamp::from_elapsed(at, true)
    }

    /// `at` as a reading: rounded down, so that a deadline it reaches has passed.
    pub fn reading(at: Instant) -> Stamp {
        Stamp::from_elapsed(at, false)
    }

    /// Now, as a reading.
    pub fn now() -> Stamp {
        Stamp::reading(Instant::now())
    }

    /// `Stamp::NONE` for `None`, else the deadline.
    pub fn deadline_of(at: Option<Instant>) -> Stamp {
        at.map_or(Stamp::NONE, Stamp::deadline)
    }

    /// Microseconds from the epoch to `at`, in 64-bit arithmetic (writers stamp every write;
    /// `Duration::as_micros` would divide 128-bit numbers), plus one.
    fn from_elapsed(at: Instant, round_up: bool) -> Stamp {
        let elapsed = at.saturating_duration_since(epoch());
        let nanos = elapsed.subsec_nanos();
        let sub_micros = match round_up {
            true => nanos.div_ceil(1000),
            false => nanos / 1000,
        };
        let micros = (elapsed.as_secs().saturating_mul(1_000_000))
            .saturating_add(u64::from(sub_micros))
            .min(u64::MAX - 1);
        Stamp(micros + 1)
    }

    pub fn is_none(self) -> bool {
        self == Stamp::NONE
    }

    /// The instant this stamp stands for; `None` for `Stamp::NONE`.
    pub fn instant(self) -> Option<Instant> {
        let micros = self.0.checked_sub(1)?;
        Some(epoch() + Duration::from_micros(micros))
    }

    /// Whether this is a deadline that has passed by the reading `now` (never for `NONE`).
    pub fn passed_by(self, now: Stamp) -> bool {
        !self.is_none() && self <= now
    }
}

/// Wall-clock Unix milliseconds from monotonic readings, for one shard (not `Sync`).
///
/// Linux slews `CLOCK_MONOTONIC` and `CLOCK_REALTIME` alike; the two drift apart only when
/// the wall clock is stepped (or a leap second). [`WallClock::calibrate`] re-reads both,
/// and the shard calls it on its maintenance tick, so a step shows in `ts` within a tick.
#[derive(Debug)]
pub struct WallClock {
    /// (a monotonic reading, the Unix time in microseconds at that reading).
    base: Cell<(Instant, u64)>,
}

impl WallClock {
    pub fn new() -> WallClock {
        let clock = WallClock {
            base: Cell::new((Instant::now(), 0)),
        };
        clock.calibrate();
        clock
    }

    /// Reads both clocks afresh.
    pub fn calibrate(&self) {
        let at = Instant::now();
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, micros);
        self.base.set((at, unix_us));
    }

    /// Unix milliseconds at the monotonic reading `at` (0 before 1970, as `SystemTime` gives).
    pub fn unix_ms(&self, at: Instant) -> u64 {
        let (base, base_us) = self.base.get();
        let unix_us = match at.checked_duration_since(base) {
            Some(after) => base_us.saturating_add(micros(after)),
            None => base_us.saturating_sub(micros(base.saturating_duration_since(at))),
        };
        unix_us / 1000
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::new()
    }
}

/// `d` in whole microseconds, in 64-bit arithmetic.
fn micros(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_never_come_early_and_none_never_comes() {
        // The epoch is the clock's first reading: take it before `start`.
        let _ = Stamp::now();
        let start = Instant::now();
        for nanos in [0, 1, 999, 1000, 1001, 1_500_000, 7_000_000_123] {
            let at = start + Duration::from_nanos(nanos);
            let deadline = Stamp::deadline(at);
            // A reading just before the deadline has not reached it; one at or after it has.
            if nanos > 0 {
                let before = Stamp::reading(at - Duration::from_nanos(1));
                assert!(!deadline.passed_by(before), "{nanos} ns: fired early");
            }
            assert!(deadline.passed_by(Stamp::reading(at + Duration::from_micros(1))));
            let back = deadline.instant().unwrap_or(start);
            assert!(
                back >= at && back - at < Duration::from_micros(1),
                "{nanos} ns"
            );
        }
        assert!(!Stamp::NONE.passed_by(Stamp::now()));
        assert_eq!(Stamp::NONE.instant(), None);
        assert_eq!(Stamp::deadline_of(None), Stamp::NONE);
        let reading = Stamp::now();
        assert!(!reading.is_none());
        assert!(reading.instant().is_some_and(|at| at <= Instant::now()));
    }

    #[test]
    fn the_wall_clock_follows_the_system_clock_from_a_monotonic_reading() {
        let clock = WallClock::new();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let ms = clock.unix_ms(Instant::now());
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        // The base was read within this test, before `before`: at most a millisecond apart.
        assert!(
            u128::from(ms) + 1 >= before && u128::from(ms) <= after,
            "{before} {ms} {after}"
        );
        // Readings either side of the base move the wall clock by as much.
        let (base, base_us) = clock.base.get();
        let later = base + Duration::from_millis(1500);
        assert_eq!(clock.unix_ms(later), (base_us + 1_500_000) / 1000);
        if let Some(earlier) = base.checked_sub(Duration::from_millis(250)) {
            assert_eq!(clock.unix_ms(earlier), (base_us - 250_000) / 1000);
        }
        // A step of the system clock reaches the shard's clock when it calibrates.
        clock.base.set((base, base_us + 3_600_000_000));
        assert!(clock.unix_ms(base) >= ms + 3_600_000);
        clock.calibrate();
        assert!(clock.unix_ms(Instant::now()) < ms + 3_600_000);
    }
}
