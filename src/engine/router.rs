//! Routing: softmax over the pool's router logits, top-k, optional renormalization; and the
//! cache-aware variant (`--cache-bias`), which prefers experts already in the arena among
//! those close to the top-k. Pure functions over f32, so the rules are in one place and
//! testable without a backend.

/// The experts chosen for one token and their weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Route one token. `logits` has one entry per expert of the model; experts where `present`
/// is false cannot be chosen (their logits count as -inf before the softmax). Ties go to the
/// lower expert id.
pub fn route(logits: &[f32], present: &[bool], k: usize, norm_topk_prob: bool) -> Choice {
    debug_assert_eq!(logits.len(), present.len());
    let max = logits.iter().zip(present).filter(|(_, &p)| p).map(|(&l, _)| l).fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f32> = logits.iter().zip(present).map(|(&l, &p)| if p { (l - max).exp() } else { 0.0 }).collect();
    let sum: f32 = probs.iter().sum();
    let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&e| present[e as usize]).collect();
    order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
    order.truncate(k);
    let mut weights: Vec<f32> = order.iter().map(|&e| probs[e as usize] / sum).collect();
    if norm_topk_prob {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
    Choice { experts: order, weights }
}

/// Route one token from the router's probabilities as ggml computed them (`ggml_soft_max`
/// over the experts present, `ids`, in the graph): the top k by probability (ties to the
/// lower id), their probabilities as weights, renormalized where `norm_topk_prob` by their
/// sum accumulated in f64 and rounded to f32, as ggml's `sum_rows` and `div` do. The weights
/// are then bit-identical to those of the all-resident graph (`engine::fused`).
pub fn route_probs(probs: &[f32], ids: &[u32], k: usize, norm_topk_prob: bool) -> Choice {
    route_scores(probs, probs, ids, &Rule::top_k(k, norm_topk_prob))
}

/// A router's rule beyond its scores (`config::Gating`, `ModelConfig::norm_topk_prob`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// Experts per token.
    pub k: usize,
    /// Renormalize the chosen weights to sum to 1.
    pub norm: bool,
    /// Groups of `per_group` consecutive expert ids, of which the best `n_group_used` are
    /// kept; `n_group` 1: no groups.
    pub n_group: u32,
    pub n_group_used: u32,
    pub per_group: u32,
    /// The weights' scale (`routed_scaling_factor`); 1: none.
    pub scale: f32,
}

impl Rule {
    /// Plain top-k (softmax families): no groups, no scale.
    pub fn top_k(k: usize, norm: bool) -> Rule {
        Rule { k, norm, n_group: 1, n_group_used: 1, per_group: 0, scale: 1.0 }
    }

    /// The rule of a model.
    pub fn of(cfg: &crate::config::ModelConfig) -> Rule {
        let g = cfg.gating;
        Rule {
            k: cfg.n_expert_used as usize,
            norm: cfg.norm_topk_prob,
            n_group: g.n_group.max(1),
            n_group_used: g.n_group_used,
            per_group: cfg.n_expert / g.n_group.max(1),
            scale: g.scale,
        }
    }
}

/// llama.cpp's floor on the sum of the chosen weights before renormalizing (the smallest
/// normal f16).
pub const WEIGHTS_SUM_MIN: f32 = 1.0 / 16384.0;

