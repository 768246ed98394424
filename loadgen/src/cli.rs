//! The command line: one subcommand per scenario, flags that change its numbers.
//!
//! Owns turning `argv` into `Options`. Every flag is optional; what is not given keeps the
//! scenario's default from `Options::new` (the help text names them). Must never: accept a
//! flag and ignore it silently (a flag that does not apply to a scenario is not offered by its
//! subcommand).

use std::net::{SocketAddr, ToSocketAddrs};

use clap::{Args, Parser, Subcommand};

use crate::clock::Ramp;
use crate::options::{
    CloseMode, Driver, Options, PublishVia, RatePlan, Scenario, TargetKind, Transport,
    DEFAULT_NATS_TARGET,
};

#[derive(Debug, Parser)]
#[command(
    name = "relay-loadgen",
    version,
    about = "Open-loop load generator for relay: WebSocket/SSE subscribers, HTTP/WebSocket \
             publishers, latency from each event's scheduled send time (no coordinated omission). \
             With --target-kind nats it drives nats-server the same way, for comparison.",
    after_help = "Run `relay-loadgen <SCENARIO> --help` for a scenario's flags and defaults."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One channel, many subscribers, a rising publish rate; finds the highest rate with p99
    /// <= 10 ms and <= 100 ms without loss. Defaults: 1000 subscribers, ramp 1000:64000:2,
    /// 5 s steps, 2 publishers.
    Fanout(Delivery),
    /// Many channels with one subscriber each. Defaults: 5000 channels and subscribers,
    /// 20000 events/s, 4 publishers, 10 s.
    Channels(Delivery),
    /// A fixed moderate load for latency percentiles. Defaults: 100 subscribers on 10
    /// channels, 10 publishers, 5000 events/s, 10 s.
    Latency(Delivery),
    /// Like latency, with SSE subscribers (GET /api/v1/relay/events/stream).
    Sse(Delivery),
    /// Publishing alone, no subscribers: accepted events/s. Defaults: 4 publishers, HTTP
    /// batches of 100, 16 channels, --rate 0 (closed loop, as fast as possible), 10 s.
    Ingest(Ingest),
    /// WebSocket handshakes/s: connect, upgrade, read welcome, close. Defaults: 16
    /// concurrent connectors, 10 s (or --ramp over concurrency, 3 s steps).
    Connect(Connect),
    /// Hold idle subscribed WebSocket connections and report the server's RSS per connection.
    /// Defaults: 1000 connections on 100 channels, 2 s settle.
    Idle(Idle),
}

/// Flags every scenario has.
#[derive(Debug, Args)]
pub struct Common {
    /// The server to drive: relay, or with --target-kind nats nats-server's WebSocket listener
    /// (only this address is contacted, and --nats-publish-addr in NATS mode) [default:
    /// 127.0.0.1:8004; 127.0.0.1:8080 with --target-kind nats]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub target: Option<SocketAddr>,
    /// What --target is: relay, or nats-server (subscribers over its WebSocket listener,
    /// publishers sending PUB to --nats-publish-addr) [default: relay]
    #[arg(long, value_enum)]
    pub target_kind: Option<TargetKind>,
    /// Length of a fixed-rate run, seconds [default: 10]
    #[arg(long, value_name = "S")]
    pub duration_s: Option<f64>,
    /// Generator threads, one runtime each [default: the CPUs in the affinity mask]
    #[arg(long)]
    pub threads: Option<usize>,
    /// The generator's own I/O driver [default: auto = io_uring, else epoll]
    #[arg(long, value_enum)]
    pub driver: Option<Driver>,
    /// Pin generator thread i to the i-th CPU of this list (e.g. 1,3)
    #[arg(long, value_name = "CPUS", value_delimiter = ',')]
    pub pin_cpus: Vec<usize>,
    /// Spread connections over 127.0.0.1..=127.0.0.N (bound before connect) to pass the
    /// ephemeral-port and per-IP connection limits [default: one address per 9000 connections
    /// on a loopback target, else 1]
    #[arg(long, value_name = "N")]
    pub source_ips: Option<usize>,
    /// JWT for WebSocket/SSE connections (and WebSocket publishing), sent as Bearer
    #[arg(long, env = "RELAY_LOADGEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// API key for HTTP publishing, sent as Bearer
    #[arg(long, env = "RELAY_LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print exactly one JSON object on stdout instead of the table
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr
    #[arg(long, short)]
    pub quiet: bool,
    /// Bound on each TCP connect plus upgrade, milliseconds [default: 5000]
    #[arg(long, value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Bound on getting every subscriber subscribed, seconds [default: 60]
    #[arg(long, value_name = "S")]
    pub subscribe_timeout_s: Option<f64>,
    /// After each step, how long to wait for acks and deliveries, milliseconds [default: 2000]
    #[arg(long, value_name = "MS")]
    pub drain_ms: Option<u64>,
    /// Hard bound on the whole run, seconds [default: planned length + setup and drain
    /// bounds + 30]
    #[arg(long, value_name = "S")]
    pub deadline_s: Option<f64>,
    /// Connection setups in flight per thread [default: 64]
    #[arg(long, value_name = "N")]
    pub setup_concurrency: Option<usize>,
}

