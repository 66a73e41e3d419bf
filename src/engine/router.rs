//! Routing: softmax over the pool's router logits, top-k, optional renormalization. Pure
//! functions over f32, so the rule is in one place and testable without a backend.

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
}
