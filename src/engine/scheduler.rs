//! Expert residency: which (layer, expert) lives in which arena slot. A `Policy` picks the
//! slot to evict; the scheduler counts hits, misses, bytes and stall time. It never touches
//! the graph: the engine asks it for slots and gets slot ids back.

use std::collections::HashMap;
use std::time::Duration;

/// An expert of a layer.
pub type ExpertKey = (u32, u32);

/// Chooses which slot to evict.
pub trait Policy: Send {
    /// The slot was used again (a hit).
    fn touch(&mut self, slot: usize);
    /// `key` was just loaded into `slot` (a miss).
    fn loaded(&mut self, slot: usize, _key: ExpertKey) {
        self.touch(slot);
    }
    /// Pick a victim among `candidates` (never empty).
    fn victim(&mut self, candidates: &[usize]) -> usize;
    /// The resident expert in `slot` was ranked just below a token's chosen ones by its
    /// router (not used; it may be soon). Most policies ignore it.
    fn hint(&mut self, _slot: usize) {}
    /// Whether this policy wants hints (the engine then ranks each token's n_expert_used
    /// runners-up).
    fn wants_hints(&self) -> bool {
        false
    }
}

/// The policies sage has, by the names the CLI takes; the first is the default.
pub const POLICIES: &[&str] = &["lfru-ghost", "lru", "lfru", "lru-ranked"];

/// A policy by name for an arena of `n_slots`, in a model whose token makes `token_uses`
/// expert uses (n_layer × n_expert_used).
pub fn policy(name: &str, n_slots: usize, token_uses: usize) -> Option<Box<dyn Policy>> {
    match name {
        "lru" => Some(Box::new(Lru::new(n_slots))),
        "lfru" => Some(Box::new(Lfru::new(n_slots, Lfru::DEFAULT_HALF_LIFE))),
        "lru-ranked" => Some(Box::new(LruRanked(Lru::new(n_slots)))),
        "lfru-ghost" => Some(Box::new(LfruGhost::new(n_slots, LfruGhost::DEFAULT_HALF_LIFE, token_uses as u64))),
        _ => None,
    }
}

/// Least recently used.
pub struct Lru {
    last_use: Vec<u64>,
    clock: u64,
}

impl Lru {
    pub fn new(n_slots: usize) -> Lru {
        Lru { last_use: vec![0; n_slots], clock: 0 }
    }
}

impl Policy for Lru {
    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.last_use[slot] = self.clock;
    }

    fn victim(&mut self, candidates: &[usize]) -> usize {
        *candidates.iter().min_by_key(|&&s| self.last_use[s]).expect("candidates are not empty")
    }
}

/// LRU that also counts a router's runner-up as a use: an expert ranked just below a token's
/// chosen ones is likely to be chosen by the next tokens.
pub struct LruRanked(pub Lru);

impl Policy for LruRanked {
    fn touch(&mut self, slot: usize) {
        self.0.touch(slot);
    }

    fn victim(&mut self, candidates: &[usize]) -> usize {
        self.0.victim(candidates)
    }

    fn hint(&mut self, slot: usize) {
        self.0.touch(slot);
    }

    fn wants_hints(&self) -> bool {
        true
    }
}

/// LFRU with a memory and a guard, sage's default. Each expert has a recency-weighted use
/// count (+1 per use, halving every `half_life × n_slots` uses of the arena), kept when it is
/// evicted (as ARC keeps ghost entries), so an expert that many tokens choose comes back with
/// its count instead of starting from 1 as in `Lfru`. The victim is the lowest count among the
/// experts not used within the last `protect` uses (one token's experts in every layer:
/// n_layer × n_expert_used); when every candidate is that recent, the least recently used.
/// On the bundled models' held-out routing it is never worse than LRU at arenas of 10–50%
/// (within 0.05 points at 75%), and on the 128-expert model it closes 39% of LRU's gap to
/// Belady's optimum at 25% (docs/quality.md).
pub struct LfruGhost {
    key: Vec<Option<ExpertKey>>,
    score: Vec<f64>,
    /// When `score` was last brought up to date.
    at: Vec<u64>,
    last_use: Vec<u64>,
    ghost: HashMap<ExpertKey, (f64, u64)>,
    clock: u64,
    lambda: f64,
    protect: u64,
}

