//! The ids relay gives events whose publisher gave none: UUID v7 (RFC 9562) of the event's
//! `ts`, in order within a millisecond on one shard, whose last 32 bits are the event's seq.
//!
//! Owns the layout of those ids and reading a seq back out of one. Why the seq: a publisher
//! may send an id it got back from relay (a retry of a publish it believes lost), and that
//! must be found in the channel's history as a duplicate. With the seq in the id, history finds
//! such an id by position, and keeps no index entry for the events with generated ids (most
//! of them): no id hashed and no table probed per publish, no table held per channel.
//!
//! Layout of the 74 bits v7 leaves to the implementation: a 42-bit counter (the 12 bits of
//! `rand_a` and the top 30 of `rand_b`), started at random in each new millisecond and then
//! counted up (RFC 9562 section 6.2, method 1), then the seq's low 32 bits. Must never: give
//! the same id twice on one shard, or let a seq read out of an id be trusted without comparing
//! the whole id with the event at that seq (any UUID v7 has some last 32 bits).

/// Makes one shard's generated ids.
#[derive(Debug)]
pub struct IdSource {
    /// The millisecond of the last id (ids never go back in time, even if the clock does).
    last_ms: u64,
    counter: u64,
    /// splitmix64 state for each millisecond's random start.
    random: u64,
}

/// The counter's width, and the room left under a fresh millisecond's random start.
const COUNTER_BITS: u32 = 42;
const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;

impl IdSource {
    pub fn new() -> IdSource {
        // Random per shard start, so that shards and processes do not start alike.
        let (seed, _) = uuid::Uuid::new_v4().as_u64_pair();
        IdSource {
            last_ms: 0,
            counter: 0,
            random: seed,
        }
    }

    /// The id of the event with `seq` published at `ts_ms`, hyphenated, lower case.
    pub fn next(&mut self, ts_ms: u64, seq: u64) -> [u8; uuid::fmt::Hyphenated::LENGTH] {
        if ts_ms > self.last_ms {
            self.last_ms = ts_ms;
            // The top bit stays clear: at least 2^41 ids fit in the millisecond after it.
            self.counter = super::splitmix64(&mut self.random) >> (64 - COUNTER_BITS + 1);
        } else if self.counter < COUNTER_MAX {
            self.counter += 1;
        } else {
            // 2^41 ids in one millisecond: borrow the next one.
            self.last_ms += 1;
            self.counter = 0;
        }
        let bytes = Self::layout(self.counter, seq);
        let uuid = uuid::Builder::from_unix_timestamp_millis(self.last_ms, &bytes).into_uuid();
        let mut out = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut out);
        out
    }

    /// The 10 bytes after the timestamp: `rand_a` (the low nibble of byte 0, then byte 1)
    /// and `rand_b` (the low 6 bits of byte 2, then bytes 3 to 9). Counter bits 41..30 go to
    /// `rand_a`, bits 29..0 to the top of `rand_b`, the seq's low 32 bits to its end.
    fn layout(counter: u64, seq: u64) -> [u8; 10] {
        let rand_a = (counter >> 30) & 0xfff;
        let rand_b = ((counter & ((1 << 30) - 1)) << 32) | u64::from(seq as u32);
        let mut bytes = [0u8; 10];
        bytes[0] = (rand_a >> 8) as u8;
        bytes[1] = rand_a as u8;
        bytes[2..].copy_from_slice(&rand_b.to_be_bytes());
        bytes
    }
}

impl Default for IdSource {
    fn default() -> Self {
        IdSource::new()
    }
}

/// The low 32 bits of the seq a generated id would carry, if `id` is a UUID v7 at all.
pub fn seq_hint(id: &str) -> Option<u32> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let (_, low) = uuid.as_u64_pair();
    Some(low as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(id: &[u8; 36]) -> uuid::Uuid {
        uuid::Uuid::try_parse_ascii(id).expect("a UUID")
    }

    #[test]
    fn generated_ids_are_v7_of_their_ts_carry_their_seq_and_are_ordered() {
        let mut source = IdSource::new();
        let ts_ms = 1_763_812_345_123;
        let ids: Vec<[u8; 36]> = (1..=10_000u64)
            .map(|seq| source.next(ts_ms, seq * 7))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let uuid = parse(id);
            assert_eq!(uuid.get_version_num(), 7);
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = uuid.get_timestamp().expect("v7").to_unix();
            assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, ts_ms);
            let text = std::str::from_utf8(id).expect("ASCII");
            assert_eq!(
                text,
                uuid.hyphenated().to_string(),
                "hyphenated, lower case"
            );
            assert_eq!(seq_hint(text), Some((i as u32 + 1) * 7));
        }
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "in order within the millisecond"
        );
    }

    #[test]
    fn ids_never_go_back_even_when_the_clock_does() {
        let mut source = IdSource::new();
        let a = source.next(2_000, 1);
        let b = source.next(1_000, 2);
        let c = source.next(3_000, u64::from(u32::MAX) + 5);
        assert!(a < b && b < c);
        let (secs, _) = parse(&b).get_timestamp().expect("v7").to_unix();
        assert_eq!(secs, 2, "the earlier millisecond is kept");
        assert_eq!(
            seq_hint(std::str::from_utf8(&c).expect("ASCII")),
            Some(4),
            "low 32 bits"
        );
    }

    #[test]
    fn a_full_millisecond_borrows_the_next() {
        let mut source = IdSource::new();
        let first = source.next(5_000, 1);
        source.counter = COUNTER_MAX;
        let next = source.next(5_000, 2);
        assert!(first < next);
        let (secs, nanos) = parse(&next).get_timestamp().expect("v7").to_unix();
        assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, 5_001);
    }

    #[test]
    fn only_v7_uuids_give_a_hint() {
        assert_eq!(seq_hint("x"), None);
        assert_eq!(seq_hint(&uuid::Uuid::new_v4().to_string()), None);
        assert_eq!(seq_hint("0193f1d2-0000-7000-8000-00000000002a"), Some(42));
        assert_eq!(seq_hint("0193F1D2-0000-7000-8000-00000000002A"), Some(42));
    }
}
