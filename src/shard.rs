//! One shard: a thread pinned to a core, running its own monoio runtime.
//!
//! Owns everything that lives on its thread: its listener, its connections ([`ConnCtl`]), the
//! channels it owns ([`Owned`]), its local subscribers ([`LocalSubs`]), its outbox and its
//! stats. Other shards reach this state only through [`Msg`]s on the mesh; handlers on this
//! shard reach other shards only through the async service methods here (`publish`,
//! `subscribe`, `history`, `channels`), which route by [`shard_of`].
//!
//! Must never: share its `Rc` state with another thread, block the runtime, or queue without
//! a bound (a congested outbox refuses publishes, which the API answers with 503).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ahash::AHashMap;
use bytes::Bytes;
use futures_channel::oneshot;
use smallvec::SmallVec;

use crate::answers::{AnswerKey, Answers, Awaited};
use crate::bus::event::{Draft, Drafts, Event};
use crate::bus::{
    shard_of, ChannelPage, ChannelQuery, HistoryPage, LocalSubs, Member, Owned, Published, Since,
    Subscribed,
};
use crate::clock::{Stamp, WallClock};
use crate::config::Config;
use crate::mesh::{Mesh, Outbox};
use crate::metrics::{ShardStats, Transport};
use crate::park::{self, Resume};

/// What shards say to each other.
pub enum Msg {
    /// To the owner: sequence these drafts (all owned by the receiver), in order.
    Publish {
        drafts: Vec<Draft>,
        answer: AnswerKey,
    },
    /// From the owner, back to the shard that sent [`Msg::Publish`]: its answer. It follows
    /// the deliveries the publish sent the same way (one outbox queue, in order).
    Published {
        answer: AnswerKey,
        outcome: OwnerAnswer,
    },
    /// To the owner: one more subscriber on `shard`; with `since`, send the missed events.
    Subscribe {
        channel: Arc<str>,
        shard: usize,
        since: Option<Since>,
        /// (user, connection) for presence; `None` for subscribers presence does not list.
        member: Option<(Arc<str>, Arc<str>)>,
        reply: oneshot::Sender<Subscribed>,
    },
    /// To the owner: one subscriber fewer on `shard`.
    Unsubscribe {
        channel: Arc<str>,
        shard: usize,
        member_conn: Option<Arc<str>>,
    },
    /// From the owner to a shard with subscribers: a presence push (a WebSocket frame).
    Push { channel: Arc<str>, frame: Bytes },
    /// To shard 0: a registry change.
    Control(crate::registry::control::Command),
    /// To the owner: who is on the channel (`Err` when presence is off for it).
    Presence {
        channel: Arc<str>,
        reply: oneshot::Sender<Result<Vec<Member>, ()>>,
    },
    /// To the owner: a page of history.
    History {
        channel: Arc<str>,
        since: u64,
        limit: usize,
        reply: oneshot::Sender<Option<HistoryPage>>,
    },
    /// From the owner to a shard with subscribers: write this to them.
    Deliver(Arc<Event>),
    /// To every shard: a page of the channels you own.
    ListChannels {
        query: ChannelQuery,
        reply: oneshot::Sender<ChannelPage>,
    },
}

/// One event's outcome in a batch publish.
pub type PublishOutcome = Result<Published, BusError>;

/// Every event's outcome of one publish, in input order. Most publishes carry one event: its
/// outcome is held inline, without a heap allocation.
pub type PublishOutcomes = SmallVec<[PublishOutcome; 1]>;

/// What the owner sequenced, one entry per draft (inline for one draft).
type Sequenced = SmallVec<[Published; 1]>;

/// What an owner shard answers for the drafts it was sent.
pub type OwnerAnswer = Result<Accepted, BusError>;

/// An owner's answer on its way: a slot of this shard's [`Answers`].
type AwaitedAnswer = Awaited<OwnerAnswer>;

/// The drafts an owner sequenced, in their order. One draft's result travels inline, so the
/// common answer (a single event) carries no vector from the owner's heap to the sender's.
#[derive(Debug)]
pub enum Accepted {
    One(Published),
    Many(Vec<Published>),
}

impl Accepted {
    fn new(published: Sequenced) -> Accepted {
        match published.into_inner() {
            Ok([one]) => Accepted::One(one),
            Err(published) => Accepted::Many(published.into_vec()),
        }
    }
}

/// A publish started by [`Shard::publish_start`], its owners' answers still to come.
pub enum PublishTicket {
    /// Every draft was this shard's own.
    Done(PublishOutcomes),
    /// Every draft went to one other owner, in input order: its answer is the outcome.
    Forwarded(AwaitedAnswer),
    /// Answers so far by input position, and the owners still to answer with the positions
    /// their answers fill.
    Waiting {
        answers: Vec<Option<PublishOutcome>>,
        waiting: Vec<(Vec<usize>, AwaitedAnswer)>,
    },
}

impl PublishTicket {
    /// Every draft's outcome when all the answers are here already; the ticket back otherwise.
    pub fn try_finish(self) -> Result<Result<PublishOutcomes, BusError>, PublishTicket> {
        match self {
            PublishTicket::Done(done) => Ok(Ok(done)),
            PublishTicket::Forwarded(mut answer) => match answer.try_take() {
                Some(answer) => Ok(answer.map(all_accepted)),
                None => Err(PublishTicket::Forwarded(answer)),
            },
            PublishTicket::Waiting { answers, waiting } if waiting.is_empty() => {
                Ok(outcomes(answers))
            }
            waiting => Err(waiting),
        }
    }

    /// Every draft's outcome, in input order. `Err` when nothing was accepted, as if it had
    /// been refused up front.
    pub async fn finish(mut self) -> Result<PublishOutcomes, BusError> {
        poll_fn(|cx| self.poll_finish(cx)).await
    }