impl LfruGhost {
    /// In arena turnovers; the best of 4, 8, 16 on the 128-expert model's routing at 25%
    /// (docs/quality.md).
    pub const DEFAULT_HALF_LIFE: f64 = 8.0;

    pub fn new(n_slots: usize, half_life: f64, protect: u64) -> LfruGhost {
        LfruGhost {
            key: vec![None; n_slots],
            score: vec![0.0; n_slots],
            at: vec![0; n_slots],
            last_use: vec![0; n_slots],
            ghost: HashMap::new(),
            clock: 0,
            lambda: 1.0 / (half_life * n_slots.max(1) as f64),
            protect,
        }
    }

    fn decay(&self, score: f64, since: u64) -> f64 {
        score * (-(self.lambda * (self.clock - since) as f64)).exp2()
    }

    fn decayed(&self, slot: usize) -> f64 {
        self.decay(self.score[slot], self.at[slot])
    }
}

impl Policy for LfruGhost {
    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.score[slot] = self.decayed(slot) + 1.0;
        self.at[slot] = self.clock;
        self.last_use[slot] = self.clock;
    }

    fn loaded(&mut self, slot: usize, key: ExpertKey) {
        self.clock += 1;
        let prior = self.ghost.remove(&key).map_or(0.0, |(s, at)| self.decay(s, at));
        self.key[slot] = Some(key);
        self.score[slot] = prior + 1.0;
        self.at[slot] = self.clock;
        self.last_use[slot] = self.clock;
    }

    fn victim(&mut self, candidates: &[usize]) -> usize {
        let old = |s: &&usize| self.clock - self.last_use[**s] >= self.protect;
        let v = if candidates.iter().any(|s| old(&s)) {
            *candidates
                .iter()
                .filter(old)
                .min_by(|&&a, &&b| {
                    self.decayed(a).total_cmp(&self.decayed(b)).then(self.last_use[a].cmp(&self.last_use[b]))
                })
                .expect("one is old")
        } else {
            *candidates.iter().min_by_key(|&&s| self.last_use[s]).expect("candidates are not empty")
        };
        if let Some(k) = self.key[v].take() {
            self.ghost.insert(k, (self.decayed(v), self.clock));
        }
        v
    }
}

/// Frequency and recency together (LRFU, Lee et al. 2001): each resident expert has a
/// combined recency-frequency score, +1 per use, halving every `half_life × n_slots` uses of
/// the arena; the victim is the lowest score. Experts that many tokens keep choosing stay
/// resident through bursts of one-off choices, which LRU evicts them for. A half-life of 0
/// would be LRU, an infinite one LFU.
pub struct Lfru {
    score: Vec<f64>,
    last: Vec<u64>,
    clock: u64,
    /// Decay per use of the arena: score × 2^(-lambda × age).
    lambda: f64,
}

impl Lfru {
    /// In arena turnovers (n_slots uses); the best of 0.25 … 16 on the bundled model's routing
    /// at arenas of 50% and 75% of the experts (docs/bench.md).
    pub const DEFAULT_HALF_LIFE: f64 = 4.0;

    pub fn new(n_slots: usize, half_life: f64) -> Lfru {
        Lfru {
            score: vec![0.0; n_slots],
            last: vec![0; n_slots],
            clock: 0,
            lambda: 1.0 / (half_life * n_slots.max(1) as f64),
        }
    }

    fn decayed(&self, slot: usize) -> f64 {
        self.score[slot] * (-(self.lambda * (self.clock - self.last[slot]) as f64)).exp2()
    }
}

impl Policy for Lfru {
    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.score[slot] = self.decayed(slot) + 1.0;
        self.last[slot] = self.clock;
    }

    fn loaded(&mut self, slot: usize, _key: ExpertKey) {
        self.clock += 1;
        self.score[slot] = 1.0;
        self.last[slot] = self.clock;
    }

    fn victim(&mut self, candidates: &[usize]) -> usize {
        *candidates
            .iter()
            .min_by(|&&a, &&b| self.decayed(a).total_cmp(&self.decayed(b)).then(self.last[a].cmp(&self.last[b])))
            .expect("candidates are not empty")
    }
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SchedStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
    pub stall: Duration,
    /// Distinct (layer, expert) pairs loaded at least once.
    pub distinct_loaded: u64,
    /// With cold copies (`EngineOptions::cold`): misses that loaded an expert's cold record,
    /// and hits on a cold-resident expert that loaded its full record into its slot (an
    /// upgrade; its bytes are in `bytes_read`, its time in `stall`). The engine counts these.
    pub cold_loads: u64,
    pub upgrades: u64,
}