/// Route one token from the scores as ggml computed them over the experts present (`ids`,
/// ascending): `probs` the router's scores (softmax over the present experts, or the sigmoid
/// of each logit), `select` what experts are chosen by (`probs` plus the correction bias, or
/// `probs` itself), as llama.cpp's `build_moe_ffn`:
///
/// - with groups (`Rule::n_group` > 1), each group is scored by the sum of its two highest
///   `select` values, and only the experts of the best `n_group_used` groups (ties to the lower
///   group) can be chosen;
/// - the top k of those by `select` (ties to the lower id), in that order;
/// - their `probs` as weights, renormalized where `norm` by their sum accumulated in f64 and
///   rounded to f32 (as ggml's `sum_rows` and `div` do), floored at `WEIGHTS_SUM_MIN`, then
///   multiplied by `scale`.
///
/// Over a pool (some experts absent) a group is what is left of it: scored by its two
/// highest present members (by its one if only one is left), a group with none cannot be
/// chosen, and where the best `n_group_used` groups keep fewer than k experts, the next best
/// groups are added until k can be chosen. With every expert present this is exactly the
/// rule above, so the weights are bit-identical to the all-resident graph's (`engine::fused`).
pub fn route_scores(probs: &[f32], select: &[f32], ids: &[u32], r: &Rule) -> Choice {
    debug_assert!(probs.len() == ids.len() && select.len() == ids.len());
    let mut allowed: Vec<usize> = (0..ids.len()).collect();
    if r.n_group > 1 && r.per_group > 0 {
        let group = |i: usize| ids[i] / r.per_group;
        let mut scores: Vec<(f32, u32)> = Vec::new();
        for gi in 0..r.n_group {
            let mut v: Vec<f32> = (0..ids.len()).filter(|&i| group(i) == gi).map(|i| select[i]).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            match v.len() {
                0 => {}
                1 => scores.push((v[0], gi)),
                _ => scores.push((v[0] + v[1], gi)),
            }
        }
        scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut kept = Vec::new();
        for &(_, gi) in &scores {
            let have = (0..ids.len()).filter(|&i| kept.contains(&group(i))).count();
            if kept.len() >= r.n_group_used as usize && have >= r.k {
                break;
            }
            kept.push(gi);
        }
        allowed.retain(|&i| kept.contains(&group(i)));
    }
    allowed.sort_by(|&a, &b| select[b].total_cmp(&select[a]).then(ids[a].cmp(&ids[b])));
    allowed.truncate(r.k);
    let mut weights: Vec<f32> = allowed.iter().map(|&i| probs[i]).collect();
    if r.norm {
        let s = (weights.iter().map(|&w| w as f64).sum::<f64>() as f32).max(WEIGHTS_SUM_MIN);
        weights.iter_mut().for_each(|w| *w /= s);
    }
    if r.scale != 1.0 {
        weights.iter_mut().for_each(|w| *w *= r.scale);
    }
    Choice { experts: allowed.iter().map(|&i| ids[i]).collect(), weights }
}

/// Cache-aware routing (`EngineOptions::cache_bias`, `--cache-bias`). With p the router's
/// softmax over the pool and R the experts resident before the token is routed:
///
/// - the `keep` experts of highest p are always chosen (the router's own top choices);
/// - the other k − keep are the highest by s(e) = ln p(e) + bias · [e ∈ R] among the rest,
///   where an expert that is not among the exact top-k may only be chosen if it is resident
///   and p(e) ≥ `floor` (so a resident expert displaces a missing one only when its
///   probability is within a factor e^bias of it, and never from below the floor);
/// - the weights are the chosen experts' p, renormalized over them as the model's router
///   does (`norm_topk_prob`), else p itself.
///
/// bias 0 is exact routing: `route_cached` then returns `route`'s choice, bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheBias {
    /// Added to a resident expert's log-probability when ranking, in nats.
    pub bias: f32,
    /// The router's top experts that are always kept (at least 1 when bias > 0 is useful).
    pub keep: usize,
    /// Least probability (softmax over the pool) an expert outside the exact top-k needs to be
    /// chosen in place of one of them; None: 1 / (experts in the pool), the uniform share.
    pub floor: Option<f32>,
}

impl CacheBias {
    /// Exact routing.
    pub const EXACT: CacheBias = CacheBias { bias: 0.0, keep: 1, floor: None };

    pub fn is_exact(&self) -> bool {
        self.bias == 0.0
    }
}

impl Default for CacheBias {
    fn default() -> Self {
        CacheBias::EXACT
    }
}

