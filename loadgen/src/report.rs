//! The result of a run: counts, rates, percentiles, per-step rows, and how they are shown.
//!
//! Owns `Report` (what the library returns and `--json` prints as exactly one JSON object),
//! building it from the threads' merged statistics once they have stopped, the ramp summary,
//! and the human-readable table. Latencies are in microseconds everywhere in the report.
//! Must never: compute a rate over a zero-length interval, or print secrets (the config it
//! echoes has none).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::options::{Options, Scenario, TargetKind};
use crate::stats::{Hists, Percentiles, C};
use crate::worker::Shared;

/// One step as the control thread ran it.
#[derive(Debug, Clone)]
pub struct StepRun {
    pub index: usize,
    /// Events per second (0 = closed loop), or connectors for the connect scenario.
    pub level: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Generator CPU over the step, percent of one core.
    pub cpu_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub index: usize,
    /// Target events/s (0 = as fast as possible); connectors in the connect scenario.
    pub rate: u64,
    pub duration_s: f64,
    pub sent: u64,
    pub published: u64,
    /// Events refused or left without a reply (connect: failed handshakes).
    pub failed: u64,
    pub expected: u64,
    /// Deliveries (connect: handshakes).
    pub delivered: u64,
    pub lost: u64,
    pub published_per_s: f64,
    /// Deliveries per second over the span from the step's start to its last delivery.
    pub delivered_per_s: f64,
    /// Scheduled send -> arrival (connect: connect -> welcome).
    pub latency_us: Percentiles,
    pub ack_latency_us: Percentiles,
    pub cpu_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRef {
    pub index: usize,
    pub rate: u64,
    pub delivered_per_s: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RampSummary {
    /// The highest step with p99 <= 10 ms, nothing lost and no publish failures.
    pub best_p99_under_10ms: Option<StepRef>,
    /// The same with p99 <= 100 ms.
    pub best_p99_under_100ms: Option<StepRef>,
    /// Why the ramp ended before its last step, if it did.
    pub stopped_early: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleStep {
    pub connections: usize,
    pub subscribed: u64,
    pub server_rss_kib: u64,
    /// (RSS now - RSS before any connection) / connections.
    pub rss_per_conn_bytes: f64,
    /// (RSS now - RSS at the previous step) / connections added.
    pub marginal_bytes_per_conn: f64,
    pub loadgen_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub server_pid: u32,
    pub server_rss_before_kib: u64,
    pub steps: Vec<IdleStep>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectReport {
    pub handshakes: u64,
    pub failures: u64,
    pub handshakes_per_s: f64,
    pub latency_us: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Connections {
    pub subscribers: usize,
    pub subscribed: u64,
    pub subscribe_failed: u64,
    pub publishers: usize,
    pub publisher_connect_failures: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Rates {
    pub published_per_s: f64,
    pub delivered_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    pub user_s: f64,
    pub system_s: f64,
    /// (user + system) / wall time; 100 = one core saturated.
    pub percent_of_one_core: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// What was measured: "relay" or "nats" (nats-server).
    pub target_kind: &'static str,
    pub target: String,
    /// Where the publishers connected (the target itself for relay; nats-server's client
    /// port in NATS mode); absent for scenarios without publishers.
    pub publish_target: Option<String>,
    pub driver: String,
    pub threads: usize,
    pub source_ips: usize,
    pub elapsed_s: f64,
    pub connections: Connections,
    pub sent: u64,
    /// Events the relay accepted.
    pub published: u64,
    /// Events refused (non-2xx / error reply) or left without a reply.
    pub publish_failed: u64,
    pub publish_error_replies: u64,
    pub publish_no_reply: u64,
    pub publish_errors_by_status: BTreeMap<String, u64>,
    /// Events still due when their step's bound passed (never sent).
    pub unsent: u64,
    pub expected: u64,
    pub delivered: u64,
    /// expected - delivered, after the drain grace.
    pub lost: u64,
    /// delivered - expected when positive: deliveries of events whose publish was not confirmed.
    pub unconfirmed_deliveries: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub seq_gaps: u64,
    pub gap_notices: u64,
    pub disconnected: u64,
    pub close_codes: BTreeMap<String, u64>,
    pub foreign: u64,
    pub protocol_errors: u64,
    pub rates: Rates,
    pub latency_us: Percentiles,
    pub ack_latency_us: Percentiles,
    pub send_lag_us: Percentiles,
    pub steps: Vec<StepReport>,
    pub ramp: Option<RampSummary>,
    pub connect: Option<ConnectReport>,
    pub idle: Option<IdleReport>,
    pub cpu: Cpu,
    pub loadgen_rss_kib: u64,
    pub notes: Vec<String>,
    pub config: Options,
}

/// What the control thread hands over for the report.
pub struct Inputs<'a> {
    pub shared: &'a Shared,
    pub hists: &'a Hists,
    pub runs: &'a [StepRun],
    pub driver: String,
    pub elapsed_s: f64,
    pub cpu: Cpu,
    pub stopped_early: Option<String>,
    pub idle: Option<IdleReport>,
    pub notes: Vec<String>,
}

fn per_s(n: u64, span_ns: u64) -> f64 {
    if span_ns == 0 {
        0.0
    } else {
        (n as f64 * 1e9 / span_ns as f64 * 10.0).round() / 10.0
    }
}

impl Report {
    pub fn build(inp: Inputs<'_>) -> Report {
        let shared = inp.shared;
        let opts = &shared.opts;
        let t = |c: C| shared.total(c);
        let mut steps = Vec::with_capacity(inp.runs.len());
        let mut latency = crate::stats::new_histogram();
        let mut ack = crate::stats::new_histogram();
        for run in inp.runs {
            let k = run.index;
            let sent = shared.step_total(k, |s| &s.sent);
            let published = shared.step_total(k, |s| &s.published);
            let failed = shared.step_total(k, |s| &s.failed);
            let expected = shared.step_total(k, |s| &s.expected);
            let delivered = shared.step_total(k, |s| &s.delivered);
            let planned = run.end_ns.saturating_sub(run.start_ns);
            let last_delivery = shared.step_max(k, |s| &s.last_delivery_ns);
            let last_ack = shared.step_max(k, |s| &s.last_ack_ns);
            let span = |last: u64| planned.max(last.saturating_sub(run.start_ns));
            let h = &inp.hists.steps[k];
            if let Some(l) = &h.latency {
                let _ = latency.add(l);
            }
            if let Some(a) = &h.ack {
                let _ = ack.add(a);
            }
            steps.push(StepReport {
                index: k,
                rate: run.level,
                duration_s: planned as f64 / 1e9,
                sent,
                published,
                failed,
                expected,
                delivered,
                lost: expected.saturating_sub(delivered),
                published_per_s: per_s(published, span(last_ack)),
                delivered_per_s: per_s(delivered, span(last_delivery)),
                latency_us: Percentiles::of(h.latency.as_ref()),
                ack_latency_us: Percentiles::of(h.ack.as_ref()),
                cpu_percent: run.cpu_percent,
            });
        }
        let sum = |f: fn(&StepReport) -> u64| steps.iter().map(f).sum::<u64>();
        let published = sum(|s| s.published);
        let expected = sum(|s| s.expected);
        let delivered = sum(|s| s.delivered);
        let busy_s: f64 = steps.iter().map(|s| s.duration_s).sum();
        let rate_over = |n: u64| {
            if busy_s > 0.0 {
                (n as f64 / busy_s * 10.0).round() / 10.0
            } else {
                0.0
            }
        };
        let ramp_run =
            matches!(opts.rate, crate::options::RatePlan::Ramp(_)) && opts.scenario.publishes();
        let ramp = ramp_run.then(|| summarise(opts.scenario, &steps, inp.stopped_early.clone()));
        let connect = (opts.scenario == Scenario::Connect).then(|| ConnectReport {
            handshakes: t(C::Handshakes),
            failures: t(C::HandshakeFailures),
            handshakes_per_s: rate_over(delivered),
            latency_us: Percentiles::of(Some(&latency)),
        });

        let mut by_status = BTreeMap::new();
        for (c, name) in [
            (C::S400, "400"),
            (C::S401, "401"),
            (C::S403, "403"),
            (C::S413, "413"),
            (C::S429, "429"),
            (C::S503, "503"),
            (C::SOther4xx, "other_4xx"),
            (C::SOther5xx, "other_5xx"),
            (C::SOther, "other"),
        ] {
            let n = t(c);
            if n > 0 {
                by_status.insert(name.to_string(), n);
            }
        }
        let mut close_codes = BTreeMap::new();
        for (c, name) in [
            (C::Close1000, "1000"),
            (C::Close1001, "1001"),
            (C::Close1008, "1008"),
            (C::Close1011, "1011"),
            (C::Close1013, "1013"),
            (C::CloseOther, "other"),
            (C::CloseEof, "eof_without_close"),
        ] {
            let n = t(c);
            if n > 0 {
                close_codes.insert(name.to_string(), n);
            }
        }
        let mut notes = inp.notes;
        for s in &shared.stats {
            if let Ok(n) = s.notes.lock() {
                for m in n.iter() {
                    if notes.len() < 20 && !notes.contains(m) {
                        notes.push(m.clone());
                    }
                }
            }
        }
        Report {
            scenario: opts.scenario.name(),
            target_kind: opts.target_kind.name(),
            target: opts.target.to_string(),
            publish_target: opts
                .scenario
                .publishes()
                .then(|| opts.publish_target().to_string()),
            driver: inp.driver,
            threads: shared.thread_count,
            source_ips: shared.source_ips,
            elapsed_s: (inp.elapsed_s * 1000.0).round() / 1000.0,
            connections: Connections {
                subscribers: opts.subscriber_connections(),
                subscribed: t(C::Subscribed),
                subscribe_failed: t(C::SubFailed),
                publishers: if opts.scenario.publishes() {
                    opts.publishers
                } else {
                    0
                },
                publisher_connect_failures: t(C::PubConnectFailed),
            },
            sent: sum(|s| s.sent),
            published,
            publish_failed: sum(|s| s.failed),
            publish_error_replies: t(C::PublishErrorReplies),
            publish_no_reply: t(C::PublishNoReply),
            publish_errors_by_status: by_status,
            unsent: t(C::Unsent),
            expected,
            delivered,
            lost: expected.saturating_sub(delivered),
            unconfirmed_deliveries: delivered.saturating_sub(expected),
            duplicated: t(C::Duplicated),
            out_of_order: t(C::OutOfOrder),
            seq_gaps: t(C::SeqGaps),
            gap_notices: t(C::GapNotices),
            disconnected: t(C::Disconnected),
            close_codes,
            foreign: t(C::Foreign),
            protocol_errors: t(C::ProtocolErrors),
            rates: Rates {
                published_per_s: rate_over(published),
                delivered_per_s: rate_over(delivered),
            },
            latency_us: Percentiles::of(Some(&latency)),
            ack_latency_us: Percentiles::of(Some(&ack)),
            send_lag_us: Percentiles::of(Some(&inp.hists.send_lag)),
            steps: if opts.scenario == Scenario::Connect {
                steps
                    .into_iter()
                    .map(|mut s| {
                        s.lost = 0;
                        s
                    })
                    .collect()
            } else {
                steps
            },
            ramp,
            connect,
            idle: inp.idle,
            cpu: inp.cpu,
            loadgen_rss_kib: crate::net::own_rss_kib(),
            notes,
            config: opts.clone(),
        }
    }

    /// Exactly one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"error\":\"the report could not be serialised: {e}\"}}")
        })
    }

    /// The readable table.
    pub fn to_table(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let server = c.target_kind.server_name();
        let target = match (&self.publish_target, c.target_kind) {
            (Some(p), TargetKind::Nats) => {
                format!("{server} at {} (WebSocket), publishers to {p}", self.target)
            }
            _ => format!("{server} at {}", self.target),
        };
        let _ = writeln!(
            o,
            "relay-loadgen {} -> {target}  ({} threads, {}, {} source IPs, {:.1} s)",
            self.scenario, self.threads, self.driver, self.source_ips, self.elapsed_s
        );
        match self.config.scenario {
            s if s.delivers() => {
                let _ = writeln!(
                    o,
                    "  {} {} subscribers on {} channels; {} publishers via {}, batch {}, pipeline {}, {}-byte data",
                    c.subscribers,
                    c.transport.name(),
                    c.channels,
                    c.publishers,
                    c.publish_wire_name(),
                    c.batch,
                    c.pipeline,
                    c.event_bytes
                );
            }
            Scenario::Ingest => {
                let _ = writeln!(
                    o,
                    "  {} publishers via {} over {} channels, batch {}, pipeline {}, {}-byte data",
                    c.publishers,
                    c.publish_wire_name(),
                    c.channels,
                    c.batch,
                    c.pipeline,
                    c.event_bytes
                );
            }
            Scenario::Idle => {
                let _ = writeln!(
                    o,
                    "  idle {} subscribers on {} channels",
                    c.transport.name(),
                    c.channels
                );
            }
            _ => {}
        }
        o.push('\n');
        if self.config.scenario.publishes() {
            let _ = writeln!(
                o,
                "  published     {:>12}  ({:.1}/s)   failed {}  (error replies {}, no reply {})  unsent {}",
                self.published,
                self.rates.published_per_s,
                self.publish_failed,
                self.publish_error_replies,
                self.publish_no_reply,
                self.unsent
            );
            if !self.publish_errors_by_status.is_empty() {
                let _ = writeln!(o, "  error statuses {:?}", self.publish_errors_by_status);
            }
        }
        if self.config.scenario.delivers() {
            let _ = writeln!(
                o,
                "  delivered     {:>12}  ({:.1}/s)   expected {}  lost {}  duplicated {}  out of order {}  seq gaps {}",
                self.delivered,
                self.rates.delivered_per_s,
                self.expected,
                self.lost,
                self.duplicated,
                self.out_of_order,
                self.seq_gaps
            );
            if self.unconfirmed_deliveries > 0 {
                let _ = writeln!(
                    o,
                    "  unconfirmed   {:>12}  deliveries of events whose publish was refused or unanswered",
                    self.unconfirmed_deliveries
                );
            }
            let _ = writeln!(
                o,
                "  subscribers   {:>12}  subscribed, {} failed, {} disconnected by the server {:?}, gap notices {}",
                self.connections.subscribed,
                self.connections.subscribe_failed,
                self.disconnected,
                self.close_codes,
                self.gap_notices
            );
            pct_line(&mut o, "latency", &self.latency_us);
        }
        if self.config.scenario.publishes() {
            pct_line(&mut o, "ack latency", &self.ack_latency_us);
            if self.send_lag_us.count > 0 {
                pct_line(&mut o, "send lag", &self.send_lag_us);
            }
        }
        if let Some(conn) = &self.connect {
            let _ = writeln!(
                o,
                "  handshakes    {:>12}  ({:.1}/s)   failures {}   close {}",
                conn.handshakes,
                conn.handshakes_per_s,
                conn.failures,
                self.config.close.name()
            );
            pct_line(&mut o, "handshake", &conn.latency_us);
        }
        if self.steps.len() > 1 || self.config.scenario == Scenario::Connect {
            o.push('\n');
            let (level, count, per) = match self.config.scenario {
                Scenario::Connect => ("conc", "handshakes", "handshakes/s"),
                Scenario::Ingest => ("rate/s", "published", "published/s"),
                _ => ("rate/s", "published", "delivered/s"),
            };
            let _ = writeln!(
                o,
                "  {:>4} {:>9} {:>10} {:>13} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>6}",
                "step",
                level,
                count,
                per,
                "p50 µs",
                "p99 µs",
                "p99.9 µs",
                "max µs",
                "lost",
                "failed",
                "cpu%"
            );
            for s in &self.steps {
                let (count, per_s, l) = match self.config.scenario {
                    Scenario::Connect => (s.delivered, s.delivered_per_s, &s.latency_us),
                    Scenario::Ingest => (s.published, s.published_per_s, &s.ack_latency_us),
                    _ => (s.published, s.delivered_per_s, &s.latency_us),
                };
                let _ = writeln!(
                    o,
                    "  {:>4} {:>9} {:>10} {:>13.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8} {:>8} {:>6.1}",
                    s.index, s.rate, count, per_s, l.p50, l.p99, l.p999, l.max, s.lost, s.failed, s.cpu_percent
                );
            }
        }
        if let Some(r) = &self.ramp {
            o.push('\n');
            let show = |s: &Option<StepRef>| match s {
                Some(s) => format!(
                    "step {} at {}/s ({:.1} deliveries/s, p99 {:.1} µs)",
                    s.index, s.rate, s.delivered_per_s, s.p99_us
                ),
                None => "none".into(),
            };
            let _ = writeln!(
                o,
                "  best with p99 <= 10 ms, no loss:  {}",
                show(&r.best_p99_under_10ms)
            );
            let _ = writeln!(
                o,
                "  best with p99 <= 100 ms, no loss: {}",
                show(&r.best_p99_under_100ms)
            );
            if let Some(why) = &r.stopped_early {
                let _ = writeln!(o, "  ramp stopped: {why}");
            }
        }
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                o,
                "  {server} pid {}  RSS before {} KiB",
                idle.server_pid, idle.server_rss_before_kib
            );
            let _ = writeln!(
                o,
                "  {:>11} {:>11} {:>14} {:>14} {:>16} {:>14}",
                "connections",
                "subscribed",
                "server RSS KiB",
                "bytes/conn",
                "marginal B/conn",
                "loadgen KiB"
            );
            for s in &idle.steps {
                let _ = writeln!(
                    o,
                    "  {:>11} {:>11} {:>14} {:>14.0} {:>16.0} {:>14}",
                    s.connections,
                    s.subscribed,
                    s.server_rss_kib,
                    s.rss_per_conn_bytes,
                    s.marginal_bytes_per_conn,
                    s.loadgen_rss_kib
                );
            }
        }
        o.push('\n');
        let _ = writeln!(
            o,
            "  generator CPU {:.1}% of one core (user {:.2} s, system {:.2} s), RSS {} KiB",
            self.cpu.percent_of_one_core, self.cpu.user_s, self.cpu.system_s, self.loadgen_rss_kib
        );
        if self.foreign + self.protocol_errors > 0 {
            let _ = writeln!(
                o,
                "  foreign events {}  protocol errors {}",
                self.foreign, self.protocol_errors
            );
        }
        for n in &self.notes {
            let _ = writeln!(o, "  note: {n}");
        }
        o
    }
}

