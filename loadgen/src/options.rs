//! What one run does: the scenario, its numbers, and every bound.
//!
//! Owns `Options` (the library's input, also echoed in the report as the config used), each
//! scenario's defaults, the kind of server driven (relay, or nats-server for comparison), and
//! validation. **Invariant:** `Options::validate` is the one place
//! that decides whether a combination makes sense; the rest of the crate trusts a validated
//! `Options`. Secrets (`token`, `api_key`) are never serialised.

use std::net::SocketAddr;

use serde::Serialize;

use crate::clock::{Ramp, MAX_STEPS};
use crate::error::LoadgenError;

/// The default target, relay's default port on this host.
pub const DEFAULT_TARGET: &str = "127.0.0.1:8004";
/// The default target with `--target-kind nats`: nats-server's WebSocket listener as
/// `loadgen/nats-bench.conf` sets it up.
pub const DEFAULT_NATS_TARGET: &str = "127.0.0.1:8080";
/// nats-server's client (TCP) port, where NATS-mode publishers send `PUB`.
pub const DEFAULT_NATS_PUBLISH: &str = "127.0.0.1:4222";
/// NATS mode keeps a sequence tracker per publisher on every subscription; this bounds
/// `subscribers * publishers` (and `channels * publishers`, the publishers' counters).
pub const MAX_NATS_SEQ_SLOTS: usize = 4_000_000;
/// Connections per source address when spreading is automatic: below relay's default
/// `max_connections_per_ip` (10000) with room for the publishers.
pub const AUTO_CONNS_PER_SOURCE_IP: usize = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One channel, many subscribers, a rate ramp.
    Fanout,
    /// Many channels, one subscriber each.
    Channels,
    /// A fixed moderate load, for latency percentiles.
    Latency,
    /// Publishing alone (no subscribers).
    Ingest,
    /// WebSocket handshakes per second.
    Connect,
    /// Idle subscribed connections and the relay's memory per connection.
    Idle,
    /// Like latency, with SSE subscribers.
    Sse,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Channels => "channels",
            Scenario::Latency => "latency",
            Scenario::Ingest => "ingest",
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
            Scenario::Sse => "sse",
        }
    }

    /// Scenarios with subscribers receiving published events.
    pub fn delivers(self) -> bool {
        matches!(
            self,
            Scenario::Fanout | Scenario::Channels | Scenario::Latency | Scenario::Sse
        )
    }

    /// Scenarios that publish.
    pub fn publishes(self) -> bool {
        self.delivers() || self == Scenario::Ingest
    }
}

/// How subscribers receive events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Ws,
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "WebSocket",
            Transport::Sse => "SSE",
        }
    }
}

/// The kind of server driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// relay: its WebSocket/SSE API and its HTTP or WebSocket publish API.
    Relay,
    /// nats-server: subscribers over its WebSocket listener (`--target`), publishers sending
    /// `PUB` over its client port (`--nats-publish-addr`); see the `nats` module.
    Nats,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Relay => "relay",
            TargetKind::Nats => "nats",
        }
    }

    /// The server's name in messages and the table.
    pub fn server_name(self) -> &'static str {
        match self {
            TargetKind::Relay => "relay",
            TargetKind::Nats => "nats-server",
        }
    }
}

/// How publishers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    Http,
    Ws,
}

impl PublishVia {
    pub fn name(self) -> &'static str {
        match self {
            PublishVia::Http => "HTTP",
            PublishVia::Ws => "WebSocket",
        }
    }
}

/// How the connect scenario ends each connection after its `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CloseMode {
    /// A close frame, then wait for the server's close and its FIN: what a well-behaved
    /// client does (the TIME_WAIT stays on the server's side).
    Graceful,
    /// An abortive close (`SO_LINGER` 0, so the kernel sends a RST): what a client that
    /// vanishes does. It measures the handshake without the teardown's four extra segments,
    /// and the server's reset path.
    Reset,
}

impl CloseMode {
    pub fn name(self) -> &'static str {
        match self {
            CloseMode::Graceful => "graceful",
            CloseMode::Reset => "reset",
        }
    }
}

/// The generator's own I/O driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// io_uring, falling back to epoll when the kernel refuses it.
    Auto,
    #[value(name = "io_uring", alias = "iouring")]
    IoUring,
    Epoll,
}

