//! Relay configuration: the typed [`Config`] and how it is loaded.
//!
//! What this module owns:
//! - the shape of every setting, its built-in default and the range it must be in;
//! - layering, lowest to highest precedence:
//!   built-in defaults < TOML file (`--config FILE` or `RELAY_CONFIG`) < `RELAY_*` environment
//!   variables < command-line flags;
//! - error messages that name where a bad value came from: `file:line: key `a.b``, the
//!   environment variable, or the flag;
//! - the command line (`relay --help`, `--version`, `--print-config`).
//!
//! What it must never do: open sockets, spawn threads, log (tracing is not set up yet when this
//! runs), exit the process, or read anything but the one config file. The process environment is
//! read only through the lookup function the caller passes to [`load`] (tests pass a map), or by
//! [`load_from_process`], which is `main`'s convenience wrapper.
//!
//! Environment scheme: `RELAY_<KEY>` for top-level keys (`RELAY_LISTEN`, `RELAY_SHARDS`,
//! `RELAY_DRIVER`, `RELAY_PIN_SHARDS`, `RELAY_LOG`), `RELAY_<SECTION>_<KEY>` for every scalar
//! of every table section (`RELAY_HISTORY_SIZE`, `RELAY_LIMITS_MAX_CONNECTIONS`,
//! `RELAY_AUTH_API_KEYS=k1,k2` ...), and `RELAY_CONFIG` for the file path. `[[subsystems]]`
//! and `[[channels]]` are file-only.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// The relay's effective configuration. `Config::default()` is the built-in layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP/WebSocket/SSE listener binds. Default `0.0.0.0:8004`: reachable from
    /// other hosts and containers out of the box; port 0 is allowed (tests bind ephemeral ports).
    pub listen: SocketAddr,
    /// Number of shards (one thread and one runtime each). Default 0 = one per available core,
    /// which is what thread-per-core wants; see [`Config::shard_count`].
    pub shards: usize,
    /// I/O driver. Default `auto`: io_uring where the kernel allows it, else epoll.
    pub driver: Driver,
    /// Pin shard `i` to the `i`-th CPU the process may run on. Default true: on a node whose
    /// cores are relay's, each shard keeps its core and its caches. False lets the kernel
    /// place and move the shard threads, for hosts where other busy threads share relay's CPUs
    /// (a load generator on the same cores, containers without exclusive cores): measured
    /// with 2 shards and the load generator on two shared cores, `channels` median 83-85 µs
    /// against 128-131 µs pinned (docs/performance.md, the hold round).
    pub pin_shards: bool,
    /// tracing filter directive (`EnvFilter` syntax). Default `info`: lifecycle events without
    /// per-message noise.
    pub log: String,
    /// Publisher/subscriber authentication. Default: none configured.
    pub auth: AuthConfig,
    /// Per-channel event history used for resume/replay.
    pub history: HistoryConfig,
    /// Resource limits that keep one client from starving the rest.
    pub limits: LimitsConfig,
    /// The cross-shard message bus.
    pub bus: BusConfig,
    /// Server-sent events.
    pub sse: SseConfig,
    /// WebSocket connections.
    pub websocket: WebSocketConfig,
    /// How events are written to subscriber connections under load.
    pub delivery: DeliveryConfig,
    /// Event delivery to subsystems' `subscriptions`.
    pub webhooks: WebhooksConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Active health checks of subsystem instances.
    pub health: HealthConfig,
    /// Per-instance circuit breaker.
    pub circuit: CircuitConfig,
    /// Reverse proxying to subsystems.
    pub proxy: ProxyConfig,
    /// Token-bucket rate limits.
    pub rate_limit: RateLimitConfig,
    /// Backend subsystem instances (`[[subsystems]]`). Default empty: a pure relay.
    pub subsystems: Vec<SubsystemConfig>,
    /// Per-channel overrides (`[[channels]]`), first matching pattern wins. Default empty.
    pub channels: Vec<ChannelRule>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8004)),
            shards: 0,
            driver: Driver::Auto,
            pin_shards: true,
            log: "info".to_string(),
            auth: AuthConfig::default(),
            history: HistoryConfig::default(),
            limits: LimitsConfig::default(),
            bus: BusConfig::default(),
            sse: SseConfig::default(),
            websocket: WebSocketConfig::default(),
            delivery: DeliveryConfig::default(),
            webhooks: WebhooksConfig::default(),
            shutdown: ShutdownConfig::default(),
            health: HealthConfig::default(),
            circuit: CircuitConfig::default(),
            proxy: ProxyConfig::default(),
            rate_limit: RateLimitConfig::default(),
            subsystems: Vec::new(),
            channels: Vec::new(),
        }
    }
}

/// Which I/O driver each shard's runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// io_uring if the kernel supports it, otherwise epoll
    #[default]
    Auto,
    /// io_uring only; fail to start if it is unavailable
    #[value(name = "io_uring")]
    IoUring,
    /// epoll only
    Epoll,
}

impl Driver {
    /// The spelling used in TOML, the environment and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Auto => "auto",
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// What to do when a subscriber's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Close the connection; the client resumes from history and nothing is silently lost.
    #[default]
    Close,
    /// Drop the oldest queued messages and keep the connection.
    DropOldest,
}

/// How requests are spread over the instances of one subsystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The instance with the fewest requests in flight.
    LeastOutstanding,
    /// In proportion to each instance's `weight`.
    Weighted,
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for JWT bearer tokens. Default unset: JWT auth disabled, because there is no
    /// safe secret to ship. Must not be empty when set (an empty key signs anything).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// Static API keys. Default unset: API-key auth disabled. Must not contain empty strings,
    /// which would let an empty header authenticate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<Vec<String>>,
}

/// `[history]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Events kept per channel, 1..=1_000_000. Default 1000: enough to bridge a reconnect
    /// without letting a busy channel hold unbounded memory.
    pub size: usize,
    /// Seconds an event stays in history, >= 1. Default 3600: an hour of resumability.
    pub ttl_s: u64,
    /// Events the whole node retains, all channels together, >= 1 (each shard keeps its
    /// share). Default 5000000: about 3.7 GB at the ~750 B a retained event costs with its
    /// share of its channel. Past it the events nearest their expiry are dropped first
    /// (`relay_history_budget_drops_total`): per-user channels must not exhaust memory.
    pub max_events: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 1000,
            ttl_s: 3600,
            max_events: 5_000_000,
        }
    }
}

/// `[limits]`; every limit must be at least 1 (0 would refuse all work).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections across all shards. Default 100000: well under typical fd limits.
    pub max_connections: usize,
    /// Open connections from one IP. Default 10000: bounds one host without breaking NAT.
    pub max_connections_per_ip: usize,
    /// Largest WebSocket frame payload accepted, >= 125 (the control-frame maximum, which
    /// RFC 6455 requires us to accept). Default 65536.
    pub max_frame_bytes: usize,
    /// Largest HTTP request body (publish, proxy). Default 1048576 (1 MiB).
    pub max_body_bytes: usize,
    /// Largest HTTP request head. Default 8192: what common proxies allow.
    pub max_header_bytes: usize,
    /// Most header lines in one request. Default 64: the parser's fixed array size.
    pub max_headers: usize,
    /// Channel subscriptions one connection may hold. Default 1024.
    pub max_subscriptions_per_connection: usize,
    /// Publishes one connection (WebSocket ops, or pipelined HTTP requests) may have waiting
    /// for the shards that own their channels, 1..=65536. They are all on their way at once,
    /// and their replies still leave in request order; past this many the connection reads
    /// nothing more until the oldest is answered. Default 64: eight times the generator's
    /// default pipeline, a few KiB per connection at most.
    pub max_publishes_in_flight: usize,
    /// Channels one SSE stream may name. Default 64: they travel in the URL.
    pub max_channels_per_stream: usize,
    /// Messages queued towards one client before it counts as slow. Default 4096.
    pub outbound_queue_messages: usize,
    /// Bytes queued towards one client before it counts as slow. Default 4194304 (4 MiB).
    pub outbound_queue_bytes: usize,
    /// Seconds a connection may be silent before it is closed. Default 60.
    pub idle_timeout_s: u64,
    /// Seconds to receive a complete HTTP request. Default 10: slowloris protection.
    pub request_timeout_s: u64,
    /// What to do with a client whose outbound queue is full. Default `close`.
    pub slow_consumer: SlowConsumerPolicy,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            max_frame_bytes: 65_536,
            max_body_bytes: 1_048_576,
            max_header_bytes: 8192,
            max_headers: 64,
            max_subscriptions_per_connection: 1024,
            max_publishes_in_flight: 64,
            max_channels_per_stream: 64,
            outbound_queue_messages: 4096,
            outbound_queue_bytes: 4_194_304,
            idle_timeout_s: 60,
            request_timeout_s: 10,
            slow_consumer: SlowConsumerPolicy::Close,
        }
    }
}

/// `[bus]`: one bounded ring per ordered pair of shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// Batches per ring, >= 2 (one slot being filled while another drains). Default 1024.
    pub ring_capacity: usize,
    /// Messages per ring batch, >= 1. Default 256: amortises wake-ups under load.
    pub max_batch: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            ring_capacity: 1024,
            max_batch: 256,
        }
    }
}

/// `[sse]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// Seconds between keep-alive comments, >= 1. Default 15: under common proxy idle timeouts.
    pub keepalive_s: u64,
    /// `retry:` hint sent to clients, milliseconds, >= 1. Default 2000.
    pub retry_ms: u64,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            keepalive_s: 15,
            retry_ms: 2000,
        }
    }
}

/// `[websocket]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Milliseconds between server pings on every connection, busy or quiet, >= 100; announced
    /// to clients in `welcome.heartbeat_ms`. Default 25000: under common proxy idle timeouts
    /// (30-60 s), and well under `limits.idle_timeout_s`, which a client that only listens
    /// meets by answering the pings.
    pub heartbeat_ms: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            heartbeat_ms: 25_000,
        }
    }
}

/// `[delivery]`: write pacing (see `crate::pacing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The longest a subscriber connection that has just written waits before its next write
    /// while the shard is busy, microseconds, <= 1000000; 0 = never wait. Default 20000: each
    /// write then carries every event of the last milliseconds, which is what keeps a shard
    /// writing to thousands of busy subscribers out of its syscall limit. The hold only grows
    /// this far on a shard that stays saturated, where it is what lets fan-out keep up
    /// (measured on the build machine: 6.2 M deliveries/s at p99 <= 100 ms with 20 ms,
    /// against 3.5-5.6 M/s with 8 ms; see docs/performance.md, the hold round).
    pub max_hold_us: u64,
    /// Holds grow while the shard's thread has work (running, or ready and waiting for a CPU)
    /// more than this share of the time, and shrink below 0.85 of it, 10..=100. Default 90: pacing is for a shard near saturation; one at
    /// three quarters of a core still writes every event at once.
    pub busy_percent: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_hold_us: 20_000,
            busy_percent: 90,
        }
    }
}

