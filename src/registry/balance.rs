//! Choosing the instance of a subsystem that a proxied request (or a webhook batch) goes to
//! (API.md §6, §10: `lb = "round_robin" | "least_outstanding" | "weighted"`).
//!
//! Owns: one subsystem's balancing state on one shard: the round-robin cursor and the smooth
//! weighted round-robin counters, both keyed by the instance `index` the caller hands in, so the
//! state does not depend on the order of the candidate slice and survives instances appearing,
//! disappearing and coming back.
//! Must never: decide availability (health, circuit, draining are the caller's, folded into
//! `Candidate::available`), read the clock, allocate on a pick once the instances are known,
//! or panic on any candidate list: empty, all unavailable, duplicate indices, any weight.
//!
//! Limits: the weighted state keeps at most `2 * candidates + PRUNE_SLACK` entries; beyond that,
//! entries of instances absent from the current list are dropped (an instance that returns after
//! that starts from zero, as a new one does). Weights are `u32`, summed in `i64` with
//! saturation, so no list of weights can overflow.

/// Weighted-state entries kept beyond twice the candidate count before absent instances are
/// pruned. The slack keeps a brief deregistration from costing an instance its place.
pub const PRUNE_SLACK: usize = 16;

/// The load-balancing policy of one subsystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Each available instance in turn (the documented default).
    #[default]
    RoundRobin,
    /// The available instance with the fewest requests in flight; ties in turn.
    LeastOutstanding,
    /// Smooth weighted round robin (nginx): heavy instances get their share spread out, not
    /// in bursts.
    Weighted,
}

impl Policy {
    /// The config spelling (`lb = "..."`); `None` for anything else, so the config layer can
    /// name the bad value.
    pub fn parse(name: &str) -> Option<Policy> {
        match name {
            "round_robin" => Some(Policy::RoundRobin),
            "least_outstanding" => Some(Policy::LeastOutstanding),
            "weighted" => Some(Policy::Weighted),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastOutstanding => "least_outstanding",
            Policy::Weighted => "weighted",
        }
    }
}

/// One instance as the router sees it at pick time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The instance's stable index within its subsystem; what `pick` returns. Expected unique
    /// within one list (a duplicate does not panic, it just counts twice).
    pub index: usize,
    /// Relative share under `Policy::Weighted`; 0 is taken as 1.
    pub weight: u32,
    /// Requests in flight to this instance from this shard.
    pub outstanding: u32,
    /// Healthy, circuit not open, not draining.
    pub available: bool,
}

/// Balancing state of one subsystem on one shard.
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: Policy,
    /// The index picked last; the next round-robin turn goes to the smallest eligible index
    /// above it, wrapping to the smallest overall. Keyed by index rather than by slice position
    /// so an instance leaving the list does not make the cursor skip or repeat the others.
    last: Option<usize>,
    /// Smooth weighted round-robin `current_weight` per instance index, sorted by index.
    /// An unavailable instance keeps its value, as in nginx, so it resumes where it stood.
    current: Vec<(usize, i64)>,
}

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        Balancer {
            policy,
            last: None,
            current: Vec::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Picks among available candidates, skipping `exclude` (the instance a retry must avoid).
    /// `None` when none is available; with a single instance a retry that must avoid it gets
    /// `None` too, and a caller that may reuse it passes `exclude: None`.
    pub fn pick(&mut self, candidates: &[Candidate], exclude: Option<usize>) -> Option<usize> {
        let eligible = |c: &&Candidate| c.available && Some(c.index) != exclude;
        let picked = match self.policy {
            Policy::RoundRobin => next_in_turn(self.last, candidates.iter().filter(eligible)),
            Policy::LeastOutstanding => {
                let fewest = candidates
                    .iter()
                    .filter(eligible)
                    .map(|c| c.outstanding)
                    .min()?;
                next_in_turn(
                    self.last,
                    candidates
                        .iter()
                        .filter(eligible)
                        .filter(|c| c.outstanding == fewest),
                )
            }
            Policy::Weighted => self.smooth_weighted(candidates, exclude),
        }?;
        self.last = Some(picked);
        Some(picked)
    }

    /// Drops the weighted state of an instance that was removed for good, so a later instance
    /// given the same index starts fresh.
    pub fn forget(&mut self, index: usize) {
        if let Ok(at) = self.current.binary_search_by_key(&index, |&(i, _)| i) {
            self.current.remove(at);
        }
        // The round-robin cursor stays: the next turn still goes to the index after it.
    }

    /// nginx's smooth weighted round robin: every eligible instance adds its weight to its
    /// current value, the largest current value wins (ties to the lower index, so the slice
    /// order never matters), and the winner gives back the total.
    fn smooth_weighted(
        &mut self,
        candidates: &[Candidate],
        exclude: Option<usize>,
    ) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for c in candidates
            .iter()
            .filter(|c| c.available && Some(c.index) != exclude)
        {
            let weight = i64::from(c.weight.max(1));
            let current = self.current_mut(c.index);
            *current = current.saturating_add(weight);
            let value = *current;
            total = total.saturating_add(weight);
            best = match best {
                Some((index, top)) if top > value || (top == value && index < c.index) => best,
                _ => Some((c.index, value)),
            };
        }
        let (winner, _) = best?;
        let current = self.current_mut(winner);
        *current = current.saturating_sub(total);
        self.prune(candidates);
        Some(winner)
    }

    fn current_mut(&mut self, index: usize) -> &mut i64 {
        let at = match self.current.binary_search_by_key(&index, |&(i, _)| i) {
            Ok(at) => at,
            Err(at) => {
                // A new instance starts at zero, as in nginx.
                self.current.insert(at, (index, 0));
                at
            }
        };
        &mut self.current[at].1
    }

    /// Keeps the weighted state bounded when indices keep changing (instances re-registered
    /// under new indices): past the bound, entries of instances absent from the list go.
    fn prune(&mut self, candidates: &[Candidate]) {
        let bound = candidates
            .len()
            .saturating_mul(2)
            .saturating_add(PRUNE_SLACK);
        if self.current.len() > bound {
            self.current
                .retain(|&(index, _)| candidates.iter().any(|c| c.index == index));
        }
    }
}