/// The publish rate of each step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RatePlan {
    /// Events per second, open loop, one step of `duration_s`.
    Fixed(u64),
    /// Steps of `step_s` each at geometrically rising rates (open loop).
    Ramp(Ramp),
    /// Closed loop: every publisher keeps its pipeline full (`--rate 0`).
    Unlimited,
}

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub scenario: Scenario,
    /// What `target` is: relay, or nats-server (its WebSocket listener).
    pub target_kind: TargetKind,
    /// The server to drive (with `Nats`, nats-server's WebSocket listener); with
    /// `nats_publish_target()` in NATS mode, the only addresses ever contacted.
    pub target: SocketAddr,
    /// NATS mode: nats-server's client port for the publishers; `None` =
    /// [`DEFAULT_NATS_PUBLISH`]. Only valid with `TargetKind::Nats`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_publish_addr: Option<SocketAddr>,
    /// Generator threads (one runtime each); 0 = the CPUs in this process's affinity mask.
    pub threads: usize,
    pub driver: Driver,
    /// Pin thread i to `pin_cpus[i % len]`; empty = no pinning.
    pub pin_cpus: Vec<usize>,
    /// Spread connections over 127.0.0.1..=127.0.0.N; 0 = automatic (loopback targets only).
    pub source_ips: usize,
    /// JWT for WebSocket/SSE (and WebSocket publishing).
    #[serde(skip)]
    pub token: Option<String>,
    /// API key for HTTP publishing.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Bytes of each event's `data`.
    pub event_bytes: usize,
    /// Length of a fixed-rate run (delivery, ingest, connect without a ramp).
    pub duration_s: f64,

    // Delivery and ingest.
    pub subscribers: usize,
    pub channels: usize,
    pub transport: Transport,
    pub publishers: usize,
    pub publish_via: PublishVia,
    /// Events per HTTP request, at most (1 = single-envelope bodies).
    pub batch: usize,
    /// Requests (or WebSocket publish messages) in flight per publisher, at most.
    pub pipeline: usize,
    pub rate: RatePlan,
    /// Length of each ramp step (rate ramp, or concurrency ramp for connect).
    pub step_s: f64,
    /// The ramp stops after a step whose p99 is above this.
    pub stop_p99_ms: f64,

    // Connect.
    pub concurrency: usize,
    pub concurrency_ramp: Option<Ramp>,
    pub close: CloseMode,

    // Idle.
    /// Connection counts to hold, in increasing order.
    pub idle_steps: Vec<usize>,
    /// Wait after the last connection subscribed before reading the relay's RSS.
    pub settle_s: f64,
    /// The relay's pid; `None` = find the process listening on the target port.
    pub server_pid: Option<u32>,

    // Bounds.
    pub connect_timeout_ms: u64,
    /// For all subscribers of a phase together.
    pub subscribe_timeout_s: f64,
    /// After publishing stops, how long to wait for acks and deliveries.
    pub drain_ms: u64,
    /// Hard bound on the whole run; `None` = planned length + setup and drain bounds + 30 s.
    pub deadline_s: Option<f64>,
    /// Connection setups in progress per thread, at most.
    pub setup_concurrency: usize,
    /// Print the live progress line on stderr.
    pub progress: bool,
}

