//! The subsystem registry (API.md sections 5 and 6): instances, their lifecycle, and the
//! routing table shards read.
//!
//! Owns the control-plane state: every subsystem, its instances (from the config file or
//! `POST /api/v1/relay/subsystems`), their health as the checks report it, heartbeats and TTL
//! expiry, draining on deregistration. It publishes immutable [`Table`] snapshots: a shard
//! routes a request by reading its current snapshot, without a lock and without asking
//! anyone. Must never: be mutated from a shard's hot path, or hand out a table that a later
//! change mutates in place (a change builds a new table).
//!
//! Time is passed in, never read here, so every rule is testable.

pub mod api;
pub mod balance;
pub mod circuit;
pub mod control;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{LbPolicy, SubscriptionConfig, SubsystemConfig};

/// A registration refused, naming the field (API.md: 400 with the field named).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Shortest TTL a registration may ask for: heartbeats more often than this are noise.
pub const TTL_MIN_MS: u64 = 1_000;

/// An instance's address, resolved once at registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
}

/// Parses `http://host:port[/]`; https and paths are refused (relay speaks plain HTTP to
/// backends on the node's network, and the upstream sees the full original path).
pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("{url:?} must start with http:// (relay does not speak TLS to subsystems)")
    })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains('/') {
        return Err(format!(
            "{url:?} must be http://host:port with no path (the upstream sees the original path)"
        ));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        || authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{url:?}: resolves to no address"))?;
    Ok(Endpoint {
        addr,
        host: authority.to_string(),
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Validates a registration (from the API or the config file) and resolves its address.
pub fn validate(spec: &SubsystemConfig) -> Result<Endpoint, FieldError> {
    if !valid_name(&spec.name) {
        return Err(field_error(
            "name",
            "required: 1..=64 characters of [A-Za-z0-9._-]",
        ));
    }
    if !valid_name(&spec.instance) {
        return Err(field_error(
            "instance",
            "required: 1..=64 characters of [A-Za-z0-9._-]",
        ));
    }
    if spec.url.is_empty() {
        return Err(field_error("url", "required, e.g. http://127.0.0.1:9001"));
    }
    let endpoint = parse_url(&spec.url).map_err(|m| field_error("url", m))?;
    if !spec.health_path.starts_with('/') {
        return Err(field_error("health_path", "must start with '/'"));
    }
    if spec.weight == 0 {
        return Err(field_error("weight", "must be at least 1"));
    }
    for (i, route) in spec.routes.iter().enumerate() {
        if !route.starts_with('/') || route.contains(['?', '#', ' ']) {
            return Err(field_error(
                format!("routes[{i}]"),
                "must be a path prefix starting with '/' (no query, fragment or spaces)",
            ));
        }
        if route == "/api/v1/relay" || route.starts_with("/api/v1/relay/") {
            return Err(field_error(
                format!("routes[{i}]"),
                "must not shadow relay's own /api/v1/relay endpoints",
            ));
        }
    }
    if let Some(ttl) = spec.ttl_ms {
        if ttl < TTL_MIN_MS {
            return Err(field_error(
                "ttl_ms",
                format!("must be at least {TTL_MIN_MS}"),
            ));
        }
    }
    for (i, sub) in spec.subscriptions.iter().enumerate() {
        validate_subscription(sub)
            .map_err(|(f, m)| field_error(format!("subscriptions[{i}].{f}"), m))?;
    }
    Ok(endpoint)
}

fn validate_subscription(sub: &SubscriptionConfig) -> Result<(), (&'static str, String)> {
    if !sub.path.starts_with('/') {
        return Err(("path", "required, must start with '/'".into()));
    }
    if sub.types.is_empty() && sub.channels.is_empty() {
        return Err((
            "types",
            "give at least one type glob or channel glob".into(),
        ));
    }
    for t in &sub.types {
        if t.is_empty()
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b))
        {
            return Err((
                "types",
                format!("{t:?} is not a type glob ([A-Za-z0-9._-] and *)"),
            ));
        }
    }
    for c in &sub.channels {
        if c.is_empty()
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:@/-*".contains(&b))
        {
            return Err((
                "channels",
                format!("{c:?} is not a channel glob ([A-Za-z0-9._:@/-] and *)"),
            ));
        }
    }
    Ok(())
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Routable (a new instance is routable before its first check).
    Ready,
    /// Health checks fail: not routable until they pass again.
    Unhealthy,
    /// Deregistered: no new requests; removed once its in-flight requests finish.
    Draining,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 3] = [Lifecycle::Ready, Lifecycle::Unhealthy, Lifecycle::Draining];

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Ready => "ready",
            Lifecycle::Unhealthy => "unhealthy",
            Lifecycle::Draining => "draining",
        }
    }
}

