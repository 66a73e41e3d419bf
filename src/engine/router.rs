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
    debug_assert_eq!(probs.len(), ids.len());
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(ids[a].cmp(&ids[b])));
    order.truncate(k);
    let mut weights: Vec<f32> = order.iter().map(|&i| probs[i]).collect();
    if norm_topk_prob {
        let s = weights.iter().map(|&w| w as f64).sum::<f64>() as f32;
        weights.iter_mut().for_each(|w| *w /= s);
    }
    Choice { experts: order.iter().map(|&i| ids[i]).collect(), weights }
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
