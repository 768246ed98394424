//! The control thread: runs the scenario's phases against the generator threads.
//!
//! Owns the order of a run (checks, fd limit, reachability, threads up, subscribers
//! subscribed, then the publish steps / handshake steps / idle steps, each with its drain),
//! the ramp's stop rule, the live progress line, the hard deadline, and handing the merged
//! statistics to `Report::build`. **Boundary:** it talks to generator threads only through
//! `Shared` (atomics it writes, counters it reads, histogram copies it merges); it never
//! blocks without a bound.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{now_ns, secs_to_ns};
use crate::error::LoadgenError;
use crate::net;
use crate::options::{Options, RatePlan, Scenario, TargetKind};
use crate::report::{Cpu, IdleReport, IdleStep, Inputs, Report, StepRun};
use crate::stats::{Hists, Percentiles, C};
use crate::worker::{Pool, Shared};

/// Publishing starts this long after the control thread announces a step, so every publisher
/// has seen it before its first event is due.
const STEP_LEAD: Duration = Duration::from_millis(20);
/// After the first subscriber failure, how long to wait for the rest before giving up.
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Runs the scenario described by `opts` to the end and reports.
pub fn run(opts: &Options) -> Result<Report, LoadgenError> {
    opts.validate()?;
    let started = Instant::now();
    crate::clock::origin();
    let cpu_start = net::cpu_seconds();
    let threads = opts.thread_count() as u64;
    // Connections, plus each thread's ring, eventfd and timer, plus stdio and slack.
    let needed = opts.max_connections() as u64 + 8 * threads + 64;
    net::raise_fd_limit(needed)?;
    let connect_timeout = Duration::from_millis(opts.connect_timeout_ms);
    match opts.target_kind {
        TargetKind::Relay => net::preflight(opts.target, connect_timeout, "the relay", "--target")?,
        TargetKind::Nats => {
            net::preflight(
                opts.target,
                connect_timeout,
                "nats-server's WebSocket listener",
                "--target",
            )?;
            if opts.scenario.publishes() {
                net::preflight(
                    opts.nats_publish_target(),
                    connect_timeout,
                    "nats-server's client port",
                    "--nats-publish-addr",
                )?;
            }
        }
    }
    let server_pid = if opts.scenario == Scenario::Idle {
        Some(match opts.server_pid {
            Some(pid) => pid,
            None => net::find_listener_pid(opts.target)?,
        })
    } else {
        None
    };

    let shared = Arc::new(Shared::new(opts, &run_id()));
    let pool = Pool::start(shared.clone())?;
    let mut ctl = Control {
        shared: shared.clone(),
        deadline: started + Duration::from_secs_f64(opts.deadline()),
        deadline_s: opts.deadline(),
        progress: Progress::new(opts.progress),
        runs: Vec::new(),
        stopped_early: None,
        idle: None,
        notes: Vec::new(),
        started,
    };
    let outcome = match opts.scenario {
        s if s.publishes() => ctl.run_publish(&pool),
        Scenario::Connect => ctl.run_connect(&pool),
        Scenario::Idle => ctl.run_idle(server_pid.unwrap_or_default()),
        _ => Ok(()),
    };
    ctl.progress.finish();
    let driver = pool.driver_names();
    pool.stop(Duration::from_secs(5));
    outcome?;

    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu_end = net::cpu_seconds();
    let user_s = cpu_end.0 - cpu_start.0;
    let system_s = cpu_end.1 - cpu_start.1;
    let hists = merged(&shared);
    Ok(Report::build(Inputs {
        shared: &shared,
        hists: &hists,
        runs: &ctl.runs,
        driver,
        elapsed_s,
        cpu: Cpu {
            user_s: round3(user_s),
            system_s: round3(system_s),
            percent_of_one_core: round1(percent(user_s + system_s, elapsed_s)),
        },
        stopped_early: ctl.stopped_early,
        idle: ctl.idle,
        notes: ctl.notes,
    }))
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn percent(cpu_s: f64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        cpu_s / wall_s * 100.0
    } else {
        0.0
    }
}

