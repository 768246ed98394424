//! The per-instance circuit breaker of the HTTP router (API.md §6, §10 "Health checks and
//! circuits"): closed -> open on failures -> half-open probes -> closed.
//!
//! Owns: one instance's breaker state: the consecutive-failure count, the sliding failure-rate
//! window, the open period with its doubling cooldown, and the half-open probe slots. The
//! `relay_circuit_state` gauge value comes from `State::as_gauge`.
//! Must never: read the clock (every call takes `now`, so tests are deterministic), panic on any
//! config or time it is given, do I/O, or let an outcome from an earlier phase decide the
//! current one (a request sent before a trip that fails afterwards must not re-trip or double
//! the cooldown; a slow pre-trip success must not close a half-open circuit).
//!
//! What counts as a failure (connect error, timeout, 5xx) is the caller's decision; this module
//! only counts. One `Circuit` lives on the shard that sends to the instance; it is not shared.
//!
//! Limits: the rate window holds at most `MAX_RATE_BUCKETS` one-second buckets; a
//! `half_open_probes` of 0 is taken as 1 (with no probe the circuit could never close again); a
//! `cooldown_max` below `cooldown` is taken as `cooldown` (no doubling); a
//! `failure_rate_percent` above 100 is taken as 100. Counters saturate instead of wrapping.

use std::time::{Duration, Instant};

/// Most one-second buckets in the failure-rate window (one hour). Bounds the memory a
/// mistaken `rate_window` can cost.
pub const MAX_RATE_BUCKETS: usize = 3600;

/// What a rejected request is told to wait while every half-open probe slot is taken. The
/// probe's verdict usually arrives within one request time, and one second is the smallest
/// non-zero `Retry-After` a client can be given.
pub const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The `[circuit]` settings for one instance. Only `consecutive_failures`, `cooldown` and
/// `half_open_probes` are in the documented config; the rest keep their defaults unless the
/// caller sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Failures in a row that open a closed circuit. 0 turns this rule off.
    pub consecutive_failures: u32,
    /// Failure share (percent) within `rate_window` that opens a closed circuit. 0 turns this
    /// rule off.
    pub failure_rate_percent: u32,
    /// Length of the sliding failure-rate window, in one-second buckets (rounded up).
    pub rate_window: Duration,
    /// Completed requests the window must hold before the rate rule may trip, so that two
    /// failures out of three do not open an instance that is barely used.
    pub rate_min_requests: u32,
    /// How long the first trip keeps the circuit open.
    pub cooldown: Duration,
    /// Upper bound of the doubled cooldown.
    pub cooldown_max: Duration,
    /// Requests let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        // The documented defaults (API.md §10); the rate rule's numbers are the usual
        // "half of at least twenty requests within ten seconds", used only when turned on.
        CircuitConfig {
            consecutive_failures: 5,
            failure_rate_percent: 0,
            rate_window: Duration::from_secs(10),
            rate_min_requests: 20,
            cooldown: Duration::from_secs(10),
            cooldown_max: Duration::from_secs(5 * 60),
            half_open_probes: 1,
        }
    }
}

/// The breaker state as reported to callers and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    /// The `relay_circuit_state` gauge value: 0 closed, 1 half-open, 2 open (API.md §10).
    pub fn as_gauge(self) -> u8 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }

    /// Lower-case name for admin listings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

/// Leave to send one request, handed back with its outcome (`on_success` / `on_failure` /
/// `on_cancel`). Deliberately neither `Clone` nor `Copy`, so one request reports once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "report the outcome with on_success, on_failure or on_cancel"]
pub struct Permit {
    /// Whether this request holds a half-open probe slot; only probes decide a half-open circuit.
    probe: bool,
    /// The circuit's generation when the permit was given. A permit from an earlier
    /// generation (before a trip, close or reset) reports into nothing.
    generation: u64,
}

impl Permit {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// The breaker's phase. `Open` keeps its start and length rather than an end instant, so no
/// `Instant + Duration` can overflow whatever the config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { since: Instant, cooldown: Duration },
    HalfOpen { in_flight: u32 },
}

/// Outcomes within one second of the rate window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    /// Seconds since `RateWindow::origin` this bucket counts; a bucket whose second has left
    /// the window is stale and is cleared on reuse instead of eagerly.
    second: u64,
    total: u32,
    failures: u32,
}