/// Counters of one instance, shared by every shard and kept across table snapshots.
///
/// The one place shards share counters: each proxied request touches its instance's
/// `in_flight` and totals (a few atomic adds per request, never per event). Circuit states
/// and latency histograms are per shard (single writer each).
#[derive(Debug)]
pub struct InstanceStats {
    pub in_flight: AtomicI64,
    /// Responses by class: 2xx, 3xx, 4xx, 5xx, then transport errors: timeout, connect/io.
    pub responses: [AtomicU64; 6],
    pub latency_ns_total: AtomicU64,
    /// Bumped by `POST .../circuit/reset`; each shard resets its circuit when it sees a change.
    pub reset_epoch: AtomicU64,
    /// Each shard's circuit state (0 closed, 1 half-open, 2 open), written by that shard only.
    pub circuit: Box<[AtomicU8]>,
    /// Per-shard upstream latency histograms (single writer each).
    pub latency: Box<[crate::metrics::Histogram]>,
    pub webhooks_delivered: AtomicU64,
    pub webhooks_failed: AtomicU64,
    pub health_checks_failed: AtomicU64,
    pub health_checks_ok: AtomicU64,
    /// Health-check verdicts that flipped the instance (ready <-> unhealthy).
    pub health_changes: AtomicU64,
}

/// Labels of [`InstanceStats::responses`].
pub const RESPONSE_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "5xx", "timeout", "error"];

impl InstanceStats {
    pub fn new(shards: usize) -> InstanceStats {
        InstanceStats {
            in_flight: AtomicI64::new(0),
            responses: Default::default(),
            latency_ns_total: AtomicU64::new(0),
            reset_epoch: AtomicU64::new(0),
            circuit: (0..shards).map(|_| AtomicU8::new(0)).collect(),
            latency: (0..shards)
                .map(|_| crate::metrics::Histogram::new())
                .collect(),
            webhooks_delivered: AtomicU64::new(0),
            webhooks_failed: AtomicU64::new(0),
            health_checks_failed: AtomicU64::new(0),
            health_checks_ok: AtomicU64::new(0),
            health_changes: AtomicU64::new(0),
        }
    }

    pub fn requests(&self) -> u64 {
        self.responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The worst circuit state over all shards.
    pub fn circuit_state(&self) -> u8 {
        self.circuit
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    pub fn latency_avg_ms(&self) -> f64 {
        let n = self.requests();
        if n == 0 {
            return 0.0;
        }
        self.latency_ns_total.load(Ordering::Relaxed) as f64 / n as f64 / 1e6
    }
}

/// One instance as the control plane keeps it.
#[derive(Debug, Clone)]
pub struct InstanceState {
    pub spec: SubsystemConfig,
    pub endpoint: Endpoint,
    pub lifecycle: Lifecycle,
    /// From the config file: never expires, survives deregistration attempts as a restart.
    pub from_config: bool,
    pub registered_at: Instant,
    pub last_heartbeat: Instant,
    pub stats: Arc<InstanceStats>,
    successes_in_a_row: u32,
    failures_in_a_row: u32,
}

/// Health-check thresholds (`[health]`).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub healthy: u32,
    pub unhealthy: u32,
}

/// What a change did, so the caller can announce it (events on `relay.system`, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Registered {
        name: String,
        instance: String,
        replaced: bool,
    },
    Health {
        name: String,
        instance: String,
        healthy: bool,
    },
    Draining {
        name: String,
        instance: String,
    },
    Removed {
        name: String,
        instance: String,
        reason: &'static str,
    },
}

