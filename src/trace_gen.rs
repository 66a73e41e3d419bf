//! Routing traces drawn from a generator fitted to published statistics of Qwen3-30B-A3B's
//! routing, for trace-driven benchmarks of models with random weights (whose own routing is
//! near uniform and cannot be cached).
//!
//! The model: each layer keeps its experts in an LRU stack (most recently chosen first); a
//! token picks `n_expert_used` distinct stack positions, each drawn with a weight that is
//! constant within four bands, then moves the chosen experts to the top. The bands are the
//! previous token's experts (positions `0..k`), the rest of the first `LRU_CURVE[0].0` of the
//! experts, the rest of the first `LRU_CURVE[1].0`, and the remainder. With every layer alike,
//! an LRU arena holding a share `f` of all experts keeps about the first `f × n_expert` stack
//! positions of each layer, so its hit rate is the share of picks drawn above that position:
//! the band masses are fitted (`fit`) so that those shares are the published LRU hit rates,
//! and the share drawn from band 0 is the published next-token repeat rate.

use crate::engine::trace::RouteTrace;

/// Published replays of real Qwen3-30B-A3B routing (48 layers, 128 experts, top-8), as quoted
/// in sage's routing issue: an LRU arena holding about 19% of each layer's experts hits 74%,
/// about 38% hits 89%.
pub const LRU_CURVE: [(f64, f64); 2] = [(0.19, 0.74), (0.38, 0.89)];
/// Share of a token's experts the next token chooses again (published: 45%).
pub const NEXT_TOKEN_REPEAT: f64 = 0.45;
/// Median reuse distance in tokens (published: 2); not fitted, reported beside the generator's.
pub const MEDIAN_REUSE_DISTANCE: usize = 2;

/// Shape of the trace to draw.
#[derive(Clone, Copy, Debug)]
pub struct TraceShape {
    pub n_layer: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
}

/// The fitted generator.
#[derive(Clone, Debug)]
pub struct Generator {
    shape: TraceShape,
    /// First stack position of bands 1, 2, 3 (band 0 starts at 0).
    edges: [usize; 3],
    /// Probability mass of each band per pick (before positions already picked are removed).
    pub masses: [f64; 4],
}

/// splitmix64: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Generator {
    /// The generator for `shape`, its band masses fitted to the published statistics.
    pub fn fit(shape: TraceShape) -> Generator {
        let (n, k) = (shape.n_expert, shape.n_expert_used);
        let pos = |f: f64| ((f * n as f64).round() as usize).clamp(k + 1, n);
        let e1 = pos(LRU_CURVE[0].0);
        let e2 = pos(LRU_CURVE[1].0).max(e1 + 1).min(n);
        let edges = [k, e1, e2];
        // Target share of picks drawn from each band.
        let cum = [NEXT_TOKEN_REPEAT, LRU_CURVE[0].1, LRU_CURVE[1].1, 1.0];
        let target = [cum[0], cum[1] - cum[0], cum[2] - cum[1], cum[3] - cum[2]];
        let mut g = Generator { shape, edges, masses: target };
        // Drawing k distinct positions shifts the realized shares away from the masses (band
        // 0 has only k positions): correct the masses by the realized shares a few times.
        let probe = TraceShape { n_layer: 4, ..shape };
        for round in 0..12 {
            let mut counts = [0u64; 4];
            Generator { shape: probe, ..g.clone() }.draw(512, 1000 + round, |band| counts[band] += 1);
            let total: u64 = counts.iter().sum();
            for b in 0..4 {
                let got = (counts[b] as f64 / total as f64).max(1e-9);
                g.masses[b] *= target[b] / got;
            }
            let s: f64 = g.masses.iter().sum();
            g.masses.iter_mut().for_each(|m| *m /= s);
        }
        g
    }

    fn band(&self, p: usize) -> usize {
        self.edges.iter().filter(|&&e| p >= e).count()
    }

    /// A trace of `n_tokens` tokens drawn with `seed`.
    pub fn trace(&self, n_tokens: usize, seed: u64) -> RouteTrace {
        self.draw(n_tokens, seed, |_| {})
    }

    fn draw(&self, n_tokens: usize, seed: u64, mut picked_band: impl FnMut(usize)) -> RouteTrace {
        let TraceShape { n_layer, n_expert: n, n_expert_used: k } = self.shape;
        let mut rng = Rng(seed ^ 0x5A6E_0000_0000_0001);
        let widths = [self.edges[0], self.edges[1] - self.edges[0], self.edges[2] - self.edges[1], n - self.edges[2]];
        let weight: Vec<f64> = (0..n)
            .map(|p| {
                let b = self.band(p);
                self.masses[b] / widths[b].max(1) as f64
            })
            .collect();
        let mut t = RouteTrace::new(n_layer, n, k);
        for il in 0..n_layer {
            // Each layer starts from its own random order.
            let mut stack: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                stack.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let mut taken = vec![false; n];
            let mut picks = Vec::with_capacity(k);
            for _ in 0..n_tokens {
                picks.clear();
                taken.iter_mut().for_each(|x| *x = false);
                let mut left: f64 = weight.iter().sum();
                for _ in 0..k {
                    let mut u = rng.unit() * left;
                    let mut p = n - 1;
                    for (q, &w) in weight.iter().enumerate() {
                        if taken[q] {
                            continue;
                        }
                        if u < w {
                            p = q;
                            break;
                        }
                        u -= w;
                    }
                    // Rounding can leave u past the last weight: take the last free position.
                    if taken[p] {
                        p = (0..n).rev().find(|&q| !taken[q]).expect("k ≤ n");
                    }
                    taken[p] = true;
                    left -= weight[p];
                    picked_band(self.band(p));
                    picks.push(p);
                }
                // Chosen experts to the top, in stack order; the rest keep theirs.
                let chosen: Vec<u32> = (0..n).filter(|&q| taken[q]).map(|q| stack[q]).collect();
                let rest: Vec<u32> = (0..n).filter(|&q| !taken[q]).map(|q| stack[q]).collect();
                t.choices[il].extend(picks.iter().map(|&p| stack[p]));
                stack = chosen.into_iter().chain(rest).collect();
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fitted_trace_has_the_published_lru_curve_and_repeats() {
        let shape = TraceShape { n_layer: 48, n_expert: 128, n_expert_used: 8 };
        let g = Generator::fit(shape);
        let t = g.trace(400, 7);
        assert_eq!((t.n_layer, t.n_expert, t.n_tokens()), (48, 128, 400));
        for (f, published) in LRU_CURVE {
            let slots = (f * (48 * 128) as f64).round() as usize;
            let got = t.hit_rate("lru", slots);
            // The target: within 5 points of the published curve.
            assert!((got - published).abs() < 0.05, "LRU at {f}: {got} against {published}");
        }
        assert!((t.next_token_repeat() - NEXT_TOKEN_REPEAT).abs() < 0.03, "{}", t.next_token_repeat());
        assert_eq!(t.median_reuse_distance(), Some(MEDIAN_REUSE_DISTANCE));
        // The same seed draws the same trace; another seed another.
        assert_eq!(g.trace(50, 7).choices[3], Generator::fit(shape).trace(50, 7).choices[3]);
        assert_ne!(g.trace(50, 7).choices[3], g.trace(50, 8).choices[3]);
    }
}