    /// [`PublishTicket::finish`] as a poll, for a caller that keeps the ticket in its own
    /// state (a connection with pipelined publishes) instead of holding a future for it: the
    /// waiting costs the caller no state of its own. Each owner's answer is placed as it
    /// arrives; ready once every one is in. Not to be polled again after it was ready.
    pub fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<PublishOutcomes, BusError>> {
        match self {
            PublishTicket::Done(done) => Poll::Ready(Ok(std::mem::take(done))),
            PublishTicket::Forwarded(answer) => Pin::new(answer)
                .poll(cx)
                .map(|answer| answer.map(all_accepted)),
            PublishTicket::Waiting { answers, waiting } => {
                let mut at = 0;
                while at < waiting.len() {
                    match Pin::new(&mut waiting[at].1).poll(cx) {
                        Poll::Ready(answer) => {
                            let (indexes, _) = waiting.swap_remove(at);
                            place(answers, indexes, answer);
                        }
                        Poll::Pending => at += 1,
                    }
                }
                if waiting.is_empty() {
                    Poll::Ready(outcomes(std::mem::take(answers)))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

/// One owner's answer for a whole batch, every draft accepted.
fn all_accepted(published: Accepted) -> PublishOutcomes {
    match published {
        Accepted::One(one) => smallvec::smallvec![Ok(one)],
        Accepted::Many(many) => many.into_iter().map(Ok).collect(),
    }
}

/// The shard that owns every draft's channel, when it is one shard (and there is a draft).
fn sole_owner(drafts: &[Draft], shards: usize) -> Option<usize> {
    let (first, rest) = drafts.split_first()?;
    let owner = shard_of(&first.channel, shards);
    rest.iter()
        .all(|d| shard_of(&d.channel, shards) == owner)
        .then_some(owner)
}

/// The outcomes of a publish whose every answer is in; nothing accepted is a plain refusal.
fn outcomes(answers: Vec<Option<PublishOutcome>>) -> Result<PublishOutcomes, BusError> {
    let answers: PublishOutcomes = answers
        .into_iter()
        .map(|a| a.unwrap_or(Err(BusError::Unavailable)))
        .collect();
    match answers.iter().find_map(|a| a.as_ref().err()) {
        Some(&e) if answers.iter().all(Result::is_err) => Err(e),
        _ => Ok(answers),
    }
}

/// Puts one owner's answer for its drafts into their input positions.
fn place(answers: &mut [Option<PublishOutcome>], indexes: Vec<usize>, answer: OwnerAnswer) {
    match answer {
        Ok(Accepted::One(one)) => {
            if let Some(&i) = indexes.first() {
                answers[i] = Some(Ok(one));
            }
        }
        Ok(Accepted::Many(many)) => {
            for (i, p) in indexes.into_iter().zip(many) {
                answers[i] = Some(Ok(p));
            }
        }
        Err(e) => indexes.into_iter().for_each(|i| answers[i] = Some(Err(e))),
    }
}

/// Errors of the bus layer, each mapped to an HTTP status by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusError {
    /// A ring or outbox toward `shard` is full: back off and retry (503 + Retry-After).
    Congested { shard: usize },
    /// The other shard went away (only during shutdown).
    Unavailable,
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusError::Congested { shard } => write!(
                f,
                "the relay is overloaded (shard {shard}'s queue is full); retry shortly"
            ),
            BusError::Unavailable => write!(f, "the relay is shutting down"),
        }
    }
}

impl std::error::Error for BusError {}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over `limits.max_connections` (503).
    Full,
    /// Over `limits.max_connections_per_ip` (429).
    PerIp,
}

/// How many subscribers' writes a publisher's answer lets go first (see
/// [`Shard::local_deliveries_first`]). Each is a few microseconds of kernel time: a handful
/// ahead saves each of them the answer's send, while a large fan-out ahead (a thousand
/// subscribers: milliseconds) would hold the answer, and with it a pipelining publisher's
/// next sends once its window is full, for the whole fan-out.
pub const DELIVERIES_BEFORE_ANSWERS: usize = 16;

/// While write pacing holds writes, the deliverer gathers events for this share (1/N) of the
/// hold before offering them (see [`Shard::deliverer`]).
const GATHER_SHARE_OF_HOLD: u32 = 8;
/// A gathering deliverer offers at once when this many events wait: the gathered batch stays
/// bounded whatever the rate.
const GATHER_EVENTS_MAX: usize = 1024;

/// Process-wide facts every shard reads; written rarely (start, drain).
pub struct Shared {
    pub config: Arc<Config>,
    pub shards: usize,
    pub mesh: Arc<Mesh<Msg>>,
    pub stats: Vec<Arc<ShardStats>>,
    pub started_at: Instant,
    pub draining: AtomicBool,
    /// Shards whose accept loop runs.
    pub serving: AtomicUsize,
    /// Shards that have no connection left after a drain began.
    pub drained: AtomicUsize,
    /// All open connections, for `limits.max_connections`. Touched once per connection, never
    /// per event.
    pub connections: AtomicUsize,
    pub driver: std::sync::OnceLock<&'static str>,
    /// Credentials and scopes, read-only after start.
    pub auth: crate::auth::Auth,
    /// The routing table: swapped by the control task, loaded per request without a lock.
    pub table: Arc<arc_swap::ArcSwap<crate::registry::Table>>,
    /// The registry as the config file describes it; shard 0's control task takes it.
    pub initial_registry: std::sync::Mutex<Option<crate::registry::Registry>>,
}

impl Shared {
    /// The process state for `shards` shards, before any of them starts.
    pub fn new(config: Arc<Config>, shards: usize, registry: crate::registry::Registry) -> Shared {
        Shared {
            shards,
            mesh: Arc::new(Mesh::new(shards, config.bus.ring_capacity)),
            stats: (0..shards).map(|i| Arc::new(ShardStats::new(i))).collect(),
            started_at: Instant::now(),
            draining: Default::default(),
            serving: Default::default(),
            drained: Default::default(),
            connections: Default::default(),
            driver: Default::default(),
            table: Arc::new(arc_swap::ArcSwap::from(registry.snapshot())),
            initial_registry: std::sync::Mutex::new(Some(registry)),
            auth: crate::auth::Auth::new(
                config.auth.jwt_secret.as_deref(),
                config.auth.api_keys.as_deref(),
            ),
            config,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Milliseconds since start, for heartbeats.
    pub fn now_ms(&self) -> u64 {
        self.started_at.elapsed().as_millis() as u64
    }
}

/// Control block of one connection: lets the shard close it, and lets its task sleep until
/// there is something to write or it must close.
pub struct ConnCtl {
    pub id: u64,
    pub peer: SocketAddr,
    opened: Stamp,
    transport: Cell<Transport>,
    closing: Cell<bool>,
    notified: Cell<bool>,
    waker: Cell<Option<Waker>>,
    /// When the task waiting in [`ConnCtl::wait`] wants waking by the shard's connection
    /// timers (WebSocket heartbeat, token expiry). A per-connection monoio timer would cost
    /// 640 bytes in every connection's future; the shard's one timer scans instead.
    timer_at: Cell<Stamp>,
    /// The reader's deadline (WebSocket idle timeout) and the reader's own waker: it waits on
    /// its socket's readiness, not on [`ConnCtl::wait`].
    read_deadline: Cell<Stamp>,
    read_waker: Cell<Option<Waker>>,
    /// Set when the shard's readiness set reports the socket readable while the reader is on
    /// its task (not parked), cleared before each read: the reader does not park, nor wait,
    /// while it is set (see [`ConnCtl::readable_or_timeout`]).
    read_ready: Cell<bool>,
    /// The sides of an idle connection, parked without a task (see [`crate::park`]); resumed
    /// through `waker` (the writer) and `read_waker` (the reader).
    parked_writer: Cell<Option<Box<dyn Resume>>>,
    parked_reader: Cell<Option<Box<dyn Resume>>>,
}

impl ConnCtl {
    pub fn new(id: u64, peer: SocketAddr, closing: bool) -> ConnCtl {
        ConnCtl {
            id,
            peer,
            opened: Stamp::now(),
            transport: Cell::new(Transport::Http),
            closing: Cell::new(closing),
            notified: Cell::new(false),
            waker: Cell::new(None),
            timer_at: Cell::new(Stamp::NONE),
            read_deadline: Cell::new(Stamp::NONE),
            read_waker: Cell::new(None),
            read_ready: Cell::new(false),
            parked_writer: Cell::new(None),
            parked_reader: Cell::new(None),
        }
    }

    /// When the connection was accepted.
    pub fn opened_at(&self) -> Instant {
        self.opened.instant().unwrap_or_else(Instant::now)
    }

    /// Forgets a notification the caller is acting on already.
    pub fn clear_notified(&self) {
        self.notified.set(false);
    }

    /// Whether the writing side may park: nothing it must act on is pending.
    pub fn may_park_writer(&self) -> bool {
        !self.closing.get() && !self.notified.get()
    }

    /// Parks the writing side until the next notify, close or timer (check
    /// [`ConnCtl::may_park_writer`] first).
    pub fn park_writer(&self, side: Box<dyn Resume>) {
        self.parked_writer.set(Some(side));
        self.waker
            .set(Some(park::waker(self.id, park::Side::Writer)));
    }

    /// Parks the reading side until its socket is ready (the shard's readiness set wakes it
    /// by id) or, at the latest, `deadline` (through `waker`).
    pub fn park_reader(&self, side: Box<dyn Resume>, deadline: Instant, waker: Waker) {
        self.parked_reader.set(Some(side));
        self.read_deadline.set(Stamp::deadline(deadline));
        self.read_waker.set(Some(waker));
    }

    /// Takes a parked side out, to resume it; `None` when it is not parked (woken twice).
    pub fn take_parked(&self, side: park::Side) -> Option<Box<dyn Resume>> {
        match side {
            park::Side::Writer => self.parked_writer.take(),
            park::Side::Reader => self.parked_reader.take(),
        }
    }

    /// The reader's own wait, once it stopped reading: resolves when `condition` holds,
    /// checked whenever [`ConnCtl::wake_reader`] is called.
    pub fn reader_wait_until<'a>(
        &'a self,
        condition: impl Fn() -> bool + 'a,
    ) -> impl Future<Output = ()> + 'a {
        self.read_deadline.set(Stamp::NONE);
        wait_in(&self.read_waker, condition)
    }