/// The registry: subsystems by name, instances by id. Owned by the control plane.
#[derive(Debug, Default)]
pub struct Registry {
    subsystems: BTreeMap<String, BTreeMap<String, InstanceState>>,
    lb: BTreeMap<String, LbPolicy>,
    version: u64,
    shards: usize,
}

/// Why a registry call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    NotFound { name: String, instance: String },
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::NotFound { name, instance } => {
                write!(
                    f,
                    "no instance {instance} of subsystem {name} is registered"
                )
            }
        }
    }
}

impl Registry {
    pub fn new(shards: usize) -> Registry {
        Registry {
            shards: shards.max(1),
            ..Registry::default()
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Adds or replaces an instance (a re-registration refreshes it and ends any draining).
    pub fn register(
        &mut self,
        spec: SubsystemConfig,
        endpoint: Endpoint,
        from_config: bool,
        now: Instant,
    ) -> Change {
        let name = spec.name.clone();
        let instance = spec.instance.clone();
        // The last registration's policy wins for the whole subsystem.
        self.lb.insert(name.clone(), spec.lb);
        let instances = self.subsystems.entry(name.clone()).or_default();
        // A re-registration keeps its counters (in-flight requests are still counted there).
        let stats = instances
            .get(&instance)
            .map(|old| old.stats.clone())
            .unwrap_or_else(|| Arc::new(InstanceStats::new(self.shards)));
        let replaced = instances
            .insert(
                instance.clone(),
                InstanceState {
                    spec,
                    endpoint,
                    lifecycle: Lifecycle::Ready,
                    from_config,
                    registered_at: now,
                    last_heartbeat: now,
                    stats,
                    successes_in_a_row: 0,
                    failures_in_a_row: 0,
                },
            )
            .is_some();
        self.version += 1;
        Change::Registered {
            name,
            instance,
            replaced,
        }
    }

    fn get_mut(&mut self, name: &str, instance: &str) -> Result<&mut InstanceState, RegistryError> {
        self.subsystems
            .get_mut(name)
            .and_then(|i| i.get_mut(instance))
            .ok_or_else(|| RegistryError::NotFound {
                name: name.into(),
                instance: instance.into(),
            })
    }

    pub fn heartbeat(
        &mut self,
        name: &str,
        instance: &str,
        now: Instant,
    ) -> Result<(), RegistryError> {
        self.get_mut(name, instance)?.last_heartbeat = now;
        Ok(())
    }

    /// Starts draining: no new requests go to the instance; [`Registry::remove`] follows
    /// once its in-flight count is zero.
    pub fn deregister(&mut self, name: &str, instance: &str) -> Result<Change, RegistryError> {
        let state = self.get_mut(name, instance)?;
        state.lifecycle = Lifecycle::Draining;
        self.version += 1;
        Ok(Change::Draining {
            name: name.into(),
            instance: instance.into(),
        })
    }

    pub fn remove(&mut self, name: &str, instance: &str, reason: &'static str) -> Option<Change> {
        let instances = self.subsystems.get_mut(name)?;
        instances.remove(instance)?;
        if instances.is_empty() {
            self.subsystems.remove(name);
            self.lb.remove(name);
        }
        self.version += 1;
        Some(Change::Removed {
            name: name.into(),
            instance: instance.into(),
            reason,
        })
    }

    /// Removes instances whose TTL passed without a heartbeat.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let expired: Vec<(String, String)> = self
            .subsystems
            .iter()
            .flat_map(|(name, instances)| {
                instances.iter().filter_map(move |(id, state)| {
                    let ttl = Duration::from_millis(state.spec.ttl_ms?);
                    (now.saturating_duration_since(state.last_heartbeat) >= ttl)
                        .then(|| (name.clone(), id.clone()))
                })
            })
            .collect();
        expired
            .into_iter()
            .filter_map(|(name, id)| self.remove(&name, &id, "ttl expired"))
            .collect()
    }

    /// Records one health-check result; returns a change when the instance flips.
    pub fn health_result(
        &mut self,
        name: &str,
        instance: &str,
        ok: bool,
        thresholds: Thresholds,
    ) -> Option<Change> {
        let state = self.get_mut(name, instance).ok()?;
        if ok {
            state.successes_in_a_row += 1;
            state.failures_in_a_row = 0;
        } else {
            state.failures_in_a_row += 1;
            state.successes_in_a_row = 0;
        }
        let flip = match state.lifecycle {
            Lifecycle::Ready if state.failures_in_a_row >= thresholds.unhealthy.max(1) => {
                Some(Lifecycle::Unhealthy)
            }
            Lifecycle::Unhealthy if state.successes_in_a_row >= thresholds.healthy.max(1) => {
                Some(Lifecycle::Ready)
            }
            _ => None,
        }?;
        state.lifecycle = flip;
        self.version += 1;
        Some(Change::Health {
            name: name.into(),
            instance: instance.into(),
            healthy: flip == Lifecycle::Ready,
        })
    }

    pub fn instances(&self) -> impl Iterator<Item = &InstanceState> {
        self.subsystems.values().flat_map(|i| i.values())
    }

    /// An immutable routing table of the current state.
    pub fn snapshot(&self) -> Arc<Table> {
        let mut subsystems = Vec::with_capacity(self.subsystems.len());
        let mut routes = Vec::new();
        let mut webhooks: Vec<WebhookRoute> = Vec::new();
        let mut seen_subscriptions: Vec<(usize, &SubscriptionConfig)> = Vec::new();
        for (index, (name, instances)) in self.subsystems.iter().enumerate() {
            let mut entries = Vec::with_capacity(instances.len());
            for state in instances.values() {
                // Instances of one subsystem usually repeat the same subscriptions: once each.
                for sub in &state.spec.subscriptions {
                    if seen_subscriptions
                        .iter()
                        .any(|(i, s)| *i == index && *s == sub)
                    {
                        continue;
                    }
                    seen_subscriptions.push((index, sub));
                    webhooks.push(WebhookRoute {
                        subsystem: index,
                        path: sub.path.clone(),
                        types: crate::glob::GlobSet::new(sub.types.iter().cloned()),
                        channels: crate::glob::GlobSet::new(sub.channels.iter().cloned()),
                    });
                }
                for route in &state.spec.routes {
                    if !routes.iter().any(|(r, _): &(String, usize)| r == route) {
                        routes.push((route.clone(), index));
                    }
                }
                entries.push(Arc::new(RoutableInstance {
                    subsystem: name.clone(),
                    instance: state.spec.instance.clone(),
                    endpoint: state.endpoint.clone(),
                    weight: state.spec.weight.max(1),
                    lifecycle: state.lifecycle,
                    spec: state.spec.clone(),
                    from_config: state.from_config,
                    registered_at: state.registered_at,
                    last_heartbeat: state.last_heartbeat,
                    stats: state.stats.clone(),
                }));
            }
            subsystems.push(SubsystemEntry {
                name: name.clone(),
                lb: self.lb.get(name).copied().unwrap_or_default(),
                instances: entries,
            });
        }
        // Longest prefix first, so the first match is the longest.
        routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Arc::new(Table {
            version: self.version,
            subsystems,
            webhooks,
            routes,
        })
    }
}

/// One instance as a shard routes to it.
#[derive(Debug)]
pub struct RoutableInstance {
    pub subsystem: String,
    pub instance: String,
    pub endpoint: Endpoint,
    pub weight: u32,
    pub lifecycle: Lifecycle,
    pub spec: SubsystemConfig,
    pub from_config: bool,
    pub registered_at: Instant,
    pub last_heartbeat: Instant,
    pub stats: Arc<InstanceStats>,
}

impl RoutableInstance {
    /// A stable key for per-shard state (circuits): the stats block outlives snapshots.
    pub fn key(&self) -> usize {
        Arc::as_ptr(&self.stats) as usize
    }
}

#[derive(Debug)]
pub struct SubsystemEntry {
    pub name: String,
    pub lb: LbPolicy,
    pub instances: Vec<Arc<RoutableInstance>>,
}

/// One webhook subscription: events whose type and channel match go to `path` of the
/// subsystem's instances.
#[derive(Debug)]
pub struct WebhookRoute {
    /// Index into [`Table::subsystems`].
    pub subsystem: usize,
    pub path: String,
    types: crate::glob::GlobSet,
    channels: crate::glob::GlobSet,
}

impl WebhookRoute {
    /// An empty list of globs matches everything (validation requires at least one list).
    pub fn matches(&self, event: &crate::bus::event::Event) -> bool {
        (self.types.is_empty() || self.types.matches(event.event_type()))
            && (self.channels.is_empty() || self.channels.matches(&event.channel))
    }
}

/// The routing table: immutable, shared by every shard.
#[derive(Debug, Default)]
pub struct Table {
    pub version: u64,
    pub subsystems: Vec<SubsystemEntry>,
    pub webhooks: Vec<WebhookRoute>,
    /// (prefix, index into `subsystems`), longest prefix first.
    routes: Vec<(String, usize)>,
}

impl Table {
    pub fn subsystem(&self, name: &str) -> Option<&SubsystemEntry> {
        self.subsystems.iter().find(|s| s.name == name)
    }

