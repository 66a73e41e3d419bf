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
    fn name(&self) -> &'static str;
}

/// The policies sage has, by the names the CLI takes.
pub const POLICIES: &[&str] = &["lru", "lfru"];

/// A policy by name for an arena of `n_slots`.
pub fn policy(name: &str, n_slots: usize) -> Option<Box<dyn Policy>> {
    match name {
        "lru" => Some(Box::new(Lru::new(n_slots))),
        "lfru" => Some(Box::new(Lfru::new(n_slots, Lfru::DEFAULT_HALF_LIFE))),
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

    fn name(&self) -> &'static str {
        "lru"
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
    /// Prior scores of experts (a warm start from usage counts), given when loaded.
    prior: std::collections::HashMap<ExpertKey, f64>,
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
            prior: Default::default(),
        }
    }

    /// Start each expert's score from `prior` (e.g. its share of a usage profile) when loaded.
    pub fn with_prior(mut self, prior: std::collections::HashMap<ExpertKey, f64>) -> Lfru {
        self.prior = prior;
        self
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

    fn loaded(&mut self, slot: usize, key: ExpertKey) {
        self.clock += 1;
        self.score[slot] = 1.0 + self.prior.get(&key).copied().unwrap_or(0.0);
        self.last[slot] = self.clock;
    }

    fn victim(&mut self, candidates: &[usize]) -> usize {
        *candidates
            .iter()
            .min_by(|&&a, &&b| self.decayed(a).total_cmp(&self.decayed(b)).then(self.last[a].cmp(&self.last[b])))
            .expect("candidates are not empty")
    }

    fn name(&self) -> &'static str {
        "lfru"
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
    policy: Box<dyn Policy>,
    pub stats: SchedStats,
}

impl Scheduler {
    pub fn new(n_slots: usize, policy: Box<dyn Policy>) -> Scheduler {
        Scheduler {
            slots: vec![None; n_slots],
            where_: HashMap::new(),
            ever_loaded: Default::default(),
            policy,
            stats: SchedStats::default(),
        }
    }

    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    pub fn is_resident(&self, layer: u32, expert: u32) -> bool {
        self.where_.contains_key(&(layer, expert))
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
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
                self.stats.hits += 1;
                self.policy.touch(s);
                pinned[s] = true;
                out[i] = s;
            }
        }
        for (i, &e) in experts.iter().enumerate() {
            if out[i] != usize::MAX {
                continue;
            }
            let free = self.slots.iter().position(|s| s.is_none());
            let slot = match free {
                Some(s) => s,
                None => {
                    let candidates: Vec<usize> = (0..self.slots.len()).filter(|&s| !pinned[s]).collect();
                    self.policy.victim(&candidates)
                }
            };
            if let Some(old) = self.slots[slot].take() {
                self.where_.remove(&old);
            }
            let t = std::time::Instant::now();
            let bytes = load(slot, e)?;
            self.stats.stall += t.elapsed();
            self.stats.bytes_read += bytes;
            self.stats.misses += 1;
            if self.ever_loaded.insert((layer, e)) {
                self.stats.distinct_loaded += 1;
            }
            self.slots[slot] = Some((layer, e));
            self.where_.insert((layer, e), slot);
            self.policy.loaded(slot, (layer, e));
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
        assert!(policy("lfru", 4).is_some() && policy("lru", 4).is_some() && policy("fifo", 4).is_none());
    }
}