    /// Wakes the reader's own wait.
    pub fn wake_reader(&self) {
        if let Some(waker) = self.read_waker.take() {
            waker.wake();
        }
    }

    /// Wakes [`ConnCtl::wait`] at `at` (or soon after: the shard's timer ticks), once.
    pub fn set_timer(&self, at: Option<Instant>) {
        self.timer_at.set(Stamp::deadline_of(at));
    }

    /// Forgets an earlier readiness report, before the socket is read: the readiness set
    /// reports anew whatever arrives from then on.
    pub fn expect_readable(&self) {
        self.read_ready.set(false);
    }

    /// Whether the socket was reported readable since the last read.
    pub fn is_readable(&self) -> bool {
        self.read_ready.get()
    }

    /// The readiness set reported the socket while the reader is on its task: wakes its wait.
    pub fn mark_readable(&self) {
        self.read_ready.set(true);
        self.wake_reader();
    }

    /// Resolves with true once the socket is reported readable (see
    /// [`ConnCtl::mark_readable`]), or with false once `deadline` has passed (checked when the
    /// shard's timer ticks). One waiter at a time (the connection's reader).
    pub fn readable_or_timeout(&self, deadline: Instant) -> impl Future<Output = bool> + '_ {
        self.read_deadline.set(Stamp::deadline(deadline));
        poll_fn(move |cx| {
            if self.read_ready.replace(false) {
                self.read_deadline.set(Stamp::NONE);
                Poll::Ready(true)
            } else if Instant::now() >= deadline {
                self.read_deadline.set(Stamp::NONE);
                Poll::Ready(false)
            } else {
                self.read_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }

    /// Fires the timers due at `now` (called by the shard's timer task).
    pub fn fire_timers(&self, now: Stamp) {
        if self.timer_at.get().passed_by(now) {
            self.timer_at.set(Stamp::NONE);
            self.notified.set(true);
            self.wake();
        }
        if self.read_deadline.get().passed_by(now) {
            if let Some(waker) = self.read_waker.take() {
                waker.wake();
            }
        }
    }

    pub fn transport(&self) -> Transport {
        self.transport.get()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Asks the connection's task to finish and close.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake();
    }

    /// Tells the connection's task there is something to write.
    pub fn notify(&self) {
        if !self.notified.replace(true) {
            self.wake();
        }
    }

    /// Wakes the connection's task, whatever it waits on through this `ConnCtl`.
    pub fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Resolves when notified (consuming it) or closing. One waiter at a time.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.closing.get() || self.notified.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }

    /// Resolves when `condition` holds, checked whenever the connection is woken.
    pub fn wait_until<'a>(
        &'a self,
        condition: impl Fn() -> bool + 'a,
    ) -> impl Future<Output = ()> + 'a {
        wait_in(&self.waker, condition)
    }

    /// Resolves only when closing.
    pub fn closed(&self) -> impl Future<Output = ()> + '_ {
        wait_in(&self.waker, || self.closing.get())
    }
}

/// Resolves when `condition` holds, checked whenever the waker left in `slot` is woken.
fn wait_in<'a>(
    slot: &'a Cell<Option<Waker>>,
    condition: impl Fn() -> bool + 'a,
) -> impl Future<Output = ()> + 'a {
    poll_fn(move |cx| {
        if condition() {
            Poll::Ready(())
        } else {
            slot.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    })
}

/// The per-thread state of one shard.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub stats: Arc<ShardStats>,
    pub outbox: Outbox<Msg>,
    /// Owners' answers to the publishes this shard sent them ([`Msg::Published`]).
    answers: Rc<Answers<OwnerAnswer>>,
    pub owned: RefCell<Owned>,
    pub local: RefCell<LocalSubs>,
    /// Event `ts` from the monotonic reading a publish already has (calibrated by
    /// [`Shard::maintenance`]).
    wall: WallClock,
    conns: RefCell<AHashMap<u64, Rc<ConnCtl>>>,
    /// Connections per client address on this shard (`limits.max_connections_per_ip`).
    per_ip: RefCell<AHashMap<std::net::IpAddr, u32>>,
    /// WebSocket connections per user on this shard (`relay_users_connected`).
    users: RefCell<AHashMap<Arc<str>, u32>>,
    /// WebSocket connections without a JWT on this shard: each is its own user.
    anonymous_users: Cell<u32>,
    /// Upstream client, circuits, balancers and rate limits of this shard.
    pub proxy: crate::proxy::ProxyState,
    /// Webhook queues of the events this shard sequences.
    pub webhooks: Rc<crate::webhook::Webhooks>,
    /// The registry's control task (shard 0 only).
    pub control: Option<Rc<crate::registry::control::Control>>,
    /// Write pacing of this shard's subscriber connections.
    pub pacer: Rc<crate::pacing::Pacer>,
    /// Where parked WebSocket readers wait for their sockets (`None`: readers do not park).
    readiness: Option<park::Readiness>,
    readiness_failed: Cell<bool>,
    /// Events for local subscribers, offered by [`Shard::deliverer`] once per round.
    deliveries: RefCell<Vec<Arc<Event>>>,
    deliverer_waker: Cell<Option<Waker>>,
    /// Tasks waiting in [`Shard::local_deliveries_first`]; woken by the deliverer once it has
    /// offered the round's first [`DELIVERIES_BEFORE_ANSWERS`] subscribers. At most one per
    /// connection task.
    behind_deliveries: RefCell<Vec<Waker>>,
    /// Set while the deliverer gathers events under write pacing: answers then wait for no
    /// delivery.
    gathering: Cell<bool>,
    next_id: Cell<u64>,
    draining: Cell<bool>,
    drain_waker: Cell<Option<Waker>>,
}