impl SchedStats {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

pub struct Scheduler {
    slots: Vec<Option<ExpertKey>>,
    where_: HashMap<ExpertKey, usize>,
    ever_loaded: std::collections::HashSet<ExpertKey>,
    /// Keys given a slot by `reserve` and not used yet, with the bytes filled in for them.
    reserved: HashMap<ExpertKey, u64>,
    policy: Box<dyn Policy>,
    pub stats: SchedStats,
    pub reservations: Reservations,
}

/// What became of `Scheduler::reserve`'s slots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reservations {
    pub made: u64,
    /// Used by `ensure` (each counted there as a miss).
    pub used: u64,
    /// Evicted or forgotten before any use.
    pub unused: u64,
}

impl Scheduler {
    pub fn new(n_slots: usize, policy: Box<dyn Policy>) -> Scheduler {
        Scheduler {
            slots: vec![None; n_slots],
            where_: HashMap::new(),
            ever_loaded: Default::default(),
            reserved: HashMap::new(),
            policy,
            stats: SchedStats::default(),
            reservations: Reservations::default(),
        }
    }

    /// Empty `slot`, if it holds anything.
    fn evict(&mut self, slot: usize) {
        if let Some(old) = self.slots[slot].take() {
            self.where_.remove(&old);
            if self.reserved.remove(&old).is_some() {
                self.reservations.unused += 1;
            }
        }
    }

    /// An empty slot for a new key: a free one, else the policy's victim among the slots
    /// `usable` allows, evicted. None when no slot is free or usable.
    fn claim(&mut self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let slot = match self.slots.iter().position(|s| s.is_none()) {
            Some(s) => s,
            None => {
                let candidates: Vec<usize> = (0..self.slots.len()).filter(|&s| usable(s)).collect();
                if candidates.is_empty() {
                    return None;
                }
                self.policy.victim(&candidates)
            }
        };
        self.evict(slot);
        Some(slot)
    }

    /// `key` now lives in `slot` (just claimed), its bytes loaded or on their way.
    fn place(&mut self, slot: usize, key: ExpertKey) {
        self.slots[slot] = Some(key);
        self.where_.insert(key, slot);
        self.policy.loaded(slot, key);
    }

    /// Count a load of `key` that read `bytes`.
    fn count_miss(&mut self, key: ExpertKey, bytes: u64) {
        self.stats.misses += 1;
        self.stats.bytes_read += bytes;
        if self.ever_loaded.insert(key) {
            self.stats.distinct_loaded += 1;
        }
    }

    /// Give `key` (not resident) a slot now for bytes that arrive outside `ensure` (a read
    /// started ahead of its layer; the caller fills the slot), evicting by policy among the
    /// slots not in `keep`. The key is resident from then on; its first use by `ensure` counts
    /// as a miss that loaded `bytes`. None when every slot is kept.
    pub fn reserve(&mut self, key: ExpertKey, bytes: u64, keep: &[usize]) -> Option<usize> {
        assert!(!self.where_.contains_key(&key), "reserving a resident expert");
        let slot = self.claim(|s| !keep.contains(&s))?;
        self.place(slot, key);
        self.reserved.insert(key, bytes);
        self.reservations.made += 1;
        Some(slot)
    }

    /// Drop `key` from the arena (its slot's bytes are not its own: a read into it failed).
    pub fn forget(&mut self, key: ExpertKey) {
        if let Some(&s) = self.where_.get(&key) {
            self.evict(s);
        }
    }

    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    /// The slot holding `expert` of `layer`, if it is resident.
    pub fn slot_of(&self, layer: u32, expert: u32) -> Option<usize> {
        self.where_.get(&(layer, expert)).copied()
    }

    pub fn is_resident(&self, layer: u32, expert: u32) -> bool {
        self.where_.contains_key(&(layer, expert))
    }

    /// Whether `key` holds a slot given by `reserve` and not used yet (its first use by
    /// `ensure` is a miss, not a hit).
    pub fn is_reserved(&self, key: ExpertKey) -> bool {
        self.reserved.contains_key(&key)
    }

