//! The event bus inside one shard: the channels this shard owns, and its local subscribers.
//!
//! [`Owned`] is the owner side: for each channel whose [`shard_of`] is this shard it assigns
//! `seq`, keeps the epoch and the history ring, answers recovery and history queries, and knows
//! how many subscribers every shard has. [`LocalSubs`] is the subscriber side: the sinks on this
//! shard per channel. Must never: be touched by another thread (a shard reaches another shard's
//! bus only through mesh messages), or do I/O.

pub mod event;
pub mod history;
pub mod ids;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::Bytes;
use hashbrown::hash_map::EntryRef;
use smallvec::SmallVec;

use event::{Draft, Epoch, Event, Stamp};
use history::{History, Reach};

/// The hasher of a channel's own small tables (its history's id index, its presence): seeded
/// at random once per process, and of no size, where a seeded hasher per table would add 32
/// bytes to every channel (three of them: 96), and a channel's entry is read on every publish.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessHasher;

impl BuildHasher for ProcessHasher {
    type Hasher = ahash::AHasher;

    fn build_hasher(&self) -> ahash::AHasher {
        static SEEDS: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
        SEEDS.get_or_init(ahash::RandomState::new).build_hasher()
    }
}

/// The owner shard of a channel: a fixed hash of its name, the same on every thread.
pub fn shard_of(channel: &str, shards: usize) -> usize {
    // FNV-1a: stable across processes and threads, unlike a randomly seeded hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in channel.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's high bits barely change between names that differ in their last bytes; a
    // finaliser mixes every bit in before multiply-shift picks the shard from the high bits.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    ((u128::from(hash) * shards as u128) >> 64) as usize
}

/// A position in a channel's life, as a client remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: String,
    pub seq: u64,
}

/// The owner's answer to a publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub channel: Arc<str>,
    pub seq: u64,
    pub duplicate: bool,
    /// The sequenced event (not for duplicates): what the owner queues for webhooks.
    pub event: Option<Arc<Event>>,
    /// A duplicate's id (a new event's id is read from the event).
    duplicate_id: Box<str>,
}

impl Published {
    /// A refused duplicate of the retained event `seq`.
    pub fn duplicate(channel: Arc<str>, seq: u64, id: Box<str>) -> Published {
        Published {
            channel,
            seq,
            duplicate: true,
            event: None,
            duplicate_id: id,
        }
    }

    /// The accepted event's id, or the duplicate's.
    pub fn id(&self) -> &str {
        match &self.event {
            Some(event) => event.id(),
            None => &self.duplicate_id,
        }
    }

    /// [`Published::id`] as bytes, which is all that an answer needs of it.
    pub fn id_bytes(&self) -> &[u8] {
        match &self.event {
            Some(event) => event.id_bytes(),
            None => self.duplicate_id.as_bytes(),
        }
    }
}

/// The owner's answer to a subscribe.
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub epoch: Epoch,
    /// The channel's last assigned seq when the subscription took effect.
    pub seq: u64,
    /// With `since`: whether every missed event is in `replay`.
    pub recovered: bool,
    /// The events after `since` still in history, in seq order.
    pub replay: Vec<Arc<Event>>,
}

/// The owner's answer to a history query.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub epoch: Epoch,
    pub seq: u64,
    pub events: Vec<Arc<Event>>,
}

/// One owned channel as `/api/v1/relay/channels` shows it.
#[derive(Debug, Clone)]
pub struct OwnedInfo {
    pub channel: Arc<str>,
    pub epoch: Epoch,
    pub seq: u64,
    pub history: usize,
    pub subscribers: u64,
}

/// Which owned channels a listing asks for (`GET /api/v1/relay/channels`).
#[derive(Debug, Clone)]
pub struct ChannelQuery {
    /// Only names that start with this ("" for all).
    pub prefix: String,
    /// Only names after this one, in byte order: the last name of the page before.
    pub after: Option<String>,
    /// At most this many rows.
    pub limit: usize,
}

/// One shard's part of a listing.
#[derive(Debug)]
pub struct ChannelPage {
    /// The first `limit` names after `after` that start with the prefix, in name order.
    pub rows: Vec<OwnedInfo>,
    /// Every owned channel whose name starts with the prefix, before or after `after`.
    pub matching: usize,
}

/// What the config says about one channel, resolved once when the channel is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSettings {
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Track who is subscribed.
    pub presence: bool,
    /// Push `presence.join` / `presence.leave` to subscribers.
    pub join_leave: bool,
}

pub type ChannelPolicy = Box<dyn Fn(&str) -> ChannelSettings>;

/// A subscriber as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: Arc<str>,
    pub conn: Arc<str>,
    /// When it joined, Unix milliseconds.
    pub since_ms: u64,
}

/// Who is on one channel: members by connection, and how many connections each user has.
#[derive(Debug, Default)]
struct Presence {
    /// Members, found by the hash of their connection id: each member once, its connection id
    /// the key (a map would keep the id twice).
    by_conn: hashbrown::HashTable<Member>,
    hasher: ProcessHasher,
    /// Connections per user with a JWT; a connection without one is its own user (its
    /// `user` is its `conn`), always one connection, so it is not counted here.
    conns_per_user: std::collections::HashMap<Arc<str>, u32, ProcessHasher>,
}

struct OwnedChannel {
    /// The name the channel's events and answers share (its key in [`Owned::channels`]).
    name: Arc<str>,
    epoch: Epoch,
    last_seq: u64,
    history: History,
    /// (shard, subscribers there). Small: a channel is rarely on more shards than a few.
    interest: SmallVec<[(u16, u32); 4]>,
    settings: ChannelSettings,
    presence: Presence,
}

impl OwnedChannel {
    fn subscribers(&self) -> u64 {
        self.interest.iter().map(|&(_, n)| u64::from(n)).sum()
    }
}