/// Route one token as `route` does, but preferring experts for which `resident` is true, as
/// `cb` says (see `CacheBias`). Experts outside the pool (`present` false) are never chosen.
pub fn route_cached(
    logits: &[f32],
    present: &[bool],
    resident: &[bool],
    k: usize,
    norm_topk_prob: bool,
    cb: &CacheBias,
) -> Choice {
    let exact = route(logits, present, k, norm_topk_prob);
    if cb.is_exact() {
        return exact;
    }
    debug_assert_eq!(logits.len(), resident.len());
    let n_pool = present.iter().filter(|&&p| p).count();
    let floor = cb.floor.unwrap_or(1.0 / n_pool.max(1) as f32);
    let max = logits.iter().zip(present).filter(|(_, &p)| p).map(|(&l, _)| l).fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f32> = logits.iter().zip(present).map(|(&l, &p)| if p { (l - max).exp() } else { 0.0 }).collect();
    let sum: f32 = probs.iter().sum();
    let p = |e: u32| probs[e as usize] / sum;
    let keep = cb.keep.min(k);
    let mut chosen: Vec<u32> = exact.experts[..keep.min(exact.experts.len())].to_vec();
    // Candidates for the other places: the rest of the exact top-k, and resident experts of
    // the pool above the floor; ranked by ln p + bias (resident), ties to the exact order.
    let mut cands: Vec<(f32, u32)> = (0..logits.len() as u32)
        .filter(|&e| present[e as usize] && !chosen.contains(&e))
        .filter(|&e| exact.experts.contains(&e) || (resident[e as usize] && p(e) >= floor))
        .map(|e| (p(e).ln() + if resident[e as usize] { cb.bias } else { 0.0 }, e))
        .collect();
    cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    chosen.extend(cands.iter().take(k - chosen.len()).map(|&(_, e)| e));
    // In the router's order (by p), as `route` gives them.
    chosen.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
    let mut weights: Vec<f32> = chosen.iter().map(|&e| p(e)).collect();
    if norm_topk_prob {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
    Choice { experts: chosen, weights }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_with_and_without_renormalization() {
        let logits = [1.0, 3.0, 2.0, 0.0];
        let all = [true; 4];
        let c = route(&logits, &all, 2, false);
        assert_eq!(c.experts, vec![1, 2]);
        let z: f32 = logits.iter().map(|l| (l - 3.0f32).exp()).sum();
        assert!((c.weights[0] - 1.0 / z).abs() < 1e-6);
        let c = route(&logits, &all, 2, true);
        assert!((c.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((c.weights[0] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn groups_limit_the_choice_and_weights_are_the_unbiased_scores_scaled() {
        // 8 experts in 4 groups of 2; group sums of the biased scores: 0.9, 1.0, 0.85, 0.6.
        let select = [0.9, 0.0, 0.5, 0.5, 0.8, 0.05, 0.3, 0.3];
        let bias = [0.1, -0.2, 0.0, 0.1, 0.3, 0.0, 0.0, 0.1];
        let probs: Vec<f32> = select.iter().zip(&bias).map(|(s, b)| s - b).collect();
        let ids: Vec<u32> = (0..8).collect();
        let rule = Rule { k: 2, norm: true, n_group: 4, n_group_used: 2, per_group: 2, scale: 2.5 };
        let c = route_scores(&probs, &select, &ids, &rule);
        // Groups 1 and 0 are kept: expert 4 (0.8, group 2) is out; 2 and 3 tie, the lower id wins.
        assert_eq!(c.experts, vec![0, 2]);
        let s = probs[0] + probs[2];
        assert_eq!(c.weights, vec![probs[0] / s * 2.5, probs[2] / s * 2.5]);
        // Without groups the plain top 2 by the biased scores, weights unnormalized and unscaled.
        let c = route_scores(&probs, &select, &ids, &Rule::top_k(2, false));
        assert_eq!((c.experts, c.weights), (vec![0, 4], vec![probs[0], probs[4]]));
        // Plain top-k is `route_probs`.
        assert_eq!(route_probs(&probs, &ids, 3, true), route_scores(&probs, &probs, &ids, &Rule::top_k(3, true)));
    }

    #[test]
    fn a_pooled_group_is_what_is_left_of_it() {
        let select = [0.9, 0.0, 0.5, 0.5, 0.8, 0.05, 0.3, 0.3];
        let rule = Rule { k: 3, norm: false, n_group: 4, n_group_used: 1, per_group: 2, scale: 1.0 };
        // Pool {0, 4, 5, 6}: group 0 keeps expert 0 alone (0.9), group 2 both (0.85), group 3
        // expert 6 (0.3), group 1 nothing. The best group holds 1 expert of the 3 needed, so
        // the next best are added: groups 0 and 2 hold 3.
        let ids = [0u32, 4, 5, 6];
        let sel: Vec<f32> = ids.iter().map(|&e| select[e as usize]).collect();
        let c = route_scores(&sel, &sel, &ids, &rule);
        assert_eq!(c.experts, vec![0, 4, 5]);
        // Every weight sum is floored before dividing, as llama.cpp floors it.
        let tiny = [1e-9f32, 2e-9];
        let c = route_scores(&tiny, &tiny, &[0, 1], &Rule::top_k(2, true));
        assert_eq!(c.weights, vec![2e-9 / WEIGHTS_SUM_MIN, 1e-9 / WEIGHTS_SUM_MIN]);
    }

    #[test]
    fn pool_masks_absent_experts_before_softmax() {
        let logits = [1.0, 3.0, 2.0, 0.0];
        let c = route(&logits, &[true, false, true, true], 2, false);
        assert_eq!(c.experts, vec![2, 0]);
        // Softmax over the pool only: e^2 / (e^1 + e^2 + e^0).
        let z = 1f32.exp() + 2f32.exp() + 1.0;
        assert!((c.weights[0] - 2f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn cache_bias_zero_is_exact_routing() {
        let logits = [0.3, 2.0, -1.0, 1.9, 0.5, 1.0];
        let present = [true, true, false, true, true, true];
        let resident = [true, false, true, false, true, true];
        for norm in [false, true] {
            let exact = route(&logits, &present, 3, norm);
            let c = route_cached(&logits, &present, &resident, 3, norm, &CacheBias::EXACT);
            assert_eq!(c, exact);
        }
    }

    #[test]
    fn cache_bias_prefers_resident_experts_within_the_bias() {
        // p ∝ e^l: experts 1 (top), 3, 5 are the exact top-3; 4 is resident, e^-0.5 below 5.
        let logits = [0.0, 2.0, -1.0, 1.9, 0.5, 1.0];
        let all = [true; 6];
        let resident = [false, false, false, false, true, false];
        let exact = route(&logits, &all, 3, true);
        assert_eq!(exact.experts, vec![1, 3, 5]);
        // Too small a bias: 4's ln p + 0.4 < 5's ln p.
        let cb = |bias| CacheBias { bias, keep: 1, floor: Some(0.0) };
        assert_eq!(route_cached(&logits, &all, &resident, 3, true, &cb(0.4)).experts, vec![1, 3, 5]);
        // 0.6 > 0.5: 4 displaces 5, the weakest of the exact choices; weights renormalized.
        let c = route_cached(&logits, &all, &resident, 3, true, &cb(0.6));
        assert_eq!(c.experts, vec![1, 3, 4]);
        let z = 2f32.exp() + 1.9f32.exp() + 0.5f32.exp();
        assert!((c.weights[2] - 0.5f32.exp() / z).abs() < 1e-6 && (c.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // A large bias still keeps the router's top expert (keep = 1), however resident others are.
        let resident = [true, false, true, true, true, true];
        let c = route_cached(&logits, &all, &resident, 3, false, &cb(10.0));
        assert!(c.experts.contains(&1));
        // Unnormalized weights are the softmax probabilities themselves.
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (e, w) in c.experts.iter().zip(&c.weights) {
            assert!((w - logits[*e as usize].exp() / z).abs() < 1e-6);
        }
    }

    #[test]
    fn cache_bias_never_leaves_the_pool_or_goes_below_the_floor() {
        // A deterministic spread of logits over 64 experts, half of them outside the pool,
        // random residency; every choice must be in the pool, and any expert outside the exact
        // top-k must be resident and at or above the floor.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f32 / (1u64 << 53) as f32
        };
        for round in 0..500 {
            let n = 64;
            let logits: Vec<f32> = (0..n).map(|_| 4.0 * next()).collect();
            let present: Vec<bool> = (0..n).map(|e| e % 2 == 0 || next() < 0.3).collect();
            let resident: Vec<bool> = (0..n).map(|_| next() < 0.4).collect();
            let floor = if round % 2 == 0 { None } else { Some(0.02) };
            let cb = CacheBias { bias: 0.5 + 4.0 * next(), keep: round % 3, floor };
            let k = 8;
            let exact = route(&logits, &present, k, true);
            let c = route_cached(&logits, &present, &resident, k, true, &cb);
            assert_eq!(c.experts.len(), k);
            let n_pool = present.iter().filter(|&&p| p).count();
            let f = floor.unwrap_or(1.0 / n_pool as f32);
            let max = logits.iter().zip(&present).filter(|(_, &p)| p).map(|(&l, _)| l).fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().zip(&present).filter(|(_, &p)| p).map(|(&l, _)| (l - max).exp()).sum();
            for &e in &c.experts {
                assert!(present[e as usize], "round {round}: expert {e} is outside the pool");
                if !exact.experts.contains(&e) {
                    assert!(resident[e as usize], "round {round}: {e} substitutes but is not resident");
                    let p = (logits[e as usize] - max).exp() / z;
                    assert!(p >= f, "round {round}: {e} has p {p} below the floor {f}");
                }
            }
            // The router's top `keep` are always there; no expert twice.
            assert!(exact.experts[..cb.keep.min(k)].iter().all(|e| c.experts.contains(e)));
            let mut d = c.experts.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), k);
        }
    }
}