/// A ring of one-second buckets: a fixed memory cost however many requests go through.
#[derive(Debug, Clone)]
struct RateWindow {
    /// Empty when the rate rule is off, so a breaker without it costs no allocation.
    buckets: Vec<Bucket>,
    /// The instant second 0 starts at; set by the first recorded outcome, since `Circuit::new`
    /// has no `now`.
    origin: Option<Instant>,
    /// The newest second seen. Time handed in out of order is taken as this second, so the
    /// window never runs backwards.
    newest: u64,
}

impl RateWindow {
    fn new(config: &CircuitConfig) -> Self {
        let buckets = if config.failure_rate_percent == 0 {
            Vec::new()
        } else {
            // Round a partial second up: a 1.5 s window must not shrink to 1 s.
            let secs = config
                .rate_window
                .as_secs()
                .saturating_add(u64::from(config.rate_window.subsec_nanos() > 0));
            let len = usize::try_from(secs)
                .unwrap_or(MAX_RATE_BUCKETS)
                .clamp(1, MAX_RATE_BUCKETS);
            vec![Bucket::default(); len]
        };
        RateWindow {
            buckets,
            origin: None,
            newest: 0,
        }
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
        self.origin = None;
        self.newest = 0;
    }

    /// Counts one outcome and returns the window's `(total, failures)` afterwards.
    fn record(&mut self, now: Instant, failed: bool) -> (u64, u64) {
        let len = self.buckets.len() as u64;
        if len == 0 {
            return (0, 0);
        }
        let origin = *self.origin.get_or_insert(now);
        let second = now
            .saturating_duration_since(origin)
            .as_secs()
            .max(self.newest);
        self.newest = second;
        // `len` is at most MAX_RATE_BUCKETS, so the remainder fits in usize.
        let slot = (second % len) as usize;
        if let Some(bucket) = self.buckets.get_mut(slot) {
            if bucket.second != second || bucket.total == 0 {
                *bucket = Bucket {
                    second,
                    total: 0,
                    failures: 0,
                };
            }
            bucket.total = bucket.total.saturating_add(1);
            if failed {
                bucket.failures = bucket.failures.saturating_add(1);
            }
        }
        // Only buckets of the last `len` seconds count; older ones are stale leftovers.
        self.buckets
            .iter()
            .filter(|b| b.total > 0 && b.second <= second && second - b.second < len)
            .fold((0, 0), |(t, f), b| {
                (t + u64::from(b.total), f + u64::from(b.failures))
            })
    }
}

/// One instance's circuit breaker. See the module header for the rules.
#[derive(Debug, Clone)]
pub struct Circuit {
    config: CircuitConfig,
    phase: Phase,
    /// Failures in a row while closed.
    consecutive: u32,
    window: RateWindow,
    /// Trips since the circuit last closed; drives the cooldown doubling.
    trips: u32,
    /// Every trip since creation, for metrics; a reset does not clear it.
    trips_total: u64,
    /// Bumped on every trip, close and reset, so that permits from before are ignored.
    generation: u64,
}

impl Circuit {
    pub fn new(config: CircuitConfig) -> Self {
        let window = RateWindow::new(&config);
        Circuit {
            config,
            phase: Phase::Closed,
            consecutive: 0,
            window,
            trips: 0,
            trips_total: 0,
            generation: 0,
        }
    }

    pub fn config(&self) -> &CircuitConfig {
        &self.config
    }

    /// The state at `now`. An open circuit reads as half-open once its cooldown has passed,
    /// even before the next `try_acquire` moves it there.
    pub fn state(&self, now: Instant) -> State {
        match self.phase {
            Phase::Closed => State::Closed,
            Phase::HalfOpen { .. } => State::HalfOpen,
            Phase::Open { since, cooldown } => {
                if now.saturating_duration_since(since) >= cooldown {
                    State::HalfOpen
                } else {
                    State::Open
                }
            }
        }
    }