/// A shard's owned channels by name. hashbrown's, for `entry_ref`: a publish looks its channel
/// up by the name it borrows from the request, and a name is copied only for a new channel.
type ChannelMap = hashbrown::HashMap<Arc<str>, OwnedChannel, ahash::RandomState>;

/// The channels one shard owns.
pub struct Owned {
    channels: ChannelMap,
    policy: ChannelPolicy,
    epochs: EpochSource,
    history_events: usize,
    /// The ids this shard gives events whose publisher gave none.
    ids: ids::IdSource,
    /// When each channel's oldest retained event expires, earliest first: a sweep visits the
    /// channels that have something to expire, not every channel (a shard may own millions,
    /// and visiting each of a million cost a 20 ms stall four times a second).
    expiries: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// Channels that lost their last subscriber since the last sweep: reclaimed then if they
    /// retain nothing either.
    maybe_idle: Vec<Arc<str>>,
    /// The most events this shard retains, all channels together (its share of
    /// `history.max_events`): past it, the events nearest their expiry go first.
    event_budget: usize,
    /// Events dropped to keep within `event_budget`, since [`Owned::take_budget_drops`].
    budget_drops: u64,
}

/// What a maintenance sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub expired: usize,
    pub reclaimed: usize,
}

impl Owned {
    pub fn new(policy: ChannelPolicy, epoch_seed: u64) -> Self {
        Owned {
            channels: ChannelMap::with_hasher(ahash::RandomState::new()),
            policy,
            epochs: EpochSource::new(epoch_seed),
            history_events: 0,
            ids: ids::IdSource::new(),
            expiries: BinaryHeap::new(),
            maybe_idle: Vec::new(),
            event_budget: usize::MAX,
            budget_drops: 0,
        }
    }

    /// Caps the events this shard retains, all channels together, at `budget` (at least 1).
    pub fn with_event_budget(mut self, budget: usize) -> Self {
        self.event_budget = budget.max(1);
        self
    }

