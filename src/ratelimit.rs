//! Per-client token-bucket rate limiting (`[rate_limit] publish_per_s, publish_burst,
//! proxy_per_s, proxy_burst`; a refusal becomes HTTP 429 with `Retry-After`).
//!
//! Owns: one shard's buckets for one limit (the integrator keeps one `RateLimiter` for publish and
//! one for proxy per shard), keyed by a client key string (API key, JWT `sub` or client IP), the
//! refill arithmetic, the eviction policy, and the refusal counter.
//! Must never: allocate without bound (at most `max_keys` buckets, each holding one copy of its
//! key; keys come from requests already bounded by `limits.max_header_bytes`), read the clock
//! itself (the caller passes monotonic nanoseconds, so tests inject time), lock or share anything
//! between threads, use floating point, overflow, or panic on any input.
//!
//! # Arithmetic
//!
//! A bucket's level is kept in integer "units" where one token is `1e9 * d` units and a
//! nanosecond refills exactly `per_s` units (`d` is the divisor below: `N` for `Split`, 1 for
//! `PerShard`). So a shard's rate `per_s / d` tokens per second is represented exactly, even when
//! it is fractional (`per_s = 1` over 4 shards is one token every 4 s, not "off"), and refill is
//! `elapsed_ns * per_s` with no rounding at all: no drift however the calls are spaced. The level
//! is a `u128`; `u64::MAX * u64::MAX < 2^128`, so the product never overflows, and the sum and the
//! capacity saturate. A time jump of years (or `now_ns` up to `u64::MAX`) just fills the bucket.
//! A `now_ns` earlier than the bucket's last one counts as no time passed.
//! The refusal's retry-after is `ceil(missing_units / per_s)` ns: the exact time until one whole
//! token is there, raised to at least 1 ms (see `retry_after_secs` for the header value).
//!
//! # Shards: how per-shard buckets approximate one global limit
//!
//! relay runs N shards (threads) that share nothing; each keeps its own buckets, and the kernel
//! (SO_REUSEPORT) spreads a client's connections over the shards. No shard sees the client's
//! total, so a shard can only enforce a share of the limit. The integrator picks one of:
//!
//! - `Division::Split` (strict): each shard enforces `per_s / N` with burst `max(1, burst / N)`.
//!   The sum over all shards never exceeds the configured limit (except the `max(1, ..)` floor),
//!   but a client whose traffic lands on one shard (one keep-alive connection) is held to 1/N
//!   of it. Example, `per_s = 100, burst = 200, N = 4`: every shard allows 25/s with burst 50; a
//!   single-connection client is refused above 25/s although it is configured for 100/s; a
//!   client with many connections spread evenly gets about 100/s in total, as configured.
//! - `Division::PerShard` (lenient): each shard enforces the full `per_s` and `burst`. A client is
//!   never refused while it stays under its configured rate, but one spreading connections over
//!   all shards can get up to N times: with the numbers above, up to 400/s with bursts of 800.
//!
//! Recommendation: `PerShard` for `[rate_limit]` as documented ("per client key"): it never
//! returns a false 429 to a well-behaved client, which is the part clients can observe, and the
//! overshoot is bounded (N x, 2 x on a 2-core box) and needs many connections. Choose `Split` when
//! the limit is a hard budget protecting an upstream and under-admitting is the lesser harm.
//! `shards == 0` is treated as 1.
//!
//! # Memory bound and eviction
//!
//! At most `max_keys` buckets (`max_keys == 0` is treated as 1). Only a new key can need room;
//! when the map is at the cap, one sweep runs before the insert:
//! 1. every bucket that is full at `now` is dropped. That loses nothing: a full bucket and a
//!    missing one behave identically (a new bucket starts full), so idle clients go first;
//! 2. if that freed fewer than `max(1, max_keys / 8)` slots, the least recently used of the rest
//!    (by the time of their last `check`, refusals included) are dropped until it has. Those
//!    clients get a fresh burst when they return, which is the price of the bound; an active
//!    client, even one being refused, is recently used and stays.
//!
//! A sweep is O(max_keys) (a `retain`, plus a `select_nth_unstable` over a scratch vector of at
//! most `max_keys` timestamps that is kept for reuse) and leaves at least `max_keys / 8` free
//! slots, so it runs at most once per `max_keys / 8` new keys: O(1) amortised per `check`. Keys
//! already present never trigger a sweep, and `check` on a known key does not allocate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Nanoseconds per second.
const NS_PER_S: u128 = 1_000_000_000;
/// Shortest retry-after ever returned.
const MIN_RETRY: Duration = Duration::from_millis(1);