    /// How long a request would be refused for at `now`, without asking for a permit: `None`
    /// when `try_acquire` would succeed. Lets the router tell "available" instances apart and
    /// compute the `Retry-After` of a 503 without taking probe slots.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match self.phase {
            Phase::Closed => None,
            Phase::Open { since, cooldown } => {
                let elapsed = now.saturating_duration_since(since);
                // A passed cooldown means half-open with every probe slot free.
                cooldown.checked_sub(elapsed).filter(|left| !left.is_zero())
            }
            Phase::HalfOpen { in_flight } => {
                (in_flight >= self.probe_slots()).then_some(HALF_OPEN_RETRY_AFTER)
            }
        }
    }

    /// Asks to send one request. Closed: always `Ok`. Open: `Err(retry_after)`, the time left
    /// of the cooldown. Half-open: `Ok` for at most `half_open_probes` requests in flight,
    /// `Err(HALF_OPEN_RETRY_AFTER)` otherwise.
    pub fn try_acquire(&mut self, now: Instant) -> Result<Permit, Duration> {
        if let Phase::Open { since, cooldown } = self.phase {
            let elapsed = now.saturating_duration_since(since);
            match cooldown.checked_sub(elapsed) {
                Some(left) if !left.is_zero() => return Err(left),
                _ => self.phase = Phase::HalfOpen { in_flight: 0 },
            }
        }
        let probe_slots = self.probe_slots();
        match &mut self.phase {
            Phase::Closed => Ok(Permit {
                probe: false,
                generation: self.generation,
            }),
            Phase::HalfOpen { in_flight } if *in_flight < probe_slots => {
                *in_flight += 1;
                Ok(Permit {
                    probe: true,
                    generation: self.generation,
                })
            }
            Phase::HalfOpen { .. } => Err(HALF_OPEN_RETRY_AFTER),
            // Left by the block above only while the cooldown runs, and that returned.
            Phase::Open { .. } => Err(HALF_OPEN_RETRY_AFTER),
        }
    }

    /// The request behind `permit` succeeded. Closed: the failure run ends. Half-open: a probe
    /// success closes the circuit and forgets the doubling.
    pub fn on_success(&mut self, permit: Permit, now: Instant) {
        if permit.generation != self.generation {
            return;
        }
        match self.phase {
            Phase::Closed => {
                self.consecutive = 0;
                self.window.record(now, false);
            }
            Phase::HalfOpen { .. } if permit.probe => self.close(),
            // Same-generation permits are never given while open, and a non-probe permit of
            // this generation cannot exist while half-open; nothing to count.
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }

    /// The request behind `permit` failed (connect error, timeout or 5xx). Closed: may trip.
    /// Half-open: a probe failure re-opens with the next, doubled cooldown.
    pub fn on_failure(&mut self, permit: Permit, now: Instant) {
        if permit.generation != self.generation {
            return;
        }
        match self.phase {
            Phase::Closed => {
                self.consecutive = self.consecutive.saturating_add(1);
                let (total, failures) = self.window.record(now, true);
                if self.consecutive_rule_trips() || self.rate_rule_trips(total, failures) {
                    self.trip(now);
                }
            }
            Phase::HalfOpen { .. } if permit.probe => self.trip(now),
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }

    /// The request behind `permit` ended without a verdict (the client went away, the relay is
    /// draining). Frees its probe slot so a half-open circuit cannot wait forever on a probe
    /// that will never report; counts nothing.
    pub fn on_cancel(&mut self, permit: Permit) {
        if permit.generation != self.generation || !permit.probe {
            return;
        }
        if let Phase::HalfOpen { in_flight } = &mut self.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Back to closed with clean counters and no doubling (`POST .../circuit/reset`). Requests
    /// in flight report into nothing. `trips_total` is kept: it is a metric.
    pub fn reset(&mut self) {
        self.phase = Phase::Closed;
        self.consecutive = 0;
        self.window.clear();
        self.trips = 0;
        self.generation = self.generation.wrapping_add(1);
    }

    /// Trips since the circuit last closed (0 while closed after a success or a reset). The
    /// current open period lasts `cooldown * 2^(trips - 1)`, capped.
    pub fn trips(&self) -> u32 {
        self.trips
    }

    /// Every trip since this breaker was created, for metrics and admin listings.
    pub fn trips_total(&self) -> u64 {
        self.trips_total
    }

    fn probe_slots(&self) -> u32 {
        self.config.half_open_probes.max(1)
    }

    fn consecutive_rule_trips(&self) -> bool {
        self.config.consecutive_failures > 0 && self.consecutive >= self.config.consecutive_failures
    }

    fn rate_rule_trips(&self, total: u64, failures: u64) -> bool {
        let percent = u64::from(self.config.failure_rate_percent.min(100));
        // A window below the minimum says too little to act on; `max(1)` keeps an empty
        // window (rate rule off) from tripping on 0 >= 0.
        percent > 0
            && total >= u64::from(self.config.rate_min_requests.max(1))
            && failures * 100 >= total * percent
    }

    /// The open period after the `trips`-th trip in a row: `cooldown * 2^(trips - 1)`, capped.
    fn cooldown_for(&self, trips: u32) -> Duration {
        let base = self.config.cooldown;
        let cap = self.config.cooldown_max.max(base);
        let doublings = trips.saturating_sub(1);
        // 2^31 is the largest power of two a u32 factor holds; anything beyond is past any cap.
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        base.checked_mul(factor).unwrap_or(Duration::MAX).min(cap)
    }

    fn trip(&mut self, now: Instant) {
        self.trips = self.trips.saturating_add(1);
        self.trips_total = self.trips_total.saturating_add(1);
        self.phase = Phase::Open {
            since: now,
            cooldown: self.cooldown_for(self.trips),
        };
        // The failures that tripped it are spent; after the next close it starts clean.
        self.consecutive = 0;
        self.window.clear();
        self.generation = self.generation.wrapping_add(1);
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.consecutive = 0;
        self.window.clear();
        self.trips = 0;
        self.generation = self.generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fail(c: &mut Circuit, now: Instant) {
        match c.try_acquire(now) {
            Ok(p) => c.on_failure(p, now),
            Err(left) => panic!("expected a permit, refused for {left:?}"),
        }
    }

    fn succeed(c: &mut Circuit, now: Instant) {
        match c.try_acquire(now) {
            Ok(p) => c.on_success(p, now),
            Err(left) => panic!("expected a permit, refused for {left:?}"),
        }
    }

    /// A circuit with only the consecutive rule, tripped once at `t0`.
    fn tripped(config: CircuitConfig, t0: Instant) -> Circuit {
        let n = config.consecutive_failures;
        let mut c = Circuit::new(config);
        for _ in 0..n {
            fail(&mut c, t0);
        }
        assert_eq!(c.state(t0), State::Open);
        c
    }

    #[test]
    fn default_config_matches_the_documented_defaults() {
        let d = CircuitConfig::default();
        assert_eq!(d.consecutive_failures, 5);
        assert_eq!(d.failure_rate_percent, 0);
        assert_eq!(d.rate_window, secs(10));
        assert_eq!(d.rate_min_requests, 20);
        assert_eq!(d.cooldown, secs(10));
        assert_eq!(d.cooldown_max, secs(300));
        assert_eq!(d.half_open_probes, 1);
    }

    #[test]
    fn trips_after_n_consecutive_failures() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        for i in 0..4 {
            fail(&mut c, t0 + ms(i));
            assert_eq!(
                c.state(t0 + ms(i)),
                State::Closed,
                "after {} failures",
                i + 1
            );
        }
        fail(&mut c, t0 + ms(4));
        assert_eq!(c.state(t0 + ms(4)), State::Open);
        assert_eq!(c.trips(), 1);
        assert_eq!(c.trips_total(), 1);
    }

    #[test]
    fn a_success_in_between_resets_the_count() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CircuitConfig::default());
        for _ in 0..4 {
            fail(&mut c, t0);
        }
        succeed(&mut c, t0);
        for _ in 0..4 {
            fail(&mut c, t0);
        }
        assert_eq!(c.state(t0), State::Closed);
        fail(&mut c, t0);
        assert_eq!(c.state(t0), State::Open);
    }

    fn rate_config() -> CircuitConfig {
        CircuitConfig {
            consecutive_failures: 0,
            failure_rate_percent: 50,
            rate_window: secs(10),
            rate_min_requests: 20,
            ..CircuitConfig::default()
        }
    }

    #[test]
    fn rate_rule_trips_once_the_minimum_is_reached() {
        let t0 = Instant::now();
        let mut c = Circuit::new(rate_config());
        // Alternate so the consecutive rule could never be the one that trips.
        for i in 0..19u64 {
            let now = t0 + ms(i * 100);
            if i % 2 == 0 {
                fail(&mut c, now);
            } else {
                succeed(&mut c, now);
            }
        }
        // 19 requests, 10 failed: above 50 % but below the minimum of 20.
        assert_eq!(c.state(t0 + secs(2)), State::Closed);
        fail(&mut c, t0 + secs(2));
        // 20 requests, 11 failed.
        assert_eq!(c.state(t0 + secs(2)), State::Open);
    }

    #[test]
    fn rate_rule_does_not_trip_below_the_minimum_or_the_share() {
        let t0 = Instant::now();
        // Below the minimum: 19 failures out of 19.
        let mut c = Circuit::new(rate_config());
        for _ in 0..19 {
            fail(&mut c, t0);
        }
        assert_eq!(c.state(t0), State::Closed);

        // Above the minimum but below the share: twice 11 successes then 9 failures, so the
        // share peaks at 45 % once the minimum is reached.
        let mut c = Circuit::new(rate_config());
        for i in 0..40 {
            if i % 20 >= 11 {
                fail(&mut c, t0);
            } else {
                succeed(&mut c, t0);
            }
        }
        assert_eq!(c.state(t0), State::Closed);
    }

    #[test]
    fn rate_window_slides_old_failures_out() {
        let t0 = Instant::now();
        let mut c = Circuit::new(rate_config());
        for _ in 0..15 {
            fail(&mut c, t0);
        }
        // Eleven seconds later those failures have left the 10 s window: 10 more failures
        // make 10 requests, below the minimum of 20.
        for _ in 0..10 {
            fail(&mut c, t0 + secs(11));
        }
        assert_eq!(c.state(t0 + secs(11)), State::Closed);
        // Within the window they still count: 15 + 10 + 1 = 26 failures of 26.
        let mut c = Circuit::new(rate_config());
        for _ in 0..15 {
            fail(&mut c, t0);
        }
        for _ in 0..5 {
            fail(&mut c, t0 + secs(9));
        }
        assert_eq!(c.state(t0 + secs(9)), State::Open);
    }

    #[test]
    fn open_rejects_with_a_retry_after_that_counts_down() {
        let t0 = Instant::now();
        let mut c = tripped(CircuitConfig::default(), t0);
        assert_eq!(c.try_acquire(t0), Err(secs(10)));
        assert_eq!(c.try_acquire(t0 + secs(3)), Err(secs(7)));
        assert_eq!(c.try_acquire(t0 + ms(9_999)), Err(ms(1)));
        assert_eq!(c.retry_after(t0 + secs(4)), Some(secs(6)));
        assert_eq!(c.state(t0 + ms(9_999)), State::Open);
    }

    #[test]
    fn half_open_after_the_cooldown() {
        let t0 = Instant::now();
        let mut c = tripped(CircuitConfig::default(), t0);
        assert_eq!(c.state(t0 + secs(10)), State::HalfOpen);
        assert_eq!(c.retry_after(t0 + secs(10)), None);
        let permit = c.try_acquire(t0 + secs(10));
        assert!(matches!(&permit, Ok(p) if p.is_probe()));
    }

    #[test]
    fn half_open_limits_probes_in_flight() {
        let t0 = Instant::now();
        let config = CircuitConfig {
            half_open_probes: 2,
            ..CircuitConfig::default()
        };
        let mut c = tripped(config, t0);
        let t1 = t0 + secs(10);
        let a = c.try_acquire(t1);
        let b = c.try_acquire(t1);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(c.try_acquire(t1), Err(HALF_OPEN_RETRY_AFTER));
        assert_eq!(c.retry_after(t1), Some(HALF_OPEN_RETRY_AFTER));
        assert_eq!(c.state(t1), State::HalfOpen);
    }

    #[test]
    fn a_cancelled_probe_frees_its_slot() {
        let t0 = Instant::now();
        let mut c = tripped(CircuitConfig::default(), t0);
        let t1 = t0 + secs(10);
        let Ok(probe) = c.try_acquire(t1) else {
            panic!("probe refused")
        };
        assert!(c.try_acquire(t1).is_err());
        c.on_cancel(probe);
        assert_eq!(c.state(t1), State::HalfOpen);
        assert!(c.try_acquire(t1).is_ok());
    }

    #[test]
    fn probe_success_closes_and_resets_counters() {
        let t0 = Instant::now();
        let mut c = tripped(CircuitConfig::default(), t0);
        let t1 = t0 + secs(10);
        succeed(&mut c, t1);
        assert_eq!(c.state(t1), State::Closed);
        assert_eq!(c.trips(), 0);
        assert_eq!(c.trips_total(), 1);
        // Counters start clean: four failures do not trip, the fifth does.
        for _ in 0..4 {
            fail(&mut c, t1);
        }
        assert_eq!(c.state(t1), State::Closed);
        fail(&mut c, t1);
        assert_eq!(c.state(t1), State::Open);
        // The doubling was forgotten on close: the base cooldown again.
        assert_eq!(c.try_acquire(t1), Err(secs(10)));
    }

    #[test]
    fn probe_failure_reopens_with_a_doubled_cooldown() {
        let t0 = Instant::now();
        let mut c = tripped(CircuitConfig::default(), t0);
        let t1 = t0 + secs(10);
        fail(&mut c, t1);
        assert_eq!(c.state(t1), State::Open);
        assert_eq!(c.trips(), 2);
        assert_eq!(c.try_acquire(t1), Err(secs(20)));
        assert_eq!(c.state(t1 + ms(19_999)), State::Open);
        let t2 = t1 + secs(20);
        assert_eq!(c.state(t2), State::HalfOpen);
        fail(&mut c, t2);
        assert_eq!(c.try_acquire(t2), Err(secs(40)));
    }

    #[test]
    fn cooldown_is_capped_at_cooldown_max() {
        let t0 = Instant::now();
        let config = CircuitConfig {
            consecutive_failures: 1,
            cooldown: secs(10),
            cooldown_max: secs(35),
            ..CircuitConfig::default()
        };
        let mut c = tripped(config, t0);
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..40 {
            let Err(left) = c.try_acquire(now) else {
                panic!("expected open")
            };
            seen.push(left.as_secs());
            now += left;
            fail(&mut c, now);
        }
        assert_eq!(&seen[..4], &[10, 20, 35, 35]);
        // Past 32 doublings the factor saturates instead of overflowing.
        assert!(seen.iter().all(|&s| s <= 35));
        assert_eq!(c.trips(), 41);
    }

    #[test]
    fn reset_closes_and_forgets() {
        let t0 = Instant::now();
        let mut c = tripped(CircuitConfig::default(), t0);
        fail(&mut c, t0 + secs(10)); // re-trip: doubled
        c.reset();
        assert_eq!(c.state(t0 + secs(10)), State::Closed);
        assert_eq!(c.trips(), 0);
        assert_eq!(c.trips_total(), 2);
        for _ in 0..5 {
            fail(&mut c, t0 + secs(11));
        }
        assert_eq!(c.try_acquire(t0 + secs(11)), Err(secs(10)));
    }

    #[test]
    fn stale_permits_report_into_nothing() {
        let t0 = Instant::now();
        let config = CircuitConfig {
            consecutive_failures: 2,
            ..CircuitConfig::default()
        };
        let mut c = Circuit::new(config);
        let Ok(slow) = c.try_acquire(t0) else {
            panic!("closed refused")
        };
        fail(&mut c, t0);
        fail(&mut c, t0);
        assert_eq!(c.state(t0), State::Open);
        // A pre-trip request failing late neither re-trips nor doubles the cooldown.
        c.on_failure(slow, t0 + secs(1));
        assert_eq!(c.trips(), 1);
        assert_eq!(c.try_acquire(t0 + secs(1)), Err(secs(9)));

        // A pre-trip request succeeding late does not close a half-open circuit.
        let mut c = Circuit::new(CircuitConfig {
            consecutive_failures: 2,
            ..CircuitConfig::default()
        });
        let Ok(slow) = c.try_acquire(t0) else {
            panic!("closed refused")
        };
        fail(&mut c, t0);
        fail(&mut c, t0);
        let t1 = t0 + secs(10);
        let Ok(_probe) = c.try_acquire(t1) else {
            panic!("probe refused")
        };
        c.on_success(slow, t1);
        assert_eq!(c.state(t1), State::HalfOpen);
    }

    #[test]
    fn a_probe_from_an_earlier_round_does_not_decide_the_next() {
        let t0 = Instant::now();
        let config = CircuitConfig {
            half_open_probes: 2,
            ..CircuitConfig::default()
        };
        let mut c = tripped(config, t0);
        let t1 = t0 + secs(10);
        let (Ok(first), Ok(late)) = (c.try_acquire(t1), c.try_acquire(t1)) else {
            panic!("probes refused")
        };
        c.on_failure(first, t1);
        let t2 = t1 + secs(20);
        assert_eq!(c.state(t2), State::HalfOpen);
        let Ok(_current) = c.try_acquire(t2) else {
            panic!("probe refused")
        };
        // The second probe of the previous round answers only now: it must not close this
        // round (only this round's probes decide) ...
        c.on_success(late, t2);
        assert_eq!(c.state(t2), State::HalfOpen);
        assert_eq!(c.trips(), 2);
        // ... nor, had it failed, re-trip and double again.
        let mut c = tripped(
            CircuitConfig {
                half_open_probes: 2,
                ..CircuitConfig::default()
            },
            t0,
        );
        let (Ok(first), Ok(late)) = (c.try_acquire(t1), c.try_acquire(t1)) else {
            panic!("probes refused")
        };
        c.on_success(first, t1);
        assert_eq!(c.state(t1), State::Closed);
        c.on_failure(late, t1);
        for _ in 0..4 {
            fail(&mut c, t1);
        }
        // Four fresh failures, not five: the late probe's failure was not counted.
        assert_eq!(c.state(t1), State::Closed);
    }

    #[test]
    fn state_gauge_values() {
        assert_eq!(State::Closed.as_gauge(), 0);
        assert_eq!(State::HalfOpen.as_gauge(), 1);
        assert_eq!(State::Open.as_gauge(), 2);
        let t0 = Instant::now();
        let c = tripped(CircuitConfig::default(), t0);
        assert_eq!(c.state(t0).as_gauge(), 2);
        assert_eq!(c.state(t0 + secs(10)).as_gauge(), 1);
        assert_eq!(
            Circuit::new(CircuitConfig::default()).state(t0).as_gauge(),
            0
        );
    }

    #[test]
    fn degenerate_configs_do_not_panic() {
        let t0 = Instant::now();
        let config = CircuitConfig {
            consecutive_failures: 1,
            failure_rate_percent: 1_000,
            rate_window: Duration::MAX,
            rate_min_requests: 0,
            cooldown: Duration::MAX,
            cooldown_max: Duration::ZERO,
            half_open_probes: 0,
        };
        let mut c = Circuit::new(config);
        fail(&mut c, t0);
        assert_eq!(c.state(t0), State::Open);
        assert_eq!(c.try_acquire(t0), Err(Duration::MAX));
        // A zero cooldown goes straight to half-open, and 0 probes still lets one through.
        let mut c = Circuit::new(CircuitConfig {
            consecutive_failures: 1,
            cooldown: Duration::ZERO,
            half_open_probes: 0,
            ..CircuitConfig::default()
        });
        fail(&mut c, t0);
        assert_eq!(c.state(t0), State::HalfOpen);
        let first = c.try_acquire(t0);
        assert!(first.is_ok());
        assert_eq!(c.try_acquire(t0), Err(HALF_OPEN_RETRY_AFTER));
        // Time handed in backwards is taken as the newest time seen: the last failure counts
        // at second 9, where the window still holds second 0's failures (10 + 9 + 1 = 20). Taken
        // at second 0 it would see only 11 and stay closed.
        let mut c = Circuit::new(rate_config());
        for _ in 0..10 {
            fail(&mut c, t0);
        }
        for _ in 0..9 {
            fail(&mut c, t0 + secs(9));
        }
        assert_eq!(c.state(t0 + secs(9)), State::Closed);
        fail(&mut c, t0);
        assert_eq!(c.state(t0 + secs(9)), State::Open);
    }

    #[test]
    fn rate_rule_off_ignores_any_failure_share() {
        let t0 = Instant::now();
        let mut c = Circuit::new(CircuitConfig {
            consecutive_failures: 0,
            ..CircuitConfig::default()
        });
        for _ in 0..1_000 {
            fail(&mut c, t0);
        }
        assert_eq!(c.state(t0), State::Closed);
    }
}