impl Options {
    /// The scenario's defaults against `DEFAULT_TARGET`.
    pub fn new(scenario: Scenario) -> Options {
        let mut o = Options {
            scenario,
            target_kind: TargetKind::Relay,
            target: DEFAULT_TARGET.parse().expect("constant address"),
            nats_publish_addr: None,
            threads: 0,
            driver: Driver::Auto,
            pin_cpus: Vec::new(),
            source_ips: 0,
            token: None,
            api_key: None,
            event_bytes: 100,
            duration_s: 10.0,
            subscribers: 0,
            channels: 1,
            transport: Transport::Ws,
            publishers: 0,
            publish_via: PublishVia::Http,
            batch: 1,
            pipeline: 32,
            rate: RatePlan::Fixed(1000),
            step_s: 5.0,
            stop_p99_ms: 100.0,
            concurrency: 16,
            concurrency_ramp: None,
            close: CloseMode::Graceful,
            idle_steps: vec![1000],
            settle_s: 2.0,
            server_pid: None,
            connect_timeout_ms: 5000,
            subscribe_timeout_s: 60.0,
            drain_ms: 2000,
            deadline_s: None,
            setup_concurrency: 64,
            progress: true,
        };
        match scenario {
            Scenario::Fanout => {
                o.subscribers = 1000;
                o.channels = 1;
                o.publishers = 2;
                o.rate = RatePlan::Ramp(Ramp {
                    start: 1000,
                    end: 64000,
                    factor: 2.0,
                });
            }
            Scenario::Channels => {
                o.channels = 5000;
                o.subscribers = 5000;
                o.publishers = 4;
                o.rate = RatePlan::Fixed(20_000);
            }
            Scenario::Latency | Scenario::Sse => {
                o.subscribers = 100;
                o.channels = 10;
                o.publishers = 10;
                o.rate = RatePlan::Fixed(5000);
                if scenario == Scenario::Sse {
                    o.transport = Transport::Sse;
                }
            }
            Scenario::Ingest => {
                o.channels = 16;
                o.publishers = 4;
                o.batch = 100;
                o.pipeline = 8;
                o.rate = RatePlan::Unlimited;
            }
            Scenario::Connect => {
                o.step_s = 3.0;
            }
            Scenario::Idle => {
                o.channels = 100;
            }
        }
        o
    }

    /// The scenario's defaults against `target`.
    pub fn with_target(scenario: Scenario, target: SocketAddr) -> Options {
        Options {
            target,
            ..Options::new(scenario)
        }
    }

    /// The scenario's defaults against nats-server: subscribers on its WebSocket listener
    /// `ws_target`, publishers on its client port `publish`.
    pub fn nats(scenario: Scenario, ws_target: SocketAddr, publish: SocketAddr) -> Options {
        Options {
            target_kind: TargetKind::Nats,
            target: ws_target,
            nats_publish_addr: Some(publish),
            ..Options::new(scenario)
        }
    }

    /// Where NATS-mode publishers connect.
    pub fn nats_publish_target(&self) -> SocketAddr {
        self.nats_publish_addr
            .unwrap_or_else(|| DEFAULT_NATS_PUBLISH.parse().expect("constant address"))
    }

    /// Where publishers connect.
    pub fn publish_target(&self) -> SocketAddr {
        match self.target_kind {
            TargetKind::Relay => self.target,
            TargetKind::Nats => self.nats_publish_target(),
        }
    }

