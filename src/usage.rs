//! Expert usage: which experts real routing chooses, per layer. `sage profile` records a
//! [`RouteTrace`] while evaluating text and writes a [`Usage`] as `usage.json`; `sage-convert
//! --pool usage.json --keep N` keeps each layer's N most used experts, and `sage run --warm`
//! fills the arena with the most used ones before the first token.
//!
//! The trace also gives routing statistics: per-layer usage entropy, how many of a token's
//! experts the next token reuses, and the hit rate of an LRU arena replaying the trace in
//! decode order (one token at a time, layer by layer), at several arena sizes, under each
//! policy and under Belady's optimal policy (the bound for any policy).

use std::path::Path;

use serde::{Deserialize, Serialize};

use std::collections::{BTreeSet, HashMap};

use crate::engine::scheduler::{self, Scheduler};
use crate::error::{Error, IoContext, Result};

pub const USAGE_FORMAT: &str = "sage-usage";
pub const USAGE_VERSION: u32 = 1;

/// The experts routing chose, per layer, token after token.
#[derive(Clone, Debug, Default)]
pub struct RouteTrace {
    pub n_layer: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// `choices[il]` holds `n_expert_used` ids per token, tokens in order of evaluation.
    pub choices: Vec<Vec<u32>>,
    /// When recorded (`Engine::start_trace(true)`): `router_logits[il]` holds the router's
    /// `n_expert` logits per token, tokens in the order of `choices`.
    pub router_logits: Option<Vec<Vec<f32>>>,
}

impl RouteTrace {
    pub fn new(n_layer: usize, n_expert: usize, n_expert_used: usize) -> RouteTrace {
        RouteTrace { n_layer, n_expert, n_expert_used, choices: vec![Vec::new(); n_layer], router_logits: None }
    }

    pub fn n_tokens(&self) -> usize {
        self.choices.first().map_or(0, |c| c.len() / self.n_expert_used.max(1))
    }

    fn token(&self, il: usize, t: usize) -> &[u32] {
        let k = self.n_expert_used;
        &self.choices[il][t * k..(t + 1) * k]
    }

    /// Counts and co-activations per layer, with the routing statistics.
    pub fn usage(&self, source: &str) -> Usage {
        let n = self.n_expert;
        let layers = (0..self.n_layer)
            .map(|il| {
                let mut counts = vec![0u64; n];
                let mut co = vec![vec![0u64; n]; n];
                for t in 0..self.n_tokens() {
                    let ch = self.token(il, t);
                    for &a in ch {
                        counts[a as usize] += 1;
                        for &b in ch {
                            if a != b {
                                co[a as usize][b as usize] += 1;
                            }
                        }
                    }
                }
                LayerUsage { il: il as u32, counts, coactivation: co }
            })
            .collect();
        Usage {
            format: USAGE_FORMAT.into(),
            version: USAGE_VERSION,
            source: source.into(),
            n_layer: self.n_layer as u32,
            n_expert: self.n_expert as u32,
            n_expert_used: self.n_expert_used as u32,
            tokens: self.n_tokens() as u64,
            layers,
            stats: Some(self.stats()),
        }
    }

    /// Share of a token's experts that the next token also uses, per layer.
    pub fn next_token_reuse(&self) -> Vec<f64> {
        (0..self.n_layer)
            .map(|il| {
                let (mut same, mut all) = (0u64, 0u64);
                for t in 1..self.n_tokens() {
                    let prev = self.token(il, t - 1);
                    same += self.token(il, t).iter().filter(|e| prev.contains(e)).count() as u64;
                    all += self.n_expert_used as u64;
                }
                if all == 0 {
                    0.0
                } else {
                    same as f64 / all as f64
                }
            })
            .collect()
    }

    /// Hit rate of an arena of `n_slots` under `policy` (a name from
    /// `scheduler::POLICIES`) replaying the trace in decode order.
    pub fn hit_rate(&self, policy: &str, n_slots: usize) -> f64 {
        self.replay(n_slots, scheduler::policy(policy, n_slots).expect("a known policy"))
    }

    /// Hit rate of an arena of `n_slots` under `policy` replaying the trace in decode order.
    pub fn replay(&self, n_slots: usize, policy: Box<dyn scheduler::Policy>) -> f64 {
        let mut s = Scheduler::new(n_slots, policy);
        for t in 0..self.n_tokens() {
            for il in 0..self.n_layer {
                s.ensure(il as u32, self.token(il, t), |_, _| Ok::<u64, ()>(0)).expect("loads cannot fail");
            }
        }
        s.stats.hit_rate()
    }

