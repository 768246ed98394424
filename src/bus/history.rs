//! A channel's bounded history: the last `size` events no older than `ttl`.
//!
//! Owns the retained events of one channel and the index of their ids (idempotent publish).
//! Must never hold more than `size` events, and never keep an id whose event has left.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use super::event::Event;

#[derive(Debug)]
pub struct History {
    events: VecDeque<Arc<Event>>,
    /// The seq of `events.front()` (seqs in the ring are consecutive), kept apart so evicting
    /// never reads the evicted event: it is the ring's oldest, long out of the cache.
    first_seq: u64,
    /// Every retained event's seq and id hash, found by the hash; the id itself is read from
    /// the event. Entries of evicted events stay until the next sweep (a lookup skips them by
    /// seq), so evicting costs no probe into the table, and the stored hash lets the table
    /// grow and rehash without reading any event.
    ids: HashTable<IdEntry>,
    hasher: super::ProcessHasher,
    size: usize,
    ttl: Duration,
    /// No retained event expires before this (`None`: nothing retained, or a TTL too long to
    /// ever end on this clock). A lower bound, kept inline so the shard's periodic sweep over
    /// every channel reads only the channel's own entry: reading each oldest event's time
    /// instead cost two cache misses per channel, and with 5,000 channels a whole millisecond
    /// of stalled shard every sweep. Set from the first event pushed into an empty history,
    /// made exact again only when it is reached.
    expires_no_sooner: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct IdEntry {
    seq: u64,
    hash: u64,
}

/// Where a reader asking for events after `since` stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every event after `since` is retained (possibly none).
    Complete,
    /// Some events after `since` have already left the ring.
    Gap,
}