    /// Tell the policy which of `layer`'s `experts` its router ranked just below the chosen
    /// ones (those resident; the others are ignored). Counts nothing.
    pub fn hint(&mut self, layer: u32, experts: &[u32]) {
        for &e in experts {
            if let Some(&s) = self.where_.get(&(layer, e)) {
                self.policy.hint(s);
            }
        }
    }

    /// Whether the policy wants `hint`s.
    pub fn wants_hints(&self) -> bool {
        self.policy.wants_hints()
    }

    /// Count a use of each of `layer`'s `experts` (distinct), all resident: hits, as
    /// `ensure` counts them.
    pub fn record_hits(&mut self, layer: u32, experts: &[u32]) {
        for &e in experts {
            let s = *self.where_.get(&(layer, e)).expect("record_hits is for resident experts");
            self.stats.hits += 1;
            self.policy.touch(s);
        }
    }

    /// Make all of `layer`'s `experts` resident (at most `n_slots` of them, distinct), loading
    /// the missing ones with `load(slot, expert)`; returns their slots in the same order.
    pub fn ensure<E>(
        &mut self,
        layer: u32,
        experts: &[u32],
        mut load: impl FnMut(usize, u32) -> Result<u64, E>,
    ) -> Result<Vec<usize>, E> {
        assert!(experts.len() <= self.slots.len(), "more experts than slots; the caller splits the work");
        let mut pinned = vec![false; self.slots.len()];
        let mut out = vec![usize::MAX; experts.len()];
        for (i, &e) in experts.iter().enumerate() {
            if let Some(&s) = self.where_.get(&(layer, e)) {
                if let Some(bytes) = self.reserved.remove(&(layer, e)) {
                    // Loaded ahead through `reserve`: a miss whose load is already done.
                    self.count_miss((layer, e), bytes);
                    self.reservations.used += 1;
                } else {
                    self.stats.hits += 1;
                }
                self.policy.touch(s);
                pinned[s] = true;
                out[i] = s;
            }
        }
        for (i, &e) in experts.iter().enumerate() {
            if out[i] != usize::MAX {
                continue;
            }
            let slot = self.claim(|s| !pinned[s]).expect("no more experts than slots: one is unpinned");
            let t = std::time::Instant::now();
            let bytes = load(slot, e)?;
            self.stats.stall += t.elapsed();
            self.count_miss((layer, e), bytes);
            self.place(slot, (layer, e));
            pinned[slot] = true;
            out[i] = slot;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used_unpinned_slot() {
        let mut s = Scheduler::new(2, Box::new(Lru::new(2)));
        let mut loads = Vec::new();
        let mut load = |slot: usize, e: u32| -> Result<u64, ()> {
            loads.push((slot, e));
            Ok(10)
        };
        assert_eq!(s.ensure(0, &[1, 2], &mut load).unwrap(), vec![0, 1]);
        assert_eq!(s.ensure(0, &[2], &mut load).unwrap(), vec![1]); // hit; 1 is now older
        assert_eq!(s.ensure(0, &[3], &mut load).unwrap(), vec![0]); // evicts expert 1
        assert_eq!(s.ensure(1, &[1, 3], &mut load).unwrap().len(), 2);
        assert_eq!(loads, vec![(0, 1), (1, 2), (0, 3), (1, 1), (0, 3)]);
        assert_eq!((s.stats.hits, s.stats.misses, s.stats.bytes_read), (1, 5, 50));
    }

    #[test]
    fn a_reserved_slot_is_a_miss_when_used_and_unused_when_evicted_first() {
        let mut s = Scheduler::new(3, Box::new(Lru::new(3)));
        let mut load = |_: usize, _: u32| -> Result<u64, ()> { Ok(10) };
        let busy = s.ensure(0, &[1, 2], &mut load).unwrap();
        // Layer 1's experts 5 and 6 ahead of it: one free slot, then only layer 0's slots,
        // both kept.
        assert_eq!(s.reserve((1, 5), 7, &busy), Some(2));
        assert_eq!(s.reserve((1, 6), 7, &[busy[0], busy[1], 2]), None);
        assert!(s.is_resident(1, 5) && s.slot_of(1, 5) == Some(2));
        // Used: counted as a miss that loaded its 7 bytes, without calling `load`.
        let before = s.stats.clone();
        let slots = s.ensure(1, &[5], |_, _| -> Result<u64, ()> { panic!("reserved, not loaded") }).unwrap();
        assert_eq!(slots, vec![2]);
        assert_eq!(
            (s.stats.hits, s.stats.misses, s.stats.bytes_read),
            (before.hits, before.misses + 1, before.bytes_read + 7)
        );
        // A second use is a hit.
        s.ensure(1, &[5], &mut load).unwrap();
        assert_eq!(s.stats.hits, before.hits + 1);
        // Reserved, then evicted before any use; and reserved, then forgotten.
        assert_eq!(s.reserve((1, 7), 7, &[2]), Some(0));
        s.ensure(0, &[3, 4, 9], &mut load).unwrap();
        assert!(!s.is_resident(1, 7));
        let slot = s.reserve((1, 8), 7, &[]).unwrap();
        s.forget((1, 8));
        assert!(!s.is_resident(1, 8) && s.slot_of(1, 8).is_none());
        assert_eq!(s.reservations, Reservations { made: 3, used: 1, unused: 2 });
        // The forgotten key's slot is free again.
        assert_eq!(s.ensure(0, &[10], &mut load).unwrap(), vec![slot]);
    }

    #[test]
    fn lfru_ghost_remembers_evicted_counts_and_guards_the_current_token() {
        // No decay, no guard: the victim is the lowest count, and an evicted expert's count
        // comes back with it.
        let mut p = LfruGhost::new(2, 1e12, 0);
        p.loaded(0, (0, 0));
        p.touch(0);
        p.touch(0); // expert 0: 3
        p.loaded(1, (0, 1)); // expert 1: 1
        assert_eq!(p.victim(&[0, 1]), 1);
        p.loaded(1, (0, 2)); // expert 2: 1
        assert_eq!(p.victim(&[0]), 0, "the only candidate");
        p.loaded(0, (0, 1)); // expert 1 again: its 1 + 1 = 2
        assert_eq!(p.victim(&[0, 1]), 1, "expert 2 (1) goes before expert 1 (2)");
        p.loaded(1, (0, 0)); // expert 0 again: its 3 + 1 = 4 (LFRU would restart it at 1)
        assert_eq!(p.victim(&[0, 1]), 0, "expert 1 (2) goes before expert 0 (4)");
        // The guard: with protect = 2 uses, a slot used within the last 2 uses is the victim
        // only when every candidate is that recent (then the least recently used).
        let mut p = LfruGhost::new(3, 1e12, 2);
        p.loaded(0, (0, 1)); // use 1, count 1
        p.loaded(1, (0, 2));
        for _ in 0..5 {
            p.touch(1); // uses 3..7, count 6
        }
        p.loaded(2, (0, 3)); // use 8, count 1
        assert_eq!(p.victim(&[1, 2, 0]), 0, "slot 0 is the only old one");
        assert_eq!(p.victim(&[1, 2]), 1, "both recent: the least recently used");
        assert!(policy("lfru-ghost", 4, 2).is_some());
        assert_eq!(POLICIES[0], "lfru-ghost", "the default");
    }

    #[test]
    fn lfru_keeps_the_frequently_used_through_a_burst() {
        // Expert 0 is used often; then 1, 2, 3 once each. With 2 slots LRU evicts 0 for the
        // burst; LFRU keeps it.
        let trace = [0, 1, 0, 1, 0, 2, 0, 3, 0, 4, 0];
        let run = |p: Box<dyn Policy>| {
            let mut s = Scheduler::new(2, p);
            for &e in &trace {
                s.ensure(0, &[e], |_, _| Ok::<u64, ()>(0)).unwrap();
            }
            s.stats.hits
        };
        assert_eq!(run(Box::new(Lru::new(2))), run(Box::new(Lfru::new(2, 1.0))));
        let burst = [0, 0, 0, 0, 1, 2, 3, 0];
        let run = |p: Box<dyn Policy>| {
            let mut s = Scheduler::new(2, p);
            for &e in &burst {
                s.ensure(0, &[e], |_, _| Ok::<u64, ()>(0)).unwrap();
            }
            s.stats.hits
        };
        // LRU: hits on the 3 repeats of 0 only; LFRU also keeps 0 for the final use.
        assert_eq!(run(Box::new(Lru::new(2))), 3);
        assert_eq!(run(Box::new(Lfru::new(2, 4.0))), 4);
        assert!(policy("lfru", 4, 2).is_some() && policy("lru", 4, 2).is_some() && policy("fifo", 4, 2).is_none());
    }
}