    /// Events dropped to keep within the budget since the last call.
    pub fn take_budget_drops(&mut self) -> u64 {
        std::mem::take(&mut self.budget_drops)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    pub fn history_events(&self) -> usize {
        self.history_events
    }

    fn channel(&mut self, name: &Arc<str>) -> &mut OwnedChannel {
        Self::channel_in(
            &mut self.channels,
            &self.policy,
            &mut self.epochs,
            name,
            Some(name),
        )
    }

    /// [`Owned::channel`] over the fields it needs, so that the others stay free to borrow: the
    /// channel `name`, created if new. `shared` is the caller's own `Arc` of the name, when it
    /// has one (a subscriber's), so that a new channel's key and name share its allocation.
    fn channel_in<'a>(
        channels: &'a mut ChannelMap,
        policy: &ChannelPolicy,
        epochs: &mut EpochSource,
        name: &str,
        shared: Option<&Arc<str>>,
    ) -> &'a mut OwnedChannel {
        // One probe, by the borrowed name.
        match channels.entry_ref(name) {
            EntryRef::Occupied(entry) => entry.into_mut(),
            EntryRef::Vacant(entry) => {
                let name: Arc<str> = shared.cloned().unwrap_or_else(|| Arc::from(name));
                let settings = policy(&name);
                let channel = OwnedChannel {
                    name: name.clone(),
                    epoch: epochs.next(),
                    last_seq: 0,
                    history: History::new(settings.history_size, settings.history_ttl),
                    interest: SmallVec::new(),
                    settings,
                    presence: Presence::default(),
                };
                entry.insert_with_key(name, channel)
            }
        }
    }

    /// Sequences one draft; calls `deliver(shard, &event)` for every shard with subscribers.
    pub fn publish(
        &mut self,
        draft: &Draft,
        ts_ms: u64,
        now: Instant,
        mut deliver: impl FnMut(usize, &Arc<Event>),
    ) -> Published {
        let channel = Self::channel_in(
            &mut self.channels,
            &self.policy,
            &mut self.epochs,
            &draft.channel,
            None,
        );
        if let Some(id) = &draft.id {
            if let Some(seq) = channel.history.seq_of(id) {
                return Published::duplicate(channel.name.clone(), seq, id.clone());
            }
        }
        let seq = channel.last_seq + 1;
        let generated;
        let id: &[u8] = match &draft.id {
            Some(id) => id.as_bytes(),
            // The event's own `ts`, not another clock read, and this shard's counter (no
            // process-wide lock), which keeps its ids in order within a millisecond.
            None => {
                generated = self.ids.next(ts_ms, seq);
                &generated
            }
        };
        let (evicted, spare) = channel.history.make_room();
        let stamp = Stamp {
            channel: &channel.name,
            epoch: channel.epoch,
            seq,
            id,
            ts_ms,
            accepted_at: now,
        };
        let event = Event::encode_reusing(spare, draft, &stamp);
        channel.last_seq = seq;
        // A channel is in `expiries` exactly while its history has an expiry: queued when it
        // gets one, and again by the sweep for as long as it keeps one.
        let queued = channel.history.expires_no_sooner().is_some();
        // A generated id is found by the seq it carries (see `ids`), not through the index.
        channel.history.push(event.clone(), draft.id.is_some());
        if let (false, Some(at)) = (queued, channel.history.expires_no_sooner()) {
            self.expiries.push(Reverse((at, channel.name.clone())));
        }
        for &(shard, _) in &channel.interest {
            deliver(usize::from(shard), &event);
        }
        let name = channel.name.clone();
        self.history_events = self.history_events + 1 - evicted;
        if self.history_events > self.event_budget {
            self.drop_to_budget();
        }
        Published {
            channel: name,
            seq,
            duplicate: false,
            event: Some(event),
            duplicate_id: Box::default(),
        }
    }

    /// Registers one subscriber on `shard`; with `since`, returns the missed events too.
    pub fn subscribe(
        &mut self,
        name: &Arc<str>,
        shard: usize,
        since: Option<&Since>,
    ) -> Subscribed {
        self.subscribe_member(name, shard, since, None, 0).0
    }

    /// [`Owned::subscribe`] for a subscriber that presence lists; returns the
    /// `presence.join` push to fan out when this is the user's first connection here.
    pub fn subscribe_member(
        &mut self,
        name: &Arc<str>,
        shard: usize,
        since: Option<&Since>,
        member: Option<(&Arc<str>, &Arc<str>)>,
        now_ms: u64,
    ) -> (Subscribed, Option<Bytes>) {
        let channel = self.channel(name);
        let mut push = None;
        if let (Some((user, conn)), true) = (member, channel.settings.presence) {
            let first = channel.presence.join(user, conn, now_ms);
            if first && channel.settings.join_leave {
                push = Some(presence_frame("presence.join", name, user, conn));
            }
        }
        match channel
            .interest
            .iter_mut()
            .find(|(s, _)| usize::from(*s) == shard)
        {
            Some((_, n)) => *n += 1,
            None => channel.interest.push((shard as u16, 1)),
        }
        let (recovered, replay) = match since {
            None => (false, Vec::new()),
            Some(since) if *since.epoch == *channel.epoch && since.seq <= channel.last_seq => {
                match channel.history.reach(since.seq, channel.last_seq) {
                    Reach::Complete => (true, channel.history.after(since.seq, usize::MAX)),
                    Reach::Gap => (false, Vec::new()),
                }
            }
            Some(_) => (false, Vec::new()),
        };
        let answer = Subscribed {
            epoch: channel.epoch,
            seq: channel.last_seq,
            recovered,
            replay,
        };
        (answer, push)
    }

    /// Forgets one subscriber on `shard`.
    pub fn unsubscribe(&mut self, name: &str, shard: usize) {
        self.unsubscribe_member(name, shard, None);
    }

    /// [`Owned::unsubscribe`] for a listed subscriber; returns the `presence.leave` push when
    /// this was the user's last connection here.
    pub fn unsubscribe_member(
        &mut self,
        name: &str,
        shard: usize,
        member_conn: Option<&str>,
    ) -> Option<Bytes> {
        let channel = self.channels.get_mut(name)?;
        let mut push = None;
        if let Some(conn) = member_conn {
            if let Some((member, last)) = channel.presence.leave(conn) {
                if last && channel.settings.join_leave {
                    push = Some(presence_frame(
                        "presence.leave",
                        name,
                        &member.user,
                        &member.conn,
                    ));
                }
            }
        }
        if let Some(pos) = channel
            .interest
            .iter()
            .position(|(s, _)| usize::from(*s) == shard)
        {
            channel.interest[pos].1 -= 1;
            if channel.interest[pos].1 == 0 {
                channel.interest.swap_remove(pos);
                if channel.interest.is_empty() && channel.history.is_empty() {
                    self.maybe_idle.push(channel.name.clone());
                }
            }
        }
        push
    }

    /// Shards with subscribers to `name`.
    pub fn interested(&self, name: &str) -> SmallVec<[usize; 4]> {
        self.channels
            .get(name)
            .map(|c| c.interest.iter().map(|&(s, _)| usize::from(s)).collect())
            .unwrap_or_default()
    }

    /// Members of `name`: `Err(())` when presence is off for it, `Ok(empty)` when unknown.
    #[allow(clippy::result_unit_err)]
    pub fn members(&self, name: &str) -> Result<Vec<Member>, ()> {
        match self.channels.get(name) {
            None => Ok(Vec::new()),
            Some(c) if !c.settings.presence => Err(()),
            Some(c) => {
                let mut members: Vec<Member> = c.presence.members().cloned().collect();
                members.sort_by(|a, b| (a.since_ms, &a.conn).cmp(&(b.since_ms, &b.conn)));
                Ok(members)
            }
        }
    }

    /// Events after `since` (exclusive), at most `limit`. `None` when the channel is unknown.
    pub fn history(&self, name: &str, since: u64, limit: usize) -> Option<HistoryPage> {
        let channel = self.channels.get(name)?;
        Some(HistoryPage {
            epoch: channel.epoch,
            seq: channel.last_seq,
            events: channel.history.after(since, limit),
        })
    }

    /// Drops the events nearest their expiry (the oldest, where channels share a TTL) until the
    /// shard is back within its budget. A channel left with nothing is reclaimed, as if its
    /// history had expired, unless it has subscribers.
    fn drop_to_budget(&mut self) {
        while self.history_events > self.event_budget {
            let over = self.history_events - self.event_budget;
            // `None`: only events that never expire are left, nothing to choose by.
            let Some((dropped, _)) = self.drop_from_next(|history| history.drop_oldest(over))
            else {
                return;
            };
            self.history_events -= dropped;
            self.budget_drops += dropped as u64;
        }
    }

    /// Takes the channel whose oldest event expires first off the expiry heap and lets `drop`
    /// take events from its history; then queues it again for what is left, or reclaims it when
    /// it keeps nothing and has no subscriber. `Some((dropped, reclaimed))`; `None` when the
    /// heap is empty.
    fn drop_from_next(
        &mut self,
        drop: impl FnOnce(&mut History) -> usize,
    ) -> Option<(usize, bool)> {
        let Reverse((_, name)) = self.expiries.pop()?;
        let Some(channel) = self.channels.get_mut(&name) else {
            return Some((0, false));
        };
        let dropped = drop(&mut channel.history);
        let mut reclaimed = false;
        match channel.history.expires_no_sooner() {
            Some(next) => self.expiries.push(Reverse((next, name))),
            None if channel.interest.is_empty() => {
                self.channels.remove(&name);
                reclaimed = true;
            }
            None => {}
        }
        Some((dropped, reclaimed))
    }

    /// Expires old history and reclaims channels with no subscribers and no history. Visits
    /// only the channels whose oldest event is due and those that lost their last subscriber.
    pub fn sweep(&mut self, now: Instant) -> Sweep {
        let mut sweep = Sweep::default();
        while self
            .expiries
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            let Some((expired, reclaimed)) = self.drop_from_next(|history| history.expire(now))
            else {
                break;
            };
            sweep.expired += expired;
            sweep.reclaimed += usize::from(reclaimed);
        }
        for name in self.maybe_idle.drain(..) {
            let idle = self
                .channels
                .get(&name)
                .is_some_and(|c| c.interest.is_empty() && c.history.is_empty());
            if idle {
                self.channels.remove(&name);
                sweep.reclaimed += 1;
            }
        }
        self.history_events -= sweep.expired;
        sweep
    }

    /// One page of the owned channels. Every channel is looked at once (a million take 50 to
    /// 150 ms), but only the page's rows are copied or sorted: the names are kept in a
    /// max-heap of the page's size, so a name past the page costs one comparison.
    pub fn list(&self, query: &ChannelQuery) -> ChannelPage {
        let mut page: BinaryHeap<&Arc<str>> = BinaryHeap::with_capacity(query.limit + 1);
        let mut matching = 0;
        for name in self.channels.keys() {
            if !name.starts_with(query.prefix.as_str()) {
                continue;
            }
            matching += 1;
            if query.after.as_deref().is_some_and(|after| &**name <= after) {
                continue;
            }
            if page.len() < query.limit {
                page.push(name);
            } else if page.peek().is_some_and(|last| name < *last) {
                page.pop();
                page.push(name);
            }
        }
        let rows = page
            .into_sorted_vec()
            .into_iter()
            .filter_map(|name| {
                let channel = self.channels.get(name)?;
                Some(OwnedInfo {
                    channel: name.clone(),
                    epoch: channel.epoch,
                    seq: channel.last_seq,
                    history: channel.history.len(),
                    subscribers: channel.subscribers(),
                })
            })
            .collect();
        ChannelPage { rows, matching }
    }
}

