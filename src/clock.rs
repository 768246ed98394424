//! The process's monotonic clock as 8-byte stamps, for what a connection keeps for its whole
//! life (its deadlines, when it last wrote or was heard): an `Instant` or an `Option<Instant>`
//! takes 16 bytes, which counts at a million idle connections.
//!
//! Owns only the clock's epoch (its first reading). Must never: turn a deadline earlier (a
//! deadline rounds up to the next microsecond, a reading of "now" rounds down, so a timer that
//! compares the two never fires before its `Instant`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
}