    /// The best any policy could do (Belady's optimal: evict what is used again farthest in
    /// the future), for the same replay.
    pub fn optimal_hit_rate(&self, n_slots: usize) -> f64 {
        let k = self.n_expert_used;
        let mut seq: Vec<(u32, u32)> = Vec::with_capacity(self.n_tokens() * self.n_layer * k);
        for t in 0..self.n_tokens() {
            for il in 0..self.n_layer {
                seq.extend(self.token(il, t).iter().map(|&e| (il as u32, e)));
            }
        }
        let mut next = vec![usize::MAX; seq.len()];
        let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
        for i in (0..seq.len()).rev() {
            if let Some(&j) = seen.get(&seq[i]) {
                next[i] = j;
            }
            seen.insert(seq[i], i);
        }
        // Resident experts ordered by next use; a step (one token's experts in one layer) is
        // never evicted from while it runs.
        let mut by_next: BTreeSet<(usize, (u32, u32))> = BTreeSet::new();
        let mut resident: HashMap<(u32, u32), (usize, usize)> = HashMap::new(); // key -> (next use, step)
        let mut hits = 0u64;
        for (i, &key) in seq.iter().enumerate() {
            let step = i / k;
            if let Some(&(nu, _)) = resident.get(&key) {
                hits += 1;
                by_next.remove(&(nu, key));
            } else if resident.len() == n_slots {
                let victim = *by_next
                    .iter()
                    .rev()
                    .find(|(_, v)| resident[v].1 != step)
                    .expect("a step uses fewer experts than the arena has slots");
                by_next.remove(&victim);
                resident.remove(&victim.1);
            }
            resident.insert(key, (next[i], step));
            by_next.insert((next[i], key));
        }
        if seq.is_empty() {
            0.0
        } else {
            hits as f64 / seq.len() as f64
        }
    }

    /// Hit rate of an LRU arena that is told the routing a little ahead, for the same replay:
    /// on a miss it evicts the least recently used expert that neither the current token's
    /// remaining layers nor the next `tokens_ahead` tokens choose, or plain LRU's victim when
    /// every resident expert is chosen again within that window. With `tokens_ahead` = 0 it
    /// knows what a router lookahead could predict (this token's later layers); with 1, what
    /// a perfect predictor of the next token's routing would add.
    pub fn lookahead_hit_rate(&self, n_slots: usize, tokens_ahead: usize) -> f64 {
        let n_tokens = self.n_tokens();
        let mut resident: HashMap<(u32, u32), u64> = HashMap::new(); // key -> last use
        let (mut clock, mut hits, mut all) = (0u64, 0u64, 0u64);
        for t in 0..n_tokens {
            for il in 0..self.n_layer {
                let step = self.token(il, t);
                let chosen_soon = |&(l, e): &(u32, u32)| {
                    (t..(t + 1 + tokens_ahead).min(n_tokens))
                        .any(|u| (u > t || l as usize > il) && self.token(l as usize, u).contains(&e))
                };
                // As `Scheduler::ensure`: the step's hits first, then its misses; none of the
                // step's experts is evicted while the step loads.
                for &e in step {
                    if let Some(last) = resident.get_mut(&(il as u32, e)) {
                        hits += 1;
                        clock += 1;
                        *last = clock;
                    }
                }
                for &e in step {
                    let key = (il as u32, e);
                    if resident.contains_key(&key) {
                        continue;
                    }
                    if resident.len() >= n_slots {
                        let victim = resident
                            .iter()
                            .filter(|(r, _)| !(r.0 == il as u32 && step.contains(&r.1)))
                            .min_by_key(|&(r, &last)| (chosen_soon(r), last))
                            .map(|(r, _)| *r)
                            .expect("a step uses fewer experts than the arena has slots");
                        resident.remove(&victim);
                    }
                    clock += 1;
                    resident.insert(key, clock);
                }
                all += step.len() as u64;
            }
        }
        if all == 0 {
            0.0
        } else {
            hits as f64 / all as f64
        }
    }

    pub fn stats(&self) -> RoutingStats {
        let total = self.n_layer * self.n_expert;
        let arena = [25u32, 50, 75]
            .iter()
            .map(|&pct| {
                let slots = (total * pct as usize / 100).max(self.n_expert_used);
                SimulatedArena {
                    percent_of_experts: pct,
                    slots: slots as u32,
                    lru_hit_rate: self.hit_rate("lru", slots),
                    lfru_hit_rate: self.hit_rate("lfru", slots),
                    optimal_hit_rate: self.optimal_hit_rate(slots),
                }
            })
            .collect();
        let entropy = (0..self.n_layer)
            .map(|il| {
                let mut counts = vec![0u64; self.n_expert];
                self.choices[il].iter().for_each(|&e| counts[e as usize] += 1);
                entropy_bits(&counts)
            })
            .collect();
        RoutingStats {
            entropy_bits: entropy,
            max_entropy_bits: (self.n_expert as f64).log2(),
            next_token_reuse: self.next_token_reuse(),
            simulated_arena: arena,
        }
    }
}