/// A name part unique to this run (process id, time, and a counter for runs in one process).
fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{:x}{:x}{n:x}", std::process::id(), t & 0xff_ffff)
}

/// The threads' histograms merged.
fn merged(shared: &Shared) -> Hists {
    let mut all = Hists::default();
    for s in &shared.stats {
        if let Ok(h) = s.hists.lock() {
            all.merge(&h);
        }
    }
    all
}

/// The p99 of one step's latency (or ack latency) over all threads, in µs.
fn step_percentiles(shared: &Shared, step: usize, ack: bool) -> Percentiles {
    let mut h = crate::stats::new_histogram();
    for s in &shared.stats {
        if let Ok(hists) = s.hists.lock() {
            let part = if ack {
                &hists.steps[step].ack
            } else {
                &hists.steps[step].latency
            };
            if let Some(p) = part {
                let _ = h.add(p);
            }
        }
    }
    Percentiles::of(Some(&h))
}

struct Control {
    shared: Arc<Shared>,
    deadline: Instant,
    deadline_s: f64,
    progress: Progress,
    runs: Vec<StepRun>,
    stopped_early: Option<String>,
    idle: Option<IdleReport>,
    notes: Vec<String>,
    started: Instant,
}

impl Control {
    fn check_deadline(&self, phase: &str) -> Result<(), LoadgenError> {
        if Instant::now() >= self.deadline {
            return Err(LoadgenError::Deadline {
                deadline_s: self.deadline_s,
                phase: phase.to_string(),
            });
        }
        Ok(())
    }

    /// Sleeps a little and prints progress; errors past the deadline.
    fn tick(&mut self, phase: &str, step: Option<(usize, usize, u64)>) -> Result<(), LoadgenError> {
        self.check_deadline(phase)?;
        self.progress
            .maybe_print(&self.shared, self.started, phase, step);
        std::thread::sleep(Duration::from_millis(5));
        Ok(())
    }

    /// Notes a step in which the generator itself was close to saturated: its own queueing is
    /// then part of what it measured.
    fn saturation_note(&mut self, k: usize, cpu_percent: f64) {
        let threads = self.shared.thread_count;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let capacity = 100.0 * threads.min(cores) as f64;
        if cpu_percent >= 0.9 * capacity {
            self.notes.push(format!(
                "step {k}: the generator used {cpu_percent:.0}% CPU with {threads} thread(s): \
                 near saturation, so its own delays are in these figures; give it more \
                 cores (--threads, taskset)"
            ));
        }
    }

    /// Lets subscribers up to `count` connect and waits until each is subscribed.
    fn wait_subscribed(&mut self, count: usize) -> Result<(), LoadgenError> {
        let shared = self.shared.clone();
        shared.admit.store(count, Ordering::Relaxed);
        let bound = Instant::now() + Duration::from_secs_f64(shared.opts.subscribe_timeout_s);
        let mut first_failure: Option<Instant> = None;
        loop {
            let subscribed = shared.total(C::Subscribed);
            let failed = shared.total(C::SubFailed);
            if subscribed >= count as u64 {
                return Ok(());
            }
            if failed > 0 {
                let since = *first_failure.get_or_insert_with(Instant::now);
                if subscribed + failed >= count as u64 || since.elapsed() >= FAILURE_GRACE {
                    let first = shared
                        .stats
                        .iter()
                        .find_map(|s| s.notes.lock().ok().and_then(|n| n.first().cloned()))
                        .unwrap_or_else(|| "(no message)".into());
                    return Err(LoadgenError::Setup {
                        failed,
                        total: count as u64,
                        first,
                    });
                }
            }
            if Instant::now() >= bound {
                return Err(LoadgenError::SubscribeTimeout {
                    subscribed,
                    total: count as u64,
                    timeout_s: shared.opts.subscribe_timeout_s,
                });
            }
            self.tick("subscribing", None)?;
        }
    }