/// Flags of the scenarios that publish.
#[derive(Debug, Args)]
pub struct Publish {
    /// Publisher connections
    #[arg(long)]
    pub publishers: Option<usize>,
    /// With --target-kind nats: nats-server's client (TCP) port the publishers send PUB to
    /// [default: 127.0.0.1:4222]
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub nats_publish_addr: Option<SocketAddr>,
    /// How publishers publish [default: http]
    #[arg(long, value_enum)]
    pub publish_via: Option<PublishVia>,
    /// Events per HTTP request at most; above 1 bodies are JSON arrays (NATS: PUBs per PING)
    #[arg(long)]
    pub batch: Option<usize>,
    /// Requests in flight per publisher connection (NATS: PINGs awaiting their PONG)
    /// [default: 32; ingest 8]
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// Bytes of each event's data (timestamp plus padding) [default: 100]
    #[arg(long)]
    pub event_bytes: Option<usize>,
    /// Events per second over all publishers, open loop; 0 = closed loop, as fast as the
    /// relay answers
    #[arg(long, conflicts_with = "ramp")]
    pub rate: Option<u64>,
    /// Rate steps START:END:FACTOR (e.g. 1000:64000:2), each --step-s long
    #[arg(long, value_name = "START:END:FACTOR")]
    pub ramp: Option<Ramp>,
    /// Length of each ramp step, seconds [default: 5]
    #[arg(long, value_name = "S")]
    pub step_s: Option<f64>,
    /// Stop the ramp after a step whose p99 is above this, milliseconds [default: 100]
    #[arg(long, value_name = "MS")]
    pub stop_p99_ms: Option<f64>,
}

#[derive(Debug, Args)]
pub struct Delivery {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: Publish,
    /// Subscriber connections (each subscribed to one channel, round robin)
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Channels the events are spread over
    #[arg(long)]
    pub channels: Option<usize>,
    /// How subscribers receive [default: ws; sse for the sse scenario]
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
}

#[derive(Debug, Args)]
pub struct Ingest {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: Publish,
    /// Channels the events are spread over
    #[arg(long)]
    pub channels: Option<usize>,
}

#[derive(Debug, Args)]
pub struct Connect {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent connectors, each doing handshakes back to back
    #[arg(long, conflicts_with = "ramp")]
    pub concurrency: Option<usize>,
    /// Concurrency steps START:END:FACTOR, each --step-s long
    #[arg(long, value_name = "START:END:FACTOR")]
    pub ramp: Option<Ramp>,
    /// Length of each ramp step, seconds [default: 3]
    #[arg(long, value_name = "S")]
    pub step_s: Option<f64>,
    /// How each connection ends after its welcome: a close frame and the server's close
    /// (graceful), or an abortive close that sends a RST (reset) [default: graceful]
    #[arg(long, value_enum)]
    pub close: Option<CloseMode>,
}