/// `[webhooks]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Events waiting per subscription on each shard, >= 1; past it new events are dropped and
    /// counted. Default 10000: minutes of a busy subscription during an outage.
    pub queue_size: usize,
    /// Events per POST, >= 1. Default 100.
    pub batch_max: usize,
    /// Delivery attempts per batch before it is dropped (counted, logged), >= 1. Default 10.
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles per attempt with jitter, >= 1. Default 200.
    pub backoff_initial_ms: u64,
    /// Retry delay cap in milliseconds. Default 30000.
    pub backoff_max_ms: u64,
    /// Per-POST timeout in milliseconds, >= 1. Default 5000.
    pub timeout_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            queue_size: 10_000,
            batch_max: 100,
            max_attempts: 10,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            timeout_ms: 5_000,
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds to drain connections after SIGTERM/SIGINT before exiting anyway, >= 1.
    /// Default 10: inside the usual orchestrator grace period (Kubernetes: 30 s).
    pub deadline_s: u64,
    /// WebSocket clients get their 1001 close spread over this many milliseconds, so a fleet
    /// does not reconnect to the next node all at once. Must be below `deadline_s`. Default 2000.
    pub close_spread_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline_s: 10,
            close_spread_ms: 2000,
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Milliseconds between probes of each instance, >= 1. Default 5000.
    pub interval_ms: u64,
    /// Milliseconds a probe may take, 1..=interval_ms (probes must not overlap). Default 1000.
    pub timeout_ms: u64,
    /// Consecutive successes to mark an instance healthy, >= 1. Default 2: no flapping.
    pub healthy_threshold: u32,
    /// Consecutive failures to mark an instance unhealthy, >= 1. Default 3.
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 5000,
            timeout_ms: 1000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// `[circuit]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive proxy failures that open the circuit. Default 5. 0 turns this rule off
    /// (allowed only with `failure_rate_percent` on).
    pub consecutive_failures: u32,
    /// Milliseconds the circuit stays open before probing, >= 1. Default 10000.
    pub cooldown_ms: u64,
    /// Trial requests let through while half-open, >= 1. Default 1.
    pub half_open_probes: u32,
    /// Upper bound of the cooldown as it doubles on repeated trips, >= `cooldown_ms`.
    /// Default 300000 (five minutes).
    pub cooldown_max_ms: u64,
    /// Failure share, in percent (0..=100), within `rate_window_ms` that opens the circuit.
    /// Default 0 = off (only `consecutive_failures` trips it).
    pub failure_rate_percent: u32,
    /// Length of the sliding failure-rate window, >= 1000 (one-second buckets). Default 10000.
    pub rate_window_ms: u64,
    /// Completed requests the window must hold before the rate may trip, >= 1, so that one
    /// failure out of two does not open a barely used instance. Default 20.
    pub rate_min_requests: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            consecutive_failures: 5,
            cooldown_ms: 10_000,
            half_open_probes: 1,
            cooldown_max_ms: 300_000,
            failure_rate_percent: 0,
            rate_window_ms: 10_000,
            rate_min_requests: 20,
        }
    }
}

/// `[proxy]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Milliseconds for a whole proxied request, >= 1. Default 30000.
    pub timeout_ms: u64,
    /// Idle keep-alive connections each shard keeps per instance, shared by proxied requests,
    /// health checks and webhooks; past it a connection that could be reused is closed and
    /// counted (`relay_upstream_pool_overflow_total`). 0 turns pooling off. Default 1024: a
    /// pool never holds more than the concurrency reached, so the bound only matters after a
    /// burst, and a smaller one makes every request past it open a connection (and leave a
    /// TIME-WAIT behind).
    pub pool_max_idle: usize,
    /// An idle pooled connection older than this is closed instead of reused, >= 1. Keep it
    /// below the instances' own keep-alive timeout (Node.js: 5 s; nginx: 75 s) so that they
    /// rarely close a connection relay is about to use. Default 30000.
    pub pool_idle_timeout_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            timeout_ms: 30_000,
            pool_max_idle: 1024,
            pool_idle_timeout_ms: 30_000,
        }
    }
}

/// `[rate_limit]`: token buckets per client IP.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Publishes per second. Default 0 = unlimited (opt-in, since the right rate is
    /// deployment-specific).
    pub publish_per_s: u64,
    /// Publish bucket size. Default 0 = same as `publish_per_s`.
    pub publish_burst: u64,
    /// Proxied requests per second. Default 0 = unlimited.
    pub proxy_per_s: u64,
    /// Proxy bucket size. Default 0 = same as `proxy_per_s`.
    pub proxy_burst: u64,
    /// Peers (addresses or CIDR blocks, e.g. the gateway) whose `X-Forwarded-For` names the
    /// client: the rate-limit key is then the rightmost address in it that is not itself
    /// trusted. Default none: the key is always the peer address.
    pub trusted_proxies: Vec<String>,
    /// Limits for proxied requests under one route or subsystem, replacing `proxy_per_s` there
    /// (`[[rate_limit.routes]]`). Default none.
    pub routes: Vec<RouteLimitConfig>,
}

/// One `[[rate_limit.routes]]` entry: exactly one of `prefix` and `subsystem`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteLimitConfig {
    /// Path prefix, matched on whole segments; the longest matching entry wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Subsystem name: every route of that subsystem (a matching `prefix` entry wins).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subsystem: Option<String>,
    /// Requests per second per client key, >= 1.
    pub per_s: u64,
    /// Bucket size. Default 0 = same as `per_s`.
    pub burst: u64,
}

/// One `[[subsystems]]` entry: one instance of a backend subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubsystemConfig {
    /// Subsystem name, required, `[A-Za-z0-9._-]+`. Instances sharing a name are load-balanced.
    pub name: String,
    /// Instance id, required, `[A-Za-z0-9._-]+`, unique within its subsystem.
    pub instance: String,
    /// Base URL, required, `http://` only (the relay does not speak TLS to backends).
    pub url: String,
    /// Path probed by health checks. Default `/health`.
    pub health_path: String,
    /// Share of traffic under `lb = "weighted"`, >= 1. Default 1.
    pub weight: u32,
    /// Path prefixes proxied to this subsystem, each starting with '/'. Default none.
    pub routes: Vec<String>,
    /// Load-balancing policy across the subsystem's instances. Default `round_robin`.
    pub lb: LbPolicy,
    /// Milliseconds this registration stays valid without renewal. Default unset: static.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Events delivered to this subsystem (`[[subsystems.subscriptions]]`). Default none.
    pub subscriptions: Vec<SubscriptionConfig>,
}

impl Default for SubsystemConfig {
    fn default() -> Self {
        SubsystemConfig {
            name: String::new(),
            instance: String::new(),
            url: String::new(),
            health_path: "/health".to_string(),
            weight: 1,
            routes: Vec::new(),
            lb: LbPolicy::RoundRobin,
            ttl_ms: None,
            subscriptions: Vec::new(),
        }
    }
}

/// One `[[subsystems.subscriptions]]` entry: which events a subsystem wants and where.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionConfig {
    /// Event types wanted. Default none.
    pub types: Vec<String>,
    /// Channel globs wanted. Default none.
    pub channels: Vec<String>,
    /// Path on the instance the events are delivered to, required, starts with '/'.
    pub path: String,
}

/// One `[[channels]]` rule. Its defaults are also what channels matching no rule get, so a rule
/// that only overrides history leaves presence as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelRule {
    /// Channel glob, required.
    pub pattern: String,
    /// Track who is subscribed. Default true.
    pub presence: bool,
    /// Publish join/leave events. Default false: they are noisy on big channels.
    pub join_leave: bool,
    /// Overrides `history.size` for matching channels, 1..=1_000_000. Default unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_size: Option<usize>,
    /// Overrides `history.ttl_s` for matching channels, >= 1. Default unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_ttl_s: Option<u64>,
}

impl Default for ChannelRule {
    fn default() -> Self {
        ChannelRule {
            pattern: String::new(),
            presence: true,
            join_leave: false,
            history_size: None,
            history_ttl_s: None,
        }
    }
}

