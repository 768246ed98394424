//! A channel's bounded history: the last `size` events no older than `ttl`.
//!
//! Owns the retained events of one channel and the index of their ids (idempotent publish).
//! Must never hold more than `size` events, and never keep an id whose event has left.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use super::event::Event;

#[derive(Debug)]
pub struct History {
    events: VecDeque<Arc<Event>>,
    /// The seq of every retained event, found by its id's hash; the id itself is read from
    /// the event, so the index holds 8 bytes per event and evicting compares seqs, not ids.
    ids: HashTable<u64>,
    /// The id hash of each event in `events`, in the same order: evicting finds the index
    /// entry without reading the (long cold) evicted event's id.
    id_hashes: VecDeque<u64>,
    hasher: ahash::RandomState,
    size: usize,
    ttl: Duration,
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
            ids: HashTable::new(),
            id_hashes: VecDeque::new(),
            hasher: ahash::RandomState::new(),
            size,
            ttl,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The seq of an event with this id still in history.
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        let hash = self.hasher.hash_one(id.as_bytes());
        self.ids
            .find(hash, |&seq| {
                slot(&self.events, seq)
                    .and_then(|i| self.events.get(i))
                    .is_some_and(|e| e.id_bytes() == id.as_bytes())
            })
            .copied()
    }

    /// Appends `event` (seq must follow the last one); returns how many events were evicted.
    pub fn push(&mut self, event: Arc<Event>) -> usize {
        // Consecutive seqs let an index entry find its event (and its hash) by position.
        debug_assert!(self
            .events
            .back()
            .is_none_or(|last| last.seq + 1 == event.seq));
        let mut evicted = 0;
        while self.events.len() >= self.size {
            self.evict_front();
            evicted += 1;
        }
        let hash = self.hasher.hash_one(event.id_bytes());
        // A publisher's id is refused while it is retained, so it is never in the index twice.
        let (events, hashes) = (&self.events, &self.id_hashes);
        self.ids.insert_unique(hash, event.seq, |&seq| {
            slot(events, seq)
                .and_then(|i| hashes.get(i))
                .copied()
                .unwrap_or_default()
        });
        self.events.push_back(event);
        self.id_hashes.push_back(hash);
        evicted
    }

    /// Drops events older than the TTL; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(front) = self.events.front() {
            if now.saturating_duration_since(front.accepted_at) < self.ttl {
                break;
            }
            self.evict_front();
            expired += 1;
        }
        expired
    }

    fn evict_front(&mut self) {
        if let (Some(old), Some(hash)) = (self.events.pop_front(), self.id_hashes.pop_front()) {
            if let Ok(entry) = self.ids.find_entry(hash, |&seq| seq == old.seq) {
                entry.remove();
            }
        }
    }

    /// Whether every event after `since` (up to `last_seq`) is still retained.
    pub fn reach(&self, since: u64, last_seq: u64) -> Reach {
        if since >= last_seq {
            return Reach::Complete;
        }
        match self.events.front() {
            Some(first) if first.seq <= since + 1 => Reach::Complete,
            _ => Reach::Gap,
        }
    }

    /// Up to `limit` events with `seq > since`, ascending.
    pub fn after(&self, since: u64, limit: usize) -> Vec<Arc<Event>> {
        let start = match self.events.front() {
            Some(first) if since >= first.seq => (since - first.seq + 1) as usize,
            _ => 0,
        };
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

/// Where the event with this seq is in the ring (seqs in it are consecutive).
fn slot(events: &VecDeque<Arc<Event>>, seq: u64) -> Option<usize> {
    let first = events.front()?.seq;
    usize::try_from(seq.checked_sub(first)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, id: &str, at: Instant) -> Arc<Event> {
        crate::bus::event::testing::event_with("c", seq, "t", id, at)
    }

    #[test]
    fn bounded_by_size_and_ids_follow_evictions() {
        let now = Instant::now();
        let mut h = History::new(3, Duration::from_secs(60));
        for seq in 1..=5 {
            h.push(ev(seq, &format!("id{seq}"), now));
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
            h.push(ev(seq, &format!("id-{seq}"), now));
        }
        assert_eq!(h.ids.len(), 3000, "one index entry per retained event");
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
            h.push(ev(seq, &seq.to_string(), now));
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
            h.push(ev(seq, &seq.to_string(), now));
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
        h.push(ev(1, "a", start));
        h.push(ev(2, "b", start + Duration::from_secs(3)));
        assert_eq!(h.expire(start + Duration::from_secs(4)), 0);
        assert_eq!(h.expire(start + Duration::from_secs(6)), 1);
        assert_eq!(h.len(), 1);
        assert_eq!(h.seq_of("a"), None);
        assert_eq!(h.expire(start + Duration::from_secs(9)), 1);
        assert!(h.is_empty());
    }
}
