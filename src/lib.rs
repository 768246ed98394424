//! relay: a thread-per-core, io_uring real-time event relay.
//!
//! Layout, one line a module (see ARCHITECTURE.md for the code map and invariants):
//! - [`config`]: defaults < file < `RELAY_*` env < flags, validated with file/line/key errors.
//! - [`server`]: listeners, shard threads and runtimes, start and drain.
//! - [`shard`]: one thread's state and the service calls handlers make (publish, subscribe...).
//! - [`mesh`]: bounded lock-free rings between shards, batched, woken on the edge.
//! - [`bus`]: channels (seq, epoch, history, idempotency) and local subscribers.
//! - [`http`]: the HTTP/1.1 codec (pure) and the connection loop.
//! - [`api`]: routing and handlers of the HTTP API.
//! - [`envelope`]: the publish body's fast path: the plain form in one pass, the rest to serde.
//! - [`sse`]: Server-Sent Events streams with cursors and recovery.
//! - [`ws`]: WebSocket connections: handshake, framing, the JSON protocol, presence.
//! - [`park`]: wakers that resume an idle connection's parked side (no task while idle).
//! - [`pacing`]: under load, busy subscriber connections write every few ms, many events a write.
//! - [`auth`]: JWT (WebSocket/SSE) and API keys (publish and admin endpoints).
//! - [`registry`]: subsystems and instances, lifecycle, health, circuits, balancing, routing table.
//! - [`proxy`]: routing HTTP requests to subsystem instances (balancing, circuits, retries).
//! - [`webhook`]: at-least-once event delivery to subsystems' subscriptions.
//! - [`ratelimit`]: per-client token buckets.
//! - [`metrics`]: per-shard single-writer counters and the Prometheus exposition.
//! - [`schedstat`]: the kernel's scheduler accounting of each shard's thread (read on a scrape).
//! - [`names`], [`glob`], [`query`], [`cursor`], [`clock`]: small pure helpers.

pub mod answers;
pub mod api;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod config;
pub mod cursor;
pub mod envelope;
pub mod glob;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod names;
pub mod pacing;
pub mod park;
pub mod proxy;
pub mod query;
pub mod ratelimit;
pub mod registry;
pub mod schedstat;
pub mod server;
pub mod shard;
pub mod sse;
pub mod webhook;
pub mod ws;