impl Presence {
    /// Returns whether this is the user's first connection on the channel.
    fn join(&mut self, user: &Arc<str>, conn: &Arc<str>, now_ms: u64) -> bool {
        let hasher = &self.hasher;
        let entry = self.by_conn.entry(
            hasher.hash_one(&**conn),
            |m| m.conn == *conn,
            |m| hasher.hash_one(&*m.conn),
        );
        let hashbrown::hash_table::Entry::Vacant(vacant) = entry else {
            return false;
        };
        vacant.insert(Member {
            user: user.clone(),
            conn: conn.clone(),
            since_ms: now_ms,
        });
        if Arc::ptr_eq(user, conn) {
            return true;
        }
        let count = self.conns_per_user.entry(user.clone()).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Returns the member and whether it was the user's last connection.
    fn leave(&mut self, conn: &str) -> Option<(Member, bool)> {
        let (member, _) = self
            .by_conn
            .find_entry(self.hasher.hash_one(conn), |m| &*m.conn == conn)
            .ok()?
            .remove();
        if Arc::ptr_eq(&member.user, &member.conn) {
            return Some((member, true));
        }
        let last = match self.conns_per_user.get_mut(&member.user) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                self.conns_per_user.remove(&member.user);
                true
            }
        };
        Some((member, last))
    }

    fn members(&self) -> impl Iterator<Item = &Member> {
        self.by_conn.iter()
    }
}

/// `{"op":"presence.join"|"presence.leave","channel","user","conn"}` as a WebSocket text frame.
fn presence_frame(op: &str, channel: &str, user: &str, conn: &str) -> Bytes {
    let mut payload = Vec::with_capacity(64 + channel.len() + user.len() + conn.len());
    payload.extend_from_slice(b"{\"op\":\"");
    payload.extend_from_slice(op.as_bytes());
    payload.extend_from_slice(b"\",\"channel\":\"");
    payload.extend_from_slice(channel.as_bytes());
    payload.extend_from_slice(b"\",\"user\":\"");
    crate::http::codec::json_escape_into(&mut payload, user);
    payload.extend_from_slice(b"\",\"conn\":\"");
    crate::http::codec::json_escape_into(&mut payload, conn);
    payload.extend_from_slice(b"\"}");
    let mut frame = Vec::with_capacity(payload.len() + 4);
    event::push_ws_header(&mut frame, 0x1, payload.len());
    frame.extend_from_slice(&payload);
    Bytes::from(frame)
}

/// splitmix64: a counter through a bijective mixer, so it never repeats within 2^64 calls.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Makes epochs: 8 characters of `[0-9A-Za-z]`, unique per channel life and per process start.
struct EpochSource {
    state: u64,
}

impl EpochSource {
    fn new(seed: u64) -> Self {
        EpochSource { state: seed }
    }

    fn next(&mut self) -> Epoch {
        const ALPHABET: &[u8; 62] =
            b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut z = splitmix64(&mut self.state);
        let mut out = [0u8; 8];
        for byte in &mut out {
            *byte = ALPHABET[(z % 62) as usize];
            z /= 62;
        }
        let text = std::str::from_utf8(&out).unwrap_or_default();
        Epoch::new(text).expect("eight characters of the epoch alphabet")
    }
}

/// Something on this shard that receives a channel's live events (an SSE stream, a WebSocket).
pub trait Sink {
    fn offer(&self, event: &Arc<Event>);
    /// Offers a run of one channel's events, in order. A sink that can take them at once
    /// (one borrow, one lookup, one wake-up) overrides this.
    fn offer_many(&self, events: &[Arc<Event>]) {
        for event in events {
            self.offer(event);
        }
    }
    /// A presence push (a complete WebSocket frame): not an event, no seq, not in history.
    /// Transports without pushes (SSE) ignore it.
    fn push(&self, _channel: &Arc<str>, _frame: &Bytes) {}
}

/// The sinks of one channel on this shard, with the ids they unsubscribe by.
/// A channel's local sinks, the first inline: most channels have one subscriber per shard (the
/// `channels` scenario's 5,000 do), and their delivery then reads no separate buffer.
type Sinks = SmallVec<[(u64, Rc<dyn Sink>); 1]>;