fn pct_line(o: &mut String, what: &str, p: &Percentiles) {
    let _ = writeln!(
        o,
        "  {:<13} µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
        what, p.p50, p.p90, p.p99, p.p999, p.max, p.count
    );
}

/// The ramp's answer: the highest clean steps under 10 ms and 100 ms p99.
pub fn summarise(scenario: Scenario, steps: &[StepReport], stopped: Option<String>) -> RampSummary {
    let best = |limit_us: f64| {
        steps
            .iter()
            .filter(|s| {
                let l = if scenario == Scenario::Ingest {
                    &s.ack_latency_us
                } else {
                    &s.latency_us
                };
                l.count > 0 && l.p99 <= limit_us && s.lost == 0 && s.failed == 0
            })
            .max_by_key(|s| s.rate)
            .map(|s| StepRef {
                index: s.index,
                rate: s.rate,
                delivered_per_s: if scenario == Scenario::Ingest {
                    s.published_per_s
                } else {
                    s.delivered_per_s
                },
                p99_us: if scenario == Scenario::Ingest {
                    s.ack_latency_us.p99
                } else {
                    s.latency_us.p99
                },
            })
    };
    RampSummary {
        best_p99_under_10ms: best(10_000.0),
        best_p99_under_100ms: best(100_000.0),
        stopped_early: stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Options;
    use crate::stats::bump;

    fn step(index: usize, rate: u64, p99: f64, lost: u64) -> StepReport {
        StepReport {
            index,
            rate,
            duration_s: 1.0,
            sent: rate,
            published: rate,
            failed: 0,
            expected: rate,
            delivered: rate - lost,
            lost,
            published_per_s: rate as f64,
            delivered_per_s: rate as f64,
            latency_us: Percentiles {
                count: 10,
                p99,
                ..Default::default()
            },
            ack_latency_us: Percentiles::default(),
            cpu_percent: 1.0,
        }
    }

    #[test]
    fn ramp_summary_picks_the_highest_clean_steps() {
        let steps = vec![
            step(0, 1000, 800.0, 0),
            step(1, 2000, 5000.0, 0),
            step(2, 4000, 50_000.0, 0),
            step(3, 8000, 60_000.0, 3),
            step(4, 16000, 500_000.0, 0),
        ];
        let s = summarise(Scenario::Fanout, &steps, Some("p99".into()));
        assert_eq!(s.best_p99_under_10ms.unwrap().rate, 2000);
        assert_eq!(s.best_p99_under_100ms.unwrap().rate, 4000);
        let s = summarise(Scenario::Fanout, &steps[4..], None);
        assert!(s.best_p99_under_10ms.is_none());
    }

    #[test]
    fn json_report_has_the_documented_shape() {
        let mut o = Options::new(Scenario::Latency);
        o.threads = 2;
        o.token = Some("secret".into());
        let shared = Shared::new(&o, "t");
        bump(&shared.stats[0].step(0).sent, 10);
        bump(&shared.stats[0].step(0).published, 10);
        bump(&shared.stats[1].step(0).expected, 100);
        bump(&shared.stats[1].step(0).delivered, 98);
        shared.stats[0].add(C::S429, 2);
        shared.stats[1].add(C::Close1013, 1);
        let mut hists = Hists::default();
        for v in [1000u64, 2000, 3000] {
            hists.latency(0).saturating_record(v);
        }
        let runs = [StepRun {
            index: 0,
            level: 5000,
            start_ns: 0,
            end_ns: 1_000_000_000,
            cpu_percent: 12.5,
        }];
        let r = Report::build(Inputs {
            shared: &shared,
            hists: &hists,
            runs: &runs,
            driver: "io_uring".into(),
            elapsed_s: 1.5,
            cpu: Cpu::default(),
            stopped_early: None,
            idle: None,
            notes: vec!["n".into()],
        });
        assert_eq!(
            (r.published, r.expected, r.delivered, r.lost),
            (10, 100, 98, 2)
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(v.is_object());
        for key in [
            "scenario",
            "published",
            "expected",
            "delivered",
            "lost",
            "duplicated",
            "out_of_order",
            "disconnected",
            "publish_failed",
            "rates",
            "latency_us",
            "steps",
            "cpu",
            "config",
            "send_lag_us",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_us"][key].is_number(), "latency_us.{key}");
        }
        assert_eq!(v["latency_us"]["count"], 3);
        assert!((v["latency_us"]["p50"].as_f64().unwrap() - 2.0).abs() < 0.01);
        assert_eq!(v["publish_errors_by_status"]["429"], 2);
        assert_eq!(v["close_codes"]["1013"], 1);
        assert_eq!(v["steps"][0]["rate"], 5000);
        assert_eq!(v["steps"][0]["lost"], 2);
        assert!(v["cpu"]["percent_of_one_core"].is_number());
        assert_eq!(v["config"]["scenario"], "latency");
        assert_eq!(v["target_kind"], "relay");
        assert_eq!(v["publish_target"], "127.0.0.1:8004");
        assert!(v["config"].get("nats_publish_addr").is_none());
        assert!(!r.to_json().contains("secret"));
        assert!(v["ramp"].is_null());
        let table = r.to_table();
        assert!(
            table.contains("delivered") && table.contains("lost 2"),
            "{table}"
        );
    }

    #[test]
    fn rates_never_divide_by_zero() {
        assert_eq!(per_s(10, 0), 0.0);
        assert_eq!(per_s(10, 2_000_000_000), 5.0);
    }
}
