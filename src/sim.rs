//! Simulations over a recorded routing (`RouteTrace`): the hit rate an arena of a given
//! size would get replaying it in decode order (one token at a time, layer by layer) under
//! each eviction policy (through the real `Scheduler`), under Belady's optimal policy (the
//! bound for any policy), and under LRU told the routing ahead; and the routing statistics
//! usage.json records.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::engine::scheduler::{self, Scheduler};
use crate::engine::trace::RouteTrace;

impl RouteTrace {
    /// Hit rate of an arena of `n_slots` under `policy` (a name from
    /// `scheduler::POLICIES`) replaying the trace in decode order.
    pub fn hit_rate(&self, policy: &str, n_slots: usize) -> f64 {
        self.replay(
            n_slots,
            scheduler::policy(policy, n_slots, self.n_layer * self.n_expert_used).expect("a known policy"),
        )
    }

    /// Hit rate of an arena of `n_slots` under `policy` replaying the trace in decode order,
    /// each token's experts asked for as the engine asks for them (in id order), so that a
    /// decode run's hit rate equals its trace's replay.
    pub fn replay(&self, n_slots: usize, policy: Box<dyn scheduler::Policy>) -> f64 {
        self.replay_hinted(n_slots, policy, 0)
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

    /// Recall at `m` of the next-layer prediction (`predicted_logits`): the share of layer
    /// il's chosen experts among the `m` highest logits of layer il's router applied to the
    /// residual stream before layer il−1's experts, over layers 1.. and every token. None when
    /// the trace has no predictions.
    pub fn next_layer_recall(&self, m: usize) -> Option<f64> {
        let p = self.predicted_logits.as_ref()?;
        let (n, k) = (self.n_expert, self.n_expert_used);
        let (mut hit, mut all) = (0u64, 0u64);
        for (il, pl) in p.iter().enumerate().take(self.n_layer).skip(1) {
            for t in 0..self.n_tokens().min(pl.len() / n) {
                let top = top_ids(&pl[t * n..(t + 1) * n], m);
                hit += self.token(il, t).iter().filter(|e| top.contains(e)).count() as u64;
                all += k as u64;
            }
        }
        (all > 0).then(|| hit as f64 / all as f64)
    }

    /// The router's runners-up of token `t` in layer `il`: the `m` experts ranked just below
    /// the chosen ones by its logits (needs `router_logits`).
    pub fn runners_up(&self, il: usize, t: usize, m: usize) -> Vec<u32> {
        let n = self.n_expert;
        let logits = &self.router_logits.as_ref().expect("a trace with router logits")[il][t * n..(t + 1) * n];
        let chosen = self.token(il, t);
        let mut ids = top_ids(logits, chosen.len() + m);
        ids.retain(|e| !chosen.contains(e));
        ids.truncate(m);
        ids
    }

    /// `replay`, telling the policy after each step which resident experts the router ranked
    /// just below the chosen ones (its `m` runners-up; `Scheduler::hint`). Needs router logits
    /// when `m` > 0; with 0 it is `replay`.
    pub fn replay_hinted(&self, n_slots: usize, policy: Box<dyn scheduler::Policy>, m: usize) -> f64 {
        let mut s = Scheduler::new(n_slots, policy);
        for t in 0..self.n_tokens() {
            for il in 0..self.n_layer {
                let mut experts = self.token(il, t).to_vec();
                experts.sort_unstable();
                s.ensure(il as u32, &experts, |_, _| Ok::<u64, ()>(0)).expect("loads cannot fail");
                if m > 0 {
                    s.hint(il as u32, &self.runners_up(il, t, m));
                }
            }
        }
        s.stats.hit_rate()
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

/// Ids of the `m` largest values, largest first (ties to the lower id).
pub fn top_ids(values: &[f32], m: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..values.len() as u32).collect();
    ids.sort_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]).then(a.cmp(&b)));
    ids.truncate(m);
    ids
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_single_use() {
        assert!((entropy_bits(&[1, 1, 1, 1]) - 2.0).abs() < 1e-12);
        assert_eq!(entropy_bits(&[5, 0, 0, 0]), 0.0);
    }

    #[test]
    fn lru_replay() {
        let t = RouteTrace::example();
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