    /// Until every publisher has tried its first connection, at most the connect timeout and
    /// a second: the first step's schedule starts with them connected. A publisher that
    /// failed tries again in the step (and its failures are counted there too).
    fn wait_publishers_connected(&mut self, publishers: u64) -> Result<(), LoadgenError> {
        let shared = self.shared.clone();
        let bound = Instant::now()
            + Duration::from_millis(shared.opts.connect_timeout_ms)
            + Duration::from_secs(1);
        while shared.total(C::PubsOpen) + shared.total(C::PubConnectFailed) < publishers
            && Instant::now() < bound
        {
            self.tick("connecting publishers", None)?;
        }
        Ok(())
    }

    fn run_publish(&mut self, pool: &Pool) -> Result<(), LoadgenError> {
        let shared = self.shared.clone();
        let opts = &shared.opts;
        let subscribers = opts.subscriber_connections();
        if subscribers > 0 {
            self.wait_subscribed(subscribers)?;
        }
        self.wait_publishers_connected(opts.publishers as u64)?;
        let rates = opts.rate_steps();
        let step_ns = secs_to_ns(opts.publish_step_s());
        let drain_ns = opts.drain_ms * 1_000_000;
        let publishers = opts.publishers as u64;
        let ramp = matches!(opts.rate, RatePlan::Ramp(_));
        for (k, &rate) in rates.iter().enumerate() {
            let start = now_ns() + STEP_LEAD.as_nanos() as u64;
            let end = start + step_ns;
            let bound = end + drain_ns;
            shared.step_starts[k].store(start, Ordering::Relaxed);
            shared.current_step.store(k, Ordering::Relaxed);
            shared.phase.publish(k, start, end, rate, bound);
            let cpu_a = net::cpu_seconds();
            let wall_a = Instant::now();
            let step = Some((k, rates.len(), rate));
            while now_ns() < end {
                self.tick("publishing", step)?;
            }
            // Drain: every publisher done, every request answered, every delivery in.
            loop {
                let done = shared.total(C::PubStepsDone) >= publishers * (k as u64 + 1);
                let sent = shared.step_total(k, |s| &s.sent);
                let answered =
                    shared.step_total(k, |s| &s.published) + shared.step_total(k, |s| &s.failed);
                let expected = shared.step_total(k, |s| &s.expected);
                let delivered = shared.step_total(k, |s| &s.delivered);
                if done && answered >= sent && delivered >= expected {
                    break;
                }
                // Publishers stop at `bound`; a little slack for them to say so.
                if now_ns() >= bound + 200_000_000 {
                    break;
                }
                self.tick("draining", step)?;
            }
            let cpu_percent = self.end_step(k, rate, start, end, cpu_a, wall_a);
            pool.flush();
            let ingest = opts.scenario == Scenario::Ingest;
            let p = step_percentiles(&shared, k, ingest);
            let expected = shared.step_total(k, |s| &s.expected);
            let delivered = shared.step_total(k, |s| &s.delivered);
            let failed = shared.step_total(k, |s| &s.failed);
            let lost = expected.saturating_sub(delivered);
            self.progress
                .step_done(k, rate, &p, lost, failed, cpu_percent);
            if ramp && k + 1 < rates.len() {
                let why = if p.p99 > opts.stop_p99_ms * 1000.0 {
                    Some(format!(
                        "step {k} ({rate}/s) had p99 {:.1} ms > --stop-p99-ms {}",
                        p.p99 / 1000.0,
                        opts.stop_p99_ms
                    ))
                } else if lost > 0 || failed > 0 {
                    Some(format!(
                        "step {k} ({rate}/s) lost {lost} deliveries and {failed} publishes"
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    self.stopped_early = Some(why);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Records step `k` (its level, span and the generator's CPU use since `cpu_a`/`wall_a`)
    /// and notes a saturated generator; returns the CPU use in percent of one core.
    fn end_step(
        &mut self,
        k: usize,
        level: u64,
        start: u64,
        end: u64,
        cpu_a: (f64, f64),
        wall_a: Instant,
    ) -> f64 {
        let cpu_b = net::cpu_seconds();
        let cpu_percent = round1(percent(
            (cpu_b.0 + cpu_b.1) - (cpu_a.0 + cpu_a.1),
            wall_a.elapsed().as_secs_f64(),
        ));
        self.runs.push(StepRun {
            index: k,
            level,
            start_ns: start,
            end_ns: end,
            cpu_percent,
        });
        self.saturation_note(k, cpu_percent);
        cpu_percent
    }

    fn run_connect(&mut self, pool: &Pool) -> Result<(), LoadgenError> {
        let shared = self.shared.clone();
        let opts = &shared.opts;
        let levels = opts.concurrency_steps();
        let step_ns = secs_to_ns(opts.connect_step_s());
        for (k, &level) in levels.iter().enumerate() {
            let start = now_ns();
            shared.step_starts[k].store(start, Ordering::Relaxed);
            shared.current_step.store(k, Ordering::Relaxed);
            shared.concurrency.store(level, Ordering::Relaxed);
            let cpu_a = net::cpu_seconds();
            let wall_a = Instant::now();
            let end = start + step_ns;
            let step = Some((k, levels.len(), level as u64));
            while now_ns() < end {
                self.tick("handshaking", step)?;
            }
            self.end_step(k, level as u64, start, end, cpu_a, wall_a);
        }
        shared.concurrency.store(0, Ordering::Relaxed);
        // Handshakes under way finish within the connect timeout; give them a moment.
        std::thread::sleep(Duration::from_millis(100));
        pool.flush();
        Ok(())
    }

    fn run_idle(&mut self, pid: u32) -> Result<(), LoadgenError> {
        let shared = self.shared.clone();
        let opts = &shared.opts;
        let before = net::rss_kib(pid)?;
        let mut report = IdleReport {
            server_pid: pid,
            server_rss_before_kib: before,
            steps: Vec::new(),
        };
        let mut prev = (0usize, before);
        for (k, &count) in opts.idle_steps.iter().enumerate() {
            if let Err(e) = self.wait_subscribed(count) {
                if k == 0 {
                    return Err(e);
                }
                self.notes
                    .push(format!("stopped before {count} connections: {e}"));
                break;
            }
            let settle = Instant::now() + Duration::from_secs_f64(opts.settle_s);
            while Instant::now() < settle {
                self.tick("settling", Some((k, opts.idle_steps.len(), count as u64)))?;
            }
            let rss = net::rss_kib(pid)?;
            let delta = |from: u64| (rss as f64 - from as f64) * 1024.0;
            report.steps.push(IdleStep {
                connections: count,
                subscribed: shared.total(C::Subscribed),
                server_rss_kib: rss,
                rss_per_conn_bytes: (delta(before) / count as f64).round(),
                marginal_bytes_per_conn: (delta(prev.1) / (count - prev.0) as f64).round(),
                loadgen_rss_kib: net::own_rss_kib(),
            });
            self.progress
                .idle_step(opts.target_kind.server_name(), count, rss, before);
            prev = (count, rss);
        }
        self.idle = Some(report);
        Ok(())
    }
}

/// The live progress line on stderr, once a second.
struct Progress {
    enabled: bool,
    tty: bool,
    last: Instant,
    last_counts: [u64; 4],
    printed: bool,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            last_counts: [0; 4],
            printed: false,
        }
    }

    fn maybe_print(
        &mut self,
        shared: &Shared,
        started: Instant,
        phase: &str,
        step: Option<(usize, usize, u64)>,
    ) {
        if !self.enabled || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let dt = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let opts = &shared.opts;
        let current = shared.current_step.load(Ordering::Relaxed);
        let sum_steps = |f: fn(&crate::stats::StepCounters) -> &AtomicU64| -> u64 {
            (0..=current).map(|k| shared.step_total(k, f)).sum()
        };
        let counts = [
            sum_steps(|s| &s.sent),
            sum_steps(|s| &s.published),
            sum_steps(|s| &s.delivered),
            shared.total(C::Handshakes),
        ];
        let rate = |i: usize| (counts[i] - self.last_counts[i].min(counts[i])) as f64 / dt;
        let mut line = format!("[{:>6.1}s] {phase}", started.elapsed().as_secs_f64());
        if let Some((k, n, level)) = step {
            let what = match opts.scenario {
                Scenario::Connect => format!("{level} conc"),
                Scenario::Idle => format!("{level} conns"),
                _ if level == 0 => "max rate".into(),
                _ => format!("{level}/s"),
            };
            line.push_str(&format!(" step {}/{} {what}", k + 1, n));
        }
        match opts.scenario {
            Scenario::Connect => {
                let p = step_percentiles(shared, current, false);
                line.push_str(&format!(
                    " | {:.0} handshakes/s p99 {} | failures {}",
                    rate(3),
                    fmt_us(p.p99),
                    shared.total(C::HandshakeFailures)
                ));
            }
            Scenario::Idle => {
                line.push_str(&format!(
                    " | subscribed {} open {} failed {}",
                    shared.total(C::Subscribed),
                    shared.total(C::SubsOpen),
                    shared.total(C::SubFailed)
                ));
            }
            s => {
                let p = step_percentiles(shared, current, s == Scenario::Ingest);
                line.push_str(&format!(" | sent {} acked {}", si(rate(0)), si(rate(1))));
                if s.delivers() {
                    line.push_str(&format!(" delivered {}", si(rate(2))));
                }
                line.push_str(&format!(
                    " p99 {} | subs {} pubs {} | errors {} disc {}",
                    fmt_us(p.p99),
                    shared.total(C::SubsOpen),
                    shared.total(C::PubsOpen),
                    shared.total(C::PublishErrorReplies) + shared.total(C::PublishNoReply),
                    shared.total(C::Disconnected)
                ));
            }
        }
        self.last_counts = counts;
        self.emit(&line);
    }

    fn emit(&mut self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.printed = true;
    }

    /// A permanent line for a finished step.
    fn step_done(
        &mut self,
        k: usize,
        rate: u64,
        p: &Percentiles,
        lost: u64,
        failed: u64,
        cpu: f64,
    ) {
        if !self.enabled {
            return;
        }
        let rate = if rate == 0 {
            "max rate".to_string()
        } else {
            format!("{rate}/s")
        };
        self.finish();
        eprintln!(
            "step {k} {rate}: p50 {} p99 {} p99.9 {} max {} | lost {lost} failed {failed} | cpu {cpu:.0}%",
            fmt_us(p.p50),
            fmt_us(p.p99),
            fmt_us(p.p999),
            fmt_us(p.max)
        );
    }

    fn idle_step(&mut self, server: &str, count: usize, rss: u64, before: u64) {
        if !self.enabled {
            return;
        }
        self.finish();
        let per = (rss as f64 - before as f64) * 1024.0 / count as f64;
        eprintln!("{count} idle connections: {server} RSS {rss} KiB ({per:.0} bytes/conn)");
    }

    /// Ends an overwritten line so what follows starts clean.
    fn finish(&mut self) {
        if self.enabled && self.tty && self.printed {
            eprintln!();
        }
        self.printed = false;
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_differ_within_a_process() {
        assert_ne!(run_id(), run_id());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_us(12.4), "12µs");
        assert_eq!(fmt_us(1500.0), "1.50ms");
        assert_eq!(si(1_500_000.0), "1.50M/s");
        assert_eq!(si(2500.0), "2.5k/s");
        assert_eq!(si(3.0), "3/s");
        assert_eq!(percent(1.0, 2.0), 50.0);
        assert_eq!(percent(1.0, 0.0), 0.0);
    }

    #[test]
    fn invalid_options_fail_before_any_io() {
        let mut o = Options::new(Scenario::Latency);
        o.subscribers = 0;
        assert!(matches!(run(&o), Err(LoadgenError::Config(_))));
    }

    #[test]
    fn nothing_listening_is_a_clear_error() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = unused.local_addr().unwrap();
        drop(unused);
        let mut o = Options::with_target(Scenario::Latency, addr);
        o.progress = false;
        match run(&o) {
            Err(LoadgenError::TargetUnreachable { target, .. }) => assert_eq!(target, addr),
            other => panic!("expected TargetUnreachable, got {other:?}"),
        }
    }
}