/// One configured limit, as in `[rate_limit]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    /// Tokens per second. 0 means the limit is off.
    pub per_s: u64,
    /// Bucket size in tokens. 0 means the same as `per_s`.
    pub burst: u64,
}

/// How one limit is shared by the shards (see the module header for the trade-off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Division {
    /// Strict: each shard enforces `per_s / N`, burst `max(1, burst / N)`.
    Split,
    /// Lenient: each shard enforces the full limit; a client may get up to N times it.
    PerShard,
}

/// One client's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens held, in units (one token is `unit` units). At most `capacity`.
    level: u128,
    /// The `now_ns` of the latest `check` (never moves backwards); the LRU key.
    last_ns: u64,
}

/// One shard's token buckets for one limit.
#[derive(Debug)]
pub struct RateLimiter {
    /// Units refilled per nanosecond (the configured `per_s`); 0 = off.
    per_s: u64,
    /// Units in one token: `1e9 * divisor`.
    unit: u128,
    /// Units in a full bucket: `burst_tokens * unit`, saturating.
    capacity: u128,
    /// Most buckets kept (at least 1).
    max_keys: usize,
    buckets: HashMap<Box<str>, Bucket, ahash::RandomState>,
    /// Reused by the LRU sweep; never longer than `max_keys`.
    scratch: Vec<u64>,
    refused: u64,
}

impl RateLimiter {
    /// A limiter for one shard of `shards` (0 is taken as 1), keeping at most `max_keys` buckets
    /// (0 is taken as 1). With `limit.per_s == 0` it is off and admits everything.
    pub fn new(limit: Limit, shards: usize, division: Division, max_keys: usize) -> Self {
        let shards = shards.max(1) as u128;
        let divisor = match division {
            Division::Split => shards,
            Division::PerShard => 1,
        };
        let burst = if limit.burst == 0 {
            limit.per_s
        } else {
            limit.burst
        };
        let burst = match division {
            Division::Split => (u128::from(burst) / shards).max(1),
            Division::PerShard => u128::from(burst).max(1),
        };
        let unit = NS_PER_S.saturating_mul(divisor);
        RateLimiter {
            per_s: limit.per_s,
            unit,
            capacity: burst.saturating_mul(unit),
            max_keys: max_keys.max(1),
            buckets: HashMap::default(),
            scratch: Vec::new(),
            refused: 0,
        }
    }

    /// Whether the limit is off (`per_s == 0`): `check` then always admits and keeps nothing.
    pub fn is_off(&self) -> bool {
        self.per_s == 0
    }

    /// Takes one token for `key` at `now_ns` (monotonic nanoseconds supplied by the caller).
    /// Ok(()) or Err(retry_after) = time until one token is available (>= 1 ms, rounded up to
    /// whole seconds by the caller for Retry-After, see [`retry_after_secs`]).
    pub fn check(&mut self, key: &str, now_ns: u64) -> Result<(), Duration> {
        if self.is_off() {
            return Ok(());
        }
        let (per_s, unit, capacity) = (self.per_s, self.unit, self.capacity);
        let bucket = match self.buckets.get_mut(key) {
            Some(b) => {
                b.level = refilled(b, now_ns, per_s, capacity);
                b.last_ns = b.last_ns.max(now_ns);
                b
            }
            None => {
                if self.buckets.len() >= self.max_keys {
                    self.make_room(now_ns);
                }
                self.buckets.entry(Box::from(key)).or_insert(Bucket {
                    level: capacity,
                    last_ns: now_ns,
                })
            }
        };
        if bucket.level >= unit {
            bucket.level -= unit;
            Ok(())
        } else {
            self.refused = self.refused.saturating_add(1);
            let missing = unit - bucket.level;
            let ns = missing.div_ceil(u128::from(per_s));
            let ns = u64::try_from(ns).unwrap_or(u64::MAX);
            Err(Duration::from_nanos(ns).max(MIN_RETRY))
        }
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Refusals so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Frees at least `max(1, max_keys / 8)` slots: full buckets first, then the least recently
    /// used. Called only when the map is at the cap and a new key arrives.
    fn make_room(&mut self, now_ns: u64) {
        let (per_s, capacity) = (self.per_s, self.capacity);
        self.buckets
            .retain(|_, b| refilled(b, now_ns, per_s, capacity) < capacity);

        let free_target = (self.max_keys / 8).max(1);
        let keep = self.max_keys - free_target;
        let len = self.buckets.len();
        if len <= keep {
            return;
        }
        let evict = len - keep;
        self.scratch.clear();
        self.scratch
            .extend(self.buckets.values().map(|b| b.last_ns));
        let (_, &mut threshold, _) = self.scratch.select_nth_unstable(evict - 1);
        let older = self.scratch.iter().filter(|&&t| t < threshold).count();
        // Everything older than the threshold goes, plus just enough of the ties at it.
        let mut ties_to_drop = evict - older;
        self.buckets.retain(|_, b| {
            if b.last_ns < threshold {
                false
            } else if b.last_ns == threshold && ties_to_drop > 0 {
                ties_to_drop -= 1;
                false
            } else {
                true
            }
        });
        self.scratch.clear();
    }
}

/// `b`'s level at `now_ns`: exact, capped at `capacity`, never lower than it was.
fn refilled(b: &Bucket, now_ns: u64, per_s: u64, capacity: u128) -> u128 {
    let elapsed = u128::from(now_ns.saturating_sub(b.last_ns));
    // Cannot overflow: both factors are below 2^64.
    let added = elapsed * u128::from(per_s);
    b.level.saturating_add(added).min(capacity)
}

/// The `Retry-After` header value for a refusal: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(retry_after: Duration) -> u64 {
    let secs = retry_after.as_secs();
    let secs = if retry_after.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    };
    secs.max(1)
}