/// Shannon entropy of a usage distribution, in bits.
pub fn entropy_bits(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n as f64).map(|p| -p * p.log2()).sum()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SimulatedArena {
    pub percent_of_experts: u32,
    pub slots: u32,
    pub lru_hit_rate: f64,
    pub lfru_hit_rate: f64,
    /// Belady's optimal: an upper bound for any policy.
    pub optimal_hit_rate: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoutingStats {
    /// Per layer.
    pub entropy_bits: Vec<f64>,
    /// log2(n_expert): the entropy of perfectly uniform use.
    pub max_entropy_bits: f64,
    /// Per layer: share of a token's experts the next token uses again.
    pub next_token_reuse: Vec<f64>,
    pub simulated_arena: Vec<SimulatedArena>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerUsage {
    pub il: u32,
    /// Times each expert was chosen.
    pub counts: Vec<u64>,
    /// `coactivation[a][b]`: tokens that chose both a and b.
    pub coactivation: Vec<Vec<u64>>,
}

/// `usage.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub format: String,
    pub version: u32,
    /// What text was profiled.
    pub source: String,
    pub n_layer: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub tokens: u64,
    pub layers: Vec<LayerUsage>,
    #[serde(default)]
    pub stats: Option<RoutingStats>,
}

impl Usage {
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("usage serializes");
        let mut f = crate::io::AtomicFile::create(path)?;
        f.write(text.as_bytes())?;
        f.finish()
    }

    /// Read and check a `usage.json`.
    pub fn load(path: &Path) -> Result<Usage> {
        let text = std::fs::read_to_string(path).at(path)?;
        Usage::parse(&text, path)
    }

    /// Parse and check the text of a `usage.json`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Usage> {
        let bad = |reason: String| Error::BadUsage { path: path.to_path_buf(), reason };
        let u: Usage = serde_json::from_str(text).map_err(|e| bad(format!("not a sage usage file: {e}")))?;
        if u.format != USAGE_FORMAT {
            return Err(bad(format!("format is '{}', expected '{USAGE_FORMAT}'", u.format)));
        }
        if u.version != USAGE_VERSION {
            return Err(bad(format!("version {} is not supported; expected {USAGE_VERSION}", u.version)));
        }
        if u.layers.len() != u.n_layer as usize {
            return Err(bad(format!("{} layers listed, expected n_layer = {}", u.layers.len(), u.n_layer)));
        }
        for (i, l) in u.layers.iter().enumerate() {
            if l.il as usize != i {
                return Err(bad(format!("layer {i} is labelled il = {}", l.il)));
            }
            if l.counts.len() != u.n_expert as usize {
                return Err(bad(format!(
                    "layer {i}: {} counts, expected one per expert ({})",
                    l.counts.len(),
                    u.n_expert
                )));
            }
            let sum: u64 = l.counts.iter().fold(0u64, |a, &c| a.saturating_add(c));
            if sum != u.tokens.saturating_mul(u.n_expert_used as u64) {
                return Err(bad(format!(
                    "layer {i}: counts sum to {sum}, expected tokens x n_expert_used = {} x {}",
                    u.tokens, u.n_expert_used
                )));
            }
            if !l.coactivation.is_empty()
                && (l.coactivation.len() != u.n_expert as usize
                    || l.coactivation.iter().any(|r| r.len() != u.n_expert as usize))
            {
                return Err(bad(format!("layer {i}: co-activation is not {0} x {0}", u.n_expert)));
            }
        }
        Ok(u)
    }

    /// Check that this usage was measured on a model of this shape.
    pub fn check_model(&self, path: &Path, n_layer: u32, n_expert: u32) -> Result<()> {
        if self.n_layer != n_layer || self.n_expert != n_expert {
            return Err(Error::BadUsage {
                path: path.to_path_buf(),
                reason: format!(
                    "measured on a model of {} layers x {} experts; this one has {n_layer} x {n_expert}",
                    self.n_layer, self.n_expert
                ),
            });
        }
        Ok(())
    }

    /// Each layer's `keep` most used experts (ties to the lower id), ids ascending.
    pub fn most_used(&self, keep: usize) -> Vec<Vec<u32>> {
        self.layers
            .iter()
            .map(|l| {
                let mut order: Vec<u32> = (0..l.counts.len() as u32).collect();
                order.sort_by(|&a, &b| l.counts[b as usize].cmp(&l.counts[a as usize]).then(a.cmp(&b)));
                order.truncate(keep);
                order.sort_unstable();
                order
            })
            .collect()
    }

    /// All (layer, expert) pairs, most used first (ties: lower layer, then lower id).
    pub fn ranked(&self) -> Vec<(u32, u32)> {
        let mut all: Vec<(u64, u32, u32)> = self
            .layers
            .iter()
            .flat_map(|l| l.counts.iter().enumerate().map(move |(e, &c)| (c, l.il, e as u32)))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        all.into_iter().map(|(_, il, e)| (il, e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> RouteTrace {
        // 2 layers, 4 experts, top-2, 3 tokens.
        let mut t = RouteTrace::new(2, 4, 2);
        t.choices[0] = vec![0, 1, 1, 2, 1, 0];
        t.choices[1] = vec![3, 2, 3, 2, 3, 2];
        t
    }

    #[test]
    fn counts_coactivation_and_reuse() {
        let t = trace();
        let u = t.usage("test");
        assert_eq!(u.layers[0].counts, vec![2, 3, 1, 0]);
        assert_eq!(u.layers[0].coactivation[0][1], 2);
        assert_eq!(u.layers[0].coactivation[1][2], 1);
        assert_eq!(u.layers[1].coactivation[2][3], 3);
        // Layer 0: token 1 reuses expert 1 of token 0, token 2 reuses 1: 2 of 4.
        assert_eq!(t.next_token_reuse(), vec![0.5, 1.0]);
        assert_eq!(u.most_used(2), vec![vec![0, 1], vec![2, 3]]);
        assert!((entropy_bits(&[1, 1, 1, 1]) - 2.0).abs() < 1e-12);
        assert_eq!(entropy_bits(&[5, 0, 0, 0]), 0.0);
    }

    #[test]
    fn lru_replay() {
        let t = trace();
        // 4 slots: layer 1's {2,3} and layer 0's experts fight for room.
        // Token 0: miss 0,1 (l0), 3,2 (l1); token 1: l0 1 hit, 2 miss (evicts LRU slot of l0 e0);
        // l1 3,2 hits; token 2: l0 1 hit, 0 miss; l1 hits.
        assert!((t.hit_rate("lru", 4) - 6.0 / 12.0).abs() < 1e-12);
        // 8 slots: only the first loads and layer 0's expert 2 miss.
        assert!((t.hit_rate("lru", 8) - 7.0 / 12.0).abs() < 1e-12);
        // Optimal with 4 slots: token 1 must evict one of layer 0's expert 0 and layer 1's
        // 3 and 2, all used again; whichever goes costs a miss later: 6 hits, as LRU.
        assert!((t.optimal_hit_rate(4) - 6.0 / 12.0).abs() < 1e-12);
        // 8 slots: only the 5 distinct experts' first uses miss.
        assert!((t.optimal_hit_rate(8) - 7.0 / 12.0).abs() < 1e-12);
        for slots in [2, 3, 4, 5] {
            assert!(t.optimal_hit_rate(slots) >= t.hit_rate("lru", slots));
            assert!(t.optimal_hit_rate(slots) >= t.hit_rate("lfru", slots));
        }
    }

    #[test]
    fn lookahead_replay() {
        // One layer, top-1, experts 0 1 2 cycling, 2 slots: LRU always evicts the expert
        // needed next and never hits.
        let mut t = RouteTrace::new(1, 3, 1);
        t.choices[0] = vec![0, 1, 2, 0, 1, 2];
        assert_eq!(t.hit_rate("lru", 2), 0.0);
        // Knowing only the current token (a single layer: nothing left of it) is LRU.
        assert_eq!(t.lookahead_hit_rate(2, 0), 0.0);
        // Knowing the next token: token 2 keeps 0 (token 3's) and evicts 1; token 4 keeps 2
        // and evicts 0: tokens 3 and 5 hit, as the optimal policy does.
        assert!((t.lookahead_hit_rate(2, 1) - 2.0 / 6.0).abs() < 1e-12);
        assert!((t.optimal_hit_rate(2) - 2.0 / 6.0).abs() < 1e-12);

        // Two layers, top-1, 3 slots. Token 2's layer 0 misses (expert 0) with layer 0's
        // expert 1 and layer 1's experts 1 and 2 resident. LRU evicts layer 1's expert 1, the
        // oldest, which token 2's layer 1 then needs; knowing the current token's routing
        // keeps it and evicts layer 0's expert 1.
        let mut t = RouteTrace::new(2, 3, 1);
        t.choices[0] = vec![1, 1, 0];
        t.choices[1] = vec![1, 2, 1];
        assert!((t.hit_rate("lru", 3) - 1.0 / 6.0).abs() < 1e-12);
        assert!((t.lookahead_hit_rate(3, 0) - 2.0 / 6.0).abs() < 1e-12);
    }
}