impl History {
    pub fn new(size: usize, ttl: Duration) -> Self {
        assert!(size >= 1, "history.size is validated to be at least 1");
        History {
            events: VecDeque::new(),
            first_seq: 0,
            ids: HashTable::new(),
            hasher: super::ProcessHasher,
            size,
            ttl,
            expires_no_sooner: None,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The seq of an event with this id still in history: a publisher's id through the
    /// index, an id relay generated through the seq it carries (see [`super::ids`]).
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        if let Some(seq) = self.generated_seq_of(id) {
            return Some(seq);
        }
        if self.ids.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(id.as_bytes());
        self.ids
            .find(hash, |entry| {
                entry.hash == hash
                    && self
                        .retained(entry.seq)
                        .is_some_and(|e| e.id_bytes() == id.as_bytes())
            })
            .map(|entry| entry.seq)
    }

    /// The retained event whose seq ends in the bits `id` would carry, if it is that id.
    fn generated_seq_of(&self, id: &str) -> Option<u64> {
        let low = super::ids::seq_hint(id)?;
        let last = self.events.back()?.seq;
        // The one retained seq with these low 32 bits (a ring holds far fewer than 2^32).
        let seq = self.first_seq + u64::from(low.wrapping_sub(self.first_seq as u32));
        if seq > last {
            return None;
        }
        self.retained(seq)
            .filter(|e| e.id_bytes() == id.as_bytes())
            .map(|e| e.seq)
    }

    /// The retained event with this seq.
    fn retained(&self, seq: u64) -> Option<&Arc<Event>> {
        let at = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.events.get(at)
    }

    /// Evicts until one more event fits; returns how many left, and the last of them (the
    /// caller may reuse its memory for the next event).
    pub fn make_room(&mut self) -> (usize, Option<Arc<Event>>) {
        let mut evicted = 0;
        let mut last = None;
        while self.events.len() >= self.size {
            last = self.pop_front();
            evicted += 1;
        }
        (evicted, last)
    }

    /// Appends `event` (seq must follow the last one), in the id index when `indexed` (an id
    /// its publisher gave; see [`History::seq_of`]); returns how many events were evicted.
    pub fn push(&mut self, event: Arc<Event>, indexed: bool) -> usize {
        // Consecutive seqs let a seq find its event by position.
        debug_assert!(self
            .events
            .back()
            .is_none_or(|last| last.seq + 1 == event.seq));
        let (evicted, _) = self.make_room();
        if self.events.is_empty() {
            self.first_seq = event.seq;
            self.expires_no_sooner = event.accepted_at.checked_add(self.ttl);
        }
        self.sweep_if_due();
        if indexed {
            let hash = self.hasher.hash_one(event.id_bytes());
            // A publisher's id is refused while it is retained, so at most one of its entries
            // (the others left with evicted events) leads to a retained event.
            self.ids.insert_unique(
                hash,
                IdEntry {
                    seq: event.seq,
                    hash,
                },
                |entry| entry.hash,
            );
        }
        self.events.push_back(event);
        self.prefetch_next_evictions();
        evicted
    }

    /// A full ring evicts its oldest event on the next push, long out of the cache by then:
    /// this asks for it early, in two steps one push apart (the event's buffer can only be
    /// found once the event itself is in the cache).
    fn prefetch_next_evictions(&self) {
        if self.events.len() < self.size {
            return;
        }
        if let Some(after_next) = self.events.get(1) {
            // The reference counts sit just before the event in its allocation.
            let counts = 2 * std::mem::size_of::<usize>();
            let start = Arc::as_ptr(after_next).cast::<u8>().wrapping_sub(counts);
            super::event::prefetch(start, counts + std::mem::size_of::<Event>());
        }
        if let Some(next) = self.events.front() {
            next.prefetch_buffer();
        }
    }

    /// The earliest the oldest retained event can expire (`None`: nothing retained, or a TTL
    /// past the clock's range).
    pub fn expires_no_sooner(&self) -> Option<Instant> {
        self.expires_no_sooner
    }

    /// Drops events older than the TTL; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        match self.expires_no_sooner {
            Some(at) if now >= at => {}
            // Nothing retained, or nothing old enough: no event is read.
            _ => return 0,
        }
        let mut expired = 0;
        while let Some(front) = self.events.front() {
            if now.saturating_duration_since(front.accepted_at) < self.ttl {
                break;
            }
            self.pop_front();
            expired += 1;
        }
        self.after_dropping_oldest();
        expired
    }

    /// Drops up to `n` of the oldest events before their time (a node over its history
    /// budget); returns how many.
    pub fn drop_oldest(&mut self, n: usize) -> usize {
        let mut dropped = 0;
        while dropped < n && self.pop_front().is_some() {
            dropped += 1;
        }
        self.after_dropping_oldest();
        dropped
    }

    /// What `expire` and `drop_oldest` leave in order: the next expiry, and the id index.
    fn after_dropping_oldest(&mut self) {
        self.expires_no_sooner = self
            .events
            .front()
            .and_then(|e| e.accepted_at.checked_add(self.ttl));
        if self.events.is_empty() {
            // An idle channel gives its index back.
            self.ids = HashTable::new();
        } else {
            self.sweep_if_due();
        }
    }

    fn pop_front(&mut self) -> Option<Arc<Event>> {
        let front = self.events.pop_front();
        if front.is_some() {
            self.first_seq += 1;
        }
        front
    }

    /// Drops the index entries of evicted events once they are a third of it: one pass over
    /// the table (in memory order) every `len / 2` evictions, instead of a probe per eviction.
    fn sweep_if_due(&mut self) {
        if self.ids.len() > self.events.len() + self.events.len() / 2 + 16 {
            let first = self.first_seq;
            self.ids.retain(|entry| entry.seq >= first);
        }
    }

    /// Whether every event after `since` (up to `last_seq`) is still retained.
    pub fn reach(&self, since: u64, last_seq: u64) -> Reach {
        if since >= last_seq {
            return Reach::Complete;
        }
        if !self.events.is_empty() && self.first_seq <= since + 1 {
            Reach::Complete
        } else {
            Reach::Gap
        }
    }

    /// Up to `limit` events with `seq > since`, ascending.
    pub fn after(&self, since: u64, limit: usize) -> Vec<Arc<Event>> {
        let start = usize::try_from(since.saturating_add(1).saturating_sub(self.first_seq))
            .unwrap_or(usize::MAX);
        self.events
            .range(start.min(self.events.len())..)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Total bytes held, for metrics and limits.
    pub fn footprint(&self) -> usize {
        self.events.iter().map(|e| e.footprint()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, id: &str, at: Instant) -> Arc<Event> {
        crate::bus::event::testing::event_with("c", seq, "t", id, at)
    }

    #[test]
    fn generated_ids_are_found_by_their_seq_without_an_index_entry() {
        let now = Instant::now();
        let mut source = crate::bus::ids::IdSource::new();
        let mut h = History::new(3, Duration::from_secs(60));
        let mut ids = Vec::new();
        for seq in 1..=5 {
            let id = source.next(1_000, seq);
            let id = std::str::from_utf8(&id).expect("ASCII").to_string();
            h.push(ev(seq, &id, now), false);
            ids.push(id);
        }
        assert!(h.ids.is_empty(), "no index entry for a generated id");
        assert_eq!(h.seq_of(&ids[0]), None, "evicted");
        assert_eq!(h.seq_of(&ids[1]), None, "evicted");
        assert_eq!(h.seq_of(&ids[2]), Some(3));
        assert_eq!(h.seq_of(&ids[4]), Some(5));
        assert_eq!(h.seq_of(&ids[4].to_uppercase()), None, "the same id only");
        // Any UUID v7 ending in a retained seq is compared whole, not trusted.
        let flipped = if ids[3].as_bytes()[24] == b'0' {
            '1'
        } else {
            '0'
        };
        let lookalike = format!("{}{flipped}{}", &ids[3][..24], &ids[3][25..]);
        assert_ne!(lookalike, ids[3]);
        assert_eq!(crate::bus::ids::seq_hint(&lookalike), Some(4));
        assert_eq!(h.seq_of(&lookalike), None);
        // A publisher's v7 id is indexed, and found, whatever its last bits say.
        let theirs = "0193f1d2-0000-7000-8000-000000000004";
        h.push(ev(6, theirs, now), true);
        assert_eq!(h.seq_of(theirs), Some(6));
    }

    #[test]
    fn bounded_by_size_and_ids_follow_evictions() {
        let now = Instant::now();
        let mut h = History::new(3, Duration::from_secs(60));
        for seq in 1..=5 {
            h.push(ev(seq, &format!("id{seq}"), now), true);
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.seq_of("id1"), None);
        assert_eq!(h.seq_of("id2"), None);
        assert_eq!(h.seq_of("id3"), Some(3));
        assert_eq!(h.seq_of("id5"), Some(5));
        let seqs: Vec<u64> = h.after(0, 100).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
    }

    #[test]
    fn the_id_index_survives_growth_and_wraparound() {
        // Growing the index rehashes through the ring; evicting finds entries by seq.
        let now = Instant::now();
        let mut h = History::new(3000, Duration::from_secs(60));
        for seq in 1..=10_000 {
            h.push(ev(seq, &format!("id-{seq}"), now), true);
        }
        // Every retained event is indexed, and evicted ones only until the next sweep.
        assert!(
            (3000..=3000 + 1500 + 16).contains(&h.ids.len()),
            "{} index entries",
            h.ids.len()
        );
        for seq in [1, 6999, 7000] {
            assert_eq!(h.seq_of(&format!("id-{seq}")), None, "evicted {seq}");
        }
        for seq in [7001, 8500, 10_000] {
            assert_eq!(h.seq_of(&format!("id-{seq}")), Some(seq));
        }
        assert_eq!(h.seq_of("id-10001"), None);
    }

    #[test]
    fn after_is_exclusive_and_limited() {
        let now = Instant::now();
        let mut h = History::new(10, Duration::from_secs(60));
        for seq in 1..=6 {
            h.push(ev(seq, &seq.to_string(), now), true);
        }
        let seqs = |v: Vec<Arc<Event>>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(h.after(2, 2)), vec![3, 4]);
        assert_eq!(seqs(h.after(6, 10)), Vec::<u64>::new());
        assert_eq!(seqs(h.after(100, 10)), Vec::<u64>::new());
        assert_eq!(seqs(h.after(0, 1)), vec![1]);
    }

    #[test]
    fn reach_tells_a_gap_from_a_complete_replay() {
        let now = Instant::now();
        let mut h = History::new(3, Duration::from_secs(60));
        for seq in 1..=5 {
            h.push(ev(seq, &seq.to_string(), now), true);
        }
        // Retained: 3, 4, 5.
        assert_eq!(h.reach(2, 5), Reach::Complete);
        assert_eq!(h.reach(1, 5), Reach::Gap);
        assert_eq!(h.reach(5, 5), Reach::Complete);
        let empty = History::new(3, Duration::from_secs(60));
        assert_eq!(empty.reach(0, 0), Reach::Complete);
        assert_eq!(empty.reach(0, 4), Reach::Gap);
    }

    #[test]
    fn ttl_expires_from_the_front() {
        let start = Instant::now();
        let mut h = History::new(10, Duration::from_secs(5));
        h.push(ev(1, "a", start), true);
        h.push(ev(2, "b", start + Duration::from_secs(3)), true);
        assert_eq!(h.expire(start + Duration::from_secs(4)), 0);
        assert_eq!(h.expire(start + Duration::from_secs(6)), 1);
        assert_eq!(h.len(), 1);
        assert_eq!(h.seq_of("a"), None);
        assert_eq!(h.expire(start + Duration::from_secs(9)), 1);
        assert!(h.is_empty());
        assert_eq!(h.ids.len(), 0, "an emptied history keeps no index");
        // The next event starts the ring again where the seqs left off.
        h.push(ev(3, "c", start + Duration::from_secs(10)), true);
        assert_eq!((h.seq_of("c"), h.seq_of("b")), (Some(3), None));
        assert_eq!(
            h.after(0, 10).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3]
        );
        assert_eq!(h.expires_no_sooner, Some(start + Duration::from_secs(15)));
    }

    #[test]
    fn the_expiry_bound_never_skips_a_due_event_after_evictions_by_size() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut h = History::new(2, Duration::from_secs(5));
        assert_eq!(h.expires_no_sooner, None);
        h.push(ev(1, "a", at(0)), true);
        h.push(ev(2, "b", at(2)), true);
        // Evicts seq 1 by size: the bound stays at its time (earlier than seq 2's), so a
        // sweep then reads the front, expires nothing, and makes the bound exact.
        h.push(ev(3, "c", at(4)), true);
        assert_eq!(h.expires_no_sooner, Some(at(5)));
        assert_eq!(h.expire(at(6)), 0);
        assert_eq!(h.expires_no_sooner, Some(at(7)));
        // Before the bound no event is read and nothing expires; at it, seq 2 does.
        assert_eq!(h.expire(at(6)), 0);
        assert_eq!(h.expire(at(7)), 1);
        assert_eq!(h.expires_no_sooner, Some(at(9)));
        assert_eq!(h.expire(at(20)), 1);
        assert_eq!(h.expires_no_sooner, None);
        // A TTL past the clock's end never expires, and costs no read either.
        let mut forever = History::new(2, Duration::MAX);
        forever.push(ev(1, "a", at(0)), true);
        assert_eq!(forever.expire(at(1_000_000)), 0);
        assert_eq!(forever.len(), 1);
    }

    #[test]
    fn evicted_ids_are_swept_in_bounded_steps_and_never_found() {
        let now = Instant::now();
        let mut h = History::new(10, Duration::from_secs(60));
        let mut most = 0;
        for seq in 1..=1000 {
            h.push(ev(seq, &format!("id-{seq}"), now), true);
            most = most.max(h.ids.len());
            // Only the last 10 ids are found, whatever the index still holds.
            let first_kept = seq.saturating_sub(9).max(1);
            assert_eq!(h.seq_of(&format!("id-{first_kept}")), Some(first_kept));
            if first_kept > 1 {
                let gone = first_kept - 1;
                assert_eq!(h.seq_of(&format!("id-{gone}")), None, "evicted {gone}");
            }
        }
        assert!(
            most <= 10 + 5 + 16 + 1,
            "the index peaked at {most} entries"
        );
    }
}