/// An address block from `rate_limit.trusted_proxies`: `10.0.0.0/8`, `::1/128`, or a bare
/// address (a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// Parses `addr` or `addr/len`; the message says what is wrong.
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len_text {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{text:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(IpNet { addr, prefix_len })
    }

    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 peer counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix_len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: u128, b: u128, len: u8) -> bool {
    if len == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(len.min(128)));
    a & mask == b & mask
}

/// Who the client is when a trusted proxy (the gateway) stands in front of relay.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// From the config's entries; entries that do not parse are skipped (config validation
    /// already refused them).
    pub fn new(entries: &[String]) -> TrustedProxies {
        TrustedProxies {
            nets: entries
                .iter()
                .filter_map(|e| IpNet::parse(e).ok())
                .collect(),
        }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client address: the peer itself unless the peer is trusted; then the rightmost
    /// `X-Forwarded-For` address that is not trusted (the leftmost when all are). Entries that
    /// are not addresses end the walk, so a client cannot hide behind garbage it wrote itself.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let peer = canonical(peer);
        let Some(list) = forwarded_for else {
            return peer;
        };
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for entry in list.rsplit(',') {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                break;
            };
            client = canonical(ip);
            if !self.trusts(client) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn limiter(per_s: u64, burst: u64) -> RateLimiter {
        RateLimiter::new(Limit { per_s, burst }, 1, Division::PerShard, 1024)
    }

    /// Admissions for `key` at `now` until the first refusal (capped at `max`).
    fn drain(rl: &mut RateLimiter, key: &str, now: u64, max: usize) -> usize {
        (0..max).take_while(|_| rl.check(key, now).is_ok()).count()
    }

    #[test]
    fn off_admits_everything_and_keeps_nothing() {
        let mut rl = limiter(0, 5);
        assert!(rl.is_off());
        for i in 0..10_000u64 {
            assert_eq!(rl.check(&format!("k{}", i % 7), 0), Ok(()));
        }
        assert!(rl.is_empty());
        assert_eq!(rl.refused(), 0);
        assert!(!limiter(1, 0).is_off());
    }

    #[test]
    fn burst_then_refusal() {
        let mut rl = limiter(10, 5);
        assert_eq!(drain(&mut rl, "a", 0, 100), 5);
        assert!(rl.check("a", 0).is_err());
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn burst_zero_means_per_s() {
        let mut rl = limiter(7, 0);
        assert_eq!(drain(&mut rl, "a", 0, 100), 7);
    }

    #[test]
    fn refill_after_one_over_rate_admits_exactly_one() {
        let mut rl = limiter(4, 2); // one token per 250 ms
        assert_eq!(drain(&mut rl, "a", 0, 100), 2);
        assert!(rl.check("a", 250 * MS - 1).is_err());
        assert_eq!(rl.check("a", 250 * MS), Ok(()));
        assert!(rl.check("a", 250 * MS).is_err());
        // Two intervals later: exactly two more.
        assert_eq!(drain(&mut rl, "a", 750 * MS, 100), 2);
    }

    #[test]
    fn retry_after_is_exact_and_at_least_one_ms() {
        let mut rl = limiter(3, 1);
        assert_eq!(rl.check("a", 0), Ok(()));
        // 1/3 s, rounded up to the nanosecond.
        assert_eq!(rl.check("a", 0), Err(Duration::from_nanos(333_333_334)));
        assert_eq!(
            rl.check("a", 100 * MS),
            Err(Duration::from_nanos(233_333_334))
        );
        // 1 ns short of a token: the answer is raised to 1 ms.
        assert_eq!(rl.check("a", 333_333_333), Err(Duration::from_millis(1)));
        assert_eq!(rl.check("a", 333_333_334), Ok(()));
        // Waiting exactly retry_after admits.
        let retry = rl.check("a", 400 * MS).unwrap_err();
        // The 2 units over a token at 333_333_334 ns were capped away (burst 1), so the level is
        // 66_666_666 * 3 units: (1e9 - 199_999_998) / 3 = 266_666_667.3, rounded up.
        assert_eq!(retry, Duration::from_nanos(266_666_668));
        let at = 400 * MS + retry.as_nanos() as u64;
        assert!(rl.check("a", at - 1).is_err());
        assert_eq!(rl.check("a", at), Ok(()));
    }

    #[test]
    fn retry_after_secs_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_nanos(2 * S + 1)), 3);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
        let mut rl = limiter(1, 1);
        rl.check("a", 0).unwrap();
        assert_eq!(retry_after_secs(rl.check("a", 10 * MS).unwrap_err()), 1);
    }

    #[test]
    fn no_drift_over_many_small_steps() {
        // Burst 2 and one check a millisecond: after the first two admissions the level stays
        // below one token, so the cap never trims it and every unit refilled is used.
        let mut rl = limiter(3, 2);
        let mut admitted = 0;
        for ms in 0..=10_000u64 {
            if rl.check("a", ms * MS).is_ok() {
                admitted += 1;
            }
        }
        // The burst of 2, then exactly 3 per second for 10 s.
        assert_eq!(admitted, 2 + 30);
        assert_eq!(rl.refused(), 10_001 - 32);
    }

    #[test]
    fn separate_keys_are_independent() {
        let mut rl = limiter(1, 2);
        assert_eq!(drain(&mut rl, "alice", 0, 10), 2);
        assert!(rl.check("alice", 0).is_err());
        assert_eq!(drain(&mut rl, "bob", 0, 10), 2);
        assert_eq!(drain(&mut rl, "10.0.0.1", 0, 10), 2);
        assert!(rl.check("alice", 0).is_err());
        assert_eq!(rl.len(), 3);
    }

    #[test]
    fn split_divides_rate_and_burst_by_shards() {
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 100,
                burst: 10,
            },
            4,
            Division::Split,
            64,
        );
        // 25/s per shard, burst 10 / 4 = 2.
        assert_eq!(drain(&mut rl, "a", 0, 100), 2);
        assert_eq!(rl.check("a", 0), Err(Duration::from_millis(40)));
        assert_eq!(rl.check("a", 40 * MS), Ok(()));
        // burst 0 means per_s, then split: 100 / 4 = 25.
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 100,
                burst: 0,
            },
            4,
            Division::Split,
            64,
        );
        assert_eq!(drain(&mut rl, "a", 0, 1000), 25);
    }

    #[test]
    fn split_burst_is_at_least_one_and_rate_may_be_fractional() {
        let mut rl = RateLimiter::new(Limit { per_s: 1, burst: 3 }, 4, Division::Split, 64);
        assert_eq!(drain(&mut rl, "a", 0, 100), 1);
        // 1/s over 4 shards: one token every 4 s, not "off".
        assert_eq!(rl.check("a", 0), Err(Duration::from_secs(4)));
        assert!(rl.check("a", 4 * S - 1).is_err());
        assert_eq!(rl.check("a", 4 * S), Ok(()));
    }

    #[test]
    fn per_shard_does_not_divide() {
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 100,
                burst: 10,
            },
            4,
            Division::PerShard,
            64,
        );
        assert_eq!(drain(&mut rl, "a", 0, 100), 10);
        assert_eq!(rl.check("a", 0), Err(Duration::from_millis(10)));
        assert_eq!(rl.check("a", 10 * MS), Ok(()));
    }

    #[test]
    fn zero_shards_and_zero_max_keys_are_taken_as_one() {
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 10,
                burst: 4,
            },
            0,
            Division::Split,
            0,
        );
        assert_eq!(drain(&mut rl, "a", 0, 100), 4);
        assert_eq!(drain(&mut rl, "b", 0, 100), 4);
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn memory_bound_holds_for_ten_times_max_keys() {
        let max = 100;
        let mut rl = RateLimiter::new(Limit { per_s: 1, burst: 5 }, 1, Division::PerShard, max);
        for i in 0..10 * max as u64 {
            // Every key takes a token, so none is full: the LRU path does the work.
            assert_eq!(rl.check(&format!("k{i}"), i), Ok(()));
            assert!(rl.len() <= max, "len {} at {i}", rl.len());
        }
        assert!(rl.len() > max / 2);
    }

    #[test]
    fn active_limited_key_is_not_evicted_for_idle_ones() {
        let max = 64;
        let mut rl = RateLimiter::new(Limit { per_s: 1, burst: 2 }, 1, Division::PerShard, max);
        assert_eq!(drain(&mut rl, "hot", 0, 10), 2);
        // 640 new keys within 640 us: "hot" cannot refill, and would be admitted again only if
        // its bucket were dropped and recreated full.
        for i in 1..=10 * max as u64 {
            let now = i * 1000;
            assert_eq!(rl.check(&format!("idle{i}"), now), Ok(()));
            assert!(rl.check("hot", now).is_err(), "hot evicted at {i}");
            assert!(rl.len() <= max);
        }
        assert!(rl.buckets.contains_key("hot"));
        // The drain's refusal plus one per round.
        assert_eq!(rl.refused(), 1 + 10 * max as u64);
    }

    #[test]
    fn full_buckets_are_evicted_before_older_partial_ones() {
        let max = 8;
        let mut rl = RateLimiter::new(Limit { per_s: 1, burst: 4 }, 1, Division::PerShard, max);
        // Old keys at t=0, drained: full again only at t=4 s.
        for i in 0..4 {
            assert_eq!(drain(&mut rl, &format!("old{i}"), 0, 10), 4);
        }
        // Newer keys at t=1 s, one token each: full again at t=2 s.
        for i in 0..4 {
            assert_eq!(rl.check(&format!("new{i}"), S), Ok(()));
        }
        assert_eq!(rl.len(), max);
        // At t=3 s the new ones are full (idle) although more recently used than the old ones.
        assert_eq!(rl.check("late", 3 * S), Ok(()));
        assert_eq!(rl.len(), 5);
        for i in 0..4 {
            assert!(rl.buckets.contains_key(format!("old{i}").as_str()));
            assert!(!rl.buckets.contains_key(format!("new{i}").as_str()));
            // Old state kept: 3 tokens refilled, not a fresh 4.
            assert_eq!(drain(&mut rl, &format!("old{i}"), 3 * S, 10), 3);
        }
    }

    #[test]
    fn lru_eviction_removes_the_oldest_first() {
        let max = 16; // frees max / 8 = 2 per sweep
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 1,
                burst: 10,
            },
            1,
            Division::PerShard,
            max,
        );
        for i in 0..max as u64 {
            rl.check(&format!("k{i}"), i).unwrap();
        }
        // Touch k0 so k1 and k2 are now the oldest.
        rl.check("k0", 100).unwrap();
        rl.check("new", 101).unwrap();
        assert_eq!(rl.len(), max - 1);
        assert!(rl.buckets.contains_key("k0"));
        assert!(!rl.buckets.contains_key("k1"));
        assert!(!rl.buckets.contains_key("k2"));
        assert!(rl.buckets.contains_key("k3"));
        // Ties at the threshold: only as many as needed go.
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 1,
                burst: 10,
            },
            1,
            Division::PerShard,
            max,
        );
        for i in 0..max {
            rl.check(&format!("k{i}"), 7).unwrap();
        }
        rl.check("new", 7).unwrap();
        assert_eq!(rl.len(), max - 1);
        assert!(rl.buckets.contains_key("new"));
    }

    #[test]
    fn large_time_jumps_do_not_overflow() {
        let mut rl = RateLimiter::new(
            Limit {
                per_s: 1_000_000_000,
                burst: u64::MAX,
            },
            usize::MAX,
            Division::PerShard,
            4,
        );
        assert_eq!(rl.check("a", 0), Ok(()));
        assert_eq!(rl.check("a", u64::MAX), Ok(()));
        assert_eq!(rl.check("a", u64::MAX), Ok(()));
        // Time going backwards counts as no time passed.
        assert_eq!(rl.check("a", 5), Ok(()));

        let mut rl = limiter(1_000_000_000, 2);
        assert_eq!(drain(&mut rl, "a", 0, 10), 2);
        assert_eq!(rl.check("a", 0), Err(Duration::from_millis(1)));
        // Years idle: the bucket is simply full again, not wrapped.
        let years = 50 * 365 * 24 * 3600 * S;
        assert_eq!(drain(&mut rl, "a", years, 10), 2);
        assert_eq!(drain(&mut rl, "a", u64::MAX, 10), 2);
        assert!(rl.check("a", 3).is_err());

        // Split over a huge shard count: capacity and unit saturate, nothing panics.
        let mut rl = RateLimiter::new(
            Limit {
                per_s: u64::MAX,
                burst: u64::MAX,
            },
            usize::MAX,
            Division::Split,
            4,
        );
        let _ = rl.check("a", 0);
        let _ = rl.check("a", u64::MAX);
        let mut rl = RateLimiter::new(Limit { per_s: 1, burst: 1 }, usize::MAX, Division::Split, 4);
        assert_eq!(rl.check("a", 0), Ok(()));
        let retry = rl.check("a", 0).unwrap_err();
        assert_eq!(retry, Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn refused_counter_counts_refusals_only() {
        let mut rl = limiter(1, 1);
        assert_eq!(rl.refused(), 0);
        rl.check("a", 0).unwrap();
        assert_eq!(rl.refused(), 0);
        for _ in 0..5 {
            assert!(rl.check("a", 0).is_err());
        }
        rl.check("b", 0).unwrap();
        assert!(rl.check("b", 0).is_err());
        assert_eq!(rl.refused(), 6);
        rl.check("a", S).unwrap();
        assert_eq!(rl.refused(), 6);
    }

    #[test]
    fn ip_nets_parse_and_match() {
        let net = IpNet::parse("10.0.0.0/8").expect("cidr");
        assert!(net.contains("10.1.2.3".parse().expect("ip")));
        assert!(!net.contains("11.0.0.1".parse().expect("ip")));
        assert!(net.contains("::ffff:10.9.9.9".parse().expect("mapped")));
        let one = IpNet::parse("127.0.0.1").expect("bare");
        assert!(one.contains("127.0.0.1".parse().expect("ip")));
        assert!(!one.contains("127.0.0.2".parse().expect("ip")));
        let v6 = IpNet::parse("fd00::/8").expect("v6");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
        assert!(IpNet::parse("0.0.0.0/0")
            .expect("all")
            .contains("8.8.8.8".parse().expect("ip")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "gateway",
            "10.0.0.0/x",
            "1.2.3.4/",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let none = TrustedProxies::new(&[]);
        assert_eq!(
            none.client_ip(ip("10.0.0.5"), Some("1.2.3.4")),
            ip("10.0.0.5")
        );
        let gw = TrustedProxies::new(&["10.0.0.0/8".to_string()]);
        assert_eq!(gw.client_ip(ip("10.0.0.5"), Some("1.2.3.4")), ip("1.2.3.4"));
        // A client-written entry left of the real one is not believed.
        assert_eq!(
            gw.client_ip(ip("10.0.0.5"), Some("6.6.6.6, 1.2.3.4, 10.0.0.9")),
            ip("1.2.3.4")
        );
        // An untrusted peer's header is ignored.
        assert_eq!(gw.client_ip(ip("9.9.9.9"), Some("1.2.3.4")), ip("9.9.9.9"));
        // No header: the peer.
        assert_eq!(gw.client_ip(ip("10.0.0.5"), None), ip("10.0.0.5"));
        // Garbage ends the walk at the last good address.
        assert_eq!(
            gw.client_ip(ip("10.0.0.5"), Some("x, 10.0.0.7")),
            ip("10.0.0.7")
        );
        // All trusted: the leftmost.
        assert_eq!(
            gw.client_ip(ip("10.0.0.5"), Some("10.0.0.1, 10.0.0.2")),
            ip("10.0.0.1")
        );
    }
}