    /// How publishers publish, for the table.
    pub fn publish_wire_name(&self) -> &'static str {
        match self.target_kind {
            TargetKind::Relay => self.publish_via.name(),
            TargetKind::Nats => "NATS PUB over TCP",
        }
    }

    /// Threads to run (resolving 0 to the CPUs this process may use).
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Subscriber connections the run opens (the largest idle step for `idle`).
    pub fn subscriber_connections(&self) -> usize {
        match self.scenario {
            Scenario::Idle => self.idle_steps.iter().copied().max().unwrap_or(0),
            s if s.delivers() => self.subscribers,
            _ => 0,
        }
    }

    /// Connections open at once, at most.
    pub fn max_connections(&self) -> usize {
        let publishers = if self.scenario.publishes() {
            self.publishers
        } else {
            0
        };
        let connectors = if self.scenario == Scenario::Connect {
            self.concurrency_steps().into_iter().max().unwrap_or(0)
        } else {
            0
        };
        self.subscriber_connections() + publishers + connectors
    }

    /// Source addresses to spread over (resolving 0 = automatic).
    pub fn source_ip_count(&self) -> usize {
        if self.source_ips > 0 {
            return self.source_ips;
        }
        if loopback_v4(self.target) {
            self.max_connections()
                .div_ceil(AUTO_CONNS_PER_SOURCE_IP)
                .clamp(1, 254)
        } else {
            1
        }
    }

    /// Rates of the publish steps (one entry for a fixed or unlimited rate; 0 = unlimited).
    pub fn rate_steps(&self) -> Vec<u64> {
        match self.rate {
            RatePlan::Fixed(r) => vec![r],
            RatePlan::Ramp(ramp) => ramp.steps().unwrap_or_default(),
            RatePlan::Unlimited => vec![0],
        }
    }

    /// Length of each publish step.
    pub fn publish_step_s(&self) -> f64 {
        match self.rate {
            RatePlan::Ramp(_) => self.step_s,
            _ => self.duration_s,
        }
    }

    /// Concurrency of each connect step.
    pub fn concurrency_steps(&self) -> Vec<usize> {
        match self.concurrency_ramp {
            Some(r) => r
                .steps()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as usize)
                .collect(),
            None => vec![self.concurrency],
        }
    }

    /// Length of each connect step.
    pub fn connect_step_s(&self) -> f64 {
        if self.concurrency_ramp.is_some() {
            self.step_s
        } else {
            self.duration_s
        }
    }

    /// The hard bound on the whole run.
    pub fn deadline(&self) -> f64 {
        if let Some(d) = self.deadline_s {
            return d;
        }
        let drain = self.drain_ms as f64 / 1000.0;
        let setup = self.subscribe_timeout_s + self.connect_timeout_ms as f64 / 1000.0;
        let planned = match self.scenario {
            s if s.publishes() => self.rate_steps().len() as f64 * (self.publish_step_s() + drain),
            Scenario::Connect => self.concurrency_steps().len() as f64 * self.connect_step_s(),
            Scenario::Idle => {
                self.idle_steps.len() as f64 * (self.subscribe_timeout_s + self.settle_s)
            }
            _ => 0.0,
        };
        setup + planned + drain + 30.0
    }

    /// Checks every number and combination; the message says which flag is wrong.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |m: String| Err(LoadgenError::Config(m));
        let s = self.scenario;
        if self.threads > 1024 {
            return bad(format!("--threads {} is above 1024", self.threads));
        }
        if self.source_ips > 254 {
            return bad(format!(
                "--source-ips {} is above 254 (127.0.0.1 ..= 127.0.0.254)",
                self.source_ips
            ));
        }
        if self.source_ips > 1 && !loopback_v4(self.target) {
            return bad(format!(
                "--source-ips spreads over 127.0.0.x, which only reaches a loopback target; {} is not one",
                self.target
            ));
        }
        self.validate_target_kind()?;
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return bad(format!(
                "--duration-s must be above 0, got {}",
                self.duration_s
            ));
        }
        if self.event_bytes > 60_000 {
            return bad(format!(
                "--event-bytes {} is above 60000 (relay's frame limit is 64 KiB by default)",
                self.event_bytes
            ));
        }
        if !(self.step_s.is_finite() && self.step_s > 0.0) {
            return bad(format!("--step-s must be above 0, got {}", self.step_s));
        }
        if self.connect_timeout_ms == 0 {
            return bad("--connect-timeout-ms must be above 0".into());
        }
        if !(self.subscribe_timeout_s.is_finite() && self.subscribe_timeout_s > 0.0) {
            return bad("--subscribe-timeout-s must be above 0".into());
        }
        if self.setup_concurrency == 0 {
            return bad("setup concurrency must be above 0".into());
        }
        if let Some(d) = self.deadline_s {
            if !(d.is_finite() && d > 0.0) {
                return bad(format!("--deadline-s must be above 0, got {d}"));
            }
        }
        if s.publishes() {
            if self.publishers == 0 || self.publishers > 10_000 {
                return bad(format!(
                    "--publishers must be 1..=10000, got {}",
                    self.publishers
                ));
            }
            if self.channels == 0 || self.channels > 1_000_000 {
                return bad(format!(
                    "--channels must be 1..=1000000, got {}",
                    self.channels
                ));
            }
            if self.batch == 0 || self.batch > 10_000 {
                return bad(format!("--batch must be 1..=10000, got {}", self.batch));
            }
            if self.batch > 1 && self.publish_via == PublishVia::Ws {
                return bad(
                    "--batch needs --publish-via http: the WebSocket publish op carries one event"
                        .into(),
                );
            }
            if self.pipeline == 0 || self.pipeline > 4096 {
                return bad(format!(
                    "--pipeline must be 1..=4096, got {}",
                    self.pipeline
                ));
            }
            match self.rate {
                RatePlan::Fixed(0) => return bad("a fixed rate must be above 0".into()),
                RatePlan::Ramp(r) => {
                    r.steps().map_err(LoadgenError::Config)?;
                }
                _ => {}
            }
            if !(self.stop_p99_ms.is_finite() && self.stop_p99_ms > 0.0) {
                return bad("--stop-p99-ms must be above 0".into());
            }
        }
        if s.delivers() && (self.subscribers == 0 || self.subscribers > 1_000_000) {
            return bad(format!(
                "--subscribers must be 1..=1000000, got {}",
                self.subscribers
            ));
        }
        if s == Scenario::Connect {
            if self.concurrency == 0 || self.concurrency > 100_000 {
                return bad(format!(
                    "--concurrency must be 1..=100000, got {}",
                    self.concurrency
                ));
            }
            if let Some(r) = self.concurrency_ramp {
                r.steps().map_err(LoadgenError::Config)?;
            }
        }
        if s == Scenario::Idle {
            if self.idle_steps.is_empty() || self.idle_steps.len() > MAX_STEPS {
                return bad(format!("--steps needs 1..={MAX_STEPS} connection counts"));
            }
            if self.idle_steps.windows(2).any(|w| w[0] >= w[1]) || self.idle_steps[0] == 0 {
                return bad(format!(
                    "--steps must be increasing and above 0, got {:?}",
                    self.idle_steps
                ));
            }
            if self.channels == 0 {
                return bad("--channels must be above 0".into());
            }
            if !(self.settle_s.is_finite() && self.settle_s >= 0.0) {
                return bad("--settle-s must be 0 or more".into());
            }
        }
        Ok(())
    }

    /// What NATS mode supports, and the relay-only flags it refuses (`--batch` and
    /// `--pipeline` keep their meaning: PUBs per PING, PINGs awaiting their PONG).
    fn validate_target_kind(&self) -> Result<(), LoadgenError> {
        let bad = |m: String| Err(LoadgenError::Config(m));
        let s = self.scenario;
        if self.target_kind == TargetKind::Relay {
            if self.nats_publish_addr.is_some() {
                return bad("--nats-publish-addr needs --target-kind nats".into());
            }
            return Ok(());
        }
        if s == Scenario::Sse
            || ((s.delivers() || s == Scenario::Idle) && self.transport == Transport::Sse)
        {
            return bad(
                "--target-kind nats has no SSE subscribers (nats-server speaks WebSocket); use \
                 the latency scenario"
                    .into(),
            );
        }
        if s.publishes() && self.publish_via == PublishVia::Ws {
            return bad(
                "--publish-via ws is relay's WebSocket publish op; with --target-kind nats \
                 publishers always send PUB over TCP to --nats-publish-addr"
                    .into(),
            );
        }
        if self.api_key.is_some() {
            return bad(
                "--api-key is relay's HTTP publish credential; with --target-kind nats pass \
                 --token, sent as auth_token in CONNECT"
                    .into(),
            );
        }
        if let Some(t) = &self.token {
            if t.bytes()
                .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control())
            {
                return bad(
                    "--token must not contain quotes, backslashes or control characters with \
                     --target-kind nats (it is written into CONNECT's JSON as is)"
                        .into(),
                );
            }
        }
        let publish = self.nats_publish_target();
        if s.publishes() && self.source_ip_count() > 1 && !loopback_v4(publish) {
            return bad(format!(
                "--source-ips spreads over 127.0.0.x, which only reaches a loopback \
                 --nats-publish-addr; {publish} is not one"
            ));
        }
        if s.publishes() {
            let slots = self
                .subscriber_connections()
                .max(self.channels)
                .saturating_mul(self.publishers);
            if slots > MAX_NATS_SEQ_SLOTS {
                return bad(format!(
                    "with --target-kind nats every subscription tracks a sequence per \
                     publisher: --publishers × max(--subscribers, --channels) must be at most \
                     {MAX_NATS_SEQ_SLOTS}, got {slots}"
                ));
            }
        }
        Ok(())
    }
}