#[derive(Debug, Args)]
pub struct Idle {
    #[command(flatten)]
    pub common: Common,
    /// Idle subscribed connections to hold
    #[arg(long, conflicts_with = "steps")]
    pub connections: Option<usize>,
    /// Several counts in increasing order, measured one after the other (e.g.
    /// 1000,5000,10000,19000)
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Channels the connections subscribe to (round robin)
    #[arg(long)]
    pub channels: Option<usize>,
    /// How the connections subscribe: WebSocket, or SSE streams [default: ws]
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// Wait after the last connection subscribed before reading RSS, seconds [default: 2]
    #[arg(long, value_name = "S")]
    pub settle_s: Option<f64>,
    /// The server's pid (relay or nats-server) [default: the process listening on the
    /// target port]
    #[arg(long)]
    pub server_pid: Option<u32>,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// What `main` needs besides the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub json: bool,
}

impl Cli {
    pub fn into_options(self) -> (Options, Output) {
        match self.scenario {
            Command::Fanout(a) => a.apply(Scenario::Fanout),
            Command::Channels(a) => a.apply(Scenario::Channels),
            Command::Latency(a) => a.apply(Scenario::Latency),
            Command::Sse(a) => a.apply(Scenario::Sse),
            Command::Ingest(a) => {
                let mut o = Options::new(Scenario::Ingest);
                let out = a.common.apply(&mut o);
                a.publish.apply(&mut o);
                set(&mut o.channels, a.channels);
                (o, out)
            }
            Command::Connect(a) => {
                let mut o = Options::new(Scenario::Connect);
                let out = a.common.apply(&mut o);
                set(&mut o.concurrency, a.concurrency);
                o.concurrency_ramp = a.ramp;
                set(&mut o.step_s, a.step_s);
                set(&mut o.close, a.close);
                (o, out)
            }
            Command::Idle(a) => {
                let mut o = Options::new(Scenario::Idle);
                let out = a.common.apply(&mut o);
                if let Some(n) = a.connections {
                    o.idle_steps = vec![n];
                }
                if !a.steps.is_empty() {
                    o.idle_steps = a.steps;
                }
                set(&mut o.channels, a.channels);
                set(&mut o.transport, a.transport);
                set(&mut o.settle_s, a.settle_s);
                o.server_pid = a.server_pid;
                (o, out)
            }
        }
    }
}

pub(crate) fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

impl Common {
    fn apply(self, o: &mut Options) -> Output {
        set(&mut o.target_kind, self.target_kind);
        if o.target_kind == TargetKind::Nats {
            o.target = DEFAULT_NATS_TARGET.parse().expect("constant address");
        }
        set(&mut o.target, self.target);
        set(&mut o.duration_s, self.duration_s);
        set(&mut o.threads, self.threads);
        set(&mut o.driver, self.driver);
        o.pin_cpus = self.pin_cpus;
        set(&mut o.source_ips, self.source_ips);
        o.token = self.token;
        o.api_key = self.api_key;
        o.progress = !self.quiet;
        set(&mut o.connect_timeout_ms, self.connect_timeout_ms);
        set(&mut o.subscribe_timeout_s, self.subscribe_timeout_s);
        set(&mut o.drain_ms, self.drain_ms);
        o.deadline_s = self.deadline_s;
        set(&mut o.setup_concurrency, self.setup_concurrency);
        Output { json: self.json }
    }
}

