//! relay-loadgen: the bundled open-loop load generator of relay.
//!
//! It drives a relay the way real traffic does: WebSocket or SSE subscribers over channels,
//! publishers over HTTP (single or batch, keep-alive, pipelined) or WebSocket at an open-loop
//! rate. Every event carries its scheduled send time, and latency is measured from that time
//! to arrival, so a server that falls behind cannot hide it (no coordinated omission). With
//! `TargetKind::Nats` it drives nats-server the same way (WebSocket subscribers, `PUB` over
//! TCP), so both can be measured by one generator in one run.
//!
//! ```no_run
//! use relay_loadgen::{run, Options, Scenario};
//! let mut opts = Options::new(Scenario::Latency);
//! opts.duration_s = 2.0;
//! let report = run(&opts)?;
//! println!("{}", report.to_json());
//! # Ok::<(), relay_loadgen::LoadgenError>(())
//! ```
//!
//! Modules, one line each:
//! - [`options`]: what a run does (`Options`, scenarios, defaults, validation).
//! - [`cli`]: the command line, one subcommand per scenario, into `Options`.
//! - [`run`]: the control thread: phases, drains, the ramp's stop rule, progress, deadline.
//! - [`worker`]: generator threads (one monoio runtime each), shared state, stop sequence.
//! - [`subscriber`]: WebSocket/SSE subscribers and the connect scenario's handshakes.
//! - [`publisher`]: open-loop HTTP, WebSocket and NATS publishers and their reply readers.
//! - [`nats`]: NATS mode: the NATS protocol codec, NATS subscribers' read loop, PONG acks.
//! - [`wsframe`]: client-side RFC 6455 framing (masked frames out, server frames in).
//! - [`http`]: response heads (publish replies, upgrade, SSE).
//! - [`scan`]: the per-event byte scan (channel, seq, timestamp) and SSE lines.
//! - [`payload`]: the bytes the generator publishes.
//! - [`clock`]: the time origin, the open-loop schedule, the rate ramp.
//! - [`pacer`]: wakes publishers precisely when an event is due (a timerfd on each io_uring
//!   thread's ring; a helper thread for epoll threads).
//! - [`stats`]: per-thread counters and histograms, sequence tracking, percentiles.
//! - [`report`]: the `Report`, its JSON and its table.
//! - [`net`]: sockets from chosen source addresses, rlimits, /proc, getrusage.
//! - [`error`]: `LoadgenError` (the run) and `ConnError` (one connection).
//! - [`floor`]: `relay-floor`, the loopback floor: a scenario's shape with a minimal sink in
//!   place of relay, to show what the machine's kernel allows.
//! - [`floor_connect`]: `relay-floor connect`, a minimal WebSocket handshake server to drive
//!   with `relay-loadgen connect`, the same for handshakes.

pub mod cli;
pub mod clock;
pub mod error;
pub mod floor;
pub mod floor_connect;
pub mod http;
pub mod nats;
pub mod net;
pub mod options;
pub mod pacer;
pub mod payload;
pub mod publisher;
pub mod report;
pub mod run;
pub mod scan;
pub mod stats;
pub mod subscriber;
pub mod worker;
pub mod wsframe;

pub use clock::Ramp;
pub use error::LoadgenError;
pub use options::{
    CloseMode, Driver, Options, PublishVia, RatePlan, Scenario, TargetKind, Transport,
};
pub use report::Report;
pub use run::run;