impl Config {
    /// Shards to start: `shards`, or the available parallelism when it is 0 (1 if unknown).
    pub fn shard_count(&self) -> usize {
        if self.shards != 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// The configuration as TOML (for `--print-config`); parsing it back gives an equal Config.
    pub fn to_toml(&self) -> String {
        // Only a value outside TOML's i64 range (set in code, never by loading) can fail here;
        // say so in the output rather than panic.
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration as TOML: {e}\n"))
    }

    /// `(history size, history ttl_s)` for `channel`: the first `[[channels]]` rule whose
    /// pattern matches (`matcher(pattern, channel)`) overrides `[history]`.
    pub fn history_for(&self, channel: &str, matcher: impl Fn(&str, &str) -> bool) -> (usize, u64) {
        let rule = self.channel_rule(channel, matcher);
        (
            rule.and_then(|r| r.history_size)
                .unwrap_or(self.history.size),
            rule.and_then(|r| r.history_ttl_s)
                .unwrap_or(self.history.ttl_s),
        )
    }

    /// `(presence, join_leave)` for `channel` from the first matching `[[channels]]` rule, or a
    /// default rule's values when none matches.
    pub fn presence_for(
        &self,
        channel: &str,
        matcher: impl Fn(&str, &str) -> bool,
    ) -> (bool, bool) {
        match self.channel_rule(channel, matcher) {
            Some(rule) => (rule.presence, rule.join_leave),
            None => {
                let rule = ChannelRule::default();
                (rule.presence, rule.join_leave)
            }
        }
    }

    fn channel_rule(
        &self,
        channel: &str,
        matcher: impl Fn(&str, &str) -> bool,
    ) -> Option<&ChannelRule> {
        self.channels.iter().find(|r| matcher(&r.pattern, channel))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why the configuration could not be loaded. Every variant but `Clap` names where the bad
/// value came from.
#[derive(Debug)]
pub enum ConfigError {
    /// Command-line parse result, including `--help` and `--version`: call `e.exit()`, which
    /// prints it and exits 0 for help/version, 2 for a usage error.
    Clap(clap::Error),
    /// The config file could not be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad config file: syntax, an unknown key, a wrong type or an out-of-range value.
    File {
        path: PathBuf,
        /// 1-based line, when it could be located.
        line: Option<usize>,
        /// Dotted key, e.g. `limits.idle_timeout_s` or `subsystems[0].url`.
        key: Option<String>,
        message: String,
    },
    /// A bad `RELAY_*` environment variable.
    Env { var: String, message: String },
    /// A bad command-line flag value.
    Flag { flag: String, message: String },
    /// A value no layer above can be blamed for (a built-in default, or the merged table
    /// disagreeing with `Config`) is invalid: a bug in relay, not in its configuration.
    Invalid {
        key: Option<String>,
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Clap(e) => write!(f, "{e}"),
            ConfigError::Read { path, source } => {
                write!(f, "cannot read {}: {}", path.display(), io_message(source))
            }
            ConfigError::File {
                path,
                line,
                key,
                message,
            } => {
                write!(f, "{}", path.display())?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                }
                f.write_str(": ")?;
                if let Some(key) = key {
                    write!(f, "key `{key}`: ")?;
                }
                f.write_str(message)
            }
            ConfigError::Env { var, message } => write!(f, "environment {var}: {message}"),
            ConfigError::Flag { flag, message } => write!(f, "flag {flag}: {message}"),
            ConfigError::Invalid {
                key: Some(key),
                message,
            } => write!(f, "key `{key}`: {message}"),
            ConfigError::Invalid { key: None, message } => {
                write!(f, "invalid configuration: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Clap(e) => Some(e),
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The OS message without Rust's " (os error N)" suffix, which means nothing to an operator.
fn io_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

const AFTER_HELP: &str = "\
Settings are layered: built-in defaults < config file < RELAY_* environment < flags.

Every key of a table in the config file can also be set in the environment:
RELAY_<KEY> for top-level keys (RELAY_LISTEN, RELAY_SHARDS, RELAY_DRIVER, RELAY_PIN_SHARDS,
RELAY_LOG) and RELAY_<SECTION>_<KEY> for keys in a section, e.g. RELAY_HISTORY_SIZE=5000,
RELAY_LIMITS_MAX_CONNECTIONS=50000, RELAY_AUTH_API_KEYS=key1,key2 (comma-separated).
[[subsystems]] and [[channels]] are file-only. `relay --print-config` lists every key.";

/// relay: a thread-per-core HTTP/WebSocket/SSE event relay
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    /// TOML config file [env: RELAY_CONFIG] [default: none, built-in defaults only]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address to listen on [env: RELAY_LISTEN] [default: 0.0.0.0:8004]
    // A string, not SocketAddr, so a bad value is reported the same way as from the environment.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Number of shards (threads); 0 = one per CPU core [env: RELAY_SHARDS] [default: 0]
    #[arg(long, value_name = "N")]
    shards: Option<String>,

    /// I/O driver [env: RELAY_DRIVER] [default: auto]
    #[arg(long, value_enum, value_name = "DRIVER")]
    driver: Option<Driver>,

    /// Log filter, tracing directive syntax, e.g. "info" or "relay=debug,warn" [env: RELAY_LOG]
    /// [default: info]
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,

    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    print_config: bool,
}

// ---------------------------------------------------------------------------------------------
// The settings the environment and flags can reach
// ---------------------------------------------------------------------------------------------

/// How a raw environment/flag string becomes a TOML value. Checked here, before the value joins
/// the merged table, so that a bad value is blamed on its variable rather than on the file.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Addr,
    Int { max: u64 },
    Str,
    StrList,
    Bool,
    Choice(&'static [&'static str]),
}

/// TOML integers are i64, so nothing larger can be carried in the merged table.
const TOML_INT_MAX: u64 = i64::MAX as u64;
const USIZE: Kind = Kind::Int {
    max: if (usize::MAX as u64) < TOML_INT_MAX {
        usize::MAX as u64
    } else {
        TOML_INT_MAX
    },
};
const U64: Kind = Kind::Int { max: TOML_INT_MAX };
const U32: Kind = Kind::Int {
    max: u32::MAX as u64,
};
const DRIVERS: Kind = Kind::Choice(&["auto", "io_uring", "epoll"]);
const SLOW_CONSUMER: Kind = Kind::Choice(&["close", "drop_oldest"]);

/// A scalar setting: `section` is "" for top-level keys. A test checks this list against the
/// serialised `Config`, so a new field cannot be forgotten here.
struct Setting {
    section: &'static str,
    key: &'static str,
    kind: Kind,
}

const fn s(section: &'static str, key: &'static str, kind: Kind) -> Setting {
    Setting { section, key, kind }
}

const SETTINGS: &[Setting] = &[
    s("", "listen", Kind::Addr),
    s("", "shards", USIZE),
    s("", "driver", DRIVERS),
    s("", "pin_shards", Kind::Bool),
    s("", "log", Kind::Str),
    s("auth", "jwt_secret", Kind::Str),
    s("auth", "api_keys", Kind::StrList),
    s("history", "size", USIZE),
    s("history", "ttl_s", U64),
    s("history", "max_events", USIZE),
    s("limits", "max_connections", USIZE),
    s("limits", "max_connections_per_ip", USIZE),
    s("limits", "max_frame_bytes", USIZE),
    s("limits", "max_body_bytes", USIZE),
    s("limits", "max_header_bytes", USIZE),
    s("limits", "max_headers", USIZE),
    s("limits", "max_subscriptions_per_connection", USIZE),
    s("limits", "max_publishes_in_flight", USIZE),
    s("limits", "max_channels_per_stream", USIZE),
    s("limits", "outbound_queue_messages", USIZE),
    s("limits", "outbound_queue_bytes", USIZE),
    s("limits", "idle_timeout_s", U64),
    s("limits", "request_timeout_s", U64),
    s("limits", "slow_consumer", SLOW_CONSUMER),
    s("bus", "ring_capacity", USIZE),
    s("bus", "max_batch", USIZE),
    s("sse", "keepalive_s", U64),
    s("sse", "retry_ms", U64),
    s("websocket", "heartbeat_ms", U64),
    s("delivery", "max_hold_us", U64),
    s("delivery", "busy_percent", U32),
    s("webhooks", "queue_size", USIZE),
    s("webhooks", "batch_max", USIZE),
    s("webhooks", "max_attempts", U32),
    s("webhooks", "backoff_initial_ms", U64),
    s("webhooks", "backoff_max_ms", U64),
    s("webhooks", "timeout_ms", U64),
    s("shutdown", "deadline_s", U64),
    s("shutdown", "close_spread_ms", U64),
    s("health", "interval_ms", U64),
    s("health", "timeout_ms", U64),
    s("health", "healthy_threshold", U32),
    s("health", "unhealthy_threshold", U32),
    s("circuit", "consecutive_failures", U32),
    s("circuit", "cooldown_ms", U64),
    s("circuit", "half_open_probes", U32),
    s("circuit", "cooldown_max_ms", U64),
    s("circuit", "failure_rate_percent", U32),
    s("circuit", "rate_window_ms", U64),
    s("circuit", "rate_min_requests", U32),
    s("proxy", "timeout_ms", U64),
    s("proxy", "pool_max_idle", USIZE),
    s("proxy", "pool_idle_timeout_ms", U64),
    s("rate_limit", "publish_per_s", U64),
    s("rate_limit", "publish_burst", U64),
    s("rate_limit", "proxy_per_s", U64),
    s("rate_limit", "proxy_burst", U64),
    s("rate_limit", "trusted_proxies", Kind::StrList),
];

/// The variable that names the config file.
const CONFIG_VAR: &str = "RELAY_CONFIG";

impl Setting {
    fn env_var(&self) -> String {
        if self.section.is_empty() {
            format!("RELAY_{}", self.key.to_ascii_uppercase())
        } else {
            format!(
                "RELAY_{}_{}",
                self.section.to_ascii_uppercase(),
                self.key.to_ascii_uppercase()
            )
        }
    }

    fn dotted(&self) -> String {
        if self.section.is_empty() {
            self.key.to_string()
        } else {
            format!("{}.{}", self.section, self.key)
        }
    }
}

/// Turns an environment or flag string into the TOML value for `kind`; the error text follows
/// "environment VAR: " or "flag --x: ".
fn parse_value(kind: Kind, raw: &str) -> Result<toml::Value, String> {
    match kind {
        Kind::Addr => raw
            .trim()
            .parse::<SocketAddr>()
            .map(|a| toml::Value::String(a.to_string()))
            .map_err(|_| format!("invalid socket address {raw:?}")),
        Kind::Int { max } => {
            let n: u64 = raw
                .trim()
                .parse()
                .map_err(|_| format!("invalid value {raw:?}: expected a non-negative integer"))?;
            if n > max {
                return Err(format!("invalid value {raw:?}: must be at most {max}"));
            }
            i64::try_from(n)
                .map(toml::Value::Integer)
                .map_err(|_| format!("invalid value {raw:?}: must be at most {TOML_INT_MAX}"))
        }
        Kind::Str => Ok(toml::Value::String(raw.to_string())),
        // An empty variable is an empty list; empty items are kept so validation can reject them.
        Kind::StrList if raw.trim().is_empty() => Ok(toml::Value::Array(Vec::new())),
        Kind::StrList => Ok(toml::Value::Array(
            raw.split(',')
                .map(|item| toml::Value::String(item.trim().to_string()))
                .collect(),
        )),
        Kind::Bool => match raw.trim() {
            "true" => Ok(toml::Value::Boolean(true)),
            "false" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("invalid value {raw:?}: expected true or false")),
        },
        Kind::Choice(choices) => {
            let value = raw.trim();
            if choices.contains(&value) {
                Ok(toml::Value::String(value.to_string()))
            } else {
                Err(format!(
                    "invalid value {raw:?}: expected one of {}",
                    choices.join(", ")
                ))
            }
        }
    }
}

fn set_value(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let target = if section.is_empty() {
        table
    } else {
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // The file already deserialised into `Config`, so a section is a table; if it somehow is
        // not, the override replaces it.
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        match entry {
            toml::Value::Table(t) => t,
            _ => return,
        }
    };
    target.insert(key.to_string(), value);
}

/// Rejects `RELAY_<SECTION>_<NOPE>`: a variable in a section's namespace that names no key is
/// almost certainly a typo that would otherwise be silently ignored. Other unknown `RELAY_*`
/// names are left alone (they may belong to wrappers or scripts). [`load`] cannot do this itself
/// because it only looks variables up by name; [`load_from_process`] calls it.
pub fn check_env_names<I, S>(names: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    for name in names {
        let name = name.as_ref();
        for setting in SETTINGS.iter().filter(|s| !s.section.is_empty()) {
            let prefix = format!("RELAY_{}_", setting.section.to_ascii_uppercase());
            if !name.starts_with(&prefix) {
                continue;
            }
            let known: Vec<String> = SETTINGS
                .iter()
                .filter(|s| s.section == setting.section)
                .map(Setting::env_var)
                .collect();
            if known.iter().any(|k| k == name) {
                break;
            }
            return Err(ConfigError::Env {
                var: name.to_string(),
                message: format!(
                    "unknown setting in [{}] (expected one of: {})",
                    setting.section,
                    known.join(", ")
                ),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// What [`load`] returns.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The file that was read, if any.
    pub config_path: Option<PathBuf>,
    /// `--print-config` was given: print `config.to_toml()` and exit 0.
    pub print_config: bool,
}

/// Builds the configuration from `args` (including argv\[0\]), the file they or `RELAY_CONFIG`
/// name, and the environment as seen through `env`.
pub fn load<I, T>(args: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(ConfigError::Clap)?;

    let config_path = match cli.config.clone() {
        Some(path) => Some(path),
        None => match env(CONFIG_VAR) {
            Some(raw) if raw.is_empty() => {
                return Err(ConfigError::Env {
                    var: CONFIG_VAR.to_string(),
                    message: "empty path (unset it to run without a config file)".to_string(),
                })
            }
            Some(raw) => Some(PathBuf::from(raw)),
            None => None,
        },
    };

    // Layer 2: the file. It is deserialised into `Config` on its own first, so its type and
    // unknown-key errors carry positions; the merge below works on a plain table.
    let (file, mut table) = match &config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file = FileSource::new(path, text);
            let table = file.parse()?;
            (Some(file), table)
        }
        None => (None, toml::Table::new()),
    };

    let mut origins = Origins {
        file: file.as_ref(),
        env: HashMap::new(),
        flags: HashMap::new(),
    };

    // Layer 3: the environment.
    for setting in SETTINGS {
        let var = setting.env_var();
        if let Some(raw) = env(&var) {
            let value = parse_value(setting.kind, &raw).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
            set_value(&mut table, setting.section, setting.key, value);
            origins.env.insert(setting.dotted(), var);
        }
    }

    // Layer 4: flags.
    let flags: [(&'static str, &'static str, Kind, Option<String>); 4] = [
        ("listen", "--listen", Kind::Addr, cli.listen),
        ("shards", "--shards", USIZE, cli.shards),
        (
            "driver",
            "--driver",
            DRIVERS,
            cli.driver.map(|d| d.as_str().to_string()),
        ),
        ("log", "--log", Kind::Str, cli.log),
    ];
    for (key, flag, kind, raw) in flags {
        if let Some(raw) = raw {
            let value = parse_value(kind, &raw).map_err(|message| ConfigError::Flag {
                flag: flag.to_string(),
                message,
            })?;
            set_value(&mut table, "", key, value);
            origins.flags.insert(key.to_string(), flag);
        }
    }

    // Every override was type-checked by `parse_value` and the file by `FileSource::parse`, so
    // this fails only if the two disagree about a type: report it rather than guess a culprit.
    let config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid {
            key: None,
            message: flatten(e.message()),
        })?;

    validate(&config, &origins)?;

    Ok(Loaded {
        config,
        config_path,
        print_config: cli.print_config,
    })
}

/// [`load`] with the real command line and process environment, plus [`check_env_names`].
/// This is what `main` calls; tests call `load` with their own environment.
pub fn load_from_process() -> Result<Loaded, ConfigError> {
    // Lossy, so a non-UTF-8 value is reported as invalid instead of silently ignored.
    let lookup = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    // Flags first, so `--help` works even with a stray variable set.
    let loaded = load(std::env::args_os(), &lookup)?;
    check_env_names(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))?;
    Ok(loaded)
}

/// The config file's text plus where each value sits in it.
struct FileSource {
    path: PathBuf,
    text: String,
    /// Dotted path (`limits.max_connections`, `subsystems[0].url`) and the span of its value.
    index: Vec<(String, Range<usize>)>,
    /// Whether `index` came from the parser and so lists every value the file sets. toml gives
    /// no span for implicit tables (`history.size = 1` creates `history` without one), which
    /// makes that impossible; a syntax error does too. Then `index` comes from `scan_index`.
    index_complete: bool,
}

impl FileSource {
    fn new(path: &Path, text: String) -> Self {
        let (index, index_complete) = match toml::from_str::<Node>(&text) {
            Ok(root) => {
                let mut out = Vec::new();
                root.flatten("", &mut out);
                (out, true)
            }
            Err(_) => (scan_index(&text), false),
        };
        FileSource {
            path: path.to_path_buf(),
            text,
            index,
            index_complete,
        }
    }

    fn parse(&self) -> Result<toml::Table, ConfigError> {
        toml::from_str::<Config>(&self.text).map_err(|e| self.toml_error(&e))?;
        toml::from_str::<toml::Table>(&self.text).map_err(|e| self.toml_error(&e))
    }

    fn line_at(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// A syntax or deserialisation error, with its line and the key at that position.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let unknown = unknown_field(e.message());
        let mut message = match &unknown {
            Some((_, expected)) if expected.is_empty() => {
                "unknown key (this table takes no keys)".to_string()
            }
            Some((_, expected)) => {
                format!("unknown key (expected one of: {})", expected.join(", "))
            }
            None => flatten(e.message()),
        };
        let Some(span) = e.span() else {
            return self.error(None, None, message);
        };
        let line = self.line_at(span.start);
        let name = unknown.as_ref().map(|(name, _)| name.as_str());
        let key = self.key_at(&span, line, name);
        if key.is_none() {
            if let Some(name) = name {
                message = format!("`{name}`: {message}");
            }
        }
        self.error(Some(line), key, message)
    }

    /// The dotted key an error span points at.
    fn key_at(&self, span: &Range<usize>, line: usize, unknown: Option<&str>) -> Option<String> {
        let index = &self.index;
        match unknown {
            // Unknown keys are reported at the key itself; its value starts on the same line
            // (TOML requires that), and the path ends in the reported name.
            Some(name) => index
                .iter()
                .filter(|(path, r)| self.line_at(r.start) == line && last_component(path) == name)
                .min_by_key(|(path, _)| path.len())
                .map(|(path, _)| path.clone()),
            // Type and value errors are reported at the value: the narrowest one covering it.
            None => index
                .iter()
                .filter(|(_, r)| r.start <= span.start && span.end <= r.end)
                .min_by_key(|(_, r)| r.len())
                .map(|(path, _)| path.clone()),
        }
    }

    /// The line of `key`'s value. An array entry's missing field falls back to its entry's line;
    /// a plain key not in the file has none (its value is a default).
    fn line_of(&self, key: &str) -> Option<usize> {
        let mut key = key;
        loop {
            if let Some((_, r)) = self.index.iter().find(|(path, _)| path == key) {
                return Some(self.line_at(r.start));
            }
            if !key.contains('[') {
                return None;
            }
            let cut = key.rfind(['.', '['])?;
            key = &key[..cut];
        }
    }

    fn error(&self, line: Option<usize>, key: Option<String>, message: String) -> ConfigError {
        ConfigError::File {
            path: self.path.clone(),
            line,
            key,
            message,
        }
    }
}

/// toml's messages can span lines ("invalid table header\nduplicate key ..."); keep one line.
fn flatten(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" into ("x", ["a", "b"]).
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((name.to_string(), expected))
}

fn last_component(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// A line-based index for when the parser cannot give one: `[table]` and `[[array]]` headers
/// (counting array entries, so paths read `subsystems[1].url`), `key =` and `dotted.key =`
/// lines. Each value's span runs to the next entry, so a multi-line array is covered. Inline
/// tables are not looked into, and multi-line strings are skipped only roughly; this is a
/// fallback for error messages, not a parser.
fn scan_index(text: &str) -> Vec<(String, Range<usize>)> {
    let mut starts: Vec<(String, usize)> = Vec::new();
    let mut section = String::new();
    // Entries seen so far per array-of-tables path, e.g. "subsystems" -> 2.
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut in_string: Option<&str> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        if let Some(delim) = in_string {
            if line.matches(delim).count() % 2 == 1 {
                in_string = None;
            }
            continue;
        }
        let t = line.trim();
        let at = line_start + (line.len() - line.trim_start().len());
        if let Some(rest) = t.strip_prefix("[[") {
            let name = rest.split("]]").next().unwrap_or_default();
            let parts = key_parts(name);
            let Some((last, parents)) = parts.split_last() else {
                continue;
            };
            let path = join_path(&resolve_tables("", parents, &arrays), last);
            let n = arrays.entry(path.clone()).or_insert(0);
            section = format!("{path}[{n}]");
            *n += 1;
            starts.push((section.clone(), at));
        } else if let Some(rest) = t.strip_prefix('[') {
            let name = rest.split(']').next().unwrap_or_default();
            section = resolve_tables("", &key_parts(name), &arrays);
            starts.push((section.clone(), at));
        } else if let Some((key, value)) = t.split_once('=') {
            if t.starts_with('#') {
                continue;
            }
            let parts = key_parts(key);
            if parts.is_empty() {
                continue;
            }
            let path = resolve_tables(&section, &parts, &HashMap::new());
            let value_at = line_start + line.find('=').map_or(0, |i| i + 1);
            starts.push((path, value_at));
            in_string = ["\"\"\"", "'''"]
                .into_iter()
                .find(|delim| value.matches(delim).count() % 2 == 1);
        }
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|(_, start)| *start)
        .chain(std::iter::once(text.len()))
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .map(|((path, start), end)| (path, start..end.max(start)))
        .collect()
}

/// `a . "b" ` -> ["a", "b"]; nothing if it does not look like a key.
fn key_parts(key: &str) -> Vec<String> {
    let parts: Vec<String> = key
        .split('.')
        .map(|p| p.trim().trim_matches(['"', '\'']).to_string())
        .collect();
    let plain = |p: &String| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    };
    if parts.iter().all(plain) {
        parts
    } else {
        Vec::new()
    }
}

fn join_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Joins `parts` onto `prefix`, pointing each array-of-tables part at its latest entry.
fn resolve_tables(prefix: &str, parts: &[String], arrays: &HashMap<String, usize>) -> String {
    let mut path = prefix.to_string();
    for part in parts {
        path = join_path(&path, part);
        if let Some(n) = arrays.get(&path) {
            path = format!("{path}[{}]", n.saturating_sub(1));
        }
    }
    path
}

/// The file's tree with every value's span, used to put line numbers and dotted keys on errors.
enum Node {
    Leaf,
    Table(Vec<(String, toml::Spanned<Node>)>),
    Array(Vec<toml::Spanned<Node>>),
}

impl Node {
    fn flatten(self, prefix: &str, out: &mut Vec<(String, Range<usize>)>) {
        match self {
            Node::Leaf => {}
            Node::Table(entries) => {
                for (key, value) in entries {
                    let path = join_path(prefix, &key);
                    out.push((path.clone(), value.span()));
                    value.into_inner().flatten(&path, out);
                }
            }
            Node::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    let path = format!("{prefix}[{i}]");
                    out.push((path.clone(), item.span()));
                    item.into_inner().flatten(&path, out);
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;

        impl<'de> serde::de::Visitor<'de> for NodeVisitor {
            type Value = Node;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }

            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }

            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }

            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }

            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }

            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    // toml hands datetimes over as a one-entry map with a private key; they
                    // are leaves here (and always a type error in this config).
                    if key.starts_with("$__toml_private") {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        return Ok(Node::Leaf);
                    }
                    entries.push((key, map.next_value::<toml::Spanned<Node>>()?));
                }
                Ok(Node::Table(entries))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<toml::Spanned<Node>>()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
        }

        deserializer.deserialize_any(NodeVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Where each value of the merged configuration came from, so a range error names its source.
struct Origins<'a> {
    file: Option<&'a FileSource>,
    /// Dotted key -> variable that set it.
    env: HashMap<String, String>,
    /// Dotted key -> flag that set it.
    flags: HashMap<String, &'static str>,
}