impl Publish {
    fn apply(self, o: &mut Options) {
        set(&mut o.publishers, self.publishers);
        o.nats_publish_addr = self.nats_publish_addr;
        set(&mut o.publish_via, self.publish_via);
        set(&mut o.batch, self.batch);
        set(&mut o.pipeline, self.pipeline);
        set(&mut o.event_bytes, self.event_bytes);
        match (self.rate, self.ramp) {
            (Some(0), _) => o.rate = RatePlan::Unlimited,
            (Some(r), _) => o.rate = RatePlan::Fixed(r),
            (None, Some(ramp)) => o.rate = RatePlan::Ramp(ramp),
            (None, None) => {}
        }
        set(&mut o.step_s, self.step_s);
        set(&mut o.stop_p99_ms, self.stop_p99_ms);
    }
}

impl Delivery {
    fn apply(self, scenario: Scenario) -> (Options, Output) {
        let mut o = Options::new(scenario);
        let out = self.common.apply(&mut o);
        self.publish.apply(&mut o);
        set(&mut o.subscribers, self.subscribers);
        set(&mut o.channels, self.channels);
        set(&mut o.transport, self.transport);
        (o, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> (Options, Output) {
        let mut argv = vec!["relay-loadgen"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().into_options()
    }

    #[test]
    fn scenario_defaults_come_through() {
        let (o, out) = parse(&["fanout"]);
        assert_eq!(o.scenario, Scenario::Fanout);
        assert_eq!(o.subscribers, 1000);
        assert!(matches!(o.rate, RatePlan::Ramp(_)));
        assert!(!out.json);
        assert!(o.progress);
        assert_eq!(o.target, "127.0.0.1:8004".parse().unwrap());
        let (o, _) = parse(&["sse"]);
        assert_eq!(o.transport, Transport::Sse);
        let (o, _) = parse(&["ingest"]);
        assert_eq!(o.rate, RatePlan::Unlimited);
        assert_eq!(o.batch, 100);
    }

    #[test]
    fn flags_override_defaults() {
        let (o, out) = parse(&[
            "fanout",
            "--subscribers",
            "50",
            "--ramp",
            "100:400:2",
            "--step-s",
            "1.5",
            "--target",
            "127.0.0.1:9000",
            "--threads",
            "2",
            "--driver",
            "epoll",
            "--pin-cpus",
            "1,3",
            "--source-ips",
            "4",
            "--json",
            "-q",
            "--publish-via",
            "ws",
            "--token",
            "tok",
            "--event-bytes",
            "200",
            "--stop-p99-ms",
            "20",
        ]);
        assert_eq!(o.subscribers, 50);
        assert_eq!(
            o.rate,
            RatePlan::Ramp(Ramp {
                start: 100,
                end: 400,
                factor: 2.0
            })
        );
        assert_eq!(o.step_s, 1.5);
        assert_eq!(o.target.port(), 9000);
        assert_eq!((o.threads, o.driver), (2, Driver::Epoll));
        assert_eq!(o.pin_cpus, vec![1, 3]);
        assert_eq!(o.source_ips, 4);
        assert!(out.json);
        assert!(!o.progress);
        assert_eq!(o.publish_via, PublishVia::Ws);
        assert_eq!(o.token.as_deref(), Some("tok"));
        assert_eq!(o.event_bytes, 200);
        assert_eq!(o.stop_p99_ms, 20.0);
        o.validate().unwrap();

        let (o, _) = parse(&["latency", "--rate", "0", "--transport", "sse"]);
        assert_eq!(o.rate, RatePlan::Unlimited);
        assert_eq!(o.transport, Transport::Sse);
        let (o, _) = parse(&["channels", "--rate", "300", "--channels", "7"]);
        assert_eq!((o.rate, o.channels), (RatePlan::Fixed(300), 7));
        let (o, _) = parse(&[
            "idle",
            "--steps",
            "1000,5000,10000,19000",
            "--server-pid",
            "42",
        ]);
        assert_eq!(o.idle_steps, vec![1000, 5000, 10000, 19000]);
        assert_eq!(o.server_pid, Some(42));
        let (o, _) = parse(&["idle", "--connections", "300"]);
        assert_eq!(o.idle_steps, vec![300]);
        assert_eq!(o.transport, Transport::Ws);
        let (o, _) = parse(&["idle", "--connections", "300", "--transport", "sse"]);
        assert_eq!(o.transport, Transport::Sse);
        assert!(o.validate().is_ok());
        let (o, _) = parse(&["idle", "--target-kind", "nats", "--transport", "sse"]);
        assert!(
            o.validate().is_err(),
            "nats-server has no SSE streams to hold"
        );
        let (o, _) = parse(&["connect", "--ramp", "1:8:2", "--driver", "io_uring"]);
        assert_eq!(o.concurrency_steps(), vec![1, 2, 4, 8]);
        assert_eq!(o.driver, Driver::IoUring);
        assert_eq!(o.close, CloseMode::Graceful);
        let (o, _) = parse(&["connect", "--close", "reset"]);
        assert_eq!(o.close, CloseMode::Reset);
        let (o, _) = parse(&[
            "ingest",
            "--batch",
            "10",
            "--pipeline",
            "4",
            "--api-key",
            "k",
        ]);
        assert_eq!((o.batch, o.pipeline), (10, 4));
        assert_eq!(o.api_key.as_deref(), Some("k"));
    }

    #[test]
    fn nats_flags() {
        let (o, _) = parse(&["fanout", "--target-kind", "nats"]);
        assert_eq!(o.target_kind, TargetKind::Nats);
        assert_eq!(o.target, DEFAULT_NATS_TARGET.parse().unwrap());
        assert_eq!(o.publish_target(), "127.0.0.1:4222".parse().unwrap());
        o.validate().unwrap();
        let (o, _) = parse(&[
            "latency",
            "--target-kind",
            "nats",
            "--target",
            "127.0.0.1:9090",
            "--nats-publish-addr",
            "127.0.0.1:5222",
        ]);
        assert_eq!(o.target.port(), 9090);
        assert_eq!(o.publish_target().port(), 5222);
        let (o, _) = parse(&["idle", "--target-kind", "nats", "--connections", "10"]);
        assert_eq!((o.target_kind, o.target.port()), (TargetKind::Nats, 8080));
        let (o, _) = parse(&["latency", "--nats-publish-addr", "127.0.0.1:5222"]);
        assert!(
            o.validate().is_err(),
            "relay mode has no NATS publish address"
        );
        let (o, _) = parse(&["sse", "--target-kind", "nats"]);
        assert!(o.validate().is_err());
        // Idle and connect do not publish: no publish address to give.
        let mut argv = vec![
            "relay-loadgen",
            "idle",
            "--nats-publish-addr",
            "127.0.0.1:1",
        ];
        assert!(Cli::try_parse_from(&argv).is_err());
        argv[1] = "connect";
        assert!(Cli::try_parse_from(&argv).is_err());
    }

    #[test]
    fn bad_flags_are_refused_by_the_parser() {
        let bad = |args: &[&str]| {
            let mut argv = vec!["relay-loadgen"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).is_err()
        };
        assert!(bad(&["fanout", "--ramp", "1:2"]));
        assert!(bad(&["fanout", "--rate", "5", "--ramp", "1:8:2"]));
        assert!(bad(&["idle", "--connections", "5", "--steps", "1,2"]));
        assert!(bad(&["latency", "--target", "nowhere"]));
        assert!(
            bad(&["latency", "--connections", "5"]),
            "not a latency flag"
        );
        assert!(bad(&["connect", "--subscribers", "5"]));
        assert!(bad(&["connect", "--close", "slam"]));
        assert!(bad(&["fanout", "--close", "reset"]), "a connect flag");
        assert!(bad(&["nosuch"]));
        assert!(bad(&[]));
    }
}