/// The round-robin turn: the smallest index above `last`, else the smallest index (wrap-around).
fn next_in_turn<'a>(
    last: Option<usize>,
    eligible: impl Iterator<Item = &'a Candidate>,
) -> Option<usize> {
    let mut after: Option<usize> = None;
    let mut smallest: Option<usize> = None;
    for c in eligible {
        let i = c.index;
        smallest = Some(smallest.map_or(i, |s| s.min(i)));
        if last.is_none_or(|l| i > l) {
            after = Some(after.map_or(i, |a| a.min(i)));
        }
    }
    after.or(smallest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, weight: u32) -> Candidate {
        Candidate {
            index,
            weight,
            outstanding: 0,
            available: true,
        }
    }

    fn three() -> Vec<Candidate> {
        vec![cand(0, 1), cand(1, 1), cand(2, 1)]
    }

    fn counts(b: &mut Balancer, cs: &[Candidate], picks: usize) -> Vec<usize> {
        let len = cs.iter().map(|c| c.index + 1).max().unwrap_or(0);
        let mut n = vec![0; len];
        for _ in 0..picks {
            let Some(i) = b.pick(cs, None) else {
                panic!("no pick")
            };
            n[i] += 1;
        }
        n
    }

    fn sequence(b: &mut Balancer, cs: &[Candidate], picks: usize) -> Vec<Option<usize>> {
        (0..picks).map(|_| b.pick(cs, None)).collect()
    }

    const ALL: [Policy; 3] = [
        Policy::RoundRobin,
        Policy::LeastOutstanding,
        Policy::Weighted,
    ];

    #[test]
    fn policy_names_round_trip() {
        for p in ALL {
            assert_eq!(Policy::parse(p.as_str()), Some(p));
        }
        assert_eq!(Policy::parse("random"), None);
        assert_eq!(Policy::default(), Policy::RoundRobin);
    }

    #[test]
    fn round_robin_spreads_300_picks_evenly_over_3() {
        let mut b = Balancer::new(Policy::RoundRobin);
        assert_eq!(counts(&mut b, &three(), 300), vec![100, 100, 100]);
        let mut b = Balancer::new(Policy::RoundRobin);
        assert_eq!(
            sequence(&mut b, &three(), 4),
            vec![Some(0), Some(1), Some(2), Some(0)]
        );
    }

    #[test]
    fn round_robin_does_not_depend_on_slice_order() {
        let mut b = Balancer::new(Policy::RoundRobin);
        let mut reversed = three();
        reversed.reverse();
        assert_eq!(
            sequence(&mut b, &reversed, 4),
            vec![Some(0), Some(1), Some(2), Some(0)]
        );
    }

    #[test]
    fn every_policy_skips_unavailable() {
        for p in ALL {
            let mut cs = three();
            cs[1].available = false;
            let mut b = Balancer::new(p);
            assert_eq!(counts(&mut b, &cs, 100), vec![50, 0, 50], "{p:?}");
        }
    }

    #[test]
    fn round_robin_keeps_its_turn_when_an_instance_leaves() {
        let mut b = Balancer::new(Policy::RoundRobin);
        let mut cs = three();
        assert_eq!(b.pick(&cs, None), Some(0));
        assert_eq!(b.pick(&cs, None), Some(1));
        // 1 goes away right after being picked: the turn moves on to 2, not back to 0.
        cs.remove(1);
        assert_eq!(b.pick(&cs, None), Some(2));
        assert_eq!(b.pick(&cs, None), Some(0));
    }

    #[test]
    fn every_policy_honours_exclude() {
        for p in ALL {
            let cs = three();
            let mut b = Balancer::new(p);
            for _ in 0..30 {
                let picked = b.pick(&cs, Some(1));
                assert!(matches!(picked, Some(0 | 2)), "{p:?} picked {picked:?}");
            }
            // The only available one excluded: nothing left.
            let mut only = three();
            only[0].available = false;
            only[2].available = false;
            assert_eq!(b.pick(&only, Some(1)), None, "{p:?}");
            assert_eq!(b.pick(&only, None), Some(1), "{p:?}");
        }
    }

    #[test]
    fn every_policy_returns_none_when_none_is_available() {
        for p in ALL {
            let mut b = Balancer::new(p);
            assert_eq!(b.pick(&[], None), None, "{p:?}");
            let mut cs = three();
            for c in &mut cs {
                c.available = false;
            }
            assert_eq!(b.pick(&cs, None), None, "{p:?}");
            // And it recovers once one is back.
            cs[2].available = true;
            assert_eq!(b.pick(&cs, None), Some(2), "{p:?}");
        }
    }

    #[test]
    fn least_outstanding_picks_the_minimum() {
        let mut b = Balancer::new(Policy::LeastOutstanding);
        let mut cs = three();
        cs[0].outstanding = 4;
        cs[1].outstanding = 1;
        cs[2].outstanding = 7;
        for _ in 0..10 {
            assert_eq!(b.pick(&cs, None), Some(1));
        }
        // An unavailable instance with fewer in flight is still skipped.
        cs[2].outstanding = 0;
        cs[2].available = false;
        assert_eq!(b.pick(&cs, None), Some(1));
        // And so is an excluded one: the next fewest wins.
        assert_eq!(b.pick(&cs, Some(1)), Some(0));
    }

    #[test]
    fn least_outstanding_spreads_ties() {
        let mut b = Balancer::new(Policy::LeastOutstanding);
        assert_eq!(counts(&mut b, &three(), 300), vec![100, 100, 100]);
        // Ties among the fewest only: 0 and 2 share the turns, 1 is busier.
        let mut cs = three();
        cs[1].outstanding = 3;
        assert_eq!(counts(&mut b, &cs, 100), vec![50, 0, 50]);
    }

    #[test]
    fn least_outstanding_follows_live_counts() {
        // The caller bumps `outstanding` per request in flight; the picks level it out.
        let mut b = Balancer::new(Policy::LeastOutstanding);
        let mut cs = three();
        cs[0].outstanding = 2;
        for _ in 0..4 {
            let Some(i) = b.pick(&cs, None) else {
                panic!("no pick")
            };
            cs[i].outstanding += 1;
        }
        assert_eq!(
            cs.iter().map(|c| c.outstanding).collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
    }

    fn five_one_one() -> Vec<Candidate> {
        vec![cand(0, 5), cand(1, 1), cand(2, 1)]
    }

    #[test]
    fn weighted_5_1_1_is_exact_over_700_picks() {
        let mut b = Balancer::new(Policy::Weighted);
        assert_eq!(counts(&mut b, &five_one_one(), 700), vec![500, 100, 100]);
    }

    #[test]
    fn weighted_5_1_1_is_smooth() {
        const A: Option<usize> = Some(0);
        const B: Option<usize> = Some(1);
        const C: Option<usize> = Some(2);
        let classic = [A, A, B, A, C, A, A];
        let mut b = Balancer::new(Policy::Weighted);
        let seq = sequence(&mut b, &five_one_one(), 700);
        // nginx's classic sequence, every cycle of 7.
        for cycle in seq.chunks(7) {
            assert_eq!(cycle, classic);
        }
        // So the heavy instance never runs more than 4 in a row (across a cycle boundary),
        // where a plain weighted round robin would send it 5.
        let longest = seq
            .split(|&p| p != A)
            .map(<[Option<usize>]>::len)
            .max()
            .unwrap_or(0);
        assert_eq!(longest, 4);
    }

    #[test]
    fn weighted_does_not_depend_on_slice_order() {
        let mut b = Balancer::new(Policy::Weighted);
        let mut cs = five_one_one();
        cs.reverse();
        let seq = sequence(&mut b, &cs, 7);
        assert_eq!(
            seq,
            vec![
                Some(0),
                Some(0),
                Some(1),
                Some(0),
                Some(2),
                Some(0),
                Some(0)
            ]
        );
    }

    #[test]
    fn weighted_all_zero_weights_behave_like_equal() {
        let zeros = vec![cand(0, 0), cand(1, 0), cand(2, 0)];
        let mut b = Balancer::new(Policy::Weighted);
        assert_eq!(counts(&mut b, &zeros, 300), vec![100, 100, 100]);
        let mut b = Balancer::new(Policy::Weighted);
        assert_eq!(
            sequence(&mut b, &zeros, 6),
            vec![Some(0), Some(1), Some(2), Some(0), Some(1), Some(2)]
        );
        // A zero weight next to real weights counts as 1.
        let mut b = Balancer::new(Policy::Weighted);
        let mixed = vec![cand(0, 0), cand(1, 2)];
        assert_eq!(counts(&mut b, &mixed, 300), vec![100, 200]);
    }

    #[test]
    fn weighted_state_survives_an_instance_leaving_and_returning() {
        let mut b = Balancer::new(Policy::Weighted);
        let mut cs = three();
        assert_eq!(b.pick(&cs, None), Some(0)); // 0:-2 1:1 2:1
        assert_eq!(b.pick(&cs, None), Some(1)); // 0:-1 1:-1 2:2
        cs[2].available = false;
        assert_eq!(b.pick(&cs, None), Some(0)); // 0:-2 1:0, 2 kept at 2
        cs[2].available = true;
        // 2 resumes from its kept value (2 + 1 = 3 beats 1's 1). Had it restarted at 0 it
        // would tie with 1 at 1 and lose to the lower index.
        assert_eq!(b.pick(&cs, None), Some(2));

        // Gone from the list entirely and back is the same as unavailable.
        let mut b = Balancer::new(Policy::Weighted);
        let cs = three();
        assert_eq!(b.pick(&cs, None), Some(0));
        assert_eq!(b.pick(&cs, None), Some(1));
        assert_eq!(b.pick(&cs[..2], None), Some(0));
        assert_eq!(b.pick(&cs, None), Some(2));
    }

    #[test]
    fn weighted_newcomer_gets_its_share() {
        let mut b = Balancer::new(Policy::Weighted);
        let mut cs = vec![cand(0, 1), cand(1, 1)];
        counts(&mut b, &cs, 11);
        cs.push(cand(7, 2));
        // From here a full cycle of weight 4 is 1:1:2, repeated.
        let n = counts(&mut b, &cs, 400);
        assert_eq!((n[0], n[1], n[7]), (100, 100, 200));
    }

    #[test]
    fn weighted_state_stays_bounded_and_forget_resets() {
        let mut b = Balancer::new(Policy::Weighted);
        for i in 0..1_000 {
            let cs = [cand(i, 3), cand(i + 1, 1)];
            assert!(b.pick(&cs, None).is_some());
            assert!(b.current.len() <= 2 * cs.len() + PRUNE_SLACK);
        }
        let mut b = Balancer::new(Policy::Weighted);
        let cs = three();
        assert_eq!(b.pick(&cs, None), Some(0));
        assert_eq!(b.pick(&cs, None), Some(1)); // 0:-1 1:-1 2:2
        b.forget(2);
        assert!(b.current.iter().all(|&(i, _)| i != 2));
        // 2 restarts at 0: 0:0 1:0 2:1 -> 2 wins and gives back 3, ending at -2 (it would end
        // at 0 had it kept its 2).
        assert_eq!(b.pick(&cs, None), Some(2));
        assert_eq!(b.current, vec![(0, 0), (1, 0), (2, -2)]);
    }

    #[test]
    fn extreme_weights_and_duplicates_do_not_panic() {
        let mut b = Balancer::new(Policy::Weighted);
        let cs = vec![
            cand(0, u32::MAX),
            cand(1, u32::MAX),
            cand(1, u32::MAX),
            cand(usize::MAX, 1),
        ];
        for _ in 0..1_000 {
            assert!(b.pick(&cs, None).is_some());
        }
        for p in [Policy::RoundRobin, Policy::LeastOutstanding] {
            let mut b = Balancer::new(p);
            let cs = vec![cand(usize::MAX, 1), cand(usize::MAX, 1), cand(0, 1)];
            let picks = sequence(&mut b, &cs, 4);
            assert_eq!(
                picks,
                vec![Some(0), Some(usize::MAX), Some(0), Some(usize::MAX)]
            );
        }
    }
}