impl Origins<'_> {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        if let Some(flag) = self.flags.get(key) {
            return ConfigError::Flag {
                flag: flag.to_string(),
                message,
            };
        }
        if let Some(var) = self.env.get(key) {
            return ConfigError::Env {
                var: var.clone(),
                message,
            };
        }
        if let Some(file) = self.file {
            let line = file.line_of(key);
            // Array entries exist only in the file; with an incomplete index a missing key may
            // still be in the file, so blame the file (without a line) rather than a default.
            if line.is_some() || key.contains('[') || !file.index_complete {
                return file.error(line, Some(key.to_string()), message);
            }
        }
        ConfigError::Invalid {
            key: Some(key.to_string()),
            message: format!("{message} (built-in default)"),
        }
    }

    fn at_least(&self, key: &str, value: u64, min: u64) -> Result<(), ConfigError> {
        if value < min {
            return Err(self.error(key, format!("must be at least {min}")));
        }
        Ok(())
    }

    fn between(&self, key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
        if value < min || value > max {
            return Err(self.error(key, format!("must be between {min} and {max}")));
        }
        Ok(())
    }

    fn check(&self, key: &str, ok: bool, message: impl Into<String>) -> Result<(), ConfigError> {
        if ok {
            Ok(())
        } else {
            Err(self.error(key, message))
        }
    }
}