/// Local subscribers per channel.
#[derive(Default)]
pub struct LocalSubs {
    channels: AHashMap<Arc<str>, Sinks>,
    total: usize,
}

impl LocalSubs {
    pub fn add(&mut self, channel: &Arc<str>, sink_id: u64, sink: Rc<dyn Sink>) {
        self.channels
            .entry(channel.clone())
            .or_default()
            .push((sink_id, sink));
        self.total += 1;
    }

    /// Returns whether the sink was there.
    pub fn remove(&mut self, channel: &str, sink_id: u64) -> bool {
        let Some(sinks) = self.channels.get_mut(channel) else {
            return false;
        };
        let Some(pos) = sinks.iter().position(|(id, _)| *id == sink_id) else {
            return false;
        };
        sinks.swap_remove(pos);
        if sinks.is_empty() {
            self.channels.remove(channel);
        }
        self.total -= 1;
        true
    }

    /// Offers `event` to every local sink of its channel; returns how many.
    pub fn deliver(&self, event: &Arc<Event>) -> usize {
        match self.channels.get(&*event.channel) {
            Some(sinks) => {
                for (_, sink) in sinks {
                    sink.offer(event);
                }
                sinks.len()
            }
            None => 0,
        }
    }

    /// Offers several events, sink by sink: each sink takes its channel's run of events at
    /// once, instead of every sink being visited again for every event (at a thousand
    /// subscribers that revisit, a cache miss or more per sink, is most of a delivery's
    /// cost). Sorts `events` by channel, stably: one channel's events keep their order.
    /// Returns the deliveries made.
    ///
    /// Calls `then` once: after the first `ahead` sinks have been offered their runs, or after
    /// the last sink when there are fewer (see [`crate::shard::Shard::local_deliveries_first`]).
    pub fn deliver_batch(
        &self,
        events: &mut [Arc<Event>],
        ahead: usize,
        then: impl FnOnce(),
    ) -> usize {
        let mut then = Some(then);
        let mut offered = 0;
        if events
            .windows(2)
            .any(|w| matches!(w, [a, b] if a.channel != b.channel))
        {
            events.sort_by(|a, b| a.channel.cmp(&b.channel));
        }
        let mut delivered = 0;
        for run in events.chunk_by(|a, b| a.channel == b.channel) {
            let Some(sinks) = run.first().and_then(|e| self.channels.get(&*e.channel)) else {
                continue;
            };
            for (_, sink) in sinks {
                if offered == ahead {
                    if let Some(then) = then.take() {
                        then();
                    }
                }
                sink.offer_many(run);
                offered += 1;
            }
            delivered += sinks.len() * run.len();
        }
        if let Some(then) = then.take() {
            then();
        }
        delivered
    }