impl Shard {
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Shard> {
        let config = shared.config.clone();
        let bus = &config.bus;
        let outbox = Outbox::new(
            id,
            shared.mesh.clone(),
            bus.max_batch,
            bus.ring_capacity * bus.max_batch,
        );
        let policy_config = config.clone();
        let policy: crate::bus::ChannelPolicy = Box::new(move |channel| {
            let (history_size, ttl_s) = policy_config.history_for(channel, crate::glob::glob_match);
            let (presence, join_leave) =
                policy_config.presence_for(channel, crate::glob::glob_match);
            crate::bus::ChannelSettings {
                history_size,
                history_ttl: Duration::from_secs(ttl_s),
                presence,
                join_leave,
            }
        });
        let seed = epoch_seed(id);
        let history_budget = config.history.max_events.div_ceil(shared.shards);
        let proxy = crate::proxy::ProxyState::new(&config, id, shared.shards);
        // The start-up registry is taken exactly once, by shard 0.
        let control = (id == 0)
            .then(|| {
                shared
                    .initial_registry
                    .lock()
                    .ok()
                    .and_then(|mut r| r.take())
            })
            .flatten()
            .map(|registry| {
                Rc::new(crate::registry::control::Control::new(
                    &config,
                    registry,
                    shared.table.clone(),
                ))
            });
        let pacer = Rc::new(crate::pacing::Pacer::new(
            &config.delivery,
            shared.stats[id].clone(),
        ));
        let readiness = park::Readiness::new()
            .map_err(|e| {
                tracing::warn!(
                    shard = id,
                    "no epoll set for idle readers ({e}): each keeps a task"
                )
            })
            .ok();
        Rc::new(Shard {
            id,
            pacer,
            readiness,
            readiness_failed: Cell::new(false),
            deliveries: RefCell::new(Vec::new()),
            deliverer_waker: Cell::new(None),
            behind_deliveries: RefCell::new(Vec::new()),
            gathering: Cell::new(false),
            stats: shared.stats[id].clone(),
            shared,
            outbox,
            answers: Answers::new(),
            owned: RefCell::new(Owned::new(policy, seed).with_event_budget(history_budget)),
            local: RefCell::new(LocalSubs::default()),
            wall: WallClock::new(),
            conns: RefCell::new(AHashMap::new()),
            per_ip: RefCell::new(AHashMap::new()),
            users: RefCell::new(AHashMap::new()),
            anonymous_users: Cell::new(0),
            proxy,
            webhooks: Rc::new(crate::webhook::Webhooks::new(config.webhooks.clone())),
            control,
            next_id: Cell::new(1),
            draining: Cell::new(false),
            drain_waker: Cell::new(None),
        })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn shards(&self) -> usize {
        self.shared.shards
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// A process-unique id: the shard in the low bits keeps ids from different shards apart.
    pub fn next_id(&self) -> u64 {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        (n << 8) | (self.id as u64 & 0xff)
    }

    // ----- connections -----

    /// Registers a connection, or says why it is refused.
    ///
    /// The per-IP limit is enforced per shard as `ceil(max_connections_per_ip / shards)`: the
    /// kernel spreads one address's connections evenly over the SO_REUSEPORT listeners (by the
    /// hash of the source port), so this approximates the global limit without shared state.
    pub fn open_conn(self: &Rc<Self>, peer: SocketAddr) -> Result<Rc<ConnCtl>, Refused> {
        let limits = &self.config().limits;
        let per_shard_ip_limit = limits.max_connections_per_ip.div_ceil(self.shards()) as u32;
        {
            let per_ip = self.per_ip.borrow();
            if per_ip.get(&peer.ip()).copied().unwrap_or(0) >= per_shard_ip_limit {
                self.stats.connections_refused_per_ip.inc();
                return Err(Refused::PerIp);
            }
        }
        if self.shared.connections.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            self.stats.connections_refused.inc();
            return Err(Refused::Full);
        }
        *self.per_ip.borrow_mut().entry(peer.ip()).or_insert(0) += 1;
        let ctl = Rc::new(ConnCtl::new(self.next_id(), peer, self.draining.get()));
        self.conns.borrow_mut().insert(ctl.id, ctl.clone());
        self.stats.connections_active[Transport::Http as usize].add(1);
        self.stats.connections_total[Transport::Http as usize].inc();
        Ok(ctl)
    }

    /// A WebSocket user arrived on this shard; `None`: a connection without a JWT, its own
    /// user (counted, not kept in the table: most connections of an open relay are these).
    pub fn user_joined(&self, user: Option<&Arc<str>>) {
        match user {
            Some(user) => *self.users.borrow_mut().entry(user.clone()).or_insert(0) += 1,
            None => self.anonymous_users.set(self.anonymous_users.get() + 1),
        }
        self.count_users();
    }

    /// A WebSocket user's connection left this shard (`None` as in [`Shard::user_joined`]).
    pub fn user_left(&self, user: Option<&str>) {
        match user {
            Some(user) => {
                let mut users = self.users.borrow_mut();
                if let Some(n) = users.get_mut(user) {
                    *n -= 1;
                    if *n == 0 {
                        users.remove(user);
                    }
                }
            }
            None => self
                .anonymous_users
                .set(self.anonymous_users.get().saturating_sub(1)),
        }
        self.count_users();
    }

    fn count_users(&self) {
        let users = self.users.borrow().len() + self.anonymous_users.get() as usize;
        self.stats.users_connected.set(users as i64);
    }

    /// Moves a connection to another transport (an HTTP request that became an SSE stream).
    pub fn set_transport(&self, ctl: &ConnCtl, transport: Transport) {
        let old = ctl.transport.replace(transport);
        if old != transport {
            self.stats.connections_active[old as usize].add(-1);
            self.stats.connections_active[transport as usize].add(1);
            self.stats.connections_total[transport as usize].inc();
        }
    }

    pub fn close_conn(&self, ctl: &ConnCtl) {
        if self.conns.borrow_mut().remove(&ctl.id).is_some() {
            self.stats.connections_active[ctl.transport() as usize].add(-1);
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            let mut per_ip = self.per_ip.borrow_mut();
            if let Some(n) = per_ip.get_mut(&ctl.peer.ip()) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ctl.peer.ip());
                }
            }
        }
    }

    pub fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    // ----- the bus, as handlers see it -----

    /// Publishes drafts (any channels), answering in input order; any refusal refuses the
    /// call (use [`Shard::publish_each`] where a batch may be partly accepted).
    pub async fn publish(&self, drafts: Vec<Draft>) -> Result<Vec<Published>, BusError> {
        self.publish_each(drafts).await?.into_iter().collect()
    }

    /// Publishes drafts (any channels), answering each in input order. `Err` refuses the whole
    /// batch: nothing of it was published. Congestion known here is checked before anything
    /// is sequenced; only an owner shard refusing its part after another part was accepted
    /// (its own rings filled meanwhile) leaves errors in that part's places.
    pub async fn publish_each(&self, drafts: Vec<Draft>) -> Result<PublishOutcomes, BusError> {
        self.publish_start(Drafts::from_vec(drafts), Instant::now())?
            .finish()
            .await
    }

    /// The first half of [`Shard::publish_each`]: sequences this shard's part now and sends
    /// the other owners theirs. The answer is [`PublishTicket::finish`]; a caller with several
    /// publishes under way (a pipelining client) starts them all before waiting for
    /// the first, so they share the crossings between shards. Each owner sequences the drafts
    /// it gets in the order they were started. `accepted_at` is when the request arrived (the
    /// caller has read the clock already): the events this shard owns carry it.
    pub fn publish_start(
        &self,
        drafts: Drafts,
        accepted_at: Instant,
    ) -> Result<PublishTicket, BusError> {
        let shards = self.shards();
        // One owner for the whole batch (always on one shard, and for a single event): no
        // grouping, and the owner's answer is the outcome as it stands.
        let sole = if shards == 1 {
            Some(self.id)
        } else {
            sole_owner(&drafts, shards)
        };
        if sole == Some(self.id) {
            let published = self.publish_owned(&drafts, accepted_at)?;
            return Ok(PublishTicket::Done(published.into_iter().map(Ok).collect()));
        }
        // Any congested ring refuses the whole batch up front: the owner's part would be
        // refused by `publish_owned` after other parts were already sent.
        self.refuse_if_congested()?;
        if let Some(owner) = sole {
            let drafts = drafts.into_vec();
            return Ok(PublishTicket::Forwarded(self.send_to_owner(owner, drafts)));
        }
        // Group by owner, remembering each draft's place in the answer.
        let mut groups: Vec<(Vec<usize>, Vec<Draft>)> =
            (0..shards).map(|_| Default::default()).collect();
        for (index, draft) in drafts.into_iter().enumerate() {
            let owner = shard_of(&draft.channel, shards);
            groups[owner].0.push(index);
            groups[owner].1.push(draft);
        }
        let total: usize = groups.iter().map(|g| g.0.len()).sum();
        let mut answers: Vec<Option<PublishOutcome>> = vec![None; total];
        let mut waiting = Vec::new();
        for (owner, (indexes, drafts)) in groups.into_iter().enumerate() {
            if drafts.is_empty() {
                continue;
            }
            if owner == self.id {
                place(
                    &mut answers,
                    indexes,
                    self.publish_owned(&drafts, accepted_at).map(Accepted::new),
                );
            } else {
                waiting.push((indexes, self.send_to_owner(owner, drafts)));
            }
        }
        Ok(PublishTicket::Waiting { answers, waiting })
    }

    /// Sends `drafts` to their owner, with the slot its answer will fill.
    fn send_to_owner(&self, owner: usize, drafts: Vec<Draft>) -> AwaitedAnswer {
        let answer = self.answers.expect();
        let key = answer.key();
        self.outbox.send(
            owner,
            Msg::Publish {
                drafts,
                answer: key,
            },
        );
        answer
    }

    /// Refuses new publishes (counted) while the outbox toward any other shard is congested:
    /// each may fan out to every shard.
    fn refuse_if_congested(&self) -> Result<(), BusError> {
        match self.outbox.first_congested() {
            Some(shard) => {
                self.stats.publish_rejected_full.inc();
                Err(BusError::Congested { shard })
            }
            None => Ok(()),
        }
    }

    /// Sequences drafts this shard owns, accepted at `now` (history age, route latency, `ts`).
    fn publish_owned(&self, drafts: &[Draft], now: Instant) -> Result<Sequenced, BusError> {
        self.refuse_if_congested()?;
        let ts_ms = self.wall.unix_ms(now);
        let mut owned = self.owned.borrow_mut();
        let table = self.shared.table.load();
        let mut out = Sequenced::with_capacity(drafts.len());
        for draft in drafts {
            let published = owned.publish(draft, ts_ms, now, |shard, event| {
                if shard == self.id {
                    self.queue_delivery(event.clone());
                } else {
                    self.outbox.send(shard, Msg::Deliver(event.clone()));
                }
            });
            if published.duplicate {
                self.stats.events_duplicate.inc();
            } else {
                self.stats.events_published.inc();
            }
            if let (Some(event), false) = (&published.event, table.webhooks.is_empty()) {
                let full = self.webhooks.offer(&table, event);
                self.stats.webhook_events_dropped_full.add(full as u64);
            }
            out.push(published);
        }
        self.record_owned_stats(&mut owned);
        Ok(out)
    }

    /// Adds a local sink and registers it with the owner; returns the owner's answer.
    /// `member` is (user, connection) for subscribers that presence lists.
    pub async fn subscribe(
        &self,
        channel: &Arc<str>,
        sink_id: u64,
        sink: Rc<dyn crate::bus::Sink>,
        since: Option<Since>,
        member: Option<(Arc<str>, Arc<str>)>,
    ) -> Result<Subscribed, BusError> {
        // Local first: events the owner sends after registering must find the sink here.
        self.local.borrow_mut().add(channel, sink_id, sink);
        self.stats.subscriptions.add(1);
        let owner = shard_of(channel, self.shards());
        if owner == self.id {
            let (answer, push) = self.owned.borrow_mut().subscribe_member(
                channel,
                self.id,
                since.as_ref(),
                member.as_ref().map(|(u, c)| (u, c)),
                unix_ms(),
            );
            self.stats
                .channels_owned
                .set(self.owned.borrow().channel_count() as i64);
            if let Some(frame) = push {
                self.fan_out_push(channel, frame);
            }
            return Ok(answer);
        }
        let (reply, answer) = oneshot::channel();
        self.outbox.send(
            owner,
            Msg::Subscribe {
                channel: channel.clone(),
                shard: self.id,
                since,
                member,
                reply,
            },
        );
        answer.await.map_err(|_| BusError::Unavailable)
    }

    /// Removes a local sink and tells the owner (`member_conn` for presence-listed ones).
    pub fn unsubscribe(&self, channel: &Arc<str>, sink_id: u64, member_conn: Option<Arc<str>>) {
        if !self.local.borrow_mut().remove(channel, sink_id) {
            return;
        }
        self.stats.subscriptions.add(-1);
        let owner = shard_of(channel, self.shards());
        if owner == self.id {
            let push = self.owned.borrow_mut().unsubscribe_member(
                channel,
                self.id,
                member_conn.as_deref(),
            );
            if let Some(frame) = push {
                self.fan_out_push(channel, frame);
            }
        } else {
            self.outbox.send(
                owner,
                Msg::Unsubscribe {
                    channel: channel.clone(),
                    shard: self.id,
                    member_conn,
                },
            );
        }
    }

    /// Sends a presence push (owned here) to every shard with subscribers, this one included.
    fn fan_out_push(&self, channel: &Arc<str>, frame: Bytes) {
        let shards = self.owned.borrow().interested(channel);
        for shard in shards {
            if shard == self.id {
                self.local.borrow().push(channel, &frame);
            } else {
                self.outbox.send(
                    shard,
                    Msg::Push {
                        channel: channel.clone(),
                        frame: frame.clone(),
                    },
                );
            }
        }
    }

    /// Hands a registry command to the control task on shard 0.
    pub fn control(&self, command: crate::registry::control::Command) {
        match &self.control {
            Some(control) => control.execute(command),
            None => self.outbox.send(0, Msg::Control(command)),
        }
    }

    /// Who is on `channel`; `Ok(None)` when presence is off for it.
    pub async fn presence(&self, channel: Arc<str>) -> Result<Option<Vec<Member>>, BusError> {
        let owner = shard_of(&channel, self.shards());
        if owner == self.id {
            return Ok(self.owned.borrow().members(&channel).ok());
        }
        let (reply, answer) = oneshot::channel();
        self.outbox.send(owner, Msg::Presence { channel, reply });
        let members = answer.await.map_err(|_| BusError::Unavailable)?;
        Ok(members.ok())
    }

    pub async fn history(
        &self,
        channel: Arc<str>,
        since: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, BusError> {
        let owner = shard_of(&channel, self.shards());
        if owner == self.id {
            return Ok(self.owned.borrow().history(&channel, since, limit));
        }
        let (reply, answer) = oneshot::channel();
        self.outbox.send(
            owner,
            Msg::History {
                channel,
                since,
                limit,
                reply,
            },
        );
        answer.await.map_err(|_| BusError::Unavailable)
    }

    /// Every shard's page of the channels it owns.
    pub async fn channels(&self, query: &ChannelQuery) -> Result<Vec<ChannelPage>, BusError> {
        let mut answers = Vec::with_capacity(self.shards());
        let mut waiting = Vec::new();
        for shard in 0..self.shards() {
            if shard == self.id {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            self.outbox.send(
                shard,
                Msg::ListChannels {
                    query: query.clone(),
                    reply,
                },
            );
            waiting.push(answer);
        }
        answers.push(self.owned.borrow().list(query));
        for answer in waiting {
            answers.push(answer.await.map_err(|_| BusError::Unavailable)?);
        }
        Ok(answers)
    }

    // ----- what arrives from other shards -----

    fn handle(&self, from: usize, msg: Msg) {
        match msg {
            Msg::Deliver(event) => self.queue_delivery(event),
            Msg::Publish { drafts, answer } => {
                let outcome = self
                    .publish_owned(&drafts, Instant::now())
                    .map(Accepted::new);
                self.outbox.send(from, Msg::Published { answer, outcome });
            }
            Msg::Published { answer, outcome } => {
                if !self.answers.answer(answer, outcome) {
                    tracing::error!(shard = self.id, from, "an answer to no publish sent");
                }
            }
            Msg::Subscribe {
                channel,
                shard,
                since,
                member,
                reply,
            } => {
                let (answer, push) = self.owned.borrow_mut().subscribe_member(
                    &channel,
                    shard,
                    since.as_ref(),
                    member.as_ref().map(|(u, c)| (u, c)),
                    unix_ms(),
                );
                let _ = reply.send(answer);
                if let Some(frame) = push {
                    self.fan_out_push(&channel, frame);
                }
            }
            Msg::Unsubscribe {
                channel,
                shard,
                member_conn,
            } => {
                let push = self.owned.borrow_mut().unsubscribe_member(
                    &channel,
                    shard,
                    member_conn.as_deref(),
                );
                if let Some(frame) = push {
                    self.fan_out_push(&channel, frame);
                }
            }
            Msg::Control(command) => match &self.control {
                Some(control) => control.execute(command),
                None => tracing::error!(
                    shard = self.id,
                    "a registry command reached a shard without the control task"
                ),
            },
            Msg::Push { channel, frame } => {
                self.local.borrow().push(&channel, &frame);
            }
            Msg::Presence { channel, reply } => {
                let _ = reply.send(self.owned.borrow().members(&channel));
            }
            Msg::History {
                channel,
                since,
                limit,
                reply,
            } => {
                let _ = reply.send(self.owned.borrow().history(&channel, since, limit));
            }
            Msg::ListChannels { query, reply } => {
                let _ = reply.send(self.owned.borrow().list(&query));
            }
        }
    }

    /// Receives batches from other shards until the process ends.
    pub async fn pump(self: Rc<Self>) {
        let mesh = self.shared.mesh.clone();
        loop {
            mesh.notified(self.id).await;
            let batches = mesh.drain(self.id, |from, batch| {
                for msg in batch {
                    self.handle(from, msg);
                }
            });
            self.stats.ring_batches_received.add(batches as u64);
            if self.shared.is_draining() && !self.draining.get() {
                self.begin_drain();
            }
        }
    }

    /// Hands `event` to this shard's local subscribers, in the same scheduling round.
    fn queue_delivery(&self, event: Arc<Event>) {
        let mut pending = self.deliveries.borrow_mut();
        pending.push(event);
        if pending.len() == 1 || pending.len() == GATHER_EVENTS_MAX {
            if let Some(waker) = self.deliverer_waker.take() {
                waker.wake();
            }
        }
    }

    /// Offers the events queued for local subscribers, all of a scheduling round at once
    /// (see [`LocalSubs::deliver_batch`]). What is queued is bounded by what one round can
    /// publish or take from the rings; it is emptied every round.
    ///
    /// Except while write pacing holds writes (the shard is saturated and some writer is
    /// held): then it gathers the events of an eighth of the hold before offering them. An
    /// offer visits every subscriber of the channel, and a held subscriber writes only when
    /// its hold ends, so offering every round's two or three events visited each subscriber
    /// again and again for little (at 3.5 M deliveries/s, 1,200-1,650 rounds a second:
    /// `offer_many` was 14% of the shard's core). Gathering delays an event by at most that
    /// eighth of the hold (2.5 ms at the default 20 ms), and never holds more than
    /// [`GATHER_EVENTS_MAX`] events. A busy shard whose subscribers are all quiet (many
    /// channels, a few events each) holds no writer and does not gather: there every event
    /// is written at once, and a gathering would only have delayed it.
    pub async fn deliverer(self: Rc<Self>) {
        let mut batch: Vec<Arc<Event>> = Vec::new();
        let mut behind: Vec<Waker> = Vec::new();
        let shard: &Shard = &self;
        let waiting_for = |events: usize| {
            poll_fn(move |cx| {
                if shard.deliveries.borrow().len() < events {
                    shard.deliverer_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        };
        loop {
            waiting_for(1).await;
            let gather = self.pacer.hold_interval() / GATHER_SHARE_OF_HOLD;
            if !gather.is_zero() && self.pacer.holding() {
                self.gathering.set(true);
                // Answers waiting for these deliveries need not wait for the gathering.
                self.release_answers(&mut behind);
                monoio::select! {
                    _ = monoio::time::sleep(gather) => {}
                    _ = waiting_for(GATHER_EVENTS_MAX) => {}
                }
                self.gathering.set(false);
            }
            std::mem::swap(&mut *self.deliveries.borrow_mut(), &mut batch);
            // Woken after the writers that the first offers woke, so they run after those.
            let answers = || self.release_answers(&mut behind);
            self.local
                .borrow()
                .deliver_batch(&mut batch, DELIVERIES_BEFORE_ANSWERS, answers);
            batch.clear();
        }
    }

    /// Wakes the tasks waiting in [`Shard::local_deliveries_first`], through `spare` (the
    /// deliverer's own vector, so that the waiting list keeps its buffer).
    fn release_answers(&self, spare: &mut Vec<Waker>) {
        std::mem::swap(&mut *self.behind_deliveries.borrow_mut(), spare);
        spare.drain(..).for_each(Waker::wake);
    }

    /// Lets this round's local deliveries reach the kernel before what the caller writes next
    /// (up to [`DELIVERIES_BEFORE_ANSWERS`] of them).
    ///
    /// A publisher's answer and the deliveries its publish caused are submitted in one
    /// `io_uring_enter` and run by the kernel in the order they were queued. The answer is
    /// ready first (the deliverer offers events only after the publishing task yields), so
    /// without this wait each delivery sits behind its publisher's answer, on loopback a
    /// whole TCP send and the peer's wake-up. When events are queued for local subscribers,
    /// this waits until the deliverer has offered them and the writers it woke have run (a
    /// waker here is queued behind theirs); otherwise it returns at once, as it does while
    /// the deliverer gathers events under write pacing (the subscribers' writes are held).
    pub fn local_deliveries_first(&self) -> impl Future<Output = ()> + '_ {
        let mut waiting = false;
        poll_fn(move |cx| {
            if waiting || self.gathering.get() || self.deliveries.borrow().is_empty() {
                return Poll::Ready(());
            }
            self.behind_deliveries.borrow_mut().push(cx.waker().clone());
            waiting = true;
            Poll::Pending
        })
    }

    /// Pushes the outbox after the tasks of a scheduling round have filled it.
    pub async fn flusher(self: Rc<Self>) {
        loop {
            self.outbox.wanted().await;
            loop {
                let report = self.outbox.flush();
                self.stats.ring_batches_sent.add(report.batches);
                self.stats.ring_messages_sent.add(report.messages);
                self.stats.ring_full.add(report.ring_full);
                if report.left == 0 {
                    break;
                }
                // A receiver is behind: give it a moment rather than spin.
                monoio::time::sleep(Duration::from_micros(100)).await;
            }
        }
    }

    /// Brings the owned channels' gauges up to date and counts history dropped for the budget.
    fn record_owned_stats(&self, owned: &mut Owned) {
        self.stats.history_events.set(owned.history_events() as i64);
        self.stats
            .history_budget_drops
            .add(owned.take_budget_drops());
        self.stats.channels_owned.set(owned.channel_count() as i64);
    }

    /// Closes upstream connections idle too long, and brings the client's metrics up to date.
    fn record_client_stats(&self, now: Instant) {
        let client = self.proxy.client();
        client.prune(now);
        let counts = client.take_counts();
        self.stats.upstream_connections_opened.add(counts.opened);
        self.stats.upstream_pool_overflow.add(counts.pool_overflow);
        self.stats
            .upstream_idle_connections
            .set(client.idle_connections() as i64);
    }

    /// Expires history, reclaims idle channels, refreshes gauges and the heartbeat.
    pub async fn maintenance(self: Rc<Self>) {
        loop {
            let now = Instant::now();
            self.wall.calibrate();
            {
                let mut owned = self.owned.borrow_mut();
                owned.sweep(now);
                self.record_owned_stats(&mut owned);
            }
            self.record_client_stats(now);
            self.stats
                .loop_heartbeat_ms
                .store(self.shared.now_ms(), Ordering::Relaxed);
            if self.shared.is_draining() && !self.draining.get() {
                self.begin_drain();
            }
            monoio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The connection timers: every tick, fires the `ConnCtl` timers that are due. The tick is
    /// a quarter of the shortest WebSocket timer (heartbeat, idle timeout), between 10 and 250
    /// ms, which is how late a timer may fire.
    pub async fn conn_timers(self: Rc<Self>) {
        let config = self.config();
        let shortest = Duration::from_millis(config.websocket.heartbeat_ms)
            .min(Duration::from_secs(config.limits.idle_timeout_s));
        let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        loop {
            monoio::time::sleep(tick).await;
            let now = Stamp::now();
            // Waking only schedules the woken tasks, so nothing re-enters `conns` meanwhile.
            for ctl in self.conns.borrow().values() {
                ctl.fire_timers(now);
            }
        }
    }

    /// Resumes the parked connection sides that were woken (see [`crate::park`]).
    pub async fn unparker(self: Rc<Self>) {
        let mut woken = Vec::new();
        loop {
            park::woken(&mut woken).await;
            for &(id, side) in &woken {
                let Some(ctl) = self.conns.borrow().get(&id).cloned() else {
                    continue;
                };
                match ctl.take_parked(side) {
                    Some(parked) => {
                        self.stats.ws_parked[side as usize].add(-1);
                        parked.resume();
                    }
                    // A reader waiting on its task for the socket it watched.
                    None if side == park::Side::Reader => ctl.mark_readable(),
                    None => {}
                }
            }
        }
    }

    /// The readiness set parked readers wait in, while it works.
    pub fn readiness(&self) -> Option<&park::Readiness> {
        self.readiness
            .as_ref()
            .filter(|_| !self.readiness_failed.get())
    }

    /// Runs the readiness set (see [`park::Readiness::run`]). Should it fail, readers stop
    /// parking and the parked ones are resumed, to wait on their own tasks.
    pub async fn watch_readiness(self: Rc<Self>) {
        let Some(readiness) = &self.readiness else {
            return;
        };
        if let Err(e) = readiness.run().await {
            tracing::error!(
                shard = self.id,
                "the idle readers' epoll set failed ({e}); each now keeps a task"
            );
            self.readiness_failed.set(true);
            let parked: Vec<_> = self
                .conns
                .borrow()
                .values()
                .filter_map(|ctl| ctl.take_parked(park::Side::Reader))
                .collect();
            for side in parked {
                self.stats.ws_parked[park::Side::Reader as usize].add(-1);
                side.resume();
            }
        }
    }

    /// Closes every connection (each finishes what it is doing first).
    pub fn begin_drain(&self) {
        if self.draining.replace(true) {
            return;
        }
        if let Some(waker) = self.drain_waker.take() {
            waker.wake();
        }
        let conns: Vec<Rc<ConnCtl>> = self.conns.borrow().values().cloned().collect();
        for ctl in conns {
            ctl.close();
        }
    }

    /// Resolves once this shard has begun draining.
    pub fn drain_started(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.draining.get() {
                Poll::Ready(())
            } else {
                self.drain_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// Wall-clock Unix milliseconds (event `ts`, presence `since`).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn epoch_seed(shard: usize) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ ((shard as u64) << 56)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Sink;

    fn test_shard() -> Rc<Shard> {
        let config = Arc::new(Config::default());
        let registry = crate::registry::control::initial_registry(&config, 1).unwrap();
        Shard::new(0, Arc::new(Shared::new(config, 1, registry)))
    }

    /// A subscriber whose writes are a task of their own, as a WebSocket's are: an offer wakes
    /// the task, which logs its name when it runs.
    struct Writer {
        name: String,
        log: Rc<RefCell<Vec<String>>>,
        offered: Cell<bool>,
        waker: Cell<Option<Waker>>,
    }

    impl Sink for Writer {
        fn offer(&self, _event: &Arc<Event>) {
            self.offered.set(true);
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }

    async fn write_loop(writer: Rc<Writer>) {
        loop {
            poll_fn(|cx| {
                if writer.offered.replace(false) {
                    Poll::Ready(())
                } else {
                    writer.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            writer.log.borrow_mut().push(writer.name.clone());
        }
    }

    /// `subscribers` writers on channel "c", each parked in its own task.
    async fn subscribed(shard: &Rc<Shard>, subscribers: usize) -> Rc<RefCell<Vec<String>>> {
        let log = Rc::new(RefCell::new(Vec::new()));
        let channel: Arc<str> = Arc::from("c");
        for i in 0..subscribers {
            let writer = Rc::new(Writer {
                name: format!("write {i}"),
                log: log.clone(),
                offered: Cell::new(false),
                waker: Cell::new(None),
            });
            shard
                .local
                .borrow_mut()
                .add(&channel, i as u64, writer.clone() as Rc<dyn Sink>);
            monoio::spawn(write_loop(writer));
        }
        monoio::spawn(shard.clone().deliverer());
        // Let every writer and the deliverer park.
        monoio::time::sleep(Duration::from_millis(1)).await;
        log
    }

    async fn publish_then_answer(shard: &Rc<Shard>, log: &RefCell<Vec<String>>) {
        shard.queue_delivery(crate::bus::event::testing::event("c", 1, "t"));
        shard.local_deliveries_first().await;
        log.borrow_mut().push("answer".into());
        monoio::time::sleep(Duration::from_millis(1)).await;
    }

    fn names(prefix: &[&str], writes: std::ops::Range<usize>, suffix: &[&str]) -> Vec<String> {
        let writes = writes.map(|i| format!("write {i}"));
        let owned = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        owned(prefix)
            .into_iter()
            .chain(writes)
            .chain(owned(suffix))
            .collect()
    }

    #[monoio::test(enable_timer = true)]
    async fn an_answer_follows_the_writes_its_publish_woke() {
        let shard = test_shard();
        let log = subscribed(&shard, 3).await;
        publish_then_answer(&shard, &log).await;
        assert_eq!(*log.borrow(), names(&[], 0..3, &["answer"]));
    }

    #[monoio::test(enable_timer = true)]
    async fn an_answer_lets_only_a_few_writes_of_a_large_fan_out_go_first() {
        let shard = test_shard();
        let subscribers = DELIVERIES_BEFORE_ANSWERS + 5;
        let log = subscribed(&shard, subscribers).await;
        publish_then_answer(&shard, &log).await;
        let mut expected = names(&[], 0..DELIVERIES_BEFORE_ANSWERS, &["answer"]);
        expected.extend(names(&[], DELIVERIES_BEFORE_ANSWERS..subscribers, &[]));
        assert_eq!(*log.borrow(), expected);
    }

    fn draft(channel: &str) -> Draft {
        Draft {
            channel: channel.into(),
            event_type: "t".into(),
            id: None,
            data: Bytes::from_static(b"{}"),
            source: None,
            correlation_id: None,
        }
    }

    /// A channel name owned by `shard` of `shards`.
    fn owned_by(shard: usize, shards: usize) -> String {
        (0..)
            .map(|i| format!("doc.{i}"))
            .find(|name| shard_of(name, shards) == shard)
            .expect("some name hashes to every shard")
    }

    #[test]
    fn a_batch_has_a_sole_owner_only_when_every_channel_has_the_same_one() {
        let (zero, one) = (owned_by(0, 2), owned_by(1, 2));
        assert_eq!(sole_owner(&[draft(&one)], 2), Some(1));
        assert_eq!(sole_owner(&[draft(&zero), draft(&zero)], 2), Some(0));
        assert_eq!(sole_owner(&[draft(&zero), draft(&one)], 2), None);
        assert_eq!(
            sole_owner(&[draft(&one), draft(&one), draft(&zero)], 2),
            None
        );
        assert_eq!(sole_owner(&[], 2), None, "no draft, no owner");
    }

    #[test]
    fn a_forwarded_batch_is_its_owners_answer() {
        let duplicate = || Published::duplicate(Arc::from("c"), 7, "id-7".into());
        let answers = Answers::new();
        let answer = answers.expect();
        let key = answer.key();
        let ticket = match PublishTicket::Forwarded(answer).try_finish() {
            Err(ticket) => ticket,
            Ok(outcome) => panic!(
                "no answer yet, but finished: {:?}",
                outcome.map(|o| o.len())
            ),
        };
        assert!(answers.answer(key, Ok(Accepted::Many(vec![duplicate(), duplicate()]))));
        let outcomes = match ticket.try_finish() {
            Ok(Ok(outcomes)) => outcomes,
            _ => panic!("the answer is in: the ticket finishes with it"),
        };
        let seqs: Vec<u64> = outcomes.iter().flatten().map(|p| p.seq).collect();
        assert_eq!(seqs, [7, 7], "one accepted outcome per draft, in order");

        let answer = answers.expect();
        assert!(answers.answer(answer.key(), Err(BusError::Congested { shard: 1 })));
        assert!(matches!(
            PublishTicket::Forwarded(answer).try_finish(),
            Ok(Err(BusError::Congested { shard: 1 }))
        ));
        assert_eq!(answers.outstanding(), 0, "every answer taken");
    }

    #[test]
    fn one_accepted_draft_travels_without_a_vector() {
        let published = |seq| Published::duplicate(Arc::from("c"), seq, "x".into());
        let one = Accepted::new(smallvec::smallvec![published(4)]);
        assert!(matches!(&one, Accepted::One(p) if p.seq == 4));
        let outcomes = all_accepted(one);
        assert!(!outcomes.spilled(), "one outcome is held inline");
        assert!(outcomes[0].as_ref().is_ok_and(|p| p.seq == 4));

        let two = Accepted::new(smallvec::smallvec![published(5), published(6)]);
        let seqs: Vec<u64> = match &two {
            Accepted::Many(many) => many.iter().map(|p| p.seq).collect(),
            Accepted::One(_) => panic!("two drafts answered as one"),
        };
        assert_eq!(seqs, [5, 6]);
        assert!(matches!(Accepted::new(Sequenced::new()), Accepted::Many(v) if v.is_empty()));

        // Placed by index: one owner's single draft among another owner's.
        let mut answers = vec![None, None, None];
        place(
            &mut answers,
            vec![1],
            Ok(Accepted::new(smallvec::smallvec![published(9)])),
        );
        place(&mut answers, vec![0, 2], Ok(all_two()));
        let seqs: Vec<u64> = answers.iter().flatten().flatten().map(|p| p.seq).collect();
        assert_eq!(seqs, [1, 9, 2]);
    }

    fn all_two() -> Accepted {
        Accepted::Many(vec![
            Published::duplicate(Arc::from("a"), 1, "a1".into()),
            Published::duplicate(Arc::from("a"), 2, "a2".into()),
        ])
    }

    #[monoio::test(enable_timer = true)]
    async fn a_forwarded_batch_finishes_when_its_owners_answer_arrives() {
        let answers = Answers::new();
        let answer = answers.expect();
        assert!(answers.answer(answer.key(), Err(BusError::Unavailable)));
        assert_eq!(
            PublishTicket::Forwarded(answer).finish().await.err(),
            Some(BusError::Unavailable)
        );
        let answer = answers.expect();
        let key = answer.key();
        let ticket = PublishTicket::Forwarded(answer);
        let later = answers.clone();
        monoio::spawn(async move {
            monoio::time::sleep(Duration::from_millis(1)).await;
            let one = Published::duplicate(Arc::from("c"), 3, "x".into());
            assert!(later.answer(key, Ok(Accepted::One(one))));
        });
        let outcomes = ticket.finish().await.expect("the owner accepted");
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].as_ref().is_ok_and(|p| p.seq == 3));
    }

    #[test]
    fn a_batch_of_two_owners_finishes_in_input_order_whichever_answers_first() {
        let answers = Answers::new();
        let wakes = crate::answers::testing::CountWakes::new();
        let waker = wakes.waker();
        let mut cx = Context::from_waker(&waker);
        let published = |seq| Published::duplicate(Arc::from("c"), seq, "x".into());

        // Drafts 0 and 2 to one owner, 1 to another, 3 sequenced here already.
        let (first, second) = (answers.expect(), answers.expect());
        let (first_key, second_key) = (first.key(), second.key());
        let mut ticket = PublishTicket::Waiting {
            answers: vec![None, None, None, Some(Ok(published(40)))],
            waiting: vec![(vec![0, 2], first), (vec![1], second)],
        };
        assert!(ticket.poll_finish(&mut cx).is_pending());
        assert!(answers.answer(second_key, Ok(Accepted::One(published(11)))));
        assert_eq!(wakes.count(), 1, "the answer wakes the ticket");
        assert!(
            ticket.poll_finish(&mut cx).is_pending(),
            "one owner still to answer"
        );
        let both = Accepted::Many(vec![published(10), published(12)]);
        assert!(answers.answer(first_key, Ok(both)));
        let outcomes = match ticket.poll_finish(&mut cx) {
            Poll::Ready(Ok(outcomes)) => outcomes,
            other => panic!(
                "every owner answered, yet {:?}",
                other.map(|o| o.map(|o| o.len()))
            ),
        };
        let seqs: Vec<u64> = outcomes.iter().flatten().map(|p| p.seq).collect();
        assert_eq!(seqs, [10, 11, 12, 40]);
        assert_eq!(answers.outstanding(), 0);

        // An owner that refused leaves errors in its places; a batch refused whole is an error.
        let (first, second) = (answers.expect(), answers.expect());
        assert!(answers.answer(first.key(), Err(BusError::Congested { shard: 1 })));
        assert!(answers.answer(second.key(), Ok(Accepted::One(published(5)))));
        let mut ticket = PublishTicket::Waiting {
            answers: vec![None, None],
            waiting: vec![(vec![0], first), (vec![1], second)],
        };
        match ticket.poll_finish(&mut cx) {
            Poll::Ready(Ok(outcomes)) => {
                assert!(matches!(outcomes[0], Err(BusError::Congested { shard: 1 })));
                assert!(outcomes[1].as_ref().is_ok_and(|p| p.seq == 5));
            }
            _ => panic!("both answered: ready with one refusal"),
        }
        let refused = answers.expect();
        assert!(answers.answer(refused.key(), Err(BusError::Congested { shard: 1 })));
        let mut ticket = PublishTicket::Waiting {
            answers: vec![None],
            waiting: vec![(vec![0], refused)],
        };
        assert!(matches!(
            ticket.poll_finish(&mut cx),
            Poll::Ready(Err(BusError::Congested { shard: 1 }))
        ));
    }

    /// Holds a writer (no release task runs in these tests, so it stays held).
    fn hold_a_writer(shard: &Shard) {
        let ctl = Rc::new(ConnCtl::new(99, "127.0.0.1:1".parse().unwrap(), false));
        shard
            .pacer
            .hold(&ctl, Instant::now() + Duration::from_secs(60));
    }

    #[monoio::test(enable_timer = true)]
    async fn under_write_pacing_deliveries_gather_and_answers_do_not_wait_for_them() {
        let shard = test_shard();
        let log = subscribed(&shard, 2).await;
        // A busy shard whose subscribers are not held does not gather.
        shard.pacer.set_hold(Duration::from_millis(800));
        publish_then_answer(&shard, &log).await;
        assert_eq!(*log.borrow(), names(&[], 0..2, &["answer"]));
        log.borrow_mut().clear();
        // Once a writer is held, the deliverer gathers for an eighth of the hold: 100 ms.
        hold_a_writer(&shard);
        publish_then_answer(&shard, &log).await;
        monoio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(*log.borrow(), names(&["answer"], 0..0, &[]));
        monoio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*log.borrow(), names(&["answer"], 0..2, &[]));
        // Once the hold is gone, events are offered in the round they come.
        shard.pacer.set_hold(Duration::ZERO);
        log.borrow_mut().clear();
        publish_then_answer(&shard, &log).await;
        assert_eq!(*log.borrow(), names(&[], 0..2, &["answer"]));
    }

    #[monoio::test(enable_timer = true)]
    async fn a_gathering_deliverer_offers_at_once_when_its_bound_is_reached() {
        let shard = test_shard();
        let log = subscribed(&shard, 2).await;
        // A gathering of a second.
        shard.pacer.set_hold(Duration::from_secs(8));
        hold_a_writer(&shard);
        for seq in 1..GATHER_EVENTS_MAX as u64 {
            shard.queue_delivery(crate::bus::event::testing::event("c", seq, "t"));
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
        assert!(log.borrow().is_empty(), "gathering below the bound");
        shard.queue_delivery(crate::bus::event::testing::event(
            "c",
            GATHER_EVENTS_MAX as u64,
            "t",
        ));
        monoio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(*log.borrow(), names(&[], 0..2, &[]));
        assert!(shard.deliveries.borrow().is_empty());
    }

    #[monoio::test(enable_timer = true)]
    async fn an_answer_waits_for_nothing_when_nothing_is_delivered() {
        let shard = test_shard();
        let log = subscribed(&shard, 2).await;
        shard.local_deliveries_first().await;
        log.borrow_mut().push("answer".into());
        // A publish after the answer is written after it.
        shard.queue_delivery(crate::bus::event::testing::event("c", 1, "t"));
        monoio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(*log.borrow(), names(&["answer"], 0..2, &[]));
    }
}