/// An IPv4 loopback address (what `--source-ips` can reach from 127.0.0.x).
fn loopback_v4(a: SocketAddr) -> bool {
    a.ip().is_loopback() && a.is_ipv4()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_defaults_are_valid() {
        for s in [
            Scenario::Fanout,
            Scenario::Channels,
            Scenario::Latency,
            Scenario::Ingest,
            Scenario::Connect,
            Scenario::Idle,
            Scenario::Sse,
        ] {
            let o = Options::new(s);
            o.validate().unwrap_or_else(|e| panic!("{}: {e}", s.name()));
            assert!(o.deadline() > 30.0);
        }
        let f = Options::new(Scenario::Fanout);
        assert_eq!(
            f.rate_steps(),
            vec![1000, 2000, 4000, 8000, 16000, 32000, 64000]
        );
        assert_eq!(Options::new(Scenario::Ingest).rate_steps(), vec![0]);
        assert_eq!(Options::new(Scenario::Sse).transport, Transport::Sse);
    }

    #[test]
    fn source_ips_spread_large_loopback_runs() {
        let mut o = Options::new(Scenario::Idle);
        o.idle_steps = vec![1000, 19000];
        assert_eq!(o.source_ip_count(), 3);
        o.idle_steps = vec![100];
        assert_eq!(o.source_ip_count(), 1);
        o.source_ips = 7;
        assert_eq!(o.source_ip_count(), 7);
        o.source_ips = 0;
        o.idle_steps = vec![50_000];
        o.target = "10.0.0.1:8004".parse().unwrap();
        assert_eq!(o.source_ip_count(), 1, "not loopback: never spread");
        o.source_ips = 2;
        assert!(o.validate().is_err());
    }

    #[test]
    fn validation_names_the_flag() {
        let mut o = Options::new(Scenario::Latency);
        o.publish_via = PublishVia::Ws;
        o.batch = 10;
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("--batch"), "{e}");
        let mut o = Options::new(Scenario::Idle);
        o.idle_steps = vec![5, 5];
        assert!(o.validate().unwrap_err().to_string().contains("--steps"));
        let mut o = Options::new(Scenario::Fanout);
        o.subscribers = 0;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--subscribers"));
        let mut o = Options::new(Scenario::Channels);
        o.rate = RatePlan::Fixed(0);
        assert!(o.validate().is_err());
    }

    #[test]
    fn nats_mode_supports_the_delivery_scenarios_and_refuses_relay_only_flags() {
        let ws: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let publish: SocketAddr = "127.0.0.1:4222".parse().unwrap();
        for s in [
            Scenario::Fanout,
            Scenario::Latency,
            Scenario::Channels,
            Scenario::Idle,
            Scenario::Ingest,
            Scenario::Connect,
        ] {
            let o = Options::nats(s, ws, publish);
            o.validate().unwrap_or_else(|e| panic!("{}: {e}", s.name()));
            assert_eq!(o.publish_target(), publish);
        }
        let refused = |o: &Options, flag: &str| {
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        };
        refused(&Options::nats(Scenario::Sse, ws, publish), "SSE");
        let mut o = Options::nats(Scenario::Latency, ws, publish);
        o.transport = Transport::Sse;
        refused(&o, "SSE");
        let mut o = Options::nats(Scenario::Latency, ws, publish);
        o.publish_via = PublishVia::Ws;
        refused(&o, "--publish-via");
        let mut o = Options::nats(Scenario::Latency, ws, publish);
        o.api_key = Some("k".into());
        refused(&o, "--api-key");
        let mut o = Options::nats(Scenario::Latency, ws, publish);
        o.token = Some("a\"b".into());
        refused(&o, "--token");
        o.token = Some("fine-token".into());
        o.validate().unwrap();
        let mut o = Options::nats(Scenario::Fanout, ws, publish);
        o.subscribers = 1_000_000;
        o.publishers = 100;
        refused(&o, "--publishers");
        let mut o = Options::nats(Scenario::Latency, ws, "10.0.0.1:4222".parse().unwrap());
        o.source_ips = 2;
        refused(&o, "--nats-publish-addr");
        // The publish address belongs to NATS mode only.
        let mut o = Options::new(Scenario::Latency);
        o.nats_publish_addr = Some(publish);
        refused(&o, "--target-kind nats");
        // The default publish address, and the kind in the echoed config.
        let mut o = Options::nats(Scenario::Latency, ws, publish);
        o.nats_publish_addr = None;
        assert_eq!(o.publish_target(), DEFAULT_NATS_PUBLISH.parse().unwrap());
        let json = serde_json::to_string(&o).unwrap();
        assert!(json.contains("\"target_kind\":\"nats\""), "{json}");
        assert_eq!(o.publish_wire_name(), "NATS PUB over TCP");
    }

    #[test]
    fn secrets_are_not_serialised() {
        let mut o = Options::new(Scenario::Latency);
        o.token = Some("secret-token".into());
        o.api_key = Some("secret-key".into());
        let json = serde_json::to_string(&o).unwrap();
        assert!(!json.contains("secret"), "{json}");
        assert!(json.contains("\"scenario\":\"latency\""));
    }
}