const MAX_HISTORY_SIZE: u64 = 1_000_000;
/// RFC 6455 control frames carry up to 125 bytes, and every peer may send them.
const MIN_FRAME_BYTES: u64 = 125;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn validate(c: &Config, o: &Origins<'_>) -> Result<(), ConfigError> {
    // usize -> u64 is lossless on every platform relay supports (64-bit Linux).
    let n = |v: usize| v as u64;

    if let Some(secret) = &c.auth.jwt_secret {
        o.check("auth.jwt_secret", !secret.is_empty(), "must not be empty")?;
    }
    if let Some(keys) = &c.auth.api_keys {
        o.check(
            "auth.api_keys",
            keys.iter().all(|k| !k.is_empty()),
            "must not contain empty strings",
        )?;
    }

    o.between("history.size", n(c.history.size), 1, MAX_HISTORY_SIZE)?;
    o.at_least("history.max_events", n(c.history.max_events), 1)?;
    o.at_least("history.ttl_s", c.history.ttl_s, 1)?;

    let l = &c.limits;
    o.at_least("limits.max_connections", n(l.max_connections), 1)?;
    o.at_least(
        "limits.max_connections_per_ip",
        n(l.max_connections_per_ip),
        1,
    )?;
    o.at_least(
        "limits.max_frame_bytes",
        n(l.max_frame_bytes),
        MIN_FRAME_BYTES,
    )?;
    o.at_least("limits.max_body_bytes", n(l.max_body_bytes), 1)?;
    o.at_least("limits.max_header_bytes", n(l.max_header_bytes), 1)?;
    o.at_least("limits.max_headers", n(l.max_headers), 1)?;
    o.at_least(
        "limits.max_subscriptions_per_connection",
        n(l.max_subscriptions_per_connection),
        1,
    )?;
    o.between(
        "limits.max_publishes_in_flight",
        n(l.max_publishes_in_flight),
        1,
        65_536,
    )?;
    o.at_least(
        "limits.max_channels_per_stream",
        n(l.max_channels_per_stream),
        1,
    )?;
    o.at_least(
        "limits.outbound_queue_messages",
        n(l.outbound_queue_messages),
        1,
    )?;
    o.at_least("limits.outbound_queue_bytes", n(l.outbound_queue_bytes), 1)?;
    o.at_least("limits.idle_timeout_s", l.idle_timeout_s, 1)?;
    o.at_least("limits.request_timeout_s", l.request_timeout_s, 1)?;

    o.at_least("bus.ring_capacity", n(c.bus.ring_capacity), 2)?;
    o.at_least("bus.max_batch", n(c.bus.max_batch), 1)?;

    o.at_least("sse.keepalive_s", c.sse.keepalive_s, 1)?;
    o.at_least("sse.retry_ms", c.sse.retry_ms, 1)?;

    o.at_least("websocket.heartbeat_ms", c.websocket.heartbeat_ms, 100)?;
    o.between("delivery.max_hold_us", c.delivery.max_hold_us, 0, 1_000_000)?;
    o.between(
        "delivery.busy_percent",
        c.delivery.busy_percent.into(),
        10,
        100,
    )?;
    let w = &c.webhooks;
    o.at_least("webhooks.queue_size", n(w.queue_size), 1)?;
    o.at_least("webhooks.batch_max", n(w.batch_max), 1)?;
    o.at_least("webhooks.max_attempts", u64::from(w.max_attempts), 1)?;
    o.at_least("webhooks.backoff_initial_ms", w.backoff_initial_ms, 1)?;
    o.at_least("webhooks.timeout_ms", w.timeout_ms, 1)?;
    o.check(
        "webhooks.backoff_max_ms",
        w.backoff_max_ms >= w.backoff_initial_ms,
        "must be at least webhooks.backoff_initial_ms",
    )?;
    o.at_least("shutdown.deadline_s", c.shutdown.deadline_s, 1)?;
    o.check(
        "shutdown.close_spread_ms",
        c.shutdown.close_spread_ms < c.shutdown.deadline_s.saturating_mul(1000),
        "must be below shutdown.deadline_s (in milliseconds)",
    )?;

    let h = &c.health;
    o.at_least("health.interval_ms", h.interval_ms, 1)?;
    o.at_least("health.timeout_ms", h.timeout_ms, 1)?;
    o.check(
        "health.timeout_ms",
        h.timeout_ms <= h.interval_ms,
        format!(
            "must not exceed health.interval_ms ({}), or probes would overlap",
            h.interval_ms
        ),
    )?;
    o.at_least("health.healthy_threshold", h.healthy_threshold.into(), 1)?;
    o.at_least(
        "health.unhealthy_threshold",
        h.unhealthy_threshold.into(),
        1,
    )?;

    o.check(
        "circuit.consecutive_failures",
        c.circuit.consecutive_failures > 0 || c.circuit.failure_rate_percent > 0,
        "0 turns the consecutive rule off, which needs circuit.failure_rate_percent above 0",
    )?;
    o.at_least("circuit.cooldown_ms", c.circuit.cooldown_ms, 1)?;
    o.at_least(
        "circuit.half_open_probes",
        c.circuit.half_open_probes.into(),
        1,
    )?;
    o.at_least(
        "circuit.cooldown_max_ms",
        c.circuit.cooldown_max_ms,
        c.circuit.cooldown_ms,
    )?;
    o.between(
        "circuit.failure_rate_percent",
        c.circuit.failure_rate_percent.into(),
        0,
        100,
    )?;
    // The window is kept in one-second buckets, at most an hour of them.
    o.between(
        "circuit.rate_window_ms",
        c.circuit.rate_window_ms,
        1000,
        3_600_000,
    )?;
    o.at_least(
        "circuit.rate_min_requests",
        c.circuit.rate_min_requests.into(),
        1,
    )?;

    o.at_least("proxy.timeout_ms", c.proxy.timeout_ms, 1)?;
    o.at_least(
        "proxy.pool_idle_timeout_ms",
        c.proxy.pool_idle_timeout_ms,
        1,
    )?;

    let r = &c.rate_limit;
    for (i, entry) in r.trusted_proxies.iter().enumerate() {
        if let Err(message) = crate::ratelimit::IpNet::parse(entry) {
            return Err(o.error(&format!("rate_limit.trusted_proxies[{i}]"), message));
        }
    }
    for (i, route) in r.routes.iter().enumerate() {
        let key = |field: &str| format!("rate_limit.routes[{i}].{field}");
        match (&route.prefix, &route.subsystem) {
            (Some(prefix), None) => o.check(
                &key("prefix"),
                prefix.starts_with('/'),
                format!("prefix {prefix:?} must start with '/'"),
            )?,
            (None, Some(name)) => {
                o.check(&key("subsystem"), !name.is_empty(), "must name a subsystem")?
            }
            _ => {
                return Err(o.error(
                    &format!("rate_limit.routes[{i}]"),
                    "needs exactly one of `prefix` and `subsystem`",
                ))
            }
        }
        o.at_least(&key("per_s"), route.per_s, 1)?;
    }

    for (i, sub) in c.subsystems.iter().enumerate() {
        let key = |field: &str| format!("subsystems[{i}].{field}");
        const NAME_RULE: &str = "required; letters, digits, '.', '_' and '-' only";
        o.check(&key("name"), valid_name(&sub.name), NAME_RULE)?;
        o.check(&key("instance"), valid_name(&sub.instance), NAME_RULE)?;
        if let Some(j) = c.subsystems[..i]
            .iter()
            .position(|other| other.name == sub.name && other.instance == sub.instance)
        {
            return Err(o.error(
                &key("instance"),
                format!(
                    "duplicate instance `{}` of subsystem `{}` (also subsystems[{j}])",
                    sub.instance, sub.name
                ),
            ));
        }
        o.check(
            &key("url"),
            sub.url.len() > "http://".len() && sub.url.starts_with("http://"),
            format!("must be an http:// URL, got {:?}", sub.url),
        )?;
        o.check(
            &key("health_path"),
            sub.health_path.starts_with('/'),
            "must start with '/'",
        )?;
        o.at_least(&key("weight"), sub.weight.into(), 1)?;
        for (j, route) in sub.routes.iter().enumerate() {
            o.check(
                &key(&format!("routes[{j}]")),
                route.starts_with('/'),
                format!("route {route:?} must start with '/'"),
            )?;
        }
        if let Some(ttl) = sub.ttl_ms {
            o.at_least(&key("ttl_ms"), ttl, 1)?;
        }
        for (j, subscription) in sub.subscriptions.iter().enumerate() {
            o.check(
                &key(&format!("subscriptions[{j}].path")),
                subscription.path.starts_with('/'),
                "required; must start with '/'",
            )?;
        }
    }

    for (i, rule) in c.channels.iter().enumerate() {
        let key = |field: &str| format!("channels[{i}].{field}");
        o.check(&key("pattern"), !rule.pattern.is_empty(), "required")?;
        if let Some(size) = rule.history_size {
            o.between(&key("history_size"), n(size), 1, MAX_HISTORY_SIZE)?;
        }
        if let Some(ttl) = rule.history_ttl_s {
            o.at_least(&key("history_ttl_s"), ttl, 1)?;
        }
    }

    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A `relay.toml` in its own temporary directory, removed on drop.
    struct TempConfig {
        dir: PathBuf,
        path: PathBuf,
    }

    impl TempConfig {
        fn new(text: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "relay-config-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            let path = dir.join("relay.toml");
            std::fs::write(&path, text).expect("write temp config");
            TempConfig { dir, path }
        }

        fn arg(&self) -> String {
            self.path.display().to_string()
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let argv = std::iter::once("relay").chain(args.iter().copied());
        load(argv, &env_of(env))
    }

    fn load_file(text: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = TempConfig::new(text);
        let mut argv = vec!["--config".to_string(), file.arg()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&argv, env).map(|l| l.config)
    }

    /// The error for `text`, with the temp path replaced by `relay.toml`.
    fn file_error(text: &str) -> (ConfigError, String) {
        let file = TempConfig::new(text);
        let err = run(&["--config", &file.arg()], &[]).expect_err("config should be rejected");
        let shown = err.to_string().replace(&file.arg(), "relay.toml");
        (err, shown)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn defaults_with_no_file() {
        let loaded = load(["relay"], &no_env).expect("defaults load");
        assert_eq!(loaded.config, Config::default());
        assert_eq!(loaded.config_path, None);
        assert!(!loaded.print_config);
        let c = loaded.config;
        assert_eq!(c.listen, addr("0.0.0.0:8004"));
        assert_eq!(c.shards, 0);
        assert_eq!(c.driver, Driver::Auto);
        assert_eq!(c.log, "info");
        assert_eq!(c.auth, AuthConfig::default());
        assert_eq!((c.history.size, c.history.ttl_s), (1000, 3600));
        assert_eq!(c.history.max_events, 5_000_000);
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.limits.max_frame_bytes, 65_536);
        assert_eq!(c.limits.outbound_queue_bytes, 4_194_304);
        assert_eq!(c.limits.slow_consumer, SlowConsumerPolicy::Close);
        assert_eq!((c.bus.ring_capacity, c.bus.max_batch), (1024, 256));
        assert_eq!((c.sse.keepalive_s, c.sse.retry_ms), (15, 2000));
        assert_eq!(c.shutdown.deadline_s, 10);
        assert_eq!(c.health.unhealthy_threshold, 3);
        assert_eq!(c.circuit.cooldown_ms, 10_000);
        assert_eq!(c.proxy.timeout_ms, 30_000);
        assert_eq!(
            (c.proxy.pool_max_idle, c.proxy.pool_idle_timeout_ms),
            (1024, 30_000)
        );
        assert_eq!(c.rate_limit, RateLimitConfig::default());
        assert!(c.subsystems.is_empty() && c.channels.is_empty());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            load_file("", &[], &[]).expect("empty file"),
            Config::default()
        );
    }

    #[test]
    fn file_beats_defaults() {
        let c = load_file(
            "listen = \"127.0.0.1:1\"\nshards = 3\n[history]\nsize = 5\n",
            &[],
            &[],
        )
        .expect("file loads");
        assert_eq!(c.listen, addr("127.0.0.1:1"));
        assert_eq!(c.shards, 3);
        assert_eq!(c.history.size, 5);
        assert_eq!(
            c.history.ttl_s, 3600,
            "keys the file omits keep their default"
        );
    }

    #[test]
    fn env_beats_file() {
        let c = load_file(
            "listen = \"127.0.0.1:1\"\nshards = 3\n",
            &[],
            &[("RELAY_LISTEN", "127.0.0.1:2"), ("RELAY_SHARDS", "5")],
        )
        .expect("env loads");
        assert_eq!(c.listen, addr("127.0.0.1:2"));
        assert_eq!(c.shards, 5);
    }

    #[test]
    fn flag_beats_env_and_file() {
        let c = load_file(
            "listen = \"127.0.0.1:1\"\nshards = 3\n",
            &["--listen", "127.0.0.1:3", "--shards", "7"],
            &[("RELAY_LISTEN", "127.0.0.1:2"), ("RELAY_SHARDS", "5")],
        )
        .expect("flags load");
        assert_eq!(c.listen, addr("127.0.0.1:3"));
        assert_eq!(c.shards, 7);
        // A flag beats env only for its own key.
        let c = load_file(
            "shards = 3\n",
            &["--shards", "7"],
            &[("RELAY_LISTEN", "127.0.0.1:2")],
        )
        .expect("mixed layers load");
        assert_eq!((c.listen, c.shards), (addr("127.0.0.1:2"), 7));
    }

    #[test]
    fn env_and_flags_reach_driver_and_log() {
        let c = run(&[], &[("RELAY_DRIVER", "io_uring"), ("RELAY_LOG", "debug")])
            .expect("env driver")
            .config;
        assert_eq!((c.driver, c.log.as_str()), (Driver::IoUring, "debug"));
        let c = run(
            &["--driver", "epoll", "--log", "relay=trace"],
            &[("RELAY_DRIVER", "io_uring")],
        )
        .expect("flag driver")
        .config;
        assert_eq!((c.driver, c.log.as_str()), (Driver::Epoll, "relay=trace"));
    }

    #[test]
    fn env_reaches_every_section() {
        let c = run(
            &[],
            &[
                ("RELAY_HISTORY_SIZE", "42"),
                ("RELAY_LIMITS_MAX_CONNECTIONS", "9"),
                ("RELAY_LIMITS_SLOW_CONSUMER", "drop_oldest"),
                ("RELAY_SSE_KEEPALIVE_S", "7"),
                ("RELAY_HISTORY_MAX_EVENTS", "123456"),
                ("RELAY_HEALTH_HEALTHY_THRESHOLD", "4"),
                ("RELAY_RATE_LIMIT_PUBLISH_PER_S", "100"),
                ("RELAY_PROXY_POOL_MAX_IDLE", "64"),
                ("RELAY_AUTH_JWT_SECRET", "s3cret"),
            ],
        )
        .expect("env loads")
        .config;
        assert_eq!(c.history.size, 42);
        assert_eq!(c.limits.max_connections, 9);
        assert_eq!(c.limits.slow_consumer, SlowConsumerPolicy::DropOldest);
        assert_eq!(c.sse.keepalive_s, 7);
        assert_eq!(c.history.max_events, 123_456);
        assert_eq!(c.health.healthy_threshold, 4);
        assert_eq!(c.rate_limit.publish_per_s, 100);
        assert_eq!(c.proxy.pool_max_idle, 64);
        assert_eq!(c.auth.jwt_secret.as_deref(), Some("s3cret"));
    }

    #[test]
    fn env_api_keys_are_comma_separated() {
        let c = run(&[], &[("RELAY_AUTH_API_KEYS", "a,b")])
            .expect("keys load")
            .config;
        assert_eq!(
            c.auth.api_keys,
            Some(vec!["a".to_string(), "b".to_string()])
        );
        let err = run(&[], &[("RELAY_AUTH_API_KEYS", "a,,b")]).expect_err("empty key");
        assert_eq!(
            err.to_string(),
            "environment RELAY_AUTH_API_KEYS: must not contain empty strings"
        );
    }

    #[test]
    fn config_path_from_env_and_flag() {
        let from_env = TempConfig::new("shards = 2\n");
        let from_flag = TempConfig::new("shards = 4\n");
        let loaded = run(&[], &[("RELAY_CONFIG", &from_env.arg())]).expect("env path");
        assert_eq!(loaded.config.shards, 2);
        assert_eq!(loaded.config_path.as_deref(), Some(from_env.path.as_path()));
        let loaded = run(
            &["--config", &from_flag.arg()],
            &[("RELAY_CONFIG", &from_env.arg())],
        )
        .expect("flag path");
        assert_eq!(loaded.config.shards, 4);
        assert_eq!(
            loaded.config_path.as_deref(),
            Some(from_flag.path.as_path())
        );
    }

    fn full_config() -> Config {
        let mut c = Config {
            listen: addr("[::1]:9000"),
            shards: 3,
            driver: Driver::IoUring,
            log: "relay=debug,warn".to_string(),
            ..Config::default()
        };
        c.auth.jwt_secret = Some("secret \"quoted\"".to_string());
        c.auth.api_keys = Some(vec!["k1".to_string(), "k2".to_string()]);
        c.limits.slow_consumer = SlowConsumerPolicy::DropOldest;
        c.rate_limit.proxy_burst = 9;
        c.subsystems.push(SubsystemConfig {
            name: "sift".to_string(),
            instance: "sift-1".to_string(),
            url: "http://127.0.0.1:9001".to_string(),
            routes: vec!["/api/v1/sift".to_string()],
            lb: LbPolicy::LeastOutstanding,
            ttl_ms: Some(5000),
            subscriptions: vec![SubscriptionConfig {
                types: vec!["doc.created".to_string()],
                channels: vec!["doc.*".to_string()],
                path: "/events".to_string(),
            }],
            ..SubsystemConfig::default()
        });
        c.subsystems.push(SubsystemConfig {
            name: "sift".to_string(),
            instance: "sift-2".to_string(),
            url: "http://127.0.0.1:9002".to_string(),
            weight: 3,
            lb: LbPolicy::Weighted,
            ..SubsystemConfig::default()
        });
        c.channels.push(ChannelRule {
            pattern: "doc.*".to_string(),
            presence: false,
            join_leave: true,
            history_size: Some(10),
            history_ttl_s: Some(60),
        });
        c
    }

    #[test]
    fn print_config_round_trips() {
        for config in [Config::default(), full_config()] {
            let text = config.to_toml();
            let back: Config = toml::from_str(&text).expect("to_toml output parses");
            assert_eq!(back, config, "round trip of:\n{text}");
            // And through the real loader, as `relay --config <printed>` would see it.
            assert_eq!(
                load_file(&text, &[], &[]).expect("printed config loads"),
                config
            );
        }
        let text = full_config().to_toml();
        assert!(text.contains("driver = \"io_uring\""), "{text}");
        assert!(text.contains("[[subsystems.subscriptions]]"), "{text}");
        assert!(!Config::default().to_toml().contains("jwt_secret"));
    }

    #[test]
    fn print_config_flag() {
        let loaded = run(&["--print-config", "--shards", "2"], &[]).expect("loads");
        assert!(loaded.print_config);
        assert!(loaded.config.to_toml().contains("shards = 2"));
    }

    #[test]
    fn unknown_key_in_section_names_line_and_key() {
        let (err, shown) = file_error("listen = \"0.0.0.0:1\"\n\n[limits]\nmax_conections = 5\n");
        match &err {
            ConfigError::File { line, key, .. } => {
                assert_eq!(*line, Some(4));
                assert_eq!(key.as_deref(), Some("limits.max_conections"));
            }
            other => panic!("wrong error: {other:?}"),
        }
        assert!(
            shown.starts_with(
                "relay.toml:4: key `limits.max_conections`: unknown key \
                 (expected one of: max_connections, max_connections_per_ip,"
            ),
            "{shown}"
        );
    }

    #[test]
    fn unknown_top_level_key_and_section() {
        let (_, shown) = file_error("shards = 1\nlisen = \"x\"\n");
        assert!(
            shown.starts_with(
                "relay.toml:2: key `lisen`: unknown key (expected one of: listen, shards,"
            ),
            "{shown}"
        );
        let (_, shown) = file_error("[limit]\nmax_connections = 5\n");
        assert!(
            shown.starts_with("relay.toml:1: key `limit`: unknown key"),
            "{shown}"
        );
        let (_, shown) = file_error("limits.nope = 5\n");
        assert!(
            shown.starts_with("relay.toml:1: key `limits.nope`: unknown key"),
            "{shown}"
        );
    }

    #[test]
    fn bad_type_names_line_and_key() {
        let (_, shown) = file_error("shards = 1\n\n[history]\nsize = \"x\"\n");
        assert_eq!(
            shown,
            "relay.toml:4: key `history.size`: invalid type: string \"x\", expected usize"
        );
        let (_, shown) = file_error("[limits]\nslow_consumer = \"later\"\n");
        assert!(
            shown.starts_with("relay.toml:2: key `limits.slow_consumer`: unknown variant `later`"),
            "{shown}"
        );
        let (_, shown) = file_error("listen = \"nope\"\n");
        assert!(
            shown.starts_with("relay.toml:1: key `listen`: invalid socket address"),
            "{shown}"
        );
        let (_, shown) = file_error("shards = -1\n");
        assert!(
            shown.starts_with("relay.toml:1: key `shards`: invalid value"),
            "{shown}"
        );
        let (_, shown) = file_error("[sse]\nretry_ms = 1979-05-27\n");
        assert!(
            shown.starts_with("relay.toml:2: key `sse.retry_ms`: invalid type"),
            "{shown}"
        );
    }

    #[test]
    fn syntax_error_names_line() {
        let (err, shown) = file_error("shards = 1\n[history]\nsize = \n");
        assert!(
            matches!(err, ConfigError::File { line: Some(3), .. }),
            "{err:?}"
        );
        assert!(
            shown.starts_with("relay.toml:3: key `history.size`: "),
            "{shown}"
        );
        let (err, _) = file_error("[limits]\n[limits]\n");
        assert!(
            matches!(err, ConfigError::File { line: Some(2), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn dotted_keys_are_located_by_scanning() {
        // `history.size` makes `history` an implicit table, which toml gives no span for, so the
        // text scanner has to find the keys.
        let text = "history.size = 5\n[[subsystems]]\nname = \"a\"\n\n[[subsystems]]\nname = \"b\"\nweight = \"x\"\n";
        let (_, shown) = file_error(text);
        assert_eq!(
            shown,
            "relay.toml:7: key `subsystems[1].weight`: invalid type: string \"x\", expected u32"
        );
        let text = "history.size = 5\n[[subsystems]]\nname = \"a\"\ninstance = \"a1\"\nurl = \"ftp://x\"\n";
        let (_, shown) = file_error(text);
        assert!(
            shown.starts_with("relay.toml:5: key `subsystems[0].url`: must be an http:// URL"),
            "{shown}"
        );
        let (_, shown) = file_error("history.size = 5\n[limits]\nmax_conections = 1\n");
        assert!(
            shown.starts_with("relay.toml:3: key `limits.max_conections`: unknown key"),
            "{shown}"
        );
    }

    /// On a file the parser can index, the scanner finds the same keys on the same lines.
    #[test]
    fn scan_index_agrees_with_parser_index() {
        let text = format!(
            "{}\n[[subsystems]]\nname = \"x\"\nnote = \"\"\"\n[fake]\nkey = 1\n\"\"\"\nroutes = [\n  \"/a\",\n]\n",
            full_config().to_toml()
        );
        let file = FileSource::new(Path::new("relay.toml"), text.clone());
        assert!(file.index_complete);
        let scanned = scan_index(&text);
        assert!(scanned.len() > 40, "{scanned:?}");
        for (path, span) in &scanned {
            let exact = file
                .index
                .iter()
                .find(|(p, _)| p == path)
                .unwrap_or_else(|| panic!("scanner invented {path}"));
            assert_eq!(
                file.line_at(span.start),
                file.line_at(exact.1.start),
                "{path}"
            );
        }
        assert!(scanned.iter().any(|(p, _)| p == "subsystems[2].routes"));
        assert!(!scanned.iter().any(|(p, _)| p.contains("fake")));
    }

    #[test]
    fn range_violation_in_file_names_line_and_key() {
        let text = "# comment\n[limits]\nmax_connections = 10\n\nidle_timeout_s = 0\n";
        let (err, shown) = file_error(text);
        assert!(matches!(err, ConfigError::File { .. }), "{err:?}");
        assert_eq!(
            shown,
            "relay.toml:5: key `limits.idle_timeout_s`: must be at least 1"
        );
        let (_, shown) = file_error("[history]\nsize = 2000000\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `history.size`: must be between 1 and 1000000"
        );
        let (_, shown) = file_error("shards = 2\nhistory.size = 0\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `history.size`: must be between 1 and 1000000"
        );
        let (_, shown) = file_error("[history]\nmax_events = 0\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `history.max_events`: must be at least 1"
        );
        let (_, shown) = file_error("[proxy]\npool_idle_timeout_ms = 0\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `proxy.pool_idle_timeout_ms`: must be at least 1"
        );
        let (_, shown) = file_error("[bus]\nring_capacity = 1\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `bus.ring_capacity`: must be at least 2"
        );
        let (_, shown) = file_error("[delivery]\nbusy_percent = 5\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `delivery.busy_percent`: must be between 10 and 100"
        );
        let (_, shown) = file_error("[limits]\nmax_frame_bytes = 124\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `limits.max_frame_bytes`: must be at least 125"
        );
        let (_, shown) = file_error("[health]\ninterval_ms = 100\ntimeout_ms = 200\n");
        assert!(
            shown.starts_with("relay.toml:3: key `health.timeout_ms`: must not exceed"),
            "{shown}"
        );
        let (_, shown) = file_error("[circuit]\nconsecutive_failures = 0\n");
        assert!(
            shown.starts_with("relay.toml:2: key `circuit.consecutive_failures`: 0 turns"),
            "{shown}"
        );
        let (_, shown) = file_error("[circuit]\nfailure_rate_percent = 101\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `circuit.failure_rate_percent`: must be between 0 and 100"
        );
        let (_, shown) = file_error("[circuit]\nrate_window_ms = 999\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `circuit.rate_window_ms`: must be between 1000 and 3600000"
        );
        let (_, shown) = file_error("[circuit]\ncooldown_ms = 5000\ncooldown_max_ms = 4000\n");
        assert_eq!(
            shown,
            "relay.toml:3: key `circuit.cooldown_max_ms`: must be at least 5000"
        );
        let (_, shown) = file_error("[auth]\napi_keys = [\"a\", \"\"]\n");
        assert_eq!(
            shown,
            "relay.toml:2: key `auth.api_keys`: must not contain empty strings"
        );
    }

    #[test]
    fn env_fixes_what_the_file_got_wrong() {
        let c = load_file(
            "[limits]\nidle_timeout_s = 0\n",
            &[],
            &[("RELAY_LIMITS_IDLE_TIMEOUT_S", "5")],
        )
        .expect("env override is what gets validated");
        assert_eq!(c.limits.idle_timeout_s, 5);
    }

    #[test]
    fn pin_shards_comes_from_file_and_env_and_a_bad_value_is_named() {
        assert!(Config::default().pin_shards);
        assert!(
            !load_file("pin_shards = false\n", &[], &[])
                .expect("file")
                .pin_shards
        );
        let c = load_file("pin_shards = false\n", &[], &[("RELAY_PIN_SHARDS", "true")])
            .expect("env beats the file");
        assert!(c.pin_shards);
        let err = run(&[], &[("RELAY_PIN_SHARDS", "yes")]).expect_err("not a bool");
        assert_eq!(
            err.to_string(),
            "environment RELAY_PIN_SHARDS: invalid value \"yes\": expected true or false"
        );
        let (_, shown) = file_error("pin_shards = \"no\"\n");
        assert!(
            shown.starts_with("relay.toml:1: key `pin_shards`: invalid type"),
            "{shown}"
        );
    }

    #[test]
    fn bad_env_var_is_named() {
        let err = run(&[], &[("RELAY_SHARDS", "abc")]).expect_err("bad shards");
        assert_eq!(
            err.to_string(),
            "environment RELAY_SHARDS: invalid value \"abc\": expected a non-negative integer"
        );
        let err = run(&[], &[("RELAY_LISTEN", "nope")]).expect_err("bad listen");
        assert_eq!(
            err.to_string(),
            "environment RELAY_LISTEN: invalid socket address \"nope\""
        );
        let err = run(&[], &[("RELAY_DRIVER", "kqueue")]).expect_err("bad driver");
        assert_eq!(
            err.to_string(),
            "environment RELAY_DRIVER: invalid value \"kqueue\": expected one of auto, io_uring, epoll"
        );
        let err = run(&[], &[("RELAY_HEALTH_HEALTHY_THRESHOLD", "4294967296")]).expect_err("u32");
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == "RELAY_HEALTH_HEALTHY_THRESHOLD")
        );
        // Range violations are blamed on the variable, even when the file sets the key too.
        let err = load_file("[history]\nsize = 5\n", &[], &[("RELAY_HISTORY_SIZE", "0")])
            .expect_err("size 0");
        assert_eq!(
            err.to_string(),
            "environment RELAY_HISTORY_SIZE: must be between 1 and 1000000"
        );
        let err = run(&[], &[("RELAY_CONFIG", "")]).expect_err("empty path");
        assert!(err
            .to_string()
            .starts_with("environment RELAY_CONFIG: empty path"));
    }

    #[test]
    fn env_names_in_a_section_must_exist() {
        let err = check_env_names(["PATH", "RELAY_LIMITS_NOPE"]).expect_err("typo");
        assert!(
            err.to_string().starts_with(
                "environment RELAY_LIMITS_NOPE: unknown setting in [limits] (expected one of: \
                 RELAY_LIMITS_MAX_CONNECTIONS,"
            ),
            "{err}"
        );
        check_env_names([
            "RELAY_LIMITS_MAX_CONNECTIONS",
            "RELAY_RATE_LIMIT_PROXY_BURST",
            "RELAY_CONFIG",
            "RELAY_WRAPPER_THING",
            "RELAY_LISTEN",
        ])
        .expect("known and unrelated names pass");
        assert!(check_env_names(["RELAY_RATE_LIMIT_X"]).is_err());
    }

    #[test]
    fn bad_flag_values() {
        let err = run(&["--listen", "nope"], &[]).expect_err("bad listen");
        assert_eq!(
            err.to_string(),
            "flag --listen: invalid socket address \"nope\""
        );
        let err = run(&["--shards", "abc"], &[("RELAY_SHARDS", "4")]).expect_err("bad shards");
        assert_eq!(
            err.to_string(),
            "flag --shards: invalid value \"abc\": expected a non-negative integer"
        );
        let err = run(&["--shards=-2"], &[]).expect_err("negative shards");
        assert!(
            matches!(&err, ConfigError::Flag { flag, .. } if flag == "--shards"),
            "{err:?}"
        );
        match run(&["--driver", "kqueue"], &[]) {
            Err(ConfigError::Clap(e)) => assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue),
            other => panic!("expected a clap error, got {other:?}"),
        }
        match run(&["--bogus"], &[]) {
            Err(ConfigError::Clap(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument)
            }
            other => panic!("expected a clap error, got {other:?}"),
        }
    }

    #[test]
    fn help_and_version_are_clap_errors_that_exit_zero() {
        match run(&["--help"], &[]) {
            Err(ConfigError::Clap(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
                assert_eq!(e.exit_code(), 0);
                let help = e.render().to_string();
                for needle in [
                    "--config <FILE>",
                    "--listen <ADDR>",
                    "--shards <N>",
                    "io_uring",
                    "--print-config",
                    "RELAY_LIMITS_MAX_CONNECTIONS",
                    "-V, --version",
                ] {
                    assert!(help.contains(needle), "help lacks {needle}:\n{help}");
                }
            }
            other => panic!("expected help, got {other:?}"),
        }
        match run(&["-V"], &[]) {
            Err(ConfigError::Clap(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
                assert_eq!(e.exit_code(), 0);
            }
            other => panic!("expected version, got {other:?}"),
        }
    }

    #[test]
    fn subsystems_and_channels_parse_with_defaults() {
        let text = r#"
[[subsystems]]
name = "sift"
instance = "sift-1"
url = "http://127.0.0.1:9001"

[[subsystems.subscriptions]]
types = ["doc.created"]
channels = ["doc.*"]
path = "/events"

[[subsystems]]
name = "sift"
instance = "sift-2"
url = "http://127.0.0.1:9002"
weight = 2
routes = ["/api/v1/sift"]
lb = "weighted"
ttl_ms = 1500

[[channels]]
pattern = "doc.*"

[[channels]]
pattern = "chat.*"
presence = false
join_leave = true
history_size = 50
history_ttl_s = 30
"#;
        let c = load_file(text, &[], &[]).expect("subsystems load");
        assert_eq!(c.subsystems.len(), 2);
        let first = &c.subsystems[0];
        assert_eq!(first.health_path, "/health");
        assert_eq!(first.weight, 1);
        assert!(first.routes.is_empty());
        assert_eq!(first.lb, LbPolicy::RoundRobin);
        assert_eq!(first.ttl_ms, None);
        assert_eq!(first.subscriptions.len(), 1);
        assert_eq!(first.subscriptions[0].path, "/events");
        let second = &c.subsystems[1];
        assert_eq!(
            (second.weight, second.lb, second.ttl_ms),
            (2, LbPolicy::Weighted, Some(1500))
        );
        assert!(second.subscriptions.is_empty());
        assert_eq!(
            c.channels[0],
            ChannelRule {
                pattern: "doc.*".to_string(),
                ..ChannelRule::default()
            }
        );
        assert!(c.channels[0].presence && !c.channels[0].join_leave);
        assert_eq!(c.channels[1].history_size, Some(50));
    }

    #[test]
    fn unknown_key_in_subsystem_names_entry_and_line() {
        let text = "[[subsystems]]\nname = \"a\"\ninstance = \"a1\"\nurl = \"http://h\"\n\n[[subsystems]]\nname = \"b\"\nfoo = 1\n";
        let (err, shown) = file_error(text);
        assert!(
            matches!(&err, ConfigError::File { line: Some(8), key: Some(k), .. } if k == "subsystems[1].foo"),
            "{err:?}"
        );
        assert!(shown.starts_with("relay.toml:8: key `subsystems[1].foo`: unknown key (expected one of: name, instance, url,"), "{shown}");
        // Inline tables are located too.
        let (_, shown) = file_error("subsystems = [\n  { name = \"a\", zz = 1 },\n]\n");
        assert!(
            shown.starts_with("relay.toml:2: key `subsystems[0].zz`: unknown key"),
            "{shown}"
        );
        let (_, shown) = file_error(
            "[[subsystems]]\nname = \"a\"\n[[subsystems.subscriptions]]\npath = \"/e\"\nkind = 1\n",
        );
        assert!(
            shown.starts_with(
                "relay.toml:5: key `subsystems[0].subscriptions[0].kind`: unknown key"
            ),
            "{shown}"
        );
    }

    #[test]
    fn subsystem_rules_name_line_and_key() {
        let ok = "name = \"s\"\ninstance = \"s1\"\nurl = \"http://h:1\"\n";
        let (_, shown) = file_error(&format!(
            "[[subsystems]]\n{}",
            ok.replace("http://", "https://")
        ));
        assert!(
            shown.starts_with("relay.toml:4: key `subsystems[0].url`: must be an http:// URL"),
            "{shown}"
        );
        let (_, shown) = file_error("\n[[subsystems]]\ninstance = \"s1\"\nurl = \"http://h\"\n");
        assert!(
            shown.starts_with("relay.toml:2: key `subsystems[0].name`: required"),
            "{shown}"
        );
        let (_, shown) = file_error(&format!("[[subsystems]]\n{ok}routes = [\"/a\", \"b\"]\n"));
        assert!(
            shown.starts_with(
                "relay.toml:5: key `subsystems[0].routes[1]`: route \"b\" must start with '/'"
            ),
            "{shown}"
        );
        let (_, shown) = file_error(&format!("[[subsystems]]\n{ok}weight = 0\n"));
        assert_eq!(
            shown,
            "relay.toml:5: key `subsystems[0].weight`: must be at least 1"
        );
        let (_, shown) = file_error(&format!("[[subsystems]]\n{ok}\n[[subsystems]]\n{ok}"));
        assert!(
            shown.starts_with("relay.toml:8: key `subsystems[1].instance`: duplicate instance `s1` of subsystem `s` (also subsystems[0])"),
            "{shown}"
        );
        let (_, shown) = file_error("[[subsystems]]\nname = \"bad name\"\n");
        assert!(
            shown.starts_with("relay.toml:2: key `subsystems[0].name`: required; letters"),
            "{shown}"
        );
        let (_, shown) = file_error("[[channels]]\npattern = \"a.*\"\nhistory_size = 0\n");
        assert_eq!(
            shown,
            "relay.toml:3: key `channels[0].history_size`: must be between 1 and 1000000"
        );
        let (_, shown) = file_error("[[channels]]\npresence = false\n");
        assert_eq!(shown, "relay.toml:1: key `channels[0].pattern`: required");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let path = std::env::temp_dir().join("relay-config-test-does-not-exist/relay.toml");
        let arg = path.display().to_string();
        let err = run(&["--config", &arg], &[]).expect_err("missing file");
        assert!(matches!(err, ConfigError::Read { .. }));
        assert_eq!(
            err.to_string(),
            format!("cannot read {arg}: No such file or directory")
        );
    }

    #[test]
    fn history_and_presence_overrides() {
        let c = full_config(); // one rule: doc.* -> presence off, join_leave on, 10 events, 60 s
        let prefix_glob = |pattern: &str, text: &str| match pattern.strip_suffix('*') {
            Some(prefix) => text.starts_with(prefix),
            None => pattern == text,
        };
        assert_eq!(c.history_for("doc.1", prefix_glob), (10, 60));
        assert_eq!(c.presence_for("doc.1", prefix_glob), (false, true));
        assert_eq!(c.history_for("chat.1", prefix_glob), (1000, 3600));
        assert_eq!(c.presence_for("chat.1", prefix_glob), (true, false));

        // First match wins, and an unset override falls back to [history].
        let mut c = Config::default();
        c.history.ttl_s = 99;
        c.channels = vec![
            ChannelRule {
                pattern: "a.*".into(),
                history_size: Some(5),
                ..ChannelRule::default()
            },
            ChannelRule {
                pattern: "a.b".into(),
                history_size: Some(7),
                history_ttl_s: Some(1),
                ..ChannelRule::default()
            },
        ];
        assert_eq!(c.history_for("a.b", prefix_glob), (5, 99));
    }

    #[test]
    fn shard_count_resolves_zero() {
        let mut c = Config::default();
        assert!(c.shard_count() >= 1);
        c.shards = 4;
        assert_eq!(c.shard_count(), 4);
    }

    #[test]
    fn defaults_are_valid() {
        let origins = Origins {
            file: None,
            env: HashMap::new(),
            flags: HashMap::new(),
        };
        validate(&Config::default(), &origins).expect("defaults validate");
        validate(&full_config(), &origins).expect("full config validates");
    }

    /// Every scalar `Config` serialises (with all options set) has an env setting of the right
    /// kind and vice versa, so a new field cannot be left out of the environment layer.
    #[test]
    fn settings_cover_every_scalar() {
        let table = toml::Table::try_from(full_config()).expect("config serialises");
        let mut seen = Vec::new();
        for (key, value) in &table {
            match value {
                toml::Value::Table(section) => {
                    for (inner, value) in section {
                        // An array of tables, not a scalar setting.
                        if key == "rate_limit" && inner == "routes" {
                            continue;
                        }
                        seen.push((key.clone(), inner.clone(), value.clone()));
                    }
                }
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {}
                _ => seen.push((String::new(), key.clone(), value.clone())),
            }
        }
        assert_eq!(seen.len(), SETTINGS.len(), "settings: {}", SETTINGS.len());
        for (section, key, value) in seen {
            let setting = SETTINGS
                .iter()
                .find(|s| s.section == section && s.key == key)
                .unwrap_or_else(|| panic!("no env setting for {section}.{key}"));
            let ok = match (setting.kind, &value) {
                (Kind::Int { .. }, toml::Value::Integer(_)) => true,
                (Kind::Str | Kind::Addr, toml::Value::String(_)) => true,
                (Kind::StrList, toml::Value::Array(_)) => true,
                (Kind::Bool, toml::Value::Boolean(_)) => true,
                (Kind::Choice(choices), toml::Value::String(s)) => choices.contains(&s.as_str()),
                _ => false,
            };
            assert!(
                ok,
                "{section}.{key}: kind {:?} does not fit {value:?}",
                setting.kind
            );
        }
    }
}