    /// Hands a presence push to every local sink of `channel`.
    pub fn push(&self, channel: &Arc<str>, frame: &Bytes) {
        if let Some(sinks) = self.channels.get(channel) {
            for (_, sink) in sinks {
                sink.push(channel, frame);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::cell::{Cell, RefCell};

    fn settings(size: usize, ttl_s: u64, join_leave: bool) -> ChannelSettings {
        ChannelSettings {
            history_size: size,
            history_ttl: Duration::from_secs(ttl_s),
            presence: true,
            join_leave,
        }
    }

    fn owned() -> Owned {
        Owned::new(Box::new(|_| settings(3, 60, true)), 42)
    }

    fn draft(channel: &str, id: Option<&str>) -> Draft {
        Draft {
            channel: channel.into(),
            event_type: "t".into(),
            id: id.map(Into::into),
            data: Bytes::from_static(b"{}"),
            source: None,
            correlation_id: None,
        }
    }

    #[test]
    fn a_listing_page_is_the_next_names_in_order() {
        let mut bus = owned();
        for name in ["b.2", "a.1", "b.1", "c", "b.3", "b.10"] {
            bus.publish(&draft(name, None), 0, Instant::now(), |_, _| {});
        }
        bus.publish(&draft("b.1", None), 0, Instant::now(), |_, _| {});
        let list = |prefix: &str, after: Option<&str>, limit| {
            let page = bus.list(&ChannelQuery {
                prefix: prefix.into(),
                after: after.map(Into::into),
                limit,
            });
            let names: Vec<String> = page.rows.iter().map(|r| r.channel.to_string()).collect();
            (names, page.matching)
        };
        assert_eq!(
            list("", None, 10),
            (
                ["a.1", "b.1", "b.10", "b.2", "b.3", "c"]
                    .map(String::from)
                    .to_vec(),
                6
            )
        );
        // The prefix counts every match; `after` and `limit` pick the page.
        assert_eq!(list("b.", None, 2), (vec!["b.1".into(), "b.10".into()], 4));
        assert_eq!(
            list("b.", Some("b.10"), 2),
            (vec!["b.2".into(), "b.3".into()], 4)
        );
        assert_eq!(list("b.", Some("b.3"), 2), (vec![], 4));
        assert_eq!(list("", Some("b"), 1), (vec!["b.1".into()], 6));
        assert_eq!(list("x", None, 5), (vec![], 0));
        let page = bus.list(&ChannelQuery {
            prefix: "b.1".into(),
            after: None,
            limit: 1,
        });
        assert_eq!((&*page.rows[0].channel, page.rows[0].seq), ("b.1", 2));
    }

    #[test]
    fn owner_routing_is_stable_and_spread() {
        let mut per_shard = [0usize; 4];
        for i in 0..4000 {
            let name = format!("doc.{i}");
            let shard = shard_of(&name, 4);
            assert_eq!(shard, shard_of(&name, 4));
            per_shard[shard] += 1;
        }
        for n in per_shard {
            assert!((700..1300).contains(&n), "uneven spread {per_shard:?}");
        }
        assert_eq!(shard_of("anything", 1), 0);
    }

    #[test]
    fn seq_starts_at_one_and_duplicates_are_not_published() {
        let mut bus = owned();
        let now = Instant::now();
        let mut delivered = 0;
        let a = bus.publish(&draft("c", Some("x")), 0, now, |_, _| delivered += 1);
        assert_eq!((a.seq, a.duplicate), (1, false));
        let b = bus.publish(&draft("c", Some("x")), 0, now, |_, _| delivered += 1);
        assert_eq!((b.seq, b.duplicate, b.id()), (1, true, "x"));
        let c = bus.publish(&draft("c", None), 0, now, |_, _| delivered += 1);
        assert_eq!(c.seq, 2);
        assert_eq!(c.id().len(), 36, "a generated UUID");
        // A publisher retrying with the id relay gave it publishes nothing new.
        let again = bus.publish(&draft("c", Some(c.id())), 0, now, |_, _| delivered += 1);
        assert_eq!((again.seq, again.duplicate, again.id()), (2, true, c.id()));
        assert_eq!(delivered, 0, "nobody subscribed");
    }

    #[test]
    fn generated_ids_are_v7_of_the_event_ts_and_ordered_within_a_millisecond() {
        let mut bus = owned();
        let ts_ms = 1_763_812_345_123;
        let ids: Vec<uuid::Uuid> = (0..100)
            .map(|_| {
                let p = bus.publish(&draft("c", None), ts_ms, Instant::now(), |_, _| {});
                uuid::Uuid::parse_str(p.id()).unwrap()
            })
            .collect();
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, ts_ms);
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in publish order");
    }

    #[test]
    fn deliveries_go_once_to_each_interested_shard() {
        let mut bus = owned();
        let name: Arc<str> = Arc::from("c");
        bus.subscribe(&name, 1, None);
        bus.subscribe(&name, 1, None);
        bus.subscribe(&name, 3, None);
        let mut shards = Vec::new();
        bus.publish(&draft("c", None), 0, Instant::now(), |s, _| shards.push(s));
        shards.sort();
        assert_eq!(shards, vec![1, 3]);
        bus.unsubscribe("c", 1);
        bus.unsubscribe("c", 3);
        let mut shards = Vec::new();
        bus.publish(&draft("c", None), 0, Instant::now(), |s, _| shards.push(s));
        assert_eq!(shards, vec![1]);
    }

    #[test]
    fn recovery_replays_exactly_the_missed_events_or_says_it_cannot() {
        let mut bus = owned();
        let name: Arc<str> = Arc::from("c");
        let first = bus.subscribe(&name, 0, None);
        assert_eq!((first.seq, first.recovered), (0, false));
        for _ in 0..4 {
            bus.publish(&draft("c", None), 0, Instant::now(), |_, _| {});
        }
        // History holds 2, 3, 4 (size 3).
        let epoch = first.epoch.to_string();
        let since = |seq| Since {
            epoch: epoch.clone(),
            seq,
        };
        let ok = bus.subscribe(&name, 0, Some(&since(2)));
        assert!(ok.recovered);
        assert_eq!(
            ok.replay.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(ok.seq, 4);
        let gap = bus.subscribe(&name, 0, Some(&since(0)));
        assert!(!gap.recovered);
        assert!(gap.replay.is_empty());
        let other_life = bus.subscribe(
            &name,
            0,
            Some(&Since {
                epoch: "zzzzzzzz".into(),
                seq: 3,
            }),
        );
        assert!(!other_life.recovered);
        let up_to_date = bus.subscribe(&name, 0, Some(&since(4)));
        assert!(up_to_date.recovered && up_to_date.replay.is_empty());
    }

    #[test]
    fn idle_empty_channels_are_reclaimed_with_a_new_epoch_after() {
        let mut bus = Owned::new(Box::new(|_| settings(3, 1, false)), 7);
        let start = Instant::now();
        bus.publish(&draft("c", None), 0, start, |_, _| {});
        let epoch = bus.history("c", 0, 10).unwrap().epoch;
        assert_eq!(bus.sweep(start), Sweep::default());
        let later = start + Duration::from_secs(2);
        assert_eq!(
            bus.sweep(later),
            Sweep {
                expired: 1,
                reclaimed: 1
            }
        );
        assert!(bus.history("c", 0, 10).is_none());
        let again = bus.publish(&draft("c", None), 0, later, |_, _| {});
        assert_eq!(again.seq, 1);
        assert_ne!(bus.history("c", 0, 10).unwrap().epoch, epoch);
        assert_eq!(bus.history_events(), 1);
    }

    #[test]
    fn a_sweep_expires_what_is_due_and_queues_each_channel_with_history_once() {
        let mut bus = Owned::new(Box::new(|_| settings(10, 10, false)), 7);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // "a" at 0 and 3 s, "b" at 1 s, "c" at 5 s: one queue entry per channel.
        bus.publish(&draft("a", None), 0, at(0), |_, _| {});
        bus.publish(&draft("b", None), 0, at(1), |_, _| {});
        bus.publish(&draft("a", None), 0, at(3), |_, _| {});
        bus.publish(&draft("c", None), 0, at(5), |_, _| {});
        assert_eq!(bus.expiries.len(), 3);
        assert_eq!(
            bus.sweep(at(9)),
            Sweep::default(),
            "nothing is 10 s old yet"
        );
        // At 11 s: a's first event and all of b.
        assert_eq!(
            bus.sweep(at(11)),
            Sweep {
                expired: 2,
                reclaimed: 1
            }
        );
        assert!(
            bus.history("b", 0, 10).is_none(),
            "b retained nothing: reclaimed"
        );
        assert_eq!(bus.history("a", 0, 10).map(|p| p.events.len()), Some(1));
        assert_eq!(
            bus.expiries.len(),
            2,
            "a (again, for its second event) and c"
        );
        assert_eq!(bus.history_events(), 2);
        // At 16 s the rest: a at 13 s, c at 15 s.
        assert_eq!(
            bus.sweep(at(16)),
            Sweep {
                expired: 2,
                reclaimed: 2
            }
        );
        assert!(bus.expiries.is_empty() && bus.channel_count() == 0);
        assert_eq!(bus.history_events(), 0);
    }

    #[test]
    fn past_its_budget_a_shard_drops_the_events_nearest_expiry_first() {
        // Channel "short" keeps events 5 s, every other 60 s; the shard keeps 4 events in all.
        let policy = |name: &str| settings(10, if name == "short" { 5 } else { 60 }, false);
        let mut bus = Owned::new(Box::new(policy), 7).with_event_budget(4);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let kept = Arc::from("kept");
        bus.subscribe(&kept, 0, None);
        bus.publish(&draft("kept", None), 0, at(0), |_, _| {});
        bus.publish(&draft("old", None), 0, at(1), |_, _| {});
        bus.publish(&draft("old", None), 0, at(2), |_, _| {});
        bus.publish(&draft("short", None), 0, at(3), |_, _| {});
        assert_eq!((bus.history_events(), bus.take_budget_drops()), (4, 0));
        // A fifth: "short" expires soonest (8 s) and goes, and with it the channel.
        bus.publish(&draft("new", None), 0, at(4), |_, _| {});
        assert_eq!((bus.history_events(), bus.take_budget_drops()), (4, 1));
        assert!(
            bus.history("short", 0, 10).is_none(),
            "emptied and unsubscribed: gone"
        );
        // Then "kept" (60 s from 0 s): emptied, but it has a subscriber, so it stays.
        bus.publish(&draft("new", None), 0, at(5), |_, _| {});
        assert_eq!(bus.take_budget_drops(), 1);
        let page = bus
            .history("kept", 0, 10)
            .expect("a subscribed channel stays");
        assert!(page.events.is_empty() && page.seq == 1);
        // Then the oldest of "old", one event at a time.
        bus.publish(&draft("new", None), 0, at(6), |_, _| {});
        assert_eq!(bus.take_budget_drops(), 1);
        let old = bus
            .history("old", 0, 10)
            .expect("old keeps its newer event");
        assert_eq!(
            old.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(bus.history_events(), 4);
        assert_eq!(
            bus.expiries.len(),
            2,
            "old and new: one entry per channel with events"
        );
    }

    /// A bus (history TTL 1 s) whose channel `name` has a subscriber on shard 0 and one event,
    /// published at the instant returned.
    fn one_subscriber_one_event(name: &str) -> (Owned, Instant) {
        let mut bus = Owned::new(Box::new(|_| settings(10, 1, false)), 7);
        let start = Instant::now();
        bus.subscribe(&Arc::from(name), 0, None);
        bus.publish(&draft(name, None), 0, start, |_, _| {});
        (bus, start)
    }

    #[test]
    fn a_subscribed_channel_whose_history_expired_is_queued_again_by_its_next_event() {
        let (mut bus, start) = one_subscriber_one_event("s");
        let later = start + Duration::from_secs(2);
        assert_eq!(
            bus.sweep(later),
            Sweep {
                expired: 1,
                reclaimed: 0
            },
            "a channel with a subscriber stays, empty"
        );
        assert!(bus.expiries.is_empty());
        bus.publish(&draft("s", None), 0, later, |_, _| {});
        assert_eq!(bus.expiries.len(), 1, "its next event queues it again");
        let much_later = later + Duration::from_secs(2);
        assert_eq!(bus.sweep(much_later).expired, 1);
        // The last subscriber leaves a channel that retains nothing: reclaimed at the next
        // sweep, whenever that is.
        bus.unsubscribe("s", 0);
        assert_eq!(bus.sweep(much_later).reclaimed, 1);
        assert_eq!(bus.channel_count(), 0);
    }

    #[test]
    fn a_channel_that_loses_its_last_subscriber_but_retains_events_waits_for_them() {
        let (mut bus, start) = one_subscriber_one_event("k");
        bus.unsubscribe("k", 0);
        assert_eq!(bus.sweep(start).reclaimed, 0, "its event is still retained");
        assert!(bus.history("k", 0, 10).is_some());
        assert_eq!(
            bus.sweep(start + Duration::from_secs(2)),
            Sweep {
                expired: 1,
                reclaimed: 1
            }
        );
    }

    #[test]
    fn channels_with_subscribers_survive_a_sweep() {
        let mut bus = Owned::new(Box::new(|_| settings(3, 1, false)), 7);
        bus.subscribe(&Arc::from("c"), 0, None);
        assert_eq!(
            bus.sweep(Instant::now() + Duration::from_secs(5)).reclaimed,
            0
        );
        assert_eq!(bus.channel_count(), 1);
    }

    struct Recorder(RefCell<Vec<u64>>);
    impl Sink for Recorder {
        fn offer(&self, event: &Arc<Event>) {
            self.0.borrow_mut().push(event.seq);
        }
    }

    #[test]
    fn a_batch_reaches_each_sink_as_one_ordered_run_per_channel() {
        #[derive(Default)]
        struct Runs(RefCell<Vec<Vec<(String, u64)>>>);
        impl Sink for Runs {
            fn offer(&self, event: &Arc<Event>) {
                self.offer_many(std::slice::from_ref(event));
            }
            fn offer_many(&self, events: &[Arc<Event>]) {
                let run = events.iter().map(|e| (e.channel.to_string(), e.seq));
                self.0.borrow_mut().push(run.collect());
            }
        }
        let mut local = LocalSubs::default();
        let both = Rc::new(Runs::default());
        let only_d = Rc::new(Runs::default());
        local.add(&Arc::from("c"), 1, both.clone());
        local.add(&Arc::from("d"), 1, both.clone());
        local.add(&Arc::from("d"), 2, only_d.clone());
        let ev = |channel: &str, seq| crate::bus::event::testing::event(channel, seq, "t");
        let mut batch = vec![ev("d", 7), ev("c", 1), ev("d", 8), ev("x", 1), ev("c", 2)];
        // `then` runs once, after the first two sinks' offers (both's "c" and "d" runs).
        let offers_before_then = Cell::new(None);
        let offers = || both.0.borrow().len() + only_d.0.borrow().len();
        let then = || offers_before_then.set(Some(offers()));
        assert_eq!(local.deliver_batch(&mut batch, 2, then), 2 + 2 * 2);
        assert_eq!(offers_before_then.get(), Some(2));
        let c = |s| ("c".to_string(), s);
        let d = |s| ("d".to_string(), s);
        assert_eq!(*both.0.borrow(), vec![vec![c(1), c(2)], vec![d(7), d(8)]]);
        assert_eq!(*only_d.0.borrow(), vec![vec![d(7), d(8)]]);
        // Fewer sinks than `ahead`: `then` still runs, once, after the last offer.
        let calls = Cell::new(0);
        let mut batch = vec![ev("c", 3)];
        assert_eq!(
            local.deliver_batch(&mut batch, 16, || calls.set(calls.get() + 1)),
            1
        );
        assert_eq!((calls.get(), offers()), (1, 4));
        let mut nobody = vec![ev("x", 2)];
        assert_eq!(
            local.deliver_batch(&mut nobody, 16, || calls.set(calls.get() + 1)),
            0
        );
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn local_subscribers_receive_their_channel_only() {
        let mut local = LocalSubs::default();
        let a = Rc::new(Recorder(RefCell::new(Vec::new())));
        let b = Rc::new(Recorder(RefCell::new(Vec::new())));
        local.add(&Arc::from("c"), 1, a.clone());
        local.add(&Arc::from("d"), 2, b.clone());
        let mut bus = owned();
        bus.subscribe(&Arc::from("c"), 0, None);
        bus.publish(&draft("c", None), 0, Instant::now(), |_, ev| {
            local.deliver(ev);
        });
        assert_eq!(*a.0.borrow(), vec![1]);
        assert!(b.0.borrow().is_empty());
        assert!(local.remove("c", 1));
        assert!(!local.remove("c", 1));
        assert_eq!(local.total(), 1);
    }

    #[test]
    fn presence_counts_users_and_pushes_on_first_join_and_last_leave() {
        let mut bus = owned();
        let name: Arc<str> = Arc::from("room");
        let alice: Arc<str> = Arc::from("alice");
        let (c1, c2): (Arc<str>, Arc<str>) = (Arc::from("c1"), Arc::from("c2"));
        let (_, push) = bus.subscribe_member(&name, 0, None, Some((&alice, &c1)), 5);
        let push = push.expect("first connection of alice joins");
        let text = std::str::from_utf8(&push[2..]).unwrap();
        assert_eq!(
            text,
            r#"{"op":"presence.join","channel":"room","user":"alice","conn":"c1"}"#
        );
        let (_, push) = bus.subscribe_member(&name, 1, None, Some((&alice, &c2)), 6);
        assert!(
            push.is_none(),
            "a second connection of the same user is no new join"
        );
        let members = bus.members("room").unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!((&*members[0].conn, members[0].since_ms), ("c1", 5));
        assert!(bus.unsubscribe_member("room", 0, Some("c1")).is_none());
        let leave = bus
            .unsubscribe_member("room", 1, Some("c2"))
            .expect("last connection leaves");
        assert!(std::str::from_utf8(&leave[2..])
            .unwrap()
            .contains("presence.leave"));
        assert!(bus.members("room").unwrap().is_empty());
        assert!(bus.interested("room").is_empty());
    }

    #[test]
    fn presence_of_connections_without_a_user_and_repeated_joins() {
        let mut presence = Presence::default();
        // Without a JWT a connection is its own user: the same `Arc` as user and conn.
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a1"), Arc::from("b2"));
        assert!(presence.join(&a, &a, 1));
        assert!(presence.join(&b, &b, 2));
        assert!(!presence.join(&a, &a, 3), "joining twice is no new join");
        assert!(
            presence.conns_per_user.is_empty(),
            "own users are not counted"
        );
        // A JWT user named like a connection id is still a user with its own count.
        let named: Arc<str> = Arc::from("a1");
        let c: Arc<str> = Arc::from("c3");
        assert!(presence.join(&named, &c, 4));
        assert_eq!(presence.members().count(), 3);
        let (member, last) = presence.leave("a1").expect("a1 is a member");
        assert_eq!((&*member.user, member.since_ms, last), ("a1", 1, true));
        assert!(presence.leave("a1").is_none());
        assert_eq!(presence.leave("c3").map(|(_, last)| last), Some(true));
        assert_eq!(presence.leave("b2").map(|(m, _)| m.since_ms), Some(2));
        assert_eq!(presence.members().count(), 0);
        assert!(presence.conns_per_user.is_empty());
    }

    #[test]
    fn presence_can_be_off_and_pushes_off() {
        let mut quiet = Owned::new(Box::new(|_| settings(3, 60, false)), 1);
        let name: Arc<str> = Arc::from("c");
        let (u, c): (Arc<str>, Arc<str>) = (Arc::from("u"), Arc::from("x"));
        let (_, push) = quiet.subscribe_member(&name, 0, None, Some((&u, &c)), 0);
        assert!(push.is_none(), "join_leave is off");
        assert_eq!(quiet.members("c").unwrap().len(), 1);
        let mut off = Owned::new(
            Box::new(|_| ChannelSettings {
                presence: false,
                ..settings(3, 60, true)
            }),
            1,
        );
        let (_, push) = off.subscribe_member(&name, 0, None, Some((&u, &c)), 0);
        assert!(push.is_none());
        assert!(off.members("c").is_err());
        assert_eq!(off.members("unknown").unwrap(), Vec::new());
    }

    #[test]
    fn epochs_are_distinct() {
        let mut source = EpochSource::new(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let e = source.next();
            assert_eq!(e.len(), 8);
            assert!(seen.insert(e));
        }
    }
}