    pub fn instance(&self, name: &str, instance: &str) -> Option<&Arc<RoutableInstance>> {
        self.subsystem(name)?
            .instances
            .iter()
            .find(|i| i.instance == instance)
    }

    /// The subsystem whose route is the longest whole-segment prefix of `path`:
    /// `/api/v1/sift` matches `/api/v1/sift` and `/api/v1/sift/x`, not `/api/v1/siftx`.
    pub fn route(&self, path: &str) -> Option<&SubsystemEntry> {
        self.routes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .and_then(|(_, index)| self.subsystems.get(*index))
    }
}

/// A metric family rendered per instance: name, help, and how to read the value.
type Family<T> = (&'static str, &'static str, fn(&InstanceStats) -> T);

/// Appends the per-instance families: `relay_upstream_requests_total{subsystem,instance,code}`,
/// `relay_upstream_duration_seconds{subsystem}` (histogram), `relay_circuit_state`,
/// `relay_upstream_in_flight`, `relay_subsystem_instance_state{state}`, health-check and webhook
/// counts.
pub fn render_metrics(out: &mut String, table: &Table) {
    use std::fmt::Write as _;
    let instances: Vec<&Arc<RoutableInstance>> = table
        .subsystems
        .iter()
        .flat_map(|s| s.instances.iter())
        .collect();
    let labels =
        |i: &RoutableInstance| format!("subsystem=\"{}\",instance=\"{}\"", i.subsystem, i.instance);
    let _ = writeln!(out, "# HELP relay_upstream_requests_total Proxied requests by response class (timeout and error: no response).");
    let _ = writeln!(out, "# TYPE relay_upstream_requests_total counter");
    for i in &instances {
        for (class, n) in RESPONSE_CLASSES.iter().zip(i.stats.responses.iter()) {
            let _ = writeln!(
                out,
                "relay_upstream_requests_total{{{},code=\"{class}\"}} {}",
                labels(i),
                n.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP relay_upstream_duration_seconds Time to an upstream's complete response."
    );
    let _ = writeln!(out, "# TYPE relay_upstream_duration_seconds histogram");
    for sub in &table.subsystems {
        let mut merged = crate::metrics::HistogramSnapshot::default();
        for i in &sub.instances {
            for h in i.stats.latency.iter() {
                merged.merge(&h.snapshot());
            }
        }
        let labels = format!("subsystem=\"{}\"", sub.name);
        crate::metrics::histogram_samples(out, "relay_upstream_duration_seconds", &labels, &merged);
    }
    let gauges: [Family<i64>; 2] = [
        (
            "relay_circuit_state",
            "Circuit state, worst over shards: 0 closed, 1 half-open, 2 open.",
            |s| i64::from(s.circuit_state()),
        ),
        (
            "relay_upstream_in_flight",
            "Proxied requests and webhook POSTs in flight.",
            |s| s.in_flight.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for i in &instances {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(i), get(&i.stats));
        }
    }
    // A state set: one series per state, 1 on the instance's current one, so an alert can sum
    // the ready instances of a subsystem without knowing a numeric code.
    let _ = writeln!(out, "# HELP relay_subsystem_instance_state The instance's lifecycle state (1 on the current one): ready, unhealthy or draining.");
    let _ = writeln!(out, "# TYPE relay_subsystem_instance_state gauge");
    for i in &instances {
        for state in Lifecycle::ALL {
            let _ = writeln!(
                out,
                "relay_subsystem_instance_state{{{},state=\"{}\"}} {}",
                labels(i),
                state.as_str(),
                u8::from(i.lifecycle == state)
            );
        }
    }
    let counters: [Family<u64>; 5] = [
        (
            "relay_health_status_changes_total",
            "Health-check verdicts that moved the instance between ready and unhealthy.",
            |s| s.health_changes.load(Ordering::Relaxed),
        ),
        (
            "relay_health_checks_ok_total",
            "Health checks that passed.",
            |s| s.health_checks_ok.load(Ordering::Relaxed),
        ),
        (
            "relay_health_checks_failed_total",
            "Health checks that failed.",
            |s| s.health_checks_failed.load(Ordering::Relaxed),
        ),
        (
            "relay_webhook_instance_events_total",
            "Webhook events delivered to the instance.",
            |s| s.webhooks_delivered.load(Ordering::Relaxed),
        ),
        (
            "relay_webhook_instance_failures_total",
            "Webhook POSTs to the instance that failed.",
            |s| s.webhooks_failed.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for i in &instances {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(i), get(&i.stats));
        }
    }
}

pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, instance: &str, routes: &[&str]) -> SubsystemConfig {
        SubsystemConfig {
            name: name.into(),
            instance: instance.into(),
            url: "http://127.0.0.1:9001".into(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            ..SubsystemConfig::default()
        }
    }

    #[test]
    fn urls_parse_or_say_why_not() {
        let e = parse_url("http://127.0.0.1:9001").unwrap();
        assert_eq!(e.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(e.host, "127.0.0.1:9001");
        assert_eq!(
            parse_url("http://127.0.0.1:9001/").unwrap().addr.port(),
            9001
        );
        assert_eq!(parse_url("http://localhost:80").unwrap().addr.port(), 80);
        assert!(parse_url("https://x:1").unwrap_err().contains("http://"));
        assert!(parse_url("http://127.0.0.1:9001/prefix")
            .unwrap_err()
            .contains("no path"));
        assert!(parse_url("http://").is_err());
    }

    #[test]
    fn registrations_name_the_bad_field() {
        assert!(validate(&spec("sift", "sift-1", &["/api/v1/sift"])).is_ok());
        let cases: Vec<(SubsystemConfig, &str)> = vec![
            (spec("", "i", &[]), "name"),
            (spec("si ft", "i", &[]), "name"),
            (spec("s", "", &[]), "instance"),
            (
                SubsystemConfig {
                    url: "ftp://x".into(),
                    ..spec("s", "i", &[])
                },
                "url",
            ),
            (
                SubsystemConfig {
                    url: String::new(),
                    ..spec("s", "i", &[])
                },
                "url",
            ),
            (
                SubsystemConfig {
                    health_path: "health".into(),
                    ..spec("s", "i", &[])
                },
                "health_path",
            ),
            (
                SubsystemConfig {
                    weight: 0,
                    ..spec("s", "i", &[])
                },
                "weight",
            ),
            (spec("s", "i", &["/ok", "nope"]), "routes[1]"),
            (spec("s", "i", &["/api/v1/relay/x"]), "routes[0]"),
            (
                SubsystemConfig {
                    ttl_ms: Some(5),
                    ..spec("s", "i", &[])
                },
                "ttl_ms",
            ),
            (
                SubsystemConfig {
                    subscriptions: vec![SubscriptionConfig {
                        types: vec!["a".into()],
                        channels: vec![],
                        path: "x".into(),
                    }],
                    ..spec("s", "i", &[])
                },
                "subscriptions[0].path",
            ),
            (
                SubsystemConfig {
                    subscriptions: vec![SubscriptionConfig {
                        types: vec![],
                        channels: vec![],
                        path: "/e".into(),
                    }],
                    ..spec("s", "i", &[])
                },
                "subscriptions[0].types",
            ),
        ];
        for (s, field) in cases {
            let e = validate(&s).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn routes_match_whole_segments_longest_first() {
        let mut r = Registry::new(2);
        let now = Instant::now();
        for (name, routes) in [
            ("sift", vec!["/api/v1/sift"]),
            ("deep", vec!["/api/v1/sift/deep"]),
            ("root", vec!["/"]),
        ] {
            let s = spec(name, "1", &routes);
            let e = validate(&s).unwrap();
            r.register(s, e, false, now);
        }
        let t = r.snapshot();
        let name = |p: &str| t.route(p).map(|s| s.name.clone());
        assert_eq!(name("/api/v1/sift").as_deref(), Some("sift"));
        assert_eq!(name("/api/v1/sift/x").as_deref(), Some("sift"));
        assert_eq!(name("/api/v1/sift/deep/1").as_deref(), Some("deep"));
        assert_eq!(name("/api/v1/siftx").as_deref(), Some("root"));
        assert_eq!(name("/anything").as_deref(), Some("root"));
        let mut only = Registry::new(2);
        let s = spec("sift", "1", &["/api/v1/sift"]);
        let e = validate(&s).unwrap();
        only.register(s, e, false, now);
        assert!(only.snapshot().route("/api/v1/siftx").is_none());
    }

    #[test]
    fn ttl_expiry_heartbeats_and_draining() {
        let mut r = Registry::new(2);
        let t0 = Instant::now();
        let s = SubsystemConfig {
            ttl_ms: Some(1_000),
            ..spec("cast", "c1", &[])
        };
        let e = validate(&s).unwrap();
        r.register(s, e.clone(), false, t0);
        r.register(spec("cast", "static", &[]), e, true, t0);
        assert!(r.expire(t0 + Duration::from_millis(900)).is_empty());
        r.heartbeat("cast", "c1", t0 + Duration::from_millis(900))
            .unwrap();
        assert!(r.expire(t0 + Duration::from_millis(1_500)).is_empty());
        let gone = r.expire(t0 + Duration::from_millis(1_900));
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert!(r.heartbeat("cast", "c1", t0).is_err());
        assert_eq!(r.instances().count(), 1, "the instance without ttl stays");
        let v = r.version();
        assert!(matches!(
            r.deregister("cast", "static"),
            Ok(Change::Draining { .. })
        ));
        assert!(r.version() > v);
        assert_eq!(
            r.snapshot().subsystems[0].instances[0].lifecycle,
            Lifecycle::Draining
        );
        assert!(r.remove("cast", "static", "drained").is_some());
        assert!(r.snapshot().subsystems.is_empty());
        assert!(r.deregister("cast", "static").is_err());
    }

    #[test]
    fn health_flips_after_thresholds_only() {
        let mut r = Registry::new(2);
        let s = spec("spawn", "s1", &[]);
        let e = validate(&s).unwrap();
        r.register(s, e, false, Instant::now());
        let th = Thresholds {
            healthy: 2,
            unhealthy: 3,
        };
        assert!(r.health_result("spawn", "s1", false, th).is_none());
        assert!(r.health_result("spawn", "s1", false, th).is_none());
        assert!(matches!(
            r.health_result("spawn", "s1", false, th),
            Some(Change::Health { healthy: false, .. })
        ));
        assert!(r.health_result("spawn", "s1", true, th).is_none());
        assert!(
            r.health_result("spawn", "s1", false, th).is_none(),
            "a failure resets the streak"
        );
        assert!(r.health_result("spawn", "s1", true, th).is_none());
        assert!(matches!(
            r.health_result("spawn", "s1", true, th),
            Some(Change::Health { healthy: true, .. })
        ));
        assert!(r.health_result("nope", "x", true, th).is_none());
    }
}
